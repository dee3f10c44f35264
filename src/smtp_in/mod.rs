//! Inbound SMTP: listeners, the connection cap, and draining on shutdown.

pub mod auth;
pub mod line;
pub mod reception;
pub mod session;
pub mod spool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, Semaphore};

use crate::services::Services;

/// Binds with a deep backlog: a burst of platform workers connecting at once
/// must queue in the kernel, not be refused (STACK.md: a backlog of 31
/// collapsed E-MailRelay at 50 sessions).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Accepts until shutdown. Each session holds a clone of `drain` so that
/// the server can wait for all of them to finish.
pub async fn accept_loop(
    services: Arc<Services>,
    listener: TcpListener,
    implicit_tls: bool,
    conns: Arc<Semaphore>,
    drain: mpsc::Sender<()>,
) {
    let mut shutdown = services.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let permit = match conns.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let host = services.cfg.hostname.clone();
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let msg = format!("421 4.7.0 {host} Too many connections, try again later\r\n");
                    let _ = tcp.write_all(msg.as_bytes()).await;
                    let _ = tcp.shutdown().await;
                });
                tracing::warn!(%peer, "connection refused: listen.max_connections reached");
                continue;
            }
        };
        let s = services.clone();
        let d = drain.clone();
        tokio::spawn(async move {
            session::run(s, tcp, peer, implicit_tls).await;
            drop(permit);
            drop(d);
        });
    }
}
