//! Traffic shaping: how fast and how wide herald sends to each destination.
//!
//! A destination is a configured upstream (by name) or, in direct MX
//! delivery, a site: the set of MX hosts of a domain, so that domains served
//! by the same provider share one limit. Each destination has a number of
//! session slots (`max_connections` / `mx_max_connections`), a token bucket
//! (`max_rate` / `mx_max_rate`) and a back-off: a `throttle` reply (or a
//! smart host refusing connections) stops new sessions for a while, 1 min
//! doubling to 30 min by default, until a success resets it.
//!
//! Waiting for a slot, a token or the end of a back-off is not an attempt:
//! nothing is recorded and no retry counter is spent. A reload changes a
//! destination's limits in place; its back-off and its sessions go on.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, Rate};
use crate::limit::Limit;
use crate::state::spool::now_ms;

/// A token bucket of `rate.burst` tokens refilled at `count` per `per`:
/// after an idle period up to `burst` messages may go at once.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: Rate,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: Rate) -> Bucket {
        Bucket {
            rate,
            tokens: rate.burst as f64,
            at: Instant::now(),
        }
    }

    fn per_ms(&self) -> f64 {
        self.rate.count as f64 / self.rate.per.as_millis().max(1) as f64
    }

    pub(crate) fn refill(&mut self, now: Instant) {
        let ms = now.saturating_duration_since(self.at).as_secs_f64() * 1000.0;
        self.tokens = (self.tokens + ms * self.per_ms()).min(self.rate.burst as f64);
        self.at = now;
    }

    /// Milliseconds until a token is there (0: one is there now).
    pub(crate) fn wait_ms(&mut self, now: Instant) -> u64 {
        self.refill(now);
        if self.tokens >= 1.0 {
            0
        } else {
            ((1.0 - self.tokens) / self.per_ms()).ceil() as u64
        }
    }

    /// Full again: an idle client's bucket can be forgotten.
    pub(crate) fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate.burst as f64
    }

    pub(crate) fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

/// Back-off state of a destination.
#[derive(Debug, Default, Clone)]
struct Backoff {
    /// Throttles in a row since the last success.
    level: u32,
    /// No new sessions before this (ms since the epoch).
    until_ms: u64,
    last_reply: Option<String>,
}

/// A destination's pace as several nodes would share it: its token bucket
/// (`max_rate`), its session leases (`max_connections`) and its back-off
/// after `throttle` replies. [`LocalPace`] keeps them in this process; the
/// clustering issue puts them where every node sees them. A store that
/// cannot answer may only make herald send less, never more.
pub trait PaceStore: Send + Sync {
    /// Takes a token of `rate` for `key`, or says in how many ms one is
    /// there. A new rate starts with a full bucket.
    fn take_token(&self, key: &str, rate: Rate) -> Result<(), u64>;
    /// A session lease, while fewer than `max` are held for `key`; else
    /// `Err(None)`: all are in use here, look again when an attempt ends;
    /// `Err(Some(ms))`: look again at that time (the leases are shared).
    fn try_lease(&self, key: &str, max: usize) -> Result<Lease, Option<u64>>;
    /// Waits for a lease.
    fn lease<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> Pin<Box<dyn Future<Output = Lease> + Send + 'a>>;
    /// Leases held for `key` now.
    fn leases(&self, key: &str) -> usize;
    /// `max_connections` of `key` changed (a reload): sessions waiting
    /// for a lease may get one now.
    fn resize(&self, key: &str, max: usize);
    /// The destination asked to slow down: no new sessions until the
    /// returned time (ms). A throttle reported while a back-off already
    /// runs does not lengthen it. True when this starts a back-off.
    fn throttle(&self, key: &str, reply: &str, base: Duration, max: Duration) -> (u64, bool);
    /// A success: the back-off starts again from its first value; true
    /// when one was reset.
    fn success(&self, key: &str) -> bool;
    /// The end of the back-off (ms, 0: none yet) and the last throttle reply.
    fn backoff(&self, key: &str) -> (u64, Option<String>);
}

