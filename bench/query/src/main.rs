//! Query latency and memory of capstan beside Prometheus, on the same data.
//!
//! `bench/query.sh` starts both servers and runs this program:
//! `capstan-query-bench CAPSTAN_ADDR TOKEN_FILE PROMETHEUS_ADDR [ITERATIONS]`.
//!
//! It generates 10,000 series (counters, classic histogram buckets, gauges) over one
//! hour at 15 s, remote-writes the same samples to both servers, then times each
//! query through both HTTP APIs (instant at the last sample, and range over the hour
//! at a 15 s step), alternating servers, and prints the medians with their ratio.
//! Memory per query: the peak samples both engines report (`stats=all`), the bytes
//! Prometheus allocates (its `go_memstats_alloc_bytes_total`), and for capstan the
//! bytes allocated and the peak heap growth of its engine, measured in this process
//! on a store holding the same samples (a counting allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use capstan::api::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use capstan::scrape::encode;
use capstan_tsdb::Labels;
use prost::Message;
use serde_json::Value;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicU64 = AtomicU64::new(0);

fn grew(n: usize) {
    TOTAL.fetch_add(n as u64, Relaxed);
    let live = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(live, Relaxed);
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged and only updates counters besides; the contract of
// `GlobalAlloc` is the system allocator's. Measured reason: the heap a query
// needs is what this benchmark reports, and only an allocator sees it.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see above).
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged (see above).
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (see above).
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const STEP_MS: i64 = 15_000;
const STEPS: usize = 241; // one hour at 15 s, both ends included
/// Queries are evaluated 1 s after the sample grid, so that no window boundary
/// falls on a sample (where Prometheus 2 and 3 differ: closed vs left-open windows).
const EVAL_SHIFT_MS: i64 = 1_000;

const QUERIES: [(&str, &str); 5] = [
    (
        "sum by (job) of rate",
        "sum by (job) (rate(bench_http_requests_total[5m]))",
    ),
    (
        "histogram_quantile",
        "histogram_quantile(0.99, sum by (le) (rate(bench_request_duration_seconds_bucket[5m])))",
    ),
    ("topk", "topk(10, rate(bench_http_requests_total[5m]))"),
    (
        "regex selector",
        r#"bench_http_requests_total{instance=~"host-1.*", code=~"5.."}"#,
    ),
    (
        "subquery",
        "max_over_time(sum by (job) (rate(bench_http_requests_total[1m]))[30m:1m])",
    ),
];

/// A small deterministic generator (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Gen {
    labels: Vec<(String, String)>,
    values: Vec<f64>,
}

fn series(name: &str, pairs: &[(&str, String)], values: Vec<f64>) -> Gen {
    let mut labels = vec![("__name__".to_owned(), name.to_owned())];
    labels.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.clone())));
    labels.sort();
    Gen { labels, values }
}

/// 10,000 series: 5,000 request counters, 4,800 histogram buckets, 200 gauges.
fn generate() -> Vec<Gen> {
    let mut rng = Rng(42);
    let mut out = Vec::with_capacity(10_000);
    let combos = [
        ("GET", "200"),
        ("GET", "404"),
        ("GET", "500"),
        ("POST", "200"),
        ("POST", "503"),
    ];
    for i in 0..1000 {
        for (method, code) in combos {
            // Counters far from zero: Prometheus 2.42 limits extrapolation towards
            // zero differently from Prometheus 3 (prometheus#13725).
            let mut v = (1_000_000 + rng.below(1000)) as f64;
            let rate = 1 + rng.below(20);
            let values = (0..STEPS)
                .map(|_| {
                    v += (rng.below(rate * 15 * 2)) as f64;
                    v
                })
                .collect();
            out.push(series(
                "bench_http_requests_total",
                &[
                    ("job", format!("job-{}", i / 100)),
                    ("instance", format!("host-{i}:9100")),
                    ("method", method.into()),
                    ("code", code.into()),
                ],
                values,
            ));
        }
    }
    let les = [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
    ];
    let cdf: [f64; 12] = [
        0.01, 0.03, 0.08, 0.2, 0.45, 0.7, 0.85, 0.93, 0.97, 0.99, 0.997, 1.0,
    ];
    for i in 0..400 {
        let mut counts = cdf.map(|c| (100_000.0 * c).round());
        let mut per_le: Vec<Vec<f64>> = vec![Vec::new(); 12];
        for _ in 0..STEPS {
            let n = (10 + rng.below(40)) as f64;
            for (b, c) in counts.iter_mut().enumerate() {
                *c += (n * cdf[b]).round();
                per_le[b].push(*c);
            }
        }
        for (b, values) in per_le.into_iter().enumerate() {
            out.push(series(
                "bench_request_duration_seconds_bucket",
                &[
                    ("job", format!("job-{}", i / 40)),
                    ("instance", format!("host-{i}:9100")),
                    ("le", les[b].into()),
                ],
                values,
            ));
        }
    }
    for i in 0..200 {
        let mut v = 40.0 + rng.below(200) as f64 / 10.0;
        let values = (0..STEPS)
            .map(|_| {
                v += (rng.below(21) as f64 - 10.0) / 10.0;
                v
            })
            .collect();
        out.push(series(
            "bench_temperature_celsius",
            &[
                ("job", format!("job-{}", i / 20)),
                ("instance", format!("host-{}:9100", i / 4)),
                ("sensor", format!("s{}", i % 4)),
            ],
            values,
        ));
    }
    out
}

