//! The state that several herald nodes will share (the clustering issue):
//! the suppression list ([`SuppressionStore`]), the events
//! ([`EventStore`]), and the pause flags ([`PauseFlags`]). Each is a trait;
//! here are today's implementations, in this node's sled database, which
//! `serve` puts behind them. Nothing above the state layer names sled. A
//! second backend (Redis) implements the same traits; the spool stays in
//! each node's sled.
//!
//! Errors are [`QueueError`] ("storage: ..."): whatever the backend, a
//! failure is a storage failure to the callers, who never take it for
//! "not suppressed" or "not paused".

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::state::history::{hex, By, Event, EventStore};
use crate::state::spool::{QueueError, Store};
use crate::state::suppression::{Entry, SuppressionStore};

pub type StateResult<T> = Result<T, QueueError>;

/// Whether outbound delivery is paused (`herald pause`), as a whole and
/// per route; kept across restarts. Setting a flag is durable at the next
/// commit of the spool.
pub trait PauseFlags: Send + Sync {
    fn delivery_paused(&self) -> bool;
    fn set_delivery_paused(&self, paused: bool) -> StateResult<()>;
    fn route_paused(&self, route: &str) -> bool;
    fn paused_routes(&self) -> Vec<String>;
    /// Pauses or resumes `route`; the paused routes now.
    fn set_route_paused(&self, route: &str, paused: bool) -> StateResult<Vec<String>>;
}

fn key(addr: &str) -> Vec<u8> {
    addr.trim().to_lowercase().into_bytes()
}

/// The suppression list in this node's sled: trees `suppression` and
/// `bounce_counts`.
pub struct SledSuppression {
    entries: sled::Tree,
    bounces: sled::Tree,
}

impl SledSuppression {
    pub fn open(db: &sled::Db) -> StateResult<SledSuppression> {
        Ok(SledSuppression {
            entries: db.open_tree("suppression")?,
            bounces: db.open_tree("bounce_counts")?,
        })
    }
}

