//! Retry budget.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::circuit_breaker::{Clock, TokioClock};

const BUCKETS: usize = 10;
const UNIT: i64 = 1000;

/// Caps retries to a fraction of recent traffic (like Finagle's and tower's
/// budgets): every request [`deposit`](RetryBudget::deposit)s one unit,
/// every retry [`withdraw`](RetryBudget::withdraw)s `1 / retry_ratio`
/// units, and deposits expire after `ttl` (kept in 10 buckets). A reserve of
/// `min_per_sec * ttl` retries is always available, so low-traffic callers
/// can still retry. Share one budget (in an `Arc`) across clones.
pub struct RetryBudget {
    ttl: Duration,
    deposit: i64,
    withdraw: i64,
    reserve: i64,
    clock: Arc<dyn Clock>,
    origin: std::time::Instant,
    state: Mutex<State>,
}

struct State {
    buckets: [i64; BUCKETS],
    idx: u64,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.ttl)
            .field("balance", &self.balance())
            .finish()
    }
}

impl Default for RetryBudget {
    /// 10 s ttl, 10 retries/s reserve, 20 % ratio.
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl RetryBudget {
    /// `ttl` in `1s..=60s` (clamped), `retry_ratio` in `0.001..=1000` (clamped).
    pub fn new(ttl: Duration, min_per_sec: u32, retry_ratio: f32) -> Self {
        Self::with_clock(ttl, min_per_sec, retry_ratio, TokioClock)
    }

    /// As [`new`](RetryBudget::new) with another clock.
    pub fn with_clock(
        ttl: Duration,
        min_per_sec: u32,
        retry_ratio: f32,
        clock: impl Clock,
    ) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = f64::from(retry_ratio).clamp(0.001, 1000.0);
        let withdraw = ((UNIT as f64) / ratio).round().max(1.0) as i64;
        let reserve = i64::from(min_per_sec) * ttl.as_secs() as i64 * withdraw;
        let origin = clock.now();
        RetryBudget {
            ttl,
            deposit: UNIT,
            withdraw,
            reserve,
            clock: Arc::new(clock),
            origin,
            state: Mutex::new(State {
                buckets: [0; BUCKETS],
                idx: 0,
            }),
        }
    }

    fn bucket_nanos(&self) -> u128 {
        (self.ttl.as_nanos() / BUCKETS as u128).max(1)
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State, usize) -> R) -> R {
        let now = self
            .clock
            .now()
            .saturating_duration_since(self.origin)
            .as_nanos();
        let idx = u64::try_from(now / self.bucket_nanos()).unwrap_or(u64::MAX);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if idx > s.idx {
            let gap = (idx - s.idx).min(BUCKETS as u64);
            for k in 1..=gap {
                let i = ((s.idx + k) % BUCKETS as u64) as usize;
                s.buckets[i] = 0;
            }
            s.idx = idx;
        }
        let cur = (s.idx % BUCKETS as u64) as usize;
        f(&mut s, cur)
    }

    /// Records a request (call once per original request, not per retry).
    pub fn deposit(&self) {
        let d = self.deposit;
        self.with_state(|s, cur| s.buckets[cur] += d);
    }

    /// Takes one retry from the budget; false if exhausted.
    pub fn withdraw(&self) -> bool {
        let (w, r) = (self.withdraw, self.reserve);
        self.with_state(|s, cur| {
            let balance: i64 = s.buckets.iter().sum::<i64>() + r;
            if balance >= w {
                s.buckets[cur] -= w;
                true
            } else {
                false
            }
        })
    }

    /// Retries currently affordable.
    pub fn balance(&self) -> i64 {
        let (w, r) = (self.withdraw, self.reserve);
        self.with_state(|s, _| (s.buckets.iter().sum::<i64>() + r) / w)
    }
}
