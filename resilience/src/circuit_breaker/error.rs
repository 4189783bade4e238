//! Error types of the circuit breaker.

use std::error::Error;
use std::fmt;
use std::time::{Duration, Instant};

use super::State;

/// The breaker rejected the call without sending it.
///
/// Returned (boxed in a `tower::BoxError`) by the service's response future.
/// Read [`retry_after`](CircuitOpen::retry_after) or
/// [`until`](CircuitOpen::until) to schedule the next attempt instead of
/// spinning. Find it in any error chain with [`CircuitOpen::find`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_after: Duration,
    until: Instant,
    state: State,
}

impl CircuitOpen {
    /// A rejection valid for `retry_after` from `now`.
    pub fn new(state: State, now: Instant, retry_after: Duration) -> Self {
        CircuitOpen {
            retry_after,
            until: now + retry_after,
            state,
        }
    }

    /// A rejection valid until `until`, `retry_after` from the moment of
    /// rejection.
    pub(crate) fn with_until(state: State, until: Instant, retry_after: Duration) -> Self {
        CircuitOpen {
            retry_after,
            until,
            state,
        }
    }

    /// How long to wait, from the moment of rejection, before trying again.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The instant (on the breaker's clock) when a call may be admitted again.
    pub fn until(&self) -> Instant {
        self.until
    }

    /// The state that rejected the call (open, half-open with all probe
    /// permits taken, or forced-open).
    pub fn state(&self) -> State {
        self.state
    }

    /// Finds a `CircuitOpen` in `err` or its chain of sources.
    pub fn find<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a CircuitOpen> {
        let mut cur: Option<&(dyn Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(c) = e.downcast_ref::<CircuitOpen>() {
                return Some(c);
            }
            cur = e.source();
        }
        None
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit {}; retry after {:?}",
            self.state, self.retry_after
        )
    }
}

impl Error for CircuitOpen {}

/// An invalid circuit breaker configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    msg: &'static str,
}

impl ConfigError {
    pub(crate) fn new(msg: &'static str) -> Self {
        ConfigError { msg }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid circuit breaker config: {}", self.msg)
    }
}

impl Error for ConfigError {}
