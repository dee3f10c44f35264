//! Outbound SMTP: connect to a relay or MX, secure it, authenticate, and run
//! one transaction with a reply per recipient.
//!
//! mail-send supplies the reply parser, EHLO parsing and SASL; this module
//! decides what each reply means for each recipient and for the route.

use std::sync::Arc;
use std::time::Duration;

use mail_send::SmtpClient;
use smtp_proto::{EhloResponse, Response, EXT_START_TLS};
use tokio::io::BufWriter;
use tokio::net::TcpStream;

use crate::config::{Secret, Security};
use crate::reply::{classify, Class, Effect, Stage};
use crate::tls::Stream;

pub type Client = SmtpClient<BufWriter<Stream>>;

/// An open session and what its server offered.
pub struct Conn {
    pub client: Client,
    /// The server advertised SIZE: we may send `SIZE=` with MAIL FROM.
    pub size: bool,
    /// The server advertised PIPELINING: MAIL and the RCPTs go in one write.
    pub pipelining: bool,
    /// Transactions run on this session.
    pub sent: u32,
    /// The server advertised SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// The server advertised 8BITMIME.
    pub eightbitmime: bool,
}

/// What the message asks of MAIL FROM beyond the address.
#[derive(Debug, Clone, Copy, Default)]
pub struct MailParams {
    pub smtputf8: bool,
    pub body_8bit: bool,
}

/// An address that only an SMTPUTF8 server may be given (RFC 6531).
pub fn needs_smtputf8(addr: &str) -> bool {
    !addr.is_ascii()
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// RFC 5321 4.5.3.2: 5 minutes for the greeting and most replies.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// RFC 5321 4.5.3.2.6: 10 minutes for the reply to the end of DATA; giving
/// up sooner risks a duplicate of mail the server did accept.
const DATA_END_TIMEOUT: Duration = Duration::from_secs(600);

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    /// Name for logs and history ("provider", or the MX host).
    pub host: String,
    /// Address to connect to when already resolved (MX); else `host`.
    pub connect_to: Option<std::net::IpAddr>,
    pub port: u16,
    pub security: Security,
    /// For MX delivery: STARTTLS when offered, never required.
    pub opportunistic: bool,
    pub tls: Arc<rustls::ClientConfig>,
    pub credentials: Option<(String, Secret)>,
    pub helo: String,
    /// A configured upstream (its refusals before RCPT are about herald's
    /// route), not a recipient's MX.
    pub smart_host: bool,
}

/// Why a connection could not be used, classified like any reply.
#[derive(Debug, Clone)]
pub struct ConnError {
    pub text: String,
    pub class: Class,
    /// The reply code, or 0 for network and TLS failures.
    pub code: u16,
    /// No session at all: the connection was refused or timed out.
    pub unreachable: bool,
}

impl ConnError {
    /// Try again later (network error, timeout).
    pub fn temporary(text: impl Into<String>) -> ConnError {
        ConnError {
            text: text.into(),
            class: Class::Transient,
            code: 0,
            unreachable: false,
        }
    }

    /// The server could not be reached (refused, timed out).
    pub fn unreachable(text: impl Into<String>) -> ConnError {
        ConnError {
            unreachable: true,
            ..ConnError::temporary(text)
        }
    }

