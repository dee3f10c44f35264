//! `[control] metrics_listen`: `/healthz` for load balancers and systemd
//! watchdogs, `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::state::Services;

/// 200 while the storage can be trusted; the body says whether delivery is
/// paused. 503 once a flush or fsync failed, until a probe succeeds.
async fn healthz(State(s): State<Arc<Services>>) -> impl IntoResponse {
    if let Some((_, why)) = s.store.health.failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage failed: {why}\n"),
        );
    }
    match s.store.meta_get(crate::state::ports::META_PAUSED) {
        Ok(_) if s.pauses.delivery_paused() => {
            (StatusCode::OK, "ok (delivery paused)\n".to_string())
        }
        Ok(_) => (StatusCode::OK, "ok\n".to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage error: {e}\n"),
        ),
    }
}

async fn metrics(State(s): State<Arc<Services>>) -> axum::response::Response {
    // Counts kept as the queue changes: a scrape never decodes the queue.
    let (messages, queued, deferred) = s.store.stats.get();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    gauge(
        "herald_queue_messages",
        "Messages in the queue.",
        vec![(String::new(), messages as f64)],
    );
    gauge(
        "herald_queue_recipients",
        "Recipients waiting, by state.",
        vec![
            ("{status=\"queued\"}".into(), queued as f64),
            ("{status=\"deferred\"}".into(), deferred as f64),
        ],
    );
    gauge(
        "herald_storage_healthy",
        "0 once a flush or fsync failed, until a probe write succeeds.",
        vec![(String::new(), !s.store.health.is_failed() as u8 as f64)],
    );
    gauge(
        "herald_paused",
        "1 while outbound delivery is paused.",
        vec![(String::new(), s.pauses.delivery_paused() as u8 as f64)],
    );
    let health = s.pacing.health.lock().unwrap().clone();
    gauge(
        "herald_route_healthy",
        "0 while the upstream refuses the route (5xx to AUTH, MAIL FROM, ...).",
        s.cfg()
            .upstreams
            .keys()
            .map(|n| {
                let ok = health.get(n).is_none_or(|h| h.healthy);
                (format!("{{route=\"{n}\"}}"), ok as u8 as f64)
            })
            .collect(),
    );
    let now = crate::state::spool::now_ms();
    gauge(
        "herald_destination_throttled",
        "1 while a destination backs off after asking herald to slow down.",
        s.pacing
            .shaper
            .all(&s.cfg())
            .iter()
            .map(|d| {
                (
                    format!("{{destination=\"{}\"}}", d.key),
                    d.throttled_until(now).is_some() as u8 as f64,
                )
            })
            .collect(),
    );
    gauge(
        "herald_uptime_seconds",
        "Seconds since start.",
        vec![(String::new(), s.started.elapsed().as_secs() as f64)],
    );
    let _ = writeln!(
        out,
        "# HELP herald_events_total Events recorded since start, by kind and reply class."
    );
    let _ = writeln!(out, "# TYPE herald_events_total counter");
    for (k, class, n) in s.history.counts() {
        let class = class.map(|c| c.as_str()).unwrap_or("");
        let _ = writeln!(
            out,
            "herald_events_total{{event=\"{}\",class=\"{class}\"}} {n}",
            k.as_str()
        );
    }
    if let Some(b) = &s.bounces {
        let _ = writeln!(
            out,
            "# HELP herald_reports_total Reports at the [bounces] listener since start, by outcome (refused_*: RCPT refused)."
        );
        let _ = writeln!(out, "# TYPE herald_reports_total counter");
        for (k, n) in b.counts() {
            let _ = writeln!(out, "herald_reports_total{{outcome=\"{k}\"}} {n}");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
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
