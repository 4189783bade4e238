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

tests::both_backends!(
    a_burst_is_delivered_once_in_few_commits,
    one_side_batching_and_memory_dedupe_mix,
);
