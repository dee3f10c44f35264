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

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::Rate;
use crate::delivery::shaping::Bucket;
use crate::smtp_in::spool::Spool;

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

/// What a report's record costs in the budget, beside its body file (a
/// record is a few hundred bytes; its summary is capped to fit).
const RECORD_COST: u64 = 1024;
/// A summary longer than this is cut (remote replies can be long).
const SUMMARY_MAX: usize = 600;
/// Once applied, a report keeps this much of its text for `herald show`
/// (the status part comes first; the quoted message is what is cut).
pub const KEEP_AFTER_APPLY: u64 = 64 * 1024;

/// The intake's storage and key.
#[derive(Clone)]
pub struct Bounces {
    pub key: token::Key,
    pub domain: String,
    pub complaint_address: String,
    reports: sled::Tree,
    /// Report bodies of earlier versions, kept in sled: moved to files at
    /// start.
    legacy_bodies: sled::Tree,
    sent: sled::Tree,
    /// One entry per message, recipient and outcome (`bounced`,
    /// `delayed`, `complained`): the first report applies, the others
    /// are duplicates.
    outcomes: sled::Tree,
    /// Report bodies, one file each, named by report id: sled keeps every
    /// value it holds in memory, files are read only when needed.
    dir: PathBuf,
    max_stored: u64,
    /// Bytes held now: body files, and RECORD_COST per record.
    stored: Arc<AtomicU64>,
    /// One eviction at a time.
    evicting: Arc<Mutex<()>>,
    /// Bytes of reports to the complaint address not applied yet: anyone
    /// can send those, so they may fill half of `max_stored` at most, and
    /// reports to genuine tokens always find the other half.
    pending_complaints: Arc<AtomicU64>,
    rate: Option<Rate>,
    clients: Arc<Mutex<HashMap<IpAddr, Bucket>>>,
    counts: Arc<Mutex<Counts>>,
    work: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Every outcome counted, so that `/metrics` shows each from the start.
pub const OUTCOMES: [&str; 16] = [
    "bounced",
    "delayed",
    "complained",
    "complaint_unpinned",
    "duplicate",
    "auth_failure",
    "not_spam",
    "auto_reply",
    "delivery_notice",
    "unmatched",
    "unparsed",
    "refused_forged",
    "refused_expired",
    "refused_rate",
    "refused_full",
    "evicted",
];

/// The key a client's report rate is counted under: its IPv4 address, or
/// the /64 of its IPv6 address (one host usually holds a whole /64).
fn client_key(ip: IpAddr) -> IpAddr {
    match crate::smtp_in::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// Takes `n` off a byte count, never below zero.
fn take(count: &AtomicU64, n: u64) {
    let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

/// The storage budget's bytes, as a size a person reads.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Bounces {
    /// Opens the trees and the body directory; the receiver gets the ids
    /// of reports to apply (those left pending by a stop come first).
    pub fn open(
        db: &sled::Db,
        storage: &Path,
        cfg: &crate::config::Bounces,
    ) -> Result<(Bounces, tokio::sync::mpsc::UnboundedReceiver<String>), QueueError> {
        let (work, rx) = tokio::sync::mpsc::unbounded_channel();
        let dir = storage.join("reports");
        std::fs::create_dir_all(&dir)?;
        let b = Bounces {
            key: token::Key::new(cfg.secret.expose().as_bytes()),
            domain: cfg.domain.clone(),
            complaint_address: cfg.complaint_address.clone(),
            reports: db.open_tree("reports")?,
            legacy_bodies: db.open_tree("report_bodies")?,
            sent: db.open_tree("return_paths")?,
            outcomes: db.open_tree("report_outcomes")?,
            dir,
            max_stored: cfg.max_stored,
            stored: Arc::default(),
            evicting: Arc::default(),
            pending_complaints: Arc::default(),
            rate: cfg.max_rate_per_ip,
            clients: Arc::default(),
            counts: Arc::default(),
            work,
        };
        b.migrate_legacy_bodies()?;
        let mut total = 0u64;
        let mut known = std::collections::HashSet::new();
        for item in b.reports.iter() {
            let (k, v) = item?;
            total += RECORD_COST;
            known.insert(String::from_utf8_lossy(&k).into_owned());
            if let Ok(r) = serde_json::from_slice::<Record>(&v) {
                if r.state == State::Pending {
                    if r.target == Target::Complaint {
                        b.pending_complaints
                            .fetch_add(r.size as u64, Ordering::Relaxed);
                    }
                    let _ = b.work.send(r.id);
                }
            }
        }
        // Bodies whose record was never committed (a crash between the
        // two) are not reports anyone was told about.
        for entry in std::fs::read_dir(&b.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        b.stored.store(total, Ordering::Relaxed);
        Ok((b, rx))
    }

    /// Reports stored in sled by an earlier version go to files.
    fn migrate_legacy_bodies(&self) -> Result<(), QueueError> {
        if self.legacy_bodies.is_empty() {
            return Ok(());
        }
        let mut moved = 0;
        for item in self.legacy_bodies.iter() {
            let (k, v) = item?;
            let id = String::from_utf8_lossy(&k).into_owned();
            if crate::queue::parse_id(&id).as_deref() == Some(id.as_str()) {
                let keep = &v[..v.len().min(KEEP_AFTER_APPLY as usize)];
                let mut f = std::fs::File::create(self.dir.join(&id))?;
                f.write_all(keep)?;
                f.sync_all()?;
                moved += 1;
            }
        }
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.legacy_bodies.clear()?;
        tracing::info!(reports = moved, "report bodies moved out of the database");
        Ok(())
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

    /// Bytes of reports held now, and the budget (`max_stored`).
    pub fn stored(&self) -> (u64, u64) {
        (self.stored.load(Ordering::Relaxed), self.max_stored)
    }

    /// A new report from `ip` (at MAIL FROM): within `max_rate_per_ip`,
    /// or the refusal to give.
    pub fn admit(&self, ip: IpAddr) -> Result<(), (u16, String)> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        let now = Instant::now();
        let mut m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 10_000 {
            // Clients idle long enough to be full again are forgotten.
            m.retain(|_, b| !b.is_full(now));
        }
        let bucket = m.entry(client_key(ip)).or_insert_with(|| Bucket::new(rate));
        let wait = bucket.wait_ms(now);
        if wait > 0 {
            drop(m);
            self.count("refused_rate");
            return Err((
                450,
                format!(
                    "4.7.1 Too many reports from your address (bounces.max_rate_per_ip {rate}); try again in {}s",
                    wait.div_ceil(1000)
                ),
            ));
        }
        bucket.take();
        Ok(())
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

    fn body_path(&self, id: &str) -> Option<PathBuf> {
        (crate::queue::parse_id(id).as_deref() == Some(id)).then(|| self.dir.join(id))
    }

    /// Whether a report of `size` bytes to the complaint address fits in
    /// its half of `max_stored` now (`size` 0: whether any more does).
    pub fn complaint_room(&self, size: u64) -> bool {
        self.pending_complaints.load(Ordering::Relaxed) + size < self.max_stored / 2
    }

    fn complaint_applied(&self, rec: &Record) {
        if rec.target == Target::Complaint {
            take(&self.pending_complaints, rec.size as u64);
        }
    }

    /// Room for a report of `size` bytes within `max_stored`, made by
    /// dropping the oldest handled reports (those not understood or not
    /// acted on first) when needed. False when only reports still to be
    /// applied are left: the sender is told to try again later.
    pub fn make_room(&self, size: u64) -> bool {
        let need = size + RECORD_COST;
        let fits = |b: &Bounces| b.stored.load(Ordering::Relaxed) + need <= b.max_stored;
        if fits(self) {
            return true;
        }
        let _one = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        if fits(self) {
            return true;
        }
        // Down to 90% of the budget, so that a flood does not evict one
        // report per report.
        let target = (self.max_stored / 10 * 9).saturating_sub(need);
        let mut dropped = 0u64;
        for pass in [false, true] {
            let mut victims = Vec::new();
            let mut have = self.stored.load(Ordering::Relaxed);
            for item in self.reports.iter() {
                if have <= target {
                    break;
                }
                let Ok((k, v)) = item else { break };
                let Ok(r) = serde_json::from_slice::<Record>(&v) else {
                    victims.push(String::from_utf8_lossy(&k).into_owned());
                    continue;
                };
                let applied = r.state == State::Applied;
                if r.state == State::Pending || applied != pass {
                    continue;
                }
                let len = self
                    .body_path(&r.id)
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .unwrap_or(0);
                have = have.saturating_sub(len + RECORD_COST);
                victims.push(r.id);
            }
            for id in &victims {
                self.remove(id);
                self.count("evicted");
            }
            dropped += victims.len() as u64;
            if self.stored.load(Ordering::Relaxed) <= target {
                break;
            }
        }
        if dropped > 0 {
            let (now, max) = self.stored();
            tracing::warn!(
                reports = dropped,
                stored = %mib(now),
                max_stored = %mib(max),
                "oldest handled reports dropped to stay within bounces.max_stored"
            );
        }
        fits(self)
    }

    /// Writes a report received by the listener: its body to a file,
    /// synced with its directory, then its record (not yet durable: the
    /// caller commits, then calls [`Bounces::enqueue`]). Blocking.
    pub fn store(&self, rec: &Record, body: Spool) -> Result<(), QueueError> {
        let v = serde_json::to_vec(rec).map_err(|_| QueueError::Corrupt(rec.id.clone()))?;
        let path = self
            .body_path(&rec.id)
            .ok_or_else(|| QueueError::Corrupt(rec.id.clone()))?;
        let written = (|| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?;
            let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
            let n = body.write_to(&mut w)?;
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::File::open(&self.dir)?.sync_all()?;
            Ok::<u64, std::io::Error>(n)
        })();
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        };
        self.stored.fetch_add(n + RECORD_COST, Ordering::Relaxed);
        if rec.target == Target::Complaint {
            self.pending_complaints.fetch_add(n, Ordering::Relaxed);
        }
        if let Err(e) = self.reports.insert(rec.id.as_bytes(), v) {
            self.remove(&rec.id);
            return Err(e.into());
        }
        Ok(())
    }

    /// Forgets a report: its record, then its body.
    pub fn remove(&self, id: &str) {
        let old = self.reports.remove(id.as_bytes()).ok().flatten();
        let had = old.is_some();
        if let Some(r) = old.and_then(|v| serde_json::from_slice::<Record>(&v).ok()) {
            if r.state == State::Pending {
                self.complaint_applied(&r);
            }
        }
        let mut freed = if had { RECORD_COST } else { 0 };
        if let Some(p) = self.body_path(id) {
            if let Ok(m) = std::fs::metadata(&p) {
                if std::fs::remove_file(&p).is_ok() {
                    freed += m.len();
                }
            }
        }
        take(&self.stored, freed);
    }

    /// Cuts an applied report's body to [`KEEP_AFTER_APPLY`] bytes.
    fn trim(&self, id: &str) {
        let Some(p) = self.body_path(id) else { return };
        let Ok(len) = std::fs::metadata(&p).map(|m| m.len()) else {
            return;
        };
        if len <= KEEP_AFTER_APPLY {
            return;
        }
        let cut = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_len(KEEP_AFTER_APPLY));
        match cut {
            Ok(()) => take(&self.stored, len - KEEP_AFTER_APPLY),
            Err(e) => tracing::warn!(report = %id, error = %e, "cannot trim a report"),
        }
    }

    pub fn enqueue(&self, id: &str) {
        let _ = self.work.send(id.to_string());
    }

    pub fn record(&self, id: &str) -> Option<Record> {
        let v = self.reports.get(id.as_bytes()).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// A report's text as kept (all of it until applied, then its start).
    pub fn body(&self, id: &str) -> Option<Vec<u8>> {
        std::fs::read(self.body_path(id)?).ok()
    }

    /// Reports, newest first (ids sort by time).
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.reports
            .iter()
            .rev()
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
    }

    /// Reports about message `id` (received after it, so the scan starts
    /// at its id: ids sort by time).
    pub fn about_message(&self, id: &str) -> Vec<Record> {
        self.reports
            .range(id.as_bytes()..)
            .filter_map(|i| i.ok())
            .filter_map(|(_, v)| serde_json::from_slice::<Record>(&v).ok())
            .filter(|r| r.message.as_deref() == Some(id))
            .collect()
    }

    fn save(&self, rec: &Record) {
        if let Ok(v) = serde_json::to_vec(rec) {
            if let Err(e) = self.reports.insert(rec.id.as_bytes(), v) {
                tracing::error!(report = %rec.id, error = %e, "cannot update a report");
            }
        }
    }

    /// Notes the first report of an outcome for a recipient of a message;
    /// Err(earlier report id) when one was applied already.
    fn first_of(&self, id: &str, rcpt: &str, outcome: &str, report: &str) -> Result<(), String> {
        let key = format!("{id}\0{}\0{outcome}", rcpt.to_lowercase());
        let v = json!({ "report": report, "at_ms": now_ms() }).to_string();
        match self.outcomes.compare_and_swap(
            key.as_bytes(),
            None as Option<&[u8]>,
            Some(v.as_bytes()),
        ) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(cas)) => Err(cas
                .current
                .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok())
                .and_then(|v| v["report"].as_str().map(String::from))
                .unwrap_or_default()),
            Err(e) => {
                // Better a second event than none.
                tracing::error!(error = %e, "cannot note a report's outcome");
                Ok(())
            }
        }
    }

    /// Drops reports received before `before_ms`, and return-path notes
    /// and outcome notes older than a token lives.
    pub fn purge(&self, before_ms: u64) -> usize {
        let mut n = 0;
        for (k, v) in self.reports.iter().filter_map(|i| i.ok()) {
            let old = serde_json::from_slice::<Record>(&v)
                .map(|r| r.received_ms < before_ms && r.state != State::Pending)
                .unwrap_or(true);
            if old {
                self.remove(&String::from_utf8_lossy(&k));
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
        for (k, v) in self.outcomes.iter().filter_map(|i| i.ok()) {
            let old = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()
                .and_then(|v| v["at_ms"].as_u64())
                .is_none_or(|t| t < sent_before);
            if old {
                let _ = self.outcomes.remove(&k);
            }
        }
        n
    }
}

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
}

