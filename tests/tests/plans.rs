//! The batch statements find their rows through the primary key, however
//! stale the table's statistics are.
//!
//! A fresh table (or a backlog that grew since the last `ANALYZE`) has no
//! statistics that tell Postgres how common `status = 'pending'` is; it
//! takes it for a rare value and reads every pending row through a status
//! index, or hash-joins the whole table, to find a batch of 16. That cost
//! grows with the backlog. Each test fills a table with 5,000 pending rows
//! and autovacuum off (so the statistics stay those of an empty table, as in
//! the first minute of a service or the benchmark), runs one batch statement
//! on 16 of them inside a transaction, and counts the rows the transaction
//! read from `pg_stat_xact_user_tables`: the database's own count, not ours.
//!
//! Postgres only: SQLite has no such statistics, and its planner serves an
//! `IN` list on the primary key by the primary key.

use anyhow::{ensure, Context, Result};
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{Connection, Executor, PgConnection, Postgres, Row};

use resilience::store::Backend;
use service_kit::testing::TestDatabase;

const ROWS: usize = 5_000;
const BATCH: usize = 16;
/// Rows a batch may read: its own, with room for an index's duplicates.
const BOUND: i64 = 4 * BATCH as i64;

async fn database() -> Result<(TestDatabase, PgConnection)> {
    let tdb = TestDatabase::create(Backend::Postgres)
        .await
        .context("create a Postgres test database (is TEST_POSTGRES_URL up?)")?;
    let mut conn = PgConnection::connect(&tdb.url("plans")).await?;
    for ddl in [
        include_str!("../../resilience/migrations/postgres/10001_outbox.sql"),
        include_str!("../../resilience/migrations/postgres/10002_idempotency.sql"),
        include_str!("../../resilience/migrations/postgres/10003_outbox_correlation.sql"),
        include_str!("../../resilience/migrations/postgres/10004_feed.sql"),
        include_str!("../../resilience/migrations/postgres/10005_outbox_claimable.sql"),
        include_str!("../../resilience/migrations/postgres/10006_outbox_fewer_indexes.sql"),
        include_str!("../../order-service/migrations/0001_create_orders.sql"),
        include_str!("../../shipping-service/migrations/0001_create_shipments.sql"),
        include_str!("../../shipping-service/migrations/0002_shipment_trace_context.sql"),
    ] {
        sqlx::raw_sql(ddl).execute(&mut conn).await?;
    }
    for table in ["outbox", "idempotency_keys", "orders", "shipments"] {
        conn.execute(format!("ALTER TABLE {table} SET (autovacuum_enabled = false)").as_str())
            .await?;
    }
    Ok((tdb, conn))
}

/// Rows of `table` read so far by this connection's transaction, as
/// Postgres counts them (sequential reads and index fetches). The counters
/// may still hold earlier, unflushed transactions' reads, so callers take
/// the difference across a statement.
async fn reads(conn: &mut PgConnection, table: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(seq_tup_read), 0) + COALESCE(SUM(idx_tup_fetch), 0) AS BIGINT) \
         FROM pg_stat_xact_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(conn)
    .await?)
}

/// Runs `q` in a transaction that is rolled back, and answers the rows it
/// read from `table` and the rows it changed.
async fn rows_read(
    conn: &mut PgConnection,
    table: &str,
    q: Query<'_, Postgres, PgArguments>,
) -> Result<(i64, u64)> {
    let mut tx = conn.begin().await?;
    let before = reads(&mut tx, table).await?;
    let changed = q.execute(&mut *tx).await?.rows_affected();
    let after = reads(&mut tx, table).await?;
    tx.rollback().await?;
    Ok((after - before, changed))
}

fn id(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:08}")
}

/// The batch: 16 rows from the middle of the table.
fn batch(prefix: &str) -> Vec<String> {
    (ROWS / 2..ROWS / 2 + BATCH)
        .map(|i| id(prefix, i))
        .collect()
}

#[tokio::test]
async fn batch_statements_read_their_rows_only() -> Result<()> {
    let (tdb, mut conn) = database().await?;
    let result = run(&mut conn).await;
    conn.close().await?;
    tdb.cleanup().await;
    result
}

