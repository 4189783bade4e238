use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::problem::Problem;

/// Errors of the idempotency store (reaper, record access).
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The database failed.
    #[error("idempotency store: {0}")]
    Db(#[from] sqlx::Error),
}

/// Why [`Tx::lock`](super::Tx::lock) could not hand out the transaction.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The layer already committed or rolled back: the handler (or a task it
    /// spawned) kept the [`Tx`](super::Tx) past the end of the request.
    #[error("the request's transaction is already finished")]
    Finished,
    /// The lazily begun transaction (request without a key) failed to start.
    #[error("cannot begin the request's transaction: {0}")]
    Begin(#[source] sqlx::Error),
}

impl From<TxError> for Problem {
    fn from(err: TxError) -> Self {
        match &err {
            TxError::Begin(e) if is_busy(e) => {
                tracing::warn!(error = %err, "database busy");
                Problem::unavailable("the database is busy; retry later").retry_after(1)
            }
            _ => crate::problem::internal_error(err),
        }
    }
}

impl IntoResponse for TxError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// Pool exhausted, or SQLite's write lock not obtained within the busy timeout.
pub(crate) fn is_busy(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("5") | Some("517") | Some("6"))
                || db.message().contains("database is locked")
        }
        _ => false,
    }
}

/// The problem for a transaction that could not begin.
pub(crate) fn begin_failed(err: sqlx::Error, retry_after: u64) -> Problem {
    if is_busy(&err) {
        tracing::warn!(error = %err, "cannot begin transaction: database busy");
        Problem::unavailable("the database is busy; retry later").retry_after(retry_after)
    } else {
        crate::problem::internal_error(format_args!("cannot begin transaction: {err}"))
    }
}

/// The problem for a failed commit: nothing was saved, so a retry is safe.
pub(crate) fn commit_failed(err: sqlx::Error) -> Problem {
    tracing::error!(error = %err, "commit failed; the request had no effect");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "commit failed")
        .detail("nothing was saved; the request can be retried")
}
