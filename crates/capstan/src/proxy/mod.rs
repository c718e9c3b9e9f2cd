//! The proxy: one listener per published port, forwarding to the service's ready
//! replicas. [`Proxy::configure`] follows the stack (ports, settings),
//! [`Proxy::run`] follows the status board's topology (ready sets, of every
//! revision), [`Proxy::drain`] takes a replica out before it stops. The
//! supervisor reaches the last two through its hooks ([`Proxy`] implements
//! [`Hook`]); a request that finds no replica calls the wake hook the daemon
//! wires to the supervisor.
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
pub mod workers;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use balance::{Backend, Endpoint};

use crate::events::EventLog;
use crate::logs::Stream;
use crate::logs::engine::LogEngine;
use crate::spec::{Protocol, Stack};
use crate::state::control::{BoxFuture, Hook};
use crate::state::{ReplicaId, StatusBoard};
use crate::traces::TraceStore;

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
    pub events: Arc<EventLog>,
    pub access: mpsc::Sender<Finished>,
    /// The replicas speak HTTP/2 cleartext (`x-capstan.protocol: h2c`).
    pub h2c: bool,
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
        self.events.emit_replica(
            &ReplicaId::new(&b.service, ep.revision, ep.replica),
            "ejected",
            format!(
                "{eject_after} consecutive failures, last: {reason}; no traffic until its health check passes"
            ),
        );
        tokio::spawn(readmit(self.events.clone(), b.clone(), ep.clone()));
    }
}

/// Probes an ejected replica every second with its service's health check (a
/// TCP connect without one) and lets it back in on the first success.
async fn readmit(events: Arc<EventLog>, b: Arc<Backend>, ep: Arc<Endpoint>) {
    let env = BTreeMap::from([("PORT".to_owned(), ep.addr.port().to_string())]);
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
        if crate::probe::probe(&test, ep.addr, &env, Duration::from_secs(2))
            .await
            .is_ok()
        {
            ep.readmit();
            events.emit_replica(
                &ReplicaId::new(&b.service, ep.revision, ep.replica),
                "readmitted",
                "health check passed; back in the balancer",
            );
            b.wake_queue();
            return;
        }
    }
}

struct Listener {
    service: String,
    protocol: Protocol,
    /// One accept loop per proxy worker.
    tasks: Vec<JoinHandle<()>>,
}

/// What a request that finds no replica calls, with the service's name.
pub type Wake = Arc<dyn Fn(&str) + Send + Sync>;

/// Every service's proxy state.
pub struct Proxy {
    board: Arc<StatusBoard>,
    events: Arc<EventLog>,
    logs: Arc<LogEngine>,
    traces: Arc<TraceStore>,
    backends: Mutex<BTreeMap<String, Arc<Backend>>>,
    listeners: Mutex<BTreeMap<String, Listener>>,
    /// Replicas being drained: no new requests.
    draining: Mutex<BTreeSet<ReplicaId>>,
    access: Mutex<Option<mpsc::Sender<Finished>>>,
    wake: Mutex<Option<Wake>>,
}

impl Proxy {
    pub fn new(
        board: Arc<StatusBoard>,
        events: Arc<EventLog>,
        logs: Arc<LogEngine>,
        traces: Arc<TraceStore>,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            board,
            events,
            logs,
            traces,
            backends: Mutex::default(),
            listeners: Mutex::default(),
            draining: Mutex::default(),
            access: Mutex::default(),
            wake: Mutex::default(),
        })
    }

    /// Sets what a request that finds no replica of an autoscaled service
    /// with `min: 0` calls (the supervisor's wake).
    pub fn on_wake(&self, wake: Wake) {
        *self.wake.lock().unwrap() = Some(wake);
    }

    pub fn backend(&self, service: &str) -> Option<Arc<Backend>> {
        self.backends.lock().unwrap().get(service).cloned()
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.lock().unwrap().values().cloned().collect()
    }

    /// Stops accepting on every published port (connections being served go on).
    pub fn close_listeners(&self) {
        for (_, l) in std::mem::take(&mut *self.listeners.lock().unwrap()) {
            l.tasks.iter().for_each(JoinHandle::abort);
        }
    }
}

