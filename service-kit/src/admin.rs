//! Operator endpoints shared by the services: outbox counts, dead letters and
//! their requeue, breaker states, run-time fault rates, and the Prometheus
//! scrape (`GET /metrics`, see [`crate::metrics`]).
//!
//! Off unless a non-empty token is configured (every path answers 404 then); with one,
//! each call needs `Authorization: Bearer <token>` (401 otherwise). The token
//! is compared in constant time and never logged.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{internal_error, ApiJson, ApiPath, Problem};
use resilience::circuit_breaker::BreakerRegistry;
use resilience::fault::{FaultConfig, FaultHandle};
use resilience::feed::FeedConsumer;
use resilience::outbox::Outbox;

/// What the admin endpoints act on.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The service's outbox.
    pub outbox: Outbox,
    /// The breakers of the outgoing stack.
    pub breakers: BreakerRegistry,
    /// The fault injection handle of the outgoing stacks.
    pub faults: FaultHandle,
    /// The configured token (`None`: admin is off).
    pub token: Option<Arc<str>>,
    /// The running feed consumers (pull modes).
    pub feeds: crate::feeds::Consumers,
    /// The service's database (feed offsets and dead events live there).
    pub db: resilience::store::Db,
}

/// `/admin/...` routes; merge into the service's router.
///
/// With admin off (no token, or a blank one) there are no admin routes at
/// all, so every method on every admin path falls through to the service's
/// 404 fallback: nothing says the endpoints exist.
pub fn router(state: AdminState) -> Router {
    if configured_token(&state).is_none() {
        return Router::new();
    }
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/admin/outbox", get(outbox_stats))
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/dead-letters/requeue", post(requeue_all))
        .route("/admin/dead-letters/{id}/requeue", post(requeue_one))
        .route("/admin/breakers", get(breakers))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/feeds", get(feeds))
        .route("/admin/feeds/{feed}/dead", get(feed_dead))
        .route("/admin/feeds/{feed}/dead/requeue", post(feed_requeue_all))
        .route(
            "/admin/feeds/{feed}/dead/{id}/requeue",
            post(feed_requeue_one),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// The token, unless admin is off.
fn configured_token(state: &AdminState) -> Option<&str> {
    // NOTE: an empty token would match an empty or missing header; it
    // counts as no token at all.
    state.token.as_deref().filter(|t| !t.trim().is_empty())
}

/// The credentials of an `Authorization: Bearer <token>` header; the scheme
/// is case-insensitive (RFC 9110 section 11.1), separated by one or more
/// spaces.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    (!token.is_empty()).then_some(token)
}

async fn authorize(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let Some(token) = configured_token(&state) else {
        return Problem::not_found("no such resource").into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or_default();
    // Compare digests so the comparison takes the same time whatever matches.
    let ok = Sha256::digest(given.as_bytes()) == Sha256::digest(token.as_bytes());
    if !ok {
        let mut res = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized")
            .detail("a valid `Authorization: Bearer <ADMIN_TOKEN>` header is required")
            .into_response();
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"admin\""),
        );
        return res;
    }
    next.run(req).await
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    crate::metrics::render(&crate::metrics::Sources {
        outbox: &s.outbox,
        breakers: &s.breakers,
        db: &s.db,
        feeds: &s.feeds,
    })
    .await
}

async fn outbox_stats(State(s): State<AdminState>) -> Result<Json<Value>, Problem> {
    let stats = s.outbox.stats().await.map_err(internal_error)?;
    Ok(Json(json!(stats)))
}

async fn dead_letters(State(s): State<AdminState>) -> Result<Json<Value>, Problem> {
    let dead = s.outbox.dead_letters(100).await.map_err(internal_error)?;
    Ok(Json(json!({ "dead_letters": dead })))
}

async fn requeue_one(
    State(s): State<AdminState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, Problem> {
    // Message ids are UUIDs; anything else cannot name one.
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Problem::bad_request(format!(
            "{id:?} is not a valid message id (expected a UUID)"
        )));
    }
    if s.outbox.requeue(&id).await.map_err(internal_error)? {
        Ok(Json(json!({ "requeued": 1 })))
    } else {
        Err(Problem::not_found(format!("no dead letter {id}")))
    }
}

