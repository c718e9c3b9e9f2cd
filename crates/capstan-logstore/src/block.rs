//! Blocks: a run of entries (of one or several streams), zstd-compressed, with
//! their time and sequence ranges and a trigram filter in a header that can be
//! read without decompressing. Byte layout in `FORMAT.md`.

use std::borrow::Cow;

use crate::codec::{Reader, put_bytes, put_uvarint, put_varint};
use crate::{filter, template};

/// One log line as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Unix time in nanoseconds.
    pub ts_ns: i64,
    /// Store-wide sequence number, given by the store on append (ignored on input):
    /// increasing in append order, so a cursor can resume without gaps or
    /// duplicates.
    pub seq: u64,
    pub line: String,
    /// Structured metadata (`trace_id`, `level`, …).
    pub meta: Vec<(String, String)>,
}

/// Codec byte: one zstd frame of entries one after the other (written by
/// earlier versions; still read).
pub const CODEC_ZSTD: u8 = 1;
/// Codec byte: one zstd frame of the entries' fields in columns (written by
/// earlier versions; still read).
pub const CODEC_ZSTD_COLUMNS: u8 = 2;
/// Codec byte: the lines as templates and typed variables
/// ([`crate::template`]): the hex ids' column as is, then one zstd frame of
/// the other columns.
pub const CODEC_TEMPLATES: u8 = 3;

/// What a block header says, kept in memory for every block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Stream ids (of the segment file) present in the block, ascending.
    pub streams: Vec<u32>,
    pub min_ts: i64,
    pub max_ts: i64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u32,
    /// Uncompressed size of the entries.
    pub raw_len: u32,
    /// How the entries are laid out ([`CODEC_ZSTD`], [`CODEC_ZSTD_COLUMNS`],
    /// [`CODEC_TEMPLATES`]).
    pub codec: u8,
    /// Size of the lines' text (`raw_len` before [`CODEC_TEMPLATES`]): what
    /// blocks are cut by.
    pub text_len: u32,
}

