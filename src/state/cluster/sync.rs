//! The cluster's three tasks: [`push`] sends the outbox to Redis, [`read`]
//! applies the other nodes' changes to this node's mirror, [`heartbeat`]
//! says this node is alive and learns the others.
//!
//! Redis keys (after `[cluster] key_prefix`):
//! - `log`: a stream, one entry per change (fields `n`: node, `o`: the
//!   change as JSON), trimmed to `history_retention`;
//! - `suppression` (hash: address -> entry), `bounces` (hash: address ->
//!   hard bounces counted), `paused` (string), `paused_routes` (set): the
//!   shared state, from which a node that joins (or finds the stream
//!   trimmed past its place) takes its mirror;
//! - `epoch`: made by the first node; a Redis that lost its data (a
//!   restart without persistence) has a new one, and every node then puts
//!   its mirror's suppressions and pauses back before reading again;
//! - `nodes` (hash: node -> heartbeat); `pace:*` (see `pace.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redis::streams::{StreamRangeReply, StreamReadReply};
use redis::Value;

use super::{Cluster, NodeSeen, Op, Part, META_EPOCH, META_LOG_ID};
use crate::state::history::{key_of_event_id, Event, EventKind, EventStore};
use crate::state::ports::PauseFlags;
use crate::state::spool::now_ms;
use crate::state::suppression::{Entry, SuppressionStore};
use crate::state::Services;

/// Changes sent per pipeline.
const BATCH: usize = 256;
/// How long the sender lets changes gather while they keep coming.
const GATHER: Duration = Duration::from_millis(20);
/// How long the reader lets entries gather after a read that found few.
const READ_GATHER: Duration = Duration::from_millis(50);
/// How long one read of the stream blocks.
const BLOCK: Duration = Duration::from_millis(1000);

/// Sends the outbox to Redis, oldest first, until shutdown (and once more
/// then, if Redis answers).
pub async fn push(s: Arc<Services>, c: Arc<Cluster>) {
    let mut shutdown = s.shutdown.clone();
    loop {
        let sent = push_batch(&s, &c).await;
        if shutdown.is_set() && sent.is_none_or(|n| n == 0) {
            return;
        }
        match sent {
            Some(n) if n == BATCH => continue,
            Some(n) => {
                tokio::select! {
                    _ = c.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.wait() => {}
                }
                // Under load, let changes gather for a few ms: one pipeline
                // of many costs Redis and herald far less than many of one.
                if n > 0 {
                    tokio::time::sleep(GATHER).await;
                }
            }
            None => tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait() => {}
            },
        }
    }
}

/// One batch; how many changes went (None: Redis failed).
async fn push_batch(s: &Services, c: &Cluster) -> Option<usize> {
    let batch: Vec<(sled::IVec, sled::IVec)> =
        c.outbox.iter().take(BATCH).filter_map(|i| i.ok()).collect();
    if batch.is_empty() {
        c.probe(Part::Push).await;
        return Some(0);
    }
    let retention = s.cfg().storage.history_retention.as_millis() as u64;
    let minid = format!("{}-0", now_ms().saturating_sub(retention));
    let mut p = redis::pipe();
    for (_, v) in &batch {
        let Ok(op) = serde_json::from_slice::<Op>(v) else {
            continue;
        };
        state_write(c, &mut p, &op);
        // An event's JSON, from the history (purged already: nothing to send).
        let event = match &op {
            Op::Event { key, .. } => match key_of_event_id(key).map(|k| c.events.raw(&k)) {
                Some(Ok(Some(j))) => Some(j),
                _ => continue,
            },
            _ => None,
        };
        let xadd = p.cmd("XADD");
        xadd.arg(c.key("log"))
            .arg("MINID")
            .arg("~")
            .arg(&minid)
            .arg("*")
            .arg("n")
            .arg(&c.node)
            .arg("k")
            .arg(u8::from(op.own_only()))
            .arg("o")
            .arg(v.as_ref());
        if let Some(j) = &event {
            xadd.arg("e").arg(j.as_ref());
        }
        xadd.ignore();
    }
    c.pipe::<()>(Part::Push, &p).await?;
    let mut done = sled::Batch::default();
    for (k, _) in &batch {
        done.remove(k);
    }
    if let Err(e) = c.outbox.apply_batch(done) {
        tracing::error!(error = %e, "cannot clear the cluster outbox");
    }
    Some(batch.len())
}

