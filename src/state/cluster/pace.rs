//! Destination pacing held across every node of the cluster.
//!
//! - `max_rate` / `mx_max_rate` (with `max_burst`): GCRA in a Lua script
//!   that reads Redis's own `TIME`, so node clocks do not matter. The key
//!   `PREFIX pace:tat:DEST` holds the theoretical arrival time.
//! - `max_connections` / `mx_max_connections`: leases in the sorted set
//!   `PREFIX pace:leases:DEST` (member: lease id, score: expiry by Redis's
//!   clock), taken by a script that first drops the expired ones, renewed
//!   every few seconds while this node holds them. A node that dies stops
//!   counting when its leases expire ([`LEASE_TTL_MS`]). A lease this node
//!   no longer uses is kept idle for a moment for its next message, then
//!   given back.
//! - Back-off after `throttle` replies: a change on the stream (like a
//!   suppression), so every node waits as long as the one that was told.
//!
//! The scheduler asks without waiting ([`PaceStore::take_token`] and
//! [`PaceStore::try_lease`] are synchronous): a question to Redis is sent
//! in the background and the scheduler looks again a moment later. When
//! Redis does not answer, each limit falls back to this node's share of it
//! (the limit divided by the nodes last seen, at least one): a failed call
//! may only make herald send less, never more.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Cluster, Op, Part};
use crate::config::Rate;
use crate::state::pacing::{Lease, LocalPace, PaceStore};
use crate::state::spool::now_ms;

/// A lease not renewed expires this long after it was taken or renewed.
pub const LEASE_TTL_MS: u64 = 10_000;
/// Renewal period of held leases.
const RENEW: Duration = Duration::from_secs(3);
/// An idle lease is given back after this.
const IDLE_MS: u64 = 1_000;
/// How soon the scheduler looks again while Redis is being asked.
const ASKING_MS: u64 = 3;
/// How soon it looks again when every lease is held (by other nodes too).
const FULL_MS: u64 = 50;

const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return math.ceil(allow_at - now)
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return 0
"#;

const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
"#;

const RENEW_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 0
"#;

/// What this node knows of one destination's shared pace.
#[derive(Default)]
struct Dest {
    /// Tokens Redis granted, not spent yet.
    tokens: u32,
    /// Redis said: no token before this (ms, this node's clock).
    next_ms: u64,
    asking_token: bool,
    /// Leases held from Redis and not in use, with when they went idle.
    idle: Vec<(String, u64)>,
    /// Leases in use here.
    in_use: Vec<String>,
    asking_lease: bool,
    /// Redis said every lease is held a moment ago: not before this.
    lease_next_ms: u64,
}

/// The pace of the cluster's destinations.
pub struct RedisPace {
    c: Arc<Cluster>,
    /// Fallback while Redis does not answer (this node's share), and the
    /// mirror of back-offs.
    local: Arc<LocalPace>,
    dests: Arc<Mutex<HashMap<String, Dest>>>,
    gcra: redis::Script,
    acquire: redis::Script,
    renew: redis::Script,
    rt: tokio::runtime::Handle,
    lease_seq: std::sync::atomic::AtomicU64,
}

