//! Circuit breaker configuration.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::clock::{Clock, SystemClock};
use super::error::ConfigError;
use super::window::{MAX_BUCKETS, MAX_COUNT_WINDOW};
use super::StateChange;

/// Which sliding window judges the closed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// The last `n` recorded calls (`1..=16384`).
    Count(usize),
    /// The calls completed in the last `duration`, kept in `buckets` buckets
    /// (`1..=4096`); the window slides one bucket at a time.
    Time {
        /// Length of the window.
        duration: Duration,
        /// Number of buckets the window is split into.
        buckets: usize,
    },
}

/// How long the breaker stays open before letting probes through.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenDuration {
    /// Duration of the first opening.
    pub base: Duration,
    /// Growth per consecutive opening (an opening straight from half-open
    /// without having closed in between). `1.0` means fixed.
    pub multiplier: f64,
    /// Upper bound.
    pub max: Duration,
    /// Relative jitter in `0.0..=1.0`: the duration is scaled by a random
    /// factor in `[1 - jitter, 1 + jitter]` (then capped by `max`).
    pub jitter: f64,
}

impl OpenDuration {
    /// Always the same duration.
    pub fn fixed(d: Duration) -> Self {
        OpenDuration {
            base: d,
            multiplier: 1.0,
            max: d,
            jitter: 0.0,
        }
    }

    /// `base * multiplier^n` for the n-th consecutive opening, capped at `max`.
    pub fn exponential(base: Duration, multiplier: f64, max: Duration) -> Self {
        OpenDuration {
            base,
            multiplier,
            max,
            jitter: 0.0,
        }
    }

    /// Adds relative jitter (see [`OpenDuration::jitter`]).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Duration of the opening after `consecutive` earlier consecutive
    /// openings, before jitter.
    pub fn nominal(&self, consecutive: u32) -> Duration {
        let exp = i32::try_from(consecutive).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.multiplier.powi(exp);
        let max = self.max.max(self.base);
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            max
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }

    pub(crate) fn sample(&self, consecutive: u32) -> Duration {
        let d = self.nominal(consecutive);
        if self.jitter <= 0.0 {
            return d;
        }
        use rand::Rng;
        let f = rand::thread_rng().gen_range(1.0 - self.jitter..=1.0 + self.jitter);
        let secs = (d.as_secs_f64() * f).max(0.0);
        Duration::from_secs_f64(secs).min(self.max.max(self.base))
    }
}

/// What happens when the half-open state outlives `max_wait_in_half_open`
/// (typically because probes hang or no traffic comes to complete them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HalfOpenExpiry {
    /// Re-open (counts as a consecutive opening for backoff). Safe default.
    #[default]
    Reopen,
    /// Judge the probes completed so far: close if at least one completed
    /// and their failure and slow rates are below the thresholds, else
    /// re-open.
    JudgeCompleted,
}

/// Callback invoked after every state change.
pub type StateListener = Arc<dyn Fn(&StateChange) + Send + Sync>;

/// Configuration of a circuit breaker. Build with
/// [`CircuitBreakerConfig::builder`]; `Default` gives the values listed on
/// each builder method.
#[derive(Clone)]
pub struct CircuitBreakerConfig {
    pub(crate) name: Arc<str>,
    pub(crate) failure_rate_threshold: f64,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) window: SlidingWindow,
    pub(crate) minimum_calls: u32,
    pub(crate) half_open_permits: u32,
    pub(crate) max_wait_in_half_open: Option<Duration>,
    pub(crate) half_open_expiry: HalfOpenExpiry,
    pub(crate) open_duration: OpenDuration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) listener: Option<StateListener>,
    pub(crate) event_capacity: usize,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            name: Arc::from(""),
            failure_rate_threshold: 50.0,
            slow_call_duration: None,
            slow_call_rate_threshold: 100.0,
            window: SlidingWindow::Count(100),
            minimum_calls: 20,
            half_open_permits: 3,
            max_wait_in_half_open: None,
            half_open_expiry: HalfOpenExpiry::Reopen,
            open_duration: OpenDuration::fixed(Duration::from_secs(30)),
            clock: Arc::new(SystemClock),
            listener: None,
            event_capacity: 64,
        }
    }
}

impl fmt::Debug for CircuitBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerConfig")
            .field("name", &self.name)
            .field("failure_rate_threshold", &self.failure_rate_threshold)
            .field("slow_call_duration", &self.slow_call_duration)
            .field("slow_call_rate_threshold", &self.slow_call_rate_threshold)
            .field("window", &self.window)
            .field("minimum_calls", &self.minimum_calls)
            .field("half_open_permits", &self.half_open_permits)
            .field("max_wait_in_half_open", &self.max_wait_in_half_open)
            .field("half_open_expiry", &self.half_open_expiry)
            .field("open_duration", &self.open_duration)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

impl CircuitBreakerConfig {
    /// Starts a builder from the defaults.
    pub fn builder() -> CircuitBreakerConfigBuilder {
        CircuitBreakerConfigBuilder {
            cfg: CircuitBreakerConfig::default(),
        }
    }

