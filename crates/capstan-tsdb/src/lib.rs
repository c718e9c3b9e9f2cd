//! capstan's time-series storage engine. No async runtime, no HTTP.
//!
//! Built so far: the sample chunk codec ([`chunk`]), label sets and matchers
//! ([`labels`]), the inverted index ([`index`]), the write-ahead log ([`wal`]) and
//! the in-memory head with its appender and query API ([`db`]). Blocks,
//! compaction and retention come next; see `FORMAT.md` and the README.
#![forbid(unsafe_code)]

mod bits;
pub mod block;
pub mod chunk;
pub mod db;
mod fxhash;
pub mod index;
pub mod labels;
pub mod wal;

pub use db::{Db, Options, Reject, SeriesData, SeriesRef};
pub use fxhash::{FxBuild, FxHashMap, FxHashSet, FxHasher};
pub use labels::{Labels, MatchOp, Matcher};
pub use wal::Fsync;

/// The stale marker Prometheus writes when a series disappears: a NaN with this bit pattern.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

pub fn is_stale(v: f64) -> bool {
    v.to_bits() == STALE_NAN_BITS
}
