//! The sample chunk: up to [`MAX_SAMPLES`] (timestamp, value) pairs of one series
//! in a bit stream. Timestamps are delta-of-delta coded (a regular scrape interval
//! costs one bit); values that are decimals with few digits (most metrics:
//! counters, byte gauges, seconds with a few decimals) are turned into integers at
//! a per-chunk scale and delta-of-delta coded (a constant or a steady counter costs
//! one bit); any other value falls back to Gorilla's XOR coding, so every float —
//! NaN payloads, the stale marker, ±Inf, -0.0 — comes back bit for bit.
//! The byte layout is in `FORMAT.md`.

use crate::bits::{BitReader, BitWriter};

/// Samples per chunk at most.
pub const MAX_SAMPLES: u16 = 240;
/// Largest decimal scale: values with up to this many decimals are coded as integers.
pub const MAX_SCALE: u8 = 12;

const POW10: [f64; MAX_SCALE as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12,
];
const IPOW10: [i64; MAX_SCALE as usize + 1] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
    100_000_000_000,
    1_000_000_000_000,
];

/// `v` as an integer `m` with `v == m / 10^scale` exactly, if there is one.
fn to_int(v: f64, scale: u8) -> Option<i64> {
    if !v.is_finite() || (v == 0.0 && v.is_sign_negative()) {
        return None;
    }
    let m = (v * POW10[scale as usize]).round();
    if m.abs() > 9_007_199_254_740_992.0 {
        return None;
    }
    let m = m as i64;
    (from_int(m, scale).to_bits() == v.to_bits()).then_some(m)
}

#[inline(always)]
fn from_int(m: i64, scale: u8) -> f64 {
    if scale == 0 {
        m as f64
    } else {
        m as f64 / POW10[scale as usize]
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// Prefix codes for integers (zig-zag encoded), and two value-only markers.
/// Payload sizes of the integer buckets; bucket n is written as n one-bits, a
/// zero bit, then its payload. After as many ones as there are buckets come the
/// markers: `…0` rescale, `…1` XOR.
const PAYLOADS: [u32; NB] = PAYLOAD_BITS;
const NB: usize = PAYLOAD_BITS.len();
const PAYLOAD_BITS: [u32; 7] = [0, 6, 11, 17, 24, 32, 64];

fn put_prefix(w: &mut BitWriter, ones: u32, terminated: bool) {
    w.bits((1u64 << ones) - 1, ones);
    if terminated {
        w.bit(false);
    }
}

fn put_marker(w: &mut BitWriter, xor: bool) {
    put_prefix(w, NB as u32, false);
    w.bit(xor);
}

fn put_int(w: &mut BitWriter, z: u64) {
    for (n, payload) in PAYLOADS.into_iter().enumerate() {
        if payload == 64 || z < (1u64 << payload) {
            put_prefix(w, n as u32, true);
            if payload > 0 {
                w.bits(z, payload);
            }
            return;
        }
    }
}

enum Code {
    Int(u64),
    Rescale,
    Xor,
}

/// Reads an integer code; `None` on a marker or a truncated stream.
#[inline(always)]
fn get_int(r: &mut BitReader<'_>) -> Option<u64> {
    match get_value_code(r)? {
        Code::Int(z) => Some(z),
        _ => None,
    }
}

/// Reads a value code: the integer buckets, or after six ones a marker
/// (`…0` rescale, `…1` XOR).
#[inline(always)]
fn get_value_code(r: &mut BitReader<'_>) -> Option<Code> {
    let ones = r.unary(NB as u32)? as usize;
    if ones == NB {
        return Some(if r.bit()? { Code::Xor } else { Code::Rescale });
    }
    Some(Code::Int(if PAYLOADS[ones] == 0 {
        0
    } else {
        r.bits(PAYLOADS[ones])?
    }))
}

fn put_xor(w: &mut BitWriter, v: f64, prev: f64) {
    let x = v.to_bits() ^ prev.to_bits();
    if x == 0 {
        w.bit(false);
        return;
    }
    w.bit(true);
    let lead = x.leading_zeros().min(63);
    let trail = x.trailing_zeros();
    let sig = 64 - lead - trail;
    w.bits(u64::from(lead), 6);
    w.bits(u64::from(sig - 1), 6);
    w.bits(x >> trail, sig);
}

fn get_xor(r: &mut BitReader<'_>, prev: f64) -> Option<f64> {
    if !r.bit()? {
        return Some(prev);
    }
    let lead = r.bits(6)? as u32;
    let sig = r.bits(6)? as u32 + 1;
    if lead + sig > 64 {
        return None;
    }
    let trail = 64 - lead - sig;
    let x = r.bits(sig)? << trail;
    Some(f64::from_bits(prev.to_bits() ^ x))
}

/// Decoder and encoder share this state, so both take the same decisions.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    t: i64,
    t_delta: i64,
    v: f64,
    scale: u8,
    /// The previous value as an integer at `scale`, when it is one.
    m: Option<i64>,
    m_delta: i64,
}

/// Why a sample cannot go into a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendError {
    /// The chunk holds [`MAX_SAMPLES`] samples.
    Full,
    /// The timestamp is not after the last one.
    OutOfOrder,
}

