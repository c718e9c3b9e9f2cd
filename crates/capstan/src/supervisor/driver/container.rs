//! The container driver: runs a replica as a container through the Docker
//! Engine API (bollard, over the Unix socket; `DOCKER_HOST` honoured, the API
//! version negotiated, so Docker 20.10 and Podman's compatible socket work).
//!
//! Each replica is one container, named and labelled after its stack,
//! service, revision and index, on a bridge network of the stack where other
//! services reach it by its service name. capstan supervises it as it does a
//! process: the engine's restart policy stays off, the exit comes from the
//! engine's wait, output from its log stream, CPU and memory from its stats,
//! `CMD` health checks run through exec. The replica's address is its IP on
//! the stack network and the service's container port.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecOptions};
use bollard::models::{
    ContainerCreateBody, DeviceMapping, EndpointIpamConfig, EndpointSettings, HostConfig, Mount,
    MountType, NetworkConnectRequest, NetworkCreateRequest, NetworkingConfig, ResourcesUlimits,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StatsOptions, StopContainerOptions, WaitContainerOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::{
    BoxFuture, Driver, Exit, Launch, Output, Prober, Record, Replica, dockerignore, registry,
};
use crate::events::EventLog;
use crate::logs::Stream;
use crate::spec::{
    ContainerOpts, Dur, FileSource, HealthTest, Healthcheck, NetworkAttach, Service, VolumeKind,
};
use crate::state::Sample;

/// Labels every container of capstan carries.
pub const LABEL_STACK: &str = "dev.capstan.stack";
pub const LABEL_SERVICE: &str = "dev.capstan.service";
pub const LABEL_REVISION: &str = "dev.capstan.revision";
pub const LABEL_REPLICA: &str = "dev.capstan.replica";
pub const LABEL_DEFINITION: &str = "dev.capstan.definition";
pub const LABEL_PORT: &str = "dev.capstan.port";

/// Largest build context sent to the engine (it is held in memory to send).
pub const MAX_BUILD_CONTEXT: u64 = 512 << 20;

/// The files of a build context to send: all but what `.dockerignore`
/// leaves out (the Dockerfile and `.dockerignore` itself always go, as the
/// Docker CLI sends them), as (path relative to the context, is a directory).
fn context_files(
    dir: &std::path::Path,
    dockerfile: &str,
) -> std::io::Result<Vec<(String, std::fs::Metadata)>> {
    let ignore = match std::fs::read_to_string(dir.join(".dockerignore")) {
        Ok(text) => dockerignore::Ignore::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => dockerignore::Ignore::default(),
        Err(e) => return Err(e),
    };
    let always = [dockerfile.trim_start_matches("./"), ".dockerignore"];
    let mut out = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(&rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(e.path())?;
            let excluded = ignore.excludes(&path) && !always.contains(&path.as_str());
            if meta.is_dir() {
                if !excluded {
                    out.push((path.clone(), meta));
                    todo.push(path);
                } else if ignore.may_include_under(&path) {
                    todo.push(path);
                }
            } else if !excluded {
                out.push((path, meta));
            }
        }
    }
    Ok(out)
}

/// The build context as a tar archive, refused (before it is read) when the
/// files it would send add up to more than `max` bytes.
fn context_tar(dir: &std::path::Path, dockerfile: &str, max: u64) -> Result<Vec<u8>, String> {
    let files = context_files(dir, dockerfile).map_err(|e| e.to_string())?;
    let total: u64 = files
        .iter()
        .filter(|(_, m)| m.is_file())
        .map(|(_, m)| m.len())
        .sum();
    if total > max {
        return Err(format!(
            "{total} bytes of files, more than the {max}-byte limit on a build context (leave files out with .dockerignore)"
        ));
    }
    let mut t = tar::Builder::new(Vec::new());
    t.follow_symlinks(false);
    for (path, meta) in files {
        let full = dir.join(&path);
        if meta.is_dir() {
            t.append_dir(&path, &full)
        } else {
            t.append_path_with_name(&full, &path)
        }
        .map_err(|e| format!("{path}: {e}"))?;
    }
    t.into_inner().map_err(|e| e.to_string())
}

/// The compose keys handed to the engine as they are.
fn passthrough(c: &ContainerOpts) -> HostConfig {
    let list = |v: &Vec<String>| Some(v.clone()).filter(|v| !v.is_empty());
    HostConfig {
        ulimits: Some(
            c.ulimits
                .iter()
                .map(|(name, (soft, hard))| ResourcesUlimits {
                    name: Some(name.clone()),
                    soft: Some(*soft),
                    hard: Some(*hard),
                })
                .collect::<Vec<_>>(),
        )
        .filter(|u| !u.is_empty()),
        tmpfs: Some(
            c.tmpfs
                .iter()
                .map(|t| match t.split_once(':') {
                    Some((path, opts)) => (path.to_owned(), opts.to_owned()),
                    None => (t.clone(), String::new()),
                })
                .collect::<HashMap<_, _>>(),
        )
        .filter(|t| !t.is_empty()),
        privileged: Some(c.privileged).filter(|p| *p),
        shm_size: c.shm_size.map(|s| s as i64),
        security_opt: list(&c.security_opt),
        sysctls: Some(c.sysctls.clone().into_iter().collect::<HashMap<_, _>>())
            .filter(|s| !s.is_empty()),
        dns: list(&c.dns),
        dns_search: list(&c.dns_search),
        group_add: list(&c.group_add),
        devices: Some(
            c.devices
                .iter()
                .map(|d| {
                    let mut parts = d.splitn(3, ':');
                    let host = parts.next().unwrap_or_default().to_owned();
                    DeviceMapping {
                        path_in_container: Some(parts.next().unwrap_or(&host).to_owned()),
                        cgroup_permissions: Some(parts.next().unwrap_or("rwm").to_owned()),
                        path_on_host: Some(host),
                    }
                })
                .collect::<Vec<_>>(),
        )
        .filter(|d| !d.is_empty()),
        memory_reservation: c.mem_reservation.map(|m| m as i64),
        cpu_shares: c.cpu_shares.map(|s| s as i64),
        ..Default::default()
    }
}

