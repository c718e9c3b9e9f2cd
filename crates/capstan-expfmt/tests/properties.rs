//! Property tests: no input makes the parser panic, and what a writer following
//! either format emits parses back to the same samples.

use capstan_expfmt::{Entry, Format, Parser};
use proptest::prelude::*;

fn drain(input: &str, format: Format) {
    for e in Parser::new(input, format) {
        if let Ok(Entry::Sample(s)) = e {
            for l in s.labels() {
                let _ = l;
            }
        }
    }
}

fn value_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v:?}")
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

fn arb_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-0.0),
        (-1e6..1e6f64),
        (0i64..1_000_000).prop_map(|i| i as f64)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_noise(text in "\\PC{0,300}") {
        drain(&text, Format::Text);
        drain(&text, Format::OpenMetrics);
    }

    #[test]
    fn never_panics_on_near_misses(text in "(# (HELP|TYPE|UNIT|EOF) ?)?[a-z_]{0,4}(\\{([a-z]{1,3}=\"[a-z\\\\\" #{}]{0,5}\",?){0,3}\\}?)? ?[0-9.eE+-]{0,6}( [0-9.]{0,4})?( # \\{[a-z=\"]{0,6}\\} ?[0-9.]{0,3})?\n?") {
        drain(&text, Format::Text);
        drain(&text, Format::OpenMetrics);
    }

    #[test]
    fn round_trip(samples in prop::collection::vec((
        "[a-zA-Z_:][a-zA-Z0-9_:]{0,12}",
        prop::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,6}", "\\PC{0,8}", 0..4),
        arb_value(),
        prop::option::of(-1_000_000_000_000i64..4_000_000_000_000i64),
    ), 1..20)) {
        for format in [Format::Text, Format::OpenMetrics] {
            let mut text = String::new();
            for (name, labels, value, ts) in &samples {
                text.push_str(name);
                if !labels.is_empty() {
                    text.push('{');
                    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                    text.push_str(&parts.join(","));
                    text.push('}');
                }
                text.push(' ');
                text.push_str(&value_text(*value));
                if let Some(ts) = ts {
                    match format {
                        Format::Text => text.push_str(&format!(" {ts}")),
                        Format::OpenMetrics => text.push_str(&format!(" {}", *ts as f64 / 1000.0)),
                    }
                }
                text.push('\n');
            }
            if format == Format::OpenMetrics {
                // Every line is its own unknown-typed family; the same name twice would be a regrouping error.
                let mut names: Vec<&String> = samples.iter().map(|s| &s.0).collect();
                names.sort();
                names.dedup();
                if names.len() != samples.len() {
                    continue;
                }
                text.push_str("# EOF\n");
            }
            let parsed: Vec<Entry> = Parser::new(&text, format).collect::<Result<_, _>>().map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(parsed.len(), samples.len());
            for (e, (name, labels, value, ts)) in parsed.iter().zip(&samples) {
                let Entry::Sample(s) = e else { return Err(TestCaseError::fail("not a sample")) };
                prop_assert_eq!(s.name, name.as_str());
                let got: Vec<(String, String)> = s.labels().map(|l| l.map(|(k, v)| (k.to_owned(), v.into_owned()))).collect::<Result<_, _>>().unwrap();
                let want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                prop_assert_eq!(got, want);
                prop_assert!(s.value.to_bits() == value.to_bits() || (s.value.is_nan() && value.is_nan()), "{} vs {}", s.value, value);
                prop_assert_eq!(s.timestamp_ms, *ts);
            }
        }
    }
}
