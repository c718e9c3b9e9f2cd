//! Raw TCP forwarding for services marked `x-capstan.protocol: tcp`: each client
//! connection is joined to one replica's, chosen like an HTTP request; a replica
//! that refuses the connection is skipped for another.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::{TcpListener, TcpStream};

use super::Ctx;
use super::balance::Lease;

pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    super::accept_loop(listener, ctx, |ctx, client, _| forward(ctx, client)).await;
}

async fn forward(ctx: Arc<Ctx>, mut client: TcpStream) {
    let backend = &ctx.backend;
    let (retries, connect_timeout, timeout) = {
        let s = backend.settings.read().unwrap();
        (s.retries, s.connect_timeout.0, s.timeout.0)
    };
    let deadline = backend.queue_deadline(timeout);
    let bucket = backend.bucket();
    let Ok(mut lease) = backend.acquire(&[], deadline, bucket).await else {
        // Nothing to send the bytes to: closing is all TCP can say.
        return;
    };
    let mut tried = Vec::new();
    let mut upstream = loop {
        let ep = lease.ep.clone();
        match tokio::time::timeout(connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => ctx.failed(&ep, &format!("connect to {}: {e}", ep.addr)),
            Err(_) => ctx.failed(&ep, &format!("connect to {}: timed out", ep.addr)),
        }
        tried.push((ep.revision, ep.replica));
        if tried.len() > retries as usize {
            return;
        }
        let Some(next) = backend.pick(&tried, bucket) else {
            return;
        };
        backend.metrics.retries.fetch_add(1, Relaxed);
        lease = Lease::new(backend.clone(), next);
    };
    let _ = upstream.set_nodelay(true);
    backend.metrics.tcp_connections.fetch_add(1, Relaxed);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    drop(lease);
}