/// A session lease of a destination, given back on drop.
pub struct Lease(#[allow(dead_code)] pub(crate) Box<dyn Send + Sync>);

/// The pace of this process's destinations, in memory.
#[derive(Default)]
pub struct LocalPace {
    buckets: Mutex<HashMap<String, Bucket>>,
    slots: Mutex<HashMap<String, Limit>>,
    backoffs: Mutex<HashMap<String, Backoff>>,
}

impl LocalPace {
    /// The slots of `key`, at `max` (a reload may have changed it).
    fn slots(&self, key: &str, max: usize) -> Limit {
        let mut m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let l = m
            .entry(key.to_string())
            .or_insert_with(|| Limit::new(max))
            .clone();
        if l.size() != max {
            l.resize(max);
        }
        l
    }
}

impl PaceStore for LocalPace {
    fn take_token(&self, key: &str, rate: Rate) -> Result<(), u64> {
        let mut m = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = m
            .entry(key.to_string())
            .or_insert_with(|| Bucket::new(rate));
        if b.rate != rate {
            *b = Bucket::new(rate);
        }
        match b.wait_ms(Instant::now()) {
            0 => {
                b.take();
                Ok(())
            }
            w => Err(w),
        }
    }

    fn try_lease(&self, key: &str, max: usize) -> Result<Lease, Option<u64>> {
        let p = self.slots(key, max).try_acquire().ok_or(None)?;
        Ok(Lease(Box::new(p)))
    }

    fn lease<'a>(
        &'a self,
        key: &'a str,
        max: usize,
    ) -> Pin<Box<dyn Future<Output = Lease> + Send + 'a>> {
        let slots = self.slots(key, max);
        Box::pin(async move { Lease(Box::new(slots.acquire().await)) })
    }

    fn leases(&self, key: &str) -> usize {
        let m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key).map_or(0, |l| l.in_use())
    }

    fn resize(&self, key: &str, max: usize) {
        let m = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = m.get(key).filter(|l| l.size() != max) {
            l.resize(max);
        }
    }

    fn throttle(&self, key: &str, reply: &str, base: Duration, max: Duration) -> (u64, bool) {
        let now = now_ms();
        let mut m = self.backoffs.lock().unwrap_or_else(|e| e.into_inner());
        let b = m.entry(key.to_string()).or_default();
        b.last_reply = Some(reply.to_string());
        if b.until_ms > now {
            return (b.until_ms, false);
        }
        let wait = base
            .checked_mul(1u32 << b.level.min(20))
            .unwrap_or(max)
            .min(max);
        b.level = b.level.saturating_add(1);
        b.until_ms = now + wait.as_millis() as u64;
        (b.until_ms, true)
    }

    fn success(&self, key: &str) -> bool {
        let mut m = self.backoffs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = m.get_mut(key) else {
            return false;
        };
        let was = b.level > 0;
        b.level = 0;
        b.until_ms = 0;
        was
    }

    fn backoff(&self, key: &str) -> (u64, Option<String>) {
        let m = self.backoffs.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key)
            .map(|b| (b.until_ms, b.last_reply.clone()))
            .unwrap_or_default()
    }
}

impl LocalPace {
    /// A back-off another node started (the cluster's mirror): taken when
    /// it ends later than this node's own.
    pub fn adopt_backoff(&self, key: &str, until_ms: u64, level: u32, reply: Option<String>) {
        let mut m = self.backoffs.lock().unwrap_or_else(|e| e.into_inner());
        let b = m.entry(key.to_string()).or_default();
        if until_ms > b.until_ms {
            b.until_ms = until_ms;
            b.level = b.level.max(level);
            b.last_reply = reply.or(b.last_reply.take());
        }
    }

    /// Another node's success reset a back-off.
    pub fn clear_backoff(&self, key: &str) {
        let mut m = self.backoffs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = m.get_mut(key) {
            b.level = 0;
            b.until_ms = 0;
        }
    }

    /// The level of `key`'s back-off (throttles in a row).
    pub fn backoff_level(&self, key: &str) -> u32 {
        let m = self.backoffs.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key).map_or(0, |b| b.level)
    }
}

/// One destination: its limits, and its pace in the [`PaceStore`].
pub struct Dest {
    pub key: String,
    /// (max_connections, max_rate): a reload changes them in place.
    limits: Mutex<(usize, Option<Rate>)>,
    store: Arc<dyn PaceStore>,
}

/// A slot (and a token already spent) for one attempt at a destination:
/// the slot is free again when the pass drops.
pub struct Pass {
    pub dest: Arc<Dest>,
    _lease: Lease,
}

