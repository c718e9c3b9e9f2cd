//! Safe releases end to end: rolling updates under load, automatic rollback
//! of a revision that does not become healthy, history and rollback.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The demo as `web`, `replicas` of it, published on `port`, with `env`
/// added to its environment.
fn stack(port: u16, replicas: u32, env: &str, update: &str) -> String {
    format!(
        r#"
services:
  web:
    command: ["{{demo}}"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
      LOG_REQUESTS: "0"
{env}
    ports: ["127.0.0.1:{port}:http"]
    stop_grace_period: 20s
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s, timeout: 1s, retries: 3}}
      metrics: {{disable: true}}
    deploy:
      replicas: {replicas}
      update_config: {update}
"#
    )
}

fn revisions(s: &TestStack) -> Vec<String> {
    s.replicas("web")
        .iter()
        .map(|r| r["revision"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn history(s: &TestStack) -> Vec<Value> {
    let out = s.ok(&["history", "web", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["revisions"].as_array().unwrap().clone()
}

#[test]
fn a_rolling_update_under_load_fails_no_request() {
    let port = free_port();
    let update = "{parallelism: 1, monitor: 2s}";
    let s = TestStack::new(&stack(port, 4, "      VERSION: v1", update));
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 200, 30);
    std::thread::sleep(Duration::from_secs(2));
    s.write(&stack(port, 4, "      VERSION: v2", update));
    let out = s.up();
    assert!(
        out.contains("updating web (revision 1 -> 2: rolling, 1 at a time, start-first)"),
        "{out}"
    );
    assert_eq!(revisions(&s), ["2", "2", "2", "2"]);
    let v = load.join().unwrap();
    let requests = v["requests"].as_u64().unwrap();
    assert!(requests >= 5000, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["status"]["200"].as_u64(), Some(requests), "{v}");
    // One at a time: each old replica stops after a new one is healthy, and
    // the first stops before the last new one starts.
    let events: Vec<Value> = s
        .events()
        .into_iter()
        .filter(|e| e["service"] == "web")
        .collect();
    let at = |kind: &str, rev: u64| event_positions(&events, kind, rev);
    let (new_started, old_stopping) = (at("started", 2), at("stopping", 1));
    assert_eq!(new_started.len(), 4, "{events:?}");
    assert_eq!(old_stopping.len(), 4, "{events:?}");
    assert!(old_stopping[0] < new_started[3], "{events:?}");
    assert!(at("healthy", 2)[0] < old_stopping[0], "{events:?}");
    // The history has both revisions, with what changed.
    let h = history(&s);
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h[0]["revision"], 2);
    assert_eq!(h[0]["status"], "active");
    assert_eq!(
        h[0]["diff"],
        serde_json::json!(["environment.VERSION: \"v1\" -> \"v2\""])
    );
    assert_eq!(h[1]["status"], "superseded");
    let table = s.ok(&["history", "web"]);
    assert!(
        table.contains("~ environment.VERSION: \"v1\" -> \"v2\""),
        "{table}"
    );
    s.ok(&["down"]);
}

#[test]
fn a_revision_that_never_gets_healthy_is_rolled_back_and_v1_serves_throughout() {
    let port = free_port();
    let update = "{parallelism: 1, monitor: 1s}";
    let s = TestStack::new(&stack(port, 2, "      VERSION: v1", update));
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 100, 25);
    std::thread::sleep(Duration::from_secs(1));
    // Listening only after a minute: far beyond its health budget.
    s.write(&stack(
        port,
        2,
        "      VERSION: v2\n      STARTUP_DELAY_MS: \"60000\"",
        update,
    ));
    let out = s.up_unchecked("60s");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("not ready within"), "{said}");
    assert!(said.contains("rolled back to revision 1"), "{said}");
    wait_for("revision 1 only", Duration::from_secs(30), || {
        (revisions(&s) == ["1", "1"]).then_some(())
    });
    let v = load.join().unwrap();
    assert_eq!(v["errors"], 0, "{v}");
    assert!(http_get(port, "/").unwrap().contains("version v1"));
    let rollback = s
        .events()
        .into_iter()
        .find(|e| e["kind"] == "rollback")
        .expect("a rollback event");
    let why = rollback["reason"].as_str().unwrap();
    assert!(
        why.contains("its health budget") && why.contains("rolling back to revision 1"),
        "{why}"
    );
    let h = history(&s);
    assert_eq!(h[0]["revision"], 2);
    assert_eq!(h[0]["status"], "rolled back");
    assert!(
        h[0]["why"].as_str().unwrap().contains("not ready within"),
        "{h:?}"
    );
    assert_eq!(h[1]["status"], "active");
    s.ok(&["down"]);
}

#[test]
fn rollback_to_an_earlier_revision() {
    let port = free_port();
    let update = "{parallelism: 0, monitor: 0s}";
    let s = TestStack::new(&stack(port, 2, "      VERSION: v1", update));
    s.up();
    for v in ["v2", "v3"] {
        s.write(&stack(port, 2, &format!("      VERSION: {v}"), update));
        s.up();
    }
    assert!(http_get(port, "/").unwrap().contains("version v3"));
    let out = s.ok(&["rollback", "web", "--to", "1"]);
    assert!(out.contains("rolled web back to revision 1"), "{out}");
    assert!(http_get(port, "/").unwrap().contains("version v1"));
    assert_eq!(revisions(&s), ["1", "1"]);
    let h = history(&s);
    let status = |r: u64| {
        h.iter()
            .find(|x| x["revision"] == r)
            .map(|x| x["status"].as_str().unwrap().to_owned())
    };
    assert_eq!(status(1).as_deref(), Some("active"));
    assert_eq!(status(2).as_deref(), Some("superseded"));
    assert_eq!(status(3).as_deref(), Some("rolled back"));
    // Without --to: the revision before the current one; none before 1.
    let out = s.run(&["rollback", "web"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no earlier revision"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.ok(&["down"]);
}

#[test]
fn deploy_prints_the_plan_and_merges_override_files() {
    let port = free_port();
    let update = "{parallelism: 0, monitor: 0s}";
    let s = TestStack::new(&stack(port, 2, "      VERSION: v1", update));
    s.up();
    // The production overlay: a new version and more replicas.
    std::fs::write(
        s.dir.path().join("prod.yaml"),
        "services:\n  web:\n    environment: {VERSION: v2}\n    deploy: {replicas: 3}\n",
    )
    .unwrap();
    let base = s.dir.path().join("capstan.yaml");
    let base = base.to_str().unwrap();
    let out = s.ok(&["deploy", "-f", base, "-f", "prod.yaml", "--dry-run"]);
    assert!(
        out.contains("~ web  update: rolling all at once, start-first"),
        "{out}"
    );
    assert!(
        out.contains("environment.VERSION: \"v1\" -> \"v2\""),
        "{out}"
    );
    assert!(out.contains("deploy.replicas: 2 -> 3"), "{out}");
    // --dry-run changed nothing.
    assert_eq!(revisions(&s), ["1", "1"]);
    let out = s.ok(&["deploy", "-f", base, "-f", "prod.yaml"]);
    assert!(out.contains("applied to the running daemon"), "{out}");
    assert_eq!(revisions(&s), ["2", "2", "2"]);
    assert!(http_get(port, "/").unwrap().contains("version v2"));
    // An invalid overlay changes nothing, and says where it is wrong.
    std::fs::write(
        s.dir.path().join("bad.yaml"),
        "services:\n  web:\n    deploy: {replicas: many}\n",
    )
    .unwrap();
    let out = s.run(&["deploy", "-f", base, "-f", "bad.yaml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:3:24: services.web.deploy.replicas"),
        "{err}"
    );
    assert_eq!(revisions(&s), ["2", "2", "2"]);
    s.ok(&["down"]);
}

#[test]
fn a_daemon_killed_mid_rollout_leaves_one_revision_after_up() {
    let port = free_port();
    let update = "{parallelism: 1, monitor: 3s}";
    let s = TestStack::new(&stack(port, 4, "      VERSION: v1", update));
    s.up();
    s.write(&stack(port, 4, "      VERSION: v2", update));
    // `up` waits for the rollout; the daemon dies in the middle of it.
    let rolling = s.run_in_background(&["up", "-d", "--listen", "127.0.0.1:0"]);
    wait_for(
        "a replica of each revision",
        Duration::from_secs(30),
        || {
            let r = revisions(&s);
            (r.contains(&"1".to_owned()) && r.contains(&"2".to_owned())).then_some(())
        },
    );
    let status = s.ok(&["rollout", "status", "web"]);
    assert!(
        status.starts_with("web: rolling revision 1 -> 2 (1 at a time, start-first) for "),
        "{status}"
    );
    assert!(status.contains("new replicas ready"), "{status}");
    let daemon = s.daemon_pid();
    sigkill(daemon);
    wait_for("the daemon gone", Duration::from_secs(5), || {
        (!alive(daemon)).then_some(())
    });
    let _ = rolling.join();
    // The next daemon runs the file's revision, and only it.
    s.up();
    wait_for(
        "four replicas of revision 2",
        Duration::from_secs(30),
        || (revisions(&s) == ["2", "2", "2", "2"]).then_some(()),
    );
    assert_eq!(
        s.marked_pids().len(),
        4,
        "nothing of the killed daemon's is left"
    );
    assert_eq!(
        s.ok(&["rollout", "status"]),
        "web: revision 2, no rollout\n"
    );
    assert!(http_get(port, "/").unwrap().contains("version v2"));
    let h = history(&s);
    assert_eq!(h[0]["revision"], 2, "{h:?}");
    assert_eq!(h[0]["status"], "active", "{h:?}");
    assert_eq!(h[1]["revision"], 1, "{h:?}");
    assert_eq!(h[1]["status"], "superseded", "{h:?}");
    // Numbers go on from there.
    s.write(&stack(
        port,
        4,
        "      VERSION: v3",
        "{parallelism: 0, monitor: 0s}",
    ));
    s.up();
    assert_eq!(revisions(&s), ["3", "3", "3", "3"]);
    s.ok(&["down"]);
}

/// A webhook receiver on a free port: answers 500 to its first request and
/// 200 to the others; the bodies it got (the refused one too).
fn receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut c) = conn else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Head, then as much body as Content-Length says.
            let body = loop {
                let Ok(k) = c.read(&mut chunk) else {
                    break None;
                };
                if k == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(body[..len].to_owned());
                    }
                }
            };
            if let Some(b) = body.and_then(|b| serde_json::from_str(&b).ok()) {
                seen.lock().unwrap().push(b);
            }
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (port, got)
}

