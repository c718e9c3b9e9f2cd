//! Scraping: every replica's metrics endpoint is a target; each target has a loop
//! that fetches, parses (capstan-expfmt) and appends to the tsdb, with the
//! synthetic series and staleness markers Prometheus writes.
//!
//! Targets are rebuilt when the stack is applied (the [`Hook`]) or the board's
//! topology changes, never on resource samples. Each loop keeps a cache from a
//! sample's series as written (name and label text) to its labels after
//! relabeling and its tsdb reference, so a steady target costs a hash lookup
//! per sample instead of building a label set.

mod http;
pub mod relabel;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_expfmt::{Entry, Format, Parser};
use capstan_tsdb::{Db, Labels, STALE_NAN_BITS, SeriesRef};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::spec::{MetricsTarget, Stack};
use crate::state::StatusBoard;
use crate::state::control::Hook;

#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    /// Path and query string.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub labels: Vec<(String, String)>,
    pub honor_labels: bool,
    pub honor_timestamps: bool,
    pub sample_limit: u64,
    /// `metric_relabel_configs`, compiled; `rules_key` tells configurations apart.
    pub rules: Arc<Vec<relabel::Rule>>,
    pub rules_key: String,
}

impl PartialEq for Target {
    fn eq(&self, o: &Target) -> bool {
        (
            &self.addr,
            &self.path,
            self.interval,
            self.timeout,
            &self.labels,
            self.honor_labels,
            self.honor_timestamps,
            self.sample_limit,
            &self.rules_key,
        ) == (
            &o.addr,
            &o.path,
            o.interval,
            o.timeout,
            &o.labels,
            o.honor_labels,
            o.honor_timestamps,
            o.sample_limit,
            &o.rules_key,
        )
    }
}

impl Eq for Target {}

impl Target {
    /// A target with Prometheus' defaults for the options.
    fn simple(
        addr: String,
        path: String,
        interval: Duration,
        labels: Vec<(String, String)>,
    ) -> Target {
        Target {
            addr,
            path,
            interval,
            timeout: interval.min(Duration::from_secs(10)),
            labels,
            honor_labels: false,
            honor_timestamps: true,
            sample_limit: 0,
            rules: Arc::new(Vec::new()),
            rules_key: String::new(),
        }
    }

    fn key(&self) -> String {
        let job = self
            .labels
            .iter()
            .find(|(n, _)| n == "job")
            .map_or("", |(_, v)| v.as_str());
        format!("{job}/{}{}", self.addr, self.path)
    }
}

/// The static targets of `x-capstan.scrape_configs`.
fn static_targets(
    configs: &[crate::spec::ScrapeConfig],
    default_interval: Duration,
) -> Vec<Target> {
    let mut out = Vec::new();
    for c in configs {
        let interval = c.scrape_interval.map_or(default_interval, |d| d.0);
        let timeout = c
            .scrape_timeout
            .map_or(Duration::from_secs(10), |d| d.0)
            .min(interval);
        let rules: Vec<relabel::Rule> = c
            .metric_relabel_configs
            .iter()
            .filter_map(|r| relabel::Rule::new(r.clone()).ok())
            .collect();
        let rules = Arc::new(rules);
        let rules_key = serde_json::to_string(&c.metric_relabel_configs).unwrap_or_default();
        let mut path = c.metrics_path.clone();
        let query: Vec<String> = c
            .params
            .iter()
            .flat_map(|(k, vs)| {
                vs.iter()
                    .map(move |v| format!("{}={}", encode(k), encode(v)))
            })
            .collect();
        if !query.is_empty() {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&query.join("&"));
        }
        for sc in &c.static_configs {
            for addr in &sc.targets {
                let mut labels: Vec<(String, String)> = vec![
                    ("job".into(), c.job_name.clone()),
                    ("instance".into(), addr.clone()),
                ];
                for (k, v) in &sc.labels {
                    labels.retain(|(n, _)| n != k);
                    labels.push((k.clone(), v.clone()));
                }
                out.push(Target {
                    addr: addr.clone(),
                    path: path.clone(),
                    interval,
                    timeout,
                    labels,
                    honor_labels: c.honor_labels,
                    honor_timestamps: c.honor_timestamps,
                    sample_limit: c.sample_limit,
                    rules: rules.clone(),
                    rules_key: rules_key.clone(),
                });
            }
        }
    }
    out
}