/// Secrets and configs from host files: bind-mounted read-only, as compose
/// does without Swarm.
fn file_binds(svc: &Service) -> Vec<Mount> {
    svc.container
        .files
        .iter()
        .filter_map(|f| match &f.source {
            FileSource::File(path) => Some(Mount {
                target: Some(f.target.clone()),
                source: Some(path.clone()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            }),
            FileSource::Content(_) => None,
        })
        .collect()
}

/// Secrets and configs given as content: written into the created
/// container (before it starts) with their mode and owner.
async fn write_files(docker: &Docker, id: &str, svc: &Service) -> Result<(), String> {
    let mut t = tar::Builder::new(Vec::new());
    let mut any = false;
    for f in &svc.container.files {
        let FileSource::Content(text) = &f.source else {
            continue;
        };
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(f.mode.unwrap_or(0o444));
        h.set_uid(f.uid.unwrap_or(0).into());
        h.set_gid(f.gid.unwrap_or(0).into());
        h.set_entry_type(tar::EntryType::Regular);
        t.append_data(&mut h, f.target.trim_start_matches('/'), text.as_bytes())
            .map_err(|e| format!("{} {}: {e}", f.kind, f.name))?;
        any = true;
    }
    if !any {
        return Ok(());
    }
    let tar = t.into_inner().map_err(|e| e.to_string())?;
    docker
        .upload_to_container(
            id,
            Some(bollard::query_parameters::UploadToContainerOptions {
                path: "/".into(),
                ..Default::default()
            }),
            bollard::body_full(tar.into()),
        )
        .await
        .map_err(|e| format!("writing secrets and configs: {}", engine_error(e)))
}

/// The repository a service's built images are tagged in.
pub fn build_repo(stack_id: &str, service: &str) -> String {
    docker_name(&format!("capstan-{stack_id}-{service}")).to_lowercase()
}

/// Gives an image one more name.
async fn tag_image(docker: &Docker, image: &str, name: &str) -> Result<(), String> {
    let (repo, tag) = registry::split_reference(name);
    docker
        .tag_image(
            image,
            Some(bollard::query_parameters::TagImageOptions {
                repo: Some(repo),
                tag: Some(tag),
            }),
        )
        .await
        .map_err(|e| format!("tagging {image} as {name}: {}", engine_error(e)))
}

/// Builds `b` through the engine's build API and names the result with
/// every tag, handing `line` each line of the build's output as it comes.
/// Returns the image's id.
pub async fn build_image(
    docker: &Docker,
    b: &crate::spec::Build,
    tags: &[String],
    mut line: impl FnMut(&str),
) -> Result<String, String> {
    let first = tags.first().ok_or("a build needs a tag")?.clone();
    let context = std::path::PathBuf::from(&b.context);
    let dockerfile = b.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into());
    let df = dockerfile.clone();
    let tar = tokio::task::spawn_blocking(move || context_tar(&context, &df, MAX_BUILD_CONTEXT))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("build context {}: {e}", b.context))?;
    let opts = bollard::query_parameters::BuildImageOptions {
        dockerfile,
        t: Some(first.clone()),
        rm: true,
        buildargs: Some(b.args.clone().into_iter().collect()),
        labels: Some(b.labels.clone().into_iter().collect()),
        target: b.target.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut out = docker.build_image(opts, None, Some(bollard::body_full(tar.into())));
    while let Some(step) = out.next().await {
        let info = step.map_err(|e| format!("building {first}: {}", engine_error(e)))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(format!("building {first}: {err}"));
        }
        for l in info.stream.as_deref().unwrap_or_default().lines() {
            let l = l.trim_end();
            if !l.is_empty() {
                line(l);
            }
        }
    }
    let id = docker
        .inspect_image(&first)
        .await
        .map_err(|e| format!("the image built as {first}: {}", engine_error(e)))?
        .id
        .ok_or_else(|| format!("the engine gave no id for {first}"))?;
    for t in &tags[1..] {
        tag_image(docker, &id, t).await?;
    }
    Ok(id)
}

/// One report of a pull, as the engine sends them (per layer: its id, a
/// status, bytes done and total).
pub type PullStep = bollard::models::CreateImageInfo;

/// Pulls an image with the Docker CLI's credentials for its registry,
/// handing `step` every progress report. A failure names the image and the
/// registry.
pub async fn pull(
    docker: &Docker,
    image: &str,
    mut step: impl FnMut(&PullStep),
) -> Result<(), String> {
    let registry = registry::registry_of(image);
    let fail = |e: String| format!("cannot pull image {image} from registry {registry}: {e}");
    let creds = registry::credentials(image)
        .await
        .map_err(|e| fail(format!("reading credentials: {e}")))?;
    let (name, tag) = registry::split_reference(image);
    let opts = CreateImageOptions {
        from_image: Some(name),
        tag: Some(tag),
        ..Default::default()
    };
    let mut steps = docker.create_image(Some(opts), None, creds);
    while let Some(s) = steps.next().await {
        let info = s.map_err(|e| fail(engine_error(e)))?;
        if let Some(err) = info.error_detail.as_ref().and_then(|d| d.message.clone()) {
            return Err(fail(err));
        }
        step(&info);
    }
    Ok(())
}

/// Pushes an image to its registry with the Docker CLI's credentials for it;
/// `line` gets each status line. A failure names the image and the registry.
pub async fn push(docker: &Docker, image: &str, mut line: impl FnMut(&str)) -> Result<(), String> {
    let registry = registry::registry_of(image);
    let fail = |e: String| format!("cannot push image {image} to registry {registry}: {e}");
    let creds = registry::credentials(image)
        .await
        .map_err(|e| fail(format!("reading credentials: {e}")))?;
    let (name, tag) = registry::split_reference(image);
    let opts = bollard::query_parameters::PushImageOptions {
        tag: Some(tag),
        platform: None,
    };
    let mut steps = docker.push_image(&name, Some(opts), creds);
    while let Some(s) = steps.next().await {
        let info = s.map_err(|e| fail(engine_error(e)))?;
        if let Some(err) = info.error_detail.as_ref().and_then(|d| d.message.clone()) {
            return Err(fail(err));
        }
        if let Some(st) = &info.status {
            line(st);
        }
    }
    Ok(())
}

/// The port a container listens on when its service names none.
pub const DEFAULT_PORT: u16 = 8080;

/// Something made once on first use (a network), or why it could not be.
type Made = OnceCell<Result<(), String>>;

