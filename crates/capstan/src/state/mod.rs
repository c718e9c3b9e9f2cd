//! What every runtime component shares about the replicas: their identity, their
//! typed phase and health, one definition of "ready", and the [`StatusBoard`]
//! the supervisor publishes them on.
//!
//! This is the leaf of the runtime: it imports only `spec`. The supervisor
//! writes the board; the proxy, the scraper, the autoscaler and the API read it.
//! Topology changes (a replica appears, starts, becomes healthy, stops) and
//! resource samples (CPU and memory, twice a second) have separate watches, so
//! a sample does not make the proxy rebuild its ready sets or the scraper its
//! targets.

pub mod clock;
pub mod control;
pub mod history;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A service's revision: a new one each time its definition changes (or it is
/// restarted). Replicas of two revisions run side by side during a replacement.
pub type Revision = u64;

/// One replica: its service, its revision and its index within the revision.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId {
    pub service: String,
    pub revision: Revision,
    pub index: u32,
}

impl ReplicaId {
    pub fn new(service: &str, revision: Revision, index: u32) -> ReplicaId {
        ReplicaId {
            service: service.to_owned(),
            revision,
            index,
        }
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{} (revision {})",
            self.service, self.index, self.revision
        )
    }
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for its dependencies.
    #[default]
    Waiting,
    /// Being started by its driver.
    Starting,
    Running,
    /// Waiting out a backoff before it runs again.
    Restarting,
    /// Restarting after failing several times in a row.
    CrashLooping,
    /// Told to stop; its stop signal was sent.
    Stopping,
    Stopped,
    /// Finished successfully and not restarted by its policy.
    Exited,
    /// Finished unsuccessfully and not restarted (or gave up restarting).
    Failed,
}

impl Phase {
    /// Finished by itself and not coming back without `start`/`up`.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Exited | Phase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Restarting => "restarting",
            Phase::CrashLooping => "crash-looping",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Exited => "exited",
            Phase::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a replica's health check last said (`None`: it has no health check,
/// or nothing runs to check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::None => "none",
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `capstan ps` shows of one replica.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub service: String,
    pub replica: u32,
    pub pid: Option<i32>,
    /// Where the replica listens. The API shows its port, as it always has.
    #[serde(rename = "port", with = "addr_as_port")]
    pub addr: Option<SocketAddr>,
    pub state: Phase,
    pub health: Health,
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
    #[serde(with = "revision_as_string")]
    pub revision: Revision,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Without a health check: the replica accepts connections on its address.
    #[serde(skip)]
    pub accepting: bool,
}

impl Status {
    pub fn new(id: &ReplicaId) -> Status {
        Status {
            service: id.service.clone(),
            replica: id.index,
            revision: id.revision,
            ..Status::default()
        }
    }

    pub fn id(&self) -> ReplicaId {
        ReplicaId::new(&self.service, self.revision, self.replica)
    }

    /// Whether something runs for this replica.
    pub fn is_running(&self) -> bool {
        self.state == Phase::Running && self.pid.is_some()
    }

    /// Ready for traffic: running, with an address, and either healthy or
    /// (without a health check) accepting connections.
    pub fn is_ready(&self) -> bool {
        self.is_running()
            && self.addr.is_some()
            && match self.health {
                Health::Healthy => true,
                Health::None => self.accepting,
                Health::Starting | Health::Unhealthy => false,
            }
    }

    /// The same status without its resource samples: what topology followers
    /// care about.
    fn topology(&self) -> Status {
        Status {
            cpu_percent: None,
            cpu_seconds_total: None,
            cpu_sampled_ms: None,
            memory_bytes: None,
            memory_rss_bytes: None,
            ..self.clone()
        }
    }
}

/// How often a replica's CPU and memory are read (by the supervisor): often
/// enough that the autoscaler sees a load step within a second.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// One resource reading of a replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub cpu_percent: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub working_set: Option<u64>,
    pub rss: Option<u64>,
    /// When it was read (unix ms).
    pub at_ms: i64,
}

/// Per-service summary for `capstan ps`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub desired: u32,
    pub stopped: bool,
    pub has_healthcheck: bool,
    /// The revision it runs (or rolls out).
    #[serde(default)]
    pub revision: Revision,
    /// A rollout under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// A rollout under way, as `capstan rollout status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutStatus {
    /// The revision being replaced.
    pub from: Revision,
    /// Going back (after a failure, or `capstan rollback`).
    pub back: bool,
    /// New replicas allowed so far (batch by batch).
    pub allowed: u32,
    /// How it rolls: `1 at a time, start-first`.
    pub plan: String,
    /// When it began (unix ms).
    pub since_ms: i64,
    /// A canary's progress and verdicts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    /// A rolling update's latest batch verdicts (with an analysis).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckReport>,
}

