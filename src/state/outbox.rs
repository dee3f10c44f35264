//! The webhook outbox: events waiting for each endpoint (written by
//! `History` with the event itself), and what each endpoint last did.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use crate::config::Webhook;
use crate::state::history::History;

/// What `herald webhooks` shows of one endpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HookState {
    pub name: String,
    pub url: String,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<u64>,
    pub delivered: u64,
    pub dropped: u64,
}

/// The state of every endpoint, shared with the control socket, in the
/// order of the config.
#[derive(Default)]
pub struct Hooks {
    list: RwLock<Vec<Arc<Mutex<HookState>>>>,
    /// Endpoints whose sender runs.
    pub running: Mutex<HashSet<String>>,
}

impl Hooks {
    pub fn new(cfg: &[Webhook]) -> Hooks {
        let h = Hooks::default();
        h.set(cfg);
        h
    }

    /// The endpoints after a reload: one that keeps its name keeps its
    /// counters.
    pub fn set(&self, cfg: &[Webhook]) {
        let mut list = self.list.write().unwrap_or_else(|e| e.into_inner());
        let next = cfg
            .iter()
            .map(|w| {
                let st = list
                    .iter()
                    .find(|st| st.lock().unwrap_or_else(|e| e.into_inner()).name == w.name)
                    .cloned()
                    .unwrap_or_default();
                {
                    let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                    g.name = w.name.clone();
                    g.url = w.url.clone();
                }
                st
            })
            .collect();
        *list = next;
    }

    /// What each endpoint last did, in the order of the config.
    pub fn states(&self) -> Vec<HookState> {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .map(|st| st.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    pub fn state(&self, name: &str) -> Arc<Mutex<HookState>> {
        let list = self.list.read().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|st| st.lock().unwrap_or_else(|e| e.into_inner()).name == name)
            .cloned()
            .unwrap_or_default()
    }
}

impl History {
    /// Outbox entries of endpoint `name`, oldest first, at most `max`.
    pub fn outbox_pending(&self, name: &str, max: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.outbox
            .scan_prefix(History::outbox_prefix(name))
            .take(max)
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    /// Events waiting for endpoint `name`.
    pub fn outbox_backlog(&self, name: &str) -> usize {
        self.outbox
            .scan_prefix(History::outbox_prefix(name))
            .count()
    }

    /// Removes a delivered (or dropped) entry.
    pub fn outbox_remove(&self, key: &[u8]) {
        if let Err(e) = self.outbox.remove(key) {
            tracing::warn!(error = %e, "cannot remove a webhook outbox entry; it may be sent again");
        }
    }
}

/// The time (ms) of an outbox entry, from its key.
pub fn entry_time(prefix_len: usize, key: &[u8]) -> u64 {
    key.get(prefix_len..prefix_len + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}
