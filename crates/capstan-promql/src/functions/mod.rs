//! PromQL functions: dispatch, and the functions of instant vectors and scalars.
//! Range-vector functions live in [`range`], classic histograms in [`histogram`],
//! label and date functions in [`labels`] and [`date`].

mod date;
mod histogram;
mod labels;
pub(crate) mod range;

use capstan_tsdb::Labels;
use promql_parser::parser::{Call, Expr};

use crate::engine::{Ev, matcher_sets};
use crate::mathx::{max_nan, min_nan};
use crate::value::{Error, Series, Value, exec};
use range::Window;

/// Every function this engine evaluates, with its fewest and most arguments
/// (`usize::MAX`: variadic). The parser knows functions of newer Prometheus
/// versions too; a call to one not listed here is refused before evaluation.
const FUNCTIONS: &[(&[&str], usize, usize)] = &[
    (&["time", "pi"], 0, 0),
    (
        &[
            "vector",
            "scalar",
            "timestamp",
            "abs",
            "ceil",
            "floor",
            "exp",
            "sqrt",
            "ln",
            "log2",
            "log10",
            "sgn",
            "sin",
            "cos",
            "tan",
            "asin",
            "acos",
            "atan",
            "sinh",
            "cosh",
            "tanh",
            "asinh",
            "acosh",
            "atanh",
            "deg",
            "rad",
            "sort",
            "sort_desc",
            "absent",
            "histogram_count",
            "histogram_sum",
            "histogram_avg",
            "histogram_stddev",
            "histogram_stdvar",
        ],
        1,
        1,
    ),
    (&["round"], 1, 2),
    (&["clamp", "histogram_fraction"], 3, 3),
    (&["clamp_min", "clamp_max", "histogram_quantile"], 2, 2),
    (
        &[
            "day_of_month",
            "day_of_week",
            "day_of_year",
            "days_in_month",
            "hour",
            "minute",
            "month",
            "year",
        ],
        0,
        1,
    ),
    (&["label_replace"], 5, 5),
    (&["label_join"], 3, usize::MAX),
    (&["sort_by_label", "sort_by_label_desc"], 1, usize::MAX),
    (
        &[
            "rate",
            "increase",
            "delta",
            "irate",
            "idelta",
            "deriv",
            "avg_over_time",
            "sum_over_time",
            "min_over_time",
            "max_over_time",
            "count_over_time",
            "stddev_over_time",
            "stdvar_over_time",
            "mad_over_time",
            "last_over_time",
            "first_over_time",
            "ts_of_last_over_time",
            "ts_of_first_over_time",
            "present_over_time",
            "absent_over_time",
            "changes",
            "resets",
        ],
        1,
        1,
    ),
    (&["quantile_over_time", "predict_linear"], 2, 2),
    (&["holt_winters", "double_exponential_smoothing"], 3, 3),
];

/// Refuses calls this engine does not evaluate, and argument counts it does not
/// expect, with a message instead of a failure inside the function.
fn check_call(name: &str, args: usize) -> Result<(), Error> {
    let Some(&(_, min, max)) = FUNCTIONS.iter().find(|(names, ..)| names.contains(&name)) else {
        return Err(Error::Unsupported(format!(
            "function {name}() is not supported by capstan's PromQL engine"
        )));
    };
    if args < min || args > max {
        return Err(Error::Parse(format!(
            "expected {} argument(s) in call to \"{name}\", got {args}",
            if min == max {
                min.to_string()
            } else if max == usize::MAX {
                format!("at least {min}")
            } else {
                format!("{min} to {max}")
            }
        )));
    }
    Ok(())
}

