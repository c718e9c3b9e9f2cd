//! Turns a positioned YAML tree into the normalized [`Stack`], collecting every
//! error (file:line:col: key.path: message) and a warning per unknown key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::Diagnostic;
use super::interp::{self, Vars};
use super::model::*;
use super::yaml::{Kind, Node};

mod canary;
pub use canary::{MAX_CHECKS, MAX_STEPS, placeholders};

/// Compose service keys capstan reads.
const SERVICE_KEYS: &[&str] = &[
    "image",
    "build",
    "pull_policy",
    "volumes",
    "user",
    "hostname",
    "init",
    "read_only",
    "cap_add",
    "cap_drop",
    "extra_hosts",
    "ulimits",
    "tmpfs",
    "privileged",
    "shm_size",
    "security_opt",
    "sysctls",
    "dns",
    "dns_search",
    "group_add",
    "devices",
    "mem_reservation",
    "cpu_shares",
    "networks",
    "secrets",
    "configs",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "working_dir",
    "ports",
    "expose",
    "healthcheck",
    "depends_on",
    "stop_signal",
    "stop_grace_period",
    "restart",
    "deploy",
    "labels",
    "profiles",
    "cpus",
    "mem_limit",
    "pids_limit",
    "x-capstan",
];

/// What a percentage-or-number field expects.
const PERCENT: &str = "a positive number or percentage such as 60%";

/// Signals a replica may be stopped with.
pub const SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGWINCH",
];

pub struct Decoder<'a> {
    pub file: String,
    /// Override files merged over `file`, for nodes that came from them.
    pub overrides: Vec<String>,
    pub dir: &'a Path,
    pub vars: &'a Vars,
    /// Environment of the invoking shell, for `environment: [NAME]` pass-through.
    pub env: &'a BTreeMap<String, String>,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

/// A mapping being read: remembers which keys were taken so the rest can be reported.
struct Fields<'n> {
    entries: Vec<(String, &'n Node, &'n Node)>,
    taken: BTreeSet<String>,
}

impl<'n> Fields<'n> {
    fn take(&mut self, key: &str) -> Option<&'n Node> {
        let hit = self.entries.iter().find(|(k, _, _)| k == key)?;
        self.taken.insert(key.to_owned());
        Some(hit.2)
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Decoder<'_> {
    /// The file a node came from.
    fn file_of(&self, node: &Node) -> String {
        match node.pos.file {
            0 => self.file.clone(),
            i => self
                .overrides
                .get(usize::from(i) - 1)
                .cloned()
                .unwrap_or_else(|| self.file.clone()),
        }
    }

