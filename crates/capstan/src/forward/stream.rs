//! Logs and traces out: every entry of the log store to Loki's push API
//! (protobuf and snappy) at `x-capstan.logs.forward`, every span of the trace
//! store to an OTLP/HTTP receiver at `x-capstan.traces.forward`.
//!
//! As for remote_write, the queue is the store: each target has a durable
//! cursor, here the store's sequence number (every entry gets the next one
//! when it is stored), so entries go out in the order they were stored —
//! late timestamps included — each once. A round reads at most
//! [`MAX_ROUND`] entries after the cursor (the smallest sequence numbers
//! first), sends them in batches of `queue_config.max_samples_per_send`
//! entries with retries, and moves the cursor only once they are delivered.
//! Forwarding only reads the store: it never slows what is stored.

use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_logstore::{Entry, Labels, Query, Store};
use prost::Message;
use tokio::sync::watch;

use super::remote_write::{Stats, prepare, read_cursor, send, target_headers, write_cursor};
use crate::scrape::relabel::Rule;
use crate::spec::RemoteWriteConfig;

/// Entries one round reads at most (the rest follow at once).
pub const MAX_ROUND: usize = 50_000;

/// What is forwarded, and so how.
#[derive(Clone)]
pub enum Source {
    /// The log store, to Loki's push API (`/loki/api/v1/push`), protobuf and snappy.
    Logs(Arc<crate::logs::engine::LogEngine>),
    /// The trace store, to an OTLP/HTTP receiver (`/v1/traces`), protobuf.
    Traces(Arc<crate::traces::TraceStore>),
}

impl Source {
    fn store(&self) -> &Store {
        match self {
            Source::Logs(l) => l.store(),
            Source::Traces(t) => t.store(),
        }
    }
}

/// The entries after `after` with the smallest sequence numbers, at most `n`,
/// in sequence order.
pub fn next_entries(
    store: &Store,
    after: u64,
    n: usize,
) -> Result<Vec<(Arc<Labels>, Entry)>, capstan_logstore::Error> {
    struct BySeq(Arc<Labels>, Entry);
    impl PartialEq for BySeq {
        fn eq(&self, o: &Self) -> bool {
            self.1.seq == o.1.seq
        }
    }
    impl Eq for BySeq {}
    impl PartialOrd for BySeq {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for BySeq {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.1.seq.cmp(&o.1.seq)
        }
    }
    // A max-heap of the n smallest sequence numbers seen.
    let mut heap: BinaryHeap<BySeq> = BinaryHeap::new();
    let q = Query {
        after_seq: after,
        ..Query::all(&|_| true)
    };
    store.visit(&q, capstan_logstore::Direction::Forward, &mut |_, batch| {
        for (l, e) in batch {
            if heap.len() < n {
                heap.push(BySeq(l, e));
            } else if heap.peek().is_some_and(|top| e.seq < top.1.seq) {
                heap.pop();
                heap.push(BySeq(l, e));
            }
        }
        true
    })?;
    let mut out: Vec<(Arc<Labels>, Entry)> = heap.into_iter().map(|b| (b.0, b.1)).collect();
    out.sort_by_key(|(_, e)| e.seq);
    Ok(out)
}

/// A Loki push body (before compression) for entries, their stream labels
/// relabeled by `rules` (a stream they drop is not sent).
pub fn loki_body(entries: &[(Arc<Labels>, Entry)], rules: &[Rule]) -> Vec<u8> {
    use crate::ingest::loki::{EntryAdapter, LabelPair, PushRequest, StreamAdapter, Timestamp};
    let mut streams: Vec<StreamAdapter> = Vec::new();
    let mut index: std::collections::HashMap<*const Labels, Option<usize>> = Default::default();
    for (l, e) in entries {
        let at = *index.entry(Arc::as_ptr(l)).or_insert_with(|| {
            let pairs: Vec<(String, String)> = l
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let pairs = crate::scrape::relabel::apply(pairs, rules)?;
            let selector = pairs
                .iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            streams.push(StreamAdapter {
                labels: format!("{{{selector}}}"),
                entries: Vec::new(),
                hash: 0,
            });
            Some(streams.len() - 1)
        });
        let Some(at) = at else {
            continue;
        };
        streams[at].entries.push(EntryAdapter {
            timestamp: Some(Timestamp {
                seconds: e.ts_ns.div_euclid(1_000_000_000),
                nanos: e.ts_ns.rem_euclid(1_000_000_000) as i32,
            }),
            line: e.line.clone(),
            structured_metadata: e
                .meta
                .iter()
                .map(|(name, value)| LabelPair {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
        });
    }
    PushRequest { streams }.encode_to_vec()
}

/// An OTLP ExportTraceServiceRequest body for stored spans.
pub fn otlp_body(entries: &[(Arc<Labels>, Entry)]) -> Vec<u8> {
    let rows: Vec<crate::traces::SpanRow> = entries
        .iter()
        .filter_map(|(l, e)| {
            Some(crate::traces::SpanRow {
                resource: l.clone(),
                span: serde_json::from_str(&e.line).ok()?,
            })
        })
        .collect();
    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
        resource_spans: crate::traces::resource_spans(rows),
    }
    .encode_to_vec()
}

/// Forwards a store's entries to one target until `stop`.
pub async fn run(
    source: Source,
    cfg: RemoteWriteConfig,
    dir: PathBuf,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let Some((url, path, rules)) = prepare(&cfg, &dir, &stats) else {
        return;
    };
    let mut headers = match source {
        Source::Logs(_) => vec![
            (
                "content-type".to_owned(),
                "application/x-protobuf".to_owned(),
            ),
            ("content-encoding".to_owned(), "snappy".to_owned()),
        ],
        Source::Traces(_) => vec![(
            "content-type".to_owned(),
            "application/x-protobuf".to_owned(),
        )],
    };
    headers.extend(target_headers(&cfg));
    let per_send = cfg.queue_config.max_samples_per_send.max(1) as usize;

    // A first start forwards from now on; a restart goes on where it stopped.
    let mut cursor = read_cursor(&path)
        .map(|c| c.max(0) as u64)
        .unwrap_or_else(|| source.store().last_seq());
    stats.shards.store(1, Ordering::Relaxed);
    loop {
        let (s2, from) = (source.clone(), cursor);
        let next = tokio::task::spawn_blocking(move || next_entries(s2.store(), from, MAX_ROUND))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let full = next.len() == MAX_ROUND;
        for batch in next.chunks(per_send) {
            let body = match source {
                Source::Logs(_) => snap::raw::Encoder::new()
                    .compress_vec(&loki_body(batch, &rules))
                    .unwrap_or_default(),
                Source::Traces(_) => otlp_body(batch),
            };
            if !send(
                &cfg,
                &url,
                &headers,
                body,
                batch.len() as u64,
                &stats,
                &mut stop,
            )
            .await
            {
                return; // stopping: these go again next time
            }
            cursor = batch.last().map_or(cursor, |(_, e)| e.seq);
            stats.sent_up_to_ms.store(
                batch.last().map_or(0, |(_, e)| e.ts_ns / 1_000_000),
                Ordering::Relaxed,
            );
            if let Err(e) = write_cursor(&path, cursor as i64) {
                tracing::warn!(target = %stats.name, error = %e, "cannot keep the forwarding cursor");
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.queue_config.batch_send_deadline.0.max(Duration::from_millis(100))) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
