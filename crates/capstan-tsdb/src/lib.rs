//! capstan's time-series storage engine. No async runtime, no HTTP.
//!
//! Built so far: the bit-level sample chunk codec ([`chunk`]). The head, WAL,
//! index, blocks and query API are being added; see `FORMAT.md` and the README.
#![forbid(unsafe_code)]

mod bits;
pub mod chunk;

/// The stale marker Prometheus writes when a series disappears: a NaN with this bit pattern.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

pub fn is_stale(v: f64) -> bool {
    v.to_bits() == STALE_NAN_BITS
}
