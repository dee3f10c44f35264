//! The ledger: the only code that changes a recipient's state.
//!
//! Reception, delivery, the bounce intake, the pixel server and the
//! operator's commands say what happened (a [`Change`]); the ledger writes
//! the recipient's new status, its event (and with it the webhook outbox
//! entries: `History` writes both in one step), and the suppression that
//! follows from it, by class, in one place:
//!
//! - a `hard` bounce (a reply at RCPT or a report that came back) counts
//!   toward `delivery.suppress_after_bounces`; a delivery resets the count;
//! - a complaint suppresses the address at once;
//! - nothing else suppresses anybody.
//!
//! Delivery changes an envelope in memory for the whole attempt and writes
//! it back with [`Ledger::save`] (only the recipients it changed); a write
//! that fails is kept in memory and written before the message is tried
//! again, so a delivered recipient is never sent twice because the disk
//! was full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{format_duration, Config};
use crate::reply::Class;
use crate::state::history::{Event, EventKind, Extra, History};
use crate::state::spool::{now_ms, Envelope, QueueError, Rcpt, RcptStatus, Store};
use crate::state::suppression::{Entry, Suppression};

/// What happened to one recipient.
pub enum Change<'a> {
    /// The next hop took it.
    Delivered { reply: &'a str, host: &'a str },
    /// Refused for good (at RCPT or after DATA).
    Bounced {
        reply: &'a str,
        class: Class,
        host: &'a str,
    },
    /// Not this time: retried on the schedule, or expired past `max_age`.
    Deferred {
        reply: &'a str,
        class: Class,
        host: &'a str,
    },
    /// Held back because its destination asked herald to slow down:
    /// deferred until `until` without spending a retry.
    Throttled {
        reply: &'a str,
        class: Class,
        until: u64,
    },
    /// Nothing can ever be sent (the body is gone): final.
    Expired { why: &'a str },
    /// The address is on the suppression list: never attempted.
    Suppressed(&'a Entry),
}

/// A report that came back about a recipient (the bounce intake).
pub struct Reported<'a> {
    pub id: &'a str,
    pub rcpt: &'a str,
    pub tag: Option<&'a str>,
    pub subject: Option<&'a str>,
    /// The tenant whose mail it was: a complaint suppresses for it only.
    pub tenant: Option<&'a str>,
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

/// Opens of one message within this window count once.
const OPEN_WINDOW: Duration = Duration::from_secs(600);

/// The messages whose pixel was fetched lately: a mail client that loads
/// it again (or a proxy that prefetches it) makes one `opened` event.
#[derive(Default)]
pub struct Opens(Mutex<HashMap<String, std::time::Instant>>);

impl Opens {
    /// Whether an open of `id` now is new (not within `OPEN_WINDOW` of the
    /// last one counted).
    pub fn first(&self, id: &str) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, t| t.elapsed() < OPEN_WINDOW);
        }
        match seen.get(id) {
            Some(t) if t.elapsed() < OPEN_WINDOW => false,
            _ => {
                seen.insert(id.to_string(), std::time::Instant::now());
                true
            }
        }
    }
}

/// The ledger with the configuration of one transaction, attempt or
/// request (`Services::ledger`).
pub struct Ledger<'a> {
    pub(super) store: &'a Store,
    pub(super) history: &'a History,
    pub(super) suppression: &'a Suppression,
    pub(super) unsaved: &'a Unsaved,
    pub(super) cfg: Arc<Config>,
}

