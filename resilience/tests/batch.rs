//! `resilience::batch` end to end, on SQLite and on Postgres: the server
//! route (one transaction, one answer per request, the run one by one after
//! a refusal, the refusals of malformed batches, signatures) and the client
//! layer against a real server on a loopback port.
//!
//! Which commit wrote a row is read from the database itself: on Postgres
//! every widget row stores `txid_current()` of the transaction that
//! inserted it, on SQLite how many widgets another connection saw committed
//! when it was inserted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt;
use resilience::batch::{
    router as batch_router, BatchConfig, BatchLayer, BatchServerConfig, Coalesce, CoalesceConfig,
};
use resilience::client::HttpClient;
use resilience::idempotency::{IdempotencyConfig, IdempotencyLayer, Tx, IDEMPOTENT_REPLAYED};
use resilience::signing::{Secret, Signer, Verifier, VerifierConfig, VerifySignatureLayer};
use resilience::store::{Backend, Db};
use serde_json::{json, Value};
use service_kit::testing::TestDatabase;
use sqlx::{Executor, Row};
use tower::{Layer, Service, ServiceExt};

const SECRET: &str = "batch-test-secret-0123456789abcdef";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}

#[derive(Clone)]
struct App {
    db: Db,
    /// After-commit hooks run.
    hooks: Arc<AtomicUsize>,
    /// Hooks of `together` widgets wait here for each other.
    together: Arc<tokio::sync::Barrier>,
    /// `together` hooks that gave up waiting (hooks run one after another).
    alone: Arc<AtomicUsize>,
    /// `POST /gate` waits here for a permit.
    gate: Arc<tokio::sync::Semaphore>,
    /// `POST /gate` requests that reached their handler.
    at_gate: Arc<AtomicUsize>,
    /// The after-commit hooks of `hold` widgets wait here for a permit.
    hold: Arc<tokio::sync::Semaphore>,
    /// `hold` hooks that began waiting.
    held: Arc<AtomicUsize>,
}

/// `together` widgets per test batch.
const TOGETHER: usize = 4;

/// `POST /widgets {"id", "name"}`: inserts the widget (with the inserting
/// transaction's id on Postgres), answers 201; a name of `refuse` is
/// inserted and then refused with 422, so only a rollback keeps it out.
async fn create_widget(State(app): State<App>, tx: Tx, Json(body): Json<Value>) -> Response {
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    // Which commit wrote the row: on Postgres the transaction's id; on
    // SQLite how many widgets another connection sees committed now (the
    // same for every row of one transaction, different after each commit).
    let sql = match app.db.backend() {
        Backend::Postgres => {
            "INSERT INTO widgets (id, name, txid) VALUES ($1, $2, txid_current() + $3)"
        }
        Backend::Sqlite => "INSERT INTO widgets (id, name, txid) VALUES ($1, $2, $3)",
    };
    let committed: i64 = match app.db.backend() {
        Backend::Postgres => 0,
        Backend::Sqlite => {
            match sqlx::query_scalar("SELECT COUNT(*) FROM widgets")
                .fetch_one(app.db.pool())
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                }
            }
        }
    };
    {
        let Ok(mut conn) = tx.lock().await else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if let Err(e) = sqlx::query(sql)
            .bind(&id)
            .bind(&name)
            .bind(committed)
            .execute(&mut **conn)
            .await
        {
            return (StatusCode::CONFLICT, e.to_string()).into_response();
        }
    }
    if name == "refuse" {
        return (StatusCode::UNPROCESSABLE_ENTITY, "refused").into_response();
    }
    let hooks = app.hooks.clone();
    tx.after_commit(move || {
        Box::pin(async move {
            hooks.fetch_add(1, Ordering::SeqCst);
        })
    });
    if name == "hold" {
        // Its answer waits for a permit, after the commit.
        let (hold, held) = (app.hold.clone(), app.held.clone());
        tx.after_commit(move || {
            Box::pin(async move {
                held.fetch_add(1, Ordering::SeqCst);
                let _ = hold.acquire().await.map(|p| p.forget());
            })
        });
    }
    if name == "together" {
        // Completes only when the hooks of all `together` requests run at
        // the same time.
        let (barrier, alone) = (app.together.clone(), app.alone.clone());
        tx.after_commit(move || {
            Box::pin(async move {
                if tokio::time::timeout(Duration::from_secs(3), barrier.wait())
                    .await
                    .is_err()
                {
                    alone.fetch_add(1, Ordering::SeqCst);
                }
            })
        });
    }
    (StatusCode::CREATED, Json(json!({"id": id, "name": name}))).into_response()
}

/// `POST /slow {"id", "ms"}`: counts itself in `STARTED`, waits `ms`, then
/// inserts the widget in its transaction.
async fn slow_widget(tx: Tx, Json(body): Json<Value>) -> Response {
    STARTED.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(body["ms"].as_u64().unwrap_or(0))).await;
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let Ok(mut conn) = tx.lock().await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    match sqlx::query("INSERT INTO widgets (id, name, txid) VALUES ($1, 'slow', 0)")
        .bind(&id)
        .execute(&mut **conn)
        .await
    {
        Ok(_) => StatusCode::CREATED.into_response(),
        Err(e) => (StatusCode::CONFLICT, e.to_string()).into_response(),
    }
}

/// `/slow` requests begun, in this test binary.
static STARTED: AtomicUsize = AtomicUsize::new(0);

struct Env {
    test_db: TestDatabase,
    db: Db,
    app: App,
}

impl Env {
    async fn new(backend: Backend) -> Result<Self> {
        let test_db = TestDatabase::create(backend).await?;
        let db = test_db.connect("batch", "batch_test").await?;
        db.migrate_resilience().await?;
        db.pool()
            .execute("CREATE TABLE widgets (id TEXT PRIMARY KEY, name TEXT NOT NULL, txid BIGINT NOT NULL)")
            .await?;
        let app = App {
            db: db.clone(),
            hooks: Arc::new(AtomicUsize::new(0)),
            together: Arc::new(tokio::sync::Barrier::new(TOGETHER)),
            alone: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            at_gate: Arc::new(AtomicUsize::new(0)),
            hold: Arc::new(tokio::sync::Semaphore::new(0)),
            held: Arc::new(AtomicUsize::new(0)),
        };
        Ok(Self { test_db, db, app })
    }

    /// The app with the batch route; `/widgets` signed when `signed`.
    fn router(&self, signed: bool) -> Result<Router> {
        self.router_with(signed, |c| c)
    }