/// Percent-encodes a query string component.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// What the scraper takes from the stack.
#[derive(Default)]
struct Config {
    default_interval: Duration,
    /// How often capstan scrapes itself: twice a second when something
    /// autoscales (matching the replicas' sampling period).
    own_interval: Duration,
    metrics: BTreeMap<String, MetricsTarget>,
    /// `x-capstan.scrape_configs`, compiled once per apply.
    statics: Vec<Target>,
}

/// The scrape targets and their loops' shared counters.
pub struct Scraper {
    board: Arc<StatusBoard>,
    pub stats: Arc<ScrapeStats>,
    /// HELP, TYPE and UNIT of the metric families each target exposes.
    pub metadata: Arc<MetadataStore>,
    config: Mutex<Config>,
    config_changed: watch::Sender<u64>,
    /// The daemon's own listener, scraped for its own and the host's metrics.
    own_addr: Option<String>,
}

impl Hook for Arc<Scraper> {
    fn on_apply(&self, stack: &Stack) -> Vec<String> {
        let default_interval = stack.settings.scrape_interval.0;
        let autoscales = stack
            .services
            .values()
            .any(|s| s.x.autoscale.is_some() || s.x.rollout.is_some());
        *self.config.lock().unwrap() = Config {
            default_interval,
            own_interval: if autoscales {
                default_interval.min(Duration::from_millis(500))
            } else {
                default_interval
            },
            metrics: stack
                .services
                .iter()
                .map(|(n, s)| (n.clone(), s.x.metrics.clone()))
                .collect(),
            statics: static_targets(&stack.settings.scrape_configs, default_interval),
        };
        self.config_changed.send_modify(|g| *g += 1);
        Vec::new()
    }
}

impl Scraper {
    pub fn new(board: Arc<StatusBoard>, own_addr: Option<String>) -> Arc<Scraper> {
        Arc::new(Scraper {
            board,
            stats: Arc::default(),
            metadata: Arc::default(),
            config: Mutex::new(Config {
                default_interval: Duration::from_secs(15),
                own_interval: Duration::from_secs(15),
                ..Config::default()
            }),
            config_changed: watch::channel(0).0,
            own_addr,
        })
    }

    /// What is scraped now: capstan itself, every running replica's metrics
    /// endpoint, and the static configs.
    pub fn targets(&self) -> Vec<Target> {
        let cfg = self.config.lock().unwrap();
        // capstan scrapes itself, as Prometheus does, and the host through itself.
        let own = self.own_addr.iter().flat_map(|addr| {
            [("capstan", "/metrics"), ("node", "/metrics/node")].map(|(job, path)| {
                Target::simple(
                    addr.clone(),
                    path.into(),
                    if job == "capstan" {
                        cfg.own_interval
                    } else {
                        cfg.default_interval
                    },
                    vec![
                        ("job".into(), job.into()),
                        ("instance".into(), addr.clone()),
                    ],
                )
            })
        });
        let replicas = self
            .board
            .replicas()
            .into_iter()
            .filter(|s| s.is_running())
            .filter_map(|s| {
                let m = cfg.metrics.get(&s.service)?;
                if m.disable {
                    return None;
                }
                let addr = s.addr?;
                let addr = std::net::SocketAddr::new(addr.ip(), m.port.unwrap_or(addr.port()));
                let addr = addr.to_string();
                let interval = m.interval.map_or(cfg.default_interval, |d| d.0);
                Some(Target::simple(
                    addr.clone(),
                    m.path.clone(),
                    interval,
                    vec![
                        ("job".into(), s.service.clone()),
                        ("instance".into(), addr),
                        ("service".into(), s.service.clone()),
                        ("replica".into(), s.replica.to_string()),
                        ("revision".into(), s.revision.to_string()),
                    ],
                ))
            });
        own.chain(replicas)
            .chain(cfg.statics.iter().cloned())
            .collect::<Vec<_>>()
    }

