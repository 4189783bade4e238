//! Hardening (issue 11): caller identities, database limits, invalid bytes,
//! admin when off, server time limits, and settings that turn safety off;
//! end to end on SQLite and on Postgres.

use std::time::Duration;

use anyhow::ensure;
use reqwest::header::HeaderValue;
use serde_json::{json, Value};
use tests::{
    both_backends, expect_problem, sample_order, Stack, StackOptions, TestBackend, TestDatabases,
    ADMIN_TOKEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROBLEM_BASE: &str = "https://reliable-delivery.example/problems/";

fn problem_type(p: &Value) -> &str {
    p["type"].as_str().unwrap_or_default()
}

async fn count(stack: &Stack) -> anyhow::Result<(i64, i64, i64, i64)> {
    let odb = stack.dbs.order_db().await?;
    let sdb = stack.dbs.shipping_db().await?;
    let q = |t: &'static str| format!("SELECT COUNT(*) FROM {t}");
    let orders: i64 = sqlx::query_scalar(&q("orders"))
        .fetch_one(odb.pool())
        .await?;
    let order_keys: i64 = sqlx::query_scalar(&q("idempotency_keys"))
        .fetch_one(odb.pool())
        .await?;
    let shipments: i64 = sqlx::query_scalar(&q("shipments"))
        .fetch_one(sdb.pool())
        .await?;
    let shipping_keys: i64 = sqlx::query_scalar(&q("idempotency_keys"))
        .fetch_one(sdb.pool())
        .await?;
    Ok((orders, order_keys, shipments, shipping_keys))
}

/// POST /orders with a key, as `client` (raw header bytes; `None`: no header).
async fn post_keyed(
    stack: &Stack,
    key: &str,
    client: Option<&[u8]>,
    body: &str,
) -> anyhow::Result<reqwest::Response> {
    let mut req = stack
        .http
        .post(format!("{}/orders", stack.order.url))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string());
    if let Some(c) = client {
        req = req.header("x-client-id", HeaderValue::from_bytes(c)?);
    }
    Ok(req.send().await?)
}

/// `n` pseudo-random alphanumerics (deterministic, incompressible).
fn noise(n: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(alphabet[(x % 62) as usize])
        })
        .collect()
}

fn no_shipping() -> StackOptions {
    StackOptions {
        start_shipping: false,
        ..Default::default()
    }
}

