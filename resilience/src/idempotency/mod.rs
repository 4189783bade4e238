//! Idempotency keys, after the IETF draft "The Idempotency-Key HTTP Header
//! Field": a client that repeats a non-idempotent request (a `POST` that timed
//! out, a message the outbox relay delivers again) gets the *first* answer
//! back instead of causing the effect twice.
//!
//! # Server side: [`IdempotencyLayer`]
//!
//! Wrap every write route in the layer. It owns the route's database
//! transaction: it begins it, hands it to the handler through the [`Tx`]
//! extractor, and commits or rolls it back; the handler never commits. Work
//! that must only happen once the state change is durable (waking a relay,
//! publishing an event) is registered with [`Tx::after_commit`].
//!
//! ```no_run
//! use axum::{http::StatusCode, routing::post, Router};
//! use resilience::idempotency::{IdempotencyConfig, IdempotencyLayer, KeyPolicy, Tx};
//! use resilience::problem::{internal_error, Problem};
//! use resilience::store::Db;
//!
//! async fn create(tx: Tx, body: String) -> Result<(StatusCode, String), Problem> {
//!     let mut conn = tx.lock().await?;
//!     sqlx::query("INSERT INTO widgets (name) VALUES ($1)")
//!         .bind(&body)
//!         .execute(&mut **conn)
//!         .await
//!         .map_err(internal_error)?;
//!     drop(conn);
//!     tx.after_commit(|| Box::pin(async { tracing::info!("widget committed") }));
//!     Ok((StatusCode::CREATED, body))
//! }
//!
//! fn routes(db: Db) -> Router {
//!     let idem = IdempotencyLayer::new(IdempotencyConfig::new(db).key_policy(KeyPolicy::Required));
//!     Router::new().route("/widgets", post(create).layer(idem))
//! }
//! ```
//!
//! ## Without a key
//!
//! With [`KeyPolicy::Optional`] a request without `Idempotency-Key` is simply
//! run in a transaction (begun lazily, at the handler's first [`Tx::lock`]),
//! committed unless the answer is a 4xx or 5xx, with its after-commit hooks
//! run after the commit. Nothing is recorded. [`KeyPolicy::Required`] answers it 400.
//!
//! ## With a key: the state machine
//!
//! A key lives in the scope of one caller (see [`IdempotencyConfig::scope`]):
//! `(scope, key)` identifies a record, so two callers never share one.
//!
//! ```text
//!             first request                 commit (response stored)
//!   absent ─────────────────▶ in flight ─────────────────────────▶ completed
//!     ▲                         │  4xx, 5xx / error / commit failure   │
//!     │                         └──────────────▶ absent (rolled back)  │ ttl
//!     └──────────────── expired (deleted on sight or by the reaper) ◀──┘
//! ```
//!
//! - **absent**: no record. The request runs the handler inside the
//!   transaction; if the answer is a success (below 400), the response
//!   (status, selected headers, body) is inserted as the record *in the same
//!   transaction* as the handler's writes, then committed. A 4xx or 5xx
//!   answer rolls back both the handler's writes and the record, so a retry
//!   runs the handler again.
//! - **in flight**: another request with the same key is between its lookup
//!   and its commit. How that is detected depends on the backend (below).
//! - **completed**: the stored response is replayed (same status, headers and
//!   body, plus `Idempotent-Replayed: true`) without running the handler,
//!   also after a restart since it lives in the database. A repeat whose
//!   fingerprint (SHA-256 of method, path and query, and body) differs is
//!   answered 422: the key was reused for a different request.
//! - **expired**: a record older than its ttl (24 h by default) is treated as
//!   absent; a request that finds one deletes it in its own transaction, and
//!   [`spawn_reaper`] deletes the rest in bounded batches.
//!
//! Only successes (1xx to 3xx) are recorded. A refused request (4xx: bad
//! input, not found, a conflict) leaves no trace: its writes roll back, and a
//! client that fixes its request may retry with the same key. Stripe works
//! the same way for requests that fail validation. The fingerprint compares
//! the body byte for byte, so re-serialised JSON with other spacing is a
//! different request. The
//! request body (up to `max_body_bytes`) and the response body of a keyed
//! request are buffered: keyed routes must not stream unbounded responses.
//! Stored headers are the response's own except hop-by-hop ones, `Date` and
//! `Content-Length`.
//!
//! Every error is an `application/problem+json` answer: 400 for a malformed
//! or missing (when required) key or an unusable caller identity, 413 for a body over
//! [`IdempotencyConfig::max_body_bytes`], 409 with `Retry-After` for a
//! request in flight, 422 for a reused key, 500 when the commit fails
//! (nothing was saved, so retrying is safe).
//!
//! ## Concurrency: Postgres vs SQLite
//!
//! **Postgres.** The first statement after `BEGIN` both tries a
//! transaction-scoped advisory lock on a 64-bit hash of (schema, scope, key)
//! (`pg_try_advisory_xact_lock`) and looks the record up, in one round trip.
//! If the lock is held by another transaction and no completed record is
//! visible, the request is in flight elsewhere: it is answered at once with
//! 409 and `Retry-After` ([`IdempotencyConfig::in_flight_retry_after`]),
//! never waiting for the first one. A completed record is replayed even
//! without the lock. The lock is released by the commit or rollback. If the
//! first request commits between the lookup and the lock of the second, the
//! second one's insert hits the primary key; it rolls back (its handler's
//! writes with it) and replays the committed record.
//!
//! **SQLite.** Every write transaction starts with `BEGIN IMMEDIATE`
//! ([`Db::begin`]), which takes the database's single write lock. A
//! concurrent duplicate therefore *waits* in `BEGIN` (up to the busy timeout,
//! [`crate::store::DbOptions::acquire_timeout`]) until the first request
//! commits or rolls back, then finds the completed record and replays it (or
//! runs the handler, if the first one failed). No 409 is ever sent on SQLite
//! except when the wait times out, which is answered 503 with `Retry-After`.
//!
//! Either way the cost of a keyed request over an unkeyed one is two
//! statements inside the handler's own transaction: the lookup (with the lock
//! on Postgres) and the insert of the response.
//!
//! ## Handler first: one round trip (Postgres)
//!
//! With [`IdempotencyConfig::handler_first`], a keyed request on Postgres
//! (not in a batch) runs the other way round. The handler runs with nothing
//! begun and hands its writes to [`Tx::write`] as [`Write`]s; once it has
//! answered, the layer runs those writes and the key's record as *one*
//! statement (data-modifying `WITH` parts ahead of the record's insert),
//! outside any transaction, so the statement commits on its own: one round
//! trip for the whole request, where the usual order takes five.
//!
//! - The record's insert tries the key's advisory lock and, when another
//!   request holds it, inserts a NULL fingerprint: the NOT NULL violation
//!   fails the statement, nothing is kept, and nothing waits for a key in
//!   flight (not even one held by a frozen replica).
//! - A record already there (completed, or expired) fails it by the
//!   primary key; a refused write of the handler's fails it too.
//! - Whenever the server refuses the statement, the request runs again the
//!   usual way, so the answers are the usual ones: the replay, 422, 409,
//!   the deletion of an expired record, or the handler's own answer to its
//!   write's error (its writes now run at once).
//! - A handler that calls [`Tx::lock`] claims the key there (lock and
//!   lookup, as the usual order would have before the handler); if the key
//!   is answered or in flight, `lock` fails with [`TxError::Answered`] and
//!   the layer answers with the record or 409.
//! - A refusal (4xx, 5xx) from a handler that never claimed the key gives
//!   way to a live record: the repeat of an answered request is replayed
//!   even if the handler would now refuse it (under back-pressure, say).
//! - A statement whose answer is lost is read back through the key on fresh
//!   connections: the request's own record (same fingerprint, body and
//!   creation time) means it committed, and its after-commit hooks run;
//!   another request's record is replayed; none within a few seconds is
//!   `503` "outcome unknown", which a retry with the same key resolves.
//!
//! The price is the handler's: it may run for a replay (its answer is then
//! replaced) and twice for one request, so it must have no effect outside
//! its writes but through [`Tx::after_commit`] hooks. SQLite ignores the
//! setting.
//!
//! [`Write`]: crate::store::Write
//! # Client side: [`IdempotencyKeyLayer`]
//!
//! Stamps `Idempotency-Key` on outgoing requests that carry an
//! [`IdempotencyKey`] extension (the outbox relay puts the message id there,
//! so every retry of one message carries the same key). Requests without the
//! extension, or that already have the header, are left alone.
//!
//! # Housekeeping
//!
//! Records are deleted after their ttl by [`reap_expired`] /
//! [`spawn_reaper`] / [`IdempotencyReaper`], in bounded batches so a large
//! backlog never holds a long lock.
//!
//! [`Db::begin`]: crate::store::Db::begin

mod client;
mod config;
mod error;
mod key;
mod layer;
mod reaper;
mod record;
mod scope;
mod tx;

pub use client::{IdempotencyKey, IdempotencyKeyLayer, SetIdempotencyKey};
pub use config::{
    client_id_scope, scope_key, IdempotencyConfig, KeyPolicy, ScopeFn, ANONYMOUS_SCOPE,
    CLIENT_ID_HEADER, MAX_VERBATIM_SCOPE,
};
#[cfg(feature = "batch")]
pub(crate) use error::commit_unknown;
pub use error::{IdempotencyError, TxError};
pub use key::{fingerprint, parse_key};
#[cfg(feature = "batch")]
pub(crate) use layer::rollback;
pub use layer::{key_reused, Idempotency, IdempotencyLayer};
pub use reaper::{reap_expired, spawn_reaper, IdempotencyReaper};
#[doc(hidden)]
pub use record::lookup_many_sql;
pub use scope::{Finished, SharedTx};
#[cfg(feature = "batch")]
pub(crate) use tx::CommitSignal;
pub use tx::{AfterCommit, Tx, TxGuard};

/// The request header carrying the key (lower case, as `http` stores names).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The response header marking a replayed answer.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
