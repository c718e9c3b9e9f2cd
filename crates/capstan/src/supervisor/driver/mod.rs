//! The seam between the supervisor and what runs a replica. A [`Driver`] starts
//! a replica from a [`Launch`] and gives back a [`Replica`] handle: its address,
//! its exit, a graceful stop, its resource use, and a durable [`Record`] from
//! which the next daemon finds it after a crash. The process driver
//! ([`process::ProcessDriver`]) is the first; containers come next.

pub mod cgroup;
pub mod container;
pub mod dockerignore;
pub mod process;
pub mod registry;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::logs::Stream;
use crate::spec::{DriverKind, HealthTest, Limits, Service};
use crate::state::{ReplicaId, Sample};

pub use super::records::Record;

pub use crate::state::control::BoxFuture;

/// What to run for one replica.
#[derive(Debug, Clone)]
pub struct Launch {
    pub id: ReplicaId,
    /// The service's definition (a container driver reads its image and more).
    pub service: Arc<Service>,
    pub argv: Vec<String>,
    /// The replica's environment from the stack (not the daemon's own); the
    /// driver adds `PORT`.
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub limits: Limits,
    pub stop_signal: String,
    pub grace: Duration,
    /// Host ports a driver that needs one takes it from (inclusive).
    pub port_range: [u16; 2],
    /// Services of the stack that run as processes and publish ports: a
    /// container reaches them by name through capstan's proxy on the host.
    pub host_services: Arc<Vec<String>>,
}

/// How a replica ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A readable stream of a replica's output.
pub type Output = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// Runs one health check against a replica.
pub type Prober =
    Arc<dyn Fn(HealthTest, Duration) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Starts replicas and cleans up after a daemon that died.
pub trait Driver: Send + Sync + 'static {
    /// Starts a replica. An error says why it could not start.
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<Box<dyn Replica>, String>>;

    /// Takes over what a previous daemon left running: replicas of `wanted`
    /// services (name → [`Service::definition_hash`]) whose definition is
    /// unchanged come back as handles to adopt; everything else it finds, from
    /// its records and otherwise, is stopped.
    fn recover(
        &self,
        records: Vec<Record>,
        wanted: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Vec<Adopted>>;

    /// Every replica has stopped (`down`): removes what the driver made for
    /// the stack as a whole (a container network; with `volumes`, named
    /// volumes).
    fn down(&self, _volumes: bool) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A replica a previous daemon started, still running, to be supervised again.
pub struct Adopted {
    pub id: ReplicaId,
    pub replica: Box<dyn Replica>,
}

/// A started replica.
pub trait Replica: Send {
    /// The main process's pid, where there is one.
    fn pid(&self) -> Option<i32>;

    /// Where the replica listens.
    fn addr(&self) -> SocketAddr;

    /// What the next daemon needs to find and stop it.
    fn record(&self) -> Record;

    /// The memory (bytes) and CPU (CPUs) limits actually enforced.
    fn enforced_limits(&self) -> (Option<u64>, Option<f64>);

    /// Its stdout and stderr, once.
    fn take_output(&mut self) -> Vec<(Stream, Output)>;

    /// For an adopted replica: output up to this time (unix ns) is stored
    /// already; `take_output` gives only what came after.
    fn output_after(&mut self, _ns: i64) {}

    /// Waits for it to exit. Cancel-safe.
    fn wait(&mut self) -> BoxFuture<'_, Exit>;

    /// Sends `signal`, waits up to `grace`, then kills it. Returns how it
    /// ended and whether it had to be killed.
    fn stop(&mut self, signal: &str, grace: Duration) -> BoxFuture<'_, (Exit, bool)>;

    /// CPU and memory now.
    fn sample(&mut self) -> Sample;

    /// Runs health checks against this replica.
    fn prober(&self) -> Prober;

    /// The health check the replica brings itself (an image's HEALTHCHECK),
    /// for a service that sets none.
    fn healthcheck(&self) -> Option<crate::spec::Healthcheck> {
        None
    }

    /// Removes what is left after it exited (children, cgroups).
    fn cleanup(&mut self) -> BoxFuture<'_, ()>;
}

/// CPU use as a percentage of one CPU between two readings of a replica's
/// CPU time (nanoseconds) taken at `since` and `now`.
pub fn cpu_percent(
    since: (tokio::time::Instant, u64),
    now: tokio::time::Instant,
    cpu_ns: u64,
) -> Option<f64> {
    let wall = now.duration_since(since.0).as_nanos() as f64;
    (wall > 0.0).then(|| cpu_ns.saturating_sub(since.1) as f64 / wall * 100.0)
}

/// Runs each replica with the driver its service asks for
/// ([`Service::driver`]): processes or containers.
pub struct Drivers {
    pub process: Arc<dyn Driver>,
    pub container: Arc<dyn Driver>,
}

impl Driver for Drivers {
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<Box<dyn Replica>, String>> {
        match launch.service.driver() {
            DriverKind::Process => self.process.start(launch),
            DriverKind::Container => self.container.start(launch),
        }
    }

    fn recover(
        &self,
        records: Vec<Record>,
        wanted: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Vec<Adopted>> {
        let (containers, processes): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(|r| r.container.is_some());
        Box::pin(async move {
            let (mut a, b) = tokio::join!(
                self.process.recover(processes, wanted.clone()),
                self.container.recover(containers, wanted)
            );
            a.extend(b);
            a
        })
    }

    fn down(&self, volumes: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.process.down(volumes).await;
            self.container.down(volumes).await;
        })
    }
}
