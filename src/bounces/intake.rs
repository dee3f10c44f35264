//! The end of DATA at the `[bounces]` listener: the report is written and
//! committed (flush + fsync, batched with the queue's commits) before the
//! `250`, then applied in the background.

use crate::bounces::{Record, State, Target};
use crate::envelope::Transaction;
use crate::queue::now_ms;
use crate::services::Services;
use crate::smtp_in::spool::Spool;

pub async fn accept(
    s: &Services,
    t: Transaction,
    target: Option<Target>,
    spool: Spool,
) -> (u16, String) {
    let Some(b) = s.bounces.as_ref() else {
        return (554, "5.7.1 Not accepting reports".into());
    };
    let Some(target) = target else {
        return (503, "5.5.1 Need RCPT command first".into());
    };
    if s.store.health.is_failed() {
        return (451, "4.3.0 Local storage error; try again later".into());
    }
    let _memory = s.memory.reserve(2 * spool.len()).await;
    let raw = match spool.into_bytes() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "cannot read back the spooled report");
            return (451, "4.3.0 Local storage error; try again later".into());
        }
    };
    let id = s.store.ids.next();
    let rec = Record {
        id: id.clone(),
        received_ms: now_ms(),
        peer: t.peer.to_string(),
        helo: t.helo.clone(),
        mail_from: t.sender.clone(),
        rcpt: t.rcpts.first().cloned().unwrap_or_default(),
        target,
        size: raw.len(),
        state: State::Pending,
        kind: None,
        message: None,
        recipient: None,
        summary: None,
    };
    if let Err(e) = b.store(&rec, &raw) {
        tracing::error!(peer = %t.peer, error = %e, "cannot store a report");
        return (451, "4.3.0 Local storage error; try again later".into());
    }
    match s.store.commit().await {
        Ok(()) => {
            b.enqueue(&id);
            (250, format!("2.0.0 Ok: report stored as {id}"))
        }
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "cannot commit a report");
            b.unstore(&id);
            (451, "4.3.0 Local storage error; try again later".into())
        }
    }
}
