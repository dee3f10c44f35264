//! `herald check-dns [DOMAIN]`: does DNS authorize the mail herald sends?
//!
//! For each sending domain (the `default_sender` of `[sender]` and of each
//! route, or the domain given) it checks, as a receiver would:
//! - SPF of the envelope (bounce) domain, evaluated with mail-auth for the
//!   addresses of the upstream relay when one is configured;
//! - the DKIM key record herald's key needs, compared with the private key;
//! - the DMARC record, and whether DKIM and SPF align with the From domain.
//!
//! Each finding is ok, warn or FAIL with a hint that says what to publish.

use std::net::IpAddr;

use hickory_resolver::proto::rr::RData;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfResult};

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub level: Level,
    pub check: &'static str,
    pub text: String,
    pub hint: Option<String>,
}

/// One sending identity: the From domain and what goes with it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub from_domain: String,
    pub envelope_domain: String,
    pub upstream: String,
}

fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The identities herald sends as, or the one for `domain`.
pub fn identities(cfg: &Config, domain: Option<&str>) -> Vec<Identity> {
    let mut out: Vec<Identity> = Vec::new();
    let mut push = |from: &str, envelope: &str, upstream: &str| {
        let id = Identity {
            from_domain: domain_of(from),
            envelope_domain: domain_of(envelope),
            upstream: upstream.to_string(),
        };
        if !out
            .iter()
            .any(|o| o.from_domain == id.from_domain && o.upstream == id.upstream)
        {
            out.push(id);
        }
    };
    push(
        &cfg.sender.default_sender,
        &cfg.sender.bounce_address,
        &cfg.delivery.upstream,
    );
    for r in &cfg.routes {
        match &r.default_sender {
            Some(ds) => {
                let env = if cfg.sender.bounce_explicit {
                    &cfg.sender.bounce_address
                } else {
                    ds
                };
                push(ds, env, &r.upstream);
            }
            // The global sender, through this route's upstream.
            None => push(
                &cfg.sender.default_sender,
                &cfg.sender.bounce_address,
                &r.upstream,
            ),
        }
    }
    // Authors whose domain has a key keep their own From.
    if !cfg.sender.always_default_sender {
        for k in &cfg.dkim {
            push(
                &format!("x@{}", k.domain),
                &cfg.sender.bounce_address,
                &cfg.delivery.upstream,
            );
        }
    }
    // With [bounces], every recipient's return path is b-TOKEN@DOMAIN:
    // that is the domain SPF is checked for.
    if let Some(b) = &cfg.bounces {
        for i in out.iter_mut() {
            i.envelope_domain = b.domain.clone();
        }
    }
    match domain {
        None => out,
        Some(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            let mut mine: Vec<Identity> = out.into_iter().filter(|i| i.from_domain == d).collect();
            if mine.is_empty() {
                mine.push(Identity {
                    from_domain: d.clone(),
                    envelope_domain: cfg.bounces.as_ref().map(|b| b.domain.clone()).unwrap_or(d),
                    upstream: cfg.delivery.upstream.clone(),
                });
            }
            mine
        }
    }
}

/// The parent to look for a DMARC record at: the last two labels (no
/// public suffix list, so for example.co.uk this asks co.uk, which has none).
fn org(domain: &str) -> String {
    let labels: Vec<&str> = domain.trim_end_matches('.').split('.').collect();
    labels[labels.len().saturating_sub(2)..].join(".")
}

/// DMARC alignment. Relaxed alignment really compares organizational
/// domains; without a public suffix list we only count one domain being the
/// other or a subdomain of it, which never calls aligned what is not
/// (siblings such as a.example.com and b.example.com are reported as not
/// aligned although DMARC would accept them).
fn aligned(a: &str, b: &str, strict: bool) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    a == b || (!strict && (a.ends_with(&format!(".{b}")) || b.ends_with(&format!(".{a}"))))
}

/// TXT strings of `name`, each record's strings joined.
async fn txt(auth: &MessageAuthenticator, name: &str) -> Result<Vec<String>, String> {
    match auth.resolver().txt_lookup(format!("{name}.")).await {
        Ok(l) => Ok(l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect()),
        Err(e) if e.is_no_records_found() => Ok(Vec::new()),
        Err(e) => Err(format!("{name}: DNS error: {e}")),
    }
}

