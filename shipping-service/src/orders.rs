//! Everything shipping-service sends to order-service: the shipped report,
//! sent once (at-most-once) or through the outbox (the other modes), and the
//! reaction to order-service's acknowledgement.

use async_trait::async_trait;
use bytes::Bytes;
use resilience::outbox::{DeliveryHandler, OutboxError, OutgoingRequest, SentMessage};
use serde::Serialize;
use service_kit::memory_dedupe::MEMORY_DEDUPE_HEADER;
use service_kit::stack::SendService;
use sqlx::{Any, Transaction};
use tower::ServiceExt;
use uuid::Uuid;

use crate::domain::Shipment;
use crate::store::ShipmentStore;

/// The outbox message kind of a shipped report.
pub const KIND_SHIPPED_REPORT: &str = "shipped-report";
/// Who shipping-service is, to the services it calls (their idempotency scope).
pub const CLIENT_ID: &str = "shipping-service";

/// The body of `POST /orders/{id}/shipment-events`: order-service's contract.
#[derive(Debug, Clone, Serialize)]
pub struct ShipmentEvent {
    /// The shipment reported on.
    pub shipment_id: String,
    /// Always `shipped` from the warehouse.
    pub status: &'static str,
}

/// The shipped report of a shipment, as an outgoing HTTP request, in the
/// order's delivery mode.
pub fn shipped_report(
    order_url: &str,
    shipment: &Shipment,
) -> Result<OutgoingRequest, OutboxError> {
    let body = ShipmentEvent {
        shipment_id: shipment.id.to_string(),
        status: "shipped",
    };
    let path = format!("/orders/{}/shipment-events", shipment.order_id);
    let mut req = OutgoingRequest::post_json(order_url, path, &body, KIND_SHIPPED_REPORT)?
        .correlate(shipment.id.to_string())
        .header("x-client-id", CLIENT_ID)
        .with_idempotency_key(shipment.delivery_mode.uses_idempotency_key());
    // The report joins the shipment's trace (the order's), on every attempt,
    // as a child of the span that created the shipment.
    if let Some(trace) = &shipment.trace {
        for (name, value) in trace.headers() {
            req = req.header(name, value);
        }
    }
    if shipment.delivery_mode.dedupes_in_memory() {
        req = req.header(MEMORY_DEDUPE_HEADER, "memory");
    }
    Ok(req)
}

/// Why the at-most-once report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The request could not be built.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No answer: refused, reset, timed out, dropped.
    #[error("order-service unreachable: {0}")]
    Transport(String),
    /// An answer, but not a 2xx.
    #[error("order-service answered {status}: {body}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
}

/// At-most-once: one call through the plain stack, no retry, no key.
pub async fn report_once(
    plain: &SendService,
    order_url: &str,
    shipment: &Shipment,
) -> Result<(), ReportError> {
    let req = shipped_report(order_url, shipment)
        .and_then(|r| r.to_http())
        .map_err(|e| ReportError::Invalid(e.to_string()))?;
    let res = plain
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| ReportError::Transport(service_kit::error_chain(e.as_ref())))?;
    if res.status().is_success() {
        return Ok(());
    }
    Err(ReportError::Status {
        status: res.status().as_u16(),
        body: String::from_utf8_lossy(&res.body()[..res.body().len().min(200)]).into_owned(),
    })
}

/// The relay's outcomes for shipped reports: recorded on the shipment in the
/// same transaction that marks the message delivered or dead.
#[derive(Debug, Clone)]
pub struct ReportAcks {
    store: ShipmentStore,
}

impl ReportAcks {
    /// Reactions over the shipments table.
    pub fn new(store: ShipmentStore) -> Self {
        Self { store }
    }
}

fn shipment_of(msg: &SentMessage) -> Option<Uuid> {
    msg.correlation_id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
}

#[async_trait]
impl DeliveryHandler for ReportAcks {
    async fn delivered(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: &SentMessage,
        _response: &http::Response<Bytes>,
    ) -> Result<(), sqlx::Error> {
        if let Some(id) = shipment_of(msg) {
            self.store
                .mark_reported(&mut **tx, id, None, msg.attempts + 1)
                .await?;
        }
        Ok(())
    }

    async fn delivered_all(
        &self,
        tx: &mut Transaction<'static, Any>,
        delivered: &[(&SentMessage, &http::Response<Bytes>)],
    ) -> Result<(), sqlx::Error> {
        let reported: Vec<(Uuid, i64)> = delivered
            .iter()
            .filter_map(|(msg, _)| Some((shipment_of(msg)?, msg.attempts + 1)))
            .collect();
        self.store.mark_reported_all(&mut **tx, &reported).await
    }

    async fn dead(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: &SentMessage,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        if let Some(id) = shipment_of(msg) {
            let reason = format!("dead-lettered: {reason}");
            self.store
                .mark_reported(&mut **tx, id, Some(&reason), msg.attempts + 1)
                .await?;
        }
        Ok(())
    }
}
