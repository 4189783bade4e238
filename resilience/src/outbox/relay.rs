//! The relay: claims due messages, sends them, records what happened.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tower::{BoxError, ServiceExt};

use super::{Outbox, OutboxError, OutgoingRequest};
use crate::circuit_breaker::CircuitOpen;
use crate::foreground::GiveWay;
use crate::idempotency::IdempotencyKey;
use crate::retry::{parse_retry_after, Backoff};
use crate::store::{now_ms, Backend};
use crate::SendService;
use tokio_util::sync::CancellationToken;

/// How a relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// This relay's identity in `lease_owner` (unique per process).
    pub owner: String,
    /// Messages claimed per round.
    pub batch_size: i64,
    /// Sends in flight at once.
    pub concurrency: usize,
    /// How long a claim is exclusive. Longer than the send timeout, so a
    /// healthy send always finishes inside its lease.
    pub lease: Duration,
    /// Longest idle wait between two claims (the safety net behind wake-ups).
    pub poll_interval: Duration,
    /// After a claim that found work but not a whole batch, the next claim
    /// waits this long after it (wake-ups meanwhile are folded into it), so
    /// a steady stream is claimed, sent and settled in fewer, larger
    /// batches. A claim that found nothing sets no wait: the first message
    /// after a quiet spell is claimed the moment it is committed, and a
    /// full batch is followed by the next claim at once. Zero: claim on
    /// every wake-up.
    pub linger: Duration,
    /// The longest wait after a partial claim. A claim that found many
    /// messages means a heavy stream, where larger batches save more than
    /// the wait costs: the wait is one `linger` per [`LINGER_STEP`]
    /// messages the claim found, up to this. A light stream keeps the
    /// plain `linger`. Equal to `linger` (or shorter): no growth.
    pub max_linger: Duration,
    /// Delay before the next attempt after a retryable failure.
    pub backoff: Backoff,
    /// Dead-letter after this many attempts (`None`: keep trying).
    pub max_attempts: Option<u32>,
    /// Dead-letter messages older than this (`None`: keep trying).
    pub max_age: Option<Duration>,
    /// Delivered rows are deleted after this long.
    pub retention: Duration,
    /// Whether, and for how long, a claim waits while the owner's front
    /// door is busy (see [`crate::foreground`]). Only when the next claim
    /// happens changes: sends already claimed go on, and a relay whose last
    /// claim held a first attempt `max_lag` old claims at full speed.
    /// Default: never wait.
    pub give_way: GiveWay,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            owner: format!("relay-{}", uuid::Uuid::new_v4().simple()),
            batch_size: 512,
            concurrency: 1024,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            linger: Duration::from_millis(50),
            max_linger: Duration::from_millis(200),
            backoff: Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(10)),
            max_attempts: None,
            max_age: None,
            retention: Duration::from_secs(24 * 3600),
            give_way: GiveWay::never(),
        }
    }
}

/// Messages a partial claim must find for each further `linger` of wait
/// (see [`RelayConfig::max_linger`]). At 50 ms, a relay that keeps finding
/// 32 or more messages per claim (about 640 a second) waits longer and
/// claims more at a time; below that its wait stays one `linger`.
pub const LINGER_STEP: usize = 32;

impl RelayConfig {
    /// The wait after a partial claim that found `found` messages: one
    /// `linger` per [`LINGER_STEP`] messages (at least one), at most
    /// `max_linger` (or `linger`, if that is longer).
    pub fn linger_after(&self, found: usize) -> Duration {
        let steps = u32::try_from((found / LINGER_STEP).max(1)).unwrap_or(u32::MAX);
        self.linger
            .saturating_mul(steps)
            .min(self.max_linger.max(self.linger))
    }
}

/// A message as the relay sent it, handed to the owner's [`DeliveryHandler`].
#[derive(Debug, Clone)]
pub struct SentMessage {
    /// Message id (and idempotency key, when the message carries one).
    pub id: String,
    /// What the message is (chosen by the owner at enqueue).
    pub kind: String,
    /// The owner's correlation id.
    pub correlation_id: Option<String>,
    /// Attempts before this one.
    pub attempts: i64,
    /// Enqueued at (ms since epoch).
    pub created_at: i64,
}

/// The owner's reaction to a final outcome, run in the same transaction as
/// the outbox update (so "delivered" and "order accepted" commit together).
#[async_trait]
pub trait DeliveryHandler: Send + Sync + 'static {
    /// The peer answered 2xx.
    async fn delivered(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: &SentMessage,
        response: &Response<Bytes>,
    ) -> Result<(), sqlx::Error>;

    /// Several deliveries of one batch of outcomes, in its transaction,
    /// sorted by correlation id. The default runs
    /// [`DeliveryHandler::delivered`] for each; override it to write them
    /// all in one statement (lock the owner's rows in the order given, so
    /// that concurrent batches cannot deadlock).
    async fn delivered_all(
        &self,
        tx: &mut Transaction<'static, Any>,
        delivered: &[(&SentMessage, &Response<Bytes>)],
    ) -> Result<(), sqlx::Error> {
        for (msg, response) in delivered {
            self.delivered(tx, msg, response).await?;
        }
        Ok(())
    }

    /// The message was dead-lettered.
    async fn dead(
        &self,
        _tx: &mut Transaction<'static, Any>,
        _msg: &SentMessage,
        _reason: &str,
    ) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

/// A handler that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopHandler;

