//! Delivery: the scheduler that decides when a message is due, and the
//! attempt that takes it to its upstream and records what happened.
//!
//! The scheduler keeps due times in memory (rebuilt from the queue at
//! start-up) and starts at most `concurrency` attempts at once. An attempt
//! reads the envelope, connects (or reuses an idle connection to the same
//! upstream), runs one transaction, and writes each recipient's new state
//! and an event. A message whose recipients are all final leaves the queue.

pub mod client;
pub mod probe;
pub mod shaping;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::Security;
use crate::history::EventKind;
use crate::queue::{now_ms, Envelope, Rcpt, RcptStatus};
use crate::reply::Class;
use crate::services::Services;
use client::{Conn, ConnError, Outcome, Target, Verdict};

/// How long an idle upstream connection is kept for the next message.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream.
const POOL_MAX: usize = 32;

pub enum SchedMsg {
    /// (Re)schedule a message at this time (ms).
    Due(String, u64),
    /// An attempt finished (the message may have been rescheduled first);
    /// its route, whose slot is free again.
    Done(String, String),
    /// Something changed (resume): look at the due list again.
    Wake,
}

/// The handle through which others ask for delivery.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<SchedMsg>,
}

impl Scheduler {
    pub fn new() -> (Scheduler, mpsc::UnboundedReceiver<SchedMsg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Scheduler { tx }, rx)
    }

    pub fn schedule(&self, id: &str, due_ms: u64) {
        let _ = self.tx.send(SchedMsg::Due(id.to_string(), due_ms));
    }

    pub fn wake(&self) {
        let _ = self.tx.send(SchedMsg::Wake);
    }

    fn done(&self, id: &str, route: &str) {
        let _ = self
            .tx
            .send(SchedMsg::Done(id.to_string(), route.to_string()));
    }
}

/// Results of attempts that could not be written (the storage failed): kept
/// in memory, with the recipients as they were before the attempt, and
/// written before the message is attempted again. A recipient delivered
/// while the disk was full is so never sent again in a loop.
#[derive(Default)]
pub struct Unsaved(Mutex<HashMap<String, (Envelope, Vec<Rcpt>)>>);

impl Unsaved {
    fn keep(&self, env: &Envelope, before: &[Rcpt]) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let first_before = m.remove(&env.id).map(|(_, b)| b);
        m.insert(
            env.id.clone(),
            (env.clone(), first_before.unwrap_or_else(|| before.to_vec())),
        );
    }

    fn take(&self, id: &str) -> Option<(Envelope, Vec<Rcpt>)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How soon a message whose results are not written yet is looked at again.
const UNSAVED_RETRY_MS: u64 = 5_000;

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

/// Connections and health per upstream, shared by all attempts.
#[derive(Default)]
pub struct Routes {
    pool: Mutex<HashMap<String, Vec<(Instant, Conn)>>>,
    pub health: Mutex<HashMap<String, RouteHealth>>,
    /// Limits, back-off and paused routes per destination.
    pub shaper: shaping::Shaper,
}

impl Routes {
    fn take(&self, key: &str) -> Option<Conn> {
        let mut pool = self.pool.lock().unwrap();
        let list = pool.get_mut(key)?;
        while let Some((t, c)) = list.pop() {
            if t.elapsed() < POOL_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn put(&self, key: &str, c: Conn) {
        let mut pool = self.pool.lock().unwrap();
        let list = pool.entry(key.to_string()).or_default();
        list.retain(|(t, _)| t.elapsed() < POOL_IDLE);
        if list.len() < POOL_MAX {
            list.push((Instant::now(), c));
        }
    }

    /// Closes every idle connection: a reload changed the upstreams, and
    /// these were opened (and authenticated) with the old settings.
    pub fn close_idle(&self) {
        let idle: Vec<Conn> = self
            .pool
            .lock()
            .unwrap()
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|(_, c)| c))
            .collect();
        for c in idle {
            tokio::spawn(quit(c));
        }
    }

    /// Records a route failure; logs only when the route turns unhealthy.
    fn mark_unhealthy(&self, route: &str, why: &str) {
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
    fn note_error(&self, route: &str, why: &str) {
        let mut h = self.health.lock().unwrap();
        let e = h.entry(route.to_string()).or_insert_with(RouteHealth::new);
        e.last_error = Some(why.to_string());
        e.last_error_ms = Some(now_ms());
    }

    fn mark_healthy(&self, route: &str) {
        let mut h = self.health.lock().unwrap();
        let e = h.entry(route.to_string()).or_insert_with(RouteHealth::new);
        if !e.healthy {
            tracing::info!(route, "route works again");
            e.healthy = true;
            e.since_ms = now_ms();
        }
    }
}

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
/// backs off, has no token yet, or has every slot in use. Held messages
/// are not attempts: nothing is recorded for them.
#[derive(Default)]
struct Held {
    /// Per route, in arrival order, and when to look at them again.
    routes: HashMap<String, (VecDeque<String>, u64)>,
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

