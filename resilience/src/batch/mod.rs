//! Batched delivery: many requests to one peer in one HTTP exchange and one
//! database commit, with every request keeping its own answer.
//!
//! An outbox relay under load sends many small requests to the same peer at
//! once. Sent one by one, each costs an HTTP exchange on both sides and a
//! commit at the receiver (`BEGIN`, the idempotency lookup, the handler, the
//! record, `COMMIT`). This module folds the requests that are waiting for the
//! same peer into one `POST /batch`, and the receiver runs them in one
//! transaction:
//!
//! - **Client side**: [`BatchLayer`] sits next to the wire, below the
//!   breaker, the timeout, the signature and the faults, so every layer above
//!   still sees (and signs, and times, and counts) one request per message.
//!   A request goes out at once, alone, while fewer than
//!   [`BatchConfig::max_in_flight`] exchanges are in flight to its peer;
//!   requests that arrive meanwhile wait and leave together in the next
//!   exchange (group commit, with no added wait when idle). A peer that
//!   answers `404` or `405` to the batch path has no batch endpoint: its
//!   requests are sent one by one from then on.
//! - **Server side**: [`router`] adds the batch route to an axum app. It
//!   shares one transaction, a [`SharedTx`] begun when the first
//!   sub-request reaches its idempotency layer, and dispatches each
//!   sub-request (of the routes [`BatchServerConfig::allow`] lists)
//!   through the app itself, in order, so each goes through its route's own
//!   layers (signature check, tracing, metrics, the
//!   [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)). The
//!   idempotency layer does its usual work inside the shared transaction and
//!   hands it back instead of committing; the batch inserts every record
//!   in one statement, commits once, and then runs every sub-request's
//!   after-commit hooks (each sub-request's in order, the sub-requests'
//!   side by side). Writes a sub-request hands to
//!   [`Tx::write`](crate::idempotency::Tx::write) are held and run with
//!   the records: in the same statement on Postgres, the same script on
//!   SQLite.
//! - **Group commit for single requests**: [`Coalesce`] puts the same
//!   machinery in front of an app for requests that come one by one:
//!   requests to its routes that arrive while earlier ones are being
//!   written wait, and then run together as one batch would, each answered
//!   as it would be alone.
//! - **Reading for the whole batch**: each sub-request of the shared run
//!   carries a [`BatchScope`] in its extensions: every sub-request's path
//!   and a memo they share. A handler can read in its first sub-request
//!   the rows all of them need (locked, in one statement) and judge each
//!   sub-request on them, handing its change to `Tx::write` instead of
//!   running a statement of its own (order-service does this for shipment
//!   reports). A request run alone has no `BatchScope`.
//!
//! # Guarantees
//!
//! - **All or nothing, then one by one.** If every sub-request succeeds, one
//!   commit makes all of them durable, each with its idempotency record. A
//!   sub-request refused (4xx, 5xx) before anything ran in the transaction
//!   for it (its handler never called [`Tx::lock`](crate::idempotency::Tx::lock))
//!   keeps its refusal, its held writes are dropped, and the others go on:
//!   what it was answered did not depend on them. If one is refused after
//!   that, or fails, the transaction rolls back and every sub-request that
//!   ran in it runs again on its own, in its own transaction, exactly as if
//!   it had come alone: the others still get their answer, and the refused
//!   one its refusal.
//! - **A lost batch is a lost request, N times.** A transport error, a
//!   timeout or a 5xx on the batch itself is the answer of each of its
//!   requests; each is retried by its owner and de-duplicated by its own
//!   idempotency key, as if it had been sent alone. A commit whose answer is
//!   lost is resolved by [`Db::commit_resolved`]: committed, rolled back, or
//!   answered 503 (unknown, so retried and de-duplicated).
//! - **Signatures** are checked per sub-request by the route's own layer; a
//!   sub-request admitted by the first run and run again after a rollback is
//!   let through the replay cache once more, and only once
//!   ([`BatchNonces`](crate::signing::BatchNonces)).
//! - **Sub-requests outside the idempotency layer** (a read, a route that
//!   commits on its own) cannot join the shared transaction: they run as
//!   they would alone, and are never run a second time.
//!
//! # Wire format
//!
//! `POST /batch`, `content-type: application/json`:
//!
//! ```json
//! {"requests": [{"method": "POST", "path": "/shipments",
//!                "headers": [["content-type", "application/json"],
//!                            ["idempotency-key", "0190…"]],
//!                "body": "<base64>"}]}
//! ```
//!
//! answered `200` with one response per request, in order:
//!
//! ```json
//! {"responses": [{"status": 201, "headers": [["content-type", "application/json"]],
//!                 "body": "<base64>"}]}
//! ```
//!
//! A malformed batch (bad JSON, no requests or more than
//! [`BatchServerConfig::max_requests`], a bad method, path or header, a
//! `GET` or `HEAD` (a batch holds a write transaction), a nested batch) is refused whole with `400` problem+json and nothing runs;
//! a body over [`BatchServerConfig::max_body_bytes`] with `413`.
//!
//! [`SharedTx`]: crate::idempotency::SharedTx
//! [`Db::commit_resolved`]: crate::store::Db::commit_resolved

mod client;
mod coalesce;
mod server;

pub use client::{BatchConfig, BatchError, BatchLayer, Batching};
pub use coalesce::{Coalesce, CoalesceConfig};
pub use server::{route, router, BatchScope, BatchServerConfig};

use serde::{Deserialize, Serialize};

/// The batch route's default path.
pub const DEFAULT_PATH: &str = "/batch";

/// The body of `POST /batch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The requests, run in this order.
    pub requests: Vec<SubRequest>,
}

/// One request of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubRequest {
    /// The HTTP method.
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Header name and value pairs (a name may repeat).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, base64 (standard alphabet, padded).
    #[serde(default)]
    pub body: String,
}

/// The answer to `POST /batch`. Unknown fields are ignored, so that a newer
/// server's additions do not make a committed batch unreadable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResponse {
    /// One response per request, in the requests' order.
    pub responses: Vec<SubResponse>,
}

/// The answer to one request of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubResponse {
    /// The HTTP status.
    pub status: u16,
    /// Header name and value pairs.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, base64.
    #[serde(default)]
    pub body: String,
}

/// Headers that describe one HTTP exchange, not the request: never copied
/// into or out of a batch.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// A message's headers as `[name, value]` pairs for the wire: hop-by-hop
/// headers and values that are not visible ASCII left out.
fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !hop_by_hop(name.as_str()))
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .collect()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}
