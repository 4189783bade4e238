//! The warehouse: ships packing shipments once their delay has passed, and
//! reports each one to order-service in the order's delivery mode.
//!
//! Shipping is a compare-and-set (`packing → shipped`), so two warehouses on
//! one database never ship a shipment twice. In the durable modes the shipped
//! report is enqueued in the outbox in that same transaction; in at-most-once
//! mode it follows the commit as one plain call: if this process dies in
//! between, or the call fails, the report is lost, by design. In the pull
//! modes a `shipment-shipped` event is appended to the mode's feed in that
//! same transaction instead.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use resilience::store::now_ms;
use tokio::sync::Notify;
use uuid::Uuid;

use resilience::feed::FeedLog;
use resilience::outbox::Outbox;
use service_kit::stack::SendService;
use service_kit::DeliveryMode;

use crate::domain::Shipment;
use crate::orders::{report_once, shipped_report};
use crate::store::ShipmentStore;

/// Longest sleep between two looks at the table (a safety net; new
/// shipments wake the warehouse at once).
const MAX_IDLE: Duration = Duration::from_millis(250);
/// Shipments shipped per round.
const BATCH: i64 = 100;
/// Reports in flight at once.
const REPORT_CONCURRENCY: usize = 16;

/// The warehouse task and what it needs.
#[derive(Debug, Clone)]
pub struct Warehouse {
    store: ShipmentStore,
    outbox: Outbox,
    feed: FeedLog,
    plain: SendService,
    order_url: Arc<str>,
    wake: Arc<Notify>,
}

impl Warehouse {
    /// A warehouse over a store, reporting to the order-service at
    /// `order_url` through the outbox or the plain stack.
    pub fn new(
        store: ShipmentStore,
        outbox: Outbox,
        feed: FeedLog,
        plain: SendService,
        order_url: &str,
    ) -> Self {
        Self {
            store,
            outbox,
            feed,
            plain,
            order_url: Arc::from(order_url),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Wakes the warehouse (a shipment was just created).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs until `stop` resolves; the round in progress is finished first.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.ship_due().await {
                tracing::warn!(error = %e, "warehouse round failed; will retry");
            }
            let idle = match self.store.next_due_at().await {
                Ok(Some(at)) => Duration::from_millis((at - now_ms()).max(1) as u64).min(MAX_IDLE),
                _ => MAX_IDLE,
            };
            tokio::select! {
                () = &mut stop => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(idle) => {}
            }
        }
        tracing::info!("warehouse stopped");
    }

    /// Ships everything due now and reports it. Returns how many shipped.
    pub async fn ship_due(&self) -> Result<usize, anyhow::Error> {
        let due = self.store.due(BATCH).await?;
        let mut shipped = Vec::with_capacity(due.len());
        for id in due {
            if let Some(s) = self.ship_one(id).await? {
                shipped.push(s);
            }
        }
        let count = shipped.len();
        if shipped.iter().any(|s| s.delivery_mode.uses_outbox()) {
            self.outbox.notify();
        }
        if shipped.iter().any(|s| s.delivery_mode.uses_feed()) {
            self.feed.notify();
        }
        // What is left is at-most-once: one plain call each.
        shipped.retain(|s| s.delivery_mode == DeliveryMode::AtMostOnce);
        futures::stream::iter(shipped)
            .for_each_concurrent(REPORT_CONCURRENCY, |s| self.report(s))
            .await;
        Ok(count)
    }

    async fn ship_one(&self, id: Uuid) -> Result<Option<Shipment>, anyhow::Error> {
        let mut tx = self.store.db().begin().await?;
        let shipment = self.store.mark_shipped(&mut tx, id).await?;
        if let Some(s) = shipment.as_ref().filter(|s| s.delivery_mode.uses_outbox()) {
            // Shipped and "tell order-service" commit together.
            let report = shipped_report(&self.order_url, s)?;
            self.outbox.enqueue(&mut tx, report).await?;
        } else if let Some(s) = shipment.as_ref().filter(|s| s.delivery_mode.uses_feed()) {
            // Pull: shipped and its event commit together; order-service
            // reads it from the feed.
            crate::pull::append(&self.feed, &mut tx, s, crate::pull::SHIPMENT_SHIPPED).await?;
        }
        tx.commit().await?;
        if let Some(s) = &shipment {
            tracing::info!(shipment_id = %s.id, order_id = %s.order_id, "shipment shipped");
        }
        Ok(shipment)
    }

    /// At-most-once: one call, no retry; the outcome is recorded.
    async fn report(&self, shipment: Shipment) {
        let outcome = report_once(&self.plain, &self.order_url, &shipment).await;
        let error = match &outcome {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(shipment_id = %shipment.id, error = %e, "shipped report failed; at-most-once does not retry");
                Some(e.to_string())
            }
        };
        if let Err(e) = self
            .store
            .record_report(self.store.db().pool(), shipment.id, error.as_deref())
            .await
        {
            tracing::error!(shipment_id = %shipment.id, error = %e, "could not record the report outcome");
        }
    }
}
