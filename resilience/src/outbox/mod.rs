//! The durable retry loop: a transactional outbox and the relay that drains it.
//!
//! A retry loop that lives in memory loses its pending messages when the
//! process dies; a publish that follows a commit loses the message if the
//! process dies in between. The outbox closes both cracks:
//!
//! 1. The business write and the outgoing HTTP request commit in **one
//!    transaction** ([`Outbox::enqueue`] takes the caller's transaction).
//! 2. A [`Relay`] claims due messages under a **lease**, sends them through a
//!    tower stack (breaker, timeout, client), and records the outcome:
//!    delivered (the owner reacts in the same transaction, see
//!    [`DeliveryHandler`]), rescheduled with backoff, deferred while the
//!    destination's breaker is open (no attempt spent), or dead-lettered.
//!
//! # Message life cycle
//!
//! ```text
//!            enqueue (in the caller's tx)
//!                       │
//!                       ▼
//!   ┌──────────────► pending ──── claim (lease) ───► in flight
//!   │                   ▲                               │
//!   │  retryable error: │ next_attempt_at += backoff    │ 2xx
//!   │  circuit open:    │ next_attempt_at = breaker time├──────► delivered ──► purged after retention
//!   │  lease expired:   │ (another relay may claim)     │
//!   │                                                    │ 4xx / attempt or age limit
//!   └──────── requeue ◄──────── dead ◄──────────────────┘
//! ```
//!
//! # Claiming and leases
//!
//! A claim is one `UPDATE … RETURNING` that stamps `lease_owner` and
//! `lease_until` on due rows. On Postgres the candidate rows are chosen with
//! `FOR UPDATE SKIP LOCKED`, so several relays (replicas) claim disjoint
//! batches without waiting for each other. On SQLite the statement runs under
//! the database's single writer lock, which gives the same semantics. Every
//! outcome is written with `WHERE lease_owner = me`: a relay whose lease
//! expired (it stalled, or died and came back) cannot overwrite the outcome of
//! the relay that took the message over. A message is therefore sent twice
//! only when a lease expired while its first send was in flight, which the
//! receiver's idempotency key makes harmless.
//!
//! # Outcomes, in batches
//!
//! [`Relay::run`] writes outcomes through one settle loop: whatever finished
//! while the previous batch was committing goes into the next transaction,
//! deliveries in one `UPDATE … WHERE id IN (…)` and each owner reaction
//! ([`DeliveryHandler`]) beside them. Under load one commit records many
//! messages; when idle a batch is one message, written at once (nothing
//! waits for a batch to fill). A batch whose transaction fails (a reaction
//! refused, a lost connection) is written again one outcome per
//! transaction, so a failing reaction holds back only its own message; every
//! row keeps its `lease_owner = me AND status = 'pending'` guard, so writing
//! an outcome twice (after an ambiguous commit) changes nothing the second
//! time.
//!
//! # Wake-ups
//!
//! New work is sent at once: [`Outbox::notify`] (called after commit) wakes the
//! local relay and, on Postgres, asks for one coalesced `pg_notify`, which the
//! relays of other replicas `LISTEN` to. The notify is sent by a task of its
//! own ([`Relay::run`] starts it; a process that enqueues but runs no relay
//! starts it with [`Outbox::spawn_wakeups`]), *outside* the producer's
//! transaction: a `NOTIFY` inside a transaction takes a cluster-wide lock at
//! commit, which serialises every enqueuing commit and halved the commit
//! rate (issue 14). Many commits while one notify is in flight make one more
//! notify, not many. A producer that dies between its commit and the notify
//! costs the other replicas at most their poll interval: the slow poll is the
//! safety net.

/// Every claimable message, in words `outbox_claimable` can serve: its
/// predicate spelled the same way, plus a range over all of `BIGINT` on its
/// column. Without statistics (a fresh table, or history grown since the
/// last `ANALYZE`) Postgres takes the two inequalities to match most rows,
/// and a count or a minimum would read the whole table, delivered history
/// included; the range is an index condition, so they read the partial
/// index instead (`tests/plans.rs`). A macro, so statements can `concat!`
/// it.
macro_rules! claimable {
    () => {
        "status <> 'delivered' AND status <> 'dead' AND next_attempt_at >= -9223372036854775808"
    };
}

mod relay;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::store::{now_ms, run_writes, Backend, Db};

