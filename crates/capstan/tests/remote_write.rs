//! Remote write: a real Prometheus scrapes a real node_exporter and pushes the
//! samples to capstan with remote_write; capstan then holds them. Bad bodies get 400.
//! Needs `prometheus` and `prometheus-node-exporter` (scripts/test installs them).

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn post(addr: &str, token: &str, path: &str, headers: &str, body: &[u8]) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "POST {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n{headers}\r\n", body.len()).unwrap();
    c.write_all(body).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_real_prometheus_remote_writes_node_exporter_samples_into_capstan() {
    let node_exporter = need("prometheus-node-exporter");
    let s = TestStack::new(
        "services:\n  idle:\n    command: [sleep, \"600\"]\n    environment: {CAPSTAN_TEST_MARKER: \"{marker}\"}\n    x-capstan:\n      metrics: {disable: true}\n",
    );
    s.up();
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.data_dir().join("daemon.json")).unwrap()).unwrap();
    let addr = info["addr"].as_str().unwrap().to_owned();
    let token_file = s.data_dir().join("token");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();

    // Bad bodies: 400 with a reason, never 5xx.
    let r = post(
        &addr,
        &token,
        "/api/v1/write",
        "Content-Encoding: snappy\r\n",
        b"not snappy at all",
    );
    assert!(r.starts_with("HTTP/1.0 400") && r.contains("snappy"), "{r}");
    let r = post(&addr, &token, "/api/v1/write", "", b"");
    assert!(
        r.starts_with("HTTP/1.0 400") && r.contains("Content-Encoding"),
        "{r}"
    );
    let junk = snap::raw::Encoder::new()
        .compress_vec(&[0xff, 0xff, 0xff, 0x0f, 0x01])
        .unwrap();
    let r = post(
        &addr,
        &token,
        "/api/v1/write",
        "Content-Encoding: snappy\r\n",
        &junk,
    );
    assert!(
        r.starts_with("HTTP/1.0 400") && r.contains("WriteRequest"),
        "{r}"
    );
    assert!(
        post(
            &addr,
            "wrong",
            "/api/v1/write",
            "Content-Encoding: snappy\r\n",
            &junk
        )
        .starts_with("HTTP/1.0 401")
    );

    let (_ne, ne_port) = start_node_exporter(&node_exporter);
    let prom_port = free_port();
    let config = remote_writing_config(
        &[("node", format!("127.0.0.1:{ne_port}"))],
        &addr,
        &token_file,
    );
    let _prom = start_prometheus(&config, prom_port);
    let cpu = wait_for(
        "node_cpu_seconds_total pushed by Prometheus",
        Duration::from_secs(60),
        || {
            let v = s.api(&format!("/capstan/v1/tsdb/select?name=node_cpu_seconds_total&job=node&mode=idle&instance=127.0.0.1:{ne_port}"));
            let v = v.as_array().unwrap().clone();
            v.iter()
                .any(|x| x["samples"].as_array().unwrap().len() >= 3)
                .then_some(v)
        },
    );
    assert_eq!(cpu[0]["labels"]["instance"], format!("127.0.0.1:{ne_port}"));
    let up = s.api(&format!(
        "/capstan/v1/tsdb/select?name=up&job=node&instance=127.0.0.1:{ne_port}"
    ));
    assert_eq!(up[0]["samples"].as_array().unwrap().last().unwrap()[1], "1");
    let load = s.api(&format!(
        "/capstan/v1/tsdb/select?name=node_load1&job=node&instance=127.0.0.1:{ne_port}"
    ));
    assert_eq!(load.as_array().unwrap().len(), 1, "{load}");
}

