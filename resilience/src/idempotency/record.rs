//! The `idempotency_keys` table: lookup, insert, delete, replay.

use axum::body::Body;
use axum::response::Response;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use super::IDEMPOTENT_REPLAYED;
use crate::store::Backend;

/// A completed response as stored.
#[derive(Debug)]
pub(crate) struct Stored {
    pub(crate) fingerprint: String,
    pub(crate) status: i64,
    pub(crate) headers: String,
    pub(crate) body: Vec<u8>,
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
}

/// A response about to be stored.
#[derive(Debug)]
pub(crate) struct NewRecord<'a> {
    pub(crate) scope: &'a str,
    pub(crate) key: &'a str,
    pub(crate) fingerprint: &'a str,
    pub(crate) status: i64,
    pub(crate) headers: String,
    pub(crate) body: &'a [u8],
    pub(crate) created_at: i64,
    pub(crate) expires_at: i64,
}

impl NewRecord<'_> {
    /// The record, owned, to be inserted later with the rest of its batch.
    pub(crate) fn to_owned_record(&self) -> OwnedRecord {
        OwnedRecord {
            scope: self.scope.to_owned(),
            key: self.key.to_owned(),
            fingerprint: self.fingerprint.to_owned(),
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.to_vec(),
            created_at: self.created_at,
            expires_at: self.expires_at,
        }
    }
}

/// A completed record waiting for its batch's multi-row insert.
#[derive(Debug, Clone)]
pub(crate) struct OwnedRecord {
    scope: String,
    key: String,
    fingerprint: String,
    status: i64,
    headers: String,
    body: Vec<u8>,
    created_at: i64,
    expires_at: i64,
}

/// Rows per multi-row insert (8 parameters each: far below both backends'
/// limits).
const INSERT_CHUNK: usize = 100;

/// Runs a batch's held writes and inserts its records, many per statement.
/// The writes go with the first records statement (one round trip for all
/// of them): on Postgres folded into it, on SQLite as one script with it. A unique violation means a key was answered twice (two requests
/// with one key in a batch, or a race with another transaction): the batch
/// must roll back, as for any failure here. On Postgres it returns the
/// transaction's id when it inserted a record, as [`insert`] does.
pub(crate) async fn insert_all(
    tx: &mut sqlx::AnyConnection,
    writes: Vec<crate::store::Write>,
    recs: &[OwnedRecord],
    backend: Backend,
) -> Result<Option<i64>, sqlx::Error> {
    let mut xid = None;
    let mut writes = Some(writes);
    if recs.is_empty() {
        crate::store::run_writes(&mut *tx, backend, writes.take().unwrap_or_default()).await?;
    }
    for chunk in recs.chunks(INSERT_CHUNK) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| crate::store::placeholders(8 * i + 1, 8))
            .collect();
        let returning = match backend {
            Backend::Postgres => " RETURNING CAST(txid_current() AS BIGINT)",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "INSERT INTO idempotency_keys \
             (scope, idem_key, fingerprint, status, headers, body, created_at, expires_at) \
             VALUES {}{returning}",
            rows.join(", ")
        );
        let chunk = chunk.to_vec();
        let insert = crate::store::Write::new(sql, 8 * chunk.len(), move |mut q| {
            for r in chunk {
                q = q
                    .bind(r.scope)
                    .bind(r.key)
                    .bind(r.fingerprint)
                    .bind(r.status)
                    .bind(r.headers)
                    .bind(r.body)
                    .bind(r.created_at)
                    .bind(r.expires_at);
            }
            q
        });
        let parts: Vec<_> = writes
            .take()
            .unwrap_or_default()
            .into_iter()
            .chain(Some(insert))
            .collect();
        let Some(w) = crate::store::Write::joined_for(backend, parts) else {
            continue;
        };
        let q = (w.bind)(sqlx::query(&w.sql));
        match backend {
            Backend::Postgres => {
                let rows = q.fetch_all(&mut *tx).await?;
                if let Some(row) = rows.first() {
                    xid = Some(row.try_get::<i64, _>(0)?);
                }
            }
            Backend::Sqlite => {
                q.execute(&mut *tx).await?;
            }
        }
    }
    Ok(xid)
}

