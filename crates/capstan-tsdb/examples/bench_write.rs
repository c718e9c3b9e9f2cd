//! Append throughput and memory per series, on the workload of
//! `promtool tsdb bench write` (same label file, same values: each series starts
//! at 123456789 and grows by 1000 a scrape, scrapes 30s apart, batches of 1000
//! series per commit). `cargo run --release -p capstan-tsdb --example bench_write --
//! SERIES_JSON [METRICS] [SCRAPES]`.

use std::time::Instant;

use capstan_tsdb::{Db, Fsync, Labels, Options};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = args
        .get(1)
        .expect("usage: bench_write SERIES_JSON [METRICS] [SCRAPES]");
    let metrics: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let scrapes: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3000);
    let text = std::fs::read_to_string(file).unwrap();
    let series: Vec<Labels> = text
        .lines()
        .take(metrics)
        .map(|l| {
            let m: std::collections::BTreeMap<String, String> = serde_json::from_str(l).unwrap();
            Labels::new(m.into_iter().collect())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = Options::new(dir.path());
    opts.fsync = Fsync::Every(std::time::Duration::from_secs(1));
    let (db, _) = Db::open(opts).unwrap();
    let rss_before = rss_kib();
    let start = Instant::now();
    let mut values = vec![123_456_789i64; series.len()];
    let mut t = 1_700_000_000_000i64;
    let mut total = 0usize;
    // Like Prometheus' scrape loop: labels on the first append, references after.
    let mut refs = vec![None; series.len()];
    for _ in 0..scrapes {
        t += 30_000;
        for (shard, labels) in series.chunks(1000).enumerate() {
            let mut a = db.appender();
            for (i, l) in labels.iter().enumerate() {
                let k = shard * 1000 + i;
                values[k] += 1000;
                match refs[k] {
                    Some(r) => a.add_ref(r, t, values[k] as f64),
                    None => a.add(l.clone(), t, values[k] as f64),
                }
            }
            total += a.commit().unwrap().appended;
            for (i, l) in labels.iter().enumerate() {
                if refs[shard * 1000 + i].is_none() {
                    refs[shard * 1000 + i] = db.series_ref(l);
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rss = rss_kib().saturating_sub(rss_before);
    println!(
        "{total} samples ({} series × {scrapes} scrapes) in {secs:.2}s: {:.0} samples/s; memory growth {rss} KiB = {:.0} bytes per series ({:.2} bytes per sample); WAL {} bytes",
        series.len(),
        total as f64 / secs,
        rss as f64 * 1024.0 / series.len() as f64,
        rss as f64 * 1024.0 / total as f64,
        db.wal_size()
    );
    // Restart: how long until the store is ready again, replaying the WAL.
    let wal = db.wal_size();
    drop(db);
    let start = Instant::now();
    let mut opts = Options::new(dir.path());
    opts.fsync = Fsync::Never;
    let (db, replay) = Db::open(opts).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "replay: {} records, {} series, {total} samples in {secs:.2}s: {:.0} samples/s, {:.0} MB/s of WAL",
        replay.records,
        db.series_count(),
        total as f64 / secs,
        wal as f64 / secs / 1e6
    );
}
