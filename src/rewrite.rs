//! The rewrite stage between receipt and queue, on raw bytes.
//!
//! It makes platform mail deliverable: `From:` becomes an authorized sender
//! (keeping the display name, the original author moves to `Reply-To:`),
//! missing `Message-ID:`/`Date:` are added, `Bcc:` and `Return-Path:` are
//! dropped (and `Sender:` when From is rewritten), the
//! `X-Herald-*` control headers are read and removed, and a `Received:`
//! trace header goes on top. Header fields keep their order and bytes unless
//! they are rewritten; the body is never touched. DKIM signing comes after
//! (see `crate::dkim`).

use std::time::Duration;

use crate::config::Config;
use crate::state::envelope::Transaction;

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
    /// The original `From:` address, if there was one.
    pub author: Option<String>,
    /// The `From:` address the message leaves with (its domain picks the
    /// DKIM key).
    pub from: String,
    /// Name in `[upstreams]` (or "mx") the route chose.
    pub upstream: String,
    /// The envelope sender (MAIL FROM) to use outbound.
    pub mail_from: String,
    /// The `[[tenants]]` entry whose mail this is (None: the platform's).
    pub tenant: Option<String>,
}

/// A mailbox as read from a header: decoded display name and address.
#[derive(Debug, Clone, PartialEq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub addr: String,
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

/// Reads the first mailbox of an address header value with mail-parser
/// (RFC 2047 encoded words, quoted names, comments, groups, 8-bit UTF-8).
pub fn parse_mailbox(raw_value: &[u8]) -> Option<Mailbox> {
    parse_authors(raw_value).map(|a| a.mailboxes[0].clone())
}

/// The authors a `From:` names.
#[derive(Debug, Clone, PartialEq)]
pub struct Authors {
    /// Every mailbox with an address, in order (at least one).
    pub mailboxes: Vec<Mailbox>,
    /// The display name for the rewritten From: a group's name, else the
    /// first author's.
    pub name: Option<String>,
}

/// Reads every mailbox of an address header value (see [`parse_mailbox`]).
pub fn parse_authors(raw_value: &[u8]) -> Option<Authors> {
    let mut buf = Vec::with_capacity(raw_value.len() + 16);
    buf.extend_from_slice(b"From:");
    buf.extend_from_slice(raw_value);
    if !buf.ends_with(b"\n") {
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    let msg = mail_parser::MessageParser::default().parse(&buf)?;
    let (group, addrs): (Option<String>, Vec<&mail_parser::Addr>) = match msg.from()? {
        mail_parser::Address::List(list) => (None, list.iter().collect()),
        mail_parser::Address::Group(groups) => (
            groups
                .iter()
                .find_map(|g| g.name.as_deref().map(str::to_string)),
            groups.iter().flat_map(|g| g.addresses.iter()).collect(),
        ),
    };
    let mailboxes: Vec<Mailbox> = addrs
        .into_iter()
        .filter_map(|a| {
            let addr = a.address.as_deref()?.trim().to_string();
            if !addr.contains('@') {
                return None;
            }
            let name = a
                .name
                .as_deref()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty() && *n != addr);
            Some(Mailbox { name, addr })
        })
        .collect();
    let first = mailboxes.first()?;
    let name = group
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .or_else(|| first.name.clone());
    Some(Authors { mailboxes, name })
}

/// Encodes a display name for a header: a quoted string when it is ASCII,
/// else RFC 2047 `B` encoded words of at most 75 characters each.
pub fn encode_name(name: &str) -> String {
    if name.is_ascii() && !name.chars().any(|c| c.is_ascii_control()) {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        return format!("\"{escaped}\"");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in name.chars().filter(|c| !c.is_control()) {
        // 45 bytes of input -> 60 of base64 -> 72 with =?UTF-8?B?...?=
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| format!("=?UTF-8?B?{}?=", base64::Engine::encode(&b64, w.as_bytes())))
        .collect::<Vec<_>>()
        .join("\r\n ")
}

fn mailbox(name: Option<&str>, addr: &str) -> String {
    match name {
        Some(n) => format!("{} <{addr}>", encode_name(n)),
        None => addr.to_string(),
    }
}

fn mailbox_header(field: &str, name: Option<&str>, addr: &str) -> String {
    format!("{field}: {}\r\n", mailbox(name, addr))
}

fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}

