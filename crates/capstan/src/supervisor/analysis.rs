//! The canary's judge: each analysis interval it reads the proxy's
//! per-revision counters through PromQL, for the canary and its baseline,
//! and gives every check a verdict (pass, fail, inconclusive) with the
//! values behind it.
//!
//! The comparisons with the baseline are sequential tests that stay valid
//! however often they are looked at. Each event of interest (a 5xx
//! response, a slow response) belongs to the canary or to the baseline.
//! If both served alike, an event is the canary's with probability ρ, the
//! canary's share of the requests both served. The test weighs the
//! observed split (e_c canary events, e_b baseline events) by the mixture
//! likelihood ratio of a binomial with a uniform prior on the canary's
//! share θ against θ = ρ:
//!
//! ```text
//! Λ = B(1 + e_c, 1 + e_b) / (ρ^e_c · (1 − ρ)^e_b)
//! ```
//!
//! Under equal behaviour Λ is a nonnegative martingale with mean 1, so by
//! Ville's inequality P(Λ ever reaches 1/α) ≤ α: checking after every
//! interval, for as long as the rollout lasts, keeps the false-alarm rate at
//! most α (the mixture SPRT of Robbins, as used for anytime-valid A/B tests
//! of count data). Only a canary *worse* than its baseline fails, which
//! keeps the bound. Threshold checks (success rate, p99, a query) are read
//! over a window and fail after `failure_limit` failed runs in a row.

use std::collections::BTreeMap;

use crate::spec::{Analysis, Check, CheckKind};

/// Evaluates a PromQL expression at a time (unix ms).
pub use crate::state::control::QueryFn;

/// Share of baseline requests above the latency bound the slow-request
/// comparison picks (the bucket at the baseline's 95th percentile).
const SLOW_SHARE: f64 = 0.05;

/// One side's counters at a moment: requests, 5xx responses, and the
/// duration histogram's cumulative buckets (upper bound, count).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: f64,
    pub errors: f64,
    pub buckets: Vec<(f64, f64)>,
}

impl Counts {
    fn minus(&self, earlier: &Counts) -> Counts {
        Counts {
            requests: (self.requests - earlier.requests).max(0.0),
            errors: (self.errors - earlier.errors).max(0.0),
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |x| x.1);
                    (*le, (n - before).max(0.0))
                })
                .collect(),
        }
    }

    /// Requests slower than `bound` (a bucket's upper bound).
    fn above(&self, bound: f64) -> f64 {
        let within = self
            .buckets
            .iter()
            .find(|(le, _)| *le == bound)
            .map_or(0.0, |x| x.1);
        (self.requests - within).max(0.0)
    }

    /// A quantile from the buckets, interpolated within its bucket as
    /// `histogram_quantile` does; none without requests.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.requests <= 0.0 {
            return None;
        }
        let rank = q * self.requests;
        let (mut lo, mut below) = (0.0, 0.0);
        for (le, n) in &self.buckets {
            if *n >= rank {
                if le.is_infinite() {
                    return Some(lo);
                }
                let inside = n - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lo + (le - lo) * frac);
            }
            lo = *le;
            below = *n;
        }
        Some(lo)
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ln of the mixture likelihood ratio Λ for `canary` of `canary + baseline`
/// events when the canary's share of requests is `rho`.
pub fn ln_lambda(canary: f64, baseline: f64, rho: f64) -> f64 {
    let rho = rho.clamp(1e-9, 1.0 - 1e-9);
    let ln_beta =
        ln_gamma(1.0 + canary) + ln_gamma(1.0 + baseline) - ln_gamma(2.0 + canary + baseline);
    ln_beta - canary * rho.ln() - baseline * (1.0 - rho).ln()
}

/// The sequential comparison's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Λ, the evidence that the canary's events are more frequent.
    pub lambda: f64,
    /// The canary's share of requests (ρ) and of events.
    pub rho: f64,
    pub worse: bool,
}

