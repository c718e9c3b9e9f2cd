//! Lines split into a template and typed variables (the idea of CLP): each
//! ASCII letters-and-digits run that holds a digit is a variable, the rest of
//! the line is its template. A block keeps each distinct template once, one
//! template number per line, and the variables in columns by template and
//! position, so like values sit together:
//! - **integers** (digit runs up to 17 digits; leading zeros kept) as varints,
//!   each column plain or as zigzag deltas, whichever is shorter;
//! - **hex ids** (lower-case hex runs of even length 8–64 with a digit and a
//!   letter) as their bytes, in a column outside the compressed frame: random
//!   bytes do not compress, and a search for an id reads that column instead
//!   of decompressing the block ([`hex_column_may_hold`]);
//! - **other variables** (`x1y2`, `ABCD12`, long words) as strings; a run of a
//!   few letters then digits or digits then letters (`u123`, `100ms`) keeps its
//!   letters in the template around an integer.
//!
//! In a template, a variable is a marker byte that UTF-8 text never holds:
//! [`INT`], [`DICT`], or [`HEX`] followed by the id's length in bytes.

use std::collections::HashMap;

use crate::codec::{Reader, put_bytes, put_uvarint};

const INT: u8 = 0xF8;
const HEX: u8 = 0xF9;
const DICT: u8 = 0xFA;

/// Longest digit run stored as an integer (10^17 < 2^57 leaves room for the
/// leading-zero width).
const MAX_INT_DIGITS: usize = 17;
/// Hex ids between these lengths, in characters.
const MIN_HEX: usize = 8;
const MAX_HEX: usize = 64;
/// A run of letters this long is a variable even without a digit.
const LONG_WORD: usize = 24;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    /// With the id's length in bytes.
    Hex(u8),
    Dict,
}

/// What a letters-and-digits run is, given how many of its bytes are digits
/// and lower-case hex letters.
fn classify(run: &[u8], digits: usize, hex_letters: usize) -> Option<Kind> {
    if digits == run.len() && run.len() <= MAX_INT_DIGITS {
        return Some(Kind::Int);
    }
    if digits > 0
        && hex_letters > 0
        && digits + hex_letters == run.len()
        && run.len().is_multiple_of(2)
        && (MIN_HEX..=MAX_HEX).contains(&run.len())
    {
        return Some(Kind::Hex((run.len() / 2) as u8));
    }
    (digits > 0 || run.len() >= LONG_WORD).then_some(Kind::Dict)
}

/// Longest letters part of a number with a prefix or suffix (`u123`, `100ms`).
const MAX_AFFIX: usize = 4;

/// Where the letters and the digits of a run of a few letters then digits, or
/// digits then a few letters, meet.
fn affixed(run: &[u8]) -> Option<usize> {
    let at = run
        .iter()
        .position(|b| b.is_ascii_digit() != run[0].is_ascii_digit())?;
    let (head, tail) = run.split_at(at);
    let (letters, digits) = if run[0].is_ascii_digit() {
        (tail, head)
    } else {
        (head, tail)
    };
    let ok = letters.len() <= MAX_AFFIX
        && letters.iter().all(u8::is_ascii_alphabetic)
        && digits.len() <= MAX_INT_DIGITS
        && digits.iter().all(u8::is_ascii_digit);
    ok.then_some(at)
}

/// Byte classes: 0 not a letter or digit, then [`DIGIT`], [`HEX_LETTER`],
/// [`LETTER`].
const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = if b.is_ascii_digit() {
            DIGIT
        } else if b >= b'a' && b <= b'f' {
            HEX_LETTER
        } else if b.is_ascii_alphabetic() {
            LETTER
        } else {
            0
        };
        i += 1;
    }
    t
};
const DIGIT: u8 = 1;
const HEX_LETTER: u8 = 2;
const LETTER: u8 = 3;

/// A quick hasher for templates (FxHash's multiply-rotate over 8-byte words):
/// the store's own data, no attacker picks collisions worth more than a
/// slower block.
#[derive(Default, Clone, Copy)]
struct Quick(u64);

