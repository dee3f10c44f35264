//! What a tenant's API token sees of the whole: `status` counted over its
//! own mail only (the console's overview and queue pages read it). The
//! other operations take the tenant as a filter in [`super::ops`].

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::failure::Failure;
use crate::state::history::EventKind;
use crate::state::Services;

/// `status` for tenant `t`: its queued mail, its events of the last 24
/// hours, the routes that carry its mail alone, and whether delivery is
/// paused. Nothing about other tenants, the platform, the storage's
/// errors or the cluster.
pub fn status(s: &Services, t: &str, read_only: bool) -> Result<Value, Failure> {
    let cfg = s.cfg();
    // Counted as the mail comes and goes, as the staff's status is: never
    // a scan of the queue or of a day of history.
    let (messages, queued, deferred) = s.store.stats.of_tenant(t);
    let by_status: BTreeMap<&'static str, u64> = [("queued", queued), ("deferred", deferred)]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    let last_24h: BTreeMap<&'static str, u64> = s
        .history
        .last_24h_of(t)
        .into_iter()
        .filter(|(k, _)| *k != EventKind::DmarcFailing)
        .map(|(k, n)| (k.as_str(), n))
        .collect();
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
