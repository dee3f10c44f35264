//! The rewrite stage between receipt and queue, on raw bytes.
//!
//! It reads and removes the `X-Herald-*` control headers, notes the
//! Subject and the author's domain, and adds a `Received:` trace header.
//! The body is never touched.

use std::time::Duration;

use crate::config::Config;
use crate::smtp_in::reception::Transaction;

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("{0}")]
    Header(String),
}

/// The message as it will be queued, with what the control headers said.
#[derive(Debug, Default)]
pub struct Prepared {
    pub message: Vec<u8>,
    pub tag: Option<String>,
    pub delay: Option<Duration>,
    /// `X-Herald-Track: no` turns the pixel off for this message.
    pub track: bool,
    pub subject: Option<String>,
    /// Domain of the original `From:` address, for routing.
    pub author_domain: Option<String>,
}

/// One header field: its name and the whole raw field, folds and CRLF
/// included.
pub struct Field<'a> {
    pub name: &'a str,
    pub raw: &'a [u8],
}

impl Field<'_> {
    /// The value unfolded and trimmed, lossily decoded.
    pub fn value(&self) -> String {
        let v = &self.raw[self.name.len() + 1..];
        let s = String::from_utf8_lossy(v);
        s.replace("\r\n", "").replace('\n', "").trim().to_string()
    }
}

/// Splits a message into header fields and the body (after the blank line).
pub fn split(msg: &[u8]) -> Result<(Vec<Field<'_>>, &[u8]), RewriteError> {
    let mut fields: Vec<Field> = Vec::new();
    let mut pos = 0;
    while pos < msg.len() {
        let end = msg[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i + 1)
            .unwrap_or(msg.len());
        let line = &msg[pos..end];
        if line == b"\r\n" || line == b"\n" {
            return Ok((fields, &msg[end..]));
        }
        if line[0] == b' ' || line[0] == b'\t' {
            match fields.last_mut() {
                Some(f) => {
                    let start = f.raw.as_ptr() as usize - msg.as_ptr() as usize;
                    f.raw = &msg[start..end];
                }
                None => {
                    return Err(RewriteError::Header(
                        "malformed header: continuation line before any field".into(),
                    ))
                }
            }
        } else {
            let colon = line.iter().position(|&b| b == b':');
            let name = colon
                .map(|c| &line[..c])
                .filter(|n| !n.is_empty() && n.iter().all(|&b| (33..=126).contains(&b)));
            match name {
                Some(n) => fields.push(Field {
                    // printable ASCII, so valid UTF-8
                    name: std::str::from_utf8(n).unwrap_or(""),
                    raw: line,
                }),
                None if fields.is_empty() => {
                    // No header at all: the whole message is body.
                    return Ok((Vec::new(), msg));
                }
                None => {
                    return Err(RewriteError::Header(format!(
                        "malformed header line: {:?}",
                        String::from_utf8_lossy(&line[..line.len().min(60)]).trim_end()
                    )))
                }
            }
        }
        pos = end;
    }
    Ok((fields, &msg[msg.len()..]))
}

fn received_header(cfg: &Config, t: &Transaction, id: &str) -> String {
    let with = match (t.tls, t.auth_user.is_some()) {
        (false, false) => "ESMTP",
        (true, false) => "ESMTPS",
        (false, true) => "ESMTPA",
        (true, true) => "ESMTPSA",
    };
    let for_clause = match t.rcpts.as_slice() {
        [one] => format!("\r\n\tfor <{one}>"),
        _ => String::new(),
    };
    format!(
        "Received: from {} ({})\r\n\tby {} (herald) with {} id {}{};\r\n\t{}\r\n",
        if t.helo.is_empty() {
            "unknown"
        } else {
            &t.helo
        },
        t.peer,
        cfg.hostname,
        with,
        id,
        for_clause,
        chrono::Utc::now().to_rfc2822()
    )
}

fn domain_of_mailbox(value: &str) -> Option<String> {
    let addr = match (value.rfind('<'), value.rfind('>')) {
        (Some(a), Some(b)) if a < b => &value[a + 1..b],
        _ => value,
    };
    addr.rsplit_once('@')
        .map(|(_, d)| {
            d.trim()
                .trim_end_matches(['>', ';', ','])
                .to_ascii_lowercase()
        })
        .filter(|d| !d.is_empty())
}

/// Prepares a received message for the queue.
pub fn prepare(
    cfg: &Config,
    t: &Transaction,
    id: &str,
    data: &[u8],
) -> Result<Prepared, RewriteError> {
    let (fields, body) = split(data)?;
    let mut p = Prepared {
        track: true,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(data.len() + 256);
    out.extend_from_slice(received_header(cfg, t, id).as_bytes());
    for f in &fields {
        let n = f.name.to_ascii_lowercase();
        match n.as_str() {
            "x-herald-tag" => {
                let v = f.value();
                if !v.is_empty() {
                    p.tag = Some(v);
                }
                continue;
            }
            "x-herald-delay" => {
                let v = f.value();
                p.delay = Some(humantime::parse_duration(&v).map_err(|_| {
                    RewriteError::Header(format!(
                        "X-Herald-Delay: {v:?} is not a duration such as \"10m\""
                    ))
                })?);
                continue;
            }
            "x-herald-track" => {
                p.track = !f.value().eq_ignore_ascii_case("no");
                continue;
            }
            "subject" if p.subject.is_none() => p.subject = Some(f.value()),
            "from" if p.author_domain.is_none() => p.author_domain = domain_of_mailbox(&f.value()),
            _ => {}
        }
        out.extend_from_slice(f.raw);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    p.message = out;
    Ok(p)
}
