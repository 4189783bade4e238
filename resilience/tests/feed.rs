//! The feed: never skipping a late committer, long-polls, retention, and the
//! consumer's guarantees, on SQLite and Postgres.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use async_trait::async_trait;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use resilience::client::HttpClient;
use resilience::feed::{
    after_commit, ApplyError, Commit, ConsumerConfig, FeedConsumer, FeedError, FeedEvent,
    FeedHandler, FeedLog, FeedQuery,
};
use resilience::retry::Backoff;
use resilience::store::{now_ms, Backend, Db, DbOptions};
use service_kit::testing::TestDatabase;
use sqlx::{Any, Transaction};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

const DEADLINE: Duration = Duration::from_secs(60);
const FEED: &str = "things";

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

async fn open(tdb: &TestDatabase, name: &str, schema: &str, conns: u32) -> Result<Db> {
    let mut opts = DbOptions::new(tdb.url(name), schema);
    opts.max_connections = conns;
    let db = Db::connect(&opts).await?;
    db.migrate_resilience().await?;
    Ok(db)
}

async fn append_one(log: &FeedLog, id: &str, data: serde_json::Value) -> Result<()> {
    let mut tx = log.db().begin().await?;
    log.append(&mut tx, FEED, "thing-happened", id, &data)
        .await?;
    tx.commit().await?;
    log.notify();
    Ok(())
}

