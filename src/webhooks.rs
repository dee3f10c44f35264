//! `[[webhooks]]`: every event a platform asked for is POSTed to it as JSON,
//! signed, from a durable outbox.
//!
//! History writes an outbox entry beside each event (same sled flush, so a
//! `kill -9` loses neither or both). One sender task per endpoint reads its
//! outbox in order and POSTs; 2xx removes the entries, 408, 429, 5xx and
//! network errors are retried with backoff for 24 hours, other 4xx are
//! dropped with a log line. SMTP and delivery never wait for an endpoint.
//! Senders follow reloads: an endpoint's new URL, secret or events apply
//! to its next POST, a new endpoint gets a sender, a removed one's stops
//! (its undelivered events stay in the outbox, should it come back).
//!
//! Signature (Stripe's scheme): `Herald-Signature: t=UNIX,v1=HEX` with
//! HEX = HMAC-SHA256(key, "UNIX.BODY"); `Herald-Event-Id` names the event
//! (comma-separated for a batch), for deduplication.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::hmac;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::config::Webhook;
use crate::state::history::History;
use crate::state::outbox::{entry_time, HookState};
use crate::state::spool::now_ms;
use crate::state::Services;

/// How long an event is retried before it is given up.
const MAX_AGE_MS: u64 = 24 * 3_600_000;
/// A backlog of at least this many events is sent in batches (JSON arrays).
const BATCH_FROM: usize = 10;
const BATCH_MAX: usize = 100;

/// Starts a sender for every endpoint that has none: at start-up and
/// after each reload.
pub async fn supervise(s: Arc<Services>) {
    let mut reloads = s.reloads.subscribe();
    let mut shutdown = s.shutdown.clone();
    let mut senders = tokio::task::JoinSet::new();
    loop {
        {
            // Under the lock senders take to decide to stop (see `current`).
            let mut running = s.hooks.running.lock().unwrap_or_else(|e| e.into_inner());
            for w in &s.cfg().webhooks {
                if running.insert(w.name.clone()) {
                    senders.spawn(run(s.clone(), w.name.clone()));
                }
            }
        }
        tokio::select! {
            r = reloads.changed() => if r.is_err() { break },
            _ = shutdown.wait() => break,
            // A sender that ended (its endpoint was removed) is reaped.
            Some(_) = senders.join_next() => {}
        }
    }
    // Each sender ends at shutdown (a POST in flight has its timeout).
    while senders.join_next().await.is_some() {}
}

/// What a sender works with, read again before each POST.
struct Current {
    hook: Webhook,
    tls: Arc<rustls::ClientConfig>,
    state: Arc<Mutex<HookState>>,
    wake: Arc<tokio::sync::Notify>,
}

/// Endpoint `name` as configured now, or None (and the sender is
/// deregistered) when a reload removed it.
fn current(s: &Services, name: &str) -> Option<Current> {
    let mut running = s.hooks.running.lock().unwrap_or_else(|e| e.into_inner());
    let live = s.live();
    let hook = live.cfg.webhooks.iter().find(|w| w.name == name);
    let (Some(hook), Some(tls)) = (hook, live.webhook_tls.get(name)) else {
        running.remove(name);
        return None;
    };
    Some(Current {
        hook: hook.clone(),
        tls: tls.clone(),
        state: s.hooks.state(name),
        wake: s.history.outbox_notify(name),
    })
}

/// The signature header value for `body` at `t` (Unix seconds).
pub fn signature(key: &[u8], t: u64, body: &[u8]) -> String {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex = data_encoding::HEXLOWER.encode(tag.as_ref());
    format!("t={t},v1={hex}")
}

/// The result of one POST.
enum Sent {
    Done,
    /// Try again later (3xx, 408, 429, 5xx, network).
    Retry(String),
    /// The endpoint refuses these events for good (other 4xx).
    Refused(String),
}

/// The HTTP client of one endpoint: hyper-util's pooled client, so that
/// the connection (and its TLS session) is kept between POSTs; TLS by
/// hyper-rustls over the endpoint's own rustls configuration.
type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// How long an idle connection to an endpoint is kept.
const IDLE: Duration = Duration::from_secs(30);

