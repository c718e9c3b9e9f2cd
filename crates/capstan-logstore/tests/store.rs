//! The store end to end: append, flush, read back in both directions, filters,
//! cursors, reopen, compaction, retention, limits.

use std::time::Duration;

use capstan_logstore::{Direction, Entry, Labels, Options, Query, Store};

fn entry(ts: i64, line: &str) -> Entry {
    Entry {
        ts_ns: ts,
        line: line.into(),
        ..Entry::default()
    }
}

fn web(replica: &str) -> Labels {
    Labels::from_pairs([
        ("service", "web"),
        ("replica", replica),
        ("stream", "stdout"),
    ])
}

fn all<'a>(contains: &'a [Vec<u8>]) -> Query<'a> {
    Query {
        from_ns: i64::MIN,
        to_ns: i64::MAX,
        streams: &|_| true,
        contains,
        after_seq: 0,
        meta: &[],
    }
}

fn lines(v: &[(std::sync::Arc<Labels>, Entry)]) -> Vec<String> {
    v.iter().map(|(_, e)| e.line.clone()).collect()
}

#[test]
fn round_trip_orders_filters_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path());
    o.block_bytes = 4096; // several blocks
    let (store, rec) = Store::open(o.clone()).unwrap();
    assert_eq!(rec.segments, 0);
    for i in 0..1000i64 {
        let r = if i % 2 == 0 { "0" } else { "1" };
        let line = format!(
            "GET /items/{i} status={} req=req-{i:06}",
            if i % 10 == 0 { 500 } else { 200 }
        );
        let a = store
            .append(
                &web(r),
                vec![Entry {
                    meta: vec![("trace_id".into(), format!("{i:032x}"))],
                    ..entry(i * 1000, &line)
                }],
            )
            .unwrap();
        assert_eq!(a.accepted, 1);
        assert_eq!(a.last_seq, i as u64 + 1);
    }
    // Half flushed, half still in the head: reads see both.
    let got = store.select(&all(&[]), Direction::Forward, 5).unwrap();
    assert_eq!(lines(&got)[0], "GET /items/0 status=500 req=req-000000");
    assert_eq!(got.len(), 5);
    let got = store.select(&all(&[]), Direction::Backward, 3).unwrap();
    assert_eq!(
        lines(&got),
        vec![
            "GET /items/999 status=200 req=req-000999",
            "GET /items/998 status=200 req=req-000998",
            "GET /items/997 status=200 req=req-000997"
        ]
    );
    assert_eq!(
        got[0].1.meta,
        vec![("trace_id".to_string(), format!("{:032x}", 999))]
    );
    // A rare string.
    let needle = vec![b"req-000777".to_vec()];
    let got = store
        .select(&all(&needle), Direction::Forward, 100)
        .unwrap();
    assert_eq!(
        lines(&got),
        vec!["GET /items/777 status=200 req=req-000777"]
    );
    // A stream selector and a time range.
    let q = Query {
        from_ns: 100_000,
        to_ns: 110_000,
        streams: &|l: &Labels| l.get("replica") == Some("1"),
        contains: &[],
        after_seq: 0,
        meta: &[],
    };
    let got = store.select(&q, Direction::Forward, 100).unwrap();
    assert_eq!(got.len(), 5);
    assert!(
        got.iter()
            .all(|(l, e)| l.get("replica") == Some("1") && e.ts_ns % 2000 == 1000)
    );
    // A cursor.
    let q = Query {
        after_seq: 995,
        ..all(&[])
    };
    assert_eq!(store.select(&q, Direction::Forward, 100).unwrap().len(), 5);

    let last = store.flush().unwrap();
    assert_eq!(last, 1000);
    assert_eq!(store.series(0, 10_000, &|_| true).len(), 2);
    drop(store);

    let (store, rec) = Store::open(o.clone()).unwrap();
    assert!(rec.truncated.is_empty(), "{:?}", rec.truncated);
    let got = store
        .select(&all(&[]), Direction::Forward, usize::MAX)
        .unwrap();
    assert_eq!(got.len(), 1000);
    for (i, (_, e)) in got.iter().enumerate() {
        assert_eq!(e.ts_ns, i as i64 * 1000);
        assert_eq!(e.seq, i as u64 + 1);
    }
    // Sequence numbers continue after a reopen.
    assert_eq!(
        store
            .append(&web("0"), vec![entry(5, "x")])
            .unwrap()
            .last_seq,
        1001
    );
}

