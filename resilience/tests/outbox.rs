//! The outbox and its relay against a real HTTP peer, on SQLite and Postgres.
//!
//! The peer is a small axum app on 127.0.0.1:0 that counts every request it
//! receives per idempotency key (the message id), and can be told to fail,
//! to be slow, or to refuse a poison body.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use resilience::circuit_breaker::BreakerRegistry;
use resilience::fault::{FaultConfig, FaultHandle};
use resilience::foreground::{Foreground, GiveWay};
use resilience::outbox::{
    DeadLetter, DeliveryHandler, NoopHandler, Outbox, OutgoingRequest, Relay, RelayConfig,
    SentMessage, Write,
};
use resilience::retry::Backoff;
use resilience::store::{Backend, Db};
use service_kit::stack::{self, StackConfig};
use service_kit::testing::TestDatabase;
use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Peer {
    received: Mutex<HashMap<String, u32>>,
    total: AtomicU64,
    failing: AtomicBool,
    /// Delay (ms) of every first receipt of a message.
    slow_first_ms: AtomicU64,
    /// Bodies equal to this are refused with 422 (while `poison_on`).
    poison_on: AtomicBool,
}

impl Peer {
    fn distinct(&self) -> usize {
        self.received.lock().map(|m| m.len()).unwrap_or(0)
    }
    fn total(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }
}

async fn receive(State(peer): State<Arc<Peer>>, headers: HeaderMap, body: String) -> StatusCode {
    peer.total.fetch_add(1, Ordering::SeqCst);
    if peer.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if body.contains("poison") && peer.poison_on.load(Ordering::SeqCst) {
        return StatusCode::UNPROCESSABLE_ENTITY;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    let first = {
        let mut m = peer.received.lock().expect("peer map");
        let n = m.entry(key).or_insert(0);
        *n += 1;
        *n == 1
    };
    let slow = peer.slow_first_ms.load(Ordering::SeqCst);
    if first && slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    StatusCode::CREATED
}

async fn start_peer() -> Result<(String, Arc<Peer>, JoinHandle<()>)> {
    let peer = Arc::new(Peer::default());
    let app = Router::new()
        .route("/things", post(receive))
        .with_state(peer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, peer, task))
}

struct Env {
    tdb: TestDatabase,
    db: Db,
}

async fn env(backend: Backend) -> Result<Env> {
    let tdb = TestDatabase::create(backend).await?;
    let db = tdb.connect("outbox", "outbox_test").await?;
    db.migrate_resilience().await?;
    Ok(Env { tdb, db })
}

fn service(timeout: Duration) -> Result<service_kit::stack::SendService> {
    let cfg = StackConfig {
        timeout,
        faults: FaultHandle::new(FaultConfig::default(), 1)?,
        signer: None,
    };
    Ok(stack::durable(
        &cfg,
        BreakerRegistry::new(stack::default_breaker(), 8),
    )?)
}

fn relay_config(owner: &str) -> RelayConfig {
    RelayConfig {
        owner: owner.into(),
        poll_interval: Duration::from_millis(200),
        backoff: Backoff::new(Duration::from_millis(20), 2.0, Duration::from_millis(500)),
        ..RelayConfig::default()
    }
}

fn start_relay(
    outbox: &Outbox,
    config: RelayConfig,
    stop: &CancellationToken,
) -> Result<JoinHandle<()>> {
    let relay = Relay::new(
        outbox.clone(),
        service(Duration::from_secs(2))?,
        Arc::new(NoopHandler),
        config,
    );
    Ok(tokio::spawn(relay.run(stop.clone())))
}

async fn enqueue(outbox: &Outbox, url: &str, n: usize, body: &str) -> Result<()> {
    // Batches of 100 per transaction, like a busy service would commit.
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut tx = outbox.db().begin().await?;
        for i in chunk {
            let msg = OutgoingRequest::post_json(
                url,
                "/things",
                &serde_json::json!({ "n": i, "body": body }),
                "thing",
            )?
            .with_idempotency_key(true);
            outbox.enqueue(&mut tx, msg).await?;
        }
        tx.commit().await?;
        outbox.notify();
    }
    Ok(())
}

