//! The evaluator answers the same over capstan-tsdb as over the in-memory store:
//! random series (gaps, stale markers, resets), part of them cut into a block,
//! queried at random times. This covers what only the tsdb store does (its
//! last-sample shortcut for instant selectors, head and block chunks).

use capstan_promql::{Engine, EngineOptions, MemPoint, MemStorage, QueryValue};
use capstan_tsdb::{Db, Labels, Options, STALE_NAN_BITS};
use proptest::prelude::*;

fn labels(i: usize) -> Labels {
    Labels::new(vec![
        ("__name__".into(), "x".into()),
        ("i".into(), i.to_string()),
    ])
}

/// Series as (time offset in 15 s steps, value kind) lists.
fn series() -> impl Strategy<Value = Vec<Vec<(u8, u8)>>> {
    prop::collection::vec(prop::collection::vec((1u8..6, 0u8..10), 0..60), 1..6)
}

fn render(v: &QueryValue) -> String {
    format!("{v:?}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn tsdb_and_memory_stores_agree(data in series(), cut in 0i64..80, times in prop::collection::vec(0i64..100, 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = Db::open(Options::new(dir.path())).unwrap();
        let mut mem = MemStorage::new();
        let base = 1_700_000_000_000i64;
        let mut a = db.appender();
        for (i, pts) in data.iter().enumerate() {
            let mut t = base;
            let mut v = 0.0;
            for &(gap, kind) in pts {
                t += i64::from(gap) * 15_000;
                v = match kind {
                    0 => f64::from_bits(STALE_NAN_BITS),
                    1 => 0.0, // a counter reset
                    _ => (if v.is_nan() { 0.0 } else { v }) + f64::from(kind),
                };
                a.add(labels(i), t, v);
                mem.add(&labels(i), t, MemPoint::Float(v));
            }
        }
        a.commit().unwrap();
        // Some of the samples move to a block.
        db.cut_before(base + cut * 15_000).unwrap();
        let engine = Engine::new(EngineOptions::default());
        for q in ["x", "x offset 1m", "rate(x[2m])", "last_over_time(x[10m])", "timestamp(x)"] {
            for &k in &times {
                let t = base + k * 15_000 + 7_000;
                let a = engine.instant(&db, q, t).map(|o| render(&o.value));
                let b = engine.instant(&mem, q, t).map(|o| render(&o.value));
                prop_assert_eq!(a.clone().ok(), b.clone().ok(), "{} at {}: {:?} vs {:?}", q, t, a, b);
            }
            let r = engine.range(&db, q, base, base + 100 * 15_000, 30_000).map(|o| render(&o.value));
            let m = engine.range(&mem, q, base, base + 100 * 15_000, 30_000).map(|o| render(&o.value));
            prop_assert_eq!(r.ok(), m.ok(), "{} range", q);
        }
    }
}
