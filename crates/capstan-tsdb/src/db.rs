//! The database: an in-memory head of compressed chunks per series, indexed, with
//! every commit written to the WAL first.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::block::{self, Block, SeriesChunks, TimedChunk};
use crate::chunk::{Chunk, ChunkIter, Decoded, MAX_SAMPLES};
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
    /// Time range of the blocks the head is cut into (default 2h).
    pub block_range_ms: i64,
    /// Blocks entirely older than this before the newest sample are deleted (default 15d).
    pub retention_ms: i64,
    /// Oldest blocks are deleted while the blocks take more bytes than this.
    pub retention_bytes: Option<u64>,
    /// Samples more than this ahead of the wall clock are rejected
    /// (`too_far_in_future`), and dropped from the WAL on replay, so one sample
    /// from a wrong clock cannot move the head, cut blocks at future boundaries
    /// or make retention delete data. `None`: no bound (tools, tests).
    pub max_future_ms: Option<i64>,
    /// Samples older than the retention before the wall clock are rejected
    /// (`too_old`): they would be deleted at once.
    pub reject_older_than_retention: bool,
    /// A sample older than its series' newest is still accepted when it is at
    /// most this much older (Prometheus' `out_of_order_time_window`, for
    /// remote_write senders that retry or shard) and newer than what the blocks
    /// hold; 0 refuses every such sample (`out_of_order`).
    pub out_of_order_window_ms: i64,
}

/// The wall clock in milliseconds since 1970.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Options {
    /// The newest and oldest sample times accepted at `now`.
    fn valid_times(&self, now: i64) -> (i64, i64) {
        let newest = self
            .max_future_ms
            .map_or(i64::MAX, |f| now.saturating_add(f));
        let oldest = if self.reject_older_than_retention {
            now.saturating_sub(self.retention_ms)
        } else {
            i64::MIN
        };
        (newest, oldest)
    }

    pub fn new(dir: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            fsync: Fsync::default(),
            max_series: 2_000_000,
            max_label_name_len: 1024,
            max_label_value_len: 16 * 1024,
            block_range_ms: 2 * 3_600_000,
            retention_ms: 15 * 86_400_000,
            retention_bytes: None,
            max_future_ms: Some(10 * 60_000),
            reject_older_than_retention: false,
            out_of_order_window_ms: 0,
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
    /// More than `max_future_ms` ahead of the wall clock.
    TooFarInFuture,
    /// Older than the retention before the wall clock.
    TooOld,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::OutOfOrder,
        Reject::DuplicateTimestamp,
        Reject::TooManySeries,
        Reject::BadLabels,
        Reject::TooFarInFuture,
        Reject::TooOld,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::OutOfOrder => "out_of_order",
            Reject::DuplicateTimestamp => "duplicate_timestamp",
            Reject::TooManySeries => "too_many_series",
            Reject::BadLabels => "bad_labels",
            Reject::TooFarInFuture => "too_far_in_future",
            Reject::TooOld => "too_old",
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
    /// Full chunks still in memory, with their first and last timestamps.
    closed: Vec<TimedChunk>,
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
    /// Label-set hash → series; hashes of more than one series go to `by_hash_more`.
    by_hash: crate::fxhash::FxHashMap<u64, SeriesId>,
    by_hash_more: crate::fxhash::FxHashMap<u64, Vec<SeriesId>>,
    index: Index,
    /// Set once the log is replayed.
    wal: Option<Wal>,
    /// On-disk blocks, oldest first.
    blocks: Vec<Arc<Block>>,
    /// Every sample before this time is in the blocks, none in the head.
    persisted_until: i64,
    /// Label names and values, shared by all series.
    symbols: crate::fxhash::FxHashSet<Arc<str>>,
}

impl State {
    fn lookup(&self, labels: &Labels, hash: u64) -> Option<SeriesId> {
        let first = *self.by_hash.get(&hash)?;
        if self.series[first as usize].labels == *labels {
            return Some(first);
        }
        self.by_hash_more
            .get(&hash)?
            .iter()
            .copied()
            .find(|&id| self.series[id as usize].labels == *labels)
    }

