//! The demo service used by capstan's examples, tests and benchmarks.
//!
//! `GET /` hello with version and replica, `GET /healthz`, `GET /metrics`
//! (Prometheus text format), `GET /work?ms=N` burns CPU, `GET /alloc?mb=N` holds
//! memory, `GET /headers` echoes the request's headers, `GET /echo` with
//! `Upgrade: echo` switches protocols and echoes bytes (WebSocket-like tunnels).
//! Knobs: `PORT`, `HOST` (default 127.0.0.1), `VERSION`, `FAIL_RATE`, `FAIL_AFTER_MS` (`FAIL_RATE`
//! applies only that long after the start), `STARTUP_DELAY_MS`, `CRASH_AFTER_MS`,
//! `LOG_REQUESTS=0` (no line per request). `capstan-demo grpc` serves gRPC
//! instead (HTTP/2 cleartext, see [`grpc`]).
//! Logs JSON lines on stdout; on SIGTERM finishes in-flight requests, then exits 0.
#![forbid(unsafe_code)]

mod grpc;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

struct App {
    version: String,
    replica: String,
    service: String,
    fail_rate: f64,
    /// Failures are injected only from this moment on.
    fail_from: Instant,
    rng: AtomicU64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    held: Mutex<Vec<Vec<u8>>>,
    log_requests: bool,
}

impl App {
    /// xorshift64*: enough randomness for failure injection, no dependency.
    fn random(&self) -> f64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn record(&self, path: &str, code: u16, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        *self
            .requests
            .lock()
            .unwrap()
            .entry((path.to_owned(), code))
            .or_default() += 1;
        let mut lat = self.latency.lock().unwrap();
        let h = lat.entry(path.to_owned()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
        drop(lat);
        if !self.log_requests {
            return;
        }
        log(
            "info",
            "request",
            &[
                ("path", path.into()),
                ("code", code.into()),
                ("duration_ms", (secs * 1000.0).into()),
            ],
        );
    }
}

fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

fn log(level: &str, msg: &str, fields: &[(&str, serde_json::Value)]) {
    let mut obj = serde_json::Map::new();
    obj.insert("ts".into(), now_rfc3339().into());
    obj.insert("level".into(), level.into());
    obj.insert("msg".into(), msg.into());
    for (k, v) in fields {
        obj.insert((*k).into(), v.clone());
    }
    println!("{}", serde_json::Value::Object(obj));
}

fn env_f64(name: &str) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn hello(State(app): State<Arc<App>>) -> Response {
    let started = Instant::now();
    if app.fail_rate > 0.0 && started >= app.fail_from && app.random() < app.fail_rate {
        app.record("/", 500, started);
        return (StatusCode::INTERNAL_SERVER_ERROR, "injected failure\n").into_response();
    }
    app.record("/", 200, started);
    format!(
        "hello from {} version {} replica {}\n",
        app.service, app.version, app.replica
    )
    .into_response()
}

async fn healthz(State(app): State<Arc<App>>) -> &'static str {
    let _ = app;
    "ok\n"
}

async fn work(State(app): State<Arc<App>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let started = Instant::now();
    let ms: u64 = q
        .get("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .min(60_000);
    let spins = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_millis(ms);
        let mut x = 0u64;
        while Instant::now() < until {
            for i in 0..1000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
        }
        x
    })
    .await
    .unwrap_or(0);
    app.record("/work", 200, started);
    format!("worked {ms} ms ({spins:x})\n").into_response()
}

/// `GET /fetch?url=http://HOST:PORT/PATH`: GETs that URL (HTTP/1.0) and
/// answers with what came back: how tests see one service reach another.
async fn fetch(Query(q): Query<BTreeMap<String, String>>) -> Response {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(url) = q.get("url") else {
        return (StatusCode::BAD_REQUEST, "give ?url=http://host:port/path\n").into_response();
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return (StatusCode::BAD_REQUEST, "only http:// URLs\n").into_response();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let run = async {
        let mut s = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect to {authority}: {e}"))?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Ok(buf)) => {
            let text = String::from_utf8_lossy(&buf);
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            body.to_owned().into_response()
        }
        Ok(Err(e)) => (StatusCode::BAD_GATEWAY, format!("{e}\n")).into_response(),
        Err(_) => (StatusCode::GATEWAY_TIMEOUT, "timed out\n").into_response(),
    }
}

