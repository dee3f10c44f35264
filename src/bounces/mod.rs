//! What comes back after the first hop: delivery status notifications to
//! each recipient's signed return path, and feedback-loop complaints.
//!
//! With `[bounces]` set, each recipient of a message goes out with its own
//! envelope sender `b-TOKEN@DOMAIN` ([`token`]), and every message carries
//! a signed `X-Herald-Ref:`. The `[bounces] listen` listener is an inbound
//! MX for that domain only: it accepts mail to a genuine, unexpired token
//! and to `complaint_address`, one recipient per transaction, stores each
//! report durably before its `250`, then parses it ([`crate::report`]) and
//! applies it: `bounced` (with the class, feeding suppression as a reply
//! at RCPT would), `delayed`, `complained` (suppressed with reason
//! `complaint`, no expiry); auto-replies, delivery notices, `not-spam` and
//! authentication-failure reports are counted, never acted on. A report
//! that cannot be parsed is kept for `herald show` and logged.
//!
//! Trees: `reports` (report id -> [`Record`]), `report_bodies` (id -> the
//! report as received), `return_paths` (queue id -> [`Sent`]: which
//! address each recipient index was, for reports that arrive after the
//! message left the queue).

pub mod aggregate;
pub mod intake;

pub use crate::state::reports::{Bounces, Record, State, Target};
pub use crate::token;

use std::sync::Arc;

use crate::reply::Class;
use crate::report::{Kind, Report};
use crate::state::history::Extra;
use crate::state::ledger::Reported;
use crate::state::reports::{Sent, SUMMARY_MAX};
use crate::state::Services;

/// Applies reports as they are stored (and those left pending at start),
/// one at a time, until shutdown.
pub async fn run(s: Arc<Services>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut shutdown = s.shutdown.clone();
    loop {
        let id = tokio::select! {
            id = rx.recv() => match id {
                Some(id) => id,
                None => return,
            },
            // What is not applied yet stays pending: the next start applies it.
            _ = shutdown.wait() => return,
        };
        let s2 = s.clone();
        // Parsing is CPU work on up to max_size bytes: off the runtime.
        let r = tokio::task::spawn_blocking(move || apply(&s2, &id)).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "applying a report failed");
        }
    }
}

/// The message and recipient a report is about.
struct About {
    id: String,
    rcpt: String,
    tag: Option<String>,
    subject: Option<String>,
    tenant: Option<String>,
}

impl About {
    fn reported(&self) -> Reported<'_> {
        Reported {
            id: &self.id,
            rcpt: &self.rcpt,
            tag: self.tag.as_deref(),
            subject: self.subject.as_deref(),
            tenant: self.tenant.as_deref(),
        }
    }
}

/// What a message was: its recipients by index, tag, subject and tenant.
fn message_of(s: &Services, b: &Bounces, id: &str) -> Option<Sent> {
    match s.store.envelope(id) {
        Ok(Some(env)) => Some(Sent {
            rcpts: env.rcpts.iter().map(|r| r.addr.clone()).collect(),
            tag: env.tag,
            subject: env.subject,
            sent_ms: env.received_at,
            tenant: env.tenant,
        }),
        _ => b.sent_record(id),
    }
}

/// Recipient `index` of message `id`, as a signed token names it.
fn about(s: &Services, b: &Bounces, id: &str, index: usize) -> Option<About> {
    let m = message_of(s, b, id)?;
    Some(About {
        id: id.to_string(),
        rcpt: m.rcpts.get(index)?.clone(),
        tag: m.tag,
        subject: m.subject,
        tenant: m.tenant,
    })
}

/// Whom a complaint is about.
enum Complained {
    /// One recipient, named by signed data.
    Recipient(About),
    /// A message of several recipients, none of them named by signed
    /// data: the report's own words (Original-Rcpt-To) cannot choose one.
    Message {
        id: String,
        rcpts: usize,
    },
    Nothing,
}

/// Which recipient a complaint names: only signed data decides. The
/// return-path token it was sent to, else the token of the quoted
/// Return-Path, else the quoted `X-Herald-Ref:` when that message had one
/// recipient. A report's Original-Rcpt-To is text its sender wrote: a
/// recipient of a message could name another one of it.
fn complaint_about(s: &Services, b: &Bounces, rec: &Record, rep: &Report) -> Complained {
    let pinned = |a: Option<About>| a.map(Complained::Recipient).unwrap_or(Complained::Nothing);
    if let Target::Token { id, index } = &rec.target {
        return pinned(about(s, b, id, *index));
    }
    if let Some(rp) = &rep.quoted_return_path {
        if let Some((local, domain)) = rp.rsplit_once('@') {
            // A complaint may come long after the token's lifetime: the
            // signature matters here, not the expiry
            // (a check as of day 0 never finds a token expired).
            if domain.eq_ignore_ascii_case(&b.domain) {
                if let Ok(t) = token::verify(&b.key, local, 0) {
                    return pinned(about(s, b, &t.id, t.index));
                }
            }
        }
    }
    let Some(id) = rep
        .herald_ref
        .as_deref()
        .and_then(|r| token::verify_reference(&b.key, r))
    else {
        return Complained::Nothing;
    };
    match message_of(s, b, &id) {
        Some(m) if m.rcpts.len() == 1 => Complained::Recipient(About {
            id,
            rcpt: m.rcpts[0].clone(),
            tag: m.tag,
            subject: m.subject,
            tenant: m.tenant,
        }),
        Some(m) => Complained::Message {
            id,
            rcpts: m.rcpts.len(),
        },
        None => Complained::Nothing,
    }
}

