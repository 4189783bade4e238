//! The producer's side: append in the caller's transaction, sequence after
//! commit, read pages, long-poll, trim.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::wire::{FeedEvent, Page};
use super::FeedError;
use crate::store::{now_ms, Backend, Db, Write};

/// How many committed events one sequencing round numbers at most.
const SEQUENCE_BATCH: i64 = 5000;

/// A Postgres session that stalls inside a sequencing transaction (a frozen
/// replica) is ended by the server after this long, releasing the head lock.
const SEQUENCER_IDLE_TIMEOUT: &str = "5s";

/// The event logs (feeds) of one service database.
///
/// Cheap to clone; clones share the wake-ups. See the [module docs](super)
/// for why positions are assigned after commit.
#[derive(Debug, Clone)]
pub struct FeedLog {
    db: Db,
    /// Long-pollers of this process wait here.
    waiters: Arc<Notify>,
    /// Pokes the cross-replica notifier task (Postgres).
    poke: Arc<Notify>,
    channel: Arc<str>,
    /// Long-polls re-read at least this often (the net under lost wake-ups).
    recheck: Duration,
}

impl FeedLog {
    /// The feeds in `db` (tables come with [`Db::migrate_resilience`]).
    pub fn new(db: Db) -> Self {
        let channel = format!("resilience_feed_{}", db.schema()).into();
        Self {
            db,
            waiters: Arc::new(Notify::new()),
            poke: Arc::new(Notify::new()),
            channel,
            recheck: Duration::from_millis(500),
        }
    }

