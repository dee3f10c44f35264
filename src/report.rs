//! Reading what comes back to the `[bounces]` listener: delivery status
//! notifications (RFC 3464 `message/delivery-status` and
//! `message/global-delivery-status`), the plain-text bounces of servers
//! that send no such part (qmail, older Exchange, Yahoo, ...), feedback-loop
//! reports (ARF, RFC 5965) and auto-replies (RFC 3834). Pure: bytes in, a
//! [`Report`] out; it never panics and gives up with [`Kind::Unparsed`].
//!
//! The class of a refusal comes from [`crate::reply::classify`] with the
//! stage of DATA: only words or enhanced codes that say the address does
//! not exist make it `hard` (the only class that suppresses); a bare 5xx
//! without either is `policy`, since wrongly suppressing a customer's
//! address is the worse mistake.

use crate::reply::{classify, Class, Stage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Failed,
    Delayed,
    /// `Action: delivered`, `relayed` or `expanded`.
    Delivered,
    AutoReply,
    /// ARF abuse, fraud, virus or other: a complaint.
    Complaint,
    AuthFailure,
    NotSpam,
    Unparsed,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecipientResult {
    pub final_recipient: Option<String>,
    pub original_recipient: Option<String>,
    /// "failed", "delayed", ... lowercased.
    pub action: Option<String>,
    /// Enhanced status code (RFC 3463).
    pub status: Option<[u16; 3]>,
    /// SMTP reply code found in the diagnostic.
    pub code: Option<u16>,
    /// The remote server's reply, `smtp;` stripped, unfolded.
    pub diagnostic: Option<String>,
    /// `dns;` stripped.
    pub remote_mta: Option<String>,
    pub last_attempt: Option<String>,
    pub class: Option<Class>,
    /// The account exists but is disabled, suspended or inactive: a hard
    /// bounce that does not suppress (it may come back; sisimai's
    /// `suspend`, which is not a hard bounce either).
    pub disabled: bool,
    /// "User unknown" said in reply to DATA: a filter, not the mailbox.
    pub filtered: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Feedback {
    /// Lowercased.
    pub feedback_type: String,
    pub user_agent: Option<String>,
    pub original_rcpt_to: Option<String>,
    pub original_mail_from: Option<String>,
    pub source_ip: Option<String>,
    pub arrival_date: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub kind: Kind,
    pub recipients: Vec<RecipientResult>,
    pub reporting_mta: Option<String>,
    pub feedback: Option<Feedback>,
    /// `X-Herald-Ref:` of the quoted original.
    pub herald_ref: Option<String>,
    /// A quoted `Return-Path:` of herald's form (`b-...@...`), lowercased.
    pub quoted_return_path: Option<String>,
    /// Why parsing gave up (kind Unparsed).
    pub problem: Option<String>,
}

/// What herald does with a report: the event it records, the class of a
/// bounce, whether the address is suppressed. [`crate::bounces`] applies
/// it; the corpus test (tests/report_corpus.rs) measures it against
/// sisimai's verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// "bounced", "delayed", "complained", or None (nothing recorded).
    pub event: Option<&'static str>,
    pub class: Option<Class>,
    pub suppress: bool,
    /// Which of `recipients` the event is about.
    pub recipient: Option<usize>,
}

impl Report {
    /// The recipient result a bounce or delay is about: the first whose
    /// action matches the report's kind, else the first.
    pub fn outcome(&self) -> Outcome {
        let none = Outcome {
            event: None,
            class: None,
            suppress: false,
            recipient: None,
        };
        match self.kind {
            Kind::Complaint => Outcome {
                event: Some("complained"),
                suppress: true,
                ..none
            },
            Kind::Failed | Kind::Delayed => {
                let failed = self.kind == Kind::Failed;
                let want = if failed { "failed" } else { "delayed" };
                let i = self
                    .recipients
                    .iter()
                    .position(|r| r.action.as_deref() == Some(want))
                    .or((!self.recipients.is_empty()).then_some(0));
                let class = i
                    .and_then(|i| self.recipients[i].class)
                    .unwrap_or(if failed {
                        Class::Policy
                    } else {
                        Class::Transient
                    });
                let disabled = i.is_some_and(|i| self.recipients[i].disabled);
                Outcome {
                    event: Some(if failed { "bounced" } else { "delayed" }),
                    class: Some(class),
                    suppress: failed && class.suppresses() && !disabled,
                    recipient: i,
                }
            }
            _ => none,
        }
    }
}

/// Reports are read up to this size (the listener caps them anyway).
const MAX_SCAN: usize = 4 * 1024 * 1024;

pub fn parse(raw: &[u8]) -> Report {
    let mut rep = parse_parts(raw);
    // "User unknown" in reply to DATA is a filter's word, not the
    // mailbox's: the address was accepted at RCPT (Japanese carriers
    // answer so for mail their users' domain filters refuse). It bounces,
    // and suppresses nobody (sisimai's `filtered`).
    // A bare refusal that the report says answered RCPT TO is about the
    // address, as herald judges it live (RFC 5321: a 5xx to RCPT says the
    // mailbox is unavailable): Postfix's "550 <a@b>: Recipient address
    // rejected. (in reply to RCPT TO command)".
    if rep
        .recipients
        .iter()
        .any(|r| r.class == Some(Class::Policy))
    {
        let text = String::from_utf8_lossy(&raw[..raw.len().min(MAX_SCAN)]);
        let t = text.to_ascii_lowercase();
        // (Postfix wraps "(in reply to RCPT\n    TO command)".)
        let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
        if t.contains("in reply to rcpt to command") && !refused_after_data(&text) {
            for r in rep.recipients.iter_mut() {
                if r.class == Some(Class::Policy) && answered_rcpt_is_hard(r) {
                    r.class = Some(Class::Hard);
                }
            }
        }
    }
    if rep.recipients.iter().any(|r| r.class == Some(Class::Hard)) {
        let text = String::from_utf8_lossy(&raw[..raw.len().min(MAX_SCAN)]);
        let after_data = refused_after_data(&text);
        for r in rep.recipients.iter_mut() {
            let diag = r.diagnostic.as_deref().unwrap_or("");
            // (A disabled account suppresses nobody already, and stays
            // what it is: Yahoo answers DATA with "This account has been
            // disabled or discontinued". And Yahoo checks its recipients
            // after DATA: its "This user doesn't have a yahoo.com account"
            // there is the mailbox's own answer, not a filter's.)
            let yahoo = diag.to_ascii_lowercase().contains("user doesn't have a");
            if r.class == Some(Class::Hard)
                && !r.disabled
                && !yahoo
                && (after_data || names_no_address(diag))
            {
                r.class = Some(Class::Policy);
                r.filtered = true;
            }
        }
    }
    rep
}

/// Whether a refusal judged at DATA is hard at RCPT: a 5xx with no status
/// code of its own beyond X.0.0 or X.1.y, and no word of a policy, a
/// blocklist or a full mailbox ("550 <a@b>: Recipient address rejected.").
fn answered_rcpt_is_hard(r: &RecipientResult) -> bool {
    let Some(d) = r.diagnostic.as_deref() else {
        return false;
    };
    let t = d.to_ascii_lowercase();
    let esc = esc_in(d).map(|(e, _)| e).unwrap_or([0; 3]);
    let code = r.code.unwrap_or(0);
    (500..600).contains(&code)
        && code != 552
        && matches!(esc[1], 0 | 1)
        && r.status.is_none_or(|s| s[0] == 5 && matches!(s[1], 0 | 1))
        && !NOT_THE_ADDRESS.iter().any(|w| t.contains(w))
        && !NETWORK.iter().any(|w| t.contains(w))
        && !MAILER.iter().any(|w| t.contains(w))
        && classify(code, esc, d, Stage::Rcpt, false) == Class::Hard
}

/// "550 : User unknown": a refusal that names no recipient where the
/// server's refusal at RCPT names it ("550 <a@b>: User unknown"). au
/// (KDDI: ezweb.ne.jp, au.com) answers so to DATA for mail its users'
/// filters refuse; the address exists.
fn names_no_address(diag: &str) -> bool {
    let t = diag.to_ascii_lowercase();
    t.match_indices(": user unknown").any(|(at, _)| {
        let before = t[..at].trim_end();
        let before = before.strip_suffix(':').unwrap_or(before).trim_end();
        let b = before.as_bytes();
        b.len() >= 3
            && b[b.len() - 3] == b'5'
            && b[b.len() - 2..].iter().all(u8::is_ascii_digit)
            && (b.len() == 3 || !b[b.len() - 4].is_ascii_alphanumeric())
    })
}

/// Whether the report says the refusal answered DATA or the end of DATA:
/// Postfix's "(in reply to end of DATA command)", Exim's "after end of
/// data", a transcript's ">>> DATA" followed by "<<< 5xx".
fn refused_after_data(text: &str) -> bool {
    let t = text.to_ascii_lowercase().replace("\r\n", "\n");
    // Phrases may be wrapped ("in reply to end of\n    DATA command").
    let flat = t.split_whitespace().collect::<Vec<_>>().join(" ");
    if [
        "in reply to end of data",
        "in reply to data command",
        "after end of data",
        "after data",
    ]
    .iter()
    .any(|w| flat.contains(w))
    {
        return true;
    }
    // m-FILTER: "-------server message", the reply, "-------SMTP command",
    // the last command it sent, which with PIPELINING is DATA even when
    // the refusal answered RCPT (Postfix's "Recipient address rejected",
    // a 5.1.1).
    if let Some(at) = t.find("smtp command\ndata") {
        let reply = t[..at].rsplit("server message").next().unwrap_or("");
        if !reply.contains("recipient address rejected") && !reply.contains("5.1.1") {
            return true;
        }
    }
    let lines: Vec<&str> = t.lines().map(str::trim).collect();
    // The replies after ">>> DATA": with PIPELINING they may be the
    // RCPT's refusal followed by DATA's "503 need RCPT" or "554 no valid
    // recipients", which says the refusal was at RCPT after all.
    lines.iter().enumerate().any(|(i, l)| {
        if *l != ">>> data" {
            return false;
        }
        // Up to the next command or the end of the transcript; sendmail
        // repeats each reply without "<<<" in between.
        let replies: Vec<&&str> = lines[i + 1..]
            .iter()
            .take_while(|r| !r.is_empty() && !r.starts_with(">>>"))
            .filter(|r| r.starts_with("<<<"))
            .collect();
        let at_rcpt = replies.iter().any(|r| {
            r.starts_with("<<< 503") || r.contains("rcpt") || r.contains("valid recipient")
        });
        !at_rcpt
            && replies
                .iter()
                .any(|r| r.starts_with("<<< 5") && hard_words(r))
    })
}

/// The report read from its parts, before [`parse`] reconsiders the class.
fn parse_parts(raw: &[u8]) -> Report {
    let raw = &raw[..raw.len().min(MAX_SCAN)];
    let text = String::from_utf8_lossy(raw);
    let mut rep = Report {
        kind: Kind::Unparsed,
        recipients: Vec::new(),
        reporting_mta: None,
        feedback: None,
        herald_ref: find_header(&text, "x-herald-ref").map(|v| v.trim().to_string()),
        quoted_return_path: quoted_return_path(&text),
        problem: None,
    };
    // mail-parser 0.11.9 reaches a `debug_assert!` on some malformed
    // nested multiparts (message.rs, "Invalid part ID"): a panic in a debug
    // build, a silent recovery in release. Either way the report is still
    // read, as text if the MIME parser gives up.
    let msg = std::panic::catch_unwind(|| mail_parser::MessageParser::default().parse(raw))
        .ok()
        .flatten();
    // The machine-readable parts, when there are any.
    let (dsn, arf) = match &msg {
        Some(m) => machine_parts(m),
        None => (Vec::new(), None),
    };
    if let Some((kind, feedback)) =
        arf_feedback(arf, &text).or_else(|| complaint_in_other_forms(&text, msg.as_ref()))
    {
        rep.kind = kind;
        rep.feedback = Some(feedback);
        return rep;
    }
    let sources = dsn_sources(dsn, &text, msg.as_ref());
    dsn_recipients(&mut rep, &sources);
    explain_bare_statuses(&mut rep.recipients, &text, msg.as_ref());
    if !rep.recipients.is_empty() {
        rep.kind = dsn_kind(&rep.recipients);
        if rep.kind != Kind::Unparsed {
            return rep;
        }
        rep.recipients.clear();
    }
    // An auto-reply says so in its headers, and is not from a mailer.
    if let Some(m) = &msg {
        if is_auto_reply(m) {
            rep.kind = Kind::AutoReply;
            return rep;
        }
    }
    // Plain text: the first SMTP reply or enhanced status code.
    let body = match msg.as_ref().map(text_parts) {
        Some(b) if !b.trim().is_empty() => b,
        _ => text.to_string(),
    };
    let notice = msg
        .as_ref()
        .and_then(notice_kind)
        .or_else(|| notice_by_words(&body));
    if let Some(r) = plain_text_result(&body, notice) {
        let (kind, r) = plain_text_verdict(r, &body);
        rep.kind = kind;
        rep.recipients.push(r);
        return rep;
    }
    // A notice titled as a failure (or a delay) that gives no reason herald
    // knows: it failed, nobody is suppressed, and the log says why.
    if let Some(failed) = notice {
        rep.kind = if failed { Kind::Failed } else { Kind::Delayed };
        rep.recipients.push(unrecognised_notice(&body, failed));
        return rep;
    }
    rep.problem = Some(if msg.is_none() {
        "not a MIME message".into()
    } else {
        "no delivery-status part, feedback report, SMTP reply or status code found".into()
    });
    rep
}

/// The message's delivery-status parts and its feedback-report part, as text.
fn machine_parts(m: &mail_parser::Message) -> (Vec<String>, Option<String>) {
    let mut dsn = Vec::new();
    let mut arf = None;
    let whole = m.raw_message();
    for p in &m.parts {
        let Some(ct) = mail_parser::MimeHeaders::content_type(p) else {
            continue;
        };
        let sub = ct.subtype().unwrap_or("").to_ascii_lowercase();
        if !ct.ctype().eq_ignore_ascii_case("message") && !ct.ctype().eq_ignore_ascii_case("text") {
            continue;
        }
        let (a, b) = (p.offset_body as usize, p.offset_end as usize);
        let encoded = mail_parser::MimeHeaders::content_transfer_encoding(p).is_some_and(|e| {
            e.eq_ignore_ascii_case("quoted-printable") || e.eq_ignore_ascii_case("base64")
        });
        // A quoted-printable or base64 status part is read decoded.
        let body = if encoded {
            String::from_utf8_lossy(p.contents()).into_owned()
        } else {
            String::from_utf8_lossy(whole.get(a..b.max(a)).unwrap_or_default()).into_owned()
        };
        match sub.as_str() {
            "delivery-status" | "global-delivery-status" => dsn.push(body),
            "feedback-report" => arf = Some(body),
            _ => {}
        }
    }
    (dsn, arf)
}

/// An ARF complaint: the feedback part, or its fields written elsewhere.
fn arf_feedback(arf: Option<String>, text: &str) -> Option<(Kind, Feedback)> {
    let a = arf.or_else(|| {
        text.lines()
            .any(|l| starts_ci(l, "feedback-type:"))
            .then(|| text.to_string())
    })?;
    let groups = groups(&a);
    let f = |name: &str| groups.iter().find_map(|g| field(g, name));
    let t = f("feedback-type")?.trim().to_ascii_lowercase();
    let kind = match t.as_str() {
        "auth-failure" => Kind::AuthFailure,
        "not-spam" => Kind::NotSpam,
        _ => Kind::Complaint,
    };
    let feedback = Feedback {
        feedback_type: t,
        user_agent: f("user-agent"),
        original_rcpt_to: f("original-rcpt-to").map(|a| strip_addr(&a)),
        original_mail_from: f("original-mail-from").map(|a| strip_addr(&a)),
        source_ip: f("source-ip"),
        arrival_date: f("arrival-date").or_else(|| f("received-date")),
    };
    Some((kind, feedback))
}

/// A complaint in another form than ARF: SES, Microsoft, Hotmail, Apple Mail.
fn complaint_in_other_forms(
    text: &str,
    msg: Option<&mail_parser::Message>,
) -> Option<(Kind, Feedback)> {
    // Complaints in other forms: Amazon SES's JSON notification, and
    // Microsoft's abuse reports that come without a feedback-report part.
    let mut low = text.to_ascii_lowercase();
    if let Some(m) = msg {
        // Their words may be base64 in a text part.
        low.push_str(&text_parts(m).to_ascii_lowercase());
    }
    let ses = low.contains("\"notificationtype\":\"complaint\"");
    if ses || low.contains("email abuse report for an email message") {
        let t = json_string(&low, "complaintfeedbacktype").unwrap_or_else(|| "abuse".into());
        let kind = match t.as_str() {
            "not-spam" => Kind::NotSpam,
            _ => Kind::Complaint,
        };
        let feedback = Feedback {
            feedback_type: t,
            user_agent: Some(if ses { "Amazon SES" } else { "abuse report" }.into()),
            ..Default::default()
        };
        return Some((kind, feedback));
    }
    // Hotmail's older complaints: "complaint about message from <ip>"
    // with the message attached, its recipient in
    // X-HmXmrOriginalRecipient. Apple Mail's unsubscribe request
    // (X-Apple-Unsubscribe: true): the recipient opts out.
    let m = msg?;
    let subject = m.subject().unwrap_or("").trim().to_ascii_lowercase();
    let hotmail = subject.starts_with("complaint about message from")
        && low.contains("x-hmxmroriginalrecipient:");
    let unsubscribe = m
        .header_raw("X-Apple-Unsubscribe")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !(hotmail || unsubscribe) {
        return None;
    }
    let feedback = Feedback {
        feedback_type: if hotmail { "abuse" } else { "opt-out" }.into(),
        user_agent: Some(if hotmail { "Hotmail" } else { "Apple Mail" }.into()),
        original_rcpt_to: if hotmail {
            find_header(text, "x-hmxmroriginalrecipient").map(|a| strip_addr(&a))
        } else {
            from_text(m).split_whitespace().last().map(strip_addr)
        },
        ..Default::default()
    };
    Some((Kind::Complaint, feedback))
}

/// Where the RFC 3464 fields are read: their parts, else the whole text.
fn dsn_sources(dsn: Vec<String>, text: &str, msg: Option<&mail_parser::Message>) -> Vec<String> {
    // RFC 3464 fields: in their part, else anywhere in the text (servers
    // that put them in text/plain).
    if !dsn.is_empty() {
        return dsn;
    }
    // Decoded when a quoted-printable text part holds them (Amazon
    // WorkMail: "Diagnostic-Code: smtp; 554 4.4.7 Message expi=").
    let decoded = msg.map(text_parts).unwrap_or_default();
    let fields = |t: &str| {
        t.lines()
            .any(|l| starts_ci(l, "final-recipient:") || starts_ci(l, "action:"))
    };
    if !text.contains("=\n") && !text.contains("=\r\n") || !fields(&decoded) {
        vec![text.to_string()]
    } else {
        vec![decoded]
    }
}

/// The Reporting-MTA and the per-recipient field groups of the sources.
fn dsn_recipients(rep: &mut Report, sources: &[String]) {
    for s in sources {
        for g in groups(s) {
            if let Some(m) = field(&g, "reporting-mta") {
                rep.reporting_mta.get_or_insert(strip_type(&m));
            }
            if field(&g, "final-recipient").is_none() && field(&g, "action").is_none() {
                continue;
            }
            if field(&g, "action").is_none() && field(&g, "status").is_none() {
                continue;
            }
            rep.recipients.push(recipient(&g));
        }
    }
}

/// A diagnostic from the notice's text for results whose DSN gives none.
fn explain_bare_statuses(
    recipients: &mut [RecipientResult],
    text: &str,
    msg: Option<&mail_parser::Message>,
) {
    // A DSN that gives a bare status (5.0.0) and no Diagnostic-Code often
    // says why in its text part: the line that names the recipient with a
    // reply code, or the notice's words.
    for r in recipients.iter_mut() {
        // "Diagnostic-Code: X-Unix; 77": a local program's exit status
        // says nothing the notice does not say better.
        if r.diagnostic
            .as_deref()
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        {
            r.diagnostic = None;
            r.code = None;
            judge(r);
        }
    }
    if recipients.iter().all(|r| r.diagnostic.is_some()) {
        return;
    }
    // The text parts decoded (quoted-printable breaks words).
    let decoded = msg.map(text_parts).unwrap_or_default();
    let source = if decoded.trim().is_empty() {
        text.to_string()
    } else {
        decoded
    };
    let lines = notice_lines(&source);
    for r in recipients.iter_mut().filter(|r| r.diagnostic.is_none()) {
        let addr = r.final_recipient.clone().unwrap_or_default();
        let named = lines.iter().find(|l| {
            !addr.is_empty()
                && l.to_ascii_lowercase().contains(&addr)
                && (code_in(l).is_some() || esc_in(l).is_some_and(|(e, _)| e[0] != 2))
        });
        let diag = match named {
            Some(l) => Some(l.trim().to_string()),
            None => reason_for(&lines, Some(&addr))
                .or_else(|| notice_words(&lines.join("\n")).and_then(|w| w.diagnostic)),
        };
        if let Some(d) = diag {
            r.code = code_in(&d);
            r.diagnostic = Some(d);
            judge(r);
            notice_says_disabled(r, &lines);
        }
    }
}

/// The kind of a DSN from its recipients' actions, else their statuses.
fn dsn_kind(recipients: &[RecipientResult]) -> Kind {
    let has = |a: &str| {
        recipients
            .iter()
            .any(|r| r.action.as_deref().is_some_and(|x| x.starts_with(a)))
    };
    if has("failed") {
        Kind::Failed
    } else if has("delayed") {
        Kind::Delayed
    } else if has("delivered") || has("relayed") || has("expanded") {
        Kind::Delivered
    } else if recipients
        .iter()
        .any(|r| r.status.is_some_and(|s| s[0] == 5))
    {
        Kind::Failed
    } else if recipients
        .iter()
        .any(|r| r.status.is_some_and(|s| s[0] == 4))
    {
        Kind::Delayed
    } else {
        Kind::Unparsed
    }
}

/// The result a plain-text notice gives: a code, a reason, or its words.
fn plain_text_result(body: &str, notice: Option<bool>) -> Option<RecipientResult> {
    plain_text(body)
        .or_else(|| {
            // No code: the reason given beside the address (qmail, Postfix,
            // Exim without a reply).
            let failed = notice?;
            let lines = notice_lines(body);
            let mut r = RecipientResult {
                action: Some(if failed { "failed" } else { "delayed" }.into()),
                diagnostic: Some(reason_for(&lines, None)?),
                ..Default::default()
            };
            judge(&mut r);
            notice_says_disabled(&mut r, &lines);
            Some(r)
        })
        .or_else(|| {
            // No code at all: the words of a failure, in a failure notice.
            notice.and_then(|_| notice_words(body))
        })
}

/// Whether a plain-text result failed or is delayed, and the result so judged.
fn plain_text_verdict(mut r: RecipientResult, body: &str) -> (Kind, RecipientResult) {
    // A notice that says it gave up is a failure whatever code it
    // quotes (qmail: "Sorry, I wasn't able to establish an SMTP
    // connection. (#4.4.1) I'm not going to try again").
    if r.action.as_deref() != Some("failed") && says_given_up(body) {
        r.action = Some("failed".into());
        judge(&mut r);
    }
    // A notice that says the address does not exist is a failure, even
    // when no 5xx code came with it.
    let kind = if r.code.is_some_and(|c| c >= 500)
        || r.status.is_some_and(|s| s[0] == 5)
        || r.class == Some(Class::Hard)
        || (r.code.is_none() && r.status.is_none() && r.action.as_deref() == Some("failed"))
        || says_given_up(body)
    {
        Kind::Failed
    } else {
        Kind::Delayed
    };
    (kind, r)
}

/// The result of a failure or delay notice that gives no reason herald knows.
fn unrecognised_notice(body: &str, failed: bool) -> RecipientResult {
    let first = notice_text(body)
        .lines()
        .map(str::trim)
        .find(|l| l.len() > 20)
        .unwrap_or("")
        .chars()
        .take(200)
        .collect::<String>();
    RecipientResult {
        action: Some(if failed { "failed" } else { "delayed" }.into()),
        diagnostic: Some(format!(
            "a notice with no reason herald recognises: {first}"
        )),
        class: Some(if failed {
            Class::Policy
        } else {
            Class::Transient
        }),
        ..Default::default()
    }
}

fn starts_ci(line: &str, prefix: &str) -> bool {
    line.len() >= prefix.len()
        && line.is_char_boundary(prefix.len())
        && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Field groups (blocks separated by blank lines), each unfolded into
/// (lowercased name, value).
fn groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = cur.last_mut() {
                if last.1.len() < 16 * 1024 {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            }
            continue;
        }
        if let Some((n, v)) = line.split_once(':') {
            if !n.is_empty() && n.len() < 64 && !n.contains(' ') {
                cur.push((n.to_ascii_lowercase(), v.trim().to_string()));
                continue;
            }
        }
        // Not a field: ends the group.
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn field(g: &[(String, String)], name: &str) -> Option<String> {
    g.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
}

/// "rfc822; a@b" -> "a@b"; "dns; mx.example" -> "mx.example".
fn strip_type(v: &str) -> String {
    match v.split_once(';') {
        Some((t, rest)) if !t.contains(' ') && t.len() < 16 => rest.trim().to_string(),
        _ => v.trim().to_string(),
    }
}

fn strip_addr(v: &str) -> String {
    strip_type(v)
        .trim()
        .trim_matches(['<', '>'])
        .to_ascii_lowercase()
}

fn recipient(g: &[(String, String)]) -> RecipientResult {
    let status = field(g, "status")
        .map(|s| esc_in(&s))
        .and_then(|e| e.map(|(e, _)| e));
    // Without a Diagnostic-Code, the words after the Status code
    // ("5.4.4 (Illegal host/domain name found)") are what there is.
    let diagnostic = field(g, "diagnostic-code")
        .map(|d| strip_type(&d))
        .or_else(|| {
            let st = field(g, "status")?;
            let (_, end) = esc_in(&st)?;
            let rest = st[end..].trim().trim_matches(['(', ')']).trim();
            (!rest.is_empty()).then(|| rest.to_string())
        });
    let code = diagnostic.as_deref().and_then(code_in);
    let action = field(g, "action").map(|a| a.trim().to_ascii_lowercase());
    let mut r = RecipientResult {
        final_recipient: field(g, "final-recipient").map(|a| strip_addr(&a)),
        original_recipient: field(g, "original-recipient").map(|a| strip_addr(&a)),
        action,
        status,
        code,
        diagnostic,
        remote_mta: field(g, "remote-mta").map(|m| strip_type(&m)),
        last_attempt: field(g, "last-attempt-date").or_else(|| field(g, "arrival-date")),
        class: None,
        disabled: false,
        filtered: false,
    };
    judge(&mut r);
    r
}

/// Words that say the refusal is about the message, the sender or its
/// server (a blocklist, SPF, spam, a policy), not about the address: they
/// beat a status code that names the address (servers write 5.1.1 for
/// anything at RCPT).
const NOT_THE_ADDRESS: &[&str] = &[
    "blacklist",
    "blocklist",
    "black list",
    "block list",
    "blocked",
    "spamhaus",
    "spamcop",
    "barracuda",
    "sorbs",
    "spf",
    "dmarc",
    "dkim",
    "spam",
    "reputation",
    "recipient preferences",
    "rejected by destination domain",
    "not authorized",
    "not permitted",
    "policy",
    "reverse dns",
    "ptr record",
];

/// Words of a disabled, suspended or inactive account.
const DISABLED: &[&str] = &[
    "account is disabled",
    "account has been disabled",
    "account disabled",
    "mailbox is disabled",
    "is disabled",
    "disabled recipient",
    "is inactive",
    "inactive account",
    "suspended",
    "deactivated",
    "account is locked",
    "temporary locked",
    "temporarily locked",
    "is frozen",
    "account is blocked",
    "mailbox disabled",
    "user or domain is disabled",
    "is a deactivated mailbox",
    "temporarily inactive",
    "archived recipient",
    "user is terminated",
    "5.7.13",
];

/// Words of a local delivery program that failed at the receiving host.
const MAILER: &[&str] = &[
    "pipe to |",
    "procmail:",
    "bin/procmail",
    " || exit ",
    "mailer error",
    "lock failure",
    "service currently unavailable",
    "too many recipients",
];

/// Words of a network failure (no server answered), not of the address.
const NETWORK: &[&str] = &[
    "connection timed out",
    "timed out",
    "connection refused",
    "no route to host",
    "network is unreachable",
    "did not accept our requests to connect",
    "retry timeout exceeded",
    "after multiple retries",
    "too long in the queue",
    "message expired",
    "queue.expired",
    "not delivered within",
    "hop count",
    "too many hops",
    "mail loop",
    "routing loop",
    "dns error",
    "dns query failed",
    "malformed or unexpected name server",
    "host not found, try again",
];

/// The class of a result, and whether it is a disabled account.
fn judge(r: &mut RecipientResult) {
    r.class = class_of(r);
    let text = r.diagnostic.as_deref().unwrap_or("").to_ascii_lowercase();
    mark_disabled(r, &text);
}

/// An account that exists but is closed for now (`text`, lowercased, says
/// so, and the failure is not a temporary one): a bounce about the
/// address, which suppresses nobody (it may open again).
fn mark_disabled(r: &mut RecipientResult, text: &str) {
    let permanent = r
        .class
        .is_some_and(|c| !matches!(c, Class::Transient | Class::Throttle));
    if permanent && DISABLED.iter().any(|w| text.contains(w)) {
        r.class = Some(Class::Hard);
        r.disabled = true;
    }
}

/// The class of a failed or delayed result (none for a delivery).
fn class_of(r: &RecipientResult) -> Option<Class> {
    let said = r.diagnostic.as_deref().and_then(esc_in).map(|(e, _)| e);
    // A Status of X.0.0 says only "failed" or "delayed", X.4.7 only
    // "gave up": the remote server's own code, of the same class, says
    // more ("Status: 5.0.0", "550 #5.1.0 Address rejected"; "Status:
    // 4.4.7", "450 4.7.1 Access denied. IP name lookup failed"), unless
    // the text holds codes that disagree (SES: "5.1.0 - Unknown address
    // error 550-'5.7.1 ...").
    let one_code = r.diagnostic.as_deref().is_some_and(|d| {
        let mut rest = d;
        let mut first = None;
        while let Some((e, end)) = esc_in(rest) {
            if first.is_some_and(|f| f != e) {
                return false;
            }
            first = Some(e);
            rest = &rest[end..];
        }
        true
    });
    let esc = match (r.status, said) {
        (Some(st), Some(d))
            if matches!((st[1], st[2]), (0, 0) | (4, 7))
                && d[0] == st[0]
                && d[1] != 0
                && one_code =>
        {
            d
        }
        (Some(st), _) => st,
        (None, d) => d.unwrap_or([0; 3]),
    };
    let code = r.code.or(match esc[0] {
        5 => Some(550),
        4 => Some(450),
        // Only the action: "failed" is permanent, "delayed" is not.
        _ => match r.action.as_deref() {
            Some("failed") => Some(550),
            Some("delayed") => Some(450),
            _ => None,
        },
    })?;
    if code < 400 {
        return None;
    }
    let text = r.diagnostic.as_deref().unwrap_or("");
    let t = text.to_ascii_lowercase();
    // A full mailbox says so whatever else happened (Exim: "mailbox is
    // full: retry timeout exceeded").
    if [
        "mailbox is full",
        "mailbox full",
        "mailfolder is full",
        "over quota",
        "quota exceeded",
    ]
    .iter()
    .any(|w| t.contains(w))
    {
        return Some(Class::Soft);
    }
    // A quota of the sender's relay, not of the mailbox ("You've reached
    // your daily relay quota"): the sending setup was refused.
    if t.contains("relay quota") && code >= 500 {
        return Some(Class::Policy);
    }
    // The receiving host's own delivery program failed (a pipe, procmail,
    // a lock): nothing about the address (sisimai's mailererror).
    if MAILER.iter().any(|w| t.contains(w)) {
        return Some(Class::Transient);
    }
    // No server answered, or one answered only temporarily until the
    // sender gave up ("failed" with a 4.x.y): the outcome is final, but it
    // says nothing about the address. Never a hard bounce.
    // (A server that gave up after "450 4.1.1 User unknown" still said
    // the address does not exist; not one that said "450 mailbox
    // unavailable", RFC 5321's words for a busy mailbox, or "temporarily".)
    let said_unknown = hard_words(&t) && !t.contains("unavailable") && !t.contains("temporar");
    if NETWORK.iter().any(|w| t.contains(w)) || (code < 500 && esc[0] != 5 && !said_unknown) {
        let c = classify(code.min(499), [4, esc[1], esc[2]], text, Stage::Data, false);
        let failed = r.action.as_deref() == Some("failed");
        return Some(match c {
            Class::Hard => Class::Transient,
            // A domain whose null MX (RFC 7505) says it takes no mail:
            // final, and about the domain's choice, not a failure.
            Class::Transient if t.contains("null mx") => Class::Policy,
            // Deferred for policy (X.7.y: PTR, blocklist) until the
            // sender gave up: the message was refused, not delayed.
            Class::Transient if failed && esc[0] == 4 && esc[1] == 7 => Class::Policy,
            c => c,
        });
    }
    let (code, esc) = if code < 500 {
        (code + 100, [5, esc[1], esc[2]])
    } else {
        (code, esc)
    };
    let class = classify(code, esc, text, Stage::Data, false);
    // A refusal at MAIL FROM, or in words of a blocklist or a policy, is
    // not about the address, whatever status code came with it.
    let at_mail = t.contains("after mail from") || t.contains("in reply to mail from");
    if class == Class::Hard && (at_mail || NOT_THE_ADDRESS.iter().any(|w| t.contains(w))) {
        return Some(Class::Policy);
    }
    // Routing and network codes (X.4.y) are not about the address either.
    if class == Class::Hard && esc[1] == 4 && !hard_words(&t) {
        return Some(Class::Policy);
    }
    // Words that say the address or its domain does not exist beat a
    // status code that says less (5.7.1 "Invalid recipient", 5.0.0).
    // (Not a DNS error of the sender's: Gmail's "DNS Error: ... NXDOMAIN"
    // may be its resolver's, sisimai's networkerror.)
    if class == Class::Policy
        && hard_words(&t)
        && !t.contains("dns error")
        && !NOT_THE_ADDRESS.iter().any(|w| t.contains(w))
    {
        return Some(Class::Hard);
    }
    Some(class)
}

/// Whether the text itself says the address does not exist.
fn hard_words(t: &str) -> bool {
    crate::reply::says_no_such_address(t)
        || [
            // Beyond the live classifier's words (reply.rs HARD_TEXT): the
            // shorter forms reports use, and the domain's own.
            "not found",
            "recipient address rejected: access denied",
            "illegal host/domain",
            "host or domain name not found",
            "domain not found",
            "couldn't find a mail exchanger",
            "find any host named",
            "couldn't be found",
            "host unknown",
            "no such domain",
            "domain does not exist",
            "not listed in",
            "does not accept mail",
            "no mx",
            "indicated no smtp service",
            "no valid recipients",
            // Outlook.com, for a domain that does not resolve.
            "because the domain is not reachable",
        ]
        .iter()
        .any(|w| t.contains(w))
}

/// The first enhanced status code in `s` ("5.1.1", "#5.1.1", "(5.7.1)"),
/// and where it ends.
fn esc_in(s: &str) -> Option<([u16; 3], usize)> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if (b[i] == b'2' || b[i] == b'4' || b[i] == b'5')
            && (i == 0 || !b[i - 1].is_ascii_digit() && b[i - 1] != b'.')
            && b.get(i + 1) == Some(&b'.')
        {
            let mut parts = [0u16; 3];
            let mut j = i;
            let mut ok = true;
            for (k, p) in parts.iter_mut().enumerate() {
                let start = j;
                while j < b.len() && b[j].is_ascii_digit() && j - start < 3 {
                    j += 1;
                }
                if j == start {
                    ok = false;
                    break;
                }
                *p = s[start..j].parse().unwrap_or(0);
                if k < 2 {
                    if b.get(j) != Some(&b'.') {
                        ok = false;
                        break;
                    }
                    j += 1;
                }
            }
            let end_ok = j >= b.len()
                || !(b[j].is_ascii_digit()
                    || b[j] == b'.' && b.get(j + 1).is_some_and(|c| c.is_ascii_digit()));
            if ok && end_ok && parts[0] == b[i] as u16 - b'0' as u16 {
                return Some((parts, j));
            }
        }
        i += 1;
    }
    None
}