    /// The breaker's name (the authority, for registry-made breakers).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A copy of this configuration with another name.
    pub fn with_name(&self, name: impl Into<Arc<str>>) -> Self {
        let mut c = self.clone();
        c.name = name.into();
        c
    }

    /// Checks ranges; the builder calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pct = |x: f64| x.is_finite() && x > 0.0 && x <= 100.0;
        if !pct(self.failure_rate_threshold) {
            return Err(ConfigError::new(
                "failure rate threshold must be in (0, 100]",
            ));
        }
        if !pct(self.slow_call_rate_threshold) {
            return Err(ConfigError::new(
                "slow call rate threshold must be in (0, 100]",
            ));
        }
        match self.window {
            SlidingWindow::Count(n) if n == 0 || n > MAX_COUNT_WINDOW => {
                return Err(ConfigError::new("count window size must be in 1..=16384"));
            }
            SlidingWindow::Time { duration, buckets } => {
                if buckets == 0 || buckets > MAX_BUCKETS {
                    return Err(ConfigError::new("bucket count must be in 1..=4096"));
                }
                if duration.as_nanos() < buckets as u128 {
                    return Err(ConfigError::new(
                        "time window shorter than its bucket count in ns",
                    ));
                }
            }
            _ => {}
        }
        if self.minimum_calls == 0 {
            return Err(ConfigError::new(
                "minimum number of calls must be at least 1",
            ));
        }
        if self.half_open_permits == 0 || self.half_open_permits > u32::from(u16::MAX) {
            return Err(ConfigError::new("half-open permits must be in 1..=65535"));
        }
        let od = &self.open_duration;
        if !(od.multiplier.is_finite() && od.multiplier >= 1.0) {
            return Err(ConfigError::new("open duration multiplier must be >= 1"));
        }
        if !(0.0..=1.0).contains(&od.jitter) {
            return Err(ConfigError::new("open duration jitter must be in 0..=1"));
        }
        if self.event_capacity == 0 {
            return Err(ConfigError::new("event capacity must be at least 1"));
        }
        Ok(())
    }
}

/// Builder for [`CircuitBreakerConfig`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerConfigBuilder {
    cfg: CircuitBreakerConfig,
}

impl CircuitBreakerConfigBuilder {
    /// Name reported in events and snapshots. Default: empty.
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// Opens when the failure rate (percent) is at least this. Default 50.
    pub fn failure_rate_threshold(mut self, pct: f64) -> Self {
        self.cfg.failure_rate_threshold = pct;
        self
    }

    /// Calls taking at least this long count as slow. Default: off.
    pub fn slow_call_duration(mut self, d: Duration) -> Self {
        self.cfg.slow_call_duration = Some(d);
        self
    }

    /// Opens when the slow-call rate (percent) is at least this. Default 100.
    pub fn slow_call_rate_threshold(mut self, pct: f64) -> Self {
        self.cfg.slow_call_rate_threshold = pct;
        self
    }

    /// Count-based window over the last `n` calls. Default: 100.
    pub fn count_window(mut self, n: usize) -> Self {
        self.cfg.window = SlidingWindow::Count(n);
        self
    }

    /// Time-based window over the last `duration`, in `buckets` buckets.
    pub fn time_window(mut self, duration: Duration, buckets: usize) -> Self {
        self.cfg.window = SlidingWindow::Time { duration, buckets };
        self
    }

    /// Minimum number of calls in the window before rates are judged.
    /// Default 20 (a count window smaller than this judges when full).
    pub fn minimum_calls(mut self, n: u32) -> Self {
        self.cfg.minimum_calls = n;
        self
    }

    /// Number of probe calls admitted in half-open. Default 3.
    pub fn half_open_permits(mut self, n: u32) -> Self {
        self.cfg.half_open_permits = n;
        self
    }

    /// Maximum time spent in half-open; see [`HalfOpenExpiry`] for what then
    /// happens. Checked lazily on the next admission. Default: unbounded.
    pub fn max_wait_in_half_open(mut self, d: Duration, expiry: HalfOpenExpiry) -> Self {
        self.cfg.max_wait_in_half_open = Some(d);
        self.cfg.half_open_expiry = expiry;
        self
    }

    /// Fixed open duration. Default 30 s.
    pub fn open_duration(mut self, d: Duration) -> Self {
        self.cfg.open_duration = OpenDuration::fixed(d);
        self
    }

    /// Open duration with backoff across consecutive openings.
    pub fn open_backoff(mut self, od: OpenDuration) -> Self {
        self.cfg.open_duration = od;
        self
    }

    /// Time source. Default [`SystemClock`](super::SystemClock); tests under
    /// `tokio::time::pause()` set [`TokioClock`](super::TokioClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.cfg.clock = Arc::new(clock);
        self
    }

    /// Called (outside the transition lock) after every state change.
    pub fn on_state_change(mut self, f: impl Fn(&StateChange) + Send + Sync + 'static) -> Self {
        self.cfg.listener = Some(Arc::new(f));
        self
    }

    /// Capacity of the broadcast channel behind `subscribe()`. Default 64.
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.cfg.event_capacity = n;
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<CircuitBreakerConfig, ConfigError> {
        self.cfg.validate()?;
        Ok(self.cfg)
    }
}
