use std::future::Future;
use std::time::Duration;

use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use tokio_util::sync::CancellationToken;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// A shutdown broadcast for a service's background tasks.
///
/// The server's own shutdown future is turned into a token that every task
/// (HTTP server, relay, warehouse, reaper) watches; each task drains its work
/// when the token fires.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    /// A fresh, unfired signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Has the signal fired?
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The underlying token, for machinery that takes one (the outbox relay).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Resolves when the signal fires.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }
}

/// How long a server waits for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// A connection that has not sent a whole request head this long after
    /// it became ready for one is closed (slowloris).
    pub header_read_timeout: Duration,
    /// A request not answered this long after its head arrived (slow body,
    /// slow handler) is answered 503 problem+json. The handler itself runs
    /// on (see [`detach`](super::detach)), so its outcome is unknown to the
    /// caller: the answer says to retry with the same `Idempotency-Key`.
    pub request_timeout: Duration,
}

impl Default for ServerLimits {
    /// 10 s for the head, 30 s for the whole request.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains
/// (with the default [`ServerLimits`]; see [`serve_with_limits`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    background: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> std::io::Result<()> {
    let limits = ServerLimits::default();
    serve_with_limits(listener, router, limits, shutdown, grace, background, tasks).await
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
///
/// HTTP/1.1 over hyper, with the [`ServerLimits`]: a connection that is slow
/// to send its request head is closed, a request slow to complete is
/// answered 503.
///
/// The drain order matters: first stop accepting and let in-flight requests
/// finish (they may enqueue work), then fire `background` so relays and
/// workers finish their current round, all within one `grace` period. Work
/// still running when it ends is dropped with a warning; whatever it had not
/// committed is picked up again at the next start (that is what the outbox is
/// for).
pub async fn serve_with_limits(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    background: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> std::io::Result<()> {
    let http_stop = Shutdown::new();
    let server = run_http(listener, router, limits, http_stop.wait());
    let mut server = tokio::spawn(server);

    tokio::select! {
        res = &mut server => {
            background.trigger();
            return res.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        }
        () = shutdown => {}
    }
    http_stop.trigger();
    let drained = tokio::time::timeout(grace, async {
        let res = (&mut server).await;
        background.trigger();
        for t in tasks {
            let _ = t.await;
        }
        res
    })
    .await;
    match drained {
        Ok(res) => res.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(_) => {
            tracing::warn!(?grace, "grace period over; dropping unfinished work");
            background.trigger();
            server.abort();
            Ok(())
        }
    }
}

/// Answers a request that is not done within `limit` with a 503 problem.
async fn request_deadline(
    limit: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(?limit, "request timed out");
            super::Problem::new(http::StatusCode::SERVICE_UNAVAILABLE, "request timeout")
                .kind("request-timeout")
                .detail(format!(
                    "the request was not answered within {} ms; its outcome is unknown: \
                     retry with the same Idempotency-Key",
                    limit.as_millis()
                ))
                .retry_after(1)
                .into_response()
        }
    }
}

/// The accept loop: one hyper HTTP/1.1 connection per client, each with a
/// header read timeout; on `stop`, stops accepting, lets every connection
/// finish its request in flight and waits for them to close.
async fn run_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let timeout = limits.request_timeout;
    let router = router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            request_deadline(timeout, req, next)
        },
    ));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// How long a stopping service waits for its database connections to close
/// after the HTTP server and the background tasks are done (or given up on).
pub const DB_CLOSE_LIMIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn start(limits: ServerLimits) -> (std::net::SocketAddr, Shutdown) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/fast", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            );
        let stop = Shutdown::new();
        tokio::spawn(run_http(listener, router, limits, stop.wait()));
        (addr, stop)
    }

    async fn read_all(stream: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let _ = stream.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[tokio::test]
    async fn half_a_request_head_is_cut_off() {
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(3), read_all(&mut s))
            .await
            .expect("the server kept a half-sent request open");
        stop.trigger();
    }

    #[tokio::test]
    async fn a_slow_request_gets_a_503_problem() {
        let limits = ServerLimits {
            request_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(3), read_all(&mut s))
            .await
            .expect("no answer");
        assert!(res.starts_with("HTTP/1.1 503"), "{res}");
        assert!(res.contains("application/problem+json"), "{res}");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let res = read_all(&mut s).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        stop.trigger();
    }
}