/// The first SMTP reply code (4xx/5xx followed by a space or '-') in `s`.
fn code_in(s: &str) -> Option<u16> {
    code_at(s).map(|(c, _)| c)
}

/// The first SMTP reply code in `s`, and where it starts.
fn code_at(s: &str) -> Option<(u16, usize)> {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(2)).find_map(|i| {
        let c = &b[i..i + 3];
        let before_ok = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.');
        let after = b.get(i + 3).copied();
        let after_ok = matches!(after, None | Some(b' ') | Some(b'-'));
        (before_ok
            && after_ok
            && (c[0] == b'4' || c[0] == b'5')
            && c[1].is_ascii_digit()
            && c[2].is_ascii_digit())
        .then(|| s[i..i + 3].parse().ok().map(|c| (c, i)))
        .flatten()
    })
}

/// In a plain-text bounce: the first line with an SMTP reply or an
/// enhanced status code of a failure or delay.
fn plain_text(body: &str) -> Option<RecipientResult> {
    // The notice's own lines: a reply code in the returned message's
    // headers ("Lotus SMTP MTA v4.6.1") says nothing.
    let lines = notice_lines_upto(body, 2000);
    for (i, line) in lines.iter().enumerate() {
        let l = line.trim();
        if l.len() > 2000 || starts_ci(l, "received:") || starts_ci(l, "date:") {
            continue;
        }
        let code = code_at(l)
            .filter(|(_, at)| {
                // A reply code stands at the start, after a colon, "said",
                // or a transcript's "<<<".
                let before = l[..*at].to_ascii_lowercase();
                let before = before.trim_end();
                before.is_empty()
                    || before.ends_with(':')
                    || before.ends_with("<<<")
                    || before.contains("said")
                    || before.ends_with('(')
                    || esc_in(l).is_some()
            })
            .map(|(c, _)| c);
        let esc = esc_in(l).map(|(e, _)| e).filter(|e| e[0] != 2);
        if code.is_none() && esc.is_none() {
            continue;
        }
        // The reply may go on over the next lines (indented or "550-"); a
        // line before it may say which command it answered (Exim: "SMTP
        // error from remote mail server after MAIL FROM:...").
        let mut diag = l.to_string();
        if let Some(prev) = i.checked_sub(1).map(|p| lines[p].trim()) {
            if prev
                .to_ascii_lowercase()
                .contains("error from remote mail server after")
            {
                diag = format!("{prev} {l}");
            }
        }
        for next in lines.iter().skip(i + 1).take(3) {
            let n = next.trim();
            if n.is_empty() || n.len() > 500 {
                break;
            }
            if next.starts_with([' ', '\t'])
                || code.is_some_and(|c| {
                    n.starts_with(&format!("{c}-")) || n.starts_with(&format!("{c} "))
                })
            {
                diag.push(' ');
                diag.push_str(n);
            } else {
                break;
            }
        }
        let mut r = RecipientResult {
            action: Some(
                if code.is_some_and(|c| c >= 500) || esc.is_some_and(|e| e[0] == 5) {
                    "failed".into()
                } else {
                    "delayed".into()
                },
            ),
            status: esc,
            code,
            diagnostic: Some(diag),
            ..Default::default()
        };
        judge(&mut r);
        return Some(r);
    }
    None
}

