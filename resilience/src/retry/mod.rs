//! Retry policy for HTTP calls: full-jitter backoff, Retry-After, retry budget, idempotency rules.

pub mod backoff;
pub mod budget;
pub mod error;
pub mod future;
pub mod layer;

use std::error::Error;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tower::{BoxError, Service, ServiceExt};

pub use backoff::Backoff;
pub use budget::RetryBudget;
pub use future::ResponseFuture;
pub use layer::RetryLayer;

use crate::circuit_breaker::CircuitOpen;
#[cfg(feature = "client")]
use crate::client::ClientError;
#[cfg(feature = "fault")]
use crate::fault::InjectedFault;

/// Header that makes a non-idempotent request safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Parses `Retry-After` (delay-seconds or HTTP-date) relative to `now`.
/// A date in the past gives `Duration::ZERO`; absent or malformed gives `None`.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Safe to send twice: GET, HEAD, PUT, DELETE, OPTIONS, TRACE, or any
/// request carrying an `Idempotency-Key` header.
pub fn is_idempotent<B>(req: &Request<B>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    ) || req.headers().contains_key(IDEMPOTENCY_KEY)
}

/// 5xx and 429.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Transient errors worth retrying (walks the source chain): timeouts
/// (`tower::timeout::error::Elapsed`, [`ClientError::Timeout`]), connect and
/// other transport errors ([`ClientError`] except `Request`), injected faults
/// and [`CircuitOpen`] (after its `retry_after`). Unknown errors: false.
pub fn is_retryable_error(err: &(dyn Error + 'static)) -> bool {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<CircuitOpen>() || e.is::<tower::timeout::error::Elapsed>() {
            return true;
        }
        #[cfg(feature = "fault")]
        if e.is::<InjectedFault>() {
            return true;
        }
        #[cfg(feature = "client")]
        if let Some(c) = e.downcast_ref::<ClientError>() {
            return !c.is_request();
        }
        cur = e.source();
    }
    false
}

/// The request certainly never reached the peer (connect error, injected
/// request drop, circuit open), so even a non-idempotent request may be
/// sent again.
pub fn never_sent(err: &(dyn Error + 'static)) -> bool {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<CircuitOpen>() {
            return true;
        }
        #[cfg(feature = "fault")]
        if e.downcast_ref::<InjectedFault>() == Some(&InjectedFault::RequestDropped) {
            return true;
        }
        #[cfg(feature = "client")]
        if let Some(c) = e.downcast_ref::<ClientError>() {
            return c.is_connect();
        }
        cur = e.source();
    }
    false
}

/// What to do with a result, for callers scheduling their own retries
/// (e.g. the outbox relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered (any status that is not retryable and below 400).
    Success,
    /// Transient failure: try again, not before `after` if given (from
    /// `Retry-After` or a `CircuitOpen`), else after a backoff delay.
    Retry {
        /// Minimum wait demanded by the peer or the breaker.
        after: Option<Duration>,
    },
    /// Permanent failure (4xx other than 429, invalid request, unknown error).
    Fail,
}

/// Classifies a response or an error into a [`Verdict`].
pub fn verdict<B>(
    result: Result<&Response<B>, &(dyn Error + 'static)>,
    now: SystemTime,
) -> Verdict {
    match result {
        Ok(resp) if is_retryable_status(resp.status()) => Verdict::Retry {
            after: parse_retry_after(resp.headers(), now),
        },
        Ok(resp) if resp.status().is_client_error() => Verdict::Fail,
        Ok(_) => Verdict::Success,
        Err(e) => match CircuitOpen::find(e) {
            Some(c) => Verdict::Retry {
                after: Some(c.retry_after()),
            },
            None if is_retryable_error(e) => Verdict::Retry { after: None },
            None => Verdict::Fail,
        },
    }
}

/// When and how often [`Retry`] retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts including the first (>= 1). Default 3.
    pub max_attempts: u32,
    /// Delay between attempts. Default [`Backoff::default`].
    pub backoff: Backoff,
    /// Longest wait honoured for `Retry-After` (capped to this) and for a
    /// [`CircuitOpen`] (if its `retry_after` is longer, give up and return
    /// it). Default 10 s.
    pub max_delay: Duration,
    /// Honour `Retry-After` on 429/5xx. Default true.
    pub honor_retry_after: bool,
    /// Optional shared budget. Default none.
    pub budget: Option<Arc<RetryBudget>>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::default(),
            max_delay: Duration::from_secs(10),
            honor_retry_after: true,
            budget: None,
        }
    }
}

impl RetryPolicy {
    /// Sets `max_attempts`.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the backoff.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Sets `max_delay`.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Sets the budget.
    pub fn budget(mut self, b: Arc<RetryBudget>) -> Self {
        self.budget = Some(b);
        self
    }

    /// The delay before the next attempt, or `None` to stop and return
    /// `result`. `attempts` is the number of attempts made so far.
    pub fn next_delay<B>(
        &self,
        result: &Result<Response<B>, BoxError>,
        attempts: u32,
        idempotent: bool,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let delay = match result {
            Ok(resp) => {
                if !idempotent || !is_retryable_status(resp.status()) {
                    return None;
                }
                let ra = if self.honor_retry_after {
                    parse_retry_after(resp.headers(), SystemTime::now())
                } else {
                    None
                };
                match ra {
                    Some(d) => d.min(self.max_delay),
                    None => self.backoff.delay_for(attempts.saturating_sub(1)),
                }
            }
            Err(e) => {
                if let Some(c) = CircuitOpen::find(&**e) {
                    // Never retry before the breaker lets calls through.
                    if c.retry_after() > self.max_delay {
                        return None;
                    }
                    c.retry_after()
                } else if is_retryable_error(&**e) && (idempotent || never_sent(&**e)) {
                    self.backoff.delay_for(attempts.saturating_sub(1))
                } else {
                    return None;
                }
            }
        };
        if let Some(b) = &self.budget {
            if !b.withdraw() {
                return None;
            }
        }
        Some(delay)
    }
}

/// Retries `http::Request<Bytes>` calls per a [`RetryPolicy`].
///
/// Only requests safe to repeat are retried ([`is_idempotent`]), except
/// that errors proving the request never left ([`never_sent`]) are retried
/// for any method. Retryable outcomes: 5xx/429 responses and
/// [`is_retryable_error`] errors. A [`CircuitOpen`] is retried only after
/// its `retry_after` (and only if that is within `max_delay`). When retries
/// run out, the last response or error is returned as is.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    policy: RetryPolicy,
}

impl<S> Retry<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retry { inner, policy }
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

fn clone_request(req: &Request<Bytes>) -> Request<Bytes> {
    let mut r = Request::new(req.body().clone());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    *r.extensions_mut() = req.extensions().clone();
    r
}

impl<S, B> Service<Request<Bytes>> for Retry<S>
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<Response<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        Box::pin(async move {
            if let Some(b) = &policy.budget {
                b.deposit();
            }
            let idempotent = is_idempotent(&req);
            let mut attempts = 0u32;
            let mut next = Some(req);
            loop {
                let Some(this) = next.take() else {
                    // Unreachable: `next` is refilled before looping.
                    return Err("retry: request consumed".into());
                };
                let keep = clone_request(&this);
                let result = svc.call(this).await.map_err(Into::into);
                attempts += 1;
                match policy.next_delay(&result, attempts, idempotent) {
                    None => return result,
                    Some(delay) => {
                        drop(result);
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        svc.ready().await.map_err(Into::into)?;
                        next = Some(keep);
                    }
                }
            }
        })
    }
}
