//! One database handle over SQLite or Postgres.
//!
//! Every service in this project keeps its state in a relational database, and
//! every piece of delivery machinery (the outbox, the idempotency records) must
//! write in the *same transaction* as the service's own state change. So the
//! handle is one sqlx [`AnyPool`]: queries are written once, with `$1`-style
//! placeholders that both backends accept, using only types both backends map
//! the same way (`TEXT`, `BIGINT`/`INTEGER`, `BYTEA`/`BLOB`). Timestamps are
//! integer milliseconds since the Unix epoch.
//!
//! The few places where the backends differ (how a write transaction starts,
//! how rows are claimed) ask [`Db::backend`].
//!
//! On Postgres each service lives in a schema of its own, so two services
//! pointed at one database never collide. On SQLite the file is the boundary.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Executor, Transaction};

mod write;
pub use write::{run_writes, sections, shift_placeholders, BindWrite, Write};

/// Which database engine sits behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (WAL mode).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// Errors from opening or preparing a database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:` nor `postgres://`.
    #[error("unsupported database url (expected sqlite:<path> or postgres://...): {0}")]
    UnsupportedUrl(String),
    /// The schema name is not a plain identifier.
    #[error("invalid schema name {0:?} (letters, digits and underscores only)")]
    InvalidSchema(String),
    /// The parent directory of a SQLite file could not be created.
    #[error("cannot create directory for the database file: {0}")]
    Io(#[from] std::io::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

/// Options for [`Db::connect`].
#[derive(Debug, Clone)]
pub struct DbOptions {
    /// `sqlite:<path>`, `sqlite://<path>`, or `postgres://...`.
    pub url: String,
    /// Postgres schema owned by this service (ignored on SQLite).
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a pooled connection (and, on SQLite, for the write lock).
    pub acquire_timeout: Duration,
    /// How long [`Db::connect`] keeps retrying (with backoff) while the
    /// database is unreachable at start-up, before it gives up.
    pub connect_timeout: Duration,
    /// Postgres `lock_timeout`: a statement waiting this long for a row or
    /// table lock fails (and the request answers 503) instead of queueing
    /// behind a stalled holder.
    pub lock_timeout: Duration,
    /// Postgres `idle_in_transaction_session_timeout`: the server ends a
    /// session that sits this long inside a transaction (a frozen or
    /// half-dead client), releasing its locks.
    pub idle_in_transaction_timeout: Duration,
    /// Postgres TCP keepalive idle time (`tcp_keepalives_idle`, with a probe
    /// interval of a third of it and 3 probes): the server notices a peer
    /// that vanished without closing the connection.
    pub keepalive_idle: Duration,
}

impl DbOptions {
    /// Options with the defaults used by the services.
    pub fn new(url: impl Into<String>, schema: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: schema.into(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: Duration::from_secs(15),
            keepalive_idle: Duration::from_secs(10),
        }
    }
}

/// A pooled database handle, cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    /// SQLite: the one connection every write goes through, so writers
    /// queue in-process (first come, first served) instead of polling the
    /// file lock. Postgres: the pool itself.
    writer: AnyPool,
    backend: Backend,
    url: std::sync::Arc<str>,
    schema: std::sync::Arc<str>,
}