    /// [`Env::router`], with `POST /slow` (the idempotency layer; waits
    /// `ms` from the body, then inserts a widget) and `POST /open` (no
    /// idempotency layer), and the batch route's config adjusted by `f`.
    fn router_with(
        &self,
        signed: bool,
        f: impl FnOnce(BatchServerConfig) -> BatchServerConfig,
    ) -> Result<Router> {
        let idem = IdempotencyLayer::new(IdempotencyConfig::new(self.db.clone()));
        let route = post(create_widget).layer(idem);
        let route = if signed {
            let verifier = Verifier::new(VerifierConfig::new([Secret::from(SECRET)]))?;
            route.route_layer(VerifySignatureLayer::new(verifier))
        } else {
            route
        };
        let slow = post(slow_widget).layer(IdempotencyLayer::new(IdempotencyConfig::new(
            self.db.clone(),
        )));
        let app = Router::new()
            .route("/widgets", route)
            .route("/slow", slow)
            .route("/open", post(|| async { StatusCode::OK }))
            .route(
                "/gate",
                post(|State(app): State<App>| async move {
                    // Holds its group (and its runner) until the test lets it go.
                    app.at_gate.fetch_add(1, Ordering::SeqCst);
                    match app.gate.acquire().await {
                        Ok(permit) => {
                            permit.forget();
                            StatusCode::OK
                        }
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    }
                }),
            )
            .route(
                "/panic",
                post(|State(app): State<App>| async move {
                    // Waits at the gate, then panics.
                    app.at_gate.fetch_add(1, Ordering::SeqCst);
                    if let Ok(permit) = app.gate.acquire().await {
                        permit.forget();
                    }
                    if std::hint::black_box(true) {
                        panic!("a handler that panics");
                    }
                    StatusCode::OK
                }),
            )
            .with_state(self.app.clone());
        Ok(batch_router(
            app,
            f(BatchServerConfig::new(self.db.clone())),
        ))
    }

    async fn rows(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT id, txid FROM widgets ORDER BY id")
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("txid")?)))
            .collect()
    }

    /// Commits that inserted widgets (see `create_widget`).
    async fn writers(&self) -> Result<Option<usize>> {
        let mut txids: Vec<i64> = self.rows().await?.into_iter().map(|(_, t)| t).collect();
        txids.sort_unstable();
        txids.dedup();
        Ok(Some(txids.len()))
    }

    async fn done(self) {
        self.db.close().await;
        self.test_db.cleanup().await;
    }
}

fn widget(id: &str, name: &str, key: Option<&str>) -> Value {
    let mut headers = vec![json!(["content-type", "application/json"])];
    if let Some(key) = key {
        headers.push(json!(["idempotency-key", key]));
    }
    json!({
        "method": "POST",
        "path": "/widgets",
        "headers": headers,
        "body": b64(json!({"id": id, "name": name}).to_string().as_bytes()),
    })
}

async fn send(router: &Router, body: impl Into<Body>) -> Result<(StatusCode, String, Value)> {
    let req = Request::post("/batch")
        .header("content-type", "application/json")
        .body(body.into())?;
    let res = router.clone().oneshot(req).await?;
    let status = res.status();
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = res.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((status, ctype, value))
}

fn statuses(answer: &Value) -> Vec<u64> {
    answer["responses"]
        .as_array()
        .map(|r| r.iter().filter_map(|a| a["status"].as_u64()).collect())
        .unwrap_or_default()
}

fn header<'a>(sub: &'a Value, name: &str) -> Option<&'a str> {
    sub["headers"]
        .as_array()?
        .iter()
        .find_map(|h| (h[0].as_str()? == name).then(|| h[1].as_str()).flatten())
}

// ------------------------------------------------------------------ server

async fn batch_commits_once_and_answers_each(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(false)?;
    let requests: Vec<Value> = (0..20)
        .map(|i| {
            widget(
                &format!("w{i:02}"),
                &format!("n{i}"),
                Some(&format!("k{i}")),
            )
        })
        .collect();
    let batch = json!({ "requests": requests }).to_string();
    let (status, ctype, answer) = send(&router, batch.clone()).await?;
    ensure!(
        status == 200 && ctype == "application/json",
        "{status} {ctype}: {answer}"
    );
    ensure!(statuses(&answer) == vec![201; 20], "{answer}");
    for (i, sub) in answer["responses"]
        .as_array()
        .context("responses")?
        .iter()
        .enumerate()
    {
        let body: Value = serde_json::from_slice(&unb64(sub["body"].as_str().unwrap_or("")))?;
        ensure!(
            body["id"] == format!("w{i:02}"),
            "answer {i} out of order: {body}"
        );
    }
    ensure!(env.rows().await?.len() == 20, "rows");
    if let Some(n) = env.writers().await? {
        ensure!(n == 1, "20 sub-requests took {n} transactions");
    }
    ensure!(env.app.hooks.load(Ordering::SeqCst) == 20, "hooks");

    // The same batch again: every key replays, nothing is written twice.
    let (status, _, answer) = send(&router, batch).await?;
    ensure!(
        status == 200 && statuses(&answer) == vec![201; 20],
        "{answer}"
    );
    for sub in answer["responses"].as_array().context("responses")? {
        ensure!(
            header(sub, IDEMPOTENT_REPLAYED) == Some("true"),
            "not replayed: {sub}"
        );
    }
    ensure!(env.rows().await?.len() == 20, "rows after replay");
    ensure!(
        env.app.hooks.load(Ordering::SeqCst) == 20,
        "hooks after replay"
    );
    env.done().await;
    Ok(())
}

async fn refused_sub_request_runs_the_others_alone(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(false)?;
    let batch = json!({ "requests": [
        widget("a", "ok", Some("ka")),
        widget("b", "refuse", Some("kb")),
        widget("c", "ok", None),
        widget("a", "duplicate id", Some("kd")),
    ]});
    let (status, _, answer) = send(&router, batch.to_string()).await?;
    ensure!(status == 200, "{status}: {answer}");
    ensure!(statuses(&answer) == vec![201, 422, 201, 409], "{answer}");
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["a", "c"], "rows {ids:?}");
    if let Some(n) = env.writers().await? {
        ensure!(n == 2, "each accepted request alone: {n} transactions");
    }
    ensure!(env.app.hooks.load(Ordering::SeqCst) == 2, "hooks");
    // The refused key left nothing behind: it runs again when fixed.
    let (_, _, answer) = send(
        &router,
        json!({ "requests": [widget("b", "fixed", Some("kb"))] }).to_string(),
    )
    .await?;
    ensure!(statuses(&answer) == vec![201], "{answer}");
    env.done().await;
    Ok(())
}