/// An image being built (or built): its tag, or why the build failed.
type Built = OnceCell<Result<String, String>>;

/// Runs replicas as containers of one stack.
pub struct ContainerDriver {
    stack_id: String,
    events: Arc<EventLog>,
    docker: OnceCell<Result<Docker, String>>,
    /// Networks made sure of, by their engine name.
    networks: Mutex<HashMap<String, Arc<Made>>>,
    /// Images built per service and revision: one build however many
    /// replicas start at once.
    builds: Mutex<HashMap<(String, u64), Arc<Built>>>,
}

/// A name Docker accepts (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
fn docker_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Where the engine is looked for, for messages.
fn socket_named() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// Connects to the engine (`DOCKER_HOST` or the local socket) and
/// negotiates the API version; the error names the socket tried.
pub async fn connect() -> Result<Docker, String> {
    let unreachable = |e: String| {
        format!(
            "no container engine at {} ({e}): start Docker (or Podman's socket), or set DOCKER_HOST",
            socket_named()
        )
    };
    let docker = Docker::connect_with_local_defaults().map_err(|e| unreachable(e.to_string()))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    docker
        .ping()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    Ok(docker)
}

/// Whether a container engine answers: its name and version, or why not
/// (naming the socket tried).
pub async fn probe_engine() -> Result<String, String> {
    let docker = connect().await?;
    let v = docker.version().await.map_err(|e| {
        format!(
            "no container engine at {} ({e}): start Docker (or Podman's socket), or set DOCKER_HOST",
            socket_named()
        )
    })?;
    Ok(format!(
        "engine {} (API {}) at {}",
        v.version.unwrap_or_default(),
        v.api_version.unwrap_or_default(),
        socket_named()
    ))
}

/// The port the service's containers listen on: the first published port's
/// target, else the first `expose`, else its `PORT`, else 8080.
pub fn container_port(svc: &Service) -> u16 {
    svc.ports
        .iter()
        .filter(|p| p.protocol != "udp")
        .find_map(|p| p.target.as_deref()?.parse().ok())
        .or_else(|| {
            svc.expose
                .iter()
                .find_map(|e| e.split('/').next()?.trim().parse().ok())
        })
        .or_else(|| svc.environment.get("PORT")?.parse().ok())
        .unwrap_or(DEFAULT_PORT)
}

fn engine_error(e: DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{message} (engine answered {status_code})"),
        other => other.to_string(),
    }
}

