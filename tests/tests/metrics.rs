//! `GET /metrics` on both services: the token guard, every series the README
//! lists, the format as `promtool check metrics` judges it, and a real
//! Prometheus scraping both services on loopback.
//!
//! promtool and prometheus come from Debian's `prometheus` package (.ci/run
//! installs it). Without them the last two checks are skipped, unless
//! `CI_REQUIRE_PROMTOOL=1` (set by .ci/run), which makes their absence a
//! failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tests::{
    audit::audit, both_backends, eventually, sample_order, Stack, StackOptions, TestBackend,
    ADMIN_TOKEN,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// Every series the README promises, by metric family name.
const SERIES: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds",
    "circuit_breaker_state",
    "circuit_breaker_transitions_total",
    "circuit_breaker_rejections_total",
    "outbox_pending_messages",
    "outbox_in_flight_messages",
    "outbox_dead_messages",
    "outbox_oldest_pending_age_seconds",
    "outbox_delivery_attempts_total",
    "outbox_delivery_seconds",
    "outbox_relay_gave_way_total",
    "idempotency_replays_total",
    "idempotency_conflicts_total",
    "idempotency_mismatches_total",
    "db_pool_connections_in_use",
    "db_pool_connections_idle",
    "db_pool_connections_max",
    "feed_consumer_lag_positions",
    "feed_consumer_lag_seconds",
];

/// The histograms among [`SERIES`] (their samples are `<name>_bucket` etc.).
const HISTOGRAMS: &[&str] = &["http_request_duration_seconds", "outbox_delivery_seconds"];

fn sample_name(family: &str) -> String {
    if HISTOGRAMS.contains(&family) {
        format!("{family}_bucket")
    } else {
        family.to_string()
    }
}

/// Whether the exposition has a sample of `family`.
fn has_series(text: &str, family: &str) -> bool {
    let name = sample_name(family);
    text.lines().any(|l| {
        l.strip_prefix(name.as_str())
            .is_some_and(|r| r.starts_with(['{', ' ']))
    })
}

