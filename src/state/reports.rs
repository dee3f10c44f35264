//! The bounce intake's records: each report received (its record in the
//! `reports` tree, its body a file in `STORAGE/reports/`), the return paths
//! of sent mail (`return_paths`: queue id -> which address each recipient
//! index was), one outcome per recipient, message and kind
//! (`report_outcomes`), and the intake's budgets (storage, rate per client).

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
use crate::replies::{self, Reply};
use crate::state::pacing::Bucket;
use crate::state::spool::{now_ms, QueueError};
use crate::token;

const DAY_MS: u64 = 86_400_000;

/// What a report was sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "lowercase")]
pub enum Target {
    /// A return-path token: message and recipient index.
    Token { id: String, index: usize },
    /// The feedback-loop address.
    Complaint,
    /// `dmarc_address`: DMARC aggregate reports.
    Dmarc,
    /// `tlsrpt_address`: TLS reports.
    TlsRpt,
}

impl Target {
    /// An address anyone may write to (no token proves anything): what
    /// waits there may fill half of `max_stored` at most.
    pub fn is_open(&self) -> bool {
        !matches!(self, Target::Token { .. })
    }
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Counts per outcome since start, for `/metrics` and `status`.
pub type Counts = BTreeMap<&'static str, u64>;

/// What a report's record costs in the budget, beside its body file (a
/// record is a few hundred bytes; its summary is capped to fit).
const RECORD_COST: u64 = 1024;
/// A summary longer than this is cut (remote replies can be long).
pub const SUMMARY_MAX: usize = 600;
/// Once applied, a report keeps this much of its text for `herald show`
/// (the status part comes first; the quoted message is what is cut).
pub const KEEP_AFTER_APPLY: u64 = 64 * 1024;

/// The intake's storage and key.
#[derive(Clone)]
pub struct Bounces {
    pub key: token::Key,
    pub domain: String,
    pub complaint_address: String,
    pub dmarc_address: String,
    pub tlsrpt_address: String,
    /// The figures of DMARC and TLS reports.
    pub aggregates: crate::state::aggregates::Aggregates,
    /// How long they are kept.
    pub aggregate_retention: std::time::Duration,
    /// The largest report (decompressed attachments are capped at it).
    pub max_size: usize,
    reports: sled::Tree,
    /// Report bodies of earlier versions, kept in sled: moved to files at
    /// start.
    legacy_bodies: sled::Tree,
    sent: sled::Tree,
    /// `[cluster]`: return paths go to every node.
    cluster: Arc<std::sync::OnceLock<Arc<crate::state::cluster::Cluster>>>,
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
pub const OUTCOMES: [&str; 18] = [
    "dmarc_report",
    "tls_report",
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
    match crate::limit::canonical_ip(ip) {
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
            dmarc_address: cfg.dmarc_address.clone(),
            tlsrpt_address: cfg.tlsrpt_address.clone(),
            aggregates: crate::state::aggregates::Aggregates::open(db)?,
            aggregate_retention: cfg.aggregate_retention,
            max_size: cfg.max_size,
            reports: db.open_tree("reports")?,
            legacy_bodies: db.open_tree("report_bodies")?,
            sent: db.open_tree("return_paths")?,
            cluster: Arc::default(),
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
                    if r.target.is_open() {
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
            if crate::state::spool::parse_id(&id).as_deref() == Some(id.as_str()) {
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
    pub fn admit(&self, ip: IpAddr) -> Result<(), Reply> {
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
            return Err(replies::too_many_reports(rate, wait.div_ceil(1000)));
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
    pub fn note_sent(&self, env: &crate::state::spool::Envelope) {
        let key = env.id.as_bytes();
        if matches!(self.sent.contains_key(key), Ok(true)) {
            return;
        }
        let s = Sent {
            rcpts: env.rcpts.iter().map(|r| r.addr.clone()).collect(),
            tag: env.tag.clone(),
            subject: env.subject.clone(),
            sent_ms: now_ms(),
            tenant: env.tenant.clone(),
        };
        if let Ok(v) = serde_json::to_vec(&s) {
            if let Some(c) = self.cluster.get() {
                let op = crate::state::cluster::Op::Sent {
                    id: env.id.clone(),
                    json: String::from_utf8_lossy(&v).into_owned(),
                };
                if let Err(e) = c.enqueue(&op) {
                    tracing::error!(id = %env.id, error = %e, "cannot share the return paths of a message");
                }
            }
            if let Err(e) = self.sent.insert(key, v) {
                tracing::error!(id = %env.id, error = %e, "cannot note the return paths of a message");
            }
        }
    }

    /// `[cluster]`: return paths are shared from now on.
    pub fn share_with(&self, c: Arc<crate::state::cluster::Cluster>) {
        let _ = self.cluster.set(c);
    }

    pub fn sent_record(&self, id: &str) -> Option<Sent> {
        let v = self.sent.get(id.as_bytes()).ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// What a recipient address of the bounce domain is, or the SMTP
    /// refusal to give.
    pub fn check_rcpt(&self, addr: &str) -> Result<Target, Reply> {
        let lower = addr.to_ascii_lowercase();
        if lower == self.complaint_address {
            return Ok(Target::Complaint);
        }
        if lower == self.dmarc_address {
            return Ok(Target::Dmarc);
        }
        if lower == self.tlsrpt_address {
            return Ok(Target::TlsRpt);
        }
        let unknown = || replies::no_such_return_path(addr);
        let Some((local, domain)) = lower.rsplit_once('@') else {
            return Err(unknown());
        };
        if domain != self.domain {
            return Err(replies::not_the_bounce_domain(addr, &self.domain));
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
                Err(replies::expired_return_path(addr))
            }
        }
    }

    fn body_path(&self, id: &str) -> Option<PathBuf> {
        (crate::state::spool::parse_id(id).as_deref() == Some(id)).then(|| self.dir.join(id))
    }

    /// Whether a report of `size` bytes to the complaint address fits in
    /// its half of `max_stored` now (`size` 0: whether any more does).
    pub fn complaint_room(&self, size: u64) -> bool {
        self.pending_complaints.load(Ordering::Relaxed) + size < self.max_stored / 2
    }

    pub fn complaint_applied(&self, rec: &Record) {
        if rec.target.is_open() {
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
    pub fn store(
        &self,
        rec: &Record,
        body: impl FnOnce(&mut dyn Write) -> std::io::Result<u64>,
    ) -> Result<(), QueueError> {
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
            let n = body(&mut w)?;
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
        if rec.target.is_open() {
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
    pub fn trim(&self, id: &str) {
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

    pub fn save(&self, rec: &Record) {
        if let Ok(v) = serde_json::to_vec(rec) {
            if let Err(e) = self.reports.insert(rec.id.as_bytes(), v) {
                tracing::error!(report = %rec.id, error = %e, "cannot update a report");
            }
        }
    }

    /// Notes the first report of an outcome for a recipient of a message;
    /// Err(earlier report id) when one was applied already.
    pub fn first_of(
        &self,
        id: &str,
        rcpt: &str,
        outcome: &str,
        report: &str,
    ) -> Result<(), String> {
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
        let keep_s = self.aggregate_retention.as_secs();
        self.aggregates
            .purge((now_ms() / 1000).saturating_sub(keep_s));
        n
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
}
