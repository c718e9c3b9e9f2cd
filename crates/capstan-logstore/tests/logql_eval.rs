//! LogQL over a store: a table of queries with their expected results, one or
//! more for every feature (filters, parsers, label filters, formatters,
//! drop/keep, decolorize, range functions with and without unwrap, aggregations,
//! binary operators, instant and range evaluation).

use capstan_logstore::logql::ast::Expr;
use capstan_logstore::logql::eval::{Series, Value, eval_metric, select_logs};
use capstan_logstore::logql::parse;
use capstan_logstore::{Direction, Entry, Labels, Options, Store};

type Pairs = Vec<(String, String)>;

const T: i64 = 1_800_000_000_000_000_000;
const S: i64 = 1_000_000_000;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = Store::open(Options::new(dir.path())).unwrap();
    let l = |svc: &str, r: &str| {
        Labels::from_pairs([("service", svc), ("replica", r), ("stream", "stdout")])
    };
    let web0: Vec<Entry> = (0..20i64)
        .map(|i| Entry {
            ts_ns: T + i * S,
            line: format!(
                "method={} path={} status={} duration={}ms size={} user={}",
                if i % 4 == 0 { "POST" } else { "GET" },
                if i % 2 == 0 { "/a" } else { "/b" },
                if i % 5 == 0 { 500 } else { 200 },
                i * 50,
                if i % 3 == 0 { "2KB" } else { "512B" },
                if i < 10 { "alice" } else { "bob" }
            ),
            ..Entry::default()
        })
        .collect();
    let mut web1: Vec<Entry> = (0..10i64)
        .map(|j| Entry {
            ts_ns: T + j * S + S / 2,
            line: "method=GET path=/c status=200 duration=10ms size=512B user=carol".into(),
            ..Entry::default()
        })
        .collect();
    web1.push(Entry {
        ts_ns: T + 10 * S + S / 2,
        line: "\u{1b}[31mred alert\u{1b}[0m".into(),
        ..Entry::default()
    });
    let mut api: Vec<Entry> = (0..10i64)
        .map(|k| Entry {
            ts_ns: T + k * S + S / 4,
            line: format!(
                r#"{{"level":"{}","msg":"db call","latency_ms":{},"user":{{"name":"{}"}}}}"#,
                if k % 2 == 0 { "error" } else { "info" },
                k * 10,
                if k < 5 { "bob" } else { "alice" }
            ),
            meta: vec![("trace_id".into(), format!("{k:032x}"))],
            ..Entry::default()
        })
        .collect();
    api.push(Entry {
        ts_ns: T + 10 * S + S / 4,
        line: "not json at all".into(),
        ..Entry::default()
    });
    st.append(&l("web", "0"), web0).unwrap();
    // Half the data flushed into blocks, half in the head.
    st.flush().unwrap();
    st.append(&l("web", "1"), web1).unwrap();
    st.append(&l("api", "0"), api).unwrap();
    (dir, st)
}

fn logs(st: &Store, q: &str, limit: usize, dir: Direction) -> Vec<(Pairs, Vec<String>)> {
    let Expr::Log(e) = parse(q).unwrap_or_else(|e| panic!("{q}: {e}")) else {
        panic!("{q}: not a log query")
    };
    select_logs(st, &e, T - 100 * S, T + 100 * S, limit, dir)
        .unwrap()
        .into_iter()
        .map(|s| {
            (
                s.labels.into_iter().collect(),
                s.entries.into_iter().map(|(_, l)| l).collect(),
            )
        })
        .collect()
}

fn count(st: &Store, q: &str) -> usize {
    logs(st, q, 1000, Direction::Forward)
        .iter()
        .map(|s| s.1.len())
        .sum()
}

fn instant(st: &Store, q: &str, at: i64) -> Vec<(Pairs, f64)> {
    let Expr::Metric(m) = parse(q).unwrap_or_else(|e| panic!("{q}: {e}")) else {
        panic!("{q}: not a metric query")
    };
    match eval_metric(st, &m, at, at, S).unwrap() {
        Value::Vector(v) => v
            .into_iter()
            .map(|Series { labels, points }| {
                assert_eq!(points.len(), 1, "{q}");
                (labels.into_iter().collect(), points[0].1)
            })
            .collect(),
        Value::Scalar(p) => vec![(vec![], p[0].1)],
    }
}

