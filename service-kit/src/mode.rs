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
/// | `memory-dedupe` | as effectively-once | de-duplicates by key in a process-local map | duplicates after a receiver restart (counter-example) |
/// | `pull-at-least-once` | appends to its own event log, served as a feed | reads from its offset, commits the offset after the state change, periodically | never loses, may duplicate |
/// | `pull-effectively-once` | as pull-at-least-once | commits the offset in the state change's transaction | never loses, never duplicates |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// One plain HTTP call after commit; no retry, no key.
    AtMostOnce,
    /// Transactional outbox and a relay that retries until acknowledged.
    AtLeastOnce,
    /// At-least-once plus idempotency keys honoured by the receiver.
    EffectivelyOnce,
    /// Counter-example: as effectively-once, but the receiver remembers keys
    /// in process memory only, so a restart forgets them.
    MemoryDedupe,
    /// Pull: the producer's event log, the consumer's offset committed after
    /// the state change, on its own.
    PullAtLeastOnce,
    /// Pull: the consumer's offset committed with the state change.
    PullEffectivelyOnce,
}

impl DeliveryMode {
    /// Every mode, in the order the lab runs them.
    pub const ALL: [DeliveryMode; 6] = [
        DeliveryMode::AtMostOnce,
        DeliveryMode::AtLeastOnce,
        DeliveryMode::EffectivelyOnce,
        DeliveryMode::MemoryDedupe,
        DeliveryMode::PullAtLeastOnce,
        DeliveryMode::PullEffectivelyOnce,
    ];

    /// The pull modes, each with a feed of its own on both sides.
    pub const PULL: [DeliveryMode; 2] = [
        DeliveryMode::PullAtLeastOnce,
        DeliveryMode::PullEffectivelyOnce,
    ];

    /// The wire and storage name (`at-most-once`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::AtMostOnce => "at-most-once",
            DeliveryMode::AtLeastOnce => "at-least-once",
            DeliveryMode::EffectivelyOnce => "effectively-once",
            DeliveryMode::MemoryDedupe => "memory-dedupe",
            DeliveryMode::PullAtLeastOnce => "pull-at-least-once",
            DeliveryMode::PullEffectivelyOnce => "pull-effectively-once",
        }
    }

    /// Does this mode deliver through the outbox (push)?
    pub fn uses_outbox(self) -> bool {
        matches!(
            self,
            DeliveryMode::AtLeastOnce | DeliveryMode::EffectivelyOnce | DeliveryMode::MemoryDedupe
        )
    }

    /// Does the sender stamp idempotency keys?
    pub fn uses_idempotency_key(self) -> bool {
        matches!(
            self,
            DeliveryMode::EffectivelyOnce | DeliveryMode::MemoryDedupe
        )
    }

    /// Does the receiver keep its memory of keys in the process only?
    pub fn dedupes_in_memory(self) -> bool {
        matches!(self, DeliveryMode::MemoryDedupe)
    }

    /// Is this a pull mode (event log + consumer offset)?
    pub fn uses_feed(self) -> bool {
        matches!(
            self,
            DeliveryMode::PullAtLeastOnce | DeliveryMode::PullEffectivelyOnce
        )
    }

    /// Does the receiver commit its offset with the state change (pull) or
    /// record its key with it (push)? The modes that promise no duplicates.
    pub fn promises_no_duplicates(self) -> bool {
        matches!(
            self,
            DeliveryMode::AtMostOnce
                | DeliveryMode::EffectivelyOnce
                | DeliveryMode::PullEffectivelyOnce
        )
    }

    /// Does the mode promise that nothing is lost?
    pub fn promises_no_loss(self) -> bool {
        !matches!(self, DeliveryMode::AtMostOnce)
    }
}

impl fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text was not one of the mode names.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown delivery mode {0:?} (expected at-most-once, at-least-once, effectively-once, memory-dedupe, pull-at-least-once or pull-effectively-once)")]
pub struct UnknownMode(pub String);

impl FromStr for DeliveryMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "at-most-once" => Ok(DeliveryMode::AtMostOnce),
            "at-least-once" => Ok(DeliveryMode::AtLeastOnce),
            "effectively-once" => Ok(DeliveryMode::EffectivelyOnce),
            "memory-dedupe" => Ok(DeliveryMode::MemoryDedupe),
            "pull-at-least-once" => Ok(DeliveryMode::PullAtLeastOnce),
            "pull-effectively-once" => Ok(DeliveryMode::PullEffectivelyOnce),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}