async fn hooks_of_a_batch_run_side_by_side(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(false)?;
    let requests: Vec<Value> = (0..TOGETHER)
        .map(|i| widget(&format!("t{i}"), "together", Some(&format!("kt{i}"))))
        .collect();
    let (status, _, answer) = send(&router, json!({ "requests": requests }).to_string()).await?;
    ensure!(
        status == 200 && statuses(&answer) == vec![201; TOGETHER],
        "{answer}"
    );
    let alone = env.app.alone.load(Ordering::SeqCst);
    ensure!(
        alone == 0,
        "{alone} requests' hooks waited for the others' to finish first"
    );
    ensure!(env.app.hooks.load(Ordering::SeqCst) == TOGETHER, "hooks");
    env.done().await;
    Ok(())
}

async fn one_key_twice_in_a_batch_runs_once(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(false)?;
    // The same request twice: the second is a replay of the first.
    let batch = json!({ "requests": [
        widget("a", "ok", Some("same")),
        widget("b", "ok", Some("other")),
        widget("a", "ok", Some("same")),
    ]});
    let (status, _, answer) = send(&router, batch.to_string()).await?;
    ensure!(
        status == 200 && statuses(&answer) == vec![201, 201, 201],
        "{answer}"
    );
    let third = &answer["responses"][2];
    ensure!(
        header(third, IDEMPOTENT_REPLAYED) == Some("true"),
        "not a replay: {third}"
    );
    // The same key with another request: 422, and nothing of it is kept.
    let batch = json!({ "requests": [
        widget("c", "ok", Some("reused")),
        widget("d", "ok", Some("reused")),
    ]});
    let (_, _, answer) = send(&router, batch.to_string()).await?;
    ensure!(statuses(&answer) == vec![201, 422], "{answer}");
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["a", "b", "c"], "rows {ids:?}");
    env.done().await;
    Ok(())
}

/// Keys looked up together (the first sub-request to look fetches them
/// all): replays, new keys and keys without a record mixed in one batch
/// each get their own answer.
async fn replays_and_new_keys_mixed_in_a_batch(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(false)?;
    let first: Vec<Value> = (0..5)
        .map(|i| widget(&format!("m{i}"), "ok", Some(&format!("km{i}"))))
        .collect();
    let (_, _, answer) = send(&router, json!({ "requests": first }).to_string()).await?;
    ensure!(statuses(&answer) == vec![201; 5], "{answer}");
    // Old keys between new ones, one request without a key, and one old
    // key with another body (422).
    let mut mixed: Vec<Value> = Vec::new();
    for i in 0..10 {
        mixed.push(widget(&format!("m{i}"), "ok", Some(&format!("km{i}"))));
    }
    mixed.insert(3, widget("nokey", "ok", None));
    let (status, _, answer) = send(&router, json!({ "requests": mixed }).to_string()).await?;
    ensure!(
        status == 200 && statuses(&answer) == vec![201; 11],
        "{answer}"
    );
    let replayed: Vec<bool> = answer["responses"]
        .as_array()
        .context("responses")?
        .iter()
        .map(|sub| header(sub, IDEMPOTENT_REPLAYED) == Some("true"))
        .collect();
    let want = [
        true, true, true, false, true, true, false, false, false, false, false,
    ];
    ensure!(replayed == want, "replayed {replayed:?}");
    ensure!(env.rows().await?.len() == 11, "rows");
    // Committed as one batch, not run again one by one.
    if let Some(n) = env.writers().await? {
        ensure!(n == 2, "two batches took {n} transactions");
    }
    let reused = json!({ "requests": [
        widget("x", "ok", Some("km1")),
        widget("y", "ok", Some("fresh")),
    ]});
    let (_, _, answer) = send(&router, reused.to_string()).await?;
    ensure!(statuses(&answer) == vec![422, 201], "{answer}");
    ensure!(env.rows().await?.len() == 12, "rows after the reuse");
    env.done().await;
    Ok(())
}

async fn malformed_batches_change_nothing(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(false)?;
    let good = widget("x", "ok", Some("kx"));
    let mut get = good.clone();
    get["method"] = json!("GET");
    let mut nested = good.clone();
    nested["path"] = json!("/batch?x=1");
    let mut relative = good.clone();
    relative["path"] = json!("widgets");
    let mut bad_b64 = good.clone();
    bad_b64["body"] = json!("not base64!");
    let mut bad_header = good.clone();
    bad_header["headers"] = json!([["x-evil", "line\nbreak"]]);
    let mut bad_name = good.clone();
    bad_name["headers"] = json!([["bad name", "v"]]);
    let mut bad_method = good.clone();
    bad_method["method"] = json!("P O S T");
    let mut extra = json!({ "requests": [good.clone()] });
    extra["more"] = json!(1);
    let too_many: Vec<Value> = (0..257).map(|_| good.clone()).collect();
    let cases: Vec<(&str, String)> = vec![
        ("not json", "{".into()),
        ("not an object", "[]".into()),
        ("no requests", json!({"requests": []}).to_string()),
        ("unknown field", extra.to_string()),
        ("257 requests", json!({ "requests": too_many }).to_string()),
        (
            "GET",
            json!({ "requests": [good.clone(), get] }).to_string(),
        ),
        (
            "nested",
            json!({ "requests": [good.clone(), nested] }).to_string(),
        ),
        (
            "relative path",
            json!({ "requests": [relative] }).to_string(),
        ),
        (
            "bad base64",
            json!({ "requests": [good.clone(), bad_b64] }).to_string(),
        ),
        (
            "bad header value",
            json!({ "requests": [bad_header] }).to_string(),
        ),
        (
            "bad header name",
            json!({ "requests": [bad_name] }).to_string(),
        ),
        (
            "bad method",
            json!({ "requests": [bad_method] }).to_string(),
        ),
        ("NUL in JSON", "{\"requests\": [\u{0}]}".into()),
    ];
    for (what, body) in cases {
        let (status, ctype, answer) = send(&router, body).await?;
        ensure!(
            status == 400 && ctype == "application/problem+json",
            "{what}: {status} {ctype} {answer}"
        );
    }
    let big = vec![b'x'; (4 << 20) + 1];
    let (status, ctype, _) = send(&router, big).await?;
    ensure!(
        status == 413 && ctype == "application/problem+json",
        "oversize: {status} {ctype}"
    );
    let res = router
        .clone()
        .oneshot(Request::get("/batch").body(Body::empty())?)
        .await?;
    ensure!(res.status() == 405, "GET /batch: {}", res.status());
    ensure!(env.rows().await?.is_empty(), "a refused batch wrote");
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idempotency_keys")
        .fetch_one(env.db.pool())
        .await?;
    ensure!(
        left == 0,
        "{left} idempotency records after refused batches"
    );
    env.done().await;
    Ok(())
}

