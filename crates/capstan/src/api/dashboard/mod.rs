//! The dashboard, served by the daemon at `/`: an overview, a page per
//! service, metrics explore (PromQL), logs (LogQL), traces and alerts.
//!
//! Tables are rendered here (`#live`, refreshed in place by the page every
//! 5 s); time charts and the explore, logs and traces pages are ES modules
//! embedded in the binary (`ui/`), drawing from the same read APIs that
//! Prometheus, Loki and Tempo clients use. On loopback it is open like those
//! APIs; elsewhere it wants the token, which a login form keeps in an
//! HttpOnly, SameSite=Strict cookie. Environment values are never shown.

use std::sync::LazyLock;

use axum::Form;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::Api;

pub mod pages;

pub use pages::esc;

/// The cookie the login form sets.
pub const COOKIE: &str = "capstan_token";

/// Annotations (events) one request returns, at most.
pub const MAX_EVENTS: usize = 2000;

const APP_JS: &str = include_str!("ui/app.js");
const CHART_JS: &str = include_str!("ui/chart.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// The assets' version, in their URLs: a new binary's assets are fetched
/// anew, and the same ones are cached for good.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    // FNV-1a over every asset: stable across builds of the same text.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in [APP_JS, CHART_JS, STYLE_CSS].iter().flat_map(|s| s.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
});

/// `GET /ui/{version}/{file}`: the embedded scripts and styles.
pub async fn asset(Path((version, file)): Path<(String, String)>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "chart.js" => (CHART_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    };
    let cache = if version == *VERSION {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    (
        [(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, cache)],
        body,
    )
        .into_response()
}

const PAGES: [(&str, &str, &str); 5] = [
    ("overview", "/", "Overview"),
    ("explore", "/explore", "Metrics"),
    ("logs", "/logs", "Logs"),
    ("traces", "/traces", "Traces"),
    ("alerts", "/alerts", "Alerts"),
];

/// A whole page: the navigation, then `body` inside `<main>` whose data
/// attributes tell the script which page it is.
pub fn shell(api: &Api, title: &str, page: &str, data: &[(&str, &str)], body: &str) -> Response {
    let stack = api.info["name"].as_str().unwrap_or("stack");
    let v = &*VERSION;
    let mut h = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
<meta name=viewport content='width=device-width, initial-scale=1'>\
<title>{t} · {s} · capstan</title><link rel=icon href='data:,'><link rel=stylesheet href=/ui/{v}/style.css>\
<script>try{{const t=localStorage.getItem('capstan-theme');if(t)document.documentElement.dataset.theme=t}}catch(e){{}}</script>\
<script type=module src=/ui/{v}/app.js></script></head><body>\
<header><a class=brand href=/>{s}</a><nav aria-label=Pages>",
        t = esc(title),
        s = esc(stack),
    );
    for (id, href, label) in PAGES {
        let current = if id == page || (page == "service" && id == "overview") {
            " aria-current=page"
        } else {
            ""
        };
        h.push_str(&format!("<a href={href}{current}>{label}</a>"));
    }
    h.push_str(
        "</nav><span class=spacer></span><button type=button id=theme title='switch between the system, dark and light themes'>theme</button></header>",
    );
    h.push_str(&format!("<main id=main data-page={page}"));
    for (k, v) in data {
        h.push_str(&format!(" data-{k}=\"{}\"", esc(v)));
    }
    h.push('>');
    h.push_str(body);
    h.push_str("</main></body></html>");
    html(h)
}

pub fn html(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize, Default)]
pub struct PartParams {
    /// `live`: only the tables, for the page's refresh.
    #[serde(default)]
    part: Option<String>,
}

/// Between the live parts of a page when only they are sent.
const PART_BREAK: &str = "<!--part-->";

/// A page whose tables are rendered here: the whole page (the charts go
/// between the first part and the rest), or with `?part=live` only the
/// parts, for the page's refresh.
fn with_live(
    api: &Api,
    p: &PartParams,
    title: &str,
    page: &str,
    data: &[(&str, &str)],
    parts: Vec<String>,
) -> Response {
    if p.part.as_deref() == Some("live") {
        return html(parts.join(PART_BREAK));
    }
    let mut body = String::new();
    for (i, part) in parts.iter().enumerate() {
        body.push_str(&format!("<div class=live data-part={i}>{part}</div>"));
        if i == 0 {
            body.push_str("<div id=charts></div>");
        }
    }
    shell(api, title, page, data, &body)
}

