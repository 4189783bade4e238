//! Fault injection for HTTP services: dropped requests, lost responses, synthetic 503s and latency.

pub mod error;
pub mod future;
pub mod layer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tower::{BoxError, Service};

pub use error::{InjectedFault, InvalidFaultConfig};
pub use future::ResponseFuture;
pub use layer::FaultLayer;

/// Fault rates (each a probability in `0..=1`). All zero by default: off.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Fail without calling the peer ([`InjectedFault::RequestDropped`]).
    pub drop_request: f64,
    /// Call the peer, then discard its response ([`InjectedFault::ResponseLost`]).
    pub drop_response: f64,
    /// Answer `503 Service Unavailable` without calling the peer.
    pub error_503: f64,
    /// Probability of sleeping `latency` before calling the peer.
    pub latency_rate: f64,
    /// Injected latency.
    #[serde(with = "millis")]
    pub latency: Duration,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The longest latency a [`FaultConfig`] may inject: a minute is longer than
/// any timeout in this project, so every "hang" can be simulated, while a
/// typo (`latency: 100000000000`) cannot park requests for years.
pub const MAX_LATENCY: Duration = Duration::from_secs(60);

impl FaultConfig {
    /// Checks every rate is a number in `0..=1` and the latency is at most
    /// [`MAX_LATENCY`].
    pub fn validate(&self) -> Result<(), InvalidFaultConfig> {
        for (field, value) in [
            ("drop_request", self.drop_request),
            ("drop_response", self.drop_response),
            ("error_503", self.error_503),
            ("latency_rate", self.latency_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(InvalidFaultConfig::Rate { field, value });
            }
        }
        if self.latency > MAX_LATENCY {
            return Err(InvalidFaultConfig::Latency {
                ms: self.latency.as_millis(),
                max_ms: MAX_LATENCY.as_millis(),
            });
        }
        Ok(())
    }

    /// True if any fault can fire.
    pub fn is_active(&self) -> bool {
        self.drop_request > 0.0
            || self.drop_response > 0.0
            || self.error_503 > 0.0
            || (self.latency_rate > 0.0 && !self.latency.is_zero())
    }
}

/// What the injector decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultDecision {
    /// Fail before calling the peer.
    pub drop_request: bool,
    /// Answer 503 without calling the peer.
    pub error_503: bool,
    /// Sleep this long before calling the peer.
    pub delay: Option<Duration>,
    /// Discard the peer's response.
    pub drop_response: bool,
}

impl FaultDecision {
    /// No fault.
    pub fn is_none(&self) -> bool {
        *self == FaultDecision::default()
    }
}

/// Counters since creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct FaultSnapshot {
    /// Requests that went through the injector.
    pub requests: u64,
    /// Requests dropped before the peer.
    pub dropped: u64,
    /// Responses discarded after the peer answered.
    pub lost: u64,
    /// Synthetic 503 responses.
    pub synthetic_503: u64,
    /// Requests delayed.
    pub delayed: u64,
}

#[derive(Debug)]
struct Shared {
    active: AtomicBool,
    config: Mutex<FaultConfig>,
    rng: Mutex<SmallRng>,
    requests: AtomicU64,
    dropped: AtomicU64,
    lost: AtomicU64,
    synthetic_503: AtomicU64,
    delayed: AtomicU64,
}

