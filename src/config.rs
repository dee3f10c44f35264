//! Configuration: the TOML file of `DESIGN.md`, parsed once into typed structs.
//!
//! Parsing happens in two steps. serde reads the file into `raw::*` structs
//! that mirror the TOML (strings for durations, paths relative to the file);
//! `Config::from_raw` then checks every value and builds the typed `Config`
//! that the rest of the program uses. Every error names the key it is about,
//! so `herald check-config` can print `delivery.max_age: ...` and a sysadmin
//! knows where to look. Nothing downstream re-parses strings.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// Where the configuration comes from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/herald/herald.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{key}: {problem}")]
    Value { key: String, problem: String },
}

fn bad(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        key: key.into(),
        problem: problem.into(),
    }
}

/// A secret read from a file or the config: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from, and its directory (relative paths' base).
    pub path: PathBuf,
    pub hostname: String,
    pub listen: Listen,
    pub storage: Storage,
    pub sender: Sender,
    pub dkim: Vec<DkimKey>,
    pub delivery: Delivery,
    pub upstreams: BTreeMap<String, Upstream>,
    pub routes: Vec<Route>,
    pub tracking: Tracking,
    pub control: Control,
    pub dns: Dns,
    pub webhooks: Vec<Webhook>,
    pub api: Api,
    /// `[bounces]`: signed return paths and the intake of what comes back.
    pub bounces: Option<Bounces>,
    /// `[cluster]`: the state several nodes share through Redis.
    pub cluster: Option<Cluster>,
    /// `[[tenants]]`: the customers of the platform, each a unit.
    pub tenants: Vec<Tenant>,
}

/// One `[[tenants]]` entry: a customer of the platform. Its mail is
/// decided once, at reception: an AUTH user listed here, else an original
/// sender (From, else MAIL FROM) in one of its domains, else the
/// `[[routes]]` entry that names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub name: String,
    /// Lowercased.
    pub sender_domains: Vec<String>,
    pub auth_users: Vec<String>,
    /// Messages per period across the tenant's routes; None = no quota.
    pub max_rate: Option<Rate>,
}

/// `[cluster]`: suppression, pacing, pauses, history and reports shared
/// by every node through one Redis; each node's spool stays its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// `redis://` or `rediss://` URL (a password in it is a secret too).
    pub redis: Secret,
    pub redis_password: Option<Secret>,
    /// This node's name in events, `status` and the console.
    pub node: String,
    /// Before every key: several clusters may share one Redis.
    pub key_prefix: String,
    /// Per Redis call; past it the node degrades.
    pub timeout: Duration,
    /// With Redis away: go on delivering against the local mirror
    /// (false), or hold delivery until it is back (true).
    pub hold_when_down: bool,
}

/// `[bounces]`: each recipient's envelope sender is `b-TOKEN@domain`, and
/// the listener takes the delivery reports and complaints sent there.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounces {
    pub domain: String,
    pub listen: Vec<SocketAddr>,
    /// HMAC key of the return-path tokens and of `X-Herald-Ref:`.
    pub secret: Secret,
    pub max_size: usize,
    /// The feedback-loop address registered with mailbox providers.
    pub complaint_address: String,
    /// Where receivers send DMARC aggregate reports (`rua=mailto:...`).
    pub dmarc_address: String,
    /// Where receivers send TLS reports (`TLSRPT rua=mailto:...`).
    pub tlsrpt_address: String,
    /// How long the figures of aggregate and TLS reports are kept.
    pub aggregate_retention: Duration,
    /// A DMARC report in which herald's own mail passed less than this
    /// (percent) makes a `dmarc_failing` event; 0: never.
    pub dmarc_alert_below: f64,
    /// Bytes of reports kept on disk at most (bodies and records); the
    /// oldest handled reports go first, and when only unhandled ones are
    /// left a new report gets 452.
    pub max_stored: u64,
    /// Connections to the intake in all, and from one client address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Reports (transactions) one client may start: an IPv4 address, or
    /// an IPv6 /64. None: no limit.
    pub max_rate_per_ip: Option<Rate>,
}

/// `[bounces] max_stored` by default: 256 MiB.
pub const DEFAULT_MAX_STORED: i64 = 256 * 1024 * 1024;

/// Events a webhook may ask for (DESIGN.md's events, less `received`
/// and `deferred`, which would flood a platform).
pub const WEBHOOK_EVENTS: [&str; 11] = [
    "delivered",
    "bounced",
    "complained",
    "opened",
    "suppressed",
    "expired",
    "rejected",
    "cancelled",
    "deferred",
    "delayed",
    "dmarc_failing",
];

/// One `[[webhooks]]` endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// `name`, else the URL: what `herald webhooks test NAME` takes.
    pub name: String,
    pub url: String,
    /// HMAC key (at least 16 bytes).
    pub secret: Secret,
    pub events: Vec<String>,
    /// Glob patterns (`*`) on `X-Herald-Tag`; empty: every message.
    pub tags: Vec<String>,
    /// Only these tenants' mail; empty: every message.
    pub tenants: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl Webhook {
    /// Whether an event of this kind, for mail with this tag, goes here.
    pub fn wants(&self, event: &str, tag: Option<&str>, tenant: Option<&str>) -> bool {
        self.events.iter().any(|e| e == event)
            && (self.tags.is_empty() || tag.is_some_and(|t| self.tags.iter().any(|p| glob(p, t))))
            && (self.tenants.is_empty()
                || tenant.is_some_and(|t| self.tenants.iter().any(|n| n == t)))
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob(rest, &tail[i..]))
        }
    }
}

/// `[api]`: the HTTP query API, off unless `listen` is set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Api {
    pub listen: Option<SocketAddr>,
    pub tokens_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub smtp: Vec<SocketAddr>,
    pub smtps: Vec<SocketAddr>,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// Sessions one client address may hold at once.
    pub max_connections_per_ip: usize,
    /// How long a session may go without completing a transaction.
    pub session_timeout: Duration,
    pub allowed_networks: Vec<IpNet>,
    /// Load balancers whose connections begin with a PROXY v1/v2 header
    /// naming the real client (issue 12); empty: none.
    pub proxy_protocol_from: Vec<IpNet>,
    pub tls: Option<TlsFiles>,
    pub users: Vec<User>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Storage {
    pub path: PathBuf,
    pub history_retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sender {
    pub default_sender: String,
    pub always_default_sender: bool,
    pub bounce_address: String,
    /// `bounce_address` was written in the config; otherwise a route's own
    /// `default_sender` is its envelope sender too.
    pub bounce_explicit: bool,
    pub reply_to_original: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    pub private_key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Name in `upstreams`, or "mx" for direct delivery.
    pub upstream: String,
    pub send_delay: Duration,
    pub retry_schedule: Vec<Duration>,
    pub max_age: Duration,
    pub concurrency: usize,
    pub suppress_after_bounces: u32,
    /// `None` when "0s": automatic suppressions never lift.
    pub suppression_expiry: Option<Duration>,
    pub mx_port: u16,
    /// Sessions at once to one destination site in direct MX delivery.
    pub mx_max_connections: usize,
    /// Messages per period to one MX site; None = no limit.
    pub mx_max_rate: Option<Rate>,
}

/// A message rate, "10/s", "30/m", "5000/h": a token bucket that holds
/// `burst` tokens (by default `count`: after an idle spell a whole
/// period's allowance may go at once; `max_burst` lowers it) and refills
/// `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Parses "10/s", "30/m", "5000/h"; "0" is no limit (None).
pub fn parse_rate(key: &str, s: &str) -> Result<Option<Rate>, ConfigError> {
    let t = s.trim();
    if t == "0" {
        return Ok(None);
    }
    let problem = || {
        bad(
            key,
            format!(
                "{s:?} is not a rate: write e.g. \"10/s\", \"30/m\", \"5000/h\" (\"0\" = no limit)"
            ),
        )
    };
    let (n, unit) = t.split_once('/').ok_or_else(problem)?;
    let count: u32 = n.trim().parse().map_err(|_| problem())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(problem()),
    };
    if count == 0 {
        return Ok(None);
    }
    Ok(Some(Rate {
        count,
        per,
        burst: count,
    }))
}

