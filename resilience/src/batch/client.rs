//! Client side: requests waiting for the same peer leave in one exchange.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, ServiceExt};

use super::{
    b64, header_pairs, BatchRequest, BatchResponse, SubRequest, SubResponse, DEFAULT_PATH,
};

/// How requests are batched.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// The peer's batch route (default [`DEFAULT_PATH`]).
    pub path: String,
    /// Requests in one exchange at most (default 64).
    pub max_batch: usize,
    /// Exchanges in flight to one peer at once (default 2). A request that
    /// finds fewer in flight leaves at once; the others wait for the next.
    pub max_in_flight: usize,
    /// Requests carrying any of these headers always go alone (for example
    /// a receiver's in-memory de-duplication, which must see its own
    /// commit).
    pub unbatched_headers: Vec<HeaderName>,
    /// After a peer answered 404 or 405 to the batch route, how long its
    /// requests go one by one before the route is tried again (default
    /// 60 s): a proxy's passing 404, or an older replica in a rolling
    /// upgrade, does not turn batching off for good.
    pub recheck_after: std::time::Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            path: DEFAULT_PATH.to_owned(),
            max_batch: 64,
            max_in_flight: 2,
            unbatched_headers: Vec::new(),
            recheck_after: std::time::Duration::from_secs(60),
        }
    }
}

/// Wraps the HTTP client in [`Batching`]. See the [module docs](super).
#[derive(Debug, Clone, Default)]
pub struct BatchLayer {
    config: Arc<BatchConfig>,
}

