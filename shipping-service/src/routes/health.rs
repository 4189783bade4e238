use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use service_kit::openapi::Health;
use service_kit::Problem;

use super::AppState;

/// The process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Health))
)]
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The process can serve: its database answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "`{\"status\": \"ready\"}`", body = Health),
        (status = 503, response = service_kit::openapi::Unavailable),
    )
)]
pub(super) async fn readyz(State(app): State<Arc<AppState>>) -> Result<Json<Value>, Problem> {
    match app.store.db().ping().await {
        Ok(()) => Ok(Json(json!({ "status": "ready" }))),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(Problem::unavailable("database unreachable").retry_after(1))
        }
    }
}
