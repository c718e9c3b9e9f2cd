//! Crash safety: a child process appends, flushes (printing `ack SEQ` after each
//! flush), rotates and compacts, and is killed with SIGKILL at random points,
//! many times. After every kill the store must open, cut any torn tail, and hold
//! every acknowledged line, each exactly once and intact.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_logstore::{Direction, Entry, Labels, Options, Query, Store};

const CHILD_ENV: &str = "CAPSTAN_LOGSTORE_CRASH_CHILD_DIR";

fn opts(dir: &str) -> Options {
    let mut o = Options::new(dir);
    // Small blocks and segments, so kills land in every kind of write.
    o.block_bytes = 8 << 10;
    o.segment_bytes = 64 << 10;
    o
}

/// Line `n` of stream `n % 3`: its content can be checked from its number.
fn line(n: u64) -> String {
    format!(
        "line {n} of the crash test, payload {:x}",
        n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
}

fn stream(n: u64) -> Labels {
    Labels::from_pairs([("service", "crash"), ("replica", &(n % 3).to_string())])
}

fn everything(store: &Store) -> Vec<Entry> {
    let q = Query {
        from_ns: i64::MIN,
        to_ns: i64::MAX,
        streams: &|_| true,
        contains: &[],
        after_seq: 0,
        meta: &[],
    };
    store
        .select(&q, Direction::Forward, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(l, e)| {
            let n: u64 = e.line.split(' ').nth(1).unwrap().parse().unwrap();
            assert_eq!(*l, stream(n), "line {n} is in its stream");
            e
        })
        .collect()
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (store, _) = Store::open(opts(&dir)).unwrap();
    // Continue numbering after what survived.
    let mut n = everything(&store)
        .iter()
        .map(|e| e.line.split(' ').nth(1).unwrap().parse::<u64>().unwrap() + 1)
        .max()
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for round in 0u64.. {
        for _ in 0..20 {
            store
                .append(
                    &stream(n),
                    vec![Entry {
                        ts_ns: n as i64,
                        line: line(n),
                        ..Entry::default()
                    }],
                )
                .unwrap();
            n += 1;
        }
        store.flush().unwrap();
        writeln!(out, "ack {}", n - 1).unwrap();
        out.flush().unwrap();
        if round % 10 == 9 {
            store.maintain().unwrap();
        }
        if round % 25 == 24 {
            store.rotate().unwrap();
        }
    }
}

#[test]
fn sigkill_at_random_points_loses_no_acknowledged_line() {
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
    let mut torn = 0;
    let mut lost = std::collections::HashSet::new();
    for trial in 0..50 {
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
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(n) = l.strip_prefix("ack ").and_then(|n| n.parse::<i64>().ok()) {
                        *last.lock().unwrap() = n;
                    }
                }
            })
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(5 + seed % 120));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        acked = acked.max(*last.lock().unwrap());

        let (store, rec) = Store::open(opts(&path))
            .unwrap_or_else(|e| panic!("trial {trial}: the store does not open: {e}"));
        torn += rec.truncated.len();
        let got = everything(&store);
        let mut numbers: Vec<u64> = got
            .iter()
            .map(|e| e.line.split(' ').nth(1).unwrap().parse().unwrap())
            .collect();
        for e in &got {
            let k: u64 = e.line.split(' ').nth(1).unwrap().parse().unwrap();
            assert_eq!(e.line, line(k), "trial {trial}: line {k} intact");
            assert_eq!(e.ts_ns, k as i64, "trial {trial}: line {k} time");
        }
        numbers.sort_unstable();
        let len = numbers.len();
        numbers.dedup();
        assert_eq!(numbers.len(), len, "trial {trial}: no line twice");
        // Every acknowledged line. Lines after the last flush may be lost, and
        // not only as a tail: a stream's entries go to a block once they fill
        // one, so one stream's later lines can outlive another's earlier ones.
        // What was lost stays lost (the child numbers on from what survived).
        let kept: std::collections::HashSet<u64> = numbers.iter().copied().collect();
        let top = numbers.last().map_or(-1, |n| *n as i64);
        for n in 0..=top.max(acked) {
            let n = n as u64;
            if lost.contains(&n) {
                assert!(!kept.contains(&n), "trial {trial}: lost line {n} came back");
            } else if !kept.contains(&n) {
                assert!(
                    n as i64 > acked,
                    "trial {trial}: acknowledged line {n} missing ({} kept, {} acknowledged)",
                    numbers.len(),
                    acked + 1
                );
                lost.insert(n);
            }
        }
        // Sequence numbers strictly increase in append order.
        let mut by_n: Vec<&Entry> = got.iter().collect();
        by_n.sort_by_key(|e| e.ts_ns);
        assert!(
            by_n.windows(2).all(|w| w[0].seq < w[1].seq),
            "trial {trial}: sequence numbers increase"
        );
        drop(store);
    }
    assert!(acked > 0, "the child acknowledged something");
    eprintln!(
        "50 kills: {} lines acknowledged, {torn} torn tails cut, {} unacknowledged lines lost",
        acked + 1,
        lost.len()
    );
}