/// `rate` with the bucket of `max_burst` (`key`), when given.
fn with_burst(
    key: &str,
    rate: Option<Rate>,
    burst: Option<i64>,
) -> Result<Option<Rate>, ConfigError> {
    match (rate, burst) {
        (_, None) => Ok(rate),
        (None, Some(_)) => Err(bad(key, "goes with a rate: set the max_rate beside it too")),
        (Some(r), Some(b)) => {
            let b = positive(key, Some(b), 1, r.count as i64)? as u32;
            Ok(Some(Rate { burst: b, ..r }))
        }
    }
}

impl Delivery {
    /// The first back-off of a destination that asked herald to slow down
    /// (a `throttle` reply, or a smart host refusing connections): the
    /// first value of `retry_schedule`. It doubles with every throttle in
    /// a row, up to [`Delivery::throttle_backoff_max`].
    pub fn throttle_backoff(&self) -> Duration {
        self.retry_schedule[0]
    }

    /// The longest back-off: 30 times the first (1 min -> 30 min).
    pub fn throttle_backoff_max(&self) -> Duration {
        self.retry_schedule[0] * 30
    }

    /// Wait before attempt number `attempts + 1`, after `attempts` failures.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.retry_schedule.len() - 1);
        self.retry_schedule[i]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Implicit TLS from the first byte (port 465).
    Tls,
    /// Plain connection upgraded with STARTTLS; refusing to go on without it.
    StartTls,
    /// No TLS at all (a relay on the same host or a private network).
    None,
}

