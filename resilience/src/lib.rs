//! Tower layers for reliable service-to-service delivery.
//!
//! Nothing in this crate knows about orders or shipments, and nothing in it
//! belongs to an application: it never parses a command line, never installs
//! a log subscriber and never opens a database on its own. It is the reusable
//! machinery that turns a plain REST call (at-most-once) into a delivery that
//! is retried durably (at-least-once) and de-duplicated by the receiver
//! (effectively-once).
//!
//! # Features
//!
//! Each part sits behind a cargo feature, in the manner of `tower-http`, so a
//! user compiles only what they use. `default` turns everything on.
//!
//! | feature | module | pulls in |
//! |---|---|---|
//! | `circuit-breaker` | [`circuit_breaker`] | tower |
//! | `retry` | [`retry`] | tower, httpdate (and `circuit-breaker`) |
//! | `fault` | [`fault`] | tower, rand |
//! | `client` | [`client`] | reqwest |
//! | `axum` | [`problem`] | axum |
//! | `sqlite`, `postgres` | [`store`] | sqlx with that driver |
//! | `idempotency` | [`idempotency`] | axum, sqlx |
//! | `outbox` | [`outbox`] | sqlx (and `retry`, `idempotency`) |
//! | `feed` | [`feed`] | sqlx (and `retry`) |
//! | `signing` | [`signing`] | hmac, sha2 (the verifier layer also needs `axum`) |
//! | `batch` | [`batch`] | base64 (and `idempotency`) |
//! | `metrics` | (counters in [`outbox`] and [`idempotency`]) | metrics (the facade; the application installs a recorder) |
//!
//! `default-features = false, features = ["circuit-breaker"]` builds the
//! breaker on tower alone.
//!
//! # Layout
//!
//! - [`circuit_breaker`]: lock-free circuit breaker layer, per-destination
//!   registry, outcome classifiers.
//! - [`retry`]: full-jitter [`retry::Backoff`], `Retry-After` parsing, retry
//!   budget and an idempotency-aware retry layer.
//! - [`fault`]: seeded fault injection (dropped requests, lost responses,
//!   synthetic 503s, latency), adjustable at run time.
//! - [`client`]: `tower::Service` HTTP client over a pooled `reqwest::Client`.
//! - [`problem`]: RFC 9457 problem+json answers.
//! - [`store`]: one database handle over SQLite or Postgres (sqlx `Any`), with
//!   per-service schemas, migrations and the small SQL differences in one place.
//! - [`idempotency`]: `Idempotency-Key` layers: server-side transaction per
//!   request with stored, replayed responses; client-side key stamping.
//! - [`outbox`]: the transactional outbox and its relay (the durable retry loop).
//! - [`feed`]: pull delivery: an event log served as a feed, and a leased
//!   consumer that keeps its offset in its own database.
//! - [`batch`]: batched delivery: the requests waiting for one peer leave in
//!   one exchange and commit in one transaction at the receiver, each with
//!   its own answer.
//! - [`foreground`]: background loops (the relay, a served feed) that give
//!   way to the service's own front door during a burst, with a bounded lag.
//! - [`trace`]: W3C `traceparent`/`tracestate`, parsed strictly.
//! - [`signing`]: HMAC-SHA256 signatures of service-to-service requests: a
//!   client layer that signs each attempt, a server layer that answers 401.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![forbid(unsafe_code)]

#[cfg(feature = "batch")]
pub mod batch;
#[cfg(feature = "circuit-breaker")]
pub mod circuit_breaker;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "fault")]
pub mod fault;
#[cfg(feature = "feed")]
pub mod feed;
pub mod foreground;
#[cfg(feature = "idempotency")]
pub mod idempotency;
#[cfg(feature = "outbox")]
pub mod outbox;
#[cfg(feature = "axum")]
pub mod problem;
#[cfg(feature = "retry")]
pub mod retry;
#[cfg(feature = "signing")]
pub mod signing;
#[cfg(feature = "store")]
pub mod store;
pub mod trace;

/// An outgoing HTTP stack as the delivery machinery drives it:
/// `http::Request<Bytes>` in, `http::Response<Bytes>` out, errors boxed.
///
/// The outbox relay (and any other sender here) takes one of these, so the
/// application decides which layers sit between it and the wire.
#[cfg(feature = "outbox")]
pub type SendService = tower::util::BoxCloneSyncService<
    http::Request<bytes::Bytes>,
    http::Response<bytes::Bytes>,
    tower::BoxError,
>;

/// An error and its sources, joined with `: ` (for logs and stored reasons).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
