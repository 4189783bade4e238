//! `resilience::idempotency` end to end, on SQLite and on Postgres.
//!
//! Every test is written once as `async fn name(env: Env) -> Result<()>` and
//! run on both backends by `on_both_backends!`. Postgres tests use the server
//! at `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! and a fresh database each, dropped at the end.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::FutureExt;
use http_body_util::BodyExt;
use resilience::idempotency::{
    reap_expired, spawn_reaper, IdempotencyConfig, IdempotencyLayer, IdempotencyReaper, KeyPolicy,
    Tx, TxError, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
};
use resilience::store::{now_ms, Backend, Db, DbOptions, Write};
use service_kit::{internal_error, Problem, PROBLEM_JSON};
use sqlx::{Connection, Executor};
use tokio::sync::Notify;
use tower::ServiceExt;

const SCHEMA: &str = "idem_test";
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- harness

struct Env {
    backend: Backend,
    url: String,
    db: Db,
}

async fn setup(backend: Backend, url: String) -> Result<Env> {
    let db = Db::connect(&DbOptions::new(url.clone(), SCHEMA)).await?;
    db.migrate_resilience().await?;
    db.pool()
        .execute("CREATE TABLE widgets (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
        .await?;
    Ok(Env { backend, url, db })
}

fn with_database(admin_url: &str, name: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Runs `test` against a fresh database and cleans up, even on panic.
async fn with_env<F, Fut>(backend: Backend, test: F) -> Result<()>
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let outcome = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir()?;
            let url = format!("sqlite:{}", dir.path().join("idem.db").display());
            let env = setup(backend, url).await?;
            let db = env.db.clone();
            let out = AssertUnwindSafe(test(env)).catch_unwind().await;
            db.close().await;
            out
        }
        Backend::Postgres => {
            let admin_url = std::env::var("TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let name = format!("t_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&admin_url)
                .await
                .context("connect to TEST_POSTGRES_URL")?;
            admin
                .execute(format!("CREATE DATABASE {name}").as_str())
                .await?;
            let out = match setup(backend, with_database(&admin_url, &name)).await {
                Ok(env) => {
                    let db = env.db.clone();
                    let out = AssertUnwindSafe(test(env)).catch_unwind().await;
                    db.close().await;
                    out
                }
                Err(e) => Ok(Err(e)),
            };
            admin
                .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await?;
            out
        }
    };
    match outcome {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() -> anyhow::Result<()> {
                    super::with_env(super::Backend::Sqlite, super::$name).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() -> anyhow::Result<()> {
                    super::with_env(super::Backend::Postgres, super::$name).await
                }
            )*
        }
    };
}

on_both_backends!(
    replays_completed_request,
    same_key_different_request_is_422,
    concurrent_duplicate_while_in_flight,
    rejects_bad_and_missing_keys,
    keys_are_scoped_by_caller,
    expired_records_are_ignored_and_reaped,
    identical_requests_at_once_write_once,
    server_error_rolls_back_and_retry_succeeds,
    client_error_rolls_back_and_frees_the_key,
    replays_after_restart,
    no_key_runs_every_time,
    quoted_string_key_is_the_same_key,
    tx_without_layer_is_a_problem,
    lost_race_replays_the_winner,
    first_writes_commit_with_the_record,
    first_lock_claims_the_key,
    first_key_in_flight_is_409,
    first_expired_record_runs_again,
    first_refusal_gives_way_to_the_record,
    first_write_error_is_the_handlers_to_answer,
    first_duplicates_at_once_write_once,
    writes_run_in_order_all_or_none,
);

// ---------------------------------------------------------------- the app

#[derive(Clone, Default)]
struct Probe {
    calls: Arc<AtomicUsize>,
    hooks: Arc<AtomicUsize>,
    failed_once: Arc<AtomicBool>,
    started: Arc<Notify>,
    release: Arc<Notify>,
}

impl Probe {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn hooks(&self) -> usize {
        self.hooks.load(Ordering::SeqCst)
    }
}

async fn insert_widget(tx: &Tx, name: &str) -> Result<String, Problem> {
    let id = uuid::Uuid::new_v4().to_string();
    let mut conn = tx.lock().await?;
    sqlx::query("INSERT INTO widgets (id, name) VALUES ($1, $2)")
        .bind(&id)
        .bind(name)
        .execute(&mut **conn)
        .await
        .map_err(internal_error)?;
    Ok(id)
}

fn created(id: &str, name: &str) -> Response {
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/widgets/{id}")),
            (header::HeaderName::from_static("x-widget"), id.to_string()),
        ],
        Json(serde_json::json!({ "id": id, "name": name })),
    )
        .into_response()
}

fn count_hook(tx: &Tx, probe: &Probe) {
    let hooks = probe.hooks.clone();
    tx.after_commit(move || {
        Box::pin(async move {
            hooks.fetch_add(1, Ordering::SeqCst);
        })
    });
}

