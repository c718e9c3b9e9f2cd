//! The HTTP side of a published port: HTTP/1.1 (keep-alive) and HTTP/2 (h2c) in,
//! HTTP/1.1 to the replicas, with retries on connect failures, timeouts, header
//! hygiene, `traceparent`, WebSocket/Upgrade tunnels, metrics and access log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::balance::{Lease, Unavailable};
use super::body::{OnDone, ReqBody, RespBody, TooLarge};
use super::metrics::method_label;
use super::pool::{Pool, SendError};
use super::{AccessLine, Ctx};

/// Serves HTTP on the listener until the task is aborted.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    super::accept_loop(listener, ctx, connection).await;
}

/// One client connection: HTTP/1.1 or h2c, each request through [`handle`].
async fn connection(ctx: Arc<Ctx>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let (idle, max_header) = {
        let s = ctx.backend.settings.read().unwrap();
        (s.idle_timeout.0, s.max_header as usize)
    };
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Covers both a slow request head and an idle keep-alive connection.
        .header_read_timeout(idle)
        .max_buf_size(max_header.max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(max_header.min(u32::MAX as usize) as u32)
        .keep_alive_interval(Some(idle))
        .keep_alive_timeout(Duration::from_secs(20));
    // The client's address as text, once per connection (access log, X-Forwarded-For).
    let client: Arc<str> = peer.ip().to_string().into();
    let svc = hyper::service::service_fn(move |req| {
        let (ctx, client) = (ctx.clone(), client.clone());
        async move { Ok::<_, Infallible>(handle(ctx, client, req).await) }
    });
    let _ = b
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await;
}

/// Everything the end of a request needs: metrics, access log, pool, lease.
struct Finish {
    ctx: Arc<Ctx>,
    start: Instant,
    method: &'static str,
    path: String,
    status: u16,
    replica: Option<u32>,
    client: Arc<str>,
    trace_id: String,
    retries: u32,
    access_log: bool,
    lease: Option<Lease>,
    conn: Option<SendRequest<ReqBody>>,
}

impl OnDone for Finish {
    fn done(&mut self, bytes: u64, completed: bool) {
        let secs = self.start.elapsed().as_secs_f64();
        let b = &self.ctx.backend;
        b.metrics
            .record(self.replica, self.method, self.status, secs);
        if let (true, Some(conn), Some(lease)) = (completed, self.conn.take(), &self.lease) {
            lease.ep.pool.put(conn);
        }
        self.lease = None;
        if self.access_log {
            use std::fmt::Write;
            let us = (secs * 1e6) as u64;
            let mut line = String::with_capacity(128 + self.path.len());
            let _ = write!(
                line,
                "method={} path={:?} status={} bytes={bytes} duration_ms={}.{:03} replica=",
                self.method,
                self.path,
                self.status,
                us / 1000,
                us % 1000,
            );
            match self.replica {
                Some(r) => {
                    let _ = write!(line, "{r}");
                }
                None => line.push('-'),
            }
            let _ = write!(line, " client={} trace_id={}", self.client, self.trace_id);
            if self.retries > 0 {
                line.push_str(&format!(" retries={}", self.retries));
            }
            if !completed {
                line.push_str(" aborted=true");
            }
            let _ = self.ctx.access.try_send(AccessLine {
                service: b.service.clone(),
                replica: self.replica.unwrap_or(0),
                line,
            });
        }
    }
}

impl Finish {
    /// A response made by the proxy itself (errors), ending the request.
    fn local(
        mut self,
        status: StatusCode,
        retry_after: Option<u32>,
        msg: String,
    ) -> Response<RespBody> {
        self.status = status.as_u16();
        let mut r = Response::new(RespBody::full(format!("{msg}\n"), Some(Box::new(self))));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(s) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), dropped at the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers and those the `Connection` header names; an
/// upgrade keeps `Upgrade` and `Connection: upgrade`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The trace id of a valid W3C `traceparent` (version 00 layout).
pub fn trace_id_of(v: &str) -> Option<&str> {
    let b = v.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    if b.len() < 55 || (b.len() > 55 && b[0..2] == *b"00") {
        return None;
    }
    let ok = hex(&b[0..2])
        && &b[0..2] != b"ff"
        && b[2] == b'-'
        && hex(&b[3..35])
        && b[35] == b'-'
        && hex(&b[36..52])
        && b[52] == b'-'
        && hex(&b[53..55])
        && b[3..35].iter().any(|c| *c != b'0')
        && b[36..52].iter().any(|c| *c != b'0');
    ok.then(|| &v[3..35])
}

/// A new sampled `traceparent` and its trace id.
pub fn new_traceparent() -> (String, String) {
    fn hex(out: &mut String, x: u64) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for i in (0..16).rev() {
            out.push(DIGITS[((x >> (i * 4)) & 0xf) as usize] as char);
        }
    }
    let mut tp = String::with_capacity(55);
    tp.push_str("00-");
    hex(&mut tp, super::random_u64());
    hex(&mut tp, super::random_u64() | 1);
    tp.push('-');
    hex(&mut tp, super::random_u64() | 1);
    tp.push_str("-01");
    let trace = tp[3..35].to_owned();
    (tp, trace)
}

fn append_forwarded(h: &mut HeaderMap, client: &str, host: Option<HeaderValue>) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
    let prior: Vec<String> = h
        .get_all(&XFF)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let mut xff = prior.join(", ");
    if !xff.is_empty() {
        xff.push_str(", ");
    }
    xff.push_str(client);
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert(XFF, v);
    }
    if !h.contains_key(&XFP) {
        h.insert(XFP, HeaderValue::from_static("http"));
    }
    if !h.contains_key(&XFH)
        && let Some(host) = host
    {
        h.insert(XFH, host);
    }
}

