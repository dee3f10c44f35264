//! History: one record per state change of a recipient, kept for
//! `history_retention` so that "what happened to the mail for X?" has an
//! answer after the message itself is gone from the queue.
//!
//! Only this module writes the `events` tree and its index. Keys are the
//! event time in milliseconds (big endian, so the tree iterates in time
//! order) followed by a sequence number that makes them unique. The
//! `events_index` tree maps recipient (lowercased), queue id and tag to
//! event keys, so that `trace`, `show` and `cancel --tag` read only the
//! events they need, however long the history.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::reply::Class;
use crate::state::spool::{now_ms, QueueError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// herald refused the transaction (or this recipient): no queue id,
    /// detail "from CLIENT: REPLY".
    Rejected,
    /// A feedback-loop report: the recipient marked the message as spam.
    Complained,
    /// A remote server reported a delay (a DSN with `Action: delayed`).
    Delayed,
    /// A DMARC aggregate report in which herald's own mail for a domain
    /// passed less than `[bounces] dmarc_alert_below`: no queue id or
    /// recipient; the detail names the domain, the receiver and the rate.
    DmarcFailing,
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
            EventKind::Rejected => "rejected",
            EventKind::Complained => "complained",
            EventKind::Delayed => "delayed",
            EventKind::DmarcFailing => "dmarc_failing",
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
    /// The class of the reply behind a deferral, bounce or expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// Unique per event (its key in the history, hex): webhook receivers
    /// deduplicate by it, the events API pages by it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
    /// Delivery attempts so far (deferred, delivered, bounced, expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Where it went or was refused (the upstream or MX host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// For `opened`: the mail client's User-Agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// For events from a delivery report or complaint: the report's id
    /// (`herald show REPORT-ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// `[cluster]`: the node that recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The `[[tenants]]` entry whose mail it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// What an event may carry beyond the fields every event has.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub class: Option<Class>,
    pub attempts: Option<u32>,
    pub upstream: Option<String>,
    pub user_agent: Option<String>,
    pub report: Option<String>,
    pub tenant: Option<String>,
}

