//! The head is cut into on-disk blocks; queries read blocks and head as one;
//! reopening after a cut neither loses nor duplicates samples; retention deletes
//! old blocks.

use capstan_tsdb::{Db, Fsync, Labels, Matcher, Options};

fn opts(dir: &std::path::Path) -> Options {
    let mut o = Options::new(dir);
    o.fsync = Fsync::Never;
    o.block_range_ms = 3_600_000;
    o.retention_ms = 6 * 3_600_000;
    o
}

fn write(db: &Db, from: i64, to: i64) {
    // Two series, one sample a minute; `job=b` stops halfway.
    let mut a = db.appender();
    for m in from..to {
        let t = m * 60_000;
        a.add(
            Labels::from_pairs([("__name__", "x"), ("job", "a")]),
            t,
            m as f64,
        );
        if m < 150 {
            a.add(
                Labels::from_pairs([("__name__", "x"), ("job", "b")]),
                t,
                -(m as f64),
            );
        }
    }
    a.commit().unwrap();
}

fn all(db: &Db, job: &str) -> Vec<(i64, f64)> {
    db.select(
        &[Matcher::eq("__name__", "x"), Matcher::eq("job", job)],
        i64::MIN,
        i64::MAX,
    )
    .first()
    .map(|s| s.samples().collect())
    .unwrap_or_default()
}

#[test]
fn cut_query_reopen_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = Db::open(opts(dir.path())).unwrap();
    write(&db, 0, 200); // 3h20m of data
    let m = db.maintain().unwrap();
    let block = m
        .block
        .expect("the head spans more than 1.5 ranges: a block is cut");
    assert!(block.exists());
    assert_eq!(db.blocks().len(), 1);
    let a = all(&db, "a");
    assert_eq!(a.len(), 200, "block and head read as one series");
    assert!(a.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(a[199], (199 * 60_000, 199.0));
    assert_eq!(all(&db, "b").len(), 150);
    // A range inside the block only.
    let part: Vec<_> = db.select(&[Matcher::eq("job", "a")], 10 * 60_000, 20 * 60_000)[0]
        .samples()
        .collect();
    assert_eq!(part.len(), 11);
    // Samples older than what the blocks hold are refused.
    let mut app = db.appender();
    app.add(
        Labels::from_pairs([("__name__", "x"), ("job", "c")]),
        60_000,
        1.0,
    );
    assert_eq!(app.commit().unwrap().appended, 0);
    drop(db);

    // Reopen: the WAL was checkpointed; nothing is lost or doubled.
    let (db, replay) = Db::open(opts(dir.path())).unwrap();
    assert!(replay.truncated.is_none());
    assert_eq!(all(&db, "a").len(), 200);
    assert_eq!(all(&db, "b").len(), 150);
    assert_eq!(db.label_values("job"), vec!["a", "b"]);
    // Series lookups over a time range: b stopped at minute 150.
    let late = db.series_in_range(&[Matcher::eq("__name__", "x")], 160 * 60_000, 170 * 60_000);
    assert_eq!(
        late.iter()
            .map(|l| l.get("job").unwrap())
            .collect::<Vec<_>>(),
        ["a"]
    );
    let early = db.series_in_range(&[], 0, 60_000);
    assert_eq!(early.len(), 2, "both series, from the block");

    // Many more hours: more blocks, and the oldest fall out of retention.
    let mut compacted = 0;
    for h in 0..10 {
        write(&db, 200 + h * 60, 260 + h * 60);
        compacted += db.maintain().unwrap().compacted;
    }
    assert!(
        compacted >= 2,
        "1h blocks were merged into 3h blocks ({compacted})"
    );
    let blocks = db.blocks();
    assert!((2..=6).contains(&blocks.len()), "{blocks:?}");
    // Every block but the newest covers a whole 3h window or less.
    for b in &blocks {
        assert!(b.2 - b.1 < 3 * 3_600_000, "{b:?}");
    }
    let oldest = all(&db, "a")[0].0;
    assert!(
        oldest >= (800 - 6 * 60 - 120) * 60_000,
        "old blocks were deleted (oldest sample {oldest})"
    );
    assert!(
        all(&db, "b").is_empty() || all(&db, "b")[0].0 >= oldest,
        "series b's old samples went with their blocks"
    );
    let newest = all(&db, "a").last().copied().unwrap();
    assert_eq!(newest, (799 * 60_000, 799.0));
}