impl fmt::Display for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::Tls => "tls",
            Security::StartTls => "starttls",
            Security::None => "none",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub tls_verify: bool,
    /// Sessions at once to this upstream (default: delivery.concurrency).
    pub max_connections: usize,
    /// Messages per period; None = no limit.
    pub max_rate: Option<Rate>,
    /// Messages per session before herald opens a fresh one; None = no limit.
    pub max_messages_per_connection: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub sender_domain: Option<String>,
    pub auth_user: Option<String>,
    pub upstream: String,
    pub default_sender: Option<String>,
    /// The tenant whose mail this is (when neither its AUTH user nor its
    /// sender domain says).
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tracking {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub base_url: String,
    pub secret_file: Option<PathBuf>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    pub socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dns {
    pub nameservers: Vec<SocketAddr>,
}

/// The TOML as written, before checking. Unknown keys are errors.
mod raw {
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Config {
        pub hostname: Option<String>,
        #[serde(default)]
        pub listen: Listen,
        #[serde(default)]
        pub storage: Storage,
        #[serde(default)]
        pub sender: Sender,
        #[serde(default)]
        pub dkim: Vec<Dkim>,
        #[serde(default)]
        pub delivery: Delivery,
        #[serde(default)]
        pub upstreams: BTreeMap<String, Upstream>,
        #[serde(default)]
        pub routes: Vec<Route>,
        #[serde(default)]
        pub tracking: Tracking,
        #[serde(default)]
        pub control: Control,
        #[serde(default)]
        pub dns: Dns,
        #[serde(default)]
        pub webhooks: Vec<Webhook>,
        #[serde(default)]
        pub api: Api,
        pub bounces: Option<Bounces>,
        pub cluster: Option<Cluster>,
        #[serde(default)]
        pub tenants: Vec<Tenant>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tenant {
        pub name: String,
        #[serde(default)]
        pub sender_domains: Vec<String>,
        #[serde(default)]
        pub auth_users: Vec<String>,
        pub max_rate: Option<String>,
        pub max_burst: Option<i64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Cluster {
        pub redis: String,
        pub redis_password_file: Option<String>,
        pub node: Option<String>,
        pub key_prefix: Option<String>,
        pub timeout: Option<String>,
        pub on_redis_down: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Bounces {
        pub domain: Option<String>,
        pub listen: Option<Vec<String>>,
        pub secret_file: Option<String>,
        pub max_size: Option<i64>,
        pub complaint_address: Option<String>,
        pub dmarc_address: Option<String>,
        pub tlsrpt_address: Option<String>,
        pub aggregate_retention: Option<String>,
        pub dmarc_alert_below: Option<f64>,
        pub max_stored: Option<i64>,
        pub max_connections: Option<i64>,
        pub max_connections_per_ip: Option<i64>,
        pub max_rate_per_ip: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Webhook {
        pub name: Option<String>,
        pub url: String,
        pub secret_file: String,
        pub events: Option<Vec<String>>,
        #[serde(default)]
        pub tags: Vec<String>,
        #[serde(default)]
        pub tenants: Vec<String>,
        pub ca_file: Option<String>,
        pub timeout: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Api {
        pub listen: Option<String>,
        pub tokens_file: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Listen {
        pub smtp: Option<Vec<String>>,
        pub smtps: Option<Vec<String>>,
        pub max_message_size: Option<i64>,
        pub max_recipients: Option<i64>,
        pub max_connections: Option<i64>,
        pub max_connections_per_ip: Option<i64>,
        pub session_timeout: Option<String>,
        pub allowed_networks: Option<Vec<String>>,
        #[serde(default)]
        pub proxy_protocol_from: Vec<String>,
        pub tls: Option<Tls>,
        #[serde(default)]
        pub users: Vec<User>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub cert: String,
        pub key: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct User {
        pub username: String,
        pub password: Option<String>,
        pub password_file: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Storage {
        pub path: Option<String>,
        pub history_retention: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Sender {
        pub default_sender: Option<String>,
        pub always_default_sender: Option<bool>,
        pub bounce_address: Option<String>,
        pub reply_to_original: Option<bool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Dkim {
        pub domain: String,
        pub selector: String,
        pub private_key: String,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Delivery {
        pub upstream: Option<String>,
        pub send_delay: Option<String>,
        pub retry_schedule: Option<Vec<String>>,
        pub max_age: Option<String>,
        pub concurrency: Option<i64>,
        pub suppress_after_bounces: Option<i64>,
        pub suppression_expiry: Option<String>,
        pub mx_port: Option<i64>,
        pub mx_max_connections: Option<i64>,
        pub mx_max_rate: Option<String>,
        pub mx_max_burst: Option<i64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Upstream {
        pub host: String,
        pub port: Option<i64>,
        pub security: Option<String>,
        pub username: Option<String>,
        pub password_file: Option<String>,
        pub ca_file: Option<String>,
        pub tls_verify: Option<bool>,
        pub max_connections: Option<i64>,
        pub max_rate: Option<String>,
        pub max_burst: Option<i64>,
        pub max_messages_per_connection: Option<i64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub sender_domain: Option<String>,
        pub auth_user: Option<String>,
        pub upstream: String,
        pub default_sender: Option<String>,
        pub tenant: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Tracking {
        pub enabled: Option<bool>,
        pub listen: Option<String>,
        pub base_url: Option<String>,
        pub secret_file: Option<String>,
        #[serde(default)]
        pub trusted_proxies: Vec<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Control {
        pub socket: Option<String>,
        pub metrics_listen: Option<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Dns {
        #[serde(default)]
        pub nameservers: Vec<String>,
    }
}

/// A duration for people: humantime's "7days 2h" with a space before the
/// word units ("7 days 2h", "1 month").
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d)
        .to_string()
        .split(' ')
        .map(|part| match part.find(|c: char| c.is_ascii_alphabetic()) {
            Some(i) if part[i..].len() > 2 => format!("{} {}", &part[..i], &part[i..]),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses "30s", "5m", "2h", "7d", "1h30m"; "0s" is zero.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        bad(
            key,
            format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"2h\", \"7d\""),
        )
    })
}

/// Networks such as "10.0.0.0/8" or single addresses.
fn networks(key: &str, list: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    bad(
                        key,
                        format!("{s:?} is not a network such as \"10.0.0.0/8\""),
                    )
                })
        })
        .collect()
}

fn positive(key: &str, v: Option<i64>, default: i64, max: i64) -> Result<i64, ConfigError> {
    let v = v.unwrap_or(default);
    if v < 1 || v > max {
        return Err(bad(key, format!("{v} is out of range (1..={max})")));
    }
    Ok(v)
}

fn socket_addrs(key: &str, v: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    v.iter()
        .map(|s| {
            s.parse::<SocketAddr>().map_err(|_| {
                bad(
                    key,
                    format!(
                        "{s:?} is not an address:port such as \"127.0.0.1:2525\" or \"[::1]:2525\""
                    ),
                )
            })
        })
        .collect()
}

/// A plain `local@domain` address, as used for senders in the config.
pub fn check_address(key: &str, s: &str) -> Result<String, ConfigError> {
    let s = s.trim();
    match s.rsplit_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && domain.contains('.')
                && !s.contains(|c: char| c.is_whitespace() || "<>\",;".contains(c)) =>
        {
            Ok(s.to_string())
        }
        _ => Err(bad(
            key,
            format!("{s:?} is not an address like user@example.com"),
        )),
    }
}

fn read_secret(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))?;
    // Secrets are text (passwords, and keys people can copy): a raw
    // binary key gets a way to make one.
    let text = String::from_utf8(bytes).map_err(|e| {
        bad(
            key,
            format!(
                "{} is binary ({} bytes), and herald reads a secret as one line of text: make one with `openssl rand -hex 32 > {}` (or `head -c 32 /dev/urandom | base64 > FILE`)",
                path.display(),
                e.as_bytes().len(),
                path.display()
            ),
        )
    })?;
    let text = text.trim_end_matches(['\r', '\n']).to_string();
    if text.is_empty() {
        return Err(bad(key, format!("{} is empty", path.display())));
    }
    Ok(Secret(text))
}

fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    "localhost".to_string()
}

impl Config {
    /// The path given by `--config`, else `$HERALD_CONFIG`, else the default.
    pub fn resolve_path(arg: Option<&Path>) -> PathBuf {
        if let Some(p) = arg {
            return p.to_path_buf();
        }
        match std::env::var_os("HERALD_CONFIG") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_PATH),
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::Config = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(format!("{}: {}", path.display(), e)))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_raw(raw, path, &dir)
    }

    fn from_raw(raw: raw::Config, path: &Path, dir: &Path) -> Result<Config, ConfigError> {
        let hostname = match raw.hostname {
            Some(h) if h.trim().is_empty() || h.contains(char::is_whitespace) => {
                return Err(bad("hostname", format!("{h:?} is not a host name")))
            }
            Some(h) => h,
            None => system_hostname(),
        };

        let concurrency =
            positive("delivery.concurrency", raw.delivery.concurrency, 16, 10_000)? as usize;
        let upstreams = upstreams(raw.upstreams, concurrency, dir)?;
        let cluster = raw
            .cluster
            .map(|c| cluster(c, &hostname, dir))
            .transpose()?;
        let tenants = tenants(raw.tenants)?;
        let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
        Ok(Config {
            path: path.to_path_buf(),
            hostname,
            listen: listen(raw.listen, dir)?,
            storage: storage(raw.storage, dir)?,
            sender: sender(raw.sender)?,
            dkim: dkim(raw.dkim, dir)?,
            delivery: delivery(raw.delivery, concurrency, &upstreams)?,
            routes: routes(raw.routes, &upstreams, &names)?,
            upstreams,
            tracking: tracking(raw.tracking, dir)?,
            control: control(raw.control, dir)?,
            dns: dns(raw.dns)?,
            webhooks: webhooks(raw.webhooks, dir, &names)?,
            api: api(raw.api, dir)?,
            bounces: bounces(raw.bounces, dir)?,
            cluster,
            tenants,
        })
    }

    /// Herald's DKIM keys as "domain/selector" (how DMARC reports name a
    /// signature that passed).
    pub fn dkim_keys(&self) -> std::collections::BTreeSet<String> {
        self.dkim
            .iter()
            .map(|k| format!("{}/{}", k.domain, k.selector))
            .collect()
    }

    /// The tenant of mail with this AUTH user, original sender domain and
    /// route: a tenant listing the AUTH user, else one listing the domain,
    /// else the route's. None: the platform's own mail.
    pub fn tenant_for<'a>(
        &'a self,
        sender_domain: Option<&str>,
        auth_user: Option<&str>,
        route: Option<&'a Route>,
    ) -> Option<&'a str> {
        let by_user = auth_user.and_then(|u| {
            self.tenants
                .iter()
                .find(|t| t.auth_users.iter().any(|a| a == u))
        });
        let by_domain = || {
            let d = sender_domain?.trim_end_matches('.').to_ascii_lowercase();
            self.tenants.iter().find(|t| t.sender_domains.contains(&d))
        };
        by_user
            .or_else(by_domain)
            .map(|t| t.name.as_str())
            .or_else(|| route.and_then(|r| r.tenant.as_deref()))
    }

    /// The `[[tenants]]` entry of this name.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// The upstreams that carry mail of tenant `name` only: its own
    /// routes' upstreams that no other route and not `[delivery]` uses.
    pub fn tenant_upstreams(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self
            .routes
            .iter()
            .filter(|r| r.tenant.as_deref() == Some(name))
        {
            let shared = self.delivery.upstream == r.upstream
                || self
                    .routes
                    .iter()
                    .any(|o| o.upstream == r.upstream && o.tenant.as_deref() != Some(name));
            if !shared && !out.contains(&r.upstream) {
                out.push(r.upstream.clone());
            }
        }
        out
    }

    /// The upstream for mail with this original sender domain and AUTH user.
    /// First matching `[[routes]]` entry wins; else `[delivery] upstream`.
    pub fn route_for(
        &self,
        sender_domain: Option<&str>,
        auth_user: Option<&str>,
    ) -> Option<&Route> {
        self.routes.iter().find(|r| {
            let dom_ok = match (&r.sender_domain, sender_domain) {
                (None, _) => true,
                (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            let user_ok = match (&r.auth_user, auth_user) {
                (None, _) => true,
                (Some(want), Some(got)) => want == got,
                (Some(_), None) => false,
            };
            dom_ok && user_ok
        })
    }
}

/// `[listen]`.
fn listen(l: raw::Listen, dir: &Path) -> Result<Listen, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let smtp = socket_addrs(
        "listen.smtp",
        &l.smtp.unwrap_or_else(|| vec!["127.0.0.1:2525".into()]),
    )?;
    let smtps = socket_addrs("listen.smtps", &l.smtps.unwrap_or_default())?;
    if smtp.is_empty() && smtps.is_empty() {
        return Err(bad("listen.smtp", "no listener: give at least one address"));
    }
    let tls = l.tls.map(|t| TlsFiles {
        cert: rel(&t.cert),
        key: rel(&t.key),
    });
    if !smtps.is_empty() && tls.is_none() {
        return Err(bad(
            "listen.smtps",
            "implicit-TLS listeners need listen.tls = { cert = ..., key = ... }",
        ));
    }
    if let Some(t) = &tls {
        for (k, p) in [("listen.tls.cert", &t.cert), ("listen.tls.key", &t.key)] {
            if !p.is_file() {
                return Err(bad(k, format!("{} does not exist", p.display())));
            }
        }
    }
    let allowed_networks = networks(
        "listen.allowed_networks",
        &l.allowed_networks
            .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]),
    )?;
    if let Some(n) = allowed_networks.iter().find(|n| n.prefix_len() == 0) {
        return Err(bad(
            "listen.allowed_networks",
            format!(
                "{n} lets every address relay without AUTH (an open relay); list the platform's networks, and let others log in with [[listen.users]]"
            ),
        ));
    }
    let mut users = Vec::new();
    for (i, u) in l.users.into_iter().enumerate() {
        let key = format!("listen.users[{i}]");
        if u.username.is_empty() || u.username.contains(char::is_whitespace) {
            return Err(bad(format!("{key}.username"), "must be a non-empty word"));
        }
        let password = match (u.password, u.password_file) {
            (Some(p), None) if !p.is_empty() => Secret(p),
            (None, Some(f)) => read_secret(&format!("{key}.password_file"), &rel(&f))?,
            _ => {
                return Err(bad(
                    key,
                    "give exactly one of password or password_file (non-empty)",
                ))
            }
        };
        users.push(User {
            username: u.username,
            password,
        });
    }
    let listen = Listen {
        smtp,
        smtps,
        max_message_size: positive(
            "listen.max_message_size",
            l.max_message_size,
            26_214_400,
            1 << 31,
        )? as usize,
        max_recipients: positive("listen.max_recipients", l.max_recipients, 100, 100_000)? as usize,
        max_connections: positive("listen.max_connections", l.max_connections, 256, 65_536)?
            as usize,
        max_connections_per_ip: positive(
            "listen.max_connections_per_ip",
            l.max_connections_per_ip,
            20,
            65_536,
        )? as usize,
        session_timeout: parse_duration(
            "listen.session_timeout",
            l.session_timeout.as_deref().unwrap_or("10m"),
        )?,
        allowed_networks,
        proxy_protocol_from: networks("listen.proxy_protocol_from", &l.proxy_protocol_from)?,
        tls,
        users,
    };

    if listen.session_timeout.is_zero() {
        return Err(bad("listen.session_timeout", "must be longer than 0s"));
    }
    Ok(listen)
}