#[test]
fn compaction_keeps_every_entry_and_shrinks_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let o = Options::new(dir.path());
    let (store, _) = Store::open(o.clone()).unwrap();
    for round in 0..20i64 {
        for r in 0..3 {
            let batch = (0..50)
                .map(|i| {
                    entry(
                        round * 1_000_000 + i * 10 + r,
                        &format!("round {round} replica {r} line {i} user=u{}", i % 7),
                    )
                })
                .collect();
            store.append(&web(&r.to_string()), batch).unwrap();
        }
        store.flush().unwrap();
    }
    let before = store
        .select(&all(&[]), Direction::Forward, usize::MAX)
        .unwrap();
    let raw_bytes = store.disk_bytes();
    store.rotate().unwrap();
    store.maintain().unwrap();
    let after = store
        .select(&all(&[]), Direction::Forward, usize::MAX)
        .unwrap();
    assert_eq!(before, after);
    assert!(
        store.disk_bytes() < raw_bytes,
        "{} !< {raw_bytes}",
        store.disk_bytes()
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| n.ends_with(".seg")), "{names:?}");
    drop(store);
    let (store, rec) = Store::open(o).unwrap();
    assert!(rec.truncated.is_empty());
    assert_eq!(
        store
            .select(&all(&[]), Direction::Forward, usize::MAX)
            .unwrap(),
        after
    );
}

#[test]
fn full_one_stream_blocks_are_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path());
    o.block_bytes = 4 << 10;
    let (store, _) = Store::open(o.clone()).unwrap();
    // Two busy streams interleaved in every batch, flushed rarely: each
    // stream's entries are cut into blocks of their own once they fill one.
    let mut n = 0i64;
    for _ in 0..40 {
        for r in ["0", "1"] {
            let batch = (0..20)
                .map(|i| {
                    n += 1;
                    entry(n, &format!("replica {r} line {i} of a busy stream {n:08}"))
                })
                .collect();
            store.append(&web(r), batch).unwrap();
        }
    }
    store.flush().unwrap();
    let before = store
        .select(&all(&[]), Direction::Forward, usize::MAX)
        .unwrap();
    assert_eq!(before.len(), 1600);
    store.rotate().unwrap();
    store.maintain().unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with(".raw"), "kept as written: {names:?}");
    // A stream alone is read from its own blocks only.
    let one = |l: &Labels| l.get("replica") == Some("1");
    let decoded = store
        .stats
        .blocks_decoded
        .load(std::sync::atomic::Ordering::Relaxed);
    let got = store
        .select(&Query::all(&one), Direction::Forward, usize::MAX)
        .unwrap();
    assert_eq!(got.len(), 800);
    let decoded_one = store
        .stats
        .blocks_decoded
        .load(std::sync::atomic::Ordering::Relaxed)
        - decoded;
    let got_all = store
        .select(&all(&[]), Direction::Forward, usize::MAX)
        .unwrap();
    assert_eq!(got_all, before);
    let decoded_all = store
        .stats
        .blocks_decoded
        .load(std::sync::atomic::Ordering::Relaxed)
        - decoded
        - decoded_one;
    assert!(
        decoded_one * 2 <= decoded_all + 1,
        "{decoded_one} of {decoded_all}"
    );
    drop(store);
    // Reopened, still kept as written, still whole.
    let (store, _) = Store::open(o.clone()).unwrap();
    store.maintain().unwrap();
    assert_eq!(
        store
            .select(&all(&[]), Direction::Forward, usize::MAX)
            .unwrap(),
        before
    );
    let files = || -> Vec<String> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(files().iter().all(|n| n.ends_with(".raw")), "{:?}", files());
    drop(store);
    // Once the store is idle, segments kept as written are recompressed
    // (rewritten as compacted files; the size gain is measured in the bench).
    let idle = Options {
        recompress_when_idle: Some(std::time::Duration::ZERO),
        ..o
    };
    let (store, _) = Store::open(idle).unwrap();
    store.maintain().unwrap();
    assert!(files().iter().all(|n| n.ends_with(".seg")), "{:?}", files());
    assert_eq!(
        store
            .select(&all(&[]), Direction::Forward, usize::MAX)
            .unwrap(),
        before
    );
}

