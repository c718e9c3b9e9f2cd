//! capstan's own metrics and its replicas' resources (cAdvisor names).

use capstan_tsdb::{Db, Reject};

use super::Exposition;
use crate::state::{Health, Phase, Status, StatusBoard};

const STATES: [Phase; 9] = [
    Phase::Waiting,
    Phase::Starting,
    Phase::Running,
    Phase::Restarting,
    Phase::CrashLooping,
    Phase::Stopping,
    Phase::Stopped,
    Phase::Exited,
    Phase::Failed,
];

/// What capstan's own metrics are read from.
pub struct Sources<'a> {
    pub board: &'a StatusBoard,
    pub scrape: &'a crate::scrape::ScrapeStats,
    pub proxy: &'a crate::proxy::Proxy,
    pub autoscaler: &'a crate::autoscale::Autoscaler,
    pub history: &'a crate::state::history::History,
    pub notify: &'a crate::notify::NotifyStats,
    pub remote_write: &'a [std::sync::Arc<crate::forward::remote_write::Stats>],
    /// Logs and traces forwarding targets.
    pub forward: &'a crate::forward::Forwarding,
    pub alerting: &'a crate::alerting::manager::Alerting,
}

/// One family with a sample per replica for which `value` gives a figure.
fn per_replica(
    e: &mut Exposition,
    replicas: &[Status],
    (name, kind, help): (&str, &str, &str),
    value: impl Fn(&Status) -> Option<f64>,
) {
    e.family(name, kind, help);
    for s in replicas {
        if let Some(v) = value(s) {
            let (svc, r, rev) = labels(s);
            e.sample(
                name,
                &[("service", &svc), ("replica", &r), ("revision", &rev)],
                v,
            );
        }
    }
}

/// A replica's labels: service, replica (index) and revision.
fn labels(s: &Status) -> (String, String, String) {
    (
        s.service.clone(),
        s.replica.to_string(),
        s.revision.to_string(),
    )
}

/// Releases: rollouts ended, each service's newest revision, notifications.
fn releases(e: &mut Exposition, src: &Sources<'_>) {
    use std::sync::atomic::Ordering;
    e.family(
        "capstan_rollouts_total",
        "counter",
        "Rollouts ended since the daemon started, by result (rolled, rolled_back, paused, failed).",
    );
    for ((service, result), n) in src.history.outcomes() {
        e.sample(
            "capstan_rollouts_total",
            &[("service", &service), ("result", result)],
            n as f64,
        );
    }
    e.family(
        "capstan_service_revision",
        "gauge",
        "Each service's newest revision (its status as a label).",
    );
    for (service, revision, status) in src.history.latest() {
        e.sample(
            "capstan_service_revision",
            &[("service", &service), ("status", status.as_str())],
            revision as f64,
        );
    }
    e.family(
        "capstan_rollout_step",
        "gauge",
        "The step a canary is on (1-based; one past the last while promoting and baking).",
    );
    let canaries: Vec<_> = src
        .board
        .services()
        .into_iter()
        .filter_map(|s| Some((s.name, s.rollout?.canary?)))
        .collect();
    for (service, c) in &canaries {
        e.sample(
            "capstan_rollout_step",
            &[("service", service)],
            f64::from(c.step),
        );
    }
    e.family(
        "capstan_rollout_canary_weight",
        "gauge",
        "The canary's share of requests, in percent.",
    );
    for (service, c) in &canaries {
        e.sample(
            "capstan_rollout_canary_weight",
            &[("service", service)],
            f64::from(c.weight),
        );
    }
    e.family(
        "capstan_rollout_verdicts_total",
        "counter",
        "Canary check runs, by check and result (pass, fail, inconclusive).",
    );
    for ((service, check, result), n) in src.history.verdicts() {
        e.sample(
            "capstan_rollout_verdicts_total",
            &[("service", &service), ("check", &check), ("result", result)],
            n as f64,
        );
    }
    e.family(
        "capstan_alert_notifications_total",
        "counter",
        "Batches of alerts posted to the Alertmanagers, by result (sent, failed after 3 tries, dropped when the queue was full).",
    );
    for (result, n) in [
        ("sent", &src.alerting.stats.sent),
        ("failed", &src.alerting.stats.failed),
        ("dropped", &src.alerting.stats.dropped),
    ] {
        e.sample(
            "capstan_alert_notifications_total",
            &[("result", result)],
            n.load(Ordering::Relaxed) as f64,
        );
    }
    e.family(
        "capstan_rule_group_iterations_missed_total",
        "counter",
        "Rule group evaluations that were due and did not run.",
    );
    let groups = src.alerting.groups();
    for g in &groups {
        e.sample(
            "capstan_rule_group_iterations_missed_total",
            &[("rule_group", &format!("{};{}", g.file, g.name))],
            g.missed as f64,
        );
    }
    e.family(
        "capstan_rule_group_last_duration_seconds",
        "gauge",
        "How long the last evaluation of each rule group took.",
    );
    for g in &groups {
        e.sample(
            "capstan_rule_group_last_duration_seconds",
            &[("rule_group", &format!("{};{}", g.file, g.name))],
            g.eval_secs,
        );
    }
    e.family(
        "capstan_notifications_total",
        "counter",
        "Release notifications to the webhook, by result (sent, failed after every try, dropped when the queue was full).",
    );
    for (result, n) in [
        ("sent", &src.notify.sent),
        ("failed", &src.notify.failed),
        ("dropped", &src.notify.dropped),
    ] {
        e.sample(
            "capstan_notifications_total",
            &[("result", result)],
            n.load(Ordering::Relaxed) as f64,
        );
    }
}

