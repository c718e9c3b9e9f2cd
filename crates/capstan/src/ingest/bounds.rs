//! How much memory a body takes once decoded, estimated from its bytes before
//! decoding, so a small body of many tiny items (64 MiB of empty protobuf
//! messages, `[{},{},…]` in JSON) is refused instead of growing the daemon by
//! gigabytes.
//!
//! Protobuf is walked without its schema: a length-delimited field whose bytes
//! read as a whole message is counted as one (strings that happen to read as
//! messages are counted too, which only overestimates). JSON counts its objects
//! and arrays. Each counts [`ITEM_BYTES`], about what a decoded message costs.

use super::Refused;

/// Memory one decoded request may take, at most (estimated).
pub const MAX_DECODE_BYTES: u64 = 256 << 20;
/// What one decoded message, object or array is counted as.
pub const ITEM_BYTES: u64 = 160;
/// Nesting followed into length-delimited fields (deeper ones count as bytes;
/// prost refuses messages nested beyond 100 levels anyway).
const MAX_DEPTH: usize = 16;

/// Refuses a protobuf body whose decoded form would take more than
/// [`MAX_DECODE_BYTES`].
pub fn check_protobuf(raw: &[u8], what: &str) -> Result<(), Refused> {
    let mut items = 0u64;
    let limit = (MAX_DECODE_BYTES.saturating_sub(raw.len() as u64)) / ITEM_BYTES;
    message(raw, 0, &mut items, limit);
    verdict(items, limit, raw.len(), what)
}

/// The same for a JSON body.
pub fn check_json(raw: &[u8], what: &str) -> Result<(), Refused> {
    let limit = (MAX_DECODE_BYTES.saturating_sub(raw.len() as u64)) / ITEM_BYTES;
    let mut items = 0u64;
    let mut i = 0;
    // Jumps from one interesting byte to the next (memchr), so the scan costs
    // little beside decoding: objects and arrays count, strings are skipped.
    while let Some(k) = memchr::memchr3(b'"', b'{', b'[', &raw[i..]) {
        i += k;
        if raw[i] == b'"' {
            i += 1;
            loop {
                match memchr::memchr2(b'"', b'\\', &raw[i..]) {
                    Some(k) if raw[i + k] == b'\\' => i += k + 2,
                    Some(k) => {
                        i += k + 1;
                        break;
                    }
                    None => {
                        i = raw.len();
                        break;
                    }
                }
                if i >= raw.len() {
                    break;
                }
            }
        } else {
            items += 1;
            if items > limit {
                break;
            }
            i += 1;
        }
        if i >= raw.len() {
            break;
        }
    }
    verdict(items, limit, raw.len(), what)
}

fn verdict(items: u64, limit: u64, len: usize, what: &str) -> Result<(), Refused> {
    if items <= limit {
        return Ok(());
    }
    Err(Refused {
        status: 413,
        reason: format!(
            "the {what} holds more than {limit} items in {len} bytes: decoded, it would take more than the {} MiB limit",
            MAX_DECODE_BYTES >> 20
        ),
    })
}

/// Walks `buf` as a message; returns whether it reads as one, adding its
/// messages (itself and those inside) to `items`. Stops counting past `limit`.
fn message(buf: &[u8], depth: usize, items: &mut u64, limit: u64) -> bool {
    let mut found = 0u64;
    let mut i = 0;
    while i < buf.len() {
        let Some((tag, n)) = varint(&buf[i..]) else {
            return false;
        };
        i += n;
        if tag >> 3 == 0 {
            return false;
        }
        match tag & 7 {
            0 => match varint(&buf[i..]) {
                Some((_, n)) => i += n,
                None => return false,
            },
            1 => i += 8,
            5 => i += 4,
            2 => {
                let Some((len, n)) = varint(&buf[i..]) else {
                    return false;
                };
                i += n;
                let Some(end) = usize::try_from(len).ok().and_then(|l| i.checked_add(l)) else {
                    return false;
                };
                if end > buf.len() {
                    return false;
                }
                if depth < MAX_DEPTH {
                    let mut inner = 0u64;
                    if message(&buf[i..end], depth + 1, &mut inner, limit) {
                        found += inner;
                    }
                }
                i = end;
            }
            _ => return false,
        }
        if *items + found > limit {
            break;
        }
    }
    if i > buf.len() {
        return false;
    }
    *items += found + 1;
    true
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    #[test]
    fn many_empty_messages_are_refused_and_real_requests_pass() {
        // One ResourceSpans holding 32M empty ScopeSpans: 64 MiB of `12 00`.
        let n = 32usize << 20;
        let mut inner = Vec::with_capacity(2 * n);
        for _ in 0..n {
            inner.extend_from_slice(&[0x12, 0x00]);
        }
        let mut bomb = vec![0x0a];
        let mut len = inner.len() as u64;
        while len >= 0x80 {
            bomb.push((len as u8) | 0x80);
            len >>= 7;
        }
        bomb.push(len as u8);
        bomb.extend_from_slice(&inner);
        let e = check_protobuf(&bomb, "request").unwrap_err();
        assert_eq!(e.status, 413);
        assert!(e.reason.contains("256 MiB"), "{}", e.reason);

        let spans: Vec<Span> = (0..10_000)
            .map(|i| Span {
                name: format!("span {i}"),
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                ..Default::default()
            })
            .collect();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        check_protobuf(&req.encode_to_vec(), "request").unwrap();
    }

    #[test]
    fn json_counts_objects_and_arrays_outside_strings() {
        let bomb = format!("[{}{{}}]", "{},".repeat(2_000_000));
        assert_eq!(
            check_json(bomb.as_bytes(), "request").unwrap_err().status,
            413
        );
        let text = format!("{{\"a\":\"{}\"}}", "{[".repeat(2_000_000));
        check_json(text.as_bytes(), "request").unwrap();
    }

    #[test]
    fn garbage_never_panics() {
        for b in [
            &[0xff_u8; 20][..],
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            &[0x0a],
        ] {
            let _ = check_protobuf(b, "x");
        }
    }
}