fn signed(signer: &Signer, sub: &Value) -> Result<Value> {
    let mut sub = sub.clone();
    let body = unb64(sub["body"].as_str().unwrap_or(""));
    let mut headers = http::HeaderMap::new();
    for h in sub["headers"].as_array().context("headers")? {
        headers.insert(
            http::HeaderName::from_bytes(h[0].as_str().unwrap_or("").as_bytes())?,
            HeaderValue::from_str(h[1].as_str().unwrap_or(""))?,
        );
    }
    signer.sign(&Method::POST, &"/widgets".parse()?, &mut headers, &body);
    sub["headers"] = headers
        .iter()
        .map(|(n, v)| Ok(json!([n.as_str(), v.to_str()?])))
        .collect::<Result<Vec<_>>>()?
        .into();
    Ok(sub)
}

async fn signatures_survive_the_rerun_and_replays_do_not(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(true)?;
    let signer = Signer::new(Secret::from(SECRET))?;
    let a = signed(&signer, &widget("a", "ok", Some("ka")))?;
    let refuse = signed(&signer, &widget("b", "refuse", Some("kb")))?;
    let c = signed(&signer, &widget("c", "ok", Some("kc")))?;
    let unsigned = widget("d", "ok", Some("kd"));
    // The refusal forces the run one by one: the signed requests that were
    // admitted once are admitted again, once; the copy of `a` is a replay.
    let batch = json!({ "requests": [a.clone(), unsigned, refuse, c, a.clone()] });
    let (status, _, answer) = send(&router, batch.to_string()).await?;
    ensure!(status == 200, "{status}: {answer}");
    ensure!(
        statuses(&answer) == vec![201, 401, 422, 201, 401],
        "{answer}"
    );
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["a", "c"], "rows {ids:?}");
    // Without a refusal the copy is refused in the shared run as well.
    let e = signed(&signer, &widget("e", "ok", Some("ke")))?;
    let (_, _, answer) = send(
        &router,
        json!({ "requests": [e.clone(), e.clone()] }).to_string(),
    )
    .await?;
    ensure!(statuses(&answer) == vec![201, 401], "{answer}");
    // The whole batch again: every nonce was seen.
    let (_, _, answer) = send(&router, batch.to_string()).await?;
    ensure!(statuses(&answer) == vec![401; 5], "{answer}");
    ensure!(env.rows().await?.len() == 3, "rows");
    env.done().await;
    Ok(())
}

// ------------------------------------------------------------------ client

/// Serves `router` on a loopback port; counts the exchanges by path.
async fn serve(router: Router) -> Result<(SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
    let batches = Arc::new(AtomicUsize::new(0));
    let singles = Arc::new(AtomicUsize::new(0));
    let (b, s) = (batches.clone(), singles.clone());
    let router = router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let counter = if req.uri().path() == "/batch" {
                b.clone()
            } else {
                s.clone()
            };
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                next.run(req).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, batches, singles))
}

fn client(max_in_flight: usize) -> Result<resilience::batch::Batching<HttpClient>> {
    Ok(BatchLayer::new(BatchConfig {
        max_in_flight,
        max_batch: 16,
        ..BatchConfig::default()
    })
    .layer(HttpClient::new(Duration::from_secs(10))?))
}

