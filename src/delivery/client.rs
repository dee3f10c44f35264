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
use crate::tls::Stream;

pub type Client = SmtpClient<BufWriter<Stream>>;

/// An open session and what its server offered.
pub struct Conn {
    pub client: Client,
    /// The server advertised SIZE: we may send `SIZE=` with MAIL FROM.
    pub size: bool,
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
}

/// Why a connection could not be used.
#[derive(Debug, Clone)]
pub enum ConnError {
    /// Try again later (network error, timeout, 4xx greeting).
    Temporary(String),
    /// The route itself is refused (5xx greeting, AUTH 535, TLS required but
    /// unavailable): every recipient on it waits, none is judged.
    Route(String),
}

impl ConnError {
    pub fn text(&self) -> &str {
        match self {
            ConnError::Temporary(s) | ConnError::Route(s) => s,
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

fn classify_reply(host: &str, r: &Response<String>, what: &str) -> ConnError {
    let text = format!("{host}: {what}: {}", reply_text(r));
    if r.code >= 500 {
        ConnError::Route(text)
    } else {
        ConnError::Temporary(text)
    }
}

async fn tls_wrap(target: &Target, tcp: TcpStream) -> Result<Stream, ConnError> {
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|_| ConnError::Route(format!("{}: not a valid TLS server name", target.host)))?;
    let connector = tokio_rustls::TlsConnector::from(target.tls.clone());
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => Ok(Stream::ClientTls(Box::new(s))),
        // A certificate that does not verify is a problem of the route, and
        // retrying soon will not fix it, but the mail must not bounce.
        Ok(Err(e)) => Err(ConnError::Route(format!(
            "{}: TLS handshake: {e}",
            target.host
        ))),
        Err(_) => Err(ConnError::Temporary(format!(
            "{}: TLS handshake timed out",
            target.host
        ))),
    }
}

async fn ehlo(client: &mut Client, target: &Target) -> Result<EhloResponse<String>, ConnError> {
    client.ehlo(&target.helo).await.map_err(|e| match &e {
        mail_send::Error::UnexpectedReply(r) => classify_reply(&target.host, r, "EHLO"),
        _ => ConnError::Temporary(io_text(&target.host, &e)),
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
        Ok(Err(e)) => return Err(ConnError::Temporary(format!("{addr}: connect: {e}"))),
        Err(_) => return Err(ConnError::Temporary(format!("{addr}: connect timed out"))),
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
        Ok(r) => r.map_err(|e| ConnError::Temporary(io_text(&target.host, &e)))?,
        Err(_) => {
            return Err(ConnError::Temporary(format!(
                "{}: no greeting within {}s",
                target.host,
                COMMAND_TIMEOUT.as_secs()
            )))
        }
    };
    if greeting.code != 220 {
        return Err(classify_reply(&target.host, &greeting, "greeting"));
    }
    let mut caps = ehlo(&mut client, target).await?;

    if target.security == Security::StartTls
        || (target.opportunistic && caps.has_capability(EXT_START_TLS))
    {
        if !caps.has_capability(EXT_START_TLS) {
            return Err(ConnError::Route(format!(
                "{}: STARTTLS required (security = \"starttls\") but not offered",
                target.host
            )));
        }
        let r = client
            .cmd(b"STARTTLS\r\n")
            .await
            .map_err(|e| ConnError::Temporary(io_text(&target.host, &e)))?;
        if r.code != 220 {
            return Err(classify_reply(&target.host, &r, "STARTTLS"));
        }
        let tcp = match client.stream.into_inner() {
            Stream::Plain(tcp) => tcp,
            _ => return Err(ConnError::Temporary("STARTTLS on a TLS stream".into())),
        };
        client = SmtpClient {
            stream: BufWriter::new(tls_wrap(target, tcp).await?),
            timeout: COMMAND_TIMEOUT,
        };
        caps = ehlo(&mut client, target).await?;
    }

    if let Some((user, pass)) = &target.credentials {
        if !client.stream.get_ref().is_tls() && target.security != Security::None {
            return Err(ConnError::Route(format!(
                "{}: refusing to send credentials without TLS",
                target.host
            )));
        }
        let creds = mail_send::Credentials::new(user.clone(), pass.expose().to_string());
        if let Err(e) = client.authenticate(&creds, &caps).await {
            return Err(match &e {
                mail_send::Error::AuthenticationFailed(r)
                | mail_send::Error::UnexpectedReply(r) => classify_reply(&target.host, r, "AUTH"),
                mail_send::Error::UnsupportedAuthMechanism => ConnError::Route(format!(
                    "{}: AUTH: the server offers no mechanism we support (PLAIN, LOGIN)",
                    target.host
                )),
                _ => ConnError::Temporary(io_text(&target.host, &e)),
            });
        }
    }
    Ok(Conn {
        size: caps.has_capability(smtp_proto::EXT_SIZE),
        client,
    })
}

/// What the upstream said about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered(String),
    Deferred(String),
    Bounced(String),
}

/// The result of one transaction.
pub enum Outcome {
    /// A verdict per recipient (same order as given); the connection can be
    /// reused when `reusable`.
    Judged {
        verdicts: Vec<Verdict>,
        reusable: bool,
    },
    /// MAIL FROM refused with 5xx: the route's problem, not the recipients'.
    RouteRefused(String),
    /// The connection failed mid-way; nobody was judged.
    Broken(String),
}

/// Applies SMTP transparency (dot-stuffing) and appends the end marker,
/// so the whole message goes out in one write.
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + 8);
    let mut at_line_start = true;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn verdict_for(r: &Response<String>, host: &str) -> Verdict {
    let text = format!("{host}: {}", reply_text(r));
    match r.code {
        200..=299 => Verdict::Delivered(text),
        500..=599 => Verdict::Bounced(text),
        _ => Verdict::Deferred(text),
    }
}

