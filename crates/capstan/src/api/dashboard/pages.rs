//! The tables of the overview, service and alerts pages, rendered here so
//! they show at first paint (and without the script).

use std::collections::BTreeMap;

use super::Api;

/// How many recent events the page lists.
const EVENTS: usize = 30;

/// Text made safe for HTML.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Per service: requests per second, the 5xx share and the p99 latency
/// through the proxy over the last minute.
#[derive(Default, Clone, Copy)]
struct Red {
    rps: Option<f64>,
    errors: Option<f64>,
    p99: Option<f64>,
}

const RED_QUERIES: [&str; 3] = [
    "sum by (service) (rate(http_requests_total{job=\"capstan\"}[1m]))",
    "(sum by (service) (rate(http_requests_total{job=\"capstan\",code=~\"5..\"}[1m])) or sum by (service) (rate(http_requests_total{job=\"capstan\"}[1m])) * 0) / sum by (service) (rate(http_requests_total{job=\"capstan\"}[1m]))",
    "histogram_quantile(0.99, sum by (le, service) (rate(http_request_duration_seconds_bucket{job=\"capstan\"}[1m])))",
];

async fn red(api: &Api) -> BTreeMap<String, Red> {
    let (db, engine) = (api.db.clone(), api.engine.clone());
    let now = crate::events::now_ms();
    crate::api::blocking(move || {
        let mut out: BTreeMap<String, Red> = BTreeMap::new();
        for (i, q) in RED_QUERIES.iter().enumerate() {
            let Ok(r) = engine.instant(&*db, q, now) else {
                continue;
            };
            if let capstan_promql::QueryValue::Vector(samples) = r.value {
                for s in samples {
                    let Some(svc) = s.labels.get("service") else {
                        continue;
                    };
                    let e = out.entry(svc.to_owned()).or_default();
                    let v = Some(s.v).filter(|v| v.is_finite());
                    match i {
                        0 => e.rps = v,
                        1 => e.errors = v,
                        _ => e.p99 = v,
                    }
                }
            }
        }
        out
    })
    .await
    .unwrap_or_default()
}

fn num(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("<span class=dim>—</span>".into(), f)
}

