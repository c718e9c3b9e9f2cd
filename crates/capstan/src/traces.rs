//! The span store: spans in a `capstan-logstore` of their own (`.capstan/tracestore`),
//! one entry per span (its OTLP JSON as the line, its start as the time, its
//! trace id as structured metadata), streams labelled with the resource's
//! attributes and the instrumentation scope. The store's per-block token
//! filters are the trace-id index: a trace is found without a time range by
//! reading only the blocks that may hold its id.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capstan_logstore::{Direction, Entry, Labels, Options, Query, Recovery, Store};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, status};

use crate::ingest::otlp::{SCOPE_NAME, SCOPE_VERSION, value_text};

/// Most spans one trace returns.
pub const MAX_TRACE_SPANS: usize = 100_000;
/// Most candidate traces a search summarizes before it gives up filling its limit.
const MAX_CANDIDATES: usize = 2_000;

pub struct TraceStore {
    store: Store,
}

/// A span and the labels of its stream (resource attributes and scope).
#[derive(Debug, Clone)]
pub struct SpanRow {
    pub resource: Arc<Labels>,
    pub span: Span,
}

impl SpanRow {
    pub fn service(&self) -> &str {
        self.resource
            .get("service.name")
            .unwrap_or("unknown_service")
    }
}

/// What a search lists per trace.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub trace_id: String,
    pub root_service: String,
    pub root_name: String,
    pub start_ns: i64,
    pub duration_ns: i64,
    pub spans: usize,
    pub errors: usize,
    /// Spans that met a TraceQL query's spanset filters (a few).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matched: Vec<Matched>,
}

/// A span that met a query, as a search lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Matched {
    pub span_id: String,
    pub name: String,
    pub service: String,
    pub start_ns: i64,
    pub duration_ns: i64,
}

/// What a search wants; every condition but the durations is about one span
/// of the trace, the durations are the whole trace's.
#[derive(Debug, Clone, Default)]
pub struct Search {
    pub service: Option<String>,
    pub name: Option<String>,
    /// `error`, `ok` or `unset`.
    pub status: Option<String>,
    /// Span attributes or resource attributes with these values.
    pub attrs: Vec<(String, String)>,
    pub min_duration_ns: Option<i64>,
    pub max_duration_ns: Option<i64>,
    pub from_ns: i64,
    pub to_ns: i64,
    pub limit: usize,
    /// A TraceQL query the trace must meet, and how many matching spans to
    /// list per trace.
    pub traceql: Option<Arc<crate::traceql::Query>>,
    pub spans_per_set: usize,
}

fn attr_text(kvs: &[KeyValue], key: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(value_text)
}

/// A span's status as TraceQL and Tempo name it.
pub fn status_name(s: &Span) -> &'static str {
    match s.status.as_ref().map(|s| s.code) {
        Some(c) if c == status::StatusCode::Error as i32 => "error",
        Some(c) if c == status::StatusCode::Ok as i32 => "ok",
        _ => "unset",
    }
}

fn is_error(s: &Span) -> bool {
    status_name(s) == "error"
}

impl Search {
    fn matches(&self, resource: &Labels, s: &Span) -> bool {
        self.name.as_ref().is_none_or(|n| *n == s.name)
            && self.status.as_ref().is_none_or(|st| st == status_name(s))
            && self.attrs.iter().all(|(k, v)| {
                let got = match k.as_str() {
                    "name" => Some(s.name.clone()),
                    "status" => Some(status_name(s).to_owned()),
                    _ => attr_text(&s.attributes, k).or_else(|| resource.get(k).map(str::to_owned)),
                };
                got.as_deref() == Some(v.as_str())
            })
    }
}

