//! The store: appends go to an in-memory head, cut into blocks of the active
//! segment file at `block_bytes` and at every [`Store::flush`] (the durability
//! point); the active segment is sealed after `segment_duration` or
//! `segment_bytes`; [`Store::maintain`] rewrites sealed segments into one-stream
//! blocks compressed harder and enforces retention.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::block::{self, Entry};
use crate::segment::{self, BlockRef, KIND_BLOCK, KIND_STREAM, Writer};
use crate::{Error, Labels, filter};

/// Settings; [`Options::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Uncompressed bytes in the head before a block is cut.
    pub block_bytes: usize,
    /// The active segment is sealed after this long…
    pub segment_duration: Duration,
    /// …or this many bytes.
    pub segment_bytes: u64,
    /// Sealed segments whose newest entry is older than this are deleted.
    pub retention: Option<Duration>,
    /// Oldest sealed segments are deleted while the store is larger.
    pub max_total_bytes: Option<u64>,
    /// Longer lines are cut (at a character boundary) and marked.
    pub max_line_bytes: usize,
    /// Per-stream ingestion limit in bytes a second (lines over it are refused
    /// and counted), with a burst of `rate_burst_bytes`.
    pub rate_limit_bytes: Option<u64>,
    pub rate_burst_bytes: u64,
    /// zstd levels: blocks cut from the head, and blocks of sealed segments.
    pub level_head: i32,
    pub level_sealed: i32,
    /// Segments kept as written (full one-stream blocks at `level_head`) are
    /// recompressed at `level_sealed` by `maintain` once nothing was appended
    /// for this long (never: `None`).
    pub recompress_when_idle: Option<Duration>,
    /// Lines kept as templates and variables (smaller, ids found by their own
    /// column; the default), or as text (cheaper to write and to read back
    /// whole: the span store, read by trace id).
    pub templates: bool,
}

impl Options {
    pub fn new(dir: impl Into<PathBuf>) -> Options {
        Options {
            dir: dir.into(),
            block_bytes: 1 << 20,
            segment_duration: Duration::from_secs(600),
            segment_bytes: 128 << 20,
            retention: None,
            max_total_bytes: None,
            max_line_bytes: 256 << 10,
            rate_limit_bytes: None,
            rate_burst_bytes: 8 << 20,
            level_head: 1,
            level_sealed: 6,
            recompress_when_idle: Some(Duration::from_secs(60)),
            templates: true,
        }
    }
}

/// Counters since open.
#[derive(Debug, Default)]
pub struct Stats {
    pub lines: AtomicU64,
    pub bytes: AtomicU64,
    pub truncated_lines: AtomicU64,
    pub rate_limited_lines: AtomicU64,
    pub rate_limited_bytes: AtomicU64,
    pub blocks_written: AtomicU64,
    /// Blocks decompressed by reads (the ones filters could not skip).
    pub blocks_decoded: AtomicU64,
    pub segments_deleted: AtomicU64,
}

/// What an append did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub accepted: usize,
    pub truncated: usize,
    pub rate_limited: usize,
    /// Sequence number of the last accepted entry.
    pub last_seq: u64,
}

/// What opening found.
#[derive(Debug, Default)]
pub struct Recovery {
    pub segments: usize,
    pub blocks: usize,
    /// Files whose tail was cut (torn write or corruption), and why.
    pub truncated: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// Which entries a read wants.
pub struct Query<'a> {
    /// Inclusive start and exclusive end, Unix nanoseconds.
    pub from_ns: i64,
    pub to_ns: i64,
    pub streams: &'a dyn Fn(&Labels) -> bool,
    /// Substrings every line must contain (blocks whose filter lacks one are
    /// skipped without being read).
    pub contains: &'a [Vec<u8>],
    /// Only entries with a larger sequence number (a tail's cursor).
    pub after_seq: u64,
    /// Structured metadata pairs every entry must carry (blocks whose token
    /// filter lacks one are skipped without being read): a trace id finds its
    /// entries without a time range.
    pub meta: &'a [(String, String)],
}

