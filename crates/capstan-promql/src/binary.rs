//! Binary operators: arithmetic, comparisons (with and without `bool`), set
//! operators, and vector matching (`on`, `ignoring`, `group_left`, `group_right`).

use capstan_tsdb::FxHashMap as HashMap;
use std::sync::Arc;

use capstan_tsdb::Labels;
use promql_parser::parser::{BinaryExpr, LabelModifier, VectorMatchCardinality};

use crate::engine::Ev;
use crate::value::{Error, Series, Value, exec};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Atan2,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    And,
    Or,
    Unless,
}

impl Op {
    fn parse(s: &str) -> Result<Op, Error> {
        Ok(match s {
            "+" => Op::Add,
            "-" => Op::Sub,
            "*" => Op::Mul,
            "/" => Op::Div,
            "%" => Op::Mod,
            "^" => Op::Pow,
            "atan2" => Op::Atan2,
            "==" => Op::Eq,
            "!=" => Op::Ne,
            ">" => Op::Gt,
            "<" => Op::Lt,
            ">=" => Op::Ge,
            "<=" => Op::Le,
            "and" => Op::And,
            "or" => Op::Or,
            "unless" => Op::Unless,
            other => return Err(exec(format!("unknown binary operator {other:?}"))),
        })
    }

    fn is_comparison(self) -> bool {
        matches!(self, Op::Eq | Op::Ne | Op::Gt | Op::Lt | Op::Ge | Op::Le)
    }

    fn is_set(self) -> bool {
        matches!(self, Op::And | Op::Or | Op::Unless)
    }
}

/// `l op r` for floats; for comparisons, whether it holds.
fn apply(op: Op, l: f64, r: f64) -> (f64, bool) {
    match op {
        Op::Add => (l + r, true),
        Op::Sub => (l - r, true),
        Op::Mul => (l * r, true),
        Op::Div => (l / r, true),
        Op::Mod => (l % r, true),
        Op::Pow => (l.powf(r), true),
        Op::Atan2 => (l.atan2(r), true),
        Op::Eq => (l, l == r),
        Op::Ne => (l, l != r),
        Op::Gt => (l, l > r),
        Op::Lt => (l, l < r),
        Op::Ge => (l, l >= r),
        Op::Le => (l, l <= r),
        Op::And | Op::Or | Op::Unless => (l, true),
    }
}

pub(crate) fn eval(ev: &mut Ev<'_>, b: &BinaryExpr) -> Result<Value, Error> {
    let op = Op::parse(&b.op.to_string())?;
    let return_bool = b.return_bool();
    let lhs = ev.eval(&b.lhs)?;
    let rhs = ev.eval(&b.rhs)?;
    ev.release(lhs.points() + rhs.points());
    match (lhs, rhs) {
        (Value::Scalar(l), Value::Scalar(r)) => Ok(Value::Scalar(
            l.iter()
                .zip(&r)
                .map(|(a, b)| {
                    let (v, keep) = apply(op, *a, *b);
                    if op.is_comparison() {
                        if keep { 1.0 } else { 0.0 }
                    } else {
                        v
                    }
                })
                .collect(),
        )),
        (Value::Vector(v), Value::Scalar(s)) => vector_scalar(ev, op, v, &s, false, return_bool),
        (Value::Scalar(s), Value::Vector(v)) => vector_scalar(ev, op, v, &s, true, return_bool),
        (Value::Vector(l), Value::Vector(r)) => {
            let card = b
                .modifier
                .as_ref()
                .map(|m| m.card.clone())
                .unwrap_or(VectorMatchCardinality::OneToOne);
            let matching = b.modifier.as_ref().and_then(|m| m.matching.clone());
            if op.is_set() {
                Ok(Value::Vector(set_op(ev, op, l, r, &matching)))
            } else {
                vector_vector(ev, op, l, r, &card, &matching, return_bool)
            }
        }
        (l, r) => Err(exec(format!(
            "binary operator {} is not defined between a {} and a {}",
            b.op,
            l.type_name(),
            r.type_name()
        ))),
    }
}

fn vector_scalar(
    ev: &mut Ev<'_>,
    op: Op,
    mut v: Vec<Series>,
    s: &[f64],
    scalar_left: bool,
    return_bool: bool,
) -> Result<Value, Error> {
    let comparison = op.is_comparison();
    for series in &mut v {
        let pts = std::mem::take(&mut series.points);
        let mut out = Vec::with_capacity(pts.len());
        for (t, x) in pts {
            let sv = s[ev.idx(t)];
            let (l, r) = if scalar_left { (sv, x) } else { (x, sv) };
            let (mut val, keep) = apply(op, l, r);
            if comparison {
                // The vector's value is kept, whichever side it is on.
                val = x;
            }
            if return_bool {
                val = if keep { 1.0 } else { 0.0 };
            } else if !keep {
                continue;
            }
            out.push((t, val));
        }
        series.points = out;
        if !comparison || return_bool {
            ev.drop_name(series);
        }
    }
    v.retain(|s| !s.points.is_empty());
    Ok(Value::Vector(ev.dedup(v)?))
}