impl Hook for Arc<Proxy> {
    fn before_stop(&self, ids: Vec<ReplicaId>, grace: Duration) -> BoxFuture<'static, ()> {
        let proxy = self.clone();
        Box::pin(async move { proxy.drain(&ids, grace).await })
    }

    fn on_apply(&self, stack: &Stack) -> Vec<String> {
        self.configure(stack)
    }

    fn after_stop(&self, ids: &[ReplicaId]) {
        let mut draining = self.draining.lock().unwrap();
        for id in ids {
            draining.remove(id);
        }
    }

    fn on_down(&self) {
        self.close_listeners();
    }

    fn set_split(&self, service: &str, split: Option<crate::state::control::Split>) {
        if let Some(b) = self.backend(service) {
            *b.split.write().unwrap() = split;
            b.wake_queue();
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

fn access_sender(proxy: &Arc<Proxy>) -> mpsc::Sender<Finished> {
    let mut slot = proxy.access.lock().unwrap();
    if let Some(tx) = &*slot {
        return tx.clone();
    }
    let (tx, mut rx) = mpsc::channel::<Finished>(16_384);
    let s = proxy.clone();
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
                    s.events.warn_once(format!("cannot store access logs: {e}"));
                }
            }
            let streams = spans
                .into_iter()
                .map(|(service, entries)| (span_labels(&service), entries))
                .collect();
            if let Err(e) = s.traces.append(streams) {
                s.events
                    .warn_once(format!("cannot store the proxy's spans: {e}"));
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
/// again while old connections linger in TIME_WAIT) and SO_REUSEPORT (one per
/// proxy worker on the same address), registered with the runtime of `rt`.
fn bind(
    addr: std::net::SocketAddr,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<tokio::net::TcpListener> {
    let _in = rt.enter();
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// One listener per proxy worker on `addr` (the first bind reports a port
/// already taken); the kernel spreads connections over them.
fn bind_all(
    addr: std::net::SocketAddr,
) -> std::io::Result<Vec<(tokio::runtime::Handle, tokio::net::TcpListener)>> {
    let mut out = Vec::new();
    for rt in workers::Workers::get().handles() {
        // A port given as 0 gets its number from the first bind.
        let at = out
            .first()
            .and_then(|(_, l): &(_, tokio::net::TcpListener)| l.local_addr().ok())
            .unwrap_or(addr);
        out.push((rt.clone(), bind(at, rt)?));
    }
    Ok(out)
}

impl Proxy {
    /// Follows the stack: each service's proxy settings, and a listener per published
    /// port (new ones bound, removed ones closed). Returns what could not be done.
    fn configure(self: &Arc<Self>, stack: &Stack) -> Vec<String> {
        let reg = self;
        let access = access_sender(self);
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
                // With `min: 0`, a request that finds no replica asks for one.
                let wakes = svc.x.autoscale.as_ref().is_some_and(|a| a.min == 0);
                *b.on_empty.lock().unwrap() = match (wakes, self.wake.lock().unwrap().clone()) {
                    (true, Some(wake)) => {
                        let name = name.clone();
                        Some(Box::new(move || wake(&name)))
                    }
                    _ => None,
                };
            }
        }
        let mut wanted: BTreeMap<String, (String, Protocol, std::net::SocketAddr)> =
            BTreeMap::new();
        for (name, svc) in &stack.services {
            // UDP ports are the container engine's to publish.
            for p in svc.ports.iter().filter(|p| p.protocol != "udp") {
                let ip = p.host_ip.as_deref().unwrap_or("0.0.0.0");
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                match ip.parse::<std::net::IpAddr>() {
                    Ok(ip) => {
                        let addr = std::net::SocketAddr::new(ip, p.published);
                        wanted.insert(addr.to_string(), (name.clone(), svc.proxy_protocol(), addr));
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
                l.tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for (key, (service, protocol, addr)) in wanted {
            if listeners.contains_key(&key) {
                continue;
            }
            let bound = match bind_all(addr) {
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
                events: self.events.clone(),
                access: access.clone(),
                h2c: protocol == Protocol::H2c,
            });
            let tasks = bound
                .into_iter()
                .map(|(rt, listener)| match protocol {
                    Protocol::Http | Protocol::H2c => rt.spawn(http::serve(listener, ctx.clone())),
                    Protocol::Tcp => rt.spawn(tcp::serve(listener, ctx.clone())),
                })
                .collect();
            let proto = match protocol {
                Protocol::Http => "http",
                Protocol::H2c => "http, h2c to the replicas",
                Protocol::Tcp => "tcp",
            };
            self.events.emit(
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
                    tasks,
                },
            );
        }
        problems
    }

    /// Rebuilds every service's ready set from the board: the ready replicas of
    /// every revision, less those being drained.
    fn sync(&self) {
        let statuses = self.board.replicas();
        // Replicas being drained leave it in `after_stop`, before their id
        // can be used again.
        let draining = self.draining.lock().unwrap().clone();
        for b in self.backends() {
            let current = b.endpoints();
            let mut next: Vec<Arc<Endpoint>> = Vec::new();
            for s in statuses
                .iter()
                .filter(|s| s.service == b.service && s.is_ready())
            {
                let id = s.id();
                if draining.contains(&id) {
                    continue;
                }
                let Some(addr) = s.addr else { continue };
                next.push(
                    current
                        .iter()
                        .find(|e| {
                            e.replica == s.replica && e.revision == s.revision && e.addr == addr
                        })
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Endpoint::new(&id, addr))),
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
                self.events.emit(
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

    /// Keeps the ready sets in step with the replicas, until `stop` is set.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changed = self.board.watch_topology();
        loop {
            self.sync();
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Takes replicas out of the balancer and waits (up to `grace`) for their
    /// requests in flight to finish; then they can be stopped without losing any.
    pub async fn drain(&self, ids: &[ReplicaId], grace: Duration) {
        // Replicas not yet in the ready set must not enter it while stopping.
        self.draining.lock().unwrap().extend(ids.iter().cloned());
        let Some(service) = ids.first().map(|i| i.service.clone()) else {
            return;
        };
        let Some(b) = self.backend(&service) else {
            return;
        };
        let current = b.endpoints();
        let (leaving, staying): (Vec<_>, Vec<_>) = current.iter().cloned().partition(|e| {
            ids.iter()
                .any(|i| i.index == e.replica && i.revision == e.revision)
        });
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
}
