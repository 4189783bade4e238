//! The fault profile the lab applies to both services' outgoing stacks.

use std::time::Duration;

use serde::Serialize;

/// Fault rates of both services' outgoing stacks. Serialized, it is the body
/// of the services' `PUT /admin/faults`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FaultProfile {
    /// Requests dropped before they reach the peer.
    pub drop_request: f64,
    /// Responses lost after the peer processed the request.
    pub drop_response: f64,
    /// Calls answered 503 without reaching the peer.
    pub error_503: f64,
    /// Calls delayed by `latency` before they are sent.
    pub latency_rate: f64,
    /// The added latency (past the request timeout, it is a timeout).
    #[serde(with = "millis")]
    pub latency: Duration,
}

impl Default for FaultProfile {
    fn default() -> Self {
        Self {
            drop_request: 0.1,
            drop_response: 0.1,
            error_503: 0.0,
            latency_rate: 0.0,
            latency: Duration::ZERO,
        }
    }
}

impl FaultProfile {
    /// No faults.
    pub const NONE: Self = Self {
        drop_request: 0.0,
        drop_response: 0.0,
        error_503: 0.0,
        latency_rate: 0.0,
        latency: Duration::ZERO,
    };

    /// The services' `--fault-*` command-line flags for this profile.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--fault-drop-request".into(),
            self.drop_request.to_string(),
            "--fault-drop-response".into(),
            self.drop_response.to_string(),
            "--fault-503".into(),
            self.error_503.to_string(),
            "--fault-latency-rate".into(),
            self.latency_rate.to_string(),
            "--fault-latency".into(),
            format!("{}ms", self.latency.as_millis()),
        ]
    }
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}
