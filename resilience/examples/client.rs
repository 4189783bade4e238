//! The reqwest-backed [`HttpClient`] as a tower service, under a timeout and
//! a circuit breaker per destination.
//!
//! The example starts two small axum servers on `127.0.0.1:0` and calls them
//! through the stack
//!
//! ```text
//! PerAuthorityLayer  one breaker per host:port, from a BreakerRegistry
//! timeout            bounds the whole call
//! HttpClient         pooled reqwest: http::Request<Bytes> -> http::Response<Bytes>
//! ```
//!
//! It shows a plain call, a timeout, and a breaker that opens for the broken
//! server only: the healthy one keeps answering.
//!
//! ```text
//! cargo run -p resilience --example client --no-default-features --features client,circuit-breaker
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use resilience::circuit_breaker::{BreakerRegistry, CircuitBreakerConfig, CircuitOpen, State};
use resilience::client::HttpClient;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

#[tokio::main]
async fn main() -> Result<()> {
    let (healthy, _) = serve(false).await?;
    let (broken, broken_hits) = serve(true).await?;

    // Each destination gets its own breaker, made on first use from this
    // configuration: judged on the last 4 calls, open at 50 % for 30 s.
    let config = CircuitBreakerConfig::builder()
        .count_window(4)
        .minimum_calls(4)
        .open_duration(Duration::from_secs(30))
        .build()?;
    let breakers = BreakerRegistry::new(config, 64);
    let mut svc = ServiceBuilder::new()
        .layer(resilience::circuit_breaker::PerAuthorityLayer::new(
            breakers.clone(),
        ))
        .timeout(Duration::from_millis(300))
        .service(HttpClient::new(Duration::from_secs(5))?);

    println!("1. a plain GET");
    let res = fetch(&mut svc, &format!("http://{healthy}/hello"))
        .await
        .map_err(anyhow::Error::from_boxed)?;
    println!("  {} {:?}", res.status(), res.body());
    ensure!(res.status() == StatusCode::OK && res.body() == "hello");

    println!("2. a slow answer hits the timeout");
    match fetch(&mut svc, &format!("http://{healthy}/slow")).await {
        Err(e) if e.is::<tower::timeout::error::Elapsed>() => println!("  error: {e}"),
        other => return Err(anyhow!("expected a timeout, got {other:?}")),
    }

    println!("3. 5xx answers open the breaker of that destination only");
    // The default classifier counts 5xx, 429, timeouts and connect errors as
    // failures; a 503 is still returned to the caller as a response.
    let mut opened = None;
    for _ in 0..10 {
        match fetch(&mut svc, &format!("http://{broken}/hello")).await {
            Ok(res) => println!("  {}", res.status()),
            Err(e) => match CircuitOpen::find(e.as_ref()) {
                Some(open) => {
                    opened = Some(*open);
                    break;
                }
                None => return Err(anyhow::Error::from_boxed(e)),
            },
        }
    }
    let open = opened.ok_or_else(|| anyhow!("the breaker never opened"))?;
    let hits = broken_hits.load(Ordering::SeqCst);
    println!("  rejected without a request ({open}); the server saw {hits}");
    ensure!(hits == 4, "calls went through an open breaker");
    let state = breakers.get(&broken.to_string()).map(|b| b.state());
    ensure!(state == Some(State::Open), "registry says {state:?}");

    let res = fetch(&mut svc, &format!("http://{healthy}/hello"))
        .await
        .map_err(anyhow::Error::from_boxed)?;
    println!("  the healthy server still answers: {}", res.status());
    ensure!(res.status() == StatusCode::OK);
    println!("ok: breakers for {:?}", breakers.authorities());
    Ok(())
}

/// One GET through the stack.
async fn fetch<S>(svc: &mut S, url: &str) -> Result<http::Response<Bytes>, BoxError>
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>, Error = BoxError>,
{
    let req = http::Request::get(url).body(Bytes::new())?;
    svc.ready().await?.call(req).await
}

/// Starts a server on 127.0.0.1:0 (port chosen by the OS) that counts the
/// calls to `/hello`, which it answers 503 if `broken`; `/slow` takes 2 s.
async fn serve(broken: bool) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let hello = move || async move {
        counter.fetch_add(1, Ordering::SeqCst);
        if broken {
            (StatusCode::SERVICE_UNAVAILABLE, "down")
        } else {
            (StatusCode::OK, "hello")
        }
    };
    let slow = || async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        "late"
    };
    let app = Router::new()
        .route("/hello", get(hello))
        .route("/slow", get(slow));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("server on {addr} failed: {e}");
        }
    });
    Ok((addr, hits))
}
