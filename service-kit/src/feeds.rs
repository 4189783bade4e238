//! Pull delivery as both services use it: one feed per pull mode on the
//! producer's side, one consumer per pull mode on the other side, their
//! settings, the HTTP answer of a feed page, and the background tasks.
//!
//! Why one feed per mode: the consumer's guarantee is decided by *where it
//! commits its offset* ([`Commit`]), and that is a property of the consumer,
//! not of an event. `pull-effectively-once` events are read by a consumer
//! that commits its offset in the same transaction as the state change;
//! `pull-at-least-once` events by one that commits it afterwards, every
//! [`FeedArgs::feed_offset_commit`]. Each needs its own offset, so each has
//! its own feed: `orders.pull-effectively-once`, served at
//! `GET /orders/feed/pull-effectively-once`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use clap::Args;
use resilience::feed::{
    Commit, ConsumerConfig, ConsumerHandle, FeedConsumer, FeedError, FeedHandler, FeedLog,
    FeedQuery, Page,
};
use resilience::retry::Backoff;
use resilience::store::Db;
use resilience::SendService;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{db_error, internal_error, DeliveryMode, Problem};

/// Feed settings of a service (producer and consumer side).
#[derive(Debug, Clone, Args)]
pub struct FeedArgs {
    /// Events older than this are trimmed from this service's feeds; a
    /// consumer whose offset fell behind gets 410 Gone.
    #[arg(long, env = "FEED_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub feed_retention: Duration,

    /// pull-at-least-once: how often the consumer commits its offset (after
    /// the state changes it covers, in a transaction of its own).
    #[arg(long, env = "FEED_OFFSET_COMMIT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub feed_offset_commit: Duration,

    /// How long a consumer's lease on a feed is exclusive; a frozen or dead
    /// holder stops the feed for at most about this long.
    #[arg(long, env = "FEED_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub feed_lease: Duration,

    /// Long-poll wait of the consumer's feed requests.
    #[arg(long, env = "FEED_WAIT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub feed_wait: Duration,

    /// Events per feed page.
    #[arg(long, env = "FEED_BATCH", default_value_t = 100)]
    pub feed_batch: u32,
}

/// The name of the feed a producer keeps for a pull mode, e.g.
/// `orders.pull-effectively-once` (also the consumer's offset row).
pub fn feed_name(resource: &str, mode: DeliveryMode) -> String {
    format!("{resource}.{mode}")
}

/// The pull mode named by a feed path segment, or 404.
pub fn parse_feed_mode(raw: &str) -> Result<DeliveryMode, Problem> {
    match raw.parse::<DeliveryMode>() {
        Ok(m) if m.uses_feed() => Ok(m),
        _ => Err(Problem::not_found(format!(
            "no feed {raw:?} (feeds: pull-at-least-once, pull-effectively-once)"
        ))),
    }
}

/// Answers one feed request: a page (long-polled up to `wait`), 400 for a
/// bad query, 410 when `after` fell behind the retained log, 409 when it is
/// beyond the head, 503 with `Retry-After` when the database is unavailable.
///
/// `request_timeout` is the server's time limit on a request: the long poll
/// ends a second before it, so a long `wait` gets its empty page rather
/// than the limit's 503.
///
/// With `give_way`, a page of events is held back while the producer's
/// front door is busy (see [`resilience::foreground`]): up to its
/// `max_wait`, and not at all once the page's oldest event is `max_lag`
/// old. The consumer then applies its events after the burst rather than
/// during it; what it reads does not change.
pub async fn page(
    log: &FeedLog,
    feed: &str,
    q: &FeedQuery,
    request_timeout: Duration,
    give_way: Option<&resilience::foreground::GiveWay>,
) -> Result<Json<Page>, Problem> {
    let start = tokio::time::Instant::now();
    let (after, limit, wait) = q
        .validate()
        .map_err(|e| Problem::bad_request(e.to_string()))?;
    let budget = request_timeout.saturating_sub(POLL_MARGIN);
    let wait = wait.min(budget);
    match log.read_wait(feed, after, limit, wait).await {
        Ok(p) => {
            if let (Some(g), Some(oldest)) = (give_way, p.events.iter().map(|e| e.created_at).min())
            {
                let lag = Duration::from_millis(
                    u64::try_from(resilience::store::now_ms().saturating_sub(oldest)).unwrap_or(0),
                );
                if g.may_wait(Some(lag)) && g.busy() {
                    let deadline = (tokio::time::Instant::now() + g.max_wait).min(start + budget);
                    g.wait_until_quiet(deadline).await;
                }
            }
            Ok(Json(p))
        }
        Err(e @ FeedError::Gone { .. }) => Err(Problem::new(e.status(), "gone").detail(format!(
            "{e}; reset the consumer's offset (it missed events it can no longer read)"
        ))),
        Err(e @ FeedError::Ahead { .. }) => {
            Err(Problem::conflict("offset beyond the feed", e.to_string()))
        }
        Err(FeedError::Db(e)) => Err(db_error(e)),
        Err(e) => Err(internal_error(e)),
    }
}

/// How long before the server's request time limit a long poll answers.
const POLL_MARGIN: Duration = Duration::from_secs(1);

/// Where a service pulls from: the other service's feeds, and what to do
/// with their events.
pub struct PullSource {
    /// The producer's feed URL without the mode, e.g.
    /// `http://127.0.0.1:8080/orders/feed`.
    pub url: String,
    /// The producer's resource name (`orders`), which prefixes feed names.
    pub resource: &'static str,
    /// The handler of each pull mode's events.
    pub handlers: Vec<(DeliveryMode, Arc<dyn FeedHandler>)>,
}

impl std::fmt::Debug for PullSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullSource")
            .field("url", &self.url)
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

impl FeedArgs {
    /// The consumers of `source`, one per pull mode, on `db`, sending
    /// through `stack` (breaker, timeout, faults).
    pub fn consumers(&self, db: &Db, stack: &SendService, source: PullSource) -> Vec<FeedConsumer> {
        source
            .handlers
            .into_iter()
            .map(|(mode, handler)| {
                let commit = if mode == DeliveryMode::PullEffectivelyOnce {
                    Commit::SameTransaction
                } else {
                    Commit::Periodic(self.feed_offset_commit)
                };
                let mut cfg = ConsumerConfig::new(
                    feed_name(source.resource, mode),
                    format!("{}/{}", source.url.trim_end_matches('/'), mode),
                    commit,
                );
                cfg.lease = self.feed_lease;
                cfg.wait = self.feed_wait;
                cfg.batch = self.feed_batch.max(1);
                cfg.backoff = Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(5));
                FeedConsumer::new(db.clone(), stack.clone(), handler, cfg)
            })
            .collect()
    }
}

/// The producer side's background work: cross-replica wake-ups and
/// retention of `feeds`.
pub fn spawn_producer(
    log: &FeedLog,
    feeds: Vec<String>,
    retention: Duration,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let wakeups = log.spawn_wakeups(stop.clone());
    let log = log.clone();
    let trimmer = tokio::spawn(async move {
        let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            for f in &feeds {
                match log.trim(f, retention).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!(feed = %f, trimmed = n, "feed events past retention deleted")
                    }
                    Err(e) => tracing::warn!(feed = %f, error = %e, "feed trim failed"),
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    vec![wakeups, trimmer]
}

/// Status handles of running consumers, for /admin.
pub type Consumers = Arc<Vec<ConsumerHandle>>;
