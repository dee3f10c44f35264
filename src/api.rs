//! `[api]`: the control socket's operations over HTTP, as JSON, for the
//! platforms behind herald (and its support console). Every route calls the
//! same [`crate::control::ops::answer`] the socket uses: no second copy of
//! any logic. Bearer tokens come from `[api] tokens_file`, one per line;
//! herald keeps their SHA-256 and compares in constant time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Extension, Path, Query, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::control::ops;
use crate::control::{Request, Scope};
use crate::state::Services;

/// The OpenAPI document of these routes (also in docs/openapi.json).
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

#[derive(Clone)]
struct Api {
    s: Arc<Services>,
}

fn err(status: u16, msg: impl Into<String>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (code, Json(json!({ "ok": false, "error": msg.into() }))).into_response()
}

/// Runs one operation off the async threads (listings scan) and answers it.
async fn run(api: &Api, scope: &Scope, req: Request) -> Result<Value, Response> {
    let s = api.s.clone();
    let scope = scope.clone();
    let rt = tokio::runtime::Handle::current();
    let res = tokio::task::spawn_blocking(move || rt.block_on(ops::answer_as(&s, &scope, req)))
        .await
        .map_err(|e| err(500, format!("internal error: {e}")))?;
    res.map_err(|e| err(e.http_status(), e.to_string()))
}

async fn reply(api: &Api, scope: &Scope, req: Request) -> Response {
    match run(api, scope, req).await {
        Ok(mut v) => {
            if let Value::Object(m) = &mut v {
                m.insert("ok".into(), Value::Bool(true));
            }
            Json(v).into_response()
        }
        Err(r) => r,
    }
}

async fn auth(State(api): State<Api>, mut req: HttpRequest, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // The tokens in force: a reload re-reads tokens_file.
    let scope = presented.and_then(|t| api.s.live().api_tokens.as_ref()?.accepts(t));
    match (presented, scope) {
        (Some(_), Some(scope)) => {
            req.extensions_mut().insert(scope);
            next.run(req).await
        }
        (Some(_), None) => {
            tracing::warn!("api: request with a wrong token refused");
            err(401, "wrong token")
        }
        (None, _) => err(401, "no token: send Authorization: Bearer TOKEN"),
    }
}

type Params = Query<HashMap<String, String>>;

async fn status(State(api): State<Api>, Extension(scope): Extension<Scope>) -> Response {
    reply(&api, &scope, Request::Status).await
}

async fn queue(State(api): State<Api>, Extension(scope): Extension<Scope>) -> Response {
    reply(&api, &scope, Request::Queue).await
}

async fn trace(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    match q.get("rcpt") {
        Some(addr) if !addr.is_empty() => {
            reply(&api, &scope, Request::Trace { addr: addr.clone() }).await
        }
        _ => err(400, "rcpt: give the recipient address, ?rcpt=ADDR"),
    }
}

async fn message(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Response {
    reply(&api, &scope, Request::Show { id }).await
}

async fn retry(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Response {
    reply(
        &api,
        &scope,
        Request::Retry {
            id: Some(id),
            all: false,
        },
    )
    .await
}

async fn cancel_id(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Response {
    reply(
        &api,
        &scope,
        Request::Cancel {
            id: Some(id),
            tag: None,
            route: None,
        },
    )
    .await
}

async fn cancel_tag(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("tag"), get("route")) {
        (None, None) => err(400, "tag: give the tag, ?tag=TAG (or ?route=NAME)"),
        (tag, route) => {
            reply(
                &api,
                &scope,
                Request::Cancel {
                    id: None,
                    tag,
                    route,
                },
            )
            .await
        }
    }
}

/// `since` is a duration ("2h": the last two hours) or an RFC 3339 time.
fn since_ms(v: &str) -> Result<u64, String> {
    if let Ok(d) = humantime::parse_duration(v) {
        return Ok(crate::state::spool::now_ms().saturating_sub(d.as_millis() as u64));
    }
    humantime::parse_rfc3339_weak(v)
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        })
        .map_err(|_| format!("since: {v:?} is neither a duration (2h) nor an RFC 3339 time"))
}

/// `?limit=N`, or why it is not one.
fn limit_param(q: &HashMap<String, String>) -> Result<Option<usize>, &'static str> {
    q.get("limit")
        .map(|l| l.parse::<usize>())
        .transpose()
        .map_err(|_| "limit: not a number")
}

async fn events(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    let since = match q.get("since").map(|s| since_ms(s)).transpose() {
        Ok(s) => s,
        Err(e) => return err(400, e),
    };
    let limit = match limit_param(&q) {
        Ok(l) => l,
        Err(e) => return err(400, e),
    };
    let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    reply(
        &api,
        &scope,
        Request::Events {
            since_ms: since,
            rcpt: get("rcpt"),
            tag: get("tag"),
            event: get("event"),
            limit,
            cursor: get("cursor"),
        },
    )
    .await
}

/// `?state=unparsed&kind=failed&limit=50`: reports at the intake.
async fn reports(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    let limit = match limit_param(&q) {
        Ok(l) => l,
        Err(e) => return err(400, e),
    };
    let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    reply(
        &api,
        &scope,
        Request::Reports {
            state: get("state"),
            kind: get("kind"),
            limit,
        },
    )
    .await
}

async fn dmarc(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    let since_s = match q.get("since").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match humantime::parse_duration(v) {
            Ok(d) => Some(d.as_secs()),
            Err(_) => return err(400, format!("since: {v:?} is not a duration (7d)")),
        },
    };
    let domain = q.get("domain").filter(|v| !v.is_empty()).cloned();
    reply(&api, &scope, Request::Dmarc { domain, since_s }).await
}

