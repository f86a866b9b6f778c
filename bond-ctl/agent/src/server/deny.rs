//! The server's destination policy: `deny` expanded to the prefixes its
//! program refuses members' packets to (`S_DENY`, drop reason `denied`).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result};
use bond_config::{Deny, SPECIAL_RANGES, ServerConfig};

/// The prefixes `cfg.deny` names, `"local"` expanded from the host's
/// interfaces as they are now: sorted, without repeats.
pub(super) fn prefixes(cfg: &ServerConfig) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    for d in &cfg.deny {
        match d {
            Deny::Prefix(p) => out.extend(p.v4()),
            Deny::Local => out.extend(local(&cfg.interfaces)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// What `"local"` names: the special ranges, every address of this host,
/// and the networks of its interfaces other than `attached` (the ones
/// bond serves through, whose networks hold the links and the Internet).
fn local(attached: &[String]) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = SPECIAL_RANGES.to_vec();
    for ifa in nix::ifaddrs::getifaddrs().context("listing this host's addresses")? {
        let Some(ip) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = ip.ip();
        out.push((ip, 32));
        if attached.contains(&ifa.interface_name) {
            continue;
        }
        let len = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
        out.push((network(ip, len), len));
    }
    Ok(out)
}

/// The IPv6 prefixes `cfg.deny` names (`S_DENY6`), `"local"` expanded as
/// for IPv4: sorted, without repeats.
pub(super) fn prefixes6(cfg: &ServerConfig) -> Result<Vec<(Ipv6Addr, u8)>> {
    let mut out = Vec::new();
    for d in &cfg.deny {
        match d {
            Deny::Prefix(p) => out.extend(p.v6()),
            Deny::Local => out.extend(local6(&cfg.interfaces)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The IPv6 ranges no one on the Internet has: unspecified, loopback,
/// IPv4-mapped, link-local and multicast.
const SPECIAL_RANGES6: [(Ipv6Addr, u8); 5] = [
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
];

/// What `"local"` names in IPv6, as [`local`] does in IPv4.
fn local6(attached: &[String]) -> Result<Vec<(Ipv6Addr, u8)>> {
    let mut out = SPECIAL_RANGES6.to_vec();
    for ifa in nix::ifaddrs::getifaddrs().context("listing this host's addresses")? {
        let Some(ip) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in6()) else {
            continue;
        };
        let ip = ip.ip();
        out.push((ip, 128));
        if attached.contains(&ifa.interface_name) {
            continue;
        }
        let len = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in6())
            .map_or(128, |m| u128::from(m.ip()).count_ones() as u8);
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        out.push((Ipv6Addr::from(u128::from(ip) & mask), len));
    }
    Ok(out)
}

/// The network `ip` is on, `len` bits long.
fn network(ip: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Ipv4Addr::from(u32::from(ip) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 `"local"`: the special ranges and this host's loopback (::1,
    /// on every host with IPv6); nothing without `"local"`.
    #[test]
    fn local6_names_the_special_ranges_and_this_host() {
        let text = |deny: &str| {
            format!(
                "role = \"server\"\naddress = \"198.51.100.1\"\n\
                 nat_address = \"203.0.113.1\"\ninterfaces = [\"wan0\"]\ndeny = {deny}\n"
            )
        };
        let parse = |deny: &str| match bond_config::Config::parse(&text(deny), "s.toml").unwrap() {
            bond_config::Config::Server(cfg) => cfg,
            _ => panic!("not a server"),
        };
        let p = prefixes6(&parse("[\"local\"]")).unwrap();
        for want in SPECIAL_RANGES6 {
            assert!(p.contains(&want), "{want:?} in {p:?}");
        }
        assert!(p.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert!(prefixes6(&parse("[\"10.0.0.0/8\"]")).unwrap().is_empty());
    }

    #[test]
    fn networks_keep_only_their_prefix() {
        let ip = Ipv4Addr::new(192, 168, 7, 9);
        assert_eq!(network(ip, 24), Ipv4Addr::new(192, 168, 7, 0));
        assert_eq!(network(ip, 32), ip);
        assert_eq!(network(ip, 0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(network(ip, 12), Ipv4Addr::new(192, 160, 0, 0));
    }

    /// `"local"` holds the special ranges and this host's loopback
    /// address (every host has one), whatever else it has; prefixes are
    /// taken as written.
    #[test]
    fn local_names_the_special_ranges_and_this_host() {
        let text = "role = \"server\"\naddress = \"198.51.100.1\"\n\
                    nat_address = \"203.0.113.1\"\ninterfaces = [\"wan0\"]\n\
                    deny = [\"local\", \"10.0.0.0/8\"]\n";
        let bond_config::Config::Server(cfg) = bond_config::Config::parse(text, "s.toml").unwrap()
        else {
            panic!("not a server");
        };
        let p = prefixes(&cfg).unwrap();
        for want in SPECIAL_RANGES
            .into_iter()
            .chain([(Ipv4Addr::LOCALHOST, 32), (Ipv4Addr::new(10, 0, 0, 0), 8)])
        {
            assert!(p.contains(&want), "{want:?} missing from {p:?}");
        }
        assert!(p.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    }
}
