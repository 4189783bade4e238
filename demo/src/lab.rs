//! The scenario: the same orders, under the same faults, through each
//! delivery mode, with real processes, real HTTP and a real database.
//!
//! 1. Start both services as OS processes on fresh databases (SQLite files in
//!    a temporary directory, or a new database on a Postgres server), with
//!    the fault profile on their outgoing stacks.
//! 2. Send the orders, the modes interleaved (order `i` uses mode
//!    `i % modes`), at a steady rate. The lab is a careful client: each
//!    order carries its own `Idempotency-Key` and is retried until
//!    order-service answers 201, so what reaches order-service is the same in
//!    every mode and only service-to-service delivery differs.
//! 3. Meanwhile, on a schedule drawn from the seed: a shipping outage, and
//!    SIGKILLs of either service at random moments, each followed by a
//!    restart (and, if configured, a database restart).
//! 4. Stop the chaos (faults to zero), let delivery settle (bounded): no
//!    pending outbox message in either database, no shipment still packing.
//! 5. Count the invariants from both databases.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use resilience::store::{Backend, Db, DbOptions};
use serde::Serialize;
use service_kit::testing::TestDatabase;
use service_kit::DeliveryMode;
use sqlx::Row;
use tokio::sync::Mutex;

pub use crate::audit::violations;
use crate::audit::{audit_all, Invariants};
use crate::cluster::{Cluster, ClusterConfig, Kind};
pub use crate::faults::FaultProfile;

/// How long "nothing left to deliver" must hold before the lab counts.
const QUIET: Duration = Duration::from_secs(1);
/// Where the services keep their state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// SQLite files in a temporary directory.
    Sqlite,
    /// A new database (dropped at the end) on the server of this URL.
    Postgres(String),
}

/// Everything a run is made of.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// The executable that runs a service when given its name first.
    pub exe: PathBuf,
    /// Orders per mode.
    pub orders: usize,
    /// The modes, interleaved.
    pub modes: Vec<DeliveryMode>,
    /// Seed of every random choice (faults, kill times, kill targets).
    pub seed: u64,
    /// Fault rates while the traffic runs.
    pub faults: FaultProfile,
    /// How long shipping-service is down, starting a third into the traffic
    /// (zero: no outage).
    pub outage: Duration,
    /// Mean time between SIGKILLs (`None`: no kills).
    pub kill_interval: Option<Duration>,
    /// A shell command that restarts the database server, run once in the
    /// middle of the traffic (`None`: no restart).
    pub db_restart: Option<String>,
    /// Orders sent per second, all modes together.
    pub rate: f64,
    /// Client requests in flight at most.
    pub concurrency: usize,
    /// Longest wait for delivery to settle after the chaos stops.
    pub settle_timeout: Duration,
    /// The storage.
    pub storage: Storage,
    /// Fixed ports (order, shipping) instead of free ones.
    pub ports: Option<(u16, u16)>,
    /// Admin token of both services.
    pub admin_token: String,
    /// Draw progress bars (on stderr).
    pub progress: bool,
    /// Extra flags for both services.
    pub service_args: Vec<String>,
}

impl LabConfig {
    /// The defaults of `cargo run -p demo`: 300 orders per mode, all modes.
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            orders: 300,
            modes: DeliveryMode::ALL.to_vec(),
            seed: 42,
            faults: FaultProfile::default(),
            outage: Duration::from_secs(5),
            kill_interval: Some(Duration::from_secs(6)),
            db_restart: None,
            rate: 30.0,
            concurrency: 16,
            settle_timeout: Duration::from_secs(90),
            storage: Storage::Sqlite,
            ports: None,
            admin_token: "lab-admin-token".into(),
            progress: true,
            service_args: Vec::new(),
        }
    }
}

