use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use service_kit::Problem;

use super::AppState;

/// The process is up.
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The process can serve: its database answers.
pub(super) async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, Problem> {
    match app.store.db().ping().await {
        Ok(()) => Ok(Json(json!({ "status": "ready" }))),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Err(Problem::unavailable("database unreachable"))
        }
    }
}