/// Parses and applies one stored report.
fn apply(s: &Services, rid: &str) {
    let Some(b) = s.bounces.as_ref() else { return };
    let Some(mut rec) = b.record(rid) else { return };
    if rec.state != State::Pending {
        return;
    }
    let raw = b.body(rid).unwrap_or_default();
    let (outcome, state, summary) = if matches!(rec.target, Target::Dmarc | Target::TlsRpt) {
        aggregate::apply(s, b, &mut rec, &raw)
    } else {
        let rep = crate::report::parse(&raw);
        drop(raw);
        rec.kind = Some(kind_name(&rep.kind).to_string());
        decide(s, b, &mut rec, &rep)
    };
    b.count(outcome);
    rec.state = state;
    let summary = cut(&summary, SUMMARY_MAX);
    rec.summary = Some(summary.clone());
    match state {
        State::Unparsed => {
            tracing::warn!(report = %rid, from = %rec.peer, rcpt = %rec.rcpt, "report not understood, kept for herald show: {summary}")
        }
        State::Unmatched => {
            tracing::warn!(report = %rid, from = %rec.peer, "report names no message herald knows: {summary}")
        }
        State::Ignored => tracing::info!(report = %rid, "report ignored: {summary}"),
        _ => {
            tracing::info!(report = %rid, id = rec.message.as_deref().unwrap_or(""), rcpt = rec.recipient.as_deref().unwrap_or(""), "report applied: {summary}")
        }
    }
    b.save(&rec);
    b.complaint_applied(&rec);
    b.trim(rid);
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Failed => "failed",
        Kind::Delayed => "delayed",
        Kind::Delivered => "delivered",
        Kind::AutoReply => "auto-reply",
        Kind::Complaint => "complaint",
        Kind::AuthFailure => "auth-failure",
        Kind::NotSpam => "not-spam",
        Kind::Unparsed => "unparsed",
    }
}

/// What follows the remote reply in the detail of a `bounced` event from
/// a report; `trace` strips it again to quote the reply alone.
pub fn bounced_suffix(class: Class, reporter: &str) -> String {
    format!(" ({class}: {}; reported by {reporter})", class.meaning())
}

/// What the report says happened, as one line: "550 5.1.1 ... ".
fn reply_line(r: &crate::report::RecipientResult) -> String {
    let esc = r
        .status
        .map(|e| format!("{}.{}.{}", e[0], e[1], e[2]))
        .unwrap_or_default();
    let diag = r.diagnostic.clone().unwrap_or_default();
    let mut line = String::new();
    if let Some(c) = r.code {
        if !diag.starts_with(&c.to_string()) {
            line.push_str(&format!("{c} "));
        }
    }
    if !esc.is_empty() && !diag.contains(&esc) {
        line.push_str(&esc);
        line.push(' ');
    }
    line.push_str(&diag);
    let line = line.trim().to_string();
    if line.is_empty() {
        "no reason given".into()
    } else {
        line
    }
}

fn decide(s: &Services, b: &Bounces, rec: &mut Record, rep: &Report) -> Decision {
    // The second report of the same outcome for the same recipient of the
    // same message changes nothing (a flood of copies, or a server that
    // reports twice).
    let rid = rec.id.clone();
    let repeat = |a: &About, outcome: &str| {
        b.first_of(&a.id, &a.rcpt, outcome, &rid).err().map(|earlier| {
            (
                "duplicate",
                State::Ignored,
                format!(
                    "a repeat: {outcome} was recorded for {} of message {} already (report {earlier}); nothing more done",
                    a.rcpt, a.id
                ),
            )
        })
    };
    match rep.kind {
        Kind::Unparsed => (
            "unparsed",
            State::Unparsed,
            rep.problem
                .clone()
                .unwrap_or_else(|| "not a delivery report or complaint".into()),
        ),
        Kind::AutoReply => (
            "auto_reply",
            State::Ignored,
            "an automatic reply (RFC 3834): nothing about delivery".into(),
        ),
        Kind::Delivered => (
            "delivery_notice",
            State::Ignored,
            "a notice of delivery or relay".into(),
        ),
        Kind::NotSpam => (
            "not_spam",
            State::Ignored,
            "a not-spam feedback report".into(),
        ),
        Kind::AuthFailure => {
            let f = rep.feedback.as_ref();
            (
                "auth_failure",
                State::Ignored,
                format!(
                    "an authentication-failure report{}: check herald check-dns (DKIM, SPF, DMARC); nobody is suppressed",
                    f.and_then(|f| f.user_agent.as_deref())
                        .map(|u| format!(" from {u}"))
                        .unwrap_or_default()
                ),
            )
        }
        Kind::Complaint => complaint(s, b, rec, rep, &repeat),
        Kind::Failed | Kind::Delayed => delivery_report(s, b, rec, rep, &repeat),
    }
}

