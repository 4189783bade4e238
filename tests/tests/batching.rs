//! Batched delivery between the real services (`POST /batch`, see
//! `resilience::batch`): a burst of orders is delivered once each, in fewer
//! receiving transactions than messages, with batching on one side, on both
//! sides, and beside the memory-dedupe mode that never batches. Everything
//! is counted from the databases.

use std::time::Duration;

use anyhow::ensure;
use futures::StreamExt;
use tests::{ProcessStack, TestBackend};

const EXE: &str = env!("CARGO_BIN_EXE_svc");
const SETTLE: Duration = Duration::from_secs(90);

/// Posts `n` orders in `mode`, `concurrency` at a time.
async fn burst(
    stack: &ProcessStack,
    mode: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<serde_json::Value>> = futures::stream::iter(0..n)
        .map(|_| stack.create_order(mode))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// Transactions that created shipments (Postgres: distinct `xmin`).
async fn shipment_writers(stack: &ProcessStack) -> anyhow::Result<Option<i64>> {
    if stack.dbs.backend() != TestBackend::Postgres {
        return Ok(None);
    }
    let db = stack.dbs.shipping_db().await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT xmin::text) FROM shipments")
        .fetch_one(db.pool())
        .await?;
    db.close().await;
    Ok(Some(n))
}

async fn a_burst_is_delivered_once_in_few_commits(backend: TestBackend) -> anyhow::Result<()> {
    let stack = ProcessStack::start(EXE, backend, &[], &[]).await?;
    let result = async {
        burst(&stack, "effectively-once", 200, 16).await?;
        let inv = stack.settled("effectively-once", SETTLE).await?;
        ensure!(
            inv.orders == 200
                && inv.shipments == 200
                && inv.duplicated == 0
                && inv.dead_letters == 0,
            "{inv:?}"
        );
        // The relays' batched reactions: every order knows its shipment and
        // when it was accepted; every shipment knows its report arrived.
        let order_db = stack.dbs.order_db().await?;
        let bad_orders: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM orders WHERE shipment_id IS NULL OR accepted_at IS NULL",
        )
        .fetch_one(order_db.pool())
        .await?;
        // Each order counts the sends it took, also when shipping's report
        // got there before the relay wrote the acknowledgement (the order
        // is shipped already then). The relay writes its reactions after the
        // report may have landed: wait for them, with a deadline.
        let counted = tests::eventually(SETTLE, "every order's sends counted", || async {
            let uncounted: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE send_attempts < 1")
                    .fetch_one(order_db.pool())
                    .await?;
            Ok((uncounted == 0).then_some(()))
        })
        .await;
        order_db.close().await;
        counted?;
        // Likewise shipping's relay records a report's delivery once
        // order-service has answered it, after the order is shipped: wait
        // for every shipment's, with a deadline.
        let shipping_db = stack.dbs.shipping_db().await?;
        let reported = tests::eventually(SETTLE, "every shipment's report recorded", || async {
            let unreported: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM shipments WHERE reported_at IS NULL OR report_attempts < 1",
            )
            .fetch_one(shipping_db.pool())
            .await?;
            Ok((unreported == 0).then_some(()))
        })
        .await;
        let bad_shipments: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM shipments WHERE reported_at IS NULL OR report_attempts < 1 \
             OR report_error IS NOT NULL",
        )
        .fetch_one(shipping_db.pool())
        .await?;
        shipping_db.close().await;
        reported?;
        ensure!(
            bad_orders == 0 && bad_shipments == 0,
            "{bad_orders} orders and {bad_shipments} shipments without their acknowledgement"
        );
        if let Some(writers) = shipment_writers(&stack).await? {
            eprintln!("200 shipments in {writers} transactions");
            ensure!(
                writers < 150,
                "200 shipments took {writers} transactions: no batching"
            );
        }
        anyhow::Ok(())
    }
    .await;
    stack.shutdown().await?;
    result
}

async fn one_side_batching_and_memory_dedupe_mix(backend: TestBackend) -> anyhow::Result<()> {
    // order-service batches its sends; shipping-service sends one by one.
    let stack = ProcessStack::start(EXE, backend, &[], &["--relay-send-batch", "1"]).await?;
    let result = async {
        let (a, b, c) = tokio::join!(
            burst(&stack, "effectively-once", 120, 8),
            burst(&stack, "at-least-once", 60, 4),
            burst(&stack, "memory-dedupe", 40, 4),
        );
        a?;
        b?;
        c?;
        for (mode, n) in [
            ("effectively-once", 120),
            ("at-least-once", 60),
            ("memory-dedupe", 40),
        ] {
            let inv = stack.settled(mode, SETTLE).await?;
            ensure!(
                inv.orders == n
                    && inv.shipments == n
                    && inv.duplicated == 0
                    && inv.dead_letters == 0,
                "{mode}: {inv:?}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    stack.shutdown().await?;
    result
}

async fn batched_acknowledgements_record_each_order(backend: TestBackend) -> anyhow::Result<()> {
    // Nothing ships: what each order records comes from the relay's batched
    // reaction to shipping's 201 alone.
    let stack = ProcessStack::start(EXE, backend, &[], &["--warehouse-delay", "1h"]).await?;
    let result = async {
        burst(&stack, "effectively-once", 100, 16).await?;
        let db = stack.dbs.order_db().await?;
        let shipping = stack.dbs.shipping_db().await?;
        let outcome = tests::eventually(SETTLE, "every order accepted", || async {
            let accepted: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM orders WHERE status = 'accepted' \
                 AND shipment_id IS NOT NULL AND accepted_at IS NOT NULL AND send_attempts >= 1",
            )
            .fetch_one(db.pool())
            .await?;
            Ok((accepted == 100).then_some(()))
        })
        .await;
        // Each order names the shipment that shipping created for it.
        let mut mismatched = 0;
        if outcome.is_ok() {
            let pairs: Vec<(String, String)> = sqlx::query_as("SELECT id, shipment_id FROM orders")
                .fetch_all(db.pool())
                .await?;
            for (order, shipment) in pairs {
                let of: Option<String> =
                    sqlx::query_scalar("SELECT order_id FROM shipments WHERE id = $1")
                        .bind(&shipment)
                        .fetch_optional(shipping.pool())
                        .await?;
                if of.as_deref() != Some(order.as_str()) {
                    mismatched += 1;
                }
            }
        }
        db.close().await;
        shipping.close().await;
        outcome?;
        ensure!(
            mismatched == 0,
            "{mismatched} orders name another order's shipment"
        );
        anyhow::Ok(())
    }
    .await;
    stack.shutdown().await?;
    result
}

tests::both_backends!(
    batched_acknowledgements_record_each_order,
    a_burst_is_delivered_once_in_few_commits,
    one_side_batching_and_memory_dedupe_mix,
);