/// The labels a series is matched on.
fn signature(l: &Labels, matching: &Option<LabelModifier>) -> Labels {
    match matching {
        Some(LabelModifier::Include(on)) => l.without(|n| !on.labels.iter().any(|x| x == n)),
        Some(LabelModifier::Exclude(ign)) => {
            l.without(|n| n == "__name__" || ign.labels.iter().any(|x| x == n))
        }
        None => l.without(|n| n == "__name__"),
    }
}

/// Numbers each distinct signature (shared across calls), so per-step sets are
/// plain vectors indexed by signature.
fn intern<'a>(ids: &mut HashMap<&'a Labels, usize>, sigs: &'a [Labels]) -> Vec<usize> {
    sigs.iter()
        .map(|s| {
            let n = ids.len();
            *ids.entry(s).or_insert(n)
        })
        .collect()
}

/// Per step, the indexes of the series with a point there and the point's value.
fn by_step(ev: &Ev<'_>, v: &[Series]) -> Vec<Vec<(usize, f64)>> {
    let mut steps: Vec<Vec<(usize, f64)>> = vec![Vec::new(); ev.steps()];
    for (i, s) in v.iter().enumerate() {
        for &(t, x) in &s.points {
            steps[ev.idx(t)].push((i, x));
        }
    }
    steps
}

fn set_op(
    ev: &mut Ev<'_>,
    op: Op,
    l: Vec<Series>,
    r: Vec<Series>,
    matching: &Option<LabelModifier>,
) -> Vec<Series> {
    let lsig: Vec<Labels> = l.iter().map(|s| signature(&s.labels, matching)).collect();
    let rsig: Vec<Labels> = r.iter().map(|s| signature(&s.labels, matching)).collect();
    let mut ids: HashMap<&Labels, usize> = HashMap::default();
    let lid = intern(&mut ids, &lsig);
    let rid = intern(&mut ids, &rsig);
    let nsig = ids.len();
    let lsteps = by_step(ev, &l);
    let rsteps = by_step(ev, &r);
    let mut lout: Vec<Vec<(i64, f64)>> = vec![Vec::new(); l.len()];
    let mut rout: Vec<Vec<(i64, f64)>> = vec![Vec::new(); r.len()];
    let mut present = vec![usize::MAX; nsig];
    for i in 0..ev.steps() {
        let t = ev.ts(i);
        match op {
            Op::And | Op::Unless => {
                for &(j, _) in &rsteps[i] {
                    present[rid[j]] = i;
                }
                for &(j, x) in &lsteps[i] {
                    if (present[lid[j]] == i) == (op == Op::And) {
                        lout[j].push((t, x));
                    }
                }
            }
            _ => {
                for &(j, x) in &lsteps[i] {
                    present[lid[j]] = i;
                    lout[j].push((t, x));
                }
                for &(j, x) in &rsteps[i] {
                    if present[rid[j]] != i {
                        rout[j].push((t, x));
                    }
                }
            }
        }
    }
    let mut out: Vec<Series> = Vec::new();
    for (s, pts) in l.into_iter().zip(lout) {
        if !pts.is_empty() {
            out.push(Series { points: pts, ..s });
        }
    }
    for (s, pts) in r.into_iter().zip(rout) {
        if !pts.is_empty() {
            out.push(Series { points: pts, ..s });
        }
    }
    out
}