#[doc(hidden)]
pub use relay::{claim_sql, delivered_batch_sql};
pub use relay::{
    DeliveryHandler, DeliveryOutcome, NoopHandler, Relay, RelayConfig, SentMessage, LINGER_STEP,
};

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// Stored headers could not be (de)serialized.
    #[error("invalid stored message: {0}")]
    Invalid(String),
}

/// An HTTP request to deliver later, durably.
#[derive(Debug, Clone)]
pub struct OutgoingRequest {
    /// Base URL of the peer, e.g. `http://127.0.0.1:8081`.
    pub destination: String,
    /// HTTP method.
    pub method: Method,
    /// Path and query, e.g. `/shipments`.
    pub path: String,
    /// Extra headers (content-type is set from the body kind by the caller).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// What the message is, for the owner's reaction (e.g. `create-shipment`).
    pub kind: String,
    /// The owner's id for the thing this message is about (e.g. an order id).
    pub correlation_id: Option<String>,
    /// Stamp an `Idempotency-Key` derived from the message id on every attempt.
    pub idempotency_key: bool,
}

impl OutgoingRequest {
    /// A JSON `POST`.
    pub fn post_json(
        destination: impl Into<String>,
        path: impl Into<String>,
        body: &impl Serialize,
        kind: impl Into<String>,
    ) -> Result<Self, OutboxError> {
        let body = serde_json::to_vec(body).map_err(|e| OutboxError::Invalid(e.to_string()))?;
        Ok(Self {
            destination: destination.into(),
            method: Method::POST,
            path: path.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body),
            kind: kind.into(),
            correlation_id: None,
            idempotency_key: false,
        })
    }

    /// Sets the correlation id.
    pub fn correlate(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The request as an `http::Request`, ready for a [`crate::SendService`].
    pub fn to_http(&self) -> Result<http::Request<Bytes>, OutboxError> {
        let invalid = |e: &dyn std::fmt::Display| OutboxError::Invalid(e.to_string());
        let uri = format!("{}{}", self.destination.trim_end_matches('/'), self.path);
        let mut req = http::Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .body(self.body.clone())
            .map_err(|e| invalid(&e))?;
        for (name, value) in &self.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(&e))?;
            let value = http::HeaderValue::from_str(value).map_err(|e| invalid(&e))?;
            req.headers_mut().append(name, value);
        }
        Ok(req)
    }

    /// Chooses whether every attempt carries the message's idempotency key.
    pub fn with_idempotency_key(mut self, on: bool) -> Self {
        self.idempotency_key = on;
        self
    }
}

pub use crate::store::{BindWrite, Write};

/// Counts over the outbox table, for operations.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct OutboxStats {
    /// Waiting to be sent (including in flight).
    pub pending: i64,
    /// Claimed under a live lease right now.
    pub in_flight: i64,
    /// Delivered and not yet purged.
    pub delivered: i64,
    /// Dead-lettered.
    pub dead: i64,
    /// Attempts spent on the rows still in the table.
    pub attempts: i64,
    /// Age of the oldest pending message, in milliseconds.
    pub oldest_pending_ms: Option<i64>,
}

/// A dead-lettered message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// Message id (also its idempotency key).
    pub id: String,
    /// What the message was.
    pub kind: String,
    /// The owner's correlation id.
    pub correlation_id: Option<String>,
    /// `METHOD destination/path`.
    pub target: String,
    /// Attempts spent.
    pub attempts: i64,
    /// Why it was dead-lettered.
    pub last_error: Option<String>,
    /// The peer's last status, if it answered.
    pub last_status: Option<i64>,
    /// Enqueued at (ms since epoch).
    pub created_at: i64,
}

/// The outbox of one service: enqueue in a transaction, wake the relay,
/// inspect and repair.
#[derive(Debug, Clone)]
pub struct Outbox {
    db: Db,
    wake: Arc<Notify>,
    /// Asks the notifier task for one `pg_notify` (Postgres).
    poke: Arc<Notify>,
    channel: Arc<str>,
}

/// [`Outbox::pending_count`]'s statement.
#[doc(hidden)]
pub const PENDING_COUNT_SQL: &str = concat!("SELECT COUNT(*) FROM outbox WHERE ", claimable!());

