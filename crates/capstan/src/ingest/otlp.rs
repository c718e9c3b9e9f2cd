//! OTLP/HTTP bodies: `ExportLogsServiceRequest` and `ExportTraceServiceRequest`
//! in protobuf (`application/x-protobuf`) or the OTLP JSON encoding
//! (`application/json`: hex ids, camelCase, integer enums), gzip or not.
//!
//! Log records become log-store entries in the stream `{service, stream="otlp"}`
//! (plus `replica` when the resource says `capstan.replica`), with level,
//! trace and span ids and attributes as structured metadata. Spans become
//! entries of the trace store: the span's OTLP JSON as the line, its trace id
//! as metadata, its resource attributes and scope as the stream's labels.

use capstan_logstore::{Entry, Labels};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::{Batch, Refused, check_time, decode_body, hex};

/// Which encoding a request (and so its answer) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

pub fn encoding(content_type: &str) -> Result<Encoding, Refused> {
    match content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(Refused {
            status: 415,
            reason: format!(
                "unsupported Content-Type {content_type:?} (application/x-protobuf or application/json)"
            ),
        }),
    }
}

fn decode<M: Message + Default + serde::de::DeserializeOwned>(
    enc: Encoding,
    content_encoding: &str,
    body: &[u8],
    what: &str,
) -> Result<M, Refused> {
    let raw = decode_body(content_encoding, body)?;
    match enc {
        Encoding::Protobuf => super::bounds::check_protobuf(&raw, what)?,
        Encoding::Json => super::bounds::check_json(&raw, what)?,
    }
    match enc {
        Encoding::Protobuf => M::decode(&*raw)
            .map_err(|e| Refused::bad(format!("body is not a protobuf {what}: {e}"))),
        Encoding::Json => serde_json::from_slice(&raw)
            .map_err(|e| Refused::bad(format!("body is not an OTLP JSON {what}: {e}"))),
    }
}

/// An attribute value as text: strings as they are, the rest as JSON.
pub fn value_text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => {
            serde_json::Value::Array(a.values.iter().map(value_json).collect()).to_string()
        }
        Some(any_value::Value::KvlistValue(kv)) => kv_json(&kv.values).to_string(),
        Some(any_value::Value::StringValueStrindex(_)) | None => String::new(),
    }
}

fn value_json(v: &AnyValue) -> serde_json::Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone().into(),
        Some(any_value::Value::BoolValue(b)) => (*b).into(),
        Some(any_value::Value::IntValue(i)) => (*i).into(),
        Some(any_value::Value::DoubleValue(d)) => serde_json::Number::from_f64(*d)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(any_value::Value::BytesValue(b)) => hex(b).into(),
        Some(any_value::Value::ArrayValue(a)) => {
            serde_json::Value::Array(a.values.iter().map(value_json).collect())
        }
        Some(any_value::Value::KvlistValue(kv)) => kv_json(&kv.values),
        Some(any_value::Value::StringValueStrindex(_)) | None => serde_json::Value::Null,
    }
}

fn kv_json(kvs: &[KeyValue]) -> serde_json::Value {
    serde_json::Value::Object(
        kvs.iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value
                        .as_ref()
                        .map_or(serde_json::Value::Null, value_json),
                )
            })
            .collect(),
    )
}

fn attr<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
}

/// The resource's `service.name`, or OTel's default.
pub fn service_name(resource: &[KeyValue]) -> String {
    attr(resource, "service.name")
        .map(value_text)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown_service".into())
}

/// A severity number's level name (OTel's ranges: 1–4 trace … 21–24 fatal).
fn level(number: i32) -> Option<&'static str> {
    Some(match number {
        1..=4 => "trace",
        5..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17..=20 => "error",
        21..=24 => "fatal",
        _ => return None,
    })
}

fn id_ok(id: &[u8], len: usize) -> bool {
    id.len() == len && id.iter().any(|b| *b != 0)
}