/// `GET /`: the overview.
pub async fn overview(State(api): State<Api>, Query(p): Query<PartParams>) -> Response {
    let live = pages::overview(&api).await;
    with_live(&api, &p, "Overview", "overview", &[], live)
}

/// `GET /service/{name}`.
pub async fn service(
    State(api): State<Api>,
    Path(name): Path<String>,
    Query(p): Query<PartParams>,
) -> Response {
    if api.board.service(&name).is_none() {
        let body = format!(
            "<h1>No service {}</h1><p><a href=/>Back to the overview</a></p>",
            esc(&name)
        );
        let mut r = shell(&api, "not found", "missing", &[], &body);
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let autoscaled = api.autoscaler.statuses().iter().any(|s| s.service == name);
    let live = pages::service(&api, &name).await;
    let mut data = vec![("service", name.as_str())];
    if autoscaled {
        data.push(("autoscale", "1"));
    }
    with_live(&api, &p, &name, "service", &data, live)
}

/// `GET /alerts`.
pub async fn alerts(State(api): State<Api>, Query(p): Query<PartParams>) -> Response {
    let live = pages::alerts(&api);
    with_live(&api, &p, "Alerts", "alerts", &[], live)
}

/// `GET /explore`, `/logs`, `/traces`: drawn by the script.
pub async fn explore(State(api): State<Api>) -> Response {
    shell(&api, "Explore metrics", "explore", &[], "")
}

pub async fn logs(State(api): State<Api>) -> Response {
    shell(&api, "Logs", "logs", &[], "")
}

pub async fn traces(State(api): State<Api>) -> Response {
    shell(&api, "Traces", "traces", &[], "")
}

/// `GET /traces/{id}`: one trace's waterfall.
pub async fn trace(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let ok = !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        let mut r = shell(
            &api,
            "Trace",
            "missing",
            &[],
            &format!(
                "<p class=bad>{} is not a trace id (up to 32 hex digits)</p>",
                esc(&id)
            ),
        );
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    }
    shell(&api, "Trace", "traces", &[("trace", &id)], "")
}

#[derive(Deserialize, Default)]
pub struct EventParams {
    start_ms: Option<i64>,
    end_ms: Option<i64>,
    service: Option<String>,
    /// Only what the charts mark: deploys, restarts, scaling, alerts.
    #[serde(default)]
    marks: Option<String>,
}

/// The group an event kind is drawn as, if the charts mark it.
pub fn mark_group(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "updated" | "rolled" | "rollback" | "promoted" | "canary-step" | "verdict" | "paused"
        | "rollout-continue" => "deploy",
        "restarted" | "exited" | "crash-looping" | "oom-killed" | "failed" | "unhealthy" => {
            "restart"
        }
        "scaled" | "autoscaled" | "waking" | "idle" => "scale",
        "alert" => "alert",
        _ => return None,
    })
}

/// `GET /ui/api/events`: events in a time range (newest [`MAX_EVENTS`]),
/// for the charts' annotations and timelines.
pub async fn events(State(api): State<Api>, Query(p): Query<EventParams>) -> Response {
    let (history, _) = api.events.subscribe_with_history();
    let out = select_events(&history, &p);
    axum::Json(serde_json::json!({ "events": out })).into_response()
}

/// The events `p` asks for, oldest first, at most the newest [`MAX_EVENTS`].
fn select_events(history: &[crate::events::Event], p: &EventParams) -> Vec<serde_json::Value> {
    let start = p.start_ms.unwrap_or(i64::MIN);
    let end = p.end_ms.unwrap_or(i64::MAX);
    let marks = p.marks.is_some();
    let mut out: Vec<serde_json::Value> = history
        .iter()
        .rev()
        .filter(|e| e.time_ms >= start && e.time_ms <= end)
        .filter(|e| p.service.as_deref().is_none_or(|s| e.service == s))
        .filter_map(|e| {
            let group = mark_group(&e.kind);
            if marks && group.is_none() {
                return None;
            }
            let who = match e.replica {
                Some(r) => format!("{}-{r}", e.service),
                None => e.service.clone(),
            };
            Some(serde_json::json!({
                "time_ms": e.time_ms,
                "service": who,
                "kind": e.kind,
                "group": group.unwrap_or("other"),
                "text": format!("{}: {}", e.kind, e.reason),
            }))
        })
        .take(MAX_EVENTS)
        .collect();
    out.reverse();
    out
}

