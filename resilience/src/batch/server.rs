//! Server side: a batch's sub-requests run through the app in one
//! transaction, or, if one of them is refused, each in its own.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::ServiceExt;

use super::{
    b64, header_pairs, hop_by_hop, BatchRequest, BatchResponse, SubRequest, SubResponse,
    DEFAULT_PATH,
};
use crate::idempotency::{commit_unknown, rollback, AfterCommit, CommitSignal, Finished, SharedTx};
use crate::problem::{internal_error, Problem};
use crate::store::{CommitOutcome, Db};

/// How the batch route is served.
#[derive(Debug, Clone)]
pub struct BatchServerConfig {
    /// The database the app's idempotency layers use: the shared
    /// transaction is begun on it.
    pub db: Db,
    /// The route (default [`DEFAULT_PATH`]).
    pub path: String,
    /// Requests in one batch at most (default 256).
    pub max_requests: usize,
    /// Bytes of the batch's body at most (default 4 MiB).
    pub max_body_bytes: usize,
    /// Sub-requests carrying one of these headers are refused (the whole
    /// batch answers 400): for layers that act before the idempotency layer
    /// and must see their request's own commit.
    pub refused_headers: Vec<HeaderName>,
    /// `Retry-After` (seconds) of a 503 for the whole batch.
    pub retry_after_secs: u64,
    /// The routes a sub-request may name, as `(method, pattern)`; a pattern
    /// matches segment by segment, `{name}` matching any one segment. Empty:
    /// every route of the app. Allow only routes whose requests run through
    /// an idempotency layer: anything else runs outside the batch's
    /// transaction, and on SQLite a route that writes on its own would wait
    /// for the writer the batch holds.
    pub allowed: Vec<(Method, String)>,
    /// Headers in one sub-request at most (default 64).
    pub max_headers: usize,
    /// Batches served at once (default 8): a batch past it waits for its
    /// turn, before its body is read, up to `max_wait`.
    pub max_concurrent: usize,
    /// How long a batch waits for its turn before a 503 (default 2 s).
    pub max_wait: std::time::Duration,
    /// How long the sub-requests may take together in the shared
    /// transaction (default 10 s): past it, the batch rolls back and
    /// answers 503 as a whole, and nothing of it is kept.
    pub max_duration: std::time::Duration,
}

impl BatchServerConfig {
    /// The defaults over `db`.
    pub fn new(db: Db) -> Self {
        Self {
            db,
            path: DEFAULT_PATH.to_owned(),
            max_requests: 256,
            max_body_bytes: 4 << 20,
            refused_headers: Vec::new(),
            retry_after_secs: 1,
            allowed: Vec::new(),
            max_headers: 64,
            max_concurrent: 8,
            max_wait: std::time::Duration::from_secs(2),
            max_duration: std::time::Duration::from_secs(10),
        }
    }

    /// Lets sub-requests name `method pattern` (see [`Self::allowed`]).
    pub fn allow(mut self, method: Method, pattern: &str) -> Self {
        self.allowed.push((method, pattern.to_owned()));
        self
    }

    pub(super) fn allows(&self, method: &Method, path: &str) -> bool {
        self.allowed.is_empty()
            || self
                .allowed
                .iter()
                .any(|(m, pattern)| m == method && path_matches(pattern, path))
    }

    /// Refuses sub-requests that carry `header`.
    pub fn refuse_header(mut self, header: HeaderName) -> Self {
        self.refused_headers.push(header);
        self
    }
}

struct BatchState {
    app: Router,
    config: BatchServerConfig,
    turns: tokio::sync::Semaphore,
}

