//! The daemon: holds the data dir lock, runs the supervisor and serves the API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::autoscale::Autoscaler;
use crate::events::EventLog;
use crate::logs::engine::LogEngine;
use crate::proxy::Proxy;
use crate::scrape::Scraper;
use crate::spec::Stack;
use crate::state::StatusBoard;
use crate::state::control::Hook;
use crate::supervisor::driver::Drivers;
use crate::supervisor::driver::cgroup::Cgroups;
use crate::supervisor::driver::container::ContainerDriver;
use crate::supervisor::driver::process::ProcessDriver;
use crate::supervisor::records::StateFile;
use crate::supervisor::{self, Supervisor};

/// `daemon.json` in the data dir: how the CLI finds a running daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub addr: SocketAddr,
    pub file: PathBuf,
    pub started_ms: i64,
}

pub struct Options {
    pub file: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub stack: Stack,
    pub log_max_file: u64,
    pub log_max_total: u64,
}

/// Reads the bearer token, creating it (mode 0600) on first start.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_owned());
    }
    let mut raw = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .context("reading /dev/urandom for the API token")?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    Ok(token)
}

/// The data dir is the user's alone: 0700, and the token 0600. Returns what
/// was more open than that (and its mode), now repaired.
fn make_private(data_dir: &Path) -> Result<Vec<(PathBuf, u32)>> {
    use std::os::unix::fs::PermissionsExt;
    let mut repaired = Vec::new();
    for (path, want) in [
        (data_dir.to_path_buf(), 0o700),
        (data_dir.join("token"), 0o600),
    ] {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(want))
                .with_context(|| format!("making {} private", path.display()))?;
            repaired.push((path, mode));
        }
    }
    Ok(repaired)
}

/// A stable id for the stack's cgroups: its name and a hash of its file's path.
pub fn stack_id(stack: &Stack, file: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in file.to_string_lossy().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}-{:08x}", stack.name, h as u32)
}

/// Takes the data dir's lock; fails if another daemon holds it.
pub fn lock(data_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = data_dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, e)) => bail!(
            "another capstan daemon is running for {} ({e})",
            data_dir.display()
        ),
    }
}

/// The stores the daemon keeps in its data dir.
struct Stores {
    events: Arc<EventLog>,
    logs: Arc<LogEngine>,
    traces: Arc<crate::traces::TraceStore>,
    db: Arc<capstan_tsdb::Db>,
}

/// Opens the event log, the log and trace stores and the metrics store,
/// reporting what their recovery cut or left out as warning events.
fn open_stores(opts: &Options, repaired: Vec<(PathBuf, u32)>) -> Result<Stores> {
    let events = EventLog::open(&opts.data_dir).context("opening the event log")?;
    let warn = |msg: String| events.emit("capstan", None, "warning", msg);
    for (path, mode) in repaired {
        warn(format!(
            "{} was readable by others (mode {mode:o}); made private",
            path.display()
        ));
    }
    let (logs, recovery) = LogEngine::open(
        &opts.data_dir.join("logstore"),
        opts.log_max_file,
        opts.log_max_total,
    )
    .context("opening the log store")?;
    let (traces, trace_recovery) = crate::traces::TraceStore::open(
        &opts.data_dir.join("tracestore"),
        opts.log_max_total,
        Some(std::time::Duration::from_secs(
            TRACE_RETENTION_DAYS * 86_400,
        )),
    )
    .context("opening the trace store")?;
    // The first log storage kept JSON lines under logs/: gone with the log store.
    let _ = std::fs::remove_dir_all(opts.data_dir.join("logs"));
    for (what, (path, why)) in recovery
        .truncated
        .iter()
        .map(|t| ("log", t))
        .chain(trace_recovery.truncated.iter().map(|t| ("trace", t)))
    {
        warn(format!(
            "{what} store: cut {} ({why}); earlier entries are kept",
            path.display()
        ));
    }
    let tsdb_dir = opts.data_dir.join("tsdb");
    let mut tsdb_opts = capstan_tsdb::Options::new(&tsdb_dir);
    tsdb_opts.fsync = capstan_tsdb::Fsync::Every(std::time::Duration::from_secs(1));
    let storage = &opts.stack.settings.storage;
    tsdb_opts.retention_ms = storage.retention.0.as_millis() as i64;
    tsdb_opts.retention_bytes = storage.retention_size;
    tsdb_opts.max_series = storage.max_series as usize;
    tsdb_opts.max_future_ms = Some(storage.max_future.0.as_millis() as i64);
    tsdb_opts.reject_older_than_retention = true;
    tsdb_opts.out_of_order_window_ms = storage.out_of_order_time_window.0.as_millis() as i64;
    let (db, replay) = capstan_tsdb::Db::open(tsdb_opts)
        .with_context(|| format!("opening the metrics store in {}", tsdb_dir.display()))?;
    if let Some(cut) = replay.truncated {
        warn(format!("metrics store: {cut}"));
    }
    if replay.future_dropped > 0 {
        warn(format!(
            "metrics store: {} logged samples more than {} ahead of the clock left out",
            replay.future_dropped, storage.max_future
        ));
    }
    Ok(Stores {
        events: Arc::new(events),
        logs: Arc::new(logs),
        traces: Arc::new(traces),
        db: Arc::new(db),
    })
}