    /// Runs scrape loops for the targets as they come and go, until `stop` is set.
    pub async fn run(self: Arc<Self>, db: Arc<Db>, mut stop: watch::Receiver<bool>) {
        let mut loops: BTreeMap<String, (Target, watch::Sender<bool>, JoinHandle<()>)> =
            BTreeMap::new();
        let mut topology = self.board.watch_topology();
        let mut config = self.config_changed.subscribe();
        loop {
            let want: BTreeMap<String, Target> =
                self.targets().into_iter().map(|t| (t.key(), t)).collect();
            let gone: Vec<String> = loops
                .keys()
                .filter(|k| want.get(*k) != loops.get(*k).map(|l| &l.0))
                .cloned()
                .collect();
            for k in gone {
                if let Some((_, tx, task)) = loops.remove(&k) {
                    let _ = tx.send(true);
                    let _ = task.await;
                }
            }
            for (k, t) in want {
                if let std::collections::btree_map::Entry::Vacant(slot) = loops.entry(k) {
                    let (tx, rx) = watch::channel(false);
                    let task = tokio::spawn(scrape_loop(
                        db.clone(),
                        t.clone(),
                        rx,
                        self.stats.clone(),
                        self.metadata.clone(),
                    ));
                    slot.insert((t, tx, task));
                }
            }
            self.stats
                .targets
                .store(loops.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = topology.changed() => {}
                _ = config.changed() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        for (_, (_, tx, task)) in loops {
            let _ = tx.send(true);
            let _ = task.await;
        }
    }
}

fn stale() -> f64 {
    f64::from_bits(STALE_NAN_BITS)
}

/// Builds a series' labels: the scraped ones, then the target's; a scraped label
/// the target also sets is kept as `exported_<name>` (Prometheus' `honor_labels: false`).
fn series_labels(
    name: &str,
    scraped: &[(String, String)],
    target: &[(String, String)],
    honor: bool,
) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(scraped.len() + target.len() + 1);
    pairs.push(("__name__".into(), name.to_owned()));
    if honor {
        // honor_labels: the scraped labels win; target labels fill the gaps.
        pairs.extend(scraped.iter().filter(|(n, _)| n != "__name__").cloned());
        pairs.extend(
            target
                .iter()
                .filter(|(t, _)| !scraped.iter().any(|(n, _)| n == t))
                .cloned(),
        );
        return pairs;
    }
    for (n, v) in scraped {
        if target.iter().any(|(t, _)| t == n) {
            pairs.push((format!("exported_{n}"), v.clone()));
        } else if n != "__name__" {
            pairs.push((n.clone(), v.clone()));
        }
    }
    pairs.extend(target.iter().cloned());
    pairs
}

/// What a target says about one metric family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Meta {
    pub kind: &'static str,
    pub help: String,
    pub unit: String,
}

/// The metadata of the families each target exposed in its last good scrape,
/// for `/api/v1/metadata`. A target's entry goes when its scrape loop stops.
#[derive(Debug, Default)]
pub struct MetadataStore {
    by_target: std::sync::Mutex<BTreeMap<String, BTreeMap<String, Meta>>>,
}

impl MetadataStore {
    fn set(&self, target: &str, families: BTreeMap<String, Meta>) {
        self.by_target
            .lock()
            .unwrap()
            .insert(target.to_owned(), families);
    }

    fn remove(&self, target: &str) {
        self.by_target.lock().unwrap().remove(target);
    }

    /// Each family name with its distinct metadata over all targets, by name.
    pub fn families(&self) -> BTreeMap<String, Vec<Meta>> {
        let mut out: BTreeMap<String, std::collections::BTreeSet<Meta>> = BTreeMap::new();
        for families in self.by_target.lock().unwrap().values() {
            for (name, m) in families {
                out.entry(name.clone()).or_default().insert(m.clone());
            }
        }
        out.into_iter()
            .map(|(n, set)| (n, set.into_iter().collect()))
            .collect()
    }
}

