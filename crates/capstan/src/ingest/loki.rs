//! Loki's push API body: JSON (`application/json`, optionally gzip) or protobuf
//! `logproto.PushRequest` in snappy's block format (`application/x-protobuf`,
//! what promtail, Alloy and Docker's Loki driver send).

use std::collections::BTreeMap;
use std::fmt;

use capstan_logstore::logql::{self, ast};
use capstan_logstore::{Entry, Labels};
use prost::Message;
use serde::Deserialize;
use serde::de::{self, SeqAccess, Visitor};

use super::{Batch, Refused, check_labels, check_time, decode_body};

/// `logproto.PushRequest` and the messages in it, as Loki's push.proto numbers them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    pub streams: Vec<StreamAdapter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAdapter {
    /// A selector: `{app="web", env="prod"}`.
    #[prost(string, tag = "1")]
    pub labels: String,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<EntryAdapter>,
    #[prost(uint64, tag = "3")]
    pub hash: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryAdapter {
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<Timestamp>,
    #[prost(string, tag = "2")]
    pub line: String,
    #[prost(message, repeated, tag = "3")]
    pub structured_metadata: Vec<LabelPair>,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPair {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPush {
    streams: Vec<JsonStream>,
}

#[derive(Deserialize)]
struct JsonStream {
    stream: BTreeMap<String, String>,
    values: Vec<JsonEntry>,
}

/// A timestamp string read without keeping it: its value, or the text that is
/// not one (for the error).
struct Ts(Result<i64, String>);

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a timestamp string of Unix nanoseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ts, E> {
                Ok(Ts(v.parse::<i64>().map_err(|_| v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// `["<unix ns>", "<line>"]` or `["<unix ns>", "<line>", {"key": "value"}]`.
struct JsonEntry {
    ts: Ts,
    line: String,
    meta: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for JsonEntry {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    r#"an entry ["<unix ns>", "<line>"] or ["<unix ns>", "<line>", {metadata}]"#,
                )
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<JsonEntry, A::Error> {
                let ts: Ts = s
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let line: String = s
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                let meta: BTreeMap<String, String> = s.next_element()?.unwrap_or_default();
                if s.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(4, &self));
                }
                Ok(JsonEntry { ts, line, meta })
            }
        }
        d.deserialize_seq(V)
    }
}

/// The labels of a selector whose matchers are all `=`.
pub fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let expr = logql::parse(s).map_err(|e| format!("labels {s:?}: {e}"))?;
    let ast::Expr::Log(e) = expr else {
        return Err(format!("labels {s:?} are not a stream selector"));
    };
    if !e.stages.is_empty() {
        return Err(format!("labels {s:?} are not a plain stream selector"));
    }
    e.selector
        .into_iter()
        .map(|m| {
            if m.op == ast::MatchOp::Eq {
                Ok((m.name, m.value))
            } else {
                Err(format!("labels {s:?}: only = matchers name a stream"))
            }
        })
        .collect()
}

/// Decodes a push body. Malformed bodies are refused whole; entries with bad
/// labels or timestamps are refused one by one, with where they were.
pub fn decode_push(
    content_type: &str,
    encoding: &str,
    body: &[u8],
    now_ns: i64,
) -> Result<Batch, Refused> {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut out = Batch::default();
    if ct == "application/json" {
        let raw = decode_body(encoding, body)?;
        super::bounds::check_json(&raw, "push request")?;
        let p: JsonPush = serde_json::from_slice(&raw)
            .map_err(|e| Refused::bad(format!("body is not a Loki JSON push request: {e}")))?;
        for (i, s) in p.streams.into_iter().enumerate() {
            let pairs: Vec<(String, String)> = s.stream.into_iter().collect();
            let entries = s.values.into_iter().enumerate().map(|(j, v)| {
                let ts = v.ts.0.map_err(|t| {
                    format!("streams[{i}].values[{j}]: timestamp {t:?} is not Unix nanoseconds")
                })?;
                Ok((ts, v.line, v.meta.into_iter().collect()))
            });
            add_stream(&mut out, &format!("streams[{i}]"), pairs, entries, now_ns);
        }
        return Ok(out);
    }
    if !(ct.is_empty() || ct == "application/x-protobuf" || ct == "application/protobuf") {
        return Err(Refused {
            status: 415,
            reason: format!(
                "unsupported Content-Type {content_type:?} (application/json or application/x-protobuf)"
            ),
        });
    }
    let raw = match snap::raw::decompress_len(body) {
        Ok(n) if n > super::MAX_DECODED => {
            return Err(Refused {
                status: 413,
                reason: format!(
                    "uncompressed body of {n} bytes is over the {}-byte limit",
                    super::MAX_DECODED
                ),
            });
        }
        Ok(_) => snap::raw::Decoder::new()
            .decompress_vec(body)
            .map_err(|e| Refused::bad(format!("body is not snappy block-compressed: {e}")))?,
        Err(e) => {
            return Err(Refused::bad(format!(
                "body is not snappy block-compressed: {e}"
            )));
        }
    };
    super::bounds::check_protobuf(&raw, "PushRequest")?;
    let p = PushRequest::decode(raw.as_slice())
        .map_err(|e| Refused::bad(format!("body is not a Loki PushRequest: {e}")))?;
    for (i, s) in p.streams.into_iter().enumerate() {
        let pairs = match parse_labels(&s.labels) {
            Ok(p) => p,
            Err(e) => {
                for _ in &s.entries {
                    out.refuse(|| format!("streams[{i}]: {e}"));
                }
                continue;
            }
        };
        let entries = s.entries.into_iter().enumerate().map(|(j, e)| {
            let t = e
                .timestamp
                .ok_or_else(|| format!("streams[{i}].entries[{j}]: no timestamp"))?;
            let ts = t
                .seconds
                .checked_mul(1_000_000_000)
                .and_then(|s| s.checked_add(i64::from(t.nanos)))
                .ok_or_else(|| {
                    format!(
                        "streams[{i}].entries[{j}]: timestamp {}s is out of range",
                        t.seconds
                    )
                })?;
            Ok((
                ts,
                e.line,
                e.structured_metadata
                    .into_iter()
                    .map(|l| (l.name, l.value))
                    .collect(),
            ))
        });
        add_stream(&mut out, &format!("streams[{i}]"), pairs, entries, now_ns);
    }
    Ok(out)
}

type Decoded = Result<(i64, String, Vec<(String, String)>), String>;

fn add_stream(
    out: &mut Batch,
    at: &str,
    pairs: Vec<(String, String)>,
    entries: impl Iterator<Item = Decoded>,
    now_ns: i64,
) {
    let labels_ok = check_labels(&pairs);
    let mut kept = Vec::new();
    for (j, e) in entries.enumerate() {
        let e = e.and_then(|(ts, line, meta)| {
            labels_ok.clone().map_err(|why| format!("{at}: {why}"))?;
            check_time(ts, now_ns).map_err(|why| format!("{at} entry {j}: {why}"))?;
            Ok(Entry {
                ts_ns: ts,
                seq: 0,
                line,
                meta,
            })
        });
        match e {
            Ok(e) => kept.push(e),
            Err(why) => out.refuse(|| why),
        }
    }
    if !kept.is_empty() {
        out.streams.push((Labels::new(pairs), kept));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    #[test]
    fn json_with_metadata_and_refusals() {
        let body = format!(
            r#"{{"streams":[{{"stream":{{"app":"web"}},"values":[["{}","one"],["{}","two",{{"trace_id":"abc"}}],["x","bad"],["1","old"]]}},{{"stream":{{"bad-name":"v"}},"values":[["{}","three"]]}}]}}"#,
            NOW,
            NOW + 1,
            NOW
        );
        let b = decode_push("application/json", "", body.as_bytes(), NOW).unwrap();
        assert_eq!(b.streams.len(), 1);
        let (l, e) = &b.streams[0];
        assert_eq!(l.get("app"), Some("web"));
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].meta, vec![("trace_id".to_string(), "abc".to_string())]);
        assert_eq!(b.refused, 3);
        assert!(
            b.reasons[0].contains("streams[0].values[2]"),
            "{:?}",
            b.reasons
        );
        assert!(b.reasons[1].contains("1970") || b.reasons[1].contains("week"));
        assert!(b.reasons[2].contains("bad-name"));
    }

    #[test]
    fn protobuf_with_snappy() {
        let req = PushRequest {
            streams: vec![StreamAdapter {
                labels: r#"{app="api", env="prod"}"#.into(),
                entries: vec![EntryAdapter {
                    timestamp: Some(Timestamp {
                        seconds: NOW / 1_000_000_000,
                        nanos: 5,
                    }),
                    line: "hello".into(),
                    structured_metadata: vec![LabelPair {
                        name: "trace_id".into(),
                        value: "t".into(),
                    }],
                }],
                hash: 0,
            }],
        };
        let body = snap::raw::Encoder::new()
            .compress_vec(&req.encode_to_vec())
            .unwrap();
        let b = decode_push("application/x-protobuf", "", &body, NOW).unwrap();
        assert_eq!(b.refused, 0);
        let (l, e) = &b.streams[0];
        assert_eq!((l.get("app"), l.get("env")), (Some("api"), Some("prod")));
        assert_eq!(e[0].ts_ns, NOW / 1_000_000_000 * 1_000_000_000 + 5);
        assert_eq!(e[0].line, "hello");
    }

    #[test]
    fn malformed_bodies_are_refused_whole() {
        for (ct, body) in [
            ("application/json", &b"{"[..]),
            (
                "application/json",
                br#"{"streams":[{"stream":{},"values":[[1,"x"]]}]}"#,
            ),
            (
                "application/json",
                br#"{"streams":[{"stream":{"a":"b"},"values":[["1"]]}]}"#,
            ),
            ("application/x-protobuf", b"\xff\xff\xff\xff"),
            ("application/x-protobuf", b"plain, not snappy"),
        ] {
            let e = decode_push(ct, "", body, NOW).unwrap_err();
            assert_eq!(e.status, 400, "{ct} {body:?}: {}", e.reason);
        }
        assert_eq!(
            decode_push("text/plain", "", b"x", NOW).unwrap_err().status,
            415
        );
        assert!(parse_labels(r#"{a=~"b"}"#).is_err());
        assert!(parse_labels("{").is_err());
    }
}
