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
    /// Fixed size, so indexes masked to `MAX_BITS` need no bounds checks.
    bits: Box<[u64; MAX_BITS / 64]>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            bits: Box::new([0; MAX_BITS / 64]),
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
    has_trigrams(filter, needle, |_| true)
}

/// Whether `filter` has every trigram of `needle` that `asked` picks (true
/// for needles under three bytes, and for an empty or malformed filter).
fn has_trigrams(filter: &[u8], needle: &[u8], asked: impl Fn(&[u8]) -> bool) -> bool {
    let bits = filter.len() * 8;
    if needle.len() < 3 || bits < 64 || !bits.is_power_of_two() {
        return true;
    }
    let mask = (bits - 1) as u32;
    needle.windows(3).filter(|t| asked(t)).all(|t| {
        let x = (lower(t[0]) << 16) | (lower(t[1]) << 8) | lower(t[2]);
        let h = (hash(x) & mask) as usize;
        filter[h / 8] & (1 << (h % 8)) != 0
    })
}

/// [`may_contain`] for a block whose filter holds its templates' literal text
/// and the letters-and-digits runs of its variables but hex ids, each on its
/// own (`CODEC_TEMPLATES`): a trigram that crosses between letters or digits
/// and other bytes may cross from a template into a variable, so only those
/// wholly of one or the other are looked up; with `skip_hex`, also not those
/// of lower-case hex digits only, which may lie in an id.
pub fn may_contain_templated(filter: &[u8], needle: &[u8], skip_hex: bool) -> bool {
    let hexish = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    has_trigrams(filter, needle, |t| {
        let c = t[0].is_ascii_alphanumeric();
        t[1].is_ascii_alphanumeric() == c
            && t[2].is_ascii_alphanumeric() == c
            && !(skip_hex && t.iter().all(hexish))
    })
}

/// A token of structured metadata: `key`, a zero byte, `value`.
pub fn token(key: &str, value: &str) -> Vec<u8> {
    let mut t = Vec::with_capacity(key.len() + value.len() + 1);
    t.extend_from_slice(key.as_bytes());
    t.push(0);
    t.extend_from_slice(value.as_bytes());
    t
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv(mut h: u64, b: &[u8]) -> u64 {
    for &x in b {
        h = (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer.
fn finish64(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// FNV-1a over the bytes, then a 64-bit finalizer (splitmix64's).
fn hash64(b: &[u8]) -> u64 {
    finish64(fnv(FNV_START, b))
}

/// The hash of the token of a metadata pair (`key 0x00 value`), without
/// building the token.
pub fn token_hash(key: &str, value: &str) -> u64 {
    finish64(fnv(
        fnv(fnv(FNV_START, key.as_bytes()), &[0]),
        value.as_bytes(),
    ))
}

/// Hashes per token in a token filter.
const TOKEN_HASHES: u64 = 5;
/// Largest token filter: 2^20 bits (128 KiB).
const MAX_TOKEN_BITS: usize = 1 << 20;

/// The `TOKEN_HASHES` bit positions of a token (by its hash) in a filter of
/// `bits` bits.
fn token_bits(h: u64, bits: usize) -> impl Iterator<Item = usize> {
    let (h1, h2) = (h & 0xffff_ffff, (h >> 32) | 1);
    let mask = (bits - 1) as u64;
    (0..TOKEN_HASHES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
}

/// A Bloom filter of whole tokens (structured metadata pairs): 20 to 40 bits per
/// distinct token and five hashes, about 0.05% false positives or fewer (a
/// trace lookup over a thousand blocks decodes one needless block in two).
/// Empty when there are no tokens.
/// Built from the tokens' hashes ([`token_hash`]).
pub fn token_filter(mut hashes: Vec<u64>) -> Vec<u8> {
    hashes.sort_unstable();
    hashes.dedup();
    if hashes.is_empty() {
        return Vec::new();
    }
    let bits = (hashes.len() * 20)
        .next_power_of_two()
        .clamp(64, MAX_TOKEN_BITS);
    let mut f = vec![0u8; bits / 8];
    for t in hashes {
        for i in token_bits(t, bits) {
            f[i / 8] |= 1 << (i % 8);
        }
    }
    f
}

/// Whether a block whose token filter is `filter` may hold `token`. A block
/// without tokens holds none; a malformed filter may hold any.
pub fn may_have_token(filter: &[u8], token: &[u8]) -> bool {
    if filter.is_empty() {
        return false;
    }
    let bits = filter.len() * 8;
    if bits < 64 || !bits.is_power_of_two() {
        return true;
    }
    token_bits(hash64(token), bits).all(|i| filter[i / 8] & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_hashes_are_the_token_hashes() {
        for (k, v) in [("trace_id", "4bf92f35"), ("", ""), ("level", "ü")] {
            assert_eq!(token_hash(k, v), hash64(&token(k, v)));
        }
    }

    #[test]
    fn token_filters_find_every_token_and_few_others() {
        let toks: Vec<Vec<u8>> = (0..3000)
            .map(|i| token("trace_id", &format!("{:032x}", i * 7919)))
            .collect();
        let f = token_filter(toks.iter().map(|t| hash64(t)).collect());
        assert!(toks.iter().all(|t| may_have_token(&f, t)));
        let false_pos = (0..10_000)
            .filter(|i| may_have_token(&f, &token("trace_id", &format!("{:032x}", i * 7919 + 1))))
            .count();
        assert!(false_pos < 200, "{false_pos} of 10000 absent tokens passed");
        assert!(!may_have_token(&token_filter(Vec::new()), b"x"));
        assert!(may_have_token(&[1, 2, 3], b"x"));
    }

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
