//! The dashboard in a real browser: Debian's headless Chromium driven by
//! Selenium (`tests/browser/dashboard.py`) against a running stack with
//! traffic, a deploy, a firing alert and 100 series of an hour's history.
//! Screenshots go to `target/tmp/dashboard/`; the performance figures are
//! printed (`FIGURE …` lines) and recorded in docs/BENCHMARKS.md.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// An environment value that must never reach a page or a response the UI uses.
const SECRET: &str = "s3cret-dashboard-value-5b1e";

const RULES: &str = r#"groups:
  - name: dashboard
    interval: 1s
    rules:
      - alert: DashboardTest
        expr: vector(1)
        labels: {severity: info}
        annotations:
          summary: the dashboard test fires this
          description: always firing
"#;

fn stack(port: u16, version: &str) -> String {
    format!(
        r#"name: dash
x-capstan:
  scrape_interval: 1s
  evaluation_interval: 1s
  rule_files: ["rules.yml"]
  api: {{require_token: true}}
services:
  web:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", VERSION: "{version}", API_KEY: "{SECRET}"}}
    ports: ["{port}:http"]
    deploy: {{replicas: 2, update_config: {{parallelism: 2, order: start-first}}}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
      autoscale: {{min: 2, max: 3, interval: 1s, metrics: [{{rps: 1000}}]}}
"#
    )
}

/// 100 series over the last hour at 15 s, through remote_write.
fn write_bench_series(addr: &str, token: &str) {
    use capstan::api::remote_write::{Label, Sample, TimeSeries, WriteRequest};
    use prost::Message;
    let now = capstan::events::now_ms();
    let timeseries = (0..100)
        .map(|n| TimeSeries {
            labels: vec![
                Label {
                    name: "__name__".into(),
                    value: "dashboard_bench_series".into(),
                },
                Label {
                    name: "n".into(),
                    value: n.to_string(),
                },
            ],
            samples: (0..=240)
                .map(|i| Sample {
                    value: f64::from(n) + (f64::from(i) / 10.0).sin(),
                    timestamp: now - 3_600_000 + i64::from(i) * 15_000,
                })
                .collect(),
            histograms: Vec::new(),
        })
        .collect();
    let body = snap::raw::Encoder::new()
        .compress_vec(&WriteRequest { timeseries }.encode_to_vec())
        .unwrap();
    let auth = format!("Bearer {token}");
    let (code, answer) = http_post(
        addr,
        "/api/v1/write",
        &[
            ("Authorization", &auth),
            ("Content-Encoding", "snappy"),
            ("Content-Type", "application/x-protobuf"),
        ],
        &body,
    );
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&answer));
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_dashboard_in_chromium() {
    need("chromium");
    need("chromedriver");
    let python = python();
    let selenium = Command::new(&python)
        .args(["-c", "import selenium"])
        .status()
        .unwrap();
    assert!(
        selenium.success(),
        "selenium is not installed: run scripts/test, which installs what the tests need"
    );
    let port = free_port();
    let s = TestStack::new(&stack(port, "1.0.0"));
    std::fs::write(s.dir.path().join("rules.yml"), RULES).unwrap();
    s.up();
    let addr = daemon_addr(&s);
    let token = s.token();
    // Reads want the token on loopback too (`api.require_token`).
    assert_eq!(http_fetch(&addr, "/api/v1/query?query=up").0, 401);
    let (code, _) = http_fetch(&addr, "/");
    assert_eq!(
        code, 303,
        "a browser without the token goes to the login form"
    );
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 20, 150);
    std::thread::sleep(Duration::from_secs(8));
    // A deploy, to be marked on the charts.
    s.write(&stack(port, "1.1.0"));
    s.up();
    write_bench_series(&addr, &token);
    std::thread::sleep(Duration::from_secs(4));
    let pid = s.daemon_pid();
    let rss_before = rss_kib(pid);
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    println!("FIGURE daemon_rss_before_browser {rss_before} KiB");
    // bench/dashboard.sh runs the browser more than once, to see whether the
    // daemon's memory keeps growing with use.
    let rounds: u32 = std::env::var("DASHBOARD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    for round in 1..=rounds {
        let out = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/dashboard.py"
            ))
            .args([
                &format!("http://{addr}"),
                SECRET,
                &artifacts.display().to_string(),
                &token,
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}");
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "the browser checks failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("all checks passed"), "{stdout}");
        // Nobody looks: the UI must not keep memory.
        std::thread::sleep(Duration::from_secs(5));
        println!(
            "FIGURE daemon_rss_idle_after_round_{round} {} KiB",
            rss_kib(pid)
        );
    }
    drop(load);
    s.ok(&["down"]);
}
