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
use super::record::{self, Stored, Verdict};
use crate::problem::Problem;
use crate::store::{now_ms, run_writes, Backend, Db, Write};

/// A hook run after a successful commit.
pub type AfterCommit = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send + 'static>;

/// Put in a request's extensions, it is notified once the request's own
/// transaction has committed, just before its after-commit hooks run. What
/// runs requests one after another (group commit) goes on to the next then,
/// and leaves the hooks (a call to a peer, say) to finish on their own. On
/// every other path (a refusal, a replay, a failed commit) there are no
/// hooks, nothing notifies it, and the end of the request tells instead.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommitSignal(pub(crate) Arc<tokio::sync::Notify>);

/// The key a deferred transaction claims when it is begun.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub(crate) lock_id: i64,
    pub(crate) scope: String,
    pub(crate) key: String,
}

/// What claiming the key found, instead of the key being this request's.
#[derive(Debug)]
pub(crate) enum Found {
    /// A completed record: it answers the request.
    Record(Stored),
    /// Another request with the key is in flight.
    InFlight,
}

enum Slot {
    /// Not begun yet (request without a key): begun at the first `lock`.
    Pending(Db),
    /// Postgres, a request with a key in a transaction of its own, not
    /// begun: writes handed to [`Tx::write`] wait here, and the layer runs
    /// them with the key's record in one statement after the handler. The
    /// first `lock` begins the transaction, claims the key (lock and
    /// lookup, as the layer does before the handler otherwise) and runs
    /// them.
    Deferred {
        db: Db,
        claim: Claim,
        writes: Vec<Write>,
    },
    Active(Transaction<'static, Any>),
    /// Taken by the layer to commit or roll back.
    Finished,
}

/// How a deferred transaction ended, for the layer.
pub(crate) enum Ended {
    /// Never begun: the writes still wait (possibly none).
    Held(Vec<Write>),
    /// Begun by a `lock`, with the key claimed: finish it the usual way.
    Begun(Transaction<'static, Any>),
    /// Claiming the key found it answered or in flight.
    Answered(Found),
    /// Nothing to finish (a write failed, or it was finished already).
    Gone,
}

struct Shared {
    slot: Mutex<Slot>,
    hooks: std::sync::Mutex<Vec<AfterCommit>>,
    found: std::sync::Mutex<Option<Found>>,
    /// In a batch: writes handed to [`Tx::write`] wait here, for the batch
    /// to run them with every answer's record in one statement.
    held: Option<std::sync::Mutex<Vec<Write>>>,
    /// Whether anything ran in the transaction for this request (a `lock`,
    /// or the layer's own write): a refused request of a batch that did
    /// not touch it leaves the batch's transaction as it found it.
    touched: std::sync::atomic::AtomicBool,
    /// Notified when the hooks are about to run (see [`CommitSignal`]).
    signal: std::sync::Mutex<Option<CommitSignal>>,
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
///
/// In a batch (or a group, see [`crate::batch::Coalesce`]), a request
/// refused before its handler ever called [`Tx::lock`] leaves the shared
/// transaction to the others, and only a refusal after a `lock` sends the
/// batch through one by one. So a handler that refuses on something it read
/// elsewhere (the pool, a [`BatchScope`](crate::batch::BatchScope) memo that
/// may hold what earlier requests of the batch wrote) takes the `lock` first.
#[derive(Clone)]
pub struct Tx {
    shared: Arc<Shared>,
}

impl Tx {
    fn with(slot: Slot) -> Self {
        Self::holding(slot, false)
    }

    fn holding(slot: Slot, hold: bool) -> Self {
        Self {
            shared: Arc::new(Shared {
                slot: Mutex::new(slot),
                hooks: std::sync::Mutex::new(Vec::new()),
                found: std::sync::Mutex::new(None),
                held: hold.then(|| std::sync::Mutex::new(Vec::new())),
                touched: std::sync::atomic::AtomicBool::new(false),
                signal: std::sync::Mutex::new(None),
            }),
        }
    }