/// The shared state a change makes in Redis (besides its stream entry).
fn state_write(c: &Cluster, p: &mut redis::Pipeline, op: &Op) {
    match op {
        Op::Suppress { entry } => {
            if let Ok(j) = serde_json::to_string(entry) {
                p.hset(c.key("suppression"), entry.list_key(), j).ignore();
            }
        }
        Op::Lift { addr } => {
            p.hdel(c.key("suppression"), addr).ignore();
            p.hdel(c.key("bounces"), addr).ignore();
        }
        Op::Bounce { addr } => {
            p.hincr(c.key("bounces"), addr, 1).ignore();
        }
        Op::Reset { addr } => {
            p.hdel(c.key("bounces"), addr).ignore();
        }
        Op::Pause { on: true } => {
            p.set(c.key("paused"), 1).ignore();
        }
        Op::Pause { on: false } => {
            p.del(c.key("paused")).ignore();
        }
        Op::Route { route, on: true } => {
            p.sadd(c.key("paused_routes"), route).ignore();
        }
        Op::Route { route, on: false } => {
            p.srem(c.key("paused_routes"), route).ignore();
        }
        Op::Event { .. } | Op::Sent { .. } | Op::Backoff { .. } | Op::Clear { .. } => {}
    }
}

/// Where the mirror stands in the stream.
struct Place {
    /// The last entry applied.
    last: String,
    /// Changes of shared state up to this entry are in the snapshot the
    /// mirror took; only later ones apply.
    snapshot_at: Option<String>,
}