/// Counters of the scrape loops, for capstan's own `/metrics`.
#[derive(Debug, Default)]
pub struct ScrapeStats {
    pub targets: std::sync::atomic::AtomicU64,
    pub ok: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Total time spent scraping, in microseconds.
    pub duration_us: std::sync::atomic::AtomicU64,
}

impl ScrapeStats {
    fn record(&self, up: bool, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        if up { &self.ok } else { &self.failed }.fetch_add(1, Relaxed);
        self.duration_us.fetch_add(took.as_micros() as u64, Relaxed);
    }
}

/// One series a target exposes, as the loop's cache keeps it.
struct Cached {
    /// Its labels after the target's labels and relabeling; `None` when
    /// relabeling drops it.
    labels: Option<Labels>,
    /// Its reference in the tsdb, once stored.
    series: Option<SeriesRef>,
    /// In the last successful scrape.
    prev: bool,
    /// In this scrape.
    now: bool,
}

/// A target's series by their text as scraped (`name{labels}`).
#[derive(Default)]
struct SeriesCache {
    map: HashMap<String, Cached>,
    key: String,
}

impl SeriesCache {
    /// The cached entry of a sample, made on first sight.
    fn entry(&mut self, s: &capstan_expfmt::Sample<'_>, target: &Target) -> &mut Cached {
        self.key.clear();
        self.key.push_str(s.name);
        self.key.push('{');
        self.key.push_str(s.labels.raw());
        if !self.map.contains_key(self.key.as_str()) {
            let scraped_labels: Vec<(String, String)> = s
                .labels()
                .filter_map(Result::ok)
                .map(|(n, v)| (n.to_owned(), v.into_owned()))
                .collect();
            let pairs = series_labels(s.name, &scraped_labels, &target.labels, target.honor_labels);
            let pairs = if target.rules.is_empty() {
                Some(pairs)
            } else {
                relabel::apply(pairs, &target.rules)
            };
            let labels = pairs
                .filter(|p| p.iter().any(|(n, v)| n == "__name__" && !v.is_empty()))
                .map(Labels::new);
            self.map.insert(
                self.key.clone(),
                Cached {
                    labels,
                    series: None,
                    prev: false,
                    now: false,
                },
            );
        }
        self.map.get_mut(self.key.as_str()).expect("just inserted")
    }
}

