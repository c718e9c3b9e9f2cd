//! What a hostile or broken client on the same machine sends, against a real
//! daemon: deeply nested queries, functions the engine does not evaluate,
//! decompression and allocation bombs, samples from wrong clocks, bad label
//! names. Each answer is a 4xx with a reason; afterwards the daemon is healthy,
//! the data stored before is intact, and its peak RSS stayed under [`MAX_RSS`].

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use capstan::api::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use common::*;
use prost::Message;
use serde_json::Value;

/// The daemon's peak resident memory must stay under this (debug build).
const MAX_RSS_KIB: u64 = 512 << 10;

fn series(name: &str, labels: &[(&str, &str)], samples: &[(i64, f64)]) -> TimeSeries {
    let mut l = vec![Label {
        name: "__name__".into(),
        value: name.into(),
    }];
    l.extend(labels.iter().map(|(n, v)| Label {
        name: (*n).into(),
        value: (*v).into(),
    }));
    TimeSeries {
        labels: l,
        samples: samples
            .iter()
            .map(|&(timestamp, value)| Sample { value, timestamp })
            .collect(),
        histograms: vec![],
    }
}

struct Daemon {
    s: TestStack,
    addr: String,
    token: String,
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with(QUIET_STACK)
    }

    fn start_with(stack: &str) -> Daemon {
        let s = TestStack::new(stack);
        s.up();
        let addr = daemon_addr(&s);
        let token = s.token();
        Daemon { s, addr, token }
    }

    fn write(&self, ts: Vec<TimeSeries>) -> (u16, String) {
        let body = snap::raw::Encoder::new()
            .compress_vec(&WriteRequest { timeseries: ts }.encode_to_vec())
            .unwrap();
        self.post_raw("/api/v1/write", &[("Content-Encoding", "snappy")], &body)
    }

    fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let auth = format!("Bearer {}", self.token);
        let mut h = headers.to_vec();
        h.push(("Authorization", &auth));
        let (code, body) = http_post(&self.addr, path, &h, body);
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_fetch(&self.addr, path)
    }

    /// POSTs `params` as a form (long queries do not fit in a request line).
    fn form(&self, path: &str, params: &[(&str, &str)]) -> (u16, String) {
        let body: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", enc(v)))
            .collect();
        self.post_raw(
            path,
            &[("Content-Type", "application/x-www-form-urlencoded")],
            body.join("&").as_bytes(),
        )
    }

    fn query(&self, q: &str) -> Value {
        let (code, body) = self.get(&format!("/api/v1/query?query={}", enc(q)));
        assert_eq!(code, 200, "{q}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Sends a query of few samples and much work (it would run until the
    /// 2-minute timeout) without reading the answer; the connection is returned.
    fn start_busy_query(&self) -> std::net::TcpStream {
        use std::io::Write;
        let q = "max_over_time(max_over_time(vector(1)[40m:1ms])[40m:1ms])";
        let mut c = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(
            c,
            "GET /api/v1/query?query={} HTTP/1.1\r\nHost: localhost\r\n\r\n",
            enc(q)
        )
        .unwrap();
        c
    }

    /// Healthy, the stored series intact, and peak RSS under the bound.
    fn still_fine(&self, stored: usize) {
        assert_eq!(self.get("/-/healthy").0, 200);
        let v = self.query("count_over_time(attack_base[1h])");
        let n = v["data"]["result"][0]["value"][1].as_str().unwrap_or("0");
        assert_eq!(n, stored.to_string(), "{v}");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.s.daemon_pid())).unwrap();
        let hwm: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap();
        assert!(hwm < MAX_RSS_KIB, "peak RSS {hwm} KiB");
    }

    /// Stores `n` samples of `attack_base`, a minute apart, ending now.
    fn base(&self, n: usize) {
        let now = now_ms();
        let samples: Vec<(i64, f64)> = (0..n)
            .map(|i| (now - (n - i) as i64 * 60_000 / 2, i as f64))
            .collect();
        assert_eq!(
            self.write(vec![series("attack_base", &[], &samples)]).0,
            204
        );
    }
}

fn nested(open: &str, inner: &str, close: &str, n: usize) -> String {
    format!("{}{inner}{}", open.repeat(n), close.repeat(n))
}

