//! `capstan traces` (search) and `capstan trace ID` (a waterfall in the
//! terminal, with `--logs` the log lines that carry the trace id).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use hyper::Method;
use serde_json::Value;

use super::{Ctx, FileOpt, Output, output, usage};

#[derive(clap::Args, Debug)]
pub struct TracesArgs {
    #[command(flatten)]
    pub f: FileOpt,
    /// Only traces with a span of this service.
    #[arg(long)]
    service: Option<String>,
    /// Only traces with a span of this name.
    #[arg(long)]
    name: Option<String>,
    /// Only traces at least this long (300ms, 2s).
    #[arg(long)]
    min_duration: Option<String>,
    /// Only traces at most this long.
    #[arg(long)]
    max_duration: Option<String>,
    /// Only traces with a failed span.
    #[arg(long)]
    errors: bool,
    /// Span or resource attributes, KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Only traces newer than this (10m, 1h).
    #[arg(long)]
    since: Option<String>,
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Output,
}

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub f: FileOpt,
    /// The trace id (hex).
    id: String,
    /// Also print the log lines that carry the trace id, under their spans.
    #[arg(long)]
    logs: bool,
    #[arg(long, short = 'o', value_enum, default_value_t)]
    output: Output,
}

fn ms(ns: i64) -> String {
    let ms = ns as f64 / 1e6;
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        format!("{ms:.1}ms")
    }
}

fn time(ns: i64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

pub async fn traces(ctx: &Ctx, a: TracesArgs) -> Result<i32> {
    let mut q = vec![format!("limit={}", a.limit)];
    for (k, v) in [
        ("service", &a.service),
        ("name", &a.name),
        ("minDuration", &a.min_duration),
        ("maxDuration", &a.max_duration),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", crate::scrape::encode(v)));
        }
    }
    if a.errors {
        q.push("status=error".into());
    }
    if !a.tags.is_empty() {
        let mut tags = Vec::new();
        for t in &a.tags {
            let Some((k, v)) = t.split_once('=') else {
                return Err(usage(format!("--tag wants KEY=VALUE, found {t:?}")));
            };
            tags.push(format!("{k}={}", serde_json::to_string(v)?));
        }
        q.push(format!("tags={}", crate::scrape::encode(&tags.join(" "))));
    }
    if let Some(s) = &a.since {
        let d = crate::spec::parse_duration(s).map_err(|e| usage(format!("--since: {e}")))?;
        let start = jiff::Timestamp::now().as_second() - d.as_secs() as i64;
        q.push(format!("start={start}"));
    }
    let v = ctx
        .client()?
        .json(Method::GET, &format!("/api/search?{}", q.join("&")), None)
        .await?;
    let list = v["traces"].as_array().cloned().unwrap_or_default();
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let mut rows = vec![
        ["TRACE ID", "ROOT", "START", "DURATION", "SPANS", "ERRORS"]
            .map(String::from)
            .to_vec(),
    ];
    for t in &list {
        let start: i64 = t["startTimeUnixNano"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        rows.push(vec![
            t["traceID"].as_str().unwrap_or("").to_owned(),
            format!(
                "{}: {}",
                t["rootServiceName"].as_str().unwrap_or(""),
                t["rootTraceName"].as_str().unwrap_or("")
            ),
            time(start),
            format!("{}ms", t["durationMs"]),
            t["spanCount"].to_string(),
            t["errorCount"].to_string(),
        ]);
    }
    print!("{}", output::table(&rows));
    if list.is_empty() {
        println!("(no traces)");
    }
    Ok(0)
}

/// A span as the waterfall needs it.
struct Row {
    id: String,
    parent: String,
    service: String,
    name: String,
    start: i64,
    end: i64,
    error: bool,
}

fn num(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
        .unwrap_or(0)
}

fn rows(batches: &Value) -> Vec<Row> {
    let mut out = Vec::new();
    for b in batches.as_array().into_iter().flatten() {
        let service = b["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|kv| kv["key"] == "service.name")
            .and_then(|kv| kv["value"]["stringValue"].as_str())
            .unwrap_or("unknown_service")
            .to_owned();
        for ss in b["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(Row {
                    id: s["spanId"].as_str().unwrap_or("").to_owned(),
                    parent: s["parentSpanId"].as_str().unwrap_or("").to_owned(),
                    service: service.clone(),
                    name: s["name"].as_str().unwrap_or("").to_owned(),
                    start: num(&s["startTimeUnixNano"]),
                    end: num(&s["endTimeUnixNano"]),
                    error: s["status"]["code"].as_i64() == Some(2),
                });
            }
        }
    }
    out
}

/// Spans depth first from the roots (spans whose parent is absent), children
/// by start time; each with its depth.
fn tree(rows: &[Row]) -> Vec<(usize, &Row)> {
    let ids: HashMap<&str, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut children: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let p = ids.get(r.parent.as_str()).copied().filter(|p| *p != i);
        children.entry(p).or_default().push(i);
    }
    for c in children.values_mut() {
        c.sort_by_key(|i| (rows[*i].start, rows[*i].id.clone()));
    }
    let mut out = Vec::new();
    let mut stack: Vec<(usize, usize)> = children
        .get(&None)
        .map(|c| c.iter().rev().map(|i| (0, *i)).collect())
        .unwrap_or_default();
    let mut seen = vec![false; rows.len()];
    while let Some((d, i)) = stack.pop() {
        if std::mem::replace(&mut seen[i], true) {
            continue;
        }
        out.push((d, &rows[i]));
        if let Some(c) = children.get(&Some(i)) {
            stack.extend(c.iter().rev().map(|c| (d + 1, *c)));
        }
    }
    // Spans in a cycle of parents (malformed input) still show.
    for (i, r) in rows.iter().enumerate() {
        if !seen[i] {
            out.push((0, r));
        }
    }
    out
}

