//! `demo bench`, tiny: 100 orders through two modes on SQLite, real
//! processes. Its JSON carries every figure, and the counts read from the
//! database match the orders sent.

use std::time::{Duration, Instant};

use demo::bench::{BenchBackend, BenchConfig};
use service_kit::DeliveryMode;

const EXE: &str = env!("CARGO_BIN_EXE_svc");

const ORDERS: usize = 100;

/// Every field of the JSON (`null` where a figure is n/a on SQLite).
const TOP: &[&str] = &[
    "/orders",
    "/connections",
    "/warehouse_delay_ms",
    "/client_idempotency_keys",
    "/cpus",
    "/load_start/one",
    "/load_end/one",
    "/notes",
    "/backends/0/backend",
    "/backends/0/writes_source",
    "/backends/0/ceiling/tx_per_s",
    "/backends/0/ceiling/connections",
    "/backends/0/ceiling/transactions",
    "/backends/0/ceiling/shape",
    "/backends/0/ceiling/levels/0/connections",
    "/backends/0/ceiling/levels/0/tx_per_s",
    "/backends/0/ceiling/levels/0/runs_tx_per_s/1",
];
const PER_MODE: &[&str] = &[
    "/mode",
    "/load_start/one",
    "/load_end/fifteen",
    "/ingest/sent",
    "/ingest/created",
    "/ingest/errors",
    "/ingest/secs",
    "/ingest/req_per_s",
    "/ingest/p50_ms",
    "/ingest/p99_ms",
    "/ingest/max_ms",
    "/e2e/orders_in_db",
    "/e2e/shipped",
    "/e2e/complete",
    "/e2e/secs",
    "/e2e/orders_per_s",
    "/writes/commits_per_order",
    "/writes/rows_written_per_order",
    "/writes/statements_per_order",
    "/writes/commit_statements_per_order",
    "/rss/order_kb",
    "/rss/shipping_kb",
    "/ceiling/connections",
    "/ceiling/tx_per_s",
    "/ceiling/runs_tx_per_s",
    "/ratios/ingest_to_ceiling",
    "/ratios/e2e_to_ceiling",
    "/ratios/e2e_to_at_most_once",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_every_figure_and_counts_match_the_orders_sent() -> anyhow::Result<()> {
    let mut cfg = BenchConfig::new(EXE.into());
    cfg.orders = ORDERS;
    cfg.connections = 8;
    cfg.modes = vec![DeliveryMode::AtMostOnce, DeliveryMode::EffectivelyOnce];
    cfg.backends = vec![BenchBackend::Sqlite];
    cfg.ceiling_tx = 200;
    cfg.deadline = Duration::from_secs(20);
    cfg.stall = Duration::from_secs(10);
    cfg.progress = false;
    let started = Instant::now();
    let report = demo::bench::run(&cfg).await?;
    eprintln!(
        "{}\n(took {:.1} s)",
        demo::bench::render(&report),
        started.elapsed().as_secs_f64()
    );
    demo::bench::check_counts(&report)?;

    let json = serde_json::to_value(&report)?;
    for path in TOP {
        assert!(json.pointer(path).is_some(), "no {path} in {json:#}");
    }
    let backend = &json["backends"][0];
    assert_eq!(backend["backend"], "sqlite");
    assert!(backend["ceiling"]["tx_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    let modes = backend["modes"].as_array().expect("modes");
    assert_eq!(modes.len(), 2);
    for (m, want) in modes.iter().zip(["at-most-once", "effectively-once"]) {
        for path in PER_MODE {
            assert!(m.pointer(path).is_some(), "no {path} in {m:#}");
        }
        assert_eq!(m["mode"], want);
        // The database holds exactly the orders sent, and all shipped.
        assert_eq!(m["ingest"]["sent"], ORDERS);
        assert_eq!(m["ingest"]["created"], ORDERS);
        assert_eq!(m["ingest"]["errors"], 0);
        assert_eq!(m["e2e"]["orders_in_db"], ORDERS, "{m:#}");
        assert_eq!(m["e2e"]["shipped"], ORDERS, "{m:#}");
        assert_eq!(m["e2e"]["complete"], true);
        for figure in [
            "/ingest/req_per_s",
            "/ingest/p99_ms",
            "/e2e/orders_per_s",
            "/ratios/ingest_to_ceiling",
            "/ratios/e2e_to_ceiling",
            "/ratios/e2e_to_at_most_once",
        ] {
            let v = m.pointer(figure).and_then(|v| v.as_f64()).unwrap_or(0.0);
            assert!(v > 0.0, "{want}: {figure} = {v}");
        }
        assert!(m["rss"]["order_kb"].as_u64().unwrap_or(0) > 0);
        assert!(m["rss"]["shipping_kb"].as_u64().unwrap_or(0) > 0);
        // SQLite has no commit counter another process can read: n/a, not 0.
        assert!(m["writes"]["commits_per_order"].is_null());
    }
    assert_eq!(modes[0]["ratios"]["e2e_to_at_most_once"], 1.0);
    // Each mode is bracketed by two ceiling runs (the first mode's "after"
    // is the second's "before"), and its ratios are against their mean.
    let brackets: Vec<Vec<f64>> = modes
        .iter()
        .map(|m| {
            m["ceiling"]["runs_tx_per_s"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
                .unwrap_or_default()
        })
        .collect();
    assert!(brackets.iter().all(|b| b.len() == 2), "{brackets:?}");
    assert_eq!(brackets[0][1], brackets[1][0], "{brackets:?}");
    for m in modes {
        let c = m["ceiling"]["tx_per_s"].as_f64().unwrap_or(0.0);
        let runs = m["ceiling"]["runs_tx_per_s"].as_array().map_or(0.0, |a| {
            a.iter().filter_map(|v| v.as_f64()).sum::<f64>() / a.len() as f64
        });
        assert!(c > 0.0 && (c - runs).abs() < 1e-6, "{m:#}");
        let ingest = m["ingest"]["req_per_s"].as_f64().unwrap_or(0.0);
        let r = m["ratios"]["ingest_to_ceiling"].as_f64().unwrap_or(0.0);
        assert!((r - ingest / c).abs() < 1e-9, "{m:#}");
    }
    Ok(())
}
