use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::{Extension, Json};
use resilience::batch::BatchScope;
use resilience::feed::{FeedQuery, Page};
use resilience::idempotency::Tx;
use resilience::outbox::OutboxError;
use serde::{Deserialize, Serialize};
use service_kit::feeds::{feed_name, parse_feed_mode};
use service_kit::openapi::{
    BadRequest, Conflict, FeedMode, FeedPage, Gone, NotFound, PayloadTooLarge, Unauthorized,
    Unavailable, Unprocessable, UnsupportedMediaType,
};
use service_kit::trace::{CurrentTrace, TraceContext};
use service_kit::{cursor, db_error, internal_error, ApiJson, ApiPath, ApiQuery, Problem};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::domain::{CreateOrderRequest, NewOrder, Order, OrderId, OrderStatus, ShipmentEvent};
use crate::pull;
use crate::shipping::{order_created, send_once, shipment_request};
use crate::store::{ApplyError, OrderStore, Planned};

const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

fn parse_id(raw: &str) -> Result<OrderId, Problem> {
    raw.parse().map_err(Problem::bad_request)
}

/// `POST /orders`: commit the order, then get it to shipping in its mode.
///
/// The route is wrapped in the idempotency layer, which owns the transaction:
/// a client that repeats the request with the same `Idempotency-Key` gets the
/// first answer back instead of a second order. The answer shows the order as
/// committed (`pending`); the relay, or in at-most-once mode the single call
/// made right after the commit, moves it on.
#[utoipa::path(
    post,
    path = "/orders",
    tag = "orders",
    params(service_kit::openapi::IdempotencyHeaders),
    request_body(content = CreateOrderRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The order, committed (`pending`); a repeat with the same Idempotency-Key replays this answer", body = Order,
            headers(("Location" = String, description = "/orders/{id}"))),
        (status = 400, response = BadRequest),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn create(
    State(app): State<Arc<AppState>>,
    CurrentTrace(trace): CurrentTrace,
    tx: Tx,
    ApiJson(req): ApiJson<CreateOrderRequest>,
) -> Result<(StatusCode, HeaderMap, Json<Order>), Problem> {
    // Back-pressure first: past the bound, nothing is written.
    app.backlog.admit()?;
    let new = NewOrder::parse(req, app.config.default_mode).map_err(Problem::unprocessable)?;
    let order = if new.mode.uses_outbox() {
        // The order and the message to shipping commit together, or not at
        // all. On Postgres they are one statement, and with an
        // Idempotency-Key the layer runs that statement with the key's
        // record: the request's one round trip to the database.
        let (order, insert) = OrderStore::insertion(&new).map_err(db_error)?;
        let msg =
            shipment_request(&app.config.shipping_url, &order, &trace).map_err(internal_error)?;
        let (_, message) = app.outbox.enqueue_write(msg).map_err(outbox_error)?;
        tx.write(vec![insert, message]).await?;
        let outbox = app.outbox.clone();
        tx.after_commit(move || Box::pin(async move { outbox.notify() }));
        log_created(&tx, &order);
        order
    } else if new.mode.uses_feed() {
        // Pull: the order and its event commit together (one statement on
        // Postgres, with the key's record when there is a key); shipping
        // reads the event from the feed at its own offset.
        let (order, insert) = OrderStore::insertion(&new).map_err(db_error)?;
        let feed = feed_name(pull::RESOURCE, order.delivery_mode);
        let body = order_created(&order, &trace);
        let event = app
            .feed
            .append_write(&feed, pull::ORDER_CREATED, &order.id.to_string(), &body)
            .map_err(internal_error)?;
        tx.write(vec![insert, event]).await?;
        let log = app.feed.clone();
        tx.after_commit(move || Box::pin(async move { log.notify() }));
        log_created(&tx, &order);
        order
    } else {
        // At-most-once: the order alone; the one call to shipping is made
        // after the commit.
        let (order, insert) = OrderStore::insertion(&new).map_err(db_error)?;
        tx.write(vec![insert]).await?;
        log_created(&tx, &order);
        let app = app.clone();
        let order_sent = order.clone();
        let span = tracing::Span::current();
        tx.after_commit(move || {
            Box::pin(tracing::Instrument::instrument(
                deliver_at_most_once(app, order_sent, trace),
                span,
            ))
        });
        order
    };

    let mut headers = HeaderMap::new();
    if let Ok(loc) = HeaderValue::from_str(&format!("/orders/{}", order.id)) {
        headers.insert(header::LOCATION, loc);
    }
    Ok((StatusCode::CREATED, headers, Json(order)))
}