impl Db {
    /// Opens (and, for SQLite, creates) the database, ready for [`Db::migrate`].
    ///
    /// While the database is unreachable (connection refused, reset, not
    /// accepting connections yet, pool timeout), retries with exponential
    /// backoff for up to [`DbOptions::connect_timeout`]; other errors (a bad
    /// URL, bad credentials) fail at once.
    pub async fn connect(opts: &DbOptions) -> Result<Self, StoreError> {
        let deadline = tokio::time::Instant::now() + opts.connect_timeout;
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::connect_once(opts).await {
                Ok(db) => return Ok(db),
                Err(StoreError::Sqlx(e))
                    if is_connection_error(&e) && tokio::time::Instant::now() < deadline =>
                {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    tracing::warn!(error = %e, retry_in = ?delay, ?left, "database unreachable; retrying");
                    tokio::time::sleep(delay.min(left)).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect_once(opts: &DbOptions) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = normalize_url(&opts.url)?;
        if !opts
            .schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || opts.schema.is_empty()
        {
            return Err(StoreError::InvalidSchema(opts.schema.clone()));
        }
        let connect_opts = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let pool_opts = AnyPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout);
        let (pool, writer) = match backend {
            Backend::Sqlite => {
                let busy_ms = opts.acquire_timeout.as_millis();
                let pragmas = move |pool_opts: AnyPoolOptions| {
                    pool_opts.after_connect(move |conn, _meta| {
                        Box::pin(async move {
                            // WAL lets readers proceed while one writer commits;
                            // NORMAL sync is durable across process crashes in WAL mode.
                            let pragmas = format!(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                                 PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {busy_ms};"
                            );
                            conn.execute(pragmas.as_str()).await?;
                            Ok(())
                        })
                    })
                };
                // SQLite lets one connection write at a time. Writers that
                // each hold a connection of their own wait for the file lock
                // by sleeping and polling (busy timeout), which wastes the
                // lock's idle moments and stretches the tail (issue 14).
                // One writer connection makes them queue in the pool's
                // in-process wait list instead: the lock is handed over the
                // moment it is free. Other processes on the same file still
                // meet the busy timeout.
                //
                // A connection to a local file cannot go stale the way a
                // network connection can, so the pools skip sqlx's ping
                // before each acquire: a round trip to the connection's
                // worker thread, which on the one writer connection is one
                // more step every write of the process waits behind.
                let writer = pragmas(
                    AnyPoolOptions::new()
                        .max_connections(1)
                        .acquire_timeout(opts.acquire_timeout)
                        .test_before_acquire(false),
                )
                .connect_with(connect_opts.clone())
                .await?;
                let pool = pragmas(pool_opts.test_before_acquire(false))
                    .connect_with(connect_opts)
                    .await?;
                (pool, writer)
            }
            Backend::Postgres => {
                // Create the schema once, on a connection of its own, before the
                // pool's connections start pointing their search_path at it.
                let mut conn = sqlx::AnyConnection::connect_with(&connect_opts).await?;
                let create = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", opts.schema);
                if let Err(e) = conn.execute(create.as_str()).await {
                    // Two replicas starting at once can race on the catalog; the
                    // loser sees a unique violation and the schema exists anyway.
                    if !is_unique_violation(&e) {
                        return Err(e.into());
                    }
                }
                conn.close().await?;
                let keepalive = opts.keepalive_idle.as_secs().max(1);
                // `plan_cache_mode = force_custom_plan`: sqlx prepares each
                // statement once per connection, and after five executions
                // Postgres may switch that statement to a generic plan and
                // keep it for the connection's life. A service's tables start
                // empty and grow, so a generic plan made in its first seconds
                // is one for a table of a few pages: the relay's claim kept
                // a hash join over a sequential scan of the whole outbox
                // (delivered history included) long after the table grew.
                // Planning each execution with the table as it is costs
                // less than that (see the README's benchmark section).
                let session = format!(
                    "SET search_path TO \"{}\"; SET lock_timeout = {}; \
                     SET idle_in_transaction_session_timeout = {}; \
                     SET tcp_keepalives_idle = {keepalive}; SET tcp_keepalives_interval = {}; \
                     SET tcp_keepalives_count = 3; SET client_connection_check_interval = {}; \
                     SET plan_cache_mode = force_custom_plan",
                    opts.schema,
                    opts.lock_timeout.as_millis(),
                    opts.idle_in_transaction_timeout.as_millis(),
                    (keepalive / 3).max(1),
                    keepalive * 1000,
                );
                let search_path = session;
                let pool = pool_opts
                    .after_connect(move |conn, _meta| {
                        let search_path = search_path.clone();
                        Box::pin(async move {
                            conn.execute(search_path.as_str()).await?;
                            Ok(())
                        })
                    })
                    .connect_with(connect_opts)
                    .await?;
                (pool.clone(), pool)
            }
        };
        Ok(Self {
            pool,
            writer,
            backend,
            url: url.into(),
            schema: opts.schema.as_str().into(),
        })
    }

    /// Applies a set of migrations. Several migrators (the service's own and the
    /// ones shipped by this crate) share one history table, so each ignores the
    /// versions that belong to the others; their version ranges must not overlap.
    pub async fn migrate(&self, mut migrator: Migrator) -> Result<(), StoreError> {
        migrator.set_ignore_missing(true);
        // SQLite has no advisory locks; the file lock serializes writers anyway.
        if self.backend == Backend::Sqlite {
            migrator.set_locking(false);
        }
        migrator.run(&self.pool).await?;
        Ok(())
    }

    /// Applies the migrations this crate ships (outbox, idempotency records)
    /// for this backend. Services call it next to their own [`Db::migrate`].
    pub async fn migrate_resilience(&self) -> Result<(), StoreError> {
        let m = match self.backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        self.migrate(m).await
    }

    /// The pool, for reads outside a transaction.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Where writes outside a transaction go: on SQLite the single writer
    /// connection that [`Db::begin`] also uses (writers queue in-process),
    /// on Postgres the pool. Do not call it while holding a transaction of
    /// this `Db` on SQLite: that waits for the connection it holds.
    pub fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// Which engine this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The normalized URL (for opening side connections such as `LISTEN`).
    /// It may carry credentials: never log it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The Postgres schema this handle works in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Begins a transaction that will write.
    ///
    /// On SQLite this is `BEGIN IMMEDIATE`: the write lock is taken up front, so
    /// a transaction that reads then writes waits for the lock instead of
    /// failing with `SQLITE_BUSY` when it tries to upgrade; and it runs on
    /// the one writer connection (see [`Db::writer`]), so writers of this
    /// process wait in line in-process rather than polling the file lock.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// `SELECT 1`: is the database reachable?
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    /// [`Db::close`], giving up after `limit` (a connection stuck on a
    /// silent network would hold it forever): `false` if it gave up. New
    /// acquires fail from the start either way.
    pub async fn close_within(&self, limit: std::time::Duration) -> bool {
        let closed = tokio::time::timeout(limit, self.close()).await.is_ok();
        if !closed {
            tracing::warn!(
                ?limit,
                "database connections did not close in time; leaving them to the exit"
            );
        }
        closed
    }
}

/// Sends one `pg_notify(channel)` per burst of `poke` notifications until
/// `stop` resolves: pokes that arrive while one notify is in flight make one
/// more notify, not many. It runs outside any producer's transaction, so no
/// commit waits on the server-wide lock that a `NOTIFY` takes. A failed
/// notify is only logged: the listeners' slow poll is the safety net.
#[cfg(any(feature = "outbox", all(feature = "feed", feature = "postgres")))]
pub(crate) async fn notify_on_poke(
    db: &Db,
    channel: &str,
    poke: &tokio::sync::Notify,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = poke.notified() => {}
        }
        let sent = sqlx::query("SELECT pg_notify($1, '')")
            .bind(channel)
            .execute(db.pool())
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, %channel, "pg_notify failed; listeners poll");
        }
    }
}

