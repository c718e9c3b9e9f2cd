//! Bytes per sample on disk, for the side-by-side with Prometheus and
//! VictoriaMetrics (`bench/compare-prometheus.sh`). Reads recorded scrapes (text
//! format, one file per scrape, in name order), stamps them INTERVAL_MS apart, and:
//! writes `OUT/openmetrics.txt` (for `promtool tsdb create-blocks-from
//! openmetrics`) and `OUT/import.txt` (for VictoriaMetrics' Prometheus import);
//! ingests the same samples into capstan-tsdb in `OUT/capstan`, cuts them all into a
//! block and prints its bytes per sample.
//! `cargo run --release -p capstan-tsdb --example disk_size -- DIR OUT [INTERVAL_MS]`

use std::collections::BTreeMap;
use std::io::Write;

use capstan_expfmt::{Entry, Format, Parser};
use capstan_tsdb::{Db, Fsync, Labels, Options};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, out) = (args.get(1).expect("DIR"), args.get(2).expect("OUT"));
    let interval: i64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(15_000);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // name → labels text → samples
    let mut series: BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>> = BTreeMap::new();
    let mut parsed: BTreeMap<String, Labels> = BTreeMap::new();
    // The series end now (VictoriaMetrics drops samples outside its retention).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = (now - files.len() as i64 * interval).div_euclid(interval) * interval;
    for (i, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap();
        let t = base + i as i64 * interval;
        for e in Parser::new(&text, Format::Text) {
            let Ok(Entry::Sample(s)) = e else { continue };
            let key = s.labels.raw().to_owned();
            let full = format!("{}{{{key}}}", s.name);
            parsed.entry(full).or_insert_with(|| {
                let mut pairs: Vec<(String, String)> = s
                    .labels()
                    .filter_map(Result::ok)
                    .map(|(n, v)| (n.to_owned(), v.into_owned()))
                    .collect();
                pairs.push(("__name__".into(), s.name.to_owned()));
                pairs.push(("job".into(), "node".into()));
                pairs.push(("instance".into(), "host:9100".into()));
                Labels::new(pairs)
            });
            series
                .entry(s.name.to_owned())
                .or_default()
                .entry(key)
                .or_default()
                .push((t, s.value));
        }
    }
    std::fs::create_dir_all(out).unwrap();
    let mut om =
        std::io::BufWriter::new(std::fs::File::create(format!("{out}/openmetrics.txt")).unwrap());
    let mut vm =
        std::io::BufWriter::new(std::fs::File::create(format!("{out}/import.txt")).unwrap());
    let mut total = 0usize;
    for (name, by_labels) in &series {
        writeln!(om, "# TYPE {name} gauge").unwrap();
        for (labels, samples) in by_labels {
            let l = if labels.is_empty() {
                "job=\"node\",instance=\"host:9100\"".to_owned()
            } else {
                format!("{labels},job=\"node\",instance=\"host:9100\"")
            };
            for (t, v) in samples {
                let v = if v.is_nan() {
                    "NaN".to_owned()
                } else {
                    format!("{v}")
                };
                writeln!(om, "{name}{{{l}}} {v} {}.{:03}", t / 1000, t % 1000).unwrap();
                writeln!(vm, "{name}{{{l}}} {v} {t}").unwrap();
                total += 1;
            }
        }
    }
    writeln!(om, "# EOF").unwrap();
    drop((om, vm));

    let cap = format!("{out}/capstan");
    let _ = std::fs::remove_dir_all(&cap);
    let mut opts = Options::new(&cap);
    opts.fsync = Fsync::Never;
    let (db, _) = Db::open(opts).unwrap();
    let n_scrapes = files.len();
    for i in 0..n_scrapes {
        let t = base + i as i64 * interval;
        let mut a = db.appender();
        for (name, by_labels) in &series {
            for (labels, samples) in by_labels {
                if let Some((_, v)) = samples.iter().find(|(st, _)| *st == t) {
                    a.add(parsed[&format!("{name}{{{labels}}}")].clone(), t, *v);
                }
            }
        }
        a.commit().unwrap();
    }
    db.cut_before(i64::MAX).unwrap();
    let bytes: u64 = db.blocks().iter().map(|b| b.3).sum();
    let chunks: u64 = db
        .blocks()
        .iter()
        .map(|b| std::fs::metadata(b.0.join("chunks")).map_or(0, |m| m.len()))
        .sum();
    println!(
        "{} scrapes, {} series, {total} samples; capstan block: {bytes} bytes = {:.3} bytes/sample; chunks: {chunks} bytes = {:.3} bytes/sample",
        n_scrapes,
        parsed.len(),
        bytes as f64 / total as f64,
        chunks as f64 / total as f64
    );
}
