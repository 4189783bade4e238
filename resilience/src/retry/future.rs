//! Response future of the retry service.

use std::future::Future;
use std::pin::Pin;

use tower::BoxError;

/// Future of [`Retry`](super::Retry) (boxed: it owns the request, the
/// service and the sleeps between attempts).
pub type ResponseFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;
