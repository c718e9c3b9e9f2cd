//! Random expressions, built from PromQL's own tokens, evaluated as instant and
//! range queries: the engine answers or errs, and never panics. (`fuzz/` has the
//! coverage-guided version of this, on arbitrary text.)

use capstan_promql::fuzzing::TOKENS;
use capstan_promql::{Engine, EngineOptions, MemPoint, MemStorage};
use capstan_tsdb::Labels;
use proptest::prelude::*;

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

/// Expressions at the nesting and operator limits evaluate (on a thread with the
/// stack the daemon gives its threads); one level more is refused with a message
/// before anything is parsed.
#[test]
fn deep_expressions_are_bounded() {
    use capstan_promql::limits::{MAX_NESTING, MAX_OPERATORS, STACK_BYTES};
    let at_limit = [
        format!(
            "{}{}{}",
            "sum(".repeat(MAX_NESTING - 1),
            vec!["a"; MAX_OPERATORS + 1].join(" + "),
            ")".repeat(MAX_NESTING - 1)
        ),
        format!(
            "{}{}{}",
            "max_over_time((".repeat(MAX_NESTING / 2),
            vec!["a"; MAX_OPERATORS + 1].join(" and "),
            ")[1m:])".repeat(MAX_NESTING / 2)
        ),
        format!("{}1", "-".repeat(MAX_OPERATORS)),
    ];
    let over = [
        format!(
            "{}1{}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        ),
        format!("{}a{}", "sum(".repeat(5000), ")".repeat(5000)),
        vec!["a"; MAX_OPERATORS + 2].join(" + "),
        vec!["a"; 100_000].join(" or "),
        format!("{}1", "-".repeat(100_000)),
    ];
    std::thread::Builder::new()
        .stack_size(STACK_BYTES)
        .spawn(move || {
            let engine = Engine::new(EngineOptions::default());
            let st = MemStorage::new();
            for q in &at_limit {
                engine.instant(&st, q, 0).unwrap();
                engine.range(&st, q, 0, 60_000, 15_000).unwrap();
                capstan_promql::parse(q).unwrap().prettify();
            }
            for q in &over {
                let e = engine.instant(&st, q, 0).unwrap_err().to_string();
                assert!(
                    e.contains("nests deeper than 128")
                        || e.contains("more than 1024 operators")
                        || e.contains("over the limit of 262144"),
                    "{e}"
                );
                assert_eq!(
                    capstan_promql::parse(q).unwrap_err().error_type(),
                    "bad_data"
                );
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Queries over many series, long subqueries and huge step counts are refused as
/// their samples are counted, before their memory is taken; a canceled query
/// stops.
#[test]
fn samples_and_memory_are_bounded_before_they_are_taken() {
    let mut st = MemStorage::new();
    for i in 0..2000 {
        let l = Labels::from_pairs([("__name__", "many"), ("i", &i.to_string())]);
        for k in 0..40i64 {
            st.add(&l, k * 15_000, MemPoint::Float(k as f64));
        }
    }
    let capped = Engine::new(EngineOptions {
        max_samples: 20_000,
        ..EngineOptions::default()
    });
    // 2000 series × 41 steps: refused while selecting.
    let e = capped.range(&st, "many", 0, 600_000, 15_000).unwrap_err();
    assert!(e.to_string().contains("series selection"), "{e}");
    let e = capped
        .range(&st, "rate(many[1m])", 0, 600_000, 15_000)
        .unwrap_err();
    assert!(e.to_string().contains("range evaluation"), "{e}");
    // 3·10¹⁵ inner steps: refused at once, whatever the timeout.
    let began = std::time::Instant::now();
    let e = Engine::default()
        .instant(&st, "count_over_time(many[100000y:1s])", 600_000)
        .unwrap_err();
    assert!(e.to_string().contains("subquery"), "{e}");
    assert!(began.elapsed() < std::time::Duration::from_secs(5));
    let e = Engine::default()
        .range(&st, "1", 0, i64::MAX / 2, 1)
        .unwrap_err();
    assert!(e.to_string().contains("too many samples"), "{e}");
    // The memory budget binds before the sample limit when it is the smaller.
    let budget = Engine::new(EngineOptions {
        max_memory_bytes: 100_000,
        ..EngineOptions::default()
    });
    let e = budget.range(&st, "many", 0, 600_000, 15_000).unwrap_err();
    assert!(e.to_string().contains("memory budget"), "{e}");
    assert_eq!(e.error_type(), "execution");
    // A canceled query stops at its next check.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let canceled = Engine::new(EngineOptions {
        cancel: Some(cancel),
        ..EngineOptions::default()
    });
    let e = canceled.instant(&st, "sum(many)", 600_000).unwrap_err();
    assert_eq!(e.error_type(), "canceled");
}

/// Evaluation that takes long over few samples (windows of millions of points
/// each) still stops at the timeout.
#[test]
fn the_timeout_stops_work_inside_a_series() {
    let st = MemStorage::new();
    let engine = Engine::new(EngineOptions {
        timeout: std::time::Duration::from_millis(200),
        ..EngineOptions::default()
    });
    let began = std::time::Instant::now();
    let e = engine
        .instant(
            &st,
            "max_over_time(max_over_time(vector(1)[40m:1ms])[40m:1ms])",
            3_600_000,
        )
        .unwrap_err();
    assert_eq!(e.error_type(), "timeout", "{e}");
    assert!(began.elapsed() < std::time::Duration::from_secs(20));
}