/// The waterfall: one line per span, indented under its parent, with a bar
/// where it ran within the trace.
fn waterfall(rows: &[Row], logs: &BTreeMap<String, Vec<String>>, width: usize) -> String {
    let start = rows.iter().map(|r| r.start).min().unwrap_or(0);
    let end = rows
        .iter()
        .map(|r| r.end)
        .max()
        .unwrap_or(start)
        .max(start + 1);
    let total = (end - start) as f64;
    let ordered = tree(rows);
    let label_w = ordered
        .iter()
        .map(|(d, r)| d * 2 + r.service.len() + r.name.len() + 2)
        .max()
        .unwrap_or(10)
        .min(60);
    let mut s = String::new();
    for (d, r) in &ordered {
        let mut label = format!("{}{}: {}", "  ".repeat(*d), r.service, r.name);
        if label.chars().count() > label_w {
            label = label.chars().take(label_w - 1).collect::<String>() + "…";
        }
        let a = (((r.start - start) as f64 / total) * width as f64).floor() as usize;
        let b = ((((r.end - start) as f64) / total) * width as f64).ceil() as usize;
        let a = a.min(width.saturating_sub(1));
        let b = b.clamp(a + 1, width);
        let bar: String = (0..width)
            .map(|i| {
                if i >= a && i < b {
                    if r.error { '!' } else { '█' }
                } else {
                    ' '
                }
            })
            .collect();
        s.push_str(&format!(
            "{label:<label_w$} |{bar}| {:>9} +{}{}\n",
            ms(r.end - r.start),
            ms(r.start - start),
            if r.error { "  ERROR" } else { "" }
        ));
        if let Some(lines) = logs.get(&r.id) {
            for l in lines {
                s.push_str(&format!("{:w$}  > {l}\n", "", w = d * 2));
            }
        }
    }
    if let Some(lines) = logs.get("") {
        s.push_str("logs without a span id:\n");
        for l in lines {
            s.push_str(&format!("  > {l}\n"));
        }
    }
    s
}

pub async fn trace(ctx: &Ctx, a: TraceArgs) -> Result<i32> {
    let id = crate::traces::normalize_id(&a.id).map_err(usage)?;
    let client = ctx.client()?;
    let v = client
        .json(Method::GET, &format!("/api/v2/traces/{id}"), None)
        .await?;
    let batches = &v["trace"]["resourceSpans"];
    let logs = if a.logs {
        client
            .json(Method::GET, &format!("/api/traces/{id}/logs"), None)
            .await?["logs"]
            .clone()
    } else {
        Value::Null
    };
    if a.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"trace": v["trace"], "logs": logs}))?
        );
        return Ok(0);
    }
    let rows = rows(batches);
    let mut by_span: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Span ids the trace knows; lines naming another span go with the trace.
    let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    for l in logs.as_array().into_iter().flatten() {
        let span = l["span_id"]
            .as_str()
            .filter(|s| known.contains(s))
            .unwrap_or("");
        let ts: i64 = l["ts_ns"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let labels = &l["labels"];
        let who = match (labels["service"].as_str(), labels["replica"].as_str()) {
            (Some(s), Some(r)) => format!("{s}-{r}"),
            (Some(s), None) => s.to_owned(),
            _ => String::new(),
        };
        by_span.entry(span.to_owned()).or_default().push(format!(
            "{} {who} {}",
            time(ts),
            l["line"].as_str().unwrap_or("")
        ));
    }
    let start = rows.iter().map(|r| r.start).min().unwrap_or(0);
    let end = rows.iter().map(|r| r.end).max().unwrap_or(start);
    let services: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.service.as_str()).collect();
    println!(
        "trace {id}: {} spans, {}, started {}, services {}",
        rows.len(),
        ms(end - start),
        time(start),
        services.into_iter().collect::<Vec<_>>().join(", ")
    );
    print!("{}", waterfall(&rows, &by_span, 40));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, parent: &str, name: &str, start: i64, end: i64, error: bool) -> Row {
        Row {
            id: id.into(),
            parent: parent.into(),
            service: "web".into(),
            name: name.into(),
            start,
            end,
            error,
        }
    }

    #[test]
    fn waterfall_nests_children_under_parents_by_start() {
        let rows = vec![
            row("c", "a", "db", 50_000_000, 100_000_000, false),
            row("a", "", "GET /", 0, 100_000_000, false),
            row("b", "a", "auth", 0, 20_000_000, true),
        ];
        let mut logs = BTreeMap::new();
        logs.insert("b".to_string(), vec!["denied".to_string()]);
        let w = waterfall(&rows, &logs, 10);
        insta::assert_snapshot!(w, @r"
        web: GET /  |██████████|   100.0ms +0.0ms
          web: auth |!!        |    20.0ms +0.0ms  ERROR
            > denied
          web: db   |     █████|    50.0ms +50.0ms
        ");
    }
}