/// Prepares a received message for the queue. `has_dkim_key` says whether a
/// `[[dkim]]` key covers a domain (mail for a domain we cannot sign keeps
/// failing DMARC unless From is rewritten).
pub fn prepare(
    cfg: &Config,
    has_dkim_key: &dyn Fn(&str) -> bool,
    t: &Transaction,
    id: &str,
    data: &[u8],
) -> Result<Prepared, RewriteError> {
    let (fields, body) = split(data)?;
    let mut p = Prepared {
        track: true,
        ..Default::default()
    };

    let from_fields: Vec<&Field> = fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("from"))
        .collect();
    if from_fields.len() > 1 {
        return Err(RewriteError::Header(format!(
            "message has {} From: header fields; RFC 5322 allows one",
            from_fields.len()
        )));
    }
    let authors = from_fields
        .first()
        .and_then(|f| parse_authors(&f.raw[f.name.len() + 1..]));
    let author = authors.as_ref().map(|a| a.mailboxes[0].clone());
    p.author = author.as_ref().map(|m| m.addr.clone());
    let has = |n: &str| fields.iter().any(|f| f.name.eq_ignore_ascii_case(n));

    // Route: by the author's domain (else the envelope sender's) and AUTH user.
    let route_domain = p
        .author
        .as_deref()
        .and_then(domain_of)
        .or(domain_of(&t.sender));
    let route = cfg.route_for(route_domain, t.auth_user.as_deref());
    p.upstream = route
        .map(|r| r.upstream.clone())
        .unwrap_or_else(|| cfg.delivery.upstream.clone());
    p.tenant = cfg
        .tenant_for(route_domain, t.auth_user.as_deref(), route)
        .map(str::to_string);
    let route_sender = route.and_then(|r| r.default_sender.clone());
    p.mail_from = match &route_sender {
        Some(rs) if !cfg.sender.bounce_explicit => rs.clone(),
        _ => cfg.sender.bounce_address.clone(),
    };
    let default_sender = route_sender.unwrap_or_else(|| cfg.sender.default_sender.clone());

    let rewrite_from = match &author {
        None => true,
        Some(a) => {
            cfg.sender.always_default_sender || !domain_of(&a.addr).is_some_and(has_dkim_key)
        }
    };
    let new_from = if rewrite_from {
        let name = authors.as_ref().and_then(|a| a.name.as_deref());
        p.from = default_sender.clone();
        Some(mailbox_header("From", name, &default_sender))
    } else {
        p.from = author.as_ref().map(|a| a.addr.clone()).unwrap_or_default();
        None
    };
    // Every author, so that a reply reaches all of them.
    let reply_to = match &authors {
        Some(a) if rewrite_from && cfg.sender.reply_to_original && !has("reply-to") => {
            let list: Vec<String> = a
                .mailboxes
                .iter()
                .map(|m| mailbox(m.name.as_deref(), &m.addr))
                .collect();
            Some(format!("Reply-To: {}\r\n", list.join(",\r\n ")))
        }
        _ => None,
    };

    let mut out = Vec::with_capacity(data.len() + 512);
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
            // herald writes its own (signed) reference with [bounces]; a
            // client's could make complaints count against other mail.
            "x-herald-ref" => continue,
            // The receiving server writes Return-Path from the envelope;
            // a client's would only mislead.
            "bcc" | "return-path" => continue,
            // With From rewritten, the platform's Sender would make
            // Outlook show "on behalf of".
            "sender" if new_from.is_some() => continue,
            "from" => {
                match &new_from {
                    Some(h) => out.extend_from_slice(h.as_bytes()),
                    None => out.extend_from_slice(f.raw),
                }
                if let Some(r) = &reply_to {
                    out.extend_from_slice(r.as_bytes());
                }
                continue;
            }
            "subject" if p.subject.is_none() => {
                let v = parse_text(f);
                p.subject = Some(v);
            }
            _ => {}
        }
        out.extend_from_slice(f.raw);
        if !f.raw.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    if from_fields.is_empty() {
        if let Some(h) = &new_from {
            out.extend_from_slice(h.as_bytes());
        }
    }
    if !has("date") {
        out.extend_from_slice(format!("Date: {}\r\n", chrono::Utc::now().to_rfc2822()).as_bytes());
    }
    if !has("message-id") {
        out.extend_from_slice(format!("Message-ID: <{id}@{}>\r\n", cfg.hostname).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    p.message = out;
    Ok(p)
}

/// An unstructured header (Subject) decoded for history: encoded words and
/// 8-bit UTF-8 become text.
fn parse_text(f: &Field) -> String {
    let mut buf = f.raw.to_vec();
    buf.extend_from_slice(b"\r\n");
    mail_parser::MessageParser::default()
        .parse(&buf)
        .and_then(|m| m.subject().map(str::to_string))
        .unwrap_or_else(|| f.value())
}
