//! `capstan query` (PromQL against the running daemon) and `capstan promtest`
//! (Prometheus' test scripts against the engine, no daemon needed).

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use hyper::Method;

use super::{Ctx, FileOpt, Output, usage};
use crate::scrape::encode;

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    pub f: FileOpt,
    /// The PromQL expression.
    pub expr: String,
    /// Evaluation time (RFC 3339 or Unix seconds; default now). With --range, the end.
    #[arg(long)]
    pub time: Option<String>,
    /// Evaluate over this much time before --time (a range query), e.g. 1h.
    #[arg(long)]
    pub range: Option<String>,
    /// Resolution of a range query (default: the range / 60, at least 1s).
    #[arg(long)]
    pub step: Option<String>,
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

fn secs(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

pub async fn query(ctx: &Ctx, a: QueryArgs) -> Result<i32> {
    let client = ctx.client()?;
    let end = match &a.time {
        Some(t) => crate::api::prom::parse_time(t).map_err(usage)?,
        None => jiff::Timestamp::now().as_millisecond(),
    };
    let path = match &a.range {
        None => format!("/api/v1/query?query={}&time={}", encode(&a.expr), secs(end)),
        Some(r) => {
            let r = crate::api::prom::parse_duration(r).map_err(usage)?;
            let step = match &a.step {
                Some(s) => crate::api::prom::parse_duration(s).map_err(usage)?,
                None => (r / 60).max(1000),
            };
            format!(
                "/api/v1/query_range?query={}&start={}&end={}&step={}",
                encode(&a.expr),
                secs(end - r),
                secs(end),
                secs(step)
            )
        }
    };
    let v = client.json(Method::GET, &path, None).await?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for w in v["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    let data = &v["data"];
    let spark = std::io::stdout().is_terminal();
    match data["resultType"].as_str() {
        Some("scalar") | Some("string") => println!("{}", value_text(&data["result"][1])),
        Some("vector") => {
            let rows: Vec<(String, String)> = data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| (series_name(&s["metric"]), value_text(&s["value"][1])))
                .collect();
            if rows.is_empty() {
                println!("(no data)");
            }
            let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(6).max(6);
            if !rows.is_empty() {
                println!("{:w$}  VALUE", "SERIES");
            }
            for (s, val) in rows {
                println!("{s:w$}  {val}");
            }
        }
        Some("matrix") => {
            let series = data["result"].as_array().cloned().unwrap_or_default();
            if series.is_empty() {
                println!("(no data)");
            }
            let names: Vec<String> = series.iter().map(|s| series_name(&s["metric"])).collect();
            let w = names.iter().map(|n| n.len()).max().unwrap_or(6).max(6);
            if !series.is_empty() {
                println!(
                    "{:w$}  {:>12}  {:>12}  {:>12}  POINTS{}",
                    "SERIES",
                    "LAST",
                    "MIN",
                    "MAX",
                    if spark { "  TREND" } else { "" }
                );
            }
            for (s, name) in series.iter().zip(names) {
                let vals: Vec<f64> = s["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p[1].as_str().and_then(parse_value))
                    .collect();
                let last = vals.last().copied().unwrap_or(f64::NAN);
                let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
                let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                println!(
                    "{name:w$}  {:>12}  {:>12}  {:>12}  {:>6}{}",
                    short(last),
                    short(min),
                    short(max),
                    vals.len(),
                    if spark {
                        format!("  {}", sparkline(&vals, 40))
                    } else {
                        String::new()
                    }
                );
            }
        }
        _ => println!("{data}"),
    }
    Ok(0)
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
}

fn short(v: f64) -> String {
    if v.is_nan() || v.is_infinite() || v == v.trunc() && v.abs() < 1e12 {
        return capstan_promql::mathx::format_value(v);
    }
    format!("{v:.6}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned()
}

fn value_text(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

fn series_name(m: &serde_json::Value) -> String {
    let Some(obj) = m.as_object() else {
        return "{}".into();
    };
    let name = obj.get("__name__").and_then(|v| v.as_str()).unwrap_or("");
    let labels: Vec<String> = obj
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| format!("{k}={}", v))
        .collect();
    if labels.is_empty() && !name.is_empty() {
        return name.to_owned();
    }
    format!("{name}{{{}}}", labels.join(", "))
}

/// The values as a line of block characters, resampled to `width`.
fn sparkline(vals: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let finite: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return String::new();
    }
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let n = vals.len().min(width);
    (0..n)
        .map(|i| {
            let v = vals[i * vals.len() / n];
            if !v.is_finite() {
                ' '
            } else if max == min {
                BARS[3]
            } else {
                BARS[(((v - min) / (max - min)) * 7.0).round() as usize]
            }
        })
        .collect()
}

#[derive(clap::Args, Debug)]
pub struct PromtestArgs {
    /// promqltest script files (Prometheus' test script language).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print every failure and skip with its reason.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

pub fn promtest(a: PromtestArgs) -> Result<i32> {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for f in &a.files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let r = capstan_promql::runner::run(&text)
            .map_err(|e| usage(format!("{}: {e}", f.display())))?;
        println!(
            "{}: {} passed, {} failed, {} skipped",
            f.display(),
            r.passed,
            r.failed,
            r.skipped
        );
        for m in &r.failures {
            println!("  FAIL {m}");
        }
        if a.verbose {
            for m in &r.skips {
                println!("  SKIP {m}");
            }
        } else if !r.skips.is_empty() {
            println!(
                "  ({} skipped: native histograms; -v lists them)",
                r.skips.len()
            );
        }
        passed += r.passed;
        failed += r.failed;
        skipped += r.skipped;
    }
    println!("total: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed > 0 { 1 } else { 0 })
}
