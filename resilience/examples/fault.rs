//! Seeded fault injection in front of an HTTP service.
//!
//! [`FaultLayer`] makes a healthy service look like a bad network: it drops
//! requests before they reach the peer, loses responses after the peer has
//! done the work, answers synthetic `503`s, and adds latency. The rng is
//! seeded, so a run can be replayed exactly, and the rates can be changed
//! at run time through the layer's [`FaultHandle`] (e.g. from an admin
//! endpoint) without rebuilding the stack.
//!
//! ```text
//! cargo run -p resilience --example fault --no-default-features --features fault
//! ```

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use http::{Request, Response, StatusCode};
use resilience::fault::{FaultConfig, FaultHandle, FaultLayer, InjectedFault};
use tower::{BoxError, Layer, Service, ServiceExt};

/// What 1000 calls came to.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    ok: u64,
    unavailable: u64,
    dropped: u64,
    lost: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    // A healthy peer that counts the requests it actually receives.
    let received = Arc::new(AtomicU64::new(0));
    let peer = {
        let received = received.clone();
        tower::service_fn(move |_req: Request<String>| {
            received.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(String::from("done"))) }
        })
    };

    // 10 % of requests dropped, 20 % answered 503; seed 42.
    let config = FaultConfig {
        drop_request: 0.10,
        error_503: 0.20,
        ..FaultConfig::default()
    };
    let layer = FaultLayer::new(config, 42)?; // rates outside 0..=1 are refused
    let faults: FaultHandle = layer.handle().clone();
    let mut svc = layer.layer(peer);

    println!("1. drop 10 %, 503 20 %");
    let first = run(&mut svc, 1000).await?;
    println!(
        "  {first:?}; the peer saw {}",
        received.swap(0, Ordering::SeqCst)
    );
    let snap = faults.snapshot(); // the injector's own counters
    ensure!(snap.dropped == first.dropped && snap.synthetic_503 == first.unavailable);
    ensure!((50..150).contains(&first.dropped), "drop rate far off");
    ensure!((150..250).contains(&first.unavailable), "503 rate far off");

    println!("2. same seed again: exactly the same faults");
    faults.reseed(42);
    let again = run(&mut svc, 1000).await?;
    ensure!(again == first, "not reproducible: {again:?}");
    received.store(0, Ordering::SeqCst);

    println!("3. at run time: lose every response (the peer still does the work)");
    faults.set(FaultConfig {
        drop_response: 1.0,
        ..FaultConfig::default()
    })?;
    let lost = run(&mut svc, 100).await?;
    let seen = received.swap(0, Ordering::SeqCst);
    println!("  {lost:?}; the peer saw {seen}");
    ensure!(lost.lost == 100 && seen == 100, "responses were not lost");

    println!("4. faults off");
    faults.disable();
    let clean = run(&mut svc, 100).await?;
    ensure!(clean.ok == 100, "faults still firing: {clean:?}");
    println!("ok: {:?}", faults.snapshot());
    Ok(())
}

/// Sends `n` requests and sorts out what came back.
async fn run<S>(svc: &mut S, n: usize) -> Result<Tally>
where
    S: Service<Request<String>, Response = Response<String>, Error = BoxError>,
{
    let mut t = Tally::default();
    for i in 0..n {
        let req = Request::post("http://peer.example/work").body(format!("job {i}"))?;
        let ready = svc.ready().await.map_err(anyhow::Error::from_boxed)?;
        match ready.call(req).await {
            Ok(res) if res.status() == StatusCode::OK => t.ok += 1,
            Ok(res) if res.status() == StatusCode::SERVICE_UNAVAILABLE => t.unavailable += 1,
            Ok(res) => return Err(anyhow!("unexpected status {}", res.status())),
            // Injected faults are errors you can tell apart by type.
            Err(e) => match e.downcast_ref::<InjectedFault>() {
                Some(InjectedFault::RequestDropped) => t.dropped += 1,
                Some(InjectedFault::ResponseLost) => t.lost += 1,
                None => return Err(anyhow::Error::from_boxed(e)),
            },
        }
    }
    Ok(t)
}
