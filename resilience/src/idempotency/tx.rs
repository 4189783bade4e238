//! The request's transaction, shared between the layer and the handler.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use axum::extract::FromRequestParts;
use futures::future::BoxFuture;
use http::request::Parts;
use http::StatusCode;
use sqlx::{Any, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use super::error::TxError;
use crate::problem::Problem;
use crate::store::Db;

/// A hook run after a successful commit.
pub type AfterCommit = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send + 'static>;

enum Slot {
    /// Not begun yet (request without a key): begun at the first `lock`.
    Pending(Db),
    Active(Transaction<'static, Any>),
    /// Taken by the layer to commit or roll back.
    Finished,
}

struct Shared {
    slot: Mutex<Slot>,
    hooks: std::sync::Mutex<Vec<AfterCommit>>,
}

/// The request's database transaction, owned by the
/// [`IdempotencyLayer`](super::IdempotencyLayer).
///
/// Extract it in a handler of a route wrapped in the layer; on a route
/// without the layer the extractor answers a 500 problem. The handler writes
/// through [`Tx::lock`] and never commits: the layer commits after the
/// handler returns a success (together with the idempotency record) and
/// rolls back on a 4xx or 5xx. Do not keep the `Tx` (or a spawned task holding
/// it) past the handler: the layer waits for the lock to finish the
/// transaction.
#[derive(Clone)]
pub struct Tx {
    shared: Arc<Shared>,
}

impl Tx {
    fn with(slot: Slot) -> Self {
        Self {
            shared: Arc::new(Shared {
                slot: Mutex::new(slot),
                hooks: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// A transaction begun at first use.
    pub(crate) fn lazy(db: Db) -> Self {
        Self::with(Slot::Pending(db))
    }

    /// A transaction already begun by the layer.
    pub(crate) fn active(tx: Transaction<'static, Any>) -> Self {
        Self::with(Slot::Active(tx))
    }

    /// Locks the transaction for this handler's statements:
    /// `query.execute(&mut **guard)`. Release the guard (drop it) before
    /// awaiting anything slow that does not need the database.
    pub async fn lock(&self) -> Result<TxGuard<'_>, TxError> {
        let mut slot = self.shared.slot.lock().await;
        if let Slot::Pending(db) = &*slot {
            let db = db.clone();
            let tx = db.begin().await.map_err(TxError::Begin)?;
            *slot = Slot::Active(tx);
        }
        MutexGuard::try_map(slot, |s| match s {
            Slot::Active(tx) => Some(tx),
            _ => None,
        })
        .map(|inner| TxGuard { inner })
        .map_err(|_| TxError::Finished)
    }

    /// Registers `hook` to run after the transaction commits, before the
    /// response is sent. Hooks run in registration order, each awaited; they
    /// are dropped if the transaction rolls back (4xx or 5xx answer, failed commit,
    /// or a duplicate that lost the race and replays the winner's answer).
    pub fn after_commit<F>(&self, hook: F)
    where
        F: FnOnce() -> BoxFuture<'static, ()> + Send + 'static,
    {
        let mut hooks = self
            .shared
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        hooks.push(Box::new(hook));
    }

    /// Takes the transaction out for commit or rollback (`None` if it was
    /// never begun); later `lock`s fail with [`TxError::Finished`].
    pub(crate) async fn finish(&self) -> Option<Transaction<'static, Any>> {
        let mut slot = self.shared.slot.lock().await;
        match std::mem::replace(&mut *slot, Slot::Finished) {
            Slot::Active(tx) => Some(tx),
            Slot::Pending(_) | Slot::Finished => None,
        }
    }

    /// Takes the after-commit hooks out, unrun (a batch runs them after its
    /// own commit).
    pub(crate) fn take_hooks(&self) -> Vec<AfterCommit> {
        std::mem::take(
            &mut *self
                .shared
                .hooks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Runs and clears the after-commit hooks.
    pub(crate) async fn run_hooks(&self) {
        let hooks = std::mem::take(
            &mut *self
                .shared
                .hooks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for hook in hooks {
            hook().await;
        }
    }
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tx {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Tx>().cloned().ok_or_else(|| {
            tracing::error!(
                path = %parts.uri.path(),
                "Tx extractor used on a route without IdempotencyLayer"
            );
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "transaction unavailable")
                .detail("this route is not wrapped in IdempotencyLayer")
        })
    }
}

/// Exclusive access to the request's transaction; derefs to
/// [`sqlx::Transaction`], so `&mut **guard` is an executor.
pub struct TxGuard<'a> {
    inner: MappedMutexGuard<'a, Transaction<'static, Any>>,
}

impl Deref for TxGuard<'_> {
    type Target = Transaction<'static, Any>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for TxGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl fmt::Debug for TxGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxGuard").finish_non_exhaustive()
    }
}
