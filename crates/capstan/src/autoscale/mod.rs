//! The autoscaler: every `interval`, right after a fresh resource sample, each
//! autoscaled service's metrics are read — cpu and memory from the replicas'
//! samples on the status board, the others through PromQL (a query function:
//! the daemon's engine, or a test's) —, [`hpa`]
//! turns them into a replica count, and the supervisor is told to scale through
//! its handle. With `min: 0`, a service that took no request for `idle_after`
//! (read through PromQL too, from the proxy's metrics) is scaled to zero; the
//! proxy's wake hook, wired by the daemon, starts it again. It takes a clock,
//! so its tests run on paused time.

pub mod hpa;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use capstan_promql::QueryValue;
use hpa::{Observation, ReplicaValue};

use crate::events::EventLog;
use crate::spec::{Autoscale, Limits, MetricSource, Stack};
use crate::state::clock::Clock;
use crate::state::control::{Hook, SupervisorHandle};
use crate::state::{Revision, SAMPLE_EVERY, StatusBoard};

/// The range of the rates the built-in metrics take (cpu, rps): `irate` over
/// it is the rate between the last two samples (half a second apart), so a
/// load step shows in the next evaluation; a missed scrape is tolerated. Noise
/// is the scale-down stabilization window's business, as in the HPA.
const RATE_WINDOW: &str = "2s";

/// One metric as last read, for `capstan autoscale status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricStatus {
    pub metric: String,
    /// Average per replica (or total), in the metric's unit (cpu/memory: %).
    pub value: Option<f64>,
    pub target: f64,
    pub ratio: Option<f64>,
    pub replicas: Option<u32>,
}

/// What the autoscaler last decided for a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ServiceStatus {
    pub service: String,
    pub min: u32,
    pub max: u32,
    pub current: u32,
    pub desired: u32,
    pub metrics: Vec<MetricStatus>,
    /// The last decision's reason.
    pub reason: String,
    /// When the last scale happened (unix ms).
    pub last_scale_ms: Option<i64>,
    /// Seconds since the last request through the proxy.
    pub idle_seconds: Option<f64>,
}

pub use crate::state::control::QueryFn;

/// A metric's value by replica (revision and index).
type PerReplica = BTreeMap<(Revision, u32), f64>;