async fn count(db: &Db, sql: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db.pool()).await?)
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let start = tokio::time::Instant::now();
    while !check() {
        ensure!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_db(db: &Db, what: &str, sql: &str, want: i64) -> Result<()> {
    let start = tokio::time::Instant::now();
    loop {
        let n = count(db, sql).await?;
        if n == want {
            return Ok(());
        }
        ensure!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}: {n} != {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two relays drain 1,000 messages; with leases longer than any send, no
/// message is sent twice.
async fn two_relays_drain_a_backlog(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    let outbox_a = Outbox::new(e.db.clone());
    let db_b = e.tdb.connect("outbox", "outbox_test").await?;
    let outbox_b = Outbox::new(db_b);
    enqueue(&outbox_a, &url, 1000, "x").await?;

    let stop = CancellationToken::new();
    let a = start_relay(&outbox_a, relay_config("relay-a"), &stop)?;
    let b = start_relay(&outbox_b, relay_config("relay-b"), &stop)?;
    wait_db(
        &e.db,
        "all delivered",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        1000,
    )
    .await?;
    stop.cancel();
    a.await?;
    b.await?;

    ensure!(peer.distinct() == 1000, "distinct {}", peer.distinct());
    let takeovers = count(
        &e.db,
        "SELECT CAST(COALESCE(SUM(takeovers), 0) AS BIGINT) FROM outbox",
    )
    .await?;
    ensure!(
        takeovers == 0,
        "no lease should expire here, got {takeovers}"
    );
    ensure!(
        peer.total() == 1000,
        "a message was sent twice without a lease expiry: {}",
        peer.total()
    );
    e.tdb.cleanup().await;
    Ok(())
}

/// With a lease shorter than a slow send, a second relay takes the message
/// over: every extra send is accounted for by a lease expiry.
async fn resends_happen_only_after_a_lease_expired(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    peer.slow_first_ms.store(900, Ordering::SeqCst);
    let outbox_a = Outbox::new(e.db.clone());
    let outbox_b = Outbox::new(e.tdb.connect("outbox", "outbox_test").await?);
    enqueue(&outbox_a, &url, 20, "x").await?;

    let short = |owner: &str| RelayConfig {
        lease: Duration::from_millis(300),
        ..relay_config(owner)
    };
    let stop = CancellationToken::new();
    let a = start_relay(&outbox_a, short("relay-a"), &stop)?;
    let b = start_relay(&outbox_b, short("relay-b"), &stop)?;
    wait_db(
        &e.db,
        "all delivered",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        20,
    )
    .await?;
    stop.cancel();
    a.await?;
    b.await?;

    let takeovers = count(
        &e.db,
        "SELECT CAST(COALESCE(SUM(takeovers), 0) AS BIGINT) FROM outbox",
    )
    .await?;
    let extra = peer.total() as i64 - 20;
    ensure!(peer.distinct() == 20);
    ensure!(
        extra > 0 && takeovers > 0,
        "the short lease should have forced takeovers (extra {extra}, takeovers {takeovers})"
    );
    ensure!(
        extra <= takeovers,
        "{extra} extra sends but only {takeovers} lease expiries"
    );
    e.tdb.cleanup().await;
    Ok(())
}

/// A poison message (4xx) is dead-lettered at once; requeued, it goes through.
async fn poison_is_dead_lettered_and_requeued(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    peer.poison_on.store(true, Ordering::SeqCst);
    let outbox = Outbox::new(e.db.clone());
    enqueue(&outbox, &url, 3, "fine").await?;
    enqueue(&outbox, &url, 1, "poison").await?;
    let stop = CancellationToken::new();
    let relay = start_relay(&outbox, relay_config("relay"), &stop)?;
    wait_db(
        &e.db,
        "dead letter",
        "SELECT COUNT(*) FROM outbox WHERE status = 'dead'",
        1,
    )
    .await?;
    wait_db(
        &e.db,
        "the rest",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        3,
    )
    .await?;

    let dead = outbox.dead_letters(10).await?;
    ensure!(dead.len() == 1 && dead[0].attempts == 1, "{dead:?}");
    ensure!(dead[0].last_status == Some(422));
    ensure!(dead[0]
        .last_error
        .as_deref()
        .is_some_and(|r| r.contains("422")));
    let stats = outbox.stats().await?;
    ensure!(
        stats.dead == 1 && stats.delivered == 3 && stats.pending == 0,
        "{stats:?}"
    );

    peer.poison_on.store(false, Ordering::SeqCst);
    ensure!(outbox.requeue(&dead[0].id).await?);
    ensure!(
        !outbox.requeue(&dead[0].id).await?,
        "a message is requeued once"
    );
    wait_db(
        &e.db,
        "requeued delivered",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        4,
    )
    .await?;
    stop.cancel();
    relay.await?;
    e.tdb.cleanup().await;
    Ok(())
}

/// Runs a relay with `limits` against a peer that always fails, until the
/// one message is dead-lettered; returns the dead letters and the attempts
/// the peer saw.
async fn dead_letter_under(
    backend: Backend,
    limits: RelayConfig,
) -> Result<(Vec<DeadLetter>, u64)> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    peer.failing.store(true, Ordering::SeqCst);
    let outbox = Outbox::new(e.db.clone());
    enqueue(&outbox, &url, 1, "x").await?;
    let stop = CancellationToken::new();
    let relay = start_relay(&outbox, limits, &stop)?;
    wait_db(
        &e.db,
        "dead letter",
        "SELECT COUNT(*) FROM outbox WHERE status = 'dead'",
        1,
    )
    .await?;
    stop.cancel();
    relay.await?;
    let dead = outbox.dead_letters(10).await?;
    let seen = peer.total();
    e.tdb.cleanup().await;
    Ok((dead, seen))
}

/// An attempt limit dead-letters a message the peer keeps failing.
async fn attempt_limit_dead_letters(backend: Backend) -> Result<()> {
    let cfg = RelayConfig {
        max_attempts: Some(3),
        ..relay_config("relay")
    };
    let (dead, seen) = dead_letter_under(backend, cfg).await?;
    ensure!(seen == 3, "three attempts, got {seen}");
    ensure!(
        dead[0].attempts == 3
            && dead[0]
                .last_error
                .as_deref()
                .is_some_and(|r| r.contains("gave up"))
    );
    Ok(())
}

/// An age limit dead-letters a message the peer keeps failing once it is
/// older than the limit, whatever its attempt count.
async fn age_limit_dead_letters(backend: Backend) -> Result<()> {
    let cfg = RelayConfig {
        max_age: Some(Duration::from_millis(400)),
        ..relay_config("relay")
    };
    let (dead, seen) = dead_letter_under(backend, cfg).await?;
    ensure!(
        dead[0].attempts >= 1
            && dead[0]
                .last_error
                .as_deref()
                .is_some_and(|r| r.contains("gave up after")),
        "{dead:?}"
    );
    ensure!(seen >= 1, "the peer saw {seen} attempts");
    Ok(())
}

/// While the peer is down the breaker opens and deferrals spend no attempts;
/// when it returns, the backlog drains.
async fn open_breaker_defers_without_spending_attempts(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    peer.failing.store(true, Ordering::SeqCst);
    let outbox = Outbox::new(e.db.clone());
    enqueue(&outbox, &url, 50, "x").await?;
    let stop = CancellationToken::new();
    let relay = start_relay(&outbox, relay_config("relay"), &stop)?;
    let outage = Duration::from_secs(3);
    tokio::time::sleep(outage).await; // the outage itself: a fixed span is the scenario
    let during = peer.total();
    eprintln!("sends that reached the peer during the outage: {during}");
    // Without a breaker every message would be tried every ~20..500 ms backoff:
    // at least 50 messages x 6 rounds. The breaker cuts that to a trickle of probes.
    ensure!(
        during < 150,
        "{during} attempts reached the peer during a 3 s outage of 50 messages"
    );
    let attempts = count(&e.db, "SELECT CAST(SUM(attempts) AS BIGINT) FROM outbox").await?;
    ensure!(attempts as u64 == during, "attempts recorded ({attempts}) must equal sends that reached the peer ({during}); deferrals spend none");
    peer.failing.store(false, Ordering::SeqCst);
    wait_db(
        &e.db,
        "backlog drained",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        50,
    )
    .await?;
    stop.cancel();
    relay.await?;
    ensure!(peer.distinct() == 50);
    e.tdb.cleanup().await;
    Ok(())
}

/// While one destination's breaker is open the relay leaves its rows alone
/// (no claim, no reschedule: not one write) and keeps delivering to the
/// other destinations.
async fn open_breaker_leaves_its_rows_alone(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (down, down_peer, _a) = start_peer().await?;
    let (up, up_peer, _b) = start_peer().await?;
    down_peer.failing.store(true, Ordering::SeqCst);
    let outbox = Outbox::new(e.db.clone());
    enqueue(&outbox, &down, 500, "down").await?;
    // A breaker that stays open for a minute once it opens, so everything
    // below happens while it is open.
    let breaker = resilience::circuit_breaker::CircuitBreakerConfig::builder()
        .count_window(10)
        .minimum_calls(5)
        .failure_rate_threshold(50.0)
        .open_duration(Duration::from_secs(60))
        .build()?;
    let cfg = StackConfig {
        timeout: Duration::from_secs(2),
        faults: FaultHandle::new(FaultConfig::default(), 1)?,
        signer: None,
    };
    let relay = Relay::new(
        outbox.clone(),
        stack::durable(&cfg, BreakerRegistry::new(breaker, 8))?,
        Arc::new(NoopHandler),
        relay_config("relay"),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    // The breaker opens after a handful of failures; the first claimed batch
    // is deferred to its retry time.
    wait_for("the breaker to open", || down_peer.total() >= 5).await?;
    let quiet =
        "SELECT CAST(COALESCE(MAX(updated_at), 0) AS BIGINT) FROM outbox WHERE destination = '"
            .to_string()
            + &down
            + "'";
    // Writes to the down destination's rows settle (the in-flight batch).
    let mut last = count(&e.db, &quiet).await?;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count(&e.db, &quiet).await?;
        if now == last {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "writes never settled"
        );
        last = now;
    }
    let sends_before = down_peer.total();
    // Meanwhile the other destination gets its work at once.
    enqueue(&outbox, &up, 30, "up").await?;
    wait_for("the healthy destination's messages", || {
        up_peer.distinct() == 30
    })
    .await?;
    // A few more relay rounds (each wake-up and poll claims) while the
    // breaker stays open.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = count(&e.db, &quiet).await?;
    ensure!(
        after == last,
        "rows of a destination behind an open breaker were written ({last} -> {after})"
    );
    ensure!(
        down_peer.total() == sends_before,
        "the open breaker let calls through"
    );
    // Only what was claimed before the relay learned of the open breaker
    // was ever touched (at most a batch or two); the rest of the backlog
    // was never claimed, deferred or rewritten.
    let touched = count(
        &e.db,
        &format!(
            "SELECT COUNT(*) FROM outbox WHERE destination = '{down}' AND updated_at > created_at"
        ),
    )
    .await?;
    let batch = relay_config("relay").batch_size;
    eprintln!("rows of the down destination touched: {touched} of 500 (batch {batch})");
    ensure!(
        touched <= 2 * batch,
        "{touched} of 500 rows written behind an open breaker (batch {batch})"
    );
    stop.cancel();
    task.await?;
    e.tdb.cleanup().await;
    Ok(())
}

/// New work is sent at once, not at the next poll; on Postgres a relay in
/// another "replica" hears the commit through LISTEN/NOTIFY.
async fn wakes_up_on_commit(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    let relay_outbox = Outbox::new(e.db.clone());
    let stop = CancellationToken::new();
    let cfg = RelayConfig {
        poll_interval: Duration::from_secs(60),
        ..relay_config("relay")
    };
    let relay = start_relay(&relay_outbox, cfg, &stop)?;
    tokio::time::sleep(Duration::from_millis(200)).await; // let it go idle (and LISTEN)
    let writer = if backend == Backend::Postgres {
        // Another replica's outbox, which runs no relay: its in-process
        // notify cannot reach the relay, its coalesced pg_notify does.
        let writer = Outbox::new(e.tdb.connect("outbox", "outbox_test").await?);
        writer.spawn_wakeups(stop.clone());
        writer
    } else {
        relay_outbox.clone()
    };
    let started = tokio::time::Instant::now();
    enqueue(&writer, &url, 1, "x").await?;
    wait_for("delivery", || peer.distinct() == 1).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "not woken: {:?}",
        started.elapsed()
    );
    stop.cancel();
    relay.await?;
    e.tdb.cleanup().await;
    Ok(())
}

/// A steady stream goes out in batches: after a claim that found a partial
/// batch the relay claims again only once `linger` has passed, whatever
/// wakes it meanwhile, and then takes everything that came in. The first
/// message after a quiet spell goes at once, and a full batch is followed by
/// the next claim at once.
async fn lingers_after_a_partial_claim(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    let outbox = Outbox::new(e.db.clone());
    let stop = CancellationToken::new();
    let linger = Duration::from_secs(3);
    let cfg = RelayConfig {
        poll_interval: Duration::from_secs(60),
        batch_size: 2,
        linger,
        ..relay_config("relay")
    };
    let relay = start_relay(&outbox, cfg, &stop)?;
    tokio::time::sleep(Duration::from_millis(200)).await; // let it go idle
                                                          // Full batches, one after another: five messages, claims of 2, 2 and 1,
                                                          // none of them waiting for the linger.
    let started = tokio::time::Instant::now();
    enqueue(&outbox, &url, 5, "burst").await?;
    wait_for("the burst", || peer.distinct() == 5).await?;
    ensure!(
        started.elapsed() < linger,
        "full batches waited for the linger: {:?}",
        started.elapsed()
    );
    // The claim of 1 lingers: what comes now waits for it to run out.
    enqueue(&outbox, &url, 1, "behind").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    enqueue(&outbox, &url, 1, "behind too").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        peer.distinct() == 5,
        "claimed during the linger: {} delivered",
        peer.distinct()
    );
    wait_for("the two behind", || peer.distinct() == 7).await?;
    ensure!(
        started.elapsed() >= linger,
        "claimed before the linger ran out: {:?}",
        started.elapsed()
    );
    // A quiet spell (the last claim, of 2, was full, and the next found
    // nothing): the next message goes at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let quiet = tokio::time::Instant::now();
    enqueue(&outbox, &url, 1, "after a quiet spell").await?;
    wait_for("the message after a quiet spell", || peer.distinct() == 8).await?;
    ensure!(
        quiet.elapsed() < linger,
        "after a quiet spell, waited {:?}",
        quiet.elapsed()
    );
    ensure!(peer.total() == 8, "{} sends for 8 messages", peer.total());
    stop.cancel();
    relay.await?;
    e.tdb.cleanup().await;
    Ok(())
}

