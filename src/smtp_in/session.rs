//! One inbound SMTP session: a tokio loop around `mailin::Session`.
//!
//! mailin keeps the SMTP state machine; this loop owns the I/O and AUTH,
//! and closes mailin's gaps (STACK.md):
//! - command lines are capped ([`MAX_COMMAND_LINE`]) and must end in CRLF;
//!   a message line may be as long as the message size limit (platforms
//!   send HTML on one line; `crate::mime` makes it transportable);
//! - in DATA, a bare LF never ends a line for the purpose of the end-of-data
//!   marker, so `<LF>.<CR><LF>` is content, not the end (no SMTP smuggling:
//!   `super::data`);
//! - MAIL and RCPT are parsed here (null sender, a space after the colon,
//!   SIZE=, SMTPUTF8, quoted local parts), and mailin only sees a normalised
//!   command so that its state follows;
//! - the EHLO reply adds SIZE and PIPELINING; replies are buffered while the
//!   client has more commands in flight and written in one go (PIPELINING);
//! - the message is committed to disk in this loop when the final `.`
//!   arrives, and only then answered with 250.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailin::{Action, Handler, Response, SessionBuilder};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::auth::Auth;
use super::data::DataLines;
use super::line::{read_line, Line};
use super::reception;
use super::spool::Spool;
use crate::live::Live;
use crate::replies::{self, Reply};
use crate::state::envelope::Transaction;
use crate::state::Services;
use crate::tls::Stream;

/// RFC 5321 4.5.3.1.4 says 512 for a command line; AUTH PLAIN with long
/// credentials can exceed that, so we allow a little more.
pub const MAX_COMMAND_LINE: usize = 2048;
/// Syntax errors (500-504, 555) one session may make before it is closed.
pub const MAX_ERRORS: usize = 20;
/// RFC 5321 4.5.3.2.7 suggests 5 minutes for the server.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read its replies (say, one pipelining megabytes
/// of NOOP) must not hold its slot: a write that cannot finish in this time
/// ends the session.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes `out` with [`WRITE_TIMEOUT`]; false when the session must end.
async fn send<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, out: &[u8]) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, w.write_all(out)).await,
        Ok(Ok(()))
    )
}

/// State the mailin `Handler` shares with the loop: the message being
/// received.
struct Shared {
    data: Spool,
    oversize: bool,
    /// Writing a large message to its file failed (disk full).
    spool_error: Option<String>,
    max_size: usize,
}

struct InHandler {
    shared: Arc<Mutex<Shared>>,
}

impl Handler for InHandler {
    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        _to: &[String],
    ) -> Response {
        let mut sh = self.shared.lock().unwrap();
        sh.data.clear();
        sh.oversize = false;
        sh.spool_error = None;
        mailin::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let mut sh = self.shared.lock().unwrap();
        if sh.oversize || sh.spool_error.is_some() {
            return Ok(());
        }
        if sh.data.len() + buf.len() > sh.max_size {
            // Keep reading to the end of DATA, but stop holding the bytes.
            sh.oversize = true;
            sh.data.clear();
        } else if let Err(e) = sh.data.push(buf) {
            sh.spool_error = Some(e.to_string());
            sh.data.clear();
        }
        Ok(())
    }
}

fn say(out: &mut Vec<u8>, r: &Reply) {
    r.write_to(out);
}

fn write_response(out: &mut Vec<u8>, r: &Response) {
    let _ = r.write_to(out);
}

/// What a MAIL FROM or RCPT TO line says, parsed leniently.
#[derive(Debug, PartialEq)]
pub struct PathArg {
    pub addr: String,
    pub params: Vec<(String, Option<String>)>,
}

