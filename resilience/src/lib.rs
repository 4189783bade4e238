//! Tower layers for reliable service-to-service delivery.
//!
//! Nothing in this crate knows about orders or shipments: it is the reusable
//! machinery that turns a plain REST call (at-most-once) into a delivery that
//! is retried durably (at-least-once) and de-duplicated by the receiver
//! (effectively-once).
//!
//! # Layout
//!
//! - [`store`]: one database handle over SQLite or Postgres (sqlx `Any`), with
//!   per-service schemas, migrations and the small SQL differences in one place.
//! - [`mode`]: the three delivery modes.
//! - [`service`]: what every HTTP service here shares: problem+json answers,
//!   extractors that use them, log set-up, the shutdown signal, cursors.
//! - [`circuit_breaker`]: lock-free circuit breaker layer, per-destination
//!   registry, outcome classifiers.
//! - [`retry`]: full-jitter [`retry::Backoff`], `Retry-After` parsing, retry
//!   budget and an idempotency-aware retry layer.
//! - [`client`]: `tower::Service` HTTP client over a pooled `reqwest::Client`.
//! - [`fault`]: seeded fault injection (dropped requests, lost responses,
//!   synthetic 503s, latency), adjustable at run time.
//! - [`config`]: clap settings of the relay, retries, admin token and faults.
//! - [`admin`]: operator endpoints (outbox, dead letters, breakers, faults).
//! - [`outbox`]: the transactional outbox and its relay (the durable retry loop).
//! - [`idempotency`]: `Idempotency-Key` layers: server-side transaction per
//!   request with stored, replayed responses; client-side key stamping.
//! - [`testing`]: throw-away SQLite or Postgres databases for tests and the lab.
//! - [`stack`]: the outgoing client stacks, assembled and commented in one place.
#![warn(missing_debug_implementations, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod circuit_breaker;
pub mod client;
pub mod config;
pub mod fault;
pub mod idempotency;
pub mod mode;
pub mod outbox;
pub mod retry;
pub mod service;
pub mod stack;
pub mod store;
pub mod testing;

pub use mode::DeliveryMode;