/// Tag value of a `k=v; k=v` record.
fn tag<'a>(record: &'a str, name: &str) -> Option<&'a str> {
    record.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim().eq_ignore_ascii_case(name)).then_some(v.trim())
    })
}

/// Returns whether SPF can pass for this envelope domain.
async fn check_spf(
    cfg: &Config,
    auth: &MessageAuthenticator,
    id: &Identity,
    out: &mut Vec<Finding>,
) -> bool {
    let before = out.len();
    spf_findings(cfg, auth, id, out).await;
    out[before..].iter().all(|f| f.level == Level::Ok)
}

async fn spf_findings(
    cfg: &Config,
    auth: &MessageAuthenticator,
    id: &Identity,
    out: &mut Vec<Finding>,
) {
    let d = &id.envelope_domain;
    let mut f = |level, text: String, hint: Option<String>| {
        out.push(Finding {
            level,
            check: "SPF",
            text,
            hint,
        })
    };
    let records = match txt(auth, d).await {
        Ok(r) => r,
        Err(e) => return f(Level::Warn, e, None),
    };
    let spf: Vec<&String> = records
        .iter()
        .filter(|r| r.to_ascii_lowercase().starts_with("v=spf1"))
        .collect();
    let upstream = cfg.upstreams.get(&id.upstream);
    let suggestion = match upstream {
        Some(u) => format!(
            "publish TXT {d} \"v=spf1 include:<{}'s SPF domain> -all\" (your provider documents it)",
            u.host
        ),
        None => format!("publish TXT {d} \"v=spf1 ip4:<this server's public IP> -all\""),
    };
    match spf.len() {
        0 => {
            return f(
                Level::Fail,
                format!("{d} (envelope sender domain) has no SPF record"),
                Some(suggestion),
            )
        }
        1 => {}
        n => {
            return f(
                Level::Fail,
                format!("{d} has {n} SPF records: receivers treat that as an error (permerror)"),
                Some("merge them into one v=spf1 record".into()),
            )
        }
    }
    let record = spf[0];
    let Some(u) = upstream else {
        return f(
            Level::Ok,
            format!("{d}: \"{record}\" (direct MX delivery: make sure it lists this server's public address)"),
            None,
        );
    };
    // The relay's own address stands in for the address it sends from.
    let ips: Vec<IpAddr> = match u.host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => match auth.resolver().lookup_ip(format!("{}.", u.host)).await {
            Ok(l) => l.iter().collect(),
            Err(e) => {
                return f(
                    Level::Warn,
                    format!("{d}: \"{record}\"; cannot resolve upstream {}: {e}", u.host),
                    None,
                )
            }
        },
    };
    let sender = format!("postmaster@{d}");
    let mut results = Vec::new();
    let mut all_pass = true;
    for ip in &ips {
        let res = auth
            .verify_spf(SpfParameters::verify_mail_from(
                *ip,
                &cfg.hostname,
                &cfg.hostname,
                &sender,
            ))
            .await
            .result();
        all_pass &= res == SpfResult::Pass;
        results.push(format!("{ip}: {res}"));
    }
    if all_pass {
        f(
            Level::Ok,
            format!(
                "{d}: \"{record}\" authorizes upstream {} ({})",
                u.host,
                results.join(", ")
            ),
            None,
        )
    } else {
        f(
            Level::Warn,
            format!(
                "{d}: \"{record}\" does not authorize upstream {} ({})",
                u.host,
                results.join(", ")
            ),
            Some(format!(
                "if {} relays from other addresses, add its SPF include to the record; else {suggestion}",
                u.host
            )),
        )
    }
}