    /// The route itself is refused (TLS required but unavailable, a
    /// certificate that does not verify): every recipient on it waits.
    pub fn route(text: impl Into<String>) -> ConnError {
        ConnError {
            text: text.into(),
            class: Class::Route,
            code: 0,
            unreachable: false,
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn effect(&self) -> Effect {
        self.class.effect(self.code)
    }

    /// What this failure means for the recipients that could not be sent.
    pub fn verdict(&self) -> Verdict {
        match self.effect() {
            Effect::Bounce => Verdict::Bounced(self.text.clone(), self.class),
            _ => Verdict::Deferred(self.text.clone(), self.class),
        }
    }
}

/// A reply as text for history and logs: "550 5.1.1 No such user".
pub fn reply_text(r: &Response<String>) -> String {
    let msg = r.message.replace(['\r', '\n'], " ");
    if r.esc[0] != 0 {
        format!(
            "{} {}.{}.{} {}",
            r.code,
            r.esc[0],
            r.esc[1],
            r.esc[2],
            msg.trim()
        )
    } else {
        format!("{} {}", r.code, msg.trim())
    }
}

fn io_text(host: &str, e: &mail_send::Error) -> String {
    match e {
        mail_send::Error::UnexpectedReply(r) | mail_send::Error::AuthenticationFailed(r) => {
            format!("{host}: {}", reply_text(r))
        }
        mail_send::Error::Timeout => format!("{host}: timed out"),
        mail_send::Error::Io(e) => format!("{host}: {e}"),
        mail_send::Error::Tls(e) => format!("{host}: TLS: {e}"),
        mail_send::Error::UnparseableReply => format!("{host}: connection closed or bad reply"),
        other => format!("{host}: {other}"),
    }
}

/// The class of a reply at `stage`.
pub fn class_of(r: &Response<String>, stage: Stage, smart_host: bool) -> Class {
    let esc = [r.esc[0] as u16, r.esc[1] as u16, r.esc[2] as u16];
    classify(r.code, esc, &r.message, stage, smart_host)
}

fn classify_reply(target: &Target, r: &Response<String>, what: &str, stage: Stage) -> ConnError {
    ConnError {
        text: format!("{}: {what}: {}", target.host, reply_text(r)),
        class: class_of(r, stage, target.smart_host),
        code: r.code,
        unreachable: false,
    }
}

async fn tls_wrap(target: &Target, tcp: TcpStream) -> Result<Stream, ConnError> {
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|_| ConnError::route(format!("{}: not a valid TLS server name", target.host)))?;
    let connector = tokio_rustls::TlsConnector::from(target.tls.clone());
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(Stream::ClientTls(Box::new(s))),
        // A certificate that does not verify is a problem of the route, and
        // retrying soon will not fix it, but the mail must not bounce.
        Ok(Err(e)) => {
            let hint =
                crate::tls::tls_advice(&format!("{e:?} {e}"), None, &target.host, target.port);
            Err(ConnError::route(if hint.is_empty() {
                format!("{}: TLS handshake: {e}", target.host)
            } else {
                format!("{}: TLS handshake: {e}; {hint}", target.host)
            }))
        }
        Err(_) => Err(ConnError::temporary(format!(
            "{}: TLS handshake timed out",
            target.host
        ))),
    }
}

async fn ehlo(client: &mut Client, target: &Target) -> Result<EhloResponse<String>, ConnError> {
    client.ehlo(&target.helo).await.map_err(|e| match &e {
        mail_send::Error::UnexpectedReply(r) => classify_reply(target, r, "EHLO", Stage::Ehlo),
        _ => ConnError::temporary(io_text(&target.host, &e)),
    })
}

/// Opens a ready-to-use session: greeted, EHLO'd, TLS as configured, and
/// authenticated when credentials are set. For MX delivery, a server whose
/// STARTTLS fails is tried again in clear text, as Postfix does at
/// `smtp_tls_security_level = may`.
pub async fn connect(target: &Target) -> Result<Conn, ConnError> {
    match connect_once(target).await {
        Err(e) if target.opportunistic && e.text().contains("TLS handshake") => {
            let why = e.text().to_string();
            tracing::info!(host = %target.host, error = %why, "STARTTLS failed; retrying without TLS");
            let mut plain = target.clone();
            plain.opportunistic = false;
            connect_once(&plain).await
        }
        other => other,
    }
}

