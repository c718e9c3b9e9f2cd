//! The Prometheus HTTP API (`/api/v1/…`): queries through capstan-promql over the
//! daemon's store, series and label lookups, targets, status pages — the same
//! JSON shapes, value encoding, error envelope and status codes as Prometheus.

// Parameter helpers return the error response itself, sent as is.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capstan_promql::{Engine, EngineOptions, QueryOutput, QueryValue};
use capstan_tsdb::{Labels, Matcher};

use super::Api;

/// Prometheus refuses range queries with more points per series than this.
pub const MAX_POINTS: i64 = 11_000;

/// The query engine the API and the daemon's controllers share.
pub fn engine(q: &crate::spec::QuerySettings) -> Arc<Engine> {
    Arc::new(Engine::new(EngineOptions {
        timeout: q.timeout.0,
        max_samples: usize::try_from(q.max_samples).unwrap_or(usize::MAX),
        max_memory_bytes: usize::try_from(q.max_memory).unwrap_or(usize::MAX),
        ..EngineOptions::default()
    }))
}

pub(crate) fn err(kind: &str, msg: impl std::fmt::Display) -> Response {
    let code = match kind {
        "bad_data" => StatusCode::BAD_REQUEST,
        "execution" => StatusCode::UNPROCESSABLE_ENTITY,
        "timeout" | "canceled" | "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "not_found" => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = serde_json::json!({"status": "error", "errorType": kind, "error": msg.to_string()});
    (code, axum::Json(body)).into_response()
}

pub(crate) fn ok_json(data: serde_json::Value) -> Response {
    axum::Json(serde_json::json!({"status": "success", "data": data})).into_response()
}

/// Parameters from the query string and, for POST, a form-encoded body; repeated
/// keys (`match[]`) keep every value.
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn from(
        query: Option<String>,
        method: &Method,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Params {
        let Params(mut v) = Params::from_query(query);
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
        if method == Method::POST && form {
            v.extend(form_urlencoded_pairs(&String::from_utf8_lossy(body)));
        }
        Params(v)
    }

    /// The query string's parameters alone (GET-only endpoints).
    pub fn from_query(query: Option<String>) -> Params {
        Params(query.map_or_else(Vec::new, |q| form_urlencoded_pairs(&q)))
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    pub fn all(&self, k: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Handlers take the parameters as an extractor (it reads the body).
impl<S: Send + Sync> axum::extract::FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let method = req.method().clone();
        let headers = req.headers().clone();
        let query = req.uri().query().map(str::to_owned);
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Params::from(query, &method, &headers, &body))
    }
}

fn form_urlencoded_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            x => out.push(x),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A time as the API takes it: Unix seconds (with a fraction) or RFC 3339.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() {
            return Ok((f * 1000.0).round() as i64);
        }
    }
    match s {
        // Prometheus' own spellings of the extremes.
        "-292273086-05-16T16:47:06Z" => return Ok(i64::MIN / 2),
        "292277025-08-17T07:12:55.807Z" => return Ok(i64::MAX / 2),
        _ => {}
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| format!("cannot parse {s:?} to a valid timestamp"))
}

/// A duration as the API takes it: seconds (with a fraction) or `5m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    if let Ok(f) = s.parse::<f64>() {
        if f.is_finite() {
            return Ok((f * 1000.0).round() as i64);
        }
    }
    capstan_promql::promqltest::parse_duration_ms(s)
        .ok_or_else(|| format!("cannot parse {s:?} to a valid duration"))
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn ts_json(out: &mut Vec<u8>, t: i64) {
    let (s, ms) = (t.div_euclid(1000), t.rem_euclid(1000));
    capstan_promql::mathx::push_int(out, s);
    if ms != 0 {
        // Milliseconds as a decimal fraction without trailing zeros.
        let digits = [ms / 100, ms / 10 % 10, ms % 10];
        let len = if ms % 100 == 0 {
            1
        } else if ms % 10 == 0 {
            2
        } else {
            3
        };
        out.push(b'.');
        for d in &digits[..len] {
            out.push(b'0' + *d as u8);
        }
    }
}

/// A JSON string; most label names and values need no escaping.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(serde_json::Value::from(s).to_string().as_bytes());
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn labels_json(out: &mut Vec<u8>, l: &Labels) {
    out.push(b'{');
    for (i, (n, v)) in l.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, n);
        out.push(b':');
        json_str(out, v);
    }
    out.push(b'}');
}

