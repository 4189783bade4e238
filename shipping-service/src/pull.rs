//! Pull delivery, shipping-service's half: the handler of order-service's
//! `orders.<mode>` feeds (an `order-created` event becomes a packing
//! shipment), and the `shipments.<mode>` feeds it keeps (`shipment-created`
//! when it takes an order on, `shipment-shipped` when the warehouse ships).

use std::time::Duration;

use async_trait::async_trait;
use resilience::feed::{ApplyError, FeedEvent, FeedHandler, FeedLog};
use serde::Serialize;
use service_kit::feeds::feed_name;
use service_kit::trace::{TraceContext, TRACEPARENT, TRACESTATE};
use service_kit::DeliveryMode;
use sqlx::{Any, Transaction};
use uuid::Uuid;

use crate::domain::{CreateShipmentRequest, NewShipment, Shipment};
use crate::store::ShipmentStore;

/// The producer's resource name: feeds `shipments.pull-at-least-once` and
/// `shipments.pull-effectively-once`, at `GET /shipments/feed/{mode}`.
pub const RESOURCE: &str = "shipments";
/// order-service's resource name (its feeds).
pub const ORDERS: &str = "orders";
/// The event type of a shipment taken on.
pub const SHIPMENT_CREATED: &str = "shipment-created";
/// The event type of a shipment shipped.
pub const SHIPMENT_SHIPPED: &str = "shipment-shipped";

/// The data of this service's feed events.
#[derive(Debug, Serialize)]
pub struct ShipmentData {
    /// The order the shipment is for.
    pub order_id: String,
    /// The shipment.
    pub shipment_id: String,
    /// The shipment's trace context (the order's trace), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Its `tracestate`, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// Appends `event_type` for `shipment` to its mode's feed, inside `tx`.
pub async fn append(
    feed: &FeedLog,
    tx: &mut Transaction<'static, Any>,
    shipment: &Shipment,
    event_type: &str,
) -> Result<(), resilience::feed::FeedError> {
    let w = append_write(feed, shipment, event_type)?;
    (w.bind)(sqlx::query(&w.sql)).execute(&mut **tx).await?;
    Ok(())
}

/// The insert of [`append`], not yet run.
fn append_write(
    feed: &FeedLog,
    shipment: &Shipment,
    event_type: &str,
) -> Result<resilience::outbox::Write, resilience::feed::FeedError> {
    let data = ShipmentData {
        order_id: shipment.order_id.to_string(),
        shipment_id: shipment.id.to_string(),
        traceparent: shipment.trace.as_ref().map(TraceContext::traceparent),
        tracestate: shipment
            .trace
            .as_ref()
            .and_then(|t| t.tracestate().map(str::to_owned)),
    };
    feed.append_write(
        &feed_name(RESOURCE, shipment.delivery_mode),
        event_type,
        &Uuid::now_v7().to_string(),
        &data,
    )
}

/// Applies order-service's `order-created` events: a packing shipment, and
/// its `shipment-created` event, in the consumer's transaction (which, in
/// pull-effectively-once, also moves the offset).
///
/// NOTE: it does not look for an earlier shipment of the same order. In
/// pull-at-least-once an event read again after a crash makes a second
/// shipment, which is what that mode shows; pull-effectively-once never
/// reads an event again, because its offset commits with the shipment.
#[derive(Debug, Clone)]
pub struct OrderFeedHandler {
    store: ShipmentStore,
    feed: FeedLog,
    delay: Duration,
    mode: DeliveryMode,
}

impl OrderFeedHandler {
    /// A handler of `mode`'s feed, creating shipments due after `delay`.
    pub fn new(store: ShipmentStore, feed: FeedLog, delay: Duration, mode: DeliveryMode) -> Self {
        Self {
            store,
            feed,
            delay,
            mode,
        }
    }
}

impl OrderFeedHandler {
    /// The shipment an `order-created` event asks for; anything else, or
    /// anything unreadable, is refused (kept as a dead event).
    fn new_shipment(&self, event: &FeedEvent) -> Result<NewShipment, ApplyError> {
        if event.event_type != "order-created" {
            return Err(ApplyError::Refused(format!(
                "unknown event type {:?}",
                event.event_type
            )));
        }
        // The trace context travels next to the shipment request's fields.
        let mut data = event.data.clone();
        let (traceparent, tracestate) = match data.as_object_mut() {
            Some(fields) => (fields.remove(TRACEPARENT), fields.remove(TRACESTATE)),
            None => (None, None),
        };
        let req: CreateShipmentRequest = serde_json::from_value(data)
            .map_err(|e| ApplyError::Refused(format!("unreadable event data: {e}")))?;
        let mut new = NewShipment::parse(req).map_err(ApplyError::Refused)?;
        // The shipment continues the order's trace, or starts one.
        let trace = traceparent
            .as_ref()
            .and_then(|v| v.as_str())
            .and_then(|tp| TraceContext::parse(tp, tracestate.as_ref().and_then(|v| v.as_str())))
            .map(|caller| caller.child())
            .unwrap_or_else(TraceContext::new_root);
        new.trace = Some(trace);
        // The feed decides the mode the report travels back in.
        new.mode = self.mode;
        Ok(new)
    }
}

/// Logs a shipment taken on once its transaction has committed, in the
/// event's own span (its trace).
fn created(shipment: &Shipment, event: &FeedEvent) {
    let (id, order_id, position) = (shipment.id, shipment.order_id, event.position);
    resilience::feed::after_commit_of(event, move || {
        tracing::info!(shipment_id = %id, %order_id, position, "shipment created from the orders feed");
    });
}

#[async_trait]
impl FeedHandler for OrderFeedHandler {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        event: &FeedEvent,
    ) -> Result<(), ApplyError> {
        let new = self.new_shipment(event)?;
        let shipment = self.store.insert(tx, &new, self.delay).await?;
        append(&self.feed, tx, &shipment, SHIPMENT_CREATED)
            .await
            .map_err(|e| ApplyError::Retry(e.to_string()))?;
        created(&shipment, event);
        Ok(())
    }

    fn applies_pages(&self) -> bool {
        true
    }

    /// Every shipment of the page in one multi-row insert, and every
    /// `shipment-created` event in another, in the page's order: two
    /// statements a page instead of two an event.
    async fn apply_page(
        &self,
        tx: &mut Transaction<'static, Any>,
        events: &[FeedEvent],
    ) -> Result<(), ApplyError> {
        let mut shipments = Vec::with_capacity(events.len());
        let mut inserts = Vec::with_capacity(events.len());
        let mut appends = Vec::with_capacity(events.len());
        for event in events {
            let new = self.new_shipment(event)?;
            let (shipment, insert) = ShipmentStore::insertion(&new, self.delay)?;
            appends.push(
                append_write(&self.feed, &shipment, SHIPMENT_CREATED)
                    .map_err(|e| ApplyError::Retry(e.to_string()))?,
            );
            inserts.push(insert);
            shipments.push((shipment, event));
        }
        for rows in [inserts, appends] {
            // One multi-row insert; writes that cannot be joined run one by
            // one, never silently not at all.
            let one_by_one = match resilience::outbox::Write::rows(rows) {
                Ok(w) => vec![w],
                Err(writes) => writes,
            };
            for w in one_by_one {
                (w.bind)(sqlx::query(&w.sql)).execute(&mut **tx).await?;
            }
        }
        for (shipment, event) in &shipments {
            created(shipment, event);
        }
        Ok(())
    }
}
