//! Push endpoints: Loki's `POST /loki/api/v1/push` and OTLP/HTTP's
//! `POST /v1/logs` and `POST /v1/traces`. A malformed or oversized body is
//! refused whole (4xx, nothing stored); items with bad labels, ids or
//! timestamps are refused one by one and the rest kept: Loki push answers 400
//! with the reasons, OTLP answers 200 with `partial_success`, as its spec says.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use prost::Message;

use super::Api;
use super::blocking;
use crate::ingest::otlp::{self, Encoding};
use crate::ingest::{Batch, Refused, loki};

/// Largest request body, compressed.
pub const MAX_BODY: usize = 32 << 20;

/// Items refused one by one (bad labels, timestamps, forged streams, …), by
/// API, for `capstan_ingest_items_refused_total{api}`.
pub static REFUSED: [(&str, std::sync::atomic::AtomicU64); 4] = [
    ("loki", std::sync::atomic::AtomicU64::new(0)),
    ("otlp_logs", std::sync::atomic::AtomicU64::new(0)),
    ("otlp_traces", std::sync::atomic::AtomicU64::new(0)),
    ("remote_write", std::sync::atomic::AtomicU64::new(0)),
];

pub(crate) fn count_refused(api: usize, n: u64) {
    if n > 0 {
        REFUSED[api]
            .1
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

fn header(h: &HeaderMap, name: header::HeaderName) -> &str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn plain(status: u16, msg: impl std::fmt::Display) -> Response {
    super::text(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        msg,
    )
}

pub async fn loki_push(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let ct = header(&headers, header::CONTENT_TYPE).to_owned();
    let ce = header(&headers, header::CONTENT_ENCODING).to_owned();
    let now = crate::logs::now_ns();
    let r = blocking(move || {
        let mut batch = loki::decode_push(&ct, &ce, &body, now)?;
        batch.refuse_own_streams();
        count_refused(0, batch.refused as u64);
        let (refused, why) = (batch.refused, batch.refusal());
        let (_, limited) = api.logs.append_pushed(batch.streams).map_err(|e| Refused {
            status: 500,
            reason: format!("cannot store: {e}"),
        })?;
        if limited > 0 {
            return Err(Refused {
                status: 429,
                reason: format!("ingestion rate limit exceeded: {limited} entries refused"),
            });
        }
        if refused > 0 {
            return Err(Refused::bad(why));
        }
        Ok(())
    })
    .await;
    match r {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => plain(e.status, e.reason),
        Err(r) => r,
    }
}

/// `google.rpc.Status`, OTLP's error body.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

fn otlp_answer<M: Message + serde::Serialize>(enc: Encoding, m: &M) -> Response {
    match enc {
        Encoding::Protobuf => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            m.encode_to_vec(),
        )
            .into_response(),
        Encoding::Json => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(m).unwrap_or_default(),
        )
            .into_response(),
    }
}

fn otlp_refused(enc: Encoding, e: Refused) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    // gRPC codes: 3 invalid argument, 8 resource exhausted, 13 internal.
    let code = match e.status {
        413 | 429 => 8,
        500.. => 13,
        _ => 3,
    };
    let s = RpcStatus {
        code,
        message: e.reason.clone(),
    };
    let body = match enc {
        Encoding::Protobuf => s.encode_to_vec(),
        Encoding::Json => {
            serde_json::to_vec(&serde_json::json!({"code": code, "message": e.reason}))
                .unwrap_or_default()
        }
    };
    let ct = match enc {
        Encoding::Protobuf => "application/x-protobuf",
        Encoding::Json => "application/json",
    };
    (status, [(header::CONTENT_TYPE, ct)], body).into_response()
}

/// Decodes and stores one OTLP request; the answer's partial success says
/// how many items were refused and why.
async fn otlp_request(
    headers: &HeaderMap,
    body: Bytes,
    decode: fn(Encoding, &str, &[u8], i64) -> Result<Batch, Refused>,
    store: impl FnOnce(Batch) -> Result<(), String> + Send + 'static,
) -> Result<(Encoding, i64, String), Response> {
    let enc = otlp::encoding(header(headers, header::CONTENT_TYPE))
        .map_err(|e| otlp_refused(Encoding::Protobuf, e))?;
    let ce = header(headers, header::CONTENT_ENCODING).to_owned();
    let now = crate::logs::now_ns();
    let r = blocking(move || {
        let batch = decode(enc, &ce, &body, now)?;
        let refused = (batch.refused as i64, batch.refusal());
        store(batch).map_err(|e| Refused {
            status: 500,
            reason: e,
        })?;
        Ok::<_, Refused>(refused)
    })
    .await?;
    match r {
        Ok((0, _)) => Ok((enc, 0, String::new())),
        Ok((n, why)) => Ok((enc, n, why)),
        Err(e) => Err(otlp_refused(enc, e)),
    }
}

pub async fn otlp_logs(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let shared = api.clone();
    let decode: fn(Encoding, &str, &[u8], i64) -> Result<Batch, Refused> = |e, ce, b, now| {
        let mut batch = otlp::decode_logs(e, ce, b, now)?;
        batch.refuse_own_streams();
        Ok(batch)
    };
    match otlp_request(&headers, body, decode, move |b| {
        shared
            .logs
            .append_pushed(b.streams)
            .map(|_| ())
            .map_err(|e| format!("cannot store: {e}"))
    })
    .await
    {
        Ok((enc, rejected, why)) => {
            count_refused(1, rejected as u64);
            otlp_answer(
                enc,
                &ExportLogsServiceResponse {
                    partial_success: (rejected > 0).then_some(ExportLogsPartialSuccess {
                        rejected_log_records: rejected,
                        error_message: why,
                    }),
                },
            )
        }
        Err(r) => r,
    }
}

pub async fn otlp_traces(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let traces = api.traces.clone();
    match otlp_request(&headers, body, otlp::decode_traces, move |b| {
        traces
            .append(b.streams)
            .map(|_| ())
            .map_err(|e| format!("cannot store: {e}"))
    })
    .await
    {
        Ok((enc, rejected, why)) => {
            count_refused(2, rejected as u64);
            otlp_answer(
                enc,
                &ExportTraceServiceResponse {
                    partial_success: (rejected > 0).then_some(ExportTracePartialSuccess {
                        rejected_spans: rejected,
                        error_message: why,
                    }),
                },
            )
        }
        Err(r) => r,
    }
}
