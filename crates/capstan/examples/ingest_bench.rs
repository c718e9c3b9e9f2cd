//! Ingest through the daemon, measured against its own CPU time:
//! `cargo build --release -p capstan && cargo run --release -p capstan --example ingest_bench -- [SECONDS]`
//!
//! Starts `target/release/capstan` on a stack of one service that prints a
//! generated corpus of JSON request lines to stdout (captured output), then
//! pushes the same kind of lines through Loki's push API (JSON, and protobuf in
//! snappy), then OTLP spans (protobuf), and fetches traces by id without a time
//! range. Throughput per core is bytes (or spans) over the daemon's CPU
//! seconds (utime + stime from /proc), so the client's own work is left out.

// Tests measure real time; the daemon reads it through state::clock.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PATHS: [&str; 6] = [
    "/api/v1/users",
    "/api/v1/orders",
    "/api/v1/items",
    "/healthz",
    "/api/v1/cart",
    "/login",
];

/// One JSON request line as a web service logs it.
fn json_line(r: &mut Rng, ts_ms: u64) -> String {
    let ip = r.below(300);
    format!(
        r#"{{"ts":"{ts_ms}","level":"{}","msg":"request","method":"GET","path":"{}","status":{},"bytes":{},"duration_ms":{:.1},"client":"10.0.{}.{}","user":"u{}","trace_id":"{:016x}{:016x}","request_id":"{:016x}"}}"#,
        ["info", "info", "info", "warn", "error"][r.below(5) as usize],
        PATHS[r.below(6) as usize],
        [200, 200, 200, 201, 304, 404, 500][r.below(7) as usize],
        r.below(20000),
        r.below(900) as f64 / 10.0,
        ip % 256,
        (ip * 7) % 256,
        r.below(5000),
        r.next(),
        r.next(),
        r.next()
    )
}

fn post(addr: &str, path: &str, ct: &str, body: &[u8]) -> u16 {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    c.write_all(body).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    std::str::from_utf8(&out[9..12]).unwrap().parse().unwrap()
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default(),
    )
}

