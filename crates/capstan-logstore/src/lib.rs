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
mod template;

/// Entry points for the fuzz targets (not part of the API).
#[doc(hidden)]
pub mod fuzzing {
    /// Any bytes as a block's lines section: decoding never panics; and the
    /// bytes' text, cut into lines, comes back from templates unchanged.
    pub fn lines(data: &[u8]) {
        if let Some((&count, rest)) = data.split_first() {
            let cut = rest.len() / 3;
            let (hex, section) = rest.split_at(cut);
            let _ = crate::template::decode(
                &mut crate::codec::Reader::new(section),
                usize::from(count),
                hex,
            );
        }
        let text = String::from_utf8_lossy(data);
        let lines: Vec<&str> = text.split('\n').collect();
        let mut e = crate::template::Encoder::default();
        let mut spans = Vec::new();
        for l in &lines {
            e.add(l, &mut spans);
        }
        let mut out = Vec::new();
        let hex = e.finish(&mut out);
        let (back, ends) =
            crate::template::decode(&mut crate::codec::Reader::new(&out), lines.len(), &hex)
                .expect("encoded lines decode");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(&back[ends[i]..ends[i + 1]], l.as_bytes());
        }
    }
}

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
