//! The front half of a message's journey, between the end of DATA and the
//! queue: received bytes -> rewritten (sender, headers: [`rewrite`]) ->
//! tracked (the open pixel) -> referenced (`X-Herald-Ref`, with
//! `[bounces]`) -> transportable (no line over 998 bytes) -> signed (DKIM,
//! last, over the final headers and body).

use std::time::Duration;

use crate::live::Live;
use crate::replies::{self, Reply};
use crate::rewrite::{self, Prepared};
use crate::state::envelope::Transaction;

/// Why a message cannot be queued, as the SMTP reply that says so.
pub type Refusal = Reply;

/// The message as it will leave, and how long it is held first.
pub fn prepare(
    live: &Live,
    reference: Option<&crate::token::Key>,
    t: &Transaction,
    id: &str,
    data: &[u8],
) -> Result<(Prepared, Duration), Refusal> {
    let cfg = &live.cfg;
    let has_key = |d: &str| live.signers.has_key_for(d);
    let mut prepared = match rewrite::prepare(cfg, &has_key, t, id, data) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(peer = %t.peer, error = %e, "message refused");
            return Err(replies::refused_message(&e.to_string()));
        }
    };
    let delay = prepared.delay.unwrap_or(cfg.delivery.send_delay);
    if delay > cfg.delivery.max_age {
        return Err(replies::delay_beyond_max_age(cfg.delivery.max_age));
    }
    if let (Some(key), true) = (live.tracking_key.as_deref(), prepared.track) {
        let url = format!(
            "{}/o/{}.gif",
            cfg.tracking.base_url.trim_end_matches('/'),
            crate::tracking::token(key, id)
        );
        prepared.message = crate::tracking::inject(&prepared.message, &url);
    }
    // A reference that maps a complaint quoting the message back to it
    // (signed by its MAC, and by DKIM below).
    if let Some(key) = reference {
        let h = format!("X-Herald-Ref: {}\r\n", crate::token::reference(key, id));
        prepend(&mut prepared.message, h.as_bytes());
    }
    // Lines over 998 bytes re-encoded, so that no hop rewraps what we sign.
    if let Some(m) = crate::mime::transportable(&prepared.message) {
        prepared.message = m;
    }
    let domain = prepared.from.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    match live.signers.sign(domain, &prepared.message) {
        Ok(Some(sig)) => prepend(&mut prepared.message, sig.as_bytes()),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(%id, error = %e, "DKIM signing failed");
            return Err(replies::SIGNING_ERROR);
        }
    }
    Ok((prepared, delay))
}

fn prepend(message: &mut Vec<u8>, head: &[u8]) {
    let mut m = Vec::with_capacity(head.len() + message.len());
    m.extend_from_slice(head);
    m.extend_from_slice(message);
    *message = m;
}