fn not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl ContainerDriver {
    pub fn new(stack_id: &str, events: Arc<EventLog>) -> ContainerDriver {
        ContainerDriver {
            stack_id: stack_id.to_owned(),
            events,
            docker: OnceCell::new(),
            networks: Mutex::default(),
            builds: Mutex::default(),
        }
    }

    /// The engine, connected on first use (a stack without containers never
    /// needs one).
    async fn docker(&self) -> Result<Docker, String> {
        self.docker.get_or_init(connect).await.clone()
    }

    /// The engine's name of a network of the stack: `capstan-<stack>` for
    /// the default one, `capstan-<stack>-<key>` for a declared one, its own
    /// `name` (or key, when external) as given.
    fn network_name(&self, a: &NetworkAttach) -> String {
        if let Some(n) = &a.def.name {
            n.clone()
        } else if a.def.external {
            a.key.clone()
        } else if a.key == "default" {
            docker_name(&format!("capstan-{}", self.stack_id))
        } else {
            docker_name(&format!("capstan-{}-{}", self.stack_id, a.key))
        }
    }

    /// The networks a service's containers join, the first being the one
    /// capstan reaches them on.
    fn attachments(svc: &Service) -> Vec<NetworkAttach> {
        if svc.container.networks.is_empty() {
            vec![NetworkAttach {
                key: "default".into(),
                ..Default::default()
            }]
        } else {
            svc.container.networks.clone()
        }
    }

    /// Makes sure a network exists: an external one must, the stack's are
    /// created (labelled with the stack) on first use.
    async fn network(&self, docker: &Docker, a: &NetworkAttach) -> Result<String, String> {
        let name = self.network_name(a);
        let cell = self
            .networks
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            match docker.inspect_network(&name, None).await {
                Ok(_) => return Ok(()),
                Err(e) if not_found(&e) && a.def.external => {
                    return Err(format!(
                        "external network {name} (networks.{}) does not exist: create it with `docker network create {name}`",
                        a.key
                    ));
                }
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(format!("network {name}: {}", engine_error(e))),
            }
            let mut labels: HashMap<String, String> = a.def.labels.clone().into_iter().collect();
            labels.insert(LABEL_STACK.into(), self.stack_id.clone());
            let req = NetworkCreateRequest {
                name: name.clone(),
                driver: Some(a.def.driver.clone().unwrap_or_else(|| "bridge".into())),
                internal: Some(a.def.internal),
                options: Some(a.def.driver_opts.clone().into_iter().collect()),
                labels: Some(labels),
                ..Default::default()
            };
            docker
                .create_network(req)
                .await
                .map_err(|e| format!("creating network {name}: {}", engine_error(e)))?;
            Ok(())
        })
        .await
        .clone()?;
        Ok(name)
    }

    /// The endpoint of a replica on one network: the service's name and
    /// aliases, an address if one is asked for.
    fn endpoint(service: &str, a: &NetworkAttach) -> EndpointSettings {
        let mut aliases = vec![service.to_owned()];
        aliases.extend(a.aliases.iter().cloned());
        EndpointSettings {
            aliases: Some(aliases),
            ipam_config: a.ipv4_address.as_ref().map(|ip| EndpointIpamConfig {
                ipv4_address: Some(ip.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The engine's name of one of the stack's named volumes.
    pub fn volume_name(&self, name: &str) -> String {
        docker_name(&format!("capstan-{}-{name}", self.stack_id))
    }

    /// The service's mounts, creating its named volumes (labelled with the
    /// stack) when missing.
    async fn mounts(&self, docker: &Docker, svc: &Service) -> Result<Vec<Mount>, String> {
        let mut out = Vec::new();
        for v in &svc.volumes {
            let (typ, source) = match v.kind {
                VolumeKind::Bind => (MountType::BIND, v.source.clone()),
                VolumeKind::Tmpfs => (MountType::TMPFS, None),
                VolumeKind::Volume => match &v.source {
                    None => (MountType::VOLUME, None),
                    Some(name) => {
                        let vol = self.volume_name(name);
                        if let Err(e) = docker.inspect_volume(&vol).await {
                            if !not_found(&e) {
                                return Err(format!("volume {vol}: {}", engine_error(e)));
                            }
                            docker
                                .create_volume(VolumeCreateRequest {
                                    name: Some(vol.clone()),
                                    labels: Some(HashMap::from([(
                                        LABEL_STACK.to_owned(),
                                        self.stack_id.clone(),
                                    )])),
                                    ..Default::default()
                                })
                                .await
                                .map_err(|e| {
                                    format!("creating volume {vol}: {}", engine_error(e))
                                })?;
                        }
                        (MountType::VOLUME, Some(vol))
                    }
                },
            };
            out.push(Mount {
                target: Some(v.target.clone()),
                source,
                typ: Some(typ),
                read_only: Some(v.read_only),
                ..Default::default()
            });
        }
        Ok(out)
    }

    /// Makes sure the image is there, as `pull_policy` says: pulled when
    /// missing (the default), always, or never.
    async fn image(
        &self,
        docker: &Docker,
        service: &str,
        image: &str,
        policy: Option<&str>,
    ) -> Result<(), String> {
        if policy != Some("always") {
            match docker.inspect_image(image).await {
                Ok(_) => return Ok(()),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(format!("image {image}: {}", engine_error(e))),
            }
            if policy == Some("never") {
                return Err(format!(
                    "image {image} is not on this engine and pull_policy is never"
                ));
            }
        }
        self.events
            .emit(service, None, "pulling", format!("pulling image {image}"));
        pull(docker, image, |_| {}).await?;
        self.events
            .emit(service, None, "pulled", format!("pulled image {image}"));
        Ok(())
    }

    /// The revision's image, built from its `build:` once.
    async fn built(&self, docker: &Docker, launch: &Launch) -> Result<String, String> {
        let key = (launch.id.service.clone(), launch.id.revision);
        let cell = self.builds.lock().unwrap().entry(key).or_default().clone();
        let r = cell
            .get_or_init(|| self.build(docker, launch))
            .await
            .clone();
        if r.is_err() {
            // A failed build is tried again at the next start.
            let mut builds = self.builds.lock().unwrap();
            let key = (launch.id.service.clone(), launch.id.revision);
            if builds.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                builds.remove(&key);
            }
        }
        r
    }

    async fn build(&self, docker: &Docker, launch: &Launch) -> Result<String, String> {
        let svc = &launch.service;
        let b = svc.build.as_ref().ok_or("no build")?;
        let service = &launch.id.service;
        let tag = format!(
            "{}:r{}",
            build_repo(&self.stack_id, service),
            launch.id.revision
        );
        // `image:` names the built image too, as compose does.
        let mut tags = vec![tag.clone()];
        tags.extend(svc.image.clone());
        // Built already by the CLI (`capstan up`, `capstan build`): named for
        // this revision, not built again.
        if let Some(id) = &svc.built
            && docker.inspect_image(id).await.is_ok()
        {
            for t in &tags {
                tag_image(docker, id, t).await?;
            }
            return Ok(tag);
        }
        self.events.emit(
            service,
            None,
            "building",
            format!("building {tag} from {}", b.context),
        );
        let mut tail: Vec<String> = Vec::new();
        build_image(docker, b, &tags, |line| {
            tail.push(line.to_owned());
            if tail.len() > 20 {
                tail.remove(0);
            }
        })
        .await?;
        self.events.emit(
            service,
            None,
            "built",
            format!(
                "built {tag}{}",
                tail.last().map(|l| format!(" ({l})")).unwrap_or_default()
            ),
        );
        Ok(tag)
    }

    async fn start_container(&self, launch: Launch) -> Result<Box<dyn Replica>, String> {
        let docker = self.docker().await?;
        let svc = launch.service.clone();
        let image = if svc.build.is_some() {
            self.built(&docker, &launch).await?
        } else {
            let image = svc
                .image
                .clone()
                .ok_or("the container driver needs an image")?;
            self.image(
                &docker,
                &launch.id.service,
                &image,
                svc.container.pull_policy.as_deref(),
            )
            .await?;
            image
        };
        let image_health = docker
            .inspect_image(&image)
            .await
            .ok()
            .and_then(|i| i.config)
            .and_then(|c| c.healthcheck)
            .and_then(image_healthcheck);
        let attachments = Self::attachments(&svc);
        let mut networks = Vec::with_capacity(attachments.len());
        for a in &attachments {
            networks.push(self.network(&docker, a).await?);
        }
        let network = networks[0].clone();
        let mut mounts = self.mounts(&docker, &svc).await?;
        mounts.extend(file_binds(&svc));
        let port = container_port(&svc);
        let mut env = launch.env.clone();
        env.entry("PORT".into()).or_insert(port.to_string());
        // The demo and other programs that bind 127.0.0.1 by default are
        // told to listen where the network reaches them.
        env.entry("HOST".into()).or_insert("0.0.0.0".into());
        let name = docker_name(&format!(
            "capstan-{}-{}-{}-{}",
            self.stack_id, launch.id.service, launch.id.revision, launch.id.index
        ));
        // A container of this name left behind (a crash between create and
        // record) goes first.
        let _ = docker
            .remove_container(
                &name,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
        let limits = &launch.limits;
        let labels = HashMap::from([
            (LABEL_STACK.to_owned(), self.stack_id.clone()),
            (LABEL_SERVICE.to_owned(), launch.id.service.clone()),
            (LABEL_REVISION.to_owned(), launch.id.revision.to_string()),
            (LABEL_REPLICA.to_owned(), launch.id.index.to_string()),
            (LABEL_DEFINITION.to_owned(), svc.definition_hash()),
            (LABEL_PORT.to_owned(), port.to_string()),
        ])
        .into_iter()
        .chain(svc.labels.clone())
        .collect();
        let as_argv = |c: &crate::spec::Cmd| match c {
            crate::spec::Cmd::Exec(v) => v.clone(),
            crate::spec::Cmd::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
        };
        // Services run as processes are reached by name at the host, where
        // capstan's proxy publishes their ports.
        let mut extra_hosts = svc.container.extra_hosts.clone();
        // The host, by the name Docker Desktop gives it: a container reaches
        // any service's published port there, through capstan's proxy.
        if !extra_hosts
            .iter()
            .any(|h| h.starts_with("host.docker.internal:"))
        {
            extra_hosts.push("host.docker.internal:host-gateway".into());
        }
        extra_hosts.extend(
            launch
                .host_services
                .iter()
                .filter(|h| **h != launch.id.service)
                .map(|h| format!("{h}:host-gateway")),
        );
        let udp = udp_bindings(&svc);
        let body = ContainerCreateBody {
            exposed_ports: Some(udp.keys().cloned().collect::<Vec<String>>())
                .filter(|e| !e.is_empty()),
            image: Some(image.clone()),
            cmd: svc.command.as_ref().map(as_argv),
            entrypoint: svc.entrypoint.as_ref().map(as_argv),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: svc.working_dir.clone(),
            user: svc.container.user.clone(),
            hostname: svc.container.hostname.clone(),
            labels: Some(labels),
            stop_signal: Some(launch.stop_signal.clone()),
            host_config: Some(HostConfig {
                memory: limits.memory.map(|m| m as i64),
                nano_cpus: limits.cpus.map(|c| (c * 1e9) as i64),
                pids_limit: limits.pids,
                network_mode: Some(network.clone()),
                mounts: Some(mounts),
                port_bindings: Some(udp_bindings(&svc)).filter(|b| !b.is_empty()),
                init: svc.container.init,
                readonly_rootfs: Some(svc.container.read_only),
                cap_add: Some(svc.container.cap_add.clone()).filter(|c| !c.is_empty()),
                cap_drop: Some(svc.container.cap_drop.clone()).filter(|c| !c.is_empty()),
                extra_hosts: Some(extra_hosts).filter(|h| !h.is_empty()),
                ..passthrough(&svc.container)
            }),
            // API 1.41 takes one network at creation; the others are
            // connected before the start.
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.clone(),
                    Self::endpoint(&launch.id.service, &attachments[0]),
                )])),
            }),
            ..Default::default()
        };
        let created = docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| format!("creating container {name}: {}", engine_error(e)))?;
        let id = created.id;
        let remove = |docker: Docker, id: String| async move {
            let _ = docker
                .remove_container(
                    &id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
        };
        for (a, net) in attachments.iter().zip(&networks).skip(1) {
            let req = NetworkConnectRequest {
                container: id.clone(),
                endpoint_config: Some(Self::endpoint(&launch.id.service, a)),
            };
            if let Err(e) = docker.connect_network(net, req).await {
                remove(docker.clone(), id.clone()).await;
                return Err(format!(
                    "connecting container {name} to network {net}: {}",
                    engine_error(e)
                ));
            }
        }
        if let Err(e) = write_files(&docker, &id, &svc).await {
            remove(docker.clone(), id.clone()).await;
            return Err(format!("container {name}: {e}"));
        }
        // Output is followed from the container's start, before it runs.
        if let Err(e) = docker.start_container(&id, None).await {
            remove(docker.clone(), id.clone()).await;
            return Err(format!("starting container {name}: {}", engine_error(e)));
        }
        let inspected = match docker.inspect_container(&id, None).await {
            Ok(i) => i,
            Err(e) => {
                remove(docker.clone(), id.clone()).await;
                return Err(format!("inspecting container {name}: {}", engine_error(e)));
            }
        };
        let record = Record {
            service: launch.id.service.clone(),
            replica: launch.id.index,
            revision: launch.id.revision,
            pid: 0,
            start_ticks: 0,
            cgroup: None,
            stop_signal: launch.stop_signal,
            grace_ms: launch.grace.as_millis() as u64,
            container: Some(id.clone()),
        };
        Ok(Box::new(attach(
            docker,
            id,
            &inspected,
            port,
            record,
            (limits.memory, limits.cpus),
            image_health,
        )))
    }

    /// The containers of this stack a previous daemon left: running ones of
    /// a wanted service with an unchanged definition are adopted, the rest are
    /// stopped and removed.
    async fn recover_all(
        &self,
        records: Vec<Record>,
        wanted: BTreeMap<String, String>,
    ) -> Vec<super::Adopted> {
        if records.is_empty() && wanted.is_empty() {
            // A stack of processes that never ran containers needs no engine.
            return Vec::new();
        }
        let docker = match self.docker().await {
            Ok(d) => d,
            Err(e) => {
                if !records.is_empty() {
                    self.events.warn_once(format!(
                        "cannot stop the containers a previous daemon left: {e}"
                    ));
                }
                return Vec::new();
            }
        };
        let by_id: BTreeMap<String, Record> = records
            .into_iter()
            .filter_map(|r| Some((r.container.clone()?, r)))
            .collect();
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_STACK}={}", self.stack_id)],
        )]);
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .unwrap_or_default();
        let mut adopted = Vec::new();
        let mut stops = Vec::new();
        for c in list {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let label = |k: &str| labels.get(k).cloned();
            let service = label(LABEL_SERVICE).unwrap_or_else(|| "capstan".into());
            let short = id[..id.len().min(12)].to_owned();
            let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
            let identity = (
                label(LABEL_REVISION).and_then(|r| r.parse::<u64>().ok()),
                label(LABEL_REPLICA).and_then(|r| r.parse::<u32>().ok()),
                label(LABEL_PORT).and_then(|p| p.parse::<u16>().ok()),
            );
            let same = wanted.contains_key(&service)
                && wanted.get(&service) == label(LABEL_DEFINITION).as_ref();
            if let (true, true, (Some(revision), Some(index), Some(port))) =
                (running, same, identity)
                && let Ok(inspected) = docker.inspect_container(&id, None).await
            {
                let r = by_id.get(&id).cloned();
                let record = Record {
                    service: service.clone(),
                    replica: index,
                    revision,
                    pid: 0,
                    start_ticks: 0,
                    cgroup: None,
                    stop_signal: r
                        .as_ref()
                        .map_or_else(|| "SIGTERM".into(), |r| r.stop_signal.clone()),
                    grace_ms: r.as_ref().map_or(10_000, |r| r.grace_ms),
                    container: Some(id.clone()),
                };
                let host = inspected.host_config.as_ref();
                let enforced = (
                    host.and_then(|h| h.memory)
                        .filter(|m| *m > 0)
                        .map(|m| m as u64),
                    host.and_then(|h| h.nano_cpus)
                        .filter(|c| *c > 0)
                        .map(|c| c as f64 / 1e9),
                );
                let image_health = inspected
                    .config
                    .as_ref()
                    .and_then(|c| c.healthcheck.clone())
                    .and_then(image_healthcheck);
                let replica = attach(
                    docker.clone(),
                    id.clone(),
                    &inspected,
                    port,
                    record,
                    enforced,
                    image_health,
                );
                self.events.emit(
                    &service,
                    Some(index),
                    "adopted",
                    format!("container {short} (revision {revision}) left running by a previous daemon; supervised again"),
                );
                adopted.push(super::Adopted {
                    id: crate::state::ReplicaId::new(&service, revision, index),
                    replica: Box::new(replica),
                });
                continue;
            }
            self.events.emit(
                &service,
                None,
                "stopping",
                format!(
                    "found container {short} left by a previous daemon; stopping it before starting afresh"
                ),
            );
            let secs = by_id.get(&id).map_or(10, |r| r.grace_ms.div_ceil(1000)) as i32;
            let docker = docker.clone();
            stops.push(tokio::spawn(async move {
                let _ = docker
                    .stop_container(
                        &id,
                        Some(StopContainerOptions {
                            t: Some(secs),
                            signal: None,
                        }),
                    )
                    .await;
                let _ = docker
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            ..Default::default()
                        }),
                    )
                    .await;
            }));
        }
        for s in stops {
            let _ = s.await;
        }
        adopted
    }
}

