//! What order-service and shipping-service share and no library user needs.
//!
//! `resilience` is the library: layers and delivery machinery, nothing an
//! application owns. This crate is the other half, the application plumbing
//! both services (and the lab, and the tests) are built from.
//!
//! # Layout
//!
//! - problem+json: [`Problem`] (from `resilience`), extractors that answer bad
//!   input with it ([`ApiJson`], [`ApiQuery`]), router fallbacks, [`detach`].
//! - [`cursor`]: opaque keyset pagination cursors.
//! - [`telemetry`](init_tracing): the log subscriber.
//! - [`Shutdown`], [`shutdown_signal`], [`serve`]: SIGINT/SIGTERM and the drain.
//! - [`mode`]: the delivery modes an order can travel with.
//! - [`memory_dedupe`]: the counter-example receiver that forgets on restart.
//! - [`feeds`]: pull delivery as the services use it: a feed per pull mode,
//!   a consumer per pull mode, their settings and tasks.
//! - [`config`]: clap settings of the relay, retries, admin token and faults.
//! - [`stack`]: the outgoing client stacks, assembled and commented in one place.
//! - [`auth`]: [`auth::require_signed`], the layer on service-to-service routes.
//! - [`openapi`]: what both services' OpenAPI documents share.
//! - [`admin`]: operator endpoints (outbox, dead letters, breakers, faults).
//! - [`trace`]: W3C trace context: the request span middleware, the context
//!   stored with outbox messages, feed events and shipments.
//! - [`metrics`]: the Prometheus recorder, the HTTP middleware, `/metrics`.
//! - [`testing`]: throw-away SQLite or Postgres databases for tests and the lab.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod config;
mod extract;
pub mod feeds;
mod front_door;
pub mod memory_dedupe;
pub mod metrics;
pub mod mode;
pub mod openapi;
mod shutdown;
pub mod stack;
mod telemetry;
pub mod testing;
pub mod text;
pub mod trace;

pub use extract::{objects, ApiJson, ApiPath, ApiQuery};
pub use front_door::front_door;
pub use mode::DeliveryMode;
pub use resilience::error_chain;
pub use resilience::problem::{
    db_error, internal_error, method_not_allowed, not_found, Problem, PROBLEM_JSON,
    PROBLEM_TYPE_BASE,
};
pub use shutdown::{
    serve, serve_with_limits, shutdown_signal, ServerLimits, Shutdown, DB_CLOSE_LIMIT,
};
pub use telemetry::{flush_traces, init_tracing, LogFormat};

/// An opaque keyset cursor: `(created_at_ms, id)` of the last row of a page.
pub mod cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    /// Encodes the position after `(created_at, id)`.
    pub fn encode(created_at: i64, id: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
    }

    /// Decodes a cursor made by [`encode`]; `None` if it is not one. Row ids
    /// are UUIDs, so the id must be one in the form [`encode`] writes
    /// (hyphenated, lower case): nothing else, a NUL byte or an oversized
    /// string say, ever reaches a query.
    pub fn decode(cursor: &str) -> Option<(i64, String)> {
        if cursor.len() > 128 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (ts, id) = text.split_once(':')?;
        let ts = ts.parse().ok()?;
        let canonical = uuid::Uuid::try_parse(id).ok()?.hyphenated().to_string();
        if canonical != id {
            return None;
        }
        Some((ts, canonical))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_rejects_garbage() {
            let id = "0b6d5f0e-5c1a-4f0e-9a57-3c2f6d1e8a90";
            let c = super::encode(42, id);
            assert_eq!(super::decode(&c), Some((42, id.into())));
            assert_eq!(super::decode("!!"), None);
            assert_eq!(super::decode("bm9jb2xvbg"), None);
        }

        #[test]
        fn refuses_ids_that_are_not_uuids() {
            // "0:\0": a NUL byte, which Postgres TEXT refuses with an error.
            assert_eq!(super::decode("MDoA"), None);
            assert_eq!(super::decode(&super::encode(1, "abc")), None);
            let upper = "0B6D5F0E-5C1A-4F0E-9A57-3C2F6D1E8A90";
            assert_eq!(super::decode(&super::encode(1, upper)), None);
            let simple = "0b6d5f0e5c1a4f0e9a573c2f6d1e8a90";
            assert_eq!(super::decode(&super::encode(1, simple)), None);
            let long = format!("0b6d5f0e-5c1a-4f0e-9a57-3c2f6d1e8a90{}", "0".repeat(500));
            assert_eq!(super::decode(&super::encode(1, &long)), None);
        }
    }
}