fn point_json(out: &mut Vec<u8>, t: i64, v: f64) {
    out.push(b'[');
    ts_json(out, t);
    out.extend_from_slice(b",\"");
    capstan_promql::mathx::write_value(out, v);
    out.extend_from_slice(b"\"]");
}

/// Bytes a result's JSON about takes: 32 a point, 128 a series.
fn json_size(v: &QueryValue) -> usize {
    256 + match v {
        QueryValue::Vector(s) => s.len() * 160,
        QueryValue::Matrix(s) => s.iter().map(|x| 128 + x.points.len() * 32).sum(),
        _ => 0,
    }
}

/// The `data` object of a query response, written directly (results can be large).
fn result_json_into(out: &mut Vec<u8>, v: &QueryValue) {
    out.reserve(json_size(v));
    out.extend_from_slice(b"{\"resultType\":\"");
    out.extend_from_slice(v.type_name().as_bytes());
    out.extend_from_slice(b"\",\"result\":");
    match v {
        QueryValue::Scalar(t, x) => point_json(out, *t, *x),
        QueryValue::String(t, s) => {
            out.push(b'[');
            ts_json(out, *t);
            out.push(b',');
            out.extend_from_slice(serde_json::to_string(s).unwrap_or_default().as_bytes());
            out.push(b']');
        }
        QueryValue::Vector(samples) => {
            out.push(b'[');
            for (i, s) in samples.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"metric\":");
                labels_json(out, &s.labels);
                out.extend_from_slice(b",\"value\":");
                point_json(out, s.t, s.v);
                out.push(b'}');
            }
            out.push(b']');
        }
        QueryValue::Matrix(series) => {
            out.push(b'[');
            for (i, s) in series.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"metric\":");
                labels_json(out, &s.labels);
                out.extend_from_slice(b",\"values\":[");
                for (k, (t, x)) in s.points.iter().enumerate() {
                    if k > 0 {
                        out.push(b',');
                    }
                    point_json(out, *t, *x);
                }
                out.extend_from_slice(b"]}");
            }
            out.push(b']');
        }
    }
    out.push(b'}');
}

