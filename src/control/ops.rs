//! What each control request does. Answers are JSON objects; the CLI
//! renders them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

pub use super::failure::Failure;
use super::{Request, Scope};
use crate::reply::Class;
use crate::state::history::{By, Event, EventKind};
use crate::state::spool::{now_ms, Envelope};
use crate::state::suppression::Entry;
use crate::state::Services;

pub fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

fn ok(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), Value::Bool(true));
    }
    v
}

pub async fn handle(s: &Services, req: Request) -> Value {
    match answer(s, req).await {
        Ok(v) => ok(v),
        Err(e) => error(e.to_string()),
    }
}

/// A queue or report id from a client, checked before any lookup (it is
/// never joined to a path, nor even looked up, unless herald could have
/// made it).
fn id_arg(id: &str) -> Result<String, String> {
    crate::state::spool::parse_id(id).ok_or_else(|| {
        let shown: String = id.chars().take(64).collect();
        format!("id: {shown:?} is not a queue or report id (12 characters, such as 01JH5Z8Q3M7K)")
    })
}

fn opt_id(id: Option<String>) -> Result<Option<String>, String> {
    id.as_deref().map(id_arg).transpose()
}

/// One operation, for the control socket and the HTTP API alike, asked
/// by the platform's staff.
pub async fn answer(s: &Services, req: Request) -> Answer {
    answer_as(s, &Scope::default(), req).await
}

/// What a tenant's token may not ask at all.
fn staff_only(what: &str) -> Failure {
    Failure::Forbidden(format!(
        "{what}: for the platform's staff; this token is scoped to one tenant"
    ))
}

/// The tenant of a suppression request: a scoped token's own, whatever
/// it asks; the staff's choice, which must be a tenant of the config.
fn scope_tenant(
    s: &Services,
    scope: &Scope,
    asked: Option<String>,
) -> Result<Option<String>, Failure> {
    match (&scope.tenant, asked) {
        (Some(own), Some(a)) if *own != a => Err(staff_only("another tenant's suppressions")),
        (Some(own), _) => Ok(Some(own.clone())),
        (None, Some(a)) if s.cfg().tenant(&a).is_none() => Err(Failure::Invalid(format!(
            "tenant: no tenant {a:?} in [[tenants]]"
        ))),
        (None, a) => Ok(a),
    }
}

/// `route` may be paused, resumed or cancelled by `scope`: the staff any,
/// a tenant only an upstream that carries its mail alone.
fn route_allowed(s: &Services, scope: &Scope, route: &str) -> Result<(), Failure> {
    match &scope.tenant {
        Some(t) if !s.cfg().tenant_upstreams(t).iter().any(|u| u == route) => Err(
            Failure::Forbidden(format!("route {route:?}: not a route of tenant {t} alone")),
        ),
        _ => Ok(()),
    }
}