pub fn collect(src: &Sources<'_>, db: &Db) -> String {
    let mut e = Exposition::default();
    releases(&mut e, src);
    crate::forward::remote_write::expose(&mut e, "remote_write", src.remote_write);
    crate::forward::remote_write::expose(&mut e, "logs_forward", &src.forward.logs);
    crate::forward::remote_write::expose(&mut e, "traces_forward", &src.forward.traces);
    let replicas = src.board.replicas();
    let running = |s: &Status| s.pid.is_some();
    e.family(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative CPU time consumed by the replica, in seconds.",
    );
    for s in replicas.iter().filter(|s| running(s)) {
        if let Some(v) = s.cpu_seconds_total {
            let (svc, r, rev) = labels(s);
            e.sample_at(
                "container_cpu_usage_seconds_total",
                &[("service", &svc), ("replica", &r), ("revision", &rev)],
                v,
                s.cpu_sampled_ms,
            );
        }
    }
    per_replica(
        &mut e,
        &replicas,
        (
            "container_memory_working_set_bytes",
            "gauge",
            "Current working set of the replica, in bytes.",
        ),
        |s| s.memory_bytes.filter(|_| running(s)).map(|v| v as f64),
    );
    per_replica(
        &mut e,
        &replicas,
        (
            "container_memory_rss",
            "gauge",
            "Size of the replica's RSS, in bytes.",
        ),
        |s| s.memory_rss_bytes.filter(|_| running(s)).map(|v| v as f64),
    );
    per_replica(
        &mut e,
        &replicas,
        (
            "container_spec_memory_limit_bytes",
            "gauge",
            "Memory limit of the replica, in bytes (0: none).",
        ),
        |s| running(s).then(|| s.memory_limit_bytes.unwrap_or(0) as f64),
    );
    per_replica(
        &mut e,
        &replicas,
        (
            "capstan_replica_restarts_total",
            "counter",
            "Restarts of the replica since the daemon started it.",
        ),
        |s| Some(f64::from(s.restarts)),
    );
    e.family(
        "capstan_replica_state",
        "gauge",
        "1 for the replica's current state.",
    );
    for s in &replicas {
        let (svc, r, rev) = labels(s);
        for st in STATES {
            e.sample(
                "capstan_replica_state",
                &[
                    ("service", &svc),
                    ("replica", &r),
                    ("revision", &rev),
                    ("state", st.as_str()),
                ],
                if s.state == st { 1.0 } else { 0.0 },
            );
        }
    }
    e.family(
        "capstan_replica_healthy",
        "gauge",
        "1 when the replica's health check passes, 0 when it fails (absent without a check).",
    );
    for s in replicas
        .iter()
        .filter(|s| matches!(s.health, Health::Healthy | Health::Unhealthy))
    {
        let (svc, r, rev) = labels(s);
        e.sample(
            "capstan_replica_healthy",
            &[("service", &svc), ("replica", &r), ("revision", &rev)],
            if s.health == Health::Healthy {
                1.0
            } else {
                0.0
            },
        );
    }

    use std::sync::atomic::Ordering::Relaxed;
    let st = src.scrape;
    e.single(
        "capstan_scrape_targets",
        "gauge",
        "Targets being scraped.",
        st.targets.load(Relaxed) as f64,
    );
    e.family(
        "capstan_scrapes_total",
        "counter",
        "Scrapes done, by result.",
    );
    e.sample(
        "capstan_scrapes_total",
        &[("result", "ok")],
        st.ok.load(Relaxed) as f64,
    );
    e.sample(
        "capstan_scrapes_total",
        &[("result", "failed")],
        st.failed.load(Relaxed) as f64,
    );
    e.single(
        "capstan_scrape_duration_seconds_total",
        "counter",
        "Time spent scraping (fetch, parse, store), in seconds.",
        st.duration_us.load(Relaxed) as f64 / 1e6,
    );
    e.single(
        "capstan_tsdb_head_series",
        "gauge",
        "Series in the metrics store's head.",
        db.series_count() as f64,
    );
    e.single(
        "capstan_tsdb_samples_appended_total",
        "counter",
        "Samples stored.",
        db.stats.samples_appended.load(Relaxed) as f64,
    );
    e.single(
        "capstan_tsdb_series_created_total",
        "counter",
        "Series created.",
        db.stats.series_created.load(Relaxed) as f64,
    );
    e.family(
        "capstan_tsdb_samples_rejected_total",
        "counter",
        "Samples not stored, by reason.",
    );
    for r in Reject::ALL {
        e.sample(
            "capstan_tsdb_samples_rejected_total",
            &[("reason", r.as_str())],
            db.stats.rejected(r) as f64,
        );
    }
    crate::proxy::metrics::expose(&mut e, &src.proxy.backends());
    crate::autoscale::expose(&mut e, src.autoscaler);
    e.single(
        "capstan_api_panics_total",
        "counter",
        "API requests whose handler failed (answered 500 and logged).",
        crate::api::guard::PANICS.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    e.family(
        "capstan_ingest_items_refused_total",
        "counter",
        "Pushed items refused one by one (labels, timestamps, forged streams), by API; rejected metric samples are in capstan_tsdb_samples_rejected_total.",
    );
    for (api, n) in &crate::api::ingest::REFUSED {
        e.sample(
            "capstan_ingest_items_refused_total",
            &[("api", api)],
            n.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    e.single(
        "capstan_ingest_throttled_total",
        "counter",
        "Push requests (remote_write, Loki, OTLP) answered 429 for want of a free slot.",
        crate::api::guard::THROTTLED.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );
    e.single(
        "capstan_tsdb_wal_size_bytes",
        "gauge",
        "Size of the write-ahead log.",
        db.wal_size() as f64,
    );
    e.finish()
}
