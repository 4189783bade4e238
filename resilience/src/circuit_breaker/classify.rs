//! Outcome classification.

use std::error::Error;
use std::fmt;

use http::StatusCode;
use tower::BoxError;

use super::error::CircuitOpen;
#[cfg(feature = "client")]
use crate::client::ClientError;
#[cfg(feature = "fault")]
use crate::fault::InjectedFault;

/// How a call's result counts for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Counts towards the failure rate.
    Failure,
    /// Counts as a healthy call.
    Success,
    /// Not recorded at all (e.g. a rejection by an inner breaker, or a
    /// caller-side error that says nothing about the peer).
    Ignored,
}

/// Decides the [`Outcome`] of a call.
///
/// The breaker service boxes the inner error first, so `Err` is
/// `tower::BoxError` for classifiers used with [`CircuitBreaker`](super::CircuitBreaker).
pub trait Classifier<Res, Err> {
    /// Classifies one result.
    fn classify(&self, result: Result<&Res, &Err>) -> Outcome;
}

/// Default classifier for HTTP: responses with status 5xx or 429 are
/// failures, other statuses successes; errors are classified by
/// [`classify_error`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier;

impl<B> Classifier<http::Response<B>, BoxError> for HttpClassifier {
    #[inline]
    fn classify(&self, result: Result<&http::Response<B>, &BoxError>) -> Outcome {
        match result {
            Ok(resp) => classify_status(resp.status()),
            Err(e) => classify_error(&**e),
        }
    }
}

/// Any `Ok` is a success, any `Err` a failure.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyErrorClassifier;

impl<Res, Err> Classifier<Res, Err> for AnyErrorClassifier {
    #[inline]
    fn classify(&self, result: Result<&Res, &Err>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        }
    }
}

/// A classifier from a closure.
#[derive(Clone, Copy)]
pub struct FnClassifier<F>(pub F);

impl<F> fmt::Debug for FnClassifier<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnClassifier")
    }
}

impl<F, Res, Err> Classifier<Res, Err> for FnClassifier<F>
where
    F: Fn(Result<&Res, &Err>) -> Outcome,
{
    fn classify(&self, result: Result<&Res, &Err>) -> Outcome {
        (self.0)(result)
    }
}

/// 5xx and 429 are failures; everything else is a success.
#[inline]
pub fn classify_status(status: StatusCode) -> Outcome {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

/// Classifies an error by walking its source chain:
/// a [`CircuitOpen`] (from an inner breaker) is ignored, so is a
/// [`ClientError::Request`] (the request could not even be built: a caller
/// bug, not the peer's health); timeouts (`tower::timeout::error::Elapsed`,
/// [`ClientError::Timeout`]), connect errors, injected faults and any other
/// error are failures.
pub fn classify_error(err: &(dyn Error + 'static)) -> Outcome {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<CircuitOpen>() {
            return Outcome::Ignored;
        }
        #[cfg(feature = "client")]
        if let Some(c) = e.downcast_ref::<ClientError>() {
            return if c.is_request() {
                Outcome::Ignored
            } else {
                Outcome::Failure
            };
        }
        #[cfg(feature = "fault")]
        if e.is::<InjectedFault>() {
            return Outcome::Failure;
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return Outcome::Failure;
        }
        cur = e.source();
    }
    Outcome::Failure
}
