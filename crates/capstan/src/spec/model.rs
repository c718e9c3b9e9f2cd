//! The normalized stack: what `capstan config` prints and what the daemon runs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    pub name: String,
    pub services: BTreeMap<String, Service>,
    /// Named volumes declared at the top level (`volumes:`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub volumes: std::collections::BTreeSet<String>,
    /// Networks declared at the top level (`networks:`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, NetworkDef>,
    #[serde(rename = "x-capstan", default)]
    pub settings: Settings,
}

impl Stack {
    /// The checks across services the file loader makes, on a stack that came
    /// from elsewhere (the control API): every dependency exists and none forms
    /// a cycle, published ports are unique, every service has something to run.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut ports: BTreeMap<(u16, &str), &str> = BTreeMap::new();
        for (name, svc) in &self.services {
            for dep in svc.depends_on.keys() {
                if !self.services.contains_key(dep) {
                    errors.push(format!(
                        "services.{name}.depends_on: depends on undefined service {dep:?}"
                    ));
                }
            }
            let runnable = match svc.driver() {
                DriverKind::Process => svc.argv().is_some(),
                DriverKind::Container => svc.image.is_some() || svc.build.is_some(),
            };
            for v in &svc.volumes {
                if v.kind == VolumeKind::Volume
                    && let Some(src) = &v.source
                    && !self.volumes.contains(src)
                {
                    errors.push(format!(
                        "services.{name}.volumes: refers to undefined volume {src:?}"
                    ));
                }
            }
            if !runnable {
                errors.push(format!("services.{name}: nothing to run"));
            }
            for p in &svc.ports {
                if let Some(other) = ports.insert((p.published, p.protocol.as_str()), name)
                    && other != name
                {
                    errors.push(format!(
                        "services.{name}.ports: port {} is already published by service {other:?}",
                        p.published
                    ));
                }
            }
        }
        // Without recursion (the input's size is the client's): services are
        // taken away once everything they depend on is; what stays is cyclic.
        let mut waiting: BTreeMap<&str, usize> = self
            .services
            .iter()
            .map(|(n, s)| {
                let deps = s
                    .depends_on
                    .keys()
                    .filter(|d| self.services.contains_key(*d))
                    .count();
                (n.as_str(), deps)
            })
            .collect();
        let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (n, s) in &self.services {
            for d in s.depends_on.keys() {
                dependents.entry(d.as_str()).or_default().push(n.as_str());
            }
        }
        let mut ready: Vec<&str> = waiting
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(k, _)| *k)
            .collect();
        while let Some(n) = ready.pop() {
            waiting.remove(n);
            for d in dependents.get(n).into_iter().flatten() {
                if let Some(c) = waiting.get_mut(d) {
                    *c -= 1;
                    if *c == 0 {
                        ready.push(d);
                    }
                }
            }
        }
        if !waiting.is_empty() {
            let names: Vec<&str> = waiting.keys().copied().collect();
            errors.push(format!(
                "dependency cycle among services {}",
                names.join(", ")
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// Stack-wide capstan settings (top-level `x-capstan`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Range replicas' `$PORT` values are allocated from (inclusive).
    pub port_range: [u16; 2],
    pub logs: LogSettings,
    /// Default scrape interval (Prometheus' global default: 15s; at least 1s).
    #[serde(default = "default_scrape_interval")]
    pub scrape_interval: Dur,
    /// Extra targets in Prometheus' `scrape_configs` shape (static targets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scrape_configs: Vec<ScrapeConfig>,
    /// The metrics store's limits (`x-capstan.storage`).
    #[serde(default)]
    pub storage: StorageSettings,
    /// Limits of every PromQL query (`x-capstan.query`).
    #[serde(default)]
    pub query: QuerySettings,
    /// `x-capstan.notify.webhook`: where deploys, rollbacks and pauses are
    /// posted as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// `x-capstan.api.require_token`: the read APIs and the dashboard want
    /// the token on loopback too (a machine shared with other users). Read
    /// when the daemon starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_require_token: bool,
    /// `x-capstan.remote_write`: receivers every stored sample is sent to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_write: Vec<RemoteWriteConfig>,
    #[serde(default, skip_serializing_if = "TraceSettings::is_default")]
    pub traces: TraceSettings,
    /// Prometheus rule files (`x-capstan.rule_files`, globs relative to the
    /// stack file), as the paths they matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_files: Vec<String>,
    /// How often rule groups without an `interval` run (Prometheus'
    /// `evaluation_interval`, default 1m).
    #[serde(default = "default_evaluation_interval")]
    pub evaluation_interval: Dur,
    /// Labels added to alerts sent out, and `$externalLabels` in templates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_labels: BTreeMap<String, String>,
    /// Alertmanagers firing and resolved alerts are posted to
    /// (`x-capstan.alerting.alertmanagers`: their base URLs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alertmanagers: Vec<String>,
    /// How often a firing alert is sent again (`x-capstan.alerting.resend_delay`).
    #[serde(default = "default_resend_delay")]
    pub resend_delay: Dur,
    /// Every rule's alerts are held back while a service their service
    /// depends on has a firing alert (`x-capstan.alerting.inhibit_on_dependency`;
    /// per rule, the annotation `capstan_inhibit_on_dependency: "true"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inhibit_on_dependency: bool,
    /// Plain webhooks that get alerts grouped as Alertmanager would
    /// (`x-capstan.alerting.webhooks`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alert_webhooks: Vec<AlertWebhook>,
    /// Series watched for anomalies (`x-capstan.anomaly`), run as generated rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomaly: Vec<AnomalyRule>,
}

/// `x-capstan.anomaly[]`: see `alerting::anomaly`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyRule {
    /// The alert's name (and the generated series' middle part).
    pub name: String,
    /// The PromQL of the series watched.
    pub series: String,
    pub method: AnomalyMethod,
    /// How much recent history a value is judged against.
    pub window: Dur,
    /// Compare with the same time a season ago (`1d`, `1w`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seasonality: Option<Dur>,
    /// How many spreads from the center fire.
    pub sensitivity: f64,
    /// Values the window must hold before anything is judged.
    pub min_samples: u32,
    #[serde(rename = "for")]
    pub for_: Dur,
    /// How often the rules run.
    pub step: Dur,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyMethod {
    /// Median and median absolute deviation (robust; the default).
    Mad,
    /// Mean and standard deviation.
    Zscore,
}

/// A webhook for alerts, with Alertmanager's grouping timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertWebhook {
    pub url: String,
    pub group_wait: Dur,
    pub group_interval: Dur,
    pub repeat_interval: Dur,
}

fn default_resend_delay() -> Dur {
    Dur::secs(60)
}

fn default_evaluation_interval() -> Dur {
    Dur::secs(60)
}

/// Limits of a PromQL query (Prometheus' `--query.*` flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuerySettings {
    /// A query running longer is stopped (`--query.timeout`).
    pub timeout: Dur,
    /// Most samples a query may hold at once (`--query.max-samples`).
    pub max_samples: u64,
    /// Memory a query's samples may take (16 bytes each), in bytes.
    pub max_memory: u64,
}

