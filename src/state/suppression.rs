//! The suppression list: addresses herald no longer sends to, because they
//! bounced (`suppress_after_bounces` hard bounces) or because an operator
//! said so. Only this module writes the `suppression` and `bounce_counts`
//! trees.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::state::spool::{now_ms, QueueError};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
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
    /// `[cluster]`: the node that added it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The tenant the address is suppressed for (a complaint about its
    /// mail, or `suppression add --tenant`); None: for everyone (a hard
    /// bounce: the address does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Entry {
    pub fn active(&self, now: u64) -> bool {
        self.expires_ms.is_none_or(|e| now < e)
    }

    /// Its key in the list: the address, and the tenant it is for.
    pub fn list_key(&self) -> String {
        list_key(&self.addr, self.tenant.as_deref())
    }
}

/// The key of the entry for `addr` in scope `tenant` (None: everyone).
/// NUL is in no address, so no key of one scope is a key of another.
pub fn list_key(addr: &str, tenant: Option<&str>) -> String {
    match tenant {
        None => key_text(addr),
        Some(t) => format!("{}\0{t}", key_text(addr)),
    }
}

/// The records of the suppression list and the hard-bounce counts toward
/// `suppress_after_bounces` (the policy around them is
/// [`crate::state::suppression::Suppression`]'s).
pub trait SuppressionStore: Send + Sync {
    /// The entry of a [`list_key`], expired or not.
    fn get(&self, key: &str) -> Result<Option<Entry>, QueueError>;
    /// Stores `e` under its [`Entry::list_key`].
    fn put(&self, e: &Entry) -> Result<(), QueueError>;
    /// Removes the entry of a [`list_key`] (and the bounce count of an
    /// address); true when there was an entry.
    fn remove(&self, key: &str) -> Result<bool, QueueError>;
    /// Every entry, expired or not.
    fn all(&self) -> Result<Vec<Entry>, QueueError>;
    /// Adds one hard bounce to `addr`'s count; the count now.
    fn count_bounce(&self, addr: &str) -> Result<u32, QueueError>;
    fn reset_bounces(&self, addr: &str) -> Result<(), QueueError>;
}

/// The suppression list: the policy (expiry, the bounce threshold, what a
/// failed read means) over its records ([`SuppressionStore`]: this node's
/// sled, or a shared backend).
#[derive(Clone)]
pub struct Suppression {
    store: Arc<dyn SuppressionStore>,
    /// Addresses whose last [`Suppression::check`] failed: each is logged
    /// when it starts and when it stops failing.
    failing: Arc<Mutex<HashSet<String>>>,
    /// `failing` is not empty.
    any_failing: Arc<AtomicBool>,
}

/// An address as the list keys it.
pub fn key_text(addr: &str) -> String {
    addr.trim().to_lowercase()
}

impl Suppression {
    pub fn new(store: Arc<dyn SuppressionStore>) -> Suppression {
        Suppression {
            store,
            failing: Arc::default(),
            any_failing: Arc::default(),
        }
    }

    /// Whether mail of `tenant` to `addr` is suppressed: the entry for
    /// everyone first, else the tenant's own. An error is never "not
    /// suppressed": the caller defers the recipient. The first failure
    /// after a success, and the recovery, are logged.
    pub fn check(&self, addr: &str, tenant: Option<&str>) -> Result<Option<Entry>, QueueError> {
        let r = match (self.get(addr, None), tenant) {
            (Ok(None), Some(t)) => self.get(addr, Some(t)),
            (r, _) => r,
        };
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

    /// The active entry for `addr` in scope `tenant` (None: the entry for
    /// everyone), if any (expired entries are dropped).
    pub fn get(&self, addr: &str, tenant: Option<&str>) -> Result<Option<Entry>, QueueError> {
        let key = list_key(addr, tenant);
        match self.store.get(&key)? {
            Some(e) if e.active(now_ms()) => Ok(Some(e)),
            Some(_) => {
                self.store.remove(&key)?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    pub fn put(&self, e: &Entry) -> Result<(), QueueError> {
        self.store.put(e)
    }

    /// Lifts the suppression of `addr` in scope `tenant` (None: the one
    /// for everyone); true when there was one.
    pub fn remove(&self, addr: &str, tenant: Option<&str>) -> Result<bool, QueueError> {
        self.store.remove(&list_key(addr, tenant))
    }

    /// The active entries.
    pub fn list(&self) -> Result<Vec<Entry>, QueueError> {
        let now = now_ms();
        Ok(self
            .store
            .all()?
            .into_iter()
            .filter(|e| e.active(now))
            .collect())
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
        let n = self.store.count_bounce(addr)?;
        if n < threshold || self.get(addr, None)?.is_some() {
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
            ..Default::default()
        };
        self.put(&e)?;
        self.store.reset_bounces(addr)?;
        Ok(Some(e))
    }

    /// A delivery resets the bounce count.
    pub fn note_delivered(&self, addr: &str) -> Result<(), QueueError> {
        self.store.reset_bounces(addr)
    }
}
