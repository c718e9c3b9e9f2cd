//! `capstan test rules FILE…`: runs `promtool test rules` files unchanged.
//! Each test loads its `input_series` (the expanding notation: `0+10x5`,
//! `_`, `stale`) into memory, evaluates the rule files' groups every
//! `evaluation_interval` from 0 to the last time any check needs, and
//! compares the firing alerts (`alert_rule_test`) and expression results
//! (`promql_expr_test`) with what is expected.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use capstan_promql::promqltest::{Point, parse_points, parse_selector};
use capstan_promql::{MemPoint, MemStorage};
use capstan_tsdb::Labels;

use super::group::GroupState;
use super::rule::{AlertState, LabelMap};
use crate::spec::parse_duration;
use crate::spec::yaml::{self, Kind, Node};

/// Most samples a test may load or evaluate up to.
const MAX_STEPS: i64 = 1_000_000;

fn field<'n>(n: &'n Node, key: &str) -> Option<&'n Node> {
    match &n.kind {
        Kind::Map(m) => m
            .iter()
            .find(|(k, _)| k.scalar_text().as_deref() == Some(key))
            .map(|x| &x.1),
        _ => None,
    }
}

fn text(n: Option<&Node>) -> Option<String> {
    n.and_then(Node::scalar_text)
}

fn items(n: Option<&Node>) -> &[Node] {
    match n.map(|n| &n.kind) {
        Some(Kind::Seq(s)) => s,
        _ => &[],
    }
}

fn dur(n: Option<&Node>, default: Duration) -> Result<Duration, String> {
    match text(n) {
        Some(t) => parse_duration(&t),
        None => Ok(default),
    }
}

fn pairs(n: Option<&Node>) -> LabelMap {
    match n.map(|n| &n.kind) {
        Some(Kind::Map(m)) => m
            .iter()
            .filter_map(|(k, v)| Some((k.scalar_text()?, v.scalar_text()?)))
            .collect(),
        _ => LabelMap::new(),
    }
}

fn labels_of(sel: &str) -> Result<LabelMap, String> {
    Ok(parse_selector(sel.trim())?.into_iter().collect())
}

/// One test file's outcome: the failures, in promtool's words.
pub struct Outcome {
    pub failures: Vec<String>,
}

