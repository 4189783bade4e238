//! Back-pressure: `POST /orders` answers 503 with `Retry-After` while the
//! outbox holds more undelivered messages than `MAX_PENDING`.
//!
//! An outbox never refuses work on its own: during a long outage it grows
//! without bound, and every order accepted into it waits behind the whole
//! backlog. Past the bound the service stops promising: a client is told to
//! come back later instead of being handed an order that cannot be
//! delivered within a stated time (`MAX_PENDING` ÷ the relay's drain rate).
//!
//! The count is read by a background task every [`REFRESH`], never on the
//! request path: a request reads one atomic. The bound is therefore soft by
//! at most what arrives in one refresh interval.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use resilience::outbox::Outbox;
use service_kit::Problem;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the pending count is refreshed.
pub const REFRESH: Duration = Duration::from_millis(250);

/// The last pending count seen, shared with the request handlers.
#[derive(Debug, Clone)]
pub struct Backlog {
    pending: Arc<AtomicI64>,
    max: i64,
}

impl Backlog {
    /// A bound of `max` pending messages (0: no bound).
    pub fn new(max: u64) -> Self {
        Self {
            pending: Arc::new(AtomicI64::new(0)),
            max: i64::try_from(max).unwrap_or(i64::MAX),
        }
    }

    /// The last count seen.
    pub fn pending(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// `Err(503)` while the backlog is past the bound.
    pub fn admit(&self) -> Result<(), Problem> {
        let pending = self.pending();
        if self.max > 0 && pending >= self.max {
            return Err(Problem::unavailable(format!(
                "{pending} orders wait to be delivered (bound {}); retry later",
                self.max
            ))
            .kind("backlog-full")
            .retry_after(1));
        }
        Ok(())
    }

    /// Keeps the count fresh until `stop`.
    pub fn spawn(&self, outbox: Outbox, stop: CancellationToken) -> JoinHandle<()> {
        let pending = self.pending.clone();
        let bounded = self.max > 0;
        tokio::spawn(async move {
            if !bounded {
                return;
            }
            loop {
                match outbox.pending_count().await {
                    Ok(n) => pending.store(n, Ordering::Relaxed),
                    Err(e) => tracing::debug!(error = %e, "backlog count failed"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(REFRESH) => {}
                }
            }
        })
    }
}