    /// Sets how often a long-poll re-reads without a wake-up (default 500 ms).
    pub fn with_recheck(mut self, every: Duration) -> Self {
        self.recheck = every.max(Duration::from_millis(1));
        self
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The Postgres `LISTEN`/`NOTIFY` channel of these feeds.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Appends an event inside the caller's transaction: it exists if and
    /// only if that transaction commits. Its position is assigned after
    /// commit (by the next read). Call [`FeedLog::notify`] after commit.
    ///
    /// `id` must be unique within the feed (a uuid); appending the same id
    /// twice fails with a unique violation, which rolls the caller back.
    pub async fn append(
        &self,
        tx: &mut Transaction<'static, Any>,
        feed: &str,
        event_type: &str,
        id: &str,
        payload: &impl Serialize,
    ) -> Result<(), FeedError> {
        let w = self.append_write(feed, event_type, id, payload)?;
        (w.bind)(sqlx::query(&w.sql)).execute(&mut **tx).await?;
        Ok(())
    }

    /// The insert of [`FeedLog::append`] as a [`Write`], not yet run: for a
    /// caller that runs it with its own writes, such as a handler handing
    /// them to [`Tx::write`](crate::idempotency::Tx::write). The event is
    /// appended if and only if the transaction that runs it commits.
    pub fn append_write(
        &self,
        feed: &str,
        event_type: &str,
        id: &str,
        payload: &impl Serialize,
    ) -> Result<Write, FeedError> {
        let payload =
            serde_json::to_string(payload).map_err(|e| FeedError::Invalid(e.to_string()))?;
        let (feed, id, event_type, now) = (
            feed.to_owned(),
            id.to_owned(),
            event_type.to_owned(),
            now_ms(),
        );
        Ok(Write::new(
            "INSERT INTO feed_events (feed, id, event_type, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            5,
            move |q| {
                q.bind(feed)
                    .bind(id)
                    .bind(event_type)
                    .bind(payload)
                    .bind(now)
            },
        ))
    }

    /// Wakes long-pollers (call after the appending transaction committed):
    /// those of this process at once, those of other replicas through one
    /// coalesced `pg_notify` sent by the task of [`FeedLog::spawn_wakeups`].
    ///
    /// The notify is deliberately not part of the producer's transaction: a
    /// `NOTIFY` serialises commits on a cluster-wide lock (issue 14). Many
    /// calls while one notify is in flight make one more notify, not many. A
    /// producer that dies between its commit and this call costs remote
    /// long-pollers at most their `wait`.
    pub fn notify(&self) {
        self.waiters.notify_waiters();
        self.poke.notify_one();
    }

    /// Starts the wake-up tasks (Postgres only; a no-op task on SQLite): one
    /// `LISTEN`s to other replicas' appends, one sends this replica's
    /// coalesced `pg_notify`. They end when `stop` is cancelled.
    pub fn spawn_wakeups(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            if log.db.backend() != Backend::Postgres {
                return;
            }
            #[cfg(feature = "postgres")]
            tokio::join!(log.clone().listen(stop.clone()), log.send_notifies(stop));
            #[cfg(not(feature = "postgres"))]
            let _ = (log, stop);
        })
    }

    #[cfg(feature = "postgres")]
    async fn send_notifies(self, stop: CancellationToken) {
        crate::store::notify_on_poke(&self.db, &self.channel, &self.poke, stop.cancelled()).await;
    }

    #[cfg(feature = "postgres")]
    async fn listen(self, stop: CancellationToken) {
        loop {
            let connected = async {
                let mut l = sqlx::postgres::PgListener::connect(self.db.url()).await?;
                l.listen(&self.channel).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                () = stop.cancelled() => return,
                res = connected => match res {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "feed LISTEN failed; long-polls time out meanwhile");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            // Anything committed while we were not listening: wake anyway.
            self.waiters.notify_waiters();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    n = listener.recv() => match n {
                        Ok(_) => self.waiters.notify_waiters(),
                        Err(e) => {
                            tracing::warn!(error = %e, "feed LISTEN connection lost; reconnecting");
                            break;
                        }
                    },
                }
            }
        }
    }

    /// Numbers the committed, not yet numbered events of `feed`, in one
    /// short transaction serialised by the feed's head row. Returns how many
    /// it numbered. [`FeedLog::read`] calls it; producers need not.
    pub async fn sequence(&self, feed: &str) -> Result<u64, FeedError> {
        let pending: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM feed_events WHERE feed = $1 AND position IS NULL LIMIT 1",
        )
        .bind(feed)
        .fetch_optional(self.db.pool())
        .await?;
        if pending.is_none() {
            return Ok(0);
        }
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        if self.db.backend() == Backend::Postgres {
            let set = format!(
                "SET LOCAL idle_in_transaction_session_timeout = '{SEQUENCER_IDLE_TIMEOUT}'"
            );
            sqlx::query(&set).execute(&mut *tx).await?;
        }
        ensure_head(&mut tx, feed, now).await?;
        // The lock: every sequencer of this feed queues here until the one
        // before it committed, so position ranges commit in order. (On
        // Postgres the next statement takes a fresh snapshot, which sees the
        // previous sequencer's numbering; on SQLite the writer lock already
        // serialises.)
        let head: i64 = sqlx::query_scalar(
            "UPDATE feed_heads SET updated_at = $2 WHERE feed = $1 RETURNING head",
        )
        .bind(feed)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let numbered = sqlx::query(
            "UPDATE feed_events SET position = $2 + r.rn, sequenced_at = $3 \
             FROM (SELECT seq, ROW_NUMBER() OVER (ORDER BY seq) AS rn FROM feed_events \
                   WHERE feed = $1 AND position IS NULL ORDER BY seq LIMIT $4) AS r \
             WHERE feed_events.seq = r.seq",
        )
        .bind(feed)
        .bind(head)
        .bind(now)
        .bind(SEQUENCE_BATCH)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("UPDATE feed_heads SET head = head + $2 WHERE feed = $1")
            .bind(feed)
            .bind(numbered as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if numbered > 0 {
            tracing::trace!(feed, numbered, from = head + 1, "feed events sequenced");
        }
        Ok(numbered)
    }

    /// Up to `limit` events of `feed` with a position above `after`, in
    /// order and without gaps, never skipping an event that commits later.
    ///
    /// Fails with [`FeedError::Gone`] when events above `after` were trimmed
    /// away, and [`FeedError::Ahead`] when `after` is above the feed's head
    /// (the reader follows some other log).
    pub async fn read(&self, feed: &str, after: i64, limit: u32) -> Result<Page, FeedError> {
        if after < 0 {
            return Err(FeedError::Invalid(format!("negative position {after}")));
        }
        self.sequence(feed).await?;
        let rows = sqlx::query(
            "SELECT position, id, event_type, payload, created_at FROM feed_events \
             WHERE feed = $1 AND position > $2 ORDER BY position LIMIT $3",
        )
        .bind(feed)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(self.db.pool())
        .await?;
        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        // Read the marks *after* the events: both only grow, so a trim that
        // raced the read above shows here, and a mark at or below `after`
        // now was at or below it then too (no silent gap).
        let (head, trimmed_upto) = self.marks(feed).await?;
        if after < trimmed_upto {
            return Err(FeedError::Gone {
                after,
                trimmed_upto,
            });
        }
        if after > head {
            return Err(FeedError::Ahead { after, head });
        }
        if let Some(first) = events.first() {
            // Positions are gapless; anything else is a broken invariant.
            if first.position != after + 1 {
                return Err(FeedError::Gone {
                    after,
                    trimmed_upto: first.position - 1,
                });
            }
        }
        let next = events.last().map_or(after, |e| e.position);
        Ok(Page { events, next, head })
    }

    /// As [`FeedLog::read`], but when there is nothing after `after` yet,
    /// waits up to `wait` for an append (this process's [`FeedLog::notify`],
    /// or another replica's through `LISTEN`) and reads again. The page is
    /// empty only when `wait` ran out.
    pub async fn read_wait(
        &self,
        feed: &str,
        after: i64,
        limit: u32,
        wait: Duration,
    ) -> Result<Page, FeedError> {
        let deadline = tokio::time::Instant::now() + wait;
        // A safety net for a lost wake-up (e.g. a producer that died before
        // notifying): re-read at least this often.
        let recheck = self.recheck;
        loop {
            let notified = self.waiters.notified();
            tokio::pin!(notified);
            // Registered before the read: an append committed during the read
            // still wakes us.
            notified.as_mut().enable();
            let page = self.read(feed, after, limit).await?;
            let now = tokio::time::Instant::now();
            if !page.events.is_empty() || now >= deadline {
                return Ok(page);
            }
            let until = deadline.min(now + recheck);
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// The feed's head (highest position handed out) and the highest
    /// position trimmed away; `(0, 0)` for a feed never read.
    pub async fn marks(&self, feed: &str) -> Result<(i64, i64), FeedError> {
        let row = sqlx::query("SELECT head, trimmed_upto FROM feed_heads WHERE feed = $1")
            .bind(feed)
            .fetch_optional(self.db.pool())
            .await?;
        match row {
            Some(r) => Ok((r.try_get("head")?, r.try_get("trimmed_upto")?)),
            None => Ok((0, 0)),
        }
    }

    /// Retention: deletes the numbered events of `feed` appended before
    /// `older_than` ago, always a prefix of positions, and raises the feed's
    /// trimmed mark, so a reader behind it gets [`FeedError::Gone`] instead
    /// of a gap. Returns how many events were deleted.
    pub async fn trim(&self, feed: &str, older_than: Duration) -> Result<u64, FeedError> {
        self.sequence(feed).await?;
        let now = now_ms();
        let cutoff = now - older_than.as_millis() as i64;
        let mut tx = self.db.begin().await?;
        ensure_head(&mut tx, feed, now).await?;
        // Same lock as the sequencer: one trim or sequencing at a time.
        let trimmed: i64 = sqlx::query_scalar(
            "UPDATE feed_heads SET updated_at = $2 WHERE feed = $1 RETURNING trimmed_upto",
        )
        .bind(feed)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        // Created-at is not monotone in position (positions follow commit
        // order), so trim up to the highest old position: a prefix.
        let upto: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(position) FROM feed_events WHERE feed = $1 \
             AND position IS NOT NULL AND created_at < $2",
        )
        .bind(feed)
        .bind(cutoff)
        .fetch_one(&mut *tx)
        .await?;
        let Some(upto) = upto.filter(|u| *u > trimmed) else {
            tx.commit().await?;
            return Ok(0);
        };
        let deleted = sqlx::query("DELETE FROM feed_events WHERE feed = $1 AND position <= $2")
            .bind(feed)
            .bind(upto)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE feed_heads SET trimmed_upto = $2 WHERE feed = $1")
            .bind(feed)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(feed, deleted, trimmed_upto = upto, "feed trimmed");
        Ok(deleted)
    }
}

async fn ensure_head(
    tx: &mut Transaction<'static, Any>,
    feed: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO feed_heads (feed, head, trimmed_upto, updated_at) VALUES ($1, 0, 0, $2) \
         ON CONFLICT (feed) DO NOTHING",
    )
    .bind(feed)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn event_from_row(r: &AnyRow) -> Result<FeedEvent, FeedError> {
    let payload: String = r.try_get("payload")?;
    Ok(FeedEvent {
        position: r.try_get("position")?,
        id: r.try_get("id")?,
        event_type: r.try_get("event_type")?,
        data: serde_json::from_str(&payload).map_err(|e| FeedError::Invalid(e.to_string()))?,
        created_at: r.try_get("created_at")?,
    })
}
