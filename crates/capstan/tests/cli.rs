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
