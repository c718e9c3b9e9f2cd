//! The daemon's rule evaluator: the stack's rule files, loaded on every
//! apply (state kept for unchanged rules), each group evaluated at its
//! slots against the metrics store, results appended to it, alert
//! transitions reported as events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_promql::QueryValue;
use capstan_tsdb::{Db, Labels};
use tokio::sync::{Notify, watch};

use super::group::GroupState;
use super::rule::{AlertState, LabelMap, RuleState};
use crate::events::EventLog;
use crate::spec::Stack;

/// How far back a restarted daemon looks for `ALERTS_FOR_STATE`
/// (Prometheus' `--rules.alert.for-outage-tolerance`).
const OUTAGE_TOLERANCE_MS: i64 = 3_600_000;

#[derive(Default)]
struct Config {
    /// The stack last loaded, for a reload.
    stack: Option<Stack>,
    groups: Vec<GroupState>,
    external: LabelMap,
    alertmanagers: Vec<String>,
    resend_ms: i64,
    /// Each service's dependencies, for inhibition.
    deps: BTreeMap<String, std::collections::BTreeSet<String>>,
    inhibit_all: bool,
    /// Plain webhooks, each with its groups.
    webhooks: Vec<(crate::spec::AlertWebhook, super::webhook::Dispatcher)>,
}

/// A batch of alerts (JSON) and the Alertmanagers it goes to.
type Batch = (Vec<String>, Vec<u8>);

/// Batches of alerts waiting to be posted, at most (more are dropped and counted).
pub const QUEUE: usize = 1_000;

/// Alert notifications to the Alertmanagers: batches sent, failed, dropped.
#[derive(Default)]
pub struct Stats {
    pub sent: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
}

pub struct Alerting {
    cfg: Mutex<Config>,
    changed: Notify,
    events: Arc<EventLog>,
    /// Where alert transitions are kept (service `capstan`, stream `alerts`).
    logs: Option<Arc<crate::logs::engine::LogEngine>>,
    /// Where alerts say they come from (`generatorURL`).
    base_url: Mutex<String>,
    queue: Mutex<Option<tokio::sync::mpsc::Sender<Batch>>>,
    pub stats: Stats,
}

impl Alerting {
    pub fn new(
        events: Arc<EventLog>,
        logs: Option<Arc<crate::logs::engine::LogEngine>>,
    ) -> Arc<Alerting> {
        Arc::new(Alerting {
            cfg: Mutex::default(),
            changed: Notify::new(),
            events,
            logs,
            base_url: Mutex::new("http://localhost".into()),
            queue: Mutex::new(None),
            stats: Stats::default(),
        })
    }

    /// Loads the stack's rule files; problems are returned (the groups of
    /// a file that fails to load stay as they were).
    pub fn load(&self, stack: &Stack) -> Vec<String> {
        let interval = stack.settings.evaluation_interval.0;
        let mut problems = Vec::new();
        let mut cfg = self.cfg.lock().unwrap();
        let mut next: Vec<GroupState> = Vec::new();
        for f in &stack.settings.rule_files {
            match super::file::load(std::path::Path::new(f)) {
                Ok(groups) => {
                    for g in &groups {
                        let mut s = GroupState::new(g, interval);
                        if let Some(old) = cfg
                            .groups
                            .iter()
                            .find(|o| o.file == s.file && o.name == s.name)
                        {
                            s.keep_state_of(old);
                        }
                        next.push(s);
                    }
                }
                Err(ps) => {
                    problems.extend(ps.iter().map(|p| format!("rule file: {p}")));
                    next.extend(cfg.groups.iter().filter(|o| o.file == *f).cloned());
                }
            }
        }
        // Anomaly rules run as the groups they generate.
        for a in &stack.settings.anomaly {
            let mut s = GroupState::new(&super::anomaly::group(a), interval);
            if let Some(old) = cfg
                .groups
                .iter()
                .find(|o| o.file == s.file && o.name == s.name)
            {
                s.keep_state_of(old);
            }
            next.push(s);
        }
        cfg.groups = next;
        cfg.external = stack
            .settings
            .external_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        cfg.alertmanagers = stack.settings.alertmanagers.clone();
        cfg.stack = Some(stack.clone());
        cfg.deps = dependency_closure(stack);
        // A webhook kept across a reload keeps its groups.
        let mut old = std::mem::take(&mut cfg.webhooks);
        cfg.webhooks = stack
            .settings
            .alert_webhooks
            .iter()
            .map(|w| {
                let d = old
                    .iter()
                    .position(|(o, _)| o.url == w.url)
                    .map(|i| old.remove(i).1)
                    .unwrap_or_default();
                (w.clone(), d)
            })
            .collect();
        cfg.inhibit_all = stack.settings.inhibit_on_dependency;
        cfg.resend_ms = stack.settings.resend_delay.0.as_millis() as i64;
        drop(cfg);
        self.changed.notify_one();
        problems
    }