impl Outbox {
    /// The outbox in `db` (its table comes with [`Db::migrate_resilience`]).
    pub fn new(db: Db) -> Self {
        let channel = format!("resilience_outbox_{}", db.schema()).into();
        Self {
            db,
            wake: Arc::new(Notify::new()),
            poke: Arc::new(Notify::new()),
            channel,
        }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The Postgres `LISTEN` channel of this outbox.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub(crate) fn wake_handle(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Inserts a message inside the caller's transaction: it is sent if and
    /// only if that transaction commits. Call [`Outbox::notify`] after commit.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: OutgoingRequest,
    ) -> Result<Uuid, OutboxError> {
        self.enqueue_after(tx, msg, None).await
    }

    /// [`Outbox::enqueue`], together with the caller's own write `before`
    /// (the state change the message announces), in one statement where the
    /// backend allows it. On Postgres `before` runs as a data-modifying
    /// `WITH` ahead of the outbox insert: one round trip for both, both or
    /// neither. On SQLite, which has no writes in `WITH`, both run as one
    /// script ([`Write::script`]). Either way both belong to `tx`.
    pub async fn enqueue_after(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: OutgoingRequest,
        before: Option<Write>,
    ) -> Result<Uuid, OutboxError> {
        let (id, insert) = self.enqueue_write(msg)?;
        let writes: Vec<Write> = before.into_iter().chain(Some(insert)).collect();
        run_writes(tx, self.db.backend(), writes).await?;
        Ok(id)
    }

    /// The outbox insert of [`Outbox::enqueue`] as a [`Write`], not yet run:
    /// for a caller that runs it with its own writes, such as a handler
    /// handing them to [`Tx::write`](crate::idempotency::Tx::write). The
    /// message is sent if and only if the transaction that runs the write
    /// commits. Returns the message's id with it.
    pub fn enqueue_write(&self, msg: OutgoingRequest) -> Result<(Uuid, Write), OutboxError> {
        const INSERT: &str = "INSERT INTO outbox (id, destination, method, path, headers, body, \
             kind, correlation_id, idempotency_key, status, attempts, next_attempt_at, \
             created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', 0, $10, $10, $10)";
        let id = Uuid::now_v7();
        let now = now_ms();
        let headers =
            serde_json::to_string(&msg.headers).map_err(|e| OutboxError::Invalid(e.to_string()))?;
        let key = msg.idempotency_key.then(|| id.to_string());
        let OutgoingRequest {
            destination,
            method,
            path,
            body,
            kind,
            correlation_id,
            ..
        } = msg;
        let (method, body) = (method.as_str().to_owned(), body.to_vec());
        let write = Write::new(INSERT, 10, move |q| {
            q.bind(id.to_string())
                .bind(destination)
                .bind(method)
                .bind(path)
                .bind(headers)
                .bind(body)
                .bind(kind)
                .bind(correlation_id)
                .bind(key)
                .bind(now)
        });
        Ok((id, write))
    }

    /// Inserts several messages inside the caller's transaction, in
    /// multi-row statements and with one wake-up for other replicas: the
    /// batch form of [`Outbox::enqueue`]. Returns their ids, in order.
    pub async fn enqueue_many(
        &self,
        tx: &mut Transaction<'static, Any>,
        msgs: Vec<OutgoingRequest>,
    ) -> Result<Vec<Uuid>, OutboxError> {
        /// Rows per statement (10 parameters each, well under both backends' limits).
        const ROWS: usize = 100;
        let mut ids = Vec::with_capacity(msgs.len());
        if msgs.is_empty() {
            return Ok(ids);
        }
        let now = now_ms();
        for chunk in msgs.chunks(ROWS) {
            let mut sql = String::from(
                "INSERT INTO outbox (id, destination, method, path, headers, body, kind, \
                 correlation_id, idempotency_key, status, attempts, next_attempt_at, created_at, \
                 updated_at) VALUES ",
            );
            for i in 0..chunk.len() {
                let b = i * 10;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, 'pending', 0, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8,
                    b + 9,
                    b + 10,
                    b + 10,
                    b + 10
                ));
            }
            let mut q = sqlx::query(&sql);
            for msg in chunk {
                let id = Uuid::now_v7();
                ids.push(id);
                let headers = serde_json::to_string(&msg.headers)
                    .map_err(|e| OutboxError::Invalid(e.to_string()))?;
                q = q
                    .bind(id.to_string())
                    .bind(msg.destination.clone())
                    .bind(msg.method.as_str().to_string())
                    .bind(msg.path.clone())
                    .bind(headers)
                    .bind(msg.body.to_vec())
                    .bind(msg.kind.clone())
                    .bind(msg.correlation_id.clone())
                    .bind(msg.idempotency_key.then(|| id.to_string()))
                    .bind(now);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(ids)
    }

    /// Wakes the local relay (call after the enqueuing transaction
    /// committed) and, on Postgres, the relays of other replicas through one
    /// coalesced `pg_notify` (see the module's "Wake-ups").
    pub fn notify(&self) {
        self.wake.notify_one();
        self.poke.notify_one();
    }

    /// Starts the task that sends this process's coalesced `pg_notify`
    /// (Postgres; on SQLite the task ends at once). [`Relay::run`] runs one
    /// itself: call this only in a process that enqueues without running a
    /// relay. It ends when `stop` is cancelled.
    pub fn spawn_wakeups(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().send_notifies(stop))
    }

