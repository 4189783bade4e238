//! Service-to-service calls are signed: `POST /shipments` and the
//! shipment-events callback refuse unsigned, mis-signed, stale and replayed
//! requests with 401 before any database work, and a report is accepted only
//! for the order's own shipment.

use anyhow::ensure;
use order_service::domain::OrderId;
use order_service::store::OrderStore;
use serde_json::{json, Value};
use tests::{both_backends, signer, Stack, StackOptions, TestBackend};

/// What can be done to a request after (or instead of) signing it.
#[derive(Debug, Clone, Copy)]
enum Forgery {
    /// No signature headers at all.
    Unsigned,
    /// Signed with a secret the services do not know.
    WrongSecret,
    /// A valid signature, but over another body.
    OtherBody,
    /// A valid signature, made 10 minutes ago (the window is 5).
    Stale,
    /// A valid signature whose hex was altered.
    Tampered,
}

const FORGERIES: [Forgery; 5] = [
    Forgery::Unsigned,
    Forgery::WrongSecret,
    Forgery::OtherBody,
    Forgery::Stale,
    Forgery::Tampered,
];

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A POST of `body` to `url`, forged as `how`.
fn forged(
    stack: &Stack,
    url: &str,
    body: &Value,
    how: Forgery,
) -> anyhow::Result<reqwest::Request> {
    let mut req = stack.http.post(url).json(body).build()?;
    let uri: http::Uri = req.url().as_str().parse()?;
    let bytes = serde_json::to_vec(body)?;
    let (method, headers) = (req.method().clone(), req.headers_mut());
    match how {
        Forgery::Unsigned => {}
        Forgery::WrongSecret => {
            resilience::signing::Signer::new("not-the-shared-secret-at-all".into())?
                .sign(&method, &uri, headers, &bytes)
        }
        Forgery::OtherBody => {
            let other = serde_json::to_vec(&json!({ "something": "else" }))?;
            signer().sign(&method, &uri, headers, &other)
        }
        Forgery::Stale => signer().sign_with(&method, &uri, headers, &bytes, now() - 600, &nonce()),
        Forgery::Tampered => {
            signer().sign(&method, &uri, headers, &bytes);
            let sig = headers["x-service-signature"].to_str()?.to_string();
            let last = if sig.ends_with('0') { "1" } else { "0" };
            let altered = format!("{}{last}", &sig[..sig.len() - 1]);
            headers.insert("x-service-signature", altered.parse()?);
        }
    }
    Ok(req)
}

/// Asserts a 401 problem+json with the scheme's challenge.
async fn expect_401(res: reqwest::Response, what: &str) -> anyhow::Result<()> {
    ensure!(
        res.status() == 401,
        "{what}: expected 401, got {}",
        res.status()
    );
    let challenge = res
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(
        challenge.starts_with("Service-HMAC-SHA256"),
        "{what}: WWW-Authenticate {challenge:?}"
    );
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(
        ct == "application/problem+json",
        "{what}: content-type {ct:?}"
    );
    let body: Value = res.json().await?;
    ensure!(body["status"] == 401, "{what}: {body}");
    Ok(())
}

async fn shipment_count(stack: &Stack) -> anyhow::Result<i64> {
    let db = stack.dbs.shipping_db().await?;
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM shipments")
        .fetch_one(db.pool())
        .await?)
}

async fn idempotency_rows(db: &resilience::store::Db) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_keys")
        .fetch_one(db.pool())
        .await?)
}

fn shipment_body() -> Value {
    json!({
        "order_id": uuid::Uuid::now_v7(),
        "items": [{ "sku": "SKU-1", "quantity": 1 }],
        "delivery_mode": "effectively-once",
    })
}

