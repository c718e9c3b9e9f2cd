//! Immutable on-disk blocks: the chunks of a time range and an index of the
//! series they belong to. Written to a temporary directory, fsynced, then renamed
//! into place, so a block is either whole or absent. Layout in `FORMAT.md`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::index::Index;
use crate::labels::Labels;
use crate::wal::{get_uvarint, put_uvarint};

/// An encoded chunk with the timestamps of its first and last samples.
pub type TimedChunk = (Arc<[u8]>, i64, i64);

/// Where a series' chunks are in the `chunks` file (one compressed run per
/// series) and the time range of each chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRun {
    pub offset: u64,
    pub len: u32,
    pub chunks: Vec<(i64, i64)>,
}

/// zstd level for chunk runs: most of the gain, little CPU.
const ZSTD_LEVEL: i32 = 3;
/// Largest uncompressed run accepted when reading (a guard against bad data).
const MAX_RUN: usize = 256 << 20;

/// One series of a block being written: its labels and encoded chunks.
pub struct SeriesChunks {
    pub labels: Labels,
    pub chunks: Vec<TimedChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub mint: i64,
    pub maxt: i64,
    /// The block holds every sample before this time that the head had (exclusive).
    pub boundary: i64,
    /// Names of the blocks this one replaced by compaction.
    pub parents: Vec<String>,
    pub series: usize,
    pub chunks: usize,
    pub bytes: u64,
}

