//! Bytes per sample of the chunk codec on recorded scrapes.
//! `cargo run --release -p capstan-tsdb --example chunk_size -- DIR [INTERVAL_MS]`
//! DIR holds scrape bodies (text format) in name order, one file per scrape;
//! samples get regular timestamps INTERVAL_MS apart (default 15000), as a scraper
//! that stamps scheduled times does. Prints bytes per sample for capstan's codec
//! and for plain Gorilla coding (delta-of-delta timestamps, XOR values) written
//! here as the reference.

use std::collections::BTreeMap;

use capstan_expfmt::{Entry, Format, Parser};
use capstan_tsdb::chunk::{Chunk, MAX_SAMPLES};

/// Gorilla as published: dod timestamps in 1/7/9/12/32-bit buckets, XOR values with
/// the leading/trailing-zero window reuse. For comparison only.
fn gorilla_bits(samples: &[(i64, f64)]) -> usize {
    let mut bits = 64 + 64;
    let (mut pt, mut pd, mut pv) = (samples[0].0, 0i64, samples[0].1.to_bits());
    let (mut lead, mut trail) = (u32::MAX, 0u32);
    for &(t, v) in &samples[1..] {
        let d = t - pt;
        let dod = d - pd;
        bits += match dod {
            0 => 1,
            -63..=64 => 9,
            -255..=256 => 12,
            -2047..=2048 => 16,
            _ => 36,
        };
        pt = t;
        pd = d;
        let x = v.to_bits() ^ pv;
        pv = v.to_bits();
        if x == 0 {
            bits += 1;
            continue;
        }
        let (l, tz) = (x.leading_zeros().min(31), x.trailing_zeros());
        if lead != u32::MAX && l >= lead && tz >= trail {
            bits += 2 + (64 - lead - trail) as usize;
        } else {
            lead = l;
            trail = tz;
            bits += 2 + 5 + 6 + (64 - l - tz) as usize;
        }
    }
    bits
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).expect("usage: chunk_size DIR [INTERVAL_MS]");
    let interval: i64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(15_000);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("a directory")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut series: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap();
        let t = 1_700_000_000_000 + i as i64 * interval;
        for e in Parser::new(&text, Format::Text) {
            if let Ok(Entry::Sample(s)) = e {
                series
                    .entry(format!("{}{{{}}}", s.name, s.labels.raw()))
                    .or_default()
                    .push((t, s.value));
            }
        }
    }
    let (mut ours, mut gorilla, mut n) = (0usize, 0usize, 0usize);
    let mut costly: Vec<(usize, &String)> = Vec::new();
    for (name, samples) in &series {
        let mut c = Chunk::default();
        for &(t, v) in samples.iter().take(MAX_SAMPLES as usize) {
            c.append(t, v).unwrap();
        }
        costly.push((c.size(), name));
    }
    costly.sort_by(|a, b| b.cmp(a));
    if std::env::var("BY_NAME").is_ok() {
        let mut by: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (size, name) in &costly {
            let e = by.entry(name.split('{').next().unwrap_or("")).or_default();
            e.0 += size;
            e.1 += 1;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by_key(|x| std::cmp::Reverse(x.1.0));
        let total: usize = costly.iter().map(|c| c.0).sum();
        for (name, (bytes, n)) in v.iter().take(15) {
            println!(
                "{:5.1}%  {bytes:7} bytes  {n:4} series  {name}",
                100.0 * *bytes as f64 / total as f64
            );
        }
    }
    if std::env::var("TOP").is_ok() {
        for (size, name) in costly.iter().take(15) {
            let vals: Vec<f64> = series[*name].iter().take(4).map(|s| s.1).collect();
            println!("{size:6} bytes  {name}  {vals:?}");
        }
    }
    for samples in series.values() {
        for part in samples.chunks(MAX_SAMPLES as usize) {
            let mut c = Chunk::default();
            for &(t, v) in part {
                c.append(t, v).unwrap();
            }
            ours += c.size();
            gorilla += gorilla_bits(part).div_ceil(8) + 2;
            n += part.len();
        }
    }
    println!(
        "{} scrapes, {} series, {n} samples: capstan {:.3} B/sample, Gorilla {:.3} B/sample ({:.0}% of Gorilla)",
        files.len(),
        series.len(),
        ours as f64 / n as f64,
        gorilla as f64 / n as f64,
        100.0 * ours as f64 / gorilla as f64
    );
}
