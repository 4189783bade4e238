//! The client-side layer: sign each request as it is sent.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::Request;
use tower::{Layer, Service};

use super::Signer;

/// Layer of [`SignRequest`].
#[derive(Debug, Clone)]
pub struct SignRequestLayer {
    signer: Signer,
}

impl SignRequestLayer {
    /// Signs with `signer`.
    pub fn new(signer: Signer) -> Self {
        Self { signer }
    }
}

impl<S> Layer<S> for SignRequestLayer {
    type Service = SignRequest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SignRequest {
            inner,
            signer: self.signer.clone(),
        }
    }
}

/// Signs every `http::Request<Bytes>` when it is called: a fresh timestamp
/// and nonce each time, replacing any signature headers already present, so
/// a request that is sent again (a retry) is signed again. Headers set by
/// layers above (the idempotency key) are part of what is signed; layers
/// below must not change the method, path, query, signed headers or body.
#[derive(Debug, Clone)]
pub struct SignRequest<S> {
    inner: S,
    signer: Signer,
}

impl<S> Service<Request<Bytes>> for SignRequest<S>
where
    S: Service<Request<Bytes>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        self.signer
            .sign(&parts.method, &parts.uri, &mut parts.headers, &body);
        self.inner.call(Request::from_parts(parts, body))
    }
}