/// Returns the DKIM domain that signs for this From domain, when its
/// published key matches (else DKIM cannot pass).
async fn check_dkim(
    cfg: &Config,
    auth: &MessageAuthenticator,
    id: &Identity,
    out: &mut Vec<Finding>,
) -> Option<String> {
    let d = &id.from_domain;
    let key = cfg
        .dkim
        .iter()
        .filter(|k| d == &k.domain || d.ends_with(&format!(".{}", k.domain)))
        .max_by_key(|k| k.domain.len());
    let Some(key) = key else {
        out.push(Finding {
            level: Level::Fail,
            check: "DKIM",
            text: format!("no [[dkim]] key covers {d}: mail From {d} leaves unsigned"),
            hint: Some(format!(
                "herald dkim-keygen --domain {d} --selector herald --out dkim/{d}.pem, publish the record it prints, add the [[dkim]] block"
            )),
        });
        return None;
    };
    let name = format!("{}._domainkey.{}", key.selector, key.domain);
    let ours = match crate::dkim::public_record(&key.private_key) {
        Ok(r) => r,
        Err(e) => {
            out.push(Finding {
                level: Level::Fail,
                check: "DKIM",
                text: format!("{}: {e}", key.private_key.display()),
                hint: None,
            });
            return None;
        }
    };
    let publish = format!("publish TXT {name} \"{ours}\"");
    let published = match txt(auth, &name).await {
        Ok(r) => r,
        Err(e) => {
            out.push(Finding {
                level: Level::Warn,
                check: "DKIM",
                text: e,
                hint: None,
            });
            return None;
        }
    };
    let ours_p = tag(&ours, "p").unwrap_or("");
    let (level, text, hint) = match published.iter().find(|r| tag(r, "p").is_some()) {
        None => (
            Level::Fail,
            format!("{name}: no key record published"),
            Some(publish),
        ),
        Some(r) => {
            let p: String = tag(r, "p").unwrap_or("").split_whitespace().collect();
            if crate::dkim::same_public_key(ours_p, &p) {
                (
                    Level::Ok,
                    format!(
                        "{name}: published key matches {}",
                        key.private_key.display()
                    ),
                    None,
                )
            } else if p.is_empty() {
                (
                    Level::Fail,
                    format!("{name}: the published key is revoked (empty p=)"),
                    Some(publish),
                )
            } else {
                (
                    Level::Fail,
                    format!(
                        "{name}: the published key is not the one in {}",
                        key.private_key.display()
                    ),
                    Some(publish),
                )
            }
        }
    };
    let passes = level == Level::Ok;
    out.push(Finding {
        level,
        check: "DKIM",
        text,
        hint,
    });
    passes.then(|| key.domain.clone())
}

async fn check_dmarc(
    auth: &MessageAuthenticator,
    id: &Identity,
    dkim_domain: Option<&str>,
    spf_passes: bool,
    out: &mut Vec<Finding>,
) -> Option<String> {
    let d = &id.from_domain;
    let mut record = None;
    for name in [format!("_dmarc.{d}"), format!("_dmarc.{}", org(d))] {
        match txt(auth, &name).await {
            Ok(r) => {
                if let Some(r) = r.into_iter().find(|r| r.starts_with("v=DMARC1")) {
                    record = Some((name, r));
                    break;
                }
            }
            Err(e) => {
                out.push(Finding {
                    level: Level::Warn,
                    check: "DMARC",
                    text: e,
                    hint: None,
                });
                return None;
            }
        }
    }
    let (adkim_strict, aspf_strict) = match &record {
        None => {
            out.push(Finding {
                level: Level::Warn,
                check: "DMARC",
                text: format!("no DMARC record for {d}: receivers apply their own policy"),
                hint: Some(format!(
                    "publish TXT _dmarc.{d} \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{d}\", then tighten p= once reports are clean"
                )),
            });
            (false, false)
        }
        Some((name, r)) => {
            out.push(Finding {
                level: Level::Ok,
                check: "DMARC",
                text: format!("{name}: \"{r}\""),
                hint: None,
            });
            (tag(r, "adkim") == Some("s"), tag(r, "aspf") == Some("s"))
        }
    };
    let dkim_ok = dkim_domain.is_some_and(|k| aligned(k, d, adkim_strict));
    let spf_aligned = aligned(&id.envelope_domain, d, aspf_strict);
    let spf_ok = spf_aligned && spf_passes;
    let how = |strict| if strict { "strict" } else { "relaxed" };
    let dkim_state = match dkim_domain {
        None => "cannot pass (see DKIM above)".to_string(),
        Some(k) if dkim_ok => format!("d={k} passes and is aligned ({})", how(adkim_strict)),
        Some(k) => format!("d={k} is not aligned ({})", how(adkim_strict)),
    };
    let spf_state = match (spf_aligned, spf_passes) {
        (true, true) => format!(
            "{} passes and is aligned ({})",
            id.envelope_domain,
            how(aspf_strict)
        ),
        (true, false) => format!(
            "{} is aligned but may not pass (see SPF above)",
            id.envelope_domain
        ),
        (false, _) => format!(
            "{} is not aligned ({})",
            id.envelope_domain,
            how(aspf_strict)
        ),
    };
    let text = format!("From {d}: DKIM {dkim_state}; SPF {spf_state}");
    let (level, hint) = match (dkim_ok, spf_ok) {
        (true, _) => (Level::Ok, None),
        (false, true) => (
            Level::Warn,
            Some("DMARC then rests on SPF alone, which forwarding breaks: sign with a key of the From domain".into()),
        ),
        (false, false) => (
            Level::Fail,
            Some(format!("mail From {d} fails DMARC: add a [[dkim]] key for {d} (or rewrite From to a signed domain)")),
        ),
    };
    out.push(Finding {
        level,
        check: "align",
        text,
        hint,
    });
    record.map(|(_, r)| r)
}