/// `pattern` against `path`, segment by segment; `{name}` matches any one
/// non-empty segment.
fn path_matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.split('/');
    let mut q = path.split('/');
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) => {
                let wild = a.starts_with('{') && a.ends_with('}');
                if !(a == b || wild && !b.is_empty()) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// `app` with the batch route added: `POST {config.path}` runs its
/// sub-requests through `app` itself. See the [module docs](super).
pub fn router(app: Router, config: BatchServerConfig) -> Router {
    app.clone().merge(route(app, config))
}

/// The batch route alone (to layer it, e.g. with metrics or tracing, before
/// merging it into `app`): `POST {config.path}` runs its sub-requests
/// through `app`.
pub fn route(app: Router, config: BatchServerConfig) -> Router {
    let path = config.path.clone();
    let state = Arc::new(BatchState {
        app: app.clone(),
        turns: tokio::sync::Semaphore::new(config.max_concurrent.max(1)),
        config,
    });
    let batch = Router::new()
        .route(
            &path,
            post(handle).fallback(|| async {
                let mut res = Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
                    .detail("the batch route takes POST only")
                    .into_response();
                res.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
                res
            }),
        )
        .with_state(state);
    batch
}

async fn handle(State(state): State<Arc<BatchState>>, req: Request) -> Response {
    // The batch finishes (commits or rolls back, and runs its hooks) even if
    // the caller hangs up.
    match tokio::spawn(run(state, req)).await {
        Ok(Ok(res)) => res,
        Ok(Err(problem)) => problem.into_response(),
        Err(e) => internal_error(format_args!("batch task failed: {e}")).into_response(),
    }
}

/// What a sub-request of a batch can know of the batch it runs in: the
/// paths of all its sub-requests, and a memo that they share. It is in the
/// request's extensions (`Option<Extension<BatchScope>>` in a handler) while
/// the sub-requests run together in the batch's one transaction, and absent
/// when a request runs alone (also when a failed batch runs its requests
/// one by one).
///
/// A handler can use it to read, in its first sub-request, the rows that
/// all of them will need, and keep them in the memo for the others: in the
/// batch's transaction, under the locks it took, they stay as read, except
/// for what the batch's own requests write.
#[derive(Clone)]
pub struct BatchScope {
    paths: Arc<[String]>,
    memo: Arc<std::sync::Mutex<http::Extensions>>,
}

impl BatchScope {
    fn new(paths: Vec<String>) -> Self {
        Self {
            paths: paths.into(),
            memo: Arc::default(),
        }
    }

    /// The sub-requests' paths (with their queries), in the batch's order.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// The memo's value of type `T`, made by `init` the first time.
    pub fn memo<T: Clone + Send + Sync + 'static>(&self, init: impl FnOnce() -> T) -> T {
        let mut memo = self
            .memo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = memo.get::<T>() {
            return v.clone();
        }
        let v = init();
        memo.insert(v.clone());
        v
    }
}

impl std::fmt::Debug for BatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchScope")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// One sub-request, checked and decoded.
pub(super) struct Item {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    /// What the request carried in (a coalesced request's connection
    /// info and the like); empty for a sub-request of `POST /batch`.
    pub(super) extensions: http::Extensions,
}

