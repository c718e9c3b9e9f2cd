//! Prometheus' v3.0.0 promqltest suite against the engine: every float case passes;
//! the only skips are native-histogram cases.

use capstan_promql::runner;

#[test]
#[cfg_attr(
    not(promql_data),
    ignore = "skipped: no promqltest scripts at $CAPSTAN_TESTDATA/promql/v3.0.0 (see crates/capstan-conformance/README.md)"
)]
fn the_v3_suite_passes() {
    let files = capstan_conformance::entries("promql/v3.0.0");
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let r = runner::run(&text).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        eprintln!(
            "{name}: {} passed, {} failed, {} skipped",
            r.passed, r.failed, r.skipped
        );
        for s in &r.skips {
            assert!(
                s.contains("native histogram"),
                "{name}: a skip that is not about native histograms: {s}"
            );
        }
        passed += r.passed;
        failed += r.failed;
        skipped += r.skipped;
        failures.extend(r.failures.iter().map(|m| format!("{name}: {m}")));
    }
    eprintln!("total: {passed} passed, {failed} failed, {skipped} skipped");
    for m in &failures {
        eprintln!("FAIL {m}");
    }
    assert!(failures.is_empty(), "{} failures", failures.len());
}
