//! `label_replace`, `label_join`, `sort_by_label`.

use std::cmp::Ordering;

use promql_parser::parser::Expr;

use crate::engine::Ev;
use crate::value::{Error, Value, exec};

/// A label name in the classic charset (`[a-zA-Z_][a-zA-Z0-9_]*`).
pub(crate) fn legacy_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(x) if x == '_' || x.is_ascii_alphabetic())
        && c.all(|x| x == '_' || x.is_ascii_alphanumeric())
}

pub(crate) fn label_replace(ev: &mut Ev<'_>, args: &[&Expr]) -> Result<Value, Error> {
    let dst = ev.eval_string(args[1])?;
    let repl = ev.eval_string(args[2])?;
    let src = ev.eval_string(args[3])?;
    let re_src = ev.eval_string(args[4])?;
    let re = regex::Regex::new(&format!("^(?s:{re_src})$")).map_err(|e| {
        exec(format!(
            "invalid regular expression in label_replace(): {re_src}: {e}"
        ))
    })?;
    if !legacy_label_name(&dst) {
        return Err(exec(format!(
            "invalid destination label name in label_replace(): {dst}"
        )));
    }
    let mut v = ev.eval_vector(args[0])?;
    for s in &mut v {
        let value = s.labels.get(&src).unwrap_or("");
        if let Some(caps) = re.captures(value) {
            let mut out = String::new();
            caps.expand(&repl, &mut out);
            s.labels = s.labels.with(&dst, &out);
            if dst == "__name__" {
                s.drop_name = false;
            }
        }
    }
    Ok(Value::Vector(ev.dedup(v)?))
}

pub(crate) fn label_join(ev: &mut Ev<'_>, args: &[&Expr]) -> Result<Value, Error> {
    let dst = ev.eval_string(args[1])?;
    let sep = ev.eval_string(args[2])?;
    let mut srcs = Vec::new();
    for a in &args[3..] {
        srcs.push(ev.eval_string(a)?);
    }
    if !legacy_label_name(&dst) {
        return Err(exec(format!(
            "invalid destination label name in label_join(): {dst}"
        )));
    }
    for s in &srcs {
        if !legacy_label_name(s) {
            return Err(exec(format!(
                "invalid source label name in label_join(): {s}"
            )));
        }
    }
    let mut v = ev.eval_vector(args[0])?;
    for s in &mut v {
        let joined: Vec<&str> = srcs.iter().map(|n| s.labels.get(n).unwrap_or("")).collect();
        let joined = joined.join(&sep);
        s.labels = s.labels.with(&dst, &joined);
        if dst == "__name__" {
            s.drop_name = false;
        }
    }
    Ok(Value::Vector(ev.dedup(v)?))
}

pub(crate) fn sort_by_label(ev: &mut Ev<'_>, args: &[&Expr], name: &str) -> Result<Value, Error> {
    let mut names = Vec::new();
    for a in &args[1..] {
        names.push(ev.eval_string(a)?);
    }
    let mut v = ev.eval_vector(args[0])?;
    let desc = name.ends_with("_desc");
    if ev.steps() == 1 {
        v.sort_by(|a, b| {
            let mut o = Ordering::Equal;
            for n in &names {
                o = natural_cmp(a.labels.get(n).unwrap_or(""), b.labels.get(n).unwrap_or(""));
                if o != Ordering::Equal {
                    break;
                }
            }
            let o = o.then_with(|| a.labels.cmp(&b.labels));
            if desc { o.reverse() } else { o }
        });
    }
    Ok(Value::Vector(v))
}

/// Compares strings with runs of digits compared as numbers ("a2" < "a10").
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            let si = i;
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            let sj = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let x = std::str::from_utf8(&a[si..i])
                .unwrap()
                .trim_start_matches('0');
            let y = std::str::from_utf8(&b[sj..j])
                .unwrap()
                .trim_start_matches('0');
            let o = x.len().cmp(&y.len()).then_with(|| x.cmp(y));
            if o != Ordering::Equal {
                return o;
            }
        } else {
            if a[i] != b[j] {
                return a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (a.len() - i).cmp(&(b.len() - j))
}
