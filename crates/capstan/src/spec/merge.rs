//! Several stack files as one, as compose merges override files
//! (`-f compose.yaml -f compose.prod.yaml`): mappings merge key by key, a
//! later file's scalars and lists win, except the lists compose concatenates
//! (ports, volumes, …: the later file's entries added, duplicates dropped);
//! `environment`, `labels` and the other "list or dict" keys merge as
//! mappings whichever form each file uses. Every node keeps the file it came
//! from, so errors still point at the right file and line.

use super::yaml::{Kind, Node};

/// Service keys whose lists are concatenated rather than replaced.
const CONCATENATED: &[&str] = &[
    "ports",
    "expose",
    "volumes",
    "dns",
    "dns_search",
    "tmpfs",
    "cap_add",
    "cap_drop",
    "devices",
    "extra_hosts",
    "secrets",
    "configs",
    "env_file",
    "security_opt",
    "group_add",
    "profiles",
    "external_links",
    "links",
];

/// Keys that are "list or dict" in compose: merged as mappings.
const KEY_VALUES: &[&str] = &["environment", "labels", "args", "sysctls", "extra_hosts"];

/// Marks every node of an override file with its index.
pub fn stamp(node: &mut Node, file: u16) {
    node.pos.file = file;
    match &mut node.kind {
        Kind::Seq(items) => items.iter_mut().for_each(|n| stamp(n, file)),
        Kind::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
            stamp(k, file);
            stamp(v, file);
        }),
        _ => {}
    }
}

/// Merges `over` into `base`.
pub fn merge(base: &mut Node, over: Node) {
    merge_at(&mut Vec::new(), base, over);
}

fn key_of(n: &Node) -> Option<String> {
    n.scalar_text()
}

/// Two nodes with the same value, wherever they are.
fn same(a: &Node, b: &Node) -> bool {
    match (&a.kind, &b.kind) {
        (Kind::Seq(x), Kind::Seq(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Kind::Map(x), Kind::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        (x, y) => x == y,
    }
}

/// A `KEY=value` list as a mapping (a mapping stays as it is).
fn as_mapping(n: Node) -> Node {
    let Kind::Seq(items) = n.kind else {
        return n;
    };
    let entries = items
        .into_iter()
        .map(|item| {
            let text = item.scalar_text().unwrap_or_default();
            let (k, v) = match text.split_once(['=', ':']) {
                Some((k, v)) => (k.to_owned(), Kind::Str(v.to_owned())),
                None => (text, Kind::Null),
            };
            (
                Node {
                    pos: item.pos,
                    kind: Kind::Str(k),
                },
                Node {
                    pos: item.pos,
                    kind: v,
                },
            )
        })
        .collect();
    Node {
        pos: n.pos,
        kind: Kind::Map(entries),
    }
}

fn merge_at(path: &mut Vec<String>, base: &mut Node, over: Node) {
    let key = path.last().map(String::as_str).unwrap_or("");
    // services.<name>.<key> (and build.args under it).
    let in_service = path.len() >= 3 && path[0] == "services";
    if in_service && KEY_VALUES.contains(&key) {
        let b = std::mem::replace(
            base,
            Node {
                pos: base.pos,
                kind: Kind::Null,
            },
        );
        *base = as_mapping(b);
        let over = as_mapping(over);
        return merge_maps(path, base, over);
    }
    match (&mut base.kind, over.kind) {
        (Kind::Map(_), Kind::Map(o)) => merge_maps(
            path,
            base,
            Node {
                pos: over.pos,
                kind: Kind::Map(o),
            },
        ),
        (Kind::Seq(b), Kind::Seq(o))
            if path.len() == 3 && path[0] == "services" && CONCATENATED.contains(&key) =>
        {
            for item in o {
                if !b.iter().any(|x| same(x, &item)) {
                    b.push(item);
                }
            }
        }
        (_, kind) => {
            *base = Node {
                pos: over.pos,
                kind,
            }
        }
    }
}

fn merge_maps(path: &mut Vec<String>, base: &mut Node, over: Node) {
    let (Kind::Map(b), Kind::Map(o)) = (&mut base.kind, over.kind) else {
        return;
    };
    for (k, v) in o {
        let name = key_of(&k).unwrap_or_default();
        match b
            .iter_mut()
            .find(|(bk, _)| key_of(bk).as_deref() == Some(name.as_str()))
        {
            Some((_, bv)) => {
                path.push(name);
                merge_at(path, bv, v);
                path.pop();
            }
            None => b.push((k, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::yaml::parse;

    fn merged(a: &str, b: &str) -> Node {
        let mut base = parse(a).unwrap();
        let mut over = parse(b).unwrap();
        stamp(&mut over, 1);
        merge(&mut base, over);
        base
    }

    fn text(n: &Node) -> String {
        match &n.kind {
            Kind::Map(e) => format!(
                "{{{}}}",
                e.iter()
                    .map(|(k, v)| format!("{}: {}", k.scalar_text().unwrap_or_default(), text(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Kind::Seq(i) => format!("[{}]", i.iter().map(text).collect::<Vec<_>>().join(", ")),
            Kind::Null => "~".into(),
            _ => n.scalar_text().unwrap_or_default(),
        }
    }

    #[test]
    fn overrides_merge_as_compose_merges_them() {
        let n = merged(
            "services:\n  web:\n    image: a:1\n    command: [run, --dev]\n    ports: [\"80:80\"]\n    environment: [A=1, B=2]\n    deploy: {replicas: 1, resources: {limits: {memory: 64m}}}\n",
            "services:\n  web:\n    image: a:2\n    command: [run]\n    ports: [\"80:80\", \"443:443\"]\n    environment: {B: '3', C: '4'}\n    deploy: {replicas: 3}\n  db:\n    image: pg\n",
        );
        assert_eq!(
            text(&n),
            "{services: {web: {image: a:2, command: [run], ports: [80:80, 443:443], environment: {A: 1, B: 3, C: 4}, deploy: {replicas: 3, resources: {limits: {memory: 64m}}}}, db: {image: pg}}}"
        );
    }

    #[test]
    fn nodes_remember_their_file() {
        let n = merged(
            "services:\n  web:\n    image: a\n",
            "services:\n  web:\n    image: b\n",
        );
        let Kind::Map(top) = &n.kind else { panic!() };
        let Kind::Map(services) = &top[0].1.kind else {
            panic!()
        };
        let Kind::Map(web) = &services[0].1.kind else {
            panic!()
        };
        assert_eq!(web[0].1.pos.file, 1);
        assert_eq!(web[0].1.pos.line, 3);
        assert_eq!(services[0].0.pos.file, 0, "the key stays the first file's");
    }
}