/// Values by replica from a `sum by (revision, replica)` result.
fn by_replica(v: &QueryValue) -> PerReplica {
    match v {
        QueryValue::Vector(samples) => samples
            .iter()
            .filter_map(|s| {
                let rev = s
                    .labels
                    .get("revision")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                Some(((rev, s.labels.get("replica")?.parse().ok()?), s.v))
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn total(v: &QueryValue) -> Option<f64> {
    match v {
        QueryValue::Scalar(_, x) => Some(*x),
        QueryValue::Vector(s) if !s.is_empty() => Some(s.iter().map(|x| x.v).sum()),
        _ => None,
    }
}

/// CPU and memory per replica, in percent of the limit, from the supervisor's
/// own samples (twice a second), as the HPA reads resource metrics from the
/// kubelet rather than from Prometheus: a load step shows in the first sample
/// after it, without waiting for a scrape. `None` for the other metrics.
fn resource_values(
    source: &MetricSource,
    replicas: &[crate::state::Status],
    limits: &Limits,
) -> Option<Result<PerReplica, String>> {
    let per = |value: &dyn Fn(&crate::state::Status) -> Option<f64>| {
        replicas
            .iter()
            .filter_map(|s| Some(((s.revision, s.replica), value(s)?)))
            .collect()
    };
    match source {
        MetricSource::Cpu => {
            let cpus = limits.cpus.unwrap_or(1.0);
            Some(Ok(per(&|s| s.cpu_percent.map(|p| p / cpus))))
        }
        MetricSource::Memory => Some(match limits.memory {
            Some(limit) => Ok(per(&|s| {
                s.memory_bytes.map(|b| b as f64 * 100.0 / limit as f64)
            })),
            None => Err("the service has no memory limit".into()),
        }),
        _ => None,
    }
}

/// The PromQL of a metric the proxy counts, per replica.
fn builtin_query(source: &MetricSource, service: &str) -> Option<String> {
    let sel = format!("{{service=\"{service}\"}}");
    Some(match source {
        MetricSource::Rps => {
            format!("sum by (revision, replica) (irate(http_requests_total{sel}[{RATE_WINDOW}]))")
        }
        MetricSource::Inflight => {
            format!("sum by (revision, replica) (http_requests_in_flight{sel})")
        }
        MetricSource::Query(_) | MetricSource::Cpu | MetricSource::Memory => return None,
    })
}

/// What a built-in metric's percent is a percent of, in the words `capstan ps`
/// uses for the same number.
pub fn percent_of(source: &MetricSource, limits: &Limits) -> Option<String> {
    match source {
        MetricSource::Cpu => Some(match limits.cpus {
            Some(c) => format!("of its {c} CPU limit"),
            None => "of one CPU".to_owned(),
        }),
        MetricSource::Memory => Some("of its memory limit".to_owned()),
        _ => None,
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Seconds since `service`'s last request through the proxy, 0 while one is
/// in flight or waiting: from the proxy's metrics, through PromQL.
fn idle_query(service: &str) -> String {
    let sel = format!("{{service=\"{service}\"}}");
    format!(
        "(time() - max(capstan_proxy_last_request_timestamp_seconds{sel})) \
         * (((sum(http_requests_in_flight{sel}) or vector(0)) \
         + (sum(capstan_proxy_queue_length{sel}) or vector(0))) == bool 0)"
    )
}

struct Tracked {
    scaler: hpa::Scaler,
    next: Instant,
    /// The newest resource sample of the service's replicas when it was last
    /// evaluated (unix ms).
    seen_ms: i64,
}

/// A decision that is due waits at most this long for a fresh resource
/// sample of the service's replicas (they come every [`SAMPLE_EVERY`]), so it
/// reads the newest load.
const FRESH_WAIT: Duration = Duration::from_millis(600);

/// The autoscaler's settings (from the stack) and its last decisions.
pub struct Autoscaler {
    board: Arc<StatusBoard>,
    events: Arc<EventLog>,
    specs: Mutex<BTreeMap<String, (Autoscale, Limits)>>,
    statuses: Mutex<BTreeMap<String, ServiceStatus>>,
}

impl Hook for Arc<Autoscaler> {
    fn on_apply(&self, stack: &Stack) -> Vec<String> {
        *self.specs.lock().unwrap() = stack
            .services
            .iter()
            .filter_map(|(n, s)| {
                let a = s.x.autoscale.clone()?;
                Some((n.clone(), (a, s.deploy.resources.limits.clone())))
            })
            .collect();
        Vec::new()
    }
}

/// What the controller works with: how it reads metrics, the time, and the
/// supervisor it scales through.
pub struct Deps {
    pub query: QueryFn,
    pub clock: Arc<dyn Clock>,
    pub supervisor: SupervisorHandle,
}

impl Autoscaler {
    pub fn new(board: Arc<StatusBoard>, events: Arc<EventLog>) -> Arc<Autoscaler> {
        Arc::new(Autoscaler {
            board,
            events,
            specs: Mutex::default(),
            statuses: Mutex::default(),
        })
    }

    /// Runs until `stop` is set or the supervisor is gone.
    pub async fn run(self: Arc<Self>, deps: Deps, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tracked: BTreeMap<String, Tracked> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut samples = self.board.watch_samples();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Ok(()) = samples.changed() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if deps.supervisor.is_closed() {
                return;
            }
            let specs = self.specs.lock().unwrap().clone();
            tracked.retain(|k, _| specs.contains_key(k));
            self.statuses
                .lock()
                .unwrap()
                .retain(|k, _| specs.contains_key(k));
            for (service, (spec, limits)) in &specs {
                let now = deps.clock.now();
                let t = tracked.entry(service.clone()).or_insert_with(|| Tracked {
                    scaler: hpa::Scaler::default(),
                    next: now,
                    seen_ms: 0,
                });
                if now < t.next {
                    continue;
                }
                let newest = self
                    .board
                    .replicas_of(service)
                    .iter()
                    .filter_map(|r| r.cpu_sampled_ms)
                    .max()
                    .unwrap_or(0);
                if newest <= t.seen_ms && now < t.next + FRESH_WAIT {
                    continue;
                }
                t.seen_ms = newest;
                // Due again a little before the interval is up, so the sample
                // that completes it is the one taken.
                t.next = now + spec.interval.0.saturating_sub(SAMPLE_EVERY / 2);
                self.evaluate(&deps, service, spec, limits, &mut t.scaler)
                    .await;
            }
        }
    }

    fn warn(&self, msg: String) {
        self.events.warn_once(msg);
    }

    async fn evaluate(
        &self,
        deps: &Deps,
        service: &str,
        spec: &Autoscale,
        limits: &Limits,
        scaler: &mut hpa::Scaler,
    ) {
        let Some(svc) = self.board.service(service) else {
            return;
        };
        if svc.stopped {
            return;
        }
        let now_ms = deps.clock.unix_ms();
        let query = |q: &str| (deps.query)(q, now_ms);
        let current = svc.desired;
        let idle = match query(&idle_query(service)) {
            Ok(v) => total(&v),
            Err(e) => {
                self.warn(format!("autoscale {service}: idleness query failed: {e}"));
                None
            }
        };
        let mut status = ServiceStatus {
            service: service.to_owned(),
            min: spec.min,
            max: spec.max,
            current,
            desired: current,
            idle_seconds: idle,
            last_scale_ms: self
                .statuses
                .lock()
                .unwrap()
                .get(service)
                .and_then(|s| s.last_scale_ms),
            ..Default::default()
        };
        if current == 0 {
            status.reason = "scaled to zero; the next request starts a replica".into();
            self.publish(service, status);
            return;
        }
        // Scale to zero after idle_after without requests — and not before
        // the newest replica has been up that long: the idleness read through
        // the scrape may predate the request that just woke the service.
        // A replica still starting counts as just started.
        let settled = self.board.replicas_of(service).iter().all(|r| {
            r.started_ms
                .is_some_and(|t| (now_ms - t) as f64 / 1e3 >= spec.idle_after.0.as_secs_f64())
        });
        if spec.min == 0 && settled && idle.is_some_and(|s| s >= spec.idle_after.0.as_secs_f64()) {
            let reason = format!("no request for {}; scaled to zero", spec.idle_after);
            if self.scale(deps, service, current, 0, &reason).await {
                scaler.scaled(deps.clock.now(), current, 0);
                status.desired = 0;
                status.last_scale_ms = Some(deps.clock.unix_ms());
            }
            status.reason = reason;
            self.publish(service, status);
            return;
        }
        let replicas: Vec<crate::state::Status> = self
            .board
            .replicas_of(service)
            .into_iter()
            .filter(|s| s.pid.is_some())
            .collect();
        let ready = replicas.iter().filter(|s| s.is_ready()).count() as u32;
        let mut best: Option<(u32, String)> = None;
        let mut failed = false;
        for m in &spec.metrics {
            let name = m.source.name().to_owned();
            let obs = match &m.source {
                MetricSource::Query(q) => match query(q) {
                    Ok(v) => total(&v).map(|t| {
                        if m.average {
                            Observation::AverageOfTotal {
                                total: t,
                                target: m.target,
                            }
                        } else {
                            Observation::Total {
                                value: t,
                                target: m.target,
                            }
                        }
                    }),
                    Err(e) => {
                        self.warn(format!("autoscale {service}: query failed: {e}"));
                        None
                    }
                },
                src => {
                    let per = match resource_values(src, &replicas, limits) {
                        Some(per) => per,
                        None => {
                            let q = builtin_query(src, service).unwrap_or_default();
                            query(&q).map(|v| by_replica(&v))
                        }
                    };
                    match per {
                        Ok(per) => {
                            if m.average {
                                Some(Observation::PerReplica {
                                    values: replicas
                                        .iter()
                                        .map(|s| ReplicaValue {
                                            ready: s.is_ready(),
                                            value: per.get(&(s.revision, s.replica)).copied(),
                                        })
                                        .collect(),
                                    target: m.target,
                                })
                            } else {
                                (!per.is_empty()).then(|| Observation::Total {
                                    value: per.values().sum(),
                                    target: m.target,
                                })
                            }
                        }
                        Err(e) => {
                            self.warn(format!("autoscale {service}: {name} query failed: {e}"));
                            None
                        }
                    }
                }
            };
            let rec = obs
                .as_ref()
                .and_then(|o| hpa::recommend(o, current, ready, spec.tolerance));
            status.metrics.push(MetricStatus {
                metric: name.clone(),
                value: rec.as_ref().map(|r| r.value),
                target: m.target,
                ratio: rec.as_ref().map(|r| r.ratio),
                replicas: rec.as_ref().map(|r| r.replicas),
            });
            match rec {
                None => failed = true,
                Some(r) => {
                    let why = match percent_of(&m.source, limits) {
                        Some(of) => format!(
                            "{name} {}% {of} (target {}%) → desired {}",
                            fmt_num(r.value),
                            fmt_num(m.target),
                            r.replicas
                        ),
                        None => format!(
                            "{name} {} (target {}) → desired {}",
                            fmt_num(r.value),
                            fmt_num(m.target),
                            r.replicas
                        ),
                    };
                    if best.as_ref().is_none_or(|(n, _)| r.replicas > *n) {
                        best = Some((r.replicas, why));
                    }
                }
            }
        }
        let (mut wanted, mut reason) = match best {
            Some(b) => b,
            None if spec.metrics.is_empty() => (current, "no metrics configured".to_owned()),
            None => (
                current,
                "no metric could be read; keeping the count".to_owned(),
            ),
        };
        // As HPA: with a metric missing, never scale down.
        if failed && wanted < current {
            reason.push_str(", but a metric is missing: not scaling down");
            wanted = current;
        }
        let d = scaler.decide(
            deps.clock.now(),
            current,
            wanted,
            spec.min.max(1),
            spec.max,
            &spec.behavior,
        );
        if d.stabilized != wanted
            && d.stabilized == current
            && d.desired == current
            && wanted < current
        {
            reason.push_str(&format!(
                ", held at {current} by the scaleDown stabilization window ({})",
                spec.behavior.scale_down.stabilization
            ));
        } else if d.stabilized != wanted {
            reason.push_str(&format!(", stabilized to {}", d.stabilized));
        }
        if let Some(l) = &d.limited_by {
            reason.push_str(&format!(", {l}"));
        }
        status.desired = d.desired;
        if d.desired != current && self.scale(deps, service, current, d.desired, &reason).await {
            scaler.scaled(deps.clock.now(), current, d.desired);
            status.last_scale_ms = Some(deps.clock.unix_ms());
        }
        status.reason = reason;
        self.publish(service, status);
    }

    /// Makes a service's latest decision visible to `capstan autoscale status`.
    fn publish(&self, service: &str, status: ServiceStatus) {
        self.statuses
            .lock()
            .unwrap()
            .insert(service.to_owned(), status);
    }

    /// Asks the supervisor for `to` replicas; true when it did. Does not wait
    /// for replicas scaled away to stop.
    async fn scale(&self, deps: &Deps, service: &str, from: u32, to: u32, reason: &str) -> bool {
        self.events.emit(
            service,
            None,
            "autoscaled",
            format!("{from} → {to} replicas: {reason}"),
        );
        deps.supervisor
            .scale(BTreeMap::from([(service.to_owned(), to)]), false)
            .await
            .is_ok()
    }

    /// What the autoscaler last decided, for every autoscaled service.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.statuses.lock().unwrap().values().cloned().collect()
    }

    /// Whether any service autoscales (its metrics are wanted often).
    pub fn any(&self) -> bool {
        !self.specs.lock().unwrap().is_empty()
    }
}

/// A per-service gauge: name, help, and its value in a status.
type CountGauge = (&'static str, &'static str, fn(&ServiceStatus) -> u32);

/// `capstan_autoscaler_*` families for capstan's own `/metrics`.
pub fn expose(e: &mut crate::exposition::Exposition, autoscaler: &Autoscaler) {
    let st = autoscaler.statuses();
    let counts: [CountGauge; 2] = [
        (
            "capstan_autoscaler_desired_replicas",
            "Replicas the autoscaler last decided on.",
            |s| s.desired,
        ),
        (
            "capstan_autoscaler_current_replicas",
            "Replicas running when the autoscaler last looked.",
            |s| s.current,
        ),
    ];
    for (name, help, value) in counts {
        e.family(name, "gauge", help);
        for s in &st {
            e.sample(name, &[("service", &s.service)], f64::from(value(s)));
        }
    }
    e.family(
        "capstan_autoscaler_metric_ratio",
        "gauge",
        "Each metric's value over its target, as last read.",
    );
    for s in &st {
        for m in &s.metrics {
            if let Some(r) = m.ratio {
                e.sample(
                    "capstan_autoscaler_metric_ratio",
                    &[("service", &s.service), ("metric", &m.metric)],
                    r,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    use capstan_tsdb::Labels;

    use super::*;
    use crate::state::clock::TokioClock;
    use crate::state::control::Command;
    use crate::state::{Phase, ReplicaId, ServiceStatus as Svc};

    fn stack() -> Stack {
        let yaml = r#"
services:
  web:
    command: [x]
    x-capstan:
      autoscale:
        min: 0
        max: 4
        interval: 1s
        idle_after: 30s
        metrics: [{rps: 10}]
"#;
        let opts = crate::spec::LoadOptions {
            env: BTreeMap::new(),
            profiles: Vec::new(),
        };
        crate::spec::parse_text(
            yaml,
            "c.yaml",
            Path::new("/tmp"),
            "app",
            BTreeMap::new(),
            &opts,
        )
        .unwrap()
        .0
    }

    fn ready(board: &StatusBoard, n: u32) {
        board.set_services(vec![Svc {
            name: "web".into(),
            desired: n,
            stopped: false,
            has_healthcheck: false,
            revision: 1,
            rollout: None,
        }]);
        for i in 0..n {
            board.update(&ReplicaId::new("web", 1, i), |s| {
                s.state = Phase::Running;
                // Up for long.
                s.started_ms = Some(0);
                s.pid = Some(100 + i as i32);
                s.addr = Some(SocketAddr::from(([127, 0, 0, 1], 20000 + i as u16)));
                s.accepting = true;
            });
        }
    }

    /// PromQL as the test sets it: per-replica rps and seconds idle.
    struct Metrics {
        rps_per_replica: AtomicU64,
        idle_secs: AtomicU64,
        replicas: AtomicU64,
    }

    fn query_fn(m: Arc<Metrics>) -> QueryFn {
        Arc::new(move |q: &str, t: i64| {
            if q.contains("capstan_proxy_last_request_timestamp_seconds") {
                return Ok(QueryValue::Scalar(t, m.idle_secs.load(Relaxed) as f64));
            }
            assert!(q.contains("http_requests_total"), "{q}");
            let samples = (0..m.replicas.load(Relaxed))
                .map(|i| capstan_promql::Sample {
                    labels: Labels::new(vec![
                        ("replica".to_owned(), i.to_string()),
                        ("revision".to_owned(), "1".to_owned()),
                    ]),
                    t,
                    v: m.rps_per_replica.load(Relaxed) as f64,
                })
                .collect();
            Ok(QueryValue::Vector(samples))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn decides_on_paused_time_through_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let board = Arc::new(StatusBoard::default());
        let events = Arc::new(EventLog::open(dir.path()).unwrap());
        let a = Autoscaler::new(board.clone(), events);
        a.on_apply(&stack());
        ready(&board, 2);
        let m = Arc::new(Metrics {
            rps_per_replica: AtomicU64::new(30),
            idle_secs: AtomicU64::new(0),
            replicas: AtomicU64::new(2),
        });
        let (handle, mut rx) = SupervisorHandle::channel();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let deps = Deps {
            query: query_fn(m.clone()),
            clock: Arc::new(TokioClock::starting_at(1_700_000_000_000)),
            supervisor: handle,
        };
        let task = tokio::spawn(a.clone().run(deps, stop));
        // 30 rps per replica against a target of 10: 2 → 6, capped at 4.
        let t0 = tokio::time::Instant::now();
        let Some(Command::Scale {
            counts,
            wait,
            reply,
        }) = rx.recv().await
        else {
            panic!("expected a scale");
        };
        assert_eq!(counts, BTreeMap::from([("web".to_owned(), 4)]));
        assert!(!wait, "the autoscaler does not wait for drains");
        let _ = reply.send(Ok("scaled".into()));
        assert!(tokio::time::Instant::now() - t0 < Duration::from_secs(1));
        ready(&board, 4);
        m.replicas.store(4, Relaxed);
        // Idle for longer than idle_after: scaled to zero at the next interval.
        m.rps_per_replica.store(0, Relaxed);
        m.idle_secs.store(31, Relaxed);
        let Some(Command::Scale { counts, reply, .. }) = rx.recv().await else {
            panic!("expected a scale");
        };
        assert_eq!(counts, BTreeMap::from([("web".to_owned(), 0)]));
        let _ = reply.send(Ok("scaled".into()));
        let elapsed = tokio::time::Instant::now() - t0;
        assert!(
            elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let st = a.statuses();
        assert_eq!(st[0].desired, 0);
        assert_eq!(st[0].idle_seconds, Some(31.0));
        assert!(
            st[0].reason.contains("no request for 30s"),
            "{}",
            st[0].reason
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    /// A wake starts a replica while the idleness read through the scrape
    /// still predates the request: no scale back to zero before the new
    /// replica has been up for `idle_after`.
    #[tokio::test(start_paused = true)]
    async fn a_woken_service_is_not_scaled_back_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let board = Arc::new(StatusBoard::default());
        let events = Arc::new(EventLog::open(dir.path()).unwrap());
        let a = Autoscaler::new(board.clone(), events);
        a.on_apply(&stack());
        let clock = TokioClock::starting_at(1_700_000_000_000);
        ready(&board, 1);
        // Woken: its replica is still starting (no start time yet), and runs
        // from 10 s on; idleness as scraped says 45 s all along.
        board.update(&ReplicaId::new("web", 1, 0), |s| {
            s.state = crate::state::Phase::Starting;
            s.pid = None;
            s.started_ms = None;
        });
        let b2 = board.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            b2.update(&ReplicaId::new("web", 1, 0), |s| {
                s.state = crate::state::Phase::Running;
                s.pid = Some(7);
                s.started_ms = Some(1_700_000_010_000);
            });
        });
        let m = Arc::new(Metrics {
            rps_per_replica: AtomicU64::new(0),
            idle_secs: AtomicU64::new(45),
            replicas: AtomicU64::new(1),
        });
        let (handle, mut rx) = SupervisorHandle::channel();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let deps = Deps {
            query: query_fn(m),
            clock: Arc::new(clock),
            supervisor: handle,
        };
        let task = tokio::spawn(a.clone().run(deps, stop));
        let t0 = tokio::time::Instant::now();
        let Some(Command::Scale { counts, reply, .. }) = rx.recv().await else {
            panic!("expected a scale");
        };
        assert_eq!(counts, BTreeMap::from([("web".to_owned(), 0)]));
        let _ = reply.send(Ok("scaled".into()));
        let waited = tokio::time::Instant::now() - t0;
        assert!(
            waited >= Duration::from_secs(30),
            "scaled to zero after {waited:?}"
        );
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