    /// Reads the rule files of the stack last loaded again (SIGHUP).
    pub fn reload(&self) -> Vec<String> {
        let stack = self.cfg.lock().unwrap().stack.clone();
        let problems = stack.map(|s| self.load(&s)).unwrap_or_default();
        self.events.emit(
            "capstan",
            None,
            "rules-reloaded",
            if problems.is_empty() {
                "rule files read again".to_owned()
            } else {
                format!(
                    "rule files read again, with problems: {}",
                    problems.join("; ")
                )
            },
        );
        problems
    }

    pub fn warn(&self, message: String) {
        self.events.warn_once(message);
    }

    /// `x-capstan.external_labels`, as last loaded.
    pub fn external_labels(&self) -> LabelMap {
        self.cfg.lock().unwrap().external.clone()
    }

    /// The groups as they are now (for the API).
    pub fn groups(&self) -> Vec<GroupState> {
        self.cfg.lock().unwrap().groups.clone()
    }

    /// Where alerts link back to (the daemon's API address).
    pub fn set_base_url(&self, url: String) {
        *self.base_url.lock().unwrap() = url;
    }

    /// Posts queued batches to each Alertmanager's `/api/v2/alerts`, a
    /// failed post tried 3 times with doubling waits.
    async fn deliver(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<Batch>) {
        use std::sync::atomic::Ordering::Relaxed;
        while let Some((targets, body)) = rx.recv().await {
            for base in targets {
                let Ok(url) = base.parse::<hyper::Uri>() else {
                    continue;
                };
                let mut wait = Duration::from_millis(500);
                let mut ok = false;
                for attempt in 0..3 {
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        crate::notify::post(&url, body.clone()),
                    )
                    .await;
                    if matches!(r, Ok(Ok(()))) {
                        ok = true;
                        break;
                    }
                    if attempt < 2 {
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                }
                if ok {
                    self.stats.sent.fetch_add(1, Relaxed);
                } else {
                    self.stats.failed.fetch_add(1, Relaxed);
                    self.events.warn_once(format!(
                        "alerts not delivered to the Alertmanager at {base}"
                    ));
                }
            }
        }
    }

    /// Evaluates the groups at their slots until `stop`.
    pub async fn run(
        self: Arc<Self>,
        db: Arc<Db>,
        engine: Arc<capstan_promql::Engine>,
        mut stop: watch::Receiver<bool>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        *self.queue.lock().unwrap() = Some(tx);
        let delivery = tokio::spawn(self.clone().deliver(rx));
        let _abort = AbortOnDrop(delivery);
        loop {
            let now = crate::events::now_ms();
            // The earliest slot due after the last evaluation of each group.
            let next = {
                let cfg = self.cfg.lock().unwrap();
                cfg.groups
                    .iter()
                    .map(|g| {
                        let iv = g.interval.as_millis() as i64;
                        match g.last_eval_ms {
                            Some(last) => last + iv,
                            None => g.slot(now) + iv,
                        }
                    })
                    .min()
            };
            let wait = next.map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis((t - now).max(0) as u64)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.changed.notified() => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
            let (db, engine, me) = (db.clone(), engine.clone(), self.clone());
            // Queries block: off the async threads.
            let _ = tokio::task::spawn_blocking(move || me.evaluate_due(&db, &engine)).await;
        }
    }