    /// A batch's transaction, lent to one of its requests: writes handed to
    /// [`Tx::write`] are held for the batch (see [`Tx::take_held`]).
    pub(crate) fn batched(tx: Transaction<'static, Any>) -> Self {
        Self::holding(Slot::Active(tx), true)
    }

    /// The writes held for the batch, in order.
    pub(crate) fn take_held(&self) -> Vec<Write> {
        match &self.shared.held {
            Some(held) => std::mem::take(
                &mut *held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            None => Vec::new(),
        }
    }

    /// Notifies the request's [`CommitSignal`], if it has one, when the
    /// hooks are about to run.
    pub(crate) fn signal_from(&self, extensions: &http::Extensions) {
        if let Some(signal) = extensions.get::<CommitSignal>() {
            *self
                .shared
                .signal
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(signal.clone());
        }
    }

    /// Records that something ran in the transaction for this request.
    pub(crate) fn touch(&self) {
        self.shared
            .touched
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether anything ran in the transaction for this request: a
    /// [`Tx::lock`] (held writes of a batch do not count; they are
    /// dropped with a refused request).
    pub(crate) fn touched(&self) -> bool {
        self.shared
            .touched
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A transaction begun at first use.
    pub(crate) fn lazy(db: Db) -> Self {
        Self::with(Slot::Pending(db))
    }

    /// A transaction already begun by the layer.
    pub(crate) fn active(tx: Transaction<'static, Any>) -> Self {
        Self::with(Slot::Active(tx))
    }

    /// A transaction that claims `claim` when begun (Postgres), and whose
    /// writes wait for the layer until then.
    pub(crate) fn deferred(db: Db, claim: Claim) -> Self {
        Self::with(Slot::Deferred {
            db,
            claim,
            writes: Vec::new(),
        })
    }

    /// Locks the transaction for this handler's statements:
    /// `query.execute(&mut **guard)`. Release the guard (drop it) before
    /// awaiting anything slow that does not need the database.
    ///
    /// For a request with an `Idempotency-Key` on Postgres, the first `lock`
    /// begins the transaction and claims the key; if the key turns out to be
    /// answered already, or in flight in another request, it fails with
    /// [`TxError::Answered`], and the layer answers the request (the replay,
    /// or 409) whatever the handler returns.
    pub async fn lock(&self) -> Result<TxGuard<'_>, TxError> {
        self.touch();
        let mut slot = self.shared.slot.lock().await;
        match &mut *slot {
            Slot::Pending(db) => {
                let db = db.clone();
                let tx = db.begin().await.map_err(TxError::Begin)?;
                *slot = Slot::Active(tx);
            }
            Slot::Deferred { .. } => {
                // Out of the slot before the first await: a `lock` dropped
                // half way leaves it finished, never a claim without its
                // writes. A failure to begin or to look up puts it back.
                let Slot::Deferred { db, claim, writes } =
                    std::mem::replace(&mut *slot, Slot::Finished)
                else {
                    return Err(TxError::Finished);
                };
                let mut tx = match db.begin().await {
                    Ok(tx) => tx,
                    Err(e) => {
                        *slot = Slot::Deferred { db, claim, writes };
                        return Err(TxError::Begin(e));
                    }
                };
                match claim_key(&mut tx, &claim).await {
                    Ok(None) => {}
                    Ok(Some(found)) => {
                        super::layer::rollback(tx).await;
                        *self
                            .shared
                            .found
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(found);
                        return Err(TxError::Answered);
                    }
                    Err(e) => {
                        super::layer::rollback(tx).await;
                        *slot = Slot::Deferred { db, claim, writes };
                        return Err(TxError::Begin(e));
                    }
                }
                if let Err(e) = run_writes(&mut tx, Backend::Postgres, writes).await {
                    super::layer::rollback(tx).await;
                    return Err(TxError::Write(e));
                }
                *slot = Slot::Active(tx);
            }
            Slot::Active(tx) => {
                // Held writes run before anything that may read them.
                let held = self.take_held();
                if !held.is_empty() {
                    let backend = backend_of(tx);
                    run_writes(tx, backend, held)
                        .await
                        .map_err(TxError::Write)?;
                }
            }
            Slot::Finished => {}
        }
        MutexGuard::try_map(slot, |s| match s {
            Slot::Active(tx) => Some(tx),
            _ => None,
        })
        .map(|inner| TxGuard { inner })
        .map_err(|_| TxError::Finished)
    }

    /// Runs `writes` in the request's transaction: on Postgres as one
    /// statement (see [`Write::fold`]: one snapshot, so none sees another's
    /// rows), on SQLite as one script (see [`Write::script`]).
    ///
    /// In a batch, the writes are held for the batch, which runs every
    /// request's writes with their records before its commit, as one
    /// statement on Postgres and one script on SQLite (a failure there runs the batch's requests one by
    /// one, each alone). A `lock` runs the held writes first.
    ///
    /// For a request with an `Idempotency-Key` on Postgres, outside a batch,
    /// the writes are not run here: they wait, and once the handler has
    /// answered, the layer runs them and the key's record as one statement,
    /// which commits on its own: one round trip to the database for the
    /// whole request. So a handler must not expect to read their rows back,
    /// and an error in them reaches the layer, not the handler: the layer
    /// then runs the request again the usual way (the handler's writes run
    /// at once, and it answers their errors itself). A handler that calls
    /// [`Tx::lock`] after `write` gets them run first.
    pub async fn write(&self, writes: Vec<Write>) -> Result<(), TxError> {
        {
            let mut slot = self.shared.slot.lock().await;
            match &mut *slot {
                Slot::Deferred { writes: held, .. } => {
                    held.extend(writes);
                    return Ok(());
                }
                Slot::Active(_) => {
                    if let Some(held) = &self.shared.held {
                        held.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .extend(writes);
                        return Ok(());
                    }
                }
                Slot::Pending(_) | Slot::Finished => {}
            }
        }
        let mut conn = self.lock().await?;
        let backend = backend_of(&conn);
        run_writes(&mut conn, backend, writes)
            .await
            .map_err(TxError::Write)
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
            Slot::Pending(_) | Slot::Deferred { .. } | Slot::Finished => None,
        }
    }

    /// [`Tx::finish`] for a deferred transaction: what the layer has to
    /// finish.
    pub(crate) async fn end(&self) -> Ended {
        let found = self
            .shared
            .found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut slot = self.shared.slot.lock().await;
        match (std::mem::replace(&mut *slot, Slot::Finished), found) {
            (_, Some(found)) => Ended::Answered(found),
            (Slot::Deferred { writes, .. }, None) => Ended::Held(writes),
            (Slot::Active(tx), None) => Ended::Begun(tx),
            (Slot::Pending(_) | Slot::Finished, None) => Ended::Gone,
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

    /// Runs and clears the after-commit hooks (first telling the
    /// request's [`CommitSignal`] that its transaction is over).
    pub(crate) async fn run_hooks(&self) {
        let signal = self
            .shared
            .signal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(signal) = signal {
            signal.0.notify_one();
        }
        let hooks = self.take_hooks();
        for hook in hooks {
            hook().await;
        }
    }
}

/// The backend a connection speaks to.
fn backend_of(conn: &sqlx::AnyConnection) -> Backend {
    if conn.backend_name().eq_ignore_ascii_case("postgresql") {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

/// Begins a deferred transaction's work: tries the key's advisory lock and
/// looks its record up, deleting an expired one. `None`: the key is this
/// request's.
async fn claim_key(
    tx: &mut Transaction<'static, Any>,
    claim: &Claim,
) -> Result<Option<Found>, sqlx::Error> {
    let (locked, stored) =
        record::lock_and_lookup(&mut **tx, claim.lock_id, &claim.scope, &claim.key).await?;
    match record::classify(locked, stored, now_ms()) {
        Verdict::Replay(stored) => Ok(Some(Found::Record(stored))),
        Verdict::InFlight => Ok(Some(Found::InFlight)),
        Verdict::Expired => {
            record::delete(&mut **tx, &claim.scope, &claim.key).await?;
            Ok(None)
        }
        Verdict::Absent => Ok(None),
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
