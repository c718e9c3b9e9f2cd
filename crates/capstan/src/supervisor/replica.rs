//! One replica's life: wait for dependencies, spawn, watch (exit, health,
//! resources), restart with backoff per policy, stop gracefully when told.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::health::{self, Health};
use super::process::{self, Launch};
use super::state::Record;
use super::{Shared, Status};
use crate::logs::Stream;
use crate::spec::{Condition, RestartCondition, Service};

/// Consecutive failed runs after which a replica is reported as crash-looping.
pub const CRASH_LOOP_AFTER: u32 = 4;
/// Longest restart backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub enum Ctl {
    Stop,
}

pub struct Replica {
    pub shared: Arc<Shared>,
    pub service: String,
    pub idx: u32,
    pub spec: Arc<Service>,
    pub revision: String,
}

enum Outcome {
    /// Told to stop; the process is gone.
    Stopped,
    /// The process ended by itself (or was ended for being unhealthy).
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        uptime: Duration,
        unhealthy: bool,
        oom: bool,
    },
    SpawnFailed(String),
}

impl Replica {
    fn set(&self, f: impl FnOnce(&mut Status)) {
        self.shared.update(&self.service, self.idx, f);
    }

    fn event(&self, kind: &str, reason: impl Into<String>) {
        self.shared
            .events
            .emit(&self.service, Some(self.idx), kind, reason);
    }

