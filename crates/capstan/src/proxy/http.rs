//! The HTTP side of a published port: HTTP/1.1 (keep-alive) and HTTP/2 (h2c) in,
//! HTTP/1.1 to the replicas (HTTP/2 cleartext for gRPC and `protocol: h2c`,
//! trailers end to end), with retries on connect failures, timeouts, header
//! hygiene, `traceparent`, WebSocket/Upgrade tunnels, metrics and access log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use capstan_logstore::Entry;

use crate::ingest::push_hex;
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
use super::{Ctx, Finished};

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
    revision: crate::state::Revision,
    client: Arc<str>,
    trace_id: String,
    span: Option<SpanStart>,
    retries: u32,
    /// The gRPC status, from the response's head or trailers.
    grpc_status: Option<u32>,
    access_log: bool,
    lease: Option<Lease>,
    conn: Option<SendRequest<ReqBody>>,
}

impl OnDone for Finish {
    fn done(&mut self, bytes: u64, completed: bool, grpc_status: Option<u32>) {
        if grpc_status.is_some() {
            self.grpc_status = grpc_status;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let b = &self.ctx.backend;
        b.metrics.record(
            self.replica.map(|r| (self.revision, r)),
            self.method,
            self.status,
            secs,
        );
        if let (true, Some(conn), Some(lease)) = (completed, self.conn.take(), &self.lease) {
            lease.ep.pool.put(conn);
        }
        self.lease = None;
        let line = self
            .access_log
            .then(|| self.access_line(bytes, us_of(secs), completed));
        let span = self
            .span
            .take()
            .map(|s| self.span(s, bytes, secs, completed));
        if line.is_some() || span.is_some() {
            let _ = self.ctx.access.try_send(Finished {
                service: b.service.clone(),
                replica: self.replica.unwrap_or(0),
                line,
                span,
            });
        }
    }
}

fn us_of(secs: f64) -> u64 {
    (secs * 1e6) as u64
}

/// The proxy's span of one request, started: its ids and what the end adds to.
struct SpanStart {
    ids: SpanIds,
    start_unix_ns: u64,
    user_agent: Option<String>,
}

impl Finish {
    /// The request as one logfmt line.
    fn access_line(&self, bytes: u64, us: u64, completed: bool) -> String {
        use std::fmt::Write;
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
            let _ = write!(line, " retries={}", self.retries);
        }
        if let Some(g) = self.grpc_status {
            let _ = write!(line, " grpc_status={g}");
        }
        if !completed {
            line.push_str(" aborted=true");
        }
        line
    }