/// Parses the argument of `MAIL FROM:` / `RCPT TO:` (after the colon):
/// optional spaces, `<path>` (or a bare path), then ESMTP parameters.
pub fn parse_path(arg: &str) -> Result<PathArg, &'static str> {
    let arg = arg.trim_start();
    let (addr, rest) = if let Some(stripped) = arg.strip_prefix('<') {
        // A quoted local part may contain '>'; find the closing bracket
        // outside quotes.
        let mut in_quote = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in stripped.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if in_quote => escaped = true,
                '"' => in_quote = !in_quote,
                '>' if !in_quote => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or("missing '>'")?;
        (&stripped[..end], &stripped[end + 1..])
    } else {
        match arg.find(' ') {
            Some(i) => (&arg[..i], &arg[i..]),
            None => (arg, ""),
        }
    };
    // Source routes (<@a,@b:user@c>) are obsolete; keep the mailbox.
    let addr = match addr.strip_prefix('@') {
        Some(r) => r
            .split_once(':')
            .map(|(_, m)| m)
            .ok_or("bad source route")?,
        None => addr,
    };
    if addr.chars().any(|c| c.is_control()) || addr.len() > 320 {
        return Err("bad address");
    }
    if !rest.is_empty() && !rest.starts_with(' ') {
        return Err("junk after address");
    }
    let mut params = Vec::new();
    for p in rest.split_ascii_whitespace() {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (p, None),
        };
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("bad parameter");
        }
        params.push((k.to_ascii_uppercase(), v));
    }
    Ok(PathArg {
        addr: addr.to_string(),
        params,
    })
}

/// A recipient must be a mailbox of RFC 5321 4.1.2 (with RFC 6531's
/// UTF-8): a dot-atom or quoted local part, then a domain of two labels
/// or more, or an address literal that parses. herald checks addresses and
/// never alters them, so what it cannot relay as given is refused here
/// rather than bounced (and suppressed) by the upstream.
pub fn valid_recipient(addr: &str) -> bool {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    valid_local_part(local) && valid_domain(domain)
}

fn valid_local_part(local: &str) -> bool {
    if let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        // qtext and quoted pairs: printable, a '"' or '\' only escaped.
        let mut escaped = false;
        for c in inner.chars() {
            if c.is_control() {
                return false;
            }
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => return false,
                _ => {}
            }
        }
        return !escaped && local.len() >= 2;
    }
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    !local.is_empty()
        && local.len() <= 64
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

fn valid_domain(domain: &str) -> bool {
    if let Some(lit) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return match lit.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
    }
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2
        && domain.len() <= 255
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

/// Runs one connection to its end. `implicit_tls` is set for `smtps`.
///
/// This is the I/O loop: it owns the reader, the timeouts, PIPELINING's
/// batched writes and the STARTTLS stream swap; each command is handled
/// by the [`SmtpSession`] method named after its verb.
/// `intake`: the `[bounces] listen` listener (reports to return-path
/// tokens and the complaint address only) rather than the platform's.
pub async fn run(
    services: Arc<Services>,
    tcp: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    intake: bool,
) {
    let _ = tcp.set_nodelay(true);
    let stream = if implicit_tls {
        let Some(acceptor) = services.live().tls.clone() else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Stream::ServerTls(Box::new(s)),
            Ok(Err(e)) => {
                handshake_failed(peer, &e, "TLS");
                return;
            }
            Err(_) => return,
        }
    } else {
        Stream::Plain(tcp)
    };

    let mut s = SmtpSession::new(services.clone(), peer, implicit_tls, intake);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(1024);
    let mut shutdown = services.shutdown.clone();
    say(&mut s.out, &replies::greeting(&s.live.cfg.hostname));

    loop {
        if s.too_many_errors() {
            break;
        }
        // PIPELINING: answer in one write once the client's batch is read.
        if !s.out.is_empty() && reader.buffer().is_empty() {
            if !send(reader.get_mut(), &s.out).await {
                return;
            }
            s.out.clear();
            s.counted = 0;
        }
        if line.capacity() > 1 << 20 {
            // Do not keep a one-line message's buffer for the whole session.
            line = Vec::with_capacity(1024);
        }
        let max = if s.in_data {
            // A longer line makes the message too big anyway.
            s.max_size().saturating_add(3)
        } else {
            MAX_COMMAND_LINE
        };
        let wait = s.deadline.min(tokio::time::Instant::now() + IDLE_TIMEOUT);
        let read = tokio::select! {
            r = tokio::time::timeout_at(wait, read_line(&mut reader, &mut line, max)) => r,
            _ = shutdown.wait(), if !s.in_data => {
                say(&mut s.out, &replies::shutting_down(&s.live.cfg.hostname));
                break;
            }
        };
        let status = match read {
            Err(_) if tokio::time::Instant::now() >= s.deadline => {
                let cfg = &s.live.cfg;
                let r = replies::idle_too_long(&cfg.hostname, cfg.listen.session_timeout);
                say(&mut s.out, &r);
                break;
            }
            Err(_) => {
                say(&mut s.out, &replies::timeout(&s.live.cfg.hostname));
                break;
            }
            Ok(Err(_)) => return,
            Ok(Ok(Line::Eof)) => return,
            Ok(Ok(st)) => st,
        };

        let next = if s.in_data {
            s.data_line(&mut line, status).await
        } else {
            s.tls = reader.get_ref().is_tls();
            s.command(&line, status)
        };
        match next {
            Next::Continue => {}
            Next::Close => break,
            Next::UpgradeTls => {
                if !send(reader.get_mut(), &s.out).await {
                    return;
                }
                s.out.clear();
                s.counted = 0;
                // Bytes pipelined after STARTTLS were sent in clear text
                // and must not be read as if they came over TLS.
                let stream = reader.into_inner();
                let (Stream::Plain(tcp), Some(acceptor)) = (stream, s.live.tls.clone()) else {
                    return;
                };
                let tls = match tokio::time::timeout(Duration::from_secs(30), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        handshake_failed(peer, &e, "STARTTLS");
                        return;
                    }
                    Err(_) => return,
                };
                reader = BufReader::new(Stream::ServerTls(Box::new(tls)));
                s.tls_started();
            }
        }
    }
    if send(reader.get_mut(), &s.out).await {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, reader.get_mut().shutdown()).await;
    }
}

