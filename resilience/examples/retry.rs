//! The retry layer: full-jitter backoff, idempotency rules and a retry budget.
//!
//! A `service_fn` stands in for a flaky HTTP peer that answers `503` a given
//! number of times before it answers `200`. The example shows that
//!
//! 1. a `GET` is retried (with backoff) until it succeeds;
//! 2. a `POST` is not retried, because repeating it could repeat its effect,
//!    unless it carries an `Idempotency-Key`;
//! 3. a shared [`RetryBudget`] caps retries against a dead peer to a fraction
//!    of the traffic, so retries do not multiply the load during an outage.
//!
//! ```text
//! cargo run -p resilience --example retry --no-default-features --features retry
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use resilience::retry::{Backoff, RetryBudget, RetryLayer, RetryPolicy, IDEMPOTENCY_KEY};
use tower::{BoxError, Layer, Service, ServiceExt};

#[tokio::main]
async fn main() -> Result<()> {
    // The peer answers 503 while `failures` is above zero, then 200.
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let peer = {
        let (failures, calls) = (failures.clone(), calls.clone());
        tower::service_fn(move |_req: Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let failed = failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let status = if failed {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            async move {
                let mut res = Response::new(Bytes::from_static(b"hi"));
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        })
    };

    // Up to 4 attempts; the delay before retry n is uniform in
    // [0, min(50 ms, 10 ms * 2^n)] ("full jitter").
    let backoff = Backoff::new(Duration::from_millis(10), 2.0, Duration::from_millis(50));
    let policy = RetryPolicy::default().max_attempts(4).backoff(backoff);
    let mut svc = RetryLayer::new(policy.clone()).layer(peer.clone());

    println!("1. GET, peer fails twice: retried until it answers");
    failures.store(2, Ordering::SeqCst);
    let status = send(&mut svc, Method::GET, None).await?;
    println!("  {status} after {} attempts", take(&calls));
    ensure!(status == StatusCode::OK, "GET was not retried to success");

    println!("2. POST, peer fails once");
    failures.store(1, Ordering::SeqCst);
    let status = send(&mut svc, Method::POST, None).await?;
    println!(
        "  without a key: {status} after {} attempt(s)",
        take(&calls)
    );
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE,
        "unsafe POST was retried"
    );
    failures.store(1, Ordering::SeqCst);
    let status = send(&mut svc, Method::POST, Some("order-42")).await?;
    println!(
        "  with Idempotency-Key: {status} after {} attempts",
        take(&calls)
    );
    ensure!(status == StatusCode::OK, "keyed POST was not retried");

    println!("3. the peer is dead: a retry budget caps the extra load");
    // Every request deposits 1, every retry costs 1 / 0.5 = 2: at most one
    // retry per two requests (no reserve: `min_per_sec` = 0). Share one
    // budget (an `Arc`) between all the clients of one peer.
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.5));
    let mut svc = RetryLayer::new(policy.budget(budget)).layer(peer);
    failures.store(usize::MAX, Ordering::SeqCst);
    for _ in 0..10 {
        send(&mut svc, Method::GET, None).await?;
    }
    let sent = take(&calls);
    println!("  10 requests made {sent} calls (40 without the budget)");
    ensure!(sent <= 15, "the budget did not cap retries: {sent} calls");
    println!("ok");
    Ok(())
}

/// Sends one request through `svc` and returns the final status.
async fn send<S>(svc: &mut S, method: Method, key: Option<&str>) -> Result<StatusCode>
where
    S: Service<Request<Bytes>, Response = Response<Bytes>, Error = BoxError>,
{
    let mut req = Request::builder()
        .method(method)
        .uri("http://peer.example/orders");
    if let Some(key) = key {
        req = req.header(IDEMPOTENCY_KEY, key);
    }
    let req = req.body(Bytes::new())?;
    // The retry layer gives back the last response (or error) once it stops.
    let res = svc.ready().await.map_err(anyhow::Error::from_boxed)?;
    let res = res.call(req).await.map_err(anyhow::Error::from_boxed)?;
    Ok(res.status())
}

/// Reads and resets a counter.
fn take(counter: &AtomicUsize) -> usize {
    counter.swap(0, Ordering::SeqCst)
}