pub fn decode_logs(
    enc: Encoding,
    content_encoding: &str,
    body: &[u8],
    now_ns: i64,
) -> Result<Batch, Refused> {
    let req: ExportLogsServiceRequest =
        decode(enc, content_encoding, body, "ExportLogsServiceRequest")?;
    let mut out = Batch::default();
    for (i, rl) in req.resource_logs.into_iter().enumerate() {
        let res = rl.resource.map(|r| r.attributes).unwrap_or_default();
        let mut pairs = vec![
            ("service".to_string(), service_name(&res)),
            ("stream".to_string(), "otlp".to_string()),
        ];
        if let Some(r) = attr(&res, "capstan.replica") {
            pairs.push(("replica".into(), value_text(r)));
        }
        let mut entries = Vec::new();
        for (j, sl) in rl.scope_logs.into_iter().enumerate() {
            for (k, r) in sl.log_records.into_iter().enumerate() {
                let at = || format!("resourceLogs[{i}].scopeLogs[{j}].logRecords[{k}]");
                let ts = if r.time_unix_nano != 0 {
                    r.time_unix_nano
                } else if r.observed_time_unix_nano != 0 {
                    r.observed_time_unix_nano
                } else {
                    now_ns as u64
                };
                let ts = i64::try_from(ts).unwrap_or(i64::MAX);
                if let Err(why) = check_time(ts, now_ns) {
                    out.refuse(|| format!("{}: {why}", at()));
                    continue;
                }
                if !(r.trace_id.is_empty() || id_ok(&r.trace_id, 16))
                    || !(r.span_id.is_empty() || id_ok(&r.span_id, 8))
                {
                    out.refuse(|| format!("{}: invalid trace or span id", at()));
                    continue;
                }
                let mut meta = Vec::new();
                let lvl = if r.severity_text.is_empty() {
                    level(r.severity_number).map(str::to_owned)
                } else {
                    Some(r.severity_text.to_ascii_lowercase())
                };
                if let Some(l) = lvl {
                    meta.push(("level".to_string(), l));
                }
                if !r.trace_id.is_empty() {
                    meta.push(("trace_id".into(), hex(&r.trace_id)));
                }
                if !r.span_id.is_empty() {
                    meta.push(("span_id".into(), hex(&r.span_id)));
                }
                for kv in &r.attributes {
                    if let Some(v) = &kv.value {
                        meta.push((kv.key.clone(), value_text(v)));
                    }
                }
                entries.push(Entry {
                    ts_ns: ts,
                    seq: 0,
                    line: r.body.as_ref().map(value_text).unwrap_or_default(),
                    meta,
                });
            }
        }
        if !entries.is_empty() {
            out.streams.push((Labels::new(pairs), entries));
        }
    }
    Ok(out)
}

/// A span as the span store keeps it: its OTLP JSON, at its start, with its
/// trace id as structured metadata.
pub fn span_entry(s: &Span) -> Result<Entry, serde_json::Error> {
    Ok(Entry {
        ts_ns: i64::try_from(s.start_time_unix_nano).unwrap_or(i64::MAX),
        seq: 0,
        line: serde_json::to_string(s)?,
        meta: vec![("trace_id".into(), hex(&s.trace_id))],
    })
}

/// Labels of a span's stream: its resource attributes (as text) and its scope.
pub fn span_labels(res: &[KeyValue], scope: Option<(&str, &str)>) -> Labels {
    let mut pairs: Vec<(String, String)> = res
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), value_text(kv.value.as_ref()?))))
        .collect();
    if !pairs.iter().any(|(k, _)| k == "service.name") {
        pairs.push(("service.name".into(), "unknown_service".into()));
    }
    if let Some((name, version)) = scope {
        pairs.push((SCOPE_NAME.into(), name.into()));
        if !version.is_empty() {
            pairs.push((SCOPE_VERSION.into(), version.into()));
        }
    }
    Labels::new(pairs)
}

/// Pseudo-labels of a span stream that name its instrumentation scope.
pub const SCOPE_NAME: &str = "otel.scope.name";
pub const SCOPE_VERSION: &str = "otel.scope.version";