impl<'a> Query<'a> {
    /// Every entry of the streams `pred` accepts.
    pub fn all(streams: &'a dyn Fn(&Labels) -> bool) -> Query<'a> {
        Query {
            from_ns: i64::MIN,
            to_ns: i64::MAX,
            streams,
            contains: &[],
            after_seq: 0,
            meta: &[],
        }
    }
}

/// A block of a segment, stream ids mapped to the store's.
#[derive(Debug, Clone)]
struct Block {
    r: BlockRef,
}

impl Block {
    /// The index entry of a block just encoded as `bytes` and written at `at`.
    fn written(bytes: &[u8], at: u64) -> Block {
        let p = block::parse_header(bytes).expect("a block just encoded parses");
        Block {
            r: BlockRef::new(&p, at, bytes.len() as u32),
        }
    }
}

struct Seg {
    id: u64,
    path: PathBuf,
    file: File,
    blocks: Vec<Block>,
    bytes: u64,
    /// An `ID.seg` file of one-stream blocks (else `ID.raw`, waiting for `maintain`).
    compacted: bool,
}

impl Seg {
    fn max_ts(&self) -> i64 {
        self.blocks
            .iter()
            .map(|b| b.r.header.max_ts)
            .max()
            .unwrap_or(i64::MIN)
    }
}

struct Active {
    writer: Writer,
    id: u64,
    opened: SystemTime,
    /// Store stream ids already defined in this file.
    defined: Vec<bool>,
    blocks: Vec<Block>,
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

struct Inner {
    streams: Vec<Arc<Labels>>,
    ids: HashMap<Labels, u32>,
    buckets: HashMap<u32, Bucket>,
    head: Vec<(u32, Entry)>,
    head_bytes: usize,
    /// Head bytes per stream id.
    stream_bytes: Vec<usize>,
    next_seq: u64,
    active: Option<Active>,
    sealed: Vec<Arc<Seg>>,
    flushed_seq: u64,
    last_append: std::time::Instant,
}

pub struct Store {
    opts: Options,
    inner: Mutex<Inner>,
    pub stats: Stats,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source: e,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes of segments kept as written that one idle `maintain` pass recompresses.
const RECOMPRESS_BYTES_PER_PASS: u64 = 64 << 20;

/// The head holds at most this many blocks' worth of entries (of any streams).
const HEAD_BLOCKS: usize = 8;

/// `entries` as consecutive runs of equal size, as many as there are whole
/// `block_bytes` in them (at least one): no small remainder block.
fn split_blocks<'e, 'a>(
    entries: &'e [(u32, &'a Entry)],
    block_bytes: usize,
) -> impl Iterator<Item = &'e [(u32, &'a Entry)]> {
    let total: usize = entries.iter().map(|(_, e)| entries_size(e)).sum();
    let parts = (total / block_bytes.max(1)).max(1);
    let target = total.div_ceil(parts);
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= entries.len() {
            return None;
        }
        let mut end = start;
        let mut size = 0;
        while end < entries.len() && (end == start || size < target) {
            size += entries_size(entries[end].1);
            end += 1;
        }
        let part = &entries[start..end];
        start = end;
        Some(part)
    })
}

/// An entry's share of a block's size, as the head counts it.
fn entries_size(e: &Entry) -> usize {
    e.line.len() + e.meta.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() + 16
}

/// `ID.raw`: blocks cut from the head (the active segment, or a sealed one
/// waiting for compaction); `ID.seg`: compacted, one-stream blocks.
fn seg_path(dir: &Path, id: u64, compacted: bool) -> PathBuf {
    dir.join(format!(
        "{id:016}.{}",
        if compacted { "seg" } else { "raw" }
    ))
}

/// A block's entries as `visit` hands them over, with the block's time bound.
type Batch = (i64, Vec<(Arc<Labels>, Entry)>);

/// Cuts a line longer than `max` at a character boundary and marks it.
fn truncate(line: &mut String, max: usize) -> bool {
    if line.len() <= max {
        return false;
    }
    let mut cut = max;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = line.len() - cut;
    line.truncate(cut);
    line.push_str(&format!(" …[truncated {dropped} bytes]"));
    true
}

impl Inner {
    fn stream_id(&mut self, labels: &Labels) -> u32 {
        if let Some(id) = self.ids.get(labels) {
            return *id;
        }
        let id = self.streams.len() as u32;
        self.streams.push(Arc::new(labels.clone()));
        self.ids.insert(labels.clone(), id);
        id
    }
}

