use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;

use crate::store::Db;

/// Who is calling: the scope in which a key is unique. `None` means the
/// caller could not be identified; such requests share [`ANONYMOUS_SCOPE`].
pub type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

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

    /// Sets how the caller is identified.
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.scope = Arc::new(scope);
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

    pub(crate) fn scope_of(&self, parts: &Parts) -> String {
        (self.scope)(parts).unwrap_or_else(|| ANONYMOUS_SCOPE.to_string())
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
            .finish_non_exhaustive()
    }
}

/// The default scope: the `X-Client-Id` header when it is present, non-empty
/// visible ASCII, else [`ANONYMOUS_SCOPE`].
pub fn client_id_scope() -> ScopeFn {
    Arc::new(|parts: &Parts| {
        let id = parts
            .headers
            .get(CLIENT_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(ANONYMOUS_SCOPE);
        Some(id.to_string())
    })
}
