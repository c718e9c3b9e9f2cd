//! Ingest, compression and query figures on a generated corpus of access-log and
//! JSON lines: `cargo run --release -p capstan-logstore --example bench -- [MB] [DIR]`.
//!
//! The corpus: every request leaves an nginx-style access line in a `web`
//! replica's stream and a JSON line in an `api` replica's stream (8 streams),
//! sharing its request id, trace id, client IP (from 300) and user (from
//! 5000); paths, statuses, sizes, agents and latencies vary; ids are random hex,
//! the incompressible part. Fixed-seed generator.
//!
//! `IDS=0`: the same lines without request and trace ids (nginx's default
//! `combined` format plus `rt=`, and a JSON line without ids), and one rare
//! error line in the middle to search for. `LEVEL=n`: zstd level of compaction.
//! `FLUSH=n`: batches between flushes (default 10).

use std::time::Instant;

use capstan_logstore::{Direction, Entry, Labels, Options, Query, Store};

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

const PATHS: [&str; 8] = [
    "/api/v1/users",
    "/api/v1/orders",
    "/api/v1/items",
    "/healthz",
    "/static/app.js",
    "/api/v1/cart",
    "/login",
    "/api/v1/search",
];
const AGENTS: [&str; 4] = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    "curl/8.5.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "python-requests/2.32.3",
];

struct Request {
    ip: String,
    user: u64,
    req: String,
    trace: String,
    path: &'static str,
    status: u32,
    ms: f64,
}

fn request(r: &mut Rng) -> Request {
    let ipn = r.below(300);
    Request {
        ip: format!("10.{}.{}.{}", ipn % 4, (ipn * 37) % 256, (ipn * 101) % 256),
        user: r.below(5000),
        req: format!("{:016x}", r.next()),
        trace: format!("{:016x}{:016x}", r.next(), r.next()),
        path: PATHS[r.below(8) as usize],
        status: [200, 200, 200, 200, 201, 204, 304, 404, 500][r.below(9) as usize],
        ms: r.below(900) as f64 / 10.0,
    }
}

fn access_line(r: &mut Rng, q: &Request, ts_ns: i64, ids: bool) -> String {
    let mut l = format!(
        "{} - u{} [24/Nov/2026:00:{:02}:{:02} +0000] \"GET {}?page={} HTTP/1.1\" {} {} \"-\" \"{}\" rt={:.3}",
        q.ip,
        q.user,
        (ts_ns / 60_000_000_000) % 60,
        (ts_ns / 1_000_000_000) % 60,
        q.path,
        r.below(50),
        q.status,
        r.below(20000),
        AGENTS[(q.user % 4) as usize],
        q.ms / 1000.0,
    );
    if ids {
        l.push_str(" req_id=");
        l.push_str(&q.req);
    }
    l
}