impl BatchLayer {
    /// A layer with this configuration (`max_batch` and `max_in_flight` of
    /// at least 1).
    pub fn new(mut config: BatchConfig) -> Self {
        config.max_batch = config.max_batch.max(1);
        config.max_in_flight = config.max_in_flight.max(1);
        Self {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for BatchLayer {
    type Service = Batching<S>;

    fn layer(&self, inner: S) -> Batching<S> {
        Batching {
            shared: Arc::new(Shared {
                inner,
                config: self.config.clone(),
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// The service made by [`BatchLayer`]: `http::Request<Bytes>` in (with an
/// absolute URI), `http::Response<Bytes>` out. Cheap to clone; clones share
/// the queues.
pub struct Batching<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Batching<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Batching<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batching")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

type Reply = oneshot::Sender<Result<Response<Bytes>, BoxError>>;

struct Waiting {
    req: Request<Bytes>,
    reply: Reply,
}

#[derive(Default)]
struct Peer {
    queue: VecDeque<Waiting>,
    in_flight: usize,
    /// The peer answered 404 or 405 to the batch route: send one by one
    /// until then.
    no_batch_until: Option<std::time::Instant>,
}

impl Peer {
    fn no_batch(&self) -> bool {
        self.no_batch_until
            .is_some_and(|until| std::time::Instant::now() < until)
    }
}

struct Shared<S> {
    inner: S,
    config: Arc<BatchConfig>,
    peers: Mutex<HashMap<String, Peer>>,
}

impl<S> Shared<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Peer>> {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a request sent in a batch got no answer of its own.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch exchange failed (the error of the whole exchange).
    #[error("batch exchange failed: {0}")]
    Exchange(String),
    /// The peer's answer to the batch could not be read.
    #[error("invalid batch answer: {0}")]
    Invalid(String),
    /// The task sending the batch went away (runtime shutting down).
    #[error("batch sender gone")]
    Gone,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<Request<Bytes>> for Batching<S>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Bytes>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner client is awaited per send (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let shared = self.shared.clone();
        let peer = peer_key(&req);
        let alone = peer.is_none()
            || shared
                .config
                .unbatched_headers
                .iter()
                .any(|h| req.headers().contains_key(h));
        let Some(peer) = peer.filter(|_| !alone) else {
            return Box::pin(send_one(shared, req));
        };
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut peers = shared.lock();
            let state = peers.entry(peer.clone()).or_default();
            if state.no_batch() {
                drop(peers);
                return Box::pin(send_one(shared, req));
            }
            state.queue.push_back(Waiting { req, reply });
            let start = state.in_flight < shared.config.max_in_flight;
            if start {
                state.in_flight += 1;
            }
            start
        };
        if start {
            tokio::spawn(flush(shared, peer));
        }
        Box::pin(async move { answer.await.unwrap_or(Err(Box::new(BatchError::Gone))) })
    }
}

/// `scheme://authority` of an absolute URI, the queue a request waits in.
fn peer_key(req: &Request<Bytes>) -> Option<String> {
    let uri = req.uri();
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

async fn send_one<S>(
    shared: Arc<Shared<S>>,
    req: Request<Bytes>,
) -> Result<Response<Bytes>, BoxError>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>> + Clone,
    S::Error: Into<BoxError>,
{
    shared.inner.clone().oneshot(req).await.map_err(Into::into)
}

/// Gives back a flush task's place among the peer's exchanges if the task
/// ends without doing so itself (a panic unwinding through it), so that the
/// peer's next request starts a new one instead of waiting forever. If no
/// other flush is left to send what queued meanwhile, those requests fail
/// at once (`BatchError::Gone`) rather than wait for a next request that may
/// never come.
struct Slot<'a, S> {
    shared: &'a Shared<S>,
    peer: &'a str,
    held: bool,
}

impl<S> Drop for Slot<'_, S> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let stranded: Vec<Waiting> = {
            let mut peers = self.shared.lock();
            match peers.get_mut(self.peer) {
                Some(state) => {
                    state.in_flight = state.in_flight.saturating_sub(1);
                    if state.in_flight == 0 {
                        state.queue.drain(..).collect()
                    } else {
                        Vec::new()
                    }
                }
                None => Vec::new(),
            }
        };
        // Their reply channels close here, outside the lock.
        drop(stranded);
    }
}

/// Sends what waits for `peer`, one exchange at a time, until nothing does.
async fn flush<S>(shared: Arc<Shared<S>>, peer: String)
where
    S: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let mut slot = Slot {
        shared: &shared,
        peer: &peer,
        held: true,
    };
    loop {
        let (batch, no_batch): (Vec<Waiting>, bool) = {
            let mut peers = shared.lock();
            let Some(state) = peers.get_mut(&peer) else {
                return;
            };
            // Callers that gave up (their timeout fired) need no send.
            state.queue.retain(|w| !w.reply.is_closed());
            if state.queue.is_empty() {
                // Given back under the lock that saw the queue empty: a
                // request queued after this starts a flush of its own.
                state.in_flight = state.in_flight.saturating_sub(1);
                slot.held = false;
                return;
            }
            let n = state.queue.len().min(shared.config.max_batch);
            let mut batch: Vec<Waiting> = state.queue.drain(..n).collect();
            // By path (which names the resource, e.g. an order id), so that
            // concurrent batches over the same rows lock them in one order
            // and never deadlock.
            batch.sort_by(|a, b| a.req.uri().path().cmp(b.req.uri().path()));
            (batch, state.no_batch())
        };
        if no_batch {
            // Learnt while these waited: the peer has no batch route.
            one_by_one(shared.clone(), batch).await;
        } else if batch.len() == 1 {
            for w in batch {
                let res = send_one(shared.clone(), w.req).await;
                let _ = w.reply.send(res);
            }
        } else {
            send_batch(&shared, &peer, batch).await;
        }
    }
}

async fn send_batch<S>(shared: &Arc<Shared<S>>, peer: &str, batch: Vec<Waiting>)
where
    S: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let envelope = BatchRequest {
        requests: batch.iter().map(|w| sub_request(&w.req)).collect(),
    };
    let exchange = match serde_json::to_vec(&envelope) {
        Ok(body) => Request::post(format!("{peer}{}", shared.config.path))
            .header(CONTENT_TYPE, "application/json")
            .body(Bytes::from(body))
            .map_err(BoxError::from),
        Err(e) => Err(BoxError::from(e)),
    };
    let result = match exchange {
        Ok(req) => send_one(shared.clone(), req).await,
        Err(e) => Err(e),
    };
    tracing::debug!(%peer, n = batch.len(), ok = result.is_ok(), "batch sent");
    let res = match result {
        Ok(res) => res,
        Err(e) => {
            let reason = crate::error_chain(e.as_ref());
            for w in batch {
                let _ = w
                    .reply
                    .send(Err(Box::new(BatchError::Exchange(reason.clone()))));
            }
            return;
        }
    };
    let status = res.status();
    if status.is_success() {
        let parsed = serde_json::from_slice::<BatchResponse>(res.body())
            .map_err(|e| e.to_string())
            .and_then(|r| {
                if r.responses.len() == batch.len() {
                    Ok(r.responses)
                } else {
                    Err(format!(
                        "{} answers to {} requests",
                        r.responses.len(),
                        batch.len()
                    ))
                }
            });
        match parsed {
            Ok(answers) => {
                for (w, answer) in batch.into_iter().zip(answers) {
                    let res = to_response(answer)
                        .map_err(|e| Box::new(BatchError::Invalid(e)) as BoxError);
                    let _ = w.reply.send(res);
                }
            }
            Err(e) => {
                for w in batch {
                    let _ = w.reply.send(Err(Box::new(BatchError::Invalid(e.clone()))));
                }
            }
        }
        return;
    }
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        // The peer's answer to the whole batch is each request's answer: a
        // 503 with Retry-After is retried by each owner, as it would be alone.
        for w in batch {
            let _ = w.reply.send(Ok(copy_response(&res)));
        }
        return;
    }
    if matches!(
        status,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
    ) {
        tracing::info!(%peer, %status, recheck_after = ?shared.config.recheck_after, "peer has no batch route; sending one by one");
        if let Some(state) = shared.lock().get_mut(peer) {
            state.no_batch_until = Some(std::time::Instant::now() + shared.config.recheck_after);
        }
    }
    // Not a batch endpoint, or it refused the batch as a whole (too large,
    // malformed): each request goes alone and gets its own answer.
    one_by_one(shared.clone(), batch).await;
}

/// Sends each request alone, all at once, each answered with its own.
async fn one_by_one<S>(shared: Arc<Shared<S>>, batch: Vec<Waiting>)
where
    S: Service<Request<Bytes>, Response = Response<Bytes>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let sends = batch.into_iter().map(|w| {
        let shared = shared.clone();
        async move {
            let res = send_one(shared, w.req).await;
            let _ = w.reply.send(res);
        }
    });
    futures::future::join_all(sends).await;
}

fn sub_request(req: &Request<Bytes>) -> SubRequest {
    SubRequest {
        method: req.method().as_str().to_owned(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        headers: header_pairs(req.headers()),
        body: b64().encode(req.body()),
    }
}

fn to_response(answer: SubResponse) -> Result<Response<Bytes>, String> {
    let status = StatusCode::from_u16(answer.status).map_err(|e| e.to_string())?;
    let body = b64().decode(answer.body).map_err(|e| e.to_string())?;
    let mut res = Response::new(Bytes::from(body));
    *res.status_mut() = status;
    for (name, value) in answer.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(&value).map_err(|e| e.to_string())?;
        res.headers_mut().append(name, value);
    }
    Ok(res)
}

fn copy_response(res: &Response<Bytes>) -> Response<Bytes> {
    let mut copy = Response::new(res.body().clone());
    *copy.status_mut() = res.status();
    *copy.headers_mut() = res.headers().clone();
    copy
}
