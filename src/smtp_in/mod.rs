//! Inbound SMTP: listeners, the connection cap, the PROXY protocol from
//! listed balancers, and draining on shutdown.

pub mod auth;
pub mod data;
pub mod line;
pub mod proxy;
pub mod reception;
pub mod session;
pub mod spool;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use crate::services::Services;

/// A refusal is written with this much patience: a client that does not
/// read it does not keep the socket.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection slots, shared by the SMTP listeners of one kind (the
/// platform's, or the `[bounces]` intake's): `max_connections` in all, and
/// `max_connections_per_ip` for one client address, so that a few clients
/// cannot hold every slot. A reload may change both.
pub struct Slots {
    all: crate::limit::Limit,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: AtomicUsize,
    /// The config keys of the two limits, for the log line of a refusal.
    keys: SlotKeys,
}

/// The keys of a [`Slots`]' two limits: (all, per client address).
pub type SlotKeys = (&'static str, &'static str);

pub const LISTEN_SLOTS: SlotKeys = ("listen.max_connections", "listen.max_connections_per_ip");
pub const INTAKE_SLOTS: SlotKeys = ("bounces.max_connections", "bounces.max_connections_per_ip");

/// A session's hold on its slots, given back on drop.
pub struct Slot {
    _permit: crate::limit::Permit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock().unwrap();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Slots {
    pub fn new(keys: SlotKeys, max_connections: usize, max_per_ip: usize) -> Slots {
        Slots {
            all: crate::limit::Limit::new(max_connections),
            per_ip: Default::default(),
            max_per_ip: AtomicUsize::new(max_per_ip),
            keys,
        }
    }

    /// New limits (a reload): sessions open beyond them go on.
    pub fn resize(&self, max_connections: usize, max_per_ip: usize) {
        self.all.resize(max_connections);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    /// A slot for a client at `ip`, or the refusal to send it. An
    /// `exempt` client (the platform's own, in `allowed_networks`) is held
    /// to `max_connections` only, as Postfix exempts `$mynetworks` from its
    /// per-client limits: 50 PHP workers on one host are one platform.
    pub fn take(&self, ip: IpAddr, exempt: bool) -> Result<Slot, &'static str> {
        self.take_with(ip, None, exempt)
    }

    /// One of the `max_connections`, before the client's address is known:
    /// a balancer's connection holds it while its PROXY header is read.
    pub fn any(&self) -> Result<crate::limit::Permit, &'static str> {
        self.all.try_acquire().ok_or(self.keys.0)
    }

    /// [`Slots::take`], with the overall permit already held if given.
    pub fn take_with(
        &self,
        ip: IpAddr,
        permit: Option<crate::limit::Permit>,
        exempt: bool,
    ) -> Result<Slot, &'static str> {
        let ip = canonical_ip(ip);
        let mut m = self.per_ip.lock().unwrap();
        if !exempt && m.get(&ip).copied().unwrap_or(0) >= self.max_per_ip.load(Ordering::Relaxed) {
            return Err(self.keys.1);
        }
        let permit = match permit {
            Some(p) => p,
            None => self.any()?,
        };
        *m.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// An IPv4 client on an IPv6 socket is the IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

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
        let msg = format!("421 4.7.0 {host} {why}, try again later\r\n");
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            let _ = tcp.write_all(msg.as_bytes()).await;
            let _ = tcp.shutdown().await;
        })
        .await;
    });
    tracing::warn!(%peer, "connection refused: {key} reached");
}
