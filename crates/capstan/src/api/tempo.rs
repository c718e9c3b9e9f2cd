//! Tempo's query API over the span store, so Grafana's Tempo data source works:
//! `/api/traces/<id>` (v1 `batches`, or protobuf when asked), `/api/v2/traces/<id>`,
//! `/api/search` (tags in logfmt, `minDuration`, `maxDuration`, `start`, `end`,
//! `limit`, plus capstan's `service`, `name` and `status`), `/api/search/tags`,
//! `/api/search/tag/<name>/values`, `/api/echo`. And the correlation:
//! `/api/traces/<id>/logs`, the log lines that carry the trace id.

#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use capstan_logstore::{Direction, Query};
use opentelemetry_proto::tonic::trace::v1::TracesData;
use prost::Message;
use serde_json::json;

use super::Api;
use super::bad_request as bad;
use super::prom::Params;
use crate::traces::{self, Search, normalize_id};

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1000;
/// Most log lines `/api/traces/<id>/logs` returns.
const MAX_LOGS: usize = 5000;

fn internal(e: impl std::fmt::Display) -> Response {
    super::text(StatusCode::INTERNAL_SERVER_ERROR, e)
}

async fn blocking(f: impl FnOnce() -> Response + Send + 'static) -> Response {
    super::blocking(f).await.unwrap_or_else(|r| r)
}

fn trace_rows(api: &Api, id: &str) -> Result<Vec<traces::SpanRow>, Response> {
    let id = normalize_id(id).map_err(bad)?;
    let rows = api.shared.traces.trace(&id).map_err(internal)?;
    if rows.is_empty() {
        return Err((StatusCode::NOT_FOUND, format!("trace {id} not found\n")).into_response());
    }
    Ok(rows)
}

pub async fn trace_v1(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let proto = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/protobuf"));
    blocking(move || match trace_rows(&api, &id) {
        Ok(rows) => {
            let batches = traces::resource_spans(rows);
            if proto {
                // tempopb.Trace is `repeated ResourceSpans batches = 1`: TracesData's bytes.
                let bytes = TracesData {
                    resource_spans: batches,
                }
                .encode_to_vec();
                ([(header::CONTENT_TYPE, "application/protobuf")], bytes).into_response()
            } else {
                axum::Json(json!({ "batches": batches })).into_response()
            }
        }
        Err(r) => r,
    })
    .await
}

pub async fn trace_v2(State(api): State<Api>, Path(id): Path<String>) -> Response {
    blocking(move || match trace_rows(&api, &id) {
        Ok(rows) => axum::Json(json!({
            "trace": { "resourceSpans": traces::resource_spans(rows) },
            "status": "COMPLETE"
        }))
        .into_response(),
        Err(r) => r,
    })
    .await
}

/// The log lines carrying the trace id (newest last), with their labels and
/// span id: from a trace to the exact requests' logs.
pub async fn trace_logs(State(api): State<Api>, Path(id): Path<String>) -> Response {
    blocking(move || {
        let id = match normalize_id(&id) {
            Ok(id) => id,
            Err(e) => return bad(e),
        };
        match trace_log_lines(&api, &id) {
            Ok(v) => axum::Json(json!({ "traceID": id, "logs": v })).into_response(),
            Err(e) => internal(e),
        }
    })
    .await
}

pub fn trace_log_lines(
    api: &Api,
    id: &str,
) -> Result<Vec<serde_json::Value>, capstan_logstore::Error> {
    let want = [("trace_id".to_string(), id.to_owned())];
    let q = Query {
        meta: &want,
        ..Query::all(&|_| true)
    };
    let rows = api
        .shared
        .logs
        .store()
        .select(&q, Direction::Forward, MAX_LOGS)?;
    Ok(rows
        .into_iter()
        .map(|(l, e)| {
            let span = e
                .meta
                .iter()
                .find(|(k, _)| k == "span_id")
                .map(|(_, v)| v.clone());
            json!({
                "ts_ns": e.ts_ns.to_string(),
                "labels": l.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "line": e.line,
                "span_id": span,
            })
        })
        .collect())
}