impl std::hash::Hasher for Quick {
    fn write(&mut self, b: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut h = self.0;
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
            h = (h.rotate_left(5) ^ v).wrapping_mul(K);
        }
        for &x in words.remainder() {
            h = (h.rotate_left(5) ^ u64::from(x)).wrapping_mul(K);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type QuickMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Quick>>;

/// An integer variable as stored: `v << 1` without leading zeros, else
/// `(v << 6 | digits) << 1 | 1`.
fn int_code(run: &[u8]) -> u64 {
    let v = run.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    if run.len() > 1 && run[0] == b'0' {
        ((v << 6 | run.len() as u64) << 1) | 1
    } else {
        v << 1
    }
}

fn push_int(out: &mut Vec<u8>, code: u64) {
    let mut buf = [0u8; 20];
    let (mut v, width) = if code & 1 == 1 {
        (code >> 7, ((code >> 1) & 63) as usize)
    } else {
        (code >> 1, 1)
    };
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let width = width.min(buf.len());
    while buf.len() - i < width {
        i -= 1;
        buf[i] = b'0';
    }
    out.extend_from_slice(&buf[i..]);
}

fn unhex(d: u8) -> u8 {
    if d.is_ascii_digit() {
        d - b'0'
    } else {
        d - b'a' + 10
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The lines of a block being encoded.
#[derive(Default)]
pub struct Encoder {
    ids: QuickMap<Vec<u8>, u32>,
    templates: Vec<Tpl>,
    per_line: Vec<u32>,
    text: Vec<u8>,
    /// The line being added's variables, before its template is known.
    split: Split,
}

/// One template and the variables of its lines, line after line.
#[derive(Default)]
struct Tpl {
    text: Vec<u8>,
    lines: u32,
    ints: Vec<u64>,
    hex: Vec<u8>,
    /// Ranges into `dict_text`.
    dicts: Vec<(u32, u32)>,
    dict_text: Vec<u8>,
}

/// A line's pieces, before its template is known.
#[derive(Default)]
struct Split {
    ints: Vec<u64>,
    hex: Vec<u8>,
    dicts: Vec<(usize, usize)>,
}

impl Encoder {
    /// Adds a line; pushes to `spans` the byte ranges of the letters-and-digits
    /// runs that hold its variables, but for hex ids (what the block's trigram
    /// filter takes from the line, beside [`Encoder::literals`]).
    pub fn add(&mut self, line: &str, spans: &mut Vec<(usize, usize)>) {
        let b = line.as_bytes();
        self.text.clear();
        let s = &mut self.split;
        s.ints.clear();
        s.hex.clear();
        s.dicts.clear();
        let mut i = 0;
        while i < b.len() {
            let lit = i;
            while i < b.len() && CLASS[usize::from(b[i])] == 0 {
                i += 1;
            }
            self.text.extend_from_slice(&b[lit..i]);
            if i == b.len() {
                break;
            }
            let start = i;
            let (mut digits, mut hex_letters) = (0, 0);
            while i < b.len() {
                match CLASS[usize::from(b[i])] {
                    0 => break,
                    DIGIT => digits += 1,
                    HEX_LETTER => hex_letters += 1,
                    _ => {}
                }
                i += 1;
            }
            let run = &b[start..i];
            match classify(run, digits, hex_letters) {
                None => self.text.extend_from_slice(run),
                Some(Kind::Int) => {
                    self.text.push(INT);
                    s.ints.push(int_code(run));
                    spans.push((start, i));
                }
                Some(Kind::Hex(n)) => {
                    self.text.extend_from_slice(&[HEX, n]);
                    s.hex
                        .extend(run.chunks_exact(2).map(|p| unhex(p[0]) << 4 | unhex(p[1])));
                }
                Some(Kind::Dict) => match affixed(run) {
                    // `u123`, `v2`, `30s`, `100ms`: the letters stay in the
                    // template, the number is an integer.
                    Some(at) => {
                        let (a, z) = if run[0].is_ascii_digit() {
                            (0, at)
                        } else {
                            (at, run.len())
                        };
                        self.text.extend_from_slice(&run[..a]);
                        self.text.push(INT);
                        s.ints.push(int_code(&run[a..z]));
                        self.text.extend_from_slice(&run[z..]);
                        spans.push((start, i));
                    }
                    None => {
                        self.text.push(DICT);
                        s.dicts.push((start, i));
                        spans.push((start, i));
                    }
                },
            }
        }
        let id = match self.ids.get(&self.text) {
            Some(id) => *id,
            None => {
                let id = self.templates.len() as u32;
                self.ids.insert(self.text.clone(), id);
                self.templates.push(Tpl {
                    text: self.text.clone(),
                    ..Tpl::default()
                });
                id
            }
        };
        self.per_line.push(id);
        let t = &mut self.templates[id as usize];
        t.lines += 1;
        t.ints.extend_from_slice(&s.ints);
        t.hex.extend_from_slice(&s.hex);
        for &(a, z) in &s.dicts {
            let at = t.dict_text.len() as u32;
            t.dict_text.extend_from_slice(&b[a..z]);
            t.dicts.push((at, (z - a) as u32));
        }
    }

    /// Calls `f` with each literal piece of every template (the text between
    /// its variables), once per block.
    pub fn literals(&self, mut f: impl FnMut(&[u8])) {
        for t in &self.templates {
            let mut start = 0;
            let mut i = 0;
            while i < t.text.len() {
                match t.text[i] {
                    INT | DICT => {
                        f(&t.text[start..i]);
                        start = i + 1;
                    }
                    HEX => {
                        f(&t.text[start..i]);
                        i += 1;
                        start = i + 1;
                    }
                    _ => {}
                }
                i += 1;
            }
            f(&t.text[start.min(t.text.len())..]);
        }
    }

    /// Writes the templates and the other variables to `out` (compressed with
    /// the rest of the block) and returns the hex column.
    pub fn finish(self, out: &mut Vec<u8>) -> Vec<u8> {
        put_uvarint(out, self.templates.len() as u64);
        for t in &self.templates {
            put_bytes(out, &t.text);
        }
        for id in &self.per_line {
            put_uvarint(out, u64::from(*id));
        }
        let mut hex = Vec::new();
        let mut plain = Vec::new();
        let mut delta = Vec::new();
        for t in &self.templates {
            let slots = slots(&t.text).unwrap_or_default();
            let n_int = slots.iter().filter(|k| **k == Kind::Int).count();
            let n_dict = slots.iter().filter(|k| **k == Kind::Dict).count();
            let row: usize = slots
                .iter()
                .map(|k| match k {
                    Kind::Hex(n) => usize::from(*n),
                    _ => 0,
                })
                .sum();
            let (mut ki, mut kd, mut off) = (0, 0, 0);
            for k in &slots {
                match k {
                    Kind::Int => {
                        plain.clear();
                        delta.clear();
                        let mut prev = 0u64;
                        for j in 0..t.lines as usize {
                            let v = t.ints[j * n_int + ki];
                            put_uvarint(&mut plain, v);
                            let d = v.wrapping_sub(prev) as i64;
                            put_uvarint(&mut delta, ((d << 1) ^ (d >> 63)) as u64);
                            prev = v;
                        }
                        if delta.len() < plain.len() {
                            out.push(1);
                            out.extend_from_slice(&delta);
                        } else {
                            out.push(0);
                            out.extend_from_slice(&plain);
                        }
                        ki += 1;
                    }
                    Kind::Dict => {
                        for j in 0..t.lines as usize {
                            let (a, len) = t.dicts[j * n_dict + kd];
                            put_bytes(out, &t.dict_text[a as usize..(a + len) as usize]);
                        }
                        kd += 1;
                    }
                    Kind::Hex(n) => {
                        let n = usize::from(*n);
                        for j in 0..t.lines as usize {
                            hex.extend_from_slice(&t.hex[j * row + off..j * row + off + n]);
                        }
                        off += n;
                    }
                }
            }
        }
        hex
    }
}

/// The variable slots of a template, in order; `None` for a malformed one.
fn slots(text: &[u8]) -> Option<Vec<Kind>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            INT => out.push(Kind::Int),
            DICT => out.push(Kind::Dict),
            HEX => {
                i += 1;
                let n = *text.get(i)?;
                if n == 0 {
                    return None;
                }
                out.push(Kind::Hex(n));
            }
            0xFB..=0xFF => return None,
            _ => {}
        }
        i += 1;
    }
    Some(out)
}

/// Where each variable of one template's lines is: per slot, the index of its
/// first value in the flat columns.
struct Decoded<'a> {
    text: &'a [u8],
    slots: Vec<Kind>,
    /// Per slot: start in `ints`, `dicts` or the hex column.
    starts: Vec<usize>,
}

