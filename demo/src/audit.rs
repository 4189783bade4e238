//! The delivery invariants, counted from both services' databases (never from
//! the services' own counters or answers).
//!
//! - **lost**: an order with no shipment.
//! - **duplicated**: an order with more than one shipment.
//! - **unacknowledged**: an order not `shipped` although one of its shipments shipped.

use std::collections::HashMap;

use resilience::store::Db;
use serde::Serialize;
use service_kit::DeliveryMode;
use sqlx::Row;

/// What the databases say about the orders of one delivery mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Invariants {
    /// The delivery mode (`None`: all orders).
    pub mode: Option<String>,
    /// Orders in order-service's database.
    pub orders: usize,
    /// Shipments (of those orders) in shipping-service's database.
    pub shipments: usize,
    /// Orders with no shipment.
    pub lost: usize,
    /// Orders with more than one shipment.
    pub duplicated: usize,
    /// Orders not `shipped` although one of their shipments shipped.
    pub unacknowledged: usize,
    /// HTTP attempts spent, both directions (plain calls and outbox sends).
    pub attempts: i64,
    /// Outbox messages of these orders the relays gave up on (dead letters),
    /// both directions.
    pub dead_letters: usize,
    /// Order created → first shipment created, 50th percentile, ms.
    pub latency_p50_ms: Option<i64>,
    /// Order created → first shipment created, 99th percentile, ms.
    pub latency_p99_ms: Option<i64>,
}

#[derive(Default)]
struct OrderRow {
    mode: String,
    status: String,
    created_at: i64,
    attempts: i64,
}

#[derive(Default)]
struct PerOrder {
    shipments: usize,
    any_shipped: bool,
    first_created: Option<i64>,
    attempts: i64,
    dead: usize,
}

/// Counts the invariants of every mode present, plus one row for `None` (all).
pub async fn audit_all(order_db: &Db, shipping_db: &Db) -> anyhow::Result<Vec<Invariants>> {
    let orders = load_orders(order_db).await?;
    let per_order = load_shipments(order_db, shipping_db, &orders).await?;
    let mut modes: Vec<String> = orders.values().map(|o| o.mode.clone()).collect();
    modes.sort();
    modes.dedup();
    let mut out: Vec<Invariants> = modes
        .iter()
        .map(|m| summarize(&orders, &per_order, Some(m)))
        .collect();
    out.push(summarize(&orders, &per_order, None));
    Ok(out)
}

/// Counts the invariants over the orders of one delivery mode (`None`: all).
pub async fn audit(
    order_db: &Db,
    shipping_db: &Db,
    mode: Option<&str>,
) -> anyhow::Result<Invariants> {
    let orders = load_orders(order_db).await?;
    let per_order = load_shipments(order_db, shipping_db, &orders).await?;
    Ok(summarize(&orders, &per_order, mode))
}

async fn load_orders(order_db: &Db) -> anyhow::Result<HashMap<String, OrderRow>> {
    let rows =
        sqlx::query("SELECT id, delivery_mode, status, send_attempts, created_at FROM orders")
            .fetch_all(order_db.pool())
            .await?;
    let mut orders = HashMap::with_capacity(rows.len());
    for r in rows {
        let mode: String = r.try_get("delivery_mode")?;
        // Outbox modes copy the outbox's count onto the order when shipping
        // acknowledges; the outbox rows (counted below) are the source.
        let attempts = if mode == "at-most-once" {
            r.try_get("send_attempts")?
        } else {
            0
        };
        orders.insert(
            r.try_get::<String, _>("id")?,
            OrderRow {
                mode,
                status: r.try_get("status")?,
                created_at: r.try_get("created_at")?,
                attempts,
            },
        );
    }
    Ok(orders)
}

