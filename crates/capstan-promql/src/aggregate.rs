//! Aggregation operators over instant vectors, by step and group.

use capstan_tsdb::FxHashMap as HashMap;
use capstan_tsdb::Labels;
use promql_parser::parser::{AggregateExpr, LabelModifier};

use crate::engine::Ev;
use crate::mathx::{format_plain, kahan_inc, nan_first_cmp, quantile};
use crate::value::{Error, Series, Value, exec};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Agg {
    Sum,
    Avg,
    Min,
    Max,
    Count,
    Group,
    Stddev,
    Stdvar,
    Topk,
    Bottomk,
    Quantile,
    CountValues,
    Limitk,
    LimitRatio,
}

/// Running state of one group at one step.
#[derive(Clone, Copy)]
struct Acc {
    n: f64,
    value: f64,
    c: f64,
    mean: f64,
    incremental: bool,
}

impl Acc {
    fn first(agg: Agg, x: f64) -> Acc {
        let mut a = Acc {
            n: 1.0,
            value: x,
            c: 0.0,
            mean: 0.0,
            incremental: false,
        };
        match agg {
            Agg::Stddev | Agg::Stdvar => {
                // Welford's first step from zero: NaN or ±Inf make the variance NaN.
                a.value = if x.is_finite() { 0.0 } else { f64::NAN };
                a.mean = x;
            }
            Agg::Count | Agg::Group => a.value = 1.0,
            _ => {}
        }
        a
    }

    fn add(&mut self, agg: Agg, x: f64) {
        self.n += 1.0;
        match agg {
            Agg::Sum => (self.value, self.c) = kahan_inc(x, self.value, self.c),
            Agg::Avg => {
                if !self.incremental {
                    let (v, c) = kahan_inc(x, self.value, self.c);
                    if !v.is_infinite() {
                        (self.value, self.c) = (v, c);
                        return;
                    }
                    // The sum would overflow: continue with an incremental mean.
                    self.incremental = true;
                    self.mean = self.value / (self.n - 1.0);
                    self.c /= self.n - 1.0;
                }
                if self.mean.is_infinite() {
                    if x.is_infinite() && (self.mean > 0.0) == (x > 0.0) {
                        return;
                    }
                    if !x.is_infinite() && !x.is_nan() {
                        return;
                    }
                }
                let cur = self.mean + self.c;
                (self.mean, self.c) = kahan_inc(x / self.n - cur / self.n, self.mean, self.c);
            }
            Agg::Min if self.value > x || self.value.is_nan() => self.value = x,
            Agg::Max if self.value < x || self.value.is_nan() => self.value = x,
            Agg::Count => self.value += 1.0,
            Agg::Group => {}
            Agg::Stddev | Agg::Stdvar => {
                let delta = x - self.mean;
                self.mean += delta / self.n;
                self.value += delta * (x - self.mean);
            }
            _ => {}
        }
    }

    fn result(&self, agg: Agg) -> f64 {
        match agg {
            Agg::Sum => self.value + self.c,
            Agg::Avg => {
                if self.incremental {
                    self.mean + self.c
                } else {
                    (self.value + self.c) / self.n
                }
            }
            Agg::Stdvar => self.value / self.n,
            Agg::Stddev => (self.value / self.n).sqrt(),
            _ => self.value,
        }
    }
}

fn grouping_labels(l: &Labels, modifier: &Option<LabelModifier>) -> Labels {
    match modifier {
        None => Labels::default(),
        Some(LabelModifier::Include(by)) => l.without(|n| !by.labels.iter().any(|x| x == n)),
        Some(LabelModifier::Exclude(w)) => {
            l.without(|n| n == "__name__" || w.labels.iter().any(|x| x == n))
        }
    }
}