#[async_trait]
impl DeliveryHandler for NoopHandler {
    async fn delivered(
        &self,
        _tx: &mut Transaction<'static, Any>,
        _msg: &SentMessage,
        _response: &Response<Bytes>,
    ) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

/// What one send came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx: done.
    Delivered,
    /// Transient failure: try again after `delay`.
    Retry {
        /// When to try again.
        delay: Duration,
        /// What went wrong.
        reason: String,
        /// The peer's status, if it answered.
        status: Option<u16>,
    },
    /// The destination's breaker is open: try again after `delay`, no attempt spent.
    Deferred {
        /// The breaker's retry-after.
        delay: Duration,
    },
    /// Permanent failure: dead-letter.
    Dead {
        /// Why.
        reason: String,
        /// The peer's status, if it answered.
        status: Option<u16>,
    },
}

/// Statuses worth another attempt: 408, 409 (a duplicate still in flight at
/// the peer), 425, 429 and every 5xx.
fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error()
        || matches!(
            s,
            StatusCode::REQUEST_TIMEOUT
                | StatusCode::CONFLICT
                | StatusCode::TOO_EARLY
                | StatusCode::TOO_MANY_REQUESTS
        )
}

/// Judges one send. Transport errors of any kind are retryable: the loop is
/// durable and keeps trying unless a limit says otherwise.
pub(crate) fn classify(
    result: &Result<Response<Bytes>, BoxError>,
    attempt: u32,
    backoff: &Backoff,
) -> DeliveryOutcome {
    match result {
        Ok(res) if res.status().is_success() => DeliveryOutcome::Delivered,
        Ok(res) if retryable_status(res.status()) => {
            let computed = backoff.delay_for(attempt);
            // Honour Retry-After, but never beyond the backoff's cap.
            let delay = parse_retry_after(res.headers(), SystemTime::now())
                .map(|d| d.min(backoff.cap).max(computed))
                .unwrap_or(computed);
            DeliveryOutcome::Retry {
                delay,
                reason: format!("peer answered {}", res.status()),
                status: Some(res.status().as_u16()),
            }
        }
        Ok(res) => {
            let body =
                String::from_utf8_lossy(&res.body()[..res.body().len().min(300)]).into_owned();
            DeliveryOutcome::Dead {
                reason: format!("peer answered {}: {body}", res.status()),
                status: Some(res.status().as_u16()),
            }
        }
        Err(e) => match CircuitOpen::find(e.as_ref()) {
            Some(open) => DeliveryOutcome::Deferred {
                delay: open.retry_after().max(Duration::from_millis(1)),
            },
            None => DeliveryOutcome::Retry {
                delay: backoff.delay_for(attempt),
                reason: crate::error_chain(e.as_ref()),
                status: None,
            },
        },
    }
}

/// A claimed message.
#[derive(Debug)]
struct Claimed {
    msg: SentMessage,
    request: OutgoingRequest,
}

/// A claim made after giving way for `max_wait`, with the front door still
/// busy, takes this fraction of `batch_size` (64 of Postgres's 512).
const GIVE_WAY_CLAIM_DIVISOR: i64 = 8;

/// How long the oldest first attempt of a claim had waited since it was
/// enqueued (`None`: the claim held none). Retries are left out: their wait
/// is their backoff, not a sign that the relay is behind.
fn first_attempt_lag(batch: &[Claimed]) -> Option<Duration> {
    let oldest = batch
        .iter()
        .filter(|c| c.msg.attempts == 0)
        .map(|c| c.msg.created_at)
        .min()?;
    Some(Duration::from_millis(
        u64::try_from(now_ms().saturating_sub(oldest)).unwrap_or(0),
    ))
}

/// Outcomes written in one transaction at most (both backends' parameter
/// limits stay far away: one `UPDATE` binds at most this many ids).
const SETTLE_BATCH: usize = 256;

/// One outcome waiting to be written, and who waits for it.
struct Settlement {
    msg: SentMessage,
    outcome: DeliveryOutcome,
    response: Option<Response<Bytes>>,
    done: tokio::sync::oneshot::Sender<()>,
}

/// Hands outcomes to the relay's settle loop, which writes them in batches.
#[derive(Clone)]
struct Settler(tokio::sync::mpsc::UnboundedSender<Settlement>);

impl Settler {
    /// Queues the outcome and waits until it is written (or given up on,
    /// which leaves the message to its lease).
    async fn settle(
        &self,
        msg: SentMessage,
        outcome: DeliveryOutcome,
        response: Option<Response<Bytes>>,
    ) {
        let (done, written) = tokio::sync::oneshot::channel();
        let s = Settlement {
            msg,
            outcome,
            response,
            done,
        };
        if self.0.send(s).is_ok() {
            let _ = written.await;
        }
    }
}

/// Counts one recorded outcome. Deferrals spent no attempt (the breaker
/// counts its rejections).
#[cfg(feature = "metrics")]
fn record_outcome_metrics(outcome: &DeliveryOutcome) {
    let outcome = match outcome {
        DeliveryOutcome::Delivered => Some("delivered"),
        DeliveryOutcome::Retry { .. } => Some("retry"),
        DeliveryOutcome::Dead { .. } => Some("dead"),
        DeliveryOutcome::Deferred { .. } => None,
    };
    if let Some(outcome) = outcome {
        metrics::counter!("outbox_delivery_attempts_total", "outcome" => outcome).increment(1);
    }
}