/// A block encoded: header fields, then the filter, then the compressed
/// entries; with `templates` the lines as templates and variables
/// ([`CODEC_TEMPLATES`]), else as text ([`CODEC_ZSTD_COLUMNS`]).
pub fn encode(entries: &[(u32, &Entry)], level: i32, templates: bool) -> Vec<u8> {
    let mut streams: Vec<u32> = entries.iter().map(|(s, _)| *s).collect();
    streams.sort_unstable();
    streams.dedup();
    // Columns: stream indexes, time deltas, sequence deltas, metadata, then
    // the lines as templates and variables, so like values sit together.
    let mut idx = Vec::with_capacity(entries.len());
    let mut tss = Vec::with_capacity(entries.len() * 3);
    let mut seqs = Vec::with_capacity(entries.len());
    let mut metas = Vec::new();
    let mut lines = template::Encoder::default();
    let mut lens = Vec::new();
    let mut text = Vec::new();
    let mut spans = Vec::new();
    let mut text_len = 0usize;
    let mut f = filter::Builder::default();
    let mut toks: Vec<u64> = Vec::new();
    let (mut prev_ts, mut prev_seq) = (0i64, 0u64);
    let (mut min_ts, mut max_ts) = (i64::MAX, i64::MIN);
    let (mut first_seq, mut last_seq) = (u64::MAX, 0u64);
    for (s, e) in entries {
        let si = streams.binary_search(s).unwrap_or(0);
        put_uvarint(&mut idx, si as u64);
        put_varint(&mut tss, e.ts_ns.wrapping_sub(prev_ts));
        put_uvarint(&mut seqs, e.seq.wrapping_sub(prev_seq));
        text_len += e.line.len();
        if templates {
            spans.clear();
            lines.add(&e.line, &mut spans);
            // The filter takes each variable here and the templates' text once.
            for (a, z) in &spans {
                f.add(&e.line.as_bytes()[*a..*z]);
            }
        } else {
            put_uvarint(&mut lens, e.line.len() as u64);
            text.extend_from_slice(e.line.as_bytes());
            f.add(e.line.as_bytes());
        }
        put_meta(&mut metas, e);
        toks.extend(e.meta.iter().map(|(k, v)| filter::token_hash(k, v)));
        prev_ts = e.ts_ns;
        prev_seq = e.seq;
        min_ts = min_ts.min(e.ts_ns);
        max_ts = max_ts.max(e.ts_ns);
        first_seq = first_seq.min(e.seq);
        last_seq = last_seq.max(e.seq);
    }
    let mut raw = idx;
    let hex = if templates {
        for col in [tss, seqs, metas] {
            raw.extend_from_slice(&col);
        }
        lines.literals(|piece| f.add(piece));
        lines.finish(&mut raw)
    } else {
        for col in [tss, seqs, lens, metas, text] {
            raw.extend_from_slice(&col);
        }
        Vec::new()
    };
    let mut out = Vec::with_capacity(raw.len() / 4 + 64);
    put_uvarint(&mut out, streams.len() as u64);
    for s in &streams {
        put_uvarint(&mut out, u64::from(*s));
    }
    put_varint(&mut out, min_ts);
    put_varint(&mut out, max_ts);
    put_uvarint(&mut out, first_seq);
    put_uvarint(&mut out, last_seq);
    put_uvarint(&mut out, entries.len() as u64);
    put_uvarint(&mut out, raw.len() as u64);
    put_bytes(&mut out, &f.finish());
    put_bytes(&mut out, &filter::token_filter(toks));
    if templates {
        out.push(CODEC_TEMPLATES);
        put_uvarint(&mut out, text_len as u64);
        // Ids compressed on their own, fast, when that pays (repeated ones: a
        // trace's id on each of its lines); random ones are kept as they are,
        // so a search reads them straight from the block.
        let z = if hex.is_empty() {
            Vec::new()
        } else {
            zstd::bulk::compress(&hex, 1).expect("zstd compresses in memory")
        };
        if z.len() + z.len() / 8 < hex.len() {
            put_uvarint(&mut out, (hex.len() as u64) << 1 | 1);
            put_bytes(&mut out, &z);
        } else {
            put_uvarint(&mut out, (hex.len() as u64) << 1);
            out.extend_from_slice(&hex);
        }
    } else {
        out.push(CODEC_ZSTD_COLUMNS);
    }
    let compressed = zstd::bulk::compress(&raw, level).expect("zstd compresses in memory");
    out.extend_from_slice(&compressed);
    out
}

/// Values at least this long that occur in their line are stored as a
/// reference into it (metadata lifted from the line repeats part of it).
const MIN_REF: usize = 8;

/// An entry's metadata in the columns layout: `m`, then per pair the key and
/// either `0` and the value, or `1 + position` and the length of the value in
/// the entry's line.
fn put_meta(out: &mut Vec<u8>, e: &Entry) {
    put_uvarint(out, e.meta.len() as u64);
    for (k, v) in &e.meta {
        put_bytes(out, k.as_bytes());
        let at = if v.len() >= MIN_REF {
            find_short(e.line.as_bytes(), v.as_bytes())
        } else {
            None
        };
        match at {
            Some(p) => {
                put_uvarint(out, p as u64 + 1);
                put_uvarint(out, v.len() as u64);
            }
            None => {
                put_uvarint(out, 0);
                put_bytes(out, v.as_bytes());
            }
        }
    }
}

/// The first position of `needle` (not empty) in `hay`: candidates by the
/// needle's first byte, for short needles in short lines where building a
/// `memmem` searcher costs more than the search.
fn find_short(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memchr_iter(needle[0], hay).find(|&p| hay[p..].starts_with(needle))
}

/// Reads one metadata value written by [`put_meta`], given the entry's line.
fn read_meta_value<'a>(r: &mut Reader<'a>, line: &'a str) -> Option<&'a str> {
    match r.uvarint()? {
        0 => r.str(),
        p => {
            let start = usize::try_from(p - 1).ok()?;
            let len = usize::try_from(r.uvarint()?).ok()?;
            line.get(start..start.checked_add(len)?)
        }
    }
}