async fn connect_once(target: &Target) -> Result<Conn, ConnError> {
    let addr = match target.connect_to {
        Some(ip) => std::net::SocketAddr::new(ip, target.port).to_string(),
        None => format!("{}:{}", target.host, target.port),
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnError::unreachable(format!("{addr}: connect: {e}"))),
        Err(_) => return Err(ConnError::unreachable(format!("{addr}: connect timed out"))),
    };
    let _ = tcp.set_nodelay(true);
    let stream = if target.security == Security::Tls {
        tls_wrap(target, tcp).await?
    } else {
        Stream::Plain(tcp)
    };
    let mut client = SmtpClient {
        stream: BufWriter::new(stream),
        timeout: COMMAND_TIMEOUT,
    };
    // mail-send's read() has no timeout of its own: a server that accepts
    // and never greets must not hold a delivery slot forever.
    let greeting = match tokio::time::timeout(COMMAND_TIMEOUT, client.read()).await {
        Ok(r) => r.map_err(|e| ConnError::temporary(io_text(&target.host, &e)))?,
        Err(_) => {
            return Err(ConnError::temporary(format!(
                "{}: no greeting within {}s",
                target.host,
                COMMAND_TIMEOUT.as_secs()
            )))
        }
    };
    if greeting.code != 220 {
        return Err(classify_reply(
            target,
            &greeting,
            "greeting",
            Stage::Greeting,
        ));
    }
    let mut caps = ehlo(&mut client, target).await?;

    if target.security == Security::StartTls
        || (target.opportunistic && caps.has_capability(EXT_START_TLS))
    {
        if !caps.has_capability(EXT_START_TLS) {
            return Err(ConnError::route(format!(
                "{}: STARTTLS required (security = \"starttls\") but not offered",
                target.host
            )));
        }
        let r = client
            .cmd(b"STARTTLS\r\n")
            .await
            .map_err(|e| ConnError::temporary(io_text(&target.host, &e)))?;
        if r.code != 220 {
            return Err(classify_reply(target, &r, "STARTTLS", Stage::StartTls));
        }
        let tcp = match client.stream.into_inner() {
            Stream::Plain(tcp) => tcp,
            _ => return Err(ConnError::temporary("STARTTLS on a TLS stream")),
        };
        client = SmtpClient {
            stream: BufWriter::new(tls_wrap(target, tcp).await?),
            timeout: COMMAND_TIMEOUT,
        };
        caps = ehlo(&mut client, target).await?;
    }

    if let Some((user, pass)) = &target.credentials {
        if !client.stream.get_ref().is_tls() && target.security != Security::None {
            return Err(ConnError::route(format!(
                "{}: refusing to send credentials without TLS",
                target.host
            )));
        }
        let creds = mail_send::Credentials::new(user.clone(), pass.expose().to_string());
        if let Err(e) = client.authenticate(&creds, &caps).await {
            return Err(match &e {
                mail_send::Error::AuthenticationFailed(r)
                | mail_send::Error::UnexpectedReply(r) => {
                    classify_reply(target, r, "AUTH", Stage::Auth)
                }
                mail_send::Error::UnsupportedAuthMechanism => ConnError::route(format!(
                    "{}: AUTH: the server offers no mechanism we support (PLAIN, LOGIN)",
                    target.host
                )),
                _ => ConnError::temporary(io_text(&target.host, &e)),
            });
        }
    }
    Ok(Conn {
        size: caps.has_capability(smtp_proto::EXT_SIZE),
        smtputf8: caps.has_capability(smtp_proto::EXT_SMTP_UTF8),
        eightbitmime: caps.has_capability(smtp_proto::EXT_8BIT_MIME),
        pipelining: caps.has_capability(smtp_proto::EXT_PIPELINING),
        sent: 0,
        client,
    })
}

/// What the upstream said about one recipient, with the class of the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered(String),
    Deferred(String, Class),
    Bounced(String, Class),
}

impl Verdict {
    pub fn class(&self) -> Option<Class> {
        match self {
            Verdict::Delivered(_) => None,
            Verdict::Deferred(_, c) | Verdict::Bounced(_, c) => Some(*c),
        }
    }
}

/// The result of one transaction.
pub enum Outcome {
    /// A verdict per recipient (same order as given); the connection can be
    /// reused when `reusable`.
    Judged {
        verdicts: Vec<Verdict>,
        reusable: bool,
        /// A reply that asks herald to slow down to this destination: one
        /// to the session (greeting, MAIL, DATA, end of DATA, a 421), or
        /// a rate limit said at RCPT with a 4.7.x code. A throttle reply
        /// to one RCPT alone concerns that recipient.
        slow_down: Option<String>,
    },
    /// A reply of class `route` (login, sender, relaying): the route's
    /// problem, not the recipients'.
    RouteRefused(String),
    /// The connection failed mid-way; nobody was judged.
    Broken(String),
}

/// Writes `msg` with SMTP transparency (dot-stuffing) and the end marker.
/// Lines that begin with a dot are found with memchr's SIMD search, not a
/// loop over every byte; a message without any (nearly all) up to 64 KiB
/// goes in one write with its end marker (one system call, one TLS
/// record run), larger ones in slices of the message itself (no second
/// copy of a large body).
pub async fn write_stuffed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    msg: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let end: &[u8] = if msg.ends_with(b"\r\n") {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    };
    // Where a line begins with a dot: an extra dot goes before each.
    let dots = (msg.first() == Some(&b'.'))
        .then_some(0)
        .into_iter()
        .chain(memchr::memmem::find_iter(msg, b"\n.").map(|p| p + 1));
    let mut start = 0;
    for i in dots {
        w.write_all(&msg[start..i]).await?;
        w.write_all(b".").await?;
        start = i;
    }
    let rest = &msg[start..];
    if rest.len() <= 64 * 1024 {
        let mut last = Vec::with_capacity(rest.len() + end.len());
        last.extend_from_slice(rest);
        last.extend_from_slice(end);
        w.write_all(&last).await
    } else {
        w.write_all(rest).await?;
        w.write_all(end).await
    }
}

