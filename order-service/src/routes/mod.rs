//! The HTTP API.

mod health;
mod orders;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use service_kit::openapi::Common;
use service_kit::{detach, method_not_allowed, not_found};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

use resilience::feed::FeedLog;
use resilience::idempotency::IdempotencyLayer;
use resilience::outbox::Outbox;
use service_kit::admin::{self, AdminState};
use service_kit::auth::{require_signed, Verifier};
use service_kit::memory_dedupe::{self, MemoryDedupe};
use service_kit::stack::SendService;

use crate::config::Config;
use crate::store::OrderStore;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The orders table.
    pub store: OrderStore,
    /// The outbox (at-least-once and effectively-once orders).
    pub outbox: Outbox,
    /// The plain client stack (at-most-once orders).
    pub plain: SendService,
    /// The event log behind `GET /orders/feed/{mode}` (pull modes).
    pub feed: FeedLog,
    /// The receiver's memory of keys in `memory-dedupe` mode (process-local).
    pub memory: MemoryDedupe,
    /// The outbox's backlog, for back-pressure on `POST /orders`.
    pub backlog: crate::backlog::Backlog,
    /// What the /admin endpoints act on.
    pub admin: AdminState,
    /// Counts `POST /orders` in flight; the relay and the orders feed give
    /// way to them (RELAY_GIVE_WAY_*).
    pub give_way: resilience::foreground::GiveWay,
    /// Checks the signature of service-to-service calls (one replay cache
    /// per process).
    pub verifier: Verifier,
    /// The configuration the service started with.
    pub config: Arc<Config>,
}

/// The OpenAPI document's fixed part; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "order-service",
        description = "Takes orders and gets them to shipping-service. Errors are \
            `application/problem+json` (RFC 9457). The `/admin` routes (off by default) \
            are not part of this document."
    ),
    modifiers(&Common)
)]
pub struct ApiDoc;

/// The router with every route and the service-wide layers.
pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    // Write routes run in a transaction owned by the idempotency layer, which
    // also records (and replays) the answers to requests with a key.
    let idem = IdempotencyLayer::new(
        state
            .config
            .delivery
            .idempotency(state.store.db().clone(), max_body),
    );
    // The memory-dedupe counter-example sits outside the persisted layer and
    // hides the key from it (only for requests marked `x-dedupe: memory`).
    // POST /orders runs its handler before claiming the key (Postgres): the
    // order, its message to shipping and the key's record are one statement.
    let idem_create = IdempotencyLayer::new(idem.config().clone().handler_first(true));
    let memory =
        axum::middleware::from_fn_with_state(state.memory.clone(), memory_dedupe::middleware);
    let signed = require_signed(&state.verifier);
    // Every public route is declared with `routes!`, from its handler's
    // `#[utoipa::path]`: the route and its OpenAPI description are one
    // declaration (tests/tests/openapi.rs checks none is served without it).
    let (api, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(
            routes!(orders::create)
                .layer(idem_create)
                .layer(memory.clone()),
        )
        .routes(routes!(orders::list))
        .routes(
            // The feeds are service-to-service: signed reads only.
            routes!(orders::feed).map(|r| r.route_layer(signed.clone())),
        )
        .routes(routes!(orders::get_one))
        .routes(
            // Only shipping-service may report: signed, checked before the
            // idempotency layer opens a transaction.
            routes!(orders::shipment_event)
                .layer(idem)
                .layer(memory)
                .map(|r| r.route_layer(signed)),
        )
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .split_for_parts();
    // POST /batch: served by resilience::batch, documented by service-kit.
    doc.merge(service_kit::openapi::BatchDoc::openapi());
    let app = api
        .route("/openapi.json", service_kit::openapi::serve(&doc))
        // One `Arc`: axum clones the state for every request (and every
        // request of a `POST /batch`).
        .with_state(Arc::new(state.clone()))
        .merge(admin::router(state.admin))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies past the limit are refused with 413 by the JSON extractor.
        .layer(DefaultBodyLimit::max(max_body))
        // A declared length past the limit: 413 before the body is read.
        .layer(axum::middleware::from_fn_with_state(
            max_body,
            service_kit::refuse_oversized,
        ))
        // The request's span: continues the caller's trace (inside detach,
        // so the span covers the task the handler runs in).
        .layer(axum::middleware::from_fn(service_kit::trace::middleware))
        // Handlers finish their transaction even if the caller hangs up.
        .layer(axum::middleware::from_fn(detach))
        .layer(TraceLayer::new_for_http())
        // Counts and times each request by route template.
        .layer(axum::middleware::from_fn(service_kit::metrics::track_http));
    // Batches run their requests through `app`, each with its own layers.
    let app = service_kit::with_batch(
        app,
        state.store.db(),
        &[
            (http::Method::POST, "/orders"),
            (http::Method::POST, "/orders/{id}/shipment-events"),
        ],
    );
    // Group commit: orders that arrive while others are being written are
    // written together, each answered as if alone.
    let app = service_kit::with_group_commit(
        app,
        state.store.db(),
        &[(http::Method::POST, "/orders")],
        state.config.group_commit,
        max_body,
    );
    // The relay gives way while orders queue at the door (RELAY_GIVE_WAY_*).
    service_kit::front_door(
        app,
        state.give_way.foreground.clone(),
        &[(http::Method::POST, "/orders")],
    )
}
