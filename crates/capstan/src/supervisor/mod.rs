//! The supervisor: runs every service's replicas and keeps them as the stack says.
//!
//! One actor ([`Supervisor::run`]) owns the services and takes [`Command`]s; each
//! replica is a task ([`replica::Replica`]) that publishes its [`Status`].

pub mod cgroup;
pub mod health;
pub mod process;
pub mod replica;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::events::EventLog;
use crate::logs::engine::LogEngine;
use crate::spec::{Condition, Service, Stack};

/// What `capstan ps` shows of one replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub service: String,
    pub replica: u32,
    pub pid: Option<i32>,
    pub port: Option<u16>,
    /// waiting, starting, running, restarting, crash-looping, stopping, stopped, exited, failed
    pub state: String,
    /// none, starting, healthy, unhealthy
    pub health: String,
    pub restarts: u32,
    pub started_ms: Option<i64>,
    pub last_exit: Option<String>,
    pub exit_code: Option<i32>,
    pub cpu_percent: Option<f64>,
    /// CPU time used by the current process (and its cgroup), in seconds.
    #[serde(default)]
    pub cpu_seconds_total: Option<f64>,
    /// When `cpu_seconds_total` was read (unix ms), exposed as its timestamp so
    /// rates are exact whatever the scrape's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_sampled_ms: Option<i64>,
    /// Working set: memory in use minus inactive file cache.
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub memory_rss_bytes: Option<u64>,
    /// The enforced memory limit, when a cgroup enforces one.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    /// The enforced CPU limit in CPUs, when a cgroup enforces one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    pub revision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Per-service summary for `capstan ps`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub desired: u32,
    pub stopped: bool,
    pub has_healthcheck: bool,
}

/// What the scraper needs from the stack: the default interval, each service's
/// metrics endpoint, and the static scrape configs.
pub type ScrapeSpecs = (
    Duration,
    BTreeMap<String, crate::spec::MetricsTarget>,
    Vec<crate::spec::ScrapeConfig>,
);

/// State shared by the supervisor, its replica tasks and the API.
pub struct Shared {
    /// Identifies this stack's processes (`CAPSTAN_STACK` in their environment).
    pub stack_id: String,
    pub stack_dir: PathBuf,
    pub events: EventLog,
    pub logs: LogEngine,
    /// Spans sent over OTLP and the proxy's own.
    pub traces: Arc<crate::traces::TraceStore>,
    pub cgroups: Option<cgroup::Cgroups>,
    pub state: Mutex<state::StateFile>,
    status: Mutex<BTreeMap<(String, u32), Status>>,
    services: Mutex<BTreeMap<String, ServiceStatus>>,
    pub changed: watch::Sender<u64>,
    ports: Mutex<BTreeSet<u16>>,
    port_range: Mutex<[u16; 2]>,
    /// Default scrape interval and each service's metrics endpoint, for the scraper.
    scrape: Mutex<ScrapeSpecs>,
    /// The daemon's own listener, scraped for its own and the host's metrics.
    pub api_addr: Mutex<Option<String>>,
    pub scrape_stats: Arc<crate::scrape::ScrapeStats>,
    /// HELP, TYPE and UNIT of the metric families each target exposes.
    pub scrape_metadata: Arc<crate::scrape::MetadataStore>,
    /// The proxy of each service's published ports.
    pub proxy: crate::proxy::Registry,
    /// Services that autoscale, with their CPU and memory limits.
    pub autoscale_specs: Mutex<BTreeMap<String, (crate::spec::Autoscale, crate::spec::Limits)>>,
    /// What the autoscaler last decided, per service.
    pub autoscale_status: Mutex<BTreeMap<String, crate::autoscale::ServiceStatus>>,
    warned: Mutex<BTreeSet<String>>,
}

impl Shared {
    pub fn new(
        stack_id: String,
        stack_dir: PathBuf,
        events: EventLog,
        logs: LogEngine,
        traces: crate::traces::TraceStore,
        cgroups: Option<cgroup::Cgroups>,
        state: state::StateFile,
    ) -> Shared {
        Shared {
            stack_id,
            stack_dir,
            events,
            logs,
            traces: Arc::new(traces),
            cgroups,
            state: Mutex::new(state),
            status: Mutex::default(),
            services: Mutex::default(),
            changed: watch::channel(0).0,
            ports: Mutex::default(),
            port_range: Mutex::new([20000, 29999]),
            scrape: Mutex::new((Duration::from_secs(15), BTreeMap::new(), Vec::new())),
            api_addr: Mutex::new(None),
            scrape_stats: Arc::default(),
            scrape_metadata: Arc::default(),
            proxy: crate::proxy::Registry::default(),
            autoscale_specs: Mutex::default(),
            autoscale_status: Mutex::default(),
            warned: Mutex::default(),
        }
    }

