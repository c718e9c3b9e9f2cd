//! How components command the supervisor and hook into replicas' lives,
//! defined here (below them all) so that none of them imports another: the
//! supervisor serves [`Command`]s and calls [`Hook`]s; the proxy implements a
//! hook; the autoscaler and the API hold a [`SupervisorHandle`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::ReplicaId;
use crate::spec::Stack;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something other components want done at points of the replicas' lives.
pub trait Hook: Send + Sync + 'static {
    /// Before replicas stop: they should get no new work, and what they are
    /// doing may finish within `grace`.
    fn before_stop(&self, _ids: Vec<ReplicaId>, _grace: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    /// After replicas stopped (before their ids can be used again).
    fn after_stop(&self, _ids: &[ReplicaId]) {}

    /// A stack was applied. Returns problems to warn about.
    fn on_apply(&self, _stack: &Stack) -> Vec<String> {
        Vec::new()
    }

    /// Everything is about to stop.
    fn on_down(&self) {}

    /// How a service's requests are shared during a canary (none: evenly).
    fn set_split(&self, _service: &str, _split: Option<Split>) {}
}

/// How the proxy shares a service's requests between the canary, its
/// baseline and the stable revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub canary: crate::state::Revision,
    /// Percent of requests for the canary.
    pub weight: u32,
    pub stable: crate::state::Revision,
    /// Replicas of the stable revision that are the baseline: they get the
    /// canary's share (as much as is left beside it).
    pub baseline: Vec<u32>,
    pub sticky: Option<crate::spec::Sticky>,
}

/// Which side of a split a replica is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Canary,
    Baseline,
    Stable,
}

impl Split {
    pub fn side(&self, revision: crate::state::Revision, replica: u32) -> Side {
        if revision == self.canary {
            Side::Canary
        } else if revision == self.stable && self.baseline.contains(&replica) {
            Side::Baseline
        } else {
            Side::Stable
        }
    }

    /// The side a request in `bucket` (0..10000) goes to: the canary's
    /// buckets first (so a sticky client stays on the canary as its weight
    /// grows), then the baseline's.
    pub fn route(&self, bucket: u32) -> Side {
        let w = self.weight.min(100) * 100;
        let b = if self.baseline.is_empty() {
            0
        } else {
            w.min(10_000 - w)
        };
        if bucket < w {
            Side::Canary
        } else if bucket < w + b {
            Side::Baseline
        } else {
            Side::Stable
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("no such service: {0}")]
    NoSuchService(String),
    #[error("{0}")]
    NotReady(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// A request that cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
}

pub type Reply = oneshot::Sender<Result<String, Error>>;

pub enum Command {
    Apply(Box<Stack>, Reply),
    Scale {
        counts: BTreeMap<String, u32>,
        wait: bool,
        reply: Reply,
    },
    Restart(Vec<String>, Reply),
    Stop(Vec<String>, Reply),
    Start(Vec<String>, Reply),
    /// The stack as the supervisor runs it now.
    Show(oneshot::Sender<Stack>),
    /// Back to an earlier revision (by default the one before the current).
    Rollback {
        service: String,
        to: Option<u64>,
        reply: Reply,
    },
    Wake(String),
    /// A canary past its current pause (`full`: past every step).
    Promote {
        service: String,
        full: bool,
        reply: Reply,
    },
    /// A canary ended and rolled back.
    Abort {
        service: String,
        reply: Reply,
    },
    /// Stop everything; with `volumes`, remove the stack's named volumes too.
    Down {
        volumes: bool,
        reply: Reply,
    },
}

/// How other components command the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Command>,
}

impl SupervisorHandle {
    async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<String, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Makes the running services match `stack`. Returns once replaced
    /// revisions are ready and their predecessors stopped.
    pub async fn apply(&self, stack: Stack) -> Result<String, Error> {
        self.ask(|r| Command::Apply(Box::new(stack), r)).await
    }

    /// Sets replica counts. The new counts are in effect (and visible) when
    /// this returns; with `wait`, the replicas scaled away have also stopped.
    pub async fn scale(&self, counts: BTreeMap<String, u32>, wait: bool) -> Result<String, Error> {
        self.ask(|reply| Command::Scale {
            counts,
            wait,
            reply,
        })
        .await
    }

    pub async fn promote(&self, service: String, full: bool) -> Result<String, Error> {
        self.ask(|reply| Command::Promote {
            service,
            full,
            reply,
        })
        .await
    }

    pub async fn abort(&self, service: String) -> Result<String, Error> {
        self.ask(|reply| Command::Abort { service, reply }).await
    }

    pub async fn restart(&self, names: Vec<String>) -> Result<String, Error> {
        self.ask(|r| Command::Restart(names, r)).await
    }

    pub async fn stop(&self, names: Vec<String>) -> Result<String, Error> {
        self.ask(|r| Command::Stop(names, r)).await
    }

    pub async fn start(&self, names: Vec<String>) -> Result<String, Error> {
        self.ask(|r| Command::Start(names, r)).await
    }

    /// A request found no replica of `service`: if it is scaled to zero,
    /// start one. Never waits.
    pub fn wake(&self, service: &str) {
        let _ = self.tx.try_send(Command::Wake(service.to_owned()));
    }

    /// The stack as it runs now (after rollbacks, the definitions they
    /// went back to).
    pub async fn stack(&self) -> Result<Stack, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Show(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// Rolls a service back to an earlier revision; returns once it runs
    /// every replica of it.
    pub async fn rollback(&self, service: &str, to: Option<u64>) -> Result<String, Error> {
        let service = service.to_owned();
        self.ask(|reply| Command::Rollback { service, to, reply })
            .await
    }

    /// Stops everything (and with `volumes`, removes the stack's named
    /// volumes); returns when it is stopped.
    pub async fn down(&self, volumes: bool) -> Result<String, Error> {
        self.ask(|reply| Command::Down { volumes, reply }).await
    }

    /// True once the supervisor has ended.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl SupervisorHandle {
    /// A handle and the receiving end its commands arrive on.
    pub fn channel() -> (SupervisorHandle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(64);
        (SupervisorHandle { tx }, rx)
    }
}

/// Evaluates a PromQL expression at a time (unix ms).
pub type QueryFn =
    std::sync::Arc<dyn Fn(&str, i64) -> Result<capstan_promql::QueryValue, String> + Send + Sync>;
