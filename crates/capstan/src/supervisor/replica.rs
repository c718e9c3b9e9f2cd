//! One replica's life: wait for dependencies, start through the driver, watch
//! (exit, health, resources), restart with backoff per policy, stop gracefully
//! when told. Only the restart policy and the health flow live here; how a
//! replica runs is the [`Driver`](super::driver::Driver)'s business.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Context;
use super::driver::{Exit, Launch, Replica as Running};
use super::health::{self, Health as Check};
use crate::spec::{Condition, HealthTest, RestartCondition, Service};
use crate::state::{Health, Phase, ReplicaId, Status};

/// Consecutive failed runs after which a replica is reported as crash-looping.
pub const CRASH_LOOP_AFTER: u32 = 4;
/// Longest restart backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
pub use crate::state::SAMPLE_EVERY;

pub enum Ctl {
    Stop,
}

pub struct Replica {
    pub ctx: Arc<Context>,
    pub id: ReplicaId,
    pub spec: Arc<Service>,
    pub port_range: [u16; 2],
    pub host_services: Arc<Vec<String>>,
}

enum Outcome {
    /// Told to stop; it is gone.
    Stopped,
    /// It ended by itself (or was ended for being unhealthy).
    Exited {
        exit: Exit,
        uptime: Duration,
        unhealthy: bool,
    },
    SpawnFailed(String),
}

