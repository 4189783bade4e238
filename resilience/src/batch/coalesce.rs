//! Group commit for requests that come one by one: requests to the same
//! routes that arrive while earlier ones are being served wait, and then
//! run together in one transaction, the way a `POST /batch` runs its
//! sub-requests.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use futures::FutureExt;
use http::header::CONTENT_LENGTH;
use http_body_util::{BodyExt, Limited};
use tokio::sync::oneshot;
use tower::{Service, ServiceExt};

use super::server::{
    dispatch_alone, problem_answer, run_items, Answer, BatchServerConfig, Item, Origin, Pending,
};
use crate::problem::{internal_error, Problem};

/// How [`Coalesce`] groups requests.
#[derive(Debug, Clone)]
pub struct CoalesceConfig {
    /// The routes whose requests are grouped ([`BatchServerConfig::allow`]),
    /// the headers that keep a request out of groups
    /// ([`BatchServerConfig::refuse_header`]), the largest group
    /// (`max_requests`), the largest body a grouped request may carry
    /// (`max_body_bytes`), and how long a group may take (`max_duration`).
    /// The same rules as a `POST /batch`: allow only routes whose requests
    /// run through an [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer).
    pub server: BatchServerConfig,
    /// Groups served at once (at least 1). A request that arrives while
    /// fewer are running goes at once (alone, when nothing else waits);
    /// the others wait for a running group to finish and leave together.
    /// One on SQLite, whose one writer runs one transaction at a time.
    pub max_in_flight: usize,
    /// How long a request may wait in the queue (default 5 s). One that
    /// waited longer when its group starts is answered 503 with
    /// `Retry-After` (`server.retry_after_secs`) and never runs: under
    /// overload the queue sheds load instead of growing.
    pub max_wait: std::time::Duration,
}

impl CoalesceConfig {
    /// Groups of at most 64 requests of at most 64 KiB each, one group at a
    /// time on SQLite and two on Postgres; no route allowed yet.
    pub fn new(server: BatchServerConfig) -> Self {
        let max_in_flight = match server.db.backend() {
            crate::store::Backend::Sqlite => 1,
            crate::store::Backend::Postgres => 2,
        };
        Self {
            server: BatchServerConfig {
                max_requests: 64,
                max_body_bytes: 64 << 10,
                ..server
            },
            max_in_flight,
            max_wait: std::time::Duration::from_secs(5),
        }
    }
}

/// A [`tower::Service`] in front of an axum app that gives its write
/// routes group commit.
///
/// A request to an allowed route, with a `Content-Length` within the
/// limit and none of the refused headers, joins a queue. While fewer than
/// [`CoalesceConfig::max_in_flight`] groups run, the queue is served at
/// once: a request alone goes through the app as it would without this
/// service, and requests that queued up behind a running group run as one
/// group, exactly as the sub-requests of a `POST /batch` do (see the
/// [module docs](super)): in one transaction, one lookup of their keys,
/// their writes and records in one statement (one script on SQLite), one
/// commit; and, if any one of them is refused or fails, each of them again
/// alone, so that every request gets the answer it would have had alone.
/// Nothing waits for a group to fill: under light load every request goes
/// alone, and groups form only from requests that would otherwise queue
/// for the database.
///
/// Every other request goes straight to the app. A request that joined a
/// group is finished even if its client hangs up.
#[derive(Clone)]
pub struct Coalesce {
    shared: Arc<Shared>,
}

struct Shared {
    app: Router,
    config: CoalesceConfig,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    running: usize,
}

struct Waiting {
    item: Item,
    reply: oneshot::Sender<Answer>,
    since: tokio::time::Instant,
}

impl Coalesce {
    /// `app` with group commit for the routes `config` allows.
    pub fn new(app: Router, config: CoalesceConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                app,
                config,
                queue: Mutex::new(Queue::default()),
            }),
        }
    }

    /// Requests waiting for a group now.
    pub fn waiting(&self) -> usize {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .waiting
            .len()
    }

    /// This service as an axum [`Router`] (to serve, or to merge into one).
    pub fn into_router(self) -> Router {
        Router::new().fallback_service(self)
    }
}

impl std::fmt::Debug for Coalesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesce")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Service<Request> for Coalesce {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.serve(req).await) })
    }
}

