//! The warehouse: ships packing shipments once their delay has passed, and
//! reports each one to order-service in the order's delivery mode.
//!
//! A round ships a batch in one transaction: one statement claims and ships up
//! to [`BATCH`] due shipments (`FOR UPDATE SKIP LOCKED` on Postgres, so
//! warehouses on one database ship disjoint batches and never wait for each
//! other, not even for one frozen mid-transaction), and the shipped reports of
//! the durable modes are enqueued in the outbox in that same transaction. In
//! at-most-once mode the report follows the commit as one plain call: if this
//! process dies in between, or the call fails, the report is lost, by design.
//! In the pull modes a `shipment-shipped` event is appended to the mode's
//! feed in that same transaction instead.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use resilience::store::now_ms;
use tokio::sync::Notify;

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
/// Pause before looking again when due work is held by another warehouse.
const BUSY_IDLE: Duration = Duration::from_millis(50);
/// Shipments shipped per round (one transaction).
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
    /// After a round that shipped a partial batch, the next round waits this
    /// long after it, so a steady stream ships (and reports) in fewer, larger
    /// batches; a shipment after a quiet spell ships when due.
    linger: Duration,
    /// Test hook: how long to sit inside each shipping transaction before
    /// committing (`SHIPPING_TEST_HOLD_TX`, e.g. `500ms`), so that a test
    /// can freeze the process while it holds row locks. Unset in production.
    hold: Option<Duration>,
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
            linger: Duration::ZERO,
            hold: std::env::var("SHIPPING_TEST_HOLD_TX")
                .ok()
                .and_then(|v| humantime::parse_duration(&v).ok()),
        }
    }

    /// Sets the wait after a partial round (see the field).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Wakes the warehouse (a shipment was just created).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs until `stop` resolves; the round in progress is finished first.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let shipped = match self.ship_due().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "warehouse round failed; will retry");
                    0
                }
            };
            if shipped as i64 >= BATCH {
                continue; // a full batch: more is likely due
            }
            if shipped > 0 && !self.linger.is_zero() {
                // A steady stream: the next round takes what came due
                // meanwhile, together.
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(self.linger) => {}
                }
                continue;
            }
            let idle = match self.store.next_due_at().await {
                // Due already yet nothing shipped: another warehouse holds
                // those rows. Look again soon, without spinning.
                Ok(Some(at)) if at <= now_ms() && shipped == 0 => BUSY_IDLE,
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

    /// Ships one batch of what is due now (one transaction) and reports it.
    /// Returns how many shipped.
    pub async fn ship_due(&self) -> Result<usize, anyhow::Error> {
        let mut tx = self.store.db().begin().await?;
        let mut shipped = self.store.ship_due(&mut tx, BATCH).await?;
        if shipped.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        if let Some(hold) = self.hold {
            tokio::time::sleep(hold).await;
        }
        // Shipped and "tell order-service" commit together.
        let reports = shipped
            .iter()
            .filter(|s| s.delivery_mode.uses_outbox())
            .map(|s| shipped_report(&self.order_url, s))
            .collect::<Result<Vec<_>, _>>()?;
        let durable = !reports.is_empty();
        self.outbox.enqueue_many(&mut tx, reports).await?;
        // Pull: shipped and its event commit together; order-service reads
        // it from the feed.
        for s in shipped.iter().filter(|s| s.delivery_mode.uses_feed()) {
            crate::pull::append(&self.feed, &mut tx, s, crate::pull::SHIPMENT_SHIPPED).await?;
        }
        tx.commit().await?;
        for s in &shipped {
            let _in_trace = trace_span(s).entered();
            tracing::info!(shipment_id = %s.id, order_id = %s.order_id, "shipment shipped");
        }
        let count = shipped.len();
        if durable {
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

    /// At-most-once: one call, no retry; the outcome is recorded.
    async fn report(&self, shipment: Shipment) {
        let span = trace_span(&shipment);
        tracing::Instrument::instrument(self.report_traced(shipment), span).await
    }

    async fn report_traced(&self, shipment: Shipment) {
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
            .record_report(self.store.db().writer(), shipment.id, error.as_deref())
            .await
        {
            tracing::error!(shipment_id = %shipment.id, error = %e, "could not record the report outcome");
        }
    }
}

/// The span of work on one shipment, in its trace (`trace_id`), so the log
/// lines about it carry the order's trace id.
fn trace_span(shipment: &Shipment) -> tracing::Span {
    let span = tracing::info_span!("shipment", trace_id = tracing::field::Empty);
    if let Some(t) = &shipment.trace {
        // Exported (with OTLP on) as a child of the shipment's creation.
        let _ = service_kit::trace::in_trace(&span, Some(t));
        span.record("trace_id", t.trace_id());
    }
    span
}