/// One chaos event, as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosEvent {
    /// Milliseconds since the traffic started (when the action was done:
    /// for a kill, once the service was back up).
    pub at_ms: u64,
    /// What happened.
    pub what: String,
    /// What happened, for a program.
    pub kind: ChaosKind,
    /// The service killed (kills only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// The kinds of chaos events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChaosKind {
    /// A service SIGKILLed and restarted.
    Kill,
    /// shipping-service stopped for the outage.
    OutageStart,
    /// shipping-service back after the outage.
    OutageEnd,
    /// The database server restarted.
    DatabaseRestart,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LabReport {
    /// The seed.
    pub seed: u64,
    /// When the traffic started (the zero of every `at_ms`), in milliseconds
    /// since the Unix epoch: the clock of the databases' timestamps.
    pub started_at_ms: i64,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The fault profile during the traffic.
    pub faults: FaultProfile,
    /// Outage length, ms.
    pub outage_ms: u64,
    /// What the chaos task did.
    pub events: Vec<ChaosEvent>,
    /// Orders order-service never answered 201 for, after every retry.
    pub client_gave_up: u64,
    /// Client retries of `POST /orders` (order-service down or busy).
    pub client_retries: u64,
    /// Did delivery settle before the deadline?
    pub settled: bool,
    /// Seconds from the first order to the end of settling (the whole run).
    pub elapsed_secs: f64,
    /// Seconds from the end of the chaos (faults off, every process up) to
    /// the end of settling: how long delivery took to catch up.
    pub settle_secs: f64,
    /// Per mode, then all modes (`mode: None`).
    pub rows: Vec<Invariants>,
    /// Broken invariants of hardened modes (empty: all held).
    pub violations: Vec<String>,
    /// When an invariant broke: what both databases hold about the first
    /// offending orders (their rows, shipments and outbox messages).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
}

/// Events of `resource`'s pull feeds in `producer` that the consumer has not
/// committed yet: not yet numbered, or above the consumer's offset. The
/// offset is read first, so an event consumed in between is counted (as
/// pending, and perhaps in the next stage too), never missed.
async fn unread(producer: &Db, consumer: &Db, resource: &str) -> anyhow::Result<i64> {
    let mut n = 0;
    for mode in DeliveryMode::PULL {
        let feed = service_kit::feeds::feed_name(resource, mode);
        let offset: Option<i64> =
            sqlx::query_scalar("SELECT position FROM feed_offsets WHERE feed = $1")
                .bind(&feed)
                .fetch_optional(consumer.pool())
                .await?;
        let left: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM feed_events WHERE feed = $1 \
             AND (position IS NULL OR position > $2)",
        )
        .bind(&feed)
        .bind(offset.unwrap_or(0))
        .fetch_one(producer.pool())
        .await?;
        n += left;
    }
    Ok(n)
}

/// A running lab: the cluster and its databases. Dropping it removes SQLite
/// files; call [`Lab::shutdown`] to stop the processes and drop a Postgres
/// database.
pub struct Lab {
    /// The processes.
    pub cluster: Arc<Mutex<Cluster>>,
    /// order-service's base URL.
    pub order_url: String,
    /// shipping-service's base URL.
    pub shipping_url: String,
    config: LabConfig,
    database: TestDatabase,
    order_db: Db,
    shipping_db: Db,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("order_url", &self.order_url)
            .field("shipping_url", &self.shipping_url)
            .finish_non_exhaustive()
    }
}

const ORDER_SCHEMA: &str = "order_service";
const SHIPPING_SCHEMA: &str = "shipping_service";

