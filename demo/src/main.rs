//! `cargo run --release -p demo`: the lab. See the README and `--help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use demo::bench::{BenchBackend, BenchConfig};
use demo::lab::{FaultProfile, Lab, LabConfig, Storage};
use service_kit::DeliveryMode;

/// The admin token of the lab's services unless one is given.
const DEFAULT_ADMIN_TOKEN: &str = "lab-admin-token";

/// The same orders, under the same faults, through each delivery mode:
/// both services as real processes, SIGKILLed and restarted at random
/// moments, and what was lost and duplicated counted from their databases.
#[derive(Debug, Parser)]
#[command(name = "demo", version, args_conflicts_with_subcommands = true)]
struct Args {
    /// Something else than the lab.
    #[command(subcommand)]
    command: Option<Command>,

    /// Orders per mode.
    #[arg(long, default_value_t = 300)]
    orders: usize,

    /// Modes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = DeliveryMode::ALL)]
    modes: Vec<DeliveryMode>,

    /// Seed of every random choice: faults, kill times, kill targets.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Probability that a service-to-service request is dropped before the peer sees it.
    #[arg(long, default_value_t = 0.1)]
    drop_request: f64,

    /// Probability that a response is lost after the peer processed the request.
    #[arg(long, default_value_t = 0.1)]
    drop_response: f64,

    /// Probability that a call is answered 503 without reaching the peer.
    #[arg(long, default_value_t = 0.0)]
    error_503: f64,

    /// Probability that a call is delayed by --latency first.
    #[arg(long, default_value_t = 0.0)]
    latency_rate: f64,

    /// The added latency (past the 2 s request timeout, the call times out).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,

    /// How long shipping-service is down, a third of the way in (0s: no outage).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    outage: Duration,

    /// Mean time between SIGKILLs of a random service (0s: no kills).
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    kill_interval: Duration,

    /// Orders sent per second, all modes together.
    #[arg(long, default_value_t = 30.0)]
    rate: f64,

    /// Longest wait for delivery to settle once the faults stop.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    settle_timeout: Duration,

    /// Run on this Postgres server (a fresh database is created and dropped)
    /// instead of SQLite files in a temporary directory.
    #[arg(long, value_name = "postgres://...")]
    database: Option<String>,

    /// A shell command that restarts the database server, run once two thirds
    /// of the way in (e.g. with --database: "pg_ctlcluster 15 main restart").
    #[arg(long)]
    db_restart_cmd: Option<String>,

    /// Print the result as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,

    /// Also write the result as one self-contained HTML file: the table and,
    /// per mode, a timeline of orders, shipments and acknowledgements with
    /// the faults on the same axis.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,

    /// Leave the stack running afterwards on fixed ports, for curl, until Ctrl-C.
    #[arg(long)]
    serve: bool,

    /// Keep the service logs and the databases (SQLite files or the Postgres
    /// database) after the run, and print where they are.
    #[arg(long)]
    keep: bool,

    /// order-service's port with --serve.
    #[arg(long, default_value_t = 8080)]
    order_port: u16,

    /// shipping-service's port with --serve.
    #[arg(long, default_value_t = 8081)]
    shipping_port: u16,