/// A decoded header and where the filter and the compressed data are in the
/// block's bytes.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub header: Header,
    pub filter: std::ops::Range<usize>,
    /// The token filter, right after the trigram filter's.
    pub tokens: std::ops::Range<usize>,
    pub data: std::ops::Range<usize>,
}

/// Largest uncompressed block accepted when reading (guards against a corrupt
/// length asking for gigabytes).
pub const MAX_RAW: u32 = 64 << 20;

pub fn parse_header(b: &[u8]) -> Option<Parsed> {
    let mut r = Reader::new(b);
    let n = r.uvarint()?;
    if n > 1 << 20 {
        return None;
    }
    let mut streams = Vec::with_capacity(n as usize);
    for _ in 0..n {
        streams.push(u32::try_from(r.uvarint()?).ok()?);
    }
    let min_ts = r.varint()?;
    let max_ts = r.varint()?;
    let first_seq = r.uvarint()?;
    let last_seq = r.uvarint()?;
    let count = u32::try_from(r.uvarint()?).ok()?;
    let raw_len = u32::try_from(r.uvarint()?).ok()?;
    if raw_len > MAX_RAW {
        return None;
    }
    let flen = usize::try_from(r.uvarint()?).ok()?;
    let fstart = r.pos();
    r.take(flen)?;
    let tlen = usize::try_from(r.uvarint()?).ok()?;
    let tstart = r.pos();
    r.take(tlen)?;
    let codec = r.u8()?;
    if !(CODEC_ZSTD..=CODEC_TEMPLATES).contains(&codec) {
        return None;
    }
    let text_len = if codec == CODEC_TEMPLATES {
        u32::try_from(r.uvarint()?).ok()?
    } else {
        raw_len
    };
    Some(Parsed {
        header: Header {
            streams,
            min_ts,
            max_ts,
            first_seq,
            last_seq,
            count,
            raw_len,
            codec,
            text_len,
        },
        filter: fstart..fstart + flen,
        tokens: tstart..tstart + tlen,
        data: r.pos()..b.len(),
    })
}

/// Decodes the entries of a block: (stream id, entry) in stored order.
pub fn decode(h: &Header, compressed: &[u8]) -> Option<Vec<(u32, Entry)>> {
    decode_containing(h, compressed, None)
}

/// [`decode`], keeping only entries whose line contains `needle` (when
/// given). Blocks in columns search their lines as one run of bytes and build
/// only the entries that match.
pub fn decode_containing(
    h: &Header,
    compressed: &[u8],
    needle: Option<&memchr::memmem::Finder<'_>>,
) -> Option<Vec<(u32, Entry)>> {
    let (hex, compressed) = split_hex(h, compressed)?;
    let raw = zstd::bulk::decompress(compressed, h.raw_len as usize).ok()?;
    if raw.len() != h.raw_len as usize {
        return None;
    }
    match h.codec {
        CODEC_ZSTD_COLUMNS | CODEC_TEMPLATES => decode_columns(h, &raw, &hex, needle),
        _ => {
            let mut all = decode_rows(h, &raw)?;
            if let Some(n) = needle {
                all.retain(|(_, e)| n.find(e.line.as_bytes()).is_some());
            }
            Some(all)
        }
    }
}

/// A block's hex column (empty before [`CODEC_TEMPLATES`]) and its
/// compressed frame.
fn split_hex<'a>(h: &Header, data: &'a [u8]) -> Option<(Cow<'a, [u8]>, &'a [u8])> {
    if h.codec != CODEC_TEMPLATES {
        return Some((Cow::Borrowed(&[]), data));
    }
    let mut r = Reader::new(data);
    let v = r.uvarint()?;
    let len = u32::try_from(v >> 1).ok()?;
    if len > MAX_RAW {
        return None;
    }
    let hex = if v & 1 == 0 {
        Cow::Borrowed(r.take(len as usize)?)
    } else {
        let z = zstd::bulk::decompress(r.bytes()?, len as usize).ok()?;
        if z.len() != len as usize {
            return None;
        }
        Cow::Owned(z)
    };
    Some((hex, &data[r.pos()..]))
}