/// `[storage]`.
fn storage(s: raw::Storage, dir: &Path) -> Result<Storage, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    if s.path.as_deref().is_some_and(|p| p.trim().is_empty()) {
        return Err(bad(
            "storage.path",
            "is empty; name the queue's directory, e.g. \"data\"",
        ));
    }
    let storage = Storage {
        path: rel(s.path.as_deref().unwrap_or("data")),
        history_retention: parse_duration(
            "storage.history_retention",
            s.history_retention.as_deref().unwrap_or("7d"),
        )?,
    };
    if storage.history_retention.is_zero() {
        return Err(bad("storage.history_retention", "must be longer than 0s"));
    }
    Ok(storage)
}

/// `[sender]`.
fn sender(se: raw::Sender) -> Result<Sender, ConfigError> {
    let default_sender = check_address(
        "sender.default_sender",
        se.default_sender.as_deref().ok_or_else(|| {
            bad(
                "sender.default_sender",
                "missing: the authorized address mail is sent from",
            )
        })?,
    )?;
    let bounce_explicit = se.bounce_address.is_some();
    let bounce_address = match se.bounce_address {
        Some(b) => check_address("sender.bounce_address", &b)?,
        None => default_sender.clone(),
    };
    let sender = Sender {
        default_sender,
        always_default_sender: se.always_default_sender.unwrap_or(true),
        bounce_address,
        bounce_explicit,
        reply_to_original: se.reply_to_original.unwrap_or(true),
    };
    Ok(sender)
}

/// `[[dkim]]`.
fn dkim(list: Vec<raw::Dkim>, dir: &Path) -> Result<Vec<DkimKey>, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let mut dkim = Vec::new();
    for (i, d) in list.into_iter().enumerate() {
        let key = format!("dkim[{i}]");
        if d.domain.is_empty() || !d.domain.contains('.') {
            return Err(bad(format!("{key}.domain"), "must be a domain name"));
        }
        if d.selector.is_empty() || d.selector.contains(char::is_whitespace) {
            return Err(bad(format!("{key}.selector"), "must be a non-empty word"));
        }
        let p = rel(&d.private_key);
        if !p.is_file() {
            return Err(bad(
                format!("{key}.private_key"),
                format!(
                    "{} does not exist (make one with herald dkim-keygen)",
                    p.display()
                ),
            ));
        }
        dkim.push(DkimKey {
            domain: d.domain.to_ascii_lowercase(),
            selector: d.selector,
            private_key: p,
        });
    }
    Ok(dkim)
}

