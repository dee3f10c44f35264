//! `herald probe UPSTREAM [--to ADDR] [--send]`: a step-by-step test of a
//! smart host with the configured settings, before mail depends on it.
//!
//! Each step (connect, TLS, greeting, EHLO, STARTTLS, AUTH, MAIL FROM with
//! every sender herald would use on this upstream, RCPT TO, DATA) prints
//! the server's reply and, when it fails, a hint for the usual causes. The
//! probe stops at the first failure; the exit code is 0 only if every step
//! passed. It runs on its own, without the daemon.

use std::time::{Duration, Instant};

use mail_send::SmtpClient;
use smtp_proto::{Response, EXT_START_TLS};
use tokio::io::BufWriter;
use tokio::net::TcpStream;

use super::client::{reply_text, Client};
use crate::config::{Config, Security, Upstream};
use crate::tls::tls_advice;
use crate::tls::Stream;

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the probe printed, step by step.
struct Report {
    ok: bool,
}

impl Report {
    fn pass(&self, step: &str, text: &str) {
        println!("  ok    {step:<10} {text}");
    }

    fn fail(&mut self, step: &str, text: &str, hint: &str) {
        self.ok = false;
        println!("  FAIL  {step:<10} {text}");
        if !hint.is_empty() {
            println!("        {:<10} hint: {hint}", "");
        }
    }

    /// The reply when it has code `want`; else the step fails (no hint).
    fn expect(
        &mut self,
        step: &str,
        reply: Result<Response<String>, String>,
        want: u16,
    ) -> Option<Response<String>> {
        match reply {
            Ok(g) if g.code == want => Some(g),
            Ok(g) => {
                self.fail(step, &reply_text(&g), "");
                None
            }
            Err(e) => {
                self.fail(step, &e, "");
                None
            }
        }
    }
}

