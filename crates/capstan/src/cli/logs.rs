//! `capstan logs`: replicas' output merged by time, optionally followed.

use anyhow::Result;

use super::{Ctx, output};

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub f: super::LongFileOpt,
    /// Services to show (default: all).
    services: Vec<String>,
    /// Keep printing new lines as they arrive.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines newer than this: a duration (10m, 1h30m) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Only the last N lines of each replica.
    #[arg(short = 'n', long)]
    tail: Option<usize>,
    /// Only this replica (index).
    #[arg(long)]
    replica: Option<u32>,
    /// Show each line's time.
    #[arg(short = 't', long)]
    timestamps: bool,
    /// A LogQL log query, e.g. '{service="web"} | json | status >= 500'.
    #[arg(long, short = 'q')]
    query: Option<String>,
    /// Only lines matching this regular expression (with --query: added to it).
    #[arg(long, short = 'g')]
    grep: Option<String>,
    /// Lines of context around each match of --query or --grep.
    #[arg(short = 'C', long, value_name = "N")]
    context: Option<usize>,
    /// With --query or --grep: at most this many matches (the newest).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Print JSON records instead of text.
    #[arg(long, short = 'o', value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

pub fn parse_since(s: &str) -> Result<i64> {
    if let Ok(d) = crate::spec::parse_duration(s) {
        return Ok(crate::logs::now_ns() - d.as_nanos() as i64);
    }
    match s.parse::<jiff::Timestamp>() {
        Ok(t) => Ok(t.as_nanosecond() as i64),
        Err(_) => Err(super::usage(format!(
            "--since: expected a duration like 10m or a time like 2026-01-02T15:04:05Z, found {s:?}"
        ))),
    }
}

/// A LogQL string literal.
fn quote(s: &str) -> String {
    if !s.contains('`') {
        return format!("`{s}`");
    }
    serde_json::to_string(s).unwrap_or_default()
}

/// The LogQL query `--query`, `--grep` and the services make.
fn logql(a: &LogsArgs) -> String {
    let mut q = match &a.query {
        Some(q) => q.clone(),
        None if a.services.is_empty() => r#"{service=~".+"}"#.to_owned(),
        None => format!(
            "{{service=~{}}}",
            quote(
                &a.services
                    .iter()
                    .map(|s| regex::escape(s))
                    .collect::<Vec<_>>()
                    .join("|")
            )
        ),
    };
    if let Some(g) = &a.grep {
        q.push_str(&format!(" |~ {}", quote(g)));
    }
    q
}

/// `--query`/`--grep`: matches (with context) from the daemon's LogQL search,
/// then, with `--follow`, new matches every half second.
async fn search(ctx: &Ctx, a: &LogsArgs) -> Result<i32> {
    let client = ctx.client()?;
    let q = logql(a);
    let mut base = format!(
        "/capstan/v1/logs/search?query={}&limit={}&context={}",
        crate::scrape::encode(&q),
        a.limit,
        a.context.unwrap_or(0)
    );
    if let Some(s) = &a.since {
        base.push_str(&format!("&since_ns={}", parse_since(s)?));
    }
    let color = output::use_color();
    let json = a.output == "json";
    use std::io::Write;
    let mut cursor = 0u64;
    loop {
        let v = client
            .json(
                hyper::Method::GET,
                &format!("{base}&after_seq={cursor}"),
                None,
            )
            .await?;
        let mut out = std::io::stdout().lock();
        for l in v["lines"].as_array().into_iter().flatten() {
            let text = if json {
                l.to_string()
            } else if l["sep"].as_bool() == Some(true) {
                "--".to_owned()
            } else {
                let labels = &l["labels"];
                let who = match (labels["service"].as_str(), labels["replica"].as_str()) {
                    (Some(s), Some(r)) => format!("{s}-{r}"),
                    (Some(s), None) => s.to_owned(),
                    _ => labels.to_string(),
                };
                let mark = if l["match"].as_bool() == Some(true) {
                    '|'
                } else {
                    '-'
                };
                let mut s = output::paint(&format!("{who:<10} {mark}"), &who, color);
                if a.timestamps {
                    let ts = l["ts_ns"].as_i64().unwrap_or(0);
                    s.push(' ');
                    s.push_str(
                        &jiff::Timestamp::from_nanosecond(i128::from(ts))
                            .map(|t| t.to_string())
                            .unwrap_or_default(),
                    );
                }
                s.push(' ');
                s.push_str(l["line"].as_str().unwrap_or(""));
                s
            };
            if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
                return Ok(0);
            }
        }
        cursor = v["cursor"].as_u64().unwrap_or(cursor);
        if !a.follow {
            return Ok(0);
        }
        drop(out);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

pub async fn logs(ctx: &Ctx, a: LogsArgs) -> Result<i32> {
    if a.query.is_some() || a.grep.is_some() {
        return search(ctx, &a).await;
    }
    if a.context.is_some() {
        return Err(super::usage("-C goes with --query or --grep"));
    }
    let client = ctx.client()?;
    let mut q = vec![format!("follow={}", a.follow)];
    if !a.services.is_empty() {
        q.push(format!("service={}", a.services.join(",")));
    }
    if let Some(s) = &a.since {
        q.push(format!("since_ns={}", parse_since(s)?));
    }
    if let Some(t) = a.tail {
        q.push(format!("tail={t}"));
    }
    if let Some(r) = a.replica {
        q.push(format!("replica={r}"));
    }
    let color = output::use_color();
    let json = a.output == "json";
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    client
        .stream(&format!("/capstan/v1/logs?{}", q.join("&")), |v| {
            let line = if json {
                v.to_string()
            } else {
                let who = format!("{}-{}", v["service"].as_str().unwrap_or(""), v["replica"]);
                let mut s = output::paint(&format!("{who:<10} |"), &who, color);
                if a.timestamps {
                    let ts = v["ts_ns"].as_i64().unwrap_or(0);
                    let t = jiff::Timestamp::from_nanosecond(i128::from(ts))
                        .map(|t| t.to_string())
                        .unwrap_or_default();
                    s.push(' ');
                    s.push_str(&t);
                }
                s.push(' ');
                s.push_str(v["line"].as_str().unwrap_or(""));
                s
            };
            // Stop quietly when the reader goes away (e.g. `| head`).
            writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
        })
        .await?;
    Ok(0)
}
