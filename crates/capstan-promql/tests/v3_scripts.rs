//! Every script of Prometheus' v3.0.0 promqltest suite parses: 15 files, 1,049 evals.

use capstan_promql::promqltest::{Command, parse};

#[test]
fn the_upstream_scripts_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/testdata/promql/v3.0.0");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the shared test data must sit beside the repository)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
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
