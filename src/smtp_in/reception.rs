//! The end of DATA: turn a received transaction into a queued message.
//!
//! This is where a `250` is earned: the message is prepared (rewrite), put
//! in the queue with a `received` event per recipient, and committed to disk
//! before the caller answers.

use std::net::IpAddr;
use std::time::Duration;

use crate::live::Live;
use crate::replies::{self, Reply};
use crate::smtp_in::spool::Spool;
use crate::state::envelope::Transaction;
use crate::state::spool::{now_ms, Envelope, Rcpt, RcptStatus};
use crate::state::Services;

/// `rejected` events one connection may write: a hostile client must not
/// be able to fill history (or the disk) with its own refusals.
pub const MAX_REJECTED_PER_SESSION: usize = 100;

/// Refusals of one connection put on record, so that `herald trace` can
/// say herald refused the mail instead of blaming the platform: one
/// `rejected` event per recipient and transaction, at most
/// [`MAX_REJECTED_PER_SESSION`] per connection.
#[derive(Default)]
pub struct Refusals {
    recorded: usize,
    in_transaction: std::collections::HashSet<String>,
    capped: bool,
}

impl Refusals {
    pub fn new_transaction(&mut self) {
        self.in_transaction.clear();
    }

    /// Records the refusal `code text` for each of `rcpts` (logged at
    /// info once for all of them).
    pub fn record(&mut self, s: &Services, peer: IpAddr, rcpts: &[String], r: &Reply) {
        tracing::info!(%peer, rcpts = rcpts.len(), first = %rcpts.first().map(String::as_str).unwrap_or(""), reply = %r, "rejected");
        let detail = format!("from {peer}: {r}");
        for r in rcpts {
            let key = match r.rsplit_once('@') {
                Some((l, d)) => format!("{l}@{}", d.to_ascii_lowercase()),
                None => r.clone(),
            };
            if !self.in_transaction.insert(key) {
                continue;
            }
            if self.recorded >= MAX_REJECTED_PER_SESSION {
                if !self.capped {
                    self.capped = true;
                    tracing::warn!(%peer, "more than {MAX_REJECTED_PER_SESSION} refusals in one connection: the rest are logged, not recorded");
                }
                return;
            }
            self.recorded += 1;
            if let Err(e) = s.ledger().rejected(r, &detail) {
                tracing::warn!(error = %e, "could not record a refusal");
                return;
            }
        }
    }
}

/// Queues the message; returns the SMTP reply to send. `live` is the
/// configuration of the transaction: one rewrite policy and one key set.
pub async fn accept(s: &Services, live: &Live, t: Transaction, spool: Spool) -> Reply {
    // A storage that failed a sync cannot be trusted with a 250: say so at
    // once rather than let the client wait for a disk that does not answer.
    if s.store.health.is_failed() {
        tracing::debug!(peer = %t.peer, "message refused: storage failed");
        return replies::STORAGE_ERROR;
    }
    let id = s.store.ids.next();
    // The message, its rewritten and signed copies and sled's: their share
    // of the memory budget, held until the message is on disk. Large
    // messages wait here, on disk, rather than all in memory at once.
    let _memory = s.memory.reserve(4 * spool.len()).await;
    let data = match spool.into_bytes() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "cannot read back the spooled message");
            return replies::STORAGE_ERROR;
        }
    };
    let reference = s.bounces.as_ref().map(|b| &b.key);
    let (prepared, delay) = match crate::pipeline::prepare(live, reference, &t, &id, &data) {
        Ok(p) => p,
        Err(refusal) => return refusal,
    };
    let upstream = prepared.upstream.clone();
    let now = now_ms();
    let due = now + delay.as_millis() as u64;
    let env = Envelope {
        v: crate::state::spool::RECORD_VERSION,
        id: id.clone(),
        received_at: now,
        client_ip: t.peer.to_string(),
        helo: t.helo.clone(),
        auth_user: t.auth_user.clone(),
        original_sender: t.sender.clone(),
        mail_from: prepared.mail_from.clone(),
        upstream,
        tag: prepared.tag.clone(),
        subject: prepared.subject.clone(),
        tenant: prepared.tenant.clone(),
        size: prepared.message.len(),
        smtputf8: t.smtputf8,
        body_8bit: t.body_8bit,
        rcpts: t
            .rcpts
            .iter()
            .map(|a| Rcpt {
                addr: a.clone(),
                status: RcptStatus::Queued,
                attempts: 0,
                next_attempt: due,
                last_reply: None,
                last_host: None,
                updated: now,
                class: None,
            })
            .collect(),
    };
    let detail = format!(
        "from <{}> via {} ({}), {} bytes{}",
        t.sender,
        t.peer,
        t.helo,
        env.size,
        if delay.is_zero() {
            String::new()
        } else {
            format!(
                ", held {}",
                crate::config::format_duration(Duration::from_secs(delay.as_secs()))
            )
        }
    );
    // Suppressed recipients are accepted, recorded, and never attempted.
    let mut env = env;
    let stored = s.ledger().receive(&mut env, &prepared.message, &detail);
    let committed = match stored {
        Ok(()) => s.store.commit().await,
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        // Not acknowledged, so it must not go out either: the client will
        // send it again.
        let _ = s.store.remove(&id);
        // A write that failed (a full disk) fails the storage like a sync
        // that failed: /healthz says 503 until a probe write succeeds.
        if matches!(
            e,
            crate::state::spool::QueueError::Sled(_) | crate::state::spool::QueueError::Io(_)
        ) {
            s.store.health.fail(&e.to_string());
        }
        tracing::error!(%id, error = %e, "could not store message");
        return replies::STORAGE_ERROR;
    }
    tracing::info!(
        %id,
        from = %t.sender,
        rcpts = env.rcpts.len(),
        size = env.size,
        upstream = %env.upstream,
        "received"
    );
    if !env.is_done() {
        s.scheduler.schedule(&id, due);
    }
    replies::queued(&id)
}