    fn wake(&mut self, route: &str, at: u64) {
        if let Some(e) = self.routes.get_mut(route) {
            e.1 = e.1.min(at);
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
    Go(Option<shaping::Pass>),
    Hold(u64),
}

fn gate(s: &Services, route: &str) -> Start {
    if s.routes.shaper.is_paused(route) {
        return Start::Hold(u64::MAX);
    }
    // Direct MX delivery: the site is known only after the MX lookup; the
    // attempt waits for its slot there.
    if route == "mx" {
        return Start::Go(None);
    }
    match s.routes.shaper.upstream(&s.cfg(), route).try_pass() {
        shaping::Gate::Go(p) => Start::Go(Some(p)),
        shaping::Gate::Wait(t) => Start::Hold(t),
        shaping::Gate::Full => Start::Hold(u64::MAX),
    }
}

pub async fn run(services: Arc<Services>, mut rx: mpsc::UnboundedReceiver<SchedMsg>) {
    let mut due = DueList::default();
    let mut held = Held::default();
    let mut inflight: HashSet<String> = HashSet::new();
    let mut shutdown = services.shutdown.clone();
    services.routes.shaper.load_paused(&services.store);

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
        let paused = services.paused.load(Ordering::Relaxed) || failed;
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
                let stopped = || services.paused.load(Ordering::Relaxed) || services.store.health.is_failed();
                // Held messages whose time has come first (they waited
                // longest), one by one until their route holds again.
                let woken: Vec<String> = held
                    .routes
                    .iter()
                    .filter(|(_, (q, wake))| *wake <= now && !q.is_empty())
                    .map(|(r, _)| r.clone())
                    .collect();
                for route in woken {
                    while !stopped() {
                        let Some(id) = held.routes.get_mut(&route).and_then(|e| e.0.pop_front()) else { break };
                        if inflight.contains(&id) {
                            due.schedule(&id, now + 1000);
                            continue;
                        }
                        match gate(&services, &route) {
                            Start::Go(pass) => {
                                if !start(&services, &mut inflight, id, route.clone(), pass).await {
                                    break 'run;
                                }
                            }
                            Start::Hold(t) => {
                                let e = held.routes.get_mut(&route).expect("held route");
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
                    let route = match services.store.envelope(&id) {
                        Ok(Some(env)) => env.upstream,
                        Ok(None) => continue, // finished or cancelled meanwhile
                        Err(_) => "mx".to_string(),
                    };
                    // Others already wait for this route: keep their order.
                    if let Some((q, wake)) = held.routes.get_mut(&route) {
                        if !q.is_empty() && *wake > now {
                            q.push_back(id);
                            continue;
                        }
                    }
                    match gate(&services, &route) {
                        Start::Go(pass) => {
                            if !start(&services, &mut inflight, id, route, pass).await {
                                break 'run;
                            }
                        }
                        Start::Hold(t) => held.hold(&route, id, t),
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
    inflight: &mut HashSet<String>,
    id: String,
    route: String,
    pass: Option<shaping::Pass>,
) -> bool {
    let mut stop = services.shutdown.clone();
    let permit = tokio::select! {
        p = services.attempts.acquire() => p,
        _ = stop.wait() => return false,
    };
    inflight.insert(id.clone());
    let s = services.clone();
    tokio::spawn(async move {
        // Run the attempt as its own task so that a panic in it cannot
        // leave the message marked in flight.
        let (s2, id2) = (s.clone(), id.clone());
        if let Err(e) = tokio::spawn(async move { attempt(&s2, &id2, pass).await }).await {
            tracing::error!(%id, error = %e, "delivery attempt failed unexpectedly; next try in 5 minutes");
            // Not at once again: that would spin on the same fault.
            let later = now_ms() + 300_000;
            let _ = s.store.update(&id, |env| {
                for r in env.rcpts.iter_mut().filter(|r| !r.status.is_final()) {
                    r.next_attempt = r.next_attempt.max(later);
                }
            });
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

/// Builds the connection target for a named upstream.
fn upstream_target(s: &Services, name: &str) -> Result<Target, String> {
    let live = s.live();
    let u = live
        .cfg
        .upstreams
        .get(name)
        .ok_or_else(|| format!("upstream {name:?} is not configured (any more)"))?;
    let tls = live
        .client_tls
        .get(name)
        .cloned()
        .ok_or_else(|| format!("upstream {name:?}: no TLS configuration"))?;
    Ok(Target {
        host: u.host.clone(),
        connect_to: None,
        port: u.port,
        security: u.security,
        opportunistic: false,
        tls,
        credentials: u.username.clone().zip(u.password.clone()),
        helo: live.cfg.hostname.clone(),
        smart_host: true,
    })
}

/// Counts a hard bounce of `addr` (a reply at RCPT or a report that came
/// back) toward `suppress_after_bounces`; logs the suppression it causes.
pub fn note_hard_bounce(s: &Services, addr: &str, reply: &str, id: &str) {
    let cfg = &s.cfg().delivery;
    match s.suppression.note_bounce(
        addr,
        reply,
        id,
        cfg.suppress_after_bounces,
        cfg.suppression_expiry,
    ) {
        Ok(Some(e)) => tracing::warn!(
            rcpt = %addr,
            reason = %e.reason,
            "address suppressed: mail to it will not be attempted (herald suppression remove to lift)"
        ),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "cannot update the suppression list"),
    }
}

/// Applies one recipient verdict and records the event.
fn apply(s: &Services, env: &mut Envelope, idx: usize, verdict: &Verdict, host: &str) {
    let now = now_ms();
    let cfg = &s.cfg().delivery;
    let r = &mut env.rcpts[idx];
    r.updated = now;
    r.last_host = Some(host.to_string());
    let (kind, text, class) = match verdict {
        Verdict::Delivered(t) => {
            r.status = RcptStatus::Delivered;
            r.class = None;
            if let Err(e) = s.suppression.note_delivered(&r.addr) {
                tracing::error!(error = %e, "cannot update bounce counts");
            }
            (EventKind::Delivered, t.clone(), None)
        }
        Verdict::Bounced(t, class) => {
            r.attempts += 1;
            r.status = RcptStatus::Bounced;
            r.class = Some(*class);
            // Only a hard bounce says the address is bad: a full mailbox or
            // a refusal of the message never suppresses anybody.
            if class.suppresses() {
                note_hard_bounce(s, &r.addr, t, &env.id);
            }
            (
                EventKind::Bounced,
                format!("{t} ({class}: {})", class.meaning()),
                Some(*class),
            )
        }
        Verdict::Deferred(t, class) => {
            r.attempts += 1;
            r.class = Some(*class);
            let next = next_attempt(cfg, env.received_at, r.attempts, now);
            if let Some(next) = next {
                r.status = RcptStatus::Deferred;
                r.next_attempt = next;
                (
                    EventKind::Deferred,
                    format!(
                        "{t} (deferred, {class}; attempt {}, next in {})",
                        r.attempts,
                        crate::config::format_duration(Duration::from_secs(
                            (r.next_attempt - now) / 1000
                        ))
                    ),
                    Some(*class),
                )
            } else {
                r.status = RcptStatus::Expired;
                (
                    EventKind::Expired,
                    format!(
                        "gave up after {} (delivery.max_age); last reply: {t}",
                        crate::config::format_duration(cfg.max_age)
                    ),
                    Some(*class),
                )
            }
        }
    };
    r.last_reply = Some(text.clone());
    let cls = class.map(|c| c.as_str()).unwrap_or("");
    if kind == EventKind::Delivered {
        tracing::info!(id = %env.id, rcpt = %r.addr, reply = %text, "delivered");
    } else {
        tracing::warn!(id = %env.id, rcpt = %r.addr, class = cls, reply = %text, "{}", kind.as_str());
    }
    let addr = r.addr.clone();
    record(s, env, kind, class, &addr, &text);
}

/// Records an event for a recipient of `env`. A history failure is logged,
/// never allowed to stop delivery.
fn record(
    s: &Services,
    env: &Envelope,
    kind: EventKind,
    class: Option<Class>,
    rcpt: &str,
    detail: &str,
) {
    let (tag, subject) = (env.tag.as_deref(), env.subject.as_deref());
    let r = env.rcpts.iter().find(|r| r.addr == rcpt);
    let extra = crate::history::Extra {
        class,
        attempts: r.map(|r| r.attempts),
        upstream: r.and_then(|r| r.last_host.clone()).filter(|h| h != "-"),
        ..Default::default()
    };
    if let Err(e) = s
        .history
        .record_with(kind, &env.id, rcpt, detail, tag, subject, extra)
    {
        tracing::error!(error = %e, "cannot record history");
    }
}

/// Writes the attempt's results back: only the recipients this attempt
/// changed (those equal to `before` keep what others wrote meanwhile, a
/// `retry` say). A recipient cancelled or suppressed while the attempt ran
/// keeps that state, unless the attempt delivered it (then the record says
/// what really happened).
fn save(s: &Services, env: &Envelope, before: &[Rcpt]) {
    let res = s
        .store
        .update(&env.id, |cur| merge(&mut cur.rcpts, &env.rcpts, before));
    if let Err(e) = res {
        // Kept in memory and written before the next attempt: the message
        // is not sent again until its outcome is on record.
        tracing::error!(id = %env.id, error = %e, "cannot update the queue; the outcome is kept and written once storage works");
        s.unsaved.keep(env, before);
    }
}

/// The write-back rule of [`save`]: `new` is what the attempt made of
/// `before`; `cur` is what is stored now.
fn merge(cur: &mut [Rcpt], new: &[Rcpt], before: &[Rcpt]) {
    for ((c, n), b) in cur.iter_mut().zip(new).zip(before) {
        if n == b {
            continue;
        }
        if c.status.is_final() && n.status != RcptStatus::Delivered {
            continue;
        }
        *c = n.clone();
    }
}

/// When a recipient deferred for the `attempts`-th time is tried next, or
/// None when it has run out of time (`max_age`). The last retry is
/// scheduled at the deadline itself, so it still runs.
fn next_attempt(
    cfg: &crate::config::Delivery,
    received_at: u64,
    attempts: u32,
    now: u64,
) -> Option<u64> {
    let expires = received_at + cfg.max_age.as_millis() as u64;
    if now >= expires {
        return None;
    }
    Some((now + cfg.backoff(attempts).as_millis() as u64).min(expires))
}

/// Whether a recipient due at `next` and reached only at `now` is stale: it
/// was due before the deadline but the deadline has passed (a long pause).
fn is_stale(now: u64, expires: u64, next: u64) -> bool {
    now >= expires && next < expires
}

/// Where a group of recipients can go, or why it cannot go anywhere now.
type Targets = Result<Vec<Target>, Verdict>;

/// One delivery attempt for the due recipients of one message.
pub async fn attempt(s: &Services, id: &str, pass: Option<shaping::Pass>) {
    let mut pass = pass;
    // An earlier outcome is not on disk yet: write it first, or wait.
    if let Some((env, before)) = s.unsaved.take(id) {
        save(s, &env, &before);
        if s.unsaved.contains(id) {
            return;
        }
        tracing::info!(%id, "outcome of an earlier attempt written");
    }
    let mut env = match s.store.envelope(id) {
        Ok(Some(e)) => e,
        Ok(None) => return, // cancelled or finished meanwhile
        Err(e) => {
            tracing::error!(%id, error = %e, "cannot read queued message");
            return;
        }
    };
    // The body's share of the memory budget, taken before it is read.
    let _memory = s.memory.reserve(env.size).await;
    let body = match s.store.body(id) {
        Ok(Some(b)) => b,
        Err(e) => {
            tracing::error!(%id, error = %e, "cannot read queued message");
            return;
        }
        Ok(None) => {
            // Nothing can be sent; say so in the history of each recipient
            // rather than leave them looking deferred.
            tracing::error!(%id, "queued message has no body; its recipients expire");
            let before = env.rcpts.clone();
            let why =
                "the message body is missing from the spool (storage damage); nothing can be sent";
            for i in 0..env.rcpts.len() {
                if env.rcpts[i].status.is_final() {
                    continue;
                }
                let r = &mut env.rcpts[i];
                r.status = RcptStatus::Expired;
                r.updated = now_ms();
                r.last_reply = Some(why.into());
                let addr = r.addr.clone();
                record(s, &env, EventKind::Expired, None, &addr, why);
            }
            save(s, &env, &before);
            return;
        }
    };
    let before = env.rcpts.clone();
    let now = now_ms();
    let due: Vec<usize> = env
        .rcpts
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.status.is_final() && r.next_attempt <= now + 1000)
        .map(|(i, _)| i)
        .collect();
    // Past max_age (after a long pause, say): a stale notification is
    // worse than none, so it expires instead of going out late.
    let expires = env.received_at + s.cfg().delivery.max_age.as_millis() as u64;
    let mut due = due;
    // The last retry is scheduled at `expires` itself and still runs; a
    // recipient that was due earlier and is only now reached is stale.
    let stale: Vec<usize> = due
        .iter()
        .copied()
        .filter(|&i| is_stale(now, expires, env.rcpts[i].next_attempt))
        .collect();
    if !stale.is_empty() {
        for &i in &stale {
            let last = env.rcpts[i]
                .last_reply
                .clone()
                .unwrap_or_else(|| "none (never attempted)".into());
            let class = env.rcpts[i].class.unwrap_or(Class::Transient);
            apply(s, &mut env, i, &Verdict::Deferred(last, class), "-");
        }
        due.retain(|i| !stale.contains(i));
    }
    // Suppressed since it was queued: never attempted.
    screen_suppressed(s, &mut env, &mut due, "-", true);
    if due.is_empty() {
        save(s, &env, &before);
        return;
    }

    // Groups of recipients that share a connection target.
    let groups: Vec<(Targets, Vec<usize>)> = if env.upstream == "mx" {
        let mut by_domain: HashMap<String, Vec<usize>> = HashMap::new();
        for &i in &due {
            let d = env.rcpts[i]
                .addr
                .rsplit_once('@')
                .map(|(_, d)| d.to_ascii_lowercase())
                .unwrap_or_default();
            by_domain.entry(d).or_default().push(i);
        }
        let mut g = Vec::new();
        for (domain, idx) in by_domain {
            g.push((crate::dns::mx_targets(s, &domain).await, idx));
        }
        g
    } else {
        let t = upstream_target(s, &env.upstream)
            .map(|t| vec![t])
            .map_err(|t| Verdict::Deferred(t, Class::Route));
        vec![(t, due)]
    };

    for (targets, idx) in groups {
        let route = env.upstream.clone();
        let targets = match targets {
            Ok(t) => t,
            Err(v) => {
                for &i in &idx {
                    apply(s, &mut env, i, &v, &route);
                }
                save(s, &env, &before);
                continue;
            }
        };
        // The destination's slot: taken by the scheduler for an upstream;
        // for an MX site (known only now) waited for here.
        let pass = match pass.take() {
            Some(p) => p,
            None => {
                let dest = if route == "mx" {
                    let hosts: Vec<&str> = targets.iter().map(|t| t.host.as_str()).collect();
                    s.routes.shaper.mx_site(&s.cfg(), &hosts)
                } else {
                    s.routes.shaper.upstream(&s.cfg(), &route)
                };
                if let Some(until) = dest.throttled_until(now_ms()) {
                    let why = dest.report()["last_reply"]
                        .as_str()
                        .unwrap_or("throttled")
                        .to_string();
                    for &i in &idx {
                        apply_throttled(s, &mut env, i, &why, Class::Throttle, until);
                    }
                    save(s, &env, &before);
                    continue;
                }
                dest.pass().await
            }
        };
        deliver_group(
            s, &mut env, &before, &body, &route, &targets, &idx, &pass.dest,
        )
        .await;
        drop(pass);
        // Saved after each destination: a crash later in this attempt must
        // not resend groups already delivered.
        save(s, &env, &before);
    }
}

/// A recipient held back because its destination asked herald to slow
/// down: deferred until the back-off ends, its retry counter not spent.
fn apply_throttled(
    s: &Services,
    env: &mut Envelope,
    idx: usize,
    reply: &str,
    class: Class,
    until: u64,
) {
    let now = now_ms();
    let expires = env.received_at + s.cfg().delivery.max_age.as_millis() as u64;
    let r = &mut env.rcpts[idx];
    r.updated = now;
    r.class = Some(class);
    let (kind, text) = if now >= expires {
        r.status = RcptStatus::Expired;
        (
            EventKind::Expired,
            format!(
                "gave up after {} (delivery.max_age); last reply: {reply}",
                crate::config::format_duration(s.cfg().delivery.max_age)
            ),
        )
    } else {
        r.status = RcptStatus::Deferred;
        r.next_attempt = until.min(expires);
        (
            EventKind::Deferred,
            format!(
                "destination throttled: {reply}; next try in {}",
                crate::config::format_duration(Duration::from_secs(
                    r.next_attempt.saturating_sub(now).div_ceil(1000)
                ))
            ),
        )
    };
    r.last_reply = Some(text.clone());
    // One log line per destination (when it starts backing off), not one
    // per message; an expiry is final and logged as such.
    if kind == EventKind::Expired {
        tracing::warn!(id = %env.id, rcpt = %r.addr, class = class.as_str(), reply = %text, "expired");
    } else {
        tracing::debug!(id = %env.id, rcpt = %r.addr, reply = %text, "deferred");
    }
    let addr = r.addr.clone();
    record(s, env, kind, Some(class), &addr, &text);
}

/// The destination backs off; returns when its back-off ends.
fn throttle(s: &Services, dest: &shaping::Dest, reply: &str) -> u64 {
    let cfg = &s.cfg().delivery;
    let (until, new) = dest.throttle(reply, cfg.throttle_backoff(), cfg.throttle_backoff_max());
    if new {
        tracing::warn!(
            destination = %dest.key,
            reply,
            backoff = %crate::config::format_duration(Duration::from_secs(
                until.saturating_sub(now_ms()).div_ceil(1000)
            )),
            "destination throttled: no new sessions to it until the back-off ends"
        );
    }
    until
}

/// Closes a session politely (QUIT, and its reply) so that the server has
/// counted it gone before the slot is used again.
async fn quit(mut conn: Conn) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.client.cmd(b"QUIT\r\n")).await;
}

/// Tries the targets in order until one judges the recipients.
#[allow(clippy::too_many_arguments)]
async fn deliver_group(
    s: &Services,
    env: &mut Envelope,
    before: &[Rcpt],
    body: &[u8],
    route: &str,
    targets: &[Target],
    idx: &[usize],
    dest: &shaping::Dest,
) {
    let mut idx = idx.to_vec();
    let mut last_err = ConnError::temporary("no host to try");
    let smart = env.upstream != "mx";
    // With [bounces], each recipient has its own return path, so each is
    // a transaction of its own (on the same connection).
    let per_rcpt = s.bounces.is_some();
    if let Some(b) = &s.bounces {
        b.note_sent(env);
    }
    let sender_for = |env: &Envelope, i: usize| -> String {
        s.bounces
            .as_ref()
            .and_then(|b| b.return_path(&env.id, i))
            .unwrap_or_else(|| env.mail_from.clone())
    };
    // A connection kept from the previous transaction of this attempt.
    let mut carried: Option<Conn> = None;
    let max_per_conn = s
        .cfg()
        .upstreams
        .get(route)
        .filter(|_| smart)
        .and_then(|u| u.max_messages_per_connection);
    for target in targets {
        let pool_key = format!("{}|{route}/{}:{}", dest.key, target.host, target.port);
        // A pooled connection that turns out dead is replaced by a fresh
        // one at once: that is not the recipients' deferral.
        let mut fresh_only = false;
        loop {
            let reused = match carried.take() {
                Some(c) => Some(c),
                None if fresh_only => None,
                None => {
                    let mut c = s.routes.take(&pool_key);
                    if let Some(conn) = c.as_mut() {
                        if conn.client.rset().await.is_err() {
                            c = None;
                        }
                    }
                    c
                }
            };
            let was_reused = reused.is_some();
            let mut conn = match reused {
                Some(c) => c,
                None => match client::connect(target).await {
                    Ok(c) => c,
                    Err(e) => {
                        if e.class == Class::Route && smart {
                            s.routes.mark_unhealthy(route, e.text());
                        } else {
                            s.routes.note_error(route, e.text());
                        }
                        last_err = e;
                        break;
                    }
                },
            };
            // Cancelled (or suppressed) while we were connecting: leave them out.
            match s.store.envelope(&env.id) {
                Ok(Some(cur)) => {
                    idx.retain(|&i| !cur.rcpts.get(i).is_some_and(|r| r.status.is_final()))
                }
                // Every recipient became final (a cancel) and the message left.
                Ok(None) => idx.clear(),
                Err(_) => {}
            }
            // (Those suppressed meanwhile are marked by the next attempt.)
            screen_suppressed(s, env, &mut idx, route, false);
            if idx.is_empty() {
                s.routes.put(&pool_key, conn);
                return;
            }
            // RFC 6531: a UTF-8 address goes only to a server that offers
            // SMTPUTF8; to any other, it bounces (a policy of the route,
            // never a suppression), rather than go out as a violation.
            if !conn.smtputf8 {
                let utf8_sender = client::needs_smtputf8(&sender_for(env, idx[0]));
                let why = format!(
                    "{}: the address needs SMTPUTF8 (RFC 6531: UTF-8 in {}), which the server does not offer",
                    target.host,
                    if utf8_sender { "the envelope sender" } else { "the recipient address" }
                );
                let v = Verdict::Bounced(why, Class::Policy);
                idx.retain(|&i| {
                    if utf8_sender || client::needs_smtputf8(&env.rcpts[i].addr) {
                        apply(s, env, i, &v, &target.host);
                        false
                    } else {
                        true
                    }
                });
                if idx.is_empty() {
                    s.routes.put(&pool_key, conn);
                    return;
                }
            }
            let chunk: Vec<usize> = if per_rcpt { vec![idx[0]] } else { idx.clone() };
            let rcpts: Vec<String> = chunk.iter().map(|&i| env.rcpts[i].addr.clone()).collect();
            let params = client::MailParams {
                smtputf8: env.smtputf8,
                body_8bit: env.body_8bit,
            };
            let mail_from = sender_for(env, chunk[0]);
            match client::transact(
                &mut conn,
                &target.host,
                smart,
                &mail_from,
                &rcpts,
                body,
                params,
            )
            .await
            {
                Outcome::Judged {
                    verdicts,
                    reusable,
                    slow_down,
                } => {
                    s.routes.mark_healthy(route);
                    if verdicts.iter().any(|v| matches!(v, Verdict::Delivered(_))) && dest.success()
                    {
                        tracing::info!(destination = %dest.key, "destination accepts mail again");
                    }
                    // Only what concerns the session slows the destination.
                    let throttled = slow_down;
                    let until = throttled.as_ref().map(|t| throttle(s, dest, t));
                    for (&i, v) in chunk.iter().zip(verdicts.iter()) {
                        match (v, until) {
                            (Verdict::Deferred(t, c @ Class::Throttle), Some(until)) => {
                                apply_throttled(s, env, i, t, *c, until)
                            }
                            _ => apply(s, env, i, v, &target.host),
                        }
                    }
                    idx.retain(|i| !chunk.contains(i));
                    if per_rcpt {
                        // One transaction per recipient: its outcome is on
                        // disk before the next begins, so a crash resends
                        // at most the one in flight (batched with every
                        // other commit).
                        save(s, env, before);
                        if let Err(e) = s.store.commit().await {
                            tracing::error!(id = %env.id, error = %e, "cannot commit a recipient's outcome");
                        }
                    }
                    conn.sent += 1;
                    let keep = reusable && max_per_conn.is_none_or(|m| conn.sent < m);
                    if idx.is_empty() || until.is_some() {
                        // The destination asked to slow down: the rest wait
                        // for its back-off too.
                        if let (Some(until), Some(t)) = (until, &throttled) {
                            for &i in &idx {
                                apply_throttled(s, env, i, t, Class::Throttle, until);
                            }
                        }
                        if keep {
                            s.routes.put(&pool_key, conn);
                        } else if reusable {
                            quit(conn).await;
                        }
                        return;
                    }
                    // The next recipient's transaction, on this connection
                    // while it lasts.
                    if keep {
                        carried = Some(conn);
                    } else if reusable {
                        quit(conn).await;
                    }
                    fresh_only = false;
                    continue;
                }
                Outcome::RouteRefused(why) => {
                    if smart {
                        s.routes.mark_unhealthy(route, &why);
                    }
                    last_err = ConnError::route(why);
                    break;
                }
                Outcome::Broken(why) if was_reused => {
                    tracing::debug!(host = %target.host, error = %why, "pooled connection was dead; opening a fresh one");
                    fresh_only = true;
                }
                Outcome::Broken(why) => {
                    s.routes.note_error(route, &why);
                    last_err = ConnError::temporary(why);
                    break;
                }
            }
        }
    }
    // A destination that asks to slow down, or a smart host that does not
    // take connections, backs off as a whole.
    if last_err.class == Class::Throttle || (smart && last_err.unreachable) {
        let until = throttle(s, dest, last_err.text());
        for &i in &idx {
            apply_throttled(s, env, i, last_err.text(), last_err.class, until);
        }
        return;
    }
    let v = last_err.verdict();
    for &i in &idx {
        apply(s, env, i, &v, route);
    }
}

/// TLS client configs per upstream, built once at start-up.
pub fn client_tls_configs(
    cfg: &crate::config::Config,
) -> std::io::Result<HashMap<String, Arc<rustls::ClientConfig>>> {
    let mut out = HashMap::new();
    for (name, u) in &cfg.upstreams {
        let c = if u.security == Security::None && u.ca_file.is_none() {
            // Never used for TLS, but keeps the map total.
            crate::tls::client_config(None, false)?
        } else {
            crate::tls::client_config(u.ca_file.as_deref(), u.tls_verify)
                .map_err(|e| std::io::Error::other(format!("upstreams.{name}: {e}")))?
        };
        out.insert(name.clone(), c);
    }
    Ok(out)
}

/// The `suppressed` outcome: recorded, never attempted.
/// Keeps in `idx` only the recipients that may be sent to now: a
/// suppressed one leaves it (and is marked so when `mark`); one whose
/// suppression entry cannot be read is deferred, since sending to an
/// address that may be suppressed is the one thing herald must not do.
fn screen_suppressed(
    s: &Services,
    env: &mut Envelope,
    idx: &mut Vec<usize>,
    host: &str,
    mark: bool,
) {
    idx.retain(|&i| match s.suppression.check(&env.rcpts[i].addr) {
        Ok(None) => true,
        Ok(Some(entry)) => {
            if mark {
                mark_suppressed(s, env, i, &entry);
            }
            false
        }
        Err(e) => {
            let why = Verdict::Deferred(
                format!("not sent: the suppression list cannot be read ({e}); retried when it can"),
                Class::Transient,
            );
            apply(s, env, i, &why, host);
            false
        }
    });
}

pub fn suppressed_detail(e: &crate::suppression::Entry) -> String {
    let mut d = format!("address is suppressed ({}", e.reason);
    if let Some(r) = &e.reply {
        d.push_str(&format!(": {r}"));
    }
    d.push_str("); not attempted. Lift with: herald suppression remove ");
    d.push_str(&e.addr);
    d
}

fn mark_suppressed(s: &Services, env: &mut Envelope, i: usize, e: &crate::suppression::Entry) {
    let detail = suppressed_detail(e);
    let r = &mut env.rcpts[i];
    r.status = RcptStatus::Suppressed;
    r.updated = now_ms();
    r.last_reply = Some(detail.clone());
    tracing::info!(id = %env.id, rcpt = %r.addr, "suppressed");
    let addr = r.addr.clone();
    record(s, env, EventKind::Suppressed, None, &addr, &detail);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(toml: &str) -> crate::config::Delivery {
        let text = format!(
            "hostname = \"h.test\"\n[sender]\ndefault_sender = \"n@example.com\"\n[delivery]\nupstream = \"mx\"\n{toml}"
        );
        crate::config::Config::parse(&text, std::path::Path::new("/tmp/herald.toml"))
            .unwrap()
            .delivery
    }

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

    #[test]
    fn backoff_follows_the_schedule_and_stops_at_max_age() {
        let cfg = delivery("retry_schedule = [\"1m\", \"5m\"]\nmax_age = \"1h\"\n");
        let t0 = 1_000_000;
        let min = 60_000;
        assert_eq!(next_attempt(&cfg, t0, 1, t0), Some(t0 + min));
        assert_eq!(next_attempt(&cfg, t0, 2, t0 + min), Some(t0 + 6 * min));
        // The last value repeats.
        assert_eq!(
            next_attempt(&cfg, t0, 9, t0 + 10 * min),
            Some(t0 + 15 * min)
        );
        // Never past max_age: the last retry is at the deadline itself.
        assert_eq!(
            next_attempt(&cfg, t0, 9, t0 + 58 * min),
            Some(t0 + 60 * min)
        );
        // At or after the deadline: expired.
        assert_eq!(next_attempt(&cfg, t0, 9, t0 + 60 * min), None);
        // Due before the deadline but reached after it: stale; the retry
        // scheduled at the deadline is not.
        let expires = t0 + 60 * min;
        assert!(is_stale(expires + 1, expires, expires - 1));
        assert!(!is_stale(expires, expires, expires));
        assert!(!is_stale(expires - 1, expires, expires - 5));
    }

    fn rcpt(addr: &str, status: RcptStatus, attempts: u32) -> Rcpt {
        Rcpt {
            addr: addr.into(),
            status,
            attempts,
            ..Default::default()
        }
    }

    #[test]
    fn write_back_keeps_what_others_changed_meanwhile() {
        let before = vec![
            rcpt("a", RcptStatus::Deferred, 1),
            rcpt("b", RcptStatus::Deferred, 1),
            rcpt("c", RcptStatus::Queued, 0),
            rcpt("d", RcptStatus::Queued, 0),
        ];
        // The attempt handled a, b and d (c was not due).
        let mut new = before.clone();
        new[0] = rcpt("a", RcptStatus::Deferred, 2);
        new[1] = rcpt("b", RcptStatus::Delivered, 2);
        new[3] = rcpt("d", RcptStatus::Deferred, 1);
        // Meanwhile: a retry made c due now, a cancel hit b and d.
        let mut cur = before.clone();
        cur[2].next_attempt = 42;
        cur[1].status = RcptStatus::Cancelled;
        cur[3].status = RcptStatus::Cancelled;
        merge(&mut cur, &new, &before);
        assert_eq!(cur[0], new[0], "handled: written");
        assert_eq!(
            cur[1].status,
            RcptStatus::Delivered,
            "delivered wins over a late cancel"
        );
        assert_eq!(cur[2].next_attempt, 42, "not handled: the retry is kept");
        assert_eq!(
            cur[3].status,
            RcptStatus::Cancelled,
            "a cancel is not undone"
        );
    }
}