/// The history key of an event id (hex of 16 bytes), for paging.
pub fn key_of_event_id(id: &str) -> Option<[u8; 16]> {
    if id.len() != 32 {
        return None;
    }
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

/// Events since start per (kind, class).
type Counts = BTreeMap<(EventKind, Option<Class>), u64>;

/// Events per hour (hour number since the epoch) per tenant and kind.
type TenantHourly = BTreeMap<u64, BTreeMap<(String, EventKind), u64>>;

/// Counts one event of `key` at `time_ms` in per-hour counts.
fn count_hour<K: Ord>(hourly: &Mutex<BTreeMap<u64, BTreeMap<K, u64>>>, time_ms: u64, key: K) {
    *hourly
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(time_ms / HOUR_MS)
        .or_default()
        .entry(key)
        .or_insert(0) += 1;
}

/// Events per kind over the last 24 hours of per-hour counts (older hours
/// are dropped), of the keys `kind` maps to a kind.
fn last_day<K>(
    hourly: &Mutex<BTreeMap<u64, BTreeMap<K, u64>>>,
    kind: impl Fn(&K) -> Option<EventKind>,
) -> BTreeMap<EventKind, u64> {
    let first = now_ms() / HOUR_MS - 23;
    let mut h = hourly.lock().unwrap_or_else(|e| e.into_inner());
    h.retain(|hour, _| *hour >= first);
    let mut out = BTreeMap::new();
    for counts in h.values() {
        for (k, n) in counts {
            if let Some(k) = kind(k) {
                *out.entry(k).or_insert(0) += n;
            }
        }
    }
    out
}

#[derive(Clone)]
pub struct History {
    /// Events and their index: this node's sled, or a shared backend.
    store: Arc<dyn EventStore>,
    seq: Arc<AtomicU64>,
    /// Events recorded since start, per kind and class (for /metrics).
    counts: Arc<Mutex<Counts>>,
    /// Events recorded since start per tenant and kind (for /metrics;
    /// tenants come from the config, so the labels are bounded).
    tenant_counts: Arc<Mutex<BTreeMap<(String, EventKind), u64>>>,
    /// Events per hour (hour number since the epoch) over the last day,
    /// for `status`: counted once at start, then as they happen.
    hourly: Arc<Mutex<BTreeMap<u64, BTreeMap<EventKind, u64>>>>,
    /// The same per tenant, for a tenant's `status`.
    tenant_hourly: Arc<Mutex<TenantHourly>>,
    /// Webhook outbox: `NAME \0 EVENT-KEY` -> event JSON, written with the
    /// event itself (same flush, same commit), removed once delivered.
    pub(super) outbox: sled::Tree,
    /// The endpoints in force, each with the wake-up of its sender; a
    /// reload replaces the list.
    hooks: Arc<RwLock<Hooks>>,
    /// `[cluster] node`, named in every event, and two bytes of its name
    /// that make event keys unique across the nodes.
    node: Option<(String, [u8; 2])>,
}

type Hooks = Arc<Vec<(crate::config::Webhook, Arc<tokio::sync::Notify>)>>;

const HOUR_MS: u64 = 3_600_000;

/// Every kind, in the order of the counters.
pub const KINDS: [EventKind; 12] = [
    EventKind::Received,
    EventKind::Deferred,
    EventKind::Delivered,
    EventKind::Bounced,
    EventKind::Suppressed,
    EventKind::Cancelled,
    EventKind::Expired,
    EventKind::Opened,
    EventKind::Rejected,
    EventKind::Complained,
    EventKind::Delayed,
    EventKind::DmarcFailing,
];

/// Events (history) and their index by recipient, queue id and tag. Keys
/// are the event time in ms (big endian) and a sequence number: they sort
/// in time order and are unique.
pub trait EventStore: Send + Sync {
    fn append(&self, key: [u8; 16], ev: &Event, json: &[u8]) -> Result<(), QueueError>;
    /// Events with this recipient, id or tag at or after `since_ms` that
    /// `keep` accepts, in key order.
    fn by(
        &self,
        by: By,
        since_ms: u64,
        keep: &mut dyn FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, QueueError>;
    /// Events at or after `since_ms` that `keep` accepts, oldest first.
    fn since(
        &self,
        since_ms: u64,
        keep: &mut dyn FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, QueueError>;
    /// Deletes events older than `before_ms`; how many.
    fn purge_before(&self, before_ms: u64) -> Result<usize, QueueError>;
}

/// An indexed field to look events up by.
#[derive(Debug, Clone, Copy)]
pub enum By<'a> {
    Rcpt(&'a str),
    Id(&'a str),
    Tag(&'a str),
}

impl By<'_> {
    pub(crate) fn prefix(&self) -> Vec<u8> {
        let (kind, value) = match self {
            By::Rcpt(r) => (b'r', r.to_lowercase()),
            By::Id(i) => (b'i', i.to_string()),
            By::Tag(t) => (b't', t.to_string()),
        };
        let mut p = vec![kind, 0];
        p.extend_from_slice(value.as_bytes());
        p.push(0);
        p
    }
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with seconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

impl History {
    /// History over `store` for the events; the webhook outbox stays in
    /// this node's `db` (each node sends what it recorded).
    pub fn with_store(db: &sled::Db, store: Arc<dyn EventStore>) -> Result<History, QueueError> {
        Ok(History {
            store,
            seq: Arc::new(AtomicU64::new(now_ms())),
            counts: Arc::new(Default::default()),
            tenant_counts: Arc::new(Default::default()),
            hourly: Arc::new(Default::default()),
            tenant_hourly: Arc::new(Default::default()),
            outbox: db.open_tree("webhook_outbox")?,
            hooks: Arc::default(),
            node: None,
        })
    }

    /// Events name this node (a cluster's).
    pub fn with_node(mut self, node: Option<String>) -> History {
        self.node = node.map(|n| {
            let tag = n
                .bytes()
                .fold(0u16, |h, b| h.rotate_left(5) ^ b as u16 ^ 0x5a5a);
            (n, tag.to_be_bytes())
        });
        self
    }

    /// Events for these endpoints also go to the outbox; each endpoint's
    /// `Notify` wakes its sender.
    pub fn with_webhooks(self, hooks: &[crate::config::Webhook]) -> History {
        self.set_webhooks(hooks);
        self
    }

    /// The endpoints after a reload; one that keeps its name keeps its
    /// wake-up (its sender goes on).
    pub fn set_webhooks(&self, hooks: &[crate::config::Webhook]) {
        let mut cur = self.hooks.write().unwrap_or_else(|e| e.into_inner());
        let next = hooks
            .iter()
            .map(|h| {
                let wake = cur
                    .iter()
                    .find(|(old, _)| old.name == h.name)
                    .map(|(_, w)| w.clone())
                    .unwrap_or_default();
                (h.clone(), wake)
            })
            .collect();
        *cur = Arc::new(next);
    }

    /// The wake-up of endpoint `name`'s sender.
    pub fn outbox_notify(&self, name: &str) -> Arc<tokio::sync::Notify> {
        let cur = self.hooks.read().unwrap_or_else(|e| e.into_inner());
        cur.iter()
            .find(|(h, _)| h.name == name)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    }

    /// The outbox key prefix of an endpoint.
    pub fn outbox_prefix(name: &str) -> Vec<u8> {
        let mut p = name.as_bytes().to_vec();
        p.push(0);
        p
    }

    /// Counts the last day's events once (at start-up), so that
    /// [`History::last_24h`] never scans.
    pub fn load_hourly(&self) -> Result<(), QueueError> {
        let since = now_ms().saturating_sub(24 * HOUR_MS);
        let mut hourly = BTreeMap::<u64, BTreeMap<EventKind, u64>>::new();
        let mut tenants = TenantHourly::new();
        self.query(since, |e| {
            let hour = e.time_ms / HOUR_MS;
            *hourly.entry(hour).or_default().entry(e.event).or_default() += 1;
            if let Some(t) = &e.tenant {
                *tenants
                    .entry(hour)
                    .or_default()
                    .entry((t.clone(), e.event))
                    .or_default() += 1;
            }
            false
        })?;
        *self.hourly.lock().unwrap_or_else(|e| e.into_inner()) = hourly;
        *self.tenant_hourly.lock().unwrap_or_else(|e| e.into_inner()) = tenants;
        Ok(())
    }

    /// Events per kind of tenant `t` in the last 24 hours (counted by the
    /// hour, as [`History::last_24h`]).
    pub fn last_24h_of(&self, t: &str) -> BTreeMap<EventKind, u64> {
        last_day(&self.tenant_hourly, |(tenant, k)| {
            (tenant == t).then_some(*k)
        })
    }

    /// Events per kind in the last 24 hours (counted by the hour).
    pub fn last_24h(&self) -> BTreeMap<EventKind, u64> {
        last_day(&self.hourly, |k| Some(*k))
    }

    /// Records an event with everything it carries (webhooks send it all),
    /// and its webhook outbox entries. Durability follows the next queue
    /// commit (or sled's periodic flush): history is a record, not a
    /// promise. Only the ledger calls it.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::state) fn record_with(
        &self,
        kind: EventKind,
        id: &str,
        rcpt: &str,
        detail: &str,
        tag: Option<&str>,
        subject: Option<&str>,
        extra: Extra,
    ) -> Result<Event, QueueError> {
        let class = extra.class;
        let t = now_ms();
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&t.to_be_bytes());
        key[8..].copy_from_slice(&self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        // Unique across the nodes of a cluster too: two bytes of the
        // node's name over the top of the sequence (which starts at this
        // process's start time in ms, and needs far fewer than 48 bits).
        if let Some((_, tag)) = &self.node {
            key[8..10].copy_from_slice(tag);
        }
        let ev = Event {
            time: rfc3339(t),
            time_ms: t,
            id: id.to_string(),
            rcpt: rcpt.to_string(),
            event: kind,
            detail: detail.to_string(),
            tag: tag.map(str::to_string),
            subject: subject.map(str::to_string),
            class,
            event_id: hex(&key),
            attempts: extra.attempts,
            upstream: extra.upstream,
            user_agent: extra.user_agent,
            report: extra.report,
            node: self.node.as_ref().map(|(n, _)| n.clone()),
            tenant: extra.tenant,
        };
        let v = serde_json::to_vec(&ev).map_err(|_| QueueError::Corrupt(id.to_string()))?;
        let hooks = self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (hook, wake) in hooks.iter() {
            if hook.wants(kind.as_str(), tag, ev.tenant.as_deref()) {
                let mut k = Self::outbox_prefix(&hook.name);
                k.extend_from_slice(&key);
                self.outbox.insert(k, v.as_slice())?;
                wake.notify_one();
            }
        }
        self.store.append(key, &ev, &v)?;
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((kind, class))
            .or_insert(0) += 1;
        if let Some(tenant) = &ev.tenant {
            *self
                .tenant_counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((tenant.clone(), kind))
                .or_insert(0) += 1;
            count_hour(&self.tenant_hourly, t, (tenant.clone(), kind));
        }
        count_hour(&self.hourly, t, kind);
        Ok(ev)
    }

    /// Events recorded since start per tenant and kind.
    pub fn tenant_counts(&self) -> Vec<(String, EventKind, u64)> {
        self.tenant_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((t, k), n)| (t.clone(), *k, *n))
            .collect()
    }

    /// Events recorded since start, per kind and class: every kind appears
    /// (with class None) even before its first event.
    pub fn counts(&self) -> Vec<(EventKind, Option<Class>, u64)> {
        let mut all = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for k in KINDS {
            all.entry((k, None)).or_insert(0);
        }
        all.into_iter().map(|((k, c), n)| (k, c, n)).collect()
    }

    /// Events with this recipient, id or tag, at or after `since_ms`,
    /// oldest first, that `keep` accepts.
    pub fn query_by(
        &self,
        by: By,
        since_ms: u64,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, QueueError> {
        let mut out = self.store.by(by, since_ms, &mut keep)?;
        out.sort_by_key(|e| e.time_ms);
        Ok(out)
    }

    /// Events at or after `since_ms`, oldest first, that `keep` accepts.
    pub fn query(
        &self,
        since_ms: u64,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, QueueError> {
        self.store.since(since_ms, &mut keep)
    }

    /// Deletes events older than `before_ms`; returns how many.
    pub fn purge_before(&self, before_ms: u64) -> Result<usize, QueueError> {
        self.store.purge_before(before_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_finds_by_rcpt_id_and_tag_and_purge_cleans_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .temporary(true)
            .open()
            .unwrap();
        let store = Arc::new(crate::state::ports::SledEvents::open(&db).unwrap());
        let h = History::with_store(&db, store).unwrap();
        h.record_with(
            EventKind::Received,
            "ID1",
            "Louise@X.test",
            "d",
            Some("file-1"),
            None,
            Extra::default(),
        )
        .unwrap();
        h.record_with(
            EventKind::Received,
            "ID1",
            "paul@x.test",
            "d",
            Some("file-1"),
            None,
            Extra::default(),
        )
        .unwrap();
        h.record_with(
            EventKind::Received,
            "ID2",
            "louise@x.test",
            "d",
            None,
            None,
            Extra::default(),
        )
        .unwrap();
        let r = h.query_by(By::Rcpt("LOUISE@x.test"), 0, |_| true).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(h.query_by(By::Id("ID1"), 0, |_| true).unwrap().len(), 2);
        assert_eq!(h.query_by(By::Tag("file-1"), 0, |_| true).unwrap().len(), 2);
        assert_eq!(
            h.query_by(By::Tag("file"), 0, |_| true).unwrap().len(),
            0,
            "no prefix match"
        );
        assert_eq!(h.query_by(By::Id("ID"), 0, |_| true).unwrap().len(), 0);
        assert_eq!(h.purge_before(now_ms() + 1000).unwrap(), 3);
        assert_eq!(
            h.query_by(By::Rcpt("louise@x.test"), 0, |_| true)
                .unwrap()
                .len(),
            0
        );
        assert!(db.open_tree("events_index").unwrap().is_empty());
    }
}