/// One HTTP/1.0 exchange: status and body.
fn http(addr: &str, method: &str, path: &str, headers: &[String], body: &[u8]) -> (u16, Vec<u8>) {
    let mut c = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let code = std::str::from_utf8(out.get(9..12).unwrap_or(b"0"))
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    (code, out[at..].to_vec())
}

struct Server {
    name: &'static str,
    addr: String,
    auth: Vec<String>,
}

impl Server {
    fn get_json(&self, path: &str) -> Value {
        let (code, body) = http(&self.addr, "GET", path, &self.auth, b"");
        assert_eq!(
            code,
            200,
            "{} {path}: {}",
            self.name,
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).unwrap()
    }

    fn write(&self, req: &WriteRequest) {
        let body = snap::raw::Encoder::new()
            .compress_vec(&req.encode_to_vec())
            .unwrap();
        let mut h = self.auth.clone();
        h.push("Content-Encoding: snappy".into());
        h.push("Content-Type: application/x-protobuf".into());
        h.push("X-Prometheus-Remote-Write-Version: 0.1.0".into());
        let (code, resp) = http(&self.addr, "POST", "/api/v1/write", &h, &body);
        assert!(
            code == 204 || code == 200,
            "{} remote write: {code} {}",
            self.name,
            String::from_utf8_lossy(&resp)
        );
    }
}

#[derive(Clone, Copy)]
enum Mode {
    Instant,
    Range,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Instant => "instant",
            Mode::Range => "range 1h / 15s",
        }
    }

    /// Runs `q` on capstan's engine in this process: instant at `end`, or over
    /// `[start, end]` at the sample step (both shifted off the sample grid).
    fn run(
        self,
        engine: &capstan_promql::Engine,
        db: &capstan_tsdb::Db,
        q: &str,
        start: i64,
        end: i64,
    ) -> capstan_promql::QueryOutput {
        match self {
            Mode::Instant => engine.instant(db, q, end + EVAL_SHIFT_MS),
            Mode::Range => engine.range(db, q, start + EVAL_SHIFT_MS, end + EVAL_SHIFT_MS, STEP_MS),
        }
        .unwrap()
    }
}

