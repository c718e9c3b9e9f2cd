//! Crash safety: ingestion runs in a child process that is killed with SIGKILL at
//! random points, many times; after each kill the database must open, hold every
//! sample the child saw acknowledged (fsync=always), and hold nothing corrupted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_tsdb::{Db, Fsync, Labels, Matcher, Options};

const SERIES: i64 = 20;
const CHILD_ENV: &str = "CAPSTAN_TSDB_CRASH_CHILD_DIR";

fn labels(i: i64) -> Labels {
    Labels::from_pairs([("__name__", "crash_test"), ("series", &i.to_string())])
}

fn value(series: i64, batch: i64) -> f64 {
    (series * 1_000_003 + batch) as f64 / 8.0
}

fn opts(dir: &str) -> Options {
    let mut o = Options::new(dir);
    o.fsync = Fsync::Always;
    // Small blocks, so kills also land in block writes and WAL checkpoints.
    o.block_range_ms = 40_000;
    o
}

/// The child: appends one batch (a sample for each series) at a time, printing
/// `ack N` after batch N is committed. Runs until killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (db, _) = Db::open(opts(&dir)).unwrap();
    let next = db
        .select(
            &[
                Matcher::eq("__name__", "crash_test"),
                Matcher::eq("series", "0"),
            ],
            i64::MIN,
            i64::MAX,
        )
        .first()
        .and_then(|s| s.samples().last())
        .map_or(0, |(t, _)| t / 1000 + 1);
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for batch in next.. {
        let mut a = db.appender();
        for i in 0..SERIES {
            a.add(labels(i), batch * 1000, value(i, batch));
        }
        a.commit().unwrap();
        if batch % 25 == 0 {
            db.maintain().unwrap();
        }
        writeln!(out, "ack {batch}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_sample() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut acked: i64 = -1;
    let mut truncations = 0;
    for trial in 0..60 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let last = Arc::new(Mutex::new(-1i64));
        let reader = {
            let last = last.clone();
            let stdout = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(n) = line
                        .strip_prefix("ack ")
                        .and_then(|n| n.parse::<i64>().ok())
                    {
                        *last.lock().unwrap() = n;
                    }
                }
            })
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(5 + seed % 80));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        acked = acked.max(*last.lock().unwrap());

        let (db, replay) = Db::open(opts(&path))
            .unwrap_or_else(|e| panic!("trial {trial}: the database does not open: {e}"));
        truncations += usize::from(replay.truncated.is_some());
        let found = db.select(&[Matcher::eq("__name__", "crash_test")], i64::MIN, i64::MAX);
        if acked >= 0 {
            assert_eq!(
                found.len() as i64,
                SERIES,
                "trial {trial}: every series exists"
            );
        }
        let mut lengths = Vec::new();
        for s in &found {
            let i: i64 = s.labels.get("series").unwrap().parse().unwrap();
            let samples: Vec<(i64, f64)> = s.samples().collect();
            for (b, (t, v)) in samples.iter().enumerate() {
                assert_eq!(
                    (*t, v.to_bits()),
                    (b as i64 * 1000, value(i, b as i64).to_bits()),
                    "trial {trial}: series {i} sample {b}"
                );
            }
            assert!(
                samples.len() as i64 > acked,
                "trial {trial}: series {i} has {} samples, {} were acknowledged",
                samples.len(),
                acked + 1
            );
            lengths.push(samples.len());
        }
        // A batch is one WAL record: it is there for every series or for none.
        lengths.dedup();
        assert!(
            lengths.len() <= 1,
            "trial {trial}: series disagree on length: {lengths:?}"
        );
    }
    assert!(
        acked > 100,
        "the child made progress ({acked} batches acknowledged)"
    );
    let (db, _) = Db::open(opts(&path)).unwrap();
    let blocks = db.blocks().len();
    assert!(
        blocks > 3,
        "kills happened while blocks were being cut ({blocks} blocks)"
    );
    println!(
        "60 kills, {} batches acknowledged, {truncations} torn tails cut, {blocks} blocks",
        acked + 1
    );
}
