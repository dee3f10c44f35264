//! A reload (`herald reload`, SIGHUP): the config file is read again and
//! put in force as a whole, or not at all. Listener addresses and the
//! storage cannot change without a restart: a reload keeps their running
//! values and names them in its answer.

use std::sync::Arc;

use crate::config::{Config, Listen};
use crate::live::Live;
use crate::state::Services;

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
    crate::notify::notify(&format!("READY=1\nSTATUS={}", s.status_line()));
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
    s.pacing.shaper.follow(cfg);
    s.attempts.resize(cfg.delivery.concurrency);
    s.conns.resize(
        cfg.listen.max_connections,
        cfg.listen.max_connections_per_ip,
    );
    // The intake's slots are [bounces] keys: a restart changes them.
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
    // The Redis connection and this node's name are taken at start.
    keep!("cluster", cluster);
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
        a.tenants != b.tenants,
        format!("tenants ({})", b.tenants.len()),
    );
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