/// The string value of `"key":"value"` in JSON text (keys as written).
fn json_string(text: &str, key: &str) -> Option<String> {
    let at = text.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string()).filter(|v| !v.is_empty() && v.len() < 64)
}

/// The value of the first header `name` anywhere in the text (quoted
/// messages included), unfolded.
fn find_header(text: &str, name: &str) -> Option<String> {
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim_start_matches(['>', ' ']);
        if starts_ci(t, name) && t[name.len()..].starts_with(':') {
            let mut v = t[name.len() + 1..].trim().to_string();
            while let Some(n) = lines.peek() {
                if n.starts_with([' ', '\t']) && v.len() < 1024 {
                    v.push_str(n.trim());
                    lines.next();
                } else {
                    break;
                }
            }
            return Some(v).filter(|v| !v.is_empty());
        }
    }
    None
}

/// A quoted `Return-Path:` of herald's form.
fn quoted_return_path(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let t = l.trim_start_matches(['>', ' ']);
        if !starts_ci(t, "return-path:") {
            return None;
        }
        let a = t["return-path:".len()..]
            .trim()
            .trim_matches(['<', '>'])
            .to_ascii_lowercase();
        (a.starts_with("b-") && a.contains('@')).then_some(a)
    })
}

/// Phrases of plain-text notices that carry no reply code, with what each
/// means: whether delivery failed or is only delayed, and the class. The
/// first phrase of this list found in the notice decides, so what says
/// more (a delay, no server answering, a policy) comes before what says
/// less (the address, then a failure of no stated reason). After the
/// manner of sisimai's reason tables, much reduced.
const PHRASES: &[(&str, bool, Class)] = &[
    // Not final yet.
    ("has been delayed", false, Class::Transient),
    ("will be retried", false, Class::Transient),
    ("will retry", false, Class::Transient),
    ("delivery is delayed", false, Class::Transient),
    ("not yet been delivered", false, Class::Transient),
    // The receiving host's delivery program failed (sisimai's
    // mailererror): nothing about the address.
    ("pipe to |", true, Class::Transient),
    ("bin/procmail", true, Class::Transient),
    ("procmail:", true, Class::Transient),
    ("mailer error", true, Class::Transient),
    // The mailbox is full.
    ("mailbox is full", true, Class::Soft),
    ("mailbox full", true, Class::Soft),
    ("mailfolder is full", true, Class::Soft),
    ("over quota", true, Class::Soft),
    ("quota", true, Class::Soft),
    // Given up: final, and nothing about the address.
    ("giving up", true, Class::Transient),
    ("gave up", true, Class::Transient),
    ("retry timeout exceeded", true, Class::Transient),
    // IMail: "Delivery failed 20 attempts: a@b".
    (" attempts: ", true, Class::Transient),
    ("envelope expired", true, Class::Transient),
    ("message expired", true, Class::Transient),
    ("not delivered within", true, Class::Transient),
    ("hop count exceeded", true, Class::Transient),
    ("too long in the queue", true, Class::Transient),
    (
        "did not accept our requests to connect",
        true,
        Class::Transient,
    ),
    ("not reachable", true, Class::Transient),
    ("timed out", true, Class::Transient),
    // The message, the sender or the list refused.
    ("spam", true, Class::Policy),
    ("blocked", true, Class::Policy),
    ("blacklist", true, Class::Policy),
    ("permission to post", true, Class::Policy),
    ("not a member of this mailing list", true, Class::Policy),
    ("not allowed to post", true, Class::Policy),
    ("send mail as", true, Class::Policy),
    // The address or its domain does not exist.
    ("address couldn't be found", true, Class::Hard),
    // Exchange 5.5/2003: "The recipient name is not recognized".
    ("recipient name is not recognized", true, Class::Hard),
    ("indicated no smtp service", true, Class::Hard),
    // DragonFly Mail Agent's notice of a domain that does not resolve.
    ("dns lookup failure: host", true, Class::Hard),
    ("no valid recipients", true, Class::Hard),
    ("address not found", true, Class::Hard),
    ("unknown recipient", true, Class::Hard),
    ("recipient not found", true, Class::Hard),
    ("user unknown", true, Class::Hard),
    ("unknown user", true, Class::Hard),
    ("no such user", true, Class::Hard),
    ("does not exist", true, Class::Hard),
    ("invalid final delivery userid", true, Class::Hard),
    ("invalid recipient", true, Class::Hard),
    ("mailbox not found", true, Class::Hard),
    ("mailbox unavailable", true, Class::Hard),
    ("unknown host", true, Class::Hard),
    ("no mx record", true, Class::Hard),
    ("domain not found", true, Class::Hard),
    ("not listed in", true, Class::Hard),
    // It failed; why is not said.
    ("failed permanently", true, Class::Policy),
    ("permanent fatal error", true, Class::Policy),
    ("permanent error", true, Class::Policy),
    ("could not be delivered", true, Class::Policy),
    ("was not delivered", true, Class::Policy),
    ("undeliverable", true, Class::Policy),
    ("delivery has failed", true, Class::Policy),
    ("message rejected", true, Class::Policy),
    ("was rejected", true, Class::Policy),
    ("address rejected", true, Class::Policy),
    ("could not be reached", true, Class::Policy),
    ("unable to deliver", true, Class::Policy),
];

