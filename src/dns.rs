//! DNS: the resolver built from `[dns] nameservers` (MX lookups for direct
//! delivery are `delivery::mx`).

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::Config;

/// The resolver configuration of `[dns] nameservers`; None means the
/// system's resolv.conf.
pub fn resolver_config(cfg: &Config) -> Option<ResolverConfig> {
    if cfg.dns.nameservers.is_empty() {
        return None;
    }
    let servers = cfg
        .dns
        .nameservers
        .iter()
        .map(|sa| {
            let mut udp = ConnectionConfig::udp();
            udp.port = sa.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = sa.port();
            NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
        })
        .collect();
    Some(ResolverConfig::from_name_servers(servers))
}

pub fn resolver(cfg: &Config) -> Result<TokioResolver, String> {
    let builder = match resolver_config(cfg) {
        None => {
            TokioResolver::builder_tokio().map_err(|e| format!("dns: reading resolv.conf: {e}"))?
        }
        Some(rc) => Resolver::builder_with_config(rc, TokioRuntimeProvider::default()),
    };
    builder.build().map_err(|e| format!("dns: {e}"))
}
