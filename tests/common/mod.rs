//! Test harness: the real `herald` binary on loopback ports, a scriptable
//! SMTP sink as its upstream, and a line-level SMTP client.
//!
//! Every process and server started here is stopped when its handle drops.
#![allow(dead_code)]

pub mod hooks;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

/// A port nothing listens on, for a server a test starts. Taken below
/// the kernel's ephemeral range (ip_local_port_range, 32768-60999 by
/// default), where it picks the local ports of outbound connections: a
/// port asked of the kernel (bind to 0) and let go could be taken by any
/// process's connection before the server binds it ("Address already in
/// use" under load). The tests of one binary step through the 16,384 ports
/// below it from a start of their own, so two never get the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let end: u32 = ephemeral.clamp(2048, 65535);
    let first: u32 = end.saturating_sub(16384).max(1024);
    let start = first + (std::process::id() * 97) % (end - first);
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in first..end {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        let p = (first + (p - first) % (end - first)) as u16;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port in {first}..{end}");
}

/// A TCP connection to `addr` from the loopback address `source` (Linux
/// answers on all of 127.0.0.0/8): a second client address for tests.
pub fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let tcp = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{source}:0").parse().unwrap()).unwrap();
        s.connect(addr).await.unwrap()
    });
    let tcp = tcp.into_std().unwrap();
    tcp.set_nonblocking(false).unwrap();
    tcp
}

/// Polls `f` until it returns true or `secs` pass.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    f()
}