/// A compaction stopped after writing its block but before deleting the blocks it
/// replaced: opening the store finishes it, and nothing is counted twice.
#[test]
fn an_interrupted_compaction_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.retention_ms = 100 * 3_600_000;
    {
        let (db, _) = Db::open(o.clone()).unwrap();
        for h in 0..8 {
            write(&db, h * 60, h * 60 + 60);
            db.maintain().unwrap();
        }
        assert!(db.blocks().len() >= 2);
    }
    // Simulate the crash: copy a block back under its old name, as if not yet deleted.
    let blocks_dir = dir.path().join("blocks");
    let (db, _) = Db::open(o.clone()).unwrap();
    let before = all(&db, "a");
    let merged = db.blocks().into_iter().map(|b| b.0).find(|p| {
        std::fs::read_to_string(p.join("meta.json"))
            .unwrap()
            .contains("\"parents\": [\n")
    });
    drop(db);
    if let Some(m) = merged {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.join("meta.json")).unwrap()).unwrap();
        let parent = meta["parents"][0].as_str().unwrap();
        std::fs::create_dir_all(blocks_dir.join(parent)).unwrap();
        for f in ["meta.json", "index", "chunks"] {
            std::fs::copy(m.join(f), blocks_dir.join(parent).join(f)).unwrap();
        }
        let (db, _) = Db::open(o).unwrap();
        assert!(
            !blocks_dir.join(parent).exists(),
            "the replaced block was deleted on open"
        );
        assert_eq!(all(&db, "a"), before, "no sample counted twice");
    } else {
        panic!("no compacted block to test with");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One sample from a wrong clock (far ahead, or at `i64::MAX`) is refused: it
/// cannot move the head, cut blocks at future boundaries, make retention delete
/// the blocks held, or make later samples out of order. Logged before the bound
/// existed, it is left out on replay.
#[test]
fn a_far_future_sample_erases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.reject_older_than_retention = true;
    let (db, _) = Db::open(o.clone()).unwrap();
    let hour = 3_600_000;
    let start = now_ms() - 4 * hour;
    let series = |job: &str| Labels::from_pairs([("__name__", "x"), ("job", job)]);
    let mut a = db.appender();
    for m in 0..(4 * 60) {
        a.add(series("a"), start + m * 60_000, m as f64);
    }
    a.commit().unwrap();
    // Cut until the head holds less than a cut's worth: one cut leaves up to
    // 3 h, and in the minute of every two hours where it leaves just over,
    // the next maintenance cuts again by right.
    while db.maintain().unwrap().block.is_some() {}
    let blocks_before = db.blocks();
    assert!(!blocks_before.is_empty());
    let held = all(&db, "a").len();

    for t in [
        now_ms() + 11 * 60_000,
        now_ms() + 400 * 86_400_000,
        i64::MAX,
    ] {
        let mut a = db.appender();
        a.add(series("a"), t, 1.0);
        a.add(series("future"), t, 1.0);
        let c = a.commit().unwrap();
        assert_eq!(c.appended, 0);
        assert_eq!(c.rejected, vec![(capstan_tsdb::Reject::TooFarInFuture, 2)]);
    }
    // Absurdly old samples are refused too, as are those beyond the retention.
    let mut a = db.appender();
    a.add(series("old"), i64::MIN, 1.0);
    a.add(series("old"), now_ms() - 7 * hour, 1.0);
    let c = a.commit().unwrap();
    assert_eq!(c.rejected, vec![(capstan_tsdb::Reject::TooOld, 2)]);
    db.maintain().unwrap();
    assert_eq!(db.blocks(), blocks_before, "no block cut or deleted");
    // Later samples are still appended.
    let mut a = db.appender();
    a.add(series("a"), now_ms(), 7.0);
    assert_eq!(a.commit().unwrap().appended, 1);
    assert_eq!(all(&db, "a").len(), held + 1);
    assert!(all(&db, "future").is_empty());
    drop(db);

    // A future sample logged without the bound is left out when the bound is on.
    let mut loose = o.clone();
    loose.max_future_ms = None;
    let (db, _) = Db::open(loose).unwrap();
    let mut a = db.appender();
    a.add(series("a"), now_ms() + 400 * 86_400_000, 1.0);
    assert_eq!(a.commit().unwrap().appended, 1);
    drop(db);
    let (db, replay) = Db::open(o).unwrap();
    assert_eq!(replay.future_dropped, 1);
    db.maintain().unwrap();
    assert_eq!(db.blocks(), blocks_before);
    let mut a = db.appender();
    a.add(series("a"), now_ms() + 1, 8.0);
    assert_eq!(a.commit().unwrap().appended, 1);
    assert_eq!(all(&db, "a").len(), held + 2);
}