#[test]
fn retention_by_size_and_age_removes_oldest_segments_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path());
    o.level_sealed = 1;
    let (store, _) = Store::open(o.clone()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let hour = 3_600_000_000_000i64;
    // Five segments: entries 5h, 4h, … 1h old, each with distinct text.
    for age in (1..=5).rev() {
        let batch = (0..2000)
            .map(|i| {
                entry(
                    now - age * hour + i,
                    &format!("age {age} line {i} {:x}", i * 7919 * age),
                )
            })
            .collect();
        store.append(&web("0"), batch).unwrap();
        store.rotate().unwrap();
        store.maintain().unwrap();
    }
    let count = |s: &Store| {
        s.select(&all(&[]), Direction::Forward, usize::MAX)
            .unwrap()
            .len()
    };
    assert_eq!(count(&store), 10_000);
    drop(store);

    o.retention = Some(Duration::from_secs(3 * 3600 + 1800));
    let (store, _) = Store::open(o.clone()).unwrap();
    store.maintain().unwrap();
    assert_eq!(count(&store), 6_000, "the 5h and 4h old segments are gone");
    let oldest = store.select(&all(&[]), Direction::Forward, 1).unwrap();
    assert!(oldest[0].1.line.starts_with("age 3 "));
    drop(store);

    o.retention = None;
    let one = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .metadata()
        .unwrap()
        .len();
    o.max_total_bytes = Some(one * 2 + one / 2);
    let (store, _) = Store::open(o).unwrap();
    store.maintain().unwrap();
    assert_eq!(count(&store), 4_000, "oldest first, down to the size cap");
    let oldest = store.select(&all(&[]), Direction::Forward, 1).unwrap();
    assert!(oldest[0].1.line.starts_with("age 2 "));
    assert!(
        store
            .stats
            .segments_deleted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn long_lines_are_cut_and_rate_limits_count_what_they_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path());
    o.max_line_bytes = 10;
    o.rate_limit_bytes = Some(1);
    o.rate_burst_bytes = 100;
    let (store, _) = Store::open(o).unwrap();
    let a = store
        .append(&web("0"), vec![entry(1, "ééééééééé"), entry(2, "short")])
        .unwrap();
    assert_eq!((a.accepted, a.truncated), (2, 1));
    let got = store.select(&all(&[]), Direction::Forward, 10).unwrap();
    assert_eq!(got[0].1.line, "ééééé …[truncated 8 bytes]");
    // The burst is spent: the next lines are refused and counted.
    let a = store
        .append(
            &web("0"),
            (0..10).map(|i| entry(10 + i, &"y".repeat(30))).collect(),
        )
        .unwrap();
    assert!(a.rate_limited >= 8, "{a:?}");
    assert_eq!(a.accepted + a.rate_limited, 10);
    assert_eq!(
        store
            .stats
            .rate_limited_lines
            .load(std::sync::atomic::Ordering::Relaxed) as usize,
        a.rate_limited
    );
}

#[test]
fn a_torn_or_corrupt_tail_is_cut_and_the_rest_kept() {
    let src = tempfile::tempdir().unwrap();
    let o = Options::new(src.path());
    let (store, _) = Store::open(o).unwrap();
    for round in 0..3i64 {
        let batch = (0..100)
            .map(|i| entry(round * 100 + i, &format!("round {round} line {i}")))
            .collect();
        store.append(&web("0"), batch).unwrap();
        store.flush().unwrap();
    }
    drop(store);
    let file = std::fs::read_dir(src.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&file).unwrap();
    let whole = bytes.len();
    let count = |dir: &std::path::Path| {
        let (s, rec) = Store::open(Options::new(dir)).unwrap();
        let n = s
            .select(&all(&[]), Direction::Forward, usize::MAX)
            .unwrap()
            .len();
        (n, rec.truncated.len())
    };
    // Cut anywhere: what survives is the flushes whose records are whole, in
    // order, and the cut is reported unless it fell between records.
    let mut seen = std::collections::BTreeSet::new();
    let mut prev = 0;
    for cut in (0..=whole).step_by(3).chain([whole]) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file.file_name().unwrap()), &bytes[..cut]).unwrap();
        let (n, torn) = count(dir.path());
        assert!(
            n % 100 == 0 && n >= prev,
            "cut at {cut}: {n} entries after {prev}"
        );
        if cut == whole {
            assert_eq!((n, torn), (300, 0));
        }
        prev = n;
        seen.insert(n);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 100, 200, 300]);
    // A flipped byte inside the last block: its checksum fails, it is cut.
    let dir = tempfile::tempdir().unwrap();
    let mut bad = bytes.clone();
    bad[whole - 20] ^= 0xff;
    std::fs::write(dir.path().join(file.file_name().unwrap()), &bad).unwrap();
    assert_eq!(count(dir.path()), (200, 1));
    // And the store goes on appending after the cut.
    let (s, _) = Store::open(Options::new(dir.path())).unwrap();
    s.append(&web("0"), vec![entry(999, "after the cut")])
        .unwrap();
    s.flush().unwrap();
    drop(s);
    assert_eq!(count(dir.path()).0, 201);
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any bytes after a segment header, as a raw or a compacted segment:
        /// the store opens, reads and appends without panicking.
        #[test]
        fn any_segment_bytes(body in proptest::collection::vec(any::<u8>(), 0..600), compacted in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = b"CAPLOGS1".to_vec();
            bytes.extend_from_slice(&body);
            let name = format!("{:016}.{}", 1, if compacted { "seg" } else { "raw" });
            std::fs::write(dir.path().join(name), &bytes).unwrap();
            let (s, _) = Store::open(Options::new(dir.path())).unwrap();
            let _ = s.select(&all(&[b"abc".to_vec()]), Direction::Backward, 10);
            let _ = s.select(&all(&[]), Direction::Forward, usize::MAX);
            let _ = s.maintain();
            s.append(&web("0"), vec![entry(1, "still works")]).unwrap();
            s.flush().unwrap();
        }
    }
}

