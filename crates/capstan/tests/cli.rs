//! The command line as a shell uses it: output piped into a reader that stops
//! early (`capstan ps | head -1`) ends the command quietly.

mod common;

use std::process::{Command, Stdio};

use common::*;

const STACK: &str = r#"
services:
  web:
    command: ["{demo}"]
    environment:
      CAPSTAN_TEST_MARKER: "{marker}"
    x-capstan:
      healthcheck: {http: /healthz, interval: 300ms}
      autoscale: {min: 1, max: 2, metrics: [{cpu: 80%}]}
"#;

/// Runs `capstan ARGS` with a stdout whose reader is already gone: every write
/// fails with a broken pipe.
fn run_with_closed_stdout(s: &TestStack, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(capstan_bin())
        .args(args)
        .current_dir(s.dir.path())
        .env("NO_COLOR", "1")
        .env_remove("CAPSTAN_DATA_DIR")
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn commands_end_quietly_when_their_reader_goes_away() {
    let s = TestStack::new(STACK);
    s.up();
    let commands: &[&[&str]] = &[
        &["version"],
        &["check"],
        &["config"],
        &["ps"],
        &["ps", "-o", "json"],
        &["query", "up"],
        &["query", "up", "--range", "1m", "--step", "15s"],
        &["scale", "web=1"],
        &["traces"],
        &["autoscale", "status"],
        &["events"],
        &["logs", "web"],
        &["up", "-d", "--listen", "127.0.0.1:0"],
    ];
    for args in commands {
        let out = run_with_closed_stdout(&s, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "capstan {args:?} panicked: {stderr}"
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "capstan {args:?}: {}; stderr: {stderr}",
            out.status
        );
    }
    s.ok(&["down"]);
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The data dir and what the daemon writes in it are the user's alone; a token
/// found readable by others is made private (with an event); replicas still run
/// with the user's own umask.
#[test]
fn the_data_dir_is_private_and_replicas_keep_the_users_umask() {
    use std::os::unix::fs::PermissionsExt;
    let s = TestStack::new(
        r#"
services:
  writer:
    command: ["sh", "-c", "umask > umask.txt; touch made-by-replica; exec sleep 600"]
    environment: {CAPSTAN_TEST_MARKER: "{marker}"}
    x-capstan: {metrics: {disable: true}}
"#,
    );
    let data = s.data_dir();
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("token"), "0123456789abcdef0123456789abcdef").unwrap();
    std::fs::set_permissions(data.join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    s.up();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("token")), 0o600);
    let events = s.events();
    assert!(
        events.iter().any(|e| e["reason"]
            .as_str()
            .is_some_and(|m| m.contains("token was readable by others"))),
        "{events:?}"
    );
    for f in [
        "daemon.json",
        "events.jsonl",
        "daemon.lock",
        "replicas.json",
    ] {
        let m = mode(&data.join(f));
        assert_eq!(m & 0o077, 0, "{f} has mode {m:o}");
    }
    for d in ["tsdb", "logstore", "tracestore"] {
        assert_eq!(mode(&data.join(d)), 0o700, "{d}");
    }
    // The replica's own files follow the user's umask, not the daemon's.
    let made = s.dir.path().join("made-by-replica");
    wait_for(
        "the replica's file",
        std::time::Duration::from_secs(10),
        || made.exists().then_some(()),
    );
    let user = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(user);
    assert_eq!(mode(&made), 0o666 & !user.bits());
    s.ok(&["down"]);
}

#[test]
fn the_dashboard_shows_services_replicas_and_events() {
    let s = TestStack::new(
        "services:\n  web:\n    command: [\"{demo}\"]\n    environment: {CAPSTAN_TEST_MARKER: \"{marker}\", LOG_REQUESTS: \"0\"}\n    deploy: {replicas: 2}\n    x-capstan: {metrics: {disable: true}, healthcheck: {http: /healthz, interval: 1s}}\n",
    );
    s.up();
    let (code, body) = http_fetch(&daemon_addr(&s), "/");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("<!doctype html>"), "{body}");
    assert!(
        body.contains("<a href=\"/service/web\">web</a></td><td class=ok>2/2 ready</td>"),
        "{body}"
    );
    assert!(
        body.contains(">web-0</a></td>") && body.contains(">web-1</a></td>"),
        "{body}"
    );
    assert!(body.contains("healthy"), "{body}");
    assert!(
        body.contains("<h2>Recent events</h2>") && body.contains("started"),
        "{body}"
    );
    assert!(body.contains("none firing or pending"), "{body}");
    s.ok(&["down"]);
}
