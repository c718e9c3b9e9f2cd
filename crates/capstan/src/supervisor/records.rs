//! Durable record of the replicas the daemon started, so that a daemon killed
//! with SIGKILL leaves nothing behind: the next one finds and stops them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::driver::cgroup::ReplicaCgroup;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub service: String,
    pub replica: u32,
    /// Records of daemons from before revisions have none: 0.
    #[serde(default)]
    pub revision: u64,
    pub pid: i32,
    /// Start time from /proc/PID/stat: tells a live replica from a reused pid.
    pub start_ticks: u64,
    pub cgroup: Option<ReplicaCgroup>,
    pub stop_signal: String,
    pub grace_ms: u64,
    /// The engine's id of a container replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// `replicas.json` in the data dir, rewritten atomically (temp file, rename).
///
/// Not fsynced: the file names processes that outlive a daemon, and only a
/// daemon's death (not the machine's) leaves any, with the page cache intact;
/// after a power loss there is no process to find. Keeping the fsync (1–20 ms
/// on this disk) off a replica's start matters for cold starts.
pub struct StateFile {
    path: PathBuf,
    records: BTreeMap<String, Record>,
}

impl StateFile {
    pub fn open(dir: &Path) -> StateFile {
        let path = dir.join("replicas.json");
        let records = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StateFile { path, records }
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.values().cloned().collect()
    }

    pub fn insert(&mut self, r: Record) {
        self.records
            .insert(key(&r.service, r.revision, r.replica), r);
        self.save();
    }

    pub fn remove(&mut self, r: &Record) {
        let key = key(&r.service, r.revision, r.replica);
        if self.records.get(&key).is_some_and(|x| x.pid == r.pid) {
            self.records.remove(&key);
            self.save();
        }
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.save();
    }

    fn save(&self) {
        use std::io::Write;
        let tmp = self.path.with_extension("json.tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&self.records)?)?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            tracing::error!(path = %self.path.display(), "cannot save replica records: {e}");
        }
    }
}

fn key(service: &str, revision: u64, replica: u32) -> String {
    format!("{service}/{revision}/{replica}")
}
