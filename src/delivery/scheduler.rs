//! The scheduler: due times in memory (rebuilt from the queue at
//! start-up), messages held while their route is paused or its
//! destination is full or backing off, and at most `concurrency` attempts
//! at once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::attempt::attempt;
use super::pool::Pool;
use crate::state::pacing;
use crate::state::schedule::SchedMsg;
use crate::state::spool::now_ms;
use crate::state::Services;

/// How soon a message whose results are not written yet is looked at again.
const UNSAVED_RETRY_MS: u64 = 5_000;

/// The scheduler loop. Runs until shutdown.
/// Due times of queued messages: one entry per message, earliest first.
#[derive(Default)]
struct DueList {
    due: BTreeSet<(u64, String)>,
    index: HashMap<String, u64>,
}

impl DueList {
    /// (Re)schedules `id` at `t`, replacing an earlier due time.
    fn schedule(&mut self, id: &str, t: u64) {
        if let Some(old) = self.index.insert(id.to_string(), t) {
            self.due.remove(&(old, id.to_string()));
        }
        self.due.insert((t, id.to_string()));
    }

    /// The earliest due time.
    fn first(&self) -> Option<u64> {
        self.due.first().map(|(t, _)| *t)
    }

    /// Takes the earliest message due at `now` or before.
    fn pop_due(&mut self, now: u64) -> Option<String> {
        let (t, id) = self.due.first().cloned()?;
        if t > now {
            return None;
        }
        self.due.remove(&(t, id.clone()));
        self.index.remove(&id);
        Some(id)
    }

    fn len(&self) -> usize {
        self.due.len()
    }
}

/// Messages held back per route: the route is paused, its destination
/// backs off, has no token yet, or has every slot in use; or their
/// tenant's quota has no token yet. Held messages are not attempts:
/// nothing is recorded for them.
#[derive(Default)]
struct Held {
    /// Per [`queue_key`], in arrival order, and when to look at them again.
    routes: HashMap<String, (VecDeque<String>, u64)>,
}

/// The queue a held message waits in: its route, and its tenant when the
/// tenant has a quota, so that one tenant over its quota never holds
/// another tenant's mail on the same route.
fn queue_key(route: &str, quota_tenant: Option<&str>) -> String {
    match quota_tenant {
        Some(t) => format!("{route}\0{t}"),
        None => route.to_string(),
    }
}

/// The route and the tenant of a [`queue_key`].
fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once('\0') {
        Some((r, t)) => (r, Some(t)),
        None => (key, None),
    }
}

impl Held {
    fn hold(&mut self, route: &str, id: String, wake: u64) {
        let e = self
            .routes
            .entry(route.to_string())
            .or_insert_with(|| (VecDeque::new(), wake));
        e.0.push_back(id);
        e.1 = wake;
    }

    /// Every queue of `route` (each tenant's).
    fn wake(&mut self, route: &str, at: u64) {
        for (k, e) in self.routes.iter_mut() {
            if split_key(k).0 == route {
                e.1 = e.1.min(at);
            }
        }
    }

    fn wake_all(&mut self, at: u64) {
        for e in self.routes.values_mut() {
            e.1 = e.1.min(at);
        }
    }

    fn first(&self) -> Option<u64> {
        self.routes
            .values()
            .filter(|(q, _)| !q.is_empty())
            .map(|(_, t)| *t)
            .min()
    }
}

/// Whether a message on `route` may start now, and with what pass.
enum Start {
    Go(Option<pacing::Pass>),
    Hold(u64),
}

fn gate(s: &Services, route: &str, tenant: Option<&str>) -> Start {
    if s.pauses.route_paused(route) {
        return Start::Hold(u64::MAX);
    }
    // The tenant's quota across its routes: its token is taken once the
    // route has a slot for the message.
    let quota = tenant.and_then(|t| s.pacing.shaper.tenant(&s.cfg(), t));
    // Direct MX delivery: the site is known only after the MX lookup; the
    // attempt waits for its slot there.
    if route == "mx" {
        if let Some(Err(w)) = quota.as_deref().map(pacing::Dest::try_token) {
            return Start::Hold(now_ms() + w);
        }
        return Start::Go(None);
    }
    match s
        .pacing
        .shaper
        .upstream(&s.cfg(), route)
        .try_pass_with(quota.as_deref())
    {
        pacing::Gate::Go(p) => Start::Go(Some(p)),
        pacing::Gate::Wait(t) => Start::Hold(t),
        pacing::Gate::Full => Start::Hold(u64::MAX),
    }
}

