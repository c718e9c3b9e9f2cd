//! The database: an in-memory head of compressed chunks per series, indexed, with
//! every commit written to the WAL first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::chunk::{AppendError, Chunk, ChunkIter};
use crate::index::{Index, SeriesId};
use crate::labels::{Labels, Matcher};
use crate::wal::{Fsync, Record, Replay, Wal};

#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of the database (the WAL lives in `wal/` below it).
    pub dir: PathBuf,
    pub fsync: Fsync,
    /// Most series the head holds; samples of new series beyond it are rejected.
    pub max_series: usize,
    pub max_label_name_len: usize,
    pub max_label_value_len: usize,
}

impl Options {
    pub fn new(dir: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            fsync: Fsync::default(),
            max_series: 2_000_000,
            max_label_name_len: 1024,
            max_label_value_len: 16 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a sample was not stored. Rejections are counted, never fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Older than the newest sample of its series.
    OutOfOrder,
    /// Same timestamp as the newest sample of its series, with another value.
    /// (The same timestamp with the same value is accepted and ignored, as in Prometheus.)
    DuplicateTimestamp,
    /// A new series while the head holds `max_series`.
    TooManySeries,
    /// A label name or value over its length limit, or no `__name__`.
    BadLabels,
}

impl Reject {
    pub const ALL: [Reject; 4] = [
        Reject::OutOfOrder,
        Reject::DuplicateTimestamp,
        Reject::TooManySeries,
        Reject::BadLabels,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::OutOfOrder => "out_of_order",
            Reject::DuplicateTimestamp => "duplicate_timestamp",
            Reject::TooManySeries => "too_many_series",
            Reject::BadLabels => "bad_labels",
        }
    }
}

/// What a commit did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    pub appended: usize,
    pub new_series: usize,
    pub rejected: Vec<(Reject, usize)>,
}

struct MemSeries {
    labels: Labels,
    closed: Vec<Arc<[u8]>>,
    head: Chunk,
    max_t: i64,
    last_bits: u64,
    /// Equal to `max_t`/`last_bits` except while a commit checks its batch.
    pending_t: i64,
    pending_bits: u64,
}

/// A series' handle for [`Appender::add_ref`]; valid for the life of the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeriesRef(SeriesId);

struct State {
    series: Vec<MemSeries>,
    by_hash: HashMap<u64, Vec<SeriesId>>,
    index: Index,
    /// Set once the log is replayed.
    wal: Option<Wal>,
}

impl State {
    fn lookup(&self, labels: &Labels, hash: u64) -> Option<SeriesId> {
        self.by_hash
            .get(&hash)?
            .iter()
            .copied()
            .find(|&id| self.series[id as usize].labels == *labels)
    }

    fn create(&mut self, labels: Labels, hash: u64) -> SeriesId {
        let id = self.series.len() as SeriesId;
        self.index.add(id, labels.iter());
        self.by_hash.entry(hash).or_default().push(id);
        self.series.push(MemSeries {
            labels,
            closed: Vec::new(),
            head: Chunk::default(),
            max_t: i64::MIN,
            last_bits: 0,
            pending_t: i64::MIN,
            pending_bits: 0,
        });
        id
    }

    fn apply(&mut self, id: SeriesId, t: i64, v: f64) {
        let s = &mut self.series[id as usize];
        if let Err(AppendError::Full) = s.head.append(t, v) {
            let full = std::mem::take(&mut s.head);
            s.closed.push(Arc::from(full.bytes()));
            let _ = s.head.append(t, v);
        }
        s.max_t = t;
        s.last_bits = v.to_bits();
        s.pending_t = t;
        s.pending_bits = v.to_bits();
    }
}

/// Counters of what the database did since it opened.
#[derive(Debug, Default)]
pub struct Stats {
    pub samples_appended: AtomicU64,
    pub series_created: AtomicU64,
    rejected: [AtomicU64; 4],
}

impl Stats {
    pub fn rejected(&self, r: Reject) -> u64 {
        self.rejected[r as usize].load(Ordering::Relaxed)
    }
}

pub struct Db {
    opts: Options,
    state: Mutex<State>,
    pub stats: Stats,
}

/// A series selected by a query, with its chunks; samples decode lazily.
pub struct SeriesData {
    pub labels: Labels,
    chunks: Vec<Arc<[u8]>>,
    mint: i64,
    maxt: i64,
}

impl SeriesData {
    /// Samples with `mint <= t <= maxt`, decoded one at a time.
    pub fn samples(&self) -> impl Iterator<Item = (i64, f64)> + '_ {
        let (mint, maxt) = (self.mint, self.maxt);
        self.chunks
            .iter()
            .flat_map(|c| ChunkIter::from_bytes(c).into_iter().flatten())
            .skip_while(move |(t, _)| *t < mint)
            .take_while(move |(t, _)| *t <= maxt)
    }
}

