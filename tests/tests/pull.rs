//! Pull delivery under faults, with both services as real processes: where
//! the consumer commits its offset decides what a SIGKILL costs, a consumer
//! behind the producer's retention is told so (410), a frozen lease holder is
//! replaced and commits nothing afterwards, and a producer killed mid-append
//! leaves no event without its order. Counted from the databases.
//!
//! `TEST_SEED` fixes the seed of the randomised test (it is printed).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use demo::cluster::{Kind, Process};
use rand::{Rng, SeedableRng};
use resilience::store::Db;
use serde_json::{json, Value};
use sqlx::Row;
use tests::{
    both_backends, eventually, expect_problem, sample_order, ProcessStack, TestBackend, ADMIN_TOKEN,
};
use tokio::time::Instant;

const EXE: &str = env!("CARGO_BIN_EXE_svc");
const SETTLE: Duration = Duration::from_secs(25);
const PAL: &str = "pull-at-least-once";
const PEO: &str = "pull-effectively-once";

/// Both databases, opened once per test (polling reuses the pools).
struct Dbs {
    order: Db,
    shipping: Db,
}

impl Dbs {
    async fn open(stack: &ProcessStack) -> anyhow::Result<Self> {
        Ok(Self {
            order: stack.dbs.order_db().await?,
            shipping: stack.dbs.shipping_db().await?,
        })
    }

    /// Shipments per order id (every shipment row of shipping's database).
    async fn shipments_per_order(&self) -> anyhow::Result<HashMap<String, i64>> {
        let rows = sqlx::query("SELECT order_id FROM shipments")
            .fetch_all(self.shipping.pool())
            .await?;
        let mut out = HashMap::new();
        for r in rows {
            *out.entry(r.try_get::<String, _>("order_id")?).or_insert(0) += 1;
        }
        Ok(out)
    }

    async fn shipment_count(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM shipments")
            .fetch_one(self.shipping.pool())
            .await?)
    }

    /// Order id → status, for the orders of `mode`.
    async fn orders(&self, mode: &str) -> anyhow::Result<HashMap<String, String>> {
        let rows = sqlx::query("SELECT id, status FROM orders WHERE delivery_mode = $1")
            .bind(mode)
            .fetch_all(self.order.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("status")?)))
            .collect()
    }

    /// The committed offset of a feed in shipping's `feed_offsets`.
    async fn committed(&self, feed: &str) -> anyhow::Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT position FROM feed_offsets WHERE feed = $1")
                .bind(feed)
                .fetch_optional(self.shipping.pool())
                .await?,
        )
    }

    async fn close(self) {
        self.order.close().await;
        self.shipping.close().await;
    }
}

/// `GET /admin/feeds` of a process.
async fn admin_feeds(http: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let res = http
        .get(format!("{base}/admin/feeds"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(
        res.status() == 200,
        "admin feeds of {base}: {}",
        res.status()
    );
    Ok(res.json().await?)
}

/// The status of the consumer of `feed` in an `/admin/feeds` answer.
fn consumer<'a>(feeds: &'a Value, feed: &str) -> anyhow::Result<&'a Value> {
    feeds["consumers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["feed"] == feed))
        .with_context(|| format!("no consumer of {feed} in {feeds}"))
}

/// Creates `n` orders in `mode`; their ids.
async fn create(stack: &ProcessStack, mode: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let o = stack.create_order(mode).await?;
        ids.push(o["id"].as_str().context("order id")?.to_string());
    }
    Ok(ids)
}

/// Waits until every order of `ids` is `shipped` in order-service's database.
async fn all_shipped(dbs: &Dbs, mode: &str, ids: &[String]) -> anyhow::Result<()> {
    eventually(SETTLE, "every order shipped", || async {
        let orders = dbs.orders(mode).await?;
        Ok(ids
            .iter()
            .all(|id| orders.get(id).is_some_and(|s| s == "shipped"))
            .then_some(()))
    })
    .await
}

