//! Every revision of every service: when, what changed, why it came, and
//! what became of it (active, superseded, rolled back, failed). Kept in
//! `revisions.json` in the data dir (rewritten atomically), so `capstan
//! history` and `capstan rollback --to` outlive the daemon.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::Revision;
use crate::spec::Service;

/// Revisions kept per service (the oldest go first, never the active one).
pub const KEEP: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevisionStatus {
    /// Being rolled out.
    Rolling,
    /// What runs.
    Active,
    /// Stopped midway by `failure_action: pause`; both revisions run.
    Paused,
    /// Replaced by a later revision.
    Superseded,
    /// Taken back, automatically or by `capstan rollback`.
    RolledBack,
    /// Could not be rolled out, and nothing was rolled back.
    Failed,
}

impl RevisionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RevisionStatus::Rolling => "rolling",
            RevisionStatus::Active => "active",
            RevisionStatus::Paused => "paused",
            RevisionStatus::Superseded => "superseded",
            RevisionStatus::RolledBack => "rolled back",
            RevisionStatus::Failed => "failed",
        }
    }
}

/// One revision of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionInfo {
    pub revision: Revision,
    /// When it was made (unix ms).
    pub time_ms: i64,
    /// The definition's hash.
    pub hash: String,
    /// `deploy`, `rollback` or `initial`.
    pub trigger: String,
    /// What changed from the revision before, one line per field.
    pub diff: Vec<String>,
    pub status: RevisionStatus,
    /// Why it has its status (the check that failed, who rolled it back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
    /// Its definition, to go back to.
    pub spec: Service,
}

impl RevisionInfo {
    /// A revision of `spec` made now.
    pub fn new(
        revision: Revision,
        spec: &Service,
        trigger: &str,
        diff: Vec<String>,
        status: RevisionStatus,
    ) -> RevisionInfo {
        RevisionInfo {
            revision,
            time_ms: super::clock::unix_ms(),
            hash: spec.definition_hash(),
            trigger: trigger.to_owned(),
            diff,
            status,
            why: String::new(),
            spec: spec.clone(),
        }
    }
}

/// The revisions of every service.
pub struct History {
    path: Option<PathBuf>,
    services: Mutex<BTreeMap<String, Vec<RevisionInfo>>>,
    /// Rollouts ended since the daemon started, by service and result.
    outcomes: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Canary verdicts since the daemon started, by service, check and result.
    verdicts: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

impl History {
    /// The history kept in `dir` (read if there), or in memory only.
    pub fn open(dir: Option<&Path>) -> History {
        let path = dir.map(|d| d.join("revisions.json"));
        let services = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        History {
            path,
            services: Mutex::new(services),
            outcomes: Mutex::default(),
            verdicts: Mutex::default(),
        }
    }

