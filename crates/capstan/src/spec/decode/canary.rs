//! `x-capstan.rollout`: the canary strategy, its steps and its analysis.

use super::{Decoder, join};
use crate::spec::model::*;
use crate::spec::yaml::{Kind, Node};

/// Most steps a canary may have.
pub const MAX_STEPS: usize = 100;
/// Most checks an analysis may have.
pub const MAX_CHECKS: usize = 20;

/// A query check's text with its placeholders filled in: `{{canary}}`,
/// `{{baseline}}`, `{{stable}}` (label matchers), `{{service}}`,
/// `{{interval}}` (spaces inside the braces allowed). Compose's own `$`
/// interpolation leaves these alone.
pub fn placeholders(q: &str, values: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::with_capacity(q.len());
    let mut rest = q;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find("}}") else {
            return Err("an unclosed {{".into());
        };
        let name = after[..end].trim();
        match values.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => out.push_str(v),
            None => {
                return Err(format!(
                    "unknown placeholder {{{{{name}}}}} (known: {})",
                    values
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Decoder<'_> {
    /// `x-capstan.rollout`: a canary, or a rolling update's analysis.
    pub(super) fn rollout(&mut self, node: &Node, path: &str, x: &mut ServiceX) {
        x.rollout = self.rollout_inner(node, path, &mut x.analysis);
    }

    fn rollout_inner(
        &mut self,
        node: &Node,
        path: &str,
        rolling: &mut Option<Analysis>,
    ) -> Option<Canary> {
        let mut f = self.fields(node, path)?;
        let strategy = f
            .take("strategy")
            .and_then(|n| self.text(n, &join(path, "strategy")).map(|s| (n, s)));
        match strategy {
            Some((_, s)) if s == "canary" => {}
            Some((_, s)) if s == "rolling" => {
                if let Some(n) = f.take("analysis") {
                    let mut a = Analysis::defaults();
                    self.analysis(n, &join(path, "analysis"), &mut a);
                    *rolling = Some(a);
                }
                self.finish(f, path, &[]);
                return None;
            }
            Some((n, s)) => {
                self.error(
                    n,
                    &join(path, "strategy"),
                    format!("expected canary or rolling, found {s:?}"),
                );
                return None;
            }
            None => {
                self.error(
                    node,
                    path,
                    "missing key: strategy (canary, or rolling for deploy.update_config)",
                );
                return None;
            }
        }
        let mut c = Canary {
            steps: vec![
                CanaryStep::Weight(10),
                CanaryStep::Pause(Some(Dur::secs(60))),
                CanaryStep::Weight(50),
                CanaryStep::Pause(Some(Dur::secs(60))),
            ],
            baseline: true,
            sticky: None,
            bake: Dur::secs(0),
            analysis: Analysis::defaults(),
        };
        if let Some(n) = f.take("steps") {
            let sp = join(path, "steps");
            match &n.kind {
                Kind::Seq(items) if items.is_empty() => {
                    self.error(n, &sp, "a canary needs at least one step")
                }
                Kind::Seq(items) if items.len() > MAX_STEPS => self.error(
                    n,
                    &sp,
                    format!("at most {MAX_STEPS} steps, found {}", items.len()),
                ),
                Kind::Seq(items) => {
                    c.steps = items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, item)| self.canary_step(item, &format!("{sp}[{i}]")))
                        .collect();
                }
                _ => self.error(
                    n,
                    &sp,
                    format!("expected a list of steps, found {}", n.describe()),
                ),
            }
        }
        if let Some(n) = f.take("baseline")
            && let Some(b) = self.boolean(n, &join(path, "baseline"))
        {
            c.baseline = b;
        }
        if let Some(n) = f.take("bake")
            && let Some(d) = self.duration(n, &join(path, "bake"))
        {
            c.bake = d;
        }
        if let Some(n) = f.take("sticky") {
            let sp = join(path, "sticky");
            if let Some(mut sf) = self.fields(n, &sp) {
                let header = sf.take("header");
                let cookie = sf.take("cookie");
                c.sticky = match (header, cookie) {
                    (Some(h), None) => self
                        .text(h, &join(&sp, "header"))
                        .map(|v| Sticky::Header(v.to_ascii_lowercase())),
                    (None, Some(k)) => {
                        let p = join(&sp, "cookie");
                        self.text(k, &p).and_then(|v| {
                            let ok = !v.is_empty()
                                && v.bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                            if ok {
                                Some(Sticky::Cookie(v))
                            } else {
                                self.error(
                                    k,
                                    &p,
                                    format!("not a cookie name: {v:?} (letters, digits, - _ .)"),
                                );
                                None
                            }
                        })
                    }
                    _ => {
                        self.error(n, &sp, "expected one of header: NAME or cookie: NAME");
                        None
                    }
                };
                self.finish(sf, &sp, &[]);
            }
        }
        if let Some(n) = f.take("analysis") {
            self.analysis(n, &join(path, "analysis"), &mut c.analysis);
        }
        self.finish(f, path, &[]);
        Some(c)
    }

    fn canary_step(&mut self, node: &Node, path: &str) -> Option<CanaryStep> {
        let mut f = self.fields(node, path)?;
        let step = if let Some(n) = f.take("weight") {
            let p = join(path, "weight");
            match self.uint(n, &p, 100) {
                Some(0) => {
                    self.error(n, &p, "a weight is a percent from 1 to 100");
                    None
                }
                w => w.map(|w| CanaryStep::Weight(w as u32)),
            }
        } else if let Some(n) = f.take("pause") {
            let p = join(path, "pause");
            match &n.kind {
                Kind::Map(m) if m.is_empty() => Some(CanaryStep::Pause(None)),
                Kind::Null => Some(CanaryStep::Pause(None)),
                Kind::Map(_) => {
                    let mut pf = self.fields(n, &p)?;
                    let d = pf
                        .take("duration")
                        .and_then(|d| self.duration(d, &join(&p, "duration")));
                    self.finish(pf, &p, &[]);
                    Some(CanaryStep::Pause(d))
                }
                _ => self.duration(n, &p).map(|d| CanaryStep::Pause(Some(d))),
            }
        } else {
            self.error(node, path, "expected weight: PERCENT or pause: DURATION|{}");
            None
        };
        self.finish(f, path, &[]);
        step
    }

    fn analysis(&mut self, node: &Node, path: &str, a: &mut Analysis) {
        let Some(mut f) = self.fields(node, path) else {
            return;
        };
        if let Some(n) = f.take("interval")
            && let Some(d) = self.duration(n, &join(path, "interval"))
        {
            if d.0 < std::time::Duration::from_secs(1) {
                self.error(n, &join(path, "interval"), "must be at least 1s");
            } else {
                a.interval = d;
            }
        }
        if let Some(n) = f.take("deadline")
            && let Some(d) = self.duration(n, &join(path, "deadline"))
        {
            a.deadline = d;
        }
        if let Some(n) = f.take("failure_limit")
            && let Some(v) = self.uint(n, &join(path, "failure_limit"), 1000)
        {
            if v == 0 {
                self.error(n, &join(path, "failure_limit"), "must be at least 1");
            } else {
                a.failure_limit = v as u32;
            }
        }
        if let Some(n) = f.take("min_requests")
            && let Some(v) = self.uint(n, &join(path, "min_requests"), 1_000_000_000)
        {
            a.min_requests = v.max(1);
        }
        if let Some(n) = f.take("on_inconclusive") {
            let p = join(path, "on_inconclusive");
            match self.text(n, &p).as_deref() {
                Some("pause") => a.on_inconclusive = FailureAction::Pause,
                Some("rollback") => a.on_inconclusive = FailureAction::Rollback,
                Some(o) => self.error(n, &p, format!("expected pause or rollback, found {o:?}")),
                None => {}
            }
        }
        if let Some(n) = f.take("alpha") {
            let p = join(path, "alpha");
            match self.number(n, &p, false, "a false-alarm bound between 0 and 0.5") {
                Some(v) if v < 0.5 => a.alpha = v,
                Some(_) => self.error(n, &p, "expected a false-alarm bound between 0 and 0.5"),
                None => {}
            }
        }
        if let Some(n) = f.take("checks") {
            let cp = join(path, "checks");
            match &n.kind {
                Kind::Seq(items) if items.len() > MAX_CHECKS => self.error(
                    n,
                    &cp,
                    format!("at most {MAX_CHECKS} checks, found {}", items.len()),
                ),
                Kind::Seq(items) => {
                    a.checks = items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, item)| self.check(item, &format!("{cp}[{i}]")))
                        .collect();
                    let mut seen = std::collections::BTreeSet::new();
                    for (i, c) in a.checks.iter().enumerate() {
                        if !seen.insert(c.name.clone()) {
                            self.error(
                                &items[i],
                                &format!("{cp}[{i}]"),
                                format!("two checks are named {:?}", c.name),
                            );
                        }
                    }
                }
                _ => self.error(
                    n,
                    &cp,
                    format!("expected a list of checks, found {}", n.describe()),
                ),
            }
        }
        self.finish(f, path, &[]);
    }

    fn check(&mut self, node: &Node, path: &str) -> Option<Check> {
        let mut f = self.fields(node, path)?;
        let kind = match (f.take("check"), f.take("query")) {
            (Some(n), None) => {
                let p = join(path, "check");
                match self.text(n, &p).as_deref() {
                    Some("success-rate") => CheckKind::SuccessRate,
                    Some("latency-p99") => CheckKind::LatencyP99,
                    Some("errors-vs-baseline") => CheckKind::ErrorsVsBaseline,
                    Some("latency-vs-baseline") => CheckKind::LatencyVsBaseline,
                    Some(o) => {
                        self.error(n, &p, format!("expected success-rate, latency-p99, errors-vs-baseline or latency-vs-baseline, found {o:?}"));
                        return None;
                    }
                    None => return None,
                }
            }
            (None, Some(n)) => {
                let p = join(path, "query");
                let q = self.text(n, &p)?;
                let m = "service=\"s\"";
                let values = [
                    ("canary", m),
                    ("baseline", m),
                    ("stable", m),
                    ("service", "s"),
                    ("interval", "1m"),
                ];
                let probe = match placeholders(&q, &values) {
                    Ok(p) => p,
                    Err(e) => {
                        self.error(n, &p, e);
                        return None;
                    }
                };
                if let Err(e) = capstan_promql::parse(&probe) {
                    self.error(n, &p, format!("not a valid PromQL expression: {e}"));
                    return None;
                }
                CheckKind::Query(q)
            }
            _ => {
                self.error(node, path, "expected one of check: NAME or query: PROMQL");
                return None;
            }
        };
        let default_name = match &kind {
            CheckKind::SuccessRate => "success-rate",
            CheckKind::LatencyP99 => "latency-p99",
            CheckKind::ErrorsVsBaseline => "errors-vs-baseline",
            CheckKind::LatencyVsBaseline => "latency-vs-baseline",
            CheckKind::Query(_) => "query",
        };
        let name = match f.take("name") {
            Some(n) => self.text(n, &join(path, "name"))?,
            None => default_name.to_owned(),
        };
        let mut c = Check::new(&name, kind);
        for key in ["min", "max"] {
            let Some(n) = f.take(key) else { continue };
            let p = join(path, key);
            // Latency bounds read as durations (`500ms`) or seconds.
            let v = match (&c.kind, &n.kind) {
                (CheckKind::LatencyP99, Kind::Str(_)) => {
                    self.duration(n, &p).map(|d| d.0.as_secs_f64())
                }
                (_, Kind::Int(i)) => Some(*i as f64),
                (_, Kind::Float(x)) if x.is_finite() => Some(*x),
                _ => {
                    let t = self.text(n, &p);
                    match t
                        .as_deref()
                        .map(str::trim)
                        .and_then(|t| t.parse::<f64>().ok())
                    {
                        Some(v) if v.is_finite() => Some(v),
                        _ => {
                            self.error(n, &p, format!("expected a number, found {}", n.describe()));
                            None
                        }
                    }
                }
            };
            if key == "min" {
                c.min = v;
            } else {
                c.max = v;
            }
        }
        if let Some(n) = f.take("window") {
            c.window = self.duration(n, &join(path, "window"));
        }
        match &c.kind {
            CheckKind::SuccessRate => {
                let m = c.min.get_or_insert(0.99);
                if !(0.0..=1.0).contains(m) {
                    self.error(node, &join(path, "min"), "a success rate is from 0 to 1");
                }
            }
            CheckKind::LatencyP99 if c.max.is_none() => self.error(
                node,
                path,
                "latency-p99 needs max: (a duration such as 300ms)",
            ),
            CheckKind::Query(_) if c.min.is_none() && c.max.is_none() => {
                self.error(node, path, "a query check needs min:, max: or both")
            }
            _ => {}
        }
        self.finish(f, path, &[]);
        Some(c)
    }
}
