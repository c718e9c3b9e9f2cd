//! Per-block trigram filters: a Bloom filter (one hash) over every 3-byte window
//! of every line, ASCII letters folded to lower case. A substring search can skip
//! a block when one of the needle's trigrams is missing from the block's filter.
//!
//! Built at [`MAX_BITS`], then folded in halves (bit `i` of the half-size filter
//! is bit `i` or bit `i + half` of the full one; with power-of-two sizes and the
//! index taken from the hash's low bits, folding is exact) until about a third
//! of the bits are set, so a block of few distinct trigrams gets a small filter.

/// Largest filter: 2^17 bits (16 KiB).
pub const MAX_BITS: usize = 1 << 17;
/// Smallest filter: 2^9 bits (64 bytes).
const MIN_BITS: usize = 1 << 9;

#[inline]
fn lower(b: u8) -> u32 {
    u32::from(b.to_ascii_lowercase())
}

#[inline]
fn hash(x: u32) -> u32 {
    (u64::from(x).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// A filter being built.
pub struct Builder {
    bits: Vec<u64>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            bits: vec![0; MAX_BITS / 64],
        }
    }
}

impl Builder {
    /// Adds every trigram of `s`.
    pub fn add(&mut self, s: &[u8]) {
        if s.len() < 3 {
            return;
        }
        let mask = (MAX_BITS - 1) as u32;
        let mut x = (lower(s[0]) << 8) | lower(s[1]);
        for &b in &s[2..] {
            x = ((x << 8) | lower(b)) & 0x00ff_ffff;
            let i = hash(x) & mask;
            self.bits[(i >> 6) as usize] |= 1 << (i & 63);
        }
    }

    /// The filter's bytes, folded down to a useful density.
    pub fn finish(mut self) -> Vec<u8> {
        let ones = |b: &[u64]| b.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        let mut n = self.bits.len();
        while n * 64 > MIN_BITS && ones(&self.bits[..n]) * 3 < n * 64 / 2 {
            // Folding halves the size and at most doubles the density: stop
            // before it passes a third.
            let half = n / 2;
            for i in 0..half {
                self.bits[i] |= self.bits[i + half];
            }
            n = half;
        }
        self.bits[..n]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }
}

/// Whether a block whose filter is `filter` may contain `needle` (always true for
/// needles under three bytes, and for an empty or malformed filter).
pub fn may_contain(filter: &[u8], needle: &[u8]) -> bool {
    let bits = filter.len() * 8;
    if needle.len() < 3 || bits < 64 || !bits.is_power_of_two() {
        return true;
    }
    let mask = (bits - 1) as u32;
    let mut x = (lower(needle[0]) << 8) | lower(needle[1]);
    for &b in &needle[2..] {
        x = ((x << 8) | lower(b)) & 0x00ff_ffff;
        let i = (hash(x) & mask) as usize;
        if filter[i / 8] & (1 << (i % 8)) == 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_was_added_and_skips_most_of_the_rest() {
        let mut b = Builder::default();
        let mut lines = Vec::new();
        for i in 0..5000 {
            let l = format!(
                "GET /api/items/{i} 200 ip=10.0.{}.{} took={}ms",
                i % 256,
                i % 7,
                i % 97
            );
            b.add(l.as_bytes());
            lines.push(l);
        }
        let f = b.finish();
        assert!(f.len() <= MAX_BITS / 8);
        for l in &lines {
            assert!(may_contain(&f, l.as_bytes()));
            assert!(may_contain(&f, l[3..l.len() - 2].to_uppercase().as_bytes()));
        }
        let misses = (0..1000)
            .filter(|i| may_contain(&f, format!("req-{i:08x}-zzqy").as_bytes()))
            .count();
        assert!(
            misses < 10,
            "{misses} of 1000 absent needles passed the filter"
        );
    }

    #[test]
    fn small_blocks_get_small_filters() {
        let mut b = Builder::default();
        b.add(b"hello world");
        let f = b.finish();
        assert_eq!(f.len(), MIN_BITS / 8);
        assert!(may_contain(&f, b"lo wo"));
        assert!(!may_contain(&f, b"absent"));
        assert!(may_contain(&f, b"ab"));
        assert!(may_contain(&[], b"anything"));
    }
}