/// A refusal at RCPT that is about the sender, the login or relaying, not
/// about the recipient: Postfix, for one, reports sender restrictions at
/// RCPT time. Such a reply must not bounce (or suppress) anybody.
fn refuses_route(r: &Response<String>) -> bool {
    let esc = (r.esc[0], r.esc[1], r.esc[2]);
    let text = r.message.to_ascii_lowercase();
    r.code == 530
        || r.code == 535
        || matches!(esc, (5, 7, 0) | (5, 7, 8) | (5, 1, 7) | (5, 1, 8))
        || [
            "sender address rejected",
            "not owned",
            "relay access denied",
            "authentication required",
        ]
        .iter()
        .any(|p| text.contains(p))
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
) -> Outcome {
    let client = &mut conn.client;
    let broken = |e: mail_send::Error| Outcome::Broken(io_text(host, &e));
    let size = if conn.size {
        format!(" SIZE={}", message.len())
    } else {
        String::new()
    };
    let r = match client
        .cmd(format!("MAIL FROM:<{mail_from}>{size}\r\n").as_bytes())
        .await
    {
        Ok(r) => r,
        Err(e) => return broken(e),
    };
    if r.code >= 500 {
        return Outcome::RouteRefused(format!("{host}: MAIL FROM: {}", reply_text(&r)));
    }
    if r.code >= 300 {
        let v = Verdict::Deferred(format!("{host}: MAIL FROM: {}", reply_text(&r)));
        let reusable = rset_ok(client).await;
        return Outcome::Judged {
            verdicts: vec![v; rcpts.len()],
            reusable,
        };
    }
    let mut verdicts = Vec::with_capacity(rcpts.len());
    for rcpt in rcpts {
        let r = match client.cmd(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await {
            Ok(r) => r,
            Err(e) => return broken(e),
        };
        if smart_host && r.code >= 500 && refuses_route(&r) {
            let _ = rset_ok(client).await;
            return Outcome::RouteRefused(format!("{host}: RCPT TO: {}", reply_text(&r)));
        }
        verdicts.push(match verdict_for(&r, host) {
            // Accepted at RCPT: the verdict comes after DATA.
            Verdict::Delivered(_) => None,
            // RFC 5321 4.5.3.1.10: 552 at RCPT is a temporary condition.
            Verdict::Bounced(t) if r.code == 552 => Some(Verdict::Deferred(t)),
            v => Some(v),
        });
    }
    if verdicts.iter().all(Option::is_some) {
        let reusable = rset_ok(client).await;
        return Outcome::Judged {
            verdicts: verdicts.into_iter().flatten().collect(),
            reusable,
        };
    }
    let r = match client.cmd(b"DATA\r\n").await {
        Ok(r) => r,
        Err(e) => return broken(e),
    };
    if r.code != 354 {
        // A refusal of the DATA command judges the transaction, not the
        // recipients (only RCPT and the end of DATA do).
        let text = format!("{host}: DATA: {}", reply_text(&r));
        let _ = rset_ok(client).await;
        return if r.code >= 500 && smart_host {
            Outcome::RouteRefused(text)
        } else if r.code >= 500 {
            Outcome::Judged {
                verdicts: verdicts
                    .into_iter()
                    .map(|x| x.unwrap_or_else(|| Verdict::Bounced(text.clone())))
                    .collect(),
                reusable: false,
            }
        } else {
            Outcome::Judged {
                verdicts: verdicts
                    .into_iter()
                    .map(|x| x.unwrap_or_else(|| Verdict::Deferred(text.clone())))
                    .collect(),
                reusable: false,
            }
        };
    }
    client.timeout = DATA_END_TIMEOUT;
    let final_reply = client.cmd(dot_stuff(message)).await;
    client.timeout = COMMAND_TIMEOUT;
    let final_reply = match final_reply {
        Ok(r) => r,
        Err(e) => return broken(e),
    };
    let v = verdict_for(&final_reply, host);
    Outcome::Judged {
        verdicts: verdicts
            .into_iter()
            .map(|x| x.unwrap_or_else(|| v.clone()))
            .collect(),
        reusable: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(b".\r\n"), b"..\r\n.\r\n");
        assert_eq!(dot_stuff(b"x"), b"x\r\n.\r\n");
    }
}
