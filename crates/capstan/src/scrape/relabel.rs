//! Prometheus relabeling (`metric_relabel_configs`): the common actions with
//! Prometheus' defaults and semantics (anchored regexes, `$1`-style replacements).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Replace,
    Keep,
    Drop,
    KeepEqual,
    DropEqual,
    HashMod,
    LabelMap,
    LabelDrop,
    LabelKeep,
    Lowercase,
    Uppercase,
}

fn default_separator() -> String {
    ";".into()
}
fn default_regex() -> String {
    "(.*)".into()
}
fn default_replacement() -> String {
    "$1".into()
}

/// One rule as written in `metric_relabel_configs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelabelConfig {
    #[serde(default)]
    pub source_labels: Vec<String>,
    #[serde(default = "default_separator")]
    pub separator: String,
    #[serde(default = "default_regex")]
    pub regex: String,
    #[serde(default)]
    pub modulus: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_label: Option<String>,
    #[serde(default = "default_replacement")]
    pub replacement: String,
    #[serde(default)]
    pub action: Action,
}

/// A rule ready to run: its regex compiled, anchored at both ends.
#[derive(Debug, Clone)]
pub struct Rule {
    cfg: RelabelConfig,
    re: regex::Regex,
}

impl Rule {
    pub fn new(cfg: RelabelConfig) -> Result<Rule, String> {
        let re = regex::Regex::new(&format!("^(?s:{})$", cfg.regex))
            .map_err(|e| format!("invalid regex {:?}: {e}", cfg.regex))?;
        let needs_target = matches!(
            cfg.action,
            Action::Replace
                | Action::HashMod
                | Action::Lowercase
                | Action::Uppercase
                | Action::KeepEqual
                | Action::DropEqual
        );
        if needs_target && cfg.target_label.is_none() {
            return Err(format!("action {:?} needs target_label", cfg.action).to_lowercase());
        }
        if cfg.action == Action::HashMod && cfg.modulus == 0 {
            return Err("action hashmod needs a modulus greater than 0".into());
        }
        Ok(Rule { cfg, re })
    }
}

fn get<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

fn set(labels: &mut Vec<(String, String)>, name: &str, value: String) {
    labels.retain(|(n, _)| n != name);
    if !value.is_empty() {
        labels.push((name.to_owned(), value));
    }
}

