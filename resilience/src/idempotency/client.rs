//! The client-side layer: stamp the key carried by a request extension.

use std::task::{Context, Poll};

use http::{HeaderValue, Request};
use tower::{Layer, Service};

use super::IDEMPOTENCY_KEY;

/// The key to send with an outgoing request, as a request extension. The
/// outbox relay sets it to the message id, so every attempt at one message
/// carries the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub String);

/// Layer of [`SetIdempotencyKey`].
#[derive(Debug, Clone, Copy, Default)]
pub struct IdempotencyKeyLayer {
    _priv: (),
}

impl IdempotencyKeyLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for IdempotencyKeyLayer {
    type Service = SetIdempotencyKey<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetIdempotencyKey { inner }
    }
}

/// Sets `Idempotency-Key` from the request's [`IdempotencyKey`] extension
/// (as a bare token, which servers here also accept quoted). Requests
/// without the extension pass untouched; an existing header is never
/// overwritten.
#[derive(Debug, Clone)]
pub struct SetIdempotencyKey<S> {
    inner: S,
}

impl<S> SetIdempotencyKey<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<Request<B>> for SetIdempotencyKey<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if !req.headers().contains_key(IDEMPOTENCY_KEY) {
            if let Some(IdempotencyKey(key)) = req.extensions().get::<IdempotencyKey>() {
                match HeaderValue::from_str(key) {
                    Ok(v) => {
                        req.headers_mut().insert(IDEMPOTENCY_KEY, v);
                    }
                    Err(_) => tracing::warn!(
                        "idempotency key is not a valid header value; sending without it"
                    ),
                }
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    async fn stamped(req: Request<()>) -> Option<String> {
        let svc = IdempotencyKeyLayer::new().layer(service_fn(|r: Request<()>| async move {
            Ok::<_, Infallible>(
                r.headers()
                    .get(IDEMPOTENCY_KEY)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            )
        }));
        svc.oneshot(req).await.unwrap_or_else(|e| match e {})
    }

    #[tokio::test]
    async fn stamps_only_from_the_extension_and_never_overwrites() {
        let mut req = Request::new(());
        req.extensions_mut().insert(IdempotencyKey("msg-1".into()));
        assert_eq!(stamped(req).await.as_deref(), Some("msg-1"));

        assert_eq!(stamped(Request::new(())).await, None);

        let mut req = Request::new(());
        req.extensions_mut().insert(IdempotencyKey("msg-1".into()));
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("mine"));
        assert_eq!(stamped(req).await.as_deref(), Some("mine"));
    }
}
