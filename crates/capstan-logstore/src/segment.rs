//! Segment files: a magic header, then checksummed records (stream definitions,
//! blocks, and a seal once the file is complete). Byte layout in `FORMAT.md`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::Labels;
use crate::block::{self, Header};
use crate::codec::{Reader, put_bytes, put_uvarint};

pub const MAGIC: &[u8; 8] = b"CAPLOGS1";
pub const KIND_STREAM: u8 = 1;
pub const KIND_BLOCK: u8 = 2;
pub const KIND_SEAL: u8 = 3;
/// Record header: payload length (u32 LE), CRC-32 of kind + payload (u32 LE), kind.
pub const RECORD_HEADER: usize = 9;
/// Largest record accepted when reading.
const MAX_RECORD: u32 = 256 << 20;
/// How much of a block record is read to parse its header and filter.
const HEAD_READ: usize = 32 << 10;

/// A block as the segment index keeps it.
#[derive(Debug, Clone)]
pub struct BlockRef {
    /// Stream ids are the segment file's own until the store maps them.
    pub header: Header,
    /// Offset of the block's bytes (the record payload) in the file.
    pub offset: u64,
    pub len: u32,
    /// The trigram filter's bytes; the token filter's follow, in `tokens`.
    pub filter: std::ops::Range<u32>,
    pub tokens: std::ops::Range<u32>,
    pub data: std::ops::Range<u32>,
}

impl BlockRef {
    pub fn new(p: &block::Parsed, offset: u64, len: u32) -> BlockRef {
        BlockRef {
            header: p.header.clone(),
            offset,
            len,
            filter: p.filter.start as u32..p.filter.end as u32,
            tokens: p.tokens.start as u32..p.tokens.end as u32,
            data: p.data.start as u32..len,
        }
    }
}

/// A block's two filters, read together.
pub struct Filters {
    buf: Vec<u8>,
    trigrams: usize,
    tokens: std::ops::Range<usize>,
}

impl Filters {
    pub fn trigrams(&self) -> &[u8] {
        &self.buf[..self.trigrams]
    }

    pub fn tokens(&self) -> &[u8] {
        &self.buf[self.tokens.clone()]
    }
}

/// What reading a segment file found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub streams: Vec<(u32, Labels)>,
    pub blocks: Vec<BlockRef>,
    pub sealed: bool,
    /// Length of the valid prefix.
    pub valid_len: u64,
    /// Why the file was cut short, if it was (torn or corrupt tail).
    pub torn: Option<String>,
}

fn crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

pub fn encode_stream(id: u32, labels: &Labels) -> Vec<u8> {
    let mut p = Vec::new();
    put_uvarint(&mut p, u64::from(id));
    put_uvarint(&mut p, labels.len() as u64);
    for (k, v) in labels.iter() {
        put_bytes(&mut p, k.as_bytes());
        put_bytes(&mut p, v.as_bytes());
    }
    p
}

fn decode_stream(p: &[u8]) -> Option<(u32, Labels)> {
    let mut r = Reader::new(p);
    let id = u32::try_from(r.uvarint()?).ok()?;
    let n = r.uvarint()?;
    let mut pairs = Vec::new();
    for _ in 0..n {
        pairs.push((r.str()?.to_owned(), r.str()?.to_owned()));
    }
    r.is_empty().then(|| (id, Labels::new(pairs)))
}