const RETURNING: &str = "id, destination, method, path, headers, body, kind, correlation_id, \
                         idempotency_key, attempts, created_at";

/// Drains an [`Outbox`] through a tower stack. Run one per process; several
/// processes on one Postgres database share the work.
pub struct Relay {
    outbox: Outbox,
    service: SendService,
    handler: Arc<dyn DeliveryHandler>,
    config: RelayConfig,
    /// Destinations whose circuit is open, and until when: their rows are
    /// left out of every claim meanwhile, so an open breaker costs no
    /// database writes and no claims, and the relay keeps delivering to
    /// the other destinations.
    blocked: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("outbox", &self.outbox)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay over `outbox`, sending through `service`, reporting to `handler`.
    pub fn new(
        outbox: Outbox,
        service: SendService,
        handler: Arc<dyn DeliveryHandler>,
        config: RelayConfig,
    ) -> Self {
        Self {
            outbox,
            service,
            handler,
            config,
            blocked: Arc::default(),
        }
    }

    /// Leaves `destination`'s rows alone until `until_ms` (its breaker's
    /// retry time).
    fn block(&self, destination: &str, until_ms: i64) {
        let mut b = match self.blocked.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let e = b.entry(destination.to_string()).or_insert(until_ms);
        *e = (*e).max(until_ms);
    }

    /// The destinations blocked now (expired entries are dropped).
    fn blocked_now(&self, now: i64) -> Vec<String> {
        let mut b = match self.blocked.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        b.retain(|_, until| *until > now);
        b.keys().cloned().collect()
    }

    /// The relay's configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The outbox this relay drains.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Runs until `stop` fires: claims, sends, records; sleeps until the next
    /// message is due, a wake-up arrives, a send finishes, or the poll
    /// interval passes. On stop it claims nothing more, lets sends in flight
    /// finish, and releases the leases it still holds so another relay (or the
    /// next start) takes over at once.
    ///
    /// Claiming does not wait for a whole batch to finish: whenever sends in
    /// flight drop below [`RelayConfig::concurrency`] (by a quarter of it, to
    /// claim in batches), more is claimed, so one slow or stuck send holds one
    /// slot, not the relay. Each send, with its outcome's write, is bounded
    /// by the lease: past it the message is left to expire and be claimed
    /// again, and the slot is freed.
    pub async fn run(self, stop: CancellationToken) {
        #[cfg(feature = "postgres")]
        let listener = (self.outbox.db().backend() == Backend::Postgres)
            .then(|| tokio::spawn(listen(self.outbox.clone(), stop.clone())));
        #[cfg(not(feature = "postgres"))]
        let listener: Option<tokio::task::JoinHandle<()>> = None;
        let notifier = tokio::spawn(self.outbox.clone().send_notifies(stop.clone()));
        // Unbounded, yet it never holds more than `concurrency` outcomes:
        // each send waits until its own outcome is written.
        let (settle_tx, settle_rx) = tokio::sync::mpsc::unbounded_channel();
        let settler = Settler(settle_tx);
        tokio::join!(self.claim_loop(&stop, settler), self.settle_loop(settle_rx));
        if let Err(e) = self.release_leases().await {
            tracing::warn!(error = %e, "could not release leases; they expire on their own");
        }
        if let Some(l) = listener {
            l.abort();
        }
        notifier.abort();
        tracing::info!(owner = %self.config.owner, "relay stopped");
    }

    /// Claims and sends until `stop`, then lets the sends in flight finish.
    /// Outcomes go to the settle loop through `settler`; dropping it (with
    /// the last send) ends that loop.
    async fn claim_loop(&self, stop: &CancellationToken, settler: Settler) {
        let wake = self.outbox.wake_handle();
        let mut last_purge = tokio::time::Instant::now();
        let concurrency = self.config.concurrency.max(1);
        // Claim again once this many slots are free (or nothing is in flight).
        let refill = (concurrency / 4).max(1);
        let mut in_flight = futures::stream::FuturesUnordered::new();
        tracing::info!(owner = %self.config.owner, "relay started");
        // No claim before this instant: set after a claim that found a
        // partial batch (see `RelayConfig::linger`).
        let mut lingering: Option<tokio::time::Instant> = None;
        // While giving way to the front door: the claim happens by then.
        let mut giving_way: Option<tokio::time::Instant> = None;
        // How long the oldest first attempt of the last claim had waited.
        let mut lag: Option<Duration> = None;
        while !stop.is_cancelled() {
            let free = concurrency.saturating_sub(in_flight.len());
            let mut full = false;
            let now = tokio::time::Instant::now();
            if lingering.is_some_and(|until| until <= now) {
                lingering = None;
            }
            if lingering.is_none() && (free >= refill || in_flight.is_empty()) {
                let give_way = &self.config.give_way;
                let mut batch_size = self.config.batch_size;
                // Already waiting, or the door is busy and delivery is not
                // behind: wait (at most `max_wait` in all) before claiming.
                if give_way.may_wait(lag) && (giving_way.is_some() || give_way.busy()) {
                    let deadline = *giving_way.get_or_insert_with(|| {
                        #[cfg(feature = "metrics")]
                        metrics::counter!("outbox_relay_gave_way_total").increment(1);
                        now + give_way.max_wait
                    });
                    let quiet = tokio::select! {
                        () = stop.cancelled() => break,
                        Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                        quiet = give_way.wait_until_quiet(deadline) => quiet,
                    };
                    if !quiet {
                        // Still busy after the longest wait: a small claim,
                        // enough to keep delivery moving and to learn how
                        // far behind it is.
                        batch_size = (batch_size / GIVE_WAY_CLAIM_DIVISOR).max(1);
                    }
                }
                giving_way = None;
                let limit = batch_size.min(free as i64).max(1);
                match drive(&mut in_flight, self.claim_up_to(limit)).await {
                    Ok(batch) => {
                        full = batch.len() as i64 >= limit;
                        lag = first_attempt_lag(&batch);
                        if !full && !batch.is_empty() && !self.config.linger.is_zero() {
                            lingering = Some(now + self.config.linger_after(batch.len()));
                        }
                        for c in batch {
                            in_flight.push(self.deliver_bounded(c, Some(settler.clone())));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "relay round failed; will retry"),
                }
            }
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = tokio::time::Instant::now();
                drive(&mut in_flight, self.purge()).await;
            }
            if full && in_flight.len() + refill <= concurrency {
                continue; // more work is likely waiting, and there is room
            }
            if let Some(until) = lingering {
                // Wake-ups are folded into the claim at `until`.
                tokio::select! {
                    () = stop.cancelled() => break,
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                    () = tokio::time::sleep_until(until) => {}
                }
                continue;
            }
            let idle = if in_flight.is_empty() {
                self.idle_time().await
            } else {
                self.config.poll_interval
            };
            tokio::select! {
                () = stop.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                () = wake.notified() => {}
                () = tokio::time::sleep(idle) => {}
            }
        }
        while in_flight.next().await.is_some() {}
    }

