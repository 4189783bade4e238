//! `demo bench`: the end-to-end benchmark every performance claim is
//! measured with.
//!
//! Faults off. For each backend and each delivery mode it starts both
//! services as real OS processes on fresh databases and measures:
//!
//! - **ingest**: `POST /orders` from this process with `connections`
//!   concurrent connections: requests per second and latency percentiles;
//! - **end to end**: the first order's `created_at` to the last order's
//!   `shipped_at`, read from order-service's database once every order has
//!   shipped (orders per second);
//! - **writes per delivered order** (Postgres only): transactions committed
//!   and rows written in the database (`pg_stat_database`), and statements
//!   when `pg_stat_statements` is loaded;
//! - **peak RSS** of each service process (`VmHWM`).
//!
//! In the same run, before and after the modes, it measures the **ceiling**:
//! `connections` tasks each committing `BEGIN; INSERT` an order`; INSERT` an
//! outbox message`; COMMIT` in a loop, through the services' own
//! [`Db::connect`] on the same backend, into the services' own tables. Every
//! rate is also printed as a ratio to that ceiling, and each mode's end-to-end
//! rate as a ratio to at-most-once's, so that figures taken on a loaded
//! machine can still be compared.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use resilience::store::{now_ms, redact, Backend, Db, DbOptions};
use serde::Serialize;
use service_kit::testing::TestDatabase;
use service_kit::DeliveryMode;
use sqlx::{Connection, Row};
use tokio::task::JoinSet;

/// The modes run unless `--modes` says otherwise: the baseline, the two push
/// modes and the exactly-once pull mode.
pub const DEFAULT_MODES: [DeliveryMode; 4] = [
    DeliveryMode::AtMostOnce,
    DeliveryMode::AtLeastOnce,
    DeliveryMode::EffectivelyOnce,
    DeliveryMode::PullEffectivelyOnce,
];

/// The services' log filter during a benchmark (unless `RUST_LOG` is set):
/// what a deployment would run, without the lab's per-attempt debug lines.
pub const SERVICE_LOG_FILTER: &str = "info,sqlx=warn,hyper=warn";

/// The services' default pool size, one of the ceiling's concurrencies.
const SERVICE_POOL: usize = 8;

/// Marks the benchmark's own queries, so statement counts can leave them out.
const PROBE: &str = "/* bench-probe */";

/// What the ceiling loop commits, per transaction.
const CEILING_SHAPE: &str = "BEGIN; INSERT orders; INSERT outbox; COMMIT";

/// Where the services keep their state during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchBackend {
    /// SQLite files in a temporary directory (WAL, as the services open them).
    Sqlite,
    /// A new database per mode (dropped afterwards) on this Postgres server.
    Postgres(String),
}

impl BenchBackend {
    fn name(&self) -> &'static str {
        match self {
            BenchBackend::Sqlite => "sqlite",
            BenchBackend::Postgres(_) => "postgres",
        }
    }
}

/// Everything a benchmark run is made of.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The executable that runs a service when given its name first.
    pub exe: PathBuf,
    /// Orders per mode.
    pub orders: usize,
    /// Concurrent client connections (and the ceiling's tasks and pool size).
    pub connections: usize,
    /// The modes, each on a fresh cluster and fresh databases.
    pub modes: Vec<DeliveryMode>,
    /// The backends, one after the other.
    pub backends: Vec<BenchBackend>,
    /// shipping-service's `--warehouse-delay` (small, so delivery is measured).
    pub warehouse_delay: Duration,
    /// Longest wait, per mode, for every order to ship.
    pub deadline: Duration,
    /// Give up waiting when no order shipped for this long (an at-most-once
    /// order whose only call failed never ships).
    pub stall: Duration,
    /// Transactions of each ceiling run.
    pub ceiling_tx: usize,
    /// Send a unique `Idempotency-Key` with every order (a careful client).
    pub client_keys: bool,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl BenchConfig {
    /// The defaults of `demo bench`: 10,000 orders, 32 connections, four
    /// modes, SQLite.
    pub fn new(exe: PathBuf) -> Self {
        Self {
            exe,
            orders: 10_000,
            connections: 32,
            modes: DEFAULT_MODES.to_vec(),
            backends: vec![BenchBackend::Sqlite],
            warehouse_delay: Duration::from_millis(10),
            deadline: Duration::from_secs(300),
            stall: Duration::from_secs(15),
            ceiling_tx: 5000,
            client_keys: true,
            progress: true,
        }
    }
}

/// `/proc/loadavg`: run-queue averages over 1, 5 and 15 minutes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LoadAvg {
    /// Over the last minute.
    pub one: f64,
    /// Over the last five minutes.
    pub five: f64,
    /// Over the last fifteen minutes.
    pub fifteen: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Orders per mode.
    pub orders: usize,
    /// Client connections (and ceiling tasks).
    pub connections: usize,
    /// shipping-service's warehouse delay, ms.
    pub warehouse_delay_ms: u64,
    /// Did every order carry an `Idempotency-Key`?
    pub client_idempotency_keys: bool,
    /// CPUs this process may use.
    pub cpus: usize,
    /// Machine load when the run started.
    pub load_start: Option<LoadAvg>,
    /// Machine load when the run ended.
    pub load_end: Option<LoadAvg>,
    /// One entry per backend.
    pub backends: Vec<BackendReport>,
    /// How figures were counted, and what was skipped and why.
    pub notes: Vec<String>,
}

/// One backend: its ceiling and its modes.
#[derive(Debug, Clone, Serialize)]
pub struct BackendReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// The commit ceiling measured in the same run.
    pub ceiling: Ceiling,
    /// One entry per mode, in the order they ran.
    pub modes: Vec<ModeReport>,
    /// Where the write figures come from, or why they are not available.
    pub writes_source: String,
}

/// The commit loop of the services' ingest shape on the same database, at
/// a few concurrencies; the best one is the ceiling.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// The best level's mean, transactions per second: the ratios' denominator.
    pub tx_per_s: f64,
    /// The best level's concurrency.
    pub connections: usize,
    /// Transactions per run.
    pub transactions: usize,
    /// What each transaction does.
    pub shape: String,
    /// Every level measured.
    pub levels: Vec<CeilingLevel>,
}

/// The commit loop at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingLevel {
    /// Concurrent tasks, each with a pooled connection of its own.
    pub connections: usize,
    /// The mean of the runs, transactions per second.
    pub tx_per_s: f64,
    /// Each run (one before the modes, one after).
    pub runs_tx_per_s: Vec<f64>,
}

/// One mode on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// The delivery mode.
    pub mode: String,
    /// Machine load when the mode started.
    pub load_start: Option<LoadAvg>,
    /// Machine load when the mode ended.
    pub load_end: Option<LoadAvg>,
    /// `POST /orders`.
    pub ingest: Ingest,
    /// First order created to last order shipped.
    pub e2e: EndToEnd,
    /// Database writes per delivered order.
    pub writes: Writes,
    /// Peak resident memory of each service.
    pub rss: Rss,
    /// CPU time each service spent per delivered order.
    pub cpu: Cpu,
    /// The commit loop at the ceiling's best concurrency, run right before
    /// and right after this mode: its mean is this mode's ratios'
    /// denominator, so a machine whose speed drifts during the run is
    /// compared with itself within a minute.
    pub ceiling: ModeCeiling,
    /// The figures against the ceiling and against at-most-once.
    pub ratios: Ratios,
}