/// Answers after `ms` milliseconds without using the CPU: a slow request.
async fn sleep(State(app): State<Arc<App>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let started = Instant::now();
    let ms: u64 = q
        .get("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .min(600_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    app.record("/sleep", 200, started);
    format!("slept {ms} ms in replica {}\n", app.replica).into_response()
}

async fn alloc(State(app): State<Arc<App>>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let started = Instant::now();
    let mb: usize = q
        .get("mb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .min(64 * 1024);
    // Every page written (one memset, fast even in a debug build) so the
    // memory is really resident, and quickly: a slow climb to a memory
    // limit lets the kernel reclaim the program's own code pages for a long
    // while before it kills.
    let block: Vec<u8> = vec![0xa5; mb << 20];
    let total = {
        let mut held = app.held.lock().unwrap();
        held.push(block);
        held.iter().map(Vec::len).sum::<usize>() >> 20
    };
    app.record("/alloc", 200, started);
    log(
        "info",
        "allocated",
        &[("mb", mb.into()), ("total_mb", total.into())],
    );
    format!("holding {total} MiB\n").into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    out.push_str("# HELP demo_requests_total Requests handled, by path and status code.\n");
    out.push_str("# TYPE demo_requests_total counter\n");
    for ((path, code), n) in app.requests.lock().unwrap().iter() {
        let _ = writeln!(
            out,
            "demo_requests_total{{path=\"{path}\",code=\"{code}\"}} {n}"
        );
    }
    out.push_str("# HELP demo_request_duration_seconds Request latency.\n");
    out.push_str("# TYPE demo_request_duration_seconds histogram\n");
    for (path, h) in app.latency.lock().unwrap().iter() {
        for (b, c) in BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(
                out,
                "demo_request_duration_seconds_bucket{{path=\"{path}\",le=\"{b}\"}} {c}"
            );
        }
        let _ = writeln!(
            out,
            "demo_request_duration_seconds_bucket{{path=\"{path}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "demo_request_duration_seconds_sum{{path=\"{path}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "demo_request_duration_seconds_count{{path=\"{path}\"}} {}",
            h.count
        );
    }
    out.push_str(
        "# HELP demo_build_info Version of the demo service.\n# TYPE demo_build_info gauge\n",
    );
    let _ = writeln!(out, "demo_build_info{{version=\"{}\"}} 1", app.version);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The request's headers, one `name: value` per line, in arrival order.
async fn headers(req: axum::extract::Request) -> String {
    let mut out = String::new();
    for (k, v) in req.headers() {
        out.push_str(k.as_str());
        out.push_str(": ");
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
        out.push('\n');
    }
    out
}

/// `Upgrade: echo`: answers 101, then sends back every byte it receives.
async fn echo(mut req: axum::extract::Request) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"echo"));
    if !wants {
        return (StatusCode::BAD_REQUEST, "send Upgrade: echo\n").into_response();
    }
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let mut io = hyper_util::rt::TokioIo::new(up);
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "echo")
        .body(axum::body::Body::empty())
        .unwrap_or_default()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    log(
        "info",
        "shutting down, finishing in-flight requests",
        &[("signal", which.into())],
    );
}

/// `capstan-demo check [PATH]`: GETs PATH (default `/healthz`) from the demo
/// on `$PORT` of this host and exits 0 on a 200: a health check command for
/// images without a shell or curl.
async fn check(port: u16, path: &str) -> i32 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let run = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200"))
    };
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Some(true)) => 0,
        _ => 1,
    }
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("check") {
        let path = args.get(1).map_or("/healthz", String::as_str);
        std::process::exit(check(port, path).await);
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
        | 1;
    let app = Arc::new(App {
        version: std::env::var("VERSION").unwrap_or_else(|_| "dev".into()),
        replica: std::env::var("CAPSTAN_REPLICA").unwrap_or_else(|_| "0".into()),
        service: std::env::var("CAPSTAN_SERVICE").unwrap_or_else(|_| "demo".into()),
        fail_rate: env_f64("FAIL_RATE").clamp(0.0, 1.0),
        fail_from: Instant::now() + Duration::from_millis(env_f64("FAIL_AFTER_MS").max(0.0) as u64),
        rng: AtomicU64::new(seed ^ u64::from(std::process::id())),
        requests: Mutex::default(),
        latency: Mutex::default(),
        held: Mutex::default(),
        log_requests: std::env::var("LOG_REQUESTS").ok().is_none_or(|v| v != "0"),
    });
    let delay = env_f64("STARTUP_DELAY_MS");
    if delay > 0.0 {
        log("info", "delaying startup", &[("ms", delay.into())]);
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    let crash = env_f64("CRASH_AFTER_MS");
    if crash > 0.0 {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(crash as u64)).await;
            log("error", "crashing as asked by CRASH_AFTER_MS", &[]);
            std::process::exit(3);
        });
    }
    let router = Router::new()
        .route("/", get(hello))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/work", get(work))
        .route("/alloc", get(alloc))
        .route("/sleep", get(sleep))
        .route("/fetch", get(fetch))
        .route("/headers", get(headers))
        .route("/echo", get(echo))
        .with_state(app.clone());
    // 127.0.0.1 unless told otherwise: a container sets HOST=0.0.0.0 so its
    // network reaches it.
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match tokio::net::TcpListener::bind((host.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            log(
                "error",
                "cannot listen",
                &[("port", port.into()), ("error", e.to_string().into())],
            );
            std::process::exit(1);
        }
    };
    log(
        "info",
        "listening",
        &[
            ("port", port.into()),
            ("version", app.version.clone().into()),
        ],
    );
    let served = if args.first().map(String::as_str) == Some("grpc") {
        grpc::serve(listener, app.replica.clone()).await
    } else {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(e) = served {
        log("error", "server failed", &[("error", e.to_string().into())]);
        std::process::exit(1);
    }
    log("info", "clean shutdown", &[]);
}
