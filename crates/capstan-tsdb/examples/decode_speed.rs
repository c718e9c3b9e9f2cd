//! Decoding speed of the chunk format: ns per sample for a few value shapes.
//! `cargo run --release -p capstan-tsdb --example decode_speed`
use capstan_tsdb::chunk::{Chunk, ChunkIter, decode_into};
use std::time::Instant;

type Shape = (&'static str, fn(i64) -> f64);

fn main() {
    let shapes: [Shape; 3] = [
        ("steady counter", |i| 1000.0 + i as f64 * 3.0),
        ("random counter", |i| (i * 37 + (i * i * 7919) % 29) as f64),
        ("gauge with decimals", |i| {
            40.0 + ((i * 7919) % 200) as f64 / 10.0
        }),
    ];
    for (name, f) in shapes {
        let mut c = Chunk::default();
        for i in 0..240 {
            c.append(1_700_000_000_000 + i * 15_000, f(i)).unwrap();
        }
        let bytes = c.bytes();
        let rounds = 20_000;
        let t = Instant::now();
        let mut sum = 0.0;
        for _ in 0..rounds {
            for (_, v) in ChunkIter::from_bytes(std::hint::black_box(&bytes)).unwrap() {
                sum += v;
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (rounds * 240) as f64;
        let t = Instant::now();
        let mut out = Vec::with_capacity(240);
        for _ in 0..rounds {
            out.clear();
            decode_into(std::hint::black_box(&bytes), i64::MIN, i64::MAX, &mut out);
            sum += out[239].1;
        }
        let ns_into = t.elapsed().as_nanos() as f64 / (rounds * 240) as f64;
        println!(
            "{name:>20}: iterator {ns:.2} ns/sample, decode_into {ns_into:.2} ns/sample ({} bytes/chunk) {sum}",
            bytes.len()
        );
    }
}