#[test]
fn queries_nested_without_bound_or_unsupported_are_refused() {
    let d = Daemon::start();
    d.base(100);
    let deep = [
        nested("(", "1", ")", 5000),
        nested("sum(", "attack_base", ")", 3000),
        vec!["attack_base"; 5000].join(" + "),
        format!("{}1", "-".repeat(20_000)),
        vec!["attack_base"; 3000].join(" and "),
    ];
    for q in &deep {
        for path in ["query", "format_query"] {
            let (code, body) = d.form(&format!("/api/v1/{path}"), &[("query", q)]);
            assert_eq!(code, 400, "{path}: {body}");
            assert!(
                body.contains("nests deeper than 128") || body.contains("more than 1024"),
                "{body}"
            );
        }
        let (code, body) = d.form(
            "/api/v1/query_range",
            &[("query", q), ("start", "0"), ("end", "60"), ("step", "15")],
        );
        assert_eq!(code, 400, "{body}");
    }
    for q in [
        "start()",
        "end()",
        "range()",
        "step()",
        "info(attack_base)",
        "ts_of_max_over_time(attack_base[1m])",
    ] {
        let (code, body) = d.get(&format!("/api/v1/query?query={}", enc(q)));
        assert_eq!(code, 422, "{q}: {body}");
        assert!(body.contains("is not supported"), "{q}: {body}");
    }
    // LogQL: query, query_range, series match[], tail.
    let sel = r#"{service="quiet"}"#;
    let deep_logql = [
        nested("(", sel, ")", 5000),
        nested("sum(", &format!("count_over_time({sel}[1m])"), ")", 3000),
        vec![format!("count_over_time({sel}[1m])"); 3000].join(" + "),
        format!("{sel} | logfmt | {}", vec!["a > 1"; 5000].join(" or ")),
    ];
    for q in &deep_logql {
        for path in ["query", "query_range"] {
            let (code, body) = d.form(&format!("/loki/api/v1/{path}"), &[("query", q)]);
            assert_eq!(code, 400, "{path}: {body}");
            assert!(
                body.contains("nests deeper than 128")
                    || body.contains("more than 1024")
                    || body.contains("longer than 64 KiB"),
                "{body}"
            );
        }
        let (code, body) = d.form("/loki/api/v1/series", &[("match[]", q)]);
        assert_eq!(code, 400, "series: {body}");
        if q.len() < 20_000 {
            let (code, body) = d.get(&format!("/loki/api/v1/tail?query={}", enc(q)));
            assert_eq!(code, 400, "tail: {body}");
        }
    }
    // TraceQL.
    for q in [
        nested("(", "{}", ")", 5000),
        format!("{{ {} }}", vec!["name = \"a\""; 1100].join(" || ")),
        format!("{{ {}name = \"a\" }}", "!".repeat(5000)),
    ] {
        let (code, body) = d.get(&format!("/api/search?q={}", enc(&q)));
        assert_eq!(code, 400, "{body}");
    }
    d.still_fine(100);
}

