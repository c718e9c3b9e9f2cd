//! The write-ahead log: segment files of checksummed records. A torn or corrupted
//! tail is cut off at the last good record when the log is opened.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::labels::Labels;

/// When appended records are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before every commit returns: nothing acknowledged is ever lost.
    Always,
    /// At most this long after a commit (the default, 1s): a machine crash loses at most that much.
    Every(Duration),
    /// Left to the operating system.
    Never,
}

impl Default for Fsync {
    fn default() -> Self {
        Fsync::Every(Duration::from_secs(1))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Series { id: u32, labels: Labels },
    Samples(Vec<(u32, i64, f64)>),
}

const SERIES: u8 = 1;
const SAMPLES: u8 = 2;
const HEADER: usize = 8;
/// A segment is closed once it grows past this size.
pub const SEGMENT_SIZE: u64 = 64 << 20;

pub fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn get_uvarint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

fn get_bytes<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = get_uvarint(b, pos)? as usize;
    let out = b.get(*pos..pos.checked_add(len)?)?;
    *pos += len;
    Some(out)
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        match self {
            Record::Series { id, labels } => {
                out.push(SERIES);
                put_uvarint(out, u64::from(*id));
                put_uvarint(out, labels.len() as u64);
                for (n, v) in labels.iter() {
                    put_uvarint(out, n.len() as u64);
                    out.extend_from_slice(n.as_bytes());
                    put_uvarint(out, v.len() as u64);
                    out.extend_from_slice(v.as_bytes());
                }
            }
            Record::Samples(samples) => {
                out.push(SAMPLES);
                put_uvarint(out, samples.len() as u64);
                for (id, t, v) in samples {
                    put_uvarint(out, u64::from(*id));
                    put_uvarint(out, ((t << 1) ^ (t >> 63)) as u64);
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        let body_len = (out.len() - start - HEADER) as u32;
        let crc = crc32fast::hash(&out[start + HEADER..]);
        out[start..start + 4].copy_from_slice(&body_len.to_be_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    }

    fn decode(body: &[u8]) -> Option<Record> {
        let (&kind, b) = body.split_first()?;
        let mut pos = 0;
        let rec = match kind {
            SERIES => {
                let id = u32::try_from(get_uvarint(b, &mut pos)?).ok()?;
                let n = get_uvarint(b, &mut pos)? as usize;
                let mut pairs = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    let name = std::str::from_utf8(get_bytes(b, &mut pos)?).ok()?;
                    let value = std::str::from_utf8(get_bytes(b, &mut pos)?).ok()?;
                    pairs.push((name.to_owned(), value.to_owned()));
                }
                Record::Series {
                    id,
                    labels: Labels::new(pairs),
                }
            }
            SAMPLES => {
                let n = get_uvarint(b, &mut pos)? as usize;
                let mut samples = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    let id = u32::try_from(get_uvarint(b, &mut pos)?).ok()?;
                    let z = get_uvarint(b, &mut pos)?;
                    let t = ((z >> 1) as i64) ^ -((z & 1) as i64);
                    let v = f64::from_le_bytes(b.get(pos..pos + 8)?.try_into().ok()?);
                    pos += 8;
                    samples.push((id, t, v));
                }
                Record::Samples(samples)
            }
            _ => return None,
        };
        (pos == b.len()).then_some(rec)
    }
}

fn encode_all(records: &[Record]) -> Vec<u8> {
    let mut buf = Vec::new();
    for r in records {
        r.encode(&mut buf);
    }
    buf
}

pub struct Wal {
    dir: PathBuf,
    segment: u64,
    file: File,
    size: u64,
    total: u64,
    fsync: Fsync,
    last_sync: Instant,
    dirty: bool,
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Replay {
    pub records: usize,
    /// Set when a torn or corrupted tail was cut off: what and where.
    pub truncated: Option<String>,
    /// Samples left out for being further ahead of the wall clock than the
    /// database accepts.
    pub future_dropped: usize,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

impl Wal {
    /// Opens (or creates) the log in `dir`, calling `apply` for every good record
    /// in order. A bad record ends the log: it and everything after it is removed.
    pub fn open(
        dir: &Path,
        fsync: Fsync,
        mut apply: impl FnMut(Record),
    ) -> io::Result<(Wal, Replay)> {
        fs::create_dir_all(dir)?;
        let segs = segments(dir)?;
        let mut replay = Replay::default();
        let mut total = 0;
        let mut last = 1;
        for (i, &n) in segs.iter().enumerate() {
            let path = segment_path(dir, n);
            let data = fs::read(&path)?;
            let mut pos = 0;
            let mut bad = None;
            while pos < data.len() {
                let Some(h) = data.get(pos..pos + HEADER) else {
                    bad = Some("a record header is cut short");
                    break;
                };
                let len = u32::from_be_bytes(h[..4].try_into().expect("4 bytes")) as usize;
                let crc = u32::from_be_bytes(h[4..].try_into().expect("4 bytes"));
                let Some(body) = data.get(pos + HEADER..pos + HEADER + len) else {
                    bad = Some("a record is cut short");
                    break;
                };
                if crc32fast::hash(body) != crc {
                    bad = Some("a record's checksum does not match");
                    break;
                }
                let Some(rec) = Record::decode(body) else {
                    bad = Some("a record cannot be decoded");
                    break;
                };
                apply(rec);
                replay.records += 1;
                pos += HEADER + len;
            }
            last = n;
            total += pos as u64;
            if let Some(why) = bad {
                let cut = data.len() - pos;
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(pos as u64)?;
                let later = &segs[i + 1..];
                for &m in later {
                    fs::remove_file(segment_path(dir, m))?;
                }
                replay.truncated = Some(format!(
                    "WAL segment {n:08}: {why} at byte {pos}; cut {cut} bytes{}",
                    if later.is_empty() {
                        String::new()
                    } else {
                        format!(" and removed {} later segments", later.len())
                    }
                ));
                break;
            }
        }
        let path = segment_path(dir, last);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok((
            Wal {
                dir: dir.to_path_buf(),
                segment: last,
                file,
                size,
                total,
                fsync,
                last_sync: Instant::now(),
                dirty: false,
            },
            replay,
        ))
    }

    /// Syncs and closes the current segment and starts the next one.
    fn next_segment(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        self.segment += 1;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, self.segment))?;
        self.size = 0;
        Ok(())
    }