/// Logs the order as created once committed: a request that rolls back
/// (and a batch run again one by one) created nothing.
fn log_created(tx: &Tx, order: &Order) {
    let (id, mode) = (order.id, order.delivery_mode);
    let span = tracing::Span::current();
    tx.after_commit(move || {
        Box::pin(async move {
            span.in_scope(|| tracing::info!(order_id = %id, %mode, "order created"));
        })
    });
}

/// A failed enqueue: a database failure is answered like any other.
fn outbox_error(err: OutboxError) -> Problem {
    match err {
        OutboxError::Db(e) => db_error(e),
        other => internal_error(other),
    }
}

/// At-most-once: one call after the commit, no retry. Whatever happens, the
/// order is already committed; a failure is recorded on it and logged.
async fn deliver_at_most_once(app: Arc<AppState>, order: Order, trace: TraceContext) {
    let id = order.id;
    let outcome = send_once(&app.plain, &app.config.shipping_url, &order, &trace).await;
    let recorded = match &outcome {
        Ok(shipment_id) => {
            tracing::info!(order_id = %id, %shipment_id, "shipping accepted the order");
            // The connection goes back before the attempt is counted: on
            // SQLite both take the one writer.
            let accepted = match app.store.db().writer().acquire().await {
                Ok(mut conn) => {
                    app.store
                        .record_accepted(&mut conn, id, Some(shipment_id), None)
                        .await
                }
                Err(e) => Err(e),
            };
            match accepted {
                Ok(_) => app.store.record_attempt(id, None).await,
                Err(e) => Err(e),
            }
        }
        Err(e) => {
            tracing::warn!(order_id = %id, error = %e, "delivery to shipping failed; at-most-once does not retry");
            app.store.record_attempt(id, Some(&e.to_string())).await
        }
    };
    if let Err(e) = recorded {
        tracing::error!(order_id = %id, error = %e, "could not record the delivery outcome");
    }
}

/// `GET /orders/feed/{mode}?after=&limit=&wait=`: the pull modes' event log
/// (`order-created` events), long-polled; see `service_kit::feeds`.
#[utoipa::path(
    get,
    path = "/orders/feed/{mode}",
    tag = "feeds",
    security((
        "service_timestamp" = [], "service_nonce" = [], "service_signature" = []
    )),
    params(
        ("mode" = FeedMode, Path, description = "The pull mode whose feed to read"),
        service_kit::openapi::FeedParams,
    ),
    responses(
        (status = 200, description = "A page of `order-created` events", body = FeedPage),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 410, response = Gone),
        (status = 413, response = PayloadTooLarge),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn feed(
    State(app): State<Arc<AppState>>,
    ApiPath(mode): ApiPath<String>,
    ApiQuery(q): ApiQuery<FeedQuery>,
) -> Result<Json<Page>, Problem> {
    let mode = parse_feed_mode(&mode)?;
    service_kit::feeds::page(
        &app.feed,
        &feed_name(pull::RESOURCE, mode),
        &q,
        app.config.delivery.server_request_timeout,
        // The orders feed gives way to `POST /orders`, as the relay does.
        Some(&app.give_way),
    )
    .await
}

