//! Back-pressure (issue 14): past `MAX_PENDING` undelivered messages,
//! `POST /orders` answers 503 problem+json with `Retry-After` and writes
//! nothing; once the backlog drains, orders are accepted again.

use std::time::{Duration, Instant};

use anyhow::ensure;
use tests::{both_backends, sample_order, Stack, StackOptions, TestBackend};

async fn orders(stack: &Stack) -> anyhow::Result<i64> {
    let db = stack.dbs.order_db().await?;
    let n = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(db.pool())
        .await?;
    db.close().await;
    Ok(n)
}

async fn backlog_past_the_bound_is_503(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = Stack::start(
        backend,
        StackOptions {
            // Nothing listens on shipping's port: every order stays pending.
            start_shipping: false,
            order: |c| c.max_pending = 3,
            ..StackOptions::default()
        },
    )
    .await?;
    let order = sample_order("at-least-once");
    // Accepted until the background count sees the bound (it refreshes
    // every 250 ms); bounded in count and time.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        ensure!(Instant::now() < deadline, "no 503 within 20 s");
        let before = orders(&stack).await?;
        let res = stack.post_order(&order).await?;
        match res.status().as_u16() {
            201 => {
                ensure!(before < 50, "still accepting after {before} orders");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            503 => {
                ensure!(before >= 3, "refused below the bound: {before} orders");
                ensure!(
                    res.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
                ensure!(
                    res.headers()
                        .get("content-type")
                        .is_some_and(|v| v == "application/problem+json"),
                    "503 not problem+json"
                );
                let body: serde_json::Value = res.json().await?;
                ensure!(
                    body["type"]
                        .as_str()
                        .is_some_and(|t| t.ends_with("/backlog-full")),
                    "{body}"
                );
                ensure!(
                    orders(&stack).await? == before,
                    "a refused order was written"
                );
                break before;
            }
            s => anyhow::bail!("unexpected {s}: {}", res.text().await?),
        }
    };
    // Shipping comes up, the backlog drains, orders are accepted again.
    stack.start_shipping().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ensure!(
            Instant::now() < deadline,
            "still refusing 30 s after shipping came back ({refused} orders)"
        );
        let res = stack.post_order(&order).await?;
        if res.status() == 201 {
            break;
        }
        ensure!(res.status() == 503, "unexpected {}", res.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.shutdown().await
}

both_backends!(backlog_past_the_bound_is_503);