impl SuppressionStore for SledSuppression {
    fn get(&self, addr: &str) -> StateResult<Option<Entry>> {
        let Some(v) = self.entries.get(key(addr))? else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|_| QueueError::Corrupt(addr.into()))
    }

    fn put(&self, e: &Entry) -> StateResult<()> {
        let v = serde_json::to_vec(e).map_err(|_| QueueError::Corrupt(e.addr.clone()))?;
        self.entries.insert(key(&e.list_key()), v)?;
        Ok(())
    }

    fn remove(&self, addr: &str) -> StateResult<bool> {
        self.bounces.remove(key(addr))?;
        Ok(self.entries.remove(key(addr))?.is_some())
    }

    fn all(&self) -> StateResult<Vec<Entry>> {
        let mut out = Vec::new();
        for item in self.entries.iter() {
            let (_, v) = item?;
            if let Ok(e) = serde_json::from_slice::<Entry>(&v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    fn count_bounce(&self, addr: &str) -> StateResult<u32> {
        let n = self
            .bounces
            .update_and_fetch(key(addr), |old| {
                let n = old
                    .and_then(|b| b.try_into().ok().map(u32::from_be_bytes))
                    .unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .and_then(|b| b.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(1);
        Ok(n)
    }

    fn reset_bounces(&self, addr: &str) -> StateResult<()> {
        self.bounces.remove(key(addr))?;
        Ok(())
    }
}

impl SledSuppression {
    /// The hard bounces counted for `addr`.
    pub fn bounces(&self, addr: &str) -> StateResult<u32> {
        Ok(self
            .bounces
            .get(key(addr))?
            .and_then(|b| b.as_ref().try_into().ok().map(u32::from_be_bytes))
            .unwrap_or(0))
    }

    /// Sets the count (a mirror taking the cluster's).
    pub fn set_bounces(&self, addr: &str, n: u32) -> StateResult<()> {
        if n == 0 {
            self.bounces.remove(key(addr))?;
        } else {
            self.bounces.insert(key(addr), n.to_be_bytes().to_vec())?;
        }
        Ok(())
    }

    /// Every address with a count.
    pub fn counted(&self) -> StateResult<Vec<String>> {
        let mut out = Vec::new();
        for item in self.bounces.iter() {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }
}

/// Events in this node's sled: trees `events` and `events_index`.
pub struct SledEvents {
    events: sled::Tree,
    index: sled::Tree,
}

impl SledEvents {
    pub fn open(db: &sled::Db) -> StateResult<SledEvents> {
        Ok(SledEvents {
            events: db.open_tree("events")?,
            index: db.open_tree("events_index")?,
        })
    }
}

fn index_keys(ev: &Event, key: &[u8]) -> Vec<Vec<u8>> {
    let mut bys = vec![By::Rcpt(&ev.rcpt), By::Id(&ev.id)];
    if let Some(t) = &ev.tag {
        bys.push(By::Tag(t));
    }
    bys.iter()
        .map(|b| {
            let mut k = b.prefix();
            k.extend_from_slice(key);
            k
        })
        .collect()
}

/// An event as stored; events written before `event_id` existed get
/// theirs from the key.
fn decode(key: &[u8], v: &[u8]) -> Option<Event> {
    let mut ev = serde_json::from_slice::<Event>(v).ok()?;
    if ev.event_id.is_empty() {
        ev.event_id = hex(key);
    }
    Some(ev)
}

impl SledEvents {
    /// An event as stored (JSON), by its key.
    pub fn raw(&self, key: &[u8]) -> StateResult<Option<sled::IVec>> {
        Ok(self.events.get(key)?)
    }
}

impl EventStore for SledEvents {
    fn append(&self, key: [u8; 16], ev: &Event, json: &[u8]) -> StateResult<()> {
        self.events.insert(key, json)?;
        for k in index_keys(ev, &key) {
            self.index.insert(k, &[])?;
        }
        Ok(())
    }

    fn by(
        &self,
        by: By,
        since_ms: u64,
        keep: &mut dyn FnMut(&Event) -> bool,
    ) -> StateResult<Vec<Event>> {
        let prefix = by.prefix();
        let mut out = Vec::new();
        for item in self.index.scan_prefix(&prefix) {
            let (k, _) = item?;
            let key = &k[prefix.len()..];
            if key.len() != 16
                || u64::from_be_bytes(key[..8].try_into().unwrap_or([0; 8])) < since_ms
            {
                continue;
            }
            if let Some(v) = self.events.get(key)? {
                if let Some(ev) = decode(key, &v).filter(|ev| keep(ev)) {
                    out.push(ev);
                }
            }
        }
        Ok(out)
    }

    fn since(
        &self,
        since_ms: u64,
        keep: &mut dyn FnMut(&Event) -> bool,
    ) -> StateResult<Vec<Event>> {
        let mut out = Vec::new();
        for item in self.events.range(since_ms.to_be_bytes()..) {
            let (k, v) = item?;
            if let Some(ev) = decode(&k, &v).filter(|ev| keep(ev)) {
                out.push(ev);
            }
        }
        Ok(out)
    }

    fn purge_before(&self, before_ms: u64) -> StateResult<usize> {
        let mut n = 0;
        for item in self.events.range(..before_ms.to_be_bytes()) {
            let (k, v) = item?;
            if let Ok(ev) = serde_json::from_slice::<Event>(&v) {
                for ik in index_keys(&ev, &k) {
                    self.index.remove(ik)?;
                }
            }
            self.events.remove(k)?;
            n += 1;
        }
        Ok(n)
    }
}

/// The meta key of "all delivery paused".
pub const META_PAUSED: &str = "paused";
/// The meta key that keeps the paused routes (a JSON list).
pub const META_PAUSED_ROUTES: &str = "paused_routes";

/// The pause flags of this node, in memory and in the spool's meta tree.
pub struct LocalPauses {
    store: Store,
    delivery: AtomicBool,
    routes: Mutex<BTreeSet<String>>,
}

impl LocalPauses {
    /// The flags as the last run left them.
    pub fn open(store: &Store) -> StateResult<LocalPauses> {
        let delivery = store.meta_get(META_PAUSED)?.is_some();
        let routes = match store.meta_get(META_PAUSED_ROUTES)? {
            Some(v) => serde_json::from_slice::<Vec<String>>(&v).unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(LocalPauses {
            store: store.clone(),
            delivery: AtomicBool::new(delivery),
            routes: Mutex::new(routes.into_iter().collect()),
        })
    }
}

impl PauseFlags for LocalPauses {
    fn delivery_paused(&self) -> bool {
        self.delivery.load(Ordering::Relaxed)
    }

    fn set_delivery_paused(&self, paused: bool) -> StateResult<()> {
        self.store
            .meta_set(META_PAUSED, paused.then_some(b"1".as_slice()))?;
        self.delivery.store(paused, Ordering::Relaxed);
        Ok(())
    }

    fn route_paused(&self, route: &str) -> bool {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(route)
    }

    fn paused_routes(&self) -> Vec<String> {
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.iter().cloned().collect()
    }

    fn set_route_paused(&self, route: &str, paused: bool) -> StateResult<Vec<String>> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = routes.clone();
        if paused {
            next.insert(route.to_string());
        } else {
            next.remove(route);
        }
        let list: Vec<String> = next.iter().cloned().collect();
        let saved = serde_json::to_vec(&list).map_err(|e| QueueError::Failed(e.to_string()))?;
        self.store.meta_set(
            META_PAUSED_ROUTES,
            (!list.is_empty()).then_some(saved.as_slice()),
        )?;
        *routes = next;
        Ok(list)
    }
}