/// The summary of a trace's spans (which must not be empty): the root is the
/// span without a parent (else the earliest).
pub fn summarize(trace_id: &str, spans: &[SpanRow]) -> Summary {
    let start = spans
        .iter()
        .map(|r| r.span.start_time_unix_nano)
        .min()
        .unwrap_or(0);
    let end = spans
        .iter()
        .map(|r| r.span.end_time_unix_nano)
        .max()
        .unwrap_or(0);
    let root = spans
        .iter()
        .filter(|r| r.span.parent_span_id.is_empty())
        .min_by_key(|r| r.span.start_time_unix_nano)
        .or_else(|| spans.iter().min_by_key(|r| r.span.start_time_unix_nano));
    Summary {
        trace_id: trace_id.to_owned(),
        root_service: root.map(|r| r.service().to_owned()).unwrap_or_default(),
        root_name: root.map(|r| r.span.name.clone()).unwrap_or_default(),
        start_ns: start as i64,
        duration_ns: end.saturating_sub(start) as i64,
        spans: spans.len(),
        errors: spans.iter().filter(|r| is_error(&r.span)).count(),
        matched: Vec::new(),
    }
}

/// A trace id as 32 lower-case hex digits, from hex of any case (or an error
/// saying what is wrong with it).
pub fn normalize_id(id: &str) -> Result<String, String> {
    let id = id.trim();
    if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{id:?} is not a trace id (up to 32 hex digits)"));
    }
    let padded = format!("{:0>32}", id.to_ascii_lowercase());
    if padded.bytes().all(|b| b == b'0') {
        return Err("the all-zero trace id is invalid".into());
    }
    Ok(padded)
}