/// The daemon's CPU seconds so far.
fn cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Waits out the background work a phase left (the daemon compacts sealed
/// segments on its maintenance pass, every 10 s): at least one pass, then until
/// a second goes by with (nearly) no CPU used above the idle rate. Returns the
/// CPU seconds used meanwhile above that rate.
fn settle(pid: u32, idle_per_s: f64) -> f64 {
    let (c0, t0) = (cpu(pid), Instant::now());
    let mut last = c0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let c = cpu(pid);
        if t0.elapsed() > Duration::from_secs(11) && c - last <= idle_per_s + 0.02 {
            let el = t0.elapsed().as_secs_f64();
            return (c - c0 - idle_per_s * el).max(0.0);
        }
        last = c;
    }
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

struct Daemon {
    dir: PathBuf,
    bin: PathBuf,
    addr: String,
    pid: u32,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.bin)
            .args(["down", "-f"])
            .arg(self.dir.join("capstan.yaml"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(bin: &Path, corpus: &Path) -> Daemon {
    let dir = std::env::temp_dir().join(format!("capstan-ingest-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // `cat` waits for a go file, so the captured-output run starts when timed.
    std::fs::write(
        dir.join("capstan.yaml"),
        format!(
            "x-capstan:\n  logs: {{max_total_size: 20g}}\nservices:\n  printer:\n    command: [\"sh\", \"-c\", \"while [ ! -e go ]; do sleep 0.05; done; cat {}; exec sleep 3600\"]\n    x-capstan:\n      metrics: {{disable: true}}\n",
            corpus.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["up", "-d", "--listen", "127.0.0.1:0", "-f"])
        .arg(dir.join("capstan.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(".capstan/daemon.json")).unwrap()).unwrap();
    Daemon {
        addr: info["addr"].as_str().unwrap().to_owned(),
        pid: info["pid"].as_u64().unwrap() as u32,
        dir,
        bin: bin.to_owned(),
    }
}

fn count(addr: &str, selector: &str) -> u64 {
    let q: String = format!("sum(count_over_time({selector}[1h]))")
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (_, body) = get(addr, &format!("/loki/api/v1/query?query={q}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn last_line_seen(addr: &str) -> bool {
    let (_, body) = get(
        addr,
        "/loki/api/v1/query_range?query=%7Bservice%3D%22printer%22%7D%20%7C%3D%20%22corpus-end-marker%22&limit=1&start=0",
    );
    body.contains("corpus-end-marker\"")
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bin =
        PathBuf::from(std::env::var("CAPSTAN_BIN").unwrap_or("target/release/capstan".into()));
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);

    // Captured stdout: a corpus file the service prints at once.
    let corpus = std::env::temp_dir().join(format!("capstan-corpus-{}.jsonl", std::process::id()));
    let lines_n = 1_000_000u64;
    let mut f = std::io::BufWriter::new(std::fs::File::create(&corpus).unwrap());
    let mut corpus_bytes = 0u64;
    for i in 0..lines_n {
        let l = json_line(&mut r, 1_795_000_000_000 + i);
        corpus_bytes += l.len() as u64 + 1;
        writeln!(f, "{l}").unwrap();
    }
    // The last line marks the end: found through the block filters, cheaply.
    writeln!(f, "corpus-end-marker").unwrap();
    f.flush().unwrap();
    drop(f);
    let d = start(&bin, &corpus);
    println!("daemon {} (pid {})", d.addr, d.pid);
    // The idle daemon's own rate (flushes, its own metrics), left out of settling.
    let i0 = cpu(d.pid);
    std::thread::sleep(Duration::from_secs(3));
    let idle = (cpu(d.pid) - i0) / 3.0;
    let c0 = cpu(d.pid);
    let t0 = Instant::now();
    std::fs::write(d.dir.join("go"), "").unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if last_line_seen(&d.addr) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "captured lines never all arrived"
        );
    }
    let (wall, used) = (t0.elapsed().as_secs_f64(), cpu(d.pid) - c0);
    let later = settle(d.pid, idle);
    assert_eq!(
        count(&d.addr, r#"{service="printer"}"#),
        lines_n + 1,
        "every captured line stored"
    );
    let mb = corpus_bytes as f64 / 1e6;
    println!(
        "captured stdout: {lines_n} lines, {mb:.0} MB in {wall:.2} s wall, {used:.2} CPU s + {later:.2} s compacting after: {:.1} MB/s per core, {:.0}k lines/s per core (while ingesting {:.1} MB/s per core; wall {:.1} MB/s)",
        mb / (used + later),
        lines_n as f64 / (used + later) / 1e3,
        mb / used,
        mb / wall
    );
    let _ = std::fs::remove_file(&corpus);
    let mut log_bytes = corpus_bytes;

    // Loki push: batches of 1000 lines over 10 streams, JSON then protobuf+snappy.
    for proto in [false, true] {
        let (mut bytes, mut lines) = (0u64, 0u64);
        let c0 = cpu(d.pid);
        let t0 = Instant::now();
        let mut batch_no = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            let base = now_ns();
            let mut streams: Vec<(String, Vec<(i64, String)>)> =
                (0..10).map(|s| (format!("pod-{s}"), Vec::new())).collect();
            for i in 0..1000u64 {
                let l = json_line(&mut r, (base / 1_000_000) as u64);
                bytes += l.len() as u64;
                streams[(i % 10) as usize].1.push((base + i as i64, l));
            }
            lines += 1000;
            batch_no += 1;
            let code = if proto {
                let mut req = Vec::new();
                for (pod, entries) in &streams {
                    // PushRequest.streams (1) → StreamAdapter {labels (1), entries (2)}.
                    let mut s = Vec::new();
                    prost::encoding::string::encode(
                        1,
                        &format!("{{app=\"bench\", pod=\"{pod}\", enc=\"proto\"}}"),
                        &mut s,
                    );
                    for (ts, line) in entries {
                        let mut t = Vec::new();
                        prost::encoding::int64::encode(1, &(ts / 1_000_000_000), &mut t);
                        prost::encoding::int32::encode(2, &((ts % 1_000_000_000) as i32), &mut t);
                        let mut e = Vec::new();
                        prost::encoding::bytes::encode(1, &t, &mut e);
                        prost::encoding::string::encode(2, line, &mut e);
                        prost::encoding::bytes::encode(2, &e, &mut s);
                    }
                    prost::encoding::bytes::encode(1, &s, &mut req);
                }
                let body = snap::raw::Encoder::new().compress_vec(&req).unwrap();
                post(
                    &d.addr,
                    "/loki/api/v1/push",
                    "application/x-protobuf",
                    &body,
                )
            } else {
                let body = serde_json::json!({"streams": streams.iter().map(|(pod, entries)| serde_json::json!({
                    "stream": {"app": "bench", "pod": pod, "enc": "json"},
                    "values": entries.iter().map(|(ts, l)| serde_json::json!([ts.to_string(), l])).collect::<Vec<_>>(),
                })).collect::<Vec<_>>()});
                post(
                    &d.addr,
                    "/loki/api/v1/push",
                    "application/json",
                    body.to_string().as_bytes(),
                )
            };
            assert_eq!(code, 204, "batch {batch_no}");
        }
        let (wall, used) = (t0.elapsed().as_secs_f64(), cpu(d.pid) - c0);
        let later = settle(d.pid, idle);
        log_bytes += bytes;
        let mb = bytes as f64 / 1e6;
        println!(
            "loki push {}: {lines} lines, {mb:.0} MB of lines in {wall:.1} s, {used:.2} CPU s + {later:.2} s compacting after: {:.1} MB/s per core, {:.0}k lines/s per core (while ingesting {:.1} MB/s per core)",
            if proto { "protobuf+snappy" } else { "json" },
            mb / (used + later),
            lines as f64 / (used + later) / 1e3,
            mb / used,
        );
    }

    // OTLP spans: batches of 1000 spans (100 traces of 10 spans), protobuf.
    let mut ids: Vec<String> = Vec::new();
    let (mut spans, c0, t0) = (0u64, cpu(d.pid), Instant::now());
    while t0.elapsed() < Duration::from_secs(secs) {
        let base = now_ns() as u64;
        let mut out = Vec::with_capacity(1000);
        for _ in 0..100 {
            let trace = [r.next().to_be_bytes(), r.next().to_be_bytes()].concat();
            let root = r.next().to_be_bytes().to_vec();
            for k in 0..10u64 {
                out.push(Span {
                    trace_id: trace.clone(),
                    span_id: if k == 0 {
                        root.clone()
                    } else {
                        r.next().to_be_bytes().to_vec()
                    },
                    parent_span_id: if k == 0 { Vec::new() } else { root.clone() },
                    name: PATHS[(k % 6) as usize].to_owned(),
                    kind: if k == 0 { 2 } else { 3 },
                    start_time_unix_nano: base + k * 1000,
                    end_time_unix_nano: base + k * 1000 + r.below(50_000_000),
                    attributes: vec![
                        kv("http.method", "GET"),
                        kv("user.id", &format!("u{}", r.below(5000))),
                    ],
                    ..Default::default()
                });
            }
            if r.below(50) == 0 {
                ids.push(trace.iter().map(|b| format!("{b:02x}")).collect());
            }
        }
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "bench"), kv("host.name", "box")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: out,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        assert_eq!(
            post(
                &d.addr,
                "/v1/traces",
                "application/x-protobuf",
                &req.encode_to_vec()
            ),
            200
        );
        spans += 1000;
    }
    let (wall, used) = (t0.elapsed().as_secs_f64(), cpu(d.pid) - c0);
    let later = settle(d.pid, idle);
    println!(
        "otlp spans: {spans} in {wall:.1} s, {used:.2} CPU s + {later:.2} s after: {:.0}k spans/s per core (wall {:.0}k/s)",
        spans as f64 / (used + later) / 1e3,
        spans as f64 / wall / 1e3
    );

    // Trace by id, no time range, after the daemon flushed.
    std::thread::sleep(Duration::from_secs(2));
    let mut lat: Vec<f64> = Vec::new();
    for id in ids.iter().take(200) {
        let t = Instant::now();
        let (code, body) = get(&d.addr, &format!("/api/traces/{id}"));
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(code, 200, "{body}");
        assert_eq!(body.matches("\"spanId\"").count(), 10);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "trace by id ({} lookups over {spans} spans, no time range): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    let du = |sub: &str| -> u64 {
        std::fs::read_dir(d.dir.join(".capstan").join(sub))
            .unwrap()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    println!(
        "trace store on disk: {:.1} MB",
        du("tracestore") as f64 / 1e6
    );
    let logs = du("logstore");
    println!(
        "log store on disk: {:.1} MB for {:.1} MB of lines: {:.2}x",
        logs as f64 / 1e6,
        log_bytes as f64 / 1e6,
        log_bytes as f64 / logs as f64
    );
}
