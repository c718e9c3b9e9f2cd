//! The Loki HTTP API's query side (`/loki/api/v1/…`) over the log store: LogQL
//! `query` and `query_range` (streams, vectors, matrices), `labels`,
//! `label/<name>/values` and `series`, with Loki's JSON shapes, so Grafana's Loki
//! data source and logcli work against capstan.

#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use capstan_logstore::logql::ast::{Expr, Matcher};
use capstan_logstore::logql::eval::{self, Value};
use capstan_logstore::logql::{self, pipeline};
use capstan_logstore::{Direction, Labels};
use serde_json::json;

use super::Api;
use super::prom::Params;
use super::{bad_request as bad, blocking};

/// Loki's default and largest line limits.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 5000;
const HOUR_NS: i64 = 3_600_000_000_000;

fn now_ns() -> i64 {
    crate::logs::now_ns()
}

/// A time as Loki takes it: Unix nanoseconds (an integer), Unix seconds with a
/// fraction, or RFC 3339.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(n) = s.parse::<i64>() {
        // Loki reads integers as nanoseconds; shorter ones as seconds.
        return Ok(if n.abs() < 100_000_000_000 {
            n.saturating_mul(1_000_000_000)
        } else {
            n
        });
    }
    if let Ok(f) = s.parse::<f64>()
        && f.is_finite()
    {
        return Ok((f * 1e9) as i64);
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_nanosecond() as i64)
        .map_err(|_| format!("cannot parse {s:?} as a time (Unix ns, Unix seconds or RFC 3339)"))
}

/// A step or range: `5m`, `15s`, or seconds.
fn parse_step(s: &str) -> Result<i64, String> {
    if let Ok(f) = s.parse::<f64>()
        && f.is_finite()
        && f > 0.0
    {
        return Ok((f * 1e9) as i64);
    }
    logql::parse_duration(s)
        .filter(|d| *d > 0)
        .ok_or_else(|| format!("cannot parse {s:?} as a step (5m, 15s or seconds)"))
}

fn range_params(p: &Params) -> Result<(i64, i64), Response> {
    let end = match p.get("end") {
        Some(s) => parse_time(s).map_err(|e| bad(format!("invalid parameter \"end\": {e}")))?,
        None => now_ns(),
    };
    let start = match p.get("start") {
        Some(s) => parse_time(s).map_err(|e| bad(format!("invalid parameter \"start\": {e}")))?,
        None => end - HOUR_NS,
    };
    if end < start {
        return Err(bad("the end time is before the start time"));
    }
    Ok((start, end))
}

fn limit_param(p: &Params) -> Result<usize, Response> {
    match p.get("limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= MAX_LIMIT => Ok(n),
            Ok(n) => Err(bad(format!("limit {n} is over the largest, {MAX_LIMIT}"))),
            Err(_) => Err(bad(format!("invalid parameter \"limit\": {s:?}"))),
        },
    }
}

fn direction_param(p: &Params) -> Result<Direction, Response> {
    match p.get("direction").map(str::to_ascii_lowercase).as_deref() {
        None | Some("backward") => Ok(Direction::Backward),
        Some("forward") => Ok(Direction::Forward),
        Some(d) => Err(bad(format!(
            "invalid direction {d:?} (forward or backward)"
        ))),
    }
}

