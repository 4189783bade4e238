//! Injectable time source.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A source of monotonic time.
///
/// The breaker reads the clock only where time matters: in the open state
/// (to know when to probe), for slow-call detection, for time-based windows
/// and for the half-open maximum wait. A plain count-window breaker without
/// slow-call detection never reads it on the closed path.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The default clock: `tokio::time::Instant::now()`.
///
/// Under `tokio::time::pause()` this clock stands still and moves only with
/// `tokio::time::advance`, which makes tests deterministic.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A clock that moves only when told to; cheap to clone (clones share time).
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

struct ManualInner {
    start: Instant,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock frozen at the current real instant.
    pub fn new() -> Self {
        ManualClock {
            inner: Arc::new(ManualInner {
                start: Instant::now(),
                offset_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.offset_nanos.fetch_add(nanos, Ordering::AcqRel);
    }

    /// Time elapsed since the clock was created (sum of all advances).
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.inner.offset_nanos.load(Ordering::Acquire))
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("elapsed", &self.elapsed())
            .finish()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.start + self.elapsed()
    }
}
