//! Property tests: the parsers of outside input (stack files, .env files,
//! interpolation, durations, sizes, ports, captured output) never panic, and
//! errors always carry a position.

use std::collections::BTreeMap;
use std::path::Path;

use capstan::spec::{self, LoadOptions, interp};
use proptest::prelude::*;

const VALID: &str = r#"name: app
services:
  web:
    command: ["demo", "--port=$${PORT}"]
    environment: {A: "${A:-1}", B: two}
    ports: ["8080:http", {published: 9090, target: "9090"}]
    healthcheck:
      test: ["CMD", "true"]
      interval: 1s
    x-capstan:
      healthcheck: {http: /healthz, interval: 500ms}
    depends_on:
      db: {condition: service_healthy}
    deploy:
      replicas: 3
      resources: {limits: {memory: 64m, cpus: "0.5", pids: 100}}
      restart_policy: {condition: on-failure, delay: 1s, max_attempts: 3, window: 1m}
    restart: always
  db:
    command: db --fast
    profiles: [x]
"#;

fn parse(text: &str) {
    let opts = LoadOptions {
        env: BTreeMap::from([("A".into(), "x".into())]),
        profiles: vec!["x".into()],
    };
    match spec::parse_text(
        text,
        "capstan.yaml",
        Path::new("/nonexistent"),
        "app",
        BTreeMap::new(),
        &opts,
    ) {
        Ok((stack, _)) => {
            // Whatever parses renders and loads back.
            let yaml = spec::to_yaml(&stack);
            let again: spec::Stack =
                serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            assert_eq!(again, stack);
        }
        Err(e) => {
            assert!(!e.errors.is_empty());
            let msg = e.to_string();
            assert!(msg.starts_with("capstan.yaml:"), "{msg}");
        }
    }
}