/// What the I/O loop does after a command or a DATA line.
#[derive(Debug, PartialEq)]
enum Next {
    /// Read the next line.
    Continue,
    /// Write what is pending and close the connection.
    Close,
    /// Write what is pending, then swap the stream for TLS (STARTTLS).
    UpgradeTls,
}

/// One command line, as the command methods see it.
struct Command<'a> {
    /// The raw line, CRLF included (what mailin is given).
    line: &'a [u8],
    /// The line without its CRLF, non-UTF-8 bytes replaced.
    text: &'a str,
    /// The verb, in upper case.
    verb: &'a str,
    /// The line is valid UTF-8: an address is relayed as given, and bytes
    /// that are not UTF-8 would go out as U+FFFD, another address.
    utf8: bool,
}

/// The state of one connection apart from its stream: mailin's state
/// machine, the client's EHLO name, AUTH, the transaction, the pending
/// replies and the counters and limits. One method per SMTP command.
struct SmtpSession {
    services: Arc<Services>,
    /// The configuration this session works with: taken again between
    /// transactions, so a reload applies from the next one and never in
    /// the middle of one.
    live: Arc<Live>,
    peer: SocketAddr,
    ip: IpAddr,
    /// The client is in `listen.allowed_networks`.
    allowed: bool,
    /// The stream is TLS (set by the I/O loop before each command).
    tls: bool,
    session: mailin::Session<InHandler>,
    shared: Arc<Mutex<Shared>>,
    /// Replies not yet written (PIPELINING).
    out: Vec<u8>,
    helo: String,
    txn: Option<Transaction>,
    in_data: bool,
    data_lines: DataLines,
    auth: Auth,
    refusals: reception::Refusals,
    /// Syntax errors so far, and how much of `out` has been counted.
    errors: usize,
    counted: usize,
    /// A session that never completes a transaction (a line every few
    /// minutes, for ever) would hold its slot: it has session_timeout.
    deadline: tokio::time::Instant,
    /// The `[bounces]` intake: reports, not mail to relay.
    intake: bool,
    /// What the report of the transaction goes to (intake only).
    report_target: Option<crate::bounces::Target>,
}

impl SmtpSession {
    fn new(
        services: Arc<Services>,
        peer: SocketAddr,
        implicit_tls: bool,
        intake: bool,
    ) -> SmtpSession {
        let live = services.live();
        let cfg = &live.cfg;
        let max_size = match (&cfg.bounces, intake) {
            (Some(b), true) => b.max_size,
            _ => cfg.listen.max_message_size,
        };
        let ip = crate::limit::canonical_ip(peer.ip());
        let allowed = cfg.listen.allowed_networks.iter().any(|n| n.contains(&ip));
        let mut builder = SessionBuilder::new(cfg.hostname.clone());
        if live.tls.is_some() && !implicit_tls {
            builder.enable_start_tls();
        }
        let shared = Arc::new(Mutex::new(Shared {
            data: Spool::new(&cfg.storage.path.join("incoming")),
            oversize: false,
            spool_error: None,
            max_size,
        }));
        let handler = InHandler {
            shared: shared.clone(),
        };
        let mut session = builder.build(ip, handler);
        if implicit_tls {
            session.tls_active();
        }
        let deadline = tokio::time::Instant::now() + cfg.listen.session_timeout;
        SmtpSession {
            services,
            live: live.clone(),
            peer,
            ip,
            allowed,
            tls: implicit_tls,
            session,
            shared,
            out: Vec::with_capacity(512),
            helo: String::new(),
            txn: None,
            in_data: false,
            data_lines: DataLines::new(),
            auth: Auth::default(),
            refusals: reception::Refusals::default(),
            errors: 0,
            counted: 0,
            deadline,
            intake,
            report_target: None,
        }
    }

