//! The proxy: one listener per published port, forwarding to the service's ready
//! replicas. [`configure`] follows the stack (ports, settings), [`run`] follows
//! the replicas' status (ready set), [`drain`] takes a replica out before it stops.
//!
//! Layers, outermost first: listener ([`http::serve`], [`tcp::serve`]) → request
//! handling (limits, headers, trace context) → balance and queue
//! ([`balance::Backend::acquire`]) → retry on connect failure → timeout →
//! connection pool ([`pool::Pool`]); metrics and access log are recorded when the
//! response body ends ([`body::RespBody`]).

pub mod balance;
pub mod body;
pub mod http;
pub mod metrics;
pub mod pool;
pub mod tcp;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use balance::{Backend, Endpoint};

use crate::logs::Stream;
use crate::spec::{Protocol, Stack};
use crate::supervisor::Shared;

/// What a finished request leaves: its access-log line and its span, on their
/// way to the log and span stores.
pub struct Finished {
    pub service: String,
    pub replica: u32,
    pub line: Option<String>,
    pub span: Option<capstan_logstore::Entry>,
}

/// The instrumentation scope of the proxy's spans.
pub const SCOPE: &str = "capstan.proxy";

/// What a listener's connections share.
pub struct Ctx {
    pub backend: Arc<Backend>,
    pub shared: Arc<Shared>,
    pub access: mpsc::Sender<Finished>,
}

impl Ctx {
    /// Counts a transport failure of a replica; ejects it after
    /// `eject_after` in a row, until its health check passes again.
    pub fn failed(&self, ep: &Arc<Endpoint>, reason: &str) {
        let eject_after = self.backend.settings.read().unwrap().eject_after;
        if !ep.fail(eject_after) {
            return;
        }
        let b = &self.backend;
        b.metrics.ejected(ep.replica);
        self.shared.events.emit(
            &b.service,
            Some(ep.replica),
            "ejected",
            format!(
                "{eject_after} consecutive failures, last: {reason}; no traffic until its health check passes"
            ),
        );
        tokio::spawn(readmit(self.shared.clone(), b.clone(), ep.clone()));
    }
}

/// Probes an ejected replica every second with its service's health check (a
/// TCP connect without one) and lets it back in on the first success.
async fn readmit(shared: Arc<Shared>, b: Arc<Backend>, ep: Arc<Endpoint>) {
    let env = BTreeMap::from([("PORT".to_owned(), ep.port.to_string())]);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if ep.gone.load(Relaxed) {
            return;
        }
        let test = b
            .health
            .read()
            .unwrap()
            .clone()
            .unwrap_or(crate::spec::HealthTest::Tcp { port: None });
        if crate::supervisor::health::probe(&test, ep.port, &env, Duration::from_secs(2))
            .await
            .is_ok()
        {
            ep.readmit();
            shared.events.emit(
                &b.service,
                Some(ep.replica),
                "readmitted",
                "health check passed; back in the balancer",
            );
            b.wake_queue();
            return;
        }
    }
}

type Key = (String, u32, u16);

struct Listener {
    service: String,
    protocol: Protocol,
    task: JoinHandle<()>,
}

/// Every service's proxy state, kept in [`Shared`].
#[derive(Default)]
pub struct Registry {
    backends: Mutex<BTreeMap<String, Arc<Backend>>>,
    listeners: Mutex<BTreeMap<String, Listener>>,
    /// Replicas being drained: no new requests.
    draining: Mutex<BTreeSet<Key>>,
    /// Replicas without a health check that accept connections.
    tcp_ready: Mutex<BTreeSet<Key>>,
    probing: Mutex<BTreeSet<Key>>,
    access: Mutex<Option<mpsc::Sender<Finished>>>,
}

impl Registry {
    pub fn backend(&self, service: &str) -> Option<Arc<Backend>> {
        self.backends.lock().unwrap().get(service).cloned()
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.lock().unwrap().values().cloned().collect()
    }