/// Inserts a widget and answers 201 with its id.
async fn create(State(p): State<Probe>, tx: Tx, name: String) -> Result<Response, Problem> {
    p.calls.fetch_add(1, Ordering::SeqCst);
    let id = insert_widget(&tx, &name).await?;
    count_hook(&tx, &p);
    Ok(created(&id, &name))
}

/// Writes, then fails the first time it is called; succeeds afterwards.
async fn flaky(State(p): State<Probe>, tx: Tx, name: String) -> Result<Response, Problem> {
    p.calls.fetch_add(1, Ordering::SeqCst);
    let id = insert_widget(&tx, &name).await?;
    count_hook(&tx, &p);
    if !p.failed_once.swap(true, Ordering::SeqCst) {
        return Err(Problem::internal().detail("failing after the write, on purpose"));
    }
    Ok(created(&id, &name))
}

/// Writes, then refuses a body of "bad" with 422 (after the write).
async fn picky(State(p): State<Probe>, tx: Tx, name: String) -> Result<Response, Problem> {
    p.calls.fetch_add(1, Ordering::SeqCst);
    let id = insert_widget(&tx, &name).await?;
    count_hook(&tx, &p);
    if name == "bad" {
        return Err(Problem::unprocessable("bad is not a widget name"));
    }
    Ok(created(&id, &name))
}

/// Signals it started, waits for the test to release it, then writes.
async fn slow(State(p): State<Probe>, tx: Tx, name: String) -> Result<Response, Problem> {
    p.calls.fetch_add(1, Ordering::SeqCst);
    p.started.notify_one();
    p.release.notified().await;
    let id = insert_widget(&tx, &name).await?;
    count_hook(&tx, &p);
    Ok(created(&id, &name))
}

/// Hands its widget to [`Tx::write`]: with `handler_first` on Postgres, the
/// layer runs it with the key's record as one statement.
async fn write_widget(tx: &Tx, id: &str, name: &str) -> Result<(), TxError> {
    let (id, name) = (id.to_owned(), name.to_owned());
    tx.write(vec![Write::new(
        "INSERT INTO widgets (id, name) VALUES ($1, $2)",
        2,
        move |q| q.bind(id).bind(name),
    )])
    .await
}

/// [`create`] through [`Tx::write`]; refuses with 503 while the probe's
/// `failed_once` flag is set (as a service under back-pressure would).
async fn deferred(State(p): State<Probe>, tx: Tx, name: String) -> Result<Response, Problem> {
    p.calls.fetch_add(1, Ordering::SeqCst);
    if p.failed_once.load(Ordering::SeqCst) {
        return Err(Problem::unavailable("busy, on purpose"));
    }
    let id = uuid::Uuid::new_v4().to_string();
    write_widget(&tx, &id, &name).await?;
    count_hook(&tx, &p);
    Ok(created(&id, &name))
}

/// Writes the widget whose id is its name, and answers a duplicate id with
/// its own 409.
async fn named(State(p): State<Probe>, tx: Tx, name: String) -> Result<Response, Problem> {
    p.calls.fetch_add(1, Ordering::SeqCst);
    match write_widget(&tx, &name, &name).await {
        Ok(()) => {}
        Err(TxError::Write(e)) if resilience::store::is_unique_violation(&e) => {
            return Err(Problem::conflict("widget exists", "a widget has this id"));
        }
        Err(e) => return Err(e.into()),
    }
    count_hook(&tx, &p);
    Ok(created(&name, &name))
}

/// The handler-first app: `/widgets` locks ([`create`]), `/deferred` and
/// `/named` write through [`Tx::write`].
fn first_app(env: &Env, probe: Probe) -> Router {
    let layer = IdempotencyLayer::new(config(env).handler_first(true));
    Router::new()
        .route("/widgets", post(create).layer(layer.clone()))
        .route("/deferred", post(deferred).layer(layer.clone()))
        .route("/named", post(named).layer(layer))
        .with_state(probe)
}

fn app(cfg: IdempotencyConfig, probe: Probe) -> Router {
    let layer = IdempotencyLayer::new(cfg);
    Router::new()
        .route("/widgets", post(create).layer(layer.clone()))
        .route("/widgets/flaky", post(flaky).layer(layer.clone()))
        .route("/widgets/picky", post(picky).layer(layer.clone()))
        .route("/widgets/slow", post(slow).layer(layer))
        .route("/unlayered", post(create))
        .with_state(probe)
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v == "true")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn is_problem(&self) -> bool {
        self.header("content-type") == Some(PROBLEM_JSON)
    }
}

async fn call(app: &Router, req: Request<Body>) -> Result<Answer> {
    let res = app.clone().oneshot(req).await?;
    let (parts, body) = res.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

fn request(
    path: &str,
    key: Option<HeaderValue>,
    client: Option<&str>,
    body: &str,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "text/plain");
    if let Some(k) = key {
        b = b.header(IDEMPOTENCY_KEY, k);
    }
    if let Some(c) = client {
        b = b.header("x-client-id", c);
    }
    b.body(Body::from(body.to_string()))
        .unwrap_or_else(|e| panic!("bad test request: {e}"))
}

