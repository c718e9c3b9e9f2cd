//! Command-line interface: one file per group of subcommands.

mod deploy;
mod export;
mod images;
mod load;
mod logs;
mod output;
mod query;
mod traces;
mod up;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use hyper::Method;

use crate::client::{self, Client};
use crate::spec::{self, LoadOptions, Loaded};

const EXAMPLES: &str = "\
Examples:
  capstan up -f examples/hello/capstan.yaml     run the stack in the foreground
  capstan up -d                                 start it in the background and return
  capstan ps                                    replicas, their state, health, CPU and memory
  capstan logs web -f --since 10m               follow the web service's output
  capstan scale web=5                           run five replicas of web
  capstan down                                  stop everything gracefully";

#[derive(Parser, Debug)]
#[command(name = "capstan", version, about = "Deploy and watch an application's services on one machine, from a compose-compatible file.", after_help = EXAMPLES)]
pub struct Cli {
    /// Stack file (default: capstan.yaml, compose.yaml or docker-compose.yml in the current directory).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Data directory (default: .capstan beside the stack file; also CAPSTAN_DATA_DIR).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Enable services of this profile (repeatable; also COMPOSE_PROFILES).
    #[arg(long = "profile", global = true)]
    profiles: Vec<String>,
    #[command(subcommand)]
    command: Cmd,
}

/// `-f FILE` after the subcommand, as compose users type it.
#[derive(clap::Args, Debug, Default)]
pub struct FileOpt {
    /// Stack file (default: capstan.yaml, compose.yaml or docker-compose.yml here).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
}

