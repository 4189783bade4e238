//! Service-to-service request signing: HMAC-SHA256 over the method, the path
//! and query, a timestamp, a nonce, chosen headers and the SHA-256 of the
//! body, in the manner of webhook providers (Stripe, GitHub, Standard
//! Webhooks).
//!
//! - Client side: [`SignRequestLayer`] signs every `http::Request<Bytes>` at
//!   the moment it is sent. Put it below any retry loop, so that every
//!   attempt (an outbox retry an hour later included) carries a fresh
//!   timestamp, a fresh nonce and a valid signature.
//! - Server side: [`Verifier`] checks a request; with the `axum` feature,
//!   [`VerifySignatureLayer`] answers `401` problem+json (with
//!   `WWW-Authenticate: Service-HMAC-SHA256 ...`) before the handler runs when
//!   the signature is missing, malformed, stale, wrong or replayed, and `413`
//!   when the body is larger than the route accepts.
//!
//! # The scheme (`v1`)
//!
//! Three headers travel with a signed request:
//!
//! | header | value |
//! |---|---|
//! | `x-service-timestamp` | Unix time in seconds when the request was signed |
//! | `x-service-nonce` | 16 to 64 characters of `[A-Za-z0-9_-]`, unique per request (the signer sends 128 random bits as 32 hex digits) |
//! | `x-service-signature` | `v1=` and the lowercase hex HMAC-SHA256 of the canonical string |
//!
//! The canonical string is these lines joined by `\n` (no trailing newline):
//!
//! ```text
//! v1
//! <METHOD>
//! <path and query, exactly as sent, e.g. /orders/0190…/shipment-events>
//! <timestamp>
//! <nonce>
//! idempotency-key:<value, or empty>
//! x-client-id:<value, or empty>
//! <lowercase hex SHA-256 of the body>
//! ```
//!
//! The signed header lines are [`DEFAULT_SIGNED_HEADERS`] unless both sides
//! are configured otherwise; several values of one header are joined by `,`.
//! No field can contain a newline (header values, methods and URIs cannot),
//! so the string is unambiguous. The host is not signed, so a proxy may
//! rewrite it; a proxy must not rewrite the path or query.
//!
//! # What the verifier checks, in order
//!
//! 1. The three headers are present and well formed (else 401).
//! 2. The timestamp is within the window (default 300 s) of the verifier's
//!    clock, in either direction (else 401: stale).
//! 3. The body is read, at most `max_body_bytes` (else 413).
//! 4. The signature matches the canonical string under one of the accepted
//!    secrets, compared in constant time with [`hmac::Mac::verify_slice`]
//!    (else 401). Several secrets make rotation possible: the first signs,
//!    all verify.
//! 5. The nonce was not seen within the window (else 401: replayed). The
//!    replay cache is in memory, per process, bounded; only requests that
//!    passed step 4 enter it, so an unauthenticated caller cannot fill it.
//!    Across replicas a request could be replayed once per replica within
//!    the window: there the window and the idempotency key (which is signed)
//!    are the guard. A cache at capacity drops its oldest entries and
//!    refuses, with 503 and `Retry-After`, requests no newer than what it
//!    dropped, so a replay is never let through by an eviction.

mod layer;
#[cfg(feature = "axum")]
mod verify_layer;

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};

pub use layer::{SignRequest, SignRequestLayer};
#[cfg(feature = "axum")]
pub use verify_layer::{VerifySignature, VerifySignatureLayer};

type HmacSha256 = Hmac<Sha256>;

/// The scheme name, as sent in `WWW-Authenticate`.
pub const SCHEME: &str = "Service-HMAC-SHA256";
/// The `WWW-Authenticate` challenge of a refused request.
pub const CHALLENGE: &str = "Service-HMAC-SHA256 realm=\"service-to-service\"";
/// The version of the canonical string and of the signature prefix.
pub const VERSION: &str = "v1";
/// Header: Unix seconds when the request was signed.
pub const TIMESTAMP_HEADER: HeaderName = HeaderName::from_static("x-service-timestamp");
/// Header: a value unique to this request.
pub const NONCE_HEADER: HeaderName = HeaderName::from_static("x-service-nonce");
/// Header: `v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-service-signature");
/// Headers whose values are signed unless configured otherwise: the
/// idempotency key and the caller's identity (its idempotency scope), so a
/// captured request cannot be replayed under another key or scope.
pub const DEFAULT_SIGNED_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("x-client-id"),
];
/// The default replay window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// The default number of nonces the replay cache holds.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;
/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