impl Replica {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        self.ctx.board.update(&self.id, f);
    }

    fn event(&self, kind: &str, reason: impl Into<String>) {
        self.ctx.events.emit_replica(&self.id, kind, reason);
    }

    /// Runs the replica until told to stop; `adopted` is one a previous
    /// daemon started, supervised from where it is.
    pub async fn run(self, mut ctl: mpsc::Receiver<Ctl>, adopted: Option<Box<dyn Running>>) {
        let mut adopted = adopted;
        if adopted.is_none() && !self.wait_for_dependencies(&mut ctl).await {
            self.set(|s| s.state = Phase::Stopped);
            return;
        }
        let policy = self.spec.deploy.restart_policy.clone();
        let mut failures = 0u32;
        let mut attempts = 0u32;
        loop {
            let outcome = self.run_once(&mut ctl, adopted.take()).await;
            let (success, uptime) = match &outcome {
                Outcome::Stopped => {
                    self.set(|s| {
                        s.state = Phase::Stopped;
                        s.pid = None;
                        s.health = Health::None;
                        s.accepting = false;
                    });
                    return;
                }
                Outcome::SpawnFailed(e) => {
                    self.event("failed", format!("cannot start: {e}"));
                    (false, Duration::ZERO)
                }
                Outcome::Exited {
                    exit,
                    uptime,
                    unhealthy,
                } => {
                    let how = describe_exit(exit.code, exit.signal, exit.oom_killed);
                    self.set(|s| {
                        s.pid = None;
                        s.accepting = false;
                        s.last_exit = Some(how.clone());
                        s.exit_code = exit.code;
                    });
                    if exit.oom_killed {
                        self.event(
                            "oom-killed",
                            format!("killed by the kernel: memory limit reached ({how})"),
                        );
                    }
                    self.event(
                        "exited",
                        format!(
                            "{how} after {}",
                            crate::spec::Dur(Duration::from_millis(uptime.as_millis() as u64))
                        ),
                    );
                    (exit.success() && !unhealthy, *uptime)
                }
            };
            let restart = match policy.condition {
                RestartCondition::None => false,
                RestartCondition::OnFailure => !success,
                RestartCondition::Any => true,
            };
            if uptime >= policy.window.0 {
                failures = 0;
                attempts = 0;
            }
            if !restart {
                let state = if success {
                    Phase::Exited
                } else {
                    Phase::Failed
                };
                // Nothing runs: no health to show.
                self.set(|s| {
                    s.state = state;
                    s.health = Health::None;
                });
                self.park(&mut ctl).await;
                return;
            }
            failures += 1;
            attempts += 1;
            if let Some(max) = policy.max_attempts
                && attempts > max
            {
                self.set(|s| {
                    s.state = Phase::Failed;
                    s.health = Health::None;
                });
                self.event("failed", format!("gave up after {max} restart attempts"));
                self.park(&mut ctl).await;
                return;
            }
            let delay = backoff(policy.delay.0, failures);
            let state = if failures >= CRASH_LOOP_AFTER {
                Phase::CrashLooping
            } else {
                Phase::Restarting
            };
            if failures == CRASH_LOOP_AFTER {
                self.event(
                    "crash-looping",
                    format!(
                        "failed {failures} times in a row; restarting with backoff up to {}",
                        crate::spec::Dur(MAX_BACKOFF)
                    ),
                );
            }
            self.set(|s| {
                s.state = state;
                s.health = Health::None;
            });
            self.event(
                "restarting",
                format!("restarting in {}", crate::spec::Dur(delay)),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ctl.recv() => {
                    self.set(|s| s.state = Phase::Stopped);
                    self.event("stopped", "stopped while waiting to restart");
                    return;
                }
            }
            self.set(|s| s.restarts += 1);
        }
    }

    /// Keeps a finished replica visible until it is told to stop.
    async fn park(&self, ctl: &mut mpsc::Receiver<Ctl>) {
        let _ = ctl.recv().await;
    }

    /// Waits until every dependency meets its condition; false if told to stop first.
    async fn wait_for_dependencies(&self, ctl: &mut mpsc::Receiver<Ctl>) -> bool {
        if self.spec.depends_on.is_empty() {
            return true;
        }
        self.set(|s| s.state = Phase::Waiting);
        let mut changed = self.ctx.board.watch_topology();
        let mut announced = false;
        loop {
            let unmet: Vec<String> = self
                .spec
                .depends_on
                .iter()
                .filter(|(dep, d)| !super::dependency_met(&self.ctx.board, dep, d.condition))
                .map(|(dep, d)| format!("{dep} ({})", condition_name(d.condition)))
                .collect();
            if unmet.is_empty() {
                return true;
            }
            if !announced {
                self.set(|s| s.message = format!("waiting for {}", unmet.join(", ")));
                announced = true;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = ctl.recv() => return false,
            }
        }
    }

    fn launch(&self) -> Launch {
        // The daemon's own environment is inherited by processes, never
        // given to containers.
        let mut env: BTreeMap<String, String> = self.spec.environment.clone();
        env.insert("CAPSTAN_SERVICE".into(), self.id.service.clone());
        env.insert("CAPSTAN_REPLICA".into(), self.id.index.to_string());
        env.insert("CAPSTAN_REVISION".into(), self.id.revision.to_string());
        if self.spec.driver() == crate::spec::DriverKind::Process {
            // A process inherits the daemon's environment: what it sets wins
            // over capstan's defaults, as the service's own settings do.
            let mut inherited: BTreeMap<String, String> = std::env::vars()
                .filter(|(k, _)| k.starts_with("OTEL_"))
                .collect();
            inherited.extend(std::mem::take(&mut env));
            env = inherited;
            otel_env(&mut env, self.ctx.otlp, &self.id.service, self.id.index);
        }
        Launch {
            id: self.id.clone(),
            service: self.spec.clone(),
            argv: self.spec.argv().unwrap_or_default(),
            env,
            working_dir: self
                .spec
                .working_dir
                .as_ref()
                .map(Into::into)
                .or_else(|| Some(self.ctx.stack_dir.clone())),
            limits: self.spec.deploy.resources.limits.clone(),
            stop_signal: self.spec.stop_signal.clone(),
            grace: self.spec.stop_grace_period.0,
            port_range: self.port_range,
            host_services: self.host_services.clone(),
        }
    }

    async fn run_once(
        &self,
        ctl: &mut mpsc::Receiver<Ctl>,
        adopted: Option<Box<dyn Running>>,
    ) -> Outcome {
        self.set(|s| {
            s.state = Phase::Starting;
            s.message.clear();
        });
        let was_adopted = adopted.is_some();
        let mut running = match adopted {
            Some(r) => r,
            None => match self.ctx.driver.start(self.launch()).await {
                Ok(r) => r,
                Err(e) => return Outcome::SpawnFailed(e),
            },
        };
        let started = Instant::now();
        let started_ns = crate::state::clock::unix_ns();
        let record = running.record();
        self.ctx.records.lock().unwrap().insert(record.clone());
        if was_adopted {
            // What the previous daemon stored of its output is not read again.
            let q = crate::logs::LogQuery {
                services: vec![self.id.service.clone()],
                replica: Some(self.id.index),
                since_ns: None,
                tail: Some(1000),
            };
            let last = tokio::task::block_in_place(|| self.ctx.logs.query(&q))
                .iter()
                .filter(|r| {
                    matches!(
                        r.stream,
                        crate::logs::Stream::Stdout | crate::logs::Stream::Stderr
                    )
                })
                .map(|r| r.ts_ns)
                .max();
            running.output_after(last.unwrap_or(0));
        }
        let mut captures = Vec::new();
        for (stream, reader) in running.take_output() {
            let ctx = self.ctx.clone();
            let (service, idx) = (self.id.service.clone(), self.id.index);
            captures.push(tokio::spawn(async move {
                crate::logs::capture::read_line_batches(reader, |batch| {
                    let lines = batch.into_iter().map(|(l, p)| (idx, l, p));
                    if let Err(e) = ctx.logs.append_many(&service, stream, lines) {
                        ctx.events.warn_once(format!("cannot store logs: {e}"));
                    }
                })
                .await;
            }));
        }
        // The service's health check, else the image's own (unless disabled).
        let healthcheck = self.spec.healthcheck.clone().or_else(|| {
            (!self.spec.healthcheck_disabled)
                .then(|| running.healthcheck())
                .flatten()
        });
        let has_health = healthcheck.is_some();
        let (memory_limit, cpu_limit) = running.enforced_limits();
        let pid = running.pid();
        let addr = running.addr();
        self.set(|s| {
            s.memory_limit_bytes = memory_limit;
            s.cpu_limit = cpu_limit;
            s.cpu_seconds_total = Some(0.0);
            s.cpu_sampled_ms = Some(crate::state::clock::unix_ms());
            s.pid = pid;
            s.addr = Some(addr);
            s.accepting = false;
            s.state = Phase::Running;
            s.health = if has_health {
                Health::Starting
            } else {
                Health::None
            };
            s.started_ms = Some(crate::state::clock::unix_ms());
        });
        let at = if addr.ip().is_loopback() {
            format!("port {}", addr.port())
        } else {
            format!("address {addr}")
        };
        match pid {
            _ if was_adopted => {}
            Some(pid) => self.event("started", format!("pid {pid}, {at}")),
            None => self.event("started", at),
        }
        let (htx, mut hrx) = mpsc::channel(4);
        let prober = running.prober();
        let health_task = match healthcheck {
            Some(hc) => Some(tokio::spawn(health::watch(hc, prober, htx))),
            // Without a health check: ready once it accepts connections, if
            // it takes traffic; else once it runs.
            None if !self.spec.ports.is_empty() => Some(tokio::spawn(accepting(
                prober,
                self.ctx.clone(),
                self.id.clone(),
            ))),
            None => {
                self.set(|s| s.accepting = true);
                None
            }
        };
        // The first sample comes after one period, so CPU % has a span to measure.
        let mut tick = tokio::time::interval_at(Instant::now() + SAMPLE_EVERY, SAMPLE_EVERY);
        let mut unhealthy = false;
        let mut stopped = false;
        let exit = loop {
            tokio::select! {
                e = running.wait() => break e,
                Some(h) = hrx.recv() => match h {
                    Check::Healthy => {
                        // The event first: what the new health sets off
                        // (a replacement moving on) comes after it.
                        self.event("healthy", "health check passed");
                        self.set(|s| s.health = Health::Healthy);
                    }
                    Check::Unhealthy(reason) => {
                        self.set(|s| s.health = Health::Unhealthy);
                        self.event("unhealthy", reason);
                        if self.spec.deploy.restart_policy.condition != RestartCondition::None {
                            unhealthy = true;
                            break self.stop(&mut *running).await;
                        }
                    }
                },
                _ = ctl.recv() => {
                    stopped = true;
                    self.set(|s| s.state = Phase::Stopping);
                    self.event("stopping", format!("sending {} (grace period {})", self.spec.stop_signal, self.spec.stop_grace_period));
                    break self.stop(&mut *running).await;
                }
                _ = tick.tick() => {
                    let x = running.sample();
                    self.ctx.board.sample(&self.id, x);
                }
            }
        };
        if let Some(t) = health_task {
            t.abort();
        }
        running.cleanup().await;
        for c in captures {
            let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
        }
        self.ctx.records.lock().unwrap().remove(&record);
        drop(running);
        if stopped {
            self.event("stopped", describe_exit(exit.code, exit.signal, false));
            return Outcome::Stopped;
        }
        if !exit.success() && !self.spec.ports.is_empty() {
            self.hint_port_taken(started_ns, addr);
        }
        Outcome::Exited {
            exit,
            uptime: started.elapsed(),
            unhealthy,
        }
    }

    /// A program that failed with "address already in use" while capstan's
    /// proxy publishes the service's ports most likely listens on the published
    /// port itself: say what to do instead.
    fn hint_port_taken(&self, since_ns: i64, addr: SocketAddr) {
        let q = crate::logs::LogQuery {
            services: vec![self.id.service.clone()],
            replica: Some(self.id.index),
            since_ns: Some(since_ns),
            tail: Some(20),
        };
        let lines = tokio::task::block_in_place(|| self.ctx.logs.query(&q));
        let taken = lines.iter().any(|l| {
            let lower = l.line.to_ascii_lowercase();
            lower.contains("address already in use") || lower.contains("eaddrinuse")
        });
        if !taken {
            return;
        }
        let published: Vec<String> = self
            .spec
            .ports
            .iter()
            .map(|p| p.published.to_string())
            .collect();
        self.event(
            "hint",
            format!(
                "the program could not listen: its address is in use. capstan's proxy publishes port {} and gives each replica its own port in $PORT ({} for this one): make the program listen on $PORT",
                published.join(", "),
                addr.port()
            ),
        );
    }

    /// Stop signal, the grace period, then a kill.
    async fn stop(&self, running: &mut dyn Running) -> Exit {
        let (exit, killed) = running
            .stop(&self.spec.stop_signal, self.spec.stop_grace_period.0)
            .await;
        if killed {
            self.event(
                "killing",
                format!(
                    "did not exit within {}; sent SIGKILL",
                    self.spec.stop_grace_period
                ),
            );
        }
        exit
    }
}

