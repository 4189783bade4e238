//! The consumer's side: long-poll a remote feed through the tower client
//! stack, apply events in the consumer's database, keep the offset there
//! under a lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, StatusCode};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{BoxError, ServiceExt};
use tracing::Instrument;

use super::wire::{FeedEvent, FeedQuery, Page};
use super::FeedError;
use crate::circuit_breaker::CircuitOpen;
use crate::retry::{parse_retry_after, Backoff};
use crate::store::{now_ms, Backend, Db};

/// The outgoing stack type (same as the outbox relay's).
type SendService =
    tower::util::BoxCloneSyncService<Request<Bytes>, http::Response<Bytes>, BoxError>;

/// Where the consumer commits its offset, which decides the guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The offset moves in the transaction that applies the events:
    /// effectively-once (a crash leaves both or neither).
    SameTransaction,
    /// Events are applied and committed per page; the offset is committed on
    /// its own at most this often (and on a clean stop): at-least-once (a
    /// crash in between re-applies what was processed since).
    Periodic(Duration),
}

/// How a [`FeedConsumer`] behaves.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The feed's name in this database's `feed_offsets` (one row per feed).
    pub feed: String,
    /// The feed's URL, e.g. `http://127.0.0.1:8080/orders/feed`.
    pub url: String,
    /// This consumer's identity in the lease (unique per process).
    pub holder: String,
    /// Where the offset is committed.
    pub commit: Commit,
    /// How long the lease is exclusive without renewal. A frozen holder stops
    /// the feed for about this long (on Postgres its open transaction is
    /// ended by the server after the same time). Keep it above `wait` plus
    /// the stack's timeout.
    pub lease: Duration,
    /// Events per page.
    pub batch: u32,
    /// Long-poll wait per request; must stay below the stack's timeout.
    pub wait: Duration,
    /// Delay after a failed request or transaction.
    pub backoff: Backoff,
}

impl ConsumerConfig {
    /// Defaults: 15 s lease, pages of 100, 5 s long-polls, backoff from
    /// 100 ms to 5 s.
    pub fn new(feed: impl Into<String>, url: impl Into<String>, commit: Commit) -> Self {
        Self {
            feed: feed.into(),
            url: url.into(),
            holder: format!("consumer-{}", uuid::Uuid::new_v4().simple()),
            commit,
            lease: Duration::from_secs(15),
            batch: 100,
            wait: Duration::from_secs(5),
            backoff: Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(5)),
        }
    }
}

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Permanent: the event can never be applied (a 4xx of sorts). It is
    /// recorded in `feed_dead` and the offset moves on.
    #[error("refused: {0}")]
    Refused(String),
    /// Transient: the page is rolled back and retried after a backoff.
    #[error("transient: {0}")]
    Retry(String),
    /// The database failed (transient).
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Work that runs once the transaction that applied an event has committed.
type Hook = Box<dyn FnOnce() + Send>;
type Hooks = Arc<Mutex<Vec<Hook>>>;

tokio::task_local! {
    static AFTER_COMMIT: Hooks;
    /// The feed whose events the handler is applying (for
    /// [`after_commit_of`]'s spans).
    static APPLYING: Arc<str>;
}

/// Called from a [`FeedHandler::apply`]: runs `f` (inside the caller's
/// current span) once the transaction that applies the event has committed,
/// and never if it rolls back or the event is refused. This is where "it is
/// done" is logged. Returns `false`, and drops `f`, outside a consumer's
/// `apply`.
pub fn after_commit(f: impl FnOnce() + Send + 'static) -> bool {
    let span = tracing::Span::current();
    AFTER_COMMIT
        .try_with(|hooks| {
            if let Ok(mut hooks) = hooks.lock() {
                hooks.push(Box::new(move || span.in_scope(f)));
            }
        })
        .is_ok()
}

/// [`after_commit`] for one event of a page, from
/// [`FeedHandler::apply_page`]: `f` runs inside that event's own span (its
/// feed, position and trace id), as it would from [`FeedHandler::apply`],
/// once the page's transaction has committed. Returns `false`, and drops
/// `f`, outside a consumer's `apply` or `apply_page`.
pub fn after_commit_of(event: &FeedEvent, f: impl FnOnce() + Send + 'static) -> bool {
    let Ok(feed) = APPLYING.try_with(Arc::clone) else {
        return false;
    };
    let span = event_span(&feed, event);
    AFTER_COMMIT
        .try_with(|hooks| {
            if let Ok(mut hooks) = hooks.lock() {
                hooks.push(Box::new(move || span.in_scope(f)));
            }
        })
        .is_ok()
}