/// Where the notice's own words end and the returned message begins.
const QUOTE_STARTS: &[&str] = &[
    "original message",
    "this is a copy of the message",
    "message headers follow",
    "below this line is a copy",
    "returned message",
    "content-type: message/rfc822",
];

/// The first text parts of a message, decoded.
fn text_parts(m: &mail_parser::Message) -> String {
    let mut b = String::new();
    for i in 0..4 {
        if let Some(t) = m.body_text(i) {
            b.push_str(&t);
            b.push('\n');
        }
    }
    b
}

/// Lines that name the original message without starting it (sendmail's
/// "The original message was received at", Exchange's "The MTS-ID of the
/// original message is").
const NOT_QUOTE_STARTS: &[&str] = &[
    "original message was received",
    "of the original message is",
];

/// The notice's own lines, up to the message it returns.
fn notice_lines(body: &str) -> Vec<&str> {
    notice_lines_upto(body, 1000)
}

/// The notice's own lines shorter than `max`, up to the message it
/// returns.
fn notice_lines_upto(body: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    for l in body.lines().take(400) {
        let low = l.to_ascii_lowercase();
        if QUOTE_STARTS.iter().any(|q| low.contains(q))
            && !NOT_QUOTE_STARTS.iter().any(|q| low.contains(q))
        {
            break;
        }
        if l.len() < max {
            out.push(l);
        }
    }
    out
}