/// Issue 11 items 1 and 7: every identity has its own scope; an unusable one
/// is refused; a long one neither fails nor shares.
async fn client_ids_never_share_a_scope(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let body = sample_order("at-most-once").to_string();
    // Incompressible, or Postgres compresses the index entry and it fits.
    let long = noise(5000);
    let long_utf8 = "ü".repeat(3000);
    let identities: [Option<&[u8]>; 8] = [
        Some("jürgen".as_bytes()),
        Some("müller".as_bytes()),
        Some(b"anonymous"),
        None,
        Some(long.as_bytes()),
        Some(long_utf8.as_bytes()),
        Some(b"a:b"),
        Some(b"order-service"),
    ];
    let mut ids = Vec::new();
    for who in identities {
        let res = post_keyed(&stack, "k", who, &body).await?;
        let label = who.map(|w| String::from_utf8_lossy(&w[..w.len().min(20)]).into_owned());
        ensure!(
            res.status() == 201,
            "{label:?}: {} {}",
            res.status(),
            res.text().await?
        );
        ensure!(
            res.headers().get("idempotent-replayed").is_none(),
            "{label:?} got another client's answer"
        );
        let order: Value = res.json().await?;
        ids.push(order["id"].as_str().unwrap_or_default().to_string());
        // The same client, again: its own answer, replayed.
        let res = post_keyed(&stack, "k", who, &body).await?;
        ensure!(res.status() == 201, "{label:?} repeat: {}", res.status());
        ensure!(
            res.headers().get("idempotent-replayed").is_some(),
            "{label:?} repeat not replayed"
        );
        let again: Value = res.json().await?;
        ensure!(
            again["id"] == order["id"],
            "{label:?} replayed another order"
        );
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    ensure!(unique.len() == ids.len(), "shared scopes: {ids:?}");
    let before = count(&stack).await?;
    ensure!(before.0 == 8, "{before:?}");

    // Unusable identities: 400, nothing written, keyed or not.
    for bad in [
        &b""[..],
        b"   ",
        b"\xff\xfe",
        b"a\tb",
        "a\u{85}b".as_bytes(),
    ] {
        for key in ["k", "fresh"] {
            let res = post_keyed(&stack, key, Some(bad), &body).await?;
            let p = expect_problem(res, 400)
                .await
                .map_err(|e| e.context(format!("{bad:?}")))?;
            ensure!(problem_type(&p) == format!("{PROBLEM_BASE}invalid-client-id"));
        }
        let res = stack
            .http
            .post(format!("{}/orders", stack.order.url))
            .header("x-client-id", HeaderValue::from_bytes(bad)?)
            .json(&sample_order("at-most-once"))
            .send()
            .await?;
        expect_problem(res, 400).await?;
    }
    let res = stack
        .http
        .post(format!("{}/orders", stack.order.url))
        .header("idempotency-key", "k2")
        .header("x-client-id", "a")
        .header("x-client-id", "b")
        .json(&sample_order("at-most-once"))
        .send()
        .await?;
    expect_problem(res, 400).await?;
    ensure!(count(&stack).await? == before, "refused requests wrote");
    stack.shutdown().await
}

/// Issue 11 items 6 and 8, and the database limits: NUL bytes, oversized
/// values and invalid UTF-8 in every path, query, header and body field
/// that reaches SQL get a problem+json 4xx and change nothing.
async fn database_limits_and_invalid_bytes(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, StackOptions::default()).await?;
    let http = &stack.http;
    let o = stack.order.url.clone();
    let s = stack.shipping_url.clone();
    let huge = noise(5000);
    let huge_cursor = "A".repeat(5000);
    let before = count(&stack).await?;

    let mut gets = vec![
        // cursors decoding to NUL, to a non-UUID, too long
        format!("{o}/orders?cursor=MDoA"),
        format!("{s}/shipments?cursor=MDoA"),
        format!("{o}/orders?cursor=MTphYmM"),
        format!("{o}/orders?cursor={huge_cursor}"),
        format!("{s}/shipments?cursor={huge_cursor}"),
        // invalid UTF-8, NUL, oversized: path ids
        format!("{o}/orders/%FF"),
        format!("{s}/shipments/%FF"),
        format!("{o}/orders/%00"),
        format!("{s}/shipments/%00"),
        format!("{o}/orders/{huge}"),
        format!("{s}/shipments/{huge}"),
    ];
    // ... and every query parameter
    for v in ["%FF", "%00", "%C3%28", huge.as_str()] {
        gets.push(format!("{o}/orders?status={v}"));
        gets.push(format!("{o}/orders?cursor={v}"));
        gets.push(format!("{o}/orders?limit={v}"));
        gets.push(format!("{s}/shipments?order_id={v}"));
        gets.push(format!("{s}/shipments?cursor={v}"));
        gets.push(format!("{s}/shipments?limit={v}"));
        gets.push(format!("{o}/orders?{v}=1"));
        // the feeds (signed reads, so the query itself is what is judged)
        for f in [format!("{o}/orders/feed"), format!("{s}/shipments/feed")] {
            gets.push(format!("{f}/pull-effectively-once?after={v}"));
            gets.push(format!("{f}/pull-at-least-once?limit={v}"));
            gets.push(format!("{f}/pull-effectively-once?wait={v}"));
            gets.push(format!("{f}/{v}"));
        }
    }
    for url in &gets {
        // Signed, as a peer service would: the feeds refuse unsigned reads
        // before looking at the query; the public routes ignore signatures.
        let res = tests::send_signed(http, http.get(url)).await?;
        let status = res.status().as_u16();
        ensure!(
            (400..500).contains(&status),
            "{}: {status}",
            &url[..url.len().min(120)]
        );
        expect_problem(res, status)
            .await
            .map_err(|e| e.context(url[..url.len().min(120)].to_string()))?;
    }
    let res = tests::send_signed(
        http,
        http.post(format!("{o}/orders/%FF/shipment-events"))
            .json(&json!({ "shipment_id": uuid::Uuid::new_v4(), "status": "shipped" })),
    )
    .await?;
    expect_problem(res, 400).await?;

    // NUL bytes and oversized strings in JSON bodies
    let bad_orders = [
        json!({ "customer_id": "a\u{0}b", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "\u{0}", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A\u{0}", "quantity": 1 }] }),
        json!({ "customer_id": huge, "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": huge, "quantity": 1 }] }),
        json!({ "customer_id": "é".repeat(65), "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "é".repeat(65), "quantity": 1 }] }),
        // Invisible and noncharacters: a byte-order mark, a bidi override,
        // U+FFFF, a zero-width space.
        json!({ "customer_id": "a\u{feff}", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "\u{202e}cba", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A\u{ffff}", "quantity": 1 }] }),
        json!({ "customer_id": "c", "items": [{ "sku": "A\u{200b}B", "quantity": 1 }] }),
        // A struct written as an array of its fields.
        json!(["c", [{ "sku": "A", "quantity": 1 }]]),
        json!({ "customer_id": "c", "items": [["A", 1]] }),
    ];
    for body in &bad_orders {
        let res = stack.post_order(body).await?;
        expect_problem(res, 422).await.map_err(|e| {
            e.context(body.to_string()[..80.min(body.to_string().len())].to_string())
        })?;
    }
    let oid = uuid::Uuid::new_v4();
    let bad_shipments = [
        json!({ "order_id": "\u{0}", "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "order_id": oid, "items": [{ "sku": "\u{0}", "quantity": 1 }] }),
        json!({ "order_id": oid, "items": [{ "sku": huge, "quantity": 1 }] }),
        json!({ "order_id": huge, "items": [{ "sku": "A", "quantity": 1 }] }),
        json!({ "order_id": oid, "items": [{ "sku": "\u{feff}A", "quantity": 1 }] }),
        json!([oid, [{ "sku": "A", "quantity": 1 }]]),
    ];
    for body in &bad_shipments {
        let res = tests::send_signed(http, http.post(format!("{s}/shipments")).json(body)).await?;
        expect_problem(res, 422).await?;
    }
    // Invalid UTF-8 inside a JSON body is malformed JSON.
    for url in [format!("{o}/orders"), format!("{s}/shipments")] {
        let res = tests::send_signed(
            http,
            http.post(&url)
                .header("content-type", "application/json")
                .body(&b"{\"customer_id\":\"\xff\",\"items\":[]}"[..]),
        )
        .await?;
        let status = res.status().as_u16();
        ensure!(status == 400 || status == 422, "{url}: {status}");
        expect_problem(res, status).await?;
    }
    // Oversized and non-ASCII idempotency keys
    for key in [
        HeaderValue::from_str(&huge)?,
        HeaderValue::from_bytes(b"\xff")?,
        HeaderValue::from_bytes("é".as_bytes())?,
    ] {
        for url in [format!("{o}/orders"), format!("{s}/shipments")] {
            let res = tests::send_signed(
                http,
                http.post(&url)
                    .header("idempotency-key", key.clone())
                    .json(&sample_order("at-most-once")),
            )
            .await?;
            // A key that is not a header string cannot be part of a
            // signature: the signed route may refuse it as unsigned (401)
            // before the key check (400). Either way a problem, no write.
            let status = res.status().as_u16();
            ensure!(
                status == 400 || (status == 401 && url.ends_with("/shipments")),
                "{url}: {status}"
            );
            expect_problem(res, status).await?;
        }
    }
    ensure!(count(&stack).await? == before, "rejected requests wrote");

    // Limits count characters: 64 × é is a valid customer_id and sku.
    let ok = json!({
        "customer_id": "é".repeat(64),
        "items": [{ "sku": "é".repeat(64), "quantity": 1 }],
        "delivery_mode": "at-most-once",
    });
    let res = stack.post_order(&ok).await?;
    ensure!(res.status() == 201, "64 × é: {}", res.text().await?);
    stack.shutdown().await
}

/// Issue 11 item 3: admin off is a 404 to every method; a 401 carries
/// `WWW-Authenticate: Bearer`; the scheme is case-insensitive.
async fn admin_when_off_and_on(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            order: |c| c.delivery.admin_token = None,
            shipping: |c| c.delivery.admin_token = Some("  ".into()),
            ..Default::default()
        },
    )
    .await?;
    for base in [&stack.order.url, &stack.shipping_url] {
        for path in [
            "/admin/outbox",
            "/admin/faults",
            "/admin/dead-letters/requeue",
            "/admin/nope",
        ] {
            for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
                let res = stack
                    .http
                    .request(method.parse()?, format!("{base}{path}"))
                    .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                    .send()
                    .await?;
                ensure!(res.headers().get("allow").is_none(), "{method} {path}");
                expect_problem(res, 404)
                    .await
                    .map_err(|e| e.context(format!("{method} {base}{path}")))?;
            }
        }
    }
    stack.shutdown().await?;

    let stack = Stack::start(backend, no_shipping()).await?;
    let url = format!("{}/admin/outbox", stack.order.url);
    for auth in [
        None,
        Some("Bearer wrong".to_string()),
        Some(ADMIN_TOKEN.into()),
    ] {
        let mut req = stack.http.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let res = req.send().await?;
        let www = res
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        ensure!(www.starts_with("Bearer"), "WWW-Authenticate {www:?}");
        let p = expect_problem(res, 401).await?;
        ensure!(problem_type(&p) == format!("{PROBLEM_BASE}unauthorized"));
    }
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let res = stack
            .http
            .get(&url)
            .header("authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await?;
        ensure!(res.status() == 200, "{scheme}: {}", res.status());
    }
    stack.shutdown().await
}

/// Issue 11 item 5: a client that sends half its request head is cut off.
async fn slowloris_is_cut_off(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, no_shipping()).await?;
    let addr = stack.order.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    conn.write_all(b"GET /orders HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await?;
    let mut buf = Vec::new();
    // The default header read timeout is 10 s.
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut buf)).await;
    ensure!(
        closed.is_ok(),
        "a half-sent request head held its connection open for 20 s"
    );
    // The server still serves everyone else.
    ensure!(stack.get_order_path("/healthz").await?.status() == 200);
    stack.shutdown().await
}

/// A request that declares a body past the limit is refused with 413 before
/// the body is read: a client waiting on `Expect: 100-continue` is not
/// invited to send it, and one that never sends it holds nothing.
async fn oversized_length_is_refused_up_front(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, no_shipping()).await?;
    let addr = stack.order.url.trim_start_matches("http://").to_string();
    for length in ["70000", "99999999999"] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await?;
        let head = format!(
            "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await?;
        // No body is sent. The answer comes without it (the server's
        // request limit, which would answer 503, is 30 s).
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("Content-Length {length}: no answer within 10 s"))??;
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        ensure!(
            answer.starts_with("HTTP/1.1 413"),
            "Content-Length {length}: {answer}"
        );
        ensure!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "Content-Length {length}: {answer}"
        );
    }
    // At the limit, the request is read as usual (and refused for its
    // content, not its size).
    let res = stack
        .http
        .post(format!("{}/orders", stack.order.url))
        .header("content-type", "application/json")
        .body(" ".repeat(64 * 1024))
        .send()
        .await?;
    ensure!(res.status() == 400, "64 KiB of spaces: {}", res.status());
    stack.shutdown().await
}

