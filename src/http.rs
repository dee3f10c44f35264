//! Serving HTTP (the tracking pixel, /metrics) with fair use of slots.
//!
//! `axum::serve` has no connection cap and no header timeout: 1,100 idle
//! connections to the tracking port once used up herald's file descriptors,
//! and SMTP `accept` failed. Here each listener takes a slot before it
//! serves a connection ([`MAX_CONNECTIONS`]; beyond it a `503` and close),
//! and hyper closes a connection whose request header does not arrive
//! within [`HEADER_TIMEOUT`] (an idle keep-alive connection too).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::shutdown::Shutdown;

/// Connections one HTTP listener serves at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has to send a request's header, from the moment the
/// server waits for it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take once shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 22\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections\r\n";

/// Serves `app` on `listener` until shutdown. Handlers may extract
/// `ConnectInfo<SocketAddr>`. `what` names the listener in logs.
pub async fn serve(listener: TcpListener, app: Router, mut shutdown: Shutdown, what: &'static str) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut warned = false;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if !warned {
                warned = true;
                tracing::warn!(%peer, "{what}: {MAX_CONNECTIONS} connections open, refusing more");
            }
            tokio::spawn(async move {
                let mut tcp = tcp;
                // Close gently: read what the client sent until it closes
                // too, so that the kernel does not answer it with a reset
                // that could destroy the 503 before it is read.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = tcp.write_all(BUSY).await;
                    let _ = tcp.shutdown().await;
                    let mut sink = [0u8; 1024];
                    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            });
            continue;
        };
        if slots.available_permits() > MAX_CONNECTIONS / 2 {
            warned = false;
        }
        let app = app.clone();
        let _ = tcp.set_nodelay(true);
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service =
                TowerToHyperService::new(app.layer(Extension(ConnectInfo::<SocketAddr>(peer))));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        });
    }
}
