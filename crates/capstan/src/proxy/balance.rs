//! A service's ready replicas and the choice among them: power of two choices
//! over outstanding requests weighted by a peak latency EWMA (or round robin),
//! a bounded queue when none can take a request, passive ejection, draining.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::metrics::Metrics;
use super::pool::Pool;
use crate::spec::{Balance, ProxySettings};
use crate::state::control::{Side, Split};

/// How fast the latency estimate forgets: the decay time constant.
const EWMA_TAU: Duration = Duration::from_secs(10);
/// Floor of the latency estimate, so an unmeasured replica still counts its load.
const MIN_COST_SECS: f64 = 50e-6;

/// One ready replica as the proxy sees it.
pub struct Endpoint {
    /// The replica's index within its revision.
    pub replica: u32,
    pub revision: crate::state::Revision,
    pub addr: std::net::SocketAddr,
    pub inflight: AtomicUsize,
    /// Peak EWMA of time to response headers (seconds) and when it was updated.
    ewma: Mutex<(f64, Instant)>,
    failures: AtomicU32,
    pub ejected: AtomicBool,
    pub draining: AtomicBool,
    /// Set when the replica left the ready set; ends its re-admission probe.
    pub gone: AtomicBool,
    /// Woken when in-flight requests finish, for draining.
    pub idle: Notify,
    pub pool: Pool,
}

impl Endpoint {
    pub fn new(id: &crate::state::ReplicaId, addr: std::net::SocketAddr) -> Endpoint {
        Endpoint {
            replica: id.index,
            revision: id.revision,
            addr,
            inflight: AtomicUsize::new(0),
            ewma: Mutex::new((0.0, crate::state::clock::stopwatch())),
            failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            idle: Notify::new(),
            pool: Pool::default(),
        }
    }

    fn cost(&self) -> f64 {
        let ewma = self.ewma.lock().unwrap().0.max(MIN_COST_SECS);
        ewma * (self.inflight.load(Relaxed) + 1) as f64
    }

    /// Records a response's time to headers: a peak EWMA (a slower response
    /// replaces the estimate at once; faster ones pull it down over time).
    pub fn observe(&self, rtt: Duration) {
        let now = crate::state::clock::stopwatch();
        let rtt = rtt.as_secs_f64();
        let mut g = self.ewma.lock().unwrap();
        let (prev, at) = *g;
        let next = if rtt > prev {
            rtt
        } else {
            let w = (-(now.duration_since(at).as_secs_f64()) / EWMA_TAU.as_secs_f64()).exp();
            prev * w + rtt * (1.0 - w)
        };
        *g = (next, now);
        drop(g);
        self.failures.store(0, Relaxed);
    }

    /// Counts a transport failure; true when it makes the replica ejected.
    pub fn fail(&self, eject_after: u32) -> bool {
        let n = self.failures.fetch_add(1, Relaxed) + 1;
        eject_after > 0 && n >= eject_after && !self.ejected.swap(true, Relaxed)
    }

    pub fn readmit(&self) {
        self.failures.store(0, Relaxed);
        self.ejected.store(false, Relaxed);
    }

    #[cfg(test)]
    pub fn ewma_secs(&self) -> f64 {
        self.ewma.lock().unwrap().0
    }
}

/// Why no replica could take a request.
#[derive(Debug, PartialEq)]
pub enum Unavailable {
    /// The queue was full.
    Overflow,
    /// Nothing became available before the deadline.
    Timeout {
        waited: Duration,
        had_replicas: bool,
    },
}

/// A service as its proxy sees it.
pub struct Backend {
    pub service: String,
    pub settings: RwLock<ProxySettings>,
    pub cold_start_timeout: RwLock<Duration>,
    endpoints: RwLock<Arc<[Arc<Endpoint>]>>,
    rr: AtomicUsize,
    rng: AtomicU64,
    changed: Notify,
    pub queued: AtomicUsize,
    pub metrics: Metrics,
    /// Unix ms of the last request, for scale to zero.
    pub last_request_ms: AtomicU64,
    /// Called when a request finds no replica at all (scale from zero).
    pub on_empty: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// When a request first found no replica, for the cold start time.
    pub cold_since: Mutex<Option<Instant>>,
    /// The service's health check, to re-admit an ejected replica.
    pub health: RwLock<Option<crate::spec::HealthTest>>,
    /// How requests are shared during a canary.
    pub split: RwLock<Option<Split>>,
}

/// A replica as a retry excludes it: revision and index.
pub type Tried = (crate::state::Revision, u32);

