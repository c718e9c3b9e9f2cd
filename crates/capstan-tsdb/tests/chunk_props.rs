//! Chunk codec properties: every sequence comes back bit for bit; no byte string
//! makes the decoder panic.

use capstan_tsdb::chunk::{Chunk, ChunkIter, MAX_SAMPLES};
use proptest::prelude::*;

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        Just(f64::from_bits(capstan_tsdb::STALE_NAN_BITS)),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        Just(0.0),
        (-1_000_000i64..1_000_000, 0u32..6).prop_map(|(m, s)| m as f64 / 10f64.powi(s as i32)),
        (0i64..i64::MAX).prop_map(|m| m as f64),
    ]
}

fn deltas() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(15_000i64),
        14_990i64..15_010,
        1i64..1_000_000_000_000,
        Just(i64::MAX / 300)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(start in any::<i64>().prop_map(|t| t / 4), steps in prop::collection::vec((deltas(), value()), 1..(MAX_SAMPLES as usize))) {
        let mut chunk = Chunk::default();
        let mut t = start;
        let mut want = Vec::new();
        for (d, v) in steps {
            chunk.append(t, v).unwrap();
            want.push((t, v.to_bits()));
            t = match t.checked_add(d) { Some(n) => n, None => break };
        }
        let got: Vec<(i64, u64)> = chunk.iter().map(|(t, v)| (t, v.to_bits())).collect();
        prop_assert_eq!(&got, &want);
        let bytes = chunk.bytes();
        let mut it = ChunkIter::from_bytes(&bytes).unwrap();
        let again: Vec<(i64, u64)> = it.by_ref().map(|(t, v)| (t, v.to_bits())).collect();
        prop_assert!(!it.failed());
        prop_assert_eq!(again, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Some(it) = ChunkIter::from_bytes(&bytes) {
            let _ = it.count();
        }
    }
}
