//! The transactional outbox and its relay, on SQLite.
//!
//! An order is written and the HTTP request announcing it is enqueued in the
//! *same* transaction, so the request is sent if and only if the order
//! commits. A [`Relay`] then delivers it to a receiver (an axum server on
//! `127.0.0.1:0`) through a tower stack you assemble, retrying durably until
//! the receiver accepts; a [`DeliveryHandler`] marks the order as announced
//! in the same transaction that marks the message delivered.
//!
//! The stack, from the relay down to the wire (as `service_kit::stack` has it):
//!
//! ```text
//! IdempotencyKeyLayer  every attempt at a message carries its id as Idempotency-Key
//! PerAuthorityLayer    a breaker per destination: the relay defers while it is open
//! timeout              bounds each attempt
//! HttpClient           pooled reqwest
//! ```
//!
//! ```text
//! cargo run -p resilience --example outbox --no-default-features --features outbox,sqlite,client
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use resilience::circuit_breaker::{BreakerRegistry, CircuitBreakerConfig, PerAuthorityLayer};
use resilience::client::HttpClient;
use resilience::idempotency::IdempotencyKeyLayer;
use resilience::outbox::{
    DeliveryHandler, Outbox, OutgoingRequest, Relay, RelayConfig, SentMessage,
};
use resilience::store::{Db, DbOptions};
use resilience::SendService;
use sqlx::{Any, Executor, Transaction};
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

/// Reacts to a delivery inside the relay's transaction.
struct MarkAnnounced;

#[async_trait::async_trait]
impl DeliveryHandler for MarkAnnounced {
    async fn delivered(
        &self,
        tx: &mut Transaction<'static, Any>,
        msg: &SentMessage,
        _response: &http::Response<Bytes>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE orders SET status = 'announced' WHERE id = $1")
            .bind(&msg.correlation_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite:{}", dir.path().join("shop.db").display());
    let db = Db::connect(&DbOptions::new(url, "shop")).await?;
    db.migrate_resilience().await?; // creates the outbox table
    db.pool()
        .execute("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
        .await?;
    let (receiver, received) = receiver().await?;

    // The business write and the message, in one transaction.
    let outbox = Outbox::new(db.clone());
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO orders (id, status) VALUES ('o-1', 'new')")
        .execute(&mut *tx)
        .await?;
    let body = serde_json::json!({ "order": "o-1", "item": "a teapot" });
    let msg = OutgoingRequest::post_json(&receiver, "/shipments", &body, "create-shipment")?
        .correlate("o-1")
        .with_idempotency_key(true);
    let id = outbox.enqueue(&mut tx, msg).await?;
    tx.commit().await?;
    outbox.notify(); // wake the relay now rather than at its next poll
    println!("enqueued message {id} with order o-1");

    // A transaction that rolls back takes its message with it: never sent.
    let mut tx = db.begin().await?;
    let body = serde_json::json!({ "order": "o-2", "item": "a kettle" });
    let msg = OutgoingRequest::post_json(&receiver, "/shipments", &body, "create-shipment")?;
    outbox.enqueue(&mut tx, msg).await?;
    tx.rollback().await?;

    // The stack the relay sends through, boxed as a `SendService`.
    let breakers = BreakerRegistry::new(CircuitBreakerConfig::default(), 64);
    let stack = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(PerAuthorityLayer::new(breakers))
        .timeout(Duration::from_secs(2))
        .service(HttpClient::new(Duration::from_secs(2))?);
    let send: SendService = BoxCloneSyncService::new(stack);

    let config = RelayConfig {
        poll_interval: Duration::from_millis(100),
        ..RelayConfig::default()
    };
    let relay = Relay::new(outbox.clone(), send, Arc::new(MarkAnnounced), config);
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));

    // Wait (with a deadline) until the handler has marked the order.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = 'o-1'")
            .fetch_one(db.pool())
            .await?;
        if status == "announced" {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "order still {status:?} after 10 s: {:?}",
                outbox.stats().await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel(); // finishes sends in flight, releases leases, returns
    running.await?;

    let stats = outbox.stats().await?;
    let keys = received.lock().map(|k| k.clone()).unwrap_or_default();
    println!("receiver got keys {keys:?}; outbox {stats:?}");
    ensure!(
        stats.delivered == 1 && stats.pending == 0,
        "outbox: {stats:?}"
    );
    ensure!(keys == [id.to_string()], "expected one delivery keyed {id}");
    println!("ok: o-1 delivered once and announced; o-2 never sent");
    db.close().await;
    Ok(())
}

/// An axum server on 127.0.0.1:0 that records the Idempotency-Key of every
/// `POST /shipments`. Returns its base URL.
async fn receiver() -> Result<(String, Arc<Mutex<Vec<String>>>)> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let app = Router::new().route(
        "/shipments",
        post(move |headers: HeaderMap| async move {
            let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
            match (key, log.lock()) {
                (Some(key), Ok(mut log)) => {
                    log.push(key.to_owned());
                    StatusCode::CREATED
                }
                _ => StatusCode::BAD_REQUEST,
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("receiver failed: {e}");
        }
    });
    Ok((url, received))
}