/// For subcommands where `-f` means follow: the stack file by `--file` only.
#[derive(clap::Args, Debug, Default)]
pub struct LongFileOpt {
    /// Stack file (default: capstan.yaml, compose.yaml or docker-compose.yml here).
    #[arg(long = "file")]
    pub file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the stack (or apply changes to the running one).
    #[command(
        after_help = "Examples:\n  capstan up                 foreground; Ctrl-C stops everything\n  capstan up -d              detach once every service is started or failed\n  capstan up -d --listen 127.0.0.1:0   any free port for the API"
    )]
    Up(up::UpArgs),
    /// Print the plan of what the stack file(s) change, then apply it
    /// (`--dry-run`: the plan only). Several -f files merge as compose's
    /// override files do.
    #[command(
        after_help = "Examples:\n  capstan deploy --dry-run\n  capstan deploy -f compose.yaml -f compose.prod.yaml"
    )]
    Deploy(deploy::DeployArgs),
    /// Stop every service gracefully and exit the daemon.
    Down {
        #[command(flatten)]
        f: FileOpt,
        /// Also remove the stack's named volumes (containers' data).
        #[arg(long, short = 'v')]
        volumes: bool,
    },
    /// Pull the images of container services (all, or those named), with
    /// progress per layer.
    Pull {
        #[command(flatten)]
        f: FileOpt,
        services: Vec<String>,
    },
    /// Build the images of `build:` services (all, or those named), with
    /// the build's output.
    Build {
        #[command(flatten)]
        f: FileOpt,
        services: Vec<String>,
    },
    /// A service's revisions: status (active, superseded, rolled back,
    /// failed), why, and what changed.
    History {
        #[command(flatten)]
        f: FileOpt,
        service: String,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Where rollouts stand: capstan rollout status [SERVICE]
    Rollout {
        #[command(flatten)]
        f: FileOpt,
        #[arg(value_parser = ["status"], default_value = "status")]
        action: String,
        service: Option<String>,
    },
    /// Go back to an earlier revision (by default the one before), all
    /// replicas at once unless `rollback_config` says otherwise.
    Rollback {
        #[command(flatten)]
        f: FileOpt,
        service: String,
        /// The revision to go back to.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Move a canary past its current pause (--full: past every step).
    Promote {
        #[command(flatten)]
        f: FileOpt,
        service: String,
        /// Skip the remaining steps and promote now.
        #[arg(long)]
        full: bool,
    },
    /// Stop a canary and roll back to the stable revision.
    Abort {
        #[command(flatten)]
        f: FileOpt,
        service: String,
    },
    /// List replicas: state, health, restarts, uptime, CPU and memory.
    Ps {
        #[command(flatten)]
        f: FileOpt,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Show replicas' output, merged by time; search it with LogQL (--query, --grep, -C).
    Logs(logs::LogsArgs),
    /// Search traces: capstan traces --service web --min-duration 300ms --errors
    Traces(traces::TracesArgs),
    /// Show one trace as a waterfall (--logs: with the log lines that carry its id).
    Trace(traces::TraceArgs),
    /// Set replica counts: capstan scale web=5 worker=2
    Scale {
        #[command(flatten)]
        f: FileOpt,
        #[arg(required = true, value_name = "SERVICE=N")]
        counts: Vec<String>,
    },
    /// Show what the autoscaler decided and why: capstan autoscale status [SERVICE]
    Autoscale {
        #[command(flatten)]
        f: FileOpt,
        #[arg(value_parser = ["status"], default_value = "status")]
        action: String,
        service: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Restart every replica of services.
    Restart {
        #[command(flatten)]
        f: FileOpt,
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Stop services (they stay stopped until `capstan start`).
    Stop {
        #[command(flatten)]
        f: FileOpt,
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Start stopped services.
    Start {
        #[command(flatten)]
        f: FileOpt,
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Show lifecycle events (started, healthy, exited, restarting, …).
    Events {
        #[command(flatten)]
        f: LongFileOpt,
        #[arg(short = 'f', long = "follow")]
        follow: bool,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Evaluate a PromQL expression against the running daemon's metrics.
    #[command(
        after_help = "Examples:\n  capstan query up\n  capstan query 'sum by (service) (rate(container_cpu_usage_seconds_total[1m]))'\n  capstan query 'up' --range 1h --step 15s\n  capstan query 'up' -o json"
    )]
    Query(query::QueryArgs),
    /// Run Prometheus test scripts (promqltest language) against the PromQL engine.
    Promtest(query::PromtestArgs),
    /// Send HTTP load to a URL and report latency percentiles and status codes.
    #[command(
        after_help = "Examples:\n  capstan load http://127.0.0.1:8080/ -c 50 -d 30s\n  capstan load http://127.0.0.1:8080/work?ms=5 --rate 200 -d 1m -o json\n  capstan load http://127.0.0.1:8080/api -m POST -H 'Content-Type: application/json' --body '{}'"
    )]
    Load(load::LoadArgs),
    /// The stack for a cluster: `capstan export kubernetes`, `capstan export swarm`.
    Export(export::ExportArgs),
    /// Print the normalized stack file (after interpolation and defaults).
    Config {
        #[command(flatten)]
        f: FileOpt,
    },
    /// Validate the stack file (and its rule files); `capstan check rules
    /// FILE…` checks Prometheus rule files as `promtool check rules` does.
    Check {
        #[command(flatten)]
        f: FileOpt,
        /// `rules FILE…`
        args: Vec<String>,
    },
    /// `capstan test rules FILE…`: run `promtool test rules` files.
    Test {
        /// `rules FILE…`
        args: Vec<String>,
    },
    /// Firing and pending alerts: age, labels, summary (--history: every
    /// transition kept).
    Alerts {
        #[command(flatten)]
        f: FileOpt,
        /// Every transition (pending, firing, resolved) since then (`24h`).
        #[arg(long, num_args = 0..=1, default_missing_value = "24h")]
        history: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Rule groups and rules: health, last evaluation, duration, error;
    /// `capstan rules backtest FILE [--since 7d]` evaluates a rule file over
    /// stored history and says when its alerts would have fired.
    Rules {
        #[command(flatten)]
        f: FileOpt,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
        /// `backtest FILE`
        args: Vec<String>,
        /// How far back a backtest starts.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Print the rules `x-capstan.anomaly` generates, as a rule file.
        #[arg(long)]
        generated: bool,
    },
    /// Print the version.
    Version,
    /// Run the daemon in the foreground without progress output (used by `up -d`).
    #[command(hide = true)]
    Daemon(up::DaemonArgs),
    /// Join cgroups and exec a replica's program (internal).
    #[command(name = "__exec", hide = true)]
    Exec {
        #[arg(long = "cgroup")]
        cgroups: Vec<PathBuf>,
        /// Join the cgroups, then wait for the program, its environment and
        /// directory as one JSON line on stdin (a replica started ahead).
        #[arg(long)]
        park: bool,
        /// The umask to run the program with (octal).
        #[arg(long)]
        umask: Option<String>,
        #[arg(last = true)]
        argv: Vec<String>,
    },
}

/// An error with the exit code it maps to: 2 for usage and stack file errors.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Usage {
    pub msg: String,
}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage { msg: msg.into() }.into()
}

/// For a stack with container services: the engine that will run them, or
/// why none can (naming the services and the socket tried).
pub async fn engine_for(stack: &crate::spec::Stack) -> Result<Option<String>, String> {
    let containers: Vec<&str> = stack
        .services
        .iter()
        .filter(|(_, s)| s.driver() == crate::spec::DriverKind::Container)
        .map(|(n, _)| n.as_str())
        .collect();
    if containers.is_empty() {
        return Ok(None);
    }
    crate::supervisor::driver::container::probe_engine()
        .await
        .map(Some)
        .map_err(|e| {
            format!(
                "services {} run as containers, but {e}",
                containers.join(", ")
            )
        })
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    if let Cmd::Exec {
        cgroups,
        park,
        umask,
        argv,
    } = &cli.command
    {
        return crate::supervisor::driver::process::exec_helper(
            cgroups,
            *park,
            umask.as_deref(),
            argv,
        );
    }
    let hosts_daemon = match &cli.command {
        Cmd::Daemon(_) => true,
        Cmd::Up(a) => !a.detach,
        _ => false,
    };
    if !hosts_daemon {
        quiet_on_closed_stdout();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Queries recurse over their expression trees, bounded by the parsers' limits.
        .thread_stack_size(capstan_promql::limits::STACK_BYTES)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    let r = rt.block_on(run(cli));
    // A request still running (a query stuck in its evaluation) must not keep
    // the process alive once the daemon has stopped.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match r {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<Usage>().is_some() || e.downcast_ref::<spec::LoadError>().is_some()
            {
                eprintln!("{e:#}");
                2
            } else {
                eprintln!("error: {e:#}");
                1
            }
        }
    }
}

/// A reader that stops early (`capstan ps | head -1`) closes our stdout; the
/// next write fails and `print!` panics. Like other command-line tools, end
/// quietly with success then. (Not in a process hosting the daemon, which must
/// not stop because a terminal went away.)
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = crate::api::guard::panic_message(info.payload());
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}