/// THE proof. Two transactions append; the one that appended first commits
/// last. The reader follows the feed by its `next` position and must see
/// both, in position order, skipping neither.
///
/// Postgres: B (appended second) commits first; the reader reads B; then A
/// commits and the reader, continuing from where it was, still gets A. A
/// feed that numbered rows at insert would have given A the lower position,
/// B's read would have moved the offset past it, and A would be lost.
/// SQLite: the second writer cannot even begin while the first is open.
///
/// Checked to fail without the protection: with `FeedLog::read` changed to
/// the classic `SELECT seq AS position … WHERE seq > $after` (numbered at
/// insert, no sequencer), the Postgres case fails with "the reader skipped
/// or repeated an event: [(3, \"b\")]", and the concurrent test below with
/// "gap or disorder".
async fn late_committer_is_not_skipped(backend: Backend) -> Result<()> {
    let tdb = TestDatabase::create(backend).await?;
    let db = open(&tdb, "producer", "producer", 8).await?;
    let log = FeedLog::new(db.clone());
    // A feed with history, so the reader's offset is not at 0.
    append_one(&log, "before", serde_json::json!({})).await?;
    let first = log.read(FEED, 0, 100).await?;
    ensure!(first.events.len() == 1 && first.next == 1, "{first:?}");
    let mut after = first.next;

    let mut tx_a = db.begin().await?;
    log.append(&mut tx_a, FEED, "t", "a", &serde_json::json!({"tx": "a"}))
        .await?;
    let mut seen = Vec::new();
    match backend {
        Backend::Postgres => {
            let mut tx_b = db.begin().await?;
            log.append(&mut tx_b, FEED, "t", "b", &serde_json::json!({"tx": "b"}))
                .await?;
            tx_b.commit().await?;
            let page = log.read(FEED, after, 100).await?;
            ensure!(
                page.events.iter().all(|e| e.id != "a"),
                "uncommitted A served: {page:?}"
            );
            seen.extend(page.events.iter().map(|e| (e.position, e.id.clone())));
            after = page.next;
            tx_a.commit().await?;
        }
        Backend::Sqlite => {
            let db_b = db.clone();
            let log_b = log.clone();
            let b = tokio::spawn(async move {
                let mut tx_b = db_b.begin().await?;
                log_b
                    .append(&mut tx_b, FEED, "t", "b", &serde_json::json!({"tx": "b"}))
                    .await?;
                tx_b.commit().await?;
                Ok::<_, anyhow::Error>(())
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            ensure!(!b.is_finished(), "B committed while A was open");
            let page = log.read(FEED, after, 100).await?;
            ensure!(page.events.is_empty(), "{page:?}");
            tx_a.commit().await?;
            tokio::time::timeout(DEADLINE, b).await???;
        }
    }
    let page = log.read(FEED, after, 100).await?;
    seen.extend(page.events.iter().map(|e| (e.position, e.id.clone())));
    let ids: HashSet<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    ensure!(
        ids == HashSet::from(["a", "b"]) && seen.len() == 2,
        "the reader skipped or repeated an event: {seen:?}"
    );
    ensure!(
        seen[0].0 == 2 && seen[1].0 == 3,
        "positions not contiguous after 1: {seen:?}"
    );
    tdb.cleanup().await;
    Ok(())
}

/// 8 writers × 200 appends, each in its own transaction held open for a
/// moment, while a reader follows the feed with long-polls: every event is
/// seen exactly once, at positions 1..=1600 in order.
async fn concurrent_writers_reader_sees_all(backend: Backend) -> Result<()> {
    const WRITERS: usize = 8;
    const EACH: usize = 200;
    let tdb = TestDatabase::create(backend).await?;
    let db = open(&tdb, "producer", "producer", 16).await?;
    let log = FeedLog::new(db.clone()).with_recheck(Duration::from_millis(50));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let log = log.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let mut tx = log.db().begin().await?;
                let id = format!("w{w}-{i}");
                log.append(
                    &mut tx,
                    FEED,
                    "t",
                    &id,
                    &serde_json::json!({ "w": w, "i": i }),
                )
                .await?;
                if (w + i) % 3 == 0 {
                    // Hold the transaction open so commits interleave.
                    tokio::time::sleep(Duration::from_millis(((w * 7 + i) % 4) as u64)).await;
                }
                tx.commit().await?;
                log.notify();
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let total = WRITERS * EACH;
    let mut seen = HashSet::new();
    let mut after = 0;
    let start = Instant::now();
    while seen.len() < total {
        ensure!(
            start.elapsed() < DEADLINE,
            "reader saw {} of {total}",
            seen.len()
        );
        let page = log
            .read_wait(FEED, after, 97, Duration::from_millis(200))
            .await?;
        for e in &page.events {
            ensure!(
                e.position == after + 1,
                "gap or disorder: {} after {after}",
                e.position
            );
            ensure!(seen.insert(e.id.clone()), "{} seen twice", e.id);
            after = e.position;
        }
        ensure!(page.next == after, "next {} != {after}", page.next);
    }
    for w in writers {
        w.await??;
    }
    let page = log.read(FEED, after, 100).await?;
    ensure!(
        page.events.is_empty() && page.head == total as i64,
        "{page:?}"
    );
    tdb.cleanup().await;
    Ok(())
}

/// Trimmed positions answer Gone, not a gap; readers past the mark go on.
async fn retention_answers_gone(backend: Backend) -> Result<()> {
    let tdb = TestDatabase::create(backend).await?;
    let db = open(&tdb, "producer", "producer", 4).await?;
    let log = FeedLog::new(db);
    for i in 0..5 {
        append_one(&log, &format!("e{i}"), serde_json::json!({ "i": i })).await?;
    }
    ensure!(log.read(FEED, 0, 100).await?.events.len() == 5);
    // Everything appended so far is older than "now" once the clock ticks.
    let t = now_ms();
    while now_ms() <= t {
        tokio::task::yield_now().await;
    }
    let deleted = log.trim(FEED, Duration::ZERO).await?;
    ensure!(deleted == 5, "deleted {deleted}");
    for after in [0, 3, 4] {
        match log.read(FEED, after, 100).await {
            Err(FeedError::Gone { trimmed_upto, .. }) => ensure!(trimmed_upto == 5),
            other => bail!("after {after}: expected Gone, got {other:?}"),
        }
    }
    ensure!(log.read(FEED, 5, 100).await?.events.is_empty());
    append_one(&log, "e5", serde_json::json!({})).await?;
    let page = log.read(FEED, 5, 100).await?;
    ensure!(
        page.events.len() == 1 && page.events[0].position == 6,
        "{page:?}"
    );
    match log.read(FEED, 9, 100).await {
        Err(FeedError::Ahead { head: 6, .. }) => {}
        other => bail!("expected Ahead, got {other:?}"),
    }
    // A second trim with nothing old enough changes nothing.
    ensure!(log.trim(FEED, Duration::from_secs(3600)).await? == 0);
    tdb.cleanup().await;
    Ok(())
}

/// A long-poll returns as soon as an event commits (in-process notify; on
/// Postgres also from another replica through LISTEN/NOTIFY), and an empty
/// page only after its wait.
async fn long_poll_wakes_on_append(backend: Backend) -> Result<()> {
    let tdb = TestDatabase::create(backend).await?;
    let db = open(&tdb, "producer", "producer", 4).await?;
    // No re-read safety net: only a wake-up can end these polls early.
    let log = FeedLog::new(db.clone()).with_recheck(Duration::from_secs(600));
    let stop = CancellationToken::new();

    let start = Instant::now();
    let page = log
        .read_wait(FEED, 0, 10, Duration::from_millis(300))
        .await?;
    ensure!(page.events.is_empty() && start.elapsed() >= Duration::from_millis(300));

    let reader = {
        let log = log.clone();
        tokio::spawn(async move { log.read_wait(FEED, 0, 10, Duration::from_secs(600)).await })
    };
    append_one(&log, "local", serde_json::json!({})).await?;
    let page = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .context("long-poll not woken by a local append")???;
    ensure!(page.events.len() == 1 && page.events[0].id == "local");

    if backend == Backend::Postgres {
        // Another replica of the producer: its own pool, its own FeedLog.
        let db2 = open(&tdb, "producer", "producer", 4).await?;
        let remote = FeedLog::new(db2).with_recheck(Duration::from_secs(600));
        let w1 = log.spawn_wakeups(stop.clone());
        let w2 = remote.spawn_wakeups(stop.clone());
        // Wait until the remote listener is up: a notify it gets proves it.
        let probe_deadline = Instant::now() + DEADLINE;
        let mut n = 0;
        loop {
            ensure!(Instant::now() < probe_deadline, "remote LISTEN never woke");
            let reader = {
                let remote = remote.clone();
                tokio::spawn(async move {
                    remote
                        .read_wait(FEED, 1 + n, 10, Duration::from_secs(600))
                        .await
                })
            };
            append_one(&log, &format!("remote-{n}"), serde_json::json!({})).await?;
            n += 1;
            match tokio::time::timeout(Duration::from_secs(2), reader).await {
                Ok(page) => {
                    let page = page??;
                    ensure!(page.events.len() == 1, "{page:?}");
                    break;
                }
                // The listener was not connected yet: that event stays
                // unseen by this poll; try again.
                Err(_) => continue,
            }
        }
        stop.cancel();
        w1.await?;
        w2.await?;
    }
    tdb.cleanup().await;
    Ok(())
}

// ---------------------------------------------------------------- consumer

/// Serves `log` the way a service would: `GET /feed?after=&limit=&wait=`.
async fn serve_feed(log: FeedLog) -> Result<(String, JoinHandle<()>)> {
    async fn feed(State(log): State<FeedLog>, Query(q): Query<FeedQuery>) -> Response {
        let (after, limit, wait) = match q.validate() {
            Ok(v) => v,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
        match log.read_wait(FEED, after, limit, wait).await {
            Ok(page) => Json(page).into_response(),
            Err(e) => (e.status(), e.to_string()).into_response(),
        }
    }
    let app = Router::new().route("/feed", get(feed)).with_state(log);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/feed", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, task))
}

fn client_stack(
) -> Result<BoxCloneSyncService<http::Request<bytes::Bytes>, http::Response<bytes::Bytes>, BoxError>>
{
    let client = HttpClient::new(Duration::from_secs(5))?;
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .service(client)
        .map_err(BoxError::from);
    Ok(BoxCloneSyncService::new(svc))
}

/// Records every application in `applied` (no unique key: duplicates show).
/// Refuses events whose data has `"poison": true` unless `cured`.
/// Every event whose [`after_commit`] hook ran lands in `committed`; the
/// event named by `retry_once` fails its first application (transient).
#[derive(Default)]
struct Recorder {
    cured: AtomicBool,
    committed: Arc<std::sync::Mutex<Vec<String>>>,
    retry_once: std::sync::Mutex<Option<String>>,
}

#[async_trait]
impl FeedHandler for Recorder {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        event: &FeedEvent,
    ) -> Result<(), ApplyError> {
        // Registered first, so a refused or rolled-back event has one too.
        let (committed, id) = (self.committed.clone(), event.id.clone());
        ensure_applying(after_commit(move || {
            if let Ok(mut c) = committed.lock() {
                c.push(id);
            }
        }))?;
        if let Ok(mut once) = self.retry_once.lock() {
            if once.as_deref() == Some(event.id.as_str()) {
                *once = None;
                return Err(ApplyError::Retry("fails once".into()));
            }
        }
        if event.data.get("poison").is_some() && !self.cured.load(Ordering::SeqCst) {
            return Err(ApplyError::Refused("poison".into()));
        }
        sqlx::query("INSERT INTO applied (event_id, position) VALUES ($1, $2)")
            .bind(&event.id)
            .bind(event.position)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// `after_commit` is only ever called inside a consumer's `apply`.
fn ensure_applying(registered: bool) -> Result<(), ApplyError> {
    if registered {
        Ok(())
    } else {
        Err(ApplyError::Refused("after_commit outside apply".into()))
    }
}

struct ConsumerEnv {
    tdb: TestDatabase,
    log: FeedLog,
    consumer_db: Db,
    url: String,
    _server: JoinHandle<()>,
}

async fn consumer_env(backend: Backend) -> Result<ConsumerEnv> {
    init_logs();
    let tdb = TestDatabase::create(backend).await?;
    let producer = open(&tdb, "producer", "producer", 8).await?;
    let consumer_db = open(&tdb, "consumer", "consumer", 8).await?;
    sqlx::query("CREATE TABLE applied (event_id TEXT NOT NULL, position BIGINT NOT NULL)")
        .execute(consumer_db.pool())
        .await?;
    let log = FeedLog::new(producer).with_recheck(Duration::from_millis(100));
    let (url, server) = serve_feed(log.clone()).await?;
    Ok(ConsumerEnv {
        tdb,
        log,
        consumer_db,
        url,
        _server: server,
    })
}

impl ConsumerEnv {
    async fn append(&self, from: usize, n: usize) -> Result<()> {
        for chunk in (from..from + n).collect::<Vec<_>>().chunks(25) {
            let mut tx = self.log.db().begin().await?;
            for i in chunk {
                self.log
                    .append(
                        &mut tx,
                        FEED,
                        "t",
                        &format!("e{i}"),
                        &serde_json::json!({ "i": i }),
                    )
                    .await?;
            }
            tx.commit().await?;
            self.log.notify();
        }
        Ok(())
    }

    /// A consumer with a pool of its own, like a replica: a crash is its
    /// task aborted and then its pool closed (a dead process's connections
    /// die with it, releasing what they held).
    async fn consumer(
        &self,
        holder: &str,
        commit: Commit,
        handler: Arc<Recorder>,
    ) -> Result<(FeedConsumer, Db)> {
        let db = open(&self.tdb, "consumer", "consumer", 4).await?;
        let mut cfg = ConsumerConfig::new(FEED, self.url.clone(), commit);
        cfg.holder = holder.into();
        cfg.lease = Duration::from_secs(1);
        cfg.batch = 10;
        cfg.wait = Duration::from_millis(200);
        cfg.backoff = Backoff::new(Duration::from_millis(20), 2.0, Duration::from_millis(200));
        Ok((
            FeedConsumer::new(db.clone(), client_stack()?, handler, cfg),
            db,
        ))
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql)
            .fetch_one(self.consumer_db.pool())
            .await?)
    }

    async fn wait_count(&self, what: &str, sql: &str, at_least: i64) -> Result<()> {
        let start = Instant::now();
        loop {
            let n = self.count(sql).await?;
            if n >= at_least {
                return Ok(());
            }
            ensure!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}: {n} < {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const APPLIED: &str = "SELECT COUNT(*) FROM applied";
const DISTINCT: &str = "SELECT COUNT(DISTINCT event_id) FROM applied";
const OFFSET: &str = "SELECT COALESCE(MAX(position), 0) FROM feed_offsets";

/// Effectively-once: two competing consumers, one of them killed mid-run
/// (its task dropped, lease left behind), a third taking over: every event
/// is applied exactly once.
async fn same_transaction_applies_exactly_once(backend: Backend) -> Result<()> {
    let e = consumer_env(backend).await?;
    e.append(0, 300).await?;
    let handler = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let (a, a_db) = e
        .consumer("a", Commit::SameTransaction, handler.clone())
        .await?;
    let a = tokio::spawn(a.run(stop.clone()));
    let (b, b_db) = e
        .consumer("b", Commit::SameTransaction, handler.clone())
        .await?;
    let b_handle = b.handle();
    let mut b = tokio::spawn(b.run(stop.clone()));
    e.wait_count("some applied", APPLIED, 50).await?;
    // Crash whichever holds the lease right now (or both, if b never got it).
    a.abort();
    let _ = a.await;
    a_db.close().await;
    let b_crashed = b_handle.status().holder;
    if b_crashed {
        b.abort();
        let _ = (&mut b).await;
        b_db.close().await;
    }
    let (c, _c_db) = e
        .consumer("c", Commit::SameTransaction, handler.clone())
        .await?;
    let c = tokio::spawn(c.run(stop.clone()));
    e.append(300, 200).await?;
    e.wait_count("offset at the head", OFFSET, 500).await?;
    ensure!(
        e.count(APPLIED).await? == 500,
        "applied {}",
        e.count(APPLIED).await?
    );
    ensure!(e.count(DISTINCT).await? == 500);
    stop.cancel();
    let _ = tokio::time::timeout(DEADLINE, c).await?;
    if !b_crashed {
        let _ = tokio::time::timeout(DEADLINE, b).await?;
    }
    let takeovers = e.count("SELECT takeovers FROM feed_offsets").await?;
    ensure!(takeovers >= 1, "no takeover recorded");
    e.tdb.cleanup().await;
    Ok(())
}

/// At-least-once: state commits per page, the offset only every hour (or
/// on a clean stop). A crash in between re-applies everything since.
async fn periodic_commit_reapplies_after_a_crash(backend: Backend) -> Result<()> {
    let e = consumer_env(backend).await?;
    e.append(0, 100).await?;
    let handler = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let hour = Commit::Periodic(Duration::from_secs(3600));
    let (a, a_db) = e.consumer("a", hour, handler.clone()).await?;
    let a = tokio::spawn(a.run(stop.clone()));
    e.wait_count("all applied", APPLIED, 100).await?;
    a.abort();
    let _ = a.await;
    a_db.close().await;
    ensure!(e.count(OFFSET).await? == 0, "offset committed early");
    // The same replica restarts: it holds the lease already.
    let stop2 = CancellationToken::new();
    let (a2, _db) = e.consumer("a", hour, handler.clone()).await?;
    let status = a2.handle();
    let a2 = tokio::spawn(a2.run(stop2.clone()));
    e.wait_count("re-applied", APPLIED, 200).await?;
    ensure!(e.count(DISTINCT).await? == 100);
    let start = Instant::now();
    while status.status().offset < 100 {
        ensure!(start.elapsed() < DEADLINE, "consumer never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A clean stop commits the offset.
    stop2.cancel();
    tokio::time::timeout(DEADLINE, a2).await??;
    ensure!(e.count(OFFSET).await? == 100);
    ensure!(e.count(APPLIED).await? == 200);
    let _ = stop;
    e.tdb.cleanup().await;
    Ok(())
}

/// A refused event is recorded as dead, the offset moves on, and a requeue
/// applies it once; the lag is visible in the status.
async fn refused_events_are_dead_and_requeueable(backend: Backend) -> Result<()> {
    let e = consumer_env(backend).await?;
    e.append(0, 3).await?;
    let mut tx = e.log.db().begin().await?;
    e.log
        .append(
            &mut tx,
            FEED,
            "t",
            "bad",
            &serde_json::json!({"poison": true}),
        )
        .await?;
    tx.commit().await?;
    e.append(3, 3).await?;
    let handler = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let (c, _db) = e
        .consumer("a", Commit::SameTransaction, handler.clone())
        .await?;
    let status = c.handle();
    let task = tokio::spawn(c.run(stop.clone()));
    e.wait_count("offset past the poison", OFFSET, 7).await?;
    ensure!(e.count(APPLIED).await? == 6);
    let dead = FeedConsumer::dead_events(&e.consumer_db, FEED, 10).await?;
    ensure!(
        dead.len() == 1 && dead[0].id == "bad" && dead[0].position == 4,
        "{dead:?}"
    );
    let s = status.status();
    ensure!(
        s.dead == 1 && s.lag_positions == Some(0) && s.head == Some(7),
        "{s:?}"
    );
    handler.cured.store(true, Ordering::SeqCst);
    ensure!(FeedConsumer::requeue(&e.consumer_db, FEED, "bad").await?);
    e.wait_count("requeued applied", APPLIED, 7).await?;
    ensure!(
        e.count("SELECT COUNT(*) FROM applied WHERE event_id = 'bad'")
            .await?
            == 1
    );
    ensure!(FeedConsumer::dead_events(&e.consumer_db, FEED, 10)
        .await?
        .is_empty());
    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await??;
    e.tdb.cleanup().await;
    Ok(())
}

/// What a handler registers with `after_commit` runs once its event's
/// transaction committed: never for a refused event, never for a page that
/// rolled back (and was applied again), and for a requeued event once it is
/// applied.
async fn after_commit_runs_once_committed(backend: Backend) -> Result<()> {
    let e = consumer_env(backend).await?;
    e.append(0, 3).await?;
    append_one(&e.log, "bad", serde_json::json!({"poison": true})).await?;
    e.append(3, 3).await?;
    let handler = Arc::new(Recorder::default());
    *handler
        .retry_once
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))? = Some("e4".into());
    let stop = CancellationToken::new();
    let (c, _db) = e
        .consumer("a", Commit::SameTransaction, handler.clone())
        .await?;
    let task = tokio::spawn(c.run(stop.clone()));
    e.wait_count("offset past the poison", OFFSET, 7).await?;
    let seen = |h: &Recorder| -> Vec<String> {
        let mut v = h.committed.lock().map(|c| c.clone()).unwrap_or_default();
        v.sort();
        v
    };
    let want: Vec<String> = (0..6).map(|i| format!("e{i}")).collect();
    // The hooks run after the commit that the offset shows: await them.
    let start = Instant::now();
    while seen(&handler).len() < want.len() && start.elapsed() < DEADLINE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        seen(&handler) == want,
        "hooks after the first page: {:?}",
        seen(&handler)
    );
    handler.cured.store(true, Ordering::SeqCst);
    ensure!(FeedConsumer::requeue(&e.consumer_db, FEED, "bad").await?);
    e.wait_count("requeued applied", APPLIED, 7).await?;
    let start = Instant::now();
    while seen(&handler).len() < 7 {
        ensure!(
            start.elapsed() < DEADLINE,
            "requeued event's hook never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut want = want;
    want.insert(0, "bad".into());
    ensure!(seen(&handler) == want, "{:?}", seen(&handler));
    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await??;
    e.tdb.cleanup().await;
    Ok(())
}

/// A consumer whose offset fell behind retention is told so (410), and
/// applies nothing from beyond the gap.
async fn consumer_behind_retention_sees_gone(backend: Backend) -> Result<()> {
    let e = consumer_env(backend).await?;
    e.append(0, 5).await?;
    e.log.read(FEED, 0, 10).await?;
    let t = now_ms();
    while now_ms() <= t {
        tokio::task::yield_now().await;
    }
    e.log.trim(FEED, Duration::ZERO).await?;
    e.append(5, 2).await?;
    let stop = CancellationToken::new();
    let (c, _db) = e
        .consumer("a", Commit::SameTransaction, Arc::new(Recorder::default()))
        .await?;
    let status = c.handle();
    let task = tokio::spawn(c.run(stop.clone()));
    let start = Instant::now();
    while !status.status().gone {
        ensure!(start.elapsed() < DEADLINE, "never saw Gone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(e.count(APPLIED).await? == 0);
    // The operator's repair: start after the trimmed prefix.
    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await??;
    FeedConsumer::reset_offset(&e.consumer_db, FEED, 5).await?;
    let stop = CancellationToken::new();
    let (c, _db2) = e
        .consumer("a", Commit::SameTransaction, Arc::new(Recorder::default()))
        .await?;
    let task = tokio::spawn(c.run(stop.clone()));
    e.wait_count("applied after reset", APPLIED, 2).await?;
    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await??;
    e.tdb.cleanup().await;
    Ok(())
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> { super::$name(resilience::store::Backend::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> { super::$name(resilience::store::Backend::Postgres).await }
            )*
        }
    };
}

on_both_backends!(
    late_committer_is_not_skipped,
    concurrent_writers_reader_sees_all,
    retention_answers_gone,
    long_poll_wakes_on_append,
    same_transaction_applies_exactly_once,
    periodic_commit_reapplies_after_a_crash,
    refused_events_are_dead_and_requeueable,
    after_commit_runs_once_committed,
    consumer_behind_retention_sees_gone,
);