/// For a replica without a health check: marks it accepting once its address
/// takes connections (quick at first, since a cold start waits on this).
async fn accepting(prober: super::driver::Prober, ctx: Arc<Context>, id: ReplicaId) {
    let started = Instant::now();
    loop {
        if prober(HealthTest::Tcp { port: None }, Duration::from_secs(1))
            .await
            .is_ok()
        {
            ctx.board.update(&id, |s| s.accepting = true);
            return;
        }
        let pause = if started.elapsed() < Duration::from_secs(5) {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(250)
        };
        tokio::time::sleep(pause).await;
    }
}

pub fn backoff(base: Duration, failures: u32) -> Duration {
    let base = base.max(Duration::from_millis(100));
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

fn condition_name(c: Condition) -> &'static str {
    match c {
        Condition::ServiceStarted => "started",
        Condition::ServiceHealthy => "healthy",
        Condition::ServiceCompletedSuccessfully => "completed successfully",
    }
}

pub fn describe_exit(code: Option<i32>, signal: Option<i32>, oom: bool) -> String {
    match (code, signal) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => {
            let name = Signal::try_from(s)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| s.to_string());
            if oom {
                format!("killed by {name} (out of memory)")
            } else {
                format!("killed by {name}")
            }
        }
        _ => "exited".into(),
    }
}

