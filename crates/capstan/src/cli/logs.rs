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
    /// Print JSON records instead of text.
    #[arg(long, short = 'o', value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

fn parse_since(s: &str) -> Result<i64> {
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

pub async fn logs(ctx: &Ctx, a: LogsArgs) -> Result<i32> {
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
