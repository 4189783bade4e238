use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::StatusCode;
use sha2::{Digest, Sha256};

use crate::problem::Problem;
use crate::store::Db;

/// Who is calling: the scope in which a key is unique. `Ok(None)` means the
/// caller did not identify itself; such requests share [`ANONYMOUS_SCOPE`].
/// An `Err` refuses the request (an identity that cannot be used).
///
/// The identity is stored in a namespace of its own (see
/// [`IdempotencyConfig::scope`]): two different identities never share a
/// scope, and none shares the anonymous one.
pub type ScopeFn = Arc<dyn Fn(&Parts) -> Result<Option<String>, Problem> + Send + Sync>;

/// Longest identity stored verbatim, in bytes; longer ones (and the ones
/// [`scope_key`] does not store verbatim) are stored as a SHA-256 digest, so
/// the `(scope, key)` index never sees an oversized value.
pub const MAX_VERBATIM_SCOPE: usize = 128;

/// The header the default scope reads.
pub const CLIENT_ID_HEADER: &str = "x-client-id";

/// The scope of callers that do not identify themselves.
pub const ANONYMOUS_SCOPE: &str = "anonymous";

/// Whether a route demands an `Idempotency-Key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyPolicy {
    /// Requests without a key run in a transaction, unrecorded.
    #[default]
    Optional,
    /// Requests without a key are answered 400.
    Required,
}

/// Configuration of an [`IdempotencyLayer`](super::IdempotencyLayer).
///
/// Build it with [`IdempotencyConfig::new`] and the builder methods; the
/// fields are public for inspection and struct-update syntax.
#[derive(Clone)]
pub struct IdempotencyConfig {
    /// Where the handler's transaction runs and the records live.
    pub db: Db,
    /// Is the key mandatory?
    pub key_policy: KeyPolicy,
    /// How long a completed record is replayed (default 24 h).
    pub ttl: Duration,
    /// Largest request body buffered for the fingerprint; larger ones are
    /// answered 413 when they carry a key (default 1 MiB).
    pub max_body_bytes: usize,
    /// The caller's identity (default: [`client_id_scope`]). In production,
    /// derive it from the authenticated principal: `X-Client-Id` is asserted
    /// by the caller itself.
    pub scope: ScopeFn,
    /// `Retry-After` sent with the 409 for a request in flight (default 1 s,
    /// rounded up to whole seconds).
    pub in_flight_retry_after: Duration,
    /// Postgres: run the handler before the key is claimed, and the writes
    /// it hands to [`Tx::write`](super::Tx::write) with the key's record as
    /// one statement (default off). See [`IdempotencyConfig::handler_first`].
    pub handler_first: bool,
}

impl IdempotencyConfig {
    /// Optional keys, 24 h ttl, 1 MiB bodies, `X-Client-Id` scope, 1 s retry.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            key_policy: KeyPolicy::Optional,
            ttl: Duration::from_secs(24 * 60 * 60),
            max_body_bytes: 1024 * 1024,
            scope: client_id_scope(),
            in_flight_retry_after: Duration::from_secs(1),
            handler_first: false,
        }
    }

    /// Sets the key policy.
    pub fn key_policy(mut self, policy: KeyPolicy) -> Self {
        self.key_policy = policy;
        self
    }

    /// Sets how long completed records are replayed.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the largest request body accepted with a key.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Sets how the caller is identified (`None`: anonymous). Whatever
    /// string it returns is an identity of its own: `Some("anonymous")` does
    /// not join the anonymous callers, and any length is accepted (long ones
    /// are stored hashed).
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.scope = Arc::new(move |parts: &Parts| Ok(scope(parts)));
        self
    }

    /// Sets how the caller is identified, with the right to refuse a request
    /// whose identity cannot be used (answer the `Err` problem, a 400 say).
    pub fn try_scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Result<Option<String>, Problem> + Send + Sync + 'static,
    {
        self.scope = Arc::new(scope);
        self
    }

    /// On Postgres, for a request with a key in a transaction of its own (not
    /// in a batch): run the handler first, and claim the key after it, with
    /// its writes, in one round trip to the database.
    ///
    /// The usual order is the key first: begin, look the key up under its
    /// lock, run the handler only if the key is new, insert the record,
    /// commit (five round trips around the handler's own statements). With
    /// `handler_first`, the handler runs with nothing begun, hands its writes
    /// to [`Tx::write`](super::Tx::write), and the layer runs them and the
    /// record as one statement that commits on its own. A key that is
    /// already answered, in flight, or expired makes that statement fail
    /// with nothing kept, and the request then runs the usual way, so
    /// answers are the same as without it. A handler that calls
    /// [`Tx::lock`](super::Tx::lock) claims the key there, as the usual order
    /// would have, and continues the usual way.
    ///
    /// What changes for the handler: it may run for a request whose key is
    /// answered already (its answer is then replaced by the stored one), and
    /// it may run twice for one request (once more the usual way). So it
    /// must have no effect outside its writes, other than through
    /// [`Tx::after_commit`](super::Tx::after_commit) hooks, which run only
    /// for the run that committed. SQLite ignores the setting: its write
    /// transaction is the lock, and it has no round trips to save.
    pub fn handler_first(mut self, on: bool) -> Self {
        self.handler_first = on;
        self
    }

    /// Sets the `Retry-After` of the in-flight 409.
    pub fn in_flight_retry_after(mut self, after: Duration) -> Self {
        self.in_flight_retry_after = after;
        self
    }

    pub(crate) fn retry_after_secs(&self) -> u64 {
        let d = self.in_flight_retry_after;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        secs.max(1)
    }

    pub(crate) fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// The stored scope of a request, or the problem that refuses it.
    pub(crate) fn scope_of(&self, parts: &Parts) -> Result<String, Problem> {
        Ok(match (self.scope)(parts)? {
            Some(identity) => scope_key(&identity),
            None => ANONYMOUS_SCOPE.to_string(),
        })
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("backend", &self.db.backend())
            .field("key_policy", &self.key_policy)
            .field("ttl", &self.ttl)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("in_flight_retry_after", &self.in_flight_retry_after)
            .field("handler_first", &self.handler_first)
            .finish_non_exhaustive()
    }
}