fn kv(pairs: &[(&str, &str)]) -> Pairs {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn log_queries() {
    let (_d, st) = store();
    let table: &[(&str, usize)] = &[
        (r#"{service="web"} |= "status=500""#, 4),
        (r#"{service="web", replica="1"} != "GET""#, 1),
        (r#"{service="web"} |~ "status=5\d\d""#, 4),
        (r#"{service="web"} !~ "status=(2|5)00""#, 1),
        (r#"{service="web"} |= "POST" or "path=/c""#, 15),
        (r#"{service="web"} | logfmt | status >= 500"#, 4),
        (
            r#"{service="web"} | logfmt | status == 200 and path != "/a""#,
            18,
        ),
        (r#"{service="web"} | logfmt | duration > 300ms"#, 13),
        (r#"{service="web"} | logfmt | size > 1KB"#, 7),
        (
            r#"{service="web"} | logfmt | status >= 500 or user = "carol""#,
            14,
        ),
        (
            r#"{service="web"} | logfmt | (user="alice" or user="bob"), method="POST""#,
            5,
        ),
        (r#"{service="web"} | logfmt | user =~ "a.*|c.*""#, 20),
        (r#"{service="api"} | json | level="error""#, 5),
        (
            r#"{service="api"} | json | user_name="alice" | latency_ms < 80"#,
            3,
        ),
        (r#"{service="api"} | json | __error__ != """#, 1),
        (r#"{service="api"} | json | __error__ = """#, 10),
        (
            r#"{service="api"} | json lvl="level", who="user.name" | lvl="info" | who="bob""#,
            2,
        ),
        (
            r#"{service="api"} | trace_id = "00000000000000000000000000000003""#,
            1,
        ),
        (
            r#"{service="web", replica="0"} | regexp "path=(?P<p>\S+)" | p="/b""#,
            10,
        ),
        (
            r#"{service="web"} | pattern "method=<m> path=<_> <_>" | m="POST""#,
            5,
        ),
        (r#"{service="web"} |> "method=<_> path=/c <_>""#, 10),
        (r#"{service="web"} !> "method=<_> path=/c <_>""#, 21),
        (
            r#"{service="web", replica="1"} | decolorize |= "red alert" |~ "^red""#,
            1,
        ),
        (r#"{service=~"web|api", replica="0"}"#, 31),
    ];
    for (q, n) in table {
        assert_eq!(count(&st, q), *n, "{q}");
    }
}

#[test]
fn formatters_and_label_sets() {
    let (_d, st) = store();
    let got = logs(
        &st,
        r#"{service="web", replica="0"} | logfmt | line_format "{{.method}} {{.path | ToUpper}}""#,
        1,
        Direction::Backward,
    );
    assert_eq!(got[0].1, vec!["GET /B"]);
    let got = logs(
        &st,
        r#"{service="web", replica="1"} |= "carol" | logfmt | label_format who=user, tag="{{.method}}-{{.status}}" | keep who, service, tag"#,
        100,
        Direction::Forward,
    );
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].0,
        kv(&[("service", "web"), ("tag", "GET-200"), ("who", "carol")])
    );
    assert_eq!(got[0].1.len(), 10);
    let got = logs(
        &st,
        r#"{service="api"} | json | drop user_name, level="info", trace_id, __error__"#,
        100,
        Direction::Forward,
    );
    assert!(
        got.iter()
            .all(|(l, _)| !l.iter().any(|(k, _)| k == "user_name" || k == "trace_id"))
    );
    assert!(
        got.iter()
            .any(|(l, _)| l.iter().any(|(k, v)| k == "level" && v == "error"))
    );
    assert!(
        !got.iter()
            .any(|(l, _)| l.iter().any(|(k, v)| k == "level" && v == "info"))
    );
    // Stream labels win; an extracted label of the same name gets _extracted.
    let got = logs(
        &st,
        r#"{service="api"} |= "db call" | json service="msg""#,
        1,
        Direction::Forward,
    );
    assert!(
        got[0]
            .0
            .contains(&("service_extracted".to_string(), "db call".to_string())),
        "{:?}",
        got[0].0
    );
    // Direction and limit across streams: by time, then append order.
    let got = logs(&st, r#"{service="web"}"#, 3, Direction::Forward);
    let mut all: Vec<String> = got.into_iter().flat_map(|s| s.1).collect();
    all.sort();
    assert_eq!(
        all,
        vec![
            "method=GET path=/b status=200 duration=50ms size=512B user=alice",
            "method=GET path=/c status=200 duration=10ms size=512B user=carol",
            "method=POST path=/a status=500 duration=0ms size=2KB user=alice",
        ]
    );
}

#[test]
fn metric_queries() {
    let (_d, st) = store();
    let at = T + 30 * S;
    let table: Vec<(&str, Vec<(Pairs, f64)>)> = vec![
        (
            r#"count_over_time({service="web"}[1m])"#,
            vec![
                (
                    kv(&[("replica", "0"), ("service", "web"), ("stream", "stdout")]),
                    20.0,
                ),
                (
                    kv(&[("replica", "1"), ("service", "web"), ("stream", "stdout")]),
                    11.0,
                ),
            ],
        ),
        (
            r#"sum by (status) (count_over_time({service="web"} | logfmt [1m]))"#,
            vec![
                (kv(&[]), 1.0),
                (kv(&[("status", "200")]), 26.0),
                (kv(&[("status", "500")]), 4.0),
            ],
        ),
        (
            r#"sum(rate({service="web", replica="0"}[20s]))"#,
            vec![(kv(&[]), 0.45)],
        ),
        (
            r#"sum(bytes_over_time({service="web", replica="1"} |= "red" [1m]))"#,
            vec![(kv(&[]), 18.0)],
        ),
        (
            r#"sum(bytes_rate({service="web", replica="1"} |= "red" [1m]))"#,
            vec![(kv(&[]), 0.3)],
        ),
        (
            r#"sum_over_time({service="api"} | json | unwrap latency_ms [1m]) by (service)"#,
            vec![(kv(&[("service", "api")]), 450.0)],
        ),
        (
            r#"avg_over_time({service="api"} | json | unwrap latency_ms [1m]) by (service)"#,
            vec![(kv(&[("service", "api")]), 45.0)],
        ),
        (
            r#"max_over_time({service="api"} | json | unwrap latency_ms [1m]) by (service)"#,
            vec![(kv(&[("service", "api")]), 90.0)],
        ),
        (
            r#"min_over_time({service="api"} | json | level="info" | unwrap latency_ms [1m]) by (level)"#,
            vec![(kv(&[("level", "info")]), 10.0)],
        ),
        (
            r#"quantile_over_time(0.5, {service="api"} | json | unwrap latency_ms [1m]) by (service)"#,
            vec![(kv(&[("service", "api")]), 45.0)],
        ),
        (
            r#"first_over_time({service="api"} | json | unwrap latency_ms [1m]) by (service)"#,
            vec![(kv(&[("service", "api")]), 0.0)],
        ),
        (
            r#"last_over_time({service="api"} | json | unwrap latency_ms [1m]) by (service)"#,
            vec![(kv(&[("service", "api")]), 90.0)],
        ),
        (
            r#"sum by (replica) (max_over_time({service="web"} | logfmt | unwrap duration(duration) [1m]) by (replica))"#,
            vec![
                (kv(&[("replica", "0")]), 0.95),
                (kv(&[("replica", "1")]), 0.01),
            ],
        ),
        (
            r#"sum(sum_over_time({service="web", replica="0"} | logfmt | unwrap bytes(size) [1m]))"#,
            vec![(kv(&[]), 7.0 * 2048.0 + 13.0 * 512.0)],
        ),
        (
            r#"absent_over_time({service="nope"}[1m])"#,
            vec![(kv(&[("service", "nope")]), 1.0)],
        ),
        (r#"absent_over_time({service="web"}[1m])"#, vec![]),
        (
            r#"topk(1, sum by (replica) (count_over_time({service="web"}[1m])))"#,
            vec![(kv(&[("replica", "0")]), 20.0)],
        ),
        (
            r#"bottomk(1, sum by (replica) (count_over_time({service="web"}[1m])))"#,
            vec![(kv(&[("replica", "1")]), 11.0)],
        ),
        (
            r#"sum(count_over_time({service="web"}[1m])) / 2"#,
            vec![(kv(&[]), 15.5)],
        ),
        // Structured metadata are labels too (as in Loki): each api line has its
        // own trace_id, so 10 series, plus the malformed line, plus 2 web streams.
        (
            r#"count(count_over_time({service=~".+"}[1m]))"#,
            vec![(kv(&[]), 13.0)],
        ),
        (
            r#"count(sum by (service, replica) (count_over_time({service=~".+"}[1m])))"#,
            vec![(kv(&[]), 3.0)],
        ),
        (
            r#"avg without (replica, stream) (count_over_time({service="web"}[1m]))"#,
            vec![(kv(&[("service", "web")]), 15.5)],
        ),
        (
            r#"sum by (replica) (count_over_time({service="web"}[1m])) > 15"#,
            vec![(kv(&[("replica", "0")]), 20.0)],
        ),
        (
            r#"sum by (replica) (count_over_time({service="web"}[1m])) > bool 15"#,
            vec![
                (kv(&[("replica", "0")]), 1.0),
                (kv(&[("replica", "1")]), 0.0),
            ],
        ),
        (
            r#"sum by (replica) (count_over_time({service="web"}[1m])) - sum by (replica) (count_over_time({service="web"} |= "POST" [1m]))"#,
            vec![(kv(&[("replica", "0")]), 15.0)],
        ),
        (r#"1 + 2 * 3"#, vec![(kv(&[]), 7.0)]),
    ];
    for (q, want) in table {
        let got = instant(&st, q, at);
        assert_eq!(got.len(), want.len(), "{q}: {got:?}");
        for ((gl, gv), (wl, wv)) in got.iter().zip(&want) {
            assert_eq!(gl, wl, "{q}");
            assert!((gv - wv).abs() < 1e-9, "{q}: {gv} != {wv}");
        }
    }
}

#[test]
fn range_evaluation_steps_through_windows() {
    let (_d, st) = store();
    let Expr::Metric(m) = parse(r#"count_over_time({service="web", replica="0"}[5s])"#).unwrap()
    else {
        panic!()
    };
    let Value::Vector(v) = eval_metric(&st, &m, T + 5 * S, T + 25 * S, 5 * S).unwrap() else {
        panic!()
    };
    assert_eq!(v.len(), 1);
    // Windows are (t-5s, t]: lines at T+1..T+5, T+6..T+10, …; T+25 holds none.
    assert_eq!(
        v[0].points,
        vec![
            (T + 5 * S, 5.0),
            (T + 10 * S, 5.0),
            (T + 15 * S, 5.0),
            (T + 20 * S, 4.0)
        ]
    );
    let Expr::Metric(m) =
        parse(r#"count_over_time({service="web", replica="0"}[5s] offset 10s)"#).unwrap()
    else {
        panic!()
    };
    let Value::Vector(v) = eval_metric(&st, &m, T + 15 * S, T + 15 * S, S).unwrap() else {
        panic!()
    };
    assert_eq!(v[0].points, vec![(T + 15 * S, 5.0)]);
    assert!(
        eval_metric(&st, &m, T, T + 100_000 * S, 1).is_err(),
        "too many steps is an error"
    );
}

/// Metric queries are refused as they cross a limit: series, steps, result
/// points, and the memory of the samples read.
#[test]
fn metric_query_limits() {
    use capstan_logstore::logql::eval::{Limits, eval_metric_limited};
    let (_d, st) = store();
    let Expr::Metric(m) = parse(r#"count_over_time({service=~".+"}[1h])"#).unwrap() else {
        panic!()
    };
    let run = |l: Limits| eval_metric_limited(&st, &m, T, T + 100 * S, S, &l);
    let err = |l: Limits| run(l).unwrap_err().to_string();
    let Value::Vector(all) = run(Limits::default()).unwrap() else {
        panic!()
    };
    let points: usize = all.iter().map(|s| s.points.len()).sum();
    let n = all.len();
    assert!(n > 2, "{n}");
    let d = Limits::default;
    let e = err(Limits {
        max_series: n - 1,
        ..d()
    });
    assert!(e.contains(&format!("more than {} series", n - 1)), "{e}");
    assert!(
        err(Limits {
            max_steps: 50,
            ..d()
        })
        .contains("more than 50")
    );
    let e = err(Limits {
        max_points: points - 1,
        ..d()
    });
    assert!(
        e.contains(&format!("more than {} points", points - 1)),
        "{e}"
    );
    run(Limits {
        max_points: points,
        ..d()
    })
    .unwrap();
    let e = err(Limits {
        max_sample_bytes: 1000,
        ..d()
    });
    assert!(e.contains("MiB of samples"), "{e}");
    // A deadline already passed, and a canceled query, stop.
    let past = std::time::Instant::now() - std::time::Duration::from_millis(1);
    let e = err(Limits {
        deadline: Some(past),
        ..d()
    });
    assert!(e.contains("timed out"), "{e}");
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let e = err(Limits {
        cancel: Some(cancel),
        ..d()
    });
    assert!(e.contains("canceled"), "{e}");
}