async fn load_shipments(
    order_db: &Db,
    shipping_db: &Db,
    orders: &HashMap<String, OrderRow>,
) -> anyhow::Result<HashMap<String, PerOrder>> {
    let mut per_order: HashMap<String, PerOrder> = HashMap::new();
    // Requests order → shipping sent through the outbox, per order.
    let rows = sqlx::query(
        "SELECT correlation_id, attempts, status FROM outbox WHERE kind = 'create-shipment'",
    )
    .fetch_all(order_db.pool())
    .await?;
    for r in rows {
        if let Some(id) = r.try_get::<Option<String>, _>("correlation_id")? {
            let e = per_order.entry(id).or_default();
            e.attempts += r.try_get::<i64, _>("attempts")?;
            e.dead += usize::from(r.try_get::<String, _>("status")? == "dead");
        }
    }
    // Shipped reports shipping → order sent through the outbox, per shipment.
    let rows = sqlx::query(
        "SELECT correlation_id, attempts, status FROM outbox WHERE kind = 'shipped-report'",
    )
    .fetch_all(shipping_db.pool())
    .await?;
    // Per shipment: attempts and dead letters.
    let mut reports: HashMap<String, (i64, usize)> = HashMap::new();
    for r in rows {
        if let Some(id) = r.try_get::<Option<String>, _>("correlation_id")? {
            let e = reports.entry(id).or_default();
            e.0 += r.try_get::<i64, _>("attempts")?;
            e.1 += usize::from(r.try_get::<String, _>("status")? == "dead");
        }
    }
    // Feed events a consumer refused (pull modes), on either side: each
    // carries the order's id in its data.
    for db in [order_db, shipping_db] {
        let rows = sqlx::query("SELECT payload FROM feed_dead WHERE status = 'dead'")
            .fetch_all(db.pool())
            .await?;
        for r in rows {
            let payload: String = r.try_get("payload")?;
            let order_id = serde_json::from_str::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| {
                    v.get("order_id")
                        .and_then(|o| o.as_str())
                        .map(str::to_owned)
                });
            if let Some(id) = order_id {
                per_order.entry(id).or_default().dead += 1;
            }
        }
    }
    let rows =
        sqlx::query("SELECT id, order_id, status, created_at, report_attempts FROM shipments")
            .fetch_all(shipping_db.pool())
            .await?;
    for r in rows {
        let order_id: String = r.try_get("order_id")?;
        if !orders.contains_key(&order_id) {
            continue;
        }
        let id: String = r.try_get("id")?;
        let status: String = r.try_get("status")?;
        let created: i64 = r.try_get("created_at")?;
        let e = per_order.entry(order_id).or_default();
        e.shipments += 1;
        e.any_shipped |= status == "shipped";
        e.first_created = Some(e.first_created.map_or(created, |f| f.min(created)));
        // Reports sent through the outbox are counted there (the shipment's
        // column is a copy made at the end); at-most-once ones on the row.
        match reports.get(&id) {
            Some((attempts, dead)) => {
                e.attempts += attempts;
                e.dead += dead;
            }
            None => e.attempts += r.try_get::<i64, _>("report_attempts")?,
        }
    }
    Ok(per_order)
}

/// The invariants of a single order: the one place that says what lost,
/// duplicated and unacknowledged mean for an order.
fn one_order(o: &OrderRow, p: &PerOrder) -> Invariants {
    Invariants {
        mode: Some(o.mode.clone()),
        orders: 1,
        shipments: p.shipments,
        lost: usize::from(p.shipments == 0),
        duplicated: usize::from(p.shipments > 1),
        unacknowledged: usize::from(p.any_shipped && o.status != "shipped"),
        attempts: o.attempts + p.attempts,
        dead_letters: p.dead,
        ..Default::default()
    }
}

fn summarize(
    orders: &HashMap<String, OrderRow>,
    per_order: &HashMap<String, PerOrder>,
    mode: Option<&str>,
) -> Invariants {
    let mut inv = Invariants {
        mode: mode.map(str::to_string),
        ..Default::default()
    };
    let mut latencies = Vec::new();
    let empty = PerOrder::default();
    for (id, o) in orders
        .iter()
        .filter(|(_, o)| mode.is_none_or(|m| o.mode == m))
    {
        let p = per_order.get(id).unwrap_or(&empty);
        let one = one_order(o, p);
        inv.orders += one.orders;
        inv.shipments += one.shipments;
        inv.attempts += one.attempts;
        inv.dead_letters += one.dead_letters;
        inv.lost += one.lost;
        inv.duplicated += one.duplicated;
        inv.unacknowledged += one.unacknowledged;
        if let Some(first) = p.first_created {
            latencies.push((first - o.created_at).max(0));
        }
    }
    latencies.sort_unstable();
    inv.latency_p50_ms = percentile(&latencies, 50.0);
    inv.latency_p99_ms = percentile(&latencies, 99.0);
    inv
}

/// The story of each order that broke its mode's promise, read from both
/// databases: the order row, its shipments, and the outbox rows on both sides
/// (at most `max` orders). Printed when an invariant breaks, so a failed run
/// says why without keeping its databases.
pub async fn evidence(order_db: &Db, shipping_db: &Db, max: usize) -> anyhow::Result<Vec<String>> {
    let orders = load_orders(order_db).await?;
    let per_order = load_shipments(order_db, shipping_db, &orders).await?;
    let empty = PerOrder::default();
    let mut broken: Vec<(&String, &OrderRow)> = orders
        .iter()
        .filter(|(id, o)| {
            let p = per_order.get(*id).unwrap_or(&empty);
            !violations(&one_order(o, p)).is_empty()
        })
        .collect();
    broken.sort_by_key(|(_, o)| o.created_at);
    let mut out = Vec::new();
    for (id, o) in broken.into_iter().take(max) {
        let mut story = format!("order {id} ({}): status {}", o.mode, o.status);
        let row = sqlx::query(
            "SELECT shipment_id, last_error, created_at, accepted_at, shipped_at FROM orders \
             WHERE id = $1",
        )
        .bind(id)
        .fetch_one(order_db.pool())
        .await?;
        let opt = |c: &str| -> anyhow::Result<String> {
            Ok(match row.try_get::<Option<i64>, _>(c)? {
                Some(t) => format!("+{} ms", t - o.created_at),
                None => "-".into(),
            })
        };
        story += &format!(
            ", shipment_id {:?}, accepted {}, shipped {}, last_error {:?}",
            row.try_get::<Option<String>, _>("shipment_id")?,
            opt("accepted_at")?,
            opt("shipped_at")?,
            row.try_get::<Option<String>, _>("last_error")?,
        );
        story += &outbox_rows(order_db, id, o.created_at).await?;
        let shipments = sqlx::query(
            "SELECT id, status, created_at, report_error FROM shipments WHERE order_id = $1 \
             ORDER BY created_at",
        )
        .bind(id)
        .fetch_all(shipping_db.pool())
        .await?;
        for s in shipments {
            let sid: String = s.try_get("id")?;
            story += &format!(
                "\n    shipment {sid}: {} (created +{} ms), report_error {:?}",
                s.try_get::<String, _>("status")?,
                s.try_get::<i64, _>("created_at")? - o.created_at,
                s.try_get::<Option<String>, _>("report_error")?,
            );
            story += &outbox_rows(shipping_db, &sid, o.created_at).await?;
        }
        out.push(story);
    }
    Ok(out)
}

