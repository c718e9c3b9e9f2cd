//! The process driver: spawns a replica's program in its own process group (and
//! cgroup) and stops the whole group.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::cgroup::ReplicaCgroup;

/// What to run for one replica.
#[derive(Debug, Clone)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub cgroup: Option<ReplicaCgroup>,
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

pub fn spawn(launch: &Launch) -> std::io::Result<tokio::process::Child> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(EXEC_HELPER);
    if let Some(m) = USER_UMASK.get() {
        cmd.arg("--umask").arg(format!("{m:o}"));
    }
    if let Some(cg) = &launch.cgroup {
        for d in &cg.dirs {
            cmd.arg("--cgroup").arg(d);
        }
    }
    cmd.arg("--").args(&launch.argv);
    cmd.envs(&launch.env);
    if let Some(dir) = &launch.working_dir {
        cmd.current_dir(dir);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.process_group(0);
    cmd.kill_on_drop(false);
    cmd.spawn()
}

/// Body of the `__exec` helper: join the cgroups, then replace this process with
/// the program. Returns only on failure.
pub fn exec_helper(cgroups: &[PathBuf], umask: Option<&str>, argv: &[String]) -> i32 {
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
    let Some((prog, args)) = argv.split_first() else {
        eprintln!("capstan: nothing to run");
        return 127;
    };
    let err = std::process::Command::new(prog).args(args).exec();
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
pub fn signal_group(pgid: i32, sig: Signal) -> bool {
    signal::killpg(Pid::from_raw(pgid), sig).is_ok()
}

/// Pids whose process group is `pgid`, from /proc.
pub fn group_members(pgid: i32) -> Vec<i32> {
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
