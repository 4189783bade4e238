//! HTTP client service: `http::Request<Bytes>` in, `http::Response<Bytes>` out, over a pooled `reqwest::Client`.

pub mod error;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tower::Service;

pub use error::ClientError;

/// Response future of [`HttpClient`].
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, ClientError>> + Send + 'static>>;

/// A tower service over a pooled `reqwest::Client`.
///
/// Cheap to clone (clones share the connection pool). Every request gets the
/// configured timeout (covering connect, send and reading the whole body)
/// unless [`HttpClient::without_timeout`]. The whole response body is read
/// into `Bytes`. Always ready.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    timeout: Option<Duration>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpClient {
    /// A client with a per-request `timeout` and a 5 s connect timeout.
    pub fn new(timeout: Duration) -> Result<Self, ClientError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5).min(timeout))
            // NOTE: below the servers' header read timeout (10 s by default),
            // which also closes idle keep-alive connections: the client lets
            // go of an idle connection before the server does, so a request
            // is not sent on one the server is closing.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(ClientError::Request)?;
        Ok(HttpClient::from_reqwest(client, Some(timeout)))
    }

    /// Wraps an existing client (its own settings stay), with an optional
    /// per-request timeout.
    pub fn from_reqwest(client: reqwest::Client, timeout: Option<Duration>) -> Self {
        HttpClient { client, timeout }
    }

    /// Same pool, another per-request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        HttpClient {
            client: self.client.clone(),
            timeout: Some(timeout),
        }
    }

    /// Same pool, no per-request timeout.
    pub fn without_timeout(&self) -> Self {
        HttpClient {
            client: self.client.clone(),
            timeout: None,
        }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The underlying reqwest client.
    pub fn reqwest(&self) -> &reqwest::Client {
        &self.client
    }
}

impl Service<http::Request<Bytes>> for HttpClient {
    type Response = http::Response<Bytes>;
    type Error = ClientError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Bytes>) -> Self::Future {
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let mut req = reqwest::Request::try_from(req).map_err(ClientError::Request)?;
            if let Some(t) = timeout {
                *req.timeout_mut() = Some(t);
            }
            let work = async {
                let resp = client
                    .execute(req)
                    .await
                    .map_err(|e| ClientError::from_reqwest(e, timeout))?;
                let status = resp.status();
                let version = resp.version();
                let headers = resp.headers().clone();
                let body = resp
                    .bytes()
                    .await
                    .map_err(|e| ClientError::from_reqwest(e, timeout))?;
                let mut out = http::Response::new(body);
                *out.status_mut() = status;
                *out.version_mut() = version;
                *out.headers_mut() = headers;
                Ok(out)
            };
            match timeout {
                // reqwest enforces the timeout too; this outer guard also
                // bounds the time spent before the request is dispatched and
                // makes paused-tokio-time tests deterministic.
                Some(t) => match tokio::time::timeout(t, work).await {
                    Ok(r) => r,
                    Err(_) => Err(ClientError::Timeout(t, None)),
                },
                None => work.await,
            }
        })
    }
}