/// The envelope senders herald uses on `name`: `bounce_address`, or (when
/// it is not set) the `default_sender` of each route to this upstream.
fn senders(cfg: &Config, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if cfg.sender.bounce_explicit || cfg.delivery.upstream == name {
        out.push(cfg.sender.bounce_address.clone());
    }
    for r in cfg.routes.iter().filter(|r| r.upstream == name) {
        let s = match (&r.default_sender, cfg.sender.bounce_explicit) {
            (Some(d), false) => d.clone(),
            _ => cfg.sender.bounce_address.clone(),
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        out.push(cfg.sender.bounce_address.clone());
    }
    out
}

/// Why a TLS handshake failed, for people.
fn tls_hint(err: &str, u: &Upstream) -> String {
    tls_advice(err, Some(&u.name), &u.host, u.port)
}

/// The `notAfter` of a DER certificate as "YYYY-MM-DD HH:MM:SS UTC" and as
/// seconds since the epoch, read by walking the ASN.1 of its validity.
fn not_after(der: &[u8]) -> Option<(String, i64)> {
    // (tag, content, rest)
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, head) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            let mut len = 0usize;
            for i in 0..n {
                len = len << 8 | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let content = b.get(head..head + len)?;
        Some((tag, content, &b[head + len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // version
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = tlv(rest)?;
    let after = tlv(tlv(validity)?.2)?;
    let text = std::str::from_utf8(after.1).ok()?;
    let (year, rest) = match after.0 {
        0x17 => {
            let y: i32 = text.get(0..2)?.parse().ok()?;
            (if y < 50 { 2000 + y } else { 1900 + y }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let n = |i: usize| -> Option<u32> { rest.get(i..i + 2)?.parse().ok() };
    let dt =
        chrono::NaiveDate::from_ymd_opt(year, n(0)?, n(2)?)?.and_hms_opt(n(4)?, n(6)?, n(8)?)?;
    Some((
        dt.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        dt.and_utc().timestamp(),
    ))
}

async fn handshake(
    u: &Upstream,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    r: &mut Report,
    step: &str,
) -> Option<Stream> {
    let Ok(name) = rustls::pki_types::ServerName::try_from(u.host.clone()) else {
        r.fail(step, &format!("{:?} is not a TLS server name", u.host), "");
        return None;
    };
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => {
            let (_, conn) = s.get_ref();
            let version = conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            let chain = conn.peer_certificates().unwrap_or_default();
            let expiry = chain
                .first()
                .and_then(|c| not_after(c.as_ref()))
                .map(|(t, at)| {
                    let days = (at - chrono::Utc::now().timestamp()) / 86400;
                    format!(", certificate valid until {t} (in {days} days)")
                })
                .unwrap_or_default();
            r.pass(
                step,
                &format!(
                    "{version}, chain of {} certificate(s) verified for {}{expiry}",
                    chain.len(),
                    u.host
                ),
            );
            Some(Stream::ClientTls(Box::new(s)))
        }
        Ok(Err(e)) => {
            let text = format!("handshake: {e}");
            r.fail(step, &text, &tls_hint(&format!("{e:?} {e}"), u));
            None
        }
        Err(_) => {
            r.fail(
                step,
                "handshake timed out",
                "the server did not answer the TLS hello: it may expect STARTTLS (security = \"starttls\")",
            );
            None
        }
    }
}

async fn cmd(c: &mut Client, line: &str) -> Result<Response<String>, String> {
    match tokio::time::timeout(STEP_TIMEOUT, c.cmd(format!("{line}\r\n").as_bytes())).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{e}")),
        Err(_) => Err("no reply within 10s".into()),
    }
}

/// Hints for replies to MAIL FROM and RCPT TO.
fn envelope_hint(r: &Response<String>, u: &Upstream, sender: &str) -> String {
    let t = r.message.to_ascii_lowercase();
    if t.contains("starttls") || t.contains("tls") && r.code == 530 {
        return format!(
            "the server requires TLS: set upstreams.{}.security = \"starttls\" (or \"tls\" on port 465)",
            u.name
        );
    }
    if r.code == 530 || t.contains("authentication required") {
        return format!(
            "the server wants a login: set upstreams.{0}.username and password_file",
            u.name
        );
    }
    if (500..600).contains(&r.code) {
        return format!(
            "sender not owned or not verified: this account may not send as {sender}; verify it at the provider, or change [sender] default_sender / bounce_address (or the route's default_sender)"
        );
    }
    String::new()
}

/// Runs the probe; true when every step passed.
/// Runs the probe and says at the end, whichever step it stopped at,
/// whether it passed.
pub async fn run(cfg: &Config, name: &str, to: Option<&str>, send: bool) -> Result<bool, String> {
    let ok = steps(cfg, name, to, send).await?;
    println!(
        "{}",
        if ok {
            "every step passed: herald can send through this upstream"
        } else {
            "the probe FAILED (see the hints above)"
        }
    );
    Ok(ok)
}

async fn steps(cfg: &Config, name: &str, to: Option<&str>, send: bool) -> Result<bool, String> {
    let u = cfg.upstreams.get(name).ok_or_else(|| {
        let known: Vec<&str> = cfg.upstreams.keys().map(String::as_str).collect();
        format!(
            "no upstream {name:?} in the configuration (known: {})",
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )
    })?;
    if send && to.is_none() {
        return Err("--send needs --to ADDR (the test message goes there)".into());
    }
    let tls = crate::tls::client_config(u.ca_file.as_deref(), u.tls_verify)
        .map_err(|e| format!("upstreams.{name}: {e}"))?;
    println!(
        "probe of upstream {name}: {}:{}, security = \"{}\"{}",
        u.host,
        u.port,
        u.security,
        if u.username.is_some() {
            ", with AUTH"
        } else {
            ""
        }
    );
    let mut r = Report { ok: true };

    let Some(tcp) = connect_step(u, &mut r).await else {
        return Ok(false);
    };
    let stream = if u.security == Security::Tls {
        match handshake(u, &tls, tcp, &mut r, "TLS").await {
            Some(s) => s,
            None => return Ok(false),
        }
    } else {
        Stream::Plain(tcp)
    };
    let mut c: Client = SmtpClient {
        stream: BufWriter::new(stream),
        timeout: STEP_TIMEOUT,
    };
    if !greeting_step(&mut c, u, &mut r).await {
        return Ok(false);
    }
    let Some((mut c, caps)) = ehlo_step(c, cfg, u, &tls, &mut r).await? else {
        return Ok(false);
    };
    if !auth_step(&mut c, u, &caps, &mut r).await
        || !envelope_step(&mut c, cfg, u, to, &mut r).await
    {
        return Ok(false);
    }
    if let (true, Some(to)) = (send, to) {
        if !data_step(&mut c, cfg, name, to, &mut r).await {
            return Ok(false);
        }
    } else if let Some(g) = r.expect("RSET", cmd(&mut c, "RSET").await, 250) {
        r.pass("RSET", &reply_text(&g));
    }
    match cmd(&mut c, "QUIT").await {
        Ok(g) => r.pass("QUIT", &reply_text(&g)),
        Err(e) => r.pass("QUIT", &format!("(closed: {e})")),
    }
    Ok(r.ok)
}

/// Step "connect": the TCP connection.
async fn connect_step(u: &Upstream, r: &mut Report) -> Option<TcpStream> {
    let addr = format!("{}:{}", u.host, u.port);
    let t0 = Instant::now();
    let tcp = match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            r.fail("connect", &format!("{addr}: {e}"), "nothing accepts connections there: check host and port (587 for starttls, 465 for tls, 25 for none) and the firewall");
            return None;
        }
        Err(_) => {
            r.fail(
                "connect",
                &format!("{addr}: timed out"),
                "no answer: a firewall may drop the traffic (many clouds block outbound port 25)",
            );
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    r.pass(
        "connect",
        &format!("{addr} in {} ms", t0.elapsed().as_millis()),
    );
    Some(tcp)
}

/// Step "greeting": the server's 220.
async fn greeting_step(c: &mut Client, u: &Upstream, r: &mut Report) -> bool {
    match tokio::time::timeout(STEP_TIMEOUT, c.read()).await {
        Ok(Ok(g)) if g.code == 220 => r.pass("greeting", &reply_text(&g)),
        Ok(Ok(g)) => {
            r.fail("greeting", &reply_text(&g), "the server refuses the session: too many connections, or herald's address is blocked");
            return false;
        }
        Ok(Err(e)) => {
            r.fail(
                "greeting",
                &format!("{e}"),
                if u.security == Security::Tls {
                    ""
                } else {
                    "the port may expect TLS from the first byte: try security = \"tls\" (port 465)"
                },
            );
            return false;
        }
        Err(_) => {
            r.fail("greeting", "no greeting within 10s", if u.security == Security::Tls { "" } else { "the port probably expects TLS from the first byte: use security = \"tls\" (port 465)" });
            return false;
        }
    }

    true
}

/// The extensions of an EHLO reply, for people.
fn caps_text(e: &smtp_proto::EhloResponse<String>) -> String {
    use smtp_proto::*;
    let mut v = Vec::new();
    for (bit, n) in [
        (EXT_PIPELINING, "PIPELINING"),
        (EXT_SIZE, "SIZE"),
        (EXT_8BIT_MIME, "8BITMIME"),
        (EXT_START_TLS, "STARTTLS"),
        (EXT_SMTP_UTF8, "SMTPUTF8"),
        (EXT_ENHANCED_STATUS_CODES, "ENHANCEDSTATUSCODES"),
        (EXT_CHUNKING, "CHUNKING"),
    ] {
        if e.has_capability(bit) {
            v.push(n.to_string());
        }
    }
    if e.has_capability(EXT_AUTH) {
        let mut m = Vec::new();
        if e.auth_mechanisms & AUTH_PLAIN != 0 {
            m.push("PLAIN");
        }
        if e.auth_mechanisms & AUTH_LOGIN != 0 {
            m.push("LOGIN");
        }
        v.push(format!("AUTH {}", m.join(" ")));
    }
    if v.is_empty() {
        "no extensions".into()
    } else {
        v.join(", ")
    }
}

/// Steps "EHLO", and "STARTTLS" and "EHLO" again when the upstream's
/// security asks for it; the session and its extensions.
async fn ehlo_step(
    mut c: Client,
    cfg: &Config,
    u: &Upstream,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    r: &mut Report,
) -> Result<Option<(Client, smtp_proto::EhloResponse<String>)>, String> {
    let mut caps = match c.ehlo(&cfg.hostname).await {
        Ok(e) => {
            r.pass("EHLO", &caps_text(&e));
            e
        }
        Err(e) => {
            r.fail("EHLO", &format!("{e}"), "");
            return Ok(None);
        }
    };

    if u.security == Security::StartTls {
        if !caps.has_capability(EXT_START_TLS) {
            r.fail("STARTTLS", "not offered", &format!("the server offers no STARTTLS on port {}: use security = \"tls\" if the port is 465, or \"none\" only on a private network", u.port));
            return Ok(None);
        }
        if r.expect("STARTTLS", cmd(&mut c, "STARTTLS").await, 220)
            .is_none()
        {
            return Ok(None);
        }
        let tcp = match c.stream.into_inner() {
            Stream::Plain(t) => t,
            _ => return Err("STARTTLS on a TLS stream".into()),
        };
        let s = match handshake(u, tls, tcp, r, "STARTTLS").await {
            Some(s) => s,
            None => return Ok(None),
        };
        c = SmtpClient {
            stream: BufWriter::new(s),
            timeout: STEP_TIMEOUT,
        };
        caps = match c.ehlo(&cfg.hostname).await {
            Ok(e) => {
                r.pass("EHLO", &format!("(after TLS) {}", caps_text(&e)));
                e
            }
            Err(e) => {
                r.fail("EHLO", &format!("{e}"), "");
                return Ok(None);
            }
        };
    }

    Ok(Some((c, caps)))
}

/// Step "AUTH", when the upstream has credentials.
async fn auth_step(
    c: &mut Client,
    u: &Upstream,
    caps: &smtp_proto::EhloResponse<String>,
    r: &mut Report,
) -> bool {
    let name = &u.name;
    match (&u.username, &u.password) {
        (Some(user), Some(pass)) => {
            if !c.stream.get_ref().is_tls() && u.security != Security::None {
                r.fail("AUTH", "not sent without TLS", "");
                return false;
            }
            let creds = mail_send::Credentials::new(user.clone(), pass.expose().to_string());
            match tokio::time::timeout(STEP_TIMEOUT, c.authenticate(&creds, caps)).await {
                Ok(Ok(_)) => r.pass("AUTH", &format!("logged in as {user}")),
                Ok(Err(
                    mail_send::Error::AuthenticationFailed(resp)
                    | mail_send::Error::UnexpectedReply(resp),
                )) => {
                    r.fail(
                        "AUTH",
                        &reply_text(&resp),
                        &format!("{} bad credentials: the server refused the login {user:?}: check upstreams.{name}.username and password_file (some providers need an app password or SMTP AUTH enabled for the mailbox)", resp.code),
                    );
                    return false;
                }
                Ok(Err(mail_send::Error::UnsupportedAuthMechanism)) => {
                    r.fail(
                        "AUTH",
                        "the server offers no mechanism herald supports (PLAIN, LOGIN)",
                        "AUTH is often offered only after STARTTLS: check security",
                    );
                    return false;
                }
                Ok(Err(e)) => {
                    r.fail("AUTH", &format!("{e}"), "");
                    return false;
                }
                Err(_) => {
                    r.fail("AUTH", "no reply within 10s", "");
                    return false;
                }
            }
        }
        _ => r.pass("AUTH", "no credentials configured: skipped"),
    }

    true
}

/// Steps "MAIL FROM" for every sender herald would use on this upstream,
/// then "RCPT TO" when a recipient is given.
async fn envelope_step(
    c: &mut Client,
    cfg: &Config,
    u: &Upstream,
    to: Option<&str>,
    r: &mut Report,
) -> bool {
    let all = senders(cfg, &u.name);
    for (i, sender) in all.iter().enumerate() {
        match cmd(c, &format!("MAIL FROM:<{sender}>")).await {
            Ok(g) if g.code == 250 => {
                r.pass("MAIL FROM", &format!("<{sender}>: {}", reply_text(&g)))
            }
            Ok(g) => {
                r.fail(
                    "MAIL FROM",
                    &format!("<{sender}>: {}", reply_text(&g)),
                    &envelope_hint(&g, u, sender),
                );
                let _ = cmd(c, "QUIT").await;
                return false;
            }
            Err(e) => {
                r.fail("MAIL FROM", &e, "");
                return false;
            }
        }
        let last = i + 1 == all.len();
        if !last {
            let _ = cmd(c, "RSET").await;
        }
    }
    if let Some(to) = to {
        match cmd(c, &format!("RCPT TO:<{to}>")).await {
            Ok(g) if (200..300).contains(&g.code) => {
                r.pass("RCPT TO", &format!("<{to}>: {}", reply_text(&g)))
            }
            Ok(g) => {
                let class = super::client::class_of(&g, crate::reply::Stage::Rcpt, true);
                r.fail(
                    "RCPT TO",
                    &format!("<{to}>: {}", reply_text(&g)),
                    &format!("{class}: {}", class.meaning()),
                );
                let _ = cmd(c, "QUIT").await;
                return false;
            }
            Err(e) => {
                r.fail("RCPT TO", &e, "");
                return false;
            }
        }
    }
    true
}

/// Step "DATA": a test message to `to`.
async fn data_step(c: &mut Client, cfg: &Config, name: &str, to: &str, r: &mut Report) -> bool {
    if r.expect("DATA", cmd(c, "DATA").await, 354).is_none() {
        return false;
    }
    let msg = format!(
        "From: herald probe <{}>\r\nTo: <{to}>\r\nSubject: herald probe of upstream {name}\r\nDate: {}\r\nMessage-ID: <probe.{}@{}>\r\n\r\nThis is a test message sent by herald probe {name}.\r\n",
        cfg.sender.default_sender,
        chrono::Utc::now().to_rfc2822(),
        crate::state::spool::now_ms(),
        cfg.hostname
    );
    let reply = async {
        use tokio::io::AsyncWriteExt;
        super::client::write_stuffed(&mut c.stream, msg.as_bytes()).await?;
        c.stream.flush().await?;
        Ok::<_, std::io::Error>(())
    }
    .await;
    let end = match reply {
        Ok(()) => tokio::time::timeout(Duration::from_secs(60), c.read())
            .await
            .map_err(|_| "no reply within 60s".to_string())
            .and_then(|x| x.map_err(|e| e.to_string())),
        Err(e) => Err(e.to_string()),
    };
    match r.expect("DATA", end, 250) {
        Some(g) => r.pass("DATA", &format!("test message sent: {}", reply_text(&g))),
        None => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_come_with_the_fix() {
        let self_signed = tls_advice(
            "InvalidCertificate(Other(OtherError(CaUsedAsEndEntity))) invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))",
            Some("up"),
            "smtp.test",
            465,
        );
        assert!(
            self_signed.contains("self-signed") && self_signed.contains("upstreams.up.ca_file"),
            "{self_signed}"
        );
        let unknown = tls_advice(
            "invalid peer certificate: UnknownIssuer",
            None,
            "smtp.test",
            465,
        );
        assert!(unknown.contains("the upstream's ca_file"), "{unknown}");
        assert!(tls_advice("something else", None, "h", 1).is_empty());
    }

    #[test]
    fn not_after_is_read_from_a_certificate() {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_after = rcgen::date_time_ymd(2031, 7, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let (text, at) = not_after(cert.der()).unwrap();
        assert_eq!(text, "2031-07-04 00:00:00 UTC");
        assert_eq!(at, 1_940_889_600);
    }
}
