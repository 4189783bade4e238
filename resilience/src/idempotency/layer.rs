//! The server-side layer: transaction per request, key lookup, replay.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{OriginalUri, Request};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sqlx::{Any, Transaction};
use tower::{Layer, Service};

use super::config::{IdempotencyConfig, KeyPolicy};
use super::error::{begin_failed, commit_failed, commit_unknown};
use super::key::{fingerprint, lock_id, parse_key};
use super::record::{self, NewRecord, ReadBack, Stored, Verdict};
use super::scope::{SharedTx, TakeError};
use super::tx::{Claim, Ended, Found, Tx};
use crate::problem::{db_error, internal_error, Problem};
use crate::store::{is_connection_error, is_unique_violation, now_ms, Backend, CommitOutcome, Db};

/// Wraps axum routes in [`Idempotency`]: a transaction per request and,
/// when the request carries an `Idempotency-Key`, at-most-once execution
/// with the response replayed to repeats. See the [module docs](super).
#[derive(Debug, Clone)]
pub struct IdempotencyLayer {
    config: Arc<IdempotencyConfig>,
}

impl IdempotencyLayer {
    /// A layer with this configuration.
    pub fn new(config: IdempotencyConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Debug, Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<IdempotencyConfig>,
}

impl<S> Service<Request> for Idempotency<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The clone that was polled ready serves this request.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        let config = self.config.clone();
        Box::pin(async move { Ok(handle(config, inner, req).await) })
    }
}

async fn call_inner<S>(mut inner: S, req: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    match inner.call(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    }
}

async fn handle<S>(config: Arc<IdempotencyConfig>, inner: S, req: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
{
    // The caller's identity is checked on every request, keyed or not: an
    // unusable one is refused, never mistaken for another caller.
    let (parts, body) = req.into_parts();
    let scope = match config.scope_of(&parts) {
        Ok(scope) => scope,
        Err(problem) => return problem.into_response(),
    };
    let req = Request::from_parts(parts, body);
    match parse_key(req.headers()) {
        Err(problem) => problem.into_response(),
        Ok(None) if config.key_policy == KeyPolicy::Required => {
            Problem::new(StatusCode::BAD_REQUEST, "idempotency key required")
                .kind("idempotency-key-required")
                .detail("this endpoint requires an Idempotency-Key header")
                .into_response()
        }
        Ok(None) => without_key(&config, inner, req).await,
        Ok(Some(key)) => with_key(&config, inner, req, scope, key)
            .await
            .unwrap_or_else(IntoResponse::into_response),
    }
}

/// Who begins and ends a request's transaction: the layer itself, or the
/// batch the request is part of (a [`SharedTx`] in its extensions), which
/// commits once for all its sub-requests.
enum Owner {
    Own(Db),
    Batch(SharedTx),
}

impl Owner {
    fn of(config: &IdempotencyConfig, extensions: &http::Extensions) -> Self {
        match extensions.get::<SharedTx>() {
            Some(shared) => Owner::Batch(shared.clone()),
            None => Owner::Own(config.db.clone()),
        }
    }

    async fn begin(
        &self,
        config: &IdempotencyConfig,
    ) -> Result<Transaction<'static, Any>, Problem> {
        match self {
            Owner::Own(db) => db
                .begin()
                .await
                .map_err(|e| begin_failed(e, config.retry_after_secs())),
            Owner::Batch(shared) => shared.take().await.map_err(|e| match e {
                TakeError::InUse => internal_error("the batch's transaction is in use"),
                TakeError::Begin(e) => begin_failed(e, config.retry_after_secs()),
            }),
        }
    }

    /// Nothing that must stay was written (a replay): roll back, or hand the
    /// batch its transaction back.
    async fn release(&self, t: Transaction<'static, Any>) {
        match self {
            Owner::Own(_) => rollback(t).await,
            Owner::Batch(shared) => shared.give_back(t, Vec::new()).await,
        }
    }

    /// Refused or failed: roll back; in a batch, the whole batch rolls back.
    async fn abandon(&self, t: Transaction<'static, Any>) {
        match self {
            Owner::Own(_) => rollback(t).await,
            Owner::Batch(shared) => shared.give_back_failed(t).await,
        }
    }

    /// Refused by its handler: roll back. In a batch, the whole batch rolls
    /// back only if something ran in its transaction for this request
    /// (`tx` was locked); a refusal that touched nothing (bad input, a
    /// back-pressure 503) leaves it as it was, its held writes are dropped,
    /// and the others go on: its answer is the one it would get alone.
    async fn refuse(&self, t: Transaction<'static, Any>, tx: &Tx) {
        if tx.touched() {
            self.abandon(t).await;
        } else {
            self.release(t).await;
        }
    }

    /// Success: commit (resolving an ambiguous commit; `xid` is the
    /// transaction's id when already read, `Some(None)` for "asked: none"),
    /// then run the hooks. In a batch: hand the transaction back with the
    /// hooks; the batch writes the records, commits (with the id its
    /// record insert reads) and runs them.
    async fn complete(
        &self,
        config: &IdempotencyConfig,
        t: Transaction<'static, Any>,
        xid: Option<Option<i64>>,
        tx: &Tx,
    ) -> Result<(), Problem> {
        match self {
            Owner::Own(db) => {
                let outcome = match xid {
                    Some(xid) => db.commit_resolved_as(t, xid).await,
                    None => db.commit_resolved(t).await,
                };
                committed(config, outcome)?;
                tx.run_hooks().await;
            }
            Owner::Batch(shared) => {
                shared.defer_writes(tx.take_held());
                shared.give_back(t, tx.take_hooks()).await;
            }
        }
        Ok(())
    }
}

