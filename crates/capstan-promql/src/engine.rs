//! The evaluator: walks the expression once over all steps of a query, series by
//! series, so a range query reads each series' samples once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capstan_tsdb::{Labels, MatchOp, Matcher};
use promql_parser::label::MatchOp as PMatchOp;
use promql_parser::parser::{self, AtModifier, Expr, Offset, VectorSelector};

use crate::storage::{Selected, Storage};
use crate::value::{Error, QueryOutput, QueryValue, Sample, Series, Stats, Value, exec};

/// Limits and behaviour of the engine; the defaults are Prometheus 3's.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How far back an instant vector selector looks for a sample.
    pub lookback_delta_ms: i64,
    /// The most samples a query may hold in memory at once.
    pub max_samples: usize,
    pub timeout: Duration,
    /// Step of a subquery that names none (Prometheus: the evaluation interval).
    pub default_subquery_step_ms: i64,
    /// Remove metric names at the end of evaluation rather than at once (the
    /// behaviour Prometheus' own test suite runs with).
    pub delayed_name_removal: bool,
    /// Memory a query's samples may take ([`SAMPLE_BYTES`] each), checked as
    /// series are loaded and results built, before the memory is taken.
    pub max_memory_bytes: usize,
    /// Set by the caller to stop the query (its client went away); checked
    /// where the timeout is.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// What one sample held by a query counts for in its memory budget.
pub const SAMPLE_BYTES: usize = 16;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            lookback_delta_ms: 5 * 60_000,
            max_samples: 50_000_000,
            timeout: Duration::from_secs(120),
            default_subquery_step_ms: 60_000,
            delayed_name_removal: false,
            max_memory_bytes: 1 << 30,
            cancel: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Engine {
    pub opts: EngineOptions,
}

/// Parses an expression, mapping the parser's message to a `bad_data` error.
/// The text is checked against [`crate::limits`] first.
pub fn parse(q: &str) -> Result<Expr, Error> {
    crate::limits::check(q, crate::limits::PROMQL).map_err(Error::Parse)?;
    // The parser's errors come without a position: find one.
    parser::parse(q).map_err(|e| Error::Parse(crate::position::with_position(q, &e)))
}

impl Engine {
    pub fn new(opts: EngineOptions) -> Engine {
        Engine { opts }
    }

    /// Evaluates `q` at time `t` (ms).
    pub fn instant(&self, st: &dyn Storage, q: &str, t: i64) -> Result<QueryOutput, Error> {
        let began = Instant::now();
        let expr = parse(q)?;
        let mut ev = Ev::new(st, &self.opts, t, t, 1, began);
        let v = ev.eval(&expr)?;
        let v = ev.finish(v)?;
        let value = match v {
            Value::Scalar(s) => QueryValue::Scalar(t, s[0]),
            Value::String(s) => QueryValue::String(t, s),
            Value::Vector(series) => QueryValue::Vector(
                series
                    .into_iter()
                    .filter_map(|s| {
                        s.points.first().map(|p| Sample {
                            labels: s.labels,
                            t: p.0,
                            v: p.1,
                        })
                    })
                    .collect(),
            ),
            Value::Matrix(mut m) => {
                m.retain(|s| !s.points.is_empty());
                QueryValue::Matrix(m)
            }
        };
        Ok(ev.output(value, began))
    }

    /// Evaluates `q` at every step from `start` to `end` (ms).
    pub fn range(
        &self,
        st: &dyn Storage,
        q: &str,
        start: i64,
        end: i64,
        step: i64,
    ) -> Result<QueryOutput, Error> {
        let began = Instant::now();
        if step <= 0 {
            return Err(Error::Parse(
                "zero or negative query resolution step widths are not accepted. Try a positive integer".into(),
            ));
        }
        if end < start {
            return Err(Error::Parse(
                "end timestamp must not be before start time".into(),
            ));
        }
        let expr = parse(q)?;
        match expr.value_type() {
            parser::value::ValueType::Vector | parser::value::ValueType::Scalar => {}
            other => {
                return Err(Error::Parse(format!(
                    "invalid expression type \"{}\" for range query, must be Scalar or instant Vector",
                    type_words(other)
                )));
            }
        }
        let mut ev = Ev::new(st, &self.opts, start, end, step, began);
        ev.check_room(ev.steps(), "query evaluation")?;
        let v = ev.eval(&expr)?;
        let v = ev.finish(v)?;
        let mut m = match v {
            Value::Scalar(s) => vec![Series::new(
                Labels::default(),
                s.into_iter()
                    .enumerate()
                    .map(|(i, v)| (ev.ts(i), v))
                    .collect(),
            )],
            Value::Vector(s) => s,
            other => {
                return Err(exec(format!(
                    "unexpected {} result of a range query",
                    other.type_name()
                )));
            }
        };
        m.retain(|s| !s.points.is_empty());
        m.sort_by(|a, b| a.labels.cmp(&b.labels));
        Ok(ev.output(QueryValue::Matrix(m), began))
    }
}