/// What a block's trigram filter says of a needle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The block does not hold it.
    No,
    /// It may.
    Maybe,
    /// Only in a hex id, if at all: ask the hex column.
    IfInIds,
}

/// What the trigram filter `trigrams` of a block of `codec` says of `needle`.
pub fn filter_verdict(codec: u8, trigrams: &[u8], needle: &[u8]) -> Verdict {
    let yes = |b| if b { Verdict::Maybe } else { Verdict::No };
    if codec != CODEC_TEMPLATES {
        return yes(filter::may_contain(trigrams, needle));
    }
    // The filter leaves out hex ids: a needle of hex digits only is in one,
    // or wholly in a run of letters and digits the filter has.
    if template::is_hex_text(needle) {
        return if filter::may_contain(trigrams, needle) {
            Verdict::Maybe
        } else {
            Verdict::IfInIds
        };
    }
    yes(filter::may_contain_templated(trigrams, needle, true))
}

/// Whether a block may hold `needle` in a hex id, by its hex column (see
/// [`template::hex_column_may_hold`]); always true for blocks without one.
pub fn hex_column_may_hold(h: &Header, data: &[u8], needle: &[u8]) -> bool {
    match split_hex(h, data) {
        Some((hex, _)) if h.codec == CODEC_TEMPLATES => template::hex_column_may_hold(&hex, needle),
        _ => true,
    }
}

fn decode_columns(
    h: &Header,
    raw: &[u8],
    hex: &[u8],
    needle: Option<&memchr::memmem::Finder<'_>>,
) -> Option<Vec<(u32, Entry)>> {
    let n = h.count as usize;
    // Every entry takes at least five bytes of columns.
    if n > raw.len() / 5 {
        return None;
    }
    let mut r = Reader::new(raw);
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let si = usize::try_from(r.uvarint()?).ok()?;
        streams.push(*h.streams.get(si)?);
    }
    let mut ts = Vec::with_capacity(n);
    let mut t = 0i64;
    for _ in 0..n {
        t = t.wrapping_add(r.varint()?);
        ts.push(t);
    }
    let mut seqs = Vec::with_capacity(n);
    let mut q = 0u64;
    for _ in 0..n {
        q = q.wrapping_add(r.uvarint()?);
        seqs.push(q);
    }
    // Line i is lines[offsets[i]..offsets[i + 1]].
    let mut offsets = Vec::with_capacity(n + 1);
    if h.codec == CODEC_ZSTD_COLUMNS {
        offsets.push(0usize);
        for _ in 0..n {
            let len = usize::try_from(r.uvarint()?).ok()?;
            offsets.push(offsets.last()?.checked_add(len)?);
        }
    }
    // Metadata: where each entry's pairs start; read only for kept entries.
    let mut meta_at = Vec::with_capacity(n);
    for _ in 0..n {
        meta_at.push(r.pos());
        let m = r.uvarint()?;
        for _ in 0..m {
            r.str()?;
            if r.uvarint()? == 0 {
                r.str()?;
            } else {
                r.uvarint()?;
            }
        }
    }
    let built;
    let lines = if h.codec == CODEC_TEMPLATES {
        let (text, ends) = template::decode(&mut r, n, hex)?;
        offsets = ends;
        built = text;
        &built[..]
    } else {
        r.take(*offsets.last()?)?
    };
    if !r.is_empty() {
        return None;
    }
    let entry = |i: usize| -> Option<(u32, Entry)> {
        let text = std::str::from_utf8(&lines[offsets[i]..offsets[i + 1]]).ok()?;
        let mut m = Reader::new(&raw[meta_at[i]..]);
        let count = m.uvarint()?;
        let mut meta = Vec::with_capacity(count.min(64) as usize);
        for _ in 0..count {
            let k = m.str()?.to_owned();
            meta.push((k, read_meta_value(&mut m, text)?.to_owned()));
        }
        let line = text.to_owned();
        Some((
            streams[i],
            Entry {
                ts_ns: ts[i],
                seq: seqs[i],
                line,
                meta,
            },
        ))
    };
    let Some(needle) = needle.filter(|f| !f.needle().is_empty()) else {
        return (0..n).map(entry).collect();
    };
    // One search over all lines; a hit keeps its line if it lies inside it,
    // and the search goes on from the next line.
    let mut out = Vec::new();
    let mut pos = 0;
    let len = needle.needle().len();
    while pos < lines.len() {
        let Some(hit) = needle.find(&lines[pos..]) else {
            break;
        };
        let at = pos + hit;
        // The line holding `at`: the last offset at or before it.
        let i = offsets.partition_point(|o| *o <= at) - 1;
        if at + len <= offsets[i + 1] {
            out.push(entry(i)?);
        }
        pos = offsets[i + 1].max(at + 1);
    }
    Some(out)
}

