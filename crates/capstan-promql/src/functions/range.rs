//! Functions of range vectors: rates and deltas with extrapolation, regression,
//! the `*_over_time` family, changes and resets, smoothing.

use crate::mathx::{kahan_inc, quantile};

/// One step's window of a series.
pub(crate) struct Window<'s> {
    pub samples: &'s [(i64, f64)],
    /// End of the window (ms), inclusive; the start is `end - range`, exclusive.
    pub end: i64,
    pub range: i64,
    /// The time the step is evaluated at (ms).
    pub at: i64,
    /// Known to hold no counter reset (a decrease); false when not known.
    pub no_resets: bool,
}

/// `rate`, `increase` and `delta`: the change over the window, extrapolated to
/// its edges as Prometheus does (at most half an average interval beyond the
/// samples, never below zero for counters).
pub(crate) fn extrapolated(w: &Window<'_>, counter: bool, per_second: bool) -> Option<f64> {
    let s = w.samples;
    if s.len() < 2 {
        return None;
    }
    let range_start = w.end - w.range;
    let (first_t, first_v) = s[0];
    let (last_t, last_v) = s[s.len() - 1];
    let mut result = last_v - first_v;
    if counter && !w.no_resets {
        let mut prev = first_v;
        for &(_, v) in &s[1..] {
            if v < prev {
                result += prev;
            }
            prev = v;
        }
    }
    let mut to_start = (first_t - range_start) as f64 / 1000.0;
    let mut to_end = (w.end - last_t) as f64 / 1000.0;
    let sampled = (last_t - first_t) as f64 / 1000.0;
    let avg_gap = sampled / (s.len() - 1) as f64;
    let threshold = avg_gap * 1.1;
    if to_start >= threshold {
        to_start = avg_gap / 2.0;
    }
    if counter && result > 0.0 && first_v >= 0.0 {
        // A counter cannot go below zero: do not extrapolate past its zero point.
        let to_zero = sampled * (first_v / result);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    if to_end >= threshold {
        to_end = avg_gap / 2.0;
    }
    let mut factor = (sampled + to_start + to_end) / sampled;
    if per_second {
        factor /= w.range as f64 / 1000.0;
    }
    Some(result * factor)
}

/// `irate` and `idelta`: from the last two samples.
pub(crate) fn instant_delta(w: &Window<'_>, rate: bool) -> Option<f64> {
    let s = w.samples;
    if s.len() < 2 {
        return None;
    }
    let (pt, pv) = s[s.len() - 2];
    let (lt, lv) = s[s.len() - 1];
    let mut d = if rate && lv < pv { lv } else { lv - pv };
    if rate {
        let dt = lt - pt;
        if dt == 0 {
            return None;
        }
        d /= dt as f64 / 1000.0;
    }
    Some(d)
}

/// Least-squares fit of the samples against time (seconds since `intercept_t`).
pub(crate) fn linear_regression(s: &[(i64, f64)], intercept_t: i64) -> (f64, f64) {
    let (mut n, mut sx, mut cx, mut sy, mut cy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sxy, mut cxy, mut sx2, mut cx2) = (0.0, 0.0, 0.0, 0.0);
    let init_y = s[0].1;
    let mut const_y = true;
    for (i, &(t, v)) in s.iter().enumerate() {
        if const_y && i > 0 && v != init_y {
            const_y = false;
        }
        n += 1.0;
        let x = (t - intercept_t) as f64 / 1000.0;
        (sx, cx) = kahan_inc(x, sx, cx);
        (sy, cy) = kahan_inc(v, sy, cy);
        (sxy, cxy) = kahan_inc(x * v, sxy, cxy);
        (sx2, cx2) = kahan_inc(x * x, sx2, cx2);
    }
    if const_y {
        if init_y.is_infinite() {
            return (f64::NAN, f64::NAN);
        }
        return (0.0, init_y);
    }
    let (sx, sy, sxy, sx2) = (sx + cx, sy + cy, sxy + cxy, sx2 + cx2);
    let cov = sxy - sx * sy / n;
    let var = sx2 - sx * sx / n;
    let slope = cov / var;
    (slope, sy / n - slope * sx / n)
}

pub(crate) fn deriv(w: &Window<'_>) -> Option<f64> {
    if w.samples.len() < 2 {
        return None;
    }
    Some(linear_regression(w.samples, w.samples[0].0).0)
}

pub(crate) fn predict_linear(w: &Window<'_>, duration: f64) -> Option<f64> {
    if w.samples.len() < 2 {
        return None;
    }
    let (slope, intercept) = linear_regression(w.samples, w.at);
    Some(slope * duration + intercept)
}

fn values<'s>(w: &Window<'s>) -> impl Iterator<Item = f64> + 's {
    w.samples.iter().map(|p| p.1)
}

