//! Errors of the fault injector.

use std::fmt;

/// A fault injected by [`Fault`](super::Fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// The request was dropped before reaching the peer (like a connect
    /// error: the peer never saw it).
    RequestDropped,
    /// The peer processed the request but its response was discarded (like
    /// a connection reset after the peer committed).
    ResponseLost,
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InjectedFault::RequestDropped => "injected fault: request dropped",
            InjectedFault::ResponseLost => "injected fault: response lost",
        })
    }
}

impl std::error::Error for InjectedFault {}

/// A [`FaultConfig`](super::FaultConfig) field out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidFaultConfig {
    /// A rate outside `0..=1` (or not a number).
    #[error("invalid fault config: {field} = {value} is not a rate in 0..=1")]
    Rate {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// A latency longer than [`MAX_LATENCY`](super::MAX_LATENCY).
    #[error("invalid fault config: latency = {ms} ms is more than {max_ms} ms")]
    Latency {
        /// The latency asked for, in milliseconds.
        ms: u128,
        /// The longest latency allowed, in milliseconds.
        max_ms: u128,
    },
}