/// Issue 11 item 11: a zero idempotency TTL is refused, and so is a retry
/// horizon (MAX_AGE) that outlasts it.
async fn unsafe_dedupe_settings_are_refused(backend: TestBackend) -> anyhow::Result<()> {
    let dbs = TestDatabases::create(backend).await?;
    let listener = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let mut sc = shipping_service::Config::defaults();
    sc.delivery.service_secret = Some(tests::SERVICE_SECRET.into());
    sc.database_url = dbs.shipping_url.clone();
    sc.db_schema = "shipping_service".into();
    sc.delivery.idempotency_ttl = Duration::ZERO;
    let zero = shipping_service::Application::build_with_listener(sc, listener().await?).await;
    let mut oc = order_service::Config::defaults();
    oc.delivery.service_secret = Some(tests::SERVICE_SECRET.into());
    oc.database_url = dbs.order_url.clone();
    oc.db_schema = "order_service".into();
    oc.delivery.max_age = Duration::from_secs(48 * 3600);
    oc.delivery.idempotency_ttl = Duration::from_secs(24 * 3600);
    let outlasts = order_service::Application::build_with_listener(oc, listener().await?).await;
    dbs.cleanup().await;
    let why = |r: anyhow::Result<_>| r.err().map(|e: anyhow::Error| format!("{e:#}"));
    let zero = why(zero.map(drop));
    let outlasts = why(outlasts.map(drop));
    ensure!(
        zero.as_deref()
            .is_some_and(|e| e.contains("IDEMPOTENCY_TTL")),
        "IDEMPOTENCY_TTL=0s: {zero:?}"
    );
    ensure!(
        outlasts.as_deref().is_some_and(|e| e.contains("MAX_AGE")),
        "MAX_AGE > IDEMPOTENCY_TTL: {outlasts:?}"
    );
    // The defaults are consistent.
    let d = order_service::Config::defaults().delivery;
    ensure!(
        !d.max_age.is_zero() && d.max_age < d.idempotency_ttl,
        "defaults: MAX_AGE {:?}, IDEMPOTENCY_TTL {:?}",
        d.max_age,
        d.idempotency_ttl
    );
    Ok(())
}

