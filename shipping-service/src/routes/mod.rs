//! The HTTP API.

mod health;
mod shipments;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use service_kit::{detach, method_not_allowed, not_found};
use tower_http::trace::TraceLayer;

use resilience::feed::FeedLog;
use resilience::idempotency::IdempotencyLayer;
use service_kit::admin::{self, AdminState};
use service_kit::auth::{require_signed, Verifier};
use service_kit::memory_dedupe::{self, MemoryDedupe};

use crate::config::Config;
use crate::store::ShipmentStore;
use crate::warehouse::Warehouse;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The shipments table.
    pub store: ShipmentStore,
    /// The warehouse, woken when a shipment is created.
    pub warehouse: Warehouse,
    /// The event log behind `GET /shipments/feed/{mode}` (pull modes).
    pub feed: FeedLog,
    /// The receiver's memory of keys in `memory-dedupe` mode (process-local).
    pub memory: MemoryDedupe,
    /// What the /admin endpoints act on.
    pub admin: AdminState,
    /// Checks the signature of service-to-service calls (one replay cache
    /// per process).
    pub verifier: Verifier,
    /// The configuration the service started with.
    pub config: Arc<Config>,
}

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
    let memory =
        axum::middleware::from_fn_with_state(state.memory.clone(), memory_dedupe::middleware);
    Router::new()
        .route(
            "/shipments",
            // Only order-service may create shipments: signed, checked
            // before the idempotency layer opens a transaction.
            post(shipments::create)
                .layer(idem)
                .layer(memory)
                .route_layer(require_signed(&state.verifier))
                .get(shipments::list),
        )
        .route(
            "/shipments/feed/{mode}",
            // The feeds are service-to-service: signed reads only.
            get(shipments::feed).route_layer(require_signed(&state.verifier)),
        )
        .route("/shipments/{id}", get(shipments::get_one))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(state.clone())
        .merge(admin::router(state.admin))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        // The request's span: continues the caller's trace (inside detach,
        // so the span covers the task the handler runs in).
        .layer(axum::middleware::from_fn(service_kit::trace::middleware))
        // Handlers finish their transaction even if the caller hangs up.
        .layer(axum::middleware::from_fn(detach))
        .layer(TraceLayer::new_for_http())
}