/// While the front door is busy, the relay claims once per `max_wait` and
/// not in between; once the door is quiet, or once the relay is behind
/// (its last claim held a first attempt `max_lag` old), it claims at once,
/// busy door or not. Every message is sent once.
async fn gives_way_to_a_busy_front_door(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    let outbox = Outbox::new(e.db.clone());
    let foreground = Foreground::new(2);
    let max_wait = Duration::from_secs(3);
    let cfg = |max_lag| RelayConfig {
        poll_interval: Duration::from_secs(60),
        linger: Duration::ZERO,
        give_way: GiveWay {
            foreground: foreground.clone(),
            max_wait,
            max_lag,
        },
        ..relay_config("relay")
    };

    // 1. A burst: two requests in flight for as long as the guards live.
    let stop = CancellationToken::new();
    let relay = start_relay(&outbox, cfg(Duration::from_secs(60)), &stop)?;
    tokio::time::sleep(Duration::from_millis(200)).await; // let it go idle
    let busy = (foreground.enter(), foreground.enter());
    let started = tokio::time::Instant::now();
    enqueue(&outbox, &url, 5, "during the burst").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        peer.total() == 0,
        "claimed while the door was busy: {} sent",
        peer.total()
    );
    wait_for("the claim after the longest wait", || peer.distinct() == 5).await?;
    ensure!(
        started.elapsed() >= max_wait,
        "claimed before the longest wait ran out: {:?}",
        started.elapsed()
    );

    // 2. The door is quiet again: the next message goes at once.
    drop(busy);
    let quiet = tokio::time::Instant::now();
    enqueue(&outbox, &url, 1, "after the burst").await?;
    wait_for("the message after the burst", || peer.distinct() == 6).await?;
    ensure!(
        quiet.elapsed() < max_wait,
        "waited {:?} with the door quiet",
        quiet.elapsed()
    );
    stop.cancel();
    relay.await?;

    // 3. Behind: messages already older than `max_lag` when claimed, two
    //    per claim. One wait (the relay cannot know how old its work is
    //    before it claims), then the other four claims at once, though the
    //    door stays busy.
    let _busy = (foreground.enter(), foreground.enter());
    enqueue(&outbox, &url, 10, "old").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stop = CancellationToken::new();
    let behind = RelayConfig {
        batch_size: 2,
        ..cfg(Duration::from_secs(1))
    };
    let relay = start_relay(&outbox, behind, &stop)?;
    wait_for("the first old message", || peer.distinct() > 6).await?;
    let first = tokio::time::Instant::now();
    wait_for("the old messages", || peer.distinct() == 16).await?;
    ensure!(
        first.elapsed() < max_wait,
        "waited {:?} for a busy door while behind",
        first.elapsed()
    );
    ensure!(peer.total() == 16, "{} sends for 16 messages", peer.total());
    stop.cancel();
    relay.await?;
    e.tdb.cleanup().await;
    Ok(())
}

