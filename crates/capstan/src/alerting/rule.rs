//! Rules as they run: a recording rule writes its result under a new name;
//! an alerting rule keeps its alerts through Prometheus' states (pending
//! until `for` has passed, firing, kept firing for `keep_firing_for`,
//! resolved) and writes `ALERTS` and `ALERTS_FOR_STATE`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::file::{Rule, RuleKind};
use super::template;

/// A label set, sorted by name.
pub type LabelMap = BTreeMap<String, String>;

/// How long a resolved alert is kept (and sent as resolved).
pub const RESOLVED_RETENTION_MS: i64 = 15 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Inactive,
    Pending,
    Firing,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Inactive => "inactive",
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub labels: LabelMap,
    pub annotations: LabelMap,
    pub state: AlertState,
    pub active_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fired_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_at_ms: Option<i64>,
    /// When the condition last stopped holding while `keep_firing_for` keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_firing_since_ms: Option<i64>,
    pub value: f64,
    /// When it was last sent to the Alertmanagers.
    #[serde(skip)]
    pub last_sent_ms: Option<i64>,
    /// Firing alerts of the services this alert's service depends on, that
    /// hold it back (not sent; shown as inhibited).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inhibited_by: Vec<String>,
}

impl Alert {
    /// Whether it is due to be sent at `t`: firing and not sent for
    /// `resend`, or resolved since it was last sent (Prometheus' rule).
    pub fn needs_sending(&self, t: i64, resend_ms: i64) -> bool {
        match self.state {
            AlertState::Pending => false,
            AlertState::Inactive => self
                .resolved_at_ms
                .is_some_and(|r| self.last_sent_ms.is_some_and(|s| r > s)),
            AlertState::Firing => self.last_sent_ms.is_none_or(|s| s + resend_ms <= t),
        }
    }
}

/// A transition, for the history and the notifications.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub alert: Alert,
    pub from: AlertState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Unknown,
    Ok,
    Err,
}

/// A rule with its state.
#[derive(Debug, Clone)]
pub struct RuleState {
    pub rule: Rule,
    pub health: Health,
    pub last_error: Option<String>,
    pub last_eval_ms: Option<i64>,
    pub eval_secs: f64,
    /// Alerting rules: alerts by their label set.
    pub active: BTreeMap<LabelMap, Alert>,
    /// The label sets `recover_expr` returned at this evaluation (set
    /// before [`RuleState::apply`]).
    pub recovered: Vec<LabelMap>,
}

/// What one evaluation of a rule writes: series (with `__name__`) and values.
pub type Written = Vec<(LabelMap, f64)>;

impl RuleState {
    pub fn new(rule: Rule) -> RuleState {
        RuleState {
            rule,
            health: Health::Unknown,
            last_error: None,
            last_eval_ms: None,
            eval_secs: 0.0,
            active: BTreeMap::new(),
            recovered: Vec::new(),
        }
    }

    fn fail(&mut self, e: String) -> Written {
        self.health = Health::Err;
        self.last_error = Some(e);
        Vec::new()
    }

    /// Applies the result of the rule's expression at `t_ms` (samples
    /// without their `__name__`, or the query's error). Returns what to
    /// write, and the alerts' transitions.
    pub fn apply(
        &mut self,
        t_ms: i64,
        result: Result<Vec<(LabelMap, f64)>, String>,
        external: &LabelMap,
        limit: u64,
    ) -> (Written, Vec<Transition>) {
        self.apply_with(t_ms, result, external, limit, None)
    }

    /// [`RuleState::apply`], with what `query` in templates runs.
    pub fn apply_with(
        &mut self,
        t_ms: i64,
        result: Result<Vec<(LabelMap, f64)>, String>,
        external: &LabelMap,
        limit: u64,
        query: Option<template::QueryFn<'_>>,
    ) -> (Written, Vec<Transition>) {
        self.last_eval_ms = Some(t_ms);
        let samples = match result {
            Ok(s) => s,
            Err(e) => return (self.fail(e), Vec::new()),
        };
        match self.rule.kind.clone() {
            RuleKind::Record(name) => (self.record(&name, samples, limit), Vec::new()),
            RuleKind::Alert(name) => self.alert(&name, t_ms, samples, external, limit, query),
        }
    }