/// Points OpenTelemetry SDKs at capstan's OTLP/HTTP endpoints (unless the
/// service's environment says otherwise): the endpoint, the protocol, the
/// service name, and the replica as a resource attribute, which puts its OTLP
/// logs in the replica's streams.
fn otel_env(env: &mut BTreeMap<String, String>, api: Option<SocketAddr>, service: &str, idx: u32) {
    if let Some(a) = api {
        let host = if a.ip().is_unspecified() {
            format!("127.0.0.1:{}", a.port())
        } else {
            a.to_string()
        };
        env.entry("OTEL_EXPORTER_OTLP_ENDPOINT".into())
            .or_insert(format!("http://{host}"));
        env.entry("OTEL_EXPORTER_OTLP_PROTOCOL".into())
            .or_insert("http/protobuf".into());
    }
    env.entry("OTEL_SERVICE_NAME".into())
        .or_insert(service.to_owned());
    let attrs = env.entry("OTEL_RESOURCE_ATTRIBUTES".into()).or_default();
    if !attrs.is_empty() {
        attrs.push(',');
    }
    attrs.push_str(&format!("capstan.replica={idx}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        assert_eq!(backoff(b, 1), Duration::from_millis(100));
        assert_eq!(backoff(b, 2), Duration::from_millis(200));
        assert_eq!(backoff(b, 4), Duration::from_millis(800));
        assert_eq!(backoff(b, 20), MAX_BACKOFF);
    }
}