    pub fn update(&self, service: &str, replica: u32, f: impl FnOnce(&mut Status)) {
        {
            let mut map = self.status.lock().unwrap();
            let s = map
                .entry((service.to_owned(), replica))
                .or_insert_with(|| Status {
                    service: service.to_owned(),
                    replica,
                    state: "waiting".into(),
                    health: "none".into(),
                    ..Status::default()
                });
            f(s);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    fn forget(&self, service: &str, replica: u32) {
        self.status
            .lock()
            .unwrap()
            .remove(&(service.to_owned(), replica));
        self.changed.send_modify(|g| *g += 1);
    }

    /// The default scrape interval and every service's metrics endpoint.
    pub fn scrape_specs(&self) -> ScrapeSpecs {
        self.scrape.lock().unwrap().clone()
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.status.lock().unwrap().values().cloned().collect()
    }

    pub fn service_statuses(&self) -> Vec<ServiceStatus> {
        self.services.lock().unwrap().values().cloned().collect()
    }

    /// Whether every replica of `service` meets `cond` (a service scaled to zero does).
    pub fn dependency_met(&self, service: &str, cond: Condition) -> bool {
        let has_health = self
            .services
            .lock()
            .unwrap()
            .get(service)
            .is_some_and(|s| s.has_healthcheck);
        let map = self.status.lock().unwrap();
        map.values()
            .filter(|s| s.service == service)
            .all(|s| match cond {
                Condition::ServiceStarted => s.pid.is_some() || s.state == "exited",
                Condition::ServiceHealthy if has_health => s.health == "healthy",
                Condition::ServiceHealthy => s.pid.is_some(),
                Condition::ServiceCompletedSuccessfully => {
                    s.state == "exited" && s.exit_code == Some(0)
                }
            })
    }

    /// Logs a warning once per distinct message (and records it as an event).
    pub fn warn_once(&self, msg: String) {
        if self.warned.lock().unwrap().insert(msg.clone()) {
            tracing::warn!("{msg}");
            self.events.emit("capstan", None, "warning", msg);
        }
    }

    /// A free loopback port from the configured range, not given to another replica.
    pub fn alloc_port(&self) -> u16 {
        let [lo, hi] = *self.port_range.lock().unwrap();
        let span = u32::from(hi - lo) + 1;
        let seed =
            (crate::logs::now_ns() as u64 ^ u64::from(std::process::id()).rotate_left(17)) as u32;
        let mut ports = self.ports.lock().unwrap();
        for i in 0..span {
            let p = lo + ((seed.wrapping_add(i)) % span) as u16;
            if !ports.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                ports.insert(p);
                return p;
            }
        }
        // Range exhausted: let the kernel choose.
        std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0)
    }

    pub fn release_port(&self, p: u16) {
        self.ports.lock().unwrap().remove(&p);
    }
}

pub type Reply = oneshot::Sender<Result<String, String>>;

pub enum Command {
    Apply(Box<Stack>, Reply),
    Scale(BTreeMap<String, u32>, Reply),
    Restart(Vec<String>, Reply),
    Stop(Vec<String>, Reply),
    Start(Vec<String>, Reply),
    Down(Reply),
}

struct ReplicaHandle {
    ctl: mpsc::Sender<replica::Ctl>,
    task: JoinHandle<()>,
}

struct ServiceRt {
    spec: Arc<Service>,
    revision: String,
    desired: u32,
    stopped: bool,
    replicas: BTreeMap<u32, ReplicaHandle>,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    stack: Stack,
    services: BTreeMap<String, ServiceRt>,
    revision_counter: u64,
}