pub struct Ctx {
    file: Option<PathBuf>,
    /// Override files merged over `file` (`deploy -f a -f b`).
    overrides: Vec<PathBuf>,
    data_dir: Option<PathBuf>,
    profiles: Vec<String>,
}

impl Ctx {
    fn stack_file(&self) -> Result<PathBuf> {
        let cwd = std::env::current_dir()?;
        spec::find_file(self.file.as_deref(), &cwd).map_err(usage)
    }

    /// Loads and validates the stack; prints warnings; errors exit 2.
    fn load(&self) -> Result<Loaded> {
        let file = self.stack_file()?;
        let mut opts = LoadOptions::from_process();
        opts.profiles.extend(self.profiles.iter().cloned());
        match spec::load_with(&file, &self.overrides, &opts) {
            Ok(l) => {
                for w in &l.warnings {
                    eprintln!("warning: {w}");
                }
                Ok(l)
            }
            Err(e) => {
                for w in &e.warnings {
                    eprintln!("warning: {w}");
                }
                Err(e.into())
            }
        }
    }

    fn data_dir(&self, file: &Path) -> PathBuf {
        client::data_dir(self.data_dir.as_deref(), file)
    }

    /// The client of the running daemon for this stack.
    fn client(&self) -> Result<Client> {
        let (dir, hint) = match (&self.data_dir, self.stack_file()) {
            (Some(d), _) => (d.clone(), self.file.clone()),
            (None, Ok(f)) => (self.data_dir(&f), self.file.clone()),
            (None, Err(e)) => return Err(e),
        };
        Client::find(&dir, hint.as_deref())
    }
}