/// Runs `handler.apply` for one event, collecting what it registers with
/// [`after_commit`].
async fn apply_one(
    handler: &dyn FeedHandler,
    tx: &mut Transaction<'static, Any>,
    feed: &str,
    event: &FeedEvent,
) -> (Result<(), ApplyError>, Vec<Hook>) {
    let hooks = Hooks::default();
    let result = APPLYING
        .scope(
            Arc::from(feed),
            AFTER_COMMIT.scope(
                hooks.clone(),
                handler.apply(tx, event).instrument(event_span(feed, event)),
            ),
        )
        .await;
    let hooks = match hooks.lock() {
        Ok(mut hooks) => std::mem::take(&mut *hooks),
        Err(_) => Vec::new(),
    };
    (result, hooks)
}

/// Runs `handler.apply_page` for a whole page, collecting what it
/// registers with [`after_commit`].
async fn apply_all(
    handler: &dyn FeedHandler,
    tx: &mut Transaction<'static, Any>,
    feed: &str,
    events: &[FeedEvent],
) -> (Result<(), ApplyError>, Vec<Hook>) {
    let hooks = Hooks::default();
    let span = tracing::info_span!(
        "feed_page",
        feed = %feed,
        first = events.first().map(|e| e.position),
        last = events.last().map(|e| e.position),
    );
    let result = APPLYING
        .scope(
            Arc::from(feed),
            AFTER_COMMIT.scope(
                hooks.clone(),
                handler.apply_page(tx, events).instrument(span),
            ),
        )
        .await;
    let hooks = match hooks.lock() {
        Ok(mut hooks) => std::mem::take(&mut *hooks),
        Err(_) => Vec::new(),
    };
    (result, hooks)
}

/// What a committed page applied, and the hooks its handler left.
#[derive(Default)]
struct PageRun {
    applied: u64,
    dead: u64,
    hooks: Vec<Hook>,
}

/// The consumer's reaction to an event, inside the consumer's transaction.
#[async_trait]
pub trait FeedHandler: Send + Sync + 'static {
    /// Applies `event` in `tx`, which holds the rest of its page too. A
    /// [`ApplyError::Refused`] undoes only this event's writes: the page's
    /// transaction rolls back and the page runs again with each event in a
    /// savepoint. So `apply` may run more than once for an event (as after
    /// any rollback); only a committed run counts, and only its
    /// [`after_commit`] hooks run.
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Any>,
        event: &FeedEvent,
    ) -> Result<(), ApplyError>;

    /// Whether [`FeedHandler::apply_page`] is worth calling: a handler that
    /// joins a page's writes into fewer statements says `true`. Otherwise a
    /// page is applied event by event through [`FeedHandler::apply`].
    fn applies_pages(&self) -> bool {
        false
    }

    /// Applies a whole page in `tx`, in position order, leaving exactly what
    /// [`FeedHandler::apply`] one event after the other would leave. A
    /// refusal of any event returns [`ApplyError::Refused`]: the page's
    /// transaction rolls back and the page runs again event by event through
    /// `apply`, each event in a savepoint, so the refused event is recorded
    /// as dead just as when `apply` refuses it. [`after_commit_of`] registers
    /// work to run after the commit in an event's own span, as
    /// [`after_commit`] does from `apply`. The default calls `apply` for
    /// each event.
    async fn apply_page(
        &self,
        tx: &mut Transaction<'static, Any>,
        events: &[FeedEvent],
    ) -> Result<(), ApplyError> {
        for event in events {
            self.apply(tx, event).await?;
        }
        Ok(())
    }
}

/// What a consumer knows about its feed right now.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ConsumerStatus {
    /// The feed's name.
    pub feed: String,
    /// Whether this consumer holds the feed's lease.
    pub holder: bool,
    /// The position applied up to (in this consumer's state).
    pub offset: i64,
    /// The position committed in `feed_offsets`.
    pub committed: i64,
    /// The producer's head at the last page.
    pub head: Option<i64>,
    /// Positions behind the producer's head.
    pub lag_positions: Option<i64>,
    /// Age of the oldest event not yet applied at the last page (0 when
    /// caught up).
    pub lag_seconds: Option<f64>,
    /// Events applied by this process.
    pub applied: u64,
    /// Events refused and recorded as dead by this process.
    pub dead: u64,
    /// The producer answered 410: the offset fell behind its retained log.
    pub gone: bool,
    /// The last failure, if the last round failed.
    pub last_error: Option<String>,
}

