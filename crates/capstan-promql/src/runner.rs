//! Runs promqltest scripts against the engine and an in-memory store.

use capstan_tsdb::Labels;

use crate::engine::{Engine, EngineOptions};
use crate::mathx::almost_equal;
use crate::promqltest::{self, Command, Eval, Expected, Point, QueryKind, SeriesSpec};
use crate::storage::{MemPoint, MemStorage};
use crate::value::{Error, QueryOutput, QueryValue, Series};

/// Relative tolerance of value comparisons, as in Prometheus' runner.
const EPSILON: f64 = 1e-6;

/// The outcome of one script.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// `line: message` of each failed eval.
    pub failures: Vec<String>,
    /// `line: reason` of each skipped eval.
    pub skips: Vec<String>,
}

enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

/// The engine configured as Prometheus' own test suite runs it.
pub fn test_engine() -> Engine {
    Engine::new(EngineOptions {
        delayed_name_removal: true,
        ..EngineOptions::default()
    })
}

/// Runs a script's commands in order.
pub fn run(text: &str) -> Result<Report, promqltest::ScriptError> {
    let commands = promqltest::parse(text)?;
    let engine = test_engine();
    let mut store = MemStorage::new();
    let mut report = Report::default();
    for c in commands {
        match c {
            Command::Load {
                interval_ms,
                with_nhcb,
                series,
                ..
            } => load(&mut store, interval_ms, with_nhcb, &series),
            Command::Clear { .. } => store.clear(),
            Command::Eval(e) => match eval(&engine, &store, &e) {
                Outcome::Pass => report.passed += 1,
                Outcome::Fail(m) => {
                    report.failed += 1;
                    report
                        .failures
                        .push(format!("line {}: {}: {m}", e.line, e.expr));
                }
                Outcome::Skip(m) => {
                    report.skipped += 1;
                    report.skips.push(format!("line {}: {m}", e.line));
                }
            },
        }
    }
    Ok(report)
}

fn load(store: &mut MemStorage, interval: i64, with_nhcb: bool, series: &[SeriesSpec]) {
    for s in series {
        let labels = Labels::new(s.labels.clone());
        // A classic histogram loaded "with NHCB" also exists as a native histogram
        // series (name without `_bucket`, no `le`); only its presence is kept.
        let nhcb = (with_nhcb
            && labels.get("le").is_some()
            && labels
                .get("__name__")
                .is_some_and(|n| n.ends_with("_bucket")))
        .then(|| {
            let name = labels
                .get("__name__")
                .unwrap()
                .trim_end_matches("_bucket")
                .to_owned();
            labels.without(|n| n == "le").with("__name__", &name)
        });
        for (k, p) in s.points.iter().enumerate() {
            let t = k as i64 * interval;
            let mp = match p {
                Point::Float(v) => MemPoint::Float(*v),
                Point::Stale => MemPoint::Float(f64::from_bits(capstan_tsdb::STALE_NAN_BITS)),
                Point::Histogram(_) => MemPoint::Histogram,
                Point::Missing => continue,
            };
            store.add(&labels, t, mp);
            if let Some(h) = &nhcb {
                store.add(h, t, MemPoint::Histogram);
            }
        }
    }
}

fn expects_histograms(e: &Eval) -> bool {
    match &e.result {
        Expected::Series(s) => s
            .iter()
            .any(|s| s.points.iter().any(|p| matches!(p, Point::Histogram(_)))),
        Expected::Scalar(_) => false,
    }
}

fn eval(engine: &Engine, store: &MemStorage, e: &Eval) -> Outcome {
    if expects_histograms(e) {
        return Outcome::Skip("expects native histograms (not supported yet)".into());
    }
    let res = match e.query {
        QueryKind::Instant { at_ms } => engine.instant(store, &e.expr, at_ms),
        QueryKind::Range {
            start_ms,
            end_ms,
            step_ms,
        } => engine.range(store, &e.expr, start_ms, end_ms, step_ms),
    };
    let out = match res {
        Err(Error::Unsupported(m)) if m.contains("native histogram") => {
            return Outcome::Skip(m);
        }
        Err(err) => {
            if !e.expect.fail {
                return Outcome::Fail(format!("unexpected error: {err}"));
            }
            let msg = err.to_string();
            if let Some(want) = &e.expect.fail_msg {
                if *want != msg {
                    return Outcome::Fail(format!("error {msg:?}, expected {want:?}"));
                }
            }
            if let Some(re) = &e.expect.fail_regex {
                match regex::Regex::new(re) {
                    Ok(r) if r.is_match(&msg) => {}
                    _ => return Outcome::Fail(format!("error {msg:?} does not match /{re}/")),
                }
            }
            return Outcome::Pass;
        }
        Ok(o) => o,
    };
    if e.expect.fail {
        return Outcome::Fail(format!(
            "expected an error, got a {}",
            out.value.type_name()
        ));
    }
    if let Err(m) = check_annotations(e, &out) {
        return Outcome::Fail(m);
    }
    match compare(e, &out.value) {
        Ok(()) => Outcome::Pass,
        Err(m) => Outcome::Fail(m),
    }
}

fn check_annotations(e: &Eval, out: &QueryOutput) -> Result<(), String> {
    let x = &e.expect;
    if x.ordered && !x.warn && !x.info && !x.no_warn && !x.no_info {
        return Ok(());
    }
    if x.warn && out.warnings.is_empty() {
        return Err("expected warnings, got none".into());
    }
    if !x.warn && !out.warnings.is_empty() {
        return Err(format!("unexpected warnings: {:?}", out.warnings));
    }
    if x.info && out.infos.is_empty() {
        return Err("expected info annotations, got none".into());
    }
    if x.no_info && !out.infos.is_empty() {
        return Err(format!("unexpected info annotations: {:?}", out.infos));
    }
    Ok(())
}