async fn post_key(app: &Router, path: &str, key: &str, body: &str) -> Result<Answer> {
    call(
        app,
        request(path, Some(HeaderValue::from_str(key)?), None, body),
    )
    .await
}

async fn count(db: &Db, table: &str) -> Result<i64> {
    let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(db.pool())
        .await?;
    Ok(n)
}

async fn eventually<F, Fut>(what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        if cond().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > until {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(env: &Env) -> IdempotencyConfig {
    IdempotencyConfig::new(env.db.clone())
}

// ---------------------------------------------------------------- tests

async fn replays_completed_request(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let first = post_key(&app, "/widgets", "k-1", "alpha").await?;
    ensure!(first.status == StatusCode::CREATED, "{first:?}");
    ensure!(!first.replayed());
    let again = post_key(&app, "/widgets", "k-1", "alpha").await?;
    ensure!(again.status == StatusCode::CREATED, "{again:?}");
    ensure!(again.replayed(), "no Idempotent-Replayed: {again:?}");
    ensure!(again.body == first.body);
    ensure!(again.header("location").is_some());
    ensure!(again.header("location") == first.header("location"));
    ensure!(again.header("x-widget") == first.header("x-widget"));
    ensure!(again.header("content-type") == first.header("content-type"));
    ensure!(probe.calls() == 1 && probe.hooks() == 1);
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(count(&env.db, "idempotency_keys").await? == 1);
    Ok(())
}

async fn same_key_different_request_is_422(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    ensure!(post_key(&app, "/widgets", "k-2", "alpha").await?.status == StatusCode::CREATED);
    for (path, body) in [
        ("/widgets", "beta"),
        ("/widgets?x=1", "alpha"),
        ("/widgets/flaky", "alpha"),
    ] {
        let other = post_key(&app, path, "k-2", body).await?;
        ensure!(
            other.status == StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {other:?}"
        );
        ensure!(other.is_problem());
    }
    ensure!(probe.calls() == 1);
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

async fn concurrent_duplicate_while_in_flight(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let first = {
        let app = app.clone();
        tokio::spawn(async move { post_key(&app, "/widgets/slow", "k-3", "slow").await })
    };
    tokio::time::timeout(DEADLINE, probe.started.notified())
        .await
        .context("the first request never reached the handler")?;

    let second = {
        let app = app.clone();
        tokio::spawn(async move { post_key(&app, "/widgets/slow", "k-3", "slow").await })
    };
    match env.backend {
        Backend::Postgres => {
            // Answered at once, while the first is still held in the handler.
            let dup = tokio::time::timeout(DEADLINE, second).await???;
            ensure!(dup.status == StatusCode::CONFLICT, "{dup:?}");
            ensure!(dup.is_problem());
            ensure!(dup.header("retry-after") == Some("1"), "{dup:?}");
            probe.release.notify_one();
            let first = tokio::time::timeout(DEADLINE, first).await???;
            ensure!(first.status == StatusCode::CREATED && !first.replayed());
            let later = post_key(&app, "/widgets/slow", "k-3", "slow").await?;
            ensure!(later.replayed() && later.body == first.body, "{later:?}");
        }
        Backend::Sqlite => {
            // BEGIN IMMEDIATE: the duplicate waits for the first to commit...
            let mut second = second;
            ensure!(
                tokio::time::timeout(Duration::from_millis(300), &mut second)
                    .await
                    .is_err(),
                "the duplicate did not wait for the first request"
            );
            probe.release.notify_one();
            let first = tokio::time::timeout(DEADLINE, first).await???;
            ensure!(first.status == StatusCode::CREATED && !first.replayed());
            // ...then replays its answer.
            let dup = tokio::time::timeout(DEADLINE, second).await???;
            ensure!(dup.status == StatusCode::CREATED, "{dup:?}");
            ensure!(dup.replayed() && dup.body == first.body, "{dup:?}");
        }
    }
    ensure!(probe.calls() == 1);
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

async fn rejects_bad_and_missing_keys(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env).max_body_bytes(16), probe.clone());
    let bad: Vec<HeaderValue> = vec![
        HeaderValue::from_static(""),
        HeaderValue::from_static("\"\""),
        HeaderValue::from_str(&"k".repeat(256))?,
        HeaderValue::from_bytes("café".as_bytes())?,
        HeaderValue::from_static("tab\there"),
        HeaderValue::from_static("\"unterminated"),
    ];
    for key in bad {
        let ans = call(&app, request("/widgets", Some(key.clone()), None, "x")).await?;
        ensure!(ans.status == StatusCode::BAD_REQUEST, "{key:?}: {ans:?}");
        ensure!(ans.is_problem());
    }
    // 255 characters is the limit, inclusive.
    let ok = post_key(&app, "/widgets", &"k".repeat(255), "x").await?;
    ensure!(ok.status == StatusCode::CREATED, "{ok:?}");

    // Repeated header.
    let mut req = request("/widgets", Some(HeaderValue::from_static("a")), None, "x");
    req.headers_mut()
        .append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
    ensure!(call(&app, req).await?.status == StatusCode::BAD_REQUEST);

    // Body over max_body_bytes with a key.
    let big = post_key(&app, "/widgets", "big", &"x".repeat(17)).await?;
    ensure!(
        big.status == StatusCode::PAYLOAD_TOO_LARGE && big.is_problem(),
        "{big:?}"
    );

    // Missing key where it is required.
    let strict = self::app(config(&env).key_policy(KeyPolicy::Required), probe.clone());
    let missing = call(&strict, request("/widgets", None, None, "x")).await?;
    ensure!(
        missing.status == StatusCode::BAD_REQUEST && missing.is_problem(),
        "{missing:?}"
    );

    ensure!(probe.calls() == 1, "only the 255-char key ran");
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

async fn keys_are_scoped_by_caller(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let key = Some(HeaderValue::from_static("shared-key"));
    let a = call(&app, request("/widgets", key.clone(), Some("alice"), "w")).await?;
    let b = call(&app, request("/widgets", key.clone(), Some("bob"), "w")).await?;
    ensure!(a.status == StatusCode::CREATED && !a.replayed());
    ensure!(b.status == StatusCode::CREATED && !b.replayed(), "{b:?}");
    ensure!(a.body != b.body, "bob received alice's response");
    let a2 = call(&app, request("/widgets", key.clone(), Some("alice"), "w")).await?;
    ensure!(a2.replayed() && a2.body == a.body);
    let b2 = call(&app, request("/widgets", key, Some("bob"), "w")).await?;
    ensure!(b2.replayed() && b2.body == b.body);
    ensure!(count(&env.db, "widgets").await? == 2);
    ensure!(count(&env.db, "idempotency_keys").await? == 2);
    Ok(())
}

async fn expired_records_are_ignored_and_reaped(env: Env) -> Result<()> {
    let probe = Probe::default();
    let ttl = Duration::from_secs(3600);
    let app = app(config(&env).ttl(ttl), probe.clone());
    ensure!(post_key(&app, "/widgets", "k-exp", "w").await?.status == StatusCode::CREATED);
    let (created, expires): (i64, i64) =
        sqlx::query_as("SELECT created_at, expires_at FROM idempotency_keys")
            .fetch_one(env.db.pool())
            .await?;
    ensure!(expires - created == 3_600_000, "ttl not applied");

    // Expire it: the next request is a first request again.
    sqlx::query("UPDATE idempotency_keys SET expires_at = $1")
        .bind(now_ms() - 1)
        .execute(env.db.pool())
        .await?;
    let again = post_key(&app, "/widgets", "k-exp", "w").await?;
    ensure!(
        again.status == StatusCode::CREATED && !again.replayed(),
        "{again:?}"
    );
    ensure!(probe.calls() == 2);
    ensure!(count(&env.db, "idempotency_keys").await? == 1);

    // Reaping in bounded batches: 5 expired + the live one.
    for i in 0..5 {
        sqlx::query(
            "INSERT INTO idempotency_keys \
             (scope, idem_key, fingerprint, status, headers, body, created_at, expires_at) \
             VALUES ('anonymous', $1, 'f', 201, '[]', $2, 0, $3)",
        )
        .bind(format!("old-{i}"))
        .bind(Vec::<u8>::new())
        .bind(now_ms() - 1000 + i)
        .execute(env.db.pool())
        .await?;
    }
    let reaper = IdempotencyReaper::new(env.db.clone()).batch(2);
    ensure!(reaper.reap_batch().await? == 2, "one batch is bounded");
    ensure!(count(&env.db, "idempotency_keys").await? == 4);
    ensure!(reap_expired(&env.db, 2).await? == 3);
    ensure!(
        count(&env.db, "idempotency_keys").await? == 1,
        "the live record stays"
    );

    // The periodic reaper, stopped by its future.
    sqlx::query("UPDATE idempotency_keys SET expires_at = 0")
        .execute(env.db.pool())
        .await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = spawn_reaper(env.db.clone(), Duration::from_millis(20), 10, async move {
        let _ = stop_rx.await;
    });
    let db = env.db.clone();
    eventually("the reaper to empty the table", || {
        let db = db.clone();
        async move { Ok(count(&db, "idempotency_keys").await? == 0) }
    })
    .await?;
    let _ = stop_tx.send(());
    tokio::time::timeout(DEADLINE, task).await??;
    Ok(())
}

async fn identical_requests_at_once_write_once(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { post_key(&app, "/widgets", "k-dup", "same").await })
        })
        .collect();
    let mut fresh = 0;
    for t in tasks {
        let ans = tokio::time::timeout(DEADLINE, t).await???;
        match ans.status {
            StatusCode::CREATED if !ans.replayed() => fresh += 1,
            StatusCode::CREATED => {}
            StatusCode::CONFLICT => ensure!(ans.header("retry-after").is_some()),
            _ => bail!("unexpected answer {ans:?}"),
        }
    }
    ensure!(fresh == 1, "{fresh} requests ran the handler to completion");
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(
        probe.hooks() == 1,
        "after-commit ran {} times",
        probe.hooks()
    );
    let later = post_key(&app, "/widgets", "k-dup", "same").await?;
    ensure!(later.status == StatusCode::CREATED && later.replayed());
    Ok(())
}