#[test]
fn metadata_tokens_find_entries_without_a_time_range_and_skip_other_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path());
    o.block_bytes = 2048;
    let (store, _) = Store::open(o).unwrap();
    for i in 0..2000i64 {
        let e = Entry {
            meta: vec![
                ("trace_id".into(), format!("{:032x}", i / 4)),
                ("span_id".into(), format!("{i:016x}")),
            ],
            ..entry(i * 1_000_000, &format!("span {i} of trace {}", i / 4))
        };
        store.append(&web(&(i % 3).to_string()), vec![e]).unwrap();
    }
    store.flush().unwrap();
    let blocks = store
        .stats
        .blocks_written
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(blocks > 50, "{blocks} blocks");
    let want = [("trace_id".to_string(), format!("{:032x}", 321))];
    let before = store
        .stats
        .blocks_decoded
        .load(std::sync::atomic::Ordering::Relaxed);
    let q = Query {
        meta: &want,
        ..all(&[])
    };
    let got = store.select(&q, Direction::Forward, 100).unwrap();
    assert_eq!(
        lines(&got),
        (1284..1288)
            .map(|i| format!("span {i} of trace 321"))
            .collect::<Vec<_>>()
    );
    let decoded = store
        .stats
        .blocks_decoded
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert!(decoded <= 3, "{decoded} of {blocks} blocks decoded");
    // Compaction rebuilds the filters.
    store.rotate().unwrap();
    store.maintain().unwrap();
    let got = store.select(&q, Direction::Backward, 100).unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(got[0].1.line, "span 1287 of trace 321");
    let none = [("trace_id".to_string(), "f".repeat(32))];
    let q = Query {
        meta: &none,
        ..all(&[])
    };
    assert!(store.select(&q, Direction::Forward, 10).unwrap().is_empty());
}

#[test]
fn hex_ids_are_found_through_the_id_column_and_other_blocks_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = Options::new(dir.path());
    o.block_bytes = 4096;
    let (store, _) = Store::open(o).unwrap();
    // Random-looking ids: every hex trigram is in every block.
    let id = |i: u64| format!("{:016x}", (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for chunk in 0..20u64 {
        let batch = (chunk * 50..chunk * 50 + 50)
            .map(|i| {
                entry(
                    i as i64,
                    &format!("GET /orders/{i} 200 req_id={} took 0.{i:03}s", id(i)),
                )
            })
            .collect();
        store.append(&web("0"), batch).unwrap();
        store.flush().unwrap();
    }
    store.rotate().unwrap();
    let blocks = || {
        store
            .stats
            .blocks_decoded
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let find = |needle: &str| {
        let n = [needle.as_bytes().to_vec()];
        let before = blocks();
        let got = lines(
            &store
                .select(&all(&n), Direction::Forward, usize::MAX)
                .unwrap(),
        );
        (got, blocks() - before)
    };
    let target = id(777);
    let (got, decoded) = find(&target);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("GET /orders/777 200 req_id="), "{got:?}");
    assert!(decoded <= 2, "{decoded} blocks decoded for one id");
    // Part of an id, at an odd position in it.
    let (got, _) = find(&target[3..14]);
    assert_eq!(got.len(), 1, "{got:?}");
    // An id with the text around it, and digits that are no id.
    let (got, _) = find(&format!("req_id={target} took"));
    assert_eq!(got.len(), 1, "{got:?}");
    let (got, _) = find("/orders/777 ");
    assert_eq!(got.len(), 1, "{got:?}");
    let (got, _) = find("0.777s");
    assert_eq!(got.len(), 1, "{got:?}");
    // An id that is not there decodes nothing.
    let (got, decoded) = find(&id(5000));
    assert!(got.is_empty());
    assert_eq!(decoded, 0);
}