/// The stored form of an identity. Plain identities (visible ASCII and
/// spaces, no `:`, at most [`MAX_VERBATIM_SCOPE`] bytes, not the word
/// `anonymous`) are stored as they are, which keeps records readable and
/// stable across versions; every other identity is stored as `sha256:`
/// followed by the hex digest of its UTF-8 bytes. The two forms cannot meet
/// (only digests contain `:`), and neither is [`ANONYMOUS_SCOPE`].
pub fn scope_key(identity: &str) -> String {
    let plain = identity.len() <= MAX_VERBATIM_SCOPE
        && identity != ANONYMOUS_SCOPE
        && identity
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b':');
    if plain {
        identity.to_string()
    } else {
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(identity.as_bytes()))
        )
    }
}

fn invalid_client_id(detail: &str) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid client id")
        .kind("invalid-client-id")
        .detail(format!("X-Client-Id {detail}"))
}

/// The default scope: the `X-Client-Id` header, or anonymous when it is
/// absent. The header must appear once and hold UTF-8 text, not blank and
/// without control characters (surrounding spaces are ignored); anything
/// else is refused with a 400, never mistaken for another caller or for
/// the anonymous one. Any non-blank UTF-8 identity of any length is its own
/// scope (see [`scope_key`]).
///
/// The header is asserted by the caller itself: it separates honest
/// clients, it does not authenticate them. Behind an authenticating proxy
/// that sets (or strips) it, it is an identity; see the README.
pub fn client_id_scope() -> ScopeFn {
    Arc::new(|parts: &Parts| {
        let mut values = parts.headers.get_all(CLIENT_ID_HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(invalid_client_id("must appear once"));
        }
        let Ok(id) = std::str::from_utf8(value.as_bytes()) else {
            return Err(invalid_client_id("must be UTF-8 text"));
        };
        let id = id.trim();
        if id.is_empty() {
            return Err(invalid_client_id("must not be blank"));
        }
        if id.chars().any(char::is_control) {
            return Err(invalid_client_id("must not contain control characters"));
        }
        Ok(Some(id.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(values: &[&[u8]]) -> Result<Option<String>, u16> {
        let mut req = http::Request::builder();
        for v in values {
            req = req.header(CLIENT_ID_HEADER, http::HeaderValue::from_bytes(v).unwrap());
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        client_id_scope()(&parts)
            .map(|id| id.map(|i| scope_key(&i)))
            .map_err(|p| p.status().as_u16())
    }

    #[test]
    fn identities_never_share_a_scope() {
        let ids: [&[u8]; 7] = [
            "jürgen".as_bytes(),
            "müller".as_bytes(),
            b"anonymous",
            b"order-service",
            b"sha256:abc",
            b"a:b",
            b"x",
        ];
        let mut seen = vec![Ok(None)];
        for id in ids {
            let s = scope(&[id]);
            assert!(matches!(s, Ok(Some(_))), "{s:?}");
            assert!(!seen.contains(&s), "{s:?} shared");
            assert_ne!(s, Ok(Some(ANONYMOUS_SCOPE.to_string())));
            seen.push(s);
        }
        assert_eq!(scope(&[]), Ok(None));
        // Stable for plain identities, which stay readable.
        assert_eq!(scope(&[b"order-service"]), Ok(Some("order-service".into())));
    }

    #[test]
    fn long_identities_are_hashed() {
        let long = "é".repeat(5000);
        let Ok(Some(s)) = scope(&[long.as_bytes()]) else {
            panic!("refused");
        };
        assert!(s.len() < 100, "{s}");
        assert_eq!(scope(&[long.as_bytes()]), Ok(Some(s)));
    }

    #[test]
    fn unusable_identities_are_refused() {
        for bad in [
            &b""[..],
            b"   ",
            b"\xff\xfe",
            b"a\tb",
            "a\u{85}b".as_bytes(),
        ] {
            assert_eq!(scope(&[bad]), Err(400), "{bad:?}");
        }
        assert_eq!(scope(&[b"a", b"b"]), Err(400));
    }
}