fn decode_rows(h: &Header, raw: &[u8]) -> Option<Vec<(u32, Entry)>> {
    let mut r = Reader::new(raw);
    let mut out = Vec::with_capacity(h.count as usize);
    let (mut ts, mut seq) = (0i64, 0u64);
    while !r.is_empty() {
        let si = usize::try_from(r.uvarint()?).ok()?;
        let stream = *h.streams.get(si)?;
        ts = ts.wrapping_add(r.varint()?);
        seq = seq.wrapping_add(r.uvarint()?);
        let line = r.str()?.to_owned();
        let n = r.uvarint()?;
        if n > raw.len() as u64 {
            return None;
        }
        let mut meta = Vec::with_capacity(n as usize);
        for _ in 0..n {
            meta.push((r.str()?.to_owned(), r.str()?.to_owned()));
        }
        out.push((
            stream,
            Entry {
                ts_ns: ts,
                seq,
                line,
                meta,
            },
        ));
    }
    (out.len() == h.count as usize).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(ts: i64, seq: u64, line: &str) -> Entry {
        Entry {
            ts_ns: ts,
            seq,
            line: line.into(),
            meta: vec![("trace_id".into(), format!("{seq:032x}"))],
        }
    }

    #[test]
    fn round_trip_with_several_streams() {
        let a = e(1_000, 1, "first line");
        let b = e(900, 2, "second, older");
        let c = e(2_000, 5, "third ü");
        let bytes = encode(&[(7, &a), (3, &b), (7, &c)], 1, true);
        let p = parse_header(&bytes).unwrap();
        assert_eq!(p.header.streams, vec![3, 7]);
        assert_eq!((p.header.min_ts, p.header.max_ts), (900, 2_000));
        assert_eq!((p.header.first_seq, p.header.last_seq), (1, 5));
        assert!(filter::may_contain(&bytes[p.filter.clone()], b"older"));
        let t = &bytes[p.tokens.clone()];
        assert!(filter::may_have_token(
            t,
            &filter::token("trace_id", &format!("{:032x}", 5))
        ));
        assert!(!filter::may_have_token(
            t,
            &filter::token("trace_id", "absent")
        ));
        let got = decode(&p.header, &bytes[p.data]).unwrap();
        assert_eq!(got, vec![(7, a), (3, b), (7, c)]);
    }

    /// The header of the two-entry blocks written by hand below.
    fn two_entries(codec: u8, raw_len: usize) -> Header {
        Header {
            streams: vec![4, 9],
            min_ts: 5,
            max_ts: 10,
            first_seq: 1,
            last_seq: 2,
            count: 2,
            raw_len: raw_len as u32,
            codec,
            text_len: raw_len as u32,
        }
    }

    #[test]
    fn blocks_of_the_row_layout_still_read() {
        // Codec 1, as earlier versions wrote it: entries one after the other.
        let (a, b) = (e(10, 1, "row one"), e(5, 2, "row two"));
        let mut raw = Vec::new();
        let mut prev = (0i64, 0u64);
        for (si, x) in [(1u64, &a), (0, &b)] {
            put_uvarint(&mut raw, si);
            put_varint(&mut raw, x.ts_ns - prev.0);
            put_uvarint(&mut raw, x.seq - prev.1);
            put_bytes(&mut raw, x.line.as_bytes());
            put_uvarint(&mut raw, x.meta.len() as u64);
            for (k, v) in &x.meta {
                put_bytes(&mut raw, k.as_bytes());
                put_bytes(&mut raw, v.as_bytes());
            }
            prev = (x.ts_ns, x.seq);
        }
        let h = two_entries(CODEC_ZSTD, raw.len());
        let z = zstd::bulk::compress(&raw, 1).unwrap();
        assert_eq!(decode(&h, &z).unwrap(), vec![(9, a), (4, b)]);
        // The same bytes read as columns do not decode.
        let h = Header {
            codec: CODEC_ZSTD_COLUMNS,
            ..h
        };
        assert_eq!(decode(&h, &z), None);
    }

    #[test]
    fn blocks_of_the_plain_columns_layout_still_read() {
        // Codec 2, as earlier versions wrote it: streams, times, sequences,
        // line lengths, metadata, then the lines as they are.
        let (a, mut b) = (e(10, 1, "col one 42"), e(5, 2, "col two"));
        b.meta = vec![("k".into(), "v".into())];
        let mut cols: [Vec<u8>; 6] = Default::default();
        let mut prev = (0i64, 0u64);
        for (si, x) in [(1u64, &a), (0, &b)] {
            put_uvarint(&mut cols[0], si);
            put_varint(&mut cols[1], x.ts_ns - prev.0);
            put_uvarint(&mut cols[2], x.seq - prev.1);
            put_uvarint(&mut cols[3], x.line.len() as u64);
            put_meta(&mut cols[4], x);
            cols[5].extend_from_slice(x.line.as_bytes());
            prev = (x.ts_ns, x.seq);
        }
        let raw = cols.concat();
        let h = two_entries(CODEC_ZSTD_COLUMNS, raw.len());
        let z = zstd::bulk::compress(&raw, 1).unwrap();
        assert_eq!(decode(&h, &z).unwrap(), vec![(9, a.clone()), (4, b)]);
        let one = memchr::memmem::Finder::new("42");
        assert_eq!(decode_containing(&h, &z, Some(&one)).unwrap(), vec![(9, a)]);
    }

    proptest::proptest! {
        /// Lines of words, numbers, ids, affixed numbers and punctuation: any
        /// piece of any line gets past the block's filters (no false
        /// negative), and is found.
        #[test]
        fn filters_never_hide_a_needle_that_is_there(
            parts in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        "[a-zA-Z]{1,8}",
                        "[0-9]{1,20}",
                        "[0-9a-f]{8,20}",
                        "[a-z]{1,5}[0-9]{1,4}",
                        "[0-9]{1,4}[a-z]{1,5}",
                        "[ =:\"/.,{}-]{1,3}",
                        "ü|日本",
                    ],
                    1..12,
                ),
                1..20,
            ),
            templates: bool,
            pick in 0usize..1000,
            from in 0usize..1000,
            len in 1usize..40,
        ) {
            let lines: Vec<String> = parts.iter().map(|p| p.concat()).collect();
            let entries: Vec<Entry> = lines
                .iter()
                .enumerate()
                .map(|(i, l)| e(i as i64, i as u64 + 1, l))
                .collect();
            let refs: Vec<(u32, &Entry)> = entries.iter().map(|x| (0, x)).collect();
            let bytes = encode(&refs, 1, templates);
            let p = parse_header(&bytes).unwrap();
            let codec = if templates { CODEC_TEMPLATES } else { CODEC_ZSTD_COLUMNS };
            proptest::prop_assert_eq!(p.header.codec, codec);
            proptest::prop_assert_eq!(
                decode(&p.header, &bytes[p.data.clone()]).unwrap(),
                refs.iter().map(|(s, x)| (*s, (*x).clone())).collect::<Vec<_>>()
            );
            let line = lines[pick % lines.len()].as_bytes();
            let start = from % line.len().max(1);
            let end = (start + len).min(line.len());
            let needle = &line[start..end];
            proptest::prop_assume!(!needle.is_empty());
            let data = &bytes[p.data.clone()];
            let verdict = filter_verdict(p.header.codec, &bytes[p.filter.clone()], needle);
            proptest::prop_assert_ne!(verdict, Verdict::No, "{:?}", String::from_utf8_lossy(needle));
            if verdict == Verdict::IfInIds {
                proptest::prop_assert!(hex_column_may_hold(&p.header, data, needle));
            }
            let finder = memchr::memmem::Finder::new(needle);
            let found = decode_containing(&p.header, data, Some(&finder)).unwrap();
            proptest::prop_assert!(found.iter().any(|(_, x)| x.line.as_bytes() == line));
        }
    }

    #[test]
    fn metadata_found_in_the_line_is_stored_once() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let line = format!(r#"{{"level":"info","trace_id":"{id}","msg":"ü ok"}}"#);
        let with = Entry {
            ts_ns: 1,
            seq: 1,
            line: line.clone(),
            meta: vec![
                ("level".into(), "info".into()),
                ("trace_id".into(), id.into()),
                ("span_id".into(), "00f067aa0ba902b7".into()),
            ],
        };
        let bytes = encode(&[(1, &with)], 1, true);
        let p = parse_header(&bytes).unwrap();
        assert_eq!(
            decode(&p.header, &bytes[p.data.clone()]).unwrap(),
            vec![(1, with.clone())]
        );
        let plain = Entry {
            meta: vec![
                ("level".into(), "info".into()),
                ("span_id".into(), "00f067aa0ba902b7".into()),
            ],
            ..with.clone()
        };
        let raw = |e: &Entry| {
            let b = encode(&[(1, e)], 1, true);
            parse_header(&b).unwrap().header.raw_len
        };
        // The trace id costs its key and a reference, not its 32 bytes.
        assert!(
            raw(&with) <= raw(&plain) + 16,
            "{} vs {}",
            raw(&with),
            raw(&plain)
        );
    }

    #[test]
    fn a_needle_keeps_only_lines_that_hold_it() {
        let lines = ["", "abc", "xxab", "cab", "", "abcabc", "zzz", "ab"];
        let es: Vec<Entry> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| e(i as i64, i as u64 + 1, l))
            .collect();
        let refs: Vec<(u32, &Entry)> = es.iter().map(|x| (1, x)).collect();
        let bytes = encode(&refs, 1, true);
        let p = parse_header(&bytes).unwrap();
        for needle in [
            "abc", "ab", "b", "c", "bca", "zzz", "q", "x", "abcab", "cabc",
        ] {
            let f = memchr::memmem::Finder::new(needle);
            let got: Vec<String> = decode_containing(&p.header, &bytes[p.data.clone()], Some(&f))
                .unwrap()
                .into_iter()
                .map(|(_, e)| e.line)
                .collect();
            let want: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.contains(needle))
                .collect();
            assert_eq!(got, want, "{needle:?}");
        }
        let f = memchr::memmem::Finder::new("");
        assert_eq!(
            decode_containing(&p.header, &bytes[p.data.clone()], Some(&f))
                .unwrap()
                .len(),
            lines.len()
        );
    }

    #[test]
    fn garbage_never_panics() {
        let good = encode(
            &[(1, &e(5, 1, "hello there")), (1, &e(6, 2, "there"))],
            1,
            true,
        );
        let needle = memchr::memmem::Finder::new("ther");
        for cut in 0..good.len() {
            let b = &good[..cut];
            if let Some(p) = parse_header(b) {
                let _ = decode(&p.header, &b[p.data.clone()]);
                let _ = decode_containing(&p.header, &b[p.data], Some(&needle));
            }
        }
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x5a;
            if let Some(p) = parse_header(&b) {
                let _ = decode(&p.header, &b[p.data.clone()]);
                let _ = decode_containing(&p.header, &b[p.data], Some(&needle));
            }
        }
    }
}