    /// A client that only makes errors (junk, unknown commands) would
    /// hold a connection slot for ever: after MAX_ERRORS, 421 and true.
    fn too_many_errors(&mut self) -> bool {
        self.errors += count_errors(&self.out[self.counted.min(self.out.len())..]);
        self.counted = self.out.len();
        if self.errors >= MAX_ERRORS {
            say(
                &mut self.out,
                &replies::too_many_errors(&self.live.cfg.hostname),
            );
            return true;
        }
        false
    }

    /// Between transactions: the configuration in force now (a reload may
    /// have changed users, limits, networks or keys).
    fn refresh(&mut self) {
        let live = self.services.live();
        if !Arc::ptr_eq(&live, &self.live) {
            self.allowed = live
                .cfg
                .listen
                .allowed_networks
                .iter()
                .any(|n| n.contains(&self.ip));
            self.live = live;
            self.shared.lock().unwrap().max_size = self.max_size();
        }
    }

    /// `listen.max_message_size`, or `bounces.max_size` at the intake.
    fn max_size(&self) -> usize {
        match (&self.live.cfg.bounces, self.intake) {
            (Some(b), true) => b.max_size,
            _ => self.live.cfg.listen.max_message_size,
        }
    }

    /// Credentials never cross a network in clear text.
    fn can_auth(&self) -> bool {
        !self.intake
            && !self.live.cfg.listen.users.is_empty()
            && (self.tls || self.ip.is_loopback())
    }

    /// The I/O loop has swapped the stream for TLS: start afresh.
    fn tls_started(&mut self) {
        self.tls = true;
        self.session.tls_active();
        self.helo.clear();
        self.txn = None;
        self.report_target = None;
        self.auth = Auth::default();
    }

    /// One line of a message in DATA; at the final `.`, the message is
    /// committed to disk and only then answered.
    async fn data_line(&mut self, line: &mut Vec<u8>, status: Line) -> Next {
        if let Line::TooLong { crlf } = status {
            let mut sh = self.shared.lock().unwrap();
            sh.oversize = true;
            sh.data.clear();
            self.data_lines.skipped(crlf);
            return Next::Continue;
        }
        let is_end = self.data_lines.feed(line);
        let r = self.session.process(line);
        if !is_end {
            if r.action != Action::NoReply {
                write_response(&mut self.out, &r);
            }
            return Next::Continue;
        }
        self.end_of_data().await
    }

    /// The final `.` of DATA.
    async fn end_of_data(&mut self) -> Next {
        let services = self.services.clone();
        let live = self.live.clone();
        let cfg = &live.cfg;
        self.in_data = false;
        let (data, oversize, spool_error) = {
            let mut sh = self.shared.lock().unwrap();
            let dir = cfg.storage.path.join("incoming");
            (
                std::mem::replace(&mut sh.data, Spool::new(&dir)),
                sh.oversize,
                sh.spool_error.take(),
            )
        };
        let Some(t) = self.txn.take() else {
            say(&mut self.out, &replies::BAD_SEQUENCE);
            return Next::Continue;
        };
        let rcpts = t.rcpts.clone();
        let ip = self.ip;
        let answer = if let Some(e) = spool_error {
            tracing::error!(peer = %ip, error = %e, "cannot spool the message being received");
            replies::STORAGE_ERROR
        } else if oversize {
            replies::too_big(self.max_size())
        } else if self.intake {
            let target = self.report_target.take();
            crate::bounces::intake::accept(&services, t, target, data).await
        } else {
            // Anything the client pipelined after the dot waits; the
            // reply goes out only after the commit.
            reception::accept(&services, &live, t, data).await
        };
        if answer.code >= 400 && !self.intake {
            self.refusals.record(&services, ip, &rcpts, &answer);
        } else if answer.code < 400 {
            self.deadline = tokio::time::Instant::now() + cfg.listen.session_timeout;
        }
        say(&mut self.out, &answer);
        Next::Continue
    }

