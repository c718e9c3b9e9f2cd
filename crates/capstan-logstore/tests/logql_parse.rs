//! LogQL parsing: every feature the store's engine serves parses into the
//! expected shape; malformed queries get an error naming the column and the
//! problem; random input never panics.

use capstan_logstore::logql::ast::*;
use capstan_logstore::logql::{parse, parse_bytes, parse_duration};

fn log(q: &str) -> LogExpr {
    match parse(q).unwrap_or_else(|e| panic!("{q}: {e}")) {
        Expr::Log(l) => l,
        Expr::Metric(m) => panic!("{q}: a metric query: {m:?}"),
    }
}

fn metric(q: &str) -> MetricExpr {
    match parse(q).unwrap_or_else(|e| panic!("{q}: {e}")) {
        Expr::Metric(m) => m,
        Expr::Log(l) => panic!("{q}: a log query: {l:?}"),
    }
}

#[test]
fn selectors_and_line_filters() {
    let l = log(r#"{service="web", replica!="2", stream=~"std.*", env!~"dev|test"}"#);
    assert_eq!(l.selector.len(), 4);
    assert!(l.selector[2].matches("stdout") && !l.selector[2].matches("xstdout"));
    let l = log(
        r#"{service="web"} |= "error" != "timeout" |~ "5\d\d" !~ `(?i)health` |= "a" or "b" |> "<_> GET <_>""#,
    );
    let ops: Vec<FilterOp> = l
        .stages
        .iter()
        .map(|s| match s {
            Stage::Line(f) => f.op,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            FilterOp::Contains,
            FilterOp::NotContains,
            FilterOp::Match,
            FilterOp::NotMatch,
            FilterOp::Contains,
            FilterOp::Pattern
        ]
    );
    assert_eq!(l.required_substrings(), vec![b"error".to_vec()]);
}

#[test]
fn parsers_formatters_and_label_filters() {
    let l = log(
        r#"{service="api"} | json | logfmt --strict | regexp `(?P<method>\w+) (?P<path>\S+)` | pattern "<ip> <_>"
           | status >= 500 and duration > 300ms or size > 1KB, level = "error" | user =~ "u1.*"
           | line_format "{{.method}} {{.path | ToUpper}}" | label_format svc=service, msg="{{.status}}"
           | drop trace_id, level="debug" | keep service, status | json first="a.b", second"#,
    );
    let kinds: Vec<&str> = l
        .stages
        .iter()
        .map(|s| match s {
            Stage::Json(_) => "json",
            Stage::Logfmt(_) => "logfmt",
            Stage::Regexp(_) => "regexp",
            Stage::Pattern(_) => "pattern",
            Stage::Labels(_) => "labels",
            Stage::LineFormat(_) => "line_format",
            Stage::LabelFormat(_) => "label_format",
            Stage::Drop(_) => "drop",
            Stage::Keep(_) => "keep",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "json",
            "logfmt",
            "regexp",
            "pattern",
            "labels",
            "labels",
            "line_format",
            "label_format",
            "drop",
            "keep",
            "json"
        ]
    );
    match &l.stages[4] {
        Stage::Labels(LabelFilter::Or(a, b)) => {
            assert!(matches!(**a, LabelFilter::And(..)));
            assert!(matches!(**b, LabelFilter::And(..)));
        }
        other => panic!("{other:?}"),
    }
    match &l.stages[10] {
        Stage::Json(x) => assert_eq!(
            x,
            &vec![
                ("first".into(), "a.b".into()),
                ("second".into(), "second".into())
            ]
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn metric_queries() {
    match metric(r#"sum by (status) (rate({service="web"} |= "GET" [5m]))"#) {
        MetricExpr::Agg {
            op: AggOp::Sum,
            grouping: Some(Grouping::By(g)),
            inner,
            ..
        } => {
            assert_eq!(g, vec!["status"]);
            assert!(matches!(
                *inner,
                MetricExpr::Range {
                    func: RangeFn::Rate,
                    range_ns: 300_000_000_000,
                    ..
                }
            ));
        }
        other => panic!("{other:?}"),
    }
    match metric(
        r#"quantile_over_time(0.99, {service="api"} | json | unwrap duration(latency) [1m]) by (path)"#,
    ) {
        MetricExpr::Range {
            func: RangeFn::QuantileOverTime,
            param: Some(p),
            grouping: Some(_),
            ..
        } => assert_eq!(p, 0.99),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        metric(r#"topk(3, sum(count_over_time({service="web"}[1h] offset 1d)) by (replica))"#),
        MetricExpr::Agg {
            op: AggOp::Topk,
            param: Some(_),
            ..
        }
    ));
    for q in [
        r#"bytes_over_time({service="web"}[5m])"#,
        r#"bytes_rate({service="web"}[5m])"#,
        r#"absent_over_time({service="web"} |= "x" [5m])"#,
        r#"avg_over_time({service="web"} | logfmt | unwrap bytes(size) [5m])"#,
        r#"sum without (replica) (count_over_time({service="web"}[1m])) / 60"#,
        r#"count_over_time({service="web"}[1m]) > bool 10"#,
        r#"2 ^ 3 ^ 2"#,
    ] {
        metric(q);
    }
    // ^ is right-associative: 2 ^ (3 ^ 2).
    match metric("2 ^ 3 ^ 2") {
        MetricExpr::Binary {
            op: BinOp::Pow,
            rhs,
            ..
        } => assert!(matches!(*rhs, MetricExpr::Binary { op: BinOp::Pow, .. })),
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_say_where_and_what() {
    let cases = [
        (r#"{service="web""#, "expected '}'"),
        (r#"{}"#, "at least one matcher"),
        (r#"{service=""}"#, "at least one matcher"),
        (r#"{service="web"} |= error"#, "quoted string"),
        (
            r#"{service="web"} | frobnicate"#,
            "unknown stage \"frobnicate\"",
        ),
        (
            r#"sum_over_time({service="web"}[5m])"#,
            "needs an unwrapped label",
        ),
        (r#"count_over_time({service="web"})"#, "a range like [5m]"),
        (r#"{service="web"} |~ "(""#, "bad regex"),
        (r#"{service="web"} | status > "x""#, "compare numbers"),
        (r#"{service="web"} | regexp "(\w+)""#, "no named group"),
        (r#"{service="web"} | line_format "{{.a""#, "unclosed"),
        (r#"sum({service="web"})"#, "metric query"),
        (r#"{service="web"} + 1"#, "unexpected"),
        (
            r#"rate({service="web"}[5x])"#,
            "bad number, duration or size",
        ),
        ("{service=\"web\"} |= \"unterminated", "unterminated string"),
    ];
    for (q, want) in cases {
        let e = parse(q).expect_err(q);
        assert!(e.to_string().contains(want), "{q}: {e} (wanted {want:?})");
        assert!(e.to_string().starts_with("parse error at column "), "{e}");
    }
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("1h30m"), Some(5_400_000_000_000));
    assert_eq!(parse_duration("300ms"), Some(300_000_000));
    assert_eq!(parse_duration("1.5s"), Some(1_500_000_000));
    assert_eq!(parse_duration("5x"), None);
    assert_eq!(parse_bytes("1KB"), Some(1024.0));
    assert_eq!(parse_bytes("2.5MiB"), Some(2.5 * 1024.0 * 1024.0));
    assert_eq!(parse_bytes("10"), None);
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    const PIECES: &[&str] = &[
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        ",",
        "|",
        "|=",
        "!=",
        "|~",
        "!~",
        "|>",
        "=",
        "=~",
        "==",
        ">",
        ">=",
        "<",
        "+",
        "-",
        "*",
        "/",
        "^",
        "\"x\"",
        "`y`",
        "\"<a> <_>\"",
        "5m",
        "1.5",
        "1KB",
        "service",
        "json",
        "logfmt",
        "regexp",
        "pattern",
        "line_format",
        "label_format",
        "drop",
        "keep",
        "unwrap",
        "duration",
        "by",
        "without",
        "sum",
        "topk",
        "rate",
        "count_over_time",
        "quantile_over_time",
        "offset",
        "and",
        "or",
        "bool",
        "\"{{.a}}\"",
        "\"",
        "µ",
        "--",
        "\\",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn token_soup(idx in proptest::collection::vec(0..PIECES.len(), 0..30)) {
            let q: Vec<&str> = idx.iter().map(|i| PIECES[*i]).collect();
            let _ = parse(&q.join(" "));
            let _ = parse(&q.join(""));
        }

        #[test]
        fn any_text(s in ".{0,80}") {
            let _ = parse(&s);
        }
    }
}

/// Queries at the nesting and operator limits parse (on a thread with the stack
/// the daemon gives its threads); deeper or longer ones are refused before parsing.
#[test]
fn deep_queries_are_bounded() {
    use capstan_logstore::logql::{MAX_NESTING, MAX_OPERATORS};
    let sel = "{a=\"b\"}";
    let at_limit = [
        format!(
            "{}count_over_time({sel}[1m]){}",
            "sum(".repeat(MAX_NESTING - 2),
            ")".repeat(MAX_NESTING - 2)
        ),
        vec![format!("count_over_time({sel}[1m])"); MAX_OPERATORS + 1].join(" + "),
        format!(
            "{sel} | logfmt | {}",
            vec!["x > 1"; MAX_OPERATORS / 2].join(" or ")
        ),
        format!(
            "{sel} | logfmt | {}x=1{}",
            "(".repeat(MAX_NESTING),
            ")".repeat(MAX_NESTING)
        ),
    ];
    let over = [
        format!("{}{sel}{}", "(".repeat(5000), ")".repeat(5000)),
        format!(
            "{sel} | logfmt | {}x=1{}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        ),
        vec![format!("count_over_time({sel}[1m])"); MAX_OPERATORS + 2].join(" + "),
        format!("{sel} | logfmt | {}", vec!["x > 1"; 5000].join(" and ")),
        format!("{sel} | logfmt | {}", vec!["x > 1"; 5000].join(", ")),
    ];
    std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(move || {
            for q in &at_limit {
                parse(q).unwrap_or_else(|e| panic!("{e}: {}", &q[..80]));
            }
            for q in &over {
                let e = parse(q).unwrap_err().to_string();
                assert!(
                    e.contains("nests deeper than 128") || e.contains("more than 1024 operators"),
                    "{e}"
                );
            }
        })
        .unwrap()
        .join()
        .unwrap();
}