fn json_line(r: &mut Rng, q: &Request, ts_ns: i64, ids: bool) -> String {
    let mut l = format!(
        r#"{{"ts":"2026-11-24T00:{:02}:{:02}.{:03}Z","level":"{}","msg":"request handled","method":"GET","path":"{}","status":{},"duration_ms":{:.1},"user_id":"u{}""#,
        (ts_ns / 60_000_000_000) % 60,
        (ts_ns / 1_000_000_000) % 60,
        (ts_ns / 1_000_000) % 1000,
        if q.status >= 500 {
            "error"
        } else if r.below(20) == 0 {
            "warn"
        } else {
            "info"
        },
        q.path,
        q.status,
        q.ms,
        q.user,
    );
    if ids {
        l.push_str(&format!(
            r#","request_id":"{}","trace_id":"{}""#,
            q.req, q.trace
        ));
    }
    l.push('}');
    l
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let tmp;
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_owned()
        }
    };
    // Generate first, so ingest is timed alone.
    let mut r = Rng(0x2545_F491_4F6C_DD1D);
    let streams: Vec<Labels> = (0..8)
        .map(|i| {
            Labels::from_pairs([
                ("service", ["web", "api"][i % 2]),
                ("replica", &(i / 2).to_string()),
                ("stream", "stdout"),
            ])
        })
        .collect();
    let mut batches: Vec<(usize, Vec<Entry>)> = Vec::new();
    let (mut bytes, mut lines) = (0usize, 0u64);
    let t0 = 1_795_000_000_000_000_000i64;
    let mut rare = String::new();
    let mut n = 0u64;
    let ids = std::env::var("IDS").map_or(true, |v| v != "0");
    while bytes < mb << 20 {
        let replica = r.below(4) as usize;
        let (mut web, mut api) = (Vec::with_capacity(500), Vec::with_capacity(500));
        for _ in 0..500 {
            let ts = t0 + n as i64 * 200_000; // 5k requests a second
            let q = request(&mut r);
            let mut api_line = json_line(&mut r, &q, ts + 150_000, ids);
            if rare.is_empty() && bytes > (mb << 20) / 2 {
                if ids {
                    rare = q.req.clone();
                } else {
                    rare = "payment provider timed out after 30s".into();
                    api_line = format!(
                        r#"{{"level":"error","msg":"{rare}","provider":"acme","user_id":"u{}"}}"#,
                        q.user
                    );
                }
            }
            for (v, l) in [
                (&mut web, access_line(&mut r, &q, ts, ids)),
                (&mut api, api_line),
            ] {
                bytes += l.len();
                lines += 1;
                v.push(Entry {
                    ts_ns: ts,
                    line: l,
                    ..Entry::default()
                });
            }
            n += 1;
        }
        batches.push((replica * 2, web));
        batches.push((replica * 2 + 1, api));
    }
    // CORPUS=path writes the lines out too (one per line, stream by stream), to
    // compare with the zstd command on the whole file.
    if let Ok(p) = std::env::var("CORPUS") {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
        for (_, b) in &batches {
            for e in b {
                writeln!(f, "{}", e.line).unwrap();
            }
        }
    }
    let mut o = Options::new(&dir);
    if let Some(l) = std::env::var("LEVEL").ok().and_then(|l| l.parse().ok()) {
        o.level_sealed = l;
    }
    let (store, _) = Store::open(o).unwrap();
    // FLUSH=n: batches between flushes (10: small blocks that compaction
    // merges; 1000: busy streams that fill their blocks between flushes).
    let flush_every: usize = std::env::var("FLUSH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1);
    let start = Instant::now();
    for (i, (s, batch)) in batches.into_iter().enumerate() {
        store.append(&streams[s], batch).unwrap();
        if i % flush_every == flush_every - 1 {
            store.flush().unwrap();
        }
    }
    store.flush().unwrap();
    let ingest = start.elapsed().as_secs_f64();
    let raw_disk = store.disk_bytes();
    let start = Instant::now();
    store.rotate().unwrap();
    store.maintain().unwrap();
    let compact = start.elapsed().as_secs_f64();
    let disk = store.disk_bytes();
    let mbf = bytes as f64 / (1 << 20) as f64;
    println!(
        "corpus: {mbf:.0} MiB, {lines} lines ({n} requests: an access line and a JSON line each{}), 8 streams",
        if ids { ", with ids" } else { ", no ids" }
    );
    println!(
        "ingest (append, flush every {} batches of 500 lines, one thread): {:.2} s = {:.0} MiB/s, {:.0}k lines/s",
        flush_every,
        ingest,
        mbf / ingest,
        lines as f64 / ingest / 1e3
    );
    println!(
        "on disk after ingest: {:.1} MiB ({:.1}x); after compaction ({compact:.2} s): {:.1} MiB ({:.1}x)",
        raw_disk as f64 / (1 << 20) as f64,
        bytes as f64 / raw_disk as f64,
        disk as f64 / (1 << 20) as f64,
        bytes as f64 / disk as f64
    );
    drop(store);
    // Reopened as idle: segments kept as written are recompressed.
    let mut idle = Options::new(&dir);
    idle.recompress_when_idle = Some(std::time::Duration::ZERO);
    if let Some(l) = std::env::var("LEVEL").ok().and_then(|l| l.parse().ok()) {
        idle.level_sealed = l;
    }
    let (store, _) = Store::open(idle).unwrap();
    let start = Instant::now();
    store.maintain().unwrap();
    let recompress = start.elapsed().as_secs_f64();
    let idle_disk = store.disk_bytes();
    println!(
        "after idle recompression ({recompress:.2} s): {:.1} MiB ({:.1}x)",
        idle_disk as f64 / (1 << 20) as f64,
        bytes as f64 / idle_disk as f64
    );
    drop(store);
    // Queries on a reopened store (page cache warm, as on a running daemon).
    let (store, _) = Store::open(Options::new(&dir)).unwrap();
    let needle = vec![rare.as_bytes().to_vec()];
    let q = Query {
        from_ns: i64::MIN,
        to_ns: i64::MAX,
        streams: &|_| true,
        contains: &needle,
        after_seq: 0,
        meta: &[],
    };
    // Three runs each: the first may still fault pages in.
    let timed = |q: &Query<'_>| -> (usize, Vec<String>) {
        let mut n = 0;
        let runs = (0..3)
            .map(|_| {
                let start = Instant::now();
                n = store.select(q, Direction::Backward, 100).unwrap().len();
                format!("{:.1}", start.elapsed().as_secs_f64() * 1e3)
            })
            .collect();
        (n, runs)
    };
    let (n, runs) = timed(&q);
    println!(
        "rare string {rare:?} over everything: {n} match(es) in {} ms",
        runs.join(" / ")
    );
    let q = Query {
        from_ns: i64::MIN,
        to_ns: i64::MAX,
        streams: &|l| l.get("service") == Some("api") && l.get("replica") == Some("1"),
        contains: &[],
        after_seq: 0,
        meta: &[],
    };
    let (n, runs) = timed(&q);
    println!(
        "label-only {{service=\"api\", replica=\"1\"}}, newest 100: {n} lines in {} ms",
        runs.join(" / ")
    );
}