/// Smaller point: each kind of problem has a type URI of its own.
async fn problem_types_name_the_kind(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, no_shipping()).await?;
    let o = &stack.order.url;
    let body = sample_order("at-most-once").to_string();
    let res = post_keyed(&stack, "k", None, &body).await?;
    ensure!(res.status() == 201);
    let other = sample_order("at-least-once").to_string();
    let reused = expect_problem(post_keyed(&stack, "k", None, &other).await?, 422).await?;
    let invalid = expect_problem(stack.post_order(&json!({})).await?, 422).await?;
    let missing = expect_problem(stack.get_order_path("/nope").await?, 404).await?;
    let bad = expect_problem(
        stack
            .http
            .post(format!("{o}/orders"))
            .header("content-type", "application/json")
            .body("{")
            .send()
            .await?,
        400,
    )
    .await?;
    for (p, kind) in [
        (&reused, "idempotency-key-reused"),
        (&invalid, "validation"),
        (&missing, "not-found"),
        (&bad, "malformed-body"),
    ] {
        ensure!(
            problem_type(p) == format!("{PROBLEM_BASE}{kind}"),
            "{kind}: {p}"
        );
    }
    stack.shutdown().await
}

/// The `x-dedupe: memory` counter-example is reachable by any client: it
/// forgets keys on restart (its point), but it holds a key to the same rules
/// as the persisted layer. A malformed key is refused, a key used again for
/// another body is refused, and nothing is written either way.
async fn memory_dedupe_keeps_the_key_rules(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(backend, no_shipping()).await?;
    let url = format!("{}/orders", stack.order.url);
    let post = |key: Vec<&'static str>, body: String| {
        let mut req = stack
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-dedupe", "memory");
        for k in key {
            req = req.header("idempotency-key", k);
        }
        req.body(body).send()
    };
    let alice = sample_order("memory-dedupe").to_string();
    let bob = json!({
        "customer_id": "bob",
        "items": [{ "sku": "B", "quantity": 9 }],
        "delivery_mode": "at-most-once",
    })
    .to_string();
    let first = post(vec!["md-1"], alice.clone()).await?;
    ensure!(first.status() == 201, "{}", first.status());
    let first: Value = first.json().await?;
    let orders = || async {
        let db = stack.dbs.order_db().await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
            .fetch_one(db.pool())
            .await?;
        db.close().await;
        anyhow::Ok(n)
    };
    ensure!(orders().await? == 1);
    // The same key and body: the first answer again.
    let again = post(vec!["md-1"], alice.clone()).await?;
    ensure!(again.status() == 201, "{}", again.status());
    ensure!(again.headers().get("idempotent-replayed").is_some());
    ensure!(again.json::<Value>().await? == first);
    // The same key, another body: refused, not answered with alice's order.
    let reused = expect_problem(post(vec!["md-1"], bob.clone()).await?, 422).await?;
    ensure!(
        problem_type(&reused) == format!("{PROBLEM_BASE}idempotency-key-reused"),
        "{reused}"
    );
    // Keys the persisted layer refuses are refused here too.
    let long: &'static str = Box::leak("k".repeat(256).into_boxed_str());
    for key in [vec![long], vec![""], vec!["a", "b"]] {
        let shown = format!("{key:?}").chars().take(40).collect::<String>();
        let p = expect_problem(post(key, bob.clone()).await?, 400).await?;
        ensure!(
            problem_type(&p) == format!("{PROBLEM_BASE}invalid-idempotency-key"),
            "{shown}: {p}"
        );
    }
    ensure!(orders().await? == 1, "a replayed or refused request wrote");
    stack.shutdown().await
}