/// One operation as `scope` may ask it: a read-only token changes
/// nothing; a tenant's token sees and acts on its tenant's mail only.
pub async fn answer_as(s: &Services, scope: &Scope, req: Request) -> Answer {
    if scope.read_only && req.changes() {
        return Err(Failure::Forbidden("this API token is read-only".into()));
    }
    let t = scope.tenant.as_deref();
    match req {
        Request::Status => match t {
            Some(t) => super::tenant::status(s, t, scope.read_only),
            None => status(s).map(|mut v| {
                v["read_only"] = json!(scope.read_only);
                v
            }),
        },
        Request::Queue => queue(s, t),
        Request::Show { id } => show(s, &id_arg(&id)?, t),
        Request::Retry { id, all } => retry(s, opt_id(id)?.as_deref(), all, t),
        Request::Cancel {
            route: Some(route),
            id: None,
            tag: None,
        } => {
            route_allowed(s, scope, &route)?;
            cancel_route(s, &route, t).await
        }
        Request::Cancel { id, tag, route: _ } => {
            cancel(s, opt_id(id)?.as_deref(), tag.as_deref(), t).await
        }
        Request::Pause { route: None } | Request::Resume { route: None } if t.is_some() => {
            Err(staff_only("pausing all delivery"))
        }
        Request::Pause { route: None } => set_paused(s, true).await,
        Request::Resume { route: None } => set_paused(s, false).await,
        Request::Pause { route: Some(r) } => {
            route_allowed(s, scope, &r)?;
            set_route_paused(s, &r, true).await
        }
        Request::Resume { route: Some(r) } => {
            route_allowed(s, scope, &r)?;
            set_route_paused(s, &r, false).await
        }
        Request::History {
            rcpt,
            id,
            tag,
            since_s,
        } => history(
            s,
            rcpt.as_deref().map(pasted_address).as_deref(),
            opt_id(id)?.as_deref(),
            tag.as_deref(),
            since_s,
            t,
        ),
        Request::Trace { addr } => trace(s, &pasted_address(&addr), t),
        Request::SuppressionList => s
            .suppression
            .list()
            .map(|list| {
                let mine: Vec<Entry> = list
                    .into_iter()
                    .filter(|e| t.is_none() || e.tenant.as_deref() == t)
                    .collect();
                json!({ "entries": mine })
            })
            .map_err(Failure::from),
        Request::SuppressionAdd {
            addr,
            reason,
            tenant,
        } => {
            let tenant = scope_tenant(s, scope, tenant)?;
            suppression_add(s, &addr, reason, tenant).await
        }
        Request::SuppressionRemove { addr, tenant } => {
            let tenant = scope_tenant(s, scope, tenant)?;
            suppression_remove(s, &addr, tenant).await
        }
        Request::Events {
            since_ms,
            rcpt,
            tag,
            event,
            limit,
            cursor,
        } => events(
            s,
            EventQuery {
                since_ms,
                rcpt: rcpt.as_deref().map(pasted_address),
                tag,
                event,
                limit,
                cursor,
                tenant: scope.tenant.clone(),
            },
        ),
        _ if t.is_some() => Err(staff_only("this request")),
        Request::SuppressionImport { entries } => suppression_import(s, entries).await,
        Request::Webhooks => Ok(webhooks(s)),
        Request::Reports { state, kind, limit } => reports(s, state, kind, limit),
        Request::Dmarc { domain, since_s } => {
            super::dmarc::answer(s, domain.as_deref(), since_s.unwrap_or(7 * 86_400))
        }
        Request::WebhookTest { name } => {
            if !s
                .cfg()
                .webhooks
                .iter()
                .any(|w| w.name == name || w.url == name)
            {
                return Err(Failure::NotFound(format!("no webhook named {name:?}")));
            }
            crate::webhooks::test(s, &name)
                .await
                .map(|m| json!({ "result": m }))
                .map_err(Failure::Invalid)
        }
        Request::Reload => crate::control::reload::reload(s)
            .map(|r| serde_json::to_value(&r).unwrap_or_default())
            .map_err(Failure::Invalid),
    }
}

/// Reports at the intake, newest first, filtered by state and kind.
fn reports(
    s: &Services,
    state: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
) -> Answer {
    let Some(b) = s.bounces.as_ref() else {
        return Err("no [bounces] section: herald takes no reports".into());
    };
    let state: Option<crate::bounces::State> = state
        .map(|st| {
            serde_json::from_value(Value::String(st.to_ascii_lowercase())).map_err(|_| {
                format!(
                    "state: {st:?} is not one of pending, applied, ignored, unmatched, unparsed"
                )
            })
        })
        .transpose()?;
    let kind = kind.map(|v| v.to_ascii_lowercase());
    let limit = limit.unwrap_or(50).clamp(1, 1000);
    let list: Vec<Value> = b
        .records()
        .filter(|r| state.is_none_or(|st| r.state == st))
        .filter(|r| kind.as_deref().is_none_or(|k| r.kind.as_deref() == Some(k)))
        .take(limit)
        .map(|r| serde_json::to_value(&r).unwrap_or_default())
        .collect();
    Ok(json!({ "reports": list }))
}

/// Webhook endpoints: backlog, last success, last error.
fn webhooks(s: &Services) -> Value {
    let list: Vec<Value> = s
        .hooks
        .states()
        .into_iter()
        .map(|st| {
            let backlog = s.history.outbox_backlog(&st.name);
            let mut v = serde_json::to_value(&st).unwrap_or_default();
            v["backlog"] = json!(backlog);
            v
        })
        .collect();
    json!({ "webhooks": list })
}

/// What an events listing asks.
struct EventQuery {
    since_ms: Option<u64>,
    rcpt: Option<String>,
    tag: Option<String>,
    event: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    /// Only this tenant's events.
    tenant: Option<String>,
}

