//! The process driver: spawns a replica's program in its own process group (and
//! cgroup) and stops the whole group.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::cgroup::{Cgroups, ReplicaCgroup};
use super::{BoxFuture, Driver, Exit, Launch, Output, Prober, Record, Replica};
use crate::events::EventLog;
use crate::logs::Stream;
use crate::spec::Limits;
use crate::state::Sample;

/// What the process driver runs: the program, its environment and cgroup.
#[derive(Debug, Clone)]
struct Spawn {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    working_dir: Option<PathBuf>,
    cgroup: Option<ReplicaCgroup>,
}

/// The hidden subcommand that joins the cgroup and then execs the program, so that
/// limits apply from the program's first instruction.
pub const EXEC_HELPER: &str = "__exec";

/// The umask capstan was started with. The daemon creates its own files under
/// 077 (its data is the user's alone); replicas run with this one again.
pub static USER_UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Makes every file and directory the daemon creates from now on private
/// (0600/0700), remembering the user's umask for the replicas.
pub fn private_umask() {
    use nix::sys::stat::{Mode, umask};
    let user = umask(Mode::from_bits_truncate(0o077));
    let _ = USER_UMASK.set(user.bits());
}

/// The `__exec` helper's command line, up to the program: its umask and cgroups.
fn helper(cgroup: Option<&ReplicaCgroup>) -> std::io::Result<tokio::process::Command> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(EXEC_HELPER);
    if let Some(m) = USER_UMASK.get() {
        cmd.arg("--umask").arg(format!("{m:o}"));
    }
    if let Some(cg) = cgroup {
        for d in &cg.dirs {
            cmd.arg("--cgroup").arg(d);
        }
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    cmd.kill_on_drop(false);
    Ok(cmd)
}

fn spawn(launch: &Spawn) -> std::io::Result<tokio::process::Child> {
    let mut cmd = helper(launch.cgroup.as_ref())?;
    cmd.arg("--").args(&launch.argv);
    cmd.envs(&launch.env);
    if let Some(dir) = &launch.working_dir {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::null());
    cmd.spawn()
}

/// A helper started ahead, in a cgroup of its own with its service's limits,
/// waiting on its stdin for the program ([`Go`]).
struct Parked {
    child: tokio::process::Child,
    cgroup: ReplicaCgroup,
    revision: crate::state::Revision,
    limits: Limits,
}