impl Default for QuerySettings {
    fn default() -> Self {
        QuerySettings {
            timeout: Dur::secs(120),
            max_samples: 50_000_000,
            max_memory: 1 << 30,
        }
    }
}

/// Retention and limits of the metrics store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageSettings {
    /// Blocks older than this are deleted (Prometheus' `--storage.tsdb.retention.time`).
    pub retention: Dur,
    /// Oldest blocks are deleted while the blocks take more than this (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_size: Option<u64>,
    /// Most series in memory; samples of new series beyond it are rejected and counted.
    pub max_series: u64,
    /// Samples (scraped, remote-written) further ahead of the clock than this
    /// are rejected and counted, so a wrong clock cannot disturb stored data.
    #[serde(default = "default_max_future")]
    pub max_future: Dur,
    /// Samples up to this much older than their series' newest are still
    /// stored (Prometheus' `out_of_order_time_window`; 0: refused as out of order).
    #[serde(default = "Dur::zero")]
    pub out_of_order_time_window: Dur,
}

fn default_max_future() -> Dur {
    Dur::secs(600)
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            retention: Dur::secs(15 * 86_400),
            retention_size: None,
            max_series: 2_000_000,
            max_future: default_max_future(),
            out_of_order_time_window: Dur::zero(),
        }
    }
}

fn default_metrics_path() -> String {
    "/metrics".into()
}
fn default_true() -> bool {
    true
}
fn default_scheme() -> String {
    "http".into()
}

/// One entry of `x-capstan.remote_write`, as Prometheus writes it: where
/// every stored sample is also sent (remote_write 1.0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    pub url: String,
    /// Its name in `capstan_remote_write_*` (by default the URL's host and port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    /// One send may take this long.
    #[serde(default = "default_remote_timeout")]
    pub remote_timeout: Dur,
    #[serde(default, alias = "queue")]
    pub queue_config: QueueConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_relabel_configs: Vec<crate::scrape::relabel::RelabelConfig>,
}