impl Driver for ContainerDriver {
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<Box<dyn Replica>, String>> {
        Box::pin(self.start_container(launch))
    }

    fn recover(
        &self,
        records: Vec<Record>,
        wanted: BTreeMap<String, String>,
    ) -> BoxFuture<'_, Vec<super::Adopted>> {
        Box::pin(self.recover_all(records, wanted))
    }

    fn down(&self, volumes: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if volumes && let Ok(docker) = self.docker().await {
                let filters = HashMap::from([(
                    "label".to_owned(),
                    vec![format!("{LABEL_STACK}={}", self.stack_id)],
                )]);
                let list = docker
                    .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
                        filters: Some(filters),
                    }))
                    .await;
                for v in list.ok().and_then(|l| l.volumes).unwrap_or_default() {
                    if let Err(e) = docker
                        .remove_volume(
                            &v.name,
                            None::<bollard::query_parameters::RemoveVolumeOptions>,
                        )
                        .await
                    {
                        self.events.warn_once(format!(
                            "cannot remove volume {}: {}",
                            v.name,
                            engine_error(e)
                        ));
                    }
                }
            }
            // Only a stack that ran containers has networks to remove (and
            // an engine to ask): those labelled with the stack, never an
            // external one.
            let Some(Ok(docker)) = self.docker.get() else {
                return;
            };
            let filters = HashMap::from([(
                "label".to_owned(),
                vec![format!("{LABEL_STACK}={}", self.stack_id)],
            )]);
            let list = docker
                .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                    filters: Some(filters),
                }))
                .await
                .unwrap_or_default();
            for n in list {
                let Some(name) = n.name else { continue };
                if let Err(e) = docker.remove_network(&name).await
                    && !not_found(&e)
                {
                    self.events
                        .warn_once(format!("cannot remove network {name}: {}", engine_error(e)));
                }
            }
            self.networks.lock().unwrap().clear();
        })
    }
}