    /// Writes outcomes as they arrive, in batches: every outcome that queued
    /// while the previous batch was being written goes into the next one
    /// transaction (group commit, with no added wait). A batch that fails is
    /// written again one outcome per transaction, as [`Relay::settle`] does,
    /// so one bad outcome cannot hold back the others. Ends when every
    /// [`Settler`] is gone and the queue is empty.
    async fn settle_loop(&self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Settlement>) {
        let mut batch: Vec<Settlement> = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < SETTLE_BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            // A batch of one is written the plain way, as is a failed batch.
            let batched = batch.len() > 1
                && match self.settle_batch(&batch).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(error = %e, n = batch.len(), "batched outcomes failed; writing them one by one");
                        false
                    }
                };
            for s in batch.drain(..) {
                if batched {
                    #[cfg(feature = "metrics")]
                    record_outcome_metrics(&s.outcome);
                } else {
                    self.settle(&s.msg, s.outcome, s.response.as_ref()).await;
                }
                let _ = s.done.send(());
            }
        }
    }

    /// Several outcomes in one transaction: one `UPDATE` for all deliveries
    /// with the same status, then the owner's reactions, one statement per
    /// retry or dead letter. Every row is still guarded by `lease_owner = me
    /// AND status = 'pending'`, so a batch written after its leases were
    /// taken over (or a batch written again after an ambiguous commit)
    /// changes nothing and runs no reaction twice.
    async fn settle_batch(&self, batch: &[Settlement]) -> Result<(), OutboxError> {
        let now = now_ms();
        let mut tx = self.outbox.db().begin().await?;
        // Deliveries, grouped by the peer's status.
        let mut statuses: Vec<u16> = Vec::new();
        for s in batch {
            if let (DeliveryOutcome::Delivered, Some(res)) = (&s.outcome, &s.response) {
                let st = res.status().as_u16();
                if !statuses.contains(&st) {
                    statuses.push(st);
                }
            }
        }
        let mut won: std::collections::HashSet<String> = std::collections::HashSet::new();
        for st in statuses {
            let ids: Vec<&str> = batch
                .iter()
                .filter(|s| {
                    matches!(s.outcome, DeliveryOutcome::Delivered)
                        && s.response.as_ref().map(|r| r.status().as_u16()) == Some(st)
                })
                .map(|s| s.msg.id.as_str())
                .collect();
            let sql = delivered_batch_sql(ids.len());
            let mut q = sqlx::query_scalar::<_, String>(&sql)
                .bind(now)
                .bind(i64::from(st))
                .bind(&self.config.owner);
            for id in &ids {
                q = q.bind(*id);
            }
            won.extend(q.fetch_all(&mut *tx).await?);
        }
        // The owner's reactions lock the owner's rows (an order, a
        // shipment): in the order of their correlation ids, the order the
        // batch client sends the peer's own batches in (by path), so two
        // batches over the same rows never wait for each other in a cycle.
        let mut by_owner: Vec<&Settlement> = batch.iter().collect();
        by_owner.sort_by(|a, b| a.msg.correlation_id.cmp(&b.msg.correlation_id));
        let mut delivered: Vec<(&SentMessage, &Response<Bytes>)> = Vec::new();
        for s in &by_owner {
            if let (DeliveryOutcome::Delivered, Some(res)) = (&s.outcome, &s.response) {
                if won.contains(&s.msg.id) {
                    delivered.push((&s.msg, res));
                } else {
                    tracing::warn!(id = %s.msg.id, "lease lost before the outcome was recorded; another relay owns it");
                }
            }
        }
        if !delivered.is_empty() {
            self.handler.delivered_all(&mut tx, &delivered).await?;
        }
        for s in by_owner {
            match (&s.outcome, &s.response) {
                (DeliveryOutcome::Delivered, _) => {}
                (
                    DeliveryOutcome::Retry {
                        delay,
                        reason,
                        status,
                    },
                    _,
                ) => {
                    tracing::debug!(id = %s.msg.id, kind = %s.msg.kind, %reason, ?delay, "delivery failed; rescheduled");
                    self.reschedule_in(&mut tx, &s.msg, *delay, Some(reason), *status, true)
                        .await?;
                }
                (DeliveryOutcome::Deferred { delay }, _) => {
                    tracing::debug!(id = %s.msg.id, ?delay, "circuit open; deferred");
                    self.reschedule_in(&mut tx, &s.msg, *delay, None, None, false)
                        .await?;
                }
                (DeliveryOutcome::Dead { reason, status }, _) => {
                    tracing::warn!(id = %s.msg.id, kind = %s.msg.kind, %reason, "message dead-lettered");
                    if self.dead_in(&mut tx, &s.msg, reason, *status).await? {
                        self.handler.dead(&mut tx, &s.msg, reason).await?;
                    }
                }
            }
        }
        tx.commit().await?;
        #[cfg(feature = "metrics")]
        for s in batch {
            if won.contains(&s.msg.id) {
                metrics::histogram!("outbox_delivery_seconds")
                    .record(now.saturating_sub(s.msg.created_at).max(0) as f64 / 1000.0);
            }
        }
        Ok(())
    }

    /// One send and its outcome, bounded by the lease.
    async fn deliver_bounded(&self, c: Claimed, settler: Option<Settler>) {
        let id = c.msg.id.clone();
        if tokio::time::timeout(self.config.lease, self.deliver(c, settler))
            .await
            .is_err()
        {
            tracing::warn!(%id, lease = ?self.config.lease, "send outlived its lease; left for another claim");
        }
    }

    /// Claims one batch and delivers it. Returns how many were claimed.
    pub async fn run_once(&self, stop: &CancellationToken) -> Result<usize, OutboxError> {
        let batch = self.claim().await?;
        let n = batch.len();
        futures::stream::iter(batch)
            .for_each_concurrent(self.config.concurrency, |c| async move {
                if stop.is_cancelled() {
                    // Not started: leave it for whoever runs next.
                    if let Err(e) = self.release(&c.msg.id).await {
                        tracing::warn!(id = %c.msg.id, error = %e, "could not release lease");
                    }
                    return;
                }
                self.deliver(c, None).await;
            })
            .await;
        Ok(n)
    }

    async fn claim(&self) -> Result<Vec<Claimed>, OutboxError> {
        self.claim_up_to(self.config.batch_size).await
    }

    async fn claim_up_to(&self, limit: i64) -> Result<Vec<Claimed>, OutboxError> {
        let now = now_ms();
        let lease_until = now + self.config.lease.as_millis() as i64;
        // A non-null lease at claim time means the previous claim never
        // finished (its relay died or stalled past the lease): a takeover.
        // Destinations behind an open breaker are not claimed at all.
        let blocked = self.blocked_now(now);
        let sql = claim_sql(self.outbox.db().backend(), blocked.len());
        let mut query = sqlx::query(&sql)
            .bind(&self.config.owner)
            .bind(lease_until)
            .bind(now)
            .bind(limit);
        for d in &blocked {
            query = query.bind(d);
        }
        let rows = query.fetch_all(self.outbox.db().writer()).await?;
        rows.iter().map(claimed_from_row).collect()
    }

    fn request(&self, c: &Claimed) -> Result<Request<Bytes>, String> {
        let mut req = c.request.to_http().map_err(|e| e.to_string())?;
        if c.request.idempotency_key {
            // The stack's `IdempotencyKeyLayer` turns this into the header, so
            // every attempt at this message carries the same key.
            req.extensions_mut()
                .insert(IdempotencyKey(c.msg.id.clone()));
        }
        Ok(req)
    }

    /// One attempt at one message, in a span carrying the message's
    /// `trace_id` (from its stored `traceparent`), so every log line of the
    /// attempt has it.
    async fn deliver(&self, c: Claimed, settler: Option<Settler>) {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "outbox_delivery",
            trace_id = tracing::field::Empty,
            message_id = %c.msg.id,
            kind = %c.msg.kind,
            attempt = c.msg.attempts + 1,
        );
        if let Some(trace_id) = c
            .request
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(crate::trace::TRACEPARENT))
            .and_then(|(_, value)| crate::trace::trace_id_of(value))
        {
            span.record("trace_id", trace_id.as_str());
        }
        self.deliver_traced(c, settler).instrument(span).await
    }

    async fn deliver_traced(&self, c: Claimed, settler: Option<Settler>) {
        let attempt = u32::try_from(c.msg.attempts).unwrap_or(u32::MAX);
        let outcome = match self.request(&c) {
            Err(reason) => {
                self.settle(
                    &c.msg,
                    DeliveryOutcome::Dead {
                        reason,
                        status: None,
                    },
                    None,
                )
                .await;
                return;
            }
            Ok(req) => {
                let result = self.service.clone().oneshot(req).await;
                let outcome = classify(&result, attempt, &self.config.backoff);
                (outcome, result.ok())
            }
        };
        let (outcome, response) = outcome;
        if let DeliveryOutcome::Deferred { delay } = &outcome {
            // The breaker of this destination is open: no claim touches its
            // rows until the breaker lets a probe through.
            self.block(&c.request.destination, now_ms() + delay.as_millis() as i64);
        }
        let outcome = self.apply_limits(&c.msg, outcome);
        match settler {
            Some(settler) => settler.settle(c.msg, outcome, response).await,
            None => self.settle(&c.msg, outcome, response.as_ref()).await,
        }
    }

    /// Turns a retry into a dead letter once the attempt or age limit is reached.
    fn apply_limits(&self, msg: &SentMessage, outcome: DeliveryOutcome) -> DeliveryOutcome {
        let DeliveryOutcome::Retry { reason, status, .. } = &outcome else {
            return outcome;
        };
        let attempts = msg.attempts + 1;
        if let Some(max) = self.config.max_attempts {
            if attempts >= i64::from(max) {
                return DeliveryOutcome::Dead {
                    reason: format!("gave up after {attempts} attempts: {reason}"),
                    status: *status,
                };
            }
        }
        if let Some(max_age) = self.config.max_age {
            if now_ms() - msg.created_at > max_age.as_millis() as i64 {
                return DeliveryOutcome::Dead {
                    reason: format!("gave up after {max_age:?}: {reason}"),
                    status: *status,
                };
            }
        }
        outcome
    }

    async fn settle(
        &self,
        msg: &SentMessage,
        outcome: DeliveryOutcome,
        response: Option<&Response<Bytes>>,
    ) {
        let result = match &outcome {
            DeliveryOutcome::Delivered => match response {
                Some(res) => self.mark_delivered(msg, res).await,
                None => Ok(()),
            },
            DeliveryOutcome::Retry {
                delay,
                reason,
                status,
            } => {
                tracing::debug!(id = %msg.id, kind = %msg.kind, %reason, ?delay, "delivery failed; rescheduled");
                self.reschedule(msg, *delay, Some(reason), *status, true)
                    .await
            }
            DeliveryOutcome::Deferred { delay } => {
                tracing::debug!(id = %msg.id, ?delay, "circuit open; deferred");
                self.reschedule(msg, *delay, None, None, false).await
            }
            DeliveryOutcome::Dead { reason, status } => {
                tracing::warn!(id = %msg.id, kind = %msg.kind, %reason, "message dead-lettered");
                self.mark_dead(msg, reason, *status).await
            }
        };
        #[cfg(feature = "metrics")]
        if result.is_ok() {
            record_outcome_metrics(&outcome);
        }
        if let Err(e) = result {
            // The lease runs out and the message is claimed again: at worst a
            // repeat send, which the receiver's idempotency key absorbs.
            tracing::warn!(id = %msg.id, error = %e, "could not record the delivery outcome");
        }
    }

    async fn mark_delivered(
        &self,
        msg: &SentMessage,
        res: &Response<Bytes>,
    ) -> Result<(), OutboxError> {
        let now = now_ms();
        let mut tx = self.outbox.db().begin().await?;
        let updated = sqlx::query(
            "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = $1, \
             updated_at = $1, lease_owner = NULL, lease_until = NULL, last_status = $2, \
             last_error = NULL WHERE id = $3 AND lease_owner = $4 AND status = 'pending'",
        )
        .bind(now)
        .bind(i64::from(res.status().as_u16()))
        .bind(&msg.id)
        .bind(&self.config.owner)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            tracing::warn!(id = %msg.id, "lease lost before the outcome was recorded; another relay owns it");
            tx.rollback().await?;
            return Ok(());
        }
        if let Err(e) = self.handler.delivered(&mut tx, msg, res).await {
            tx.rollback().await?;
            // Keep the message: the reaction must happen exactly with the
            // delivery, so the whole thing is retried.
            self.reschedule(
                msg,
                self.config.backoff.delay_for(0),
                Some(&e.to_string()),
                None,
                false,
            )
            .await?;
            return Err(e.into());
        }
        tx.commit().await?;
        // Commit of the business transaction that enqueued it, to this 2xx.
        #[cfg(feature = "metrics")]
        metrics::histogram!("outbox_delivery_seconds")
            .record(now.saturating_sub(msg.created_at).max(0) as f64 / 1000.0);
        Ok(())
    }

    async fn reschedule(
        &self,
        msg: &SentMessage,
        delay: Duration,
        error: Option<&str>,
        status: Option<u16>,
        spent_attempt: bool,
    ) -> Result<(), OutboxError> {
        let mut conn = self.outbox.db().writer().acquire().await?;
        self.reschedule_in(&mut conn, msg, delay, error, status, spent_attempt)
            .await
    }

    /// [`Relay::reschedule`] on a given connection (or transaction).
    async fn reschedule_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        msg: &SentMessage,
        delay: Duration,
        error: Option<&str>,
        status: Option<u16>,
        spent_attempt: bool,
    ) -> Result<(), OutboxError> {
        let now = now_ms();
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + $1, next_attempt_at = $2, updated_at = $3, \
             lease_owner = NULL, lease_until = NULL, \
             last_error = COALESCE($4, last_error), last_status = COALESCE($5, last_status) \
             WHERE id = $6 AND lease_owner = $7 AND status = 'pending'",
        )
        .bind(i64::from(spent_attempt))
        .bind(now + delay.as_millis() as i64)
        .bind(now)
        .bind(error)
        .bind(status.map(i64::from))
        .bind(&msg.id)
        .bind(&self.config.owner)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn mark_dead(
        &self,
        msg: &SentMessage,
        reason: &str,
        status: Option<u16>,
    ) -> Result<(), OutboxError> {
        let mut tx = self.outbox.db().begin().await?;
        if self.dead_in(&mut tx, msg, reason, status).await? {
            self.handler.dead(&mut tx, msg, reason).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks `msg` dead if this relay still holds it; true if it did.
    async fn dead_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        msg: &SentMessage,
        reason: &str,
        status: Option<u16>,
    ) -> Result<bool, OutboxError> {
        let updated = sqlx::query(
            "UPDATE outbox SET status = 'dead', attempts = attempts + 1, updated_at = $1, \
             lease_owner = NULL, lease_until = NULL, last_error = $2, last_status = $3 \
             WHERE id = $4 AND lease_owner = $5 AND status = 'pending'",
        )
        .bind(now_ms())
        .bind(reason)
        .bind(status.map(i64::from))
        .bind(&msg.id)
        .bind(&self.config.owner)
        .execute(&mut *conn)
        .await?;
        Ok(updated.rows_affected() == 1)
    }

    async fn release(&self, id: &str) -> Result<(), OutboxError> {
        sqlx::query(
            "UPDATE outbox SET lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2 AND status = 'pending'",
        )
        .bind(id)
        .bind(&self.config.owner)
        .execute(self.outbox.db().writer())
        .await?;
        Ok(())
    }

    async fn release_leases(&self) -> Result<u64, OutboxError> {
        let res = sqlx::query(
            "UPDATE outbox SET lease_owner = NULL, lease_until = NULL \
             WHERE lease_owner = $1 AND status = 'pending'",
        )
        .bind(&self.config.owner)
        .execute(self.outbox.db().writer())
        .await?;
        Ok(res.rows_affected())
    }

    /// How long to sleep: until the next pending message is due (or its
    /// foreign lease runs out), at most the poll interval.
    async fn idle_time(&self) -> Duration {
        // Rows of blocked destinations are not due before their breaker's
        // retry time: they neither count as work now nor keep the relay
        // spinning on claims that leave them out.
        let now = now_ms();
        let blocked = self.blocked_now(now);
        let unblocks = {
            let b = match self.blocked.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            b.values().copied().min()
        };
        let skip = if blocked.is_empty() {
            String::new()
        } else {
            let marks: Vec<String> = (0..blocked.len()).map(|i| format!("${}", i + 1)).collect();
            format!(" AND destination NOT IN ({})", marks.join(", "))
        };
        let sql = format!(
            concat!(
                "SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until > next_attempt_at \
                 THEN lease_until ELSE next_attempt_at END) FROM outbox WHERE ",
                claimable!(),
                "{}"
            ),
            skip
        );
        let mut query = sqlx::query_scalar(&sql);
        for d in &blocked {
            query = query.bind(d);
        }
        let next: Result<Option<i64>, sqlx::Error> = query.fetch_one(self.outbox.db().pool()).await;
        let next = match (next, unblocks) {
            (Ok(Some(a)), Some(b)) => Some(a.min(b)),
            (Ok(Some(a)), None) => Some(a),
            (_, b) => b,
        };
        match next {
            Some(at) => {
                let ms = (at - now_ms()).max(1) as u64;
                Duration::from_millis(ms).min(self.config.poll_interval)
            }
            None => self.config.poll_interval,
        }
    }

    async fn purge(&self) {
        match self
            .outbox
            .purge_delivered(self.config.retention, 1000)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "delivered outbox rows purged"),
            Err(e) => tracing::warn!(error = %e, "could not purge delivered rows"),
        }
    }
}

