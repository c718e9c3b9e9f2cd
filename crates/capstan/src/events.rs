//! Lifecycle events: kept in `events.jsonl` in the data dir and streamed to
//! subscribers. Each event is also logged through `tracing`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Unix time in milliseconds.
    pub time_ms: i64,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub replica: Option<u32>,
    /// The replica's revision, for events about one replica.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub revision: Option<u64>,
    /// started, healthy, unhealthy, exited, restarting, crash-looping, failed,
    /// stopping, stopped, scaled, oom-killed, …
    pub kind: String,
    pub reason: String,
}

pub fn now_ms() -> i64 {
    crate::state::clock::unix_ms()
}

const KEEP_IN_MEMORY: usize = 10_000;
const ROTATE_BYTES: u64 = 16 << 20;

pub struct EventLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
    recent: Mutex<VecDeque<Event>>,
    tx: broadcast::Sender<Event>,
    warned: Mutex<std::collections::BTreeSet<String>>,
}

impl EventLog {
    /// Opens the log, keeping the tail of earlier runs for `capstan events`.
    pub fn open(dir: &Path) -> std::io::Result<EventLog> {
        let path = dir.join("events.jsonl");
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > ROTATE_BYTES) {
            let _ = std::fs::rename(&path, dir.join("events.jsonl.1"));
        }
        let mut recent = VecDeque::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(e) = serde_json::from_str::<Event>(&line) {
                    if recent.len() == KEEP_IN_MEMORY {
                        recent.pop_front();
                    }
                    recent.push_back(e);
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(EventLog {
            path,
            file: Mutex::new(Some(file)),
            recent: Mutex::new(recent),
            tx: broadcast::channel(1024).0,
            warned: Mutex::default(),
        })
    }

    pub fn emit(&self, service: &str, replica: Option<u32>, kind: &str, reason: impl Into<String>) {
        self.record(service, replica, None, kind, reason.into());
    }

    /// An event about one replica, with its revision.
    pub fn emit_replica(
        &self,
        id: &crate::state::ReplicaId,
        kind: &str,
        reason: impl Into<String>,
    ) {
        self.record(
            &id.service,
            Some(id.index),
            Some(id.revision),
            kind,
            reason.into(),
        );
    }

    fn record(
        &self,
        service: &str,
        replica: Option<u32>,
        revision: Option<u64>,
        kind: &str,
        reason: String,
    ) {
        let e = Event {
            time_ms: now_ms(),
            service: service.into(),
            replica,
            revision,
            kind: kind.into(),
            reason,
        };
        match replica {
            Some(r) => tracing::info!(service, replica = r, kind, "{}", e.reason),
            None => tracing::info!(service, kind, "{}", e.reason),
        }
        if let Some(f) = self.file.lock().unwrap().as_mut()
            && let Ok(mut line) = serde_json::to_vec(&e)
        {
            line.push(b'\n');
            if let Err(err) = f.write_all(&line) {
                tracing::warn!(path = %self.path.display(), "cannot write event: {err}");
            }
        }
        // Pushed and sent under one lock so a subscriber sees each event exactly once.
        let mut r = self.recent.lock().unwrap();
        if r.len() == KEEP_IN_MEMORY {
            r.pop_front();
        }
        r.push_back(e.clone());
        let _ = self.tx.send(e);
    }

    /// Logs a warning once per distinct message (and records it as an event).
    pub fn warn_once(&self, msg: String) {
        if self.warned.lock().unwrap().insert(msg.clone()) {
            tracing::warn!("{msg}");
            self.emit("capstan", None, "warning", msg);
        }
    }

    /// Subscribes, then returns the history: an event is in one or both, never neither.
    pub fn subscribe_with_history(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let r = self.recent.lock().unwrap();
        (r.iter().cloned().collect(), self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events keep their JSON; one about a replica adds its revision.
    #[test]
    fn event_json_names_the_revision_of_a_replica_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.emit("capstan", None, "warning", "w");
        log.emit_replica(&crate::state::ReplicaId::new("web", 4, 1), "healthy", "ok");
        let (history, _) = log.subscribe_with_history();
        let json: Vec<serde_json::Value> = history
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap();
                v.as_object_mut().unwrap().remove("time_ms");
                v
            })
            .collect();
        assert_eq!(
            json,
            [
                serde_json::json!({"service": "capstan", "kind": "warning", "reason": "w"}),
                serde_json::json!({"service": "web", "replica": 1, "revision": 4, "kind": "healthy", "reason": "ok"}),
            ]
        );
    }
}
