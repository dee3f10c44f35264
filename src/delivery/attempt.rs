//! One delivery attempt: the due recipients of one message, grouped by
//! destination, each group taken through its hosts until one judges them;
//! every outcome goes to the ledger.

use std::collections::HashMap;
use std::time::Duration;

use super::client::{self, Conn, ConnError, Outcome, Target, Verdict};
use super::mx;
use super::pool::{quit, Pool};
use crate::live::Live;
use crate::reply::Class;
use crate::state::ledger::{Change, Ledger};
use crate::state::pacing;
use crate::state::spool::{now_ms, Envelope, Rcpt};
use crate::state::Services;

/// Builds the connection target for a named upstream.
fn upstream_target(live: &Live, name: &str) -> Result<Target, String> {
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

/// The recipients of `env` due now. Past max_age (after a long pause,
/// say) a stale notification is worse than none: one that was due before
/// the deadline and is only now reached expires instead of going out late
/// (the last retry is scheduled at the deadline itself, and still runs).
fn due_now(l: &Ledger, env: &mut Envelope, max_age: Duration) -> Vec<usize> {
    let now = now_ms();
    let expires = env.received_at + max_age.as_millis() as u64;
    let mut due = Vec::new();
    for i in 0..env.rcpts.len() {
        let r = &env.rcpts[i];
        if r.status.is_final() || r.next_attempt > now + 1000 {
            continue;
        }
        if !is_stale(now, expires, r.next_attempt) {
            due.push(i);
            continue;
        }
        let last = r
            .last_reply
            .clone()
            .unwrap_or_else(|| "none (never attempted)".into());
        let class = r.class.unwrap_or(Class::Transient);
        judged(l, env, i, &Verdict::Deferred(last, class), "-");
    }
    due
}

/// Whether a recipient due at `next` and reached only at `now` is stale: it
/// was due before the deadline but the deadline has passed (a long pause).
fn is_stale(now: u64, expires: u64, next: u64) -> bool {
    now >= expires && next < expires
}

/// Where a group of recipients can go, or why it cannot go anywhere now.
type Targets = Result<Vec<Target>, Verdict>;

/// One delivery attempt for the due recipients of one message.
pub async fn attempt(s: &Services, pool: &Pool, id: &str, pass: Option<pacing::Pass>) {
    let mut pass = pass;
    // One configuration for the whole attempt.
    let live = s.live();
    let l = s.ledger_for(live.cfg.clone());
    // An earlier outcome is not on disk yet: write it first, or wait.
    if !l.write_unsaved(id) {
        return;
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
                if !env.rcpts[i].status.is_final() {
                    l.apply(&mut env, i, Change::Expired { why });
                }
            }
            l.save(&env, &before);
            return;
        }
    };
    let before = env.rcpts.clone();
    let mut due = due_now(&l, &mut env, live.cfg.delivery.max_age);
    // Suppressed since it was queued: never attempted.
    screen_suppressed(s, &l, &mut env, &mut due, "-", true);
    if due.is_empty() {
        l.save(&env, &before);
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
            g.push((mx::targets(s, &live, &domain).await, idx));
        }
        g
    } else {
        let t = upstream_target(&live, &env.upstream)
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
                    judged(&l, &mut env, i, &v, &route);
                }
                l.save(&env, &before);
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
                    s.pacing.shaper.mx_site(&live.cfg, &hosts)
                } else {
                    s.pacing.shaper.upstream(&live.cfg, &route)
                };
                if let Some(until) = dest.throttled_until(now_ms()) {
                    let why = dest.report()["last_reply"]
                        .as_str()
                        .unwrap_or("throttled")
                        .to_string();
                    for &i in &idx {
                        l.apply(
                            &mut env,
                            i,
                            Change::Throttled {
                                reply: &why,
                                class: Class::Throttle,
                                until,
                            },
                        );
                    }
                    l.save(&env, &before);
                    continue;
                }
                dest.pass().await
            }
        };
        let group = Group {
            route: &route,
            targets: &targets,
            dest: &pass.dest,
        };
        deliver_group(s, &l, pool, &mut env, &before, &body, group, &idx).await;
        drop(pass);
        // Saved after each destination: a crash later in this attempt must
        // not resend groups already delivered.
        l.save(&env, &before);
    }
}

/// The destination backs off; returns when its back-off ends.
fn throttle(l: &Ledger, dest: &pacing::Dest, reply: &str) -> u64 {
    let cfg = &l.config().delivery;
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

/// Where a group of recipients goes: its route, the hosts to try in
/// order, and the destination whose limits it counts against.
struct Group<'a> {
    route: &'a str,
    targets: &'a [Target],
    dest: &'a pacing::Dest,
}

