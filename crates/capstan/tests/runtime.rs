//! The runtime core end to end: a request during the drain of a service's last
//! replica wakes it, a long drain delays nothing else, and a changed
//! definition replaces replicas start-first under load without failing a request.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A demo service block with a published port and a health check.
fn service(name: &str, port: u16, extra: &str) -> String {
    format!(
        r#"
  {name}:
    command: ["{{demo}}"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
      LOG_REQUESTS: "0"
    ports: ["127.0.0.1:{port}:http"]
    stop_grace_period: 20s
{extra}"#
    )
}

fn healthy(s: &TestStack, service: &str) -> usize {
    s.replicas(service)
        .iter()
        .filter(|r| r["health"] == "healthy")
        .count()
}

fn desired(s: &TestStack, service: &str) -> u64 {
    s.api("/capstan/v1/ps")["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == service)
        .and_then(|v| v["desired"].as_u64())
        .unwrap_or(u64::MAX)
}

/// A slow request in flight: the answer and when it came.
fn slow_request(port: u16, ms: u64) -> std::thread::JoinHandle<(u16, String, Instant)> {
    std::thread::spawn(move || {
        let (code, body) = http_fetch(&format!("127.0.0.1:{port}"), &format!("/sleep?ms={ms}"));
        (code, body, Instant::now())
    })
}

#[test]
fn a_request_during_the_last_replicas_drain_wakes_the_service() {
    let port = free_port();
    let s = TestStack::new(&format!(
        "services:{}",
        service(
            "web",
            port,
            r#"    x-capstan:
      healthcheck: {http: /healthz, interval: 1s, timeout: 1s, retries: 3}
      metrics: {disable: true}
      cold_start_timeout: 30s
      autoscale: {min: 0, max: 2, idle_after: 1h, interval: 500ms}
"#
        )
    ));
    s.up();
    wait_for("web healthy", Duration::from_secs(20), || {
        (healthy(&s, "web") == 1).then_some(())
    });
    // A request that keeps the last replica draining for 6 s.
    let slow = slow_request(port, 6000);
    std::thread::sleep(Duration::from_millis(300));
    let scaler = s.run_in_background(&["scale", "web=0"]);
    // The new count shows at once, while the replica still drains.
    wait_for("desired 0", Duration::from_secs(3), || {
        (desired(&s, "web") == 0).then_some(())
    });
    let (code, body) = http_fetch(&format!("127.0.0.1:{port}"), "/");
    let answered = Instant::now();
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("hello from web"), "{body}");
    let (slow_code, slow_body, slow_done) = slow.join().unwrap();
    assert_eq!(
        slow_code, 200,
        "the draining replica finished its request: {slow_body}"
    );
    assert!(
        answered < slow_done,
        "the request waited for the drain instead of a cold start"
    );
    assert!(scaler.join().unwrap().status.success());
    let events = s.events();
    assert!(events.iter().any(|e| e["kind"] == "waking"), "{events:?}");
    s.ok(&["down"]);
}

#[test]
fn a_long_drain_delays_neither_another_scale_nor_the_autoscaler() {
    let (slow_port, other_port) = (free_port(), free_port());
    let s = TestStack::new(&format!(
        "services:{}{}",
        service(
            "slow",
            slow_port,
            r#"    x-capstan:
      healthcheck: {http: /healthz, interval: 1s, timeout: 1s, retries: 3}
      metrics: {disable: true}
"#
        ),
        service(
            "other",
            other_port,
            r#"    x-capstan:
      healthcheck: {http: /healthz, interval: 1s, timeout: 1s, retries: 3}
      metrics: {disable: true}
      autoscale: {min: 0, max: 3, idle_after: 3s, interval: 500ms}
"#
        )
    ));
    s.up();
    wait_for("both healthy", Duration::from_secs(20), || {
        (healthy(&s, "slow") == 1 && healthy(&s, "other") == 1).then_some(())
    });
    // `other` was just used; `slow` drains a 12 s request.
    assert_eq!(http_fetch(&format!("127.0.0.1:{other_port}"), "/").0, 200);
    let slow = slow_request(slow_port, 12_000);
    std::thread::sleep(Duration::from_millis(300));
    let scaler = s.run_in_background(&["scale", "slow=0"]);
    // The autoscaler scales idle `other` to zero while `slow` drains …
    wait_for("other scaled to zero", Duration::from_secs(11), || {
        (desired(&s, "other") == 0 && s.replicas("other").is_empty()).then_some(())
    });
    let scaled_to_zero = Instant::now();
    // … and a scale of `other` by hand is done while it still drains.
    s.ok(&["scale", "other=2"]);
    wait_for("two of other healthy", Duration::from_secs(11), || {
        (healthy(&s, "other") == 2).then_some(())
    });
    let scaled_up = Instant::now();
    let (code, _, slow_done) = slow.join().unwrap();
    assert_eq!(code, 200);
    assert!(
        scaled_to_zero < slow_done,
        "the autoscaler waited for the drain"
    );
    assert!(scaled_up < slow_done, "the scale waited for the drain");
    assert!(scaler.join().unwrap().status.success());
    assert!(s.replicas("slow").is_empty());
    s.ok(&["down"]);
}

#[test]
fn a_changed_definition_under_load_fails_no_request() {
    let port = free_port();
    let yaml = |version: &str| {
        format!(
            "services:{}",
            service(
                "web",
                port,
                r#"    x-capstan:
      healthcheck: {http: /healthz, interval: 1s, timeout: 1s, retries: 3}
      metrics: {disable: true}
    deploy:
      replicas: 2
      update_config: {parallelism: 0, monitor: 0s}
"#
            )
            .replace(
                "LOG_REQUESTS: \"0\"",
                &format!("LOG_REQUESTS: \"0\"\n      VERSION: \"{version}\"")
            )
        )
    };
    let s = TestStack::new(&yaml("1.0.0"));
    s.up();
    wait_for("two healthy", Duration::from_secs(20), || {
        (healthy(&s, "web") == 2).then_some(())
    });
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 200, 10);
    std::thread::sleep(Duration::from_secs(2));
    s.write(&yaml("2.0.0"));
    let out = s.up();
    assert!(out.contains("updating web"), "{out}");
    let v = load.join().unwrap();
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests >= 1000, "{v}");
    assert_eq!(v["status"]["200"].as_u64(), Some(requests), "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    // Both new replicas were healthy before an old one was told to stop.
    let events: Vec<Value> = s
        .events()
        .into_iter()
        .filter(|e| e["service"] == "web")
        .collect();
    let at = |kind: &str, rev: u64| event_positions(&events, kind, rev);
    let (new_healthy, old_stopping) = (at("healthy", 2), at("stopping", 1));
    assert_eq!(new_healthy.len(), 2, "{events:?}");
    assert_eq!(old_stopping.len(), 2, "{events:?}");
    assert!(
        new_healthy.iter().max() < old_stopping.iter().min(),
        "{events:?}"
    );
    let now = s.replicas("web");
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.iter().all(|r| r["revision"] == "2"), "{now:?}");
    let body = http_get(port, "/").unwrap();
    assert!(body.contains("version 2.0.0"), "{body}");
    s.ok(&["down"]);
}