async fn run(conn: &mut PgConnection) -> Result<()> {
    let n = ROWS as i64;
    conn.execute(
        format!(
            "INSERT INTO orders (id, customer_id, items, delivery_mode, status, send_attempts, \
             created_at, updated_at) SELECT 'ord-' || lpad(g::text, 8, '0'), 'c', '[]', \
             'effectively-once', 'pending', 0, g, g FROM generate_series(0, {n} - 1) g; \
             INSERT INTO outbox (id, destination, method, path, headers, body, kind, status, \
             attempts, next_attempt_at, lease_owner, lease_until, created_at, updated_at) \
             SELECT 'msg-' || lpad(g::text, 8, '0'), 'http://127.0.0.1:9', 'POST', '/orders', \
             '[]', '\\x7b7d', 'order', 'pending', 0, g, 'relay-a', {n} * 10, g, g \
             FROM generate_series(0, {n} - 1) g; \
             INSERT INTO idempotency_keys (scope, idem_key, fingerprint, status, headers, body, \
             created_at, expires_at) SELECT 'peer', 'key-' || lpad(g::text, 8, '0'), 'f', 201, \
             '[]', '\\x7b7d', g, {n} * 10 FROM generate_series(0, {n} - 1) g; \
             INSERT INTO shipments (id, order_id, items, delivery_mode, status, created_at, \
             ship_at, updated_at) SELECT 'shp-' || lpad(g::text, 8, '0'), 'ord-' || \
             lpad(g::text, 8, '0'), '[]', 'effectively-once', 'shipped', g, g, g \
             FROM generate_series(0, {n} - 1) g"
        )
        .as_str(),
    )
    .await?;

    // order-service: a batch of acknowledgements.
    let orders = batch("ord");
    let sql = order_service::store::accepted_all_sql(BATCH);
    let mut q = sqlx::query(&sql).bind(1_i64);
    for o in &orders {
        q = q.bind(o).bind(format!("shp-{o}")).bind(Some(1_i64));
    }
    check(
        "acknowledged orders",
        "orders",
        rows_read(conn, "orders", q).await?,
    )?;

    // order-service: a page of shipping's feed events, the usual case.
    let sql = order_service::store::shipment_events_sql(
        BATCH,
        &[
            order_service::domain::OrderStatus::Accepted,
            order_service::domain::OrderStatus::Shipped,
        ],
    );
    let mut q = sqlx::query(&sql).bind(2_i64);
    for (i, o) in orders.iter().enumerate() {
        let (status, shipped_at) = if i % 2 == 0 {
            ("accepted", None)
        } else {
            ("shipped", Some(2_i64))
        };
        q = q
            .bind(o)
            .bind(status)
            .bind(format!("shp-{o}"))
            .bind(shipped_at);
    }
    check(
        "orders moved by feed events",
        "orders",
        rows_read(conn, "orders", q).await?,
    )?;

    // order-service: a batch of pushed reports, merged into one statement.
    let sql = order_service::store::report_rows_sql(BATCH);
    ensure!(
        sql.matches("UPDATE").count() == 1,
        "a batch's reports should merge into one UPDATE: {sql}"
    );
    let mut q = sqlx::query(&sql);
    for o in &orders {
        q = q
            .bind("shipped")
            .bind(3_i64)
            .bind(Some(3_i64))
            .bind(format!("shp-{o}"))
            .bind(o)
            .bind("pending");
    }
    check(
        "orders moved by pushed reports",
        "orders",
        rows_read(conn, "orders", q).await?,
    )?;

    let sql = order_service::store::late_attempts_sql(BATCH);
    let mut q = sqlx::query(&sql).bind(1_i64);
    for o in &orders {
        q = q.bind(o).bind(2_i64);
    }
    check(
        "late send counts",
        "orders",
        rows_read(conn, "orders", q).await?,
    )?;

    // The relay: a batch of deliveries.
    let msgs = batch("msg");
    let sql = resilience::outbox::delivered_batch_sql(BATCH);
    let mut q = sqlx::query(&sql).bind(1_i64).bind(201_i64).bind("relay-a");
    for m in &msgs {
        q = q.bind(m);
    }
    check(
        "delivered messages",
        "outbox",
        rows_read(conn, "outbox", q).await?,
    )?;

    // The relay's claim: the batch of the oldest due messages (every
    // message is due, and every lease has run out).
    let sql = resilience::outbox::claim_sql(Backend::Postgres, 0);
    let q = sqlx::query(&sql)
        .bind("relay-b")
        .bind(n * 30)
        .bind(n * 20)
        .bind(BATCH as i64);
    check(
        "claimed messages",
        "outbox",
        rows_read(conn, "outbox", q).await?,
    )?;

    // shipping-service: a batch of acknowledged reports.
    let shipments = batch("shp");
    let sql = shipping_service::store::reported_all_sql(BATCH);
    let mut q = sqlx::query(&sql).bind(1_i64);
    for s in &shipments {
        q = q.bind(s).bind(1_i64);
    }
    check(
        "reported shipments",
        "shipments",
        rows_read(conn, "shipments", q).await?,
    )?;

    // A batch's idempotency keys, looked up in one statement (a read: the
    // rows it answers are the ones it found).
    let keys = batch("key");
    let sql = resilience::idempotency::lookup_many_sql(BATCH);
    let mut q = sqlx::query(&sql).bind("peer");
    for (i, k) in keys.iter().enumerate() {
        q = q.bind(k).bind(i as i64);
    }
    let mut tx = conn.begin().await?;
    let before = reads(&mut tx, "idempotency_keys").await?;
    let found = q
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .filter(|r| {
            r.try_get::<Option<String>, _>("fingerprint")
                .ok()
                .flatten()
                .is_some()
        })
        .count();
    let read = reads(&mut tx, "idempotency_keys").await? - before;
    tx.rollback().await?;
    check("looked-up keys", "idempotency_keys", (read, found as u64))?;
    Ok(())
}