/// A cheap handle on a running consumer's status.
#[derive(Debug, Clone)]
pub struct ConsumerHandle {
    status: Arc<Mutex<ConsumerStatus>>,
}

impl ConsumerHandle {
    /// A snapshot of the status.
    pub fn status(&self) -> ConsumerStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// A feed's offset row, for operations.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OffsetRow {
    /// The feed's name.
    pub feed: String,
    /// The committed offset.
    pub position: i64,
    /// The lease holder, if any.
    pub holder: Option<String>,
    /// When the lease runs out (ms since epoch).
    pub lease_until: Option<i64>,
    /// Times another consumer took the lease over from a holder.
    pub takeovers: i64,
    /// The producer's head when the offset was last committed.
    pub head: Option<i64>,
    /// Last change (ms since epoch).
    pub updated_at: i64,
}

/// An event the handler refused.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadEvent {
    /// The feed's name.
    pub feed: String,
    /// The event's id.
    pub id: String,
    /// Its position in the feed.
    pub position: i64,
    /// Its type.
    pub event_type: String,
    /// Its data.
    pub data: serde_json::Value,
    /// When the producer appended it (ms since epoch).
    pub created_at: i64,
    /// Why it was refused (last time).
    pub reason: String,
    /// `dead`, `requeued` (waiting to be applied again) or `applied`.
    pub status: String,
    /// Times it was refused.
    pub attempts: i64,
}

/// Reads one remote feed into this database. Run one per feed per process;
/// the lease lets one replica at a time consume, and another take over when
/// the holder dies or stalls.
pub struct FeedConsumer {
    db: Db,
    service: SendService,
    handler: Arc<dyn FeedHandler>,
    config: ConsumerConfig,
    status: Arc<Mutex<ConsumerStatus>>,
}

impl std::fmt::Debug for FeedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedConsumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The consumer's view of a lease it holds.
#[derive(Debug)]
struct Held {
    /// Applied up to here.
    offset: i64,
    /// Committed in `feed_offsets` up to here.
    committed: i64,
    last_commit: Instant,
    renewed: Instant,
    head: Option<i64>,
}

/// What one round failed on.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("lost the lease")]
    Lost,
    #[error(transparent)]
    Feed(#[from] FeedError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Apply(String),
}

/// What one fetch came to.
#[derive(Debug)]
enum Fetched {
    Page(Page),
    Deferred(Duration),
    Gone(String),
    Failed { reason: String, delay: Duration },
}

impl FeedConsumer {
    /// A consumer of `config.url` into `db`, sending through `service` (the
    /// durable stack: breaker, timeout, faults), applying with `handler`.
    pub fn new(
        db: Db,
        service: SendService,
        handler: Arc<dyn FeedHandler>,
        config: ConsumerConfig,
    ) -> Self {
        let status = ConsumerStatus {
            feed: config.feed.clone(),
            ..ConsumerStatus::default()
        };
        Self {
            db,
            service,
            handler,
            config,
            status: Arc::new(Mutex::new(status)),
        }
    }