fn labels_json(l: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(l.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

fn num(v: f64) -> String {
    capstan_promql::mathx::format_value(v)
}

fn success(result_type: &str, result: serde_json::Value) -> Response {
    axum::Json(json!({
        "status": "success",
        "data": {"resultType": result_type, "result": result, "stats": {}}
    }))
    .into_response()
}

fn streams_json(streams: Vec<eval::Stream>) -> serde_json::Value {
    json!(
        streams
            .into_iter()
            .map(|s| json!({
                "stream": labels_json(&s.labels),
                "values": s.entries.into_iter().map(|(t, l)| json!([t.to_string(), l])).collect::<Vec<_>>(),
            }))
            .collect::<Vec<_>>()
    )
}

/// What both query endpoints take: the parsed query, the line limit and the
/// direction.
fn query_params(p: &Params) -> Result<(Expr, usize, Direction), Response> {
    let src = p
        .get("query")
        .ok_or_else(|| bad("the query parameter is missing"))?;
    let expr = logql::parse(src).map_err(bad)?;
    Ok((expr, limit_param(p)?, direction_param(p)?))
}

/// A log query's answer: Loki's `streams`.
fn logs_response(
    api: &Api,
    e: &capstan_logstore::logql::ast::LogExpr,
    from: i64,
    to: i64,
    limit: usize,
    dir: Direction,
) -> Response {
    match eval::select_logs(api.logs.store(), e, from, to, limit, dir) {
        Ok(s) => success("streams", streams_json(s)),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn points_json(points: Vec<(i64, f64)>) -> serde_json::Value {
    json!(
        points
            .into_iter()
            .map(|(t, v)| json!([secs(t), num(v)]))
            .collect::<Vec<_>>()
    )
}

/// A metric query's limits: the query timeout of `x-capstan.query`, and a flag
/// set when the request is dropped (its client went away).
fn metric_limits(api: &Api) -> (eval::Limits, super::CancelOnDrop) {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let limits = eval::Limits {
        deadline: Some(crate::state::clock::stopwatch() + api.engine.opts.timeout),
        cancel: Some(cancel.clone()),
        ..eval::Limits::default()
    };
    (limits, super::CancelOnDrop(cancel))
}

/// 400 for a query over a limit; 503 for one that timed out or was canceled.
fn eval_error(e: eval::EvalError) -> Response {
    match e {
        eval::EvalError::Stopped(m) => super::text(StatusCode::SERVICE_UNAVAILABLE, m),
        other => bad(other),
    }
}

pub async fn query_range(State(api): State<Api>, p: Params) -> Response {
    let parsed = query_params(&p).and_then(|(expr, limit, dir)| {
        let (start, end) = range_params(&p)?;
        let step = match p.get("step").or(p.get("interval")) {
            Some(s) => parse_step(s).map_err(bad)?,
            // Loki's default: about 250 points over the range, at least a second.
            None => ((end - start) / 250).max(1_000_000_000),
        };
        Ok((expr, limit, dir, start, end, step))
    });
    let (expr, limit, dir, start, end, step) = match parsed {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (limits, _cancel_on_drop) = metric_limits(&api);
    let out = blocking(move || match expr {
        Expr::Log(e) => logs_response(&api, &e, start, end, limit, dir),
        Expr::Metric(m) => match eval::eval_metric_limited(api.logs.store(), &m, start, end, step, &limits) {
            Ok(Value::Vector(series)) => success(
                "matrix",
                json!(
                    series
                        .into_iter()
                        .map(|s| json!({"metric": labels_json(&s.labels), "values": points_json(s.points)}))
                        .collect::<Vec<_>>()
                ),
            ),
            Ok(Value::Scalar(points)) => success("matrix", json!([{"metric": {}, "values": points_json(points)}])),
            Err(e) => eval_error(e),
        },
    })
    .await;
    out.unwrap_or_else(|r| r)
}

pub async fn query(State(api): State<Api>, p: Params) -> Response {
    let parsed = query_params(&p).and_then(|(expr, limit, dir)| {
        let t = match p.get("time") {
            None => now_ns(),
            Some(s) => {
                parse_time(s).map_err(|e| bad(format!("invalid parameter \"time\": {e}")))?
            }
        };
        Ok((expr, limit, dir, t))
    });
    let (expr, limit, dir, t) = match parsed {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (limits, _cancel_on_drop) = metric_limits(&api);
    let out = blocking(move || match expr {
        // An instant log query looks back an hour from `time`, as Loki's does.
        Expr::Log(e) => logs_response(&api, &e, t - HOUR_NS, t + 1, limit, dir),
        Expr::Metric(m) => match eval::eval_metric_limited(api.logs.store(), &m, t, t, 1, &limits) {
            Ok(Value::Vector(series)) => success(
                "vector",
                json!(
                    series
                        .into_iter()
                        .filter_map(|s| {
                            let (pt, v) = *s.points.last()?;
                            Some(json!({"metric": labels_json(&s.labels), "value": [secs(pt), num(v)]}))
                        })
                        .collect::<Vec<_>>()
                ),
            ),
            Ok(Value::Scalar(points)) => {
                let (pt, v) = points.last().copied().unwrap_or((t, f64::NAN));
                success("scalar", json!([secs(pt), num(v)]))
            }
            Err(e) => eval_error(e),
        },
    })
    .await;
    out.unwrap_or_else(|r| r)
}

/// Streams with lines in the range that every `match[]` selector (if any) picks.
fn matching_streams(api: &Api, p: &Params) -> Result<Vec<std::sync::Arc<Labels>>, Response> {
    let (start, end) = range_params(p)?;
    let mut selectors: Vec<Vec<Matcher>> = Vec::new();
    for m in p.all("match[]").into_iter().chain(p.all("query")) {
        match logql::parse(m) {
            Ok(Expr::Log(e)) => selectors.push(e.selector),
            Ok(Expr::Metric(_)) => return Err(bad(format!("{m:?} is not a stream selector"))),
            Err(e) => return Err(bad(e)),
        }
    }
    Ok(api.logs.store().series(start, end + 1, &|l| {
        selectors.is_empty() || selectors.iter().any(|s| pipeline::selects(s, l))
    }))
}

pub async fn labels(State(api): State<Api>, p: Params) -> Response {
    match matching_streams(&api, &p) {
        Ok(streams) => {
            let names: BTreeSet<&str> = streams
                .iter()
                .flat_map(|l| l.iter().map(|(k, _)| k))
                .collect();
            axum::Json(json!({"status": "success", "data": names.into_iter().collect::<Vec<_>>()}))
                .into_response()
        }
        Err(r) => r,
    }
}

pub async fn label_values(State(api): State<Api>, Path(name): Path<String>, p: Params) -> Response {
    match matching_streams(&api, &p) {
        Ok(streams) => {
            let values: BTreeSet<&str> = streams.iter().filter_map(|l| l.get(&name)).collect();
            axum::Json(json!({"status": "success", "data": values.into_iter().collect::<Vec<_>>()}))
                .into_response()
        }
        Err(r) => r,
    }
}

pub async fn series(State(api): State<Api>, p: Params) -> Response {
    match matching_streams(&api, &p) {
        Ok(streams) => axum::Json(json!({
            "status": "success",
            "data": streams
                .iter()
                .map(|l| serde_json::Value::Object(l.iter().map(|(k, v)| (k.to_owned(), json!(v))).collect()))
                .collect::<Vec<_>>()
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// How often a tail looks for new lines.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// Most lines in one tail message.
const TAIL_CHUNK: usize = 1000;
/// Most sequence numbers (so lines) one read of a tail covers: a follower far
/// behind its cursor catches up page by page, never all at once.
pub const TAIL_PAGE: u64 = 10_000;
/// A follower that takes longer than this to take one message is dropped (its
/// messages are not buffered for it).
pub const TAIL_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /loki/api/v1/tail` (WebSocket): the last `limit` lines since `start`,
/// then every new line, as Loki's tail messages. Each message carries a
/// `cursor` (a store sequence number); a tail opened with `cursor=N` resumes
/// right after it, with nothing lost or repeated, across segment rotations and
/// reconnects.
pub async fn tail(
    State(api): State<Api>,
    RawQuery(q): RawQuery,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let p = Params::from_query(q);
    let parsed = (|| {
        let (expr, limit, _) = query_params(&p)?;
        let Expr::Log(e) = expr else {
            return Err(bad("tail wants a log query, not a metric query"));
        };
        let start = match p.get("start") {
            Some(s) => {
                parse_time(s).map_err(|e| bad(format!("invalid parameter \"start\": {e}")))?
            }
            None => now_ns() - HOUR_NS,
        };
        let cursor = match p.get("cursor") {
            Some(c) => Some(
                c.parse::<u64>()
                    .map_err(|_| bad(format!("invalid cursor {c:?}")))?,
            ),
            None => None,
        };
        Ok((e, limit, start, cursor))
    })();
    let (e, limit, start, cursor) = match parsed {
        Ok(x) => x,
        Err(r) => return r,
    };
    ws.on_upgrade(move |socket| run_tail(api, socket, e, limit, start, cursor))
}

fn tail_message(lines: Vec<eval::Line>, cursor: u64) -> String {
    json!({
        "streams": streams_json(eval::group(lines)),
        "dropped_entries": null,
        "cursor": cursor.to_string(),
    })
    .to_string()
}

async fn run_tail(
    api: Api,
    mut socket: axum::extract::ws::WebSocket,
    e: capstan_logstore::logql::ast::LogExpr,
    limit: usize,
    start: i64,
    cursor: Option<u64>,
) {
    use axum::extract::ws::Message;
    let e = std::sync::Arc::new(e);
    let mut stopping = api.stopping.clone();
    // The first read: the history (the last `limit` lines, or everything after
    // the cursor), up to the store's last sequence number at that moment.
    let mut cursor_at: Option<u64> = cursor;
    loop {
        let (api2, e2) = (api.clone(), e.clone());
        let after = cursor_at;
        let got = tokio::task::spawn_blocking(move || {
            let store = api2.logs.store();
            let last = store.last_seq();
            let hi = after.map_or(last, |c| last.min(c.saturating_add(TAIL_PAGE)));
            let lines = match after {
                None => eval::select_lines(
                    store,
                    &e2,
                    eval::Window {
                        from_ns: start,
                        to_ns: i64::MAX,
                        after_seq: 0,
                        max_seq: hi,
                    },
                    limit,
                    Direction::Backward,
                )
                .map(|mut v| {
                    v.reverse();
                    v
                }),
                Some(c) => eval::select_lines(
                    store,
                    &e2,
                    eval::Window {
                        from_ns: i64::MIN,
                        to_ns: i64::MAX,
                        after_seq: c,
                        max_seq: hi,
                    },
                    usize::MAX,
                    Direction::Forward,
                ),
            };
            lines.map(|l| (l, hi, hi < last))
        })
        .await;
        let (lines, hi, behind) = match got {
            Ok(Ok(x)) => x,
            Ok(Err(err)) => {
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: 1011,
                        reason: format!("reading logs: {err}").into(),
                    })))
                    .await;
                return;
            }
            Err(_) => return,
        };
        cursor_at = Some(hi);
        let mut lines = lines;
        while !lines.is_empty() {
            let rest = lines.split_off(lines.len().min(TAIL_CHUNK));
            // A chunk's cursor is its last line's, the last chunk's the read's.
            let c = if rest.is_empty() {
                hi
            } else {
                lines.last().map_or(hi, |l| l.seq)
            };
            let sent = tokio::time::timeout(
                TAIL_SEND_TIMEOUT,
                socket.send(Message::Text(tail_message(lines, c).into())),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
            lines = rest;
        }
        if behind {
            continue;
        }
        let stop = tokio::select! {
            _ = tokio::time::sleep(TAIL_POLL) => false,
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => false,
            },
            _ = stopping.wait_for(|s| *s) => true,
        };
        if stop {
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    }
}

/// A match and its context: lines by (time, sequence), with whether each matched.
type Group = BTreeMap<(i64, u64), (String, bool)>;

/// Most context lines around a match.
const MAX_CONTEXT: usize = 100;

fn line_json(l: &Labels, ts_ns: i64, seq: u64, line: &str, matched: bool) -> serde_json::Value {
    json!({
        "ts_ns": ts_ns,
        "seq": seq,
        "labels": l.iter().collect::<BTreeMap<_, _>>(),
        "line": line,
        "match": matched,
    })
}

/// `GET /capstan/v1/logs/search`: the CLI's `capstan logs --query/--grep -C N`.
/// The newest `limit` lines a LogQL log query selects after `since_ns` (and
/// after the cursor `after_seq`), oldest first, each with up to `context`
/// lines of its stream before and after; groups that do not touch are
/// separated by `{"sep": true}`. Answers `{"lines": […], "cursor": N}`.
pub async fn search_logs(State(api): State<Api>, RawQuery(q): RawQuery) -> Response {
    let p = Params::from_query(q);
    let parsed = (|| {
        let (expr, _, _) = query_params(&p)?;
        let Expr::Log(e) = expr else {
            return Err(bad("a metric query: use /loki/api/v1/query"));
        };
        let num = |k: &str, d: u64| -> Result<u64, Response> {
            p.get(k).map_or(Ok(d), |v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("invalid parameter {k:?}: {v:?}")))
            })
        };
        let limit = (num("limit", DEFAULT_LIMIT as u64)? as usize).min(MAX_LIMIT);
        let context = (num("context", 0)? as usize).min(MAX_CONTEXT);
        let since = match p.get("since_ns") {
            Some(s) => s
                .parse::<i64>()
                .map_err(|_| bad(format!("invalid since_ns {s:?}")))?,
            None => i64::MIN,
        };
        Ok((e, limit, context, since, num("after_seq", 0)?))
    })();
    let (e, limit, context, since, after_seq) = match parsed {
        Ok(x) => x,
        Err(r) => return r,
    };
    let out = blocking(move || {
        let store = api.logs.store();
        let hi = store.last_seq();
        let w = eval::Window {
            from_ns: since,
            to_ns: i64::MAX,
            after_seq,
            max_seq: hi,
        };
        let mut found = eval::select_lines(store, &e, w, limit, Direction::Backward)?;
        found.reverse();
        // Groups: a match with its context; overlapping groups of one stream merge.
        let mut groups: Vec<(std::sync::Arc<Labels>, Group)> = Vec::new();
        for m in found {
            let mut g: Group = BTreeMap::new();
            let (before, after) = store.around(&m.stream, m.ts_ns, m.seq, context)?;
            for c in before.into_iter().chain(after) {
                g.insert((c.ts_ns, c.seq), (c.line, false));
            }
            g.insert((m.ts_ns, m.seq), (m.line, true));
            let first = *g.keys().next().expect("the match is in it");
            let last = groups.iter_mut().rev().find(|(l, _)| *l == m.stream);
            match last {
                Some((_, prev)) if prev.keys().next_back().is_some_and(|k| *k >= first) => {
                    for (k, (line, matched)) in g {
                        let e = prev.entry(k).or_insert((line, false));
                        e.1 |= matched;
                    }
                }
                _ => groups.push((m.stream.clone(), g)),
            }
        }
        let mut lines = Vec::new();
        for (i, (l, g)) in groups.iter().enumerate() {
            if i > 0 && context > 0 {
                lines.push(json!({"sep": true}));
            }
            for ((ts, seq), (line, matched)) in g {
                lines.push(line_json(l, *ts, *seq, line, *matched));
            }
        }
        Ok::<_, capstan_logstore::Error>(
            axum::Json(json!({ "lines": lines, "cursor": hi })).into_response(),
        )
    })
    .await;
    match out {
        Ok(Ok(r)) | Err(r) => r,
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
