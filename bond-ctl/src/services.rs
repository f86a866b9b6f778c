//! The community services a terminal runs beside its agent, composed here
//! so that the agent, the relay tree and the peer cache know nothing of
//! each other.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use anyhow::Context as _;
use bond_agent::{StartServices, net::udp_socket};
use bond_api::Service;
use bond_config::TerminalConfig;

/// The services `[dist]` and `[cache]` ask for, started once the agent
/// knows its LAN address.
pub fn start() -> StartServices {
    Box::new(|cfg: TerminalConfig, lan_ip: Ipv4Addr| {
        Box::pin(async move {
            let mut out: Vec<Box<dyn Service>> = Vec::new();
            if let Some(d) = &cfg.dist {
                let state = cfg.dist_state();
                let dist = bond_relay::Dist::start(&cfg.key, lan_ip, d.port, &state).await?;
                out.push(Box::new(dist));
            }
            if let Some(c) = &cfg.cache {
                let udp = udp_socket(
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, c.port),
                    Some(&cfg.lan),
                )
                .context("field `cache.port` (UDP)")?;
                let cache: Arc<bond_cache::Cache> =
                    bond_cache::Cache::start(&cfg.key, lan_ip, udp, c, &cfg.cache_dir()).await?;
                out.push(Box::new(cache));
            }
            Ok(out)
        })
    })
}