/// The ceiling runs that bracket one mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModeCeiling {
    /// Concurrent tasks (the best level of the runs before the modes).
    pub connections: usize,
    /// The run right before the mode and the one right after, tx/s.
    pub runs_tx_per_s: Vec<f64>,
    /// Their mean: the denominator of this mode's `÷ ceiling` ratios.
    pub tx_per_s: f64,
}

/// The client's side of `POST /orders`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ingest {
    /// Requests sent.
    pub sent: usize,
    /// Answered 201.
    pub created: usize,
    /// Not answered 201 (any other status, or no answer).
    pub errors: usize,
    /// Wall time from the first request to the last answer.
    pub secs: f64,
    /// `sent / secs`.
    pub req_per_s: f64,
    /// Latency of one request, 50th percentile, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Slowest, ms.
    pub max_ms: Option<f64>,
}

/// Counted from order-service's database.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndToEnd {
    /// Orders of the mode in the database.
    pub orders_in_db: usize,
    /// Of those, `shipped`.
    pub shipped: usize,
    /// Did every order in the database ship before the deadline?
    pub complete: bool,
    /// `max(shipped_at) - min(created_at)`, seconds.
    pub secs: f64,
    /// `shipped / secs`.
    pub orders_per_s: f64,
    /// `max(shipped_at) - max(created_at)`, seconds: how long delivery ran
    /// on after the last order came in (0 while nothing shipped). Near zero
    /// when delivery keeps pace with ingest; large when it falls behind.
    pub tail_secs: f64,
}

/// Writes per delivered order, counted by the database (Postgres only).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Writes {
    /// `pg_stat_database.xact_commit` (read-only transactions included),
    /// minus the benchmark's own probes.
    pub commits_per_order: Option<f64>,
    /// Write transactions: `COMMIT` records in the write-ahead log while the
    /// mode ran, counted with `pg_walinspect` (a read-only transaction writes
    /// none; savepoints commit inside their transaction's record). The log
    /// is server-wide, so both services count, and so would anything else
    /// writing meanwhile. `None` without `pg_walinspect`.
    pub write_commits_per_order: Option<f64>,
    /// `tup_inserted + tup_updated + tup_deleted`.
    pub rows_written_per_order: Option<f64>,
    /// `pg_stat_statements` calls (BEGIN and COMMIT included).
    pub statements_per_order: Option<f64>,
    /// `pg_stat_statements` calls of `COMMIT` (explicit transactions).
    pub commit_statements_per_order: Option<f64>,
    /// Rows written per delivered order, table by table
    /// (`pg_stat_user_tables`), both services' schemas.
    pub tables: Vec<TableWrites>,
}

/// One table's row writes per delivered order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TableWrites {
    /// `schema.table`.
    pub table: String,
    /// `n_tup_ins`.
    pub inserted: f64,
    /// `n_tup_upd`, HOT updates included.
    pub updated: f64,
    /// `n_tup_hot_upd`: updates that wrote no index entry (heap-only tuples).
    pub hot_updated: f64,
    /// `n_tup_del`.
    pub deleted: f64,
}

/// CPU time (user + system) of each service process from its start to the
/// last order shipped, in milliseconds per delivered order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    /// order-service.
    pub order_ms_per_order: Option<f64>,
    /// shipping-service.
    pub shipping_ms_per_order: Option<f64>,
    /// This process while it posted the orders (the load generator).
    pub client_ms_per_order: Option<f64>,
    /// Every `postgres` process on the machine, exited backends included
    /// (through the postmaster's children time), from the first order
    /// posted to the last shipped. Postgres runs only.
    pub postgres_ms_per_order: Option<f64>,
}

/// `VmHWM` of each service process, kB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rss {
    /// order-service.
    pub order_kb: Option<u64>,
    /// shipping-service.
    pub shipping_kb: Option<u64>,
}

/// The figures as ratios.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// Ingest req/s ÷ the mode's ceiling tx/s (its bracketing runs).
    pub ingest_to_ceiling: Option<f64>,
    /// End-to-end orders/s ÷ the mode's ceiling tx/s.
    pub e2e_to_ceiling: Option<f64>,
    /// End-to-end orders/s ÷ at-most-once's on the same backend in this run.
    pub e2e_to_at_most_once: Option<f64>,
}

/// Parses `--modes`: names separated by commas, or `all`.
pub fn parse_modes(names: &[String]) -> anyhow::Result<Vec<DeliveryMode>> {
    let mut out = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if name == "all" {
            out.extend(DeliveryMode::ALL);
            continue;
        }
        let mode = DeliveryMode::ALL
            .into_iter()
            .find(|m| m.as_str() == name)
            .with_context(|| format!("unknown mode {name:?}"))?;
        out.push(mode);
    }
    out.dedup();
    ensure!(!out.is_empty(), "--modes names no mode");
    Ok(out)
}

/// The value at percentile `p` (0 to 100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
}

/// `a / b`, when both are finite and `b` is positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

/// Fills every mode's ratios from its own ceiling (the backend's where the
/// mode has none) and the backend's at-most-once row.
pub fn fill_ratios(backend: &mut BackendReport) {
    let whole_run = backend.ceiling.tx_per_s;
    let baseline = backend
        .modes
        .iter()
        .find(|m| m.mode == DeliveryMode::AtMostOnce.as_str())
        .map(|m| m.e2e.orders_per_s);
    for m in &mut backend.modes {
        let ceiling = if m.ceiling.tx_per_s > 0.0 {
            m.ceiling.tx_per_s
        } else {
            whole_run
        };
        m.ratios = Ratios {
            ingest_to_ceiling: ratio(m.ingest.req_per_s, ceiling),
            e2e_to_ceiling: ratio(m.e2e.orders_per_s, ceiling),
            e2e_to_at_most_once: baseline.and_then(|b| ratio(m.e2e.orders_per_s, b)),
        };
    }
}

/// Machine load now (`None` where `/proc/loadavg` is not readable).
pub fn loadavg() -> Option<LoadAvg> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg(text: &str) -> Option<LoadAvg> {
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some(LoadAvg {
        one: it.next()??,
        five: it.next()??,
        fifteen: it.next()??,
    })
}

/// CPU time (ms) of every process named `postgres`, counting the time of
/// exited children each has waited for (the postmaster reaps the backends).
pub fn postgres_cpu_ms() -> Option<f64> {
    let mut total = 0.0;
    let mut seen = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if !stat.contains("(postgres)") {
            continue;
        }
        if let Some(ms) = parse_cpu_ms_with_children(&stat) {
            total += ms;
            seen = true;
        }
    }
    seen.then_some(total)
}

