//! The supervisor on tokio's paused time with a fake driver: what a replica
//! does (when it exits, with what code, when its health check passes, how long
//! it takes to stop) comes from `FAKE_*` variables in its service's
//! environment, so a changed definition changes the behaviour too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::driver::{BoxFuture, Driver, Exit, Launch, Output, Prober, Record, Replica};
use super::*;
use crate::logs::Stream;
use crate::state::Status;
use crate::state::history::{History, RevisionStatus};
use crate::state::{Health, Phase, Sample};

#[derive(Default)]
struct Fake {
    launches: Mutex<Vec<(ReplicaId, Instant)>>,
    stops: Mutex<Vec<(ReplicaId, Instant)>>,
    recovered: Mutex<Vec<Record>>,
    pids: AtomicI32,
}

fn ms(env: &BTreeMap<String, String>, key: &str) -> Option<Duration> {
    env.get(key)
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

struct FakeReplica {
    fake: Arc<Fake>,
    id: ReplicaId,
    pid: i32,
    started: Instant,
    exit_after: Option<Duration>,
    code: i32,
    healthy_after: Duration,
    unhealthy_after: Option<Duration>,
    stop_takes: Duration,
}

impl Driver for Arc<Fake> {
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<Box<dyn Replica>, String>> {
        let fake = self.clone();
        Box::pin(async move {
            let now = Instant::now();
            fake.launches.lock().unwrap().push((launch.id.clone(), now));
            let env = &launch.env;
            if env.contains_key("FAKE_CANNOT_START") {
                return Err("no such program".into());
            }
            Ok(Box::new(FakeReplica {
                pid: 1000 + fake.pids.fetch_add(1, Ordering::Relaxed),
                fake: fake.clone(),
                id: launch.id.clone(),
                started: now,
                exit_after: ms(env, "FAKE_EXIT_AFTER_MS"),
                code: env
                    .get("FAKE_CODE")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0),
                healthy_after: ms(env, "FAKE_HEALTHY_AFTER_MS").unwrap_or_default(),
                unhealthy_after: ms(env, "FAKE_UNHEALTHY_AFTER_MS"),
                stop_takes: ms(env, "FAKE_STOP_MS").unwrap_or_default(),
            }) as Box<dyn Replica>)
        })
    }

    fn recover(
        &self,
        records: Vec<Record>,
        _wanted: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Vec<super::driver::Adopted>> {
        self.recovered.lock().unwrap().extend(records);
        Box::pin(async { Vec::new() })
    }
}

impl Replica for FakeReplica {
    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40000 + self.id.index as u16))
    }

    fn record(&self) -> Record {
        Record {
            service: self.id.service.clone(),
            replica: self.id.index,
            revision: self.id.revision,
            pid: self.pid,
            start_ticks: 0,
            cgroup: None,
            stop_signal: "SIGTERM".into(),
            grace_ms: 0,
            container: None,
        }
    }

    fn enforced_limits(&self) -> (Option<u64>, Option<f64>) {
        (None, None)
    }

    fn take_output(&mut self) -> Vec<(Stream, Output)> {
        Vec::new()
    }

    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        let (at, code) = (self.exit_after.map(|d| self.started + d), self.code);
        Box::pin(async move {
            match at {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    Exit {
                        code: Some(code),
                        ..Exit::default()
                    }
                }
                None => std::future::pending().await,
            }
        })
    }

    fn stop(&mut self, _signal: &str, grace: Duration) -> BoxFuture<'_, (Exit, bool)> {
        self.fake
            .stops
            .lock()
            .unwrap()
            .push((self.id.clone(), Instant::now()));
        let takes = self.stop_takes;
        Box::pin(async move {
            tokio::time::sleep(takes.min(grace)).await;
            let killed = takes > grace;
            let signal = if killed { 9 } else { 15 };
            (
                Exit {
                    signal: Some(signal),
                    ..Exit::default()
                },
                killed,
            )
        })
    }

    fn sample(&mut self) -> Sample {
        Sample::default()
    }

    fn prober(&self) -> Prober {
        let healthy_from = self.started + self.healthy_after;
        let sick_from = self.unhealthy_after.map(|d| self.started + d);
        Arc::new(move |_test, _timeout| {
            Box::pin(async move {
                let now = Instant::now();
                if now < healthy_from {
                    return Err("not yet".into());
                }
                match sick_from {
                    Some(t) if now >= t => Err("sick".into()),
                    _ => Ok(()),
                }
            })
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A hook that drains for the whole grace period, as a replica with a
/// request that never finishes would.
#[derive(Default)]
struct SlowDrain {
    drained: Mutex<Vec<(ReplicaId, Instant)>>,
}

impl Hook for Arc<SlowDrain> {
    fn before_stop(&self, ids: Vec<ReplicaId>, grace: Duration) -> BoxFuture<'static, ()> {
        let me = self.clone();
        Box::pin(async move {
            tokio::time::sleep(grace).await;
            for id in ids {
                me.drained.lock().unwrap().push((id, Instant::now()));
            }
        })
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    fake: Arc<Fake>,
    drain: Arc<SlowDrain>,
    board: Arc<StatusBoard>,
    events: Arc<EventLog>,
    history: Arc<History>,
    handle: SupervisorHandle,
    task: JoinHandle<()>,
}

fn stack(yaml: &str) -> Stack {
    let opts = crate::spec::LoadOptions {
        env: BTreeMap::new(),
        profiles: Vec::new(),
    };
    crate::spec::parse_text(
        yaml,
        "capstan.yaml",
        Path::new("/tmp"),
        "app",
        BTreeMap::new(),
        &opts,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .0
}

impl Harness {
    fn start(yaml: &str, slow_drain: bool, records: Vec<Record>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(Fake::default());
        let board = Arc::new(StatusBoard::default());
        let history = Arc::new(History::open(None));
        let events = Arc::new(EventLog::open(dir.path()).unwrap());
        let (logs, _) = LogEngine::open(&dir.path().join("logs"), 1 << 20, 8 << 20).unwrap();
        let mut state = StateFile::open(dir.path());
        for r in records {
            state.insert(r);
        }
        let ctx = Arc::new(Context {
            board: board.clone(),
            events: events.clone(),
            logs: Arc::new(logs),
            driver: Arc::new(fake.clone()),
            records: Mutex::new(state),
            stack_dir: dir.path().to_path_buf(),
            otlp: None,
            history: history.clone(),
            query: None,
        });
        let drain = Arc::new(SlowDrain::default());
        let hooks: Vec<Arc<dyn Hook>> = if slow_drain {
            vec![Arc::new(drain.clone())]
        } else {
            Vec::new()
        };
        let (sup, handle) = Supervisor::new(ctx, hooks);
        let task = tokio::spawn(sup.run(stack(yaml)));
        Harness {
            _dir: dir,
            fake,
            drain,
            board,
            events,
            history,
            handle,
            task,
        }
    }

    fn replicas(&self, service: &str) -> Vec<Status> {
        self.board.replicas_of(service)
    }

    fn ready(&self, service: &str) -> usize {
        self.replicas(service)
            .iter()
            .filter(|s| s.is_ready())
            .count()
    }

    /// Lets paused time run until `cond` holds (checked every 10 ms), at most `limit`.
    async fn until(&self, what: &str, limit: Duration, cond: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn event_kinds(&self, service: &str) -> Vec<String> {
        self.events
            .subscribe_with_history()
            .0
            .into_iter()
            .filter(|e| e.service == service)
            .map(|e| e.kind)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn restarts_back_off_doubling_then_report_a_crash_loop() {
    let h = Harness::start(
        r#"
services:
  bad:
    command: [x]
    environment: {FAKE_EXIT_AFTER_MS: "0", FAKE_CODE: "3"}
    deploy:
      restart_policy: {condition: on-failure, delay: 100ms}
"#,
        false,
        Vec::new(),
    );
    h.until("six starts", Duration::from_secs(10), |h| {
        h.fake.launches.lock().unwrap().len() >= 6
    })
    .await;
    let starts: Vec<Instant> = h
        .fake
        .launches
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.1)
        .collect();
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // 100 ms, doubled per consecutive failure.
    for (n, gap) in gaps.iter().enumerate() {
        assert_eq!(
            *gap,
            replica::backoff(Duration::from_millis(100), n as u32 + 1),
            "{gaps:?}"
        );
    }
    assert_eq!(gaps[3], Duration::from_millis(800));
    let s = &h.replicas("bad")[0];
    assert!(
        matches!(s.state, Phase::CrashLooping | Phase::Running),
        "{s:?}"
    );
    assert_eq!(s.exit_code, Some(3));
    assert!(s.restarts >= 5, "{s:?}");
    h.until("the crash-looping state", Duration::from_secs(5), |h| {
        h.replicas("bad")[0].state == Phase::CrashLooping
    })
    .await;
    assert!(h.event_kinds("bad").iter().any(|k| k == "crash-looping"));
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_max_attempts_and_up_revives() {
    let yaml = r#"
services:
  job:
    command: [x]
    environment: {FAKE_EXIT_AFTER_MS: "50", FAKE_CODE: "1"}
    deploy:
      restart_policy: {condition: on-failure, delay: 100ms, max_attempts: 2}
"#;
    let h = Harness::start(yaml, false, Vec::new());
    h.until("failed", Duration::from_secs(10), |h| {
        h.replicas("job")
            .first()
            .is_some_and(|s| s.state == Phase::Failed)
    })
    .await;
    // The first run and two restarts.
    assert_eq!(h.fake.launches.lock().unwrap().len(), 3);
    // `up` again converges: the failed replica runs afresh.
    let msg = h.handle.apply(stack(yaml)).await.unwrap();
    assert!(msg.contains("started job again"), "{msg}");
    h.until("a fourth start", Duration::from_secs(1), |h| {
        h.fake.launches.lock().unwrap().len() == 4
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn health_goes_starting_healthy_unhealthy_and_restarts() {
    let h = Harness::start(
        r#"
services:
  web:
    command: [x]
    environment: {FAKE_HEALTHY_AFTER_MS: "2000", FAKE_UNHEALTHY_AFTER_MS: "10000"}
    healthcheck: {test: ["CMD", "check"], interval: 1s, retries: 2}
    deploy:
      restart_policy: {condition: any, delay: 100ms}
"#,
        false,
        Vec::new(),
    );
    h.until("running", Duration::from_secs(1), |h| {
        h.replicas("web")
            .first()
            .is_some_and(|s| s.state == Phase::Running)
    })
    .await;
    assert_eq!(h.replicas("web")[0].health, Health::Starting);
    assert!(!h.replicas("web")[0].is_ready());
    h.until("healthy", Duration::from_secs(3), |h| {
        h.replicas("web")[0].health == Health::Healthy
    })
    .await;
    assert!(h.replicas("web")[0].is_ready());
    // Sick from 10 s on: two failed checks a second apart make it unhealthy,
    // and the restart policy replaces it.
    h.until("unhealthy, restarted", Duration::from_secs(15), |h| {
        h.fake.launches.lock().unwrap().len() == 2
    })
    .await;
    let kinds = h.event_kinds("web");
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap_or(usize::MAX);
    assert!(pos("healthy") < pos("unhealthy"), "{kinds:?}");
    assert!(pos("unhealthy") < pos("restarting"), "{kinds:?}");
    assert_eq!(
        h.fake.stops.lock().unwrap().len(),
        1,
        "the unhealthy one was stopped"
    );
    assert_eq!(h.replicas("web")[0].restarts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_changed_definition_starts_the_new_revision_before_stopping_the_old() {
    let v1 = r#"
services:
  web:
    command: [x]
    environment: {FAKE_HEALTHY_AFTER_MS: "500", VERSION: "1"}
    healthcheck: {test: ["CMD", "check"], interval: 1s}
    deploy:
      replicas: 2
      update_config: {parallelism: 0, order: start-first, monitor: 0s}
"#;
    let h = Harness::start(v1, false, Vec::new());
    h.until("two ready", Duration::from_secs(5), |h| h.ready("web") == 2)
        .await;
    // Watch the ready count through the replacement.
    let board = h.board.clone();
    let low = Arc::new(Mutex::new(usize::MAX));
    let watch = {
        let low = low.clone();
        tokio::spawn(async move {
            loop {
                let n = board
                    .replicas_of("web")
                    .iter()
                    .filter(|s| s.is_ready())
                    .count();
                {
                    let mut l = low.lock().unwrap();
                    *l = (*l).min(n);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let v2 = v1
        .replace("VERSION: \"1\"", "VERSION: \"2\"")
        .replace("\"500\"", "\"3000\"");
    let asked = Instant::now();
    let msg = h.handle.apply(stack(&v2)).await.unwrap();
    watch.abort();
    assert!(
        msg.contains("updating web (revision 1 -> 2: rolling, all at once, start-first)"),
        "{msg}"
    );
    let launches = h.fake.launches.lock().unwrap().clone();
    let new: Vec<&(ReplicaId, Instant)> = launches.iter().filter(|l| l.0.revision == 2).collect();
    assert_eq!(new.len(), 2, "{launches:?}");
    let new_ready = new.iter().map(|l| l.1).max().unwrap() + Duration::from_millis(3000);
    let stops = h.fake.stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 2, "{stops:?}");
    for (id, at) in &stops {
        assert_eq!(id.revision, 1, "only the old revision stops");
        assert!(
            *at >= new_ready,
            "{id} stopped before the new replicas were ready"
        );
    }
    assert!(Instant::now() - asked >= Duration::from_secs(3));
    assert!(
        *low.lock().unwrap() >= 2,
        "fewer than two ready replicas during the replacement"
    );
    let now: Vec<Status> = h.replicas("web");
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|s| s.revision == 2 && s.is_ready()));
}

#[tokio::test(start_paused = true)]
async fn a_rolling_update_replaces_one_replica_at_a_time_keeping_capacity() {
    let v1 = r#"
services:
  web:
    command: [x]
    environment: {FAKE_HEALTHY_AFTER_MS: "500", VERSION: "1"}
    healthcheck: {test: ["CMD", "check"], interval: 1s}
    deploy:
      replicas: 3
      update_config: {parallelism: 1, order: start-first, monitor: 2s, delay: 1s}
"#;
    let h = Harness::start(v1, false, Vec::new());
    h.until("three ready", Duration::from_secs(5), |h| {
        h.ready("web") == 3
    })
    .await;
    let board = h.board.clone();
    let (low, high) = (Arc::new(Mutex::new(usize::MAX)), Arc::new(Mutex::new(0)));
    let watch = {
        let (low, high) = (low.clone(), high.clone());
        tokio::spawn(async move {
            loop {
                let all = board.replicas_of("web");
                let ready = all.iter().filter(|s| s.is_ready()).count();
                let new = all.iter().filter(|s| s.revision == 2).count();
                let old = all.iter().filter(|s| s.revision == 1).count();
                {
                    let mut l = low.lock().unwrap();
                    *l = (*l).min(ready);
                }
                // Never more than one replica beyond the count (one batch).
                {
                    let mut m = high.lock().unwrap();
                    *m = (*m).max(new + old);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let msg = h
        .handle
        .apply(stack(&v1.replace("VERSION: \"1\"", "VERSION: \"2\"")))
        .await
        .unwrap();
    watch.abort();
    assert!(msg.contains("1 at a time, start-first"), "{msg}");
    assert!(*low.lock().unwrap() >= 3, "capacity dropped");
    assert_eq!(*high.lock().unwrap(), 4, "one batch at a time");
    // Each old replica stops only after its replacement was ready and
    // watched: the stops are spread over the rollout, not at its end.
    let launches = h.fake.launches.lock().unwrap().clone();
    let stops = h.fake.stops.lock().unwrap().clone();
    let new_launch: Vec<Instant> = launches
        .iter()
        .filter(|l| l.0.revision == 2)
        .map(|l| l.1)
        .collect();
    assert_eq!(new_launch.len(), 3);
    assert_eq!(stops.len(), 3);
    assert!(
        stops[0].1 < new_launch[2],
        "the first old replica stops before the last new one starts"
    );
    assert!(
        stops[0].1 >= new_launch[0] + Duration::from_millis(2500),
        "ready (0.5 s) and watched (2 s) first"
    );
    assert!(
        h.replicas("web")
            .iter()
            .all(|s| s.revision == 2 && s.is_ready())
    );
    let history = h.history.of("web");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].status, RevisionStatus::Superseded);
    assert_eq!(history[1].status, RevisionStatus::Active);
    assert_eq!(history[1].diff, ["environment.VERSION: \"1\" -> \"2\""]);
}

#[tokio::test(start_paused = true)]
async fn rollback_goes_back_to_the_revision_before() {
    let v1 = r#"
services:
  web:
    command: [x]
    environment: {VERSION: "1"}
    deploy:
      replicas: 2
      update_config: {parallelism: 0, monitor: 0s}
"#;
    let h = Harness::start(v1, false, Vec::new());
    h.until("two ready", Duration::from_secs(5), |h| h.ready("web") == 2)
        .await;
    h.handle
        .apply(stack(&v1.replace("VERSION: \"1\"", "VERSION: \"2\"")))
        .await
        .unwrap();
    let msg = h.handle.rollback("web", None).await.unwrap();
    assert_eq!(msg, "rolled web back to revision 1");
    h.until("revision 1 only", Duration::from_secs(30), |h| {
        let r = h.replicas("web");
        r.len() == 2 && r.iter().all(|s| s.revision == 1 && s.is_ready())
    })
    .await;
    let history = h.history.of("web");
    assert_eq!(
        history.iter().find(|i| i.revision == 2).unwrap().status,
        RevisionStatus::RolledBack
    );
    assert_eq!(
        history.iter().find(|i| i.revision == 1).unwrap().status,
        RevisionStatus::Active
    );
    // Deployed again (revision 3, the same definition as 2), a rollback
    // skips 2 (rolled back, and no different) and goes to 1.
    h.handle
        .apply(stack(&v1.replace("VERSION: \"1\"", "VERSION: \"2\"")))
        .await
        .unwrap();
    let msg = h.handle.rollback("web", None).await.unwrap();
    assert_eq!(msg, "rolled web back to revision 1");
    let e = h.handle.rollback("web", Some(7)).await.unwrap_err();
    assert!(e.to_string().contains("no revision 7"), "{e}");
    let e = h.handle.rollback("web", Some(1)).await.unwrap_err();
    assert!(e.to_string().contains("runs revision 1 already"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn failure_action_pause_keeps_both_revisions_until_a_rollback() {
    let v1 = r#"
services:
  web:
    command: [x]
    environment: {VERSION: "1"}
    healthcheck: {test: ["CMD", "check"], interval: 1s}
    deploy:
      replicas: 2
      restart_policy: {condition: any, delay: 100ms}
      update_config: {order: start-first, failure_action: pause}
"#;
    let h = Harness::start(v1, false, Vec::new());
    h.until("two ready", Duration::from_secs(5), |h| h.ready("web") == 2)
        .await;
    let v2 = v1.replace(
        "VERSION: \"1\"",
        "VERSION: \"2\", FAKE_EXIT_AFTER_MS: \"10\", FAKE_CODE: \"1\"",
    );
    let err = h.handle.apply(stack(&v2)).await.unwrap_err().to_string();
    assert!(err.contains("the rollout is paused"), "{err}");
    let revs: Vec<u64> = h.replicas("web").iter().map(|s| s.revision).collect();
    assert!(revs.contains(&1) && revs.contains(&2), "{revs:?}");
    let status = |r: u64| h.history.get("web", r).map(|i| i.status);
    assert_eq!(status(2), Some(RevisionStatus::Paused));
    h.handle.rollback("web", None).await.unwrap();
    h.until("revision 1 only", Duration::from_secs(30), |h| {
        h.replicas("web").iter().all(|s| s.revision == 1)
    })
    .await;
    assert_eq!(status(2), Some(RevisionStatus::RolledBack));
    assert_eq!(status(1), Some(RevisionStatus::Active));
}

#[tokio::test(start_paused = true)]
async fn stopping_a_service_ends_its_rollout() {
    let v1 = r#"
services:
  web:
    command: [x]
    environment: {VERSION: "1"}
    deploy:
      replicas: 2
      update_config: {parallelism: 1, order: start-first, monitor: 30s}
"#;
    let h = Harness::start(v1, false, Vec::new());
    h.until("two ready", Duration::from_secs(5), |h| h.ready("web") == 2)
        .await;
    let handle = h.handle.clone();
    let v2 = stack(&v1.replace("VERSION: \"1\"", "VERSION: \"2\""));
    let apply = tokio::spawn(async move { handle.apply(v2).await });
    h.until("a replica of revision 2", Duration::from_secs(10), |h| {
        h.replicas("web").iter().any(|s| s.revision == 2)
    })
    .await;
    h.handle.stop(vec!["web".into()]).await.unwrap();
    let err = apply.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("web was stopped during its rollout"), "{err}");
    // Started again: revision 2 everywhere, no rollback.
    h.handle.start(vec!["web".into()]).await.unwrap();
    h.until("two of revision 2", Duration::from_secs(10), |h| {
        let r = h.replicas("web");
        r.len() == 2 && r.iter().all(|s| s.revision == 2 && s.is_ready())
    })
    .await;
    assert!(
        h.events
            .subscribe_with_history()
            .0
            .iter()
            .all(|e| e.kind != "rollback")
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_revision_that_crash_loops_leaves_the_old_one_serving() {
    let v1 = r#"
services:
  web:
    command: [x]
    environment: {VERSION: "1"}
    healthcheck: {test: ["CMD", "check"], interval: 1s}
    deploy:
      replicas: 2
      restart_policy: {condition: any, delay: 100ms}
      update_config: {order: start-first}
"#;
    let h = Harness::start(v1, false, Vec::new());
    h.until("two ready", Duration::from_secs(5), |h| h.ready("web") == 2)
        .await;
    let v2 = v1.replace(
        "VERSION: \"1\"",
        "VERSION: \"2\", FAKE_HEALTHY_AFTER_MS: \"1000\", FAKE_EXIT_AFTER_MS: \"10\", FAKE_CODE: \"1\"",
    );
    let err = h.handle.apply(stack(&v2)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::NotReady(_)), "{err:?}");
    assert!(
        text.contains("revision 2: replica 0 is crash-looping"),
        "{text}"
    );
    assert!(text.contains("rolled back to revision 1"), "{text}");
    // Rolled back: revision 2 is gone, revision 1 serves as before.
    h.until("revision 2 gone", Duration::from_secs(30), |h| {
        h.replicas("web").iter().all(|s| s.revision == 1)
    })
    .await;
    let history = h.history.of("web");
    let status = |r: u64| history.iter().find(|i| i.revision == r).map(|i| i.status);
    assert_eq!(status(1), Some(RevisionStatus::Active));
    assert_eq!(status(2), Some(RevisionStatus::RolledBack));
    let old: Vec<Status> = h
        .replicas("web")
        .into_iter()
        .filter(|s| s.revision == 1)
        .collect();
    assert_eq!(old.len(), 2);
    assert!(old.iter().all(Status::is_ready));
    assert!(
        h.fake
            .stops
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.0.revision != 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_in_progress_delays_no_other_command() {
    let h = Harness::start(
        r#"
services:
  slow:
    command: [x]
    stop_grace_period: 20s
    deploy: {replicas: 1}
  other:
    command: [x]
    deploy: {replicas: 1}
"#,
        true,
        Vec::new(),
    );
    h.until("both ready", Duration::from_secs(2), |h| {
        h.ready("slow") == 1 && h.ready("other") == 1
    })
    .await;
    // Scaling `slow` to zero drains for its whole grace period (20 s); the
    // new count is visible at once.
    let t0 = Instant::now();
    h.handle
        .scale(BTreeMap::from([("slow".into(), 0)]), false)
        .await
        .unwrap();
    assert_eq!(h.board.service("slow").unwrap().desired, 0);
    // Another service scales meanwhile, and its command returns at once.
    h.handle
        .scale(BTreeMap::from([("other".into(), 3)]), true)
        .await
        .unwrap();
    assert!(Instant::now() - t0 < Duration::from_millis(100));
    h.until("three of other ready", Duration::from_secs(1), |h| {
        h.ready("other") == 3
    })
    .await;
    assert!(Instant::now() - t0 < Duration::from_secs(2));
    // A request waking `slow` during its drain starts a replica without
    // waiting for the old one to go.
    h.handle.wake("slow");
    h.until("slow woken", Duration::from_secs(1), |h| {
        h.replicas("slow")
            .iter()
            .any(|s| s.replica == 1 && s.is_ready())
    })
    .await;
    assert!(Instant::now() - t0 < Duration::from_secs(2));
    assert_eq!(h.board.service("slow").unwrap().desired, 1);
    let ids: Vec<u32> = h.replicas("slow").iter().map(|s| s.replica).collect();
    assert_eq!(
        ids,
        [0, 1],
        "the new replica takes the next index while 0 drains"
    );
    // The old one stops once drained.
    h.until("the drained replica gone", Duration::from_secs(25), |h| {
        h.replicas("slow").len() == 1
    })
    .await;
    let drained = h.drain.drained.lock().unwrap().clone();
    assert_eq!(drained.len(), 1);
    assert!(drained[0].1 - t0 >= Duration::from_secs(20));
    // Scaling with `wait` returns once the replicas scaled away stopped.
    let t1 = Instant::now();
    h.handle
        .scale(BTreeMap::from([("other".into(), 1)]), true)
        .await
        .unwrap();
    assert!(
        Instant::now() - t1 >= Duration::from_secs(10),
        "waited for the drain"
    );
    assert_eq!(h.replicas("other").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn recovers_from_the_durable_record_and_down_stops_everything() {
    let left = Record {
        service: "web".into(),
        replica: 0,
        revision: 7,
        pid: 4242,
        start_ticks: 1,
        cgroup: None,
        stop_signal: "SIGINT".into(),
        grace_ms: 3000,
        container: None,
    };
    let h = Harness::start(
        "services:\n  web:\n    command: [x]\n    deploy: {replicas: 2}\n",
        false,
        vec![left.clone()],
    );
    h.until("two ready", Duration::from_secs(2), |h| h.ready("web") == 2)
        .await;
    assert_eq!(*h.fake.recovered.lock().unwrap(), [left]);
    let path = h._dir.path().join("replicas.json");
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let saved = saved.as_object().unwrap();
    assert_eq!(
        saved.len(),
        2,
        "the new replicas, not the old record: {saved:?}"
    );
    assert!(saved.values().all(|r| r["pid"].as_i64().unwrap() >= 1000));
    let msg = h.handle.down(false).await.unwrap();
    assert_eq!(msg, "stopped every service");
    assert_eq!(h.fake.stops.lock().unwrap().len(), 2);
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved, serde_json::json!({}));
    h.task.await.unwrap();
    assert!(h.handle.is_closed());
    assert!(matches!(
        h.handle.scale(BTreeMap::new(), false).await,
        Err(Error::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn unknown_services_are_typed_errors() {
    let h = Harness::start("services:\n  web:\n    command: [x]\n", false, Vec::new());
    let e = h
        .handle
        .scale(BTreeMap::from([("nope".into(), 2)]), true)
        .await
        .unwrap_err();
    assert_eq!(e, Error::NoSuchService("nope".into()));
    let e = h
        .handle
        .stop(vec!["web".into(), "x".into()])
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "no such service: x");
}

#[tokio::test(start_paused = true)]
async fn restart_stops_first_then_starts_a_new_revision() {
    let h = Harness::start(
        r#"
services:
  db:
    command: [x]
    environment: {FAKE_STOP_MS: "2000"}
    deploy: {replicas: 2}
"#,
        false,
        Vec::new(),
    );
    h.until("two ready", Duration::from_secs(2), |h| h.ready("db") == 2)
        .await;
    h.handle.restart(vec!["db".into()]).await.unwrap();
    let launches = h.fake.launches.lock().unwrap().clone();
    let stops = h.fake.stops.lock().unwrap().clone();
    assert_eq!(stops.len(), 2);
    let last_stop_done = stops.iter().map(|s| s.1).max().unwrap() + Duration::from_millis(2000);
    let new: Vec<_> = launches.iter().filter(|l| l.0.revision == 2).collect();
    assert_eq!(new.len(), 2, "{launches:?}");
    assert!(
        new.iter().all(|l| l.1 >= last_stop_done),
        "a new replica started before the old ones were gone"
    );
    h.until("two ready again", Duration::from_secs(2), |h| {
        h.ready("db") == 2
    })
    .await;
    assert!(h.replicas("db").iter().all(|s| s.revision == 2));
}

#[tokio::test(start_paused = true)]
async fn down_waits_for_removed_services_still_stopping() {
    let both = r#"
services:
  keep:
    command: [x]
  gone:
    command: [x]
    environment: {FAKE_STOP_MS: "3000"}
    stop_grace_period: 10s
"#;
    let h = Harness::start(both, false, Vec::new());
    h.until("both ready", Duration::from_secs(2), |h| {
        h.ready("keep") == 1 && h.ready("gone") == 1
    })
    .await;
    let msg = h
        .handle
        .apply(stack("services:\n  keep:\n    command: [x]\n"))
        .await
        .unwrap();
    assert!(msg.contains("removed gone"), "{msg}");
    assert!(
        h.replicas("gone").is_empty(),
        "apply answered once it stopped"
    );
    // Removed again while stopping: down waits for it all the same.
    let h = Harness::start(both, false, Vec::new());
    h.until("both ready", Duration::from_secs(2), |h| {
        h.ready("keep") == 1 && h.ready("gone") == 1
    })
    .await;
    let handle = h.handle.clone();
    tokio::spawn(async move {
        let _ = handle
            .apply(stack("services:\n  keep:\n    command: [x]\n"))
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    h.handle.down(false).await.unwrap();
    assert!(
        Instant::now() - t >= Duration::from_millis(2800),
        "down returned before gone stopped"
    );
    assert!(h.replicas("gone").is_empty());
}
