use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::Json;
use resilience::feed::{FeedQuery, Page};
use resilience::idempotency::Tx;
use serde::{Deserialize, Serialize};
use service_kit::feeds::{feed_name, parse_feed_mode};
use service_kit::openapi::{
    BadRequest, Conflict, FeedMode, FeedPage, Gone, NotFound, PayloadTooLarge, Unauthorized,
    Unavailable, Unprocessable, UnsupportedMediaType,
};
use service_kit::trace::CurrentTrace;
use service_kit::{cursor, db_error, ApiJson, ApiPath, ApiQuery, Problem};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use crate::domain::{parse_uuid, CreateShipmentRequest, NewShipment, Shipment};
use crate::store::ShipmentStore;

const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

/// `POST /shipments`: create a packing shipment.
///
/// Wrapped in the idempotency layer: with an `Idempotency-Key` (sent by
/// order-service in effectively-once mode), the shipment and the record of
/// the key commit in one transaction, and a repeat replays this answer
/// instead of creating a second shipment.
#[utoipa::path(
    post,
    path = "/shipments",
    tag = "shipments",
    security((
        "service_timestamp" = [], "service_nonce" = [], "service_signature" = []
    )),
    params(service_kit::openapi::IdempotencyHeaders),
    request_body(content = CreateShipmentRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The shipment, `packing`; a repeat with the same Idempotency-Key replays this answer", body = Shipment,
            headers(("Location" = String, description = "/shipments/{id}"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
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
    ApiJson(req): ApiJson<CreateShipmentRequest>,
) -> Result<(StatusCode, HeaderMap, Json<Shipment>), Problem> {
    let mut new = NewShipment::parse(req).map_err(Problem::unprocessable)?;
    // The shipment continues the caller's trace (the order's).
    new.trace = Some(trace);
    // In a batch the insert waits for the batch, which runs every request's
    // insert with the batch's idempotency records in one statement.
    let (shipment, insert) =
        ShipmentStore::insertion(&new, app.config.warehouse_delay).map_err(db_error)?;
    tx.write(vec![insert]).await?;
    // Logged once committed: a request that rolls back (and a batch run
    // again one by one) created nothing.
    let (id, order_id, span) = (shipment.id, shipment.order_id, tracing::Span::current());
    let warehouse = app.warehouse.clone();
    tx.after_commit(move || {
        Box::pin(async move {
            span.in_scope(|| tracing::info!(shipment_id = %id, %order_id, "shipment created"));
            warehouse.wake();
        })
    });
    let mut headers = HeaderMap::new();
    if let Ok(loc) = HeaderValue::from_str(&format!("/shipments/{}", shipment.id)) {
        headers.insert(header::LOCATION, loc);
    }
    Ok((StatusCode::CREATED, headers, Json(shipment)))
}

/// `GET /shipments/feed/{mode}?after=&limit=&wait=`: the pull modes' event
/// log (`shipment-created`, `shipment-shipped`), long-polled; see
/// `service_kit::feeds`.
#[utoipa::path(
    get,
    path = "/shipments/feed/{mode}",
    tag = "feeds",
    security((
        "service_timestamp" = [], "service_nonce" = [], "service_signature" = []
    )),
    params(
        ("mode" = FeedMode, Path, description = "The pull mode whose feed to read"),
        service_kit::openapi::FeedParams,
    ),
    responses(
        (status = 200, description = "A page of `shipment-created` and `shipment-shipped` events", body = FeedPage),
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
        &feed_name(crate::pull::RESOURCE, mode),
        &q,
        app.config.delivery.server_request_timeout,
        None,
    )
    .await
}

/// `GET /shipments/{id}`.
#[utoipa::path(
    get,
    path = "/shipments/{id}",
    tag = "shipments",
    params(("id" = uuid::Uuid, Path, description = "The shipment's id")),
    responses(
        (status = 200, description = "The shipment", body = Shipment),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn get_one(
    State(app): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Shipment>, Problem> {
    let id = parse_uuid(&id, "shipment id").map_err(Problem::bad_request)?;
    match app.store.get(id).await.map_err(db_error)? {
        Some(s) => Ok(Json(s)),
        None => Err(Problem::not_found(format!("no shipment {id}"))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only the shipments of this order (a UUID).
    #[param(format = Uuid)]
    order_id: Option<String>,
    /// Where to go on from: the `next_cursor` of the previous page.
    #[param(max_length = 128)]
    cursor: Option<String>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// A page of shipments, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ShipmentPage {
    shipments: Vec<Shipment>,
    /// The `cursor` of the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// `GET /shipments?order_id=&limit=&cursor=`: oldest first, keyset-paginated.
#[utoipa::path(
    get,
    path = "/shipments",
    tag = "shipments",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of shipments", body = ShipmentPage),
        (status = 400, response = BadRequest),
        (status = 503, response = Unavailable),
    )
)]
pub(super) async fn list(
    State(app): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<ShipmentPage>, Problem> {
    let order_id = q
        .order_id
        .as_deref()
        .map(|o| parse_uuid(o, "order_id"))
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
        .list(order_id, after, limit)
        .await
        .map_err(db_error)?;
    Ok(Json(ShipmentPage {
        shipments: page.shipments,
        next_cursor: page.next.map(|(ts, id)| cursor::encode(ts, &id)),
    }))
}