/// A canary as `capstan rollout status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CanaryStatus {
    /// The step under way (1-based); past the last one while promoting and baking.
    pub step: u32,
    pub steps: u32,
    /// The canary's share of requests (percent).
    pub weight: u32,
    /// What it does now, in words.
    pub phase: String,
    /// What a verdict still lacks (too few requests, no metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Waits for `capstan promote`.
    pub paused: bool,
    /// The replicas of the stable revision that are the baseline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<u32>,
    pub checks: Vec<CheckReport>,
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Inconclusive => "inconclusive",
        }
    }
}

/// One check's latest verdict, with what it was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub name: String,
    pub outcome: Outcome,
    /// The measured value (a rate, seconds, the query's result, or Λ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// What the value is held against: `>= 99.00%`, `Λ < 100 (α 0.01)`.
    pub threshold: String,
    /// What was looked at: `last 10s`, `since the canary started`.
    pub window: String,
    pub canary_requests: u64,
    pub baseline_requests: u64,
    /// The rest in words: consecutive failures, event counts, the bound.
    pub detail: String,
}

/// The replicas' and services' status, as the supervisor last published it.
pub struct StatusBoard {
    replicas: Mutex<BTreeMap<ReplicaId, Status>>,
    services: Mutex<BTreeMap<String, ServiceStatus>>,
    topology: watch::Sender<u64>,
    samples: watch::Sender<u64>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        StatusBoard {
            replicas: Mutex::default(),
            services: Mutex::default(),
            topology: watch::channel(0).0,
            samples: watch::channel(0).0,
        }
    }
}

impl StatusBoard {
    /// Changes a replica's status (creating it if new); topology followers
    /// are woken when anything but its resource samples changed.
    pub fn update(&self, id: &ReplicaId, f: impl FnOnce(&mut Status)) {
        let changed = {
            let mut map = self.replicas.lock().unwrap();
            match map.get_mut(id) {
                Some(s) => {
                    let before = s.topology();
                    f(s);
                    s.topology() != before
                }
                None => {
                    let mut s = Status::new(id);
                    f(&mut s);
                    map.insert(id.clone(), s);
                    true
                }
            }
        };
        if changed {
            self.topology.send_modify(|g| *g += 1);
        }
    }

    /// Records a resource sample; wakes only sample followers.
    pub fn sample(&self, id: &ReplicaId, x: Sample) {
        if let Some(s) = self.replicas.lock().unwrap().get_mut(id) {
            s.cpu_percent = x.cpu_percent;
            s.cpu_seconds_total = x.cpu_seconds;
            s.cpu_sampled_ms = Some(x.at_ms);
            s.memory_bytes = x.working_set;
            s.memory_rss_bytes = x.rss;
        }
        self.samples.send_modify(|g| *g += 1);
    }

    pub fn remove(&self, id: &ReplicaId) {
        if self.replicas.lock().unwrap().remove(id).is_some() {
            self.topology.send_modify(|g| *g += 1);
        }
    }

    pub fn get(&self, id: &ReplicaId) -> Option<Status> {
        self.replicas.lock().unwrap().get(id).cloned()
    }

    /// Every replica, ordered by service, revision and index.
    pub fn replicas(&self) -> Vec<Status> {
        self.replicas.lock().unwrap().values().cloned().collect()
    }

    /// The replicas of one service.
    pub fn replicas_of(&self, service: &str) -> Vec<Status> {
        self.replicas
            .lock()
            .unwrap()
            .values()
            .filter(|s| s.service == service)
            .cloned()
            .collect()
    }

    pub fn set_services(&self, services: Vec<ServiceStatus>) {
        let next: BTreeMap<String, ServiceStatus> =
            services.into_iter().map(|s| (s.name.clone(), s)).collect();
        let changed = {
            let mut map = self.services.lock().unwrap();
            let changed = *map != next;
            *map = next;
            changed
        };
        if changed {
            self.topology.send_modify(|g| *g += 1);
        }
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        self.services.lock().unwrap().values().cloned().collect()
    }

    pub fn service(&self, name: &str) -> Option<ServiceStatus> {
        self.services.lock().unwrap().get(name).cloned()
    }

    /// Woken when replicas or services change (not on resource samples).
    pub fn watch_topology(&self) -> watch::Receiver<u64> {
        self.topology.subscribe()
    }

    /// Woken on every resource sample.
    pub fn watch_samples(&self) -> watch::Receiver<u64> {
        self.samples.subscribe()
    }

    /// Wakes topology followers without a change (something they derive
    /// from the board, such as a probe's result, changed).
    pub fn poke(&self) {
        self.topology.send_modify(|g| *g += 1);
    }
}

mod addr_as_port {
    use std::net::{Ipv4Addr, SocketAddr};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_some(&a.port()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        Ok(Option::<u16>::deserialize(d)?.map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))))
    }
}

