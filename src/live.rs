//! The running configuration and its reload (`herald reload`, SIGHUP).
//!
//! [`Live`] is the `Config` together with everything built from it: DKIM
//! signers, TLS configurations, the tracking key, the resolver, the API
//! tokens. A reload builds a whole new `Live` from the file and only then
//! swaps it in, so a config that fails anywhere (a bad duration, a DKIM key
//! that does not load) leaves the running one untouched. Readers take one
//! snapshot (an `Arc`) per session transaction or delivery attempt, so a
//! message is rewritten and signed with one key set, and what is in flight
//! is never disturbed.
//!
//! Listener addresses and the storage cannot change without a restart: a
//! reload keeps their running values and names them in its answer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, Listen};
use crate::services::Services;

/// The configuration in force and what was built from it.
pub struct Live {
    pub cfg: Arc<Config>,
    pub signers: crate::dkim::Signers,
    /// TLS client configuration per upstream.
    pub client_tls: HashMap<String, Arc<rustls::ClientConfig>>,
    /// TLS client configuration per webhook endpoint (by name).
    pub webhook_tls: HashMap<String, Arc<rustls::ClientConfig>>,
    /// `[listen] tls`: STARTTLS and the implicit-TLS listeners.
    pub tls: Option<TlsAcceptor>,
    /// HMAC key for pixel tokens, when tracking is enabled.
    pub tracking_key: Option<Vec<u8>>,
    /// The key in force before the last change of `secret_file`: pixels
    /// of mail sent before it still count.
    pub tracking_previous: Option<Vec<u8>>,
    pub resolver: hickory_resolver::TokioResolver,
    /// `[api] tokens_file`, when the API is on.
    pub api_tokens: Option<crate::api::Tokens>,
    /// A digest of the files each part was read from: a reload reports a
    /// renewed certificate or a rewritten key file, not only changed keys.
    files: BTreeMap<&'static str, Vec<u8>>,
}

impl Live {
    /// Loads everything the config points to; an error names the key.
    /// `serve`, `check-config` and a reload all go through here, so each
    /// refuses what the others would.
    pub fn build(cfg: Config) -> anyhow::Result<Live> {
        crate::tls::install_provider();
        let tls = match &cfg.listen.tls {
            Some(t) => Some(TlsAcceptor::from(
                crate::tls::server_config(&t.cert, &t.key).context("listen.tls")?,
            )),
            None => None,
        };
        let signers = crate::dkim::Signers::from_config(&cfg).context("dkim")?;
        let client_tls = crate::delivery::client_tls_configs(&cfg)?;
        let mut webhook_tls = HashMap::new();
        for (i, w) in cfg.webhooks.iter().enumerate() {
            // Never used for http://, but keeps the map total.
            let verify = w.url.starts_with("https://");
            let c = crate::tls::client_config(w.ca_file.as_deref().filter(|_| verify), verify)
                .with_context(|| format!("webhooks[{i}].ca_file"))?;
            webhook_tls.insert(w.name.clone(), c);
        }
        let tracking_key = crate::tracking::load_secret(&cfg)?;
        let resolver = crate::dns::resolver(&cfg).map_err(anyhow::Error::msg)?;
        let api_tokens = match (cfg.api.listen, &cfg.api.tokens_file) {
            (Some(_), Some(t)) => Some(crate::api::Tokens::load(t)?),
            _ => None,
        };
        let mut files = BTreeMap::new();
        if let Some(t) = &cfg.listen.tls {
            files.insert("listen.tls", digest([&t.cert, &t.key]));
        }
        files.insert("dkim", digest(cfg.dkim.iter().map(|d| &d.private_key)));
        files.insert(
            "upstreams",
            digest(cfg.upstreams.values().filter_map(|u| u.ca_file.as_ref())),
        );
        files.insert(
            "webhooks",
            digest(cfg.webhooks.iter().filter_map(|w| w.ca_file.as_ref())),
        );
        files.insert("tracking", digest(&cfg.tracking.secret_file));
        files.insert("api.tokens_file", digest(&cfg.api.tokens_file));
        Ok(Live {
            cfg: Arc::new(cfg),
            signers,
            client_tls,
            webhook_tls,
            tls,
            tracking_key,
            tracking_previous: None,
            resolver,
            api_tokens,
            files,
        })
    }

    /// Logs the senders whose mail will go out unsigned (no `[[dkim]]` key
    /// for their domain): at start and after each reload.
    pub fn warn_unsigned(&self) {
        let cfg = &self.cfg;
        for sender in std::iter::once(&cfg.sender.default_sender)
            .chain(cfg.routes.iter().filter_map(|r| r.default_sender.as_ref()))
        {
            let domain = sender.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
            if !self.signers.has_key_for(domain) {
                tracing::warn!(
                    sender = %sender,
                    "no [[dkim]] key for {domain}: mail sent as {sender} will be unsigned and may fail DMARC"
                );
            }
        }
    }
}