async fn requeue_all(State(s): State<AdminState>) -> Result<Json<Value>, Problem> {
    let n = s.outbox.requeue_all().await.map_err(internal_error)?;
    Ok(Json(json!({ "requeued": n })))
}

async fn breakers(State(s): State<AdminState>) -> Json<Value> {
    let list: Vec<Value> = s
        .breakers
        .authorities()
        .into_iter()
        .filter_map(|a| s.breakers.get(&a).map(|h| (a, h.snapshot())))
        .map(|(authority, snap)| {
            json!({
                "destination": authority,
                "state": snap.state.to_string(),
                "calls": snap.calls,
                "failures": snap.failures,
                "failure_rate": snap.failure_rate,
                "slow_call_rate": snap.slow_call_rate,
                "rejected": snap.rejected,
                "retry_after_ms": snap.retry_after.map(|d| d.as_millis() as u64),
            })
        })
        .collect();
    Json(json!({ "breakers": list }))
}

async fn get_faults(State(s): State<AdminState>) -> Json<Value> {
    Json(json!({ "config": s.faults.get(), "counters": s.faults.snapshot() }))
}

async fn put_faults(
    State(s): State<AdminState>,
    ApiJson(cfg): ApiJson<FaultConfig>,
) -> Result<Json<Value>, Problem> {
    s.faults
        .set(cfg)
        .map_err(|e| Problem::unprocessable(e.to_string()))?;
    tracing::info!(?cfg, "fault injection changed");
    Ok(Json(json!({ "config": s.faults.get() })))
}

/// The consumers' status (offset, lag, holder) and the offset rows of every
/// feed this service reads.
async fn feeds(State(s): State<AdminState>) -> Result<Json<Value>, Problem> {
    let consumers: Vec<_> = s.feeds.iter().map(|h| h.status()).collect();
    let offsets = FeedConsumer::offsets(&s.db).await.map_err(internal_error)?;
    Ok(Json(json!({ "consumers": consumers, "offsets": offsets })))
}

/// A feed name this service consumes, or 404.
fn known_feed(s: &AdminState, feed: &str) -> Result<(), Problem> {
    if s.feeds.iter().any(|h| h.status().feed == feed) {
        Ok(())
    } else {
        Err(Problem::not_found(format!(
            "this service consumes no feed {feed:?}"
        )))
    }
}

async fn feed_dead(
    State(s): State<AdminState>,
    ApiPath(feed): ApiPath<String>,
) -> Result<Json<Value>, Problem> {
    known_feed(&s, &feed)?;
    let dead = FeedConsumer::dead_events(&s.db, &feed, 100)
        .await
        .map_err(internal_error)?;
    Ok(Json(json!({ "dead_events": dead })))
}

async fn feed_requeue_one(
    State(s): State<AdminState>,
    ApiPath((feed, id)): ApiPath<(String, String)>,
) -> Result<Json<Value>, Problem> {
    known_feed(&s, &feed)?;
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Problem::bad_request(format!(
            "{id:?} is not a valid event id (expected a UUID)"
        )));
    }
    if FeedConsumer::requeue(&s.db, &feed, &id)
        .await
        .map_err(internal_error)?
    {
        Ok(Json(json!({ "requeued": 1 })))
    } else {
        Err(Problem::not_found(format!("no dead event {id} in {feed}")))
    }
}

async fn feed_requeue_all(
    State(s): State<AdminState>,
    ApiPath(feed): ApiPath<String>,
) -> Result<Json<Value>, Problem> {
    known_feed(&s, &feed)?;
    let n = FeedConsumer::requeue_all(&s.db, &feed)
        .await
        .map_err(internal_error)?;
    Ok(Json(json!({ "requeued": n })))
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t", "bearer t", "BEARER t", "bEaReR   t"] {
            assert_eq!(bearer_token(v), Some("t"), "{v}");
        }
        for v in ["Basic t", "Bearer", "Bearer ", "Bearert", ""] {
            assert_eq!(bearer_token(v), None, "{v}");
        }
    }
}