impl Backend {
    pub fn new(service: &str) -> Backend {
        Backend {
            service: service.to_owned(),
            settings: RwLock::new(ProxySettings::default()),
            cold_start_timeout: RwLock::new(Duration::from_secs(30)),
            endpoints: RwLock::new(Arc::from(Vec::new())),
            rr: AtomicUsize::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15 ^ crate::logs::now_ns() as u64),
            changed: Notify::new(),
            queued: AtomicUsize::new(0),
            metrics: Metrics::default(),
            last_request_ms: AtomicU64::new(crate::events::now_ms() as u64),
            on_empty: Mutex::new(None),
            cold_since: Mutex::new(None),
            health: RwLock::new(None),
            split: RwLock::new(None),
        }
    }

    pub fn endpoints(&self) -> Arc<[Arc<Endpoint>]> {
        self.endpoints.read().unwrap().clone()
    }

    /// Replaces the ready set; requests waiting in the queue look again.
    pub fn set_endpoints(&self, eps: Vec<Arc<Endpoint>>) {
        let old = std::mem::replace(&mut *self.endpoints.write().unwrap(), Arc::from(eps));
        let now = self.endpoints();
        for e in old.iter() {
            if !now.iter().any(|n| Arc::ptr_eq(n, e)) {
                e.gone.store(true, Relaxed);
            }
        }
        self.changed.notify_waiters();
    }

    /// Wakes queued requests (a replica came back or has room again).
    pub fn wake_queue(&self) {
        self.changed.notify_waiters();
    }

    fn random(&self) -> u64 {
        // xorshift64*; a lost update between threads only repeats a number.
        let mut x = self.rng.load(Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Relaxed);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A draw for [`Backend::pick`]'s `bucket`.
    pub fn bucket(&self) -> u32 {
        (self.random() % 10_000) as u32
    }

    /// A replica that can take a request now, not one of `exclude`; during
    /// a canary, on the side `bucket` (0..10000) falls to, unless that side
    /// has none that can.
    pub fn pick(&self, exclude: &[Tried], bucket: u32) -> Option<Arc<Endpoint>> {
        let all = self.endpoints();
        let guard = self.split.read().unwrap();
        if let Some(split) = guard.as_ref() {
            let side = split.route(bucket);
            let mine: Vec<Arc<Endpoint>> = all
                .iter()
                .filter(|e| split.side(e.revision, e.replica) == side)
                .cloned()
                .collect();
            if let Some(ep) = self.pick_from(&mine, exclude) {
                return Some(ep);
            }
            // A canary with no share left (weight 0, after a failure) never
            // takes the others' requests.
            let rest: Vec<Arc<Endpoint>> = all
                .iter()
                .filter(|e| split.weight > 0 || split.side(e.revision, e.replica) != Side::Canary)
                .cloned()
                .collect();
            return self.pick_from(&rest, exclude);
        }
        drop(guard);
        self.pick_from(&all, exclude)
    }

    fn pick_from(&self, eps: &[Arc<Endpoint>], exclude: &[Tried]) -> Option<Arc<Endpoint>> {
        let (balance, max) = {
            let s = self.settings.read().unwrap();
            (s.balance, s.max_inflight as usize)
        };
        let ok = |e: &Endpoint| {
            !e.ejected.load(Relaxed)
                && !e.draining.load(Relaxed)
                && (max == 0 || e.inflight.load(Relaxed) < max)
                && !exclude.contains(&(e.revision, e.replica))
        };
        let n = eps.len();
        if n == 0 {
            return None;
        }
        match balance {
            Balance::RoundRobin => {
                let start = self.rr.fetch_add(1, Relaxed);
                (0..n)
                    .map(|i| &eps[(start + i) % n])
                    .find(|e| ok(e))
                    .cloned()
            }
            Balance::P2c => {
                let r = self.random();
                let a = &eps[(r % n as u64) as usize];
                let b = &eps[((r >> 32) % n as u64) as usize];
                let chosen = match (ok(a), ok(b)) {
                    (true, true) if !Arc::ptr_eq(a, b) => {
                        Some(if b.cost() < a.cost() { b } else { a })
                    }
                    (true, _) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => None,
                };
                // Both draws unusable: the least loaded of the rest, if any.
                chosen
                    .or_else(|| {
                        eps.iter()
                            .filter(|e| ok(e))
                            .min_by(|x, y| x.cost().total_cmp(&y.cost()))
                    })
                    .cloned()
            }
        }
    }

    /// Waits (bounded by the queue size and `deadline`) for a replica to take a
    /// request, and counts the request in flight on it.
    pub async fn acquire(
        self: &Arc<Self>,
        exclude: &[Tried],
        deadline: tokio::time::Instant,
        bucket: u32,
    ) -> Result<Lease, Unavailable> {
        self.last_request_ms
            .store(crate::events::now_ms() as u64, Relaxed);
        if let Some(ep) = self.pick(exclude, bucket) {
            return Ok(Lease::new(self.clone(), ep));
        }
        let limit = self.settings.read().unwrap().queue as usize;
        if self.queued.fetch_add(1, Relaxed) >= limit {
            self.queued.fetch_sub(1, Relaxed);
            self.metrics.overflows.fetch_add(1, Relaxed);
            return Err(Unavailable::Overflow);
        }
        let started = tokio::time::Instant::now();
        let _queued = Dequeue(&self.queued);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(ep) = self.pick(exclude, bucket) {
                return Ok(Lease::new(self.clone(), ep));
            }
            if self.endpoints().is_empty() {
                self.cold_since
                    .lock()
                    .unwrap()
                    .get_or_insert_with(crate::state::clock::stopwatch);
                if let Some(f) = &*self.on_empty.lock().unwrap() {
                    f();
                }
            }
            tokio::select! {
                _ = notified => {}
                // Asks again for a replica, should the first wake have come
                // while one was still on its way out.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Unavailable::Timeout {
                        waited: started.elapsed(),
                        had_replicas: !self.endpoints().is_empty(),
                    });
                }
            }
        }
    }

    /// How long a new request may wait for a replica: the cold start timeout
    /// when the service has none, else the request timeout.
    pub fn queue_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        let wait = if self.endpoints().is_empty() {
            *self.cold_start_timeout.read().unwrap()
        } else {
            timeout
        };
        tokio::time::Instant::now() + wait
    }

    /// Requests in flight over every replica.
    pub fn inflight(&self) -> usize {
        self.endpoints()
            .iter()
            .map(|e| e.inflight.load(Relaxed))
            .sum()
    }
}