    fn error(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        self.errors.push(Diagnostic {
            file: self.file_of(node),
            pos: node.pos,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn warn(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        self.warnings.push(Diagnostic {
            file: self.file_of(node),
            pos: node.pos,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn fields<'n>(&mut self, node: &'n Node, path: &str) -> Option<Fields<'n>> {
        let Kind::Map(entries) = &node.kind else {
            self.error(
                node,
                path,
                format!("expected a mapping, found {}", node.describe()),
            );
            return None;
        };
        let mut out = Vec::with_capacity(entries.len());
        let mut seen = BTreeSet::new();
        for (k, v) in entries {
            let Some(key) = k.scalar_text() else {
                self.error(
                    k,
                    path,
                    format!("expected a string key, found {}", k.describe()),
                );
                continue;
            };
            if !seen.insert(key.clone()) {
                self.error(k, &join(path, &key), "duplicate key");
                continue;
            }
            out.push((key, k, v));
        }
        Some(Fields {
            entries: out,
            taken: BTreeSet::new(),
        })
    }

    /// Warns about each key that was not taken: `unsupported` ones as known but not
    /// acted on, `x-` extension keys silently, the rest as unknown.
    fn finish(&mut self, f: Fields<'_>, path: &str, unsupported: &[&str]) {
        for (key, knode, _) in &f.entries {
            if f.taken.contains(key) || key.starts_with("x-") {
                continue;
            }
            let p = join(path, key);
            if unsupported.contains(&key.as_str()) {
                self.warn(knode, &p, "not supported by capstan yet; ignored");
            } else {
                self.warn(knode, &p, "unknown key; ignored");
            }
        }
    }

    /// Interpolates a scalar's text; other nodes come back as they are.
    fn text(&mut self, node: &Node, path: &str) -> Option<String> {
        let Some(raw) = node.scalar_text() else {
            self.error(
                node,
                path,
                format!("expected a string, found {}", node.describe()),
            );
            return None;
        };
        if !matches!(node.kind, Kind::Str(_)) {
            return Some(raw);
        }
        match interp::interpolate(&raw, self.vars) {
            Ok(s) => Some(s),
            Err(e) => {
                self.error(node, path, e);
                None
            }
        }
    }

    fn string_opt(&mut self, node: Option<&Node>, path: &str) -> Option<String> {
        let node = node?;
        if matches!(node.kind, Kind::Null) {
            return None;
        }
        self.text(node, path)
    }

    fn uint(&mut self, node: &Node, path: &str, max: u64) -> Option<u64> {
        let what = "a non-negative integer";
        let value = match &node.kind {
            Kind::Int(i) if *i >= 0 => Some(*i as u64),
            Kind::Str(_) => self
                .text(node, path)
                .and_then(|t| t.trim().parse::<u64>().ok()),
            _ => None,
        };
        match value {
            Some(v) if v <= max => Some(v),
            Some(v) => {
                self.error(node, path, format!("expected at most {max}, found {v}"));
                None
            }
            None => {
                if self.errors.last().is_none_or(|e| e.path != path) {
                    self.error(
                        node,
                        path,
                        format!("expected {what}, found {}", node.describe()),
                    );
                }
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.kind {
            Kind::Bool(b) => Some(*b),
            Kind::Str(_) => match self.text(node, path)?.as_str() {
                "true" | "True" | "TRUE" => Some(true),
                "false" | "False" | "FALSE" => Some(false),
                other => {
                    self.error(
                        node,
                        path,
                        format!("expected true or false, found {other:?}"),
                    );
                    None
                }
            },
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected true or false, found {}", node.describe()),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Dur> {
        let text = self.text(node, path)?;
        match parse_duration(&text) {
            Ok(d) => Some(Dur(d)),
            Err(e) => {
                self.error(node, path, e);
                None
            }
        }
    }

    fn string_list(&mut self, node: &Node, path: &str) -> Vec<String> {
        match &node.kind {
            Kind::Seq(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, n)| self.text(n, &format!("{path}[{i}]")))
                .collect(),
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected a list of strings, found {}", node.describe()),
                );
                Vec::new()
            }
        }
    }

    /// compose's `build:`: a context path, or a map with `context`,
    /// `dockerfile`, `args`, `target`, `labels`. The context is made absolute
    /// against the stack file's directory.
    fn build(&mut self, node: &Node, path: &str) -> Option<Build> {
        let mut b = Build {
            context: ".".into(),
            dockerfile: None,
            args: BTreeMap::new(),
            target: None,
            labels: BTreeMap::new(),
        };
        match &node.kind {
            Kind::Null => return None,
            Kind::Str(_) => b.context = self.text(node, path)?,
            Kind::Map(_) => {
                let mut f = self.fields(node, path)?;
                if let Some(c) = self.string_opt(f.take("context"), &join(path, "context")) {
                    b.context = c;
                }
                b.dockerfile = self.string_opt(f.take("dockerfile"), &join(path, "dockerfile"));
                if let Some(n) = f.take("args") {
                    b.args = self.key_values(n, &join(path, "args"), true);
                }
                b.target = self.string_opt(f.take("target"), &join(path, "target"));
                if let Some(n) = f.take("labels") {
                    b.labels = self.key_values(n, &join(path, "labels"), false);
                }
                self.finish(
                    f,
                    path,
                    &[
                        "cache_from",
                        "cache_to",
                        "network",
                        "shm_size",
                        "extra_hosts",
                        "ssh",
                        "secrets",
                        "platforms",
                        "tags",
                        "no_cache",
                        "pull",
                        "dockerfile_inline",
                        "additional_contexts",
                        "isolation",
                        "privileged",
                        "ulimits",
                        "entitlements",
                    ],
                );
            }
            _ => {
                self.error(
                    node,
                    path,
                    format!(
                        "expected a context path or a mapping with context, dockerfile, args, target, labels; found {}",
                        node.describe()
                    ),
                );
                return None;
            }
        }
        if !Path::new(&b.context).is_absolute() {
            b.context = self.dir.join(&b.context).to_string_lossy().into_owned();
        }
        Some(b)
    }

    /// compose's service `volumes:`: `SOURCE:TARGET[:ro|rw]`, `TARGET` (an
    /// anonymous volume), or `{type, source, target, read_only}`. A source that
    /// is a path (`/`, `.`, `~`) is a bind mount, made absolute against the
    /// stack file's directory; any other source names a top-level volume.
    fn volumes(&mut self, node: &Node, path: &str) -> Vec<Volume> {
        let Kind::Seq(items) = &node.kind else {
            self.error(
                node,
                path,
                format!("expected a list of mounts, found {}", node.describe()),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let v = match &item.kind {
                Kind::Str(_) => {
                    let Some(text) = self.text(item, &p) else {
                        continue;
                    };
                    let parts: Vec<&str> = text.split(':').collect();
                    let (source, target, mode) = match parts.as_slice() {
                        [t] => (None, *t, None),
                        [s, t] => (Some(*s), *t, None),
                        [s, t, m] => (Some(*s), *t, Some(*m)),
                        _ => {
                            self.error(
                                item,
                                &p,
                                format!("expected SOURCE:TARGET[:MODE], found {text:?}"),
                            );
                            continue;
                        }
                    };
                    let read_only = mode.is_some_and(|m| m.split(',').any(|o| o == "ro"));
                    let kind = match source {
                        None => VolumeKind::Volume,
                        Some(s) if s.starts_with(['/', '.', '~']) => VolumeKind::Bind,
                        Some(_) => VolumeKind::Volume,
                    };
                    Volume {
                        kind,
                        source: source.map(str::to_owned),
                        target: target.to_owned(),
                        read_only,
                    }
                }
                Kind::Map(_) => {
                    let Some(mut f) = self.fields(item, &p) else {
                        continue;
                    };
                    let kind = match self
                        .string_opt(f.take("type"), &join(&p, "type"))
                        .as_deref()
                    {
                        Some("bind") => VolumeKind::Bind,
                        Some("volume") | None => VolumeKind::Volume,
                        Some("tmpfs") => VolumeKind::Tmpfs,
                        Some(other) => {
                            self.error(
                                item,
                                &join(&p, "type"),
                                format!("expected bind, volume or tmpfs, found {other:?}"),
                            );
                            continue;
                        }
                    };
                    let source = self.string_opt(f.take("source"), &join(&p, "source"));
                    let Some(target) = self.string_opt(f.take("target"), &join(&p, "target"))
                    else {
                        self.error(item, &join(&p, "target"), "missing key: where to mount it");
                        continue;
                    };
                    let read_only = f
                        .take("read_only")
                        .and_then(|n| self.boolean(n, &join(&p, "read_only")))
                        .unwrap_or(false);
                    self.finish(f, &p, &["bind", "volume", "tmpfs", "consistency"]);
                    Volume {
                        kind,
                        source,
                        target,
                        read_only,
                    }
                }
                _ => {
                    self.error(
                        item,
                        &p,
                        format!("expected a mount, found {}", item.describe()),
                    );
                    continue;
                }
            };
            if !v.target.starts_with('/') {
                self.error(
                    item,
                    &p,
                    format!(
                        "the target {:?} must be an absolute path in the container",
                        v.target
                    ),
                );
                continue;
            }
            let mut v = v;
            if v.kind == VolumeKind::Bind
                && let Some(src) = &v.source
            {
                let expanded = match src.strip_prefix('~') {
                    Some(rest) => format!("{}{rest}", std::env::var("HOME").unwrap_or_default()),
                    None => src.clone(),
                };
                if !Path::new(&expanded).is_absolute() {
                    v.source = Some(self.dir.join(&expanded).to_string_lossy().into_owned());
                } else {
                    v.source = Some(expanded);
                }
            }
            out.push(v);
        }
        out
    }

    fn cmd(&mut self, node: &Node, path: &str) -> Option<Cmd> {
        match &node.kind {
            Kind::Null => None,
            Kind::Seq(_) => Some(Cmd::Exec(self.string_list(node, path))),
            Kind::Str(_) => Some(Cmd::Shell(self.text(node, path)?)),
            _ => {
                self.error(
                    node,
                    path,
                    format!(
                        "expected a string or a list of strings, found {}",
                        node.describe()
                    ),
                );
                None
            }
        }
    }

    /// `KEY: value` mapping or `KEY=value` list (compose's "list or dict").
    fn key_values(&mut self, node: &Node, path: &str, from_env: bool) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match &node.kind {
            Kind::Null => {}
            Kind::Map(_) => {
                let Some(f) = self.fields(node, path) else {
                    return out;
                };
                for (key, _, v) in &f.entries {
                    let p = join(path, key);
                    match &v.kind {
                        Kind::Null => {
                            if let Some(val) = self.env.get(key).filter(|_| from_env) {
                                out.insert(key.clone(), val.clone());
                            } else if !from_env {
                                out.insert(key.clone(), String::new());
                            }
                        }
                        Kind::Seq(_) | Kind::Map(_) => {
                            self.error(
                                v,
                                &p,
                                format!(
                                    "expected a string, number or boolean, found {}",
                                    v.describe()
                                ),
                            );
                        }
                        _ => {
                            if let Some(t) = self.text(v, &p) {
                                out.insert(key.clone(), t);
                            }
                        }
                    }
                }
            }
            Kind::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    let Some(t) = self.text(item, &p) else {
                        continue;
                    };
                    match t.split_once('=') {
                        Some((k, v)) => {
                            out.insert(k.to_owned(), v.to_owned());
                        }
                        None if from_env => {
                            if let Some(v) = self.env.get(&t) {
                                out.insert(t, v.clone());
                            }
                        }
                        None => {
                            out.insert(t, String::new());
                        }
                    }
                }
            }
            _ => self.error(
                node,
                path,
                format!("expected a mapping or a list, found {}", node.describe()),
            ),
        }
        out
    }

    pub fn stack(&mut self, root: &Node, default_name: &str) -> Option<Stack> {
        if matches!(root.kind, Kind::Null) {
            self.error(
                root,
                "services",
                "the stack file is empty: define at least one service",
            );
            return None;
        }
        let mut top = self.fields(root, "")?;
        let name = match top.take("name") {
            Some(n) => self.text(n, "name").map(|s| normalize_name(&s)),
            None => Some(normalize_name(default_name)),
        }
        .unwrap_or_default();
        if let Some(v) = top.take("version") {
            self.warn(v, "version", "the version key is obsolete; ignored");
        }
        let settings = match top.take("x-capstan") {
            Some(n) => self.settings(n, "x-capstan"),
            None => Settings::default(),
        };
        let mut services = BTreeMap::new();
        match top.take("services") {
            None => self.error(root, "services", "missing key: define at least one service"),
            Some(node) => {
                if let Some(sf) = self.fields(node, "services") {
                    for (sname, knode, snode) in &sf.entries {
                        let path = join("services", sname);
                        if !valid_service_name(sname) {
                            self.error(
                                knode,
                                &path,
                                "service names may use only a-z, 0-9, '-', '_' and '.'",
                            );
                            continue;
                        }
                        if let Some(svc) = self.service(snode, &path) {
                            services.insert(sname.clone(), (svc, (*knode).clone()));
                        }
                    }
                }
            }
        }
        let mut volumes = std::collections::BTreeSet::new();
        if let Some(n) = top.take("volumes")
            && let Some(vf) = self.fields(n, "volumes")
        {
            for (vname, _, _) in &vf.entries {
                volumes.insert(vname.clone());
            }
        }
        let networks = match top.take("networks") {
            Some(n) => self.network_defs(n, "networks"),
            None => BTreeMap::new(),
        };
        let mut file_defs = BTreeMap::new();
        for kind in ["secrets", "configs"] {
            if let Some(n) = top.take(kind) {
                file_defs.insert(kind, self.file_defs(n, kind));
            }
        }
        self.finish(top, "", &["include"]);
        for (name, (svc, knode)) in services.iter_mut() {
            self.resolve_container_refs(name, svc, knode, &networks, &file_defs);
        }
        self.cross_checks(&services);
        for (name, (svc, knode)) in &services {
            for (i, v) in svc.volumes.iter().enumerate() {
                if v.kind == VolumeKind::Volume
                    && let Some(src) = &v.source
                    && !volumes.contains(src)
                {
                    self.error(
                        knode,
                        &format!("services.{name}.volumes[{i}]"),
                        format!("refers to undefined volume {src:?}: declare it under the top-level volumes"),
                    );
                }
            }
            if !svc.container.is_default() && svc.driver() == DriverKind::Process {
                self.warn(
                    knode,
                    &format!("services.{name}"),
                    "container settings (such as user, networks, secrets, ulimits) apply to containers; ignored for a service run as processes",
                );
            }
            if !svc.volumes.is_empty() && svc.driver() == DriverKind::Process {
                self.warn(
                    knode,
                    &format!("services.{name}.volumes"),
                    "mounts apply to containers; ignored for a service run as processes",
                );
            }
        }
        Some(Stack {
            name,
            services: services.into_iter().map(|(k, (s, _))| (k, s)).collect(),
            volumes,
            networks,
            settings,
        })
    }

    /// Fills a service's networks and secrets/configs from the top-level
    /// definitions, reporting references to undefined ones.
    fn resolve_container_refs(
        &mut self,
        name: &str,
        svc: &mut Service,
        knode: &Node,
        networks: &BTreeMap<String, NetworkDef>,
        file_defs: &BTreeMap<&str, BTreeMap<String, FileSource>>,
    ) {
        let path = join("services", name);
        let c = &mut svc.container;
        if c.networks.is_empty() {
            c.networks.push(NetworkAttach {
                key: "default".into(),
                ..Default::default()
            });
        }
        let mut errors = Vec::new();
        for a in &mut c.networks {
            match networks.get(&a.key) {
                Some(d) => a.def = d.clone(),
                None if a.key == "default" => {}
                None => errors.push((
                    join(&join(&path, "networks"), &a.key),
                    format!(
                        "refers to undefined network {:?}: declare it under the top-level networks",
                        a.key
                    ),
                )),
            }
        }
        // Only the default network, as is: the same definition as before
        // networks could be declared.
        let plain_default = NetworkAttach {
            key: "default".into(),
            ..Default::default()
        };
        if c.networks.len() == 1 && c.networks[0] == plain_default {
            c.networks.clear();
        }
        for m in &mut c.files {
            let kind = format!("{}s", m.kind);
            match file_defs.get(kind.as_str()).and_then(|d| d.get(&m.name)) {
                Some(src) => m.source = src.clone(),
                None => errors.push((
                    join(&path, &kind),
                    format!(
                        "refers to undefined {} {:?}: declare it under the top-level {kind}",
                        m.kind, m.name
                    ),
                )),
            }
        }
        for (p, e) in errors {
            self.error(knode, &p, e);
        }
    }

    fn settings(&mut self, node: &Node, path: &str) -> Settings {
        let mut s = Settings::default();
        let Some(mut f) = self.fields(node, path) else {
            return s;
        };
        if let Some(n) = f.take("port_range") {
            let p = join(path, "port_range");
            let text = self.text(n, &p).unwrap_or_default();
            match text
                .split_once('-')
                .map(|(a, b)| (a.trim().parse::<u16>(), b.trim().parse::<u16>()))
            {
                Some((Ok(a), Ok(b))) if a > 0 && a <= b => s.port_range = [a, b],
                _ => self.error(
                    n,
                    &p,
                    format!(
                        "expected a port range like 20000-29999, found {}",
                        n.describe()
                    ),
                ),
            }
        }
        if let Some(n) = f.take("storage") {
            let sp = join(path, "storage");
            if let Some(mut sf) = self.fields(n, &sp) {
                if let Some(d) = sf
                    .take("retention")
                    .and_then(|d| self.duration(d, &join(&sp, "retention")))
                {
                    s.storage.retention = d;
                }
                if let Some(b) = sf
                    .take("retention_size")
                    .and_then(|b| self.bytes(b, &join(&sp, "retention_size")))
                {
                    s.storage.retention_size = Some(b);
                }
                if let Some(m) = sf
                    .take("max_series")
                    .and_then(|m| self.uint(m, &join(&sp, "max_series"), u32::MAX as u64))
                {
                    s.storage.max_series = m;
                }
                if let Some(d) = sf
                    .take("max_future")
                    .and_then(|d| self.duration(d, &join(&sp, "max_future")))
                {
                    s.storage.max_future = d;
                }
                if let Some(d) = sf
                    .take("out_of_order_time_window")
                    .and_then(|d| self.duration(d, &join(&sp, "out_of_order_time_window")))
                {
                    s.storage.out_of_order_time_window = d;
                }
                self.finish(sf, &sp, &[]);
            }
        }
        if let Some(n) = f.take("query") {
            let qp = join(path, "query");
            if let Some(mut qf) = self.fields(n, &qp) {
                if let Some(d) = qf
                    .take("timeout")
                    .and_then(|d| self.duration(d, &join(&qp, "timeout")))
                {
                    s.query.timeout = d;
                }
                if let Some(m) = qf
                    .take("max_samples")
                    .and_then(|m| self.uint(m, &join(&qp, "max_samples"), u32::MAX as u64))
                {
                    s.query.max_samples = m;
                }
                if let Some(b) = qf
                    .take("max_memory")
                    .and_then(|b| self.bytes(b, &join(&qp, "max_memory")))
                {
                    s.query.max_memory = b;
                }
                self.finish(qf, &qp, &[]);
            }
        }
        if let Some(n) = f.take("scrape_configs") {
            s.scrape_configs = self.scrape_configs(n, &join(path, "scrape_configs"));
        }
        if let Some(n) = f.take("alerting") {
            let ap = join(path, "alerting");
            if let Some(mut af) = self.fields(n, &ap) {
                if let Some(m) = af.take("alertmanagers") {
                    let mp = join(&ap, "alertmanagers");
                    for (i, u) in self.string_list(m, &mp).into_iter().enumerate() {
                        let u = u.trim_end_matches('/').to_owned();
                        if u.starts_with("http://") && u.parse::<hyper::Uri>().is_ok() {
                            s.alertmanagers.push(u);
                        } else {
                            self.error(
                                m,
                                &format!("{mp}[{i}]"),
                                format!("expected an http:// URL (https needs TLS, which capstan has not yet), found {u:?}"),
                            );
                        }
                    }
                }
                if let Some(d) = af
                    .take("resend_delay")
                    .and_then(|d| self.duration(d, &join(&ap, "resend_delay")))
                {
                    s.resend_delay = d;
                }
                if let Some(w) = af.take("webhooks") {
                    let wp = join(&ap, "webhooks");
                    match &w.kind {
                        Kind::Seq(items) => {
                            for (i, item) in items.iter().enumerate() {
                                let p = format!("{wp}[{i}]");
                                if let Some(h) = self.alert_webhook(item, &p) {
                                    s.alert_webhooks.push(h);
                                }
                            }
                        }
                        _ => self.error(
                            w,
                            &wp,
                            format!("expected a list of webhooks, found {}", w.describe()),
                        ),
                    }
                }
                if let Some(b) = af
                    .take("inhibit_on_dependency")
                    .and_then(|b| self.boolean(b, &join(&ap, "inhibit_on_dependency")))
                {
                    s.inhibit_on_dependency = b;
                }
                self.finish(af, &ap, &[]);
            }
        }
        if let Some(n) = f.take("anomaly") {
            let ap = join(path, "anomaly");
            match &n.kind {
                Kind::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(a) = self.anomaly_rule(item, &format!("{ap}[{i}]")) {
                            if s.anomaly.iter().any(|o| o.name == a.name) {
                                self.error(
                                    item,
                                    &format!("{ap}[{i}]"),
                                    format!("two anomaly rules are named {:?}", a.name),
                                );
                            }
                            s.anomaly.push(a);
                        }
                    }
                }
                _ => self.error(
                    n,
                    &ap,
                    format!("expected a list of anomaly rules, found {}", n.describe()),
                ),
            }
        }
        if let Some(n) = f.take("rule_files") {
            s.rule_files = self.rule_files(n, &join(path, "rule_files"));
        }
        if let Some(n) = f.take("evaluation_interval") {
            let p = join(path, "evaluation_interval");
            match self.duration(n, &p) {
                Some(d) if d.0 < std::time::Duration::from_secs(1) => {
                    self.error(n, &p, "must be at least 1s")
                }
                Some(d) => s.evaluation_interval = d,
                None => {}
            }
        }
        if let Some(n) = f.take("external_labels") {
            let lp = join(path, "external_labels");
            if let Some(mut lf) = self.fields(n, &lp) {
                for (k, _, v) in lf.entries.clone() {
                    lf.take(&k);
                    if !crate::alerting::file::valid_label_name(&k) {
                        self.error(v, &join(&lp, &k), format!("invalid label name {k:?}"));
                    } else if let Some(t) = self.text(v, &join(&lp, &k)) {
                        s.external_labels.insert(k, t);
                    }
                }
                self.finish(lf, &lp, &[]);
            }
        }
        if let Some(d) = f
            .take("scrape_interval")
            .and_then(|n| self.scrape_interval(n, &join(path, "scrape_interval")))
        {
            s.scrape_interval = d;
        }
        if let Some(n) = f.take("logs") {
            let lp = join(path, "logs");
            if let Some(mut lf) = self.fields(n, &lp) {
                if let Some(v) = lf
                    .take("max_file_size")
                    .and_then(|v| self.bytes(v, &join(&lp, "max_file_size")))
                {
                    s.logs.max_file_size = v;
                }
                if let Some(v) = lf
                    .take("max_total_size")
                    .and_then(|v| self.bytes(v, &join(&lp, "max_total_size")))
                {
                    s.logs.max_total_size = v;
                }
                if let Some(v) = lf.take("forward") {
                    s.logs.forward = self.remote_write(v, &join(&lp, "forward"));
                }
                self.finish(lf, &lp, &[]);
            }
        }
        if let Some(n) = f.take("traces")
            && let Some(mut tf) = self.fields(n, &join(path, "traces"))
        {
            let tp = join(path, "traces");
            if let Some(v) = tf.take("forward") {
                s.traces.forward = self.remote_write(v, &join(&tp, "forward"));
            }
            self.finish(tf, &tp, &[]);
        }
        if let Some(n) = f.take("remote_write") {
            s.remote_write = self.remote_write(n, &join(path, "remote_write"));
        }
        if let Some(n) = f.take("api")
            && let Some(mut af) = self.fields(n, &join(path, "api"))
        {
            let ap = join(path, "api");
            if let Some(b) = af
                .take("require_token")
                .and_then(|v| self.boolean(v, &join(&ap, "require_token")))
            {
                s.api_require_token = b;
            }
            self.finish(af, &ap, &[]);
        }
        if let Some(n) = f.take("notify")
            && let Some(mut nf) = self.fields(n, &join(path, "notify"))
        {
            let np = join(path, "notify");
            if let Some(w) = nf.take("webhook") {
                let wp = join(&np, "webhook");
                match self.text(w, &wp) {
                    Some(u) if u.starts_with("http://") && u.parse::<hyper::Uri>().is_ok() => {
                        s.notify = Some(u)
                    }
                    Some(u) if u.starts_with("https://") => self.error(
                        w,
                        &wp,
                        format!("{u}: https webhooks need TLS, which capstan has not yet; use an http:// receiver (such as a local relay)"),
                    ),
                    Some(u) => self.error(w, &wp, format!("expected an http:// URL, found {u:?}")),
                    None => {}
                }
            }
            self.finish(nf, &np, &[]);
        }
        self.finish(f, path, &[]);
        s
    }