    /// Appends records in one write; syncs as the policy says.
    pub fn log(&mut self, records: &[Record]) -> io::Result<()> {
        let buf = encode_all(records);
        if self.size > 0 && self.size + buf.len() as u64 > SEGMENT_SIZE {
            self.next_segment()?;
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        self.total += buf.len() as u64;
        self.dirty = true;
        match self.fsync {
            Fsync::Always => self.sync()?,
            Fsync::Every(d) if self.last_sync.elapsed() >= d => self.sync()?,
            _ => {}
        }
        Ok(())
    }

    /// Starts a new segment holding `records` (a snapshot of what is still only
    /// in memory), syncs it, then deletes every older segment. A crash in between
    /// leaves old and new segments, whose replay gives the same state.
    pub fn checkpoint(&mut self, records: &[Record]) -> io::Result<()> {
        let old = self.segment;
        self.next_segment()?;
        let buf = encode_all(records);
        self.file.write_all(&buf)?;
        self.file.sync_all()?;
        self.size = buf.len() as u64;
        for n in segments(&self.dir)? {
            if n <= old {
                fs::remove_file(segment_path(&self.dir, n))?;
            }
        }
        File::open(&self.dir)?.sync_all()?;
        self.total = self.size;
        self.dirty = false;
        Ok(())
    }

    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.file.sync_data()?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Bytes in all segments.
    pub fn total_size(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(id: u32) -> Record {
        Record::Series {
            id,
            labels: Labels::from_pairs([("__name__", "up"), ("job", "x")]),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let recs = vec![
            series(0),
            Record::Samples(vec![(0, -5, f64::NAN), (0, 1_700_000_000_000, 1.5)]),
            series(1),
        ];
        {
            let (mut wal, replay) = Wal::open(dir.path(), Fsync::Always, |_| {}).unwrap();
            assert_eq!(replay.records, 0);
            wal.log(&recs).unwrap();
        }
        let seg = segment_path(dir.path(), 1);
        let good = fs::metadata(&seg).unwrap().len();
        // A torn write: half a record at the end.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0, 0, 0, 40, 1, 2, 3]).unwrap();
        drop(f);
        let mut got = Vec::new();
        let (mut wal, replay) = Wal::open(dir.path(), Fsync::Always, |r| got.push(r)).unwrap();
        assert_eq!(got.len(), 3);
        assert!(
            matches!(&got[1], Record::Samples(s) if s[0].2.is_nan() && s[1] == (0, 1_700_000_000_000, 1.5))
        );
        assert!(replay.truncated.unwrap().contains("cut 7 bytes"));
        assert_eq!(fs::metadata(&seg).unwrap().len(), good);
        // Appending continues after the cut.
        wal.log(&[series(2)]).unwrap();
        drop(wal);
        // A flipped bit in the middle: everything from that record on is dropped.
        let mut data = fs::read(&seg).unwrap();
        let mid = good as usize - 3;
        data[mid] ^= 0x40;
        fs::write(&seg, &data).unwrap();
        let mut n = 0;
        let (_, replay) = Wal::open(dir.path(), Fsync::Never, |_| n += 1).unwrap();
        assert_eq!(n, 2);
        assert!(replay.truncated.unwrap().contains("checksum"));
    }
}