/// The cgroup hierarchy replicas go in, or `None` (with a warning) where
/// cgroups are not writable or turned off.
fn cgroups(id: &str, events: &EventLog) -> Option<Cgroups> {
    let detected = if std::env::var("CAPSTAN_CGROUPS").is_ok_and(|v| v == "off") {
        Err("turned off by CAPSTAN_CGROUPS=off".to_owned())
    } else {
        Cgroups::detect(id)
    };
    match detected {
        Ok(c) => Some(c),
        Err(why) => {
            events.emit("capstan", None, "warning", format!("cgroups unavailable ({why}): resource limits are not applied; CPU and memory come from /proc"));
            None
        }
    }
}

/// PromQL over the metrics store at a time, for the autoscaler and the
/// canary analysis (it blocks: run on the multi-threaded runtime).
fn query_fn(
    stores: &Stores,
    engine: Arc<capstan_promql::Engine>,
) -> crate::state::control::QueryFn {
    let db = stores.db.clone();
    Arc::new(move |q: &str, t: i64| {
        tokio::task::block_in_place(|| engine.instant(&*db, q, t))
            .map(|o| o.value)
            .map_err(|e| e.to_string())
    })
}

/// The runtime's components, built and wired; nothing runs yet.
struct Runtime {
    board: Arc<StatusBoard>,
    history: Arc<crate::state::history::History>,
    proxy: Arc<Proxy>,
    scraper: Arc<Scraper>,
    autoscaler: Arc<Autoscaler>,
    alerting: Arc<crate::alerting::manager::Alerting>,
    supervisor: Supervisor,
    handle: crate::state::control::SupervisorHandle,
}

impl Runtime {
    fn build(
        stores: &Stores,
        data_dir: &Path,
        stack_dir: PathBuf,
        id: &str,
        cgroups: Option<Cgroups>,
        api: SocketAddr,
        query: crate::state::control::QueryFn,
    ) -> Runtime {
        let board = Arc::new(StatusBoard::default());
        let history = Arc::new(crate::state::history::History::open(Some(data_dir)));
        let events = &stores.events;
        let driver = Arc::new(Drivers {
            process: Arc::new(ProcessDriver::new(id, cgroups, events.clone())),
            container: Arc::new(ContainerDriver::new(id, events.clone())),
        });
        let ctx = Arc::new(supervisor::Context {
            board: board.clone(),
            events: events.clone(),
            logs: stores.logs.clone(),
            driver,
            records: std::sync::Mutex::new(StateFile::open(data_dir)),
            stack_dir,
            otlp: Some(api),
            history: history.clone(),
            query: Some(query.clone()),
        });
        let proxy = Proxy::new(
            board.clone(),
            events.clone(),
            stores.logs.clone(),
            stores.traces.clone(),
        );
        let scraper = Scraper::new(board.clone(), Some(api.to_string()));
        let autoscaler = Autoscaler::new(board.clone(), events.clone());
        let alerting =
            crate::alerting::manager::Alerting::new(events.clone(), Some(stores.logs.clone()));
        alerting.set_base_url(format!("http://{api}"));
        let hooks: Vec<Arc<dyn Hook>> = vec![
            Arc::new(proxy.clone()),
            Arc::new(scraper.clone()),
            Arc::new(autoscaler.clone()),
            Arc::new(alerting.clone()),
        ];
        let (supervisor, handle) = Supervisor::new(ctx, hooks);
        {
            let handle = handle.clone();
            proxy.on_wake(Arc::new(move |service: &str| handle.wake(service)));
        }
        Runtime {
            board,
            history,
            proxy,
            scraper,
            autoscaler,
            alerting,
            supervisor,
            handle,
        }
    }

