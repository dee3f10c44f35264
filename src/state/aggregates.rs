//! What receivers saw: the figures of DMARC aggregate reports (RFC 7489)
//! and TLS reports (RFC 8460) sent to the intake's `dmarc_address` and
//! `tlsrpt_address`, kept for `[bounces] aggregate_retention`. One row per
//! report and source (DMARC) or policy (TLS); the same report sent twice
//! writes the same keys, so it is counted once.
//!
//! Trees: `dmarc_rows` and `tlsrpt_rows`, keyed by the report's end time
//! (seconds, big endian), reporter, report id and row number.

use serde::{Deserialize, Serialize};

use crate::state::spool::QueueError;

/// One record of a DMARC aggregate report: messages from one source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DmarcRow {
    /// The domain of the published policy (the From domain).
    pub domain: String,
    /// The receiver that reported (`org_name`).
    pub reporter: String,
    pub report_id: String,
    /// The period reported, seconds since the epoch.
    pub begin: u64,
    pub end: u64,
    pub source_ip: String,
    pub count: u64,
    /// What the receiver did: none, quarantine, reject.
    pub disposition: String,
    /// DKIM and SPF as DMARC evaluated them (pass = aligned pass).
    pub dkim: bool,
    pub spf: bool,
    pub header_from: String,
    /// `domain/selector` of each DKIM signature that passed.
    pub dkim_passed: Vec<String>,
}

impl DmarcRow {
    /// DMARC passed: aligned DKIM or aligned SPF.
    pub fn passed(&self) -> bool {
        self.dkim || self.spf
    }

    /// Its mail passed DKIM under one of `keys` ("domain/selector"): the
    /// source is one of herald's nodes.
    pub fn signed_by(&self, keys: &std::collections::BTreeSet<String>) -> bool {
        self.dkim_passed.iter().any(|k| keys.contains(k))
    }
}

/// One policy of a TLS report: sessions to one domain's MX hosts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TlsRow {
    pub domain: String,
    pub reporter: String,
    pub report_id: String,
    pub begin: u64,
    pub end: u64,
    /// sts, tlsa, no-policy-found
    pub policy: String,
    pub successful: u64,
    pub failed: u64,
    /// The failures by result type ("certificate-expired", ...) and count.
    pub failures: Vec<(String, u64)>,
}

/// Messages of DMARC reports applied since start, per (domain, passed).
pub type DmarcCounts = std::collections::BTreeMap<(String, bool), u64>;

#[derive(Clone)]
pub struct Aggregates {
    dmarc: sled::Tree,
    tls: sled::Tree,
    counts: std::sync::Arc<std::sync::Mutex<DmarcCounts>>,
}

fn key(end: u64, reporter: &str, report_id: &str, n: usize) -> Vec<u8> {
    let mut k = end.to_be_bytes().to_vec();
    k.extend_from_slice(reporter.as_bytes());
    k.push(0);
    k.extend_from_slice(report_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&(n as u32).to_be_bytes());
    k
}

/// Writes the rows of one report under (end, reporter, report id, row);
/// for each, whether it was new.
fn insert<'a, T: Serialize>(
    tree: &sled::Tree,
    rows: &[T],
    keys: impl Iterator<Item = (u64, &'a str, &'a str)>,
) -> Result<Vec<bool>, QueueError> {
    let mut first = Vec::with_capacity(rows.len());
    for (n, (r, (end, reporter, id))) in rows.iter().zip(keys).enumerate() {
        let v = serde_json::to_vec(r).map_err(|e| QueueError::Failed(e.to_string()))?;
        first.push(tree.insert(key(end, reporter, id, n), v)?.is_none());
    }
    Ok(first)
}

fn scan<T: for<'de> Deserialize<'de>>(
    tree: &sled::Tree,
    since_s: u64,
) -> Result<Vec<T>, QueueError> {
    let mut out = Vec::new();
    for item in tree.range(since_s.to_be_bytes()..) {
        let (_, v) = item?;
        if let Ok(r) = serde_json::from_slice(&v) {
            out.push(r);
        }
    }
    Ok(out)
}

impl Aggregates {
    pub fn open(db: &sled::Db) -> Result<Aggregates, QueueError> {
        Ok(Aggregates {
            dmarc: db.open_tree("dmarc_rows")?,
            tls: db.open_tree("tlsrpt_rows")?,
            counts: Default::default(),
        })
    }

    /// Stores the rows of one DMARC report; false when it was stored
    /// already (then nothing is counted again).
    pub fn add_dmarc(&self, rows: &[DmarcRow]) -> Result<bool, QueueError> {
        let keys = rows
            .iter()
            .map(|r| (r.end, r.reporter.as_str(), r.report_id.as_str()));
        let first = insert(&self.dmarc, rows, keys)?;
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for r in rows.iter().zip(&first).filter(|(_, f)| **f).map(|(r, _)| r) {
            *c.entry((r.domain.clone(), r.passed())).or_default() += r.count;
        }
        Ok(first.contains(&true))
    }

    /// Messages of the DMARC reports applied since start.
    pub fn counts(&self) -> DmarcCounts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn add_tls(&self, rows: &[TlsRow]) -> Result<bool, QueueError> {
        let keys = rows
            .iter()
            .map(|r| (r.end, r.reporter.as_str(), r.report_id.as_str()));
        Ok(insert(&self.tls, rows, keys)?.contains(&true))
    }

    /// Rows of reports whose period ended at or after `since_s`.
    pub fn dmarc(&self, since_s: u64) -> Result<Vec<DmarcRow>, QueueError> {
        scan(&self.dmarc, since_s)
    }

    pub fn tls(&self, since_s: u64) -> Result<Vec<TlsRow>, QueueError> {
        scan(&self.tls, since_s)
    }

    /// Drops the rows of reports that ended before `before_s`; how many.
    pub fn purge(&self, before_s: u64) -> usize {
        let mut n = 0;
        for tree in [&self.dmarc, &self.tls] {
            let old: Vec<_> = tree
                .range(..before_s.to_be_bytes())
                .keys()
                .filter_map(|k| k.ok())
                .collect();
            for k in old {
                if tree.remove(k).is_ok() {
                    n += 1;
                }
            }
        }
        n
    }
}
