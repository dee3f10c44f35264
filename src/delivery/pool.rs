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

#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<String, Vec<(Instant, Conn)>>>,
}

impl Pool {
    pub fn take(&self, key: &str) -> Option<Conn> {
        let mut pool = self.idle.lock().unwrap();
        let list = pool.get_mut(key)?;
        while let Some((t, c)) = list.pop() {
            if t.elapsed() < POOL_IDLE {
                return Some(c);
            }
        }
        None
    }

    pub fn put(&self, key: &str, c: Conn) {
        let mut pool = self.idle.lock().unwrap();
        let list = pool.entry(key.to_string()).or_default();
        list.retain(|(t, _)| t.elapsed() < POOL_IDLE);
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
