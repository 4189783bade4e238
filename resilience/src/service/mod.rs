//! Plumbing every HTTP service in this project shares: RFC 9457 problem
//! responses, extractors that answer bad input with them, log set-up, the
//! shutdown signal and opaque pagination cursors.

mod extract;
mod problem;
mod shutdown;
mod telemetry;

pub use extract::{ApiJson, ApiQuery};
pub use problem::{internal_error, method_not_allowed, not_found, Problem, PROBLEM_JSON};
pub use shutdown::{serve, shutdown_signal, Shutdown};
pub use telemetry::{init_tracing, LogFormat};

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

/// An opaque keyset cursor: `(created_at_ms, id)` of the last row of a page.
pub mod cursor {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    /// Encodes the position after `(created_at, id)`.
    pub fn encode(created_at: i64, id: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{created_at}:{id}"))
    }

    /// Decodes a cursor made by [`encode`]; `None` if it is not one.
    pub fn decode(cursor: &str) -> Option<(i64, String)> {
        let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (ts, id) = text.split_once(':')?;
        let ts = ts.parse().ok()?;
        if id.is_empty() || id.len() > 64 {
            return None;
        }
        Some((ts, id.to_string()))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_rejects_garbage() {
            let c = super::encode(42, "abc");
            assert_eq!(super::decode(&c), Some((42, "abc".into())));
            assert_eq!(super::decode("!!"), None);
            assert_eq!(super::decode("bm9jb2xvbg"), None);
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
