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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The front door is quiet once this long has passed without `busy_at`
/// requests in flight at once. Group commit answers a whole group at the
/// same moment, so the count drops to near zero between groups for a
/// millisecond or two; a single look would take every such gap for the end
/// of the burst.
pub const QUIET_WINDOW: Duration = Duration::from_millis(25);

/// How often a waiting loop looks at the front door again.
const RECHECK: Duration = Duration::from_millis(5);

/// Requests in flight at a service's front door, and the last moment they
/// reached the busy mark. Clones share the count.
#[derive(Debug, Clone)]
pub struct Foreground {
    inner: Arc<Counts>,
}

#[derive(Debug)]
struct Counts {
    in_flight: AtomicUsize,
    /// Busy at this many in flight at once (0: never busy).
    busy_at: usize,
    /// Nanoseconds after `epoch` of the last time `busy_at` were in flight
    /// (0: never).
    last_busy: AtomicU64,
    epoch: Instant,
}

impl Foreground {
    /// A gauge at zero that counts as busy at `busy_at` requests in flight
    /// at once (0: never busy).
    pub fn new(busy_at: usize) -> Self {
        Self {
            inner: Arc::new(Counts {
                in_flight: AtomicUsize::new(0),
                busy_at,
                last_busy: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Counts one request until the guard drops (hold it across the
    /// handler; a cancelled request drops it too).
    pub fn enter(&self) -> ForegroundGuard {
        let n = self.inner.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        if self.inner.busy_at > 0 && n >= self.inner.busy_at {
            let t = u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.inner.last_busy.fetch_max(t.max(1), Ordering::Relaxed);
        }
        ForegroundGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// The busy mark (0: never busy).
    pub fn busy_at(&self) -> usize {
        self.inner.busy_at
    }

    /// Whether `busy_at` requests were in flight at once within the last
    /// `window` (or are now).
    pub fn busy_within(&self, window: Duration) -> bool {
        let busy_at = self.inner.busy_at;
        if busy_at == 0 {
            return false;
        }
        if self.in_flight() >= busy_at {
            return true;
        }
        let last = self.inner.last_busy.load(Ordering::Relaxed);
        if last == 0 {
            return false;
        }
        let now = u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now.saturating_sub(last) < u64::try_from(window.as_nanos()).unwrap_or(u64::MAX)
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
    /// The front door's gauge, with its busy mark.
    pub foreground: Foreground,
    /// The longest one wait; after it, the loop does one round anyway.
    pub max_wait: Duration,
    /// A loop whose last round found work this old does not give way.
    pub max_lag: Duration,
}

impl GiveWay {
    /// A policy that never waits.
    pub fn never() -> Self {
        Self {
            foreground: Foreground::new(0),
            max_wait: Duration::ZERO,
            max_lag: Duration::ZERO,
        }
    }

    /// Whether the front door is busy: its busy mark reached within the
    /// last [`QUIET_WINDOW`].
    pub fn busy(&self) -> bool {
        self.foreground.busy_within(QUIET_WINDOW)
    }

    /// Whether a loop whose oldest waiting work is `lag` old may still give
    /// way (`None`: the loop does not know, e.g. its last round was empty).
    pub fn may_wait(&self, lag: Option<Duration>) -> bool {
        self.foreground.busy_at() > 0
            && !self.max_wait.is_zero()
            && lag.is_none_or(|l| l < self.max_lag)
    }

    /// Waits until the front door is quiet (true), or until `deadline`
    /// (false, the door still busy).
    pub async fn wait_until_quiet(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            if !self.busy() {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep_until((now + RECHECK).min(deadline)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn give_way(busy_at: usize) -> GiveWay {
        GiveWay {
            foreground: Foreground::new(busy_at),
            max_wait: Duration::from_millis(100),
            max_lag: Duration::from_secs(1),
        }
    }

    #[test]
    fn guards_count_requests_in_flight() {
        let fg = Foreground::new(2);
        let a = fg.enter();
        let b = fg.clone().enter();
        assert_eq!(fg.in_flight(), 2);
        drop(a);
        assert_eq!(fg.in_flight(), 1);
        drop(b);
        assert_eq!(fg.in_flight(), 0);
    }

    #[test]
    fn busy_at_the_mark_within_the_window_and_never_when_off() {
        let g = give_way(2);
        let a = g.foreground.enter();
        assert!(!g.busy(), "one of two");
        let b = g.foreground.enter();
        assert!(g.busy(), "two at once");
        drop((a, b));
        assert!(g.busy(), "two at once a moment ago");
        std::thread::sleep(QUIET_WINDOW);
        assert!(!g.busy(), "none for a whole window");

        let off = give_way(0);
        let _guards: Vec<_> = (0..10).map(|_| off.foreground.enter()).collect();
        assert!(!off.busy());
        assert!(!off.may_wait(None));
        assert!(!GiveWay::never().may_wait(None));
    }

    #[test]
    fn a_loop_behind_does_not_wait() {
        let g = give_way(1);
        assert!(g.may_wait(None));
        assert!(g.may_wait(Some(Duration::from_millis(999))));
        assert!(!g.may_wait(Some(Duration::from_secs(1))));
    }

    #[tokio::test]
    async fn waits_while_busy_until_the_deadline() {
        let g = give_way(2);
        let start = tokio::time::Instant::now();
        assert!(g.wait_until_quiet(start + Duration::from_secs(10)).await);
        assert!(start.elapsed() < Duration::from_secs(5), "quiet: no wait");

        // Two in flight at once every 10 ms, though never for long.
        let fg = g.foreground.clone();
        let churn = tokio::spawn(async move {
            loop {
                let a = fg.enter();
                let b = fg.enter();
                drop((a, b));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = tokio::time::Instant::now();
        let quiet = g.wait_until_quiet(t + Duration::from_millis(300)).await;
        assert!(!quiet, "busy: waited to the deadline");
        assert!(t.elapsed() >= Duration::from_millis(300));

        churn.abort();
        let _ = churn.await;
        let t = tokio::time::Instant::now();
        assert!(g.wait_until_quiet(t + Duration::from_secs(10)).await);
        assert!(t.elapsed() < Duration::from_secs(5), "returned once quiet");
    }
}
