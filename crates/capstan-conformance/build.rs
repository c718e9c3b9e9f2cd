//! Finds the external conformance data (`CAPSTAN_TESTDATA`, default
//! `../shared/testdata` beside the repository) and tells the tests what is there:
//! `cfg(promql_data)` and `cfg(openmetrics_data)` when each part exists, and the
//! directory as `CAPSTAN_TESTDATA_DIR`. The tests of a missing part are built as
//! ignored, with the reason, so the runner counts them as skipped.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(promql_data)");
    println!("cargo::rustc-check-cfg=cfg(openmetrics_data)");
    println!("cargo::rerun-if-env-changed=CAPSTAN_TESTDATA");
    let dir = match std::env::var_os("CAPSTAN_TESTDATA") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata"),
    };
    // A missing path makes cargo run this script again next time, so data that
    // appears later is found without a clean build.
    println!("cargo::rerun-if-changed={}", dir.display());
    for (part, cfg) in [
        ("promql/v3.0.0", "promql_data"),
        ("openmetrics/parsers", "openmetrics_data"),
    ] {
        if dir.join(part).is_dir() {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
    println!("cargo::rustc-env=CAPSTAN_TESTDATA_DIR={}", dir.display());
}