/// With `[bounces]`: the DMARC record of `domain` sends aggregate reports
/// to herald (`rua=mailto:` the dmarc_address), and the bounce domain
/// authorizes them (RFC 7489 7.1: `DOMAIN._report._dmarc.BOUNCE-DOMAIN`).
async fn check_reports(
    auth: &MessageAuthenticator,
    domain: &str,
    record: Option<&str>,
    b: &crate::config::Bounces,
    out: &mut Vec<Finding>,
) {
    let to = format!("mailto:{}", b.dmarc_address);
    let rua = record.and_then(|r| tag(r, "rua")).unwrap_or("");
    let has = rua.split(',').any(|u| {
        u.trim()
            .split('!')
            .next()
            .unwrap_or("")
            .eq_ignore_ascii_case(&to)
    });
    out.push(match (record, has) {
        (_, true) => Finding {
            level: Level::Ok,
            check: "rua",
            text: format!(
                "aggregate reports of {domain} come to herald ({to}): herald dmarc {domain}"
            ),
            hint: None,
        },
        (Some(r), false) => Finding {
            level: Level::Warn,
            check: "rua",
            text: format!("receivers send {domain}'s aggregate reports elsewhere, not to herald"),
            hint: Some(format!(
                "publish TXT _dmarc.{domain} \"{}\"",
                with_rua(r, &to)
            )),
        },
        (None, false) => Finding {
            level: Level::Warn,
            check: "rua",
            text: format!("no DMARC record, so no aggregate reports for {domain}"),
            hint: Some(format!(
                "publish TXT _dmarc.{domain} \"v=DMARC1; p=none; rua={to}\""
            )),
        },
    });
    if aligned(domain, &b.domain, false) {
        return;
    }
    let name = format!("{domain}._report._dmarc.{}", b.domain);
    let ok = match txt(auth, &name).await {
        Ok(r) => r.iter().any(|r| r.starts_with("v=DMARC1")),
        Err(_) => false,
    };
    out.push(Finding {
        level: if ok { Level::Ok } else { Level::Warn },
        check: "rua",
        text: if ok {
            format!("{name} authorizes reports about {domain} to {}", b.domain)
        } else {
            format!(
                "{name} has no \"v=DMARC1\" record: receivers drop reports about {domain} to another domain without it (RFC 7489 7.1)"
            )
        },
        hint: (!ok).then(|| format!("publish TXT {name} \"v=DMARC1\"")),
    });
}

/// `record` with `to` added to its `rua=` tag (or the tag added).
fn with_rua(record: &str, to: &str) -> String {
    let mut found = false;
    let tags: Vec<String> = record
        .split(';')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("rua") => {
                found = true;
                format!("rua={},{to}", v.trim())
            }
            _ => t.to_string(),
        })
        .collect();
    let mut r = tags.join("; ");
    if !found {
        r.push_str(&format!("; rua={to}"));
    }
    r
}