/// Compares event counts; `worse` once Λ ≥ 1/α with the canary's share of
/// events above its share of requests.
pub fn compare(
    canary_events: f64,
    canary_requests: f64,
    baseline_events: f64,
    baseline_requests: f64,
    alpha: f64,
) -> Comparison {
    let total = canary_requests + baseline_requests;
    let rho = if total > 0.0 {
        canary_requests / total
    } else {
        0.5
    };
    let ln_l = ln_lambda(canary_events, baseline_events, rho);
    let events = canary_events + baseline_events;
    let share = if events > 0.0 {
        canary_events / events
    } else {
        0.0
    };
    Comparison {
        lambda: ln_l.exp(),
        rho,
        worse: share > rho && ln_l >= (1.0 / alpha).ln(),
    }
}

pub use crate::state::{CheckReport, Outcome};

/// Label matchers of the sides a rollout compares.
#[derive(Debug, Clone, PartialEq)]
pub struct Sides {
    pub service: String,
    pub canary: String,
    pub baseline: String,
    pub stable: String,
}

/// What a judge needs from outside: the side's counters, and a query's value.
pub trait Source {
    fn counts(&self, matchers: &str, at_ms: i64) -> Result<Counts, String>;
    fn value(&self, query: &str, at_ms: i64) -> Result<Option<f64>, String>;
}

/// Reads counters and values through PromQL.
pub struct PromSource(pub QueryFn);

fn scalar(v: &capstan_promql::QueryValue) -> Option<f64> {
    use capstan_promql::QueryValue;
    match v {
        QueryValue::Scalar(_, x) => Some(*x),
        QueryValue::Vector(s) if !s.is_empty() => Some(s.iter().map(|x| x.v).sum()),
        _ => None,
    }
}

impl Source for PromSource {
    fn counts(&self, m: &str, at: i64) -> Result<Counts, String> {
        use capstan_promql::QueryValue;
        let errors = (self.0)(
            &format!("sum(http_requests_total{{{m},code=~\"5..\"}})"),
            at,
        )?;
        let buckets = (self.0)(
            &format!("sum by (le) (http_request_duration_seconds_bucket{{{m}}})"),
            at,
        )?;
        let mut b: Vec<(f64, f64)> = match buckets {
            QueryValue::Vector(s) => s
                .iter()
                .filter_map(|x| Some((x.labels.get("le")?.parse::<f64>().ok()?, x.v)))
                .collect(),
            _ => Vec::new(),
        };
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        Ok(Counts {
            requests: b.last().map_or(0.0, |x| x.1),
            errors: scalar(&errors).unwrap_or(0.0),
            buckets: b,
        })
    }

    fn value(&self, q: &str, at: i64) -> Result<Option<f64>, String> {
        let v = (self.0)(q, at)?;
        if let capstan_promql::QueryValue::Vector(s) = &v
            && s.len() > 1
        {
            return Err(format!(
                "the query returned {} series; a check needs one value (aggregate it, e.g. with sum)",
                s.len()
            ));
        }
        Ok(scalar(&v).filter(|x| x.is_finite()))
    }
}

/// No metrics store: every verdict is inconclusive.
pub struct NoSource;

impl Source for NoSource {
    fn counts(&self, _: &str, _: i64) -> Result<Counts, String> {
        Err("no metrics store".into())
    }

    fn value(&self, _: &str, _: i64) -> Result<Option<f64>, String> {
        Err("no metrics store".into())
    }
}

/// The counters as the judge keeps them.
#[derive(Debug, Clone, Default)]
struct Snap {
    at_ms: i64,
    canary: Counts,
    baseline: Counts,
}

/// What one evaluation concludes.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The check that failed the canary, and why.
    pub failed: Option<String>,
    /// Every check has enough requests for a verdict.
    pub conclusive: bool,
    /// What is missing for a verdict, in words.
    pub missing: Option<String>,
    pub reports: Vec<CheckReport>,
}