async fn handle(ctx: Arc<Ctx>, client: Arc<str>, mut req: Request<Incoming>) -> Response<RespBody> {
    let start = Instant::now();
    let backend = ctx.backend.clone();
    let settings = backend.settings.read().unwrap().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let (traceparent, trace_id) = match req
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| trace_id_of(v).map(|t| (v.to_owned(), t.to_owned())))
    {
        Some(x) => x,
        None => new_traceparent(),
    };
    let mut fin = Finish {
        ctx: ctx.clone(),
        start,
        method: method_label(req.method()),
        path,
        status: 0,
        replica: None,
        client: client.clone(),
        trace_id,
        retries: 0,
        access_log: settings.access_log,
        lease: None,
        conn: None,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body) {
        return fin.local(
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            format!(
                "capstan: request body of {} bytes is larger than the limit of {} bytes (x-capstan.proxy.max_body)",
                declared.unwrap_or(0),
                settings.max_body
            ),
        );
    }
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers, upgrade);
    append_forwarded(&mut parts.headers, &client, host.clone());
    if let Ok(v) = HeaderValue::from_str(&traceparent) {
        parts.headers.insert(TRACEPARENT, v);
    }
    if let Some(h) = host {
        parts.headers.insert(header::HOST, h);
    }
    parts.uri = match fin.path.parse() {
        Ok(u) => u,
        Err(_) => hyper::Uri::from_static("/"),
    };
    parts.version = Version::HTTP_11;
    let body = if body.is_end_stream() {
        ReqBody::Empty
    } else {
        ReqBody::Stream {
            inner: body,
            limit: settings.max_body,
            seen: 0,
        }
    };
    let mut req = Request::from_parts(parts, body);

    let queue_deadline = backend.queue_deadline(settings.timeout.0);
    let mut exclude: Vec<u32> = Vec::new();
    let mut last_failure = String::new();
    loop {
        let lease = if exclude.is_empty() {
            match backend.acquire(&[], queue_deadline).await {
                Ok(l) => l,
                Err(Unavailable::Overflow) => {
                    return fin.local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Some(1),
                        format!(
                            "capstan: every replica of {} is busy and the queue of {} requests is full",
                            backend.service, settings.queue
                        ),
                    );
                }
                Err(Unavailable::Timeout {
                    waited,
                    had_replicas,
                }) => {
                    let why = if had_replicas {
                        "every replica stayed busy"
                    } else {
                        "no replica became ready"
                    };
                    return fin.local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Some(1),
                        format!(
                            "capstan: {why} for {} within {:.1}s",
                            backend.service,
                            waited.as_secs_f64()
                        ),
                    );
                }
            }
        } else {
            match backend.pick(&exclude) {
                Some(ep) => Lease::new(backend.clone(), ep),
                None => {
                    return fin.local(
                        StatusCode::BAD_GATEWAY,
                        None,
                        format!(
                            "capstan: no replica of {} could be reached: {last_failure}",
                            backend.service
                        ),
                    );
                }
            }
        };
        let ep = lease.ep.clone();
        fin.replica = Some(ep.replica);
        let sent_at = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + settings.timeout.0);
        if upgrade {
            return forward_upgrade(fin, lease, req, client_upgrade, settings.connect_timeout.0)
                .await;
        }
        let replay = replayable(&req);
        let result = tokio::time::timeout_at(
            deadline,
            ep.pool.send(ep.addr, settings.connect_timeout.0, req),
        )
        .await;
        let (again, reason) = match result {
            Ok(Ok((resp, conn))) => {
                ep.observe(sent_at.elapsed());
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                fin.status = parts.status.as_u16();
                fin.lease = Some(lease);
                fin.conn = Some(conn);
                return Response::from_parts(parts, RespBody::upstream(body, Box::new(fin)));
            }
            Ok(Err(SendError::NotSent(ns))) => {
                ctx.failed(&ep, &ns.reason);
                (ns.req, ns.reason)
            }
            Ok(Err(SendError::Failed(e))) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.downcast_ref::<TooLarge>().is_some());
                if too_large {
                    return fin.local(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        None,
                        format!(
                            "capstan: request body larger than the limit of {} bytes (x-capstan.proxy.max_body)",
                            settings.max_body
                        ),
                    );
                }
                let reason = format!("replica {} of {} failed: {e}", ep.replica, backend.service);
                ctx.failed(&ep, &reason);
                // The connection broke before any response: a request without a
                // body and with a safe method can be sent again elsewhere.
                match replay {
                    Some(r) => (r, reason),
                    None => {
                        return fin.local(
                            StatusCode::BAD_GATEWAY,
                            None,
                            format!("capstan: {reason}"),
                        );
                    }
                }
            }
            Err(_) => {
                let reason = format!(
                    "replica {} of {} did not answer within {}",
                    ep.replica, backend.service, settings.timeout
                );
                ctx.failed(&ep, &reason);
                return fin.local(
                    StatusCode::GATEWAY_TIMEOUT,
                    None,
                    format!("capstan: {reason} (x-capstan.proxy.timeout)"),
                );
            }
        };
        last_failure = reason;
        exclude.push(ep.replica);
        drop(lease);
        if fin.retries >= settings.retries {
            let attempts = fin.retries + 1;
            return fin.local(
                StatusCode::BAD_GATEWAY,
                None,
                format!(
                    "capstan: no replica of {} could be reached after {attempts} attempts: {last_failure}",
                    backend.service,
                ),
            );
        }
        fin.retries += 1;
        backend.metrics.retries.fetch_add(1, Relaxed);
        req = again;
    }
}

