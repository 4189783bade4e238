//! The parts of the OpenAPI 3.1 documents both services share: the
//! problem+json error responses, the `Idempotency-Key` and `X-Client-Id`
//! headers, the HMAC security scheme of the service-to-service routes, the
//! feed page, the health answers, and the handler that serves the document.
//!
//! Each service builds its document from its handlers' `#[utoipa::path]`
//! annotations with `utoipa_axum::routes!`, which also registers the route,
//! so a route and its description come from one declaration; [`Common`]
//! adds what is shared. The document is served at `GET /openapi.json`.
//! The `/admin` routes (off by default, operator only) are not in it.

use std::sync::Arc;

use axum::response::IntoResponse;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, Modify, PartialSchema, ToSchema};

use crate::PROBLEM_JSON;

/// The name of the security requirement every signed route carries (its
/// three headers are the schemes [`SIGNATURE_SCHEMES`]).
pub const SIGNED: &str = "service_signature";

/// The HMAC scheme's three headers, each an `apiKey` scheme; a signed route
/// requires all three (see `resilience::signing`).
pub const SIGNATURE_SCHEMES: [(&str, &str, &str); 3] = [
    (
        "service_timestamp",
        "x-service-timestamp",
        "Unix time in seconds when the request was signed (within the replay window).",
    ),
    (
        "service_nonce",
        "x-service-nonce",
        "16 to 64 characters of [A-Za-z0-9_-], unique per request.",
    ),
    (
        "service_signature",
        "x-service-signature",
        "`v1=` and the lowercase hex HMAC-SHA256, under SERVICE_SECRET, of the canonical \
         string: v1, method, path and query, timestamp, nonce, idempotency-key, \
         x-client-id and the SHA-256 of the body (see the README, \
         \"Service-to-service authentication\").",
    ),
];

/// An RFC 9457 problem details answer (`application/problem+json`): the
/// shape of every error answer.
#[derive(Debug, ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)]
pub struct ProblemDoc {
    /// A URI naming the kind of problem (stable; not meant to be dereferenced).
    r#type: String,
    /// A short summary of the kind of problem.
    title: String,
    /// The HTTP status code.
    #[schema(minimum = 400, maximum = 599)]
    status: u16,
    /// What went wrong with this request.
    detail: Option<String>,
}

macro_rules! problem_responses {
    ($($name:ident => $desc:literal),* $(,)?) => {
        $(
            #[doc = $desc]
            #[derive(Debug)]
            pub struct $name;

            impl<'r> utoipa::ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
                    (stringify!($name), problem_response($desc).into())
                }
            }
        )*

        fn problem_response_components() -> Vec<(&'static str, RefOr<utoipa::openapi::Response>)> {
            vec![$(<$name as utoipa::ToResponse>::response()),*]
        }
    };
}

problem_responses! {
    BadRequest => "Malformed input: JSON syntax, query string, path parameter, cursor, limit, Idempotency-Key or X-Client-Id.",
    Unauthorized => "Missing, malformed, stale, mis-signed or replayed service signature (carries WWW-Authenticate).",
    NotFound => "No such resource.",
    Conflict => "A request with the same Idempotency-Key is still in flight (Retry-After), an illegal status transition, or a feed offset beyond the head.",
    Gone => "The feed offset fell behind the retained log.",
    PayloadTooLarge => "The body is larger than MAX_BODY_BYTES.",
    UnsupportedMediaType => "The body is not application/json.",
    Unprocessable => "The body has the wrong shape or invalid values, or the Idempotency-Key was used with a different request.",
    Unavailable => "The database is unavailable, or the outcome of a commit is unknown: retry (with the same Idempotency-Key).",
}

fn problem_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// The headers of the routes wrapped in the idempotency layer.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct IdempotencyHeaders {
    /// Makes the request safe to repeat: a bare token or a quoted string of
    /// 1 to 255 printable ASCII characters. A repeat with the same key and
    /// request replays the first answer (`Idempotent-Replayed: true`); the
    /// same key with another request is a 422; while the first is in flight,
    /// a 409 with `Retry-After`.
    #[param(
        rename = "Idempotency-Key",
        min_length = 1,
        max_length = 255,
        nullable = false
    )]
    idempotency_key: Option<String>,
    /// The caller's identity, the scope of its idempotency keys (asserted by
    /// the caller; blank or with control characters: 400).
    #[param(rename = "X-Client-Id", min_length = 1, nullable = false)]
    x_client_id: Option<String>,
}

/// The query of a feed request (`GET .../feed/{mode}`).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct FeedParams {
    /// Return events with a position above this (0: from the start).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Page size (default 100; larger values are served as 1000).
    #[param(minimum = 1)]
    limit: Option<u32>,
    /// Long-poll: how long to wait when there is no event yet (`5s`,
    /// `500ms`, or a bare number of milliseconds; at most 30 s).
    wait: Option<String>,
}

/// One event of a feed.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct FeedEvent {
    /// Position in the feed: strictly increasing, without gaps.
    position: i64,
    /// The event's unique id.
    id: String,
    /// What happened, e.g. `order-created`.
    r#type: String,
    /// The data the consumer needs.
    data: serde_json::Value,
    /// When the producer appended it (ms since the Unix epoch).
    created_at: i64,
}

