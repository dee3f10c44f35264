//! Inbound SMTP: listeners, the connection cap, the PROXY protocol from
//! listed balancers, and draining on shutdown.

pub mod auth;
pub mod data;
pub mod line;
pub mod proxy;
pub mod reception;
pub mod session;
pub mod spool;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::limit::{canonical_ip, Slots};
use crate::state::Services;

/// A refusal is written with this much patience: a client that does not
/// read it does not keep the socket.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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
    intake: bool,
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
        let slots = slots_of(&services, intake);
        let from_proxy = services
            .cfg()
            .listen
            .proxy_protocol_from
            .iter()
            .any(|n| n.contains(&canonical_ip(peer.ip())));
        if from_proxy {
            // The per-IP slot waits for the header: the balancer's own
            // address would put every client behind it in one slot.
            match slots.any() {
                Ok(permit) => {
                    let (s, d) = (services.clone(), drain.clone());
                    tokio::spawn(async move {
                        behind_proxy(s, tcp, peer, implicit_tls, intake, permit).await;
                        drop(d);
                    });
                }
                Err(key) => refuse(&services, tcp, peer, key),
            }
            continue;
        }
        let permit = match slots.take(peer.ip(), exempt(&services, peer, intake)) {
            Ok(p) => p,
            Err(key) => {
                refuse(&services, tcp, peer, key);
                continue;
            }
        };
        let s = services.clone();
        let d = drain.clone();
        tokio::spawn(async move {
            session::run(s, tcp, peer, implicit_tls, intake).await;
            drop(permit);
            drop(d);
        });
    }
}

/// Whether a client is the platform's own (in `allowed_networks`), which
/// `max_connections_per_ip` does not hold back. Never at the intake.
fn exempt(services: &Services, peer: SocketAddr, intake: bool) -> bool {
    let ip = canonical_ip(peer.ip());
    !intake
        && services
            .cfg()
            .listen
            .allowed_networks
            .iter()
            .any(|n| n.contains(&ip))
}

/// The slots of the platform's listeners, or of the `[bounces]` intake.
fn slots_of(services: &Services, intake: bool) -> &Slots {
    if intake {
        &services.report_conns
    } else {
        &services.conns
    }
}

/// A connection from `[listen] proxy_protocol_from`: the PROXY header
/// first, then the session as the client it names (`peer` stays the
/// balancer's for v1 `UNKNOWN` and v2 `LOCAL`, its own health checks).
async fn behind_proxy(
    services: Arc<Services>,
    mut tcp: TcpStream,
    proxy: SocketAddr,
    implicit_tls: bool,
    intake: bool,
    permit: crate::limit::Permit,
) {
    let mut shutdown = services.shutdown.clone();
    let header = tokio::select! {
        h = proxy::read_header(&mut tcp) => h,
        _ = shutdown.wait() => return,
    };
    let peer = match header {
        Ok(client) => client.unwrap_or(proxy),
        // A balancer's TCP health check: connect, close. Not worth a warning.
        Err(proxy::HeaderError::Empty) => {
            tracing::debug!(%proxy, "closed before its PROXY header");
            return;
        }
        Err(e) => {
            tracing::warn!(%proxy, "connection from a PROXY protocol balancer closed: {e}");
            return;
        }
    };
    let slot = slots_of(&services, intake).take_with(
        peer.ip(),
        Some(permit),
        exempt(&services, peer, intake),
    );
    match slot {
        Ok(slot) => {
            session::run(services, tcp, peer, implicit_tls, intake).await;
            drop(slot);
        }
        Err(key) => refuse(&services, tcp, peer, key),
    }
}

/// Tells a client over the cap why it is turned away, without waiting for
/// it to read.
fn refuse(services: &Services, tcp: TcpStream, peer: SocketAddr, key: &'static str) {
    let host = services.cfg().hostname.clone();
    let why = if key.ends_with("_per_ip") {
        "Too many connections from your address"
    } else {
        "Too many connections"
    };
    tokio::spawn(async move {
        let mut tcp = tcp;
        let msg = format!("{}\r\n", crate::replies::refused_connection(&host, why));
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            let _ = tcp.write_all(msg.as_bytes()).await;
            let _ = tcp.shutdown().await;
        })
        .await;
    });
    tracing::warn!(%peer, "connection refused: {key} reached");
}
