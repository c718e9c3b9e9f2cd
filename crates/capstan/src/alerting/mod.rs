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