static PROVIDER: Once = Once::new();
fn provider() {
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

// ---------------------------------------------------------------- TLS ----

/// A test CA and a leaf certificate for localhost / 127.0.0.1 signed by it
/// (rustls refuses a self-signed CA:TRUE certificate as an end entity).
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        Self::make(dir, false)
    }

    /// The same, with a leaf certificate that expired in 2020.
    pub fn expired(dir: &Path) -> Pki {
        Self::make(dir, true)
    }

    fn make(dir: &Path, expired: bool) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "herald test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        if expired {
            leaf_params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            leaf_params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let p = Pki {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&p.ca, ca.pem()).unwrap();
        std::fs::write(&p.cert, leaf.pem()).unwrap();
        std::fs::write(&p.key, leaf_key.serialize_pem()).unwrap();
        p
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        provider();
        let certs = rustls_pemfile::certs(&mut BufReader::new(
            std::fs::File::open(&self.cert).unwrap(),
        ))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
        let key = rustls_pemfile::private_key(&mut BufReader::new(
            std::fs::File::open(&self.key).unwrap(),
        ))
        .unwrap()
        .unwrap();
        Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        )
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut BufReader::new(std::fs::File::open(&self.ca).unwrap()))
        {
            roots.add(c.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

pub trait Io: Read + Write + Send {}
impl<T: Read + Write + Send> Io for T {}

// --------------------------------------------------------------- sink ----

/// One message as the sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    /// What followed the address in MAIL FROM (" SIZE=123 SMTPUTF8").
    pub mail_params: String,
    pub rcpts: Vec<String>,
    pub data: Vec<u8>,
    pub tls: bool,
    pub auth: Option<String>,
    /// When the end of DATA was read.
    pub at: Instant,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What the sink answers. Replies are full lines without CRLF.
#[derive(Default)]
pub struct Script {
    /// Replies to the end of DATA, used in order; then "250 2.0.0 ok".
    pub data_replies: VecDeque<String>,
    /// RCPT TO reply for addresses containing the key.
    pub rcpt_replies: Vec<(String, String)>,
    /// MAIL FROM replies used in order; then "250 2.1.0 ok".
    pub mail_replies: VecDeque<String>,
    /// Required credentials (AUTH PLAIN or LOGIN); None: AUTH not offered.
    pub auth: Option<(String, String)>,
    /// Offer STARTTLS with this config.
    pub starttls: Option<Arc<rustls::ServerConfig>>,
    /// Implicit TLS from the first byte.
    pub implicit_tls: Option<Arc<rustls::ServerConfig>>,
    /// Greeting line instead of "220 sink.test ESMTP"; a non-220 greeting
    /// is followed by closing the connection.
    pub greeting: Option<String>,
    /// A tenth of a second after the reply to the end of DATA (the
    /// session idle), say this line (when not empty) and close the
    /// connection: a server that drops sessions it thinks idle ("421 4.4.2
    /// idle timeout"). `SinkState::hung_up` counts them.
    pub hang_up_after_message: Option<String>,
    /// Offer SMTPUTF8 (RFC 6531) in the EHLO reply.
    pub smtputf8: bool,
    /// Sessions allowed at once; beyond, the greeting is
    /// "421 4.7.0 too many sessions" and the connection closes.
    pub max_sessions: Option<usize>,
    /// (N, reply): more than N transactions in one second get `reply` to
    /// MAIL FROM and the connection closes (a rate-limited provider).
    pub rate_limit: Option<(usize, String)>,
    /// Offer PIPELINING.
    pub pipelining: bool,
    /// Wait this long before answering the end of DATA (a slow server).
    pub data_delay: Option<Duration>,
    /// MAIL FROM before STARTTLS gets "530 5.7.0 Must issue a STARTTLS
    /// command first".
    pub require_tls: bool,
}

/// In `data_replies`: read the message, then close without a reply.
pub const DROP: &str = "<drop>";

#[derive(Default)]
pub struct SinkState {
    pub script: Script,
    pub messages: Vec<Received>,
    /// Every RCPT TO seen, accepted or not.
    pub rcpt_seen: Vec<String>,
    pub data_attempts: usize,
    pub connections: usize,
    /// Sessions closed by `Script::hang_up_after_message`.
    pub hung_up: usize,
    pub auth_failures: usize,
    /// Sessions open now, and the most ever open at once (a session counts
    /// until QUIT is read or the connection closes).
    pub open_sessions: usize,
    pub peak_sessions: usize,
    pub sessions_refused: usize,
    /// MAIL FROM commands answered with the rate-limit reply.
    pub rate_limited: usize,
    /// Start times of the transactions accepted at MAIL FROM.
    pub mail_times: VecDeque<Instant>,
    /// MAIL FROM lines that arrived with more commands behind them in the
    /// same read (the client pipelines).
    pub pipelined: usize,
}

/// Counts a sink session open until it is closed (QUIT or end).
struct Open(Arc<Mutex<SinkState>>, bool);

impl Open {
    fn close(&mut self) {
        if !self.1 {
            self.1 = true;
            self.0.lock().unwrap().open_sessions -= 1;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.close();
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<SinkState>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sink {
    pub fn start(script: Script) -> Sink {
        Self::start_on(0, script)
    }

    pub fn start_on(port: u16, script: Script) -> Sink {
        Self::start_at("127.0.0.1", port, script)
    }

    /// On another loopback address (127.0.0.2, ...), e.g. a second MX.
    pub fn start_at(ip: &str, port: u16, script: Script) -> Sink {
        let listener = TcpListener::bind((ip, port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SinkState {
            script,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        tcp.set_nonblocking(false).unwrap();
                        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        let st = st.clone();
                        thread::spawn(move || {
                            let _ = sink_session(tcp, st);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Sink {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn messages(&self) -> Vec<Received> {
        self.state.lock().unwrap().messages.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().messages.len()
    }

    pub fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        wait_until(secs, || self.count() >= n);
        self.messages()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sink_session(tcp: TcpStream, st: Arc<Mutex<SinkState>>) -> std::io::Result<()> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut open = {
        let mut s = st.lock().unwrap();
        s.connections += 1;
        s.open_sessions += 1;
        s.peak_sessions = s.peak_sessions.max(s.open_sessions);
        Open(st.clone(), false)
    };
    let refuse = {
        let s = st.lock().unwrap();
        s.script.max_sessions.is_some_and(|m| s.open_sessions > m)
    };
    if refuse {
        // Not one of the allowed sessions: it does not count as open.
        open.close();
        st.lock().unwrap().sessions_refused += 1;
        let mut t = tcp;
        t.write_all(b"421 4.7.0 too many sessions\r\n")?;
        return Ok(());
    }
    let pipelining = st.lock().unwrap().script.pipelining;
    let (implicit, starttls, auth, smtputf8) = {
        let s = st.lock().unwrap();
        (
            s.script.implicit_tls.clone(),
            s.script.starttls.clone(),
            s.script.auth.clone(),
            s.script.smtputf8,
        )
    };
    let mut tls = implicit.is_some();
    let stream: Box<dyn Io> = match implicit {
        Some(cfg) => Box::new(rustls::StreamOwned::new(
            rustls::ServerConnection::new(cfg).unwrap(),
            tcp.try_clone()?,
        )),
        None => Box::new(tcp.try_clone()?),
    };
    let mut rd = BufReader::new(stream);
    let mut authed: Option<String> = None;
    let mut from = String::new();
    let mut mail_params = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    macro_rules! say {
        ($($t:tt)*) => {{ let s = format!($($t)*); rd.get_mut().write_all(s.as_bytes())?; rd.get_mut().flush()?; }};
    }
    let greeting = st.lock().unwrap().script.greeting.clone();
    match greeting {
        Some(g) if !g.starts_with("220") => {
            say!("{g}\r\n");
            return Ok(());
        }
        Some(g) => say!("{g}\r\n"),
        None => say!("220 sink.test ESMTP\r\n"),
    }
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let up = cmd.to_ascii_uppercase();
        if up.starts_with("EHLO") {
            let mut caps = vec![
                "sink.test".to_string(),
                "8BITMIME".into(),
                "SIZE 100000000".into(),
            ];
            if starttls.is_some() && !tls {
                caps.push("STARTTLS".into());
            }
            if auth.is_some() {
                caps.push("AUTH PLAIN LOGIN".into());
            }
            if smtputf8 {
                caps.push("SMTPUTF8".into());
            }
            if pipelining {
                caps.push("PIPELINING".into());
            }
            let n = caps.len();
            let mut out = String::new();
            for (i, c) in caps.iter().enumerate() {
                out.push_str(&format!(
                    "250{}{}\r\n",
                    if i + 1 == n { ' ' } else { '-' },
                    c
                ));
            }
            say!("{out}");
        } else if up == "STARTTLS" {
            let Some(cfg) = starttls.clone() else {
                say!("502 no\r\n");
                continue;
            };
            say!("220 go ahead\r\n");
            let conn = rustls::ServerConnection::new(cfg).unwrap();
            rd = BufReader::new(Box::new(rustls::StreamOwned::new(conn, tcp.try_clone()?)));
            tls = true;
        } else if up.starts_with("AUTH PLAIN") || up.starts_with("AUTH LOGIN") {
            let (user, pass) = if up.starts_with("AUTH PLAIN") {
                let arg = cmd.get(11..).unwrap_or("").trim().to_string();
                let arg = if arg.is_empty() {
                    say!("334 \r\n");
                    line.clear();
                    rd.read_line(&mut line)?;
                    line.trim().to_string()
                } else {
                    arg
                };
                let raw = b64.decode(arg).unwrap_or_default();
                let parts: Vec<String> = raw
                    .split(|&b| b == 0)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                (
                    parts.get(1).cloned().unwrap_or_default(),
                    parts.get(2).cloned().unwrap_or_default(),
                )
            } else {
                say!("334 VXNlcm5hbWU6\r\n");
                line.clear();
                rd.read_line(&mut line)?;
                let u = String::from_utf8_lossy(&b64.decode(line.trim()).unwrap_or_default())
                    .into_owned();
                say!("334 UGFzc3dvcmQ6\r\n");
                line.clear();
                rd.read_line(&mut line)?;
                let p = String::from_utf8_lossy(&b64.decode(line.trim()).unwrap_or_default())
                    .into_owned();
                (u, p)
            };
            let want = st.lock().unwrap().script.auth.clone();
            if want == Some((user.clone(), pass)) {
                authed = Some(user);
                say!("235 2.7.0 ok\r\n");
            } else {
                st.lock().unwrap().auth_failures += 1;
                say!("535 5.7.8 bad credentials\r\n");
            }
        } else if up.starts_with("MAIL FROM:") {
            if !rd.buffer().is_empty() {
                st.lock().unwrap().pipelined += 1;
            }
            if !tls && st.lock().unwrap().script.require_tls {
                say!("530 5.7.0 Must issue a STARTTLS command first\r\n");
                continue;
            }
            if auth.is_some() && authed.is_none() {
                say!("530 5.7.0 auth required\r\n");
                continue;
            }
            let limited = {
                let mut s = st.lock().unwrap();
                let now = Instant::now();
                while s
                    .mail_times
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    s.mail_times.pop_front();
                }
                match s.script.rate_limit.clone() {
                    Some((n, reply)) if s.mail_times.len() >= n => {
                        s.rate_limited += 1;
                        Some(reply)
                    }
                    _ => {
                        s.mail_times.push_back(now);
                        None
                    }
                }
            };
            if let Some(reply) = limited {
                open.close();
                say!("{reply}\r\n");
                return Ok(());
            }
            let r = st.lock().unwrap().script.mail_replies.pop_front();
            let r = r.unwrap_or_else(|| "250 2.1.0 ok".into());
            if r.starts_with('2') {
                from = cmd[10..]
                    .split('>')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('<')
                    .to_string();
                mail_params = cmd[10..]
                    .split_once('>')
                    .map(|(_, p)| p.to_string())
                    .unwrap_or_default();
                rcpts.clear();
            }
            say!("{r}\r\n");
        } else if up.starts_with("RCPT TO:") {
            let addr = cmd[8..]
                .split('>')
                .next()
                .unwrap_or("")
                .trim_start_matches('<')
                .to_string();
            let r = {
                let mut s = st.lock().unwrap();
                s.rcpt_seen.push(addr.clone());
                s.script
                    .rcpt_replies
                    .iter()
                    .find(|(k, _)| addr.contains(k.as_str()))
                    .map(|(_, r)| r.clone())
            };
            let r = r.unwrap_or_else(|| "250 2.1.5 ok".into());
            if r.starts_with('2') {
                rcpts.push(addr);
            }
            say!("{r}\r\n");
        } else if up == "DATA" {
            say!("354 go\r\n");
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                rd.read_until(b'\n', &mut l)?;
                if l.is_empty() {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                if l.starts_with(b".") {
                    l.remove(0);
                }
                data.extend_from_slice(&l);
            }
            let (r, delay) = {
                let mut s = st.lock().unwrap();
                s.data_attempts += 1;
                (s.script.data_replies.pop_front(), s.script.data_delay)
            };
            if let Some(d) = delay {
                thread::sleep(d);
            }
            let r = r.unwrap_or_else(|| "250 2.0.0 ok: queued".into());
            if r == DROP {
                return Ok(());
            }
            if r.starts_with('2') {
                st.lock().unwrap().messages.push(Received {
                    mail_from: from.clone(),
                    mail_params: mail_params.clone(),
                    rcpts: rcpts.clone(),
                    data,
                    tls,
                    auth: authed.clone(),
                    at: Instant::now(),
                });
            }
            say!("{r}\r\n");
            let hang_up = st.lock().unwrap().script.hang_up_after_message.clone();
            if let Some(last) = hang_up {
                thread::sleep(Duration::from_millis(100));
                if !last.is_empty() {
                    say!("{last}\r\n");
                }
                open.close();
                let _ = tcp.shutdown(std::net::Shutdown::Both);
                st.lock().unwrap().hung_up += 1;
                return Ok(());
            }
        } else if up == "RSET" {
            rcpts.clear();
            say!("250 ok\r\n");
        } else if up == "QUIT" {
            open.close();
            say!("221 bye\r\n");
            return Ok(());
        } else if up == "NOOP" {
            say!("250 ok\r\n");
        } else {
            say!("502 unknown\r\n");
        }
    }
}

// ------------------------------------------------------------- herald ----

/// A running `herald serve` with its own directory and config.
pub struct Herald {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub smtp: SocketAddr,
    pub child: Option<Child>,
}

pub const BASE: &str = r#"
hostname = "relay.test"
[sender]
default_sender = "notifications@example.com"
bounce_address = "bounces@example.com"
"#;

impl Herald {
    /// Writes `BASE` + `extra` as the config (with `{smtp}` and `{dir}`
    /// replaced) and starts herald on it.
    pub fn start(extra: &str) -> Herald {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Herald {
        let config = dir.path().join("herald.toml");
        let mut h = Herald {
            dir,
            config,
            smtp: "127.0.0.1:0".parse().unwrap(),
            child: None,
        };
        // A port found free can be taken by another process before herald
        // binds it: then another one.
        for _ in 0..3 {
            let port = free_port();
            h.smtp = format!("127.0.0.1:{port}").parse().unwrap();
            let mut text = format!("{BASE}{extra}");
            if !extra.contains("[listen]") {
                text.push_str("\n[listen]\nsmtp = [\"{smtp}\"]\n");
            }
            let text = text
                .replace("{smtp}", &h.smtp.to_string())
                .replace("{dir}", &h.dir.path().display().to_string());
            std::fs::write(&h.config, text).unwrap();
            match h.try_spawn() {
                Ok(()) => return h,
                Err(log) if log.contains(&format!("cannot listen on {}", h.smtp)) => continue,
                Err(log) => panic!("herald did not start:\n{log}"),
            }
        }
        panic!("herald did not start:\n{}", h.log());
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("herald.log")).unwrap_or_default()
    }

    /// (Re)starts the process on the same config and data.
    pub fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("herald did not start:\n{log}");
        }
    }

    /// Starts the process and waits until it says "herald started" (every
    /// listener bound, the control socket served); its log when it exits
    /// first or takes over 20 s.
    fn try_spawn(&mut self) -> Result<(), String> {
        let started = |h: &Herald| h.log().matches("herald started").count();
        let before = started(self);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("herald.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("HERALD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let mut exited = false;
        let up = wait_until(20, || {
            exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            exited || started(self) > before
        });
        if up && !exited {
            return Ok(());
        }
        self.kill9();
        Err(self.log())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit; returns the exit status.
    /// Waits up to `secs` for the process to exit by itself.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(40);
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn client(&self) -> Client {
        Client::connect(self.smtp)
    }

    /// Runs `herald ARGS --config <this config>` and returns (code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a client subcommand that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "herald {args:?}: {out}{err}");
        out
    }

    /// `herald history --rcpt RCPT --json`, oldest first.
    pub fn events(&self, rcpt: &str) -> Vec<serde_json::Value> {
        json_lines(&self.ok(&["history", "--rcpt", rcpt, "--json"]))
    }

    /// Whether RCPT's history has an event of this kind.
    pub fn has_event(&self, rcpt: &str, event: &str) -> bool {
        self.events(rcpt).iter().any(|e| e["event"] == event)
    }
}

/// Parses JSON Lines (the CLI's --json output).
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The queue id at the end of a `250 2.0.0 Ok: queued as ID` reply.
pub fn queue_id(reply: &str) -> String {
    reply.trim().rsplit(' ').next().unwrap().to_string()
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Upstream section pointing at a sink.
pub fn upstream(port: u16, security: &str, extra: &str) -> String {
    format!(
        "\n[delivery]\nupstream = \"up\"\nretry_schedule = [\"1s\"]\n[upstreams.up]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"{security}\"\n{extra}\n"
    )
}

// ------------------------------------------------------------- client ----

/// A line-level SMTP client: exact bytes in, replies out.
pub struct Client {
    rd: BufReader<Box<dyn Io>>,
    tcp: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).unwrap())
    }

    /// A client on a connection already open (say, one that began with a
    /// PROXY header): reads the greeting, which must be 220.
    pub fn over(tcp: TcpStream) -> Client {
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client {
            rd: BufReader::new(Box::new(tcp.try_clone().unwrap())),
            tcp,
        };
        let (code, _) = c.read_reply();
        assert_eq!(code, 220);
        c
    }

    /// Connects with TLS from the first byte.
    pub fn connect_tls(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Client {
        Client::over_tls(TcpStream::connect(addr).unwrap(), cfg)
    }

    /// TLS from the next byte on an open connection, then the greeting.
    pub fn over_tls(tcp: TcpStream, cfg: Arc<rustls::ClientConfig>) -> Client {
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        let s = rustls::StreamOwned::new(conn, tcp.try_clone().unwrap());
        let mut c = Client {
            rd: BufReader::new(Box::new(s)),
            tcp,
        };
        let (code, _) = c.read_reply();
        assert_eq!(code, 220);
        c
    }

    pub fn starttls(&mut self, cfg: Arc<rustls::ClientConfig>) {
        let (code, text) = self.cmd("STARTTLS");
        assert_eq!(code, 220, "{text}");
        let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        let s = rustls::StreamOwned::new(conn, self.tcp.try_clone().unwrap());
        self.rd = BufReader::new(Box::new(s));
    }

    /// Reads one (possibly multi-line) reply: (code, all text lines).
    pub fn read_reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.rd.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                return (0, text);
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (code, text);
            }
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.rd.get_mut().write_all(bytes).unwrap();
        self.rd.get_mut().flush().unwrap();
    }

    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.read_reply()
    }

    pub fn ehlo(&mut self) -> String {
        let (code, text) = self.cmd("EHLO client.test");
        assert_eq!(code, 250, "{text}");
        text
    }

    /// A whole transaction; returns the reply to the end of DATA (or the
    /// first refusal).
    pub fn send(&mut self, from: &str, rcpts: &[&str], message: &str) -> (u16, String) {
        self.send_bytes(from, rcpts, message.as_bytes())
    }

    /// [`Client::send`] of a message that may not be UTF-8 (LF or CRLF
    /// line ends, sent as CRLF, dot-stuffed).
    pub fn send_bytes(&mut self, from: &str, rcpts: &[&str], message: &[u8]) -> (u16, String) {
        let (c, t) = self.cmd(&format!("MAIL FROM:<{from}>"));
        if c != 250 {
            return (c, t);
        }
        for r in rcpts {
            let (c, t) = self.cmd(&format!("RCPT TO:<{r}>"));
            if c != 250 {
                return (c, t);
            }
        }
        let (c, t) = self.cmd("DATA");
        if c != 354 {
            return (c, t);
        }
        let mut body = Vec::with_capacity(message.len() + 1024);
        for line in message.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            // dot-stuff
            if line.first() == Some(&b'.') {
                body.push(b'.');
            }
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\n");
        }
        // The split leaves an empty last piece after a final line end.
        if message.ends_with(b"\n") {
            body.truncate(body.len() - 2);
        }
        self.send_raw(&body);
        self.send_raw(b".\r\n");
        self.read_reply()
    }
}

/// A small message with a unique subject.
pub fn message(subject: &str) -> String {
    format!(
        "From: Claire <claire@customer.test>\nTo: louise@dest.test\nSubject: {subject}\n\nHello,\nyour file is ready.\n"
    )
}

// ---------------------------------------------------------------- dns ----

// ------------------------------------------------------ outside tools ----

/// The interpreter of the Python test helpers (tests/requirements.txt): the
/// virtual environment that `./test` sets up, named by `HERALD_TEST_PYTHON`,
/// else `.venv/bin/python` in this repo. The one place that names it; run it
/// with `tool(python())`.
pub fn python() -> PathBuf {
    match std::env::var_os("HERALD_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
    }
}

/// Runs `tests/NAME` (a Python test script) with `args` in the venv's
/// Python; whether it succeeded, and what it printed.
pub fn python_script(name: &str, args: &[&str]) -> (bool, String) {
    let out = tool(python())
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(name),
        )
        .args(args)
        .output()
        .expect("python");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A `Command` for an outside tool (a name looked up on `PATH`, such as
/// `swaks`, or a path such as `python()`). A missing one fails the test with
/// the command that installs it.
pub fn tool(program: impl AsRef<Path>) -> Command {
    let program = program.as_ref();
    let found = if program.components().count() > 1 {
        is_executable(program)
    } else {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|d| is_executable(&d.join(program)))
        })
    };
    assert!(
        found,
        "{} is missing: run ./test (it installs what the tests need)",
        program.display()
    );
    Command::new(program)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The Python DNS stub (`tests/dns_server.py`) serving `zone` on a free
/// loopback port; stopped when dropped.
pub struct Dns {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Dns {
    pub fn start(zone: &[(&str, &str, &str)]) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        let zone_file = dir.path().join("zone.json");
        let json: Vec<[&str; 3]> = zone.iter().map(|(a, b, c)| [*a, *b, *c]).collect();
        std::fs::write(&zone_file, serde_json::to_string(&json).unwrap()).unwrap();
        let port = free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dns_server.py");
        let mut child = tool(python())
            .arg(script)
            .arg(port.to_string())
            .arg(&zone_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "dns_server.py did not start (its modules come from tests/requirements.txt: run ./test)"
        );
        Dns {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Verifies the DKIM signature of `msg` with dkimpy (tests/dkim_verify.py),
/// serving `records` (name, TXT) instead of DNS: Ok("pass d=.. s=.. a=..")
/// or Err(what it said).
pub fn dkimpy(msg: &[u8], records: &[(String, String)]) -> Result<String, String> {
    dkimpy_all(&[msg.to_vec()], records).remove(0)
}

/// [`dkimpy`] for many messages in one run of the verifier.
pub fn dkimpy_all(msgs: &[Vec<u8>], records: &[(String, String)]) -> Vec<Result<String, String>> {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dkim_verify.py");
    let mut cmd = tool(python());
    cmd.arg(script);
    for (i, m) in msgs.iter().enumerate() {
        let path = dir.path().join(format!("{i}.eml"));
        std::fs::write(&path, m).unwrap();
        cmd.arg(path);
    }
    for (n, r) in records {
        cmd.arg(format!("{n}={r}"));
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    (0..msgs.len())
        .map(|i| match lines.get(i) {
            Some(l) if l.starts_with("pass") => Ok(l.to_string()),
            Some(l) => Err(format!("{l}{stderr}")),
            None => Err(format!("no verdict: {stdout}{stderr}")),
        })
        .collect()
}

/// The decoded content of every leaf part of `msg`, read by Python's email
/// package (tests/mime_parts.py): (content type, bytes), in order.
pub fn mime_parts(msg: &[u8]) -> Vec<(String, Vec<u8>)> {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), msg).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mime_parts.py");
    let out = tool(python()).arg(script).arg(f.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let hex = v["hex"].as_str().unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (v["type"].as_str().unwrap().to_string(), bytes)
        })
        .collect()
}

/// The length of the longest line of `data`, CRLF excluded.
pub fn longest_line(data: &[u8]) -> usize {
    data.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l).len())
        .max()
        .unwrap_or(0)
}

// ------------------------------------------------------------- config ----

/// Runs `herald dkim-keygen` (checking the key file is mode 0600) and returns (DNS name, record) from its output.
pub fn dkim_keygen(
    dir: &Path,
    domain: &str,
    selector: &str,
    alg: &str,
    file: &str,
) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "dkim-keygen",
            "--domain",
            domain,
            "--selector",
            selector,
            "--algorithm",
            alg,
            "--out",
        ])
        .arg(dir.join(file))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(file))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let line = stdout.lines().find(|l| l.contains(" IN TXT ")).unwrap();
    let name = line
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('.')
        .to_string();
    assert_eq!(name, format!("{selector}._domainkey.{domain}"));
    let parts: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
    assert!(parts.iter().all(|p| p.len() <= 255));
    (name, parts.concat())
}