fn type_words(t: parser::value::ValueType) -> &'static str {
    use parser::value::ValueType::*;
    match t {
        Vector => "instant vector",
        Scalar => "scalar",
        Matrix => "range vector",
        String => "string",
    }
}

/// Where a range function's samples come from: a matrix selector or a subquery.
pub(crate) struct RangeArg<'a> {
    pub range: i64,
    pub offset: i64,
    pub at: Option<i64>,
    source: RangeSource<'a>,
}

enum RangeSource<'a> {
    Stored(std::vec::IntoIter<Selected<'a>>),
    Evaluated(std::vec::IntoIter<Series>),
}

/// One series of a range argument with its samples (stale markers removed).
pub(crate) struct RangeSeries {
    pub labels: Labels,
    pub drop_name: bool,
    pub samples: Vec<(i64, f64)>,
}

pub(crate) struct Ev<'a> {
    pub st: &'a dyn Storage,
    pub opts: &'a EngineOptions,
    pub start: i64,
    pub end: i64,
    pub interval: i64,
    /// The outermost query's range, for `@ start()` and `@ end()`.
    pub q_start: i64,
    pub q_end: i64,
    cur_samples: usize,
    pub stats: Stats,
    deadline: Instant,
    pub warnings: Vec<String>,
    pub infos: Vec<String>,
}