/// The notice's words, lowercased, without the message it returns.
fn notice_text(body: &str) -> String {
    notice_lines(body).join("\n").to_ascii_lowercase()
}

/// A notice with no reply code: the first phrase of [`PHRASES`] in it.
fn notice_words(body: &str) -> Option<RecipientResult> {
    // Phrases may be wrapped over lines ("Host not\n    found").
    let text = notice_text(body)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let (phrase, failed, class) = PHRASES.iter().find(|(p, _, _)| text.contains(p))?;
    let line = body
        .lines()
        .map(str::trim)
        .find(|l| l.to_ascii_lowercase().contains(phrase))
        .unwrap_or(phrase);
    let mut r = RecipientResult {
        action: Some(if *failed { "failed" } else { "delayed" }.into()),
        diagnostic: Some(line.chars().take(500).collect()),
        class: Some(*class),
        ..Default::default()
    };
    mark_disabled(&mut r, &text);
    Some(r)
}

/// The reason a notice gives beside an address (`addr`, or any address
/// standing at the start of a line): qmail's "<a@b>:" followed by the
/// reason's lines, Postfix's "<a@b>: reason" with its indented
/// continuation, Exim's "  a@b" followed by the reason indented deeper.
fn reason_for(lines: &[&str], addr: Option<&str>) -> Option<String> {
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let low = t.to_ascii_lowercase();
        // The address at the start of the line, and what follows it.
        let (token, rest) = match low.strip_prefix('<') {
            Some(r) => match r.split_once('>') {
                Some((a, rest)) => (a.to_string(), rest),
                None => continue,
            },
            None => {
                let a = low.split_whitespace().next().unwrap_or("");
                (a.trim_end_matches(':').to_string(), &low[a.len()..])
            }
        };
        let is_addr = match addr {
            Some(a) => !a.is_empty() && token == a,
            None => token.contains('@') && !token.contains(' ') && token.len() > 2,
        };
        if !is_addr {
            continue;
        }
        let colon = rest.starts_with(':') || low.ends_with(':');
        let rest = rest.trim_start_matches(':').trim();
        let indent = line.len() - line.trim_start().len();
        let mut reason = Vec::new();
        if !rest.is_empty() {
            if !colon {
                continue;
            }
            // Postfix: the reason on the line, continued indented.
            reason.push(t[t.len() - rest.len()..].to_string());
            reason.extend(
                lines[i + 1..]
                    .iter()
                    .take_while(|n| n.starts_with([' ', '\t']) && !n.trim().is_empty())
                    .map(|n| n.trim().to_string()),
            );
        } else {
            for n in lines[i + 1..].iter().take(8) {
                let nt = n.trim();
                let n_indent = n.len() - n.trim_start().len();
                if nt.is_empty() || nt.starts_with("---") {
                    break;
                }
                // Exim: the reason is indented deeper than the address.
                if !colon && n_indent <= indent {
                    break;
                }
                let nl = nt.to_ascii_lowercase();
                if nl.starts_with("generated by") || nl.starts_with("(generated from") {
                    continue;
                }
                reason.push(nt.to_string());
            }
        }
        let reason = reason.join(" ");
        if !reason.trim().is_empty() {
            return Some(reason.chars().take(500).collect());
        }
    }
    None
}

