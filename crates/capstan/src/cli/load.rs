//! `capstan load`: an HTTP load generator. Closed loop (`-c N` connections, each
//! sends its next request when the last is answered) or open loop (`--rate R`
//! requests a second on a fixed schedule; a request's latency counts from when it
//! was due, not from when it was sent, so a stalled server cannot hide its stall
//! — the coordinated-omission correction of wrk2 and oha). Latencies go into an
//! HdrHistogram per connection, merged at the end.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadOutput {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Target URL: http://HOST[:PORT][/PATH[?QUERY]].
    url: String,
    /// Connections. Closed loop: each sends its next request when the last is
    /// answered. With --rate: the most requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 10)]
    concurrency: usize,
    /// Open loop: requests a second on a fixed schedule; latency counts from when
    /// each request was due.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send requests.
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_dur)]
    duration: Duration,
    /// Request method.
    #[arg(short = 'm', long, default_value = "GET")]
    method: String,
    /// Request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body.
    #[arg(long)]
    body: Option<String>,
    /// Longest wait for a connection or a response.
    #[arg(long, default_value = "5s", value_parser = parse_dur)]
    timeout: Duration,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: LoadOutput,
    /// Exit with 1 when any answer was of this class (`5xx`, `4xx`) or any
    /// request failed in transport (`error`); repeatable.
    #[arg(long = "fail-on", value_parser = parse_fail_on)]
    fail_on: Vec<FailOn>,
}

/// What makes `capstan load` exit non-zero.
#[derive(Debug, Clone, Copy, PartialEq)]
enum FailOn {
    /// Answers with a status of this hundred (4 for 4xx, 5 for 5xx).
    Class(u16),
    /// Transport errors (connect, timeout, broken connection).
    Error,
}

fn parse_fail_on(s: &str) -> Result<FailOn, String> {
    match s.to_ascii_lowercase().as_str() {
        "5xx" => Ok(FailOn::Class(5)),
        "4xx" => Ok(FailOn::Class(4)),
        "error" | "errors" => Ok(FailOn::Error),
        other => Err(format!("expected 5xx, 4xx or error, found {other:?}")),
    }
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    crate::spec::parse_duration(s)
}

/// The parts of an `http://` URL a request needs.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    host: String,
    port: u16,
    /// Path and query.
    path: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let Some(rest) = url.strip_prefix("http://") else {
        if url.starts_with("https://") {
            bail!("{url}: https is not supported yet; use http://");
        }
        bail!("{url}: expected a URL starting with http://");
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    if authority.is_empty() {
        bail!("{url}: no host");
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            let port = p
                .parse::<u16>()
                .with_context(|| format!("{url}: bad port {p:?}"))?;
            (h.trim_matches(['[', ']']).to_owned(), port)
        }
        _ => (authority.trim_matches(['[', ']']).to_owned(), 80),
    };
    Ok(Target { host, port, path })
}

/// What one connection saw.
struct Tally {
    /// Microseconds.
    latency: Histogram<u64>,
    status: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    bytes: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            // 1 µs to 1 h, three significant digits.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            bytes: 0,
        }
    }

    fn merge(&mut self, o: Tally) {
        let _ = self.latency.add(&o.latency);
        for (k, v) in o.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.bytes += o.bytes;
    }
}

struct Plan {
    addr: SocketAddr,
    target: Target,
    method: hyper::Method,
    headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    body: Bytes,
    timeout: Duration,
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    /// Open loop: the number of the next request to send.
    next: AtomicU64,
    /// Responses and errors so far (for the progress line).
    done: AtomicU64,
    /// Interrupted (Ctrl-C): no new request; what was measured is reported.
    interrupted: std::sync::atomic::AtomicBool,
}

