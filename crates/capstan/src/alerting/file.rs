//! Prometheus rule files: `groups` of recording and alerting rules, read
//! with their positions so that every error says `file:line:col` and the
//! key, as `promtool check rules` would refuse the same file.

use std::time::Duration;

use crate::spec::parse_duration;
use crate::spec::yaml::{self, Kind, Node};

/// Most groups in one file, and rules in one group.
pub const MAX_GROUPS: usize = 1_000;
pub const MAX_RULES: usize = 10_000;
/// Largest rule file read.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    pub file: String,
    /// None: the stack's evaluation interval.
    pub interval: Option<Duration>,
    /// Most alerts (or series) a rule may produce; 0 is no limit.
    pub limit: u64,
    pub query_offset: Option<Duration>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    Record(String),
    Alert(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub kind: RuleKind,
    pub expr: String,
    pub for_: Duration,
    pub keep_firing_for: Duration,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    /// Hysteresis (a capstan extension): a firing alert resolves only once
    /// this holds for it, not when `expr` stops. Written as the annotation
    /// [`RECOVER_ANNOTATION`], so promtool and Prometheus accept the file.
    pub recover_expr: Option<String>,
    /// Its alerts are held back while a service their service depends on
    /// has a firing alert (the annotation [`INHIBIT_ANNOTATION`]).
    pub inhibit_on_dependency: bool,
    /// Where the rule starts in its file.
    pub line: u64,
}

/// The annotation that marks a rule's alerts as held back by a failing dependency.
pub const INHIBIT_ANNOTATION: &str = "capstan_inhibit_on_dependency";

/// The annotation that carries a rule's `recover_expr`.
pub const RECOVER_ANNOTATION: &str = "capstan_recover_expr";

impl Rule {
    pub fn name(&self) -> &str {
        match &self.kind {
            RuleKind::Record(n) | RuleKind::Alert(n) => n,
        }
    }
}

/// One problem in a rule file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: u64,
    pub col: u64,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, self.path, self.message
        )
    }
}

