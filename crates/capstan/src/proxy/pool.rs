//! Connections to one replica: keep-alive HTTP/1.1 ones, one request at a
//! time each, and one multiplexed HTTP/2 cleartext connection per proxy worker
//! for replicas that speak it (gRPC). Connecting is separate from sending, so
//! a refused or failed connection hands the request back untouched and the
//! caller can try another replica.

use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::ReqBody;

/// Most idle connections kept per replica.
const MAX_IDLE: usize = 512;

/// Idle connections by proxy worker (the last slot for other threads): a
/// connection's task runs on the runtime that opened it, so each worker keeps
/// and reuses its own.
pub struct Pool {
    idle: Vec<Mutex<Vec<SendRequest<ReqBody>>>>,
    /// The HTTP/2 connection of each worker, shared by its requests.
    h2: Vec<Mutex<Option<H2Sender>>>,
}

type H2Sender = hyper::client::conn::http2::SendRequest<ReqBody>;

impl Default for Pool {
    fn default() -> Self {
        let n = super::workers::Workers::get().count() + 1;
        Pool {
            idle: (0..n).map(|_| Mutex::default()).collect(),
            h2: (0..n).map(|_| Mutex::default()).collect(),
        }
    }
}

/// This thread's slot among `n` (the last for threads that are no worker).
fn slot(n: usize) -> usize {
    let last = n - 1;
    super::workers::index().map_or(last, |i| i.min(last))
}

async fn dial(addr: std::net::SocketAddr, timeout: Duration) -> Result<TokioIo<TcpStream>, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(TokioIo::new(s))
        }
        Ok(Err(e)) => Err(format!("connect to {addr}: {e}")),
        Err(_) => Err(format!(
            "connect to {addr}: timed out after {}",
            crate::spec::Dur(timeout)
        )),
    }
}

fn not_sent(req: Request<ReqBody>, reason: String) -> SendError {
    SendError::NotSent(Box::new(NotSent { req, reason }))
}

/// Sends on `s`; a request the connection never took comes back as `Err(Ok)`.
async fn try_send<F>(sent: F) -> Result<Response<Incoming>, Result<Request<ReqBody>, hyper::Error>>
where
    F: std::future::Future<
            Output = Result<
                Response<Incoming>,
                hyper::client::conn::TrySendError<Request<ReqBody>>,
            >,
        >,
{
    sent.await.map_err(|mut e| match e.take_message() {
        Some(r) => Ok(r),
        None => Err(e.into_error()),
    })
}

/// A request that did not reach the replica: safe to send elsewhere.
pub struct NotSent {
    pub req: Request<ReqBody>,
    pub reason: String,
}

pub enum SendError {
    NotSent(Box<NotSent>),
    /// The request (or part of it) was sent; the exchange failed.
    Failed(hyper::Error),
}

impl Pool {
    /// This thread's idle connections.
    fn mine(&self) -> &Mutex<Vec<SendRequest<ReqBody>>> {
        &self.idle[slot(self.idle.len())]
    }

    pub fn put(&self, s: SendRequest<ReqBody>) {
        let mut idle = self.mine().lock().unwrap();
        if idle.len() < MAX_IDLE && !s.is_closed() {
            idle.push(s);
        }
    }

    fn take(&self) -> Option<SendRequest<ReqBody>> {
        self.mine().lock().unwrap().pop()
    }

    /// Opens a new connection (the caller decides whether to pool it).
    pub async fn connect(
        addr: std::net::SocketAddr,
        timeout: Duration,
        upgrades: bool,
    ) -> Result<SendRequest<ReqBody>, String> {
        let io = dial(addr, timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| format!("handshake with {addr}: {e}"))?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(sender)
    }

    /// Sends over HTTP/2 on this worker's connection to the replica, opened
    /// (prior knowledge, no upgrade) when there is none or it has closed.
    pub async fn send_h2(
        &self,
        addr: std::net::SocketAddr,
        connect_timeout: Duration,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let shared = self.h2[slot(self.h2.len())].lock().unwrap().clone();
        if let Some(mut s) = shared.filter(|s| !s.is_closed())
            && s.ready().await.is_ok()
        {
            match try_send(s.try_send_request(req)).await {
                Ok(resp) => return Ok(resp),
                Err(Ok(r)) => req = r,
                Err(Err(e)) => return Err(SendError::Failed(e)),
            }
        }
        let io = match dial(addr, connect_timeout).await {
            Ok(io) => io,
            Err(reason) => return Err(not_sent(req, reason)),
        };
        let mut s = match hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .handshake::<_, ReqBody>(io)
            .await
        {
            Ok((s, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                s
            }
            Err(e) => return Err(not_sent(req, format!("HTTP/2 handshake with {addr}: {e}"))),
        };
        *self.h2[slot(self.h2.len())].lock().unwrap() = Some(s.clone());
        match try_send(s.try_send_request(req)).await {
            Ok(resp) => Ok(resp),
            Err(Ok(req)) => Err(not_sent(
                req,
                format!("HTTP/2 connection to {addr} closed before the request was sent"),
            )),
            Err(Err(e)) => Err(SendError::Failed(e)),
        }
    }

    /// Sends on an idle connection, or a new one. On success the connection comes
    /// back with the response, to be returned with [`Pool::put`] once the body
    /// has been read to its end.
    pub async fn send(
        &self,
        addr: std::net::SocketAddr,
        connect_timeout: Duration,
        mut req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, SendRequest<ReqBody>), SendError> {
        while let Some(mut s) = self.take() {
            if s.is_closed() || s.ready().await.is_err() {
                continue;
            }
            match try_send(s.try_send_request(req)).await {
                Ok(resp) => return Ok((resp, s)),
                // The connection closed before the request went out.
                Err(Ok(r)) => req = r,
                Err(Err(e)) => return Err(SendError::Failed(e)),
            }
        }
        let mut s = match Self::connect(addr, connect_timeout, false).await {
            Ok(s) => s,
            Err(reason) => return Err(not_sent(req, reason)),
        };
        match try_send(s.try_send_request(req)).await {
            Ok(resp) => Ok((resp, s)),
            Err(Ok(req)) => Err(not_sent(
                req,
                format!("connection to {addr} closed before the request was sent"),
            )),
            Err(Err(e)) => Err(SendError::Failed(e)),
        }
    }
}