impl Item {
    fn parse(i: usize, sub: SubRequest, config: &BatchServerConfig) -> Result<Self, Problem> {
        let bad = |what: String| Problem::bad_request(format!("request {i}: {what}"));
        let method = Method::from_bytes(sub.method.as_bytes())
            .map_err(|_| bad(format!("invalid method {:?}", sub.method)))?;
        if method == Method::GET || method == Method::HEAD {
            // A batch holds a write transaction: a read (a long poll above
            // all) has no place in it.
            return Err(bad(format!(
                "{method} cannot be batched (a batch carries writes)"
            )));
        }
        if !sub.path.starts_with('/') {
            return Err(bad("the path must start with /".to_owned()));
        }
        let path = PathAndQuery::try_from(sub.path.as_str())
            .map_err(|e| bad(format!("invalid path: {e}")))?;
        if path.path() == config.path {
            return Err(bad("a batch cannot contain a batch".to_owned()));
        }
        if !config.allows(&method, path.path()) {
            return Err(bad(format!("{method} {} cannot be batched", path.path())));
        }
        if sub.headers.len() > config.max_headers {
            return Err(bad(format!(
                "{} headers; at most {} in one request",
                sub.headers.len(),
                config.max_headers
            )));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &sub.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| bad(format!("invalid header name {name:?}")))?;
            if config.refused_headers.contains(&name) {
                return Err(bad(format!("header {name} cannot be batched")));
            }
            if hop_by_hop(name.as_str()) {
                continue;
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| bad(format!("invalid value of header {name}")))?;
            headers
                .try_append(name, value)
                .map_err(|_| bad("too many headers".to_owned()))?;
        }
        let body = b64()
            .decode(sub.body.as_bytes())
            .map_err(|e| bad(format!("the body is not base64: {e}")))?;
        Ok(Self {
            method,
            uri: Uri::from(path),
            headers,
            body: Bytes::from(body),
            extensions: http::Extensions::new(),
        })
    }

    pub(super) fn request(&self) -> Request {
        let mut req = Request::new(Body::from(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        *req.extensions_mut() = self.extensions.clone();
        req
    }
}

/// A sub-request's answer, buffered.
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Answer {
    /// The answer as the response to a request of its own.
    pub(super) fn into_response(self) -> Response {
        let mut res = Response::new(Body::from(self.body));
        *res.status_mut() = self.status;
        *res.headers_mut() = self.headers;
        res
    }

    fn into_sub(self) -> SubResponse {
        SubResponse {
            status: self.status.as_u16(),
            headers: header_pairs(&self.headers),
            body: b64().encode(&self.body),
        }
    }
}

pub(super) async fn dispatch(app: &Router, req: Request) -> Answer {
    let res = match app.clone().oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let (parts, body) = res.into_parts();
    match body.collect().await {
        Ok(collected) => Answer {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
        },
        Err(e) => problem_answer(internal_error(format!("cannot buffer the answer: {e}"))).await,
    }
}

async fn run(state: Arc<BatchState>, req: Request) -> Result<Response, Problem> {
    let config = &state.config;
    let json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(
            Problem::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type")
                .detail("a batch is sent as application/json"),
        );
    }
    // Its turn first, then its body: the batches waiting hold no memory.
    let _turn = match tokio::time::timeout(config.max_wait, state.turns.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return Err(Problem::unavailable("too many batches at once")
                .retry_after(config.retry_after_secs))
        }
    };
    let body = match Limited::new(req.into_body(), config.max_body_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "batch too large").detail(format!(
                    "a batch may carry at most {} bytes",
                    config.max_body_bytes
                )),
            );
        }
        Err(e) => {
            return Err(Problem::bad_request(format!(
                "cannot read the request body: {e}"
            )))
        }
    };
    let batch: BatchRequest = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("invalid batch: {e}")))?;
    let n = batch.requests.len();
    if n == 0 || n > config.max_requests {
        return Err(Problem::bad_request(format!(
            "a batch carries 1 to {} requests, not {n}",
            config.max_requests
        )));
    }
    let items = batch
        .requests
        .into_iter()
        .enumerate()
        .map(|(i, sub)| Item::parse(i, sub, config))
        .collect::<Result<Vec<_>, _>>()?;
    let pending = run_items(&state.app, config, &items, Origin::Batch).await?;
    // Each request's hooks in their order, the requests' side by side: one
    // slow hook (a call to a peer) does not hold up the others.
    let answers = futures::future::join_all(pending.into_iter().map(Pending::resolve)).await;
    Ok(respond(answers))
}

/// A sub-request's answer, once what follows its commit has run.
pub(super) enum Pending {
    /// Nothing follows.
    Ready(Answer),
    /// Committed with the batch: its after-commit hooks, in their order,
    /// then the answer.
    Hooks(Answer, Vec<AfterCommit>),
    /// Run alone: its transaction is over, and the rest (its hooks) goes on
    /// in a task of its own.
    Task(tokio::task::JoinHandle<Answer>),
}

