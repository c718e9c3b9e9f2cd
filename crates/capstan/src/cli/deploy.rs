//! `capstan deploy`: the plan of what applying the stack file(s) changes,
//! service by service — created, updated (how it rolls, and what changed),
//! scaled, removed, unchanged — then the change itself (`--dry-run`: only
//! the plan). Several `-f` files merge as compose merges override files.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use hyper::Method;

use super::Ctx;
use crate::client::Client;
use crate::spec::{Service, Stack};

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// Stack file, then override files merged over it in order.
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Print the plan only.
    #[arg(long)]
    pub dry_run: bool,
    /// Address of the API and dashboard, if the daemon is not running yet.
    #[arg(long, default_value = "127.0.0.1:9700")]
    pub listen: SocketAddr,
    /// Longest wait for the change to settle.
    #[arg(long, default_value = "300s", value_parser = super::up::parse_dur)]
    pub wait_timeout: Duration,
}

/// One service's line of the plan.
#[derive(Debug, PartialEq)]
pub struct Change {
    pub mark: char,
    pub service: String,
    pub what: String,
    pub details: Vec<String>,
}

fn replicas(svc: &Service) -> String {
    match svc.deploy.replicas {
        1 => "1 replica".into(),
        n => format!("{n} replicas"),
    }
}

/// What applying `next` to a daemon running `now` (none: not running) does.
pub fn plan(now: Option<&Stack>, next: &Stack) -> Vec<Change> {
    let mut out = Vec::new();
    let change = |mark, service: &str, what: String, details| Change {
        mark,
        service: service.to_owned(),
        what,
        details,
    };
    for (name, svc) in &next.services {
        let Some(old) = now.and_then(|s| s.services.get(name)) else {
            out.push(change(
                '+',
                name,
                format!("create ({})", replicas(svc)),
                Vec::new(),
            ));
            continue;
        };
        if !old.definition_eq(svc) {
            let cfg = &svc.deploy.update_config;
            let how = match &svc.x.rollout {
                Some(c) => format!("update: {}", crate::supervisor::canary::describe(c)),
                None => format!(
                    "update: rolling {}, monitor {}, on failure {:?}",
                    crate::supervisor::rollout::describe(svc, cfg),
                    cfg.monitor,
                    cfg.failure_action
                )
                .to_lowercase(),
            };
            out.push(change(
                '~',
                name,
                how,
                crate::state::history::diff(old, svc),
            ));
        } else if old.deploy.replicas != svc.deploy.replicas && svc.x.autoscale.is_none() {
            out.push(change(
                '±',
                name,
                format!("scale {} -> {}", old.deploy.replicas, svc.deploy.replicas),
                Vec::new(),
            ));
        } else if old != svc {
            out.push(change(
                '~',
                name,
                "update settings (no restart)".into(),
                crate::state::history::diff(old, svc),
            ));
        } else {
            out.push(change('=', name, "unchanged".into(), Vec::new()));
        }
    }
    if let Some(now) = now {
        for name in now
            .services
            .keys()
            .filter(|n| !next.services.contains_key(*n))
        {
            out.push(change('-', name, "remove".into(), Vec::new()));
        }
    }
    out
}

pub fn render(stack: &str, changes: &[Change]) -> String {
    let width = changes.iter().map(|c| c.service.len()).max().unwrap_or(0);
    let mut out = format!("plan for stack {stack}:\n");
    for c in changes {
        out.push_str(&format!("  {} {:<width$}  {}\n", c.mark, c.service, c.what));
        for d in &c.details {
            out.push_str(&format!("    {:<width$}    {d}\n", ""));
        }
    }
    out
}

pub async fn deploy(ctx: &Ctx, args: DeployArgs) -> Result<i32> {
    // An invalid file stops here: nothing changes.
    let loaded = ctx.load()?;
    let data_dir = ctx.data_dir(&loaded.file);
    let running = match Client::find(&data_dir, None) {
        Ok(c) => match c.json(Method::GET, "/capstan/v1/stack", None).await {
            Ok(v) => serde_json::from_value::<Stack>(v).ok(),
            Err(_) => None,
        },
        Err(_) => None,
    };
    print!(
        "{}",
        render(&loaded.stack.name, &plan(running.as_ref(), &loaded.stack))
    );
    if running.is_none() {
        println!("(no daemon runs for this stack: it starts)");
    }
    if args.dry_run {
        return Ok(0);
    }
    super::up::up_loaded(
        ctx,
        super::up::UpArgs {
            f: super::FileOpt { file: None },
            detach: true,
            listen: args.listen,
            wait_timeout: args.wait_timeout,
            planned: true,
        },
        loaded,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(yaml: &str) -> Stack {
        crate::spec::parse_text(
            yaml,
            "capstan.yaml",
            std::path::Path::new("/srv"),
            "app",
            Default::default(),
            &Default::default(),
        )
        .unwrap()
        .0
    }

    #[test]
    fn the_plan_says_what_happens_to_each_service() {
        let now = stack(
            "services:\n  web: {command: [a], environment: {V: '1'}, deploy: {replicas: 2}}\n  worker: {command: [w]}\n  old: {command: [o]}\n  same: {command: [s]}\n",
        );
        let next = stack(
            "services:\n  web: {command: [a], environment: {V: '2'}, ports: ['8080:8080'], deploy: {replicas: 2}}\n  worker: {command: [w], deploy: {replicas: 4}}\n  db: {command: [d]}\n  same: {command: [s]}\n",
        );
        insta::assert_snapshot!(render("app", &plan(Some(&now), &next)), @r#"
        plan for stack app:
          + db      create (1 replica)
          = same    unchanged
          ~ web     update: rolling 1 at a time, start-first, monitor 10s, on failure rollback
                      environment.V: "1" -> "2"
                      ports: added [{"protocol":"tcp","published":8080,"target":"8080"}]
          ± worker  scale 1 -> 4
          - old     remove
        "#);
    }
}