/// What a message was: its recipients by index, tag and subject.
fn message_of(
    s: &Services,
    b: &Bounces,
    id: &str,
) -> Option<(Vec<String>, Option<String>, Option<String>)> {
    match s.store.envelope(id) {
        Ok(Some(env)) => Some((
            env.rcpts.iter().map(|r| r.addr.clone()).collect(),
            env.tag,
            env.subject,
        )),
        _ => {
            let sent = b.sent_record(id)?;
            Some((sent.rcpts, sent.tag, sent.subject))
        }
    }
}

/// Recipient `index` of message `id`, as a signed token names it.
fn about(s: &Services, b: &Bounces, id: &str, index: usize) -> Option<About> {
    let (rcpts, tag, subject) = message_of(s, b, id)?;
    Some(About {
        id: id.to_string(),
        rcpt: rcpts.get(index)?.clone(),
        tag,
        subject,
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
        Some((rcpts, tag, subject)) if rcpts.len() == 1 => Complained::Recipient(About {
            id,
            rcpt: rcpts[0].clone(),
            tag,
            subject,
        }),
        Some((rcpts, ..)) => Complained::Message {
            id,
            rcpts: rcpts.len(),
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
    let rep = crate::report::parse(&raw);
    drop(raw);
    rec.kind = Some(kind_name(&rep.kind).to_string());
    let (outcome, state, summary) = decide(s, b, &mut rec, &rep);
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

fn decide(
    s: &Services,
    b: &Bounces,
    rec: &mut Record,
    rep: &Report,
) -> (&'static str, State, String) {
    let token_about = |rec: &Record| match &rec.target {
        Target::Token { id, index } => about(s, b, id, *index),
        Target::Complaint => None,
    };
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
        Kind::Complaint => {
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
                record(s, &a, EventKind::Delayed, &detail, extra);
                return ("delayed", State::Applied, detail);
            }
            let detail = format!("{line}{}", bounced_suffix(class, reporter));
            // Still queued and not final (a report from an earlier hop
            // while herald retries): it is final now.
            let updated = s.store.update(&a.id, |env| {
                if let Some(r) = env.rcpts.iter_mut().find(|r| r.addr == a.rcpt) {
                    if !r.status.is_final() {
                        r.status = RcptStatus::Bounced;
                        r.class = Some(class);
                        r.last_reply = Some(detail.clone());
                        r.updated = now_ms();
                    }
                }
            });
            if let Err(e) = updated {
                tracing::error!(id = %a.id, error = %e, "cannot mark a reported bounce in the queue");
            }
            if outcome.suppress {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_an_ipv4_address_or_an_ipv6_64() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        // IPv4 on an IPv6 socket is the IPv4 client.
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
    }

    #[test]
    fn summaries_are_cut_at_a_character_boundary() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(400);
        let c = cut(&long, 601);
        assert!(c.len() <= 604 && c.ends_with("..."), "{c}");
    }
}