/// Edits of the valid file: delete, insert or replace a few characters.
fn mutated() -> impl Strategy<Value = String> {
    let edits = prop::collection::vec(
        (
            0..VALID.len(),
            0u8..3,
            prop::sample::select(vec![
                " ", ":", "-", "\n", "\"", "'", "$", "{", "}", "[", "]", "#", "two", "-1", "&a",
                "*a", "\t", "é", "${", "!!str",
            ]),
        ),
        1..6,
    );
    edits.prop_map(|edits| {
        let mut s = VALID.to_owned();
        for (pos, kind, text) in edits {
            let mut p = pos.min(s.len());
            while !s.is_char_boundary(p) {
                p -= 1;
            }
            match kind {
                0 => {
                    let mut end = (p + 3).min(s.len());
                    while !s.is_char_boundary(end) {
                        end += 1;
                    }
                    s.replace_range(p..end, "");
                }
                1 => s.insert_str(p, text),
                _ => {
                    let mut end = (p + 1).min(s.len());
                    while !s.is_char_boundary(end) {
                        end += 1;
                    }
                    s.replace_range(p..end, text);
                }
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn stack_files_from_edits(text in mutated()) {
        parse(&text);
    }

    #[test]
    fn stack_files_from_noise(text in "\\PC{0,200}") {
        parse(&text);
    }

    #[test]
    fn interpolation(text in "[a-zA-Z0-9${}:?+_ -]{0,40}") {
        let vars = interp::Vars::new(BTreeMap::from([("A".into(), "1".into()), ("E".into(), String::new())]), []);
        let _ = interp::interpolate(&text, &vars);
    }

    #[test]
    fn env_files(text in "\\PC{0,200}") {
        let _ = interp::parse_env_file(&text);
    }

    #[test]
    fn durations_sizes_ports(text in "[0-9a-zµ.:/ -]{0,16}") {
        let _ = spec::parse_duration(&text);
        let _ = spec::parse_bytes(&text);
        let _ = spec::decode::parse_port_short(&text);
    }

    #[test]
    fn captured_output_never_panics(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2000), 0..8)) {
        let input: Vec<u8> = chunks.concat();
        let lines = capture(&input);
        prop_assert!(lines.iter().all(|(l, _)| l.len() <= capstan::logs::capture::MAX_LINE * 3));
    }

    #[test]
    fn captured_text_is_kept_exactly(
        parts in prop::collection::vec(prop_oneof![
            "[a-zé€ \n]{0,300}",
            (prop::sample::select(vec!["a", "é", "€", "😀"]), 0usize..40_000).prop_map(|(c, n)| c.repeat(n)),
        ], 0..6)
    ) {
        let input = parts.concat();
        let mut rebuilt = String::new();
        for (l, partial) in capture(input.as_bytes()) {
            rebuilt.push_str(&l);
            if !partial {
                rebuilt.push('\n');
            }
        }
        prop_assert_eq!(rebuilt, input);
    }
}

fn capture(input: &[u8]) -> Vec<(String, bool)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut lines = Vec::new();
    rt.block_on(capstan::logs::capture::read_lines(input, |l, partial| {
        lines.push((l, partial))
    }));
    lines
}

/// Push bodies (Loki JSON and protobuf, OTLP logs and traces in both
/// encodings, gzip or not): never a panic, and what is accepted is valid.
mod push_bodies {
    use capstan::ingest::{Batch, loki, otlp};
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn valid(b: &Batch) -> bool {
        b.streams.iter().all(|(l, entries)| {
            !l.is_empty()
                && entries
                    .iter()
                    .all(|e| capstan::ingest::check_time(e.ts_ns, NOW).is_ok())
        })
    }

    fn json_noise() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just(r#"{"streams":[{"stream":{"a":"b"},"values":[["#.to_string()),
            Just(r#""1800000000000000000","line"]"#.to_string()),
            Just(r#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"#.to_string()),
            Just(r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"#.to_string()),
            Just(r#""0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708""#.to_string()),
            Just(r#""timeUnixNano":"1800000000000000000""#.to_string()),
            "[\\[\\]{}:,\"0-9a-z ]{0,12}",
        ];
        prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..400), sel in 0u8..16) {
            let ce = if sel & 1 == 1 { "gzip" } else { "" };
            let enc = if sel & 8 == 0 { otlp::Encoding::Json } else { otlp::Encoding::Protobuf };
            let r = match sel >> 1 & 3 {
                0 => loki::decode_push("application/json", ce, &body, NOW),
                1 => loki::decode_push("application/x-protobuf", "", &body, NOW),
                2 => otlp::decode_logs(enc, ce, &body, NOW),
                _ => otlp::decode_traces(enc, ce, &body, NOW),
            };
            if let Ok(b) = r {
                prop_assert!(valid(&b));
            }
        }

        #[test]
        fn json_like_bodies_never_panic(text in json_noise()) {
            for r in [
                loki::decode_push("application/json", "", text.as_bytes(), NOW),
                otlp::decode_logs(otlp::Encoding::Json, "", text.as_bytes(), NOW),
                otlp::decode_traces(otlp::Encoding::Json, "", text.as_bytes(), NOW),
            ] {
                match r {
                    Ok(b) => prop_assert!(valid(&b)),
                    Err(e) => prop_assert!((400..500).contains(&e.status) && !e.reason.is_empty()),
                }
            }
        }
    }
}

mod traceql_queries {
    use capstan::traceql;
    use proptest::prelude::*;

    const TOKENS: [&str; 30] = [
        "{",
        "}",
        "(",
        ")",
        "&&",
        "||",
        "!",
        "=",
        "!=",
        ">",
        ">=",
        "<",
        "<=",
        "=~",
        "!~",
        "name",
        "status",
        "duration",
        "span.http.route",
        "resource.service.name",
        ".x",
        "span:kind",
        "\"a\"",
        "\"(\"",
        "1.5",
        "-3",
        "300ms",
        "error",
        "server",
        "true",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn token_soup_never_panics(idx in prop::collection::vec(0usize..TOKENS.len(), 0..24)) {
            let q: Vec<&str> = idx.iter().map(|i| TOKENS[*i]).collect();
            let q = q.join(" ");
            if let Err(e) = traceql::parse(&q) {
                prop_assert!(e.column >= 1 && e.column <= q.chars().count() + 1, "{q}: {e}");
            }
        }

        #[test]
        fn any_text_never_panics(q in "\\PC{0,80}") {
            let _ = traceql::parse(&q);
        }
    }
}

/// Rule files and the templates in them: any text, and soups of template tokens.
mod rules {
    use capstan::alerting::{file, template};
    use proptest::prelude::*;

    const TOKENS: &[&str] = &[
        "{{",
        "}}",
        "{{-",
        "-}}",
        "if",
        "else",
        "end",
        "with",
        "range",
        "$labels.service",
        "$value",
        ".Labels",
        "$x",
        ":=",
        "|",
        "humanize",
        "printf",
        "\"%.2f\"",
        "(",
        ")",
        "eq",
        "1",
        "\"a\"",
        "text",
        " ",
        "$k, $v :=",
        "humanizeDuration",
        "len",
        "index",
    ];

    fn data() -> template::Data<'static> {
        template::Data {
            labels: [("service".to_owned(), "web".to_owned())].into(),
            external_labels: Default::default(),
            value: 2.5,
            query: None,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        #[test]
        fn template_soup_never_panics(idx in prop::collection::vec(0usize..TOKENS.len(), 0..30)) {
            let t: String = idx.iter().map(|i| TOKENS[*i]).collect();
            let _ = template::expand(&t, &data());
        }

        #[test]
        fn rule_files_from_noise(text in "\\PC{0,200}") {
            if let Err(problems) = file::parse("r.yml", &text) {
                prop_assert!(!problems.is_empty());
            }
        }
    }
}
