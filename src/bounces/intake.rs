//! The end of DATA at the `[bounces]` listener: the report's body is
//! written to a file of its own and synced, its record committed (batched
//! with the queue's commits) before the `250`, then it is applied in the
//! background. Reports live within `[bounces] max_stored`.

use crate::bounces::{Record, State, Target};
use crate::replies::{self, Reply};
use crate::smtp_in::spool::Spool;
use crate::state::envelope::Transaction;
use crate::state::spool::now_ms;
use crate::state::Services;

pub async fn accept(s: &Services, t: Transaction, target: Option<Target>, spool: Spool) -> Reply {
    let Some(b) = s.bounces.clone() else {
        return replies::NOT_ACCEPTING_REPORTS_DATA;
    };
    let Some(target) = target else {
        return replies::NEED_RCPT;
    };
    if s.store.health.is_failed() {
        return replies::STORAGE_ERROR;
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
    if rec.target.is_open() && !b.complaint_room(size) {
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
            return replies::STORAGE_ERROR;
        }
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "storing a report failed");
            return replies::STORAGE_ERROR;
        }
    }
    match s.store.commit().await {
        Ok(()) => {
            b.enqueue(&id);
            replies::report_stored(&id)
        }
        Err(e) => {
            tracing::error!(peer = %t.peer, error = %e, "cannot commit a report");
            b.remove(&id);
            replies::STORAGE_ERROR
        }
    }
}

/// `452` for a report that does not fit `max_stored` now (`share`: which
/// part of it is full of reports not applied yet), at RCPT or at the end
/// of DATA.
pub fn full(b: &crate::bounces::Bounces, peer: std::net::IpAddr, share: &str) -> Reply {
    b.count("refused_full");
    let (now, max) = b.stored();
    tracing::debug!(
        %peer,
        stored = now,
        max_stored = max,
        "report refused for now: {share} of bounces.max_stored is taken by reports not applied yet"
    );
    replies::REPORT_STORAGE_FULL
}
