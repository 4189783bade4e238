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
//! The same two figures for **pull** delivery, side by side: a producer's
//! feed ([`resilience::feed::FeedLog`], served over HTTP with long-polls)
//! read by a [`resilience::feed::FeedConsumer`] that commits its offset in
//! the same transaction as a state change (one row inserted per event):
//! drain of a 10,000-event backlog until the consumer's committed offset
//! reaches it, and commit-to-applied latency for 500 events appended one per
//! transaction.
//!
//! `cargo bench -p resilience --bench outbox` (`OUTBOX_BENCH_MESSAGES` to
//! change the backlog size).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use axum::extract::Query;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::routing::post;
use axum::Json;
use axum::Router;
use resilience::circuit_breaker::BreakerRegistry;
use resilience::fault::{FaultConfig, FaultHandle};
use resilience::feed::{
    ApplyError, Commit, ConsumerConfig, FeedConsumer, FeedEvent, FeedHandler, FeedLog, FeedQuery,
};
use resilience::outbox::{NoopHandler, Outbox, OutgoingRequest, Relay, RelayConfig};
use resilience::store::Backend;
use service_kit::stack::{self, StackConfig};
use service_kit::testing::TestDatabase;
use sqlx::{Any, Transaction};
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

impl Figures {
    /// The drain figure and the latency percentiles from when each id was
    /// committed and when it arrived (every committed id must have arrived).
    fn new(
        backend: &'static str,
        drain_msgs: usize,
        drain: Duration,
        committed: &HashMap<String, Instant>,
        arrived: &HashMap<String, Instant>,
    ) -> Result<Self> {
        let n = committed.len();
        let mut lat: Vec<Duration> = committed
            .iter()
            .filter_map(|(id, at)| arrived.get(id).map(|r| r.saturating_duration_since(*at)))
            .collect();
        anyhow::ensure!(
            n > 0 && lat.len() == n,
            "latency: {} of {n} matched",
            lat.len()
        );
        lat.sort();
        let pct = |p: f64| lat[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
        Ok(Self {
            backend,
            drain_msgs,
            drain,
            p50: pct(50.0),
            p99: pct(99.0),
            max: lat[n - 1],
        })
    }
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
    stop.cancel();
    let _ = task.await;
    db.close().await;
    tdb.cleanup().await;
    Figures::new(name, messages, drain, &committed, &received)
}

const FEED: &str = "bench.events";

/// Records when each event was applied, and applies it: one row per event,
/// in the consumer's transaction.
#[derive(Default)]
struct Applier {
    applied: Mutex<HashMap<String, Instant>>,
}

#[async_trait]
impl FeedHandler for Applier {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        event: &FeedEvent,
    ) -> Result<(), ApplyError> {
        sqlx::query("INSERT INTO feed_bench_applied (id) VALUES ($1)")
            .bind(&event.id)
            .execute(&mut **tx)
            .await?;
        if let Ok(mut m) = self.applied.lock() {
            m.entry(event.id.clone()).or_insert_with(Instant::now);
        }
        Ok(())
    }
}

async fn serve_feed(log: FeedLog) -> Result<String> {
    async fn feed(
        axum::extract::State(log): axum::extract::State<FeedLog>,
        Query(q): Query<FeedQuery>,
    ) -> Response {
        let Ok((after, limit, wait)) = q.validate() else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        match log.read_wait(FEED, after, limit, wait).await {
            Ok(page) => Json(page).into_response(),
            Err(e) => (e.status(), e.to_string()).into_response(),
        }
    }
    let app = Router::new().route("/feed", get(feed)).with_state(log);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/feed", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(url)
}