/// Sends the message after `354` and reads the reply to its end.
async fn send_data(client: &mut Client, msg: &[u8]) -> mail_send::Result<Response<String>> {
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(DATA_END_TIMEOUT, async {
        write_stuffed(&mut client.stream, msg).await?;
        client.stream.flush().await?;
        client.read().await
    })
    .await
    .map_err(|_| mail_send::Error::Timeout)?
}

/// What a reply at `stage` means for the recipients it judges.
fn verdict_for(r: &Response<String>, host: &str, what: &str, stage: Stage, smart: bool) -> Verdict {
    let text = if what.is_empty() {
        format!("{host}: {}", reply_text(r))
    } else {
        format!("{host}: {what}: {}", reply_text(r))
    };
    if (200..300).contains(&r.code) {
        return Verdict::Delivered(text);
    }
    let class = class_of(r, stage, smart);
    match class.effect(r.code) {
        Effect::Bounce => Verdict::Bounced(text, class),
        Effect::Defer | Effect::RouteFailure => Verdict::Deferred(text, class),
    }
}

/// The verdicts of a transaction: those given at RCPT, and `v` for every
/// recipient RCPT accepted.
fn judged(at_rcpt: Vec<Option<Verdict>>, v: &Verdict) -> Vec<Verdict> {
    at_rcpt
        .into_iter()
        .map(|x| x.unwrap_or_else(|| v.clone()))
        .collect()
}

/// The outcome of a reply that judges every recipient of the transaction
/// at once (MAIL FROM).
fn judge_all(v: Verdict, n: usize, reusable: bool) -> Outcome {
    match v {
        Verdict::Deferred(t, Class::Route) => Outcome::RouteRefused(t),
        v => Outcome::Judged {
            slow_down: throttle_text(&v),
            verdicts: vec![v; n],
            reusable,
        },
    }
}

/// The outcome when `v` judges every recipient RCPT accepted: it slows the
/// destination down too when it asks to (and nothing at RCPT did first).
fn judged_by(
    at_rcpt: Vec<Option<Verdict>>,
    v: Verdict,
    reusable: bool,
    slow_down: Option<String>,
) -> Outcome {
    Outcome::Judged {
        slow_down: slow_down.or_else(|| throttle_text(&v)),
        verdicts: judged(at_rcpt, &v),
        reusable,
    }
}

/// The text of a verdict that asks to slow down.
fn throttle_text(v: &Verdict) -> Option<String> {
    match v {
        Verdict::Deferred(t, Class::Throttle) => Some(t.clone()),
        _ => None,
    }
}