/// SHA-256 over the contents of some files (a missing one counts as empty).
fn digest<'a>(paths: impl IntoIterator<Item = &'a std::path::PathBuf>) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in paths {
        let bytes = std::fs::read(p).unwrap_or_default();
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    ctx.finish().as_ref().to_vec()
}

/// What a reload did.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// The file read (the one herald was started with).
    pub path: String,
    /// Parts whose settings (or files) changed, now in force.
    pub changed: Vec<String>,
    /// Keys whose new values wait for a restart; their running values stay.
    pub restart: Vec<String>,
}

impl Report {
    /// One line for people: "reloaded PATH: dkim (2 keys), routes; needs a
    /// restart: listen.smtp".
    pub fn line(&self) -> String {
        let mut s = format!("reloaded {}: ", self.path);
        if self.changed.is_empty() && self.restart.is_empty() {
            s.push_str("nothing changed");
        } else if self.changed.is_empty() {
            s.push_str("nothing to apply now");
        } else {
            s.push_str(&self.changed.join(", "));
        }
        if !self.restart.is_empty() {
            s.push_str("; needs a restart: ");
            s.push_str(&self.restart.join(", "));
        }
        s
    }
}

/// Re-reads the config file herald was started with and puts it in force.
/// On any error nothing changes and the error (`key: problem`) is returned.
pub fn reload(s: &Services) -> Result<Report, String> {
    let _one_at_a_time = s.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
    crate::notify::notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        crate::notify::monotonic_usec()
    ));
    let result = swap(s);
    crate::notify::notify(&format!(
        "READY=1\nSTATUS={}",
        crate::server::status_line(s)
    ));
    match &result {
        Ok(r) => {
            tracing::info!(
                path = %r.path,
                changed = %if r.changed.is_empty() { "nothing".to_string() } else { r.changed.join(", ") },
                "configuration reloaded"
            );
            if !r.restart.is_empty() {
                tracing::warn!(
                    keys = %r.restart.join(", "),
                    "changed settings that only a restart applies; they keep their running values"
                );
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the running configuration stays in force")
        }
    }
    result
}

fn swap(s: &Services) -> Result<Report, String> {
    let old = s.live();
    let path = old.cfg.path.clone();
    let mut cfg = Config::load(&path).map_err(|e| e.to_string())?;
    let restart = keep_running(&old.cfg, &mut cfg, s.tracking_served);
    if !cfg.listen.smtps.is_empty() && cfg.listen.tls.is_none() {
        return Err(
            "listen.tls: the running listen.smtps listeners need it (remove listen.smtps and restart first)"
                .into(),
        );
    }
    let mut new = Live::build(cfg).map_err(|e| format!("{e:#}"))?;
    if !s.tracking_served {
        // No pixel server listens: injecting pixels would only show
        // broken images.
        new.tracking_key = None;
    }
    new.tracking_previous = if new.tracking_key != old.tracking_key {
        old.tracking_key.clone().or(old.tracking_previous.clone())
    } else {
        old.tracking_previous.clone()
    };
    let changed = changes(&old, &new);
    let report = Report {
        path: path.display().to_string(),
        changed,
        restart,
    };
    let new = Arc::new(new);
    s.set_live(new.clone());

    // What was built once from the old config follows the new one.
    let cfg = &new.cfg;
    s.history.set_webhooks(&cfg.webhooks);
    s.hooks.set(&cfg.webhooks);
    s.routes.shaper.follow(cfg);
    s.attempts.resize(cfg.delivery.concurrency);
    s.conns.resize(
        cfg.listen.max_connections,
        cfg.listen.max_connections_per_ip,
    );
    // The intake's slots are [bounces] keys: a restart changes them.
    if report.changed.iter().any(|c| c.starts_with("upstreams")) {
        // Idle sessions were opened (and authenticated) with the old settings.
        s.routes.close_idle();
    }
    new.warn_unsigned();
    s.reloads.send_modify(|n| *n += 1);
    // Held mail may go now (a route's limit grew, a pause is over).
    s.scheduler.wake();
    Ok(report)
}

