use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use resilience::problem::Problem;

/// `axum::Json`, but bad input is answered with a problem: 400 for malformed
/// JSON, 415 for a wrong content type, 413 for an oversized body, 422 for a
/// body of the wrong shape (missing, mistyped or unknown fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_problem(rejection)),
        }
    }
}

fn json_problem(rejection: JsonRejection) -> Problem {
    let status = rejection.status();
    let title = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid request body",
        _ => "malformed request body",
    };
    let problem = Problem::new(status, title);
    let problem = if status == StatusCode::BAD_REQUEST {
        problem.kind("malformed-body")
    } else {
        problem
    };
    problem.detail(rejection.body_text())
}

/// `axum::extract::Query`, answering a malformed query string with a 400 problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(query_problem(rejection)),
        }
    }
}

fn query_problem(rejection: QueryRejection) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid query string")
        .kind("invalid-query")
        .detail(rejection.body_text())
}

/// `axum::extract::Path`, answering a path parameter that cannot be decoded
/// (invalid percent-encoding or UTF-8, wrong type) with a 400 problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => Err(path_problem(rejection)),
        }
    }
}

fn path_problem(rejection: PathRejection) -> Problem {
    let status = rejection.status();
    if status.is_server_error() {
        // A route declared without the parameter: the service's bug.
        return super::internal_error(rejection.body_text());
    }
    Problem::new(status, "invalid path parameter")
        .kind("invalid-path")
        .detail(rejection.body_text())
}