    /// The request as an OTLP server span (HTTP semantic conventions), as the
    /// span store keeps it: OTLP JSON written directly, fields at their
    /// defaults left out.
    fn span(&self, s: SpanStart, bytes: u64, secs: f64, completed: bool) -> Entry {
        use std::fmt::Write;
        let method = if self.method == "other" {
            "_OTHER"
        } else {
            self.method
        };
        let (path, query) = self.path.split_once('?').unwrap_or((&self.path, ""));
        let end = s.start_unix_ns + (secs * 1e9) as u64;
        let mut j = String::with_capacity(512 + self.path.len());
        j.push_str(r#"{"traceId":""#);
        push_hex(&mut j, &s.ids.trace);
        j.push_str(r#"","spanId":""#);
        push_hex(&mut j, &s.ids.id);
        if let Some(p) = s.ids.parent {
            j.push_str(r#"","parentSpanId":""#);
            push_hex(&mut j, &p);
        }
        let _ = write!(
            j,
            r#"","name":"{method}","kind":2,"startTimeUnixNano":"{}","endTimeUnixNano":"{end}","attributes":["#,
            s.start_unix_ns
        );
        let text = |j: &mut String, k: &str, v: &str| {
            let _ = write!(j, r#"{{"key":"{k}","value":{{"stringValue":"#);
            json_str(j, v);
            j.push_str("}},");
        };
        let int = |j: &mut String, k: &str, v: u64| {
            let _ = write!(j, r#"{{"key":"{k}","value":{{"intValue":"{v}"}}}},"#);
        };
        text(&mut j, "http.request.method", method);
        text(&mut j, "url.path", path);
        if !query.is_empty() {
            text(&mut j, "url.query", query);
        }
        text(&mut j, "url.scheme", "http");
        text(&mut j, "client.address", &self.client);
        if let Some(ua) = &s.user_agent {
            text(&mut j, "user_agent.original", ua);
        }
        if self.status > 0 {
            int(&mut j, "http.response.status_code", u64::from(self.status));
        }
        int(&mut j, "http.response.body.size", bytes);
        if let Some(r) = self.replica {
            int(&mut j, "capstan.replica", u64::from(r));
        }
        if self.retries > 0 {
            int(&mut j, "capstan.retries", u64::from(self.retries));
        }
        if let Some(g) = self.grpc_status {
            text(&mut j, "rpc.system", "grpc");
            int(&mut j, "rpc.grpc.status_code", u64::from(g));
        }
        j.pop();
        j.push(']');
        // Server spans are errors for 5xx only (4xx are the client's), and
        // for the gRPC codes that mean a server fault (OpenTelemetry's RPC
        // conventions: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
        // UNAVAILABLE, DATA_LOSS).
        let grpc_fault = self
            .grpc_status
            .is_some_and(|g| matches!(g, 2 | 4 | 12 | 13 | 14 | 15));
        if !completed {
            j.push_str(r#","status":{"code":2,"message":"response aborted"}"#);
        } else if self.status >= 500 || grpc_fault {
            j.push_str(r#","status":{"code":2}"#);
        }
        j.push('}');
        Entry {
            ts_ns: i64::try_from(s.start_unix_ns).unwrap_or(i64::MAX),
            seq: 0,
            line: j,
            meta: vec![("trace_id".into(), self.trace_id.clone())],
        }
    }

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

/// A gRPC request (`content-type: application/grpc`, `+proto`, `+json`, …).
fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
        })
}

/// Whether the client's `TE` accepts trailers (gRPC sends `te: trailers`).
fn wants_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// The `grpc-status` of a response head or trailers.
pub fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
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

/// The parts of a valid W3C `traceparent`: trace id, parent id (both lower-case
/// hex) and flags. Versions above 00 are read by the 00 layout, as the
/// specification asks.
pub fn parse_traceparent(v: &str) -> Option<(&str, &str, u8)> {
    let b = v.as_bytes();
    let hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    if b.len() < 55 || (b.len() > 55 && (b[0..2] == *b"00" || b[55] != b'-')) {
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
    let flags = u8::from_str_radix(v.get(53..55)?, 16).ok()?;
    ok.then(|| (&v[3..35], &v[36..52], flags))
}

/// The trace id of a valid W3C `traceparent`.
pub fn trace_id_of(v: &str) -> Option<&str> {
    parse_traceparent(v).map(|(t, _, _)| t)
}

/// The ids of the proxy's span of a request.
#[derive(Debug, Clone, PartialEq)]
struct SpanIds {
    trace: [u8; 16],
    id: [u8; 8],
    parent: Option<[u8; 8]>,
}

/// A request's place in its trace: the trace id (hex), the `traceparent` sent
/// on, and the proxy's span when it records one.
#[derive(Debug)]
struct TraceCtx {
    trace_id: String,
    forward: String,
    span: Option<SpanIds>,
}

/// `v` as a JSON string.
fn json_str(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = s
            .get(2 * i..2 * i + 2)
            .and_then(|d| u8::from_str_radix(d, 16).ok())
            .unwrap_or(0);
    }
    out
}

/// A random id with at least one bit set.
fn random_id<const N: usize>() -> [u8; N] {
    let mut out = [0; N];
    for chunk in out.chunks_mut(8) {
        let r = super::random_u64().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    out[N - 1] |= 1;
    out
}

/// The trace context of a request that came with `incoming` (its
/// `traceparent`, if any), with `ratio` the share of new traces to sample
/// (0: the proxy records nothing and leaves sampling to the replicas). A
/// sampled trace gets the proxy's span, which the replica sees as its parent;
/// a caller's unsampled one goes on untouched.
fn trace_context(incoming: Option<&str>, ratio: f64) -> TraceCtx {
    let record = ratio > 0.0;
    let (trace, parent, flags) = match incoming.and_then(parse_traceparent) {
        Some((t, p, f)) => {
            if !record || f & 1 == 0 {
                let mut forward = incoming.unwrap_or_default().to_owned();
                if !forward.starts_with("00-") || forward.len() != 55 {
                    // A later version goes on in the layout this proxy knows.
                    forward = format!("00-{t}-{p}-{f:02x}");
                }
                return TraceCtx {
                    trace_id: t.to_owned(),
                    forward,
                    span: None,
                };
            }
            (unhex::<16>(t), Some(unhex::<8>(p)), f)
        }
        None => {
            let sampled = ratio >= 1.0
                || !record
                || (super::random_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < ratio;
            if !sampled {
                // Not sampled: the replica sees a context that says so.
                let mut forward = String::with_capacity(55);
                forward.push_str("00-");
                push_hex(&mut forward, &random_id::<16>());
                forward.push('-');
                push_hex(&mut forward, &random_id::<8>());
                forward.push_str("-00");
                return TraceCtx {
                    trace_id: forward[3..35].to_owned(),
                    forward,
                    span: None,
                };
            }
            (random_id::<16>(), None, 1)
        }
    };
    let id = random_id::<8>();
    let mut forward = String::with_capacity(55);
    forward.push_str("00-");
    push_hex(&mut forward, &trace);
    forward.push('-');
    push_hex(&mut forward, &id);
    forward.push('-');
    push_hex(&mut forward, &[flags]);
    TraceCtx {
        trace_id: forward[3..35].to_owned(),
        forward,
        span: record.then_some(SpanIds { trace, id, parent }),
    }
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
    let start = crate::state::clock::stopwatch();
    let backend = ctx.backend.clone();
    let settings = backend.settings.read().unwrap().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let tc = trace_context(
        req.headers()
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
        settings.traces,
    );
    let span = tc.span.map(|ids| SpanStart {
        ids,
        start_unix_ns: u64::try_from(crate::logs::now_ns()).unwrap_or(0),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    let mut fin = Finish {
        ctx: ctx.clone(),
        start,
        method: method_label(req.method()),
        path,
        status: 0,
        replica: None,
        revision: 0,
        client: client.clone(),
        trace_id: tc.trace_id,
        span,
        retries: 0,
        grpc_status: None,
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
    let (bucket, set_cookie) = route_bucket(&backend, req.headers());
    let upgrade = is_upgrade(&req);
    // HTTP/2 to the replica when the service speaks it, and for gRPC always
    // (it cannot work over HTTP/1.1).
    let h2 = !upgrade && (ctx.h2c || is_grpc(req.headers()));
    let te_trailers = h2 && wants_trailers(req.headers());
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
    if let Ok(v) = HeaderValue::from_str(&tc.forward) {
        parts.headers.insert(TRACEPARENT, v);
    }
    if h2 {
        // HTTP/2 carries the host in `:authority`, from the URI.
        parts.headers.remove(header::HOST);
        if te_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        parts.uri = hyper::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(fin.path.as_str())
            .build()
            .unwrap_or_else(|_| hyper::Uri::from_static("http://localhost/"));
        parts.version = Version::HTTP_2;
    } else {
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
        parts.uri = match fin.path.parse() {
            Ok(u) => u,
            Err(_) => hyper::Uri::from_static("/"),
        };
        parts.version = Version::HTTP_11;
    }
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
    let mut exclude: Vec<super::balance::Tried> = Vec::new();
    let mut last_failure = String::new();
    loop {
        let lease = if exclude.is_empty() {
            match backend.acquire(&[], queue_deadline, bucket).await {
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
            match backend.pick(&exclude, bucket) {
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
        fin.revision = ep.revision;
        let sent_at = crate::state::clock::stopwatch();
        let deadline = tokio::time::Instant::from_std(start + settings.timeout.0);
        if upgrade {
            return forward_upgrade(fin, lease, req, client_upgrade, settings.connect_timeout.0)
                .await;
        }
        let replay = replayable(&req);
        let connect = settings.connect_timeout.0;
        let result = tokio::time::timeout_at(deadline, async {
            if h2 {
                let resp = ep.pool.send_h2(ep.addr, connect, req).await?;
                Ok((resp, None))
            } else {
                let (resp, conn) = ep.pool.send(ep.addr, connect, req).await?;
                Ok((resp, Some(conn)))
            }
        })
        .await;
        let (again, reason) = match result {
            Ok(Ok((resp, conn))) => {
                ep.observe(sent_at.elapsed());
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, false);
                if let Some(c) = set_cookie {
                    parts.headers.append(header::SET_COOKIE, c);
                }
                fin.status = parts.status.as_u16();
                // A trailers-only gRPC response has its status in the head.
                fin.grpc_status = grpc_status(&parts.headers);
                fin.lease = Some(lease);
                fin.conn = conn;
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
        exclude.push((ep.revision, ep.replica));
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

/// Where a request falls in a canary's split (0..10000): by the sticky
/// header's or cookie's value when the rollout asks for stickiness, else at
/// random. A client without the sticky cookie gets one (to set on the
/// response).
fn route_bucket(b: &super::balance::Backend, h: &HeaderMap) -> (u32, Option<HeaderValue>) {
    let sticky = b
        .split
        .read()
        .unwrap()
        .as_ref()
        .and_then(|s| s.sticky.clone());
    let hash = |v: &[u8]| {
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        for c in v {
            x = (x ^ u64::from(*c)).wrapping_mul(0x0100_0000_01b3);
        }
        (x % 10_000) as u32
    };
    match sticky {
        None => (b.bucket(), None),
        Some(crate::spec::Sticky::Header(name)) => match h.get(name.as_str()) {
            Some(v) => (hash(v.as_bytes()), None),
            None => (b.bucket(), None),
        },
        Some(crate::spec::Sticky::Cookie(name)) => {
            let found = h
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == name).then(|| v.to_owned())
                });
            match found {
                Some(v) => (hash(v.as_bytes()), None),
                None => {
                    let token = format!("{:016x}", super::random_u64());
                    let cookie = format!("{name}={token}; Path=/; HttpOnly; SameSite=Lax");
                    (hash(token.as_bytes()), HeaderValue::from_str(&cookie).ok())
                }
            }
        }
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
    fn sticky_routing_by_header_and_cookie() {
        let b = super::super::balance::Backend::new("web");
        let split = |sticky| {
            Some(crate::state::control::Split {
                canary: 2,
                weight: 10,
                stable: 1,
                baseline: vec![],
                sticky,
            })
        };
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            h
        };
        // By header: the same value, the same bucket; no cookie is set.
        *b.split.write().unwrap() = split(Some(crate::spec::Sticky::Header("x-user".into())));
        let h = headers(&[("x-user", "alice")]);
        let (first, cookie) = route_bucket(&b, &h);
        assert!(cookie.is_none());
        assert!(first < 10_000);
        for _ in 0..20 {
            assert_eq!(route_bucket(&b, &h).0, first);
        }
        // By cookie: one is set when missing, and read back among others.
        *b.split.write().unwrap() = split(Some(crate::spec::Sticky::Cookie("cn".into())));
        let (bucket, set) = route_bucket(&b, &HeaderMap::new());
        let set = set.expect("a cookie for a new client");
        let set = set.to_str().unwrap();
        assert!(set.starts_with("cn=") && set.contains("HttpOnly"), "{set}");
        let token = set[3..].split(';').next().unwrap();
        let h = headers(&[("cookie", &format!("a=1; cn={token}; b=2"))]);
        for _ in 0..20 {
            assert_eq!(route_bucket(&b, &h), (bucket, None));
        }
    }

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
        // A later version: read by the 00 layout, more fields allowed after a dash.
        assert_eq!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-xyz"),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 3))
        );
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
            None
        );
    }

    #[test]
    fn span_strings_are_json() {
        for v in ["/a?b=c", "q\"uote\\back", "tab\tnl\n\u{1}", "ünï €", ""] {
            let mut out = String::new();
            json_str(&mut out, v);
            assert_eq!(serde_json::from_str::<String>(&out).unwrap(), v, "{out}");
        }
    }

    #[test]
    fn the_proxy_span_becomes_the_replicas_parent() {
        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tc = trace_context(Some(client), 1.0);
        let ids = tc.span.clone().unwrap();
        assert_eq!(tc.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ids.parent,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        let (t, p, f) = parse_traceparent(&tc.forward).unwrap();
        assert_eq!((t, f), ("4bf92f3577b34da6a3ce929d0e0e4736", 1));
        assert_eq!(unhex::<8>(p), ids.id);
        assert_ne!(p, "00f067aa0ba902b7");
        assert_eq!(unhex::<16>(t), ids.trace);

        // Not sampled by the caller, or spans off: forwarded untouched.
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let tc = trace_context(Some(unsampled), 1.0);
        assert_eq!((tc.forward.as_str(), tc.span), (unsampled, None));
        let tc = trace_context(Some(client), 0.0);
        assert_eq!((tc.forward.as_str(), tc.span), (client, None));

        // No (valid) context: a new sampled trace, the proxy's span its root.
        for incoming in [None, Some("00-zz")] {
            let tc = trace_context(incoming, 1.0);
            let ids = tc.span.clone().unwrap();
            assert_eq!(ids.parent, None);
            let (t, p, f) = parse_traceparent(&tc.forward).unwrap();
            assert_eq!((t, f), (tc.trace_id.as_str(), 1));
            assert_eq!(unhex::<8>(p), ids.id);
            let tc = trace_context(incoming, 0.0);
            assert!(tc.span.is_none() && trace_id_of(&tc.forward) == Some(&tc.trace_id));
            assert!(tc.forward.ends_with("-01"), "sampling left to the replica");
        }

        // A ratio samples about that share of new traces, and says so downstream;
        // a caller's sampled context is always followed.
        let tcs: Vec<TraceCtx> = (0..4000).map(|_| trace_context(None, 0.25)).collect();
        let sampled = tcs.iter().filter(|t| t.span.is_some()).count();
        assert!((800..1200).contains(&sampled), "{sampled}");
        for t in &tcs {
            assert_eq!(
                t.forward.ends_with("-01"),
                t.span.is_some(),
                "{}",
                t.forward
            );
            assert_eq!(trace_id_of(&t.forward), Some(t.trace_id.as_str()));
        }
        assert!(trace_context(Some(client), 0.001).span.is_some());
    }

    #[test]
    fn grpc_requests_trailers_and_status() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        assert!(is_grpc(&h(&[("content-type", "application/grpc")])));
        assert!(is_grpc(&h(&[("content-type", "Application/gRPC+proto")])));
        assert!(!is_grpc(&h(&[("content-type", "application/json")])));
        assert!(!is_grpc(&h(&[])));
        assert!(wants_trailers(&h(&[("te", "trailers")])));
        assert!(wants_trailers(&h(&[("te", "gzip;q=0.5, Trailers")])));
        assert!(!wants_trailers(&h(&[("te", "gzip")])));
        assert_eq!(grpc_status(&h(&[("grpc-status", "14")])), Some(14));
        assert_eq!(grpc_status(&h(&[("grpc-status", "x")])), None);
        assert_eq!(grpc_status(&h(&[])), None);
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
