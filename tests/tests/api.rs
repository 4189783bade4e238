//! The HTTP API of both services, end to end, on SQLite and on Postgres.

use std::time::Duration;

use anyhow::ensure;
use serde_json::{json, Value};
use tests::{
    audit::audit, both_backends, eventually, expect_problem, sample_order, Stack, StackOptions,
    TestBackend,
};

const SETTLE: Duration = Duration::from_secs(15);

async fn happy_path(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let res = stack.post_order(&sample_order("at-most-once")).await?;
    ensure!(res.status() == 201, "status {}", res.status());
    let location = res
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let order: Value = res.json().await?;
    let id = order["id"].as_str().unwrap_or_default().to_string();
    ensure!(
        location.as_deref() == Some(format!("/orders/{id}").as_str()),
        "location {location:?}"
    );
    // The answer shows the order as committed; the single at-most-once call
    // is made right after the commit, before the answer is sent.
    ensure!(
        order["status"] == "pending",
        "the answer to create: {order}"
    );
    let order = stack.order(&id).await?;
    ensure!(order["status"] == "accepted", "after create: {order}");
    ensure!(order["send_attempts"] == 1);

    let shipped = eventually(SETTLE, "order shipped", || async {
        let o = stack.order(&id).await?;
        Ok((o["status"] == "shipped").then_some(o))
    })
    .await?;
    ensure!(shipped["shipped_at"].is_string());
    let shipments = stack.shipments_of(&id).await?;
    ensure!(shipments.len() == 1, "{shipments:?}");
    ensure!(shipments[0]["status"] == "shipped");
    ensure!(shipped["shipment_id"] == shipments[0]["id"]);
    let sid = shipments[0]["id"].as_str().unwrap_or_default();
    let one: Value = stack
        .get_shipping_path(&format!("/shipments/{sid}"))
        .await?
        .json()
        .await?;
    ensure!(one["order_id"] == id.as_str());

    let inv = audit(
        &stack.dbs.order_db().await?,
        &stack.dbs.shipping_db().await?,
        None,
    )
    .await?;
    ensure!(
        inv.orders == 1
            && inv.shipments == 1
            && inv.lost == 0
            && inv.duplicated == 0
            && inv.unacknowledged == 0,
        "{inv:?}"
    );
    stack.shutdown().await
}

async fn health_endpoints(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    for path in ["/healthz", "/readyz"] {
        ensure!(
            stack.get_order_path(path).await?.status() == 200,
            "order {path}"
        );
        ensure!(
            stack.get_shipping_path(path).await?.status() == 200,
            "shipping {path}"
        );
    }
    stack.shutdown().await
}

async fn order_count(stack: &Stack) -> anyhow::Result<i64> {
    let db = stack.dbs.order_db().await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(db.pool())
        .await?;
    Ok(n)
}

async fn shipment_count(stack: &Stack) -> anyhow::Result<i64> {
    let db = stack.dbs.shipping_db().await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shipments")
        .fetch_one(db.pool())
        .await?;
    Ok(n)
}