const NONCE_MIN: usize = 16;
const NONCE_MAX: usize = 64;

/// A shared secret. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Wraps a secret (not validated: see [`Secret::validate`]).
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        Self(Arc::from(bytes.as_ref()))
    }

    /// Is it long enough to sign with? (An error never contains the value.)
    pub fn validate(&self) -> Result<(), SecretError> {
        if self.0.is_empty() {
            return Err(SecretError::Empty);
        }
        if self.0.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                len: self.0.len(),
                min: MIN_SECRET_BYTES,
            });
        }
        Ok(())
    }

    /// Is it the empty string?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// HMAC accepts keys of any length, so this never fails in practice;
    /// callers treat a failure as "no signature" (sign) or "no match"
    /// (verify), never as a default key.
    fn mac(&self) -> Option<HmacSha256> {
        HmacSha256::new_from_slice(&self.0).ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// Parsing (of a flag or an environment variable) trims surrounding
/// whitespace and never fails, so it never echoes the value in an error
/// message; check with [`Secret::validate`].
impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s.trim()))
    }
}

/// Why a secret or a verifier configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No secret configured.
    #[error("no secret configured")]
    Missing,
    /// An empty secret.
    #[error("a secret is empty")]
    Empty,
    /// A secret shorter than [`MIN_SECRET_BYTES`].
    #[error("a secret is {len} bytes long; at least {min} are required")]
    TooShort {
        /// Its length.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A zero replay window.
    #[error("the replay window must be longer than zero")]
    ZeroWindow,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A signature header is absent.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// A signature header is not in the expected form.
    #[error("malformed {0} header")]
    Malformed(&'static str),
    /// The signature is of a version this verifier does not know.
    #[error("unsupported signature version (expected {VERSION}=<hex>)")]
    UnsupportedVersion,
    /// The timestamp is outside the window.
    #[error("timestamp outside the {window_secs} s window (clock skew or a replay)")]
    Stale {
        /// The window, in seconds.
        window_secs: u64,
    },
    /// The signature does not match under any accepted secret.
    #[error("signature does not match")]
    Mismatch,
    /// The nonce was already used within the window.
    #[error("nonce already used (a replayed request)")]
    Replayed,
    /// The replay cache is full and cannot prove this request fresh.
    #[error("too many signed requests to check for replays; retry with a fresh signature")]
    Saturated,
}

impl VerifyError {
    /// Is it the caller's credentials (401), rather than this server's
    /// capacity ([`VerifyError::Saturated`], 503)?
    pub fn is_unauthorized(&self) -> bool {
        !matches!(self, VerifyError::Saturated)
    }
}

/// Lowercase hex SHA-256 of a body.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The canonical string that is signed (see the [module docs](self)).
pub fn canonical_string(
    method: &Method,
    path_and_query: &str,
    timestamp: &str,
    nonce: &str,
    headers: &HeaderMap,
    signed_headers: &[HeaderName],
    body: &[u8],
) -> Vec<u8> {
    let mut s = Vec::with_capacity(256 + path_and_query.len());
    for part in [VERSION, method.as_str(), path_and_query, timestamp, nonce] {
        s.extend_from_slice(part.as_bytes());
        s.push(b'\n');
    }
    for name in signed_headers {
        s.extend_from_slice(name.as_str().as_bytes());
        s.push(b':');
        for (i, v) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                s.push(b',');
            }
            s.extend_from_slice(v.as_bytes());
        }
        s.push(b'\n');
    }
    s.extend_from_slice(body_hash(body).as_bytes());
    s
}

