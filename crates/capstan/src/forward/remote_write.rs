//! Prometheus remote_write 1.0 out (`x-capstan.remote_write`): every sample
//! the metrics store holds is also sent to each receiver, in time order.
//!
//! The queue is the store itself: each receiver has a durable cursor (the
//! time up to which everything was delivered, in `remote_write/NAME.cursor`
//! in the data dir). Every `batch_send_deadline` the samples after the cursor
//! (up to a little before now, so scrapes in flight land first) are read back
//! from the store, relabeled, split among shards by their labels, sent in
//! batches of `max_samples_per_send` with retries (exponential back-off
//! between `min_backoff` and `max_backoff`), and the cursor moves only once
//! the whole window is delivered. A receiver that is down for a while gets
//! everything since, in windows of at most [`MAX_WINDOW_MS`], when it comes
//! back — within the store's retention nothing is lost, across daemon
//! restarts too. A 4xx answer (other than 429) drops that batch and counts it
//! as failed, as Prometheus does. Samples stored later than [`LAG_MS`] after
//! their own timestamp (pushed late by another sender) are not forwarded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use capstan_tsdb::{Db, MatchOp, Matcher};
use prost::Message;
use tokio::sync::watch;

use crate::api::remote_write::{Label, Sample, TimeSeries, WriteRequest};
use crate::scrape::relabel::Rule;
use crate::spec::RemoteWriteConfig;

/// How long after a sample's time it is read for sending: scrapes in flight
/// (and the store's commit) land first.
pub const LAG_MS: i64 = 10_000;

/// The most one round sends after an outage (the rest follows at once).
pub const MAX_WINDOW_MS: i64 = 5 * 60_000;

/// Counters of one receiver, for `capstan_remote_write_*`.
#[derive(Default)]
pub struct Stats {
    pub name: String,
    pub url: String,
    pub samples: AtomicU64,
    pub failed_samples: AtomicU64,
    pub retried_samples: AtomicU64,
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
    /// The cursor: everything up to here (unix ms) is delivered.
    pub sent_up_to_ms: AtomicI64,
    pub shards: AtomicU64,
}

/// A receiver's name: given, or the URL's host and port.
pub fn name_of(c: &RemoteWriteConfig) -> String {
    c.name.clone().unwrap_or_else(|| {
        c.url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_else(|| c.url.clone())
    })
}

pub fn cursor_path(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}.cursor"))
}

