//! Everything order-service sends to shipping-service: the shipment request,
//! sent once (at-most-once) or through the outbox (the other modes), and the
//! reaction to shipping's acknowledgement.

use async_trait::async_trait;
use bytes::Bytes;
use resilience::outbox::{DeliveryHandler, OutboxError, OutgoingRequest, SentMessage};
use serde::{Deserialize, Serialize};
use service_kit::memory_dedupe::MEMORY_DEDUPE_HEADER;
use service_kit::stack::SendService;
use service_kit::trace::TraceContext;
use service_kit::DeliveryMode;
use sqlx::{Any, Transaction};
use tower::ServiceExt;

use crate::domain::{Item, Order, OrderId};
use crate::store::OrderStore;

pub use crate::store::KIND_CREATE_SHIPMENT;
/// Who order-service is, to the services it calls (their idempotency scope).
pub const CLIENT_ID: &str = "order-service";

/// The body of `POST /shipments`: shipping-service's contract.
#[derive(Debug, Clone, Serialize)]
pub struct ShipmentRequest<'a> {
    /// The order to ship.
    pub order_id: OrderId,
    /// Its items.
    pub items: &'a [Item],
    /// The mode shipping must use to report back.
    pub delivery_mode: DeliveryMode,
}

/// The part of shipping's answer order-service reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ShipmentCreated {
    /// The new shipment's id.
    pub id: String,
}

/// What shipping needs to know of an order: the body of `POST /shipments`,
/// and the data of an `order-created` feed event.
pub fn shipment_body(order: &Order) -> ShipmentRequest<'_> {
    ShipmentRequest {
        order_id: order.id,
        items: &order.items,
        delivery_mode: order.delivery_mode,
    }
}

/// The data of an `order-created` feed event: the shipment request, and the
/// trace context of the order's creation (`traceparent`, `tracestate`).
#[derive(Debug, Clone, Serialize)]
pub struct OrderCreated<'a> {
    /// What shipping needs to know of the order.
    #[serde(flatten)]
    pub shipment: ShipmentRequest<'a>,
    /// The trace context: trace of the order, parent the span that created it.
    pub traceparent: String,
    /// The caller's `tracestate`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// The `order-created` event data of an order created in `trace`.
pub fn order_created<'a>(order: &'a Order, trace: &TraceContext) -> OrderCreated<'a> {
    OrderCreated {
        shipment: shipment_body(order),
        traceparent: trace.traceparent(),
        tracestate: trace.tracestate().map(str::to_owned),
    }
}

/// The shipment request for an order, as an outgoing HTTP request. In
/// effectively-once (and memory-dedupe) mode every attempt carries the
/// message's idempotency key. Every attempt also carries the `traceparent`
/// (and `tracestate`) of the order's creation (`trace`), stored with the
/// message, so a retry after a crash continues the same trace.
pub fn shipment_request(
    shipping_url: &str,
    order: &Order,
    trace: &TraceContext,
) -> Result<OutgoingRequest, OutboxError> {
    let body = shipment_body(order);
    let mut req =
        OutgoingRequest::post_json(shipping_url, "/shipments", &body, KIND_CREATE_SHIPMENT)?
            .correlate(order.id.to_string())
            .header("x-client-id", CLIENT_ID)
            .with_idempotency_key(order.delivery_mode.uses_idempotency_key());
    for (name, value) in trace.headers() {
        req = req.header(name, value);
    }
    if order.delivery_mode.dedupes_in_memory() {
        req = req.header(MEMORY_DEDUPE_HEADER, "memory");
    }
    Ok(req)
}

/// Why the at-most-once call failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request could not be built.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No answer: refused, reset, timed out, dropped.
    #[error("shipping-service unreachable: {0}")]
    Transport(String),
    /// An answer, but not a 2xx.
    #[error("shipping-service answered {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A 2xx whose body was not a shipment.
    #[error("unreadable answer from shipping-service: {0}")]
    Decode(String),
}

/// At-most-once: one call through the plain stack, no retry, no key.
/// Returns the shipment id.
pub async fn send_once(
    plain: &SendService,
    shipping_url: &str,
    order: &Order,
    trace: &TraceContext,
) -> Result<String, SendError> {
    let req = shipment_request(shipping_url, order, trace)
        .and_then(|r| r.to_http())
        .map_err(|e| SendError::Invalid(e.to_string()))?;
    let res = plain
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| SendError::Transport(service_kit::error_chain(e.as_ref())))?;
    if !res.status().is_success() {
        let body = String::from_utf8_lossy(&res.body()[..res.body().len().min(200)]).into_owned();
        return Err(SendError::Status {
            status: res.status().as_u16(),
            body,
        });
    }
    shipment_id(res.body()).map_err(SendError::Decode)
}

fn shipment_id(body: &Bytes) -> Result<String, String> {
    serde_json::from_slice::<ShipmentCreated>(body)
        .map(|c| c.id)
        .map_err(|e| e.to_string())
}

/// The relay's outcomes for shipment requests: a 2xx makes the order
/// `accepted` in the same transaction that marks the message delivered; a
/// dead letter records its reason on the order.
#[derive(Debug, Clone)]
pub struct ShipmentAcks {
    store: OrderStore,
}

impl ShipmentAcks {
    /// Reactions over the orders table.
    pub fn new(store: OrderStore) -> Self {
        Self { store }
    }
}

fn order_of(msg: &SentMessage) -> Option<OrderId> {
    msg.correlation_id.as_deref().and_then(|id| id.parse().ok())
}

#[async_trait]
impl DeliveryHandler for ShipmentAcks {
    async fn delivered(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: &SentMessage,
        response: &http::Response<Bytes>,
    ) -> Result<(), sqlx::Error> {
        let Some(order_id) = order_of(msg) else {
            tracing::warn!(id = %msg.id, kind = %msg.kind, "delivered message without an order id");
            return Ok(());
        };
        let shipment = shipment_id(response.body()).ok();
        self.store
            .record_accepted(tx, order_id, shipment.as_deref(), Some(msg.attempts + 1))
            .await?;
        Ok(())
    }

    async fn delivered_all(
        &self,
        tx: &mut Transaction<'static, Any>,
        delivered: &[(&SentMessage, &http::Response<Bytes>)],
    ) -> Result<(), sqlx::Error> {
        let accepted: Vec<(OrderId, Option<String>, Option<i64>)> = delivered
            .iter()
            .filter_map(|(msg, response)| {
                let order_id = order_of(msg)?;
                Some((
                    order_id,
                    shipment_id(response.body()).ok(),
                    Some(msg.attempts + 1),
                ))
            })
            .collect();
        self.store.record_accepted_all(tx, &accepted).await
    }

    async fn dead(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: &SentMessage,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        if let Some(order_id) = order_of(msg) {
            self.store
                .record_error(&mut **tx, order_id, &format!("dead-lettered: {reason}"))
                .await?;
        }
        Ok(())
    }
}