fn test_seed() -> u64 {
    std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

// ---------------------------------------------------------------------------
// 1 and 2: SIGKILL between the state commit and the offset commit.

/// shipping-service commits its pull-at-least-once offset only every hour,
/// so a SIGKILL after it applied `N` events always falls between the state
/// commits and the offset commit. `copies` is what the restart must leave per
/// order: 2 when the offset is committed apart (the events are read and
/// applied again), 1 when it commits with the shipment.
async fn consumer_killed_between_state_and_offset(
    backend: TestBackend,
    mode: &str,
    copies: i64,
) -> anyhow::Result<()> {
    const N: usize = 10;
    let feed = format!("orders.{mode}");
    let mut stack = ProcessStack::start(
        EXE,
        backend,
        &[],
        &[
            "--feed-offset-commit",
            "1h",
            "--feed-lease",
            "3s",
            "--feed-wait",
            "1s",
        ],
    )
    .await?;
    let dbs = Dbs::open(&stack).await?;
    let ids = create(&stack, mode, N).await?;
    eventually(SETTLE, "a shipment per order", || async {
        Ok((dbs.shipment_count().await? == N as i64).then_some(()))
    })
    .await?;
    // The crack is open (or, same transaction, closed): what the offset row
    // says right before the kill.
    let committed = dbs.committed(&feed).await?;
    let expected = if copies == 1 { N as i64 } else { 0 };
    ensure!(
        committed == Some(expected),
        "{mode}: committed offset before the kill {committed:?}, expected {expected}"
    );

    stack.cluster.shipping.kill().await?;
    stack.cluster.shipping.start(&stack.cluster.http).await?;
    let url = stack.cluster.shipping.url();
    // The restarted consumer takes the lease once the dead holder's runs out,
    // reads from the committed offset and catches up with the head.
    let status = eventually(SETTLE, "the restarted consumer caught up", || async {
        let feeds = admin_feeds(&stack.cluster.http, &url).await?;
        let c = consumer(&feeds, &feed)?.clone();
        let caught_up = c["holder"] == true && c["head"] == N && c["offset"] == N;
        let reapplied = dbs.shipment_count().await? >= copies * N as i64;
        Ok((caught_up && reapplied).then_some(c))
    })
    .await?;
    ensure!(
        status["applied"] == (copies - 1) * N as i64,
        "{mode}: events applied by the restarted process: {status}"
    );
    all_shipped(&dbs, mode, &ids).await?;

    let per_order = dbs.shipments_per_order().await?;
    let total: i64 = per_order.values().sum();
    ensure!(
        total == copies * N as i64,
        "{mode}: {total} shipments for {N} orders, expected {}",
        copies * N as i64
    );
    for id in &ids {
        let n = per_order.get(id).copied().unwrap_or(0);
        ensure!(
            n == copies,
            "{mode}: order {id} has {n} shipments, expected {copies}"
        );
    }
    let inv = stack.audit(Some(mode)).await?;
    ensure!(
        inv.orders == N && inv.lost == 0 && inv.unacknowledged == 0,
        "{mode}: {inv:?}"
    );
    eprintln!(
        "{mode} ({backend:?}): offset committed before the kill {committed:?}; \
         {total} shipments for {N} orders after the restart; restarted consumer applied {}",
        status["applied"]
    );
    dbs.close().await;
    stack.shutdown().await
}

/// pull-at-least-once: the offset commits after the state, apart; a SIGKILL
/// in between re-reads and re-applies every event (a second shipment each).
async fn pull_at_least_once_reapplies_after_sigkill(backend: TestBackend) -> anyhow::Result<()> {
    consumer_killed_between_state_and_offset(backend, PAL, 2).await
}

/// pull-effectively-once: the offset commits with the shipment; the same
/// SIGKILL re-applies nothing.
async fn pull_effectively_once_does_not_reapply_after_sigkill(
    backend: TestBackend,
) -> anyhow::Result<()> {
    consumer_killed_between_state_and_offset(backend, PEO, 1).await
}

// ---------------------------------------------------------------------------
// 3: the in-memory receiver forgets its keys on restart.

/// The outbox row of an order's shipment request in order-service's database:
/// `(status, attempts, last_error)`.
async fn request_row(dbs: &Dbs, order: &str) -> anyhow::Result<(String, i64, Option<String>)> {
    let r = sqlx::query(
        "SELECT status, attempts, last_error FROM outbox \
         WHERE kind = 'create-shipment' AND correlation_id = $1",
    )
    .bind(order)
    .fetch_one(dbs.order.pool())
    .await?;
    Ok((
        r.try_get("status")?,
        r.try_get("attempts")?,
        r.try_get("last_error")?,
    ))
}

async fn set_order_faults(stack: &ProcessStack, drop_response: f64) -> anyhow::Result<()> {
    let res = stack
        .cluster
        .http
        .put(format!("{}/admin/faults", stack.cluster.order.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({
            "drop_request": 0.0,
            "drop_response": drop_response,
            "error_503": 0.0,
            "latency_rate": 0.0,
            "latency": 0,
        }))
        .send()
        .await?;
    ensure!(res.status() == 200, "PUT /admin/faults: {}", res.status());
    Ok(())
}

/// Every answer of shipping is lost on the way back to order-service, so it
/// retries the same request with the same key. A memory-dedupe shipping
/// answers the retries from its map while it lives, and forgets them when it
/// restarts: the next retry makes a second shipment. An effectively-once
/// order under the same faults, at the same time, keeps one shipment because
/// its keys are in shipping's database.
async fn memory_dedupe_duplicates_only_after_a_receiver_restart(
    backend: TestBackend,
) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, backend, &["--retry-cap", "500ms"], &[]).await?;
    let dbs = Dbs::open(&stack).await?;
    set_order_faults(&stack, 1.0).await?;
    let memory = create(&stack, "memory-dedupe", 1).await?.remove(0);
    let persisted = create(&stack, "effectively-once", 1).await?.remove(0);

    // Shipping processes the first request of each, and then the retries
    // (the answers are lost, so order-service keeps trying).
    let retried = eventually(SETTLE, "a shipment each, and retries", || async {
        let per = dbs.shipments_per_order().await?;
        let one_each = per.get(&memory) == Some(&1) && per.get(&persisted) == Some(&1);
        let (_, m, _) = request_row(&dbs, &memory).await?;
        let (_, p, _) = request_row(&dbs, &persisted).await?;
        Ok((one_each && m >= 3 && p >= 3).then_some((m, p)))
    })
    .await?;
    let per = dbs.shipments_per_order().await?;
    ensure!(
        per.get(&memory) == Some(&1) && per.get(&persisted) == Some(&1),
        "retries while shipping lives must be de-duplicated: {per:?} after {retried:?} attempts"
    );
    let (status, _, error) = request_row(&dbs, &memory).await?;
    ensure!(
        status == "pending",
        "the answers are lost, so the request is still pending: {status} ({error:?})"
    );

    stack.cluster.shipping.kill().await?;
    stack.cluster.shipping.start(&stack.cluster.http).await?;
    set_order_faults(&stack, 0.0).await?;

    eventually(SETTLE, "both requests acknowledged", || async {
        let (m, _, _) = request_row(&dbs, &memory).await?;
        let (p, _, _) = request_row(&dbs, &persisted).await?;
        Ok((m == "delivered" && p == "delivered").then_some(()))
    })
    .await?;
    let per = dbs.shipments_per_order().await?;
    let (_, m_attempts, _) = request_row(&dbs, &memory).await?;
    let (_, p_attempts, _) = request_row(&dbs, &persisted).await?;
    ensure!(
        per.get(&memory) == Some(&2),
        "memory-dedupe: the restart wiped the map, so the retry after it ships again: \
         {:?} shipments after {m_attempts} attempts",
        per.get(&memory)
    );
    ensure!(
        per.get(&persisted) == Some(&1),
        "effectively-once: keys in the database survive the restart: {:?} shipments after \
         {p_attempts} attempts",
        per.get(&persisted)
    );
    all_shipped(&dbs, "memory-dedupe", std::slice::from_ref(&memory)).await?;
    all_shipped(&dbs, "effectively-once", std::slice::from_ref(&persisted)).await?;
    eprintln!(
        "{backend:?}: before the restart {retried:?} attempts (memory, persisted) and one \
         shipment each; after it memory-dedupe has 2 shipments ({m_attempts} attempts), \
         effectively-once 1 ({p_attempts} attempts)"
    );
    dbs.close().await;
    stack.shutdown().await
}