    /// One command line: checks its framing, feeds an AUTH exchange in
    /// progress, else calls the method of its verb.
    fn command(&mut self, line: &[u8], status: Line) -> Next {
        if matches!(status, Line::TooLong { .. }) {
            self.auth.abort();
            say(&mut self.out, &replies::line_too_long(MAX_COMMAND_LINE));
            return Next::Continue;
        }
        if !line.ends_with(b"\r\n") {
            self.auth.abort();
            say(&mut self.out, &replies::NOT_CRLF);
            return Next::Continue;
        }
        if self.txn.is_none() {
            self.refresh();
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        let utf8 = std::str::from_utf8(line).is_ok();
        let verb = text
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        if self.auth.in_progress() {
            return self.auth_answer(text.trim());
        }
        let cmd = Command {
            line,
            text: &text,
            verb: &verb,
            utf8,
        };
        match verb.as_str() {
            "EHLO" | "HELO" => self.ehlo(&cmd),
            "MAIL" => self.mail(&cmd),
            "RCPT" => self.rcpt(&cmd),
            "DATA" => self.data(&cmd),
            "RSET" => self.rset(),
            "BDAT" => self.bdat(),
            "STARTTLS" => self.starttls(&cmd),
            "AUTH" => self.auth(&cmd),
            "QUIT" => self.quit(),
            "NOOP" => self.noop(),
            "VRFY" => self.vrfy(),
            "HELP" => self.help(),
            _ => self.unknown(),
        }
    }

    /// EHLO and HELO.
    fn ehlo(&mut self, cmd: &Command) -> Next {
        let live = self.live.clone();
        let cfg = &live.cfg;
        let r = self.session.process(cmd.line);
        if r.code == 250 {
            // It goes into the Received: header: no control
            // characters (a CR or LF there would forge fields).
            self.helo = cmd.text[4..]
                .trim()
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .take(255)
                .collect();
            self.txn = None;
            self.report_target = None;
            if cmd.verb == "EHLO" {
                let mut exts = vec![
                    "PIPELINING".to_string(),
                    format!("SIZE {}", self.max_size()),
                    "SMTPUTF8".to_string(),
                ];
                // Keep what mailin advertises (8BITMIME, STARTTLS).
                let buf = r.buffer().unwrap_or_default();
                for l in String::from_utf8_lossy(&buf).lines().skip(1) {
                    exts.push(l.get(4..).unwrap_or("").to_string());
                }
                if self.can_auth() {
                    exts.push("AUTH PLAIN LOGIN".into());
                }
                self.out
                    .extend_from_slice(format!("250-{}\r\n", cfg.hostname).as_bytes());
                for (i, e) in exts.iter().enumerate() {
                    let sep = if i + 1 == exts.len() { ' ' } else { '-' };
                    self.out
                        .extend_from_slice(format!("250{sep}{e}\r\n").as_bytes());
                }
            } else {
                say(&mut self.out, &replies::ehlo_name(&cfg.hostname));
            }
        } else {
            write_response(&mut self.out, &r);
        }
        Next::Continue
    }

    /// MAIL FROM: parsed here (null sender, SIZE=, BODY=, SMTPUTF8);
    /// mailin only sees a normalised command.
    fn mail(&mut self, cmd: &Command) -> Next {
        let max_size = self.max_size();
        let Some(arg) = strip_prefix_ci(cmd.text, "MAIL FROM:") else {
            say(&mut self.out, &replies::MAIL_SYNTAX);
            return Next::Continue;
        };
        if self.helo.is_empty() {
            say(&mut self.out, &replies::EHLO_FIRST);
            return Next::Continue;
        }
        if self.txn.is_some() {
            say(&mut self.out, &replies::NESTED_MAIL);
            return Next::Continue;
        }
        let p = match parse_path(arg) {
            Ok(_) if !cmd.utf8 => {
                say(&mut self.out, &replies::SENDER_NOT_UTF8);
                return Next::Continue;
            }
            Ok(p) => p,
            Err(why) => {
                say(&mut self.out, &replies::sender_syntax(why));
                return Next::Continue;
            }
        };
        if !p.addr.is_empty() && !p.addr.contains('@') {
            say(&mut self.out, &replies::SENDER_SYNTAX);
            return Next::Continue;
        }
        let mut body8 = false;
        let mut smtputf8 = false;
        let mut bad_param = None;
        for (k, v) in &p.params {
            match (k.as_str(), v.as_deref()) {
                ("SIZE", Some(n)) => match n.parse::<u64>() {
                    Ok(n) if n > max_size as u64 => {
                        bad_param = Some(replies::size_exceeds(max_size));
                    }
                    Ok(_) => {}
                    Err(_) => bad_param = Some(replies::BAD_SIZE),
                },
                ("BODY", Some(b)) if b.eq_ignore_ascii_case("8BITMIME") => body8 = true,
                ("BODY", Some(b)) if b.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) => smtputf8 = true,
                ("AUTH", Some(_)) => {}
                _ => {
                    bad_param = Some(replies::unsupported_parameter(k));
                }
            }
        }
        if let Some(r) = bad_param {
            say(&mut self.out, &r);
            return Next::Continue;
        }
        // A report is a transaction: each client starts only so many.
        if let Some(b) = self.services.bounces.as_ref().filter(|_| self.intake) {
            if let Err(r) = b.admit(self.ip) {
                tracing::debug!(peer = %self.ip, "report refused: {r}");
                say(&mut self.out, &r);
                return Next::Continue;
            }
        }
        // mailin only needs to move to its MAIL state.
        let norm: &[u8] = if body8 {
            b"MAIL FROM:<sender@herald.invalid> BODY=8BITMIME\r\n"
        } else {
            b"MAIL FROM:<sender@herald.invalid>\r\n"
        };
        let r = self.session.process(norm);
        if r.code == 250 {
            self.refusals.new_transaction();
            self.txn = Some(Transaction {
                peer: self.ip,
                helo: self.helo.clone(),
                tls: self.tls,
                auth_user: self.auth.user.clone(),
                sender: p.addr,
                rcpts: Vec::new(),
                smtputf8,
                body_8bit: body8,
            });
            say(&mut self.out, &replies::SENDER_OK);
        } else {
            write_response(&mut self.out, &r);
        }
        Next::Continue
    }

