//! Keep-alive HTTP/1.1 connections to one replica. Connecting is separate from
//! sending, so a refused or failed connection hands the request back untouched
//! and the caller can try another replica.

use std::sync::Mutex;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::body::ReqBody;

/// Most idle connections kept per replica.
const MAX_IDLE: usize = 512;

/// Idle connections by proxy worker (the last slot for other threads): a
/// connection's task runs on the runtime that opened it, so each worker keeps
/// and reuses its own.
pub struct Pool {
    idle: Vec<Mutex<Vec<SendRequest<ReqBody>>>>,
}

impl Default for Pool {
    fn default() -> Self {
        let n = super::workers::Workers::get().count() + 1;
        Pool {
            idle: (0..n).map(|_| Mutex::default()).collect(),
        }
    }
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
        let last = self.idle.len() - 1;
        &self.idle[super::workers::index().map_or(last, |i| i.min(last))]
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
        let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect to {addr}: {e}")),
            Err(_) => {
                return Err(format!(
                    "connect to {addr}: timed out after {}",
                    crate::spec::Dur(timeout)
                ));
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
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
            match s.try_send_request(req).await {
                Ok(resp) => return Ok((resp, s)),
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request went out.
                    Some(r) => req = r,
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
        let mut s = match Self::connect(addr, connect_timeout, false).await {
            Ok(s) => s,
            Err(reason) => return Err(SendError::NotSent(Box::new(NotSent { req, reason }))),
        };
        match s.try_send_request(req).await {
            Ok(resp) => Ok((resp, s)),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(SendError::NotSent(Box::new(NotSent {
                    req,
                    reason: format!("connection to {addr} closed before the request was sent"),
                }))),
                None => Err(SendError::Failed(e.into_error())),
            },
        }
    }
}