    /// Admin token of both services (for /admin/faults with --serve).
    #[arg(
        long,
        env = "ADMIN_TOKEN",
        default_value = DEFAULT_ADMIN_TOKEN,
        hide_env_values = true
    )]
    admin_token: String,

    /// Hide the progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The end-to-end benchmark: faults off, each mode on a fresh cluster,
    /// ingest and end-to-end rates against the database's commit ceiling
    /// measured in the same run (see the README).
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Orders per mode.
    #[arg(long, default_value_t = 10000)]
    orders: usize,

    /// Concurrent connections posting orders; also the ceiling loop's tasks
    /// (each with a pooled connection of its own).
    #[arg(long, default_value_t = 32)]
    connections: usize,

    /// Modes, comma-separated, or `all` for all six.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "at-most-once,at-least-once,effectively-once,pull-effectively-once"
    )]
    modes: Vec<String>,

    /// shipping-service's packing time; small, so delivery is what is measured.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    warehouse_delay: Duration,

    /// Also run on this Postgres server (a fresh database per mode, dropped
    /// afterwards). Without it, Postgres runs when TEST_POSTGRES_URL (default
    /// postgres://postgres@127.0.0.1:5432/postgres) answers within 3 s.
    #[arg(long, value_name = "postgres://...")]
    database: Option<String>,

    /// SQLite only, even if a Postgres server answers.
    #[arg(long, conflicts_with = "database")]
    sqlite_only: bool,

    /// Postgres only (the server of --database, or TEST_POSTGRES_URL's);
    /// fails when none answers.
    #[arg(long, conflicts_with = "sqlite_only")]
    postgres_only: bool,

    /// Longest wait, per mode, for every order to ship.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    deadline: Duration,

    /// Stop waiting when no order shipped for this long.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    stall: Duration,

    /// Transactions per ceiling run.
    #[arg(long, default_value_t = 5000)]
    ceiling_tx: usize,

    /// Send orders without an Idempotency-Key (by default each carries its own).
    #[arg(long)]
    no_key: bool,

    /// Print the result as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,

    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // The same executable runs the services the lab starts.
    if let Some(served) = demo::cluster::serve_main(&argv) {
        return match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut args = Args::parse();
    if matches!(args.command, Some(Command::Bench(_))) && std::env::var_os("RUST_LOG").is_none() {
        // The services inherit it (set before any thread starts).
        std::env::set_var("RUST_LOG", demo::bench::SERVICE_LOG_FILTER);
    }
    let run = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| {
            rt.block_on(async move {
                match args.command.take() {
                    Some(Command::Bench(b)) => bench(b).await,
                    None => lab(args).await,
                }
            })
        });
    match run {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark; `Ok(false)` when a mode did not deliver every order.
async fn bench(args: BenchArgs) -> anyhow::Result<bool> {
    let exe: PathBuf = std::env::current_exe().context("locating the executable")?;
    let mut cfg = BenchConfig::new(exe);
    cfg.orders = args.orders;
    cfg.connections = args.connections;
    cfg.modes = demo::bench::parse_modes(&args.modes)?;
    cfg.warehouse_delay = args.warehouse_delay;
    cfg.deadline = args.deadline;
    cfg.stall = args.stall;
    cfg.ceiling_tx = args.ceiling_tx;
    cfg.client_keys = !args.no_key;
    cfg.progress = !args.quiet;
    cfg.backends = vec![BenchBackend::Sqlite];
    let skipped = match &args.database {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            cfg.backends.push(BenchBackend::Postgres(url.clone()));
            None
        }
        Some(other) => anyhow::bail!("--database must be a postgres:// URL, not {other:?}"),
        None if args.sqlite_only => Some("Postgres not run (--sqlite-only)".to_string()),
        None if args.postgres_only => {
            let url = service_kit::testing::postgres_admin_url();
            anyhow::ensure!(
                demo::bench::postgres_answers(&url).await,
                "--postgres-only: nothing answered at {}",
                resilience::store::redact(&url)
            );
            cfg.backends.push(BenchBackend::Postgres(url));
            None
        }
        None => {
            let url = service_kit::testing::postgres_admin_url();
            if demo::bench::postgres_answers(&url).await {
                cfg.backends.push(BenchBackend::Postgres(url));
                None
            } else {
                let why = format!(
                    "Postgres not run: nothing answered at {} (--database names a server)",
                    resilience::store::redact(&url)
                );
                eprintln!("{why}");
                Some(why)
            }
        }
    };
    if args.postgres_only {
        cfg.backends
            .retain(|b| matches!(b, BenchBackend::Postgres(_)));
    }
    let mut report = demo::bench::run(&cfg).await?;
    report.notes.extend(skipped);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", demo::bench::render(&report));
    }
    match demo::bench::check_counts(&report) {
        Ok(()) => Ok(true),
        Err(e) => {
            eprintln!("incomplete: {e}");
            Ok(false)
        }
    }
}