/// A handle on a running container: its pid and address from `inspected`,
/// a task waiting for its exit and one following its stats.
#[allow(clippy::too_many_arguments)]
fn attach(
    docker: Docker,
    id: String,
    inspected: &bollard::models::ContainerInspectResponse,
    port: u16,
    mut record: Record,
    enforced: (Option<u64>, Option<f64>),
    image_health: Option<Healthcheck>,
) -> ContainerReplica {
    let pid = inspected
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .map(|p| p as i32);
    // Its address on the first network it joined (its network mode).
    let first = inspected
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.clone());
    let ip: Option<IpAddr> = inspected
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(|n| match first.as_ref().and_then(|f| n.get(f)) {
            Some(e) => Some(e),
            None => n
                .values()
                .find(|e| e.ip_address.as_deref().is_some_and(|a| !a.is_empty())),
        })
        .and_then(|e| e.ip_address.as_deref())
        .and_then(|ip| ip.parse().ok());
    // A container that already ended has no address; its exit tells why.
    let addr = SocketAddr::new(ip.unwrap_or(IpAddr::from([127, 0, 0, 1])), port);
    let (exit_tx, exit_rx) = watch::channel(None);
    let waiter = tokio::spawn(wait_exit(docker.clone(), id.clone(), exit_tx));
    let stats = Arc::new(Mutex::new(None));
    let sampler = tokio::spawn(follow_stats(docker.clone(), id.clone(), stats.clone()));
    record.pid = pid.unwrap_or(0);
    ContainerReplica {
        docker,
        record,
        id,
        pid,
        addr,
        enforced,
        image_health,
        exit: exit_rx,
        tasks: vec![waiter, sampler],
        stats,
        last_cpu: Some((Instant::now(), 0)),
        logs_since: None,
    }
}

/// Reports the container's exit once: its code, and whether the kernel
/// killed it for memory.
async fn wait_exit(docker: Docker, id: String, tx: watch::Sender<Option<Exit>>) {
    let mut wait = docker.wait_container(
        &id,
        Some(WaitContainerOptions {
            condition: "not-running".into(),
        }),
    );
    let code = match wait.next().await {
        Some(Ok(r)) => Some(r.status_code),
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
        _ => None,
    };
    let state = docker
        .inspect_container(&id, None)
        .await
        .ok()
        .and_then(|i| i.state);
    let code = code.or_else(|| state.as_ref().and_then(|s| s.exit_code));
    let oom_killed = state.and_then(|s| s.oom_killed).unwrap_or(false);
    let _ = tx.send(Some(Exit {
        code: code.map(|c| c as i32),
        signal: None,
        oom_killed,
    }));
}

/// What the engine's stats stream last said: CPU time (ns), working set and
/// RSS (bytes).
type Stats = Option<(u64, Option<u64>, Option<u64>)>;