/// Puts back the running values of what a reload cannot change (bound
/// listeners, the open database), and returns the keys whose value in the
/// file differs.
fn keep_running(old: &Config, new: &mut Config, tracking_served: bool) -> Vec<String> {
    let mut restart = Vec::new();
    macro_rules! keep {
        ($name:literal, $($field:ident).+) => {
            if old.$($field).+ != new.$($field).+ {
                restart.push($name.to_string());
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!("listen.smtp", listen.smtp);
    keep!("listen.smtps", listen.smtps);
    keep!("storage.path", storage.path);
    keep!("control.socket", control.socket);
    keep!("control.metrics_listen", control.metrics_listen);
    keep!("tracking.listen", tracking.listen);
    // The intake's listener and the token key are set up at start.
    keep!("bounces", bounces);
    if old.api.listen != new.api.listen {
        // The API keeps its address and its tokens file together.
        restart.push("api.listen".to_string());
        new.api = old.api.clone();
    }
    if new.tracking.enabled && !tracking_served {
        restart.push("tracking.enabled".to_string());
    }
    restart
}

/// The parts of the config that differ between two snapshots.
fn changes(old: &Live, new: &Live) -> Vec<String> {
    let (a, b) = (&old.cfg, &new.cfg);
    let file = |k: &str| old.files.get(k) != new.files.get(k);
    let rest = |l: &Listen| Listen {
        smtp: Vec::new(),
        smtps: Vec::new(),
        tls: None,
        users: Vec::new(),
        ..l.clone()
    };
    let mut out = Vec::new();
    let mut note = |differs: bool, name: String| {
        if differs {
            out.push(name);
        }
    };
    note(a.hostname != b.hostname, "hostname".into());
    note(rest(&a.listen) != rest(&b.listen), "listen".into());
    note(
        a.listen.tls != b.listen.tls || file("listen.tls"),
        "listen.tls".into(),
    );
    note(
        a.listen.users != b.listen.users,
        format!("listen.users ({})", b.listen.users.len()),
    );
    note(
        a.storage.history_retention != b.storage.history_retention,
        "storage.history_retention".into(),
    );
    note(a.sender != b.sender, "sender".into());
    note(
        a.dkim != b.dkim || file("dkim"),
        format!(
            "dkim ({} key{})",
            b.dkim.len(),
            if b.dkim.len() == 1 { "" } else { "s" }
        ),
    );
    note(a.delivery != b.delivery, "delivery".into());
    note(
        a.upstreams != b.upstreams || file("upstreams"),
        "upstreams".into(),
    );
    note(a.routes != b.routes, "routes".into());
    note(
        a.tracking != b.tracking || file("tracking"),
        "tracking".into(),
    );
    note(
        a.webhooks != b.webhooks || file("webhooks"),
        format!("webhooks ({})", b.webhooks.len()),
    );
    note(a.dns != b.dns, "dns".into());
    note(
        a.api.tokens_file != b.api.tokens_file || file("api.tokens_file"),
        "api.tokens_file".into(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, dir: &std::path::Path) -> Config {
        Config::parse(
            &format!("[sender]\ndefault_sender = \"n@example.com\"\n{text}"),
            &dir.join("herald.toml"),
        )
        .unwrap()
    }

    #[test]
    fn listeners_keep_their_running_values() {
        let dir = tempfile::tempdir().unwrap();
        let old = parse("[listen]\nsmtp = [\"127.0.0.1:2525\"]\n", dir.path());
        let mut new = parse(
            "[listen]\nsmtp = [\"127.0.0.1:2526\"]\nmax_recipients = 5\n[storage]\npath = \"elsewhere\"\n",
            dir.path(),
        );
        let restart = keep_running(&old, &mut new, false);
        assert_eq!(restart, ["listen.smtp", "storage.path"]);
        assert_eq!(new.listen.smtp, old.listen.smtp);
        assert_eq!(new.storage.path, old.storage.path);
        // The rest of [listen] applies.
        assert_eq!(new.listen.max_recipients, 5);
        let mut same = parse("[listen]\nsmtp = [\"127.0.0.1:2525\"]\n", dir.path());
        assert!(keep_running(&old, &mut same, false).is_empty());
    }

    #[test]
    fn changes_name_the_parts_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        crate::dkim::keygen("example.com", "a", "ed25519", &key).unwrap();
        let dkim =
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"a\"\nprivate_key = \"k.pem\"\n";
        let a = Live::build(parse(dkim, dir.path())).unwrap();
        let b = Live::build(parse(dkim, dir.path())).unwrap();
        assert!(changes(&a, &b).is_empty());
        // Same config, new key in the same file.
        std::fs::remove_file(&key).unwrap();
        crate::dkim::keygen("example.com", "a", "ed25519", &key).unwrap();
        let c = Live::build(parse(dkim, dir.path())).unwrap();
        assert_eq!(changes(&b, &c), ["dkim (1 key)"]);
        let d = Live::build(parse(
            &format!("{dkim}[delivery]\nconcurrency = 3\n[[listen.users]]\nusername = \"u\"\npassword = \"p\"\n"),
            dir.path(),
        ))
        .unwrap();
        assert_eq!(changes(&c, &d), ["listen.users (1)", "delivery"]);
        let r = Report {
            path: "/etc/herald/herald.toml".into(),
            changed: changes(&c, &d),
            restart: vec!["listen.smtp".into()],
        };
        assert_eq!(
            r.line(),
            "reloaded /etc/herald/herald.toml: listen.users (1), delivery; needs a restart: listen.smtp"
        );
    }
}