pub fn decode_traces(
    enc: Encoding,
    content_encoding: &str,
    body: &[u8],
    now_ns: i64,
) -> Result<Batch, Refused> {
    let req: ExportTraceServiceRequest =
        decode(enc, content_encoding, body, "ExportTraceServiceRequest")?;
    let mut out = Batch::default();
    for (i, rs) in req.resource_spans.into_iter().enumerate() {
        let res = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for (j, ss) in rs.scope_spans.into_iter().enumerate() {
            let labels = span_labels(
                &res,
                ss.scope
                    .as_ref()
                    .map(|s| (s.name.as_str(), s.version.as_str())),
            );
            let mut entries = Vec::with_capacity(ss.spans.len());
            for (k, s) in ss.spans.into_iter().enumerate() {
                let at = || format!("resourceSpans[{i}].scopeSpans[{j}].spans[{k}]");
                if !id_ok(&s.trace_id, 16) {
                    out.refuse(|| format!("{}: trace id must be 16 bytes, not all zero", at()));
                    continue;
                }
                if !id_ok(&s.span_id, 8) {
                    out.refuse(|| format!("{}: span id must be 8 bytes, not all zero", at()));
                    continue;
                }
                if !(s.parent_span_id.is_empty() || id_ok(&s.parent_span_id, 8)) {
                    out.refuse(|| format!("{}: parent span id must be 8 bytes", at()));
                    continue;
                }
                let start = i64::try_from(s.start_time_unix_nano).unwrap_or(i64::MAX);
                let end = i64::try_from(s.end_time_unix_nano).unwrap_or(i64::MAX);
                if let Err(why) = check_time(start, now_ns) {
                    out.refuse(|| format!("{}: start {why}", at()));
                    continue;
                }
                if end < start {
                    out.refuse(|| format!("{}: ends before it starts", at()));
                    continue;
                }
                match span_entry(&s) {
                    Ok(e) => entries.push(e),
                    Err(e) => out.refuse(|| format!("{}: cannot encode: {e}", at())),
                }
            }
            if !entries.is_empty() {
                out.streams.push((labels.clone(), entries));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn logs_map_to_streams_and_metadata() {
        let req = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "api"), kv("capstan.replica", "2")],
                    ..Default::default()
                }),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![
                        LogRecord {
                            time_unix_nano: NOW as u64,
                            severity_number: 17,
                            body: Some(AnyValue {
                                value: Some(any_value::Value::StringValue("boom".into())),
                            }),
                            trace_id: vec![1; 16],
                            span_id: vec![2; 8],
                            attributes: vec![kv("user", "ann")],
                            ..Default::default()
                        },
                        LogRecord {
                            time_unix_nano: 5,
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let b = decode_logs(Encoding::Protobuf, "", &req.encode_to_vec(), NOW).unwrap();
        assert_eq!(b.refused, 1);
        let (l, e) = &b.streams[0];
        assert_eq!(
            (l.get("service"), l.get("replica"), l.get("stream")),
            (Some("api"), Some("2"), Some("otlp"))
        );
        assert_eq!(e[0].line, "boom");
        let m: Vec<(&str, &str)> = e[0]
            .meta
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            m,
            vec![
                ("level", "error"),
                ("trace_id", "01010101010101010101010101010101"),
                ("span_id", "0202020202020202"),
                ("user", "ann")
            ]
        );
        // The same request in OTLP JSON.
        let json = serde_json::to_vec(&req).unwrap();
        let j = decode_logs(Encoding::Json, "", &json, NOW).unwrap();
        assert_eq!(j.streams[0].1, b.streams[0].1);
    }

    #[test]
    fn spans_keep_their_json_and_bad_ones_are_refused() {
        let span = |id: u8, trace: Vec<u8>| Span {
            trace_id: trace,
            span_id: vec![id; 8],
            name: format!("op{id}"),
            start_time_unix_nano: NOW as u64,
            end_time_unix_nano: NOW as u64 + 1000,
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "web")],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lib".into(),
                        ..Default::default()
                    }),
                    spans: vec![
                        span(1, vec![9; 16]),
                        span(2, vec![0; 16]),
                        span(3, vec![9; 3]),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let b = decode_traces(Encoding::Protobuf, "", &req.encode_to_vec(), NOW).unwrap();
        assert_eq!(b.refused, 2);
        let (l, e) = &b.streams[0];
        assert_eq!(
            (l.get("service.name"), l.get(SCOPE_NAME)),
            (Some("web"), Some("lib"))
        );
        assert_eq!(e.len(), 1);
        let back: Span = serde_json::from_str(&e[0].line).unwrap();
        assert_eq!(back, span(1, vec![9; 16]));
        assert_eq!(e[0].meta[0].1, "09".repeat(16));
        // Hex ids in JSON, as OTLP says; a bad hex id refuses the body.
        let json = String::from_utf8(serde_json::to_vec(&req).unwrap()).unwrap();
        assert!(json.contains(&"09".repeat(16)), "{json}");
        let bad = json.replace(&"09".repeat(16), "not hex");
        assert_eq!(
            decode_traces(Encoding::Json, "", bad.as_bytes(), NOW)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(encoding("text/plain").unwrap_err().status, 415);
    }
}
