//! What other programs push to capstan, end to end: Loki push in JSON, gzip JSON
//! and protobuf+snappy (messages written here from Loki's push.proto), OTLP/HTTP
//! logs, bad bodies of every kind, and the Loki tail WebSocket across segment
//! rotations and reconnects.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use prost::Message;
use serde_json::{Value, json};

/// Loki's push.proto, as a Loki client would compile it.
#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    streams: Vec<StreamAdapter>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct StreamAdapter {
    #[prost(string, tag = "1")]
    labels: String,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<EntryAdapter>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct EntryAdapter {
    #[prost(message, optional, tag = "1")]
    timestamp: Option<Ts>,
    #[prost(string, tag = "2")]
    line: String,
    #[prost(message, repeated, tag = "3")]
    structured_metadata: Vec<Pair>,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Ts {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}
#[derive(Clone, PartialEq, prost::Message)]
struct Pair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Lines of `selector`, oldest first, from the Loki query API.
fn lines(addr: &str, selector: &str) -> Vec<String> {
    let (code, body) = http_fetch(
        addr,
        &format!(
            "/loki/api/v1/query_range?query={}&limit=5000&direction=forward&start=0",
            enc(selector)
        ),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut out: Vec<(String, String)> = v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["values"].as_array().unwrap().clone())
        .map(|e| {
            (
                e[0].as_str().unwrap().to_owned(),
                e[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out.into_iter().map(|(_, l)| l).collect()
}

fn push_json(addr: &str, body: &Value) -> (u16, String) {
    let (c, b) = http_post(
        addr,
        "/loki/api/v1/push",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    (c, String::from_utf8_lossy(&b).into_owned())
}

#[test]
fn loki_push_in_every_encoding_and_bad_input() {
    let s = TestStack::new(QUIET_STACK);
    s.up();
    let addr = daemon_addr(&s);
    let t = now_ns();

    // JSON, with structured metadata on one entry.
    let (code, body) = push_json(
        &addr,
        &json!({"streams": [{"stream": {"app": "shop", "env": "test"}, "values": [
            [t.to_string(), "json one"],
            [(t + 1).to_string(), "json two", {"trace_id": "abc123"}],
        ]}]}),
    );
    assert_eq!(code, 204, "{body}");

    // gzip JSON.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(
        json!({"streams": [{"stream": {"app": "shop", "env": "test"}, "values": [[(t + 2).to_string(), "gzip three"]]}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let (code, body) = http_post(
        &addr,
        "/loki/api/v1/push",
        &[
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ],
        &gz.finish().unwrap(),
    );
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&body));

    // Protobuf in snappy's block format, as promtail sends it.
    let req = PushRequest {
        streams: vec![StreamAdapter {
            labels: r#"{app="shop", env="test"}"#.into(),
            entries: vec![EntryAdapter {
                timestamp: Some(Ts {
                    seconds: (t + 3) / 1_000_000_000,
                    nanos: ((t + 3) % 1_000_000_000) as i32,
                }),
                line: "proto four".into(),
                structured_metadata: vec![Pair {
                    name: "trace_id".into(),
                    value: "def456".into(),
                }],
            }],
        }],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .unwrap();
    let (code, b) = http_post(
        &addr,
        "/loki/api/v1/push",
        &[("Content-Type", "application/x-protobuf")],
        &body,
    );
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&b));

    let sel = r#"{app="shop"}"#;
    assert_eq!(
        lines(&addr, sel),
        vec!["json one", "json two", "gzip three", "proto four"]
    );
    // Structured metadata filters like a label.
    assert_eq!(
        lines(&addr, r#"{app="shop"} | trace_id="def456""#),
        vec!["proto four"]
    );

    // Bad bodies: 4xx with the reason, nothing stored.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let bad: Vec<Case> = vec![
        (
            "malformed JSON",
            vec![("Content-Type", "application/json")],
            b"{\"streams\": [".to_vec(),
            400,
            "JSON",
        ),
        (
            "wrong JSON shape",
            vec![("Content-Type", "application/json")],
            br#"{"streams":[{"stream":{"app":"shop"},"values":[[1,"x"]]}]}"#.to_vec(),
            400,
            "line 1",
        ),
        (
            "not snappy",
            vec![("Content-Type", "application/x-protobuf")],
            b"plain, not snappy".to_vec(),
            400,
            "snappy",
        ),
        (
            "snappy, not protobuf",
            vec![("Content-Type", "application/x-protobuf")],
            snap::raw::Encoder::new()
                .compress_vec(b"\xff\xff\xff")
                .unwrap(),
            400,
            "PushRequest",
        ),
        (
            "bad gzip",
            vec![
                ("Content-Type", "application/json"),
                ("Content-Encoding", "gzip"),
            ],
            b"nope".to_vec(),
            400,
            "gzip",
        ),
        (
            "unknown type",
            vec![("Content-Type", "text/csv")],
            b"a,b".to_vec(),
            415,
            "Content-Type",
        ),
    ];
    for (what, headers, body, want, reason) in bad {
        let (code, b) = http_post(&addr, "/loki/api/v1/push", &headers, &body);
        let b = String::from_utf8_lossy(&b);
        assert_eq!(code, want, "{what}: {b}");
        assert!(b.contains(reason), "{what}: {b}");
    }
    let big = vec![b' '; 33 << 20];
    let (code, _) = http_post(
        &addr,
        "/loki/api/v1/push",
        &[("Content-Type", "application/json")],
        &big,
    );
    assert_eq!(code, 413);

    // Absurd timestamps and bad labels: refused with where they were; the
    // good entries of the same request are kept.
    let (code, body) = push_json(
        &addr,
        &json!({"streams": [
            {"stream": {"app": "shop"}, "values": [
                [(t + 4).to_string(), "kept five"],
                ["1", "from 1970"],
                [(t + 3_600_000_000_000i64).to_string(), "from the future"],
                ["soon", "not a number"],
            ]},
            {"stream": {"bad-name": "x"}, "values": [[t.to_string(), "bad label"]]},
        ]}),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("4 refused"), "{body}");
    assert!(body.contains("streams[0] entry 1"), "{body}");
    assert!(body.contains("future"), "{body}");
    assert!(body.contains("streams[0].values[3]"), "{body}");
    assert!(body.contains("bad-name"), "{body}");
    assert_eq!(
        lines(&addr, sel),
        vec![
            "json one",
            "json two",
            "gzip three",
            "proto four",
            "kept five"
        ]
    );

    // OTLP logs in JSON: the resource's service names the stream, the record's
    // ids and severity become metadata.
    let otlp = json!({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "billing"}}]},
        "scopeLogs": [{"logRecords": [{
            "timeUnixNano": t.to_string(),
            "severityNumber": 17,
            "body": {"stringValue": "card declined"},
            "traceId": "5b8efff798038103d269b633813fc60c",
            "spanId": "eee19b7ec3c1b174",
            "attributes": [{"key": "user", "value": {"stringValue": "ann"}}]
        }, {
            "timeUnixNano": "7",
            "body": {"stringValue": "too old"}
        }]}]
    }]});
    let (code, b) = http_post(
        &addr,
        "/v1/logs",
        &[("Content-Type", "application/json")],
        otlp.to_string().as_bytes(),
    );
    assert_eq!(code, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    // An int64: a string in proto3's JSON mapping, a number from some encoders.
    assert_eq!(
        v["partialSuccess"]["rejectedLogRecords"]
            .to_string()
            .trim_matches('"'),
        "1",
        "{v}"
    );
    assert_eq!(
        lines(
            &addr,
            r#"{service="billing", stream="otlp"} | level="error" | trace_id="5b8efff798038103d269b633813fc60c" | user="ann""#
        ),
        vec!["card declined"]
    );
    let (code, b) = http_post(
        &addr,
        "/v1/logs",
        &[("Content-Type", "application/json")],
        b"{\"resourceLogs\": 5}",
    );
    assert_eq!(code, 400);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert!(v["message"].as_str().unwrap().contains("OTLP JSON"), "{v}");
}

async fn next_message(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a tail message within 20 s")
            .expect("the tail is open")
            .expect("a good frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Lines of a tail message, oldest first, and its cursor.
fn tail_lines(v: &Value) -> (Vec<(i64, String)>, u64) {
    let mut out: Vec<(i64, String)> = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["values"].as_array().unwrap().clone())
        .map(|e| {
            (
                e[0].as_str().unwrap().parse().unwrap(),
                e[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    (out, v["cursor"].as_str().unwrap().parse().unwrap())
}

/// Pushes lines `from..to` to `{app="tail"}`: per number four lines and one
/// that the tail's query skips.
fn push_tail(addr: &str, from: usize, to: usize) {
    for i in from..to {
        let values: Vec<Value> = (0..5)
            .map(|k| {
                let line = if k == 4 {
                    format!("skip {i}")
                } else {
                    tail_line(i, k)
                };
                json!([now_ns().to_string(), line])
            })
            .collect();
        let (code, body) = push_json(
            addr,
            &json!({"streams": [{"stream": {"app": "tail"}, "values": values}]}),
        );
        assert_eq!(code, 204, "{body}");
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// A line of the tail tests: numbered, with a random-looking id (ids do not
/// compress, so the 1 KiB segments of the rotation test fill).
fn tail_line(i: usize, k: usize) -> String {
    let x = ((i * 5 + k) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!(
        "line {i:04}-{k} id={x:016x}{:016x}",
        x.rotate_left(29) ^ 0x5851_f42d
    )
}

fn tail_want(from: usize, to: usize) -> Vec<String> {
    (from..to)
        .flat_map(|i| (0..4).map(move |k| tail_line(i, k)))
        .collect()
}

#[test]
fn tail_follows_across_rotation_and_resumes_from_a_cursor() {
    let s = TestStack::new(&format!(
        "x-capstan:\n  logs: {{max_file_size: 1k, max_total_size: 100m}}\n{QUIET_STACK}"
    ));
    s.up();
    let addr = daemon_addr(&s);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!(
        "ws://{addr}/loki/api/v1/tail?query={}&start=0&limit=1000",
        enc(r#"{app="tail"} != "skip""#)
    );
    push_tail(&addr, 0, 10);
    let cursor = rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        // Pushes go on while the tail reads: 1 KiB segments rotate under it
        // many times.
        let a = addr.clone();
        let pusher = std::thread::spawn(move || push_tail(&a, 10, 150));
        let all = tail_want(0, 150);
        let mut got: Vec<String> = Vec::new();
        let mut cursor = 0;
        while got.len() < all.len() {
            let (l, c) = tail_lines(&next_message(&mut ws).await);
            got.extend(l.into_iter().map(|(_, l)| l));
            cursor = c;
        }
        pusher.join().unwrap();
        assert_eq!(got, all, "every line once, in order");
        cursor
    });
    let files = std::fs::read_dir(s.data_dir().join("logstore"))
        .unwrap()
        .count();
    assert!(files > 5, "only {files} segment files: no rotation");

    // Lines pushed while nobody tails are sent on resuming from the cursor.
    push_tail(&addr, 150, 170);
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}&cursor={cursor}"))
            .await
            .unwrap();
        let rest = tail_want(150, 170);
        let mut got: Vec<String> = Vec::new();
        while got.len() < rest.len() {
            let (l, _) = tail_lines(&next_message(&mut ws).await);
            got.extend(l.into_iter().map(|(_, l)| l));
        }
        assert_eq!(got, rest);
    });
}

/// A tail resuming far behind its cursor reads the backlog page by page
/// (`TAIL_PAGE` sequence numbers a read), every line once and in order.
#[test]
fn a_tail_far_behind_its_cursor_is_paged() {
    let s = TestStack::new(QUIET_STACK);
    s.up();
    let addr = daemon_addr(&s);
    let total = 30_000usize;
    for chunk in 0..(total / 5000) {
        let values: Vec<Value> = (0..5000)
            .map(|k| {
                json!([
                    now_ns().to_string(),
                    format!("backlog {:05}", chunk * 5000 + k)
                ])
            })
            .collect();
        let (code, body) = push_json(
            &addr,
            &json!({"streams": [{"stream": {"app": "backlog"}, "values": values}]}),
        );
        assert_eq!(code, 204, "{body}");
    }
    let url = format!(
        "ws://{addr}/loki/api/v1/tail?query={}&cursor=0",
        enc(r#"{app="backlog"}"#)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let mut got: Vec<String> = Vec::new();
        let mut cursors = Vec::new();
        while got.len() < total {
            let (l, c) = tail_lines(&next_message(&mut ws).await);
            assert!(l.len() <= 1000, "a message of {} lines", l.len());
            got.extend(l.into_iter().map(|(_, l)| l));
            cursors.push(c);
        }
        let want: Vec<String> = (0..total).map(|i| format!("backlog {i:05}")).collect();
        assert_eq!(got, want, "every line once, in order");
        assert!(cursors.windows(2).all(|w| w[0] <= w[1]), "{cursors:?}");
        // Each read ends at a page boundary while the backlog lasts.
        for page in [10_000, 20_000] {
            assert!(
                cursors.contains(&page),
                "no read ended at {page}: {cursors:?}"
            );
        }
    });
}

/// A tail whose client stops reading is dropped once a message waits longer
/// than the send timeout: nothing piles up for it in the daemon.
#[test]
fn a_tail_that_is_not_read_is_dropped() {
    use futures_util::StreamExt;
    let s = TestStack::new(QUIET_STACK);
    s.up();
    let addr = daemon_addr(&s);
    let url = format!(
        "ws://{addr}/loki/api/v1/tail?query={}",
        enc(r#"{app="flood"}"#)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut ws = rt.block_on(async {
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws
    });
    // ~24 MB of lines, far more than the socket buffers hold, while the
    // client reads nothing.
    let pad = "x".repeat(100);
    for chunk in 0..6 {
        let values: Vec<Value> = (0..40_000)
            .map(|k| json!([now_ns().to_string(), format!("flood {chunk} {k} {pad}")]))
            .collect();
        let (code, body) = push_json(
            &addr,
            &json!({"streams": [{"stream": {"app": "flood"}, "values": values}]}),
        );
        assert_eq!(code, 204, "{body}");
    }
    std::thread::sleep(Duration::from_secs(15));
    // Reading now drains what the buffers hold, then the connection ends.
    let ended = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(m) = ws.next().await {
                if m.is_err() {
                    break;
                }
            }
        })
        .await
        .is_ok()
    });
    assert!(ended, "the daemon kept the unread tail open");
}
