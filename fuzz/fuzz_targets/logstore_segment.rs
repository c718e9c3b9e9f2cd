//! Any bytes as a log segment file (raw or compacted): opening, reading,
//! compacting and appending never panic.
#![no_main]

use capstan_logstore::{Direction, Entry, Labels, Options, Query, Store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = b"CAPLOGS1".to_vec();
    bytes.extend_from_slice(body);
    let ext = if kind & 1 == 0 { "raw" } else { "seg" };
    std::fs::write(dir.path().join(format!("{:016}.{ext}", 1)), &bytes).unwrap();
    let Ok((store, _)) = Store::open(Options::new(dir.path())) else { return };
    let q = Query { from_ns: i64::MIN, to_ns: i64::MAX, streams: &|_| true, contains: &[b"abc".to_vec()], after_seq: 0, meta: &[] };
    let _ = store.select(&q, Direction::Backward, 100);
    let _ = store.maintain();
    let _ = store.append(&Labels::from_pairs([("a", "b")]), vec![Entry { ts_ns: 1, line: "x".into(), ..Entry::default() }]);
});
