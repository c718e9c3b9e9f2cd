//! A thin cgroupfs layer: one cgroup per replica under a capstan root, limits
//! written before the replica's program is exec'd, CPU and memory read back.
//!
//! Supports cgroup v2 (unified, with the memory controller) and v1 (one mount per
//! controller). Where neither is writable, [`Cgroups::detect`] returns `None` and
//! the supervisor falls back to /proc accounting without limits.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::spec::Limits;

#[derive(Debug, Clone)]
enum Layout {
    V2 {
        root: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
}

/// The cgroup hierarchy capstan places replicas in.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    /// Path of capstan's subtree relative to each controller's mount, e.g. `capstan/hello-1a2b`.
    base: PathBuf,
}

/// The cgroup (one directory per v1 controller, one in v2) of one replica.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaCgroup {
    pub v2: bool,
    pub dirs: Vec<PathBuf>,
}

/// Mount points of cgroup filesystems, from /proc/self/mountinfo.
fn mounts() -> Vec<(String, PathBuf, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default();
        let _source = r.next();
        let opts = r.next().unwrap_or_default();
        if fstype == "cgroup" || fstype == "cgroup2" {
            out.push((
                fstype.to_owned(),
                PathBuf::from(mount_point),
                opts.to_owned(),
            ));
        }
    }
    out
}

fn writable_dir(p: &Path) -> bool {
    let probe = p.join(format!("capstan-probe-{}", std::process::id()));
    match fs::create_dir(&probe) {
        Ok(()) => {
            let _ = fs::remove_dir(&probe);
            true
        }
        Err(e) => e.kind() == io::ErrorKind::AlreadyExists,
    }
}

impl Cgroups {
    /// Finds a writable hierarchy with a memory controller, or explains why not.
    pub fn detect(stack_id: &str) -> Result<Cgroups, String> {
        let base = PathBuf::from("capstan").join(stack_id);
        let ms = mounts();
        if let Some((_, root, _)) = ms.iter().find(|(t, _, _)| t == "cgroup2") {
            let controllers =
                fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") && writable_dir(root) {
                return Ok(Cgroups {
                    layout: Layout::V2 { root: root.clone() },
                    base,
                });
            }
        }
        let v1 = |name: &str| {
            ms.iter()
                .find(|(t, _, opts)| t == "cgroup" && opts.split(',').any(|o| o == name))
                .map(|(_, p, _)| p.clone())
        };
        match v1("memory") {
            Some(memory) if writable_dir(&memory) => Ok(Cgroups {
                layout: Layout::V1 {
                    memory,
                    cpu: v1("cpu"),
                    cpuacct: v1("cpuacct"),
                    pids: v1("pids"),
                },
                base,
            }),
            Some(memory) => Err(format!(
                "cgroup v1 memory hierarchy {} is not writable",
                memory.display()
            )),
            None => Err("no writable cgroup hierarchy with a memory controller".into()),
        }
    }

    pub fn version(&self) -> &'static str {
        match self.layout {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }

    /// Removes the stack's own directories once its replicas' cgroups are gone.
    pub fn remove_base(&self) {
        let roots: Vec<&PathBuf> = match &self.layout {
            Layout::V2 { root } => vec![root],
            Layout::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => std::iter::once(memory)
                .chain(cpu)
                .chain(cpuacct)
                .chain(pids)
                .collect(),
        };
        for r in roots {
            let _ = fs::remove_dir(r.join(&self.base));
        }
    }

    /// Creates (or reuses) the cgroup of one replica and writes its limits.
    pub fn create(&self, name: &str, limits: &Limits) -> io::Result<ReplicaCgroup> {
        let rel = self.base.join(name);
        match &self.layout {
            Layout::V2 { root } => {
                // Each ancestor must delegate the controllers to its children.
                let mut dir = root.clone();
                for part in self.base.components() {
                    let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
                    dir.push(part);
                    create_dir(&dir)?;
                }
                let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
                let dir = root.join(&rel);
                create_dir(&dir)?;
                write(
                    &dir,
                    "memory.max",
                    &limits.memory.map_or("max".into(), |m| m.to_string()),
                )?;
                if limits.memory.is_some() {
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                }
                let cpu = limits.cpus.map_or("max 100000".into(), |c| {
                    format!("{} 100000", (c * 100_000.0).round() as u64)
                });
                write(&dir, "cpu.max", &cpu)?;
                write(
                    &dir,
                    "pids.max",
                    &limits.pids.map_or("max".into(), |p| p.to_string()),
                )?;
                Ok(ReplicaCgroup {
                    v2: true,
                    dirs: vec![dir],
                })
            }
            Layout::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => {
                let mut dirs = Vec::new();
                let mdir = memory.join(&rel);
                create_dir(&mdir)?;
                let mem = limits.memory.map_or("-1".into(), |m| m.to_string());
                // memsw must stay >= the memory limit: raise it first, set both, lower it last.
                let _ = fs::write(mdir.join("memory.memsw.limit_in_bytes"), "-1");
                write(&mdir, "memory.limit_in_bytes", &mem)?;
                let _ = fs::write(mdir.join("memory.memsw.limit_in_bytes"), &mem);
                dirs.push(mdir);
                if let Some(cpu) = cpu {
                    let d = cpu.join(&rel);
                    create_dir(&d)?;
                    write(&d, "cpu.cfs_period_us", "100000")?;
                    let quota = limits.cpus.map_or("-1".into(), |c| {
                        ((c * 100_000.0).round() as i64).to_string()
                    });
                    write(&d, "cpu.cfs_quota_us", &quota)?;
                    dirs.push(d);
                }
                if let Some(acct) = cpuacct.as_ref().filter(|a| Some(*a) != cpu.as_ref()) {
                    let d = acct.join(&rel);
                    create_dir(&d)?;
                    dirs.push(d);
                }
                if let Some(pids) = pids {
                    let d = pids.join(&rel);
                    create_dir(&d)?;
                    write(
                        &d,
                        "pids.max",
                        &limits.pids.map_or("max".into(), |p| p.to_string()),
                    )?;
                    dirs.push(d);
                }
                Ok(ReplicaCgroup { v2: false, dirs })
            }
        }
    }
}