struct Dequeue<'a>(&'a AtomicUsize);

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A request in flight on a replica; dropping it ends the request.
pub struct Lease {
    pub backend: Arc<Backend>,
    pub ep: Arc<Endpoint>,
}

impl Lease {
    pub fn new(backend: Arc<Backend>, ep: Arc<Endpoint>) -> Lease {
        ep.inflight.fetch_add(1, Relaxed);
        Lease { backend, ep }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.ep.inflight.fetch_sub(1, Relaxed) == 1 {
            self.ep.idle.notify_waiters();
        }
        if self.backend.queued.load(Relaxed) > 0 {
            self.backend.wake_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u32) -> Endpoint {
        Endpoint::new(
            &crate::state::ReplicaId::new("web", 1, i),
            std::net::SocketAddr::from(([127, 0, 0, 1], 30000 + i as u16)),
        )
    }

    fn backend(n: u32, balance: Balance) -> Arc<Backend> {
        let b = Arc::new(Backend::new("web"));
        b.settings.write().unwrap().balance = balance;
        b.set_endpoints((0..n).map(|i| Arc::new(ep(i))).collect());
        b
    }

    #[test]
    fn round_robin_takes_turns() {
        let b = backend(3, Balance::RoundRobin);
        let picks: Vec<u32> = (0..6).map(|_| b.pick(&[], 0).unwrap().replica).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let b = backend(2, Balance::P2c);
        let eps = b.endpoints();
        eps[0].inflight.store(10, Relaxed);
        let mut zero = 0;
        for _ in 0..1000 {
            if b.pick(&[], 0).unwrap().replica == 1 {
                zero += 1;
            }
        }
        // Replica 1 wins every draw that includes both (about half), and every
        // draw of itself alone: never less than 70%.
        assert!(zero > 700, "replica 1 chosen {zero} of 1000 times");
    }

    #[test]
    fn p2c_weighs_latency() {
        let b = backend(2, Balance::P2c);
        let eps = b.endpoints();
        eps[0].observe(Duration::from_millis(50));
        eps[1].observe(Duration::from_millis(1));
        let slow = (0..1000)
            .filter(|_| b.pick(&[], 0).unwrap().replica == 0)
            .count();
        assert!(
            slow < 300,
            "the slow replica was chosen {slow} of 1000 times"
        );
    }

    #[test]
    fn ejected_draining_excluded_and_full_are_skipped() {
        let b = backend(4, Balance::P2c);
        b.settings.write().unwrap().max_inflight = 2;
        let eps = b.endpoints();
        eps[0].ejected.store(true, Relaxed);
        eps[1].draining.store(true, Relaxed);
        eps[2].inflight.store(2, Relaxed);
        for _ in 0..200 {
            assert_eq!(b.pick(&[], 0).unwrap().replica, 3);
        }
        assert!(b.pick(&[(1, 3)], 0).is_none());
    }

    #[test]
    fn ejection_after_consecutive_failures_only() {
        let e = ep(0);
        assert!(!e.fail(3));
        assert!(!e.fail(3));
        e.observe(Duration::from_millis(1));
        assert!(!e.fail(3));
        assert!(!e.fail(3));
        assert!(e.fail(3), "third consecutive failure ejects");
        assert!(!e.fail(3), "already ejected: reported once");
        e.readmit();
        assert!(!e.ejected.load(Relaxed));
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let e = ep(0);
        e.observe(Duration::from_millis(100));
        assert!((e.ewma_secs() - 0.1).abs() < 1e-9);
        e.observe(Duration::from_millis(1));
        assert!(e.ewma_secs() <= 0.1 && e.ewma_secs() > 0.05);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_waits_for_a_replica_and_overflows() {
        let b = backend(0, Balance::P2c);
        b.settings.write().unwrap().queue = 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let b2 = b.clone();
        let waiter =
            tokio::spawn(async move { b2.acquire(&[], deadline, 0).await.map(|l| l.ep.replica) });
        tokio::task::yield_now().await;
        while b.queued.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // The queue holds one: the next request overflows.
        assert_eq!(
            b.acquire(&[], deadline, 0).await.err(),
            Some(Unavailable::Overflow)
        );
        b.set_endpoints(vec![Arc::new(ep(7))]);
        assert_eq!(waiter.await.unwrap().unwrap(), 7);
        assert_eq!(b.queued.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_times_out() {
        let b = backend(0, Balance::P2c);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        match b.acquire(&[], deadline, 0).await {
            Err(Unavailable::Timeout {
                waited,
                had_replicas,
            }) => {
                assert_eq!(waited, Duration::from_secs(2));
                assert!(!had_replicas);
            }
            other => panic!("expected a timeout, got {:?}", other.map(|l| l.ep.replica)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lease_release_wakes_a_full_queue() {
        let b = backend(1, Balance::P2c);
        b.settings.write().unwrap().max_inflight = 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let first = b.acquire(&[], deadline, 0).await.unwrap();
        let b2 = b.clone();
        let second = tokio::spawn(async move { b2.acquire(&[], deadline, 0).await.is_ok() });
        while b.queued.load(Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(second.await.unwrap());
    }

    #[test]
    fn a_split_shares_requests_by_weight_not_by_replica_count() {
        // Four stable replicas (one of them the baseline) and one canary.
        let b = backend(4, Balance::P2c);
        let mut eps: Vec<Arc<Endpoint>> = b.endpoints().to_vec();
        eps.push(Arc::new(Endpoint::new(
            &crate::state::ReplicaId::new("web", 2, 0),
            std::net::SocketAddr::from(([127, 0, 0, 1], 31000)),
        )));
        b.set_endpoints(eps);
        let split = Split {
            canary: 2,
            weight: 10,
            stable: 1,
            baseline: vec![3],
            sticky: None,
        };
        *b.split.write().unwrap() = Some(split.clone());
        let mut sides = [0u32; 3];
        for _ in 0..10_000 {
            let e = b.pick(&[], b.bucket()).unwrap();
            sides[split.side(e.revision, e.replica) as usize] += 1;
        }
        let [canary, baseline, stable] = sides;
        assert!((800..1200).contains(&canary), "{sides:?}");
        assert!((800..1200).contains(&baseline), "{sides:?}");
        assert!((7600..8400).contains(&stable), "{sides:?}");
        // A bucket on the canary stays there as the weight grows.
        assert_eq!(split.route(500), Side::Canary);
        let half = Split {
            weight: 50,
            ..split.clone()
        };
        assert_eq!(half.route(500), Side::Canary);
        assert_eq!(half.route(5000), Side::Baseline);
        // After a failure (weight 0) the canary gets nothing, even when its
        // side is asked for and the others are busy.
        *b.split.write().unwrap() = Some(Split { weight: 0, ..split });
        for i in 0..1000 {
            assert_ne!(b.pick(&[], i * 10).unwrap().revision, 2);
        }
    }
}
