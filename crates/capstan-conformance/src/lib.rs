//! Upstream conformance suites run against capstan's engines; the tests are in
//! `tests/`. The data comes from outside the repository (see the README).

use std::path::PathBuf;

/// The conformance data directory this crate was built against.
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CAPSTAN_TESTDATA_DIR"))
}

/// The sorted entries of `part` (relative to [`testdata`]).
pub fn entries(part: &str) -> Vec<PathBuf> {
    let dir = testdata().join(part);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    out.sort();
    out
}
