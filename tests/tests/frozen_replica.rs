//! One frozen replica must not stall the healthy one (issue 11, item 10).
//!
//! Two shipping-service replicas (real processes) share one Postgres
//! database. Replica A is frozen with SIGSTOP while it sits inside its
//! warehouse transaction holding row locks (a test hook makes it linger
//! there, `SHIPPING_TEST_HOLD_TX`, and `pg_stat_activity` confirms the freeze
//! landed in a writing transaction). Replica B must keep shipping, and its
//! reports must keep arriving, at no less than half the rate of an equal
//! window before the freeze, counted from the databases. After SIGCONT
//! everything settles with nothing lost, duplicated or unacknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::ensure;
use demo::cluster::{free_ports, Kind, Process};
use nix::sys::signal::Signal;
use resilience::store::{now_ms, Db};
use service_kit::testing::postgres_admin_url;
use sqlx::Connection;
use tests::{eventually, sample_order, TestBackend, TestDatabases, ADMIN_TOKEN};

const EXE: &str = env!("CARGO_BIN_EXE_svc");
const WINDOW: Duration = Duration::from_secs(4);

fn with_app_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

async fn count(db: &Db, sql: &str, from: i64, to: i64) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(sql)
        .bind(from)
        .bind(to)
        .fetch_one(db.pool())
        .await?)
}

/// (shipped by the warehouses, shipped reports recorded by order-service,
/// orders created) in `[from, to)`, ms since the epoch.
async fn window(order: &Db, shipping: &Db, from: i64, to: i64) -> anyhow::Result<(i64, i64, i64)> {
    let shipped = count(
        shipping,
        "SELECT COUNT(*) FROM shipments WHERE shipped_at >= $1 AND shipped_at < $2",
        from,
        to,
    )
    .await?;
    let reported = count(
        order,
        "SELECT COUNT(*) FROM orders WHERE shipped_at >= $1 AND shipped_at < $2",
        from,
        to,
    )
    .await?;
    let created = count(
        order,
        "SELECT COUNT(*) FROM orders WHERE created_at >= $1 AND created_at < $2",
        from,
        to,
    )
    .await?;
    Ok((shipped, reported, created))
}

