//! Database faults seen through a TCP proxy in front of Postgres.
//!
//! The ambiguous COMMIT (issue 11, item 9): the database connection drops
//! after Postgres ran the COMMIT but before its answer reached the service.
//! The service must answer with the truth (201, found by reading back) or
//! say the outcome is unknown (503); it must never claim that nothing was
//! saved. Postgres only: SQLite runs in-process, its commits are never
//! ambiguous.
//!
//! A lost database (item 12): requests answer 503 with `Retry-After`, and
//! start-up waits for the database instead of exiting.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Row;
use tests::pgproxy::PgProxy;
use tests::{TestBackend, TestDatabases};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct OrderService {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// order-service alone, its database reached through `proxy`.
async fn order_service(dbs: &TestDatabases, proxy: &PgProxy) -> anyhow::Result<OrderService> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let mut oc = order_service::Config::defaults();
    oc.delivery.service_secret = Some(tests::SERVICE_SECRET.into());
    oc.database_url = proxy.url_for(&dbs.order_url)?;
    oc.db_schema = "order_service".into();
    // Nobody listens there: the relay keeps retrying, which is fine.
    oc.shipping_url = "http://127.0.0.1:9".into();
    oc.shutdown_grace = Duration::from_secs(2);
    let app = order_service::Application::build_with_listener(oc, listener).await?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = rx.await;
        })
        .await
    });
    Ok(OrderService {
        url,
        stop: Some(tx),
        task,
    })
}

fn order(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "items": [{ "sku": "SKU-1", "quantity": 1 }],
        "delivery_mode": "effectively-once",
    })
}

async fn orders_of(dbs: &TestDatabases, customer: &str) -> anyhow::Result<Vec<String>> {
    let db = dbs.order_db().await?;
    let rows = sqlx::query("SELECT id FROM orders WHERE customer_id = $1")
        .bind(customer)
        .fetch_all(db.pool())
        .await?;
    db.close().await;
    Ok(rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?)
}

async fn post(
    http: &reqwest::Client,
    svc: &OrderService,
    customer: &str,
    key: Option<&str>,
) -> anyhow::Result<(u16, Value, reqwest::header::HeaderMap)> {
    let mut req = http
        .post(format!("{}/orders", svc.url))
        .json(&order(customer));
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    Ok((status, body, headers))
}

/// A lost COMMIT answer, with the database reachable right after: the
/// service reads back, finds the order committed, and answers 201 with it.
/// With a key and without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_commit_answer_is_resolved_by_reading_back() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let proxy = PgProxy::start("127.0.0.1:5432").await?;
    let mut svc = order_service(&dbs, &proxy).await?;
    let http = reqwest::Client::new();

    for (i, key) in [Some("lost-commit-key-1"), None].into_iter().enumerate() {
        let customer = format!("lost-commit-{i}-{}", uuid::Uuid::new_v4().simple());
        let dropped = proxy.dropped();
        proxy.arm(&customer, None);
        let (status, body, _) = post(&http, &svc, &customer, key).await?;
        assert_eq!(
            proxy.dropped(),
            dropped + 1,
            "the proxy must have dropped a COMMIT answer"
        );
        let in_db = orders_of(&dbs, &customer).await?;
        assert_eq!(in_db.len(), 1, "Postgres ran the COMMIT: the order exists");
        assert_eq!(
            status, 201,
            "key {key:?}: a committed order must be answered 201, got {status}: {body}"
        );
        assert_eq!(body["id"].as_str(), Some(in_db[0].as_str()));
        if let Some(k) = key {
            // The key record committed with the order: a retry replays it.
            let (status, again, headers) = post(&http, &svc, &customer, Some(k)).await?;
            assert_eq!(status, 201);
            assert_eq!(again["id"], body["id"]);
            assert_eq!(
                headers
                    .get("idempotent-replayed")
                    .and_then(|v| v.to_str().ok()),
                Some("true")
            );
            assert_eq!(orders_of(&dbs, &customer).await?.len(), 1);
        }
    }

    if let Some(s) = svc.stop.take() {
        let _ = s.send(());
    }
    svc.task.await??;
    dbs.cleanup().await;
    Ok(())
}