pub(crate) fn call(ev: &mut Ev<'_>, c: &Call) -> Result<Value, Error> {
    let name = c.func.name;
    let args: Vec<&Expr> = c.args.args.iter().map(|a| a.as_ref()).collect();
    check_call(name, args.len())?;
    match name {
        "time" => Ok(Value::Scalar(
            (0..ev.steps()).map(|i| ev.ts(i) as f64 / 1000.0).collect(),
        )),
        "pi" => Ok(Value::Scalar(vec![std::f64::consts::PI; ev.steps()])),
        "vector" => {
            let s = ev.eval_scalar(args[0])?;
            let points = s
                .into_iter()
                .enumerate()
                .map(|(i, v)| (ev.ts(i), v))
                .collect();
            Ok(Value::Vector(vec![Series::new(Labels::default(), points)]))
        }
        "scalar" => {
            let v = ev.eval_vector(args[0])?;
            let mut out = vec![f64::NAN; ev.steps()];
            let mut count = vec![0u32; ev.steps()];
            for s in &v {
                for &(t, x) in &s.points {
                    let i = ev.idx(t);
                    count[i] += 1;
                    out[i] = x;
                }
            }
            for (o, n) in out.iter_mut().zip(count) {
                if n != 1 {
                    *o = f64::NAN;
                }
            }
            Ok(Value::Scalar(out))
        }
        "timestamp" => {
            let inner = unwrap_parens(args[0]);
            let mut v = match inner {
                Expr::VectorSelector(vs) => ev.eval_selector(vs, true)?,
                e => {
                    let mut v = ev.eval_vector(e)?;
                    for s in &mut v {
                        for p in &mut s.points {
                            p.1 = p.0 as f64 / 1000.0;
                        }
                    }
                    v
                }
            };
            for s in &mut v {
                ev.drop_name(s);
            }
            Ok(Value::Vector(ev.dedup(v)?))
        }
        "abs" | "ceil" | "floor" | "exp" | "sqrt" | "ln" | "log2" | "log10" | "sgn" | "sin"
        | "cos" | "tan" | "asin" | "acos" | "atan" | "sinh" | "cosh" | "tanh" | "asinh"
        | "acosh" | "atanh" | "deg" | "rad" => {
            let f = math_fn(name);
            map_values(ev, args[0], |x, _| f(x))
        }
        "round" => {
            let to = match args.get(1) {
                Some(e) => ev.eval_scalar(e)?,
                None => vec![1.0; ev.steps()],
            };
            map_values(ev, args[0], |x, i| {
                let inv = 1.0 / to[i];
                (x * inv + 0.5).floor() / inv
            })
        }
        "clamp" => {
            let min = ev.eval_scalar(args[1])?;
            let max = ev.eval_scalar(args[2])?;
            let v = ev.eval_vector(args[0])?;
            let v = map_series(ev, v, |x, i| {
                (max[i] >= min[i] || min[i].is_nan() || max[i].is_nan())
                    .then(|| max_nan(min[i], min_nan(max[i], x)))
            });
            Ok(Value::Vector(ev.dedup(v)?))
        }
        "clamp_min" | "clamp_max" => {
            let b = ev.eval_scalar(args[1])?;
            let max = name == "clamp_max";
            map_values(ev, args[0], |x, i| {
                if max {
                    min_nan(b[i], x)
                } else {
                    max_nan(b[i], x)
                }
            })
        }
        "day_of_month" | "day_of_week" | "day_of_year" | "days_in_month" | "hour" | "minute"
        | "month" | "year" => date::eval(ev, name, args.first().copied()),
        "label_replace" => labels::label_replace(ev, &args),
        "label_join" => labels::label_join(ev, &args),
        "sort" | "sort_desc" => {
            let mut v = ev.eval_vector(args[0])?;
            let desc = name == "sort_desc";
            if ev.steps() == 1 {
                v.sort_by(|a, b| {
                    let (x, y) = (a.points[0].1, b.points[0].1);
                    // NaN last either way.
                    match (x.is_nan(), y.is_nan()) {
                        (true, true) => std::cmp::Ordering::Equal,
                        (true, false) => std::cmp::Ordering::Greater,
                        (false, true) => std::cmp::Ordering::Less,
                        _ if desc => y.partial_cmp(&x).unwrap(),
                        _ => x.partial_cmp(&y).unwrap(),
                    }
                });
            }
            Ok(Value::Vector(v))
        }
        "sort_by_label" | "sort_by_label_desc" => labels::sort_by_label(ev, &args, name),
        "absent" => {
            let v = ev.eval_vector(args[0])?;
            let mut present = vec![false; ev.steps()];
            for s in &v {
                for &(t, _) in &s.points {
                    present[ev.idx(t)] = true;
                }
            }
            Ok(Value::Vector(absent_series(ev, args[0], &present)))
        }
        "histogram_quantile" => histogram::quantile(ev, args[0], args[1]),
        "histogram_count" | "histogram_sum" | "histogram_avg" | "histogram_fraction"
        | "histogram_stddev" | "histogram_stdvar" => {
            // These read native histograms only; float series give no result.
            let v = ev.eval_vector(args[args.len() - 1])?;
            drop(v);
            Ok(Value::Vector(Vec::new()))
        }
        _ => range_call(ev, name, &args),
    }
}

fn unwrap_parens(e: &Expr) -> &Expr {
    match e {
        Expr::Paren(p) => unwrap_parens(&p.expr),
        e => e,
    }
}