fn path_and_query(uri: &http::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn valid_nonce(n: &str) -> bool {
    (NONCE_MIN..=NONCE_MAX).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Signs outgoing requests with one secret.
#[derive(Debug, Clone)]
pub struct Signer {
    secret: Secret,
    signed_headers: Arc<[HeaderName]>,
}

impl Signer {
    /// A signer; the secret must pass [`Secret::validate`].
    pub fn new(secret: Secret) -> Result<Self, SecretError> {
        secret.validate()?;
        Ok(Self {
            secret,
            signed_headers: Arc::from(DEFAULT_SIGNED_HEADERS.as_slice()),
        })
    }

    /// Signs these headers instead of [`DEFAULT_SIGNED_HEADERS`] (the
    /// verifier must be told the same list).
    pub fn signed_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.signed_headers = names.into_iter().collect();
        self
    }

    /// Signs a request now, with a fresh random nonce: sets (replacing) the
    /// timestamp, nonce and signature headers.
    pub fn sign(&self, method: &Method, uri: &http::Uri, headers: &mut HeaderMap, body: &[u8]) {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        self.sign_with(method, uri, headers, body, unix_now(), &nonce);
    }

    /// Signs with a given timestamp and nonce (tests, or a caller with its
    /// own clock). A nonce outside `[A-Za-z0-9_-]{16,64}` will be refused by
    /// the verifier.
    pub fn sign_with(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &mut HeaderMap,
        body: &[u8],
        timestamp: u64,
        nonce: &str,
    ) {
        let ts = timestamp.to_string();
        let canonical = canonical_string(
            method,
            path_and_query(uri),
            &ts,
            nonce,
            headers,
            &self.signed_headers,
            body,
        );
        headers.insert(TIMESTAMP_HEADER, HeaderValue::from(timestamp));
        match HeaderValue::from_str(nonce) {
            Ok(v) => {
                headers.insert(NONCE_HEADER, v);
            }
            Err(_) => {
                headers.remove(NONCE_HEADER);
            }
        }
        match self
            .signature(&canonical)
            .and_then(|sig| HeaderValue::from_str(&sig).ok())
        {
            Some(v) => {
                headers.insert(SIGNATURE_HEADER, v);
            }
            None => {
                headers.remove(SIGNATURE_HEADER);
            }
        }
    }

    /// `v1=<hex HMAC-SHA256>` of a canonical string.
    pub fn signature(&self, canonical: &[u8]) -> Option<String> {
        let mut mac = self.secret.mac()?;
        mac.update(canonical);
        Some(format!(
            "{VERSION}={}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }
}

/// Settings of a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Accepted secrets (the signer's first; others during a rotation).
    pub secrets: Vec<Secret>,
    /// How far a timestamp may be from the verifier's clock, either way.
    pub window: Duration,
    /// Nonces remembered at most (see the module docs on saturation).
    pub replay_capacity: usize,
    /// Largest body read to verify it (larger: 413).
    pub max_body_bytes: usize,
    /// Headers included in the canonical string.
    pub signed_headers: Vec<HeaderName>,
}

impl VerifierConfig {
    /// Defaults: 300 s window, 100 000 nonces, 1 MiB bodies.
    pub fn new(secrets: impl IntoIterator<Item = Secret>) -> Self {
        Self {
            secrets: secrets.into_iter().collect(),
            window: DEFAULT_WINDOW,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
            max_body_bytes: 1024 * 1024,
            signed_headers: DEFAULT_SIGNED_HEADERS.to_vec(),
        }
    }

    /// Sets the replay window.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets the replay cache's capacity.
    pub fn replay_capacity(mut self, n: usize) -> Self {
        self.replay_capacity = n.max(1);
        self
    }

    /// Sets the largest body read.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }
}

/// Checks signed requests; clones share one replay cache.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    secrets: Vec<Secret>,
    window: u64,
    max_body_bytes: usize,
    signed_headers: Vec<HeaderName>,
    replay: Mutex<ReplayCache>,
}

/// What [`Verifier::check_headers`] read; pass it on to
/// [`Verifier::check_body`].
#[derive(Debug, Clone)]
pub struct SignedParts {
    timestamp: u64,
    nonce: String,
    signature: [u8; 32],
}

impl Verifier {
    /// A verifier; at least one secret, each valid, and a non-zero window.
    pub fn new(cfg: VerifierConfig) -> Result<Self, SecretError> {
        if cfg.secrets.is_empty() {
            return Err(SecretError::Missing);
        }
        for s in &cfg.secrets {
            s.validate()?;
        }
        let window = cfg.window.as_secs();
        if window == 0 {
            return Err(SecretError::ZeroWindow);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                secrets: cfg.secrets,
                window,
                max_body_bytes: cfg.max_body_bytes,
                signed_headers: cfg.signed_headers,
                replay: Mutex::new(ReplayCache::new(cfg.replay_capacity)),
            }),
        })
    }

    /// The largest body it reads.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }

    /// Step 1 and 2: the headers are there, well formed, and the timestamp
    /// is within the window of `now` (Unix seconds). Cheap; no body needed.
    pub fn check_headers(&self, headers: &HeaderMap, now: u64) -> Result<SignedParts, VerifyError> {
        let text = |name: &HeaderName, label: &'static str| -> Result<String, VerifyError> {
            let mut values = headers.get_all(name).iter();
            let v = values.next().ok_or(VerifyError::Missing(label))?;
            if values.next().is_some() {
                return Err(VerifyError::Malformed(label));
            }
            v.to_str()
                .map(|s| s.trim().to_string())
                .map_err(|_| VerifyError::Malformed(label))
        };
        let ts = text(&TIMESTAMP_HEADER, "x-service-timestamp")?;
        if ts.is_empty() || ts.len() > 12 || !ts.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VerifyError::Malformed("x-service-timestamp"));
        }
        let timestamp: u64 = ts
            .parse()
            .map_err(|_| VerifyError::Malformed("x-service-timestamp"))?;
        let nonce = text(&NONCE_HEADER, "x-service-nonce")?;
        if !valid_nonce(&nonce) {
            return Err(VerifyError::Malformed("x-service-nonce"));
        }
        let sig = text(&SIGNATURE_HEADER, "x-service-signature")?;
        let (version, hexsig) = sig
            .split_once('=')
            .ok_or(VerifyError::Malformed("x-service-signature"))?;
        if version != VERSION {
            return Err(VerifyError::UnsupportedVersion);
        }
        let mut signature = [0u8; 32];
        hex::decode_to_slice(hexsig, &mut signature)
            .map_err(|_| VerifyError::Malformed("x-service-signature"))?;
        if timestamp.abs_diff(now) > self.inner.window {
            return Err(VerifyError::Stale {
                window_secs: self.inner.window,
            });
        }
        Ok(SignedParts {
            timestamp,
            nonce,
            signature,
        })
    }

    /// Steps 4 and 5: the signature matches the request under an accepted
    /// secret (constant-time), and the nonce is new. Only then is the nonce
    /// remembered.
    pub fn check_body(
        &self,
        parts: &SignedParts,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<(), VerifyError> {
        self.check_body_in(parts, method, uri, headers, body, now, None)
    }

    /// [`Verifier::check_body`] for a sub-request of a batch: a nonce
    /// admitted in the batch's first run is let through once more when the
    /// batch runs its sub-requests again one by one (see [`BatchNonces`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_body_in(
        &self,
        parts: &SignedParts,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: u64,
        batch: Option<&BatchNonces>,
    ) -> Result<(), VerifyError> {
        let canonical = canonical_string(
            method,
            path_and_query(uri),
            &parts.timestamp.to_string(),
            &parts.nonce,
            headers,
            &self.inner.signed_headers,
            body,
        );
        let matched = self.inner.secrets.iter().any(|secret| {
            secret.mac().is_some_and(|mut mac| {
                mac.update(&canonical);
                mac.verify_slice(&parts.signature).is_ok()
            })
        });
        if !matched {
            return Err(VerifyError::Mismatch);
        }
        let nonce_id = nonce_id(&parts.nonce);
        if let Some(batch) = batch {
            if batch.rerun && batch.consume(nonce_id) {
                // Admitted by this very batch's first run, which rolled back.
                return Ok(());
            }
        }
        let mut cache = self
            .inner
            .replay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.admit(parts.timestamp, nonce_id, now, self.inner.window)?;
        drop(cache);
        if let Some(batch) = batch {
            batch.record(nonce_id);
        }
        Ok(())
    }

    /// The whole check at `now` (Unix seconds), for a buffered request.
    pub fn verify_at(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &[u8],
        now: u64,
    ) -> Result<(), VerifyError> {
        let parts = self.check_headers(headers, now)?;
        self.check_body(&parts, method, uri, headers, body, now)
    }

    /// The whole check now.
    pub fn verify(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        self.verify_at(method, uri, headers, body, unix_now())
    }
}