/// Whether an answer refuses the request: 4xx (bad input, a conflict, not
/// found) or 5xx. A refused request rolls back and is not recorded, so it
/// changes nothing, and a retry with the same key runs again.
fn refused(status: StatusCode) -> bool {
    status.is_client_error() || status.is_server_error()
}

/// Transaction per request: commit unless refused (4xx, 5xx), then the hooks.
async fn without_key<S>(config: &IdempotencyConfig, inner: S, mut req: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let owner = Owner::of(config, req.extensions());
    let tx = match &owner {
        Owner::Own(db) => Tx::lazy(db.clone()),
        Owner::Batch(_) => match owner.begin(config).await {
            Ok(t) => Tx::batched(t),
            Err(p) => return p.into_response(),
        },
    };
    tx.signal_from(req.extensions());
    req.extensions_mut().insert(tx.clone());
    let res = call_inner(inner, req).await;
    let transaction = tx.finish().await;
    if refused(res.status()) {
        if let Some(t) = transaction {
            owner.refuse(t, &tx).await;
        }
        return res;
    }
    match transaction {
        Some(t) => {
            if let Err(p) = owner.complete(config, t, None, &tx).await {
                return p.into_response();
            }
        }
        None => tx.run_hooks().await,
    }
    res
}

/// The answer to a commit's outcome: `Ok` if it committed, else the problem.
fn committed(config: &IdempotencyConfig, outcome: CommitOutcome) -> Result<(), Problem> {
    match outcome {
        CommitOutcome::Committed => Ok(()),
        CommitOutcome::RolledBack(e) => Err(commit_failed(e, config.retry_after_secs())),
        CommitOutcome::Unknown(e) => Err(commit_unknown(e, config.retry_after_secs())),
    }
}

fn in_flight(config: &IdempotencyConfig) -> Problem {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_conflicts_total").increment(1);
    Problem::conflict(
        "request in flight",
        "a request with this Idempotency-Key is still being processed; retry later",
    )
    .kind("idempotency-key-in-flight")
    .retry_after(config.retry_after_secs())
}

/// The 422 answer to a key used again for a different request (method,
/// path or body).
pub fn key_reused() -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency key reused")
        .kind("idempotency-key-reused")
        .detail(
            "this Idempotency-Key was already used for a different request (method, path or body)",
        )
}

/// Replays a completed record, or 422 if it answered another request.
fn answer_from(stored: Stored, fp: &str) -> Result<Response, Problem> {
    if stored.fingerprint != fp {
        tracing::debug!("idempotency key reused with a different fingerprint");
        #[cfg(feature = "metrics")]
        metrics::counter!("idempotency_mismatches_total").increment(1);
        return Err(key_reused());
    }
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_replays_total").increment(1);
    Ok(record::replay(stored))
}

/// Rolls `tx` back; a failure is logged (the connection discards it anyway).
pub(crate) async fn rollback(tx: Transaction<'static, Any>) {
    if let Err(e) = tx.rollback().await {
        tracing::warn!(error = %e, "rollback failed (the connection discards the transaction)");
    }
}