impl Ledger<'_> {
    /// The configuration this ledger (and the work that holds it) sees.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Applies `change` to recipient `i` of `env` (in memory: [`save`]
    /// writes it), records its event and the suppression it implies.
    ///
    /// [`save`]: Ledger::save
    pub fn apply(&self, env: &mut Envelope, i: usize, change: Change) {
        let now = now_ms();
        let d = &self.cfg.delivery;
        let expires = env.received_at + d.max_age.as_millis() as u64;
        let r = &mut env.rcpts[i];
        r.updated = now;
        let (kind, text, class) = match change {
            Change::Delivered { reply, host } => {
                r.last_host = Some(host.to_string());
                r.status = RcptStatus::Delivered;
                r.class = None;
                if let Err(e) = self.suppression.note_delivered(&r.addr) {
                    tracing::error!(error = %e, "cannot update bounce counts");
                }
                (EventKind::Delivered, reply.to_string(), None)
            }
            Change::Bounced { reply, class, host } => {
                r.last_host = Some(host.to_string());
                r.attempts += 1;
                r.status = RcptStatus::Bounced;
                r.class = Some(class);
                if class.suppresses() {
                    self.hard_bounce(&r.addr, reply, &env.id);
                }
                let text = format!("{reply} ({class}: {})", class.meaning());
                (EventKind::Bounced, text, Some(class))
            }
            Change::Deferred { reply, class, host } => {
                r.last_host = Some(host.to_string());
                r.attempts += 1;
                r.class = Some(class);
                match next_attempt(d, env.received_at, r.attempts, now) {
                    Some(next) => {
                        r.status = RcptStatus::Deferred;
                        r.next_attempt = next;
                        let text = format!(
                            "{reply} (deferred, {class}; attempt {}, next in {})",
                            r.attempts,
                            format_duration(Duration::from_secs((next - now) / 1000))
                        );
                        (EventKind::Deferred, text, Some(class))
                    }
                    None => {
                        r.status = RcptStatus::Expired;
                        (EventKind::Expired, gave_up(d, reply), Some(class))
                    }
                }
            }
            Change::Throttled {
                reply,
                class,
                until,
            } => {
                r.class = Some(class);
                if now >= expires {
                    r.status = RcptStatus::Expired;
                    (EventKind::Expired, gave_up(d, reply), Some(class))
                } else {
                    r.status = RcptStatus::Deferred;
                    r.next_attempt = until.min(expires);
                    let text = format!(
                        "destination throttled: {reply}; next try in {}",
                        format_duration(Duration::from_secs(
                            r.next_attempt.saturating_sub(now).div_ceil(1000)
                        ))
                    );
                    // One log line per destination (when it starts backing
                    // off, by the caller), not one per message.
                    tracing::debug!(id = %env.id, rcpt = %r.addr, reply = %text, "deferred");
                    r.last_reply = Some(text.clone());
                    let addr = r.addr.clone();
                    self.record_for(env, EventKind::Deferred, Some(class), &addr, &text);
                    return;
                }
            }
            Change::Expired { why } => {
                r.status = RcptStatus::Expired;
                (EventKind::Expired, why.to_string(), None)
            }
            Change::Suppressed(e) => {
                let detail = suppressed_detail(e);
                r.status = RcptStatus::Suppressed;
                r.last_reply = Some(detail.clone());
                tracing::info!(id = %env.id, rcpt = %r.addr, "suppressed");
                let addr = r.addr.clone();
                self.record_for(env, EventKind::Suppressed, None, &addr, &detail);
                return;
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
        self.record_for(env, kind, class, &addr, &text);
    }

    /// Writes an attempt's results back: only the recipients this attempt
    /// changed (those equal to `before` keep what others wrote meanwhile, a
    /// `retry` say). A recipient cancelled or suppressed while the attempt
    /// ran keeps that state, unless the attempt delivered it (then the
    /// record says what really happened).
    pub fn save(&self, env: &Envelope, before: &[Rcpt]) {
        let res = self
            .store
            .update(&env.id, |cur| merge(&mut cur.rcpts, &env.rcpts, before));
        if let Err(e) = res {
            // Kept in memory and written before the next attempt: the
            // message is not sent again until its outcome is on record.
            tracing::error!(id = %env.id, error = %e, "cannot update the queue; the outcome is kept and written once storage works");
            self.unsaved.keep(env, before);
        }
    }

    /// Writes what an earlier attempt could not; false while the storage
    /// still fails (the message must not be attempted).
    pub fn write_unsaved(&self, id: &str) -> bool {
        if let Some((env, before)) = self.unsaved.take(id) {
            self.save(&env, &before);
            if self.unsaved.contains(id) {
                return false;
            }
            tracing::info!(%id, "outcome of an earlier attempt written");
        }
        true
    }

    /// A new message: marks the recipients on the suppression list (an
    /// entry that cannot be read leaves the recipient queued: delivery
    /// screens it again and defers it), stores the message unless nothing
    /// is left to send, and records `received` (and `suppressed`) for each
    /// recipient. The caller commits.
    pub fn receive(&self, env: &mut Envelope, body: &[u8], detail: &str) -> Result<(), QueueError> {
        let mut suppressed = Vec::new();
        for r in env.rcpts.iter_mut() {
            if let Ok(Some(e)) = self.suppression.check(&r.addr, env.tenant.as_deref()) {
                r.status = RcptStatus::Suppressed;
                r.last_reply = Some(suppressed_detail(&e));
                suppressed.push(r.addr.clone());
            }
        }
        if !env.is_done() {
            self.store.insert(env, body)?;
        }
        for r in &env.rcpts {
            self.event(EventKind::Received, env, &r.addr, detail, Extra::default())?;
            if r.status == RcptStatus::Suppressed {
                let why = r.last_reply.as_deref().unwrap_or("");
                self.event(EventKind::Suppressed, env, &r.addr, why, Extra::default())?;
            }
        }
        for r in &suppressed {
            tracing::info!(id = %env.id, rcpt = %r, "suppressed");
        }
        Ok(())
    }

    /// A refusal at reception (no queue id): `rejected`.
    pub fn rejected(&self, rcpt: &str, detail: &str) -> Result<(), QueueError> {
        self.history
            .record_with(
                EventKind::Rejected,
                "-",
                rcpt,
                detail,
                None,
                None,
                Extra::default(),
            )
            .map(|_| ())
    }

    /// Cancels the recipients of message `id` still pending (`herald
    /// cancel`); returns those cancelled, each with its `cancelled` event.
    pub fn cancel(&self, id: &str, why: &str) -> Result<Vec<String>, QueueError> {
        let mut newly = Vec::new();
        let env = self.store.update(id, |env| {
            for r in env.rcpts.iter_mut() {
                if !r.status.is_final() {
                    r.status = RcptStatus::Cancelled;
                    r.updated = now_ms();
                    r.last_reply = Some(format!("cancelled by operator{why}"));
                    newly.push(r.addr.clone());
                }
            }
        })?;
        let Some(env) = env else { return Ok(vec![]) };
        let detail = format!("cancelled by operator before delivery{why}");
        for rcpt in &newly {
            self.event(EventKind::Cancelled, &env, rcpt, &detail, Extra::default())?;
            tracing::info!(%id, %rcpt, "cancelled");
        }
        Ok(newly)
    }

    /// `herald retry`: the deferred recipients of `id` are due now.
    /// Returns how many, with the message as it is now (None: not queued).
    pub fn retry_now(&self, id: &str) -> Result<Option<(usize, Envelope)>, QueueError> {
        let mut made_due = 0;
        let now = now_ms();
        let env = self.store.update(id, |env| {
            for r in env.rcpts.iter_mut() {
                if r.status == RcptStatus::Deferred {
                    r.next_attempt = now;
                    made_due += 1;
                }
            }
        })?;
        Ok(env.map(|e| (made_due, e)))
    }

    /// An attempt that failed unexpectedly (a panic): its pending
    /// recipients are not tried before `at`, so the same fault does not
    /// spin.
    pub fn postpone(&self, id: &str, at: u64) {
        let res = self.store.update(id, |env| {
            for r in env.rcpts.iter_mut().filter(|r| !r.status.is_final()) {
                r.next_attempt = r.next_attempt.max(at);
            }
        });
        if let Err(e) = res {
            tracing::error!(%id, error = %e, "cannot postpone a message");
        }
    }

    /// A remote server reported that recipient `a` bounced after all
    /// (`suppress`: the report says the address is bad). Still queued and
    /// not final (a report from an earlier hop while herald retries): it
    /// is final now.
    pub fn reported_bounce(
        &self,
        a: &Reported,
        class: Class,
        line: &str,
        detail: &str,
        suppress: bool,
        extra: Extra,
    ) {
        let updated = self.store.update(a.id, |env| {
            if let Some(r) = env.rcpts.iter_mut().find(|r| r.addr == a.rcpt) {
                if !r.status.is_final() {
                    r.status = RcptStatus::Bounced;
                    r.class = Some(class);
                    r.last_reply = Some(detail.to_string());
                    r.updated = now_ms();
                }
            }
        });
        if let Err(e) = updated {
            tracing::error!(id = %a.id, error = %e, "cannot mark a reported bounce in the queue");
        }
        if suppress {
            self.hard_bounce(a.rcpt, line, a.id);
        }
        self.report_event(a, EventKind::Bounced, detail, extra);
    }

    /// Another node of the cluster took a report of a bounce for message
    /// `ev.id` (its event `ev`, already in the history): if this node
    /// still holds the recipient, it is final here too. No second event.
    pub fn bounced_elsewhere(&self, ev: &Event) {
        let mut changed = false;
        let updated = self.store.update(&ev.id, |env| {
            if let Some(r) = env.rcpts.iter_mut().find(|r| r.addr == ev.rcpt) {
                if !r.status.is_final() {
                    r.status = RcptStatus::Bounced;
                    r.class = ev.class;
                    r.last_reply = Some(ev.detail.clone());
                    r.updated = now_ms();
                    changed = true;
                }
            }
        });
        match updated {
            Err(e) => {
                tracing::error!(id = %ev.id, error = %e, "cannot mark a bounce reported on another node")
            }
            Ok(Some(_)) if changed => {
                tracing::info!(id = %ev.id, rcpt = %ev.rcpt, "a bounce reported on another node ends this recipient here")
            }
            Ok(_) => {}
        }
    }

    /// A remote server reported a delay.
    pub fn reported_delay(&self, a: &Reported, detail: &str, extra: Extra) {
        self.report_event(a, EventKind::Delayed, detail, extra);
    }

    /// The recipient marked the message as spam: suppressed at once, for
    /// the tenant whose mail it was (a judgement of that sender, not a
    /// fact about the address); for everyone when it was the platform's.
    pub fn complained(&self, a: &Reported, detail: &str, extra: Extra) {
        let entry = Entry {
            addr: a.rcpt.to_lowercase(),
            reason: "complaint".into(),
            reply: Some(detail.to_string()),
            source_id: Some(a.id.to_string()),
            added_ms: now_ms(),
            expires_ms: None,
            automatic: true,
            tenant: a.tenant.map(str::to_string),
            ..Default::default()
        };
        if let Err(e) = self.suppression.put(&entry) {
            tracing::error!(error = %e, "cannot update the suppression list");
        } else {
            tracing::warn!(rcpt = %a.rcpt, "address suppressed after a complaint (herald suppression remove to lift)");
        }
        self.report_event(a, EventKind::Complained, detail, extra);
    }

    /// A DMARC aggregate report says herald's own mail failed for a
    /// domain (`report`: the intake's report id).
    pub fn dmarc_failing(&self, report: &str, detail: &str) {
        let extra = Extra {
            report: Some(report.to_string()),
            ..Default::default()
        };
        tracing::warn!(report, "{detail}");
        if let Err(e) =
            self.history
                .record_with(EventKind::DmarcFailing, "-", "", detail, None, None, extra)
        {
            tracing::error!(error = %e, "cannot record history");
        }
    }

    /// The tracking pixel of message `e.id` was fetched: `opened` for the
    /// recipient of its `received` event `e`.
    pub fn opened(&self, e: &Event, detail: &str, user_agent: &str) {
        let extra = Extra {
            user_agent: Some(user_agent.to_string()),
            tenant: e.tenant.clone(),
            ..Default::default()
        };
        let (tag, subject) = (e.tag.as_deref(), e.subject.as_deref());
        if let Err(err) = self.history.record_with(
            EventKind::Opened,
            &e.id,
            &e.rcpt,
            detail,
            tag,
            subject,
            extra,
        ) {
            tracing::error!(error = %err, "cannot record history");
        }
    }

    fn report_event(&self, a: &Reported, kind: EventKind, detail: &str, extra: Extra) {
        let extra = Extra {
            tenant: a.tenant.map(str::to_string),
            ..extra
        };
        if let Err(e) = self
            .history
            .record_with(kind, a.id, a.rcpt, detail, a.tag, a.subject, extra)
        {
            tracing::error!(error = %e, "cannot record history");
        }
    }

    /// Counts a hard bounce of `addr` toward `suppress_after_bounces`;
    /// logs the suppression it causes.
    fn hard_bounce(&self, addr: &str, reply: &str, id: &str) {
        let d = &self.cfg.delivery;
        match self.suppression.note_bounce(
            addr,
            reply,
            id,
            d.suppress_after_bounces,
            d.suppression_expiry,
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

    fn event(
        &self,
        kind: EventKind,
        env: &Envelope,
        rcpt: &str,
        detail: &str,
        extra: Extra,
    ) -> Result<Event, QueueError> {
        let (tag, subject) = (env.tag.as_deref(), env.subject.as_deref());
        let extra = Extra {
            tenant: env.tenant.clone(),
            ..extra
        };
        self.history
            .record_with(kind, &env.id, rcpt, detail, tag, subject, extra)
    }

    /// Records an event for a recipient of `env` with what the recipient
    /// carries. A history failure is logged, never allowed to stop
    /// delivery.
    fn record_for(
        &self,
        env: &Envelope,
        kind: EventKind,
        class: Option<Class>,
        rcpt: &str,
        detail: &str,
    ) {
        let r = env.rcpts.iter().find(|r| r.addr == rcpt);
        let extra = Extra {
            class,
            attempts: r.map(|r| r.attempts),
            upstream: r.and_then(|r| r.last_host.clone()).filter(|h| h != "-"),
            ..Default::default()
        };
        if let Err(e) = self.event(kind, env, rcpt, detail, extra) {
            tracing::error!(error = %e, "cannot record history");
        }
    }
}

fn gave_up(d: &crate::config::Delivery, reply: &str) -> String {
    format!(
        "gave up after {} (delivery.max_age); last reply: {reply}",
        format_duration(d.max_age)
    )
}

/// What `suppressed` says of an address on the list.
pub fn suppressed_detail(e: &Entry) -> String {
    let mut d = format!("address is suppressed ({}", e.reason);
    if let Some(r) = &e.reply {
        d.push_str(&format!(": {r}"));
    }
    if let Some(t) = &e.tenant {
        d.push_str(&format!(", for tenant {t}'s mail only"));
    }
    d.push_str("); not attempted. Lift with: herald suppression remove ");
    d.push_str(&e.addr);
    if let Some(t) = &e.tenant {
        d.push_str(&format!(" --tenant {t}"));
    }
    d
}

/// The write-back rule of [`Ledger::save`]: `new` is what the attempt made
/// of `before`; `cur` is what is stored now.
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
