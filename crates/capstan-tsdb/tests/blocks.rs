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

    // Many more hours: more blocks, and the oldest fall out of retention.
    for h in 0..10 {
        write(&db, 200 + h * 60, 260 + h * 60);
        db.maintain().unwrap();
    }
    let blocks = db.blocks();
    assert!(blocks.len() >= 3, "{blocks:?}");
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