async fn measure_feed(backend: Backend, name: &'static str, events: usize) -> Result<Figures> {
    let tdb = TestDatabase::create(backend).await?;
    let db = tdb.connect("bench", "feed_bench").await?;
    db.migrate_resilience().await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS feed_bench_applied (id TEXT PRIMARY KEY)")
        .execute(db.pool())
        .await?;
    let log = FeedLog::new(db.clone());
    let url = serve_feed(log.clone()).await?;
    let stop = CancellationToken::new();
    let _wakeups = log.spawn_wakeups(stop.clone());
    let cfg = StackConfig {
        timeout: Duration::from_secs(10),
        faults: FaultHandle::new(FaultConfig::default(), 1)?,
        signer: None,
    };
    let svc = stack::durable(&cfg, BreakerRegistry::new(stack::default_breaker(), 8))?;
    let payload = serde_json::json!({ "payload": "x".repeat(200) });
    let committed_offset = |db: resilience::store::Db| async move {
        let n: Option<i64> =
            sqlx::query_scalar("SELECT position FROM feed_offsets WHERE feed = $1")
                .bind(FEED)
                .fetch_optional(db.pool())
                .await?;
        Ok::<i64, anyhow::Error>(n.unwrap_or(0))
    };

    // Drain: the backlog is committed first (batches of 500 per transaction).
    for chunk in (0..events).collect::<Vec<_>>().chunks(500) {
        let mut tx = db.begin().await?;
        for _ in chunk {
            let id = uuid::Uuid::now_v7().to_string();
            log.append(&mut tx, FEED, "thing", &id, &payload).await?;
        }
        tx.commit().await?;
    }
    let applier = Arc::new(Applier::default());
    let mut ccfg = ConsumerConfig::new(FEED, url, Commit::SameTransaction);
    ccfg.wait = Duration::from_secs(2);
    ccfg.batch = 500;
    let consumer = FeedConsumer::new(db.clone(), svc, applier.clone(), ccfg);
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(stop.clone()));
    let deadline = Duration::from_secs(600);
    while committed_offset(db.clone()).await? < events as i64 {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "feed drain took over {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = started.elapsed();

    // Latency: one event per transaction, the consumer long-polling.
    let n = 500;
    let mut committed = HashMap::with_capacity(n);
    for _ in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let mut tx = db.begin().await?;
        log.append(&mut tx, FEED, "thing", &id, &payload).await?;
        tx.commit().await?;
        committed.insert(id, Instant::now());
        log.notify();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    while committed_offset(db.clone()).await? < (events + n) as i64 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "latency events not applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied = applier
        .applied
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    stop.cancel();
    let _ = task.await;
    db.close().await;
    tdb.cleanup().await;
    Figures::new(name, events, drain, &committed, &applied)
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
    rows.push(rt.block_on(measure_feed(Backend::Sqlite, "sqlite pull", messages))?);
    match rt.block_on(measure(Backend::Postgres, "postgres", messages)) {
        Ok(f) => {
            rows.push(f);
            rows.push(rt.block_on(measure_feed(Backend::Postgres, "postgres pull", messages))?);
        }
        Err(e) => eprintln!("postgres skipped: {e:#}"),
    }
    println!(
        "{:<14} {:>9} {:>10} {:>12} {:>9} {:>9} {:>9}",
        "backend", "backlog", "drain", "msgs/s", "p50", "p99", "max"
    );
    for f in &rows {
        println!(
            "{:<14} {:>9} {:>9.2}s {:>12.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms",
            f.backend,
            f.drain_msgs,
            f.drain.as_secs_f64(),
            f.drain_msgs as f64 / f.drain.as_secs_f64(),
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.max.as_secs_f64() * 1e3,
        );
    }
    // Pull against push, measured in this run on the same backend.
    for pair in rows.chunks(2) {
        if let [push, pull] = pair {
            println!(
                "{}: pull/push drain rate {:.2}x, p50 latency {:.2}x",
                push.backend,
                push.drain.as_secs_f64() / pull.drain.as_secs_f64(),
                pull.p50.as_secs_f64() / push.p50.as_secs_f64(),
            );
        }
    }
    Ok(())
}
