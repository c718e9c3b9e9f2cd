//! Evaluating LogQL over a [`Store`]: log queries return streams of lines (after
//! the pipeline), metric queries return series of points at each step.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::ast::*;
use super::pipeline::{self, ERROR, LabelMap};
use crate::{Direction, Error, Query, Store};

/// Lines of one label set, as a log query returns them.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub labels: LabelMap,
    /// (Unix ns, line), in the query's direction.
    pub entries: Vec<(i64, String)>,
}

/// Points of one label set.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: LabelMap,
    /// (Unix ns, value), ascending.
    pub points: Vec<(i64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(Vec<(i64, f64)>),
    Vector(Vec<Series>),
}

/// Hard limits a metric query must stay within.
pub const MAX_SERIES: usize = 50_000;
pub const MAX_STEPS: usize = 11_000;
/// Most points (series × steps) in a metric query's result.
pub const MAX_POINTS: usize = 10_000_000;
/// Memory the samples a metric query reads may take (16 bytes each, plus each
/// series' labels), checked while reading.
pub const MAX_SAMPLE_BYTES: usize = 1 << 30;

/// The limits a metric query is evaluated under (defaults: the constants above,
/// no deadline).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_series: usize,
    pub max_steps: usize,
    pub max_points: usize,
    pub max_sample_bytes: usize,
    /// The query stops with an error once this passes.
    pub deadline: Option<std::time::Instant>,
    /// Set by the caller to stop the query (its client went away).
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_series: MAX_SERIES,
            max_steps: MAX_STEPS,
            max_points: MAX_POINTS,
            max_sample_bytes: MAX_SAMPLE_BYTES,
            deadline: None,
            cancel: None,
        }
    }
}

impl Limits {
    /// Why the query must stop now, if it must.
    fn stopped(&self) -> Option<EvalError> {
        if self.deadline.is_some_and(|d| std::time::Instant::now() > d) {
            return Some(EvalError::Stopped("the query timed out".into()));
        }
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Some(EvalError::Stopped("the query was canceled".into()));
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Store(#[from] Error),
    #[error("{0}")]
    Limit(String),
    /// The deadline passed or the caller canceled.
    #[error("{0}")]
    Stopped(String),
}

fn query_of<'a>(
    from_ns: i64,
    to_ns: i64,
    contains: &'a [Vec<u8>],
    pred: &'a dyn Fn(&crate::Labels) -> bool,
) -> Query<'a> {
    Query {
        from_ns,
        to_ns,
        streams: pred,
        contains,
        after_seq: 0,
        meta: &[],
    }
}

/// A line that passed a log query's pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub ts_ns: i64,
    pub seq: u64,
    /// The stream's labels as stored, and the labels after the pipeline.
    pub stream: Arc<crate::Labels>,
    pub labels: LabelMap,
    pub line: String,
}

/// Which entries a log selection reads, besides its query.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// `[from_ns, to_ns)`, Unix nanoseconds.
    pub from_ns: i64,
    pub to_ns: i64,
    /// Only entries with a sequence number above `after_seq` and at most `max_seq`
    /// (a tail's cursor and the point its history ends).
    pub after_seq: u64,
    pub max_seq: u64,
}

impl Window {
    pub fn time(from_ns: i64, to_ns: i64) -> Window {
        Window {
            from_ns,
            to_ns,
            after_seq: 0,
            max_seq: u64::MAX,
        }
    }
}

/// Up to `limit` lines of the window that pass the pipeline, newest first
/// (`Backward`) or oldest first, by time then sequence number.
pub fn select_lines(
    store: &Store,
    e: &LogExpr,
    w: Window,
    limit: usize,
    dir: Direction,
) -> Result<Vec<Line>, Error> {
    let contains = e.required_substrings();
    let pred = |l: &crate::Labels| pipeline::selects(&e.selector, l);
    let q = Query {
        after_seq: w.after_seq,
        ..query_of(w.from_ns, w.to_ns, &contains, &pred)
    };
    store.select_map(
        &q,
        dir,
        limit,
        |l, en| {
            if en.seq > w.max_seq {
                return None;
            }
            pipeline::run(e, &l, &en.meta, &en.line, en.ts_ns).map(|mut o| {
                o.labels.remove("__error_details__");
                Line {
                    ts_ns: en.ts_ns,
                    seq: en.seq,
                    stream: l.clone(),
                    labels: o.labels,
                    line: o.line,
                }
            })
        },
        |k| (k.ts_ns, k.seq),
    )
}