pub(crate) fn eval(ev: &mut Ev<'_>, a: &AggregateExpr) -> Result<Value, Error> {
    let name = a.op.to_string();
    let agg = match name.as_str() {
        "sum" => Agg::Sum,
        "avg" => Agg::Avg,
        "min" => Agg::Min,
        "max" => Agg::Max,
        "count" => Agg::Count,
        "group" => Agg::Group,
        "stddev" => Agg::Stddev,
        "stdvar" => Agg::Stdvar,
        "topk" => Agg::Topk,
        "bottomk" => Agg::Bottomk,
        "quantile" => Agg::Quantile,
        "count_values" => Agg::CountValues,
        "limitk" => Agg::Limitk,
        "limit_ratio" => Agg::LimitRatio,
        other => return Err(exec(format!("unknown aggregation {other:?}"))),
    };
    let mut scalar_param = None;
    let mut string_param = None;
    if let Some(p) = &a.param {
        if agg == Agg::CountValues {
            string_param = Some(ev.eval_string(p)?);
        } else {
            scalar_param = Some(ev.eval_scalar(p)?);
        }
    }
    let input = ev.eval_vector(&a.expr)?;
    let modifier = &a.modifier;
    match agg {
        Agg::Topk | Agg::Bottomk | Agg::Limitk | Agg::LimitRatio => {
            return select_k(ev, agg, input, modifier, &scalar_param.unwrap_or_default());
        }
        Agg::CountValues => {
            return count_values(ev, input, modifier, &string_param.unwrap_or_default());
        }
        _ => {}
    }
    if agg == Agg::Quantile {
        let phi = scalar_param.unwrap_or_default();
        if phi.iter().any(|q| !(0.0..=1.0).contains(q)) {
            let q = phi.iter().find(|q| !(0.0..=1.0).contains(*q)).unwrap();
            ev.warn(format!(
                "PromQL warning: quantile value should be between 0 and 1, got {q}"
            ));
        }
        return quantile_agg(ev, input, modifier, &phi);
    }

    // Group of each input series, and each group's labels.
    let mut group_of = Vec::with_capacity(input.len());
    let mut groups: Vec<Labels> = Vec::new();
    // A group keyed by a name still to be dropped drops it too (delayed removal).
    let mut drop: Vec<bool> = Vec::new();
    let mut index: HashMap<Labels, usize> = HashMap::default();
    for s in &input {
        let g = grouping_labels(&s.labels, modifier);
        let has_name = g.get("__name__").is_some();
        let id = *index.entry(g.clone()).or_insert_with(|| {
            groups.push(g);
            drop.push(false);
            groups.len() - 1
        });
        drop[id] |= has_name && s.drop_name;
        group_of.push(id);
    }
    let steps = ev.steps();
    let mut out: Vec<Vec<(i64, f64)>> = vec![Vec::new(); groups.len()];
    if groups.len() == 1 {
        // One group: walk every series' points into per-step accumulators.
        let mut accs: Vec<Option<Acc>> = vec![None; steps];
        for s in &input {
            for &(t, x) in &s.points {
                let i = ev.idx(t);
                match &mut accs[i] {
                    Some(acc) => acc.add(agg, x),
                    slot @ None => *slot = Some(Acc::first(agg, x)),
                }
            }
        }
        for (i, acc) in accs.into_iter().enumerate() {
            if let Some(acc) = acc {
                out[0].push((ev.ts(i), acc.result(agg)));
            }
        }
    } else {
        // Per step, per group.
        let mut accs: Vec<Option<Acc>> = vec![None; groups.len() * steps];
        for (si, s) in input.iter().enumerate() {
            let g = group_of[si];
            for &(t, x) in &s.points {
                let i = ev.idx(t);
                match &mut accs[g * steps + i] {
                    Some(acc) => acc.add(agg, x),
                    slot @ None => *slot = Some(Acc::first(agg, x)),
                }
            }
        }
        for (g, o) in out.iter_mut().enumerate() {
            for i in 0..steps {
                if let Some(acc) = &accs[g * steps + i] {
                    o.push((ev.ts(i), acc.result(agg)));
                }
            }
        }
    }
    Ok(Value::Vector(
        groups
            .into_iter()
            .zip(out)
            .zip(drop)
            .filter(|((_, p), _)| !p.is_empty())
            .map(|((labels, points), drop_name)| Series {
                labels,
                points,
                drop_name,
            })
            .collect(),
    ))
}