    fn record(&mut self, name: &str, samples: Vec<(LabelMap, f64)>, limit: u64) -> Written {
        if limit > 0 && samples.len() as u64 > limit {
            return self.fail(format!(
                "exceeded limit {limit} with {} series",
                samples.len()
            ));
        }
        let mut out: Written = Vec::with_capacity(samples.len());
        for (mut labels, v) in samples {
            for (k, val) in &self.rule.labels {
                if val.is_empty() {
                    labels.remove(k);
                } else {
                    labels.insert(k.clone(), val.clone());
                }
            }
            labels.insert("__name__".into(), name.to_owned());
            if out.iter().any(|(l, _)| *l == labels) {
                return self.fail(
                    "vector contains metrics with the same labelset after applying rule labels"
                        .into(),
                );
            }
            out.push((labels, v));
        }
        self.health = Health::Ok;
        self.last_error = None;
        out
    }

    fn alert(
        &mut self,
        name: &str,
        t: i64,
        samples: Vec<(LabelMap, f64)>,
        external: &LabelMap,
        limit: u64,
        query: Option<template::QueryFn<'_>>,
    ) -> (Written, Vec<Transition>) {
        let before: BTreeMap<LabelMap, AlertState> = self
            .active
            .iter()
            .map(|(k, a)| (k.clone(), a.state))
            .collect();
        let mut seen: BTreeMap<LabelMap, (f64, LabelMap)> = BTreeMap::new();
        let mut problems = Vec::new();
        for (labels, v) in samples {
            let data = template::Data {
                labels: labels.clone(),
                external_labels: external.clone(),
                value: v,
                query,
            };
            let expand = |src: &str, problems: &mut Vec<String>| match template::expand(src, &data)
            {
                Ok(s) => s,
                Err(e) => {
                    problems.push(e.clone());
                    format!("<error expanding template: {e}>")
                }
            };
            let mut full = labels.clone();
            for (k, val) in &self.rule.labels {
                let val = expand(val, &mut problems);
                if val.is_empty() {
                    full.remove(k);
                } else {
                    full.insert(k.clone(), val);
                }
            }
            full.insert("alertname".into(), name.to_owned());
            let annotations: LabelMap = self
                .rule
                .annotations
                .iter()
                .map(|(k, src)| (k.clone(), expand(src, &mut problems)))
                .collect();
            if seen.insert(full, (v, annotations)).is_some() {
                self.active.clear();
                return (
                    self.fail(
                        "vector contains metrics with the same labelset after applying alert labels"
                            .into(),
                    ),
                    Vec::new(),
                );
            }
        }
        for (labels, (v, annotations)) in &seen {
            match self.active.get_mut(labels) {
                Some(a) if a.state != AlertState::Inactive => {
                    a.value = *v;
                    a.annotations = annotations.clone();
                    a.keep_firing_since_ms = None;
                }
                _ => {
                    self.active.insert(
                        labels.clone(),
                        Alert {
                            labels: labels.clone(),
                            annotations: annotations.clone(),
                            state: AlertState::Pending,
                            active_at_ms: t,
                            fired_at_ms: None,
                            resolved_at_ms: None,
                            keep_firing_since_ms: None,
                            value: *v,
                            last_sent_ms: None,
                            inhibited_by: Vec::new(),
                        },
                    );
                }
            }
        }
        let hold = self.rule.for_.as_millis() as i64;
        let keep = self.rule.keep_firing_for.as_millis() as i64;
        let hysteresis = self.rule.recover_expr.is_some();
        let recovered = std::mem::take(&mut self.recovered);
        // A recovery sample covers an alert when the alert has each of its labels.
        let recovers = |labels: &LabelMap| {
            recovered
                .iter()
                .any(|r| r.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        self.active.retain(|labels, a| {
            if seen.contains_key(labels) {
                return true;
            }
            if hysteresis && a.state == AlertState::Firing && !recovers(labels) {
                a.keep_firing_since_ms.get_or_insert(t);
                return true;
            }
            if a.state == AlertState::Firing && keep > 0 {
                let since = *a.keep_firing_since_ms.get_or_insert(t);
                if t - since < keep {
                    return true;
                }
            }
            match a.state {
                AlertState::Pending => false,
                AlertState::Inactive => a
                    .resolved_at_ms
                    .is_some_and(|r| t - r <= RESOLVED_RETENTION_MS),
                AlertState::Firing => {
                    a.state = AlertState::Inactive;
                    a.resolved_at_ms = Some(t);
                    a.keep_firing_since_ms = None;
                    true
                }
            }
        });
        for a in self.active.values_mut() {
            if a.state == AlertState::Pending && t - a.active_at_ms >= hold {
                a.state = AlertState::Firing;
                a.fired_at_ms = Some(t);
            }
        }
        let live = self
            .active
            .values()
            .filter(|a| a.state != AlertState::Inactive)
            .count() as u64;
        if limit > 0 && live > limit {
            self.active.clear();
            return (
                self.fail(format!("exceeded limit of {limit} with {live} alerts")),
                Vec::new(),
            );
        }
        let mut transitions = Vec::new();
        for (labels, a) in &self.active {
            let from = before.get(labels).copied().unwrap_or(AlertState::Inactive);
            if from != a.state {
                transitions.push(Transition {
                    alert: a.clone(),
                    from,
                });
            }
        }
        if problems.is_empty() {
            self.health = Health::Ok;
            self.last_error = None;
        } else {
            self.health = Health::Err;
            self.last_error = Some(format!("error expanding templates: {}", problems[0]));
        }
        let mut out: Written = Vec::new();
        for a in self.active.values() {
            if a.state == AlertState::Inactive {
                continue;
            }
            let mut l = a.labels.clone();
            l.insert("__name__".into(), "ALERTS".into());
            l.insert("alertstate".into(), a.state.as_str().into());
            out.push((l, 1.0));
            let mut f = a.labels.clone();
            f.insert("__name__".into(), "ALERTS_FOR_STATE".into());
            out.push((f, a.active_at_ms as f64 / 1e3));
        }
        (out, transitions)
    }

    /// Restores pending and firing alerts from `ALERTS_FOR_STATE` after a
    /// restart: each alert's `active_at` comes back, so `for` does not
    /// start over (alerts the rule does not produce any more are not).
    pub fn restore(&mut self, for_state: &[(LabelMap, f64)]) {
        for (labels, active_at_secs) in for_state {
            let mut l = labels.clone();
            l.remove("__name__");
            if let Some(a) = self.active.get_mut(&l)
                && a.state != AlertState::Inactive
            {
                let at = (*active_at_secs * 1e3) as i64;
                a.active_at_ms = a.active_at_ms.min(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rule(for_s: u64, keep_s: u64) -> RuleState {
        RuleState::new(Rule {
            kind: RuleKind::Alert("HighErrors".into()),
            expr: "x > 1".into(),
            for_: Duration::from_secs(for_s),
            keep_firing_for: Duration::from_secs(keep_s),
            labels: vec![("severity".into(), "page".into())],
            annotations: vec![(
                "summary".into(),
                "{{ $labels.service }} at {{ $value }}".into(),
            )],
            recover_expr: None,
            inhibit_on_dependency: false,
            line: 1,
        })
    }

    fn sample(service: &str, v: f64) -> (LabelMap, f64) {
        (LabelMap::from([("service".into(), service.into())]), v)
    }

    fn states(r: &RuleState) -> Vec<(String, &'static str)> {
        r.active
            .values()
            .map(|a| (a.labels["service"].clone(), a.state.as_str()))
            .collect()
    }

    #[test]
    fn pending_for_then_firing_then_resolved() {
        let mut r = rule(60, 0);
        let ext = LabelMap::new();
        let (w, t) = r.apply(0, Ok(vec![sample("web", 2.0)]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "pending")]);
        assert_eq!(t[0].from, AlertState::Inactive);
        let alerts: Vec<&LabelMap> = w.iter().map(|x| &x.0).collect();
        assert_eq!(alerts[0]["__name__"], "ALERTS");
        assert_eq!(alerts[0]["alertstate"], "pending");
        assert_eq!(alerts[0]["alertname"], "HighErrors");
        assert_eq!(alerts[0]["severity"], "page");
        assert_eq!(w[1].0["__name__"], "ALERTS_FOR_STATE");
        assert_eq!(
            r.active.values().next().unwrap().annotations["summary"],
            "web at 2"
        );
        r.apply(30_000, Ok(vec![sample("web", 3.0)]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "pending")]);
        let (_, t) = r.apply(60_000, Ok(vec![sample("web", 3.0)]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
        assert_eq!(t[0].from, AlertState::Pending);
        // The condition stops: resolved, kept for the notifications, no series.
        let (w, t) = r.apply(90_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "inactive")]);
        assert_eq!(t[0].from, AlertState::Firing);
        assert!(w.is_empty());
        // Back: pending again from now.
        r.apply(120_000, Ok(vec![sample("web", 3.0)]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "pending")]);
        assert_eq!(r.active.values().next().unwrap().active_at_ms, 120_000);
        // A pending alert that goes away is forgotten at once.
        r.apply(150_000, Ok(vec![]), &ext, 0);
        assert!(r.active.is_empty());
    }

    #[test]
    fn keep_firing_for_holds_a_firing_alert() {
        let mut r = rule(0, 60);
        let ext = LabelMap::new();
        r.apply(0, Ok(vec![sample("web", 2.0)]), &ext, 0);
        assert_eq!(
            states(&r),
            [("web".into(), "firing")],
            "for: 0 fires at once"
        );
        r.apply(30_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
        r.apply(60_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
        r.apply(90_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "inactive")]);
        // Resolved alerts are dropped after 15 minutes.
        r.apply(90_000 + RESOLVED_RETENTION_MS + 1, Ok(vec![]), &ext, 0);
        assert!(r.active.is_empty());
    }

    #[test]
    fn limits_duplicates_and_errors() {
        let ext = LabelMap::new();
        let mut r = rule(0, 0);
        let (w, _) = r.apply(0, Ok(vec![sample("a", 2.0), sample("b", 2.0)]), &ext, 1);
        assert!(w.is_empty() && r.active.is_empty());
        assert_eq!(r.health, Health::Err);
        assert_eq!(
            r.last_error.as_deref(),
            Some("exceeded limit of 1 with 2 alerts")
        );
        let (_, _) = r.apply(0, Err("query timed out".into()), &ext, 0);
        assert_eq!(r.last_error.as_deref(), Some("query timed out"));
        // Samples that differ only by their name collide once it is dropped.
        let mut r = rule(0, 0);
        r.rule.labels.push(("service".into(), "same".into()));
        r.apply(0, Ok(vec![sample("a", 1.0), sample("b", 1.0)]), &ext, 0);
        assert!(r.last_error.unwrap().contains("same labelset"));
    }

    #[test]
    fn recording_rules_rename_and_relabel() {
        let mut r = RuleState::new(Rule {
            kind: RuleKind::Record("job:errors:rate1m".into()),
            expr: "x".into(),
            for_: Duration::ZERO,
            keep_firing_for: Duration::ZERO,
            labels: vec![
                ("team".into(), "web".into()),
                ("service".into(), String::new()),
            ],
            annotations: vec![],
            recover_expr: None,
            inhibit_on_dependency: false,
            line: 1,
        });
        let (w, _) = r.apply(0, Ok(vec![sample("web", 0.5)]), &LabelMap::new(), 0);
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].0,
            LabelMap::from([
                ("__name__".into(), "job:errors:rate1m".into()),
                ("team".into(), "web".into())
            ])
        );
        assert_eq!(r.health, Health::Ok);
    }

    #[test]
    fn for_state_restored_after_a_restart() {
        let mut r = rule(600, 0);
        let ext = LabelMap::new();
        // A new daemon sees the condition at t = 700 s; the previous one
        // had it active since 0.
        r.apply(700_000, Ok(vec![sample("web", 2.0)]), &ext, 0);
        let mut l = LabelMap::from([
            ("service".to_owned(), "web".to_owned()),
            ("alertname".to_owned(), "HighErrors".to_owned()),
            ("severity".to_owned(), "page".to_owned()),
        ]);
        l.insert("__name__".into(), "ALERTS_FOR_STATE".into());
        r.restore(&[(l, 0.0)]);
        assert_eq!(r.active.values().next().unwrap().active_at_ms, 0);
        // The next evaluation fires: `for` counted from the first daemon.
        r.apply(710_000, Ok(vec![sample("web", 2.0)]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
    }

    #[test]
    fn recover_expr_holds_a_firing_alert_until_it_recovers() {
        let mut r = rule(0, 0);
        r.rule.recover_expr = Some("x < 0.5".into());
        let ext = LabelMap::new();
        r.apply(0, Ok(vec![sample("web", 2.0)]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
        // Below the threshold but not yet recovered: still firing.
        r.apply(10_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
        // Recovery for another service does not count.
        r.recovered = vec![LabelMap::from([("service".into(), "api".into())])];
        r.apply(20_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "firing")]);
        r.recovered = vec![LabelMap::from([("service".into(), "web".into())])];
        r.apply(30_000, Ok(vec![]), &ext, 0);
        assert_eq!(states(&r), [("web".into(), "inactive")]);
    }
}