/// What became of a transaction whose `COMMIT` was sent.
#[derive(Debug)]
pub enum CommitOutcome {
    /// It committed (the database said so, or a read-back on a fresh
    /// connection found it committed). Also returned when the transaction
    /// wrote nothing, so there was nothing to lose.
    Committed,
    /// It certainly did not commit: nothing it wrote was saved.
    RolledBack(sqlx::Error),
    /// The connection failed while committing and the database could not be
    /// asked afterwards: the writes may or may not be saved.
    Unknown(sqlx::Error),
}

/// How long [`Db::commit_resolved`] keeps asking the database about an
/// ambiguous commit before it calls the outcome unknown.
pub(crate) const RESOLVE_FOR: Duration = Duration::from_secs(3);

impl Db {
    /// Commits `tx` and, if the commit fails, finds out whether it happened
    /// anyway.
    ///
    /// A `COMMIT` whose answer is lost (the connection dropped after the
    /// server ran it) is ambiguous: the server may have committed. On
    /// Postgres the transaction's id is read just before the commit; after a
    /// failure that is not an answer from the server, `txid_status` on a fresh
    /// pooled connection says whether that transaction committed, aborted or
    /// is still finishing (asked again, for up to a few seconds). A
    /// transaction that never wrote has no id and nothing to lose. On SQLite
    /// the engine is in-process: a failed commit did not commit.
    pub async fn commit_resolved(&self, mut tx: Transaction<'static, Any>) -> CommitOutcome {
        let xid = match self.backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                match sqlx::query_scalar::<_, Option<i64>>("SELECT txid_current_if_assigned()")
                    .fetch_one(&mut *tx)
                    .await
                {
                    Ok(xid) => xid,
                    // The transaction is unusable, so it cannot commit: say so.
                    Err(e) => return CommitOutcome::RolledBack(e),
                }
            }
        };
        self.commit_resolved_as(tx, xid).await
    }

    /// [`Db::commit_resolved`] for a transaction whose id the caller already
    /// read inside it (for instance with `RETURNING txid_current()` on its
    /// last write), which saves the round trip that asks for it. `xid` must
    /// be that transaction's own id, or `None` if it wrote nothing.
    pub async fn commit_resolved_as(
        &self,
        tx: Transaction<'static, Any>,
        xid: Option<i64>,
    ) -> CommitOutcome {
        let err = match tx.commit().await {
            Ok(()) => return CommitOutcome::Committed,
            Err(e) => e,
        };
        let Some(xid) = xid else {
            return match self.backend {
                // Postgres without an id: nothing was written.
                Backend::Postgres => CommitOutcome::Committed,
                Backend::Sqlite => CommitOutcome::RolledBack(err),
            };
        };
        if matches!(err, sqlx::Error::Database(_)) && !is_connection_error(&err) {
            // The server answered the COMMIT with an error: it rolled back.
            return CommitOutcome::RolledBack(err);
        }
        tracing::warn!(error = %err, xid, "commit failed without an answer; reading back its outcome");
        let deadline = tokio::time::Instant::now() + RESOLVE_FOR;
        loop {
            let asked = tokio::time::timeout(
                Duration::from_secs(1),
                sqlx::query_scalar::<_, Option<String>>("SELECT txid_status($1)")
                    .bind(xid)
                    .fetch_one(&self.pool),
            )
            .await;
            match asked {
                Ok(Ok(Some(s))) if s == "committed" => {
                    tracing::warn!(xid, "the ambiguous commit did commit");
                    return CommitOutcome::Committed;
                }
                Ok(Ok(Some(s))) if s == "aborted" => {
                    tracing::warn!(xid, "the ambiguous commit rolled back");
                    return CommitOutcome::RolledBack(err);
                }
                // NULL: too old to know (cannot happen this soon), or still
                // "in progress": the server is finishing it; ask again.
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "read-back of a commit failed"),
                Err(_) => tracing::debug!("read-back of a commit timed out"),
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(xid, error = %err, "commit outcome unknown");
                return CommitOutcome::Unknown(err);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Is this error a lost or unusable connection (as opposed to the database
/// refusing a statement)? Such failures are transient: the request may be
/// retried once the database is reachable again.
pub fn is_connection_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // 08xxx connection exceptions; 57P01-57P03 shutdown / cannot connect now.
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
        _ => false,
    }
}

/// Is this error worth retrying the whole request for: a lost connection,
/// an exhausted pool, a serialization failure or deadlock, a lock timeout,
/// or SQLite's write lock not obtained in time?
pub fn is_transient(err: &sqlx::Error) -> bool {
    if is_connection_error(err) {
        return true;
    }
    match err {
        sqlx::Error::Database(db) => {
            matches!(
                db.code().as_deref(),
                // Postgres: serialization failure, deadlock, lock_not_available,
                // query_canceled (statement/lock timeout), idle-in-transaction timeout.
                Some("40001") | Some("40P01") | Some("55P03") | Some("57014") | Some("25P03")
                // SQLite: BUSY, BUSY_SNAPSHOT, LOCKED.
                | Some("5") | Some("517") | Some("6")
            ) || db.message().contains("database is locked")
        }
        _ => false,
    }
}

/// `n` numbered placeholders from `$first`, in parentheses:
/// `placeholders(4, 3)` is `($4, $5, $6)` (a row of a multi-row `VALUES`,
/// or an `IN` list; both backends number them the same way).
pub fn placeholders(first: usize, n: usize) -> String {
    let marks: Vec<String> = (first..first + n).map(|i| format!("${i}")).collect();
    format!("({})", marks.join(", "))
}

/// Milliseconds since the Unix epoch, the timestamp format of every table.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Is this a unique-constraint violation (on either backend)?
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                || db.code().as_deref() == Some("23505")
                || db.code().as_deref() == Some("2067")
                || db.code().as_deref() == Some("1555")
        }
        _ => false,
    }
}

