//! The lab's table, and what each row means.

use std::fmt::Write as _;

use crate::audit::Invariants;
use crate::lab::LabReport;

fn ms(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v} ms"))
}

pub(crate) fn verdict(inv: &Invariants) -> &'static str {
    match inv.mode.as_deref() {
        None => "",
        Some(_) if !crate::audit::violations(inv).is_empty() => "BROKEN",
        Some("at-most-once") if inv.lost > 0 || inv.unacknowledged > 0 => "loses (as designed)",
        Some("memory-dedupe") if inv.duplicated > 0 => "forgot keys on restart (as designed)",
        Some(_) if inv.duplicated > 0 => "duplicates (as designed)",
        Some(_) => "exactly the orders sent",
    }
}

/// The report as a text table with a header and a legend.
pub fn render(report: &LabReport) -> String {
    let mut out = String::new();
    let f = &report.faults;
    let _ = writeln!(
        out,
        "lab: seed {}, {}, faults: {:.0}% requests dropped, {:.0}% responses lost, {:.0}% 503, \
         {:.0}% +{} ms; shipping outage {:.1} s",
        report.seed,
        report.backend,
        f.drop_request * 100.0,
        f.drop_response * 100.0,
        f.error_503 * 100.0,
        f.latency_rate * 100.0,
        f.latency.as_millis(),
        report.outage_ms as f64 / 1000.0,
    );
    let kills = report
        .events
        .iter()
        .filter(|e| e.what.starts_with("SIGKILL"))
        .count();
    let _ = writeln!(
        out,
        "chaos: {} SIGKILLs with restart{}; client retries of POST /orders: {}{}",
        kills,
        if report.events.iter().any(|e| e.what.contains("database")) {
            ", 1 database restart"
        } else {
            ""
        },
        report.client_retries,
        if report.client_gave_up > 0 {
            format!(" ({} orders never accepted)", report.client_gave_up)
        } else {
            String::new()
        },
    );
    let _ = writeln!(
        out,
        "{} {:.1} s after the chaos stopped (whole run {:.1} s)\n",
        if report.settled {
            "settled"
        } else {
            "did NOT settle"
        },
        report.settle_secs,
        report.elapsed_secs
    );
    let header = [
        "mode",
        "orders",
        "shipments",
        "lost",
        "duplicated",
        "unacked",
        "attempts",
        "dead",
        "p50",
        "p99",
        "",
    ];
    let rows: Vec<[String; 11]> = report
        .rows
        .iter()
        .map(|r| {
            [
                r.mode.clone().unwrap_or_else(|| "all".into()),
                r.orders.to_string(),
                r.shipments.to_string(),
                r.lost.to_string(),
                r.duplicated.to_string(),
                r.unacknowledged.to_string(),
                r.attempts.to_string(),
                r.dead_letters.to_string(),
                ms(r.latency_p50_ms),
                ms(r.latency_p99_ms),
                verdict(r).to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i == 0 || i == cells.len() - 1 {
                let _ = write!(l, "{c:<w$}  ");
            } else {
                let _ = write!(l, "{c:>w$}  ");
            }
        }
        l.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(&header));
    let _ = writeln!(
        out,
        "{}",
        "-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1))
    );
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        let _ = writeln!(out, "{}", line(&cells));
    }
    out.push_str(
        "\nlost: order with no shipment. duplicated: order with more than one shipment. \
         unacked: shipment shipped, order not `shipped`.\nattempts: HTTP calls spent per order \
         in both directions (pull modes make none: the consumers poll the feeds). dead: outbox \
         messages given up on and feed events refused.\np50/p99: order committed -> shipment \
         committed. Counted from both databases \
         after the faults stopped and delivery settled.\n",
    );
    if report.violations.is_empty() {
        out.push_str("Every hardened mode kept its promise.\n");
    } else {
        let _ = writeln!(out, "BROKEN INVARIANTS: {}", report.violations.join("; "));
        for story in &report.evidence {
            let _ = writeln!(out, "  {story}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultProfile;

    #[test]
    fn renders_every_mode_and_the_verdict() {
        let row = |mode: &str, lost, duplicated| Invariants {
            mode: Some(mode.into()),
            orders: 10,
            shipments: 10 - lost + duplicated,
            lost,
            duplicated,
            latency_p50_ms: Some(12),
            ..Default::default()
        };
        let report = LabReport {
            seed: 7,
            started_at_ms: 0,
            backend: "sqlite".into(),
            faults: FaultProfile::default(),
            outage_ms: 5000,
            events: Vec::new(),
            client_gave_up: 0,
            client_retries: 3,
            settled: true,
            elapsed_secs: 12.5,
            settle_secs: 2.3,
            rows: vec![
                row("at-most-once", 2, 0),
                row("at-least-once", 0, 3),
                row("effectively-once", 0, 0),
            ],
            violations: Vec::new(),
            evidence: Vec::new(),
        };
        let text = render(&report);
        assert!(text.contains("loses (as designed)"), "{text}");
        assert!(text.contains("duplicates (as designed)"));
        assert!(text.contains("exactly the orders sent"));
        assert!(text.contains("12 ms"));
        assert!(text.contains("kept its promise"));
        assert!(
            text.contains("settled 2.3 s after the chaos stopped (whole run 12.5 s)"),
            "{text}"
        );
    }
}
