//! Response future of the fault injector.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tower::BoxError;

pub(crate) type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;

pin_project! {
    /// Future of [`Fault`](super::Fault): the inner future untouched when no
    /// fault applies (no allocation), or a boxed fault scenario.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Direct { #[pin] fut: F },
        Faulty { fut: BoxFut<T> },
    }
}

impl<F, T> ResponseFuture<F, T> {
    pub(crate) fn direct(fut: F) -> Self {
        ResponseFuture {
            kind: Kind::Direct { fut },
        }
    }

    pub(crate) fn faulty(fut: BoxFut<T>) -> Self {
        ResponseFuture {
            kind: Kind::Faulty { fut },
        }
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fault::ResponseFuture")
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Direct { fut } => fut.poll(cx).map_err(Into::into),
            KindProj::Faulty { fut } => fut.as_mut().poll(cx),
        }
    }
}
