//! The autoscaler end to end: `/work` load scales the demo up and, after the
//! stabilization window, back down; scale to zero and the cold start back.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn stack(autoscale: &str, extra_x: &str, env: &str) -> (TestStack, u16) {
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    command: ["{{demo}}"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
      LOG_REQUESTS: "0"
{env}
    ports: ["127.0.0.1:{port}:http"]
    stop_grace_period: 5s
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s, timeout: 1s, retries: 3}}
      metrics: {{disable: true}}
{extra_x}
      autoscale:
{autoscale}
    deploy:
      resources:
        limits:
          cpus: "0.25"
"#
    ));
    // `up` fails when the replica never gets ready (the timeout test); the
    // tests look at the state themselves.
    let _ = s.up_unchecked("20s");
    (s, port)
}

fn desired(s: &TestStack) -> u64 {
    let out = s.ok(&["autoscale", "status", "web", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["desired"].as_u64().unwrap_or(0)
}

fn running(s: &TestStack) -> usize {
    s.replicas("web")
        .iter()
        .filter(|r| r["health"] == "healthy")
        .count()
}

#[test]
fn work_load_scales_up_then_back_down() {
    let (s, port) = stack(
        "        min: 1\n        max: 3\n        interval: 1s\n        metrics: [{cpu: 50%}]\n        behavior:\n          scaleDown: {stabilizationWindowSeconds: 4}",
        "",
        "",
    );
    wait_for("one healthy replica", Duration::from_secs(20), || {
        (running(&s) == 1).then_some(())
    });
    // Four clients each asking for 40 ms of CPU: far over a quarter CPU at 50%.
    let mut load = Command::new(capstan_bin())
        .args([
            "load",
            &format!("http://127.0.0.1:{port}/work?ms=40"),
            "-c",
            "4",
            "-d",
            "30s",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a scale up", Duration::from_secs(20), || {
        (running(&s) >= 2).then_some(())
    });
    let events = s.events();
    let scaled = events
        .iter()
        .find(|e| e["kind"] == "autoscaled")
        .expect("an autoscaled event");
    let reason = scaled["reason"].as_str().unwrap();
    assert!(reason.starts_with("1 → "), "{reason}");
    assert!(
        reason.contains("cpu")
            && reason.contains("(target 50%)")
            && (reason.contains("of one CPU") || reason.contains("CPU limit")),
        "{reason}"
    );
    let status = s.ok(&["autoscale", "status", "web"]);
    assert!(
        status.contains("cpu") && status.contains("reason:"),
        "{status}"
    );
    let _ = load.kill();
    let _ = load.wait();
    // Idle: after the 4 s window the count comes back to the minimum.
    let started = Instant::now();
    wait_for("the scale down to 1", Duration::from_secs(30), || {
        (desired(&s) == 1 && s.replicas("web").len() == 1).then_some(())
    });
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "scaled down before the window"
    );
    let events = s.events();
    let downs: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "autoscaled")
        .filter_map(|e| e["reason"].as_str())
        .filter(|r| r.contains("→ 1 replicas"))
        .collect();
    assert!(!downs.is_empty(), "{events:?}");
    // The decision metrics are exposed.
    let (_, text) = http_fetch(&daemon_addr(&s), "/metrics");
    assert!(
        text.contains("capstan_autoscaler_desired_replicas{service=\"web\"} 1"),
        "{text}"
    );
    assert!(text.contains("capstan_autoscaler_metric_ratio{service=\"web\",metric=\"cpu\"}"));
}

