//! The lab's scenarios, smaller: real processes SIGKILLed and restarted at
//! seeded random moments, a shipping outage, dropped requests and lost
//! responses, and on Postgres a restart of the database server; then the
//! invariant table of DESIGN.md, counted from both databases, per mode.
//!
//! The database restart runs `TEST_POSTGRES_RESTART_CMD` (default:
//! `pg_ctlcluster --skip-systemctl-redirect <version> main restart`, the
//! local server of this machine kind). It lives in this test binary alone,
//! so no other test is talking to the server when it goes down (cargo runs
//! test binaries one after another).

use std::time::Duration;

use anyhow::ensure;
use demo::lab::{FaultProfile, Lab, LabConfig, LabReport, Storage};
use service_kit::testing::postgres_admin_url;
use service_kit::DeliveryMode;

const EXE: &str = env!("CARGO_BIN_EXE_svc");

fn small(seed: u64, storage: Storage) -> LabConfig {
    let mut cfg = LabConfig::new(EXE.into());
    cfg.orders = 40;
    cfg.seed = seed;
    cfg.rate = 30.0; // 240 orders: 8 s of traffic
    cfg.faults = FaultProfile {
        drop_request: 0.1,
        drop_response: 0.1,
        ..FaultProfile::NONE
    };
    cfg.outage = Duration::from_millis(1500);
    cfg.kill_interval = Some(Duration::from_millis(1500));
    cfg.settle_timeout = Duration::from_secs(60);
    cfg.storage = storage;
    cfg.progress = false;
    cfg
}

async fn run(cfg: LabConfig) -> anyhow::Result<LabReport> {
    let seed = cfg.seed;
    eprintln!("chaos seed {seed}");
    let lab = Lab::start(cfg).await?;
    let report = lab.run().await;
    let logs = lab.log_paths().await;
    if let Ok(r) = &report {
        print_logs_of(&r.evidence, &logs);
    }
    lab.shutdown(false).await?;
    let report = report.map_err(|e| e.context(format!("seed {seed}; logs {logs:?}")))?;
    eprintln!("{}", demo::report::render(&report));
    Ok(report)
}

/// The services' log lines that mention an order or shipment of the
/// evidence (there is evidence only when an invariant broke).
fn print_logs_of(evidence: &[String], logs: &[std::path::PathBuf]) {
    let ids: Vec<&str> = evidence
        .iter()
        .flat_map(|story| story.split(|c: char| !(c.is_ascii_hexdigit() || c == '-')))
        .filter(|t| uuid::Uuid::parse_str(t).is_ok())
        .collect();
    if ids.is_empty() {
        return;
    }
    for path in logs {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        eprintln!("--- {} (lines about {} ids)", path.display(), ids.len());
        for line in text.lines().filter(|l| ids.iter().any(|id| l.contains(id))) {
            eprintln!("{line}");
        }
    }
}

/// The table of DESIGN.md, row by row, plus: the chaos really happened.
fn check(report: &LabReport, expect_orders: usize) -> anyhow::Result<()> {
    let seed = report.seed;
    ensure!(report.settled, "seed {seed}: delivery did not settle");
    ensure!(
        report.violations.is_empty(),
        "seed {seed}: {:?}",
        report.violations
    );
    ensure!(
        report.client_gave_up == 0,
        "seed {seed}: orders never accepted"
    );
    let kills = |who: &str| {
        report
            .events
            .iter()
            .filter(|e| e.what.contains("SIGKILL") && e.what.contains(who))
            .count()
    };
    ensure!(
        kills("order-service") > 0 && kills("shipping-service") > 0,
        "seed {seed}: the schedule must kill both services: {:?}",
        report.events
    );
    for row in &report.rows {
        let Some(mode) = row.mode.as_deref() else {
            continue;
        };
        ensure!(row.orders == expect_orders, "seed {seed}: {row:?}");
        let mode: DeliveryMode = mode.parse()?;
        if mode.promises_no_loss() {
            ensure!(
                row.lost == 0 && row.unacknowledged == 0,
                "seed {seed}: {row:?}"
            );
        }
        if mode.promises_no_duplicates() {
            ensure!(row.duplicated == 0, "seed {seed}: {row:?}");
        }
        if mode.promises_no_loss() && mode.promises_no_duplicates() {
            ensure!(row.shipments == expect_orders, "seed {seed}: {row:?}");
        }
    }
    ensure!(
        report.rows.iter().filter(|r| r.mode.is_some()).count() == DeliveryMode::ALL.len(),
        "seed {seed}: a row per mode expected: {:?}",
        report.rows
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_all_modes_under_kills_outage_and_faults() -> anyhow::Result<()> {
    let report = run(small(1001, Storage::Sqlite)).await?;
    check(&report, 40)?;
    // The contrast is visible even in a small run: at-most-once lost some.
    let amo = report
        .rows
        .iter()
        .find(|r| r.mode.as_deref() == Some("at-most-once"));
    ensure!(
        amo.is_some_and(|r| r.lost > 0),
        "seed 1001: at-most-once should lose under this profile: {amo:?}"
    );
    Ok(())
}

fn postgres_restart_cmd() -> String {
    std::env::var("TEST_POSTGRES_RESTART_CMD").unwrap_or_else(|_| {
        "pg_ctlcluster --skip-systemctl-redirect \"$(ls /etc/postgresql | head -n 1)\" main restart"
            .into()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_all_modes_under_kills_outage_faults_and_a_database_restart() -> anyhow::Result<()>
{
    let mut cfg = small(2002, Storage::Postgres(postgres_admin_url()));
    cfg.db_restart = Some(postgres_restart_cmd());
    let report = run(cfg).await?;
    ensure!(
        report.events.iter().any(|e| e.what.contains("database")),
        "the database restart did not happen: {:?}",
        report.events
    );
    check(&report, 40)
}