/// The keyed at-most-once order is one statement that commits on its own:
/// its answer lost, the service reads the key back, answers 201, and runs
/// what was to follow the commit (the one call to shipping, whose failure
/// is recorded on the order). Without that, the order would stay pending
/// and never be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_still_runs_what_follows_the_commit() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let proxy = PgProxy::start("127.0.0.1:5432").await?;
    let mut svc = order_service(&dbs, &proxy).await?;
    let http = reqwest::Client::new();

    let customer = format!("lost-amo-{}", uuid::Uuid::new_v4().simple());
    proxy.arm(&customer, None);
    let mut body = order(&customer);
    body["delivery_mode"] = json!("at-most-once");
    let res = http
        .post(format!("{}/orders", svc.url))
        .header("idempotency-key", "lost-amo-key")
        .json(&body)
        .send()
        .await?;
    let status = res.status().as_u16();
    let answer: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(proxy.dropped(), 1, "the proxy must have dropped an answer");
    assert_eq!(status, 201, "{answer}");
    let in_db = orders_of(&dbs, &customer).await?;
    assert_eq!(in_db.len(), 1);
    assert_eq!(answer["id"].as_str(), Some(in_db[0].as_str()));

    // The call to shipping (nobody listens) was made and its failure noted.
    let db = dbs.order_db().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (attempts, error): (i64, Option<String>) =
            sqlx::query_as("SELECT send_attempts, last_error FROM orders WHERE id = $1")
                .bind(&in_db[0])
                .fetch_one(db.pool())
                .await?;
        if attempts >= 1 && error.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the at-most-once call never ran: attempts {attempts}, error {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.close().await;

    if let Some(s) = svc.stop.take() {
        let _ = s.send(());
    }
    svc.task.await??;
    dbs.cleanup().await;
    Ok(())
}

/// A lost COMMIT answer, and the database unreachable for longer than the
/// service asks: the outcome cannot be known, so the answer is 503 "outcome
/// unknown" with `Retry-After`, never "nothing was saved". A retry with the
/// same key once the database is back gets the committed order, and there
/// is exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_commit_with_database_gone_is_outcome_unknown() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let proxy = PgProxy::start("127.0.0.1:5432").await?;
    let mut svc = order_service(&dbs, &proxy).await?;
    let http = reqwest::Client::new();

    let customer = format!("lost-commit-gone-{}", uuid::Uuid::new_v4().simple());
    let key = "lost-commit-gone-key";
    proxy.arm(&customer, Some(Duration::from_secs(6)));
    let (status, body, headers) = post(&http, &svc, &customer, Some(key)).await?;
    assert_eq!(proxy.dropped(), 1);
    assert!(
        status == 201 || status == 503,
        "expected 201 (read back) or 503 (unknown), got {status}: {body}"
    );
    if status == 503 {
        assert_eq!(body["title"], "outcome unknown", "{body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("same Idempotency-Key")),
            "{body}"
        );
        assert!(headers.get("retry-after").is_some());
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
    }
    assert!(
        !body.to_string().contains("nothing was saved"),
        "the COMMIT ran: the answer must not say nothing was saved: {body}"
    );

    // The client follows the advice: the same key, until the database is back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let replayed = loop {
        let (status, again, _) = post(&http, &svc, &customer, Some(key)).await?;
        if status == 201 {
            break again;
        }
        assert!(
            status == 503,
            "retry during the outage: expected 503, got {status}: {again}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "database never came back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let in_db = orders_of(&dbs, &customer).await?;
    assert_eq!(in_db.len(), 1, "exactly one order: {in_db:?}");
    assert_eq!(replayed["id"].as_str(), Some(in_db[0].as_str()));
    if status == 201 {
        assert_eq!(body["id"], replayed["id"]);
    }

    if let Some(s) = svc.stop.take() {
        let _ = s.send(());
    }
    svc.task.await??;
    dbs.cleanup().await;
    Ok(())
}

/// The database connection is lost under running requests: the answers are
/// 503 problems with `Retry-After`, never a bare 500, and the service works
/// again once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_database_answers_503_with_retry_after() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let proxy = PgProxy::start("127.0.0.1:5432").await?;
    let mut svc = order_service(&dbs, &proxy).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let customer = format!("outage-{}", uuid::Uuid::new_v4().simple());
    let (status, created, _) = post(&http, &svc, &customer, Some("outage-key")).await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap_or_default().to_string();

    // Longer than the pool's acquire timeout (10 s): requests cannot wait it out.
    proxy.blackout(Duration::from_secs(14));
    // A signed feed read (the pull consumers' request), side by side with
    // the reads below.
    let feed = async {
        let path = "/orders/feed/pull-effectively-once";
        let req = http.get(format!("{}{path}", svc.url));
        expect_gone(path, tests::send_signed(&http, req).await?).await;
        anyhow::Ok(())
    };
    let paths = [format!("/orders/{id}"), "/orders".to_string()];
    let reads = async {
        for path in &paths {
            read_gone(&http, &svc, path).await;
        }
    };
    // The write side by side with the reads, so it starts inside the
    // blackout however slowly the reads are answered on a loaded machine.
    let (feed, (), (), posted) = tokio::join!(
        feed,
        reads,
        read_gone(&http, &svc, "/readyz"),
        post(&http, &svc, &customer, None)
    );
    feed?;
    let (status, body, headers) = posted?;
    assert_eq!(status, 503, "POST with the database gone: {body}");
    assert!(headers.get("retry-after").is_some());

    // Back: the same requests work.
    tests::eventually(
        Duration::from_secs(30),
        "the database to be back",
        || async {
            let res = http.get(format!("{}/orders/{id}", svc.url)).send().await?;
            Ok((res.status() == 200).then_some(()))
        },
    )
    .await?;
    assert_eq!(orders_of(&dbs, &customer).await?.len(), 1);

    if let Some(s) = svc.stop.take() {
        let _ = s.send(());
    }
    svc.task.await??;
    dbs.cleanup().await;
    Ok(())
}