impl Pending {
    /// The answer, after the hooks.
    pub(super) async fn resolve(self) -> Answer {
        match self {
            Pending::Ready(answer) => answer,
            Pending::Hooks(answer, hooks) => {
                for hook in hooks {
                    hook().await;
                }
                answer
            }
            Pending::Task(task) => match task.await {
                Ok(answer) => answer,
                Err(e) => {
                    let problem = internal_error(format!("request task failed: {e}"));
                    problem_answer(problem).await
                }
            },
        }
    }
}

/// A problem as a buffered answer.
pub(super) async fn problem_answer(problem: Problem) -> Answer {
    let (parts, body) = problem.into_response().into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Runs `req` alone through `app` in a task of its own, and returns once
/// its transaction is over: committed (its after-commit hooks, which may
/// call a peer, go on in the task) or finished without a commit.
pub(super) async fn dispatch_alone(app: &Router, mut req: Request) -> Pending {
    let signal = CommitSignal::default();
    req.extensions_mut().insert(signal.clone());
    let app = app.clone();
    let mut task = tokio::spawn(async move { dispatch(&app, req).await });
    tokio::select! {
        () = signal.0.notified() => Pending::Task(task),
        done = &mut task => match done {
            Ok(answer) => Pending::Ready(answer),
            Err(e) => {
                let problem = internal_error(format!("request task failed: {e}"));
                Pending::Ready(problem_answer(problem).await)
            }
        },
    }
}

/// Runs `items` through `app`: together in one transaction, or, if one of
/// them is refused, each alone. Their answers, in order, each pending what
/// follows its commit; an error is the answer of all of them (the shared
/// run took too long, or its commit's outcome is unknown).
/// Where a batch's items come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// One `POST /batch` from one caller: its sub-requests share a
    /// [`BatchScope`], and it is counted in `batch_requests`.
    Batch,
    /// Requests of several clients grouped by [`Coalesce`](super::Coalesce):
    /// no scope (one client's paths are not another's business); counted
    /// in `coalesced_requests` by the caller.
    Coalesced,
}

