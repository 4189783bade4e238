//! A replica that runs no relay still wakes the relays of the others.
//!
//! The outbox's `NOTIFY` is sent after the commit by a task of its own, not
//! inside the enqueuing transaction (issue 14). A replica started with
//! `--relay-enabled false` must start that task anyway: two order-service
//! replicas share one Postgres database, A without a relay takes the order,
//! B's relay polls only once a minute, so the order reaches shipping within
//! seconds only if A's commit wakes B.

use std::time::Duration;

use anyhow::ensure;
use demo::cluster::{free_ports, Kind, Process};
use serde_json::Value;
use tests::{eventually, sample_order, TestBackend, TestDatabases, ADMIN_TOKEN};

const EXE: &str = env!("CARGO_BIN_EXE_svc");

fn process(kind: Kind, port: u16, args: &[&str], db: &str, dir: &std::path::Path) -> Process {
    let mut all: Vec<String> = ["--bind", "127.0.0.1", "--port", &port.to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    all.extend(args.iter().map(|s| s.to_string()));
    let mut p = Process::new(kind, EXE.as_ref(), port, all, dir);
    p.set_env("DATABASE_URL", db);
    p.set_env("ADMIN_TOKEN", ADMIN_TOKEN);
    p.set_env("SERVICE_SECRET", tests::SERVICE_SECRET);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_relay_wakes_the_others() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let logs = tempfile::tempdir()?;
    let [ps, pa, pb] = free_ports()?;
    let shipping_url = format!("http://127.0.0.1:{ps}");
    let order_b_url = format!("http://127.0.0.1:{pb}");
    let dirs: Vec<_> = ["s", "a", "b"]
        .iter()
        .map(|d| logs.path().join(d))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let mut shipping = process(
        Kind::Shipping,
        ps,
        &[
            "--order-url",
            &order_b_url,
            "--warehouse-delay",
            "10ms",
            "--relay-poll",
            "60s",
        ],
        &dbs.shipping_url,
        &dirs[0],
    );
    let order = |port: u16, relay: &str, dir: &std::path::Path| {
        let args = [
            "--shipping-url",
            shipping_url.as_str(),
            "--relay-poll",
            "60s",
            "--relay-enabled",
            relay,
        ];
        process(Kind::Order, port, &args, &dbs.order_url, dir)
    };
    let mut a = order(pa, "false", &dirs[1]);
    let mut b = order(pb, "true", &dirs[2]);

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    shipping.start(&http).await?;
    b.start(&http).await?;
    a.start(&http).await?;
    // Let B's relay finish its first claim and go to its one-minute sleep.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = tokio::time::Instant::now();
    let res = http
        .post(format!("{}/orders", a.url()))
        .json(&sample_order("effectively-once"))
        .send()
        .await?;
    ensure!(res.status() == 201, "create order on A: {}", res.status());
    let order: Value = res.json().await?;
    let id = order["id"].as_str().unwrap_or_default().to_owned();
    let db = dbs.order_db().await?;
    eventually(
        Duration::from_secs(10),
        "B's relay delivered A's order",
        || {
            let db = db.clone();
            let id = id.clone();
            async move {
                let delivered: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM outbox WHERE correlation_id = $1 AND status = 'delivered'",
            )
            .bind(&id)
            .fetch_one(db.pool())
            .await?;
                Ok((delivered == 1).then_some(()))
            }
        },
    )
    .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "woken by the poll, not by A's notify: {:?}",
        started.elapsed()
    );
    for p in [&mut a, &mut b, &mut shipping] {
        p.terminate(Duration::from_secs(5)).await?;
    }
    Ok(())
}
