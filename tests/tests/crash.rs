//! SIGKILL between a commit and its send: the durable modes deliver anyway,
//! because what was committed is all that survives and all that is needed.

use std::time::Duration;

use anyhow::ensure;
use tests::{both_backends, ProcessStack, TestBackend};

const EXE: &str = env!("CARGO_BIN_EXE_svc");
const SETTLE: Duration = Duration::from_secs(40);

/// order-service commits orders (and their outbox messages) but never sends
/// them (its relay is off), is killed, and restarts with its relay on.
async fn order_service_killed_between_commit_and_send(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, backend, &["--relay-enabled", "false"], &[]).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let o = stack.create_order("at-least-once").await?;
        ensure!(o["status"] == "pending");
        ids.push(o["id"].as_str().unwrap_or_default().to_string());
    }
    let before = stack.audit(Some("at-least-once")).await?;
    ensure!(
        before.orders == 20 && before.shipments == 0,
        "nothing may be sent yet: {before:?}"
    );

    stack.cluster.order.kill().await?;
    stack.cluster.order.set_flag("--relay-enabled", "true");
    stack.cluster.order.start(&stack.cluster.http).await?;

    let inv = stack.settled("at-least-once", SETTLE).await?;
    ensure!(
        inv.orders == 20 && inv.lost == 0 && inv.unacknowledged == 0,
        "{inv:?}"
    );
    ensure!(
        inv.duplicated == 0,
        "nothing was lost in flight, so nothing repeats: {inv:?}"
    );
    stack.shutdown().await
}

/// shipping-service ships (and commits its report to the outbox) but never
/// reports (its relay is off), is killed, and restarts with its relay on.
async fn shipping_service_killed_between_commit_and_report(
    backend: TestBackend,
) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, backend, &[], &["--relay-enabled", "false"]).await?;
    for _ in 0..20 {
        stack.create_order("at-least-once").await?;
    }
    let shipped = tests::eventually(SETTLE, "every shipment shipped", || async {
        let db = stack.dbs.shipping_db().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shipments WHERE status = 'shipped'")
            .fetch_one(db.pool())
            .await?;
        Ok((n == 20).then_some(n))
    })
    .await?;
    let inv = stack.audit(Some("at-least-once")).await?;
    ensure!(
        shipped == 20 && inv.unacknowledged == 20,
        "reports must not have left yet: {inv:?}"
    );

    stack.cluster.shipping.kill().await?;
    stack.cluster.shipping.set_flag("--relay-enabled", "true");
    stack.cluster.shipping.start(&stack.cluster.http).await?;

    let inv = stack.settled("at-least-once", SETTLE).await?;
    ensure!(
        inv.orders == 20 && inv.lost == 0 && inv.unacknowledged == 0,
        "{inv:?}"
    );
    stack.shutdown().await
}

/// The same crack loses at-most-once orders for good: the call after the
/// commit never happens.
async fn at_most_once_loses_what_a_crash_interrupts(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, backend, &[], &[]).await?;
    // Shipping is down, so the one call fails; restarting changes nothing.
    stack.cluster.shipping.kill().await?;
    for _ in 0..5 {
        stack.create_order("at-most-once").await?;
    }
    stack.cluster.order.kill().await?;
    stack.cluster.shipping.start(&stack.cluster.http).await?;
    stack.cluster.order.start(&stack.cluster.http).await?;
    // Give a (wrongly) retrying implementation the time to resend: 3 relay polls.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let inv = stack.audit(Some("at-most-once")).await?;
    ensure!(
        inv.orders == 5 && inv.lost == 5 && inv.duplicated == 0,
        "{inv:?}"
    );
    stack.shutdown().await
}

both_backends!(
    order_service_killed_between_commit_and_send,
    shipping_service_killed_between_commit_and_report,
    at_most_once_loses_what_a_crash_interrupts,
);