impl Db {
    /// Opens the database, replaying the WAL. A torn tail is cut (see `Replay`).
    pub fn open(opts: Options) -> Result<(Db, Replay), Error> {
        let wal_dir = opts.dir.join("wal");
        let mut state = State {
            series: Vec::new(),
            by_hash: HashMap::new(),
            index: Index::default(),
            wal: None,
        };
        // Records are applied as they are read: replay holds one segment, not the log.
        let (wal, replay) = Wal::open(&wal_dir, opts.fsync, |r| match r {
            Record::Series { id, labels } => {
                // Ids are dense and logged in order; anything else is skipped.
                if id as usize == state.series.len() {
                    let h = labels.hash64();
                    state.create(labels, h);
                }
            }
            Record::Samples(samples) => {
                for (id, t, v) in samples {
                    if (id as usize) < state.series.len() && t > state.series[id as usize].max_t {
                        state.apply(id, t, v);
                    }
                }
            }
        })
        .map_err(|source| Error::Io {
            path: wal_dir.clone(),
            source,
        })?;
        state.wal = Some(wal);
        Ok((
            Db {
                opts,
                state: Mutex::new(state),
                stats: Stats::default(),
            },
            replay,
        ))
    }

    pub fn appender(&self) -> Appender<'_> {
        Appender {
            db: self,
            batch: Vec::new(),
        }
    }

    /// The reference of an existing series, for [`Appender::add_ref`].
    pub fn series_ref(&self, labels: &Labels) -> Option<SeriesRef> {
        self.state
            .lock()
            .unwrap()
            .lookup(labels, labels.hash64())
            .map(SeriesRef)
    }

    pub fn series_count(&self) -> usize {
        self.state.lock().unwrap().series.len()
    }

    pub fn wal_size(&self) -> u64 {
        self.state
            .lock()
            .unwrap()
            .wal
            .as_ref()
            .map_or(0, Wal::total_size)
    }

    /// Forces the WAL to disk (for `Fsync::Every`, call it on a timer).
    pub fn sync(&self) -> Result<(), Error> {
        self.state
            .lock()
            .unwrap()
            .wal
            .as_mut()
            .map_or(Ok(()), Wal::sync)
            .map_err(|source| Error::Io {
                path: self.opts.dir.join("wal"),
                source,
            })
    }

    /// Series all matchers select that may have samples in `[mint, maxt]`.
    pub fn select(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<SeriesData> {
        let st = self.state.lock().unwrap();
        st.index
            .select(matchers)
            .into_iter()
            .filter_map(|id| {
                let s = &st.series[id as usize];
                if s.max_t < mint {
                    return None;
                }
                let mut chunks = s.closed.clone();
                if !s.head.is_empty() {
                    chunks.push(Arc::from(s.head.bytes()));
                }
                Some(SeriesData {
                    labels: s.labels.clone(),
                    chunks,
                    mint,
                    maxt,
                })
            })
            .collect()
    }

    pub fn label_names(&self) -> Vec<String> {
        self.state.lock().unwrap().index.label_names()
    }

    pub fn label_values(&self, name: &str) -> Vec<String> {
        self.state.lock().unwrap().index.label_values(name)
    }
}

/// Collects samples, then stores them all with one WAL write.
pub struct Appender<'a> {
    db: &'a Db,
    batch: Vec<(Item, i64, f64)>,
}

enum Item {
    Labels(Labels),
    Ref(SeriesId),
}