async fn post_widgets(
    svc: &resilience::batch::Batching<HttpClient>,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<StatusCode>> {
    let sends = (0..n).map(|i| {
        let svc = svc.clone();
        async move {
            let req = http::Request::post(format!("http://{addr}/widgets"))
                .header("content-type", "application/json")
                .header("idempotency-key", format!("key-{i}"))
                .body(Bytes::from(
                    json!({"id": format!("w{i:03}"), "name": "n"}).to_string(),
                ))?;
            let res = svc.oneshot(req).await.map_err(|e| anyhow::anyhow!(e))?;
            let body: Value = serde_json::from_slice(res.body())?;
            ensure!(
                res.status() != StatusCode::CREATED || body["id"] == format!("w{i:03}"),
                "answer of {i}: {body}"
            );
            Ok(res.status())
        }
    });
    futures::future::try_join_all(sends).await
}

async fn client_batches_waiting_requests(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let (addr, batches, singles) = serve(env.router(false)?).await?;
    let svc = client(1)?;
    let statuses = post_widgets(&svc, addr, 60).await?;
    ensure!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    ensure!(env.rows().await?.len() == 60, "rows");
    let (b, s) = (
        batches.load(Ordering::SeqCst),
        singles.load(Ordering::SeqCst),
    );
    // One exchange in flight: the first goes alone, the others wait for it
    // and leave together, 16 at most per exchange.
    ensure!(
        b >= 4 && b + s < 60,
        "{b} batches and {s} single sends for 60 requests"
    );
    if let Some(n) = env.writers().await? {
        ensure!(n < 60, "60 requests in {n} transactions");
    }
    env.done().await;
    Ok(())
}

async fn client_falls_back_without_a_batch_route(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    // The app alone: POST /batch is 404.
    let idem = IdempotencyLayer::new(IdempotencyConfig::new(env.db.clone()));
    let app = Router::new()
        .route("/widgets", post(create_widget).layer(idem))
        .with_state(env.app.clone());
    let (addr, batches, singles) = serve(app).await?;
    let svc = client(1)?;
    let statuses = post_widgets(&svc, addr, 30).await?;
    ensure!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    ensure!(env.rows().await?.len() == 30, "rows");
    let tried = batches.load(Ordering::SeqCst);
    ensure!(
        tried == 1,
        "asked the batch route {tried} times; once is enough"
    );
    ensure!(singles.load(Ordering::SeqCst) == 30, "singles");

    // With a short recheck, the route is asked again once it has passed
    // (a passing 404, an older replica): batching is not off for good.
    let svc = BatchLayer::new(BatchConfig {
        max_in_flight: 1,
        max_batch: 16,
        recheck_after: Duration::from_millis(300),
        ..BatchConfig::default()
    })
    .layer(HttpClient::new(Duration::from_secs(10))?);
    let before = batches.load(Ordering::SeqCst);
    post_widgets(&svc, addr, 30).await?;
    let after_first = batches.load(Ordering::SeqCst);
    ensure!(
        after_first > before,
        "the new client never asked the batch route"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    post_widgets(&svc, addr, 30).await?;
    let after_second = batches.load(Ordering::SeqCst);
    ensure!(
        after_second > after_first,
        "the batch route was not asked again after the recheck time ({after_first} then {after_second})"
    );
    env.done().await;
    Ok(())
}

async fn client_reports_a_failed_exchange_to_each_request(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    // A port with nobody listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let svc = client(1)?;
    let sends = (0..10).map(|i| {
        let svc = svc.clone();
        async move {
            let req = http::Request::post(format!("http://{addr}/widgets"))
                .body(Bytes::from(format!("{i}")))?;
            anyhow::Ok(svc.oneshot(req).await.is_err())
        }
    });
    let failed = futures::future::try_join_all(sends).await?;
    ensure!(failed.iter().all(|f| *f), "{failed:?}");
    env.done().await;
    Ok(())
}

/// A flush task that panics (here: the transport panics on the batch
/// exchange) gives its place back: the requests in that batch and those
/// that queued behind it fail at once instead of waiting forever, and the
/// peer's next request is still sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_survives_a_panicking_exchange() -> Result<()> {
    // The batch exchange says it began, waits to be released, then panics.
    let entered = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let inner = {
        let (entered, release) = (entered.clone(), release.clone());
        tower::service_fn(move |req: http::Request<Bytes>| {
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                if req.uri().path() == "/batch" {
                    entered.notify_one();
                    release.notified().await;
                    panic!("transport panics on the batch exchange (test)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, std::convert::Infallible>(http::Response::new(Bytes::from_static(b"{}")))
            }
        })
    };
    let svc = BatchLayer::new(BatchConfig {
        max_in_flight: 1,
        max_batch: 16,
        ..BatchConfig::default()
    })
    .layer(inner);
    let send = |i: usize| {
        let svc = svc.clone();
        async move {
            let req = http::Request::post(format!("http://127.0.0.1:9/w/{i}")).body(Bytes::new())?;
            svc.oneshot(req).await.map_err(|e| anyhow::anyhow!(e))
        }
    };
    // One leaves alone, the others wait and leave together: a panic.
    let first = tokio::spawn(futures::future::join_all((0..10).map(send)));
    tokio::time::timeout(Duration::from_secs(5), entered.notified())
        .await
        .context("no batch exchange began")?;
    // These queue behind the exchange (`call` queues them at once; the
    // exchange is in flight, so no flush is started for them).
    let mut behind = Vec::new();
    for i in 10..15 {
        let req = http::Request::post(format!("http://127.0.0.1:9/w/{i}")).body(Bytes::new())?;
        let mut svc = svc.clone();
        behind.push(svc.ready().await.map_err(|e| anyhow::anyhow!(e))?.call(req));
    }
    release.notify_one();
    let (first, behind) = tokio::time::timeout(Duration::from_secs(5), async {
        (first.await, futures::future::join_all(behind).await)
    })
    .await
    .context("requests of the panicking exchange, or queued behind it, waited forever")?;
    let failed = first?.iter().filter(|r| r.is_err()).count();
    ensure!(failed >= 1, "no request met the panicking exchange");
    ensure!(
        behind.iter().all(|r| r.is_err()),
        "a request queued behind the panic got an answer: {behind:?}"
    );
    // The peer's next request is still sent.
    let next = tokio::time::timeout(Duration::from_secs(5), send(99))
        .await
        .context("the peer's next request waited forever after the panic")??;
    ensure!(next.status() == StatusCode::OK, "{}", next.status());
    Ok(())
}

fn slow(id: &str, ms: u64) -> Value {
    json!({
        "method": "POST",
        "path": "/slow",
        "headers": [["content-type", "application/json"], ["idempotency-key", format!("slow-{id}")]],
        "body": b64(json!({"id": id, "ms": ms}).to_string().as_bytes()),
    })
}

/// The limits a batch meets before and while it runs: the envelope's media
/// type, headers per request, the routes it may name, its time in the
/// transaction and the batches served at once. Each refusal is a
/// problem+json answer and leaves nothing written.
async fn batches_are_bounded(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router_with(false, |c| {
        let mut c = c
            .allow(Method::POST, "/widgets")
            .allow(Method::POST, "/slow");
        // The first batch below runs 600 ms: longer than a second batch
        // waits for its turn (200 ms), well inside the time limit (1 s),
        // with room either side for a loaded CI machine (a 250 ms batch
        // under a 300 ms limit once answered 503 there).
        c.max_duration = Duration::from_millis(1000);
        c.max_concurrent = 1;
        c.max_wait = Duration::from_millis(200);
        c
    })?;
    let body = |reqs: Vec<Value>| json!({ "requests": reqs }).to_string();

    // The envelope must say JSON (a browser's simple text/plain POST must
    // not reach the routes).
    let req = Request::post("/batch")
        .header("content-type", "text/plain")
        .body(Body::from(body(vec![widget("a", "ok", Some("ka"))])))?;
    let res = router.clone().oneshot(req).await?;
    ensure!(
        res.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "text/plain: {}",
        res.status()
    );
    ensure!(
        res.headers().get("content-type")
            == Some(&HeaderValue::from_static("application/problem+json")),
        "text/plain answer is not problem+json"
    );

    // 65 headers in one request.
    let mut crowded = widget("b", "ok", Some("kb"));
    let mut headers = vec![json!(["content-type", "application/json"])];
    headers.extend((0..64).map(|i| json!([format!("x-h{i}"), "v"])));
    crowded["headers"] = json!(headers);
    let (status, ctype, problem) = send(&router, body(vec![crowded])).await?;
    ensure!(
        status == StatusCode::BAD_REQUEST && ctype == "application/problem+json",
        "65 headers: {status} {problem}"
    );

    // A route outside the allowed list (no idempotency layer: it would run
    // outside the transaction).
    let mut open = widget("c", "ok", Some("kc"));
    open["path"] = json!("/open");
    let (status, _, problem) =
        send(&router, body(vec![widget("d", "ok", Some("kd")), open])).await?;
    ensure!(
        status == StatusCode::BAD_REQUEST,
        "POST /open: {status} {problem}"
    );
    ensure!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot be batched"),
        "{problem}"
    );
    ensure!(
        env.rows().await?.is_empty(),
        "a refused batch wrote {:?}",
        env.rows().await?
    );

    // Over its time: the batch rolls back as a whole and answers 503; the
    // widget written before the slow request is gone, no hook ran.
    let hooks = env.app.hooks.load(Ordering::SeqCst);
    let (status, ctype, problem) = send(
        &router,
        body(vec![widget("e", "ok", Some("ke")), slow("f", 5_000)]),
    )
    .await?;
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE && ctype == "application/problem+json",
        "slow batch: {status} {problem}"
    );
    ensure!(
        env.rows().await?.is_empty(),
        "a timed-out batch kept {:?}",
        env.rows().await?
    );
    ensure!(
        env.app.hooks.load(Ordering::SeqCst) == hooks,
        "a timed-out batch ran hooks"
    );

    // One batch at a time: the second waits 200 ms for its turn, then 503.
    let started = STARTED.load(Ordering::SeqCst);
    let first = {
        let router = router.clone();
        let b = body(vec![slow("g", 600)]);
        tokio::spawn(async move { send(&router, b).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while STARTED.load(Ordering::SeqCst) == started {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the first batch never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, _, problem) = send(&router, body(vec![widget("h", "ok", Some("kh"))])).await?;
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE,
        "second batch: {status} {problem}"
    );
    let (status, _, answer) = first.await??;
    ensure!(
        status == StatusCode::OK && statuses(&answer) == vec![201],
        "first batch: {status} {answer}"
    );
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == vec!["g".to_owned()], "rows {ids:?}");
    env.done().await;
    Ok(())
}

/// A batch whose requests are all refused before their idempotency layer
/// (here: unsigned requests to a signed route) begins no transaction: it
/// answers while every connection a transaction could use is held
/// elsewhere (on SQLite, the one writer).
async fn refused_before_the_layer_holds_no_transaction(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let router = env.router(true)?;
    let mut held_tx = None;
    let mut held_conns = Vec::new();
    match backend {
        Backend::Sqlite => held_tx = Some(env.db.begin().await?),
        Backend::Postgres => {
            let max = env.db.pool().options().get_max_connections();
            for _ in 0..max {
                held_conns.push(env.db.pool().acquire().await?);
            }
        }
    }
    let reqs: Vec<Value> = (0..3)
        .map(|i| widget(&format!("u{i}"), "ok", Some(&format!("ku{i}"))))
        .collect();
    let sent = tokio::time::timeout(
        Duration::from_secs(5),
        send(&router, json!({ "requests": reqs }).to_string()),
    )
    .await;
    drop(held_tx);
    drop(held_conns);
    let (status, _, answer) = sent.context("the batch waited for a database connection")??;
    ensure!(
        status == StatusCode::OK && statuses(&answer) == vec![401, 401, 401],
        "{status} {answer}"
    );
    ensure!(env.rows().await?.is_empty(), "rows {:?}", env.rows().await?);
    env.done().await;
    Ok(())
}

// ------------------------------------------------------------ group commit

/// The app behind [`Coalesce`] with `/widgets`, `/gate` and `/panic`
/// grouped, one group at a time.
fn coalesced(env: &Env) -> Result<Coalesce> {
    let server = BatchServerConfig::new(env.db.clone())
        .allow(Method::POST, "/widgets")
        .allow(Method::POST, "/gate")
        .allow(Method::POST, "/panic")
        .refuse_header(http::HeaderName::from_static("x-alone"));
    let mut config = CoalesceConfig::new(server);
    config.max_in_flight = 1;
    Ok(Coalesce::new(env.router(false)?, config))
}

/// `POST path` with a JSON `body` (and `Content-Length`), through `svc`.
async fn post_one(
    svc: &Coalesce,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> Result<(StatusCode, http::HeaderMap, Value)> {
    post_raw(svc, path, body.to_string(), key).await
}

/// [`post_one`] with a body as it is.
async fn post_raw(
    svc: &Coalesce,
    path: &str,
    bytes: String,
    key: Option<&str>,
) -> Result<(StatusCode, http::HeaderMap, Value)> {
    let mut req = Request::post(path)
        .header("content-type", "application/json")
        .header("content-length", bytes.len());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let res = svc.clone().oneshot(req.body(Body::from(bytes))?).await?;
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((parts.status, parts.headers, value))
}

/// Holds the runner with a `/gate` request, queues `n` requests made by
/// `make`, waits (with a deadline) until all `n` wait, then opens the gate:
/// the `n` leave as one group. Their answers, in order.
async fn queued_then_released<F, Fut>(
    env: &Env,
    svc: &Coalesce,
    n: usize,
    make: F,
) -> Result<Vec<(StatusCode, http::HeaderMap, Value)>>
where
    F: Fn(usize) -> Fut,
    Fut:
        std::future::Future<Output = Result<(StatusCode, http::HeaderMap, Value)>> + Send + 'static,
{
    let mut answers = Vec::with_capacity(n);
    for t in queued_then_let_go(env, svc, n, make).await? {
        answers.push(t.await??);
    }
    Ok(answers)
}

type Answered = tokio::task::JoinHandle<Result<(StatusCode, http::HeaderMap, Value)>>;

/// [`queued_then_released`], without waiting for the answers.
async fn queued_then_let_go<F, Fut>(
    env: &Env,
    svc: &Coalesce,
    n: usize,
    make: F,
) -> Result<Vec<Answered>>
where
    F: Fn(usize) -> Fut,
    Fut:
        std::future::Future<Output = Result<(StatusCode, http::HeaderMap, Value)>> + Send + 'static,
{
    let gate = hold_the_runner(env, svc).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // One after another, each queued before the next is sent: the group
    // holds them in this order.
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(make(i)));
        until(
            deadline,
            &format!("request {i} of {n} never queued"),
            || svc.waiting() > i,
        )
        .await?;
    }
    let_go(env, gate).await?;
    Ok(tasks)
}

