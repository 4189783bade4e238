//! The server-side layer: refuse unsigned requests before the handler.

use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{OriginalUri, Request};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http::{header, HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use super::{unix_now, Verifier, VerifyError, CHALLENGE};
use crate::problem::Problem;

/// Wraps axum routes in [`VerifySignature`].
#[derive(Debug, Clone)]
pub struct VerifySignatureLayer {
    verifier: Verifier,
}

impl VerifySignatureLayer {
    /// Verifies with `verifier` (clones share its replay cache).
    pub fn new(verifier: Verifier) -> Self {
        Self { verifier }
    }
}

impl<S> Layer<S> for VerifySignatureLayer {
    type Service = VerifySignature<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifySignature {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// Lets a request through only if it is signed (see the
/// [module docs](super)); otherwise answers problem+json without calling
/// the inner service: 401 with `WWW-Authenticate`, 413 for a body over the
/// verifier's limit, 503 with `Retry-After` when the replay cache is
/// saturated. The body is buffered (up to the limit) and handed on intact.
#[derive(Debug, Clone)]
pub struct VerifySignature<S> {
    inner: S,
    verifier: Verifier,
}

impl<S> Service<Request> for VerifySignature<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            match verified(&verifier, req).await {
                Ok(req) => inner.call(req).await,
                Err(res) => Ok(res),
            }
        })
    }
}

async fn verified(verifier: &Verifier, req: Request) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let limit = verifier.max_body_bytes();
    // A declared length over the limit is refused before anything else.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let now = unix_now();
    let signed = verifier
        .check_headers(&parts.headers, now)
        .map_err(refused)?;
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(too_large(limit)),
        Err(e) => {
            return Err(
                Problem::bad_request(format!("cannot read the request body: {e}")).into_response(),
            )
        }
    };
    // Nested routers strip their prefix from `uri`; the signature covers the
    // path as the client sent it.
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |o| &o.0);
    let batch = parts.extensions.get::<super::BatchNonces>();
    verifier
        .check_body_in(
            &signed,
            &parts.method,
            uri,
            &parts.headers,
            &bytes,
            now,
            batch,
        )
        .map_err(refused)?;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

fn too_large(limit: usize) -> Response {
    Problem::too_large(limit).into_response()
}

fn refused(e: VerifyError) -> Response {
    tracing::warn!(reason = %e, "refused a service-to-service request");
    if !e.is_unauthorized() {
        return Problem::unavailable(e.to_string())
            .retry_after(1)
            .into_response();
    }
    let mut res = Problem::new(StatusCode::UNAUTHORIZED, "invalid service signature")
        .detail(e.to_string())
        .into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    res
}
