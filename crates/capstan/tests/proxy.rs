//! The proxy in front of published ports, end to end: the real binary, the demo
//! service as replicas, requests over real sockets.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A stack of the demo behind a published loopback port; returns it and the port.
fn stack(replicas: u32, extra: &str) -> (TestStack, u16) {
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    command: ["{{demo}}"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
      LOG_REQUESTS: "0"
    ports: ["127.0.0.1:{port}:http"]
    stop_grace_period: 10s
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s, timeout: 1s, retries: 3}}
      metrics: {{disable: true}}
{extra}
    deploy:
      replicas: {replicas}
"#
    ));
    s.up();
    (s, port)
}

/// One request over a fresh connection: status, headers (lowercased) and body.
fn request(port: u16, raw: &str) -> (u16, String, String) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out).into_owned();
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (code, head.to_ascii_lowercase(), body.to_owned())
}

fn get(port: u16, path: &str) -> (u16, String, String) {
    request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"),
    )
}

/// Runs `capstan load` and returns its JSON summary.
fn load(args: &[&str]) -> Value {
    let out = Command::new(capstan_bin())
        .arg("load")
        .args(args)
        .args(["-o", "json"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn spawn_load(args: Vec<String>) -> std::thread::JoinHandle<Value> {
    std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        load(&a)
    })
}

fn assert_all_ok(v: &Value) {
    let n = v["requests"].as_u64().unwrap();
    assert!(n > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["status"]["200"].as_u64(), Some(n), "{v}");
}

fn replica_of(body: &str) -> Option<u32> {
    body.trim().rsplit(' ').next()?.parse().ok()
}

#[test]
fn spreads_requests_over_ready_replicas_only() {
    // Replica 2 never becomes healthy (it starts listening after 10 minutes).
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    command: ["/bin/sh", "-c", "if [ $$CAPSTAN_REPLICA = 2 ]; then export STARTUP_DELAY_MS=600000; fi; exec {{demo}}"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
    ports: ["127.0.0.1:{port}:http"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s, timeout: 1s, retries: 3}}
      metrics: {{disable: true}}
    deploy:
      replicas: 3
"#
    ));
    // `up` reports the replica that stays unready and exits 1; that is expected.
    let _ = s.run(&[
        "up",
        "-d",
        "--listen",
        "127.0.0.1:0",
        "--wait-timeout",
        "1s",
    ]);
    wait_for("replicas 0 and 1 healthy", Duration::from_secs(30), || {
        let r = s.replicas("web");
        (r.iter().filter(|r| r["health"] == "healthy").count() == 2).then_some(())
    });
    let mut seen = [0u32; 3];
    for _ in 0..200 {
        let (code, _, body) = get(port, "/");
        assert_eq!(code, 200, "{body}");
        seen[replica_of(&body).unwrap() as usize] += 1;
    }
    assert_eq!(
        seen[2], 0,
        "the replica that is not ready got traffic: {seen:?}"
    );
    assert!(seen[0] > 20 && seen[1] > 20, "uneven spread: {seen:?}");
}

#[test]
fn headers_trace_context_and_hop_by_hop() {
    let (_s, port) = stack(1, "");
    let (code, _, body) = request(
        port,
        "GET /headers HTTP/1.1\r\nHost: app.test\r\nConnection: close, x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 10.1.2.3\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}");
    let lower = body.to_ascii_lowercase();
    assert!(
        lower.contains("x-forwarded-for: 10.1.2.3, 127.0.0.1"),
        "{body}"
    );
    assert!(lower.contains("x-forwarded-proto: http"), "{body}");
    assert!(lower.contains("x-forwarded-host: app.test"), "{body}");
    assert!(lower.contains("host: app.test"), "{body}");
    // A valid sampled traceparent goes on in the same trace, the proxy's own
    // span as the parent.
    let tp = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent forwarded: {body}"));
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            && tp.ends_with("-01")
            && !tp.contains("00f067aa0ba902b7"),
        "{tp}"
    );
    assert!(!lower.contains("x-secret"), "named by Connection: {body}");
    assert!(!lower.contains("keep-alive"), "{body}");
    // Without one, the proxy starts a trace.
    let (_, _, body) = get(port, "/headers");
    let tp = body
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("no traceparent created: {body}"));
    assert_eq!(tp.len(), 55, "{tp}");
    assert!(tp.starts_with("00-") && tp.ends_with("-01"), "{tp}");
}