pub(crate) fn avg_over_time(w: &Window<'_>) -> Option<f64> {
    if w.samples.is_empty() {
        return None;
    }
    let (mut sum, mut mean, mut count, mut c) = (0.0, 0.0, 0.0, 0.0);
    let mut incremental = false;
    for x in values(w) {
        count += 1.0;
        if !incremental {
            let (ns, nc) = kahan_inc(x, sum, c);
            if count == 1.0 || !ns.is_infinite() {
                (sum, c) = (ns, nc);
                continue;
            }
            incremental = true;
            mean = sum / (count - 1.0);
            c /= count - 1.0;
        }
        if mean.is_infinite() {
            if x.is_infinite() && (mean > 0.0) == (x > 0.0) {
                continue;
            }
            if !x.is_infinite() && !x.is_nan() {
                continue;
            }
        }
        let corrected = mean + c;
        (mean, c) = kahan_inc(x / count - corrected / count, mean, c);
    }
    Some(if incremental {
        mean + c
    } else {
        (sum + c) / count
    })
}

pub(crate) fn sum_over_time(w: &Window<'_>) -> Option<f64> {
    if w.samples.is_empty() {
        return None;
    }
    let (mut s, mut c) = (0.0, 0.0);
    for x in values(w) {
        (s, c) = kahan_inc(x, s, c);
    }
    Some(s + c)
}

pub(crate) fn min_max_over_time(w: &Window<'_>, max: bool) -> Option<f64> {
    let mut it = values(w);
    let mut m = it.next()?;
    for x in it {
        if (max && x > m) || (!max && x < m) || m.is_nan() {
            m = x;
        }
    }
    Some(m)
}

pub(crate) fn variance_over_time(w: &Window<'_>, stddev: bool) -> Option<f64> {
    if w.samples.is_empty() {
        return None;
    }
    let (mut count, mut mean, mut cm, mut aux, mut ca) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for x in values(w) {
        count += 1.0;
        let delta = x - (mean + cm);
        (mean, cm) = kahan_inc(delta / count, mean, cm);
        (aux, ca) = kahan_inc(delta * (x - (mean + cm)), aux, ca);
    }
    let var = (aux + ca) / count;
    Some(if stddev { var.sqrt() } else { var })
}

pub(crate) fn quantile_over_time(w: &Window<'_>, q: f64) -> Option<f64> {
    if w.samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values(w).collect();
    Some(quantile(q, &mut v))
}

pub(crate) fn mad_over_time(w: &Window<'_>) -> Option<f64> {
    if w.samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = values(w).collect();
    let median = quantile(0.5, &mut v);
    let mut dev: Vec<f64> = v.iter().map(|x| (x - median).abs()).collect();
    Some(quantile(0.5, &mut dev))
}

pub(crate) fn changes(w: &Window<'_>) -> Option<f64> {
    let s = w.samples;
    let first = s.first()?;
    let mut prev = first.1;
    let mut n = 0.0;
    for &(_, x) in &s[1..] {
        if !(x == prev || (x.is_nan() && prev.is_nan())) {
            n += 1.0;
        }
        prev = x;
    }
    Some(n)
}

pub(crate) fn resets(w: &Window<'_>) -> Option<f64> {
    let s = w.samples;
    let first = s.first()?;
    let mut prev = first.1;
    let mut n = 0.0;
    for &(_, x) in &s[1..] {
        if x < prev {
            n += 1.0;
        }
        prev = x;
    }
    Some(n)
}

/// `double_exponential_smoothing` (formerly `holt_winters`).
pub(crate) fn double_exponential_smoothing(w: &Window<'_>, sf: f64, tf: f64) -> Option<f64> {
    let s = w.samples;
    if s.len() < 2 {
        return None;
    }
    let trend = |i: usize, s0: f64, s1: f64, b: f64| {
        if i == 0 {
            b
        } else {
            tf * (s1 - s0) + (1.0 - tf) * b
        }
    };
    let (mut s0, mut s1) = (0.0, s[0].1);
    let mut b = s[1].1 - s[0].1;
    for (i, &(_, x)) in s.iter().enumerate().skip(1) {
        let scaled = sf * x;
        b = trend(i - 1, s0, s1, b);
        let y = (1.0 - sf) * (s1 + b);
        (s0, s1) = (s1, scaled + y);
    }
    Some(s1)
}