/// Runs the lab; `Ok(false)` when a hardened mode broke its invariant.
async fn lab(args: Args) -> anyhow::Result<bool> {
    let exe: PathBuf = std::env::current_exe().context("locating the lab's executable")?;
    let mut cfg = LabConfig::new(exe);
    cfg.orders = args.orders;
    cfg.modes = args.modes.clone();
    anyhow::ensure!(!cfg.modes.is_empty(), "--modes names no mode");
    cfg.seed = args.seed;
    cfg.faults = FaultProfile {
        drop_request: args.drop_request,
        drop_response: args.drop_response,
        error_503: args.error_503,
        latency_rate: args.latency_rate,
        latency: args.latency,
    };
    cfg.outage = args.outage;
    cfg.kill_interval = Some(args.kill_interval);
    cfg.db_restart = args.db_restart_cmd.clone();
    cfg.rate = args.rate;
    cfg.settle_timeout = args.settle_timeout;
    cfg.storage = match &args.database {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Storage::Postgres(url.clone())
        }
        Some(other) => anyhow::bail!("--database must be a postgres:// URL, not {other:?}"),
        None => Storage::Sqlite,
    };
    cfg.ports = args.serve.then_some((args.order_port, args.shipping_port));
    cfg.admin_token = args.admin_token.clone();
    cfg.progress = !args.quiet;

    eprintln!(
        "starting order-service and shipping-service ({} orders per mode: {})",
        cfg.orders,
        cfg.modes
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let lab = Lab::start(cfg).await?;
    let report = match lab.run().await {
        Ok(r) => r,
        Err(e) => {
            say_kept(lab.shutdown(args.keep).await.ok().flatten(), true);
            return Err(e);
        }
    };
    if let Some(path) = &args.report {
        if let Err(e) = write_report(&lab, &report, path).await {
            say_kept(lab.shutdown(args.keep).await.ok().flatten(), true);
            return Err(e);
        }
        eprintln!("report written to {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", demo::report::render(&report));
    }
    let ok = report.violations.is_empty();

    if args.serve {
        // A token the user chose is a secret and is not echoed; the
        // built-in default is public anyway.
        let token = if args.admin_token == DEFAULT_ADMIN_TOKEN {
            DEFAULT_ADMIN_TOKEN
        } else {
            "(as given by --admin-token / ADMIN_TOKEN)"
        };
        eprintln!(
            "\nThe stack is running (faults off; Ctrl-C stops it):\n  \
             order-service     {}\n  shipping-service  {}\n  admin token       {token}\n\
             Try: curl -s {}/orders?limit=3\n     \
             curl -s {}/admin/faults -H 'authorization: Bearer <admin token>'",
            lab.order_url, lab.shipping_url, lab.order_url, lab.order_url
        );
        if let Some(db) = lab.postgres_database() {
            let fate = if args.keep { "kept" } else { "dropped" };
            eprintln!("  Postgres database {db} ({fate} on exit)");
        }
        service_kit::shutdown_signal().await;
        eprintln!("stopping");
    }
    say_kept(lab.shutdown(args.keep).await?, !ok);
    Ok(ok)
}

/// The HTML report, with the timelines read from the databases now (before
/// `--serve` lets other orders in).
async fn write_report(
    lab: &Lab,
    report: &demo::lab::LabReport,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let (order_db, shipping_db) = lab.databases();
    // Right after the run: with --serve, orders sent later by hand would be
    // counted too.
    let timelines = demo::html::timelines(order_db, shipping_db, report.started_at_ms).await?;
    let html = demo::html::render(report, &timelines)?;
    std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))
}

/// Where `--keep` left the lab's state; after a failure without it, that it exists.
fn say_kept(kept: Option<String>, failed: bool) {
    match kept {
        Some(kept) => eprintln!("kept: {kept}"),
        None if failed => {
            eprintln!("(the logs and databases are removed; --keep leaves them for a closer look)")
        }
        None => {}
    }
}
