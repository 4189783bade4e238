//! order-service applies a page of shipping's feed events in rounds, the
//! usual reports of a round in one statement; shipping-service applies a
//! page of order-service's events as two multi-row inserts. The rows they
//! leave must be exactly those that applying the events one by one leaves,
//! refusals included. Each case builds the same orders in two schemas (or SQLite
//! files), applies a seeded random page to one through `apply_page` (and,
//! when the page is refused, event by event in savepoints, as the consumer
//! does) and to the other event by event, and compares the tables.
//! `FEED_PAGES_SEED` replays a failing seed.

use anyhow::{ensure, Context};
use rand::{Rng, SeedableRng};
use resilience::feed::{ApplyError, FeedEvent, FeedHandler};
use resilience::store::Db;
use serde_json::json;
use service_kit::testing::TestDatabase;
use sqlx::Row;
use tests::{both_backends, TestBackend};

use order_service::pull::ShipmentFeedHandler;
use order_service::store::OrderStore;
use resilience::feed::FeedLog;
use shipping_service::pull::OrderFeedHandler;
use shipping_service::store::ShipmentStore;

const ORDERS: usize = 12;
const PAGES: usize = 40;

async fn orders_db(tdb: &TestDatabase, name: &str) -> anyhow::Result<Db> {
    let db = tdb.connect(name, name).await?;
    db.migrate(sqlx::migrate!("../order-service/migrations"))
        .await?;
    db.migrate_resilience().await?;
    Ok(db)
}

fn order_id(i: usize) -> String {
    format!("00000000-0000-7000-8000-{i:012}")
}

fn shipment(i: usize, other: bool) -> String {
    format!("10000000-0000-4000-8000-{:012}", i * 2 + usize::from(other))
}

/// The same orders in both databases: pending, accepted with or without a
/// shipment, shipped.
async fn seed_orders(db: &Db, states: &[(usize, &str, bool)]) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM orders").execute(db.pool()).await?;
    for (i, status, with_shipment) in states {
        let accepted = (*status != "pending").then_some(1_i64);
        let shipped = (*status == "shipped").then_some(2_i64);
        sqlx::query(
            "INSERT INTO orders (id, customer_id, items, delivery_mode, status, shipment_id, \
             send_attempts, created_at, updated_at, accepted_at, shipped_at) \
             VALUES ($1, 'c', '[]', 'pull-effectively-once', $2, $3, 0, 0, 0, $4, $5)",
        )
        .bind(order_id(*i))
        .bind(*status)
        .bind(with_shipment.then(|| shipment(*i, false)))
        .bind(accepted)
        .bind(shipped)
        .execute(db.pool())
        .await?;
    }
    Ok(())
}

/// What a row says, without the times that differ between the runs (only
/// whether they are set).
async fn rows(db: &Db) -> anyhow::Result<Vec<String>> {
    let rows = sqlx::query(
        "SELECT id, status, shipment_id, accepted_at, shipped_at, last_error FROM orders \
         ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(format!(
                "{} {} {:?} accepted:{} shipped:{} error:{:?}",
                r.try_get::<String, _>("id")?,
                r.try_get::<String, _>("status")?,
                r.try_get::<Option<String>, _>("shipment_id")?,
                r.try_get::<Option<i64>, _>("accepted_at")?.is_some(),
                r.try_get::<Option<i64>, _>("shipped_at")?.is_some(),
                r.try_get::<Option<String>, _>("last_error")?,
            ))
        })
        .collect()
}