fn stored_from_row(row: &AnyRow) -> Result<Option<Stored>, sqlx::Error> {
    let Some(fingerprint) = row.try_get::<Option<String>, _>("fingerprint")? else {
        return Ok(None);
    };
    Ok(Some(Stored {
        fingerprint,
        status: row.try_get("status")?,
        headers: row.try_get("headers")?,
        body: row.try_get("body")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    }))
}

/// What a key's lookup under its lock means for the request.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A completed record answers it (replayed, or 422 for another request).
    Replay(Stored),
    /// An expired record, ours to delete: run the request.
    Expired,
    /// No record, and the key is ours: run the request.
    Absent,
    /// Another request with the key holds it.
    InFlight,
}

/// Reads a lookup: `locked` is whether the key's lock is ours.
pub(crate) fn classify(locked: bool, stored: Option<Stored>, now: i64) -> Verdict {
    match stored {
        Some(stored) if stored.expires_at > now => Verdict::Replay(stored),
        Some(_) if locked => Verdict::Expired,
        None if locked => Verdict::Absent,
        _ => Verdict::InFlight,
    }
}

/// Postgres: the writes a handler left to the layer and the key's record,
/// as one statement run outside any transaction (it commits on its own):
/// one round trip for the whole request.
///
/// The record's insert tries the key's advisory lock first and inserts no
/// fingerprint (a NOT NULL violation, so the statement fails and keeps
/// nothing) when another request holds it, so it never waits on a key in
/// flight, even one held by a frozen replica. A record already there
/// (completed, or expired) fails it with a unique violation. Either way the
/// server answers with an error and nothing was kept.
pub(crate) async fn insert_with_writes(
    conn: &mut sqlx::AnyConnection,
    writes: Vec<crate::store::Write>,
    rec: OwnedRecord,
    lock_id: i64,
) -> Result<(), sqlx::Error> {
    const RECORD: &str = "INSERT INTO idempotency_keys \
         (scope, idem_key, fingerprint, status, headers, body, created_at, expires_at) \
         SELECT $1, $2, CASE WHEN pg_try_advisory_xact_lock($9) THEN $3 END, \
         $4, $5, $6, $7, $8";
    let record = crate::store::Write::new(RECORD, 9, move |q| {
        q.bind(rec.scope)
            .bind(rec.key)
            .bind(rec.fingerprint)
            .bind(rec.status)
            .bind(rec.headers)
            .bind(rec.body)
            .bind(rec.created_at)
            .bind(rec.expires_at)
            .bind(lock_id)
    });
    let all: Vec<_> = writes.into_iter().chain(Some(record)).collect();
    if let Some(w) = crate::store::Write::fold(all) {
        (w.bind)(sqlx::query(&w.sql)).execute(conn).await?;
    }
    Ok(())
}

/// What reading a key back says about a statement whose answer was lost.
#[derive(Debug)]
pub(crate) enum ReadBack {
    /// The record is the one this request wrote: it committed.
    Ours,
    /// A record for the key, written by another request with it.
    Theirs(Stored),
    /// No record could be found in time: the outcome is unknown.
    Unknown,
}