async fn bad_input_is_rejected_and_writes_nothing(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let http = &stack.http;
    let orders = format!("{}/orders", stack.order.url);
    let shipments = format!("{}/shipments", stack.shipping_url);
    for base in [&orders, &shipments] {
        // (POST /shipments is for order-service only: these are signed, so
        // that they reach the handler's own checks.)
        // malformed JSON
        let req = http
            .post(base)
            .header("content-type", "application/json")
            .body("{not json");
        expect_problem(stack.send_signed(req).await?, 400).await?;
        // wrong content type
        let req = http
            .post(base)
            .header("content-type", "text/plain")
            .body("{}");
        expect_problem(stack.send_signed(req).await?, 415).await?;
        // missing content type
        let req = http.post(base).body("{}");
        expect_problem(stack.send_signed(req).await?, 415).await?;
        // oversized body
        let big = json!({ "customer_id": "x".repeat(100_000), "items": [] });
        let req = http.post(base).json(&big);
        expect_problem(stack.send_signed(req).await?, 413).await?;
        // wrong shape
        let req = http.post(base).json(&json!([1, 2]));
        expect_problem(stack.send_signed(req).await?, 422).await?;
        // unknown path
        let res = http.get(format!("{base}/x/y/z")).send().await?;
        expect_problem(res, 404).await?;
        // wrong method
        let res = http.delete(base).send().await?;
        expect_problem(res, 405).await?;
        // invalid id
        let res = http.get(format!("{base}/not-a-uuid")).send().await?;
        expect_problem(res, 400).await?;
        // unknown id
        let res = http
            .get(format!("{base}/{}", uuid::Uuid::new_v4()))
            .send()
            .await?;
        expect_problem(res, 404).await?;
        // bad query strings
        for q in [
            "limit=0",
            "limit=1000",
            "limit=abc",
            "cursor=%%%",
            "cursor=bm9wZQ",
            "bogus=1",
        ] {
            let res = http.get(format!("{base}?{q}")).send().await?;
            expect_problem(res, 400)
                .await
                .map_err(|e| e.context(format!("{base}?{q}")))?;
        }
    }
    let bad_orders = [
        json!({ "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [] }),
        json!({ "customer_id": "c" }),
        json!({ "customer_id": "c", "items": [{ "sku": "A", "quantity": 0 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A", "quantity": -2 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A", "quantity": 1.5 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A", "quantity": 1 }], "delivery_mode": "twice" }),
        json!({ "customer_id": "c", "items": [{ "sku": "A", "quantity": 1 }], "surprise": true }),
        json!({ "customer_id": 7, "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A", "quantity": 1, "x": 1 }] }),
    ];
    for body in &bad_orders {
        let res = stack.post_order(body).await?;
        expect_problem(res, 422)
            .await
            .map_err(|e| e.context(body.to_string()))?;
    }
    let bad_shipments = [
        json!({ "order_id": "nope", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "order_id": uuid::Uuid::new_v4(), "items": [] }),
        json!({ "order_id": uuid::Uuid::new_v4(), "items": [{ "sku": "A", "quantity": 0 }] }),
        json!({ "order_id": uuid::Uuid::new_v4(), "items": [{ "sku": "A", "quantity": 1, "x": 1 }] }),
    ];
    for body in &bad_shipments {
        let res = stack.send_signed(http.post(&shipments).json(body)).await?;
        expect_problem(res, 422)
            .await
            .map_err(|e| e.context(body.to_string()))?;
    }
    // shipment events: invalid id, unknown order, bad bodies
    let sid = uuid::Uuid::new_v4().to_string();
    let ev = json!({ "shipment_id": sid, "status": "shipped" });
    expect_problem(stack.post_event("not-a-uuid", &ev).await?, 400).await?;
    expect_problem(
        stack
            .post_event(&uuid::Uuid::new_v4().to_string(), &ev)
            .await?,
        404,
    )
    .await?;
    ensure!(order_count(&stack).await? == 0, "bad input wrote orders");
    ensure!(
        shipment_count(&stack).await? == 0,
        "bad input wrote shipments"
    );

    let order = stack.create_order("at-most-once").await?;
    let id = order["id"].as_str().unwrap_or_default();
    for body in [
        json!({ "shipment_id": sid, "status": "lost" }),
        json!({ "shipment_id": sid, "status": "pending" }),
        json!({ "shipment_id": "", "status": "shipped" }),
        json!({ "shipment_id": "s1", "status": "shipped" }),
        json!({ "shipment_id": sid, "status": "shipped", "extra": 1 }),
        json!({ "status": "shipped" }),
    ] {
        expect_problem(stack.post_event(id, &body).await?, 422)
            .await
            .map_err(|e| e.context(body.to_string()))?;
    }
    stack.shutdown().await
}

async fn pagination(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    let ids = stack.create_orders("at-most-once", 7).await?;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/orders?status=pending&limit=3&cursor={c}"),
            None => "/orders?status=pending&limit=3".to_string(),
        };
        let page: Value = stack.get_order_path(&path).await?.json().await?;
        pages += 1;
        for o in page["orders"].as_array().cloned().unwrap_or_default() {
            seen.push(o["id"].as_str().unwrap_or_default().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        ensure!(pages < 10, "pagination does not end");
    }
    ensure!(pages == 3, "pages {pages}");
    ensure!(
        seen == ids,
        "pages must list every order once, oldest first"
    );
    let page: Value = stack
        .get_order_path("/orders?status=shipped")
        .await?
        .json()
        .await?;
    ensure!(page["orders"].as_array().map(Vec::len) == Some(0));
    ensure!(page["next_cursor"].is_null());
    stack.shutdown().await
}

async fn status_machine_over_http(backend: TestBackend) -> anyhow::Result<()> {
    // Shipping down: the order stays pending, so events drive it alone.
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    let order = stack.create_order("at-most-once").await?;
    let id = order["id"].as_str().unwrap_or_default();
    ensure!(order["status"] == "pending");

    let sid = uuid::Uuid::new_v4().to_string();
    let accepted = json!({ "shipment_id": sid, "status": "accepted" });
    let shipped = json!({ "shipment_id": sid, "status": "shipped" });
    let res = stack.post_event(id, &accepted).await?;
    ensure!(res.status() == 200);
    ensure!(res.json::<Value>().await?["status"] == "accepted");
    let res = stack.post_event(id, &shipped).await?;
    ensure!(res.status() == 200);
    let first: Value = res.json().await?;
    ensure!(first["status"] == "shipped");

    // A repeated report changes nothing.
    let res = stack.post_event(id, &shipped).await?;
    ensure!(res.status() == 200);
    let again: Value = res.json().await?;
    ensure!(
        again == first,
        "repeated report changed the order: {first} vs {again}"
    );

    // Backwards is illegal and changes nothing.
    let res = stack.post_event(id, &accepted).await?;
    let problem = expect_problem(res, 409).await?;
    ensure!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("shipped"),
        "{problem}"
    );
    ensure!(stack.order(id).await? == first);
    stack.shutdown().await
}

async fn at_most_once_loses_when_shipping_is_down(backend: TestBackend) -> anyhow::Result<()> {
    let mut stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    let order = stack.create_order("at-most-once").await?;
    let id = order["id"].as_str().unwrap_or_default().to_string();
    let order = stack.order(&id).await?;
    ensure!(order["status"] == "pending", "{order}");
    ensure!(order["send_attempts"] == 1);
    ensure!(
        order["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{order}"
    );

    // Shipping comes back: nothing is ever sent again.
    stack.start_shipping().await?;
    let other = stack.create_order("at-most-once").await?;
    let other_id = other["id"].as_str().unwrap_or_default().to_string();
    eventually(SETTLE, "the second order shipped", || async {
        Ok((stack.order(&other_id).await?["status"] == "shipped").then_some(()))
    })
    .await?;
    let o = stack.order(&id).await?;
    ensure!(
        o["status"] == "pending" && o["send_attempts"] == 1,
        "lost order moved: {o}"
    );
    ensure!(stack.shipments_of(&id).await?.is_empty());
    let inv = audit(
        &stack.dbs.order_db().await?,
        &stack.dbs.shipping_db().await?,
        Some("at-most-once"),
    )
    .await?;
    ensure!(
        inv.orders == 2 && inv.lost == 1 && inv.duplicated == 0,
        "{inv:?}"
    );
    stack.shutdown().await
}

both_backends!(
    happy_path,
    health_endpoints,
    bad_input_is_rejected_and_writes_nothing,
    pagination,
    status_machine_over_http,
    at_most_once_loses_when_shipping_is_down,
);
