//! DMARC aggregate reports and TLS reports at the intake: parsed with
//! `mail_auth::report` (XML or JSON, plain, gzipped or zipped, attachments
//! decompressed up to `[bounces] max_size`), their figures kept
//! (`state::aggregates`). A report that does not parse is kept as
//! `unparsed`, like a bounce nobody understands.

use mail_auth::report::tlsrpt::TlsReport;
use mail_auth::report::{ActionDisposition, DkimResult, DmarcResult, Report};

use super::{Bounces, Record, State, Target};
use crate::state::aggregates::{DmarcRow, TlsRow};
use crate::state::Services;

use super::Decision;

pub fn apply(s: &Services, b: &Bounces, rec: &mut Record, raw: &[u8]) -> Decision {
    match rec.target {
        Target::TlsRpt => tls(b, rec, raw),
        _ => dmarc(s, b, rec, raw),
    }
}

fn dmarc(s: &Services, b: &Bounces, rec: &mut Record, raw: &[u8]) -> Decision {
    let report = match Report::parse_rfc5322(raw, b.max_size) {
        Ok(r) => r,
        Err(e) => return unreadable("a DMARC aggregate report", &e),
    };
    rec.kind = Some("dmarc".into());
    let rows = dmarc_rows(&report);
    let messages: u64 = rows.iter().map(|r| r.count).sum();
    let passed: u64 = rows.iter().filter(|r| r.passed()).map(|r| r.count).sum();
    let summary = format!(
        "DMARC aggregate report {} from {} for {}: {messages} messages from {} sources, {passed} passed",
        report.report_id(),
        report.org_name(),
        report.domain(),
        rows.len()
    );
    let stored = b.aggregates.add_dmarc(&rows);
    if matches!(stored, Ok(true)) {
        alert(s, b, rec, &report, &rows);
    }
    decision(stored, "dmarc_report", summary)
}

/// A `dmarc_failing` event when herald's own mail in this report passed
/// less than `dmarc_alert_below`. herald's own: the sources (in this
/// report or earlier ones of the domain) whose mail passed DKIM under one
/// of herald's `[[dkim]]` keys.
fn alert(s: &Services, b: &Bounces, rec: &Record, report: &Report, rows: &[DmarcRow]) {
    let cfg = s.cfg();
    let Some(below) = cfg.bounces.as_ref().map(|c| c.dmarc_alert_below) else {
        return;
    };
    // A report in which everything passed says nothing is failing: the
    // stored rows are read only when something failed.
    if below == 0.0 || rows.iter().all(|r| r.passed()) {
        return;
    }
    let keys = cfg.dkim_keys();
    let domain = report.domain().to_ascii_lowercase();
    let earlier = b.aggregates.dmarc(0).unwrap_or_default();
    let own: std::collections::HashSet<&str> = earlier
        .iter()
        .chain(rows)
        .filter(|r| r.domain == domain && r.signed_by(&keys))
        .map(|r| r.source_ip.as_str())
        .collect();
    let (mut messages, mut passed) = (0u64, 0u64);
    for r in rows.iter().filter(|r| own.contains(r.source_ip.as_str())) {
        messages += r.count;
        passed += if r.passed() { r.count } else { 0 };
    }
    let pct = passed as f64 * 100.0 / messages.max(1) as f64;
    if messages == 0 || pct >= below {
        return;
    }
    let detail = format!(
        "{domain}: herald's own mail passed DMARC for {:.1}% of {messages} messages at {} (herald report {}), under bounces.dmarc_alert_below = {below}%: check herald check-dns {domain} (DKIM key published, SPF)",
        (pct * 10.0).round() / 10.0,
        report.org_name(),
        rec.id,
    );
    s.ledger().dmarc_failing(&rec.id, &detail);
}

/// One row per record of the report.
pub fn dmarc_rows(report: &Report) -> Vec<DmarcRow> {
    report
        .records()
        .iter()
        .map(|r| DmarcRow {
            domain: report.domain().to_ascii_lowercase(),
            reporter: report.org_name().to_string(),
            report_id: report.report_id().to_string(),
            begin: report.date_range_begin(),
            end: report.date_range_end(),
            source_ip: r.source_ip().map(|ip| ip.to_string()).unwrap_or_default(),
            count: r.count() as u64,
            disposition: match r.action_disposition() {
                ActionDisposition::Quarantine => "quarantine",
                ActionDisposition::Reject => "reject",
                _ => "none",
            }
            .into(),
            dkim: r.dmarc_dkim_result() == DmarcResult::Pass,
            spf: r.dmarc_spf_result() == DmarcResult::Pass,
            header_from: r.header_from().to_ascii_lowercase(),
            dkim_passed: r
                .dkim_auth_result()
                .iter()
                .filter(|d| d.result() == DkimResult::Pass)
                .map(|d| format!("{}/{}", d.domain().to_ascii_lowercase(), d.selector()))
                .collect(),
        })
        .collect()
}

fn tls(b: &Bounces, rec: &mut Record, raw: &[u8]) -> Decision {
    let report = match TlsReport::parse_rfc5322(raw, b.max_size) {
        Ok(r) => r,
        Err(e) => return unreadable("a TLS report", &e),
    };
    rec.kind = Some("tlsrpt".into());
    let reporter = report.organization_name.clone().unwrap_or_default();
    let rows: Vec<TlsRow> = report
        .policies
        .iter()
        .map(|p| TlsRow {
            domain: p.policy.policy_domain.to_ascii_lowercase(),
            reporter: reporter.clone(),
            report_id: report.report_id.clone(),
            begin: report.date_range.start_datetime.to_timestamp() as u64,
            end: report.date_range.end_datetime.to_timestamp() as u64,
            policy: rfc_name(&p.policy.policy_type),
            successful: p.summary.total_success as u64,
            failed: p.summary.total_failure as u64,
            failures: p
                .failure_details
                .iter()
                .map(|f| (rfc_name(&f.result_type), f.failed_session_count as u64))
                .collect(),
        })
        .collect();
    let failed: u64 = rows.iter().map(|r| r.failed).sum();
    let ok: u64 = rows.iter().map(|r| r.successful).sum();
    let summary = format!(
        "TLS report {} from {reporter}: {ok} sessions succeeded, {failed} failed",
        report.report_id
    );
    decision(b.aggregates.add_tls(&rows), "tls_report", summary)
}

/// RFC 8460's name of a policy or result type: mail-auth's serde name
/// (`certificate-expired`, `no-policy-found`).
fn rfc_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "other".into(),
    }
}

/// A report read and its rows stored (`outcome`), seen before, or not
/// stored.
fn decision(
    stored: Result<bool, crate::state::spool::QueueError>,
    outcome: &'static str,
    summary: String,
) -> Decision {
    match stored {
        Ok(true) => (outcome, State::Applied, summary),
        Ok(false) => (
            "duplicate",
            State::Ignored,
            format!("{summary}; received before, counted once"),
        ),
        Err(e) => (
            "unparsed",
            State::Unparsed,
            format!("{summary}; cannot be stored: {e}"),
        ),
    }
}

/// A report at a report address that cannot be read: kept as unparsed.
fn unreadable(what: &str, e: &mail_auth::report::Error) -> Decision {
    (
        "unparsed",
        State::Unparsed,
        format!("not {what} herald can read: {}", why(e)),
    )
}

/// What went wrong reading a report, for people.
fn why(e: &mail_auth::report::Error) -> String {
    match e {
        mail_auth::report::Error::ReportTooLarge => {
            "its report decompresses past bounces.max_size (not read further)".into()
        }
        other => format!("{other:?}"),
    }
}
