//! Release notifications: every deploy, rollout end, rollback and pause is
//! posted as JSON to `x-capstan.notify.webhook`, retried with backoff. A
//! receiver that is down or slow never holds a rollout back: events queue
//! (up to [`QUEUE`]; more are dropped and counted) and one task delivers them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};

use crate::events::{Event, EventLog};

/// Event kinds that are sent.
pub const KINDS: &[&str] = &[
    "updated",
    "rolled",
    "rollback",
    "paused",
    "rollout-continue",
    "canary-step",
    "verdict",
    "promoted",
];

/// Notifications waiting to be delivered, at most.
pub const QUEUE: usize = 1000;

/// Tries per notification, the waits between them doubling from 1 s.
pub const TRIES: u32 = 5;

/// How long one delivery may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Delivery counts, for `capstan_notifications_total`.
#[derive(Default)]
pub struct NotifyStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The JSON body of a notification.
pub fn body(stack: &str, e: &Event) -> serde_json::Value {
    serde_json::json!({
        "stack": stack,
        "service": e.service,
        "kind": e.kind,
        "reason": e.reason,
        "time_ms": e.time_ms,
    })
}

/// Queues a notification; when the queue is full it is dropped and counted.
fn offer(tx: &mpsc::Sender<Vec<u8>>, stats: &NotifyStats, body: Vec<u8>) {
    if tx.try_send(body).is_err() {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// One POST of JSON; the error says why it did not get a 2xx.
pub(crate) async fn post(url: &hyper::Uri, body: Vec<u8>) -> Result<(), String> {
    match crate::forward::post(url, &[("content-type", "application/json")], body).await? {
        code if (200..300).contains(&code) => Ok(()),
        code => Err(format!("the receiver answered {code}")),
    }
}

/// Follows the event log and delivers the release events until `stop`.
pub async fn run(
    url: String,
    stack: String,
    events: Arc<EventLog>,
    stats: Arc<NotifyStats>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(url) = url.parse::<hyper::Uri>() else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (_, mut sub) = events.subscribe_with_history();
    let feed_stats = stats.clone();
    let feed = async move {
        loop {
            match sub.recv().await {
                Ok(e) if KINDS.contains(&e.kind.as_str()) => {
                    let b = serde_json::to_vec(&body(&stack, &e)).unwrap_or_default();
                    offer(&tx, &feed_stats, b);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    feed_stats.dropped.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    let deliver = async {
        while let Some(b) = rx.recv().await {
            let mut wait = Duration::from_secs(1);
            let mut last = String::new();
            let mut ok = false;
            for attempt in 1..=TRIES {
                match tokio::time::timeout(TIMEOUT, post(&url, b.clone())).await {
                    Ok(Ok(())) => {
                        ok = true;
                        break;
                    }
                    Ok(Err(e)) => last = e,
                    Err(_) => last = format!("no answer within {TIMEOUT:?}"),
                }
                if attempt < TRIES {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
            if ok {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("notification to {url} not delivered after {TRIES} tries: {last}");
            }
        }
    };
    tokio::select! {
        _ = feed => {}
        _ = deliver => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let stats = NotifyStats::default();
        for _ in 0..QUEUE + 3 {
            offer(&tx, &stats, b"{}".to_vec());
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 3);
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, QUEUE);
    }
}