    /// A handle on the status (lag, offset, holder).
    pub fn handle(&self) -> ConsumerHandle {
        ConsumerHandle {
            status: self.status.clone(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ConsumerStatus)) {
        match self.status.lock() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Runs until `stop` is cancelled: takes the lease (or waits for it),
    /// long-polls, applies, commits the offset, renews the lease; backs off
    /// on failure and defers while the breaker is open. On stop it commits
    /// the offset (periodic mode) and releases the lease.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(feed = %self.config.feed, holder = %self.config.holder, "feed consumer started");
        let mut failures: u32 = 0;
        while !stop.is_cancelled() {
            let held = match self.acquire().await {
                Ok(Some(h)) => h,
                Ok(None) => {
                    self.update(|s| s.holder = false);
                    let d = (self.config.lease / 3).min(Duration::from_secs(1));
                    if !pause(&stop, d).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(feed = %self.config.feed, error = %e, "cannot take the feed lease");
                    let d = self.config.backoff.delay_for(failures);
                    failures = failures.saturating_add(1);
                    if !pause(&stop, d).await {
                        break;
                    }
                    continue;
                }
            };
            tracing::info!(feed = %self.config.feed, offset = held.offset, "feed lease taken");
            self.update(|s| {
                s.holder = true;
                s.offset = held.offset;
                s.committed = held.committed;
            });
            self.hold(held, &stop, &mut failures).await;
            self.update(|s| s.holder = false);
        }
        tracing::info!(feed = %self.config.feed, "feed consumer stopped");
    }

    /// Works while the lease is held; returns when it is lost or on stop.
    async fn hold(&self, mut held: Held, stop: &CancellationToken, failures: &mut u32) {
        let mut last_requeue_check: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                self.leave(&mut held).await;
                return;
            }
            let round = async {
                if last_requeue_check.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    last_requeue_check = Some(Instant::now());
                    self.apply_requeued().await?;
                }
                self.keep(&mut held).await
            };
            if let Err(e) = round.await {
                if self.failed(e, failures, stop).await {
                    return;
                }
                continue;
            }
            let fetched = tokio::select! {
                () = stop.cancelled() => continue,
                f = self.fetch(held.offset) => f,
            };
            let delay = match fetched {
                Fetched::Page(page) => {
                    self.observe(&page, &mut held);
                    if page.events.is_empty() {
                        *failures = 0;
                        continue;
                    }
                    match self.apply_page(&mut held, &page).await {
                        Ok(()) => {
                            *failures = 0;
                            self.update(|s| s.last_error = None);
                            continue;
                        }
                        Err(e) => {
                            if self.failed(e, failures, stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
                Fetched::Deferred(d) => {
                    tracing::debug!(feed = %self.config.feed, delay = ?d, "breaker open; feed poll deferred");
                    d
                }
                Fetched::Gone(reason) => {
                    tracing::error!(feed = %self.config.feed, offset = held.offset, %reason,
                        "offset fell behind the producer's retained log; an operator must reset it");
                    self.update(|s| {
                        s.gone = true;
                        s.last_error = Some(reason);
                    });
                    self.config.backoff.cap
                }
                Fetched::Failed { reason, delay } => {
                    tracing::debug!(feed = %self.config.feed, %reason, ?delay, "feed poll failed");
                    self.update(|s| s.last_error = Some(reason));
                    *failures = failures.saturating_add(1);
                    delay
                }
            };
            if !pause(stop, delay).await {
                self.leave(&mut held).await;
                return;
            }
        }
    }

    /// Handles a failed round; returns true when the lease is gone.
    async fn failed(&self, e: RoundError, failures: &mut u32, stop: &CancellationToken) -> bool {
        if matches!(e, RoundError::Lost) {
            tracing::warn!(feed = %self.config.feed, "feed lease lost; another consumer took over");
            return true;
        }
        tracing::warn!(feed = %self.config.feed, error = %e, "feed round failed; will retry");
        self.update(|s| s.last_error = Some(e.to_string()));
        let d = self.config.backoff.delay_for(*failures);
        *failures = failures.saturating_add(1);
        // On stop the lease simply runs out if it cannot be released here.
        !pause(stop, d).await
    }

    fn observe(&self, page: &Page, held: &mut Held) {
        held.head = Some(page.head);
        let lag_seconds = page
            .events
            .first()
            .map_or(0.0, |e| ((now_ms() - e.created_at).max(0) as f64) / 1000.0);
        self.update(|s| {
            s.head = Some(page.head);
            s.lag_positions = Some((page.head - held.offset).max(0));
            s.lag_seconds = Some(lag_seconds);
            s.gone = false;
        });
    }

    /// Takes the lease: free, ours, or expired. Returns the committed offset.
    async fn acquire(&self) -> Result<Option<Held>, sqlx::Error> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO feed_offsets (feed, position, updated_at) VALUES ($1, 0, $2) \
             ON CONFLICT (feed) DO NOTHING",
        )
        .bind(&self.config.feed)
        .bind(now)
        .execute(self.db.writer())
        .await?;
        let position: Option<i64> = sqlx::query_scalar(
            "UPDATE feed_offsets SET holder = $2, lease_until = $3, updated_at = $4, \
             takeovers = takeovers + CASE WHEN holder IS NOT NULL AND holder <> $2 THEN 1 ELSE 0 END \
             WHERE feed = $1 AND (holder IS NULL OR holder = $2 OR lease_until < $4) \
             RETURNING position",
        )
        .bind(&self.config.feed)
        .bind(&self.config.holder)
        .bind(now + self.lease_ms())
        .bind(now)
        .fetch_optional(self.db.writer())
        .await?;
        Ok(position.map(|p| Held {
            offset: p,
            committed: p,
            last_commit: Instant::now(),
            renewed: Instant::now(),
            head: None,
        }))
    }