async fn scrape_loop(
    db: Arc<Db>,
    target: Target,
    mut stop: watch::Receiver<bool>,
    stats: Arc<ScrapeStats>,
    metadata: Arc<MetadataStore>,
) {
    // Spread targets over the interval, like Prometheus, by a hash of the target.
    let offset_ms = target
        .key()
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % target.interval.as_millis().max(1) as u64;
    let interval_ms = target.interval.as_millis() as i64;
    let now = crate::state::clock::unix_ms();
    let first = now - now.rem_euclid(interval_ms) + offset_ms as i64;
    let first = if first < now {
        first + interval_ms
    } else {
        first
    };
    let timeout = target.timeout;
    let mut cache = SeriesCache::default();
    // The series every scrape writes about itself.
    let synthetic: Vec<Labels> = SYNTHETIC
        .iter()
        .map(|name| Labels::new(series_labels(name, &[], &target.labels, false)))
        .collect();
    let mut synthetic_written = false;
    let mut k: i64 = 0;
    loop {
        // Scheduled times, not the wall clock: a regular series costs one bit a sample.
        let t = first + k * interval_ms;
        let wait = (t - crate::state::clock::unix_ms()).max(0) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        k += 1;
        let started = crate::state::clock::stopwatch();
        let result = http::get(&target.addr, &target.path, Format::ACCEPT, timeout).await;
        let mut a = db.appender();
        let mut scraped = 0usize;
        let mut stored = 0usize;
        let mut added = 0usize;
        let mut families: BTreeMap<String, Meta> = BTreeMap::new();
        let up = match result {
            Ok(resp) if resp.status == 200 => {
                let format = Format::from_content_type(&resp.content_type);
                match Parser::from_bytes(&resp.body, format) {
                    Ok(parser) => {
                        let mut ok = true;
                        for e in parser {
                            match e {
                                Ok(Entry::Sample(s)) => {
                                    scraped += 1;
                                    let c = cache.entry(&s, &target);
                                    let first_sight = !c.now;
                                    c.now = true;
                                    let Some(labels) = &c.labels else { continue };
                                    if first_sight && !c.prev {
                                        added += 1;
                                    }
                                    stored += 1;
                                    let ts = s
                                        .timestamp_ms
                                        .filter(|_| target.honor_timestamps)
                                        .unwrap_or(t);
                                    match c.series {
                                        Some(r) => a.add_ref(r, ts, s.value),
                                        None => a.add(labels.clone(), ts, s.value),
                                    }
                                }
                                Ok(Entry::Help { name, text }) => {
                                    families.entry(name.to_owned()).or_default().help =
                                        text.into_owned();
                                }
                                Ok(Entry::Type { name, kind }) => {
                                    families.entry(name.to_owned()).or_default().kind =
                                        kind.as_str();
                                }
                                Ok(Entry::Unit { name, unit }) => {
                                    families.entry(name.to_owned()).or_default().unit =
                                        unit.to_owned();
                                }
                                Err(e) => {
                                    tracing::debug!(target = %target.key(), "parse error: {e}");
                                    ok = false;
                                    break;
                                }
                            }
                        }
                        ok
                    }
                    Err(_) => false,
                }
            }
            Ok(resp) => {
                tracing::debug!(target = %target.key(), status = resp.status, "scrape failed");
                false
            }
            Err(e) => {
                tracing::debug!(target = %target.key(), "scrape failed: {e}");
                false
            }
        };
        // Over the sample limit (counted after relabeling), the scrape fails.
        let over_limit = target.sample_limit > 0 && stored as u64 > target.sample_limit;
        if over_limit {
            tracing::debug!(target = %target.key(), samples = stored, limit = target.sample_limit, "sample limit exceeded");
        }
        let up = up && !over_limit;
        if !up {
            // A failed scrape keeps nothing of what it read, as in Prometheus:
            // what the last good one had goes stale.
            a = db.appender();
            for c in cache.map.values() {
                if let (true, Some(l)) = (c.prev, &c.labels) {
                    a.add(l.clone(), t, stale());
                }
            }
            cache.map.clear();
            scraped = 0;
            added = 0;
        } else {
            metadata.set(&target.key(), std::mem::take(&mut families));
            // Series gone since the last scrape get a stale marker; the cache
            // keeps only what this scrape had.
            cache.map.retain(|_, c| {
                if c.prev
                    && !c.now
                    && let Some(l) = &c.labels
                {
                    a.add(l.clone(), t, stale());
                }
                c.prev = c.now;
                c.now = false;
                c.prev
            });
        }
        let duration = started.elapsed().as_secs_f64();
        let values = [
            if up { 1.0 } else { 0.0 },
            duration,
            scraped as f64,
            if up { stored as f64 } else { 0.0 },
            added as f64,
        ];
        for (labels, v) in synthetic.iter().zip(values) {
            a.add(labels.clone(), t, v);
        }
        synthetic_written = true;
        match tokio::task::block_in_place(|| a.commit()) {
            Ok(c) => {
                for (reason, n) in &c.rejected {
                    // Limits and bad labels are the operator's to fix: say so (late samples are routine).
                    if matches!(
                        reason,
                        capstan_tsdb::Reject::TooManySeries | capstan_tsdb::Reject::BadLabels
                    ) {
                        tracing::warn!(target = %target.key(), reason = reason.as_str(), samples = n, "samples rejected by the metrics store's limits");
                    }
                }
            }
            Err(e) => tracing::error!(target = %target.key(), "cannot store samples: {e}"),
        }
        // New series have references now.
        for c in cache.map.values_mut() {
            if c.series.is_none()
                && c.prev
                && let Some(l) = &c.labels
            {
                c.series = db.series_ref(l);
            }
        }
        stats.record(up, crate::state::clock::stopwatch() - started);
    }
    // The target went away: its metadata goes, and everything it exposed is stale
    // now (after its last sample).
    metadata.remove(&target.key());
    let t = crate::state::clock::unix_ms().max(first + k * interval_ms - interval_ms + 1);
    let mut a = db.appender();
    for c in cache.map.values() {
        if let (true, Some(l)) = (c.prev, &c.labels) {
            a.add(l.clone(), t, stale());
        }
    }
    if synthetic_written {
        for l in synthetic {
            a.add(l, t, stale());
        }
    }
    let _ = tokio::task::block_in_place(|| a.commit());
}

