//! End-to-end figures of the durable retry loop, on SQLite (a temporary file)
//! and on Postgres (`TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; skipped if unreachable),
//! measured side by side in one run against a local axum peer over real HTTP.
//!
//! - **drain**: 10,000 messages committed while the peer was unreachable
//!   (the relay not running); then the relay starts and the clock runs until
//!   the peer has received every message and the outbox has none pending.
//! - **latency**: a healthy peer; 500 messages, each committed in its own
//!   transaction (then `notify`), 10 ms apart; the time from the commit's
//!   return to the peer's receipt, p50 / p99 / max, next to the relay's
//!   poll interval (1 s) that a missing wake-up would cost.
//!
//! `cargo bench -p resilience --bench outbox` (`OUTBOX_BENCH_MESSAGES` to
//! change the backlog size).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use resilience::circuit_breaker::BreakerRegistry;
use resilience::fault::{FaultConfig, FaultHandle};
use resilience::outbox::{NoopHandler, Outbox, OutgoingRequest, Relay, RelayConfig};
use resilience::store::Backend;
use service_kit::stack::{self, StackConfig};
use service_kit::testing::TestDatabase;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Peer {
    received: Mutex<HashMap<String, Instant>>,
}

impl Peer {
    fn count(&self) -> usize {
        self.received.lock().map(|m| m.len()).unwrap_or(0)
    }
}

async fn receive(State(peer): State<Arc<Peer>>, headers: HeaderMap) -> StatusCode {
    let now = Instant::now();
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        if let Ok(mut m) = peer.received.lock() {
            m.entry(key.to_string()).or_insert(now);
        }
    }
    StatusCode::CREATED
}

async fn start_peer() -> Result<(String, Arc<Peer>)> {
    let peer = Arc::new(Peer::default());
    let app = Router::new()
        .route("/things", post(receive))
        .with_state(peer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, peer))
}

fn relay(outbox: &Outbox) -> Result<Relay> {
    let cfg = StackConfig {
        timeout: Duration::from_secs(5),
        faults: FaultHandle::new(FaultConfig::default(), 1)?,
        signer: None,
    };
    let svc = stack::durable(&cfg, BreakerRegistry::new(stack::default_breaker(), 8))?;
    Ok(Relay::new(
        outbox.clone(),
        svc,
        Arc::new(NoopHandler),
        RelayConfig {
            owner: "bench".into(),
            ..RelayConfig::default()
        },
    ))
}

fn message(url: &str, i: usize) -> Result<OutgoingRequest> {
    Ok(OutgoingRequest::post_json(
        url,
        "/things",
        &serde_json::json!({ "n": i, "payload": "x".repeat(200) }),
        "thing",
    )?
    .with_idempotency_key(true))
}

async fn wait_for(peer: &Peer, n: usize, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    while peer.count() < n {
        anyhow::ensure!(
            start.elapsed() < deadline,
            "only {} of {n} received after {deadline:?}",
            peer.count()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

struct Figures {
    backend: &'static str,
    drain_msgs: usize,
    drain: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

async fn measure(backend: Backend, name: &'static str, messages: usize) -> Result<Figures> {
    let tdb = TestDatabase::create(backend).await?;
    let db = tdb.connect("bench", "outbox_bench").await?;
    db.migrate_resilience().await?;
    let outbox = Outbox::new(db.clone());
    let (url, peer) = start_peer().await?;

    // Drain: the backlog is committed first (batches of 500 per transaction).
    for chunk in (0..messages).collect::<Vec<_>>().chunks(500) {
        let mut tx = db.begin().await?;
        for i in chunk {
            outbox.enqueue(&mut tx, message(&url, *i)?).await?;
        }
        tx.commit().await?;
    }
    let stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(relay(&outbox)?.run(stop.clone()));
    wait_for(&peer, messages, Duration::from_secs(600)).await?;
    while outbox.stats().await?.pending > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = started.elapsed();

    // Latency: one message per transaction, the relay idle between them.
    let (url, peer) = start_peer().await?;
    let n = 500;
    let mut committed = HashMap::with_capacity(n);
    for i in 0..n {
        let mut tx = db.begin().await?;
        let id = outbox.enqueue(&mut tx, message(&url, i)?).await?;
        tx.commit().await?;
        committed.insert(id.to_string(), Instant::now());
        outbox.notify();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for(&peer, n, Duration::from_secs(60)).await?;
    let received = peer
        .received
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut lat: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, at)| received.get(id).map(|r| r.saturating_duration_since(*at)))
        .collect();
    anyhow::ensure!(lat.len() == n, "latency: {} of {n} matched", lat.len());
    lat.sort();
    let pct = |p: f64| lat[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];

    stop.cancel();
    let _ = task.await;
    db.close().await;
    tdb.cleanup().await;
    Ok(Figures {
        backend: name,
        drain_msgs: messages,
        drain,
        p50: pct(50.0),
        p99: pct(99.0),
        max: lat[n - 1],
    })
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // useful either: this harness has no filters, it just runs.
    let messages: usize = std::env::var("OUTBOX_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let quick = std::env::args().all(|a| a != "--bench");
    let messages = if quick { messages.min(200) } else { messages };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    rows.push(rt.block_on(measure(Backend::Sqlite, "sqlite", messages))?);
    match rt.block_on(measure(Backend::Postgres, "postgres", messages)) {
        Ok(f) => rows.push(f),
        Err(e) => eprintln!("postgres skipped: {e:#}"),
    }
    println!(
        "{:<9} {:>9} {:>10} {:>12} {:>9} {:>9} {:>9}",
        "backend", "backlog", "drain", "msgs/s", "p50", "p99", "max"
    );
    for f in &rows {
        println!(
            "{:<9} {:>9} {:>9.2}s {:>12.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms",
            f.backend,
            f.drain_msgs,
            f.drain.as_secs_f64(),
            f.drain_msgs as f64 / f.drain.as_secs_f64(),
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.max.as_secs_f64() * 1e3,
        );
    }
    if let [a, b] = &rows[..] {
        println!(
            "postgres/sqlite drain rate: {:.2}x; p50 latency vs the 1 s poll interval: {:.4}x (sqlite), {:.4}x (postgres)",
            a.drain.as_secs_f64() / b.drain.as_secs_f64(),
            a.p50.as_secs_f64(),
            b.p50.as_secs_f64(),
        );
    }
    Ok(())
}