// ---------------------------------------------------------------------------
// 4: retention, 410, and the feed endpoint's refusals.

/// order-service trims its feeds after 1 s while shipping's consumers are
/// off; a reader from 0 then gets 410 problem+json, and a consumer started
/// afterwards says `gone` in /admin/feeds instead of skipping the gap.
async fn consumer_behind_retention_gets_410(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(
        EXE,
        backend,
        &["--feed-retention", "1s"],
        &["--relay-enabled", "false"],
    )
    .await?;
    let dbs = Dbs::open(&stack).await?;
    let http = stack.cluster.http.clone();
    let order_url = stack.cluster.order.url();
    // The feeds are service-to-service: reads are signed like a consumer's.
    let secret = stack.cluster.service_secret.clone();
    let get = |path: String| {
        let http = http.clone();
        let secret = secret.clone();
        let url = format!("{order_url}{path}");
        async move { tests::send_signed_as(&secret, &http, http.get(url)).await }
    };
    // An unsigned read is refused before anything else.
    let res = http
        .get(format!("{order_url}/orders/feed/{PEO}?after=0"))
        .send()
        .await?;
    ensure!(res.status() == 401, "unsigned feed read: {}", res.status());

    let created = Instant::now();
    create(&stack, PEO, 3).await?;
    create(&stack, PAL, 2).await?;
    // Before retention ran out, the events are there (an event is trimmed no
    // sooner than 1 s after it was appended).
    let res = get(format!("/orders/feed/{PEO}?after=0")).await?;
    if created.elapsed() < Duration::from_millis(900) {
        ensure!(res.status() == 200, "{}", res.status());
        let page: Value = res.json().await?;
        ensure!(
            page["events"].as_array().map(Vec::len) == Some(3) && page["head"] == 3,
            "{page}"
        );
    }

    let gone = eventually(SETTLE, "410 from the trimmed feed", || async {
        let res = get(format!("/orders/feed/{PEO}?after=0")).await?;
        if res.status() != 410 {
            return Ok(None);
        }
        Ok(Some(
            expect_problem(res, 410)
                .await
                .context("after=0 behind retention")?,
        ))
    })
    .await?;
    eprintln!("{backend:?}: 410 after {:?}: {gone}", created.elapsed());
    // The trimmer takes what is old at each pass (every second): the whole
    // feed once every event is older than the retention.
    // Both feeds: the consumers started below must find both behind the
    // trim (waiting for the first alone let the second's consumer read its
    // two events before they were trimmed, a flake).
    eventually(SETTLE, "the whole of both feeds trimmed", || async {
        for (mode, expected) in [(PEO, 3i64), (PAL, 2)] {
            let marks = sqlx::query("SELECT head, trimmed_upto FROM feed_heads WHERE feed = $1")
                .bind(format!("orders.{mode}"))
                .fetch_one(dbs.order.pool())
                .await?;
            let (head, trimmed): (i64, i64) =
                (marks.try_get("head")?, marks.try_get("trimmed_upto")?);
            ensure!(head == expected, "{mode}: head {head}");
            if trimmed != expected {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await?;
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM feed_events WHERE feed = $1")
        .bind(format!("orders.{PEO}"))
        .fetch_one(dbs.order.pool())
        .await?;
    ensure!(left == 0, "{left} events left after the trim");
    // Still 410 from anywhere behind the mark, not a page that starts later.
    let res = get(format!("/orders/feed/{PEO}?after=2")).await?;
    expect_problem(res, 410)
        .await
        .context("after=2 behind retention")?;
    // A reader at the head is not behind: an empty page.
    let res = get(format!("/orders/feed/{PEO}?after=3")).await?;
    ensure!(res.status() == 200, "after=3: {}", res.status());
    let page: Value = res.json().await?;
    ensure!(page["events"] == json!([]) && page["head"] == 3, "{page}");

    // The feed endpoint's refusals.
    let res = get("/orders/feed/nonsense".into()).await?;
    expect_problem(res, 404).await.context("unknown feed")?;
    let res = get("/orders/feed/effectively-once".into()).await?;
    expect_problem(res, 404)
        .await
        .context("a push mode has no feed")?;
    let res = get(format!("/orders/feed/{PEO}?after=-1")).await?;
    expect_problem(res, 400).await.context("after=-1")?;
    let res = get(format!("/orders/feed/{PEO}?wait=soon")).await?;
    expect_problem(res, 400).await.context("wait=soon")?;
    let res = get(format!("/orders/feed/{PEO}?limit=0")).await?;
    expect_problem(res, 400).await.context("limit=0")?;
    let res = get(format!("/orders/feed/{PEO}?after=99")).await?;
    expect_problem(res, 409)
        .await
        .context("after beyond the head")?;

    // shipping's consumers start now, from offset 0, behind the trim.
    stack.cluster.shipping.kill().await?;
    stack.cluster.shipping.set_flag("--relay-enabled", "true");
    stack.cluster.shipping.start(&http).await?;
    let shipping_url = stack.cluster.shipping.url();
    let feeds = eventually(SETTLE, "both consumers report gone", || async {
        let feeds = admin_feeds(&http, &shipping_url).await?;
        let gone = [PEO, PAL]
            .iter()
            .all(|m| consumer(&feeds, &format!("orders.{m}")).is_ok_and(|c| c["gone"] == true));
        // Not yet: the last answer becomes the timeout's "last error".
        ensure!(gone, "not both gone yet: {feeds}");
        Ok(Some(feeds))
    })
    .await?;
    for m in [PEO, PAL] {
        let c = consumer(&feeds, &format!("orders.{m}"))?;
        ensure!(
            c["offset"] == 0
                && c["applied"] == 0
                && c["last_error"].as_str().is_some_and(|e| e.contains("410")),
            "{m}: {c}"
        );
        ensure!(
            dbs.committed(&format!("orders.{m}")).await? == Some(0),
            "{m}: the offset must not jump over the gap"
        );
    }
    ensure!(
        dbs.shipment_count().await? == 0,
        "nothing may be applied from behind the gap"
    );
    dbs.close().await;
    stack.shutdown().await
}

// ---------------------------------------------------------------------------
// 5: two consumer replicas on one Postgres database, the holder frozen.

/// The base URL of whichever shipping replica holds `feed`'s lease (exactly
/// one must say so).
async fn lease_holder(
    http: &reqwest::Client,
    urls: &[String],
    feed: &str,
) -> anyhow::Result<Option<(usize, Value)>> {
    let mut holders = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let feeds = admin_feeds(http, url).await?;
        let c = consumer(&feeds, feed)?;
        if c["holder"] == true {
            holders.push((i, c.clone()));
        }
    }
    Ok((holders.len() == 1).then(|| holders.remove(0)))
}

async fn two_replicas_one_frozen(backend: TestBackend) -> anyhow::Result<()> {
    let lease = Duration::from_secs(3);
    let feed = format!("orders.{PEO}");
    // The request timeout outlasts the freeze: the frozen holder's long-poll
    // is answered (with the orders created during the freeze) while it is
    // stopped, and on waking it holds a page of events the other replica has
    // applied meanwhile. That is the page it must not commit. (With a
    // timeout shorter than the freeze its fetch would fail instead, and it
    // would find the lease lost before applying anything.)
    let shipping_flags = [
        "--feed-lease",
        "3s",
        "--feed-wait",
        "1s",
        "--request-timeout",
        "10s",
    ];
    let stack = ProcessStack::start(EXE, backend, &[], &shipping_flags).await?;
    let dbs = Dbs::open(&stack).await?;
    let http = stack.cluster.http.clone();

    // A second shipping-service on the same database.
    let logs = tempfile::tempdir()?;
    let port = demo::cluster::free_port()?;
    let mut args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--order-url",
        &stack.cluster.order.url(),
        "--relay-poll",
        "200ms",
        "--log-format",
        "json",
        "--warehouse-delay",
        "50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(shipping_flags.iter().map(|s| s.to_string()));
    let exe = std::path::PathBuf::from(EXE);
    let mut replica = Process::new(Kind::Shipping, &exe, port, args, logs.path());
    // Secrets through the environment, as the cluster passes them.
    replica.set_env("DATABASE_URL", &stack.dbs.shipping_url);
    replica.set_env("ADMIN_TOKEN", ADMIN_TOKEN);
    replica.set_env("SERVICE_SECRET", &stack.cluster.service_secret);
    replica.start(&http).await?;
    let urls = [stack.cluster.shipping.url(), replica.url()];

    let mut ids = create(&stack, PEO, 5).await?;
    all_shipped(&dbs, PEO, &ids).await?;
    let (holder, before) = eventually(SETTLE, "one lease holder", || async {
        lease_holder(&http, &urls, &feed).await
    })
    .await?;
    let db_holder: Option<String> =
        sqlx::query_scalar("SELECT holder FROM feed_offsets WHERE feed = $1")
            .bind(&feed)
            .fetch_one(dbs.shipping.pool())
            .await?;
    ensure!(db_holder.is_some(), "no holder in feed_offsets");
    let other = 1 - holder;

    // Freeze the holder (usually in the middle of a long-poll, which the
    // orders below then answer into its socket) and create orders.
    let frozen_at = Instant::now();
    match holder {
        0 => stack.cluster.shipping.freeze()?,
        _ => replica.freeze()?,
    }
    let result = async {
        let during = create(&stack, PEO, 10).await?;
        eventually(SETTLE, "the other replica ships them", || async {
            let rows = sqlx::query("SELECT order_id, status FROM shipments")
                .fetch_all(dbs.shipping.pool())
                .await?;
            let shipped: HashSet<String> = rows
                .iter()
                .filter(|r| {
                    r.try_get::<String, _>("status")
                        .is_ok_and(|s| s == "shipped")
                })
                .filter_map(|r| r.try_get("order_id").ok())
                .collect();
            Ok(during.iter().all(|id| shipped.contains(id)).then_some(()))
        })
        .await?;
        let took = frozen_at.elapsed();
        let now = lease_holder(&http, &urls[other..=other], &feed).await?;
        anyhow::Ok((during, took, now))
    }
    .await;
    // Thaw whatever happened, so a failure does not leave a stopped process.
    match holder {
        0 => stack.cluster.shipping.thaw()?,
        _ => replica.thaw()?,
    }
    let (during, took, now) = result?;
    ensure!(
        now.is_some(),
        "the other replica must hold the lease now: {now:?}"
    );
    let bound = lease * 2 + Duration::from_secs(1);
    ensure!(
        took <= bound,
        "the frozen holder stopped the feed for {took:?}, more than {bound:?} (lease {lease:?})"
    );
    ids.extend(during);

    // Thawed, the old holder finds out it lost the lease, and commits nothing.
    let after = eventually(SETTLE, "the thawed replica gave the lease up", || async {
        let feeds = admin_feeds(&http, &urls[holder]).await?;
        let c = consumer(&feeds, &feed)?.clone();
        Ok((c["holder"] == false).then_some(c))
    })
    .await?;
    ensure!(
        after["head"].as_i64() > before["head"].as_i64(),
        "the thawed holder must have read the events created during its freeze (else this \
         test did not exercise a stale page): before {before}, after {after}"
    );
    ensure!(
        after["applied"] == before["applied"],
        "the frozen holder applied events after losing its lease: before {before}, after {after}"
    );
    let takeovers: i64 = sqlx::query_scalar("SELECT takeovers FROM feed_offsets WHERE feed = $1")
        .bind(&feed)
        .fetch_one(dbs.shipping.pool())
        .await?;
    ensure!(takeovers >= 1, "takeovers {takeovers}");

    // Both alive again: more orders, still one shipment each.
    ids.extend(create(&stack, PEO, 5).await?);
    all_shipped(&dbs, PEO, &ids).await?;
    let per_order = dbs.shipments_per_order().await?;
    for id in &ids {
        let n = per_order.get(id).copied().unwrap_or(0);
        ensure!(n == 1, "order {id} has {n} shipments");
    }
    let total: i64 = per_order.values().sum();
    ensure!(
        total == ids.len() as i64,
        "{total} shipments for {}",
        ids.len()
    );
    eprintln!(
        "{backend:?}: holder {holder} frozen; the other replica shipped 10 orders {took:?} \
         after the freeze (lease {lease:?}); {takeovers} takeover(s); thawed holder read up to {} and applied \
         {} before and {} after; {total} shipments for {} orders",
        after["head"],
        before["applied"],
        after["applied"],
        ids.len()
    );
    replica.terminate(Duration::from_secs(15)).await?;
    dbs.close().await;
    stack.shutdown().await
}

// ---------------------------------------------------------------------------
// 6: the producer killed mid-append.

/// order-service is SIGKILLed (at a seeded moment) while several clients post
/// pull-effectively-once orders, then restarted: every order that committed
/// has its event and exactly one shipment, and nothing exists for an order
/// that did not commit.
async fn producer_killed_mid_append(backend: TestBackend) -> anyhow::Result<()> {
    let seed = test_seed();
    eprintln!("producer_killed_mid_append ({backend:?}): seed {seed}");
    let res = producer_killed_mid_append_seeded(backend, seed).await;
    res.with_context(|| format!("seed {seed} (TEST_SEED={seed} repeats it)"))
}

async fn producer_killed_mid_append_seeded(backend: TestBackend, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let kill_after = rng.gen_range(5..=25usize);
    let extra = Duration::from_millis(rng.gen_range(0..40));
    let mut stack = ProcessStack::start(EXE, backend, &[], &[]).await?;
    let dbs = Dbs::open(&stack).await?;
    let http = stack.cluster.http.clone();
    let url = format!("{}/orders", stack.cluster.order.url());

    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (http, url, acked, stop) = (http.clone(), url.clone(), acked.clone(), stop.clone());
        let in_flight = in_flight.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                in_flight.fetch_add(1, Ordering::SeqCst);
                let res = http.post(&url).json(&sample_order(PEO)).send().await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                match res {
                    Ok(res) if res.status() == 201 => {
                        if let Ok(v) = res.json::<Value>().await {
                            if let Some(id) = v["id"].as_str() {
                                acked.lock().map(|mut a| a.push(id.to_string())).ok();
                            }
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }
    eventually(SETTLE, "orders flowing", || async {
        let n = acked.lock().map(|a| a.len()).unwrap_or(0);
        Ok((n >= kill_after).then_some(()))
    })
    .await?;
    tokio::time::sleep(extra).await; // a seeded moment inside the stream
    let cut = in_flight.load(Ordering::SeqCst);
    stack.cluster.order.kill().await?;
    let acked_at_kill = acked.lock().map(|a| a.len()).unwrap_or(0);
    // The clients keep posting into the dead port for a moment, then stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    stack.cluster.order.start(&http).await?;
    let acked: Vec<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();

    let orders = dbs.orders(PEO).await?;
    let ids: Vec<String> = orders.keys().cloned().collect();
    all_shipped(&dbs, PEO, &ids).await?;

    // Every acknowledged order committed; some more may have committed
    // without their answer reaching the client.
    for id in &acked {
        ensure!(
            orders.contains_key(id),
            "order {id} was answered 201 but is gone"
        );
    }
    let per_order = dbs.shipments_per_order().await?;
    for id in &ids {
        let n = per_order.get(id).copied().unwrap_or(0);
        ensure!(n == 1, "order {id} has {n} shipments");
    }
    let orphans: Vec<_> = per_order
        .keys()
        .filter(|id| !orders.contains_key(*id))
        .collect();
    ensure!(
        orphans.is_empty(),
        "shipments of orders that do not exist: {orphans:?}"
    );
    // The feed: one event per committed order, numbered 1..=head without a gap.
    let feed = format!("orders.{PEO}");
    let events: Vec<String> = sqlx::query_scalar("SELECT id FROM feed_events WHERE feed = $1")
        .bind(&feed)
        .fetch_all(dbs.order.pool())
        .await?;
    let events: HashSet<String> = events.into_iter().collect();
    let order_ids: HashSet<String> = orders.keys().cloned().collect();
    ensure!(
        events == order_ids,
        "feed events and orders differ: {} events, {} orders",
        events.len(),
        order_ids.len()
    );
    let r = sqlx::query(
        "SELECT COUNT(position) AS n, MIN(position) AS lo, MAX(position) AS hi FROM feed_events \
         WHERE feed = $1",
    )
    .bind(&feed)
    .fetch_one(dbs.order.pool())
    .await?;
    let (n, lo, hi): (i64, Option<i64>, Option<i64>) =
        (r.try_get("n")?, r.try_get("lo")?, r.try_get("hi")?);
    ensure!(
        n == ids.len() as i64 && lo == Some(1) && hi == Some(n),
        "positions: {n} numbered, {lo:?}..={hi:?}, for {} orders",
        ids.len()
    );
    let inv = stack.audit(Some(PEO)).await?;
    ensure!(
        inv.lost == 0 && inv.duplicated == 0 && inv.unacknowledged == 0,
        "{inv:?}"
    );
    eprintln!(
        "{backend:?}: killed after {acked_at_kill} acknowledged orders (+{extra:?}) with \
         {cut} requests in flight; {} acknowledged, {} committed, {} shipments",
        acked.len(),
        ids.len(),
        per_order.values().sum::<i64>()
    );
    dbs.close().await;
    stack.shutdown().await
}

both_backends!(
    pull_at_least_once_reapplies_after_sigkill,
    pull_effectively_once_does_not_reapply_after_sigkill,
    memory_dedupe_duplicates_only_after_a_receiver_restart,
    consumer_behind_retention_gets_410,
    producer_killed_mid_append,
);

mod postgres_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_one_frozen() -> anyhow::Result<()> {
        super::two_replicas_one_frozen(tests::TestBackend::Postgres).await
    }
}