/// A chunk being written.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    w: BitWriter,
    count: u16,
    state: Option<State>,
}

impl Chunk {
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn first_last(&self) -> Option<(i64, i64)> {
        let s = self.state?;
        let first = self.iter().next()?.0;
        Some((first, s.t))
    }

    /// Size of the encoded chunk in bytes (as [`Chunk::bytes`] returns it).
    pub fn size(&self) -> usize {
        2 + self.w.bytes().len()
    }

    /// The encoded chunk: sample count (u16, big endian) and the bit stream.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(self.w.bytes());
        out
    }

    /// [`Chunk::bytes`] in a shared buffer, with one allocation.
    pub fn shared_bytes(&self) -> std::sync::Arc<[u8]> {
        self.count
            .to_be_bytes()
            .into_iter()
            .chain(self.w.bytes().iter().copied())
            .collect()
    }

    pub fn append(&mut self, t: i64, v: f64) -> Result<(), AppendError> {
        if self.count >= MAX_SAMPLES {
            return Err(AppendError::Full);
        }
        let w = &mut self.w;
        let Some(mut s) = self.state else {
            w.bits(t as u64, 64);
            let scale = (0..=MAX_SCALE)
                .find(|&sc| to_int(v, sc).is_some())
                .unwrap_or(0);
            w.bits(u64::from(scale), 4);
            let m = to_int(v, scale);
            match m {
                Some(m) => {
                    w.bit(false);
                    put_int(w, zigzag(m));
                }
                None => {
                    w.bit(true);
                    w.bits(v.to_bits(), 64);
                }
            }
            self.state = Some(State {
                t,
                t_delta: 0,
                v,
                scale,
                m,
                m_delta: 0,
            });
            self.count = 1;
            return Ok(());
        };
        if t <= s.t {
            return Err(AppendError::OutOfOrder);
        }
        let delta = t.wrapping_sub(s.t);
        put_int(w, zigzag(delta.wrapping_sub(s.t_delta)));
        s.t_delta = delta;
        s.t = t;
        encode_value(w, &mut s, v);
        self.state = Some(s);
        self.count += 1;
        Ok(())
    }

    pub fn iter(&self) -> ChunkIter<'_> {
        ChunkIter {
            r: BitReader::new(self.w.bytes()),
            left: self.count,
            s: State::default(),
            started: false,
            failed: false,
        }
    }
}

fn encode_value(w: &mut BitWriter, s: &mut State, v: f64) {
    if let Some(prev) = s.m {
        let mut cand = to_int(v, s.scale).map(|m| (m, s.scale, prev, s.m_delta));
        if cand.is_none() {
            // A finer scale, if the previous integers still fit after rescaling.
            cand = (s.scale + 1..=MAX_SCALE).find_map(|sc| {
                let m = to_int(v, sc)?;
                let k = IPOW10[(sc - s.scale) as usize];
                Some((m, sc, prev.checked_mul(k)?, s.m_delta.checked_mul(k)?))
            });
        }
        if let Some((m, sc, prev, prev_delta)) = cand
            && let Some(d) = m.checked_sub(prev)
            && let Some(dod) = d.checked_sub(prev_delta)
        {
            if sc != s.scale {
                put_marker(w, false);
                w.bits(u64::from(sc), 4);
                s.scale = sc;
            }
            put_int(w, zigzag(dod));
            s.m = Some(m);
            s.m_delta = d;
            s.v = v;
            return;
        }
    }
    put_marker(w, true);
    put_xor(w, v, s.v);
    s.v = v;
    s.m = to_int(v, s.scale);
    s.m_delta = 0;
}

/// The sample count an encoded chunk starts with; `None` if it is too short.
pub fn sample_count(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?))
}

/// Decodes a chunk lazily, one sample per `next`.
pub struct ChunkIter<'a> {
    r: BitReader<'a>,
    left: u16,
    /// Valid once the first sample is read.
    s: State,
    started: bool,
    failed: bool,
}