/// What a report came to: the outcome counted, the record's state, and the
/// summary kept with it.
pub(super) type Decision = (&'static str, State, String);

/// A repeat of an outcome already recorded, or None.
type Repeat<'a> = dyn Fn(&About, &str) -> Option<Decision> + 'a;

/// A complaint: the recipient it is pinned to (by signed data only) is
/// suppressed.
fn complaint(
    s: &Services,
    b: &Bounces,
    rec: &mut Record,
    rep: &Report,
    repeat: &Repeat,
) -> Decision {
    let a = match complaint_about(s, b, rec, rep) {
        Complained::Recipient(a) => a,
        Complained::Message { id, rcpts } => {
            let summary = format!(
                "a complaint about message {id}, sent to {rcpts} recipients, that names none of them by a signed return path: recorded against the message, nobody suppressed{}",
                rep.feedback
                    .as_ref()
                    .and_then(|f| f.original_rcpt_to.as_deref())
                    .map(|r| format!(" (the report's own text says {r}, which herald does not trust)"))
                    .unwrap_or_default()
            );
            rec.message = Some(id);
            return ("complaint_unpinned", State::Ignored, summary);
        }
        Complained::Nothing => {
            return (
                "unmatched",
                State::Unmatched,
                "a complaint that names no message of herald's (no genuine X-Herald-Ref or return path quoted)".into(),
            )
        }
    };
    if let Some(dup) = repeat(&a, "complained") {
        rec.message = Some(a.id);
        rec.recipient = Some(a.rcpt);
        return dup;
    }
    let f = rep.feedback.as_ref();
    let detail = format!(
        "complaint ({}) from {} (report {})",
        f.map(|f| f.feedback_type.as_str()).unwrap_or("abuse"),
        f.and_then(|f| f.user_agent.as_deref())
            .or(rep.reporting_mta.as_deref())
            .unwrap_or(&rec.peer),
        rec.id
    );
    let extra = Extra {
        report: Some(rec.id.clone()),
        ..Default::default()
    };
    s.ledger().complained(&a.reported(), &detail, extra);
    rec.message = Some(a.id);
    rec.recipient = Some(a.rcpt);
    ("complained", State::Applied, detail)
}

/// A delivery status notification (failed or delayed) to a return path.
fn delivery_report(
    s: &Services,
    b: &Bounces,
    rec: &mut Record,
    rep: &Report,
    repeat: &Repeat,
) -> Decision {
    let token_about = |rec: &Record| match &rec.target {
        Target::Token { id, index } => about(s, b, id, *index),
        _ => None,
    };
    let Some(a) = token_about(rec) else {
        let why = match &rec.target {
            Target::Complaint => "a delivery report sent to the complaint address".to_string(),
            Target::Dmarc | Target::TlsRpt => "a delivery report sent to a report address".into(),
            Target::Token { id, .. } => {
                format!("message {id} is no longer in the queue or the record of sent mail")
            }
        };
        return ("unmatched", State::Unmatched, why);
    };
    let failed = rep.kind == Kind::Failed;
    if let Some(dup) = repeat(&a, if failed { "bounced" } else { "delayed" }) {
        rec.message = Some(a.id.clone());
        rec.recipient = Some(a.rcpt.clone());
        return dup;
    }
    let outcome = rep.outcome();
    let r = outcome.recipient.map(|i| &rep.recipients[i]);
    let line = r
        .map(reply_line)
        .unwrap_or_else(|| "no reason given".into());
    let remote = r
        .and_then(|r| r.remote_mta.clone())
        .or(rep.reporting_mta.clone());
    let class = outcome.class.unwrap_or(Class::Transient);
    let extra = Extra {
        class: Some(class),
        upstream: remote.clone(),
        report: Some(rec.id.clone()),
        ..Default::default()
    };
    rec.message = Some(a.id.clone());
    rec.recipient = Some(a.rcpt.clone());
    let reporter = remote.as_deref().unwrap_or(&rec.peer);
    if !failed {
        let detail = format!("{line} (delayed; reported by {reporter})");
        s.ledger().reported_delay(&a.reported(), &detail, extra);
        return ("delayed", State::Applied, detail);
    }
    let detail = format!("{line}{}", bounced_suffix(class, reporter));
    let l = s.ledger();
    l.reported_bounce(
        &a.reported(),
        class,
        &line,
        &detail,
        outcome.suppress,
        extra,
    );
    ("bounced", State::Applied, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_cut_at_a_character_boundary() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(400);
        let c = cut(&long, 601);
        assert!(c.len() <= 604 && c.ends_with("..."), "{c}");
    }
}
