use std::future::Future;

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

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
///
/// The drain order matters: first stop accepting and let in-flight requests
/// finish (they may enqueue work), then fire `background` so relays and
/// workers finish their current round, all within one `grace` period. Work
/// still running when it ends is dropped with a warning; whatever it had not
/// committed is picked up again at the next start (that is what the outbox is
/// for).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
    background: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> std::io::Result<()> {
    let http_stop = Shutdown::new();
    let server = axum::serve(listener, router).with_graceful_shutdown(http_stop.wait());
    let mut server = tokio::spawn(async move { server.await });

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