async fn check_bounce_mx(cfg: &Config, auth: &MessageAuthenticator, out: &mut Vec<Finding>) {
    let Some(b) = &cfg.bounces else { return };
    let d = &b.domain;
    let host = cfg.hostname.trim_end_matches('.').to_ascii_lowercase();
    let publish = format!("publish MX {d}. 10 {host}. (and an A/AAAA record for {host})");
    let mut f = |level, text: String, hint: Option<String>| {
        out.push(Finding {
            level,
            check: "MX",
            text,
            hint,
        })
    };
    let exchanges: Vec<String> = match auth.resolver().mx_lookup(format!("{d}.")).await {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(
                    mx.exchange
                        .to_ascii()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                ),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => Vec::new(),
        Err(e) => return f(Level::Warn, format!("{d}: DNS error: {e}"), None),
    };
    if exchanges.is_empty() {
        return f(
            Level::Fail,
            format!(
                "{d} (the [bounces] domain) has no MX: bounces and complaints cannot reach herald"
            ),
            Some(publish),
        );
    }
    if exchanges.contains(&host) {
        return f(
            Level::Ok,
            format!("{d}: MX {host} (this host) takes its reports"),
            None,
        );
    }
    // Another name for this host: the same addresses.
    let addrs = |name: String| async move {
        auth.resolver()
            .lookup_ip(format!("{name}."))
            .await
            .map(|l| l.iter().collect::<Vec<IpAddr>>())
            .unwrap_or_default()
    };
    let ours = addrs(host.clone()).await;
    for x in &exchanges {
        let theirs = addrs(x.clone()).await;
        if !ours.is_empty() && theirs.iter().any(|ip| ours.contains(ip)) {
            return f(
                Level::Ok,
                format!("{d}: MX {x} has the address of this host ({host})"),
                None,
            );
        }
    }
    f(
        Level::Fail,
        format!(
            "{d}: MX {} is not this host ({host}): bounces and complaints go elsewhere",
            exchanges.join(", ")
        ),
        Some(publish),
    )
}

/// Runs every check for every identity.
pub async fn run(
    cfg: &Config,
    domain: Option<&str>,
) -> Result<Vec<(Identity, Vec<Finding>)>, String> {
    let auth = match crate::dns::resolver_config(cfg) {
        Some(rc) => MessageAuthenticator::new(rc, Default::default()),
        None => MessageAuthenticator::new_system_conf(),
    }
    .map_err(|e| format!("dns: {e}"))?;
    let mut all = Vec::new();
    for id in identities(cfg, domain) {
        let mut out = Vec::new();
        let spf_passes = check_spf(cfg, &auth, &id, &mut out).await;
        let dkim_domain = check_dkim(cfg, &auth, &id, &mut out).await;
        let record = check_dmarc(&auth, &id, dkim_domain.as_deref(), spf_passes, &mut out).await;
        if let Some(b) = &cfg.bounces {
            check_reports(&auth, &id.from_domain, record.as_deref(), b, &mut out).await;
        }
        all.push((id, out));
    }
    if let Some(b) = &cfg.bounces {
        let mut out = Vec::new();
        check_bounce_mx(cfg, &auth, &mut out).await;
        all.push((
            Identity {
                from_domain: b.domain.clone(),
                envelope_domain: b.domain.clone(),
                upstream: String::new(),
            },
            out,
        ));
    }
    Ok(all)
}

/// Prints the findings; returns true when nothing failed.
pub fn print(results: &[(Identity, Vec<Finding>)]) -> bool {
    let mut ok = true;
    for (id, findings) in results {
        if id.upstream.is_empty() {
            println!(
                "{} (the [bounces] domain: where bounces and complaints come back)",
                id.from_domain
            );
        } else {
            println!(
                "{} (envelope {}, route {})",
                id.from_domain, id.envelope_domain, id.upstream
            );
        }
        for f in findings {
            let level = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => {
                    ok = false;
                    "FAIL"
                }
            };
            println!("  {level}  {:<5}  {}", f.check, f.text);
            if let Some(h) = &f.hint {
                println!("               hint: {h}");
            }
        }
    }
    ok
}