    /// The revisions of a service, oldest first.
    pub fn of(&self, service: &str) -> Vec<RevisionInfo> {
        self.services
            .lock()
            .unwrap()
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Counts a rollout's end: `rolled`, `rolled_back`, `paused` or `failed`.
    pub fn count(&self, service: &str, result: &'static str) {
        *self
            .outcomes
            .lock()
            .unwrap()
            .entry((service.to_owned(), result))
            .or_default() += 1;
    }

    /// Counts a canary check's verdict.
    pub fn verdict(&self, service: &str, check: &str, result: &'static str) {
        *self
            .verdicts
            .lock()
            .unwrap()
            .entry((service.to_owned(), check.to_owned(), result))
            .or_default() += 1;
    }

    /// Canary verdicts, by (service, check, result).
    pub fn verdicts(&self) -> BTreeMap<(String, String, &'static str), u64> {
        self.verdicts.lock().unwrap().clone()
    }

    /// Rollouts ended, by (service, result).
    pub fn outcomes(&self) -> BTreeMap<(String, &'static str), u64> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Every service's newest revision and its status.
    pub fn latest(&self) -> Vec<(String, Revision, RevisionStatus)> {
        self.services
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(s, l)| {
                l.iter()
                    .max_by_key(|r| r.revision)
                    .map(|r| (s.clone(), r.revision, r.status))
            })
            .collect()
    }

    pub fn get(&self, service: &str, revision: Revision) -> Option<RevisionInfo> {
        self.of(service)
            .into_iter()
            .find(|r| r.revision == revision)
    }

    /// Records a revision (replacing one of the same number: a rollback
    /// brings a revision back).
    pub fn record(&self, service: &str, info: RevisionInfo) {
        let mut all = self.services.lock().unwrap();
        let list = all.entry(service.to_owned()).or_default();
        list.retain(|r| r.revision != info.revision);
        list.push(info);
        while list.len() > KEEP {
            match list.iter().position(|r| r.status != RevisionStatus::Active) {
                Some(i) => {
                    list.remove(i);
                }
                None => break,
            }
        }
        self.save(&all);
    }

    /// Sets what became of a revision.
    pub fn set_status(&self, service: &str, revision: Revision, status: RevisionStatus, why: &str) {
        let mut all = self.services.lock().unwrap();
        let Some(r) = all
            .get_mut(service)
            .and_then(|l| l.iter_mut().find(|r| r.revision == revision))
        else {
            return;
        };
        if r.status == status && r.why == why {
            return;
        }
        r.status = status;
        r.why = why.to_owned();
        self.save(&all);
    }

    fn save(&self, all: &BTreeMap<String, Vec<RevisionInfo>>) {
        use std::io::Write;
        let Some(path) = &self.path else { return };
        let tmp = path.with_extension("json.tmp");
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(all)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            tracing::error!(path = %path.display(), "cannot save the revision history: {e}");
        }
    }
}

/// What changed between two definitions, one line per field that differs
/// (`environment.VERSION: "v1" -> "v2"`).
pub fn diff(before: &Service, after: &Service) -> Vec<String> {
    let a = serde_json::to_value(before).unwrap_or_default();
    let b = serde_json::to_value(after).unwrap_or_default();
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    if a == b {
        return;
    }
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            let null = Value::Null;
            for k in keys {
                walk(
                    &join(k),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Null, v) => out.push(format!("{path}: added {}", short(v))),
        (v, Value::Null) => out.push(format!("{path}: removed (was {})", short(v))),
        (x, y) => out.push(format!("{path}: {} -> {}", short(x), short(y))),
    }
}

/// A value as one short line.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(79).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        let (stack, _) = crate::spec::parse_text(
            yaml,
            "capstan.yaml",
            Path::new("/srv"),
            "app",
            BTreeMap::new(),
            &crate::spec::LoadOptions::default(),
        )
        .unwrap();
        stack.services["web"].clone()
    }

    #[test]
    fn the_diff_names_each_changed_field() {
        let a =
            svc("services:\n  web:\n    command: [demo]\n    environment: {VERSION: v1, A: x}\n");
        let b = svc(
            "services:\n  web:\n    command: [demo, --fast]\n    environment: {VERSION: v2, B: b}\n",
        );
        assert_eq!(
            diff(&a, &b),
            [
                "command: [\"demo\"] -> [\"demo\",\"--fast\"]",
                "environment.A: removed (was \"x\")",
                "environment.B: added \"b\"",
                "environment.VERSION: \"v1\" -> \"v2\"",
            ]
        );
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn the_history_outlives_the_daemon_and_keeps_the_active_revision() {
        let dir = tempfile::tempdir().unwrap();
        let spec = svc("services:\n  web:\n    command: [demo]\n");
        let h = History::open(Some(dir.path()));
        for revision in 1..=(KEEP as u64 + 5) {
            let status = if revision == 1 {
                RevisionStatus::Active
            } else {
                RevisionStatus::Superseded
            };
            h.record(
                "web",
                RevisionInfo {
                    revision,
                    time_ms: 0,
                    hash: String::new(),
                    trigger: "deploy".into(),
                    diff: Vec::new(),
                    status,
                    why: String::new(),
                    spec: spec.clone(),
                },
            );
        }
        let last = KEEP as u64 + 5;
        h.set_status("web", last, RevisionStatus::RolledBack, "p99 too high");
        let again = History::open(Some(dir.path()));
        let list = again.of("web");
        assert_eq!(list.len(), KEEP);
        assert_eq!(list[0].revision, 1, "the active revision stays");
        assert_eq!(again.get("web", 3), None, "old ones go first");
        let newest = list.last().unwrap();
        assert_eq!(newest.revision, last);
        assert_eq!(newest.status, RevisionStatus::RolledBack);
        assert_eq!(newest.why, "p99 too high");
    }
}