/// Tries the targets in order until one judges the recipients.
#[allow(clippy::too_many_arguments)]
async fn deliver_group(
    s: &Services,
    l: &Ledger<'_>,
    pool: &Pool,
    env: &mut Envelope,
    before: &[Rcpt],
    body: &[u8],
    group: Group<'_>,
    idx: &[usize],
) {
    let Group {
        route,
        targets,
        dest,
    } = group;
    let mut idx = idx.to_vec();
    let mut last_err = ConnError::temporary("no host to try");
    let smart = env.upstream != "mx";
    // With [bounces], each recipient has its own return path, so each is
    // a transaction of its own (on the same connection).
    let per_rcpt = s.bounces.as_ref().inspect(|b| b.note_sent(env)).is_some();
    let sender_for = |env: &Envelope, i: usize| -> String {
        s.bounces
            .as_ref()
            .and_then(|b| b.return_path(&env.id, i))
            .unwrap_or_else(|| env.mail_from.clone())
    };
    // A connection kept from the previous transaction of this attempt.
    let mut carried: Option<Conn> = None;
    let max_per_conn = l
        .config()
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
                // No RSET first: a completed transaction leaves it clean
                // (the pool gives only sessions the server has not closed).
                None => pool.take(&pool_key),
            };
            let was_reused = reused.is_some();
            let mut conn = match reused {
                Some(c) => c,
                None => match client::connect(target).await {
                    Ok(c) => c,
                    Err(e) => {
                        if e.class == Class::Route && smart {
                            s.pacing.mark_unhealthy(route, e.text());
                        } else {
                            s.pacing.note_error(route, e.text());
                        }
                        last_err = e;
                        break;
                    }
                },
            };
            still_due(s, l, env, &mut idx, route);
            if !conn.smtputf8 {
                let utf8_sender =
                    client::needs_smtputf8(&sender_for(env, idx.first().copied().unwrap_or(0)));
                refuse_utf8(l, env, &mut idx, utf8_sender, &target.host);
            }
            if idx.is_empty() {
                pool.put(&pool_key, conn);
                return;
            }
            let chunk: Vec<usize> = if per_rcpt { vec![idx[0]] } else { idx.clone() };
            let rcpts: Vec<String> = chunk.iter().map(|&i| env.rcpts[i].addr.clone()).collect();
            let params = client::MailParams {
                smtputf8: env.smtputf8,
                body_8bit: env.body_8bit,
            };
            let from = sender_for(env, chunk[0]);
            let host = &target.host;
            match client::transact(&mut conn, host, smart, &from, &rcpts, body, params).await {
                Outcome::Judged {
                    verdicts,
                    reusable,
                    slow_down,
                } => {
                    s.pacing.mark_healthy(route);
                    let throttled = slow_down;
                    let until = record_verdicts(
                        l,
                        env,
                        &chunk,
                        &verdicts,
                        dest,
                        throttled.as_deref(),
                        &target.host,
                    );
                    idx.retain(|i| !chunk.contains(i));
                    if per_rcpt {
                        commit_one(s, l, env, before).await;
                    }
                    conn.sent += 1;
                    let keep = reusable && max_per_conn.is_none_or(|m| conn.sent < m);
                    if idx.is_empty() || until.is_some() {
                        // The destination asked to slow down: the rest wait
                        // for its back-off too.
                        if let (Some(until), Some(t)) = (until, &throttled) {
                            hold(l, env, &idx, t, Class::Throttle, until);
                        }
                        if keep {
                            pool.put(&pool_key, conn);
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
                        s.pacing.mark_unhealthy(route, &why);
                    }
                    last_err = ConnError::route(why);
                    break;
                }
                Outcome::Broken(why) if was_reused => {
                    tracing::debug!(host = %target.host, error = %why, "pooled connection was dead; opening a fresh one");
                    fresh_only = true;
                }
                Outcome::Broken(why) => {
                    s.pacing.note_error(route, &why);
                    last_err = ConnError::temporary(why);
                    break;
                }
            }
        }
    }
    no_host_took(l, env, &idx, dest, route, smart, last_err);
}

/// Records the verdicts of one transaction for the recipients of
/// `chunk`; returns the end of the destination's back-off when the session
/// asked to slow down (`throttled`: only what concerns the session slows
/// the destination).
#[allow(clippy::too_many_arguments)]
fn record_verdicts(
    l: &Ledger,
    env: &mut Envelope,
    chunk: &[usize],
    verdicts: &[Verdict],
    dest: &pacing::Dest,
    throttled: Option<&str>,
    host: &str,
) -> Option<u64> {
    if verdicts.iter().any(|v| matches!(v, Verdict::Delivered(_))) && dest.success() {
        tracing::info!(destination = %dest.key, "destination accepts mail again");
    }
    let until = throttled.map(|t| throttle(l, dest, t));
    for (&i, v) in chunk.iter().zip(verdicts.iter()) {
        match (v, until) {
            (Verdict::Deferred(t, c @ Class::Throttle), Some(until)) => {
                hold(l, env, &[i], t, *c, until)
            }
            _ => judged(l, env, i, v, host),
        }
    }
    until
}