async fn server_error_rolls_back_and_retry_succeeds(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let failed = post_key(&app, "/widgets/flaky", "k-fail", "w").await?;
    ensure!(
        failed.status == StatusCode::INTERNAL_SERVER_ERROR,
        "{failed:?}"
    );
    ensure!(
        count(&env.db, "widgets").await? == 0,
        "the handler's write survived a 500"
    );
    ensure!(
        count(&env.db, "idempotency_keys").await? == 0,
        "a 500 was recorded"
    );
    ensure!(probe.hooks() == 0, "after-commit ran without a commit");

    let retry = post_key(&app, "/widgets/flaky", "k-fail", "w").await?;
    ensure!(
        retry.status == StatusCode::CREATED && !retry.replayed(),
        "{retry:?}"
    );
    let third = post_key(&app, "/widgets/flaky", "k-fail", "w").await?;
    ensure!(third.replayed() && third.body == retry.body);
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(probe.calls() == 2 && probe.hooks() == 1);

    // Without a key, a 500 rolls back too.
    probe.failed_once.store(false, Ordering::SeqCst);
    let failed = call(&app, request("/widgets/flaky", None, None, "w")).await?;
    ensure!(failed.status == StatusCode::INTERNAL_SERVER_ERROR);
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

/// A refused request (4xx) leaves no trace: its write rolls back, its key
/// is not recorded, and the corrected request may reuse the key.
async fn client_error_rolls_back_and_frees_the_key(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let refused = post_key(&app, "/widgets/picky", "k-picky", "bad").await?;
    ensure!(
        refused.status == StatusCode::UNPROCESSABLE_ENTITY && refused.is_problem(),
        "{refused:?}"
    );
    ensure!(
        count(&env.db, "widgets").await? == 0,
        "the write of a refused request survived"
    );
    ensure!(
        count(&env.db, "idempotency_keys").await? == 0,
        "a 4xx was recorded"
    );
    ensure!(probe.hooks() == 0, "after-commit ran for a refused request");

    let fixed = post_key(&app, "/widgets/picky", "k-picky", "good").await?;
    ensure!(
        fixed.status == StatusCode::CREATED && !fixed.replayed(),
        "{fixed:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 1);

    // Without a key, a 4xx rolls back too.
    let refused = call(&app, request("/widgets/picky", None, None, "bad")).await?;
    ensure!(refused.status == StatusCode::UNPROCESSABLE_ENTITY);
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

async fn replays_after_restart(env: Env) -> Result<()> {
    let first = {
        let app = app(config(&env), Probe::default());
        post_key(&app, "/widgets", "k-restart", "w").await?
    };
    ensure!(first.status == StatusCode::CREATED);
    env.db.close().await;

    let db = Db::connect(&DbOptions::new(env.url.clone(), SCHEMA)).await?;
    db.migrate_resilience().await?;
    let probe = Probe::default();
    let app = app(IdempotencyConfig::new(db.clone()), probe.clone());
    let again = post_key(&app, "/widgets", "k-restart", "w").await?;
    ensure!(
        again.status == StatusCode::CREATED && again.replayed(),
        "{again:?}"
    );
    ensure!(again.body == first.body);
    ensure!(again.header("location") == first.header("location"));
    ensure!(probe.calls() == 0);
    ensure!(count(&db, "widgets").await? == 1);
    db.close().await;
    Ok(())
}

async fn no_key_runs_every_time(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    for _ in 0..2 {
        let ans = call(&app, request("/widgets", None, None, "w")).await?;
        ensure!(
            ans.status == StatusCode::CREATED && !ans.replayed(),
            "{ans:?}"
        );
    }
    ensure!(probe.calls() == 2 && probe.hooks() == 2);
    ensure!(count(&env.db, "widgets").await? == 2);
    ensure!(count(&env.db, "idempotency_keys").await? == 0);
    Ok(())
}

async fn quoted_string_key_is_the_same_key(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let quoted = post_key(&app, "/widgets", "\"8e03978e-40d5-43e8\"", "w").await?;
    ensure!(
        quoted.status == StatusCode::CREATED && !quoted.replayed(),
        "{quoted:?}"
    );
    let bare = post_key(&app, "/widgets", "8e03978e-40d5-43e8", "w").await?;
    ensure!(bare.replayed() && bare.body == quoted.body);
    let stored: String = sqlx::query_scalar("SELECT idem_key FROM idempotency_keys")
        .fetch_one(env.db.pool())
        .await?;
    ensure!(stored == "8e03978e-40d5-43e8");
    ensure!(probe.calls() == 1);
    Ok(())
}

async fn tx_without_layer_is_a_problem(env: Env) -> Result<()> {
    let app = app(config(&env), Probe::default());
    let ans = call(&app, request("/unlayered", None, None, "w")).await?;
    ensure!(
        ans.status == StatusCode::INTERNAL_SERVER_ERROR && ans.is_problem(),
        "{ans:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 0);
    Ok(())
}

/// A record for the key commits while our request is in its handler.
/// Postgres: our insert hits the primary key, our writes roll back and the
/// winner's answer is replayed. SQLite: the other writer waits for our commit
/// and is the one that fails.
async fn lost_race_replays_the_winner(env: Env) -> Result<()> {
    use sha2::Digest;
    let probe = Probe::default();
    let app = app(config(&env), probe.clone());
    let first = {
        let app = app.clone();
        tokio::spawn(async move { post_key(&app, "/widgets/slow", "k-race", "slow").await })
    };
    tokio::time::timeout(DEADLINE, probe.started.notified())
        .await
        .context("the request never reached the handler")?;
    let fp = hex::encode(sha2::Sha256::digest(b"POST\n/widgets/slow\nslow"));
    let db = env.db.clone();
    let winner = tokio::spawn(async move {
        sqlx::query(
            "INSERT INTO idempotency_keys \
             (scope, idem_key, fingerprint, status, headers, body, created_at, expires_at) \
             VALUES ('anonymous', 'k-race', $1, 201, '[[\"x-winner\",\"yes\"]]', $2, $3, $4)",
        )
        .bind(fp)
        .bind(b"winner".to_vec())
        .bind(now_ms())
        .bind(now_ms() + 3_600_000)
        .execute(db.pool())
        .await
    });
    match env.backend {
        Backend::Postgres => {
            tokio::time::timeout(DEADLINE, winner).await???;
            probe.release.notify_one();
            let ans = tokio::time::timeout(DEADLINE, first).await???;
            ensure!(
                ans.status == StatusCode::CREATED && ans.replayed(),
                "{ans:?}"
            );
            ensure!(&ans.body[..] == b"winner" && ans.header("x-winner") == Some("yes"));
            ensure!(
                count(&env.db, "widgets").await? == 0,
                "the loser's write survived"
            );
        }
        Backend::Sqlite => {
            probe.release.notify_one();
            let ans = tokio::time::timeout(DEADLINE, first).await???;
            ensure!(
                ans.status == StatusCode::CREATED && !ans.replayed(),
                "{ans:?}"
            );
            let other = tokio::time::timeout(DEADLINE, winner).await??;
            ensure!(
                other
                    .as_ref()
                    .is_err_and(resilience::store::is_unique_violation),
                "{other:?}"
            );
            ensure!(count(&env.db, "widgets").await? == 1);
        }
    }
    let expected_hooks = usize::from(env.backend == Backend::Sqlite);
    ensure!(
        probe.hooks() == expected_hooks,
        "after-commit of the loser ran"
    );
    Ok(())
}

// ------------------------------------------------- handler first (Postgres)
//
// With `handler_first`, a Postgres request with a key runs its handler
// before the key is claimed, and the writes it hands to `Tx::write` commit
// with the key's record in one statement. SQLite ignores the setting: the
// same tests hold there with the key claimed first (the handler then never
// runs for a replay).

/// Handler runs a replay costs: one on Postgres (it runs before the key is
/// looked up), none on SQLite.
fn replay_calls(env: &Env) -> usize {
    usize::from(env.backend == Backend::Postgres)
}

async fn first_writes_commit_with_the_record(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = first_app(&env, probe.clone());
    let first = post_key(&app, "/deferred", "f-1", "w").await?;
    ensure!(
        first.status == StatusCode::CREATED && !first.replayed(),
        "{first:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(count(&env.db, "idempotency_keys").await? == 1);
    ensure!(probe.calls() == 1 && probe.hooks() == 1);
    if env.backend == Backend::Postgres {
        // One transaction wrote both.
        let same: bool = sqlx::query_scalar(
            "SELECT w.xmin::text = k.xmin::text FROM widgets w, idempotency_keys k",
        )
        .fetch_one(env.db.pool())
        .await?;
        ensure!(same, "the widget and the record committed apart");
    }

    let again = post_key(&app, "/deferred", "f-1", "w").await?;
    ensure!(
        again.status == StatusCode::CREATED && again.replayed(),
        "{again:?}"
    );
    ensure!(again.body == first.body && again.header("location") == first.header("location"));
    ensure!(
        probe.calls() == 1 + replay_calls(&env),
        "calls {}",
        probe.calls()
    );
    ensure!(probe.hooks() == 1, "a replay ran an after-commit hook");
    let other = post_key(&app, "/deferred", "f-1", "another").await?;
    ensure!(
        other.status == StatusCode::UNPROCESSABLE_ENTITY && other.is_problem(),
        "{other:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(count(&env.db, "idempotency_keys").await? == 1);
    Ok(())
}

async fn first_lock_claims_the_key(env: Env) -> Result<()> {
    // `/widgets` calls `Tx::lock`: the key is claimed there.
    let probe = Probe::default();
    let app = first_app(&env, probe.clone());
    let first = post_key(&app, "/widgets", "f-lock", "w").await?;
    ensure!(first.status == StatusCode::CREATED && !first.replayed());
    let again = post_key(&app, "/widgets", "f-lock", "w").await?;
    ensure!(again.replayed() && again.body == first.body, "{again:?}");
    ensure!(probe.calls() == 1 + replay_calls(&env));
    ensure!(probe.hooks() == 1);
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

async fn first_key_in_flight_is_409(env: Env) -> Result<()> {
    // A request claiming the key first holds it while its handler waits.
    let probe = Probe::default();
    let usual = app(config(&env), probe.clone());
    let first = {
        let usual = usual.clone();
        tokio::spawn(async move { post_key(&usual, "/widgets/slow", "f-busy", "slow").await })
    };
    tokio::time::timeout(DEADLINE, probe.started.notified())
        .await
        .context("the first request never reached the handler")?;
    let first_app = first_app(&env, probe.clone());
    let dup = {
        let first_app = first_app.clone();
        tokio::spawn(async move { post_key(&first_app, "/deferred", "f-busy", "slow").await })
    };
    match env.backend {
        Backend::Postgres => {
            // Answered at once: the one statement does not wait for the key.
            let dup = tokio::time::timeout(DEADLINE, dup).await???;
            ensure!(
                dup.status == StatusCode::CONFLICT && dup.is_problem(),
                "{dup:?}"
            );
            ensure!(dup.header("retry-after").is_some(), "{dup:?}");
            ensure!(count(&env.db, "widgets").await? == 0, "the 409 wrote");
            probe.release.notify_one();
            let first = tokio::time::timeout(DEADLINE, first).await???;
            ensure!(first.status == StatusCode::CREATED && !first.replayed());
        }
        Backend::Sqlite => {
            // The one writer: the second waits, then finds the key used for
            // another request.
            probe.release.notify_one();
            let first = tokio::time::timeout(DEADLINE, first).await???;
            ensure!(first.status == StatusCode::CREATED && !first.replayed());
            let dup = tokio::time::timeout(DEADLINE, dup).await???;
            ensure!(dup.status == StatusCode::UNPROCESSABLE_ENTITY, "{dup:?}");
        }
    }
    ensure!(count(&env.db, "widgets").await? == 1);
    // Now answered: the handler-first route finds it used for another request.
    let later = post_key(&first_app, "/deferred", "f-busy", "slow").await?;
    ensure!(
        later.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{later:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 1);
    Ok(())
}

async fn first_expired_record_runs_again(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = first_app(&env, probe.clone());
    let first = post_key(&app, "/deferred", "f-exp", "w").await?;
    ensure!(first.status == StatusCode::CREATED);
    sqlx::query("UPDATE idempotency_keys SET expires_at = $1")
        .bind(now_ms() - 1)
        .execute(env.db.pool())
        .await?;
    let again = post_key(&app, "/deferred", "f-exp", "w").await?;
    ensure!(
        again.status == StatusCode::CREATED && !again.replayed(),
        "{again:?}"
    );
    ensure!(again.body != first.body, "the expired answer was replayed");
    ensure!(count(&env.db, "widgets").await? == 2);
    ensure!(
        count(&env.db, "idempotency_keys").await? == 1,
        "the expired record was not replaced"
    );
    ensure!(probe.hooks() == 2, "hooks {}", probe.hooks());
    let third = post_key(&app, "/deferred", "f-exp", "w").await?;
    ensure!(third.replayed() && third.body == again.body, "{third:?}");
    Ok(())
}

async fn first_refusal_gives_way_to_the_record(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = first_app(&env, probe.clone());
    let first = post_key(&app, "/deferred", "f-ref", "w").await?;
    ensure!(first.status == StatusCode::CREATED);
    // The handler now refuses every request (back-pressure, say): a repeat
    // of an answered key still gets its answer...
    probe.failed_once.store(true, Ordering::SeqCst);
    let again = post_key(&app, "/deferred", "f-ref", "w").await?;
    ensure!(
        again.status == StatusCode::CREATED && again.replayed() && again.body == first.body,
        "{again:?}"
    );
    // ...and another body with it is still told the key is reused.
    let other = post_key(&app, "/deferred", "f-ref", "x").await?;
    ensure!(
        other.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{other:?}"
    );
    // A new key gets the refusal, and nothing is written.
    let fresh = post_key(&app, "/deferred", "f-ref-2", "w").await?;
    ensure!(
        fresh.status == StatusCode::SERVICE_UNAVAILABLE && fresh.is_problem(),
        "{fresh:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(count(&env.db, "idempotency_keys").await? == 1);
    Ok(())
}

async fn first_write_error_is_the_handlers_to_answer(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = first_app(&env, probe.clone());
    sqlx::query("INSERT INTO widgets (id, name) VALUES ('taken', 'taken')")
        .execute(env.db.pool())
        .await?;
    // The write fails in the one statement; the request runs again the
    // usual way, where the handler sees the failure and answers it.
    let ans = post_key(&app, "/named", "f-err", "taken").await?;
    ensure!(
        ans.status == StatusCode::CONFLICT && ans.is_problem(),
        "{ans:?}"
    );
    ensure!(
        String::from_utf8_lossy(&ans.body).contains("widget exists"),
        "{ans:?}"
    );
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(
        count(&env.db, "idempotency_keys").await? == 0,
        "a refusal was recorded"
    );
    ensure!(probe.hooks() == 0);
    // Refused, so the key is free: once the id is, the same key succeeds.
    sqlx::query("DELETE FROM widgets")
        .execute(env.db.pool())
        .await?;
    let ok = post_key(&app, "/named", "f-err", "taken").await?;
    ensure!(ok.status == StatusCode::CREATED && !ok.replayed(), "{ok:?}");
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(probe.hooks() == 1);
    Ok(())
}

async fn first_duplicates_at_once_write_once(env: Env) -> Result<()> {
    let probe = Probe::default();
    let app = first_app(&env, probe.clone());
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { post_key(&app, "/deferred", "f-dup", "same").await })
        })
        .collect();
    let mut fresh = Vec::new();
    let mut replayed = Vec::new();
    for t in tasks {
        let ans = tokio::time::timeout(DEADLINE, t).await???;
        match ans.status {
            StatusCode::CREATED if !ans.replayed() => fresh.push(ans.body),
            StatusCode::CREATED => replayed.push(ans.body),
            StatusCode::CONFLICT => ensure!(ans.header("retry-after").is_some()),
            _ => bail!("unexpected answer {ans:?}"),
        }
    }
    ensure!(fresh.len() == 1, "{} requests committed", fresh.len());
    ensure!(
        replayed.iter().all(|b| *b == fresh[0]),
        "a replay differs from the answer that committed"
    );
    ensure!(count(&env.db, "widgets").await? == 1);
    ensure!(
        probe.hooks() == 1,
        "after-commit ran {} times",
        probe.hooks()
    );
    Ok(())
}

/// `run_writes`: several writes, each numbering its placeholders from `$1`,
/// run in one call (one statement on Postgres, one script on SQLite), each
/// with its own values; one failing write fails the call, and the
/// transaction around it keeps none of them.
async fn writes_run_in_order_all_or_none(env: Env) -> Result<()> {
    let widget = |id: &str, name: &str| {
        let (id, name) = (id.to_owned(), name.to_owned());
        Write::new(
            "INSERT INTO widgets (id, name) VALUES ($1, $2)",
            2,
            move |q| q.bind(id).bind(name),
        )
    };
    let rename = |id: &str, name: &str| {
        let (id, name) = (id.to_owned(), name.to_owned());
        Write::new("UPDATE widgets SET name = $2 WHERE id = $1", 2, move |q| {
            q.bind(id).bind(name)
        })
    };
    let mut tx = env.db.begin().await?;
    resilience::store::run_writes(
        &mut tx,
        env.backend,
        vec![widget("a", "one"), widget("b", "two"), widget("c", "three")],
    )
    .await?;
    tx.commit().await?;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM widgets ORDER BY id")
        .fetch_all(env.db.pool())
        .await?;
    ensure!(
        rows == [
            ("a".to_owned(), "one".to_owned()),
            ("b".to_owned(), "two".to_owned()),
            ("c".to_owned(), "three".to_owned()),
        ],
        "{rows:?}"
    );

    // The second write fails (the id is taken): none is kept.
    let mut tx = env.db.begin().await?;
    let failed = resilience::store::run_writes(
        &mut tx,
        env.backend,
        vec![
            rename("a", "renamed"),
            widget("b", "again"),
            widget("d", "four"),
        ],
    )
    .await;
    ensure!(
        failed
            .as_ref()
            .is_err_and(resilience::store::is_unique_violation),
        "{failed:?}"
    );
    tx.rollback().await?;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM widgets ORDER BY id")
        .fetch_all(env.db.pool())
        .await?;
    ensure!(rows.len() == 3 && rows[0].1 == "one", "{rows:?}");
    Ok(())
}
