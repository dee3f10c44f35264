//! History: one record per state change of a recipient, kept for
//! `history_retention` so that "what happened to the mail for X?" has an
//! answer after the message itself is gone from the queue.
//!
//! Only this module writes the `events` tree. Keys are the event time in
//! milliseconds (big endian, so the tree iterates in time order) followed by a
//! sequence number that makes them unique.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::queue::{now_ms, QueueError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Received,
    Deferred,
    Delivered,
    Bounced,
    Suppressed,
    Cancelled,
    Expired,
    Opened,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Received => "received",
            EventKind::Deferred => "deferred",
            EventKind::Delivered => "delivered",
            EventKind::Bounced => "bounced",
            EventKind::Suppressed => "suppressed",
            EventKind::Cancelled => "cancelled",
            EventKind::Expired => "expired",
            EventKind::Opened => "opened",
        }
    }
}

/// One line of history, with the field names of DESIGN.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339 UTC.
    pub time: String,
    /// Milliseconds since the epoch, for sorting and filtering.
    pub time_ms: u64,
    pub id: String,
    pub rcpt: String,
    pub event: EventKind,
    pub detail: String,
    pub tag: Option<String>,
    pub subject: Option<String>,
}

#[derive(Clone)]
pub struct History {
    events: sled::Tree,
    seq: Arc<AtomicU64>,
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with seconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

impl History {
    pub fn open(db: &sled::Db) -> Result<History, QueueError> {
        Ok(History {
            events: db.open_tree("events")?,
            seq: Arc::new(AtomicU64::new(now_ms())),
        })
    }

    /// Records an event now. Durability follows the next queue commit (or
    /// sled's periodic flush): history is a record, not a promise.
    pub fn record(
        &self,
        kind: EventKind,
        id: &str,
        rcpt: &str,
        detail: &str,
        tag: Option<&str>,
        subject: Option<&str>,
    ) -> Result<Event, QueueError> {
        let t = now_ms();
        let ev = Event {
            time: rfc3339(t),
            time_ms: t,
            id: id.to_string(),
            rcpt: rcpt.to_string(),
            event: kind,
            detail: detail.to_string(),
            tag: tag.map(str::to_string),
            subject: subject.map(str::to_string),
        };
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&t.to_be_bytes());
        key[8..].copy_from_slice(&self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        let v = serde_json::to_vec(&ev).map_err(|_| QueueError::Corrupt(id.to_string()))?;
        self.events.insert(key, v)?;
        Ok(ev)
    }

    /// Events at or after `since_ms`, oldest first, that `keep` accepts.
    pub fn query(
        &self,
        since_ms: u64,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, QueueError> {
        let mut out = Vec::new();
        for item in self.events.range(since_ms.to_be_bytes()..) {
            let (_, v) = item?;
            if let Ok(ev) = serde_json::from_slice::<Event>(&v) {
                if keep(&ev) {
                    out.push(ev);
                }
            }
        }
        Ok(out)
    }

    /// Deletes events older than `before_ms`; returns how many.
    pub fn purge_before(&self, before_ms: u64) -> Result<usize, QueueError> {
        let mut n = 0;
        for item in self.events.range(..before_ms.to_be_bytes()) {
            let (k, _) = item?;
            self.events.remove(k)?;
            n += 1;
        }
        Ok(n)
    }
}