/// Lines grouped by their labels after the pipeline, each group in the
/// order given.
pub fn group(lines: Vec<Line>) -> Vec<Stream> {
    let mut streams: BTreeMap<LabelMap, Vec<(i64, String)>> = BTreeMap::new();
    for l in lines {
        streams.entry(l.labels).or_default().push((l.ts_ns, l.line));
    }
    streams
        .into_iter()
        .map(|(labels, entries)| Stream { labels, entries })
        .collect()
}

/// Up to `limit` lines of `[from_ns, to_ns)` that pass the pipeline, newest
/// first (`Backward`) or oldest first, grouped by their labels after it.
pub fn select_logs(
    store: &Store,
    e: &LogExpr,
    from_ns: i64,
    to_ns: i64,
    limit: usize,
    dir: Direction,
) -> Result<Vec<Stream>, Error> {
    Ok(group(select_lines(
        store,
        e,
        Window::time(from_ns, to_ns),
        limit,
        dir,
    )?))
}

/// Evaluates a metric query at `start, start+step, …, end` (one point for an
/// instant query: `start == end`).
pub fn eval_metric(
    store: &Store,
    m: &MetricExpr,
    start_ns: i64,
    end_ns: i64,
    step_ns: i64,
) -> Result<Value, EvalError> {
    eval_metric_limited(store, m, start_ns, end_ns, step_ns, &Limits::default())
}

/// [`eval_metric`] under other limits.
pub fn eval_metric_limited(
    store: &Store,
    m: &MetricExpr,
    start_ns: i64,
    end_ns: i64,
    step_ns: i64,
    limits: &Limits,
) -> Result<Value, EvalError> {
    let step_ns = step_ns.max(1);
    let steps = (end_ns.saturating_sub(start_ns) / step_ns)
        .saturating_add(1)
        .max(1) as u64;
    if steps > limits.max_steps as u64 {
        return Err(EvalError::Limit(format!(
            "{steps} steps is more than {}: use a larger step or a shorter range",
            limits.max_steps
        )));
    }
    let times: Vec<i64> = (0..steps as i64).map(|i| start_ns + i * step_ns).collect();
    eval(store, m, &times, limits)
}

