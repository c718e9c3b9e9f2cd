//! `capstan rules backtest FILE`: a rule file evaluated over stored history,
//! step by step as the daemon would have, without writing or sending
//! anything; what comes out is when each alert would have gone pending,
//! fired and resolved, and how often it flapped.

use std::collections::BTreeMap;
use std::time::Duration;

#[cfg(test)]
use capstan_promql::{MemPoint, MemStorage};
use capstan_promql::{Selected, Storage};
use capstan_tsdb::{Labels, Matcher};
use serde::Serialize;

use super::file::Group;
use super::group::GroupState;
use super::rule::{AlertState, LabelMap};

/// Most evaluation steps one backtest may take (over all groups).
pub const MAX_STEPS: u64 = 200_000;

/// What the rules recorded during the backtest, over the store: a series
/// recorded here hides the stored one with the same labels. Recorded
/// samples are visible at once, to the rules after the one that wrote them.
struct Overlay<'a> {
    base: &'a dyn Storage,
    mem: std::sync::Mutex<BTreeMap<Labels, Vec<(i64, f64)>>>,
}

impl Overlay<'_> {
    fn add(&self, labels: Labels, t: i64, v: f64) {
        let mut m = self.mem.lock().unwrap();
        let s = m.entry(labels).or_default();
        match s.binary_search_by_key(&t, |x| x.0) {
            Ok(i) => s[i].1 = v,
            Err(i) => s.insert(i, (t, v)),
        }
    }
}