#[test]
fn releases_are_posted_to_the_webhook_and_counted() {
    let (hook, got) = receiver();
    let port = free_port();
    let update = "{parallelism: 0, monitor: 0s}";
    let with_hook = |v: &str| {
        format!(
            "x-capstan:\n  notify: {{webhook: \"http://127.0.0.1:{hook}/hook\"}}\n{}",
            stack(port, 1, &format!("      VERSION: {v}"), update)
        )
    };
    let s = TestStack::new(&with_hook("v1"));
    s.up();
    s.write(&with_hook("v2"));
    s.up();
    // The first delivery is refused and tried again.
    wait_for(
        "the deploy and its end, delivered",
        Duration::from_secs(20),
        || {
            let got = got.lock().unwrap().clone();
            let kinds: Vec<&str> = got.iter().filter_map(|v| v["kind"].as_str()).collect();
            (kinds.iter().filter(|k| **k == "updated").count() == 2 && kinds.contains(&"rolled"))
                .then_some(())
        },
    );
    let first = got.lock().unwrap()[0].clone();
    assert_eq!(first["service"], "web", "{first}");
    assert!(
        first["reason"]
            .as_str()
            .unwrap()
            .contains("revision 1 -> 2 (rolling, all at once"),
        "{first}"
    );
    let metrics = {
        use std::io::{Read, Write};
        let token = s.token();
        let mut c = std::net::TcpStream::connect(daemon_addr(&s)).unwrap();
        write!(
            c,
            "GET /metrics HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            token.trim()
        )
        .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        metrics.contains("capstan_rollouts_total{service=\"web\",result=\"rolled\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("capstan_service_revision{service=\"web\",status=\"active\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("capstan_notifications_total{result=\"sent\"}"),
        "{metrics}"
    );
    s.ok(&["down"]);
}