/// The connection pool of delivery. With `[cluster]` idle sessions are
/// closed soon (see [`super::pool::CLUSTER_POOL_IDLE`]), by a task of its own.
fn pool(services: &Services) -> Arc<Pool> {
    let Some(_) = &services.cluster else {
        return Arc::new(Pool::default());
    };
    let pool = Arc::new(Pool::new(super::pool::CLUSTER_POOL_IDLE));
    let (p, mut stop) = (pool.clone(), services.shutdown.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => p.close_old(),
                _ = stop.wait() => return,
            }
        }
    });
    pool
}

pub async fn run(services: Arc<Services>, mut rx: mpsc::UnboundedReceiver<SchedMsg>) {
    let mut due = DueList::default();
    let mut held = Held::default();
    let mut inflight: HashSet<String> = HashSet::new();
    let mut shutdown = services.shutdown.clone();
    let pool = pool(&services);
    let mut reloads = services.reloads.subscribe();
    // What the idle connections were opened with: the upstreams' settings
    // and the files behind them (a renewed CA file).
    let settings = |live: &crate::live::Live| {
        (
            live.cfg.upstreams.clone(),
            live.files.get("upstreams").cloned(),
        )
    };
    let mut upstreams = settings(&services.live());

    match services.store.all() {
        Ok(all) => {
            for env in all {
                if let Some(t) = env.next_due() {
                    due.schedule(&env.id, t);
                }
            }
            if due.len() > 0 {
                tracing::info!(messages = due.len(), "queue loaded");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the queue"),
    }

    'run: loop {
        // While the storage is failed nothing that happens can be recorded:
        // delivery is held (and looked at again every second).
        let failed = services.store.health.is_failed();
        let paused = services.pauses.delivery_paused() || failed;
        let next = [due.first(), held.first()]
            .into_iter()
            .flatten()
            .min()
            .filter(|&t| !paused && t != u64::MAX);
        let sleep = match next {
            Some(t) => Duration::from_millis(t.saturating_sub(now_ms())),
            None if failed => Duration::from_secs(1),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            Ok(()) = reloads.changed() => {
                // Idle sessions were opened (and authenticated) with the
                // old settings of the upstreams.
                let now = settings(&services.live());
                if now != upstreams {
                    pool.close_idle();
                    upstreams = now;
                }
            }
            msg = rx.recv() => match msg {
                Some(SchedMsg::Due(id, t)) => due.schedule(&id, t),
                Some(SchedMsg::Done(id, route)) => {
                    inflight.remove(&id);
                    // A slot is free: what waited for one may go.
                    held.wake(&route, now_ms());
                }
                Some(SchedMsg::Wake) => held.wake_all(now_ms()),
                None => break,
            },
            _ = tokio::time::sleep(sleep), if next.is_some() || failed => {
                let now = now_ms();
                let stopped = || services.pauses.delivery_paused() || services.store.health.is_failed();
                // Held messages whose time has come first (they waited
                // longest), one by one until their route holds again.
                let woken: Vec<String> = held
                    .routes
                    .iter()
                    .filter(|(_, (q, wake))| *wake <= now && !q.is_empty())
                    .map(|(r, _)| r.clone())
                    .collect();
                for key in woken {
                    let (route, tenant) = split_key(&key);
                    while !stopped() {
                        let Some(id) = held.routes.get_mut(&key).and_then(|e| e.0.pop_front()) else { break };
                        if inflight.contains(&id) {
                            due.schedule(&id, now + 1000);
                            continue;
                        }
                        match gate(&services, route, tenant) {
                            Start::Go(pass) => {
                                if !start(&services, &pool, &mut inflight, id, route.to_string(), pass).await {
                                    break 'run;
                                }
                            }
                            Start::Hold(t) => {
                                let e = held.routes.get_mut(&key).expect("held route");
                                e.0.push_front(id);
                                e.1 = t;
                                break;
                            }
                        }
                    }
                }
                while !stopped() {
                    let Some(id) = due.pop_due(now) else { break };
                    if inflight.contains(&id) {
                        // An attempt is running; look again shortly.
                        due.schedule(&id, now + 1000);
                        continue;
                    }
                    let (route, tenant) = match services.store.envelope(&id) {
                        Ok(Some(env)) => (env.upstream, env.tenant),
                        Ok(None) => continue, // finished or cancelled meanwhile
                        Err(_) => ("mx".to_string(), None),
                    };
                    // Only a tenant with a quota waits in a queue of its own.
                    let tenant = tenant.filter(|t| {
                        services.cfg().tenant(t).is_some_and(|t| t.max_rate.is_some())
                    });
                    let key = queue_key(&route, tenant.as_deref());
                    // Others already wait in this queue: keep their order.
                    if let Some((q, wake)) = held.routes.get_mut(&key) {
                        if !q.is_empty() && *wake > now {
                            q.push_back(id);
                            continue;
                        }
                    }
                    match gate(&services, &route, tenant.as_deref()) {
                        Start::Go(pass) => {
                            if !start(&services, &pool, &mut inflight, id, route, pass).await {
                                break 'run;
                            }
                        }
                        Start::Hold(t) => held.hold(&key, id, t),
                    }
                }
            }
            _ = shutdown.wait() => break,
        }
    }
    // Let attempts in flight record their outcome (a delivery the upstream
    // accepted but we did not record would be sent again after restart).
    if tokio::time::timeout(Duration::from_secs(20), services.attempts.idle())
        .await
        .is_err()
    {
        tracing::warn!("deliveries still in flight at shutdown; they will be retried");
    }
}

/// Starts one attempt once a delivery slot is free; false at shutdown.
async fn start(
    services: &Arc<Services>,
    pool: &Arc<Pool>,
    inflight: &mut HashSet<String>,
    id: String,
    route: String,
    pass: Option<pacing::Pass>,
) -> bool {
    let mut stop = services.shutdown.clone();
    let permit = tokio::select! {
        p = services.attempts.acquire() => p,
        _ = stop.wait() => return false,
    };
    inflight.insert(id.clone());
    let (s, pool) = (services.clone(), pool.clone());
    tokio::spawn(async move {
        // Run the attempt as its own task so that a panic in it cannot
        // leave the message marked in flight.
        let (s2, id2) = (s.clone(), id.clone());
        let attempt = async move { attempt(&s2, &pool, &id2, pass).await };
        if let Err(e) = tokio::spawn(attempt).await {
            tracing::error!(%id, error = %e, "delivery attempt failed unexpectedly; next try in 5 minutes");
            // Not at once again: that would spin on the same fault.
            let later = now_ms() + 300_000;
            s.ledger().postpone(&id, later);
        }
        s.scheduler.done(&id, &route);
        if s.unsaved.contains(&id) {
            s.scheduler.schedule(&id, now_ms() + UNSAVED_RETRY_MS);
        } else if let Ok(Some(env)) = s.store.envelope(&id) {
            if let Some(t) = env.next_due() {
                s.scheduler.schedule(&id, t);
            }
        }
        drop(permit);
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_list_orders_replaces_and_pops_only_what_is_due() {
        let mut d = DueList::default();
        d.schedule("B", 20);
        d.schedule("A", 10);
        d.schedule("C", 30);
        assert_eq!(d.first(), Some(10));
        // Rescheduling replaces, never duplicates.
        d.schedule("A", 25);
        assert_eq!(d.len(), 3);
        assert_eq!(d.pop_due(5), None);
        assert_eq!(d.pop_due(25).as_deref(), Some("B"));
        assert_eq!(d.pop_due(25).as_deref(), Some("A"));
        assert_eq!(d.pop_due(25), None);
        assert_eq!(d.first(), Some(30));
        assert_eq!(d.pop_due(u64::MAX).as_deref(), Some("C"));
        assert_eq!(d.len(), 0);
    }
}