/// Whether a message for a destination may start now.
pub enum Gate {
    Go(Pass),
    /// Not before this time (ms): back-off or no token yet.
    Wait(u64),
    /// Every slot is in use: look again when an attempt ends.
    Full,
}

impl Dest {
    fn new(key: String, limit: usize, rate: Option<Rate>, store: Arc<dyn PaceStore>) -> Dest {
        Dest {
            key,
            limits: Mutex::new((limit, rate)),
            store,
        }
    }

    fn limits(&self) -> (usize, Option<Rate>) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits from a reload: slots at once, a new bucket if the rate
    /// changed (full, as at start-up).
    fn set_limits(&self, limit: usize, rate: Option<Rate>) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = (limit, rate);
        self.store.resize(&self.key, limit);
    }

    /// The end of the back-off, when one is running.
    pub fn throttled_until(&self, now: u64) -> Option<u64> {
        let (until, _) = self.store.backoff(&self.key);
        (until > now).then_some(until)
    }

    /// Takes a slot and a token without waiting, or says when to look again.
    pub fn try_pass(self: &Arc<Self>) -> Gate {
        self.try_pass_with(None)
    }

    /// [`Dest::try_pass`], and a token of `quota` (a tenant's, across its
    /// routes) once a slot is free and before this destination's own
    /// token: a quota's token is never spent on a message that then waits
    /// for a slot.
    pub fn try_pass_with(self: &Arc<Self>, quota: Option<&Dest>) -> Gate {
        let now = now_ms();
        if let Some(t) = self.throttled_until(now) {
            return Gate::Wait(t);
        }
        let (limit, rate) = self.limits();
        let lease = match self.store.try_lease(&self.key, limit) {
            Ok(l) => l,
            Err(None) => return Gate::Full,
            Err(Some(t)) => return Gate::Wait(t),
        };
        if let Some(Err(w)) = quota.map(Dest::try_token) {
            return Gate::Wait(now + w);
        }
        if let Some(rate) = rate {
            if let Err(w) = self.store.take_token(&self.key, rate) {
                return Gate::Wait(now + w);
            }
        }
        Gate::Go(Pass {
            dest: self.clone(),
            _lease: lease,
        })
    }

    /// Takes a token of the rate without a slot (a tenant's quota, across
    /// its routes), or says in how many ms one is there.
    pub fn try_token(&self) -> Result<(), u64> {
        match self.limits().1 {
            Some(rate) => self.store.take_token(&self.key, rate),
            None => Ok(()),
        }
    }

    /// Waits for a slot and a token (direct MX delivery, where the site is
    /// known only once the MX hosts are).
    pub async fn pass(self: &Arc<Self>) -> Pass {
        let (limit, _) = self.limits();
        let lease = self.store.lease(&self.key, limit).await;
        loop {
            let w = match self.limits().1 {
                None => 0,
                Some(rate) => self.store.take_token(&self.key, rate).err().unwrap_or(0),
            };
            if w == 0 {
                return Pass {
                    dest: self.clone(),
                    _lease: lease,
                };
            }
            tokio::time::sleep(Duration::from_millis(w)).await;
        }
    }

    /// The destination asked herald to slow down (see [`PaceStore::throttle`]).
    pub fn throttle(&self, reply: &str, base: Duration, max: Duration) -> (u64, bool) {
        self.store.throttle(&self.key, reply, base, max)
    }

    /// A success: the back-off starts again from its first value.
    /// True when a back-off was reset.
    pub fn success(&self) -> bool {
        self.store.success(&self.key)
    }

    /// What `status` shows.
    pub fn report(&self) -> serde_json::Value {
        let (until, last_reply) = self.store.backoff(&self.key);
        let (limit, rate) = self.limits();
        let now = now_ms();
        serde_json::json!({
            "name": self.key,
            "sessions": self.store.leases(&self.key),
            "max_sessions": limit,
            "rate": rate.map(|r| r.to_string()),
            "throttled_until_ms": (until > now).then_some(until),
            "last_reply": last_reply,
        })
    }
}

/// Every destination seen, over the store of their pace.
pub struct Shaper {
    dests: Mutex<HashMap<String, Arc<Dest>>>,
    store: Arc<dyn PaceStore>,
}

