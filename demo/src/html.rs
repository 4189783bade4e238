//! The lab's report as a picture: one self-contained HTML file (`--report`)
//! with the table (the numbers of the text table and of `--json`) and, per
//! mode, an SVG timeline drawn with `plotters`: orders committed, shipments
//! created and orders acknowledged as shipped, as cumulative counts over the
//! seconds since the lab started, with the chaos on the same axis (the
//! outage shaded, each SIGKILL and the database restart as a vertical line,
//! and the moment the faults stopped).
//!
//! The time series are read from both databases after the run
//! (`orders.created_at`, `shipments.created_at`, `orders.shipped_at`), not
//! from the lab's own bookkeeping. Nothing is loaded from anywhere: the SVGs
//! are inline and the style is in the page.
//!
//! Every number of the table is also in its cell's `data-mode`,
//! `data-field` (the JSON field name) and `data-value` attributes (empty for
//! a JSON `null`), so a program can read the rendered page and compare.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use resilience::store::Db;
use service_kit::DeliveryMode;
use sqlx::Row;

use crate::audit::Invariants;
use crate::lab::{ChaosKind, LabReport};

/// When things happened to one mode's orders, in milliseconds since the
/// lab started, each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// The delivery mode.
    pub mode: String,
    /// Each order's commit (`orders.created_at`).
    pub orders: Vec<i64>,
    /// Each shipment's creation (`shipments.created_at`), duplicates included.
    pub shipments: Vec<i64>,
    /// Each order's acknowledgement as shipped (`orders.shipped_at`).
    pub shipped: Vec<i64>,
}

/// Reads the timelines of every mode present from both databases, relative
/// to `t0_ms` (milliseconds since the Unix epoch), in the usual order of the
/// modes.
pub async fn timelines(
    order_db: &Db,
    shipping_db: &Db,
    t0_ms: i64,
) -> anyhow::Result<Vec<Timeline>> {
    let mut by_mode: BTreeMap<String, Timeline> = BTreeMap::new();
    let mut mode_of: std::collections::HashMap<String, String> = Default::default();
    let rows = sqlx::query("SELECT id, delivery_mode, created_at, shipped_at FROM orders")
        .fetch_all(order_db.pool())
        .await?;
    for r in rows {
        let mode: String = r.try_get("delivery_mode")?;
        let t = by_mode.entry(mode.clone()).or_insert_with(|| Timeline {
            mode: mode.clone(),
            ..Default::default()
        });
        t.orders.push(r.try_get::<i64, _>("created_at")? - t0_ms);
        if let Some(at) = r.try_get::<Option<i64>, _>("shipped_at")? {
            t.shipped.push(at - t0_ms);
        }
        mode_of.insert(r.try_get("id")?, mode);
    }
    let rows = sqlx::query("SELECT order_id, created_at FROM shipments")
        .fetch_all(shipping_db.pool())
        .await?;
    for r in rows {
        let order_id: String = r.try_get("order_id")?;
        // Shipments of orders the lab did not make are not counted (as in the audit).
        if let Some(t) = mode_of.get(&order_id).and_then(|m| by_mode.get_mut(m)) {
            t.shipments.push(r.try_get::<i64, _>("created_at")? - t0_ms);
        }
    }
    let mut out: Vec<Timeline> = by_mode.into_values().collect();
    for t in &mut out {
        t.orders.sort_unstable();
        t.shipments.sort_unstable();
        t.shipped.sort_unstable();
    }
    out.sort_by_key(|t| {
        DeliveryMode::ALL
            .iter()
            .position(|m| m.as_str() == t.mode)
            .unwrap_or(usize::MAX)
    });
    Ok(out)
}

/// Size of each timeline, in SVG pixels.
const CHART: (u32, u32) = (1000, 320);
/// The right-hand margin that holds the legend.
const LEGEND_WIDTH: u32 = 235;

const ORDERS: RGBColor = RGBColor(31, 119, 180);
const SHIPMENTS: RGBColor = RGBColor(255, 127, 14);
const SHIPPED: RGBColor = RGBColor(44, 160, 44);
const KILL: RGBColor = RGBColor(214, 39, 40);
const DB_RESTART: RGBColor = RGBColor(148, 103, 189);
const OUTAGE: RGBColor = RGBColor(120, 120, 120);

/// The chaos on the time axis, in seconds since the lab started.
#[derive(Debug, Default)]
struct Marks {
    outages: Vec<(f64, f64)>,
    kills: Vec<(f64, String)>,
    db_restarts: Vec<f64>,
    /// When the faults were switched off and settling began.
    faults_off: f64,
    end: f64,
}