mod revision_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(r: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(r)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        Ok(text.parse().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API's JSON of a replica, as it was before the runtime core had
    /// types: names and value types must not change.
    #[test]
    fn status_json_is_unchanged() {
        let id = ReplicaId::new("web", 3, 1);
        let mut s = Status::new(&id);
        s.pid = Some(42);
        s.addr = Some(SocketAddr::from(([127, 0, 0, 1], 20001)));
        s.state = Phase::CrashLooping;
        s.health = Health::Unhealthy;
        s.restarts = 2;
        s.started_ms = Some(1000);
        s.last_exit = Some("exited with code 1".into());
        s.exit_code = Some(1);
        s.cpu_percent = Some(12.5);
        s.cpu_seconds_total = Some(1.5);
        s.cpu_sampled_ms = Some(2000);
        s.memory_bytes = Some(1 << 20);
        s.memory_rss_bytes = Some(2 << 20);
        s.memory_limit_bytes = Some(64 << 20);
        s.cpu_limit = Some(0.5);
        s.message = "waiting for db (healthy)".into();
        let json = serde_json::to_value(&s).unwrap();
        let expected = serde_json::json!({
            "service": "web", "replica": 1, "pid": 42, "port": 20001,
            "state": "crash-looping", "health": "unhealthy", "restarts": 2,
            "started_ms": 1000, "last_exit": "exited with code 1", "exit_code": 1,
            "cpu_percent": 12.5, "cpu_seconds_total": 1.5, "cpu_sampled_ms": 2000,
            "memory_bytes": 1048576, "memory_rss_bytes": 2097152,
            "memory_limit_bytes": 67108864, "cpu_limit": 0.5, "revision": "3",
            "message": "waiting for db (healthy)"
        });
        assert_eq!(json, expected);
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        // A fresh one: optional fields as null, the skipped ones absent.
        let json = serde_json::to_value(Status::new(&id)).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "cpu_percent",
                "cpu_seconds_total",
                "exit_code",
                "health",
                "last_exit",
                "memory_bytes",
                "memory_limit_bytes",
                "memory_rss_bytes",
                "pid",
                "port",
                "replica",
                "restarts",
                "revision",
                "service",
                "started_ms",
                "state"
            ]
        );
        assert_eq!(json["state"], "waiting");
        assert_eq!(json["health"], "none");
    }

    /// A service's entry in `/capstan/v1/ps`, as before.
    #[test]
    fn service_json_is_unchanged() {
        let s = ServiceStatus {
            name: "web".into(),
            desired: 3,
            stopped: false,
            has_healthcheck: true,
            revision: 2,
            rollout: None,
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"name": "web", "desired": 3, "stopped": false, "has_healthcheck": true, "revision": 2})
        );
    }

    #[test]
    fn every_phase_keeps_its_name() {
        for (p, name) in [
            (Phase::Waiting, "waiting"),
            (Phase::Starting, "starting"),
            (Phase::Running, "running"),
            (Phase::Restarting, "restarting"),
            (Phase::CrashLooping, "crash-looping"),
            (Phase::Stopping, "stopping"),
            (Phase::Stopped, "stopped"),
            (Phase::Exited, "exited"),
            (Phase::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), name);
            assert_eq!(p.as_str(), name);
        }
    }

    #[test]
    fn samples_do_not_wake_topology_followers() {
        let board = StatusBoard::default();
        let id = ReplicaId::new("web", 1, 0);
        let mut topo = board.watch_topology();
        let samples = board.watch_samples();
        board.update(&id, |s| s.state = Phase::Running);
        assert!(topo.has_changed().unwrap());
        topo.mark_unchanged();
        board.sample(
            &id,
            Sample {
                cpu_percent: Some(5.0),
                ..Sample::default()
            },
        );
        assert!(!topo.has_changed().unwrap());
        assert!(samples.has_changed().unwrap());
        assert_eq!(board.get(&id).unwrap().cpu_percent, Some(5.0));
        // Setting what is already there wakes nobody either.
        board.update(&id, |s| s.state = Phase::Running);
        assert!(!topo.has_changed().unwrap());
        board.update(&id, |s| s.health = Health::Healthy);
        assert!(topo.has_changed().unwrap());
    }

    #[test]
    fn ready_means_running_with_an_address_and_healthy_or_accepting() {
        let mut s = Status::new(&ReplicaId::new("web", 1, 0));
        s.state = Phase::Running;
        s.pid = Some(1);
        assert!(!s.is_ready(), "no address yet");
        s.addr = Some(SocketAddr::from(([127, 0, 0, 1], 1)));
        assert!(!s.is_ready(), "not accepting yet");
        s.accepting = true;
        assert!(s.is_ready());
        s.health = Health::Starting;
        assert!(!s.is_ready(), "a health check that has not passed");
        s.health = Health::Healthy;
        assert!(s.is_ready());
        s.state = Phase::Stopping;
        assert!(!s.is_ready());
    }
}