/// The value of an unlabelled sample.
fn value_of(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(stack: &Stack, url: &str) -> anyhow::Result<String> {
    let res = stack
        .http
        .get(format!("{url}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    ensure!(res.status() == 200, "GET {url}/metrics: {}", res.status());
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    ensure!(
        ct.starts_with("text/plain; version=0.0.4"),
        "content-type {ct}"
    );
    Ok(res.text().await?)
}

/// `name` on PATH; `None` (skip) when absent, unless CI requires it.
fn required_tool(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("CI_REQUIRE_PROMTOOL").as_deref() == Ok("1") {
            bail!("{name} is not on PATH and CI_REQUIRE_PROMTOOL=1 (apt-get install prometheus)");
        }
        eprintln!("SKIPPED: {name} is not on PATH (apt-get install prometheus)");
    }
    Ok(found)
}

/// `promtool check metrics` on one scrape.
fn promtool_check(promtool: &Path, text: &str, what: &str) -> anyhow::Result<()> {
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics failed on {what} ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Orders of every kind, idempotent replays and refusals, a read by id and
/// a miss; returns an order id (it must never show up in a scrape).
async fn drive(stack: &Stack) -> anyhow::Result<String> {
    for mode in [
        "at-most-once",
        "at-least-once",
        "effectively-once",
        "pull-at-least-once",
        "pull-effectively-once",
    ] {
        stack.create_order(mode).await?;
    }
    let keyed = |body: Value| {
        stack
            .http
            .post(format!("{}/orders", stack.order.url))
            .header("idempotency-key", "metrics-test-key")
            .json(&body)
            .send()
    };
    let first = keyed(sample_order("at-least-once")).await?;
    ensure!(first.status() == 201, "keyed order: {}", first.status());
    let id = first.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let replay = keyed(sample_order("at-least-once")).await?;
    ensure!(replay.status() == 201, "replay: {}", replay.status());
    let reused = keyed(sample_order("at-most-once")).await?;
    ensure!(reused.status() == 422, "reused key: {}", reused.status());
    stack.order(&id).await?;
    // A client's own batch of two orders: one received batch, committed.
    let sub = |body: serde_json::Value| {
        use base64::Engine as _;
        serde_json::json!({
            "method": "POST",
            "path": "/orders",
            "headers": [["content-type", "application/json"]],
            "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        })
    };
    let batch = serde_json::json!({ "requests": [
        sub(sample_order("at-most-once")),
        sub(sample_order("at-most-once")),
    ]});
    let res = stack
        .http
        .post(format!("{}/batch", stack.order.url))
        .json(&batch)
        .send()
        .await?;
    ensure!(res.status() == 200, "batch: {}", res.status());
    let miss = stack.get_order_path("/no/such/path").await?;
    ensure!(miss.status() == 404);
    Ok(id)
}

async fn metrics_end_to_end(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let order_url = stack.order.url.clone();
    let shipping_url = stack.shipping_url.clone();

    // The guard: the admin token, or 401.
    for url in [&order_url, &shipping_url] {
        let res = stack.http.get(format!("{url}/metrics")).send().await?;
        ensure!(res.status() == 401, "no token: {}", res.status());
        let res = stack
            .http
            .get(format!("{url}/metrics"))
            .bearer_auth("wrong")
            .send()
            .await?;
        ensure!(res.status() == 401, "wrong token: {}", res.status());
    }

    let id = drive(&stack).await?;
    eventually(
        DEADLINE,
        "every order delivered and acknowledged",
        || async {
            let inv = audit(
                &stack.dbs.order_db().await?,
                &stack.dbs.shipping_db().await?,
                None,
            )
            .await?;
            Ok(
                (inv.lost == 0 && inv.unacknowledged == 0 && inv.shipments >= inv.orders)
                    .then_some(()),
            )
        },
    )
    .await?;

    // Every series on both services (the feed lag appears after a page).
    let scrapes = eventually(DEADLINE, "every series in both scrapes", || async {
        let order = scrape(&stack, &order_url).await?;
        let shipping = scrape(&stack, &shipping_url).await?;
        let missing: Vec<_> = SERIES
            .iter()
            .flat_map(|s| {
                [("order", &order), ("shipping", &shipping)]
                    .into_iter()
                    .filter(|(_, text)| !has_series(text, s))
                    .map(move |(svc, _)| format!("{svc}: {s}"))
            })
            .collect();
        if missing.is_empty() {
            Ok(Some((order, shipping)))
        } else {
            Err(anyhow::anyhow!("missing {missing:?}"))
        }
    })
    .await?;
    let (order, shipping) = scrapes;
    if let Ok(dir) = std::env::var("METRICS_DUMP_DIR") {
        std::fs::write(format!("{dir}/order-{backend:?}.prom"), &order)?;
        std::fs::write(format!("{dir}/shipping-{backend:?}.prom"), &shipping)?;
    }

    // Route templates, never raw paths; bounded labels.
    ensure!(
        order.contains(r#"route="/orders/{id}""#),
        "no route template in:\n{order}"
    );
    ensure!(order.contains(r#"route="unmatched""#), "no unmatched route");
    ensure!(
        !order.contains(&id) && !shipping.contains(&id),
        "an order id leaked into a label"
    );
    ensure!(!order.contains("metrics-test-key"), "a key leaked");
    ensure!(
        !order.contains("/no/such/path"),
        "a raw path leaked into a label"
    );
    ensure!(
        order.contains(r#"batch_requests_bucket{outcome="committed",le="2"}"#),
        "no batch_requests in:\n{order}"
    );
    // Every POST /orders passed through the group-commit queue, and its
    // time there is measured (the route's own duration leaves it out).
    let queued = value_of(&order, "group_commit_wait_seconds_count");
    ensure!(
        queued.is_some_and(|n| n >= 8.0),
        "group_commit_wait_seconds_count = {queued:?}"
    );
    // The batch exchange itself is counted like any route.
    ensure!(
        order.lines().any(|l| l.starts_with("http_requests_total")
            && l.contains(r#"route="/batch""#)
            && l.contains(r#"status="200""#)),
        "no http_requests_total for /batch in:\n{order}"
    );
    for counter in ["idempotency_replays_total", "idempotency_mismatches_total"] {
        let n = value_of(&order, counter);
        ensure!(n.is_some_and(|n| n >= 1.0), "{counter} = {n:?}");
    }

    // The format, as promtool judges it.
    if let Some(promtool) = required_tool("promtool")? {
        promtool_check(&promtool, &order, "order-service's scrape")?;
        promtool_check(&promtool, &shipping, "shipping-service's scrape")?;
        eprintln!("promtool check metrics: both scrapes pass");
    }

    // A real Prometheus scraping both services.
    if let Some(prometheus) = required_tool("prometheus")? {
        real_prometheus(&stack, &prometheus, &[&order_url, &shipping_url]).await?;
    }
    stack.shutdown().await
}

/// A port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn real_prometheus(stack: &Stack, bin: &Path, targets: &[&str]) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let jobs = ["order-service", "shipping-service"];
    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for (job, url) in jobs.iter().zip(targets) {
        let host = url.trim_start_matches("http://");
        config.push_str(&format!(
            "  - job_name: {job}\n    metrics_path: /metrics\n    authorization:\n      \
             type: Bearer\n      credentials: {ADMIN_TOKEN}\n    static_configs:\n      \
             - targets: ['{host}']\n"
        ));
    }
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, &config)?;
    let port = free_port()?;
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = tokio::process::Command::new(bin)
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus")?;
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let result = check_prometheus(stack, &api, &jobs).await;
    let _ = child.kill().await;
    if let Err(e) = result {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<_> = log.lines().rev().take(30).collect();
        let tail: Vec<_> = tail.into_iter().rev().collect();
        bail!(
            "{e:#}\nprometheus config:\n{config}\nprometheus log (tail):\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

async fn check_prometheus(stack: &Stack, api: &str, jobs: &[&str]) -> anyhow::Result<()> {
    let get = |path: String, query: Option<String>| async move {
        let mut req = stack.http.get(format!("{api}{path}"));
        if let Some(q) = query {
            req = req.query(&[("query", q)]);
        }
        let res = req.send().await?;
        ensure!(res.status() == 200, "{path}: {}", res.status());
        Ok::<Value, anyhow::Error>(res.json().await?)
    };
    let deadline = Duration::from_secs(60);
    eventually(deadline, "prometheus: both targets up", || async {
        let v = get("/targets".into(), None).await?;
        let targets = v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = targets
            .iter()
            .filter(|t| t["health"] == "up")
            .filter_map(|t| t["labels"]["job"].as_str())
            .collect::<Vec<_>>();
        if jobs.iter().all(|j| up.contains(j)) {
            Ok(Some(()))
        } else {
            Err(anyhow::anyhow!("targets: {}", json!(targets)))
        }
    })
    .await?;
    // Every series, from both jobs.
    for family in SERIES {
        let q = format!("count by (job) ({})", sample_name(family));
        eventually(deadline, &format!("prometheus sees {family}"), || {
            let q = q.clone();
            async move {
                let v = get("/query".into(), Some(q)).await?;
                let seen: Vec<String> = v["data"]["result"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| r["metric"]["job"].as_str().map(str::to_string))
                    .collect();
                if jobs.iter().all(|j| seen.iter().any(|s| s == j)) {
                    Ok(Some(()))
                } else {
                    Err(anyhow::anyhow!("{family} seen from {seen:?}: {v}"))
                }
            }
        })
        .await?;
    }
    eprintln!(
        "prometheus: both targets up, {} series families seen from both",
        SERIES.len()
    );
    Ok(())
}

/// With admin off (no token), `/metrics` does not exist: 404 like every
/// admin path.
async fn metrics_off_without_admin(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            order: |c| c.delivery.admin_token = None,
            ..StackOptions::default()
        },
    )
    .await?;
    for auth in [None, Some(ADMIN_TOKEN)] {
        let mut req = stack.http.get(format!("{}/metrics", stack.order.url));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        ensure!(res.status() == 404, "admin off, /metrics: {}", res.status());
    }
    stack.shutdown().await
}

both_backends!(metrics_end_to_end, metrics_off_without_admin);