/// The outbox rows of one correlation id, one line each.
async fn outbox_rows(db: &Db, correlation: &str, t0: i64) -> anyhow::Result<String> {
    let rows = sqlx::query(
        "SELECT id, kind, status, attempts, last_status, last_error, created_at, updated_at \
         FROM outbox WHERE correlation_id = $1 ORDER BY created_at",
    )
    .bind(correlation)
    .fetch_all(db.pool())
    .await?;
    let mut out = String::new();
    for r in rows {
        out += &format!(
            "\n      outbox {}: {} after {} attempts (created +{} ms, updated +{} ms), \
             last status {:?}, last error {:?}, id {}",
            r.try_get::<String, _>("kind")?,
            r.try_get::<String, _>("status")?,
            r.try_get::<i64, _>("attempts")?,
            r.try_get::<i64, _>("created_at")? - t0,
            r.try_get::<i64, _>("updated_at")? - t0,
            r.try_get::<Option<i64>, _>("last_status")?,
            r.try_get::<Option<String>, _>("last_error")?,
            r.try_get::<String, _>("id")?,
        );
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(super::percentile(&v, 50.0), Some(50));
        assert_eq!(super::percentile(&v, 99.0), Some(99));
        assert_eq!(super::percentile(&[7], 99.0), Some(7));
        assert_eq!(super::percentile(&[], 50.0), None);
    }
}

/// The invariants a mode promises (DESIGN.md), as broken-rule messages.
pub fn violations(inv: &Invariants) -> Vec<String> {
    let Some(mode) = inv
        .mode
        .as_deref()
        .and_then(|m| m.parse::<DeliveryMode>().ok())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut check = |what: &str, n: usize| {
        if n > 0 {
            out.push(format!("{mode}: {n} {what}"));
        }
    };
    // DESIGN.md's table: every mode but at-most-once loses nothing and
    // leaves nothing unacknowledged; at-most-once, effectively-once and
    // pull-effectively-once never duplicate.
    if mode.promises_no_loss() {
        check("lost", inv.lost);
        check("unacknowledged", inv.unacknowledged);
    }
    if mode.promises_no_duplicates() {
        check("duplicated", inv.duplicated);
    }
    out
}

#[cfg(test)]
mod violation_tests {
    use super::*;

    #[test]
    fn hardened_modes_report_violations() {
        let inv = |mode: &str, lost, duplicated, unacknowledged| Invariants {
            mode: Some(mode.into()),
            lost,
            duplicated,
            unacknowledged,
            ..Default::default()
        };
        assert!(violations(&inv("at-most-once", 5, 0, 3)).is_empty());
        assert_eq!(violations(&inv("at-most-once", 0, 1, 0)).len(), 1);
        assert!(violations(&inv("at-least-once", 0, 4, 0)).is_empty());
        assert_eq!(violations(&inv("at-least-once", 1, 0, 1)).len(), 2);
        assert_eq!(violations(&inv("effectively-once", 0, 1, 0)).len(), 1);
        assert!(violations(&inv("effectively-once", 0, 0, 0)).is_empty());
        assert!(violations(&inv("memory-dedupe", 0, 3, 0)).is_empty());
        assert_eq!(violations(&inv("memory-dedupe", 1, 0, 0)).len(), 1);
        assert!(violations(&inv("pull-at-least-once", 0, 2, 0)).is_empty());
        assert_eq!(violations(&inv("pull-at-least-once", 0, 0, 1)).len(), 1);
        assert_eq!(violations(&inv("pull-effectively-once", 0, 1, 0)).len(), 1);
        assert_eq!(violations(&inv("pull-effectively-once", 1, 1, 1)).len(), 3);
        assert!(violations(&Invariants::default()).is_empty());
    }
}
