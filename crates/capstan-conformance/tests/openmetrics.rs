//! The OpenMetrics parser conformance cases (`$CAPSTAN_TESTDATA/openmetrics/parsers`):
//! every case must parse exactly when its `test.json` says `shouldParse: true`.

use capstan_expfmt::{Format, Parser};

#[test]
#[cfg_attr(
    not(openmetrics_data),
    ignore = "skipped: no OpenMetrics cases at $CAPSTAN_TESTDATA/openmetrics/parsers (see crates/capstan-conformance/README.md)"
)]
fn openmetrics_conformance() {
    let entries = capstan_conformance::entries("openmetrics/parsers");
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