fn client(tls: &Arc<rustls::ClientConfig>) -> Client {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((**tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(IDLE)
        .pool_max_idle_per_host(1)
        .build(https)
}

/// POSTs `body` to the endpoint.
async fn post(client: &Client, hook: &Webhook, body: Vec<u8>, ids: &str) -> Sent {
    let uri: http::Uri = match hook.url.parse() {
        Ok(u) => u,
        Err(e) => return Sent::Refused(format!("bad URL: {e}")),
    };
    let t = now_ms() / 1000;
    let sig = signature(hook.secret.expose().as_bytes(), t, &body);
    let req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("herald/", env!("CARGO_PKG_VERSION")),
        )
        .header("Herald-Signature", sig)
        .header("Herald-Event-Id", ids)
        .body(Full::new(Bytes::from(body)));
    let req = match req {
        Ok(r) => r,
        Err(e) => return Sent::Refused(format!("cannot build the request: {e}")),
    };
    let run = async {
        let resp = client.request(req).await.map_err(|e| {
            // The cause says what failed (connect, TLS, HTTP).
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            why
        })?;
        let status = resp.status().as_u16();
        // Read (and discard) the body so the connection can be reused.
        let _ = resp.into_body().collect().await;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(hook.timeout, run).await {
        Err(_) => Sent::Retry(format!("no answer within {:?}", hook.timeout)),
        Ok(Err(e)) => Sent::Retry(e),
        Ok(Ok(code)) if (200..300).contains(&code) => Sent::Done,
        Ok(Ok(code)) if code == 408 || code == 429 || code >= 500 => {
            Sent::Retry(format!("HTTP {code}"))
        }
        // A redirect is not followed (the signature names one URL): the
        // events wait, and the error says which URL to configure.
        Ok(Ok(code)) if (300..400).contains(&code) => Sent::Retry(format!(
            "HTTP {code}: a redirect, not followed; set the webhook's url to where it points"
        )),
        Ok(Ok(code)) => Sent::Refused(format!("HTTP {code}")),
    }
}

/// Sends endpoint `name`'s outbox until shutdown, or until a reload
/// removes the endpoint.
pub async fn run(s: Arc<Services>, name: String) {
    let mut shutdown = s.shutdown.clone();
    let mut reloads = s.reloads.subscribe();
    let prefix_len = History::outbox_prefix(&name).len();
    let mut backoff = Duration::from_secs(1);
    // The client of the endpoint's TLS configuration now (a reload may
    // give it another).
    let mut http: Option<(Arc<rustls::ClientConfig>, Client)> = None;
    loop {
        let Some(Current {
            hook,
            tls,
            state,
            wake,
        }) = current(&s, &name)
        else {
            tracing::info!(webhook = %name, "webhook endpoint no longer configured: its sender stops");
            return;
        };
        let history = s.history.clone();
        let name = hook.name.clone();
        let batch = tokio::task::spawn_blocking(move || {
            let first = history.outbox_pending(&name, BATCH_FROM);
            if first.len() < BATCH_FROM {
                first.into_iter().take(1).collect()
            } else {
                history.outbox_pending(&name, BATCH_MAX)
            }
        })
        .await
        .unwrap_or_default();
        if batch.is_empty() {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                _ = reloads.changed() => continue,
                _ = shutdown.wait() => return,
            }
        }
        // Too old to be worth sending: dropped with a log line.
        let cutoff = now_ms().saturating_sub(MAX_AGE_MS);
        let (stale, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(k, _)| entry_time(prefix_len, k) < cutoff);
        for (k, _) in &stale {
            s.history.outbox_remove(k);
        }
        if !stale.is_empty() {
            tracing::warn!(webhook = %hook.name, events = stale.len(), "webhook events older than 24h dropped");
            state.lock().unwrap_or_else(|e| e.into_inner()).dropped += stale.len() as u64;
            continue;
        }
        let ids: Vec<String> = batch
            .iter()
            .filter_map(|(_, v)| {
                serde_json::from_slice::<serde_json::Value>(v)
                    .ok()
                    .and_then(|e| e["event_id"].as_str().map(str::to_string))
            })
            .collect();
        let body = if batch.len() == 1 {
            batch[0].1.clone()
        } else {
            let mut b = b"[".to_vec();
            for (n, (_, v)) in batch.iter().enumerate() {
                if n > 0 {
                    b.push(b',');
                }
                b.extend_from_slice(v);
            }
            b.push(b']');
            b
        };
        let ids = ids.join(",");
        if !http.as_ref().is_some_and(|(t, _)| Arc::ptr_eq(t, &tls)) {
            http = Some((tls.clone(), client(&tls)));
        }
        let c = &http.as_ref().expect("client made above").1;
        let result = tokio::select! {
            r = post(c, &hook, body, &ids) => r,
            _ = shutdown.wait() => return,
        };
        let retry = record_result(&s, &state, &hook.name, &batch, result);
        if retry {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                // A reload may have fixed the endpoint: try it now.
                _ = reloads.changed() => {
                    backoff = Duration::from_secs(1);
                    continue;
                }
                _ = shutdown.wait() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(300));
        } else {
            backoff = Duration::from_secs(1);
        }
    }
}

