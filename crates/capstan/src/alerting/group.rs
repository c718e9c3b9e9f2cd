//! A rule group as it runs: its rules evaluated in order at each interval
//! (a later rule sees what an earlier recording rule wrote at the same
//! time), series that stop being written marked stale, evaluation times on
//! Prometheus' slots.

use std::collections::BTreeSet;
use std::time::Duration;

use super::file::Group;
use super::rule::{Health, LabelMap, RuleState, Transition};

/// Evaluates a PromQL expression at a time (unix ms): samples without
/// their `__name__`, or the error.
pub type Query<'a> = &'a dyn Fn(&str, i64) -> Result<Vec<(LabelMap, f64)>, String>;
/// Appends samples at a time (unix ms).
pub type Append<'a> = &'a mut dyn FnMut(&[(LabelMap, f64)], i64);

#[derive(Debug, Clone)]
pub struct GroupState {
    pub name: String,
    pub file: String,
    pub interval: Duration,
    pub limit: u64,
    pub query_offset: Duration,
    pub rules: Vec<RuleState>,
    pub last_eval_ms: Option<i64>,
    pub eval_secs: f64,
    /// Evaluations that were due and did not run (the daemon was busy).
    pub missed: u64,
    /// Series written at the last evaluation, per rule.
    written: Vec<BTreeSet<LabelMap>>,
    /// The first evaluation restores alerts' `for` state.
    pub restored: bool,
}

/// A stale marker: the value Prometheus writes when a series ends.
pub fn stale() -> f64 {
    f64::from_bits(capstan_tsdb::STALE_NAN_BITS)
}

impl GroupState {
    pub fn new(g: &Group, default_interval: Duration) -> GroupState {
        GroupState {
            name: g.name.clone(),
            file: g.file.clone(),
            interval: g.interval.unwrap_or(default_interval),
            limit: g.limit,
            query_offset: g.query_offset.unwrap_or_default(),
            rules: g.rules.iter().cloned().map(RuleState::new).collect(),
            last_eval_ms: None,
            eval_secs: 0.0,
            missed: 0,
            written: vec![BTreeSet::new(); g.rules.len()],
            restored: false,
        }
    }

    /// Takes over the state of `old` for rules that did not change (same
    /// position and definition), as a reload must not lose firing alerts.
    pub fn keep_state_of(&mut self, old: &GroupState) {
        for (i, r) in self.rules.iter_mut().enumerate() {
            if let Some(o) = old.rules.get(i).filter(|o| o.rule == r.rule) {
                *r = o.clone();
                self.written[i] = old.written.get(i).cloned().unwrap_or_default();
            }
        }
        self.last_eval_ms = old.last_eval_ms;
        self.restored = old.restored;
    }

    /// Where in each interval the group evaluates: a fixed offset from its
    /// file and name, so groups spread over the interval and keep their slot.
    pub fn offset_ms(&self) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.file.bytes().chain([0xff]).chain(self.name.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let iv = self.interval.as_millis().max(1) as u64;
        (h % iv) as i64
    }

    /// The evaluation slot at or before `now_ms`.
    pub fn slot(&self, now_ms: i64) -> i64 {
        let iv = self.interval.as_millis().max(1) as i64;
        let off = self.offset_ms();
        (now_ms - off).div_euclid(iv) * iv + off
    }

    /// Evaluates every rule at slot `t_ms`; returns the alerts' transitions.
    pub fn evaluate(
        &mut self,
        t_ms: i64,
        query: Query<'_>,
        append: Append<'_>,
        external: &LabelMap,
    ) -> Vec<Transition> {
        let started = crate::state::clock::stopwatch();
        if let Some(last) = self.last_eval_ms {
            let iv = self.interval.as_millis().max(1) as i64;
            let skipped = (t_ms - last) / iv - 1;
            if skipped > 0 {
                self.missed += skipped as u64;
            }
        }
        let at = t_ms - self.query_offset.as_millis() as i64;
        let mut transitions = Vec::new();
        for (i, r) in self.rules.iter_mut().enumerate() {
            let began = crate::state::clock::stopwatch();
            let result = query(&r.rule.expr, at);
            if let Some(q) = &r.rule.recover_expr {
                r.recovered = query(q, at)
                    .map(|v| v.into_iter().map(|(l, _)| l).collect())
                    .unwrap_or_default();
            }
            let in_templates = |q: &str| query(q, at);
            let (written, mut t) =
                r.apply_with(t_ms, result, external, self.limit, Some(&in_templates));
            r.eval_secs = began.elapsed().as_secs_f64();
            let now: BTreeSet<LabelMap> = written.iter().map(|(l, _)| l.clone()).collect();
            let mut out = written;
            // Series written last time and not now end with a stale marker.
            for gone in self.written[i].difference(&now) {
                out.push((gone.clone(), stale()));
            }
            if !out.is_empty() {
                append(&out, at);
            }
            self.written[i] = now;
            transitions.append(&mut t);
        }
        self.last_eval_ms = Some(t_ms);
        self.eval_secs = started.elapsed().as_secs_f64();
        transitions
    }

