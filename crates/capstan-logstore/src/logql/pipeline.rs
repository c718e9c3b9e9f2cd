//! Running a log query's stages over one entry: filters, parsers, label
//! filters, formatters, unwrap. Labels are the stream's, then structured
//! metadata, then what parsers extract (a name already taken gets `_extracted`,
//! as Loki does); a parser or conversion that fails adds `__error__` and keeps
//! the line, so `| __error__ = ""` drops such lines.

use std::collections::BTreeMap;

use super::ast::*;
use super::lex::{parse_bytes, parse_duration};
use crate::Labels;

/// Labels while a line goes through the stages.
pub type LabelMap = BTreeMap<String, String>;

/// What comes out of the stages for one entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub labels: LabelMap,
    pub line: String,
    /// The unwrapped value, when the query unwraps.
    pub value: Option<f64>,
}

pub const ERROR: &str = "__error__";
const ERROR_DETAILS: &str = "__error_details__";

/// Whether the stream selector accepts a stream.
pub fn selects(sel: &[Matcher], l: &Labels) -> bool {
    sel.iter().all(|m| m.matches(l.get(&m.name).unwrap_or("")))
}

fn line_filter(f: &LineFilter, line: &str) -> bool {
    match f.op {
        FilterOp::Contains => f.values.iter().any(|v| line.contains(v.as_str())),
        FilterOp::NotContains => !f.values.iter().any(|v| line.contains(v.as_str())),
        FilterOp::Match => f.res.iter().any(|r| r.is_match(line)),
        FilterOp::NotMatch => !f.res.iter().any(|r| r.is_match(line)),
        FilterOp::Pattern => f.patterns.iter().any(|p| p.fits(line)),
        FilterOp::NotPattern => !f.patterns.iter().any(|p| p.fits(line)),
    }
}

/// A label name as Prometheus allows it: other characters become `_`.
fn sanitize(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

fn add_extracted(labels: &mut LabelMap, stream: &Labels, name: &str, value: String) {
    let mut name = sanitize(name);
    if name.is_empty() {
        return;
    }
    if stream.get(&name).is_some() {
        name.push_str("_extracted");
    }
    labels.insert(name, value);
}

fn json_value_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Null => Some(String::new()),
        _ => None,
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}_{k}")
                };
                flatten(&name, v, out);
            }
        }
        serde_json::Value::Array(_) => {}
        other => {
            if let Some(t) = json_value_text(other) {
                out.push((prefix.to_owned(), t));
            }
        }
    }
}

/// `a.b[0].c` or `a["b"]` into a JSON value.
fn json_path<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    let mut cur = v;
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
            continue;
        }
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let key = &r[..end];
            rest = &r[end + 1..];
            cur = if let Ok(i) = key.parse::<usize>() {
                cur.get(i)?
            } else {
                cur.get(key.trim_matches('"'))?
            };
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        cur = cur.get(&rest[..end])?;
        rest = &rest[end..];
    }
    Some(cur)
}

/// key=value pairs; values may be quoted with Go-style escapes.
pub fn logfmt_pairs(line: &str) -> Result<Vec<(String, String)>, String> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b' ' {
            i += 1;
        }
        let key = &line[ks..i];
        if key.is_empty() {
            return Err(format!("unexpected '=' at {i}"));
        }
        if i >= b.len() || b[i] == b' ' {
            out.push((key.to_owned(), String::new()));
            continue;
        }
        i += 1; // '='
        if i < b.len() && b[i] == b'"' {
            i += 1;
            let mut v = String::new();
            loop {
                let Some(c) = line[i..].chars().next() else {
                    return Err(format!("unterminated quote in value of {key:?}"));
                };
                i += c.len_utf8();
                match c {
                    '"' => break,
                    '\\' => {
                        let Some(e) = line[i..].chars().next() else {
                            return Err(format!("unterminated quote in value of {key:?}"));
                        };
                        i += e.len_utf8();
                        v.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            'r' => '\r',
                            other => other,
                        });
                    }
                    c => v.push(c),
                }
            }
            out.push((key.to_owned(), v));
        } else {
            let vs = i;
            while i < b.len() && b[i] != b' ' {
                i += 1;
            }
            out.push((key.to_owned(), line[vs..i].to_owned()));
        }
    }
    Ok(out)
}