    /// Sends one `pg_notify` per burst of [`Outbox::notify`] calls until
    /// `stop`: calls made while one is in flight make one more, not many.
    pub(crate) async fn send_notifies(self, stop: tokio_util::sync::CancellationToken) {
        if self.db.backend() != Backend::Postgres {
            return;
        }
        crate::store::notify_on_poke(&self.db, &self.channel, &self.poke, stop.cancelled()).await;
    }

    /// How many messages wait to be delivered (a count over the partial
    /// index `outbox_claimable`): what a service bounds its intake by.
    pub async fn pending_count(&self) -> Result<i64, OutboxError> {
        let n: i64 = sqlx::query_scalar(PENDING_COUNT_SQL)
            .fetch_one(self.db.pool())
            .await?;
        Ok(n)
    }

    /// Counts per status, attempts, leases and the oldest pending age.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(attempts), 0) AS BIGINT) AS attempts, \
             CAST(COALESCE(SUM(CASE WHEN lease_until > $1 THEN 1 ELSE 0 END), 0) AS BIGINT) AS leased, \
             MIN(created_at) AS oldest FROM outbox GROUP BY status",
        )
        .bind(now)
        .fetch_all(self.db.pool())
        .await?;
        let mut s = OutboxStats::default();
        for r in rows {
            let status: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            s.attempts += r.try_get::<i64, _>("attempts")?;
            match status.as_str() {
                "pending" => {
                    s.pending = n;
                    s.in_flight = r.try_get("leased")?;
                    s.oldest_pending_ms = r
                        .try_get::<Option<i64>, _>("oldest")?
                        .map(|t| (now - t).max(0));
                }
                "delivered" => s.delivered = n,
                "dead" => s.dead = n,
                _ => {}
            }
        }
        Ok(s)
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetter>, OutboxError> {
        let rows = sqlx::query(
            "SELECT id, kind, correlation_id, method, destination, path, attempts, last_error, \
             last_status, created_at FROM outbox WHERE status = 'dead' \
             ORDER BY created_at, id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    /// Puts a dead letter back in the queue, due now, with a fresh attempt
    /// count. Returns false if there is no such dead letter.
    pub async fn requeue(&self, id: &str) -> Result<bool, OutboxError> {
        let now = now_ms();
        let res = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $1, \
             lease_owner = NULL, lease_until = NULL, updated_at = $1 \
             WHERE id = $2 AND status = 'dead'",
        )
        .bind(now)
        .bind(id)
        .execute(self.db.writer())
        .await?;
        if res.rows_affected() == 1 {
            self.notify();
            return Ok(true);
        }
        Ok(false)
    }

    /// Requeues every dead letter; returns how many.
    pub async fn requeue_all(&self) -> Result<u64, OutboxError> {
        let now = now_ms();
        let res = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $1, \
             lease_owner = NULL, lease_until = NULL, updated_at = $1 WHERE status = 'dead'",
        )
        .bind(now)
        .execute(self.db.writer())
        .await?;
        if res.rows_affected() > 0 {
            self.notify();
        }
        Ok(res.rows_affected())
    }

    /// Deletes up to `batch` delivered rows older than `retention`.
    pub async fn purge_delivered(
        &self,
        retention: Duration,
        batch: i64,
    ) -> Result<u64, OutboxError> {
        let cutoff = now_ms() - retention.as_millis() as i64;
        let res = sqlx::query(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
             WHERE status = 'delivered' AND delivered_at < $1 LIMIT $2)",
        )
        .bind(cutoff)
        .bind(batch)
        .execute(self.db.writer())
        .await?;
        Ok(res.rows_affected())
    }
}

fn dead_letter_from_row(r: &AnyRow) -> Result<DeadLetter, OutboxError> {
    let method: String = r.try_get("method")?;
    let destination: String = r.try_get("destination")?;
    let path: String = r.try_get("path")?;
    Ok(DeadLetter {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        correlation_id: r.try_get("correlation_id")?,
        target: format!("{method} {destination}{path}"),
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        last_status: r.try_get("last_status")?,
        created_at: r.try_get("created_at")?,
    })
}