    /// RCPT TO: the address is checked, relaying and the recipient limit
    /// are enforced (and refusals recorded), duplicates are merged.
    fn rcpt(&mut self, cmd: &Command) -> Next {
        let services = self.services.clone();
        let live = self.live.clone();
        let cfg = &live.cfg;
        let ip = self.ip;
        let authed = self.auth.user.is_some();
        let Some(arg) = strip_prefix_ci(cmd.text, "RCPT TO:") else {
            say(&mut self.out, &replies::RCPT_SYNTAX);
            return Next::Continue;
        };
        let Some(t) = self.txn.as_mut() else {
            say(&mut self.out, &replies::NEED_MAIL);
            return Next::Continue;
        };
        let p = match parse_path(arg) {
            Ok(_) if !cmd.utf8 => {
                say(&mut self.out, &replies::RCPT_NOT_UTF8);
                return Next::Continue;
            }
            Ok(p) if valid_recipient(&p.addr) => p,
            Ok(_) => {
                say(&mut self.out, &replies::RCPT_SYNTAX_BAD);
                return Next::Continue;
            }
            Err(why) => {
                say(&mut self.out, &replies::rcpt_syntax(why));
                return Next::Continue;
            }
        };
        if let Some((k, _)) = p.params.first() {
            say(&mut self.out, &replies::unsupported_parameter(k));
            return Next::Continue;
        }
        if self.intake {
            return self.report_rcpt(p.addr);
        }
        // Relaying is refused here, where the address is known,
        // so that the refusal goes on record for it.
        let refused = if !self.allowed && !authed {
            Some(if !cfg.listen.users.is_empty() {
                replies::AUTH_REQUIRED
            } else {
                replies::relaying_denied(ip)
            })
        } else if t.rcpts.len() >= cfg.listen.max_recipients {
            Some(replies::too_many_recipients(cfg.listen.max_recipients))
        } else {
            None
        };
        if let Some(r) = refused {
            self.refusals
                .record(&services, ip, std::slice::from_ref(&p.addr), &r);
            say(&mut self.out, &r);
            return Next::Continue;
        }
        let r = self.session.process(b"RCPT TO:<rcpt@herald.invalid>\r\n");
        if r.code == 250 {
            if !t.rcpts.iter().any(|x| same_mailbox(x, &p.addr)) {
                t.rcpts.push(p.addr);
            }
            say(&mut self.out, &replies::RECIPIENT_OK);
        } else {
            write_response(&mut self.out, &r);
        }
        Next::Continue
    }

