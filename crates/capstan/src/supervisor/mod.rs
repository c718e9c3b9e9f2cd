//! The supervisor: runs every service's replicas and keeps them as the stack says.
//!
//! One actor ([`Supervisor::run`]) owns the services and takes commands through
//! a [`SupervisorHandle`]; each replica is a task ([`replica::Replica`]) that
//! runs it through a [`driver::Driver`] and publishes its status on the
//! [`StatusBoard`]. The actor never waits inside its command loop: stopping a
//! replica (the [`Hook::before_stop`] drain, then the stop signal and the grace
//! period) and waiting for a new revision to be ready run as tasks that report
//! back, so a long drain of one service delays no command for another.
//!
//! Other components plug in through [`Hook`]s (the proxy drains replicas
//! before they stop and follows the stack's ports); the supervisor imports none
//! of them.

pub mod analysis;
pub mod canary;
pub mod driver;
pub mod health;
pub mod records;
pub mod replica;
pub mod rollout;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::events::EventLog;
use crate::logs::engine::LogEngine;
use crate::spec::{Condition, FailureAction, Service, Stack};
use crate::state::control::{Command, Reply};
pub use crate::state::control::{Error, Hook, SupervisorHandle};
use crate::state::history::{self, History, RevisionInfo, RevisionStatus};
use crate::state::{Phase, ReplicaId, Revision, ServiceStatus, StatusBoard};
use driver::Driver;
use records::StateFile;

/// How long a new revision may take to become ready before its replacement
/// is reported as failed (the old revision keeps serving).
pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(300);

/// What the supervisor's tasks share.
pub struct Context {
    pub board: Arc<StatusBoard>,
    pub events: Arc<EventLog>,
    pub logs: Arc<LogEngine>,
    pub driver: Arc<dyn Driver>,
    /// The durable record of what runs, for the next daemon after a crash.
    pub records: Mutex<StateFile>,
    /// Where replicas run unless their service names a `working_dir`.
    pub stack_dir: PathBuf,
    /// The daemon's API, where replicas' OpenTelemetry SDKs send.
    pub otlp: Option<SocketAddr>,
    /// Every service's revisions.
    pub history: Arc<History>,
    /// PromQL over the metrics store, for canary analysis.
    pub query: Option<crate::state::control::QueryFn>,
}

/// What the actor's own tasks report.
enum Internal {
    /// A replica stopped and left the board.
    Stopped(ReplicaId),
    /// A rollout ended: every replica replaced, or why a batch failed.
    Rolled {
        service: String,
        revision: Revision,
        result: Result<(), String>,
    },
    /// A rollout asks for a step.
    Step(String, Revision, rollout::Step),
}

/// Where canary and rollout analysis read metrics.
fn source(ctx: &Context) -> Arc<dyn analysis::Source + Send + Sync> {
    match &ctx.query {
        Some(q) => Arc::new(analysis::PromSource(q.clone())),
        None => Arc::new(analysis::NoSource),
    }
}