/// The nonces one batch admitted, in the extensions of its sub-requests
/// (in-process only: a client cannot send one).
///
/// A batch whose shared transaction rolls back runs its sub-requests again,
/// one by one, with the same signed headers. Their nonces are in the replay
/// cache by then, so the second run would be refused as a replay. The first
/// run records each nonce it admitted; the second run lets each recorded
/// nonce through **once** (and removes it), and checks every other nonce as
/// usual: a request that never passed the first run, or a copy of one
/// within the same batch, is still refused as a replay.
#[derive(Debug, Clone, Default)]
pub struct BatchNonces {
    admitted: Arc<Mutex<HashSet<u128>>>,
    rerun: bool,
}

impl BatchNonces {
    /// An empty record for a batch's first run.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same record, for the run again after a rollback.
    pub fn for_rerun(&self) -> Self {
        Self {
            admitted: self.admitted.clone(),
            rerun: true,
        }
    }

    fn record(&self, nonce: u128) {
        if !self.rerun {
            self.lock().insert(nonce);
        }
    }

    fn consume(&self, nonce: u128) -> bool {
        self.lock().remove(&nonce)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u128>> {
        self.admitted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn nonce_id(nonce: &str) -> u128 {
    let digest = Sha256::digest(nonce.as_bytes());
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// Nonces seen within the window, oldest timestamp first.
struct ReplayCache {
    seen: HashSet<u128>,
    by_time: BTreeSet<(u64, u128)>,
    /// Requests with a timestamp at or below this were evicted unexpired:
    /// they can no longer be proved fresh.
    floor: Option<u64>,
    capacity: usize,
}

impl fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("len", &self.seen.len())
            .field("capacity", &self.capacity)
            .field("floor", &self.floor)
            .finish()
    }
}

impl ReplayCache {
    fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::new(),
            by_time: BTreeSet::new(),
            floor: None,
            capacity: capacity.max(1),
        }
    }

