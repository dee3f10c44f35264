//! The running configuration: [`Live`] is the `Config` together with
//! everything built from it: DKIM signers, TLS configurations, the tracking
//! key, the resolver, the API tokens. A reload (`control::reload`) builds a
//! whole new `Live` from the file and only then swaps it in, so a config
//! that fails anywhere (a bad duration, a DKIM key that does not load)
//! leaves the running one untouched. Readers take one snapshot (an `Arc`)
//! per session transaction or delivery attempt, so a message is rewritten
//! and signed with one key set, and what is in flight is never disturbed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

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
    pub api_tokens: Option<Tokens>,
    /// A digest of the files each part was read from: a reload reports a
    /// renewed certificate or a rewritten key file, not only changed keys.
    pub(crate) files: BTreeMap<&'static str, Vec<u8>>,
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
        let client_tls = crate::tls::client_tls_configs(&cfg)?;
        let mut webhook_tls = HashMap::new();
        for (i, w) in cfg.webhooks.iter().enumerate() {
            // Never used for http://, but keeps the map total.
            let verify = w.url.starts_with("https://");
            let c = crate::tls::client_config(w.ca_file.as_deref().filter(|_| verify), verify)
                .with_context(|| format!("webhooks[{i}].ca_file"))?;
            webhook_tls.insert(w.name.clone(), c);
        }
        let tracking_key = load_secret(&cfg)?;
        let resolver = crate::dns::resolver(&cfg).map_err(anyhow::Error::msg)?;
        let api_tokens = match (cfg.api.listen, &cfg.api.tokens_file) {
            (Some(_), Some(t)) => Some(Tokens::load(t, &cfg)?),
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

/// The HMAC key of `[tracking] secret_file`, when tracking is enabled;
/// an unreadable or short file is an error naming the key (`serve` and
/// `check-config` both call this).
pub fn load_secret(cfg: &crate::config::Config) -> anyhow::Result<Option<Vec<u8>>> {
    if !cfg.tracking.enabled {
        return Ok(None);
    }
    let path = cfg.tracking.secret_file.clone().unwrap_or_default();
    let key = std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!("tracking.secret_file: cannot read {}: {e}", path.display())
    })?;
    if key.len() < 16 {
        anyhow::bail!(
            "tracking.secret_file: {} holds {} bytes; use at least 16 (head -c 32 /dev/urandom > FILE)",
            path.display(),
            key.len()
        );
    }
    Ok(Some(key))
}

/// Who asks: the control socket and an unscoped API token are the
/// platform's staff (everything); an API token of `tokens_file` may be
/// scoped to one tenant, and may be read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Only this tenant's mail, events, suppressions and routes.
    pub tenant: Option<String>,
    pub read_only: bool,
}

/// SHA-256 of each accepted token, and what it may see and do.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<(Vec<u8>, Scope)>>);

impl Tokens {
    /// Reads `tokens_file`: one token per line, optionally followed by
    /// `tenant=NAME` (a tenant of `cfg`: the token sees that tenant's mail
    /// only) and `read-only`; blank lines and `#` comments are skipped.
    /// Tokens shorter than 16 characters are refused.
    pub fn load(path: &std::path::Path, cfg: &Config) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("api.tokens_file: cannot read {}: {e}", path.display()))?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Options follow the token (which may itself hold spaces).
            let mut t = line;
            let mut scope = Scope::default();
            while let Some((rest, w)) = t.rsplit_once(char::is_whitespace) {
                let where_ = || format!("api.tokens_file: line {} of {}", n + 1, path.display());
                match w.split_once('=') {
                    Some(("tenant", name)) if cfg.tenant(name).is_some() => {
                        scope.tenant = Some(name.to_string())
                    }
                    Some(("tenant", name)) => {
                        anyhow::bail!("{}: no tenant {name:?} in [[tenants]]", where_())
                    }
                    None if w == "read-only" => scope.read_only = true,
                    _ => break,
                }
                t = rest.trim_end();
            }
            if t.len() < 16 {
                anyhow::bail!(
                    "api.tokens_file: line {} of {} is shorter than 16 characters (use e.g. head -c 24 /dev/urandom | base64)",
                    n + 1,
                    path.display()
                );
            }
            out.push((
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, t.as_bytes())
                    .as_ref()
                    .to_vec(),
                scope,
            ));
        }
        if out.is_empty() {
            anyhow::bail!("api.tokens_file: {} holds no token", path.display());
        }
        Ok(Tokens(Arc::new(out)))
    }

    /// What the presented token may see and do; None: no such token.
    pub fn accepts(&self, presented: &str) -> Option<Scope> {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, presented.as_bytes());
        // Every token is compared, so the time says nothing about which.
        self.0.iter().fold(None, |found, (t, scope)| {
            let same = aws_lc_rs::constant_time::verify_slices_are_equal(t, d.as_ref()).is_ok();
            found.or(same.then(|| scope.clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens");
        std::fs::write(
            &p,
            "# support console\nabcdefghijklmnop1234\n\nsecond-token-0123456789\n",
        )
        .unwrap();
        let cfg = Config::parse(
            "[sender]\ndefault_sender = \"n@example.com\"\n[[tenants]]\nname = \"acme\"\nsender_domains = [\"acme.example\"]\n",
            std::path::Path::new("/etc/herald/herald.toml"),
        )
        .unwrap();
        let t = Tokens::load(&p, &cfg).unwrap();
        assert_eq!(t.accepts("abcdefghijklmnop1234"), Some(Scope::default()));
        assert!(t.accepts("second-token-0123456789").is_some());
        assert!(t.accepts("abcdefghijklmnop123").is_none());
        assert!(t.accepts("").is_none());
        std::fs::write(&p, "short\n").unwrap();
        assert!(Tokens::load(&p, &cfg).is_err());
        std::fs::write(
            &p,
            "staff-token-0123456789\nacme-token-0123456789 tenant=acme read-only\n",
        )
        .unwrap();
        let t = Tokens::load(&p, &cfg).unwrap();
        assert_eq!(
            t.accepts("acme-token-0123456789"),
            Some(Scope {
                tenant: Some("acme".into()),
                read_only: true
            })
        );
        assert_eq!(t.accepts("staff-token-0123456789"), Some(Scope::default()));
        std::fs::write(&p, "acme-token-0123456789 tenant=zot\n").unwrap();
        let e = Tokens::load(&p, &cfg).err().unwrap().to_string();
        assert!(e.contains("line 1") && e.contains("zot"), "{e}");
        // A token may hold spaces (as before scopes existed).
        std::fs::write(&p, "a console token of 16+ characters read-only\n").unwrap();
        let t = Tokens::load(&p, &cfg).unwrap();
        assert!(
            t.accepts("a console token of 16+ characters")
                .unwrap()
                .read_only
        );
    }
}