impl Storage for Overlay<'_> {
    fn select(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Selected<'_>> {
        let mine: Vec<(Labels, Vec<(i64, f64)>)> = self
            .mem
            .lock()
            .unwrap()
            .iter()
            .filter(|(l, _)| {
                matchers
                    .iter()
                    .all(|m| m.matches(l.get(&m.name).unwrap_or("")))
            })
            .map(|(l, pts)| {
                let pts: Vec<(i64, f64)> = pts
                    .iter()
                    .filter(|p| p.0 >= mint && p.0 <= maxt)
                    .copied()
                    .collect();
                (l.clone(), pts)
            })
            .filter(|(_, pts)| !pts.is_empty())
            .collect();
        let mut out: Vec<Selected<'_>> = self
            .base
            .select(matchers, mint, maxt)
            .into_iter()
            .filter(|s| !mine.iter().any(|m| m.0 == s.labels))
            .collect();
        out.extend(mine.into_iter().map(|(labels, pts)| Selected {
            labels,
            load: Box::new(move |o: &mut Vec<(i64, f64)>| o.extend(pts)),
            has_histograms: false,
        }));
        out.sort_by(|a, b| a.labels.cmp(&b.labels));
        out
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Episode {
    pub alertname: String,
    pub labels: LabelMap,
    pub pending_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Report {
    pub from_ms: i64,
    pub to_ms: i64,
    pub steps: u64,
    pub episodes: Vec<Episode>,
    /// Rules whose evaluation failed, with the first error.
    pub errors: Vec<String>,
}

/// Evaluates `groups` over `[from, to]` against `store`.
pub fn run(
    groups: &[Group],
    store: &dyn Storage,
    engine: &capstan_promql::Engine,
    from: i64,
    to: i64,
    default_interval: Duration,
) -> Result<Report, String> {
    let mut states: Vec<GroupState> = groups
        .iter()
        .map(|g| GroupState::new(g, default_interval))
        .collect();
    let steps: u64 = states
        .iter()
        .map(|g| ((to - from).max(0) / g.interval.as_millis().max(1) as i64) as u64 + 1)
        .sum();
    if steps > MAX_STEPS {
        return Err(format!(
            "{steps} evaluations is more than the {MAX_STEPS} a backtest may take: look at a shorter time"
        ));
    }
    let overlay = Overlay {
        base: store,
        mem: std::sync::Mutex::default(),
    };
    let mut report = Report {
        from_ms: from,
        to_ms: to,
        steps,
        ..Report::default()
    };
    // Every group's slots, in time order.
    let mut slots: Vec<(i64, usize)> = Vec::new();
    for (i, g) in states.iter().enumerate() {
        let iv = g.interval.as_millis().max(1) as i64;
        let mut t = g.slot(from);
        if t < from {
            t += iv;
        }
        while t <= to {
            slots.push((t, i));
            t += iv;
        }
    }
    slots.sort();
    let mut open: BTreeMap<(String, LabelMap), usize> = BTreeMap::new();
    let external = LabelMap::new();
    for (t, i) in slots {
        let transitions = {
            let view = &overlay;
            let query = |q: &str, at: i64| -> Result<Vec<(LabelMap, f64)>, String> {
                let out = engine.instant(view, q, at).map_err(|e| e.to_string())?;
                Ok(super::manager::samples(out.value))
            };
            let mut append = |w: &[(LabelMap, f64)], at: i64| {
                for (l, v) in w {
                    if !matches!(
                        l.get("__name__").map(String::as_str),
                        Some("ALERTS" | "ALERTS_FOR_STATE")
                    ) {
                        view.add(Labels::new(l.clone().into_iter().collect()), at, *v);
                    }
                }
            };
            states[i].evaluate(t, &query, &mut append, &external)
        };
        for tr in transitions {
            let a = &tr.alert;
            let name = a.labels.get("alertname").cloned().unwrap_or_default();
            let key = (name.clone(), a.labels.clone());
            match a.state {
                AlertState::Pending => {
                    open.insert(key, report.episodes.len());
                    report.episodes.push(Episode {
                        alertname: name,
                        labels: a.labels.clone(),
                        pending_ms: a.active_at_ms,
                        fired_ms: None,
                        resolved_ms: None,
                    });
                }
                AlertState::Firing => {
                    let idx = *open.entry(key).or_insert_with(|| {
                        report.episodes.push(Episode {
                            alertname: name.clone(),
                            labels: a.labels.clone(),
                            pending_ms: a.active_at_ms,
                            fired_ms: None,
                            resolved_ms: None,
                        });
                        report.episodes.len() - 1
                    });
                    report.episodes[idx].fired_ms = a.fired_at_ms;
                }
                AlertState::Inactive => {
                    if let Some(idx) = open.remove(&key) {
                        report.episodes[idx].resolved_ms = a.resolved_at_ms;
                    }
                }
            }
        }
        // Pending alerts that went away without firing end their episode.
        for r in &states[i].rules {
            open.retain(|(n, l), idx| {
                n != r.rule.name() || r.active.contains_key(l) || {
                    let e = &report.episodes[*idx];
                    e.fired_ms.is_some() && e.resolved_ms.is_none()
                }
            });
        }
    }
    for g in &states {
        for (rule, e) in g.errors() {
            report.errors.push(format!("{}/{rule}: {e}", g.name));
        }
    }
    Ok(report)
}

use super::rfc3339 as time;

/// The report in words: each alert's episodes, then how often each flapped.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "backtest from {} to {} ({} evaluations)\n",
        time(r.from_ms),
        time(r.to_ms),
        r.steps
    );
    let fired: Vec<&Episode> = r.episodes.iter().filter(|e| e.fired_ms.is_some()).collect();
    if fired.is_empty() {
        out.push_str("no alert would have fired\n");
    }
    for e in &fired {
        let labels: Vec<String> = e
            .labels
            .iter()
            .filter(|(k, _)| *k != "alertname")
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        let end = match e.resolved_ms {
            Some(t) => format!(
                "resolved {} (fired for {})",
                time(t),
                crate::spec::Dur(Duration::from_millis(
                    (t - e.fired_ms.unwrap_or(t)).max(0) as u64
                ))
            ),
            None => "still firing at the end".into(),
        };
        out.push_str(&format!(
            "{}{{{}}}: pending {}, fired {}, {end}\n",
            e.alertname,
            labels.join(", "),
            time(e.pending_ms),
            time(e.fired_ms.unwrap_or(0)),
        ));
    }
    let mut counts: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for e in &r.episodes {
        let c = counts.entry(e.alertname.clone()).or_default();
        if e.fired_ms.is_some() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    for (name, (fired, pending_only)) in counts {
        out.push_str(&format!(
            "{name}: fired {fired} time(s){}\n",
            if pending_only > 0 {
                format!(", pending without firing {pending_only} time(s)")
            } else {
                String::new()
            }
        ));
    }
    for e in &r.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_incident_is_found_with_its_times() {
        let groups = super::super::file::parse(
            "r.yml",
            r#"
groups:
  - name: g
    interval: 1m
    rules:
      - record: errors:rate
        expr: rate(errors_total[2m])
      - alert: Errors
        expr: errors:rate > 1
        for: 2m
"#,
        )
        .unwrap();
        // Flat, then 3 errors a second from minute 10 to minute 20, then flat.
        let mut store = MemStorage::new();
        let l = Labels::from_pairs([("__name__", "errors_total"), ("service", "web")]);
        let mut v = 0.0;
        for m in 0..=40i64 {
            if (10..20).contains(&m) {
                v += 180.0;
            }
            store.add(&l, m * 60_000, MemPoint::Float(v));
        }
        let engine = capstan_promql::runner::test_engine();
        let r = run(
            &groups,
            &store,
            &engine,
            0,
            40 * 60_000,
            Duration::from_secs(60),
        )
        .unwrap();
        let fired: Vec<&Episode> = r.episodes.iter().filter(|e| e.fired_ms.is_some()).collect();
        assert_eq!(fired.len(), 1, "{r:?}");
        let e = fired[0];
        assert_eq!(e.labels["service"], "web");
        let (p, f, res) = (e.pending_ms, e.fired_ms.unwrap(), e.resolved_ms.unwrap());
        assert!(f - p >= 120_000, "fired after `for`: {r:?}");
        assert!((9 * 60_000..=13 * 60_000).contains(&p), "{r:?}");
        assert!((20 * 60_000..=24 * 60_000).contains(&res), "{r:?}");
        let text = render(&r);
        assert!(text.contains("Errors: fired 1 time(s)"), "{text}");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    #[test]
    fn too_long_a_backtest_is_refused() {
        let groups = super::super::file::parse(
            "r.yml",
            "groups:\n  - name: g\n    interval: 1s\n    rules: []\n",
        )
        .unwrap();
        let engine = capstan_promql::runner::test_engine();
        let e = run(
            &groups,
            &MemStorage::new(),
            &engine,
            0,
            30 * 86_400_000,
            Duration::from_secs(60),
        )
        .unwrap_err();
        assert!(e.contains("more than the 200000"), "{e}");
    }
}
