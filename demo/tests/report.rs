//! `--report`: the lab's HTML report, as a browser shows it.
//!
//! A tiny lab (SQLite, 10 orders per mode, three modes, a one-second outage,
//! at most one kill) runs as `demo --json --report <file>`. Then headless
//! Chromium loads the file, and:
//!
//! - the rendered DOM has one `<svg>` per mode;
//! - every number of its table (read from the cells' `data-*` attributes)
//!   equals the JSON result of the same run, and each timeline's final
//!   counts equal its mode's orders and shipments;
//! - a screenshot is written, and it is not a blank page.
//!
//! Without Chromium the HTML file itself is checked and the browser part is
//! skipped, with the reason printed, unless `CI_REQUIRE_CHROMIUM=1` (as in
//! `.ci/run`), which makes a missing Chromium a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_demo");
const MODES: &str = "at-most-once,at-least-once,effectively-once";

/// Runs `cmd` with stdout and stderr in files of `dir`, killing it after
/// `limit`; returns its status and stdout.
fn run(mut cmd: Command, dir: &Path, name: &str, limit: Duration) -> (ExitStatus, String) {
    let out_path = dir.join(format!("{name}.stdout"));
    let err_path = dir.join(format!("{name}.stderr"));
    let out = std::fs::File::create(&out_path).unwrap();
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} took more than {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    if !status.success() {
        eprintln!(
            "{name} exited with {status}; stderr:\n{}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
    }
    (status, stdout)
}

/// The value of attribute `name` in the opening tag `tag`.
fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(tag[start..start + len].to_string())
}

/// The opening tags `<{element} ...>` of `html` that carry `must`.
fn tags<'a>(html: &'a str, element: &str, must: &str) -> Vec<&'a str> {
    let open = format!("<{element} ");
    html.match_indices(&open)
        .filter_map(|(i, _)| {
            let end = html[i..].find('>')?;
            Some(&html[i..i + end + 1])
        })
        .filter(|t| t.contains(must))
        .collect()
}

/// The table as (mode, field) -> value, from the cells' `data-*` attributes.
fn table(html: &str) -> BTreeMap<(String, String), String> {
    tags(html, "td", "data-field=")
        .into_iter()
        .map(|t| {
            (
                (
                    attr(t, "data-mode").unwrap(),
                    attr(t, "data-field").unwrap(),
                ),
                attr(t, "data-value").unwrap(),
            )
        })
        .collect()
}

/// The JSON result's rows the way the table shows them.
fn expected(json: &Value) -> BTreeMap<(String, String), String> {
    let fields = [
        "orders",
        "shipments",
        "lost",
        "duplicated",
        "unacknowledged",
        "attempts",
        "dead_letters",
        "latency_p50_ms",
        "latency_p99_ms",
    ];
    let mut out = BTreeMap::new();
    for row in json["rows"].as_array().expect("rows") {
        let mode = row["mode"].as_str().unwrap_or("all").to_string();
        for f in fields {
            let v = match &row[f] {
                Value::Null => String::new(),
                v => v.to_string(),
            };
            out.insert((mode.clone(), f.to_string()), v);
        }
    }
    out
}

/// Everything the page must say that the JSON result says.
fn check_page(html: &str, json: &Value, source: &str) {
    let modes: Vec<&str> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["mode"].as_str())
        .collect();
    assert_eq!(modes.len(), 3, "{json}");
    assert_eq!(
        html.matches("<svg").count(),
        modes.len(),
        "{source}: one <svg> per mode"
    );
    let shown = table(html);
    assert_eq!(
        shown,
        expected(json),
        "{source}: the table and the JSON differ"
    );

    // Each timeline ends where the table's row does.
    let sections = tags(html, "section", "data-mode=");
    assert_eq!(sections.len(), modes.len(), "{source}");
    for s in sections {
        let mode = attr(s, "data-mode").unwrap();
        assert!(modes.contains(&mode.as_str()), "{source}: {mode}");
        for (attr_name, field) in [("data-orders", "orders"), ("data-shipments", "shipments")] {
            assert_eq!(
                attr(s, attr_name),
                shown.get(&(mode.clone(), field.to_string())).cloned(),
                "{source}: {mode}'s timeline ends at another {field} count than its row"
            );
        }
    }
    let kills = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "kill")
        .count();
    if kills > 0 {
        assert_eq!(
            html.matches(&format!("\nSIGKILL + restart: {kills}\n"))
                .count(),
            modes.len(),
            "{source}: every timeline marks the {kills} kill(s)"
        );
    }
    if json["outage_ms"].as_u64().unwrap_or(0) > 0 {
        assert_eq!(html.matches("\nshipping outage\n").count(), modes.len());
    }
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

fn chromium_cmd(bin: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

#[test]
fn the_html_report_renders_in_chromium_and_matches_the_json() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("lab.html");

    // 30 orders at 15 per second: 2 s of traffic, the outage from 0.7 s to
    // 1.7 s, and (mean 1.5 s) at most one kill.
    let mut lab = Command::new(EXE);
    lab.args([
        "--orders",
        "10",
        "--modes",
        MODES,
        "--rate",
        "15",
        "--outage",
        "1s",
        "--kill-interval",
        "1500ms",
        "--settle-timeout",
        "30s",
        "--seed",
        "7",
        "--quiet",
        "--json",
        "--report",
    ])
    .arg(&report);
    let (status, stdout) = run(lab, dir.path(), "lab", Duration::from_secs(120));
    // 2: a hardened mode broke its promise (the chaos tests are about that);
    // the report is written all the same.
    assert!(
        matches!(status.code(), Some(0 | 2)),
        "the lab failed: {status}"
    );
    let json: Value = serde_json::from_str(&stdout).expect("--json prints the result");
    assert!(json["started_at_ms"].as_i64().unwrap() > 0);

    let html = std::fs::read_to_string(&report).expect("--report wrote the file");
    check_page(&html, &json, "the file");

    let Some(bin) = chromium() else {
        if std::env::var("CI_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("chromium is not installed and CI_REQUIRE_CHROMIUM=1");
        }
        eprintln!(
            "SKIPPED the browser part: no chromium on PATH (Debian: apt-get install chromium); \
             set CI_REQUIRE_CHROMIUM=1 to make this a failure"
        );
        return;
    };
    let url = format!("file://{}", report.display());

    let mut dump = chromium_cmd(&bin, &dir.path().join("profile-dom"));
    dump.arg("--dump-dom").arg(&url);
    let (status, dom) = run(
        dump,
        dir.path(),
        "chromium-dump-dom",
        Duration::from_secs(90),
    );
    assert!(status.success(), "chromium --dump-dom failed: {status}");
    assert!(
        dom.contains("</table>"),
        "chromium rendered no table:\n{dom}"
    );
    check_page(&dom, &json, "chromium's DOM");

    let png = dir.path().join("lab.png");
    let mut shot = chromium_cmd(&bin, &dir.path().join("profile-shot"));
    shot.arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,1600")
        .arg(&url);
    let (status, _) = run(
        shot,
        dir.path(),
        "chromium-screenshot",
        Duration::from_secs(90),
    );
    assert!(status.success(), "chromium --screenshot failed: {status}");
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A blank 1200x1600 page compresses to a few kB; the charts do not.
    assert!(
        bytes.len() > 30_000,
        "the screenshot is {} bytes: a blank page?",
        bytes.len()
    );
    eprintln!(
        "chromium rendered the report: {} <svg>, screenshot {} bytes",
        dom.matches("<svg").count(),
        bytes.len()
    );
}
