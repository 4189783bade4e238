//! One transaction shared by several requests: what a batch runs in.
//!
//! The batch endpoint ([`crate::batch`]) begins a [`SharedTx`], puts it in
//! each sub-request's extensions and dispatches the sub-requests one after
//! the other. The [`IdempotencyLayer`](super::IdempotencyLayer) of a route
//! that finds a `SharedTx` does everything it always does (key lookup, the
//! handler, the record of the answer) in that transaction, but does not
//! commit it: it hands the transaction back, with its after-commit hooks,
//! and the batch commits once for all of them. A sub-request refused (4xx,
//! 5xx) before anything ran in the transaction for it (its handler never
//! called [`Tx::lock`](super::Tx::lock)) hands the transaction back as it
//! found it, and its held writes are dropped. One refused after that, or one
//! that fails, marks the scope *failed*: the batch then rolls back and runs
//! each sub-request again on its own, in a transaction of its own, so that
//! one refusal costs nobody else their answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use sqlx::{Any, Transaction};
use tokio::sync::Mutex;

use super::key::lock_id;
use super::record::{self, OwnedRecord, Stored};
use super::tx::AfterCommit;
use crate::store::{Backend, Db, Write};

/// Why a sub-request could not take the batch's transaction.
#[derive(Debug)]
pub(crate) enum TakeError {
    /// Another sub-request holds it, or it was lost (a handler that
    /// panicked while holding it).
    InUse,
    /// Beginning it (on the first take) failed.
    Begin(sqlx::Error),
}

/// The batch's transaction, as a whole.
pub enum Finished {
    /// No sub-request asked for it: nothing was begun, nothing to end.
    NotBegun,
    /// The transaction, with each sub-request's after-commit hooks.
    Done(Transaction<'static, Any>, Vec<Vec<AfterCommit>>),
    /// It was begun but is gone (a sub-request kept it, or lost it in a
    /// panic): the batch must run its requests again one by one.
    Lost,
}

/// The transaction of a batch, shared with the idempotency layer of each
/// sub-request through the request's extensions. Cheap to clone.
#[derive(Clone)]
pub struct SharedTx {
    inner: Arc<Inner>,
}

struct Inner {
    tx: Mutex<Option<Transaction<'static, Any>>>,
    /// Until the first sub-request takes the transaction: the database to
    /// begin it on. A batch whose sub-requests are all refused before they
    /// reach an idempotency layer (a bad signature, an unknown route) never
    /// holds a connection, let alone SQLite's one writer.
    lazy: std::sync::Mutex<Option<Db>>,
    /// Each sub-request's after-commit hooks, in its registration order.
    hooks: std::sync::Mutex<Vec<Vec<AfterCommit>>>,
    /// The answers to record, inserted together before the commit.
    records: std::sync::Mutex<Vec<OwnedRecord>>,
    /// The requests' writes handed to `Tx::write`, in order.
    writes: std::sync::Mutex<Vec<Write>>,
    failed: AtomicBool,
    /// Sub-requests that asked for the transaction (whether or not they got
    /// it): each may have written in it, so each runs again if it rolls back.
    joined: AtomicUsize,
    /// The batch's idempotency keys, looked up together by the first
    /// sub-request that looks one up.
    prefetch: std::sync::Mutex<Prefetch>,
}

/// What [`SharedTx::lookup`] fetched ahead for the sub-requests to come.
#[derive(Default)]
struct Prefetch {
    /// The keys the batch's sub-requests carry, until fetched.
    keys: Vec<String>,
    /// The scope they were fetched under (the first looker's).
    scope: Option<String>,
    /// Each key's lock and record, taken by the sub-request that asks.
    found: HashMap<String, (bool, Option<Stored>)>,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finished::NotBegun => f.write_str("NotBegun"),
            Finished::Done(_, hooks) => f.debug_tuple("Done").field(&hooks.len()).finish(),
            Finished::Lost => f.write_str("Lost"),
        }
    }
}

impl std::fmt::Debug for SharedTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTx")
            .field("failed", &self.failed())
            .field("joined", &self.joined())
            .finish_non_exhaustive()
    }
}

impl SharedTx {
    /// Shares `tx`, begun by the caller.
    pub fn new(tx: Transaction<'static, Any>) -> Self {
        Self::with(Some(tx), None)
    }

    /// A transaction begun on `db` when the first sub-request asks for it.
    pub fn lazy(db: Db) -> Self {
        Self::with(None, Some(db))
    }

