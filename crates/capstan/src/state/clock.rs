//! The one place the daemon reads the time. `clippy.toml` forbids
//! `std::time::Instant::now` and `SystemTime::now` everywhere else, so every
//! controller takes a [`Clock`] and runs on tokio's paused time in tests.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Monotonic and wall time, as a controller sees it.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time (tokio's: pausable in tests).
    fn now(&self) -> Instant;
    /// Wall time in unix milliseconds.
    fn unix_ms(&self) -> i64;
}

/// The machine's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> i64 {
        unix_ms()
    }
}

/// Wall time that moves with tokio's (paused) time from a fixed start: for tests.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: Instant,
    start_unix_ms: i64,
}

impl TokioClock {
    pub fn starting_at(unix_ms: i64) -> TokioClock {
        TokioClock {
            start: Instant::now(),
            start_unix_ms: unix_ms,
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_ms(&self) -> i64 {
        self.start_unix_ms + self.start.elapsed().as_millis() as i64
    }
}

/// Wall time since the unix epoch.
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

pub fn unix_ms() -> i64 {
    since_epoch().as_millis() as i64
}

pub fn unix_ns() -> i64 {
    since_epoch().as_nanos() as i64
}

/// A monotonic instant for measuring how long something took (latencies,
/// uptimes): not for deciding, which goes through a [`Clock`].
pub fn stopwatch() -> std::time::Instant {
    std::time::Instant::now()
}
