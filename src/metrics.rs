//! `[control] metrics_listen`: `/healthz` for load balancers and systemd
//! watchdogs, `/metrics` in the Prometheus text format.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::Services;

/// 200 while this node takes mail; the body says whether delivery is
/// paused and whether the cluster is degraded (mail still flows). 503,
/// with the reason, while the node refuses mail for its own reasons: a
/// flush or fsync failed (until a probe succeeds), or its memory budget is
/// exhausted. On SIGTERM the listener closes: checks fail at once.
async fn healthz(State(s): State<Arc<Services>>) -> impl IntoResponse {
    if let Some((_, why)) = s.store.health.failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage failed: {why}\n"),
        );
    }
    if let Some(why) = refusing(&s) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    }
    let degraded = s
        .cluster
        .as_ref()
        .and_then(|c| c.degraded())
        .map(|why| format!(" (cluster degraded: {why})"))
        .unwrap_or_default();
    match s.store.meta_get(crate::state::ports::META_PAUSED) {
        Ok(_) if s.pauses.delivery_paused() => {
            (StatusCode::OK, format!("ok (delivery paused){degraded}\n"))
        }
        Ok(_) => (StatusCode::OK, format!("ok{degraded}\n")),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage error: {e}\n"),
        ),
    }
}

/// Why this node refuses new mail for its own reasons (beyond a failed
/// storage), if it does: a balancer should send the mail elsewhere.
fn refusing(s: &Services) -> Option<String> {
    // Draining (SIGTERM) needs no answer here: this listener closes at once.
    if s.memory.available() == 0 {
        return Some("memory budget exhausted: new messages wait for memory".into());
    }
    None
}