/// Reads the stream and applies the other nodes' changes, until shutdown.
pub async fn read(s: Arc<Services>, c: Arc<Cluster>) {
    let mut shutdown = s.shutdown.clone();
    let mut place: Option<Place> = None;
    let mut conn = None;
    loop {
        if shutdown.is_set() {
            return;
        }
        if conn.is_none() {
            conn = c.reading_connection(BLOCK).await;
        }
        let ok = match (&mut conn, &mut place) {
            (None, _) => false,
            (Some(_), None) => match join(&c).await {
                Some(p) => {
                    place = Some(p);
                    // The snapshot may have lifted a pause.
                    s.scheduler.wake();
                    true
                }
                None => false,
            },
            (Some(k), Some(p)) => read_some(&s, &c, k, p).await,
        };
        if !ok {
            conn = None;
            // Take the stream again from the epoch check: Redis may have
            // come back empty.
            place = None;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// Reads what the stream holds after `p` (waiting up to [`BLOCK`]) and
/// applies it; false when Redis failed.
async fn read_some(
    s: &Services,
    c: &Cluster,
    k: &mut redis::aio::MultiplexedConnection,
    p: &mut Place,
) -> bool {
    let r: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(500)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(c.key("log"))
        .arg(&p.last)
        .query_async(k)
        .await;
    let reply = match r {
        Ok(r) => {
            c.ok(Part::Read);
            r
        }
        Err(e) => {
            c.failed(Part::Read, &format!("Redis: {e}"));
            return false;
        }
    };
    let Some(reply) = reply else {
        return true;
    };
    let mut wake = false;
    let found: usize = reply.keys.iter().map(|k| k.ids.len()).sum();
    for key in reply.keys {
        for entry in key.ids {
            wake |= apply_entry(s, c, &entry.id, &entry.map, p.snapshot_at.as_deref());
            p.last = entry.id;
        }
    }
    if wake {
        // A pause lifted, a back-off ended: mail may go now.
        s.scheduler.wake();
    }
    if let Err(e) = c.store.meta_set(META_LOG_ID, Some(p.last.as_bytes())) {
        tracing::error!(error = %e, "cannot note the cluster stream's place");
    }
    if found < 100 {
        // A trickle: read again in a moment, with more in one reply.
        tokio::time::sleep(READ_GATHER).await;
    }
    true
}

/// "1700000000000-3" as a comparable pair.
fn stream_id(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

fn text(v: &Value) -> Option<String> {
    redis::from_redis_value_ref::<String>(v).ok()
}

/// Applies one stream entry to the mirror; true when the scheduler should
/// look at its queue again (a pause or back-off changed).
fn apply_entry(
    s: &Services,
    c: &Cluster,
    id: &str,
    map: &HashMap<String, Value>,
    snapshot_at: Option<&str>,
) -> bool {
    let Some(node) = map.get("n").and_then(text) else {
        return false;
    };
    let mine = node == c.node;
    // What this node wrote and applied already (its events: the most of
    // the stream), marked by the sender (`Op::own_only`): skipped unread.
    if mine && map.get("k").and_then(text).as_deref() == Some("1") {
        return false;
    }
    let Some(op) = map.get("o").and_then(text) else {
        return false;
    };
    let Ok(op) = serde_json::from_str::<Op>(&op) else {
        tracing::warn!(entry = %id, "a cluster change this version cannot read: skipped");
        return false;
    };
    let in_snapshot = snapshot_at.is_some_and(|at| stream_id(id) <= stream_id(at));
    let wake = !mine
        && matches!(
            op,
            Op::Pause { .. } | Op::Route { .. } | Op::Clear { .. } | Op::Lift { .. }
        );
    if let Op::Pause { on } = op {
        if !mine && !in_snapshot {
            tracing::warn!(node = %node, paused = on, "outbound delivery {} by another node", if on { "paused" } else { "resumed" });
        }
    }
    let r = match op {
        Op::Backoff {
            dest,
            until_ms,
            level,
            reply,
        } => {
            c.pace.adopt_backoff(&dest, until_ms, level, reply);
            Ok(())
        }
        Op::Clear { dest } => {
            c.pace.clear_backoff(&dest);
            Ok(())
        }
        Op::Event { key, json } => {
            let json = map.get("e").and_then(text).unwrap_or(json);
            apply_event(s, c, &key, &json)
        }
        Op::Sent { id, json } => c
            .sent
            .compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(json.as_bytes()))
            .map(|_| ())
            .map_err(Into::into),
        _ if in_snapshot => Ok(()),
        Op::Suppress { entry } => c.suppression.put(&entry),
        Op::Lift { addr } => c.suppression.remove(&addr).map(|_| ()),
        Op::Bounce { addr } => c.suppression.count_bounce(&addr).map(|_| ()),
        Op::Reset { addr } => c.suppression.reset_bounces(&addr),
        Op::Pause { on } => c.pauses.set_delivery_paused(on),
        Op::Route { route, on } => c.pauses.set_route_paused(&route, on).map(|_| ()),
    };
    if let Err(e) = r {
        tracing::error!(entry = %id, error = %e, "cannot apply a change of the cluster to this node");
    }
    wake
}

/// Another node's event: into the mirror's history. A bounce reported
/// there for a message this node still holds makes the recipient final
/// here too (no second event).
fn apply_event(
    s: &Services,
    c: &Cluster,
    key: &str,
    json: &str,
) -> Result<(), crate::state::spool::QueueError> {
    let (Some(k), Ok(ev)) = (key_of_event_id(key), serde_json::from_str::<Event>(json)) else {
        return Ok(());
    };
    c.events.append(k, &ev, json.as_bytes())?;
    let Some(report) = &ev.report else {
        return Ok(());
    };
    if !matches!(
        ev.event,
        EventKind::Bounced | EventKind::Delayed | EventKind::Complained
    ) {
        return Ok(());
    }
    // The same report sent again to this node (a sender retrying another
    // MX) is a duplicate here too.
    if let Some(b) = &s.bounces {
        let _ = b.first_of(&ev.id, &ev.rcpt, ev.event.as_str(), report);
    }
    if ev.event == EventKind::Bounced {
        s.ledger().bounced_elsewhere(&ev);
    }
    Ok(())
}

/// Joins the stream: checks the epoch, puts this node's mirror back into
/// a Redis that lost it, takes a snapshot when the mirror's place is
/// gone. None when Redis failed.
async fn join(c: &Cluster) -> Option<Place> {
    let fresh = format!("{:016x}", rand_u64());
    let (epoch,): (String,) = c
        .pipe(
            Part::Read,
            redis::pipe()
                .cmd("SET")
                .arg(c.key("epoch"))
                .arg(&fresh)
                .arg("NX")
                .ignore()
                .get(c.key("epoch")),
        )
        .await?;
    let mine = c
        .store
        .meta_get(META_EPOCH)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let last = c
        .store
        .meta_get(META_LOG_ID)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let first: StreamRangeReply = c
        .cmd(
            Part::Read,
            redis::cmd("XRANGE")
                .arg(c.key("log"))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    let first = first.ids.first().map(|e| e.id.clone());
    if mine.as_deref() == Some(epoch.as_str()) {
        if let Some(last) = last {
            // Still in the stream (or the stream is empty: nothing lost).
            if first
                .as_deref()
                .is_none_or(|f| stream_id(f) <= next_id(&last))
            {
                return Some(Place {
                    last,
                    snapshot_at: None,
                });
            }
        }
    } else {
        seed(c).await?;
    }
    let at = snapshot(c).await?;
    c.store.meta_set(META_EPOCH, Some(epoch.as_bytes())).ok()?;
    tracing::info!(node = %c.node, "joined the cluster: mirror taken from Redis");
    Some(Place {
        last: "0-0".into(),
        snapshot_at: Some(at),
    })
}

/// The id right after `id`.
fn next_id(id: &str) -> (u64, u64) {
    let (a, b) = stream_id(id);
    (a, b + 1)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

/// Puts this node's suppressions (never over a newer entry) and pauses
/// into Redis: a node that joins brings what it knew, and a Redis that
/// lost its data gets it back from the nodes.
async fn seed(c: &Cluster) -> Option<()> {
    let mut p = redis::pipe();
    for e in c.suppression.all().ok()? {
        if let Ok(j) = serde_json::to_string(&e) {
            p.hset_nx(c.key("suppression"), e.list_key(), j).ignore();
        }
    }
    if c.pauses.delivery_paused() {
        p.set(c.key("paused"), 1).ignore();
    }
    for r in super::route_set(&c.pauses) {
        p.sadd(c.key("paused_routes"), r).ignore();
    }
    if p.is_empty() {
        return Some(());
    }
    c.pipe::<()>(Part::Read, &p).await
}

/// Replaces the mirror's shared state with Redis's; the stream id it was
/// taken at.
async fn snapshot(c: &Cluster) -> Option<String> {
    type Snap = (
        StreamRangeReply,
        HashMap<String, String>,
        HashMap<String, u32>,
        Option<String>,
        HashSet<String>,
    );
    let (last, entries, counts, paused, routes): Snap = c
        .pipe(
            Part::Read,
            redis::pipe()
                .cmd("XREVRANGE")
                .arg(c.key("log"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .hgetall(c.key("suppression"))
                .hgetall(c.key("bounces"))
                .get(c.key("paused"))
                .smembers(c.key("paused_routes")),
        )
        .await?;
    let at = last
        .ids
        .first()
        .map(|e| e.id.clone())
        .unwrap_or_else(|| "0-0".into());
    let sup = &c.suppression;
    let apply = || -> Result<(), crate::state::spool::QueueError> {
        for e in sup.all()? {
            if !entries.contains_key(&e.list_key()) {
                sup.remove(&e.list_key())?;
            }
        }
        for v in entries.values() {
            if let Ok(e) = serde_json::from_str::<Entry>(v) {
                sup.put(&e)?;
            }
        }
        for a in sup.counted()? {
            if !counts.contains_key(&a) {
                sup.set_bounces(&a, 0)?;
            }
        }
        for (a, n) in &counts {
            sup.set_bounces(a, *n)?;
        }
        c.pauses.set_delivery_paused(paused.is_some())?;
        for r in super::route_set(&c.pauses) {
            if !routes.contains(&r) {
                c.pauses.set_route_paused(&r, false)?;
            }
        }
        for r in &routes {
            c.pauses.set_route_paused(r, true)?;
        }
        Ok(())
    };
    if let Err(e) = apply() {
        tracing::error!(error = %e, "cannot take the cluster's state into this node's mirror");
        return None;
    }
    Some(at)
}

/// Every 2 s: this node's heartbeat in, every node's out.
pub async fn heartbeat(s: Arc<Services>, c: Arc<Cluster>) {
    let mut shutdown = s.shutdown.clone();
    let started_ms = now_ms();
    let mut was_degraded = false;
    loop {
        // With on_redis_down = "hold", the end of an outage frees delivery.
        let degraded = c.degraded().is_some();
        if degraded != was_degraded {
            was_degraded = degraded;
            s.scheduler.wake();
        }
        let (messages, _, deferred) = s.store.stats.get();
        let me = NodeSeen {
            node: c.node.clone(),
            seen_ms: now_ms(),
            messages,
            deferred,
            degraded: c.degraded().is_some(),
            started_ms,
        };
        let mut p = redis::pipe();
        if let Ok(j) = serde_json::to_string(&me) {
            p.hset(c.key("nodes"), &c.node, j).ignore();
        }
        p.hgetall(c.key("nodes"));
        let seen: Option<(HashMap<String, String>,)> = c.pipe(Part::Heartbeat, &p).await;
        let from_redis = seen.is_some();
        let mut nodes: Vec<NodeSeen> = match seen {
            Some((all,)) => all
                .values()
                .filter_map(|v| serde_json::from_str(v).ok())
                .collect(),
            // Redis away: the others as last seen, this one as it is.
            None => c.nodes().into_iter().filter(|n| n.node != c.node).collect(),
        };
        nodes.retain(|n| n.node != c.node);
        nodes.push(me);
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        c.seen(nodes, from_redis);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.wait() => {
                // Gone: the others stop counting this node at once.
                let _: Option<()> = c.cmd(Part::Heartbeat, redis::cmd("HDEL").arg(c.key("nodes")).arg(&c.node)).await;
                return;
            }
        }
    }
}