/// Rebuilds `count` lines from the templates section in `r` and the hex
/// column: all lines one after the other, and where each ends.
pub fn decode(r: &mut Reader<'_>, count: usize, hex: &[u8]) -> Option<(Vec<u8>, Vec<usize>)> {
    let n = usize::try_from(r.uvarint()?).ok()?;
    // Every template takes at least one byte, every line one.
    if n > r.remaining() || count > r.remaining() {
        return None;
    }
    let mut tpls = Vec::with_capacity(n);
    for _ in 0..n {
        let text = r.bytes()?;
        tpls.push(Decoded {
            text,
            slots: slots(text)?,
            starts: Vec::new(),
        });
    }
    let mut per_line = Vec::with_capacity(count);
    let mut lines_of = vec![0usize; n];
    for _ in 0..count {
        let id = usize::try_from(r.uvarint()?).ok()?;
        *lines_of.get_mut(id)? += 1;
        per_line.push(id);
    }
    let mut ints: Vec<u64> = Vec::new();
    let mut dicts: Vec<&[u8]> = Vec::new();
    let mut hex_at = 0usize;
    for (t, lines) in tpls.iter_mut().zip(&lines_of) {
        let lines = *lines;
        for k in &t.slots {
            match k {
                Kind::Int => {
                    t.starts.push(ints.len());
                    let delta = match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return None,
                    };
                    if lines > r.remaining() {
                        return None;
                    }
                    let mut prev = 0u64;
                    for _ in 0..lines {
                        let v = r.uvarint()?;
                        let v = if delta {
                            let d = ((v >> 1) as i64) ^ -((v & 1) as i64);
                            prev.wrapping_add(d as u64)
                        } else {
                            v
                        };
                        ints.push(v);
                        prev = v;
                    }
                }
                Kind::Dict => {
                    t.starts.push(dicts.len());
                    if lines > r.remaining() {
                        return None;
                    }
                    for _ in 0..lines {
                        dicts.push(r.bytes()?);
                    }
                }
                Kind::Hex(b) => {
                    t.starts.push(hex_at);
                    hex_at = hex_at.checked_add(lines.checked_mul(usize::from(*b))?)?;
                }
            }
        }
    }
    if hex_at != hex.len() {
        return None;
    }
    // Every line is at least its template's literal text.
    let mut out = Vec::with_capacity(r.pos() + hex.len() * 2);
    let mut ends = Vec::with_capacity(count + 1);
    ends.push(0);
    let mut nth = vec![0usize; n];
    for id in per_line {
        let t = &tpls[id];
        let j = nth[id];
        nth[id] += 1;
        let mut slot = 0;
        let mut i = 0;
        while i < t.text.len() {
            let c = t.text[i];
            match c {
                INT => push_int(&mut out, ints[t.starts[slot] + j]),
                DICT => out.extend_from_slice(dicts[t.starts[slot] + j]),
                HEX => {
                    i += 1;
                    let b = usize::from(t.text[i]);
                    let at = t.starts[slot] + j * b;
                    for x in &hex[at..at + b] {
                        out.push(HEX_DIGITS[usize::from(x >> 4)]);
                        out.push(HEX_DIGITS[usize::from(x & 15)]);
                    }
                }
                _ => {
                    out.push(c);
                    i += 1;
                    continue;
                }
            }
            slot += 1;
            i += 1;
        }
        ends.push(out.len());
    }
    Some((out, ends))
}