/// After [`insert_with_writes`] lost its answer: looks the key up on fresh
/// pooled connections, for up to [`RESOLVE_FOR`](crate::store::RESOLVE_FOR).
/// The record is the request's own when it holds the same fingerprint,
/// body and creation time. No record is never taken as "rolled back": the
/// statement may still be finishing on the server.
pub(crate) async fn read_back(pool: &sqlx::AnyPool, rec: &OwnedRecord) -> ReadBack {
    let deadline = tokio::time::Instant::now() + crate::store::RESOLVE_FOR;
    loop {
        let asked = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            lookup(pool, &rec.scope, &rec.key),
        )
        .await;
        match asked {
            // An expired record is not this request's, nor an answer to it.
            Ok(Ok(Some(stored))) if stored.expires_at > crate::store::now_ms() => {
                return if stored.fingerprint == rec.fingerprint
                    && stored.body == rec.body
                    && stored.created_at == rec.created_at
                {
                    ReadBack::Ours
                } else {
                    ReadBack::Theirs(stored)
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "read-back of a key failed"),
            Err(_) => tracing::debug!("read-back of a key timed out"),
        }
        if tokio::time::Instant::now() >= deadline {
            return ReadBack::Unknown;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Postgres: try the advisory lock and look the record up, one round trip.
pub(crate) async fn lock_and_lookup<'c, E>(
    conn: E,
    lock_id: i64,
    scope: &str,
    key: &str,
) -> Result<(bool, Option<Stored>), sqlx::Error>
where
    E: Executor<'c, Database = Any>,
{
    let row = sqlx::query(
        "SELECT pg_try_advisory_xact_lock($1) AS locked, \
                r.fingerprint, r.status, r.headers, r.body, r.created_at, r.expires_at \
         FROM (SELECT 1 AS one) AS o \
         LEFT JOIN idempotency_keys r ON r.scope = $2 AND r.idem_key = $3",
    )
    .bind(lock_id)
    .bind(scope)
    .bind(key)
    .fetch_one(conn)
    .await?;
    let locked: bool = row.try_get("locked")?;
    Ok((locked, stored_from_row(&row)?))
}

/// The Postgres statement of [`lookup_many`] for `n` keys: `$1` is the
/// scope, then each key and its advisory-lock id.
///
/// Each key is looked up on its own through the primary key: the `LATERAL`
/// subquery, fenced by `OFFSET 0`, cannot be flattened into a join, so the
/// planner cannot pick a hash join over every record of the scope. It did
/// when the table's statistics were stale (a fresh or fast-growing table):
/// a batch of 16 keys read 3,920 records, a cost that grew with the table.
#[doc(hidden)]
pub fn lookup_many_sql(n: usize) -> String {
    let mut sql = String::from(
        "SELECT v.k AS idem_key, pg_try_advisory_xact_lock(v.l) AS locked, \
         r.fingerprint, r.status, r.headers, r.body, r.created_at, r.expires_at FROM (VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("(${}, ${})", 2 * i + 2, 2 * i + 3));
    }
    sql.push_str(
        ") AS v(k, l) LEFT JOIN LATERAL (SELECT fingerprint, status, headers, body, created_at, expires_at \
         FROM idempotency_keys WHERE scope = $1 AND idem_key = v.k OFFSET 0) AS r ON true",
    );
    sql
}

/// Looks several keys of one scope up in one statement (expired records
/// too). On Postgres it also tries each key's advisory lock, as
/// [`lock_and_lookup`] does for one; on SQLite the batch's write
/// transaction is the lock, and every key counts as locked. `keys` holds no
/// duplicates. Answers `(key, locked, record)` per key.
pub(crate) async fn lookup_many(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    schema: &str,
    scope: &str,
    keys: &[String],
) -> Result<Vec<(String, bool, Option<Stored>)>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    match backend {
        Backend::Postgres => {
            let sql = lookup_many_sql(keys.len());
            let mut q = sqlx::query(&sql).bind(scope);
            for key in keys {
                q = q
                    .bind(key.as_str())
                    .bind(super::key::lock_id(schema, scope, key));
            }
            q.fetch_all(conn)
                .await?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get("idem_key")?,
                        row.try_get("locked")?,
                        stored_from_row(row)?,
                    ))
                })
                .collect()
        }
        Backend::Sqlite => {
            let mut sql = String::from(
                "SELECT idem_key, fingerprint, status, headers, body, created_at, expires_at \
                 FROM idempotency_keys WHERE scope = $1 AND idem_key IN (",
            );
            for i in 0..keys.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${}", i + 2));
            }
            sql.push(')');
            let mut q = sqlx::query(&sql).bind(scope);
            for key in keys {
                q = q.bind(key.as_str());
            }
            let mut found = std::collections::HashMap::new();
            for row in q.fetch_all(conn).await? {
                let key: String = row.try_get("idem_key")?;
                found.insert(key, stored_from_row(&row)?);
            }
            Ok(keys
                .iter()
                .map(|k| (k.clone(), true, found.remove(k).flatten()))
                .collect())
        }
    }
}