fn default_remote_timeout() -> Dur {
    Dur::secs(30)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    #[serde(default)]
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    #[serde(default = "default_auth_type", rename = "type")]
    pub kind: String,
    pub credentials: String,
}

fn default_auth_type() -> String {
    "Bearer".into()
}

/// How samples are batched and retried (Prometheus' `queue_config` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Batches sent at once (series are split among shards by their labels).
    pub max_shards: u32,
    pub max_samples_per_send: u32,
    /// How long samples wait to be sent at most (a batch goes sooner when full).
    pub batch_send_deadline: Dur,
    pub min_backoff: Dur,
    pub max_backoff: Dur,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_shards: 4,
            max_samples_per_send: 2000,
            batch_send_deadline: Dur::secs(5),
            min_backoff: Dur(std::time::Duration::from_millis(30)),
            max_backoff: Dur::secs(5),
        }
    }
}

/// One entry of `x-capstan.scrape_configs`, as Prometheus writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    pub job_name: String,
    #[serde(default)]
    pub static_configs: Vec<StaticConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape_interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape_timeout: Option<Dur>,
    #[serde(default = "default_metrics_path")]
    pub metrics_path: String,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub honor_labels: bool,
    #[serde(default = "default_true")]
    pub honor_timestamps: bool,
    /// Most samples a scrape may have after relabeling; more fails the scrape (0: no limit).
    #[serde(default)]
    pub sample_limit: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metric_relabel_configs: Vec<crate::scrape::relabel::RelabelConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_scrape_interval() -> Dur {
    Dur::secs(15)
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            port_range: [20000, 29999],
            logs: LogSettings::default(),
            scrape_interval: default_scrape_interval(),
            scrape_configs: Vec::new(),
            storage: StorageSettings::default(),
            query: QuerySettings::default(),
            notify: None,
            api_require_token: false,
            remote_write: Vec::new(),
            traces: TraceSettings::default(),
            rule_files: Vec::new(),
            evaluation_interval: default_evaluation_interval(),
            external_labels: BTreeMap::new(),
            alertmanagers: Vec::new(),
            resend_delay: default_resend_delay(),
            inhibit_on_dependency: false,
            alert_webhooks: Vec::new(),
            anomaly: Vec::new(),
        }
    }
}

/// Where captured output goes (`x-capstan.logs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogSettings {
    /// The log store's active segment is sealed at this size (bytes).
    pub max_file_size: u64,
    /// Oldest segments are deleted beyond this total (bytes).
    pub max_total_size: u64,
    /// `x-capstan.logs.forward`: Loki push receivers every stored line is sent to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<RemoteWriteConfig>,
}

/// `x-capstan.traces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceSettings {
    /// OTLP/HTTP receivers every stored span is sent to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<RemoteWriteConfig>,
}

impl TraceSettings {
    pub fn is_default(&self) -> bool {
        self.forward.is_empty()
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            max_file_size: 8 << 20,
            max_total_size: 512 << 20,
            forward: Vec::new(),
        }
    }
}

/// A command as written: a string runs through `/bin/sh -c`, a list is an argv.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cmd {
    Shell(String),
    Exec(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub image: Option<String>,
    /// Build the image from a Dockerfile (compose's `build:`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub build: Option<Build>,
    /// The image id `build:` gave when the CLI built it (`capstan up`): part
    /// of the definition, so that changed code makes a new revision.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub built: Option<String>,
    /// Mounts of a container (bind, named or anonymous volume, tmpfs).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub volumes: Vec<Volume>,
    /// Container-only settings (compose's `user`, `hostname`, `init`, …).
    #[serde(skip_serializing_if = "ContainerOpts::is_default", default)]
    pub container: ContainerOpts,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entrypoint: Option<Cmd>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command: Option<Cmd>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub environment: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub working_dir: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub ports: Vec<Port>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub expose: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub healthcheck: Option<Healthcheck>,
    /// `healthcheck: {disable: true}` (or `test: [NONE]`): not even the
    /// image's own HEALTHCHECK runs.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub healthcheck_disabled: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub depends_on: BTreeMap<String, Dependency>,
    pub stop_signal: String,
    pub stop_grace_period: Dur,
    pub deploy: Deploy,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub profiles: Vec<String>,
    /// Capstan's own per-service settings (`x-capstan`).
    #[serde(
        rename = "x-capstan",
        default,
        skip_serializing_if = "ServiceX::is_default"
    )]
    pub x: ServiceX,
}