/// The series a scrape writes about itself, in the order of their values.
const SYNTHETIC: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use capstan_tsdb::{Matcher, is_stale};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A target answering each scrape with the next of `pages` (the last one
    /// again once they run out); `None` answers 500.
    async fn target(pages: Vec<Option<&'static str>>) -> (String, Arc<StdMutex<usize>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let served = Arc::new(StdMutex::new(0usize));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let n = {
                    let mut c = count.lock().unwrap();
                    *c += 1;
                    *c - 1
                };
                let page = pages[n.min(pages.len() - 1)];
                let resp = match page {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => {
                        "HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
                    }
                };
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        (addr, served)
    }

    fn values(db: &Db, name: &str, extra: Option<(&str, &str)>) -> Vec<String> {
        let mut m = vec![Matcher::eq("__name__", name)];
        if let Some((k, v)) = extra {
            m.push(Matcher::eq(k, v));
        }
        db.select(&m, i64::MIN, i64::MAX)
            .iter()
            .flat_map(|s| {
                s.samples()
                    .map(|(_, v)| {
                        if is_stale(v) {
                            "stale".to_owned()
                        } else {
                            v.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The series cache keeps what Prometheus' scrape semantics need: a
    /// series that goes away (or a failed scrape) gets a stale marker, a known
    /// series is appended by reference, one that comes back is new again, and
    /// relabeling drops what it drops every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_series_cache_keeps_staleness_and_relabeling() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = Db::open(capstan_tsdb::Options::new(dir.path())).unwrap();
        let db = Arc::new(db);
        let (addr, served) = target(vec![
            Some("a 1\nb{x=\"1\"} 2\ndropped 9\n"),
            Some("a 3\nc 4\ndropped 9\n"),
            None,
            Some("a 5\nc 6\n"),
        ])
        .await;
        let mut t = Target::simple(
            addr,
            "/metrics".into(),
            Duration::from_millis(200),
            vec![("job".into(), "t".into())],
        );
        let rule: relabel::RelabelConfig = serde_json::from_value(serde_json::json!({
            "source_labels": ["__name__"], "regex": "dropped", "action": "drop"
        }))
        .unwrap();
        t.rules = Arc::new(vec![relabel::Rule::new(rule).unwrap()]);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(scrape_loop(
            db.clone(),
            t,
            stop,
            Arc::default(),
            Arc::default(),
        ));
        while *served.lock().unwrap() < 5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        // a: every good scrape, stale at the failure, back, stale at the end.
        let a = values(&db, "a", None);
        assert_eq!(a[..5], ["1", "3", "stale", "5", "5"], "{a:?}");
        assert_eq!(a.last().unwrap(), "stale");
        // b: once, then stale when the second scrape did not have it.
        assert_eq!(values(&db, "b", Some(("x", "1"))), ["2", "stale"]);
        // c: new in scrape 2, stale at the failure, new again in scrape 4.
        let c = values(&db, "c", None);
        assert_eq!(c[..4], ["4", "stale", "6", "6"], "{c:?}");
        assert!(values(&db, "dropped", None).is_empty());
        assert_eq!(values(&db, "up", None)[..4], ["1", "1", "0", "1"]);
        // Added: a and b, then c, nothing (failed), then a and c again.
        let added = values(&db, "scrape_series_added", None);
        assert_eq!(added[..5], ["2", "1", "0", "2", "0"], "{added:?}");
        let post = values(&db, "scrape_samples_post_metric_relabeling", None);
        assert_eq!(post[..4], ["2", "2", "0", "2"], "{post:?}");
    }
}
