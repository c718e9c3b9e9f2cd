//! What stands between a client and the handlers: a panic in a handler is caught,
//! logged with its request, counted and answered with 500; the `Host` header must
//! name this daemon (against DNS rebinding).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Handler panics caught since the daemon started (`capstan_api_panics_total`).
pub static PANICS: AtomicU64 = AtomicU64::new(0);

/// A future whose panics come out as `Err` with the panic's message.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Runs the handler; a panic in it becomes a logged, counted 500.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let target = req.uri().to_string();
    match CatchUnwind(Box::pin(next.run(req))).await {
        Ok(r) => r,
        Err(msg) => {
            PANICS.fetch_add(1, Ordering::Relaxed);
            let shown: String = target.chars().take(512).collect();
            tracing::error!(%method, target = %shown, panic = %msg, "a request handler failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::json!({
                    "status": "error",
                    "errorType": "internal",
                    "error": format!("capstan failed on this request ({msg}); it is logged and counted in capstan_api_panics_total"),
                })
                .to_string(),
            )
                .into_response()
        }
    }
}

/// Requests of one kind (ingest) allowed to run at once; more wait up to `wait`
/// for a slot, then get 429 with `Retry-After`, as Loki and Prometheus senders
/// expect (they back off and retry).
#[derive(Debug, Clone)]
pub struct Slots {
    sem: std::sync::Arc<tokio::sync::Semaphore>,
    wait: std::time::Duration,
}

impl Slots {
    pub fn new(n: usize, wait: std::time::Duration) -> Slots {
        Slots {
            sem: std::sync::Arc::new(tokio::sync::Semaphore::new(n)),
            wait,
        }
    }
}

/// Ingest requests at once, and how long one waits for a slot.
pub const INGEST_SLOTS: usize = 4;
pub const INGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Ingest requests refused for want of a slot (`capstan_ingest_throttled_total`).
pub static THROTTLED: AtomicU64 = AtomicU64::new(0);

pub async fn limit_concurrency(State(slots): State<Slots>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(slots.wait, slots.sem.acquire()).await {
        Ok(Ok(_permit)) => next.run(req).await,
        _ => {
            THROTTLED.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                "too many ingest requests at once: retry later\n",
            )
                .into_response()
        }
    }
}

/// The names a request may call this daemon by: loopback names and the address
/// it listens on. Anything else (a DNS name rebound to 127.0.0.1 by a web page)
/// gets 421.
#[derive(Debug, Clone)]
pub struct Hosts {
    listen: std::net::SocketAddr,
}

impl Hosts {
    pub fn new(listen: std::net::SocketAddr) -> Hosts {
        Hosts { listen }
    }

    pub fn allows(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        if name.eq_ignore_ascii_case("localhost")
            || name.to_ascii_lowercase().ends_with(".localhost")
        {
            return true;
        }
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ip.is_loopback()
                    || ip == self.listen.ip()
                    || (self.listen.ip().is_unspecified() && !ip.is_multicast())
            }
            // A non-loopback listener is reached by whatever name the network
            // gives it; the token guards it there.
            Err(_) => !self.listen.ip().is_loopback(),
        }
    }
}

/// Refuses requests whose `Host` names something else than this daemon.
pub async fn check_host(State(hosts): State<Hosts>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(h) if !hosts.allows(h) => (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {h:?} is not this daemon's address (loopback names or {}); refused against DNS rebinding\n",
                hosts.listen
            ),
        )
            .into_response(),
        _ => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_on_loopback() {
        let h = Hosts::new("127.0.0.1:9700".parse().unwrap());
        for ok in [
            "127.0.0.1:9700",
            "localhost:9700",
            "LOCALHOST",
            "[::1]:9700",
            "127.0.0.2",
            "app.localhost:1",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example:9700",
            "10.0.0.1:9700",
            "127.0.0.1.nip.io",
            "[fe80::1]:9700",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
        let any = Hosts::new("0.0.0.0:9700".parse().unwrap());
        assert!(any.allows("192.168.1.5:9700") && any.allows("box.lan:9700"));
    }
}
