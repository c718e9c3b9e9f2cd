//! LogQL queries (`/loki/api/v1/query*`): any text parses or fails with a
//! position, and what parses evaluates over a small store, never a panic.
#![no_main]

use std::sync::OnceLock;

use capstan_logstore::logql::{self, ast::Expr, eval};
use capstan_logstore::{Direction, Entry, Labels, Options, Store};
use libfuzzer_sys::fuzz_target;

const T: i64 = 1_700_000_000_000_000_000;
const S: i64 = 1_000_000_000;

fn store() -> &'static Store {
    static ST: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    &ST.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (st, _) = Store::open(Options::new(dir.path())).unwrap();
        for (svc, line) in [
            ("web", "method=GET status=500 duration=12ms size=2KB"),
            ("api", r#"{"level":"error","latency_ms":7,"user":{"name":"x"}}"#),
        ] {
            let l = Labels::from_pairs([("service", svc), ("stream", "stdout")]);
            let entries = (0..20)
                .map(|i| Entry {
                    ts_ns: T + i * S,
                    line: line.to_owned(),
                    meta: vec![("trace_id".into(), format!("{i:032x}"))],
                    ..Entry::default()
                })
                .collect();
            st.append(&l, entries).unwrap();
        }
        (dir, st)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let Ok(q) = std::str::from_utf8(data) else { return };
    match logql::parse(q) {
        Ok(Expr::Metric(m)) => {
            let _ = eval::eval_metric(store(), &m, T, T + 30 * S, 5 * S);
        }
        Ok(Expr::Log(l)) => {
            let _ = eval::select_logs(store(), &l, T, T + 30 * S, 50, Direction::Backward);
        }
        Err(e) => assert!(e.at <= q.len()),
    }
});
