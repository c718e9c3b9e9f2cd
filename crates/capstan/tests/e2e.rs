//! End-to-end tests: the real capstan binary supervising the real demo service.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;

const WEB: &str = r#"
services:
  web:
    command: ["{demo}"]
    environment:
      CAPSTAN_TEST_MARKER: "{marker}"
      VERSION: "2.0.0"
    x-capstan:
      healthcheck: {http: /healthz, interval: 300ms, timeout: 1s, retries: 2}
    stop_grace_period: 5s
    deploy:
      replicas: 3
      restart_policy: {condition: any, delay: 100ms}
  client:
    command: ["sh", "-c", "echo client up; exec sleep 600"]
    environment:
      CAPSTAN_TEST_MARKER: "{marker}"
    depends_on:
      web: {condition: service_healthy}
    restart: always
"#;

fn healthy(r: &serde_json::Value) -> bool {
    r["state"] == "running" && r["health"] == "healthy"
}

#[test]
fn up_ps_restart_on_kill_and_down() {
    let s = TestStack::new(WEB);
    let out = s.up();
    assert!(out.contains("3/3 healthy"), "{out}");
    let web = s.replicas("web");
    assert_eq!(web.len(), 3);
    assert!(web.iter().all(healthy), "{web:?}");
    let ports: Vec<u64> = web.iter().map(|r| r["port"].as_u64().unwrap()).collect();
    let body = http_get(ports[1] as u16, "/").unwrap();
    assert!(
        body.contains("hello from web version 2.0.0 replica 1"),
        "{body}"
    );

    // depends_on service_healthy: the client started only after every web replica was healthy.
    let events = s.events();
    let last_healthy = events
        .iter()
        .filter(|e| e["service"] == "web" && e["kind"] == "healthy")
        .map(|e| e["time_ms"].as_i64().unwrap())
        .max()
        .unwrap();
    let client_started = events
        .iter()
        .find(|e| e["service"] == "client" && e["kind"] == "started")
        .unwrap();
    assert!(
        client_started["time_ms"].as_i64().unwrap() >= last_healthy,
        "{events:?}"
    );

    // Killing a replica's process: it is restarted, with an event, and becomes healthy again.
    let victim = web[0]["pid"].as_i64().unwrap();
    sigkill(victim as i32);
    let restarted = wait_for(
        "web-0 restarted and healthy",
        Duration::from_secs(20),
        || {
            s.replicas("web").into_iter().find(|r| {
                r["replica"] == 0
                    && r["restarts"] == 1
                    && healthy(r)
                    && r["pid"].as_i64() != Some(victim)
            })
        },
    );
    assert_eq!(restarted["last_exit"], "killed by SIGKILL");
    let events = s.events();
    assert!(
        events.iter().any(|e| e["replica"] == 0
            && e["kind"] == "exited"
            && e["reason"].as_str().unwrap().contains("SIGKILL")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e["replica"] == 0
            && e["kind"] == "restarting"
            && e["reason"].as_str().unwrap().starts_with("restarting in")),
        "{events:?}"
    );

    // down: SIGTERM first (the demo logs its clean shutdown), nothing left in /proc.
    let daemon = s.daemon_pid();
    assert_eq!(s.marked_pids().len(), 4, "3 web + 1 client");
    s.ok(&["down"]);
    assert!(!alive(daemon), "the daemon exited");
    assert!(
        s.marked_pids().is_empty(),
        "processes left: {:?}",
        s.marked_pids()
    );
    let logs = s.stored_logs("web");
    assert!(
        logs.matches("signal\\\":\\\"SIGTERM").count() >= 3 || logs.matches("SIGTERM").count() >= 3,
        "{logs}"
    );
    assert!(logs.matches("clean shutdown").count() >= 3, "{logs}");
}