#[test]
fn metrics_and_access_log() {
    let (s, port) = stack(2, "");
    for _ in 0..20 {
        assert_eq!(get(port, "/").0, 200);
    }
    assert_eq!(get(port, "/nope").0, 404);
    let addr = daemon_addr(&s);
    let (code, text) = http_fetch(&addr, "/metrics");
    assert_eq!(code, 200);
    let total: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("http_requests_total{service=\"web\"") && l.contains("code=\"200\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 20.0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("http_requests_total{service=\"web\"")
                && l.contains("method=\"GET\",code=\"404\"}")),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket{service=\"web\""),
        "{text}"
    );
    assert!(
        text.contains("capstan_proxy_ready_replicas{service=\"web\"} 2"),
        "{text}"
    );
    // One access-log line per request, in the replica's logs.
    wait_for("access log lines", Duration::from_secs(10), || {
        let logs = s.stored_logs("web");
        let lines = logs
            .lines()
            .filter(|l| l.contains("method=GET") && l.contains("trace_id="))
            .count();
        (lines == 21).then_some(())
    });
    let logs = s.stored_logs("web");
    assert!(logs.contains(r#"path="/nope" status=404"#), "{logs}");
}

#[test]
fn killed_replica_under_load_fails_no_request_and_is_ejected_then_readmitted() {
    // Each replica runs the demo in a loop: killing the demo leaves the replica
    // running with nothing listening on its port for a second.
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    command: ["/bin/sh", "-c", "while true; do {{demo}}; sleep 1; done"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
      LOG_REQUESTS: "0"
    ports: ["127.0.0.1:{port}:http"]
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s, timeout: 1s, retries: 5}}
      metrics: {{disable: true}}
      proxy: {{eject_after: 1}}
    deploy:
      replicas: 3
"#
    ));
    s.up();
    let url = format!("http://127.0.0.1:{port}/");
    let loader = spawn_load(vec![url, "-c".into(), "8".into(), "-d".into(), "5s".into()]);
    std::thread::sleep(Duration::from_millis(1500));
    // The demo process of replica 1: the marked child of the replica's shell.
    let shell = s.replicas("web")[1]["pid"].as_i64().unwrap() as i32;
    let demo = s
        .marked_pids()
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(") ")
                        .and_then(|(_, r)| r.split(' ').nth(1).map(str::to_owned))
                })
                .is_some_and(|ppid| ppid == shell.to_string())
                && std::fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e.to_string_lossy().contains("capstan-demo"))
        })
        .expect("the demo process of replica 1");
    sigkill(demo);
    let v = loader.join().unwrap();
    assert_all_ok(&v);
    let events = s.events();
    let kinds: Vec<(&str, Option<i64>)> = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap_or(""), e["replica"].as_i64()))
        .collect();
    assert!(kinds.contains(&("ejected", Some(1))), "{kinds:?}");
    wait_for("re-admission", Duration::from_secs(15), || {
        s.events()
            .iter()
            .any(|e| e["kind"] == "readmitted" && e["replica"] == 1)
            .then_some(())
    });
    // Back in the balancer: it answers again.
    let mut seen = false;
    for _ in 0..60 {
        let (code, _, body) = get(port, "/");
        assert_eq!(code, 200);
        seen |= replica_of(&body) == Some(1);
    }
    assert!(seen, "replica 1 got no traffic after re-admission");
}

#[test]
fn scale_down_under_load_drops_nothing() {
    let (s, port) = stack(4, "");
    let url = format!("http://127.0.0.1:{port}/work?ms=20");
    let loader = spawn_load(vec![url, "-c".into(), "8".into(), "-d".into(), "5s".into()]);
    std::thread::sleep(Duration::from_millis(1500));
    s.ok(&["scale", "web=1"]);
    let v = loader.join().unwrap();
    assert_all_ok(&v);
    assert_eq!(s.replicas("web").len(), 1);
}