async fn with_key<S>(
    config: &IdempotencyConfig,
    inner: S,
    req: Request,
    scope: String,
    key: String,
) -> Result<Response, Problem>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
{
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, config.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large").detail(
                    format!(
                        "requests with an Idempotency-Key may carry at most {} bytes",
                        config.max_body_bytes
                    ),
                ),
            );
        }
        Err(e) => {
            return Err(Problem::bad_request(format!(
                "cannot read the request body: {e}"
            )));
        }
    };
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |o| &o.0);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let fp = fingerprint(&parts.method, path, &body);
    tracing::debug!(%scope, %key, "request with idempotency key");
    let request = Keyed {
        scope,
        key,
        fp,
        body,
    };
    let owner = Owner::of(config, &parts.extensions);
    match (&owner, config.db.backend()) {
        (Owner::Own(_), Backend::Postgres) if config.handler_first => {
            deferred(config, inner, parts, request).await
        }
        _ => claim_first(config, owner, inner, parts, &request).await,
    }
}

/// A request with a key, its body read.
struct Keyed {
    scope: String,
    key: String,
    /// Its fingerprint (method, path, body).
    fp: String,
    body: Bytes,
}

/// The key first: begin, look it up (with its lock), and run the handler
/// in the transaction only if the key is this request's. SQLite, batches,
/// and a Postgres request that [`deferred`] sends back.
async fn claim_first<S>(
    config: &IdempotencyConfig,
    owner: Owner,
    inner: S,
    mut parts: http::request::Parts,
    req: &Keyed,
) -> Result<Response, Problem>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let (scope, key) = (req.scope.as_str(), req.key.as_str());
    let db = &config.db;
    let mut transaction = owner.begin(config).await?;
    let found = match (&owner, db.backend()) {
        // In a batch: with the other sub-requests' keys, in one statement.
        (Owner::Batch(shared), _) => shared.lookup(&mut transaction, db, scope, key).await,
        (Owner::Own(_), Backend::Postgres) => {
            let id = lock_id(db.schema(), scope, key);
            record::lock_and_lookup(&mut *transaction, id, scope, key).await
        }
        // BEGIN IMMEDIATE holds the only write lock: nobody else is in flight.
        (Owner::Own(_), Backend::Sqlite) => record::lookup(&mut *transaction, scope, key)
            .await
            .map(|r| (true, r)),
    };
    let (locked, stored) = match found {
        Ok(found) => found,
        Err(e) => {
            owner.abandon(transaction).await;
            return Err(db_error(e));
        }
    };
    let mut cleared = false;
    match record::classify(locked, stored, now_ms()) {
        Verdict::Replay(stored) => {
            owner.release(transaction).await;
            tracing::debug!(%scope, %key, "replaying completed idempotency record");
            return answer_from(stored, &req.fp);
        }
        Verdict::Expired => {
            tracing::debug!(%scope, %key, "idempotency record expired; treating as absent");
            if let Err(e) = record::delete(&mut *transaction, scope, key).await {
                owner.abandon(transaction).await;
                return Err(db_error(e));
            }
            cleared = true;
        }
        Verdict::Absent => {}
        Verdict::InFlight => {
            owner.abandon(transaction).await;
            tracing::debug!(%scope, %key, "idempotency key in flight elsewhere");
            return Err(in_flight(config));
        }
    }

    // In flight: run the handler in this transaction.
    let tx = match &owner {
        Owner::Batch(_) => Tx::batched(transaction),
        Owner::Own(_) => Tx::active(transaction),
    };
    if cleared {
        tx.touch();
    }
    tx.signal_from(&parts.extensions);
    parts.extensions.insert(tx.clone());
    let res = call_inner(
        inner,
        Request::from_parts(parts, Body::from(req.body.clone())),
    )
    .await;
    let Some(transaction) = tx.finish().await else {
        return Err(internal_error("the request's transaction disappeared"));
    };
    record_and_commit(config, &owner, transaction, &tx, res, req).await
}

