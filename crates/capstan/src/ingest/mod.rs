//! Decoding what other programs push to capstan: Loki's push API ([`loki`]) and
//! OTLP/HTTP logs and traces ([`otlp`]). Decoders are pure functions of the
//! request's headers and bytes (fuzzed, never panicking); they either reject a
//! body whole (malformed, too large: nothing is stored) or return the entries to
//! store with the items they refused and why.

pub mod bounds;
pub mod loki;
pub mod otlp;

use std::borrow::Cow;
use std::io::Read;

use capstan_logstore::{Entry, Labels};

/// Largest body accepted after decompression.
pub const MAX_DECODED: usize = 64 << 20;
/// Loki's `reject_old_samples_max_age`: entries older than a week are refused.
pub const MAX_AGE_NS: i64 = 7 * 24 * 3_600_000_000_000;
/// Loki's `creation_grace_period`: entries more than ten minutes ahead are refused.
pub const MAX_AHEAD_NS: i64 = 600_000_000_000;
/// Reasons reported for refused items, at most (the count is always whole).
const MAX_REASONS: usize = 10;

/// A body refused whole, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
}

impl Refused {
    pub fn bad(reason: impl Into<String>) -> Refused {
        Refused {
            status: 400,
            reason: reason.into(),
        }
    }
}

/// Entries to store, by stream, and the items refused.
#[derive(Debug, Default)]
pub struct Batch {
    pub streams: Vec<(Labels, Vec<Entry>)>,
    pub refused: usize,
    pub reasons: Vec<String>,
}

impl Batch {
    pub fn refuse(&mut self, reason: impl FnOnce() -> String) {
        self.refused += 1;
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push(reason());
        }
    }

    pub fn entries(&self) -> usize {
        self.streams.iter().map(|(_, e)| e.len()).sum()
    }

    /// Refuses streams that claim to be capstan's own captured output: a
    /// `service`, a `replica` and `stream` = `stdout`, `stderr` or `proxy`. A
    /// push (open on loopback) must not be able to forge what a replica printed
    /// or the proxy logged; pushed lines keep the labels they were pushed with.
    pub fn refuse_own_streams(&mut self) {
        let mut kept = Vec::with_capacity(self.streams.len());
        for (labels, entries) in std::mem::take(&mut self.streams) {
            let own = labels.get("service").is_some()
                && labels.get("replica").is_some()
                && matches!(labels.get("stream"), Some("stdout" | "stderr" | "proxy"));
            if !own {
                kept.push((labels, entries));
                continue;
            }
            for _ in &entries {
                self.refuse(|| {
                    format!(
                        "stream {labels}: service, replica and stream={} are the labels of capstan's own captured output; push under other labels",
                        labels.get("stream").unwrap_or_default()
                    )
                });
            }
        }
        self.streams = kept;
    }

    /// The refusals in one line: the count and the first reasons.
    pub fn refusal(&self) -> String {
        let more = self.refused - self.reasons.len();
        let mut s = format!("{} refused: {}", self.refused, self.reasons.join("; "));
        if more > 0 {
            s.push_str(&format!("; and {more} more"));
        }
        s
    }
}

/// The body with its `Content-Encoding` undone (gzip or none), at most
/// [`MAX_DECODED`] bytes.
pub fn decode_body<'a>(encoding: &str, body: &'a [u8]) -> Result<Cow<'a, [u8]>, Refused> {
    match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(Cow::Borrowed(body)),
        "gzip" | "x-gzip" => {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(body)
                .take(MAX_DECODED as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| Refused::bad(format!("body is not valid gzip: {e}")))?;
            if out.len() > MAX_DECODED {
                return Err(Refused {
                    status: 413,
                    reason: format!("uncompressed body is over the {MAX_DECODED}-byte limit"),
                });
            }
            Ok(Cow::Owned(out))
        }
        other => Err(Refused {
            status: 415,
            reason: format!("unsupported Content-Encoding {other:?} (gzip or none)"),
        }),
    }
}

/// Why a timestamp is refused, if it is: not after 1970, older than a week, or
/// more than ten minutes ahead of `now_ns`.
pub fn check_time(ts_ns: i64, now_ns: i64) -> Result<(), String> {
    if ts_ns <= 0 {
        return Err(format!("timestamp {ts_ns} is not after 1970"));
    }
    if ts_ns < now_ns.saturating_sub(MAX_AGE_NS) {
        return Err(format!("timestamp {} is older than a week", fmt_ns(ts_ns)));
    }
    if ts_ns > now_ns.saturating_add(MAX_AHEAD_NS) {
        return Err(format!(
            "timestamp {} is more than ten minutes in the future",
            fmt_ns(ts_ns)
        ));
    }
    Ok(())
}

fn fmt_ns(ts: i64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ts))
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ts.to_string())
}

/// Why a stream's labels are refused, if they are (Loki's rules: at least one,
/// at most 15, names `[a-zA-Z_][a-zA-Z0-9_]*` up to 1024 bytes, values up to
/// 2048 bytes).
pub fn check_labels(pairs: &[(String, String)]) -> Result<(), String> {
    if pairs.is_empty() {
        return Err("a stream needs at least one label".into());
    }
    if pairs.len() > 15 {
        return Err(format!("{} labels, more than 15", pairs.len()));
    }
    for (k, v) in pairs {
        let ok = !k.is_empty()
            && k.len() <= 1024
            && k.bytes().enumerate().all(|(i, b)| {
                b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
            });
        if !ok {
            return Err(format!("invalid label name {k:?}"));
        }
        if v.len() > 2048 {
            return Err(format!("label {k} has a value over 2048 bytes"));
        }
    }
    Ok(())
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

/// Appends the lower-case hex of bytes.
pub fn push_hex(out: &mut String, b: &[u8]) {
    const D: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        out.push(D[(x >> 4) as usize] as char);
        out.push(D[(x & 15) as usize] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_times_and_labels_are_checked() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"hello").unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(&*decode_body("gzip", &gz).unwrap(), b"hello");
        assert_eq!(&*decode_body("", b"x").unwrap(), b"x");
        assert_eq!(decode_body("gzip", b"not gzip").unwrap_err().status, 400);
        assert_eq!(decode_body("br", b"x").unwrap_err().status, 415);
        let now = 1_800_000_000_000_000_000;
        assert!(check_time(now, now).is_ok());
        assert!(check_time(0, now).unwrap_err().contains("1970"));
        assert!(
            check_time(now - MAX_AGE_NS - 1, now)
                .unwrap_err()
                .contains("week")
        );
        assert!(
            check_time(now + MAX_AHEAD_NS + 1, now)
                .unwrap_err()
                .contains("future")
        );
        assert!(check_labels(&[]).is_err());
        assert!(check_labels(&[("a_1".into(), "v".into())]).is_ok());
        assert!(check_labels(&[("1a".into(), "v".into())]).is_err());
        assert!(check_labels(&[("a.b".into(), "v".into())]).is_err());
        assert_eq!(hex(&[0, 0xab, 0x1f]), "00ab1f");
    }
}
