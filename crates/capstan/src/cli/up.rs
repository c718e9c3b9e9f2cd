//! `capstan up` (foreground or `-d`), and the hidden `capstan daemon`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper::Method;

use super::{Ctx, output};
use crate::client::Client;
use crate::daemon;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub f: super::FileOpt,
    /// Detach: return once every service is started or failed.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Address of the API and dashboard.
    #[arg(long, default_value = "127.0.0.1:9700")]
    pub listen: SocketAddr,
    /// Longest wait for services to settle before printing the table.
    #[arg(long, default_value = "120s", value_parser = parse_dur)]
    pub wait_timeout: Duration,
    /// The plan is printed already (`capstan deploy`).
    #[arg(skip)]
    pub planned: bool,
}

#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub f: super::FileOpt,
    #[arg(long, default_value = "127.0.0.1:9700")]
    listen: SocketAddr,
    /// SERVICE=IMAGE-ID: the image `capstan up` built for a `build:` service.
    #[arg(long, value_name = "SERVICE=ID")]
    built: Vec<String>,
    /// Override files merged over the stack file (`deploy -f a -f b`).
    #[arg(long = "override", value_name = "FILE")]
    pub overrides: Vec<std::path::PathBuf>,
}

pub fn parse_dur(s: &str) -> Result<Duration, String> {
    crate::spec::parse_duration(s)
}

fn options(ctx: &Ctx, listen: SocketAddr, loaded: crate::spec::Loaded) -> Result<daemon::Options> {
    let data_dir = ctx.data_dir(&loaded.file);
    Ok(daemon::Options {
        log_max_file: loaded.stack.settings.logs.max_file_size,
        log_max_total: loaded.stack.settings.logs.max_total_size,
        file: loaded.file,
        data_dir,
        listen,
        stack: loaded.stack,
    })
}

pub async fn daemon(ctx: &Ctx, args: DaemonArgs) -> Result<i32> {
    let _ = nix::unistd::setsid();
    init_tracing("info");
    let mut opts = options(ctx, args.listen, ctx.load()?)?;
    for b in &args.built {
        let (service, id) = b
            .split_once('=')
            .with_context(|| format!("--built {b}: expected SERVICE=ID"))?;
        let svc = opts
            .stack
            .services
            .get_mut(service)
            .with_context(|| format!("--built {b}: no service {service:?}"))?;
        svc.built = Some(id.to_owned());
    }
    daemon::run(opts, None).await?;
    Ok(0)
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSTAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn up(ctx: &Ctx, args: UpArgs) -> Result<i32> {
    let loaded = ctx.load()?;
    up_loaded(ctx, args, loaded).await
}

/// `up` with the stack already loaded (`capstan deploy` loads it first).
pub async fn up_loaded(ctx: &Ctx, args: UpArgs, loaded: crate::spec::Loaded) -> Result<i32> {
    let mut opts = options(ctx, args.listen, loaded)?;
    // Containers need an engine: say so before anything starts.
    if let Err(why) = super::engine_for(&opts.stack).await {
        anyhow::bail!("{}: {why}", opts.file.display());
    }
    // Images are fetched here, where their progress can be shown, as
    // compose does; the daemon pulls only what goes missing later.
    super::images::pull_images(&opts.stack, &[], false).await?;
    let id = daemon::stack_id(&opts.stack, &opts.file);
    super::images::build_images(&mut opts.stack, &id, &[]).await?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.data_dir)
            .with_context(|| format!("creating {}", opts.data_dir.display()))?;
    }
    // A daemon already runs for this stack: hand it the new definition.
    if let Ok(client) = Client::find(&opts.data_dir, None)
        && client
            .json(Method::GET, "/capstan/v1/status", None)
            .await
            .is_ok()
    {
        if !args.planned
            && let Ok(now) = client.json(Method::GET, "/capstan/v1/stack", None).await
            && let Ok(now) = serde_json::from_value::<crate::spec::Stack>(now)
        {
            let plan = super::deploy::plan(Some(&now), &opts.stack);
            print!("{}", super::deploy::render(&opts.stack.name, &plan));
        }
        let body = serde_json::to_value(&opts.stack)?;
        let v = client
            .json(Method::POST, "/capstan/v1/apply", Some(body))
            .await?;
        println!(
            "applied to the running daemon (pid {}): {}",
            client.info.pid,
            v["message"].as_str().unwrap_or("")
        );
        let ok = settle(&client, args.wait_timeout).await?;
        return Ok(if ok { 0 } else { 1 });
    }
    if args.detach {
        return detach(&opts, &args, ctx).await;
    }
    init_tracing("warn");
    let started_ms = crate::events::now_ms();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let data_dir = opts.data_dir.clone();
    let daemon_task = tokio::spawn(daemon::run(opts, Some(ready_tx)));
    if ready_rx.await.is_err() {
        return match daemon_task.await {
            Ok(Err(e)) => Err(e),
            _ => bail!("the daemon stopped before it was ready"),
        };
    }
    let client = Client::find(&data_dir, None)?;
    println!(
        "capstan daemon pid {} listening on {} (Ctrl-C stops everything)",
        client.info.pid, client.info.addr
    );
    // Follow the events from the start, so that a Ctrl-C during the start-up
    // still shows the replicas stopping; they are printed once the start-up
    // summary is.
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = Client::find(&data_dir, None)?;
    let path = format!(
        "/capstan/v1/events?follow=true&since_ns={}",
        started_ms * 1_000_000
    );
    let follow =
        tokio::spawn(async move { follower.stream(&path, |v| ev_tx.send(v).is_ok()).await });
    if let Err(e) = settle(&client, args.wait_timeout).await {
        // The API went away with the daemon (Ctrl-C while starting), or the
        // summary could not be read: the events still tell what happens.
        tracing::debug!("start-up summary: {e:#}");
    }
    let color = output::use_color();
    while let Some(v) = ev_rx.recv().await {
        if v["kind"] != "daemon-started" {
            println!("{}", output::event_line(&v, color));
        }
    }
    let _ = follow.await;
    daemon_task.await.context("daemon task")??;
    Ok(0)
}