/// Strips ANSI escape sequences (colors, cursor moves).
fn decolorize(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn set_error(labels: &mut LabelMap, kind: &str, details: String) {
    if !labels.contains_key(ERROR) {
        labels.insert(ERROR.into(), kind.into());
        labels.insert(ERROR_DETAILS.into(), details);
    }
}

enum Num {
    Ok(f64),
    Missing,
    Bad(String),
}

fn label_number(labels: &LabelMap, name: &str, as_: &Value) -> Num {
    let Some(v) = labels.get(name) else {
        return Num::Missing;
    };
    let parsed = match as_ {
        Value::Dur(_) => parse_duration(v).map(|d| d as f64),
        Value::Bytes(_) => parse_bytes(v).or_else(|| v.parse().ok()),
        _ => v.trim().parse::<f64>().ok(),
    };
    match parsed {
        Some(x) => Num::Ok(x),
        None => Num::Bad(format!(
            "{name}={v:?} is not a {}",
            match as_ {
                Value::Dur(_) => "duration",
                Value::Bytes(_) => "size",
                _ => "number",
            }
        )),
    }
}

fn eval_label_filter(f: &LabelFilter, labels: &mut LabelMap) -> bool {
    match f {
        LabelFilter::And(a, b) => eval_label_filter(a, labels) && eval_label_filter(b, labels),
        LabelFilter::Or(a, b) => eval_label_filter(a, labels) || eval_label_filter(b, labels),
        LabelFilter::Cmp {
            name,
            op,
            value,
            re,
        } => {
            if let Value::Str(s) = value {
                let v = labels.get(name).map_or("", String::as_str);
                return match op {
                    CmpOp::Eq => v == s,
                    CmpOp::Ne => v != s,
                    CmpOp::Re => re.as_ref().is_some_and(|r| r.is_match(v)),
                    CmpOp::Nre => !re.as_ref().is_some_and(|r| r.is_match(v)),
                    _ => false,
                };
            }
            let want = match value {
                Value::Num(x) | Value::Bytes(x) => *x,
                Value::Dur(d) => *d as f64,
                Value::Str(_) => unreachable!("handled above"),
            };
            match label_number(labels, name, value) {
                Num::Ok(x) => match op {
                    CmpOp::Eq => x == want,
                    CmpOp::Ne => x != want,
                    CmpOp::Gt => x > want,
                    CmpOp::Ge => x >= want,
                    CmpOp::Lt => x < want,
                    CmpOp::Le => x <= want,
                    CmpOp::Re | CmpOp::Nre => false,
                },
                // A missing label compares as not equal to anything.
                Num::Missing => *op == CmpOp::Ne,
                Num::Bad(why) => {
                    set_error(labels, "LabelFilterErr", why);
                    true
                }
            }
        }
    }
}

/// Runs the stages of `e` over one entry of a stream; None when it is filtered out.
pub fn run(
    e: &LogExpr,
    stream: &Labels,
    meta: &[(String, String)],
    line: &str,
    ts_ns: i64,
) -> Option<Output> {
    let mut labels: LabelMap = stream
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for (k, v) in meta {
        labels.entry(sanitize(k)).or_insert_with(|| v.clone());
    }
    let mut line = std::borrow::Cow::Borrowed(line);
    let mut value = None;
    for s in &e.stages {
        match s {
            Stage::Line(f) => {
                if !line_filter(f, &line) {
                    return None;
                }
            }
            Stage::Json(params) => match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => {
                    if params.is_empty() {
                        let mut flat = Vec::new();
                        flatten("", &v, &mut flat);
                        for (k, val) in flat {
                            add_extracted(&mut labels, stream, &k, val);
                        }
                    } else {
                        for (name, path) in params {
                            if let Some(t) = json_path(&v, path).and_then(json_value_text) {
                                add_extracted(&mut labels, stream, name, t);
                            }
                        }
                    }
                }
                Err(err) => set_error(&mut labels, "JSONParserErr", err.to_string()),
            },
            Stage::Logfmt(params) => match logfmt_pairs(&line) {
                Ok(pairs) => {
                    if params.is_empty() {
                        for (k, v) in pairs {
                            add_extracted(&mut labels, stream, &k, v);
                        }
                    } else {
                        for (name, key) in params {
                            if let Some((_, v)) = pairs.iter().find(|(k, _)| k == key) {
                                add_extracted(&mut labels, stream, name, v.clone());
                            }
                        }
                    }
                }
                Err(err) => set_error(&mut labels, "LogfmtParserErr", err),
            },
            Stage::Regexp(re) => {
                if let Some(c) = re.captures(&line) {
                    for name in re.capture_names().flatten() {
                        if let Some(m) = c.name(name) {
                            add_extracted(&mut labels, stream, name, m.as_str().to_owned());
                        }
                    }
                }
            }
            Stage::Pattern(p) => {
                if let Some(caps) = p.captures(&line) {
                    let caps: Vec<(String, String)> = caps
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                    for (k, v) in caps {
                        add_extracted(&mut labels, stream, &k, v);
                    }
                }
            }
            Stage::Labels(f) => {
                if !eval_label_filter(f, &mut labels) {
                    return None;
                }
            }
            Stage::LineFormat(t) => {
                let rendered = t.render(&|n| labels.get(n).cloned(), &line, ts_ns);
                line = std::borrow::Cow::Owned(rendered);
            }
            Stage::LabelFormat(items) => {
                let before = labels.clone();
                for (dst, src) in items {
                    match src {
                        LabelFormatSrc::Rename(from) => {
                            if let Some(v) = labels.remove(from) {
                                labels.insert(dst.clone(), v);
                            }
                        }
                        LabelFormatSrc::Template(t) => {
                            let v = t.render(&|n| before.get(n).cloned(), &line, ts_ns);
                            labels.insert(dst.clone(), v);
                        }
                    }
                }
            }
            Stage::Drop(ms) => {
                labels.retain(|k, v| !ms.iter().any(|m| m.name == *k && m.matches(v)))
            }
            Stage::Keep(ms) => {
                labels.retain(|k, v| ms.iter().any(|m| m.name == *k && m.matches(v)))
            }
            Stage::Unwrap { label, conv } => {
                let parsed = labels.get(label).and_then(|v| match conv {
                    Conv::None => v.trim().parse::<f64>().ok(),
                    Conv::Duration => parse_duration(v).map(|d| d as f64 / 1e9),
                    Conv::Bytes => parse_bytes(v).or_else(|| v.parse().ok()),
                });
                match parsed {
                    Some(x) => value = Some(x),
                    None => {
                        let why = match labels.get(label) {
                            Some(v) => format!("{label}={v:?} does not convert"),
                            None => format!("no label {label}"),
                        };
                        set_error(&mut labels, "SampleExtractionErr", why);
                    }
                }
            }
            Stage::Decolorize => line = std::borrow::Cow::Owned(decolorize(&line)),
        }
    }
    Some(Output {
        labels,
        line: line.into_owned(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_quoting() {
        assert_eq!(
            logfmt_pairs(r#"level=info msg="a \"quoted\" word" flag dur=1.5s"#).unwrap(),
            vec![
                ("level".into(), "info".into()),
                ("msg".into(), "a \"quoted\" word".into()),
                ("flag".into(), String::new()),
                ("dur".into(), "1.5s".into())
            ]
        );
        assert!(logfmt_pairs(r#"msg="open"#).is_err());
    }

    #[test]
    fn decolorize_strips_ansi() {
        assert_eq!(decolorize("\u{1b}[31merror\u{1b}[0m: x"), "error: x");
    }
}