    /// Each transition as a JSON line in the log store: the alert history,
    /// kept across restarts and searchable with LogQL
    /// (`{service="capstan", stream="alerts"} | json`).
    fn keep_history(&self, transitions: &[super::rule::Transition], t: i64) {
        let Some(logs) = &self.logs else { return };
        if transitions.is_empty() {
            return;
        }
        let lines = transitions.iter().map(|tr| {
            let a = &tr.alert;
            let state = match (tr.from, a.state) {
                (AlertState::Firing, AlertState::Inactive) => "resolved",
                (_, s) => s.as_str(),
            };
            let line = serde_json::json!({
                "alertname": a.labels.get("alertname"),
                "state": state,
                "from": tr.from.as_str(),
                "value": a.value,
                "labels": a.labels,
                "annotations": a.annotations,
                "active_at": rfc3339(a.active_at_ms),
                "at": rfc3339(t),
            });
            (0, line.to_string(), false)
        });
        if let Err(e) = logs.append_many("capstan", crate::logs::Stream::Alerts, lines) {
            self.events
                .warn_once(format!("cannot keep the alert history: {e}"));
        }
    }

    /// Evaluates every group whose slot has come.
    fn evaluate_due(&self, db: &Db, engine: &capstan_promql::Engine) {
        let now = crate::events::now_ms();
        let (mut due, others, external, targets, resend, deps, inhibit_all) = {
            let cfg = self.cfg.lock().unwrap();
            let (due, others): (Vec<GroupState>, Vec<GroupState>) = cfg
                .groups
                .iter()
                .cloned()
                .partition(|g| g.last_eval_ms.is_none_or(|l| g.slot(now) > l));
            (
                due,
                others,
                cfg.external.clone(),
                cfg.alertmanagers
                    .iter()
                    .map(|a| format!("{a}/api/v2/alerts"))
                    .collect::<Vec<String>>(),
                cfg.resend_ms,
                cfg.deps.clone(),
                cfg.inhibit_all,
            )
        };
        if due.is_empty() {
            return;
        }
        let base = self.base_url.lock().unwrap().clone();
        let query = |q: &str, t: i64| -> Result<Vec<(LabelMap, f64)>, String> {
            let out = engine.instant(db, q, t).map_err(|e| e.to_string())?;
            Ok(samples(out.value))
        };
        let mut transitions = Vec::new();
        for g in &mut due {
            let t = g.slot(now);
            let mut append = |w: &[(LabelMap, f64)], at: i64| {
                let mut a = db.appender();
                for (l, v) in w {
                    a.add(Labels::new(l.clone().into_iter().collect()), at, *v);
                }
                if let Err(e) = a.commit() {
                    self.events
                        .warn_once(format!("cannot store rule results: {e}"));
                }
            };
            let tr = g.evaluate(t, &query, &mut append, &external);
            if !g.restored {
                g.restored = true;
                restore(g, db, t);
            }
            transitions.push((t, tr));
        }
        // Which services have a firing alert, and which alerts that holds back.
        let firing = firing_services(due.iter().chain(others.iter()));
        for g in &mut due {
            for r in &mut g.rules {
                let marked = inhibit_all || r.rule.inhibit_on_dependency;
                for a in r.active.values_mut() {
                    a.inhibited_by = if marked {
                        inhibitors(a, &deps, &firing)
                    } else {
                        Vec::new()
                    };
                }
            }
        }
        self.to_webhooks(&due, &transitions, now, &external, &base);
        for (g, (t, tr)) in due.iter_mut().zip(transitions) {
            if !targets.is_empty() {
                self.send(g, t, resend, &external, &base, &targets);
            }
            self.keep_history(&tr, t);
            let inhibited: Vec<Vec<String>> = tr
                .iter()
                .map(|x| {
                    g.rules
                        .iter()
                        .find_map(|r| r.active.get(&x.alert.labels))
                        .map(|a| a.inhibited_by.clone())
                        .unwrap_or_default()
                })
                .collect();
            for (x, by) in tr.iter().zip(inhibited) {
                self.emit(x, &by);
            }
        }
        // Back into the configuration, unless a reload replaced the group.
        let mut cfg = self.cfg.lock().unwrap();
        for g in due {
            if let Some(slot) = cfg
                .groups
                .iter_mut()
                .find(|o| o.file == g.file && o.name == g.name && same_rules(&o.rules, &g.rules))
            {
                *slot = g;
            }
        }
    }

