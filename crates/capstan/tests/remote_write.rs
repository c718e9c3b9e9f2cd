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