/// Cloneable run-time control of a fault injector.
#[derive(Debug, Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    /// A handle with `config` and an rng seeded with `seed`.
    pub fn new(config: FaultConfig, seed: u64) -> Result<Self, InvalidFaultConfig> {
        config.validate()?;
        Ok(FaultHandle {
            shared: Arc::new(Shared {
                active: AtomicBool::new(config.is_active()),
                config: Mutex::new(config),
                rng: Mutex::new(SmallRng::seed_from_u64(seed)),
                requests: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                synthetic_503: AtomicU64::new(0),
                delayed: AtomicU64::new(0),
            }),
        })
    }

    /// Replaces the rates (validated first).
    pub fn set(&self, config: FaultConfig) -> Result<(), InvalidFaultConfig> {
        config.validate()?;
        let mut c = self.shared.config.lock().unwrap_or_else(|p| p.into_inner());
        *c = config;
        self.shared
            .active
            .store(config.is_active(), Ordering::Release);
        Ok(())
    }

    /// Current rates.
    pub fn get(&self) -> FaultConfig {
        *self.shared.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns every fault off.
    pub fn disable(&self) {
        // All-zero is always valid.
        let _ = self.set(FaultConfig::default());
    }

    /// Reseeds the rng.
    pub fn reseed(&self, seed: u64) {
        *self.shared.rng.lock().unwrap_or_else(|p| p.into_inner()) = SmallRng::seed_from_u64(seed);
    }

    /// Counters.
    pub fn snapshot(&self) -> FaultSnapshot {
        let s = &self.shared;
        FaultSnapshot {
            requests: s.requests.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            synthetic_503: s.synthetic_503.load(Ordering::Relaxed),
            delayed: s.delayed.load(Ordering::Relaxed),
        }
    }

    /// Draws the decision for the next request (what the service does on
    /// each call). Every active draw consumes exactly four random numbers,
    /// so a seed fixes the whole sequence of decisions.
    pub fn next_decision(&self) -> FaultDecision {
        if !self.shared.active.load(Ordering::Acquire) {
            return FaultDecision::default();
        }
        let cfg = self.get();
        let (a, b, c, d): (f64, f64, f64, f64) = {
            let mut rng = self.shared.rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.gen(), rng.gen(), rng.gen(), rng.gen())
        };
        FaultDecision {
            drop_request: a < cfg.drop_request,
            error_503: b < cfg.error_503,
            delay: (c < cfg.latency_rate && !cfg.latency.is_zero()).then_some(cfg.latency),
            drop_response: d < cfg.drop_response,
        }
    }
}

/// Injects faults in front of an HTTP service. See [`FaultConfig`].
///
/// Precedence for one request: dropped request, then synthetic 503 (neither
/// calls the peer), then latency, then the call, then a lost response.
#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
    handle: FaultHandle,
}

impl<S> Fault<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, handle: FaultHandle) -> Self {
        Fault { inner, handle }
    }

    /// The control handle.
    pub fn handle(&self) -> &FaultHandle {
        &self.handle
    }
}

impl<S, Req, B> Service<Req> for Fault<S>
where
    S: Service<Req, Response = http::Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Req: Send + 'static,
    B: Default + Send + 'static,
{
    type Response = http::Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, http::Response<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let s = &self.handle.shared;
        s.requests.fetch_add(1, Ordering::Relaxed);
        let d = self.handle.next_decision();
        if d.is_none() {
            return ResponseFuture::direct(self.inner.call(req));
        }
        if d.drop_request {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return ResponseFuture::faulty(Box::pin(async {
                Err(Box::new(InjectedFault::RequestDropped) as BoxError)
            }));
        }
        if d.error_503 {
            s.synthetic_503.fetch_add(1, Ordering::Relaxed);
            let mut resp = http::Response::new(B::default());
            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            return ResponseFuture::faulty(Box::pin(async { Ok(resp) }));
        }
        // The inner service is ready now; take that ready instance along and
        // leave a fresh clone behind (tower's usual pattern).
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let handle = self.handle.clone();
        ResponseFuture::faulty(Box::pin(async move {
            let s = &handle.shared;
            if let Some(delay) = d.delay {
                s.delayed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
            }
            let resp = ready.call(req).await.map_err(Into::into)?;
            if d.drop_response {
                s.lost.fetch_add(1, Ordering::Relaxed);
                drop(resp);
                return Err(Box::new(InjectedFault::ResponseLost) as BoxError);
            }
            Ok(resp)
        }))
    }
}