impl RedisPace {
    pub fn new(c: Arc<Cluster>) -> Arc<RedisPace> {
        let local = c.pace.clone();
        let me = Arc::new(RedisPace {
            c,
            local,
            dests: Arc::default(),
            gcra: redis::Script::new(GCRA),
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW_LUA),
            rt: tokio::runtime::Handle::current(),
            lease_seq: std::sync::atomic::AtomicU64::new(0),
        });
        let _ = me.c.shared_pace.set(me.clone());
        me
    }

    /// Redis is away (for pacing): each limit is this node's share.
    fn fallback(&self) -> bool {
        self.c.degraded().is_some()
    }

    fn share(&self, n: u32) -> u32 {
        (n / self.c.alive() as u32).max(1)
    }

    fn with<T>(&self, key: &str, f: impl FnOnce(&mut Dest) -> T) -> T {
        let mut m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(key.to_string()).or_default())
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        s: &redis::Script,
        key: &str,
        args: &[String],
    ) -> Option<T> {
        let mut con = self.c.connection(Part::Pace).await?;
        let mut inv = s.key(key);
        for a in args {
            inv.arg(a);
        }
        let r = tokio::time::timeout(self.c.timeout, inv.invoke_async::<T>(&mut con)).await;
        self.c.judge(Part::Pace, r)
    }

    /// Renews held leases and gives back idle ones, until shutdown.
    pub async fn keep_leases(self: Arc<Self>, mut shutdown: crate::shutdown::Shutdown) {
        let mut last_renew = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.wait() => {}
            }
            let stop = shutdown.is_set();
            // Limits fall back to this node's share while Redis is away;
            // nothing asks Redis then, so ask whether it is back.
            self.c.probe(Part::Pace).await;
            let now = now_ms();
            let (give_back, renew) = {
                let mut m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
                let mut give = Vec::new();
                let mut renew = Vec::new();
                for (k, d) in m.iter_mut() {
                    let (old, keep): (Vec<_>, Vec<_>) = d
                        .idle
                        .drain(..)
                        .partition(|(_, at)| stop || now.saturating_sub(*at) >= IDLE_MS);
                    d.idle = keep;
                    for (id, _) in old {
                        give.push((k.clone(), id));
                    }
                    let held: Vec<String> = d
                        .in_use
                        .iter()
                        .cloned()
                        .chain(d.idle.iter().map(|(i, _)| i.clone()))
                        .collect();
                    if !held.is_empty() {
                        renew.push((k.clone(), held));
                    }
                }
                (give, renew)
            };
            if !give_back.is_empty() {
                let mut p = redis::pipe();
                for (k, id) in &give_back {
                    p.zrem(self.c.key(&format!("pace:leases:{k}")), id).ignore();
                }
                let _: Option<()> = self.c.pipe(Part::Pace, &p).await;
            }
            if last_renew.elapsed() >= RENEW && !stop {
                last_renew = std::time::Instant::now();
                for (k, ids) in renew {
                    let mut args = vec![LEASE_TTL_MS.to_string()];
                    args.extend(ids);
                    let key = self.c.key(&format!("pace:leases:{k}"));
                    let _: Option<i64> = self.script(&self.renew, &key, &args).await;
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Asks Redis for a token of `rate` in the background. When Redis says
    /// "not before W ms", asks again at that moment (a few times): the
    /// token is here when the scheduler looks again, not a round trip
    /// later (with a burst of one, a token asked late is lost).
    fn ask_token(self: &Arc<Self>, key: &str, rate: Rate) {
        let me = self.clone();
        let key = key.to_string();
        self.rt.spawn(async move {
            let interval = rate.per.as_millis() as f64 / rate.count.max(1) as f64;
            let rkey = me.c.key(&format!("pace:tat:{key}"));
            for _ in 0..4 {
                let wait: Option<i64> = me
                    .script(
                        &me.gcra,
                        &rkey,
                        &[format!("{interval}"), rate.burst.to_string()],
                    )
                    .await;
                let again = me.with(&key, |d| match wait {
                    Some(0) => {
                        d.tokens += 1;
                        None
                    }
                    Some(w) => {
                        d.next_ms = now_ms() + w.max(1) as u64;
                        Some(w.max(1) as u64)
                    }
                    None => None,
                });
                match again {
                    // Not worth a task for long waits: the scheduler asks.
                    Some(w) if w <= 5_000 => tokio::time::sleep(Duration::from_millis(w)).await,
                    _ => break,
                }
            }
            me.with(&key, |d| d.asking_token = false);
        });
    }

    /// Asks Redis for a lease of `key` in the background.
    fn ask_lease(self: &Arc<Self>, key: &str, max: usize) {
        let me = self.clone();
        let key = key.to_string();
        let id = format!(
            "{}:{}",
            self.c.node,
            self.lease_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.rt.spawn(async move {
            let rkey = me.c.key(&format!("pace:leases:{key}"));
            let got: Option<i64> = me
                .script(
                    &me.acquire,
                    &rkey,
                    &[max.to_string(), id.clone(), LEASE_TTL_MS.to_string()],
                )
                .await;
            me.with(&key, |d| {
                d.asking_lease = false;
                match got {
                    Some(1) => d.idle.push((id, now_ms())),
                    Some(_) => d.lease_next_ms = now_ms() + FULL_MS,
                    None => {}
                }
            });
        });
    }
}

/// A lease of the cluster: back to this node's idle leases when dropped.
struct Shared {
    dests: Arc<Mutex<HashMap<String, Dest>>>,
    key: String,
    id: String,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let mut m = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = m.get_mut(&self.key) {
            d.in_use.retain(|i| *i != self.id);
            d.idle.push((std::mem::take(&mut self.id), now_ms()));
        }
    }
}

/// [`RedisPace`] as the [`PaceStore`] (the background questions need an
/// `Arc` of it).
pub struct SharedPace(pub Arc<RedisPace>);

impl PaceStore for SharedPace {
    fn take_token(&self, key: &str, rate: Rate) -> Result<(), u64> {
        let p = &self.0;
        if p.fallback() {
            let share = Rate {
                count: p.share(rate.count),
                burst: p.share(rate.burst),
                per: rate.per,
            };
            return p.local.take_token(key, share);
        }
        let now = now_ms();
        let ask = p.with(key, |d| {
            if d.tokens > 0 {
                d.tokens -= 1;
                return Ok(false);
            }
            if d.next_ms > now {
                return Err(d.next_ms - now);
            }
            if d.asking_token {
                return Err(ASKING_MS);
            }
            d.asking_token = true;
            Ok(true)
        });
        match ask {
            Ok(false) => Ok(()),
            Ok(true) => {
                p.ask_token(key, rate);
                Err(ASKING_MS)
            }
            Err(w) => Err(w),
        }
    }

    fn try_lease(&self, key: &str, max: usize) -> Result<Lease, Option<u64>> {
        let p = &self.0;
        if p.fallback() {
            let share = (max / p.c.alive()).max(1);
            return p.local.try_lease(key, share);
        }
        let now = now_ms();
        let got = p.with(key, |d| {
            if d.in_use.len() >= max {
                return Err(None);
            }
            if let Some((id, _)) = d.idle.pop() {
                d.in_use.push(id.clone());
                return Ok(Some(id));
            }
            if d.asking_lease {
                return Err(Some(now + ASKING_MS));
            }
            if d.lease_next_ms > now {
                return Err(Some(d.lease_next_ms));
            }
            d.asking_lease = true;
            Ok(None)
        });
        match got {
            Ok(Some(id)) => Ok(Lease(Box::new(Shared {
                dests: p.dests.clone(),
                key: key.to_string(),
                id,
            }))),
            Ok(None) => {
                p.ask_lease(key, max);
                Err(Some(now + ASKING_MS))
            }
            Err(e) => Err(e),
        }
    }

    fn lease<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> Pin<Box<dyn Future<Output = Lease> + Send + 'a>> {
        Box::pin(async move {
            loop {
                match self.try_lease(key, max) {
                    Ok(l) => return l,
                    Err(Some(t)) => {
                        let ms = t.saturating_sub(now_ms()).max(1);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(None) => tokio::time::sleep(Duration::from_millis(FULL_MS)).await,
                }
            }
        })
    }

    fn leases(&self, key: &str) -> usize {
        if self.0.fallback() {
            return self.0.local.leases(key);
        }
        self.0.with(key, |d| d.in_use.len())
    }

    fn resize(&self, key: &str, max: usize) {
        self.0.local.resize(key, max);
    }

    fn throttle(&self, key: &str, reply: &str, base: Duration, max: Duration) -> (u64, bool) {
        let (until, started) = self.0.local.throttle(key, reply, base, max);
        if started {
            let op = Op::Backoff {
                dest: key.to_string(),
                until_ms: until,
                level: self.0.local.backoff_level(key),
                reply: Some(reply.to_string()),
            };
            if let Err(e) = self.0.c.enqueue(&op) {
                tracing::error!(error = %e, "cannot share a back-off with the cluster");
            }
        }
        (until, started)
    }

    fn success(&self, key: &str) -> bool {
        let was = self.0.local.success(key);
        if was {
            if let Err(e) = self.0.c.enqueue(&Op::Clear {
                dest: key.to_string(),
            }) {
                tracing::error!(error = %e, "cannot share the end of a back-off with the cluster");
            }
        }
        was
    }

    fn backoff(&self, key: &str) -> (u64, Option<String>) {
        self.0.local.backoff(key)
    }
}