    /// RCPT TO at the `[bounces]` intake: a genuine return-path token or
    /// the complaint address, one per transaction (a report is about one
    /// recipient); anything else is refused, never relayed.
    fn report_rcpt(&mut self, addr: String) -> Next {
        let Some(b) = self.services.bounces.clone() else {
            say(&mut self.out, &replies::NOT_ACCEPTING_REPORTS);
            return Next::Continue;
        };
        if self.report_target.is_some() {
            say(&mut self.out, &replies::ONE_RECIPIENT_PER_REPORT);
            return Next::Continue;
        }
        match b.check_rcpt(&addr) {
            // Anyone can write to the complaint address: while its share
            // of the storage is full, nothing more is taken (the sender
            // learns it before sending the text).
            Ok(t) if t.is_open() && !b.complaint_room(0) => {
                let r = crate::bounces::intake::full(&b, self.ip, "the complaint address's half");
                say(&mut self.out, &r);
            }
            Ok(target) => {
                let r = self.session.process(b"RCPT TO:<rcpt@herald.invalid>\r\n");
                if r.code == 250 {
                    if let Some(t) = self.txn.as_mut() {
                        t.rcpts.push(addr);
                    }
                    self.report_target = Some(target);
                    say(&mut self.out, &replies::RECIPIENT_OK);
                } else {
                    write_response(&mut self.out, &r);
                }
            }
            Err(r) => {
                tracing::debug!(peer = %self.ip, rcpt = %addr, "report refused: {r}");
                say(&mut self.out, &r);
            }
        }
        Next::Continue
    }

    /// DATA: the lines that follow go to [`SmtpSession::data_line`].
    fn data(&mut self, cmd: &Command) -> Next {
        if self.txn.as_ref().is_none_or(|t| t.rcpts.is_empty()) {
            say(&mut self.out, &replies::NEED_RCPT);
            return Next::Continue;
        }
        let r = self.session.process(cmd.line);
        if r.code == 354 {
            self.in_data = true;
            self.data_lines = DataLines::new();
            say(&mut self.out, &replies::START_DATA);
        } else {
            write_response(&mut self.out, &r);
        }
        Next::Continue
    }

    fn rset(&mut self) -> Next {
        self.txn = None;
        self.report_target = None;
        let r = self.session.process(b"RSET\r\n");
        write_response(&mut self.out, &r);
        Next::Continue
    }

    fn bdat(&mut self) -> Next {
        say(&mut self.out, &replies::NO_BDAT);
        Next::Continue
    }

    /// STARTTLS: the I/O loop writes the 220 and swaps the stream, then
    /// calls [`SmtpSession::tls_started`].
    fn starttls(&mut self, cmd: &Command) -> Next {
        let r = self.session.process(cmd.line);
        write_response(&mut self.out, &r);
        if r.action != Action::UpgradeTls {
            return Next::Continue;
        }
        Next::UpgradeTls
    }

    /// AUTH PLAIN / LOGIN, with or without an initial response.
    fn auth(&mut self, cmd: &Command) -> Next {
        if self.intake {
            say(&mut self.out, &replies::AUTH_NOT_FOR_REPORTS);
            return Next::Continue;
        }
        if self.live.cfg.listen.users.is_empty() {
            say(&mut self.out, &replies::AUTH_NO_USERS);
            return Next::Continue;
        }
        if !self.can_auth() {
            say(&mut self.out, &replies::AUTH_NEEDS_TLS);
            return Next::Continue;
        }
        if self.auth.user.is_some() {
            say(&mut self.out, &replies::AUTH_ALREADY);
            return Next::Continue;
        }
        if self.txn.is_some() {
            say(&mut self.out, &replies::AUTH_IN_TRANSACTION);
            return Next::Continue;
        }
        let mut words = cmd.text.split_ascii_whitespace().skip(1);
        let mech = words.next().unwrap_or("");
        if self
            .auth
            .start(&self.live.cfg, self.peer, mech, words.next(), &mut self.out)
        {
            return Next::Close;
        }
        Next::Continue
    }

    /// The client's answer to a 334 challenge of AUTH.
    fn auth_answer(&mut self, answer: &str) -> Next {
        if self
            .auth
            .answer(&self.live.cfg, self.peer, answer, &mut self.out)
        {
            return Next::Close;
        }
        Next::Continue
    }

    fn quit(&mut self) -> Next {
        say(&mut self.out, &replies::BYE);
        Next::Close
    }