/// With an out-of-order window, a late sample within it takes its place in
/// time order (queries, reopening and cuts see it once); one older than the
/// window, or at a time already held with another value, is refused.
#[test]
fn late_samples_within_the_window_take_their_place() {
    use capstan_tsdb::Reject;
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.out_of_order_window_ms = 10 * 60_000;
    let (db, _) = Db::open(o.clone()).unwrap();
    let l = Labels::from_pairs([("__name__", "x"), ("job", "a")]);
    let mut a = db.appender();
    for m in 0..300 {
        a.add(l.clone(), m * 60_000, m as f64);
    }
    a.commit().unwrap();
    let commit = |samples: &[(i64, f64)]| {
        let mut a = db.appender();
        for &(t, v) in samples {
            a.add(l.clone(), t, v);
        }
        a.commit().unwrap()
    };
    // Between two held samples, within the window; twice in one batch.
    let c = commit(&[(295 * 60_000 + 30_000, -1.0), (295 * 60_000 + 30_000, -1.0)]);
    assert_eq!((c.appended, c.rejected.clone()), (1, vec![]));
    // The same time and value again: ignored; another value: refused.
    let c = commit(&[(295 * 60_000 + 30_000, -1.0), (294 * 60_000, 5.0)]);
    assert_eq!(c.appended, 0);
    assert_eq!(c.rejected, vec![(Reject::DuplicateTimestamp, 1)]);
    // Older than the window: refused.
    let c = commit(&[(200 * 60_000 + 1, 1.0)]);
    assert_eq!(c.rejected, vec![(Reject::OutOfOrder, 1)]);
    let check = |db: &Db| {
        let got = all(db, "a");
        assert_eq!(got.len(), 301);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(got.contains(&(295 * 60_000 + 30_000, -1.0)));
    };
    check(&db);
    drop(db);
    // Replayed from the WAL: the same.
    let (db, _) = Db::open(o.clone()).unwrap();
    check(&db);
    // Cut into a block: the same.
    db.maintain().unwrap();
    assert!(!db.blocks().is_empty());
    check(&db);
    drop(db);
    let (db, _) = Db::open(o.clone()).unwrap();
    check(&db);
    // Without the window, late samples are refused.
    drop(db);
    o.out_of_order_window_ms = 0;
    let (db, _) = Db::open(o).unwrap();
    let mut a = db.appender();
    a.add(l.clone(), 298 * 60_000 + 1, 1.0);
    assert_eq!(a.commit().unwrap().rejected, vec![(Reject::OutOfOrder, 1)]);
}
