//! The durable modes between the two services, on SQLite and on Postgres:
//! an outage of shipping, lost responses, dead letters through the admin API.

use std::time::Duration;

use anyhow::ensure;
use serde_json::{json, Value};
use tests::{
    both_backends, eventually, expect_problem, Stack, StackOptions, TestBackend, ADMIN_TOKEN,
};

const SETTLE: Duration = Duration::from_secs(30);

async fn all_shipped(stack: &Stack, ids: &[String]) -> anyhow::Result<()> {
    eventually(SETTLE, "every order shipped", || async {
        for id in ids {
            if stack.order(id).await?["status"] != "shipped" {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

/// Shipping down for several seconds: orders stay pending, the breaker opens
/// and stops the attempts; shipping back: everything is delivered.
async fn outage_then_recovery(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    let mut ids = Vec::new();
    for _ in 0..30 {
        let o = stack.create_order("at-least-once").await?;
        ensure!(o["status"] == "pending");
        ids.push(o["id"].as_str().unwrap_or_default().to_string());
    }
    let outage = Duration::from_secs(4);
    tokio::time::sleep(outage).await; // the outage is the scenario, not a wait for a condition

    for id in &ids {
        ensure!(stack.order(id).await?["status"] == "pending");
    }
    // A pending order shows the outbox's progress: sends so far, last failure.
    let watched = stack.order(&ids[0]).await?;
    ensure!(
        watched["send_attempts"].as_i64().unwrap_or(0) >= 1 && watched["last_error"].is_string(),
        "a pending order during an outage: {watched}"
    );
    let stats = stack.order_admin("/admin/outbox").await?;
    ensure!(stats["pending"] == 30, "{stats}");
    let attempts = stats["attempts"].as_i64().unwrap_or(i64::MAX);
    // One attempt per message per 200 ms poll would be 30 x 20 = 600.
    ensure!(
        attempts < 100,
        "{attempts} attempts during a 4 s outage of 30 messages"
    );
    let breakers = stack.order_admin("/admin/breakers").await?;
    let state = breakers["breakers"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        state.contains("open"),
        "breaker should be open or half-open, is {state:?}: {breakers}"
    );

    stack.start_shipping().await?;
    all_shipped(&stack, &ids).await?;
    // Each order shows the sends it took: the failed ones during the outage
    // (at least the first) and the acknowledged one.
    let order = stack.order(&ids[0]).await?;
    ensure!(
        order["send_attempts"].as_i64().unwrap_or(0) >= 2,
        "send_attempts after an outage: {order}"
    );
    // The shipment shows the reports it took once order-service acknowledged.
    let reported = eventually(SETTLE, "the shipped report acknowledged", || async {
        let shipments = stack.shipments_of(&ids[0]).await?;
        Ok(shipments.into_iter().find(|s| s["reported_at"].is_string()))
    })
    .await?;
    ensure!(
        reported["report_attempts"].as_i64().unwrap_or(0) >= 1,
        "{reported}"
    );
    let inv = stack.audit(Some("at-least-once")).await?;
    ensure!(
        inv.orders == 30 && inv.lost == 0 && inv.unacknowledged == 0,
        "{inv:?}"
    );
    stack.shutdown().await
}

/// Lost responses (seeded): at-least-once loses nothing and duplicates.
async fn lost_responses_duplicate_at_least_once(backend: TestBackend) -> anyhow::Result<()> {
    let seed = 7;
    eprintln!("fault seed {seed}");
    let stack = Stack::start(
        backend,
        StackOptions {
            order: |c| {
                c.delivery.fault_drop_response = 0.4;
                c.delivery.fault_seed = 7;
            },
            ..Default::default()
        },
    )
    .await?;
    let ids = stack.create_orders("at-least-once", 25).await?;
    all_shipped(&stack, &ids).await?;
    // An order ships on the first attempt that reached shipping; the sends
    // whose responses were lost are retried later. The duplicates are
    // there once order-service's outbox has nothing left to send.
    let order_db = stack.dbs.order_db().await?;
    eventually(SETTLE, "every retry sent", || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(order_db.pool())
                .await?;
        Ok((pending == 0).then_some(()))
    })
    .await?;
    order_db.close().await;
    let inv = stack.audit(Some("at-least-once")).await?;
    ensure!(
        inv.orders == 25 && inv.lost == 0 && inv.unacknowledged == 0,
        "seed {seed}: {inv:?}"
    );
    ensure!(
        inv.duplicated > 0,
        "seed {seed}: lost responses must duplicate without keys: {inv:?}"
    );
    ensure!(inv.shipments > 25);
    stack.shutdown().await
}

/// A request shipping refuses (4xx) is dead-lettered, listed and requeued
/// through the admin API, which needs the token.
async fn dead_letters_over_the_admin_api(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let admin = |path: &str| format!("{}{path}", stack.order.url);
    // Without or with a wrong token: 401.
    let res = stack.http.get(admin("/admin/dead-letters")).send().await?;
    ensure!(res.status() == 401, "{}", res.status());
    let res = stack
        .http
        .get(admin("/admin/dead-letters"))
        .bearer_auth("nope")
        .send()
        .await?;
    ensure!(res.status() == 401);

    // A message shipping rejects: enqueue one with an invalid body directly.
    let db = stack.dbs.order_db().await?;
    let outbox = resilience::outbox::Outbox::new(db.clone());
    let mut tx = db.begin().await?;
    let msg = resilience::outbox::OutgoingRequest::post_json(
        &stack.shipping_url,
        "/shipments",
        &json!({ "order_id": "not-a-uuid", "items": [] }),
        "create-shipment",
    )?;
    outbox.enqueue(&mut tx, msg).await?;
    tx.commit().await?;
    // The service's relay sees it at its next poll.
    let dead = eventually(SETTLE, "a dead letter", || async {
        let v = stack.order_admin("/admin/dead-letters").await?;
        let list = v["dead_letters"].as_array().cloned().unwrap_or_default();
        Ok((!list.is_empty()).then_some(list))
    })
    .await?;
    ensure!(dead.len() == 1 && dead[0]["last_status"] == 422, "{dead:?}");
    let id = dead[0]["id"].as_str().unwrap_or_default();
    let res = stack
        .http
        .post(admin(&format!("/admin/dead-letters/{id}/requeue")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(res.status() == 200);
    let res = stack
        .http
        .post(admin("/admin/dead-letters/nope/requeue"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(res.status() == 400, "{}", res.status());
    let res = stack
        .http
        .post(admin(&format!(
            "/admin/dead-letters/{}/requeue",
            uuid::Uuid::new_v4()
        )))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(res.status() == 404, "{}", res.status());
    // Still poison: dead again after the requeue.
    eventually(SETTLE, "dead again", || async {
        let v: Value = stack.order_admin("/admin/outbox").await?;
        Ok((v["dead"] == 1 && v["pending"] == 0).then_some(()))
    })
    .await?;
    stack.shutdown().await
}

/// Admin endpoints are off without a token, and an empty token is no token:
/// it must not let an empty or missing `Authorization` header in.
async fn admin_is_off_without_a_token(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            order: |c| c.delivery.admin_token = None,
            shipping: |c| c.delivery.admin_token = Some(String::new()),
            ..Default::default()
        },
    )
    .await?;
    let res = stack
        .http
        .get(format!("{}/admin/outbox", stack.order.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(res.status() == 404, "{}", res.status());
    let url = format!("{}/admin/faults", stack.shipping_url);
    let res = stack.http.get(&url).send().await?;
    ensure!(
        res.status() == 404,
        "empty token, no header: {}",
        res.status()
    );
    let res = stack.http.get(&url).bearer_auth("").send().await?;
    ensure!(
        res.status() == 404,
        "empty token, empty bearer: {}",
        res.status()
    );
    let res = stack
        .http
        .put(&url)
        .json(&json!({ "error_503": 1.0 }))
        .send()
        .await?;
    ensure!(res.status() == 404, "empty token, PUT: {}", res.status());
    stack.shutdown().await
}

/// Fault rates switched at run time over the admin API: validated, applied to
/// the next call, counted, and switched off again.
async fn faults_over_the_admin_api(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let url = format!("{}/admin/faults", stack.order.url);
    let put = |body: Value| {
        stack
            .http
            .put(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    // Without the token: 401, and nothing changes.
    let res = stack
        .http
        .put(&url)
        .json(&json!({ "drop_request": 1.0 }))
        .send()
        .await?;
    ensure!(res.status() == 401, "{}", res.status());
    // An invalid rate: 4xx problem, and nothing changes.
    let res = put(json!({ "drop_request": 2.0 })).await?;
    ensure!(res.status().is_client_error(), "{}", res.status());
    ensure!(
        res.headers()
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json"),
        "{:?}",
        res.headers()
    );
    let v = stack.order_admin("/admin/faults").await?;
    ensure!(v["config"]["drop_request"] == 0.0, "{v}");

    // Every request dropped: an at-most-once order is lost, and counted.
    let res = put(json!({ "drop_request": 1.0 })).await?;
    ensure!(res.status() == 200, "{}", res.status());
    // A misspelt field is refused, not read as "everything else off".
    let res = put(json!({ "drop_requests": 0.5 })).await?;
    ensure!(res.status().is_client_error(), "{}", res.status());
    // Not an object (serde would read `[]` as all off, `[0.0]` as the
    // first field), and a latency longer than the one-minute bound.
    for body in [
        json!([]),
        json!([0.0]),
        json!({ "latency_rate": 1.0, "latency": 100_000_000_000_u64 }),
        json!({ "latency": 60_001 }),
    ] {
        let res = put(body.clone()).await?;
        expect_problem(res, 422)
            .await
            .map_err(|e| e.context(body.to_string()))?;
    }
    let v = stack.order_admin("/admin/faults").await?;
    ensure!(v["config"]["drop_request"] == 1.0, "{v}");
    let o = stack.create_order("at-most-once").await?;
    let id = o["id"].as_str().unwrap_or_default().to_string();
    let o = stack.order(&id).await?;
    ensure!(
        o["status"] == "pending" && o["last_error"].is_string(),
        "{o}"
    );
    let v = stack.order_admin("/admin/faults").await?;
    ensure!(v["counters"]["dropped"].as_u64() >= Some(1), "{v}");

    // Off again: the next order goes through.
    let res = put(json!({})).await?;
    ensure!(res.status() == 200, "{}", res.status());
    let o = stack.create_order("at-most-once").await?;
    let id = o["id"].as_str().unwrap_or_default().to_string();
    ensure!(stack.order(&id).await?["status"] != "pending");
    stack.shutdown().await
}

/// A broken invariant comes with its story from both databases: the order,
/// its shipments, the outbox messages on each side.
async fn broken_orders_come_with_evidence(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let ids = stack.create_orders("at-least-once", 3).await?;
    all_shipped(&stack, &ids).await?;
    ensure!(stack.evidence().await?.is_empty(), "nothing is broken yet");
    // Break two promises behind the services' backs: an acknowledgement
    // forgotten, a shipment lost.
    let order_db = stack.dbs.order_db().await?;
    sqlx::query("UPDATE orders SET status = 'accepted' WHERE id = $1")
        .bind(&ids[0])
        .execute(order_db.pool())
        .await?;
    let shipping_db = stack.dbs.shipping_db().await?;
    sqlx::query("DELETE FROM shipments WHERE order_id = $1")
        .bind(&ids[1])
        .execute(shipping_db.pool())
        .await?;
    let inv = stack.audit(Some("at-least-once")).await?;
    ensure!(inv.unacknowledged == 1 && inv.lost == 1, "{inv:?}");
    let evidence = stack.evidence().await?;
    eprintln!("{}", evidence.join("\n"));
    ensure!(evidence.len() == 2, "{evidence:#?}");
    let of = |id: &str| evidence.iter().find(|s| s.contains(id)).cloned();
    let unacked = of(&ids[0]).unwrap_or_default();
    for part in [
        "status accepted",
        "outbox create-shipment: delivered after 1 attempts",
        ": shipped (created +",
        "outbox shipped-report: delivered",
    ] {
        ensure!(unacked.contains(part), "{part:?} missing from:\n{unacked}");
    }
    let lost = of(&ids[1]).unwrap_or_default();
    ensure!(
        lost.contains("status shipped") && !lost.contains("    shipment "),
        "{lost}"
    );
    ensure!(of(&ids[2]).is_none(), "a healthy order is not evidence");
    stack.shutdown().await
}

both_backends!(
    broken_orders_come_with_evidence,
    outage_then_recovery,
    lost_responses_duplicate_at_least_once,
    dead_letters_over_the_admin_api,
    admin_is_off_without_a_token,
    faults_over_the_admin_api,
);