/// `[upstreams.*]: their session limit defaults to delivery.concurrency`.
fn upstreams(
    raw: BTreeMap<String, raw::Upstream>,
    concurrency: usize,
    dir: &Path,
) -> Result<BTreeMap<String, Upstream>, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let mut upstreams = BTreeMap::new();
    for (name, u) in raw {
        let key = format!("upstreams.{name}");
        if name == "mx" {
            return Err(bad(key, "\"mx\" is reserved for direct delivery"));
        }
        if u.host.trim().is_empty() {
            return Err(bad(format!("{key}.host"), "must not be empty"));
        }
        let security = match u.security.as_deref().unwrap_or("starttls") {
            "tls" => Security::Tls,
            "starttls" => Security::StartTls,
            "none" => Security::None,
            other => {
                return Err(bad(
                    format!("{key}.security"),
                    format!("{other:?} is not one of \"tls\", \"starttls\", \"none\""),
                ))
            }
        };
        let default_port = match security {
            Security::Tls => 465,
            _ => 587,
        };
        let port = match u.port {
            None => default_port,
            Some(p) if (1..=65535).contains(&p) => p as u16,
            Some(p) => return Err(bad(format!("{key}.port"), format!("{p} is not a port"))),
        };
        let password = match &u.password_file {
            Some(f) => Some(read_secret(&format!("{key}.password_file"), &rel(f))?),
            None => None,
        };
        if u.username.is_some() != password.is_some() {
            return Err(bad(
                key,
                "username and password_file go together: give both or neither",
            ));
        }
        let ca_file = u.ca_file.as_deref().map(rel);
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                return Err(bad(
                    format!("{key}.ca_file"),
                    format!("{} does not exist", ca.display()),
                ));
            }
        }
        upstreams.insert(
            name.clone(),
            Upstream {
                name,
                host: u.host,
                port,
                security,
                username: u.username,
                password,
                ca_file,
                tls_verify: u.tls_verify.unwrap_or(true),
                max_connections: positive(
                    &format!("{key}.max_connections"),
                    u.max_connections,
                    concurrency as i64,
                    10_000,
                )? as usize,
                max_rate: with_burst(
                    &format!("{key}.max_burst"),
                    parse_rate(
                        &format!("{key}.max_rate"),
                        u.max_rate.as_deref().unwrap_or("0"),
                    )?,
                    u.max_burst,
                )?,
                max_messages_per_connection: match u.max_messages_per_connection {
                    None => None,
                    Some(n) => Some(positive(
                        &format!("{key}.max_messages_per_connection"),
                        Some(n),
                        1,
                        1_000_000,
                    )? as u32),
                },
            },
        );
    }
    Ok(upstreams)
}

/// An error unless `name` is "mx" or a configured upstream.
fn check_upstream(
    upstreams: &BTreeMap<String, Upstream>,
    key: &str,
    name: &str,
) -> Result<(), ConfigError> {
    if name == "mx" || upstreams.contains_key(name) {
        Ok(())
    } else {
        let known: Vec<&str> = upstreams.keys().map(String::as_str).collect();
        Err(bad(
            key,
            format!(
                "{name:?} is neither \"mx\" nor a name in [upstreams] (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ))
    }
}

/// `[delivery]`.
fn delivery(
    d: raw::Delivery,
    concurrency: usize,
    upstreams: &BTreeMap<String, Upstream>,
) -> Result<Delivery, ConfigError> {
    let upstream = d.upstream.unwrap_or_else(|| "mx".into());
    check_upstream(upstreams, "delivery.upstream", &upstream)?;
    let retry_schedule = d
        .retry_schedule
        .unwrap_or_else(|| ["1m", "5m", "15m", "1h", "4h"].map(String::from).to_vec())
        .iter()
        .map(|s| parse_duration("delivery.retry_schedule", s))
        .collect::<Result<Vec<_>, _>>()?;
    if retry_schedule.is_empty() {
        return Err(bad(
            "delivery.retry_schedule",
            "must have at least one value",
        ));
    }
    if retry_schedule.iter().any(|d| d.is_zero()) {
        return Err(bad(
            "delivery.retry_schedule",
            "values must be longer than 0s",
        ));
    }
    let max_age = parse_duration("delivery.max_age", d.max_age.as_deref().unwrap_or("2d"))?;
    if max_age.is_zero() {
        return Err(bad("delivery.max_age", "must be longer than 0s"));
    }
    let expiry = parse_duration(
        "delivery.suppression_expiry",
        d.suppression_expiry.as_deref().unwrap_or("30d"),
    )?;
    let delivery = Delivery {
        upstream,
        send_delay: parse_duration(
            "delivery.send_delay",
            d.send_delay.as_deref().unwrap_or("0s"),
        )?,
        retry_schedule,
        max_age,
        concurrency,
        suppress_after_bounces: positive(
            "delivery.suppress_after_bounces",
            d.suppress_after_bounces,
            1,
            1_000_000,
        )? as u32,
        suppression_expiry: (!expiry.is_zero()).then_some(expiry),
        mx_port: positive("delivery.mx_port", d.mx_port, 25, 65535)? as u16,
        mx_max_connections: positive(
            "delivery.mx_max_connections",
            d.mx_max_connections,
            concurrency as i64,
            10_000,
        )? as usize,
        mx_max_rate: with_burst(
            "delivery.mx_max_burst",
            parse_rate(
                "delivery.mx_max_rate",
                d.mx_max_rate.as_deref().unwrap_or("0"),
            )?,
            d.mx_max_burst,
        )?,
    };
    Ok(delivery)
}

/// `[[routes]]`.
/// `key` names a tenant of `[[tenants]]`.
fn check_tenant(names: &[&str], key: &str, name: &str) -> Result<(), ConfigError> {
    if names.contains(&name) {
        return Ok(());
    }
    Err(bad(
        key,
        format!(
            "no tenant {name:?} in [[tenants]] (there are: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ),
    ))
}

/// `[[tenants]]`: names of letters, digits, `-`, `_` and `.` (they go into
/// token files, metrics labels and keys), each domain and AUTH user with
/// one tenant only.
fn tenants(list: Vec<raw::Tenant>) -> Result<Vec<Tenant>, ConfigError> {
    let mut out: Vec<Tenant> = Vec::new();
    for (i, t) in list.into_iter().enumerate() {
        let key = format!("tenants[{i}]");
        let name_ok = !t.name.is_empty()
            && t.name.len() <= 64
            && t.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(bad(
                format!("{key}.name"),
                format!("{:?}: use 1 to 64 letters, digits, '-', '_' or '.'", t.name),
            ));
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(bad(
                format!("{key}.name"),
                format!("{:?} is used twice", t.name),
            ));
        }
        let sender_domains: Vec<String> = t
            .sender_domains
            .iter()
            .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
            .collect();
        for d in &sender_domains {
            if d.is_empty() || d.contains('@') || d.contains(char::is_whitespace) {
                return Err(bad(
                    format!("{key}.sender_domains"),
                    format!("{d:?} is not a domain"),
                ));
            }
            if let Some(o) = out.iter().find(|o| o.sender_domains.contains(d)) {
                return Err(bad(
                    format!("{key}.sender_domains"),
                    format!("{d} is already tenant {:?}'s", o.name),
                ));
            }
        }
        for u in &t.auth_users {
            if let Some(o) = out.iter().find(|o| o.auth_users.contains(u)) {
                return Err(bad(
                    format!("{key}.auth_users"),
                    format!("{u} is already tenant {:?}'s", o.name),
                ));
            }
        }
        let rate = match &t.max_rate {
            Some(r) => parse_rate(&format!("{key}.max_rate"), r)?,
            None => None,
        };
        out.push(Tenant {
            name: t.name,
            sender_domains,
            auth_users: t.auth_users,
            max_rate: with_burst(&format!("{key}.max_burst"), rate, t.max_burst)?,
        });
    }
    Ok(out)
}

fn routes(
    list: Vec<raw::Route>,
    upstreams: &BTreeMap<String, Upstream>,
    tenants: &[&str],
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = Vec::new();
    for (i, r) in list.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        check_upstream(upstreams, &format!("{key}.upstream"), &r.upstream)?;
        if r.sender_domain.is_none() && r.auth_user.is_none() {
            return Err(bad(
                key,
                "a route needs sender_domain or auth_user to match on",
            ));
        }
        let default_sender = match r.default_sender {
            Some(s) => Some(check_address(&format!("{key}.default_sender"), &s)?),
            None => None,
        };
        if let Some(t) = &r.tenant {
            check_tenant(tenants, &format!("{key}.tenant"), t)?;
        }
        routes.push(Route {
            sender_domain: r.sender_domain.map(|s| s.to_ascii_lowercase()),
            auth_user: r.auth_user,
            upstream: r.upstream,
            default_sender,
            tenant: r.tenant,
        });
    }
    Ok(routes)
}

/// `[tracking]`.
fn tracking(t: raw::Tracking, dir: &Path) -> Result<Tracking, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let tracking = Tracking {
        enabled: t.enabled.unwrap_or(false),
        listen: socket_addrs(
            "tracking.listen",
            &[t.listen.unwrap_or_else(|| "127.0.0.1:8025".into())],
        )?[0],
        base_url: t.base_url.unwrap_or_default(),
        secret_file: t.secret_file.as_deref().map(rel),
        trusted_proxies: networks("tracking.trusted_proxies", &t.trusted_proxies)?,
    };
    if tracking.enabled {
        if !(tracking.base_url.starts_with("http://") || tracking.base_url.starts_with("https://"))
        {
            return Err(bad(
                "tracking.base_url",
                "must be an http:// or https:// URL",
            ));
        }
        if tracking.secret_file.is_none() {
            return Err(bad(
                "tracking.secret_file",
                "required when tracking is enabled",
            ));
        }
    }
    Ok(tracking)
}

/// `[control]`.
fn control(c: raw::Control, dir: &Path) -> Result<Control, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let control = Control {
        socket: rel(c.socket.as_deref().unwrap_or("data/herald.sock")),
        metrics_listen: match c.metrics_listen.as_deref() {
            None | Some("") => None,
            Some(s) => Some(socket_addrs("control.metrics_listen", &[s.to_string()])?[0]),
        },
    };
    Ok(control)
}

