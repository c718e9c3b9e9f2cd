//! `capstan export swarm`: the stack as a compose file for `docker stack
//! deploy`: images, replicas, resources, restart policy, `update_config` and
//! `rollback_config`, health checks, published ports through the routing
//! mesh, networks (overlay), named volumes, secrets and configs. What Swarm
//! cannot express (the proxy, autoscaling, canaries, process services,
//! capstan's HTTP/TCP checks) is listed.

use serde_json::{Map, Value, json};

use super::{DEFAULT_PORT, Export};
use crate::spec::{
    Cmd, FailureAction, FileSource, HealthTest, RestartCondition, Service, Stack, UpdateConfig,
    UpdateOrder, VolumeKind,
};

fn cmd(c: &Cmd) -> Value {
    match c {
        Cmd::Exec(v) => json!(v),
        Cmd::Shell(s) => json!(s),
    }
}

fn dur(d: &crate::spec::Dur) -> Value {
    json!(d.to_string())
}

fn update(u: &UpdateConfig) -> Value {
    json!({
        "parallelism": u.parallelism,
        "delay": dur(&u.delay),
        "order": match u.order {
            Some(UpdateOrder::StopFirst) => "stop-first",
            // Capstan starts first for a service the proxy fronts; say so.
            _ => "start-first",
        },
        "failure_action": match u.failure_action {
            FailureAction::Rollback => "rollback",
            FailureAction::Pause => "pause",
            FailureAction::Continue => "continue",
        },
        "monitor": dur(&u.monitor),
        "max_failure_ratio": u.max_failure_ratio,
    })
}

/// Bytes as compose writes them (`134217728` → `128M`).
fn bytes(b: u64) -> Value {
    for (unit, size) in [("G", 1u64 << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if b >= size && b.is_multiple_of(size) {
            return json!(format!("{}{unit}", b / size));
        }
    }
    json!(format!("{b}b"))
}

/// How published ports are published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishMode {
    /// Through the routing mesh: every node answers on the port.
    #[default]
    Ingress,
    /// On the node that runs the task only (no mesh; one task per node per port).
    Host,
}