/// Middleware: runs the rest of the request in a task of its own, so a client
/// that disconnects (or times out) cannot cancel a handler halfway through a
/// database transaction. Without it the handler's future is dropped at the
/// disconnect, possibly between `BEGIN` and `COMMIT`, and its connection goes
/// back to the pool still holding locks. The work the caller gave up on
/// completes, which is also the honest model of a lost response: the peer
/// acted, the caller did not hear.
pub async fn detach(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::spawn(next.run(req)).await {
        Ok(res) => res,
        Err(e) => internal_error(e).into_response(),
    }
}

/// Middleware: a request that declares a `Content-Length` past `max` is
/// refused with 413 before its body is read, so a client waiting on
/// `Expect: 100-continue` is never invited to send it, and a client that
/// sends only part of it holds nothing until the request time limit. (A
/// body without a length, or longer than it declared, is still cut off at
/// `max` by the body limit where it is read.)
pub async fn refuse_oversized(
    axum::extract::State(max): axum::extract::State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Problem::too_large(max).into_response();
    }
    next.run(req).await
}

/// `app` behind group commit ([`resilience::batch::Coalesce`]) for the
/// `allowed` routes: requests to them that arrive while `in_flight` groups
/// are being written (default: 1 on SQLite, 2 on Postgres) wait, and are
/// written together in one transaction, each answered as if alone.
/// `Some(0)` leaves `app` as it is. Requests marked for the memory-dedupe
/// counter-example, and bodies over `max_body_bytes`, always go alone.
pub fn with_group_commit(
    app: axum::Router,
    db: &resilience::store::Db,
    allowed: &[(http::Method, &str)],
    in_flight: Option<usize>,
    max_body_bytes: usize,
) -> axum::Router {
    if in_flight == Some(0) {
        return app;
    }
    let server = allowed.iter().fold(
        resilience::batch::BatchServerConfig::new(db.clone()).refuse_header(
            http::HeaderName::from_static(memory_dedupe::MEMORY_DEDUPE_HEADER),
        ),
        |config, (method, pattern)| config.allow(method.clone(), pattern),
    );
    let mut config = resilience::batch::CoalesceConfig::new(server);
    config.server.max_body_bytes = max_body_bytes;
    if let Some(n) = in_flight {
        config.max_in_flight = n;
    }
    resilience::batch::Coalesce::new(app, config).into_router()
}

/// `app` with `POST /batch` ([`resilience::batch`]): the outbox relays of
/// the other services send their messages through it, many in one exchange
/// and one transaction. Requests marked for the memory-dedupe
/// counter-example are refused in a batch (that layer must see its own
/// request's commit). Only the routes in `allowed` (method, pattern) may be
/// batched: routes whose requests run through the idempotency layer, so
/// that nothing in a batch writes outside its transaction (admin routes
/// stay out).
pub fn with_batch(
    app: axum::Router,
    db: &resilience::store::Db,
    allowed: &[(http::Method, &str)],
) -> axum::Router {
    let config = allowed.iter().fold(
        resilience::batch::BatchServerConfig::new(db.clone()).refuse_header(
            http::HeaderName::from_static(memory_dedupe::MEMORY_DEDUPE_HEADER),
        ),
        |config, (method, pattern)| config.allow(method.clone(), pattern),
    );
    // The batch itself is counted, timed and traced like any route (its
    // sub-requests are too, by `app`'s own layers).
    let batch = resilience::batch::route(app.clone(), config)
        .layer(axum::middleware::from_fn(trace::middleware))
        .layer(axum::middleware::from_fn(metrics::track_http));
    app.merge(batch)
}
