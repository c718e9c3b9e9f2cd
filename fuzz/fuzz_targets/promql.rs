//! Any text as a PromQL expression, evaluated as an instant and a range query over
//! a small store: the engine returns a value or an error, never panics. Inputs
//! starting with 0xff are read as token picks instead (PromQL's own tokens, with
//! the functions and syntax of newer Prometheus versions that the engine refuses),
//! so the fuzzer reaches deep expressions and every function quickly.
#![no_main]

use capstan_promql::{Engine, EngineOptions, MemPoint, MemStorage};
use capstan_tsdb::Labels;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn store() -> &'static MemStorage {
    static S: OnceLock<MemStorage> = OnceLock::new();
    S.get_or_init(|| {
        let mut s = MemStorage::new();
        for (i, name) in ["a", "b_total", "h_bucket"].iter().enumerate() {
            for le in ["0.1", "1", "+Inf"] {
                let l = Labels::from_pairs([("__name__", *name), ("le", le), ("job", "j")]);
                for k in 0..20i64 {
                    let v = if k == 7 { f64::NAN } else { (k * (i as i64 + 1)) as f64 };
                    s.add(&l, k * 15_000, MemPoint::Float(v));
                }
            }
        }
        s
    })
}

fuzz_target!(|data: &[u8]| {
    let q = match data.split_first() {
        Some((0xff, picks)) => capstan_promql::fuzzing::expression(picks),
        _ => match std::str::from_utf8(data) {
            Ok(q) => q.to_owned(),
            Err(_) => return,
        },
    };
    let q = q.as_str();
    let engine = Engine::new(EngineOptions {
        max_samples: 100_000,
        timeout: std::time::Duration::from_secs(2),
        ..EngineOptions::default()
    });
    let _ = engine.instant(store(), q, 200_000);
    let _ = engine.range(store(), q, 0, 300_000, 15_000);
});
