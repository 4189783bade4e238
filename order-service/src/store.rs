//! The `orders` table. Status changes are compare-and-set updates, so two
//! writers racing on one order can never make an illegal transition.

use std::collections::HashMap;
use std::sync::Arc;

use resilience::batch::BatchScope;
use resilience::outbox::Write;
use resilience::store::{now_ms, rfc3339, Db};
use service_kit::DeliveryMode;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::domain::{
    IllegalTransition, NewOrder, Order, OrderId, OrderStatus, ShipmentEvent, Transition,
};

/// The outbox message kind of a shipment request (enqueued here, sent by
/// [`crate::shipping`]).
pub const KIND_CREATE_SHIPMENT: &str = "create-shipment";

const COLUMNS: &str = "id, customer_id, items, delivery_mode, status, shipment_id, last_error, \
                       send_attempts, created_at, accepted_at, shipped_at";

/// Why a shipment event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// No such order.
    #[error("order not found")]
    NotFound,
    /// The status machine forbids it.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The report is about another shipment than the one recorded on the
    /// order.
    #[error("the order's shipment is {recorded}, not {reported}")]
    OtherShipment {
        /// The shipment recorded on the order.
        recorded: String,
        /// The shipment the report is about.
        reported: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// One page of orders.
#[derive(Debug)]
pub struct Page {
    /// The orders, oldest first.
    pub orders: Vec<Order>,
    /// The key of the last order, when more may follow.
    pub next: Option<(i64, String)>,
}

/// Access to the `orders` table.
#[derive(Debug, Clone)]
pub struct OrderStore {
    db: Db,
}

impl OrderStore {
    /// Wraps a database handle.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// A new `pending` order, and the write that inserts it, not yet run:
    /// for `Tx::write`, which runs it in one statement with what goes with
    /// it (the message to shipping, the feed event) and, with a key on
    /// Postgres, the key's record.
    pub fn insertion(order: &NewOrder) -> Result<(Order, Write), sqlx::Error> {
        let id = OrderId::new();
        let now = now_ms();
        let items =
            serde_json::to_string(&order.items).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let (customer_id, mode) = (order.customer_id.clone(), order.mode.as_str());
        let write = Write::new(
            "INSERT INTO orders (id, customer_id, items, delivery_mode, status, \
             send_attempts, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)",
            5,
            move |q| {
                q.bind(id.to_string())
                    .bind(customer_id)
                    .bind(items)
                    .bind(mode)
                    .bind(now)
            },
        );
        let order = Order {
            id,
            customer_id: order.customer_id.clone(),
            items: order.items.clone(),
            delivery_mode: order.mode,
            status: OrderStatus::Pending,
            shipment_id: None,
            last_error: None,
            send_attempts: 0,
            created_at: rfc3339(now),
            accepted_at: None,
            shipped_at: None,
        };
        Ok((order, write))
    }

    /// One order.
    pub async fn get(&self, id: OrderId) -> Result<Option<Order>, sqlx::Error> {
        get_in(self.db.pool(), id).await
    }

    /// The order, with the outbox's progress folded in while it is pending in
    /// an outbox mode: the sends so far and the last failure, so a client
    /// watching one order sees it being retried.
    pub async fn get_with_progress(&self, id: OrderId) -> Result<Option<Order>, sqlx::Error> {
        let Some(mut order) = self.get(id).await? else {
            return Ok(None);
        };
        if order.status == OrderStatus::Pending && order.delivery_mode != DeliveryMode::AtMostOnce {
            let row = sqlx::query(
                "SELECT attempts, last_error FROM outbox \
                 WHERE correlation_id = $1 AND kind = $2 ORDER BY created_at LIMIT 1",
            )
            .bind(id.to_string())
            .bind(KIND_CREATE_SHIPMENT)
            .fetch_optional(self.db.pool())
            .await?;
            if let Some(row) = row {
                order.send_attempts = row.try_get("attempts")?;
                if order.last_error.is_none() {
                    order.last_error = row.try_get("last_error")?;
                }
            }
        }
        Ok(Some(order))
    }

    /// Orders after `after` (exclusive), oldest first, optionally of one status.
    pub async fn list(
        &self,
        status: Option<OrderStatus>,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> Result<Page, sqlx::Error> {
        let (after_ts, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let status_filter = status.map(|s| s.as_str()).unwrap_or("");
        // Keyset pagination on (created_at, id): stable under concurrent inserts.
        let sql = format!(
            "SELECT {COLUMNS} FROM orders \
             WHERE ($1 = '' OR status = $1) \
               AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
             ORDER BY created_at, id LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(status_filter)
            .bind(after_ts)
            .bind(after_id)
            .bind(i64::from(limit) + 1)
            .fetch_all(self.db.pool())
            .await?;
        let mut orders = rows
            .iter()
            .map(order_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = None;
        if orders.len() > limit as usize {
            orders.truncate(limit as usize);
            if let Some(last) = rows.get(limit as usize - 1) {
                next = Some((last.try_get("created_at")?, last.try_get("id")?));
            }
        }
        Ok(Page { orders, next })
    }

    /// Shipping acknowledged the order: `pending → accepted`. A late or
    /// repeated acknowledgement changes nothing. Returns whether it moved.
    /// `attempts`, when given, is the number of sends it took (the outbox's
    /// count, including the acknowledged one).
    pub async fn record_accepted(
        &self,
        conn: &mut sqlx::AnyConnection,
        id: OrderId,
        shipment_id: Option<&str>,
        attempts: Option<i64>,
    ) -> Result<bool, sqlx::Error> {
        let now = now_ms();
        let res = sqlx::query(
            "UPDATE orders SET status = 'accepted', accepted_at = $1, updated_at = $1, \
             shipment_id = COALESCE(shipment_id, $2), last_error = NULL, \
             send_attempts = COALESCE($3, send_attempts) \
             WHERE id = $4 AND status = 'pending'",
        )
        .bind(now)
        .bind(shipment_id)
        .bind(attempts)
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
        if res.rows_affected() == 1 {
            return Ok(true);
        }
        if let Some(attempts) = attempts {
            // A report got there first (the order is accepted or shipped
            // already): the sends it took are still the order's to show.
            sqlx::query(
                "UPDATE orders SET send_attempts = $1, updated_at = $2 \
                 WHERE id = $3 AND send_attempts < $1",
            )
            .bind(attempts)
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *conn)
            .await?;
        }
        Ok(false)
    }

    /// [`OrderStore::record_accepted`] for many orders in one statement
    /// (a batch of relay outcomes): `(order, shipment id, attempts)` each.
    /// On Postgres the rows are locked first, in id order, as a batch of
    /// shipment reports locks its orders ([`OrderStore::plan_event`]), so
    /// the two do not wait on each other in a cycle. (A deadlock Postgres
    /// breaks, 40P01, costs a retry, not an answer: the relay writes its
    /// outcomes again, a batch runs its requests one by one.)
    pub async fn record_accepted_all(
        &self,
        tx: &mut Transaction<'static, Any>,
        accepted: &[(OrderId, Option<String>, Option<i64>)],
    ) -> Result<(), sqlx::Error> {
        if accepted.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = accepted.iter().map(|(id, _, _)| id.to_string()).collect();
        if self.db.backend() == resilience::store::Backend::Postgres {
            // Every listed row, whatever its status: the attempts below
            // touch the ones a report has moved on already.
            let sql = format!(
                "SELECT id FROM orders WHERE id IN {} ORDER BY id FOR UPDATE",
                resilience::store::placeholders(1, ids.len())
            );
            let mut q = sqlx::query(&sql);
            for id in &ids {
                q = q.bind(id);
            }
            q.fetch_all(&mut **tx).await?;
        }
        let sql = accepted_all_sql(accepted.len());
        let now = now_ms();
        let mut q = sqlx::query(&sql).bind(now);
        for ((_, shipment, attempts), id) in accepted.iter().zip(&ids) {
            q = q.bind(id).bind(shipment.as_deref()).bind(*attempts);
        }
        let moved = q.execute(&mut **tx).await?.rows_affected();
        // Orders a report moved on before this acknowledgement was written
        // keep the sends it took (the ones just accepted hold them already).
        let late: Vec<(&String, i64)> = accepted
            .iter()
            .zip(&ids)
            .filter_map(|((_, _, attempts), id)| attempts.map(|a| (id, a)))
            .collect();
        if moved < accepted.len() as u64 && !late.is_empty() {
            let sql = late_attempts_sql(late.len());
            let mut q = sqlx::query(&sql).bind(now);
            for (id, attempts) in late {
                q = q.bind(id).bind(attempts);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Records a delivery error on the order (the outbox gave up on it).
    pub async fn record_error<'e, E>(
        &self,
        executor: E,
        id: OrderId,
        error: &str,
    ) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        sqlx::query("UPDATE orders SET last_error = $1, updated_at = $2 WHERE id = $3")
            .bind(error)
            .bind(now_ms())
            .bind(id.to_string())
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Counts one delivery attempt and its outcome (`None`: it succeeded).
    pub async fn record_attempt(
        &self,
        id: OrderId,
        error: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE orders SET send_attempts = send_attempts + 1, \
             last_error = COALESCE($1, last_error), updated_at = $2 WHERE id = $3",
        )
        .bind(error)
        .bind(now_ms())
        .bind(id.to_string())
        .execute(self.db.writer())
        .await?;
        Ok(())
    }

    /// A report that runs in a batch (see [`BatchScope`]), judged on the
    /// order as its batch read it, without a statement of its own.
    ///
    /// The first report of a batch reads every order the batch's reports
    /// name, in one statement, inside the batch's transaction (on Postgres
    /// `FOR UPDATE`, in id order as [`OrderStore::record_accepted_all`]
    /// locks them; on SQLite the transaction holds the only write lock).
    /// The rows then stay as read until the batch commits, except for what
    /// its own reports change, which the memo follows. So each report is judged in memory, exactly as
    /// [`OrderStore::apply_event`] would judge it, and a change comes back
    /// as a [`Write`] to hand to [`resilience::idempotency::Tx::write`]:
    /// the batch runs them all with its records, in one statement on
    /// Postgres, one script on SQLite. The write keeps the compare-and-set
    /// on the status read.
    ///
    /// [`Planned::Usual`] where that cannot be done: the order was not
    /// read (none such, so the usual way answers 404, or its id spelled in
    /// the path in a way the batch's paths were not parsed), or a report
    /// needs the rarer binding of a shipment id to an order already moved
    /// on.
    /// [`Planned::Again`] when an order changed by an earlier report of
    /// the batch would change once more (an `accepted` then a `shipped`
    /// report in one batch, which shipping never sends): two writes of one
    /// row cannot go in one statement, so the batch should run its
    /// requests one by one.
    pub async fn plan_event(
        &self,
        tx: &mut Transaction<'static, Any>,
        batch: &BatchScope,
        id: OrderId,
        event: &ShipmentEvent,
    ) -> Result<Planned, ApplyError> {
        let memo = batch.memo(BatchOrders::default);
        if !memo.is_loaded() {
            let ids = report_ids(batch.paths());
            let orders = self.lock_all(tx, &ids).await?;
            memo.load(orders);
        }
        let Some((order, written)) = memo.get(id) else {
            return Ok(Planned::Usual);
        };
        if judge(&order, event)? == Transition::Unchanged {
            if order.shipment_id.is_none() {
                memo.forget(id);
                return Ok(Planned::Usual);
            }
            return Ok(Planned::Ready(Box::new(order), Transition::Unchanged, None));
        }
        if written {
            return Ok(Planned::Again);
        }
        let now = now_ms();
        let shipped_at = (event.status == OrderStatus::Shipped).then_some(now);
        let from = order.status;
        let mut moved = order;
        moved.status = event.status;
        moved.last_error = None;
        moved.accepted_at = moved.accepted_at.or_else(|| Some(rfc3339(now)));
        moved.shipped_at = moved.shipped_at.or_else(|| shipped_at.map(rfc3339));
        moved.shipment_id = moved
            .shipment_id
            .or_else(|| Some(event.shipment_id.clone()));
        let (status, shipment) = (event.status.as_str(), event.shipment_id.clone());
        // One row of an `UPDATE ... FROM (VALUES ...)`: a batch's reports
        // merge into one statement with a row each (`Write::merged`), the
        // ids listed again in `id IN (...)` so the rows are found through
        // the primary key (see `shipment_events_sql`).
        let write = Write::new(REPORT_ROW_SQL, 6, move |q| {
            q.bind(status)
                .bind(now)
                .bind(shipped_at)
                .bind(shipment)
                .bind(id.to_string())
                .bind(from.as_str())
        })
        .repeating(report_sections());
        memo.set(id, moved.clone());
        Ok(Planned::Ready(
            Box::new(moved),
            Transition::Changed,
            Some(write),
        ))
    }

    /// Reads (on Postgres also locks) the orders `ids`, in id order.
    async fn lock_all(
        &self,
        tx: &mut Transaction<'static, Any>,
        ids: &[String],
    ) -> Result<Vec<Order>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let lock = match self.db.backend() {
            resilience::store::Backend::Postgres => " FOR UPDATE",
            resilience::store::Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM orders WHERE id IN {} ORDER BY id{lock}",
            resilience::store::placeholders(1, ids.len())
        );
        let mut q = sqlx::query(&sql);
        for id in ids {
            q = q.bind(id);
        }
        let rows = q.fetch_all(&mut **tx).await?;
        rows.iter().map(order_from_row).collect()
    }

    /// The usual case of [`OrderStore::apply_event`] for several reports
    /// at once, each about a different order, in one statement: every
    /// report that moves its order forward from a status below it, and
    /// names the order's own shipment (or the order has none yet), is
    /// applied as `apply_event` would apply it. Returns the ids of the
    /// orders it moved; the other reports (a repeat, a forgery, a missing
    /// order) are left for `apply_event` to judge one by one.
    pub async fn apply_events_usual(
        &self,
        tx: &mut Transaction<'static, Any>,
        reports: &[(OrderId, &ShipmentEvent)],
    ) -> Result<Vec<String>, sqlx::Error> {
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let statuses: Vec<OrderStatus> = reports.iter().fold(Vec::new(), |mut v, (_, e)| {
            if !v.contains(&e.status) {
                v.push(e.status);
            }
            v
        });
        let now = now_ms();
        let sql = shipment_events_sql(reports.len(), &statuses);
        let mut q = sqlx::query(&sql).bind(now);
        for (id, event) in reports {
            let shipped_at = (event.status == OrderStatus::Shipped).then_some(now);
            q = q
                .bind(id.to_string())
                .bind(event.status.as_str())
                .bind(event.shipment_id.clone())
                .bind(shipped_at);
        }
        let rows = q.fetch_all(&mut **tx).await?;
        rows.iter().map(|r| r.try_get::<String, _>("id")).collect()
    }

    /// Applies a report from shipping through the status machine, inside the
    /// caller's transaction (which also records the report's idempotency key).
    ///
    /// An order is bound to one shipment, the first one recorded, whichever
    /// of these comes first:
    ///
    /// - shipping's acknowledgement ([`OrderStore::record_accepted`], which
    ///   only moves a `pending` order and so never replaces an id), or
    /// - a report, when the acknowledgement was lost and the report arrived
    ///   first (the order is still `pending`, or `accepted` without an id
    ///   because the acknowledgement was unreadable): the report's id is
    ///   recorded, and a later acknowledgement of another shipment (an
    ///   at-least-once duplicate) changes nothing.
    ///
    /// A report about any other shipment is refused with
    /// [`ApplyError::OtherShipment`] and changes nothing: it is a forgery, or
    /// the report of a duplicate shipment that this order does not count as
    /// its own. `shipment_id IS NULL OR shipment_id = <reported>` is part of
    /// the compare-and-set, so a concurrent acknowledgement that binds
    /// another id first makes this report re-judged, not applied.
    pub async fn apply_event(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: OrderId,
        event: &ShipmentEvent,
    ) -> Result<(Order, Transition), ApplyError> {
        // The usual case first, in one statement: the report moves the order
        // forward from a status below it, and names the order's own shipment
        // (or the order has none yet). Anything else (a repeat, a forgery, a
        // missing order) is judged below, on the row as read.
        let below: Vec<String> = [
            OrderStatus::Pending,
            OrderStatus::Accepted,
            OrderStatus::Shipped,
        ]
        .into_iter()
        .filter(|s| s.transition(event.status) == Ok(Transition::Changed))
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
        if !below.is_empty() {
            let now = now_ms();
            let shipped_at = (event.status == OrderStatus::Shipped).then_some(now);
            // The statuses are the enum's own constants, never input.
            let sql = format!(
                "UPDATE orders SET status = $1, updated_at = $2, last_error = NULL, \
                 accepted_at = COALESCE(accepted_at, $3), \
                 shipped_at = COALESCE(shipped_at, $4), \
                 shipment_id = COALESCE(shipment_id, $5) \
                 WHERE id = $6 AND status IN ({}) \
                 AND (shipment_id IS NULL OR shipment_id = $5) RETURNING {COLUMNS}",
                below.join(", ")
            );
            let row = sqlx::query(&sql)
                .bind(event.status.as_str())
                .bind(now)
                .bind(Some(now))
                .bind(shipped_at)
                .bind(&event.shipment_id)
                .bind(id.to_string())
                .fetch_optional(&mut **tx)
                .await?;
            if let Some(row) = row {
                return Ok((order_from_row(&row)?, Transition::Changed));
            }
        }
        // A compare-and-set on the status read: if another writer moved the
        // order in between, read again and re-judge. Three rounds are plenty;
        // a status can move forward at most twice.
        for _ in 0..3 {
            let order = get_in(&mut **tx, id).await?.ok_or(ApplyError::NotFound)?;
            if judge(&order, event)? == Transition::Unchanged {
                if order.shipment_id.is_none() {
                    // `accepted` without an id (the acknowledgement was
                    // unreadable): this report's shipment becomes the order's.
                    let sql = format!(
                        "UPDATE orders SET shipment_id = $1, updated_at = $2 \
                         WHERE id = $3 AND shipment_id IS NULL RETURNING {COLUMNS}"
                    );
                    let row = sqlx::query(&sql)
                        .bind(&event.shipment_id)
                        .bind(now_ms())
                        .bind(id.to_string())
                        .fetch_optional(&mut **tx)
                        .await?;
                    let Some(row) = row else {
                        continue;
                    };
                    return Ok((order_from_row(&row)?, Transition::Unchanged));
                }
                return Ok((order, Transition::Unchanged));
            }
            let now = now_ms();
            let (accepted_at, shipped_at) = match event.status {
                OrderStatus::Shipped => (Some(now), Some(now)),
                _ => (Some(now), None),
            };
            // The changed row comes back with the write: no second read.
            let sql = format!(
                "UPDATE orders SET status = $1, updated_at = $2, last_error = NULL, \
                 accepted_at = COALESCE(accepted_at, $3), \
                 shipped_at = COALESCE(shipped_at, $4), \
                 shipment_id = COALESCE(shipment_id, $5) \
                 WHERE id = $6 AND status = $7 \
                 AND (shipment_id IS NULL OR shipment_id = $5) RETURNING {COLUMNS}"
            );
            let row = sqlx::query(&sql)
                .bind(event.status.as_str())
                .bind(now)
                .bind(accepted_at)
                .bind(shipped_at)
                .bind(&event.shipment_id)
                .bind(id.to_string())
                .bind(order.status.as_str())
                .fetch_optional(&mut **tx)
                .await?;
            if let Some(row) = row {
                return Ok((order_from_row(&row)?, Transition::Changed));
            }
        }
        Err(ApplyError::Db(sqlx::Error::Protocol(
            "order status kept changing under a concurrent writer".into(),
        )))
    }
}

/// A batch's report, as one row of a statement that merges with the
/// batch's other reports (see [`OrderStore::plan_event`]): the compare-and-set
/// of [`OrderStore::apply_event`]'s second path, on the status as read.
const REPORT_ROW_SQL: &str = "UPDATE orders SET status = v.column1, updated_at = v.column2, \
     last_error = NULL, accepted_at = COALESCE(orders.accepted_at, v.column2), \
     shipped_at = COALESCE(orders.shipped_at, v.column3), \
     shipment_id = COALESCE(orders.shipment_id, v.column4) \
     FROM (VALUES ($1, CAST($2 AS BIGINT), CAST($3 AS BIGINT), $4, $5, $6)) AS v \
     WHERE orders.id = v.column5 AND orders.id IN ($5) AND orders.status = v.column6 \
     AND (orders.shipment_id IS NULL OR orders.shipment_id = v.column4)";
/// The parts of [`REPORT_ROW_SQL`] that repeat per report: its row, and
/// its id in `id IN (...)` (the first `$5` after the row).
const REPORT_ROW: &str = "($1, CAST($2 AS BIGINT), CAST($3 AS BIGINT), $4, $5, $6)";
const REPORT_ROW_ID: &str = "$5";

/// Where [`REPORT_ROW`] and [`REPORT_ROW_ID`] lie in [`REPORT_ROW_SQL`],
/// for `Write::repeating`.
fn report_sections() -> Vec<std::ops::Range<usize>> {
    resilience::store::sections(REPORT_ROW_SQL, &[REPORT_ROW, REPORT_ROW_ID])
}

/// The statement `n` of a batch's reports merge into (for the plan test):
/// per report its status, time, shipped time, shipment id, order id and the
/// status it moves from.
#[doc(hidden)]
pub fn report_rows_sql(n: usize) -> String {
    let rows: Vec<Write> = (0..n)
        .map(|_| Write::new(REPORT_ROW_SQL, 6, |q| q).repeating(report_sections()))
        .collect();
    Write::merged(rows)
        .into_iter()
        .map(|w| w.sql.into_owned())
        .collect::<Vec<_>>()
        .join("; ")
}

/// A report judged on the order as read: a report about another shipment
/// than the order's is refused, and the status machine says whether it
/// moves the order.
fn judge(order: &Order, event: &ShipmentEvent) -> Result<Transition, ApplyError> {
    if let Some(recorded) = &order.shipment_id {
        if *recorded != event.shipment_id {
            return Err(ApplyError::OtherShipment {
                recorded: recorded.clone(),
                reported: event.shipment_id.clone(),
            });
        }
    }
    Ok(order.status.transition(event.status)?)
}

/// What [`OrderStore::plan_event`] made of a report.
#[derive(Debug)]
pub enum Planned {
    /// The answer, and the write that makes it true (`None`: it changes
    /// nothing).
    Ready(Box<Order>, Transition, Option<Write>),
    /// Apply it the usual way, [`OrderStore::apply_event`].
    Usual,
    /// The batch must run its requests one by one.
    Again,
}

/// The orders a batch's reports name, as read and then as its reports
/// planned them. Cheap to clone (the batch's memo holds one).
#[derive(Clone, Default)]
pub(crate) struct BatchOrders(Arc<std::sync::Mutex<BatchOrdersInner>>);

#[derive(Default)]
struct BatchOrdersInner {
    loaded: bool,
    /// Each order, and whether a report of the batch changed it.
    orders: HashMap<OrderId, (Order, bool)>,
}

impl BatchOrders {
    fn inner(&self) -> std::sync::MutexGuard<'_, BatchOrdersInner> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_loaded(&self) -> bool {
        self.inner().loaded
    }

    fn load(&self, orders: Vec<Order>) {
        let mut inner = self.inner();
        inner.loaded = true;
        inner.orders = orders.into_iter().map(|o| (o.id, (o, false))).collect();
    }

    fn get(&self, id: OrderId) -> Option<(Order, bool)> {
        self.inner().orders.get(&id).cloned()
    }

    fn set(&self, id: OrderId, order: Order) {
        self.inner().orders.insert(id, (order, true));
    }

    /// The order goes the usual way from now on.
    fn forget(&self, id: OrderId) {
        self.inner().orders.remove(&id);
    }
}

/// The orders named by the batch's `/orders/{id}/shipment-events` paths,
/// each once, in id order.
fn report_ids(paths: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = paths
        .iter()
        .filter_map(|p| {
            let path = p.split('?').next()?;
            let id = path
                .strip_prefix("/orders/")?
                .strip_suffix("/shipment-events")?;
            id.parse::<OrderId>().ok().map(|id| id.to_string())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

async fn get_in<'e, E>(executor: E, id: OrderId) -> Result<Option<Order>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    let sql = format!("SELECT {COLUMNS} FROM orders WHERE id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(order_from_row).transpose()
}

fn order_from_row(row: &AnyRow) -> Result<Order, sqlx::Error> {
    let decode = |e: String| sqlx::Error::Decode(e.into());
    let id: String = row.try_get("id")?;
    let items: String = row.try_get("items")?;
    let mode: String = row.try_get("delivery_mode")?;
    let status: String = row.try_get("status")?;
    Ok(Order {
        id: id.parse().map_err(decode)?,
        customer_id: row.try_get("customer_id")?,
        items: serde_json::from_str(&items).map_err(|e| decode(e.to_string()))?,
        delivery_mode: mode
            .parse::<DeliveryMode>()
            .map_err(|e| decode(e.to_string()))?,
        status: status.parse().map_err(decode)?,
        shipment_id: row.try_get("shipment_id")?,
        last_error: row.try_get("last_error")?,
        send_attempts: row.try_get("send_attempts")?,
        created_at: rfc3339(row.try_get("created_at")?),
        accepted_at: row.try_get::<Option<i64>, _>("accepted_at")?.map(rfc3339),
        shipped_at: row.try_get::<Option<i64>, _>("shipped_at")?.map(rfc3339),
    })
}

/// The statement of [`OrderStore::record_accepted_all`] for `n` orders: `$1`
/// the time, then `(id, shipment id, attempts)` per order.
///
/// The orders are found through the primary key only: the ids are listed
/// again as `id IN (...)`, and `status = 'pending'` is written as a filter
/// that no index can serve. With stale statistics (a fresh table, or a
/// backlog that grew since the last `ANALYZE`) Postgres took
/// `status = 'pending'` for a rare value and hash-joined every pending order
/// read through `orders_by_status`: 5,000 rows read for a batch of 16, a
/// cost that grew with the backlog.
#[doc(hidden)]
pub fn accepted_all_sql(n: usize) -> String {
    // VALUES columns are column1, column2, ... on both backends.
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let b = 2 + 3 * i;
            format!("(${}, ${}, CAST(${} AS BIGINT))", b, b + 1, b + 2)
        })
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", 2 + 3 * i)).collect();
    format!(
        "UPDATE orders SET status = 'accepted', accepted_at = $1, updated_at = $1, \
         shipment_id = COALESCE(orders.shipment_id, v.column2), last_error = NULL, \
         send_attempts = COALESCE(v.column3, orders.send_attempts) \
         FROM (VALUES {}) AS v WHERE orders.id = v.column1 AND orders.id IN ({}) \
         AND (orders.status = 'pending') IS TRUE",
        rows.join(", "),
        ids.join(", ")
    )
}

/// The statement of [`OrderStore::apply_events_usual`] for `n` reports
/// whose statuses are among `statuses`: `$1` the time, then `(id, status,
/// shipment_id, shipped_at)` per report. A report moves its order only from
/// a status the status machine moves forward from (the statuses are the
/// enum's own constants, never input), and only if the order has no
/// shipment or the reported one. Rows are found through the primary key (the
/// ids listed again as `id IN (...)`), as in [`accepted_all_sql`].
#[doc(hidden)]
pub fn shipment_events_sql(n: usize, statuses: &[OrderStatus]) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            let b = 2 + 4 * i;
            format!(
                "(${}, ${}, ${}, CAST(${} AS BIGINT))",
                b,
                b + 1,
                b + 2,
                b + 3
            )
        })
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", 2 + 4 * i)).collect();
    let moves: Vec<String> = statuses
        .iter()
        .map(|to| {
            let below: Vec<String> = [
                OrderStatus::Pending,
                OrderStatus::Accepted,
                OrderStatus::Shipped,
            ]
            .into_iter()
            .filter(|s| s.transition(*to) == Ok(Transition::Changed))
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
            if below.is_empty() {
                "FALSE".to_string()
            } else {
                format!(
                    "(v.column2 = '{}' AND (orders.status IN ({})) IS TRUE)",
                    to.as_str(),
                    below.join(", ")
                )
            }
        })
        .collect();
    format!(
        "UPDATE orders SET status = v.column2, updated_at = $1, last_error = NULL, \
         accepted_at = COALESCE(orders.accepted_at, $1), \
         shipped_at = COALESCE(orders.shipped_at, v.column4), \
         shipment_id = COALESCE(orders.shipment_id, v.column3) \
         FROM (VALUES {}) AS v WHERE orders.id = v.column1 AND orders.id IN ({}) \
         AND ({}) AND (orders.shipment_id IS NULL OR orders.shipment_id = v.column3) \
         RETURNING id",
        rows.join(", "),
        ids.join(", "),
        if moves.is_empty() {
            "FALSE".to_string()
        } else {
            moves.join(" OR ")
        }
    )
}

/// The statement that keeps the sends of orders a report moved on before
/// their acknowledgement: `$1` the time, then `(id, attempts)` per order.
/// Found through the primary key, as in [`accepted_all_sql`].
#[doc(hidden)]
pub fn late_attempts_sql(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| format!("(${}, CAST(${} AS BIGINT))", 2 + 2 * i, 3 + 2 * i))
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", 2 + 2 * i)).collect();
    format!(
        "UPDATE orders SET send_attempts = v.column2, updated_at = $1 \
         FROM (VALUES {}) AS v \
         WHERE orders.id = v.column1 AND orders.id IN ({}) \
         AND orders.send_attempts < v.column2",
        rows.join(", "),
        ids.join(", ")
    )
}