impl Default for Shaper {
    fn default() -> Shaper {
        Shaper::new(Arc::new(LocalPace::default()))
    }
}

impl Shaper {
    pub fn new(store: Arc<dyn PaceStore>) -> Shaper {
        Shaper {
            dests: Mutex::default(),
            store,
        }
    }

    fn get(&self, key: &str, make: impl FnOnce() -> Dest) -> Arc<Dest> {
        let mut d = self.dests.lock().unwrap();
        d.entry(key.to_string())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// The limits of a destination under `cfg`.
    fn limits(cfg: &Config, key: &str) -> (usize, Option<Rate>) {
        if key.starts_with("mx:") {
            return (cfg.delivery.mx_max_connections, cfg.delivery.mx_max_rate);
        }
        match cfg.upstreams.get(key) {
            Some(u) => (u.max_connections, u.max_rate),
            None => (cfg.delivery.concurrency, None),
        }
    }

    /// The destination of a configured upstream.
    pub fn upstream(&self, cfg: &Config, name: &str) -> Arc<Dest> {
        let (limit, rate) = Self::limits(cfg, name);
        self.get(name, || {
            Dest::new(name.to_string(), limit, rate, self.store.clone())
        })
    }

    /// The quota of tenant `name` ("tenant:NAME" in the pace store, so
    /// that a cluster shares it), when it has a `max_rate`.
    pub fn tenant(&self, cfg: &Config, name: &str) -> Option<Arc<Dest>> {
        let rate = cfg.tenant(name)?.max_rate?;
        let key = format!("tenant:{name}");
        let d = self.get(&key, || {
            Dest::new(key.clone(), usize::MAX, Some(rate), self.store.clone())
        });
        if d.limits().1 != Some(rate) {
            d.set_limits(usize::MAX, Some(rate));
        }
        Some(d)
    }

    /// The destination site of a set of MX hosts: "mx:a.example,b.example".
    pub fn mx_site(&self, cfg: &Config, hosts: &[&str]) -> Arc<Dest> {
        let set: BTreeSet<String> = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        let key = format!("mx:{}", set.into_iter().collect::<Vec<_>>().join(","));
        let (limit, rate) = Self::limits(cfg, &key);
        self.get(&key, || {
            Dest::new(key.clone(), limit, rate, self.store.clone())
        })
    }

    /// After a reload: every destination seen takes the new limits, and
    /// upstreams no longer configured (with no session left) are dropped.
    pub fn follow(&self, cfg: &Config) {
        let mut d = self.dests.lock().unwrap();
        d.retain(|key, _| {
            key.starts_with("mx:")
                || key.starts_with("tenant:")
                || cfg.upstreams.contains_key(key)
                || self.store.leases(key) > 0
        });
        // A tenant's quota follows its [[tenants]] entry (Shaper::tenant).
        for (key, dest) in d.iter().filter(|(k, _)| !k.starts_with("tenant:")) {
            let (limit, rate) = Self::limits(cfg, key);
            dest.set_limits(limit, rate);
        }
    }

    /// Every destination, for `status` and `/metrics`: the configured
    /// upstreams first, then the MX sites seen.
    pub fn all(&self, cfg: &Config) -> Vec<Arc<Dest>> {
        for name in cfg.upstreams.keys() {
            self.upstream(cfg, name);
        }
        let d = self.dests.lock().unwrap();
        let mut v: Vec<Arc<Dest>> = d
            .iter()
            .filter(|(k, _)| !k.starts_with("tenant:"))
            .map(|(_, d)| d.clone())
            .collect();
        v.sort_by(|a, b| {
            (a.key.starts_with("mx:"), &a.key).cmp(&(b.key.starts_with("mx:"), &b.key))
        });
        v
    }

    /// Ends the back-off of a route's destinations (`herald retry`: the
    /// operator wants it tried now): the upstream, or every MX site.
    pub fn clear_backoff(&self, route: &str) {
        for (key, d) in self.dests.lock().unwrap().iter() {
            if key == route || (route == "mx" && key.starts_with("mx:")) {
                d.success();
            }
        }
    }
}

/// Health of one route, as `status` and `trace` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteHealth {
    pub healthy: bool,
    pub last_error: Option<String>,
    pub since_ms: u64,
    /// When `last_error` happened (a refusal, or a connection that failed).
    pub last_error_ms: Option<u64>,
}