/// Is the session named `app` inside a transaction that has written
/// (holds an xid, so row locks), and idle there (frozen)?
async fn holds_locks(admin: &mut sqlx::PgConnection, app: &str) -> anyhow::Result<bool> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1 \
         AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
    )
    .bind(app)
    .fetch_one(&mut *admin)
    .await?;
    Ok(n > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replica_does_not_stall_the_other() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let logs = tempfile::tempdir()?;
    let [op, pa, pb] = free_ports()?;
    let order_url = format!("http://127.0.0.1:{op}");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let app_a = format!("shipping-a-{}", &tag[..8]);
    let app_b = format!("shipping-b-{}", &tag[..8]);

    let shipping = |port: u16, dir: &std::path::Path, app: &str| {
        let mut p = Process::new(
            Kind::Shipping,
            EXE.as_ref(),
            port,
            [
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--order-url",
                &order_url,
                "--warehouse-delay",
                "50ms",
                "--relay-poll",
                "200ms",
                "--log-format",
                "json",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            dir,
        );
        p.set_env("DATABASE_URL", &with_app_name(&dbs.shipping_url, app));
        p.set_env("ADMIN_TOKEN", ADMIN_TOKEN);
        p.set_env("SERVICE_SECRET", tests::SERVICE_SECRET);
        p
    };
    let dir_a = logs.path().join("a");
    let dir_b = logs.path().join("b");
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let mut a = shipping(pa, &dir_a, &app_a);
    // A lingers inside each shipping transaction, so the freeze can land there.
    a.set_env("SHIPPING_TEST_HOLD_TX", "300ms");
    let mut b = shipping(pb, &dir_b, &app_b);
    let mut order = Process::new(
        Kind::Order,
        EXE.as_ref(),
        op,
        [
            "--bind",
            "127.0.0.1",
            "--port",
            &op.to_string(),
            // New shipments are created through B; both warehouses ship them.
            "--shipping-url",
            &format!("http://127.0.0.1:{pb}"),
            "--relay-poll",
            "200ms",
            "--log-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        logs.path(),
    );
    order.set_env("DATABASE_URL", &dbs.order_url);
    order.set_env("ADMIN_TOKEN", ADMIN_TOKEN);
    order.set_env("SERVICE_SECRET", tests::SERVICE_SECRET);

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    b.start(&http).await?;
    a.start(&http).await?;
    order.start(&http).await?;

    // Steady load: about 50 orders/s, effectively-once.
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let running = running.clone();
        let http = http.clone();
        let url = format!("{order_url}/orders");
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let res = http
                    .post(&url)
                    .json(&sample_order("effectively-once"))
                    .send()
                    .await;
                if matches!(&res, Ok(r) if r.status() == 201) {
                    sent += 1;
                }
            }
            sent
        })
    };

    let order_db = dbs.order_db().await?;
    let shipping_db = dbs.shipping_db().await?;
    let mut admin = sqlx::PgConnection::connect(&postgres_admin_url()).await?;

    // Warm up, then the baseline window with both replicas running.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = now_ms();
    tokio::time::sleep(WINDOW).await;
    let t1 = now_ms();
    let before = window(&order_db, &shipping_db, t0, t1).await?;

    // Freeze A inside a writing transaction.
    let mut frozen = false;
    for attempt in 0..100 {
        a.signal(Signal::SIGSTOP)?;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if holds_locks(&mut admin, &app_a).await? {
            eprintln!("A frozen holding row locks (attempt {attempt})");
            frozen = true;
            break;
        }
        a.signal(Signal::SIGCONT)?;
        tokio::time::sleep(Duration::from_millis(40 + 13 * (attempt % 7))).await;
    }
    ensure!(frozen, "could not freeze A inside its transaction");
    let t2 = now_ms();
    tokio::time::sleep(WINDOW).await;
    let t3 = now_ms();
    let during = window(&order_db, &shipping_db, t2, t3).await?;
    // Still frozen, still holding its locks.
    let still = holds_locks(&mut admin, &app_a).await?;
    a.signal(Signal::SIGCONT)?;

    eprintln!(
        "window {WINDOW:?}: before the freeze created {} shipped {} reported {}; during the freeze created {} shipped {} reported {} (A still holding locks: {still})",
        before.2, before.0, before.1, during.2, during.0, during.1
    );
    ensure!(
        still,
        "A's transaction ended during the window; the test proves nothing"
    );
    ensure!(
        before.0 >= 40 && before.1 >= 40,
        "too little traffic to judge: {before:?}"
    );
    ensure!(
        during.0 * 2 >= before.0,
        "B's shipping fell below half its rate while A was frozen: {} then {}",
        before.0,
        during.0
    );
    ensure!(
        during.1 * 2 >= before.1,
        "B's reports fell below half their rate while A was frozen: {} then {}",
        before.1,
        during.1
    );

    // Thaw, stop the load, and let everything settle.
    running.store(false, Ordering::Relaxed);
    let sent = load.await?;
    let inv = eventually(Duration::from_secs(60), "delivery to settle", || async {
        let inv = tests::audit::audit(&order_db, &shipping_db, Some("effectively-once")).await?;
        Ok(
            (inv.lost == 0 && inv.unacknowledged == 0 && inv.shipments >= inv.orders)
                .then_some(inv),
        )
    })
    .await?;
    eprintln!("settled: {inv:?} ({sent} orders sent)");
    ensure!(inv.duplicated == 0, "{inv:?}");
    ensure!(inv.orders as u64 == sent, "{inv:?} vs {sent} sent");

    order.terminate(Duration::from_secs(15)).await?;
    a.terminate(Duration::from_secs(15)).await?;
    b.terminate(Duration::from_secs(15)).await?;
    order_db.close().await;
    shipping_db.close().await;
    dbs.cleanup().await;
    Ok(())
}