/// Per-service `x-capstan` settings other than health checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceX {
    #[serde(default, skip_serializing_if = "MetricsTarget::is_default")]
    pub metrics: MetricsTarget,
    /// What the published ports forward: HTTP requests (default) or raw TCP.
    #[serde(default, skip_serializing_if = "Protocol::is_http")]
    pub protocol: Protocol,
    /// The proxy in front of the published ports (`x-capstan.proxy`).
    #[serde(default, skip_serializing_if = "ProxySettings::is_default")]
    pub proxy: ProxySettings,
    /// How long a request is held while a replica starts from zero.
    #[serde(default = "default_cold_start_timeout")]
    pub cold_start_timeout: Dur,
    /// The replica count follows metrics (`x-capstan.autoscale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// What runs the replicas (`x-capstan.driver`); by default containers for
    /// a service with an image, processes otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<DriverKind>,
    /// A changed definition goes out as a canary judged on live metrics
    /// (`x-capstan.rollout`); without it, as a rolling update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Canary>,
    /// Checks a rolling update's batches must also pass
    /// (`x-capstan.rollout: {strategy: rolling, analysis: …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<Analysis>,
}

/// `x-capstan.rollout: {strategy: canary, …}`: traffic shifted to the new
/// revision step by step while its metrics are compared with a baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    pub steps: Vec<CanaryStep>,
    /// A fresh replica of the stable revision gets the canary's share of
    /// traffic, so the judge compares fresh with fresh.
    pub baseline: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// After promotion, how long the analysis keeps watching the new revision.
    pub bake: Dur,
    pub analysis: Analysis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryStep {
    /// The canary's share of requests, in percent.
    Weight(u32),
    /// Wait this long while the analysis runs; none waits for `capstan promote`.
    Pause(Option<Dur>),
}

/// How a client keeps its side of a canary: by a header's value, or by a
/// cookie the proxy sets on the first response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// How often the checks run.
    pub interval: Dur,
    /// Consecutive failed runs of a threshold check that fail the canary.
    pub failure_limit: u32,
    /// Requests each side must have seen in a step before a verdict.
    pub min_requests: u64,
    /// How long a step may stay inconclusive before `on_inconclusive`.
    pub deadline: Dur,
    pub on_inconclusive: FailureAction,
    /// The comparisons' false-alarm bound.
    pub alpha: f64,
    pub checks: Vec<Check>,
}

