//! The first log store: JSON-lines segment files per replica with size-based
//! rotation and a total size cap, plus a broadcast of new records for followers.
//!
//! Layout: `<dir>/<service>/<replica>/<segment id, 12 digits>.jsonl`. Segment ids
//! increase across the whole store, so the smallest id is the oldest segment.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{LogQuery, LogRecord, Stream};

/// One line of a segment file. Service and replica come from the file's path.
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    t: i64,
    s: char,
    q: u64,
    #[serde(borrow)]
    l: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    p: bool,
}

struct Writer {
    file: File,
    seg: u64,
    size: u64,
    seq: u64,
}

struct Inner {
    writers: HashMap<(String, u32), Writer>,
    /// Every segment on disk: id → (path, size).
    segments: BTreeMap<u64, (PathBuf, u64)>,
    next_seg: u64,
    total: u64,
}

pub struct FileStore {
    dir: PathBuf,
    max_segment: u64,
    max_total: u64,
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<LogRecord>>,
}

fn seg_path(dir: &Path, service: &str, replica: u32, seg: u64) -> PathBuf {
    dir.join(service)
        .join(replica.to_string())
        .join(format!("{seg:012}.jsonl"))
}

fn seg_id(p: &Path) -> Option<u64> {
    p.file_name()?
        .to_str()?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// Segment files of one replica, oldest first.
fn replica_segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let p = e.ok()?.path();
            Some((seg_id(&p)?, p))
        })
        .collect();
    out.sort();
    out
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_type()
                .ok()?
                .is_dir()
                .then(|| Some((e.file_name().to_str()?.to_owned(), e.path())))?
        })
        .collect();
    out.sort();
    out
}

fn parse_line(text: &str, service: &str, replica: u32) -> Option<LogRecord> {
    let l: Line = serde_json::from_str(text).ok()?;
    Some(LogRecord {
        ts_ns: l.t,
        service: service.to_owned(),
        replica,
        stream: match l.s {
            'e' => Stream::Stderr,
            'p' => Stream::Proxy,
            _ => Stream::Stdout,
        },
        seq: l.q,
        line: l.l.into_owned(),
        partial: l.p,
    })
}

fn read_segment(p: &Path, service: &str, replica: u32) -> Vec<LogRecord> {
    let Ok(f) = File::open(p) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| parse_line(&l, service, replica))
        .collect()
}

/// Sequence number of the last complete record in a segment (a torn last line is ignored).
fn last_seq(p: &Path) -> Option<u64> {
    let mut f = File::open(p).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(super::capture::MAX_LINE as u64 * 8);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Line>(l).ok().map(|l| l.q))
}

impl FileStore {
    pub fn open(dir: &Path, max_segment: u64, max_total: u64) -> std::io::Result<FileStore> {
        fs::create_dir_all(dir)?;
        let mut segments = BTreeMap::new();
        for (_, sdir) in subdirs(dir) {
            for (_, rdir) in subdirs(&sdir) {
                for (id, p) in replica_segments(&rdir) {
                    let size = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    segments.insert(id, (p, size));
                }
            }
        }
        let next_seg = segments.keys().next_back().map_or(1, |m| m + 1);
        let total = segments.values().map(|(_, s)| s).sum();
        Ok(FileStore {
            dir: dir.to_path_buf(),
            max_segment: max_segment.max(1024),
            max_total: max_total.max(4096),
            inner: Mutex::new(Inner {
                writers: HashMap::new(),
                segments,
                next_seg,
                total,
            }),
            tx: broadcast::channel(4096).0,
        })
    }

    fn new_segment(
        &self,
        inner: &mut Inner,
        service: &str,
        replica: u32,
    ) -> std::io::Result<(File, u64)> {
        let seg = inner.next_seg;
        inner.next_seg += 1;
        let p = seg_path(&self.dir, service, replica, seg);
        fs::create_dir_all(p.parent().unwrap_or(&self.dir))?;
        let f = OpenOptions::new().create(true).append(true).open(&p)?;
        inner.segments.insert(seg, (p, 0));
        Ok((f, seg))
    }

