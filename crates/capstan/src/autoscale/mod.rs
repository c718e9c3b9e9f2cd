//! The autoscaler: every `interval`, each autoscaled service's metrics are read
//! through the PromQL engine, [`hpa`] turns them into a replica count, and the
//! supervisor is told to scale. With `min: 0`, a service with no request for
//! `idle_after` is scaled to zero, and the proxy wakes it on the next request.

pub mod hpa;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use capstan_promql::{Engine, QueryValue};
use hpa::{Observation, ReplicaValue};

use crate::spec::{Autoscale, Limits, MetricSource};
use crate::supervisor::{Command, Shared};

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

/// Reads one PromQL expression at the current time.
fn query(db: &capstan_tsdb::Db, engine: &Engine, q: &str) -> Result<QueryValue, String> {
    let now = crate::events::now_ms();
    tokio::task::block_in_place(|| engine.instant(db, q, now))
        .map(|o| o.value)
        .map_err(|e| e.to_string())
}

/// Values by replica index from a `sum by (replica)` result.
fn by_replica(v: &QueryValue) -> BTreeMap<u32, f64> {
    match v {
        QueryValue::Vector(samples) => samples
            .iter()
            .filter_map(|s| Some((s.labels.get("replica")?.parse().ok()?, s.v)))
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

/// The PromQL of a built-in metric, per replica, in its unit.
fn builtin_query(source: &MetricSource, service: &str, limits: &Limits) -> Option<String> {
    let sel = format!("{{service=\"{service}\"}}");
    Some(match source {
        MetricSource::Cpu => format!(
            "sum by (replica) (irate(container_cpu_usage_seconds_total{sel}[{RATE_WINDOW}])) * 100 / {}",
            limits.cpus.unwrap_or(1.0)
        ),
        MetricSource::Memory => format!(
            "sum by (replica) (container_memory_working_set_bytes{sel}) * 100 / {}",
            limits.memory? as f64
        ),
        MetricSource::Rps => {
            format!("sum by (replica) (irate(http_requests_total{sel}[{RATE_WINDOW}]))")
        }
        MetricSource::Inflight => format!("sum by (replica) (http_requests_in_flight{sel})"),
        MetricSource::Query(_) => return None,
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

struct Tracked {
    scaler: hpa::Scaler,
    next: Instant,
}

/// Runs until the command channel closes.
pub async fn run(
    shared: Arc<Shared>,
    db: Arc<capstan_tsdb::Db>,
    engine: Arc<Engine>,
    commands: mpsc::Sender<Command>,
) {
    let mut tracked: BTreeMap<String, Tracked> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if commands.is_closed() {
            return;
        }
        let specs = shared.autoscale_specs.lock().unwrap().clone();
        tracked.retain(|k, _| specs.contains_key(k));
        shared
            .autoscale_status
            .lock()
            .unwrap()
            .retain(|k, _| specs.contains_key(k));
        for (service, (spec, limits)) in &specs {
            install_wake(&shared, service, spec, &commands);
            let t = tracked.entry(service.clone()).or_insert_with(|| Tracked {
                scaler: hpa::Scaler::default(),
                next: Instant::now(),
            });
            if Instant::now() < t.next {
                continue;
            }
            t.next = Instant::now() + spec.interval.0;
            evaluate(
                &shared,
                &db,
                &engine,
                &commands,
                service,
                spec,
                limits,
                &mut t.scaler,
            )
            .await;
        }
    }
}

/// With `min: 0`, a request that finds no replica asks for one.
fn install_wake(
    shared: &Arc<Shared>,
    service: &str,
    spec: &Autoscale,
    commands: &mpsc::Sender<Command>,
) {
    let Some(b) = shared.proxy.backend(service) else {
        return;
    };
    let mut slot = b.on_empty.lock().unwrap();
    if spec.min > 0 {
        *slot = None;
        return;
    }
    if slot.is_some() {
        return;
    }
    let shared = Arc::downgrade(shared);
    let commands = commands.clone();
    let name = service.to_owned();
    let waking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    *slot = Some(Box::new(move || {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let desired = shared
            .service_statuses()
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.desired);
        if desired > 0 || waking.swap(true, Relaxed) {
            return;
        }
        shared.events.emit(
            &name,
            None,
            "waking",
            "a request arrived with no replica running; starting one",
        );
        let commands = commands.clone();
        let name = name.clone();
        let waking = waking.clone();
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let _ = commands
                .send(Command::Scale(BTreeMap::from([(name, 1)]), tx))
                .await;
            let _ = rx.await;
            waking.store(false, Relaxed);
        });
    }));
}

#[allow(clippy::too_many_arguments)]
async fn evaluate(
    shared: &Arc<Shared>,
    db: &capstan_tsdb::Db,
    engine: &Engine,
    commands: &mpsc::Sender<Command>,
    service: &str,
    spec: &Autoscale,
    limits: &Limits,
    scaler: &mut hpa::Scaler,
) {
    let Some(svc) = shared
        .service_statuses()
        .into_iter()
        .find(|s| s.name == service)
    else {
        return;
    };
    if svc.stopped {
        return;
    }
    let current = svc.desired;
    let backend = shared.proxy.backend(service);
    let idle = backend.as_ref().map(|b| {
        let last = b.last_request_ms.load(Relaxed) as i64;
        let busy = b.inflight() > 0 || b.queued.load(Relaxed) > 0;
        if busy {
            0.0
        } else {
            (crate::events::now_ms() - last).max(0) as f64 / 1e3
        }
    });
    let mut status = ServiceStatus {
        service: service.to_owned(),
        min: spec.min,
        max: spec.max,
        current,
        desired: current,
        idle_seconds: idle,
        last_scale_ms: shared
            .autoscale_status
            .lock()
            .unwrap()
            .get(service)
            .and_then(|s| s.last_scale_ms),
        ..Default::default()
    };
    if current == 0 {
        status.reason = "scaled to zero; the next request starts a replica".into();
        publish(shared, service, status);
        return;
    }
    // Scale to zero after idle_after without requests.
    if spec.min == 0 && idle.is_some_and(|s| s >= spec.idle_after.0.as_secs_f64()) {
        let reason = format!("no request for {}; scaled to zero", spec.idle_after);
        if scale(shared, commands, service, current, 0, &reason).await {
            scaler.scaled(Instant::now(), current, 0);
            status.desired = 0;
            status.last_scale_ms = Some(crate::events::now_ms());
        }
        status.reason = reason;
        publish(shared, service, status);
        return;
    }
    let replicas: Vec<crate::supervisor::Status> = shared
        .statuses()
        .into_iter()
        .filter(|s| s.service == service && s.pid.is_some())
        .collect();
    let ready_set: Vec<u32> = replicas
        .iter()
        .filter(|s| s.state == "running" && (s.health == "healthy" || s.health == "none"))
        .map(|s| s.replica)
        .collect();
    let ready = ready_set.len() as u32;
    let mut best: Option<(u32, String)> = None;
    let mut failed = false;
    for m in &spec.metrics {
        let name = m.source.name().to_owned();
        let obs = match &m.source {
            MetricSource::Query(q) => match query(db, engine, q) {
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
                    shared.warn_once(format!("autoscale {service}: query failed: {e}"));
                    None
                }
            },
            src => {
                let q = builtin_query(src, service, limits).unwrap_or_default();
                match query(db, engine, &q) {
                    Ok(v) => {
                        let per = by_replica(&v);
                        if m.average {
                            Some(Observation::PerReplica {
                                values: replicas
                                    .iter()
                                    .map(|s| ReplicaValue {
                                        ready: ready_set.contains(&s.replica),
                                        value: per.get(&s.replica).copied(),
                                    })
                                    .collect(),
                                target: m.target,
                            })
                        } else {
                            total(&v).map(|t| Observation::Total {
                                value: t,
                                target: m.target,
                            })
                        }
                    }
                    Err(e) => {
                        shared.warn_once(format!("autoscale {service}: {name} query failed: {e}"));
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
        Instant::now(),
        current,
        wanted,
        spec.min.max(1),
        spec.max,
        &spec.behavior,
    );
    if d.stabilized != wanted && d.stabilized == current && d.desired == current && wanted < current
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
    if d.desired != current && scale(shared, commands, service, current, d.desired, &reason).await {
        scaler.scaled(Instant::now(), current, d.desired);
        status.last_scale_ms = Some(crate::events::now_ms());
    }
    status.reason = reason;
    publish(shared, service, status);
}

/// Makes a service's latest decision visible to `capstan autoscale status`.
fn publish(shared: &Shared, service: &str, status: ServiceStatus) {
    shared
        .autoscale_status
        .lock()
        .unwrap()
        .insert(service.to_owned(), status);
}

/// Asks the supervisor for `to` replicas; true when it did.
async fn scale(
    shared: &Shared,
    commands: &mpsc::Sender<Command>,
    service: &str,
    from: u32,
    to: u32,
    reason: &str,
) -> bool {
    shared.events.emit(
        service,
        None,
        "autoscaled",
        format!("{from} → {to} replicas: {reason}"),
    );
    let (tx, rx) = oneshot::channel();
    if commands
        .send(Command::Scale(
            BTreeMap::from([(service.to_owned(), to)]),
            tx,
        ))
        .await
        .is_err()
    {
        return false;
    }
    matches!(rx.await, Ok(Ok(_)))
}

/// What the autoscaler last decided, for every autoscaled service.
pub fn statuses(shared: &Shared) -> Vec<ServiceStatus> {
    shared
        .autoscale_status
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect()
}

/// A per-service gauge: name, help, and its value in a status.
type CountGauge = (&'static str, &'static str, fn(&ServiceStatus) -> u32);

/// `capstan_autoscaler_*` families for capstan's own `/metrics`.
pub fn expose(e: &mut crate::collect::Exposition, shared: &Shared) {
    let st = statuses(shared);
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
