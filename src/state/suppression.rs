//! The suppression list: addresses herald no longer sends to, because they
//! bounced (`suppress_after_bounces` hard bounces) or because an operator
//! said so. Only this module writes the `suppression` and `bounce_counts`
//! trees.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::state::spool::{now_ms, QueueError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub addr: String,
    /// Why: "bounced" (automatic), "manual", or the operator's text.
    pub reason: String,
    /// The remote reply that caused it, for automatic entries.
    pub reply: Option<String>,
    /// Queue id of the message whose bounce caused it.
    pub source_id: Option<String>,
    pub added_ms: u64,
    /// When it lifts by itself; None: only `suppression remove` lifts it.
    pub expires_ms: Option<u64>,
    pub automatic: bool,
}

impl Entry {
    pub fn active(&self, now: u64) -> bool {
        self.expires_ms.is_none_or(|e| now < e)
    }
}

#[derive(Clone)]
pub struct Suppression {
    entries: sled::Tree,
    bounces: sled::Tree,
    /// Addresses whose last [`Suppression::check`] failed: each is logged
    /// when it starts and when it stops failing.
    failing: Arc<Mutex<HashSet<String>>>,
    /// `failing` is not empty.
    any_failing: Arc<AtomicBool>,
}

fn key(addr: &str) -> Vec<u8> {
    key_text(addr).into_bytes()
}

fn key_text(addr: &str) -> String {
    addr.trim().to_lowercase()
}

impl Suppression {
    pub fn open(db: &sled::Db) -> Result<Suppression, QueueError> {
        Ok(Suppression {
            entries: db.open_tree("suppression")?,
            bounces: db.open_tree("bounce_counts")?,
            failing: Arc::default(),
            any_failing: Arc::default(),
        })
    }

    /// [`Suppression::get`] for a decision to send. An error is never "not
    /// suppressed": the caller defers the recipient. The first failure
    /// after a success, and the recovery, are logged.
    pub fn check(&self, addr: &str) -> Result<Option<Entry>, QueueError> {
        let r = self.get(addr);
        // The usual case (read fine, nothing failing) takes no lock: this
        // runs for every recipient at reception and delivery.
        if r.is_ok() && !self.any_failing.load(Ordering::Relaxed) {
            return r;
        }
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match &r {
            // A few hundred are enough to tell the story.
            Err(e) if failing.len() < 500 && failing.insert(key_text(addr)) => tracing::error!(
                rcpt = %addr,
                error = %e,
                "the suppression list cannot be read: mail to such addresses is deferred, not sent, until it can"
            ),
            Ok(_) if !failing.is_empty() && failing.remove(&key_text(addr)) => {
                tracing::info!(rcpt = %addr, "the suppression list can be read again")
            }
            _ => {}
        }
        self.any_failing
            .store(!failing.is_empty(), Ordering::Relaxed);
        r
    }

    /// The active entry for `addr`, if any (expired entries are dropped).
    pub fn get(&self, addr: &str) -> Result<Option<Entry>, QueueError> {
        let Some(v) = self.entries.get(key(addr))? else {
            return Ok(None);
        };
        let e: Entry = serde_json::from_slice(&v).map_err(|_| QueueError::Corrupt(addr.into()))?;
        if e.active(now_ms()) {
            Ok(Some(e))
        } else {
            self.entries.remove(key(addr))?;
            Ok(None)
        }
    }

    pub fn put(&self, e: &Entry) -> Result<(), QueueError> {
        let v = serde_json::to_vec(e).map_err(|_| QueueError::Corrupt(e.addr.clone()))?;
        self.entries.insert(key(&e.addr), v)?;
        Ok(())
    }

    /// Lifts a suppression; true when there was one.
    pub fn remove(&self, addr: &str) -> Result<bool, QueueError> {
        self.bounces.remove(key(addr))?;
        Ok(self.entries.remove(key(addr))?.is_some())
    }

    pub fn list(&self) -> Result<Vec<Entry>, QueueError> {
        let now = now_ms();
        let mut out = Vec::new();
        for item in self.entries.iter() {
            let (_, v) = item?;
            if let Ok(e) = serde_json::from_slice::<Entry>(&v) {
                if e.active(now) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// Counts a hard bounce; returns the new entry when this bounce
    /// crosses the threshold.
    pub fn note_bounce(
        &self,
        addr: &str,
        reply: &str,
        id: &str,
        threshold: u32,
        expiry: Option<std::time::Duration>,
    ) -> Result<Option<Entry>, QueueError> {
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
        if n < threshold || self.get(addr)?.is_some() {
            return Ok(None);
        }
        let now = now_ms();
        let e = Entry {
            addr: addr.to_lowercase(),
            reason: format!("bounced {n} time{}", if n == 1 { "" } else { "s" }),
            reply: Some(reply.to_string()),
            source_id: Some(id.to_string()),
            added_ms: now,
            expires_ms: expiry.map(|d| now + d.as_millis() as u64),
            automatic: true,
        };
        self.put(&e)?;
        self.bounces.remove(key(addr))?;
        Ok(Some(e))
    }

    /// A delivery resets the bounce count.
    pub fn note_delivered(&self, addr: &str) -> Result<(), QueueError> {
        self.bounces.remove(key(addr))?;
        Ok(())
    }
}
