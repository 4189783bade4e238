//! The feed's wire format, shared by the server ([`super::FeedLog`]) and the
//! consumer ([`super::FeedConsumer`]), defined once.
//!
//! ```text
//! GET <feed url>?after=<position>&limit=<n>&wait=<duration>
//!
//! 200 application/json
//! {
//!   "events": [
//!     {"position": 7, "id": "0190…", "type": "order-created", "data": {…}, "created_at": 1718000000000}
//!   ],
//!   "next": 7,     // the `after` of the next request (last position here, or `after` if empty)
//!   "head": 12     // the producer's highest position: lag = head - next
//! }
//!
//! 410 application/problem+json   `after` fell behind the retained log
//! ```
//!
//! `wait` is a duration (`5s`, `500ms`; a bare number is milliseconds).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default page size when `limit` is absent.
pub const DEFAULT_LIMIT: u32 = 100;
/// The largest page a server hands out, whatever `limit` asks.
pub const MAX_LIMIT: u32 = 1000;
/// The longest long-poll a server honours, whatever `wait` asks.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// One event of a feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedEvent {
    /// Position in the feed: strictly increasing, without gaps.
    pub position: i64,
    /// The event's unique id (chosen by the producer).
    pub id: String,
    /// What happened, e.g. `order-created`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The data the consumer needs.
    pub data: serde_json::Value,
    /// When the producer appended it (ms since the Unix epoch).
    pub created_at: i64,
}

/// One answer of the feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    /// Events after the requested position, in position order, without gaps.
    pub events: Vec<FeedEvent>,
    /// The `after` of the next request.
    pub next: i64,
    /// The producer's highest position when the page was read.
    pub head: i64,
}

/// The query string of a feed request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedQuery {
    /// Return events with a position above this (0: from the start).
    #[serde(default)]
    pub after: i64,
    /// Page size (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Long-poll: how long to wait for an event when there is none yet.
    #[serde(default)]
    pub wait: Option<String>,
}

/// A query parameter that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `after` is negative.
    #[error("`after` must be 0 or more, got {0}")]
    NegativeAfter(i64),
    /// `limit` is zero.
    #[error("`limit` must be 1 or more")]
    ZeroLimit,
    /// `wait` is not a duration.
    #[error("`wait` is not a duration (e.g. 5s or 500ms): {0}")]
    Wait(String),
}

impl FeedQuery {
    /// A query for the consumer side.
    pub fn new(after: i64, limit: u32, wait: Duration) -> Self {
        Self {
            after,
            limit: Some(limit),
            wait: Some(format!("{}ms", wait.as_millis())),
        }
    }

    /// The validated values: `(after, limit, wait)`, with `limit` clamped to
    /// [`MAX_LIMIT`] and `wait` to [`MAX_WAIT`].
    pub fn validate(&self) -> Result<(i64, u32, Duration), QueryError> {
        if self.after < 0 {
            return Err(QueryError::NegativeAfter(self.after));
        }
        let limit = match self.limit {
            Some(0) => return Err(QueryError::ZeroLimit),
            Some(n) => n.min(MAX_LIMIT),
            None => DEFAULT_LIMIT,
        };
        let wait = match self.wait.as_deref().map(str::trim) {
            None | Some("") => Duration::ZERO,
            Some(w) => match w.parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms),
                Err(_) => humantime::parse_duration(w).map_err(|_| QueryError::Wait(w.into()))?,
            },
        };
        Ok((self.after, limit, wait.min(MAX_WAIT)))
    }

    /// The query string (without `?`).
    pub fn to_query_string(&self) -> String {
        let mut s = format!("after={}", self.after);
        if let Some(l) = self.limit {
            s.push_str(&format!("&limit={l}"));
        }
        if let Some(w) = &self.wait {
            s.push_str(&format!("&wait={w}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parses_and_clamps() {
        let q = FeedQuery {
            after: 5,
            limit: Some(5000),
            wait: Some("2s".into()),
        };
        assert_eq!(q.validate(), Ok((5, MAX_LIMIT, Duration::from_secs(2))));
        let q = FeedQuery {
            wait: Some("250".into()),
            ..FeedQuery::default()
        };
        assert_eq!(
            q.validate(),
            Ok((0, DEFAULT_LIMIT, Duration::from_millis(250)))
        );
        assert!(FeedQuery {
            after: -1,
            ..FeedQuery::default()
        }
        .validate()
        .is_err());
        assert!(FeedQuery {
            wait: Some("soon".into()),
            ..FeedQuery::default()
        }
        .validate()
        .is_err());
        let q = FeedQuery::new(3, 10, Duration::from_millis(1500));
        assert_eq!(q.to_query_string(), "after=3&limit=10&wait=1500ms");
        assert_eq!(q.validate(), Ok((3, 10, Duration::from_millis(1500))));
    }

    #[test]
    fn page_round_trips() {
        let json = r#"{"events":[{"position":1,"id":"a","type":"t","data":{"x":1},"created_at":5}],"next":1,"head":3}"#;
        let page: Page = serde_json::from_str(json).unwrap();
        assert_eq!(page.events[0].event_type, "t");
        assert_eq!(serde_json::to_string(&page).unwrap(), json);
    }
}