    /// Starts the components under one task set (in the order they stop in
    /// reverse) and the supervisor with the first stack.
    fn start(
        self,
        stores: &Stores,
        engine: Arc<capstan_promql::Engine>,
        stack: Stack,
        data_dir: &Path,
    ) -> (TaskSet, JoinHandle<()>, Api) {
        let mut tasks = TaskSet::default();
        {
            let (db, events) = (stores.db.clone(), stores.events.clone());
            tasks.spawn("metrics store sync", move |stop| {
                keep_metrics(db, events, stop)
            });
        }
        {
            let (logs, traces, events) = (
                stores.logs.clone(),
                stores.traces.clone(),
                stores.events.clone(),
            );
            tasks.spawn("log store upkeep", move |stop| {
                keep_logs(logs, traces, events, stop)
            });
        }
        let proxy = self.proxy.clone();
        tasks.spawn("proxy", move |stop| proxy.run(stop));
        let (scraper, db) = (self.scraper.clone(), stores.db.clone());
        tasks.spawn("scraper", move |stop| scraper.run(db, stop));
        let deps = crate::autoscale::Deps {
            query: query_fn(stores, engine.clone()),
            clock: Arc::new(crate::state::clock::SystemClock),
            supervisor: self.handle.clone(),
        };
        let autoscaler = self.autoscaler.clone();
        tasks.spawn("autoscaler", move |stop| autoscaler.run(deps, stop));
        {
            let (alerting, db, engine) = (self.alerting.clone(), stores.db.clone(), engine.clone());
            tasks.spawn("rules", move |stop| alerting.run(db, engine, stop));
        }
        let notify = Arc::new(crate::notify::NotifyStats::default());
        if let Some(url) = stack.settings.notify.clone() {
            let (events, stats, name) = (stores.events.clone(), notify.clone(), stack.name.clone());
            tasks.spawn("notifications", move |stop| {
                crate::notify::run(url, name, events, stats, stop)
            });
        }
        // Samples out to remote_write receivers, each from its own cursor.
        let remote_write = crate::forward::remote_write::stats_for(&stack.settings.remote_write);
        for (cfg, stats) in stack.settings.remote_write.iter().zip(&remote_write) {
            let (cfg, stats, db) = (cfg.clone(), stats.clone(), stores.db.clone());
            let dir = data_dir.join("remote_write");
            tasks.spawn("remote write", move |stop| {
                crate::forward::remote_write::run(cfg, db, dir, stats, stop)
            });
        }
        // Logs and spans out, each target from its own cursor.
        let logs_out = crate::forward::remote_write::stats_for(&stack.settings.logs.forward);
        let traces_out = crate::forward::remote_write::stats_for(&stack.settings.traces.forward);
        let streams = stack
            .settings
            .logs
            .forward
            .iter()
            .zip(&logs_out)
            .map(|t| {
                (
                    t,
                    crate::forward::stream::Source::Logs(stores.logs.clone()),
                    "logs",
                )
            })
            .chain(
                stack
                    .settings
                    .traces
                    .forward
                    .iter()
                    .zip(&traces_out)
                    .map(|t| {
                        (
                            t,
                            crate::forward::stream::Source::Traces(stores.traces.clone()),
                            "traces",
                        )
                    }),
            );
        for ((cfg, stats), source, what) in streams {
            let (cfg, stats) = (cfg.clone(), stats.clone());
            let dir = data_dir.join("forward").join(what);
            tasks.spawn("forwarding", move |stop| {
                crate::forward::stream::run(source, cfg, dir, stats, stop)
            });
        }
        let supervisor = tokio::spawn(self.supervisor.run(stack));
        let parts = Api {
            forward: Arc::new(crate::forward::Forwarding {
                logs: logs_out,
                traces: traces_out,
            }),
            remote_write: Arc::new(remote_write),
            board: self.board,
            history: self.history,
            notify,
            proxy: self.proxy,
            scraper: self.scraper,
            autoscaler: self.autoscaler,
            alerting: self.alerting,
            handle: self.handle,
        };
        (tasks, supervisor, parts)
    }
}