    pub async fn run(self, mut ctl: mpsc::Receiver<Ctl>) {
        if !self.wait_for_dependencies(&mut ctl).await {
            self.set(|s| s.state = "stopped".into());
            return;
        }
        let policy = self.spec.deploy.restart_policy.clone();
        let mut failures = 0u32;
        let mut attempts = 0u32;
        loop {
            let outcome = self.run_once(&mut ctl).await;
            let (success, uptime) = match &outcome {
                Outcome::Stopped => {
                    self.set(|s| {
                        s.state = "stopped".into();
                        s.pid = None;
                    });
                    return;
                }
                Outcome::SpawnFailed(e) => {
                    self.event("failed", format!("cannot start: {e}"));
                    (false, Duration::ZERO)
                }
                Outcome::Exited {
                    code,
                    signal,
                    uptime,
                    unhealthy,
                    oom,
                } => {
                    let how = describe_exit(*code, *signal, *oom);
                    self.set(|s| {
                        s.pid = None;
                        s.last_exit = Some(how.clone());
                        s.exit_code = *code;
                    });
                    if *oom {
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
                    (*code == Some(0) && !unhealthy, *uptime)
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
                let state = if success { "exited" } else { "failed" };
                // Nothing runs: no health to show.
                self.set(|s| {
                    s.state = state.into();
                    s.health = "none".into();
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
                    s.state = "failed".into();
                    s.health = "none".into();
                });
                self.event("failed", format!("gave up after {max} restart attempts"));
                self.park(&mut ctl).await;
                return;
            }
            let delay = backoff(policy.delay.0, failures);
            let state = if failures >= CRASH_LOOP_AFTER {
                "crash-looping"
            } else {
                "restarting"
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
                s.state = state.into();
                s.health = "none".into();
            });
            self.event(
                "restarting",
                format!("restarting in {}", crate::spec::Dur(delay)),
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ctl.recv() => {
                    self.set(|s| s.state = "stopped".into());
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
        self.set(|s| s.state = "waiting".into());
        let mut changed = self.shared.changed.subscribe();
        let mut announced = false;
        loop {
            let unmet: Vec<String> = self
                .spec
                .depends_on
                .iter()
                .filter(|(dep, d)| !self.shared.dependency_met(dep, d.condition))
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

    fn launch(&self, port: u16) -> Launch {
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        env.extend(self.spec.environment.clone());
        env.insert("PORT".into(), port.to_string());
        env.insert("CAPSTAN_SERVICE".into(), self.service.clone());
        env.insert("CAPSTAN_REPLICA".into(), self.idx.to_string());
        env.insert("CAPSTAN_REVISION".into(), self.revision.clone());
        env.insert("CAPSTAN_STACK".into(), self.shared.stack_id.clone());
        otel_env(&mut env, &self.shared, &self.service, self.idx);
        Launch {
            argv: self.spec.argv().unwrap_or_default(),
            env,
            working_dir: self
                .spec
                .working_dir
                .as_ref()
                .map(Into::into)
                .or_else(|| Some(self.shared.stack_dir.clone())),
            cgroup: None,
        }
    }

    async fn run_once(&self, ctl: &mut mpsc::Receiver<Ctl>) -> Outcome {
        let port = self.shared.alloc_port();
        let mut launch = self.launch(port);
        launch.cgroup = self.shared.cgroups.as_ref().and_then(|cg| {
            cg.create(
                &format!("{}-{}", self.service, self.idx),
                &self.spec.deploy.resources.limits,
            )
            .map_err(|e| {
                self.shared
                    .warn_once(format!("cannot create cgroup, running without limits: {e}"))
            })
            .ok()
        });
        self.set(|s| {
            s.state = "starting".into();
            s.port = Some(port);
            s.message.clear();
        });
        let mut child = match process::spawn(&launch) {
            Ok(c) => c,
            Err(e) => {
                self.shared.release_port(port);
                return Outcome::SpawnFailed(e.to_string());
            }
        };
        let started = Instant::now();
        let started_ns = crate::logs::now_ns();
        // Without a pid there is no process group to signal (and 0 would mean
        // the daemon's own).
        let Some(pid) = child.id().map(|p| p as i32).filter(|p| *p > 0) else {
            self.shared.release_port(port);
            let _ = child.kill().await;
            return Outcome::SpawnFailed("the process ended before its pid was known".into());
        };
        let start_ticks = process::proc_stat(pid).map(|s| s.start_ticks).unwrap_or(0);
        self.shared.state.lock().unwrap().insert(Record {
            service: self.service.clone(),
            replica: self.idx,
            pid,
            start_ticks,
            cgroup: launch.cgroup.clone(),
            stop_signal: self.spec.stop_signal.clone(),
            grace_ms: self.spec.stop_grace_period.0.as_millis() as u64,
        });
        let oom_before = launch.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let mut captures = Vec::new();
        for (stream, reader) in [
            (
                Stream::Stdout,
                child
                    .stdout
                    .take()
                    .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ),
            (
                Stream::Stderr,
                child
                    .stderr
                    .take()
                    .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            ),
        ] {
            let Some(reader) = reader else { continue };
            let shared = self.shared.clone();
            let (service, idx) = (self.service.clone(), self.idx);
            captures.push(tokio::spawn(async move {
                crate::logs::capture::read_line_batches(reader, |batch| {
                    let lines = batch.into_iter().map(|(l, p)| (idx, l, p));
                    if let Err(e) = shared.logs.append_many(&service, stream, lines) {
                        shared.warn_once(format!("cannot store logs: {e}"));
                    }
                })
                .await;
            }));
        }
        let has_health = self.spec.healthcheck.is_some();
        let memory_limit = self
            .spec
            .deploy
            .resources
            .limits
            .memory
            .filter(|_| launch.cgroup.is_some());
        let cpu_limit = self
            .spec
            .deploy
            .resources
            .limits
            .cpus
            .filter(|_| launch.cgroup.is_some());
        self.set(|s| {
            s.memory_limit_bytes = memory_limit;
            s.cpu_limit = cpu_limit;
            s.cpu_seconds_total = Some(0.0);
            s.cpu_sampled_ms = Some(crate::events::now_ms());
            s.pid = Some(pid);
            s.state = "running".into();
            s.health = if has_health {
                "starting".into()
            } else {
                "none".into()
            };
            s.started_ms = Some(crate::events::now_ms());
        });
        self.event("started", format!("pid {pid}, port {port}"));
        let (htx, mut hrx) = mpsc::channel(4);
        let health_task = self
            .spec
            .healthcheck
            .clone()
            .map(|hc| tokio::spawn(health::watch(hc, port, launch.env.clone(), htx)));
        let mut sampler = Sampler::new(pid, launch.cgroup.clone());
        // The first sample comes after one period, so CPU % has a span to measure.
        let mut tick = tokio::time::interval_at(Instant::now() + SAMPLE_EVERY, SAMPLE_EVERY);
        let mut unhealthy = false;
        let mut stopped = false;
        let status = loop {
            tokio::select! {
                st = child.wait() => break st.ok(),
                Some(h) = hrx.recv() => match h {
                    Health::Healthy => {
                        self.set(|s| s.health = "healthy".into());
                        self.event("healthy", "health check passed");
                    }
                    Health::Unhealthy(reason) => {
                        self.set(|s| s.health = "unhealthy".into());
                        self.event("unhealthy", reason);
                        if self.spec.deploy.restart_policy.condition != RestartCondition::None {
                            unhealthy = true;
                            break self.stop_child(&mut child, pid).await;
                        }
                    }
                },
                _ = ctl.recv() => {
                    stopped = true;
                    self.set(|s| s.state = "stopping".into());
                    self.event("stopping", format!("sending {} (grace period {})", self.spec.stop_signal, self.spec.stop_grace_period));
                    break self.stop_child(&mut child, pid).await;
                }
                _ = tick.tick() => {
                    let x = sampler.sample();
                    self.set(|s| {
                        s.cpu_percent = x.cpu_percent;
                        s.cpu_seconds_total = x.cpu_seconds;
                        s.cpu_sampled_ms = Some(crate::events::now_ms());
                        s.memory_bytes = x.working_set;
                        s.memory_rss_bytes = x.rss;
                    });
                }
            }
        };
        if let Some(t) = health_task {
            t.abort();
        }
        // Read before the cgroup is removed with the leftovers.
        let oom = launch
            .cgroup
            .as_ref()
            .is_some_and(|c| c.oom_kills() > oom_before);
        process::kill_leftovers(pid, launch.cgroup.as_ref()).await;
        for c in captures {
            let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
        }
        self.shared
            .state
            .lock()
            .unwrap()
            .remove(&self.service, self.idx, pid);
        self.shared.release_port(port);
        use std::os::unix::process::ExitStatusExt;
        let code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        if stopped {
            self.event("stopped", describe_exit(code, signal, false));
            return Outcome::Stopped;
        }
        if code != Some(0) && !self.spec.ports.is_empty() {
            self.hint_port_taken(started_ns, port);
        }
        Outcome::Exited {
            code,
            signal,
            uptime: started.elapsed(),
            unhealthy,
            oom,
        }
    }

    /// A program that failed with "address already in use" while capstan's
    /// proxy publishes the service's ports most likely listens on the published
    /// port itself: say what to do instead.
    fn hint_port_taken(&self, since_ns: i64, port: u16) {
        let q = crate::logs::LogQuery {
            services: vec![self.service.clone()],
            replica: Some(self.idx),
            since_ns: Some(since_ns),
            tail: Some(20),
        };
        let lines = tokio::task::block_in_place(|| self.shared.logs.query(&q));
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
                "the program could not listen: its address is in use. capstan's proxy publishes port {} and gives each replica its own port in $PORT ({port} for this one): make the program listen on $PORT",
                published.join(", ")
            ),
        );
    }

    /// Stop signal to the group, the grace period, then SIGKILL.
    async fn stop_child(
        &self,
        child: &mut tokio::process::Child,
        pgid: i32,
    ) -> Option<std::process::ExitStatus> {
        let sig = process::signal_by_name(&self.spec.stop_signal);
        process::signal_group(pgid, sig);
        match tokio::time::timeout(self.spec.stop_grace_period.0, child.wait()).await {
            Ok(st) => st.ok(),
            Err(_) => {
                self.event(
                    "killing",
                    format!(
                        "did not exit within {}; sending SIGKILL",
                        self.spec.stop_grace_period
                    ),
                );
                process::signal_group(pgid, Signal::SIGKILL);
                child.wait().await.ok()
            }
        }
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

/// How often a replica's CPU and memory are read: often enough that the
/// autoscaler sees a load step within a second.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

struct Sample {
    cpu_percent: Option<f64>,
    cpu_seconds: Option<f64>,
    working_set: Option<u64>,
    rss: Option<u64>,
}

/// CPU % and memory of a replica, from its cgroup or else from /proc.
struct Sampler {
    pid: i32,
    cgroup: Option<super::cgroup::ReplicaCgroup>,
    last: Option<(Instant, u64)>,
}

impl Sampler {
    fn new(pid: i32, cgroup: Option<super::cgroup::ReplicaCgroup>) -> Self {
        Sampler {
            pid,
            cgroup,
            // A fresh process (and cgroup) has used no CPU yet.
            last: Some((Instant::now(), 0)),
        }
    }

    fn sample(&mut self) -> Sample {
        let stat = process::proc_stat(self.pid);
        let cpu_ns = self
            .cgroup
            .as_ref()
            .and_then(|c| c.cpu_ns())
            .or_else(|| stat.map(|s| s.cpu_ticks * (1_000_000_000 / process::TICKS_PER_SEC)));
        let mem = self
            .cgroup
            .as_ref()
            .and_then(|c| c.memory_bytes())
            .or_else(|| stat.map(|s| s.rss_pages * process::page_size()));
        let now = Instant::now();
        let pct = match (cpu_ns, self.last) {
            (Some(c), Some((t, prev))) => {
                let wall = now.duration_since(t).as_nanos() as f64;
                (wall > 0.0).then(|| (c.saturating_sub(prev)) as f64 / wall * 100.0)
            }
            _ => None,
        };
        if let Some(c) = cpu_ns {
            self.last = Some((now, c));
        }
        let rss = self
            .cgroup
            .as_ref()
            .and_then(|c| c.rss_bytes())
            .or_else(|| stat.map(|s| s.rss_pages * process::page_size()));
        Sample {
            cpu_percent: pct,
            cpu_seconds: cpu_ns.map(|c| c as f64 / 1e9),
            working_set: mem,
            rss,
        }
    }
}

/// Points OpenTelemetry SDKs at capstan's OTLP/HTTP endpoints (unless the
/// service's environment says otherwise): the endpoint, the protocol, the
/// service name, and the replica as a resource attribute, which puts its OTLP
/// logs in the replica's streams.
fn otel_env(env: &mut BTreeMap<String, String>, shared: &Shared, service: &str, idx: u32) {
    if let Some(addr) = shared.api_addr.lock().unwrap().clone()
        && let Ok(a) = addr.parse::<std::net::SocketAddr>()
    {
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