fn eval(store: &Store, m: &MetricExpr, times: &[i64], limits: &Limits) -> Result<Value, EvalError> {
    match m {
        MetricExpr::Number(v) => Ok(Value::Scalar(times.iter().map(|t| (*t, *v)).collect())),
        MetricExpr::Range {
            func,
            param,
            log,
            range_ns,
            offset_ns,
            grouping,
        } => range(
            store,
            *func,
            *param,
            log,
            *range_ns,
            *offset_ns,
            grouping.as_ref(),
            times,
            limits,
        ),
        MetricExpr::Agg {
            op,
            param,
            grouping,
            inner,
        } => {
            // `sum by (…)` of a count, rate, byte count or sum per series is the
            // same function over each group's lines: group while reading, so
            // high-cardinality labels (ids in structured metadata) never
            // become series.
            if *op == AggOp::Sum
                && let MetricExpr::Range {
                    func,
                    param,
                    log,
                    range_ns,
                    offset_ns,
                    grouping: None,
                } = &**inner
                && matches!(
                    func,
                    RangeFn::CountOverTime
                        | RangeFn::Rate
                        | RangeFn::BytesOverTime
                        | RangeFn::BytesRate
                        | RangeFn::SumOverTime
                )
            {
                let all = Grouping::By(Vec::new());
                return range(
                    store,
                    *func,
                    *param,
                    log,
                    *range_ns,
                    *offset_ns,
                    Some(grouping.as_ref().unwrap_or(&all)),
                    times,
                    limits,
                );
            }
            let v = eval(store, inner, times, limits)?;
            let Value::Vector(series) = v else {
                return Ok(v);
            };
            Ok(Value::Vector(aggregate(
                *op,
                *param,
                grouping.as_ref(),
                series,
                times,
            )))
        }
        MetricExpr::Binary {
            op,
            bool_modifier,
            lhs,
            rhs,
        } => {
            let l = eval(store, lhs, times, limits)?;
            let r = eval(store, rhs, times, limits)?;
            Ok(binary(*op, *bool_modifier, l, r))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn range(
    store: &Store,
    func: RangeFn,
    param: Option<f64>,
    log: &LogExpr,
    range_ns: i64,
    offset_ns: i64,
    grouping: Option<&Grouping>,
    times: &[i64],
    limits: &Limits,
) -> Result<Value, EvalError> {
    let first = times[0] - offset_ns - range_ns;
    let last = times[times.len() - 1] - offset_ns;
    let contains = log.required_substrings();
    let pred = |l: &crate::Labels| pipeline::selects(&log.selector, l);
    // Windows are (t - range, t]: read [first + 1, last + 1).
    let q = query_of(first + 1, last + 1, &contains, &pred);
    let unwrap =
        func.needs_unwrap() || log.stages.iter().any(|s| matches!(s, Stage::Unwrap { .. }));
    let mut samples: BTreeMap<LabelMap, Vec<(i64, f64)>> = BTreeMap::new();
    let mut too_many = false;
    let mut held = 0usize;
    let mut stop = None;
    store.visit(&q, Direction::Forward, &mut |_, batch| {
        stop = limits.stopped();
        if stop.is_some() {
            return false;
        }
        for (l, en) in batch {
            let Some(o) = pipeline::run(log, &l, &en.meta, &en.line, en.ts_ns) else {
                continue;
            };
            let value = if unwrap {
                if o.labels.contains_key(ERROR) {
                    continue;
                }
                match o.value {
                    Some(v) => v,
                    None => continue,
                }
            } else if matches!(func, RangeFn::BytesOverTime | RangeFn::BytesRate) {
                o.line.len() as f64
            } else {
                1.0
            };
            let mut labels = o.labels;
            labels.remove("__error_details__");
            let labels = match grouping {
                Some(g) => group_labels(&labels, g),
                None => labels,
            };
            held += 16;
            if !samples.contains_key(&labels) {
                if samples.len() >= limits.max_series {
                    too_many = true;
                    return false;
                }
                held += 64
                    + labels
                        .iter()
                        .map(|(k, v)| 48 + k.len() + v.len())
                        .sum::<usize>();
            }
            if held > limits.max_sample_bytes {
                return false;
            }
            samples.entry(labels).or_default().push((en.ts_ns, value));
        }
        true
    })?;
    if let Some(e) = stop {
        return Err(e);
    }
    if too_many {
        return Err(EvalError::Limit(format!(
            "the query makes more than {} series: narrow the selector or aggregate with sum by (…)",
            limits.max_series
        )));
    }
    if held > limits.max_sample_bytes {
        return Err(EvalError::Limit(format!(
            "the query reads more than {} MiB of samples: narrow the selector or the time range",
            limits.max_sample_bytes >> 20
        )));
    }
    if func == RangeFn::AbsentOverTime {
        let labels: LabelMap = log
            .selector
            .iter()
            .filter(|m| m.op == MatchOp::Eq)
            .map(|m| (m.name.clone(), m.value.clone()))
            .collect();
        let mut all: Vec<i64> = samples.values().flatten().map(|(t, _)| *t).collect();
        all.sort_unstable();
        let points = times
            .iter()
            .filter(|t| {
                let (lo, hi) = (**t - offset_ns - range_ns, **t - offset_ns);
                let i = all.partition_point(|x| *x <= lo);
                !(i < all.len() && all[i] <= hi)
            })
            .map(|t| (*t, 1.0))
            .collect::<Vec<_>>();
        return Ok(Value::Vector(if points.is_empty() {
            vec![]
        } else {
            vec![Series { labels, points }]
        }));
    }
    let secs = range_ns as f64 / 1e9;
    let mut out = Vec::new();
    let mut points_out = 0usize;
    let mut work = 0usize;
    for (labels, mut pts) in samples {
        if let Some(e) = limits.stopped() {
            return Err(e);
        }
        pts.sort_by_key(|p| p.0);
        let mut points = Vec::new();
        for t in times {
            let (lo, hi) = (*t - offset_ns - range_ns, *t - offset_ns);
            let a = pts.partition_point(|p| p.0 <= lo);
            let b = pts.partition_point(|p| p.0 <= hi);
            if a >= b {
                continue;
            }
            // A window's work is its size: check the clock every so often.
            work += b - a;
            if work > 1 << 20 {
                work = 0;
                if let Some(e) = limits.stopped() {
                    return Err(e);
                }
            }
            let w = &pts[a..b];
            let vals = || w.iter().map(|p| p.1);
            let n = w.len() as f64;
            let sum: f64 = vals().sum();
            let v = match func {
                RangeFn::CountOverTime => n,
                RangeFn::Rate => sum / secs,
                RangeFn::BytesOverTime => sum,
                RangeFn::BytesRate => sum / secs,
                RangeFn::SumOverTime => sum,
                RangeFn::AvgOverTime => sum / n,
                RangeFn::MinOverTime => vals().fold(f64::INFINITY, f64::min),
                RangeFn::MaxOverTime => vals().fold(f64::NEG_INFINITY, f64::max),
                RangeFn::FirstOverTime => w[0].1,
                RangeFn::LastOverTime => w[w.len() - 1].1,
                RangeFn::StdvarOverTime | RangeFn::StddevOverTime => {
                    let mean = sum / n;
                    let var = vals().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
                    if func == RangeFn::StdvarOverTime {
                        var
                    } else {
                        var.sqrt()
                    }
                }
                RangeFn::QuantileOverTime => {
                    let mut v: Vec<f64> = vals().collect();
                    v.sort_by(f64::total_cmp);
                    quantile(param.unwrap_or(0.5), &v)
                }
                RangeFn::RateCounter => {
                    let mut inc = 0.0;
                    for p in w.windows(2) {
                        inc += if p[1].1 >= p[0].1 {
                            p[1].1 - p[0].1
                        } else {
                            p[1].1
                        };
                    }
                    inc / secs
                }
                RangeFn::AbsentOverTime => unreachable!("handled above"),
            };
            points.push((*t, v));
        }
        points_out += points.len();
        if points_out > limits.max_points {
            return Err(EvalError::Limit(format!(
                "the query's result has more than {} points: use a larger step, a shorter range or aggregate with sum by (…)",
                limits.max_points
            )));
        }
        if !points.is_empty() {
            out.push(Series { labels, points });
        }
    }
    Ok(Value::Vector(out))
}

/// Prometheus' quantile: linear interpolation between closest ranks.
fn quantile(q: f64, sorted: &[f64]) -> f64 {
    if sorted.is_empty() || q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let w = rank - lo as f64;
    sorted[lo] * (1.0 - w) + sorted[hi] * w
}

fn group_labels(l: &LabelMap, g: &Grouping) -> LabelMap {
    match g {
        Grouping::By(names) => l
            .iter()
            .filter(|(k, _)| names.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Grouping::Without(names) => l
            .iter()
            .filter(|(k, _)| !names.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn aggregate(
    op: AggOp,
    param: Option<f64>,
    grouping: Option<&Grouping>,
    series: Vec<Series>,
    times: &[i64],
) -> Vec<Series> {
    let key = |l: &LabelMap| grouping.map_or_else(LabelMap::new, |g| group_labels(l, g));
    match op {
        AggOp::Topk | AggOp::Bottomk => {
            let k = param.unwrap_or(1.0) as usize;
            let mut keep: Vec<Vec<(i64, f64)>> = vec![Vec::new(); series.len()];
            for t in times {
                let mut groups: BTreeMap<LabelMap, Vec<(usize, f64)>> = BTreeMap::new();
                for (i, s) in series.iter().enumerate() {
                    if let Some(p) = s.points.iter().find(|p| p.0 == *t) {
                        groups.entry(key(&s.labels)).or_default().push((i, p.1));
                    }
                }
                for (_, mut members) in groups {
                    members.sort_by(|a, b| {
                        if op == AggOp::Topk {
                            b.1.total_cmp(&a.1)
                        } else {
                            a.1.total_cmp(&b.1)
                        }
                    });
                    for (i, v) in members.into_iter().take(k) {
                        keep[i].push((*t, v));
                    }
                }
            }
            series
                .into_iter()
                .zip(keep)
                .filter(|(_, p)| !p.is_empty())
                .map(|(s, points)| Series {
                    labels: s.labels,
                    points,
                })
                .collect()
        }
        AggOp::Sort | AggOp::SortDesc => {
            let mut s = series;
            let last = |x: &Series| x.points.last().map_or(f64::NAN, |p| p.1);
            s.sort_by(|a, b| {
                let c = last(a).total_cmp(&last(b));
                if op == AggOp::Sort { c } else { c.reverse() }
            });
            s
        }
        _ => {
            let mut groups: BTreeMap<LabelMap, BTreeMap<i64, Vec<f64>>> = BTreeMap::new();
            for s in &series {
                let g = groups.entry(key(&s.labels)).or_default();
                for (t, v) in &s.points {
                    g.entry(*t).or_default().push(*v);
                }
            }
            groups
                .into_iter()
                .map(|(labels, pts)| Series {
                    labels,
                    points: pts
                        .into_iter()
                        .map(|(t, v)| {
                            let n = v.len() as f64;
                            let sum: f64 = v.iter().sum();
                            let x = match op {
                                AggOp::Sum => sum,
                                AggOp::Avg => sum / n,
                                AggOp::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
                                AggOp::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                                AggOp::Count => n,
                                AggOp::Stdvar | AggOp::Stddev => {
                                    let mean = sum / n;
                                    let var =
                                        v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
                                    if op == AggOp::Stdvar { var } else { var.sqrt() }
                                }
                                _ => unreachable!("handled above"),
                            };
                            (t, x)
                        })
                        .collect(),
                })
                .collect()
        }
    }
}

fn apply(op: BinOp, a: f64, b: f64, bool_modifier: bool) -> Option<f64> {
    let cmp = |c: bool| {
        if bool_modifier {
            Some(if c { 1.0 } else { 0.0 })
        } else {
            c.then_some(a)
        }
    };
    match op {
        BinOp::Add => Some(a + b),
        BinOp::Sub => Some(a - b),
        BinOp::Mul => Some(a * b),
        BinOp::Div => Some(a / b),
        BinOp::Mod => Some(a % b),
        BinOp::Pow => Some(a.powf(b)),
        BinOp::Eq => cmp(a == b),
        BinOp::Ne => cmp(a != b),
        BinOp::Gt => cmp(a > b),
        BinOp::Ge => cmp(a >= b),
        BinOp::Lt => cmp(a < b),
        BinOp::Le => cmp(a <= b),
        BinOp::And | BinOp::Or | BinOp::Unless => Some(a),
    }
}

fn binary(op: BinOp, bool_modifier: bool, l: Value, r: Value) -> Value {
    let map_series = |s: Vec<Series>, f: &dyn Fn(i64, f64) -> Option<f64>| -> Vec<Series> {
        s.into_iter()
            .map(|s| Series {
                labels: s.labels,
                points: s
                    .points
                    .into_iter()
                    .filter_map(|(t, v)| f(t, v).map(|x| (t, x)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let at = |sc: &[(i64, f64)], t: i64| sc.iter().find(|p| p.0 == t).map_or(f64::NAN, |p| p.1);
    match (l, r) {
        (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(
            a.iter()
                .filter_map(|(t, x)| apply(op, *x, at(&b, *t), true).map(|v| (*t, v)))
                .collect(),
        ),
        (Value::Vector(s), Value::Scalar(b)) => Value::Vector(map_series(s, &|t, x| {
            apply(op, x, at(&b, t), bool_modifier)
        })),
        (Value::Scalar(a), Value::Vector(s)) => Value::Vector(map_series(s, &|t, x| {
            apply(op, at(&a, t), x, bool_modifier).map(|v| {
                if op.is_comparison() && !bool_modifier {
                    x
                } else {
                    v
                }
            })
        })),
        (Value::Vector(a), Value::Vector(b)) => {
            let rhs: BTreeMap<&LabelMap, &Series> = b.iter().map(|s| (&s.labels, s)).collect();
            let mut out = Vec::new();
            match op {
                BinOp::Or => {
                    let lhs_labels: Vec<LabelMap> = a.iter().map(|s| s.labels.clone()).collect();
                    out.extend(a.iter().cloned());
                    out.extend(
                        b.iter()
                            .filter(|s| !lhs_labels.contains(&s.labels))
                            .cloned(),
                    );
                }
                BinOp::And | BinOp::Unless => {
                    for s in &a {
                        let other = rhs.get(&s.labels);
                        let points: Vec<(i64, f64)> = s
                            .points
                            .iter()
                            .filter(|(t, _)| {
                                let present =
                                    other.is_some_and(|o| o.points.iter().any(|p| p.0 == *t));
                                present == (op == BinOp::And)
                            })
                            .copied()
                            .collect();
                        if !points.is_empty() {
                            out.push(Series {
                                labels: s.labels.clone(),
                                points,
                            });
                        }
                    }
                }
                _ => {
                    for s in &a {
                        let Some(o) = rhs.get(&s.labels) else {
                            continue;
                        };
                        let points: Vec<(i64, f64)> = s
                            .points
                            .iter()
                            .filter_map(|(t, x)| {
                                let y = o.points.iter().find(|p| p.0 == *t)?.1;
                                apply(op, *x, y, bool_modifier).map(|v| (*t, v))
                            })
                            .collect();
                        if !points.is_empty() {
                            out.push(Series {
                                labels: s.labels.clone(),
                                points,
                            });
                        }
                    }
                }
            }
            Value::Vector(out)
        }
    }
}

impl BinOp {
    fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Gt | BinOp::Ge | BinOp::Lt | BinOp::Le
        )
    }
}