fn expected_points(s: &SeriesSpec, start: i64, step: i64) -> Vec<(i64, f64)> {
    s.points
        .iter()
        .enumerate()
        .filter_map(|(k, p)| match p {
            Point::Float(v) => Some((start + k as i64 * step, *v)),
            Point::Stale => Some((
                start + k as i64 * step,
                f64::from_bits(capstan_tsdb::STALE_NAN_BITS),
            )),
            _ => None,
        })
        .collect()
}

fn compare(e: &Eval, got: &QueryValue) -> Result<(), String> {
    if let Some(want) = &e.expect.string {
        return match got {
            QueryValue::String(_, s) if s == want => Ok(()),
            other => Err(format!("expected string {want:?}, got {other:?}")),
        };
    }
    match (&e.result, got) {
        (Expected::Scalar(want), QueryValue::Scalar(_, v)) => {
            if almost_equal(*want, *v, EPSILON) {
                Ok(())
            } else {
                Err(format!("expected scalar {want}, got {v}"))
            }
        }
        (Expected::Scalar(want), other) => Err(format!(
            "expected scalar {want}, got a {}",
            other.type_name()
        )),
        (Expected::Series(want), QueryValue::Vector(got)) => {
            let got: Vec<(Labels, Vec<(i64, f64)>)> = got
                .iter()
                .map(|s| (s.labels.clone(), vec![(0, s.v)]))
                .collect();
            let want: Vec<(Labels, Vec<(i64, f64)>)> = want
                .iter()
                .map(|s| {
                    let pts = expected_points(s, 0, 0);
                    (
                        Labels::new(s.labels.clone()),
                        pts.into_iter().take(1).collect(),
                    )
                })
                .collect();
            compare_sets(&want, &got, e.expect.ordered)
        }
        (Expected::Series(want), QueryValue::Matrix(got)) => {
            let (start, step) = match (e.query.clone(), e.expect.range_vector) {
                (_, Some((s, _, st))) => (s, st),
                (
                    QueryKind::Range {
                        start_ms, step_ms, ..
                    },
                    None,
                ) => (start_ms, step_ms),
                (QueryKind::Instant { .. }, None) => {
                    return compare_matrix_loose(want, got);
                }
            };
            let want: Vec<(Labels, Vec<(i64, f64)>)> = want
                .iter()
                .map(|s| {
                    (
                        Labels::new(s.labels.clone()),
                        expected_points(s, start, step),
                    )
                })
                .collect();
            let got: Vec<(Labels, Vec<(i64, f64)>)> = got
                .iter()
                .map(|s| (s.labels.clone(), s.points.clone()))
                .collect();
            compare_sets(&want, &got, e.expect.ordered)
        }
        (Expected::Series(want), QueryValue::Scalar(_, v)) => {
            // A scalar written as a series without labels.
            match want.as_slice() {
                [s] if s.labels.is_empty() => match s.points.first() {
                    Some(Point::Float(w)) if almost_equal(*w, *v, EPSILON) => Ok(()),
                    _ => Err(format!("expected {:?}, got scalar {v}", s.points)),
                },
                _ => Err(format!("expected {} series, got scalar {v}", want.len())),
            }
        }
        (Expected::Series(_), QueryValue::String(_, s)) => {
            Err(format!("expected series, got string {s:?}"))
        }
    }
}

/// An instant query's range vector without stated timestamps: values in order.
fn compare_matrix_loose(want: &[SeriesSpec], got: &[Series]) -> Result<(), String> {
    let want: Vec<(Labels, Vec<(i64, f64)>)> = want
        .iter()
        .map(|s| {
            let pts = expected_points(s, 0, 0);
            (Labels::new(s.labels.clone()), pts)
        })
        .collect();
    let got: Vec<(Labels, Vec<(i64, f64)>)> = got
        .iter()
        .map(|s| {
            (
                s.labels.clone(),
                s.points.iter().map(|p| (0, p.1)).collect(),
            )
        })
        .collect();
    compare_sets(&want, &got, false)
}

fn points_equal(a: &[(i64, f64)], b: &[(i64, f64)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.0 == y.0
                && (almost_equal(x.1, y.1, EPSILON)
                    || (capstan_tsdb::is_stale(x.1) && capstan_tsdb::is_stale(y.1)))
        })
}

fn compare_sets(
    want: &[(Labels, Vec<(i64, f64)>)],
    got: &[(Labels, Vec<(i64, f64)>)],
    ordered: bool,
) -> Result<(), String> {
    let show = |v: &[(Labels, Vec<(i64, f64)>)]| {
        v.iter()
            .map(|(l, p)| format!("{l} {p:?}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if want.len() != got.len() {
        return Err(format!(
            "expected {} series, got {}: want [{}], got [{}]",
            want.len(),
            got.len(),
            show(want),
            show(got)
        ));
    }
    for (k, (wl, wp)) in want.iter().enumerate() {
        let found = if ordered {
            got.get(k).filter(|g| &g.0 == wl)
        } else {
            got.iter().find(|g| &g.0 == wl)
        };
        match found {
            None => {
                return Err(format!(
                    "series {wl} not found{}: got [{}]",
                    if ordered { " at its position" } else { "" },
                    show(got)
                ));
            }
            Some((_, gp)) if !points_equal(wp, gp) => {
                return Err(format!("{wl}: expected {wp:?}, got {gp:?}"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