/// One label of a metric family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Destination {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventClass {
    event: &'static str,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantEvent {
    tenant: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainResult {
    domain: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// A gauge set to `v`.
fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// What `/metrics` shows, read from the state at each scrape (counts kept
/// as the queue changes: a scrape never decodes the queue). The text
/// format (OpenMetrics, label values escaped) is prometheus-client's.
fn registry(s: &Services) -> Registry {
    let mut r = Registry::default();
    let (messages, queued, deferred) = s.store.stats.get();
    r.register(
        "herald_queue_messages",
        "Messages in the queue",
        gauge(messages as i64),
    );
    let rcpts = Family::<Status, Gauge>::default();
    rcpts
        .get_or_create(&Status { status: "queued" })
        .set(queued as i64);
    rcpts
        .get_or_create(&Status { status: "deferred" })
        .set(deferred as i64);
    r.register(
        "herald_queue_recipients",
        "Recipients waiting, by state",
        rcpts,
    );
    r.register(
        "herald_storage_healthy",
        "0 once a flush or fsync failed, until a probe write succeeds",
        gauge(!s.store.health.is_failed() as i64),
    );
    if let Some(c) = &s.cluster {
        r.register(
            "herald_cluster_degraded",
            "1 while Redis does not answer: this node goes on with its mirror and its share of the limits",
            gauge(c.degraded().is_some() as i64),
        );
        r.register(
            "herald_cluster_outbox",
            "Changes of this node waiting to be written to Redis",
            gauge(c.outbox_len() as i64),
        );
        r.register(
            "herald_cluster_nodes",
            "Nodes whose heartbeat is recent, this one included",
            gauge(c.alive() as i64),
        );
    }
    r.register(
        "herald_paused",
        "1 while outbound delivery is paused",
        gauge(s.pauses.delivery_paused() as i64),
    );
    let cfg = s.cfg();
    let health = s.pacing.health.lock().unwrap().clone();
    let routes = Family::<Route, Gauge>::default();
    for n in cfg.upstreams.keys() {
        let ok = health.get(n).is_none_or(|h| h.healthy);
        routes
            .get_or_create(&Route { route: n.clone() })
            .set(ok as i64);
    }
    r.register(
        "herald_route_healthy",
        "0 while the upstream refuses the route (5xx to AUTH, MAIL FROM, ...)",
        routes,
    );
    let now = crate::state::spool::now_ms();
    let throttled = Family::<Destination, Gauge>::default();
    for d in s.pacing.shaper.all(&cfg) {
        let key = Destination {
            destination: d.key.clone(),
        };
        throttled
            .get_or_create(&key)
            .set(d.throttled_until(now).is_some() as i64);
    }
    r.register(
        "herald_destination_throttled",
        "1 while a destination backs off after asking herald to slow down",
        throttled,
    );
    r.register(
        "herald_uptime_seconds",
        "Seconds since start",
        gauge(s.started.elapsed().as_secs() as i64),
    );
    let events = Family::<EventClass, Counter>::default();
    for (k, class, n) in s.history.counts() {
        let labels = EventClass {
            event: k.as_str(),
            class: class.map(|c| c.as_str()).unwrap_or(""),
        };
        events.get_or_create(&labels).inc_by(n);
    }
    r.register(
        "herald_events",
        "Events recorded since start, by kind and reply class",
        events,
    );
    // Every tenant of the config appears, with its deliveries, even at 0.
    let by_tenant = Family::<TenantEvent, Counter>::default();
    for t in &cfg.tenants {
        by_tenant
            .get_or_create(&TenantEvent {
                tenant: t.name.clone(),
                event: "delivered",
            })
            .inc_by(0);
    }
    for (tenant, k, n) in s.history.tenant_counts() {
        by_tenant
            .get_or_create(&TenantEvent {
                tenant,
                event: k.as_str(),
            })
            .inc_by(n);
    }
    r.register(
        "herald_tenant_events",
        "Events recorded since start, by tenant ([[tenants]]) and kind",
        by_tenant,
    );
    if let Some(b) = &s.bounces {
        let reports = Family::<Outcome, Counter>::default();
        for (outcome, n) in b.counts() {
            reports.get_or_create(&Outcome { outcome }).inc_by(n);
        }
        // Anyone can send a report about any domain: only herald's own
        // sending domains get a label of their own (bounded by the config).
        let own = sending_domains(&cfg);
        let dmarc = Family::<DomainResult, Counter>::default();
        for ((domain, passed), n) in b.aggregates.counts() {
            let domain = if own.contains(&domain) {
                domain
            } else {
                "other".into()
            };
            let result = if passed { "pass" } else { "fail" };
            dmarc
                .get_or_create(&DomainResult { domain, result })
                .inc_by(n);
        }
        r.register(
            "herald_dmarc_messages",
            "Messages in DMARC aggregate reports applied since start, by From domain (herald's sending domains; \"other\") and DMARC result",
            dmarc,
        );
        r.register(
            "herald_reports",
            "Reports at the [bounces] listener since start, by outcome (refused_*: RCPT refused)",
            reports,
        );
    }
    r
}

/// The domains herald signs or sends as: `[[dkim]]` domains and the
/// domains of the default senders.
fn sending_domains(cfg: &crate::config::Config) -> std::collections::BTreeSet<String> {
    let senders = std::iter::once(&cfg.sender.default_sender)
        .chain(cfg.routes.iter().filter_map(|r| r.default_sender.as_ref()));
    senders
        .filter_map(|a| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()))
        .chain(cfg.dkim.iter().map(|k| k.domain.clone()))
        .collect()
}

async fn metrics(State(s): State<Arc<Services>>) -> axum::response::Response {
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry(&s)) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Serves until shutdown.
pub async fn serve(services: Arc<Services>, listener: tokio::net::TcpListener) {
    let shutdown = services.shutdown.clone();
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(services);
    crate::http::serve(listener, app, shutdown, "metrics").await;
}

/// Binds `control.metrics_listen`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("control.metrics_listen: cannot listen on {addr}: {e}"))
}
