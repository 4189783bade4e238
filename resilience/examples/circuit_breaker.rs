//! The circuit breaker layer around any tower service.
//!
//! A `service_fn` stands in for a peer that is down. The breaker counts its
//! failures, opens once the failure rate reaches the threshold, then rejects
//! calls at once with [`CircuitOpen`] (which says when to try again) instead
//! of calling the peer. When the open time is up it lets a few probe calls
//! through (half-open) and closes again once they succeed.
//!
//! Only needs the `circuit-breaker` feature (tower, no HTTP stack):
//!
//! ```text
//! cargo run -p resilience --example circuit_breaker --no-default-features --features circuit-breaker
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use resilience::circuit_breaker::{
    AnyErrorClassifier, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, State,
};
use tower::{BoxError, Layer, Service, ServiceExt};

#[tokio::main]
async fn main() -> Result<()> {
    // The "peer": fails while `down` is set, and counts the calls it sees.
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let peer = {
        let (down, calls) = (down.clone(), calls.clone());
        tower::service_fn(move |name: &'static str| {
            calls.fetch_add(1, Ordering::SeqCst);
            let failing = down.load(Ordering::SeqCst);
            async move {
                if failing {
                    Err(std::io::Error::other("peer unavailable"))
                } else {
                    Ok(format!("hello, {name}"))
                }
            }
        })
    };

    // Judge the last 10 calls once 5 were made; open at 50 % failures for
    // 200 ms; then admit 2 probes. `build` validates the ranges.
    let config = CircuitBreakerConfig::builder()
        .name("example-peer")
        .count_window(10)
        .minimum_calls(5)
        .failure_rate_threshold(50.0)
        .open_duration(Duration::from_millis(200))
        .half_open_permits(2)
        .on_state_change(|c| println!("  [breaker {}] {} -> {}", c.name, c.from, c.to))
        .build()?;

    // The default classifier (`HttpClassifier`) judges `http::Response`s by
    // status; this service is not HTTP, so count every `Err` as a failure.
    let layer = CircuitBreakerLayer::new(config).with_classifier(AnyErrorClassifier);
    let breaker = layer.handle().clone(); // to watch the state; clones share it
    let mut svc = layer.layer(peer);

    println!("1. the peer is down: failures trip the breaker");
    for _ in 0..5 {
        match call(&mut svc, "alice").await {
            Ok(r) => return Err(anyhow!("the peer is down, yet it answered {r:?}")),
            Err(e) => println!("  call failed: {e}"),
        }
    }
    ensure!(breaker.state() == State::Open, "breaker did not open");

    println!("2. while open, calls are rejected without reaching the peer");
    let seen = calls.load(Ordering::SeqCst);
    let err = match call(&mut svc, "bob").await {
        Ok(r) => return Err(anyhow!("expected a rejection, got {r:?}")),
        Err(e) => e,
    };
    // Errors are `tower::BoxError`; find the rejection in the chain.
    let open = CircuitOpen::find(err.as_ref()).ok_or_else(|| anyhow!("not CircuitOpen: {err}"))?;
    println!("  rejected: {open} (state {})", open.state());
    ensure!(calls.load(Ordering::SeqCst) == seen, "peer was called");

    println!("3. the peer recovers; after retry_after, probes close the breaker");
    down.store(false, Ordering::SeqCst);
    tokio::time::sleep(open.retry_after()).await;
    for name in ["carol", "dave"] {
        let reply = call(&mut svc, name)
            .await
            .map_err(anyhow::Error::from_boxed)?;
        println!("  probe answered {reply:?}; state {}", breaker.state());
    }
    ensure!(breaker.state() == State::Closed, "breaker did not close");
    let snap = breaker.snapshot();
    println!(
        "ok: closed again; {} call(s) were rejected while open",
        snap.rejected
    );
    Ok(())
}

/// One call, the tower way: wait until the service is ready, then call it.
async fn call<S>(svc: &mut S, name: &'static str) -> Result<String, BoxError>
where
    S: Service<&'static str, Response = String, Error = BoxError>,
{
    svc.ready().await?.call(name).await
}
