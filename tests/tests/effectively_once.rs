//! Idempotency keys in the services and the effectively-once mode, on SQLite
//! and on Postgres: seeded faults on both paths, an external client retrying
//! `POST /orders`, duplicates racing, and replay after a restart.

use std::time::Duration;

use anyhow::ensure;
use serde_json::{json, Value};
use tests::{both_backends, eventually, sample_order, Stack, StackOptions, TestBackend};

const SETTLE: Duration = Duration::from_secs(40);

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_string()
}

/// Requests dropped before they reach the peer and responses lost after the
/// peer acted, on both paths (order → shipping, shipping → order), seeded:
/// every order is shipped exactly once and acknowledged, counted from both
/// databases.
async fn effectively_once_under_seeded_faults(backend: TestBackend) -> anyhow::Result<()> {
    let seed: u64 = 20261122;
    eprintln!("fault seed {seed}");
    let stack = Stack::start(
        backend,
        StackOptions {
            order: |c| {
                c.delivery.fault_drop_request = 0.1;
                c.delivery.fault_drop_response = 0.2;
                c.delivery.fault_seed = 20261122;
            },
            shipping: |c| {
                c.delivery.fault_drop_request = 0.1;
                c.delivery.fault_drop_response = 0.2;
                c.delivery.fault_seed = 20261123;
            },
            ..Default::default()
        },
    )
    .await?;
    let mut ids = Vec::new();
    for _ in 0..25 {
        ids.push(id_of(&stack.create_order("effectively-once").await?));
    }
    let shipped = eventually(SETTLE, "every order shipped", || async {
        for id in &ids {
            if stack.order(id).await?["status"] != "shipped" {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await;
    if let Err(e) = shipped {
        let inv = stack.audit(Some("effectively-once")).await?;
        let order_outbox = stack.order_admin("/admin/outbox").await?;
        let shipping = resilience::outbox::Outbox::new(stack.dbs.shipping_db().await?);
        let shipping_outbox = shipping.stats().await?;
        let shipping_dead = shipping.dead_letters(5).await?;
        let mut stuck = Vec::new();
        for id in &ids {
            let o = stack.order(id).await?;
            if o["status"] != "shipped" {
                stuck.push(o);
            }
        }
        anyhow::bail!("seed {seed}: {e}\n{inv:?}\norder outbox: {order_outbox}\nshipping outbox: {shipping_outbox:?}\n{shipping_dead:?}\nstuck: {stuck:#?}");
    }
    // The shipped reports go through shipping's outbox, and an order ships
    // on the first send that reached shipping while the sends whose
    // responses were lost are retried later: wait until both outboxes are
    // empty, so a late duplicate would be counted.
    let shipping_db = stack.dbs.shipping_db().await?;
    let order_db = stack.dbs.order_db().await?;
    eventually(SETTLE, "both outboxes drained", || async {
        let shipping = resilience::outbox::Outbox::new(shipping_db.clone())
            .stats()
            .await?;
        let order = resilience::outbox::Outbox::new(order_db.clone())
            .stats()
            .await?;
        Ok((shipping.pending == 0 && order.pending == 0).then_some(()))
    })
    .await?;
    let inv = stack.audit(Some("effectively-once")).await?;
    ensure!(
        inv.orders == 25
            && inv.shipments == 25
            && inv.lost == 0
            && inv.duplicated == 0
            && inv.unacknowledged == 0,
        "seed {seed}: {inv:?}"
    );
    // The faults really fired: more attempts than messages.
    ensure!(inv.attempts > 25, "seed {seed}: no retries at all: {inv:?}");
    stack.shutdown().await
}

async fn post_order_with_key(
    stack: &Stack,
    key: &str,
    body: &Value,
) -> anyhow::Result<reqwest::Response> {
    Ok(stack
        .http
        .post(format!("{}/orders", stack.order.url))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await?)
}

/// A curl user who retries `POST /orders` with the same key gets the first
/// answer back, marked as replayed, and one order exists; reusing the key for
/// another body is 422; a malformed key is 400 and writes nothing.
async fn external_client_key_on_post_orders(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let body = sample_order("effectively-once");
    let first = post_order_with_key(&stack, "checkout-42", &body).await?;
    ensure!(first.status() == 201, "{}", first.status());
    ensure!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers().get("location").cloned();
    let first: Value = first.json().await?;

    let again = post_order_with_key(&stack, "checkout-42", &body).await?;
    ensure!(again.status() == 201, "{}", again.status());
    ensure!(
        again
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true"),
        "{:?}",
        again.headers()
    );
    ensure!(again.headers().get("location") == location.as_ref());
    let again: Value = again.json().await?;
    ensure!(again == first, "replay differs: {again} vs {first}");

    let other = post_order_with_key(&stack, "checkout-42", &sample_order("at-least-once")).await?;
    ensure!(other.status() == 422, "{}", other.status());
    ensure!(other
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json"));

    for bad in ["", "caf\u{e9}", &"k".repeat(256)] {
        let res = stack
            .http
            .post(format!("{}/orders", stack.order.url))
            .header("idempotency-key", bad.as_bytes())
            .json(&body)
            .send()
            .await?;
        ensure!(res.status() == 400, "key {bad:?}: {}", res.status());
    }

    // Refused input does not use up a key: fixed and retried with the same
    // key, it creates the order.
    let invalid = json!({ "customer_id": "c-1", "items": [] });
    let res = post_order_with_key(&stack, "checkout-43", &invalid).await?;
    ensure!(res.status() == 422, "{}", res.status());
    let res = post_order_with_key(&stack, "checkout-43", &body).await?;
    ensure!(
        res.status() == 201 && res.headers().get("idempotent-replayed").is_none(),
        "{} {:?}",
        res.status(),
        res.headers()
    );

    // Without a key, each POST is a new order.
    stack.create_order("effectively-once").await?;
    let id = id_of(&first);
    eventually(SETTLE, "the keyed order shipped", || async {
        Ok((stack.order(&id).await?["status"] == "shipped").then_some(()))
    })
    .await?;
    let inv = stack.audit(Some("effectively-once")).await?;
    ensure!(inv.orders == 3, "{inv:?}");
    ensure!(stack.shipments_of(&id).await?.len() == 1);
    stack.shutdown().await
}

async fn post_shipment(
    stack: &Stack,
    key: &str,
    order_id: &str,
) -> anyhow::Result<reqwest::Response> {
    stack
        .send_signed(
            stack
                .http
                .post(format!("{}/shipments", stack.shipping_url))
                .header("idempotency-key", key)
                .header("x-client-id", "order-service")
                .json(&json!({
                    "order_id": order_id,
                    "items": [{ "sku": "SKU-1", "quantity": 1 }],
                    "delivery_mode": "effectively-once",
                })),
        )
        .await
}

/// Two identical keyed requests at once: exactly one shipment. On Postgres
/// the loser is answered 409 (in flight) or a replay; on SQLite it waits for
/// the write lock and replays.
async fn concurrent_duplicates_make_one_shipment(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    for round in 0..5 {
        let order_id = uuid::Uuid::now_v7().to_string();
        let key = format!("race-{round}");
        let (a, b) = tokio::join!(
            post_shipment(&stack, &key, &order_id),
            post_shipment(&stack, &key, &order_id)
        );
        let statuses = [a?.status().as_u16(), b?.status().as_u16()];
        ensure!(
            statuses.contains(&201) && statuses.iter().all(|s| *s == 201 || *s == 409),
            "round {round}: {statuses:?}"
        );
        let shipments = stack.shipments_of(&order_id).await?;
        ensure!(shipments.len() == 1, "round {round}: {shipments:?}");
    }
    stack.shutdown().await
}

/// The record lives in the database: after shipping-service restarts, the
/// same key is still answered with the stored response.
async fn replay_survives_a_restart(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = Stack::start(backend, StackOptions::default()).await?;
    let order_id = uuid::Uuid::now_v7().to_string();
    let first = post_shipment(&stack, "restart-1", &order_id).await?;
    ensure!(first.status() == 201);
    let first: Value = first.json().await?;

    stack.stop_shipping().await?;
    stack.start_shipping().await?;

    let again = post_shipment(&stack, "restart-1", &order_id).await?;
    ensure!(again.status() == 201, "{}", again.status());
    ensure!(again
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true"));
    let again: Value = again.json().await?;
    ensure!(again["id"] == first["id"], "{again} vs {first}");
    ensure!(stack.shipments_of(&order_id).await?.len() == 1);
    // Another caller's identical key is its own record: a second shipment.
    let res = stack
        .send_signed(
            stack
                .http
                .post(format!("{}/shipments", stack.shipping_url))
                .header("idempotency-key", "restart-1")
                .header("x-client-id", "someone-else")
                .json(&json!({
                    "order_id": order_id,
                    "items": [{ "sku": "SKU-1", "quantity": 1 }],
                    "delivery_mode": "effectively-once",
                })),
        )
        .await?;
    ensure!(res.status() == 201);
    ensure!(res.headers().get("idempotent-replayed").is_none());
    ensure!(stack.shipments_of(&order_id).await?.len() == 2);
    stack.shutdown().await
}

/// The shipment-report callback with a key: a repeat is replayed, not
/// re-applied, and an unknown order's 404 is recorded like any answer.
async fn shipment_report_with_key_is_replayed(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    // at-most-once with shipping down: the order stays pending, so only the
    // reports below move it.
    let id = id_of(
        &stack
            .post_order(&sample_order("at-most-once"))
            .await?
            .json()
            .await?,
    );
    let sid = uuid::Uuid::new_v4().to_string();
    let report = |key: &'static str, status: &'static str| {
        stack.send_signed(
            stack
                .http
                .post(format!("{}/orders/{id}/shipment-events", stack.order.url))
                .header("idempotency-key", key)
                .header("x-client-id", "shipping-service")
                .json(&json!({ "shipment_id": sid, "status": status })),
        )
    };
    let res = report("ev-1", "shipped").await?;
    ensure!(res.status() == 200, "{}", res.status());
    let shipped_at = stack.order(&id).await?["shipped_at"].clone();
    let res = report("ev-1", "shipped").await?;
    ensure!(res.status() == 200);
    ensure!(res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true"));
    ensure!(stack.order(&id).await?["shipped_at"] == shipped_at);
    // Same key, different report: 422, nothing applied.
    let res = report("ev-1", "accepted").await?;
    ensure!(res.status() == 422, "{}", res.status());
    stack.shutdown().await
}

both_backends!(
    effectively_once_under_seeded_faults,
    external_client_key_on_post_orders,
    concurrent_duplicates_make_one_shipment,
    replay_survives_a_restart,
    shipment_report_with_key_is_replayed,
);