/// Events oldest first after `cursor`, at most `limit` (default 100, at
/// most 1000), with the cursor of the next page when there is more.
fn events(s: &Services, q: EventQuery) -> Answer {
    let EventQuery {
        since_ms,
        rcpt,
        tag,
        event,
        limit,
        cursor,
        tenant,
    } = q;
    let limit = limit.unwrap_or(100).clamp(1, 1000);
    let since = since_ms.unwrap_or(0);
    if let Some(e) = &event {
        if !crate::state::history::KINDS.iter().any(|k| k.as_str() == e) {
            return Err(format!("event: {e:?} is not an event kind").into());
        }
    }
    if let Some(c) = &cursor {
        if crate::state::history::key_of_event_id(c).is_none() {
            return Err(format!("cursor: {c:?} is not an event_id").into());
        }
    }
    let mut out = Vec::new();
    let mut more = false;
    let keep = |e: &Event| {
        event.as_deref().is_none_or(|k| e.event.as_str() == k)
            && cursor.as_deref().is_none_or(|c| e.event_id.as_str() > c)
            && (tenant.is_none() || e.tenant == tenant)
    };
    let mut take = |e: &Event| {
        if keep(e) {
            if out.len() < limit {
                out.push(e.clone());
            } else {
                more = true;
            }
        }
        false
    };
    match (rcpt.as_deref(), tag.as_deref()) {
        (Some(r), _) => {
            for e in s.history.query_by(By::Rcpt(r), since, |_| true)? {
                if tag.as_deref().is_none_or(|t| e.tag.as_deref() == Some(t)) {
                    take(&e);
                }
            }
        }
        (None, Some(t)) => {
            for e in s.history.query_by(By::Tag(t), since, |_| true)? {
                take(&e);
            }
        }
        (None, None) => {
            s.history.query(since, |e| take(e))?;
        }
    }
    let next = if more {
        out.last().map(|e| e.event_id.clone())
    } else {
        None
    };
    Ok(json!({ "events": out, "next_cursor": next }))
}

type Answer = Result<Value, Failure>;

fn route_health(s: &Services) -> Vec<Value> {
    let cfg = s.cfg();
    let mut names: Vec<String> = cfg.upstreams.keys().cloned().collect();
    if cfg.delivery.upstream == "mx" || cfg.routes.iter().any(|r| r.upstream == "mx") {
        names.push("mx".into());
    }
    super::tenant::health_of(s, names)
}

/// Counts kept as things happen: `status` never scans the queue or history.
fn status(s: &Services) -> Answer {
    let (messages, queued, deferred) = s.store.stats.get();
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    if queued > 0 {
        by_status.insert("queued", queued);
    }
    if deferred > 0 {
        by_status.insert("deferred", deferred);
    }
    let last_24h: BTreeMap<&'static str, u64> = s
        .history
        .last_24h()
        .into_iter()
        .map(|(k, n)| (k.as_str(), n))
        .collect();
    let storage = match s.store.health.failure() {
        Some((since, why)) => json!({"ok": false, "since_ms": since, "error": why}),
        None => json!({"ok": true}),
    };
    Ok(json!({
        "paused": s.pauses.delivery_paused(),
        "messages": messages,
        "recipients": by_status,
        "last_24h": last_24h,
        "storage": storage,
        "uptime_s": s.started.elapsed().as_secs(),
        "routes": route_health(s),
        "paused_routes": s.pauses.paused_routes(),
        "destinations": s
            .pacing
            .shaper
            .all(&s.cfg())
            .iter()
            .map(|d| d.report())
            .collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
        "reports": s.bounces.as_ref().map(|b| json!({
            "domain": b.domain,
            "since_start": b.counts(),
            "stored_bytes": b.stored().0,
            "max_stored": b.stored().1,
        })),
        "cluster": s.cluster.as_ref().map(|c| c.report()),
    }))
}

fn queue(s: &Services, tenant: Option<&str>) -> Answer {
    let mut all = s.store.all()?;
    let mut quarantined = s.store.quarantined()?;
    if tenant.is_some() {
        all.retain(|e| e.tenant.as_deref() == tenant);
        quarantined.clear();
    }
    Ok(json!({
        "messages": all,
        "quarantined": quarantined,
        "paused": s.pauses.delivery_paused(),
        "paused_routes": s.pauses.paused_routes(),
    }))
}