/// Shutdown lets sends in flight finish and releases every lease it holds.
async fn graceful_shutdown_with_sends_in_flight(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, peer, _p) = start_peer().await?;
    peer.slow_first_ms.store(700, Ordering::SeqCst);
    let outbox = Outbox::new(e.db.clone());
    let stop = CancellationToken::new();
    let cfg = RelayConfig {
        concurrency: 2,
        ..relay_config("relay")
    };
    let relay = start_relay(&outbox, cfg, &stop)?;
    enqueue(&outbox, &url, 10, "x").await?;
    wait_for("sends in flight", || peer.total() >= 1).await?;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), relay).await??;

    let delivered = count(
        &e.db,
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
    )
    .await?;
    let leased = count(
        &e.db,
        "SELECT COUNT(*) FROM outbox WHERE lease_owner IS NOT NULL",
    )
    .await?;
    ensure!(leased == 0, "{leased} leases left behind");
    ensure!(delivered >= 1, "the sends in flight were not recorded");
    ensure!(
        delivered as usize == peer.distinct(),
        "every message the peer saw is delivered ({delivered} vs {})",
        peer.distinct()
    );
    ensure!(
        delivered < 10,
        "shutdown should not drain the whole backlog"
    );
    // A new relay picks up the rest at once (no lease to wait for).
    let stop2 = CancellationToken::new();
    let relay2 = start_relay(&outbox, relay_config("relay-2"), &stop2)?;
    wait_db(
        &e.db,
        "the rest",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        10,
    )
    .await?;
    stop2.cancel();
    relay2.await?;
    e.tdb.cleanup().await;
    Ok(())
}