    /// One `x-capstan.anomaly` item.
    fn anomaly_rule(&mut self, node: &Node, path: &str) -> Option<AnomalyRule> {
        let mut f = self.fields(node, path)?;
        let name = f
            .take("name")
            .and_then(|n| self.text(n, &join(path, "name")));
        let series = f
            .take("series")
            .and_then(|n| self.text(n, &join(path, "series")));
        let mut a = AnomalyRule {
            name: String::new(),
            series: String::new(),
            method: AnomalyMethod::Mad,
            window: Dur::secs(3600),
            seasonality: None,
            sensitivity: 3.0,
            min_samples: 30,
            for_: Dur::secs(300),
            step: Dur::secs(60),
            labels: BTreeMap::new(),
        };
        match name {
            Some(n) if crate::alerting::file::valid_metric_name(&n) && !n.contains(':') => {
                a.name = n
            }
            Some(n) => self.error(
                node,
                &join(path, "name"),
                format!("{n:?}: letters, digits and _ only"),
            ),
            None => self.error(node, path, "missing key: name (the alert's name)"),
        }
        match series {
            Some(q) => {
                if let Err(e) = capstan_promql::parse(&q) {
                    self.error(
                        node,
                        &join(path, "series"),
                        format!("not a valid PromQL expression: {e}"),
                    );
                }
                a.series = q;
            }
            None => self.error(node, path, "missing key: series (a PromQL expression)"),
        }
        if let Some(n) = f.take("method") {
            let p = join(path, "method");
            match self.text(n, &p).as_deref() {
                Some("mad") => a.method = AnomalyMethod::Mad,
                Some("zscore") => a.method = AnomalyMethod::Zscore,
                Some(o) => self.error(n, &p, format!("expected mad or zscore, found {o:?}")),
                None => {}
            }
        }
        for (key, slot) in [
            ("window", &mut a.window),
            ("for", &mut a.for_),
            ("step", &mut a.step),
        ] {
            if let Some(d) = f.take(key).and_then(|n| self.duration(n, &join(path, key))) {
                *slot = d;
            }
        }
        if let Some(n) = f.take("seasonality") {
            let p = join(path, "seasonality");
            match self.text(n, &p).as_deref() {
                Some("none") => {}
                Some(_) => a.seasonality = self.duration(n, &p),
                None => {}
            }
        }
        if let Some(n) = f.take("sensitivity") {
            let p = join(path, "sensitivity");
            if let Some(v) = self.number(n, &p, false, "a positive number of spreads such as 3") {
                a.sensitivity = v;
            }
        }
        if let Some(v) = f
            .take("min_samples")
            .and_then(|n| self.uint(n, &join(path, "min_samples"), 1_000_000))
        {
            a.min_samples = v as u32;
        }
        if let Some(n) = f.take("labels") {
            let lp = join(path, "labels");
            if let Some(mut lf) = self.fields(n, &lp) {
                for (k, _, v) in lf.entries.clone() {
                    lf.take(&k);
                    if let Some(t) = self.text(v, &join(&lp, &k)) {
                        a.labels.insert(k, t);
                    }
                }
                self.finish(lf, &lp, &[]);
            }
        }
        if a.step.0 < std::time::Duration::from_secs(1) {
            self.error(node, &join(path, "step"), "must be at least 1s");
        } else if a.window.0 < a.step.0 * 2 {
            self.error(node, &join(path, "window"), "must hold at least two steps");
        }
        self.finish(f, path, &[]);
        (!a.name.is_empty() && !a.series.is_empty()).then_some(a)
    }

    /// An alert webhook: a URL, or `{url, group_wait, group_interval,
    /// repeat_interval}` (Alertmanager's defaults: 30s, 5m, 4h).
    fn alert_webhook(&mut self, node: &Node, path: &str) -> Option<AlertWebhook> {
        let mut h = AlertWebhook {
            url: String::new(),
            group_wait: Dur::secs(30),
            group_interval: Dur::secs(300),
            repeat_interval: Dur::secs(4 * 3600),
        };
        let url = match &node.kind {
            Kind::Map(_) => {
                let mut f = self.fields(node, path)?;
                for (key, slot) in [
                    ("group_wait", &mut h.group_wait),
                    ("group_interval", &mut h.group_interval),
                    ("repeat_interval", &mut h.repeat_interval),
                ] {
                    if let Some(d) = f.take(key).and_then(|n| self.duration(n, &join(path, key))) {
                        *slot = d;
                    }
                }
                let u = f.take("url").and_then(|n| self.text(n, &join(path, "url")));
                self.finish(f, path, &[]);
                u
            }
            _ => self.text(node, path),
        };
        match url {
            Some(u) if u.starts_with("http://") && u.parse::<hyper::Uri>().is_ok() => {
                h.url = u;
                Some(h)
            }
            Some(u) => {
                self.error(node, path, format!("expected an http:// URL (https needs TLS, which capstan has not yet), found {u:?}"));
                None
            }
            None => {
                self.error(node, path, "missing key: url");
                None
            }
        }
    }

