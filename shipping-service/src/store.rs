//! The `shipments` table.

use std::time::Duration;

use resilience::store::{now_ms, rfc3339, Backend, Db, Write};
use service_kit::trace::TraceContext;
use service_kit::DeliveryMode;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

use crate::domain::{NewShipment, Shipment, ShipmentStatus};

const COLUMNS: &str = "id, order_id, items, delivery_mode, status, created_at, ship_at, \
                       shipped_at, report_attempts, report_error, reported_at, traceparent, tracestate";

/// One page of shipments.
#[derive(Debug)]
pub struct Page {
    /// The shipments, oldest first.
    pub shipments: Vec<Shipment>,
    /// The key of the last one, when more may follow.
    pub next: Option<(i64, String)>,
}

/// Access to the `shipments` table.
#[derive(Debug, Clone)]
pub struct ShipmentStore {
    db: Db,
}

impl ShipmentStore {
    /// Wraps a database handle.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Inserts a new `packing` shipment inside the caller's transaction.
    pub async fn insert(
        &self,
        tx: &mut Transaction<'static, Any>,
        new: &NewShipment,
        delay: Duration,
    ) -> Result<Shipment, sqlx::Error> {
        let (shipment, write) = Self::insertion(new, delay)?;
        (write.bind)(sqlx::query(&write.sql))
            .execute(&mut **tx)
            .await?;
        Ok(shipment)
    }

    /// A new `packing` shipment, and the write that inserts it, not yet
    /// run: for `Tx::write`, which in a batch runs every request's insert
    /// with the batch's idempotency records as one statement (Postgres).
    pub fn insertion(new: &NewShipment, delay: Duration) -> Result<(Shipment, Write), sqlx::Error> {
        let id = Uuid::now_v7();
        let now = now_ms();
        let ship_at = now + delay.as_millis() as i64;
        let items =
            serde_json::to_string(&new.items).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let (order_id, mode) = (new.order_id.to_string(), new.mode.as_str());
        let traceparent = new.trace.as_ref().map(TraceContext::traceparent);
        let tracestate = new
            .trace
            .as_ref()
            .and_then(|t| t.tracestate().map(str::to_owned));
        let write = Write::new(
            "INSERT INTO shipments (id, order_id, items, delivery_mode, status, created_at, \
             ship_at, updated_at, traceparent, tracestate) \
             VALUES ($1, $2, $3, $4, 'packing', $5, $6, $5, $7, $8)",
            8,
            move |q| {
                q.bind(id.to_string())
                    .bind(order_id)
                    .bind(items)
                    .bind(mode)
                    .bind(now)
                    .bind(ship_at)
                    .bind(traceparent)
                    .bind(tracestate)
            },
        );
        let shipment = Shipment {
            id,
            order_id: new.order_id,
            items: new.items.clone(),
            delivery_mode: new.mode,
            status: ShipmentStatus::Packing,
            created_at: rfc3339(now),
            ship_at: rfc3339(ship_at),
            shipped_at: None,
            report_attempts: 0,
            report_error: None,
            reported_at: None,
            trace: new.trace.clone(),
        };
        Ok((shipment, write))
    }