impl Red {
    /// Requests per second, the 5xx share and the p99, as shown.
    fn shown(&self) -> [String; 3] {
        [
            num(self.rps, |v| format!("{v:.1}")),
            num(self.errors, |v| format!("{:.2}%", v * 100.0)),
            num(self.p99, seconds),
        ]
    }
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn when(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(jiff::tz::TimeZone::system())
                .strftime("%H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
}

fn rollout_text(s: &crate::state::ServiceStatus) -> String {
    match &s.rollout {
        Some(r) => match &r.canary {
            Some(c) => format!(
                "canary {} over {}: step {} of {}, weight {}%, {}",
                s.revision,
                r.from,
                c.step.min(c.steps),
                c.steps,
                c.weight,
                esc(&c.phase)
            ),
            None => format!(
                "{} {} → {} ({})",
                if r.back { "rolling back" } else { "rolling" },
                r.from,
                s.revision,
                esc(&r.plan)
            ),
        },
        None if s.stopped => "<span class=dim>stopped</span>".into(),
        None => "<span class=dim>—</span>".into(),
    }
}

fn replica_rows(h: &mut String, replicas: &[crate::state::Status], link: bool) {
    h.push_str("<table><thead><tr><th>replica</th><th>rev</th><th>state</th><th>health</th><th>restarts</th><th>CPU</th><th>memory</th><th>last exit</th></tr></thead><tbody>");
    for r in replicas {
        let health = r.health.as_str();
        let class = match health {
            "healthy" => "ok",
            "unhealthy" => "bad",
            _ => "dim",
        };
        let name = format!("{}-{}", esc(&r.service), r.replica);
        let name = if link {
            format!("<a href=\"/service/{}\">{name}</a>", esc(&r.service))
        } else {
            name
        };
        h.push_str(&format!(
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td class={class}>{health}</td><td>{}</td><td>{}</td><td>{}</td><td class=dim>{}</td></tr>",
            r.revision,
            esc(&r.state.to_string()),
            r.restarts,
            r.cpu_percent.map_or("—".into(), |c| format!("{c:.1}%")),
            r.memory_bytes.map_or("—".into(), bytes),
            esc(r.last_exit.as_deref().unwrap_or("")),
        ));
    }
    h.push_str("</tbody></table>");
}

fn event_rows(h: &mut String, api: &Api, service: Option<&str>) {
    let (history, _) = api.events.subscribe_with_history();
    h.push_str(
        "<table><thead><tr><th>time</th><th>who</th><th>what</th><th>why</th></tr></thead><tbody>",
    );
    let mut n = 0;
    for e in history
        .iter()
        .rev()
        .filter(|e| service.is_none_or(|s| e.service == s))
        .take(EVENTS)
    {
        n += 1;
        let who = match e.replica {
            Some(r) => format!("{}-{r}", e.service),
            None => e.service.clone(),
        };
        h.push_str(&format!(
            "<tr><td class=dim>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(e.time_ms),
            esc(&who),
            esc(&e.kind),
            esc(&e.reason)
        ));
    }
    if n == 0 {
        h.push_str("<tr><td colspan=4 class=dim>nothing yet</td></tr>");
    }
    h.push_str("</tbody></table>");
}

fn active_alerts(api: &Api) -> Vec<crate::alerting::rule::Alert> {
    api.alerting
        .groups()
        .into_iter()
        .flat_map(|g| g.rules.into_iter())
        .flat_map(|r| r.active.into_values())
        .filter(|a| a.state != crate::alerting::rule::AlertState::Inactive)
        .collect()
}

fn alert_rows(h: &mut String, alerts: &[crate::alerting::rule::Alert], full: bool) {
    if alerts.is_empty() {
        h.push_str("<p class=dim>none firing or pending</p>");
        return;
    }
    h.push_str("<table><thead><tr><th>alert</th><th>state</th><th>since</th><th>labels</th><th>annotations</th></tr></thead><tbody>");
    for a in alerts {
        let labels: Vec<String> = a
            .labels
            .iter()
            .filter(|(k, _)| *k != "alertname")
            .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
            .collect();
        let state = if a.inhibited_by.is_empty() {
            a.state.as_str().to_owned()
        } else {
            format!("inhibited by {}", a.inhibited_by.join(", "))
        };
        let class = if state == "firing" { "bad" } else { "warn" };
        let notes: Vec<String> = a
            .annotations
            .iter()
            .filter(|(k, _)| full || *k == "summary")
            .map(|(k, v)| {
                if full {
                    format!("<b>{}</b>: {}", esc(k), esc(v))
                } else {
                    esc(v)
                }
            })
            .collect();
        h.push_str(&format!(
            "<tr><td>{}</td><td class={class}>{}</td><td class=dim>{}</td><td>{}</td><td>{}</td></tr>",
            esc(a.labels.get("alertname").map_or("", String::as_str)),
            esc(&state),
            when(a.active_at_ms),
            labels.join(" "),
            notes.join("<br>")
        ));
    }
    h.push_str("</tbody></table>");
}

/// The overview's tables: services with their traffic, replicas, the host,
/// alerts, and what happened recently.
pub async fn overview(api: &Api) -> Vec<String> {
    let red = red(api).await;
    let mut h = String::from(
        "<h2>Services</h2><table><thead><tr><th>service</th><th>replicas</th><th>revision</th><th>req/s</th><th>errors</th><th>p99</th><th>rollout</th></tr></thead><tbody>",
    );
    let replicas = api.board.replicas();
    for s in api.board.services() {
        let ready = replicas
            .iter()
            .filter(|r| r.service == s.name && r.is_ready())
            .count();
        let class = if ready as u32 >= s.desired {
            "ok"
        } else {
            "warn"
        };
        let m = red.get(&s.name).copied().unwrap_or_default();
        let err_class = if m.errors.unwrap_or(0.0) > 0.01 {
            "bad"
        } else {
            ""
        };
        let [rps, errors, p99] = m.shown();
        h.push_str(&format!(
            "<tr><td><a href=\"/service/{n}\">{n}</a></td><td class={class}>{ready}/{} ready</td><td>{}</td><td>{rps}</td><td class='{err_class}'>{errors}</td><td>{p99}</td><td>{}</td></tr>",
            s.desired,
            s.revision,
            rollout_text(&s),
            n = esc(&s.name),
        ));
    }
    h.push_str("</tbody></table>");
    let mut rest = String::from("<h2>Replicas</h2>");
    let h2 = &mut rest;
    replica_rows(h2, &replicas, true);
    h2.push_str(&format!("<h2>Host</h2><p>{}</p>", esc(&host())));
    h2.push_str("<h2>Alerts</h2>");
    alert_rows(h2, &active_alerts(api), false);
    h2.push_str("<h2>Recent events</h2>");
    event_rows(h2, api, None);
    h2.push_str(&format!(
        "<p class=dim>capstan {} · tables refresh every 5 s</p>",
        env!("CARGO_PKG_VERSION")
    ));
    vec![h, rest]
}

/// The host in one line: load and memory in use.
fn host() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        mem.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = match (kib("MemTotal:"), kib("MemAvailable:")) {
        (Some(t), Some(a)) => format!(
            "memory {} of {} in use",
            bytes((t - a.min(t)) * 1024),
            bytes(t * 1024)
        ),
        _ => "memory unknown".into(),
    };
    format!("{cpus} CPUs · load {} · {memory}", load.join(" "))
}

/// A revision's changes as the page shows them: environment values are
/// never shown, only which variables changed.
pub fn shown_diff(line: &str) -> String {
    match line.strip_prefix("environment.") {
        Some(rest) => {
            let var = rest.split(':').next().unwrap_or(rest);
            format!("environment.{var}: changed (values are not shown)")
        }
        None if line.starts_with("environment:") => {
            "environment: changed (values are not shown)".into()
        }
        None => line.to_owned(),
    }
}

/// A service's page: replicas (exited ones too), its rollout, the
/// autoscaler, revisions and events.
pub async fn service(api: &Api, name: &str) -> Vec<String> {
    let red = red(api).await.remove(name).unwrap_or_default();
    let Some(s) = api.board.service(name) else {
        return vec!["<p class=bad>this service is gone</p>".into()];
    };
    let replicas = api.board.replicas_of(name);
    let ready = replicas.iter().filter(|r| r.is_ready()).count();
    let [rps, errors, p99] = red.shown();
    let mut top = format!(
        "<h1>{}</h1><p>{ready}/{} ready · revision {} · {rps} req/s · {errors} errors · p99 {p99} · {}</p>",
        esc(name),
        s.desired,
        s.revision,
        rollout_text(&s),
    );
    if let Some(c) = s.rollout.as_ref().and_then(|r| r.canary.as_ref())
        && !c.checks.is_empty()
    {
        top.push_str("<h2>Rollout checks</h2><table><thead><tr><th>check</th><th>verdict</th><th>value</th><th>threshold</th><th>window</th><th>requests (canary / baseline)</th></tr></thead><tbody>");
        for k in &c.checks {
            let class = match k.outcome.as_str() {
                "pass" => "ok",
                "fail" => "bad",
                _ => "dim",
            };
            top.push_str(&format!(
                "<tr><td>{}</td><td class={class}>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td></tr>",
                esc(&k.name),
                k.outcome.as_str(),
                k.value.map_or("—".into(), |v| format!("{v:.4}")),
                esc(&k.threshold),
                esc(&k.window),
                k.canary_requests,
                k.baseline_requests
            ));
        }
        top.push_str("</tbody></table>");
    }
    let mut rest = String::from("<h2>Replicas</h2>");
    let h = &mut rest;
    replica_rows(h, &replicas, false);
    if let Some(a) = api
        .autoscaler
        .statuses()
        .into_iter()
        .find(|a| a.service == name)
    {
        let metrics: Vec<String> = a
            .metrics
            .iter()
            .map(|m| {
                format!(
                    "{}: {}",
                    esc(&m.metric),
                    m.ratio.map_or("no value".into(), |r| format!(
                        "{:.0}% of target",
                        r * 100.0
                    ))
                )
            })
            .collect();
        h.push_str(&format!(
            "<h2>Autoscaler</h2><p>{} of {}–{} replicas wanted, {} running · {} · last decision: {}</p>",
            a.desired,
            a.min,
            a.max,
            a.current,
            metrics.join(", "),
            esc(&a.reason)
        ));
    }
    h.push_str("<h2>Revisions</h2><table><thead><tr><th>rev</th><th>made</th><th>trigger</th><th>status</th><th>what changed</th></tr></thead><tbody>");
    for r in api.history.of(name).into_iter().rev().take(20) {
        let diff: Vec<String> = r.diff.iter().map(|d| esc(&shown_diff(d))).collect();
        let why = if r.why.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&r.why))
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td class=dim>{}</td><td>{}</td><td>{}{why}</td><td>{}</td></tr>",
            r.revision,
            when(r.time_ms),
            esc(&r.trigger),
            r.status.as_str(),
            diff.join("<br>")
        ));
    }
    h.push_str("</tbody></table><h2>Events</h2>");
    event_rows(h, api, Some(name));
    vec![top, rest]
}