impl<'a> Ev<'a> {
    fn new(
        st: &'a dyn Storage,
        opts: &'a EngineOptions,
        start: i64,
        end: i64,
        interval: i64,
        began: Instant,
    ) -> Ev<'a> {
        Ev {
            st,
            opts,
            start,
            end,
            interval,
            q_start: start,
            q_end: end,
            cur_samples: 0,
            stats: Stats::default(),
            deadline: began + opts.timeout,
            warnings: Vec::new(),
            infos: Vec::new(),
        }
    }

    fn output(mut self, value: QueryValue, began: Instant) -> QueryOutput {
        self.stats.exec_seconds = began.elapsed().as_secs_f64();
        self.warnings.dedup();
        self.infos.dedup();
        QueryOutput {
            value,
            warnings: self.warnings,
            infos: self.infos,
            stats: self.stats,
        }
    }

    pub fn steps(&self) -> usize {
        usize::try_from((self.end.saturating_sub(self.start) / self.interval).saturating_add(1))
            .unwrap_or(usize::MAX)
    }

    pub fn ts(&self, i: usize) -> i64 {
        self.start + i as i64 * self.interval
    }

    pub fn idx(&self, t: i64) -> usize {
        ((t - self.start) / self.interval) as usize
    }

    pub fn warn(&mut self, msg: String) {
        if !self.warnings.contains(&msg) {
            self.warnings.push(msg);
        }
    }

    pub fn info(&mut self, msg: String) {
        if !self.infos.contains(&msg) {
            self.infos.push(msg);
        }
    }

    pub fn check_deadline(&self, what: &'static str) -> Result<(), Error> {
        if Instant::now() > self.deadline {
            return Err(Error::Timeout(what));
        }
        if self
            .opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(Error::Canceled(what));
        }
        Ok(())
    }

    /// Accounts for `n` more samples held in memory.
    pub fn hold(&mut self, n: usize, what: &'static str) -> Result<(), Error> {
        self.cur_samples = self.cur_samples.saturating_add(n);
        self.check_room(0, what)?;
        self.stats.peak_samples = self.stats.peak_samples.max(self.cur_samples as u64);
        Ok(())
    }

    /// Whether `more` samples could be held beside those held now: the sample
    /// limit and the memory budget.
    pub fn check_room(&self, more: usize, what: &'static str) -> Result<(), Error> {
        let n = self.cur_samples.saturating_add(more);
        if n > self.opts.max_samples {
            return Err(Error::TooManySamples(what));
        }
        if n.saturating_mul(SAMPLE_BYTES) > self.opts.max_memory_bytes {
            return Err(Error::OverBudget(what, self.opts.max_memory_bytes));
        }
        Ok(())
    }

    pub fn release(&mut self, n: usize) {
        self.cur_samples = self.cur_samples.saturating_sub(n);
    }

    /// Applies delayed name removal and checks the result for duplicate label sets.
    fn finish(&mut self, v: Value) -> Result<Value, Error> {
        match v {
            Value::Vector(s) => Ok(Value::Vector(self.settle(s)?)),
            Value::Matrix(s) if self.opts.delayed_name_removal => {
                let s: Vec<Series> = s.into_iter().map(drop_flagged_name).collect();
                let mut seen = capstan_tsdb::FxHashSet::default();
                for x in &s {
                    if !seen.insert(&x.labels) {
                        return Err(exec("vector cannot contain metrics with the same labelset"));
                    }
                }
                Ok(Value::Matrix(s))
            }
            v => Ok(v),
        }
    }

    /// Removes flagged names (delayed mode) and merges series that now share
    /// their labels; two points at one step is the duplicate label set error.
    pub fn settle(&mut self, s: Vec<Series>) -> Result<Vec<Series>, Error> {
        let s: Vec<Series> = if self.opts.delayed_name_removal {
            s.into_iter().map(drop_flagged_name).collect()
        } else {
            s
        };
        merge_same_labels(s)
    }

    /// Merges series with equal labels unless delayed name removal will do it at the end.
    pub fn dedup(&mut self, s: Vec<Series>) -> Result<Vec<Series>, Error> {
        if self.opts.delayed_name_removal {
            Ok(s)
        } else {
            merge_same_labels(s)
        }
    }

    /// Removes (or, in delayed mode, flags for removal) the metric name.
    pub fn drop_name(&self, s: &mut Series) {
        if self.opts.delayed_name_removal {
            s.drop_name = true;
        } else if s.labels.get("__name__").is_some() {
            s.labels = s.labels.without(|n| n == "__name__");
        }
    }

    pub fn at_ms(&self, at: &Option<AtModifier>) -> Option<i64> {
        at.as_ref().map(|a| match a {
            AtModifier::Start => self.q_start,
            AtModifier::End => self.q_end,
            AtModifier::At(t) => system_time_ms(*t),
        })
    }

    pub fn eval(&mut self, e: &Expr) -> Result<Value, Error> {
        self.check_deadline("expression evaluation")?;
        let v = match e {
            Expr::NumberLiteral(n) => Value::Scalar(vec![n.val; self.steps()]),
            Expr::StringLiteral(s) => Value::String(s.val.clone()),
            Expr::Paren(p) => return self.eval(&p.expr),
            Expr::Unary(u) => {
                let v = self.eval(&u.expr)?;
                match v {
                    Value::Scalar(s) => Value::Scalar(s.into_iter().map(|x| -x).collect()),
                    Value::Vector(mut series) => {
                        for s in &mut series {
                            self.drop_name(s);
                            for p in &mut s.points {
                                p.1 = -p.1;
                            }
                        }
                        Value::Vector(self.dedup(series)?)
                    }
                    other => {
                        return Err(exec(format!(
                            "unary minus is not defined on a {}",
                            other.type_name()
                        )));
                    }
                }
            }
            Expr::VectorSelector(vs) => Value::Vector(self.eval_selector(vs, false)?),
            Expr::MatrixSelector(_) | Expr::Subquery(_) => {
                let arg = self.range_arg(e)?;
                Value::Matrix(self.materialize_range(arg)?)
            }
            Expr::Call(c) => crate::functions::call(self, c)?,
            Expr::Aggregate(a) => crate::aggregate::eval(self, a)?,
            Expr::Binary(b) => crate::binary::eval(self, b)?,
            Expr::Extension(_) => {
                return Err(Error::Unsupported(
                    "extension expressions are not supported".into(),
                ));
            }
        };
        let n = v.points();
        self.hold(n, "expression evaluation")?;
        Ok(v)
    }

    /// Evaluates a sub-expression, releasing its samples from the account (the caller consumes it).
    pub fn eval_owned(&mut self, e: &Expr) -> Result<Value, Error> {
        let v = self.eval(e)?;
        self.release(v.points());
        Ok(v)
    }

    pub fn eval_scalar(&mut self, e: &Expr) -> Result<Vec<f64>, Error> {
        match self.eval_owned(e)? {
            Value::Scalar(s) => Ok(s),
            other => Err(exec(format!(
                "expected a scalar, got a {}",
                other.type_name()
            ))),
        }
    }

    pub fn eval_vector(&mut self, e: &Expr) -> Result<Vec<Series>, Error> {
        match self.eval_owned(e)? {
            Value::Vector(s) => Ok(s),
            other => Err(exec(format!(
                "expected an instant vector, got a {}",
                other.type_name()
            ))),
        }
    }

    pub fn eval_string(&mut self, e: &Expr) -> Result<String, Error> {
        match self.eval_owned(e)? {
            Value::String(s) => Ok(s),
            other => Err(exec(format!(
                "expected a string, got a {}",
                other.type_name()
            ))),
        }
    }

    /// The series a selector selects; with `last_only`, a store may load only
    /// each series' last sample in the range.
    fn select(
        &mut self,
        vs: &VectorSelector,
        mint: i64,
        maxt: i64,
        last_only: bool,
    ) -> Result<Vec<Selected<'a>>, Error> {
        let mut out: Vec<Selected<'a>> = Vec::new();
        for set in matcher_sets(vs)? {
            let found = if last_only {
                self.st.select_last(&set, mint, maxt)
            } else {
                self.st.select(&set, mint, maxt)
            };
            if out.is_empty() {
                out = found;
            } else {
                for f in found {
                    if !out.iter().any(|o| o.labels == f.labels) {
                        out.push(f);
                    }
                }
                out.sort_by(|a, b| a.labels.cmp(&b.labels));
            }
        }
        if out.iter().any(|s| s.has_histograms) {
            return Err(Error::Unsupported(format!(
                "native histograms are not supported yet: {vs} selects native histogram samples"
            )));
        }
        Ok(out)
    }

    /// An instant vector selector over all steps. With `timestamps`, each value is
    /// the timestamp (seconds) of the sample found, for `timestamp()`.
    pub fn eval_selector(
        &mut self,
        vs: &VectorSelector,
        timestamps: bool,
    ) -> Result<Vec<Series>, Error> {
        let off = offset_ms(&vs.offset);
        let at = self.at_ms(&vs.at);
        let lb = self.opts.lookback_delta_ms;
        let (first, last) = match at {
            Some(a) => (a - off, a - off),
            None => (self.start - off, self.end - off),
        };
        // One evaluation time: only the last sample before it matters.
        let selected = self.select(vs, first - lb + 1, last, first == last)?;
        let n = self.steps();
        let mut out = Vec::with_capacity(selected.len());
        let mut samples = Vec::new();
        // Held as they are built, so a query over too many series stops before
        // its memory is taken; the caller holds the whole result again.
        let mut held = 0;
        for s in selected {
            self.check_deadline("series selection")?;
            self.check_room(n.min(1 << 20), "series selection")?;
            samples.clear();
            (s.load)(&mut samples);
            let mut points = Vec::with_capacity(n.min(samples.len() * 8 + 1));
            let mut hi = 0;
            for i in 0..n {
                let t = self.ts(i);
                let r = at.unwrap_or(t) - off;
                while hi < samples.len() && samples[hi].0 <= r {
                    hi += 1;
                }
                if hi == 0 {
                    continue;
                }
                let (st, sv) = samples[hi - 1];
                if st > r - lb && !capstan_tsdb::is_stale(sv) {
                    points.push((t, if timestamps { st as f64 / 1000.0 } else { sv }));
                }
            }
            self.stats.total_samples += points.len() as u64;
            if let Err(e) = self.hold(points.len(), "series selection") {
                self.release(held + points.len());
                return Err(e);
            }
            held += points.len();
            if !points.is_empty() {
                out.push(Series::new(s.labels, points));
            }
        }
        self.release(held);
        Ok(out)
    }

    /// Prepares a range argument (matrix selector or subquery, in parentheses or not).
    pub fn range_arg(&mut self, e: &Expr) -> Result<RangeArg<'a>, Error> {
        match e {
            Expr::Paren(p) => self.range_arg(&p.expr),
            Expr::MatrixSelector(ms) => {
                let vs = &ms.vs;
                let range = ms.range.as_millis() as i64;
                let off = offset_ms(&vs.offset);
                let at = self.at_ms(&vs.at);
                let (first, last) = match at {
                    Some(a) => (a - off, a - off),
                    None => (self.start - off, self.end - off),
                };
                let selected = self.select(vs, first - range + 1, last, false)?;
                Ok(RangeArg {
                    range,
                    offset: off,
                    at,
                    source: RangeSource::Stored(selected.into_iter()),
                })
            }
            Expr::Subquery(sq) => {
                let range = sq.range.as_millis() as i64;
                let off = offset_ms(&sq.offset);
                let at = self.at_ms(&sq.at);
                let step = sq
                    .step
                    .map(|d| d.as_millis() as i64)
                    .filter(|s| *s > 0)
                    .unwrap_or(self.opts.default_subquery_step_ms);
                let (outer_start, outer_end) = match at {
                    Some(a) => (a, a),
                    None => (self.start, self.end),
                };
                let lowest = outer_start - off - range;
                // The first step-aligned time after the start of the window (left-open).
                let mut inner_start = step * (lowest / step);
                if inner_start <= lowest {
                    inner_start += step;
                }
                let inner_end = outer_end - off;
                let saved = (self.start, self.end, self.interval);
                let result = if inner_start > inner_end {
                    Ok(Value::Vector(Vec::new()))
                } else {
                    self.start = inner_start;
                    self.end = inner_end;
                    self.interval = step;
                    // Every step of the inner query holds a sample or more.
                    let r = self
                        .check_room(self.steps(), "subquery evaluation")
                        .and_then(|()| self.eval_owned(&sq.expr));
                    (self.start, self.end, self.interval) = saved;
                    r
                };
                let series = match result? {
                    Value::Vector(s) => s,
                    Value::Scalar(_) => {
                        return Err(exec("subqueries of scalars are not supported"));
                    }
                    other => {
                        return Err(exec(format!(
                            "subquery of a {} is not allowed",
                            other.type_name()
                        )));
                    }
                };
                Ok(RangeArg {
                    range,
                    offset: off,
                    at,
                    source: RangeSource::Evaluated(series.into_iter()),
                })
            }
            other => Err(exec(format!(
                "expected a range vector, got {}",
                type_words(other.value_type())
            ))),
        }
    }

    /// The next series of a range argument, its samples loaded and stale markers removed.
    pub fn next_range_series(
        &mut self,
        arg: &mut RangeArg<'a>,
    ) -> Result<Option<RangeSeries>, Error> {
        self.check_deadline("range evaluation")?;
        Ok(match &mut arg.source {
            RangeSource::Stored(it) => it.next().map(|s| {
                let mut samples = Vec::new();
                (s.load)(&mut samples);
                samples.retain(|p| !capstan_tsdb::is_stale(p.1));
                RangeSeries {
                    labels: s.labels,
                    drop_name: false,
                    samples,
                }
            }),
            RangeSource::Evaluated(it) => it.next().map(|s| RangeSeries {
                labels: s.labels,
                drop_name: s.drop_name,
                samples: s.points,
            }),
        })
    }

    /// Calls `f` with each step's window of `samples`: `(step, index of the
    /// window's first sample, window, window end)`.
    pub fn windows(
        &mut self,
        arg: &RangeArg<'_>,
        samples: &[(i64, f64)],
        mut f: impl FnMut(&mut Self, usize, usize, &[(i64, f64)], i64),
    ) -> Result<(), Error> {
        let (mut lo, mut hi) = (0, 0);
        // Work per step is up to the window's size: the deadline is checked
        // every so many samples looked at.
        let mut work = 0usize;
        for i in 0..self.steps() {
            if work > 1 << 16 {
                self.check_deadline("range evaluation")?;
                work = 0;
            }
            let t = self.ts(i);
            let end = arg.at.unwrap_or(t) - arg.offset;
            let start = end - arg.range;
            while hi < samples.len() && samples[hi].0 <= end {
                hi += 1;
            }
            while lo < hi && samples[lo].0 <= start {
                lo += 1;
            }
            self.stats.total_samples += (hi - lo) as u64;
            work += hi - lo + 1;
            f(self, i, lo, &samples[lo..hi], end);
        }
        Ok(())
    }

    /// A range vector as a value (top of an instant query): the window at the one step.
    fn materialize_range(&mut self, mut arg: RangeArg<'a>) -> Result<Vec<Series>, Error> {
        if self.steps() != 1 {
            return Err(Error::Parse(
                "invalid expression type \"range vector\" for range query, must be Scalar or instant Vector".into(),
            ));
        }
        let mut out = Vec::new();
        while let Some(s) = self.next_range_series(&mut arg)? {
            let mut pts = Vec::new();
            self.windows(&arg, &s.samples, |_, _, _, w, _| pts = w.to_vec())?;
            if !pts.is_empty() {
                out.push(Series {
                    labels: s.labels,
                    points: pts,
                    drop_name: s.drop_name,
                });
            }
        }
        Ok(out)
    }
}

