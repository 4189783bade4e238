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
use http_body_util::{BodyExt, LengthLimitError, Limited};
use resilience::idempotency::{fingerprint, key_reused, parse_key};
use sha2::{Digest, Sha256};

use crate::Problem;

/// The header that marks a request for in-memory de-duplication.
pub const MEMORY_DEDUPE_HEADER: &str = "x-dedupe";
/// Keys remembered at most (oldest forgotten first).
const CAPACITY: usize = 10_000;
/// Bytes of remembered answers at most (oldest forgotten first).
const MAX_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
enum Entry {
    InFlight {
        fingerprint: String,
    },
    Done {
        fingerprint: String,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

impl Entry {
    fn fingerprint(&self) -> &str {
        match self {
            Entry::InFlight { fingerprint } | Entry::Done { fingerprint, .. } => fingerprint,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Entry::InFlight { .. } => 0,
            Entry::Done { body, .. } => body.len(),
        }
    }
}

/// Map keys: SHA-256 of (caller, method, path, key), so a long caller id or
/// key costs no more memory than a short one.
type Slot = [u8; 32];

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Slot, Entry>,
    order: VecDeque<Slot>,
    /// Bytes of the answers in `map`.
    bytes: usize,
}

impl Inner {
    fn insert(&mut self, slot: Slot, entry: Entry) {
        self.bytes += entry.bytes();
        if let Some(old) = self.map.insert(slot, entry) {
            self.bytes -= old.bytes();
        } else {
            self.order.push_back(slot);
        }
        while self.order.len() > CAPACITY || self.bytes > MAX_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.map.remove(&oldest) {
                self.bytes -= gone.bytes();
            }
        }
    }

    fn remove(&mut self, slot: &Slot) {
        if let Some(gone) = self.map.remove(slot) {
            self.bytes -= gone.bytes();
        }
        // Its place in `order` goes when it comes up: a missing key is
        // skipped, and a key inserted again meanwhile may be forgotten that
        // much earlier (this memory forgets; it never answers wrongly).
    }
}

/// The process-local memory of processed keys. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryDedupe {
    inner: Arc<Mutex<Inner>>,
    max_body_bytes: usize,
}

impl Default for MemoryDedupe {
    fn default() -> Self {
        Self::new(64 * 1024)
    }
}

impl MemoryDedupe {
    /// An empty memory, for requests of at most `max_body_bytes` (larger
    /// marked requests are refused with 413).
    pub fn new(max_body_bytes: usize) -> Self {
        Self {
            inner: Arc::default(),
            max_body_bytes,
        }
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

    /// Bytes of remembered answers.
    pub fn bytes(&self) -> usize {
        self.with(|i| i.bytes)
    }
}

/// Middleware: de-duplicates marked requests by key, in memory.
///
/// The key follows the persisted layer's rules (400 when malformed or
/// repeated), and a key used again for a different request (method, path
/// or body) is refused with 422, as there. Only the memory is different: it
/// is lost on restart, and bounded ([`CAPACITY`] keys, [`MAX_BYTES`] of
/// answers, oldest forgotten first).
pub async fn middleware(State(memory): State<MemoryDedupe>, req: Request, next: Next) -> Response {
    let marked = req
        .headers()
        .get(MEMORY_DEDUPE_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"memory"));
    if !marked {
        return next.run(req).await;
    }
    let key = match parse_key(req.headers()) {
        Ok(Some(key)) => key,
        Ok(None) => return next.run(req).await,
        Err(problem) => return problem.into_response(),
    };
    let (mut parts, body) = req.into_parts();
    let body = match Limited::new(body, memory.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Problem::too_large(memory.max_body_bytes).into_response();
        }
        Err(e) => {
            return Problem::bad_request(format!("cannot read the request body: {e}"))
                .into_response();
        }
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let print = fingerprint(&parts.method, path, &body);
    let client = parts
        .headers
        .get("x-client-id")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let mut h = Sha256::new();
    for part in [
        client,
        parts.method.as_str().as_bytes(),
        parts.uri.path().as_bytes(),
        key.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let slot: Slot = h.finalize().into();
    let seen = memory.with(|i| match i.map.get(&slot) {
        Some(e) => Some(e.clone()),
        None => {
            i.insert(
                slot,
                Entry::InFlight {
                    fingerprint: print.clone(),
                },
            );
            None
        }
    });
    match seen {
        Some(e) if e.fingerprint() != print => return key_reused().into_response(),
        Some(Entry::Done {
            status,
            headers,
            body,
            ..
        }) => {
            let mut res = (status, body).into_response();
            *res.headers_mut() = headers;
            res.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return res;
        }
        Some(Entry::InFlight { .. }) => {
            return Problem::conflict(
                "request in progress",
                "a request with this key is still being processed",
            )
            .retry_after(1)
            .into_response();
        }
        None => {}
    }
    parts.headers.remove("idempotency-key");
    let res = next.run(Request::from_parts(parts, Body::from(body))).await;
    let (parts, body) = res.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            memory.with(|i| i.remove(&slot));
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
            i.insert(
                slot,
                Entry::Done {
                    fingerprint: print,
                    status: parts.status,
                    headers,
                    body: bytes.clone(),
                },
            );
        } else {
            i.remove(&slot);
        }
    });
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(n: usize) -> Entry {
        Entry::Done {
            fingerprint: String::new(),
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; n]),
        }
    }

    fn slot(i: usize) -> Slot {
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&(i as u64).to_be_bytes());
        s
    }

    #[test]
    fn memory_is_bounded_in_keys_and_bytes() {
        let mut inner = Inner::default();
        // Large answers: the byte bound evicts first.
        for i in 0..100 {
            inner.insert(slot(i), done(1 << 20));
            assert!(inner.bytes <= MAX_BYTES, "{} bytes", inner.bytes);
        }
        assert_eq!(inner.map.len(), MAX_BYTES >> 20);
        assert!(inner.map.contains_key(&slot(99)) && !inner.map.contains_key(&slot(0)));
        // Many small ones: the key bound.
        for i in 100..100 + 3 * CAPACITY {
            inner.insert(slot(i), done(10));
        }
        assert_eq!(inner.map.len(), CAPACITY);
        assert_eq!(inner.bytes, 10 * CAPACITY);
        // Replacing an entry (in flight, then done) counts it once.
        let s = slot(1 << 40);
        inner.insert(
            s,
            Entry::InFlight {
                fingerprint: String::new(),
            },
        );
        inner.insert(s, done(7));
        inner.remove(&s);
        assert_eq!(inner.bytes, 10 * (CAPACITY - 1));
    }
}