/// Delivered rows are purged after the retention period; stats stay right.
async fn purge_and_stats(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    let (url, _peer, _p) = start_peer().await?;
    let outbox = Outbox::new(e.db.clone());
    enqueue(&outbox, &url, 5, "x").await?;
    let s = outbox.stats().await?;
    ensure!(
        s.pending == 5 && s.delivered == 0 && s.oldest_pending_ms.is_some(),
        "{s:?}"
    );
    let stop = CancellationToken::new();
    let relay = start_relay(&outbox, relay_config("relay"), &stop)?;
    wait_db(
        &e.db,
        "delivered",
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
        5,
    )
    .await?;
    stop.cancel();
    relay.await?;
    let s = outbox.stats().await?;
    ensure!(
        s.delivered == 5 && s.attempts == 5 && s.pending == 0,
        "{s:?}"
    );
    ensure!(
        outbox
            .purge_delivered(Duration::from_secs(3600), 100)
            .await?
            == 0,
        "young rows stay"
    );
    ensure!(
        outbox.purge_delivered(Duration::ZERO, 2).await? == 2,
        "bounded batch"
    );
    ensure!(outbox.purge_delivered(Duration::ZERO, 100).await? == 3);
    let rows = sqlx::query("SELECT COUNT(*) AS n FROM outbox")
        .fetch_one(e.db.pool())
        .await?;
    ensure!(rows.try_get::<i64, _>("n")? == 0);
    e.tdb.cleanup().await;
    Ok(())
}

