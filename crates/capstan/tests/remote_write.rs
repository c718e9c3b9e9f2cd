//! Remote write: a real Prometheus scrapes a real node_exporter and pushes the
//! samples to capstan with remote_write; capstan then holds them. Bad bodies get 400.
//! Needs `prometheus` and `prometheus-node-exporter` (scripts/test installs them).

mod common;

use std::io::{Read, Write};
use std::process::Command;
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
    // Ready means 200 (it answers 503 while it starts).
    wait_for("Prometheus to start", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&prom).ok()?;
        (http_fetch(&prom, "/-/ready").0 == 200).then_some(())
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
            let a = r.as_array().unwrap();
            (a.len() == 2 && a.iter().all(|s| s["value"][1] == "1")).then_some(r)
        },
    );
    for series in got.as_array().unwrap() {
        let m = &series["metric"];
        assert_eq!(m["job"], "capstan", "honor_labels keeps capstan's job: {m}");
        assert_eq!(m["service"], "web", "{m}");
        assert_eq!(series["value"][1], "1", "{series}");
    }
    // Counters agree within a scrape or two.
    wait_for(
        "the same counter on both sides",
        Duration::from_secs(30),
        || {
            let ours = query(&addr, "sum(capstan_replica_restarts_total)");
            let theirs = query(&prom, "sum(capstan_replica_restarts_total)");
            (!ours[0]["value"][1].is_null() && ours[0]["value"][1] == theirs[0]["value"][1])
                .then_some(())
        },
    );
    s.ok(&["down"]);
}

/// The first value of a Prometheus-API instant query's answer, as text.
fn instant(host: &str, q: &str, t_ms: i64) -> Option<String> {
    let (code, body) = http_fetch(
        host,
        &format!(
            "/api/v1/query?query={}&time={}",
            enc(q),
            t_ms as f64 / 1000.0
        ),
    );
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .map(str::to_owned)
}

/// `x-capstan.remote_write` out to a real Prometheus 2.42 (its remote-write
/// receiver) and to VictoriaMetrics: the same queries agree with capstan's;
/// a write_relabel_config keeps only some series; the Prometheus receiver
/// stopped for 2 minutes and started again gets every sample of the outage.
#[test]
fn samples_go_out_to_prometheus_and_victoriametrics_and_an_outage_loses_none() {
    let vm = need("victoria-metrics");
    let (prom_port, vm_port) = (free_port(), free_port());
    let prom_dir = tempfile::tempdir().unwrap();
    let receiver = ["--web.enable-remote-write-receiver"];
    let mut prom = start_prometheus_in("global: {}\n", prom_port, &receiver, prom_dir.path());
    let vm_dir = tempfile::tempdir().unwrap();
    let _vm = Killed(
        Command::new(vm)
            .arg(format!("-httpListenAddr=127.0.0.1:{vm_port}"))
            .arg(format!("-storageDataPath={}", vm_dir.path().display()))
            .arg("-retentionPeriod=1d")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let s = TestStack::new(&format!(
        r#"x-capstan:
  scrape_interval: 1s
  remote_write:
    - url: http://127.0.0.1:{prom_port}/api/v1/write
      name: prom
      queue_config: {{batch_send_deadline: 1s, min_backoff: 100ms, max_backoff: 2s, max_shards: 2}}
    - url: http://127.0.0.1:{vm_port}/api/v1/write
      name: vm
      queue_config: {{batch_send_deadline: 1s}}
      write_relabel_configs:
        - {{source_labels: [__name__], regex: "up|capstan_replica_healthy", action: keep}}
services:
  web:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", LOG_REQUESTS: "0"}}
    deploy: {{replicas: 2}}
    x-capstan: {{healthcheck: {{http: /healthz, interval: 1s}}}}
"#
    ));
    s.up();
    let addr = daemon_addr(&s);
    let prom_host = format!("127.0.0.1:{prom_port}");
    let vm_host = format!("127.0.0.1:{vm_port}");
    // Samples of `up` for the two replicas over a minute, on both sides.
    let q = "sum(count_over_time(up{job=\"web\"}[1m]))";
    let agree = |host: &str, at: i64| {
        let ours = instant(&addr, q, at);
        let theirs = instant(host, q, at);
        (ours.is_some() && ours == theirs).then_some(ours)
    };
    let started = now_ms();
    let at = started + 70_000;
    wait_for("a minute of samples", Duration::from_secs(120), || {
        (now_ms() > at + 15_000).then_some(())
    });
    let n = wait_for(
        "Prometheus to hold what capstan holds",
        Duration::from_secs(60),
        || agree(&prom_host, at),
    );
    assert!(
        n.as_deref().unwrap().parse::<f64>().unwrap() >= 100.0,
        "{n:?}"
    );
    wait_for(
        "VictoriaMetrics to hold what capstan holds",
        Duration::from_secs(60),
        || agree(&vm_host, at),
    );
    // The relabeling kept only `up` and the health gauge.
    let (_, names) = http_fetch(&vm_host, "/api/v1/label/__name__/values");
    let names: serde_json::Value = serde_json::from_str(&names).unwrap();
    let mut names: Vec<&str> = names["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["capstan_replica_healthy", "up"]);
    // The Prometheus receiver is down for 2 minutes, then back.
    drop(prom);
    let down_at = now_ms();
    std::thread::sleep(Duration::from_secs(120));
    prom = start_prometheus_in("global: {}\n", prom_port, &receiver, prom_dir.path());
    let back_at = now_ms();
    // Capstan counted the retries, and catches up.
    wait_for("capstan to catch up", Duration::from_secs(120), || {
        let (_, m) = http_fetch(&addr, "/metrics");
        let sent = m
            .lines()
            .find(|l| {
                l.starts_with(
                    "capstan_remote_write_highest_sent_timestamp_seconds{remote_name=\"prom\"",
                )
            })?
            .rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()?;
        (sent * 1000.0 > (back_at + 5_000) as f64).then_some(())
    });
    let (_, m) = http_fetch(&addr, "/metrics");
    assert!(
        m.lines().any(|l| l
            .starts_with("capstan_remote_write_retried_samples_total{remote_name=\"prom\"")
            && !l.ends_with(" 0")),
        "{m}"
    );
    // Every minute of the outage holds the same samples on both sides.
    for at in [down_at + 60_000, down_at + 120_000] {
        let n = wait_for("the outage's samples", Duration::from_secs(30), || {
            agree(&prom_host, at)
        });
        assert!(
            n.as_deref().unwrap().parse::<f64>().unwrap() >= 100.0,
            "{n:?}"
        );
    }
    drop(prom);
    s.ok(&["down"]);
}