/// Runs one test file.
pub fn run_file(path: &Path) -> Result<Outcome, String> {
    let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let root = yaml::parse(&src)
        .map_err(|e| format!("{}:{}: {}", path.display(), e.pos.line, e.message))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let eval_iv = dur(field(&root, "evaluation_interval"), Duration::from_secs(60))?;
    let mut groups = Vec::new();
    for f in items(field(&root, "rule_files")) {
        let name = f.scalar_text().unwrap_or_default();
        let p = if Path::new(&name).is_absolute() {
            Path::new(&name).to_path_buf()
        } else {
            dir.join(&name)
        };
        let files = super::file::glob(&p);
        if files.is_empty() {
            return Err(format!("{}: no rule file matches {name}", path.display()));
        }
        for f in files {
            let gs = super::file::load(&f).map_err(|ps| {
                ps.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
            groups.extend(gs);
        }
    }
    let mut failures = Vec::new();
    for (i, t) in items(field(&root, "tests")).iter().enumerate() {
        let name = text(field(t, "name")).unwrap_or_default();
        for f in run_test(t, &groups, eval_iv).map_err(|e| format!("tests[{i}]: {e}"))? {
            failures.push(if name.is_empty() {
                format!("    {f}")
            } else {
                format!("    name: {name},\n    {f}")
            });
        }
    }
    Ok(Outcome { failures })
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

fn run_test(
    t: &Node,
    groups: &[super::file::Group],
    eval_iv: Duration,
) -> Result<Vec<String>, String> {
    let interval = dur(field(t, "interval"), eval_iv)?;
    let external = pairs(field(t, "external_labels"));
    let mut store = MemStorage::new();
    for s in items(field(t, "input_series")) {
        let sel = text(field(s, "series")).ok_or("input_series: series is missing")?;
        let labels = Labels::new(labels_of(&sel)?.into_iter().collect());
        let points = parse_points(&text(field(s, "values")).unwrap_or_default())?;
        if points.len() as i64 > MAX_STEPS {
            return Err(format!("{sel}: more than {MAX_STEPS} samples"));
        }
        for (i, p) in points.into_iter().enumerate() {
            let at = i as i64 * ms(interval);
            match p {
                Point::Float(v) => store.add(&labels, at, MemPoint::Float(v)),
                Point::Stale => store.add(
                    &labels,
                    at,
                    MemPoint::Float(f64::from_bits(capstan_tsdb::STALE_NAN_BITS)),
                ),
                Point::Missing => {}
                Point::Histogram(_) => store.add(&labels, at, MemPoint::Histogram),
            }
        }
    }
    // Alert checks by time, and the last time anything is checked.
    let mut alert_tests: BTreeMap<i64, Vec<&Node>> = BTreeMap::new();
    for a in items(field(t, "alert_rule_test")) {
        let at = ms(dur(field(a, "eval_time"), Duration::ZERO)?);
        alert_tests.entry(at).or_default().push(a);
    }
    let expr_tests = items(field(t, "promql_expr_test"));
    let mut last = alert_tests.keys().max().copied().unwrap_or(0);
    for e in expr_tests {
        last = last.max(ms(dur(field(e, "eval_time"), Duration::ZERO)?));
    }
    if last / ms(eval_iv).max(1) > MAX_STEPS {
        return Err(format!(
            "evaluating up to {last} ms is more than {MAX_STEPS} steps"
        ));
    }
    let engine = capstan_promql::runner::test_engine();
    let mut states: Vec<GroupState> = groups.iter().map(|g| GroupState::new(g, eval_iv)).collect();
    let mut failures = Vec::new();
    let mut at = 0;
    while at <= last {
        for g in &mut states {
            evaluate_group(g, at, &engine, &mut store, &external);
        }
        if let Some(tests) = alert_tests.get(&at) {
            for a in tests {
                failures.extend(check_alerts(a, at, &states));
            }
        }
        at += ms(eval_iv).max(1);
    }
    for e in expr_tests {
        failures.extend(check_expr(e, &engine, &store)?);
    }
    Ok(failures)
}

/// Evaluates a group at `t`, each rule's output stored before the next runs.
fn evaluate_group(
    g: &mut GroupState,
    t: i64,
    engine: &capstan_promql::Engine,
    store: &mut MemStorage,
    external: &LabelMap,
) {
    let limit = g.limit;
    for r in &mut g.rules {
        if let Some(q) = &r.rule.recover_expr {
            r.recovered = engine
                .instant(&*store, q, t)
                .map(|o| {
                    super::manager::samples(o.value)
                        .into_iter()
                        .map(|(l, _)| l)
                        .collect()
                })
                .unwrap_or_default();
        }
        let result = engine
            .instant(&*store, &r.rule.expr, t)
            .map(|o| super::manager::samples(o.value))
            .map_err(|e| e.to_string());
        let view = &*store;
        let in_templates = |q: &str| {
            engine
                .instant(view, q, t)
                .map(|o| super::manager::samples(o.value))
                .map_err(|e| e.to_string())
        };
        let (written, _) = r.apply_with(t, result, external, limit, Some(&in_templates));
        for (l, v) in written {
            store.add(&Labels::new(l.into_iter().collect()), t, MemPoint::Float(v));
        }
    }
}

fn fmt_labels(l: &LabelMap) -> String {
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

fn check_alerts(a: &Node, at: i64, states: &[GroupState]) -> Vec<String> {
    let name = text(field(a, "alertname")).unwrap_or_default();
    let mut exp: Vec<(LabelMap, LabelMap)> = items(field(a, "exp_alerts"))
        .iter()
        .map(|x| {
            let mut l = pairs(field(x, "exp_labels"));
            l.insert("alertname".into(), name.clone());
            (l, pairs(field(x, "exp_annotations")))
        })
        .collect();
    let mut got: Vec<(LabelMap, LabelMap)> = states
        .iter()
        .flat_map(|g| g.rules.iter())
        .filter(|r| r.rule.name() == name)
        .flat_map(|r| r.active.values())
        .filter(|x| x.state == AlertState::Firing)
        .map(|x| (x.labels.clone(), x.annotations.clone()))
        .collect();
    exp.sort();
    got.sort();
    if exp == got {
        return Vec::new();
    }
    let show = |v: &[(LabelMap, LabelMap)]| {
        if v.is_empty() {
            return "[]".to_owned();
        }
        let parts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, (l, a))| {
                format!(
                    "{i}:\n            Labels:{}\n            Annotations:{}",
                    fmt_labels(l),
                    fmt_labels(a)
                )
            })
            .collect();
        format!(
            "[\n            {}\n            ]",
            parts.join("\n            ")
        )
    };
    vec![format!(
        "alertname: {name}, time: {}, \n        exp:{}, \n        got:{}",
        crate::spec::Dur(Duration::from_millis(at as u64)),
        show(&exp),
        show(&got)
    )]
}

fn check_expr(
    e: &Node,
    engine: &capstan_promql::Engine,
    store: &MemStorage,
) -> Result<Vec<String>, String> {
    let expr = text(field(e, "expr")).unwrap_or_default();
    let at = ms(dur(field(e, "eval_time"), Duration::ZERO)?);
    let mut exp: Vec<(LabelMap, f64)> = Vec::new();
    for s in items(field(e, "exp_samples")) {
        let l = labels_of(&text(field(s, "labels")).unwrap_or_default())?;
        let v = match field(s, "value").map(|n| &n.kind) {
            Some(Kind::Int(i)) => *i as f64,
            Some(Kind::Float(f)) => *f,
            Some(Kind::Str(t)) => t.parse().map_err(|_| format!("{expr}: bad value {t:?}"))?,
            _ => 0.0,
        };
        exp.push((l, v));
    }
    let got = match engine.instant(store, &expr, at) {
        Ok(o) => {
            let mut v: Vec<(LabelMap, f64)> = match o.value {
                capstan_promql::QueryValue::Vector(s) => s
                    .into_iter()
                    .map(|x| {
                        (
                            x.labels
                                .iter()
                                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                                .collect(),
                            x.v,
                        )
                    })
                    .collect(),
                capstan_promql::QueryValue::Scalar(_, v) => vec![(LabelMap::new(), v)],
                _ => Vec::new(),
            };
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        }
        Err(err) => {
            return Ok(vec![format!(
                "expr: {expr:?}, time: {}, err: {err}",
                crate::spec::Dur(Duration::from_millis(at as u64))
            )]);
        }
    };
    exp.sort_by(|a, b| a.0.cmp(&b.0));
    let same = exp.len() == got.len()
        && exp.iter().zip(&got).all(|(a, b)| {
            a.0 == b.0
                && ((a.1 - b.1).abs() <= 1e-9 * a.1.abs().max(1.0)
                    || (a.1.is_nan() && b.1.is_nan()))
        });
    if same {
        return Ok(Vec::new());
    }
    let show = |v: &[(LabelMap, f64)]| {
        v.iter()
            .map(|(l, x)| format!("{} {x}", fmt_labels(l)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Ok(vec![format!(
        "expr: {expr:?}, time: {},\n        exp: [{}]\n        got: [{}]",
        crate::spec::Dur(Duration::from_millis(at as u64)),
        show(&exp),
        show(&got)
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
groups:
  - name: g
    rules:
      - record: job:up:sum
        expr: sum by (job) (up)
      - alert: InstanceDown
        expr: up == 0
        for: 5m
        labels: {severity: page}
        annotations:
          summary: "{{ $labels.instance }} of {{ $labels.job }} is down"
"#;

    const TESTS: &str = r#"
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="api", instance="a"}'
        values: '1 1 0x10'
      - series: 'up{job="api", instance="b"}'
        values: '1+0x12'
    alert_rule_test:
      - eval_time: 5m
        alertname: InstanceDown
      - eval_time: 8m
        alertname: InstanceDown
        exp_alerts:
          - exp_labels: {severity: page, instance: a, job: api}
            exp_annotations: {summary: "a of api is down"}
    promql_expr_test:
      - expr: job:up:sum
        eval_time: 3m
        exp_samples:
          - labels: 'job:up:sum{job="api"}'
            value: 1
"#;

    fn files(tests: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("rules.yml"), RULES).unwrap();
        std::fs::write(d.path().join("test.yml"), tests).unwrap();
        d
    }

    #[test]
    fn a_promtool_test_file_passes() {
        let d = files(TESTS);
        let o = run_file(&d.path().join("test.yml")).unwrap();
        assert!(o.failures.is_empty(), "{}", o.failures.join("\n"));
    }

    #[test]
    fn a_wrong_expectation_fails_with_both_sides() {
        let d = files(
            &TESTS
                .replace("value: 1\n", "value: 2\n")
                .replace("eval_time: 8m", "eval_time: 6m"),
        );
        let o = run_file(&d.path().join("test.yml")).unwrap();
        assert_eq!(o.failures.len(), 2, "{}", o.failures.join("\n"));
        assert!(
            o.failures[0].contains("alertname: InstanceDown, time: 6m"),
            "{}",
            o.failures[0]
        );
        assert!(o.failures[0].contains("got:[]"), "{}", o.failures[0]);
        assert!(
            o.failures[1].contains("exp: [{__name__=\"job:up:sum\", job=\"api\"} 2]"),
            "{}",
            o.failures[1]
        );
    }
}