/// Replicas started ahead for services that scale to zero (`autoscale.min:
/// 0`): once one of their replicas stops, a helper is spawned into a fresh
/// cgroup with the service's limits and waits there. Joining a cgroup is the
/// slow part of a start on cgroup v1 (the first join after a quiet spell waits
/// for an RCU grace period, 10–16 ms here), so the request that wakes the
/// service only sends the program to a process that is already in place.
/// At most one helper per service; dropped on `down` and when the daemon goes
/// (their stdin closes).
struct Warm {
    stack_id: String,
    cgroups: Cgroups,
    parked: Mutex<BTreeMap<String, Parked>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Warm {
    /// Parks a helper for `service` unless one is there already.
    fn park(&self, service: &str, revision: crate::state::Revision, limits: &Limits) {
        let mut parked = self.parked.lock().unwrap();
        if let Some(p) = parked.get_mut(service) {
            if p.revision == revision
                && &p.limits == limits
                && p.child.try_wait().ok().flatten().is_none()
            {
                return;
            }
            if let Some(old) = parked.remove(service) {
                tokio::spawn(discard(old));
            }
        }
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(cgroup) = self
            .cgroups
            .create(&format!("{service}-{revision}-w{n}"), limits)
        else {
            return;
        };
        let child = helper(Some(&cgroup)).and_then(|mut cmd| {
            cmd.arg("--park")
                .env("CAPSTAN_STACK", &self.stack_id)
                .stdin(Stdio::piped())
                .spawn()
        });
        match child {
            Ok(child) => {
                parked.insert(
                    service.to_owned(),
                    Parked {
                        child,
                        cgroup,
                        revision,
                        limits: limits.clone(),
                    },
                );
            }
            Err(_) => cgroup.remove(),
        }
    }

    /// The parked helper for this launch, told to run it: its child and cgroup.
    async fn take(
        &self,
        launch: &Spawn,
        service: &str,
        revision: crate::state::Revision,
        limits: &Limits,
    ) -> Option<(tokio::process::Child, ReplicaCgroup)> {
        let mut p = self.parked.lock().unwrap().remove(service)?;
        if p.revision != revision
            || &p.limits != limits
            || p.child.try_wait().ok().flatten().is_some()
        {
            tokio::spawn(discard(p));
            return None;
        }
        let go = Go {
            argv: launch.argv.clone(),
            env: launch.env.clone(),
            dir: launch.working_dir.clone(),
        };
        let mut line = serde_json::to_vec(&go).ok()?;
        line.push(b'\n');
        let mut stdin = p.child.stdin.take()?;
        use tokio::io::AsyncWriteExt;
        if stdin.write_all(&line).await.is_err() {
            tokio::spawn(discard(p));
            return None;
        }
        drop(stdin);
        Some((p.child, p.cgroup))
    }

    async fn discard_all(&self) {
        let all = std::mem::take(&mut *self.parked.lock().unwrap());
        for p in all.into_values() {
            discard(p).await;
        }
    }
}

/// Ends a parked helper (closing its stdin is enough; a kill if it lingers)
/// and removes its cgroup.
async fn discard(mut p: Parked) {
    drop(p.child.stdin.take());
    if tokio::time::timeout(Duration::from_secs(2), p.child.wait())
        .await
        .is_err()
    {
        let _ = p.child.kill().await;
    }
    kill_leftovers(0, Some(&p.cgroup)).await;
}

/// What a parked helper is told to run, as one JSON line on its stdin.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Go {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    dir: Option<PathBuf>,
}

/// Body of the `__exec` helper: join the cgroups, then replace this process with
/// the program. Parked (`park`), it waits between the two for [`Go`] on its
/// stdin and exits quietly when stdin closes first (the daemon dropped it or
/// is gone). Returns only on failure.
pub fn exec_helper(cgroups: &[PathBuf], park: bool, umask: Option<&str>, argv: &[String]) -> i32 {
    use std::os::unix::process::CommandExt;
    if let Some(m) = umask.and_then(|m| u32::from_str_radix(m, 8).ok()) {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(m));
    }
    let pid = std::process::id().to_string();
    for d in cgroups {
        if let Err(e) = std::fs::write(d.join("cgroup.procs"), &pid) {
            eprintln!("capstan: cannot join cgroup {}: {e}", d.display());
            return 126;
        }
    }
    let mut cmd;
    if park {
        let mut line = String::new();
        // At most one line; a daemon gone (EOF) or a broken line ends it.
        use std::io::{BufRead, Read};
        let stdin = std::io::stdin();
        if stdin.lock().take(1 << 20).read_line(&mut line).unwrap_or(0) == 0 {
            // Dropped, or the daemon is gone: leave the cgroup, so it can go too.
            for d in cgroups {
                if let Some(parent) = d.parent() {
                    let _ = std::fs::write(parent.join("cgroup.procs"), &pid);
                }
                let _ = std::fs::remove_dir(d);
            }
            return 0;
        }
        let go: Go = match serde_json::from_str(&line) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("capstan: bad start request: {e}");
                return 126;
            }
        };
        // The program gets no stdin, as a replica started directly.
        let null = std::fs::File::open("/dev/null").map(std::os::fd::OwnedFd::from);
        if let Err(e) = null.and_then(|n| nix::unistd::dup2_stdin(&n).map_err(std::io::Error::from))
        {
            eprintln!("capstan: cannot close stdin: {e}");
            return 126;
        }
        let Some((prog, args)) = go.argv.split_first() else {
            eprintln!("capstan: nothing to run");
            return 127;
        };
        cmd = std::process::Command::new(prog);
        cmd.args(args).envs(&go.env);
        if let Some(d) = &go.dir {
            cmd.current_dir(d);
        }
    } else {
        let Some((prog, args)) = argv.split_first() else {
            eprintln!("capstan: nothing to run");
            return 127;
        };
        cmd = std::process::Command::new(prog);
        cmd.args(args);
    }
    let prog = cmd.get_program().to_owned();
    let err = cmd.exec();
    eprintln!("capstan: cannot run {prog:?}: {err}");
    if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

