//! Tempo's query API over the span store, so Grafana's Tempo data source works:
//! `/api/traces/<id>` (v1 `batches`, or protobuf when asked), `/api/v2/traces/<id>`,
//! `/api/search` (tags in logfmt, `minDuration`, `maxDuration`, `start`, `end`,
//! `limit`, plus capstan's `service`, `name` and `status`), `/api/search/tags`,
//! `/api/search/tag/<name>/values`, `/api/echo`. And the correlation:
//! `/api/traces/<id>/logs`, the log lines that carry the trace id.

#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
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
    let rows = api.traces.trace(&id).map_err(internal)?;
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
    let rows = api.logs.store().select(&q, Direction::Forward, MAX_LOGS)?;
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
    let traceql = match p.get("q").map(str::trim).filter(|q| !q.is_empty()) {
        None => None,
        Some(q) => Some(std::sync::Arc::new(
            crate::traceql::parse(q).map_err(|e| bad(format!("invalid TraceQL query: {e}")))?,
        )),
    };
    let spans_per_set = match p.get("spss") {
        None => 3,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if n <= 1000 => n,
            _ => return Err(bad(format!("invalid spss {n:?} (0 to 1000)"))),
        },
    };
    let mut s = Search {
        traceql,
        spans_per_set,
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

pub async fn search(State(api): State<Api>, p: Params) -> Response {
    let s = match search_params(&p) {
        Ok(s) => s,
        Err(r) => return r,
    };
    blocking(move || match api.traces.search(&s) {
        Ok(found) => axum::Json(json!({
            "traces": found.iter().map(|t| {
                let mut v = json!({
                    "traceID": t.trace_id,
                    "rootServiceName": t.root_service,
                    "rootTraceName": t.root_name,
                    "startTimeUnixNano": t.start_ns.to_string(),
                    "durationMs": t.duration_ns / 1_000_000,
                    "spanCount": t.spans,
                    "errorCount": t.errors,
                });
                if s.traceql.is_some() {
                    // Tempo's shape for TraceQL results: the matching spans.
                    let set = json!({
                        "spans": t.matched.iter().map(|m| json!({
                            "spanID": m.span_id,
                            "name": m.name,
                            "startTimeUnixNano": m.start_ns.to_string(),
                            "durationNanos": m.duration_ns.to_string(),
                            "attributes": [{"key": "service.name", "value": {"stringValue": m.service}}],
                        })).collect::<Vec<_>>(),
                        "matched": t.matched.len(),
                    });
                    v["spanSet"] = set.clone();
                    v["spanSets"] = json!([set]);
                }
                v
            }).collect::<Vec<_>>(),
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
        for l in api.traces.store().series(i64::MIN, i64::MAX, &|_| true) {
            names.extend(l.iter().map(|(k, _)| k.to_owned()));
        }
        axum::Json(json!({ "tagNames": names })).into_response()
    })
    .await
}

pub async fn search_tag_values(State(api): State<Api>, Path(name): Path<String>) -> Response {
    blocking(move || {
        let values: BTreeSet<String> = api
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

/// Spans sampled for tag names and values.
const TAG_SAMPLE: usize = 2_000;

/// Span intrinsics TraceQL knows.
const INTRINSICS: [&str; 5] = ["name", "status", "statusMessage", "kind", "duration"];

/// Tag names by TraceQL scope (Tempo's v2 shape): resource attributes of the
/// stored streams, span attributes of recent spans, intrinsics.
pub async fn search_tags_v2(State(api): State<Api>, RawQuery(q): RawQuery) -> Response {
    let want = q
        .as_deref()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("scope="))
                .map(str::to_owned)
        })
        .filter(|s| !s.is_empty() && s != "all");
    blocking(move || {
        let traces = &api.traces;
        let mut resource: BTreeSet<String> = BTreeSet::new();
        for l in traces.store().series(i64::MIN, i64::MAX, &|_| true) {
            resource.extend(
                l.iter()
                    .map(|(k, _)| k)
                    .filter(|k| !k.starts_with("otel.scope."))
                    .map(str::to_owned),
            );
        }
        let mut span: BTreeSet<String> = BTreeSet::new();
        match traces.recent(TAG_SAMPLE) {
            Ok(rows) => {
                for r in rows {
                    span.extend(r.span.attributes.into_iter().map(|kv| kv.key));
                }
            }
            Err(e) => return internal(e),
        }
        let scopes: Vec<serde_json::Value> = [
            ("resource", resource.into_iter().collect::<Vec<_>>()),
            ("span", span.into_iter().collect()),
            (
                "intrinsic",
                INTRINSICS.iter().map(|s| s.to_string()).collect(),
            ),
        ]
        .into_iter()
        .filter(|(name, _)| want.as_deref().is_none_or(|w| w == *name))
        .map(|(name, tags)| json!({"name": name, "tags": tags}))
        .collect();
        axum::Json(json!({ "scopes": scopes })).into_response()
    })
    .await
}

/// Values of a scoped tag (`resource.service.name`, `span.http.route`,
/// `.x`, `name`, `status`, `kind`), typed (Tempo's v2 shape).
pub async fn search_tag_values_v2(State(api): State<Api>, Path(name): Path<String>) -> Response {
    blocking(move || {
        let traces = &api.traces;
        let mut values: BTreeSet<(&'static str, String)> = BTreeSet::new();
        let (res_key, span_key) = match name.as_str() {
            "status" => {
                for v in ["error", "ok", "unset"] {
                    values.insert(("keyword", v.into()));
                }
                (None, None)
            }
            "kind" => {
                for v in [
                    "unspecified",
                    "internal",
                    "server",
                    "client",
                    "producer",
                    "consumer",
                ] {
                    values.insert(("keyword", v.into()));
                }
                (None, None)
            }
            "name" | "span:name" => (None, Some("")),
            n => match (n.strip_prefix("resource."), n.strip_prefix("span.")) {
                (Some(r), _) => (Some(r), None),
                (_, Some(s)) => (None, Some(s)),
                _ => {
                    let any = n.strip_prefix('.').unwrap_or(n);
                    (Some(any), Some(any))
                }
            },
        };
        if let Some(k) = res_key {
            for l in traces.store().series(i64::MIN, i64::MAX, &|_| true) {
                if let Some(v) = l.get(k) {
                    values.insert(("string", v.to_owned()));
                }
            }
        }
        if let Some(k) = span_key {
            let rows = match traces.recent(TAG_SAMPLE) {
                Ok(r) => r,
                Err(e) => return internal(e),
            };
            for r in rows {
                if k.is_empty() {
                    values.insert(("string", r.span.name));
                    continue;
                }
                for kv in r.span.attributes.iter().filter(|kv| kv.key == k) {
                    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
                    let typed = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(V::StringValue(s)) => ("string", s.clone()),
                        Some(V::IntValue(i)) => ("int", i.to_string()),
                        Some(V::DoubleValue(d)) => ("float", d.to_string()),
                        Some(V::BoolValue(b)) => ("bool", b.to_string()),
                        _ => continue,
                    };
                    values.insert(typed);
                }
            }
        }
        let list: Vec<serde_json::Value> = values
            .into_iter()
            .map(|(t, v)| json!({"type": t, "value": v}))
            .collect();
        axum::Json(json!({ "tagValues": list })).into_response()
    })
    .await
}

pub async fn echo() -> &'static str {
    "echo"
}