/// What the API gets of the runtime.
struct Api {
    remote_write: Arc<Vec<Arc<crate::forward::remote_write::Stats>>>,
    forward: Arc<crate::forward::Forwarding>,
    board: Arc<StatusBoard>,
    history: Arc<crate::state::history::History>,
    notify: Arc<crate::notify::NotifyStats>,
    proxy: Arc<Proxy>,
    scraper: Arc<Scraper>,
    autoscaler: Arc<Autoscaler>,
    alerting: Arc<crate::alerting::manager::Alerting>,
    handle: crate::state::control::SupervisorHandle,
}

/// Runs until `down` or SIGTERM/SIGINT, then stops every replica and returns.
/// `ready` gets the bound address once the API listens.
pub async fn run(opts: Options, ready: Option<oneshot::Sender<SocketAddr>>) -> Result<()> {
    crate::supervisor::driver::process::private_umask();
    // Handled before any replica starts: a process started with SIGINT or
    // SIGTERM ignored (in the background of a shell, under nohup) would pass
    // that on, and replicas could not be stopped with those signals. Handled
    // signals are reset to their defaults in a program that is exec'd.
    let stop_signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::hangup()).ok(),
        )
    };
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
    let _lock = lock(&opts.data_dir)?;
    let repaired = make_private(&opts.data_dir)?;
    let token = ensure_token(&opts.data_dir)?;
    let stores = open_stores(&opts, repaired)?;
    let events = stores.events.clone();
    let id = stack_id(&opts.stack, &opts.file);
    let cgroups = cgroups(&id, &events);

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let info = DaemonInfo {
        pid: std::process::id(),
        addr,
        file: opts.file.clone(),
        started_ms: crate::events::now_ms(),
    };
    let info_path = opts.data_dir.join("daemon.json");
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info)?).context("writing daemon.json")?;

    let stack_dir = opts.file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let engine = crate::api::prom::engine(&opts.stack.settings.query);
    let runtime = Runtime::build(
        &stores,
        &opts.data_dir,
        stack_dir,
        &id,
        cgroups.clone(),
        addr,
        query_fn(&stores, engine.clone()),
    );
    let (tasks, sup_task, parts) =
        runtime.start(&stores, engine.clone(), opts.stack.clone(), &opts.data_dir);

    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let storage = &opts.stack.settings.storage;
    let alerting = parts.alerting.clone();
    let api = crate::api::Api {
        stopping: stopping_rx.clone(),
        db: stores.db.clone(),
        engine,
        query_stats: Default::default(),
        started: jiff::Timestamp::now(),
        retention: format!("{}d", storage.retention.0.as_secs() / 86_400),
        reads_need_token: !addr.ip().is_loopback() || opts.stack.settings.api_require_token,
        listen: addr,
        board: parts.board,
        history: parts.history,
        notify: parts.notify,
        remote_write: parts.remote_write,
        forward: parts.forward,
        events: events.clone(),
        logs: stores.logs.clone(),
        traces: stores.traces.clone(),
        proxy: parts.proxy,
        scraper: parts.scraper,
        autoscaler: parts.autoscaler,
        alerting: alerting.clone(),
        supervisor: parts.handle.clone(),
        token: Arc::new(token),
        info: Arc::new(serde_json::json!({
            "name": opts.stack.name,
            "file": opts.file,
            "pid": info.pid,
            "addr": addr,
            "version": env!("CARGO_PKG_VERSION"),
            "cgroups": cgroups.as_ref().map(|c| c.version()),
        })),
    };
    events.emit(
        "capstan",
        None,
        "daemon-started",
        format!("pid {} listening on {addr}", info.pid),
    );
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    let router = crate::api::router(api);
    let shutdown = parts.handle;
    let (term, int, hup) = stop_signals;
    // SIGHUP reads the rule files again (alerts of unchanged rules kept).
    if let Some(mut hup) = hup {
        let alerting = alerting.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                for p in alerting.reload() {
                    alerting.warn(p);
                }
            }
        });
    }
    tokio::spawn(async move {
        let (Some(mut term), Some(mut int)) = (term, int) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = shutdown.down(false).await;
    });
    // The supervisor returns after `down`; then the components stop in order
    // and the server stops. Open streams (events -f, logs -f) end when
    // `stopping` flips, so the graceful shutdown does not wait on followers;
    // 5s bounds it regardless.
    let stopped = async move {
        let _ = sup_task.await;
        // Replicas are gone: the scraper marks their series stale and stops.
        tasks.shutdown().await;
        if let Err(e) = tokio::task::block_in_place(|| stores.logs.flush()) {
            tracing::error!("cannot flush the log store: {e}");
        }
        if let Err(e) = tokio::task::block_in_place(|| stores.traces.flush()) {
            tracing::error!("cannot flush the trace store: {e}");
        }
        if let Err(e) = tokio::task::block_in_place(|| stores.db.sync()) {
            tracing::error!("cannot sync the metrics store: {e}");
        }
        let _ = stopping_tx.send(true);
    };
    crate::api::serve::serve(
        listener,
        router,
        crate::api::serve::Limits::default(),
        stopped,
    )
    .await;
    if let Some(cg) = &cgroups {
        cg.remove_base();
    }
    events.emit(
        "capstan",
        None,
        "daemon-stopped",
        "every service stopped; daemon exiting",
    );
    let _ = std::fs::remove_file(&info_path);
    Ok(())
}

