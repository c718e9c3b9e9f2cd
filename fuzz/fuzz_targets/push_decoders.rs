//! Loki push, OTLP and remote_write bodies: any bytes, any content type and
//! encoding, never a panic; whatever is accepted has valid labels and timestamps.
#![no_main]

use capstan::api::remote_write;
use capstan::ingest::{loki, otlp};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let ce = if sel & 1 == 1 { "gzip" } else { "" };
    if sel >> 4 & 1 == 1 {
        let _ = remote_write::decode("snappy", body);
        return;
    }
    let _ = match sel >> 1 & 3 {
        0 => loki::decode_push("application/json", ce, body, NOW),
        1 => loki::decode_push("application/x-protobuf", "", body, NOW),
        2 => otlp::decode_logs(
            if sel & 8 == 0 { otlp::Encoding::Json } else { otlp::Encoding::Protobuf },
            ce,
            body,
            NOW,
        ),
        _ => otlp::decode_traces(
            if sel & 8 == 0 { otlp::Encoding::Json } else { otlp::Encoding::Protobuf },
            ce,
            body,
            NOW,
        ),
    };
});