impl Lab {
    /// Creates the databases and starts both services.
    pub async fn start(config: LabConfig) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating the lab's directory")?;
        let database = match &config.storage {
            Storage::Sqlite => TestDatabase::create(Backend::Sqlite).await?,
            Storage::Postgres(url) => TestDatabase::create_on(Backend::Postgres, url, "lab")
                .await
                .context("creating the lab's Postgres database")?,
        };
        let mut common = vec![
            "--log-format".to_string(),
            "json".into(),
            "--retry-cap".into(),
            "2s".into(),
            "--relay-poll".into(),
            "500ms".into(),
            // A SIGKILLed relay's claims are taken over once its lease runs
            // out; 5 s (more than the 2 s request timeout, so a live relay
            // never loses a claim it is using) keeps a kill from stalling
            // delivery for the default 30 s.
            "--relay-lease".into(),
            "5s".into(),
            // The same for a SIGKILLed feed consumer's lease (it must stay
            // above the long-poll wait plus the request timeout).
            "--feed-lease".into(),
            "5s".into(),
            "--feed-wait".into(),
            "1s".into(),
            // A first retry after up to a second (full jitter), as production
            // relays commonly wait. It also gives a SIGKILL of shipping a
            // realistic chance to fall between a lost answer and its retry,
            // which is what memory-dedupe forgets; with 100 ms that window
            // is too small to show in a one-minute run.
            "--retry-base".into(),
            "1s".into(),
            "--fault-seed".into(),
            config.seed.to_string(),
        ];
        common.extend(config.faults.args());
        common.extend(config.service_args.iter().cloned());
        let cluster = Cluster::start(ClusterConfig {
            exe: config.exe.clone(),
            dir: dir.path().to_path_buf(),
            order_db: database.url("order"),
            shipping_db: database.url("shipping"),
            ports: config.ports,
            admin_token: config.admin_token.clone(),
            common_args: common,
            order_args: Vec::new(),
            shipping_args: vec!["--warehouse-delay".into(), "200ms".into()],
        })
        .await?;
        let order_db = open(&database.url("order"), ORDER_SCHEMA).await?;
        let shipping_db = open(&database.url("shipping"), SHIPPING_SCHEMA).await?;
        Ok(Self {
            order_url: cluster.order.url(),
            shipping_url: cluster.shipping.url(),
            cluster: Arc::new(Mutex::new(cluster)),
            config,
            database,
            order_db,
            shipping_db,
            dir,
        })
    }

    /// Where the logs of both processes are.
    pub async fn log_paths(&self) -> Vec<PathBuf> {
        let c = self.cluster.lock().await;
        vec![
            c.order.log_path().to_path_buf(),
            c.shipping.log_path().to_path_buf(),
        ]
    }

    /// The Postgres database's name, if any.
    pub fn postgres_database(&self) -> Option<&str> {
        self.database.postgres_name()
    }

    /// Sends the traffic under chaos, settles, and counts.
    pub async fn run(&self) -> anyhow::Result<LabReport> {
        let cfg = &self.config;
        let total = cfg.orders * cfg.modes.len();
        let bars = Bars::new(cfg.progress, total as u64);
        let started = Instant::now();
        let started_at_ms = resilience::store::now_ms();
        let traffic_span = Duration::from_secs_f64(total as f64 / cfg.rate.max(0.1));
        let schedule = schedule(cfg, traffic_span);

        let client = Client::new(&self.order_url, cfg.seed)?;
        let traffic = client.send_all(cfg, total, started, &bars);
        let chaos = self.chaos(schedule, started, &bars);
        let (traffic, events) = tokio::join!(traffic, chaos);
        traffic?;
        let events = events?;

        // The network heals: faults off everywhere (also for later restarts).
        {
            let mut c = self.cluster.lock().await;
            let http = c.http.clone();
            let off = FaultProfile::NONE.args();
            for kind in [Kind::Order, Kind::Shipping] {
                let p = c.process(kind);
                for pair in off.chunks(2) {
                    p.set_flag(&pair[0], &pair[1]);
                }
                p.start(&http).await?;
            }
            c.set_faults(&FaultProfile::NONE).await?;
        }
        let settle_started = Instant::now();
        let settled = self.settle(&bars).await?;
        let settle_secs = settle_started.elapsed().as_secs_f64();
        bars.finish();

        let mut rows = audit_all(&self.order_db, &self.shipping_db).await?;
        // The modes in their usual order (weakest first), then the total.
        rows.sort_by_key(|r| {
            r.mode
                .as_deref()
                .and_then(|m| DeliveryMode::ALL.iter().position(|x| x.as_str() == m))
                .unwrap_or(usize::MAX)
        });
        let violations: Vec<String> = rows.iter().flat_map(violations).collect();
        let evidence = if violations.is_empty() {
            Vec::new()
        } else {
            crate::audit::evidence(&self.order_db, &self.shipping_db, 5).await?
        };
        Ok(LabReport {
            seed: cfg.seed,
            started_at_ms,
            backend: match cfg.storage {
                Storage::Sqlite => "sqlite".into(),
                Storage::Postgres(_) => "postgres".into(),
            },
            faults: cfg.faults,
            outage_ms: cfg.outage.as_millis() as u64,
            events,
            client_gave_up: client.gave_up.load(Ordering::Relaxed),
            client_retries: client.retries.load(Ordering::Relaxed),
            settled,
            elapsed_secs: started.elapsed().as_secs_f64(),
            settle_secs,
            rows,
            violations,
            evidence,
        })
    }

    async fn chaos(
        &self,
        schedule: Vec<(Duration, Action)>,
        started: Instant,
        bars: &Bars,
    ) -> anyhow::Result<Vec<ChaosEvent>> {
        let mut events = Vec::new();
        let mut restarts: u64 = 0;
        for (at, action) in schedule {
            tokio::time::sleep_until((started + at).into()).await;
            let mut c = self.cluster.lock().await;
            let http = c.http.clone();
            let mut service = None;
            let (kind, what) = match &action {
                Action::Kill(kind) => {
                    let p = c.process(*kind);
                    p.kill().await?;
                    restarts += 1;
                    // A new fault sequence after each restart, still seeded.
                    p.set_flag(
                        "--fault-seed",
                        &self.config.seed.wrapping_add(restarts).to_string(),
                    );
                    p.start(&http).await?;
                    service = Some(kind.name().to_string());
                    (
                        ChaosKind::Kill,
                        format!("SIGKILL {} and restart", kind.name()),
                    )
                }
                Action::OutageStart => {
                    c.shipping.kill().await?;
                    (
                        ChaosKind::OutageStart,
                        format!("shipping-service down for {:?}", self.config.outage),
                    )
                }
                Action::OutageEnd => {
                    c.shipping.start(&http).await?;
                    (ChaosKind::OutageEnd, "shipping-service back".to_string())
                }
                Action::RestartDatabase(cmd) => {
                    let out = tokio::process::Command::new("sh")
                        .arg("-c")
                        .arg(cmd)
                        .output()
                        .await
                        .with_context(|| format!("running {cmd:?}"))?;
                    anyhow::ensure!(
                        out.status.success(),
                        "database restart {cmd:?} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    (
                        ChaosKind::DatabaseRestart,
                        "database server restarted".to_string(),
                    )
                }
            };
            drop(c);
            bars.event(&what);
            events.push(ChaosEvent {
                at_ms: started.elapsed().as_millis() as u64,
                what,
                kind,
                service,
            });
        }
        Ok(events)
    }

    /// Waits until nothing is left to deliver: no pending outbox message in
    /// either database and no shipment still packing, on every probe for
    /// [`QUIET`] (a request a relay gave up on may still be committing at its
    /// peer).
    async fn settle(&self, bars: &Bars) -> anyhow::Result<bool> {
        let deadline = Instant::now() + self.config.settle_timeout;
        bars.settling();
        let mut quiet_since: Option<Instant> = None;
        loop {
            match self.undelivered().await {
                Ok(0) => {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= QUIET {
                        return Ok(true);
                    }
                }
                Ok(n) => {
                    quiet_since = None;
                    bars.left(n);
                }
                Err(e) => {
                    quiet_since = None;
                    tracing::debug!(error = %e, "settle probe failed");
                }
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Work not yet done, counted stage by stage in the direction the work
    /// flows: order-service's outbox and unread orders-feed events, then
    /// packing shipments, then shipping-service's outbox and unread
    /// shipments-feed events. The stages are separate queries (separate
    /// databases on SQLite), so the order matters: an item that moves to
    /// the next stage between two queries is then counted in that stage, not
    /// missed by both. (Counting shipping's outbox before the packing
    /// shipments missed a shipment shipped in between: its report was still
    /// pending when the audit ran.)
    async fn undelivered(&self) -> anyhow::Result<i64> {
        let pending = "SELECT COUNT(*) FROM outbox WHERE status = 'pending'";
        let orders: i64 = sqlx::query(pending)
            .fetch_one(self.order_db.pool())
            .await?
            .try_get(0)?;
        let order_events = unread(&self.order_db, &self.shipping_db, "orders").await?;
        let packing: i64 = sqlx::query("SELECT COUNT(*) FROM shipments WHERE status = 'packing'")
            .fetch_one(self.shipping_db.pool())
            .await?
            .try_get(0)?;
        let reports: i64 = sqlx::query(pending)
            .fetch_one(self.shipping_db.pool())
            .await?
            .try_get(0)?;
        let shipment_events = unread(&self.shipping_db, &self.order_db, "shipments").await?;
        Ok(orders + order_events + packing + reports + shipment_events)
    }

    /// order-service's and shipping-service's databases (the report's
    /// timelines are read from them: [`crate::html::timelines`]).
    pub fn databases(&self) -> (&Db, &Db) {
        (&self.order_db, &self.shipping_db)
    }

    /// Stops both services, then removes the lab's state: the directory of
    /// logs (and SQLite files) and a Postgres database. With `keep`, nothing
    /// is removed and the answer says where it is.
    pub async fn shutdown(self, keep: bool) -> anyhow::Result<Option<String>> {
        self.cluster.lock().await.stop().await?;
        self.order_db.close().await;
        self.shipping_db.close().await;
        if !keep {
            self.database.cleanup().await;
            return Ok(None);
        }
        let logs = self.dir.keep();
        let data = self.database.keep();
        Ok(Some(format!(
            "service logs in {}; databases: {data}",
            logs.display()
        )))
    }
}

async fn open(url: &str, schema: &str) -> anyhow::Result<Db> {
    let mut opts = DbOptions::new(url, schema);
    opts.max_connections = 2;
    Ok(Db::connect(&opts).await?)
}

/// A chaos action.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Kill(Kind),
    OutageStart,
    OutageEnd,
    RestartDatabase(String),
}

/// The chaos schedule, drawn from the seed: an outage a third of the way in,
/// kills at exponential-ish intervals (uniform 0.5x to 1.5x the mean) on a
/// random service (not shipping while it is down), a database restart at
/// two thirds.
fn schedule(cfg: &LabConfig, span: Duration) -> Vec<(Duration, Action)> {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed_c4a0);
    let mut out = Vec::new();
    let outage = (!cfg.outage.is_zero()).then(|| {
        let start = span / 3;
        (start, start + cfg.outage)
    });
    if let Some((start, end)) = outage {
        out.push((start, Action::OutageStart));
        out.push((end, Action::OutageEnd));
    }
    if let Some(cmd) = &cfg.db_restart {
        out.push((span * 2 / 3, Action::RestartDatabase(cmd.clone())));
    }
    if let Some(mean) = cfg.kill_interval.filter(|d| !d.is_zero()) {
        let mut t = Duration::ZERO;
        loop {
            t += mean.mul_f64(rng.gen_range(0.5..1.5));
            if t >= span {
                break;
            }
            let shipping_down = outage.is_some_and(|(s, e)| t >= s && t <= e);
            let kind = if shipping_down || rng.gen_bool(0.5) {
                Kind::Order
            } else {
                Kind::Shipping
            };
            out.push((t, Action::Kill(kind)));
        }
    }
    out.sort_by_key(|(t, _)| *t);
    out
}