    /// Stops accepting on every published port (connections being served go on).
    pub fn close_listeners(&self) {
        for (_, l) in std::mem::take(&mut *self.listeners.lock().unwrap()) {
            l.task.abort();
        }
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(
        crate::logs::now_ns() as u64 ^ (std::process::id() as u64).rotate_left(32) | 1
    );
}

/// A fast non-cryptographic random number (trace ids, balancing draws).
pub fn random_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// How long the access-log and span writer lets records gather between writes.
const ACCESS_LOG_PAUSE: Duration = Duration::from_millis(10);

fn access_sender(shared: &Arc<Shared>) -> mpsc::Sender<Finished> {
    let mut slot = shared.proxy.access.lock().unwrap();
    if let Some(tx) = &*slot {
        return tx.clone();
    }
    let (tx, mut rx) = mpsc::channel::<Finished>(16_384);
    let s = shared.clone();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(1024);
        while rx.recv_many(&mut batch, 1024).await > 0 {
            let mut lines: BTreeMap<String, Vec<(u32, String, bool)>> = BTreeMap::new();
            let mut spans: BTreeMap<String, Vec<capstan_logstore::Entry>> = BTreeMap::new();
            for f in batch.drain(..) {
                if let Some(span) = f.span {
                    spans.entry(f.service.clone()).or_default().push(span);
                }
                if let Some(line) = f.line {
                    lines
                        .entry(f.service)
                        .or_default()
                        .push((f.replica, line, false));
                }
            }
            for (service, lines) in lines {
                if let Err(e) = s.logs.append_many(&service, Stream::Proxy, lines) {
                    s.warn_once(format!("cannot store access logs: {e}"));
                }
            }
            let streams = spans
                .into_iter()
                .map(|(service, entries)| (span_labels(&service), entries))
                .collect();
            if let Err(e) = s.traces.append(streams) {
                s.warn_once(format!("cannot store the proxy's spans: {e}"));
            }
            // Records gather for a moment: under load, one write per replica
            // per pause instead of one per request.
            tokio::time::sleep(ACCESS_LOG_PAUSE).await;
        }
    });
    *slot = Some(tx.clone());
    tx
}

/// The stream of a service's proxy spans: the service's name as the resource
/// (as a sidecar reports for its workload) and the proxy as the scope.
fn span_labels(service: &str) -> capstan_logstore::Labels {
    use crate::ingest::otlp::{SCOPE_NAME, SCOPE_VERSION};
    capstan_logstore::Labels::from_pairs([
        ("service.name", service),
        (SCOPE_NAME, SCOPE),
        (SCOPE_VERSION, env!("CARGO_PKG_VERSION")),
    ])
}

/// Accepts connections until the task is aborted; each one is its own task.
async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, ctx: Arc<Ctx>, serve: F)
where
    F: Fn(Arc<Ctx>, tokio::net::TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("proxy for {}: accept failed: {e}", ctx.backend.service);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(ctx.clone(), stream, peer));
    }
}

/// Binds a listening socket with SO_REUSEADDR (a restarted daemon can listen
/// again while old connections linger in TIME_WAIT).
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Follows the stack: each service's proxy settings, and a listener per published
/// port (new ones bound, removed ones closed). Returns what could not be done.
pub fn configure(shared: &Arc<Shared>, stack: &Stack) -> Vec<String> {
    let reg = &shared.proxy;
    let access = access_sender(shared);
    let mut problems = Vec::new();
    {
        let mut backends = reg.backends.lock().unwrap();
        backends.retain(|name, _| stack.services.contains_key(name));
        for (name, svc) in &stack.services {
            let b = backends
                .entry(name.clone())
                .or_insert_with(|| Arc::new(Backend::new(name)));
            *b.settings.write().unwrap() = svc.x.proxy.clone();
            *b.cold_start_timeout.write().unwrap() = svc.x.cold_start_timeout.0;
            *b.health.write().unwrap() = svc.healthcheck.as_ref().map(|h| h.test.clone());
        }
    }
    let mut wanted: BTreeMap<String, (String, Protocol, std::net::SocketAddr)> = BTreeMap::new();
    for (name, svc) in &stack.services {
        for p in &svc.ports {
            let ip = p.host_ip.as_deref().unwrap_or("0.0.0.0");
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            match ip.parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    let addr = std::net::SocketAddr::new(ip, p.published);
                    wanted.insert(addr.to_string(), (name.clone(), svc.x.protocol, addr));
                }
                Err(_) => problems.push(format!(
                    "service {name}: cannot publish port {}: {ip:?} is not an IP address",
                    p.published
                )),
            }
        }
    }
    let mut listeners = reg.listeners.lock().unwrap();
    listeners.retain(|addr, l| {
        let keep = wanted
            .get(addr)
            .is_some_and(|(s, proto, _)| *s == l.service && *proto == l.protocol);
        if !keep {
            l.task.abort();
        }
        keep
    });
    for (key, (service, protocol, addr)) in wanted {
        if listeners.contains_key(&key) {
            continue;
        }
        let listener = match bind(addr) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!(
                    "service {service}: cannot publish port {}: listening on {addr}: {e}",
                    addr.port()
                ));
                continue;
            }
        };
        let Some(backend) = reg.backend(&service) else {
            continue;
        };
        let ctx = Arc::new(Ctx {
            backend,
            shared: shared.clone(),
            access: access.clone(),
        });
        let task = match protocol {
            Protocol::Http => tokio::spawn(http::serve(listener, ctx)),
            Protocol::Tcp => tokio::spawn(tcp::serve(listener, ctx)),
        };
        let proto = match protocol {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        };
        shared.events.emit(
            &service,
            None,
            "published",
            format!("proxy listening on {addr} ({proto})"),
        );
        listeners.insert(
            key,
            Listener {
                service,
                protocol,
                task,
            },
        );
    }
    problems
}