    fn writer<'a>(
        &self,
        inner: &'a mut Inner,
        service: &str,
        replica: u32,
    ) -> std::io::Result<&'a mut Writer> {
        let key = (service.to_owned(), replica);
        if !inner.writers.contains_key(&key) {
            let rdir = self.dir.join(service).join(replica.to_string());
            let existing = replica_segments(&rdir);
            let seq = existing
                .iter()
                .rev()
                .find_map(|(_, p)| last_seq(p))
                .unwrap_or(0);
            let (file, seg, size) = match existing.last() {
                Some((id, p))
                    if fs::metadata(p).map(|m| m.len()).unwrap_or(u64::MAX) < self.max_segment =>
                {
                    let f = OpenOptions::new().append(true).open(p)?;
                    (f, *id, fs::metadata(p)?.len())
                }
                _ => {
                    let (f, id) = self.new_segment(inner, service, replica)?;
                    (f, id, 0)
                }
            };
            inner.writers.insert(
                key.clone(),
                Writer {
                    file,
                    seg,
                    size,
                    seq,
                },
            );
        }
        Ok(inner.writers.get_mut(&key).expect("inserted above"))
    }

    /// Appends one line of a replica's output and returns the stored record.
    pub fn append(
        &self,
        service: &str,
        replica: u32,
        stream: Stream,
        line: String,
        partial: bool,
    ) -> std::io::Result<Arc<LogRecord>> {
        let mut recs = self.append_many(service, stream, [(replica, line, partial)])?;
        Ok(recs.pop().expect("one line in, one record out"))
    }

    /// Appends lines of one service's replicas in one write per segment file
    /// (the proxy's access log comes in batches).
    pub fn append_many(
        &self,
        service: &str,
        stream: Stream,
        lines: impl IntoIterator<Item = (u32, String, bool)>,
    ) -> std::io::Result<Vec<Arc<LogRecord>>> {
        let ts_ns = super::now_ns();
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        let mut pending: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut recs = Vec::new();
        let result = (|| {
            for (replica, line, partial) in lines {
                let w = self.writer(inner, service, replica)?;
                w.seq += 1;
                let rec = Arc::new(LogRecord {
                    ts_ns,
                    service: service.to_owned(),
                    replica,
                    stream,
                    seq: w.seq,
                    line,
                    partial,
                });
                let i = match pending.iter().position(|(r, _)| *r == replica) {
                    Some(i) => i,
                    None => {
                        pending.push((replica, Vec::new()));
                        pending.len() - 1
                    }
                };
                let buf = &mut pending[i].1;
                serde_json::to_writer(
                    &mut *buf,
                    &Line {
                        t: ts_ns,
                        s: match stream {
                            Stream::Stdout => 'o',
                            Stream::Stderr => 'e',
                            Stream::Proxy => 'p',
                        },
                        q: w.seq,
                        l: std::borrow::Cow::Borrowed(&rec.line),
                        p: partial,
                    },
                )?;
                buf.push(b'\n');
                if w.size + buf.len() as u64 >= self.max_segment {
                    let buf = std::mem::take(buf);
                    self.write_out(inner, service, replica, &buf)?;
                }
                recs.push(rec);
            }
            for (replica, buf) in &pending {
                if !buf.is_empty() {
                    self.write_out(inner, service, *replica, buf)?;
                }
            }
            Ok(())
        })();
        // Sent under the lock so followers see records in sequence order.
        for rec in &recs {
            let _ = self.tx.send(rec.clone());
        }
        result.map(|()| recs)
    }

    /// Writes a replica's encoded lines, rotating its segment when it is full.
    fn write_out(
        &self,
        inner: &mut Inner,
        service: &str,
        replica: u32,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        let w = self.writer(inner, service, replica)?;
        w.file.write_all(bytes)?;
        w.size += bytes.len() as u64;
        let (seg, size) = (w.seg, w.size);
        if let Some(s) = inner.segments.get_mut(&seg) {
            s.1 = size;
        }
        inner.total += bytes.len() as u64;
        if size >= self.max_segment {
            let (file, id) = self.new_segment(inner, service, replica)?;
            let w = inner
                .writers
                .get_mut(&(service.to_owned(), replica))
                .expect("writer exists");
            w.file = file;
            w.seg = id;
            w.size = 0;
            self.enforce_cap(inner);
        }
        Ok(())
    }

    /// Deletes the oldest segments until the store fits its cap; open segments stay.
    fn enforce_cap(&self, inner: &mut Inner) {
        let open: Vec<u64> = inner.writers.values().map(|w| w.seg).collect();
        while inner.total > self.max_total {
            let Some((&id, _)) = inner.segments.iter().find(|(id, _)| !open.contains(id)) else {
                break;
            };
            let (p, size) = inner.segments.remove(&id).expect("found above");
            let _ = fs::remove_file(&p);
            inner.total = inner.total.saturating_sub(size);
        }
    }

    /// Forgets the writer of a replica that went away (its files stay).
    pub fn close(&self, service: &str, replica: u32) {
        self.inner
            .lock()
            .unwrap()
            .writers
            .remove(&(service.to_owned(), replica));
    }

    /// Subscribes and reads history under one lock, so a follower misses nothing
    /// and sees nothing twice.
    pub fn query_and_subscribe(
        &self,
        q: &LogQuery,
    ) -> (Vec<LogRecord>, broadcast::Receiver<Arc<LogRecord>>) {
        let _guard = self.inner.lock().unwrap();
        let rx = self.tx.subscribe();
        (self.query_unlocked(q), rx)
    }

    pub fn query(&self, q: &LogQuery) -> Vec<LogRecord> {
        let _guard = self.inner.lock().unwrap();
        self.query_unlocked(q)
    }

    /// What a follower that fell behind missed: records the query selects that come
    /// after the last sequence number `sent` per replica (replicas not in `sent`,
    /// new ones, from their start), in time order.
    pub fn catch_up(&self, q: &LogQuery, sent: &BTreeMap<(String, u32), u64>) -> Vec<LogRecord> {
        let mut missed = Vec::new();
        for (service, replica) in self.replicas(q) {
            let seq = sent.get(&(service.clone(), replica)).copied().unwrap_or(0);
            missed.extend(
                self.after(&service, replica, seq)
                    .into_iter()
                    .filter(|r| q.since_ns.is_none_or(|s| r.ts_ns >= s)),
            );
        }
        missed.sort_by(|a, b| {
            (a.ts_ns, &a.service, a.replica, a.seq).cmp(&(b.ts_ns, &b.service, b.replica, b.seq))
        });
        missed
    }

    /// The replicas with stored output that a query selects.
    fn replicas(&self, q: &LogQuery) -> Vec<(String, u32)> {
        let _guard = self.inner.lock().unwrap();
        let mut out = Vec::new();
        for (service, sdir) in subdirs(&self.dir) {
            for (rname, _) in subdirs(&sdir) {
                if let Ok(replica) = rname.parse::<u32>()
                    && q.wants(&service, replica)
                {
                    out.push((service.clone(), replica));
                }
            }
        }
        out
    }

    /// Records after the given sequence number of one replica (to catch up after lag).
    pub fn after(&self, service: &str, replica: u32, seq: u64) -> Vec<LogRecord> {
        let _guard = self.inner.lock().unwrap();
        let rdir = self.dir.join(service).join(replica.to_string());
        let mut out = Vec::new();
        for (_, p) in replica_segments(&rdir).iter().rev() {
            let recs = read_segment(p, service, replica);
            let done = recs.first().is_some_and(|r| r.seq <= seq);
            out.splice(0..0, recs.into_iter().filter(|r| r.seq > seq));
            if done {
                break;
            }
        }
        out
    }

    fn query_unlocked(&self, q: &LogQuery) -> Vec<LogRecord> {
        let mut all = Vec::new();
        for (service, sdir) in subdirs(&self.dir) {
            for (rname, rdir) in subdirs(&sdir) {
                let Ok(replica) = rname.parse::<u32>() else {
                    continue;
                };
                if !q.wants(&service, replica) {
                    continue;
                }
                let mut recs: Vec<LogRecord> = Vec::new();
                // Newest segment first; stop once the tail or the since bound is covered.
                for (_, p) in replica_segments(&rdir).iter().rev() {
                    let seg = read_segment(p, &service, replica);
                    let oldest = seg.first().map(|r| r.ts_ns);
                    recs.splice(0..0, seg);
                    if q.tail.is_some_and(|t| recs.len() >= t)
                        || q.since_ns.zip(oldest).is_some_and(|(s, o)| o < s)
                    {
                        break;
                    }
                }
                if let Some(since) = q.since_ns {
                    recs.retain(|r| r.ts_ns >= since);
                }
                if let Some(t) = q.tail {
                    let skip = recs.len().saturating_sub(t);
                    recs.drain(..skip);
                }
                all.extend(recs);
            }
        }
        all.sort_by(|a, b| {
            (a.ts_ns, &a.service, a.replica, a.seq).cmp(&(b.ts_ns, &b.service, b.replica, b.seq))
        });
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_caps_and_continues_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), 1024, 8 * 1024).unwrap();
        for i in 0..400 {
            store
                .append(
                    "web",
                    i % 2,
                    Stream::Stdout,
                    format!("line {i:04} {}", "x".repeat(40)),
                    false,
                )
                .unwrap();
        }
        let segs = replica_segments(&dir.path().join("web/0"));
        assert!(segs.len() > 2, "rotated into several segments");
        let total: u64 = fs::read_dir(dir.path().join("web/0"))
            .unwrap()
            .chain(fs::read_dir(dir.path().join("web/1")).unwrap())
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            total <= 8 * 1024 + 2 * 1024,
            "total {total} is near the cap"
        );
        let last = store.query(&LogQuery {
            tail: Some(3),
            replica: Some(0),
            ..Default::default()
        });
        assert_eq!(
            last.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [198, 199, 200]
        );
        drop(store);
        // Reopened, sequences continue where they stopped.
        let store = FileStore::open(dir.path(), 1024, 8 * 1024).unwrap();
        let r = store
            .append("web", 0, Stream::Stderr, "again".into(), false)
            .unwrap();
        assert_eq!(r.seq, 201);
        // A follower that saw web/0 up to 199 and web/1 not at all catches up with
        // web/0's rest and all of web/1, in time order.
        let sent = BTreeMap::from([(("web".to_string(), 0), 199)]);
        let missed = store.catch_up(
            &LogQuery {
                services: vec!["web".into()],
                ..Default::default()
            },
            &sent,
        );
        assert_eq!(
            missed
                .iter()
                .filter(|r| r.replica == 0)
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            [200, 201]
        );
        let web1: Vec<u64> = missed
            .iter()
            .filter(|r| r.replica == 1)
            .map(|r| r.seq)
            .collect();
        assert_eq!(web1.last(), Some(&200));
        assert!(
            web1.windows(2).all(|w| w[1] == w[0] + 1),
            "no gaps in what the cap kept"
        );
        assert!(missed.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));
        let after = store.after("web", 0, 199);
        assert_eq!(after.iter().map(|r| r.seq).collect::<Vec<_>>(), [200, 201]);
    }
}