    /// Alerting rules whose last evaluation failed, and why.
    pub fn errors(&self) -> Vec<(String, String)> {
        self.rules
            .iter()
            .filter(|r| r.health == Health::Err)
            .map(|r| {
                (
                    r.rule.name().to_owned(),
                    r.last_error.clone().unwrap_or_default(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerting::file;

    const RULES: &str = r#"
groups:
  - name: g
    interval: 10s
    rules:
      - record: errors:rate
        expr: errors
      - alert: Errors
        expr: errors:rate > 1
"#;

    #[test]
    fn rules_run_in_order_and_ended_series_go_stale() {
        let g = &file::parse("r.yml", RULES).unwrap()[0];
        let mut s = GroupState::new(g, Duration::from_secs(60));
        assert_eq!(s.interval, Duration::from_secs(10));
        let store = std::cell::RefCell::new(Vec::<(LabelMap, f64, i64)>::new());
        let value = std::cell::Cell::new(5.0);
        // `errors` is a constant; `errors:rate` is what the recording rule wrote.
        let query = |q: &str, t: i64| -> Result<Vec<(LabelMap, f64)>, String> {
            let l = LabelMap::from([("service".to_owned(), "web".to_owned())]);
            match q {
                "errors" => Ok(vec![(l, value.get())]),
                "errors:rate > 1" => {
                    let recorded = store
                        .borrow()
                        .iter()
                        .rev()
                        .find(|(l, _, at)| l["__name__"] == "errors:rate" && *at == t)
                        .map(|x| x.1);
                    Ok(recorded
                        .filter(|v| *v > 1.0)
                        .map(|v| vec![(l, v)])
                        .unwrap_or_default())
                }
                other => Err(format!("unexpected {other}")),
            }
        };
        let mut append = |w: &[(LabelMap, f64)], t: i64| {
            store
                .borrow_mut()
                .extend(w.iter().map(|(l, v)| (l.clone(), *v, t)));
        };
        let t = s.evaluate(10_000, &query, &mut append, &LabelMap::new());
        assert_eq!(t.len(), 1, "the alert saw the recording at the same time");
        let names: Vec<String> = store
            .borrow()
            .iter()
            .map(|x| x.0["__name__"].clone())
            .collect();
        assert_eq!(names, ["errors:rate", "ALERTS", "ALERTS_FOR_STATE"]);
        value.set(0.5);
        store.borrow_mut().clear();
        s.evaluate(40_000, &query, &mut append, &LabelMap::new());
        assert_eq!(s.missed, 2, "the slots at 20 s and 30 s were missed");
        let stale: Vec<String> = store
            .borrow()
            .iter()
            .filter(|x| capstan_tsdb::is_stale(x.1))
            .map(|x| x.0["__name__"].clone())
            .collect();
        assert_eq!(stale, ["ALERTS", "ALERTS_FOR_STATE"]);
    }

    #[test]
    fn slots_are_aligned_and_stable() {
        let g = &file::parse("r.yml", RULES).unwrap()[0];
        let s = GroupState::new(g, Duration::from_secs(60));
        let off = s.offset_ms();
        assert!((0..10_000).contains(&off));
        assert_eq!(s.slot(1_000_000 + off), 1_000_000 + off);
        assert_eq!(s.slot(1_000_000 + off + 9_999), 1_000_000 + off);
        assert_eq!(s.slot(1_000_000 + off + 10_000), 1_010_000 + off);
    }
}