/// Stops replicas left by a daemon that died without stopping them.
pub async fn stop_leftovers(shared: &Shared) {
    let records = shared.state.lock().unwrap().records();
    let mut stops = Vec::new();
    for r in records {
        if !process::alive(r.pid, r.start_ticks) {
            if let Some(cg) = &r.cgroup {
                process::kill_leftovers(r.pid, Some(cg)).await;
            }
            continue;
        }
        shared.events.emit(
            &r.service,
            Some(r.replica),
            "stopping",
            format!(
                "found pid {} left by a previous daemon; stopping it before starting afresh",
                r.pid
            ),
        );
        stops.push(async move {
            let sig = process::signal_by_name(&r.stop_signal);
            process::stop_foreign(
                r.pid,
                r.cgroup.as_ref(),
                sig,
                Duration::from_millis(r.grace_ms),
            )
            .await;
        });
    }
    futures_join(stops).await;
    // A daemon killed between spawning a replica and recording it leaves a process
    // no record names: find those by the stack id in their environment.
    let mut groups: BTreeSet<i32> = BTreeSet::new();
    for pid in process::pids_with_env("CAPSTAN_STACK", &shared.stack_id) {
        if let Some(st) = process::proc_stat(pid) {
            groups.insert(st.pgrp);
        }
    }
    let mut stops = Vec::new();
    for pgid in groups {
        shared.events.emit(
            "capstan",
            None,
            "stopping",
            format!(
                "found process group {pgid} of this stack left by a previous daemon; stopping it"
            ),
        );
        stops.push(process::stop_foreign(
            pgid,
            None,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(10),
        ));
    }
    futures_join(stops).await;
    shared.state.lock().unwrap().clear();
}

async fn futures_join<F: std::future::Future<Output = ()> + Send + 'static>(fs: Vec<F>) {
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

/// Services in start order: each after everything it depends on.
pub fn start_order(stack: &Stack) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut left: Vec<&String> = stack.services.keys().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|name| {
            let ready = stack.services[*name]
                .depends_on
                .keys()
                .all(|d| out.contains(d) || !stack.services.contains_key(d));
            if ready {
                out.push((*name).clone());
            }
            !ready
        });
        if left.len() == before {
            out.extend(left.drain(..).cloned());
        }
    }
    out
}

impl Supervisor {
    pub fn new(shared: Arc<Shared>, stack: Stack) -> Supervisor {
        Supervisor {
            shared,
            stack: Stack {
                services: BTreeMap::new(),
                ..stack
            },
            services: BTreeMap::new(),
            revision_counter: 0,
        }
    }

