//! What a tenant's API token sees of the whole: `status` counted over its
//! own mail only (the console's overview and queue pages read it). The
//! other operations take the tenant as a filter in [`super::ops`].

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::failure::Failure;
use crate::state::history::EventKind;
use crate::state::spool::{now_ms, RcptStatus};
use crate::state::Services;

/// `status` for tenant `t`: its queued mail, its events of the last 24
/// hours, the routes that carry its mail alone, and whether delivery is
/// paused. Nothing about other tenants, the platform, the storage's
/// errors or the cluster.
pub fn status(s: &Services, t: &str, read_only: bool) -> Result<Value, Failure> {
    let cfg = s.cfg();
    let mut messages = 0u64;
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    for env in s.store.all()? {
        if env.tenant.as_deref() != Some(t) {
            continue;
        }
        messages += 1;
        for r in env.pending() {
            let k = match r.status {
                RcptStatus::Deferred => "deferred",
                _ => "queued",
            };
            *by_status.entry(k).or_insert(0) += 1;
        }
    }
    let mut last_24h: BTreeMap<&'static str, u64> = BTreeMap::new();
    let since = now_ms().saturating_sub(86_400_000);
    s.history.query(since, |e| {
        if e.tenant.as_deref() == Some(t) && e.event != EventKind::DmarcFailing {
            *last_24h.entry(e.event.as_str()).or_insert(0) += 1;
        }
        false
    })?;
    let own = cfg.tenant_upstreams(t);
    let routes = health_of(s, own.clone());
    let paused_routes: Vec<String> = s
        .pauses
        .paused_routes()
        .into_iter()
        .filter(|r| own.contains(r))
        .collect();
    Ok(json!({
        "tenant": t,
        "read_only": read_only,
        "paused": s.pauses.delivery_paused(),
        "messages": messages,
        "recipients": by_status,
        "last_24h": last_24h,
        "storage": {"ok": !s.store.health.is_failed()},
        "routes": routes,
        "paused_routes": paused_routes,
        "rate": cfg.tenant(t).and_then(|x| x.max_rate).map(|r| r.to_string()),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// The health of these routes, as `status` shows it.
pub(super) fn health_of(s: &Services, names: Vec<String>) -> Vec<Value> {
    let health = s
        .pacing
        .health
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    names
        .into_iter()
        .map(|n| match health.get(&n) {
            Some(h) => json!({"name": n, "healthy": h.healthy, "last_error": h.last_error, "since_ms": h.since_ms, "last_error_ms": h.last_error_ms}),
            None => json!({"name": n, "healthy": Value::Null, "last_error": Value::Null, "since_ms": Value::Null, "last_error_ms": Value::Null}),
        })
        .collect()
}
