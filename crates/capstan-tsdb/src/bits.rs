//! Bit-level writer and reader, most significant bit first.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitWriter {
    bytes: Vec<u8>,
    /// Bits used in the last byte (0 means the last byte is full or there is none).
    used: u8,
}

impl BitWriter {
    #[cfg(test)]
    pub fn len_bits(&self) -> usize {
        self.bytes.len() * 8
            - if self.used == 0 {
                0
            } else {
                8 - self.used as usize
            }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn bit(&mut self, b: bool) {
        if self.used == 0 {
            self.bytes.push(0);
        }
        if b {
            let last = self.bytes.len() - 1;
            self.bytes[last] |= 0x80 >> self.used;
        }
        self.used = (self.used + 1) % 8;
    }

    /// Writes the low `n` bits of `v` (n ≤ 64), most significant first.
    pub fn bits(&mut self, v: u64, n: u32) {
        let mut left = n;
        while left > 0 {
            if self.used == 0 {
                self.bytes.push(0);
            }
            let free = 8 - u32::from(self.used);
            let take = free.min(left);
            let chunk = ((v >> (left - take)) & ((1u64 << take) - 1)) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= chunk << (free - take);
            self.used = ((u32::from(self.used) + take) % 8) as u8;
            left -= take;
        }
    }
}

/// Reads a bit stream most significant bit first. Keeps the next bits in a
/// register (`buf`, refilled 57 or more bits at a time) so that reading a field
/// is a shift, not a memory access.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    bytes: &'a [u8],
    /// Bits consumed.
    pos: usize,
    /// The next `valid` bits, left-aligned (zeros past the end of the stream).
    buf: u64,
    valid: u32,
}

impl<'a> BitReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            pos: 0,
            buf: 0,
            valid: 0,
        }
    }

    /// Bits not read yet.
    #[inline(always)]
    fn remaining(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    /// Makes at least `n` (≤ 57) bits available in `buf`.
    #[inline(always)]
    fn fill(&mut self, n: u32) {
        if self.valid >= n {
            return;
        }
        let i = self.pos / 8;
        let w = match self.bytes.get(i..i + 8) {
            Some(b) => u64::from_be_bytes(b.try_into().unwrap_or([0; 8])),
            None => {
                let mut buf = [0u8; 8];
                let tail = self.bytes.get(i..).unwrap_or(&[]);
                buf[..tail.len()].copy_from_slice(tail);
                u64::from_be_bytes(buf)
            }
        };
        let skip = (self.pos % 8) as u32;
        self.buf = w << skip;
        self.valid = 64 - skip;
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        // n < 64: the callers take at most 57 bits at once.
        self.buf <<= n;
        self.valid -= n;
        self.pos += n as usize;
    }

    #[inline(always)]
    pub fn bit(&mut self) -> Option<bool> {
        if self.remaining() == 0 {
            return None;
        }
        self.fill(1);
        let b = self.buf >> 63 == 1;
        self.consume(1);
        Some(b)
    }

    /// The next `n` bits (n ≤ 64) as the low bits of the result.
    #[inline(always)]
    pub fn bits(&mut self, n: u32) -> Option<u64> {
        if n as usize > self.remaining() {
            return None;
        }
        if n == 0 {
            return Some(0);
        }
        if n <= 56 {
            self.fill(n);
            let v = self.buf >> (64 - n);
            self.consume(n);
            return Some(v);
        }
        self.fill(32);
        let hi = self.buf >> 32;
        self.consume(32);
        let rest = n - 32;
        self.fill(rest);
        let lo = self.buf >> (64 - rest);
        self.consume(rest);
        Some((hi << rest) | lo)
    }

    /// Counts one-bits up to `max` and consumes them, plus the zero that ends
    /// them when there are fewer than `max`. `None` when the stream ends first.
    #[inline(always)]
    pub fn unary(&mut self, max: u32) -> Option<u32> {
        debug_assert!(max < 57);
        self.fill(max + 1);
        let ones = (!self.buf).leading_zeros().min(max);
        let used = ones + u32::from(ones < max);
        if used as usize > self.remaining() {
            return None;
        }
        self.consume(used);
        Some(ones)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(items in prop::collection::vec((any::<u64>(), 1u32..=64), 0..200)) {
            let mut w = BitWriter::default();
            for (v, n) in &items {
                w.bits(*v, *n);
            }
            let total: u32 = items.iter().map(|(_, n)| n).sum();
            prop_assert_eq!(w.len_bits(), total as usize);
            let mut r = BitReader::new(w.bytes());
            for (v, n) in &items {
                let mask = if *n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                prop_assert_eq!(r.bits(*n), Some(v & mask));
            }
            if total.is_multiple_of(8) {
                prop_assert_eq!(r.bits(1), None);
            }
        }

        #[test]
        fn unary_codes_between_fields(items in prop::collection::vec((0u32..=7, any::<u64>(), 0u32..=64), 0..100), cut in 0usize..8) {
            let mut w = BitWriter::default();
            for (ones, v, n) in &items {
                w.bits((1u64 << ones) - 1, *ones);
                if *ones < 7 {
                    w.bit(false);
                }
                w.bits(*v, *n);
            }
            let mut r = BitReader::new(w.bytes());
            for (ones, v, n) in &items {
                prop_assert_eq!(r.unary(7), Some(*ones));
                let mask = if *n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                prop_assert_eq!(r.bits(*n), Some(v & mask));
            }
            // A stream cut short never reads past its end.
            let bytes = w.bytes();
            let short = &bytes[..bytes.len().saturating_sub(cut)];
            let mut r = BitReader::new(short);
            for (_, _, n) in &items {
                if r.unary(7).is_none() || r.bits(*n).is_none() {
                    break;
                }
            }
            prop_assert!(r.pos <= short.len() * 8);
        }
    }
}
