//! Canary releases end to end: the proxy shares requests between the
//! canary, a baseline and the stable revision; the analysis judges the
//! canary on the proxy's metrics and promotes it or rolls it back.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The demo as `web` with 4 replicas on `port`, `env` added to its
/// environment, rolled out as `rollout` says.
fn stack(port: u16, env: &str, rollout: &str) -> String {
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
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s, timeout: 1s, retries: 3}}
      metrics: {{disable: true}}
      rollout: {rollout}
    deploy:
      replicas: 4
"#
    )
}

fn revisions(s: &TestStack) -> Vec<String> {
    let mut r: Vec<String> = s
        .replicas("web")
        .iter()
        .map(|r| r["revision"].as_str().unwrap_or_default().to_owned())
        .collect();
    r.sort();
    r
}

fn web_events(s: &TestStack) -> Vec<Value> {
    s.events()
        .into_iter()
        .filter(|e| e["service"] == "web")
        .collect()
}

fn event(s: &TestStack, kind: &str) -> Option<Value> {
    web_events(s).into_iter().find(|e| e["kind"] == kind)
}

fn wait_event(s: &TestStack, kind: &str, timeout: Duration) -> Value {
    wait_for(&format!("a {kind} event"), timeout, || event(s, kind))
}

fn time_ms(e: &Value) -> i64 {
    e["time_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no time in {e}"))
}

/// Starts v1 with load, then deploys v2 with `env`.
fn start(
    port: u16,
    env: &str,
    rollout: &str,
    rate: u32,
    secs: u32,
) -> (TestStack, std::thread::JoinHandle<Value>) {
    let s = TestStack::new(&stack(port, "      VERSION: v1", rollout));
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), rate, secs);
    std::thread::sleep(Duration::from_secs(1));
    s.write(&stack(port, &format!("      VERSION: v2\n{env}"), rollout));
    let out = s.ok(&["deploy"]);
    assert!(out.contains("revision 1 -> 2: canary"), "{out}");
    (s, load)
}

#[test]
fn a_canary_failing_a_fifth_of_its_requests_is_rolled_back_naming_the_check() {
    let port = free_port();
    let rollout = "{strategy: canary, steps: [{weight: 20}, {pause: 30s}, {weight: 50}, {pause: 30s}], \
        analysis: {interval: 2s, failure_limit: 2, min_requests: 20, \
        checks: [{check: success-rate, min: 0.95}, {check: errors-vs-baseline}]}}";
    let (s, load) = start(port, "      FAIL_RATE: \"0.2\"", rollout, 100, 40);
    let step = wait_event(&s, "canary-step", Duration::from_secs(30));
    assert!(
        step["reason"]
            .as_str()
            .unwrap()
            .contains("revision 2 gets 20% of requests (baseline 20%, stable 60%)"),
        "{step}"
    );
    let rollback = wait_event(&s, "rollback", Duration::from_secs(30));
    let why = rollback["reason"].as_str().unwrap();
    assert!(why.contains("check "), "{why}");
    assert!(why.contains("rolling back to revision 1"), "{why}");
    // Within failure_limit intervals plus one, and the scrape's half second.
    let took = time_ms(&rollback) - time_ms(&step);
    assert!(
        took <= 2 * 2_000 + 2_000 + 1_500,
        "rolled back {took} ms after the step: {why}"
    );
    wait_for("revision 1 only", Duration::from_secs(30), || {
        (revisions(&s) == ["1", "1", "1", "1"]).then_some(())
    });
    assert!(http_get(port, "/").unwrap().contains("version v1"));
    let h: Value = serde_json::from_str(&s.ok(&["history", "web", "-o", "json"])).unwrap();
    let r2 = &h["revisions"][0];
    assert_eq!(r2["revision"], 2);
    assert_eq!(r2["status"], "rolled back");
    assert!(r2["why"].as_str().unwrap().contains("check "), "{r2}");
    let v = load.join().unwrap();
    // Only the canary's share failed, and only until the rollback.
    let errors = v["status"]["500"].as_u64().unwrap_or(0);
    let total = v["requests"].as_u64().unwrap();
    assert!(errors > 0 && errors * 50 < total, "{v}");
    let m = s.api("/api/v1/query?query=capstan_rollouts_total");
    assert!(m.to_string().contains("rolled_back"), "{m}");
    s.ok(&["down"]);
}

