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
    /// The lazily begun transaction failed to start (or, for a request with
    /// a key, its key could not be looked up).
    #[error("cannot begin the request's transaction: {0}")]
    Begin(#[source] sqlx::Error),
    /// Writes handed to [`Tx::write`](super::Tx::write) failed.
    #[error("the request's writes failed: {0}")]
    Write(#[source] sqlx::Error),
    /// The request's `Idempotency-Key` was already answered, or is in flight
    /// in another request: the layer answers with that (the stored answer,
    /// or 409), whatever the handler returns.
    #[error("the request's idempotency key is answered elsewhere")]
    Answered,
}

impl From<TxError> for Problem {
    fn from(err: TxError) -> Self {
        match err {
            TxError::Begin(e) | TxError::Write(e) => crate::problem::db_error(e),
            TxError::Finished => crate::problem::internal_error(err),
            // Never shown: the layer answers instead.
            TxError::Answered => Problem::conflict(
                "request answered elsewhere",
                "a request with this Idempotency-Key was answered or is in flight",
            ),
        }
    }
}

impl IntoResponse for TxError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// The problem for a transaction that could not begin: 503 with
/// `Retry-After` when the database is busy or unreachable, else 500.
pub(crate) fn begin_failed(err: sqlx::Error, retry_after: u64) -> Problem {
    if crate::store::is_transient(&err) {
        tracing::warn!(error = %err, "cannot begin transaction: database busy or unreachable");
        Problem::unavailable("the database is busy or unreachable; retry later")
            .retry_after(retry_after)
    } else {
        crate::problem::internal_error(format_args!("cannot begin transaction: {err}"))
    }
}

/// The problem for a commit that certainly did not happen: nothing was saved,
/// so the same request can be retried. Transient causes (the connection was
/// lost before the server ran the `COMMIT`, a serialization failure) are a
/// 503 with `Retry-After`; anything else a 500.
pub(crate) fn commit_failed(err: sqlx::Error, retry_after: u64) -> Problem {
    tracing::error!(error = %err, "commit failed; the request had no effect");
    let status = if crate::store::is_transient(&err) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let p = Problem::new(status, "commit failed")
        .detail("nothing was saved; the request can be retried");
    if status == StatusCode::SERVICE_UNAVAILABLE {
        p.retry_after(retry_after)
    } else {
        p
    }
}

/// The problem for a commit whose outcome could not be learned: the
/// connection failed while committing and the database could not be asked
/// afterwards. The request may have taken effect; it must not be reported as
/// rolled back.
pub(crate) fn commit_unknown(err: sqlx::Error, retry_after: u64) -> Problem {
    tracing::error!(error = %err, "commit outcome unknown");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, "outcome unknown")
        .detail(
            "the outcome of this request is unknown: the database connection was lost while \
         committing, so it may or may not have taken effect. Retry with the same \
         Idempotency-Key to get the original answer (without a key, look the resource up \
         before retrying)",
        )
        .retry_after(retry_after)
}
