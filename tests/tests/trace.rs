//! W3C trace context through every hop, across a SIGKILL: a `traceparent`
//! sent with `POST /orders` reaches shipping-service unchanged in trace id
//! (stored with the outbox message or the feed event, so the retry after the
//! crash still carries it), is stored with the shipment, shows in
//! shipping-service's log lines for that shipment, and comes back with the
//! shipped report (order-service's log line for the report has it).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use sqlx::Row;
use tests::{both_backends, sample_order, ProcessStack, TestBackend};

const EXE: &str = env!("CARGO_BIN_EXE_svc");
const SETTLE: Duration = Duration::from_secs(40);
const PARENT_ID: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// The JSON log lines of `path` that satisfy `pick`.
fn log_lines(path: &Path, pick: impl Fn(&Value) -> bool) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| pick(v))
        .collect()
}

/// The `trace_id` of a log line's spans (the innermost one that has one).
fn trace_id_of(line: &Value) -> Option<String> {
    let from_list = line["spans"].as_array().and_then(|spans| {
        spans
            .iter()
            .rev()
            .find_map(|s| s["trace_id"].as_str().map(str::to_owned))
    });
    from_list.or_else(|| line["span"]["trace_id"].as_str().map(str::to_owned))
}

/// One order in `mode`, sent with a `traceparent` while shipping-service is
/// down; order-service is SIGKILLed after the 201 (its relay off, so nothing
/// left before the kill), restarted with the relay on, retries against the
/// dead shipping-service for a while, then shipping-service starts.
async fn trace_survives_a_crash(backend: TestBackend, mode: &str) -> anyhow::Result<()> {
    let push = !mode.starts_with("pull");
    let order_args: &[&str] = if push {
        &["--relay-enabled", "false"]
    } else {
        &[]
    };
    let mut stack = ProcessStack::start(EXE, backend, order_args, &[]).await?;
    stack.cluster.shipping.kill().await?;

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-{PARENT_ID}-01");
    let res = stack
        .cluster
        .http
        .post(format!("{}/orders", stack.cluster.order.url()))
        .header("traceparent", &traceparent)
        .header("tracestate", TRACESTATE)
        .json(&sample_order(mode))
        .send()
        .await?;
    ensure!(res.status() == 201, "create order: {}", res.status());
    let order: Value = res.json().await?;
    let order_id = order["id"].as_str().context("order id")?.to_owned();

    // The context is durable with what is to be sent.
    if push {
        let db = stack.dbs.order_db().await?;
        let headers: String =
            sqlx::query_scalar("SELECT headers FROM outbox WHERE correlation_id = $1")
                .bind(&order_id)
                .fetch_one(db.pool())
                .await?;
        ensure!(
            headers.contains(&trace_id),
            "the outbox message stores the trace: {headers}"
        );
    }

    stack.cluster.order.kill().await?;
    if push {
        stack.cluster.order.set_flag("--relay-enabled", "true");
    }
    stack.cluster.order.start(&stack.cluster.http).await?;
    // A few attempts (or feed polls) meet the dead shipping-service.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.cluster.shipping.start(&stack.cluster.http).await?;
    let order_url = format!("{}/orders/{order_id}", stack.cluster.order.url());
    tests::eventually(SETTLE, "the order shipped", || async {
        let o: Value = stack
            .cluster
            .http
            .get(&order_url)
            .send()
            .await?
            .json()
            .await?;
        Ok((o["status"] == "shipped").then_some(()))
    })
    .await?;
    let inv = stack.settled(mode, SETTLE).await?;
    ensure!(
        inv.orders == 1 && inv.shipments == 1 && inv.lost == 0 && inv.unacknowledged == 0,
        "{mode}: {inv:?}"
    );

    // The shipment stores the order's trace (a span of its own as parent).
    let db = stack.dbs.shipping_db().await?;
    let row = sqlx::query(
        "SELECT id, status, traceparent, tracestate FROM shipments WHERE order_id = $1",
    )
    .bind(&order_id)
    .fetch_one(db.pool())
    .await?;
    let shipment_id: String = row.try_get("id")?;
    let stored: Option<String> = row.try_get("traceparent")?;
    let state: Option<String> = row.try_get("tracestate")?;
    let stored = stored.context("the shipment has no stored traceparent")?;
    let parsed = resilience::trace::TraceParent::parse(&stored, None)
        .with_context(|| format!("stored traceparent {stored:?} is not valid"))?;
    ensure!(
        parsed.trace_id == trace_id,
        "{mode}: stored {stored}, sent {traceparent}"
    );
    ensure!(parsed.parent_id != PARENT_ID, "a span of its own as parent");
    ensure!(
        state.as_deref() == Some(TRACESTATE),
        "tracestate: {state:?}"
    );

    // shipping-service's log lines about the shipment carry the trace id.
    let shipping_log = stack.cluster.shipping.log_path().to_path_buf();
    let about_shipment = log_lines(&shipping_log, |v| {
        v["fields"]["shipment_id"].as_str() == Some(shipment_id.as_str())
    });
    ensure!(
        !about_shipment.is_empty(),
        "no shipping log line for shipment {shipment_id}"
    );
    for line in &about_shipment {
        ensure!(
            trace_id_of(line).as_deref() == Some(trace_id.as_str()),
            "{mode}: shipping log line without the trace: {line}"
        );
    }
    ensure!(
        about_shipment
            .iter()
            .any(|l| l["fields"]["message"] == "shipment shipped"),
        "no 'shipment shipped' line: {about_shipment:?}\n{}",
        stack.cluster.shipping.log_tail(40)
    );

    // The shipped report reached order-service in the same trace.
    let report_message = if push {
        "shipment event applied"
    } else {
        "shipment feed event applied"
    };
    let order_log = stack.cluster.order.log_path().to_path_buf();
    let reports = log_lines(&order_log, |v| {
        v["fields"]["order_id"].as_str() == Some(order_id.as_str())
            && v["fields"]["message"] == report_message
            && v["fields"]["status"] == "shipped"
    });
    ensure!(
        !reports.is_empty(),
        "{mode}: no order-service log line for the shipped report"
    );
    for line in &reports {
        ensure!(
            trace_id_of(line).as_deref() == Some(trace_id.as_str()),
            "{mode}: report log line without the trace: {line}"
        );
    }
    stack.shutdown().await
}

