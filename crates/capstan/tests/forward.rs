//! Logs and spans forwarded (`x-capstan.logs.forward`, `x-capstan.traces.forward`)
//! to a second capstan daemon's Loki push and OTLP endpoints: every line and
//! span arrives once, also when the receiver is down for a while and comes back.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// The lines of `query` on a daemon over the last hour.
fn lines(addr: &str, query: &str) -> Vec<String> {
    let now = now_ms() * 1_000_000;
    let (code, body) = http_fetch(
        addr,
        &format!(
            "/loki/api/v1/query_range?query={}&limit=5000&start={}&end={}",
            enc(query),
            now - 3_600_000_000_000,
            now + 60_000_000_000
        ),
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["values"].as_array().unwrap().clone())
        .map(|e| e[1].as_str().unwrap().to_owned())
        .collect()
}

/// The trace ids a daemon finds for service `web` over the last hour.
fn traces(addr: &str) -> BTreeSet<String> {
    let now = now_ms() / 1000;
    let (code, body) = http_fetch(
        addr,
        &format!(
            "/api/search?tags=service.name%3Dweb&limit=1000&start={}&end={}",
            now - 3600,
            now + 60
        ),
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["traces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["traceID"].as_str().unwrap().to_owned())
        .collect()
}

fn requests(port: u16, n: usize, tag: &str) {
    for i in 0..n {
        http_get(port, &format!("/?{tag}={i}")).expect("the proxy answers");
    }
}

#[test]
fn logs_and_spans_reach_a_second_daemon_once_across_its_restart() {
    // The receiver, on a fixed port so that it comes back at the same address.
    let receiver = TestStack::new(QUIET_STACK);
    let rport = free_port();
    let listen = format!("127.0.0.1:{rport}");
    receiver.ok(&["up", "-d", "--listen", &listen]);
    let raddr = daemon_addr(&receiver);
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"x-capstan:
  logs:
    forward:
      - url: http://{raddr}/loki/api/v1/push
        queue_config: {{batch_send_deadline: 1s, min_backoff: 100ms, max_backoff: 1s, max_samples_per_send: 50}}
        # Another capstan keeps pushed lines apart from what it captured itself.
        write_relabel_configs:
          - {{source_labels: [stream], target_label: origin_stream}}
          - {{action: labeldrop, regex: stream}}
  traces:
    forward:
      - url: http://{raddr}/v1/traces
        queue_config: {{batch_send_deadline: 1s, min_backoff: 100ms, max_backoff: 1s}}
services:
  web:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", LOG_REQUESTS: "0"}}
    ports: ["{port}:http"]
    deploy: {{replicas: 2}}
    x-capstan: {{healthcheck: {{http: /healthz, interval: 1s}}}}
"#
    ));
    s.up();
    let addr = daemon_addr(&s);
    let q = "{service=\"web\", stream=\"proxy\"}";
    let rq = "{service=\"web\", origin_stream=\"proxy\"}";
    let same = |want: usize| {
        let ours: BTreeSet<String> = lines(&addr, q).into_iter().collect();
        let got = lines(&raddr, rq);
        let unique: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(got.len(), unique.len(), "a line arrived twice");
        (ours.len() >= want && unique == ours).then_some(ours.len())
    };
    requests(port, 40, "a");
    let n = wait_for("the lines to be forwarded", Duration::from_secs(60), || {
        same(40)
    });
    assert!(n >= 40);
    let span_ids = wait_for("the spans to be forwarded", Duration::from_secs(60), || {
        let (ours, theirs) = (traces(&addr), traces(&raddr));
        (ours.len() >= 40 && ours == theirs).then_some(ours)
    });
    assert!(span_ids.len() >= 40);
    // The receiver goes away; more requests; it comes back at the same address.
    receiver.ok(&["down"]);
    requests(port, 40, "b");
    std::thread::sleep(Duration::from_secs(3));
    receiver.ok(&["up", "-d", "--listen", &listen]);
    let n = wait_for("the lines of the outage", Duration::from_secs(60), || {
        same(80)
    });
    assert!(n >= 80);
    wait_for("the spans of the outage", Duration::from_secs(60), || {
        let (ours, theirs) = (traces(&addr), traces(&raddr));
        (ours.len() >= 80 && ours == theirs).then_some(())
    });
    let (_, m) = http_fetch(&addr, "/metrics");
    assert!(
        m.lines().any(
            |l| l.starts_with("capstan_logs_forward_retried_samples_total") && !l.ends_with(" 0")
        ),
        "{m}"
    );
    assert!(m.contains("capstan_traces_forward_samples_total"), "{m}");
    s.ok(&["down"]);
    receiver.ok(&["down"]);
}