/// Writes pipelined commands at once and reads up to `n` replies, in
/// order. Replies read before a failure are kept: a server that answers
/// `421` and closes has still said why.
async fn pipeline(
    client: &mut Client,
    cmds: &[u8],
    n: usize,
) -> (Vec<Response<String>>, Option<mail_send::Error>) {
    use smtp_proto::response::parser::ResponseReceiver;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut replies = Vec::with_capacity(n);
    let res = tokio::time::timeout(COMMAND_TIMEOUT, async {
        client.stream.write_all(cmds).await?;
        client.stream.flush().await?;
        let mut buf = vec![0u8; 4096];
        let mut parser = ResponseReceiver::default();
        while replies.len() < n {
            let got = client.stream.read(&mut buf).await?;
            if got == 0 {
                return Err(mail_send::Error::UnparseableReply);
            }
            let mut it = buf[..got].iter();
            loop {
                match parser.parse(&mut it) {
                    Ok(r) => {
                        replies.push(r);
                        parser.reset();
                        if replies.len() == n {
                            break;
                        }
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                    Err(_) => return Err(mail_send::Error::UnparseableReply),
                }
            }
        }
        Ok(())
    })
    .await;
    let failure = match res {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(mail_send::Error::Timeout),
    };
    (replies, failure)
}

/// Sends MAIL and the RCPTs; their replies, in order, and the failure that
/// stopped the reading. With PIPELINING (RFC 2920) MAIL, every RCPT and
/// DATA go in one write and the replies (DATA's last) are read in order:
/// one round trip, as Postfix does. Else one command at a time.
async fn envelope(
    client: &mut Client,
    pipelining: bool,
    mail: String,
    rcpts: &[String],
) -> (Vec<Response<String>>, Option<mail_send::Error>) {
    if pipelining {
        let mut cmds = mail.into_bytes();
        for rcpt in rcpts {
            cmds.extend_from_slice(b"RCPT TO:<");
            cmds.extend_from_slice(rcpt.as_bytes());
            cmds.extend_from_slice(b">\r\n");
        }
        cmds.extend_from_slice(b"DATA\r\n");
        return pipeline(client, &cmds, rcpts.len() + 2).await;
    }
    let mut replies = Vec::new();
    match client.cmd(mail.as_bytes()).await {
        Ok(r) => {
            let go = r.code < 300;
            replies.push(r);
            if go {
                for rcpt in rcpts {
                    match client.cmd(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await {
                        Ok(r) => replies.push(r),
                        Err(e) => return (replies, Some(e)),
                    }
                }
            }
            (replies, None)
        }
        Err(e) => (replies, Some(e)),
    }
}

/// Resets a transaction given up before the message; whether the session
/// can go on. A server that answered the pipelined DATA with 354 although
/// no recipient was accepted (RFC 2920 asks it to refuse) first gets the
/// end marker of an empty message. With a recipient accepted, nothing is
/// sent: an end marker would deliver an empty message to it; the session
/// is to be dropped instead, which abandons the transaction (RFC 5321
/// 4.1.1.4).
async fn give_up(
    client: &mut Client,
    data_reply: &Option<Response<String>>,
    any_accepted: bool,
) -> bool {
    if data_reply.as_ref().is_some_and(|r| r.code == 354)
        && (any_accepted || client.cmd(b".\r\n").await.is_err())
    {
        return false;
    }
    rset_ok(client).await
}

async fn rset_ok(client: &mut Client) -> bool {
    matches!(client.cmd(b"RSET\r\n").await, Ok(r) if r.code == 250)
}

/// Runs MAIL, RCPT for each recipient, and DATA. `smart_host` is true for
/// a configured upstream (a relay that judges our route), false for a
/// recipient's MX (whose refusals judge the recipients).
pub async fn transact(
    conn: &mut Conn,
    host: &str,
    smart_host: bool,
    mail_from: &str,
    rcpts: &[String],
    message: &[u8],
    params: MailParams,
) -> Outcome {
    let client = &mut conn.client;
    let broken = |e: mail_send::Error| Outcome::Broken(io_text(host, &e));
    let mut size = if conn.size {
        format!(" SIZE={}", message.len())
    } else {
        String::new()
    };
    // Carried when the client used them and the server offers them.
    if params.body_8bit && conn.eightbitmime {
        size.push_str(" BODY=8BITMIME");
    }
    let utf8 =
        params.smtputf8 || needs_smtputf8(mail_from) || rcpts.iter().any(|r| needs_smtputf8(r));
    if utf8 && conn.smtputf8 {
        size.push_str(" SMTPUTF8");
    }
    let mail = format!("MAIL FROM:<{mail_from}>{size}\r\n");
    let (mut replies, failure) = envelope(client, conn.pipelining, mail, rcpts).await;
    // The reply to the pipelined DATA, apart from those to MAIL and RCPT.
    let data_reply = (replies.len() > rcpts.len() + 1).then(|| replies.remove(rcpts.len() + 1));
    // Whether a RCPT was accepted: then a 354 to DATA began a message for
    // someone, and only closing the session (never an end marker) drops it.
    let any_accepted = replies.iter().skip(1).any(|r| r.code < 300);
    let Some(r) = replies.first() else {
        return broken(failure.unwrap_or(mail_send::Error::UnparseableReply));
    };
    if r.code >= 300 {
        let v = verdict_for(r, host, "MAIL FROM", Stage::Mail, smart_host);
        let reusable = failure.is_none() && give_up(client, &data_reply, any_accepted).await;
        return judge_all(v, rcpts.len(), reusable);
    }
    // A server that says 421 closes the session: the recipients it did not
    // answer get that reply too.
    let closing = replies.last().filter(|r| r.code == 421).cloned();
    if replies.len() < rcpts.len() + 1 && closing.is_none() {
        return broken(failure.unwrap_or(mail_send::Error::UnparseableReply));
    }
    let mut verdicts = Vec::with_capacity(rcpts.len());
    let mut slow_down = None;
    for i in 0..rcpts.len() {
        let r = replies.get(i + 1).or(closing.as_ref()).expect("a reply");
        let v = verdict_for(r, host, "", Stage::Rcpt, smart_host);
        if r.code == 421 || r.esc[1] == 7 {
            slow_down = slow_down.or_else(|| throttle_text(&v));
        }
        // A refusal of the sender or the login, reported at RCPT (Postfix
        // does): at a smart host it stops the whole transaction.
        if smart_host && v.class() == Some(Class::Route) {
            // (Dropped with the session when a message was begun for the
            // others: the caller does not keep it.)
            let _ = give_up(client, &data_reply, any_accepted).await;
            return Outcome::RouteRefused(format!("{host}: RCPT TO: {}", reply_text(r)));
        }
        verdicts.push(match v {
            // Accepted at RCPT: the verdict comes after DATA.
            Verdict::Delivered(_) => None,
            v => Some(v),
        });
    }
    if let Some(closing) = &closing {
        // The session is over; nobody is sent DATA on it.
        let v = verdict_for(closing, host, "", Stage::Rcpt, smart_host);
        return judged_by(verdicts, v, false, slow_down);
    }
    if verdicts.iter().all(Option::is_some) {
        let reusable = failure.is_none() && give_up(client, &data_reply, any_accepted).await;
        return Outcome::Judged {
            verdicts: verdicts.into_iter().flatten().collect(),
            reusable,
            slow_down,
        };
    }
    let r = match data_reply {
        Some(r) => r,
        None if conn.pipelining => {
            return broken(failure.unwrap_or(mail_send::Error::UnparseableReply));
        }
        None => match client.cmd(b"DATA\r\n").await {
            Ok(r) => r,
            Err(e) => return broken(e),
        },
    };
    if r.code != 354 {
        // A refusal of the DATA command judges the transaction: every
        // recipient accepted at RCPT gets its verdict.
        let v = verdict_for(&r, host, "DATA", Stage::Data, smart_host);
        let _ = rset_ok(client).await;
        if let Verdict::Deferred(t, Class::Route) = &v {
            return Outcome::RouteRefused(t.clone());
        }
        return judged_by(verdicts, v, false, slow_down);
    }
    let final_reply = match send_data(client, message).await {
        Ok(r) => r,
        // The message went out and no reply came: it may have been
        // delivered. Defer (another MX now could make a second copy).
        Err(e) => {
            let v = Verdict::Deferred(
                format!(
                    "{} (after the message was sent: it may have been delivered)",
                    io_text(host, &e)
                ),
                Class::Transient,
            );
            return judged_by(verdicts, v, false, slow_down);
        }
    };
    let v = verdict_for(&final_reply, host, "", Stage::DataEnd, smart_host);
    if smart_host && v.class() == Some(Class::Route) {
        return Outcome::RouteRefused(format!("{host}: end of DATA: {}", reply_text(&final_reply)));
    }
    // A server that says 421 closes the session after its reply.
    judged_by(verdicts, v, final_reply.code != 421, slow_down)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn stuffed(msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_stuffed(&mut out, msg).await.unwrap();
        out
    }

    #[tokio::test]
    async fn dot_stuffing() {
        assert_eq!(stuffed(b"a\r\n.b\r\n").await, b"a\r\n..b\r\n.\r\n");
        assert_eq!(stuffed(b".\r\n").await, b"..\r\n.\r\n");
        assert_eq!(stuffed(b"x").await, b"x\r\n.\r\n");
        assert_eq!(stuffed(b"..x\r\n..\r\n").await, b"...x\r\n...\r\n.\r\n");
        assert_eq!(stuffed(b"").await, b"\r\n.\r\n");
        assert_eq!(stuffed(b"a\n.\n.b").await, b"a\n..\n..b\r\n.\r\n");
        // Larger than one write: the same bytes.
        let big = format!(
            "{}\r\n.dot\r\n{}",
            "x".repeat(70_000),
            "y\r\n".repeat(30_000)
        );
        let want = format!(
            "{}\r\n..dot\r\n{}.\r\n",
            "x".repeat(70_000),
            "y\r\n".repeat(30_000)
        );
        assert!(stuffed(big.as_bytes()).await == want.as_bytes());
        let no_dots = "z\r\n".repeat(40_000);
        assert!(stuffed(no_dots.as_bytes()).await == format!("{no_dots}.\r\n").as_bytes());
    }
}