impl Store {
    /// Opens (or creates) the store in `opts.dir`: reads every segment, cuts torn
    /// tails, continues the newest unsealed segment.
    pub fn open(opts: Options) -> Result<(Store, Recovery), Error> {
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let mut files: std::collections::BTreeMap<u64, bool> = Default::default();
        for ent in std::fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let ent = ent.map_err(|e| io(&dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(ent.path());
            } else if let Some((id, ext)) = name.split_once('.')
                && let Ok(id) = id.parse::<u64>()
                && (ext == "seg" || ext == "raw")
            {
                *files.entry(id).or_default() |= ext == "seg";
            }
        }
        // A compacted file replaces its raw one (a crash may have left both).
        for (id, compacted) in &files {
            if *compacted {
                let _ = std::fs::remove_file(seg_path(&dir, *id, false));
            }
        }
        let mut inner = Inner {
            streams: Vec::new(),
            ids: HashMap::new(),
            buckets: HashMap::new(),
            head: Vec::new(),
            head_bytes: 0,
            stream_bytes: Vec::new(),
            next_seq: 1,
            active: None,
            sealed: Vec::new(),
            flushed_seq: 0,
            last_append: std::time::Instant::now(),
        };
        let mut rec = Recovery::default();
        for (id, compacted) in files {
            let path = seg_path(&dir, id, compacted);
            let loaded = segment::load(&path).map_err(|e| io(&path, e))?;
            if loaded.valid_len < 8 {
                // Torn before its header was written: holds nothing.
                rec.truncated
                    .push((path.clone(), "no segment header; removed".into()));
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if let Some(why) = &loaded.torn {
                rec.truncated.push((path.clone(), why.clone()));
            }
            let mut map: HashMap<u32, u32> = HashMap::new();
            for (fid, labels) in &loaded.streams {
                map.insert(*fid, inner.stream_id(labels));
            }
            let mut blocks = Vec::with_capacity(loaded.blocks.len());
            for mut b in loaded.blocks {
                let mapped: Option<Vec<u32>> = b
                    .header
                    .streams
                    .iter()
                    .map(|s| map.get(s).copied())
                    .collect();
                let Some(mapped) = mapped else {
                    rec.truncated
                        .push((path.clone(), "a block names an undefined stream".into()));
                    continue;
                };
                // Positions matter: entries name their stream by index here.
                b.header.streams = mapped;
                inner.next_seq = inner.next_seq.max(b.header.last_seq + 1);
                blocks.push(Block { r: b });
            }
            rec.segments += 1;
            rec.blocks += blocks.len();
            if !loaded.sealed {
                // The segment that was active: cut at its last good record and
                // sealed (a new one takes the appends, so stream ids of one file
                // never mix two numberings); `maintain` compacts it.
                let w = Writer::reopen(&path, loaded.valid_len.max(8)).map_err(|e| io(&path, e))?;
                w.seal().map_err(|e| io(&path, e))?;
            }
            let file = File::open(&path).map_err(|e| io(&path, e))?;
            let bytes = file.metadata().map_err(|e| io(&path, e))?.len();
            inner.sealed.push(Arc::new(Seg {
                id,
                path,
                file,
                blocks,
                bytes,
                compacted,
            }));
        }
        inner.flushed_seq = inner.next_seq - 1;
        Ok((
            Store {
                opts,
                inner: Mutex::new(inner),
                stats: Stats::default(),
            },
            rec,
        ))
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Appends entries of one stream. Sequence numbers are given here; timestamps
    /// are the caller's. Lines over the size limit are cut and marked; lines over
    /// the stream's rate limit are refused and counted.
    pub fn append(&self, labels: &Labels, entries: Vec<Entry>) -> Result<Appended, Error> {
        let mut inner = self.inner.lock().unwrap();
        inner.last_append = std::time::Instant::now();
        let id = inner.stream_id(labels);
        let mut out = Appended::default();
        for mut e in entries {
            let size = entries_size(&e) - 16;
            if let Some(rate) = self.opts.rate_limit_bytes {
                let burst = self.opts.rate_burst_bytes as f64;
                let now = std::time::Instant::now();
                let b = inner.buckets.entry(id).or_insert(Bucket {
                    tokens: burst,
                    at: now,
                });
                b.tokens =
                    (b.tokens + now.duration_since(b.at).as_secs_f64() * rate as f64).min(burst);
                b.at = now;
                if b.tokens < size as f64 {
                    out.rate_limited += 1;
                    self.stats.rate_limited_lines.fetch_add(1, Relaxed);
                    self.stats
                        .rate_limited_bytes
                        .fetch_add(size as u64, Relaxed);
                    continue;
                }
                b.tokens -= size as f64;
            }
            if truncate(&mut e.line, self.opts.max_line_bytes) {
                out.truncated += 1;
                self.stats.truncated_lines.fetch_add(1, Relaxed);
            }
            e.seq = inner.next_seq;
            inner.next_seq += 1;
            out.last_seq = e.seq;
            out.accepted += 1;
            self.stats.lines.fetch_add(1, Relaxed);
            self.stats.bytes.fetch_add(e.line.len() as u64, Relaxed);
            inner.head_bytes += size + 16;
            let i = id as usize;
            if inner.stream_bytes.len() <= i {
                inner.stream_bytes.resize(i + 1, 0);
            }
            inner.stream_bytes[i] += size + 16;
            inner.head.push((id, e));
        }
        // A stream's entries become a block once they fill one; all streams'
        // when the head as a whole holds a few blocks' worth.
        if inner.head_bytes >= HEAD_BLOCKS * self.opts.block_bytes {
            self.cut(&mut inner, None)?;
        } else if inner
            .stream_bytes
            .get(id as usize)
            .is_some_and(|b| *b >= self.opts.block_bytes)
        {
            self.cut(&mut inner, Some(id))?;
        }
        Ok(out)
    }

    /// Writes the head's entries of stream `only` (of every stream: `None`) as
    /// blocks of the active segment (opening one if needed), one stream per
    /// block, in append order.
    fn cut(&self, inner: &mut Inner, only: Option<u32>) -> Result<(), Error> {
        if inner.head.is_empty() {
            return Ok(());
        }
        let rotate = inner.active.as_ref().is_some_and(|a| {
            a.writer.len() >= self.opts.segment_bytes
                || a.opened.elapsed().unwrap_or_default() >= self.opts.segment_duration
        });
        if rotate {
            self.seal_active(inner)?;
        }
        if inner.active.is_none() {
            let mut id = now_ms();
            let last = inner.sealed.last().map_or(0, |s| s.id);
            id = id.max(last + 1);
            let path = seg_path(&self.opts.dir, id, false);
            let writer = Writer::create(&path).map_err(|e| io(&path, e))?;
            inner.active = Some(Active {
                writer,
                id,
                opened: SystemTime::now(),
                defined: Vec::new(),
                blocks: Vec::new(),
            });
        }
        let head = match only {
            None => std::mem::take(&mut inner.head),
            Some(id) => {
                let (take, keep) = std::mem::take(&mut inner.head)
                    .into_iter()
                    .partition(|(s, _)| *s == id);
                inner.head = keep;
                take
            }
        };
        // Stable by stream: each stream's entries stay in append order.
        let mut order: Vec<usize> = (0..head.len()).collect();
        order.sort_by_key(|i| head[*i].0);
        let refs: Vec<(u32, &Entry)> = order.iter().map(|i| (head[*i].0, &head[*i].1)).collect();
        let streams = &inner.streams;
        let a = inner.active.as_mut().expect("opened above");
        // Entries of `refs` written so far, a prefix.
        let mut done = 0;
        let mut written = 0;
        let result = (|| {
            for run in refs.chunk_by(|x, y| x.0 == y.0) {
                let i = run[0].0 as usize;
                if a.defined.len() <= i {
                    a.defined.resize(i + 1, false);
                }
                if !a.defined[i] {
                    a.writer
                        .append(KIND_STREAM, &segment::encode_stream(run[0].0, &streams[i]))?;
                    a.defined[i] = true;
                }
                for part in split_blocks(run, self.opts.block_bytes) {
                    let bytes = block::encode(part, self.opts.level_head, self.opts.templates);
                    let at = a.writer.append(KIND_BLOCK, &bytes)?;
                    a.blocks.push(Block::written(&bytes, at));
                    written += 1;
                    done += part.len();
                }
            }
            Ok::<_, std::io::Error>(())
        })();
        self.stats.blocks_written.fetch_add(written, Relaxed);
        let path = a.writer.path.clone();
        drop(refs);
        match result {
            Ok(()) => {
                match only {
                    Some(id) => {
                        inner.head_bytes -= std::mem::take(&mut inner.stream_bytes[id as usize]);
                    }
                    None => {
                        inner.stream_bytes.iter_mut().for_each(|b| *b = 0);
                        inner.head_bytes = 0;
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Nothing accepted is lost: entries not yet in a block go back
                // to the head, in append order.
                let mut back: Vec<usize> = order[done..].to_vec();
                back.sort_unstable();
                let mut slots: Vec<Option<(u32, Entry)>> = head.into_iter().map(Some).collect();
                let mut returned: Vec<(u32, Entry)> =
                    back.iter().filter_map(|i| slots[*i].take()).collect();
                returned.append(&mut inner.head);
                inner.head = returned;
                inner.stream_bytes.iter_mut().for_each(|b| *b = 0);
                for (id, e) in &inner.head {
                    inner.stream_bytes[*id as usize] += entries_size(e);
                }
                inner.head_bytes = inner.stream_bytes.iter().sum();
                Err(io(&path, e))
            }
        }
    }

    fn seal_active(&self, inner: &mut Inner) -> Result<(), Error> {
        let Some(a) = inner.active.take() else {
            return Ok(());
        };
        let path = a.writer.path.clone();
        a.writer.seal().map_err(|e| io(&path, e))?;
        let file = File::open(&path).map_err(|e| io(&path, e))?;
        let bytes = file.metadata().map_err(|e| io(&path, e))?.len();
        inner.sealed.push(Arc::new(Seg {
            id: a.id,
            path,
            file,
            blocks: a.blocks,
            bytes,
            compacted: false,
        }));
        Ok(())
    }

    /// Writes the head and syncs the active segment: every entry appended before
    /// the call survives a crash after it. Returns the last durable sequence number.
    pub fn flush(&self) -> Result<u64, Error> {
        let mut inner = self.inner.lock().unwrap();
        self.cut(&mut inner, None)?;
        if let Some(a) = &inner.active {
            a.writer.sync().map_err(|e| io(&a.writer.path, e))?;
        }
        inner.flushed_seq = inner.next_seq - 1;
        Ok(inner.flushed_seq)
    }

    /// Writes the head and seals the active segment now (the next append starts
    /// a new one); `maintain` compacts it.
    pub fn rotate(&self) -> Result<(), Error> {
        let mut inner = self.inner.lock().unwrap();
        self.cut(&mut inner, None)?;
        self.seal_active(&mut inner)
    }

    /// The last sequence number given out.
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().unwrap().next_seq - 1
    }

    /// Seals the active segment when it is due, rewrites sealed segments of
    /// small mixed blocks into one-stream blocks, and deletes what retention says
    /// must go. Meant to run every few seconds off the ingest path.
    pub fn maintain(&self) -> Result<(), Error> {
        {
            let mut inner = self.inner.lock().unwrap();
            let due = inner.active.as_ref().is_some_and(|a| {
                a.writer.len() >= self.opts.segment_bytes
                    || a.opened.elapsed().unwrap_or_default() >= self.opts.segment_duration
            });
            if due {
                self.cut(&mut inner, None)?;
                self.seal_active(&mut inner)?;
            }
        }
        let todo: Vec<Arc<Seg>> = {
            let inner = self.inner.lock().unwrap();
            inner
                .sealed
                .iter()
                .filter(|s| !s.compacted)
                .cloned()
                .collect()
        };
        for seg in todo {
            let compacted = if self.worth_compacting(&seg) {
                self.compact(&seg)?
            } else {
                // Already one-stream blocks of about full size: kept as written.
                Seg {
                    id: seg.id,
                    path: seg.path.clone(),
                    file: seg.file.try_clone().map_err(|e| io(&seg.path, e))?,
                    blocks: seg.blocks.clone(),
                    bytes: seg.bytes,
                    compacted: true,
                }
            };
            self.replace_sealed(compacted);
        }
        // Idle: segments kept as written get the harder compression, a few
        // at a time, newest data last.
        let idle = self
            .opts
            .recompress_when_idle
            .is_some_and(|d| self.inner.lock().unwrap().last_append.elapsed() >= d);
        if idle {
            let kept: Vec<Arc<Seg>> = {
                let inner = self.inner.lock().unwrap();
                inner
                    .sealed
                    .iter()
                    .filter(|s| s.compacted && s.path.extension().is_some_and(|e| e == "raw"))
                    .cloned()
                    .collect()
            };
            let mut budget = RECOMPRESS_BYTES_PER_PASS;
            for seg in kept {
                if budget == 0 {
                    break;
                }
                budget = budget.saturating_sub(seg.bytes);
                self.replace_sealed(self.compact(&seg)?);
            }
        }
        self.enforce_retention()
    }

    /// Puts a rewritten sealed segment in place of the one with its id (unless
    /// retention removed that meanwhile).
    fn replace_sealed(&self, seg: Seg) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(slot) = inner.sealed.iter_mut().find(|s| s.id == seg.id) {
            *slot = Arc::new(seg);
        }
    }

    /// Whether rewriting a sealed segment would change its blocks much: it has
    /// a block of several streams, or half again as many blocks as its streams'
    /// entries would fill (many small blocks cut by flushes).
    fn worth_compacting(&self, seg: &Seg) -> bool {
        let mut per_stream: HashMap<u32, u64> = HashMap::new();
        for b in &seg.blocks {
            let h = &b.r.header;
            if h.streams.len() != 1 {
                return true;
            }
            *per_stream.entry(h.streams[0]).or_default() += u64::from(h.text_len);
        }
        let full = self.opts.block_bytes.max(1) as u64;
        let needed: u64 = per_stream.values().map(|b| b.div_ceil(full)).sum();
        seg.blocks.len() as u64 * 2 > needed * 3
    }

    /// Rewrites a segment as one-stream blocks in time order, renamed into place.
    fn compact(&self, seg: &Seg) -> Result<Seg, Error> {
        let streams: Vec<Arc<Labels>> = self.inner.lock().unwrap().streams.clone();
        let mut by_stream: std::collections::BTreeMap<u32, Vec<Entry>> = Default::default();
        for b in &seg.blocks {
            let bytes = segment::read_block(&seg.file, &b.r).map_err(|e| io(&seg.path, e))?;
            let entries = block::decode(&b.r.header, &bytes[b.r.data.start as usize..])
                .ok_or_else(|| Error::Corrupt {
                    path: seg.path.clone(),
                    what: format!("block at byte {} does not decode", b.r.offset),
                })?;
            // Blocks hold the file's stream ids; map them back through the header.
            for (s, e) in entries {
                by_stream.entry(s).or_default().push(e);
            }
        }
        let dest = seg_path(&self.opts.dir, seg.id, true);
        let tmp = dest.with_extension("seg.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut w = Writer::create(&tmp).map_err(|e| io(&tmp, e))?;
        let mut blocks = Vec::new();
        let mut write = || -> std::io::Result<()> {
            for (s, mut entries) in std::mem::take(&mut by_stream) {
                entries.sort_by_key(|e| (e.ts_ns, e.seq));
                w.append(
                    KIND_STREAM,
                    &segment::encode_stream(s, &streams[s as usize]),
                )?;
                let refs: Vec<(u32, &Entry)> = entries.iter().map(|e| (s, e)).collect();
                for part in split_blocks(&refs, self.opts.block_bytes) {
                    let bytes = block::encode(part, self.opts.level_sealed, self.opts.templates);
                    let at = w.append(KIND_BLOCK, &bytes)?;
                    blocks.push(Block::written(&bytes, at));
                }
            }
            Ok(())
        };
        write().map_err(|e| io(&tmp, e))?;
        w.seal().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
        if let Ok(d) = File::open(&self.opts.dir) {
            let _ = d.sync_all();
        }
        let _ = std::fs::remove_file(&seg.path);
        let file = File::open(&dest).map_err(|e| io(&dest, e))?;
        let bytes = file.metadata().map_err(|e| io(&dest, e))?.len();
        Ok(Seg {
            id: seg.id,
            path: dest,
            file,
            blocks,
            bytes,
            compacted: true,
        })
    }

    fn enforce_retention(&self) -> Result<(), Error> {
        let mut inner = self.inner.lock().unwrap();
        let now_ns = now_ms() as i64 * 1_000_000;
        let mut total: u64 = inner.sealed.iter().map(|s| s.bytes).sum::<u64>()
            + inner.active.as_ref().map_or(0, |a| a.writer.len());
        let mut keep = Vec::new();
        let sealed = std::mem::take(&mut inner.sealed);
        let n = sealed.len();
        for (i, s) in sealed.into_iter().enumerate() {
            let too_old = self
                .opts
                .retention
                .is_some_and(|r| s.max_ts() < now_ns - r.as_nanos() as i64);
            // Sealed segments are oldest first; the active one always stays.
            let too_big = self.opts.max_total_bytes.is_some_and(|m| total > m) && i < n;
            if too_old || too_big {
                let _ = std::fs::remove_file(&s.path);
                total = total.saturating_sub(s.bytes);
                self.stats.segments_deleted.fetch_add(1, Relaxed);
            } else {
                keep.push(s);
            }
        }
        inner.sealed = keep;
        Ok(())
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        let inner = self.inner.lock().unwrap();
        inner.sealed.iter().map(|s| s.bytes).sum::<u64>()
            + inner.active.as_ref().map_or(0, |a| a.writer.len())
    }

    /// Every stream with an entry in `[from_ns, to_ns)` that `pred` accepts.
    pub fn series(
        &self,
        from_ns: i64,
        to_ns: i64,
        pred: &dyn Fn(&Labels) -> bool,
    ) -> Vec<Arc<Labels>> {
        let inner = self.inner.lock().unwrap();
        let mut seen = vec![false; inner.streams.len()];
        let blocks = inner
            .sealed
            .iter()
            .flat_map(|s| s.blocks.iter())
            .chain(inner.active.iter().flat_map(|a| a.blocks.iter()));
        for b in blocks {
            if b.r.header.max_ts >= from_ns && b.r.header.min_ts < to_ns {
                for s in &b.r.header.streams {
                    seen[*s as usize] = true;
                }
            }
        }
        for (s, e) in &inner.head {
            if e.ts_ns >= from_ns && e.ts_ns < to_ns {
                seen[*s as usize] = true;
            }
        }
        inner
            .streams
            .iter()
            .enumerate()
            .filter(|(i, l)| seen[*i] && pred(l))
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// Up to `limit` entries matching `q`, oldest first (`Forward`) or newest
    /// first (`Backward`), ordered by time then sequence number. Blocks are read
    /// in time order and reading stops once no further block can change the
    /// answer.
    pub fn select(
        &self,
        q: &Query<'_>,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<(Arc<Labels>, Entry)>, Error> {
        self.select_map(
            q,
            dir,
            limit,
            |l, e| Some((l, e)),
            |(_, e)| (e.ts_ns, e.seq),
        )
    }

    /// Up to `n` entries of the stream `labels` just before and just after the
    /// entry at (`ts_ns`, `seq`), oldest first: the context of a match.
    pub fn around(
        &self,
        labels: &Labels,
        ts_ns: i64,
        seq: u64,
        n: usize,
    ) -> Result<(Vec<Entry>, Vec<Entry>), Error> {
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let same = |l: &Labels| l == labels;
        let before_q = Query {
            to_ns: ts_ns.saturating_add(1),
            ..Query::all(&same)
        };
        let mut before = self.select_map(
            &before_q,
            Direction::Backward,
            n,
            |_, e| ((e.ts_ns, e.seq) < (ts_ns, seq)).then_some(e),
            |e| (e.ts_ns, e.seq),
        )?;
        before.reverse();
        let after_q = Query {
            from_ns: ts_ns,
            ..Query::all(&same)
        };
        let after = self.select_map(
            &after_q,
            Direction::Forward,
            n,
            |_, e| ((e.ts_ns, e.seq) > (ts_ns, seq)).then_some(e),
            |e| (e.ts_ns, e.seq),
        )?;
        Ok((before, after))
    }

    /// [`Store::select`] with each entry turned into a `T` (or dropped) by `map`
    /// before it counts against the limit; `key` gives a `T`'s (time, sequence).
    /// For readers that filter further (LogQL's pipeline).
    pub fn select_map<T>(
        &self,
        q: &Query<'_>,
        dir: Direction,
        limit: usize,
        mut map: impl FnMut(Arc<Labels>, Entry) -> Option<T>,
        key: impl Fn(&T) -> (i64, u64),
    ) -> Result<Vec<T>, Error> {
        let order = |v: &mut Vec<T>| match dir {
            Direction::Forward => v.sort_by_key(&key),
            Direction::Backward => v.sort_by_key(|t| std::cmp::Reverse(key(t))),
        };
        let mut kept: Vec<T> = Vec::new();
        let mut stop_at: Option<i64> = None;
        self.visit(q, dir, &mut |bound, batch| {
            // Blocks come in order of their nearest edge: once that edge is past
            // the worst entry kept, nothing later can enter.
            if let Some(s) = stop_at
                && match dir {
                    Direction::Forward => bound > s,
                    Direction::Backward => bound < s,
                }
            {
                return false;
            }
            kept.extend(batch.into_iter().filter_map(|(l, e)| map(l, e)));
            if kept.len() >= limit {
                order(&mut kept);
                kept.truncate(limit);
                stop_at = kept.last().map(|t| key(t).0);
            }
            true
        })?;
        order(&mut kept);
        kept.truncate(limit);
        Ok(kept)
    }

    /// Calls `f` with each matching block's entries (and the head's), in order of
    /// the blocks' start (`Forward`) or end (`Backward`) time, with that bound;
    /// `f` returns false to stop. Entries within a batch are not sorted.
    pub fn visit(
        &self,
        q: &Query<'_>,
        dir: Direction,
        f: &mut dyn FnMut(i64, Vec<(Arc<Labels>, Entry)>) -> bool,
    ) -> Result<(), Error> {
        let finders: Vec<memchr::memmem::Finder<'_>> =
            q.contains.iter().map(memchr::memmem::Finder::new).collect();
        // Plain copies, so the closures below can cross threads.
        let (from_ns, to_ns, after_seq, contains, meta) =
            (q.from_ns, q.to_ns, q.after_seq, q.contains, q.meta);
        let tokens: Vec<Vec<u8>> = meta.iter().map(|(k, v)| filter::token(k, v)).collect();
        let matches_line = |e: &Entry| {
            e.ts_ns >= from_ns
                && e.ts_ns < to_ns
                && e.seq > after_seq
                && meta
                    .iter()
                    .all(|(k, v)| e.meta.iter().any(|(ek, ev)| ek == k && ev == v))
                && finders.iter().all(|f| f.find(e.line.as_bytes()).is_some())
        };
        // Snapshot under the lock: which streams match, the blocks, the head.
        let (streams, wanted, mut cands, head) = {
            let inner = self.inner.lock().unwrap();
            let wanted: Vec<bool> = inner.streams.iter().map(|l| (q.streams)(l)).collect();
            let mut cands: Vec<(Arc<File>, PathBuf, Block)> = Vec::new();
            let ok = |b: &Block| {
                b.r.header.max_ts >= q.from_ns
                    && b.r.header.min_ts < q.to_ns
                    && b.r.header.last_seq > q.after_seq
                    && b.r.header.streams.iter().any(|s| wanted[*s as usize])
            };
            for s in &inner.sealed {
                let file = Arc::new(s.file.try_clone().map_err(|e| io(&s.path, e))?);
                for b in s.blocks.iter().filter(|b| ok(b)) {
                    cands.push((file.clone(), s.path.clone(), b.clone()));
                }
            }
            if let Some(a) = &inner.active {
                let file = Arc::new(a.writer.reader().map_err(|e| io(&a.writer.path, e))?);
                for b in a.blocks.iter().filter(|b| ok(b)) {
                    cands.push((file.clone(), a.writer.path.clone(), b.clone()));
                }
            }
            let head: Vec<(u32, Entry)> = inner
                .head
                .iter()
                .filter(|(s, e)| wanted[*s as usize] && matches_line(e))
                .cloned()
                .collect();
            (inner.streams.clone(), wanted, cands, head)
        };
        match dir {
            Direction::Forward => cands.sort_by_key(|c| c.2.r.header.min_ts),
            Direction::Backward => cands.sort_by_key(|c| std::cmp::Reverse(c.2.r.header.max_ts)),
        }
        // The head is newest: last going forward, first going backward.
        let head_batch = |head: Vec<(u32, Entry)>| -> (i64, Vec<(Arc<Labels>, Entry)>) {
            let bound = match dir {
                Direction::Forward => head.iter().map(|(_, e)| e.ts_ns).min().unwrap_or(i64::MAX),
                Direction::Backward => head.iter().map(|(_, e)| e.ts_ns).max().unwrap_or(i64::MIN),
            };
            (
                bound,
                head.into_iter()
                    .map(|(s, e)| (streams[s as usize].clone(), e))
                    .collect(),
            )
        };
        let mut head = Some(head);
        if dir == Direction::Backward
            && let Some(h) = head.take()
            && !h.is_empty()
        {
            let (bound, batch) = head_batch(h);
            if !f(bound, batch) {
                return Ok(());
            }
        }
        // A lookup by metadata alone (a trace id) reads only the small token
        // filters, one after the other: no threads for blocks it skips.
        if contains.is_empty() && !tokens.is_empty() {
            let mut kept = Vec::new();
            for c in cands {
                let t = segment::read_tokens(&c.0, &c.2.r).map_err(|e| io(&c.1, e))?;
                if tokens.iter().all(|tk| filter::may_have_token(&t, tk)) {
                    kept.push(c);
                }
            }
            cands = kept;
        }
        // Blocks are read and decoded a few at a time in parallel, then handed
        // to `f` in order.
        let width = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        let load = |(file, path, b): &(Arc<File>, PathBuf, Block)| -> Result<Option<Batch>, Error> {
            // Needles of hex digits that only the block's hex column can rule out.
            let mut by_ids: Vec<&[u8]> = Vec::new();
            if !contains.is_empty() {
                let flt = segment::read_filters(file, &b.r).map_err(|e| io(path, e))?;
                for n in contains {
                    match block::filter_verdict(b.r.header.codec, flt.trigrams(), n) {
                        block::Verdict::No => return Ok(None),
                        block::Verdict::IfInIds => by_ids.push(n),
                        block::Verdict::Maybe => {}
                    }
                }
                if !tokens
                    .iter()
                    .all(|t| filter::may_have_token(flt.tokens(), t))
                {
                    return Ok(None);
                }
            }
            let bytes = segment::read_block(file, &b.r).map_err(|e| io(path, e))?;
            let data = &bytes[b.r.data.start as usize..];
            if !by_ids
                .iter()
                .all(|n| block::hex_column_may_hold(&b.r.header, data, n))
            {
                return Ok(None);
            }
            self.stats.blocks_decoded.fetch_add(1, Relaxed);
            // The longest needle picks the lines; the rest are checked after.
            let first = finders.iter().max_by_key(|f| f.needle().len());
            let entries = block::decode_containing(&b.r.header, data, first).ok_or_else(|| {
                Error::Corrupt {
                    path: path.clone(),
                    what: format!("block at byte {} does not decode", b.r.offset),
                }
            })?;
            let bound = match dir {
                Direction::Forward => b.r.header.min_ts,
                Direction::Backward => b.r.header.max_ts,
            };
            Ok(Some((
                bound,
                entries
                    .into_iter()
                    .filter(|(s, e)| {
                        wanted.get(*s as usize).copied().unwrap_or(false) && matches_line(e)
                    })
                    .map(|(s, e)| (streams[s as usize].clone(), e))
                    .collect(),
            )))
        };
        for window in cands.chunks(width) {
            let loaded: Vec<_> = if window.len() == 1 {
                vec![load(&window[0])]
            } else {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = window.iter().map(|c| sc.spawn(|| load(c))).collect();
                    hs.into_iter()
                        .map(|h| h.join().expect("block reader panicked"))
                        .collect()
                })
            };
            for l in loaded {
                if let Some((bound, batch)) = l?
                    && !f(bound, batch)
                {
                    return Ok(());
                }
            }
        }
        if let Some(h) = head
            && !h.is_empty()
        {
            let (bound, batch) = head_batch(h);
            f(bound, batch);
        }
        Ok(())
    }
}