fn query_path(q: &str, mode: Mode, start: i64, end: i64, stats: bool) -> String {
    let stats = if stats { "&stats=all" } else { "" };
    match mode {
        Mode::Instant => format!(
            "/api/v1/query?query={}&time={:.3}{stats}",
            encode(q),
            end as f64 / 1e3
        ),
        Mode::Range => format!(
            "/api/v1/query_range?query={}&start={:.3}&end={:.3}&step=15{stats}",
            encode(q),
            start as f64 / 1e3,
            end as f64 / 1e3
        ),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn go_alloc_bytes(s: &Server) -> f64 {
    let (_, body) = http(&s.addr, "GET", "/metrics", &[], b"");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("go_memstats_alloc_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// A digest of a result to check both servers answered the same: series count
/// and the sum of every value.
fn digest(v: &Value) -> (usize, f64) {
    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
    let mut sum = 0.0;
    for s in &result {
        let points: Vec<&Value> = match s.get("values") {
            Some(vs) => vs.as_array().unwrap().iter().collect(),
            None => vec![&s["value"]],
        };
        for p in points {
            let x: f64 = p[1].as_str().unwrap().parse().unwrap();
            if x.is_finite() {
                sum += x;
            }
        }
    }
    (result.len(), sum)
}

fn mib(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// A capstan-tsdb store in a temporary directory holding the generated samples.
fn local_db(data: &[Gen], start: i64) -> (tempfile::TempDir, capstan_tsdb::Db) {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = capstan_tsdb::Db::open(capstan_tsdb::Options::new(dir.path())).unwrap();
    for steps in (0..STEPS).collect::<Vec<_>>().chunks(40) {
        for group in data.chunks(500) {
            let mut a = db.appender();
            for g in group {
                let labels = Labels::new(g.labels.clone());
                for &i in steps {
                    a.add(labels.clone(), start + i as i64 * STEP_MS, g.values[i]);
                }
            }
            a.commit().unwrap();
        }
    }
    (dir, db)
}

/// `--local [ITERATIONS]`: the engine alone on an in-process store, for profiling;
/// `ONLY=text` runs the queries whose name and kind contain it.
fn local(iters: usize) {
    let end = 1_800_000_007_000;
    let start = end - (STEPS as i64 - 1) * STEP_MS;
    let data = generate();
    let (_dir, db) = local_db(&data, start);
    drop(data);
    let engine = capstan_promql::Engine::new(capstan_promql::EngineOptions::default());
    let only = std::env::var("ONLY").unwrap_or_default();
    for (name, q) in QUERIES {
        for mode in [Mode::Instant, Mode::Range] {
            let kind = mode.name();
            if !format!("{name} {kind}").contains(&only) {
                continue;
            }
            let mut ms = Vec::new();
            for _ in 0..iters {
                let t = Instant::now();
                let out = mode.run(&engine, &db, q, start, end);
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                drop(out);
            }
            let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "{name:>22} {kind:>8}: median {:8.2} ms, min {min:8.2} ms",
                median(ms)
            );
        }
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--local") {
        local(std::env::args().nth(2).map_or(10, |s| s.parse().unwrap()));
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!(
            "usage: capstan-query-bench CAPSTAN_ADDR TOKEN_FILE PROMETHEUS_ADDR [ITERATIONS]"
        );
        std::process::exit(2);
    }
    let token = std::fs::read_to_string(&args[2]).expect("token file");
    let capstan = Server {
        name: "capstan",
        addr: args[1].clone(),
        auth: vec![format!("Authorization: Bearer {}", token.trim())],
    };
    let prom = Server {
        name: "Prometheus",
        addr: args[3].clone(),
        auth: vec![],
    };
    let iters: usize = args.get(4).map_or(15, |s| s.parse().unwrap());

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Samples 7 s off the minute grid, so that no subquery step's window
    // boundary falls on a sample either.
    let end = now / STEP_MS * STEP_MS - STEP_MS + 7_000;
    let start = end - (STEPS as i64 - 1) * STEP_MS;
    let data = generate();
    let samples = data.len() * STEPS;
    eprintln!(
        "{} series × {STEPS} samples = {samples} samples, {} to {}",
        data.len(),
        start,
        end
    );

    // The same samples to both servers: ten minutes of every series per request
    // group, 500 series per request, in time order.
    let t0 = Instant::now();
    for steps in (0..STEPS).collect::<Vec<_>>().chunks(40) {
        for group in data.chunks(500) {
            let req = WriteRequest {
                timeseries: group
                    .iter()
                    .map(|g| TimeSeries {
                        labels: g
                            .labels
                            .iter()
                            .map(|(k, v)| Label {
                                name: k.clone(),
                                value: v.clone(),
                            })
                            .collect(),
                        samples: steps
                            .iter()
                            .map(|&i| Sample {
                                value: g.values[i],
                                timestamp: start + i as i64 * STEP_MS,
                            })
                            .collect(),
                        histograms: vec![],
                    })
                    .collect(),
            };
            capstan.write(&req);
            prom.write(&req);
        }
    }
    eprintln!("written to both in {:.1?}", t0.elapsed());

    // The same samples into a store in this process, for the engine's own figures.
    let (_dir, db) = local_db(&data, start);
    drop(data);
    let engine = capstan_promql::Engine::new(capstan_promql::EngineOptions::default());

    // Both have every series before timing starts.
    let count_q = query_path(
        r#"count({__name__=~"bench_.*"})"#,
        Mode::Instant,
        start,
        end,
        false,
    );
    for s in [&capstan, &prom] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = s.get_json(&count_q);
            let n = v["data"]["result"][0]["value"][1]
                .as_str()
                .unwrap_or("0")
                .to_owned();
            if n == "10000" {
                break;
            }
            assert!(Instant::now() < deadline, "{}: {n} series", s.name);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    println!(
        "| query | kind | capstan (median) | Prometheus (median) | capstan ÷ Prometheus | capstan engine alone | peak samples capstan / Prometheus | capstan heap peak / allocated | Prometheus allocated |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    let only = std::env::var("ONLY").unwrap_or_default();
    for (name, q) in QUERIES {
        for mode in [Mode::Instant, Mode::Range] {
            let kind = mode.name();
            if !format!("{name} {kind}").contains(&only) {
                continue;
            }
            let path = query_path(q, mode, start + EVAL_SHIFT_MS, end + EVAL_SHIFT_MS, false);
            // Same answer from both (series count and sum of values).
            let a = digest(&capstan.get_json(&path));
            let b = digest(&prom.get_json(&path));
            let close = a.0 == b.0 && (a.1 - b.1).abs() <= 1e-6 * a.1.abs().max(b.1.abs());
            if !close {
                eprintln!(
                    "{name} {kind}: the answers differ: capstan {a:?}, Prometheus {b:?} (series, sum of values)"
                );
                std::process::exit(1);
            }
            // Warm up, then alternate.
            for s in [&capstan, &prom] {
                for _ in 0..2 {
                    s.get_json(&path);
                }
            }
            let (mut tc, mut tp) = (Vec::new(), Vec::new());
            for _ in 0..iters {
                for (s, out) in [(&capstan, &mut tc), (&prom, &mut tp)] {
                    let t = Instant::now();
                    let (code, _) = http(&s.addr, "GET", &path, &s.auth, b"");
                    out.push(t.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(code, 200);
                }
            }
            let (mc, mp) = (median(tc), median(tp));
            worst = worst.max(mc / mp);

            // Memory: peak samples from both engines' statistics.
            let spath = query_path(q, mode, start + EVAL_SHIFT_MS, end + EVAL_SHIFT_MS, true);
            let peak = |s: &Server| {
                s.get_json(&spath)["data"]["stats"]["samples"]["peakSamples"]
                    .as_u64()
                    .unwrap_or(0)
            };
            let (pc, pp) = (peak(&capstan), peak(&prom));
            // Prometheus: bytes its Go runtime allocated per query.
            let before = go_alloc_bytes(&prom);
            for _ in 0..5 {
                prom.get_json(&path);
            }
            let prom_alloc = (go_alloc_bytes(&prom) - before) / 5.0;
            // capstan: the engine in this process over the same samples.
            let mut engine_ms = Vec::new();
            let (mut heap_peak, mut allocated) = (0usize, 0u64);
            for _ in 0..5 {
                let live = LIVE.load(Relaxed);
                PEAK.store(live, Relaxed);
                let total = TOTAL.load(Relaxed);
                let t = Instant::now();
                let out = mode.run(&engine, &db, q, start, end);
                engine_ms.push(t.elapsed().as_secs_f64() * 1e3);
                heap_peak = PEAK.load(Relaxed) - live;
                allocated = TOTAL.load(Relaxed) - total;
                drop(out);
            }
            println!(
                "| {name} | {kind} | {mc:.2} ms | {mp:.2} ms | **{:.2}×** | {:.2} ms | {pc} / {pp} | {} / {} | {} |",
                mc / mp,
                median(engine_ms),
                mib(heap_peak as f64),
                mib(allocated as f64),
                mib(prom_alloc),
            );
        }
    }
    println!();
    println!(
        "worst ratio {worst:.2} (target ≤ 0.5); {iters} timed runs per server, query and kind; {samples} samples in 10,000 series"
    );
}