fn parse_cpu_ms_with_children(stat: &str) -> Option<f64> {
    stat_ms(stat, 4)
}

/// CPU time (user + system, ms) a running process has used so far.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    parse_cpu_ms(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_cpu_ms(stat: &str) -> Option<f64> {
    stat_ms(stat, 2)
}

/// The sum of the first `n` time fields of a `/proc/<pid>/stat` line
/// (utime, stime, cutime, cstime), in ms. The fields after the command name
/// (which may hold spaces, hence the last ')'): state is the first, utime
/// the 12th; in clock ticks of USER_HZ, which Linux fixes at 100 for user
/// space.
fn stat_ms(stat: &str, n: usize) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: Option<f64> = (11..11 + n).map(|i| f.get(i)?.parse::<f64>().ok()).sum();
    Some(ticks? * 1000.0 / USER_HZ)
}

/// Peak resident set (`VmHWM`, kB) of a running process.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    parse_vm_hwm(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Does a Postgres server answer at `url` within a few seconds?
pub async fn postgres_answers(url: &str) -> bool {
    let connect = async {
        let conn = sqlx::PgConnection::connect(url).await?;
        conn.close().await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), connect).await,
        Ok(Ok(()))
    )
}

/// Runs every backend and mode of `cfg`.
pub async fn run(cfg: &BenchConfig) -> anyhow::Result<BenchReport> {
    ensure!(cfg.orders > 0, "--orders must be at least 1");
    ensure!(cfg.connections > 0, "--connections must be at least 1");
    ensure!(!cfg.modes.is_empty(), "no mode to run");
    ensure!(!cfg.backends.is_empty(), "no backend to run");
    let load_start = loadavg();
    let mut backends = Vec::new();
    let mut notes = vec![
        format!(
            "faults off; warehouse delay {} ms, so end to end measures delivery, not packing",
            cfg.warehouse_delay.as_millis()
        ),
        "end to end: max(shipped_at) - min(created_at) of the mode's orders in order-service's \
         database, each mode on a fresh cluster and fresh databases"
            .into(),
        format!(
            "ceiling: N tasks, each committing {CEILING_SHAPE} in a loop through the services' \
             Db::connect (SQLite: WAL, synchronous NORMAL, BEGIN IMMEDIATE, busy timeout) into \
             the services' tables, every connection opened before the clock starts, at N = \
             {:?}, each run before and after the modes; each \
             mode is also bracketed by a run at the best N right before and right after it, and \
             the mean of those two is that mode's ratios' denominator",
            ceiling_levels(cfg.connections)
        ),
        "the client runs on the same machine as the services and competes for its CPUs".into(),
    ];
    for backend in &cfg.backends {
        let report = run_backend(cfg, backend)
            .await
            .with_context(|| format!("benchmarking on {}", backend.name()))?;
        notes.push(format!("{}: {}", report.backend, report.writes_source));
        backends.push(report);
    }
    Ok(BenchReport {
        orders: cfg.orders,
        connections: cfg.connections,
        warehouse_delay_ms: cfg.warehouse_delay.as_millis() as u64,
        client_idempotency_keys: cfg.client_keys,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_start,
        load_end: loadavg(),
        backends,
        notes,
    })
}

async fn run_backend(cfg: &BenchConfig, backend: &BenchBackend) -> anyhow::Result<BackendReport> {
    let say = |what: String| {
        if cfg.progress {
            eprintln!("[{}] {what}", backend.name());
        }
    };
    let mut levels: Vec<CeilingLevel> = ceiling_levels(cfg.connections)
        .into_iter()
        .map(|connections| CeilingLevel {
            connections,
            tx_per_s: 0.0,
            runs_tx_per_s: Vec::new(),
        })
        .collect();
    let measure = |levels: &mut Vec<CeilingLevel>| {
        let levels = std::mem::take(levels);
        async move {
            let mut out = Vec::new();
            for mut l in levels {
                let r = ceiling(cfg, backend, l.connections)
                    .await
                    .with_context(|| format!("ceiling at {} connections", l.connections))?;
                say(format!(
                    "ceiling at {} connections: {r:.0} tx/s",
                    l.connections
                ));
                l.runs_tx_per_s.push(r);
                out.push(l);
            }
            anyhow::Ok(out)
        }
    };
    levels = measure(&mut levels).await?;
    // Each mode is bracketed by runs at the best level so far: the one
    // before it is the previous mode's after (or the first full round's),
    // the one after the last mode is the closing full round's.
    let (bracket_at, mut before) = levels
        .iter()
        .filter_map(|l| Some((l.connections, *l.runs_tx_per_s.first()?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((SERVICE_POOL, 0.0));
    let mut modes = Vec::new();
    let mut statements = None;
    for (i, mode) in cfg.modes.iter().enumerate() {
        say(format!("{mode}: {} orders", cfg.orders));
        let (mut report, pss) = run_mode(cfg, backend, *mode)
            .await
            .with_context(|| format!("mode {mode}"))?;
        statements = statements.or(pss);
        report.ceiling = ModeCeiling {
            connections: bracket_at,
            runs_tx_per_s: vec![before],
            tx_per_s: 0.0,
        };
        if i + 1 < cfg.modes.len() {
            let after = ceiling(cfg, backend, bracket_at)
                .await
                .with_context(|| format!("ceiling at {bracket_at} connections after {mode}"))?;
            say(format!(
                "ceiling at {bracket_at} connections: {after:.0} tx/s"
            ));
            report.ceiling.runs_tx_per_s.push(after);
            before = after;
        }
        say(format!(
            "{mode}: ingest {:.0} req/s (p99 {:.1} ms), end to end {:.0} orders/s{}",
            report.ingest.req_per_s,
            report.ingest.p99_ms.unwrap_or(0.0),
            report.e2e.orders_per_s,
            if report.e2e.complete {
                String::new()
            } else {
                format!(
                    " (INCOMPLETE: {}/{} shipped)",
                    report.e2e.shipped, report.e2e.orders_in_db
                )
            }
        ));
        modes.push(report);
    }
    levels = measure(&mut levels).await?;
    let closing = levels
        .iter()
        .find(|l| l.connections == bracket_at)
        .and_then(|l| l.runs_tx_per_s.last().copied());
    if let (Some(last), Some(r)) = (modes.last_mut(), closing) {
        last.ceiling.runs_tx_per_s.push(r);
    }
    for m in &mut modes {
        m.ceiling.tx_per_s = mean(&m.ceiling.runs_tx_per_s);
    }
    for l in &mut levels {
        l.tx_per_s = mean(&l.runs_tx_per_s);
    }
    let best = levels
        .iter()
        .max_by(|a, b| a.tx_per_s.total_cmp(&b.tx_per_s))
        .map_or((0.0, 0), |l| (l.tx_per_s, l.connections));
    let writes_source = match backend {
        BenchBackend::Sqlite => "writes n/a: SQLite keeps no commit or statement counters \
             that another process can read (a commit hook sees only its own connection's \
             commits, and the WAL is overwritten after each checkpoint), so they are not \
             counted rather than guessed"
            .to_string(),
        BenchBackend::Postgres(_) if statements == Some(true) => {
            "write tx: COMMIT records in the write-ahead log (pg_walinspect), server-wide; \
             commits: pg_stat_database.xact_commit (read-only transactions included) minus the \
             benchmark's own probes; rows: tup_inserted + tup_updated + tup_deleted; statements: \
             pg_stat_statements calls (BEGIN and COMMIT included)"
                .to_string()
        }
        BenchBackend::Postgres(_) => "write tx: COMMIT records in the write-ahead log \
             (pg_walinspect), server-wide; commits: pg_stat_database.xact_commit (read-only \
             transactions included, e.g. relay polls and feed reads) minus the benchmark's own \
             probes; rows: tup_inserted + tup_updated + tup_deleted; statements n/a: \
             pg_stat_statements is not in shared_preload_libraries (the server's config is \
             left alone)"
            .to_string(),
    };
    let mut report = BackendReport {
        backend: backend.name().into(),
        ceiling: Ceiling {
            tx_per_s: best.0,
            connections: best.1,
            transactions: cfg.ceiling_tx.max(1),
            shape: CEILING_SHAPE.into(),
            levels,
        },
        modes,
        writes_source,
    };
    fill_ratios(&mut report);
    Ok(report)
}

async fn create_database(backend: &BenchBackend) -> anyhow::Result<TestDatabase> {
    Ok(match backend {
        BenchBackend::Sqlite => TestDatabase::create(Backend::Sqlite).await?,
        BenchBackend::Postgres(url) => TestDatabase::create_on(Backend::Postgres, url, "bench")
            .await
            .with_context(|| format!("creating a database on {}", redact(url)))?,
    })
}

/// The ceiling's concurrencies: one connection (SQLite has one writer, and
/// its waiting writers sleep), the services' pool size, and the client's.
pub fn ceiling_levels(connections: usize) -> Vec<usize> {
    let mut v = vec![1, SERVICE_POOL, connections.max(1)];
    v.sort_unstable();
    v.dedup();
    v
}

/// One ceiling run on a fresh database; transactions per second.
async fn ceiling(
    cfg: &BenchConfig,
    backend: &BenchBackend,
    connections: usize,
) -> anyhow::Result<f64> {
    let database = create_database(backend).await?;
    let result = ceiling_on(cfg, &database, connections).await;
    database.cleanup().await;
    result
}

async fn ceiling_on(
    cfg: &BenchConfig,
    database: &TestDatabase,
    connections: usize,
) -> anyhow::Result<f64> {
    let mut opts = DbOptions::new(database.url("ceiling"), "bench_ceiling");
    opts.max_connections = u32::try_from(connections).unwrap_or(u32::MAX);
    let db = Db::connect(&opts).await?;
    db.migrate(sqlx::migrate!("../order-service/migrations"))
        .await?;
    db.migrate_resilience().await?;
    let total = cfg.ceiling_tx.max(1);
    // Every connection is open before the clock starts, as pgbench times
    // it: the pool opens connections on first use, and a short run would
    // otherwise time the connects (and their session settings) too.
    let mut open = Vec::with_capacity(connections);
    for _ in 0..connections {
        open.push(db.pool().acquire().await?);
    }
    drop(open);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..connections {
        let (db, next) = (db.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, sqlx::Error>(());
                }
                ceiling_tx(&db, i).await?;
            }
        });
    }
    let mut failed = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = failed.or(Some(anyhow::Error::from(e))),
            Err(e) => failed = failed.or(Some(anyhow::Error::from(e))),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    db.close().await;
    if let Some(e) = failed {
        return Err(e.context("a ceiling transaction failed"));
    }
    Ok(total as f64 / secs)
}