pub fn signal_by_name(name: &str) -> Signal {
    name.parse::<Signal>().unwrap_or(Signal::SIGTERM)
}

/// Sends a signal to a whole process group.
/// Never a group id of 0 or less: those would mean the daemon's own group or
/// every process it may signal.
pub fn signal_group(pgid: i32, sig: Signal) -> bool {
    pgid > 0 && signal::killpg(Pid::from_raw(pgid), sig).is_ok()
}

/// Pids whose process group is `pgid`, from /proc.
pub fn group_members(pgid: i32) -> Vec<i32> {
    if pgid <= 0 {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|s| s.pgrp == pgid && s.state != 'Z'))
        .collect()
}

/// The fields of /proc/PID/stat capstan uses.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    pub state: char,
    pub pgrp: i32,
    /// utime + stime in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot in clock ticks: with the pid, identifies a process.
    pub start_ticks: u64,
    pub rss_pages: u64,
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields from 3 on (state is field 3), so index = field - 3.
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
        rss_pages: f.get(21)?.parse().ok()?,
    })
}

/// Live processes (not this one) whose environment has `name=value`.
pub fn pids_with_env(name: &str, value: &str) -> Vec<i32> {
    let needle = format!("{name}={value}");
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .filter(|&pid| proc_stat(pid).is_some_and(|s| s.state != 'Z'))
        .collect()
}

/// True while the process with this pid and start time exists and is not a zombie.
pub fn alive(pid: i32, start_ticks: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_ticks == start_ticks && s.state != 'Z')
}

/// Processes of a replica still alive: its process group and its cgroup.
fn members(pgid: i32, cgroup: Option<&ReplicaCgroup>) -> Vec<i32> {
    let mut m = group_members(pgid);
    if let Some(cg) = cgroup {
        m.extend(cg.pids());
    }
    m.sort_unstable();
    m.dedup();
    m
}

/// Stops a process group that is not our child (left by a previous daemon): the
/// stop signal, up to `grace` for it to exit, then SIGKILL for what remains.
pub async fn stop_foreign(pgid: i32, cgroup: Option<&ReplicaCgroup>, sig: Signal, grace: Duration) {
    signal_group(pgid, sig);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !members(pgid, cgroup).is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill_leftovers(pgid, cgroup).await;
}