/// One page of a feed (`resilience::feed::Page`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct FeedPage {
    /// Events after the requested position, in position order.
    events: Vec<FeedEvent>,
    /// The `after` of the next request.
    next: i64,
    /// The producer's highest position when the page was read.
    head: i64,
}

/// The pull modes, each with a feed (`GET .../feed/{mode}`).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "kebab-case")]
#[allow(dead_code)]
pub enum FeedMode {
    /// The feed read by a consumer that commits its offset after the state change.
    PullAtLeastOnce,
    /// The feed read by a consumer that commits its offset with the state change.
    PullEffectivelyOnce,
}

/// The answer of `/healthz` (`ok`) and `/readyz` (`ready`).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct Health {
    #[schema(example = "ok")]
    status: String,
}

/// The methods a batch carries (writes only).
#[derive(Debug, ToSchema)]
#[schema(as = BatchMethod)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum BatchMethodDoc {
    /// POST
    POST,
    /// PUT
    PUT,
    /// PATCH
    PATCH,
    /// DELETE
    DELETE,
}

/// One request of a batch (`POST /batch`).
#[derive(Debug, ToSchema)]
#[schema(as = BatchSubRequest)]
#[allow(dead_code)]
pub struct BatchSubRequestDoc {
    /// A method other than GET and HEAD (a batch carries writes).
    method: BatchMethodDoc,
    /// Path and query on this service, starting with `/`.
    #[schema(example = "/orders", pattern = "^/[!-~]*$")]
    path: String,
    /// `[name, value]` pairs, sent as the request's headers.
    #[schema(value_type = Vec<Vec<String>>)]
    headers: Option<Vec<(String, String)>>,
    /// The body, base64.
    #[schema(format = Byte)]
    body: Option<String>,
}

/// The body of `POST /batch`.
#[derive(Debug, ToSchema)]
#[schema(as = BatchRequest)]
#[allow(dead_code)]
pub struct BatchRequestDoc {
    /// 1 to 256 requests, run in order.
    #[schema(min_items = 1, max_items = 256)]
    requests: Vec<BatchSubRequestDoc>,
}

/// The answer to one request of a batch.
#[derive(Debug, ToSchema)]
#[schema(as = BatchSubResponse)]
#[allow(dead_code)]
pub struct BatchSubResponseDoc {
    /// The HTTP status the request was answered with.
    status: u16,
    /// `[name, value]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    headers: Vec<(String, String)>,
    /// The body, base64.
    #[schema(format = Byte)]
    body: String,
}

/// The answer to `POST /batch`.
#[derive(Debug, ToSchema)]
#[schema(as = BatchResponse)]
#[allow(dead_code)]
pub struct BatchResponseDoc {
    /// One answer per request, in order.
    responses: Vec<BatchSubResponseDoc>,
}

/// `POST /batch`: several requests to this service in one exchange and one
/// transaction (the outbox relays send through it; see
/// `resilience::batch`). Each request is checked by its own route (its
/// signature, its idempotency key) and gets its own answer. If one is
/// refused, the transaction rolls back and each runs again on its own.
/// Only the routes the relays send to may be named (order-service:
/// `POST /orders`, `POST /orders/{id}/shipment-events`; shipping-service:
/// `POST /shipments`); at most 64 headers per request, 8 batches served
/// at once, 10 s in the transaction.
#[utoipa::path(
    post,
    path = "/batch",
    tag = "batch",
    request_body(content = BatchRequestDoc, content_type = "application/json"),
    responses(
        (status = 200, description = "One answer per request, in order", body = BatchResponseDoc),
        (status = 400, response = BadRequest),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 503, response = Unavailable),
    )
)]
#[allow(dead_code)]
async fn batch_doc() {}

/// The document of `POST /batch` (served by `resilience::batch::router`);
/// merge it into a service's document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(batch_doc))]
#[derive(Debug)]
pub struct BatchDoc;

/// The shared part of both documents: problem responses, schemas that the
/// annotations name but no handler type carries, the security schemes.
#[derive(Debug)]
pub struct Common;

impl Modify for Common {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi
            .components
            .get_or_insert_with(utoipa::openapi::Components::new);
        for (name, response) in problem_response_components() {
            components.responses.insert(name.to_string(), response);
        }
        for (name, schema) in [
            ("Problem", ProblemDoc::schema()),
            ("FeedEvent", FeedEvent::schema()),
            ("FeedPage", FeedPage::schema()),
            ("Health", Health::schema()),
            ("FeedMode", FeedMode::schema()),
        ] {
            components.schemas.insert(name.to_string(), schema);
        }
        for (name, header, description) in SIGNATURE_SCHEMES {
            components.add_security_scheme(
                name,
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                    header,
                    description,
                ))),
            );
        }
    }
}

/// The handler of `GET /openapi.json`: the document, serialized once.
pub fn serve<S: Clone + Send + Sync + 'static>(
    doc: &utoipa::openapi::OpenApi,
) -> axum::routing::MethodRouter<S> {
    let body: Arc<str> = doc
        .to_json()
        .expect("an OpenAPI document serializes")
        .into();
    axum::routing::get(move || {
        let body = body.clone();
        async move {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
    })
}
