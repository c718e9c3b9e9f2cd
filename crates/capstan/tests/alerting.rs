//! Alerting end to end: a Prometheus rule file next to the stack, evaluated
//! by the daemon against what it scrapes.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const RULES: &str = r#"
groups:
  - name: web
    interval: 1s
    rules:
      - record: service:http_errors:rate10s
        expr: sum by (service) (rate(http_requests_total{code=~"5.."}[10s]))
      - alert: HighServerErrorRate
        expr: service:http_errors:rate10s > 1
        for: 2s
        labels: {severity: page}
        annotations:
          summary: "{{ $labels.service }} answers {{ $value | humanize }} errors a second"
"#;

fn stack(port: u16, fail_rate: &str) -> String {
    format!(
        r#"
x-capstan:
  rule_files: ["rules/*.yml"]
  external_labels: {{site: test}}
  anomaly: [{{name: LatencyAnomaly, series: 'sum by (service) (rate(http_requests_total[10s]))', step: 1s, window: 30s, min_samples: 5}}]
services:
  web:
    command: ["{{demo}}"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
      LOG_REQUESTS: "0"
      FAIL_RATE: "{fail_rate}"
    ports: ["127.0.0.1:{port}:http"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
      metrics: {{disable: true}}
      autoscale: {{min: 2, max: 2, metrics: [{{rps: 1000}}]}}
"#
    )
}

fn alerts(s: &TestStack) -> Vec<Value> {
    s.api("/api/v1/alerts")["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_rule_file_fires_and_resolves_an_alert_with_its_template() {
    let port = free_port();
    let s = TestStack::new(&stack(port, "0.5"));
    std::fs::create_dir_all(s.file().parent().unwrap().join("rules")).unwrap();
    std::fs::write(s.file().parent().unwrap().join("rules/web.yml"), RULES).unwrap();
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 50, 40);
    // Pending first, then firing once `for` has passed.
    let firing = wait_for("a firing alert", Duration::from_secs(40), || {
        alerts(&s).into_iter().find(|a| a["state"] == "firing")
    });
    assert_eq!(firing["labels"]["alertname"], "HighServerErrorRate");
    assert_eq!(firing["labels"]["severity"], "page");
    assert_eq!(firing["labels"]["service"], "web");
    let summary = firing["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("web answers ") && summary.ends_with(" errors a second"),
        "{summary}"
    );
    let table = s.ok(&["alerts"]);
    assert!(table.contains("HighServerErrorRate"), "{table}");
    assert!(table.contains("firing"), "{table}");
    assert!(table.contains("service=web severity=page"), "{table}");
    let table = s.ok(&["rules"]);
    assert!(table.contains("service:http_errors:rate10s"), "{table}");
    assert!(table.contains("recording  ok"), "{table}");
    let rules = s.api("/api/v1/rules");
    let group = &rules["data"]["groups"][0];
    assert_eq!(group["name"], "web");
    assert_eq!(group["interval"], 1.0);
    assert_eq!(group["rules"][0]["type"], "recording");
    assert_eq!(group["rules"][0]["health"], "ok");
    assert_eq!(group["rules"][1]["type"], "alerting");
    assert_eq!(group["rules"][1]["state"], "firing");
    assert_eq!(group["rules"][1]["duration"], 2.0);
    // Filters, as Prometheus has them.
    // The anomaly rule runs as its generated group.
    let anomaly = &rules["data"]["groups"][1];
    assert_eq!(anomaly["name"], "anomaly:LatencyAnomaly", "{rules}");
    assert_eq!(anomaly["rules"][5]["type"], "alerting");
    let only = s.api("/api/v1/rules?type=record");
    assert_eq!(
        only["data"]["groups"][0]["rules"].as_array().unwrap().len(),
        1
    );
    // ALERTS and the recording rule's series are in the store.
    let q = s.api("/api/v1/query?query=ALERTS%7Balertstate%3D%22firing%22%7D");
    assert_eq!(
        q["data"]["result"][0]["metric"]["alertname"], "HighServerErrorRate",
        "{q}"
    );
    let q = s.api("/api/v1/query?query=service:http_errors:rate10s");
    assert_eq!(q["data"]["result"][0]["metric"]["service"], "web", "{q}");
    let event = wait_for("an alert event", Duration::from_secs(5), || {
        s.events()
            .into_iter()
            .find(|e| e["kind"] == "alert" && e["reason"].as_str().unwrap().contains("firing"))
    });
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .starts_with("HighServerErrorRate firing: web answers"),
        "{event}"
    );
    // SIGHUP reads the rule file again: a new rule appears, the firing
    // alert keeps its state.
    let active_at = firing["activeAt"].clone();
    let rules_file = s.file().parent().unwrap().join("rules/web.yml");
    let extra = "      - record: service:requests:rate10s\n        expr: sum by (service) (rate(http_requests_total[10s]))\n";
    std::fs::write(&rules_file, format!("{RULES}{extra}")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.daemon_pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("the new rule", Duration::from_secs(10), || {
        let r = s.api("/api/v1/rules");
        (r["data"]["groups"][0]["rules"].as_array().unwrap().len() == 3).then_some(())
    });
    let still = alerts(&s)
        .into_iter()
        .find(|a| a["state"] == "firing")
        .expect("still firing");
    assert_eq!(still["activeAt"], active_at);
    drop(load.join());
    // No more requests: the rate falls to 0 and the alert resolves.
    wait_for("the alert resolved", Duration::from_secs(40), || {
        alerts(&s).is_empty().then_some(())
    });
    assert!(
        s.events()
            .iter()
            .any(|e| e["kind"] == "alert" && e["reason"].as_str().unwrap().contains("resolved"))
    );
    // The history keeps every transition, in order, with values and labels.
    let h: Vec<Value> =
        serde_json::from_str(&s.ok(&["alerts", "--history", "-o", "json"])).unwrap();
    let states: Vec<&str> = h
        .iter()
        .filter(|x| x["alertname"] == "HighServerErrorRate")
        .map(|x| x["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "firing", "resolved"], "{h:?}");
    assert_eq!(h[0]["labels"]["service"], "web");
    assert!(h[1]["value"].as_f64().unwrap() > 1.0);
    let table = s.ok(&["alerts", "--history"]);
    assert!(
        table.contains("HighServerErrorRate") && table.contains("resolved"),
        "{table}"
    );
    // Backtesting the rule file over what was stored finds the incident.
    let rules_path = rules_file.to_str().unwrap();
    let bt: Value = serde_json::from_str(&s.ok(&[
        "rules", "backtest", rules_path, "--since", "10m", "-o", "json",
    ]))
    .unwrap();
    let fired: Vec<&Value> = bt["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["alertname"] == "HighServerErrorRate" && e["fired_ms"].is_i64())
        .collect();
    assert!(!fired.is_empty(), "{bt}");
    assert!(fired[0]["resolved_ms"].is_i64(), "{bt}");
    let text = s.ok(&["rules", "backtest", rules_path, "--since", "10m"]);
    assert!(
        text.contains("HighServerErrorRate{service=\"web\", severity=\"page\"}: pending "),
        "{text}"
    );
    s.ok(&["down"]);
}

#[test]
fn a_broken_rule_file_is_refused_with_file_and_line() {
    let s = TestStack::new(&stack(free_port(), "0"));
    let dir = s.file().parent().unwrap().join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bad.yml"),
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: rate(up[5m]\n",
    )
    .unwrap();
    let out = s.run(&["check"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yml:5:15: groups[0].rules[0].expr: could not parse expression"),
        "{err}"
    );
}

/// A real Alertmanager on a free loopback port (no cluster), routing
/// everything to a receiver that sends nothing.
fn start_alertmanager() -> (Killed, String, tempfile::TempDir) {
    let bin = need("prometheus-alertmanager");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        "route: {receiver: none, group_wait: 0s, group_interval: 1s}\nreceivers: [{name: none}]\n",
    )
    .unwrap();
    let port = free_port();
    let child = std::process::Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_for("the Alertmanager", Duration::from_secs(20), || {
        http_get(port, "/-/ready")
            .filter(|r| r.contains("200 OK"))
            .map(|_| ())
    });
    (Killed(child), url, dir)
}

/// `amtool alert query` against `url`, as JSON.
fn amtool_alerts(url: &str) -> Vec<Value> {
    let out = std::process::Command::new(need("amtool"))
        .args([
            "alert",
            "query",
            "-o",
            "json",
            &format!("--alertmanager.url={url}"),
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn a_real_alertmanager_receives_the_hello_examples_alert_and_its_resolution() {
    let (_am, url, _dir) = start_alertmanager();
    let port = free_port();
    let yaml = stack(port, "0.5").replace(
        "  external_labels: {site: test}\n",
        &format!("  external_labels: {{site: test}}\n  alerting: {{alertmanagers: [\"{url}\"]}}\n"),
    );
    let s = TestStack::new(&yaml);
    std::fs::create_dir_all(s.file().parent().unwrap().join("rules")).unwrap();
    // The hello example's rule file, its times shortened for a test.
    let hello = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/hello/rules/hello.yml"),
    )
    .unwrap()
    .replace("interval: 15s", "interval: 1s")
    .replace("for: 1m", "for: 3s")
    .replace("[1m]", "[10s]");
    assert!(hello.contains("alert: HighServerErrorRate"));
    std::fs::write(s.file().parent().unwrap().join("rules/hello.yml"), hello).unwrap();
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 50, 30);
    let got = wait_for(
        "the alert in the Alertmanager",
        Duration::from_secs(60),
        || {
            amtool_alerts(&url)
                .into_iter()
                .find(|a| a["labels"]["alertname"] == "HighServerErrorRate")
        },
    );
    assert_eq!(got["labels"]["severity"], "page", "{got}");
    assert_eq!(got["labels"]["service"], "web", "{got}");
    assert_eq!(
        got["labels"]["site"], "test",
        "external labels are added: {got}"
    );
    assert!(
        got["annotations"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("web answers "),
        "{got}"
    );
    assert!(
        got["generatorURL"]
            .as_str()
            .unwrap()
            .contains("/graph?g0.expr="),
        "{got}"
    );
    drop(load.join());
    // The failures stop: the alert resolves in capstan, and Alertmanager
    // hears of it (it is no longer active there).
    wait_for(
        "the alert resolved in the Alertmanager",
        Duration::from_secs(60),
        || {
            amtool_alerts(&url)
                .iter()
                .all(|a| a["labels"]["alertname"] != "HighServerErrorRate")
                .then_some(())
        },
    );
    let m = s.api("/api/v1/query?query=capstan_alert_notifications_total%7Bresult%3D%22sent%22%7D");
    assert!(
        m["data"]["result"][0]["value"][1].as_str().unwrap() != "0",
        "{m}"
    );
    s.ok(&["down"]);
}

/// Rule files promtool accepts or refuses; capstan must agree on each.
const CORPUS: &[(&str, &str)] = &[
    ("good", RULES),
    ("empty", "groups: []\n"),
    (
        "keep-firing",
        "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: up == 0\n        keep_firing_for: 5m\n",
    ),
    (
        "bad-expr",
        "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: rate(up[5m]\n",
    ),
    (
        "bad-record-name",
        "groups:\n  - name: a\n    rules:\n      - record: \"a b\"\n        expr: up\n",
    ),
    (
        "both",
        "groups:\n  - name: a\n    rules:\n      - record: a\n        alert: b\n        expr: up\n",
    ),
    (
        "neither",
        "groups:\n  - name: a\n    rules:\n      - expr: up\n",
    ),
    (
        "for-on-record",
        "groups:\n  - name: a\n    rules:\n      - record: a\n        expr: up\n        for: 1m\n",
    ),
    (
        "dup-group",
        "groups:\n  - name: a\n    rules: []\n  - name: a\n    rules: []\n",
    ),
    (
        "unknown-key",
        "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: up\n        severity: page\n",
    ),
    (
        "bad-template",
        "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: up\n        annotations: {s: \"{{ $value \"}\n",
    ),
    (
        "bad-label",
        "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: up\n        labels: {\"0x\": y}\n",
    ),
    ("no-name", "groups:\n  - rules: []\n"),
    (
        "recover",
        "groups:\n  - name: a\n    rules:\n      - alert: A\n        expr: x > 10\n        annotations: {capstan_recover_expr: \"x < 5\"}\n",
    ),
];

#[test]
fn promtool_and_capstan_agree_on_rule_files_and_rule_tests() {
    let promtool = need("promtool");
    let capstan = capstan_bin();
    let dir = tempfile::tempdir().unwrap();
    let ok = |bin: &str, args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    };
    for (name, text) in CORPUS {
        let f = dir.path().join(format!("{name}.yml"));
        std::fs::write(&f, text).unwrap();
        let f = f.to_str().unwrap();
        let theirs = ok(&promtool, &["check", "rules", f]);
        let ours = ok(capstan.to_str().unwrap(), &["check", "rules", f]);
        assert_eq!(
            ours, theirs,
            "{name}: promtool says {theirs}, capstan {ours}"
        );
    }
    // Unit tests: a passing file and one with a wrong expectation.
    std::fs::write(dir.path().join("rules.yml"), RULES).unwrap();
    let good = r#"
rule_files: [rules.yml]
evaluation_interval: 1s
tests:
  - interval: 1s
    input_series:
      - series: 'http_requests_total{service="web", code="500"}'
        values: '0+5x30'
    alert_rule_test:
      - eval_time: 15s
        alertname: HighServerErrorRate
        exp_alerts:
          - exp_labels: {service: web, severity: page}
            exp_annotations: {summary: "web answers 5 errors a second"}
    promql_expr_test:
      - expr: service:http_errors:rate10s
        eval_time: 20s
        exp_samples:
          - labels: 'service:http_errors:rate10s{service="web"}'
            value: 5
"#;
    // The rules the hello example's anomaly rule generates are a rule file
    // promtool accepts.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello/capstan.yaml");
    let out = std::process::Command::new(&capstan)
        .args(["rules", "--generated", "-f", example.to_str().unwrap()])
        .output()
        .unwrap();
    let generated = String::from_utf8(out.stdout).unwrap();
    assert!(
        generated.contains("alert: \"LatencyAnomaly\""),
        "{generated}"
    );
    let g = dir.path().join("generated.yml");
    std::fs::write(&g, &generated).unwrap();
    assert!(
        ok(&promtool, &["check", "rules", g.to_str().unwrap()]),
        "{generated}"
    );
    // The hello example's rules and their tests.
    let hello = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello/rules");
    for (bin, args) in [
        (promtool.as_str(), ["check", "rules", "hello.yml"]),
        (capstan.to_str().unwrap(), ["check", "rules", "hello.yml"]),
        (promtool.as_str(), ["test", "rules", "hello_test.yaml"]),
        (
            capstan.to_str().unwrap(),
            ["test", "rules", "hello_test.yaml"],
        ),
    ] {
        let out = std::process::Command::new(bin)
            .args(args)
            .current_dir(&hello)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{bin} {args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for (name, text, pass) in [
        ("good-test", good.to_owned(), true),
        ("wrong-test", good.replace("value: 5", "value: 6"), false),
        (
            "early-test",
            good.replace("eval_time: 15s", "eval_time: 1s"),
            false,
        ),
    ] {
        let f = dir.path().join(format!("{name}.yml"));
        std::fs::write(&f, text).unwrap();
        let f = f.to_str().unwrap();
        let theirs = ok(&promtool, &["test", "rules", f]);
        let ours = ok(capstan.to_str().unwrap(), &["test", "rules", f]);
        assert_eq!(theirs, pass, "{name}: promtool");
        assert_eq!(ours, pass, "{name}: capstan");
    }
}

#[test]
fn a_failing_dependency_holds_back_its_dependents_alerts() {
    let (_am, url, _dir) = start_alertmanager();
    let yaml = format!(
        r#"
x-capstan:
  rule_files: ["rules.yml"]
  evaluation_interval: 1s
  alerting: {{alertmanagers: ["{url}"]}}
services:
  db:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", LOG_REQUESTS: "0"}}
    x-capstan: {{metrics: {{disable: true}}}}
  web:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", LOG_REQUESTS: "0"}}
    depends_on: [db]
    x-capstan: {{metrics: {{disable: true}}}}
"#
    );
    let s = TestStack::new(&yaml);
    std::fs::write(
        s.file().parent().unwrap().join("rules.yml"),
        r#"
groups:
  - name: deps
    rules:
      - alert: DatabaseDown
        expr: label_replace(vector(1), "service", "db", "", "")
      - alert: WebErrors
        expr: label_replace(vector(1), "service", "web", "", "")
        annotations:
          summary: web fails
          capstan_inhibit_on_dependency: "true"
"#,
    )
    .unwrap();
    s.up();
    let web = wait_for("an inhibited web alert", Duration::from_secs(30), || {
        alerts(&s)
            .into_iter()
            .find(|a| a["labels"]["alertname"] == "WebErrors" && a["inhibitedBy"].is_array())
    });
    assert_eq!(
        web["inhibitedBy"],
        serde_json::json!(["db/DatabaseDown"]),
        "{web}"
    );
    assert_eq!(web["state"], "firing");
    let table = s.ok(&["alerts"]);
    assert!(
        table.contains("inhibited") && table.contains("(held back: db/DatabaseDown firing)"),
        "{table}"
    );
    // The database's alert reaches the Alertmanager; the held-back one does not.
    wait_for(
        "DatabaseDown in the Alertmanager",
        Duration::from_secs(30),
        || {
            amtool_alerts(&url)
                .iter()
                .any(|a| a["labels"]["alertname"] == "DatabaseDown")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        amtool_alerts(&url)
            .iter()
            .all(|a| a["labels"]["alertname"] != "WebErrors"),
        "an inhibited alert was sent"
    );
    let ev = s
        .events()
        .into_iter()
        .find(|e| e["kind"] == "alert" && e["reason"].as_str().unwrap().starts_with("WebErrors"))
        .unwrap();
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("(inhibited: db/DatabaseDown firing)"),
        "{ev}"
    );
    s.ok(&["down"]);
}

/// A webhook receiver on loopback: every JSON body posted to it.
fn webhook_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            let body = loop {
                let Ok(n) = c.read(&mut chunk) else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
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
            };
            if let Some(v) = body.and_then(|b| serde_json::from_str(&b).ok()) {
                seen.lock().unwrap().push(v);
            }
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (port, got)
}

#[test]
fn a_plain_webhook_gets_alertmanager_payloads_grouped() {
    let (hook, got) = webhook_receiver();
    let port = free_port();
    let yaml = stack(port, "0.5").replace(
        "  external_labels: {site: test}\n",
        &format!(
            "  external_labels: {{site: test}}\n  alerting: {{webhooks: [{{url: \"http://127.0.0.1:{hook}/hook\", group_wait: 1s, group_interval: 2s}}]}}\n"
        ),
    );
    let s = TestStack::new(&yaml);
    std::fs::create_dir_all(s.file().parent().unwrap().join("rules")).unwrap();
    std::fs::write(s.file().parent().unwrap().join("rules/web.yml"), RULES).unwrap();
    s.up();
    let load = load_in_background(format!("http://127.0.0.1:{port}/"), 50, 25);
    let firing = wait_for("a firing notification", Duration::from_secs(60), || {
        got.lock()
            .unwrap()
            .iter()
            .find(|n| n["status"] == "firing")
            .cloned()
    });
    assert_eq!(firing["version"], "4");
    assert_eq!(firing["groupLabels"]["alertname"], "HighServerErrorRate");
    assert_eq!(firing["commonLabels"]["site"], "test");
    assert_eq!(firing["alerts"][0]["labels"]["service"], "web");
    assert!(
        firing["alerts"][0]["annotations"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("web answers")
    );
    drop(load.join());
    let resolved = wait_for("a resolved notification", Duration::from_secs(60), || {
        got.lock()
            .unwrap()
            .iter()
            .find(|n| n["status"] == "resolved")
            .cloned()
    });
    assert_eq!(resolved["alerts"][0]["status"], "resolved");
    assert_ne!(resolved["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    s.ok(&["down"]);
}
