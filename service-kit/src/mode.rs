//! The delivery guarantee a message travels with.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How a message is delivered from one service to another.
///
/// | mode | sender | receiver | guarantee |
/// |---|---|---|---|
/// | `at-most-once` | commit, then one plain call | processes every request | may lose, never duplicates |
/// | `at-least-once` | outbox + durable retry + breaker | processes every request | never loses, may duplicate |
/// | `effectively-once` | as above, plus an idempotency key | de-duplicates by key in the state change's transaction | never loses, never duplicates |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// One plain HTTP call after commit; no retry, no key.
    AtMostOnce,
    /// Transactional outbox and a relay that retries until acknowledged.
    AtLeastOnce,
    /// At-least-once plus idempotency keys honoured by the receiver.
    EffectivelyOnce,
}

impl DeliveryMode {
    /// Every mode, in the order the lab runs them.
    pub const ALL: [DeliveryMode; 3] = [
        DeliveryMode::AtMostOnce,
        DeliveryMode::AtLeastOnce,
        DeliveryMode::EffectivelyOnce,
    ];

    /// The wire and storage name (`at-most-once`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::AtMostOnce => "at-most-once",
            DeliveryMode::AtLeastOnce => "at-least-once",
            DeliveryMode::EffectivelyOnce => "effectively-once",
        }
    }

    /// Does this mode deliver through the outbox?
    pub fn uses_outbox(self) -> bool {
        !matches!(self, DeliveryMode::AtMostOnce)
    }

    /// Does this mode stamp idempotency keys?
    pub fn uses_idempotency_key(self) -> bool {
        matches!(self, DeliveryMode::EffectivelyOnce)
    }
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of the three mode names.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown delivery mode {0:?} (expected at-most-once, at-least-once or effectively-once)")]
pub struct UnknownMode(pub String);

impl FromStr for DeliveryMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "at-most-once" => Ok(DeliveryMode::AtMostOnce),
            "at-least-once" => Ok(DeliveryMode::AtLeastOnce),
            "effectively-once" => Ok(DeliveryMode::EffectivelyOnce),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}
