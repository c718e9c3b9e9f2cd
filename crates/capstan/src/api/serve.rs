//! The API's listener: a bounded number of connections, a deadline for each
//! request head (slowloris), idle keep-alive connections closed, accept errors
//! met with a pause instead of a busy loop, and a shutdown bounded in time.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of the API listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Time for a request head to arrive, and for an idle keep-alive connection
    /// to send its next request.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// How long open connections may take to finish once the daemon stops.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 << 10,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then gives open
/// connections `shutdown_grace` to finish.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause, so the
                    // loop does not starve everything else while it lasts.
                    tracing::warn!("API: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    "API: {} connections open, the limit; refused {refused} so far",
                    limits.max_connections
                );
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection_with_upgrades(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "API: connections still open after {:?}; closing them",
            limits.shutdown_grace
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let router = axum::Router::new()
            .route("/ok", get(|| async { "fine" }))
            .route(
                "/boom",
                get(|| async {
                    let none: Option<u8> = std::hint::black_box(None);
                    format!("{}", none.expect("a deliberate failure"))
                }),
            )
            .route(
                "/boom-blocking",
                get(|| async {
                    tokio::task::block_in_place(|| -> &'static str {
                        panic!("a deliberate failure in blocking work")
                    })
                }),
            )
            .layer(axum::middleware::from_fn(crate::api::guard::catch_panic));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    async fn get_once(addr: std::net::SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Reads until the server closes the connection; `None` if it stays open
    /// for `within`.
    async fn closed_within(c: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        tokio::time::timeout(within, c.read_to_end(&mut got))
            .await
            .ok()
            .map(|_| got)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_answers_500_and_is_counted() {
        let (addr, _stop) = start(Limits::default()).await;
        let before = crate::api::guard::PANICS.load(std::sync::atomic::Ordering::Relaxed);
        for path in ["/boom", "/boom-blocking"] {
            let r = get_once(addr, path).await;
            assert!(r.starts_with("HTTP/1.0 500"), "{r}");
            assert!(r.contains("capstan_api_panics_total"), "{r}");
            assert!(r.contains("a deliberate failure"), "{r}");
        }
        let after = crate::api::guard::PANICS.load(std::sync::atomic::Ordering::Relaxed);
        assert!(after >= before + 2, "{before} -> {after}");
        // The server goes on serving.
        assert!(get_once(addr, "/ok").await.ends_with("fine"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_beyond_the_slots_wait_then_get_429() {
        use crate::api::guard::{Slots, limit_concurrency};
        let slots = Slots::new(1, Duration::from_millis(200));
        let router = axum::Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    "slow"
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                slots,
                limit_concurrency,
            ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            router,
            Limits::default(),
            std::future::pending(),
        ));
        let first = tokio::spawn(get_once(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = get_once(addr, "/slow").await;
        assert!(second.starts_with("HTTP/1.0 429"), "{second}");
        assert!(
            second.to_ascii_lowercase().contains("retry-after: 1"),
            "{second}"
        );
        assert!(first.await.unwrap().ends_with("slow"));
        // The slot is free again.
        assert!(get_once(addr, "/slow").await.ends_with("slow"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_heads_and_idle_connections_are_closed() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let (addr, _stop) = start(limits).await;
        // A head that never ends (slowloris): closed after the timeout.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /ok HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n")
            .await
            .unwrap();
        let got = closed_within(&mut slow, Duration::from_secs(5)).await;
        assert!(got.is_some(), "a slow head kept its connection open");
        // A keep-alive connection that sends nothing more: closed too.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let got = closed_within(&mut idle, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&got).ends_with("fine"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let got = closed_within(&mut c, Duration::from_secs(5)).await;
        assert_eq!(got, Some(Vec::new()), "a third connection was served");
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get_once(addr, "/ok").await.ends_with("fine"));
        // Shutdown is bounded: a connection left open mid-request is closed
        // after the grace, and nothing new is accepted.
        let mut open = TcpStream::connect(addr).await.unwrap();
        open.write_all(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stop.send(());
        assert!(
            closed_within(&mut open, Duration::from_secs(8))
                .await
                .is_some()
        );
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
