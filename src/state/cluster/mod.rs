//! `[cluster]`: several herald nodes as one, through Redis.
//!
//! Each node keeps its spool (durable before `250`, drained only by it)
//! and a **mirror** of what the cluster shares, in its own sled: the
//! suppression list, the bounce counts, the pause flags, every node's
//! events and the return paths of every node's mail. Reads (a suppression
//! check per recipient, `trace`, `history`, a report's lookup) never wait
//! for Redis; writes go to the mirror at once and to a durable **outbox**
//! (sled tree `cluster_outbox`) that [`sync::push`] sends to Redis in
//! pipelined batches: the shared state (hashes and sets, for nodes that
//! join later) and one entry per change on the stream `PREFIX log`, which
//! every node reads ([`sync::read`]) and applies to its own mirror. So
//! Redis being slow or away never refuses, loses or duplicates mail: the
//! outbox waits for it, and the node says it is degraded.
//!
//! Pacing (`max_rate`, `max_connections`, back-off) cannot be mirrored:
//! [`pace::RedisPace`] asks Redis, and falls back to this node's share of
//! each limit while Redis does not answer.

pub mod pace;
pub mod sync;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::history::{By, Event, EventStore};
use crate::state::ports::{LocalPauses, PauseFlags, SledEvents, SledSuppression, StateResult};
use crate::state::spool::{now_ms, QueueError, Store};
use crate::state::suppression::{key_text, Entry, SuppressionStore};

/// One change, as the outbox keeps it and the stream carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Op {
    /// An event of this node: its history key (hex) and JSON.
    Event {
        key: String,
        json: String,
    },
    /// The return paths of a message (`[bounces]`): its id and record.
    Sent {
        id: String,
        json: String,
    },
    Suppress {
        entry: Entry,
    },
    Lift {
        addr: String,
    },
    /// One more hard bounce toward `suppress_after_bounces`.
    Bounce {
        addr: String,
    },
    Reset {
        addr: String,
    },
    Pause {
        on: bool,
    },
    Route {
        route: String,
        on: bool,
    },
    /// A destination asked to slow down: no new sessions before `until_ms`.
    Backoff {
        dest: String,
        until_ms: u64,
        level: u32,
        reply: Option<String>,
    },
    /// A destination's back-off ended with a success.
    Clear {
        dest: String,
    },
}

impl Op {
    /// Changes the node that made them has applied already (its own
    /// mirror needs nothing from the stream).
    pub fn own_only(&self) -> bool {
        matches!(
            self,
            Op::Event { .. }
                | Op::Sent { .. }
                | Op::Bounce { .. }
                | Op::Backoff { .. }
                | Op::Clear { .. }
        )
    }
}

/// A node as its last heartbeat described it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSeen {
    pub node: String,
    pub seen_ms: u64,
    pub messages: u64,
    pub deferred: u64,
    pub degraded: bool,
    #[serde(default)]
    pub started_ms: u64,
}

/// What may fail, each on its own: the node is degraded while any does.
#[derive(Debug, Clone, Copy)]
pub enum Part {
    Push = 1,
    Read = 2,
    Heartbeat = 4,
    Pace = 8,
}

/// A node of the cluster: its Redis connections, its outbox and mirror.
pub struct Cluster {
    pub node: String,
    prefix: String,
    pub timeout: Duration,
    pub hold_when_down: bool,
    client: redis::Client,
    /// Commands (multiplexed); None until the first connection.
    conn: Mutex<Option<redis::aio::ConnectionManager>>,
    outbox: sled::Tree,
    seq: AtomicU64,
    wake: tokio::sync::Notify,
    /// [`Part`] bits failing now.
    failing: AtomicU8,
    why: Mutex<String>,
    nodes: Mutex<Vec<NodeSeen>>,
    /// When Redis last gave the heartbeats (ms): nodes are judged alive as
    /// of then, so that an outage keeps the count it began with.
    last_beat: AtomicU64,
    store: Store,
    /// The mirror.
    pub(crate) suppression: SledSuppression,
    pub(crate) events: SledEvents,
    pub(crate) pauses: LocalPauses,
    pub(crate) sent: sled::Tree,
    /// Back-offs of every node, and the fallback pace.
    pub(crate) pace: Arc<crate::state::pacing::LocalPace>,
    /// The shared pace (its lease keeper is one of `serve`'s tasks).
    pub shared_pace: std::sync::OnceLock<Arc<pace::RedisPace>>,
}