fn query_response(o: &QueryOutput, stats: bool) -> Response {
    use std::io::Write;
    let mut body: Vec<u8> = Vec::with_capacity(64 + json_size(&o.value));
    body.extend_from_slice(b"{\"status\":\"success\",\"data\":");
    result_json_into(&mut body, &o.value);
    if stats {
        body.pop();
        let s = &o.stats;
        let _ = write!(
            body,
            ",\"stats\":{{\"timings\":{{\"evalTotalTime\":{e},\"resultSortTime\":0,\"queryPreparationTime\":0,\"innerEvalTime\":{e},\"execQueueTime\":0,\"execTotalTime\":{e}}},\"samples\":{{\"totalQueryableSamples\":{},\"peakSamples\":{}}}}}}}",
            s.total_samples,
            s.peak_samples,
            e = s.exec_seconds
        );
    }
    if !o.warnings.is_empty() {
        body.extend_from_slice(b",\"warnings\":");
        body.extend_from_slice(
            serde_json::to_string(&o.warnings)
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    if !o.infos.is_empty() {
        body.extend_from_slice(b",\"infos\":");
        body.extend_from_slice(
            serde_json::to_string(&o.infos)
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    body.push(b'}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn timeout_param(p: &Params) -> Result<Option<Duration>, Response> {
    match p.get("timeout") {
        None => Ok(None),
        Some(t) => parse_duration(t)
            .map(|ms| Some(Duration::from_millis(ms.max(0) as u64)))
            .map_err(|e| err("bad_data", format!("invalid parameter \"timeout\": {e}"))),
    }
}

async fn run_query(
    api: &Api,
    timeout: Option<Duration>,
    f: impl FnOnce(&Engine, &capstan_tsdb::Db) -> Result<QueryOutput, capstan_promql::Error>
    + Send
    + 'static,
) -> Result<QueryOutput, Response> {
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _cancel_on_drop = super::CancelOnDrop(cancel.clone());
    let mut opts = api.engine.opts.clone();
    if let Some(t) = timeout {
        opts.timeout = opts.timeout.min(t);
    }
    opts.cancel = Some(cancel);
    let engine = Engine::new(opts);
    let db = api.db.clone();
    let r = super::blocking(move || f(&engine, &db)).await?;
    if let Ok(o) = &r {
        api.query_stats.record(o);
    }
    r.map_err(|e| {
        let msg = match &e {
            capstan_promql::Error::Parse(m) => format!("invalid parameter \"query\": {m}"),
            other => other.to_string(),
        };
        err(e.error_type(), msg)
    })
}

pub async fn query(State(api): State<Api>, p: Params) -> Response {
    let Some(expr) = p.get("query") else {
        return err("bad_data", "invalid parameter \"query\": query is required");
    };
    let t = match p.get("time").map(parse_time) {
        None => now_ms(),
        Some(Ok(t)) => t,
        Some(Err(e)) => return err("bad_data", format!("invalid parameter \"time\": {e}")),
    };
    let timeout = match timeout_param(&p) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let expr = expr.to_owned();
    match run_query(&api, timeout, move |e, db| e.instant(db, &expr, t)).await {
        Ok(o) => query_response(&o, p.get("stats").is_some()),
        Err(r) => r,
    }
}

pub async fn query_range(State(api): State<Api>, p: Params) -> Response {
    let Some(expr) = p.get("query") else {
        return err("bad_data", "invalid parameter \"query\": query is required");
    };
    let mut times = [0i64; 2];
    for (i, name) in ["start", "end"].iter().enumerate() {
        match p.get(name).map(parse_time) {
            Some(Ok(t)) => times[i] = t,
            Some(Err(e)) => return err("bad_data", format!("invalid parameter \"{name}\": {e}")),
            None => {
                return err(
                    "bad_data",
                    format!("invalid parameter \"{name}\": {name} is required"),
                );
            }
        }
    }
    let [start, end] = times;
    if end < start {
        return err(
            "bad_data",
            "invalid parameter \"end\": end timestamp must not be before start time",
        );
    }
    let step = match p.get("step").map(parse_duration) {
        Some(Ok(s)) => s,
        Some(Err(e)) => return err("bad_data", format!("invalid parameter \"step\": {e}")),
        None => return err("bad_data", "invalid parameter \"step\": step is required"),
    };
    if step <= 0 {
        return err(
            "bad_data",
            "invalid parameter \"step\": zero or negative query resolution step widths are not accepted. Try a positive integer",
        );
    }
    if (end - start) / step > MAX_POINTS {
        return err(
            "bad_data",
            "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)",
        );
    }
    let timeout = match timeout_param(&p) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let expr = expr.to_owned();
    match run_query(&api, timeout, move |e, db| {
        e.range(db, &expr, start, end, step)
    })
    .await
    {
        Ok(o) => query_response(&o, p.get("stats").is_some()),
        Err(r) => r,
    }
}

/// `match[]` selectors, each parsed into matcher sets.
fn match_params(p: &Params) -> Result<Vec<Vec<Matcher>>, Response> {
    let mut out = Vec::new();
    for m in p.all("match[]") {
        let e = capstan_promql::parse(m)
            .map_err(|e| err("bad_data", format!("invalid parameter \"match[]\": {e}")))?;
        let capstan_promql::promql_parser::parser::Expr::VectorSelector(vs) = e else {
            return Err(err(
                "bad_data",
                format!("invalid parameter \"match[]\": {m:?} is not a series selector"),
            ));
        };
        out.extend(
            capstan_promql::selector_matchers(&vs)
                .map_err(|e| err("bad_data", format!("invalid parameter \"match[]\": {e}")))?,
        );
    }
    Ok(out)
}

fn range_params(p: &Params) -> Result<(i64, i64), Response> {
    let get = |name: &str, default: i64| match p.get(name) {
        None | Some("") => Ok(default),
        Some(s) => {
            parse_time(s).map_err(|e| err("bad_data", format!("invalid parameter \"{name}\": {e}")))
        }
    };
    Ok((get("start", i64::MIN / 2)?, get("end", i64::MAX / 2)?))
}

/// A limit parameter as a signed number, `None` when absent or empty.
fn signed_param(p: &Params, name: &str) -> Result<Option<i64>, Response> {
    match p.get(name) {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<i64>().map(Some).map_err(|_| {
            err(
                "bad_data",
                format!("invalid parameter \"{name}\": {s:?} is not a number"),
            )
        }),
    }
}

/// `limit` of series/labels/values: 0 or absent is no limit, negative is refused.
fn limit_param(p: &Params) -> Result<usize, Response> {
    match signed_param(p, "limit")? {
        None | Some(0) => Ok(usize::MAX),
        Some(n) => usize::try_from(n).map_err(|_| {
            err(
                "bad_data",
                format!("invalid parameter \"limit\": \"{n}\" is not a number"),
            )
        }),
    }
}

fn matching_series(api: &Api, sets: &[Vec<Matcher>], start: i64, end: i64) -> Vec<Labels> {
    let mut all = std::collections::BTreeSet::new();
    tokio::task::block_in_place(|| {
        for set in sets {
            all.extend(api.db.series_in_range(set, start, end));
        }
    });
    all.into_iter().collect()
}

pub async fn series(State(api): State<Api>, p: Params) -> Response {
    let sets = match match_params(&p) {
        Ok(s) if s.is_empty() => return err("bad_data", "no match[] parameter provided"),
        Ok(s) => s,
        Err(r) => return r,
    };
    let ((start, end), limit) = match (range_params(&p), limit_param(&p)) {
        (Ok(r), Ok(l)) => (r, l),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let found = matching_series(&api, &sets, start, end);
    let data: Vec<BTreeMap<&str, &str>> = found
        .iter()
        .take(limit)
        .map(|l| l.iter().collect())
        .collect();
    ok_json(serde_json::to_value(data).unwrap())
}

/// How far back `/federate` looks for a series' latest sample (PromQL's lookback).
const FEDERATE_LOOKBACK_MS: i64 = 5 * 60 * 1000;

/// `GET /federate`: the latest sample of every series a `match[]` selects
/// (within the 5 m lookback; series whose latest sample is a stale marker are
/// left out), with its timestamp, in the text format, the external labels
/// added where a series lacks them: what a central Prometheus scrapes.
pub async fn federate(State(api): State<Api>, p: Params) -> Response {
    let sets = match match_params(&p) {
        Ok(s) if s.is_empty() => {
            return super::bad_request("no match[] parameter provided");
        }
        Ok(s) => s,
        Err(r) => return r,
    };
    let now = crate::events::now_ms();
    let external = api.alerting.external_labels();
    let db = api.db.clone();
    let text = match super::blocking(move || {
        // By metric name, then labels: one TYPE line per name.
        let mut latest: BTreeMap<(String, Labels), (i64, f64)> = BTreeMap::new();
        for set in &sets {
            for s in db.select_last(set, now - FEDERATE_LOOKBACK_MS, now) {
                let Some((t, v)) = s.samples().last() else {
                    continue;
                };
                if capstan_tsdb::is_stale(v) {
                    continue;
                }
                let name = s.labels.get("__name__").unwrap_or("").to_owned();
                latest.insert((name, s.labels), (t, v));
            }
        }
        let mut e = crate::exposition::Exposition::default();
        let mut last_name = None;
        for ((name, labels), (t, v)) in &latest {
            if last_name != Some(name) {
                e.type_line(name, "untyped");
                last_name = Some(name);
            }
            let mut pairs: Vec<(&str, &str)> =
                labels.iter().filter(|(k, _)| *k != "__name__").collect();
            for (k, v) in &external {
                if labels.get(k).is_none() {
                    pairs.push((k, v));
                }
            }
            pairs.sort();
            e.sample_at(name, &pairs, *v, Some(*t));
        }
        e.finish()
    })
    .await
    {
        Ok(t) => t,
        Err(r) => return r,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub async fn labels(State(api): State<Api>, p: Params) -> Response {
    let (sets, (start, end), limit) = match (match_params(&p), range_params(&p), limit_param(&p)) {
        (Ok(s), Ok(r), Ok(l)) => (s, r, l),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
    };
    let names: Vec<String> =
        if sets.is_empty() && p.get("start").is_none() && p.get("end").is_none() {
            api.db.label_names()
        } else {
            let sets = if sets.is_empty() {
                vec![vec![
                    Matcher::new("__name__", capstan_tsdb::MatchOp::Regex, ".+").unwrap(),
                ]]
            } else {
                sets
            };
            let mut n: Vec<String> = matching_series(&api, &sets, start, end)
                .iter()
                .flat_map(|l| l.iter().map(|(n, _)| n.to_owned()).collect::<Vec<_>>())
                .collect();
            n.sort();
            n.dedup();
            n
        };
    ok_json(serde_json::to_value(names.into_iter().take(limit).collect::<Vec<_>>()).unwrap())
}

pub async fn label_values(State(api): State<Api>, Path(name): Path<String>, p: Params) -> Response {
    let (sets, (start, end), limit) = match (match_params(&p), range_params(&p), limit_param(&p)) {
        (Ok(s), Ok(r), Ok(l)) => (s, r, l),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
    };
    let name = name
        .strip_prefix("U__")
        .map(unescape_utf8_name)
        .unwrap_or(name);
    let values: Vec<String> =
        if sets.is_empty() && p.get("start").is_none() && p.get("end").is_none() {
            api.db.label_values(&name)
        } else {
            let sets = if sets.is_empty() {
                vec![vec![
                    Matcher::new(&name, capstan_tsdb::MatchOp::Regex, ".+").unwrap(),
                ]]
            } else {
                sets
            };
            let mut v: Vec<String> = matching_series(&api, &sets, start, end)
                .iter()
                .filter_map(|l| l.get(&name).map(str::to_owned))
                .collect();
            v.sort();
            v.dedup();
            v
        };
    ok_json(serde_json::to_value(values.into_iter().take(limit).collect::<Vec<_>>()).unwrap())
}

/// Label names in a URL path may be written `U__` + underscore-escaped UTF-8.
fn unescape_utf8_name(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '_' {
            out.push(c);
            continue;
        }
        if it.peek() == Some(&'_') {
            it.next();
            out.push('_');
            continue;
        }
        let hex: String = it.by_ref().take_while(|c| *c != '_').collect();
        if let Some(ch) = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
            out.push(ch);
        }
    }
    out
}

/// `/api/v1/metadata`: HELP, TYPE and UNIT of the scraped metric families, as
/// the targets' last good scrapes gave them; `metric`, `limit` and
/// `limit_per_metric` as in Prometheus.
pub async fn metadata(State(api): State<Api>, RawQuery(q): RawQuery) -> Response {
    let p = Params::from_query(q);
    // Zero or less means no limit.
    let positive = |key: &str| -> Result<Option<usize>, Response> {
        Ok(signed_param(&p, key)?
            .filter(|n| *n > 0)
            .map(|n| n as usize))
    };
    let (limit, per_metric) = match (positive("limit"), positive("limit_per_metric")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let mut out = serde_json::Map::new();
    for (name, metas) in api.scraper.metadata.families() {
        if p.get("metric").is_some_and(|m| !m.is_empty() && m != name) {
            continue;
        }
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let list: Vec<serde_json::Value> = metas
            .iter()
            .take(per_metric.unwrap_or(usize::MAX))
            .map(|m| {
                serde_json::json!({
                    "type": if m.kind.is_empty() { "unknown" } else { m.kind },
                    "help": m.help,
                    "unit": m.unit,
                })
            })
            .collect();
        out.insert(name, serde_json::Value::Array(list));
    }
    ok_json(serde_json::Value::Object(out))
}

pub async fn targets(State(api): State<Api>) -> Response {
    let targets = api.scraper.targets();
    let mut active = Vec::new();
    tokio::task::block_in_place(|| {
        for t in &targets {
            let job = t
                .labels
                .iter()
                .find(|(n, _)| n == "job")
                .map(|x| x.1.clone())
                .unwrap_or_default();
            let instance = t
                .labels
                .iter()
                .find(|(n, _)| n == "instance")
                .map(|x| x.1.clone())
                .unwrap_or_default();
            let sel = |name: &str| {
                vec![
                    Matcher::eq("__name__", name),
                    Matcher::eq("job", &job),
                    Matcher::eq("instance", &instance),
                ]
            };
            let now = now_ms();
            let last = |name: &str| {
                api.db
                    .select(&sel(name), now - 3_600_000, now)
                    .iter()
                    .filter_map(|s| {
                        s.samples()
                            .filter(|(_, v)| !capstan_tsdb::is_stale(*v))
                            .last()
                    })
                    .max_by_key(|p| p.0)
            };
            let up = last("up");
            let dur = last("scrape_duration_seconds");
            let health = match up {
                None => "unknown",
                Some((_, 1.0)) => "up",
                Some(_) => "down",
            };
            let labels: BTreeMap<&str, &str> = t
                .labels
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let url = format!("http://{}{}", t.addr, t.path);
            active.push(serde_json::json!({
                "discoveredLabels": {"__address__": t.addr, "__metrics_path__": t.path, "__scheme__": "http", "job": job},
                "labels": labels,
                "scrapePool": job,
                "scrapeUrl": url,
                "globalUrl": url,
                "lastError": if health == "down" { "scrape failed (see the daemon's log)" } else { "" },
                "lastScrape": up.map(|(t, _)| jiff::Timestamp::from_millisecond(t).map(|x| x.to_string()).unwrap_or_default()).unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
                "lastScrapeDuration": dur.map(|d| d.1).unwrap_or(0.0),
                "health": health,
                "scrapeInterval": format!("{}s", t.interval.as_secs()),
                "scrapeTimeout": format!("{}s", t.timeout.as_secs()),
            }));
        }
    });
    ok_json(
        serde_json::json!({"activeTargets": active, "droppedTargets": [], "droppedTargetCounts": {}}),
    )
}

pub async fn buildinfo() -> Response {
    ok_json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "revision": "",
        "branch": "",
        "buildUser": "",
        "buildDate": "",
        "goVersion": "",
        "application": "capstan",
    }))
}

pub async fn runtimeinfo(State(api): State<Api>) -> Response {
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    ok_json(serde_json::json!({
        "startTime": api.started.to_string(),
        "CWD": cwd,
        "reloadConfigSuccess": true,
        "lastConfigTime": api.started.to_string(),
        "corruptionCount": 0,
        "goroutineCount": 0,
        "GOMAXPROCS": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "GOMEMLIMIT": 0,
        "GOGC": "",
        "GODEBUG": "",
        "storageRetention": api.retention.clone(),
    }))
}

pub async fn tsdb_status(State(api): State<Api>, RawQuery(q): RawQuery) -> Response {
    let p = Params::from_query(q);
    let limit = p
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10);
    let all = tokio::task::block_in_place(|| {
        api.db.series_in_range(
            &[Matcher::new("__name__", capstan_tsdb::MatchOp::Regex, ".+").unwrap()],
            i64::MIN / 2,
            i64::MAX / 2,
        )
    });
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    let mut values_by_label: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let mut by_pair: BTreeMap<String, u64> = BTreeMap::new();
    let mut bytes_by_label: BTreeMap<String, u64> = BTreeMap::new();
    for l in &all {
        *by_name
            .entry(l.get("__name__").unwrap_or("").to_owned())
            .or_default() += 1;
        for (n, v) in l.iter() {
            values_by_label
                .entry(n.to_owned())
                .or_default()
                .insert(v.to_owned());
            *by_pair.entry(format!("{n}={v}")).or_default() += 1;
        }
    }
    for (n, vals) in &values_by_label {
        bytes_by_label.insert(n.clone(), vals.iter().map(|v| v.len() as u64).sum());
    }
    let top = |m: BTreeMap<String, u64>| {
        let mut v: Vec<(String, u64)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(limit);
        v.into_iter()
            .map(|(name, value)| serde_json::json!({"name": name, "value": value}))
            .collect::<Vec<_>>()
    };
    let pairs: usize = values_by_label.values().map(|v| v.len()).sum();
    ok_json(serde_json::json!({
        "headStats": {
            "numSeries": api.db.series_count(),
            "numLabelPairs": pairs,
            "chunkCount": 0,
            "minTime": 0,
            "maxTime": now_ms(),
        },
        "seriesCountByMetricName": top(by_name),
        "labelValueCountByLabelName": top(values_by_label.into_iter().map(|(k, v)| (k, v.len() as u64)).collect()),
        "memoryInBytesByLabelName": top(bytes_by_label),
        "seriesCountByLabelValuePair": top(by_pair),
    }))
}

pub async fn format_query(p: Params) -> Response {
    let Some(expr) = p.get("query") else {
        return err("bad_data", "invalid parameter \"query\": query is required");
    };
    match capstan_promql::parse(expr) {
        Ok(e) => ok_json(serde_json::Value::String(e.prettify())),
        Err(e) => err("bad_data", format!("invalid parameter \"query\": {e}")),
    }
}

/// Counters of the queries served, for capstan's own `/metrics`.
#[derive(Debug, Default)]
pub struct QueryStats {
    pub queries: std::sync::atomic::AtomicU64,
    pub samples: std::sync::atomic::AtomicU64,
    /// Total evaluation time, in microseconds.
    pub micros: std::sync::atomic::AtomicU64,
}

impl QueryStats {
    fn record(&self, o: &QueryOutput) {
        use std::sync::atomic::Ordering::Relaxed;
        self.queries.fetch_add(1, Relaxed);
        self.samples.fetch_add(o.stats.total_samples, Relaxed);
        self.micros
            .fetch_add((o.stats.exec_seconds * 1e6) as u64, Relaxed);
    }
}