pub struct Block {
    pub dir: PathBuf,
    pub meta: Meta,
    series: Vec<(Labels, SeriesRun)>,
    index: Index,
    chunks: File,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Writes a block for `series` (sorted or not) into `parent`, named after its time
/// range; returns its directory.
/// Writes a block; `parents` names the blocks it replaces (a compaction), which
/// opening the store deletes if a crash left them behind.
pub fn write(
    parent: &Path,
    series: &[SeriesChunks],
    boundary: i64,
    parents: &[String],
) -> io::Result<PathBuf> {
    let mint = series
        .iter()
        .flat_map(|s| s.chunks.iter().map(|c| c.1))
        .min()
        .unwrap_or(0);
    let maxt = series
        .iter()
        .flat_map(|s| s.chunks.iter().map(|c| c.2))
        .max()
        .unwrap_or(0);
    let name = format!(
        "{:020}-{:020}",
        mint.wrapping_sub(i64::MIN) as u64,
        boundary.wrapping_sub(i64::MIN) as u64
    );
    let tmp = parent.join(format!("{name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let mut chunks = io::BufWriter::new(File::create(tmp.join("chunks"))?);
    // Symbol table: every distinct label name and value once, sorted.
    let mut symbols: Vec<&str> = series
        .iter()
        .flat_map(|s| s.labels.iter().flat_map(|(n, v)| [n, v]))
        .collect();
    symbols.sort_unstable();
    symbols.dedup();
    let symbol_id = |x: &str| symbols.binary_search(&x).expect("collected above") as u64;
    let mut index = Vec::new();
    put_uvarint(&mut index, symbols.len() as u64);
    for sym in &symbols {
        put_uvarint(&mut index, sym.len() as u64);
        index.extend_from_slice(sym.as_bytes());
    }
    let mut offset = 0u64;
    let mut n_chunks = 0;
    for s in series {
        put_uvarint(&mut index, s.labels.len() as u64);
        for (n, v) in s.labels.iter() {
            put_uvarint(&mut index, symbol_id(n));
            put_uvarint(&mut index, symbol_id(v));
        }
        // The series' chunks, each length-prefixed, compressed as one zstd frame.
        let mut run = Vec::new();
        for (bytes, _, _) in &s.chunks {
            run.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            run.extend_from_slice(bytes);
        }
        let frame = zstd::bulk::compress(&run, ZSTD_LEVEL)?;
        chunks.write_all(&(frame.len() as u32).to_be_bytes())?;
        chunks.write_all(&crc32fast::hash(&frame).to_be_bytes())?;
        chunks.write_all(&frame)?;
        put_uvarint(&mut index, offset);
        put_uvarint(&mut index, frame.len() as u64);
        put_uvarint(&mut index, s.chunks.len() as u64);
        for (_, cmin, cmax) in &s.chunks {
            put_uvarint(&mut index, ((cmin << 1) ^ (cmin >> 63)) as u64);
            put_uvarint(&mut index, (cmax - cmin) as u64);
        }
        offset += 8 + frame.len() as u64;
        n_chunks += s.chunks.len();
    }
    let crc = crc32fast::hash(&index);
    index.extend_from_slice(&crc.to_be_bytes());
    let chunks = chunks.into_inner().map_err(|e| e.into_error())?;
    chunks.sync_all()?;
    let mut f = File::create(tmp.join("index"))?;
    f.write_all(&index)?;
    f.sync_all()?;
    let meta = json!({"version": 2, "mint": mint, "maxt": maxt, "boundary": boundary, "series": series.len(), "chunks": n_chunks, "bytes": offset + index.len() as u64, "parents": parents});
    let mut f = File::create(tmp.join("meta.json"))?;
    f.write_all(
        serde_json::to_string_pretty(&meta)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    f.sync_all()?;
    let dir = parent.join(&name);
    fs::rename(&tmp, &dir)?;
    File::open(parent)?.sync_all()?;
    Ok(dir)
}

impl Block {
    pub fn open(dir: &Path) -> io::Result<Block> {
        let meta: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("meta.json"))?)
            .map_err(|e| invalid(format!("meta.json: {e}")))?;
        let num = |k: &str| {
            meta[k]
                .as_i64()
                .ok_or_else(|| invalid(format!("meta.json: missing {k}")))
        };
        if meta["version"] != 2 {
            return Err(invalid("unknown block version"));
        }
        let meta = Meta {
            mint: num("mint")?,
            maxt: num("maxt")?,
            boundary: num("boundary")?,
            parents: meta["parents"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            series: num("series")? as usize,
            chunks: num("chunks")? as usize,
            bytes: num("bytes")? as u64,
        };
        let data = fs::read(dir.join("index"))?;
        if data.len() < 4 {
            return Err(invalid("index too short"));
        }
        let (body, crc) = data.split_at(data.len() - 4);
        if crc32fast::hash(body).to_be_bytes() != crc {
            return Err(invalid("index checksum does not match"));
        }
        let mut pos = 0;
        let mut series = Vec::with_capacity(meta.series);
        let mut index = Index::default();
        let bad = || invalid("index is malformed");
        let n_symbols = get_uvarint(body, &mut pos).ok_or_else(bad)? as usize;
        let mut symbols = Vec::with_capacity(n_symbols.min(1 << 20));
        for _ in 0..n_symbols {
            let len = get_uvarint(body, &mut pos).ok_or_else(bad)? as usize;
            let b = body
                .get(pos..pos.checked_add(len).ok_or_else(bad)?)
                .ok_or_else(bad)?;
            pos += len;
            symbols.push(std::str::from_utf8(b).map_err(|_| bad())?);
        }
        while pos < body.len() {
            let n = get_uvarint(body, &mut pos).ok_or_else(bad)? as usize;
            let mut pairs = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                let mut sym = || {
                    symbols
                        .get(get_uvarint(body, &mut pos)? as usize)
                        .map(|s| s.to_string())
                };
                let name = sym().ok_or_else(bad)?;
                let value = sym().ok_or_else(bad)?;
                pairs.push((name, value));
            }
            let labels = Labels::new(pairs);
            let offset = get_uvarint(body, &mut pos).ok_or_else(bad)?;
            let len = get_uvarint(body, &mut pos).ok_or_else(bad)? as u32;
            let k = get_uvarint(body, &mut pos).ok_or_else(bad)? as usize;
            let mut chunks = Vec::with_capacity(k.min(1 << 16));
            for _ in 0..k {
                let z = get_uvarint(body, &mut pos).ok_or_else(bad)?;
                let mint = ((z >> 1) as i64) ^ -((z & 1) as i64);
                let maxt = mint.wrapping_add(get_uvarint(body, &mut pos).ok_or_else(bad)? as i64);
                chunks.push((mint, maxt));
            }
            let run = SeriesRun {
                offset,
                len,
                chunks,
            };
            index.add(series.len() as u32, labels.iter());
            series.push((labels, run));
        }
        let chunks = File::open(dir.join("chunks"))?;
        Ok(Block {
            dir: dir.to_path_buf(),
            meta,
            series,
            index,
            chunks,
        })
    }

    pub fn select(&self, matchers: &[crate::labels::Matcher]) -> Vec<u32> {
        self.index.select(matchers)
    }

    pub fn labels(&self, id: u32) -> &Labels {
        &self.series[id as usize].0
    }

    pub fn label_names(&self) -> Vec<String> {
        self.index.label_names()
    }

    /// The block's directory name.
    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn label_values(&self, name: &str) -> Vec<String> {
        self.index.label_values(name)
    }

    /// Every series with its run (for compaction and checks).
    pub fn series(&self) -> impl Iterator<Item = (&Labels, &SeriesRun)> {
        self.series.iter().map(|(l, r)| (l, r))
    }

    /// Whether series `id` has a chunk overlapping `[mint, maxt]`.
    pub fn has_samples_in(&self, id: u32, mint: i64, maxt: i64) -> bool {
        self.series[id as usize]
            .1
            .chunks
            .iter()
            .any(|c| c.1 >= mint && c.0 <= maxt)
    }

    /// The chunks of series `id` that overlap `[mint, maxt]`, read from disk and checked.
    pub fn chunks(&self, id: u32, mint: i64, maxt: i64) -> io::Result<Vec<TimedChunk>> {
        let run = &self.series[id as usize].1;
        if !run.chunks.iter().any(|c| c.1 >= mint && c.0 <= maxt) {
            return Ok(Vec::new());
        }
        let all = self.read_run(run)?;
        Ok(all
            .into_iter()
            .filter(|c| c.2 >= mint && c.1 <= maxt)
            .collect())
    }

    /// All chunks of a series' run, decompressed and checked.
    pub fn read_run(&self, run: &SeriesRun) -> io::Result<Vec<TimedChunk>> {
        let mut frame = vec![0u8; 8 + run.len as usize];
        self.chunks.read_exact_at(&mut frame, run.offset)?;
        let len = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(frame[4..8].try_into().expect("4 bytes"));
        if len != run.len || crc32fast::hash(&frame[8..]) != crc {
            return Err(invalid(format!(
                "chunks at {} in {} fail their checksum",
                run.offset,
                self.dir.display()
            )));
        }
        let data = zstd::bulk::decompress(&frame[8..], MAX_RUN)
            .map_err(|e| invalid(format!("chunks at {}: {e}", run.offset)))?;
        let mut out = Vec::with_capacity(run.chunks.len());
        let mut pos = 0;
        for &(cmin, cmax) in &run.chunks {
            let n = data
                .get(pos..pos + 4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| invalid("chunk run is cut short"))?;
            let bytes = data
                .get(pos + 4..pos + 4 + n)
                .ok_or_else(|| invalid("chunk run is cut short"))?;
            out.push((Arc::from(bytes), cmin, cmax));
            pos += 4 + n;
        }
        Ok(out)
    }
}