pub fn read_cursor(path: &Path) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub fn write_cursor(path: &Path, t: i64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, t.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The requests of one window: series relabeled, split into `shards` by
/// their labels, each shard's samples in batches of at most `per_send`.
pub fn batches(
    db: &Db,
    rules: &[Rule],
    from_ms: i64,
    to_ms: i64,
    shards: usize,
    per_send: usize,
) -> Vec<Vec<WriteRequest>> {
    let all = [Matcher::new("__name__", MatchOp::Regex, ".+").expect("a valid regex")];
    let mut by_shard: Vec<Vec<WriteRequest>> = (0..shards).map(|_| Vec::new()).collect();
    let mut open: Vec<(WriteRequest, usize)> =
        (0..shards).map(|_| (WriteRequest::default(), 0)).collect();
    // `select` includes both ends; the window is (from, to].
    for s in db.select(&all, from_ms + 1, to_ms) {
        let labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let Some(labels) = crate::scrape::relabel::apply(labels, rules) else {
            continue;
        };
        let samples: Vec<Sample> = s
            .samples()
            .map(|(t, v)| Sample {
                value: v,
                timestamp: t,
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        let shard = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            labels.hash(&mut h);
            (h.finish() % shards as u64) as usize
        };
        let labels: Vec<Label> = labels
            .into_iter()
            .map(|(name, value)| Label { name, value })
            .collect();
        for chunk in samples.chunks(per_send) {
            let (req, n) = &mut open[shard];
            if *n + chunk.len() > per_send && *n > 0 {
                by_shard[shard].push(std::mem::take(req));
                *n = 0;
            }
            req.timeseries.push(TimeSeries {
                labels: labels.clone(),
                samples: chunk.to_vec(),
                histograms: Vec::new(),
            });
            *n += chunk.len();
        }
    }
    for (shard, (req, n)) in open.into_iter().enumerate() {
        if n > 0 {
            by_shard[shard].push(req);
        }
    }
    by_shard
}

fn samples_in(r: &WriteRequest) -> u64 {
    r.timeseries.iter().map(|t| t.samples.len() as u64).sum()
}

/// Sends one request until it is delivered or refused for good; false when
/// stopping interrupted it.
async fn deliver(
    cfg: &RemoteWriteConfig,
    url: &hyper::Uri,
    headers: &[(String, String)],
    req: &WriteRequest,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let body = snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .unwrap_or_default();
    send(cfg, url, headers, body, samples_in(req), stats, stop).await
}

/// Posts `body` (`n` items) until it is delivered or refused for good (a
/// 4xx other than 429: dropped and counted); retries wait `min_backoff`,
/// doubling up to `max_backoff`. False when stopping interrupted it.
pub async fn send(
    cfg: &RemoteWriteConfig,
    url: &hyper::Uri,
    headers: &[(String, String)],
    body: Vec<u8>,
    n: u64,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let q = &cfg.queue_config;
    let mut backoff = q.min_backoff.0.max(Duration::from_millis(1));
    loop {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sent = tokio::time::timeout(cfg.remote_timeout.0, super::post(url, &h, body.clone()))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        match sent {
            Ok(code) if (200..300).contains(&code) => {
                stats.samples.fetch_add(n, Ordering::Relaxed);
                stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(code) if (400..500).contains(&code) && code != 429 => {
                tracing::warn!(remote = %stats.name, code, "a batch was refused; dropped");
                stats.failed_samples.fetch_add(n, Ordering::Relaxed);
                return true;
            }
            Ok(code) => tracing::debug!(remote = %stats.name, code, "will retry"),
            Err(e) => tracing::debug!(remote = %stats.name, error = %e, "will retry"),
        }
        stats.retried_samples.fetch_add(n, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return false,
        }
        backoff = (backoff * 2).min(q.max_backoff.0.max(Duration::from_millis(1)));
    }
}

/// The headers every request carries.
fn headers(cfg: &RemoteWriteConfig) -> Vec<(String, String)> {
    let mut h = vec![
        (
            "content-type".to_owned(),
            "application/x-protobuf".to_owned(),
        ),
        ("content-encoding".to_owned(), "snappy".to_owned()),
        (
            "x-prometheus-remote-write-version".to_owned(),
            "0.1.0".to_owned(),
        ),
    ];
    h.extend(target_headers(cfg));
    h
}

/// A target's own headers and credentials.
pub fn target_headers(cfg: &RemoteWriteConfig) -> Vec<(String, String)> {
    use base64::Engine;
    let mut h = Vec::new();
    for (k, v) in &cfg.headers {
        h.push((k.to_ascii_lowercase(), v.clone()));
    }
    if let Some(a) = &cfg.authorization {
        h.push((
            "authorization".into(),
            format!("{} {}", a.kind, a.credentials),
        ));
    }
    if let Some(b) = &cfg.basic_auth {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", b.username, b.password));
        h.push(("authorization".into(), format!("Basic {token}")));
    }
    h
}

/// A target's URL, its cursor file (its folder made) and relabeling rules.
pub fn prepare(
    cfg: &RemoteWriteConfig,
    dir: &Path,
    stats: &Stats,
) -> Option<(hyper::Uri, PathBuf, Vec<Rule>)> {
    let url = cfg.url.parse::<hyper::Uri>().ok()?;
    let _ = std::fs::create_dir_all(dir);
    let rules = cfg
        .write_relabel_configs
        .iter()
        .filter_map(|r| Rule::new(r.clone()).ok())
        .collect();
    Some((url, cursor_path(dir, &stats.name), rules))
}

/// Sends to one receiver until `stop`.
pub async fn run(
    cfg: RemoteWriteConfig,
    db: Arc<Db>,
    dir: PathBuf,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let Some((url, path, rules)) = prepare(&cfg, &dir, &stats) else {
        return;
    };
    let headers = headers(&cfg);
    let q = cfg.queue_config.clone();
    let shards = q.max_shards.max(1) as usize;
    stats.shards.store(shards as u64, Ordering::Relaxed);
    // A first start sends from now on; a restart goes on where it stopped.
    let mut cursor = read_cursor(&path).unwrap_or_else(|| crate::events::now_ms() - LAG_MS);
    stats.sent_up_to_ms.store(cursor, Ordering::Relaxed);
    loop {
        let end = (crate::events::now_ms() - LAG_MS).min(cursor + MAX_WINDOW_MS);
        if end > cursor {
            let (db2, rules2) = (db.clone(), rules.clone());
            let per_send = q.max_samples_per_send.max(1) as usize;
            let from = cursor;
            let work = tokio::task::spawn_blocking(move || {
                batches(&db2, &rules2, from, end, shards, per_send)
            })
            .await
            .unwrap_or_default();
            let mut sends = tokio::task::JoinSet::new();
            for shard in work.into_iter().filter(|s| !s.is_empty()) {
                let (cfg, url, headers, stats, mut stop) = (
                    cfg.clone(),
                    url.clone(),
                    headers.clone(),
                    stats.clone(),
                    stop.clone(),
                );
                sends.spawn(async move {
                    for req in &shard {
                        if !deliver(&cfg, &url, &headers, req, &stats, &mut stop).await {
                            return false;
                        }
                    }
                    true
                });
            }
            let mut all_done = true;
            while let Some(r) = sends.join_next().await {
                all_done &= r.unwrap_or(false);
            }
            if !all_done {
                return; // stopping: the window goes again next time
            }
            cursor = end;
            stats.sent_up_to_ms.store(cursor, Ordering::Relaxed);
            if let Err(e) = write_cursor(&path, cursor) {
                tracing::warn!(remote = %stats.name, error = %e, "cannot keep the remote_write cursor");
            }
            if crate::events::now_ms() - LAG_MS > cursor {
                continue; // catching up after an outage
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(q.batch_send_deadline.0.max(Duration::from_millis(100))) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// `capstan_{prefix}_*` for capstan's own `/metrics` (`remote_write`,
/// `logs_forward`, `traces_forward`); items are samples, lines or spans.
pub fn expose(e: &mut crate::exposition::Exposition, prefix: &str, all: &[Arc<Stats>]) {
    if all.is_empty() {
        return;
    }
    type Family = (&'static str, &'static str, fn(&Stats) -> f64);
    let families: [Family; 7] = [
        ("samples_total", "Items delivered to the receiver.", |s| {
            s.samples.load(Ordering::Relaxed) as f64
        }),
        (
            "failed_samples_total",
            "Items the receiver refused for good (4xx), dropped.",
            |s| s.failed_samples.load(Ordering::Relaxed) as f64,
        ),
        (
            "retried_samples_total",
            "Items sent again after a failed try.",
            |s| s.retried_samples.load(Ordering::Relaxed) as f64,
        ),
        (
            "bytes_total",
            "Bytes delivered (as sent, compressed where the protocol is).",
            |s| s.bytes.load(Ordering::Relaxed) as f64,
        ),
        ("batches_total", "Requests delivered.", |s| {
            s.batches.load(Ordering::Relaxed) as f64
        }),
        ("shards", "Requests sent at once.", |s| {
            s.shards.load(Ordering::Relaxed) as f64
        }),
        (
            "highest_sent_timestamp_seconds",
            "The time of the newest item delivered (for remote_write: everything up to it).",
            |s| s.sent_up_to_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        ),
    ];
    for (suffix, help, value) in families {
        let name = format!("capstan_{prefix}_{suffix}");
        let kind = if suffix.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        e.family(&name, kind, help);
        for s in all {
            e.sample(
                &name,
                &[("remote_name", &s.name), ("url", &s.url)],
                value(s),
            );
        }
    }
}

/// Each receiver's stats, named.
pub fn stats_for(configs: &[RemoteWriteConfig]) -> Vec<Arc<Stats>> {
    let mut seen = BTreeMap::new();
    configs
        .iter()
        .map(|c| {
            let mut name = name_of(c);
            let n = seen.entry(name.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                name = format!("{name}-{n}");
            }
            Arc::new(Stats {
                name,
                url: c.url.clone(),
                ..Stats::default()
            })
        })
        .collect()
}