    fn noop(&mut self) -> Next {
        say(&mut self.out, &replies::OK);
        Next::Continue
    }

    fn vrfy(&mut self) -> Next {
        say(&mut self.out, &replies::CANNOT_VRFY);
        Next::Continue
    }

    fn help(&mut self) -> Next {
        say(&mut self.out, &replies::HELP);
        Next::Continue
    }

    fn unknown(&mut self) -> Next {
        say(&mut self.out, &replies::NOT_RECOGNIZED);
        Next::Continue
    }
}

/// Logs a failed inbound handshake; when the client refused our
/// certificate, says what to do, since such a client sends nothing at all.
fn handshake_failed(peer: SocketAddr, e: &std::io::Error, what: &str) {
    let text = e.to_string();
    let refused_cert = [
        "UnknownCA",
        "BadCertificate",
        "CertificateUnknown",
        "UnsupportedCertificate",
    ]
    .iter()
    .any(|a| text.contains(a));
    // nodemailer (Node's TLS) closes without an alert when it does not
    // trust the certificate: an EOF in the handshake says as much.
    let closed = text.to_ascii_lowercase().contains("eof");
    if refused_cert {
        tracing::warn!(
            %peer,
            error = %text,
            hint = "the client does not trust the [listen] tls certificate (self-signed or from a private CA?); PHPMailer and nodemailer check it by default and then send nothing: use a certificate from a CA the client trusts, or make the client trust this one",
            "{what} handshake failed"
        );
    } else if closed {
        tracing::warn!(
            %peer,
            error = %text,
            hint = "the client closed the connection in the middle of the TLS handshake; nodemailer does so when it does not trust the [listen] tls certificate (self-signed or from a private CA?): use a certificate from a CA the client trusts, or set the client's tls.ca to this one",
            "{what} handshake failed"
        );
    } else {
        tracing::info!(%peer, error = %text, "{what} handshake failed");
    }
}

/// The syntax-error replies (500-504, 555) among the reply lines in `out`.
fn count_errors(out: &[u8]) -> usize {
    out.split(|&b| b == b'\n')
        .filter(|l| {
            l.get(3) == Some(&b' ')
                && matches!(&l[..3], b"500" | b"501" | b"502" | b"503" | b"504" | b"555")
        })
        .count()
}

/// Two addresses name the same mailbox: the local part is compared
/// exactly (RFC 5321 2.4: only its server may fold case), the domain
/// without case.
fn same_mailbox(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_leniently() {
        assert_eq!(parse_path("<>").unwrap().addr, "");
        assert_eq!(parse_path(" <a@b.c>").unwrap().addr, "a@b.c");
        let p = parse_path("<a@b.c> SIZE=100 BODY=8BITMIME").unwrap();
        assert_eq!(p.params[0], ("SIZE".into(), Some("100".into())));
        assert_eq!(parse_path("a@b.c").unwrap().addr, "a@b.c");
        assert_eq!(parse_path("<\"x y>\"@b.c>").unwrap().addr, "\"x y>\"@b.c");
        assert_eq!(parse_path("<@r1,@r2:u@d.e>").unwrap().addr, "u@d.e");
        assert!(parse_path("<a@b.c").is_err());
        assert!(parse_path("<a@b.c>junk").is_err());
    }

    #[test]
    fn recipients_need_a_domain() {
        assert!(valid_recipient("a@b.c"));
        assert!(valid_recipient("\"a b\"@b.c"));
        assert!(valid_recipient("first.last+tag@sub.example-1.org"));
        assert!(valid_recipient("louise@[192.0.2.1]"));
        assert!(valid_recipient("louise@[IPv6:2001:db8::1]"));
        assert!(valid_recipient("josé@exemple.fr"));
        assert!(!valid_recipient("postmaster"));
        assert!(!valid_recipient("a@"));
        assert!(!valid_recipient("a b@c.d"));
        for bad in [
            "a@b@c.d",
            "a@b..c",
            "a,b@c.d",
            "a@[not-an-ip]",
            ".a@b.c",
            "a.@b.c",
            "a..b@c.d",
            "a@-b.c",
            "\"a\"b\"@c.d",
        ] {
            assert!(!valid_recipient(bad), "{bad}");
        }
    }

    #[test]
    fn duplicates_are_the_same_local_part_and_domain_in_any_case() {
        assert!(same_mailbox("Louise@Example.org", "Louise@example.ORG"));
        assert!(!same_mailbox("Louise@example.org", "louise@example.org"));
    }
}
