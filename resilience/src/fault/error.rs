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
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidFaultConfig {
    /// The offending field.
    pub field: &'static str,
    /// Its value.
    pub value: f64,
}

impl fmt::Display for InvalidFaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid fault config: {} = {} is not a rate in 0..=1",
            self.field, self.value
        )
    }
}

impl std::error::Error for InvalidFaultConfig {}