/// Polls `done` every millisecond until it holds; fails with `what` past
/// `deadline`.
async fn until(
    deadline: tokio::time::Instant,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<()> {
    while !done() {
        ensure!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Sends `POST /gate` and waits (with a deadline) until it runs: it holds
/// the one runner until [`let_go`].
async fn hold_the_runner(env: &Env, svc: &Coalesce) -> Result<Answered> {
    let gate = {
        let svc = svc.clone();
        tokio::spawn(async move { post_one(&svc, "/gate", &json!({}), None).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    until(deadline, "the gate never ran", || {
        env.app.at_gate.load(Ordering::SeqCst) > 0 && !gate.is_finished()
    })
    .await?;
    Ok(gate)
}

/// Opens the gate of [`hold_the_runner`] and waits for its answer.
async fn let_go(env: &Env, gate: Answered) -> Result<()> {
    env.app.at_gate.store(0, Ordering::SeqCst);
    env.app.gate.add_permits(1);
    let (status, _, _) = gate.await??;
    ensure!(status == StatusCode::OK, "gate: {status}");
    Ok(())
}

async fn a_slow_hook_holds_up_no_group(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let svc = coalesced(&env)?;
    let limit = Duration::from_secs(10);
    // However the test ends, the held hooks are let go (a failure must not
    // leave tasks waiting forever).
    struct LetGo(Arc<tokio::sync::Semaphore>);
    impl Drop for LetGo {
        fn drop(&mut self) {
            self.0.add_permits(16);
        }
    }
    let _let_go = LetGo(env.app.hold.clone());
    // Alone: its hook waits; the next request is answered meanwhile.
    let held = {
        let svc = svc.clone();
        tokio::spawn(async move {
            post_one(
                &svc,
                "/widgets",
                &json!({"id": "h1", "name": "hold"}),
                Some("kh1"),
            )
            .await
        })
    };
    let deadline = tokio::time::Instant::now() + limit;
    until(deadline, "the hook never ran", || {
        env.app.held.load(Ordering::SeqCst) > 0
    })
    .await?;
    let x1 = json!({"id": "x1", "name": "ok"});
    let next = post_one(&svc, "/widgets", &x1, None);
    let (status, _, _) = tokio::time::timeout(limit, next)
        .await
        .context("a request waited for another's hook")??;
    ensure!(status == StatusCode::CREATED, "x1: {status}");
    ensure!(!held.is_finished(), "h1 answered before its hook ran");
    // In a group: the others are answered while its hook waits.
    let mut tasks = queued_then_let_go(&env, &svc, 3, |i| {
        let svc = svc.clone();
        async move {
            let name = if i == 0 { "hold" } else { "ok" };
            post_one(
                &svc,
                "/widgets",
                &json!({"id": format!("g{i}"), "name": name}),
                None,
            )
            .await
        }
    })
    .await?;
    for t in tasks.drain(1..) {
        let (status, _, body) = tokio::time::timeout(limit, t)
            .await
            .context("a request of the group waited for another's hook")???;
        ensure!(status == StatusCode::CREATED, "{status} {body}");
    }
    ensure!(!tasks[0].is_finished(), "g0 answered before its hook ran");
    env.app.hold.add_permits(2);
    let (status, _, _) = held.await??;
    ensure!(status == StatusCode::CREATED, "h1: {status}");
    for t in tasks {
        let (status, _, _) = t.await??;
        ensure!(status == StatusCode::CREATED, "g0: {status}");
    }
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["g0", "g1", "g2", "h1", "x1"], "rows {ids:?}");
    env.done().await;
    Ok(())
}

async fn coalesced_requests_commit_once_and_answer_each(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let svc = coalesced(&env)?;
    let answers = queued_then_released(&env, &svc, 12, |i| {
        let svc = svc.clone();
        async move {
            let key = (i % 3 != 0).then(|| format!("k{i}"));
            // Request 5 is refused before its handler touches the
            // transaction (not a widget): the group goes on without it.
            let body = match i {
                5 => "{\"id\": ".to_owned(),
                _ => json!({"id": format!("w{i:02}"), "name": format!("n{i}")}).to_string(),
            };
            post_raw(&svc, "/widgets", body, key.as_deref()).await
        }
    })
    .await?;
    for (i, (status, _, body)) in answers.iter().enumerate() {
        if i == 5 {
            ensure!(status.is_client_error(), "request 5: {status} {body}");
            continue;
        }
        ensure!(
            *status == StatusCode::CREATED,
            "request {i}: {status} {body}"
        );
        ensure!(body["id"] == format!("w{i:02}"), "request {i} got {body}");
    }
    ensure!(
        env.rows().await?.len() == 11,
        "rows {:?}",
        env.rows().await?
    );
    if let Some(n) = env.writers().await? {
        ensure!(n == 1, "12 queued requests took {n} transactions");
    }
    ensure!(env.app.hooks.load(Ordering::SeqCst) == 11, "hooks");
    // The refused key kept nothing: sent again, well formed, it runs.
    let (status, _, _) = post_one(
        &svc,
        "/widgets",
        &json!({"id": "w05", "name": "n5"}),
        Some("k5"),
    )
    .await?;
    ensure!(status == StatusCode::CREATED, "k5 again: {status}");
    // A repeat, alone now, replays the group's answer and writes nothing.
    let (status, headers, body) = post_one(
        &svc,
        "/widgets",
        &json!({"id": "w04", "name": "n4"}),
        Some("k4"),
    )
    .await?;
    ensure!(
        status == StatusCode::CREATED && body["id"] == "w04",
        "{status} {body}"
    );
    ensure!(
        headers
            .get(IDEMPOTENT_REPLAYED)
            .and_then(|v| v.to_str().ok())
            == Some("true"),
        "not replayed: {headers:?}"
    );
    ensure!(env.rows().await?.len() == 12, "rows after the replay");
    ensure!(svc.waiting() == 0, "left waiting");
    env.done().await;
    Ok(())
}

async fn coalesced_refusals_answer_each_as_alone(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let svc = coalesced(&env)?;
    // What each request is, and what it must be answered alone.
    let cases: Vec<(Value, Option<&'static str>, u16)> = vec![
        (json!({"id": "a", "name": "ok"}), Some("ka"), 201),
        (json!({"id": "b", "name": "refuse"}), Some("kb"), 422),
        (json!({"id": "c", "name": "ok"}), None, 201),
        (json!({"id": "a", "name": "duplicate id"}), Some("kd"), 409),
        // The key of the first request, another body: 422 (key reused).
        (json!({"id": "e", "name": "other"}), Some("ka"), 422),
        (json!({"id": "f", "name": "ok"}), Some("kf"), 201),
    ];
    let shared = Arc::new(cases.clone());
    let answers = queued_then_released(&env, &svc, cases.len(), |i| {
        let (svc, shared) = (svc.clone(), shared.clone());
        async move {
            let (body, key, _) = &shared[i];
            post_one(&svc, "/widgets", body, *key).await
        }
    })
    .await?;
    let got: Vec<u16> = answers.iter().map(|(s, _, _)| s.as_u16()).collect();
    let want: Vec<u16> = cases.iter().map(|(_, _, s)| *s).collect();
    ensure!(
        got == want,
        "answers {got:?}, alone they are {want:?}: {answers:?}"
    );
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["a", "c", "f"], "rows {ids:?}");
    if let Some(n) = env.writers().await? {
        ensure!(n == 3, "each accepted request alone: {n} transactions");
    }
    ensure!(env.app.hooks.load(Ordering::SeqCst) == 3, "hooks");
    // The refused key left nothing: fixed, it runs.
    let (status, _, _) = post_one(
        &svc,
        "/widgets",
        &json!({"id": "b", "name": "fixed"}),
        Some("kb"),
    )
    .await?;
    ensure!(status == StatusCode::CREATED, "fixed: {status}");
    env.done().await;
    Ok(())
}

async fn requests_outside_groups_go_straight_through(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let svc = coalesced(&env)?;
    // The runner is held: a request that queued would wait for it.
    let gate = hold_the_runner(&env, &svc).await?;
    let limit = Duration::from_secs(10);
    // No Content-Length (a streamed body): straight to the app.
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"id\": \"s\", ")),
        Ok(Bytes::from_static(b"\"name\": \"streamed\"}")),
    ];
    let req = Request::post("/widgets")
        .header("content-type", "application/json")
        .body(Body::from_stream(futures::stream::iter(chunks)))?;
    let res = tokio::time::timeout(limit, svc.clone().oneshot(req))
        .await
        .context("a streamed request queued")??;
    ensure!(
        res.status() == StatusCode::CREATED,
        "streamed: {}",
        res.status()
    );
    // A refused header, a route not grouped, a body over the limit.
    let big = "x".repeat(70 << 10);
    for (path, body, header) in [
        (
            "/widgets",
            json!({"id": "h", "name": "ok"}),
            Some("x-alone"),
        ),
        ("/open", json!({}), None),
        ("/widgets", json!({"id": "big", "name": big}), None),
    ] {
        let bytes = body.to_string();
        let mut req = Request::post(path)
            .header("content-type", "application/json")
            .header("content-length", bytes.len());
        if let Some(h) = header {
            req = req.header(h, "1");
        }
        let res = tokio::time::timeout(limit, svc.clone().oneshot(req.body(Body::from(bytes))?))
            .await
            .with_context(|| format!("{path} ({header:?}) queued"))??;
        ensure!(res.status().is_success(), "{path}: {}", res.status());
    }
    let_go(&env, gate).await?;
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["big", "h", "s"], "rows {ids:?}");
    // A body shorter than its Content-Length: 400, nothing written.
    let req = Request::post("/widgets")
        .header("content-type", "application/json")
        .header("content-length", 100)
        .body(Body::from("{\"id\": \"short\"}"))?;
    let res = svc.clone().oneshot(req).await?;
    ensure!(
        res.status() == StatusCode::BAD_REQUEST,
        "short body: {}",
        res.status()
    );
    ensure!(env.rows().await?.len() == 3, "rows after the short body");
    env.done().await;
    Ok(())
}