    fn create(&mut self, labels: Labels, hash: u64) -> SeriesId {
        let labels = labels.interned(&mut self.symbols);
        let id = self.series.len() as SeriesId;
        self.index.add(id, labels.iter());
        // The first series of a hash goes in `by_hash`, any other in `by_hash_more`.
        if let std::collections::hash_map::Entry::Vacant(slot) = self.by_hash.entry(hash) {
            slot.insert(id);
        } else {
            self.by_hash_more.entry(hash).or_default().push(id);
        }
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

    /// The value bits of the head's sample of series `id` at `t`, if it has one.
    fn sample_at(&self, id: SeriesId, t: i64) -> Option<u64> {
        let s = self.series.get(id as usize)?;
        let in_closed = s
            .closed
            .iter()
            .filter(|c| c.1 <= t && t <= c.2)
            .flat_map(|c| ChunkIter::from_bytes(&c.0).into_iter().flatten());
        in_closed
            .chain(s.head.iter())
            .find(|p| p.0 == t)
            .map(|p| p.1.to_bits())
    }

    /// Puts a sample older than the series' newest into its place: the chunks
    /// from the one it falls in onwards are written again with it (the window
    /// bounds how far back that is).
    fn insert_out_of_order(&mut self, id: SeriesId, t: i64, v: f64) {
        let s = &mut self.series[id as usize];
        let keep = s
            .closed
            .iter()
            .position(|c| c.2 >= t)
            .unwrap_or(s.closed.len());
        let mut samples: Vec<(i64, f64)> = s.closed[keep..]
            .iter()
            .flat_map(|c| ChunkIter::from_bytes(&c.0).into_iter().flatten())
            .chain(s.head.iter())
            .collect();
        let at = samples.partition_point(|p| p.0 < t);
        if samples.get(at).is_some_and(|p| p.0 == t) {
            return;
        }
        samples.insert(at, (t, v));
        s.closed.truncate(keep);
        let mut groups = samples.chunks(HEAD_CHUNK_SAMPLES).peekable();
        let mut head = Chunk::default();
        while let Some(g) = groups.next() {
            if groups.peek().is_none() {
                for (t, v) in g {
                    let _ = head.append(*t, *v);
                }
            } else {
                s.closed.extend(encode(g.iter()));
            }
        }
        s.head = head;
    }

    fn apply(&mut self, id: SeriesId, t: i64, v: f64) {
        let s = &mut self.series[id as usize];
        if t < s.max_t {
            self.insert_out_of_order(id, t, v);
            return;
        }
        if s.head.len() >= HEAD_CHUNK_SAMPLES {
            let full = std::mem::take(&mut s.head);
            let (mint, maxt) = full.first_last().unwrap_or((t, t));
            s.closed.push((full.shared_bytes(), mint, maxt));
        }
        let _ = s.head.append(t, v);
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
    rejected: [AtomicU64; Reject::ALL.len()],
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
    /// Set by [`Db::select_last`]: the series' last sample in the range, instead of chunks.
    last: Option<(i64, f64)>,
    mint: i64,
    maxt: i64,
}

impl SeriesData {
    /// Samples with `mint <= t <= maxt`, decoded one at a time.
    pub fn samples(&self) -> impl Iterator<Item = (i64, f64)> + '_ {
        let (mint, maxt) = (self.mint, self.maxt);
        // With `last` set there are no chunks.
        self.last.into_iter().chain(
            self.chunks
                .iter()
                .flat_map(|c| ChunkIter::from_bytes(c).into_iter().flatten())
                .skip_while(move |(t, _)| *t < mint)
                .take_while(move |(t, _)| *t <= maxt),
        )
    }

    /// Appends the same samples to `out`, decoding chunk after chunk in one loop.
    pub fn read_into(&self, out: &mut Vec<(i64, f64)>) {
        if let Some(last) = self.last {
            out.push(last);
            return;
        }
        // At most every sample of the chunks (each chunk starts with its count).
        let most: usize = self
            .chunks
            .iter()
            .map(|c| crate::chunk::sample_count(c).map_or(0, usize::from))
            .sum();
        out.reserve(most);
        for c in &self.chunks {
            if crate::chunk::decode_into(c, self.mint, self.maxt, out) == Decoded::PastEnd {
                return;
            }
        }
    }
}

impl Db {
    /// Opens the database, replaying the WAL. A torn tail is cut (see `Replay`).
    pub fn open(opts: Options) -> Result<(Db, Replay), Error> {
        let wal_dir = opts.dir.join("wal");
        let blocks_dir = opts.dir.join("blocks");
        let blocks = open_blocks(&blocks_dir).map_err(|source| Error::Io {
            path: blocks_dir.clone(),
            source,
        })?;
        let persisted_until = blocks
            .iter()
            .map(|b| b.meta.boundary)
            .max()
            .unwrap_or(i64::MIN);
        let mut state = State {
            series: Vec::new(),
            by_hash: Default::default(),
            by_hash_more: Default::default(),
            index: Index::default(),
            wal: None,
            blocks,
            persisted_until,
            symbols: Default::default(),
        };
        // Samples from a wrong clock, logged before the bound existed, are left out.
        let (newest_ok, _) = opts.valid_times(now_ms());
        let window = opts.out_of_order_window_ms;
        let mut future = 0usize;
        // Records are applied as they are read: replay holds one segment, not the log.
        let (wal, mut replay) = Wal::open(&wal_dir, opts.fsync, |r| match r {
            Record::Series { id, labels } => {
                // Ids are dense and logged in order; anything else is skipped.
                if id as usize == state.series.len() {
                    let h = labels.hash64();
                    state.create(labels, h);
                }
            }
            Record::Samples(samples) => {
                for (id, t, v) in samples {
                    if t > newest_ok {
                        future += 1;
                        continue;
                    }
                    let Some(max_t) = state.series.get(id as usize).map(|s| s.max_t) else {
                        continue;
                    };
                    let fresh = t > max_t;
                    let late_ok = window > 0
                        && t < max_t
                        && t >= max_t.saturating_sub(window)
                        && state.sample_at(id, t).is_none();
                    if (fresh || late_ok) && t >= persisted_until {
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
        replay.future_dropped = future;
        Ok((
            Db {
                opts,
                state: Mutex::new(state),
                stats: Stats::default(),
            },
            replay,
        ))
    }

    /// Cuts the head's old samples into a block once the head spans 1.5 block
    /// ranges, checkpoints the WAL, and applies retention. Call it periodically.
    pub fn maintain(&self) -> Result<Maintained, Error> {
        let mut st = self.state.lock().unwrap();
        let mut done = Maintained::default();
        // Cuts and retention follow the data held, but never run ahead of the
        // wall clock (plus the accepted skew).
        let (newest_ok, _) = self.opts.valid_times(now_ms());
        let head_max = st
            .series
            .iter()
            .map(|s| s.max_t)
            .max()
            .unwrap_or(i64::MIN)
            .min(newest_ok);
        let head_min = st
            .series
            .iter()
            .filter_map(|s| {
                s.closed
                    .first()
                    .map(|c| c.1)
                    .or_else(|| s.head.first_last().map(|f| f.0))
            })
            .min()
            .unwrap_or(i64::MAX);
        let range = self.opts.block_range_ms.max(1);
        if head_max != i64::MIN && head_max.saturating_sub(head_min) > range + range / 2 {
            let boundary = (head_max - range / 2).div_euclid(range) * range;
            if boundary > head_min && boundary > st.persisted_until {
                done.block = Some(self.cut(&mut st, boundary)?);
            }
        }
        done.compacted = self.compact(&mut st)?;
        // Retention by time, then by size; never the newest block.
        let blocks_dir = self.opts.dir.join("blocks");
        let io = |source| Error::Io {
            path: blocks_dir.clone(),
            source,
        };
        while st.blocks.len() > 1
            && st.blocks[0].meta.boundary < head_max.saturating_sub(self.opts.retention_ms)
        {
            let b = st.blocks.remove(0);
            delete_block(&b.dir).map_err(io)?;
            done.deleted += 1;
        }
        if let Some(max) = self.opts.retention_bytes {
            while st.blocks.len() > 1 && st.blocks.iter().map(|b| b.meta.bytes).sum::<u64>() > max {
                let b = st.blocks.remove(0);
                delete_block(&b.dir).map_err(io)?;
                done.deleted += 1;
            }
        }
        Ok(done)
    }

    /// Moves every head sample before `boundary` into a new block, then rewrites
    /// the WAL as a snapshot of what stays in memory.
    fn cut(&self, st: &mut State, boundary: i64) -> Result<PathBuf, Error> {
        let mut series_out = Vec::new();
        for s in st.series.iter_mut() {
            // What moves is re-encoded into full-size chunks.
            let mut moving: Vec<(i64, f64)> = Vec::new();
            let mut kept: Vec<TimedChunk> = Vec::new();
            for c in s.closed.drain(..) {
                if c.1 >= boundary {
                    kept.push(c);
                    continue;
                }
                let samples = ChunkIter::from_bytes(&c.0).into_iter().flatten();
                if c.2 < boundary {
                    moving.extend(samples);
                } else {
                    let samples: Vec<(i64, f64)> = samples.collect();
                    moving.extend(samples.iter().filter(|x| x.0 < boundary));
                    kept.extend(encode(samples.iter().filter(|x| x.0 >= boundary)));
                }
            }
            if s.head.first_last().is_some_and(|f| f.0 < boundary) {
                let samples: Vec<(i64, f64)> = s.head.iter().collect();
                moving.extend(samples.iter().filter(|x| x.0 < boundary));
                let mut head = Chunk::default();
                for (t, v) in samples.iter().filter(|x| x.0 >= boundary) {
                    let _ = head.append(*t, *v);
                }
                s.head = head;
            }
            s.closed = kept;
            let moved = encode(moving.iter());
            if !moved.is_empty() {
                series_out.push(SeriesChunks {
                    labels: s.labels.clone(),
                    chunks: moved,
                });
            }
        }
        let blocks_dir = self.opts.dir.join("blocks");
        std::fs::create_dir_all(&blocks_dir).map_err(|source| Error::Io {
            path: blocks_dir.clone(),
            source,
        })?;
        let dir =
            block::write(&blocks_dir, &series_out, boundary, &[]).map_err(|source| Error::Io {
                path: blocks_dir.clone(),
                source,
            })?;
        let b = Block::open(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        st.blocks.push(Arc::new(b));
        st.persisted_until = boundary;
        // The WAL now only needs what is still in memory.
        let mut records: Vec<Record> = st
            .series
            .iter()
            .enumerate()
            .map(|(id, s)| Record::Series {
                id: id as u32,
                labels: s.labels.clone(),
            })
            .collect();
        let mut samples = Vec::new();
        for (id, s) in st.series.iter().enumerate() {
            for c in &s.closed {
                samples.extend(
                    ChunkIter::from_bytes(&c.0)
                        .into_iter()
                        .flatten()
                        .map(|(t, v)| (id as u32, t, v)),
                );
            }
            samples.extend(s.head.iter().map(|(t, v)| (id as u32, t, v)));
        }
        records.push(Record::Samples(samples));
        let wal_dir = self.opts.dir.join("wal");
        st.wal
            .as_mut()
            .expect("opened")
            .checkpoint(&records)
            .map_err(|source| Error::Io {
                path: wal_dir,
                source,
            })?;
        Ok(dir)
    }

    /// Moves every head sample before `boundary` into a block now, whatever the
    /// head's span (for benchmarks, tests and tools; `maintain` does it on its own).
    pub fn cut_before(&self, boundary: i64) -> Result<Option<PathBuf>, Error> {
        let mut st = self.state.lock().unwrap();
        if boundary <= st.persisted_until {
            return Ok(None);
        }
        self.cut(&mut st, boundary).map(Some)
    }

    /// Merges blocks that fall in one window of 3, 9 or 27 block ranges (up to a
    /// tenth of the retention) into one block; the newest window is left to fill.
    fn compact(&self, st: &mut State) -> Result<usize, Error> {
        let range = self.opts.block_range_ms.max(1);
        let max_level = (self.opts.retention_ms / 10).max(range * 3);
        let blocks_dir = self.opts.dir.join("blocks");
        let io = |source| Error::Io {
            path: blocks_dir.clone(),
            source,
        };
        let mut compacted = 0;
        for level in [range * 3, range * 9, range * 27] {
            if level > max_level {
                break;
            }
            loop {
                let window = |b: &Block| b.meta.mint.div_euclid(level);
                let fits = |b: &Block| (b.meta.boundary - 1).div_euclid(level) == window(b);
                let newest = st
                    .blocks
                    .last()
                    .map(|b| (b.meta.boundary - 1).div_euclid(level));
                let mut groups: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
                for (i, b) in st.blocks.iter().enumerate() {
                    if fits(b) && Some(window(b)) != newest {
                        groups.entry(window(b)).or_default().push(i);
                    }
                }
                let Some(group) = groups.into_values().find(|g| g.len() >= 2) else {
                    break;
                };
                let parents: Vec<Arc<Block>> =
                    group.iter().map(|&i| st.blocks[i].clone()).collect();
                let mut merged: BTreeMap<Labels, Vec<TimedChunk>> = BTreeMap::new();
                for b in &parents {
                    for (labels, run) in b.series() {
                        merged
                            .entry(labels.clone())
                            .or_default()
                            .extend(b.read_run(run).map_err(io)?);
                    }
                }
                let series: Vec<SeriesChunks> = merged
                    .into_iter()
                    .map(|(labels, chunks)| SeriesChunks { labels, chunks })
                    .collect();
                let boundary = parents
                    .iter()
                    .map(|b| b.meta.boundary)
                    .max()
                    .unwrap_or(i64::MIN);
                let names: Vec<String> = parents.iter().map(|b| b.name()).collect();
                let dir = block::write(&blocks_dir, &series, boundary, &names).map_err(io)?;
                let new = Arc::new(Block::open(&dir).map_err(io)?);
                st.blocks.retain(|b| !names.contains(&b.name()));
                st.blocks.push(new);
                st.blocks.sort_by_key(|b| b.meta.boundary);
                for b in &parents {
                    delete_block(&b.dir).map_err(io)?;
                }
                compacted += parents.len();
            }
        }
        Ok(compacted)
    }

    /// On-disk blocks: (directory, first and last sample time, bytes).
    pub fn blocks(&self) -> Vec<(PathBuf, i64, i64, u64)> {
        self.state
            .lock()
            .unwrap()
            .blocks
            .iter()
            .map(|b| (b.dir.clone(), b.meta.mint, b.meta.maxt, b.meta.bytes))
            .collect()
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
        self.select_inner(matchers, mint, maxt, false)
    }

    /// Like [`Db::select`], for a caller that needs only each series' last sample
    /// in the range (an instant vector selector): where the head's newest sample
    /// is in the range, that sample alone is returned, and nothing is decoded.
    pub fn select_last(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<SeriesData> {
        self.select_inner(matchers, mint, maxt, true)
    }

    fn select_inner(
        &self,
        matchers: &[Matcher],
        mint: i64,
        maxt: i64,
        last_only: bool,
    ) -> Vec<SeriesData> {
        type Found = (Vec<Arc<[u8]>>, Option<(i64, f64)>);
        let (blocks, head) = {
            let st = self.state.lock().unwrap();
            let head: Vec<(Labels, Found)> = st
                .index
                .select(matchers)
                .into_iter()
                .filter_map(|id| {
                    let s = &st.series[id as usize];
                    if last_only && !s.head.is_empty() && s.max_t >= mint && s.max_t <= maxt {
                        let last = (s.max_t, f64::from_bits(s.last_bits));
                        return Some((s.labels.clone(), (Vec::new(), Some(last))));
                    }
                    let mut chunks: Vec<Arc<[u8]>> = s
                        .closed
                        .iter()
                        .filter(|c| c.2 >= mint && c.1 <= maxt)
                        .map(|c| c.0.clone())
                        .collect();
                    if !s.head.is_empty() && s.max_t >= mint {
                        chunks.push(s.head.shared_bytes());
                    }
                    (!chunks.is_empty()).then(|| (s.labels.clone(), (chunks, None)))
                })
                .collect();
            let blocks: Vec<Arc<Block>> = st
                .blocks
                .iter()
                .filter(|b| b.meta.maxt >= mint && b.meta.mint <= maxt)
                .cloned()
                .collect();
            (blocks, head)
        };
        let series = |(labels, (chunks, last)): (Labels, Found)| SeriesData {
            labels,
            chunks,
            last,
            mint,
            maxt,
        };
        if blocks.is_empty() {
            let mut head = head;
            head.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            return head.into_iter().map(series).collect();
        }
        let mut out: BTreeMap<Labels, Found> = head.into_iter().collect();
        // Blocks hold older samples than the head: their chunks go first, oldest block first.
        let mut from_blocks: BTreeMap<Labels, Vec<Arc<[u8]>>> = BTreeMap::new();
        for b in &blocks {
            for id in b.select(matchers) {
                match b.chunks(id, mint, maxt) {
                    Ok(chunks) if !chunks.is_empty() => {
                        from_blocks
                            .entry(b.labels(id).clone())
                            .or_default()
                            .extend(chunks.into_iter().map(|c| c.0));
                    }
                    Ok(_) => {}
                    Err(e) => tracing_error(&format!("{e}")),
                }
            }
        }
        for (labels, mut chunks) in from_blocks {
            let mut last = None;
            if let Some((head, head_last)) = out.remove(&labels) {
                chunks.extend(head);
                last = head_last;
            }
            if last.is_some() {
                // The head's newest sample is all that is needed.
                chunks.clear();
            }
            out.insert(labels, (chunks, last));
        }
        out.into_iter().map(series).collect()
    }

    /// Label sets of the series the matchers select that have samples in
    /// `[mint, maxt]`, from the index and chunk time ranges (no sample is decoded).
    pub fn series_in_range(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Labels> {
        let st = self.state.lock().unwrap();
        let mut out = std::collections::BTreeSet::new();
        for id in st.index.select(matchers) {
            let s = &st.series[id as usize];
            let first = s
                .closed
                .first()
                .map(|c| c.1)
                .or_else(|| s.head.first_last().map(|f| f.0));
            if s.max_t >= mint && first.is_some_and(|f| f <= maxt) {
                out.insert(s.labels.clone());
            }
        }
        for b in st
            .blocks
            .iter()
            .filter(|b| b.meta.maxt >= mint && b.meta.mint <= maxt)
        {
            for id in b.select(matchers) {
                if b.has_samples_in(id, mint, maxt) {
                    out.insert(b.labels(id).clone());
                }
            }
        }
        out.into_iter().collect()
    }

    pub fn label_names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let mut names: Vec<String> = st.index.label_names();
        for b in &st.blocks {
            names.extend(b.label_names());
        }
        names.sort();
        names.dedup();
        names
    }

    pub fn label_values(&self, name: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        let mut values = st.index.label_values(name);
        for b in &st.blocks {
            values.extend(b.label_values(name));
        }
        values.sort();
        values.dedup();
        values
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
        // Series this batch creates, by hash: the batch may name one many times.
        let mut created_by_hash: crate::fxhash::FxHashMap<u64, Vec<usize>> = Default::default();
        // Out-of-order samples this batch keeps, by series and time.
        let mut late: HashMap<(SeriesId, i64), u64> = HashMap::new();
        let (newest_ok, oldest_ok) = db.opts.valid_times(now_ms());
        for (item, t, v) in self.batch {
            if t > newest_ok {
                *rejected.entry(Reject::TooFarInFuture).or_default() += 1;
                continue;
            }
            if t < oldest_ok {
                *rejected.entry(Reject::TooOld).or_default() += 1;
                continue;
            }
            // Older than what the blocks hold: refused before a series is made for it.
            if t < st.persisted_until {
                *rejected.entry(Reject::OutOfOrder).or_default() += 1;
                continue;
            }
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
                        None => match created_by_hash
                            .get(&h)
                            .and_then(|c| c.iter().copied().find(|&i| created[i].0 == labels))
                        {
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
                                created_by_hash.entry(h).or_default().push(created.len());
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
            if t < last_t || t < st.persisted_until {
                // Within the out-of-order window of a stored series: kept,
                // unless the head has that time already.
                let window = db.opts.out_of_order_window_ms;
                let late_ok =
                    window > 0 && t >= st.persisted_until && t >= last_t.saturating_sub(window);
                if late_ok {
                    let had = late.get(&(id, t)).copied().or_else(|| st.sample_at(id, t));
                    match had {
                        Some(bits) if bits == v.to_bits() => {}
                        Some(_) => {
                            *rejected.entry(Reject::DuplicateTimestamp).or_default() += 1;
                        }
                        None => {
                            late.insert((id, t), v.to_bits());
                            samples.push((id, t, v));
                        }
                    }
                    continue;
                }
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

/// What [`Db::maintain`] did.
#[derive(Debug, Default)]
pub struct Maintained {
    /// The block written, if the head was cut.
    pub block: Option<PathBuf>,
    /// Blocks deleted by retention.
    pub deleted: usize,
    /// Blocks merged into larger ones.
    pub compacted: usize,
}

/// Samples per chunk in the head: half of a block's [`MAX_SAMPLES`], so that a
/// query for the latest minutes decodes fewer samples before its window (a
/// chunk decodes from its start). Cutting a block joins them into full chunks.
const HEAD_CHUNK_SAMPLES: usize = MAX_SAMPLES as usize / 2;

/// Encodes samples (in time order) into full chunks with their time ranges.
fn encode<'a>(samples: impl Iterator<Item = &'a (i64, f64)>) -> Vec<TimedChunk> {
    let mut out = Vec::new();
    let mut c = Chunk::default();
    for (t, v) in samples {
        if c.len() == MAX_SAMPLES as usize {
            let (a, b) = c.first_last().expect("not empty");
            out.push((c.shared_bytes(), a, b));
            c = Chunk::default();
        }
        let _ = c.append(*t, *v);
    }
    if let Some((a, b)) = c.first_last() {
        out.push((c.shared_bytes(), a, b));
    }
    out
}

/// Opens every complete block in `dir`, oldest first; leftovers of an
/// interrupted write (`*.tmp`) are removed.
fn open_blocks(dir: &std::path::Path) -> std::io::Result<Vec<Arc<Block>>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let p = e.path();
        // Leftovers of a block write or a block deletion that a crash interrupted.
        if p.extension().is_some_and(|x| x == "tmp" || x == "deleted") {
            std::fs::remove_dir_all(&p)?;
            continue;
        }
        out.push(Arc::new(Block::open(&p)?));
    }
    // A compaction that wrote its block but was stopped before deleting the blocks
    // it replaced: delete them now.
    let replaced: std::collections::HashSet<String> = out
        .iter()
        .flat_map(|b| b.meta.parents.iter().cloned())
        .collect();
    for b in out.iter().filter(|b| replaced.contains(&b.name())) {
        delete_block(&b.dir)?;
    }
    out.retain(|b| !replaced.contains(&b.name()));
    out.sort_by_key(|b| b.meta.boundary);
    Ok(out)
}

/// Deletes a block so that a crash cannot leave half of it: renamed away first
/// (atomic), then removed; a leftover `.deleted` directory is removed on open.
fn delete_block(dir: &std::path::Path) -> std::io::Result<()> {
    let gone = dir.with_extension("deleted");
    std::fs::rename(dir, &gone)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    std::fs::remove_dir_all(&gone)
}

fn tracing_error(msg: &str) {
    eprintln!("capstan-tsdb: {msg}");
}