fn drop_flagged_name(mut s: Series) -> Series {
    if s.drop_name {
        s.labels = s.labels.without(|n| n == "__name__");
        s.drop_name = false;
    }
    s
}

/// Joins series with equal labels; a step present in two of them is an error.
pub(crate) fn merge_same_labels(s: Vec<Series>) -> Result<Vec<Series>, Error> {
    if s.len() < 2 {
        return Ok(s);
    }
    // Label-set hash → position in `out`; `more` holds hash collisions.
    let mut index: capstan_tsdb::FxHashMap<u64, usize> =
        capstan_tsdb::FxHashMap::with_capacity_and_hasher(s.len(), Default::default());
    let mut more: capstan_tsdb::FxHashMap<u64, Vec<usize>> = Default::default();
    let mut out: Vec<Series> = Vec::with_capacity(s.len());
    for x in s {
        let h = x.labels.hash64();
        let found = match index.get(&h) {
            None => None,
            Some(&i) if out[i].labels == x.labels => Some(i),
            Some(_) => more
                .get(&h)
                .and_then(|v| v.iter().copied().find(|&i| out[i].labels == x.labels)),
        };
        match found {
            None => {
                if let std::collections::hash_map::Entry::Vacant(e) = index.entry(h) {
                    e.insert(out.len());
                } else {
                    more.entry(h).or_default().push(out.len());
                }
                out.push(x);
            }
            Some(i) => {
                let o = &mut out[i];
                let mut merged = Vec::with_capacity(o.points.len() + x.points.len());
                let (mut a, mut b) = (0, 0);
                while a < o.points.len() || b < x.points.len() {
                    let take_a = b >= x.points.len()
                        || (a < o.points.len() && o.points[a].0 < x.points[b].0);
                    if a < o.points.len() && b < x.points.len() && o.points[a].0 == x.points[b].0 {
                        return Err(exec("vector cannot contain metrics with the same labelset"));
                    }
                    if take_a {
                        merged.push(o.points[a]);
                        a += 1;
                    } else {
                        merged.push(x.points[b]);
                        b += 1;
                    }
                }
                o.points = merged;
            }
        }
    }
    Ok(out)
}