fn marks(report: &LabReport) -> Marks {
    let secs = |ms: u64| ms as f64 / 1000.0;
    let end = report.elapsed_secs.max(0.0);
    let mut m = Marks {
        faults_off: (report.elapsed_secs - report.settle_secs).max(0.0),
        end,
        ..Default::default()
    };
    let mut down: Option<f64> = None;
    for e in &report.events {
        match e.kind {
            ChaosKind::OutageStart => down = Some(secs(e.at_ms)),
            ChaosKind::OutageEnd => {
                m.outages.push((down.take().unwrap_or(0.0), secs(e.at_ms)));
            }
            ChaosKind::Kill => m.kills.push((
                secs(e.at_ms),
                e.service.clone().unwrap_or_else(|| "a service".into()),
            )),
            ChaosKind::DatabaseRestart => m.db_restarts.push(secs(e.at_ms)),
        }
    }
    if let Some(start) = down {
        m.outages.push((start, end));
    }
    m
}

/// A cumulative count as a step line from 0 at 0 s to the last count at `end`.
fn steps(times_ms: &[i64], end: f64) -> Vec<(f64, f64)> {
    let mut pts = Vec::with_capacity(times_ms.len() * 2 + 2);
    pts.push((0.0, 0.0));
    for (i, t) in times_ms.iter().enumerate() {
        let x = (*t as f64 / 1000.0).max(0.0);
        pts.push((x, i as f64));
        pts.push((x, (i + 1) as f64));
    }
    pts.push((end, times_ms.len() as f64));
    pts
}

/// A legend entry's sample.
#[derive(Debug, Clone, Copy)]
enum Sample {
    Line(RGBColor),
    Dashed(RGBColor),
    Span(RGBColor),
}

/// Draws the legend in the right-hand margin, one entry a line.
fn legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, Sample)],
) -> anyhow::Result<()> {
    let x = (CHART.0 - LEGEND_WIDTH + 24) as i32;
    let font = ("sans-serif", 16).into_font().color(&BLACK);
    for (i, (text, sample)) in entries.iter().enumerate() {
        let y = 24 + 22 * i as i32;
        match *sample {
            Sample::Line(c) => root.draw(&PathElement::new(
                vec![(x, y), (x + 24, y)],
                c.stroke_width(3),
            )),
            Sample::Dashed(c) => root.draw(&DashedPathElement::new(
                vec![(x, y), (x + 24, y)],
                5,
                3,
                c.stroke_width(2),
            )),
            Sample::Span(c) => root.draw(&Rectangle::new(
                [(x, y - 7), (x + 24, y + 7)],
                c.mix(0.18).filled(),
            )),
        }
        .map_err(plot_err)?;
        root.draw(&Text::new(
            text.clone(),
            (x + 32, y),
            font.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(plot_err)?;
    }
    Ok(())
}

/// One mode's timeline as an SVG document.
pub fn chart(report: &LabReport, timeline: &Timeline) -> anyhow::Result<String> {
    let m = marks(report);
    let last = |v: &[i64]| v.last().map_or(0.0, |t| *t as f64 / 1000.0);
    let x_max = m
        .end
        .max(last(&timeline.orders))
        .max(last(&timeline.shipments))
        .max(last(&timeline.shipped))
        .max(1.0);
    let count = timeline
        .orders
        .len()
        .max(timeline.shipments.len())
        .max(timeline.shipped.len())
        .max(1) as f64;
    // Headroom above the highest curve for the labels of the chaos marks.
    let y_max = count * 1.25;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_right(LEGEND_WIDTH)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the lab started")
            .y_desc("count (cumulative)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 16))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()
            .map_err(plot_err)?;

        let label_style = TextStyle::from(
            ("sans-serif", 15)
                .into_font()
                .transform(FontTransform::Rotate270),
        )
        .pos(Pos::new(HPos::Right, VPos::Top));
        let mut entries: Vec<(String, Sample)> = Vec::new();
        let series: [(&str, &[i64], RGBColor); 3] = [
            ("orders committed", &timeline.orders, ORDERS),
            ("shipments created", &timeline.shipments, SHIPMENTS),
            ("acknowledged shipped", &timeline.shipped, SHIPPED),
        ];
        for (name, times, color) in series {
            entries.push((format!("{name}: {}", times.len()), Sample::Line(color)));
        }

        for (s, e) in &m.outages {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(*s, 0.0), (*e, y_max)],
                    OUTAGE.mix(0.18).filled(),
                )))
                .map_err(plot_err)?;
        }
        if !m.outages.is_empty() {
            entries.push(("shipping outage".into(), Sample::Span(OUTAGE)));
        }
        // A vertical line across the plot, labelled at its top.
        let mut vertical = |x: f64, color: RGBColor, text: &str, dashed: bool| {
            let line = vec![(x, 0.0), (x, y_max)];
            if dashed {
                chart.draw_series(std::iter::once(DashedPathElement::new(
                    line,
                    6,
                    4,
                    color.stroke_width(2),
                )))
            } else {
                chart.draw_series(std::iter::once(PathElement::new(
                    line,
                    color.stroke_width(2),
                )))
            }
            .map_err(plot_err)?;
            let (px, py) = chart.backend_coord(&(x, y_max));
            root.draw(&Text::new(
                text.to_string(),
                (px + 3, py + 4),
                label_style.color(&color),
            ))
            .map_err(plot_err)
        };
        for (x, service) in &m.kills {
            vertical(
                *x,
                KILL,
                service.strip_suffix("-service").unwrap_or(service),
                false,
            )?;
        }
        if !m.kills.is_empty() {
            entries.push((
                format!("SIGKILL + restart: {}", m.kills.len()),
                Sample::Line(KILL),
            ));
        }
        for x in &m.db_restarts {
            vertical(*x, DB_RESTART, "database", false)?;
        }
        if !m.db_restarts.is_empty() {
            entries.push(("database restart".into(), Sample::Line(DB_RESTART)));
        }
        vertical(m.faults_off, OUTAGE, "faults off", true)?;
        entries.push(("faults off, settling".into(), Sample::Dashed(OUTAGE)));

        // The counts last, over the marks.
        for (_, times, color) in series {
            chart
                .draw_series(LineSeries::new(steps(times, x_max), color.stroke_width(2)))
                .map_err(plot_err)?;
        }
        legend(&root, &entries)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a timeline: {e:?}")
}

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The table's columns: JSON field name, header, value of a row.
type Column = (&'static str, &'static str, fn(&Invariants) -> Option<i64>);

