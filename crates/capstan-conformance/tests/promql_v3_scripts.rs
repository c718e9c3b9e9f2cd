//! Every script of Prometheus' v3.0.0 promqltest suite parses: 15 files, 1,049 evals.

use capstan_promql::promqltest::{Command, parse};

#[test]
#[cfg_attr(
    not(promql_data),
    ignore = "skipped: no promqltest scripts at $CAPSTAN_TESTDATA/promql/v3.0.0 (see crates/capstan-conformance/README.md)"
)]
fn the_upstream_scripts_parse() {
    let files = capstan_conformance::entries("promql/v3.0.0");
    let mut evals = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let cmds = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        evals += cmds
            .iter()
            .filter(|c| matches!(c, Command::Eval(_)))
            .count();
    }
    assert_eq!(files.len(), 15);
    assert_eq!(evals, 1049);
}