#[test]
fn wrong_clocks_and_bad_labels_erase_nothing() {
    let d = Daemon::start();
    d.base(60);
    let now = now_ms();
    for t in [
        now + 11 * 60_000,
        now + 400 * 86_400_000,
        i64::MAX,
        i64::MIN,
    ] {
        let (code, body) = d.write(vec![
            series("attack_base", &[], &[(t, 1.0)]),
            series("attack_future", &[], &[(t, 1.0)]),
        ]);
        assert_eq!(code, 400, "{body}");
        assert!(
            body.contains("too_far_in_future=2") || body.contains("too_old=2"),
            "{body}"
        );
    }
    // Empty and repeated label names: those series refused, the rest kept.
    let (code, body) = d.write(vec![
        series("attack_labels", &[("", "x")], &[(now, 1.0)]),
        series("attack_labels", &[("a", "1"), ("a", "2")], &[(now, 1.0)]),
        series("attack_ok", &[], &[(now, 1.0)]),
    ]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid_label_names=2"), "{body}");
    assert!(
        body.contains("empty name") && body.contains("\"a\" appears more than once"),
        "{body}"
    );
    assert_eq!(
        d.query("attack_ok")["data"]["result"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        d.query("attack_labels")["data"]["result"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(
        d.query("attack_future")["data"]["result"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Later samples are still appended.
    assert_eq!(
        d.write(vec![series("attack_base", &[], &[(now_ms(), 61.0)])])
            .0,
        204
    );
    d.still_fine(61);
    // Loki push and OTLP: far-future entries refused one by one.
    let future_ns = (now_ms() + 3_600_000) * 1_000_000;
    let push = format!(
        r#"{{"streams":[{{"stream":{{"job":"x"}},"values":[["{future_ns}","from the future"],["{}","now"]]}}]}}"#,
        now_ms() * 1_000_000
    );
    let (code, body) = d.post_raw(
        "/loki/api/v1/push",
        &[("Content-Type", "application/json")],
        push.as_bytes(),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("more than ten minutes in the future"),
        "{body}"
    );
    // Every refusal is counted.
    let (_, metrics) = d.get("/metrics");
    for want in [
        "capstan_ingest_items_refused_total{api=\"loki\"} 1",
        "capstan_ingest_items_refused_total{api=\"remote_write\"} 2",
        "capstan_tsdb_samples_rejected_total{reason=\"too_far_in_future\"} 6",
        "capstan_tsdb_samples_rejected_total{reason=\"too_old\"} 2",
    ] {
        assert!(metrics.contains(want), "{want} not in:\n{metrics}");
    }
}

#[test]
fn decoding_bombs_are_refused_before_they_grow_the_daemon() {
    use std::io::Write;
    let d = Daemon::start();
    d.base(10);
    let gzip = |raw: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(raw).unwrap();
        e.finish().unwrap()
    };
    // One ResourceSpans of 30M empty ScopeSpans: 60 MiB that gzip to ~60 KB.
    let n = 30usize << 20;
    let mut inner = Vec::with_capacity(2 * n);
    for _ in 0..n {
        inner.extend_from_slice(&[0x12, 0x00]);
    }
    let mut bomb = vec![0x0a];
    prost::encoding::encode_varint(inner.len() as u64, &mut bomb);
    bomb.extend_from_slice(&inner);
    let bomb = gzip(&bomb);
    assert!(bomb.len() < 200_000);
    for path in ["/v1/traces", "/v1/logs"] {
        let (code, body) = d.post_raw(
            path,
            &[
                ("Content-Type", "application/x-protobuf"),
                ("Content-Encoding", "gzip"),
            ],
            &bomb,
        );
        assert_eq!(code, 413, "{path}: {body}");
    }
    let json = gzip(format!("{{\"resourceSpans\":[{}{{}}]}}", "{},".repeat(20 << 20)).as_bytes());
    let (code, body) = d.post_raw(
        "/v1/traces",
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ],
        &json,
    );
    assert_eq!(code, 413, "{body}");
    let loki_json = gzip(
        format!(
            "{{\"streams\":[{{\"stream\":{{\"a\":\"b\"}},\"values\":[{}[]]}}]}}",
            "[],".repeat(20 << 20)
        )
        .as_bytes(),
    );
    let (code, body) = d.post_raw(
        "/loki/api/v1/push",
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ],
        &loki_json,
    );
    assert_eq!(code, 413, "{body}");
    // remote_write: 16M empty series in 32 MiB.
    let mut rw = Vec::new();
    for _ in 0..(15usize << 20) {
        rw.extend_from_slice(&[0x0a, 0x00]);
    }
    let rw = snap::raw::Encoder::new().compress_vec(&rw).unwrap();
    let (code, body) = d.post_raw("/api/v1/write", &[("Content-Encoding", "snappy")], &rw);
    assert_eq!(code, 413, "{body}");
    d.still_fine(10);
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_client_that_goes_away_cancels_its_query() {
    let d = Daemon::start();
    let pid = d.s.daemon_pid();
    let c = d.start_busy_query();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let busy = cpu_ticks(pid);
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let settled = cpu_ticks(pid);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let idle = cpu_ticks(pid) - settled;
    // 2 s of one busy core would be ~200 ticks.
    assert!(
        idle < 40,
        "the query went on after its client left: {idle} ticks in 2 s (busy at {busy})"
    );
    assert_eq!(d.get("/-/healthy").0, 200);
}

/// Pushes are open on loopback, but cannot forge what a replica printed or the
/// proxy logged: streams with capstan's own labels are refused, Loki and OTLP.
#[test]
fn pushes_cannot_forge_captured_output() {
    let d = Daemon::start();
    let now = now_ms() * 1_000_000;
    for stream in ["stdout", "stderr", "proxy"] {
        let push = format!(
            r#"{{"streams":[{{"stream":{{"service":"quiet","replica":"0","stream":"{stream}"}},"values":[["{now}","forged {stream}"]]}},{{"stream":{{"service":"quiet","job":"mine"}},"values":[["{now}","honest"]]}}]}}"#
        );
        let (code, body) = http_post(
            &d.addr,
            "/loki/api/v1/push",
            &[("Content-Type", "application/json")],
            push.as_bytes(),
        );
        let body = String::from_utf8_lossy(&body);
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("capstan's own captured output"), "{body}");
    }
    let otlp = format!(
        r#"{{"resourceLogs":[{{"resource":{{"attributes":[{{"key":"service","value":{{"stringValue":"quiet"}}}},{{"key":"replica","value":{{"stringValue":"0"}}}},{{"key":"stream","value":{{"stringValue":"stdout"}}}}]}},"scopeLogs":[{{"logRecords":[{{"timeUnixNano":"{now}","body":{{"stringValue":"forged otlp"}}}}]}}]}}]}}"#
    );
    let (code, body) = http_post(
        &d.addr,
        "/v1/logs",
        &[("Content-Type", "application/json")],
        otlp.as_bytes(),
    );
    // OTLP records always land in stream "otlp", whatever their resource says.
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // Nothing forged is in the replica's output; the honest lines are kept.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let q = |q: &str| {
        let (code, body) = d.get(&format!(
            "/loki/api/v1/query_range?query={}&start=0",
            enc(q)
        ));
        assert_eq!(code, 200, "{body}");
        body
    };
    assert!(
        !q(r#"{service="quiet", stream=~"stdout|stderr|proxy"} |= "forged""#).contains("forged")
    );
    assert!(q(r#"{job="mine"}"#).contains("honest"));
    assert!(q(r#"{stream="otlp"}"#).contains("forged otlp"));
}

/// remote_write senders that retry or shard deliver late: within
/// `out_of_order_time_window` their samples are stored; without it, refused.
#[test]
fn late_remote_writes_within_the_window_are_stored() {
    let d = Daemon::start_with(&format!(
        "x-capstan:\n  storage: {{out_of_order_time_window: 5m}}\n{QUIET_STACK}"
    ));
    let now = now_ms();
    assert_eq!(d.write(vec![series("late", &[], &[(now, 2.0)])]).0, 204);
    let (code, body) = d.write(vec![series("late", &[], &[(now - 60_000, 1.0)])]);
    assert_eq!(code, 204, "{body}");
    let (code, body) = d.write(vec![series("late", &[], &[(now - 10 * 60_000, 0.0)])]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("out_of_order=1"), "{body}");
    let v = d.query("count_over_time(late[15m])");
    assert_eq!(v["data"]["result"][0]["value"][1], "2", "{v}");

    let strict = Daemon::start();
    assert_eq!(
        strict.write(vec![series("late", &[], &[(now, 2.0)])]).0,
        204
    );
    let (code, body) = strict.write(vec![series("late", &[], &[(now - 60_000, 1.0)])]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("out_of_order=1"), "{body}");
}

/// `capstan down` stops a daemon busy with a long query: the query is canceled
/// when its connection is closed at the end of the shutdown grace.
#[test]
fn down_stops_a_daemon_stuck_in_a_query() {
    let d = Daemon::start();
    let pid = d.s.daemon_pid();
    let c = d.start_busy_query();
    std::thread::sleep(std::time::Duration::from_millis(500));
    d.s.ok(&["down"]);
    // Without the cancel the query would hold the daemon for its 2-minute timeout.
    wait_for(
        "the daemon to exit",
        std::time::Duration::from_secs(30),
        || (!alive(pid)).then_some(()),
    );
    drop(c);
}

/// A request naming another host (a web page's DNS name rebound to 127.0.0.1)
/// is refused; loopback names and the listen address are served.
#[test]
fn requests_for_other_hosts_are_refused() {
    use std::io::{Read, Write};
    let d = Daemon::start();
    let get = |host: &str| {
        let mut c = std::net::TcpStream::connect(&d.addr).unwrap();
        write!(c, "GET /api/v1/labels HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    for host in ["evil.example", "evil.example:9700", "10.1.2.3"] {
        let r = get(host);
        assert!(r.starts_with("HTTP/1.0 421"), "{host}: {r}");
        assert!(r.contains("DNS rebinding"), "{r}");
    }
    for host in ["localhost", "127.0.0.1", d.addr.as_str()] {
        let r = get(host);
        assert!(r.starts_with("HTTP/1.0 200"), "{host}: {r}");
    }
}
