//! Alerting: Prometheus rule files, evaluated against the metrics store.

pub mod anomaly;
pub mod backtest;
pub mod file;
pub mod group;
pub mod manager;
pub mod rule;
pub mod template;
pub mod unittest;
pub mod webhook;

/// A time (unix ms) as RFC 3339, as Prometheus and Alertmanager write it.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| String::new(), |t| t.to_string())
}
