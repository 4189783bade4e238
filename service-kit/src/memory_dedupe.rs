//! The counter-example of `memory-dedupe` mode: an idempotent receiver that
//! remembers the keys it processed in a process-local map.
//!
//! It behaves like the persisted idempotency layer while the process lives:
//! a repeated key gets the first answer back (`Idempotent-Replayed: true`),
//! a key still in flight gets 409. But the map is not in the database, so a
//! restart (a deploy, a crash, a SIGKILL) forgets every key, and a sender
//! that retries a request whose answer it lost after that restart creates
//! the work a second time. That is the warning at the end of the idempotent
//! receiver article: the memory of processed messages must be persisted in
//! the same transaction as the state change, which is what
//! [`resilience::idempotency`] does. Never use this for real work.
//!
//! A request opts in with the header [`MEMORY_DEDUPE_HEADER`]` = memory` (the
//! lab's senders add it to `memory-dedupe` messages) and an
//! `Idempotency-Key`. The key is removed before the request goes on, so the
//! persisted layer underneath treats it as a request without a key.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::Problem;

/// The header that marks a request for in-memory de-duplication.
pub const MEMORY_DEDUPE_HEADER: &str = "x-dedupe";
/// Keys remembered at most (oldest forgotten first).
const CAPACITY: usize = 100_000;

#[derive(Debug, Clone)]
enum Entry {
    InFlight,
    Done {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    order: VecDeque<String>,
}

/// The process-local memory of processed keys. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct MemoryDedupe {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryDedupe {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        match self.inner.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// How many keys it remembers.
    pub fn len(&self) -> usize {
        self.with(|i| i.map.len())
    }

    /// Does it remember nothing?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Middleware: de-duplicates marked requests by key, in memory.
pub async fn middleware(
    State(memory): State<MemoryDedupe>,
    mut req: Request,
    next: Next,
) -> Response {
    let marked = req
        .headers()
        .get(MEMORY_DEDUPE_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"memory"));
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (true, Some(key)) = (marked, key) else {
        return next.run(req).await;
    };
    let client = req
        .headers()
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let scoped = format!(
        "{client}\u{1f}{} {}\u{1f}{key}",
        req.method(),
        req.uri().path()
    );
    let seen = memory.with(|i| match i.map.get(&scoped) {
        Some(e) => Some(e.clone()),
        None => {
            i.map.insert(scoped.clone(), Entry::InFlight);
            i.order.push_back(scoped.clone());
            while i.order.len() > CAPACITY {
                if let Some(old) = i.order.pop_front() {
                    i.map.remove(&old);
                }
            }
            None
        }
    });
    match seen {
        Some(Entry::Done {
            status,
            headers,
            body,
        }) => {
            let mut res = (status, body).into_response();
            *res.headers_mut() = headers;
            res.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return res;
        }
        Some(Entry::InFlight) => {
            return Problem::conflict(
                "request in progress",
                "a request with this key is still being processed",
            )
            .retry_after(1)
            .into_response();
        }
        None => {}
    }
    req.headers_mut().remove("idempotency-key");
    let res = next.run(req).await;
    let (parts, body) = res.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            memory.with(|i| i.map.remove(&scoped));
            return crate::internal_error(format_args!("reading the response body: {e}"))
                .into_response();
        }
    };
    memory.with(|i| {
        if parts.status.is_success() {
            let mut headers = HeaderMap::new();
            for h in [header::CONTENT_TYPE, header::LOCATION] {
                if let Some(v) = parts.headers.get(&h) {
                    headers.insert(h, v.clone());
                }
            }
            i.map.insert(
                scoped,
                Entry::Done {
                    status: parts.status,
                    headers,
                    body: bytes.clone(),
                },
            );
        } else {
            i.map.remove(&scoped);
        }
    });
    Response::from_parts(parts, Body::from(bytes))
}