/// `POST /shipments` from anyone but order-service: 401, nothing created,
/// not even an idempotency record; a signed one works once, and its replay
/// is refused.
async fn unsigned_shipment_requests_are_refused(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let url = format!("{}/shipments", stack.shipping_url);
    let body = shipment_body();
    for how in FORGERIES {
        let mut req = forged(&stack, &url, &body, how)?;
        req.headers_mut()
            .insert("idempotency-key", format!("k-{how:?}").parse()?);
        expect_401(stack.http.execute(req).await?, &format!("{how:?}")).await?;
    }
    ensure!(
        shipment_count(&stack).await? == 0,
        "a refused request created a shipment"
    );
    let shipping_db = stack.dbs.shipping_db().await?;
    ensure!(
        idempotency_rows(&shipping_db).await? == 0,
        "a refused request reached the idempotency layer"
    );

    // Genuine: 201. The very same bytes again: a replay, 401.
    let req = stack.http.post(&url).json(&body).build()?;
    let mut req = req;
    let uri: http::Uri = req.url().as_str().parse()?;
    signer().sign(
        &http::Method::POST,
        &uri,
        req.headers_mut(),
        &serde_json::to_vec(&body)?,
    );
    let replay = req.try_clone().ok_or_else(|| anyhow::anyhow!("clone"))?;
    let res = stack.http.execute(req).await?;
    ensure!(res.status() == 201, "signed request: {}", res.status());
    expect_401(stack.http.execute(replay).await?, "replay").await?;
    ensure!(shipment_count(&stack).await? == 1);

    // A signed request whose idempotency key was swapped after signing.
    let mut req = stack
        .http
        .post(&url)
        .header("idempotency-key", "signed-key")
        .json(&body)
        .build()?;
    signer().sign(
        &http::Method::POST,
        &uri,
        req.headers_mut(),
        &serde_json::to_vec(&body)?,
    );
    req.headers_mut()
        .insert("idempotency-key", "another-key".parse()?);
    expect_401(stack.http.execute(req).await?, "swapped key").await?;
    ensure!(shipment_count(&stack).await? == 1);
    stack.shutdown().await
}

/// The callback refuses forged reports, and the order stays as it was.
async fn forged_reports_are_refused(backend: TestBackend) -> anyhow::Result<()> {
    // Shipping down: the order stays pending, so only the reports here can move it.
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    let order = stack.create_order("at-most-once").await?;
    let id = order["id"].as_str().unwrap_or_default().to_string();
    let before = stack.order(&id).await?;
    let url = format!("{}/orders/{id}/shipment-events", stack.order.url);
    let report = json!({ "shipment_id": uuid::Uuid::new_v4(), "status": "shipped" });
    for how in FORGERIES {
        let req = forged(&stack, &url, &report, how)?;
        expect_401(stack.http.execute(req).await?, &format!("{how:?}")).await?;
    }
    let after = stack.order(&id).await?;
    ensure!(
        after == before,
        "a forged report changed the order: {before} vs {after}"
    );
    ensure!(after["status"] == "pending" && after["shipment_id"].is_null());

    // A genuine report is applied once; replaying its bytes is refused.
    let mut req = stack.http.post(&url).json(&report).build()?;
    let uri: http::Uri = req.url().as_str().parse()?;
    signer().sign(
        &http::Method::POST,
        &uri,
        req.headers_mut(),
        &serde_json::to_vec(&report)?,
    );
    let replay = req.try_clone().ok_or_else(|| anyhow::anyhow!("clone"))?;
    let res = stack.http.execute(req).await?;
    ensure!(res.status() == 200, "signed report: {}", res.status());
    let shipped = stack.order(&id).await?;
    ensure!(shipped["status"] == "shipped" && shipped["shipment_id"] == report["shipment_id"]);
    expect_401(stack.http.execute(replay).await?, "replay").await?;
    ensure!(stack.order(&id).await? == shipped);
    stack.shutdown().await
}

