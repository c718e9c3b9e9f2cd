//! The CLI's side of the control API: finds the daemon of a data dir and talks to it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::daemon::DaemonInfo;

pub struct Client {
    pub info: DaemonInfo,
    token: String,
}

/// Why no daemon could be reached.
#[derive(Debug, thiserror::Error)]
#[error("no capstan daemon is running for {dir}; start one with `capstan up{flag}`")]
pub struct NotRunning {
    pub dir: String,
    pub flag: String,
}

impl Client {
    /// Connects to the daemon of `data_dir`, if one is running.
    pub fn find(data_dir: &Path, file_hint: Option<&Path>) -> Result<Client> {
        let not_running = || NotRunning {
            dir: data_dir.parent().unwrap_or(data_dir).display().to_string(),
            flag: file_hint
                .map(|f| format!(" -f {}", f.display()))
                .unwrap_or_default(),
        };
        let info: DaemonInfo = std::fs::read(data_dir.join("daemon.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(not_running)?;
        if !Path::new(&format!("/proc/{}", info.pid)).exists() {
            return Err(not_running().into());
        }
        let token = std::fs::read_to_string(data_dir.join("token"))
            .context("reading the API token")?
            .trim()
            .to_owned();
        Ok(Client { info, token })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream = tokio::net::TcpStream::connect(self.info.addr)
            .await
            .with_context(|| format!("connecting to the daemon at {}", self.info.addr))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let bytes = body
            .map(|b| serde_json::to_vec(&b))
            .transpose()?
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.info.addr.to_string())
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))?;
        Ok(sender.send_request(req).await?)
    }

    /// A request whose answer is one JSON document; errors carry the daemon's message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::json!({"error": String::from_utf8_lossy(&bytes)}));
        if status != StatusCode::OK {
            bail!(
                "{}",
                v.get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("request failed")
            );
        }
        Ok(v)
    }

    /// Streams newline-delimited JSON, calling `f` per line until it returns false.
    pub async fn stream(
        &self,
        path: &str,
        mut f: impl FnMut(serde_json::Value) -> bool,
    ) -> Result<()> {
        let resp = self.send(Method::GET, path, None).await?;
        if resp.status() != StatusCode::OK {
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(anyhow!("{}", String::from_utf8_lossy(&bytes)));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if let Ok(v) = serde_json::from_slice(&line[..line.len() - 1])
                    && !f(v)
                {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The data dir of a stack file: `--data-dir`, `$CAPSTAN_DATA_DIR`, or `.capstan` beside the file.
pub fn data_dir(explicit: Option<&Path>, file: &Path) -> PathBuf {
    if let Some(d) = explicit {
        return d.to_path_buf();
    }
    if let Ok(d) = std::env::var("CAPSTAN_DATA_DIR")
        && !d.is_empty()
    {
        return PathBuf::from(d);
    }
    std::path::absolute(file)
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(".capstan")))
        .unwrap_or_else(|| PathBuf::from(".capstan"))
}