async fn a_panicking_group_leaves_the_queue_served(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let svc = coalesced(&env)?;
    let limit = Duration::from_secs(10);
    // A group whose second request panics, once the test lets it.
    let group = queued_then_let_go(&env, &svc, 3, |i| {
        let svc = svc.clone();
        async move {
            match i {
                1 => post_one(&svc, "/panic", &json!({}), None).await,
                _ => {
                    post_one(
                        &svc,
                        "/widgets",
                        &json!({"id": format!("p{i}"), "name": "ok"}),
                        None,
                    )
                    .await
                }
            }
        }
    })
    .await?;
    // The group runs and waits at /panic's gate; a request queues behind it.
    let deadline = tokio::time::Instant::now() + limit;
    until(deadline, "/panic never ran", || {
        env.app.at_gate.load(Ordering::SeqCst) > 0
    })
    .await?;
    let after = {
        let svc = svc.clone();
        tokio::spawn(async move {
            post_one(
                &svc,
                "/widgets",
                &json!({"id": "after", "name": "ok"}),
                None,
            )
            .await
        })
    };
    until(deadline, "the last request never queued", || {
        svc.waiting() > 0
    })
    .await?;
    env.app.gate.add_permits(1);
    let mut got = Vec::new();
    for t in group {
        let (status, _, _) = tokio::time::timeout(limit, t)
            .await
            .context("no answer")???;
        got.push(status.as_u16());
    }
    ensure!(
        got == [500, 500, 500],
        "the panicking group's answers {got:?}"
    );
    // The one runner went on: the request behind the group is served.
    let (status, _, _) = tokio::time::timeout(limit, after)
        .await
        .context("the queue was left without a runner")???;
    ensure!(status == StatusCode::CREATED, "after the panic: {status}");
    let ids: Vec<String> = env.rows().await?.into_iter().map(|(id, _)| id).collect();
    ensure!(ids == ["after"], "rows {ids:?}");
    env.done().await;
    Ok(())
}