/// The alerts page's tables: active alerts with every annotation, and the
/// rules with their health.
pub fn alerts(api: &Api) -> Vec<String> {
    let mut h = String::from("<h1>Alerts</h1><h2>Firing, pending and inhibited</h2>");
    alert_rows(&mut h, &active_alerts(api), true);
    h.push_str("<h2>Rules</h2><table><thead><tr><th>group</th><th>rule</th><th>state</th><th>health</th><th>last evaluated</th></tr></thead><tbody>");
    let groups = api.alerting.groups();
    for g in &groups {
        for r in &g.rules {
            let state = r
                .active
                .values()
                .map(|a| a.state.as_str())
                .max_by_key(|s| match *s {
                    "firing" => 2,
                    "pending" => 1,
                    _ => 0,
                })
                .unwrap_or("inactive");
            let health = match &r.last_error {
                None => "<span class=ok>ok</span>".to_owned(),
                Some(e) => format!("<span class=bad>{}</span>", esc(e)),
            };
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{state}</td><td>{health}</td><td class=dim>{}</td></tr>",
                esc(&g.name),
                esc(r.rule.name()),
                r.last_eval_ms.map(when).unwrap_or_default()
            ));
        }
    }
    if groups.is_empty() {
        h.push_str("<tr><td colspan=5 class=dim>no rule files (x-capstan.rule_files)</td></tr>");
    }
    h.push_str("</tbody></table>");
    vec![h]
}

#[cfg(test)]
mod tests {
    #[test]
    fn escaping() {
        assert_eq!(
            super::esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(super::bytes(1536), "1.5 KiB");
    }

    #[test]
    fn environment_values_are_never_shown() {
        assert_eq!(
            super::shown_diff("environment.API_KEY: \"old\" -> \"new\""),
            "environment.API_KEY: changed (values are not shown)"
        );
        assert_eq!(
            super::shown_diff("environment: added {\"A\":\"x\"}"),
            "environment: changed (values are not shown)"
        );
        assert_eq!(
            super::shown_diff("image: \"a\" -> \"b\""),
            "image: \"a\" -> \"b\""
        );
    }
}