/// Awaits `fut` while the sends in flight keep running: they hold database
/// connections (and, on SQLite, the write lock) that `fut` may need.
async fn drive<F: std::future::Future>(
    in_flight: &mut futures::stream::FuturesUnordered<impl std::future::Future<Output = ()>>,
    fut: F,
) -> F::Output {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
        }
    }
}

/// Postgres: wake the relay when another replica (or this one) commits work.
#[cfg(feature = "postgres")]
async fn listen(outbox: Outbox, stop: CancellationToken) {
    let wake = outbox.wake_handle();
    loop {
        let connected = async {
            let mut l = sqlx::postgres::PgListener::connect(outbox.db().url()).await?;
            l.listen(outbox.channel()).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            () = stop.cancelled() => return,
            res = connected => match res {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox LISTEN failed; polling meanwhile");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => wake.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox LISTEN connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

fn claimed_from_row(r: &AnyRow) -> Result<Claimed, OutboxError> {
    let method: String = r.try_get("method")?;
    let headers: String = r.try_get("headers")?;
    let headers: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|e| OutboxError::Invalid(e.to_string()))?;
    Ok(Claimed {
        msg: SentMessage {
            id: r.try_get("id")?,
            kind: r.try_get("kind")?,
            correlation_id: r.try_get("correlation_id")?,
            attempts: r.try_get("attempts")?,
            created_at: r.try_get("created_at")?,
        },
        request: OutgoingRequest {
            destination: r.try_get("destination")?,
            method: Method::from_bytes(method.as_bytes())
                .map_err(|e| OutboxError::Invalid(e.to_string()))?,
            path: r.try_get("path")?,
            headers,
            body: Bytes::from(r.try_get::<Vec<u8>, _>("body")?),
            kind: r.try_get("kind")?,
            correlation_id: r.try_get("correlation_id")?,
            idempotency_key: r.try_get::<Option<String>, _>("idempotency_key")?.is_some(),
        },
    })
}

/// The claim: `$1` the lease owner, `$2` the lease's end, `$3` now, `$4`
/// the batch size, then the `blocked` destinations (behind an open
/// breaker), which are not claimed.
///
/// Claimable is spelled `status <> 'delivered' AND status <> 'dead'`, as in
/// the partial index `outbox_claimable` (migration 10005) that the claim
/// walks in `next_attempt_at` order, stopping at the batch. Spelled
/// `status = 'pending'`, with no statistics on the table (fresh, or a
/// backlog grown since the last `ANALYZE`), Postgres expected a handful of
/// due rows and sorted all of them: each claim read the whole backlog
/// (6.7 ms a claim at a 20,000-order burst).
#[doc(hidden)]
pub fn claim_sql(backend: Backend, blocked: usize) -> String {
    // On Postgres the claimed ids come back as an array that the update
    // finds through the primary key (`id = ANY(...)`); as `id IN (...)`
    // the planner may hash-join them against a sequential scan of the
    // whole table when it believes the table small.
    let (open, close, lock) = match backend {
        Backend::Postgres => ("= ANY(ARRAY(", "))", "FOR UPDATE SKIP LOCKED"),
        Backend::Sqlite => ("IN (", ")", ""),
    };
    let skip = if blocked == 0 {
        String::new()
    } else {
        format!(
            "AND destination NOT IN {} ",
            crate::store::placeholders(5, blocked)
        )
    };
    format!(
        "UPDATE outbox SET lease_owner = $1, lease_until = $2, updated_at = $3, \
         takeovers = takeovers + CASE WHEN lease_until IS NULL THEN 0 ELSE 1 END \
         WHERE id {open}SELECT id FROM outbox WHERE status <> 'delivered' AND status <> 'dead' \
           AND next_attempt_at <= $3 AND (lease_until IS NULL OR lease_until < $3) \
           {skip}ORDER BY next_attempt_at LIMIT $4 {lock}{close} \
         RETURNING {RETURNING}"
    )
}

/// The statement that marks `n` leased messages delivered: `$1` the time,
/// `$2` the peer's status, `$3` the lease owner, then the ids.
///
/// The rows are found through the primary key only. `status = 'pending'` is
/// written as a filter that no index can serve: with stale statistics (a
/// fresh table, or a backlog that grew since the last `ANALYZE`) Postgres
/// takes `status = 'pending'` for a rare value and read every pending row
/// through a status index to find the batch's 16, a cost that grew with the
/// backlog.
#[doc(hidden)]
pub fn delivered_batch_sql(n: usize) -> String {
    format!(
        "UPDATE outbox SET status = 'delivered', attempts = attempts + 1, \
         delivered_at = $1, updated_at = $1, lease_owner = NULL, lease_until = NULL, \
         last_status = $2, last_error = NULL \
         WHERE id IN {} AND lease_owner = $3 AND (status = 'pending') IS TRUE RETURNING id",
        crate::store::placeholders(4, n)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_what_a_claim_found() {
        let ms = Duration::from_millis;
        let cfg = RelayConfig {
            linger: ms(50),
            max_linger: ms(200),
            ..RelayConfig::default()
        };
        assert_eq!(cfg.linger_after(1), ms(50));
        assert_eq!(cfg.linger_after(LINGER_STEP - 1), ms(50));
        assert_eq!(cfg.linger_after(2 * LINGER_STEP), ms(100));
        assert_eq!(cfg.linger_after(3 * LINGER_STEP + 5), ms(150));
        assert_eq!(cfg.linger_after(100 * LINGER_STEP), ms(200));
        // No growth when the longest wait is the plain one (or shorter).
        let flat = RelayConfig {
            max_linger: ms(10),
            ..cfg.clone()
        };
        assert_eq!(flat.linger_after(100 * LINGER_STEP), ms(50));
        assert_eq!(flat.linger_after(usize::MAX), ms(50));
    }

    fn res(status: u16, retry_after: Option<&str>) -> Result<Response<Bytes>, BoxError> {
        let mut b = Response::builder().status(status);
        if let Some(v) = retry_after {
            b = b.header("retry-after", v);
        }
        Ok(b.body(Bytes::new()).unwrap())
    }

    #[test]
    fn classification() {
        let b = Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(10));
        assert_eq!(classify(&res(201, None), 0, &b), DeliveryOutcome::Delivered);
        assert!(matches!(
            classify(&res(503, None), 0, &b),
            DeliveryOutcome::Retry { .. }
        ));
        assert!(matches!(
            classify(&res(409, None), 0, &b),
            DeliveryOutcome::Retry { .. }
        ));
        assert!(matches!(
            classify(&res(429, None), 0, &b),
            DeliveryOutcome::Retry { .. }
        ));
        assert!(matches!(
            classify(&res(422, None), 0, &b),
            DeliveryOutcome::Dead { .. }
        ));
        assert!(matches!(
            classify(&res(404, None), 0, &b),
            DeliveryOutcome::Dead { .. }
        ));
        // Retry-After is honoured, capped by the backoff's cap.
        match classify(&res(503, Some("5")), 0, &b) {
            DeliveryOutcome::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(5)),
            o => panic!("{o:?}"),
        }
        match classify(&res(503, Some("3600")), 0, &b) {
            DeliveryOutcome::Retry { delay, .. } => assert_eq!(delay, Duration::from_secs(10)),
            o => panic!("{o:?}"),
        }
        let err: Result<Response<Bytes>, BoxError> = Err("connection reset".into());
        assert!(matches!(
            classify(&err, 3, &b),
            DeliveryOutcome::Retry { status: None, .. }
        ));
    }
}
