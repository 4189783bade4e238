//! Pull delivery, order-service's half: the `orders.<mode>` feeds it keeps
//! (an `order-created` event appended with each pull-mode order), and the
//! handler of shipping-service's `shipments.<mode>` feeds (`shipment-created`
//! moves the order to `accepted`, `shipment-shipped` to `shipped`).

use async_trait::async_trait;
use resilience::feed::{ApplyError as FeedApplyError, FeedEvent, FeedHandler};
use serde::Deserialize;
use sqlx::{Any, Transaction};

use crate::domain::{OrderId, OrderStatus, ShipmentEvent};
use crate::store::{ApplyError, OrderStore};

/// The producer's resource name: feeds `orders.pull-at-least-once` and
/// `orders.pull-effectively-once`, at `GET /orders/feed/{mode}`.
pub const RESOURCE: &str = "orders";
/// The event type of a new pull-mode order.
pub const ORDER_CREATED: &str = "order-created";
/// shipping-service's resource name (its feeds).
pub const SHIPMENTS: &str = "shipments";

/// The data of shipping's `shipment-created` and `shipment-shipped` events.
#[derive(Debug, Deserialize)]
struct ShipmentData {
    order_id: String,
    shipment_id: String,
}

/// Applies shipping's feed events to the orders table, inside the
/// consumer's transaction (which, in pull-effectively-once, also moves the
/// offset).
#[derive(Debug, Clone)]
pub struct ShipmentFeedHandler {
    store: OrderStore,
}

impl ShipmentFeedHandler {
    /// A handler over the orders table.
    pub fn new(store: OrderStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl FeedHandler for ShipmentFeedHandler {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        event: &FeedEvent,
    ) -> Result<(), FeedApplyError> {
        let status = match event.event_type.as_str() {
            "shipment-created" => OrderStatus::Accepted,
            "shipment-shipped" => OrderStatus::Shipped,
            other => {
                return Err(FeedApplyError::Refused(format!(
                    "unknown event type {other:?}"
                )))
            }
        };
        let data: ShipmentData = serde_json::from_value(event.data.clone())
            .map_err(|e| FeedApplyError::Refused(format!("unreadable event data: {e}")))?;
        let id: OrderId = data
            .order_id
            .parse()
            .map_err(|e| FeedApplyError::Refused(format!("bad order_id: {e}")))?;
        let report = ShipmentEvent {
            shipment_id: data.shipment_id,
            status,
        };
        match self.store.apply_event(tx, id, &report).await {
            Ok((order, transition)) => {
                let (status, position) = (order.status, event.position);
                resilience::feed::after_commit(move || {
                    tracing::info!(order_id = %id, %status, ?transition, position, "shipment feed event applied");
                });
                Ok(())
            }
            // A log is read in order; an event that would move the order
            // backwards is an older one read again (at-least-once): stale.
            Err(ApplyError::Illegal(e)) => {
                tracing::debug!(order_id = %id, error = %e, "stale shipment feed event ignored");
                Ok(())
            }
            // A second shipment of the same order (pull-at-least-once read
            // an event again): the order is bound to its first shipment.
            // Refused, so it is kept as a dead event, as the push modes
            // dead-letter the same report.
            Err(e @ ApplyError::OtherShipment { .. }) => {
                Err(FeedApplyError::Refused(e.to_string()))
            }
            Err(ApplyError::NotFound) => Err(FeedApplyError::Refused(format!("no order {id}"))),
            Err(ApplyError::Db(e)) => Err(FeedApplyError::Db(e)),
        }
    }
}