    /// Firing alerts (not inhibited) and those resolved this round, to the
    /// plain webhooks' dispatchers; what is due is queued.
    fn to_webhooks(
        &self,
        due: &[GroupState],
        transitions: &[(i64, Vec<super::rule::Transition>)],
        now: i64,
        external: &LabelMap,
        base: &str,
    ) {
        let mut cfg = self.cfg.lock().unwrap();
        if cfg.webhooks.is_empty() {
            return;
        }
        let item = |a: &super::rule::Alert, expr: &str, firing: bool| super::webhook::Item {
            labels: with_external(a, external),
            annotations: a.annotations.clone(),
            firing,
            starts_at_ms: a.active_at_ms,
            ends_at_ms: a.resolved_at_ms.filter(|_| !firing),
            generator_url: generator_url(base, expr),
        };
        let mut items = Vec::new();
        for g in due {
            for r in &g.rules {
                for a in r.active.values() {
                    if a.state == AlertState::Firing && a.inhibited_by.is_empty() {
                        items.push(item(a, &r.rule.expr, true));
                    }
                }
            }
        }
        for (_, tr) in transitions {
            for x in tr {
                if x.from == AlertState::Firing && x.alert.state == AlertState::Inactive {
                    items.push(item(&x.alert, "", false));
                }
            }
        }
        let mut out = Vec::new();
        for (w, d) in &mut cfg.webhooks {
            d.update(now, items.clone());
            let t = super::webhook::Timing {
                group_wait_ms: w.group_wait.0.as_millis() as i64,
                group_interval_ms: w.group_interval.0.as_millis() as i64,
                repeat_interval_ms: w.repeat_interval.0.as_millis() as i64,
            };
            for body in d.due(now, &t, "capstan", base) {
                out.push((
                    vec![w.url.clone()],
                    serde_json::to_vec(&body).unwrap_or_default(),
                ));
            }
        }
        drop(cfg);
        for batch in out {
            self.offer(batch);
        }
    }

