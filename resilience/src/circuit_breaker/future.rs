//! Response future of the circuit breaker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::BoxError;

use super::classify::Classifier;
use super::error::CircuitOpen;
use super::handle::Permit;

pin_project! {
    /// Future of [`CircuitBreaker`](super::CircuitBreaker): either the inner
    /// call, recorded on completion, or an immediate [`CircuitOpen`].
    ///
    /// Dropping it before completion records nothing; a half-open probe
    /// permit it holds is given back.
    pub struct ResponseFuture<F, K> {
        #[pin]
        kind: Kind<F>,
        permit: Option<Permit>,
        classifier: K,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] fut: F },
        Rejected { err: Option<Box<CircuitOpen>> },
    }
}

impl<F, K> ResponseFuture<F, K> {
    pub(crate) fn called(fut: F, permit: Permit, classifier: K) -> Self {
        ResponseFuture {
            kind: Kind::Called { fut },
            permit: Some(permit),
            classifier,
        }
    }

    pub(crate) fn rejected(err: Box<CircuitOpen>, classifier: K) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { err: Some(err) },
            permit: None,
            classifier,
        }
    }
}

impl<F, K> fmt::Debug for ResponseFuture<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("permit", &self.permit)
            .finish()
    }
}

impl<F, K, T, E> Future for ResponseFuture<F, K>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    K: Classifier<T, BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { fut } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(permit) = this.permit.take() {
                    permit.complete(this.classifier.classify(res.as_ref()));
                }
                Poll::Ready(res)
            }
            KindProj::Rejected { err } => Poll::Ready(Err(match err.take() {
                Some(open) => open,
                None => "circuit breaker response future polled after completion".into(),
            })),
        }
    }
}