/// No host of the group judged the recipients left in `idx`: `last_err`
/// is their outcome.
#[allow(clippy::too_many_arguments)]
fn no_host_took(
    l: &Ledger,
    env: &mut Envelope,
    idx: &[usize],
    dest: &pacing::Dest,
    route: &str,
    smart: bool,
    last_err: ConnError,
) {
    // A destination that asks to slow down, or a smart host that does not
    // take connections, backs off as a whole.
    if last_err.class == Class::Throttle || (smart && last_err.unreachable) {
        let until = throttle(l, dest, last_err.text());
        hold(l, env, idx, last_err.text(), last_err.class, until);
        return;
    }
    let v = last_err.verdict();
    for &i in idx {
        judged(l, env, i, &v, route);
    }
}

/// With [bounces], one transaction per recipient: its outcome is on disk
/// before the next begins, so a crash resends at most the one in flight
/// (batched with every other commit).
async fn commit_one(s: &Services, l: &Ledger<'_>, env: &Envelope, before: &[Rcpt]) {
    l.save(env, before);
    if let Err(e) = s.store.commit().await {
        tracing::error!(id = %env.id, error = %e, "cannot commit a recipient's outcome");
    }
}

/// Leaves out of `idx` the recipients cancelled (or suppressed) while the
/// connection was made. Those suppressed meanwhile are marked by the next
/// attempt.
fn still_due(s: &Services, l: &Ledger, env: &mut Envelope, idx: &mut Vec<usize>, route: &str) {
    match s.store.envelope(&env.id) {
        Ok(Some(cur)) => idx.retain(|&i| !cur.rcpts.get(i).is_some_and(|r| r.status.is_final())),
        // Every recipient became final (a cancel) and the message left.
        Ok(None) => idx.clear(),
        Err(_) => {}
    }
    screen_suppressed(s, l, env, idx, route, false);
}

/// RFC 6531: a UTF-8 address goes only to a server that offers SMTPUTF8;
/// to any other (this one), it bounces (a policy of the route, never a
/// suppression), rather than go out as a violation.
fn refuse_utf8(
    l: &Ledger,
    env: &mut Envelope,
    idx: &mut Vec<usize>,
    utf8_sender: bool,
    host: &str,
) {
    let why = format!(
        "{host}: the address needs SMTPUTF8 (RFC 6531: UTF-8 in {}), which the server does not offer",
        if utf8_sender { "the envelope sender" } else { "the recipient address" }
    );
    let v = Verdict::Bounced(why, Class::Policy);
    idx.retain(|&i| {
        if utf8_sender || client::needs_smtputf8(&env.rcpts[i].addr) {
            judged(l, env, i, &v, host);
            false
        } else {
            true
        }
    });
}

/// The recipients of `idx` wait for their destination's back-off.
fn hold(l: &Ledger, env: &mut Envelope, idx: &[usize], reply: &str, class: Class, until: u64) {
    for &i in idx {
        l.apply(
            env,
            i,
            Change::Throttled {
                reply,
                class,
                until,
            },
        );
    }
}

/// The `suppressed` outcome: recorded, never attempted.
/// Keeps in `idx` only the recipients that may be sent to now: a
/// suppressed one leaves it (and is marked so when `mark`); one whose
/// suppression entry cannot be read is deferred, since sending to an
/// address that may be suppressed is the one thing herald must not do.
fn screen_suppressed(
    s: &Services,
    l: &Ledger,
    env: &mut Envelope,
    idx: &mut Vec<usize>,
    host: &str,
    mark: bool,
) {
    idx.retain(|&i| {
        match s
            .suppression
            .check(&env.rcpts[i].addr, env.tenant.as_deref())
        {
            Ok(None) => true,
            Ok(Some(entry)) => {
                if mark {
                    l.apply(env, i, Change::Suppressed(&entry));
                }
                false
            }
            Err(e) => {
                let reply = format!(
                    "not sent: the suppression list cannot be read ({e}); retried when it can"
                );
                let class = Class::Transient;
                l.apply(
                    env,
                    i,
                    Change::Deferred {
                        reply: &reply,
                        class,
                        host,
                    },
                );
                false
            }
        }
    });
}

/// A recipient's verdict from the next hop, on the ledger.
fn judged(l: &Ledger, env: &mut Envelope, i: usize, v: &Verdict, host: &str) {
    let change = match v {
        Verdict::Delivered(reply) => Change::Delivered { reply, host },
        Verdict::Bounced(reply, class) => Change::Bounced {
            reply,
            class: *class,
            host,
        },
        Verdict::Deferred(reply, class) => Change::Deferred {
            reply,
            class: *class,
            host,
        },
    };
    l.apply(env, i, change);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_reached_after_its_deadline_is_stale() {
        let (t0, min) = (1_000_000, 60_000);
        // Due before the deadline but reached after it: stale; the retry
        // scheduled at the deadline is not.
        let expires = t0 + 60 * min;
        assert!(is_stale(expires + 1, expires, expires - 1));
        assert!(!is_stale(expires, expires, expires));
        assert!(!is_stale(expires - 1, expires, expires - 5));
    }
}