/// The meta keys of the mirror's place in the stream.
pub(crate) const META_LOG_ID: &str = "cluster_log_id";
pub(crate) const META_EPOCH: &str = "cluster_epoch";

/// A heartbeat older than this: the node is gone.
pub const NODE_ALIVE_MS: u64 = 10_000;

impl Cluster {
    pub fn open(cfg: &crate::config::Cluster, store: &Store) -> anyhow::Result<Cluster> {
        use redis::IntoConnectionInfo;
        let mut info = cfg
            .redis
            .expose()
            .into_connection_info()
            .map_err(|e| anyhow::anyhow!("[cluster] redis: {e}"))?;
        if let Some(p) = &cfg.redis_password {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|e| anyhow::anyhow!("[cluster] redis: {e}"))?;
        let db = &store.db;
        let outbox = db.open_tree("cluster_outbox")?;
        let next = outbox
            .last()?
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes))
            .map_or(0, |n| n + 1);
        Ok(Cluster {
            node: cfg.node.clone(),
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            hold_when_down: cfg.hold_when_down,
            client,
            conn: Mutex::new(None),
            outbox,
            seq: AtomicU64::new(next.max(now_ms() * 1000)),
            wake: tokio::sync::Notify::new(),
            failing: AtomicU8::new(0),
            why: Mutex::new(String::new()),
            nodes: Mutex::new(Vec::new()),
            last_beat: AtomicU64::new(0),
            store: store.clone(),
            suppression: SledSuppression::open(db)?,
            events: SledEvents::open(db)?,
            pauses: LocalPauses::open(store)?,
            sent: db.open_tree("return_paths")?,
            pace: Arc::default(),
            shared_pace: Default::default(),
        })
    }

    /// A Redis key of this cluster.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The command connection, made on first use (Redis may be away when
    /// herald starts). None while it cannot be made.
    pub async fn connection(&self, part: Part) -> Option<redis::aio::ConnectionManager> {
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(c);
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let wait = self.timeout.max(Duration::from_secs(1));
        let made =
            tokio::time::timeout(wait, self.client.get_connection_manager_with_config(cfg)).await;
        let c = self.failure(part, "cannot connect to Redis", wait, made)?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Some(c)
    }

    /// A connection of its own for blocking reads of the stream (a
    /// blocked command would hold every other one on a shared connection).
    pub async fn reading_connection(
        &self,
        block: Duration,
    ) -> Option<redis::aio::MultiplexedConnection> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(block + self.timeout.max(Duration::from_secs(1))));
        let wait = self.timeout.max(Duration::from_secs(1));
        let made = tokio::time::timeout(
            wait,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await;
        self.failure(Part::Read, "cannot connect to Redis", wait, made)
    }

    /// Runs a command within `timeout`; a failure marks `part` failing.
    pub async fn cmd<T: redis::FromRedisValue>(&self, part: Part, cmd: &redis::Cmd) -> Option<T> {
        let mut c = self.connection(part).await?;
        let r = tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut c)).await;
        self.judge(part, r)
    }

    /// Runs a pipeline within `timeout` (per command, at most 2 s in all).
    pub async fn pipe<T: redis::FromRedisValue>(
        &self,
        part: Part,
        p: &redis::Pipeline,
    ) -> Option<T> {
        let mut c = self.connection(part).await?;
        let r = tokio::time::timeout(
            self.timeout.max(Duration::from_secs(2)),
            p.query_async::<T>(&mut c),
        )
        .await;
        self.judge(part, r)
    }

    /// A call's result within its time limit: `part` works (again), or it
    /// fails (logged once when the node becomes degraded).
    pub(crate) fn judge<T>(
        &self,
        part: Part,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let v = self.failure(part, "Redis", self.timeout, r)?;
        self.ok(part);
        Some(v)
    }

    /// The value of `r`, or None with `part` marked failing (`doing`: what
    /// was tried, `within`: its time limit).
    fn failure<T>(
        &self,
        part: Part,
        doing: &str,
        within: Duration,
        r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(part, &format!("{doing}: {e}"));
                None
            }
            Err(_) => {
                self.failed(part, &format!("{doing}: no answer within {within:?}"));
                None
            }
        }
    }

    /// Adds a change to the outbox (durable at the next commit) and wakes
    /// the sender.
    pub fn enqueue(&self, op: &Op) -> StateResult<()> {
        let v = serde_json::to_vec(op).map_err(|e| QueueError::Failed(e.to_string()))?;
        let k = self.seq.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        self.outbox.insert(k, v)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Changes waiting for Redis.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// `part` works (again).
    pub fn ok(&self, part: Part) {
        let before = self.failing.fetch_and(!(part as u8), Ordering::Relaxed);
        if before != 0 && before & !(part as u8) == 0 {
            tracing::info!(node = %self.node, "Redis answers again: the cluster is whole (no longer degraded)");
        }
    }

    /// `part` failed: the node is degraded (logged once, when it starts).
    pub fn failed(&self, part: Part, why: &str) {
        let before = self.failing.fetch_or(part as u8, Ordering::Relaxed);
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why.to_string();
        if before == 0 {
            tracing::warn!(node = %self.node, reason = %why, "cluster degraded: going on with this node's mirror and its share of the limits until Redis answers");
        }
    }

    /// Whether `part` is failing now.
    pub fn failing(&self, part: Part) -> bool {
        self.failing.load(Ordering::Relaxed) & part as u8 != 0
    }

    /// Asks Redis whether it answers, for a part that has nothing else to
    /// ask it now (so that it stops failing once Redis is back).
    pub async fn probe(&self, part: Part) {
        if self.failing(part) {
            let _: Option<String> = self.cmd(part, &redis::cmd("PING")).await;
        }
    }

    /// Why the node is degraded, if it is.
    pub fn degraded(&self) -> Option<String> {
        (self.failing.load(Ordering::Relaxed) != 0)
            .then(|| self.why.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The nodes of the last heartbeat, this one included.
    pub fn nodes(&self) -> Vec<NodeSeen> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Nodes whose heartbeat was recent when Redis last answered (at
    /// least this one): while Redis is away each limit is shared by as many
    /// nodes as were seen before.
    pub fn alive(&self) -> usize {
        let at = self.last_beat.load(Ordering::Relaxed);
        self.nodes()
            .iter()
            .filter(|n| n.node != self.node && at.saturating_sub(n.seen_ms) < NODE_ALIVE_MS)
            .count()
            + 1
    }

    /// The nodes as Redis gave them now.
    pub(crate) fn seen(&self, nodes: Vec<NodeSeen>, from_redis: bool) {
        if from_redis {
            self.last_beat.store(now_ms(), Ordering::Relaxed);
        }
        *self.nodes.lock().unwrap_or_else(|e| e.into_inner()) = nodes;
    }

    /// What `status` says of the cluster.
    pub fn report(&self) -> serde_json::Value {
        let now = now_ms();
        serde_json::json!({
            "node": self.node,
            "degraded": self.degraded(),
            "outbox": self.outbox_len(),
            "nodes": self.nodes().iter().map(|n| serde_json::json!({
                "node": n.node,
                "alive": n.node == self.node || now.saturating_sub(n.seen_ms) < NODE_ALIVE_MS,
                "seen_ms": n.seen_ms,
                "messages": n.messages,
                "deferred": n.deferred,
                "degraded": n.degraded,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The suppression list of the cluster: this node's mirror, and every
/// change to Redis through the outbox.
pub struct SharedSuppression(pub Arc<Cluster>);

impl SuppressionStore for SharedSuppression {
    fn get(&self, key: &str) -> StateResult<Option<Entry>> {
        self.0.suppression.get(key)
    }

    fn put(&self, e: &Entry) -> StateResult<()> {
        let mut e = e.clone();
        e.node.get_or_insert_with(|| self.0.node.clone());
        self.0.suppression.put(&e)?;
        self.0.enqueue(&Op::Suppress { entry: e })
    }

    fn remove(&self, key: &str) -> StateResult<bool> {
        let had = self.0.suppression.remove(key)?;
        // A list key (an address, or an address and a tenant).
        self.0.enqueue(&Op::Lift {
            addr: key_text(key),
        })?;
        Ok(had)
    }

    fn all(&self) -> StateResult<Vec<Entry>> {
        self.0.suppression.all()
    }

    fn count_bounce(&self, addr: &str) -> StateResult<u32> {
        let n = self.0.suppression.count_bounce(addr)?;
        self.0.enqueue(&Op::Bounce {
            addr: key_text(addr),
        })?;
        Ok(n)
    }

    fn reset_bounces(&self, addr: &str) -> StateResult<()> {
        if self.0.suppression.bounces(addr)? == 0 {
            return Ok(());
        }
        self.0.suppression.reset_bounces(addr)?;
        self.0.enqueue(&Op::Reset {
            addr: key_text(addr),
        })
    }
}

/// Every node's events: this node's own are written here and sent to the
/// others; theirs arrive by the stream.
pub struct SharedEvents(pub Arc<Cluster>);

impl EventStore for SharedEvents {
    fn append(&self, key: [u8; 16], ev: &Event, json: &[u8]) -> StateResult<()> {
        self.0.events.append(key, ev, json)?;
        self.0.enqueue(&Op::Event {
            key: crate::state::history::hex(&key),
            json: String::new(),
        })
    }

    fn by(
        &self,
        by: By,
        since_ms: u64,
        keep: &mut dyn FnMut(&Event) -> bool,
    ) -> StateResult<Vec<Event>> {
        self.0.events.by(by, since_ms, keep)
    }

    fn since(
        &self,
        since_ms: u64,
        keep: &mut dyn FnMut(&Event) -> bool,
    ) -> StateResult<Vec<Event>> {
        self.0.events.since(since_ms, keep)
    }

    fn purge_before(&self, before_ms: u64) -> StateResult<usize> {
        self.0.events.purge_before(before_ms)
    }
}

/// The pause flags of the cluster: `herald pause` on any node holds every
/// node. With `on_redis_down = "hold"`, a degraded node holds delivery.
pub struct SharedPauses(pub Arc<Cluster>);

impl PauseFlags for SharedPauses {
    fn delivery_paused(&self) -> bool {
        self.0.pauses.delivery_paused() || (self.0.hold_when_down && self.0.degraded().is_some())
    }

    fn set_delivery_paused(&self, paused: bool) -> StateResult<()> {
        self.0.pauses.set_delivery_paused(paused)?;
        self.0.enqueue(&Op::Pause { on: paused })
    }

    fn route_paused(&self, route: &str) -> bool {
        self.0.pauses.route_paused(route)
    }

    fn paused_routes(&self) -> Vec<String> {
        self.0.pauses.paused_routes()
    }

    fn set_route_paused(&self, route: &str, paused: bool) -> StateResult<Vec<String>> {
        let now = self.0.pauses.set_route_paused(route, paused)?;
        self.0.enqueue(&Op::Route {
            route: route.to_string(),
            on: paused,
        })?;
        Ok(now)
    }
}

/// The paused routes as a set (the mirror's).
pub(crate) fn route_set(p: &LocalPauses) -> BTreeSet<String> {
    p.paused_routes().into_iter().collect()
}