/// Words of the notice's own, before it names any address, that say the
/// account is disabled or suspended (ezweb: "The user(s) account is
/// disabled." above "<a@b>: 550 user unknown"): a hard result that
/// suppresses nobody.
fn notice_says_disabled(r: &mut RecipientResult, lines: &[&str]) {
    if r.class != Some(Class::Hard) || r.disabled {
        return;
    }
    let text = lines
        .iter()
        .take_while(|l| !l.contains('@'))
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    if DISABLED
        .iter()
        .filter(|w| !w.contains("suspended"))
        .any(|w| text.contains(w))
    {
        r.disabled = true;
    }
}

/// Words of a notice that has given up, whatever code it quotes.
fn says_given_up(body: &str) -> bool {
    let text = notice_text(body);
    [
        "this is a permanent error",
        "i'm not going to try again",
        "i've given up",
        // m-FILTER: "could not be sent", "failed to send".
        "送信できませんでした",
        "送信に失敗しました",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// A notice recognised by its words when neither its subject nor its
/// sender say it is one (KDDI: "Could not be delivered to: <a@b>").
fn notice_by_words(body: &str) -> Option<bool> {
    let text = notice_text(body);
    ["could not be delivered to:"]
        .iter()
        .any(|w| text.contains(w))
        .then_some(true)
}

/// The sender's address as written, lowercased: `From: mailer-daemon`
/// has no domain and so no parsed address.
fn from_text(m: &mail_parser::Message) -> String {
    m.from()
        .and_then(|f| f.first())
        .and_then(|a| a.address())
        .map(str::to_string)
        .or_else(|| m.header_raw("From").map(str::to_string))
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn from_mailer(m: &mail_parser::Message) -> bool {
    let from = from_text(m);
    let addr = from.trim().trim_start_matches(['"', '<']);
    addr.starts_with("mailer-daemon")
        || addr.starts_with("postmaster")
        || from.contains("<mailer-daemon@")
        || from.contains("<postmaster@")
}

/// Subjects of failure notices, and of delay notices.
const FAILURE_SUBJECTS: &[&str] = &[
    "undeliver",
    "failure",
    "returned",
    "not delivered",
    "delivery fail",
    "could not be delivered",
    "error sending",
    "delivery status notification: error",
    "error",
    // fml: "You a@b are not member (list ML)".
    "are not member",
    "エラー",
    "不達",
];
const DELAY_SUBJECTS: &[&str] = &["delay", "warning", "still being retried"];

/// A notice from a mailer or titled as one: Some(true) for a failure,
/// Some(false) for a delay.
fn notice_kind(m: &mail_parser::Message) -> Option<bool> {
    let subject = m.subject().unwrap_or("").to_ascii_lowercase();
    if DELAY_SUBJECTS.iter().any(|w| subject.contains(w)) {
        return Some(false);
    }
    if FAILURE_SUBJECTS.iter().any(|w| subject.contains(w))
        || subject.contains("delivery status")
        || from_mailer(m)
    {
        return Some(true);
    }
    None
}

fn is_auto_reply(m: &mail_parser::Message) -> bool {
    let h = |n: &str| m.header_raw(n).map(|v| v.trim().to_ascii_lowercase());
    // Mailers mark their bounces Auto-Submitted too.
    let subject = m.subject().unwrap_or("").to_ascii_lowercase();
    if from_mailer(m) || FAILURE_SUBJECTS.iter().any(|w| subject.contains(w)) {
        return false;
    }
    let marked = h("auto-submitted").is_some_and(|v| v.starts_with("auto-replied"))
        || h("x-autoreply").is_some()
        || h("x-autorespond").is_some()
        || h("precedence").is_some_and(|v| v == "auto_reply")
        || h("x-auto-response-suppress").is_some();
    let vacation = [
        "out of office",
        "out of the office",
        "automatic reply",
        "auto reply",
        "autoreply",
        "auto-reply",
        "vacation",
        "away from",
        "abwesenheit",
    ]
    .iter()
    .any(|w| subject.contains(w));
    let bounce_words = [
        "undeliver",
        "failure",
        "returned",
        "delivery status",
        "not delivered",
    ]
    .iter()
    .any(|w| subject.contains(w));
    (marked || vacation) && !bounce_words
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn file(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/bounces")
                .join(name),
        )
        .unwrap()
    }

    fn all() -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bounces");
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".eml"))
            .map(|n| {
                let b = file(&n);
                (n, b)
            })
            .collect();
        v.sort();
        v
    }

    /// Found by `cargo fuzz` (fuzz/fuzz_targets/report.rs): a
    /// message/rfc822 part nested in another, in a multipart, made
    /// mail-parser's debug assertion fire.
    #[test]
    fn a_mime_tree_that_trips_mail_parser_does_not_panic() {
        let raw: &[u8] = b"Rt:\x99\x99\x99\x99\x99\x995\n\
Content-Type: multipart/status;\n\
\tboundary=\"0000ffff-0000-0000-0000-0000\"\n\
Co\n\
\n\
\n\
--0000ffff-0000-0000-0000-0000\n\
Content-Type: message/rfc822\n\
\n\
R0\n\
Content-Type: message/rfc822\n\
\n\
Recipt\n\
\n\
--0000ffff-0000-0000-0000-0000--\n\
\n";
        let rep = parse(raw);
        assert_eq!(rep.kind == Kind::Unparsed, rep.problem.is_some());
    }

    #[test]
    fn codes_and_status_codes_are_found_where_servers_put_them() {
        assert_eq!(
            esc_in("Sorry, no mailbox here by that name. (#5.1.1)")
                .unwrap()
                .0,
            [5, 1, 1]
        );
        assert_eq!(esc_in("550 5.7.1 blocked").unwrap().0, [5, 7, 1]);
        assert!(esc_in("version 1.2.3").is_none());
        assert!(esc_in("at 10.5.1.1 today").is_none());
        assert_eq!(code_in("host said: 550-5.1.1 The email account"), Some(550));
        assert_eq!(code_in("smtp; 452 4.2.2 full"), Some(452));
        assert_eq!(code_in("id 12550 x"), None);
        assert_eq!(strip_type("rfc822; <Ann@Dest.test>"), "<Ann@Dest.test>");
        assert_eq!(strip_addr("rfc822; <Ann@Dest.test>"), "ann@dest.test");
    }

    /// One file per server family, with what it means (sisimai's reason
    /// for it in the comment).
    #[test]
    fn a_report_per_server_family() {
        use Kind::*;
        let table: &[(&str, Kind, Option<Class>)] = &[
            ("lhost-postfix-05.eml", Failed, Some(Class::Hard)), // userunknown
            ("lhost-exim-01.eml", Failed, None),
            ("lhost-sendmail-01.eml", Failed, None),
            ("lhost-qmail-01.eml", Failed, None),
            ("lhost-exchange2007-01.eml", Failed, None),
            ("lhost-office365-01.eml", Failed, None),
            ("lhost-gmail-01.eml", Failed, None),
            ("lhost-yahoo-01.eml", Failed, None),
            ("lhost-amazonses-01.eml", Failed, None),
            ("lhost-opensmtpd-02.eml", Failed, None),
            ("lhost-courier-01.eml", Failed, None),
            ("rfc3834-02.eml", AutoReply, None),
            ("arf-01.eml", Complaint, None),
        ];
        let mut wrong = Vec::new();
        for (name, kind, class) in table {
            let r = parse(&file(name));
            if r.kind != *kind {
                wrong.push(format!("{name}: {:?}, want {kind:?}", r.kind));
            }
            if let Some(c) = class {
                let got = r.recipients.first().and_then(|x| x.class);
                if got != Some(*c) {
                    wrong.push(format!("{name}: class {got:?}, want {c:?}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    #[test]
    fn every_real_report_is_understood_for_what_it_is() {
        let mut unparsed = Vec::new();
        let mut wrong = Vec::new();
        let files = all();
        for (name, b) in &files {
            let r = parse(b);
            let ok = if name.starts_with("arf-")
                && !String::from_utf8_lossy(b)
                    .to_ascii_lowercase()
                    .contains("feedback-type")
            {
                // A forwarded message with no feedback report in it (some
                // providers' "complaints"): never a bounce.
                r.kind != Kind::Failed
            } else if name.starts_with("arf-") {
                matches!(r.kind, Kind::Complaint | Kind::AuthFailure | Kind::NotSpam)
                    && r.feedback.is_some()
            } else if name.starts_with("rfc3834-") {
                r.kind == Kind::AutoReply
            } else {
                if r.kind == Kind::Unparsed {
                    unparsed.push(name.clone());
                    continue;
                }
                matches!(
                    r.kind,
                    Kind::Failed | Kind::Delayed | Kind::Delivered | Kind::AutoReply
                ) || (name == "lhost-amazonses-11.eml" && r.kind == Kind::Complaint)
            };
            if !ok {
                wrong.push(format!("{name}: {:?}", r.kind));
            }
            if r.kind == Kind::Failed {
                let x = &r.recipients[0];
                assert!(x.class.is_some(), "{name}: {x:?}");
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        // Notices in no form herald knows: kept as unparsed (never
        // suppressing); 1 of 420 today (tests/report_corpus.rs).
        assert!(
            unparsed.len() * 100 <= files.len() * 2,
            "{} unparsed: {unparsed:?}",
            unparsed.len()
        );
    }

    /// A DSN with one recipient, its Status and Diagnostic-Code.
    fn dsn(action: &str, status: &str, diag: &str) -> Report {
        parse(
            format!(
                "From: MAILER-DAEMON@mx.example\nSubject: Undelivered Mail\n\
MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\n\n\
--b\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n\
--b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n\
Final-Recipient: rfc822; ann@dest.test\nAction: {action}\nStatus: {status}\n\
Diagnostic-Code: smtp; {diag}\n\n--b--\n"
            )
            .as_bytes(),
        )
    }

    #[test]
    fn what_the_reply_says_decides_and_never_suppresses_on_words_not_about_the_address() {
        let judged = |r: Report| {
            let o = r.outcome();
            (o.class, o.suppress)
        };
        use Class::*;
        // A bare Status 5.0.0 gives way to the reply's own code...
        assert_eq!(
            judged(dsn("failed", "5.0.0", "550 #5.1.0 Address rejected.")),
            (Some(Hard), true)
        );
        // ...unless the reply holds codes that disagree (SES).
        assert!(
            !judged(dsn(
                "failed",
                "5.0.0",
                "5.1.0 - Unknown address error 550-'5.7.1 <b@ses.example>... Access denied'"
            ))
            .1
        );
        // A Status 4.4.7 (gave up) gives way to the reply's policy code.
        assert_eq!(
            judged(dsn(
                "failed",
                "4.4.7",
                "450 4.7.1 Access denied. IP name lookup failed"
            )),
            (Some(Policy), false)
        );
        // RFC 5321's 450 "mailbox unavailable" is a busy mailbox.
        assert!(
            !judged(dsn(
                "failed",
                "4.2.0",
                "450 Requested mail action not taken: mailbox unavailable"
            ))
            .1
        );
        // au (KDDI) names no address when a filter refuses at DATA.
        assert_eq!(
            judged(dsn("failed", "5.0.0", "550 : User unknown")),
            (Some(Policy), false)
        );
        assert_eq!(
            judged(dsn("failed", "5.0.0", "550 <ann@dest.test>: User unknown")),
            (Some(Hard), true)
        );
        // A null MX, Google's way, is final and not the address's.
        assert_eq!(
            judged(dsn(
                "failed",
                "5.0.0",
                "DNS Error: 1 DNS type 'mx' lookup of dest.test responded with code NOERROR The domain dest.test doesn't receive email according to the administrator: returned Null MX"
            )),
            (Some(Policy), false)
        );
        // A relay's quota is the sender's, not the mailbox's.
        assert_eq!(
            judged(dsn(
                "failed",
                "5.0.0",
                "554 You've reached your daily relay quota"
            )),
            (Some(Policy), false)
        );
    }

    #[test]
    fn the_reason_beside_the_address_is_read() {
        let qmail = [
            "<ann@dest.test>:",
            "vdelivermail: account is locked email bounced",
            "",
            "--- Below",
        ];
        assert_eq!(
            reason_for(&qmail, None).as_deref(),
            Some("vdelivermail: account is locked email bounced")
        );
        let postfix = [
            "<ann@dest.test>: Name service error for domain dest.test: Host not",
            "    found, try again",
        ];
        assert_eq!(
            reason_for(&postfix, Some("ann@dest.test")).as_deref(),
            Some("Name service error for domain dest.test: Host not found, try again")
        );
        let exim = [
            "  ann@dest.test",
            "    generated by bob@dest.test",
            "    an MX or SRV record indicated no SMTP service",
            "",
        ];
        assert_eq!(
            reason_for(&exim, Some("ann@dest.test")).as_deref(),
            Some("an MX or SRV record indicated no SMTP service")
        );
        // An address inside a sentence is not a reason's label.
        assert_eq!(
            reason_for(&["Unable to deliver message to <ann@dest.test>."], None),
            None
        );
        assert!(names_no_address("550: : User unknown"));
        assert!(names_no_address("-> 550 : User unknown"));
        assert!(!names_no_address("550 <ann@dest.test>: User unknown"));
    }

    #[test]
    fn references_and_return_paths_are_found_in_quoted_messages() {
        let mut dsn = String::from_utf8_lossy(&file("lhost-postfix-05.eml")).into_owned();
        dsn.push_str(
            "\nReturn-Path: <b-abc@bounces.example.com>\nX-Herald-Ref: 01ABCDEFGHJK.xyz\n",
        );
        let r = parse(dsn.as_bytes());
        assert_eq!(r.herald_ref.as_deref(), Some("01ABCDEFGHJK.xyz"));
        assert_eq!(
            r.quoted_return_path.as_deref(),
            Some("b-abc@bounces.example.com")
        );
        let arf = String::from_utf8_lossy(&file("arf-01.eml")).replacen(
            "Message-ID:",
            "X-Herald-Ref: 01ABCDEFGHJK.abc\nMessage-ID:",
            1,
        );
        let r = parse(arf.as_bytes());
        assert_eq!(r.kind, Kind::Complaint);
        assert_eq!(r.herald_ref.as_deref(), Some("01ABCDEFGHJK.abc"));
    }

    #[test]
    fn mangled_input_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (_, b) in all() {
            for k in 1..16 {
                parse(&b[..b.len() * k / 16]);
            }
            let mut m = b.clone();
            for _ in 0..20 {
                if m.is_empty() {
                    break;
                }
                let i = (rnd() as usize) % m.len();
                match rnd() % 3 {
                    0 => m[i] = rnd() as u8,
                    1 => {
                        m.remove(i);
                    }
                    _ => m.insert(i, b"\n:;-5.\r<>="[(rnd() % 10) as usize]),
                }
            }
            parse(&m);
        }
        parse(b"");
        parse(&[0xff; 1000]);
        parse(&vec![b'x'; 1 << 20]);
        let mut folded = b"Content-Type: multipart/report; boundary=x\n".to_vec();
        folded.extend(std::iter::repeat_n(&b" folded\n"[..], 50_000).flatten());
        parse(&folded);
        parse(b"Feedback-Type:\n\nAction: failed\nStatus: 9.9.9.9\n");
    }
}
