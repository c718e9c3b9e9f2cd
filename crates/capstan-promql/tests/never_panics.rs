//! Random expressions, built from PromQL's own tokens, evaluated as instant and
//! range queries: the engine answers or errs, and never panics. (`fuzz/` has the
//! coverage-guided version of this, on arbitrary text.)

use capstan_promql::{Engine, EngineOptions, MemPoint, MemStorage};
use capstan_tsdb::Labels;
use proptest::prelude::*;

const TOKENS: &[&str] = &[
    "a",
    "b_total",
    "h_bucket",
    "{job=\"j\"}",
    "{le=~\"0.*\"}",
    "[1m]",
    "[5m:15s]",
    "[30s:]",
    "(",
    ")",
    "(",
    ")",
    ",",
    "+",
    "-",
    "*",
    "/",
    "%",
    "^",
    "atan2",
    "==",
    "!=",
    ">",
    "<",
    ">=",
    "<=",
    "bool",
    "and",
    "or",
    "unless",
    "on(job)",
    "ignoring(le)",
    "group_left",
    "group_right(le)",
    "by (le)",
    "without (job)",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "topk(2,",
    "bottomk(-1,",
    "quantile(0.5,",
    "count_values(\"v\",",
    "limitk(1,",
    "limit_ratio(0.5,",
    "rate(",
    "irate(",
    "increase(",
    "delta(",
    "deriv(",
    "predict_linear(",
    "histogram_quantile(0.9,",
    "label_replace(",
    "label_join(",
    "\"x\"",
    "\"(.*)\"",
    "\"$1\"",
    "abs(",
    "clamp(",
    "round(",
    "time()",
    "vector(",
    "scalar(",
    "absent(",
    "sort(",
    "sort_by_label(",
    "quantile_over_time(",
    "holt_winters(",
    "changes(",
    "timestamp(",
    "offset 1m",
    "offset -30s",
    "@ 100",
    "@ start()",
    "@ end()",
    "1",
    "0",
    "-1",
    "NaN",
    "Inf",
    "1e308",
    "0.5",
    "2",
];

fn store() -> MemStorage {
    let mut s = MemStorage::new();
    for (i, name) in ["a", "b_total", "h_bucket"].iter().enumerate() {
        for le in ["0.1", "1", "+Inf"] {
            let l = Labels::from_pairs([("__name__", *name), ("le", le), ("job", "j")]);
            for k in 0..20i64 {
                let v = match k {
                    7 => f64::NAN,
                    9 => f64::from_bits(capstan_tsdb::STALE_NAN_BITS),
                    _ => (k * (i as i64 + 1)) as f64,
                };
                s.add(&l, k * 15_000, MemPoint::Float(v));
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
    #[test]
    fn random_expressions_never_panic(picks in proptest::collection::vec(0..TOKENS.len(), 1..14)) {
        let q: Vec<&str> = picks.iter().map(|&i| TOKENS[i]).collect();
        let q = q.join(" ");
        let engine = Engine::new(EngineOptions { max_samples: 100_000, ..EngineOptions::default() });
        let st = store();
        let _ = engine.instant(&st, &q, 200_000);
        let _ = engine.range(&st, &q, 0, 300_000, 15_000);
    }
}

#[test]
fn limits_give_clear_errors() {
    let st = store();
    let small = Engine::new(EngineOptions {
        max_samples: 10,
        ..EngineOptions::default()
    });
    let e = small.range(&st, "a", 0, 300_000, 15_000).unwrap_err();
    assert_eq!(e.error_type(), "execution");
    assert!(e.to_string().contains("too many samples"), "{e}");
    let slow = Engine::new(EngineOptions {
        timeout: std::time::Duration::ZERO,
        ..EngineOptions::default()
    });
    let e = slow.instant(&st, "sum(rate(a[5m]))", 100_000).unwrap_err();
    assert_eq!(e.error_type(), "timeout");
    let e = Engine::default().instant(&st, "sum(", 0).unwrap_err();
    assert_eq!(e.error_type(), "bad_data");
    let e = Engine::default()
        .instant(&st, "nosuchfn(a)", 0)
        .unwrap_err();
    assert!(e.to_string().contains("nosuchfn"), "{e}");
}
