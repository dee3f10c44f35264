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

pub mod intake;
pub mod token;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::history::{EventKind, Extra};
use crate::queue::{now_ms, QueueError, RcptStatus};
use crate::reply::Class;
use crate::report::{Kind, Report};
use crate::services::Services;

const DAY_MS: u64 = 86_400_000;

/// What a report was sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "lowercase")]
pub enum Target {
    /// A return-path token: message and recipient index.
    Token { id: String, index: usize },
    /// The feedback-loop address.
    Complaint,
}

/// Where a stored report stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// On disk, not yet applied (a restart applies it).
    Pending,
    /// Applied: an event was recorded.
    Applied,
    /// Understood and deliberately not acted on (auto-reply, delivery
    /// notice, not-spam, authentication failure).
    Ignored,
    /// Understood, but the message or recipient it names is not known.
    Unmatched,
    /// Not understood: kept for an operator to read.
    Unparsed,
}

/// One report as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub received_ms: u64,
    pub peer: String,
    pub helo: String,
    /// MAIL FROM of the report ("" for the null sender).
    pub mail_from: String,
    /// The address it was sent to.
    pub rcpt: String,
    pub target: Target,
    pub size: usize,
    pub state: State,
    /// What the parser made of it: "failed", "delayed", "complaint", ...
    #[serde(default)]
    pub kind: Option<String>,
    /// The message and recipient it was applied to.
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub recipient: Option<String>,
    /// One line: what it said, or why it was not applied.
    #[serde(default)]
    pub summary: Option<String>,
}

/// The recipients of a message sent with return-path tokens, by index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sent {
    pub rcpts: Vec<String>,
    pub tag: Option<String>,
    pub subject: Option<String>,
    pub sent_ms: u64,
}

/// Counts per outcome since start, for `/metrics` and `status`.
pub type Counts = BTreeMap<&'static str, u64>;

/// The intake's storage and key.
#[derive(Clone)]
pub struct Bounces {
    pub key: token::Key,
    pub domain: String,
    pub complaint_address: String,
    reports: sled::Tree,
    bodies: sled::Tree,
    sent: sled::Tree,
    counts: Arc<Mutex<Counts>>,
    work: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Every outcome counted, so that `/metrics` shows each from the start.
pub const OUTCOMES: [&str; 11] = [
    "bounced",
    "delayed",
    "complained",
    "auth_failure",
    "not_spam",
    "auto_reply",
    "delivery_notice",
    "unmatched",
    "unparsed",
    "refused_forged",
    "refused_expired",
];

impl Bounces {
    /// Opens the trees; the receiver gets the ids of reports to apply.
    pub fn open(
        db: &sled::Db,
        cfg: &crate::config::Bounces,
    ) -> Result<(Bounces, tokio::sync::mpsc::UnboundedReceiver<String>), QueueError> {
        let (work, rx) = tokio::sync::mpsc::unbounded_channel();
        let b = Bounces {
            key: token::Key::new(cfg.secret.expose().as_bytes()),
            domain: cfg.domain.clone(),
            complaint_address: cfg.complaint_address.clone(),
            reports: db.open_tree("reports")?,
            bodies: db.open_tree("report_bodies")?,
            sent: db.open_tree("return_paths")?,
            counts: Arc::default(),
            work,
        };
        // Reports acknowledged but not applied before a stop.
        for item in b.reports.iter() {
            let (_, v) = item?;
            if let Ok(r) = serde_json::from_slice::<Record>(&v) {
                if r.state == State::Pending {
                    let _ = b.work.send(r.id);
                }
            }
        }
        Ok((b, rx))
    }

    pub fn count(&self, outcome: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(outcome)
            .or_insert(0) += 1;
    }

    pub fn counts(&self) -> Counts {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for o in OUTCOMES {
            c.entry(o).or_insert(0);
        }
        c
    }