/// Records each delivery's reaction with the transaction it ran in
/// (Postgres: its txid), and refuses the messages correlated `refuse`.
struct Reactions {
    backend: Backend,
}

#[async_trait::async_trait]
impl DeliveryHandler for Reactions {
    async fn delivered(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        msg: &SentMessage,
        _response: &axum::http::Response<bytes::Bytes>,
    ) -> Result<(), sqlx::Error> {
        if msg.correlation_id.as_deref() == Some("refuse") {
            return Err(sqlx::Error::Protocol("reaction refused".into()));
        }
        let txid = match self.backend {
            Backend::Postgres => "CAST(txid_current() AS BIGINT)",
            Backend::Sqlite => "0",
        };
        sqlx::query(&format!(
            "INSERT INTO reactions (id, txid) VALUES ($1, {txid})"
        ))
        .bind(&msg.id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Outcomes that finish together commit together: a drain of 400 messages
/// takes far fewer outcome transactions than messages (Postgres counts them
/// by txid), each reaction commits with its own delivery, and a reaction
/// that fails holds back only its own message, not the batch it was in.
async fn outcomes_commit_in_batches(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    sqlx::query("CREATE TABLE reactions (id TEXT PRIMARY KEY, txid BIGINT NOT NULL)")
        .execute(e.db.pool())
        .await?;
    let (url, peer, _p) = start_peer().await?;
    let outbox = Outbox::new(e.db.clone());
    enqueue(&outbox, &url, 400, "x").await?;
    let stop = CancellationToken::new();
    let relay = Relay::new(
        outbox.clone(),
        service(Duration::from_secs(2))?,
        Arc::new(Reactions { backend }),
        relay_config("relay"),
    );
    let task = tokio::spawn(relay.run(stop.clone()));
    wait_db(
        &e.db,
        "400 reactions",
        "SELECT COUNT(*) FROM reactions",
        400,
    )
    .await?;
    let delivered = count(
        &e.db,
        "SELECT COUNT(*) FROM outbox WHERE status = 'delivered'",
    )
    .await?;
    ensure!(delivered == 400, "{delivered} delivered, 400 reactions");
    if backend == Backend::Postgres {
        let txs = count(&e.db, "SELECT COUNT(DISTINCT txid) FROM reactions").await?;
        ensure!(
            txs <= 100,
            "400 outcomes took {txs} transactions: they are not written in batches"
        );
    }

    // Refused reactions among good ones: the good ones are delivered with
    // their reactions; the refused ones stay pending, unreacted, with the error.
    let mut tx = outbox.db().begin().await?;
    for i in 0..60 {
        let who = if i % 20 == 0 { "refuse" } else { "fine" };
        let msg =
            OutgoingRequest::post_json(&url, "/things", &serde_json::json!({ "m": i }), "thing")?
                .correlate(who)
                .with_idempotency_key(true);
        outbox.enqueue(&mut tx, msg).await?;
    }
    tx.commit().await?;
    outbox.notify();
    wait_db(
        &e.db,
        "457 reactions",
        "SELECT COUNT(*) FROM reactions",
        457,
    )
    .await?;
    wait_db(
        &e.db,
        "the refused ones rescheduled with their error",
        "SELECT COUNT(*) FROM outbox WHERE correlation_id = 'refuse' AND status = 'pending' \
         AND last_error LIKE '%reaction refused%'",
        3,
    )
    .await?;
    stop.cancel();
    task.await?;
    let bad = count(
        &e.db,
        "SELECT COUNT(*) FROM outbox o JOIN reactions r ON r.id = o.id \
         WHERE o.status <> 'delivered' OR o.correlation_id = 'refuse'",
    )
    .await?;
    ensure!(bad == 0, "{bad} reactions without their delivery");
    ensure!(
        peer.distinct() == 460,
        "peer saw {} messages",
        peer.distinct()
    );
    e.tdb.cleanup().await;
    Ok(())
}

/// `enqueue_after`: the caller's write and the message commit together
/// (one statement on Postgres), roll back together, and a write that fails
/// leaves no message behind.
async fn enqueue_after_writes_both_or_neither(backend: Backend) -> Result<()> {
    let e = env(backend).await?;
    sqlx::query("CREATE TABLE things (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
        .execute(e.db.pool())
        .await?;
    let outbox = Outbox::new(e.db.clone());
    let thing = |id: &'static str, n: i64| {
        Write::new("INSERT INTO things (id, n) VALUES ($1, $2)", 2, move |q| {
            q.bind(id).bind(n)
        })
    };
    let msg = |n: i64| {
        OutgoingRequest::post_json(
            "http://127.0.0.1:9",
            "/things",
            &serde_json::json!({ "n": n }),
            "thing",
        )
    };
    // Committed: both.
    let mut tx = e.db.begin().await?;
    outbox
        .enqueue_after(&mut tx, msg(1)?, Some(thing("a", 1)))
        .await?;
    tx.commit().await?;
    // Rolled back: neither.
    let mut tx = e.db.begin().await?;
    outbox
        .enqueue_after(&mut tx, msg(2)?, Some(thing("b", 2)))
        .await?;
    tx.rollback().await?;
    // The caller's write fails (its key is taken): an error, no message.
    let mut tx = e.db.begin().await?;
    let failed = outbox
        .enqueue_after(&mut tx, msg(3)?, Some(thing("a", 3)))
        .await;
    ensure!(failed.is_err(), "a duplicate key was accepted");
    tx.rollback().await?;
    // Without a write of its own it is a plain enqueue.
    let mut tx = e.db.begin().await?;
    outbox.enqueue_after(&mut tx, msg(4)?, None).await?;
    tx.commit().await?;

    ensure!(count(&e.db, "SELECT COUNT(*) FROM things").await? == 1);
    ensure!(count(&e.db, "SELECT n FROM things WHERE id = 'a'").await? == 1);
    let bodies: Vec<Vec<u8>> = sqlx::query_scalar("SELECT body FROM outbox ORDER BY id")
        .fetch_all(e.db.pool())
        .await?;
    let ns: Vec<i64> = bodies
        .iter()
        .map(|b| {
            serde_json::from_slice::<serde_json::Value>(b).map(|v| v["n"].as_i64().unwrap_or(-1))
        })
        .collect::<Result<_, _>>()?;
    ensure!(ns == [1, 4], "outbox holds {ns:?}");
    e.tdb.cleanup().await;
    Ok(())
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> { super::$name(resilience::store::Backend::Sqlite).await }
        )* }
        mod postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> { super::$name(resilience::store::Backend::Postgres).await }
        )* }
    };
}

on_both_backends!(
    two_relays_drain_a_backlog,
    resends_happen_only_after_a_lease_expired,
    poison_is_dead_lettered_and_requeued,
    attempt_limit_dead_letters,
    age_limit_dead_letters,
    open_breaker_defers_without_spending_attempts,
    open_breaker_leaves_its_rows_alone,
    wakes_up_on_commit,
    lingers_after_a_partial_claim,
    gives_way_to_a_busy_front_door,
    graceful_shutdown_with_sends_in_flight,
    purge_and_stats,
    outcomes_commit_in_batches,
    enqueue_after_writes_both_or_neither,
);
