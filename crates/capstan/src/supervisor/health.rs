//! Health probes (exec, HTTP, TCP) with compose's timing and retry rules.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::spec::{HealthTest, Healthcheck};

/// A health transition reported to the replica's task.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Healthy,
    Unhealthy(String),
}

/// Runs one probe: `Ok` when healthy, `Err(reason)` otherwise.
pub async fn probe(
    test: &HealthTest,
    port: u16,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), String> {
    let run = async {
        match test {
            HealthTest::Cmd(argv) => exec(argv, env).await,
            HealthTest::Shell(script) => {
                exec(&["/bin/sh".into(), "-c".into(), script.clone()], env).await
            }
            HealthTest::Http { path, port: p } => http(p.unwrap_or(port), path).await,
            HealthTest::Tcp { port: p } => {
                tokio::net::TcpStream::connect(("127.0.0.1", p.unwrap_or(port)))
                    .await
                    .map(drop)
                    .map_err(|e| format!("tcp connect to port {}: {e}", p.unwrap_or(port)))
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}", crate::spec::Dur(timeout))),
    }
}

async fn exec(argv: &[String], env: &BTreeMap<String, String>) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty health check command")?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run {prog:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        Err(format!(
            "command exited with {}{}{}",
            out.status,
            if err.is_empty() { "" } else { ": " },
            err.chars().take(200).collect::<String>()
        ))
    }
}

/// A minimal HTTP/1.0 GET: healthy on a 2xx or 3xx status.
async fn http(port: u16, path: &str) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("GET {path} on port {port}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: capstan-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut buf = vec![0u8; 256];
    let mut n = 0;
    while n < 16 {
        let r = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {path} returned {code}"))
    }
}

/// Probes forever, sending a [`Health`] on every change of status. Follows
/// compose: probes every `start_interval` during `start_period` (where failures do
/// not count) until the first success, then every `interval`; `retries`
/// consecutive failures make the replica unhealthy, one success makes it healthy.
/// Until the first success, probes come quickly — every eighth of the time
/// since the start, at least 2 ms apart, up to the interval — and their failures
/// do not count, so a replica takes traffic within an eighth of its own start
/// time of listening (a cold start waits on this).
pub async fn watch(
    hc: Healthcheck,
    port: u16,
    env: BTreeMap<String, String>,
    tx: mpsc::Sender<Health>,
) {
    let started = tokio::time::Instant::now();
    let mut failures = 0u32;
    let mut current: Option<bool> = None;
    let quick = || (started.elapsed() / 8).max(Duration::from_millis(2));
    tokio::time::sleep(quick()).await;
    loop {
        let warming = current.is_none() && quick() < hc.interval.0;
        let starting = warming || (started.elapsed() < hc.start_period.0 && current != Some(true));
        let next = match probe(&hc.test, port, &env, hc.timeout.0).await {
            Ok(()) => {
                failures = 0;
                (current != Some(true)).then_some(Health::Healthy)
            }
            Err(reason) => {
                if !starting {
                    failures += 1;
                }
                (failures >= hc.retries.max(1) && current != Some(false)).then(|| {
                    Health::Unhealthy(format!(
                        "{failures} consecutive failed checks, last: {reason}"
                    ))
                })
            }
        };
        if let Some(h) = next {
            current = Some(h == Health::Healthy);
            if tx.send(h).await.is_err() {
                return;
            }
        }
        let pause = if warming && current.is_none() {
            quick()
        } else if starting {
            hc.start_interval.0
        } else {
            hc.interval.0
        };
        tokio::time::sleep(pause).await;
    }
}