/// `x-capstan.scrape_configs`: a static target (a real node_exporter) scraped with
/// its job, static labels and metric relabeling; a sample limit fails the scrape.
#[test]
fn static_scrape_configs_with_relabeling_and_sample_limit() {
    let node_exporter = need("prometheus-node-exporter");
    let (_ne, ne_port) = start_node_exporter(&node_exporter);
    let stack = format!(
        r#"
x-capstan:
  scrape_interval: 1s
  scrape_configs:
    - job_name: hosts
      static_configs:
        - targets: ["127.0.0.1:{ne_port}"]
          labels: {{team: ops}}
      metric_relabel_configs:
        - source_labels: [__name__]
          regex: node_cpu_.*
          action: drop
        - source_labels: [__name__]
          regex: node_load(.*)
          target_label: window
          replacement: "$${{1}}m"   # $$: a literal $ after compose interpolation
    - job_name: limited
      sample_limit: 10
      static_configs:
        - targets: ["127.0.0.1:{ne_port}"]
services:
  idle:
    command: [sleep, "600"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}"}}
    x-capstan:
      metrics: {{disable: true}}
"#
    );
    let s = TestStack::new(&stack);
    s.up();
    let load = wait_for(
        "node_load1 from the static target",
        Duration::from_secs(20),
        || {
            let v = s.api("/capstan/v1/tsdb/select?name=node_load1&job=hosts");
            v.as_array().unwrap().first().cloned()
        },
    );
    assert_eq!(load["labels"]["team"], "ops");
    assert_eq!(load["labels"]["window"], "1m");
    assert_eq!(load["labels"]["instance"], format!("127.0.0.1:{ne_port}"));
    let up = s.api("/capstan/v1/tsdb/select?name=up&job=hosts");
    assert_eq!(up[0]["samples"].as_array().unwrap().last().unwrap()[1], "1");
    assert!(
        s.api("/capstan/v1/tsdb/select?name=node_cpu_seconds_total&job=hosts")
            .as_array()
            .unwrap()
            .is_empty(),
        "dropped by relabeling"
    );
    let limited = wait_for("the limited job's up", Duration::from_secs(10), || {
        let v = s.api("/capstan/v1/tsdb/select?name=up&job=limited");
        v.as_array().unwrap().first().cloned()
    });
    assert_eq!(
        limited["samples"].as_array().unwrap().last().unwrap()[1],
        "0",
        "over its sample limit, the scrape fails"
    );
    assert!(
        s.api("/capstan/v1/tsdb/select?name=node_load1&job=limited")
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// `/federate` scraped by a real Prometheus (`honor_labels`, `match[]`): it
/// holds capstan's series with their own labels and the external labels, and
/// the same values capstan has.
#[test]
fn a_real_prometheus_federates_from_capstan() {
    let s = TestStack::new(
        "x-capstan:\n  scrape_interval: 1s\n  external_labels: {site: lab}\nservices:\n  web:\n    command: [\"{demo}\"]\n    environment: {CAPSTAN_TEST_MARKER: \"{marker}\", LOG_REQUESTS: \"0\"}\n    deploy: {replicas: 2}\n    x-capstan: {healthcheck: {http: /healthz, interval: 1s}}\n",
    );
    s.up();
    let addr = daemon_addr(&s);
    // Bad requests say why.
    let (code, body) = http_fetch(&addr, "/federate");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("no match[]"), "{body}");
    let (code, body) = http_fetch(&addr, "/federate?match[]=rate(up[1m])");
    assert_eq!(code, 400, "{body}");
    let body = wait_for("capstan's own series", Duration::from_secs(30), || {
        let (code, body) = http_fetch(
            &addr,
            "/federate?match[]=capstan_replica_healthy&match[]=%7Bjob%3D%22capstan%22%2C__name__%3D%22capstan_replica_healthy%22%7D",
        );
        assert_eq!(code, 200, "{body}");
        (body.matches("capstan_replica_healthy{").count() == 2).then_some(body)
    });
    // Each series once (two selectors of the same series), with one TYPE line.
    assert_eq!(
        body.matches("# TYPE capstan_replica_healthy untyped")
            .count(),
        1,
        "{body}"
    );
    let lines: Vec<&str> = body.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 2, "{body}");
    assert!(lines.iter().all(|l| l.contains("site=\"lab\"")), "{body}");
    let port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: federate\n    honor_labels: true\n    metrics_path: /federate\n    params:\n      'match[]': ['{{job=\"capstan\"}}']\n    static_configs: [{{targets: [\"{addr}\"]}}]\n"
    );
    let (_prom, prom, _dir) = start_prometheus(&config, port);
    wait_for("Prometheus to start", Duration::from_secs(30), || {
        http_get(port, "/-/ready")
    });
    let query = |host: &str, q: &str| -> serde_json::Value {
        let (code, body) = http_fetch(host, &format!("/api/v1/query?query={}", enc(q)));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["data"]["result"].clone()
    };
    let got = wait_for(
        "Prometheus to federate capstan's series",
        Duration::from_secs(60),
        || {
            let r = query(&prom, "capstan_replica_healthy{site=\"lab\"}");
            (r.as_array().unwrap().len() == 2).then_some(r)
        },
    );
    for series in got.as_array().unwrap() {
        let m = &series["metric"];
        assert_eq!(m["job"], "capstan", "honor_labels keeps capstan's job: {m}");
        assert_eq!(m["service"], "web", "{m}");
        assert_eq!(series["value"][1], "1", "{series}");
    }
    // Counters agree within a scrape or two.
    let ours = query(&addr, "sum(capstan_replica_restarts_total)");
    let theirs = query(&prom, "sum(capstan_replica_restarts_total)");
    assert_eq!(ours[0]["value"][1], theirs[0]["value"][1]);
    s.ok(&["down"]);
}
