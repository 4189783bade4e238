//! Cost of the idempotency layer per request, through the axum router (no
//! network), on SQLite (tempfile) and on Postgres (`TEST_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`; skipped if down).
//!
//! The same handler (insert one row) four ways:
//! - `plain_tx`: no layer, the handler does `db.begin()` / insert / commit;
//! - `layer_no_key`: through the layer without a key (transaction per request);
//! - `layer_new_key`: through the layer with a fresh key (lookup + record insert);
//! - `layer_replay`: a repeat of a completed key (lookup, replay, no handler).
//!
//! On Postgres the bench database uses `synchronous_commit = off` (group
//! `postgres_async_commit`) unless `IDEM_BENCH_PG_FSYNC=1` (group `postgres`).
//!
//! `cargo bench -p resilience --bench idempotency -- --warm-up-time 1 --measurement-time 3`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion};
use resilience::idempotency::{IdempotencyConfig, IdempotencyLayer, Tx, IDEMPOTENCY_KEY};
use resilience::store::{Db, DbOptions};
use service_kit::{internal_error, Problem};
use sqlx::{Connection, Executor};
use tokio::runtime::Runtime;
use tower::ServiceExt;

async fn with_tx(tx: Tx, name: String) -> Result<Response, Problem> {
    let id = uuid::Uuid::new_v4().to_string();
    let mut conn = tx.lock().await?;
    sqlx::query("INSERT INTO widgets (id, name) VALUES ($1, $2)")
        .bind(&id)
        .bind(&name)
        .execute(&mut **conn)
        .await
        .map_err(internal_error)?;
    Ok((StatusCode::CREATED, id).into_response())
}

async fn plain(State(db): State<Db>, name: String) -> Result<Response, Problem> {
    let id = uuid::Uuid::new_v4().to_string();
    let mut tx = db.begin().await.map_err(internal_error)?;
    sqlx::query("INSERT INTO widgets (id, name) VALUES ($1, $2)")
        .bind(&id)
        .bind(&name)
        .execute(&mut *tx)
        .await
        .map_err(internal_error)?;
    tx.commit().await.map_err(internal_error)?;
    Ok((StatusCode::CREATED, id).into_response())
}

fn router(db: &Db) -> Router {
    let layer = IdempotencyLayer::new(IdempotencyConfig::new(db.clone()));
    Router::new()
        .route("/layered", post(with_tx).layer(layer))
        .route("/plain", post(plain))
        .with_state(db.clone())
}

async fn send(app: &Router, path: &str, key: Option<String>) {
    let mut b = Request::post(path);
    if let Some(k) = key {
        b = b.header(IDEMPOTENCY_KEY, k);
    }
    let req = b.body(Body::from("widget")).expect("request");
    let res = app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::CREATED);
}

async fn prepare(url: String) -> Db {
    let db = Db::connect(&DbOptions::new(url, "idem_bench"))
        .await
        .expect("connect");
    db.migrate_resilience().await.expect("migrate");
    db.pool()
        .execute("CREATE TABLE IF NOT EXISTS widgets (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
        .await
        .expect("widgets");
    db
}

fn group(c: &mut Criterion, rt: &Runtime, backend: &str, db: &Db) {
    let app = router(db);
    let next = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        send(&app, "/layered", Some("replayed".into())).await;
        // NOTE: warm every pooled connection's statement cache (and a fresh
        // Postgres database's catalog caches) for every variant first;
        // otherwise whichever variant runs first pays for it.
        for i in 0..500 {
            send(&app, "/plain", None).await;
            send(&app, "/layered", None).await;
            send(&app, "/layered", Some(format!("warm-{i}"))).await;
            send(&app, "/layered", Some("replayed".into())).await;
        }
    });
    let mut g = c.benchmark_group(format!("idempotency/{backend}"));
    g.bench_function("plain_tx", |b| {
        b.to_async(rt).iter(|| send(&app, "/plain", None))
    });
    g.bench_function("layer_no_key", |b| {
        b.to_async(rt).iter(|| send(&app, "/layered", None))
    });
    g.bench_function("layer_new_key", |b| {
        b.to_async(rt).iter(|| {
            let key = format!("k-{}", next.fetch_add(1, Ordering::Relaxed));
            send(&app, "/layered", Some(key))
        })
    });
    g.bench_function("layer_replay", |b| {
        b.to_async(rt)
            .iter(|| send(&app, "/layered", Some("replayed".into())))
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("bench.db").display());
    let db = rt.block_on(prepare(url));
    group(c, &rt, "sqlite", &db);
    rt.block_on(db.close());

    let admin_url = std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
    // Every write variant commits once per request, so the WAL flush is the
    // same cost in each; on a shared disk its jitter drowns the difference
    // being measured. IDEM_BENCH_PG_FSYNC=1 keeps synchronous commits.
    let keep_fsync = std::env::var("IDEM_BENCH_PG_FSYNC").is_ok_and(|v| v == "1");
    let label = if keep_fsync {
        "postgres"
    } else {
        "postgres_async_commit"
    };
    let admin = rt.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .ok()?;
        if !keep_fsync {
            admin
                .execute(format!("ALTER DATABASE {name} SET synchronous_commit = off").as_str())
                .await
                .ok()?;
        }
        Some(admin)
    });
    let Some(mut admin) = admin else {
        eprintln!("Postgres not reachable at TEST_POSTGRES_URL; skipping its group");
        return;
    };
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url.as_str(), |(b, _)| b);
    let db = rt.block_on(prepare(format!("{base}/{name}")));
    group(c, &rt, label, &db);
    rt.block_on(async {
        db.close().await;
        let _ = admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