pub(super) async fn run_items(
    app: &Router,
    config: &BatchServerConfig,
    items: &[Item],
    origin: Origin,
) -> Result<Vec<Pending>, Problem> {
    let n = items.len();
    #[cfg(feature = "signing")]
    let nonces = crate::signing::BatchNonces::new();
    let db = &config.db;
    // Begun when the first sub-request reaches its idempotency layer.
    let shared = SharedTx::lazy(db.clone());
    // Their keys are looked up together, by the first that looks one up.
    shared.expect_keys(
        items
            .iter()
            .filter_map(|item| crate::idempotency::parse_key(&item.headers).ok().flatten())
            .collect(),
    );
    // First run: every sub-request in the shared transaction, in order,
    // until one is refused.
    let scope = BatchScope::new(items.iter().map(|item| item.uri.to_string()).collect());
    let mut answers: Vec<Answer> = Vec::with_capacity(n);
    let mut joined: Vec<bool> = Vec::with_capacity(n);
    // Whose each set of hooks handed back is.
    let mut hook_owners: Vec<usize> = Vec::new();
    let first_run = async {
        for (i, item) in items.iter().enumerate() {
            let mut req = item.request();
            req.extensions_mut().insert(shared.clone());
            if origin == Origin::Batch {
                req.extensions_mut().insert(scope.clone());
            }
            #[cfg(feature = "signing")]
            req.extensions_mut().insert(nonces.clone());
            let before = shared.joined();
            let hooks_before = shared.hook_sets();
            answers.push(dispatch(app, req).await);
            joined.push(shared.joined() > before);
            hook_owners.extend(std::iter::repeat_n(i, shared.hook_sets() - hooks_before));
            if shared.failed() {
                break;
            }
        }
    };
    if tokio::time::timeout(config.max_duration, first_run)
        .await
        .is_err()
    {
        // The sub-request running now was dropped where it stood; what the
        // others wrote rolls back with the transaction (dropped below).
        if let Finished::Done(tx, _) = shared.finish().await {
            rollback(tx).await;
        }
        tracing::warn!(n, limit = ?config.max_duration, "batch took too long; rolled back");
        return Err(
            Problem::unavailable("the batch took too long").retry_after(config.retry_after_secs)
        );
    }
    match shared.finish().await {
        // Nothing ran in a transaction: every answer stands.
        Finished::NotBegun => return Ok(answers.into_iter().map(Pending::Ready).collect()),
        Finished::Lost => tracing::warn!(
            n,
            "a sub-request lost the batch's transaction; running the batch one by one"
        ),
        Finished::Done(tx, _) if shared.failed() => rollback(tx).await,
        Finished::Done(mut tx, hooks) => {
            // Every answer's idempotency record, in one statement per 100.
            let outcome = match shared.write_records(&mut tx, db.backend()).await {
                Ok(Some(xid)) => db.commit_resolved_as(tx, Some(xid)).await,
                Ok(None) => db.commit_resolved(tx).await,
                Err(e) => {
                    rollback(tx).await;
                    CommitOutcome::RolledBack(e)
                }
            };
            match outcome {
                CommitOutcome::Committed => {
                    #[cfg(feature = "metrics")]
                    if origin == Origin::Batch {
                        metrics::histogram!("batch_requests", "outcome" => "committed")
                            .record(n as f64);
                    }
                    debug_assert_eq!(hooks.len(), hook_owners.len(), "hooks without an owner");
                    let mut own: Vec<Vec<AfterCommit>> =
                        answers.iter().map(|_| Vec::new()).collect();
                    for (set, i) in hooks.into_iter().zip(hook_owners) {
                        if let Some(slot) = own.get_mut(i) {
                            slot.extend(set);
                        }
                    }
                    return Ok(answers
                        .into_iter()
                        .zip(own)
                        .map(|(answer, hooks)| {
                            if hooks.is_empty() {
                                Pending::Ready(answer)
                            } else {
                                Pending::Hooks(answer, hooks)
                            }
                        })
                        .collect());
                }
                // Nothing was saved: run them one by one below.
                CommitOutcome::RolledBack(e) => {
                    tracing::debug!(error = %e, n, "batch commit rolled back; running its requests one by one");
                }
                // Maybe saved: every request is answered 503 and retried by its
                // sender, whose idempotency key finds what was saved.
                CommitOutcome::Unknown(e) => {
                    return Err(commit_unknown(e, config.retry_after_secs))
                }
            }
        }
    }
    #[cfg(feature = "metrics")]
    if origin == Origin::Batch {
        metrics::histogram!("batch_requests", "outcome" => "one_by_one").record(n as f64);
    }
    // Second run: what ran in the rolled-back transaction, and what never
    // ran, each alone. What ran outside it (a read, a refusal before the
    // idempotency layer) keeps its first answer and is not run twice.
    #[cfg(feature = "signing")]
    let nonces = nonces.for_rerun();
    let mut first = answers.into_iter();
    let mut out = Vec::with_capacity(n);
    for (i, item) in items.iter().enumerate() {
        let earlier = first.next();
        match earlier {
            Some(answer) if !joined[i] => out.push(Pending::Ready(answer)),
            _ => {
                #[allow(unused_mut)] // without `signing` nothing is added
                let mut req = item.request();
                #[cfg(feature = "signing")]
                req.extensions_mut().insert(nonces.clone());
                // The next one starts when this one's transaction is over,
                // not after its hooks.
                out.push(dispatch_alone(app, req).await);
            }
        }
    }
    Ok(out)
}

fn respond(answers: Vec<Answer>) -> Response {
    let body = BatchResponse {
        responses: answers.into_iter().map(Answer::into_sub).collect(),
    };
    match serde_json::to_vec(&body) {
        Ok(json) => (
            StatusCode::OK,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            json,
        )
            .into_response(),
        Err(e) => {
            internal_error(format_args!("cannot encode the batch answer: {e}")).into_response()
        }
    }
}
