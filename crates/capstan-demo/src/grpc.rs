//! `capstan-demo grpc`: the demo as a gRPC server (HTTP/2 cleartext) on
//! `$PORT`, for the proxy's gRPC tests and examples.
//!
//! Service `capstan.demo.Echo`, messages written by hand with prost's derive
//! (no `.proto` compiler needed):
//! - `Say` (unary): `hello {name}` with the replica's number;
//! - `Count` (server streaming): `count` replies numbered from 1;
//! - `Chat` (bidirectional): one reply per message, as each arrives.
//!
//! A request with a non-zero `fail_code` ends with that gRPC status (after
//! the replies, for the streams), its message naming the replica and an
//! `x-demo-replica` trailer, so callers can check that trailers travel end
//! to end.

use std::convert::Infallible;
use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, BoxStream, Context, Poll, Service, http};
use tonic::{Request, Response, Status, Streaming};

/// What a caller sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SayRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    /// A gRPC status code to end with (0: succeed).
    #[prost(int32, tag = "2")]
    pub fail_code: i32,
    /// How many replies `Count` streams.
    #[prost(uint32, tag = "3")]
    pub count: u32,
}

/// What the server answers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SayReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub replica: String,
    #[prost(uint32, tag = "3")]
    pub seq: u32,
}

#[derive(Clone)]
struct Echo {
    replica: Arc<str>,
}

impl Echo {
    fn reply(&self, req: &SayRequest, seq: u32) -> SayReply {
        SayReply {
            message: format!("hello {}", req.name),
            replica: self.replica.to_string(),
            seq,
        }
    }

    /// The status a request asked to end with, if any.
    fn failure(&self, req: &SayRequest) -> Option<Status> {
        if req.fail_code == 0 {
            return None;
        }
        let mut s = Status::new(
            tonic::Code::from_i32(req.fail_code),
            format!("failing as asked, replica {}", self.replica),
        );
        if let Ok(v) = self.replica.parse() {
            s.metadata_mut().insert("x-demo-replica", v);
        }
        Some(s)
    }
}

struct Say(Echo);

impl tonic::server::UnaryService<SayRequest> for Say {
    type Response = SayReply;
    type Future = BoxFuture<Response<SayReply>, Status>;

    fn call(&mut self, r: Request<SayRequest>) -> Self::Future {
        let out = match self.0.failure(r.get_ref()) {
            Some(s) => Err(s),
            None => Ok(Response::new(self.0.reply(r.get_ref(), 1))),
        };
        Box::pin(async move { out })
    }
}

struct Count(Echo);

impl tonic::server::ServerStreamingService<SayRequest> for Count {
    type Response = SayReply;
    type ResponseStream = BoxStream<SayReply>;
    type Future = BoxFuture<Response<BoxStream<SayReply>>, Status>;

    fn call(&mut self, r: Request<SayRequest>) -> Self::Future {
        let req = r.into_inner();
        let n = req.count.min(10_000);
        let mut items: Vec<Result<SayReply, Status>> =
            (1..=n).map(|i| Ok(self.0.reply(&req, i))).collect();
        items.extend(self.0.failure(&req).map(Err));
        let stream: BoxStream<SayReply> = Box::pin(tokio_stream::iter(items));
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

struct Chat(Echo);

impl tonic::server::StreamingService<SayRequest> for Chat {
    type Response = SayReply;
    type ResponseStream = BoxStream<SayReply>;
    type Future = BoxFuture<Response<BoxStream<SayReply>>, Status>;

    fn call(&mut self, r: Request<Streaming<SayRequest>>) -> Self::Future {
        let echo = self.0.clone();
        let mut seq = 0;
        let stream: BoxStream<SayReply> = Box::pin(r.into_inner().map(move |m| {
            let m = m?;
            seq += 1;
            match echo.failure(&m) {
                Some(s) => Err(s),
                None => Ok(echo.reply(&m, seq)),
            }
        }));
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "capstan.demo.Echo";
}

impl Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<SayReply, SayRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            let path = req.uri().path().to_owned();
            Ok(match path.as_str() {
                "/capstan.demo.Echo/Say" => grpc.unary(Say(me), req).await,
                "/capstan.demo.Echo/Count" => grpc.server_streaming(Count(me), req).await,
                "/capstan.demo.Echo/Chat" => grpc.streaming(Chat(me), req).await,
                other => Status::unimplemented(format!("no method {other}")).into_http(),
            })
        })
    }
}

/// Serves `capstan.demo.Echo` on `listener` until SIGTERM or SIGINT.
pub async fn serve(listener: tokio::net::TcpListener, replica: String) -> Result<(), String> {
    let echo = Echo {
        replica: replica.into(),
    };
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            echo,
            tonic::transport::server::TcpIncoming::from(listener),
            super::shutdown_signal(),
        )
        .await
        .map_err(|e| e.to_string())
}