    /// The envelope sender for recipient `index` of message `id`.
    pub fn return_path(&self, id: &str, index: usize) -> Option<String> {
        token::make(&self.key, id, index, now_ms()).map(|t| format!("{t}@{}", self.domain))
    }

    /// Notes which address each index of `env` is, once per message, so
    /// that a report arriving after the message left still names it.
    pub fn note_sent(&self, env: &crate::queue::Envelope) {
        let key = env.id.as_bytes();
        if matches!(self.sent.contains_key(key), Ok(true)) {
            return;
        }
        let s = Sent {
            rcpts: env.rcpts.iter().map(|r| r.addr.clone()).collect(),
            tag: env.tag.clone(),
            subject: env.subject.clone(),
            sent_ms: now_ms(),
        };
        if let Ok(v) = serde_json::to_vec(&s) {
            if let Err(e) = self.sent.insert(key, v) {
                tracing::error!(id = %env.id, error = %e, "cannot note the return paths of a message");
            }
        }
    }

    fn sent_record(&self, id: &str) -> Option<Sent> {
        let v = self.sent.get(id.as_bytes()).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// What a recipient address of the bounce domain is, or the SMTP
    /// refusal to give.
    pub fn check_rcpt(&self, addr: &str) -> Result<Target, (u16, String)> {
        let lower = addr.to_ascii_lowercase();
        if lower == self.complaint_address {
            return Ok(Target::Complaint);
        }
        let unknown = || (550, format!("5.1.1 <{addr}>: no such return path here"));
        let Some((local, domain)) = lower.rsplit_once('@') else {
            return Err(unknown());
        };
        if domain != self.domain {
            return Err((
                550,
                format!(
                    "5.7.1 <{addr}>: relaying denied; this server only takes reports for {}",
                    self.domain
                ),
            ));
        }
        match token::verify(&self.key, local, now_ms()) {
            Ok(t) => Ok(Target::Token {
                id: t.id,
                index: t.index,
            }),
            Err(token::Refusal::Forged) => {
                self.count("refused_forged");
                Err(unknown())
            }
            Err(token::Refusal::Expired) => {
                self.count("refused_expired");
                Err((550, format!("5.1.1 <{addr}>: this return path has expired")))
            }
        }
    }

    /// Writes a report received by the listener (not yet durable: the
    /// caller commits, then calls [`Bounces::enqueue`]).
    pub fn store(&self, rec: &Record, raw: &[u8]) -> Result<(), QueueError> {
        let v = serde_json::to_vec(rec).map_err(|_| QueueError::Corrupt(rec.id.clone()))?;
        self.bodies.insert(rec.id.as_bytes(), raw)?;
        self.reports.insert(rec.id.as_bytes(), v)?;
        Ok(())
    }

    /// Forgets a report whose commit failed (the sender was told 451).
    pub fn unstore(&self, id: &str) {
        let _ = self.reports.remove(id.as_bytes());
        let _ = self.bodies.remove(id.as_bytes());
    }

    pub fn enqueue(&self, id: &str) {
        let _ = self.work.send(id.to_string());
    }

    pub fn record(&self, id: &str) -> Option<Record> {
        let v = self.reports.get(id.as_bytes()).ok()??;
        serde_json::from_slice(&v).ok()
    }

    pub fn body(&self, id: &str) -> Option<Vec<u8>> {
        self.bodies.get(id.as_bytes()).ok()?.map(|v| v.to_vec())
    }

    /// Reports, newest first, at most `limit`.
    pub fn list(&self, limit: usize) -> Vec<Record> {
        self.reports
            .iter()
            .rev()
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .take(limit)
            .collect()
    }

    fn save(&self, rec: &Record) {
        if let Ok(v) = serde_json::to_vec(rec) {
            if let Err(e) = self.reports.insert(rec.id.as_bytes(), v) {
                tracing::error!(report = %rec.id, error = %e, "cannot update a report");
            }
        }
    }

    /// Drops reports received before `before_ms` and return-path notes of
    /// messages sent longer ago than a token lives.
    pub fn purge(&self, before_ms: u64) -> usize {
        let mut n = 0;
        for (k, v) in self.reports.iter().filter_map(|i| i.ok()) {
            let old = serde_json::from_slice::<Record>(&v)
                .map(|r| r.received_ms < before_ms && r.state != State::Pending)
                .unwrap_or(true);
            if old {
                let _ = self.reports.remove(&k);
                let _ = self.bodies.remove(&k);
                n += 1;
            }
        }
        let sent_before = now_ms().saturating_sub((token::LIFETIME_DAYS + 1) * DAY_MS);
        for (k, v) in self.sent.iter().filter_map(|i| i.ok()) {
            let old = serde_json::from_slice::<Sent>(&v)
                .map(|s| s.sent_ms < sent_before)
                .unwrap_or(true);
            if old {
                let _ = self.sent.remove(&k);
            }
        }
        n
    }
}

/// Applies reports as they are stored (and those left pending at start).
pub async fn run(s: Arc<Services>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
    while let Some(id) = rx.recv().await {
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
}

fn about(
    s: &Services,
    b: &Bounces,
    id: &str,
    index: Option<usize>,
    hint: Option<&str>,
) -> Option<About> {
    let (rcpts, tag, subject) = match s.store.envelope(id) {
        Ok(Some(env)) => (
            env.rcpts.iter().map(|r| r.addr.clone()).collect::<Vec<_>>(),
            env.tag,
            env.subject,
        ),
        _ => {
            let sent = b.sent_record(id)?;
            (sent.rcpts, sent.tag, sent.subject)
        }
    };
    let rcpt = match index {
        Some(i) => rcpts.get(i)?.clone(),
        None => {
            let hint = hint.map(|h| h.trim().trim_matches(['<', '>']).to_ascii_lowercase());
            match hint.and_then(|h| rcpts.iter().find(|r| r.to_ascii_lowercase() == h)) {
                Some(r) => r.clone(),
                None if rcpts.len() == 1 => rcpts[0].clone(),
                None => return None,
            }
        }
    };
    Some(About {
        id: id.to_string(),
        rcpt,
        tag,
        subject,
    })
}

/// Which message and recipient a complaint names: the token of the quoted
/// return path, else the `X-Herald-Ref:` of the quoted message (with the
/// report's Original-Rcpt-To, or the message's only recipient).
fn complaint_about(s: &Services, b: &Bounces, rec: &Record, rep: &Report) -> Option<About> {
    if let Target::Token { id, index } = &rec.target {
        return about(s, b, id, Some(*index), None);
    }
    if let Some(rp) = &rep.quoted_return_path {
        if let Some((local, domain)) = rp.rsplit_once('@') {
            // A complaint may come long after the token's lifetime: the
            // signature matters here, not the expiry.
            if domain.eq_ignore_ascii_case(&b.domain) {
                // (a check as of day 0 never finds a token expired).
                if let Ok(t) = token::verify(&b.key, local, 0) {
                    return about(s, b, &t.id, Some(t.index), None);
                }
            }
        }
    }
    let id = token::verify_reference(&b.key, rep.herald_ref.as_deref()?)?;
    let hint = rep
        .feedback
        .as_ref()
        .and_then(|f| f.original_rcpt_to.as_deref());
    about(s, b, &id, None, hint)
}

/// Parses and applies one stored report.
fn apply(s: &Services, rid: &str) {
    let Some(b) = s.bounces.as_ref() else { return };
    let Some(mut rec) = b.record(rid) else { return };
    if rec.state != State::Pending {
        return;
    }
    let raw = b.body(rid).unwrap_or_default();
    let rep = crate::report::parse(&raw);
    rec.kind = Some(kind_name(&rep.kind).to_string());
    let (outcome, state, summary) = decide(s, b, &mut rec, &rep);
    b.count(outcome);
    rec.state = state;
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

fn decide(
    s: &Services,
    b: &Bounces,
    rec: &mut Record,
    rep: &Report,
) -> (&'static str, State, String) {
    let token_about = |rec: &Record| match &rec.target {
        Target::Token { id, index } => about(s, b, id, Some(*index), None),
        Target::Complaint => None,
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
        Kind::Complaint => {
            let Some(a) = complaint_about(s, b, rec, rep) else {
                return (
                    "unmatched",
                    State::Unmatched,
                    "a complaint that names no message of herald's (no genuine X-Herald-Ref or return path quoted)".into(),
                );
            };
            let f = rep.feedback.as_ref();
            let detail = format!(
                "complaint ({}) from {} (report {})",
                f.map(|f| f.feedback_type.as_str()).unwrap_or("abuse"),
                f.and_then(|f| f.user_agent.as_deref())
                    .or(rep.reporting_mta.as_deref())
                    .unwrap_or(&rec.peer),
                rec.id
            );
            let entry = crate::suppression::Entry {
                addr: a.rcpt.to_lowercase(),
                reason: "complaint".into(),
                reply: Some(detail.clone()),
                source_id: Some(a.id.clone()),
                added_ms: now_ms(),
                expires_ms: None,
                automatic: true,
            };
            if let Err(e) = s.suppression.put(&entry) {
                tracing::error!(error = %e, "cannot update the suppression list");
            } else {
                tracing::warn!(rcpt = %a.rcpt, "address suppressed after a complaint (herald suppression remove to lift)");
            }
            let extra = Extra {
                report: Some(rec.id.clone()),
                ..Default::default()
            };
            record(s, &a, EventKind::Complained, &detail, extra);
            rec.message = Some(a.id);
            rec.recipient = Some(a.rcpt);
            ("complained", State::Applied, detail)
        }
        Kind::Failed | Kind::Delayed => {
            let Some(a) = token_about(rec) else {
                let why = match &rec.target {
                    Target::Complaint => {
                        "a delivery report sent to the complaint address".to_string()
                    }
                    Target::Token { id, .. } => {
                        format!("message {id} is no longer in the queue or the record of sent mail")
                    }
                };
                return ("unmatched", State::Unmatched, why);
            };
            let failed = rep.kind == Kind::Failed;
            let want = if failed { "failed" } else { "delayed" };
            let r = rep
                .recipients
                .iter()
                .find(|r| r.action.as_deref() == Some(want))
                .or(rep.recipients.first());
            let line = r
                .map(reply_line)
                .unwrap_or_else(|| "no reason given".into());
            let remote = r
                .and_then(|r| r.remote_mta.clone())
                .or(rep.reporting_mta.clone());
            let class = r.and_then(|r| r.class).unwrap_or(if failed {
                Class::Policy
            } else {
                Class::Transient
            });
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
                record(s, &a, EventKind::Delayed, &detail, extra);
                return ("delayed", State::Applied, detail);
            }
            let detail = format!("{line}{}", bounced_suffix(class, reporter));
            // Still queued and not final (a report from an earlier hop
            // while herald retries): it is final now.
            let _ = s.store.update(&a.id, |env| {
                if let Some(r) = env.rcpts.iter_mut().find(|r| r.addr == a.rcpt) {
                    if !r.status.is_final() {
                        r.status = RcptStatus::Bounced;
                        r.class = Some(class);
                        r.last_reply = Some(detail.clone());
                        r.updated = now_ms();
                    }
                }
            });
            if class.suppresses() {
                crate::delivery::note_hard_bounce(s, &a.rcpt, &line, &a.id);
            }
            record(s, &a, EventKind::Bounced, &detail, extra);
            ("bounced", State::Applied, detail)
        }
    }
}

fn record(s: &Services, a: &About, kind: EventKind, detail: &str, extra: Extra) {
    if let Err(e) = s.history.record_with(
        kind,
        &a.id,
        &a.rcpt,
        detail,
        a.tag.as_deref(),
        a.subject.as_deref(),
        extra,
    ) {
        tracing::error!(error = %e, "cannot record history");
    }
}