/// `[dns]`.
fn dns(d: raw::Dns) -> Result<Dns, ConfigError> {
    let dns = Dns {
        nameservers: d
            .nameservers
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| {
                        s.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| bad("dns.nameservers", format!("{s:?} is not an IP or IP:port")))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(dns)
}

/// `[cluster]`.
fn cluster(c: raw::Cluster, hostname: &str, dir: &Path) -> Result<Cluster, ConfigError> {
    let url = c.redis.trim();
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(bad(
            "cluster.redis",
            "write a redis:// or rediss:// URL, e.g. \"redis://127.0.0.1:6379/0\"",
        ));
    }
    let node = c.node.unwrap_or_else(|| hostname.to_string());
    if node.is_empty()
        || !node
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
    {
        return Err(bad(
            "cluster.node",
            format!("{node:?}: use letters, digits, '-', '_' and '.'"),
        ));
    }
    let timeout = parse_duration("cluster.timeout", c.timeout.as_deref().unwrap_or("250ms"))?;
    if timeout.is_zero() || timeout > Duration::from_secs(30) {
        return Err(bad("cluster.timeout", "between 1ms and 30s"));
    }
    let hold_when_down = match c.on_redis_down.as_deref().unwrap_or("deliver") {
        "deliver" => false,
        "hold" => true,
        other => {
            return Err(bad(
                "cluster.on_redis_down",
                format!("{other:?}: \"deliver\" (the default) or \"hold\""),
            ))
        }
    };
    Ok(Cluster {
        redis: Secret(url.to_string()),
        redis_password: c
            .redis_password_file
            .map(|f| read_secret("cluster.redis_password_file", &rel_to(dir, &f)))
            .transpose()?,
        node,
        key_prefix: c.key_prefix.unwrap_or_else(|| "herald:".into()),
        timeout,
        hold_when_down,
    })
}

/// `[[webhooks]]`.
fn webhooks(
    list: Vec<raw::Webhook>,
    dir: &Path,
    tenants: &[&str],
) -> Result<Vec<Webhook>, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let mut webhooks = Vec::new();
    for (i, w) in list.into_iter().enumerate() {
        let key = format!("webhooks[{i}]");
        if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
            || w.url.parse::<http::Uri>().is_err()
        {
            return Err(bad(
                format!("{key}.url"),
                format!("{:?} is not an http:// or https:// URL", w.url),
            ));
        }
        let secret = read_secret(&format!("{key}.secret_file"), &rel(&w.secret_file))?;
        if secret.0.len() < 16 {
            return Err(bad(
                format!("{key}.secret_file"),
                format!(
                    "holds {} bytes; use at least 16 (head -c 32 /dev/urandom | base64 > FILE)",
                    secret.0.len()
                ),
            ));
        }
        let events = w
            .events
            .unwrap_or_else(|| WEBHOOK_EVENTS[..8].iter().map(|s| s.to_string()).collect());
        for e in &events {
            if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                return Err(bad(
                    format!("{key}.events"),
                    format!("{e:?} is not one of {}", WEBHOOK_EVENTS.join(", ")),
                ));
            }
        }
        let ca_file = w.ca_file.as_deref().map(rel);
        if let Some(ca) = &ca_file {
            if !ca.is_file() {
                return Err(bad(
                    format!("{key}.ca_file"),
                    format!("{} does not exist", ca.display()),
                ));
            }
        }
        let timeout = parse_duration(
            &format!("{key}.timeout"),
            w.timeout.as_deref().unwrap_or("10s"),
        )?;
        for t in &w.tenants {
            check_tenant(tenants, &format!("{key}.tenants"), t)?;
        }
        let name = w.name.unwrap_or_else(|| w.url.clone());
        if webhooks.iter().any(|h: &Webhook| h.name == name) {
            return Err(bad(
                format!("{key}.name"),
                format!("{name:?} is used twice"),
            ));
        }
        webhooks.push(Webhook {
            name,
            url: w.url,
            secret,
            events,
            tags: w.tags,
            tenants: w.tenants,
            ca_file,
            timeout,
        });
    }
    Ok(webhooks)
}

/// `[api]`.
fn api(a: raw::Api, dir: &Path) -> Result<Api, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let api = Api {
        listen: match a.listen.as_deref() {
            None | Some("") => None,
            Some(s) => Some(socket_addrs("api.listen", &[s.to_string()])?[0]),
        },
        tokens_file: a.tokens_file.as_deref().map(rel),
    };
    if api.listen.is_some() {
        match &api.tokens_file {
            None => return Err(bad("api.tokens_file", "required when api.listen is set")),
            Some(p) if !p.is_file() => {
                return Err(bad(
                    "api.tokens_file",
                    format!("{} does not exist", p.display()),
                ))
            }
            _ => {}
        }
    }
    Ok(api)
}