/// Applies the result of a POST to the outbox and the endpoint's state;
/// true when the batch is to be tried again.
fn record_result(
    s: &Services,
    state: &Mutex<HookState>,
    name: &str,
    batch: &[(Vec<u8>, Vec<u8>)],
    result: Sent,
) -> bool {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Sent::Done => {
            for (k, _) in batch {
                s.history.outbox_remove(k);
            }
            if st.last_error.is_some() && st.last_success_ms < st.last_error_ms {
                tracing::info!(webhook = %name, "webhook endpoint works again");
            }
            st.last_success_ms = Some(now_ms());
            st.delivered += batch.len() as u64;
            false
        }
        Sent::Refused(why) => {
            tracing::warn!(webhook = %name, error = %why, events = batch.len(), "webhook endpoint refused events; dropped");
            st.last_error = Some(why);
            st.last_error_ms = Some(now_ms());
            st.dropped += batch.len() as u64;
            for (k, _) in batch {
                s.history.outbox_remove(k);
            }
            false
        }
        Sent::Retry(why) => {
            // One line when the endpoint starts failing, not per try.
            if st.last_error.is_none() || st.last_success_ms > st.last_error_ms {
                tracing::warn!(webhook = %name, error = %why, "webhook endpoint failing; events are kept and retried");
            }
            st.last_error = Some(why);
            st.last_error_ms = Some(now_ms());
            true
        }
    }
}

/// Sends one signed test event to endpoint `name` now (not through the
/// outbox); returns what the endpoint said.
pub async fn test(s: &Services, name: &str) -> Result<String, String> {
    let live = s.live();
    let hook = live
        .cfg
        .webhooks
        .iter()
        .find(|w| w.name == name || w.url == name)
        .ok_or_else(|| format!("no webhook named {name:?}"))?;
    let tls = live
        .webhook_tls
        .get(&hook.name)
        .cloned()
        .ok_or_else(|| format!("{}: no TLS configuration", hook.name))?;
    let t = now_ms();
    let id = format!("test-{t}");
    let body = serde_json::json!({
        "time": crate::state::history::rfc3339(t),
        "time_ms": t,
        "id": "",
        "rcpt": "",
        "event": "test",
        "detail": "a test event from herald webhooks test",
        "event_id": id,
    });
    let body = serde_json::to_vec(&body).unwrap_or_default();
    match post(&client(&tls), hook, body, &id).await {
        Sent::Done => Ok(format!("{}: accepted the signed test event", hook.name)),
        Sent::Retry(e) | Sent::Refused(e) => Err(format!("{}: {e}", hook.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_stripe_style_hmac() {
        // HMAC-SHA256("key", "1700000000.{}") computed independently.
        let s = signature(b"key", 1_700_000_000, b"{}");
        assert_eq!(
            s,
            "t=1700000000,v1=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
        assert_ne!(s, signature(b"key", 1_700_000_001, b"{}"));
        assert_ne!(s, signature(b"other", 1_700_000_000, b"{}"));
    }
}
