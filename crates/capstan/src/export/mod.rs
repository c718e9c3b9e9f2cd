//! `capstan export`: the stack file as manifests for a distributed engine,
//! with every setting that has no equivalent listed (its key path and why),
//! never silently dropped.

pub mod kubernetes;
pub mod operators;
pub mod swarm;

/// A setting of the stack file the target cannot express.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unmapped {
    /// Its key path in the stack file (`services.web.x-capstan.proxy`).
    pub path: String,
    pub why: String,
}

/// What an export made: named objects, and what did not map.
#[derive(Debug, Default)]
pub struct Export {
    /// File name (without extension) and the object.
    pub objects: Vec<(String, serde_json::Value)>,
    pub unmapped: Vec<Unmapped>,
}

impl Export {
    pub fn skip(&mut self, path: impl Into<String>, why: impl Into<String>) {
        self.unmapped.push(Unmapped {
            path: path.into(),
            why: why.into(),
        });
    }

    pub fn add(&mut self, name: impl Into<String>, object: impl serde::Serialize) {
        let value = serde_json::to_value(object).unwrap_or_default();
        self.objects.push((name.into(), value));
    }

    /// Every object as one multi-document YAML text.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for (_, o) in &self.objects {
            out.push_str("---\n");
            out.push_str(&yaml(o));
        }
        out
    }
}

/// The stack's own monitoring settings, which a cluster's Prometheus,
/// Alertmanager and collectors take over: listed when set.
pub fn stack_settings(stack: &crate::spec::Stack, out: &mut Export, rule_files_mapped: bool) {
    let s = &stack.settings;
    for (set, key, why) in [
        (
            !s.scrape_configs.is_empty(),
            "x-capstan.scrape_configs",
            "put them in your Prometheus' scrape_configs",
        ),
        (
            !s.alertmanagers.is_empty() || !s.alert_webhooks.is_empty(),
            "x-capstan.alerting",
            "your Prometheus sends alerts to its Alertmanagers",
        ),
        (
            s.notify.is_some(),
            "x-capstan.notify",
            "release notifications come from capstan's own rollouts",
        ),
        (
            !s.remote_write.is_empty(),
            "x-capstan.remote_write",
            "put it in your Prometheus' remote_write",
        ),
        (
            !s.logs.forward.is_empty(),
            "x-capstan.logs.forward",
            "a log collector (Promtail, Alloy, Fluent Bit) on the nodes does this",
        ),
        (
            !s.traces.forward.is_empty(),
            "x-capstan.traces.forward",
            "point the programs' OTLP exporters at your collector",
        ),
        (
            !s.external_labels.is_empty(),
            "x-capstan.external_labels",
            "set them in your Prometheus' global config",
        ),
        (
            !s.anomaly.is_empty() && !rule_files_mapped,
            "x-capstan.anomaly",
            "`capstan rules --generated` prints the rules, to add to a rule file",
        ),
        (
            !s.rule_files.is_empty() && !rule_files_mapped,
            "x-capstan.rule_files",
            "load the rule files into your Prometheus as they are (or export with --prometheus-operator)",
        ),
    ] {
        if set {
            out.skip(key, why);
        }
    }
}

/// The port a replica listens on when the stack gives it `$PORT` (as in a container).
pub use crate::supervisor::driver::container::DEFAULT_PORT;

/// The image a service runs on the target: its own; for a `build:` service
/// `built`, for a process service `process`, each reported with why.
pub fn image_of(
    s: &crate::spec::Service,
    path: &str,
    (built, built_why): (String, &dyn Fn(&str) -> String),
    (process, process_why): (String, &dyn Fn(&str) -> String),
    out: &mut Export,
) -> String {
    match (&s.image, &s.build) {
        (Some(i), _) => i.clone(),
        (None, Some(_)) => {
            out.skip(format!("{path}.build"), built_why(&built));
            built
        }
        (None, None) => {
            out.skip(format!("{path}.command"), process_why(&process));
            process
        }
    }
}

/// One object as YAML.
pub fn yaml(o: &serde_json::Value) -> String {
    let mut text = serde_saphyr::to_string(o).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}
