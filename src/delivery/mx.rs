//! MX lookups for direct delivery (`[delivery] upstream = "mx"`).

use std::net::IpAddr;

use hickory_resolver::proto::rr::RData;

use super::client::{Target, Verdict};
use crate::config::Security;
use crate::live::Live;
use crate::reply::Class;
use crate::state::Services;

/// At most this many addresses are tried per domain and attempt.
const MAX_MX_TARGETS: usize = 5;

/// The hosts to try for `domain`, best preference first (RFC 5321 5.1).
/// A domain without MX falls back to its own address; a null MX (RFC 7505)
/// bounces at once.
pub async fn targets(s: &Services, live: &Live, domain: &str) -> Result<Vec<Target>, Verdict> {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let mut hosts: Vec<(u16, String)> = match live.resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        // RFC 5321 5.1: a domain that does not exist takes no mail.
        Err(e) if e.is_nx_domain() => {
            return Err(Verdict::Bounced(
                format!("{domain}: no such domain (NXDOMAIN)"),
                Class::Hard,
            ))
        }
        // No MX: the domain's own address is its implicit MX.
        Err(e) if e.is_no_records_found() => vec![(0, fqdn.clone())],
        Err(e) => {
            return Err(Verdict::Deferred(
                format!("MX lookup for {domain}: {e}"),
                Class::Transient,
            ))
        }
    };
    if hosts.len() == 1 && (hosts[0].1 == "." || hosts[0].1.is_empty()) {
        return Err(Verdict::Bounced(
            format!("{domain} does not accept mail (null MX, RFC 7505)"),
            Class::Hard,
        ));
    }
    hosts.sort();
    let mut targets = Vec::new();
    for (_, host) in hosts {
        let ips: Vec<IpAddr> = match live.resolver.lookup_ip(host.as_str()).await {
            Ok(l) => l.iter().collect(),
            Err(_) => continue,
        };
        let name = host.trim_end_matches('.').to_string();
        for ip in ips {
            targets.push(Target {
                host: name.clone(),
                connect_to: Some(ip),
                port: live.cfg.delivery.mx_port,
                security: Security::None,
                opportunistic: true,
                tls: s.mx_tls.clone(),
                credentials: None,
                helo: live.cfg.hostname.clone(),
                smart_host: false,
            });
            if targets.len() >= MAX_MX_TARGETS {
                return Ok(targets);
            }
        }
    }
    if targets.is_empty() {
        return Err(Verdict::Deferred(
            format!("no address found for the mail servers of {domain}"),
            Class::Transient,
        ));
    }
    Ok(targets)
}
