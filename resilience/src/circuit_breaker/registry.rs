//! One breaker per destination.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

use super::classify::{Classifier, HttpClassifier};
use super::config::CircuitBreakerConfig;
use super::error::CircuitOpen;
use super::handle::{BreakerHandle, Permit, State};

struct Entry {
    handle: BreakerHandle,
    last_used: AtomicU64,
}

struct Inner {
    config: CircuitBreakerConfig,
    capacity: usize,
    map: RwLock<HashMap<String, Entry>>,
    tick: AtomicU64,
}

/// Breakers keyed by destination authority (`host:port`), created on first
/// use from one configuration (each named after its authority).
///
/// **Bound:** at most `capacity` breakers. Inserting into a full registry
/// evicts the least recently used breaker *in the closed state*; if every
/// breaker is open, half-open or manually set, the least recently used one
/// overall is evicted. Evicting forgets history only: handles already given
/// out keep working, but the next `get_or_create` for that authority starts
/// a fresh closed breaker. Lookups take a read lock; creation a write lock.
/// Cloning the registry shares it.
#[derive(Clone)]
pub struct BreakerRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("capacity", &self.inner.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl BreakerRegistry {
    /// A registry of at most `capacity` (at least 1) breakers made from `config`.
    pub fn new(config: CircuitBreakerConfig, capacity: usize) -> Self {
        BreakerRegistry {
            inner: Arc::new(Inner {
                config,
                capacity: capacity.max(1),
                map: RwLock::new(HashMap::new()),
                tick: AtomicU64::new(0),
            }),
        }
    }

    /// The breaker for `authority`, created if absent.
    pub fn get_or_create(&self, authority: &str) -> BreakerHandle {
        let tick = self.inner.tick.fetch_add(1, Ordering::Relaxed);
        {
            let map = self.inner.map.read().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = map.get(authority) {
                e.last_used.store(tick, Ordering::Relaxed);
                return e.handle.clone();
            }
        }
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(authority) {
            e.last_used.store(tick, Ordering::Relaxed);
            return e.handle.clone();
        }
        if map.len() >= self.inner.capacity {
            let victim = map
                .iter()
                .min_by_key(|(_, e)| {
                    (
                        e.handle.state() != State::Closed,
                        e.last_used.load(Ordering::Relaxed),
                    )
                })
                .map(|(k, _)| k.clone());
            if let Some(k) = victim {
                map.remove(&k);
            }
        }
        let handle = BreakerHandle::new(self.inner.config.with_name(authority));
        map.insert(
            authority.to_owned(),
            Entry {
                handle: handle.clone(),
                last_used: AtomicU64::new(tick),
            },
        );
        handle
    }

    /// The breaker for `authority` if present (does not touch recency).
    pub fn get(&self, authority: &str) -> Option<BreakerHandle> {
        let map = self.inner.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(authority).map(|e| e.handle.clone())
    }

    /// Removes the breaker for `authority`.
    pub fn remove(&self, authority: &str) -> Option<BreakerHandle> {
        let mut map = self.inner.map.write().unwrap_or_else(|p| p.into_inner());
        map.remove(authority).map(|e| e.handle)
    }

    /// Number of breakers.
    pub fn len(&self) -> usize {
        self.inner
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// No breakers yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Authorities currently held.
    pub fn authorities(&self) -> Vec<String> {
        let map = self.inner.map.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    /// Maximum number of breakers.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }
}

/// Layer for [`PerAuthority`].
#[derive(Debug, Clone)]
pub struct PerAuthorityLayer<K = HttpClassifier> {
    registry: BreakerRegistry,
    classifier: K,
}

impl PerAuthorityLayer<HttpClassifier> {
    /// Picks breakers from `registry` with the [`HttpClassifier`].
    pub fn new(registry: BreakerRegistry) -> Self {
        PerAuthorityLayer {
            registry,
            classifier: HttpClassifier,
        }
    }
}

impl<K> PerAuthorityLayer<K> {
    /// Uses another classifier.
    pub fn with_classifier<K2>(self, classifier: K2) -> PerAuthorityLayer<K2> {
        PerAuthorityLayer {
            registry: self.registry,
            classifier,
        }
    }
}

impl<S, K: Clone> Layer<S> for PerAuthorityLayer<K> {
    type Service = PerAuthority<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        PerAuthority {
            inner,
            registry: self.registry.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// Guards each `http::Request` with the breaker of its URI authority (or
/// `Host` header; requests with neither share the breaker keyed `""`).
///
/// The destination is only known in `call`, so `poll_ready` is always ready
/// and `call` checks the circuit first: a rejected request never touches the
/// inner service. An admitted one drives a clone of the inner service to
/// readiness inside its future, then calls it (tower's clone-in-`call`
/// pattern; the inner service must be `Clone`). As with
/// [`CircuitBreaker`](super::CircuitBreaker), the circuit is checked before
/// the inner service's readiness is polled.
#[derive(Debug, Clone)]
pub struct PerAuthority<S, K = HttpClassifier> {
    inner: S,
    registry: BreakerRegistry,
    classifier: K,
}

impl<S, K> PerAuthority<S, K> {
    /// The registry.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.registry
    }
}

/// The registry key of a request: URI authority, else `Host`, else `""`.
pub fn authority_of<B>(req: &http::Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

impl<S, K, B> Service<http::Request<B>> for PerAuthority<S, K>
where
    S: Service<http::Request<B>> + Clone,
    S::Error: Into<BoxError>,
    K: Classifier<S::Response, BoxError> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = PerAuthorityFuture<S, http::Request<B>, S::Future, K>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the admitted request's business (see the type's docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let handle = self.registry.get_or_create(authority_of(&req));
        let classifier = self.classifier.clone();
        match handle.shared.try_acquire() {
            Ok(permit) => PerAuthorityFuture {
                state: PaState::Waiting {
                    svc: self.inner.clone(),
                    req: Some(req),
                },
                permit: Some(permit),
                classifier,
            },
            Err(open) => PerAuthorityFuture {
                state: PaState::Done {
                    err: Some(Box::new(open)),
                },
                permit: None,
                classifier,
            },
        }
    }
}

pin_project! {
    /// Future of [`PerAuthority`]: an immediate [`CircuitOpen`], or the
    /// admitted request waiting for the inner service's readiness, then its
    /// call, recorded on completion.
    ///
    /// Dropping it before completion records nothing; a half-open probe
    /// permit it holds is given back.
    pub struct PerAuthorityFuture<S, R, F, K> {
        #[pin]
        state: PaState<S, R, F>,
        permit: Option<Permit>,
        classifier: K,
    }
}

pin_project! {
    #[project = PaStateProj]
    enum PaState<S, R, F> {
        Waiting { svc: S, req: Option<R> },
        Called { #[pin] fut: F },
        Done { err: Option<Box<CircuitOpen>> },
    }
}

impl<S, R, F, K> fmt::Debug for PerAuthorityFuture<S, R, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerAuthorityFuture")
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl<S, R, K> Future for PerAuthorityFuture<S, R, S::Future, K>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    K: Classifier<S::Response, BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let res = match this.state.as_mut().project() {
                PaStateProj::Waiting { svc, req } => match ready!(svc.poll_ready(cx)) {
                    Ok(()) => match req.take() {
                        Some(req) => {
                            let fut = svc.call(req);
                            this.state.set(PaState::Called { fut });
                            continue;
                        }
                        None => Err(BoxError::from(AFTER_COMPLETION)),
                    },
                    Err(e) => Err(e.into()),
                },
                PaStateProj::Called { fut } => ready!(fut.poll(cx)).map_err(Into::into),
                PaStateProj::Done { err } => {
                    return Poll::Ready(Err(match err.take() {
                        Some(open) => open,
                        None => AFTER_COMPLETION.into(),
                    }))
                }
            };
            if let Some(permit) = this.permit.take() {
                permit.complete(this.classifier.classify(res.as_ref()));
            }
            this.state.set(PaState::Done { err: None });
            return Poll::Ready(res);
        }
    }
}

const AFTER_COMPLETION: &str = "circuit breaker response future polled after completion";