/// Whether a replica with a health check is ready for traffic.
fn alive(s: &crate::supervisor::Status) -> bool {
    s.pid.is_some() && s.state == "running" && s.port.is_some()
}

/// Rebuilds every service's ready set from its replicas' status.
pub fn sync(shared: &Arc<Shared>) {
    let reg = &shared.proxy;
    let statuses = shared.statuses();
    let has_hc: BTreeMap<String, bool> = shared
        .service_statuses()
        .into_iter()
        .map(|s| (s.name, s.has_healthcheck))
        .collect();
    let live: BTreeSet<Key> = statuses
        .iter()
        .filter(|s| alive(s))
        .map(|s| (s.service.clone(), s.replica, s.port.unwrap_or(0)))
        .collect();
    reg.draining.lock().unwrap().retain(|k| live.contains(k));
    reg.tcp_ready.lock().unwrap().retain(|k| live.contains(k));
    for b in reg.backends() {
        let checked = has_hc.get(&b.service).copied().unwrap_or(false);
        let current = b.endpoints();
        let mut next: Vec<Arc<Endpoint>> = Vec::new();
        for s in statuses
            .iter()
            .filter(|s| s.service == b.service && alive(s))
        {
            let port = s.port.unwrap_or(0);
            let key = (b.service.clone(), s.replica, port);
            if reg.draining.lock().unwrap().contains(&key) {
                continue;
            }
            let ready = if checked {
                s.health == "healthy"
            } else if reg.tcp_ready.lock().unwrap().contains(&key) {
                true
            } else {
                if reg.probing.lock().unwrap().insert(key.clone()) {
                    tokio::spawn(probe_listening(shared.clone(), key));
                }
                false
            };
            if !ready {
                continue;
            }
            next.push(
                current
                    .iter()
                    .find(|e| e.replica == s.replica && e.port == port)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(s.replica, port))),
            );
        }
        let same = next.len() == current.len()
            && next
                .iter()
                .zip(current.iter())
                .all(|(a, c)| Arc::ptr_eq(a, c));
        if same {
            continue;
        }
        if current.is_empty()
            && !next.is_empty()
            && let Some(since) = b.cold_since.lock().unwrap().take()
        {
            let secs = since.elapsed().as_secs_f64();
            b.metrics.cold_starts.lock().unwrap().observe(secs);
            shared.events.emit(
                &b.service,
                Some(next[0].replica),
                "cold-start",
                format!(
                    "replica ready {:.0} ms after a request found none",
                    secs * 1e3
                ),
            );
        }
        b.set_endpoints(next);
    }
}

/// For a replica without a health check: ready once its port accepts connections.
async fn probe_listening(shared: Arc<Shared>, key: Key) {
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", key.2))
            .await
            .is_ok()
        {
            shared.proxy.tcp_ready.lock().unwrap().insert(key.clone());
            break;
        }
        let still = shared
            .statuses()
            .iter()
            .any(|s| s.service == key.0 && s.replica == key.1 && s.port == Some(key.2) && alive(s));
        if !still {
            break;
        }
        // Quick at first (a cold start waits on this), then relaxed.
        let pause = if started.elapsed() < Duration::from_secs(5) {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(250)
        };
        tokio::time::sleep(pause).await;
    }
    shared.proxy.probing.lock().unwrap().remove(&key);
    shared.changed.send_modify(|g| *g += 1);
}

/// Keeps the ready sets in step with the replicas, until the daemon stops.
pub async fn run(shared: Arc<Shared>) {
    let mut changed = shared.changed.subscribe();
    loop {
        sync(&shared);
        if changed.changed().await.is_err() {
            return;
        }
    }
}

/// Takes replicas out of the balancer and waits (up to `grace`) for their
/// requests in flight to finish; then they can be stopped without losing any.
pub async fn drain(shared: &Shared, service: &str, replicas: &[u32], grace: Duration) {
    let Some(b) = shared.proxy.backend(service) else {
        return;
    };
    let current = b.endpoints();
    let (leaving, staying): (Vec<_>, Vec<_>) = current
        .iter()
        .cloned()
        .partition(|e| replicas.contains(&e.replica));
    // Replicas not yet in the ready set must not enter it while stopping.
    {
        let mut draining = shared.proxy.draining.lock().unwrap();
        for s in shared.statuses() {
            if s.service == service && replicas.contains(&s.replica) {
                draining.insert((service.to_owned(), s.replica, s.port.unwrap_or(0)));
            }
        }
    }
    if leaving.is_empty() {
        return;
    }
    for e in &leaving {
        e.draining.store(true, Relaxed);
    }
    b.set_endpoints(staying);
    let deadline = tokio::time::Instant::now() + grace;
    for e in &leaving {
        loop {
            let idle = e.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if e.inflight.load(Relaxed) == 0 {
                break;
            }
            tokio::select! {
                _ = idle => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }
}
