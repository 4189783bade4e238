//! Pull delivery, order-service's half: the `orders.<mode>` feeds it keeps
//! (an `order-created` event appended with each pull-mode order), and the
//! handler of shipping-service's `shipments.<mode>` feeds (`shipment-created`
//! moves the order to `accepted`, `shipment-shipped` to `shipped`).

use async_trait::async_trait;
use resilience::feed::{ApplyError as FeedApplyError, FeedEvent, FeedHandler};
use serde::Deserialize;
use sqlx::{Any, Transaction};

use crate::domain::{OrderId, OrderStatus, ShipmentEvent, Transition};
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

/// Reads one of shipping's events: the order it is about, and the report it
/// makes. Anything unreadable is refused (kept as a dead event).
fn report_of(event: &FeedEvent) -> Result<(OrderId, ShipmentEvent), FeedApplyError> {
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
    Ok((
        id,
        ShipmentEvent {
            shipment_id: data.shipment_id,
            status,
        },
    ))
}

/// Logs an applied event once its transaction has committed, in the
/// event's own span (its trace).
fn applied(id: OrderId, status: OrderStatus, transition: Transition, event: &FeedEvent) {
    let position = event.position;
    resilience::feed::after_commit_of(event, move || {
        tracing::info!(order_id = %id, %status, ?transition, position, "shipment feed event applied");
    });
}

impl ShipmentFeedHandler {
    /// One report through the status machine, with the order as it is now.
    async fn apply_report(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: OrderId,
        report: &ShipmentEvent,
        event: &FeedEvent,
    ) -> Result<(), FeedApplyError> {
        match self.store.apply_event(tx, id, report).await {
            Ok((order, transition)) => {
                applied(id, order.status, transition, event);
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

#[async_trait]
impl FeedHandler for ShipmentFeedHandler {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        event: &FeedEvent,
    ) -> Result<(), FeedApplyError> {
        let (id, report) = report_of(event)?;
        self.apply_report(tx, id, &report, event).await
    }

    fn applies_pages(&self) -> bool {
        true
    }

    /// A page in rounds: each round takes, in position order, the next
    /// event of every order the page names, so no order appears twice in a
    /// round and each order's events keep their order. A round's usual
    /// reports (each moving its order forward) are written in one
    /// statement; the rest go through [`Self::apply_report`] one by one,
    /// as `apply` would take them. Orders of one round are distinct, so
    /// the order of writes within a round changes nothing.
    async fn apply_page(
        &self,
        tx: &mut Transaction<'static, Any>,
        events: &[FeedEvent],
    ) -> Result<(), FeedApplyError> {
        let mut reports = Vec::with_capacity(events.len());
        for event in events {
            let (id, report) = report_of(event)?;
            reports.push((id, report, event));
        }
        let mut rounds: Vec<Vec<usize>> = Vec::new();
        let mut seen: std::collections::HashMap<OrderId, usize> = std::collections::HashMap::new();
        for (i, (id, _, _)) in reports.iter().enumerate() {
            let round = seen.entry(*id).or_insert(0);
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push(i);
            *round += 1;
        }
        for round in rounds {
            // In id order, the order the push path locks orders in.
            let mut usual: Vec<(OrderId, &ShipmentEvent)> = round
                .iter()
                .map(|&i| (reports[i].0, &reports[i].1))
                .collect();
            usual.sort_by_key(|(id, _)| id.to_string());
            let moved: std::collections::HashSet<String> = self
                .store
                .apply_events_usual(tx, &usual)
                .await?
                .into_iter()
                .collect();
            for &i in &round {
                let (id, report, event) = &reports[i];
                if moved.contains(&id.to_string()) {
                    applied(*id, report.status, Transition::Changed, event);
                } else {
                    self.apply_report(tx, *id, report, event).await?;
                }
            }
        }
        Ok(())
    }
}