fn service(stack: &Stack, name: &str, s: &Service, mode: PublishMode, out: &mut Export) -> Value {
    let path = format!("services.{name}");
    let mut o = Map::new();
    let image = super::image_of(
        s,
        &path,
        (format!("{}-{name}", stack.name), &|i| {
            format!(
                "docker stack deploy does not build: the file names the image {i}; every node must have it, or push it to a registry and name it there"
            )
        }),
        (format!("{}-{name}:latest", stack.name), &|i| {
            format!(
                "a process service has no image: the file names {i}; build an image that runs this command"
            )
        }),
        out,
    );
    o.insert("image".into(), json!(image));
    if let Some(e) = &s.entrypoint {
        o.insert("entrypoint".into(), cmd(e));
    }
    if let Some(c) = &s.command {
        o.insert("command".into(), cmd(c));
    }
    if let Some(w) = &s.working_dir {
        o.insert("working_dir".into(), json!(w));
    }
    // `$PORT` becomes a fixed port in the task.
    let target = |t: Option<&str>| {
        t.and_then(|t| t.parse::<u16>().ok())
            .unwrap_or(DEFAULT_PORT)
    };
    let mut env: Map<String, Value> = s
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    if s.ports.is_empty()
        || s.ports.iter().any(|p| {
            p.target
                .as_deref()
                .is_none_or(|t| t.parse::<u16>().is_err())
        })
    {
        env.insert("PORT".into(), json!(DEFAULT_PORT.to_string()));
    }
    env.insert("CAPSTAN_SERVICE".into(), json!(name));
    o.insert("environment".into(), Value::Object(env));
    if !s.ports.is_empty() {
        let ports: Vec<Value> = s
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if p.host_ip.is_some() {
                    out.skip(
                        format!("{path}.ports[{i}]"),
                        "the routing mesh publishes on every node's addresses, not one host address",
                    );
                }
                json!({
                    "target": target(p.target.as_deref()),
                    "published": p.published,
                    "protocol": p.protocol,
                    "mode": match mode {
                        PublishMode::Ingress => "ingress",
                        PublishMode::Host => "host",
                    },
                })
            })
            .collect();
        o.insert("ports".into(), json!(ports));
    }
    if !s.expose.is_empty() {
        o.insert("expose".into(), json!(s.expose));
    }
    // Health checks run inside the task on Swarm.
    if let Some(h) = &s.healthcheck {
        let test = match &h.test {
            HealthTest::Cmd(argv) => {
                let mut t = vec!["CMD".to_owned()];
                t.extend(argv.iter().cloned());
                Some(json!(t))
            }
            HealthTest::Shell(script) => Some(json!(["CMD-SHELL", script])),
            HealthTest::Http { path: p, .. } => {
                out.skip(
                    format!("{path}.x-capstan.healthcheck.http"),
                    format!("Swarm runs health checks inside the container: add `healthcheck: {{test: [CMD, curl, -f, http://localhost:{}{p}]}}` if the image has curl (or another client)", target(s.ports.first().and_then(|p| p.target.as_deref()))),
                );
                None
            }
            HealthTest::Tcp { .. } => {
                out.skip(
                    format!("{path}.x-capstan.healthcheck.tcp"),
                    "Swarm runs health checks inside the container: add a `healthcheck: test:` the image can run",
                );
                None
            }
        };
        if let Some(test) = test {
            o.insert(
                "healthcheck".into(),
                json!({
                    "test": test,
                    "interval": dur(&h.interval),
                    "timeout": dur(&h.timeout),
                    "retries": h.retries,
                    "start_period": dur(&h.start_period),
                }),
            );
        }
    } else if s.healthcheck_disabled {
        o.insert("healthcheck".into(), json!({"disable": true}));
    }
    o.insert("stop_grace_period".into(), dur(&s.stop_grace_period));
    if s.stop_signal != "SIGTERM" {
        o.insert("stop_signal".into(), json!(s.stop_signal));
    }
    // Volumes: named ones by name, binds as the node's paths.
    let volumes: Vec<Value> = s
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut m = Map::new();
            m.insert(
                "type".into(),
                json!(match v.kind {
                    VolumeKind::Bind => "bind",
                    VolumeKind::Volume => "volume",
                    VolumeKind::Tmpfs => "tmpfs",
                }),
            );
            if let Some(src) = &v.source {
                m.insert("source".into(), json!(src));
            }
            m.insert("target".into(), json!(v.target));
            if v.read_only {
                m.insert("read_only".into(), json!(true));
            }
            if v.kind == VolumeKind::Bind {
                out.skip(
                    format!("{path}.volumes[{i}]"),
                    "a bind mount is the path on whichever node runs the task: the file must be there on every node (a config or a volume travels better)",
                );
            }
            Value::Object(m)
        })
        .collect();
    if !volumes.is_empty() {
        o.insert("volumes".into(), json!(volumes));
    }
    // Networks, secrets and configs as declared at the top level.
    let nets: Map<String, Value> = s
        .container
        .networks
        .iter()
        .map(|n| {
            let v = if n.aliases.is_empty() {
                Value::Null
            } else {
                json!({"aliases": n.aliases})
            };
            (n.key.clone(), v)
        })
        .collect();
    if !nets.is_empty() {
        o.insert("networks".into(), Value::Object(nets));
    }
    for kind in ["secret", "config"] {
        let files: Vec<Value> = s
            .container
            .files
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| {
                let mut m = Map::new();
                m.insert("source".into(), json!(f.name));
                m.insert("target".into(), json!(f.target));
                if let Some(mode) = f.mode {
                    m.insert("mode".into(), json!(mode));
                }
                if let Some(uid) = f.uid {
                    m.insert("uid".into(), json!(uid.to_string()));
                }
                if let Some(gid) = f.gid {
                    m.insert("gid".into(), json!(gid.to_string()));
                }
                Value::Object(m)
            })
            .collect();
        if !files.is_empty() {
            o.insert(format!("{kind}s"), json!(files));
        }
    }
    if let Some(u) = &s.container.user {
        o.insert("user".into(), json!(u));
    }
    if s.container.read_only {
        o.insert("read_only".into(), json!(true));
    }
    if !s.container.cap_add.is_empty() {
        o.insert("cap_add".into(), json!(s.container.cap_add));
    }
    if !s.container.cap_drop.is_empty() {
        o.insert("cap_drop".into(), json!(s.container.cap_drop));
    }
    if !s.container.extra_hosts.is_empty() {
        o.insert("extra_hosts".into(), json!(s.container.extra_hosts));
    }
    if let Some(h) = &s.container.hostname {
        o.insert("hostname".into(), json!(h));
    }
    if s.container.init == Some(true) {
        o.insert("init".into(), json!(true));
    }
    if !s.container.sysctls.is_empty() {
        o.insert("sysctls".into(), json!(s.container.sysctls));
    }
    if !s.container.ulimits.is_empty() {
        let u: Map<String, Value> = s
            .container
            .ulimits
            .iter()
            .map(|(k, (soft, hard))| (k.clone(), json!({"soft": soft, "hard": hard})))
            .collect();
        o.insert("ulimits".into(), Value::Object(u));
    }
    if s.container.privileged {
        out.skip(
            format!("{path}.privileged"),
            "Swarm services cannot be privileged",
        );
    }
    if !s.container.devices.is_empty() {
        out.skip(
            format!("{path}.devices"),
            "Swarm services cannot map devices",
        );
    }
    for (set, key, why) in [
        (
            !s.container.tmpfs.is_empty(),
            "tmpfs",
            "Swarm services take tmpfs as volumes of type tmpfs",
        ),
        (
            !s.container.security_opt.is_empty(),
            "security_opt",
            "Swarm services take no security options",
        ),
        (
            !s.container.dns.is_empty() || !s.container.dns_search.is_empty(),
            "dns",
            "Swarm services use the overlay network's DNS",
        ),
        (
            !s.container.group_add.is_empty(),
            "group_add",
            "Swarm services take no extra groups",
        ),
        (
            s.container.cpu_shares.is_some(),
            "cpu_shares",
            "use deploy.resources.reservations.cpus",
        ),
        (
            s.container.pull_policy.is_some(),
            "pull_policy",
            "docker stack deploy --resolve-image decides",
        ),
    ] {
        if set {
            out.skip(format!("{path}.{key}"), why);
        }
    }
    if s.container.shm_size.is_some() {
        out.skip(
            format!("{path}.shm_size"),
            "Swarm services have no shm_size: mount a tmpfs at /dev/shm",
        );
    }
    if !s.labels.is_empty() {
        o.insert("labels".into(), json!(s.labels));
    }
    // deploy:
    let mut d = Map::new();
    let replicas = match &s.x.autoscale {
        Some(a) => {
            out.skip(
                format!("{path}.x-capstan.autoscale"),
                format!("Swarm has no autoscaler: the file runs {} replicas (`docker service scale` changes it)", a.min.max(1).max(s.deploy.replicas.min(a.max))),
            );
            a.min.max(1).max(s.deploy.replicas.min(a.max))
        }
        None => s.deploy.replicas,
    };
    d.insert("replicas".into(), json!(replicas));
    let lim = &s.deploy.resources.limits;
    let mut limits = Map::new();
    if let Some(c) = lim.cpus {
        limits.insert("cpus".into(), json!(format!("{c}")));
    }
    if let Some(m) = lim.memory {
        limits.insert("memory".into(), bytes(m));
    }
    if let Some(p) = lim.pids {
        limits.insert("pids".into(), json!(p));
    }
    let mut resources = Map::new();
    if !limits.is_empty() {
        resources.insert("limits".into(), Value::Object(limits));
    }
    if let Some(m) = s.container.mem_reservation {
        resources.insert("reservations".into(), json!({"memory": bytes(m)}));
    }
    if !resources.is_empty() {
        d.insert("resources".into(), Value::Object(resources));
    }
    let r = &s.deploy.restart_policy;
    let mut rp = Map::new();
    rp.insert(
        "condition".into(),
        json!(match r.condition {
            RestartCondition::None => "none",
            RestartCondition::OnFailure => "on-failure",
            RestartCondition::Any => "any",
        }),
    );
    rp.insert("delay".into(), dur(&r.delay));
    if let Some(n) = r.max_attempts {
        rp.insert("max_attempts".into(), json!(n));
    }
    rp.insert("window".into(), dur(&r.window));
    d.insert("restart_policy".into(), Value::Object(rp));
    d.insert("update_config".into(), update(&s.deploy.update_config));
    d.insert("rollback_config".into(), update(&s.deploy.rollback_config));
    o.insert("deploy".into(), Value::Object(d));
    // What Swarm cannot say.
    if !s.depends_on.is_empty() {
        out.skip(
            format!("{path}.depends_on"),
            "docker stack deploy ignores depends_on: services start in any order",
        );
    }
    if let Some(c) = &s.x.rollout {
        let weights: Vec<String> = c
            .steps
            .iter()
            .filter_map(|st| match st {
                crate::spec::CanaryStep::Weight(w) => Some(format!("{w}%")),
                crate::spec::CanaryStep::Pause(_) => None,
            })
            .collect();
        out.skip(
            format!("{path}.x-capstan.rollout"),
            format!("Swarm has no traffic weights or metric analysis: the canary ({}) becomes a rolling update as update_config says; `docker service rollback` goes back", weights.join(", ")),
        );
    }
    if s.x.analysis.is_some() {
        out.skip(
            format!("{path}.x-capstan.rollout.analysis"),
            "Swarm judges an update only on task health (monitor, max_failure_ratio)",
        );
    }
    if s.x.proxy != Default::default() {
        out.skip(
            format!("{path}.x-capstan.proxy"),
            "the routing mesh balances connections (no retries, timeouts or ejection)",
        );
    }
    if s.x.metrics != Default::default() {
        out.skip(
            format!("{path}.x-capstan.metrics"),
            "nothing scrapes the tasks: point a Prometheus at them (dockerswarm_sd_configs)",
        );
    }
    if !s.profiles.is_empty() {
        out.skip(
            format!("{path}.profiles"),
            "docker stack deploy runs every service",
        );
    }
    Value::Object(o)
}

