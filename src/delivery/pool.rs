//! Idle connections to upstreams and MX hosts, kept for the next message
//! of the same destination, host and port.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::Conn;

/// How long an idle upstream connection is kept for the next message.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream.
const POOL_MAX: usize = 32;

/// With `[cluster]`: a session counts against the shared
/// `max_connections` only while its lease is held, and a lease left idle
/// goes back to Redis after a second; an idle session is closed before.
pub const CLUSTER_POOL_IDLE: Duration = Duration::from_millis(500);

pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Instant, Conn)>>>,
    /// How long an idle connection is kept.
    keep: Duration,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool::new(POOL_IDLE)
    }
}

impl Pool {
    pub fn new(keep: Duration) -> Pool {
        Pool {
            idle: Mutex::default(),
            keep,
        }
    }

    /// Closes the connections idle longer than the pool keeps them.
    pub fn close_old(&self) {
        let keep = self.keep;
        let old: Vec<Conn> = {
            let mut pool = self.idle.lock().unwrap();
            let mut old = Vec::new();
            for list in pool.values_mut() {
                let (gone, stay): (Vec<_>, Vec<_>) =
                    list.drain(..).partition(|(t, _)| t.elapsed() >= keep);
                *list = stay;
                old.extend(gone.into_iter().map(|(_, c)| c));
            }
            old
        };
        for c in old {
            tokio::spawn(quit(c));
        }
    }

    pub fn take(&self, key: &str) -> Option<Conn> {
        let mut pool = self.idle.lock().unwrap();
        let list = pool.get_mut(key)?;
        // Only a session the server has not spoken on while it waited: one
        // it closed ("421 idle timeout", or nothing) is dropped here, not
        // found dead with a message on it; and a 421 that answers the
        // next MAIL is then the server's word on that message.
        while let Some((t, c)) = list.pop() {
            if t.elapsed() < self.keep && c.client.stream.get_ref().quiet() {
                return Some(c);
            }
        }
        None
    }

    pub fn put(&self, key: &str, c: Conn) {
        let mut pool = self.idle.lock().unwrap();
        let list = pool.entry(key.to_string()).or_default();
        let keep = self.keep;
        list.retain(|(t, _)| t.elapsed() < keep);
        if list.len() < POOL_MAX {
            list.push((Instant::now(), c));
        }
    }

    /// Closes every idle connection: a reload changed the upstreams, and
    /// these were opened (and authenticated) with the old settings.
    pub fn close_idle(&self) {
        let idle: Vec<Conn> = self
            .idle
            .lock()
            .unwrap()
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|(_, c)| c))
            .collect();
        for c in idle {
            tokio::spawn(quit(c));
        }
    }
}

/// Closes a session politely (QUIT, and its reply) so that the server has
/// counted it gone before the slot is used again.
pub async fn quit(mut conn: Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.client.cmd(b"QUIT\r\n")).await;
}