fn math_fn(name: &str) -> fn(f64) -> f64 {
    match name {
        "abs" => f64::abs,
        "ceil" => f64::ceil,
        "floor" => f64::floor,
        "exp" => f64::exp,
        "sqrt" => f64::sqrt,
        "ln" => f64::ln,
        "log2" => f64::log2,
        "log10" => f64::log10,
        "sgn" => |x: f64| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        },
        "sin" => f64::sin,
        "cos" => f64::cos,
        "tan" => f64::tan,
        "asin" => f64::asin,
        "acos" => f64::acos,
        "atan" => f64::atan,
        "sinh" => f64::sinh,
        "cosh" => f64::cosh,
        "tanh" => f64::tanh,
        "asinh" => f64::asinh,
        "acosh" => f64::acosh,
        "atanh" => f64::atanh,
        "deg" => f64::to_degrees,
        _ => f64::to_radians,
    }
}

/// Applies `f(value, step)` to every point; the name is dropped.
fn map_values(ev: &mut Ev<'_>, arg: &Expr, f: impl Fn(f64, usize) -> f64) -> Result<Value, Error> {
    let v = ev.eval_vector(arg)?;
    let v = map_series(ev, v, |x, i| Some(f(x, i)));
    Ok(Value::Vector(ev.dedup(v)?))
}

fn map_series(
    ev: &Ev<'_>,
    mut v: Vec<Series>,
    f: impl Fn(f64, usize) -> Option<f64>,
) -> Vec<Series> {
    for s in &mut v {
        ev.drop_name(s);
        s.points = s
            .points
            .iter()
            .filter_map(|&(t, x)| f(x, ev.idx(t)).map(|y| (t, y)))
            .collect();
    }
    v.retain(|s| !s.points.is_empty());
    v
}

