//! RFC 9457 problem details (`application/problem+json`): the one shape of
//! every error answer the server-side layers (idempotency) produce, exported
//! so an application can answer its own errors the same way.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The media type of a problem answer.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where problem type URIs live: `type` is this followed by a kebab-case
/// slug (`validation`, `idempotency-key-reused`, ...). The URIs identify a
/// kind of problem (RFC 9457 section 3.1.1); they are stable but not meant
/// to be dereferenced.
pub const PROBLEM_TYPE_BASE: &str = "https://reliable-delivery.example/problems/";

/// The default slug of a status: the kind of problem a bare status means.
fn default_slug(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad-request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        408 => "request-timeout",
        409 => "conflict",
        410 => "gone",
        413 => "payload-too-large",
        415 => "unsupported-media-type",
        422 => "validation",
        429 => "too-many-requests",
        500 => "internal",
        503 => "unavailable",
        504 => "timeout",
        s if s >= 500 => "server-error",
        _ => "client-error",
    }
}

/// An RFC 9457 problem details answer.
///
/// Every error a service sends is one of these, so a client can rely on one
/// shape: `type`, `title`, `status`, `detail`.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    #[serde(skip)]
    retry_after: Option<u64>,
}

impl Problem {
    /// A problem with a status and a short, stable title.
    pub fn new(status: StatusCode, title: impl Into<String>) -> Self {
        Self {
            kind: format!("{PROBLEM_TYPE_BASE}{}", default_slug(status)),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
            retry_after: None,
        }
    }

    /// Sets the kind of problem: `type` becomes [`PROBLEM_TYPE_BASE`] followed
    /// by `slug` (by default the slug follows the status).
    pub fn kind(mut self, slug: &str) -> Self {
        self.kind = format!("{PROBLEM_TYPE_BASE}{slug}");
        self
    }

    /// The `type` URI.
    pub fn type_uri(&self) -> &str {
        &self.kind
    }

    /// Adds a human-readable explanation of this occurrence.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds a `Retry-After` header (seconds).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 400 Bad Request.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad request").detail(detail)
    }

    /// 413 Content Too Large: the body passes `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            .detail(format!("the body may be at most {limit} bytes"))
    }

    /// 422 Unprocessable Content.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid request body").detail(detail)
    }

    /// 404 Not Found.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not found").detail(detail)
    }

    /// 409 Conflict.
    pub fn conflict(title: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, title).detail(detail)
    }

    /// 500, without leaking the cause (log it before calling this).
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    /// 503 Service Unavailable.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service unavailable").detail(detail)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

/// Router fallback: an unknown path.
pub async fn not_found() -> Problem {
    Problem::not_found("no such resource")
}

/// Router fallback: a known path with the wrong method.
pub async fn method_not_allowed() -> Problem {
    Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}

/// Logs an unexpected error and answers a bare 500 (the cause stays in the log).
pub fn internal_error<E: std::fmt::Display>(err: E) -> Problem {
    tracing::error!(error = %err, "request failed");
    Problem::internal()
}

/// Seconds a client is told to wait after a transient database failure.
#[cfg(feature = "store")]
pub const DB_RETRY_AFTER_SECS: u64 = 1;

/// Answers a database error: a transient one (a lost connection, an
/// exhausted pool, a lock or serialization failure) is `503` with
/// `Retry-After`, since the same request can succeed in a moment; anything
/// else is a bare 500 (the cause is logged, not sent).
#[cfg(feature = "store")]
pub fn db_error(err: sqlx::Error) -> Problem {
    if crate::store::is_transient(&err) {
        tracing::warn!(error = %err, "database unavailable");
        Problem::unavailable("the database is unavailable; retry later")
            .retry_after(DB_RETRY_AFTER_SECS)
    } else {
        internal_error(err)
    }
}