/// One transaction of the ceiling: rows like the ones `POST /orders` writes
/// in an outbox mode.
async fn ceiling_tx(db: &Db, i: usize) -> Result<(), sqlx::Error> {
    let order_id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    let items = format!(r#"[{{"sku":"SKU-{}","quantity":{}}}]"#, i % 5, 1 + i % 3);
    let body = format!(
        r#"{{"order_id":"{order_id}","customer_id":"bench-customer-{}","items":{items},"delivery_mode":"effectively-once"}}"#,
        i % 17
    );
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO orders (id, customer_id, items, delivery_mode, status, send_attempts, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)",
    )
    .bind(&order_id)
    .bind(format!("bench-customer-{}", i % 17))
    .bind(&items)
    .bind("effectively-once")
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO outbox (id, destination, method, path, headers, body, kind, \
         correlation_id, idempotency_key, status, attempts, next_attempt_at, created_at, \
         updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', 0, $10, $10, $10)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind("http://127.0.0.1:8081")
    .bind("POST")
    .bind("/shipments")
    .bind(r#"{"content-type":"application/json"}"#)
    .bind(body.into_bytes())
    .bind("create-shipment")
    .bind(&order_id)
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// One mode on a fresh cluster and fresh databases. The second value says
/// whether statements could be counted (`None` on SQLite).
async fn run_mode(
    cfg: &BenchConfig,
    backend: &BenchBackend,
    mode: DeliveryMode,
) -> anyhow::Result<(ModeReport, Option<bool>)> {
    let load_start = loadavg();
    let database = create_database(backend).await?;
    let logs = tempfile::tempdir().context("creating a directory for the service logs")?;
    let result = run_mode_on(cfg, &database, &logs, mode).await;
    database.cleanup().await;
    let (mut report, pss) = match result {
        Ok(r) => r,
        // The services' logs are kept for a closer look.
        Err(e) => return Err(e.context(format!("service logs in {}", logs.keep().display()))),
    };
    report.load_start = load_start;
    report.load_end = loadavg();
    Ok((report, pss))
}

async fn run_mode_on(
    cfg: &BenchConfig,
    database: &TestDatabase,
    logs: &tempfile::TempDir,
    mode: DeliveryMode,
) -> anyhow::Result<(ModeReport, Option<bool>)> {
    let mut cluster = crate::cluster::Cluster::start(crate::cluster::ClusterConfig {
        exe: cfg.exe.clone(),
        dir: logs.path().to_path_buf(),
        order_db: database.url("order"),
        shipping_db: database.url("shipping"),
        ports: None,
        admin_token: "bench-admin-token".into(),
        common_args: vec!["--log-format".into(), "json".into()],
        order_args: Vec::new(),
        shipping_args: vec![
            "--warehouse-delay".into(),
            format!("{}ms", cfg.warehouse_delay.as_millis()),
        ],
    })
    .await?;
    let postgres = database.backend() == Backend::Postgres;

    // One connection, so the probes' own transactions are known exactly.
    let mut opts = DbOptions::new(database.url("order"), "order_service");
    opts.max_connections = 1;
    let probe = Db::connect(&opts).await?;
    let own = AtomicU64::new(0);
    let pss = if postgres {
        Some(enable_statements(&probe).await?)
    } else {
        None
    };
    let wal = postgres && enable_walinspect(&probe).await;
    let before = if postgres {
        let mut stats = pg_stats(&probe, pss == Some(true), &own).await?;
        // The tables' counters so far (the services' start-up), on a plain
        // connection of its own.
        let mut conn = sqlx::PgConnection::connect(&database.url("order")).await?;
        stats.tables = pg_tables(&mut conn).await?;
        conn.close().await?;
        Some(stats)
    } else {
        None
    };

    let client_before = cpu_ms(std::process::id());
    let postgres_before = postgres.then(postgres_cpu_ms).flatten();
    let ingest = ingest(cfg, &cluster.order.url(), mode).await?;
    let client_after = cpu_ms(std::process::id());
    let e2e = await_shipped(cfg, &probe, mode, ingest.created, &own).await?;
    let postgres_after = postgres.then(postgres_cpu_ms).flatten();
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let rss = Rss {
        order_kb: cluster.order.pid().and_then(peak_rss_kb),
        shipping_kb: cluster.shipping.pid().and_then(peak_rss_kb),
    };
    let per_order = |ms: Option<f64>| {
        ms.filter(|_| e2e.shipped > 0)
            .map(|ms| ms / e2e.shipped as f64)
    };
    let cpu = Cpu {
        order_ms_per_order: per_order(cluster.order.pid().and_then(cpu_ms)),
        shipping_ms_per_order: per_order(cluster.shipping.pid().and_then(cpu_ms)),
        client_ms_per_order: per_order(delta(client_before, client_after)),
        postgres_ms_per_order: per_order(delta(postgres_before, postgres_after)),
    };
    cluster.stop().await?;
    probe.close().await;

    let writes = match before {
        Some(before) => {
            let since = wal.then_some(before.wal_lsn.as_str());
            let after = pg_stats_after(&database.url("order"), pss == Some(true), since).await?;
            writes_per_order(&before, &after, own.load(Ordering::Relaxed), e2e.shipped)
        }
        None => Writes::default(),
    };
    let report = ModeReport {
        mode: mode.as_str().into(),
        load_start: None,
        load_end: None,
        ingest,
        e2e,
        writes,
        rss,
        cpu,
        ceiling: ModeCeiling::default(),
        ratios: Ratios::default(),
    };
    Ok((report, pss))
}

/// `POST /orders` × `orders`, `connections` at a time.
async fn ingest(cfg: &BenchConfig, order_url: &str, mode: DeliveryMode) -> anyhow::Result<Ingest> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(cfg.connections)
        .build()?;
    let url = Arc::new(format!("{order_url}/orders"));
    let run = uuid::Uuid::new_v4().simple().to_string();
    let next = Arc::new(AtomicUsize::new(0));
    let total = cfg.orders;
    let keys = cfg.client_keys;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..cfg.connections {
        let (http, url, run, next) = (http.clone(), url.clone(), run.clone(), next.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut created = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let body = serde_json::json!({
                    "customer_id": format!("bench-customer-{}", i % 17),
                    "items": [{ "sku": format!("SKU-{}", i % 5), "quantity": 1 + i % 3 }],
                    "delivery_mode": mode,
                });
                let mut req = http.post(url.as_str()).json(&body);
                if keys {
                    req = req.header("idempotency-key", format!("bench-{run}-{i}"));
                }
                let t0 = Instant::now();
                let res = req.send().await;
                let ok = match res {
                    // The body is read, so the connection is reused.
                    Ok(r) => r.status() == reqwest::StatusCode::CREATED && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                latencies.push(t0.elapsed().as_micros() as u64);
                created += usize::from(ok);
            }
            (latencies, created)
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let mut created = 0;
    while let Some(joined) = tasks.join_next().await {
        let (l, c) = joined.context("an ingest task panicked")?;
        latencies.extend(l);
        created += c;
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
    Ok(Ingest {
        sent: latencies.len(),
        created,
        errors: latencies.len() - created,
        secs,
        req_per_s: latencies.len() as f64 / secs,
        p50_ms: ms(percentile(&latencies, 50.0)),
        p99_ms: ms(percentile(&latencies, 99.0)),
        max_ms: ms(latencies.last().copied()),
    })
}

/// Waits until every order of `mode` in order-service's database is
/// `shipped` (or the deadline passes, or nothing ships for `stall`), then
/// reads the end-to-end span.
async fn await_shipped(
    cfg: &BenchConfig,
    probe: &Db,
    mode: DeliveryMode,
    created: usize,
    own: &AtomicU64,
) -> anyhow::Result<EndToEnd> {
    let query = format!(
        "{PROBE} SELECT COUNT(*), COUNT(shipped_at), MIN(created_at), MAX(shipped_at), \
         MAX(created_at) FROM orders WHERE delivery_mode = $1"
    );
    let deadline = Instant::now() + cfg.deadline;
    let mut last = (usize::MAX, Instant::now());
    loop {
        own.fetch_add(1, Ordering::Relaxed);
        let row = sqlx::query(&query)
            .bind(mode.as_str())
            .fetch_one(probe.pool())
            .await?;
        let in_db = usize::try_from(row.try_get::<i64, _>(0)?)?;
        let shipped = usize::try_from(row.try_get::<i64, _>(1)?)?;
        let first: Option<i64> = row.try_get(2)?;
        let end: Option<i64> = row.try_get(3)?;
        let last_created: Option<i64> = row.try_get(4)?;
        let complete = in_db >= created && shipped == in_db;
        if shipped != last.0 {
            last = (shipped, Instant::now());
        }
        let stalled = last.1.elapsed() >= cfg.stall;
        if complete || stalled || Instant::now() >= deadline {
            let secs = match (first, end) {
                (Some(a), Some(b)) => (b - a).max(1) as f64 / 1000.0,
                _ => 0.0,
            };
            return Ok(EndToEnd {
                orders_in_db: in_db,
                shipped,
                complete,
                secs,
                orders_per_s: if secs > 0.0 {
                    shipped as f64 / secs
                } else {
                    0.0
                },
                tail_secs: match (last_created, end) {
                    (Some(a), Some(b)) => (b - a).max(0) as f64 / 1000.0,
                    _ => 0.0,
                },
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counters of one Postgres database.
#[derive(Debug, Clone, Default)]
struct PgStats {
    commits: i64,
    rows: i64,
    /// The write-ahead log's insert position (server-wide).
    wal_lsn: String,
    /// `COMMIT` records since the `before` position (after the mode only).
    wal_commits: Option<i64>,
    statements: Option<i64>,
    commit_statements: Option<i64>,
    /// `schema.table` → (inserted, updated, HOT-updated, deleted).
    tables: Vec<(String, [i64; 4])>,
}

/// Creates `pg_walinspect` (Postgres 15 and later, shipped with the server's
/// contrib modules) in the throwaway database; whether the write-ahead log
/// can be read to count write commits.
async fn enable_walinspect(probe: &Db) -> bool {
    match sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_walinspect SCHEMA public")
        .execute(probe.pool())
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!(error = %e, "pg_walinspect unavailable: write commits not counted");
            false
        }
    }
}

/// `COMMIT` records in the write-ahead log between two positions.
const WAL_COMMITS: &str = "/* bench-probe */ SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) \
     FROM public.pg_get_wal_stats(CAST($1 AS pg_lsn), CAST($2 AS pg_lsn), true) \
     WHERE \"resource_manager/record_type\" = 'Transaction/COMMIT'";

/// Creates `pg_stat_statements` in the (throwaway) database when the server
/// loads it; whether statements can be counted.
async fn enable_statements(probe: &Db) -> anyhow::Result<bool> {
    let loaded: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_settings WHERE name = 'shared_preload_libraries' \
         AND setting LIKE '%pg_stat_statements%'",
    )
    .fetch_one(probe.pool())
    .await?;
    if loaded == 0 {
        return Ok(false);
    }
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
        .execute(probe.pool())
        .await?;
    Ok(true)
}

const PG_STATS: &str = "/* bench-probe */ SELECT CAST(xact_commit AS BIGINT), \
     CAST(tup_inserted + tup_updated + tup_deleted AS BIGINT), \
     CAST(pg_current_wal_lsn() AS TEXT) \
     FROM pg_stat_database WHERE datname = current_database()";

const PG_TABLES: &str = "/* bench-probe */ SELECT schemaname || '.' || relname, \
     CAST(n_tup_ins AS BIGINT), CAST(n_tup_upd AS BIGINT), CAST(n_tup_hot_upd AS BIGINT), \
     CAST(n_tup_del AS BIGINT) FROM pg_stat_user_tables ORDER BY 1";

/// Every table's row counters (`schema.table` → inserted, updated,
/// HOT-updated, deleted). Taken before the orders and after them; the
/// per-order figures are the difference.
async fn pg_tables(conn: &mut sqlx::PgConnection) -> anyhow::Result<Vec<(String, [i64; 4])>> {
    let rows = sqlx::query(PG_TABLES).fetch_all(conn).await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                [r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?],
            ))
        })
        .collect()
}

const PG_STATEMENTS: &str = "/* bench-probe */ SELECT CAST(COALESCE(SUM(s.calls), 0) AS BIGINT), \
     CAST(COALESCE(SUM(s.calls) FILTER (WHERE upper(btrim(s.query)) = 'COMMIT'), 0) AS BIGINT) \
     FROM public.pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
     WHERE d.datname = current_database() AND s.query NOT LIKE '%bench-probe%'";

async fn pg_stats(probe: &Db, statements: bool, own: &AtomicU64) -> anyhow::Result<PgStats> {
    own.fetch_add(1, Ordering::Relaxed);
    let row = sqlx::query(PG_STATS).fetch_one(probe.pool()).await?;
    let mut stats = PgStats {
        commits: row.try_get(0)?,
        rows: row.try_get(1)?,
        wal_lsn: row.try_get(2)?,
        ..PgStats::default()
    };
    if statements {
        own.fetch_add(1, Ordering::Relaxed);
        let row = sqlx::query(PG_STATEMENTS).fetch_one(probe.pool()).await?;
        stats.statements = Some(row.try_get(0)?);
        stats.commit_statements = Some(row.try_get(1)?);
    }
    Ok(stats)
}

/// The counters once the services and the probe have disconnected (a
/// backend flushes its counters when it exits), on a plain connection that
/// runs nothing else.
async fn pg_stats_after(
    url: &str,
    statements: bool,
    since_lsn: Option<&str>,
) -> anyhow::Result<PgStats> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let backends: i64 = sqlx::query_scalar(
            "/* bench-probe */ SELECT CAST(numbackends AS BIGINT) FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await?;
        if backends <= 1 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counters are published at most once a second per backend; an exiting
    // backend publishes its last ones on the way out, just after it leaves
    // numbackends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = sqlx::query(PG_STATS).fetch_one(&mut conn).await?;
    let mut stats = PgStats {
        commits: row.try_get(0)?,
        rows: row.try_get(1)?,
        wal_lsn: row.try_get(2)?,
        ..PgStats::default()
    };
    if statements {
        let row = sqlx::query(PG_STATEMENTS).fetch_one(&mut conn).await?;
        stats.statements = Some(row.try_get(0)?);
        stats.commit_statements = Some(row.try_get(1)?);
    }
    stats.tables = pg_tables(&mut conn).await?;
    if let Some(since) = since_lsn {
        stats.wal_commits = Some(
            sqlx::query_scalar(WAL_COMMITS)
                .bind(since)
                .bind(&stats.wal_lsn)
                .fetch_one(&mut conn)
                .await?,
        );
    }
    conn.close().await?;
    Ok(stats)
}

fn writes_per_order(before: &PgStats, after: &PgStats, own: u64, delivered: usize) -> Writes {
    if delivered == 0 {
        return Writes::default();
    }
    let per = |d: i64| d.max(0) as f64 / delivered as f64;
    let own = i64::try_from(own).unwrap_or(i64::MAX);
    Writes {
        commits_per_order: Some(per(after.commits - before.commits - own)),
        write_commits_per_order: after.wal_commits.map(per),
        rows_written_per_order: Some(per(after.rows - before.rows)),
        statements_per_order: after
            .statements
            .zip(before.statements)
            .map(|(a, b)| per(a - b)),
        commit_statements_per_order: after
            .commit_statements
            .zip(before.commit_statements)
            .map(|(a, b)| per(a - b)),
        tables: after
            .tables
            .iter()
            .map(|(name, n)| {
                let was = before
                    .tables
                    .iter()
                    .find(|(b, _)| b == name)
                    .map_or([0; 4], |(_, b)| *b);
                (name, [0, 1, 2, 3].map(|i| n[i] - was[i]))
            })
            .filter(|(name, n)| !name.ends_with("._sqlx_migrations") && n.iter().any(|v| *v > 0))
            .map(|(name, [ins, upd, hot, del])| TableWrites {
                table: name.clone(),
                inserted: per(ins),
                updated: per(upd),
                hot_updated: per(hot),
                deleted: per(del),
            })
            .collect(),
    }
}

fn num(v: f64) -> String {
    // Thousands separated by a thin space, as the README's tables do.
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or_else(|| "n/a".into(), |kb| format!("{:.1}", kb as f64 / 1024.0))
}

fn load(l: Option<LoadAvg>) -> String {
    l.map_or_else(|| "n/a".into(), |l| format!("{:.2}", l.one))
}

fn load3(l: Option<LoadAvg>) -> String {
    l.map_or_else(
        || "n/a".into(),
        |l| format!("{:.2} {:.2} {:.2}", l.one, l.five, l.fifteen),
    )
}

/// The report as Markdown tables (one per backend) with a legend.
pub fn render(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench: {} orders per mode, {} connections, warehouse delay {} ms, Idempotency-Key {}; \
         {} CPUs; load {} at start, {} at end",
        report.orders,
        report.connections,
        report.warehouse_delay_ms,
        if report.client_idempotency_keys {
            "on every order"
        } else {
            "off"
        },
        report.cpus,
        load3(report.load_start),
        load3(report.load_end),
    );
    for b in &report.backends {
        let c = &b.ceiling;
        let levels: Vec<String> = c
            .levels
            .iter()
            .map(|l| {
                let runs: Vec<String> = l.runs_tx_per_s.iter().map(|r| num(*r)).collect();
                format!(
                    "{}: {} ({})",
                    l.connections,
                    num(l.tx_per_s),
                    runs.join(" / ")
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "\n{}: ceiling {} tx/s at {} connection{} ({}, {} tx per run; tx/s by connections: {})\n",
            b.backend,
            num(c.tx_per_s),
            c.connections,
            if c.connections == 1 { "" } else { "s" },
            c.shape,
            c.transactions,
            levels.join(", "),
        );
        let _ = writeln!(
            out,
            "| mode | ceiling tx/s | ingest req/s | ÷ ceiling | p50 ms | p99 ms | e2e orders/s | tail s | ÷ ceiling \
             | ÷ at-most-once | write tx/order | commits/order | rows/order \
             | statements/order | CPU ms/order (order / shipping / client / postgres) | RSS order MB \
             | RSS shipping MB | load |"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: \
             | ---: | ---: | ---: | --- |"
        );
        for m in &b.modes {
            let e2e = if m.e2e.complete {
                num(m.e2e.orders_per_s)
            } else {
                format!(
                    "{} ({}/{} shipped)",
                    num(m.e2e.orders_per_s),
                    m.e2e.shipped,
                    m.e2e.orders_in_db
                )
            };
            let ingest = if m.ingest.errors == 0 {
                num(m.ingest.req_per_s)
            } else {
                format!("{} ({} errors)", num(m.ingest.req_per_s), m.ingest.errors)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} / {} / {} / {} | {} | {} | {} → {} |",
                m.mode,
                mode_ceiling(&m.ceiling),
                ingest,
                opt(m.ratios.ingest_to_ceiling, 2),
                opt(m.ingest.p50_ms, 1),
                opt(m.ingest.p99_ms, 1),
                e2e,
                m.e2e.tail_secs,
                opt(m.ratios.e2e_to_ceiling, 2),
                opt(m.ratios.e2e_to_at_most_once, 2),
                opt(m.writes.write_commits_per_order, 2),
                opt(m.writes.commits_per_order, 2),
                opt(m.writes.rows_written_per_order, 2),
                opt(m.writes.statements_per_order, 1),
                opt(m.cpu.order_ms_per_order, 2),
                opt(m.cpu.shipping_ms_per_order, 2),
                opt(m.cpu.client_ms_per_order, 2),
                opt(m.cpu.postgres_ms_per_order, 2),
                mb(m.rss.order_kb),
                mb(m.rss.shipping_kb),
                load(m.load_start),
                load(m.load_end),
            );
        }
        let by_table: Vec<String> = b
            .modes
            .iter()
            .filter(|m| !m.writes.tables.is_empty())
            .map(|m| {
                let t: Vec<String> = m.writes.tables.iter().map(table_writes).collect();
                format!("- {}: {}", m.mode, t.join("; "))
            })
            .collect();
        if !by_table.is_empty() {
            let _ = writeln!(
                out,
                "\nrows per delivered order by table (inserted + updated (of which HOT) + deleted):"
            );
            for line in by_table {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    let _ = writeln!(
        out,
        "\ningest: POST /orders from this process, req/s and latency percentiles; \
         e2e: first order created to last shipped, from order-service's database; \
         tail: last order created to last shipped; \
         ceiling: the commit loop at the best concurrency right before and right after the \
         mode (their mean, then each run); ÷ ceiling: against that mean; \
         ÷ at-most-once: against the baseline mode in the same run; \
         write tx: transactions that wrote (COMMIT records in the write-ahead log), \
         commits: all commits, read-only ones included; \
         commits, rows, statements: per delivered order, both services together; \
         CPU: user + system time per delivered order of each service process over the run, \
         of the bench's own client while it posted, and of all postgres processes; \
         RSS: peak (VmHWM); load: 1-minute load average when the mode started → ended."
    );
    for n in &report.notes {
        let _ = writeln!(out, "- {n}");
    }
    out
}

/// The mean of a ceiling's runs (0 for none).
fn mean(runs: &[f64]) -> f64 {
    runs.iter().sum::<f64>() / runs.len().max(1) as f64
}

/// A mode's ceiling: the mean, then the bracketing runs.
fn mode_ceiling(c: &ModeCeiling) -> String {
    if c.runs_tx_per_s.is_empty() {
        return "n/a".into();
    }
    let runs: Vec<String> = c.runs_tx_per_s.iter().map(|r| num(*r)).collect();
    format!("{} ({})", num(c.tx_per_s), runs.join(" / "))
}

fn table_writes(t: &TableWrites) -> String {
    let mut parts = Vec::new();
    if t.inserted > 0.0 {
        parts.push(format!("ins {:.2}", t.inserted));
    }
    if t.updated > 0.0 {
        parts.push(format!("upd {:.2} (HOT {:.2})", t.updated, t.hot_updated));
    }
    if t.deleted > 0.0 {
        parts.push(format!("del {:.2}", t.deleted));
    }
    format!("{} {}", t.table, parts.join(", "))
}

/// Fails unless the report's counts add up: every order sent was created,
/// is in the database, and shipped.
pub fn check_counts(report: &BenchReport) -> anyhow::Result<()> {
    for b in &report.backends {
        for m in &b.modes {
            let (i, e) = (&m.ingest, &m.e2e);
            if i.created != i.sent || e.orders_in_db != i.created || !e.complete {
                bail!(
                    "{} {}: sent {}, created {}, in the database {}, shipped {}",
                    b.backend,
                    m.mode,
                    i.sent,
                    i.created,
                    e.orders_in_db,
                    e.shipped
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn ratios_refuse_nonsense() {
        assert_eq!(ratio(50.0, 100.0), Some(0.5));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    #[test]
    fn modes_parse_with_all() {
        assert_eq!(parse_modes(&["all".into()]).unwrap(), DeliveryMode::ALL);
        assert_eq!(
            parse_modes(&["at-most-once".into(), " effectively-once".into()]).unwrap(),
            vec![DeliveryMode::AtMostOnce, DeliveryMode::EffectivelyOnce]
        );
        assert!(parse_modes(&["twice".into()]).is_err());
        assert!(parse_modes(&[]).is_err());
    }

    #[test]
    fn proc_files_parse() {
        let l = parse_loadavg("2.15 2.96 2.92 6/199 19903\n").unwrap();
        assert_eq!((l.one, l.five, l.fifteen), (2.15, 2.96, 2.92));
        assert_eq!(parse_loadavg("x"), None);
        let status = "Name:\tdemo\nVmPeak:\t  100 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(20480));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    fn mode(name: &str, ingest: f64, e2e: f64) -> ModeReport {
        ModeReport {
            mode: name.into(),
            load_start: Some(LoadAvg {
                one: 1.5,
                five: 1.0,
                fifteen: 1.0,
            }),
            load_end: None,
            ingest: Ingest {
                sent: 10,
                created: 10,
                req_per_s: ingest,
                p50_ms: Some(1.25),
                p99_ms: Some(9.0),
                ..Ingest::default()
            },
            e2e: EndToEnd {
                orders_in_db: 10,
                shipped: 10,
                complete: true,
                secs: 1.0,
                orders_per_s: e2e,
                tail_secs: 0.25,
            },
            writes: Writes::default(),
            cpu: Cpu::default(),
            rss: Rss {
                order_kb: Some(20480),
                shipping_kb: None,
            },
            ceiling: ModeCeiling::default(),
            ratios: Ratios::default(),
        }
    }

    #[test]
    fn ratio_table_renders_against_ceiling_and_baseline() {
        let mut backend = BackendReport {
            backend: "sqlite".into(),
            ceiling: Ceiling {
                tx_per_s: 2000.0,
                connections: 1,
                transactions: 100,
                shape: CEILING_SHAPE.into(),
                levels: vec![
                    CeilingLevel {
                        connections: 1,
                        tx_per_s: 2000.0,
                        runs_tx_per_s: vec![1900.0, 2100.0],
                    },
                    CeilingLevel {
                        connections: 4,
                        tx_per_s: 500.0,
                        runs_tx_per_s: vec![500.0, 500.0],
                    },
                ],
            },
            modes: vec![
                mode("at-most-once", 1000.0, 400.0),
                mode("effectively-once", 500.0, 300.0),
            ],
            writes_source: "n/a".into(),
        };
        // The second mode has its own bracketing runs; the first has none
        // and falls back to the whole run's ceiling.
        backend.modes[1].ceiling = ModeCeiling {
            connections: 1,
            runs_tx_per_s: vec![2400.0, 2600.0],
            tx_per_s: 2500.0,
        };
        fill_ratios(&mut backend);
        let eo = &backend.modes[1].ratios;
        assert_eq!(eo.ingest_to_ceiling, Some(0.2));
        assert_eq!(eo.e2e_to_ceiling, Some(0.12));
        assert_eq!(backend.modes[0].ratios.ingest_to_ceiling, Some(0.5));
        assert_eq!(eo.e2e_to_at_most_once, Some(0.75));
        assert_eq!(backend.modes[0].ratios.e2e_to_at_most_once, Some(1.0));

        let report = BenchReport {
            orders: 10,
            connections: 4,
            warehouse_delay_ms: 10,
            client_idempotency_keys: true,
            cpus: 2,
            load_start: None,
            load_end: None,
            backends: vec![backend],
            notes: vec!["a note".into()],
        };
        let text = render(&report);
        assert!(
            text.contains("sqlite: ceiling 2 000 tx/s at 1 connection ("),
            "{text}"
        );
        assert!(
            text.contains("tx/s by connections: 1: 2 000 (1 900 / 2 100), 4: 500 (500 / 500)"),
            "{text}"
        );
        assert!(
            text.contains(
                "| effectively-once | 2 500 (2 400 / 2 600) | 500 | 0.20 | 1.2 | 9.0 | 300 | 0.25 \
                 | 0.12 | 0.75 | n/a | n/a \
                 | n/a | n/a | n/a / n/a / n/a / n/a | 20.0 | n/a | 1.50 → n/a |"
            ),
            "{text}"
        );
        assert!(text.contains("- a note"), "{text}");
        // Every row has as many cells as the header.
        let cells = |l: &str| l.matches('|').count();
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| cells(r) == cells(rows[0])), "{text}");

        // Without an at-most-once row there is no baseline.
        let mut b = report.backends[0].clone();
        b.modes.remove(0);
        fill_ratios(&mut b);
        assert_eq!(b.modes[0].ratios.e2e_to_at_most_once, None);
    }

    #[test]
    fn ceiling_levels_are_distinct_and_sorted() {
        assert_eq!(ceiling_levels(32), vec![1, 8, 32]);
        assert_eq!(ceiling_levels(8), vec![1, 8]);
        assert_eq!(ceiling_levels(0), vec![1, 8]);
        assert_eq!(ceiling_levels(4), vec![1, 4, 8]);
    }

    #[test]
    fn cpu_time_parses_past_a_command_with_spaces() {
        let stat = "4242 (tokio rt) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ms(stat), Some(3000.0));
        assert_eq!(parse_cpu_ms("4242 (x) S 1"), None);
        assert_eq!(parse_cpu_ms_with_children(stat), Some(3000.0));
        let postmaster = "7 (postgres) S 1 7 7 0 -1 0 0 0 0 0 10 10 500 480 20 0 9 0";
        assert_eq!(parse_cpu_ms_with_children(postmaster), Some(10000.0));
    }

    #[test]
    fn numbers_group_thousands() {
        assert_eq!(num(0.4), "0");
        assert_eq!(num(999.0), "999");
        assert_eq!(num(1234.0), "1 234");
        assert_eq!(num(1234567.0), "1 234 567");
    }

    #[test]
    fn writes_subtract_the_probes() {
        let before = PgStats {
            commits: 100,
            rows: 0,
            wal_lsn: "0/1000".into(),
            wal_commits: None,
            statements: Some(10),
            commit_statements: Some(1),
            // Start-up writes, before the orders: left out.
            tables: vec![("app.outbox".into(), [0, 10, 10, 0])],
        };
        let after = PgStats {
            commits: 1110,
            rows: 500,
            wal_lsn: "0/2000".into(),
            wal_commits: Some(300),
            statements: Some(2010),
            commit_statements: Some(301),
            tables: vec![
                ("app._sqlx_migrations".into(), [7, 0, 0, 0]),
                ("app.idle".into(), [0, 0, 0, 0]),
                ("app.outbox".into(), [100, 210, 60, 0]),
                ("app.keys".into(), [0, 0, 0, 30]),
            ],
        };
        let w = writes_per_order(&before, &after, 10, 100);
        assert_eq!(w.commits_per_order, Some(10.0));
        assert_eq!(w.write_commits_per_order, Some(3.0));
        assert_eq!(w.rows_written_per_order, Some(5.0));
        assert_eq!(w.statements_per_order, Some(20.0));
        assert_eq!(w.commit_statements_per_order, Some(3.0));
        // Per table, without the migrations' history and untouched tables.
        assert_eq!(
            w.tables,
            vec![
                TableWrites {
                    table: "app.outbox".into(),
                    inserted: 1.0,
                    updated: 2.0,
                    hot_updated: 0.5,
                    deleted: 0.0,
                },
                TableWrites {
                    table: "app.keys".into(),
                    inserted: 0.0,
                    updated: 0.0,
                    hot_updated: 0.0,
                    deleted: 0.3,
                },
            ]
        );
        assert_eq!(
            table_writes(&w.tables[0]),
            "app.outbox ins 1.00, upd 2.00 (HOT 0.50)"
        );
        assert_eq!(
            writes_per_order(&before, &after, 0, 0).commits_per_order,
            None
        );
    }
}
