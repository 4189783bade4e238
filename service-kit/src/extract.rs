use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

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
        // Content type, size and syntax first, as `axum::Json` checks them.
        let raw = match axum::Json::<Box<RawValue>>::from_request(req, state).await {
            Ok(axum::Json(raw)) => raw,
            Err(rejection) => return Err(json_problem(rejection)),
        };
        // Every body of this API is an object. serde also reads a struct
        // from an array of its fields in order (`[0.5]` as `{"drop_request":
        // 0.5}`, `[]` as all defaults): refuse that form.
        if !raw.get().starts_with('{') {
            return Err(
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid request body")
                    .detail("the request body must be a JSON object"),
            );
        }
        match axum::Json::<T>::from_bytes(raw.get().as_bytes()) {
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

/// `#[serde(deserialize_with = "service_kit::objects")]` for a `Vec` of
/// structs in a request body: each element must be a JSON object. serde
/// would also read a struct from an array of its fields in order
/// (`["A", 1]` as `{"sku": "A", "quantity": 1}`); [`ApiJson`] refuses that
/// form at the top, this refuses it inside.
pub fn objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde::Deserialize;
    let maps = Vec::<serde_json::Map<String, serde_json::Value>>::deserialize(deserializer)?;
    maps.into_iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::from_value(serde_json::Value::Object(m))
                .map_err(|e| serde::de::Error::custom(format_args!("[{i}]: {e}")))
        })
        .collect()
}