#[test]
fn queue_overflow_gets_503_with_retry_after() {
    let (_s, port) = stack(1, "      proxy: {max_inflight: 1, queue: 1}");
    let threads: Vec<_> = (0..5)
        .map(|_| std::thread::spawn(move || get(port, "/work?ms=1000")))
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(ok + refused.len(), 5, "{results:?}");
    assert!(
        ok >= 2,
        "one in flight and one queued are served: {results:?}"
    );
    assert!(!refused.is_empty(), "{results:?}");
    for (_, head, body) in refused {
        assert!(head.contains("retry-after: 1"), "{head}");
        assert!(body.contains("queue of 1 requests is full"), "{body}");
    }
}

#[test]
fn bad_input_does_not_take_the_proxy_down() {
    let (_s, port) = stack(
        1,
        "      proxy: {max_body: 1k, max_header: 16k, idle_timeout: 2s}",
    );
    // Malformed request line.
    let (code, _, _) = request(port, "GARBAGE\r\n\r\n");
    assert_eq!(code, 400);
    // Oversized head.
    let big = "a".repeat(32 << 10);
    let (code, _, _) = request(
        port,
        &format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n"),
    );
    assert_eq!(code, 431);
    // Oversized body, declared.
    let body = "b".repeat(4096);
    let (code, _, text) = request(
        port,
        &format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("max_body"), "{text}");
    // Slow clients: many connections dribbling a request head.
    let mut slow: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
            c
        })
        .collect();
    // Others are served meanwhile.
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(port, "/").0, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // And the slow ones are cut off after the idle timeout.
    std::thread::sleep(Duration::from_millis(2500));
    let mut closed = 0;
    for c in &mut slow {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = c.write_all(b"X-More: 1\r\n");
        let mut buf = [0u8; 256];
        // Closed: EOF, a reset, or hyper's 408 before closing.
        match c.read(&mut buf) {
            Ok(0) | Err(_) => closed += 1,
            Ok(n) => {
                if String::from_utf8_lossy(&buf[..n]).contains(" 408 ") {
                    closed += 1;
                }
            }
        }
    }
    assert_eq!(closed, 64);
    assert_eq!(get(port, "/").0, 200);
}

#[test]
fn upgrade_tunnels_bytes_both_ways() {
    let (_s, port) = stack(1, "");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            c.read(&mut b).unwrap(),
            1,
            "{}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in ["hello", "through the tunnel"] {
        c.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }
}

#[test]
fn tcp_mode_forwards_bytes() {
    let (_s, port) = stack(2, "      protocol: tcp");
    // Raw TCP: the HTTP exchange passes through untouched, no proxy headers.
    let (code, _, body) = get(port, "/headers");
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.to_ascii_lowercase().contains("x-forwarded-for"),
        "{body}"
    );
    assert!(!body.contains("traceparent"), "{body}");
}

#[test]
fn http2_cleartext() {
    let (_s, port) = stack(1, "");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        use http_body_util::BodyExt;
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for _ in 0..3 {
            let req = hyper::Request::builder()
                .uri(format!("http://127.0.0.1:{port}/"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(String::from_utf8_lossy(&body).starts_with("hello from web"));
        }
    });
}

/// The demo's gRPC messages (`capstan-demo grpc`), as a client declares them.
#[derive(Clone, PartialEq, prost::Message)]
struct SayRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int32, tag = "2")]
    fail_code: i32,
    #[prost(uint32, tag = "3")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SayReply {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(string, tag = "2")]
    replica: String,
    #[prost(uint32, tag = "3")]
    seq: u32,
}

/// A stack of the demo's gRPC server behind a published port; `port` is the
/// `ports:` entry (after the address).
fn grpc_stack(replicas: u32, ports: &str) -> (TestStack, u16) {
    let port = free_port();
    let ports = ports.replace("{port}", &port.to_string());
    let s = TestStack::new(&format!(
        r#"
services:
  web:
    command: ["{{demo}}", "grpc"]
    environment:
      CAPSTAN_TEST_MARKER: "{{marker}}"
    ports: {ports}
    x-capstan:
      metrics: {{disable: true}}
    deploy:
      replicas: {replicas}
"#
    ));
    s.up();
    (s, port)
}

type Grpc = tonic::client::Grpc<tonic::transport::Channel>;

async fn grpc_client(port: u16) -> Grpc {
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(ch)
}

fn codec() -> tonic_prost::ProstCodec<SayRequest, SayReply> {
    tonic_prost::ProstCodec::default()
}

