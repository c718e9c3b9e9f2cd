//! `capstan up` converges to the file, and says what it did: finished replicas
//! run again, settings changes are reported, replicas that fail at once show as
//! failed with the reason, a program that takes the published port is told to
//! listen on `$PORT`, and the control API refuses what the loader refuses.

mod common;

use std::time::Duration;

use common::*;

fn one(s: &TestStack, service: &str) -> serde_json::Value {
    s.replicas(service).into_iter().next().unwrap()
}

#[test]
fn up_starts_finished_replicas_again_and_reports_settings() {
    let stack = r#"
x-capstan:
  scrape_interval: 15s
services:
  web:
    command: ["{demo}"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    restart: "no"
    x-capstan:
      healthcheck: {http: /healthz, interval: 200ms}
      metrics: {disable: true}
"#;
    let s = TestStack::new(stack);
    s.up();
    let first = wait_for("web healthy", Duration::from_secs(20), || {
        let r = one(&s, "web");
        (r["health"] == "healthy").then_some(r)
    });
    // Killed with `restart: no`: failed, and no longer shown as healthy.
    sigkill(first["pid"].as_i64().unwrap() as i32);
    let dead = wait_for("web failed", Duration::from_secs(20), || {
        let r = one(&s, "web");
        (r["state"] == "failed").then_some(r)
    });
    assert_eq!(dead["health"], "none", "{dead}");

    // `up` on the running stack starts it again, and says so.
    let out = s.up();
    assert!(out.contains("started web again"), "{out}");
    let second = wait_for("web healthy again", Duration::from_secs(20), || {
        let r = one(&s, "web");
        (r["health"] == "healthy" && r["pid"] != first["pid"]).then_some(r)
    });

    // `capstan start` on a failed service starts it too.
    sigkill(second["pid"].as_i64().unwrap() as i32);
    wait_for("web failed again", Duration::from_secs(20), || {
        (one(&s, "web")["state"] == "failed").then_some(())
    });
    s.ok(&["start", "web"]);
    wait_for("web running after start", Duration::from_secs(20), || {
        let r = one(&s, "web");
        (r["state"] == "running" && r["pid"] != second["pid"]).then_some(())
    });

    // A settings-only change is applied and reported, never "no changes".
    s.write(&stack.replace("scrape_interval: 15s", "scrape_interval: 5s"));
    let out = s.up();
    assert!(out.contains("updated the stack's settings"), "{out}");
    s.write(&stack.replace(
        "interval: 200ms}",
        "interval: 200ms}\n      proxy: {timeout: 5s}",
    ));
    let out = s.up();
    assert!(
        out.contains("updated web's settings") && !out.contains("no changes"),
        "{out}"
    );
    let out = s.up();
    assert!(out.contains("no changes"), "{out}");
    s.ok(&["down"]);
}

#[test]
fn replicas_that_fail_at_once_show_as_failed_with_the_reason() {
    let s = TestStack::new(
        r#"
services:
  oneshot:
    command: ["sh", "-c", "echo boom >&2; exit 3"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    restart: "no"
  looping:
    command: ["sh", "-c", "sleep 0.2; exit 4"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    restart: always
"#,
    );
    let out = s.up_unchecked("30s");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("exited with code 3"), "{text}");
    assert!(text.contains("exited with code 4"), "{text}");
    s.ok(&["down"]);
}

#[test]
fn a_program_on_the_published_port_is_told_to_use_port() {
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  app:
    command: ["python3", "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', {port}))"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}"}}
    ports: ["127.0.0.1:{port}:http"]
    restart: "no"
"#
    ));
    let _ = s.up_unchecked("20s");
    let hint = wait_for("the hint", Duration::from_secs(20), || {
        s.events().into_iter().find(|e| e["kind"] == "hint")
    });
    let why = hint["reason"].as_str().unwrap();
    assert!(
        why.contains("$PORT") && why.contains(&port.to_string()),
        "{why}"
    );
    s.ok(&["down"]);
}

#[test]
fn the_control_api_refuses_a_stack_the_loader_refuses() {
    let s = TestStack::new(QUIET_STACK);
    s.up();
    let loaded =
        capstan::spec::load(&s.file(), &capstan::spec::LoadOptions::from_process()).unwrap();
    let mut v = serde_json::to_value(&loaded.stack).unwrap();
    let quiet = v["services"]["quiet"].clone();
    let mut a = quiet.clone();
    a["depends_on"] = serde_json::json!({"b": {"condition": "service_started", "restart": false, "required": true}});
    let mut b = quiet.clone();
    b["depends_on"] = serde_json::json!({"a": {"condition": "service_started", "restart": false, "required": true}});
    v["services"]["a"] = a;
    v["services"]["b"] = b;
    let token = s.token();
    let (code, body) = http_post(
        &daemon_addr(&s),
        "/capstan/v1/apply",
        &[
            ("Authorization", &format!("Bearer {}", token.trim())),
            ("Content-Type", "application/json"),
        ],
        v.to_string().as_bytes(),
    );
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("dependency cycle among services a, b"),
        "{body}"
    );
    // Nothing changed.
    assert_eq!(s.ps().len(), 1);
}

/// Started from a shell that ignores SIGINT (a background job, nohup), capstan
/// still gives its replicas the default dispositions: a replica that stops on
/// SIGINT stops at once.
#[test]
fn replicas_do_not_inherit_ignored_stop_signals() {
    let s = TestStack::new(
        r#"
services:
  polite:
    command: ["sh", "-c", "trap 'echo got-int; exit 0' INT; sleep 600 & wait"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    stop_signal: SIGINT
"#,
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' INT TERM; exec {} up -d --listen 127.0.0.1:0",
            capstan_bin().display()
        ))
        .current_dir(s.dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.ok(&["stop", "polite"]);
    let stopped = s
        .events()
        .into_iter()
        .find(|e| e["service"] == "polite" && e["kind"] == "stopped")
        .unwrap();
    assert_eq!(stopped["reason"], "exited with code 0", "{stopped}");
    s.ok(&["down"]);
}