async fn suppressions(State(api): State<Api>, Extension(scope): Extension<Scope>) -> Response {
    reply(&api, &scope, Request::SuppressionList).await
}

/// `?tenant=NAME`: the tenant's entry (a tenant's token: always its own).
async fn suppression(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Path(addr): Path<String>,
    Query(q): Params,
) -> Response {
    let tenant = q.get("tenant").filter(|v| !v.is_empty()).cloned();
    match run(&api, &scope, Request::SuppressionList).await {
        Ok(v) => {
            let found = v["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| {
                    e["addr"].as_str().is_some_and(|a| {
                        a.eq_ignore_ascii_case(&crate::control::ops::pasted_address(&addr))
                    }) && e["tenant"].as_str() == tenant.as_deref().or(scope.tenant.as_deref())
                })
                .cloned();
            match found {
                Some(e) => Json(json!({ "ok": true, "entry": e })).into_response(),
                None => err(404, format!("not suppressed: {addr}")),
            }
        }
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct AddSuppression {
    addr: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

async fn suppression_add(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    body: axum::body::Bytes,
) -> Response {
    match serde_json::from_slice::<AddSuppression>(&body) {
        Ok(a) => {
            reply(
                &api,
                &scope,
                Request::SuppressionAdd {
                    addr: a.addr,
                    reason: a.reason,
                    tenant: a.tenant,
                },
            )
            .await
        }
        Err(e) => err(
            400,
            format!("body: {e}; send {{\"addr\": ..., \"reason\": ...}}"),
        ),
    }
}

/// `?tenant=NAME`: the tenant's entry (a tenant's token: always its own).
async fn suppression_remove(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Path(addr): Path<String>,
    Query(q): Params,
) -> Response {
    let tenant = q.get("tenant").filter(|v| !v.is_empty()).cloned();
    match run(
        &api,
        &scope,
        Request::SuppressionRemove {
            addr: addr.clone(),
            tenant,
        },
    )
    .await
    {
        Ok(v) if v["removed"] == Value::Bool(true) => {
            Json(json!({ "ok": true, "removed": true, "addr": addr })).into_response()
        }
        Ok(_) => err(404, format!("not suppressed: {addr}")),
        Err(r) => r,
    }
}

/// `?route=NAME` holds one upstream's mail only.
async fn pause(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    let route = q.get("route").filter(|v| !v.is_empty()).cloned();
    reply(&api, &scope, Request::Pause { route }).await
}

async fn resume(
    State(api): State<Api>,
    Extension(scope): Extension<Scope>,
    Query(q): Params,
) -> Response {
    let route = q.get("route").filter(|v| !v.is_empty()).cloned();
    reply(&api, &scope, Request::Resume { route }).await
}

/// The support console's files, embedded in the binary.
const CONSOLE: [(&str, &str, &str); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../console/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../console/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../console/style.css"),
    ),
];

/// Serves `/console/` and its files with a strict policy: no inline
/// script or style, nothing from elsewhere, never framed.
async fn console_file(path: Option<Path<String>>) -> Response {
    let name = path.map(|Path(p)| p).unwrap_or_else(|| "index.html".into());
    let Some((_, ctype, body)) = CONSOLE.iter().find(|(n, _, _)| *n == name) else {
        return err(404, "no such file");
    };
    (
        [
            (header::CONTENT_TYPE, *ctype),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        *body,
    )
        .into_response()
}

async fn console_index() -> Response {
    console_file(None).await
}

async fn console_redirect() -> Response {
    axum::response::Redirect::permanent("/console/").into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> Response {
    err(404, "no such route (see /api/v1/openapi.json)")
}

/// The router: `/api/v1/...`, every route behind the bearer token except
/// the OpenAPI document.
pub fn router(s: Arc<Services>) -> Router {
    let api = Api { s };
    let protected = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/queue", get(queue))
        .route("/api/v1/trace", get(trace))
        .route("/api/v1/events", get(events))
        .route("/api/v1/reports", get(reports))
        .route("/api/v1/dmarc", get(dmarc))
        .route("/api/v1/messages/{id}", get(message).delete(cancel_id))
        .route("/api/v1/messages/{id}/retry", post(retry))
        .route("/api/v1/cancel", post(cancel_tag))
        .route("/api/v1/pause", post(pause))
        .route("/api/v1/resume", post(resume))
        .route(
            "/api/v1/suppressions",
            get(suppressions).post(suppression_add),
        )
        .route(
            "/api/v1/suppressions/{addr}",
            get(suppression).delete(suppression_remove),
        )
        .route_layer(middleware::from_fn_with_state(api.clone(), auth));
    Router::new()
        .merge(protected)
        .route("/api/v1/openapi.json", get(openapi))
        .route("/console", get(console_redirect))
        .route("/console/", get(console_index))
        .route(
            "/console/{file}",
            get(|p: Path<String>| console_file(Some(p))),
        )
        .fallback(not_found)
        .with_state(api)
}

/// Binds `api.listen`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("api.listen: cannot listen on {addr}: {e}"))
}

/// Serves until shutdown.
/// With the connection cap and header timeout of every HTTP listener.
pub async fn serve(s: Arc<Services>, listener: tokio::net::TcpListener) {
    let shutdown = s.shutdown.clone();
    crate::http::serve(listener, router(s), shutdown, "api").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_parses() {
        let v: Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(v["paths"].as_object().unwrap().len() >= 8);
    }
}
