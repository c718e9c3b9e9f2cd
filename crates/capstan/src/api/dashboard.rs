//! The dashboard's first page, served at `/`: every service and replica
//! with state, health, restarts and revision, rollouts, firing alerts and
//! what happened recently, rendered on the server (no script, no build
//! step), refreshed every 5 s. On loopback it is open like the read APIs;
//! elsewhere it needs the token.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

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

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fff}\
h1{font-size:1.3em}h2{font-size:1.05em;margin-top:1.6em}\
table{border-collapse:collapse;min-width:40em}td,th{padding:.25em .8em;text-align:left;border-bottom:1px solid #ddd}\
th{font-weight:600}.ok{color:#1a7f37}.bad{color:#cf222e}.warn{color:#9a6700}.dim{color:#6e7781}\
@media (prefers-color-scheme: dark){body{background:#0d1117;color:#e6edf3}td,th{border-color:#30363d}}";

/// `GET /`: the overview.
pub async fn overview(State(api): State<Api>) -> Response {
    let name = api.info["name"].as_str().unwrap_or("stack").to_owned();
    let mut h = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
<meta name=viewport content='width=device-width'><title>{n} · capstan</title><style>{STYLE}</style></head><body>\
<h1>{n}</h1>",
        n = esc(&name)
    );
    // Services, with what is rolling out.
    h.push_str("<h2>Services</h2><table><tr><th>service</th><th>replicas</th><th>revision</th><th>rollout</th></tr>");
    let replicas = api.board.replicas();
    for s in api.board.services() {
        let ready = replicas
            .iter()
            .filter(|r| r.service == s.name && r.is_ready())
            .count();
        let rollout = match &s.rollout {
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
                None => format!("rolling {} → {} ({})", r.from, s.revision, esc(&r.plan)),
            },
            None if s.stopped => "<span class=dim>stopped</span>".into(),
            None => "<span class=dim>—</span>".into(),
        };
        let class = if ready as u32 >= s.desired {
            "ok"
        } else {
            "warn"
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td class={class}>{ready}/{} ready</td><td>{}</td><td>{rollout}</td></tr>",
            esc(&s.name),
            s.desired,
            s.revision
        ));
    }
    h.push_str("</table>");
    // Replicas.
    h.push_str("<h2>Replicas</h2><table><tr><th>replica</th><th>rev</th><th>state</th><th>health</th><th>restarts</th><th>CPU</th><th>memory</th></tr>");
    for r in &replicas {
        let health = r.health.as_str();
        let class = match health {
            "healthy" => "ok",
            "unhealthy" => "bad",
            _ => "dim",
        };
        h.push_str(&format!(
            "<tr><td>{}-{}</td><td>{}</td><td>{}</td><td class={class}>{health}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.service),
            r.replica,
            r.revision,
            esc(&r.state.to_string()),
            r.restarts,
            r.cpu_percent.map_or("—".into(), |c| format!("{c:.1}%")),
            r.memory_bytes.map_or("—".into(), bytes),
        ));
    }
    h.push_str("</table>");
    // Alerts.
    let alerts: Vec<_> = api
        .alerting
        .groups()
        .into_iter()
        .flat_map(|g| g.rules.into_iter())
        .flat_map(|r| r.active.into_values())
        .filter(|a| a.state != crate::alerting::rule::AlertState::Inactive)
        .collect();
    h.push_str("<h2>Alerts</h2>");
    if alerts.is_empty() {
        h.push_str("<p class=dim>none firing or pending</p>");
    } else {
        h.push_str("<table><tr><th>alert</th><th>state</th><th>labels</th><th>summary</th></tr>");
        for a in &alerts {
            let labels: Vec<String> = a
                .labels
                .iter()
                .filter(|(k, _)| *k != "alertname")
                .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
                .collect();
            let state = if a.inhibited_by.is_empty() {
                a.state.as_str()
            } else {
                "inhibited"
            };
            let class = if state == "firing" { "bad" } else { "warn" };
            h.push_str(&format!(
                "<tr><td>{}</td><td class={class}>{state}</td><td>{}</td><td>{}</td></tr>",
                esc(a.labels.get("alertname").map_or("", String::as_str)),
                labels.join(" "),
                esc(a.annotations.get("summary").map_or("", String::as_str))
            ));
        }
        h.push_str("</table>");
    }
    // What changed recently.
    let (history, _) = api.events.subscribe_with_history();
    h.push_str(
        "<h2>Recent events</h2><table><tr><th>time</th><th>who</th><th>what</th><th>why</th></tr>",
    );
    for e in history.iter().rev().take(EVENTS) {
        let when = jiff::Timestamp::from_millisecond(e.time_ms)
            .map(|t| t.strftime("%H:%M:%S").to_string())
            .unwrap_or_default();
        let who = match e.replica {
            Some(r) => format!("{}-{r}", e.service),
            None => e.service.clone(),
        };
        h.push_str(&format!(
            "<tr><td class=dim>{when}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&who),
            esc(&e.kind),
            esc(&e.reason)
        ));
    }
    h.push_str("</table><p class=dim>capstan ");
    h.push_str(env!("CARGO_PKG_VERSION"));
    h.push_str(" · refreshed every 5 s · <a href=/api/v1/alerts>alerts</a> · <a href=/api/v1/rules>rules</a></p></body></html>");
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        h,
    )
        .into_response()
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
}