impl TraceStore {
    pub fn open(
        dir: &Path,
        max_total: u64,
        retention: Option<Duration>,
    ) -> Result<(TraceStore, Recovery), capstan_logstore::Error> {
        let mut o = Options::new(dir);
        o.max_total_bytes = Some(max_total);
        o.retention = retention;
        // Spans carry big JSON lines; the line limit is only a guard.
        o.max_line_bytes = 4 << 20;
        // Spans are read back whole by trace id: kept as text, which decodes
        // fastest, and a trace's id repeated on its spans costs little.
        o.templates = false;
        let (store, rec) = Store::open(o)?;
        Ok((TraceStore { store }, rec))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores decoded spans; returns how many were kept.
    pub fn append(
        &self,
        streams: Vec<(Labels, Vec<Entry>)>,
    ) -> Result<usize, capstan_logstore::Error> {
        let mut n = 0;
        for (l, e) in streams {
            n += self.store.append(&l, e)?.accepted;
        }
        Ok(n)
    }

    pub fn flush(&self) -> Result<u64, capstan_logstore::Error> {
        self.store.flush()
    }

    pub fn maintain(&self) -> Result<(), capstan_logstore::Error> {
        self.store.maintain()
    }

    /// Every span of a trace (`id` normalized), by start time.
    pub fn trace(&self, id: &str) -> Result<Vec<SpanRow>, capstan_logstore::Error> {
        let want = [("trace_id".to_string(), id.to_owned())];
        let q = Query {
            meta: &want,
            ..Query::all(&|_| true)
        };
        let rows = self.store.select_map(
            &q,
            Direction::Forward,
            MAX_TRACE_SPANS,
            |l, e| {
                let span: Span = serde_json::from_str(&e.line).ok()?;
                Some((e.ts_ns, e.seq, SpanRow { resource: l, span }))
            },
            |(t, s, _)| (*t, *s),
        )?;
        Ok(rows.into_iter().map(|(_, _, r)| r).collect())
    }

    /// The newest `n` spans (for tag names and values).
    pub fn recent(&self, n: usize) -> Result<Vec<SpanRow>, capstan_logstore::Error> {
        self.store.select_map(
            &Query::all(&|_| true),
            Direction::Backward,
            n,
            |l, e| {
                let span: Span = serde_json::from_str(&e.line).ok()?;
                Some(SpanRow { resource: l, span })
            },
            |r| (r.span.start_time_unix_nano as i64, 0),
        )
    }

    /// Traces with a span that matches, newest first, with their summaries.
    pub fn search(&self, q: &Search) -> Result<Vec<Summary>, capstan_logstore::Error> {
        let service = q.service.clone();
        let pred = move |l: &Labels| {
            service
                .as_deref()
                .is_none_or(|s| l.get("service.name") == Some(s))
        };
        // Span names are in the line: blocks without them are skipped.
        let needles: Vec<Vec<u8>> = q
            .name
            .iter()
            .map(|n| serde_json::to_string(n).unwrap_or_default().into_bytes())
            .collect();
        let query = Query {
            from_ns: q.from_ns,
            to_ns: q.to_ns,
            contains: &needles,
            ..Query::all(&pred)
        };
        let mut seen: HashSet<String> = HashSet::new();
        let mut candidates: Vec<(i64, String)> = Vec::new();
        self.store
            .visit(&query, Direction::Backward, &mut |_, batch| {
                for (l, e) in batch {
                    let Some((_, id)) = e.meta.iter().find(|(k, _)| k == "trace_id") else {
                        continue;
                    };
                    if seen.contains(id) {
                        continue;
                    }
                    let Ok(span) = serde_json::from_str::<Span>(&e.line) else {
                        continue;
                    };
                    if q.matches(&l, &span)
                        && q.traceql.as_ref().is_none_or(|t| t.any_matches(&l, &span))
                    {
                        seen.insert(id.clone());
                        candidates.push((e.ts_ns, id.clone()));
                    }
                }
                candidates.len() < MAX_CANDIDATES
            })?;
        // Newest first, then the whole traces, kept when their duration fits.
        candidates.sort_by(|a, b| b.cmp(a));
        let mut out = Vec::new();
        for (_, id) in candidates {
            if out.len() >= q.limit {
                break;
            }
            let spans = self.trace(&id)?;
            if spans.is_empty() {
                continue;
            }
            let mut s = summarize(&id, &spans);
            if q.min_duration_ns.is_some_and(|m| s.duration_ns < m)
                || q.max_duration_ns.is_some_and(|m| s.duration_ns > m)
            {
                continue;
            }
            if let Some(t) = &q.traceql {
                let pairs: Vec<(&Labels, &Span)> =
                    spans.iter().map(|r| (&*r.resource, &r.span)).collect();
                if !t.trace_matches(&pairs) {
                    continue;
                }
                s.matched = spans
                    .iter()
                    .filter(|r| t.any_matches(&r.resource, &r.span))
                    .take(q.spans_per_set)
                    .map(|r| Matched {
                        span_id: crate::ingest::hex(&r.span.span_id),
                        name: r.span.name.clone(),
                        service: r.service().to_owned(),
                        start_ns: r.span.start_time_unix_nano as i64,
                        duration_ns: r
                            .span
                            .end_time_unix_nano
                            .saturating_sub(r.span.start_time_unix_nano)
                            as i64,
                    })
                    .collect();
            }
            out.push(s);
        }
        Ok(out)
    }
}

/// Spans as OTLP `ResourceSpans`: one per resource and scope, as they came.
pub fn resource_spans(rows: Vec<SpanRow>) -> Vec<ResourceSpans> {
    type Key = Vec<(String, String)>;
    let mut groups: BTreeMap<Key, (Arc<Labels>, Vec<Span>)> = BTreeMap::new();
    for r in rows {
        let key: Vec<(String, String)> = r
            .resource
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        groups
            .entry(key)
            .or_insert_with(|| (r.resource.clone(), Vec::new()))
            .1
            .push(r.span);
    }
    groups
        .into_values()
        .map(|(labels, spans)| {
            let attributes = labels
                .iter()
                .filter(|(k, _)| *k != SCOPE_NAME && *k != SCOPE_VERSION)
                .map(|(k, v)| KeyValue {
                    key: k.to_owned(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue(v.to_owned())),
                    }),
                    ..Default::default()
                })
                .collect();
            ResourceSpans {
                resource: Some(Resource {
                    attributes,
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: labels.get(SCOPE_NAME).map(|n| InstrumentationScope {
                        name: n.to_owned(),
                        version: labels.get(SCOPE_VERSION).unwrap_or("").to_owned(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_normalize() {
        assert_eq!(normalize_id("ABC").unwrap(), format!("{:0>32}", "abc"));
        assert!(normalize_id("xyz").is_err());
        assert!(normalize_id(&"0".repeat(32)).is_err());
        assert!(normalize_id(&"1".repeat(33)).is_err());
    }
}
