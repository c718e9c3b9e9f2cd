//! The demo service as a process: endpoints, knobs, and a graceful SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(env: &[(&str, &str)]) -> (Child, u16, std::sync::mpsc::Receiver<String>) {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_capstan-demo"))
        .env("PORT", port.to_string())
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the demo did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port, rx)
}

fn get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn endpoints_and_metrics() {
    let (mut child, port, logs) = start(&[
        ("VERSION", "9.9"),
        ("CAPSTAN_REPLICA", "4"),
        ("CAPSTAN_SERVICE", "api"),
    ]);
    assert!(get(port, "/").ends_with("hello from api version 9.9 replica 4\n"));
    assert!(get(port, "/healthz").starts_with("HTTP/1.0 200"));
    assert!(get(port, "/work?ms=20").contains("worked 20 ms"));
    let m = get(port, "/metrics");
    assert!(
        m.contains("demo_requests_total{path=\"/\",code=\"200\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("demo_request_duration_seconds_bucket{path=\"/work\",le=\"+Inf\"} 1"),
        "{m}"
    );
    assert!(m.contains("demo_build_info{version=\"9.9\"} 1"), "{m}");
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    // Every line up to the end of the output (the reader thread may still be
    // forwarding the last ones when the process has exited).
    let mut lines: Vec<String> = Vec::new();
    while let Ok(l) = logs.recv_timeout(std::time::Duration::from_secs(5)) {
        lines.push(l);
    }
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
    }
    assert!(lines.iter().any(|l| l.contains("clean shutdown")));
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    let (mut child, port, _logs) = start(&[]);
    let slow = std::thread::spawn(move || get(port, "/work?ms=1000"));
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&child);
    let body = slow.join().unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") && body.contains("worked 1000 ms"),
        "{body}"
    );
    assert!(child.wait().unwrap().success());
}

#[test]
fn fail_rate_and_crash_after() {
    let (mut child, port, _logs) = start(&[("FAIL_RATE", "1")]);
    assert!(get(port, "/").starts_with("HTTP/1.0 500"));
    sigterm(&child);
    child.wait().unwrap();
    let (mut child, _port, _logs) = start(&[("CRASH_AFTER_MS", "200")]);
    assert_eq!(child.wait().unwrap().code(), Some(3));
}
