//! `histogram_quantile` over classic histograms (series with an `le` label).

use capstan_tsdb::FxHashMap as HashMap;

use capstan_tsdb::Labels;
use promql_parser::parser::Expr;

use crate::engine::Ev;
use crate::mathx::almost_equal;
use crate::value::{Error, Series, Value};

/// Counts closer than this (relatively) are treated as equal, to absorb float error.
const SMALL_DELTA: f64 = 1e-12;

/// The `q`-quantile from buckets `(upper bound, cumulative count)`; also whether the
/// counts had to be made monotonic.
pub(crate) fn bucket_quantile(q: f64, buckets: &mut Vec<(f64, f64)>) -> (f64, bool) {
    if q.is_nan() {
        return (f64::NAN, false);
    }
    if q < 0.0 {
        return (f64::NEG_INFINITY, false);
    }
    if q > 1.0 {
        return (f64::INFINITY, false);
    }
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    if buckets.last().is_none_or(|b| b.0 != f64::INFINITY) {
        return (f64::NAN, false);
    }
    // Buckets with the same bound (e.g. "1" and "1.0") are one bucket.
    let mut merged: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for &(ub, c) in buckets.iter() {
        match merged.last_mut() {
            Some(last) if last.0 == ub => last.1 += c,
            _ => merged.push((ub, c)),
        }
    }
    *buckets = merged;
    let mut forced = false;
    let mut prev = buckets[0].1;
    for b in buckets.iter_mut().skip(1) {
        let cur = b.1;
        if cur == prev {
            continue;
        }
        if almost_equal(prev, cur, SMALL_DELTA) {
            b.1 = prev;
            continue;
        }
        if cur < prev {
            b.1 = prev;
            forced = true;
            continue;
        }
        prev = cur;
    }
    if buckets.len() < 2 {
        return (f64::NAN, forced);
    }
    let observations = buckets[buckets.len() - 1].1;
    if observations == 0.0 {
        return (f64::NAN, forced);
    }
    let mut rank = q * observations;
    let n = buckets.len() - 1;
    let b = buckets[..n].partition_point(|x| x.1 < rank);
    if b == n {
        return (buckets[n - 1].0, forced);
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return (buckets[0].0, forced);
    }
    let (mut start, end, mut count) = (0.0, buckets[b].0, buckets[b].1);
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    (start + (end - start) * (rank / count), forced)
}

fn parse_le(s: &str) -> Option<f64> {
    match s.trim() {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

pub(crate) fn quantile(ev: &mut Ev<'_>, phi: &Expr, v: &Expr) -> Result<Value, Error> {
    let q = ev.eval_scalar(phi)?;
    if let Some(x) = q.iter().find(|x| !(0.0..=1.0).contains(*x)) {
        ev.warn(format!(
            "PromQL warning: quantile value should be between 0 and 1, got {x}"
        ));
    }
    let input = ev.eval_vector(v)?;
    let steps = ev.steps();
    let mut index: HashMap<Labels, usize> = HashMap::default();
    // Per group: its labels and, per step, the buckets (upper bound, count).
    type Buckets = Vec<Vec<(f64, f64)>>;
    let mut groups: Vec<(Labels, Buckets)> = Vec::new();
    for s in &input {
        let Some(le) = s.labels.get("le").and_then(parse_le) else {
            let name = s.labels.get("__name__").unwrap_or("");
            ev.warn(format!(
                "PromQL warning: bucket label \"le\" is missing or has a malformed value of \"{}\" for metric name \"{name}\"",
                s.labels.get("le").unwrap_or("")
            ));
            continue;
        };
        // With delayed name removal the name stays in the key until the end, so
        // buckets of two metrics are never mixed.
        let delayed = ev.opts.delayed_name_removal;
        let key = s
            .labels
            .without(|n| n == "le" || (!delayed && n == "__name__"));
        let id = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, vec![Vec::new(); steps]));
            groups.len() - 1
        });
        for &(t, x) in &s.points {
            groups[id].1[ev.idx(t)].push((le, x));
        }
    }
    let mut out = Vec::new();
    for (labels, mut per_step) in groups {
        let mut points = Vec::new();
        for (i, b) in per_step.iter_mut().enumerate() {
            if b.is_empty() {
                continue;
            }
            let (v, forced) = bucket_quantile(q[i], b);
            if forced {
                ev.info(format!(
                    "PromQL info: input to histogram_quantile needed to be fixed for monotonicity (see https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile) for metric name \"{}\"",
                    labels.get("__name__").unwrap_or("")
                ));
            }
            points.push((ev.ts(i), v));
        }
        out.push(Series {
            labels,
            points,
            drop_name: ev.opts.delayed_name_removal,
        });
    }
    Ok(Value::Vector(out))
}