/// A signed report about another shipment than the order's is refused with
/// 422 problem+json and changes nothing.
async fn report_for_another_shipment_is_refused(backend: TestBackend) -> anyhow::Result<()> {
    // Shipping up: the order is delivered and its real shipment recorded;
    // the warehouse waits long enough for the order to hold still meanwhile.
    let stack = Stack::start(
        backend,
        StackOptions {
            warehouse_delay: std::time::Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await?;
    let order = stack.create_order("effectively-once").await?;
    let id = order["id"].as_str().unwrap_or_default().to_string();
    let accepted = tests::eventually(std::time::Duration::from_secs(20), "acceptance", || async {
        let o = stack.order(&id).await?;
        Ok((!o["shipment_id"].is_null()).then_some(o))
    })
    .await?;
    let made_up = uuid::Uuid::new_v4().to_string();
    for status in ["accepted", "shipped"] {
        let res = stack
            .post_event(&id, &json!({ "shipment_id": made_up, "status": status }))
            .await?;
        ensure!(
            res.status() == 422,
            "made-up shipment ({status}): {}",
            res.status()
        );
        let problem: Value = res.json().await?;
        ensure!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains(&made_up),
            "{problem}"
        );
    }
    let now = stack.order(&id).await?;
    ensure!(
        now == accepted && now["status"] == "accepted",
        "a refused report changed the order: {accepted} vs {now}"
    );
    // The genuine shipment still ships the order.
    tests::eventually(std::time::Duration::from_secs(20), "shipped", || async {
        let o = stack.order(&id).await?;
        Ok((o["status"] == "shipped").then_some(()))
    })
    .await?;
    let shipped = stack.order(&id).await?;
    ensure!(shipped["shipment_id"] == accepted["shipment_id"]);
    let shipments = stack.shipments_of(&id).await?;
    ensure!(
        shipments.len() == 1 && shipments[0]["id"] == accepted["shipment_id"],
        "{shipments:?}"
    );
    let inv = stack.audit(Some("effectively-once")).await?;
    ensure!(
        inv.lost == 0 && inv.duplicated == 0 && inv.unacknowledged == 0,
        "{inv:?}"
    );
    stack.shutdown().await
}

/// The race: the report arrives before the acceptance (whose answer was
/// lost). The report's shipment is recorded; a later acceptance of another
/// shipment (an at-least-once duplicate) does not overwrite it, and a report
/// about that other shipment is refused.
async fn report_before_acceptance_binds_the_shipment(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..Default::default()
        },
    )
    .await?;
    let order = stack.create_order("at-most-once").await?;
    let id = order["id"].as_str().unwrap_or_default().to_string();
    let first = uuid::Uuid::new_v4().to_string();
    let second = uuid::Uuid::new_v4().to_string();
    let res = stack
        .post_event(&id, &json!({ "shipment_id": first, "status": "shipped" }))
        .await?;
    ensure!(res.status() == 200, "{}", res.status());

    // The acknowledgement of a duplicate shipment arrives late.
    let store = OrderStore::new(stack.dbs.order_db().await?);
    let oid: OrderId = id.parse().map_err(anyhow::Error::msg)?;
    let moved = store
        .record_accepted(
            &mut *store.db().pool().acquire().await?,
            oid,
            Some(&second),
            Some(2),
        )
        .await?;
    ensure!(!moved, "a late acceptance moved a shipped order");
    let o = stack.order(&id).await?;
    ensure!(o["status"] == "shipped" && o["shipment_id"] == first, "{o}");
    let res = stack
        .post_event(&id, &json!({ "shipment_id": second, "status": "shipped" }))
        .await?;
    ensure!(res.status() == 422, "{}", res.status());
    ensure!(stack.order(&id).await? == o);

    // An acceptance recorded without an id (its answer was unreadable): the
    // first report binds the order to its shipment, a different one is refused.
    let order = stack.create_order("at-most-once").await?;
    let id = order["id"].as_str().unwrap_or_default().to_string();
    let oid: OrderId = id.parse().map_err(anyhow::Error::msg)?;
    ensure!(
        store
            .record_accepted(&mut *store.db().pool().acquire().await?, oid, None, Some(1))
            .await?
    );
    let res = stack
        .post_event(&id, &json!({ "shipment_id": first, "status": "accepted" }))
        .await?;
    ensure!(res.status() == 200, "{}", res.status());
    let o = stack.order(&id).await?;
    ensure!(
        o["status"] == "accepted" && o["shipment_id"] == first,
        "{o}"
    );
    let res = stack
        .post_event(&id, &json!({ "shipment_id": second, "status": "shipped" }))
        .await?;
    ensure!(res.status() == 422, "{}", res.status());
    ensure!(stack.order(&id).await? == o);
    stack.shutdown().await
}

both_backends!(
    unsigned_shipment_requests_are_refused,
    forged_reports_are_refused,
    report_for_another_shipment_is_refused,
    report_before_acceptance_binds_the_shipment,
);

/// Neither service starts without `SERVICE_SECRET`, nor with one too short,
/// and it says why without printing the value.
#[tokio::test]
async fn services_refuse_to_start_without_a_secret() -> anyhow::Result<()> {
    for secret in [None, Some(""), Some("too-short")] {
        let mut oc = order_service::Config::defaults();
        oc.database_url = "sqlite::memory:".into();
        oc.delivery.service_secret = secret.map(Into::into);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let err = order_service::Application::build_with_listener(oc, listener)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("order-service started with secret {secret:?}"))?;
        let text = format!("{err:#}");
        ensure!(text.contains("SERVICE_SECRET"), "{text}");
        ensure!(
            !secret.is_some_and(|s| !s.is_empty() && text.contains(s)),
            "{text}"
        );

        let mut sc = shipping_service::Config::defaults();
        sc.database_url = "sqlite::memory:".into();
        sc.delivery.service_secret = secret.map(Into::into);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let err = shipping_service::Application::build_with_listener(sc, listener)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("shipping-service started with secret {secret:?}"))?;
        ensure!(format!("{err:#}").contains("SERVICE_SECRET"), "{err:#}");
    }
    Ok(())
}