/// `[bounces]`.
fn bounces(b: Option<raw::Bounces>, dir: &Path) -> Result<Option<Bounces>, ConfigError> {
    let rel = |p: &str| rel_to(dir, p);
    let bounces = match b {
        None => None,
        Some(b) => {
            let domain = b
                .domain
                .map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|d| d.contains('.') && !d.contains(|c: char| c.is_whitespace() || c == '@'))
                .ok_or_else(|| {
                    bad(
                        "bounces.domain",
                        "must be a domain name whose MX points at herald, e.g. \"bounces.example.com\"",
                    )
                })?;
            let listen = socket_addrs(
                "bounces.listen",
                &b.listen.unwrap_or_else(|| vec!["0.0.0.0:25".into()]),
            )?;
            if listen.is_empty() {
                return Err(bad("bounces.listen", "needs at least one address"));
            }
            let file = b.secret_file.ok_or_else(|| {
                bad(
                    "bounces.secret_file",
                    "missing: the HMAC key of return-path tokens (head -c 32 /dev/urandom | base64 > FILE)",
                )
            })?;
            let secret = read_secret("bounces.secret_file", &rel(&file))?;
            if secret.0.len() < 16 {
                return Err(bad(
                    "bounces.secret_file",
                    format!(
                        "holds {} bytes; use at least 16 (head -c 32 /dev/urandom | base64 > FILE)",
                        secret.0.len()
                    ),
                ));
            }
            let max_size = positive(
                "bounces.max_size",
                b.max_size,
                1024 * 1024,
                64 * 1024 * 1024,
            )? as usize;
            let complaint_address = check_address(
                "bounces.complaint_address",
                &b.complaint_address
                    .unwrap_or_else(|| format!("fbl@{domain}")),
            )?
            .to_ascii_lowercase();
            if complaint_address.starts_with("b-") {
                return Err(bad(
                    "bounces.complaint_address",
                    "must not begin with \"b-\" (that is the form of return-path tokens)",
                ));
            }
            let report_address = |key: &str, given: Option<String>, local: &str| {
                let addr =
                    check_address(key, &given.unwrap_or_else(|| format!("{local}@{domain}")))?
                        .to_ascii_lowercase();
                if addr.starts_with("b-") || addr == complaint_address {
                    return Err(bad(
                        key,
                        "must differ from complaint_address and not begin with \"b-\"",
                    ));
                }
                Ok(addr)
            };
            let dmarc_address = report_address("bounces.dmarc_address", b.dmarc_address, "dmarc")?;
            let tlsrpt_address =
                report_address("bounces.tlsrpt_address", b.tlsrpt_address, "tlsrpt")?;
            if dmarc_address == tlsrpt_address {
                return Err(bad(
                    "bounces.tlsrpt_address",
                    "must differ from bounces.dmarc_address",
                ));
            }
            let aggregate_retention = parse_duration(
                "bounces.aggregate_retention",
                b.aggregate_retention.as_deref().unwrap_or("90d"),
            )?;
            let dmarc_alert_below = b.dmarc_alert_below.unwrap_or(95.0);
            if !(0.0..=100.0).contains(&dmarc_alert_below) {
                return Err(bad(
                    "bounces.dmarc_alert_below",
                    "a percentage from 0 (never) to 100",
                ));
            }
            let max_stored = positive(
                "bounces.max_stored",
                b.max_stored,
                DEFAULT_MAX_STORED,
                1 << 40,
            )? as u64;
            if max_stored < 4 * max_size as u64 {
                return Err(bad(
                    "bounces.max_stored",
                    format!(
                        "{max_stored} bytes holds fewer than 4 reports of bounces.max_size ({max_size}); raise it or lower max_size"
                    ),
                ));
            }
            let max_connections =
                positive("bounces.max_connections", b.max_connections, 100, 100_000)? as usize;
            let max_connections_per_ip = positive(
                "bounces.max_connections_per_ip",
                b.max_connections_per_ip,
                5,
                100_000,
            )? as usize;
            let max_rate_per_ip = parse_rate(
                "bounces.max_rate_per_ip",
                b.max_rate_per_ip.as_deref().unwrap_or("120/m"),
            )?;
            Some(Bounces {
                domain,
                listen,
                secret,
                max_size,
                complaint_address,
                dmarc_address,
                tlsrpt_address,
                aggregate_retention,
                dmarc_alert_below,
                max_stored,
                max_connections,
                max_connections_per_ip,
                max_rate_per_ip,
            })
        }
    };
    Ok(bounces)
}

