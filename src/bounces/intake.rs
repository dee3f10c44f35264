//! The end of DATA at the `[bounces]` listener: the report's body is
//! written to a file of its own and synced, its record committed (batched
//! with the queue's commits) before the `250`, then it is applied in the
//! background. Reports live within `[bounces] max_stored`.

use crate::bounces::{Record, State, Target};
use crate::smtp_in::spool::Spool;
use crate::state::envelope::Transaction;
use crate::state::spool::now_ms;
use crate::state::Services;

const STORAGE_ERROR: &str = "4.3.0 Local storage error; try again later";

pub async fn accept(
    s: &Services,
    t: Transaction,
    target: Option<Target>,
    spool: Spool,
) -> (u16, String) {
    let Some(b) = s.bounces.clone() else {
        return (554, "5.7.1 Not accepting reports".into());
    };
    let Some(target) = target else {
        return (503, "5.5.1 Need RCPT command first".into());
    };
    if s.store.health.is_failed() {
        return (451, STORAGE_ERROR.into());
    }
    let id = s.store.ids.next();
    let rec = Record {
        id: id.clone(),
        received_ms: now_ms(),
        peer: t.peer.to_string(),
        helo: t.helo.clone(),
        mail_from: t.sender.clone(),
        rcpt: t.rcpts.first().cloned().unwrap_or_default(),
        target,
        size: spool.len(),
        state: State::Pending,
        kind: None,
        message: None,
        recipient: None,
        summary: None,
    };
    let size = spool.len() as u64;
    if rec.target == Target::Complaint && !b.complaint_room(size) {
        return full(&b, t.peer, "the complaint address's half");
    }
    let b2 = b.clone();
    let stored = tokio::task::spawn_blocking(move || {
        if !b2.make_room(size) {
            return Ok(false);
        }
        b2.store(&rec, |mut w| spool.write_to(&mut w))
            .map(|()| true)
    })
    .await;
    match stored {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return full(&b, t.peer, "all"),
        Ok(Err(e)) => {
            tracing::error!(peer = %t.peer, error = %e, "cannot store a report");
            return (451, STORAGE_ERROR.into());
        }
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "storing a report failed");
            return (451, STORAGE_ERROR.into());
        }
    }
    match s.store.commit().await {
        Ok(()) => {
            b.enqueue(&id);
            (250, format!("2.0.0 Ok: report stored as {id}"))
        }
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "cannot commit a report");
            b.remove(&id);
            (451, STORAGE_ERROR.into())
        }
    }
}

/// `452` for a report that does not fit `max_stored` now (`share`: which
/// part of it is full of reports not applied yet), at RCPT or at the end
/// of DATA.
pub fn full(b: &crate::bounces::Bounces, peer: std::net::IpAddr, share: &str) -> (u16, String) {
    b.count("refused_full");
    let (now, max) = b.stored();
    tracing::debug!(
        %peer,
        stored = now,
        max_stored = max,
        "report refused for now: {share} of bounces.max_stored is taken by reports not applied yet"
    );
    (452, "4.3.1 Report storage full; try again later".into())
}