/// Applies the rules in order; `None` when a rule drops the series.
pub fn apply(mut labels: Vec<(String, String)>, rules: &[Rule]) -> Option<Vec<(String, String)>> {
    for r in rules {
        let c = &r.cfg;
        let source = c
            .source_labels
            .iter()
            .map(|n| get(&labels, n))
            .collect::<Vec<_>>()
            .join(&c.separator);
        let target = c.target_label.as_deref().unwrap_or("");
        match c.action {
            Action::Keep if !r.re.is_match(&source) => return None,
            Action::Drop if r.re.is_match(&source) => return None,
            Action::KeepEqual if source != get(&labels, target) => return None,
            Action::DropEqual if source == get(&labels, target) => return None,
            Action::Replace => {
                if let Some(caps) = r.re.captures(&source) {
                    let mut name = String::new();
                    caps.expand(target, &mut name);
                    let mut value = String::new();
                    caps.expand(&c.replacement, &mut value);
                    if !name.is_empty()
                        && name
                            .chars()
                            .all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
                    {
                        set(&mut labels, &name, value);
                    }
                }
            }
            Action::Lowercase => set(&mut labels, target, source.to_lowercase()),
            Action::Uppercase => set(&mut labels, target, source.to_uppercase()),
            Action::HashMod => {
                // FNV-1a of the joined values, as a stable spread (not Prometheus' MD5).
                let h = source.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                set(&mut labels, target, (h % c.modulus).to_string());
            }
            Action::LabelMap => {
                let mapped: Vec<(String, String)> = labels
                    .iter()
                    .filter_map(|(n, v)| {
                        let caps = r.re.captures(n)?;
                        let mut name = String::new();
                        caps.expand(&c.replacement, &mut name);
                        Some((name, v.clone()))
                    })
                    .collect();
                for (n, v) in mapped {
                    set(&mut labels, &n, v);
                }
            }
            Action::LabelDrop => labels.retain(|(n, _)| !r.re.is_match(n)),
            Action::LabelKeep => labels.retain(|(n, _)| r.re.is_match(n)),
            _ => {}
        }
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml_like: serde_json::Value) -> Rule {
        Rule::new(serde_json::from_value(yaml_like).unwrap()).unwrap()
    }

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
        v.sort();
        v
    }

    #[test]
    fn actions() {
        let base = l(&[
            ("__name__", "http_requests_total"),
            ("code", "500"),
            ("path", "/api/v1/x"),
            ("env", "Prod"),
        ]);
        type Pairs = Vec<(String, String)>;
        let cases: Vec<(serde_json::Value, Option<Pairs>)> = vec![
            (
                serde_json::json!({"source_labels": ["code"], "regex": "5..", "action": "drop"}),
                None,
            ),
            (
                serde_json::json!({"source_labels": ["code"], "regex": "2..", "action": "keep"}),
                None,
            ),
            (
                serde_json::json!({"source_labels": ["code"], "regex": "5", "action": "drop"}),
                Some(base.clone()),
            ),
            (
                serde_json::json!({"source_labels": ["path"], "regex": "/api/(v[0-9])/.*", "target_label": "api", "replacement": "$1"}),
                Some(sorted([base.clone(), l(&[("api", "v1")])].concat())),
            ),
            (
                serde_json::json!({"source_labels": ["code", "env"], "separator": "-", "target_label": "combo"}),
                Some(sorted([base.clone(), l(&[("combo", "500-Prod")])].concat())),
            ),
            (
                serde_json::json!({"regex": "env", "action": "labeldrop"}),
                Some(l(&[
                    ("__name__", "http_requests_total"),
                    ("code", "500"),
                    ("path", "/api/v1/x"),
                ])),
            ),
            (
                serde_json::json!({"regex": "__name__|code", "action": "labelkeep"}),
                Some(l(&[("__name__", "http_requests_total"), ("code", "500")])),
            ),
            (
                serde_json::json!({"regex": "(c.*)", "replacement": "orig_$1", "action": "labelmap"}),
                Some(sorted([base.clone(), l(&[("orig_code", "500")])].concat())),
            ),
            (
                serde_json::json!({"source_labels": ["env"], "target_label": "env", "action": "lowercase"}),
                Some(sorted(l(&[
                    ("__name__", "http_requests_total"),
                    ("code", "500"),
                    ("path", "/api/v1/x"),
                    ("env", "prod"),
                ]))),
            ),
            (
                serde_json::json!({"source_labels": ["code"], "target_label": "code", "action": "keepequal"}),
                Some(base.clone()),
            ),
            (
                serde_json::json!({"source_labels": ["code"], "target_label": "path", "action": "keepequal"}),
                None,
            ),
            // A replacement to the empty value removes the label.
            (
                serde_json::json!({"source_labels": ["env"], "regex": "Prod", "target_label": "env", "replacement": ""}),
                Some(l(&[
                    ("__name__", "http_requests_total"),
                    ("code", "500"),
                    ("path", "/api/v1/x"),
                ])),
            ),
        ];
        for (cfg, want) in cases {
            let got = apply(base.clone(), &[rule(cfg.clone())]).map(sorted);
            assert_eq!(got, want.map(sorted), "{cfg}");
        }
        let h = apply(base.clone(), &[rule(serde_json::json!({"source_labels": ["path"], "modulus": 4, "target_label": "shard", "action": "hashmod"}))]).unwrap();
        let shard: u64 = get(&h, "shard").parse().unwrap();
        assert!(shard < 4);
        assert!(
            Rule::new(
                serde_json::from_value(serde_json::json!({"regex": "(", "action": "drop"}))
                    .unwrap()
            )
            .is_err()
        );
        assert!(
            Rule::new(serde_json::from_value(serde_json::json!({"action": "replace"})).unwrap())
                .is_err()
        );
    }
}