/// Whether every replica of `service` meets `cond` (a service scaled to zero does).
pub fn dependency_met(board: &StatusBoard, service: &str, cond: Condition) -> bool {
    let has_health = board.service(service).is_some_and(|s| s.has_healthcheck);
    board.replicas_of(service).iter().all(|s| match cond {
        Condition::ServiceStarted => s.pid.is_some() || s.state == Phase::Exited,
        Condition::ServiceHealthy if has_health => s.health == crate::state::Health::Healthy,
        Condition::ServiceHealthy => s.pid.is_some(),
        Condition::ServiceCompletedSuccessfully => {
            s.state == Phase::Exited && s.exit_code == Some(0)
        }
    })
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

struct ReplicaHandle {
    ctl: mpsc::Sender<replica::Ctl>,
    task: JoinHandle<()>,
    grace: Duration,
}

struct ServiceRt {
    spec: Arc<Service>,
    /// The revision new replicas get.
    revision: Revision,
    desired: u32,
    stopped: bool,
    /// Starts nothing until the replicas being stopped are gone (a restart).
    held: bool,
    /// Replicas not being stopped, of every revision.
    replicas: BTreeMap<ReplicaId, ReplicaHandle>,
    /// Replicas being drained and stopped.
    stopping: BTreeSet<ReplicaId>,
    /// The rollout replacing other revisions' replicas with this one's.
    rollout: Option<RolloutRt>,
}

/// A rollout in progress.
struct RolloutRt {
    /// The revision being replaced, and its definition (to go back to).
    from: Revision,
    from_spec: Arc<Service>,
    /// How many replicas of the new revision may run now.
    allowed: u32,
    /// Going back (after a failure, or `capstan rollback`).
    back: bool,
    /// How it rolls, for `capstan rollout status`.
    plan: String,
    since_ms: i64,
    task: JoinHandle<()>,
    /// A canary's controls and latest report.
    canary: Option<CanaryRt>,
    /// A rolling batch's latest verdicts.
    checks: Vec<crate::state::CheckReport>,
}

struct CanaryRt {
    control: mpsc::UnboundedSender<canary::Control>,
    status: crate::state::CanaryStatus,
}

impl ServiceRt {
    fn current(&self) -> impl Iterator<Item = &ReplicaId> {
        self.replicas
            .keys()
            .filter(|id| id.revision == self.revision)
    }
}

/// A command's reply that waits for replicas to stop and revisions to roll.
struct Pending {
    stops: BTreeSet<ReplicaId>,
    rollouts: BTreeSet<(String, Revision)>,
    /// Services to start again once their stops are done (a restart).
    resume: Vec<String>,
    /// Events that say it is done: service, kind, reason.
    events: Vec<(String, &'static str, String)>,
    message: String,
    failures: Vec<String>,
    reply: Option<Reply>,
}

impl Pending {
    fn new(message: String) -> Pending {
        Pending {
            stops: BTreeSet::new(),
            rollouts: BTreeSet::new(),
            resume: Vec::new(),
            events: Vec::new(),
            message,
            failures: Vec::new(),
            reply: None,
        }
    }

    fn done(&self) -> bool {
        self.stops.is_empty() && self.rollouts.is_empty()
    }
}

pub struct Supervisor {
    ctx: Arc<Context>,
    hooks: Vec<Arc<dyn Hook>>,
    stack: Stack,
    services: BTreeMap<String, ServiceRt>,
    port_range: [u16; 2],
    /// Process services that publish ports (containers reach them by name).
    host_services: Arc<Vec<String>>,
    pending: Vec<Pending>,
    /// Replicas a previous daemon left running, adopted at the first apply.
    adopted: BTreeMap<ReplicaId, Box<dyn driver::Replica>>,
    /// Replicas of services removed from the stack, still stopping.
    orphans: BTreeSet<ReplicaId>,
    rx: mpsc::Receiver<Command>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    steps_tx: mpsc::UnboundedSender<(String, Revision, rollout::Step)>,
    steps_rx: mpsc::UnboundedReceiver<(String, Revision, rollout::Step)>,
}

impl Supervisor {
    /// A supervisor and the handle that commands it; [`Supervisor::run`] starts it.
    pub fn new(ctx: Arc<Context>, hooks: Vec<Arc<dyn Hook>>) -> (Supervisor, SupervisorHandle) {
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (steps_tx, steps_rx) = mpsc::unbounded_channel();
        let (handle, rx) = SupervisorHandle::channel();
        let sup = Supervisor {
            ctx,
            hooks,
            stack: Stack::default(),
            services: BTreeMap::new(),
            port_range: [20000, 29999],
            host_services: Arc::default(),
            pending: Vec::new(),
            adopted: BTreeMap::new(),
            orphans: BTreeSet::new(),
            rx,
            internal_tx,
            internal_rx,
            steps_tx,
            steps_rx,
        };
        (sup, handle)
    }

    /// Stops what a previous daemon left, applies `initial`, then serves
    /// commands until `down` (or until every handle is gone).
    pub async fn run(mut self, mut initial: Stack) {
        self.undo_interrupted_canaries(&mut initial);
        let records = self.ctx.records.lock().unwrap().records();
        let wanted: BTreeMap<String, String> = initial
            .services
            .iter()
            .filter(|(_, s)| s.driver() == crate::spec::DriverKind::Container)
            .map(|(n, s)| (n.clone(), s.definition_hash()))
            .collect();
        let adopted = self.ctx.driver.recover(records, wanted).await;
        self.ctx.records.lock().unwrap().clear();
        for a in adopted {
            self.ctx.records.lock().unwrap().insert(a.replica.record());
            self.adopted.insert(a.id, a.replica);
        }
        let msg = self.apply(initial);
        // The first apply's waits (there are no replacements) need no reply.
        drop(msg);
        // Adopted replicas the stack no longer wants (scaled down meanwhile).
        for (id, mut r) in std::mem::take(&mut self.adopted) {
            let grace = self
                .services
                .get(&id.service)
                .map_or(Duration::from_secs(10), |rt| rt.spec.stop_grace_period.0);
            let signal = r.record().stop_signal;
            let ctx = self.ctx.clone();
            tokio::spawn(async move {
                r.stop(&signal, grace).await;
                r.cleanup().await;
                ctx.records.lock().unwrap().remove(&r.record());
            });
        }
        loop {
            tokio::select! {
                Some(i) = self.internal_rx.recv() => self.internal(i),
                Some((s, r, step)) = self.steps_rx.recv() => self.internal(Internal::Step(s, r, step)),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Down { volumes, reply }) => {
                        self.down(volumes).await;
                        let _ = reply.send(Ok("stopped every service".into()));
                        return;
                    }
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
            }
        }
        self.down(false).await;
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Apply(stack, reply) => {
                let p = self.apply(*stack);
                self.finish_or_wait(p, reply);
            }
            Command::Scale {
                counts,
                wait,
                reply,
            } => match self.scale(counts) {
                Ok(p) if wait => self.finish_or_wait(p, reply),
                Ok(p) => {
                    let _ = reply.send(Ok(p.message));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Restart(names, reply) => match self.known(&names) {
                Ok(()) => {
                    let p = self.restart(&names);
                    self.finish_or_wait(p, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Stop(names, reply) => match self.known(&names) {
                Ok(()) => {
                    let mut p = Pending::new(format!("done: {}", names.join(", ")));
                    for n in &names {
                        p.stops.extend(self.stop_service(n));
                        p.events
                            .push((n.clone(), "stopped", "service stopped".into()));
                    }
                    self.finish_or_wait(p, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Start(names, reply) => {
                let r = self.known(&names).map(|()| {
                    for n in &names {
                        self.start_service(n);
                    }
                    format!("done: {}", names.join(", "))
                });
                let _ = reply.send(r);
            }
            Command::Wake(name) => self.wake(&name),
            Command::Show(tx) => {
                let _ = tx.send(self.stack.clone());
            }
            Command::Rollback { service, to, reply } => match self.rollback(&service, to) {
                Ok(p) => self.finish_or_wait(p, reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Promote {
                service,
                full,
                reply,
            } => {
                let r = self.canary_of(&service).and_then(|c| {
                    c.control
                        .send(canary::Control::Promote { full })
                        .map_err(|_| Error::Invalid(format!("{service}'s canary has ended")))?;
                    Ok(format!(
                        "promoting {service}{}",
                        if full {
                            " past every remaining step"
                        } else {
                            ""
                        }
                    ))
                });
                let _ = reply.send(r);
            }
            Command::Abort { service, reply } => {
                let r = self.canary_of(&service).map(|_| ()).map(|()| {
                    let revision = self.services[&service].revision;
                    if let Some(ro) = self
                        .services
                        .get_mut(&service)
                        .and_then(|rt| rt.rollout.as_mut())
                    {
                        ro.task.abort();
                    }
                    self.rolled(
                        &service,
                        revision,
                        Err("aborted with `capstan abort`".into()),
                    );
                    format!("aborted {service}'s canary; rolling back")
                });
                let _ = reply.send(r);
            }
            Command::Down { .. } => unreachable!("handled by run"),
        }
    }

    /// The canary under way for `name`.
    fn canary_of(&self, name: &str) -> Result<&CanaryRt, Error> {
        self.known(&[name.to_owned()])?;
        self.services[name]
            .rollout
            .as_ref()
            .and_then(|r| r.canary.as_ref())
            .ok_or_else(|| Error::Invalid(format!("{name} has no canary under way")))
    }

    /// A canary the previous daemon left unjudged is not promoted by a
    /// restart: the service goes back to the revision that was active
    /// before it (its definition from the history), and the canary's
    /// revision is recorded as rolled back. Deploying again starts a new
    /// canary.
    fn undo_interrupted_canaries(&self, stack: &mut Stack) {
        for (name, spec) in stack.services.iter_mut() {
            if spec.x.rollout.is_none() {
                continue;
            }
            let known = self.ctx.history.of(name);
            let Some(last) = known.last() else { continue };
            if last.status != RevisionStatus::Rolling || last.hash != spec.definition_hash() {
                continue;
            }
            let Some(stable) = known
                .iter()
                .rev()
                .find(|r| r.revision < last.revision && r.status == RevisionStatus::Active)
            else {
                continue;
            };
            let why = format!(
                "the daemon stopped during its canary; back to revision {} (deploy again to retry)",
                stable.revision
            );
            self.ctx
                .history
                .set_status(name, last.revision, RevisionStatus::RolledBack, &why);
            self.ctx.events.emit(
                name,
                None,
                "rollback",
                format!("revision {}: {why}", last.revision),
            );
            let keep = spec.x.rollout.clone();
            *spec = stable.spec.clone();
            // How the next deploy rolls out is the file's.
            spec.x.rollout = keep;
        }
    }

    /// Replies now if `p` waits for nothing, else when it is done.
    fn finish_or_wait(&mut self, mut p: Pending, reply: Reply) {
        p.reply = Some(reply);
        if p.done() {
            self.complete(p);
        } else {
            self.pending.push(p);
        }
    }

    fn complete(&mut self, mut p: Pending) {
        for (service, kind, reason) in std::mem::take(&mut p.events) {
            self.ctx.events.emit(&service, None, kind, reason);
        }
        for name in std::mem::take(&mut p.resume) {
            if let Some(rt) = self.services.get_mut(&name) {
                rt.held = false;
            }
            self.reconcile(&name);
        }
        if let Some(reply) = p.reply.take() {
            let r = if p.failures.is_empty() {
                Ok(p.message)
            } else {
                Err(Error::NotReady(format!(
                    "{}; {}",
                    p.message,
                    p.failures.join("; ")
                )))
            };
            let _ = reply.send(r);
        }
        self.publish_services();
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Stopped(id) => {
                if let Some(rt) = self.services.get_mut(&id.service) {
                    rt.stopping.remove(&id);
                }
                self.orphans.remove(&id);
                for p in &mut self.pending {
                    p.stops.remove(&id);
                }
                // A replica stopped for a scale-down may leave room to start
                // one under its index again.
                self.reconcile(&id.service);
            }
            Internal::Step(service, revision, step) => self.step(&service, revision, step),
            Internal::Rolled {
                service,
                revision,
                result,
            } => self.rolled(&service, revision, result),
        }
        let (done, waiting): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(Pending::done);
        self.pending = waiting;
        for p in done {
            self.complete(p);
        }
    }

    fn known(&self, names: &[String]) -> Result<(), Error> {
        let unknown: Vec<&str> = names
            .iter()
            .filter(|n| !self.services.contains_key(*n))
            .map(|s| s.as_str())
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Error::NoSuchService(unknown.join(", ")))
        }
    }

    fn publish_services(&self) {
        self.ctx.board.set_services(
            self.services
                .iter()
                .map(|(name, rt)| ServiceStatus {
                    name: name.clone(),
                    desired: rt.desired,
                    stopped: rt.stopped,
                    has_healthcheck: rt.spec.healthcheck.is_some(),
                    revision: rt.revision,
                    rollout: rt.rollout.as_ref().map(|r| crate::state::RolloutStatus {
                        from: r.from,
                        back: r.back,
                        allowed: r.allowed,
                        plan: r.plan.clone(),
                        since_ms: r.since_ms,
                        canary: r.canary.as_ref().map(|c| c.status.clone()),
                        checks: r.checks.clone(),
                    }),
                })
                .collect(),
        );
    }

    /// A service's next revision number: one past every number it has
    /// used (in its history, on replicas running, stopping or adopted).
    fn next_revision(&self, name: &str) -> Revision {
        let history = self.ctx.history.of(name).iter().map(|r| r.revision).max();
        let live = self.services.get(name).map(|rt| {
            rt.replicas
                .keys()
                .chain(rt.stopping.iter())
                .map(|id| id.revision)
                .max()
                .unwrap_or(0)
                .max(rt.revision)
        });
        let adopted = self
            .adopted
            .keys()
            .filter(|id| id.service == name)
            .map(|id| id.revision)
            .max();
        [history, live, adopted]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0)
            + 1
    }

    /// Makes the running services match `stack`: new ones start, removed ones
    /// stop, changed ones are replaced start-first, replica counts are met.
    fn apply(&mut self, stack: Stack) -> Pending {
        self.port_range = stack.settings.port_range;
        self.host_services = Arc::new(
            stack
                .services
                .iter()
                .filter(|(_, s)| {
                    s.driver() == crate::spec::DriverKind::Process && !s.ports.is_empty()
                })
                .map(|(n, _)| n.clone())
                .collect(),
        );
        for hook in &self.hooks {
            for problem in hook.on_apply(&stack) {
                self.ctx.events.warn_once(problem);
            }
        }
        let mut changes = Vec::new();
        let mut stops = BTreeSet::new();
        let mut rollouts = BTreeSet::new();
        let removed: Vec<String> = self
            .services
            .keys()
            .filter(|k| !stack.services.contains_key(*k))
            .cloned()
            .collect();
        for name in removed {
            let all: Vec<ReplicaId> = self.services[&name].replicas.keys().cloned().collect();
            stops.extend(self.retire(&name, all));
            if let Some(rt) = self.services.remove(&name) {
                self.orphans.extend(rt.stopping);
            }
            changes.push(format!("removed {name}"));
            self.ctx
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
                    let had = rt.desired;
                    if let Some(rt) = self.services.get_mut(&name) {
                        rt.spec = Arc::new(spec.clone());
                        rt.stopped = false;
                        rt.desired = want;
                    }
                    if had != want {
                        changes.push(format!("scaled {name} to {want}"));
                        self.ctx.events.emit(
                            &name,
                            None,
                            "scaled",
                            format!("replicas {had} -> {want}"),
                        );
                    }
                    // Converge to the file, as compose does: replicas that
                    // finished (failed, or exited under their restart policy)
                    // and services stopped by hand run again.
                    let revived = self.revive(&name);
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
                    stops.extend(self.reconcile(&name));
                }
                Some(rt) => {
                    let from = rt.revision;
                    let from_spec = rt.spec.clone();
                    let had = rt.desired;
                    let revision = self.next_revision(&name);
                    // A canary needs replicas of the old revision to compare with.
                    let canary =
                        spec.x.rollout.as_ref().filter(|_| {
                            had > 0 && rt.replicas.keys().any(|id| id.revision == from)
                        });
                    let how = match canary {
                        Some(c) => canary::describe(c),
                        None => format!(
                            "rolling, {}",
                            rollout::describe(spec, &spec.deploy.update_config)
                        ),
                    };
                    let canary = canary.is_some();
                    changes.push(format!(
                        "updating {name} (revision {from} -> {revision}: {how})"
                    ));
                    let want = match &spec.x.autoscale {
                        Some(a) => had.clamp(a.min, a.max),
                        None => spec.deploy.replicas,
                    };
                    let rt = self.services.get_mut(&name).expect("present");
                    rt.spec = Arc::new(spec.clone());
                    rt.revision = revision;
                    rt.desired = want;
                    rt.stopped = false;
                    rt.held = false;
                    self.ctx.history.record(
                        &name,
                        RevisionInfo::new(
                            revision,
                            spec,
                            "deploy",
                            history::diff(&from_spec, spec),
                            RevisionStatus::Rolling,
                        ),
                    );
                    self.ctx.events.emit(
                        &name,
                        None,
                        "updated",
                        format!("definition changed; revision {from} -> {revision} ({how})"),
                    );
                    self.publish_services();
                    if canary {
                        // It goes on after the reply: `capstan rollout status` follows it.
                        self.begin_canary(&name, from, from_spec);
                        changes.push(format!("follow it with `capstan rollout status {name}`"));
                    } else {
                        self.begin_rollout(&name, from, from_spec, false);
                        rollouts.insert((name.clone(), revision));
                    }
                    // Finished replicas of the old revision have nothing to hand over.
                    self.revive(&name);
                    stops.extend(self.reconcile(&name));
                }
                None => {
                    if !self.stack.services.is_empty() {
                        changes.push(format!("added {name}"));
                    }
                    // The revision of the replicas adopted from a previous
                    // daemon, else the one the history knows with this
                    // definition, else a new one.
                    let hash = spec.definition_hash();
                    let known = self.ctx.history.of(&name);
                    let adopted = self
                        .adopted
                        .keys()
                        .filter(|id| id.service == name)
                        .map(|id| id.revision)
                        .max();
                    let same = known
                        .iter()
                        .rev()
                        .find(|r| r.hash == hash)
                        .map(|r| r.revision);
                    let adopted_same = same.filter(|r| {
                        self.adopted
                            .keys()
                            .any(|id| id.service == name && id.revision == *r)
                    });
                    let revision = match adopted_same.or(adopted).or(same) {
                        Some(r) => r,
                        None => self.next_revision(&name),
                    };
                    self.services.insert(
                        name.clone(),
                        ServiceRt {
                            spec: Arc::new(spec.clone()),
                            revision,
                            desired: spec.deploy.replicas,
                            stopped: false,
                            held: false,
                            replicas: BTreeMap::new(),
                            stopping: BTreeSet::new(),
                            rollout: None,
                        },
                    );
                    self.settle_history(&name, revision, spec, &known);
                    self.reconcile(&name);
                }
            }
        }
        if self.stack.settings != stack.settings && !self.stack.services.is_empty() {
            changes.push("updated the stack's settings".into());
        }
        self.stack = stack;
        self.publish_services();
        let message = if changes.is_empty() {
            "no changes".into()
        } else {
            changes.join("; ")
        };
        let mut p = Pending::new(message);
        p.stops = stops;
        p.rollouts = rollouts;
        p
    }

    /// Starts replicas of the current revision up to `desired` (unless the
    /// service is stopped or held) and retires those above it. Returns the
    /// replicas it retired.
    fn reconcile(&mut self, name: &str) -> BTreeSet<ReplicaId> {
        let Some(rt) = self.services.get_mut(name) else {
            return BTreeSet::new();
        };
        if rt.stopped || rt.held {
            return BTreeSet::new();
        }
        let current: Vec<ReplicaId> = rt.current().cloned().collect();
        let desired = match &rt.rollout {
            // A rollout starts the new revision's replicas batch by batch,
            // and retires replicas only through its steps.
            Some(r) => (rt.desired.min(r.allowed) as usize).max(current.len()),
            None => rt.desired as usize,
        };
        if current.len() > desired {
            // The highest indices go, as a StatefulSet scales down.
            let surplus = current[desired..].to_vec();
            return self.retire(name, surplus);
        }
        let mut missing = desired - current.len();
        let mut index = 0u32;
        let (revision, spec) = (rt.revision, rt.spec.clone());
        let mut ids = Vec::new();
        while missing > 0 {
            let id = ReplicaId::new(name, revision, index);
            index += 1;
            if rt.replicas.contains_key(&id) || rt.stopping.contains(&id) {
                continue;
            }
            missing -= 1;
            ids.push(id);
        }
        for id in ids {
            self.spawn_replica(id, spec.clone());
        }
        BTreeSet::new()
    }

    /// Takes replicas out of service: each is drained (the hooks) and stopped
    /// by a task of its own that reports [`Internal::Stopped`].
    fn retire(&mut self, name: &str, ids: Vec<ReplicaId>) -> BTreeSet<ReplicaId> {
        let Some(rt) = self.services.get_mut(name) else {
            return BTreeSet::new();
        };
        let mut out = BTreeSet::new();
        for id in ids {
            let Some(h) = rt.replicas.remove(&id) else {
                continue;
            };
            rt.stopping.insert(id.clone());
            out.insert(id.clone());
            let hooks = self.hooks.clone();
            let board = self.ctx.board.clone();
            let done = self.internal_tx.clone();
            tokio::spawn(async move {
                // Requests in flight finish first; new ones go to the replicas that stay.
                for hook in &hooks {
                    hook.before_stop(vec![id.clone()], h.grace).await;
                }
                let _ = h.ctl.send(replica::Ctl::Stop).await;
                let _ = h.task.await;
                board.remove(&id);
                for hook in &hooks {
                    hook.after_stop(std::slice::from_ref(&id));
                }
                let _ = done.send(Internal::Stopped(id));
            });
        }
        out
    }

    /// A service's history as a (re)started daemon finds it: the revision it
    /// runs is active (recorded if new, with what changed since the last
    /// one); a rollout the previous daemon left unfinished failed.
    fn settle_history(
        &self,
        name: &str,
        revision: Revision,
        spec: &Service,
        known: &[RevisionInfo],
    ) {
        let h = &self.ctx.history;
        let hash = spec.definition_hash();
        if !known
            .iter()
            .any(|r| r.revision == revision && r.hash == hash)
        {
            h.record(
                name,
                RevisionInfo::new(
                    revision,
                    spec,
                    if known.is_empty() {
                        "initial"
                    } else {
                        "deploy"
                    },
                    known
                        .last()
                        .map(|l| history::diff(&l.spec, spec))
                        .unwrap_or_default(),
                    RevisionStatus::Active,
                ),
            );
        }
        for r in known.iter().filter(|r| r.revision != revision) {
            match r.status {
                RevisionStatus::Rolling | RevisionStatus::Paused => h.set_status(
                    name,
                    r.revision,
                    RevisionStatus::Failed,
                    "the daemon stopped during its rollout",
                ),
                RevisionStatus::Active => h.set_status(
                    name,
                    r.revision,
                    RevisionStatus::Superseded,
                    &format!("replaced by revision {revision}"),
                ),
                _ => {}
            }
        }
        h.set_status(name, revision, RevisionStatus::Active, "");
    }

    /// Starts the rollout task that replaces `name`'s other revisions with
    /// its current one (ending any rollout already going); `back` uses the
    /// service's `rollback_config`.
    fn begin_rollout(&mut self, name: &str, from: Revision, from_spec: Arc<Service>, back: bool) {
        let Some(rt) = self.services.get_mut(name) else {
            return;
        };
        if let Some(old) = rt.rollout.take() {
            old.task.abort();
        }
        let cfg = if back {
            rt.spec.deploy.rollback_config.clone()
        } else {
            rt.spec.deploy.update_config.clone()
        };
        let plan = rollout::describe(&rt.spec, &cfg);
        // Going back is not judged.
        let analysis = rt
            .spec
            .x
            .analysis
            .clone()
            .filter(|_| !back)
            .map(|a| (a, source(&self.ctx)));
        let r = rollout::Rollout {
            board: self.ctx.board.clone(),
            events: self.ctx.events.clone(),
            steps: self.steps_tx.clone(),
            service: name.to_owned(),
            revision: rt.revision,
            start_first: rollout::start_first(&rt.spec, &cfg),
            budget: rollout::health_budget(&rt.spec),
            cfg,
            analysis,
        };
        let done = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            let result = r.run().await;
            let _ = done.send(Internal::Rolled {
                service: r.service,
                revision: r.revision,
                result,
            });
        });
        rt.rollout = Some(RolloutRt {
            from,
            from_spec,
            allowed: 0,
            back,
            plan,
            since_ms: crate::events::now_ms(),
            task,
            canary: None,
            checks: Vec::new(),
        });
        self.publish_services();
    }

    /// Starts `name`'s canary of its current revision over `from`.
    fn begin_canary(&mut self, name: &str, from: Revision, from_spec: Arc<Service>) {
        let Some(rt) = self.services.get_mut(name) else {
            return;
        };
        let Some(cfg) = rt.spec.x.rollout.clone() else {
            return;
        };
        if let Some(old) = rt.rollout.take() {
            old.task.abort();
        }
        let update = rt.spec.deploy.update_config.clone();
        let roll = rollout::Rollout {
            board: self.ctx.board.clone(),
            events: self.ctx.events.clone(),
            steps: self.steps_tx.clone(),
            service: name.to_owned(),
            revision: rt.revision,
            start_first: true,
            budget: rollout::health_budget(&rt.spec),
            cfg: update,
            analysis: None,
        };
        let source = source(&self.ctx);
        let (control, rx) = mpsc::unbounded_channel();
        let plan = canary::describe(&cfg);
        let run = canary::CanaryRun::new(roll, from, cfg, source, rx);
        let (service, revision) = (name.to_owned(), rt.revision);
        let done = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            let result = run.run().await;
            let _ = done.send(Internal::Rolled {
                service,
                revision,
                result,
            });
        });
        rt.rollout = Some(RolloutRt {
            from,
            from_spec,
            allowed: 0,
            back: false,
            plan,
            since_ms: crate::events::now_ms(),
            task,
            canary: Some(CanaryRt {
                control,
                status: crate::state::CanaryStatus::default(),
            }),
            checks: Vec::new(),
        });
        self.publish_services();
    }

    /// Starts replica `id` with definition `spec`.
    fn spawn_replica(&mut self, id: ReplicaId, spec: Arc<Service>) {
        let Some(rt) = self.services.get_mut(&id.service) else {
            return;
        };
        let (tx, rx) = mpsc::channel(1);
        let r = replica::Replica {
            ctx: self.ctx.clone(),
            id: id.clone(),
            spec: spec.clone(),
            port_range: self.port_range,
            host_services: self.host_services.clone(),
        };
        self.ctx.board.remove(&id);
        self.ctx.board.update(&id, |_| {});
        let adopted = self.adopted.remove(&id);
        let task = tokio::spawn(r.run(rx, adopted));
        rt.replicas.insert(
            id,
            ReplicaHandle {
                ctl: tx,
                task,
                grace: spec.stop_grace_period.0,
            },
        );
    }

    fn set_split(&self, name: &str, split: Option<crate::state::control::Split>) {
        for hook in &self.hooks {
            hook.set_split(name, split.clone());
        }
    }

    /// A step a rollout asks for, if it is still the service's rollout.
    fn step(&mut self, name: &str, revision: Revision, step: rollout::Step) {
        let Some(rt) = self.services.get_mut(name) else {
            return;
        };
        if rt.revision != revision || rt.rollout.is_none() {
            return;
        }
        match step {
            rollout::Step::Allow(n) => {
                if let Some(r) = rt.rollout.as_mut() {
                    r.allowed = n;
                }
                self.reconcile(name);
                self.publish_services();
            }
            rollout::Step::RetireOld(n) => {
                // Replicas that are not ready go first, then the highest indices.
                let mut old: Vec<(bool, u32, ReplicaId)> = rt
                    .replicas
                    .keys()
                    .filter(|id| id.revision != revision)
                    .map(|id| {
                        let ready = self.ctx.board.get(id).is_some_and(|s| s.is_ready());
                        (ready, u32::MAX - id.index, id.clone())
                    })
                    .collect();
                old.sort();
                let ids: Vec<ReplicaId> = old.into_iter().take(n as usize).map(|x| x.2).collect();
                let retired = self.retire(name, ids);
                for p in &mut self.pending {
                    if p.rollouts.contains(&(name.to_owned(), revision)) {
                        p.stops.extend(retired.iter().cloned());
                    }
                }
            }
            rollout::Step::Baseline(indices) => {
                let Some(ro) = rt.rollout.as_ref() else {
                    return;
                };
                let (from, spec) = (ro.from, ro.from_spec.clone());
                let new: Vec<ReplicaId> = indices
                    .iter()
                    .map(|i| ReplicaId::new(name, from, *i))
                    .filter(|id| !rt.replicas.contains_key(id) && !rt.stopping.contains(id))
                    .collect();
                for id in new {
                    self.ctx.events.emit_replica(
                        &id,
                        "baseline",
                        format!("a fresh replica of revision {from} to compare the canary with"),
                    );
                    self.spawn_replica(id, spec.clone());
                }
            }
            rollout::Step::Split(split) => self.set_split(name, split),
            rollout::Step::Checks(checks) => {
                for r in &checks {
                    self.ctx.history.verdict(name, &r.name, r.outcome.as_str());
                }
                if let Some(ro) = rt.rollout.as_mut() {
                    ro.checks = checks;
                }
                self.publish_services();
            }
            rollout::Step::Report(status) => {
                if let Some(c) = rt.rollout.as_mut().and_then(|r| r.canary.as_mut()) {
                    for r in &status.checks {
                        if !c.status.checks.iter().any(|o| o == r) {
                            self.ctx.history.verdict(name, &r.name, r.outcome.as_str());
                        }
                    }
                    c.status = *status;
                }
                self.publish_services();
            }
        }
    }

    /// A rollout ended: on success the other revisions' last replicas go;
    /// on failure the `failure_action` applies.
    fn rolled(&mut self, name: &str, revision: Revision, result: Result<(), String>) {
        let current = self
            .services
            .get(name)
            .is_some_and(|rt| rt.revision == revision && rt.rollout.is_some());
        if !current {
            return;
        }
        let rt = self.services.get_mut(name).expect("present");
        let ro = rt.rollout.take().expect("a rollout");
        let mut retired = BTreeSet::new();
        let mut next = None;
        match &result {
            Ok(()) => {
                let old: Vec<ReplicaId> = rt
                    .replicas
                    .keys()
                    .filter(|id| id.revision != revision)
                    .cloned()
                    .collect();
                self.ctx.events.emit(
                    name,
                    None,
                    "rolled",
                    format!("revision {revision} is rolled out"),
                );
                retired = self.retire(name, old);
                // Scaled down meanwhile: the surplus goes now.
                retired.extend(self.reconcile(name));
                self.set_split(name, None);
                self.ctx.history.count(name, "rolled");
                self.ctx
                    .history
                    .set_status(name, revision, RevisionStatus::Active, "");
                if !ro.back {
                    self.ctx.history.set_status(
                        name,
                        ro.from,
                        RevisionStatus::Superseded,
                        &format!("replaced by revision {revision}"),
                    );
                }
            }
            Err(why) => {
                let action = if ro.back {
                    FailureAction::Pause
                } else if let Some(c) = &ro.canary {
                    // The canary gets no more requests while it goes.
                    self.set_split(
                        name,
                        Some(crate::state::control::Split {
                            canary: revision,
                            weight: 0,
                            stable: ro.from,
                            baseline: c.status.baseline.clone(),
                            sticky: None,
                        }),
                    );
                    FailureAction::Rollback
                } else {
                    rt.spec.deploy.update_config.failure_action
                };
                self.ctx.history.count(
                    name,
                    match (action, ro.back) {
                        (_, true) => "failed",
                        (FailureAction::Rollback, false) => "rolled_back",
                        _ => "paused",
                    },
                );
                if action == FailureAction::Rollback {
                    self.go_back(
                        name,
                        ro.from,
                        ro.from_spec.clone(),
                        why,
                        format!("{why}; rolling back to revision {}", ro.from),
                    );
                    next = Some(ro.from);
                } else {
                    self.ctx.history.set_status(
                        name,
                        revision,
                        if ro.back {
                            RevisionStatus::Failed
                        } else {
                            RevisionStatus::Paused
                        },
                        why,
                    );
                    self.ctx.events.emit(
                        name,
                        None,
                        "paused",
                        format!("{why}; the rollout is paused (both revisions run): `capstan rollback {name}` or deploy again"),
                    );
                }
            }
        }
        for p in &mut self.pending {
            if p.rollouts.remove(&(name.to_owned(), revision)) {
                p.stops.extend(retired.iter().cloned());
                if let Err(why) = &result {
                    match next {
                        Some(back) => {
                            p.failures
                                .push(format!("{why}; rolled back to revision {back}"));
                            p.rollouts.insert((name.to_owned(), back));
                        }
                        None => p.failures.push(format!(
                            "{why}; the rollout is paused: `capstan rollback {name}` or deploy again"
                        )),
                    }
                }
            }
        }
        self.publish_services();
    }

    /// `capstan rollback`: back to revision `to` (by default the one before
    /// the current), at the service's `rollback_config` (all at once by
    /// default), skipping any analysis.
    fn rollback(&mut self, name: &str, to: Option<Revision>) -> Result<Pending, Error> {
        self.known(&[name.to_owned()])?;
        let rt = &self.services[name];
        let current = rt.revision;
        let list = self.ctx.history.of(name);
        let target = match to {
            Some(r) if r == current => {
                return Err(Error::Invalid(format!("{name} runs revision {r} already")));
            }
            Some(r) => list
                .iter()
                .find(|i| i.revision == r)
                .cloned()
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{name} has no revision {r} in its history (see `capstan history {name}`)"
                    ))
                })?,
            // The newest earlier revision that ran well and differs from
            // the current one (else any earlier one that differs).
            None => {
                let hash = rt.spec.definition_hash();
                let earlier = |good: bool| {
                    list.iter().rev().find(|i| {
                        i.revision < current
                            && i.hash != hash
                            && (!good
                                || !matches!(
                                    i.status,
                                    RevisionStatus::Failed | RevisionStatus::RolledBack
                                ))
                    })
                };
                earlier(true)
                    .or_else(|| earlier(false))
                    .cloned()
                    .ok_or_else(|| {
                        Error::Invalid(format!("{name} has no earlier revision to go back to"))
                    })?
            }
        };
        let stops = self.go_back(
            name,
            target.revision,
            Arc::new(target.spec),
            "rolled back by `capstan rollback`",
            format!(
                "rolling back revision {current} -> {} (capstan rollback)",
                target.revision
            ),
        );
        let mut p = Pending::new(format!(
            "rolled {name} back to revision {}",
            target.revision
        ));
        p.stops = stops;
        p.rollouts.insert((name.to_owned(), target.revision));
        Ok(p)
    }

    /// Puts `name` back on revision `to` (definition `to_spec`), rolled out
    /// over its current one with the `rollback_config`; `why` is recorded on
    /// the revision it leaves, `event` says what happens. Returns the
    /// replicas retired at once.
    fn go_back(
        &mut self,
        name: &str,
        to: Revision,
        to_spec: Arc<Service>,
        why: &str,
        event: String,
    ) -> BTreeSet<ReplicaId> {
        let Some(rt) = self.services.get_mut(name) else {
            return BTreeSet::new();
        };
        let (from, from_spec) = (rt.revision, rt.spec.clone());
        rt.spec = to_spec.clone();
        rt.revision = to;
        rt.stopped = false;
        rt.held = false;
        // The stack follows: applying the same file again rolls forward again.
        if let Some(s) = self.stack.services.get_mut(name) {
            *s = (*to_spec).clone();
        }
        let h = &self.ctx.history;
        h.set_status(name, from, RevisionStatus::RolledBack, why);
        h.set_status(name, to, RevisionStatus::Rolling, "rolling back to it");
        self.ctx.events.emit(name, None, "rollback", event);
        self.begin_rollout(name, from, from_spec, true);
        self.reconcile(name)
    }

    fn scale(&mut self, counts: BTreeMap<String, u32>) -> Result<Pending, Error> {
        for name in counts.keys() {
            if !self.services.contains_key(name) {
                return Err(Error::NoSuchService(name.clone()));
            }
        }
        let mut done = Vec::new();
        let mut stops = BTreeSet::new();
        for (name, n) in counts {
            let Some(rt) = self.services.get_mut(&name) else {
                continue;
            };
            let before = rt.desired;
            rt.desired = n;
            stops.extend(self.reconcile(&name));
            self.ctx
                .events
                .emit(&name, None, "scaled", format!("replicas {before} -> {n}"));
            done.push(format!("{name}={n}"));
        }
        // The new counts are visible at once, before any replica has stopped.
        self.publish_services();
        let mut p = Pending::new(format!("scaled {}", done.join(" ")));
        p.stops = stops;
        Ok(p)
    }

    /// A request found no replica: a service scaled to zero gets one.
    fn wake(&mut self, name: &str) {
        let Some(rt) = self.services.get(name) else {
            return;
        };
        if rt.desired > 0 || rt.stopped {
            return;
        }
        self.ctx.events.emit(
            name,
            None,
            "waking",
            "a request arrived with no replica running; starting one",
        );
        let _ = self.scale(BTreeMap::from([(name.to_owned(), 1)]));
    }

    fn stop_service(&mut self, name: &str) -> BTreeSet<ReplicaId> {
        let all: Vec<ReplicaId> = self
            .services
            .get(name)
            .map(|rt| rt.replicas.keys().cloned().collect())
            .unwrap_or_default();
        let stops = self.retire(name, all);
        if let Some(rt) = self.services.get_mut(name) {
            rt.stopped = true;
            // A rollout under way ends with the service: its revision is
            // what runs when the service starts again.
            if let Some(r) = rt.rollout.take() {
                r.task.abort();
                for hook in &self.hooks {
                    hook.set_split(name, None);
                }
                let revision = rt.revision;
                self.ctx.history.set_status(
                    name,
                    revision,
                    RevisionStatus::Active,
                    "the service was stopped during its rollout",
                );
                if !r.back {
                    self.ctx.history.set_status(
                        name,
                        r.from,
                        RevisionStatus::Superseded,
                        &format!("replaced by revision {revision}"),
                    );
                }
                for p in &mut self.pending {
                    if p.rollouts.remove(&(name.to_owned(), revision)) {
                        p.failures
                            .push(format!("{name} was stopped during its rollout"));
                    }
                }
            }
        }
        self.publish_services();
        stops
    }

    fn start_service(&mut self, name: &str) {
        if let Some(rt) = self.services.get_mut(name) {
            rt.stopped = false;
        }
        self.revive(name);
        self.reconcile(name);
        self.publish_services();
    }

    /// Stop first, then start a new revision (as compose's `restart`).
    fn restart(&mut self, names: &[String]) -> Pending {
        let mut p = Pending::new(format!("done: {}", names.join(", ")));
        for name in names {
            let revision = self.next_revision(name);
            let spec = self.services[name].spec.clone();
            let from = self.services[name].revision;
            self.ctx.history.record(
                name,
                RevisionInfo::new(
                    revision,
                    &spec,
                    "restart",
                    Vec::new(),
                    RevisionStatus::Active,
                ),
            );
            self.ctx.history.set_status(
                name,
                from,
                RevisionStatus::Superseded,
                &format!("restarted as revision {revision}"),
            );
            let all: Vec<ReplicaId> = self.services[name].replicas.keys().cloned().collect();
            p.stops.extend(self.retire(name, all));
            if let Some(rt) = self.services.get_mut(name) {
                rt.stopped = false;
                rt.revision = revision;
                rt.held = true;
            }
            p.resume.push(name.clone());
            self.ctx
                .events
                .emit(name, None, "restarted", "service restarted");
        }
        p
    }

    /// Ends the tasks of `name`'s replicas that finished (exited or failed and
    /// not restarted by their policy), so that `reconcile` starts them afresh.
    /// Returns their indices.
    fn revive(&mut self, name: &str) -> Vec<u32> {
        let finished: BTreeSet<ReplicaId> = self
            .ctx
            .board
            .replicas_of(name)
            .into_iter()
            .filter(|s| s.state.finished())
            .map(|s| s.id())
            .collect();
        let Some(rt) = self.services.get_mut(name) else {
            return Vec::new();
        };
        let mut revived = Vec::new();
        for id in finished {
            if let Some(h) = rt.replicas.remove(&id) {
                // A finished replica's task only waits for this.
                let _ = h.ctl.try_send(replica::Ctl::Stop);
                self.ctx.board.remove(&id);
                revived.push(id.index);
            }
        }
        revived
    }

    /// Stops everything, dependents before what they depend on.
    async fn down(&mut self, volumes: bool) {
        for hook in &self.hooks {
            hook.on_down();
        }
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
            for name in &level {
                let all: Vec<ReplicaId> = self
                    .services
                    .get(name)
                    .map(|rt| rt.replicas.keys().cloned().collect())
                    .unwrap_or_default();
                self.retire(name, all);
            }
            self.settle(&level).await;
            order.retain(|n| !level.contains(n));
        }
        // Replicas of services removed from the stack may still be stopping.
        self.settle(&[]).await;
        self.ctx.driver.down(volumes).await;
        self.ctx.records.lock().unwrap().clear();
    }

    /// Takes the tasks' reports until no replica of `names`, nor of a removed
    /// service, is stopping.
    async fn settle(&mut self, names: &[String]) {
        let busy = |sv: &Supervisor| {
            !sv.orphans.is_empty()
                || names
                    .iter()
                    .any(|n| sv.services.get(n).is_some_and(|rt| !rt.stopping.is_empty()))
        };
        while busy(self) {
            match self.internal_rx.recv().await {
                Some(Internal::Stopped(id)) => {
                    if let Some(rt) = self.services.get_mut(&id.service) {
                        rt.stopping.remove(&id);
                    }
                    self.orphans.remove(&id);
                }
                Some(_) => {}
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