/// Writes `config` as `dir/herald.toml`, runs `herald serve` on it, expects
/// it to refuse to start, and returns what it said.
pub fn serve_fails(dir: &Path, config: &str) -> String {
    let cfg = dir.join("herald.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "herald started on a bad config");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// --------------------------------------------------------------- http ----

/// A plain HTTP/1.1 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    http(addr, "GET", path, None, "")
}

/// One HTTP/1.1 request, with a bearer token when given: (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: test-mua\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let code = raw
        .get(9..12)
        .and_then(|c| String::from_utf8_lossy(c).parse().ok())
        .unwrap_or(0);
    let body = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| raw[p + 4..].to_vec())
        .unwrap_or_default();
    (code, body)
}

/// One API request: (status, JSON body; a body that is not JSON as a
/// string).
pub fn api_call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let (code, raw) = http(addr, method, path, token, body);
    let text = String::from_utf8_lossy(&raw).into_owned();
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// A herald signing for example.com (RSA) and ed.example (Ed25519, mail
/// from edcustomer.test), relaying to `sink`. Returns it with both DKIM
/// records.
pub fn signing_herald(sink: &Sink) -> (Herald, Vec<(String, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let rsa = dkim_keygen(dir.path(), "example.com", "herald", "rsa", "rsa.pem");
    let ed = dkim_keygen(dir.path(), "ed.example", "ed1", "ed25519", "ed.pem");
    let h = Herald::start_in(
        dir,
        &format!(
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"herald\"\nprivate_key = \"rsa.pem\"\n\
             [[dkim]]\ndomain = \"ed.example\"\nselector = \"ed1\"\nprivate_key = \"ed.pem\"\n\
             [[routes]]\nsender_domain = \"edcustomer.test\"\nupstream = \"up\"\ndefault_sender = \"notify@ed.example\"\n{}",
            upstream(sink.port(), "none", "")
        ),
    );
    (h, vec![rsa, ed])
}

/// Runs the herald binary with `args` (a local command such as check-config,
/// check-dns or probe): its exit code and stdout followed by stderr.
pub fn run_herald<I, S>(args: I) -> (i32, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// -------------------------------------------------------------- redis ----

/// A `redis-server` of the test's own (Debian's, installed by `./test`)
/// on a free loopback port, without persistence; killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.spawn();
        r
    }

    /// (Re)starts the server on the same port, empty.
    pub fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &self.dir.path().display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server; ./test installs it)");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(10, || redis_cmd(port, &["PING"])
                .is_some_and(|r| r.contains("PONG"))),
            "redis-server did not start on port {port}"
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL): everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One command; the raw RESP reply.
    pub fn cmd(&self, args: &[&str]) -> String {
        redis_cmd(self.port, args).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends one command in RESP; the raw reply (None: no connection).
pub fn redis_cmd(port: u16, args: &[&str]) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}