    fn with(tx: Option<Transaction<'static, Any>>, lazy: Option<Db>) -> Self {
        Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(tx),
                lazy: std::sync::Mutex::new(lazy),
                hooks: std::sync::Mutex::new(Vec::new()),
                records: std::sync::Mutex::new(Vec::new()),
                writes: std::sync::Mutex::new(Vec::new()),
                failed: AtomicBool::new(false),
                joined: AtomicUsize::new(0),
                prefetch: std::sync::Mutex::new(Prefetch::default()),
            }),
        }
    }

    /// Takes the transaction for one sub-request, beginning it on the first
    /// take. Counts the sub-request as joined either way. An error marks the
    /// batch failed.
    pub(crate) async fn take(&self) -> Result<Transaction<'static, Any>, TakeError> {
        self.inner.joined.fetch_add(1, Ordering::Relaxed);
        let mut slot = self.inner.tx.lock().await;
        if let Some(tx) = slot.take() {
            return Ok(tx);
        }
        let db = self.take_lazy();
        let result = match db {
            Some(db) => db.begin().await.map_err(TakeError::Begin),
            None => Err(TakeError::InUse),
        };
        if result.is_err() {
            self.fail();
        }
        result
    }

    /// How many sub-requests have handed hooks back so far (each one's are
    /// one entry of [`Finished::Done`]'s list, in this order).
    #[cfg(feature = "batch")]
    pub(crate) fn hook_sets(&self) -> usize {
        self.lock_hooks().len()
    }

    /// Hands the transaction back after a sub-request, with the hooks it
    /// registered (run only after the batch commits).
    pub(crate) async fn give_back(&self, tx: Transaction<'static, Any>, hooks: Vec<AfterCommit>) {
        if !hooks.is_empty() {
            self.lock_hooks().push(hooks);
        }
        *self.inner.tx.lock().await = Some(tx);
    }

    /// Hands the transaction back after a sub-request that was refused or
    /// failed: the whole batch must roll back.
    pub(crate) async fn give_back_failed(&self, tx: Transaction<'static, Any>) {
        self.fail();
        *self.inner.tx.lock().await = Some(tx);
    }

    /// The idempotency keys the batch's sub-requests carry (a key that
    /// appears twice, once). The first sub-request that looks its key up
    /// looks them all up, in one statement instead of one per sub-request.
    pub fn expect_keys(&self, mut keys: Vec<String>) {
        keys.sort_unstable();
        keys.dedup();
        self.lock_prefetch().keys = keys;
    }

    /// A sub-request's lookup of its key (and, on Postgres, the try of its
    /// advisory lock) in the batch's transaction: from what the first
    /// lookup fetched for the whole batch, or on its own when the key or
    /// scope was not among those.
    pub(crate) async fn lookup(
        &self,
        tx: &mut Transaction<'static, Any>,
        db: &Db,
        scope: &str,
        key: &str,
    ) -> Result<(bool, Option<Stored>), sqlx::Error> {
        let ahead = {
            let mut p = self.lock_prefetch();
            match &p.scope {
                Some(s) if s == scope => {
                    if let Some(hit) = p.found.remove(key) {
                        return Ok(hit);
                    }
                    None
                }
                None if p.keys.len() > 1 && p.keys.iter().any(|k| k == key) => {
                    p.scope = Some(scope.to_string());
                    Some(std::mem::take(&mut p.keys))
                }
                _ => None,
            }
        };
        if let Some(keys) = ahead {
            let rows = record::lookup_many(tx, db.backend(), db.schema(), scope, &keys).await?;
            let mut p = self.lock_prefetch();
            let mut mine = None;
            for (k, locked, stored) in rows {
                if k == key {
                    mine = Some((locked, stored));
                } else {
                    p.found.insert(k, (locked, stored));
                }
            }
            if let Some(mine) = mine {
                return Ok(mine);
            }
        }
        match db.backend() {
            Backend::Postgres => {
                let id = lock_id(db.schema(), scope, key);
                record::lock_and_lookup(&mut **tx, id, scope, key).await
            }
            Backend::Sqlite => record::lookup(&mut **tx, scope, key)
                .await
                .map(|r| (true, r)),
        }
    }

    fn lock_prefetch(&self) -> std::sync::MutexGuard<'_, Prefetch> {
        self.inner
            .prefetch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a sub-request's idempotency record for the batch's one
    /// multi-row insert ([`SharedTx::write_records`]).
    /// Holds a request's writes for [`SharedTx::write_records`].
    pub(crate) fn defer_writes(&self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        self.inner
            .writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(writes);
    }

    pub(crate) fn defer_record(&self, rec: OwnedRecord) {
        self.inner
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(rec);
    }

    /// Inserts the deferred idempotency records into `tx`, many per
    /// statement, before the batch commits. An error (a key answered twice:
    /// within the batch, or by a concurrent transaction) means the batch
    /// must roll back and run its requests one by one. Returns the
    /// transaction's id on Postgres, for resolving a lost commit answer.
    pub async fn write_records(
        &self,
        tx: &mut Transaction<'static, Any>,
        backend: Backend,
    ) -> Result<Option<i64>, sqlx::Error> {
        let records = drain(&self.inner.records);
        let writes = drain(&self.inner.writes);
        record::insert_all(&mut *tx, writes, &records, backend).await
    }

    /// Marks the batch failed (it must roll back).
    pub(crate) fn fail(&self) {
        self.inner.failed.store(true, Ordering::Release);
    }

    /// Did a sub-request refuse or fail?
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    /// How many sub-requests asked for the transaction so far.
    pub fn joined(&self) -> usize {
        self.inner.joined.load(Ordering::Relaxed)
    }

    /// Takes the transaction out to commit or roll it back, with the hooks
    /// to run after a commit: one list per sub-request, each in its
    /// registration order; see [`Finished`] for the other outcomes.
    pub async fn finish(&self) -> Finished {
        let Some(tx) = self.inner.tx.lock().await.take() else {
            return if self.take_lazy().is_some() {
                Finished::NotBegun
            } else {
                Finished::Lost
            };
        };
        let hooks = std::mem::take(&mut *self.lock_hooks());
        Finished::Done(tx, hooks)
    }

    /// The database to begin on, if nothing has begun yet (taken once).
    fn take_lazy(&self) -> Option<Db> {
        self.inner
            .lazy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn lock_hooks(&self) -> std::sync::MutexGuard<'_, Vec<Vec<AfterCommit>>> {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Takes everything out of a list behind a lock.
fn drain<T>(list: &std::sync::Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(
        &mut *list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}
