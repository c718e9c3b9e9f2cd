//! Health probes (exec, HTTP, TCP): the supervisor's health checks and the
//! proxy's re-admission of an ejected replica both run them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::spec::HealthTest;

/// Runs one probe: `Ok` when healthy, `Err(reason)` otherwise.
pub async fn probe(
    test: &HealthTest,
    addr: SocketAddr,
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<(), String> {
    let port = addr.port();
    let at = |p: Option<u16>| SocketAddr::new(addr.ip(), p.unwrap_or(port));
    let run = async {
        match test {
            HealthTest::Cmd(argv) => exec(argv, env).await,
            HealthTest::Shell(script) => {
                exec(&["/bin/sh".into(), "-c".into(), script.clone()], env).await
            }
            HealthTest::Http { path, port: p } => http(at(*p), path).await,
            HealthTest::Tcp { port: p } => tokio::net::TcpStream::connect(at(*p))
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect to port {}: {e}", at(*p).port())),
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
async fn http(addr: SocketAddr, path: &str) -> Result<(), String> {
    let port = addr.port();
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("GET {path} on port {port}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: capstan-health\r\nConnection: close\r\n\r\n"
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