impl Analysis {
    pub fn defaults() -> Analysis {
        Analysis {
            interval: Dur::secs(10),
            failure_limit: 2,
            min_requests: 50,
            deadline: Dur::secs(600),
            on_inconclusive: FailureAction::Pause,
            alpha: 0.01,
            checks: vec![
                Check::new("errors-vs-baseline", CheckKind::ErrorsVsBaseline),
                Check::new("latency-vs-baseline", CheckKind::LatencyVsBaseline),
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The window a threshold check looks at (default: the interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Dur>,
}

impl Check {
    pub fn new(name: &str, kind: CheckKind) -> Check {
        Check {
            name: name.to_owned(),
            kind,
            min: None,
            max: None,
            window: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// Share of the canary's requests not answered 5xx (threshold: `min`).
    SuccessRate,
    /// The canary's p99 latency in seconds (threshold: `max`).
    LatencyP99,
    /// Sequential test: the canary's 5xx rate is above the baseline's.
    ErrorsVsBaseline,
    /// Sequential test: more of the canary's requests are slow than the baseline's.
    LatencyVsBaseline,
    /// A PromQL query with `{{canary}}`, `{{baseline}}`, `{{stable}}`,
    /// `{{service}}`, `{{interval}}` (threshold: `min` and/or `max`).
    Query(String),
}

/// Compose keys that only a container has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerOpts {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub init: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub read_only: bool,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub cap_add: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub cap_drop: Vec<String>,
    /// `host:ip` entries for /etc/hosts.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub extra_hosts: Vec<String>,
    /// compose's `pull_policy`: `missing` (default), `always`, `never`, `build`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pull_policy: Option<String>,
    /// `ulimits`: name → (soft, hard).
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub ulimits: BTreeMap<String, (i64, i64)>,
    /// `tmpfs`: `PATH` or `PATH:OPTIONS`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tmpfs: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub privileged: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shm_size: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub security_opt: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub sysctls: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub dns: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub dns_search: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub group_add: Vec<String>,
    /// `devices`: `HOST[:CONTAINER[:PERMISSIONS]]`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub devices: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mem_reservation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_shares: Option<u64>,
    /// The networks the containers join, with the top-level definitions
    /// resolved; empty means the stack's default network.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub networks: Vec<NetworkAttach>,
    /// `secrets` and `configs`, resolved from their top-level definitions.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub files: Vec<FileMount>,
}

/// A network a service's containers join (`services.X.networks`), with its
/// top-level definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkAttach {
    /// The key under the top-level `networks:` (`default` for the stack's own).
    pub key: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub aliases: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ipv4_address: Option<String>,
    #[serde(skip_serializing_if = "NetworkDef::is_default", default)]
    pub def: NetworkDef,
}

/// A top-level `networks:` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkDef {
    /// The engine's name for an `external` network (or one given `name:`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub external: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub internal: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub driver: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub driver_opts: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
}

impl NetworkDef {
    pub fn is_default(&self) -> bool {
        *self == NetworkDef::default()
    }
}

/// A secret or config given to a service's containers as a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMount {
    /// `secret` or `config`, for messages.
    pub kind: String,
    /// Its name under the top-level `secrets:`/`configs:`.
    pub name: String,
    /// Where it appears in the container (absolute).
    pub target: String,
    pub source: FileSource,
    /// `mode` (octal), `uid`, `gid`, for content written into the container.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mode: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gid: Option<u32>,
}

/// Where a secret's or config's content comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileSource {
    /// A host file (absolute once loaded), bind-mounted read-only.
    File(String),
    /// Inline content, or an environment variable's value at load time,
    /// written into the container before it starts.
    Content(String),
}

impl ContainerOpts {
    pub fn is_default(&self) -> bool {
        *self == ContainerOpts::default()
    }
}

/// One mount of a service's containers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub kind: VolumeKind,
    /// A host path (absolute once loaded) for a bind, a top-level volume's
    /// name for a named volume, none for an anonymous volume or a tmpfs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<String>,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    Bind,
    Volume,
    Tmpfs,
}

/// compose's `build:`: a context directory (absolute once loaded) and options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub context: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub dockerfile: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub args: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
}

/// `x-capstan.driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    Process,
    Container,
}