pub(crate) fn offset_ms(o: &Option<Offset>) -> i64 {
    match o {
        None => 0,
        Some(Offset::Pos(d)) => d.as_millis() as i64,
        Some(Offset::Neg(d)) => -(d.as_millis() as i64),
    }
}

fn system_time_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The selector's matchers as storage matchers; several sets for `or` selectors.
pub(crate) fn matcher_sets(vs: &VectorSelector) -> Result<Vec<Vec<Matcher>>, Error> {
    let convert = |ms: &[promql_parser::label::Matcher]| -> Result<Vec<Matcher>, Error> {
        let mut out = Vec::with_capacity(ms.len() + 1);
        if let Some(n) = &vs.name {
            out.push(Matcher::eq("__name__", n));
        }
        for m in ms {
            out.push(match &m.op {
                PMatchOp::Equal => Matcher::eq(&m.name, &m.value),
                PMatchOp::NotEqual => Matcher::new(&m.name, MatchOp::NotEqual, &m.value)
                    .map_err(|e| Error::Parse(e.to_string()))?,
                PMatchOp::Re(r) | PMatchOp::NotRe(r) => {
                    let neg = matches!(m.op, PMatchOp::NotRe(_));
                    let op = if neg {
                        MatchOp::NotRegex
                    } else {
                        MatchOp::Regex
                    };
                    // Compiled again, anchored as Prometheus anchors (`^(?s:…)$`; the
                    // parser's own regex lets `.` miss newlines); simple shapes are
                    // not compiled at all.
                    match Matcher::new(&m.name, op, &m.value) {
                        Ok(x) => x,
                        Err(_) => Matcher::with_regex(&m.name, neg, &m.value, r.clone()),
                    }
                }
            });
        }
        Ok(out)
    };
    if vs.matchers.or_matchers.is_empty() {
        Ok(vec![convert(&vs.matchers.matchers)?])
    } else {
        vs.matchers
            .or_matchers
            .iter()
            .map(|set| convert(set))
            .collect()
    }
}