/// Whether a hex column may hold `needle`, a run of lower-case hex digits:
/// its whole bytes at either nibble alignment. True when the needle is too
/// short to tell.
pub fn hex_column_may_hold(column: &[u8], needle: &[u8]) -> bool {
    if !is_hex_text(needle) {
        return true;
    }
    for align in 0..2 {
        let bytes: Vec<u8> = needle[align..]
            .chunks_exact(2)
            .map(|p| unhex(p[0]) << 4 | unhex(p[1]))
            .collect();
        if bytes.len() < 2 || memchr::memmem::find(column, &bytes).is_some() {
            return true;
        }
    }
    false
}

/// Whether every byte is a lower-case hex digit (what a hex id holds).
pub fn is_hex_text(b: &[u8]) -> bool {
    b.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(lines: &[&str]) -> (usize, usize) {
        let mut e = Encoder::default();
        let mut spans = Vec::new();
        for l in lines {
            e.add(l, &mut spans);
        }
        let mut out = Vec::new();
        let hex = e.finish(&mut out);
        let (text, ends) = decode(&mut Reader::new(&out), lines.len(), &hex).unwrap();
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(
                std::str::from_utf8(&text[ends[i]..ends[i + 1]]).unwrap(),
                *l
            );
        }
        (out.len(), hex.len())
    }

    #[test]
    fn lines_come_back_byte_for_byte() {
        round_trip(&[
            "",
            "plain words only",
            r#"10.0.37.101 - u42 [24/Nov/2026:00:05:09 +0000] "GET /a?page=7 HTTP/1.1" 200 0 rt=0.045 req_id=00ab34cd56ef7890"#,
            r#"{"ts":"2026-11-24T00:00:09.007Z","trace_id":"0123456789abcdef0123456789abcdef","n":-12}"#,
            "leading 007 and 0 and 00 and 12345678901234567 and 123456789012345678",
            "hex-like deadbeef ABCDEF12 abc123 0xff 1a2b3c 1a2b3c4d5e",
            "ünïcödé 12 日本 ab12 ☃",
            "averyveryverylongwordwithoutanydigits and words",
            "u42 v007 30s 100ms abcd12345 x1y2 15E148 u12345678901234567890",
            "18446744073709551615 99999999999999999",
        ]);
    }

    #[test]
    fn ids_are_stored_as_bytes_and_found_there() {
        let lines: Vec<String> = (0..100)
            .map(|i| format!("req {i} id={:016x}a1 done", 0x1234_5678_9abc_def0u64 + i))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let (_, hex) = round_trip(&refs);
        assert_eq!(hex, 100 * 9);
        let mut e = Encoder::default();
        let mut spans = Vec::new();
        e.add(&lines[5], &mut spans);
        assert_eq!(spans, [(4, 5)], "the number; the id is left out");
        let mut pieces = Vec::new();
        e.literals(|p| pieces.push(String::from_utf8_lossy(p).into_owned()));
        assert_eq!(pieces, ["req ", " id=", " done"]);
        let col = e.finish(&mut Vec::new());
        assert!(hex_column_may_hold(&col, b"123456789abcdef5"));
        assert!(
            hex_column_may_hold(&col, b"23456789abcdef5a"),
            "odd alignment"
        );
        assert!(!hex_column_may_hold(&col, b"123456789abcdef6"));
        assert!(hex_column_may_hold(&col, b"12"), "too short to tell");
    }

    proptest::proptest! {
        #[test]
        fn any_text_comes_back_and_any_bytes_never_panic(data: Vec<u8>, text: String) {
            crate::fuzzing::lines(&data);
            crate::fuzzing::lines(text.as_bytes());
        }
    }

    #[test]
    fn malformed_sections_are_refused() {
        let mut e = Encoder::default();
        e.add("a 12 b 0123456789abcdef c x9", &mut Vec::new());
        let mut out = Vec::new();
        let hex = e.finish(&mut out);
        for cut in 0..out.len() {
            assert!(decode(&mut Reader::new(&out[..cut]), 1, &hex).is_none());
        }
        assert!(decode(&mut Reader::new(&out), 1, &hex[1..]).is_none());
        assert!(decode(&mut Reader::new(&out), 2, &hex).is_none());
    }
}
