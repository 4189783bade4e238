//! Error type of the HTTP client.

use std::time::Duration;

/// Why an HTTP call failed. Check with [`is_connect`](ClientError::is_connect)
/// and [`is_timeout`](ClientError::is_timeout), or match.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Could not connect (refused, unreachable, DNS, TLS handshake).
    #[error("connect error")]
    Connect(#[source] reqwest::Error),
    /// The per-request timeout elapsed (connect, send or reading the body).
    #[error("request timed out after {0:?}")]
    Timeout(Duration, #[source] Option<reqwest::Error>),
    /// Reading the response body failed.
    #[error("error reading response body")]
    Body(#[source] reqwest::Error),
    /// The request could not be built or sent as given (bad URI, method…).
    #[error("invalid request")]
    Request(#[source] reqwest::Error),
    /// Anything else (connection reset mid-request, protocol error…).
    #[error("http client error")]
    Other(#[source] reqwest::Error),
}

impl ClientError {
    /// Connection could not be established.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_))
    }

    /// The request timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout(..))
    }

    /// Reading the body failed.
    pub fn is_body(&self) -> bool {
        matches!(self, ClientError::Body(_))
    }

    /// The request itself was invalid.
    pub fn is_request(&self) -> bool {
        matches!(self, ClientError::Request(_))
    }

    pub(crate) fn from_reqwest(e: reqwest::Error, timeout: Option<Duration>) -> Self {
        if e.is_timeout() {
            ClientError::Timeout(timeout.unwrap_or_default(), Some(e))
        } else if e.is_connect() {
            ClientError::Connect(e)
        } else if e.is_body() || e.is_decode() {
            ClientError::Body(e)
        } else if e.is_builder() || e.is_request() && e.url().is_none() {
            ClientError::Request(e)
        } else {
            ClientError::Other(e)
        }
    }
}