async fn effectively_once(backend: TestBackend) -> anyhow::Result<()> {
    trace_survives_a_crash(backend, "effectively-once").await
}

async fn pull_effectively_once(backend: TestBackend) -> anyhow::Result<()> {
    trace_survives_a_crash(backend, "pull-effectively-once").await
}

/// An invalid `traceparent` starts a new trace; the order is created.
async fn invalid_traceparent_starts_a_new_trace(backend: TestBackend) -> anyhow::Result<()> {
    let stack = ProcessStack::start(EXE, backend, &[], &[]).await?;
    let res = stack
        .cluster
        .http
        .post(format!("{}/orders", stack.cluster.order.url()))
        .header(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )
        .json(&sample_order("effectively-once"))
        .send()
        .await?;
    ensure!(res.status() == 201, "create order: {}", res.status());
    let order: Value = res.json().await?;
    let order_id = order["id"].as_str().context("order id")?.to_owned();
    stack.settled("effectively-once", SETTLE).await?;
    let db = stack.dbs.shipping_db().await?;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT traceparent FROM shipments WHERE order_id = $1")
            .bind(&order_id)
            .fetch_one(db.pool())
            .await?;
    let stored = stored.context("no traceparent stored")?;
    let parsed = resilience::trace::TraceParent::parse(&stored, None).context("invalid")?;
    ensure!(parsed.trace_id.bytes().any(|b| b != b'0'), "{stored}");
    stack.shutdown().await
}

/// A stand-in OpenTelemetry collector: answers 200 to every request and
/// keeps the `/v1/traces` bodies (OTLP/HTTP protobuf).
async fn fake_collector() -> anyhow::Result<(String, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>)>
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // One request: headers, then content-length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break Some(i + 4);
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => break None,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let Some(head_end) = head_end else { return };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if head.contains("/v1/traces") {
                        kept.lock()
                            .unwrap()
                            .push(buf[head_end..head_end + len].to_vec());
                    }
                    buf.drain(..head_end + len);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if sock.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((url, bodies))
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, both services export spans of the
/// caller's trace to the collector.
async fn otlp_export(backend: TestBackend) -> anyhow::Result<()> {
    let (collector, bodies) = fake_collector().await?;
    let mut stack = ProcessStack::start(EXE, backend, &[], &[]).await?;
    for p in [&mut stack.cluster.shipping, &mut stack.cluster.order] {
        p.kill().await?;
        p.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector);
        p.set_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    stack.cluster.shipping.start(&stack.cluster.http).await?;
    stack.cluster.order.start(&stack.cluster.http).await?;

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let res = stack
        .cluster
        .http
        .post(format!("{}/orders", stack.cluster.order.url()))
        .header("traceparent", format!("00-{trace_id}-{PARENT_ID}-01"))
        .json(&sample_order("effectively-once"))
        .send()
        .await?;
    ensure!(res.status() == 201, "create order: {}", res.status());
    let order: Value = res.json().await?;
    let order_id = order["id"].as_str().context("order id")?.to_owned();
    let order_url = format!("{}/orders/{order_id}", stack.cluster.order.url());
    tests::eventually(SETTLE, "the order shipped", || async {
        let o: Value = stack
            .cluster
            .http
            .get(&order_url)
            .send()
            .await?
            .json()
            .await?;
        Ok((o["status"] == "shipped").then_some(()))
    })
    .await?;
    // Spans of the trace, from both services (their resource names them).
    let raw = hex_bytes(&trace_id);
    tests::eventually(
        Duration::from_secs(15),
        "spans exported by both services",
        || async {
            let bodies = bodies.lock().unwrap();
            let ours: Vec<&Vec<u8>> = bodies
                .iter()
                .filter(|b| b.windows(16).any(|w| w == raw.as_slice()))
                .collect();
            let has = |name: &str| {
                ours.iter()
                    .any(|b| b.windows(name.len()).any(|w| w == name.as_bytes()))
            };
            Ok((has("order-service") && has("shipping-service")).then_some(()))
        },
    )
    .await?;
    stack.shutdown().await
}

both_backends!(
    effectively_once,
    pull_effectively_once,
    invalid_traceparent_starts_a_new_trace,
    otlp_export,
);