/// The lab's own HTTP client: a careful caller of `POST /orders`.
struct Client {
    http: reqwest::Client,
    url: String,
    seed: u64,
    retries: AtomicU64,
    gave_up: AtomicU64,
}

impl Client {
    fn new(order_url: &str, seed: u64) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            url: format!("{order_url}/orders"),
            seed,
            retries: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
        })
    }

    async fn send_all(
        &self,
        cfg: &LabConfig,
        total: usize,
        started: Instant,
        bars: &Bars,
    ) -> anyhow::Result<()> {
        let interval = Duration::from_secs_f64(1.0 / cfg.rate.max(0.1));
        futures::stream::iter(0..total)
            .map(|i| {
                let mode = cfg.modes[i % cfg.modes.len()];
                let at = started + interval.mul_f64(i as f64);
                async move {
                    tokio::time::sleep_until(at.into()).await;
                    if !self.create(i, mode).await {
                        self.gave_up.fetch_add(1, Ordering::Relaxed);
                    }
                    bars.sent();
                }
            })
            .buffer_unordered(cfg.concurrency.max(1))
            .for_each(|()| async {})
            .await;
        Ok(())
    }

    /// `POST /orders` until a 201 (or a replayed 201), for at most 60 s.
    async fn create(&self, i: usize, mode: DeliveryMode) -> bool {
        let key = format!("lab-{}-{i}", self.seed);
        let body = serde_json::json!({
            "customer_id": format!("lab-customer-{}", i % 17),
            "items": [{ "sku": format!("SKU-{}", i % 5), "quantity": 1 + i % 3 }],
            "delivery_mode": mode,
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut pause = Duration::from_millis(50);
        loop {
            let res = self
                .http
                .post(&self.url)
                .header("idempotency-key", &key)
                .json(&body)
                .send()
                .await;
            match res {
                Ok(r) if r.status() == reqwest::StatusCode::CREATED => return true,
                Ok(r) if r.status().is_client_error() && r.status() != 409 => {
                    tracing::error!(status = %r.status(), "order refused");
                    return false;
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return false;
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// Progress on stderr: orders sent, then what is left to settle.
struct Bars {
    multi: MultiProgress,
    orders: ProgressBar,
}

impl Bars {
    fn new(visible: bool, total: u64) -> Self {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let style = ProgressStyle::with_template(
            "{spinner} {prefix:>9} [{bar:40}] {pos}/{len} orders  {elapsed}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let orders = multi.add(ProgressBar::new(total).with_style(style));
        orders.set_prefix("sending");
        orders.enable_steady_tick(Duration::from_millis(120));
        Self { multi, orders }
    }

    fn sent(&self) {
        self.orders.inc(1);
    }

    fn event(&self, what: &str) {
        let _ = self.multi.println(format!(
            "  [{:>5.1}s] {what}",
            self.orders.elapsed().as_secs_f64()
        ));
    }

    fn settling(&self) {
        self.orders.set_prefix("settling");
        self.orders.set_message("faults off; waiting for delivery");
    }

    fn left(&self, n: i64) {
        self.orders.set_message(format!("{n} deliveries left"));
    }

    fn finish(&self) {
        self.orders.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_seeded_and_spares_shipping_while_down() {
        let mut cfg = LabConfig::new(PathBuf::from("x"));
        cfg.kill_interval = Some(Duration::from_secs(2));
        let span = Duration::from_secs(30);
        let a = schedule(&cfg, span);
        assert_eq!(a, schedule(&cfg, span));
        let (start, end) = (span / 3, span / 3 + cfg.outage);
        assert!(a.iter().any(|(_, x)| *x == Action::OutageStart));
        for (t, x) in &a {
            assert!(*t <= end.max(span));
            if *t > start && *t < end {
                assert_ne!(*x, Action::Kill(Kind::Shipping));
            }
        }
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0));
        cfg.seed += 1;
        assert_ne!(a, schedule(&cfg, span));
    }
}