    /// `x-capstan.rule_files`: globs (wildcards `*` and `?` in the file
    /// name) relative to the stack file; every file matched is read and
    /// checked as `promtool check rules` would, its problems reported here.
    fn rule_files(&mut self, node: &Node, path: &str) -> Vec<String> {
        let globs = self.string_list(node, path);
        let mut out = Vec::new();
        for (i, g) in globs.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let full = if Path::new(g).is_absolute() {
                Path::new(g).to_path_buf()
            } else {
                self.dir.join(g)
            };
            let files = crate::alerting::file::glob(&full);
            if files.is_empty() {
                self.warn(node, &p, format!("{g}: no file matches"));
            }
            for f in files {
                if let Err(problems) = crate::alerting::file::load(&f) {
                    for pr in problems {
                        self.errors.push(Diagnostic {
                            file: pr.file,
                            pos: super::yaml::Pos {
                                line: pr.line,
                                col: pr.col,
                                file: 0,
                            },
                            path: pr.path,
                            message: pr.message,
                        });
                    }
                }
                let f = f.display().to_string();
                if !out.contains(&f) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// A node as JSON, strings interpolated, for the parts read through serde.
    fn json(&mut self, node: &Node, path: &str) -> serde_json::Value {
        use serde_json::Value;
        match &node.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Int(i) => Value::from(*i),
            Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Kind::Str(_) => Value::String(self.text(node, path).unwrap_or_default()),
            Kind::Seq(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| self.json(n, &format!("{path}[{i}]")))
                    .collect(),
            ),
            Kind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| {
                        let key = k.scalar_text().unwrap_or_default();
                        let value = self.json(v, &join(path, &key));
                        (key, value)
                    })
                    .collect(),
            ),
        }
    }

    fn remote_write(&mut self, node: &Node, path: &str) -> Vec<RemoteWriteConfig> {
        let Kind::Seq(items) = &node.kind else {
            self.error(
                node,
                path,
                format!(
                    "expected a list of receivers ({{url, …}}), found {}",
                    node.describe()
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let value = self.json(item, &p);
            match serde_json::from_value::<RemoteWriteConfig>(value) {
                Err(e) => self.error(item, &p, e.to_string()),
                Ok(c) => {
                    if c.url.starts_with("https://") {
                        self.error(
                            item,
                            &join(&p, "url"),
                            format!("{}: https needs TLS, which capstan has not yet; use an http:// receiver (such as a local relay)", c.url),
                        );
                    } else if !c.url.starts_with("http://") || c.url.parse::<hyper::Uri>().is_err()
                    {
                        self.error(
                            item,
                            &join(&p, "url"),
                            format!("expected an http:// URL, found {:?}", c.url),
                        );
                    }
                    let q = &c.queue_config;
                    if q.max_shards == 0 || q.max_shards > 200 {
                        self.error(
                            item,
                            &format!("{p}.queue_config.max_shards"),
                            "must be 1 to 200",
                        );
                    }
                    if q.max_samples_per_send == 0 || q.max_samples_per_send > 100_000 {
                        self.error(
                            item,
                            &format!("{p}.queue_config.max_samples_per_send"),
                            "must be 1 to 100000",
                        );
                    }
                    for (j, r) in c.write_relabel_configs.iter().enumerate() {
                        if let Err(e) = crate::scrape::relabel::Rule::new(r.clone()) {
                            self.error(item, &format!("{p}.write_relabel_configs[{j}]"), e);
                        }
                    }
                    if c.basic_auth.is_some() && c.authorization.is_some() {
                        self.error(item, &p, "give basic_auth or authorization, not both");
                    }
                    out.push(c);
                }
            }
        }
        out
    }

    fn scrape_configs(&mut self, node: &Node, path: &str) -> Vec<ScrapeConfig> {
        let Kind::Seq(items) = &node.kind else {
            self.error(
                node,
                path,
                format!(
                    "expected a list of scrape configs, found {}",
                    node.describe()
                ),
            );
            return Vec::new();
        };
        let mut out: Vec<ScrapeConfig> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let value = self.json(item, &p);
            match serde_json::from_value::<ScrapeConfig>(value) {
                Err(e) => self.error(item, &p, e.to_string()),
                Ok(c) => {
                    if c.scheme != "http" {
                        self.error(
                            item,
                            &join(&p, "scheme"),
                            format!("only http is supported, found {:?}", c.scheme),
                        );
                    }
                    if out.iter().any(|o| o.job_name == c.job_name) {
                        self.error(
                            item,
                            &join(&p, "job_name"),
                            format!("job {:?} is defined twice", c.job_name),
                        );
                    }
                    for (j, sc) in c.static_configs.iter().enumerate() {
                        for t in &sc.targets {
                            if t.rsplit_once(':').is_none_or(|(h, port)| {
                                h.is_empty() || port.parse::<u16>().is_err()
                            }) {
                                self.error(
                                    item,
                                    &format!("{p}.static_configs[{j}].targets"),
                                    format!("expected host:port, found {t:?}"),
                                );
                            }
                        }
                    }
                    for (j, r) in c.metric_relabel_configs.iter().enumerate() {
                        if let Err(e) = crate::scrape::relabel::Rule::new(r.clone()) {
                            self.error(item, &format!("{p}.metric_relabel_configs[{j}]"), e);
                        }
                    }
                    out.push(c);
                }
            }
        }
        out
    }

    fn service(&mut self, node: &Node, path: &str) -> Option<Service> {
        let mut f = self.fields(node, path)?;
        let errors_before = self.errors.len();
        let image = self.string_opt(f.take("image"), &join(path, "image"));
        let build = f
            .take("build")
            .and_then(|n| self.build(n, &join(path, "build")));
        let volumes = match f.take("volumes") {
            Some(n) => self.volumes(n, &join(path, "volumes")),
            None => Vec::new(),
        };
        let mut container = ContainerOpts {
            user: self.string_opt(f.take("user"), &join(path, "user")),
            hostname: self.string_opt(f.take("hostname"), &join(path, "hostname")),
            init: f
                .take("init")
                .and_then(|n| self.boolean(n, &join(path, "init"))),
            read_only: f
                .take("read_only")
                .and_then(|n| self.boolean(n, &join(path, "read_only")))
                .unwrap_or(false),
            ..ContainerOpts::default()
        };
        if let Some(n) = f.take("pull_policy") {
            let pp = join(path, "pull_policy");
            match self.text(n, &pp).as_deref() {
                Some(p @ ("missing" | "always" | "never" | "build")) => {
                    container.pull_policy = Some(p.to_owned())
                }
                // compose's older spelling of `missing`.
                Some("if_not_present") => container.pull_policy = Some("missing".into()),
                Some(other) => self.error(
                    n,
                    &pp,
                    format!("expected missing, always, never or build, found {other:?}"),
                ),
                None => {}
            }
        }
        if let Some(n) = f.take("cap_add") {
            container.cap_add = self.string_list(n, &join(path, "cap_add"));
        }
        if let Some(n) = f.take("cap_drop") {
            container.cap_drop = self.string_list(n, &join(path, "cap_drop"));
        }
        if let Some(n) = f.take("extra_hosts") {
            // compose's list of `host:ip` (or `host=ip`) or a mapping.
            container.extra_hosts = match &n.kind {
                Kind::Map(_) => self
                    .key_values(n, &join(path, "extra_hosts"), false)
                    .into_iter()
                    .map(|(h, ip)| format!("{h}:{ip}"))
                    .collect(),
                _ => self
                    .string_list(n, &join(path, "extra_hosts"))
                    .into_iter()
                    .map(|e| e.replacen('=', ":", 1))
                    .collect(),
            };
        }
        self.container_keys(&mut f, path, &mut container);
        let command = f
            .take("command")
            .and_then(|n| self.cmd(n, &join(path, "command")));
        let entrypoint = f
            .take("entrypoint")
            .and_then(|n| self.cmd(n, &join(path, "entrypoint")));

        let mut environment = BTreeMap::new();
        if let Some(n) = f.take("env_file") {
            environment = self.env_files(n, &join(path, "env_file"));
        }
        if let Some(n) = f.take("environment") {
            environment.extend(self.key_values(n, &join(path, "environment"), true));
        }
        let working_dir = self
            .string_opt(f.take("working_dir"), &join(path, "working_dir"))
            .map(|d| {
                let p = Path::new(&d);
                if p.is_absolute() {
                    d
                } else {
                    self.dir.join(p).to_string_lossy().into_owned()
                }
            });
        let ports = match f.take("ports") {
            Some(n) => self.ports(n, &join(path, "ports")),
            None => Vec::new(),
        };
        let expose = match f.take("expose") {
            Some(n) => self.string_list(n, &join(path, "expose")),
            None => Vec::new(),
        };
        let xcap = f.take("x-capstan");
        let hc_node = f.take("healthcheck");
        let mut healthcheck = match hc_node {
            Some(n) => self.healthcheck(n, &join(path, "healthcheck")),
            None => None,
        };
        let healthcheck_disabled = hc_node.is_some() && healthcheck.is_none();
        let mut x = ServiceX::default();
        if let Some(xn) = xcap {
            self.service_x_capstan(xn, &join(path, "x-capstan"), &mut healthcheck, &mut x);
        }
        let depends_on = match f.take("depends_on") {
            Some(n) => self.depends_on(n, &join(path, "depends_on")),
            None => BTreeMap::new(),
        };
        let stop_signal = match f.take("stop_signal") {
            Some(n) => {
                let p = join(path, "stop_signal");
                let t = self.text(n, &p).unwrap_or_default();
                let up = t.to_ascii_uppercase();
                let full = if up.starts_with("SIG") {
                    up
                } else {
                    format!("SIG{up}")
                };
                if SIGNALS.contains(&full.as_str()) {
                    full
                } else {
                    self.error(
                        n,
                        &p,
                        format!(
                            "unknown signal {t:?}; expected one of {}",
                            SIGNALS.join(", ")
                        ),
                    );
                    "SIGTERM".into()
                }
            }
            None => "SIGTERM".into(),
        };
        let stop_grace_period = f
            .take("stop_grace_period")
            .and_then(|n| self.duration(n, &join(path, "stop_grace_period")))
            .unwrap_or(Dur::secs(10));

        let mut deploy = Deploy {
            replicas: 1,
            resources: Resources::default(),
            restart_policy: RestartPolicy::default(),
            update_config: UpdateConfig::update(),
            rollback_config: UpdateConfig::rollback(),
        };
        if let Some(n) = f.take("restart") {
            let p = join(path, "restart");
            if let Some(t) = self.text(n, &p) {
                let rp = &mut deploy.restart_policy;
                match t.as_str() {
                    "no" => rp.condition = RestartCondition::None,
                    "always" | "unless-stopped" => rp.condition = RestartCondition::Any,
                    "on-failure" => rp.condition = RestartCondition::OnFailure,
                    s if s.starts_with("on-failure:") => match s["on-failure:".len()..].parse::<u32>() {
                        Ok(max) => {
                            rp.condition = RestartCondition::OnFailure;
                            rp.max_attempts = Some(max);
                        }
                        Err(_) => self.error(n, &p, format!("expected on-failure:<count>, found {t:?}")),
                    },
                    _ => self.error(
                        n,
                        &p,
                        format!("expected one of \"no\", always, on-failure[:N], unless-stopped; found {t:?}"),
                    ),
                }
            }
        }
        // Service-level compose shorthands, overridden by deploy.resources.
        if let Some(n) = f.take("cpus") {
            deploy.resources.limits.cpus = self.cpus(n, &join(path, "cpus"));
        }
        if let Some(n) = f.take("mem_limit") {
            deploy.resources.limits.memory = self.bytes(n, &join(path, "mem_limit"));
        }
        if let Some(n) = f.take("pids_limit") {
            deploy.resources.limits.pids = self.pids(n, &join(path, "pids_limit"));
        }
        if let Some(n) = f.take("deploy") {
            self.deploy(n, &join(path, "deploy"), &mut deploy);
        }
        if let Some(a) = &x.autoscale {
            // The autoscaler owns the count: start within its bounds.
            deploy.replicas = deploy.replicas.clamp(a.min, a.max.max(a.min));
            let uses_memory = a.metrics.iter().any(|m| m.source == MetricSource::Memory);
            if uses_memory && deploy.resources.limits.memory.is_none() {
                self.error(
                    node,
                    &join(path, "x-capstan.autoscale.metrics"),
                    "a memory metric is a percentage of the memory limit: set deploy.resources.limits.memory",
                );
            }
        }
        let labels = match f.take("labels") {
            Some(n) => self.key_values(n, &join(path, "labels"), false),
            None => BTreeMap::new(),
        };
        let profiles = match f.take("profiles") {
            Some(n) => self.string_list(n, &join(path, "profiles")),
            None => Vec::new(),
        };
        let unsupported = [
            "container_name",
            "network_mode",
            "tty",
            "stdin_open",
            "logging",
            "platform",
            "extends",
            "links",
            "external_links",
            "memswap_limit",
            "cpuset",
            "ipc",
            "pid",
            "annotations",
            "attach",
            "develop",
            "scale",
        ];
        debug_assert!(unsupported.iter().all(|k| !SERVICE_KEYS.contains(k)));
        self.finish(f, path, &unsupported);
        if self.errors.len() > errors_before {
            return None;
        }
        Some(Service {
            image,
            build,
            built: None,
            volumes,
            container,
            entrypoint,
            command,
            environment,
            working_dir,
            ports,
            expose,
            healthcheck,
            healthcheck_disabled,
            depends_on,
            stop_signal,
            stop_grace_period,
            deploy,
            labels,
            profiles,
            x,
        })
    }

    /// The container-only keys passed to the engine as they are.
    fn container_keys(&mut self, f: &mut Fields<'_>, path: &str, c: &mut ContainerOpts) {
        if let Some(n) = f.take("ulimits") {
            c.ulimits = self.ulimits(n, &join(path, "ulimits"));
        }
        if let Some(n) = f.take("tmpfs") {
            c.tmpfs = self.string_or_list(n, &join(path, "tmpfs"));
            for (i, t) in c.tmpfs.clone().iter().enumerate() {
                if !t.starts_with('/') {
                    self.error(
                        n,
                        &format!("{path}.tmpfs[{i}]"),
                        format!("expected an absolute path in the container, found {t:?}"),
                    );
                }
            }
        }
        if let Some(n) = f.take("privileged") {
            c.privileged = self.boolean(n, &join(path, "privileged")).unwrap_or(false);
        }
        if let Some(n) = f.take("shm_size") {
            c.shm_size = self.bytes(n, &join(path, "shm_size"));
        }
        if let Some(n) = f.take("mem_reservation") {
            c.mem_reservation = self.bytes(n, &join(path, "mem_reservation"));
        }
        if let Some(n) = f.take("cpu_shares") {
            c.cpu_shares = self.uint(n, &join(path, "cpu_shares"), 262_144);
        }
        if let Some(n) = f.take("security_opt") {
            c.security_opt = self.string_list(n, &join(path, "security_opt"));
        }
        if let Some(n) = f.take("sysctls") {
            c.sysctls = self.key_values(n, &join(path, "sysctls"), false);
        }
        if let Some(n) = f.take("dns") {
            c.dns = self.string_or_list(n, &join(path, "dns"));
        }
        if let Some(n) = f.take("dns_search") {
            c.dns_search = self.string_or_list(n, &join(path, "dns_search"));
        }
        if let Some(n) = f.take("group_add") {
            c.group_add = self.string_list(n, &join(path, "group_add"));
        }
        if let Some(n) = f.take("devices") {
            c.devices = self.string_list(n, &join(path, "devices"));
        }
        if let Some(n) = f.take("networks") {
            c.networks = self.service_networks(n, &join(path, "networks"));
        }
        for kind in ["secrets", "configs"] {
            if let Some(n) = f.take(kind) {
                let files = self.service_files(n, &join(path, kind), kind);
                c.files.extend(files);
            }
        }
    }

    /// A string or a list of strings (compose's `dns`, `tmpfs`).
    fn string_or_list(&mut self, node: &Node, path: &str) -> Vec<String> {
        match &node.kind {
            Kind::Seq(_) => self.string_list(node, path),
            _ => self.text(node, path).into_iter().collect(),
        }
    }

    /// One limit of `ulimits`: a non-negative integer, or -1 for unlimited.
    fn ulimit(&mut self, node: &Node, path: &str) -> Option<i64> {
        match &node.kind {
            Kind::Int(-1) => Some(-1),
            _ => self.uint(node, path, i64::MAX as u64).map(|v| v as i64),
        }
    }

    /// `ulimits: {nofile: {soft: N, hard: N}, nproc: N}`.
    fn ulimits(&mut self, node: &Node, path: &str) -> BTreeMap<String, (i64, i64)> {
        let mut out = BTreeMap::new();
        let Some(f) = self.fields(node, path) else {
            return out;
        };
        for (name, _, v) in &f.entries {
            let p = join(path, name);
            if !matches!(v.kind, Kind::Map(_)) {
                if let Some(l) = self.ulimit(v, &p) {
                    out.insert(name.clone(), (l, l));
                }
                continue;
            }
            let Some(mut lf) = self.fields(v, &p) else {
                continue;
            };
            let soft = lf
                .take("soft")
                .and_then(|n| self.ulimit(n, &join(&p, "soft")));
            let hard = lf
                .take("hard")
                .and_then(|n| self.ulimit(n, &join(&p, "hard")));
            self.finish(lf, &p, &[]);
            match (soft, hard) {
                (Some(s), Some(h)) if h != -1 && (s > h || s == -1) => self.error(
                    v,
                    &p,
                    format!("the soft limit {s} is above the hard limit {h}"),
                ),
                (Some(s), Some(h)) => {
                    out.insert(name.clone(), (s, h));
                }
                _ => self.error(v, &p, "expected both soft and hard"),
            }
        }
        out
    }

    /// `services.X.networks`: a list of names, or a mapping of names to
    /// `{aliases, ipv4_address}` (or nothing).
    fn service_networks(&mut self, node: &Node, path: &str) -> Vec<NetworkAttach> {
        let mut out = Vec::new();
        if let Kind::Seq(_) = node.kind {
            for key in self.string_list(node, path) {
                out.push(NetworkAttach {
                    key,
                    ..Default::default()
                });
            }
            return out;
        }
        let Some(f) = self.fields(node, path) else {
            return out;
        };
        for (key, _, v) in &f.entries {
            let p = join(path, key);
            let mut a = NetworkAttach {
                key: key.clone(),
                ..Default::default()
            };
            if !matches!(v.kind, Kind::Null)
                && let Some(mut nf) = self.fields(v, &p)
            {
                if let Some(n) = nf.take("aliases") {
                    a.aliases = self.string_list(n, &join(&p, "aliases"));
                }
                a.ipv4_address =
                    self.string_opt(nf.take("ipv4_address"), &join(&p, "ipv4_address"));
                self.finish(
                    nf,
                    &p,
                    &[
                        "ipv6_address",
                        "priority",
                        "link_local_ips",
                        "mac_address",
                        "driver_opts",
                        "gw_priority",
                    ],
                );
            }
            out.push(a);
        }
        out
    }

    /// `services.X.secrets` / `configs`: names, or `{source, target, uid,
    /// gid, mode}`; their content is resolved from the top-level definitions
    /// once those are read.
    fn service_files(&mut self, node: &Node, path: &str, kind: &str) -> Vec<FileMount> {
        let Kind::Seq(items) = &node.kind else {
            self.error(
                node,
                path,
                format!("expected a list of {kind}, found {}", node.describe()),
            );
            return Vec::new();
        };
        let singular = kind.trim_end_matches('s');
        // compose's defaults: secrets under /run/secrets, configs at the root.
        let place = |target: &str| -> String {
            if target.starts_with('/') {
                target.to_owned()
            } else if kind == "secrets" {
                format!("/run/secrets/{target}")
            } else {
                format!("/{target}")
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let mut m = FileMount {
                kind: singular.to_owned(),
                name: String::new(),
                target: String::new(),
                source: FileSource::Content(String::new()),
                mode: None,
                uid: None,
                gid: None,
            };
            if !matches!(item.kind, Kind::Map(_)) {
                let Some(name) = self.text(item, &p) else {
                    continue;
                };
                m.target = place(&name);
                m.name = name;
                out.push(m);
                continue;
            }
            let Some(mut f) = self.fields(item, &p) else {
                continue;
            };
            let Some(source) = self.string_opt(f.take("source"), &join(&p, "source")) else {
                self.error(
                    item,
                    &join(&p, "source"),
                    format!("missing key: which {singular}"),
                );
                continue;
            };
            let target = self.string_opt(f.take("target"), &join(&p, "target"));
            m.target = place(target.as_deref().unwrap_or(&source));
            m.name = source;
            m.uid = f
                .take("uid")
                .and_then(|n| self.uint(n, &join(&p, "uid"), u32::MAX.into()))
                .map(|v| v as u32);
            m.gid = f
                .take("gid")
                .and_then(|n| self.uint(n, &join(&p, "gid"), u32::MAX.into()))
                .map(|v| v as u32);
            if let Some(n) = f.take("mode") {
                m.mode = self.file_mode(n, &join(&p, "mode"));
            }
            self.finish(f, &p, &[]);
            out.push(m);
        }
        out
    }

    /// A file mode written in octal (`0440`, `"0440"`, or `440` read as octal).
    fn file_mode(&mut self, node: &Node, path: &str) -> Option<u32> {
        let text = match &node.kind {
            Kind::Int(i) => i.to_string(),
            _ => self.text(node, path)?,
        };
        match u32::from_str_radix(text.trim().trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o7777 => Some(m),
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected an octal file mode such as 0440, found {text:?}"),
                );
                None
            }
        }
    }

    /// The top-level `networks:`.
    fn network_defs(&mut self, node: &Node, path: &str) -> BTreeMap<String, NetworkDef> {
        let mut out = BTreeMap::new();
        let Some(f) = self.fields(node, path) else {
            return out;
        };
        for (key, _, v) in &f.entries {
            let p = join(path, key);
            let mut d = NetworkDef::default();
            if !matches!(v.kind, Kind::Null)
                && let Some(mut nf) = self.fields(v, &p)
            {
                d.name = self.string_opt(nf.take("name"), &join(&p, "name"));
                if let Some(n) = nf.take("external") {
                    let ep = join(&p, "external");
                    d.external = if let Kind::Map(_) = n.kind {
                        // The older `external: {name: X}` form.
                        if let Some(mut ef) = self.fields(n, &ep) {
                            d.name = self.string_opt(ef.take("name"), &join(&ep, "name"));
                        }
                        true
                    } else {
                        self.boolean(n, &ep).unwrap_or(false)
                    };
                }
                if let Some(n) = nf.take("internal") {
                    d.internal = self.boolean(n, &join(&p, "internal")).unwrap_or(false);
                }
                d.driver = self.string_opt(nf.take("driver"), &join(&p, "driver"));
                if let Some(n) = nf.take("driver_opts") {
                    d.driver_opts = self.key_values(n, &join(&p, "driver_opts"), false);
                }
                if let Some(n) = nf.take("labels") {
                    d.labels = self.key_values(n, &join(&p, "labels"), false);
                }
                self.finish(nf, &p, &["ipam", "attachable", "enable_ipv6"]);
            }
            out.insert(key.clone(), d);
        }
        out
    }

    /// The top-level `secrets:` or `configs:`: where each one's content comes from.
    fn file_defs(&mut self, node: &Node, path: &str) -> BTreeMap<String, FileSource> {
        let mut out = BTreeMap::new();
        let Some(f) = self.fields(node, path) else {
            return out;
        };
        for (key, _, v) in &f.entries {
            let p = join(path, key);
            let Some(mut ff) = self.fields(v, &p) else {
                continue;
            };
            let source = match (ff.take("file"), ff.take("content"), ff.take("environment")) {
                (Some(n), None, None) => self.text(n, &join(&p, "file")).map(|t| {
                    let path = Path::new(&t);
                    FileSource::File(if path.is_absolute() {
                        t
                    } else {
                        let joined: std::path::PathBuf = self.dir.join(path).components().collect();
                        joined.to_string_lossy().into_owned()
                    })
                }),
                (None, Some(n), None) => {
                    self.text(n, &join(&p, "content")).map(FileSource::Content)
                }
                (None, None, Some(n)) => {
                    let ep = join(&p, "environment");
                    let var = self.text(n, &ep).unwrap_or_default();
                    let val = self.vars.get(&var).map(str::to_owned);
                    if val.is_none() {
                        self.error(
                            n,
                            &ep,
                            format!("the environment variable {var:?} is not set"),
                        );
                    }
                    val.map(FileSource::Content)
                }
                (None, None, None) => {
                    let why = if ff.take("external").is_some() {
                        "external secrets and configs live in Swarm; give a file, content or environment"
                    } else {
                        "missing key: file, content or environment"
                    };
                    self.error(v, &p, why);
                    None
                }
                _ => {
                    self.error(v, &p, "give only one of file, content and environment");
                    None
                }
            };
            self.finish(
                ff,
                &p,
                &[
                    "name",
                    "external",
                    "labels",
                    "template_driver",
                    "driver",
                    "driver_opts",
                ],
            );
            if let Some(s) = source {
                out.insert(key.clone(), s);
            }
        }
        out
    }

    fn env_files(&mut self, node: &Node, path: &str) -> BTreeMap<String, String> {
        let items: Vec<(Node, String)> = match &node.kind {
            Kind::Str(_) => vec![(node.clone(), path.to_owned())],
            Kind::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), format!("{path}[{i}]")))
                .collect(),
            _ => {
                self.error(
                    node,
                    path,
                    format!(
                        "expected a path or a list of paths, found {}",
                        node.describe()
                    ),
                );
                return BTreeMap::new();
            }
        };
        let mut out = BTreeMap::new();
        for (item, p) in items {
            let (file, required) = match &item.kind {
                Kind::Map(_) => {
                    let Some(mut f) = self.fields(&item, &p) else {
                        continue;
                    };
                    let file = f.take("path").and_then(|n| self.text(n, &join(&p, "path")));
                    let required = f
                        .take("required")
                        .and_then(|n| self.boolean(n, &join(&p, "required")));
                    self.finish(f, &p, &["format"]);
                    let Some(file) = file else {
                        self.error(&item, &p, "missing key: path");
                        continue;
                    };
                    (file, required.unwrap_or(true))
                }
                _ => match self.text(&item, &p) {
                    Some(t) => (t, true),
                    None => continue,
                },
            };
            let full = self.dir.join(&file);
            match std::fs::read_to_string(&full) {
                Ok(text) => match interp::parse_env_file(&text) {
                    Ok(vars) => out.extend(vars),
                    Err((line, msg)) => {
                        self.error(&item, &p, format!("{}:{line}: {msg}", full.display()));
                    }
                },
                Err(_) if !required => {}
                Err(e) => self.error(
                    &item,
                    &p,
                    format!("cannot read env file {}: {e}", full.display()),
                ),
            }
        }
        out
    }

    fn ports(&mut self, node: &Node, path: &str) -> Vec<Port> {
        let Kind::Seq(items) = &node.kind else {
            self.error(
                node,
                path,
                format!("expected a list of ports, found {}", node.describe()),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let port = match &item.kind {
                Kind::Map(_) => self.port_long(item, &p),
                _ => self
                    .text(item, &p)
                    .and_then(|t| match parse_port_short(&t) {
                        Ok(port) => Some(port),
                        Err(e) => {
                            self.error(item, &p, e);
                            None
                        }
                    }),
            };
            out.extend(port);
        }
        out
    }

    fn port_long(&mut self, node: &Node, path: &str) -> Option<Port> {
        let mut f = self.fields(node, path)?;
        let target = self.string_opt(f.take("target"), &join(path, "target"));
        let published = match f.take("published") {
            Some(n) => self
                .uint(n, &join(path, "published"), 65535)
                .map(|v| v as u16),
            None => None,
        };
        let host_ip = self.string_opt(f.take("host_ip"), &join(path, "host_ip"));
        let protocol = self
            .string_opt(f.take("protocol"), &join(path, "protocol"))
            .unwrap_or_else(|| "tcp".into());
        let app_protocol = self.string_opt(f.take("app_protocol"), &join(path, "app_protocol"));
        self.finish(f, path, &["mode", "name"]);
        let published = match (published, &target) {
            (Some(p), _) if p > 0 => p,
            (_, Some(t)) => match t.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    self.error(
                        node,
                        path,
                        "missing key: published (the host port to listen on)",
                    );
                    return None;
                }
            },
            _ => {
                self.error(
                    node,
                    path,
                    "missing key: published (the host port to listen on)",
                );
                return None;
            }
        };
        if protocol != "tcp" && protocol != "udp" {
            self.error(
                node,
                &join(path, "protocol"),
                format!("expected tcp or udp, found {protocol:?}"),
            );
            return None;
        }
        Some(Port {
            host_ip,
            published,
            target,
            protocol,
            app_protocol,
        })
    }

    fn healthcheck(&mut self, node: &Node, path: &str) -> Option<Healthcheck> {
        let mut f = self.fields(node, path)?;
        let mut hc = Healthcheck::compose_defaults();
        let mut disabled = false;
        let mut has_test = false;
        let test_given = f.entries.iter().any(|(k, _, _)| k == "test");
        if let Some(n) = f.take("test") {
            let p = join(path, "test");
            match &n.kind {
                Kind::Str(_) => {
                    has_test = true;
                    hc.test = HealthTest::Shell(self.text(n, &p).unwrap_or_default());
                }
                Kind::Seq(_) => {
                    let list = self.string_list(n, &p);
                    match list.first().map(String::as_str) {
                        Some("NONE") => disabled = true,
                        Some("CMD") if list.len() > 1 => {
                            has_test = true;
                            hc.test = HealthTest::Cmd(list[1..].to_vec());
                        }
                        Some("CMD-SHELL") if list.len() == 2 => {
                            has_test = true;
                            hc.test = HealthTest::Shell(list[1].clone());
                        }
                        _ => self.error(
                            n,
                            &p,
                            "expected [\"CMD\", args…], [\"CMD-SHELL\", \"command\"] or [\"NONE\"]",
                        ),
                    }
                }
                _ => self.error(
                    n,
                    &p,
                    format!("expected a string or a list, found {}", n.describe()),
                ),
            }
        }
        if let Some(n) = f.take("disable") {
            disabled |= self.boolean(n, &join(path, "disable")).unwrap_or(false);
        }
        self.healthcheck_timing(&mut f, path, &mut hc);
        self.finish(f, path, &[]);
        if disabled {
            return None;
        }
        if !has_test && !test_given {
            self.error(
                node,
                path,
                "missing key: test (or x-capstan.healthcheck with http or tcp)",
            );
            return None;
        }
        Some(hc)
    }

    /// Per-service `x-capstan`: HTTP and TCP health checks, with compose timing keys.
    fn service_x_capstan(
        &mut self,
        node: &Node,
        path: &str,
        hc: &mut Option<Healthcheck>,
        x: &mut ServiceX,
    ) {
        let Some(mut f) = self.fields(node, path) else {
            return;
        };
        if let Some(n) = f.take("healthcheck") {
            let hp = join(path, "healthcheck");
            if let Some(mut h) = self.fields(n, &hp) {
                let port = h
                    .take("port")
                    .and_then(|p| self.uint(p, &join(&hp, "port"), 65535))
                    .map(|p| p as u16);
                let test = if let Some(http) = h.take("http") {
                    self.text(http, &join(&hp, "http")).map(|mut path| {
                        if !path.starts_with('/') {
                            path.insert(0, '/');
                        }
                        HealthTest::Http { path, port }
                    })
                } else if let Some(tcp) = h.take("tcp") {
                    match &tcp.kind {
                        Kind::Bool(true) => Some(HealthTest::Tcp { port }),
                        _ => self
                            .uint(tcp, &join(&hp, "tcp"), 65535)
                            .map(|p| HealthTest::Tcp {
                                port: Some(p as u16),
                            }),
                    }
                } else {
                    self.error(n, &hp, "expected http: <path> or tcp: true|<port>");
                    None
                };
                let mut out = hc.clone().unwrap_or(Healthcheck::compose_defaults());
                self.healthcheck_timing(&mut h, &hp, &mut out);
                self.finish(h, &hp, &[]);
                if let Some(test) = test {
                    out.test = test;
                    *hc = Some(out);
                }
            }
        }
        if let Some(n) = f.take("metrics") {
            let mp = join(path, "metrics");
            if let Some(mut mf) = self.fields(n, &mp) {
                let m = &mut x.metrics;
                if let Some(p) = self.string_opt(mf.take("path"), &join(&mp, "path")) {
                    m.path = if p.starts_with('/') {
                        p
                    } else {
                        format!("/{p}")
                    };
                }
                if let Some(p) = mf.take("port") {
                    m.port = self.uint(p, &join(&mp, "port"), 65535).map(|p| p as u16);
                }
                if let Some(i) = mf.take("interval") {
                    m.interval = self.scrape_interval(i, &join(&mp, "interval"));
                }
                if let Some(d) = mf.take("disable") {
                    m.disable = self.boolean(d, &join(&mp, "disable")).unwrap_or(false);
                }
                self.finish(mf, &mp, &[]);
            }
        }
        if let Some(n) = f.take("protocol") {
            let pp = join(path, "protocol");
            match self.text(n, &pp).as_deref() {
                Some("http") => x.protocol = Protocol::Http,
                Some("tcp") => x.protocol = Protocol::Tcp,
                Some("h2c" | "grpc") => x.protocol = Protocol::H2c,
                Some(other) => self.error(
                    n,
                    &pp,
                    format!("expected http, h2c (or grpc) or tcp, found {other:?}"),
                ),
                None => {}
            }
        }
        if let Some(n) = f.take("cold_start_timeout")
            && let Some(d) = self.duration(n, &join(path, "cold_start_timeout"))
        {
            x.cold_start_timeout = d;
        }
        if let Some(n) = f.take("driver") {
            let dp = join(path, "driver");
            match self.text(n, &dp).as_deref() {
                Some("process") => x.driver = Some(DriverKind::Process),
                Some("container") => x.driver = Some(DriverKind::Container),
                Some(other) => self.error(
                    n,
                    &dp,
                    format!("expected process or container, found {other:?}"),
                ),
                None => {}
            }
        }
        if let Some(n) = f.take("proxy") {
            self.proxy_settings(n, &join(path, "proxy"), &mut x.proxy);
        }
        if let Some(n) = f.take("autoscale") {
            x.autoscale = self.autoscale(n, &join(path, "autoscale"));
        }
        if let Some(n) = f.take("idle_after") {
            let p = join(path, "idle_after");
            if let Some(d) = self.duration(n, &p) {
                match &mut x.autoscale {
                    Some(a) => a.idle_after = d,
                    None => self.error(n, &p, "idle_after needs autoscale with min: 0"),
                }
            }
        }
        if let Some(n) = f.take("rollout") {
            self.rollout(n, &join(path, "rollout"), x);
        }
        self.finish(f, path, &[]);
    }

    /// A positive finite number (`percent`: a trailing `%` is allowed); the error
    /// says `expected {what}`.
    fn number(&mut self, node: &Node, path: &str, percent: bool, what: &str) -> Option<f64> {
        let v = match &node.kind {
            Kind::Int(i) => Some(*i as f64),
            Kind::Float(f) => Some(*f),
            Kind::Str(_) => self.text(node, path).and_then(|t| {
                let t = t.trim();
                let t = if percent {
                    t.strip_suffix('%').unwrap_or(t)
                } else {
                    t
                };
                t.trim().parse::<f64>().ok()
            }),
            _ => None,
        };
        match v {
            Some(v) if v > 0.0 && v.is_finite() => Some(v),
            _ => {
                self.error(
                    node,
                    path,
                    format!("expected {what}, found {}", node.describe()),
                );
                None
            }
        }
    }

    /// `x-capstan.autoscale`, with Kubernetes' names for the behavior keys
    /// (`scaleUp`, `stabilizationWindowSeconds`, …) or their snake_case forms.
    fn autoscale(&mut self, node: &Node, path: &str) -> Option<Autoscale> {
        let mut f = self.fields(node, path)?;
        let mut a = Autoscale {
            min: 1,
            max: 1,
            interval: Dur::millis(500),
            tolerance: 0.1,
            metrics: Vec::new(),
            behavior: Behavior::default(),
            idle_after: Dur::secs(300),
        };
        let int = |d: &mut Self, f: &mut Fields<'_>, keys: [&str; 2]| {
            keys.iter().find_map(|k| {
                f.take(k)
                    .and_then(|n| d.uint(n, &join(path, k), 10_000).map(|v| v as u32))
            })
        };
        if let Some(v) = int(self, &mut f, ["min", "minReplicas"]) {
            a.min = v;
        }
        match int(self, &mut f, ["max", "maxReplicas"]) {
            Some(v) => a.max = v,
            None => self.error(node, path, "missing key: max (the most replicas)"),
        }
        if a.max == 0 {
            self.error(node, &join(path, "max"), "max must be at least 1");
        } else if a.min > a.max {
            self.error(
                node,
                &join(path, "min"),
                format!("min ({}) is more than max ({})", a.min, a.max),
            );
        }
        if let Some(n) = f.take("interval")
            && let Some(d) = self.duration(n, &join(path, "interval"))
        {
            if d.0 < std::time::Duration::from_millis(100) {
                self.error(n, &join(path, "interval"), "must be at least 100ms");
            } else {
                a.interval = d;
            }
        }
        if let Some(n) = f.take("tolerance") {
            let p = join(path, "tolerance");
            let v = match &n.kind {
                Kind::Int(i) => Some(*i as f64),
                Kind::Float(x) => Some(*x),
                _ => self.text(n, &p).and_then(|t| t.trim().parse().ok()),
            };
            match v {
                Some(v) if (0.0..1.0).contains(&v) => a.tolerance = v,
                _ => self.error(
                    n,
                    &p,
                    format!(
                        "expected a number from 0 to 1 such as 0.1, found {}",
                        n.describe()
                    ),
                ),
            }
        }
        if let Some(n) = f.take("idle_after")
            && let Some(d) = self.duration(n, &join(path, "idle_after"))
        {
            a.idle_after = d;
        }
        if let Some(n) = f.take("metrics") {
            let mp = join(path, "metrics");
            match &n.kind {
                Kind::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(m) = self.scale_metric(item, &format!("{mp}[{i}]")) {
                            a.metrics.push(m);
                        }
                    }
                }
                _ => self.error(
                    n,
                    &mp,
                    format!("expected a list of metrics, found {}", n.describe()),
                ),
            }
        }
        if let Some(n) = f.take("behavior") {
            let bp = join(path, "behavior");
            if let Some(mut bf) = self.fields(n, &bp) {
                for (keys, up) in [
                    (["scaleUp", "scale_up"], true),
                    (["scaleDown", "scale_down"], false),
                ] {
                    for k in keys {
                        if let Some(rn) = bf.take(k) {
                            let rules = if up {
                                &mut a.behavior.scale_up
                            } else {
                                &mut a.behavior.scale_down
                            };
                            self.scaling_rules(rn, &join(&bp, k), rules);
                        }
                    }
                }
                self.finish(bf, &bp, &[]);
            }
        }
        self.finish(f, path, &[]);
        Some(a)
    }

    fn scale_metric(&mut self, node: &Node, path: &str) -> Option<ScaleMetric> {
        let mut f = self.fields(node, path)?;
        let mut found: Option<(MetricSource, Option<f64>)> = None;
        for key in ["cpu", "memory", "rps", "inflight", "query"] {
            let Some(n) = f.take(key) else { continue };
            let p = join(path, key);
            if found.is_some() {
                self.error(n, &p, "one metric per list item");
                continue;
            }
            found = Some(match key {
                "cpu" => (MetricSource::Cpu, self.number(n, &p, true, PERCENT)),
                "memory" => (MetricSource::Memory, self.number(n, &p, true, PERCENT)),
                "rps" => (
                    MetricSource::Rps,
                    self.number(n, &p, false, "a positive number"),
                ),
                "inflight" => (
                    MetricSource::Inflight,
                    self.number(n, &p, false, "a positive number"),
                ),
                _ => {
                    let q = self.text(n, &p).unwrap_or_default();
                    if let Err(e) = capstan_promql::parse(&q) {
                        self.error(n, &p, format!("not a valid PromQL expression: {e}"));
                    }
                    (MetricSource::Query(q), None)
                }
            });
        }
        let target = match f.take("target") {
            Some(n) => self.number(n, &join(path, "target"), false, "a positive number"),
            None => None,
        };
        let average = match f.take("type") {
            Some(n) => match self.text(n, &join(path, "type")).as_deref() {
                Some("average" | "AverageValue") | None => true,
                Some("total" | "Value") => false,
                Some(other) => {
                    self.error(
                        n,
                        &join(path, "type"),
                        format!("expected average or total, found {other:?}"),
                    );
                    true
                }
            },
            None => true,
        };
        self.finish(f, path, &[]);
        let Some((source, inline)) = found else {
            self.error(
                node,
                path,
                "expected one of cpu, memory, rps, inflight or query",
            );
            return None;
        };
        let target = match (&source, inline, target) {
            (MetricSource::Query(_), _, Some(t)) => t,
            (MetricSource::Query(_), _, None) => {
                self.error(node, path, "a query metric needs target: <value>");
                return None;
            }
            (_, Some(t), _) => t,
            _ => return None,
        };
        Some(ScaleMetric {
            source,
            target,
            average,
        })
    }

    fn scaling_rules(&mut self, node: &Node, path: &str, r: &mut ScalingRules) {
        let Some(mut f) = self.fields(node, path) else {
            return;
        };
        for k in ["stabilizationWindowSeconds", "stabilization_window_seconds"] {
            if let Some(n) = f.take(k)
                && let Some(v) = self.uint(n, &join(path, k), 3600)
            {
                r.stabilization = Dur::secs(v);
            }
        }
        for k in ["selectPolicy", "select_policy"] {
            if let Some(n) = f.take(k) {
                match self.text(n, &join(path, k)).as_deref() {
                    Some("Max" | "max") => r.select = SelectPolicy::Max,
                    Some("Min" | "min") => r.select = SelectPolicy::Min,
                    Some("Disabled" | "disabled") => r.select = SelectPolicy::Disabled,
                    Some(other) => self.error(
                        n,
                        &join(path, k),
                        format!("expected Max, Min or Disabled, found {other:?}"),
                    ),
                    None => {}
                }
            }
        }
        if let Some(n) = f.take("policies") {
            let pp = join(path, "policies");
            let Kind::Seq(items) = &n.kind else {
                self.error(
                    n,
                    &pp,
                    format!("expected a list of policies, found {}", n.describe()),
                );
                self.finish(f, path, &[]);
                return;
            };
            r.policies.clear();
            for (i, item) in items.iter().enumerate() {
                let ip = format!("{pp}[{i}]");
                let Some(mut pf) = self.fields(item, &ip) else {
                    continue;
                };
                let kind = match pf
                    .take("type")
                    .and_then(|t| self.text(t, &join(&ip, "type")))
                    .as_deref()
                {
                    Some("Pods" | "pods") => Some(PolicyKind::Pods),
                    Some("Percent" | "percent") => Some(PolicyKind::Percent),
                    other => {
                        self.error(
                            item,
                            &join(&ip, "type"),
                            format!("expected Pods or Percent, found {other:?}"),
                        );
                        None
                    }
                };
                let value = pf
                    .take("value")
                    .and_then(|v| self.uint(v, &join(&ip, "value"), 100_000));
                let mut period = None;
                for k in ["periodSeconds", "period_seconds"] {
                    if let Some(v) = pf.take(k) {
                        period = self.uint(v, &join(&ip, k), 1800);
                    }
                }
                self.finish(pf, &ip, &[]);
                match (kind, value, period) {
                    (Some(kind), Some(value), Some(p)) if value > 0 && p > 0 => {
                        r.policies.push(ScalingPolicy {
                            kind,
                            value: value as u32,
                            period: Dur::secs(p),
                        })
                    }
                    (Some(_), _, _) => self.error(
                        item,
                        &ip,
                        "a policy needs type, value > 0 and periodSeconds > 0",
                    ),
                    _ => {}
                }
            }
        }
        self.finish(f, path, &[]);
    }

    /// `x-capstan.proxy`: balancing, timeouts, retries, limits.
    fn proxy_settings(&mut self, node: &Node, path: &str, p: &mut ProxySettings) {
        let Some(mut f) = self.fields(node, path) else {
            return;
        };
        if let Some(n) = f.take("balance") {
            let bp = join(path, "balance");
            match self.text(n, &bp).as_deref() {
                Some("p2c" | "least_request" | "ewma") => p.balance = Balance::P2c,
                Some("round_robin" | "round-robin") => p.balance = Balance::RoundRobin,
                Some(other) => self.error(
                    n,
                    &bp,
                    format!("expected p2c or round_robin, found {other:?}"),
                ),
                None => {}
            }
        }
        for (key, slot) in [
            ("timeout", &mut p.timeout),
            ("connect_timeout", &mut p.connect_timeout),
            ("idle_timeout", &mut p.idle_timeout),
        ] {
            if let Some(n) = f.take(key)
                && let Some(d) = self.duration(n, &join(path, key))
            {
                if d.0.is_zero() {
                    self.error(n, &join(path, key), "must be more than 0s");
                } else {
                    *slot = d;
                }
            }
        }
        for (key, slot, max) in [
            ("retries", &mut p.retries, 10u64),
            ("max_inflight", &mut p.max_inflight, 1_000_000),
            ("queue", &mut p.queue, 1_000_000),
            ("eject_after", &mut p.eject_after, 1_000_000),
        ] {
            if let Some(n) = f.take(key)
                && let Some(v) = self.uint(n, &join(path, key), max)
            {
                *slot = v as u32;
            }
        }
        for (key, slot, min) in [
            ("max_body", &mut p.max_body, 0u64),
            ("max_header", &mut p.max_header, 8192),
        ] {
            if let Some(n) = f.take(key)
                && let Some(v) = self.bytes(n, &join(path, key))
            {
                if v < min {
                    self.error(n, &join(path, key), format!("must be at least {min} bytes"));
                } else {
                    *slot = v;
                }
            }
        }
        if let Some(n) = f.take("access_log")
            && let Some(b) = self.boolean(n, &join(path, "access_log"))
        {
            p.access_log = b;
        }
        if let Some(n) = f.take("traces") {
            let tp = join(path, "traces");
            let what = "true, false or a sampling ratio from 0 to 1 (or 0% to 100%)";
            let ratio = match &n.kind {
                Kind::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
                Kind::Int(i) => Some(*i as f64),
                Kind::Float(f) => Some(*f),
                Kind::Str(_) => self.text(n, &tp).and_then(|t| match t.trim() {
                    "true" => Some(1.0),
                    "false" => Some(0.0),
                    t => match t.strip_suffix('%') {
                        Some(pc) => pc.trim().parse::<f64>().ok().map(|v| v / 100.0),
                        None => t.parse::<f64>().ok(),
                    },
                }),
                _ => None,
            };
            match ratio {
                Some(r) if (0.0..=1.0).contains(&r) => p.traces = r,
                _ => self.error(n, &tp, format!("expected {what}, found {}", n.describe())),
            }
        }
        self.finish(f, path, &[]);
    }

    /// `interval`, `timeout`, `start_period`, `start_interval` and `retries` of a
    /// health check (compose's keys, also under `x-capstan.healthcheck`).
    fn healthcheck_timing(&mut self, f: &mut Fields<'_>, path: &str, hc: &mut Healthcheck) {
        for (key, slot) in [
            ("interval", &mut hc.interval),
            ("timeout", &mut hc.timeout),
            ("start_period", &mut hc.start_period),
            ("start_interval", &mut hc.start_interval),
        ] {
            if let Some(n) = f.take(key)
                && let Some(d) = self.duration(n, &join(path, key))
            {
                *slot = d;
            }
        }
        if let Some(n) = f.take("retries") {
            hc.retries = self
                .uint(n, &join(path, "retries"), u32::MAX as u64)
                .unwrap_or(3) as u32;
        }
    }

    /// A scrape interval: a duration of at least 1s.
    fn scrape_interval(&mut self, node: &Node, path: &str) -> Option<Dur> {
        let d = self.duration(node, path)?;
        if d.0 < std::time::Duration::from_secs(1) {
            self.error(
                node,
                path,
                format!("the scrape interval must be at least 1s, found {d}"),
            );
        }
        Some(d)
    }

    fn depends_on(&mut self, node: &Node, path: &str) -> BTreeMap<String, Dependency> {
        let mut out = BTreeMap::new();
        match &node.kind {
            Kind::Seq(_) => {
                for name in self.string_list(node, path) {
                    out.insert(
                        name,
                        Dependency {
                            condition: Condition::ServiceStarted,
                            required: true,
                        },
                    );
                }
            }
            Kind::Map(_) => {
                let Some(f) = self.fields(node, path) else {
                    return out;
                };
                for (name, _, v) in &f.entries {
                    let p = join(path, name);
                    let mut dep = Dependency {
                        condition: Condition::ServiceStarted,
                        required: true,
                    };
                    if !matches!(v.kind, Kind::Null)
                        && let Some(mut df) = self.fields(v, &p)
                    {
                        if let Some(c) = df.take("condition") {
                            let cp = join(&p, "condition");
                            match self.text(c, &cp).as_deref() {
                                Some("service_started") => dep.condition = Condition::ServiceStarted,
                                Some("service_healthy") => dep.condition = Condition::ServiceHealthy,
                                Some("service_completed_successfully") => {
                                    dep.condition = Condition::ServiceCompletedSuccessfully
                                }
                                Some(other) => self.error(
                                    c,
                                    &cp,
                                    format!(
                                        "expected service_started, service_healthy or service_completed_successfully, found {other:?}"
                                    ),
                                ),
                                None => {}
                            }
                        }
                        if let Some(r) = df.take("required") {
                            dep.required = self.boolean(r, &join(&p, "required")).unwrap_or(true);
                        }
                        self.finish(df, &p, &["restart"]);
                    }
                    out.insert(name.clone(), dep);
                }
            }
            _ => self.error(
                node,
                path,
                format!(
                    "expected a list or a mapping of services, found {}",
                    node.describe()
                ),
            ),
        }
        out
    }

    fn cpus(&mut self, node: &Node, path: &str) -> Option<f64> {
        self.number(node, path, false, "a positive number of CPUs such as 0.5")
    }

    fn bytes(&mut self, node: &Node, path: &str) -> Option<u64> {
        let text = self.text(node, path)?;
        match parse_bytes(&text) {
            Ok(0) => {
                self.error(node, path, "a size must be greater than zero");
                None
            }
            Ok(b) => Some(b),
            Err(e) => {
                self.error(node, path, e);
                None
            }
        }
    }

    fn pids(&mut self, node: &Node, path: &str) -> Option<i64> {
        let v = match &node.kind {
            Kind::Int(i) => Some(*i),
            Kind::Str(_) => self
                .text(node, path)
                .and_then(|t| t.trim().parse::<i64>().ok()),
            _ => None,
        };
        match v {
            Some(-1) => None,
            Some(v) if v > 0 => Some(v),
            _ => {
                self.error(
                    node,
                    path,
                    format!(
                        "expected a positive integer or -1, found {}",
                        node.describe()
                    ),
                );
                None
            }
        }
    }

    fn deploy(&mut self, node: &Node, path: &str, deploy: &mut Deploy) {
        let Some(mut f) = self.fields(node, path) else {
            return;
        };
        if let Some(n) = f.take("replicas") {
            deploy.replicas = self.uint(n, &join(path, "replicas"), 10_000).unwrap_or(1) as u32;
        }
        if let Some(n) = f.take("resources") {
            let rp = join(path, "resources");
            if let Some(mut rf) = self.fields(n, &rp) {
                if let Some(l) = rf.take("limits") {
                    let lp = join(&rp, "limits");
                    if let Some(mut lf) = self.fields(l, &lp) {
                        if let Some(c) = lf.take("cpus") {
                            deploy.resources.limits.cpus = self.cpus(c, &join(&lp, "cpus"));
                        }
                        if let Some(m) = lf.take("memory") {
                            deploy.resources.limits.memory = self.bytes(m, &join(&lp, "memory"));
                        }
                        if let Some(p) = lf.take("pids") {
                            deploy.resources.limits.pids = self.pids(p, &join(&lp, "pids"));
                        }
                        self.finish(lf, &lp, &["devices"]);
                    }
                }
                self.finish(rf, &rp, &["reservations"]);
            }
        }
        if let Some(n) = f.take("restart_policy") {
            let rp = join(path, "restart_policy");
            if let Some(mut rf) = self.fields(n, &rp) {
                let policy = &mut deploy.restart_policy;
                // Swarm's default when a restart_policy is given is `any`.
                policy.condition = RestartCondition::Any;
                if let Some(c) = rf.take("condition") {
                    let cp = join(&rp, "condition");
                    match self.text(c, &cp).as_deref() {
                        Some("none") => policy.condition = RestartCondition::None,
                        Some("on-failure") => policy.condition = RestartCondition::OnFailure,
                        Some("any") => policy.condition = RestartCondition::Any,
                        Some(o) => self.error(
                            c,
                            &cp,
                            format!("expected none, on-failure or any, found {o:?}"),
                        ),
                        None => {}
                    }
                }
                if let Some(d) = rf
                    .take("delay")
                    .and_then(|d| self.duration(d, &join(&rp, "delay")))
                {
                    deploy.restart_policy.delay = d;
                }
                if let Some(m) = rf.take("max_attempts") {
                    deploy.restart_policy.max_attempts = self
                        .uint(m, &join(&rp, "max_attempts"), u32::MAX as u64)
                        .map(|v| v as u32);
                }
                if let Some(w) = rf
                    .take("window")
                    .and_then(|w| self.duration(w, &join(&rp, "window")))
                {
                    deploy.restart_policy.window = w;
                }
                self.finish(rf, &rp, &[]);
            }
        }
        for (key, slot) in [
            ("update_config", &mut deploy.update_config),
            ("rollback_config", &mut deploy.rollback_config),
        ] {
            if let Some(n) = f.take(key) {
                self.update_config(n, &join(path, key), slot);
            }
        }
        self.finish(f, path, &["mode", "placement", "endpoint_mode", "labels"]);
    }

    /// `update_config` / `rollback_config`: Swarm's keys.
    fn update_config(&mut self, node: &Node, path: &str, c: &mut UpdateConfig) {
        let Some(mut f) = self.fields(node, path) else {
            return;
        };
        if let Some(n) = f.take("parallelism") {
            c.parallelism = self
                .uint(n, &join(path, "parallelism"), 1_000_000)
                .map_or(c.parallelism, |v| v as u32);
        }
        for (key, slot) in [("delay", &mut c.delay), ("monitor", &mut c.monitor)] {
            if let Some(d) = f.take(key).and_then(|n| self.duration(n, &join(path, key))) {
                *slot = d;
            }
        }
        if let Some(n) = f.take("order") {
            let p = join(path, "order");
            match self.text(n, &p).as_deref() {
                Some("start-first") => c.order = Some(UpdateOrder::StartFirst),
                Some("stop-first") => c.order = Some(UpdateOrder::StopFirst),
                Some(o) => self.error(
                    n,
                    &p,
                    format!("expected start-first or stop-first, found {o:?}"),
                ),
                None => {}
            }
        }
        if let Some(n) = f.take("failure_action") {
            let p = join(path, "failure_action");
            match self.text(n, &p).as_deref() {
                Some("rollback") => c.failure_action = FailureAction::Rollback,
                Some("pause") => c.failure_action = FailureAction::Pause,
                Some("continue") => c.failure_action = FailureAction::Continue,
                Some(o) => self.error(
                    n,
                    &p,
                    format!("expected rollback, pause or continue, found {o:?}"),
                ),
                None => {}
            }
        }
        if let Some(n) = f.take("max_failure_ratio") {
            let p = join(path, "max_failure_ratio");
            let r = match &n.kind {
                Kind::Int(i) => Some(*i as f64),
                Kind::Float(x) => Some(*x),
                Kind::Str(_) => self.text(n, &p).and_then(|t| t.trim().parse::<f64>().ok()),
                _ => None,
            };
            match r {
                Some(r) if (0.0..=1.0).contains(&r) => c.max_failure_ratio = r,
                _ => self.error(
                    n,
                    &p,
                    format!("expected a ratio from 0 to 1, found {}", n.describe()),
                ),
            }
        }
        self.finish(f, path, &[]);
    }

    /// Checks across services: dependencies exist and form no cycle, published
    /// ports are unique, every service has something to run.
    fn cross_checks(&mut self, services: &BTreeMap<String, (Service, Node)>) {
        let mut ports: BTreeMap<(u16, String), String> = BTreeMap::new();
        for (name, (svc, knode)) in services {
            let path = join("services", name);
            for dep in svc.depends_on.keys() {
                if !services.contains_key(dep) {
                    self.error(
                        knode,
                        &join(&join(&path, "depends_on"), dep),
                        format!("depends on undefined service {dep:?}"),
                    );
                }
            }
            match (svc.driver(), &svc.image) {
                (DriverKind::Process, _) if svc.argv().is_none() => {
                    self.error(knode, &path, "nothing to run: set command (or entrypoint)");
                }
                (DriverKind::Container, None) if svc.build.is_none() => self.error(
                    knode,
                    &join(&join(&path, "x-capstan"), "driver"),
                    "the container driver needs an image (or a build)",
                ),
                _ => {}
            }
            for p in &svc.ports {
                if p.protocol == "udp" && svc.driver() == DriverKind::Process {
                    self.error(
                        knode,
                        &join(&path, "ports"),
                        format!(
                            "port {}/udp: UDP ports are published by the container engine; this service runs as processes",
                            p.published
                        ),
                    );
                }
                if let Some(other) = ports.insert((p.published, p.protocol.clone()), name.clone())
                    && other != *name
                {
                    self.error(
                        knode,
                        &join(&path, "ports"),
                        format!(
                            "port {} is already published by service {other:?}",
                            p.published
                        ),
                    );
                }
            }
        }
        // Cycle detection by depth-first search over depends_on.
        let mut state: BTreeMap<&str, u8> = BTreeMap::new();
        fn visit<'a>(
            n: &'a str,
            services: &'a BTreeMap<String, (Service, Node)>,
            state: &mut BTreeMap<&'a str, u8>,
            stack: &mut Vec<&'a str>,
        ) -> Option<Vec<&'a str>> {
            match state.get(n) {
                Some(1) => {
                    let start = stack.iter().position(|s| *s == n).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(n);
                    return Some(cycle);
                }
                Some(_) => return None,
                None => {}
            }
            state.insert(n, 1);
            stack.push(n);
            if let Some((svc, _)) = services.get(n) {
                for dep in svc.depends_on.keys() {
                    if services.contains_key(dep)
                        && let Some(c) = visit(dep, services, state, stack)
                    {
                        return Some(c);
                    }
                }
            }
            stack.pop();
            state.insert(n, 2);
            None
        }
        for name in services.keys() {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(name, services, &mut state, &mut stack) {
                let (_, knode) = &services[cycle[0]];
                self.error(
                    knode,
                    &format!("services.{}.depends_on", cycle[0]),
                    format!("dependency cycle: {}", cycle.join(" -> ")),
                );
                break;
            }
        }
    }
}

fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A compose project name: lowercase letters, digits, `-` and `_`.
pub fn normalize_name(s: &str) -> String {
    let out: String = s
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    if out.is_empty() {
        "default".into()
    } else {
        out
    }
}

/// `"8080"`, `"8080:80"`, `"8080:http"`, `"127.0.0.1:8080:80"`, with `/tcp`.
pub fn parse_port_short(s: &str) -> Result<Port, String> {
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p.to_owned()),
        None => (s, "tcp".to_owned()),
    };
    if protocol != "tcp" && protocol != "udp" {
        return Err(format!("expected tcp or udp, found {protocol:?}"));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (host_ip, published, target) = match parts.as_slice() {
        [p] => (None, *p, None),
        [p, t] => (None, *p, Some(*t)),
        [ip, p, t] => (Some(*ip), *p, Some(*t)),
        _ => {
            return Err(format!(
                "expected [HOST_IP:]PUBLISHED[:TARGET][/tcp], found {s:?}"
            ));
        }
    };
    if published.contains('-') {
        return Err(format!("port ranges are not supported, found {s:?}"));
    }
    let published: u16 = match published.parse() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(format!(
                "expected a port number between 1 and 65535, found {published:?}"
            ));
        }
    };
    if let Some(t) = target
        && (t.is_empty() || t.contains('-'))
    {
        return Err(format!(
            "expected a target port number or name, found {t:?}"
        ));
    }
    Ok(Port {
        host_ip: host_ip.map(str::to_owned),
        published,
        target: target.map(str::to_owned),
        protocol,
        app_protocol: None,
    })
}