    /// Renews the lease if this consumer still holds it at `committed`
    /// (a compare-and-set that also locks the offset row); returns the rows
    /// changed: 1 while the lease is ours, 0 once another consumer took it.
    async fn renew<'e, E>(&self, executor: E, committed: i64) -> Result<u64, sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        let now = now_ms();
        Ok(sqlx::query(
            "UPDATE feed_offsets SET lease_until = $4, updated_at = $5 \
             WHERE feed = $1 AND holder = $2 AND position = $3",
        )
        .bind(&self.config.feed)
        .bind(&self.config.holder)
        .bind(committed)
        .bind(now + self.lease_ms())
        .bind(now)
        .execute(executor)
        .await?
        .rows_affected())
    }

    fn lease_ms(&self) -> i64 {
        self.config.lease.as_millis() as i64
    }

    /// Renews the lease when a third of it is used, and in periodic mode
    /// commits the offset when the interval is up.
    async fn keep(&self, held: &mut Held) -> Result<(), RoundError> {
        if let Commit::Periodic(every) = self.config.commit {
            if held.offset != held.committed && held.last_commit.elapsed() >= every {
                return self.commit_offset(held).await;
            }
        }
        if held.renewed.elapsed() < self.config.lease / 3 {
            return Ok(());
        }
        if self.renew(self.db.writer(), held.committed).await? != 1 {
            return Err(RoundError::Lost);
        }
        held.renewed = Instant::now();
        Ok(())
    }

    /// Compare-and-set of the offset (and lease) on its own.
    async fn commit_offset(&self, held: &mut Held) -> Result<(), RoundError> {
        let now = now_ms();
        let n = sqlx::query(
            "UPDATE feed_offsets SET position = $4, head = $5, lease_until = $6, updated_at = $7 \
             WHERE feed = $1 AND holder = $2 AND position = $3",
        )
        .bind(&self.config.feed)
        .bind(&self.config.holder)
        .bind(held.committed)
        .bind(held.offset)
        .bind(held.head)
        .bind(now + self.lease_ms())
        .bind(now)
        .execute(self.db.writer())
        .await?
        .rows_affected();
        if n != 1 {
            return Err(RoundError::Lost);
        }
        tracing::debug!(feed = %self.config.feed, from = held.committed, to = held.offset, "feed offset committed");
        held.committed = held.offset;
        held.last_commit = Instant::now();
        held.renewed = Instant::now();
        let committed = held.committed;
        self.update(|s| s.committed = committed);
        Ok(())
    }

    /// On stop: commit what was applied (periodic mode), release the lease.
    async fn leave(&self, held: &mut Held) {
        if held.offset != held.committed {
            if let Err(e) = self.commit_offset(held).await {
                tracing::warn!(feed = %self.config.feed, error = %e, "could not commit the offset on stop");
                return;
            }
        }
        let res = sqlx::query(
            "UPDATE feed_offsets SET holder = NULL, lease_until = NULL, updated_at = $3 \
             WHERE feed = $1 AND holder = $2",
        )
        .bind(&self.config.feed)
        .bind(&self.config.holder)
        .bind(now_ms())
        .execute(self.db.writer())
        .await;
        if let Err(e) = res {
            tracing::warn!(feed = %self.config.feed, error = %e, "could not release the lease; it runs out on its own");
        }
    }

    async fn fetch(&self, after: i64) -> Fetched {
        let query = FeedQuery::new(after, self.config.batch, self.config.wait);
        let sep = if self.config.url.contains('?') {
            '&'
        } else {
            '?'
        };
        let uri = format!("{}{sep}{}", self.config.url, query.to_query_string());
        let req = match Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Bytes::new())
        {
            Ok(r) => r,
            Err(e) => {
                return Fetched::Failed {
                    reason: format!("invalid feed url: {e}"),
                    delay: self.config.backoff.cap,
                }
            }
        };
        let delay = self.config.backoff.delay_for(0);
        match self.service.clone().oneshot(req).await {
            Ok(res) if res.status() == StatusCode::OK => {
                match serde_json::from_slice::<Page>(res.body()) {
                    Ok(page) => Fetched::Page(page),
                    Err(e) => Fetched::Failed {
                        reason: format!("invalid feed page: {e}"),
                        delay,
                    },
                }
            }
            Ok(res) if res.status() == StatusCode::GONE => {
                Fetched::Gone(String::from_utf8_lossy(res.body()).into_owned())
            }
            Ok(res) => {
                let delay = parse_retry_after(res.headers(), SystemTime::now())
                    .map(|d| d.min(self.config.backoff.cap).max(delay))
                    .unwrap_or(delay);
                let body = &res.body()[..res.body().len().min(300)];
                Fetched::Failed {
                    reason: format!(
                        "feed answered {}: {}",
                        res.status(),
                        String::from_utf8_lossy(body)
                    ),
                    delay,
                }
            }
            Err(e) => match CircuitOpen::find(e.as_ref()) {
                Some(open) => Fetched::Deferred(open.retry_after().max(Duration::from_millis(1))),
                None => Fetched::Failed {
                    reason: error_chain(e.as_ref()),
                    delay,
                },
            },
        }
    }

    /// Applies a page in one transaction; in same-transaction mode the
    /// offset moves in it too, guarded by a compare-and-set on holder and
    /// expected offset taken first.
    ///
    /// The page is applied without savepoints first: two statements per
    /// event saved, and refusals are rare. If a handler refuses an event,
    /// that transaction rolls back and the page runs again with each event
    /// in a savepoint of its own, so the refusal undoes only its event.
    async fn apply_page(&self, held: &mut Held, page: &Page) -> Result<(), RoundError> {
        let mut expected = held.offset;
        for e in &page.events {
            if e.position != expected + 1 {
                return Err(FeedError::Invalid(format!(
                    "page not contiguous: {} after {expected}",
                    e.position
                ))
                .into());
            }
            expected = e.position;
        }
        let same_tx = self.config.commit == Commit::SameTransaction;
        let run = match self.run_page(held, page, false).await? {
            Some(run) => run,
            None => match self.run_page(held, page, true).await? {
                Some(run) => run,
                None => return Err(RoundError::Apply("a refusal escaped its savepoint".into())),
            },
        };
        for hook in run.hooks {
            hook();
        }
        held.offset = page.next;
        if same_tx {
            held.committed = page.next;
            held.renewed = Instant::now();
        }
        let (offset, committed) = (held.offset, held.committed);
        self.update(|s| {
            s.offset = offset;
            s.committed = committed;
            s.applied += run.applied;
            s.dead += run.dead;
            s.lag_positions = s.head.map(|h| (h - offset).max(0));
        });
        if let Commit::Periodic(every) = self.config.commit {
            if held.last_commit.elapsed() >= every {
                self.commit_offset(held).await?;
            }
        }
        Ok(())
    }

    /// One transaction over `page`, committed. With `isolate`, each event
    /// runs in a savepoint and a refused one is recorded as dead; without,
    /// a refusal rolls the whole transaction back and answers `None`.
    async fn run_page(
        &self,
        held: &Held,
        page: &Page,
        isolate: bool,
    ) -> Result<Option<PageRun>, RoundError> {
        let mut tx = self.db.begin().await?;
        if self.db.backend() == Backend::Postgres {
            // A holder frozen mid-transaction must not hold the offset row
            // (and the handler's rows) for longer than its lease.
            let set = format!(
                "SET LOCAL idle_in_transaction_session_timeout = {}",
                self.lease_ms().max(1)
            );
            exec(&mut tx, &set).await?;
        }
        let same_tx = self.config.commit == Commit::SameTransaction;
        if same_tx {
            // Lock the offset row and check we still own it at this offset.
            if self.renew(&mut *tx, held.committed).await? != 1 {
                tx.rollback().await?;
                return Err(RoundError::Lost);
            }
        }
        let mut run = PageRun::default();
        if !isolate && self.handler.applies_pages() && !page.events.is_empty() {
            // The whole page in one call (the handler joins its writes).
            let (result, hooks) =
                apply_all(&*self.handler, &mut tx, &self.config.feed, &page.events).await;
            match result {
                Ok(()) => {
                    run.applied = page.events.len() as u64;
                    run.hooks = hooks;
                }
                Err(ApplyError::Refused(_)) => {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Err(e) => {
                    tx.rollback().await?;
                    let (first, last) = (
                        page.events.first().map_or(0, |e| e.position),
                        page.events.last().map_or(0, |e| e.position),
                    );
                    return Err(RoundError::Apply(format!("page {first}..={last}: {e}")));
                }
            }
        }
        // Event by event: isolated in savepoints, or for a handler that
        // applies no pages (a page applied whole has no events left here).
        let one_by_one: &[FeedEvent] = if isolate || !self.handler.applies_pages() {
            &page.events
        } else {
            &[]
        };
        for event in one_by_one {
            if isolate {
                exec(&mut tx, "SAVEPOINT feed_event").await?;
            }
            let (result, hooks) =
                apply_one(&*self.handler, &mut tx, &self.config.feed, event).await;
            match result {
                Ok(()) => {
                    if isolate {
                        exec(&mut tx, "RELEASE SAVEPOINT feed_event").await?;
                    }
                    run.applied += 1;
                    run.hooks.extend(hooks);
                }
                Err(ApplyError::Refused(_)) if !isolate => {
                    tx.rollback().await?;
                    return Ok(None);
                }
                Err(ApplyError::Refused(reason)) => {
                    exec(&mut tx, "ROLLBACK TO SAVEPOINT feed_event").await?;
                    exec(&mut tx, "RELEASE SAVEPOINT feed_event").await?;
                    tracing::warn!(feed = %self.config.feed, id = %event.id, position = event.position,
                        %reason, "feed event refused; recorded as dead");
                    record_dead(&mut tx, &self.config.feed, event, &reason).await?;
                    run.dead += 1;
                }
                Err(e) => {
                    tx.rollback().await?;
                    return Err(RoundError::Apply(format!(
                        "event {} at {}: {e}",
                        event.id, event.position
                    )));
                }
            }
        }
        if same_tx {
            sqlx::query(
                "UPDATE feed_offsets SET position = $3, head = $4 \
                 WHERE feed = $1 AND holder = $2",
            )
            .bind(&self.config.feed)
            .bind(&self.config.holder)
            .bind(page.next)
            .bind(page.head)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(run))
    }

    /// Applies dead events an operator requeued, each in its own transaction
    /// with its `feed_dead` row as the record that it was applied.
    async fn apply_requeued(&self) -> Result<(), RoundError> {
        let dead = dead_events_with(&self.db, &self.config.feed, "requeued", 20).await?;
        for d in dead {
            let event = FeedEvent {
                position: d.position,
                id: d.id.clone(),
                event_type: d.event_type.clone(),
                data: d.data.clone(),
                created_at: d.created_at,
            };
            let mut tx = self.db.begin().await?;
            let claimed = sqlx::query(
                "UPDATE feed_dead SET status = 'applied', updated_at = $3 \
                 WHERE feed = $1 AND id = $2 AND status = 'requeued'",
            )
            .bind(&self.config.feed)
            .bind(&d.id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if claimed != 1 {
                tx.rollback().await?;
                continue;
            }
            exec(&mut tx, "SAVEPOINT feed_event").await?;
            let (result, hooks) =
                apply_one(&*self.handler, &mut tx, &self.config.feed, &event).await;
            let done = match result {
                Ok(()) => Some(hooks),
                Err(ApplyError::Refused(reason)) => {
                    exec(&mut tx, "ROLLBACK TO SAVEPOINT feed_event").await?;
                    record_dead(&mut tx, &self.config.feed, &event, &reason).await?;
                    None
                }
                Err(e) => {
                    tx.rollback().await?;
                    return Err(RoundError::Apply(format!("requeued event {}: {e}", d.id)));
                }
            };
            exec(&mut tx, "RELEASE SAVEPOINT feed_event").await?;
            tx.commit().await?;
            if let Some(hooks) = done {
                tracing::info!(feed = %self.config.feed, id = %d.id, "requeued feed event applied");
                self.update(|s| s.applied += 1);
                for hook in hooks {
                    hook();
                }
            }
        }
        Ok(())
    }

    /// The offset rows of this database (every feed it consumes).
    pub async fn offsets(db: &Db) -> Result<Vec<OffsetRow>, FeedError> {
        let rows = sqlx::query(
            "SELECT feed, position, holder, lease_until, takeovers, head, updated_at \
             FROM feed_offsets ORDER BY feed",
        )
        .fetch_all(db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OffsetRow {
                    feed: r.try_get("feed")?,
                    position: r.try_get("position")?,
                    holder: r.try_get("holder")?,
                    lease_until: r.try_get("lease_until")?,
                    takeovers: r.try_get("takeovers")?,
                    head: r.try_get("head")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    /// Dead events of `feed` (status `dead`), oldest position first.
    pub async fn dead_events(db: &Db, feed: &str, limit: i64) -> Result<Vec<DeadEvent>, FeedError> {
        dead_events_with(db, feed, "dead", limit).await
    }

    /// Puts a dead event back: the running consumer applies it again (once).
    /// Returns false if there is no such dead event.
    pub async fn requeue(db: &Db, feed: &str, id: &str) -> Result<bool, FeedError> {
        let n = sqlx::query(
            "UPDATE feed_dead SET status = 'requeued', updated_at = $3 \
             WHERE feed = $1 AND id = $2 AND status = 'dead'",
        )
        .bind(feed)
        .bind(id)
        .bind(now_ms())
        .execute(db.writer())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Requeues every dead event of `feed`; returns how many.
    pub async fn requeue_all(db: &Db, feed: &str) -> Result<u64, FeedError> {
        let n = sqlx::query(
            "UPDATE feed_dead SET status = 'requeued', updated_at = $2 \
             WHERE feed = $1 AND status = 'dead'",
        )
        .bind(feed)
        .bind(now_ms())
        .execute(db.writer())
        .await?
        .rows_affected();
        Ok(n)
    }

    /// Sets a feed's committed offset (an operator's repair after a 410, or
    /// to replay). Takes effect when the current holder next commits or
    /// renews: it loses its lease and the next holder starts from here.
    pub async fn reset_offset(db: &Db, feed: &str, position: i64) -> Result<(), FeedError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO feed_offsets (feed, position, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (feed) DO UPDATE SET position = $2, holder = NULL, lease_until = NULL, \
             updated_at = $3",
        )
        .bind(feed)
        .bind(position)
        .bind(now)
        .execute(db.writer())
        .await?;
        Ok(())
    }
}

async fn record_dead(
    tx: &mut Transaction<'static, Any>,
    feed: &str,
    event: &FeedEvent,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO feed_dead (feed, id, position, event_type, payload, created_at, reason, \
         status, attempts, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'dead', 1, $8) \
         ON CONFLICT (feed, id) DO UPDATE SET status = 'dead', reason = $7, \
         attempts = feed_dead.attempts + 1, updated_at = $8",
    )
    .bind(feed)
    .bind(&event.id)
    .bind(event.position)
    .bind(&event.event_type)
    .bind(event.data.to_string())
    .bind(event.created_at)
    .bind(reason)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn dead_events_with(
    db: &Db,
    feed: &str,
    status: &str,
    limit: i64,
) -> Result<Vec<DeadEvent>, FeedError> {
    let rows = sqlx::query(
        "SELECT feed, id, position, event_type, payload, created_at, reason, status, attempts \
         FROM feed_dead WHERE feed = $1 AND status = $2 \
         ORDER BY position LIMIT $3",
    )
    .bind(feed)
    .bind(status)
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(dead_from_row).collect()
}

fn dead_from_row(r: &AnyRow) -> Result<DeadEvent, FeedError> {
    let payload: String = r.try_get("payload")?;
    Ok(DeadEvent {
        feed: r.try_get("feed")?,
        id: r.try_get("id")?,
        position: r.try_get("position")?,
        event_type: r.try_get("event_type")?,
        data: serde_json::from_str(&payload).map_err(|e| FeedError::Invalid(e.to_string()))?,
        created_at: r.try_get("created_at")?,
        reason: r.try_get("reason")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
    })
}

/// Runs a statement without parameters (savepoints, `SET LOCAL`) through the
/// simple protocol.
async fn exec(tx: &mut Transaction<'static, Any>, sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    (&mut **tx).execute(sql).await?;
    Ok(())
}

/// Sleeps `d` unless `stop` fires first; false when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The span of one event's handling: its feed, position and, when its data
/// carries a `traceparent`, its `trace_id`, so the handler's log lines have it.
fn event_span(feed: &str, event: &FeedEvent) -> tracing::Span {
    let span = tracing::info_span!(
        "feed_event",
        trace_id = tracing::field::Empty,
        feed = %feed,
        position = event.position,
    );
    if let Some(trace_id) = event
        .data
        .get(crate::trace::TRACEPARENT)
        .and_then(|v| v.as_str())
        .and_then(crate::trace::trace_id_of)
    {
        span.record("trace_id", trace_id.as_str());
    }
    span
}