async fn detach(opts: &daemon::Options, args: &UpArgs, ctx: &Ctx) -> Result<i32> {
    let log_path = opts.data_dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("daemon")
        .arg("-f")
        .arg(&opts.file)
        .arg("--data-dir")
        .arg(&opts.data_dir)
        .arg("--listen")
        .arg(args.listen.to_string());
    for p in &ctx.profiles {
        cmd.arg("--profile").arg(p);
    }
    for o in &ctx.overrides {
        cmd.arg("--override").arg(std::path::absolute(o)?);
    }
    // What this command built, so the daemon does not build it again.
    for (name, svc) in &opts.stack.services {
        if let Some(id) = &svc.built {
            cmd.arg("--built").arg(format!("{name}={id}"));
        }
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = cmd.spawn().context("starting the daemon")?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let client = loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            bail!(
                "the daemon exited ({status}) during startup:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(c) = Client::find(&opts.data_dir, None)
            && c.info.pid == pid
            && c.json(Method::GET, "/capstan/v1/status", None)
                .await
                .is_ok()
        {
            break c;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the daemon did not become ready within 30s; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "capstan daemon pid {pid} listening on {} (logs: {})",
        client.info.addr,
        log_path.display()
    );
    let ok = settle(&client, args.wait_timeout).await?;
    // The daemon is not our child any more in spirit: leave it running.
    drop(child);
    Ok(if ok { 0 } else { 1 })
}

/// One service's progress as shown while starting.
#[derive(Debug, PartialEq, Clone)]
struct Progress {
    text: String,
    settled: bool,
    ok: bool,
}

/// How long a replica without a health check must stay up to count as started.
const SETTLE_UPTIME_MS: i64 = 1000;

fn progress(v: &serde_json::Value, now_ms: i64) -> BTreeMap<String, Progress> {
    use crate::state::{Health, Phase, ServiceStatus, Status};
    let replicas: Vec<Status> = serde_json::from_value(v["replicas"].clone()).unwrap_or_default();
    let services: Vec<ServiceStatus> =
        serde_json::from_value(v["services"].clone()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for s in services {
        let name = s.name.clone();
        let desired = s.desired as usize;
        let has_hc = s.has_healthcheck;
        let mine: Vec<&Status> = replicas.iter().filter(|r| r.service == name).collect();
        // Without a health check, a replica counts once it has stayed up for
        // a second: one that exits at once must show as failed, not started.
        let up_long_enough =
            |r: &Status| has_hc || r.started_ms.is_some_and(|t| now_ms - t >= SETTLE_UPTIME_MS);
        let ready = mine
            .iter()
            .filter(|r| {
                (r.state == Phase::Running
                    && (!has_hc || r.health == Health::Healthy)
                    && up_long_enough(r))
                    || (r.state == Phase::Exited && r.exit_code == Some(0))
            })
            .count();
        let failed_early =
            |r: &Status| r.state == Phase::Restarting && r.last_exit.is_some() && r.restarts == 0;
        let bad: Vec<String> = mine
            .iter()
            .filter(|r| matches!(r.state, Phase::CrashLooping | Phase::Failed) || failed_early(r))
            .map(|r| {
                let state = match r.state {
                    Phase::Restarting => Phase::Failed,
                    s => s,
                };
                match &r.last_exit {
                    Some(why) => format!("{state} ({why})"),
                    None => state.to_string(),
                }
            })
            .collect();
        let waiting = mine
            .iter()
            .find(|r| r.state == Phase::Waiting)
            .map(|r| r.message.clone());
        let word = if has_hc { "healthy" } else { "running" };
        let p = if s.stopped {
            Progress {
                text: "stopped".into(),
                settled: true,
                ok: true,
            }
        } else if !bad.is_empty() {
            Progress {
                text: format!("{}/{desired} {word}, {} {}", ready, bad.len(), bad[0]),
                settled: true,
                ok: false,
            }
        } else if ready >= desired {
            Progress {
                text: format!("{ready}/{desired} {word}"),
                settled: true,
                ok: true,
            }
        } else if let Some(w) = waiting.filter(|w| !w.is_empty()) {
            Progress {
                text: w,
                settled: false,
                ok: false,
            }
        } else {
            Progress {
                text: format!("{ready}/{desired} {word}, starting"),
                settled: false,
                ok: false,
            }
        };
        out.insert(name, p);
    }
    // A service waiting on a failed dependency will not start: count it as settled.
    let failed: Vec<String> = out
        .iter()
        .filter(|(_, p)| p.settled && !p.ok)
        .map(|(n, _)| n.clone())
        .collect();
    for p in out.values_mut() {
        if !p.settled
            && p.text.starts_with("waiting for")
            && failed.iter().any(|f| p.text.contains(f.as_str()))
        {
            p.settled = true;
            p.text.push_str(" (a dependency failed)");
        }
    }
    out
}

/// Shows progress until every service is started or failed, then the table.
/// Returns whether every service came up.
async fn settle(client: &Client, timeout: Duration) -> Result<bool> {
    let tty = std::io::stdout().is_terminal();
    let multi = indicatif::MultiProgress::new();
    let mut bars: BTreeMap<String, indicatif::ProgressBar> = BTreeMap::new();
    let mut last: BTreeMap<String, Progress> = BTreeMap::new();
    let began = tokio::time::Instant::now();
    let deadline = began + timeout;
    let final_state = loop {
        let v = client.json(Method::GET, "/capstan/v1/ps", None).await?;
        let now = progress(&v, crate::events::now_ms());
        for (name, p) in &now {
            if last.get(name) == Some(p) {
                continue;
            }
            if tty {
                let bar = bars.entry(name.clone()).or_insert_with(|| {
                    let b = multi.add(indicatif::ProgressBar::new_spinner());
                    b.set_style(
                        indicatif::ProgressStyle::with_template("{spinner} {prefix:.bold} {msg}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                    );
                    b.set_prefix(name.clone());
                    b.enable_steady_tick(Duration::from_millis(100));
                    b
                });
                if p.settled {
                    bar.finish_with_message(format!("{} {}", if p.ok { "✔" } else { "✘" }, p.text));
                } else {
                    bar.set_message(p.text.clone());
                }
            } else {
                println!("{name}: {}", p.text);
            }
        }
        last = now.clone();
        // Right after start the daemon may not list the services yet: an empty
        // list is "settled" only once it has had time to load them.
        let listed = !now.is_empty() || began.elapsed() > Duration::from_secs(2);
        if listed && now.values().all(|p| p.settled) {
            break (v, now);
        }
        if tokio::time::Instant::now() > deadline {
            println!(
                "still starting after {}; see `capstan ps` and `capstan events`",
                crate::spec::Dur(timeout)
            );
            break (v, now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for b in bars.values() {
        if !b.is_finished() {
            b.abandon();
        }
    }
    print!("{}", output::ps_table(&final_state.0));
    Ok(final_state.1.values().all(|p| p.ok))
}