/// `GET /orders/{id}`.
#[utoipa::path(
    get,
    path = "/orders/{id}",
    tag = "orders",
    params(("id" = uuid::Uuid, Path, description = "The order's id")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn get_one(
    State(app): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Order>, Problem> {
    let id = parse_id(&id)?;
    match app.store.get_with_progress(id).await.map_err(db_error)? {
        Some(order) => Ok(Json(order)),
        None => Err(Problem::not_found(format!("no order {id}"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only orders with this status.
    #[param(value_type = Option<OrderStatus>)]
    status: Option<String>,
    /// Where to go on from: the `next_cursor` of the previous page.
    #[param(max_length = 128)]
    cursor: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// A page of orders, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct OrderPage {
    orders: Vec<Order>,
    /// The `cursor` of the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// `GET /orders?status=&limit=&cursor=`: oldest first, keyset-paginated.
#[utoipa::path(
    get,
    path = "/orders",
    tag = "orders",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, response = BadRequest),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<OrderPage>, Problem> {
    let status = q
        .status
        .as_deref()
        .map(str::parse::<OrderStatus>)
        .transpose()
        .map_err(Problem::bad_request)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let after = match q.cursor.as_deref() {
        Some(c) => Some(cursor::decode(c).ok_or_else(|| Problem::bad_request("invalid cursor"))?),
        None => None,
    };
    let page = app
        .store
        .list(status, after, limit)
        .await
        .map_err(db_error)?;
    Ok(Json(OrderPage {
        orders: page.orders,
        next_cursor: page.next.map(|(ts, id)| cursor::encode(ts, &id)),
    }))
}

/// `POST /orders/{id}/shipment-events`: shipping reports on a shipment.
/// Only signed requests reach it (see the router). A repeated report is a
/// no-op (200); a backwards move is a 409; a report about a shipment other
/// than the order's own is a 422 and changes nothing (see
/// [`crate::store::OrderStore::apply_event`]).
#[utoipa::path(
    post,
    path = "/orders/{id}/shipment-events",
    tag = "callbacks",
    security((
        "service_timestamp" = [], "service_nonce" = [], "service_signature" = []
    )),
    params(
        ("id" = uuid::Uuid, Path, description = "The order's id"),
        service_kit::openapi::IdempotencyHeaders,
    ),
    request_body(content = ShipmentEvent, content_type = "application/json"),
    responses(
        (status = 200, description = "The order after the report (a repeated report changes nothing)", body = Order),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn shipment_event(
    State(app): State<Arc<AppState>>,
    tx: Tx,
    batch: Option<Extension<BatchScope>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(event): ApiJson<ShipmentEvent>,
) -> Result<Json<Order>, Problem> {
    let id = parse_id(&id)?;
    // Shipping's ids are UUIDs; anything else did not come from shipping.
    if uuid::Uuid::parse_str(&event.shipment_id).is_err() {
        return Err(Problem::unprocessable("shipment_id must be a UUID"));
    }
    if event.status == OrderStatus::Pending {
        return Err(Problem::unprocessable("status must be accepted or shipped"));
    }
    // In a batch, judged on the orders its first report read for all of
    // them, the change held for the batch's one statement.
    let planned = match &batch {
        Some(Extension(batch)) => {
            let mut conn = tx.lock().await?;
            app.store.plan_event(&mut conn, batch, id, &event).await
        }
        None => Ok(Planned::Usual),
    };
    let applied = match planned {
        Ok(Planned::Ready(order, transition, write)) => {
            if let Some(write) = write {
                tx.write(vec![write]).await?;
            }
            Ok((*order, transition))
        }
        Ok(Planned::Again) => {
            return Err(Problem::unavailable(
                "the order changes twice in this batch; its requests run one by one",
            ))
        }
        Ok(Planned::Usual) => {
            let mut conn = tx.lock().await?;
            app.store.apply_event(&mut conn, id, &event).await
        }
        Err(e) => Err(e),
    };
    match applied {
        Ok((order, transition)) => {
            // Logged once committed (see `create`).
            let (status, span) = (order.status, tracing::Span::current());
            tx.after_commit(move || {
                Box::pin(async move {
                    span.in_scope(|| {
                        tracing::info!(order_id = %id, %status, ?transition, "shipment event applied");
                    });
                })
            });
            Ok(Json(order))
        }
        Err(ApplyError::NotFound) => Err(Problem::not_found(format!("no order {id}"))),
        Err(ApplyError::Illegal(e)) => Err(Problem::conflict(
            "illegal status transition",
            e.to_string(),
        )
        .kind("illegal-transition")),
        // 422, not 409: the report will never become acceptable, so the
        // sender's outbox dead-letters it instead of retrying (it retries 409).
        Err(e @ ApplyError::OtherShipment { .. }) => {
            tracing::warn!(order_id = %id, error = %e, "report about another shipment refused");
            Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not this order's shipment",
            )
            .kind("other-shipment")
            .detail(e.to_string()))
        }
        Err(ApplyError::Db(e)) => Err(db_error(e)),
    }
}