    /// Queues a batch for delivery; when the queue is full it is dropped and counted.
    fn offer(&self, batch: Batch) {
        let queued = self
            .queue
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|q| q.try_send(batch).is_ok());
        if !queued {
            self.stats
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Queues the group's alerts that are due to be sent (not inhibited ones).
    fn send(
        &self,
        g: &mut GroupState,
        t: i64,
        resend: i64,
        external: &LabelMap,
        base: &str,
        targets: &[String],
    ) {
        let iv = g.interval.as_millis() as i64;
        let valid_until = t + 4 * resend.max(iv);
        let mut batch = Vec::new();
        for r in &mut g.rules {
            let expr = r.rule.expr.clone();
            for a in r.active.values_mut() {
                if a.inhibited_by.is_empty() && a.needs_sending(t, resend) {
                    a.last_sent_ms = Some(t);
                    batch.push(postable(a, external, &expr, base, valid_until));
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        let body = serde_json::to_vec(&batch).unwrap_or_default();
        self.offer((targets.to_vec(), body));
    }

    /// A transition as an event (on the alert's service).
    fn emit(&self, tr: &super::rule::Transition, inhibited_by: &[String]) {
        let a = &tr.alert;
        let service = a
            .labels
            .get("service")
            .cloned()
            .unwrap_or_else(|| "capstan".into());
        let what = a
            .annotations
            .get("summary")
            .cloned()
            .unwrap_or_else(|| format!("value {}", a.value));
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        let state = match (tr.from, a.state) {
            (AlertState::Firing, AlertState::Inactive) => "resolved",
            (_, s) => s.as_str(),
        };
        let held = if inhibited_by.is_empty() || a.state == AlertState::Inactive {
            String::new()
        } else {
            format!(" (inhibited: {} firing)", inhibited_by.join(", "))
        };
        self.events.emit(
            &service,
            None,
            "alert",
            format!(
                "{} {state}{held}: {what} {{{}}}",
                a.labels.get("alertname").map_or("", String::as_str),
                labels.join(", ")
            ),
        );
    }
}

/// Firing alerts by service: `db` → [`db/DatabaseDown`].
fn firing_services<'a>(
    groups: impl Iterator<Item = &'a GroupState>,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for g in groups {
        for r in &g.rules {
            for a in r.active.values() {
                if a.state != AlertState::Firing {
                    continue;
                }
                if let Some(s) = a.labels.get("service") {
                    let name = format!(
                        "{s}/{}",
                        a.labels.get("alertname").map_or("", String::as_str)
                    );
                    let v = out.entry(s.clone()).or_default();
                    if !v.contains(&name) {
                        v.push(name);
                    }
                }
            }
        }
    }
    out
}

/// What holds `a` back: firing alerts of the services its service depends on.
fn inhibitors(
    a: &super::rule::Alert,
    deps: &BTreeMap<String, std::collections::BTreeSet<String>>,
    firing: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let Some(service) = a.labels.get("service") else {
        return Vec::new();
    };
    deps.get(service)
        .into_iter()
        .flatten()
        .filter_map(|d| firing.get(d))
        .flatten()
        .cloned()
        .collect()
}

/// Each service's dependencies, direct and indirect (`depends_on`).
pub fn dependency_closure(stack: &Stack) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for name in stack.services.keys() {
        let mut seen = std::collections::BTreeSet::new();
        let mut todo: Vec<&String> = stack.services[name].depends_on.keys().collect();
        while let Some(d) = todo.pop() {
            if d != name
                && seen.insert(d.clone())
                && let Some(s) = stack.services.get(d)
            {
                todo.extend(s.depends_on.keys());
            }
        }
        out.insert(name.clone(), seen);
    }
    out
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

use super::rfc3339;

/// Where an alert links back to: its expression in the graph page.
fn generator_url(base: &str, expr: &str) -> String {
    format!(
        "{base}/graph?g0.expr={}&g0.tab=1",
        crate::scrape::encode(expr)
    )
}

/// An alert's labels with the external labels added (its own win).
fn with_external(a: &super::rule::Alert, external: &LabelMap) -> LabelMap {
    let mut labels = external.clone();
    labels.extend(a.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// An alert as Alertmanager's API v2 takes it: external labels added
/// (the alert's own win), `endsAt` its resolution or how long it is valid
/// without being sent again.
pub fn postable(
    a: &super::rule::Alert,
    external: &LabelMap,
    expr: &str,
    base: &str,
    valid_until: i64,
) -> serde_json::Value {
    let ends = match a.state {
        AlertState::Inactive => a.resolved_at_ms.unwrap_or(valid_until),
        _ => valid_until,
    };
    serde_json::json!({
        "labels": with_external(a, external),
        "annotations": a.annotations,
        "startsAt": rfc3339(a.active_at_ms),
        "endsAt": rfc3339(ends),
        "generatorURL": generator_url(base, expr),
    })
}

fn same_rules(a: &[RuleState], b: &[RuleState]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.rule == y.rule)
}

/// After a restart: alerts active now take back the `active_at` the last
/// daemon recorded in `ALERTS_FOR_STATE` within the outage tolerance, unless
/// that series ended (its last sample a stale marker: the alert resolved).
fn restore(g: &mut GroupState, db: &Db, t: i64) {
    for r in &mut g.rules {
        if r.active.is_empty() {
            continue;
        }
        let matchers = [
            capstan_tsdb::Matcher::eq("__name__", "ALERTS_FOR_STATE"),
            capstan_tsdb::Matcher::eq("alertname", r.rule.name()),
        ];
        let found: Vec<(LabelMap, f64)> = db
            .select_last(&matchers, t - OUTAGE_TOLERANCE_MS, t - 1)
            .iter()
            .filter_map(|s| {
                let (_, v) = s.samples().last()?;
                if capstan_tsdb::is_stale(v) {
                    return None;
                }
                let l = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                Some((l, v))
            })
            .collect();
        r.restore(&found);
    }
}

/// A query's result as samples without `__name__` (a scalar as one
/// sample without labels).
pub fn samples(v: QueryValue) -> Vec<(LabelMap, f64)> {
    match v {
        QueryValue::Vector(s) => s
            .into_iter()
            .map(|x| {
                let l: BTreeMap<String, String> = x
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "__name__")
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                (l, x.v)
            })
            .collect(),
        QueryValue::Scalar(_, v) => vec![(LabelMap::new(), v)],
        _ => Vec::new(),
    }
}

impl crate::state::control::Hook for Arc<Alerting> {
    fn on_apply(&self, stack: &Stack) -> Vec<String> {
        self.load(stack)
    }
}