fn vector_vector(
    ev: &mut Ev<'_>,
    op: Op,
    l: Vec<Series>,
    r: Vec<Series>,
    card: &VectorMatchCardinality,
    matching: &Option<LabelModifier>,
    return_bool: bool,
) -> Result<Value, Error> {
    // The "one" side is always on the right; group_right swaps the sides.
    let (swapped, include) = match card {
        VectorMatchCardinality::OneToMany(ls) => (true, Some(ls.labels.clone())),
        VectorMatchCardinality::ManyToOne(ls) => (false, Some(ls.labels.clone())),
        _ => (false, None),
    };
    let one_to_one = include.is_none();
    let (many, one) = if swapped { (r, l) } else { (l, r) };
    let msig: Vec<Labels> = many
        .iter()
        .map(|s| signature(&s.labels, matching))
        .collect();
    let osig: Vec<Labels> = one.iter().map(|s| signature(&s.labels, matching)).collect();
    let mut ids: HashMap<&Labels, usize> = HashMap::default();
    let oid = intern(&mut ids, &osig);
    // Many-side series whose signature no one-side series has never match.
    let mid: Vec<Option<usize>> = msig.iter().map(|s| ids.get(s).copied()).collect();
    let nsig = ids.len();
    let msteps = by_step(ev, &many);
    let osteps = by_step(ev, &one);
    let comparison = op.is_comparison();
    let drop = !comparison || return_bool;

    // Output labels for each (many, one) pair, computed once.
    let mut result_labels: HashMap<(usize, usize), usize> = HashMap::default();
    let mut out: Vec<Series> = Vec::new();
    let mut out_index: HashMap<Labels, usize> = HashMap::default();
    let mut one_at = vec![(usize::MAX, 0usize, 0.0f64); nsig];
    let mut matched_at = vec![usize::MAX; nsig];
    for i in 0..ev.steps() {
        let t = ev.ts(i);
        for &(j, x) in &osteps[i] {
            let sig = oid[j];
            if one_at[sig].0 == i {
                let side = if swapped { "left" } else { "right" };
                let (a, b) = (&one[j].labels, &one[one_at[sig].1].labels);
                return Err(exec(format!(
                    "found duplicate series for the match group {} on the {side} hand-side of the operation: [{}, {}];many-to-many matching not allowed: matching labels must be unique on one side",
                    osig[j], a, b
                )));
            }
            one_at[sig] = (i, j, x);
        }
        let mut inserted: HashMap<usize, Vec<usize>> = HashMap::default();
        for &(j, x) in &msteps[i] {
            let Some(sig) = mid[j] else { continue };
            let (step, oj, y) = one_at[sig];
            if step != i {
                continue;
            }
            let (fl, fr) = if swapped { (y, x) } else { (x, y) };
            let (mut val, keep) = apply(op, fl, fr);
            if return_bool {
                val = if keep { 1.0 } else { 0.0 };
            } else if !keep {
                continue;
            }
            let k = match result_labels.get(&(j, oj)) {
                Some(&k) => k,
                None => {
                    let labels = result_metric(
                        &many[j].labels,
                        &one[oj].labels,
                        drop && !ev.opts.delayed_name_removal,
                        one_to_one,
                        matching,
                        include.as_deref(),
                    );
                    let k = match out_index.get(&labels) {
                        Some(&k) => k,
                        None => {
                            out.push(Series {
                                labels: labels.clone(),
                                points: Vec::new(),
                                drop_name: drop && ev.opts.delayed_name_removal
                                    || (!drop && many[j].drop_name),
                            });
                            out_index.insert(labels, out.len() - 1);
                            out.len() - 1
                        }
                    };
                    result_labels.insert((j, oj), k);
                    k
                }
            };
            if one_to_one {
                if matched_at[sig] == i {
                    return Err(exec(
                        "multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)",
                    ));
                }
                matched_at[sig] = i;
            } else {
                let e = inserted.entry(sig).or_default();
                if e.contains(&k) {
                    return Err(exec(
                        "multiple matches for labels: grouping labels must ensure unique matches",
                    ));
                }
                e.push(k);
            }
            let s = &mut out[k];
            if s.points.last().is_some_and(|p| p.0 == t) {
                return Err(exec("vector cannot contain metrics with the same labelset"));
            }
            s.points.push((t, val));
        }
    }
    out.retain(|s| !s.points.is_empty());
    Ok(Value::Vector(out))
}

fn result_metric(
    many: &Labels,
    one: &Labels,
    drop_name: bool,
    one_to_one: bool,
    matching: &Option<LabelModifier>,
    include: Option<&[String]>,
) -> Labels {
    let mut l = if drop_name {
        many.without(|n| n == "__name__")
    } else {
        many.clone()
    };
    if one_to_one {
        match matching {
            Some(LabelModifier::Include(on)) => {
                l = l.without(|n| !on.labels.iter().any(|x| x == n));
            }
            Some(LabelModifier::Exclude(ign)) => {
                l = l.without(|n| ign.labels.iter().any(|x| x == n));
            }
            None => {}
        }
    }
    if let Some(inc) = include {
        let mut pairs: Vec<(Arc<str>, Arc<str>)> = l.pairs().to_vec();
        for name in inc {
            pairs.retain(|(n, _)| &**n != name.as_str());
            if let Some(v) = one.get(name) {
                pairs.push((Arc::from(name.as_str()), Arc::from(v)));
            }
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        l = Labels::from_sorted(pairs);
    }
    l
}