/// The handler has run in `transaction`, with the key claimed: roll back a
/// refusal; otherwise store the answer as the key's record and commit (in
/// a batch, hand both to the batch).
async fn record_and_commit(
    config: &IdempotencyConfig,
    owner: &Owner,
    mut transaction: Transaction<'static, Any>,
    tx: &Tx,
    res: Response,
    req: &Keyed,
) -> Result<Response, Problem> {
    let db = &config.db;
    let (scope, key, fp) = (req.scope.as_str(), req.key.as_str(), req.fp.as_str());
    if refused(res.status()) {
        owner.refuse(transaction, tx).await;
        return Ok(res);
    }
    let (res_parts, res_body) = match buffered(res).await {
        Ok(buffered) => buffered,
        Err(p) => {
            owner.abandon(transaction).await;
            return Err(p);
        }
    };
    let new = new_record(config, req, &res_parts, &res_body);
    // In a batch the record is inserted with the others', before the
    // batch's commit (a key answered twice fails that insert, and the
    // batch runs its requests one by one).
    let inserted = match owner {
        Owner::Batch(shared) => {
            shared.defer_record(new.to_owned_record());
            Ok(None)
        }
        Owner::Own(_) => record::insert(&mut *transaction, &new, db.backend()).await,
    };
    let xid = match inserted {
        Ok(xid) => xid,
        Err(e) if is_unique_violation(&e) => {
            // Another request with this key committed after our lookup: our
            // writes go, theirs stand, and we answer with their response.
            owner.abandon(transaction).await;
            tracing::debug!(%scope, %key, "lost the race for an idempotency key; replaying");
            return match record::lookup(db.pool(), scope, key).await {
                Ok(Some(stored)) if stored.expires_at > now_ms() => answer_from(stored, fp),
                Ok(_) => Err(in_flight(config)),
                Err(e) => Err(db_error(e)),
            };
        }
        Err(e) => {
            owner.abandon(transaction).await;
            return Err(db_error(e));
        }
    };
    let xid = xid.map(Some);
    owner.complete(config, transaction, xid, tx).await?;
    Ok(Response::from_parts(res_parts, Body::from(res_body)))
}

/// The response with its body read, to be stored.
async fn buffered(res: Response) -> Result<(http::response::Parts, Bytes), Problem> {
    let (parts, body) = res.into_parts();
    match body.collect().await {
        Ok(collected) => Ok((parts, collected.to_bytes())),
        Err(e) => Err(internal_error(format_args!(
            "cannot buffer the response: {e}"
        ))),
    }
}

/// The record of `req`'s answer.
fn new_record<'a>(
    config: &IdempotencyConfig,
    req: &'a Keyed,
    parts: &http::response::Parts,
    body: &'a [u8],
) -> NewRecord<'a> {
    let now = now_ms();
    NewRecord {
        scope: &req.scope,
        key: &req.key,
        fingerprint: &req.fp,
        status: i64::from(parts.status.as_u16()),
        headers: record::encode_headers(&parts.headers),
        body,
        created_at: now,
        expires_at: now.saturating_add(config.ttl_ms()),
    }
}