#[test]
fn a_service_that_exits_at_once_is_crash_looping() {
    let s = TestStack::new(
        r#"
services:
  broken:
    command: ["sh", "-c", "echo about to fail; exit 3"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    restart: always
"#,
    );
    let out = s.run(&["up", "-d", "--listen", "127.0.0.1:0"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "up reports the failure: {out:?}"
    );
    let r = wait_for("crash-looping", Duration::from_secs(20), || {
        s.replicas("broken")
            .into_iter()
            .find(|r| r["state"] == "crash-looping")
    });
    assert_eq!(r["last_exit"], "exited with code 3");
    assert!(r["restarts"].as_u64().unwrap() >= 3);
    let events = s.events();
    assert!(
        events.iter().any(|e| e["kind"] == "crash-looping"),
        "{events:?}"
    );
    // Backoff grows: the announced delays are increasing.
    let delays: Vec<String> = events
        .iter()
        .filter(|e| e["kind"] == "restarting")
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        delays.len() >= 3
            && delays[0] == "restarting in 100ms"
            && delays[1] == "restarting in 200ms"
            && delays[2] == "restarting in 400ms",
        "{delays:?}"
    );
    assert!(s.ok(&["logs", "broken"]).contains("about to fail"));
}

#[test]
fn sigkill_of_the_daemon_then_up_leaves_exactly_the_configured_replicas() {
    let s = TestStack::new(&WEB.replace("replicas: 3", "replicas: 2"));
    s.up();
    let before = s.marked_pids();
    assert_eq!(before.len(), 3);
    let daemon = s.daemon_pid();
    sigkill(daemon);
    wait_for("daemon gone", Duration::from_secs(5), || {
        (!alive(daemon)).then_some(())
    });
    let out = s.up();
    assert!(out.contains("2/2 healthy"), "{out}");
    let after = s.marked_pids();
    assert_eq!(after.len(), 3, "exactly the configured replicas: {after:?}");
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "old replicas were stopped: {before:?} {after:?}"
    );
    let events = s.events();
    assert!(
        events.iter().any(|e| e["kind"] == "stopping"
            && e["reason"].as_str().unwrap().contains("previous daemon")),
        "{events:?}"
    );
}