/// The token a request carries: the bearer header, or the login cookie.
pub fn token_of(headers: &HeaderMap) -> Option<&str> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Pages are open on loopback; elsewhere a browser without the token is sent
/// to the login form.
pub async fn page_auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    if super::reads_allowed(&api, req.headers()) {
        return next.run(req).await;
    }
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.to_string());
    let to = format!("/login?next={}", crate::scrape::encode(&target));
    Redirect::to(&to).into_response()
}

#[derive(Deserialize, Default)]
pub struct LoginParams {
    next: Option<String>,
}

/// Where to go after logging in: a path on this daemon only.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

fn login_page(api: &Api, next: &str, problem: Option<&str>) -> Response {
    let msg = problem.map_or(String::new(), |p| {
        format!("<p class=bad role=alert>{}</p>", esc(p))
    });
    shell(
        api,
        "Log in",
        "login",
        &[],
        &format!(
            "<form class=login method=post action=/login><h1>Log in</h1>\
<p>This daemon listens beyond loopback: give its API token (the file <code>.capstan/token</code> beside the stack).</p>{msg}\
<label for=token>API token</label><input id=token name=token type=password autocomplete=current-password required autofocus>\
<input type=hidden name=next value=\"{}\"><button type=submit>Log in</button></form>",
            esc(next)
        ),
    )
}

/// `GET /login`.
pub async fn login_form(State(api): State<Api>, Query(p): Query<LoginParams>) -> Response {
    login_page(&api, &safe_next(p.next.as_deref()), None)
}

#[derive(Deserialize)]
pub struct LoginBody {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

/// `POST /login`: a right token is kept in an HttpOnly, SameSite=Strict
/// cookie; a wrong one gets the form again with why.
pub async fn login(State(api): State<Api>, Form(b): Form<LoginBody>) -> Response {
    let next = safe_next(b.next.as_deref());
    if !super::constant_time_eq(b.token.trim().as_bytes(), api.token.as_bytes()) {
        let mut r = login_page(&api, &next, Some("That is not this daemon's token."));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        return r;
    }
    let mut r = Redirect::to(&next).into_response();
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
        api.token.as_str()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /logout`: forgets the cookie.
pub async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("capstan_token=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; capstan_token=t1"),
        );
        assert_eq!(token_of(&h), Some("t1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t2"));
        assert_eq!(token_of(&h), Some("t2"));
    }

    #[test]
    fn login_goes_back_only_to_this_daemon() {
        assert_eq!(safe_next(Some("/logs?q=x")), "/logs?q=x");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn at_most_the_newest_events_in_the_range() {
        let history: Vec<crate::events::Event> = (0..2500)
            .map(|i| crate::events::Event {
                time_ms: i,
                service: if i % 2 == 0 { "web" } else { "db" }.into(),
                replica: None,
                revision: None,
                kind: if i % 5 == 0 { "scaled" } else { "healthy" }.into(),
                reason: String::new(),
            })
            .collect();
        let all = select_events(&history, &EventParams::default());
        assert_eq!(all.len(), MAX_EVENTS);
        assert_eq!(all[0]["time_ms"], 500, "the newest are kept, oldest first");
        assert_eq!(all[MAX_EVENTS - 1]["time_ms"], 2499);
        let p = EventParams {
            start_ms: Some(100),
            end_ms: Some(199),
            service: Some("web".into()),
            marks: Some("1".into()),
        };
        let some = select_events(&history, &p);
        assert_eq!(some.len(), 10, "{some:?}");
        assert!(some.iter().all(|e| e["group"] == "scale"));
    }

    #[test]
    fn chart_marks_group_event_kinds() {
        assert_eq!(mark_group("updated"), Some("deploy"));
        assert_eq!(mark_group("autoscaled"), Some("scale"));
        assert_eq!(mark_group("restarted"), Some("restart"));
        assert_eq!(mark_group("alert"), Some("alert"));
        assert_eq!(mark_group("healthy"), None);
    }
}