/// Postgres, a request with a key in a transaction of its own: the handler
/// first, the key after, and the whole request in one round trip when it
/// can be.
///
/// The handler runs with nothing begun. The writes it hands to
/// [`Tx::write`] wait; once it has answered, they and the key's record run
/// as one statement, outside any transaction, so it commits on its own (see
/// [`record::insert_with_writes`]). Where that cannot decide the request,
/// it runs the usual way ([`claim_first`]):
///
/// - the statement fails with an answer from the server (the key has a
///   record, completed or expired; another request holds it; a write of the
///   handler's is refused): nothing was kept, and the request runs again
///   the usual way, which replays the record, answers 409, or lets the
///   handler answer its own write's error;
/// - the handler calls [`Tx::lock`] (it reads, or needs its writes' errors):
///   the lock begins the transaction and claims the key as the usual way
///   would have before the handler, and finishes it the usual way;
/// - the handler refuses the request (4xx, 5xx): if the key has a live
///   record, that answers instead, as it would have before the handler ran.
///
/// A statement whose answer is lost is read back through the key: the
/// record is found (the request's own, or a twin's that is replayed), or,
/// if none turns up within a few seconds, 503 "outcome unknown", which a
/// retry with the same key resolves.
async fn deferred<S>(
    config: &IdempotencyConfig,
    inner: S,
    mut parts: http::request::Parts,
    req: Keyed,
) -> Result<Response, Problem>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone,
{
    let db = &config.db;
    let claim = Claim {
        lock_id: lock_id(db.schema(), &req.scope, &req.key),
        scope: req.scope.clone(),
        key: req.key.clone(),
    };
    let again = (inner.clone(), parts.clone());
    let tx = Tx::deferred(db.clone(), claim.clone());
    tx.signal_from(&parts.extensions);
    parts.extensions.insert(tx.clone());
    let res = call_inner(
        inner,
        Request::from_parts(parts, Body::from(req.body.clone())),
    )
    .await;
    let writes = match tx.end().await {
        Ended::Answered(Found::Record(stored)) => {
            tracing::debug!(scope = %req.scope, key = %req.key, "replaying completed idempotency record");
            return answer_from(stored, &req.fp);
        }
        Ended::Answered(Found::InFlight) => return Err(in_flight(config)),
        Ended::Begun(transaction) => {
            let owner = Owner::Own(db.clone());
            return record_and_commit(config, &owner, transaction, &tx, res, &req).await;
        }
        Ended::Gone => {
            // A write failed in a begun transaction (rolled back): the
            // handler's answer is a refusal, or it ignored the failure.
            if refused(res.status()) {
                return Ok(res);
            }
            return Err(internal_error(
                "the handler answered although its writes failed",
            ));
        }
        Ended::Held(writes) => writes,
    };
    if refused(res.status()) {
        // The key was never looked up: a completed record answers, as it
        // would have before the handler ran.
        return match record::lookup(db.pool(), &req.scope, &req.key).await {
            Ok(Some(stored)) if stored.expires_at > now_ms() => answer_from(stored, &req.fp),
            _ => Ok(res),
        };
    }
    let (res_parts, res_body) = buffered(res).await?;
    let new = new_record(config, &req, &res_parts, &res_body).to_owned_record();
    // A connection first: a failure to get one sent nothing.
    let mut conn = match db.pool().acquire().await {
        Ok(conn) => conn,
        Err(e) => return Err(begin_failed(e, config.retry_after_secs())),
    };
    let sent = record::insert_with_writes(&mut conn, writes, new.clone(), claim.lock_id).await;
    if sent.is_err() {
        // Postgres sends a statement's error before it aborts the
        // statement's transaction, and so before the key's lock is gone: a
        // run the usual way, on another connection, could find the key
        // still locked and answer 409 "in flight" to its own request. The
        // server answers the next statement only once the abort is over.
        // Bounded: a connection that went silent must not hold the request.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&mut *conn),
        )
        .await;
    }
    drop(conn);
    let err = match sent {
        Ok(()) => {
            tx.run_hooks().await;
            return Ok(Response::from_parts(res_parts, Body::from(res_body)));
        }
        Err(e) => e,
    };
    match refusal(&err) {
        Refusal::Busy => {
            // A lock or statement timeout: nothing was kept, and the usual
            // way would wait as long again.
            drop(tx.take_hooks());
            return Err(db_error(err));
        }
        Refusal::Refused => {
            // The server refused the statement, so it kept nothing: run the
            // request the usual way, which says why.
            drop(tx.take_hooks());
            tracing::debug!(scope = %req.scope, key = %req.key, error = %err,
                "one-statement request refused; running it the usual way");
            let (inner, parts) = again;
            let owner = Owner::Own(db.clone());
            return claim_first(config, owner, inner, parts, &req).await;
        }
        Refusal::Unknown => {}
    }
    tracing::warn!(error = %err, "one-statement request failed without an answer; reading its key back");
    match record::read_back(db.pool(), &new).await {
        ReadBack::Ours => {
            tracing::warn!(scope = %req.scope, key = %req.key, "the request did commit");
            tx.run_hooks().await;
            Ok(Response::from_parts(res_parts, Body::from(res_body)))
        }
        ReadBack::Theirs(stored) => {
            drop(tx.take_hooks());
            answer_from(stored, &req.fp)
        }
        ReadBack::Unknown => {
            drop(tx.take_hooks());
            Err(commit_unknown(err, config.retry_after_secs()))
        }
    }
}

/// What an error of a statement that commits on its own says about it.
enum Refusal {
    /// The server refused it for a lock or statement timeout: nothing kept.
    Busy,
    /// The server refused it (bad data, a constraint, a conflict): nothing
    /// kept.
    Refused,
    /// No answer, or one that does not say: it may have committed.
    Unknown,
}

/// Reads a failed self-committing statement's error. Only errors whose
/// SQLSTATE class means the statement itself failed count as refusals:
/// data exceptions (22), integrity constraints (23), transaction rollbacks
/// such as serialization failures and deadlocks (40), syntax and access
/// (42), `lock_not_available` and `query_canceled`. Anything else (a lost
/// connection, a server shutting down, an internal error while committing)
/// may have come after the commit.
fn refusal(err: &sqlx::Error) -> Refusal {
    let sqlx::Error::Database(db) = err else {
        return Refusal::Unknown;
    };
    if is_connection_error(err) {
        return Refusal::Unknown;
    }
    match db.code().as_deref() {
        Some("55P03" | "57014") => Refusal::Busy,
        Some(code) if ["22", "23", "40", "42"].iter().any(|c| code.starts_with(c)) => {
            Refusal::Refused
        }
        _ => Refusal::Unknown,
    }
}
