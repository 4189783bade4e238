//! Deleting expired records in bounded batches.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::error::IdempotencyError;
use super::record;
use crate::store::{now_ms, Db};

/// Deletes every record expired now, `batch` rows per statement (each its
/// own short transaction); returns how many were deleted.
pub async fn reap_expired(db: &Db, batch: i64) -> Result<u64, IdempotencyError> {
    IdempotencyReaper::new(db.clone()).batch(batch).reap().await
}

/// Runs [`reap_expired`] every `interval` until `stop` resolves.
pub fn spawn_reaper(
    db: Db,
    interval: Duration,
    batch: i64,
    stop: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    IdempotencyReaper::new(db)
        .batch(batch)
        .interval(interval)
        .spawn(stop)
}

/// Periodic deletion of expired idempotency records.
#[derive(Debug, Clone)]
pub struct IdempotencyReaper {
    db: Db,
    batch: i64,
    interval: Duration,
}

impl IdempotencyReaper {
    /// Batches of 500, every minute.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            batch: 500,
            interval: Duration::from_secs(60),
        }
    }

    /// Sets the most rows one statement deletes (at least 1).
    pub fn batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sets the period of [`IdempotencyReaper::spawn`].
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Deletes at most one batch of records expired now.
    pub async fn reap_batch(&self) -> Result<u64, IdempotencyError> {
        Ok(record::delete_expired(self.db.writer(), now_ms(), self.batch).await?)
    }

    /// Deletes batches until none is full.
    pub async fn reap(&self) -> Result<u64, IdempotencyError> {
        let now = now_ms();
        let mut total = 0;
        loop {
            let n = record::delete_expired(self.db.writer(), now, self.batch).await?;
            total += n;
            if n < self.batch as u64 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Reaps every interval (the first round at once) until `stop` resolves.
    pub fn spawn(self, stop: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
        tokio::spawn(async move {
            tokio::pin!(stop);
            let mut ticker = tokio::time::interval(self.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = ticker.tick() => match self.reap().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(deleted = n, "expired idempotency records reaped"),
                        Err(e) => tracing::warn!(error = %e, "idempotency reaper failed; retrying next round"),
                    },
                }
            }
            tracing::debug!("idempotency reaper stopped");
        })
    }
}