async fn connect(plan: &Plan) -> Result<SendRequest<Full<Bytes>>, &'static str> {
    let stream =
        match tokio::time::timeout(plan.timeout, tokio::net::TcpStream::connect(plan.addr)).await {
            Err(_) => return Err("connect timeout"),
            Ok(Err(_)) => return Err("connect"),
            Ok(Ok(s)) => s,
        };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| "connect")?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn connection(plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::new();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        // When this request is due: now (closed loop) or its slot in the schedule.
        let due = match plan.rate {
            None => Instant::now(),
            Some(rate) => {
                let i = plan.next.fetch_add(1, Relaxed);
                plan.start + Duration::from_secs_f64(i as f64 / rate)
            }
        };
        if due >= plan.end || plan.interrupted.load(Relaxed) {
            break;
        }
        tokio::time::sleep_until(due).await;
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect(&plan).await {
                Ok(s) => sender = Some(s),
                Err(kind) => {
                    *tally.errors.entry(kind).or_default() += 1;
                    plan.done.fetch_add(1, Relaxed);
                    // Do not spin on a refused port.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let mut req = hyper::Request::builder()
            .method(plan.method.clone())
            .uri(plan.target.path.as_str())
            .header(
                hyper::header::HOST,
                format!("{}:{}", plan.target.host, plan.target.port),
            );
        for (k, v) in &plan.headers {
            req = req.header(k, v);
        }
        let Ok(req) = req.body(Full::new(plan.body.clone())) else {
            break;
        };
        let exchange = async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body.len()))
        };
        match tokio::time::timeout(plan.timeout, exchange).await {
            Ok(Ok((status, n))) => {
                let us = due.elapsed().as_micros().max(1) as u64;
                let _ = tally.latency.record(us.min(tally.latency.high()));
                *tally.status.entry(status).or_default() += 1;
                tally.bytes += n as u64;
            }
            Ok(Err(_)) => {
                *tally.errors.entry("io").or_default() += 1;
                sender = None;
            }
            Err(_) => {
                *tally.errors.entry("timeout").or_default() += 1;
                sender = None;
            }
        }
        plan.done.fetch_add(1, Relaxed);
    }
    tally
}

pub async fn load(args: LoadArgs) -> Result<i32> {
    let target = parse_url(&args.url)?;
    if args.concurrency == 0 {
        bail!("-c/--concurrency must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of requests a second, got {r}");
    }
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("resolving {}", target.host))?
        .next()
        .with_context(|| format!("{} has no address", target.host))?;
    let method = hyper::Method::from_bytes(args.method.to_uppercase().as_bytes())
        .with_context(|| format!("bad method {:?}", args.method))?;
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((k, v)) = h.split_once(':') else {
            bail!("header {h:?}: expected `Name: value`");
        };
        headers.push((
            hyper::header::HeaderName::from_bytes(k.trim().as_bytes())
                .with_context(|| format!("header {h:?}: bad name"))?,
            hyper::header::HeaderValue::from_str(v.trim())
                .with_context(|| format!("header {h:?}: bad value"))?,
        ));
    }
    let start = Instant::now();
    let plan = Arc::new(Plan {
        addr,
        target,
        method,
        headers,
        body: Bytes::from(args.body.clone().unwrap_or_default()),
        timeout: args.timeout,
        start,
        end: start + args.duration,
        rate: args.rate,
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        interrupted: Default::default(),
    });
    // Ctrl-C (or SIGINT from a script) ends the load early, with its figures.
    {
        let plan = plan.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                plan.interrupted.store(true, Relaxed);
            }
        });
    }
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(connection(plan.clone())))
        .collect();
    let progress = progress(plan.clone(), args.duration);
    let mut total = Tally::new();
    for t in tasks {
        total.merge(t.await.context("a connection task failed")?);
    }
    progress.abort();
    let took = start.elapsed();
    let summary = summary(&total, took, &args);
    match args.output {
        LoadOutput::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        LoadOutput::Text => print!("{}", text(&summary)),
    }
    let answered: u64 = total.status.values().sum();
    let class = |c: u16| -> u64 {
        total
            .status
            .iter()
            .filter(|(k, _)| **k / 100 == c)
            .map(|(_, v)| v)
            .sum()
    };
    let failed = args.fail_on.iter().any(|f| match f {
        FailOn::Class(c) => class(*c) > 0,
        FailOn::Error => total.errors.values().sum::<u64>() > 0,
    });
    Ok(if answered == 0 || failed { 1 } else { 0 })
}