impl<'a> ChunkIter<'a> {
    /// Iterates over an encoded chunk (as [`Chunk::bytes`] wrote it).
    pub fn from_bytes(bytes: &'a [u8]) -> Option<ChunkIter<'a>> {
        let count = sample_count(bytes)?;
        Some(ChunkIter {
            r: BitReader::new(&bytes[2..]),
            left: count,
            s: State::default(),
            started: false,
            failed: false,
        })
    }

    /// True when the bit stream ended early or held an impossible code.
    pub fn failed(&self) -> bool {
        self.failed
    }

    #[inline]
    fn step(&mut self) -> Option<(i64, f64)> {
        if !self.started {
            self.s = first(&mut self.r)?;
            self.started = true;
        } else {
            next(&mut self.r, &mut self.s)?;
        }
        Some((self.s.t, self.s.v))
    }
}

/// Reads a chunk's first sample.
#[inline(always)]
fn first(r: &mut BitReader<'_>) -> Option<State> {
    let t = r.bits(64)? as i64;
    let scale = r.bits(4)? as u8;
    if scale > MAX_SCALE {
        return None;
    }
    let (v, m) = if r.bit()? {
        let v = f64::from_bits(r.bits(64)?);
        (v, to_int(v, scale))
    } else {
        let m = unzigzag(get_int(r)?);
        (from_int(m, scale), Some(m))
    };
    Some(State {
        t,
        t_delta: 0,
        v,
        scale,
        m,
        m_delta: 0,
    })
}

/// Reads the next sample into `s`; `None` on a damaged stream.
#[inline(always)]
fn next(r: &mut BitReader<'_>, s: &mut State) -> Option<()> {
    let dod = unzigzag(get_int(r)?);
    s.t_delta = s.t_delta.wrapping_add(dod);
    s.t = s.t.wrapping_add(s.t_delta);
    let mut code = get_value_code(r)?;
    if let Code::Rescale = code {
        let sc = r.bits(4)? as u8;
        if sc <= s.scale || sc > MAX_SCALE {
            return None;
        }
        let k = IPOW10[(sc - s.scale) as usize];
        s.m = Some(s.m?.checked_mul(k)?);
        s.m_delta = s.m_delta.checked_mul(k)?;
        s.scale = sc;
        code = get_value_code(r)?;
    }
    match code {
        Code::Int(z) => {
            let d = s.m_delta.checked_add(unzigzag(z))?;
            let m = s.m?.checked_add(d)?;
            s.m = Some(m);
            s.m_delta = d;
            s.v = from_int(m, s.scale);
        }
        Code::Xor => {
            s.v = get_xor(r, s.v)?;
            s.m = to_int(s.v, s.scale);
            s.m_delta = 0;
        }
        Code::Rescale => return None,
    }
    Some(())
}

/// What [`decode_into`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// Every sample was read.
    All,
    /// A sample after `maxt` was reached; the chunks after this one are later still.
    PastEnd,
    /// The stream is damaged; the samples before the damage were kept.
    Damaged,
}

/// Appends the samples of an encoded chunk with `mint <= t <= maxt` to `out`:
/// the same samples as [`ChunkIter`], decoded in one loop with the state in locals.
pub fn decode_into(bytes: &[u8], mint: i64, maxt: i64, out: &mut Vec<(i64, f64)>) -> Decoded {
    let Some(count) = sample_count(bytes) else {
        return Decoded::Damaged;
    };
    if count == 0 {
        return Decoded::All;
    }
    let mut r = BitReader::new(&bytes[2..]);
    let Some(mut s) = first(&mut r) else {
        return Decoded::Damaged;
    };
    let mut left = count;
    loop {
        if s.t > maxt {
            return Decoded::PastEnd;
        }
        if s.t >= mint {
            out.push((s.t, s.v));
        }
        left -= 1;
        if left == 0 {
            return Decoded::All;
        }
        if next(&mut r, &mut s).is_none() {
            return Decoded::Damaged;
        }
    }
}

impl Iterator for ChunkIter<'_> {
    type Item = (i64, f64);

    #[inline]
    fn next(&mut self) -> Option<(i64, f64)> {
        if self.left == 0 || self.failed {
            return None;
        }
        match self.step() {
            Some(x) => {
                self.left -= 1;
                Some(x)
            }
            None => {
                self.failed = true;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_counter_and_regular_scrapes_cost_two_bits() {
        let mut c = Chunk::default();
        for i in 0..240 {
            c.append(1_700_000_000_000 + i * 15_000, 1000.0 + i as f64 * 2.5)
                .unwrap();
        }
        // Header 64+4+1+~24 bits, first delta ~30 bits, then 2 bits a sample.
        assert!(c.size() < 80, "{} bytes", c.size());
        let back: Vec<_> = c.iter().collect();
        assert_eq!(back.len(), 240);
        assert_eq!(
            back[239],
            (1_700_000_000_000 + 239 * 15_000, 1000.0 + 239.0 * 2.5)
        );
    }

    #[test]
    fn specials_round_trip_bit_for_bit() {
        let stale = f64::from_bits(0x7ff0_0000_0000_0002);
        let vals = [
            0.0,
            -0.0,
            f64::NAN,
            stale,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e308,
            5e-324,
            0.1 + 0.2,
            3.0,
            stale,
            1.5,
        ];
        let mut c = Chunk::default();
        for (i, v) in vals.iter().enumerate() {
            c.append(i as i64 * 1000 - 5000, *v).unwrap();
        }
        let back: Vec<_> = c.iter().map(|(_, v)| v.to_bits()).collect();
        assert_eq!(back, vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(c.append(0, 1.0), Err(AppendError::OutOfOrder));
    }

    #[test]
    fn scale_grows_within_a_chunk() {
        let mut c = Chunk::default();
        let vals = [0.0, 1.0, 1.5, 1.75, 2.0, 2.125, 1e12, 0.000001];
        for (i, v) in vals.iter().enumerate() {
            c.append(i as i64, *v).unwrap();
        }
        assert_eq!(c.iter().map(|(_, v)| v).collect::<Vec<_>>(), vals);
    }
}