fn quantile_agg(
    ev: &mut Ev<'_>,
    input: Vec<Series>,
    modifier: &Option<LabelModifier>,
    phi: &[f64],
) -> Result<Value, Error> {
    let mut index: HashMap<Labels, usize> = HashMap::default();
    let mut groups: Vec<(Labels, Vec<Vec<f64>>)> = Vec::new();
    let steps = ev.steps();
    for s in &input {
        let g = grouping_labels(&s.labels, modifier);
        let id = *index.entry(g.clone()).or_insert_with(|| {
            groups.push((g, vec![Vec::new(); steps]));
            groups.len() - 1
        });
        for &(t, x) in &s.points {
            groups[id].1[ev.idx(t)].push(x);
        }
    }
    let mut out = Vec::new();
    for (l, mut per_step) in groups {
        let mut pts = Vec::new();
        for (i, vals) in per_step.iter_mut().enumerate() {
            if !vals.is_empty() {
                pts.push((ev.ts(i), quantile(phi[i], vals)));
            }
        }
        out.push(Series::new(l, pts));
    }
    Ok(Value::Vector(out))
}

fn count_values(
    ev: &mut Ev<'_>,
    input: Vec<Series>,
    modifier: &Option<LabelModifier>,
    label: &str,
) -> Result<Value, Error> {
    if !valid_label_name(label) {
        return Err(exec(format!("invalid label name {label:?}")));
    }
    let mut index: HashMap<Labels, usize> = HashMap::default();
    let mut out: Vec<Series> = Vec::new();
    let steps = ev.steps();
    let mut counts: Vec<Vec<f64>> = Vec::new();
    for s in &input {
        let base = grouping_labels(&s.labels, modifier);
        for &(t, x) in &s.points {
            let l = base.with(label, &format_plain(x));
            let id = *index.entry(l.clone()).or_insert_with(|| {
                out.push(Series::new(l, Vec::new()));
                counts.push(vec![0.0; steps]);
                out.len() - 1
            });
            counts[id][ev.idx(t)] += 1.0;
        }
    }
    for (s, c) in out.iter_mut().zip(counts) {
        s.points = c
            .into_iter()
            .enumerate()
            .filter(|(_, n)| *n > 0.0)
            .map(|(i, n)| (ev.ts(i), n))
            .collect();
    }
    Ok(Value::Vector(out))
}

pub(crate) fn valid_label_name(s: &str) -> bool {
    // Prometheus 3 accepts any UTF-8 label name except the empty one.
    !s.is_empty()
}

/// A stable position in [0, 1) for a series, from its labels (limit_ratio).
fn ratio_offset(l: &Labels) -> f64 {
    let mut h = l.hash64();
    // splitmix64 finaliser: spreads the bits evenly over the whole range.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h as f64 / u64::MAX as f64
}