    pub async fn run(mut self, initial: Stack, mut rx: mpsc::Receiver<Command>) {
        self.apply(initial).await;
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Apply(stack, reply) => {
                    let msg = self.apply(*stack).await;
                    let _ = reply.send(Ok(msg));
                }
                Command::Scale(counts, reply) => {
                    let _ = reply.send(self.scale(counts).await);
                }
                Command::Restart(names, reply) => {
                    let r = self
                        .for_services(&names, |sv, n| Box::pin(sv.restart_service(n)))
                        .await;
                    let _ = reply.send(r);
                }
                Command::Stop(names, reply) => {
                    let r = self
                        .for_services(&names, |sv, n| Box::pin(sv.stop_service(n)))
                        .await;
                    let _ = reply.send(r);
                }
                Command::Start(names, reply) => {
                    let r = self
                        .for_services(&names, |sv, n| Box::pin(sv.start_service(n)))
                        .await;
                    let _ = reply.send(r);
                }
                Command::Down(reply) => {
                    self.down().await;
                    let _ = reply.send(Ok("stopped every service".into()));
                    return;
                }
            }
        }
        self.down().await;
    }

    async fn for_services<F>(&mut self, names: &[String], mut f: F) -> Result<String, String>
    where
        F: for<'a> FnMut(
            &'a mut Supervisor,
            String,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>,
    {
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| !self.services.contains_key(*n))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "no such service: {}",
                unknown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for n in names {
            f(self, n.clone()).await;
        }
        Ok(format!("done: {}", names.join(", ")))
    }

    fn publish_services(&self) {
        let mut map = self.shared.services.lock().unwrap();
        map.clear();
        for (name, rt) in &self.services {
            map.insert(
                name.clone(),
                ServiceStatus {
                    name: name.clone(),
                    desired: rt.desired,
                    stopped: rt.stopped,
                    has_healthcheck: rt.spec.healthcheck.is_some(),
                },
            );
        }
        drop(map);
        self.shared.changed.send_modify(|g| *g += 1);
    }

    fn next_revision(&mut self) -> String {
        self.revision_counter += 1;
        self.revision_counter.to_string()
    }

    /// Makes the running services match `stack`: new ones start, removed ones stop,
    /// changed ones restart, replica counts are met.
    async fn apply(&mut self, stack: Stack) -> String {
        *self.shared.port_range.lock().unwrap() = stack.settings.port_range;
        *self.shared.scrape.lock().unwrap() = (
            stack.settings.scrape_interval.0,
            stack
                .services
                .iter()
                .map(|(n, s)| (n.clone(), s.x.metrics.clone()))
                .collect(),
            stack.settings.scrape_configs.clone(),
        );
        *self.shared.autoscale_specs.lock().unwrap() = stack
            .services
            .iter()
            .filter_map(|(n, s)| {
                let a = s.x.autoscale.clone()?;
                Some((n.clone(), (a, s.deploy.resources.limits.clone())))
            })
            .collect();
        for problem in crate::proxy::configure(&self.shared, &stack) {
            self.shared.warn_once(problem);
        }
        let mut changes = Vec::new();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|k| !stack.services.contains_key(*k))
            .cloned()
            .collect();
        for name in removed {
            self.scale_to(&name, 0).await;
            self.services.remove(&name);
            changes.push(format!("removed {name}"));
            self.shared
                .events
                .emit(&name, None, "removed", "service removed from the stack");
        }
        for name in start_order(&stack) {
            let spec = &stack.services[&name];
            match self.services.get(&name) {
                Some(rt) if rt.spec.definition_eq(spec) => {
                    let want = match &spec.x.autoscale {
                        // The autoscaler owns the count; only its bounds apply.
                        Some(a) => rt.desired.clamp(a.min, a.max),
                        None => spec.deploy.replicas,
                    };
                    if *rt.spec != *spec {
                        // Ports, proxy, autoscaling: applied without a restart.
                        changes.push(format!("updated {name}'s settings"));
                    }
                    let was_stopped = rt.stopped;
                    if let Some(rt) = self.services.get_mut(&name) {
                        rt.spec = Arc::new(spec.clone());
                        rt.stopped = false;
                    }
                    if self.services.get(&name).map_or(0, |rt| rt.desired) != want {
                        changes.push(format!("scaled {name} to {want}"));
                        self.scale(BTreeMap::from([(name.clone(), want)]))
                            .await
                            .ok();
                    }
                    // Converge to the file, as compose does: replicas that
                    // finished (failed, or exited under their restart policy)
                    // and services stopped by hand run again.
                    let revived = self.revive(&name).await;
                    if was_stopped {
                        changes.push(format!("started {name}"));
                    } else if !revived.is_empty() {
                        changes.push(format!(
                            "started {name} again (replica {} had finished)",
                            revived
                                .iter()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    self.reconcile(&name);
                }
                Some(_) => {
                    changes.push(format!("restarted {name} (definition changed)"));
                    self.scale_to(&name, 0).await;
                    let revision = self.next_revision();
                    let rt = self.services.get_mut(&name).expect("present");
                    rt.spec = Arc::new(spec.clone());
                    rt.revision = revision;
                    rt.desired = spec.deploy.replicas;
                    rt.stopped = false;
                    self.shared.events.emit(
                        &name,
                        None,
                        "updated",
                        "definition changed; replicas restarted",
                    );
                    self.reconcile(&name);
                }
                None => {
                    if !self.stack.services.is_empty() {
                        changes.push(format!("added {name}"));
                    }
                    let revision = self.next_revision();
                    self.services.insert(
                        name.clone(),
                        ServiceRt {
                            spec: Arc::new(spec.clone()),
                            revision,
                            desired: spec.deploy.replicas,
                            stopped: false,
                            replicas: BTreeMap::new(),
                        },
                    );
                    self.reconcile(&name);
                }
            }
        }
        if self.stack.settings != stack.settings && !self.stack.services.is_empty() {
            changes.push("updated the stack's settings".into());
        }
        self.stack = stack;
        self.publish_services();
        if changes.is_empty() {
            "no changes".into()
        } else {
            changes.join("; ")
        }
    }

    /// Starts missing replicas of a service (up to `desired`, unless stopped).
    fn reconcile(&mut self, name: &str) {
        let Some(rt) = self.services.get_mut(name) else {
            return;
        };
        if rt.stopped {
            return;
        }
        for idx in 0..rt.desired {
            if rt.replicas.contains_key(&idx) {
                continue;
            }
            let (tx, rx) = mpsc::channel(1);
            let r = replica::Replica {
                shared: self.shared.clone(),
                service: name.to_owned(),
                idx,
                spec: rt.spec.clone(),
                revision: rt.revision.clone(),
            };
            self.shared.update(name, idx, |s| {
                *s = Status {
                    service: name.to_owned(),
                    replica: idx,
                    state: "waiting".into(),
                    health: "none".into(),
                    revision: rt.revision.clone(),
                    ..Status::default()
                }
            });
            let task = tokio::spawn(r.run(rx));
            rt.replicas.insert(idx, ReplicaHandle { ctl: tx, task });
        }
    }

    /// Stops replicas with index >= n, all at once, and waits for them.
    async fn scale_to(&mut self, name: &str, n: u32) {
        let Some(rt) = self.services.get_mut(name) else {
            return;
        };
        let doomed: Vec<u32> = rt.replicas.keys().copied().filter(|i| *i >= n).collect();
        // Requests in flight finish first; new ones go to the replicas that stay.
        crate::proxy::drain(&self.shared, name, &doomed, rt.spec.stop_grace_period.0).await;
        let mut tasks = Vec::new();
        for idx in &doomed {
            if let Some(h) = rt.replicas.remove(idx) {
                let _ = h.ctl.send(replica::Ctl::Stop).await;
                tasks.push(h.task);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        for idx in doomed {
            self.shared.forget(name, idx);
        }
    }

    async fn scale(&mut self, counts: BTreeMap<String, u32>) -> Result<String, String> {
        for name in counts.keys() {
            if !self.services.contains_key(name) {
                return Err(format!("no such service: {name}"));
            }
        }
        let mut done = Vec::new();
        for (name, n) in counts {
            let before = self.services[&name].desired;
            self.scale_to(&name, n).await;
            if let Some(rt) = self.services.get_mut(&name) {
                rt.desired = n;
            }
            self.reconcile(&name);
            self.shared
                .events
                .emit(&name, None, "scaled", format!("replicas {before} -> {n}"));
            done.push(format!("{name}={n}"));
        }
        self.publish_services();
        Ok(format!("scaled {}", done.join(" ")))
    }

    async fn stop_service(&mut self, name: String) {
        self.scale_to(&name, 0).await;
        if let Some(rt) = self.services.get_mut(&name) {
            rt.stopped = true;
        }
        self.shared
            .events
            .emit(&name, None, "stopped", "service stopped");
        self.publish_services();
    }

    async fn start_service(&mut self, name: String) {
        if let Some(rt) = self.services.get_mut(&name) {
            rt.stopped = false;
        }
        self.revive(&name).await;
        self.reconcile(&name);
        self.publish_services();
    }

    /// Ends the tasks of `name`'s replicas that finished (exited or failed and
    /// not restarted by their policy), so that `reconcile` starts them afresh.
    /// Returns their indices.
    async fn revive(&mut self, name: &str) -> Vec<u32> {
        let finished: Vec<u32> = self
            .shared
            .statuses()
            .into_iter()
            .filter(|s| s.service == name && matches!(s.state.as_str(), "exited" | "failed"))
            .map(|s| s.replica)
            .collect();
        let Some(rt) = self.services.get_mut(name) else {
            return Vec::new();
        };
        let mut revived = Vec::new();
        for idx in finished {
            if let Some(h) = rt.replicas.remove(&idx) {
                let _ = h.ctl.send(replica::Ctl::Stop).await;
                let _ = h.task.await;
                revived.push(idx);
            }
        }
        revived
    }

    async fn restart_service(&mut self, name: String) {
        self.scale_to(&name, 0).await;
        let revision = self.next_revision();
        if let Some(rt) = self.services.get_mut(&name) {
            rt.stopped = false;
            rt.revision = revision;
        }
        self.shared
            .events
            .emit(&name, None, "restarted", "service restarted");
        self.reconcile(&name);
        self.publish_services();
    }

    /// Stops everything, dependents before what they depend on.
    async fn down(&mut self) {
        self.shared.proxy.close_listeners();
        let mut order = start_order(&self.stack);
        order.reverse();
        // Group into levels so independent services stop together.
        while !order.is_empty() {
            let level: Vec<String> = order
                .iter()
                .filter(|n| {
                    !order.iter().any(|o| {
                        self.stack
                            .services
                            .get(o)
                            .is_some_and(|s| s.depends_on.contains_key(*n))
                    })
                })
                .cloned()
                .collect();
            let level = if level.is_empty() {
                order.clone()
            } else {
                level
            };
            let mut stops = Vec::new();
            for name in &level {
                if let Some(rt) = self.services.get(name) {
                    let all: Vec<u32> = rt.replicas.keys().copied().collect();
                    crate::proxy::drain(&self.shared, name, &all, rt.spec.stop_grace_period.0)
                        .await;
                }
                if let Some(rt) = self.services.get_mut(name) {
                    for (_, h) in std::mem::take(&mut rt.replicas) {
                        let _ = h.ctl.send(replica::Ctl::Stop).await;
                        stops.push(h.task);
                    }
                }
            }
            for t in stops {
                let _ = t.await;
            }
            order.retain(|n| !level.contains(n));
        }
        self.shared.state.lock().unwrap().clear();
    }
}
