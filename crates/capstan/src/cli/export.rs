//! `capstan export kubernetes`: the stack as manifests for a cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::export::{Export, kubernetes};

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub target: Target,
}

#[derive(Debug, Subcommand)]
pub enum Target {
    /// Kubernetes manifests: Deployments, Services, Ingresses, HPAs (autoscaling/v2),
    /// ConfigMaps, Secrets and PersistentVolumeClaims.
    #[command(
        after_help = "Examples:\n  capstan export kubernetes                    every manifest on stdout\n  capstan export kubernetes -o k8s/ --namespace shop\n  capstan export kubernetes --strict           fail if any setting has no equivalent\n\nEvery setting with no Kubernetes equivalent is listed on stderr with its key path and why."
    )]
    Kubernetes(KubernetesArgs),
    /// A compose file for `docker stack deploy`: replicas, resources, restart policy,
    /// update_config and rollback_config, health checks, published ports (routing
    /// mesh), overlay networks, volumes, secrets and configs.
    #[command(
        after_help = "Examples:\n  capstan export swarm -o stack.yml && docker stack deploy -c stack.yml shop\n  capstan export swarm --strict\n\nEvery setting with no Swarm equivalent is listed on stderr with its key path and why."
    )]
    Swarm(SwarmArgs),
}

#[derive(Debug, Args)]
pub struct SwarmArgs {
    /// Stack file, then override files merged over it in order.
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Write the compose file here instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Settings with no equivalent are an error (exit 1, nothing written).
    #[arg(long)]
    pub strict: bool,
    /// How published ports are published: through the routing mesh, or on the
    /// task's node only.
    #[arg(long, value_enum, default_value = "ingress")]
    pub publish_mode: crate::export::swarm::PublishMode,
    /// Build the `build:` services and push their images to this registry
    /// (`registry.example:5000` or `registry.example/team`), which the file then names.
    #[arg(long, value_name = "REGISTRY")]
    pub push: Option<String>,
}

/// Builds the `build:` services and pushes them to `registry` as
/// `REGISTRY/STACK-SERVICE:TAG` (the tag from the built image's id), and
/// names those images in the stack.
async fn push_built(stack: &mut crate::spec::Stack, registry: &str) -> Result<()> {
    use crate::supervisor::driver::container;
    let names: Vec<String> = stack
        .services
        .iter()
        .filter(|(_, s)| s.build.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    if names.is_empty() {
        eprintln!("nothing to push: no service has build:");
        return Ok(());
    }
    let id = stack.name.clone();
    super::images::build_images(stack, &id, &names).await?;
    let docker = container::connect().await.map_err(anyhow::Error::msg)?;
    for name in names {
        let Some(svc) = stack.services.get_mut(&name) else {
            continue;
        };
        let built = svc.built.clone().unwrap_or_default();
        let tag: String = built
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect();
        let tag = if tag.is_empty() {
            "latest".to_owned()
        } else {
            tag
        };
        let target = format!(
            "{}/{}-{name}:{tag}",
            registry.trim_end_matches('/'),
            stack.name
        );
        let (repo, t) = crate::supervisor::driver::registry::split_reference(&target);
        let local = format!("{}:latest", container::build_repo(&id, &name));
        docker
            .tag_image(
                &local,
                Some(bollard::query_parameters::TagImageOptions {
                    repo: Some(repo),
                    tag: Some(t),
                }),
            )
            .await
            .map_err(|e| anyhow::anyhow!("tagging {local} as {target}: {e}"))?;
        eprintln!("{name}: pushing {target}");
        container::push(&docker, &target, |_| {})
            .await
            .map_err(anyhow::Error::msg)?;
        eprintln!("{name}: pushed {target}");
        svc.image = Some(target);
        svc.build = None;
    }
    Ok(())
}

impl Target {
    /// The stack file, then the override files.
    pub fn files(&self) -> &[PathBuf] {
        match self {
            Target::Kubernetes(a) => &a.files,
            Target::Swarm(a) => &a.files,
        }
    }
}

#[derive(Debug, Args)]
pub struct KubernetesArgs {
    /// Stack file, then override files merged over it in order.
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Write one file per object into this directory instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// The namespace every object is in.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Settings with no equivalent are an error (exit 1, nothing written).
    #[arg(long)]
    pub strict: bool,
    /// Also a PodMonitor per scraped service and a PrometheusRule per rule file.
    #[arg(long)]
    pub prometheus_operator: bool,
    /// Also an Argo Rollouts Rollout and AnalysisTemplate per canary service.
    #[arg(long)]
    pub argo_rollouts: bool,
}

/// Lists what did not map; under `--strict` that fails the export.
fn report(e: &Export, strict: bool) -> Result<()> {
    for u in &e.unmapped {
        eprintln!("not mapped: {}: {}", u.path, u.why);
    }
    if strict && !e.unmapped.is_empty() {
        anyhow::bail!(
            "{} setting(s) have no equivalent (listed above); nothing was written (--strict)",
            e.unmapped.len()
        );
    }
    Ok(())
}

/// Writes the objects: one file each in `dir`, or all on stdout.
fn write(e: &Export, dir: Option<&PathBuf>) -> Result<()> {
    match dir {
        None => print!("{}", e.to_yaml()),
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            for (name, o) in &e.objects {
                let path = d.join(format!("{name}.yaml"));
                std::fs::write(&path, crate::export::yaml(o))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            eprintln!("wrote {} manifests to {}", e.objects.len(), d.display());
        }
    }
    Ok(())
}

pub async fn run(stack: &crate::spec::Stack, target: &Target) -> Result<i32> {
    match target {
        Target::Kubernetes(a) => {
            let e = kubernetes::export(
                stack,
                &kubernetes::Options {
                    namespace: a.namespace.clone(),
                    prometheus_operator: a.prometheus_operator,
                    argo_rollouts: a.argo_rollouts,
                },
            );
            report(&e, a.strict)?;
            write(&e, a.output.as_ref())?;
        }
        Target::Swarm(a) => {
            let mut stack = stack.clone();
            if let Some(registry) = &a.push {
                push_built(&mut stack, registry).await?;
            }
            let e = crate::export::swarm::export(&stack, a.publish_mode);
            report(&e, a.strict)?;
            let text = crate::export::yaml(&e.objects[0].1);
            match &a.output {
                None => print!("{text}"),
                Some(p) => {
                    std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
                    eprintln!("wrote {}", p.display());
                }
            }
        }
    }
    Ok(0)
}