/// A copy of a request that may be sent twice: a safe method and no body.
fn replayable(req: &Request<ReqBody>) -> Option<Request<ReqBody>> {
    let safe = matches!(
        *req.method(),
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
    );
    if !safe || !matches!(req.body(), ReqBody::Empty) {
        return None;
    }
    let mut r = Request::new(ReqBody::Empty);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    Some(r)
}

/// Forwards an Upgrade request on its own connection; on 101 the two upgraded
/// connections are joined byte for byte until either side closes.
async fn forward_upgrade(
    mut fin: Finish,
    lease: Lease,
    req: Request<ReqBody>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    connect_timeout: Duration,
) -> Response<RespBody> {
    let ep = lease.ep.clone();
    let mut sender = match Pool::connect(ep.addr, connect_timeout, true).await {
        Ok(s) => s,
        Err(reason) => {
            fin.ctx.failed(&ep, &reason);
            return fin.local(StatusCode::BAD_GATEWAY, None, format!("capstan: {reason}"));
        }
    };
    let mut resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            return fin.local(
                StatusCode::BAD_GATEWAY,
                None,
                format!(
                    "capstan: upgrade request to replica {} failed: {e}",
                    ep.replica
                ),
            );
        }
    };
    fin.status = resp.status().as_u16();
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        fin.lease = Some(lease);
        return Response::from_parts(parts, RespBody::upstream(body, Box::new(fin)));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    // The tunnel holds the lease: an open WebSocket counts as in flight.
    tokio::spawn(async move {
        let _lease = lease;
        let (Some(client), Ok(up)) = (client_upgrade, upstream.await) else {
            return;
        };
        let Ok(client) = client.await else { return };
        let mut a = TokioIo::new(client);
        let mut b = TokioIo::new(up);
        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(
        parts,
        RespBody::full(bytes::Bytes::new(), Some(Box::new(fin))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(ok), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            None
        );
        assert_eq!(
            trace_id_of("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_of("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of("garbage"), None);
        let (tp, id) = new_traceparent();
        assert_eq!(trace_id_of(&tp), Some(id.as_str()));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrade_keeps_its_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        append_forwarded(
            &mut h,
            "127.0.0.1",
            Some(HeaderValue::from_static("example.com:8080")),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "example.com:8080");
    }
}
