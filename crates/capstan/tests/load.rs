//! `capstan load` against the demo service: closed loop, open loop with the
//! coordinated-omission correction, and an unreachable target.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The demo service on a free port, stopped when dropped.
fn demo() -> (Killed, u16) {
    demo_failing(0.0)
}

/// The demo service answering `/` with 500 at `rate`.
fn demo_failing(rate: f64) -> (Killed, u16) {
    let port = free_port();
    let child = Command::new(demo_bin())
        .env("PORT", port.to_string())
        .env("FAIL_RATE", rate.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the demo did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Killed(child), port)
}

fn load(args: &[&str]) -> (i32, Value) {
    let out = Command::new(capstan_bin())
        .arg("load")
        .args(args)
        .args(["-o", "json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), v)
}

fn ms(v: &Value, q: &str) -> f64 {
    v["latency_ms"][q].as_f64().unwrap()
}

#[test]
fn closed_loop_counts_every_response() {
    let (_demo, port) = demo();
    let (code, v) = load(&[&format!("http://127.0.0.1:{port}/"), "-c", "4", "-d", "1s"]);
    assert_eq!(code, 0, "{v}");
    let n = v["requests"].as_u64().unwrap();
    assert!(n > 10, "{v}");
    assert_eq!(v["status"]["200"].as_u64(), Some(n), "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["mode"], "closed");
    assert!(
        ms(&v, "p50") <= ms(&v, "p90") && ms(&v, "p90") <= ms(&v, "p99"),
        "{v}"
    );
    assert!(
        ms(&v, "p99") <= ms(&v, "p99.9") && ms(&v, "p99.9") <= ms(&v, "max"),
        "{v}"
    );
    // Each answer of `/` is "hello from …": bytes were counted.
    assert!(v["bytes"].as_u64().unwrap() >= n * 10, "{v}");
}

#[test]
fn open_loop_sends_the_schedule_and_counts_from_when_requests_were_due() {
    let (_demo, port) = demo();
    // 50 requests a second for 1 s: exactly 50 are due, all answered.
    let (code, v) = load(&[
        &format!("http://127.0.0.1:{port}/healthz"),
        "--rate",
        "50",
        "-d",
        "1s",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["requests"], 50, "{v}");
    assert_eq!(v["mode"], "open");
    // One connection, requests due every 50 ms, each taking 300 ms: they queue.
    // Counted from when each was due, the last waited for all before it (about
    // 10 × 300 ms); counted from when it was sent, every one would be ~300 ms.
    let (_, v) = load(&[
        &format!("http://127.0.0.1:{port}/work?ms=300"),
        "--rate",
        "20",
        "-d",
        "500ms",
        "-c",
        "1",
    ]);
    assert_eq!(v["requests"], 10, "{v}");
    assert!(ms(&v, "max") > 2000.0, "{v}");
    assert!(ms(&v, "p50") > 600.0, "{v}");
}

#[test]
fn an_unreachable_target_reports_connect_errors_and_fails() {
    let port = free_port();
    let (code, v) = load(&[
        &format!("http://127.0.0.1:{port}/"),
        "-c",
        "2",
        "-d",
        "300ms",
    ]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["requests"], 0, "{v}");
    assert!(v["errors_by_kind"]["connect"].as_u64().unwrap() > 0, "{v}");
    assert!(v["latency_ms"].is_null(), "{v}");
    // Bad input is refused before any request.
    let out = Command::new(capstan_bin())
        .args(["load", "https://127.0.0.1/"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https is not supported"));
}

/// 5xx answers are failures in the summary; `--fail-on 5xx` makes them fail
/// the command.
#[test]
fn server_errors_count_as_failures() {
    let (_demo, port) = demo_failing(0.5);
    let url = format!("http://127.0.0.1:{port}/");
    let (code, v) = load(&[&url, "-c", "2", "-d", "1s"]);
    assert_eq!(code, 0, "{v}");
    let failed = v["failed"].as_u64().unwrap();
    assert!(failed > 0, "{v}");
    assert_eq!(v["status"]["500"].as_u64(), Some(failed), "{v}");
    assert_eq!(
        v["ok"].as_u64().unwrap() + failed,
        v["requests"].as_u64().unwrap()
    );
    let (code, v) = load(&[&url, "-c", "2", "-d", "1s", "--fail-on", "5xx"]);
    assert_eq!(code, 1, "{v}");
    let (_ok, port) = demo();
    let (code, v) = load(&[
        &format!("http://127.0.0.1:{port}/"),
        "-d",
        "500ms",
        "--fail-on",
        "5xx",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["failed"], 0);
}

#[test]
fn an_interrupted_load_reports_what_it_measured() {
    let (_demo, port) = demo();
    let child = Command::new(capstan_bin())
        .args([
            "load",
            &format!("http://127.0.0.1:{port}/"),
            "--rate",
            "100",
            "-d",
            "60s",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let began = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "it stopped at the interrupt"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let secs = v["duration_s"].as_f64().unwrap();
    assert!((1.0..30.0).contains(&secs), "{v}");
    assert!(v["requests"].as_u64().unwrap() >= 100, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
}