async fn follow_stats(docker: Docker, id: String, out: Arc<Mutex<Stats>>) {
    let mut s = docker.stats(
        &id,
        Some(StatsOptions {
            stream: true,
            one_shot: false,
        }),
    );
    while let Some(Ok(st)) = s.next().await {
        let cpu = st
            .cpu_stats
            .as_ref()
            .and_then(|c| c.cpu_usage.as_ref())
            .and_then(|u| u.total_usage);
        let mem = st.memory_stats.as_ref();
        let stat = |k: &str| {
            mem.and_then(|m| m.stats.as_ref())
                .and_then(|s| s.get(k).copied())
        };
        // The working set as cAdvisor counts it: usage less inactive file pages.
        let inactive = stat("total_inactive_file").or_else(|| stat("inactive_file"));
        let working = mem
            .and_then(|m| m.usage)
            .map(|u| u.saturating_sub(inactive.unwrap_or(0)));
        let rss = stat("total_rss")
            .or_else(|| stat("rss"))
            .or_else(|| stat("anon"));
        if let Some(cpu) = cpu {
            *out.lock().unwrap() = Some((cpu, working, rss));
        }
    }
}

struct ContainerReplica {
    docker: Docker,
    id: String,
    pid: Option<i32>,
    addr: SocketAddr,
    record: Record,
    enforced: (Option<u64>, Option<f64>),
    image_health: Option<Healthcheck>,
    exit: watch::Receiver<Option<Exit>>,
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<Mutex<Stats>>,
    last_cpu: Option<(Instant, u64)>,
    /// For an adopted container: output up to this time (unix ns) was stored
    /// by the previous daemon.
    logs_since: Option<i64>,
}

impl ContainerReplica {
    async fn exited(&mut self) -> Exit {
        let got = self
            .exit
            .wait_for(Option::is_some)
            .await
            .map(|e| e.unwrap_or_default());
        match got {
            Ok(e) => e,
            // The waiter ended without an answer: the engine went away.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for ContainerReplica {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Replica for ContainerReplica {
    fn pid(&self) -> Option<i32> {
        self.pid
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn record(&self) -> Record {
        self.record.clone()
    }

    fn enforced_limits(&self) -> (Option<u64>, Option<f64>) {
        self.enforced
    }

    fn take_output(&mut self) -> Vec<(Stream, Output)> {
        let (mut out_w, out_r) = tokio::io::duplex(64 << 10);
        let (mut err_w, err_r) = tokio::io::duplex(64 << 10);
        let docker = self.docker.clone();
        let id = self.id.clone();
        let since = self.logs_since;
        self.tasks.push(tokio::spawn(async move {
            // Adopted: from the second of the last stored line, with the
            // engine's timestamps to leave out what is stored already.
            let mut logs = docker.logs(
                &id,
                Some(LogsOptions {
                    follow: true,
                    stdout: true,
                    stderr: true,
                    tail: "all".into(),
                    since: since.map_or(0, |ns| (ns / 1_000_000_000) as i32),
                    timestamps: since.is_some(),
                    ..Default::default()
                }),
            );
            while let Some(Ok(chunk)) = logs.next().await {
                let (to_err, message) = match chunk {
                    bollard::container::LogOutput::StdErr { message } => (true, message),
                    bollard::container::LogOutput::StdOut { message }
                    | bollard::container::LogOutput::Console { message } => (false, message),
                    bollard::container::LogOutput::StdIn { .. } => continue,
                };
                let message = match since {
                    None => &message[..],
                    Some(after) => match after_timestamp(&message, after) {
                        Some(rest) => rest,
                        None => continue,
                    },
                };
                let r = if to_err {
                    err_w.write_all(message).await
                } else {
                    out_w.write_all(message).await
                };
                if r.is_err() {
                    break;
                }
            }
        }));
        vec![
            (Stream::Stdout, Box::new(out_r) as Output),
            (Stream::Stderr, Box::new(err_r) as Output),
        ]
    }

    fn output_after(&mut self, ns: i64) {
        self.logs_since = Some(ns);
    }

    fn wait(&mut self) -> BoxFuture<'_, Exit> {
        Box::pin(self.exited())
    }

    fn stop(&mut self, _signal: &str, grace: Duration) -> BoxFuture<'_, (Exit, bool)> {
        Box::pin(async move {
            let done = *self.exit.borrow();
            if let Some(e) = done {
                return (e, false);
            }
            let started = Instant::now();
            // The container's stop signal was set when it was created.
            let secs = grace.as_secs_f64().ceil() as i32;
            let _ = self
                .docker
                .stop_container(
                    &self.id,
                    Some(StopContainerOptions {
                        t: Some(secs),
                        signal: None,
                    }),
                )
                .await;
            let exit = self.exited().await;
            (exit, started.elapsed() >= grace && exit.code == Some(137))
        })
    }

    fn sample(&mut self) -> Sample {
        let now = Instant::now();
        let at_ms = crate::state::clock::unix_ms();
        let Some((cpu, working, rss)) = *self.stats.lock().unwrap() else {
            return Sample {
                at_ms,
                ..Sample::default()
            };
        };
        // The engine's stats come about once a second: a reading not new yet
        // gives no figure rather than 0 %.
        let pct = self
            .last_cpu
            .filter(|(_, prev)| *prev != cpu)
            .and_then(|last| super::cpu_percent(last, now, cpu));
        if self.last_cpu.is_none_or(|(_, prev)| prev != cpu) {
            self.last_cpu = Some((now, cpu));
        }
        Sample {
            cpu_percent: pct,
            cpu_seconds: Some(cpu as f64 / 1e9),
            working_set: working,
            rss,
            at_ms,
        }
    }

    fn prober(&self) -> Prober {
        let (docker, id, addr) = (self.docker.clone(), self.id.clone(), self.addr);
        Arc::new(move |test, timeout| {
            let (docker, id) = (docker.clone(), id.clone());
            Box::pin(async move {
                let argv = match &test {
                    HealthTest::Cmd(argv) => argv.clone(),
                    HealthTest::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
                    other => {
                        return crate::probe::probe(other, addr, &BTreeMap::new(), timeout).await;
                    }
                };
                match tokio::time::timeout(timeout, exec(&docker, &id, argv)).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("timed out after {}", crate::spec::Dur(timeout))),
                }
            })
        })
    }

    fn healthcheck(&self) -> Option<Healthcheck> {
        self.image_health.clone()
    }

    fn cleanup(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Anonymous volumes go with their container, as with `docker rm -v`.
            let _ = self
                .docker
                .remove_container(
                    &self.id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await;
        })
    }
}

