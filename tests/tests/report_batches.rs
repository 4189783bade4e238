//! Shipment reports that arrive in one batch (`POST /batch` on
//! order-service, as shipping's relay sends them) are judged on the orders
//! the batch read once, and their changes go with the batch's records. The
//! answers and the rows must be exactly what the reports would have made
//! one by one: each answer is compared with the order as read back from the
//! database afterwards, field by field.

use anyhow::{ensure, Context};
use base64::Engine as _;
use http::{HeaderMap, Method};
use serde_json::{json, Value};
use tests::{both_backends, signer, Stack, StackOptions, TestBackend};

/// One signed sub-request reporting `status` of `shipment` for `order`.
fn report(order: &str, status: &str, shipment: &str, key: &str) -> anyhow::Result<Value> {
    let path = format!("/orders/{order}/shipment-events");
    let body = json!({ "shipment_id": shipment, "status": status }).to_string();
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse()?);
    headers.insert("idempotency-key", key.parse()?);
    signer().sign(&Method::POST, &path.parse()?, &mut headers, body.as_bytes());
    let pairs: Vec<[String; 2]> = headers
        .iter()
        .map(|(k, v)| Ok([k.as_str().to_owned(), v.to_str()?.to_owned()]))
        .collect::<anyhow::Result<_>>()?;
    Ok(json!({
        "method": "POST",
        "path": path,
        "headers": pairs,
        "body": base64::engine::general_purpose::STANDARD.encode(body),
    }))
}

/// Sends `requests` as one batch; each answer's status and JSON body.
async fn batch(stack: &Stack, requests: Vec<Value>) -> anyhow::Result<Vec<(u16, Value)>> {
    let res = stack
        .http
        .post(format!("{}/batch", stack.order.url))
        .json(&json!({ "requests": requests }))
        .send()
        .await?;
    ensure!(res.status() == 200, "batch: {}", res.status());
    let body: Value = res.json().await?;
    let answers = body["responses"]
        .as_array()
        .context("no responses in the batch's answer")?;
    answers
        .iter()
        .map(|a| {
            let status = a["status"].as_u64().context("no status")? as u16;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a["body"].as_str().context("no body")?)?;
            Ok((status, serde_json::from_slice(&raw).unwrap_or(Value::Null)))
        })
        .collect()
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn reports_in_a_batch_match_the_rows(backend: TestBackend) -> anyhow::Result<()> {
    // No shipping-service: orders stay pending until the tests report on them.
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            ..StackOptions::default()
        },
    )
    .await?;
    let ids = stack.create_orders("effectively-once", 6).await?;
    let (a, b, c, d, e, f) = (&ids[0], &ids[1], &ids[2], &ids[3], &ids[4], &ids[5]);
    let (sa, sb, sc, sd, se, sf) = (uuid(), uuid(), uuid(), uuid(), uuid(), uuid());
    // D is accepted with its shipment before the batch.
    let pre = stack
        .post_event(d, &json!({ "shipment_id": sd, "status": "accepted" }))
        .await?;
    ensure!(pre.status() == 200, "accepting D: {}", pre.status());

    // 1. Every report applies: each answer is the order as it is stored.
    let answers = batch(
        &stack,
        vec![
            report(a, "shipped", &sa, &uuid())?,
            // A repeat under another key changes nothing, and says so.
            report(a, "shipped", &sa, &uuid())?,
            report(b, "accepted", &sb, &uuid())?,
            report(d, "shipped", &sd, &uuid())?,
        ],
    )
    .await?;
    ensure!(
        answers.iter().all(|(s, _)| *s == 200),
        "answers: {answers:?}"
    );
    for ((_, answer), id) in answers.iter().zip([a, a, b, d]) {
        let row = stack.order(id).await?;
        ensure!(
            *answer == row,
            "the answer about {id} is not the stored order:\n{answer}\n{row}"
        );
    }
    let (a_row, b_row, d_row) = (
        stack.order(a).await?,
        stack.order(b).await?,
        stack.order(d).await?,
    );
    ensure!(a_row["status"] == "shipped" && a_row["shipment_id"] == sa.as_str());
    ensure!(!a_row["shipped_at"].is_null() && !a_row["accepted_at"].is_null());
    ensure!(b_row["status"] == "accepted" && b_row["shipped_at"].is_null());
    ensure!(d_row["status"] == "shipped" && d_row["shipment_id"] == sd.as_str());
    ensure!(
        d_row["accepted_at"] != d_row["shipped_at"],
        "D's acceptance time was overwritten: {d_row}"
    );

    // 2. One order moved twice in a batch (accepted, then shipped): the
    //    batch runs its requests one by one, with the same outcome.
    let answers = batch(
        &stack,
        vec![
            report(c, "accepted", &sc, &uuid())?,
            report(c, "shipped", &sc, &uuid())?,
            report(b, "shipped", &sb, &uuid())?,
        ],
    )
    .await?;
    ensure!(
        answers.iter().all(|(s, _)| *s == 200),
        "answers: {answers:?}"
    );
    ensure!(answers[0].1["status"] == "accepted" && answers[1].1["status"] == "shipped");
    ensure!(answers[1].1 == stack.order(c).await?);
    ensure!(answers[2].1 == stack.order(b).await?);
    ensure!(stack.order(b).await?["status"] == "shipped");

    // 3. Refusals in a batch: another shipment's report (422), a backwards
    //    move (409), an unknown order (404); the reports beside them still
    //    apply, and the refused ones change nothing.
    let before_d = stack.order(d).await?;
    let answers = batch(
        &stack,
        vec![
            report(e, "shipped", &se, &uuid())?,
            report(d, "shipped", &uuid(), &uuid())?,
            report(a, "accepted", &sa, &uuid())?,
            report(&uuid(), "shipped", &uuid(), &uuid())?,
            report(f, "accepted", &sf, &uuid())?,
        ],
    )
    .await?;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    ensure!(
        statuses == [200, 422, 409, 404, 200],
        "statuses: {statuses:?}"
    );
    ensure!(answers[0].1 == stack.order(e).await?);
    ensure!(answers[4].1 == stack.order(f).await?);
    ensure!(
        stack.order(d).await? == before_d,
        "a refused report changed D"
    );
    ensure!(stack.order(a).await?["status"] == "shipped");
    ensure!(stack.order(e).await?["status"] == "shipped");
    ensure!(stack.order(f).await?["status"] == "accepted");
    Ok(())
}

both_backends!(reports_in_a_batch_match_the_rows);
