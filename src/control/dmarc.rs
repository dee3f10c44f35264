//! `herald dmarc`: what receivers saw of each sending domain, from the
//! DMARC aggregate and TLS reports at the intake. A source is herald's own
//! when its mail passed DKIM under one of herald's `[[dkim]]` keys; the
//! others (the customer's other servers, or someone spoofing) are listed
//! apart.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::failure::Failure;
use crate::state::aggregates::DmarcRow;
use crate::state::Services;

#[derive(Default)]
struct Tally {
    messages: u64,
    passed: u64,
}

impl Tally {
    fn add(&mut self, r: &DmarcRow) {
        self.messages += r.count;
        if r.passed() {
            self.passed += r.count;
        }
    }
}

#[derive(Default)]
struct Source {
    t: Tally,
    dkim: u64,
    spf: u64,
    quarantined: u64,
    rejected: u64,
    herald: bool,
}

fn pct(part: u64, all: u64) -> f64 {
    if all == 0 {
        0.0
    } else {
        (part as f64 * 1000.0 / all as f64).round() / 10.0
    }
}

/// Per domain (or only `domain`), reports whose period ended in the last
/// `since_s` seconds.
pub fn answer(s: &Services, domain: Option<&str>, since_s: u64) -> Result<Value, Failure> {
    let Some(b) = s.bounces.as_ref() else {
        return Err("no [bounces] section: herald takes no DMARC reports".into());
    };
    let from = (crate::state::spool::now_ms() / 1000).saturating_sub(since_s);
    let cfg = s.cfg();
    let keys = cfg.dkim_keys();
    let want = domain.map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase());
    let mut by_domain: BTreeMap<String, Vec<DmarcRow>> = BTreeMap::new();
    for r in b.aggregates.dmarc(from)? {
        if want.as_ref().is_none_or(|d| *d == r.domain) {
            by_domain.entry(r.domain.clone()).or_default().push(r);
        }
    }
    let domains: Vec<Value> = by_domain
        .iter()
        .map(|(d, rows)| domain_figures(d, rows, &keys))
        .collect();
    let mut tls: BTreeMap<String, (u64, u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for r in b.aggregates.tls(from)? {
        if want.as_ref().is_none_or(|d| *d == r.domain) {
            let e = tls.entry(r.domain.clone()).or_default();
            e.0 += r.successful;
            e.1 += r.failed;
            for (k, n) in &r.failures {
                *e.2.entry(k.clone()).or_default() += n;
            }
        }
    }
    let tls: Vec<Value> = tls
        .into_iter()
        .map(|(d, (ok, failed, why))| {
            json!({"domain": d, "successful": ok, "failed": failed, "failures": why})
        })
        .collect();
    Ok(json!({ "since_s": since_s, "domains": domains, "tls": tls }))
}

fn domain_figures(domain: &str, rows: &[DmarcRow], keys: &BTreeSet<String>) -> Value {
    let mut all = Tally::default();
    let mut reporters: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut sources: BTreeMap<&str, Source> = BTreeMap::new();
    let mut daily: BTreeMap<String, Tally> = BTreeMap::new();
    for r in rows {
        all.add(r);
        let day = chrono::DateTime::from_timestamp(r.end as i64, 0)
            .map(|t| t.date_naive().to_string())
            .unwrap_or_default();
        daily.entry(day).or_default().add(r);
        reporters.entry(&r.reporter).or_default().add(r);
        let src = sources.entry(&r.source_ip).or_default();
        src.t.add(r);
        src.dkim += if r.dkim { r.count } else { 0 };
        src.spf += if r.spf { r.count } else { 0 };
        src.quarantined += if r.disposition == "quarantine" {
            r.count
        } else {
            0
        };
        src.rejected += if r.disposition == "reject" {
            r.count
        } else {
            0
        };
        src.herald |= r.signed_by(keys);
    }
    let list = |herald: bool| -> Vec<Value> {
        let mut v: Vec<(&&str, &Source)> =
            sources.iter().filter(|(_, s)| s.herald == herald).collect();
        v.sort_by_key(|(_, s)| std::cmp::Reverse(s.t.messages));
        v.into_iter()
            .map(|(ip, s)| {
                json!({
                    "ip": ip, "messages": s.t.messages, "passed": s.t.passed,
                    "dkim_aligned": s.dkim, "spf_aligned": s.spf,
                    "quarantined": s.quarantined, "rejected": s.rejected,
                })
            })
            .collect()
    };
    let reporters: Vec<Value> = reporters
        .iter()
        .map(|(n, t)| json!({"reporter": n, "messages": t.messages, "passed": t.passed}))
        .collect();
    json!({
        "domain": domain,
        "messages": all.messages,
        "passed": all.passed,
        "pass_pct": pct(all.passed, all.messages),
        "reporters": reporters,
        // By the day each report's period ended: the console's chart.
        "daily": daily
            .iter()
            .map(|(d, t)| json!({"day": d, "messages": t.messages, "passed": t.passed, "pass_pct": pct(t.passed, t.messages)}))
            .collect::<Vec<_>>(),
        "herald_sources": list(true),
        "other_sources": list(false),
        "diagnosis": diagnosis(domain, &all, reporters.len(), &sources),
    })
}

/// One line, in the style of `trace`.
fn diagnosis(
    domain: &str,
    all: &Tally,
    receivers: usize,
    sources: &BTreeMap<&str, Source>,
) -> String {
    let mut d = format!(
        "{domain}: {}% of {} messages passed DMARC at {receivers} receiver{}",
        pct(all.passed, all.messages),
        all.messages,
        if receivers == 1 { "" } else { "s" }
    );
    let own_failed: u64 = sources
        .values()
        .filter(|s| s.herald)
        .map(|s| s.t.messages - s.t.passed)
        .sum();
    if own_failed > 0 {
        d.push_str(&format!(
            "; {own_failed} of herald's own messages failed: check herald check-dns (DKIM key published, SPF)"
        ));
    }
    let worst = sources
        .iter()
        .filter(|(_, s)| !s.herald && s.t.passed < s.t.messages)
        .max_by_key(|(_, s)| s.t.messages - s.t.passed);
    if let Some((ip, s)) = worst {
        d.push_str(&format!(
            "; {} messages from {ip}, not a herald node, failed{}: another server sends as {domain}, authorize it or stop it",
            s.t.messages - s.t.passed,
            if s.dkim == 0 && s.spf == 0 { " SPF and DKIM" } else { "" }
        ));
    } else if !sources.values().any(|s| !s.herald) {
        d.push_str("; every source is a herald node");
    }
    d
}