/// `p` relative to the config file's directory `dir` (absolute paths as
/// they are).
fn rel_to(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/nonexistent/herald.toml"))
    }

    const MIN: &str = "[sender]\ndefault_sender = \"n@example.com\"\n";

    #[test]
    fn webhook_tags_match_globs_and_events_are_checked() {
        assert!(glob("file-*", "file-1234"));
        assert!(glob("*-1234", "file-1234"));
        assert!(glob("f*e-*4", "file-1234"));
        assert!(glob("exact", "exact"));
        assert!(!glob("file-*", "order-1"));
        assert!(!glob("exact", "exactly"));
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "0123456789abcdef0123").unwrap();
        let text = format!(
            "{MIN}[[webhooks]]\nurl = \"https://p.example/h\"\nsecret_file = \"{}\"\nevents = [\"delivered\"]\ntags = [\"file-*\"]\n",
            key.display()
        );
        let c = parse(&text).unwrap();
        let w = &c.webhooks[0];
        assert_eq!(w.name, "https://p.example/h");
        assert!(w.wants("delivered", Some("file-7"), None));
        assert!(w.wants("delivered", Some("file-7"), Some("acme")));
        assert!(!w.wants("delivered", Some("order-7"), None));
        assert!(
            !w.wants("delivered", None, None),
            "a tag filter needs a tag"
        );
        assert!(!w.wants("bounced", Some("file-7"), None));
        let bad = text.replace("[\"delivered\"]", "[\"delivred\"]");
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("webhooks[0].events"));
        let bad = text.replace("https://p.example/h", "ftp://p.example/h");
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("webhooks[0].url"));
    }

    #[test]
    fn minimal_config_has_the_documented_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.listen.smtp, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.listen.max_message_size, 26_214_400);
        assert_eq!(c.listen.max_recipients, 100);
        assert_eq!(c.delivery.retry_schedule.len(), 5);
        assert_eq!(c.delivery.max_age, Duration::from_secs(2 * 86400));
        assert_eq!(c.sender.bounce_address, "n@example.com");
        assert_eq!(c.storage.path, PathBuf::from("/nonexistent/data"));
        assert_eq!(c.delivery.upstream, "mx");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[delivery]\nmax_age = \"soon\"\n", "delivery.max_age"),
            ("[listen]\nsmtp = [\"nowhere\"]\n", "listen.smtp"),
            ("[listen]\nmax_recipients = 0\n", "listen.max_recipients"),
            ("[delivery]\nupstream = \"nope\"\n", "delivery.upstream"),
            (
                "[delivery]\nretry_schedule = []\n",
                "delivery.retry_schedule",
            ),
            (
                "[listen]\nallowed_networks = [\"10.0.0.0/99\"]\n",
                "listen.allowed_networks",
            ),
            (
                "[listen]\nallowed_networks = [\"127.0.0.0/8\", \"0.0.0.0/0\"]\n",
                "open relay",
            ),
            ("[listen]\nallowed_networks = [\"::/0\"]\n", "open relay"),
            (
                "[listen]\nproxy_protocol_from = [\"balancer\"]\n",
                "listen.proxy_protocol_from",
            ),
            ("[storage]\npath = \"\"\n", "storage.path"),
            (
                "[upstreams.p]\nhost = \"h\"\nsecurity = \"ssl\"\n",
                "upstreams.p.security",
            ),
            ("[listen]\nbogus = 1\n", "bogus"),
        ];
        for (extra, key) in cases {
            let text = format!("{MIN}{extra}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{extra:?}: {err}");
        }
        let err = parse("").unwrap_err().to_string();
        assert!(err.contains("sender.default_sender"), "{err}");
    }

    #[test]
    fn tenants_decide_by_auth_user_then_domain_then_route() {
        let parse = |extra: &str| Config::parse(&format!("{MIN}{extra}"), Path::new("/x/h.toml"));
        let c = parse(
            "[upstreams.zot]\nhost = \"relay.zot.example\"\n\
             [upstreams.acme]\nhost = \"smtp.acme.example\"\n\
             [[tenants]]\nname = \"acme\"\nsender_domains = [\"Acme.Example\"]\nauth_users = [\"acme-platform\"]\nmax_rate = \"60/m\"\nmax_burst = 5\n\
             [[tenants]]\nname = \"beta\"\nsender_domains = [\"beta.example\"]\n\
             [[routes]]\nsender_domain = \"acme.example\"\nupstream = \"acme\"\ntenant = \"acme\"\n\
             [[routes]]\nsender_domain = \"gamma.example\"\nupstream = \"zot\"\ntenant = \"beta\"\n",
        )
        .unwrap();
        let acme = c.tenant("acme").unwrap();
        assert_eq!(acme.sender_domains, ["acme.example"]);
        assert_eq!(acme.max_rate.unwrap().burst, 5);
        let route = |d: &str| c.route_for(Some(d), None);
        assert_eq!(c.tenant_for(Some("ACME.example"), None, None), Some("acme"));
        assert_eq!(c.tenant_for(Some("beta.example"), None, None), Some("beta"));
        // The AUTH user first: acme's platform sending as beta's domain.
        assert_eq!(
            c.tenant_for(Some("beta.example"), Some("acme-platform"), None),
            Some("acme")
        );
        assert_eq!(
            c.tenant_for(Some("gamma.example"), None, route("gamma.example")),
            Some("beta")
        );
        assert_eq!(c.tenant_for(Some("other.example"), None, None), None);
        // acme's upstream carries acme's mail alone; zot is shared.
        assert_eq!(c.tenant_upstreams("acme"), ["acme"]);
        assert!(c.tenant_upstreams("beta").contains(&"zot".to_string()));
        for (bad, key) in [
            ("[[tenants]]\nname = \"a b\"\n", "tenants[0].name"),
            (
                "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"\n",
                "tenants[1].name",
            ),
            (
                "[[tenants]]\nname = \"a\"\nsender_domains = [\"x.example\"]\n[[tenants]]\nname = \"b\"\nsender_domains = [\"x.example\"]\n",
                "tenants[1].sender_domains",
            ),
            (
                "[[tenants]]\nname = \"a\"\nmax_rate = \"fast\"\n",
                "tenants[0].max_rate",
            ),
            (
                "[[routes]]\nsender_domain = \"x.example\"\nupstream = \"mx\"\ntenant = \"nobody\"\n",
                "routes[0].tenant",
            ),
            ("[[tenants]]\nname = \"a\"\ncolour = 1\n", "colour"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn cluster_and_burst_keys_are_checked_by_name() {
        let parse = |extra: &str| Config::parse(&format!("{MIN}{extra}"), Path::new("/x/h.toml"));
        let c = parse("[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\n").unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.node, c.hostname);
        assert_eq!(cl.key_prefix, "herald:");
        assert_eq!(cl.timeout, Duration::from_millis(250));
        assert!(!cl.hold_when_down);
        assert!(
            format!("{:?}", cl.redis).contains("***"),
            "a URL may hold a password"
        );
        for (bad, key) in [
            ("redis = \"127.0.0.1:6379\"", "cluster.redis"),
            ("redis = \"redis://h\"\nnode = \"a b\"", "cluster.node"),
            ("redis = \"redis://h\"\ntimeout = \"0s\"", "cluster.timeout"),
            (
                "redis = \"redis://h\"\ntimeout = \"1 fortnight\"",
                "cluster.timeout",
            ),
            (
                "redis = \"redis://h\"\non_redis_down = \"panic\"",
                "cluster.on_redis_down",
            ),
            (
                "redis = \"redis://h\"\nredis_password_file = \"/nonexistent/p\"",
                "cluster.redis_password_file",
            ),
            ("node = \"a\"", "redis"),
        ] {
            let err = parse(&format!("[cluster]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let c = parse("[delivery]\nmx_max_rate = \"600/m\"\nmx_max_burst = 1\n[upstreams.p]\nhost = \"h\"\nmax_rate = \"10/s\"\n").unwrap();
        assert_eq!(c.delivery.mx_max_rate.unwrap().burst, 1);
        assert_eq!(c.upstreams["p"].max_rate.unwrap().burst, 10);
        for (bad, key) in [
            (
                "[upstreams.p]\nhost = \"h\"\nmax_burst = 2\n",
                "upstreams.p.max_burst",
            ),
            (
                "[upstreams.p]\nhost = \"h\"\nmax_rate = \"10/s\"\nmax_burst = 11\n",
                "upstreams.p.max_burst",
            ),
            (
                "[delivery]\nmx_max_rate = \"10/s\"\nmx_max_burst = 0\n",
                "delivery.mx_max_burst",
            ),
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_read_well() {
        let d = |s: &str| humantime::parse_duration(s).unwrap();
        assert_eq!(format_duration(d("7d")), "7 days");
        assert_eq!(format_duration(d("1d 2h 3m")), "1 day 2h 3m");
        assert_eq!(format_duration(d("90s")), "1m 30s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn limits_parse_and_default_to_concurrency() {
        let c = parse(&format!(
            "{MIN}[delivery]\nconcurrency = 8\nmx_max_rate = \"5000/h\"\n[upstreams.p]\nhost = \"h\"\nmax_rate = \"30/m\"\nmax_messages_per_connection = 100\n[upstreams.q]\nhost = \"h\"\nmax_connections = 2\nmax_rate = \"0\"\n"
        ))
        .unwrap();
        let p = &c.upstreams["p"];
        assert_eq!(p.max_connections, 8);
        assert_eq!(
            p.max_rate,
            Some(Rate {
                count: 30,
                per: Duration::from_secs(60),
                burst: 30,
            })
        );
        assert_eq!(p.max_rate.unwrap().to_string(), "30/m");
        assert_eq!(p.max_messages_per_connection, Some(100));
        assert_eq!(c.upstreams["q"].max_connections, 2);
        assert_eq!(c.upstreams["q"].max_rate, None);
        assert_eq!(c.delivery.mx_max_connections, 8);
        assert_eq!(c.delivery.mx_max_rate.unwrap().count, 5000);
        for bad in ["10", "10/d", "x/s", "-1/s"] {
            let err = parse(&format!(
                "{MIN}[upstreams.p]\nhost = \"h\"\nmax_rate = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("upstreams.p.max_rate"), "{bad}: {err}");
        }
    }

    #[test]
    fn backoff_repeats_the_last_value() {
        let c = parse(&format!(
            "{MIN}[delivery]\nretry_schedule = [\"1s\", \"2s\"]\n"
        ))
        .unwrap();
        assert_eq!(c.delivery.backoff(1), Duration::from_secs(1));
        assert_eq!(c.delivery.backoff(2), Duration::from_secs(2));
        assert_eq!(c.delivery.backoff(9), Duration::from_secs(2));
    }
}