fn create_dir(p: &Path) -> io::Result<()> {
    match fs::create_dir_all(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    fs::write(dir.join(file), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", dir.join(file).display()),
        )
    })
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn keyed(p: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(p).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl ReplicaCgroup {
    fn find(&self, file: &str) -> Option<PathBuf> {
        self.dirs.iter().map(|d| d.join(file)).find(|p| p.exists())
    }

    /// Moves a process into every directory of this cgroup.
    pub fn attach(&self, pid: u32) -> io::Result<()> {
        for d in &self.dirs {
            write(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Total CPU time used, in nanoseconds.
    pub fn cpu_ns(&self) -> Option<u64> {
        if self.v2 {
            keyed(&self.find("cpu.stat")?, "usage_usec").map(|u| u * 1000)
        } else {
            read_u64(&self.find("cpuacct.usage")?)
        }
    }

    /// Memory in use, in bytes (working set: usage minus inactive file cache).
    pub fn memory_bytes(&self) -> Option<u64> {
        let (usage, stat, inactive) = if self.v2 {
            ("memory.current", "memory.stat", "inactive_file")
        } else {
            (
                "memory.usage_in_bytes",
                "memory.stat",
                "total_inactive_file",
            )
        };
        let used = read_u64(&self.find(usage)?)?;
        let inactive = self
            .find(stat)
            .and_then(|p| keyed(&p, inactive))
            .unwrap_or(0);
        Some(used.saturating_sub(inactive))
    }

    /// Anonymous memory (RSS) in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let (stat, key) = if self.v2 {
            ("memory.stat", "anon")
        } else {
            ("memory.stat", "total_rss")
        };
        keyed(&self.find(stat)?, key)
    }

    /// How many processes of this cgroup the kernel OOM-killed so far.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        self.find(file).and_then(|p| keyed(&p, key)).unwrap_or(0)
    }

    /// Pids of the processes still in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let mut out: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the directories; fails while processes remain.
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
        }
    }
}
