//! SIGKILL between a commit and its send: the durable modes deliver anyway,
//! because what was committed is all that survives and all that is needed.

use std::time::Duration;

use anyhow::ensure;
use tests::{both_backends, ProcessStack, TestBackend};

const EXE: &str = env!("CARGO_BIN_EXE_svc");
const SETTLE: Duration = Duration::from_secs(40);
const DURABLE: [&str; 2] = ["at-least-once", "effectively-once"];

/// order-service commits orders (and their outbox messages) but never sends
/// them (its relay is off), is killed, and restarts with its relay on; in
/// both durable modes.
async fn order_service_killed_between_commit_and_send(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, backend, &["--relay-enabled", "false"], &[]).await?;
    for mode in DURABLE {
        for _ in 0..10 {
            let o = stack.create_order(mode).await?;
            ensure!(o["status"] == "pending");
        }
        let before = stack.audit(Some(mode)).await?;
        ensure!(
            before.orders == 10 && before.shipments == 0,
            "{mode}: nothing may be sent yet: {before:?}"
        );
    }

    stack.cluster.order.kill().await?;
    stack.cluster.order.set_flag("--relay-enabled", "true");
    stack.cluster.order.start(&stack.cluster.http).await?;

    for mode in DURABLE {
        let inv = stack.settled(mode, SETTLE).await?;
        ensure!(
            inv.orders == 10 && inv.lost == 0 && inv.unacknowledged == 0,
            "{mode}: {inv:?}"
        );
        ensure!(
            inv.duplicated == 0,
            "{mode}: nothing was lost in flight, so nothing repeats: {inv:?}"
        );
    }
    stack.shutdown().await
}

/// shipping-service ships (and commits its report to the outbox) but never
/// reports (its relay is off), is killed, and restarts with its relay on.
async fn shipping_service_killed_between_commit_and_report(
    backend: TestBackend,
) -> anyhow::Result<()> {
    let mut stack = ProcessStack::start(EXE, backend, &[], &["--relay-enabled", "false"]).await?;
    for mode in DURABLE {
        for _ in 0..10 {
            stack.create_order(mode).await?;
        }
    }
    let shipped = tests::eventually(SETTLE, "every shipment shipped", || async {
        let db = stack.dbs.shipping_db().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shipments WHERE status = 'shipped'")
            .fetch_one(db.pool())
            .await?;
        Ok((n == 20).then_some(n))
    })
    .await?;
    let inv = stack.audit(None).await?;
    ensure!(
        shipped == 20 && inv.unacknowledged == 20,
        "reports must not have left yet: {inv:?}"
    );

    stack.cluster.shipping.kill().await?;
    stack.cluster.shipping.set_flag("--relay-enabled", "true");
    stack.cluster.shipping.start(&stack.cluster.http).await?;

    for mode in DURABLE {
        let inv = stack.settled(mode, SETTLE).await?;
        ensure!(
            inv.orders == 10 && inv.lost == 0 && inv.duplicated == 0 && inv.unacknowledged == 0,
            "{mode}: {inv:?}"
        );
    }
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
