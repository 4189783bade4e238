//! Circuit breaker: stops calling a failing peer and probes it back to health.
//!
//! # Design
//!
//! - **Closed path is lock-free and allocation-free**: one atomic load to
//!   admit, one `Arc` clone for the permit, and a lock-free ring
//!   ([`window::CountWindow`]) or bucket array ([`window::TimeWindow`]) to
//!   record. The `Mutex` is only taken on state transitions.
//! - **Generations**: every transition bumps a generation; each call is
//!   tagged with the generation it was admitted in, and outcomes from an
//!   earlier generation are dropped (the windows enforce it atomically).
//! - **Half-open** hands out exactly `half_open_permits` probe permits
//!   across all clones (a CAS on a generation-tagged counter). A probe whose
//!   future is dropped gives its permit back. Recovery is judged on the
//!   probes' failure/slow rates; it re-opens as soon as recovery has become
//!   impossible.
//! - **The circuit is checked before the inner service's readiness.** When
//!   the breaker rejects, `poll_ready` returns `Ready(Ok(()))` without
//!   polling the inner service, and the next `call` returns a future that
//!   resolves immediately to a [`CircuitOpen`] error. Rejections are thus
//!   per-request errors: a `tower::buffer::Buffer` in front stays usable
//!   (a `poll_ready` error would kill it), and a retry layer above sees a
//!   normal error it can inspect. If `poll_ready` is called again before
//!   `call`, the admission is re-evaluated. [`PerAuthority`] learns the
//!   destination only in `call`: it checks that destination's circuit there,
//!   and an admitted request waits for a clone of the inner service to be
//!   ready inside its future.
//! - Time-based transitions (open → half-open, half-open maximum wait) are
//!   made lazily by the next admission; there is no background task.
//!
//! Errors are `tower::BoxError`; find a rejection with
//! `err.downcast_ref::<CircuitOpen>()` or [`CircuitOpen::find`].

pub mod classify;
pub mod clock;
pub mod config;
pub mod error;
pub mod future;
pub mod handle;
pub mod layer;
pub mod registry;
pub mod window;

use std::task::{Context, Poll};

use tower::{BoxError, Service};

pub use classify::{
    classify_error, classify_status, AnyErrorClassifier, Classifier, FnClassifier, HttpClassifier,
    Outcome,
};
pub use clock::{Clock, CoarseAnchor, ManualClock, SystemClock, TokioClock};
pub use config::{
    CircuitBreakerConfig, CircuitBreakerConfigBuilder, HalfOpenExpiry, OpenDuration, SlidingWindow,
    StateListener,
};
pub use error::{CircuitOpen, ConfigError};
pub use future::ResponseFuture;
pub use handle::{BreakerHandle, CallPermit, Snapshot, State, StateChange};
pub use layer::CircuitBreakerLayer;
pub use registry::{BreakerRegistry, PerAuthority, PerAuthorityFuture, PerAuthorityLayer};

use handle::Permit;

enum Admission {
    Permit(Permit),
    /// Boxed once, here: it becomes the call's `BoxError` as is, and keeps
    /// this enum (moved on every call) two words long.
    Rejected(Box<CircuitOpen>),
}

/// A service guarded by a circuit breaker. See the [module docs](self).
pub struct CircuitBreaker<S, K = HttpClassifier> {
    inner: S,
    handle: BreakerHandle,
    classifier: K,
    admitted: Option<Admission>,
}

impl<S, K> CircuitBreaker<S, K> {
    /// Wraps `inner` with the breaker `handle`.
    pub fn new(inner: S, handle: BreakerHandle, classifier: K) -> Self {
        CircuitBreaker {
            inner,
            handle,
            classifier,
            admitted: None,
        }
    }

    /// The shared breaker.
    pub fn handle(&self) -> &BreakerHandle {
        &self.handle
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K: Clone> Clone for CircuitBreaker<S, K> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            handle: self.handle.clone(),
            classifier: self.classifier.clone(),
            admitted: None,
        }
    }
}

impl<S: std::fmt::Debug, K> std::fmt::Debug for CircuitBreaker<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("handle", &self.handle)
            .finish()
    }
}

impl<S, K, Req> Service<Req> for CircuitBreaker<S, K>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Classifier<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, K>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if !matches!(self.admitted, Some(Admission::Permit(_))) {
            match self.handle.shared.try_acquire() {
                Ok(p) => self.admitted = Some(Admission::Permit(p)),
                Err(e) => {
                    self.admitted = Some(Admission::Rejected(Box::new(e)));
                    return Poll::Ready(Ok(()));
                }
            }
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                self.admitted = None;
                Poll::Ready(Err(e.into()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let admitted = match self.admitted.take() {
            Some(a) => a,
            // `call` without `poll_ready` breaks the Service contract; admit
            // now so the breaker's bookkeeping stays right.
            None => match self.handle.shared.try_acquire() {
                Ok(p) => Admission::Permit(p),
                Err(e) => Admission::Rejected(Box::new(e)),
            },
        };
        match admitted {
            Admission::Permit(p) => {
                ResponseFuture::called(self.inner.call(req), p, self.classifier.clone())
            }
            Admission::Rejected(e) => ResponseFuture::rejected(e, self.classifier.clone()),
        }
    }
}