impl Shared {
    /// Whether `req` may join a group, and its declared length if so.
    fn groups(&self, req: &Request) -> Option<usize> {
        let config = &self.config.server;
        let length = req
            .headers()
            .get(CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse::<usize>()
            .ok()?;
        let allowed = length <= config.max_body_bytes
            && !config.allowed.is_empty()
            && config.allows(req.method(), req.uri().path())
            && !config
                .refused_headers
                .iter()
                .any(|name| req.headers().contains_key(name));
        allowed.then_some(length)
    }

    async fn serve(self: Arc<Self>, req: Request) -> Response {
        let Some(length) = self.groups(&req) else {
            return match self.app.clone().oneshot(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
        };
        let (parts, body) = req.into_parts();
        let body: Bytes = match Limited::new(body, length).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return Problem::bad_request(format!("cannot read the request body: {e}"))
                    .into_response()
            }
        };
        if body.len() != length {
            // The HTTP server stops such a body itself; this is for a
            // service called in process.
            return Problem::bad_request(format!(
                "the body has {} bytes, its Content-Length says {length}",
                body.len()
            ))
            .into_response();
        }
        let item = Item {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
            extensions: parts.extensions,
        };
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.waiting.push_back(Waiting {
                item,
                reply,
                since: tokio::time::Instant::now(),
            });
            let start = queue.running < self.config.max_in_flight.max(1);
            if start {
                queue.running += 1;
            }
            start
        };
        if start {
            // Its own task: the group finishes even if this caller hangs up.
            tokio::spawn(Runner::new(self.clone()).run());
        }
        match answer.await {
            Ok(answer) => answer.into_response(),
            Err(_) => internal_error("the request's group ended without an answer").into_response(),
        }
    }
}

/// Serves the queue, group after group, until it is empty.
struct Runner {
    shared: Arc<Shared>,
    done: bool,
}

impl Runner {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            done: false,
        }
    }

    async fn run(mut self) {
        loop {
            let group: Vec<Waiting> = {
                let mut queue = self
                    .shared
                    .queue
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if queue.waiting.is_empty() {
                    queue.running -= 1;
                    drop(queue);
                    // Done: the drop below must not count it again.
                    self.done = true;
                    return;
                }
                let n = queue
                    .waiting
                    .len()
                    .min(self.shared.config.server.max_requests.max(1));
                queue.waiting.drain(..n).collect()
            };
            let group = self.shed(group).await;
            if group.is_empty() {
                continue;
            }
            // A panic in a request fails its group (each of its requests
            // is answered 500, their replies dropped with the group), not
            // the queue: this runner goes on.
            let served = AssertUnwindSafe(self.serve_group(group)).catch_unwind();
            if served.await.is_err() {
                tracing::error!("a group of requests panicked; its requests were answered 500");
            }
        }
    }

    /// Leaves out the requests whose client has gone (nothing of theirs
    /// ran yet) and answers 503 to those that waited too long.
    async fn shed(&self, group: Vec<Waiting>) -> Vec<Waiting> {
        let config = &self.shared.config;
        let mut kept = Vec::with_capacity(group.len());
        for w in group {
            let waited = w.since.elapsed();
            if w.reply.is_closed() {
                #[cfg(feature = "metrics")]
                metrics::counter!("group_commit_shed_total", "reason" => "client_gone")
                    .increment(1);
                continue;
            }
            if waited > config.max_wait {
                #[cfg(feature = "metrics")]
                metrics::counter!("group_commit_shed_total", "reason" => "waited_too_long")
                    .increment(1);
                let busy = Problem::unavailable("too many requests waiting to be written")
                    .retry_after(config.server.retry_after_secs);
                let _ = w.reply.send(problem_answer(busy).await);
                continue;
            }
            // The time in the queue, which the route's own duration
            // (measured inside this service) leaves out.
            #[cfg(feature = "metrics")]
            metrics::histogram!("group_commit_wait_seconds").record(waited.as_secs_f64());
            kept.push(w);
        }
        kept
    }

    async fn serve_group(&self, group: Vec<Waiting>) {
        let shared = &self.shared;
        let (items, replies): (Vec<Item>, Vec<oneshot::Sender<Answer>>) =
            group.into_iter().map(|w| (w.item, w.reply)).unzip();
        let pending = if let [one] = items.as_slice() {
            // Alone: exactly as without this service. The next group starts
            // when its transaction is over, not after its hooks.
            Ok(vec![dispatch_alone(&shared.app, one.request()).await])
        } else {
            #[cfg(feature = "metrics")]
            metrics::histogram!("coalesced_requests").record(items.len() as f64);
            run_items(
                &shared.app,
                &shared.config.server,
                &items,
                Origin::Coalesced,
            )
            .await
        };
        match pending {
            Ok(pending) => {
                for (reply, pending) in replies.into_iter().zip(pending) {
                    match pending {
                        Pending::Ready(answer) => {
                            let _ = reply.send(answer);
                        }
                        // Hooks (an at-most-once call to a peer) run on
                        // their own, each request's before its answer.
                        later => {
                            tokio::spawn(async move {
                                let _ = reply.send(later.resolve().await);
                            });
                        }
                    }
                }
            }
            Err(problem) => {
                for reply in replies {
                    let _ = reply.send(problem_answer(problem.clone()).await);
                }
            }
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Cancelled (the runtime is shutting down) with the queue in hand:
        // nobody will serve it. The waiting requests are answered 500 as
        // their replies drop; nothing of theirs ran.
        let waiting = {
            let mut queue = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            queue.running -= 1;
            std::mem::take(&mut queue.waiting)
        };
        drop(waiting);
    }
}
