//! Bodies on both sides of the proxy: the request body with its size limit, and
//! the response body that ends the request (metrics, access log, lease, pooled
//! connection) when it is done or dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What goes to the replica.
pub enum ReqBody {
    Empty,
    Stream {
        inner: Incoming,
        limit: u64,
        seen: u64,
    },
}

#[derive(Debug)]
pub struct TooLarge(pub u64);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request body larger than {} bytes", self.0)
    }
}

impl std::error::Error for TooLarge {}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Stream { inner, limit, seen } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        *seen += d.len() as u64;
                        if *seen > *limit {
                            return Poll::Ready(Some(Err(Box::new(TooLarge(*limit)))));
                        }
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// Runs when a response is finished or abandoned.
pub trait OnDone: Send + Sync {
    /// `grpc_status` is the trailers' `grpc-status`, if they had one.
    fn done(&mut self, bytes: u64, completed: bool, grpc_status: Option<u32>);
}

enum Inner {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// What goes back to the client.
pub struct RespBody {
    inner: Inner,
    bytes: u64,
    ended: bool,
    grpc_status: Option<u32>,
    on_done: Option<Box<dyn OnDone>>,
}

impl RespBody {
    pub fn upstream(b: Incoming, on_done: Box<dyn OnDone>) -> RespBody {
        let ended = b.is_end_stream();
        RespBody {
            inner: Inner::Upstream(b),
            bytes: 0,
            ended,
            grpc_status: None,
            on_done: Some(on_done),
        }
    }

    pub fn full(b: impl Into<Bytes>, on_done: Option<Box<dyn OnDone>>) -> RespBody {
        let b: Bytes = b.into();
        RespBody {
            bytes: b.len() as u64,
            inner: Inner::Full((!b.is_empty()).then_some(b)),
            ended: true,
            grpc_status: None,
            on_done,
        }
    }

    pub fn empty() -> RespBody {
        RespBody::full(Bytes::new(), None)
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(b) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        this.bytes += d.len() as u64;
                    } else if let Some(t) = f.trailers_ref() {
                        this.grpc_status = super::http::grpc_status(t);
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    Poll::Ready(None)
                }
                other => other,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(b) => b.size_hint(),
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let ended = self.ended || self.is_end_stream();
        if let Some(mut d) = self.on_done.take() {
            d.done(self.bytes, ended, self.grpc_status);
        }
    }
}