/// Reads a segment file. Every record of an unsealed file is checked against its
/// checksum, and the file is valid up to the first bad or incomplete one; a sealed
/// file was written whole and renamed into place, so only headers are read (block
/// checksums are checked when blocks are read).
pub fn load(path: &Path) -> std::io::Result<Loaded> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut out = Loaded::default();
    let mut magic = [0u8; 8];
    if size < 8 || file.read_exact_at(&mut magic, 0).is_err() || &magic != MAGIC {
        out.torn = Some("no segment header".into());
        return Ok(out);
    }
    // A sealed file ends with an empty seal record.
    let mut tail = [0u8; RECORD_HEADER];
    let sealed = size >= 8 + RECORD_HEADER as u64
        && file
            .read_exact_at(&mut tail, size - RECORD_HEADER as u64)
            .is_ok()
        && tail[0..4] == [0, 0, 0, 0]
        && tail[8] == KIND_SEAL
        && u32::from_le_bytes(tail[4..8].try_into().expect("4 bytes")) == crc(KIND_SEAL, &[]);
    let mut pos = 8u64;
    let mut buf = Vec::new();
    let bad = |out: &mut Loaded, pos: u64, why: String| {
        out.valid_len = pos;
        out.torn = Some(format!("at byte {pos}: {why}"));
    };
    loop {
        if pos == size {
            out.valid_len = pos;
            break;
        }
        let mut h = [0u8; RECORD_HEADER];
        if pos + RECORD_HEADER as u64 > size || file.read_exact_at(&mut h, pos).is_err() {
            bad(&mut out, pos, "incomplete record header".into());
            break;
        }
        let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sum = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let kind = h[8];
        let start = pos + RECORD_HEADER as u64;
        if len > MAX_RECORD || start + u64::from(len) > size {
            bad(
                &mut out,
                pos,
                format!("record of {len} bytes runs past the end"),
            );
            break;
        }
        let whole = !sealed || kind != KIND_BLOCK;
        let want = if whole {
            len as usize
        } else {
            (len as usize).min(HEAD_READ)
        };
        buf.resize(want, 0);
        if file.read_exact_at(&mut buf, start).is_err() {
            bad(&mut out, pos, "unreadable record".into());
            break;
        }
        if whole && crc(kind, &buf) != sum {
            bad(&mut out, pos, "checksum mismatch".into());
            break;
        }
        match kind {
            KIND_STREAM => match decode_stream(&buf) {
                Some(s) => out.streams.push(s),
                None => {
                    bad(&mut out, pos, "malformed stream record".into());
                    break;
                }
            },
            KIND_BLOCK => {
                let parsed = block::parse_header(&buf).or_else(|| {
                    // The filter may be longer than the first read.
                    (!whole).then(|| {
                        buf.resize(len as usize, 0);
                        file.read_exact_at(&mut buf, start).ok()?;
                        block::parse_header(&buf)
                    })?
                });
                let Some(p) = parsed else {
                    bad(&mut out, pos, "malformed block header".into());
                    break;
                };
                out.blocks.push(BlockRef::new(&p, start, len));
            }
            KIND_SEAL if len == 0 && start == size => {
                out.sealed = true;
            }
            _ => {
                bad(&mut out, pos, format!("unknown record kind {kind}"));
                break;
            }
        }
        pos = start + u64::from(len);
    }
    Ok(out)
}

/// Reads a block's bytes and checks them against the record's checksum.
pub fn read_block(file: &File, b: &BlockRef) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; RECORD_HEADER];
    file.read_exact_at(&mut h, b.offset - RECORD_HEADER as u64)?;
    let mut buf = vec![0u8; b.len as usize];
    file.read_exact_at(&mut buf, b.offset)?;
    if crc(KIND_BLOCK, &buf) != u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("block at byte {} fails its checksum", b.offset),
        ));
    }
    Ok(buf)
}

/// Reads only a block's token filter.
pub fn read_tokens(file: &File, b: &BlockRef) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; (b.tokens.end - b.tokens.start) as usize];
    file.read_exact_at(&mut buf, b.offset + u64::from(b.tokens.start))?;
    Ok(buf)
}

/// Reads only a block's filters (one read: they are next to each other).
pub fn read_filters(file: &File, b: &BlockRef) -> std::io::Result<Filters> {
    let mut buf = vec![0u8; (b.tokens.end - b.filter.start) as usize];
    file.read_exact_at(&mut buf, b.offset + u64::from(b.filter.start))?;
    Ok(Filters {
        buf,
        trigrams: (b.filter.end - b.filter.start) as usize,
        tokens: (b.tokens.start - b.filter.start) as usize
            ..(b.tokens.end - b.filter.start) as usize,
    })
}

/// Appends records to a segment file.
pub struct Writer {
    pub path: PathBuf,
    file: File,
    len: u64,
}

impl Writer {
    /// Creates a new file (failing if it exists).
    pub fn create(path: &Path) -> std::io::Result<Writer> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(path)?;
        file.write_all(MAGIC)?;
        Ok(Writer {
            path: path.to_owned(),
            file,
            len: 8,
        })
    }

    /// Continues a file whose valid prefix is `valid_len` bytes (cutting the rest).
    pub fn reopen(path: &Path, valid_len: u64) -> std::io::Result<Writer> {
        let file = OpenOptions::new().read(true).append(true).open(path)?;
        if file.metadata()?.len() != valid_len {
            file.set_len(valid_len)?;
            file.sync_data()?;
        }
        Ok(Writer {
            path: path.to_owned(),
            file,
            len: valid_len,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends one record and returns the offset of its payload. A failed write
    /// is cut off again, so the file never keeps half a record it reported lost.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> std::io::Result<u64> {
        let mut rec = Vec::with_capacity(RECORD_HEADER + payload.len());
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc(kind, payload).to_le_bytes());
        rec.push(kind);
        rec.extend_from_slice(payload);
        if let Err(e) = self.file.write_all(&rec) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        let at = self.len + RECORD_HEADER as u64;
        self.len += rec.len() as u64;
        Ok(at)
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// A read handle on the same file.
    pub fn reader(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Writes the seal record and syncs: the file is complete.
    pub fn seal(mut self) -> std::io::Result<()> {
        self.append(KIND_SEAL, &[])?;
        self.file.sync_all()
    }
}