/// The service's UDP ports, which the engine publishes (the proxy takes TCP
/// only): `TARGET/udp` → the host address and port.
fn udp_bindings(svc: &Service) -> HashMap<String, Option<Vec<bollard::models::PortBinding>>> {
    svc.ports
        .iter()
        .filter(|p| p.protocol == "udp")
        .map(|p| {
            let target = p
                .target
                .as_deref()
                .and_then(|t| t.parse::<u16>().ok())
                .unwrap_or(p.published);
            (
                format!("{target}/udp"),
                Some(vec![bollard::models::PortBinding {
                    host_ip: p.host_ip.clone(),
                    host_port: Some(p.published.to_string()),
                }]),
            )
        })
        .collect()
}

/// A log line the engine prefixed with its time: the line without the
/// prefix if it is from after `after` (unix ns), else `None`.
fn after_timestamp(message: &[u8], after: i64) -> Option<&[u8]> {
    let space = message.iter().position(|b| *b == b' ')?;
    let ts: jiff::Timestamp = std::str::from_utf8(&message[..space]).ok()?.parse().ok()?;
    (ts.as_nanosecond() > i128::from(after)).then(|| &message[space + 1..])
}

/// An image's HEALTHCHECK as capstan's: `NONE` or an empty test is none;
/// zero durations and retries take compose's defaults.
fn image_healthcheck(h: bollard::models::HealthConfig) -> Option<Healthcheck> {
    let test = h.test?;
    let test = match test.split_first()? {
        (kind, rest) if kind == "CMD" && !rest.is_empty() => HealthTest::Cmd(rest.to_vec()),
        (kind, [script]) if kind == "CMD-SHELL" => HealthTest::Shell(script.clone()),
        _ => return None,
    };
    let mut hc = Healthcheck::compose_defaults();
    hc.test = test;
    let dur = |ns: Option<i64>, slot: &mut Dur| {
        if let Some(ns) = ns.filter(|n| *n > 0) {
            *slot = Dur(Duration::from_nanos(ns as u64));
        }
    };
    dur(h.interval, &mut hc.interval);
    dur(h.timeout, &mut hc.timeout);
    dur(h.start_period, &mut hc.start_period);
    dur(h.start_interval, &mut hc.start_interval);
    if let Some(r) = h.retries.filter(|r| *r > 0) {
        hc.retries = r as u32;
    }
    Some(hc)
}

/// Runs a health check command inside the container: healthy on exit 0.
async fn exec(docker: &Docker, id: &str, argv: Vec<String>) -> Result<(), String> {
    let created = docker
        .create_exec(
            id,
            CreateExecOptions {
                cmd: Some(argv),
                attach_stdout: Some(false),
                attach_stderr: Some(false),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("exec: {}", engine_error(e)))?;
    docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: true,
                ..Default::default()
            }),
        )
        .await
        .map_err(|e| format!("exec: {}", engine_error(e)))?;
    loop {
        let i = docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| format!("exec: {}", engine_error(e)))?;
        if i.running != Some(true) {
            return match i.exit_code {
                Some(0) => Ok(()),
                Some(c) => Err(format!("command exited with code {c}")),
                None => Err("command did not report an exit".into()),
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_context_over_the_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(dir.path().join("sub/data"), vec![7u8; 2000]).unwrap();
        let e = context_tar(dir.path(), "Dockerfile", 1024).unwrap_err();
        assert!(e.contains("more than the 1024-byte limit"), "{e}");
        let tar = context_tar(dir.path(), "Dockerfile", 4096).unwrap();
        assert!(tar.len() > 2000);
        // Left out by .dockerignore, it no longer counts.
        std::fs::write(dir.path().join(".dockerignore"), "sub\n").unwrap();
        assert!(context_tar(dir.path(), "Dockerfile", 1024).is_ok());
    }

    #[test]
    fn dockerignore_leaves_files_out_of_the_context_but_never_the_dockerfile() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (path, text) in [
            ("Dockerfile", "FROM scratch\n"),
            ("app.py", "print()\n"),
            ("notes.md", "x"),
            ("README.md", "x"),
            (".git/HEAD", "ref"),
            ("logs/a.log", "a"),
            ("logs/keep.log", "k"),
            (
                ".dockerignore",
                "*.md\n!README.md\n.git\nlogs\n!logs/keep.log\nDockerfile\n",
            ),
        ] {
            std::fs::create_dir_all(d.join(path).parent().unwrap()).unwrap();
            std::fs::write(d.join(path), text).unwrap();
        }
        let tar = context_tar(d, "Dockerfile", 1 << 20).unwrap();
        let mut names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".dockerignore",
                "Dockerfile",
                "README.md",
                "app.py",
                "logs/keep.log"
            ]
        );
    }

    #[test]
    fn names_and_ports() {
        assert_eq!(docker_name("capstan-my app/x"), "capstan-my-app-x");
        let svc = |yaml: &str| -> Service {
            let opts = crate::spec::LoadOptions {
                env: BTreeMap::new(),
                profiles: Vec::new(),
            };
            crate::spec::parse_text(
                yaml,
                "c.yaml",
                std::path::Path::new("/tmp"),
                "app",
                BTreeMap::new(),
                &opts,
            )
            .unwrap()
            .0
            .services["web"]
                .clone()
        };
        assert_eq!(
            container_port(&svc(
                "services:\n  web:\n    image: x\n    ports: [\"5000:5000\"]\n"
            )),
            5000
        );
        assert_eq!(
            container_port(&svc(
                "services:\n  web:\n    image: x\n    expose: [\"6000\"]\n"
            )),
            6000
        );
        assert_eq!(
            container_port(&svc(
                "services:\n  web:\n    image: x\n    environment: {PORT: \"7000\"}\n"
            )),
            7000
        );
        assert_eq!(
            container_port(&svc("services:\n  web:\n    image: x\n")),
            DEFAULT_PORT
        );
    }
}