impl Appender<'_> {
    pub fn add(&mut self, labels: Labels, t: i64, v: f64) {
        self.batch.push((Item::Labels(labels), t, v));
    }

    /// Adds a sample to a series known by its reference (see [`Db::series_ref`]),
    /// skipping the label lookup.
    pub fn add_ref(&mut self, series: SeriesRef, t: i64, v: f64) {
        self.batch.push((Item::Ref(series.0), t, v));
    }

    /// Writes the batch to the WAL (synced per the policy), then to memory.
    /// When this returns `Ok`, the accepted samples are acknowledged.
    pub fn commit(self) -> Result<Committed, Error> {
        let db = self.db;
        let mut st = db.state.lock().unwrap();
        let mut out = Committed::default();
        let mut rejected: HashMap<Reject, usize> = HashMap::new();
        let mut records = Vec::new();
        let mut samples = Vec::with_capacity(self.batch.len());
        // Newest timestamp and value of series created by this batch; existing
        // series track theirs in `pending_t`/`pending_bits` while the batch is checked.
        let mut newest: HashMap<SeriesId, (i64, u64)> = HashMap::new();
        let mut created: Vec<(Labels, u64)> = Vec::new();
        for (item, t, v) in self.batch {
            let id = match item {
                Item::Ref(id) if (id as usize) < st.series.len() => id,
                Item::Ref(_) => {
                    *rejected.entry(Reject::BadLabels).or_default() += 1;
                    continue;
                }
                Item::Labels(labels) => {
                    let bad = labels.get("__name__").is_none()
                        || labels.iter().any(|(n, v)| {
                            n.len() > db.opts.max_label_name_len
                                || v.len() > db.opts.max_label_value_len
                        });
                    if bad {
                        *rejected.entry(Reject::BadLabels).or_default() += 1;
                        continue;
                    }
                    let h = labels.hash64();
                    match st.lookup(&labels, h) {
                        Some(id) => id,
                        None => match created.iter().position(|(l, _)| *l == labels) {
                            Some(i) => (st.series.len() + i) as SeriesId,
                            None => {
                                if st.series.len() + created.len() >= db.opts.max_series {
                                    *rejected.entry(Reject::TooManySeries).or_default() += 1;
                                    continue;
                                }
                                let id = (st.series.len() + created.len()) as SeriesId;
                                records.push(Record::Series {
                                    id,
                                    labels: labels.clone(),
                                });
                                created.push((labels, h));
                                id
                            }
                        },
                    }
                }
            };
            let (last_t, last_bits) = match st.series.get(id as usize) {
                Some(s) => (s.pending_t, s.pending_bits),
                None => newest.get(&id).copied().unwrap_or((i64::MIN, 0)),
            };
            if t < last_t {
                *rejected.entry(Reject::OutOfOrder).or_default() += 1;
                continue;
            }
            if t == last_t {
                if v.to_bits() != last_bits {
                    *rejected.entry(Reject::DuplicateTimestamp).or_default() += 1;
                }
                continue;
            }
            match st.series.get_mut(id as usize) {
                Some(s) => {
                    s.pending_t = t;
                    s.pending_bits = v.to_bits();
                }
                None => {
                    newest.insert(id, (t, v.to_bits()));
                }
            }
            samples.push((id, t, v));
        }
        let n_samples = samples.len();
        if !samples.is_empty() {
            records.push(Record::Samples(samples));
        }
        if let Err(source) = if records.is_empty() {
            Ok(())
        } else {
            st.wal.as_mut().expect("opened").log(&records)
        } {
            // Nothing was stored: forget what the batch would have advanced.
            for s in st.series.iter_mut() {
                s.pending_t = s.max_t;
                s.pending_bits = s.last_bits;
            }
            return Err(Error::Io {
                path: db.opts.dir.join("wal"),
                source,
            });
        }
        let samples = match records.pop() {
            Some(Record::Samples(s)) => s,
            _ => Vec::new(),
        };
        debug_assert_eq!(samples.len(), n_samples);
        out.new_series = created.len();
        for (labels, h) in created {
            st.create(labels, h);
        }
        for (id, t, v) in samples {
            st.apply(id, t, v);
            out.appended += 1;
        }
        db.stats
            .samples_appended
            .fetch_add(out.appended as u64, Ordering::Relaxed);
        db.stats
            .series_created
            .fetch_add(out.new_series as u64, Ordering::Relaxed);
        for (r, n) in &rejected {
            db.stats.rejected[*r as usize].fetch_add(*n as u64, Ordering::Relaxed);
        }
        out.rejected = rejected.into_iter().collect();
        out.rejected.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::MatchOp;

    fn l(name: &str, job: &str) -> Labels {
        Labels::from_pairs([("__name__", name), ("job", job)])
    }

    #[test]
    fn append_select_reject_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = Options::new(dir.path());
        opts.max_series = 3;
        {
            let (db, _) = Db::open(opts.clone()).unwrap();
            let mut a = db.appender();
            for i in 0..500 {
                a.add(l("up", "a"), i * 1000, 1.0);
                a.add(l("up", "b"), i * 1000, 0.0);
                a.add(l("rate", "a"), i * 1000, i as f64 * 0.5);
            }
            a.add(l("up", "a"), 10, 1.0); // out of order
            a.add(l("up", "b"), 499_000, 5.0); // duplicate timestamp, other value
            a.add(l("up", "b"), 499_000, 0.0); // same sample again: ignored
            a.add(l("new", "x"), 1, 1.0); // fourth series
            a.add(Labels::from_pairs([("job", "x")]), 1, 1.0); // no name
            let c = a.commit().unwrap();
            assert_eq!(c.appended, 1500);
            assert_eq!(c.new_series, 3);
            assert_eq!(
                c.rejected,
                vec![
                    (Reject::OutOfOrder, 1),
                    (Reject::DuplicateTimestamp, 1),
                    (Reject::TooManySeries, 1),
                    (Reject::BadLabels, 1)
                ]
            );
            let sel = db.select(
                &[
                    Matcher::eq("__name__", "up"),
                    Matcher::new("job", MatchOp::Regex, "a|c").unwrap(),
                ],
                100_000,
                199_000,
            );
            assert_eq!(sel.len(), 1);
            assert_eq!(sel[0].samples().count(), 100);
        }
        let (db, replay) = Db::open(opts).unwrap();
        assert!(replay.truncated.is_none());
        assert_eq!(db.series_count(), 3);
        let sel = db.select(&[Matcher::eq("__name__", "rate")], i64::MIN, i64::MAX);
        let got: Vec<(i64, f64)> = sel[0].samples().collect();
        assert_eq!(got.len(), 500);
        assert_eq!(got[499], (499_000, 249.5));
        assert_eq!(db.label_values("job"), vec!["a", "b"]);
    }
}