pub struct Judge {
    pub cfg: Analysis,
    pub sides: Sides,
    /// Counters when the comparison began, and when the current step began.
    origin: Option<Snap>,
    step: Option<Snap>,
    history: Vec<Snap>,
    /// Consecutive failed runs per threshold check.
    streaks: BTreeMap<String, u32>,
    /// The slow-request bound, once picked, and the counters then.
    slow: Option<(f64, Snap)>,
    /// Fixed baseline counts to compare against after promotion (bake).
    frozen: Option<(Counts, Counts)>,
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn secs(x: f64) -> String {
    if x < 1.0 {
        format!("{:.1}ms", x * 1e3)
    } else {
        format!("{x:.2}s")
    }
}

impl Judge {
    pub fn new(cfg: Analysis, sides: Sides) -> Judge {
        Judge {
            cfg,
            sides,
            origin: None,
            step: None,
            history: Vec::new(),
            streaks: BTreeMap::new(),
            slow: None,
            frozen: None,
        }
    }

    fn read(&self, src: &dyn Source, at_ms: i64) -> Result<Snap, String> {
        Ok(Snap {
            at_ms,
            canary: src.counts(&self.sides.canary, at_ms)?,
            baseline: src.counts(&self.sides.baseline, at_ms)?,
        })
    }

    /// Starts counting a step's requests (and, the first time, the comparison's).
    pub fn mark_step(&mut self, src: &dyn Source, at_ms: i64) -> Result<(), String> {
        let s = self.read(src, at_ms)?;
        if self.origin.is_none() {
            self.origin = Some(s.clone());
        }
        self.step = Some(s);
        Ok(())
    }

    /// After promotion: the new revision alone is watched, against what the
    /// baseline did during the canary (`sides.canary` now selects the whole
    /// new revision).
    pub fn bake(&mut self, src: &dyn Source, sides: Sides, at_ms: i64) -> Result<(), String> {
        let (Some(origin), Some(last)) = (&self.origin, self.history.last()) else {
            self.sides = sides;
            self.origin = None;
            return self.mark_step(src, at_ms);
        };
        let base = last.baseline.minus(&origin.baseline);
        self.sides = sides;
        let now = src.counts(&self.sides.canary, at_ms)?;
        self.frozen = Some((base, Counts::default()));
        let s = Snap {
            at_ms,
            canary: now,
            baseline: Counts::default(),
        };
        self.origin = Some(s.clone());
        self.step = Some(s);
        self.history.clear();
        self.streaks.clear();
        Ok(())
    }