    fn admit(&mut self, ts: u64, id: u128, now: u64, window: u64) -> Result<(), VerifyError> {
        // Entries older than the window can be forgotten: their requests are
        // refused as stale anyway.
        let oldest_fresh = now.saturating_sub(window);
        while let Some(&(t, old)) = self.by_time.first() {
            if t >= oldest_fresh {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&old);
        }
        if self.floor.is_some_and(|f| f < oldest_fresh) {
            self.floor = None;
        }
        if self.seen.contains(&id) {
            return Err(VerifyError::Replayed);
        }
        if self.floor.is_some_and(|f| ts <= f) {
            return Err(VerifyError::Saturated);
        }
        if self.seen.len() >= self.capacity {
            match self.by_time.first() {
                Some(&(t, _)) if ts <= t => return Err(VerifyError::Saturated),
                Some(&(t, old)) => {
                    self.by_time.pop_first();
                    self.seen.remove(&old);
                    self.floor = Some(self.floor.map_or(t, |f| f.max(t)));
                }
                None => {}
            }
        }
        self.seen.insert(id);
        self.by_time.insert((ts, id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_cache_refuses_repeats_and_never_forgets_unexpired_silently() {
        let mut c = ReplayCache::new(2);
        assert_eq!(c.admit(100, 1, 100, 300), Ok(()));
        assert_eq!(c.admit(100, 1, 100, 300), Err(VerifyError::Replayed));
        assert_eq!(c.admit(101, 2, 101, 300), Ok(()));
        // Full: the oldest (ts 100) goes, and ts <= 100 can no longer be proved fresh.
        assert_eq!(c.admit(102, 3, 102, 300), Ok(()));
        assert_eq!(c.admit(100, 1, 102, 300), Err(VerifyError::Saturated));
        assert_eq!(c.admit(100, 9, 102, 300), Err(VerifyError::Saturated));
        // A newer request is fine, and an older-than-everything one is refused.
        assert_eq!(c.admit(103, 4, 103, 300), Ok(()));
        // After the window everything expires, the floor too.
        assert_eq!(c.admit(1000, 1, 1000, 300), Ok(()));
        assert!(c.floor.is_none());
        assert_eq!(c.seen.len(), 1);
    }
}