async fn run(cli: Cli) -> Result<i32> {
    let sub_file = match &cli.command {
        Cmd::Up(a) => a.f.file.clone(),
        Cmd::Daemon(a) => a.f.file.clone(),
        Cmd::Deploy(a) => a.files.first().cloned(),
        Cmd::Export(a) => a.target.files().first().cloned(),
        Cmd::Logs(a) => a.f.file.clone(),
        Cmd::Traces(a) => a.f.file.clone(),
        Cmd::Trace(a) => a.f.file.clone(),
        Cmd::Events { f, .. } => f.file.clone(),
        Cmd::Down { f, .. }
        | Cmd::Pull { f, .. }
        | Cmd::Build { f, .. }
        | Cmd::Ps { f, .. }
        | Cmd::Scale { f, .. }
        | Cmd::History { f, .. }
        | Cmd::Rollout { f, .. }
        | Cmd::Rollback { f, .. }
        | Cmd::Promote { f, .. }
        | Cmd::Abort { f, .. }
        | Cmd::Autoscale { f, .. }
        | Cmd::Restart { f, .. }
        | Cmd::Stop { f, .. }
        | Cmd::Start { f, .. }
        | Cmd::Config { f }
        | Cmd::Alerts { f, .. }
        | Cmd::Rules { f, .. }
        | Cmd::Check { f, .. } => f.file.clone(),
        Cmd::Query(a) => a.f.file.clone(),
        Cmd::Version | Cmd::Exec { .. } | Cmd::Promtest(_) | Cmd::Load(_) | Cmd::Test { .. } => {
            None
        }
    };
    let overrides = match &cli.command {
        Cmd::Deploy(a) => a.files.iter().skip(1).cloned().collect(),
        Cmd::Export(a) => a.target.files().iter().skip(1).cloned().collect(),
        Cmd::Daemon(a) => a.overrides.clone(),
        _ => Vec::new(),
    };
    let ctx = Ctx {
        overrides,
        file: sub_file.or(cli.file),
        data_dir: cli.data_dir,
        profiles: cli.profiles,
    };
    match cli.command {
        Cmd::Up(args) => up::up(&ctx, args).await,
        Cmd::Deploy(args) => deploy::deploy(&ctx, args).await,
        Cmd::Daemon(args) => up::daemon(&ctx, args).await,
        Cmd::Down { volumes, .. } => {
            let c = ctx.client()?;
            let pid = c.info.pid;
            let path = if volumes {
                "/capstan/v1/down?volumes=true"
            } else {
                "/capstan/v1/down"
            };
            let v = c.json(Method::POST, path, None).await?;
            // Wait for the daemon process itself to finish.
            for _ in 0..600 {
                if !Path::new(&format!("/proc/{pid}")).exists()
                    || crate::supervisor::driver::process::proc_stat(pid as i32)
                        .is_some_and(|s| s.state == 'Z')
                {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            println!("{}", v["message"].as_str().unwrap_or("stopped"));
            Ok(0)
        }
        Cmd::Ps { output, .. } => {
            let c = ctx.client()?;
            let v = c.json(Method::GET, "/capstan/v1/ps", None).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v["replicas"])?),
                Output::Table => print!("{}", output::ps_table(&v)),
            }
            Ok(0)
        }
        Cmd::Logs(args) => logs::logs(&ctx, args).await,
        Cmd::Traces(args) => traces::traces(&ctx, args).await,
        Cmd::Trace(args) => traces::trace(&ctx, args).await,
        Cmd::Query(args) => query::query(&ctx, args).await,
        Cmd::Promtest(args) => query::promtest(args),
        Cmd::Load(args) => load::load(args).await,
        Cmd::Scale { counts, .. } => {
            let mut body = serde_json::Map::new();
            for c in &counts {
                let parsed = c
                    .split_once('=')
                    .and_then(|(s, n)| Some((s.to_owned(), n.parse::<u32>().ok()?)));
                let Some((s, n)) = parsed else {
                    return Err(usage(format!("expected SERVICE=N, found {c:?}")));
                };
                body.insert(s, n.into());
            }
            let v = ctx
                .client()?
                .json(Method::POST, "/capstan/v1/scale", Some(body.into()))
                .await?;
            println!("{}", v["message"].as_str().unwrap_or("done"));
            Ok(0)
        }
        Cmd::History {
            service, output, ..
        } => {
            let v = ctx
                .client()?
                .json(Method::GET, &format!("/capstan/v1/history/{service}"), None)
                .await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            print!("{}", output::history_table(&v, crate::events::now_ms()));
            Ok(0)
        }
        Cmd::Rollout { service, .. } => {
            let v = ctx
                .client()?
                .json(Method::GET, "/capstan/v1/ps", None)
                .await?;
            let text = output::rollout_status(&v, service.as_deref(), crate::events::now_ms());
            if text.is_empty() {
                return Err(usage(format!(
                    "no such service: {}",
                    service.unwrap_or_default()
                )));
            }
            print!("{text}");
            Ok(0)
        }
        Cmd::Rollback { service, to, .. } => {
            let body = serde_json::json!({"service": service, "to": to});
            let v = ctx
                .client()?
                .json(Method::POST, "/capstan/v1/rollback", Some(body))
                .await?;
            println!("{}", v["message"].as_str().unwrap_or("done"));
            Ok(0)
        }
        Cmd::Promote { service, full, .. } => {
            let body = serde_json::json!({"service": service, "full": full});
            let v = ctx
                .client()?
                .json(Method::POST, "/capstan/v1/promote", Some(body))
                .await?;
            println!("{}", v["message"].as_str().unwrap_or("done"));
            Ok(0)
        }
        Cmd::Abort { service, .. } => {
            let body = serde_json::json!({"service": service});
            let v = ctx
                .client()?
                .json(Method::POST, "/capstan/v1/abort", Some(body))
                .await?;
            println!("{}", v["message"].as_str().unwrap_or("done"));
            Ok(0)
        }
        Cmd::Autoscale {
            service, output, ..
        } => {
            let v = ctx
                .client()?
                .json(Method::GET, "/capstan/v1/autoscale", None)
                .await?;
            let mut list: Vec<serde_json::Value> =
                v["services"].as_array().cloned().unwrap_or_default();
            if let Some(s) = &service {
                list.retain(|x| x["service"] == s.as_str());
                if list.is_empty() {
                    eprintln!("capstan: {s} does not autoscale (no x-capstan.autoscale)");
                    return Ok(1);
                }
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Table => print!("{}", output::autoscale_table(&list)),
            }
            Ok(0)
        }
        Cmd::Restart { services, .. } => service_action(&ctx, "restart", services).await,
        Cmd::Stop { services, .. } => service_action(&ctx, "stop", services).await,
        Cmd::Start { services, .. } => service_action(&ctx, "start", services).await,
        Cmd::Events { follow, output, .. } => {
            let c = ctx.client()?;
            let color = output::use_color();
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            c.stream(&format!("/capstan/v1/events?follow={follow}"), |v| {
                let line = match output {
                    Output::Json => v.to_string(),
                    Output::Table => output::event_line(&v, color),
                };
                // Stop quietly when the reader goes away (e.g. `| head`).
                writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
            })
            .await?;
            Ok(0)
        }
        Cmd::Export(args) => {
            let loaded = ctx.load()?;
            export::run(&loaded.stack, &args.target).await
        }
        Cmd::Config { .. } => {
            let l = ctx.load()?;
            print!("{}", spec::to_yaml(&l.stack));
            Ok(0)
        }
        Cmd::Pull { services, .. } => {
            let l = ctx.load()?;
            if let Err(why) = engine_for(&l.stack).await {
                eprintln!("{}: {why}", l.file.display());
                return Ok(1);
            }
            images::pull_images(&l.stack, &services, true).await?;
            Ok(0)
        }
        Cmd::Build { services, .. } => {
            let mut l = ctx.load()?;
            if let Err(why) = engine_for(&l.stack).await {
                eprintln!("{}: {why}", l.file.display());
                return Ok(1);
            }
            let id = crate::daemon::stack_id(&l.stack, &l.file);
            images::build_images(&mut l.stack, &id, &services).await?;
            Ok(0)
        }
        Cmd::Check { args, .. } if !args.is_empty() => {
            if args[0] != "rules" || args.len() < 2 {
                return Err(usage("usage: capstan check [rules FILE…]"));
            }
            let mut failed = false;
            for f in &args[1..] {
                println!("Checking {f}");
                match crate::alerting::file::load(std::path::Path::new(f)) {
                    Ok(groups) => {
                        let n: usize = groups.iter().map(|g| g.rules.len()).sum();
                        println!("  SUCCESS: {n} rules found");
                    }
                    Err(problems) => {
                        failed = true;
                        println!("  FAILED:");
                        for p in problems {
                            eprintln!("{p}");
                        }
                    }
                }
                println!();
            }
            Ok(i32::from(failed))
        }
        Cmd::Test { args } => {
            if args.first().map(String::as_str) != Some("rules") || args.len() < 2 {
                return Err(usage("usage: capstan test rules FILE…"));
            }
            let mut failed = false;
            for f in &args[1..] {
                println!("Unit Testing:  {f}");
                match crate::alerting::unittest::run_file(std::path::Path::new(f)) {
                    Ok(o) if o.failures.is_empty() => println!("  SUCCESS"),
                    Ok(o) => {
                        failed = true;
                        println!("  FAILED:");
                        for x in o.failures {
                            println!("{x}");
                        }
                    }
                    Err(e) => {
                        failed = true;
                        println!("  FAILED:");
                        println!("    {e}");
                    }
                }
                println!();
            }
            Ok(i32::from(failed))
        }
        Cmd::Alerts {
            output,
            history: Some(since),
            ..
        } => {
            let since_ns = logs::parse_since(&since)?;
            let q = crate::scrape::encode("{service=\"capstan\", stream=\"alerts\"}");
            let v = ctx
                .client()?
                .json(
                    Method::GET,
                    &format!("/capstan/v1/logs/search?query={q}&limit=5000&since_ns={since_ns}"),
                    None,
                )
                .await?;
            let lines: Vec<serde_json::Value> = v["lines"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| serde_json::from_str(l["line"].as_str()?).ok())
                .collect();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
                return Ok(0);
            }
            print!("{}", output::alert_history(&lines));
            Ok(0)
        }
        Cmd::Alerts { output, .. } => {
            show_data(&ctx, "/api/v1/alerts", output, output::alerts_table).await
        }
        Cmd::Rules {
            generated: true, ..
        } => {
            let l = ctx.load()?;
            let groups: Vec<_> = l
                .stack
                .settings
                .anomaly
                .iter()
                .map(crate::alerting::anomaly::group)
                .collect();
            if groups.is_empty() {
                println!("# no x-capstan.anomaly rules in {}", l.file.display());
                return Ok(0);
            }
            print!("{}", crate::alerting::anomaly::to_yaml(&groups));
            Ok(0)
        }
        Cmd::Rules {
            output,
            args,
            since,
            ..
        } if !args.is_empty() => {
            if args[0] != "backtest" || args.len() != 2 {
                return Err(usage("usage: capstan rules backtest FILE [--since 7d]"));
            }
            let path = std::path::Path::new(&args[1]);
            if let Err(problems) = crate::alerting::file::load(path) {
                for p in problems {
                    eprintln!("{p}");
                }
                return Ok(2);
            }
            let text = std::fs::read_to_string(path)?;
            let from_ms = logs::parse_since(&since)? / 1_000_000;
            let interval_ms = ctx
                .load()
                .ok()
                .map(|l| l.stack.settings.evaluation_interval.0.as_millis() as u64);
            let body = serde_json::json!({
                "text": text,
                "name": path.display().to_string(),
                "from_ms": from_ms,
                "interval_ms": interval_ms,
            });
            let v = ctx
                .client()?
                .json(Method::POST, "/capstan/v1/rules/backtest", Some(body))
                .await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let report: crate::alerting::backtest::Report = serde_json::from_value(v)?;
            print!("{}", crate::alerting::backtest::render(&report));
            Ok(0)
        }
        Cmd::Rules { output, .. } => {
            show_data(&ctx, "/api/v1/rules", output, output::rules_table).await
        }
        Cmd::Check { .. } => {
            let l = ctx.load()?;
            let engine = match engine_for(&l.stack).await {
                Ok(e) => e,
                Err(why) => {
                    eprintln!("{}: {why}", l.file.display());
                    return Ok(1);
                }
            };
            println!(
                "{}: ok ({} services{})",
                l.file.display(),
                l.stack.services.len(),
                engine
                    .map(|e| format!("; containers on {e}"))
                    .unwrap_or_default()
            );
            Ok(0)
        }
        Cmd::Version => {
            println!("capstan {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Cmd::Exec { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// A Prometheus-shaped API answer's `data`: as JSON, or rendered for people.
async fn show_data(
    ctx: &Ctx,
    path: &str,
    output: Output,
    render: fn(&serde_json::Value, i64) -> String,
) -> Result<i32> {
    let v = ctx.client()?.json(Method::GET, path, None).await?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v["data"])?);
    } else {
        print!("{}", render(&v["data"], crate::events::now_ms()));
    }
    Ok(0)
}

async fn service_action(ctx: &Ctx, action: &str, services: Vec<String>) -> Result<i32> {
    let v = ctx
        .client()?
        .json(
            Method::POST,
            &format!("/capstan/v1/services/{action}"),
            Some(serde_json::json!({ "services": services })),
        )
        .await?;
    println!("{}", v["message"].as_str().unwrap_or("done"));
    Ok(0)
}