    /// One shipment.
    pub async fn get(&self, id: Uuid) -> Result<Option<Shipment>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM shipments WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref().map(shipment_from_row).transpose()
    }

    /// Shipments after `after` (exclusive), oldest first, optionally of one order.
    pub async fn list(
        &self,
        order_id: Option<Uuid>,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Page, sqlx::Error> {
        let (after_ts, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let order_filter = order_id.map(|o| o.to_string()).unwrap_or_default();
        let sql = format!(
            "SELECT {COLUMNS} FROM shipments \
             WHERE ($1 = '' OR order_id = $1) \
               AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
             ORDER BY created_at, id LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(order_filter)
            .bind(after_ts)
            .bind(after_id)
            .bind(i64::from(limit) + 1)
            .fetch_all(self.db.pool())
            .await?;
        let mut shipments = rows
            .iter()
            .map(shipment_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = None;
        if shipments.len() > limit as usize {
            shipments.truncate(limit as usize);
            if let Some(last) = rows.get(limit as usize - 1) {
                next = Some((last.try_get("created_at")?, last.try_get("id")?));
            }
        }
        Ok(Page { shipments, next })
    }

    /// Claims and ships up to `limit` packing shipments whose time has come,
    /// soonest first, inside the caller's transaction: `packing → shipped`
    /// in one statement. Returns the shipments this call moved.
    ///
    /// On Postgres the candidates are chosen `FOR UPDATE SKIP LOCKED`: rows
    /// another warehouse is shipping right now (even one frozen inside its
    /// transaction) are skipped, not waited for, and stay locked until that
    /// transaction ends (its commit ships them; its death, e.g. by
    /// `idle_in_transaction_session_timeout`, hands them back). The claim and
    /// the state change are one statement in one transaction, so no lease is
    /// needed: a row is claimed exactly as long as it is locked. On SQLite
    /// the caller's `BEGIN IMMEDIATE` holds the only write lock.
    pub async fn ship_due(
        &self,
        tx: &mut Transaction<'static, Any>,
        limit: i64,
    ) -> Result<Vec<Shipment>, sqlx::Error> {
        let lock = match self.db.backend() {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE shipments SET status = 'shipped', shipped_at = $1, updated_at = $1 \
             WHERE id IN (SELECT id FROM shipments WHERE status = 'packing' AND ship_at <= $1 \
               ORDER BY ship_at LIMIT $2 {lock}) \
             AND status = 'packing' \
             RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(limit)
            .fetch_all(&mut **tx)
            .await?;
        let mut shipped = rows
            .iter()
            .map(shipment_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        shipped.sort_by(|a, b| a.ship_at.cmp(&b.ship_at));
        Ok(shipped)
    }

    /// When the next packing shipment is due (ms since epoch), if any.
    pub async fn next_due_at(&self) -> Result<Option<i64>, sqlx::Error> {
        let row =
            sqlx::query("SELECT MIN(ship_at) AS next FROM shipments WHERE status = 'packing'")
                .fetch_one(self.db.pool())
                .await?;
        row.try_get::<Option<i64>, _>("next")
    }

    /// Records the final outcome of an outbox-delivered report: `None` means
    /// order-service acknowledged it. `attempts` is the outbox's count of
    /// sends, copied so that the shipment shows it.
    pub async fn mark_reported<'e, E>(
        &self,
        executor: E,
        id: Uuid,
        error: Option<&str>,
        attempts: i64,
    ) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        let now = now_ms();
        sqlx::query(
            "UPDATE shipments SET report_error = $1, report_attempts = $3, \
             reported_at = CASE WHEN $1 IS NULL THEN COALESCE(reported_at, $2) ELSE reported_at END, \
             updated_at = $2 WHERE id = $4",
        )
        .bind(error)
        .bind(now)
        .bind(attempts)
        .bind(id.to_string())
        .execute(executor)
        .await?;
        Ok(())
    }

    /// [`ShipmentStore::mark_reported`] without an error, for many
    /// shipments in one statement (a batch of relay outcomes):
    /// `(shipment, attempts)` each. Nothing else waits for these rows (the
    /// warehouse skips locked rows), so the lock order does not matter.
    pub async fn mark_reported_all<'e, E>(
        &self,
        executor: E,
        reported: &[(Uuid, i64)],
    ) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        if reported.is_empty() {
            return Ok(());
        }
        let sql = reported_all_sql(reported.len());
        let mut q = sqlx::query(&sql).bind(now_ms());
        for (id, attempts) in reported {
            q = q.bind(id.to_string()).bind(*attempts);
        }
        q.execute(executor).await?;
        Ok(())
    }

    /// Counts one report attempt and its outcome (`None`: order-service acknowledged).
    pub async fn record_report<'e, E>(
        &self,
        executor: E,
        id: Uuid,
        error: Option<&str>,
    ) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        let now = now_ms();
        sqlx::query(
            "UPDATE shipments SET report_attempts = report_attempts + 1, \
             report_error = $1, \
             reported_at = CASE WHEN $1 IS NULL THEN COALESCE(reported_at, $2) ELSE reported_at END, \
             updated_at = $2 WHERE id = $3",
        )
        .bind(error)
        .bind(now)
        .bind(id.to_string())
        .execute(executor)
        .await?;
        Ok(())
    }
}

fn shipment_from_row(row: &AnyRow) -> Result<Shipment, sqlx::Error> {
    let decode = |e: String| sqlx::Error::Decode(e.into());
    let uuid = |s: String| Uuid::parse_str(&s).map_err(|e| decode(e.to_string()));
    let items: String = row.try_get("items")?;
    let mode: String = row.try_get("delivery_mode")?;
    let status: String = row.try_get("status")?;
    Ok(Shipment {
        id: uuid(row.try_get("id")?)?,
        order_id: uuid(row.try_get("order_id")?)?,
        items: serde_json::from_str(&items).map_err(|e| decode(e.to_string()))?,
        delivery_mode: mode
            .parse::<DeliveryMode>()
            .map_err(|e| decode(e.to_string()))?,
        status: status.parse().map_err(decode)?,
        created_at: rfc3339(row.try_get("created_at")?),
        ship_at: rfc3339(row.try_get("ship_at")?),
        shipped_at: row.try_get::<Option<i64>, _>("shipped_at")?.map(rfc3339),
        report_attempts: row.try_get("report_attempts")?,
        report_error: row.try_get("report_error")?,
        reported_at: row.try_get::<Option<i64>, _>("reported_at")?.map(rfc3339),
        trace: row
            .try_get::<Option<String>, _>("traceparent")?
            .and_then(|tp| {
                let ts: Option<String> = row.try_get("tracestate").ok().flatten();
                TraceContext::parse(&tp, ts.as_deref())
            }),
    })
}

/// The statement of [`ShipmentStore::mark_reported_all`] for `n` shipments:
/// `$1` the time, then `(id, attempts)` per shipment. The ids are listed
/// again as `id IN (...)` so that the rows are found through the primary
/// key whatever the table's statistics say, not by a scan of the table.
#[doc(hidden)]
pub fn reported_all_sql(n: usize) -> String {
    // VALUES columns are column1, column2 on both backends.
    let rows: Vec<String> = (0..n)
        .map(|i| format!("(${}, CAST(${} AS BIGINT))", 2 + 2 * i, 3 + 2 * i))
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", 2 + 2 * i)).collect();
    format!(
        "UPDATE shipments SET report_error = NULL, report_attempts = v.column2, \
         reported_at = COALESCE(shipments.reported_at, $1), updated_at = $1 \
         FROM (VALUES {}) AS v WHERE shipments.id = v.column1 AND shipments.id IN ({})",
        rows.join(", "),
        ids.join(", ")
    )
}