/// A feed's long poll ends before the server's request time limit: a long
/// `wait` gets its empty page, not the limit's 503.
async fn long_poll_ends_before_the_request_limit(backend: TestBackend) -> anyhow::Result<()> {
    let stack = Stack::start(
        backend,
        StackOptions {
            start_shipping: false,
            order: |c| c.delivery.server_request_timeout = Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await?;
    for wait in ["30s", "1d"] {
        let url = format!(
            "{}/orders/feed/pull-effectively-once?wait={wait}",
            stack.order.url
        );
        let started = std::time::Instant::now();
        let res = tests::send_signed(&stack.http, stack.http.get(url)).await?;
        let took = started.elapsed();
        ensure!(res.status() == 200, "wait={wait}: {}", res.status());
        let page: Value = res.json().await?;
        ensure!(page["events"] == json!([]), "wait={wait}: {page}");
        // It waited (up to a second short of the limit), then answered.
        ensure!(
            took >= Duration::from_millis(1500),
            "wait={wait}: answered after {took:?}"
        );
    }
    stack.shutdown().await
}

both_backends!(
    client_ids_never_share_a_scope,
    database_limits_and_invalid_bytes,
    admin_when_off_and_on,
    slowloris_is_cut_off,
    unsafe_dedupe_settings_are_refused,
    problem_types_name_the_kind,
    memory_dedupe_keeps_the_key_rules,
    long_poll_ends_before_the_request_limit,
    oversized_length_is_refused_up_front,
);
