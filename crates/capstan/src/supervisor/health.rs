//! Health checks with compose's timing and retry rules.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::spec::Healthcheck;

pub use crate::probe::probe;

/// A health transition reported to the replica's task.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Healthy,
    Unhealthy(String),
}

/// Probes forever, sending a [`Health`] on every change of status. Follows
/// compose: probes every `start_interval` during `start_period` (where failures do
/// not count) until the first success, then every `interval`; `retries`
/// consecutive failures make the replica unhealthy, one success makes it healthy.
/// Until the first success, probes come quickly — every eighth of the time
/// since the start, at least 1 ms apart, up to the interval — and their failures
/// do not count, so a replica takes traffic within an eighth of its own start
/// time of listening (a cold start waits on this).
pub async fn watch(hc: Healthcheck, probe: super::driver::Prober, tx: mpsc::Sender<Health>) {
    let started = tokio::time::Instant::now();
    let mut failures = 0u32;
    let mut current: Option<bool> = None;
    let quick = || (started.elapsed() / 8).max(Duration::from_millis(1));
    tokio::time::sleep(quick()).await;
    loop {
        let warming = current.is_none() && quick() < hc.interval.0;
        let starting = warming || (started.elapsed() < hc.start_period.0 && current != Some(true));
        let next = match probe(hc.test.clone(), hc.timeout.0).await {
            Ok(()) => {
                failures = 0;
                (current != Some(true)).then_some(Health::Healthy)
            }
            Err(reason) => {
                if !starting {
                    failures += 1;
                }
                (failures >= hc.retries.max(1) && current != Some(false)).then(|| {
                    Health::Unhealthy(format!(
                        "{failures} consecutive failed checks, last: {reason}"
                    ))
                })
            }
        };
        if let Some(h) = next {
            current = Some(h == Health::Healthy);
            if tx.send(h).await.is_err() {
                return;
            }
        }
        let pause = if warming && current.is_none() {
            quick()
        } else if starting {
            hc.start_interval.0
        } else {
            hc.interval.0
        };
        tokio::time::sleep(pause).await;
    }
}