    /// Runs every check at `at_ms`.
    pub fn evaluate(&mut self, src: &dyn Source, at_ms: i64) -> Verdict {
        let mut now = match self.read_now(src, at_ms) {
            Ok(s) => s,
            Err(e) => {
                return Verdict {
                    failed: None,
                    conclusive: false,
                    missing: Some(format!("metrics unavailable: {e}")),
                    reports: Vec::new(),
                };
            }
        };
        if self.origin.is_none() {
            self.origin = Some(now.clone());
        }
        if self.step.is_none() {
            self.step = Some(now.clone());
        }
        if let Some((base, _)) = &self.frozen {
            now.baseline = base.clone();
        }
        self.history.push(now.clone());
        // Keep what the longest window needs.
        let longest = self
            .cfg
            .checks
            .iter()
            .map(|c| c.window.unwrap_or(self.cfg.interval).0)
            .max()
            .unwrap_or(self.cfg.interval.0)
            .as_millis() as i64;
        let keep_from = at_ms - longest - self.cfg.interval.0.as_millis() as i64;
        while self.history.len() > 2 && self.history[1].at_ms <= keep_from {
            self.history.remove(0);
        }
        let step = self.step.clone().unwrap_or_default();
        let frozen = self.frozen.is_some();
        let step_c = now.canary.minus(&step.canary);
        let step_b = if frozen {
            now.baseline.clone()
        } else {
            now.baseline.minus(&step.baseline)
        };
        let min = self.cfg.min_requests as f64;
        let missing_c = (min - step_c.requests).max(0.0);
        let missing_b = (min - step_b.requests).max(0.0);
        let enough = missing_c == 0.0 && missing_b == 0.0;
        let missing = (!enough).then(|| {
            let mut parts = Vec::new();
            if missing_c > 0.0 {
                parts.push(format!(
                    "the canary has {} of {} requests",
                    step_c.requests as u64, self.cfg.min_requests
                ));
            }
            if missing_b > 0.0 {
                parts.push(format!(
                    "the {} has {} of {} requests",
                    if frozen {
                        "previous revision"
                    } else {
                        "baseline"
                    },
                    step_b.requests as u64,
                    self.cfg.min_requests
                ));
            }
            parts.join(", ")
        });
        let checks = self.cfg.checks.clone();
        let mut reports = Vec::new();
        let mut failed = None;
        for c in &checks {
            let mut r = self.check(c, src, &now, &step_c, &step_b, enough, at_ms);
            if r.outcome == Outcome::Fail && failed.is_none() {
                let n = self.streaks.get(&c.name).copied().unwrap_or(0);
                let sequential = matches!(
                    c.kind,
                    CheckKind::ErrorsVsBaseline | CheckKind::LatencyVsBaseline
                );
                if sequential || n >= self.cfg.failure_limit {
                    failed = Some(format!(
                        "check {} failed: {} (threshold {}, {}, {} canary / {} baseline requests{})",
                        c.name,
                        r.value.map_or("no value".into(), |v| format!("{v:.4}")),
                        r.threshold,
                        r.window,
                        r.canary_requests,
                        r.baseline_requests,
                        if r.detail.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", r.detail)
                        }
                    ));
                }
            }
            if r.outcome == Outcome::Inconclusive && r.detail.is_empty() {
                r.detail = missing.clone().unwrap_or_default();
            }
            reports.push(r);
        }
        let conclusive = enough && reports.iter().all(|r| r.outcome != Outcome::Inconclusive);
        let missing = match missing {
            None if !conclusive => Some(
                reports
                    .iter()
                    .filter(|r| r.outcome == Outcome::Inconclusive)
                    .map(|r| {
                        format!(
                            "check {} has no verdict yet ({} canary / {} baseline requests, {} each needed)",
                            r.name, r.canary_requests, r.baseline_requests, self.cfg.min_requests
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            m => m,
        };
        Verdict {
            failed,
            conclusive,
            missing,
            reports,
        }
    }

    fn read_now(&self, src: &dyn Source, at_ms: i64) -> Result<Snap, String> {
        if self.frozen.is_some() {
            return Ok(Snap {
                at_ms,
                canary: src.counts(&self.sides.canary, at_ms)?,
                baseline: Counts::default(),
            });
        }
        self.read(src, at_ms)
    }

    /// The snapshot a window of `ms` starts from (the step's start at most).
    fn window_start(&self, ms: i64, at_ms: i64) -> Snap {
        let step = self.step.clone().unwrap_or_default();
        let from = at_ms - ms;
        self.history
            .iter()
            .rev()
            .find(|s| s.at_ms <= from)
            .filter(|s| s.at_ms >= step.at_ms)
            .cloned()
            .unwrap_or(step)
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        c: &Check,
        src: &dyn Source,
        now: &Snap,
        step_c: &Counts,
        step_b: &Counts,
        enough: bool,
        at_ms: i64,
    ) -> CheckReport {
        let window = c.window.unwrap_or(self.cfg.interval);
        let start = self.window_start(window.0.as_millis() as i64, at_ms);
        let win_c = now.canary.minus(&start.canary);
        let mut r = CheckReport {
            name: c.name.clone(),
            outcome: Outcome::Inconclusive,
            value: None,
            threshold: String::new(),
            window: format!("last {window}"),
            canary_requests: step_c.requests as u64,
            baseline_requests: step_b.requests as u64,
            detail: String::new(),
        };
        let bounds = |v: f64| c.min.is_none_or(|m| v >= m) && c.max.is_none_or(|m| v <= m);
        let threshold = |fmt: &dyn Fn(f64) -> String| {
            let mut t = Vec::new();
            if let Some(m) = c.min {
                t.push(format!(">= {}", fmt(m)));
            }
            if let Some(m) = c.max {
                t.push(format!("<= {}", fmt(m)));
            }
            t.join(" and ")
        };
        let origin = self.origin.clone().unwrap_or_default();
        match &c.kind {
            CheckKind::SuccessRate => {
                r.threshold = threshold(&pct);
                if enough && win_c.requests > 0.0 {
                    let v = 1.0 - win_c.errors / win_c.requests;
                    r.value = Some(v);
                    r.outcome = if bounds(v) {
                        Outcome::Pass
                    } else {
                        Outcome::Fail
                    };
                    r.detail = format!(
                        "{} of {} requests failed",
                        win_c.errors as u64, win_c.requests as u64
                    );
                }
            }
            CheckKind::LatencyP99 => {
                r.threshold = threshold(&secs);
                if enough && let Some(v) = win_c.quantile(0.99) {
                    r.value = Some(v);
                    r.outcome = if bounds(v) {
                        Outcome::Pass
                    } else {
                        Outcome::Fail
                    };
                    r.detail = format!("p99 {} over {} requests", secs(v), win_c.requests as u64);
                }
            }
            CheckKind::ErrorsVsBaseline => {
                let (cn, bn) = self.since_origin(now, &origin);
                r.window = self.since_words().into();
                r.canary_requests = cn.requests as u64;
                r.baseline_requests = bn.requests as u64;
                let t = compare(
                    cn.errors,
                    cn.requests,
                    bn.errors,
                    bn.requests,
                    self.cfg.alpha,
                );
                r.value = Some(t.lambda);
                r.threshold = format!("Λ < {} (α {})", 1.0 / self.cfg.alpha, self.cfg.alpha);
                r.detail = format!(
                    "5xx: canary {} of {} ({}), {} {} of {} ({}); mixture SPRT",
                    cn.errors as u64,
                    cn.requests as u64,
                    pct(ratio(cn.errors, cn.requests)),
                    self.other_words(),
                    bn.errors as u64,
                    bn.requests as u64,
                    pct(ratio(bn.errors, bn.requests)),
                );
                r.outcome = if t.worse {
                    Outcome::Fail
                } else if enough {
                    Outcome::Pass
                } else {
                    Outcome::Inconclusive
                };
            }
            CheckKind::LatencyVsBaseline => {
                r.window = self.since_words().into();
                r.threshold = format!("Λ < {} (α {})", 1.0 / self.cfg.alpha, self.cfg.alpha);
                if self.slow.is_none() && enough {
                    // The bound is fixed from what came before the counting.
                    let (_, bn) = self.since_origin(now, &origin);
                    if let Some(le) = slow_bound(&bn) {
                        self.slow = Some((le, now.clone()));
                    }
                }
                match self.slow.clone() {
                    None => {
                        r.detail = "picking the slow-request bound from the baseline".into();
                    }
                    Some((le, at)) => {
                        let cn = now.canary.minus(&at.canary);
                        let bn = if self.frozen.is_some() {
                            now.baseline.clone()
                        } else {
                            now.baseline.minus(&at.baseline)
                        };
                        let (ce, be) = (cn.above(le), bn.above(le));
                        let t = compare(ce, cn.requests, be, bn.requests, self.cfg.alpha);
                        r.value = Some(t.lambda);
                        r.canary_requests = cn.requests as u64;
                        r.baseline_requests = bn.requests as u64;
                        r.detail = format!(
                            "slower than {}: canary {} of {} ({}), {} {} of {} ({}); mixture SPRT",
                            secs(le),
                            ce as u64,
                            cn.requests as u64,
                            pct(ratio(ce, cn.requests)),
                            self.other_words(),
                            be as u64,
                            bn.requests as u64,
                            pct(ratio(be, bn.requests)),
                        );
                        // Counted since the bound was fixed: a pass needs
                        // min_requests on each side again.
                        let min = self.cfg.min_requests as f64;
                        r.outcome = if t.worse {
                            Outcome::Fail
                        } else if enough && cn.requests >= min && bn.requests >= min {
                            Outcome::Pass
                        } else {
                            Outcome::Inconclusive
                        };
                    }
                }
            }
            CheckKind::Query(q) => {
                r.threshold = threshold(&|x| format!("{x}"));
                let values = [
                    ("canary", self.sides.canary.as_str()),
                    ("baseline", self.sides.baseline.as_str()),
                    ("stable", self.sides.stable.as_str()),
                    ("service", self.sides.service.as_str()),
                    ("interval", &window.to_string()),
                ];
                let q = crate::spec::decode::placeholders(q, &values).unwrap_or_else(|_| q.clone());
                match src.value(&q, at_ms) {
                    Ok(Some(v)) if enough => {
                        r.value = Some(v);
                        r.outcome = if bounds(v) {
                            Outcome::Pass
                        } else {
                            Outcome::Fail
                        };
                    }
                    Ok(Some(v)) => r.value = Some(v),
                    Ok(None) => r.detail = format!("no value from {q} (inconclusive, not failed)"),
                    Err(e) => r.detail = format!("{q}: {e}"),
                }
            }
        }
        match r.outcome {
            Outcome::Fail => {
                *self.streaks.entry(c.name.clone()).or_default() += 1;
                let n = self.streaks[&c.name];
                if !matches!(
                    c.kind,
                    CheckKind::ErrorsVsBaseline | CheckKind::LatencyVsBaseline
                ) {
                    let d = format!("failed {n} of {} runs in a row", self.cfg.failure_limit);
                    r.detail = if r.detail.is_empty() {
                        d
                    } else {
                        format!("{}; {d}", r.detail)
                    };
                }
            }
            Outcome::Pass => {
                self.streaks.remove(&c.name);
            }
            Outcome::Inconclusive => {}
        }
        r
    }

    fn since_origin(&self, now: &Snap, origin: &Snap) -> (Counts, Counts) {
        let c = now.canary.minus(&origin.canary);
        let b = if self.frozen.is_some() {
            now.baseline.clone()
        } else {
            now.baseline.minus(&origin.baseline)
        };
        (c, b)
    }

    fn since_words(&self) -> &'static str {
        if self.frozen.is_some() {
            "since promotion, against the baseline during the canary"
        } else {
            "since the canary started"
        }
    }

    fn other_words(&self) -> &'static str {
        if self.frozen.is_some() {
            "previous revision"
        } else if self.sides.baseline == self.sides.stable {
            "stable"
        } else {
            "baseline"
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The smallest bucket bound with at most [`SLOW_SHARE`] of `c`'s requests
/// above it (not +Inf); none when every finite bound has more above it.
fn slow_bound(c: &Counts) -> Option<f64> {
    if c.requests <= 0.0 {
        return None;
    }
    c.buckets
        .iter()
        .filter(|(le, _)| le.is_finite())
        .find(|(_, n)| (c.requests - n) / c.requests <= SLOW_SHARE)
        .map(|x| x.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut f = 1.0f64;
        for n in 1..30 {
            f *= n as f64;
            assert!((ln_gamma(n as f64 + 1.0) - f.ln()).abs() < 1e-9, "{n}");
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-9);
    }

    #[test]
    fn all_errors_on_the_canary_fail_after_a_handful() {
        // ρ = 0.5 and no baseline errors: Λ = 2^e / (e + 1).
        let l = |e: f64| compare(e, 1000.0, 0.0, 1000.0, 0.01);
        assert!(!l(10.0).worse, "Λ(10) = {}", l(10.0).lambda);
        assert!(l(11.0).worse, "Λ(11) = {}", l(11.0).lambda);
        assert!((l(10.0).lambda - 1024.0 / 11.0).abs() < 1e-6);
        // A better canary never fails.
        assert!(!compare(0.0, 1000.0, 50.0, 1000.0, 0.01).worse);
    }

    /// Draws from a seeded generator.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Runs of a sequential comparison looked at after every `look` requests
    /// per side; the share of runs that ever declared the canary worse.
    fn alarm_rate(p_canary: f64, p_base: f64, runs: u32, looks: u32, look: u32) -> f64 {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut alarms = 0;
        for _ in 0..runs {
            let (mut ec, mut eb, mut n) = (0.0, 0.0, 0.0);
            for _ in 0..looks {
                for _ in 0..look {
                    ec += f64::from(u8::from(rng.next() < p_canary));
                    eb += f64::from(u8::from(rng.next() < p_base));
                }
                n += f64::from(look);
                if compare(ec, n, eb, n, 0.01).worse {
                    alarms += 1;
                    break;
                }
            }
        }
        f64::from(alarms) / f64::from(runs)
    }

    #[test]
    fn checked_every_interval_the_false_alarm_rate_stays_under_alpha() {
        // A/A: both sides fail 1% of requests; 60 looks of 250 requests each.
        let rate = alarm_rate(0.01, 0.01, 400, 60, 250);
        assert!(rate <= 0.02, "false alarms in {rate} of runs");
        // A real 1-point regression is found.
        let power = alarm_rate(0.02, 0.01, 100, 60, 250);
        assert!(power >= 0.9, "found in {power} of runs");
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let c = Counts {
            requests: 100.0,
            errors: 0.0,
            buckets: vec![
                (0.1, 50.0),
                (0.2, 90.0),
                (0.4, 100.0),
                (f64::INFINITY, 100.0),
            ],
        };
        assert!((c.quantile(0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((c.quantile(0.99).unwrap() - 0.38).abs() < 1e-9);
        assert_eq!(slow_bound(&c), Some(0.4));
        assert_eq!(c.above(0.2), 10.0);
    }

    /// Counters that grow as a test says.
    struct Fake {
        canary: RefCell<Counts>,
        baseline: RefCell<Counts>,
    }

    fn counts(n: f64, errors: f64) -> Counts {
        Counts {
            requests: n,
            errors,
            buckets: vec![(0.01, n), (f64::INFINITY, n)],
        }
    }

    impl Source for Fake {
        fn counts(&self, m: &str, _: i64) -> Result<Counts, String> {
            Ok(if m.contains("revision=\"2\"") {
                self.canary.borrow().clone()
            } else {
                self.baseline.borrow().clone()
            })
        }
        fn value(&self, q: &str, _: i64) -> Result<Option<f64>, String> {
            // The placeholders are filled in before the query runs.
            Ok(match q {
                "sum(rate(errors_total{ service=\"web\",revision=\"2\" }[1s]))" => Some(3.0),
                "sum(queue{service=\"web\"})" => None,
                other => panic!("unexpected query {other}"),
            })
        }
    }

    #[test]
    fn query_checks_fill_placeholders_and_treat_no_value_as_inconclusive() {
        let mut cfg = Analysis::defaults();
        cfg.interval = crate::spec::Dur::secs(1);
        cfg.min_requests = 1;
        cfg.checks = vec![
            Check {
                max: Some(2.0),
                ..Check::new(
                    "errors",
                    CheckKind::Query(
                        "sum(rate(errors_total{ {{canary}} }[{{ interval }}]))".into(),
                    ),
                )
            },
            Check {
                max: Some(10.0),
                ..Check::new(
                    "queue",
                    CheckKind::Query("sum(queue{service=\"{{service}}\"})".into()),
                )
            },
        ];
        let src = Fake {
            canary: RefCell::new(counts(0.0, 0.0)),
            baseline: RefCell::new(counts(0.0, 0.0)),
        };
        let mut j = Judge::new(cfg, sides());
        j.mark_step(&src, 0).unwrap();
        *src.canary.borrow_mut() = counts(10.0, 0.0);
        *src.baseline.borrow_mut() = counts(10.0, 0.0);
        let v = j.evaluate(&src, 1_000);
        assert_eq!(v.reports[0].outcome, Outcome::Fail);
        assert_eq!(v.reports[0].value, Some(3.0));
        assert_eq!(v.reports[0].threshold, "<= 2");
        assert_eq!(v.reports[1].outcome, Outcome::Inconclusive);
        assert!(
            v.reports[1].detail.starts_with("no value from"),
            "{:?}",
            v.reports[1]
        );
        assert!(!v.conclusive && v.failed.is_none());
        let v = j.evaluate(&src, 2_000);
        assert!(v.failed.unwrap().starts_with("check errors failed: 3.0000"));
    }

    fn sides() -> Sides {
        Sides {
            service: "web".into(),
            canary: "service=\"web\",revision=\"2\"".into(),
            baseline: "service=\"web\",revision=\"1\",replica=~\"3\"".into(),
            stable: "service=\"web\",revision=\"1\",replica!~\"3\"".into(),
        }
    }

    #[test]
    fn too_few_requests_is_inconclusive_never_pass_or_fail() {
        let mut cfg = Analysis::defaults();
        cfg.min_requests = 100;
        cfg.checks.push(Check {
            min: Some(0.99),
            ..Check::new("success-rate", CheckKind::SuccessRate)
        });
        let src = Fake {
            canary: RefCell::new(counts(0.0, 0.0)),
            baseline: RefCell::new(counts(0.0, 0.0)),
        };
        let mut j = Judge::new(cfg, sides());
        j.mark_step(&src, 0).unwrap();
        *src.canary.borrow_mut() = counts(10.0, 5.0);
        *src.baseline.borrow_mut() = counts(12.0, 0.0);
        let v = j.evaluate(&src, 10_000);
        assert!(v.failed.is_none() && !v.conclusive, "{v:?}");
        assert_eq!(
            v.missing.as_deref(),
            Some("the canary has 10 of 100 requests, the baseline has 12 of 100 requests")
        );
        let sr = v.reports.iter().find(|r| r.name == "success-rate").unwrap();
        assert_eq!(sr.outcome, Outcome::Inconclusive);
        // Enough traffic, and a canary failing half its requests: the
        // sequential test fails it at once, the threshold needs 2 runs.
        *src.canary.borrow_mut() = counts(200.0, 100.0);
        *src.baseline.borrow_mut() = counts(200.0, 0.0);
        let v = j.evaluate(&src, 20_000);
        let why = v.failed.unwrap();
        assert!(why.starts_with("check errors-vs-baseline failed"), "{why}");
    }

    #[test]
    fn a_threshold_fails_after_failure_limit_runs_in_a_row() {
        let mut cfg = Analysis::defaults();
        cfg.min_requests = 10;
        cfg.checks = vec![Check {
            min: Some(0.99),
            ..Check::new("success-rate", CheckKind::SuccessRate)
        }];
        let src = Fake {
            canary: RefCell::new(counts(0.0, 0.0)),
            baseline: RefCell::new(counts(0.0, 0.0)),
        };
        let mut j = Judge::new(cfg, sides());
        j.mark_step(&src, 0).unwrap();
        *src.canary.borrow_mut() = counts(100.0, 5.0);
        *src.baseline.borrow_mut() = counts(100.0, 0.0);
        let v = j.evaluate(&src, 10_000);
        assert!(v.failed.is_none());
        assert_eq!(v.reports[0].outcome, Outcome::Fail);
        assert_eq!(v.reports[0].value, Some(0.95));
        *src.canary.borrow_mut() = counts(200.0, 10.0);
        *src.baseline.borrow_mut() = counts(200.0, 0.0);
        let v = j.evaluate(&src, 20_000);
        let why = v.failed.unwrap();
        assert!(why.contains("check success-rate failed: 0.9500"), "{why}");
        assert!(why.contains("failed 2 of 2 runs in a row"), "{why}");
    }
}