fn duration(p: &Params, name: &str) -> Result<Option<i64>, Response> {
    p.get(name)
        .filter(|s| !s.is_empty())
        .map(|s| {
            capstan_logstore::logql::parse_duration(s)
                .ok_or_else(|| bad(format!("invalid {name} {s:?} (a duration such as 300ms)")))
        })
        .transpose()
}

fn seconds(p: &Params, name: &str) -> Result<Option<i64>, Response> {
    p.get(name)
        .filter(|s| !s.is_empty())
        .map(|s| super::loki::parse_time(s).map_err(|e| bad(format!("invalid {name}: {e}"))))
        .transpose()
}

fn search_params(p: &Params) -> Result<Search, Response> {
    if p.get("q")
        .is_some_and(|q| !q.trim().is_empty() && q.trim() != "{}")
    {
        return Err(bad(
            "TraceQL queries are not supported yet; search with tags=, minDuration=, maxDuration= (and service=, name=, status=)",
        ));
    }
    let mut s = Search {
        service: p.get("service").map(str::to_owned),
        name: p.get("name").map(str::to_owned),
        status: p.get("status").map(str::to_ascii_lowercase),
        min_duration_ns: duration(p, "minDuration")?,
        max_duration_ns: duration(p, "maxDuration")?,
        from_ns: seconds(p, "start")?.unwrap_or(i64::MIN),
        to_ns: seconds(p, "end")?.map_or(i64::MAX, |e| e.saturating_add(1)),
        limit: match p.get("limit") {
            None => DEFAULT_LIMIT,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => return Err(bad(format!("invalid limit {l:?} (1 to {MAX_LIMIT})"))),
            },
        },
        ..Search::default()
    };
    if let Some(st) = &s.status
        && !["error", "ok", "unset"].contains(&st.as_str())
    {
        return Err(bad(format!("invalid status {st:?} (error, ok or unset)")));
    }
    if let Some(tags) = p.get("tags").filter(|t| !t.trim().is_empty()) {
        let pairs = capstan_logstore::logql::pipeline::logfmt_pairs(tags)
            .map_err(|e| bad(format!("invalid tags {tags:?}: {e}")))?;
        for (k, v) in pairs {
            match k.as_str() {
                "service.name" if s.service.is_none() => s.service = Some(v),
                "status" | "status.code" => s.status = Some(v.to_ascii_lowercase()),
                "error" if v == "true" => s.status = Some("error".into()),
                _ => s.attrs.push((k, v)),
            }
        }
    }
    Ok(s)
}

pub async fn search(
    State(api): State<Api>,
    method: Method,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    let p = Params::from(q, &method, &headers, &body);
    let s = match search_params(&p) {
        Ok(s) => s,
        Err(r) => return r,
    };
    blocking(move || match api.shared.traces.search(&s) {
        Ok(found) => axum::Json(json!({
            "traces": found.iter().map(|t| json!({
                "traceID": t.trace_id,
                "rootServiceName": t.root_service,
                "rootTraceName": t.root_name,
                "startTimeUnixNano": t.start_ns.to_string(),
                "durationMs": t.duration_ns / 1_000_000,
                "spanCount": t.spans,
                "errorCount": t.errors,
            })).collect::<Vec<_>>(),
            "metrics": { "inspectedTraces": found.len() }
        }))
        .into_response(),
        Err(e) => internal(e),
    })
    .await
}

/// Resource attribute names (and the span intrinsics `name` and `status`).
pub async fn search_tags(State(api): State<Api>) -> Response {
    blocking(move || {
        let mut names: BTreeSet<String> = ["name".to_string(), "status".to_string()].into();
        for l in api
            .shared
            .traces
            .store()
            .series(i64::MIN, i64::MAX, &|_| true)
        {
            names.extend(l.iter().map(|(k, _)| k.to_owned()));
        }
        axum::Json(json!({ "tagNames": names })).into_response()
    })
    .await
}

pub async fn search_tag_values(State(api): State<Api>, Path(name): Path<String>) -> Response {
    blocking(move || {
        let values: BTreeSet<String> = api
            .shared
            .traces
            .store()
            .series(i64::MIN, i64::MAX, &|_| true)
            .iter()
            .filter_map(|l| l.get(&name).map(str::to_owned))
            .collect();
        axum::Json(json!({ "tagValues": values })).into_response()
    })
    .await
}

pub async fn echo() -> &'static str {
    "echo"
}