/// Kills whatever is left of a replica after its main process exited: the rest
/// of its process group and of its cgroup (daemonized children included), then
/// removes the cgroup.
pub async fn kill_leftovers(pgid: i32, cgroup: Option<&ReplicaCgroup>) {
    for _ in 0..100 {
        let left = members(pgid, cgroup);
        if left.is_empty() {
            break;
        }
        signal_group(pgid, Signal::SIGKILL);
        for pid in left {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(cg) = cgroup {
        for _ in 0..50 {
            cg.remove();
            if cg.dirs.iter().all(|d| !d.exists()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Clock ticks per second, for /proc CPU times (USER_HZ is 100 on Linux).
pub const TICKS_PER_SEC: u64 = 100;

pub fn page_size() -> u64 {
    4096
}

/// Runs replicas as process groups on this machine, each in its own cgroup
/// where cgroups are writable, listening on a loopback port of its own.
pub struct ProcessDriver {
    /// Identifies this stack's processes (`CAPSTAN_STACK` in their environment).
    stack_id: String,
    cgroups: Option<Cgroups>,
    events: Arc<EventLog>,
    ports: Arc<Mutex<BTreeSet<u16>>>,
    /// With cgroups: replicas started ahead for services that scale to zero.
    warm: Option<Arc<Warm>>,
}

impl ProcessDriver {
    pub fn new(stack_id: &str, cgroups: Option<Cgroups>, events: Arc<EventLog>) -> ProcessDriver {
        ProcessDriver {
            stack_id: stack_id.to_owned(),
            warm: cgroups.clone().map(|cgroups| {
                Arc::new(Warm {
                    stack_id: stack_id.to_owned(),
                    cgroups,
                    parked: Mutex::default(),
                    seq: Default::default(),
                })
            }),
            cgroups,
            events,
            ports: Arc::default(),
        }
    }

    /// A free loopback port from `range`, not given to another replica.
    fn alloc_port(&self, [lo, hi]: [u16; 2]) -> u16 {
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        let seed = (crate::state::clock::unix_ns() as u64
            ^ u64::from(std::process::id()).rotate_left(17)) as u32;
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

    async fn start_process(&self, launch: Launch) -> Result<Box<dyn Replica>, String> {
        let port = self.alloc_port(launch.port_range);
        let release = PortGuard {
            ports: self.ports.clone(),
            port,
        };
        let mut env = launch.env;
        env.insert("PORT".into(), port.to_string());
        env.insert("CAPSTAN_STACK".into(), self.stack_id.clone());
        let mut spawn_args = Spawn {
            argv: launch.argv,
            env,
            working_dir: launch.working_dir,
            cgroup: None,
        };
        let (service, revision) = (&launch.id.service, launch.id.revision);
        let parked = match &self.warm {
            Some(w) => w.take(&spawn_args, service, revision, &launch.limits).await,
            None => None,
        };
        let mut child = match parked {
            Some((child, cgroup)) => {
                spawn_args.cgroup = Some(cgroup);
                child
            }
            None => {
                let name = format!("{service}-{revision}-{}", launch.id.index);
                spawn_args.cgroup = self.cgroups.as_ref().and_then(|cg| {
                    cg.create(&name, &launch.limits)
                        .map_err(|e| {
                            self.events.warn_once(format!(
                                "cannot create cgroup, running without limits: {e}"
                            ))
                        })
                        .ok()
                });
                spawn(&spawn_args).map_err(|e| {
                    if let Some(cg) = &spawn_args.cgroup {
                        cg.remove();
                    }
                    e.to_string()
                })?
            }
        };
        let scales_to_zero = launch
            .service
            .x
            .autoscale
            .as_ref()
            .is_some_and(|a| a.min == 0);
        let warm = self
            .warm
            .clone()
            .filter(|_| scales_to_zero)
            .map(|pool| WarmTicket {
                pool,
                service: service.clone(),
                revision,
                limits: launch.limits.clone(),
            });
        // Without a pid there is no process group to signal (and 0 would mean
        // the daemon's own).
        let Some(pid) = child.id().map(|p| p as i32).filter(|p| *p > 0) else {
            let _ = child.kill().await;
            kill_leftovers(0, spawn_args.cgroup.as_ref()).await;
            return Err("the process ended before its pid was known".into());
        };
        let start_ticks = proc_stat(pid).map(|s| s.start_ticks).unwrap_or(0);
        let oom_before = spawn_args.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let limits = &launch.limits;
        let enforced = if spawn_args.cgroup.is_some() {
            (limits.memory, limits.cpus)
        } else {
            (None, None)
        };
        Ok(Box::new(ProcessReplica {
            record: Record {
                service: launch.id.service.clone(),
                replica: launch.id.index,
                revision: launch.id.revision,
                pid,
                start_ticks,
                cgroup: spawn_args.cgroup.clone(),
                stop_signal: launch.stop_signal,
                grace_ms: launch.grace.as_millis() as u64,
                container: None,
            },
            sampler: Sampler::new(pid, spawn_args.cgroup.clone()),
            child,
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            cgroup: spawn_args.cgroup,
            env: Arc::new(spawn_args.env),
            oom_before,
            enforced,
            exit: None,
            warm,
            _port: release,
        }))
    }

    async fn recover_all(&self, records: Vec<Record>) {
        let mut stops = Vec::new();
        for r in records {
            if !alive(r.pid, r.start_ticks) {
                if let Some(cg) = &r.cgroup {
                    kill_leftovers(r.pid, Some(cg)).await;
                }
                continue;
            }
            self.events.emit(
                &r.service,
                Some(r.replica),
                "stopping",
                format!(
                    "found pid {} left by a previous daemon; stopping it before starting afresh",
                    r.pid
                ),
            );
            stops.push(tokio::spawn(async move {
                let sig = signal_by_name(&r.stop_signal);
                stop_foreign(
                    r.pid,
                    r.cgroup.as_ref(),
                    sig,
                    Duration::from_millis(r.grace_ms),
                )
                .await;
            }));
        }
        for s in stops {
            let _ = s.await;
        }
        // A daemon killed between spawning a replica and recording it leaves a
        // process no record names: find those by the stack id in their environment.
        let mut groups: BTreeSet<i32> = BTreeSet::new();
        for pid in pids_with_env("CAPSTAN_STACK", &self.stack_id) {
            if let Some(st) = proc_stat(pid) {
                groups.insert(st.pgrp);
            }
        }
        let mut stops = Vec::new();
        for pgid in groups {
            self.events.emit(
                "capstan",
                None,
                "stopping",
                format!(
                    "found process group {pgid} of this stack left by a previous daemon; stopping it"
                ),
            );
            stops.push(tokio::spawn(stop_foreign(
                pgid,
                None,
                Signal::SIGTERM,
                Duration::from_secs(10),
            )));
        }
        for s in stops {
            let _ = s.await;
        }
    }
}

impl Driver for ProcessDriver {
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<Box<dyn Replica>, String>> {
        Box::pin(self.start_process(launch))
    }

    fn down(&self, _volumes: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(w) = &self.warm {
                w.discard_all().await;
            }
        })
    }

    /// Processes are not adopted (their output pipes died with the daemon):
    /// what was left is stopped.
    fn recover(
        &self,
        records: Vec<Record>,
        _wanted: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Vec<super::Adopted>> {
        Box::pin(async move {
            self.recover_all(records).await;
            Vec::new()
        })
    }
}

/// Gives a replica's port back when the replica is dropped.
struct PortGuard {
    ports: Arc<Mutex<BTreeSet<u16>>>,
    port: u16,
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        self.ports.lock().unwrap().remove(&self.port);
    }
}

struct ProcessReplica {
    child: tokio::process::Child,
    pid: i32,
    addr: SocketAddr,
    cgroup: Option<ReplicaCgroup>,
    env: Arc<BTreeMap<String, String>>,
    record: Record,
    sampler: Sampler,
    oom_before: u64,
    enforced: (Option<u64>, Option<f64>),
    exit: Option<Exit>,
    /// Where to park the next start of its service once it has stopped.
    warm: Option<WarmTicket>,
    _port: PortGuard,
}

struct WarmTicket {
    pool: Arc<Warm>,
    service: String,
    revision: crate::state::Revision,
    limits: Limits,
}

impl ProcessReplica {
    fn exit_of(&self, status: Option<std::process::ExitStatus>) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        // Read before the cgroup is removed with the leftovers.
        let oom_killed = self
            .cgroup
            .as_ref()
            .is_some_and(|c| c.oom_kills() > self.oom_before);
        Exit {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            oom_killed,
        }
    }

    async fn wait_exit(&mut self) -> Exit {
        if let Some(e) = self.exit {
            return e;
        }
        let st = self.child.wait().await.ok();
        let e = self.exit_of(st);
        self.exit = Some(e);
        e
    }

    async fn stop_group(&mut self, sig: &str, grace: Duration) -> (Exit, bool) {
        if let Some(e) = self.exit {
            return (e, false);
        }
        signal_group(self.pid, signal_by_name(sig));
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(st) => {
                let e = self.exit_of(st.ok());
                self.exit = Some(e);
                (e, false)
            }
            Err(_) => {
                signal_group(self.pid, Signal::SIGKILL);
                (self.wait_exit().await, true)
            }
        }
    }
}

impl Replica for ProcessReplica {
    fn pid(&self) -> Option<i32> {
        Some(self.pid)
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn record(&self) -> Record {
        self.record.clone()
    }

    fn enforced_limits(&self) -> (Option<u64>, Option<f64>) {
        self.enforced
    }

    fn take_output(&mut self) -> Vec<(Stream, Output)> {
        let mut out: Vec<(Stream, Output)> = Vec::new();
        if let Some(r) = self.child.stdout.take() {
            out.push((Stream::Stdout, Box::new(r)));
        }
        if let Some(r) = self.child.stderr.take() {
            out.push((Stream::Stderr, Box::new(r)));
        }
        out
    }

    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(self.wait_exit())
    }

    fn stop(&mut self, signal: &str, grace: Duration) -> BoxFuture<'_, (Exit, bool)> {
        let signal = signal.to_owned();
        Box::pin(async move { self.stop_group(&signal, grace).await })
    }

    fn sample(&mut self) -> Sample {
        self.sampler.sample()
    }

    fn prober(&self) -> Prober {
        let addr = self.addr;
        let env = self.env.clone();
        Arc::new(move |test, timeout| {
            let env = env.clone();
            Box::pin(
                async move { crate::supervisor::health::probe(&test, addr, &env, timeout).await },
            )
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            kill_leftovers(self.pid, self.cgroup.as_ref()).await;
            if let Some(t) = &self.warm {
                t.pool.park(&t.service, t.revision, &t.limits);
            }
        })
    }
}

/// CPU % and memory of a replica, from its cgroup or else from /proc.
struct Sampler {
    pid: i32,
    cgroup: Option<ReplicaCgroup>,
    last: Option<(Instant, u64)>,
}

impl Sampler {
    fn new(pid: i32, cgroup: Option<ReplicaCgroup>) -> Self {
        Sampler {
            pid,
            cgroup,
            // A fresh process (and cgroup) has used no CPU yet.
            last: Some((Instant::now(), 0)),
        }
    }

    fn sample(&mut self) -> Sample {
        let stat = proc_stat(self.pid);
        let cpu_ns = self
            .cgroup
            .as_ref()
            .and_then(|c| c.cpu_ns())
            .or_else(|| stat.map(|s| s.cpu_ticks * (1_000_000_000 / TICKS_PER_SEC)));
        let mem = self
            .cgroup
            .as_ref()
            .and_then(|c| c.memory_bytes())
            .or_else(|| stat.map(|s| s.rss_pages * page_size()));
        let now = Instant::now();
        let pct = match (cpu_ns, self.last) {
            (Some(c), Some(last)) => super::cpu_percent(last, now, c),
            _ => None,
        };
        if let Some(c) = cpu_ns {
            self.last = Some((now, c));
        }
        let rss = self
            .cgroup
            .as_ref()
            .and_then(|c| c.rss_bytes())
            .or_else(|| stat.map(|s| s.rss_pages * page_size()));
        Sample {
            cpu_percent: pct,
            cpu_seconds: cpu_ns.map(|c| c as f64 / 1e9),
            working_set: mem,
            rss,
            at_ms: crate::state::clock::unix_ms(),
        }
    }
}