struct Reader<'a> {
    file: &'a str,
    problems: Vec<Problem>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub fn valid_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Reader<'_> {
    fn problem(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_owned(),
            line: node.pos.line,
            col: node.pos.col,
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// A mapping's entries by key; unknown keys are problems, as in promtool.
    fn map<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        known: &[&str],
    ) -> Option<Vec<(String, &'n Node)>> {
        let Kind::Map(entries) = &node.kind else {
            self.problem(
                node,
                path,
                format!("expected a mapping, found {}", node.describe()),
            );
            return None;
        };
        let mut out: Vec<(String, &Node)> = Vec::new();
        for (k, v) in entries {
            let Some(key) = k.scalar_text() else {
                self.problem(k, path, "expected a string key");
                continue;
            };
            if out.iter().any(|(o, _)| *o == key) {
                self.problem(k, &join(path, &key), "duplicate key");
                continue;
            }
            if !known.contains(&key.as_str()) {
                self.problem(
                    k,
                    &join(path, &key),
                    format!("unknown key (expected one of {})", known.join(", ")),
                );
                continue;
            }
            out.push((key, v));
        }
        Some(out)
    }

    fn text(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.kind {
            Kind::Str(s) => Some(s.clone()),
            Kind::Int(_) | Kind::Float(_) | Kind::Bool(_) => node.scalar_text(),
            _ => {
                self.problem(
                    node,
                    path,
                    format!("expected a string, found {}", node.describe()),
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let t = self.text(node, path)?;
        match parse_duration(&t) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(node, path, e);
                None
            }
        }
    }

    fn pairs(&mut self, node: &Node, path: &str, labels: bool) -> Vec<(String, String)> {
        let Kind::Map(entries) = &node.kind else {
            if !matches!(node.kind, Kind::Null) {
                self.problem(
                    node,
                    path,
                    format!("expected a mapping, found {}", node.describe()),
                );
            }
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let Some(key) = k.scalar_text() else { continue };
            let p = join(path, &key);
            if labels && !valid_label_name(&key) {
                self.problem(k, &p, format!("invalid label name {key:?}"));
                continue;
            }
            if !labels && key.is_empty() {
                self.problem(k, &p, "an annotation needs a name");
                continue;
            }
            if let Some(value) = self.text(v, &p) {
                if let Err(e) = super::template::check(&value) {
                    self.problem(v, &p, format!("invalid template: {e}"));
                }
                out.push((key, value));
            }
        }
        out
    }

    fn rule(&mut self, node: &Node, path: &str) -> Option<Rule> {
        let fields = self.map(
            node,
            path,
            &[
                "record",
                "alert",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            ],
        )?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|x| x.1);
        let kind = match (get("record"), get("alert")) {
            (Some(r), None) => {
                let name = self.text(r, &join(path, "record"))?;
                if !valid_metric_name(&name) {
                    self.problem(
                        r,
                        &join(path, "record"),
                        format!("invalid recording rule name {name:?}"),
                    );
                }
                for k in ["for", "keep_firing_for", "annotations"] {
                    if let Some(n) = get(k) {
                        self.problem(
                            n,
                            &join(path, k),
                            format!("invalid field '{k}' in recording rule"),
                        );
                    }
                }
                RuleKind::Record(name)
            }
            (None, Some(a)) => {
                let name = self.text(a, &join(path, "alert"))?;
                if name.is_empty() {
                    self.problem(a, &join(path, "alert"), "an alerting rule needs a name");
                }
                RuleKind::Alert(name)
            }
            (Some(r), Some(_)) => {
                self.problem(r, path, "only one of 'record' and 'alert' must be set");
                return None;
            }
            (None, None) => {
                self.problem(node, path, "one of 'record' or 'alert' must be set");
                return None;
            }
        };
        let expr = match get("expr") {
            Some(n) => {
                let p = join(path, "expr");
                let e = self.text(n, &p).unwrap_or_default();
                if e.trim().is_empty() {
                    self.problem(n, &p, "field 'expr' must be set in rule");
                } else if let Err(err) = capstan_promql::parse(&e) {
                    self.problem(n, &p, format!("could not parse expression: {err}"));
                }
                e
            }
            None => {
                self.problem(node, path, "field 'expr' must be set in rule");
                String::new()
            }
        };
        let for_ = get("for")
            .and_then(|n| self.duration(n, &join(path, "for")))
            .unwrap_or_default();
        let keep_firing_for = get("keep_firing_for")
            .and_then(|n| self.duration(n, &join(path, "keep_firing_for")))
            .unwrap_or_default();
        let labels = get("labels")
            .map(|n| self.pairs(n, &join(path, "labels"), true))
            .unwrap_or_default();
        if matches!(kind, RuleKind::Record(_))
            && let Some((_, n)) = fields.iter().find(|(k, _)| k == "labels")
            && labels.iter().any(|(k, _)| k == "__name__")
        {
            self.problem(
                n,
                &join(path, "labels"),
                "invalid recording rule label name: __name__",
            );
        }
        let mut annotations = get("annotations")
            .map(|n| self.pairs(n, &join(path, "annotations"), false))
            .unwrap_or_default();
        let recover_expr = annotations
            .iter()
            .position(|(k, _)| k == RECOVER_ANNOTATION)
            .map(|i| annotations.remove(i).1);
        if let (Some(q), Some(n)) = (&recover_expr, get("annotations")) {
            let p = join(&join(path, "annotations"), RECOVER_ANNOTATION);
            if matches!(kind, RuleKind::Record(_)) {
                self.problem(n, &p, "only alerting rules recover");
            } else if let Err(e) = capstan_promql::parse(q) {
                self.problem(n, &p, format!("could not parse expression: {e}"));
            }
        }
        let inhibit_on_dependency = annotations
            .iter()
            .position(|(k, _)| k == INHIBIT_ANNOTATION)
            .map(|i| annotations.remove(i).1)
            .is_some_and(|v| v.trim() == "true");
        Some(Rule {
            kind,
            expr,
            for_,
            keep_firing_for,
            labels,
            annotations,
            recover_expr,
            inhibit_on_dependency,
            line: node.pos.line,
        })
    }

    fn group(&mut self, node: &Node, path: &str) -> Option<Group> {
        let fields = self.map(
            node,
            path,
            &["name", "interval", "limit", "query_offset", "rules"],
        )?;
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|x| x.1);
        let name = match get("name") {
            Some(n) => self.text(n, &join(path, "name")).unwrap_or_default(),
            None => String::new(),
        };
        if name.is_empty() {
            self.problem(node, path, "groupname must not be empty");
        }
        let interval = get("interval").and_then(|n| self.duration(n, &join(path, "interval")));
        if interval.is_some_and(|d| d.is_zero()) {
            self.problem(
                get("interval").unwrap_or(node),
                &join(path, "interval"),
                "must be more than 0",
            );
        }
        let query_offset =
            get("query_offset").and_then(|n| self.duration(n, &join(path, "query_offset")));
        let limit = match get("limit").map(|n| (n, &n.kind)) {
            None => 0,
            Some((_, Kind::Int(i))) if *i >= 0 => *i as u64,
            Some((n, _)) => {
                self.problem(n, &join(path, "limit"), "expected a non-negative integer");
                0
            }
        };
        let mut rules = Vec::new();
        match get("rules").map(|n| (n, &n.kind)) {
            Some((_, Kind::Seq(items))) if items.len() > MAX_RULES => {
                self.problem(
                    node,
                    &join(path, "rules"),
                    format!(
                        "at most {MAX_RULES} rules in a group, found {}",
                        items.len()
                    ),
                );
            }
            Some((_, Kind::Seq(items))) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(r) = self.rule(item, &format!("{}[{i}]", join(path, "rules"))) {
                        rules.push(r);
                    }
                }
            }
            Some((_, Kind::Null)) | None => {}
            Some((n, _)) => self.problem(n, &join(path, "rules"), "expected a list of rules"),
        }
        Some(Group {
            name,
            file: self.file.to_owned(),
            interval,
            limit,
            query_offset,
            rules,
        })
    }
}