/// Accepts `sqlite:path`, `sqlite://path`, a bare file path, or `postgres(ql)://`.
/// SQLite files are created if missing (with their parent directory).
fn normalize_url(url: &str) -> Result<(Backend, String), StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Backend::Postgres, url.to_string()));
    }
    let rest = if let Some(r) = url.strip_prefix("sqlite://") {
        r
    } else if let Some(r) = url.strip_prefix("sqlite:") {
        r
    } else if !url.contains("://") {
        url
    } else {
        return Err(StoreError::UnsupportedUrl(redact(url)));
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path != ":memory:" {
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
    }
    let query = match query {
        Some(q) if q.contains("mode=") => q.to_string(),
        Some(q) => format!("{q}&mode=rwc"),
        None => "mode=rwc".to_string(),
    };
    Ok((Backend::Sqlite, format!("sqlite://{path}?{query}")))
}

/// A URL with its password replaced, safe for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_normalize() {
        let dir = std::env::temp_dir();
        let p = dir.join("resilience-store-test").join("x.db");
        let (b, u) = normalize_url(p.to_str().unwrap()).unwrap();
        assert_eq!(b, Backend::Sqlite);
        assert!(
            u.starts_with("sqlite://") && u.ends_with("?mode=rwc"),
            "{u}"
        );
        let (b, _) = normalize_url("postgres://u:p@h/db").unwrap();
        assert_eq!(b, Backend::Postgres);
        assert!(normalize_url("mysql://x").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
