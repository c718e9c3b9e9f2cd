//! The proxy's RED metrics, exposed on capstan's `/metrics` (and so scraped).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::exposition::Exposition;

/// Upper bounds of `http_request_duration_seconds`: fine below a millisecond,
/// where a proxy's own time shows, up to Prometheus' default top of 10 s.
pub const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

#[derive(Default, Clone)]
struct Stat {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Key: replica as revision and index (none for requests no replica
/// answered), method, status code.
type Key = (Option<(crate::state::Revision, u32)>, &'static str, u16);

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<Key, Stat>>,
    pub retries: AtomicU64,
    pub overflows: AtomicU64,
    pub tcp_connections: AtomicU64,
    ejections: Mutex<BTreeMap<u32, u64>>,
    pub cold_starts: Mutex<ColdStarts>,
}

/// `capstan_cold_start_seconds`: from the first held request to a ready replica.
#[derive(Default)]
pub struct ColdStarts {
    pub count: u64,
    pub sum: f64,
    pub buckets: [u64; COLD_BUCKETS.len()],
}

pub const COLD_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl ColdStarts {
    pub fn observe(&mut self, secs: f64) {
        self.count += 1;
        self.sum += secs;
        for (i, b) in COLD_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.buckets[i] += 1;
            }
        }
    }
}

/// The method as a label: the standard ones by name, anything else as `other`
/// (a client must not be able to create series at will).
pub fn method_label(m: &hyper::Method) -> &'static str {
    match *m {
        hyper::Method::GET => "GET",
        hyper::Method::POST => "POST",
        hyper::Method::PUT => "PUT",
        hyper::Method::DELETE => "DELETE",
        hyper::Method::HEAD => "HEAD",
        hyper::Method::OPTIONS => "OPTIONS",
        hyper::Method::PATCH => "PATCH",
        hyper::Method::CONNECT => "CONNECT",
        hyper::Method::TRACE => "TRACE",
        _ => "other",
    }
}

impl Metrics {
    pub fn record(
        &self,
        replica: Option<(crate::state::Revision, u32)>,
        method: &'static str,
        code: u16,
        secs: f64,
    ) {
        let mut map = self.requests.lock().unwrap();
        let s = map.entry((replica, method, code)).or_default();
        s.count += 1;
        s.sum += secs;
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            s.buckets[i] += 1;
        }
    }

    pub fn ejected(&self, replica: u32) {
        *self.ejections.lock().unwrap().entry(replica).or_default() += 1;
    }
}

/// Writes every service's proxy families.
/// The `revision` and `replica` labels of a request (empty when no replica answered).
fn replica_labels(replica: Option<(crate::state::Revision, u32)>) -> (String, String) {
    replica.map_or((String::new(), String::new()), |(rev, r)| {
        (rev.to_string(), r.to_string())
    })
}

