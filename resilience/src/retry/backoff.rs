//! Exponential backoff with full jitter.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Exponential backoff with *full jitter*: the delay before retry number
/// `attempt` (0 for the first retry) is uniform in
/// `[0, min(cap, base * multiplier^attempt)]`.
///
/// Pure and `Copy`; the durable outbox relay uses the same type to schedule
/// its next attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub base: Duration,
    /// Growth per attempt (>= 1).
    pub multiplier: f64,
    /// Upper bound of any delay.
    pub cap: Duration,
}

impl Default for Backoff {
    /// 100 ms base, ×2, capped at 30 s.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            multiplier: 2.0,
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// A backoff from its three parameters (a multiplier below 1 is treated as 1).
    pub fn new(base: Duration, multiplier: f64, cap: Duration) -> Self {
        Backoff {
            base,
            multiplier: if multiplier.is_finite() {
                multiplier.max(1.0)
            } else {
                1.0
            },
            cap,
        }
    }

    /// The largest delay for `attempt`: `min(cap, base * multiplier^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt).unwrap_or(i32::MAX);
        let secs = self.base.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs.max(0.0)).min(self.cap)
        }
    }

    /// A full-jitter delay for `attempt` drawn from `rng`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let max = u64::try_from(self.ceiling(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=max))
    }

    /// A full-jitter delay for `attempt` using the thread rng.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        self.delay(attempt, &mut rand::thread_rng())
    }

    /// A deterministic delay for `attempt`: the same `(seed, attempt)` always
    /// gives the same delay (e.g. seed with a message id to spread a batch).
    pub fn delay_seeded(&self, attempt: u32, seed: u64) -> Duration {
        let mut rng = SmallRng::seed_from_u64(seed ^ u64::from(attempt).rotate_left(32));
        self.delay(attempt, &mut rng)
    }
}