fn method(name: &'static str) -> tonic::codegen::http::uri::PathAndQuery {
    tonic::codegen::http::uri::PathAndQuery::from_static(name)
}

async fn say(g: &mut Grpc, name: &str, fail_code: i32) -> Result<SayReply, tonic::Status> {
    g.ready().await.unwrap();
    let req = SayRequest {
        name: name.into(),
        fail_code,
        count: 0,
    };
    g.unary(
        tonic::Request::new(req),
        method("/capstan.demo.Echo/Say"),
        codec(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[test]
fn grpc_unary_and_streaming_calls_over_http2_to_the_replicas() {
    // Compose's long port syntax with `app_protocol: grpc`.
    let (s, port) = grpc_stack(
        2,
        r#"[{target: http, published: {port}, host_ip: 127.0.0.1, app_protocol: grpc}]"#,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut g = grpc_client(port).await;
        // Unary calls, balanced over both replicas.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..40 {
            let r = say(&mut g, &format!("n{i}"), 0).await.unwrap();
            assert_eq!(r.message, format!("hello n{i}"));
            seen.insert(r.replica);
        }
        assert_eq!(seen.len(), 2, "calls reached replicas {seen:?}");

        // A failed unary call: its status, message and trailer metadata
        // come through (a trailers-only response).
        let st = say(&mut g, "x", 14).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
        assert!(
            st.message().starts_with("failing as asked, replica "),
            "{st:?}"
        );
        assert!(st.metadata().get("x-demo-replica").is_some(), "{st:?}");

        // Server streaming: five replies, then the status in real trailers.
        g.ready().await.unwrap();
        let req = SayRequest {
            name: "s".into(),
            fail_code: 9,
            count: 5,
        };
        let mut stream = g
            .server_streaming(
                tonic::Request::new(req),
                method("/capstan.demo.Echo/Count"),
                codec(),
            )
            .await
            .unwrap()
            .into_inner();
        let mut seqs = Vec::new();
        let end = loop {
            match stream.message().await {
                Ok(Some(m)) => seqs.push(m.seq),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let st = end.expect("the stream ends with the status asked for");
        assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
        assert!(st.metadata().get("x-demo-replica").is_some(), "{st:?}");

        // Bidirectional: each message answered while the call is open.
        g.ready().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<SayRequest>(4);
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut replies = g
            .streaming(
                tonic::Request::new(outbound),
                method("/capstan.demo.Echo/Chat"),
                codec(),
            )
            .await
            .unwrap()
            .into_inner();
        for i in 1..=3u32 {
            let m = SayRequest {
                name: format!("c{i}"),
                fail_code: 0,
                count: 0,
            };
            tx.send(m).await.unwrap();
            let r = replies.message().await.unwrap().unwrap();
            assert_eq!(
                (r.message.as_str(), r.seq),
                (format!("hello c{i}").as_str(), i)
            );
        }
        drop(tx);
        assert!(replies.message().await.unwrap().is_none());
    });

    // The same metrics as HTTP: 40 + 1 + 1 + 1 calls, all HTTP 200.
    let (code, text) = http_fetch(&daemon_addr(&s), "/metrics");
    assert_eq!(code, 200);
    let total: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("http_requests_total{service=\"web\"")
                && l.contains("method=\"POST\",code=\"200\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 43.0, "{text}");
    // The access log has each call's gRPC status.
    wait_for("access log lines", Duration::from_secs(10), || {
        let logs = s.stored_logs("web");
        let n = |st: &str| logs.lines().filter(|l| l.contains(st)).count();
        (n("grpc_status=0") == 41 && n("grpc_status=14") == 1 && n("grpc_status=9") == 1)
            .then_some(())
    });
    let logs = s.stored_logs("web");
    assert!(
        logs.contains(r#"path="/capstan.demo.Echo/Count" status=200"#),
        "{logs}"
    );
}

#[test]
fn grpc_goes_over_http2_without_being_declared() {
    let (_s, port) = grpc_stack(1, r#"["127.0.0.1:{port}:http"]"#);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut g = grpc_client(port).await;
        let r = say(&mut g, "plain", 0).await.unwrap();
        assert_eq!(
            (r.message.as_str(), r.replica.as_str()),
            ("hello plain", "0")
        );
    });
}