#[test]
fn scale_up_and_down_and_apply_changes() {
    let s = TestStack::new(&WEB.replace("replicas: 3", "replicas: 1"));
    s.up();
    s.ok(&["scale", "web=5"]);
    wait_for("5 healthy web replicas", Duration::from_secs(30), || {
        (s.replicas("web").iter().filter(|r| healthy(r)).count() == 5).then_some(())
    });
    assert_eq!(s.marked_pids().len(), 6);
    s.ok(&["scale", "web=1"]);
    let web = s.replicas("web");
    assert_eq!(web.len(), 1, "{web:?}");
    assert_eq!(s.marked_pids().len(), 2);
    let bad = s.run(&["scale", "nope=2"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no such service: nope"));

    // A second `up` applies the changed file to the running daemon.
    let daemon = s.daemon_pid();
    s.write(&WEB.replace("replicas: 3", "replicas: 2"));
    let out = s.up();
    assert!(out.contains("applied to the running daemon"), "{out}");
    assert_eq!(s.daemon_pid(), daemon);
    assert_eq!(s.replicas("web").len(), 2);
    // Changing the definition restarts the service with the new environment.
    s.write(
        &WEB.replace("replicas: 3", "replicas: 2")
            .replace("2.0.0", "3.0.0"),
    );
    let out = s.up();
    assert!(out.contains("updating web"), "{out}");
    let port = s.replicas("web")[0]["port"].as_u64().unwrap() as u16;
    assert!(http_get(port, "/").unwrap().contains("version 3.0.0"));
}

#[test]
fn logs_from_all_replicas_and_follow_across_rotation() {
    let s = TestStack::new(
        r#"
x-capstan:
  logs: {max_file_size: 1k, max_total_size: 10m}
services:
  web:
    command: ["{demo}"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan:
      healthcheck: {http: /healthz, interval: 300ms}
    deploy: {replicas: 2}
  chatty:
    command: ["sh", "-c", "i=0; while [ $$i -lt 400 ]; do i=$$((i+1)); echo line $$i; sleep 0.005; done; sleep 600"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
"#,
    );
    s.up();
    let follower = s.follow(&["logs", "chatty", "-f", "--output", "json"], |v| {
        v["line"] == "line 400"
    });
    let got = follower.finish("the follower to read line 400", Duration::from_secs(30));
    let lines: Vec<&str> = got.iter().map(|v| v["line"].as_str().unwrap()).collect();
    assert_eq!(
        lines,
        (1..=400).map(|i| format!("line {i}")).collect::<Vec<_>>(),
        "every line once, in order"
    );
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence numbers increase"
    );
    let segments = std::fs::read_dir(s.data_dir().join("logstore"))
        .unwrap()
        .count();
    // Sealed segments are merged by compaction (every ten seconds): besides
    // the active one, at least one must be there.
    assert!(segments > 1, "the log rotated ({segments} segments)");

    let all = s.ok(&["logs", "web"]);
    assert!(all.contains("web-0") && all.contains("web-1"), "{all}");
    let tail = s.ok(&["logs", "chatty", "--tail", "5"]);
    assert_eq!(tail.lines().count(), 5, "{tail}");
    assert!(tail.lines().last().unwrap().ends_with("line 400"), "{tail}");
    let none = s.ok(&["logs", "chatty", "--since", "2100-01-01T00:00:00Z"]);
    assert!(none.is_empty());
}

#[test]
fn memory_limit_is_enforced_with_cgroups() {
    let s = TestStack::new(
        r#"
services:
  hog:
    command: ["{demo}"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan:
      healthcheck: {tcp: true, interval: 300ms}
    deploy:
      resources: {limits: {memory: 48m}}
      restart_policy: {condition: on-failure, delay: 100ms}
"#,
    );
    s.up();
    let events = s.events();
    if let Some(w) = events.iter().find(|e| {
        e["kind"] == "warning"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("cgroups unavailable")
    }) {
        eprintln!("skipping: {}", w["reason"]);
        return;
    }
    let r = &s.replicas("hog")[0];
    let port = r["port"].as_u64().unwrap() as u16;
    // Allocate past the limit: the kernel kills the replica.
    let _ = http_get(port, "/alloc?mb=32");
    let _ = http_get(port, "/alloc?mb=64");
    let ev = wait_for("an oom-killed event", Duration::from_secs(20), || {
        s.events().into_iter().find(|e| e["kind"] == "oom-killed")
    });
    assert_eq!(ev["service"], "hog");
    let r = wait_for("hog restarted", Duration::from_secs(20), || {
        s.replicas("hog")
            .into_iter()
            .find(|r| r["restarts"] == 1 && r["state"] == "running")
    });
    assert!(
        r["last_exit"].as_str().unwrap().contains("out of memory"),
        "{r:?}"
    );
}

#[test]
fn invalid_stack_files_start_nothing() {
    let s = TestStack::new(
        "services:\n  web:\n    command: [\"{demo}\"]\n    deploy:\n      replicas: two\n",
    );
    let out = s.run(&["up", "-d", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "capstan.yaml:5:17: services.web.deploy.replicas: expected a non-negative integer, found \"two\""
    );
    assert!(!s.data_dir().join("daemon.json").exists());
    assert_eq!(s.run(&["check"]).status.code(), Some(2));
}

#[test]
fn commands_without_a_daemon_say_how_to_start_one() {
    let s = TestStack::new("services:\n  web:\n    command: [\"{demo}\"]\n");
    let out = s.run(&["ps"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no capstan daemon is running") && err.contains("capstan up"),
        "{err}"
    );
    let cfg = s.ok(&["config"]);
    assert!(cfg.contains("replicas: 1"), "{cfg}");
    assert_eq!(s.run(&["scale", "web"]).status.code(), Some(2));
    assert_eq!(s.run(&["bogus-command"]).status.code(), Some(2));
}

/// Crash safety: the daemon is killed with SIGKILL at random points (while starting
/// replicas, while scaling, while running) in repeated trials; afterwards one `up`
/// leaves exactly the configured replicas and `down` leaves nothing.
#[test]
fn repeated_sigkill_of_the_daemon_at_random_points() {
    let s = TestStack::new(&WEB.replace("replicas: 3", "replicas: 2"));
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for trial in 0..6 {
        let mut daemon = std::process::Command::new(capstan_bin())
            .args(["daemon", "--listen", "127.0.0.1:0"])
            .current_dir(s.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let delay = random(1500);
        std::thread::sleep(Duration::from_millis(delay));
        if trial % 2 == 1 {
            // Kill it in the middle of a scale-up when it is already serving.
            let _ = s.run(&["scale", "web=4"]);
            std::thread::sleep(Duration::from_millis(random(300)));
        }
        eprintln!(
            "trial {trial}: SIGKILL after {delay}ms, {} stack processes alive",
            s.marked_pids().len()
        );
        sigkill(daemon.id() as i32);
        let _ = daemon.wait();
    }
    let out = s.up();
    assert!(out.contains("2/2 healthy"), "{out}");
    let pids = s.marked_pids();
    assert_eq!(pids.len(), 3, "exactly 2 web + 1 client: {pids:?}");
    let recorded: Vec<i64> = s.ps().iter().filter_map(|r| r["pid"].as_i64()).collect();
    assert_eq!(recorded.len(), 3);
    assert!(
        pids.iter().all(|p| recorded.contains(&i64::from(*p))),
        "every live process is a replica capstan knows: {pids:?} vs {recorded:?}"
    );
    s.ok(&["down"]);
    assert!(s.marked_pids().is_empty(), "left: {:?}", s.marked_pids());
}

#[test]
fn stop_start_restart_and_events_follow() {
    let s = TestStack::new(&WEB.replace("replicas: 3", "replicas: 2"));
    s.up();
    let follower = s.follow(&["events", "-f", "--output", "json"], |v| {
        v["kind"] == "restarted"
    });
    let before: Vec<i64> = s
        .replicas("web")
        .iter()
        .map(|r| r["pid"].as_i64().unwrap())
        .collect();
    s.ok(&["stop", "web"]);
    assert!(s.replicas("web").is_empty());
    assert!(s.ok(&["ps"]).contains("stopped"));
    assert_eq!(s.marked_pids().len(), 1, "only the client is left");
    s.ok(&["start", "web"]);
    wait_for("web back", Duration::from_secs(20), || {
        (s.replicas("web").iter().filter(|r| healthy(r)).count() == 2).then_some(())
    });
    s.ok(&["restart", "web"]);
    let after: Vec<i64> = s
        .replicas("web")
        .iter()
        .filter_map(|r| r["pid"].as_i64())
        .collect();
    assert!(after.iter().all(|p| !before.contains(p)));
    let kinds: Vec<String> = follower
        .finish(
            "the event follower to see the restart",
            Duration::from_secs(20),
        )
        .iter()
        .map(|v| {
            format!(
                "{}:{}",
                v["service"].as_str().unwrap(),
                v["kind"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "web:stopping",
        "web:stopped",
        "web:started",
        "web:healthy",
        "web:restarted",
    ] {
        assert!(
            kinds.iter().any(|k| k == want),
            "{want} missing from {kinds:?}"
        );
    }
    assert_eq!(s.run(&["stop", "nope"]).status.code(), Some(1));
}

/// `capstan up` in the foreground: SIGINT (Ctrl-C) stops every replica and exits 0.
#[test]
fn foreground_up_stops_everything_on_ctrl_c() {
    let s = TestStack::new(&WEB.replace("replicas: 3", "replicas: 2"));
    let mut up = std::process::Command::new(capstan_bin())
        .args(["up", "--listen", "127.0.0.1:0"])
        .current_dir(s.dir.path())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    while !seen.contains("2/2 healthy") {
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(e) => panic!("progress output ({e}); so far:\n{seen}"),
        };
        seen.push_str(&line);
        seen.push('\n');
    }
    assert_eq!(s.marked_pids().len(), 3);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(s.marked_pids().is_empty(), "left: {:?}", s.marked_pids());
    let mut rest = String::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        rest.push_str(&l);
        rest.push('\n');
    }
    assert!(
        rest.contains("stopping") && rest.contains("stopped"),
        "{rest}"
    );
}

/// An exec health check that starts failing makes the replica unhealthy, and the
/// restart policy restarts it; `stop_signal` and `stop_grace_period` are honoured.
#[test]
fn unhealthy_replicas_restart_and_stop_signals_are_honoured() {
    let s = TestStack::new(
        r#"
services:
  checked:
    command: ["sh", "-c", "touch healthy-$$CAPSTAN_REPLICA; exec sleep 600"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    healthcheck:
      test: ["CMD-SHELL", "test -f healthy-$$CAPSTAN_REPLICA"]
      interval: 200ms
      timeout: 1s
      retries: 2
    restart: always
  polite:
    command: ["sh", "-c", "trap 'echo got-int; exit 0' INT; sleep 600 & wait"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    stop_signal: SIGINT
  stubborn:
    command: ["sh", "-c", "trap '' TERM; echo ignoring TERM; while true; do sleep 0.1; done"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    stop_grace_period: 1s
"#,
    );
    s.up();
    let r = &s.replicas("checked")[0];
    assert!(healthy(r), "{r:?}");
    std::fs::remove_file(s.dir.path().join("healthy-0")).unwrap();
    let ev = wait_for("an unhealthy event", Duration::from_secs(20), || {
        s.events().into_iter().find(|e| e["kind"] == "unhealthy")
    });
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("2 consecutive failed checks"),
        "{ev:?}"
    );
    // The restarted replica recreates its file and is healthy again.
    wait_for(
        "checked restarted and healthy",
        Duration::from_secs(20),
        || {
            s.replicas("checked")
                .into_iter()
                .find(|r| r["restarts"] == 1 && healthy(r))
        },
    );

    s.ok(&["stop", "polite", "stubborn"]);
    let events = s.events();
    let killing = events
        .iter()
        .find(|e| e["service"] == "stubborn" && e["kind"] == "killing")
        .expect("SIGKILL after the grace period");
    assert!(
        killing["reason"]
            .as_str()
            .unwrap()
            .contains("did not exit within 1s"),
        "{killing:?}"
    );
    let stopped = events
        .iter()
        .find(|e| e["service"] == "stubborn" && e["kind"] == "stopped")
        .unwrap();
    assert_eq!(stopped["reason"], "killed by SIGKILL");
    let polite: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["service"] == "polite").collect();
    let stopped = polite.iter().find(|e| e["kind"] == "stopped").unwrap();
    assert_eq!(stopped["reason"], "exited with code 0", "{polite:?}");
    assert!(s.ok(&["logs", "polite"]).contains("got-int"));
    assert_eq!(s.marked_pids().len(), 1, "only the checked replica is left");
}

/// The control API wants the bearer token from `.capstan/token` (mode 0600);
/// the health endpoints are open.
#[test]
fn the_control_api_requires_the_token() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let s = TestStack::new(
        "services:\n  idle:\n    command: [sleep, \"600\"]\n    environment: {CAPSTAN_TEST_MARKER: \"{marker}\"}\n",
    );
    s.up();
    let token_path = s.data_dir().join("token");
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_path).unwrap();
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.data_dir().join("daemon.json")).unwrap()).unwrap();
    let addr = info["addr"].as_str().unwrap().to_owned();
    let get = |path: &str, auth: Option<&str>| {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        let auth = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(c, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    assert!(get("/capstan/v1/ps", None).starts_with("HTTP/1.0 401"));
    assert!(get("/capstan/v1/ps", Some("wrong")).starts_with("HTTP/1.0 401"));
    let ok = get("/capstan/v1/ps", Some(token.trim()));
    assert!(
        ok.starts_with("HTTP/1.0 200") && ok.contains("\"idle\""),
        "{ok}"
    );
    assert!(get("/-/healthy", None).starts_with("HTTP/1.0 200"));
    assert!(get("/-/ready", None).starts_with("HTTP/1.0 200"));
}

/// Without cgroups (here turned off, as where they are not writable) capstan warns
/// once, applies no limits, and still reports CPU and memory from /proc.
#[test]
fn without_cgroups_resources_come_from_proc() {
    let s = TestStack::new(
        r#"
services:
  web:
    command: ["{demo}"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan:
      healthcheck: {http: /healthz, interval: 300ms}
    deploy:
      replicas: 2
      resources: {limits: {memory: 32m}}
"#,
    );
    let out = s.run_env(
        &["up", "-d", "--listen", "127.0.0.1:0"],
        &[("CAPSTAN_CGROUPS", "off")],
    );
    assert!(out.status.success(), "{out:?}");
    let warnings: Vec<_> = s
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "warning")
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]["reason"]
            .as_str()
            .unwrap()
            .contains("limits are not applied")
    );
    let web = wait_for(
        "resource figures from /proc",
        Duration::from_secs(10),
        || {
            let web = s.replicas("web");
            web.iter()
                .all(|r| {
                    r["memory_bytes"].as_u64().is_some_and(|m| m > 1 << 20)
                        && r["cpu_percent"].is_number()
                })
                .then_some(web)
        },
    );
    // No cgroup: the replica is in capstan's own cgroup.
    let pid = web[0]["pid"].as_i64().unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(!cg.contains("/capstan/"), "{cg}");
}

fn last_value(series: &serde_json::Value) -> String {
    series["samples"].as_array().unwrap().last().unwrap()[1]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The daemon scrapes every replica into the metrics store: `up` and the other
/// synthetic series, the demo's own metrics; a stopped replica's series end with a
/// stale marker; everything survives a SIGKILL of the daemon.
#[test]
fn replicas_are_scraped_and_series_survive_a_daemon_kill() {
    let s = TestStack::new(
        r#"
x-capstan:
  scrape_interval: 1s
services:
  web:
    command: ["{demo}"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan:
      healthcheck: {http: /healthz, interval: 300ms}
    deploy: {replicas: 2}
  quiet:
    command: ["sleep", "600"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan:
      metrics: {disable: true}
"#,
    );
    s.up();
    let port = s.replicas("web")[1]["port"].as_u64().unwrap() as u16;
    assert!(http_get(port, "/").unwrap().contains("hello"));
    let ups = wait_for("up = 1 for both replicas", Duration::from_secs(20), || {
        let ups = s.api("/capstan/v1/tsdb/select?name=up&job=web");
        let ups = ups.as_array().unwrap().clone();
        (ups.len() == 2 && ups.iter().all(|u| last_value(u) == "1")).then_some(ups)
    });
    for u in &ups {
        assert_eq!(u["labels"]["job"], "web");
        assert!(
            u["labels"]["instance"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
    }
    // After the request, the demo exposes its counter and histogram too.
    wait_for(
        "scrape_samples_scraped to grow",
        Duration::from_secs(10),
        || {
            let v = s.api("/capstan/v1/tsdb/select?name=scrape_samples_scraped&replica=1");
            (last_value(&v[0]).parse::<f64>().unwrap() > 5.0).then_some(())
        },
    );
    let hello = wait_for(
        "the demo's request counter",
        Duration::from_secs(10),
        || {
            let v = s.api("/capstan/v1/tsdb/select?name=demo_requests_total&replica=1&path=/");
            v.as_array().unwrap().first().cloned()
        },
    );
    assert_eq!(hello["labels"]["code"], "200");

    // capstan scrapes itself: its replicas' resources and the host.
    let mem = wait_for(
        "container memory of both replicas",
        Duration::from_secs(10),
        || {
            let v = s
                .api("/capstan/v1/tsdb/select?name=container_memory_working_set_bytes&service=web");
            (v.as_array().unwrap().len() == 2).then_some(v)
        },
    );
    assert!(last_value(&mem[0]).parse::<f64>().unwrap() > 0.0, "{mem}");
    // capstan's own job and the host's are scraped on their own schedules
    // (spread over the interval): wait for their first scrapes.
    let first = |name: &str| {
        let path = format!("/capstan/v1/tsdb/select?{name}");
        wait_for(name, Duration::from_secs(30), || {
            let v = s.api(&path);
            v.as_array().and_then(|a| a.first().cloned())
        })
    };
    assert_eq!(last_value(&first("name=up&job=capstan")), "1");
    first("name=node_cpu_seconds_total&job=node&mode=idle");
    // The first scrape of capstan itself may run before any scrape finished.
    wait_for("a counted scrape", Duration::from_secs(30), || {
        let v = s.api("/capstan/v1/tsdb/select?name=capstan_scrapes_total&result=ok");
        let n: f64 = v.as_array()?.first().map(last_value)?.parse().ok()?;
        (n >= 1.0).then_some(())
    });
    let head = first("name=capstan_tsdb_head_series");
    assert!(last_value(&head).parse::<f64>().unwrap() > 10.0, "{head}");

    // Scale down: replica 1's series are marked stale.
    s.ok(&["scale", "web=1"]);
    let up1 = wait_for(
        "a stale marker for replica 1",
        Duration::from_secs(10),
        || {
            let v = s.api("/capstan/v1/tsdb/select?name=up&replica=1");
            (last_value(&v[0]) == "stale").then_some(v)
        },
    );
    let n_before = up1[0]["samples"].as_array().unwrap().len();
    let instance = up1[0]["labels"]["instance"].as_str().unwrap().to_owned();
    let demo1 = s.api("/capstan/v1/tsdb/select?name=demo_requests_total&replica=1&path=/");
    assert_eq!(last_value(&demo1[0]), "stale");
    // PromQL sees the stale marker: only replica 0 is `up` now, within the lookback.
    let q = s.api("/api/v1/query?query=up%7Bjob%3D%22web%22%7D");
    let result = q["data"]["result"].as_array().unwrap();
    assert_eq!(result.len(), 1, "{q}");
    assert_eq!(result[0]["metric"]["replica"], "0", "{q}");

    // SIGKILL the daemon: what was scraped comes back from the WAL.
    std::thread::sleep(Duration::from_millis(1500));
    sigkill(s.daemon_pid());
    s.up();
    // The restarted daemon starts a new replica 1 on another port: look at the old one.
    let up1 = s.api(&format!(
        "/capstan/v1/tsdb/select?name=up&replica=1&instance={instance}"
    ));
    assert_eq!(up1.as_array().unwrap().len(), 1, "{up1}");
    assert!(
        up1[0]["samples"].as_array().unwrap().len() >= n_before,
        "{up1}"
    );
    assert_eq!(last_value(&up1[0]), "stale");
    assert!(
        s.api("/capstan/v1/tsdb/select?name=up&service=quiet")
            .as_array()
            .unwrap()
            .is_empty()
    );
}