/// The daemon's long-running components: each runs until its stop flag is
/// set; [`TaskSet::shutdown`] stops them in the reverse of their start order.
#[derive(Default)]
struct TaskSet {
    tasks: Vec<(&'static str, watch::Sender<bool>, JoinHandle<()>)>,
}

/// How long a component may take to stop before it is aborted.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl TaskSet {
    fn spawn<F, Fut>(&mut self, name: &'static str, run: F)
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = watch::channel(false);
        self.tasks.push((name, tx, tokio::spawn(run(rx))));
    }

    async fn shutdown(self) {
        for (name, stop, mut task) in self.tasks.into_iter().rev() {
            let _ = stop.send(true);
            if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
                tracing::warn!(component = name, "did not stop in time; aborted");
                task.abort();
            }
        }
    }
}

/// Syncs the metrics store every second; once a minute, cuts old samples
/// into a block and applies retention.
async fn keep_metrics(
    db: Arc<capstan_tsdb::Db>,
    events: Arc<EventLog>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = tokio::task::block_in_place(|| db.sync()) {
            tracing::error!("cannot sync the metrics store: {e}");
        }
        tick += 1;
        if tick.is_multiple_of(60) {
            match tokio::task::block_in_place(|| db.maintain()) {
                Ok(m) => {
                    if let Some(b) = m.block {
                        tracing::info!(block = %b.display(), deleted = m.deleted, "metrics store: head cut into a block");
                    }
                }
                Err(e) => events.warn_once(format!("metrics store maintenance failed: {e}")),
            }
        }
    }
}

/// Days spans are kept (and at most as many bytes as logs).
const TRACE_RETENTION_DAYS: u64 = 7;

/// Flushes the log and trace stores every second (the durability point of
/// captured and pushed lines and of spans) and seals, compacts and applies
/// retention every ten.
async fn keep_logs(
    logs: Arc<LogEngine>,
    traces: Arc<crate::traces::TraceStore>,
    events: Arc<EventLog>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (l, t) = (logs.clone(), traces.clone());
        let r = tokio::task::spawn_blocking(move || {
            l.flush()?;
            t.flush()?;
            if n % 10 == 9 {
                l.maintain()?;
                t.maintain()?;
            }
            Ok::<_, capstan_logstore::Error>(())
        })
        .await;
        if let Ok(Err(e)) = r {
            events.warn_once(format!("log store: {e}"));
        }
    }
}
