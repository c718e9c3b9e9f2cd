//! Prometheus remote_write 1.0 receiver: `POST /api/v1/write`, a snappy-compressed
//! (block format) protobuf `WriteRequest`. Bad bodies get 400 with the reason;
//! samples the store rejects are counted and reported, the rest are kept.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use capstan_tsdb::Labels;
use prost::Message;

use super::Api;

/// The messages of prometheus/prompb (remote.proto, types.proto) that capstan reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    /// Native histograms (field 4) are counted, not stored.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub histograms: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Largest body accepted, compressed and uncompressed.
const MAX_BODY: usize = 32 << 20;

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, msg.into()).into_response()
}

/// Decodes a remote_write body (snappy block format, protobuf `WriteRequest`),
/// within the size limits; a pure function of its input, fuzzed. The error is
/// the status and reason to answer.
pub fn decode(content_encoding: &str, body: &[u8]) -> Result<WriteRequest, (u16, String)> {
    let bad = |m: String| (400, m);
    if !content_encoding.eq_ignore_ascii_case("snappy") {
        return Err(bad(format!(
            "expected Content-Encoding: snappy, found {content_encoding:?}"
        )));
    }
    if body.len() > MAX_BODY {
        return Err(bad(format!(
            "body of {} bytes is over the {MAX_BODY}-byte limit",
            body.len()
        )));
    }
    let raw = match snap::raw::decompress_len(body) {
        Ok(n) if n > MAX_BODY => {
            return Err(bad(format!(
                "uncompressed body of {n} bytes is over the {MAX_BODY}-byte limit"
            )));
        }
        Ok(_) => snap::raw::Decoder::new()
            .decompress_vec(body)
            .map_err(|e| bad(format!("body is not snappy block-compressed: {e}")))?,
        Err(e) => return Err(bad(format!("body is not snappy block-compressed: {e}"))),
    };
    crate::ingest::bounds::check_protobuf(&raw, "WriteRequest")
        .map_err(|e| (e.status, e.reason))?;
    WriteRequest::decode(raw.as_slice())
        .map_err(|e| bad(format!("body is not a remote_write WriteRequest: {e}")))
}

pub async fn write(State(api): State<Api>, headers: HeaderMap, body: Bytes) -> Response {
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let req = match decode(encoding, &body) {
        Ok(r) => r,
        Err((status, why)) => {
            return (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                why,
            )
                .into_response();
        }
    };
    let mut histograms = 0usize;
    let (mut bad_series, mut bad_samples, mut reasons) = (0usize, 0usize, Vec::new());
    let db = api.db.clone();
    let mut a = db.appender();
    for (i, ts) in req.timeseries.into_iter().enumerate() {
        histograms += ts.histograms.len();
        if let Err(why) = check_label_names(&ts.labels) {
            bad_series += 1;
            bad_samples += ts.samples.len();
            if reasons.len() < 5 {
                reasons.push(format!("timeseries[{i}]: {why}"));
            }
            continue;
        }
        let labels = Labels::new(ts.labels.into_iter().map(|l| (l.name, l.value)).collect());
        for s in ts.samples {
            a.add(labels.clone(), s.timestamp, s.value);
        }
    }
    let committed = match tokio::task::block_in_place(|| a.commit()) {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot store samples: {e}"),
            )
                .into_response();
        }
    };
    let rejected: usize = committed.rejected.iter().map(|(_, n)| n).sum();
    super::ingest::count_refused(3, (bad_samples + histograms) as u64);
    if rejected > 0 || histograms > 0 || bad_series > 0 {
        let mut why: Vec<String> = committed
            .rejected
            .iter()
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect();
        if histograms > 0 {
            why.push(format!("native_histograms_unsupported={histograms}"));
        }
        if bad_series > 0 {
            why.push(format!(
                "invalid_label_names={bad_samples} ({bad_series} series: {})",
                reasons.join("; ")
            ));
        }
        // 400: the sender must not retry these; the accepted samples are kept.
        return bad(format!(
            "stored {} samples; rejected: {}",
            committed.appended,
            why.join(", ")
        ));
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Prometheus refuses series with an empty or repeated label name; so does capstan
/// (storing them would silently drop or merge labels).
fn check_label_names(labels: &[Label]) -> Result<(), String> {
    let mut names: Vec<&str> = labels.iter().map(|l| l.name.as_str()).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err("a label with an empty name".into());
    }
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(format!("label name {:?} appears more than once", w[0])),
        None => Ok(()),
    }
}