fn check(what: &str, table: &str, (read, changed): (i64, u64)) -> Result<()> {
    ensure!(
        changed == BATCH as u64,
        "{what}: the statement touched {changed} rows, not the batch's {BATCH}"
    );
    ensure!(
        read <= BOUND,
        "{what}: a batch of {BATCH} read {read} rows of {table} ({ROWS} in the table); \
         the plan no longer finds the batch's rows through an index that leads to them"
    );
    Ok(())
}

/// The services' connections plan each execution for the table as it is.
/// A statement prepared while its table was nearly empty, and run more than
/// five times, could otherwise keep a generic plan made for a few pages for
/// the connection's life: here the relay's claim, run ten times on a
/// one-message outbox, then once on 5,000.
#[tokio::test]
async fn plans_follow_the_table_as_it_grows() -> Result<()> {
    let tdb = TestDatabase::create(Backend::Postgres)
        .await
        .context("create a Postgres test database (is TEST_POSTGRES_URL up?)")?;
    let result = grow(&tdb).await;
    tdb.cleanup().await;
    result
}

async fn grow(tdb: &TestDatabase) -> Result<()> {
    let db = tdb.connect("plans", "relay").await?;
    db.migrate_resilience().await?;
    let mut conn = db.pool().acquire().await?;
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .execute(&mut *conn)
        .await?;
    let insert = |from: i64, to: i64| {
        format!(
            "INSERT INTO outbox (id, destination, method, path, headers, body, kind, status, \
             attempts, next_attempt_at, created_at, updated_at) \
             SELECT 'msg-' || lpad(g::text, 8, '0'), 'http://127.0.0.1:9', 'POST', '/orders', \
             '[]', CAST('{{}}' AS BYTEA), 'order', 'delivered', 0, g, g, g \
             FROM generate_series({from}, {to}) g"
        )
    };
    sqlx::query(&insert(0, 0)).execute(&mut *conn).await?;
    let sql = resilience::outbox::claim_sql(Backend::Postgres, 0);
    let claim = |now: i64| {
        sqlx::query(&sql)
            .bind("relay-a")
            .bind(now + 1_000)
            .bind(now)
            .bind(BATCH as i64)
    };
    for i in 0..10 {
        claim(i).fetch_all(&mut *conn).await?;
    }
    // The table grows: 5,000 delivered messages, and a batch's worth due.
    sqlx::query(&insert(1, ROWS as i64))
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "UPDATE outbox SET status = 'pending' WHERE id IN \
         (SELECT id FROM outbox ORDER BY id DESC LIMIT 16)",
    )
    .execute(&mut *conn)
    .await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let count = "SELECT CAST(COALESCE(SUM(seq_tup_read), 0) + COALESCE(SUM(idx_tup_fetch), 0) \
                 AS BIGINT) FROM pg_stat_xact_user_tables WHERE relname = 'outbox'";
    let before: i64 = sqlx::query_scalar(count).fetch_one(&mut *tx).await?;
    let claimed = claim(ROWS as i64 * 2).fetch_all(&mut *tx).await?.len();
    let read = sqlx::query_scalar::<_, i64>(count)
        .fetch_one(&mut *tx)
        .await?
        - before;
    tx.rollback().await?;
    check("claim after growth", "outbox", (read, claimed as u64))?;

    // The backlog count behind `POST /orders`' 503 reads the claimable
    // rows, not the delivered history.
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let before: i64 = sqlx::query_scalar(count).fetch_one(&mut *tx).await?;
    let pending: i64 = sqlx::query_scalar(resilience::outbox::PENDING_COUNT_SQL)
        .fetch_one(&mut *tx)
        .await?;
    let read = sqlx::query_scalar::<_, i64>(count)
        .fetch_one(&mut *tx)
        .await?
        - before;
    tx.rollback().await?;
    check(
        "pending count after growth",
        "outbox",
        (read, pending as u64),
    )
}