/// The compose file for `docker stack deploy`.
pub fn export(stack: &Stack, mode: PublishMode) -> Export {
    let mut out = Export::default();
    let mut services = Map::new();
    for (name, s) in &stack.services {
        let v = service(stack, name, s, mode, &mut out);
        services.insert(name.clone(), v);
    }
    let mut file = Map::new();
    file.insert("version".into(), json!("3.8"));
    file.insert("services".into(), Value::Object(services));
    if !stack.volumes.is_empty() {
        let v: Map<String, Value> = stack
            .volumes
            .iter()
            .map(|v| (v.clone(), json!({})))
            .collect();
        file.insert("volumes".into(), Value::Object(v));
    }
    if !stack.networks.is_empty() {
        let n: Map<String, Value> = stack
            .networks
            .iter()
            .map(|(k, d)| {
                let mut m = Map::new();
                if d.external {
                    m.insert("external".into(), json!(true));
                    if let Some(n) = &d.name {
                        m.insert("name".into(), json!(n));
                    }
                } else {
                    // Swarm's networks span nodes.
                    m.insert(
                        "driver".into(),
                        json!(
                            d.driver
                                .clone()
                                .filter(|x| x != "bridge")
                                .unwrap_or_else(|| "overlay".into())
                        ),
                    );
                    if d.internal {
                        m.insert("internal".into(), json!(true));
                    }
                    if !d.labels.is_empty() {
                        m.insert("labels".into(), json!(d.labels));
                    }
                }
                (k.clone(), Value::Object(m))
            })
            .collect();
        file.insert("networks".into(), Value::Object(n));
    }
    // Secrets and configs: files by path; inline content has no place in a
    // stack file.
    for kind in ["secret", "config"] {
        let mut defs = Map::new();
        for (name, s) in &stack.services {
            for f in s.container.files.iter().filter(|f| f.kind == kind) {
                match &f.source {
                    FileSource::File(p) => {
                        defs.insert(f.name.clone(), json!({"file": p}));
                    }
                    FileSource::Content(_) => out.skip(
                        format!("services.{name}.{kind}s.{}", f.name),
                        format!("a {kind} from inline content or the environment: create it with `docker {kind} create {}` and mark it external", f.name),
                    ),
                }
            }
        }
        if !defs.is_empty() {
            file.insert(format!("{kind}s"), Value::Object(defs));
        }
    }
    super::stack_settings(stack, &mut out, false);
    out.add(format!("{}-stack", stack.name), Value::Object(file));
    out.unmapped.sort();
    out.unmapped.dedup();
    out
}
