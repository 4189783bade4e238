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

    /// A cheap, coarse reading of this same clock, anchored at a fresh
    /// `now()`: the breaker uses it to reject calls while an open wait is
    /// far from over, and reads `now()` near the end of the wait. `None`
    /// (the default): this clock has no cheaper reading.
    fn coarse_anchor(&self) -> Option<(Instant, CoarseAnchor)> {
        None
    }
}

/// A coarse reading of the system's monotonic clock, tied to one instant
/// (its *origin*): [`elapsed_floor`](Self::elapsed_floor) is never more than
/// the time since the origin, and, while the kernel's timekeeping updates
/// come on time, never less by more than [`lag`](Self::lag).
///
/// On Linux it reads `CLOCK_MONOTONIC_COARSE` (a few nanoseconds; the time of
/// the kernel's last tick) where `Instant::now()` reads `CLOCK_MONOTONIC`
/// (20-40 ns on a virtual machine). The lag is two ticks plus the calibration
/// read's own spread: 8 ms at the common 250 Hz.
#[derive(Debug, Clone, Copy)]
pub struct CoarseAnchor {
    /// The precise clock's nanoseconds just after the origin.
    base: u64,
    lag: u64,
}

impl CoarseAnchor {
    /// Calibrates against `Instant::now()`. `None` where there is no coarse
    /// clock, its resolution is over 50 ms, or eight tries could not read
    /// both clocks within 50 µs of each other.
    pub fn system() -> Option<(Instant, CoarseAnchor)> {
        let res = coarse::resolution()?;
        if res == 0 || res > 50_000_000 {
            return None;
        }
        for _ in 0..8 {
            let a = Instant::now();
            let p0 = coarse::precise_nanos();
            let spread = u64::try_from(a.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if spread <= 50_000 {
                // Both clocks count on one timeline, and the coarse one is
                // the precise one as of the timekeeper's last update, so at
                // any moment C(t) <= P(t). With p0 = P(t0), t0 just after a:
                //   C(t) - p0 <= P(t) - P(a)                  (the floor)
                // whatever `res` is and however late the last update was
                // (a virtual CPU the host held still misses ticks). The
                // floor lags by the coarse clock's staleness plus the
                // spread: `2 * res + spread` covers a staleness of two
                // ticks, and a later one only delays an admission (the
                // precise clock decides near the end of a wait).
                return Some((
                    a,
                    CoarseAnchor {
                        base: p0,
                        lag: 2 * res + spread,
                    },
                ));
            }
        }
        None
    }

    /// A lower bound of the nanoseconds since the origin.
    #[inline]
    pub fn elapsed_floor(&self) -> u64 {
        coarse::nanos().saturating_sub(self.base)
    }

    /// How far [`elapsed_floor`](Self::elapsed_floor) may lag the precise
    /// clock, in nanoseconds.
    pub fn lag(&self) -> u64 {
        self.lag
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod coarse {
    use rustix::time::{clock_getres, clock_gettime, ClockId, Timespec};

    fn nanos_of(t: Timespec) -> u64 {
        u64::try_from(t.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
    }

    pub(super) fn resolution() -> Option<u64> {
        Some(nanos_of(clock_getres(ClockId::MonotonicCoarse)))
    }

    #[inline]
    pub(super) fn nanos() -> u64 {
        nanos_of(clock_gettime(ClockId::MonotonicCoarse))
    }

    /// `CLOCK_MONOTONIC`, the clock `Instant` reads.
    pub(super) fn precise_nanos() -> u64 {
        nanos_of(clock_gettime(ClockId::Monotonic))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod coarse {
    pub(super) fn resolution() -> Option<u64> {
        None
    }

    pub(super) fn nanos() -> u64 {
        0
    }

    pub(super) fn precise_nanos() -> u64 {
        0
    }
}

/// The default clock: the system's monotonic clock, `std::time::Instant`,
/// with the kernel's coarse clock for rejections while the breaker is open
/// (see [`CoarseAnchor`]). An open breaker therefore rejects without reading
/// the precise clock until the last few milliseconds of its wait; the
/// transition to half-open is still decided by the precise clock, so it is
/// never early. A rejection's [`until`](super::CircuitOpen::until) is exact;
/// its [`retry_after`](super::CircuitOpen::retry_after) may be up to the
/// anchor's lag longer than exact, never shorter.
///
/// It does not follow `tokio::time::pause()`: tests under paused time use
/// [`TokioClock`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn coarse_anchor(&self) -> Option<(Instant, CoarseAnchor)> {
        CoarseAnchor::system()
    }
}

/// Tokio's clock: `tokio::time::Instant::now()`.
///
/// Under `tokio::time::pause()` this clock stands still and moves only with
/// `tokio::time::advance`, which makes tests deterministic. It has no coarse
/// reading: every open-state check reads it.
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
