//! The OpenMetrics parser conformance cases (`../shared/testdata/openmetrics/parsers`):
//! every case must parse exactly when its `test.json` says `shouldParse: true`.

use std::path::PathBuf;

use capstan_expfmt::{Format, Parser};

fn cases_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/openmetrics/parsers")
}

#[test]
fn openmetrics_conformance() {
    let dir = cases_dir();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the shared test data must sit beside the repository)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    let mut wrong = Vec::new();
    for case in &entries {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(case.join("test.json")).unwrap()).unwrap();
        assert_eq!(meta["type"], "text");
        let should = meta["shouldParse"].as_bool().unwrap();
        let input = std::fs::read(case.join(meta["file"].as_str().unwrap())).unwrap();
        let result = Parser::from_bytes(&input, Format::OpenMetrics)
            .and_then(|p| p.collect::<Result<Vec<_>, _>>());
        if result.is_ok() != should {
            wrong.push(format!(
                "{}: expected {}, got {:?}",
                case.file_name().unwrap().to_string_lossy(),
                if should { "success" } else { "an error" },
                result.err()
            ));
        }
    }
    println!(
        "{} of {} OpenMetrics cases agree",
        entries.len() - wrong.len(),
        entries.len()
    );
    assert_eq!(entries.len(), 211);
    assert!(
        wrong.is_empty(),
        "{} disagree:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
