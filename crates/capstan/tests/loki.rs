//! The Loki query API over the log store, end to end: the demo's JSON request
//! lines captured from stdout, read back with LogQL through `/loki/api/v1/…` in
//! Loki's response shapes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn logql_through_the_loki_api() {
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    command: ["{{demo}}"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}"}}
    ports: ["127.0.0.1:{port}:http"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
      metrics: {{disable: true}}
      proxy: {{access_log: false}}
    deploy: {{replicas: 2}}
"#
    ));
    s.up();
    for i in 0..20 {
        let path = if i % 4 == 0 { "/work?ms=1" } else { "/" };
        http_get(port, path).expect("the proxy answers");
    }
    let addr = daemon_addr(&s);
    let get = |path: &str| -> (u16, String) { http_fetch(&addr, path) };

    // Log query: newest first, limited, Loki's stream shape, ns timestamps as strings.
    let q = enc(r#"{service="web"} |= "\"path\":\"/work\"""#);
    let v: Value = wait_for("the /work lines", Duration::from_secs(10), || {
        let (code, body) = get(&format!("/loki/api/v1/query_range?query={q}&limit=3"));
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let n: usize = v["data"]["result"]
            .as_array()?
            .iter()
            .map(|s| s["values"].as_array().unwrap().len())
            .sum();
        (n == 3).then_some(v)
    });
    assert_eq!(v["status"], "success");
    assert_eq!(v["data"]["resultType"], "streams");
    let stream = &v["data"]["result"][0];
    assert_eq!(stream["stream"]["service"], "web");
    assert!(
        stream["stream"]["level"].is_string(),
        "level lifted into metadata: {stream}"
    );
    let t = stream["values"][0][0].as_str().unwrap();
    assert!(t.len() >= 19 && t.parse::<i64>().is_ok(), "{t}");

    // Parsers and label filters; a metric query as an instant vector.
    let q = enc(
        r#"sum by (path) (count_over_time({service="web"} | json | path="/work" and code == 200 [5m]))"#,
    );
    let (code, body) = get(&format!("/loki/api/v1/query?query={q}"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["resultType"], "vector");
    assert_eq!(v["data"]["result"][0]["metric"]["path"], "/work", "{v}");
    assert_eq!(v["data"]["result"][0]["value"][1], "5", "{v}");

    // A range metric query: a matrix.
    let q = enc(r#"sum(rate({service="web"} | json | msg="request" [1m]))"#);
    let (code, body) = get(&format!("/loki/api/v1/query_range?query={q}&step=10s"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"]["resultType"], "matrix", "{v}");
    assert!(
        !v["data"]["result"][0]["values"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Labels, values, series.
    let (_, body) = get("/loki/api/v1/labels");
    let v: Value = serde_json::from_str(&body).unwrap();
    for l in ["replica", "service", "stream"] {
        assert!(v["data"].as_array().unwrap().iter().any(|x| x == l), "{v}");
    }
    let (_, body) = get("/loki/api/v1/label/replica/values");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"], serde_json::json!(["0", "1"]));
    let (_, body) = get(&format!(
        "/loki/api/v1/series?match[]={}",
        enc(r#"{service="web", replica="1"}"#)
    ));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["replica"] == "1"),
        "{v}"
    );
    assert!(!v["data"].as_array().unwrap().is_empty());

    // Bad input: a 400 that says where and what.
    let (code, body) = get(&format!(
        "/loki/api/v1/query_range?query={}",
        enc(r#"{service="web"} | frob"#)
    ));
    assert_eq!(code, 400);
    assert!(
        body.contains("parse error at column") && body.contains("frob"),
        "{body}"
    );
    let (code, body) = get(&format!(
        "/loki/api/v1/query_range?query={}&limit=99999",
        enc(r#"{service="web"}"#)
    ));
    assert_eq!(code, 400, "{body}");
}
