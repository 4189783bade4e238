//! Background delivery that gives way to the service's own front door.
//!
//! A service that takes work in (`POST /orders`) and delivers it in the
//! background (the outbox relay, a feed served to a consumer) runs both on
//! the same CPUs and the same database. During a burst the two compete, and
//! the requests a client is waiting for answer at a fraction of the rate the
//! database can commit them. An outbox exists to absorb exactly such a
//! burst: delivery can run a little later without any guarantee changing.
//!
//! [`Foreground`] counts the requests in flight at the front door (the
//! application wraps the routes it cares about with [`Foreground::enter`]).
//! [`GiveWay`] is the policy a background loop asks before each round of
//! work: while `busy_at` or more requests are in flight, wait, but
//!
//! - never longer than `max_wait` at a time, so delivery keeps moving (one
//!   round per `max_wait` at least) however long the burst lasts, and
//! - not at all once the loop is behind: when the oldest message of its last
//!   round had waited `max_lag` or longer, it works at full speed until it
//!   catches up. A sustained overload therefore never starves delivery; it
//!   fills the backlog, and the backlog's own bound answers 503.
//!
//! So the added delivery latency is bounded (about `max_lag + max_wait`),
//! and every delivery guarantee is unchanged: only *when* a claim happens
//! moves, never what it does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A waiting loop takes the front door for quiet after this long without
/// `busy_at` requests in flight at once. Group commit answers a whole group
/// at the same moment, so the count drops to near zero between groups for
/// a millisecond or two; a single look would take every such gap for the
/// end of the burst.
pub const QUIET_WINDOW: Duration = Duration::from_millis(25);

/// Requests in flight at a service's front door. Clones share the count.
#[derive(Debug, Clone, Default)]
pub struct Foreground {
    inner: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    in_flight: AtomicUsize,
    /// The most in flight at once since the last [`Foreground::take_peak`].
    peak: AtomicUsize,
}

impl Foreground {
    /// A gauge at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one request until the guard drops (hold it across the
    /// handler; a cancelled request drops it too).
    pub fn enter(&self) -> ForegroundGuard {
        let n = self.inner.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.inner.peak.fetch_max(n, Ordering::Relaxed);
        ForegroundGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// The most requests in flight at once since the previous call (or
    /// now, if more), and a new window from now.
    pub fn take_peak(&self) -> usize {
        let now = self.in_flight();
        self.inner.peak.swap(now, Ordering::Relaxed).max(now)
    }
}

/// One request counted by [`Foreground::enter`].
#[derive(Debug)]
pub struct ForegroundGuard(Foreground);

impl Drop for ForegroundGuard {
    fn drop(&mut self) {
        self.0.inner.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a background loop waits for the front door (see the module docs).
#[derive(Debug, Clone)]
pub struct GiveWay {
    /// The front door's gauge.
    pub foreground: Foreground,
    /// Busy while this many requests are in flight at once, or more (0:
    /// never give way).
    pub busy_at: usize,
    /// The longest one wait; after it, the loop does one round anyway.
    pub max_wait: Duration,
    /// A loop whose last round found work this old does not give way.
    pub max_lag: Duration,
}

impl GiveWay {
    /// A policy that never waits.
    pub fn never() -> Self {
        Self {
            foreground: Foreground::new(),
            busy_at: 0,
            max_wait: Duration::ZERO,
            max_lag: Duration::ZERO,
        }
    }

    /// Whether the front door has been busy since the last look (`busy_at`
    /// requests in flight at once at some moment), and a new window from now.
    pub fn busy(&self) -> bool {
        self.busy_at > 0 && self.foreground.take_peak() >= self.busy_at
    }

    /// Whether a loop whose oldest waiting work is `lag` old may still give
    /// way (`None`: the loop does not know, e.g. its last round was empty).
    pub fn may_wait(&self, lag: Option<Duration>) -> bool {
        self.busy_at > 0 && !self.max_wait.is_zero() && lag.is_none_or(|l| l < self.max_lag)
    }

    /// Waits until the front door has been quiet for a [`QUIET_WINDOW`]
    /// (never `busy_at` in flight at once), or until `deadline`.
    pub async fn wait_until_quiet(&self, deadline: tokio::time::Instant) {
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep_until((now + QUIET_WINDOW).min(deadline)).await;
            if !self.busy() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_requests_in_flight() {
        let fg = Foreground::new();
        let a = fg.enter();
        let b = fg.clone().enter();
        assert_eq!(fg.in_flight(), 2);
        drop(a);
        assert_eq!(fg.in_flight(), 1);
        drop(b);
        assert_eq!(fg.in_flight(), 0);
    }

    #[test]
    fn busy_at_the_threshold_and_never_when_off() {
        let mut g = GiveWay {
            foreground: Foreground::new(),
            busy_at: 2,
            max_wait: Duration::from_millis(100),
            max_lag: Duration::from_secs(1),
        };
        let a = g.foreground.enter();
        assert!(!g.busy());
        let b = g.foreground.enter();
        drop((a, b));
        assert!(g.busy(), "two at once since the last look");
        assert!(!g.busy(), "none since");
        let _c = g.foreground.enter();
        let _d = g.foreground.enter();
        g.busy_at = 0;
        assert!(!g.busy());
        assert!(!GiveWay::never().may_wait(None));
    }

    #[test]
    fn a_loop_behind_does_not_wait() {
        let g = GiveWay {
            foreground: Foreground::new(),
            busy_at: 1,
            max_wait: Duration::from_millis(100),
            max_lag: Duration::from_secs(1),
        };
        assert!(g.may_wait(None));
        assert!(g.may_wait(Some(Duration::from_millis(999))));
        assert!(!g.may_wait(Some(Duration::from_secs(1))));
    }

    #[test]
    fn the_peak_remembers_a_moment_of_many() {
        let fg = Foreground::new();
        let guards: Vec<_> = (0..5).map(|_| fg.enter()).collect();
        drop(guards);
        assert_eq!(fg.in_flight(), 0);
        assert_eq!(fg.take_peak(), 5, "five at once, though none now");
        assert_eq!(fg.take_peak(), 0, "a new window");
        let _a = fg.enter();
        assert_eq!(fg.take_peak(), 1);
        assert_eq!(fg.take_peak(), 1, "one still in flight");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_while_busy_until_the_deadline() {
        let g = GiveWay {
            foreground: Foreground::new(),
            busy_at: 2,
            max_wait: Duration::from_millis(100),
            max_lag: Duration::from_secs(1),
        };
        let start = tokio::time::Instant::now();
        g.wait_until_quiet(start + Duration::from_millis(100)).await;
        assert_eq!(start.elapsed(), QUIET_WINDOW, "quiet: one window");

        // Two in flight at once in every window, though never for long.
        let fg = g.foreground.clone();
        let churn = tokio::spawn(async move {
            loop {
                let a = fg.enter();
                let b = fg.enter();
                drop((a, b));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let t = tokio::time::Instant::now();
        g.wait_until_quiet(t + Duration::from_millis(100)).await;
        assert_eq!(
            t.elapsed(),
            Duration::from_millis(100),
            "busy: waited to the deadline"
        );

        churn.abort();
        let _ = churn.await;
        let t = tokio::time::Instant::now();
        g.wait_until_quiet(t + Duration::from_secs(10)).await;
        assert!(
            t.elapsed() <= QUIET_WINDOW * 2,
            "returned once quiet: {:?}",
            t.elapsed()
        );
    }
}