/// Looks the record up (expired or not).
pub(crate) async fn lookup<'c, E>(
    conn: E,
    scope: &str,
    key: &str,
) -> Result<Option<Stored>, sqlx::Error>
where
    E: Executor<'c, Database = Any>,
{
    let row = sqlx::query(
        "SELECT fingerprint, status, headers, body, created_at, expires_at \
         FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(conn)
    .await?;
    match row {
        Some(row) => stored_from_row(&row),
        None => Ok(None),
    }
}

/// Deletes one record (an expired one found at lookup).
pub(crate) async fn delete<'c, E>(conn: E, scope: &str, key: &str) -> Result<(), sqlx::Error>
where
    E: Executor<'c, Database = Any>,
{
    sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2")
        .bind(scope)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts a completed record; a unique violation means another request
/// with the same key committed first. On Postgres it also returns the
/// transaction's id (the insert has just given it one), which the commit
/// needs to resolve a lost answer: one round trip instead of two.
pub(crate) async fn insert<'c, E>(
    conn: E,
    rec: &NewRecord<'_>,
    backend: Backend,
) -> Result<Option<i64>, sqlx::Error>
where
    E: Executor<'c, Database = Any>,
{
    // Both forms are literals: nothing is built per request.
    macro_rules! insert {
        () => {
            "INSERT INTO idempotency_keys \
             (scope, idem_key, fingerprint, status, headers, body, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        };
    }
    let sql = match backend {
        Backend::Postgres => concat!(insert!(), " RETURNING CAST(txid_current() AS BIGINT)"),
        Backend::Sqlite => insert!(),
    };
    let query = sqlx::query(sql)
        .bind(rec.scope)
        .bind(rec.key)
        .bind(rec.fingerprint)
        .bind(rec.status)
        .bind(rec.headers.as_str())
        .bind(rec.body.to_vec())
        .bind(rec.created_at)
        .bind(rec.expires_at);
    match backend {
        Backend::Postgres => {
            let row = query.fetch_one(conn).await?;
            Ok(Some(row.try_get(0)?))
        }
        Backend::Sqlite => {
            query.execute(conn).await?;
            Ok(None)
        }
    }
}

/// Deletes up to `batch` records expired at `now`; returns how many.
pub(crate) async fn delete_expired<'c, E>(conn: E, now: i64, batch: i64) -> Result<u64, sqlx::Error>
where
    E: Executor<'c, Database = Any>,
{
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE (scope, idem_key) IN \
         (SELECT scope, idem_key FROM idempotency_keys WHERE expires_at <= $1 \
          ORDER BY expires_at LIMIT $2)",
    )
    .bind(now)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Headers never stored: hop-by-hop ones, and those the server recomputes.
fn is_stored(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "date"
            | "content-length"
            | IDEMPOTENT_REPLAYED
    )
}

/// The response headers worth replaying, as a JSON array of `[name, value]`.
/// Values that are not visible ASCII are left out (and logged).
pub(crate) fn encode_headers(headers: &HeaderMap) -> String {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(name, _)| is_stored(name))
        .filter_map(|(name, value)| match value.to_str() {
            Ok(v) => Some((name.as_str(), v)),
            Err(_) => {
                tracing::debug!(header = %name, "response header not stored: not visible ASCII");
                None
            }
        })
        .collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_string())
}

/// The stored answer, marked `Idempotent-Replayed: true`.
pub(crate) fn replay(stored: Stored) -> Response {
    let status = u16::try_from(stored.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = Response::new(Body::from(stored.body));
    *res.status_mut() = status;
    let pairs: Vec<(String, String)> = match serde_json::from_str(&stored.headers) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "stored response headers unreadable; replaying without them");
            Vec::new()
        }
    };
    let headers = res.headers_mut();
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    headers.remove(header::CONTENT_LENGTH);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_without_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::LOCATION, HeaderValue::from_static("/w/1"));
        h.insert("x-custom", HeaderValue::from_static("v"));
        h.insert(header::DATE, HeaderValue::from_static("now"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let json = encode_headers(&h);
        let res = replay(Stored {
            fingerprint: String::new(),
            status: 201,
            headers: json,
            body: b"abc".to_vec(),
            created_at: 0,
            expires_at: 0,
        });
        assert_eq!(res.status(), StatusCode::CREATED);
        let h = res.headers();
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["location"], "/w/1");
        assert_eq!(h["x-custom"], "v");
        assert_eq!(h[IDEMPOTENT_REPLAYED], "true");
        assert!(h.get(header::DATE).is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }
}
