//! Telemetry out: samples to remote_write receivers (`remote_write.rs`),
//! logs to Loki and spans to OTLP receivers (`stream.rs`).

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

pub mod remote_write;
pub mod stream;

/// Each logs and traces forwarding target's counters.
#[derive(Default)]
pub struct Forwarding {
    pub logs: Vec<std::sync::Arc<remote_write::Stats>>,
    pub traces: Vec<std::sync::Arc<remote_write::Stats>>,
}

/// One POST over plain HTTP/1.1 with `headers`; the status code, or why
/// there was none.
pub async fn post(
    url: &hyper::Uri,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<u16, String> {
    let host = url.host().ok_or("no host")?.to_owned();
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::post(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            "host",
            url.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header("user-agent", concat!("capstan/", env!("CARGO_PKG_VERSION")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}