/// Event by event, each in a savepoint; the refused ones are undone and
/// counted, as the consumer records them dead.
async fn one_by_one(
    handler: &dyn FeedHandler,
    db: &Db,
    events: &[FeedEvent],
) -> anyhow::Result<usize> {
    let mut tx = db.begin().await?;
    let mut refused = 0;
    for e in events {
        sqlx::query("SAVEPOINT ev").execute(&mut *tx).await?;
        match handler.apply(&mut tx, e).await {
            Ok(()) => {}
            Err(ApplyError::Refused(_)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT ev")
                    .execute(&mut *tx)
                    .await?;
                refused += 1;
            }
            Err(e) => return Err(anyhow::anyhow!("apply: {e}")),
        }
        sqlx::query("RELEASE SAVEPOINT ev")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(refused)
}

/// Applies `events` to `paged` as the consumer does (the page in one call;
/// on a refusal, rolled back and event by event) and to `single` one by
/// one. Checks that the page is refused whole exactly when one of its
/// events is refused alone, with as many refusals either way; answers
/// whether the page was refused.
async fn both_ways(
    (by_page, paged): (&dyn FeedHandler, &Db),
    (by_event, single): (&dyn FeedHandler, &Db),
    events: &[FeedEvent],
) -> anyhow::Result<bool> {
    let expected_refusals = one_by_one(by_event, single, events).await?;
    let mut tx = paged.begin().await?;
    match by_page.apply_page(&mut tx, events).await {
        Ok(()) => {
            tx.commit().await?;
            ensure!(
                expected_refusals == 0,
                "applied whole, but {expected_refusals} of its events are refused one by one"
            );
            Ok(false)
        }
        Err(ApplyError::Refused(_)) => {
            tx.rollback().await?;
            ensure!(
                expected_refusals > 0,
                "refused whole, but no event of it is refused one by one"
            );
            let refused = one_by_one(by_page, paged, events).await?;
            ensure!(refused == expected_refusals);
            Ok(true)
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

fn event(position: i64, kind: &str, order: &str, shipment: &str) -> FeedEvent {
    FeedEvent {
        position,
        id: format!("ev-{position}"),
        event_type: kind.into(),
        data: json!({ "order_id": order, "shipment_id": shipment }),
        created_at: 0,
    }
}

async fn pages_match_one_by_one(backend: TestBackend) -> anyhow::Result<()> {
    let seed: u64 = std::env::var("FEED_PAGES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let result = run(backend, seed).await;
    if result.is_err() {
        eprintln!("feed pages seed {seed} (FEED_PAGES_SEED={seed} runs it again)");
    }
    result
}

async fn run(backend: TestBackend, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let tdb = TestDatabase::create(backend).await?;
    let paged = orders_db(&tdb, "paged").await?;
    let single = orders_db(&tdb, "single").await?;
    let by_page = ShipmentFeedHandler::new(OrderStore::new(paged.clone()));
    let by_event = ShipmentFeedHandler::new(OrderStore::new(single.clone()));
    let mut pages_refused = 0;
    for page in 0..PAGES {
        let states: Vec<(usize, &str, bool)> = (0..ORDERS)
            .map(|i| {
                let status = ["pending", "pending", "accepted", "shipped"][rng.gen_range(0..4)];
                let with_shipment = status != "pending" && rng.gen_bool(0.7);
                (i, status, with_shipment)
            })
            .collect();
        seed_orders(&paged, &states).await?;
        seed_orders(&single, &states).await?;
        let n = rng.gen_range(1..=24);
        let events: Vec<FeedEvent> = (0..n)
            .map(|p| {
                let i = rng.gen_range(0..ORDERS + 1); // ORDERS: no such order
                let kind = match rng.gen_range(0..20) {
                    0 => "shipment-lost",
                    k if k < 10 => "shipment-created",
                    _ => "shipment-shipped",
                };
                let other = rng.gen_range(0..8) == 0;
                let order = if rng.gen_range(0..30) == 0 {
                    "not-a-uuid".to_string()
                } else {
                    order_id(i)
                };
                event(p as i64 + 1, kind, &order, &shipment(i, other))
            })
            .collect();
        let refused = both_ways((&by_page, &paged), (&by_event, &single), &events)
            .await
            .with_context(|| format!("page {page}"))?;
        pages_refused += usize::from(refused);
        let (a, b) = (rows(&paged).await?, rows(&single).await?);
        ensure!(
            a == b,
            "page {page} ({n} events) left other rows than one by one:\npage:   {a:#?}\nsingle: {b:#?}\nevents: {events:#?}"
        );
    }
    // Both kinds of page occurred.
    ensure!(
        pages_refused > 0 && pages_refused < PAGES,
        "{pages_refused} of {PAGES} pages refused: the mix does not test both paths"
    );
    paged.close().await;
    single.close().await;
    tdb.cleanup().await;
    Ok(())
}

/// A page that moves twelve orders forward, then each of them once more:
/// two rounds, the second after the first, so every order ends shipped
/// (one statement for all would move each order once).
async fn orders_named_twice_move_twice(backend: TestBackend) -> anyhow::Result<()> {
    let tdb = TestDatabase::create(backend).await?;
    let db = orders_db(&tdb, "rounds").await?;
    let handler = ShipmentFeedHandler::new(OrderStore::new(db.clone()));
    let states: Vec<(usize, &str, bool)> = (0..ORDERS).map(|i| (i, "pending", false)).collect();
    seed_orders(&db, &states).await?;
    let mut events = Vec::new();
    for i in 0..ORDERS {
        events.push(event(
            events.len() as i64 + 1,
            "shipment-created",
            &order_id(i),
            &shipment(i, false),
        ));
    }
    for i in 0..ORDERS {
        events.push(event(
            events.len() as i64 + 1,
            "shipment-shipped",
            &order_id(i),
            &shipment(i, false),
        ));
    }
    let mut tx = db.begin().await?;
    handler
        .apply_page(&mut tx, &events)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tx.commit().await?;
    let shipped: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM orders WHERE status = 'shipped' AND shipment_id IS NOT NULL \
         AND accepted_at IS NOT NULL AND shipped_at IS NOT NULL",
    )
    .fetch_one(db.pool())
    .await
    .context("counting shipped orders")?;
    ensure!(shipped == ORDERS as i64, "{shipped} shipped of {ORDERS}");
    db.close().await;
    tdb.cleanup().await;
    Ok(())
}

async fn shipping_db(tdb: &TestDatabase, name: &str) -> anyhow::Result<Db> {
    let db = tdb.connect(name, name).await?;
    db.migrate(sqlx::migrate!("../shipping-service/migrations"))
        .await?;
    db.migrate_resilience().await?;
    Ok(db)
}

/// Shipments and feed events in the order they were written, without the
/// ids and times that differ between the runs.
async fn shipping_rows(db: &Db) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for r in sqlx::query(
        "SELECT order_id, items, delivery_mode, status, CASE WHEN traceparent IS NULL THEN 0 ELSE 1 END AS traced \
         FROM shipments ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?
    {
        out.push(format!(
            "shipment {} {} {} {} traced:{}",
            r.try_get::<String, _>("order_id")?,
            r.try_get::<String, _>("items")?,
            r.try_get::<String, _>("delivery_mode")?,
            r.try_get::<String, _>("status")?,
            r.try_get::<i64, _>("traced")?,
        ));
    }
    for r in sqlx::query("SELECT feed, event_type, payload FROM feed_events ORDER BY seq")
        .fetch_all(db.pool())
        .await?
    {
        let payload: serde_json::Value = serde_json::from_str(&r.try_get::<String, _>("payload")?)?;
        out.push(format!(
            "event {} {} {}",
            r.try_get::<String, _>("feed")?,
            r.try_get::<String, _>("event_type")?,
            payload["order_id"],
        ));
    }
    Ok(out)
}

/// shipping-service's pages: every shipment and every `shipment-created`
/// event as one by one, in the same order, or the page refused whole when
/// one of its events is refused one by one.
async fn shipping_pages_match_one_by_one(backend: TestBackend) -> anyhow::Result<()> {
    let seed: u64 = std::env::var("FEED_PAGES_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let result = shipping_run(backend, seed).await;
    if result.is_err() {
        eprintln!("feed pages seed {seed} (FEED_PAGES_SEED={seed} runs it again)");
    }
    result
}

async fn shipping_run(backend: TestBackend, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let tdb = TestDatabase::create(backend).await?;
    let paged = shipping_db(&tdb, "paged").await?;
    let single = shipping_db(&tdb, "single").await?;
    let mode = service_kit::DeliveryMode::PullEffectivelyOnce;
    let delay = std::time::Duration::from_secs(60);
    let by_page = OrderFeedHandler::new(
        ShipmentStore::new(paged.clone()),
        FeedLog::new(paged.clone()),
        delay,
        mode,
    );
    let by_event = OrderFeedHandler::new(
        ShipmentStore::new(single.clone()),
        FeedLog::new(single.clone()),
        delay,
        mode,
    );
    let mut refused_pages = 0;
    for page in 0..PAGES {
        let n = rng.gen_range(1..=24);
        let events: Vec<FeedEvent> = (0..n)
            .map(|p| {
                let i = rng.gen_range(0..ORDERS);
                let quantity = if rng.gen_range(0..40) == 0 {
                    0
                } else {
                    1 + i as i64
                };
                let kind = if rng.gen_range(0..40) == 0 {
                    "order-cancelled"
                } else {
                    "order-created"
                };
                let mut data = json!({
                    "order_id": order_id(i),
                    "items": [{ "sku": format!("SKU-{i}"), "quantity": quantity }],
                    "delivery_mode": "pull-effectively-once",
                });
                if rng.gen_bool(0.5) {
                    data["traceparent"] =
                        json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
                }
                FeedEvent {
                    position: p as i64 + 1,
                    id: format!("ev-{page}-{p}"),
                    event_type: kind.into(),
                    data,
                    created_at: 0,
                }
            })
            .collect();
        let refused = both_ways((&by_page, &paged), (&by_event, &single), &events)
            .await
            .with_context(|| format!("page {page}"))?;
        refused_pages += usize::from(refused);
        let (a, b) = (shipping_rows(&paged).await?, shipping_rows(&single).await?);
        ensure!(
            a == b,
            "page {page} ({n} events) left other rows than one by one:\npage:   {a:#?}\nsingle: {b:#?}"
        );
    }
    ensure!(
        refused_pages > 0 && refused_pages < PAGES,
        "{refused_pages} of {PAGES} pages refused: the mix does not test both paths"
    );
    paged.close().await;
    single.close().await;
    tdb.cleanup().await;
    Ok(())
}

both_backends!(
    pages_match_one_by_one,
    orders_named_twice_move_twice,
    shipping_pages_match_one_by_one
);