/// Shutdown while the database is frozen (its connections open, nothing
/// answered) and a request waits on it: the service still stops, after its
/// grace period and the bounded close of its connections, not when the
/// database comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_while_the_database_is_frozen() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let proxy = PgProxy::start("127.0.0.1:5432").await?;
    let mut svc = order_service(&dbs, &proxy).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()?;
    let customer = format!("frozen-{}", uuid::Uuid::new_v4().simple());
    let (status, created, _) = post(&http, &svc, &customer, None).await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap_or_default().to_string();

    // Frozen far longer than the grace period (2 s) and the close limit.
    let frozen = Duration::from_secs(60);
    proxy.freeze(frozen);
    let stuck = tokio::spawn({
        let (http, url) = (http.clone(), format!("{}/orders/{id}", svc.url));
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tests::eventually(
        Duration::from_secs(20),
        "the request to wait on the database",
        || async { Ok((proxy.withheld() > 0).then_some(())) },
    )
    .await?;

    if let Some(s) = svc.stop.take() {
        let _ = s.send(());
    }
    // Grace (2 s) + close limit + a margin, well short of the freeze.
    let limit = Duration::from_secs(2) + service_kit::DB_CLOSE_LIMIT + Duration::from_secs(10);
    assert!(limit < frozen);
    match tokio::time::timeout(limit, &mut svc.task).await {
        Ok(joined) => joined??,
        Err(_) => panic!("the service did not stop within {limit:?} while the database was frozen"),
    }
    stuck.abort();
    proxy.freeze(Duration::ZERO);
    dbs.cleanup().await;
    Ok(())
}

/// A read while the database is gone: 503 problem+json with `Retry-After`.
async fn read_gone(http: &reqwest::Client, svc: &OrderService, path: &str) {
    match http.get(format!("{}{path}", svc.url)).send().await {
        Ok(res) => expect_gone(path, res).await,
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// The answer to GET `path` while the database is gone: 503 problem+json
/// with `Retry-After`.
async fn expect_gone(path: &str, res: reqwest::Response) {
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 503, "GET {path} with the database gone: {body}");
    assert!(
        headers.get("retry-after").is_some(),
        "GET {path}: no Retry-After"
    );
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
}

/// Start-up with the database unreachable waits (with backoff, up to
/// `DB_CONNECT_TIMEOUT`) instead of exiting at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_the_database() -> anyhow::Result<()> {
    let dbs = TestDatabases::create(TestBackend::Postgres).await?;
    let proxy = PgProxy::start("127.0.0.1:5432").await?;
    proxy.blackout(Duration::from_secs(3));
    let started = tokio::time::Instant::now();
    let mut svc = order_service(&dbs, &proxy).await?;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "start-up cannot have reached the database during the blackout"
    );
    let http = reqwest::Client::new();
    let (status, body, _) = post(&http, &svc, "after-startup", None).await?;
    assert_eq!(status, 201, "{body}");

    // And it gives up after the configured time when the database stays away.
    proxy.blackout(Duration::from_secs(60));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut oc = order_service::Config::defaults();
    oc.delivery.service_secret = Some(tests::SERVICE_SECRET.into());
    oc.database_url = proxy.url_for(&dbs.order_url)?;
    oc.db_connect_timeout = Duration::from_secs(2);
    let t = tokio::time::Instant::now();
    let built = order_service::Application::build_with_listener(oc, listener).await;
    assert!(built.is_err(), "no database: start-up must fail");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "gave up after {:?}",
        t.elapsed()
    );

    if let Some(s) = svc.stop.take() {
        let _ = s.send(());
    }
    let _ = svc.task.await;
    dbs.cleanup().await;
    Ok(())
}
