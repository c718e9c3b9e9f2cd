//! capstan's log storage engine: streams of timestamped lines in append-only,
//! checksummed segment files of zstd blocks with per-block trigram filters. No
//! async runtime, no HTTP. Format in `FORMAT.md`; guarantees in `README.md`.

mod block;
mod codec;
mod filter;
mod labels;
pub mod logql;
mod segment;
mod store;

pub use block::Entry;
pub use labels::Labels;
pub use store::{Appended, Direction, Options, Query, Recovery, Stats, Store};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
}