async fn a_queue_sheds_what_waited_too_long(backend: Backend) -> Result<()> {
    let env = Env::new(backend).await?;
    let server = BatchServerConfig::new(env.db.clone())
        .allow(Method::POST, "/widgets")
        .allow(Method::POST, "/gate");
    let mut config = CoalesceConfig::new(server);
    config.max_in_flight = 1;
    config.max_wait = Duration::from_millis(50);
    let svc = Coalesce::new(env.router(false)?, config);
    let gate = hold_the_runner(&env, &svc).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // One request whose client hangs up while it waits, one that waits.
    let gone = {
        let svc = svc.clone();
        tokio::spawn(async move {
            post_one(&svc, "/widgets", &json!({"id": "gone", "name": "ok"}), None).await
        })
    };
    until(deadline, "never queued", || svc.waiting() >= 1).await?;
    gone.abort();
    let late = {
        let svc = svc.clone();
        tokio::spawn(async move {
            post_one(
                &svc,
                "/widgets",
                &json!({"id": "late", "name": "ok"}),
                Some("kl"),
            )
            .await
        })
    };
    until(deadline, "never queued", || svc.waiting() >= 2).await?;
    // Longer than max_wait.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let_go(&env, gate).await?;
    let (status, headers, body) = late.await??;
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE,
        "late: {status} {body}"
    );
    ensure!(
        headers.contains_key("retry-after"),
        "no Retry-After: {headers:?}"
    );
    ensure!(env.rows().await?.is_empty(), "rows {:?}", env.rows().await?);
    // Nothing of it ran: the key is free.
    let (status, _, _) = post_one(
        &svc,
        "/widgets",
        &json!({"id": "late", "name": "ok"}),
        Some("kl"),
    )
    .await?;
    ensure!(status == StatusCode::CREATED, "late again: {status}");
    ensure!(env.rows().await?.len() == 1, "rows after");
    env.done().await;
    Ok(())
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> { super::$name(resilience::store::Backend::Sqlite).await }
        )* }
        mod postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> { super::$name(resilience::store::Backend::Postgres).await }
        )* }
    };
}

on_both_backends!(
    batch_commits_once_and_answers_each,
    refused_sub_request_runs_the_others_alone,
    one_key_twice_in_a_batch_runs_once,
    replays_and_new_keys_mixed_in_a_batch,
    hooks_of_a_batch_run_side_by_side,
    malformed_batches_change_nothing,
    signatures_survive_the_rerun_and_replays_do_not,
    client_batches_waiting_requests,
    client_falls_back_without_a_batch_route,
    client_reports_a_failed_exchange_to_each_request,
    batches_are_bounded,
    refused_before_the_layer_holds_no_transaction,
    coalesced_requests_commit_once_and_answer_each,
    coalesced_refusals_answer_each_as_alone,
    requests_outside_groups_go_straight_through,
    a_panicking_group_leaves_the_queue_served,
    a_slow_hook_holds_up_no_group,
    a_queue_sheds_what_waited_too_long,
);