const COLUMNS: [Column; 9] = [
    ("orders", "orders", |r| Some(r.orders as i64)),
    ("shipments", "shipments", |r| Some(r.shipments as i64)),
    ("lost", "lost", |r| Some(r.lost as i64)),
    ("duplicated", "duplicated", |r| Some(r.duplicated as i64)),
    ("unacknowledged", "unacked", |r| {
        Some(r.unacknowledged as i64)
    }),
    ("attempts", "attempts", |r| Some(r.attempts)),
    ("dead_letters", "dead", |r| Some(r.dead_letters as i64)),
    ("latency_p50_ms", "p50", |r| r.latency_p50_ms),
    ("latency_p99_ms", "p99", |r| r.latency_p99_ms),
];

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1040px;\
color:#222;padding:0 12px}\
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px}\
h3{font-size:16px;margin:18px 0 4px}\
p{margin:4px 0;line-height:1.4}.muted{color:#666;font-size:13px}\
table{border-collapse:collapse;font-size:15px;margin:10px 0;font-variant-numeric:tabular-nums}\
th,td{padding:3px 7px;white-space:nowrap;border-bottom:1px solid #ddd;text-align:right}\
th:first-child,td:first-child,td.verdict{text-align:left}td.verdict{white-space:normal;font-size:13px;color:#555}\
tr.all td{font-weight:600;border-top:2px solid #999}\
td.broken{color:#b00;font-weight:700}\
section.timeline svg{max-width:100%;height:auto;display:block}\
.ok{color:#2a7a2a;font-weight:600}.bad{color:#b00;font-weight:700}";

/// The whole report as one HTML document.
pub fn render(report: &LabReport, timelines: &[Timeline]) -> anyhow::Result<String> {
    let mut h = String::new();
    let f = &report.faults;
    let kills = report
        .events
        .iter()
        .filter(|e| e.kind == ChaosKind::Kill)
        .count();
    let db_restarts = report
        .events
        .iter()
        .filter(|e| e.kind == ChaosKind::DatabaseRestart)
        .count();
    let title = format!("Lab report: seed {}, {}", report.seed, report.backend);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{t}</h1>\n",
        t = esc(&title)
    );
    let _ = writeln!(
        h,
        "<p>Faults while the orders were sent: {:.0}% of requests dropped, {:.0}% of responses \
         lost, {:.0}% answered 503, {:.0}% delayed by {} ms; shipping outage {:.1} s; {} SIGKILLs \
         with restart{}. Client retries of <code>POST /orders</code>: {}{}.</p>",
        f.drop_request * 100.0,
        f.drop_response * 100.0,
        f.error_503 * 100.0,
        f.latency_rate * 100.0,
        f.latency.as_millis(),
        report.outage_ms as f64 / 1000.0,
        kills,
        match db_restarts {
            0 => String::new(),
            n => format!(", {n} database restart(s)"),
        },
        report.client_retries,
        if report.client_gave_up > 0 {
            format!(" ({} orders never accepted)", report.client_gave_up)
        } else {
            String::new()
        },
    );
    let _ = writeln!(
        h,
        "<p>Delivery {} {:.1} s after the chaos stopped (whole run {:.1} s).</p>",
        if report.settled {
            "settled"
        } else {
            "did <strong class=\"bad\">not</strong> settle"
        },
        report.settle_secs,
        report.elapsed_secs
    );

    // The table.
    h.push_str("<table id=\"results\">\n<thead><tr><th>mode</th>");
    for (_, header, _) in COLUMNS {
        let _ = write!(h, "<th>{header}</th>");
    }
    h.push_str("<th></th></tr></thead>\n<tbody>\n");
    for r in &report.rows {
        let mode = r.mode.as_deref().unwrap_or("all");
        let broken = !crate::audit::violations(r).is_empty();
        let _ = write!(
            h,
            "<tr data-mode=\"{m}\"{cls}><td>{m}</td>",
            m = esc(mode),
            cls = if r.mode.is_none() {
                " class=\"all\""
            } else {
                ""
            }
        );
        for (field, _, value) in COLUMNS {
            let v = value(r);
            let shown = match (v, field.ends_with("_ms")) {
                (None, _) => "-".to_string(),
                (Some(v), true) => format!("{v} ms"),
                (Some(v), false) => v.to_string(),
            };
            let _ = write!(
                h,
                "<td data-mode=\"{}\" data-field=\"{field}\" data-value=\"{}\">{shown}</td>",
                esc(mode),
                v.map(|v| v.to_string()).unwrap_or_default()
            );
        }
        let _ = writeln!(
            h,
            "<td class=\"verdict{}\">{}</td></tr>",
            if broken { " broken" } else { "" },
            esc(crate::report::verdict(r))
        );
    }
    h.push_str("</tbody>\n</table>\n");
    h.push_str(
        "<p class=\"muted\">lost: order with no shipment. duplicated: order with more than one \
         shipment. unacked: shipment shipped, order not <code>shipped</code>. attempts: HTTP calls \
         spent per order in both directions (pull modes make none: the consumers poll the feeds). \
         dead: outbox messages given up on and feed events refused. p50/p99: order committed \
         &rarr; shipment committed. Counted from both databases after the faults stopped and \
         delivery settled.</p>\n",
    );
    if report.violations.is_empty() {
        h.push_str("<p class=\"ok\">Every hardened mode kept its promise.</p>\n");
    } else {
        let _ = writeln!(
            h,
            "<p class=\"bad\">Broken invariants: {}</p>",
            esc(&report.violations.join("; "))
        );
        if !report.evidence.is_empty() {
            let _ = writeln!(h, "<pre>{}</pre>", esc(&report.evidence.join("\n")));
        }
    }

    // The timelines.
    h.push_str(
        "<h2>Timelines</h2>\n<p class=\"muted\">Per mode, counted from both databases after the \
         run: orders committed (<code>orders.created_at</code>), shipments created \
         (<code>shipments.created_at</code>, duplicates included) and orders acknowledged as \
         shipped (<code>orders.shipped_at</code>), cumulative, over the seconds since the lab \
         started. Shaded: the shipping outage. Red lines: SIGKILLs, labelled with the service \
         (drawn when it was back up); purple: the database restart; dashed: the faults switched \
         off and delivery left to settle.</p>\n",
    );
    for t in timelines {
        let svg = chart(report, t)?;
        let _ = writeln!(
            h,
            "<section class=\"timeline\" data-mode=\"{m}\" data-orders=\"{}\" \
             data-shipments=\"{}\" data-shipped=\"{}\">\n<h3>{m}</h3>\n{svg}</section>",
            t.orders.len(),
            t.shipments.len(),
            t.shipped.len(),
            m = esc(&t.mode),
        );
    }

    // The chaos, as a list.
    if !report.events.is_empty() {
        h.push_str("<h2>Chaos</h2>\n<table id=\"events\">\n<thead><tr><th>at</th><th>what</th></tr></thead>\n<tbody>\n");
        for e in &report.events {
            let _ = writeln!(
                h,
                "<tr><td>{:.1} s</td><td style=\"text-align:left\">{}</td></tr>",
                e.at_ms as f64 / 1000.0,
                esc(&e.what)
            );
        }
        h.push_str("</tbody>\n</table>\n");
    }
    h.push_str("</body>\n</html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultProfile;
    use crate::lab::ChaosEvent;

    fn report() -> LabReport {
        let row = |mode: Option<&str>, orders, shipments| Invariants {
            mode: mode.map(str::to_string),
            orders,
            shipments,
            duplicated: shipments.saturating_sub(orders),
            latency_p50_ms: Some(3),
            ..Default::default()
        };
        let event = |at_ms, kind, service: Option<&str>| ChaosEvent {
            at_ms,
            what: format!("{kind:?} <{service:?}>"),
            kind,
            service: service.map(str::to_string),
        };
        LabReport {
            seed: 7,
            started_at_ms: 1_700_000_000_000,
            backend: "sqlite".into(),
            faults: FaultProfile::default(),
            outage_ms: 1000,
            events: vec![
                event(500, ChaosKind::Kill, Some("order-service")),
                event(1000, ChaosKind::OutageStart, None),
                event(2000, ChaosKind::OutageEnd, None),
                event(2500, ChaosKind::DatabaseRestart, None),
            ],
            client_gave_up: 0,
            client_retries: 1,
            settled: true,
            elapsed_secs: 4.0,
            settle_secs: 1.0,
            rows: vec![
                row(Some("at-most-once"), 3, 2),
                row(Some("at-least-once"), 3, 4),
                row(None, 6, 6),
            ],
            violations: Vec::new(),
            evidence: Vec::new(),
        }
    }

    fn timeline(mode: &str, n: i64, dup: i64) -> Timeline {
        Timeline {
            mode: mode.into(),
            orders: (0..n).map(|i| i * 300).collect(),
            shipments: (0..n + dup).map(|i| i * 300 + 50).collect(),
            shipped: (0..n - 1).map(|i| i * 300 + 400).collect(),
        }
    }

    #[test]
    fn renders_the_table_and_a_chart_per_mode() {
        let r = report();
        let html = render(
            &r,
            &[
                timeline("at-most-once", 3, 0),
                timeline("at-least-once", 3, 1),
            ],
        )
        .unwrap();
        assert_eq!(html.matches("<svg").count(), 2, "{html}");
        assert!(!html.contains("<?xml"));
        // Self-contained: nothing to load.
        for external in ["src=", "href=", "<link", "url(", "@import"] {
            assert!(!html.contains(external), "{external} in the report");
        }
        assert!(html.contains(
            "<td data-mode=\"at-least-once\" data-field=\"shipments\" data-value=\"4\">4</td>"
        ));
        assert!(html.contains(
            "<td data-mode=\"all\" data-field=\"latency_p99_ms\" data-value=\"\">-</td>"
        ));
        assert!(html.contains("SIGKILL + restart: 1"));
        assert!(html.contains("shipping outage"));
        assert!(html.contains("database restart"));
        assert!(html.contains("faults off"));
        // Event text is escaped.
        assert!(
            html.contains("&lt;Some(&quot;order-service&quot;)&gt;"),
            "{html}"
        );
        assert!(html.contains("data-shipments=\"4\""));
    }

    #[test]
    fn marks_pair_the_outage_and_keep_the_kills() {
        let m = marks(&report());
        assert_eq!(m.outages, vec![(1.0, 2.0)]);
        assert_eq!(m.kills, vec![(0.5, "order-service".to_string())]);
        assert_eq!(m.db_restarts, vec![2.5]);
        assert_eq!(m.faults_off, 3.0);
    }

    #[test]
    fn steps_count_up_to_the_end() {
        let s = steps(&[1000, 2000], 5.0);
        assert_eq!(
            s,
            vec![
                (0.0, 0.0),
                (1.0, 0.0),
                (1.0, 1.0),
                (2.0, 1.0),
                (2.0, 2.0),
                (5.0, 2.0)
            ]
        );
    }
}