#[test]
fn a_healthy_canary_is_promoted_through_every_step_without_a_failed_request() {
    let port = free_port();
    let rollout = "{strategy: canary, steps: [{weight: 25}, {pause: 4s}, {weight: 50}, {pause: 4s}], \
        analysis: {interval: 1s, min_requests: 20}}";
    let (s, load) = start(port, "", rollout, 100, 40);
    // Mid-way, the status shows the step, the share and every check.
    let status = wait_for("a verdict in the status", Duration::from_secs(30), || {
        let out = s.ok(&["rollout", "status", "web"]);
        out.contains("errors-vs-baseline").then_some(out)
    });
    assert!(
        status.contains("web: canary of revision 2 over 1"),
        "{status}"
    );
    assert!(
        status.contains("baseline: replica 4 of revision 1"),
        "{status}"
    );
    assert!(status.contains("latency-vs-baseline"), "{status}");
    let rolled = wait_event(&s, "rolled", Duration::from_secs(60));
    assert!(
        rolled["reason"]
            .as_str()
            .unwrap()
            .contains("revision 2 is rolled out")
    );
    wait_for("revision 2 only", Duration::from_secs(30), || {
        (revisions(&s) == ["2", "2", "2", "2"]).then_some(())
    });
    let kinds: Vec<String> = web_events(&s)
        .iter()
        .filter(|e| {
            ["canary-step", "promoted", "rolled", "rollback"].contains(&e["kind"].as_str().unwrap())
        })
        .map(|e| {
            format!(
                "{}: {}",
                e["kind"].as_str().unwrap(),
                e["reason"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(kinds.len(), 4, "{kinds:#?}");
    assert!(kinds[0].contains("gets 25% of requests"), "{kinds:#?}");
    assert!(
        kinds[1].contains("gets 50% of requests (baseline 50%, stable 0%)"),
        "{kinds:#?}"
    );
    assert!(kinds[2].starts_with("promoted"), "{kinds:#?}");
    let v = load.join().unwrap();
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["status"]["200"], v["requests"], "{v}");
    let m = s.api("/api/v1/query?query=capstan_rollout_verdicts_total");
    assert!(m.to_string().contains("\"result\":\"pass\""), "{m}");
    s.ok(&["down"]);
}

#[test]
fn a_one_percent_regression_is_decided_by_the_sequential_test_with_its_sample_sizes() {
    let port = free_port();
    let rollout = "{strategy: canary, steps: [{weight: 50}, {pause: {}}], \
        analysis: {interval: 2s, min_requests: 50, checks: [{check: errors-vs-baseline}]}}";
    let (s, load) = start(port, "      FAIL_RATE: \"0.01\"", rollout, 200, 60);
    let rollback = wait_event(&s, "rollback", Duration::from_secs(60));
    let why = rollback["reason"].as_str().unwrap();
    assert!(why.contains("check errors-vs-baseline failed"), "{why}");
    assert!(why.contains("mixture SPRT"), "{why}");
    let verdict = web_events(&s)
        .into_iter()
        .filter(|e| e["kind"] == "verdict")
        .find(|e| {
            e["reason"]
                .as_str()
                .unwrap()
                .contains("errors-vs-baseline: fail")
        })
        .expect("a failing verdict");
    let text = verdict["reason"].as_str().unwrap();
    // The decision comes with Λ, its bound and both sides' sample sizes.
    assert!(text.contains("threshold Λ < 100 (α 0.01)"), "{text}");
    assert!(text.contains("5xx: canary "), "{text}");
    assert!(text.contains(", baseline 0 of "), "{text}");
    drop(load.join());
    s.ok(&["down"]);
}

#[test]
fn low_traffic_is_inconclusive_and_waits_until_aborted() {
    let port = free_port();
    let rollout = "{strategy: canary, steps: [{weight: 50}, {pause: 3s}], \
        analysis: {interval: 1s, min_requests: 200, deadline: 5m}}";
    let (s, load) = start(port, "      FAIL_RATE: \"0.5\"", rollout, 2, 20);
    let status = wait_for("an inconclusive status", Duration::from_secs(30), || {
        let out = s.ok(&["rollout", "status", "web"]);
        out.contains("waiting for a conclusive verdict")
            .then_some(out)
    });
    assert!(status.contains("inconclusive: the canary has "), "{status}");
    assert!(status.contains(" of 200 requests"), "{status}");
    std::thread::sleep(Duration::from_secs(5));
    // Neither failed nor passed: both revisions still run.
    assert!(event(&s, "rollback").is_none());
    assert!(event(&s, "promoted").is_none());
    assert!(
        revisions(&s).contains(&"2".to_owned()),
        "{:?}",
        revisions(&s)
    );
    let out = s.ok(&["abort", "web"]);
    assert!(out.contains("aborted web's canary"), "{out}");
    wait_for("revision 1 only", Duration::from_secs(30), || {
        (revisions(&s) == ["1", "1", "1", "1"]).then_some(())
    });
    let out = s.ok(&["rollout", "status", "web"]);
    assert!(out.contains("web: revision 1, no rollout"), "{out}");
    let rollback = event(&s, "rollback").unwrap();
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap()
            .contains("aborted with `capstan abort`")
    );
    drop(load.join());
    s.ok(&["down"]);
}

/// Requests with `cookie` (if any); the version that answered and the
/// cookie it set.
fn fetch_with_cookie(port: u16, cookie: Option<&str>) -> (String, Option<String>) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let extra = cookie
        .map(|v| format!("Cookie: other=1; canary={v}\r\n"))
        .unwrap_or_default();
    write!(c, "GET / HTTP/1.0\r\nHost: localhost\r\n{extra}\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let version = if out.contains("version v2") {
        "v2"
    } else {
        "v1"
    };
    let set = out
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: canary="))
        .map(|v| v.split(';').next().unwrap().to_owned());
    (version.to_owned(), set)
}

#[test]
fn a_paused_canary_waits_for_promote_and_keeps_clients_on_their_side() {
    let port = free_port();
    let rollout = "{strategy: canary, steps: [{weight: 30}, {pause: {}}], sticky: {cookie: canary}, \
        analysis: {interval: 1s, min_requests: 10}}";
    let (s, load) = start(port, "", rollout, 50, 30);
    wait_for("a paused canary", Duration::from_secs(30), || {
        let out = s.ok(&["rollout", "status", "web"]);
        out.contains("paused: waiting for `capstan promote`")
            .then_some(())
    });
    // A new client gets a cookie; with it, it always lands on the same side.
    let mut sides = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let (first, cookie) = fetch_with_cookie(port, None);
        let cookie = cookie.expect("a sticky cookie");
        for _ in 0..5 {
            assert_eq!(
                fetch_with_cookie(port, Some(&cookie)).0,
                first,
                "cookie {cookie}"
            );
        }
        *sides.entry(first).or_insert(0) += 1;
    }
    assert!(
        sides.contains_key("v1") && sides.contains_key("v2"),
        "{sides:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        event(&s, "promoted").is_none(),
        "promoted without being asked"
    );
    let out = s.ok(&["promote", "web"]);
    assert!(out.contains("promoting web"), "{out}");
    wait_event(&s, "rolled", Duration::from_secs(30));
    wait_for("revision 2 only", Duration::from_secs(30), || {
        (revisions(&s) == ["2", "2", "2", "2"]).then_some(())
    });
    // Nothing to promote any more.
    let out = s.run(&["promote", "web"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("web has no canary under way"));
    let v = load.join().unwrap();
    assert_eq!(v["errors"], 0, "{v}");
    s.ok(&["down"]);
}

#[test]
fn a_revision_that_degrades_after_promotion_is_rolled_back_during_bake() {
    let port = free_port();
    let rollout = "{strategy: canary, steps: [{weight: 50}, {pause: 3s}], bake: 60s, \
        analysis: {interval: 1s, min_requests: 20, checks: [{check: errors-vs-baseline}]}}";
    let (s, load) = start(
        port,
        "      FAIL_RATE: \"0.3\"\n      FAIL_AFTER_MS: \"15000\"",
        rollout,
        100,
        50,
    );
    wait_event(&s, "promoted", Duration::from_secs(30));
    let rollback = wait_event(&s, "rollback", Duration::from_secs(60));
    let why = rollback["reason"].as_str().unwrap();
    assert!(why.contains("after promotion, during the 1m bake"), "{why}");
    assert!(why.contains("errors-vs-baseline"), "{why}");
    wait_for("revision 1 only", Duration::from_secs(30), || {
        (revisions(&s) == ["1", "1", "1", "1"]).then_some(())
    });
    assert!(http_get(port, "/").unwrap().contains("version v1"));
    drop(load.join());
    s.ok(&["down"]);
}

#[test]
fn a_daemon_killed_mid_canary_comes_back_on_the_stable_revision() {
    let port = free_port();
    let rollout =
        "{strategy: canary, steps: [{weight: 20}, {pause: {}}], analysis: {interval: 1s}}";
    let s = TestStack::new(&stack(port, "      VERSION: v1", rollout));
    s.up();
    s.write(&stack(port, "      VERSION: v2", rollout));
    s.ok(&["deploy"]);
    wait_for("a paused canary", Duration::from_secs(30), || {
        let out = s.ok(&["rollout", "status", "web"]);
        out.contains("paused").then_some(())
    });
    assert_eq!(
        revisions(&s),
        ["1", "1", "1", "1", "1", "2"],
        "4 stable, a baseline, a canary"
    );
    let daemon = s.daemon_pid();
    sigkill(daemon);
    wait_for("the daemon gone", Duration::from_secs(5), || {
        (!alive(daemon)).then_some(())
    });
    // The next daemon does not promote what was never judged.
    s.up();
    wait_for(
        "four replicas of revision 1",
        Duration::from_secs(30),
        || (revisions(&s) == ["1", "1", "1", "1"]).then_some(()),
    );
    wait_for(
        "nothing of the killed daemon's left",
        Duration::from_secs(30),
        || (s.marked_pids().len() == 4).then_some(()),
    );
    assert_eq!(
        s.ok(&["rollout", "status"]),
        "web: revision 1, no rollout\n"
    );
    assert!(http_get(port, "/").unwrap().contains("version v1"));
    let h: Value = serde_json::from_str(&s.ok(&["history", "web", "-o", "json"])).unwrap();
    assert_eq!(h["revisions"][0]["revision"], 2, "{h}");
    assert_eq!(h["revisions"][0]["status"], "rolled back", "{h}");
    assert!(
        h["revisions"][0]["why"]
            .as_str()
            .unwrap()
            .contains("the daemon stopped during its canary"),
        "{h}"
    );
    assert_eq!(h["revisions"][1]["status"], "active", "{h}");
    // Deploying again starts a new canary, numbered on.
    let out = s.ok(&["deploy"]);
    assert!(out.contains("revision 1 -> 3: canary"), "{out}");
    s.ok(&["abort", "web"]);
    s.ok(&["down"]);
}

#[test]
fn a_rolling_batch_failing_its_analysis_is_rolled_back() {
    let port = free_port();
    let rollout = "{strategy: rolling, analysis: {interval: 1s, min_requests: 30}}";
    let s = TestStack::new(&stack(port, "      VERSION: v1", rollout));
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 100, 40);
    std::thread::sleep(Duration::from_secs(1));
    s.write(&stack(
        port,
        "      VERSION: v2\n      FAIL_RATE: \"0.3\"",
        rollout,
    ));
    let out = s.up_unchecked("120s");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("revision 2: check errors-vs-baseline failed"),
        "{said}"
    );
    assert!(said.contains("rolled back to revision 1"), "{said}");
    wait_for("revision 1 only", Duration::from_secs(30), || {
        (revisions(&s) == ["1", "1", "1", "1"]).then_some(())
    });
    // The first batch (one replica) was judged against the other three.
    let verdict = event(&s, "verdict").expect("a verdict event");
    assert!(
        verdict["reason"].as_str().unwrap().contains("new / "),
        "{verdict}"
    );
    drop(load.join());
    s.ok(&["down"]);
}