/// A progress bar with the current rate, on a terminal only.
fn progress(plan: Arc<Plan>, duration: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {elapsed}/{msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = Instant::now();
            let done = plan.done.load(Relaxed);
            let rps = (done - last.1) as f64 / (now - last.0).as_secs_f64();
            last = (now, done);
            bar.set_position((now - plan.start).as_millis() as u64);
            bar.set_message(format!(
                "{} · {done} requests · {rps:.0}/s",
                crate::spec::Dur(duration)
            ));
            if now >= plan.end {
                bar.finish_and_clear();
                return;
            }
        }
    })
}

fn summary(t: &Tally, took: Duration, args: &LoadArgs) -> serde_json::Value {
    let answered: u64 = t.status.values().sum();
    let errors: u64 = t.errors.values().sum();
    // Answers that say the server failed (5xx) are failures, beside transport errors.
    let failed: u64 = t
        .status
        .iter()
        .filter(|(k, _)| **k >= 500)
        .map(|(_, v)| v)
        .sum();
    let ms = |us: u64| us as f64 / 1000.0;
    let h = &t.latency;
    let latency = if h.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::json!({
            "p50": ms(h.value_at_quantile(0.5)),
            "p90": ms(h.value_at_quantile(0.9)),
            "p99": ms(h.value_at_quantile(0.99)),
            "p99.9": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()),
            "mean": h.mean() / 1000.0,
        })
    };
    serde_json::json!({
        "url": args.url,
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "rate": args.rate,
        "connections": args.concurrency,
        "duration_s": took.as_secs_f64(),
        "requests": answered,
        "rps": answered as f64 / took.as_secs_f64().max(1e-9),
        "failed": failed,
        "ok": answered - failed,
        "errors": errors,
        "errors_by_kind": t.errors,
        "status": t.status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        "bytes": t.bytes,
        "latency_ms": latency,
    })
}

fn text(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {} for {:.2} s, {} connections{}",
        s["mode"].as_str().unwrap_or(""),
        s["url"].as_str().unwrap_or(""),
        s["duration_s"].as_f64().unwrap_or(0.0),
        s["connections"],
        s["rate"]
            .as_f64()
            .map(|r| format!(", {r} requests/s scheduled"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "requests   {} ({:.1}/s), {} failed (5xx), {} errors",
        s["requests"],
        s["rps"].as_f64().unwrap_or(0.0),
        s["failed"],
        s["errors"]
    );
    if let Some(kinds) = s["errors_by_kind"].as_object().filter(|k| !k.is_empty()) {
        let list: Vec<String> = kinds.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "errors     {}", list.join(", "));
    }
    if let Some(st) = s["status"].as_object() {
        let list: Vec<String> = st.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(out, "status     {}", list.join(", "));
    }
    let l = &s["latency_ms"];
    if !l.is_null() {
        let _ = writeln!(
            out,
            "latency    p50 {:.3} ms · p90 {:.3} · p99 {:.3} · p99.9 {:.3} · max {:.3}",
            l["p50"].as_f64().unwrap_or(0.0),
            l["p90"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["p99.9"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0),
        );
    }
    let _ = writeln!(out, "received   {} bytes", s["bytes"]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8080/work?ms=5").unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/work?ms=5".into()
            }
        );
        let t = parse_url("http://example.com").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        let t = parse_url("http://h:1?x=1").unwrap();
        assert_eq!(t.path, "/?x=1");
        let t = parse_url("http://[::1]:9/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert!(
            parse_url("https://x/")
                .unwrap_err()
                .to_string()
                .contains("https is not supported")
        );
        assert!(parse_url("x:80").is_err());
        assert!(
            parse_url("http://h:port/")
                .unwrap_err()
                .to_string()
                .contains("bad port")
        );
        assert!(parse_url("http:///p").is_err());
    }
}
