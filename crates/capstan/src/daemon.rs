//! The daemon: holds the data dir lock, runs the supervisor and serves the API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::events::EventLog;
use crate::logs::engine::LogEngine;
use crate::spec::Stack;
use crate::supervisor::{self, Command, Shared, Supervisor, cgroup::Cgroups, state::StateFile};

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

/// Runs until `down` or SIGTERM/SIGINT, then stops every replica and returns.
/// `ready` gets the bound address once the API listens.
pub async fn run(opts: Options, ready: Option<oneshot::Sender<SocketAddr>>) -> Result<()> {
    crate::supervisor::process::private_umask();
    // Handled before any replica starts: a process started with SIGINT or
    // SIGTERM ignored (in the background of a shell, under nohup) would pass
    // that on, and replicas could not be stopped with those signals. Handled
    // signals are reset to their defaults in a program that is exec'd.
    let stop_signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
    let _lock = lock(&opts.data_dir)?;
    let repaired = make_private(&opts.data_dir)?;
    let token = ensure_token(&opts.data_dir)?;
    let events = EventLog::open(&opts.data_dir).context("opening the event log")?;
    for (path, mode) in repaired {
        events.emit(
            "capstan",
            None,
            "warning",
            format!(
                "{} was readable by others (mode {mode:o}); made private",
                path.display()
            ),
        );
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
    let id = stack_id(&opts.stack, &opts.file);
    let detected = if std::env::var("CAPSTAN_CGROUPS").is_ok_and(|v| v == "off") {
        Err("turned off by CAPSTAN_CGROUPS=off".to_owned())
    } else {
        Cgroups::detect(&id)
    };
    let cgroups = match detected {
        Ok(c) => Some(c),
        Err(why) => {
            events.emit("capstan", None, "warning", format!("cgroups unavailable ({why}): resource limits are not applied; CPU and memory come from /proc"));
            None
        }
    };
    let stack_dir = opts.file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let shared = Arc::new(Shared::new(
        id,
        stack_dir,
        events,
        logs,
        traces,
        cgroups.clone(),
        StateFile::open(&opts.data_dir),
    ));
    for (what, (path, why)) in recovery
        .truncated
        .iter()
        .map(|t| ("log", t))
        .chain(trace_recovery.truncated.iter().map(|t| ("trace", t)))
    {
        shared.events.emit(
            "capstan",
            None,
            "warning",
            format!(
                "{what} store: cut {} ({why}); earlier entries are kept",
                path.display()
            ),
        );
    }
    supervisor::stop_leftovers(&shared).await;
    let proxy_sync = tokio::spawn(crate::proxy::run(shared.clone()));
    let log_keeper = tokio::spawn(keep_logs(shared.clone()));

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
        shared
            .events
            .emit("capstan", None, "warning", format!("metrics store: {cut}"));
    }
    if replay.future_dropped > 0 {
        shared.events.emit(
            "capstan",
            None,
            "warning",
            format!(
                "metrics store: {} logged samples more than {} ahead of the clock left out",
                replay.future_dropped, storage.max_future
            ),
        );
    }
    let db = Arc::new(db);
    let syncer = {
        let db = db.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if let Err(e) = tokio::task::block_in_place(|| db.sync()) {
                    tracing::error!("cannot sync the metrics store: {e}");
                }
                tick += 1;
                // Once a minute: cut old samples into a block, apply retention.
                if tick.is_multiple_of(60) {
                    match tokio::task::block_in_place(|| db.maintain()) {
                        Ok(m) => {
                            if let Some(b) = m.block {
                                tracing::info!(block = %b.display(), deleted = m.deleted, "metrics store: head cut into a block");
                            }
                        }
                        Err(e) => {
                            shared.warn_once(format!("metrics store maintenance failed: {e}"))
                        }
                    }
                }
            }
        })
    };
    let (scrape_stop, scrape_stop_rx) = tokio::sync::watch::channel(false);
    let scraper = tokio::spawn(crate::scrape::run(
        shared.clone(),
        db.clone(),
        scrape_stop_rx,
    ));

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    *shared.api_addr.lock().unwrap() = Some(addr.to_string());
    let info = DaemonInfo {
        pid: std::process::id(),
        addr,
        file: opts.file.clone(),
        started_ms: crate::events::now_ms(),
    };
    let info_path = opts.data_dir.join("daemon.json");
    std::fs::write(&info_path, serde_json::to_vec_pretty(&info)?).context("writing daemon.json")?;

    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let sup = Supervisor::new(shared.clone(), opts.stack.clone());
    let sup_task = tokio::spawn(sup.run(opts.stack.clone(), cmd_rx));
    let engine = crate::api::prom::engine(&opts.stack.settings.query);
    let autoscaler = tokio::spawn(crate::autoscale::run(
        shared.clone(),
        db.clone(),
        engine.clone(),
        cmd_tx.clone(),
    ));
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let api = crate::api::Api {
        stopping: stopping_rx.clone(),
        db: db.clone(),
        engine,
        query_stats: Default::default(),
        started: jiff::Timestamp::now(),
        retention: format!("{}d", storage.retention.0.as_secs() / 86_400),
        reads_need_token: !addr.ip().is_loopback(),
        listen: addr,
        shared: shared.clone(),
        commands: cmd_tx.clone(),
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
    shared.events.emit(
        "capstan",
        None,
        "daemon-started",
        format!("pid {} listening on {addr}", info.pid),
    );
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    let router = crate::api::router(api);
    let shutdown_tx = cmd_tx.clone();
    let signals = async move {
        let (Some(mut term), Some(mut int)) = stop_signals else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let (tx, _rx) = oneshot::channel();
        let _ = shutdown_tx.send(Command::Down(tx)).await;
    };
    tokio::spawn(signals);
    // The supervisor returns after `down`; then the server stops.
    // Open streams (events -f, logs -f) end when `stopping` flips, so the
    // graceful shutdown does not wait on followers; 5s bounds it regardless.
    let db_for_shutdown = db.clone();
    let logs_for_shutdown = shared.clone();
    let stopped = async move {
        let _ = sup_task.await;
        autoscaler.abort();
        // Replicas are gone: the scraper marks their series stale and stops.
        let _ = scrape_stop.send(true);
        let _ = scraper.await;
        syncer.abort();
        proxy_sync.abort();
        log_keeper.abort();
        if let Err(e) = tokio::task::block_in_place(|| logs_for_shutdown.logs.flush()) {
            tracing::error!("cannot flush the log store: {e}");
        }
        if let Err(e) = tokio::task::block_in_place(|| logs_for_shutdown.traces.flush()) {
            tracing::error!("cannot flush the trace store: {e}");
        }
        if let Err(e) = tokio::task::block_in_place(|| db_for_shutdown.sync()) {
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
    shared.events.emit(
        "capstan",
        None,
        "daemon-stopped",
        "every service stopped; daemon exiting",
    );
    let _ = std::fs::remove_file(&info_path);
    Ok(())
}

/// Days spans are kept (and at most as many bytes as logs).
const TRACE_RETENTION_DAYS: u64 = 7;

/// Flushes the log and trace stores every second (the durability point of
/// captured and pushed lines and of spans) and seals, compacts and applies
/// retention every ten.
async fn keep_logs(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            s.logs.flush()?;
            s.traces.flush()?;
            if n % 10 == 9 {
                s.logs.maintain()?;
                s.traces.maintain()?;
            }
            Ok::<_, capstan_logstore::Error>(())
        })
        .await;
        if let Ok(Err(e)) = r {
            shared.warn_once(format!("log store: {e}"));
        }
    }
}