pub fn expose(e: &mut Exposition, backends: &[std::sync::Arc<super::balance::Backend>]) {
    let snapshot: Vec<_> = backends
        .iter()
        .map(|b| (b, b.metrics.requests.lock().unwrap().clone()))
        .collect();
    e.family(
        "http_requests_total",
        "counter",
        "Requests through the proxy, by service, replica, method and status code.",
    );
    for (b, map) in &snapshot {
        for ((replica, method, code), s) in map {
            let (rev, r) = replica_labels(*replica);
            let c = code.to_string();
            e.sample(
                "http_requests_total",
                &[
                    ("service", &b.service),
                    ("replica", &r),
                    ("revision", &rev),
                    ("method", method),
                    ("code", &c),
                ],
                s.count as f64,
            );
        }
    }
    e.family(
        "http_request_duration_seconds",
        "histogram",
        "Time from a request's arrival at the proxy to the end of its response.",
    );
    for (b, map) in &snapshot {
        for ((replica, method, code), s) in map {
            let (rev, r) = replica_labels(*replica);
            let c = code.to_string();
            let base = [
                ("service", b.service.as_str()),
                ("replica", r.as_str()),
                ("revision", rev.as_str()),
                ("method", *method),
                ("code", c.as_str()),
            ];
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += s.buckets[i];
                let le = le.to_string();
                let mut l = base.to_vec();
                l.push(("le", &le));
                e.sample(
                    "http_request_duration_seconds_bucket",
                    &l,
                    cumulative as f64,
                );
            }
            let mut l = base.to_vec();
            l.push(("le", "+Inf"));
            e.sample("http_request_duration_seconds_bucket", &l, s.count as f64);
            e.sample("http_request_duration_seconds_sum", &base, s.sum);
            e.sample("http_request_duration_seconds_count", &base, s.count as f64);
        }
    }
    e.family(
        "http_requests_in_flight",
        "gauge",
        "Requests being answered by each replica.",
    );
    for b in backends {
        for ep in b.endpoints().iter() {
            e.sample(
                "http_requests_in_flight",
                &[
                    ("service", &b.service),
                    ("replica", &ep.replica.to_string()),
                    ("revision", &ep.revision.to_string()),
                ],
                ep.inflight.load(Relaxed) as f64,
            );
        }
    }
    let per_service = |e: &mut Exposition,
                       name: &str,
                       kind: &str,
                       help: &str,
                       v: &dyn Fn(&super::balance::Backend) -> f64| {
        e.family(name, kind, help);
        for b in backends {
            e.sample(name, &[("service", &b.service)], v(b));
        }
    };
    per_service(
        e,
        "capstan_proxy_last_request_timestamp_seconds",
        "gauge",
        "When the last request through the proxy arrived (unix seconds); the autoscaler's idleness.",
        &|b| b.last_request_ms.load(Relaxed) as f64 / 1e3,
    );
    per_service(
        e,
        "capstan_proxy_queue_length",
        "gauge",
        "Requests waiting for a replica.",
        &|b| b.queued.load(Relaxed) as f64,
    );
    per_service(
        e,
        "capstan_proxy_retries_total",
        "counter",
        "Requests sent again to another replica after a connect failure.",
        &|b| b.metrics.retries.load(Relaxed) as f64,
    );
    per_service(
        e,
        "capstan_proxy_queue_overflows_total",
        "counter",
        "Requests refused with 503 because the queue was full.",
        &|b| b.metrics.overflows.load(Relaxed) as f64,
    );
    per_service(
        e,
        "capstan_proxy_tcp_connections_total",
        "counter",
        "Client connections forwarded to a replica (x-capstan.protocol: tcp).",
        &|b| b.metrics.tcp_connections.load(Relaxed) as f64,
    );
    per_service(
        e,
        "capstan_proxy_ready_replicas",
        "gauge",
        "Replicas that get traffic (ready, not ejected, not draining).",
        &|b| {
            b.endpoints()
                .iter()
                .filter(|ep| !ep.ejected.load(Relaxed) && !ep.draining.load(Relaxed))
                .count() as f64
        },
    );
    e.family(
        "capstan_proxy_ejections_total",
        "counter",
        "Times a replica was taken out of the balancer after consecutive failures.",
    );
    for b in backends {
        for (r, n) in b.metrics.ejections.lock().unwrap().iter() {
            e.sample(
                "capstan_proxy_ejections_total",
                &[("service", &b.service), ("replica", &r.to_string())],
                *n as f64,
            );
        }
    }
    e.family(
        "capstan_cold_start_seconds",
        "histogram",
        "Time from a request finding no replica to a replica ready to serve it.",
    );
    for b in backends {
        let c = b.metrics.cold_starts.lock().unwrap();
        if c.count == 0 {
            continue;
        }
        for (i, le) in COLD_BUCKETS.iter().enumerate() {
            e.sample(
                "capstan_cold_start_seconds_bucket",
                &[("service", &b.service), ("le", &le.to_string())],
                c.buckets[i] as f64,
            );
        }
        e.sample(
            "capstan_cold_start_seconds_bucket",
            &[("service", &b.service), ("le", "+Inf")],
            c.count as f64,
        );
        e.sample(
            "capstan_cold_start_seconds_sum",
            &[("service", &b.service)],
            c.sum,
        );
        e.sample(
            "capstan_cold_start_seconds_count",
            &[("service", &b.service)],
            c.count as f64,
        );
    }
}
