//! A minimal HTTP/1.1 GET for scrapes: one connection per scrape, a deadline for
//! the whole exchange, a cap on the body size.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Largest scrape body accepted.
pub const MAX_BODY: usize = 64 << 20;

pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

pub async fn get(
    addr: &str,
    path: &str,
    accept: &str,
    timeout: Duration,
) -> Result<Response, String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::builder()
            .uri(path)
            .header("host", addr)
            .header("accept", accept)
            .header("user-agent", concat!("capstan/", env!("CARGO_PKG_VERSION")))
            .header(
                "x-prometheus-scrape-timeout-seconds",
                format!("{:.3}", timeout.as_secs_f64()),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the body of GET {path}: {e}"))?
            .to_bytes();
        Ok(Response {
            status,
            content_type,
            body,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "scrape timed out after {}",
            crate::spec::Dur(timeout)
        )),
    }
}
