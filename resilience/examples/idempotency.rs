//! The server-side `Idempotency-Key` layer on SQLite.
//!
//! A `POST /orders` route is wrapped in [`IdempotencyLayer`]: the layer
//! opens the request's transaction, hands it to the handler (the [`Tx`]
//! extractor), and commits the handler's writes together with the response it
//! records under the key. Then
//!
//! 1. the first request with a key runs the handler (`201`);
//! 2. the same key and body again is *replayed*: same status and body, plus
//!    `Idempotent-Replayed: true`, and the handler does not run;
//! 3. the same key with another body is refused with `422`.
//!
//! The router is driven in process with `tower::ServiceExt::oneshot`, the
//! way `axum::serve` drives it for each connection.
//!
//! ```text
//! cargo run -p resilience --example idempotency --no-default-features --features idempotency,sqlite
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use resilience::idempotency::{
    IdempotencyConfig, IdempotencyLayer, KeyPolicy, Tx, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED,
};
use resilience::problem::{internal_error, Problem};
use resilience::store::{Db, DbOptions};
use sqlx::Executor;
use tower::ServiceExt;

/// Inserts an order in the request's transaction. It never commits: the
/// layer does, after it has recorded the answer.
async fn create_order(
    State(runs): State<Arc<AtomicUsize>>,
    tx: Tx,
    item: String,
) -> Result<(StatusCode, String), Problem> {
    runs.fetch_add(1, Ordering::SeqCst);
    let id = uuid::Uuid::new_v4().to_string();
    let mut conn = tx.lock().await?;
    sqlx::query("INSERT INTO orders (id, item) VALUES ($1, $2)")
        .bind(&id)
        .bind(&item)
        .execute(&mut **conn)
        .await
        .map_err(internal_error)?;
    Ok((StatusCode::CREATED, format!("order {id} for {item}")))
}

#[tokio::main]
async fn main() -> Result<()> {
    // A SQLite file in a temporary directory (deleted when `dir` drops).
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("shop.db").display());
    let db = Db::connect(&DbOptions::new(url, "shop")).await?;
    db.migrate_resilience().await?; // the idempotency records' table
    db.pool()
        .execute("CREATE TABLE orders (id TEXT PRIMARY KEY, item TEXT NOT NULL)")
        .await?;

    let runs = Arc::new(AtomicUsize::new(0));
    let idem =
        IdempotencyLayer::new(IdempotencyConfig::new(db.clone()).key_policy(KeyPolicy::Required));
    let app = Router::new()
        .route("/orders", post(create_order).layer(idem))
        .with_state(runs.clone());

    println!("1. first request with key k-1");
    let (status, replayed, first) = send(&app, "k-1", "a teapot").await?;
    println!("  {status} replayed={replayed} {first:?}");
    ensure!(status == StatusCode::CREATED && !replayed);

    println!("2. same key, same body: the recorded answer is replayed");
    let (status, replayed, second) = send(&app, "k-1", "a teapot").await?;
    println!("  {status} replayed={replayed} {second:?}");
    ensure!(status == StatusCode::CREATED && replayed && second == first);

    println!("3. same key, another body: refused");
    let (status, _, problem) = send(&app, "k-1", "two teapots").await?;
    println!("  {status} {problem}");
    ensure!(status == StatusCode::UNPROCESSABLE_ENTITY);

    let orders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(db.pool())
        .await?;
    let runs = runs.load(Ordering::SeqCst);
    ensure!(
        orders == 1 && runs == 1,
        "{orders} orders, handler ran {runs} times"
    );
    println!("ok: one order, the handler ran once");
    db.close().await;
    Ok(())
}

/// POSTs `body` with `Idempotency-Key: key`; returns the status, whether the
/// answer was replayed, and the body.
async fn send(app: &Router, key: &str, body: &str) -> Result<(StatusCode, bool, String)> {
    let req = Request::post("/orders")
        .header(IDEMPOTENCY_KEY, key)
        .header("content-type", "text/plain")
        .body(Body::from(body.to_owned()))?;
    let res = app.clone().oneshot(req).await?;
    let replayed = res
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v == "true");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 64 * 1024).await?;
    Ok((status, replayed, String::from_utf8(bytes.to_vec())?))
}