/// The labels `absent` gives its result: the selector's equality matchers.
fn absent_labels(e: &Expr) -> Labels {
    let vs = match unwrap_parens(e) {
        Expr::VectorSelector(vs) => vs,
        Expr::MatrixSelector(ms) => &ms.vs,
        _ => return Labels::default(),
    };
    let Ok(sets) = matcher_sets(vs) else {
        return Labels::default();
    };
    if sets.len() != 1 {
        return Labels::default();
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut repeated: Vec<String> = Vec::new();
    for m in &sets[0] {
        if m.name == "__name__" {
            continue;
        }
        if pairs.iter().any(|(n, _)| *n == m.name) {
            repeated.push(m.name.clone());
            continue;
        }
        if m.op == capstan_tsdb::MatchOp::Equal {
            pairs.push((m.name.clone(), m.value.clone()));
        }
    }
    // A label matched twice has no single value to report.
    pairs.retain(|(n, _)| !repeated.contains(n));
    Labels::new(pairs)
}

fn absent_series(ev: &Ev<'_>, arg: &Expr, present: &[bool]) -> Vec<Series> {
    let points: Vec<(i64, f64)> = present
        .iter()
        .enumerate()
        .filter(|(_, p)| !**p)
        .map(|(i, _)| (ev.ts(i), 1.0))
        .collect();
    if points.is_empty() {
        return Vec::new();
    }
    vec![Series::new(absent_labels(arg), points)]
}

/// Functions whose (first or last) argument is a range vector.
fn range_call(ev: &mut Ev<'_>, name: &str, args: &[&Expr]) -> Result<Value, Error> {
    // Scalar parameters, evaluated for every step.
    let (matrix, params): (&Expr, Vec<Vec<f64>>) = match name {
        "quantile_over_time" => (args[1], vec![ev.eval_scalar(args[0])?]),
        "predict_linear" => (args[0], vec![ev.eval_scalar(args[1])?]),
        "holt_winters" | "double_exponential_smoothing" => (
            args[0],
            vec![ev.eval_scalar(args[1])?, ev.eval_scalar(args[2])?],
        ),
        _ => (args[0], Vec::new()),
    };
    if name == "quantile_over_time" {
        if let Some(q) = params[0].iter().find(|q| !(0.0..=1.0).contains(*q)) {
            ev.warn(format!(
                "PromQL warning: quantile value should be between 0 and 1, got {q}"
            ));
        }
    }
    if matches!(name, "holt_winters" | "double_exponential_smoothing") {
        if let Some(sf) = params[0].iter().find(|x| !(**x > 0.0 && **x < 1.0)) {
            return Err(exec(format!(
                "invalid smoothing factor. Expected: 0 < sf < 1, got: {sf}"
            )));
        }
        if let Some(tf) = params[1].iter().find(|x| !(**x > 0.0 && **x < 1.0)) {
            return Err(exec(format!(
                "invalid trend factor. Expected: 0 < tf < 1, got: {tf}"
            )));
        }
    }
    let f: fn(&Window<'_>, &[f64]) -> Option<f64> = match name {
        "rate" => |w, _| range::extrapolated(w, true, true),
        "increase" => |w, _| range::extrapolated(w, true, false),
        "delta" => |w, _| range::extrapolated(w, false, false),
        "irate" => |w, _| range::instant_delta(w, true),
        "idelta" => |w, _| range::instant_delta(w, false),
        "deriv" => |w, _| range::deriv(w),
        "predict_linear" => |w, p| range::predict_linear(w, p[0]),
        "avg_over_time" => |w, _| range::avg_over_time(w),
        "sum_over_time" => |w, _| range::sum_over_time(w),
        "min_over_time" => |w, _| range::min_max_over_time(w, false),
        "max_over_time" => |w, _| range::min_max_over_time(w, true),
        "count_over_time" => |w, _| (!w.samples.is_empty()).then_some(w.samples.len() as f64),
        "stddev_over_time" => |w, _| range::variance_over_time(w, true),
        "stdvar_over_time" => |w, _| range::variance_over_time(w, false),
        "quantile_over_time" => |w, p| range::quantile_over_time(w, p[0]),
        "mad_over_time" => |w, _| range::mad_over_time(w),
        "last_over_time" => |w, _| w.samples.last().map(|p| p.1),
        "first_over_time" => |w, _| w.samples.first().map(|p| p.1),
        "ts_of_last_over_time" => |w, _| w.samples.last().map(|p| p.0 as f64 / 1000.0),
        "ts_of_first_over_time" => |w, _| w.samples.first().map(|p| p.0 as f64 / 1000.0),
        "present_over_time" | "absent_over_time" => |w, _| (!w.samples.is_empty()).then_some(1.0),
        "changes" => |w, _| range::changes(w),
        "resets" => |w, _| range::resets(w),
        "holt_winters" | "double_exponential_smoothing" => {
            |w, p| range::double_exponential_smoothing(w, p[0], p[1])
        }
        other => {
            return Err(Error::Unsupported(format!(
                "function {other}() is not supported"
            )));
        }
    };
    let keep_name = matches!(name, "last_over_time" | "first_over_time");
    let absent = name == "absent_over_time";
    let counter_fn = matches!(name, "rate" | "increase");
    let mut arg = ev.range_arg(matrix)?;
    let mut out = Vec::new();
    let mut present = vec![false; ev.steps()];
    let mut p = vec![0.0; params.len()];
    // Results are held as they are built (the caller holds them again at the end).
    let mut held = 0;
    while let Some(s) = ev.next_range_series(&mut arg)? {
        if let Err(e) = ev
            .check_room(ev.steps().min(1 << 20), "range evaluation")
            .and_then(|()| ev.hold(s.samples.len(), "range evaluation"))
        {
            ev.release(held);
            return Err(e);
        }
        if counter_fn {
            if let Some(n) = s.labels.get("__name__") {
                if !["_total", "_sum", "_count", "_bucket"]
                    .iter()
                    .any(|x| n.ends_with(x))
                {
                    ev.info(format!(
                        "PromQL info: metric might not be a counter, name does not end in _total/_sum/_count/_bucket: \"{n}\""
                    ));
                }
            }
        }
        let mut points = Vec::with_capacity(ev.steps());
        let range = arg.range;
        // Counter resets before each sample (a prefix count), so that a window
        // without any is known in O(1).
        let resets: Vec<u32> = if counter_fn {
            let mut n = 0;
            let mut prev = f64::NEG_INFINITY;
            s.samples
                .iter()
                .map(|&(_, v)| {
                    n += u32::from(v < prev);
                    prev = v;
                    n
                })
                .collect()
        } else {
            Vec::new()
        };
        ev.windows(&arg, &s.samples, |ev, i, lo, w, end| {
            for (k, param) in params.iter().enumerate() {
                p[k] = param[i];
            }
            let t = ev.ts(i);
            let win = Window {
                samples: w,
                end,
                range,
                at: t,
                no_resets: !w.is_empty()
                    && resets.get(lo + w.len() - 1) == resets.get(lo)
                    && !resets.is_empty(),
            };
            if let Some(v) = f(&win, &p) {
                points.push((t, v));
                present[i] = true;
            }
        })?;
        ev.release(s.samples.len());
        if let Err(e) = ev.hold(points.len(), "range evaluation") {
            ev.release(held + points.len());
            return Err(e);
        }
        held += points.len();
        if !absent && !points.is_empty() {
            let mut series = Series {
                labels: s.labels,
                points,
                drop_name: s.drop_name,
            };
            if !keep_name {
                ev.drop_name(&mut series);
            }
            out.push(series);
        }
    }
    ev.release(held);
    if absent {
        return Ok(Value::Vector(absent_series(ev, matrix, &present)));
    }
    Ok(Value::Vector(ev.dedup(out)?))
}