impl RouteHealth {
    /// A route seen for the first time: healthy since now.
    fn new() -> RouteHealth {
        RouteHealth {
            healthy: true,
            last_error: None,
            since_ms: now_ms(),
            last_error_ms: None,
        }
    }
}

/// Health of the routes and the limits of the destinations, shared by all
/// attempts (and shown by `status`, `trace` and `/metrics`).
#[derive(Default)]
pub struct Pacing {
    pub health: Mutex<HashMap<String, RouteHealth>>,
    /// Limits, back-off and paused routes per destination.
    pub shaper: Shaper,
}

impl Pacing {
    /// Records a route failure; logs only when the route turns unhealthy.
    pub fn mark_unhealthy(&self, route: &str, why: &str) {
        let mut h = self.health.lock().unwrap();
        let e = h.entry(route.to_string()).or_insert_with(RouteHealth::new);
        if e.healthy {
            tracing::error!(
                route,
                error = why,
                "route refused by upstream: all its mail is deferred until this is fixed"
            );
            e.healthy = false;
            e.since_ms = now_ms();
        }
        e.last_error = Some(why.to_string());
        e.last_error_ms = Some(now_ms());
    }

    /// Records the last error of a route that failed for a reason that is
    /// not a refusal of the route (connection refused, a timeout): `status`
    /// shows it, and the route stays healthy, since a down host is no
    /// misconfiguration.
    pub fn note_error(&self, route: &str, why: &str) {
        let mut h = self.health.lock().unwrap();
        let e = h.entry(route.to_string()).or_insert_with(RouteHealth::new);
        e.last_error = Some(why.to_string());
        e.last_error_ms = Some(now_ms());
    }

    pub fn mark_healthy(&self, route: &str) {
        let mut h = self.health.lock().unwrap();
        let e = h.entry(route.to_string()).or_insert_with(RouteHealth::new);
        if !e.healthy {
            tracing::info!(route, "route works again");
            e.healthy = true;
            e.since_ms = now_ms();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
            burst: count,
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(rate(10, 1));
        b.at = t0;
        for _ in 0..10 {
            assert_eq!(b.wait_ms(t0), 0);
            b.take();
        }
        assert_eq!(b.wait_ms(t0), 100);
        assert_eq!(b.wait_ms(t0 + Duration::from_millis(100)), 0);
        b.take();
        // Never more than the burst, however long the pause.
        assert_eq!(b.wait_ms(t0 + Duration::from_secs(3600)), 0);
        assert!(b.tokens <= 10.0);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets_on_success() {
        let store = Arc::new(LocalPace::default());
        let d = Dest::new("up".into(), 2, None, store.clone());
        let expire = || {
            let mut m = store.backoffs.lock().unwrap();
            m.get_mut("up").unwrap().until_ms = 0;
        };
        let (base, max) = (Duration::from_secs(60), Duration::from_secs(1800));
        let now = now_ms();
        let (t, new) = d.throttle("421 slow down", base, max);
        assert!(new);
        assert!(t >= now + 60_000 && t < now + 62_000, "{t} {now}");
        // A second reply while it runs changes nothing.
        assert_eq!(d.throttle("421 again", base, max), (t, false));
        // Expired: the next throttle doubles.
        expire();
        let (t2, _) = d.throttle("421", base, max);
        assert!(t2 >= now + 120_000 && t2 < now + 122_000);
        for _ in 0..10 {
            expire();
            d.throttle("421", base, max);
        }
        let until = store.backoff("up").0;
        assert!(until <= now_ms() + 1_800_000 && until > now + 1_790_000);
        assert!(d.success());
        assert_eq!(d.throttled_until(now_ms()), None);
        let (t3, _) = d.throttle("421", base, max);
        assert!(t3 < now_ms() + 61_000);
    }

    #[test]
    fn slots_are_limited_and_freed_by_dropping_the_pass() {
        let d = Arc::new(Dest::new(
            "up".into(),
            2,
            None,
            Arc::new(LocalPace::default()),
        ));
        let a = d.try_pass();
        let b = d.try_pass();
        assert!(matches!(a, Gate::Go(_)) && matches!(b, Gate::Go(_)));
        assert!(matches!(d.try_pass(), Gate::Full));
        drop(a);
        assert!(matches!(d.try_pass(), Gate::Go(_)));
    }
}