#[test]
fn scales_to_zero_and_wakes_with_every_held_request_served() {
    let (s, port) = stack(
        "        min: 0\n        max: 2\n        idle_after: 2s\n        interval: 500ms\n        metrics: [{rps: 100}]",
        "",
        "",
    );
    wait_for("scale to zero", Duration::from_secs(20), || {
        (s.replicas("web").is_empty() && desired(&s) == 0).then_some(())
    });
    let events = s.events();
    assert!(
        events.iter().any(|e| e["kind"] == "autoscaled"
            && e["reason"].as_str().unwrap().contains("scaled to zero")),
        "{events:?}"
    );
    // Where cgroups are writable, the next start waits parked in a cgroup of
    // its own, a child of the daemon.
    let daemon = s.daemon_pid();
    let cgroups = s.api("/capstan/v1/status")["cgroups"].is_string();
    let parked = || -> Vec<i32> {
        children(daemon)
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--park"))
            })
            .collect()
    };
    let parked_pid = if cgroups {
        let p = wait_for("a parked start", Duration::from_secs(10), || {
            parked().first().copied()
        });
        // Its cgroup carries the service's CPU limit already.
        let quota = wait_for(
            "the parked helper in its cgroup",
            Duration::from_secs(5),
            || cpu_quota(p).filter(|q| q.starts_with("25000")),
        );
        eprintln!("parked helper {p}, cpu quota {quota}");
        Some(p)
    } else {
        eprintln!("cgroups are not writable here: no parked start to check");
        None
    };
    // Eight requests at once find no replica: all are held, then served.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let (code, body) = http_fetch(&format!("127.0.0.1:{port}"), "/");
                (code, body, t.elapsed())
            })
        })
        .collect();
    for t in threads {
        let (code, body, took) = t.join().unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("hello from web"), "{body}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    let events = s.events();
    assert!(events.iter().any(|e| e["kind"] == "waking"), "{events:?}");
    assert!(
        events.iter().any(|e| e["kind"] == "cold-start"),
        "{events:?}"
    );
    let (_, text) = http_fetch(&daemon_addr(&s), "/metrics");
    assert!(
        text.contains("capstan_cold_start_seconds_count{service=\"web\"} 1"),
        "{text}"
    );
    if let Some(p) = parked_pid {
        // The woken replica is the parked process, now the program, with the
        // service's limit and its own environment.
        let replica = s.replicas("web")[0]["pid"].as_i64().unwrap() as i32;
        assert_eq!(replica, p);
        assert!(cpu_quota(replica).is_some_and(|q| q.starts_with("25000")));
        let environ = std::fs::read(format!("/proc/{replica}/environ")).unwrap();
        assert!(String::from_utf8_lossy(&environ).contains("CAPSTAN_SERVICE=web"));
        // Once it stops again, another start is parked; `down` leaves none.
        wait_for("the next parked start", Duration::from_secs(20), || {
            parked().into_iter().find(|q| *q != p)
        });
        let left = parked();
        s.ok(&["down"]);
        for q in left {
            assert!(!alive(q), "parked helper {q} outlived down");
        }
    }
}

/// Pids whose parent is `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                let rest = &st[st.rfind(')').unwrap() + 2..];
                rest.split(' ').nth(1) == Some(&pid.to_string())
            })
        })
        .collect()
}

/// The CPU quota of the cgroup `pid` is in (v1: `cpu.cfs_quota_us`; v2:
/// `cpu.max`), when that cgroup is capstan's.
fn cpu_quota(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        if !path.contains("capstan") {
            continue;
        }
        if controllers.is_empty() {
            return std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")).ok();
        }
        if controllers.split(',').any(|c| c == "cpu") {
            for base in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
                if let Ok(q) = std::fs::read_to_string(format!("{base}{path}/cpu.cfs_quota_us")) {
                    return Some(q);
                }
            }
        }
    }
    None
}

#[test]
fn cold_start_timeout_answers_503_with_a_clear_body() {
    // The replica never gets ready (it listens only after ten minutes).
    let (s, port) = stack(
        "        min: 0\n        max: 1\n        idle_after: 1s\n        interval: 500ms",
        "      cold_start_timeout: 1s",
        "      STARTUP_DELAY_MS: \"600000\"",
    );
    wait_for("scale to zero", Duration::from_secs(20), || {
        (desired(&s) == 0 && s.replicas("web").is_empty()).then_some(())
    });
    let t = Instant::now();
    let (code, body) = http_fetch(&format!("127.0.0.1:{port}"), "/");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no replica became ready for web within 1.0s"),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}