fn select_k(
    ev: &mut Ev<'_>,
    agg: Agg,
    input: Vec<Series>,
    modifier: &Option<LabelModifier>,
    param: &[f64],
) -> Result<Value, Error> {
    let steps = ev.steps();
    // limit_ratio samples with the ratio of the first step throughout, so a series
    // is either in or out for the whole range.
    let first_ratio;
    let param = if agg == Agg::LimitRatio {
        first_ratio = vec![param.first().copied().unwrap_or(0.0); param.len()];
        &first_ratio[..]
    } else {
        param
    };
    if agg == Agg::LimitRatio {
        if param.first().is_some_and(|r| r.is_nan()) {
            return Err(exec(format!("Ratio value {} is NaN", param[0])));
        }
        if let Some(r) = param.iter().find(|r| !(-1.0..=1.0).contains(*r)) {
            ev.warn(format!(
                "PromQL warning: ratio value should be between -1 and 1, got {r}, capping to {}",
                r.clamp(-1.0, 1.0)
            ));
        }
    } else {
        for &k in param {
            if k.is_nan() {
                return Err(exec("Parameter value is NaN"));
            }
            if !(-9.223_372_036_854_775e18..=9.223_372_036_854_775e18).contains(&k) {
                return Err(exec(format!("Scalar value {k} overflows int64")));
            }
        }
    }
    let mut group_of = Vec::with_capacity(input.len());
    let mut index: HashMap<Labels, usize> = HashMap::default();
    for s in &input {
        let g = grouping_labels(&s.labels, modifier);
        let n = index.len();
        group_of.push(*index.entry(g).or_insert(n));
    }
    let ngroups = index.len();
    // Per step and group: the members (series index, value).
    let mut members: Vec<Vec<(usize, f64)>> = vec![Vec::new(); ngroups];
    let mut keep: Vec<Vec<(i64, f64)>> = vec![Vec::new(); input.len()];
    let mut by_step: Vec<Vec<(usize, f64)>> = vec![Vec::new(); steps];
    for (si, s) in input.iter().enumerate() {
        for &(t, x) in &s.points {
            by_step[ev.idx(t)].push((si, x));
        }
    }
    // The order of the output for one-step (instant) queries.
    let mut order: Vec<usize> = Vec::new();
    for (i, at_step) in by_step.iter().enumerate() {
        let t = ev.ts(i);
        for m in &mut members {
            m.clear();
        }
        for &(si, x) in at_step {
            members[group_of[si]].push((si, x));
        }
        let p = param[i];
        for m in &mut members {
            if m.is_empty() {
                continue;
            }
            let chosen: Vec<(usize, f64)> = match agg {
                Agg::Topk | Agg::Bottomk | Agg::Limitk => {
                    let k = p as i64;
                    if k < 1 {
                        continue;
                    }
                    let k = (k as usize).min(m.len());
                    if agg == Agg::Limitk {
                        m[..k].to_vec()
                    } else {
                        // NaN is never preferred; ties keep input order (members
                        // are in input order, so their index breaks ties): a total
                        // order, so selecting the k first then sorting them gives
                        // what a stable sort of all would.
                        let by_value = |a: &(usize, f64), b: &(usize, f64)| {
                            if agg == Agg::Topk {
                                nan_first_cmp(&b.1, &a.1)
                            } else {
                                match (a.1.is_nan(), b.1.is_nan()) {
                                    (true, false) => std::cmp::Ordering::Greater,
                                    (false, true) => std::cmp::Ordering::Less,
                                    _ => nan_first_cmp(&a.1, &b.1),
                                }
                            }
                        };
                        let total =
                            |a: &(usize, f64), b: &(usize, f64)| by_value(a, b).then(a.0.cmp(&b.0));
                        if k < m.len() {
                            m.select_nth_unstable_by(k - 1, total);
                        }
                        m[..k].sort_unstable_by(total);
                        m[..k].to_vec()
                    }
                }
                Agg::LimitRatio => {
                    let r = p.clamp(-1.0, 1.0);
                    m.iter()
                        .copied()
                        .filter(|(si, _)| {
                            let off = ratio_offset(&input[*si].labels);
                            (r >= 0.0 && off < r) || (r < 0.0 && off >= 1.0 + r)
                        })
                        .collect()
                }
                _ => unreachable!(),
            };
            for (si, x) in chosen {
                if keep[si].is_empty() {
                    order.push(si);
                }
                keep[si].push((t, x));
            }
        }
    }
    let mut input: Vec<Option<Series>> = input.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(order.len());
    for si in order {
        let mut s = input[si].take().unwrap();
        s.points = std::mem::take(&mut keep[si]);
        out.push(s);
    }
    Ok(Value::Vector(out))
}