/// `x-capstan.autoscale`: the Kubernetes HPA's algorithm and behavior, plus
/// scale to zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    /// How often the metrics are read and a decision made.
    pub interval: Dur,
    /// Ratios within 1 ± tolerance cause no change.
    pub tolerance: f64,
    pub metrics: Vec<ScaleMetric>,
    pub behavior: Behavior,
    /// With `min: 0`: no request for this long stops the last replica.
    pub idle_after: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleMetric {
    pub source: MetricSource,
    pub target: f64,
    /// Compare the average per replica (true) or the total (false) with the target.
    pub average: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricSource {
    /// Percent of the CPU limit (one CPU without a limit).
    Cpu,
    /// Percent of the memory limit.
    Memory,
    /// Requests per second through the proxy.
    Rps,
    /// Requests in flight through the proxy.
    Inflight,
    Query(String),
}

impl MetricSource {
    pub fn name(&self) -> &str {
        match self {
            MetricSource::Cpu => "cpu",
            MetricSource::Memory => "memory",
            MetricSource::Rps => "rps",
            MetricSource::Inflight => "inflight",
            MetricSource::Query(_) => "query",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Behavior {
    pub scale_up: ScalingRules,
    pub scale_down: ScalingRules,
}

impl Default for Behavior {
    /// Kubernetes' defaults: up at once by 100% or 4 replicas per 15s (the
    /// larger), down after a 300s window by up to 100% per 15s.
    fn default() -> Self {
        Behavior {
            scale_up: ScalingRules {
                stabilization: Dur::secs(0),
                select: SelectPolicy::Max,
                policies: vec![
                    ScalingPolicy {
                        kind: PolicyKind::Percent,
                        value: 100,
                        period: Dur::secs(15),
                    },
                    ScalingPolicy {
                        kind: PolicyKind::Pods,
                        value: 4,
                        period: Dur::secs(15),
                    },
                ],
            },
            scale_down: ScalingRules {
                stabilization: Dur::secs(300),
                select: SelectPolicy::Max,
                policies: vec![ScalingPolicy {
                    kind: PolicyKind::Percent,
                    value: 100,
                    period: Dur::secs(15),
                }],
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingRules {
    /// Recommendations over this window are considered (the most conservative wins).
    pub stabilization: Dur,
    pub select: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectPolicy {
    Max,
    Min,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingPolicy {
    pub kind: PolicyKind,
    pub value: u32,
    pub period: Dur,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyKind {
    Pods,
    Percent,
}

impl Default for ServiceX {
    fn default() -> Self {
        ServiceX {
            metrics: MetricsTarget::default(),
            protocol: Protocol::Http,
            proxy: ProxySettings::default(),
            cold_start_timeout: default_cold_start_timeout(),
            autoscale: None,
            driver: None,
            rollout: None,
            analysis: None,
        }
    }
}

fn default_cold_start_timeout() -> Dur {
    Dur::secs(30)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Http,
    /// HTTP in, HTTP/2 cleartext (prior knowledge) to the replicas: gRPC.
    H2c,
    Tcp,
}

impl Protocol {
    fn is_http(&self) -> bool {
        *self == Protocol::Http
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Power of two choices over outstanding requests weighted by latency.
    #[default]
    P2c,
    RoundRobin,
}

/// The proxy of a service's published ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxySettings {
    pub balance: Balance,
    /// Longest time from request to response headers (504 after it).
    pub timeout: Dur,
    pub connect_timeout: Dur,
    /// A client connection with no request for this long is closed.
    pub idle_timeout: Dur,
    /// Attempts on other replicas after a connect failure.
    pub retries: u32,
    /// Most requests one replica gets at once (0: no limit).
    pub max_inflight: u32,
    /// Most requests waiting for a replica; more get 503.
    pub queue: u32,
    /// Largest request body, bytes (413 above).
    pub max_body: u64,
    /// Largest request head (request line and headers), bytes (431 above).
    pub max_header: u64,
    /// Consecutive failures after which a replica gets no traffic until it is
    /// healthy again.
    pub eject_after: u32,
    /// One line per request into the replica's logs.
    pub access_log: bool,
    /// Share of new traces the proxy samples and records a span for (requests
    /// that come with a sampled `traceparent` always get one); 0 records none
    /// and leaves sampling to the replicas.
    pub traces: f64,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            balance: Balance::P2c,
            timeout: Dur::secs(60),
            connect_timeout: Dur::secs(2),
            idle_timeout: Dur::secs(60),
            retries: 2,
            max_inflight: 0,
            queue: 1000,
            max_body: 10 << 20,
            max_header: 64 << 10,
            eject_after: 5,
            access_log: true,
            traces: 1.0,
        }
    }
}

impl ProxySettings {
    fn is_default(&self) -> bool {
        *self == ProxySettings::default()
    }
}

impl ServiceX {
    fn is_default(&self) -> bool {
        *self == ServiceX::default()
    }
}

/// Where and how often each replica's metrics are scraped (`x-capstan.metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsTarget {
    pub path: String,
    /// Port to scrape; default the replica's `$PORT`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// Scrape interval; default the stack's `x-capstan.scrape_interval`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interval: Option<Dur>,
    #[serde(default)]
    pub disable: bool,
}

impl Default for MetricsTarget {
    fn default() -> Self {
        MetricsTarget {
            path: "/metrics".into(),
            port: None,
            interval: None,
            disable: false,
        }
    }
}

impl MetricsTarget {
    fn is_default(&self) -> bool {
        *self == MetricsTarget::default()
    }
}

impl Service {
    /// The argv a process driver runs: entrypoint then command, strings through `sh -c`.
    /// Which driver runs the replicas: an image means containers unless
    /// `x-capstan.driver: process` says otherwise.
    pub fn driver(&self) -> DriverKind {
        match self.x.driver {
            Some(d) => d,
            None if self.image.is_some() || self.build.is_some() => DriverKind::Container,
            None => DriverKind::Process,
        }
    }

    pub fn argv(&self) -> Option<Vec<String>> {
        let sh = |s: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), s.to_owned()];
        match (&self.entrypoint, &self.command) {
            (None, None) => None,
            (None, Some(Cmd::Shell(s))) => Some(sh(s)),
            (None, Some(Cmd::Exec(v))) => Some(v.clone()),
            (Some(ep), cmd) => {
                let mut argv = match ep {
                    Cmd::Exec(v) => v.clone(),
                    Cmd::Shell(s) => {
                        let mut v = sh(s);
                        v.push("sh".into());
                        v
                    }
                };
                match cmd {
                    None => {}
                    Some(Cmd::Exec(v)) => argv.extend(v.iter().cloned()),
                    Some(Cmd::Shell(s)) => argv.extend(s.split_whitespace().map(str::to_owned)),
                }
                Some(argv)
            }
        }
    }

    /// Everything that requires a restart of the replicas when it changes
    /// (all but the replica count and the proxy's settings).
    /// A stable hash of what [`Service::definition_eq`] compares: a
    /// container carries it, so a daemon that finds the container after a
    /// crash knows whether it still runs the stack's definition.
    pub fn definition_hash(&self) -> String {
        let mut a = self.clone();
        a.deploy.replicas = 0;
        a.deploy.update_config = UpdateConfig::update();
        a.deploy.rollback_config = UpdateConfig::rollback();
        a.ports.clear();
        a.x.proxy = ProxySettings::default();
        a.x.protocol = Protocol::Http;
        a.x.cold_start_timeout = Dur::secs(0);
        a.x.autoscale = None;
        a.x.rollout = None;
        a.x.analysis = None;
        let text = serde_json::to_string(&a).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// What the proxy speaks on the published ports: `x-capstan.protocol`,
    /// or HTTP/2 to the replicas when a port's `app_protocol` asks for it.
    pub fn proxy_protocol(&self) -> Protocol {
        match self.x.protocol {
            Protocol::Http if self.ports.iter().any(Port::speaks_h2c) => Protocol::H2c,
            p => p,
        }
    }

    pub fn definition_eq(&self, other: &Service) -> bool {
        let mut a = self.clone();
        a.deploy.replicas = other.deploy.replicas;
        a.deploy.update_config = other.deploy.update_config.clone();
        a.deploy.rollback_config = other.deploy.rollback_config.clone();
        a.ports.clone_from(&other.ports);
        a.x.proxy = other.x.proxy.clone();
        a.x.protocol = other.x.protocol;
        a.x.cold_start_timeout = other.x.cold_start_timeout;
        a.x.autoscale.clone_from(&other.x.autoscale);
        a.x.rollout.clone_from(&other.x.rollout);
        a.x.analysis.clone_from(&other.x.analysis);
        a == *other
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host_ip: Option<String>,
    pub published: u16,
    /// The service's listener: a port number or a name such as `http`; none means `$PORT`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    pub protocol: String,
    /// Compose's `app_protocol`: `h2c`, `grpc` or `http2` make the proxy speak
    /// HTTP/2 to the replicas.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub app_protocol: Option<String>,
}

impl Port {
    /// Whether `app_protocol` says the replicas speak HTTP/2 cleartext.
    pub fn speaks_h2c(&self) -> bool {
        self.app_protocol.as_deref().is_some_and(|a| {
            ["h2c", "grpc", "http2", "kubernetes.io/h2c"]
                .iter()
                .any(|k| a.eq_ignore_ascii_case(k))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthTest {
    /// `["CMD", argv…]`
    Cmd(Vec<String>),
    /// `["CMD-SHELL", script]`
    Shell(String),
    /// HTTP GET on the replica's port; healthy on 2xx/3xx.
    Http { path: String, port: Option<u16> },
    /// TCP connect to the replica's port.
    Tcp { port: Option<u16> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Healthcheck {
    pub test: HealthTest,
    pub interval: Dur,
    pub timeout: Dur,
    pub retries: u32,
    pub start_period: Dur,
    pub start_interval: Dur,
}

impl Healthcheck {
    /// Compose's defaults (30s interval and timeout, 3 retries, 5s start interval),
    /// with a TCP check until a test is set.
    pub fn compose_defaults() -> Healthcheck {
        Healthcheck {
            test: HealthTest::Tcp { port: None },
            interval: Dur::secs(30),
            timeout: Dur::secs(30),
            retries: 3,
            start_period: Dur::secs(0),
            start_interval: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    ServiceStarted,
    ServiceHealthy,
    ServiceCompletedSuccessfully,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dependency {
    pub condition: Condition,
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deploy {
    pub replicas: u32,
    pub resources: Resources,
    pub restart_policy: RestartPolicy,
    /// How a changed definition is rolled out (`deploy.update_config`).
    #[serde(
        default = "UpdateConfig::update",
        skip_serializing_if = "UpdateConfig::is_update_default"
    )]
    pub update_config: UpdateConfig,
    /// How a failed rollout (or `capstan rollback`) goes back
    /// (`deploy.rollback_config`).
    #[serde(
        default = "UpdateConfig::rollback",
        skip_serializing_if = "UpdateConfig::is_rollback_default"
    )]
    pub rollback_config: UpdateConfig,
}

/// Swarm's `update_config` / `rollback_config`, honoured without Swarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Replicas replaced at once; 0 replaces them all at once.
    pub parallelism: u32,
    /// Wait between batches.
    pub delay: Dur,
    /// `start-first` or `stop-first`; by default start-first for a service
    /// the proxy fronts (capacity never drops), stop-first otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<UpdateOrder>,
    pub failure_action: FailureAction,
    /// How long a batch's new replicas must keep running and healthy before
    /// the batch counts as done.
    pub monitor: Dur,
    /// The share of replicas that may fail before `failure_action` applies.
    pub max_failure_ratio: f64,
}

impl UpdateConfig {
    /// The defaults for an update: one at a time, watched for 10 s, rolled
    /// back on failure.
    pub fn update() -> UpdateConfig {
        UpdateConfig {
            parallelism: 1,
            delay: Dur::secs(0),
            order: None,
            failure_action: FailureAction::Rollback,
            monitor: Dur::secs(10),
            max_failure_ratio: 0.0,
        }
    }

    /// The defaults for going back: everything at once, not watched, paused
    /// if even that fails.
    pub fn rollback() -> UpdateConfig {
        UpdateConfig {
            parallelism: 0,
            delay: Dur::secs(0),
            order: None,
            failure_action: FailureAction::Pause,
            monitor: Dur::secs(0),
            max_failure_ratio: 0.0,
        }
    }

    pub fn is_update_default(&self) -> bool {
        *self == UpdateConfig::update()
    }

    pub fn is_rollback_default(&self) -> bool {
        *self == UpdateConfig::rollback()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    StartFirst,
    StopFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    Rollback,
    Pause,
    Continue,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Limits {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpus: Option<f64>,
    /// Bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pids: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    None,
    OnFailure,
    Any,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    /// First backoff delay; doubles per consecutive failure up to 30s.
    pub delay: Dur,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_attempts: Option<u32>,
    /// A replica up this long has its backoff and attempt count reset.
    pub window: Dur,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::None,
            delay: Dur(Duration::from_millis(100)),
            max_attempts: None,
            window: Dur(Duration::from_secs(30)),
        }
    }
}

/// A duration written as compose does: `1m30s`, `500ms`, `2h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }

    pub fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }

    pub fn zero() -> Dur {
        Dur(Duration::ZERO)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total_ms = self.0.as_millis();
        if total_ms == 0 {
            return f.write_str("0s");
        }
        let (h, rem) = (total_ms / 3_600_000, total_ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `1h2m3s`, `1.5s`, `500ms`, `10us`, `15d`, `2w`; `0` alone is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err("expected a duration like 10s, 1m30s or 500ms, found an empty string".into());
    }
    let bad = || format!("expected a duration like 10s, 1m30s or 500ms, found {s:?}");
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_len == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            // Days and weeks, as Prometheus' retention flags write them.
            "d" => 86_400.0,
            "w" => 604_800.0,
            _ => return Err(bad()),
        };
        total += n * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

/// Parses a memory size: `512m`, `1g`, `1.5GiB`, `100000` (bytes), binary multiples.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || format!("expected a size like 512m or 1g, found {s:?}");
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    if num_len == 0 {
        return Err(bad());
    }
    let n: f64 = t[..num_len].parse().map_err(|_| bad())?;
    let unit = t[num_len..].trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad()),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten seconds").is_err());
        assert_eq!(Dur(Duration::from_millis(90_500)).to_string(), "1m30s500ms");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("64MB").unwrap(), 64 << 20);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn argv_forms() {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "stop_signal": "SIGTERM", "stop_grace_period": "10s",
            "deploy": {"replicas": 1, "resources": {"limits": {}},
                "restart_policy": {"condition": "none", "delay": "100ms", "window": "30s"}},
            "command": "echo hi"
        }))
        .unwrap();
        assert_eq!(s.argv().unwrap(), vec!["/bin/sh", "-c", "echo hi"]);
        s.command = Some(Cmd::Exec(vec!["a".into(), "b".into()]));
        s.entrypoint = Some(Cmd::Exec(vec!["ep".into()]));
        assert_eq!(s.argv().unwrap(), vec!["ep", "a", "b"]);
    }
}