/// Reads a rule file's text; every problem found, or its groups.
pub fn parse(file: &str, text: &str) -> Result<Vec<Group>, Vec<Problem>> {
    let mut r = Reader {
        file,
        problems: Vec::new(),
    };
    let root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            return Err(vec![Problem {
                file: file.to_owned(),
                line: e.pos.line,
                col: e.pos.col,
                path: String::new(),
                message: e.message,
            }]);
        }
    };
    let mut groups: Vec<Group> = Vec::new();
    if !matches!(root.kind, Kind::Null)
        && let Some(fields) = r.map(&root, "", &["groups"])
    {
        match fields.first().map(|(_, n)| (*n, &n.kind)) {
            Some((_, Kind::Seq(items))) if items.len() > MAX_GROUPS => {
                r.problem(
                    &root,
                    "groups",
                    format!("at most {MAX_GROUPS} groups, found {}", items.len()),
                );
            }
            Some((_, Kind::Seq(items))) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("groups[{i}]");
                    if let Some(g) = r.group(item, &path) {
                        if !g.name.is_empty() && groups.iter().any(|o| o.name == g.name) {
                            r.problem(
                                item,
                                &path,
                                format!("{:?}: repeated in the same file", g.name),
                            );
                        }
                        groups.push(g);
                    }
                }
            }
            Some((_, Kind::Null)) | None => {}
            Some((n, _)) => r.problem(n, "groups", "expected a list of groups"),
        }
    }
    if r.problems.is_empty() {
        Ok(groups)
    } else {
        Err(r.problems)
    }
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character).
fn wildcard(pattern: &[char], name: &[char]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some('*'), _) => {
            wildcard(&pattern[1..], name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some('?'), Some(_)) => wildcard(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The files a glob matches (wildcards in the file name only), sorted.
pub fn glob(pattern: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Some(name) = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
    else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return if pattern.is_file() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        };
    }
    let dir = pattern.parent().unwrap_or(std::path::Path::new("."));
    let pat: Vec<char> = name.chars().collect();
    let mut out: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().chars().collect::<Vec<_>>())
                .is_some_and(|n| wildcard(&pat, &n))
        })
        .collect();
    out.sort();
    out
}

/// Reads a rule file from disk (bounded by [`MAX_FILE_BYTES`]).
pub fn load(path: &std::path::Path) -> Result<Vec<Group>, Vec<Problem>> {
    let name = path.display().to_string();
    let fail = |message: String| {
        vec![Problem {
            file: name.clone(),
            line: 0,
            col: 0,
            path: String::new(),
            message,
        }]
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(fail(format!(
            "{} bytes is more than the {} MiB a rule file may have",
            meta.len(),
            MAX_FILE_BYTES >> 20
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    parse(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
groups:
  - name: web
    interval: 30s
    rules:
      - record: job:http_requests:rate5m
        expr: sum by (job) (rate(http_requests_total[5m]))
        labels: {team: web}
      - alert: HighServerErrorRate
        expr: rate(http_requests_total{code=~"5.."}[1m]) > 1
        for: 10m
        keep_firing_for: 5m
        labels: {severity: page}
        annotations:
          summary: "{{ $labels.service }} fails {{ $value | humanize }} requests/s"
"#;

    #[test]
    fn a_prometheus_rule_file_reads() {
        let g = parse("rules.yml", GOOD).unwrap();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].interval, Some(Duration::from_secs(30)));
        let r = &g[0].rules;
        assert_eq!(
            r[0].kind,
            RuleKind::Record("job:http_requests:rate5m".into())
        );
        assert_eq!(r[0].labels, [("team".to_owned(), "web".to_owned())]);
        assert_eq!(r[1].kind, RuleKind::Alert("HighServerErrorRate".into()));
        assert_eq!(r[1].for_, Duration::from_secs(600));
        assert_eq!(r[1].keep_firing_for, Duration::from_secs(300));
        assert_eq!(r[1].line, 9);
    }

    #[test]
    fn problems_name_file_line_and_key() {
        let bad = r#"
groups:
  - name: a
    rules:
      - record: "bad name"
        expr: up
        for: 1m
      - alert: X
        expr: "rate(up[5m]"
      - alert: Y
        record: y
        expr: up
      - alert: Z
        expr: up
        labels: {"0bad": x}
        annotations: {summary: "{{ $value "}
        severity: page
  - name: a
    rules: []
"#;
        let problems: Vec<String> = parse("r.yml", bad)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        insta::assert_snapshot!(problems.join("\n"));
    }

    #[test]
    fn limits_on_groups_and_file_size() {
        let groups: String = (0..=MAX_GROUPS)
            .map(|i| format!("  - name: g{i}\n    rules: []\n"))
            .collect();
        let e = parse("r.yml", &format!("groups:\n{groups}")).unwrap_err();
        assert!(
            e[0].message.contains("at most 1000 groups, found 1001"),
            "{:?}",
            e[0]
        );
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big.yml");
        std::fs::write(&big, vec![b'#'; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        let e = load(&big).unwrap_err();
        assert!(
            e[0].message
                .contains("more than the 16 MiB a rule file may have"),
            "{:?}",
            e[0]
        );
    }
}
