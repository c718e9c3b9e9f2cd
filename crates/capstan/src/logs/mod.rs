//! Replica output: captured line by line ([`capture`]) and kept in the log
//! store ([`engine::LogEngine`] over `capstan-logstore`). The supervisor only sees
//! [`LogRecord`] and the engine's `append`/`query`/`subscribe`.

pub mod capture;
pub mod engine;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// The proxy's access log of requests the replica answered.
    Proxy,
    /// Log records the replica sent over OTLP.
    Otlp,
    /// Capstan's record of alert transitions (service `capstan`).
    Alerts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Unix time in nanoseconds when the line was read.
    pub ts_ns: i64,
    pub service: String,
    pub replica: u32,
    pub stream: Stream,
    /// The store's sequence number: increasing in append order (so per replica
    /// too), across restarts and rotations.
    pub seq: u64,
    pub line: String,
    /// True when the line was cut (too long, or the stream ended without a newline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Which records a query wants.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogQuery {
    /// Empty means every service.
    #[serde(default)]
    pub services: Vec<String>,
    pub replica: Option<u32>,
    /// Only records at or after this time (unix ns).
    pub since_ns: Option<i64>,
    /// Only the last N records of each replica.
    pub tail: Option<usize>,
}

impl LogQuery {
    pub fn wants(&self, service: &str, replica: u32) -> bool {
        (self.services.is_empty() || self.services.iter().any(|s| s == service))
            && self.replica.is_none_or(|r| r == replica)
    }
}

pub fn now_ns() -> i64 {
    crate::state::clock::unix_ns()
}