fn header_block(body: &[u8]) -> String {
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

/// Whether message `id` (its envelope, else its events) is `tenant`'s.
fn owned_by(env: Option<&Envelope>, events: &[Event], tenant: &str) -> bool {
    match env {
        Some(e) => e.tenant.as_deref() == Some(tenant),
        None => events
            .first()
            .is_some_and(|e| e.tenant.as_deref() == Some(tenant)),
    }
}

fn not_found_in_queue(s: &Services, id: &str) -> Failure {
    Failure::NotFound(format!(
        "no message {id} in the queue or in the last {} of history",
        crate::config::format_duration(s.cfg().storage.history_retention)
    ))
}

fn show(s: &Services, id: &str, tenant: Option<&str>) -> Answer {
    let events = s.history.query_by(By::Id(id), 0, |_| true)?;
    let env = s.store.envelope(id)?;
    // Another tenant's message, or a report: not there for this token.
    if tenant.is_some_and(|t| !owned_by(env.as_ref(), &events, t)) {
        return Err(not_found_in_queue(s, id));
    }
    let headers = s.store.body(id)?.map(|b| header_block(&b));
    if env.is_none() && events.is_empty() {
        // A report's id: what came in, and what herald made of it.
        if let Some(rec) = s.bounces.as_ref().and_then(|b| b.record(id)) {
            let body = s
                .bounces
                .as_ref()
                .and_then(|b| b.body(id))
                .unwrap_or_default();
            let cap = body.len().min(REPORT_TEXT_CAP);
            return Ok(json!({
                "id": id,
                "report": rec,
                "text": String::from_utf8_lossy(&body[..cap]),
                // Applied reports keep only their start on disk.
                "truncated": rec.size > cap,
            }));
        }
        return Err(not_found_in_queue(s, id));
    }
    // Reports about the message that name none of its recipients (a
    // complaint about a message of several) are recorded here.
    let reports: Vec<Value> = s
        .bounces
        .as_ref()
        .map(|b| b.about_message(id))
        .unwrap_or_default()
        .into_iter()
        .map(
            |r| json!({"id": r.id, "kind": r.kind, "recipient": r.recipient, "summary": r.summary}),
        )
        .collect();
    // [cluster]: another node received it, and holds its envelope.
    let elsewhere = match (&env, &s.cluster) {
        (None, Some(c)) => events
            .iter()
            .find(|e| e.event == crate::state::history::EventKind::Received)
            .and_then(|e| e.node.clone())
            .filter(|n| *n != c.node),
        _ => None,
    };
    let tenant = match &env {
        Some(e) => e.tenant.clone(),
        None => events.first().and_then(|e| e.tenant.clone()),
    };
    Ok(
        json!({ "id": id, "queued": env, "headers": headers, "events": events, "reports": reports, "node": elsewhere, "tenant": tenant }),
    )
}

/// How much of a report `show` prints (the rest stays in the store).
const REPORT_TEXT_CAP: usize = 256 * 1024;

fn retry(s: &Services, id: Option<&str>, all: bool, tenant: Option<&str>) -> Answer {
    let mine = |e: &Envelope| tenant.is_none() || e.tenant.as_deref() == tenant;
    let ids: Vec<String> = match (id, all) {
        (Some(id), false) if s.store.envelope(id)?.is_some_and(|e| !mine(&e)) => {
            return Err(Failure::NotFound(format!("{id} is not in the queue")))
        }
        (Some(id), false) => vec![id.to_string()],
        (None, true) => s
            .store
            .all()?
            .into_iter()
            .filter(|e| mine(e))
            .map(|e| e.id)
            .collect(),
        _ => return Err("give a queue id or --all".into()),
    };
    let now = now_ms();
    let mut made_due = 0;
    let mut found = false;
    let l = s.ledger();
    for id in &ids {
        let env = l.retry_now(id)?;
        if let Some((n, env)) = env {
            made_due += n;
            found = true;
            // Tried now even if its destination is backing off.
            s.pacing.shaper.clear_backoff(&env.upstream);
            s.scheduler.schedule(id, now);
        }
    }
    s.scheduler.wake();
    if !all && !found {
        return Err(Failure::NotFound(format!("{} is not in the queue", ids[0])));
    }
    Ok(json!({ "retried": made_due }))
}

async fn cancel(s: &Services, id: Option<&str>, tag: Option<&str>, tenant: Option<&str>) -> Answer {
    let mine = |t: Option<&String>| tenant.is_none() || t.map(String::as_str) == tenant;
    let targets: Vec<Envelope> = match (id, tag) {
        (Some(id), None) => s.store.envelope(id)?.into_iter().collect(),
        (None, Some(tag)) => s
            .store
            .all()?
            .into_iter()
            .filter(|e| e.tag.as_deref() == Some(tag))
            .collect(),
        _ => return Err("give a queue id or --tag TAG".into()),
    };
    let targets: Vec<Envelope> = targets
        .into_iter()
        .filter(|e| mine(e.tenant.as_ref()))
        .collect();
    // What had already reached a final state: say so, change nothing.
    let by = match (id, tag) {
        (Some(id), _) => By::Id(id),
        (_, Some(tag)) => By::Tag(tag),
        _ => return Err("give a queue id or --tag TAG".into()),
    };
    let already: Vec<Value> = s
        .history
        .query_by(by, 0, |_| true)?
        .into_iter()
        .filter(|e| mine(e.tenant.as_ref()))
        .filter(|e| {
            matches!(
                e.event,
                EventKind::Delivered
                    | EventKind::Bounced
                    | EventKind::Expired
                    | EventKind::Suppressed
                    | EventKind::Cancelled
            )
        })
        .map(|e| json!({"id": e.id, "rcpt": e.rcpt, "event": e.event, "time": e.time}))
        .collect();
    // A quarantined record (one that does not decode) can only be removed.
    if let Some(id) = id.filter(|_| tenant.is_none()) {
        if targets.is_empty() && s.store.drop_quarantined(id)? {
            s.store.commit().await?;
            tracing::info!(%id, "quarantined record removed by operator");
            return Ok(json!({ "cancelled": [], "already_final": [], "quarantine_removed": id }));
        }
    }
    let mut cancelled = Vec::new();
    for t in &targets {
        cancel_pending(s, t, "", &mut cancelled)?;
    }
    s.store.commit().await?;
    if cancelled.is_empty() && already.is_empty() {
        return Err(match (id, tag) {
            (Some(id), _) => Failure::NotFound(format!("no message {id} in the queue or history")),
            (_, Some(tag)) => {
                Failure::NotFound(format!("no mail with tag {tag:?} in the queue or history"))
            }
            _ => unreachable!(),
        });
    }
    Ok(json!({ "cancelled": cancelled, "already_final": already }))
}

async fn set_paused(s: &Services, paused: bool) -> Answer {
    s.pauses.set_delivery_paused(paused)?;
    s.store.commit().await?;
    s.scheduler.wake();
    tracing::warn!(
        paused,
        "outbound delivery {}",
        if paused { "paused" } else { "resumed" }
    );
    Ok(json!({ "paused": paused }))
}

fn known_route(s: &Services, route: &str) -> Result<(), String> {
    let cfg = s.cfg();
    if route == "mx" || cfg.upstreams.contains_key(route) {
        return Ok(());
    }
    let known: Vec<&str> = cfg.upstreams.keys().map(String::as_str).collect();
    Err(format!(
        "no route {route:?}: give the name of an upstream ({}) or \"mx\"",
        known.join(", ")
    ))
}

/// Holds or releases one upstream's mail; kept across restarts.
async fn set_route_paused(s: &Services, route: &str, paused: bool) -> Answer {
    known_route(s, route)?;
    let list = s.pauses.set_route_paused(route, paused)?;
    s.store.commit().await?;
    s.scheduler.wake();
    tracing::warn!(
        route,
        "route {}",
        if paused {
            "paused: its mail is held"
        } else {
            "resumed"
        }
    );
    Ok(json!({ "route": route, "paused": paused, "paused_routes": list }))
}

/// Cancels the recipients of `t` still pending, records `cancelled` for
/// each (with `why` after the standard text), and lists them in `out`.
fn cancel_pending(
    s: &Services,
    t: &Envelope,
    why: &str,
    out: &mut Vec<Value>,
) -> Result<(), Failure> {
    let newly = s.ledger().cancel(&t.id, why)?;
    for rcpt in newly {
        out.push(json!({"id": t.id, "rcpt": rcpt}));
    }
    Ok(())
}

/// Drops everything queued for one upstream.
async fn cancel_route(s: &Services, route: &str, tenant: Option<&str>) -> Answer {
    known_route(s, route)?;
    let mut cancelled = Vec::new();
    for t in s.store.all()? {
        if t.upstream != route || (tenant.is_some() && t.tenant.as_deref() != tenant) {
            continue;
        }
        cancel_pending(s, &t, &format!(" (route {route})"), &mut cancelled)?;
    }
    s.store.commit().await?;
    tracing::info!(
        route,
        recipients = cancelled.len(),
        "route's queued mail cancelled by operator"
    );
    Ok(json!({ "cancelled": cancelled, "already_final": [] }))
}

fn history(
    s: &Services,
    rcpt: Option<&str>,
    id: Option<&str>,
    tag: Option<&str>,
    since_s: Option<u64>,
    tenant: Option<&str>,
) -> Answer {
    let since = since_s
        .map(|secs| now_ms().saturating_sub(secs * 1000))
        .unwrap_or(0);
    let keep = |e: &Event| {
        rcpt.is_none_or(|r| e.rcpt.eq_ignore_ascii_case(r))
            && id.is_none_or(|i| e.id == i)
            && tag.is_none_or(|t| e.tag.as_deref() == Some(t))
            && (tenant.is_none() || e.tenant.as_deref() == tenant)
    };
    let by = match (rcpt, id, tag) {
        (Some(r), _, _) => Some(By::Rcpt(r)),
        (_, Some(i), _) => Some(By::Id(i)),
        (_, _, Some(t)) => Some(By::Tag(t)),
        _ => None,
    };
    let events = match by {
        Some(by) => s.history.query_by(by, since, keep),
        None => s.history.query(since, keep),
    }?;
    Ok(json!({ "events": events }))
}

fn ago(ms: u64) -> String {
    let now = now_ms();
    if ms <= now {
        format!(
            "{} ago",
            crate::config::format_duration(Duration::from_secs((now - ms) / 1000))
        )
    } else {
        format!(
            "in {}",
            crate::config::format_duration(Duration::from_secs((ms - now) / 1000))
        )
    }
}

/// What to do about an outcome: the class's advice, unless the reply says
/// more (a TLS certificate herald does not trust is the route's problem,
/// but not its credentials).
fn advice(class: Class, detail: &str) -> String {
    if class == Class::Route && detail.contains("TLS handshake") {
        return "herald does not trust the upstream's TLS certificate (see the hint in the reply): fix the route's ca_file as it says; nothing is wrong with the address or the credentials".into();
    }
    class.advice().to_string()
}

/// "; held: ..." when the message waits for its route (paused) or for its
/// destination's back-off.
fn held_note(s: &Services, id: &str) -> String {
    match s.store.envelope(id) {
        Ok(Some(env)) if s.pauses.route_paused(&env.upstream) => format!(
            "; held: route {0} paused (herald resume --route {0})",
            env.upstream
        ),
        // Waiting for the back-off of its smart host: say until when, and
        // what asked for it.
        Ok(Some(env)) if env.upstream != "mx" => {
            let dest = s.pacing.shaper.upstream(&s.cfg(), &env.upstream);
            match dest.throttled_until(now_ms()) {
                Some(until) => format!(
                    "; held: destination {} asked herald to slow down ({}), no new sessions to it until its back-off ends {} (herald retry {id} sends now)",
                    env.upstream,
                    dest.report()["last_reply"].as_str().unwrap_or("throttled"),
                    ago(until)
                ),
                None => String::new(),
            }
        }
        _ => String::new(),
    }
}

/// "accepted by RELAY at TIME" + `then` when the message was delivered to
/// the first hop, for outcomes reported after it.
fn accepted_by(events: &[&Event], then: &str) -> String {
    match events.iter().find(|e| e.event == EventKind::Delivered) {
        Some(e) => format!(
            "accepted by {} at {}{then}",
            e.upstream.as_deref().unwrap_or("the upstream"),
            e.time
        ),
        None => String::new(),
    }
}

/// One line that answers "what happened to the mail for this address?".
fn diagnose(s: &Services, addr: &str, events: &[Event], supp: Option<&Entry>) -> String {
    let lift = match supp.and_then(|e| e.tenant.as_deref()) {
        Some(t) => format!("it is suppressed for tenant {t}'s mail only (other tenants' mail still goes out); lift with: herald suppression remove {addr} --tenant {t}"),
        None => format!("lift with: herald suppression remove {addr}"),
    };
    if events.is_empty() {
        let mut d = format!(
            "no mail for {addr} in the last {}: herald never received any, so the platform did not send it (check the platform's logs and the address it used)",
            crate::config::format_duration(s.cfg().storage.history_retention)
        );
        if let Some(e) = supp {
            d.push_str(&format!(
                "; note: the address is suppressed ({}), {lift}",
                e.reason
            ));
        }
        return d;
    }
    // The newest message decides; events are newest first.
    let latest_id = &events[0].id;
    let of_latest: Vec<&Event> = events.iter().filter(|e| &e.id == latest_id).collect();
    let last = of_latest[0];
    match last.event {
        EventKind::Delivered | EventKind::Opened => delivered_line(last, &of_latest),
        // Not about a recipient (no trace finds it); for completeness.
        EventKind::DmarcFailing => last.detail.clone(),
        EventKind::Deferred => deferred_line(s, addr, last),
        EventKind::Bounced if last.report.is_some() => {
            reported_bounce_line(last, &of_latest, supp, &lift)
        }
        EventKind::Delayed => {
            let reporter = last.upstream.as_deref().unwrap_or("the recipient's server");
            let accepted = accepted_by(&of_latest, "; ");
            format!(
                "{accepted}the next hop reported a delay {} (reported by {reporter}): {}; it keeps trying, and a bounce would show here",
                ago(last.time_ms),
                last.detail
            )
        }
        EventKind::Complained => format!(
            "the recipient reported message {} as spam {} ({}); {}",
            last.id,
            ago(last.time_ms),
            last.detail,
            match supp {
                Some(_) => format!("the address is suppressed so that herald sends it nothing more; {lift} only if the recipient asks for mail again"),
                None => "the suppression has since been lifted".to_string(),
            }
        ),
        EventKind::Bounced => {
            let mut d = format!(
                "bounced {} (queue id {}): {}",
                ago(last.time_ms),
                last.id,
                last.detail
            );
            if let Some(c) = last.class {
                d.push_str(&format!("; {}", advice(c, &last.detail)));
            }
            if supp.is_some() {
                d.push_str(&format!("; the address is now suppressed, {lift}"));
            }
            d
        }
        EventKind::Suppressed => match supp {
            Some(e) => format!(
                "not sent: the address is suppressed since {} ({}{}); {lift}",
                ago(e.added_ms),
                e.reason,
                e.reply.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            ),
            None => format!(
                "not sent {} because the address was suppressed; the suppression has since been lifted, so new mail will go out",
                ago(last.time_ms)
            ),
        },
        EventKind::Cancelled => format!(
            "cancelled {} before delivery (queue id {}{})",
            ago(last.time_ms),
            last.id,
            last.tag.as_deref().map(|t| format!(", tag {t}")).unwrap_or_default()
        ),
        EventKind::Rejected => {
            let temporary = last
                .detail
                .split_once(": ")
                .is_some_and(|(_, reply)| reply.starts_with('4'));
            format!(
                "herald refused it at {} {}; {}",
                last.time,
                last.detail,
                if temporary {
                    "a temporary refusal: the platform should have retried (check its logs)"
                } else {
                    "the platform was told it failed and did not get it sent (check its logs and error handling)"
                }
            )
        }
        EventKind::Expired => format!(
            "expired {} (queue id {}): {}",
            ago(last.time_ms),
            last.id,
            last.detail
        ),
        EventKind::Received => received_line(s, last),
    }
}

/// `trace` for a message delivered (or opened).
fn delivered_line(last: &Event, of_latest: &[&Event]) -> String {
    let delivered = of_latest.iter().find(|e| e.event == EventKind::Delivered);
    let opened = of_latest.iter().find(|e| e.event == EventKind::Opened);
    let mut d = match delivered {
        Some(e) => format!(
            "delivered {} (queue id {}): {}; if the user cannot find it, it is in their mailbox provider's hands (spam folder, filters)",
            ago(e.time_ms),
            e.id,
            e.detail
        ),
        None => format!("message {} was opened", last.id),
    };
    if let Some(o) = opened {
        d.push_str(&format!("; opened {}", ago(o.time_ms)));
    }
    d
}

/// `trace` for a recipient deferred: why, when next, how to hurry it.
fn deferred_line(s: &Services, addr: &str, last: &Event) -> String {
    let latest_id = &last.id;
    let next = s.store.envelope(latest_id).ok().flatten().and_then(|env| {
        env.rcpts
            .iter()
            .find(|r| r.addr.eq_ignore_ascii_case(addr))
            .map(|r| r.next_attempt)
    });
    let mut d = format!("deferred (queue id {}): {}", last.id, last.detail);
    d.push_str(&held_note(s, latest_id));
    if let Some(c @ (Class::Route | Class::Throttle | Class::Soft)) = last.class {
        d.push_str(&format!("; {}", advice(c, &last.detail)));
    }
    if let Some(n) = next {
        d.push_str(&format!("; next attempt {}", ago(n)));
    }
    d.push_str(&format!("; resend now with: herald retry {}", last.id));
    d
}

/// `trace` for a bounce reported after the first hop accepted the message.
fn reported_bounce_line(
    last: &Event,
    of_latest: &[&Event],
    supp: Option<&Entry>,
    lift: &str,
) -> String {
    let reporter = last.upstream.as_deref().unwrap_or("the recipient's server");
    let class = last.class.unwrap_or(Class::Policy);
    let line = last
        .detail
        .strip_suffix(&crate::bounces::bounced_suffix(class, reporter))
        .unwrap_or(&last.detail);
    let accepted = accepted_by(of_latest, ", then ");
    let mut d = format!(
        "{accepted}bounced by the recipient's server (reported by {reporter} at {}): {line}; {} (queue id {}, report {})",
        last.time,
        class.meaning(),
        last.id,
        last.report.as_deref().unwrap_or("")
    );
    if supp.is_some() {
        d.push_str(&format!("; the address is now suppressed, {lift}"));
    } else {
        d.push_str(&format!("; {}", class.advice()));
    }
    d
}

/// `trace` for a message received and not attempted yet.
fn received_line(s: &Services, last: &Event) -> String {
    let latest_id = &last.id;
    let next = s
        .store
        .envelope(latest_id)
        .ok()
        .flatten()
        .and_then(|env| env.next_due());
    let paused = if s.pauses.delivery_paused() {
        " (delivery is PAUSED: herald resume)".to_string()
    } else {
        held_note(s, latest_id)
    };
    match next {
        Some(n) if n > now_ms() => format!(
            "received {} (queue id {}), held until its first attempt {}{paused}",
            ago(last.time_ms),
            last.id,
            ago(n)
        ),
        _ => format!(
            "received {} (queue id {}), waiting for its first attempt{paused}",
            ago(last.time_ms),
            last.id
        ),
    }
}

/// An entry as a tenant's token sees it: the entry for everyone may come
/// from another tenant's mail, so it does not say which message or node.
fn as_seen_by(tenant: Option<&str>, e: Entry) -> Entry {
    match (tenant, &e.tenant) {
        (Some(_), None) => Entry {
            source_id: None,
            node: None,
            ..e
        },
        _ => e,
    }
}

fn trace(s: &Services, addr: &str, tenant: Option<&str>) -> Answer {
    let mut events = s.history.query_by(By::Rcpt(addr), 0, |e| {
        tenant.is_none() || e.tenant.as_deref() == tenant
    })?;
    events.reverse();
    // The suppression that applies to the newest mail (the tenant's own
    // mail for a tenant's token): the one for everyone, else its tenant's.
    let of = tenant.or_else(|| events.first().and_then(|e| e.tenant.as_deref()));
    let supp = s.suppression.check(addr, of)?;
    // Every entry of the address (a tenant sees its own and the one for
    // everyone).
    let all: Vec<Entry> = s
        .suppression
        .list()?
        .into_iter()
        .filter(|e| e.addr.eq_ignore_ascii_case(addr))
        .filter(|e| tenant.is_none() || e.tenant.is_none() || e.tenant.as_deref() == tenant)
        .map(|e| as_seen_by(tenant, e))
        .collect();
    let supp = supp.map(|e| as_seen_by(tenant, e));
    let diagnosis = diagnose(s, addr, &events, supp.as_ref());
    // Only the routes this recipient's queued mail takes.
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let routes: BTreeSet<String> = ids
        .iter()
        .rev()
        .take(20)
        .filter_map(|id| s.store.envelope(id).ok().flatten())
        .map(|env| env.upstream)
        .collect();
    let unhealthy: Vec<Value> = route_health(s)
        .into_iter()
        .filter(|r| r["healthy"] == Value::Bool(false))
        .filter(|r| r["name"].as_str().is_some_and(|n| routes.contains(n)))
        .collect();
    Ok(json!({
        "addr": addr,
        "events": events,
        "suppression": supp,
        "suppressions": all,
        "diagnosis": diagnosis,
        "unhealthy_routes": unhealthy,
    }))
}

/// An address as people paste it: `" alice@dest.test"`,
/// `"<alice@dest.test>"`, `"Alice <alice@dest.test>"`,
/// `"mailto:alice@dest.test"` are all alice@dest.test.
pub fn pasted_address(input: &str) -> String {
    let mut a = input.trim();
    if let (Some(open), Some(close)) = (a.rfind('<'), a.rfind('>')) {
        if open < close {
            a = &a[open + 1..close];
        }
    }
    let a = a
        .trim()
        .trim_matches(['"', '\'', '<', '>', ',', ';'])
        .trim();
    let a = a
        .get(..7)
        .filter(|p| p.eq_ignore_ascii_case("mailto:"))
        .map(|_| &a[7..])
        .unwrap_or(a);
    a.trim().to_string()
}

/// An address given by an operator, as the suppression list keys it, or
/// the reason it is not one (`"   @   "` is not an address).
fn operator_address(addr: &str) -> Result<String, String> {
    let a = pasted_address(addr);
    let a = a.as_str();
    if crate::smtp_in::session::valid_recipient(a) {
        Ok(a.to_lowercase())
    } else {
        Err(format!("addr: {addr:?} is not an address"))
    }
}

async fn suppression_add(
    s: &Services,
    addr: &str,
    reason: Option<String>,
    tenant: Option<String>,
) -> Answer {
    let e = Entry {
        addr: operator_address(addr)?,
        reason: reason.unwrap_or_else(|| "added by operator".into()),
        added_ms: now_ms(),
        tenant,
        ..Default::default()
    };
    s.suppression.put(&e)?;
    s.store.commit().await?;
    tracing::info!(rcpt = %e.addr, tenant = e.tenant.as_deref().unwrap_or("-"), "suppression added by operator");
    Ok(json!({ "entry": e }))
}

async fn suppression_remove(s: &Services, addr: &str, tenant: Option<String>) -> Answer {
    let removed = s
        .suppression
        .remove(&pasted_address(addr), tenant.as_deref())?;
    let _ = s.store.commit().await;
    tracing::info!(rcpt = %addr, removed, tenant = tenant.as_deref().unwrap_or("-"), "suppression removed by operator");
    Ok(json!({ "removed": removed, "addr": addr, "tenant": tenant }))
}

async fn suppression_import(s: &Services, entries: Vec<Entry>) -> Answer {
    let n = entries.len();
    // Every address checked before any is written.
    let mut entries = entries;
    for e in entries.iter_mut() {
        e.addr = operator_address(&e.addr)?;
        if let Some(t) = e.tenant.as_deref().filter(|t| s.cfg().tenant(t).is_none()) {
            return Err(format!("{}: no tenant {t:?} in [[tenants]]", e.addr).into());
        }
    }
    for e in entries {
        s.suppression.put(&e)?;
    }
    s.store.commit().await?;
    Ok(json!({ "imported": n }))
}
