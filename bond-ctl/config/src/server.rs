//! A reconstitution server's file: its interfaces, the communities it
//! serves, its NAT ports and flow table (`[flows]`), and the flows' idle
//! timeouts.

use std::time::Duration;

use bond_common::{
    maps::{FLOW_CLOSING, Flow, FlowKey, MAX_NAT_ADDRESSES},
    wire::{IPPROTO_ICMP, IPPROTO_TCP},
};

use super::*;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Always [`Role::Server`].
    pub role: Role,
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The address terminals send to.
    pub address: Ipv4Addr,
    /// The IPv6 address links that have only IPv6 send to (on the same
    /// port); without it, a link over IPv6 cannot reach this server.
    pub address6: Option<std::net::Ipv6Addr>,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Source address of flows towards content servers: the first of the
    /// NAT pool's `nat_addresses`.
    pub nat_address: Ipv4Addr,
    /// How many consecutive addresses from `nat_address` the NAT uses
    /// (1..=256; each must reach this node). Every community's flows leave
    /// from one of them.
    #[serde(default = "default_nat_addresses")]
    pub nat_addresses: u16,
    /// Ports come to a community in blocks of this many, on its address;
    /// it holds a block while it is logged on, more as its flows grow.
    /// Default: 128, or all of `nat_ports` if they are fewer.
    pub nat_block: Option<u16>,
    /// How a new flow's port is chosen among its community's free ones:
    /// `random` (default: RFC 6056's advice, an off-path host cannot
    /// guess it) or `sequential` (the next after the last taken).
    #[serde(default)]
    pub nat_port_order: PortOrder,
    /// Where each block given and taken back is logged (JSON lines, RFC
    /// 7422): what names the community behind an address and port at a
    /// time (`bond-ctl nat who`). Default: `/var/log/bond/INSTANCE-nat.log`.
    pub nat_log: Option<std::path::PathBuf>,
    /// Source address of IPv6 flows; without it, members' IPv6 is dropped
    /// (`inner_not_ipv4`).
    pub nat_address6: Option<std::net::Ipv6Addr>,
    /// Dedicated ports, "first-last".
    #[serde(default = "default_nat_ports")]
    pub nat_ports: String,
    /// Interfaces the server program is attached to.
    pub interfaces: Vec<String>,
    /// The site's secret key (`bond-ctl identity new`): signs every
    /// LOGIN_REPLY, and keys the session of each terminal that pins its
    /// public key (`[server] key`). The same file on every node of a
    /// tier.
    pub site_key: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Announces a terminal or link may miss before it is dropped.
    #[serde(default = "default_misses")]
    pub misses: u32,
    /// The smallest MTU of the terminals' WAN links: a reply that would not
    /// fit one once wrapped is answered with ICMP fragmentation needed
    /// (next-hop MTU `link_mtu` - 56) rather than lost.
    #[serde(default = "default_link_mtu")]
    pub link_mtu: u16,
    /// Most terminals logged on at once, over all communities: the size of
    /// the session table. A login beyond it is refused until one leaves.
    #[serde(default = "default_max_terminals")]
    pub max_terminals: u32,
    #[serde(default)]
    pub communities: Vec<Community>,
    /// Flow table size and idle timeouts (`[flows]`, optional).
    #[serde(default)]
    pub flows: FlowsConfig,
    /// Hold each upstream packet until the farthest link in use could have
    /// delivered it, and release in the order sent (`bond_agent::playout`).
    #[serde(default = "default_true")]
    pub playout: bool,
    /// How the programs are attached (`[attach]`, optional; only `xdp`
    /// applies: the server has no TC program).
    #[serde(default)]
    pub attach: AttachConfig,
    /// Destinations members may not reach through the server: prefixes,
    /// and `"local"` for the server's own (see [`Deny::Local`]). Default:
    /// `["local"]`; `[]` denies nothing.
    #[serde(default = "default_deny")]
    pub deny: Vec<Deny>,
    /// One node of a site whose communities live in etcd (`[tier]`,
    /// optional): the communities and their keys come from there, and
    /// `communities` must be empty.
    pub tier: Option<TierConfig>,
}

/// `[tier]`: this server is one node of several sharing a site's
/// communities through etcd (`bond_tier`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// etcd's client URLs, `http://host:port`: any member will do.
    pub etcd: Vec<String>,
    /// etcd's user for this node, where etcd's authentication is on
    /// (with `etcd_password_file`).
    pub etcd_user: Option<String>,
    /// The file whose first line is that user's password (mode 0600).
    pub etcd_password_file: Option<PathBuf>,
    /// This node's name in the registry: unique in the site.
    pub node: String,
    /// Its share of the communities, relative to the other nodes'.
    #[serde(default = "default_tier_weight")]
    pub weight: u32,
    /// Where the registry lives in etcd's key space.
    #[serde(default = "default_tier_prefix")]
    pub prefix: String,
    /// Seconds after this node stops renewing its lease (it died or lost
    /// etcd) that its communities move to the others. etcd takes no
    /// less than 2.
    #[serde(default = "default_tier_lease_s")]
    pub lease_s: u32,
    /// This node's own address, where a director forwards its
    /// communities (default: `address`).
    pub node_address: Option<Ipv4Addr>,
    /// The UDP port on `node_address` where the agent answers directors'
    /// health checks (default: `port` + 1).
    pub health_port: Option<u16>,
}

fn default_tier_weight() -> u32 {
    100
}
fn default_tier_prefix() -> String {
    "/bond".into()
}
fn default_tier_lease_s() -> u32 {
    2
}

/// A node name in the registry: 1-63 of `a-z`, `0-9` and `-`.
pub fn valid_node_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl TierConfig {
    /// The health checks' port, for a server on `port`.
    pub fn health_port(&self, port: u16) -> Option<u16> {
        self.health_port.or(port.checked_add(1))
    }

    fn check(&self, communities: usize, address: Ipv4Addr, port: u16) -> Check {
        if communities > 0 {
            return err(
                "communities",
                "with [tier], communities and their keys come from the registry (bond-ctl tier community add)",
            );
        }
        super::director::check_etcd("tier.etcd", &self.etcd)?;
        super::director::check_etcd_user(
            "tier.",
            self.etcd_user.as_deref(),
            self.etcd_password_file.is_some(),
        )?;
        if !valid_node_name(&self.node) {
            return err(
                "tier.node",
                format!("{:?}: use 1-63 of a-z, 0-9 and -", self.node),
            );
        }
        if !(1..=10_000).contains(&self.weight) {
            return err(
                "tier.weight",
                format!("{} is outside 1..=10000", self.weight),
            );
        }
        super::director::check_prefix("tier.prefix", &self.prefix)?;
        if !(2..=60).contains(&self.lease_s) {
            return err(
                "tier.lease_s",
                format!(
                    "{} is outside 2..=60 (etcd grants no lease under 2 s)",
                    self.lease_s
                ),
            );
        }
        match self.health_port(port) {
            None => err(
                "tier.health_port",
                "`port` is 65535: name a port for health checks",
            ),
            Some(p) if p == port && self.node_address.unwrap_or(address) == address => err(
                "tier.health_port",
                format!("{p} is `port` on the same address: choose another"),
            ),
            Some(p) => check_port("tier.health_port", p),
        }
    }
}

/// One entry of the server's destination policy (`deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    /// `"local"`: the server's own addresses, the networks of its
    /// interfaces that bond does not attach to (management, internal),
    /// and the ranges no one on the Internet has: 0.0.0.0/8 (this
    /// network), 127.0.0.0/8 (loopback), 169.254.0.0/16 (link-local),
    /// 224.0.0.0/4 (multicast) and 255.255.255.255/32 (broadcast).
    Local,
    Prefix(Prefix),
}

/// The ranges `"local"` always names, whatever the server's interfaces.
pub const SPECIAL_RANGES: [(Ipv4Addr, u8); 5] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::BROADCAST, 32),
];

impl<'de> Deserialize<'de> for Deny {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "local" {
            return Ok(Self::Local);
        }
        s.parse()
            .map(Self::Prefix)
            .map_err(|e| serde::de::Error::custom(format!("{e} (or \"local\")")))
    }
}

impl std::fmt::Display for Deny {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local => f.write_str("local"),
            Self::Prefix(p) => p.fmt(f),
        }
    }
}

fn default_deny() -> Vec<Deny> {
    vec![Deny::Local]
}

/// The server's `[flows]` table: every key optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsConfig {
    /// Entries of the flow table and its reverse map; default: the number
    /// of dedicated ports. Every flow holds one port, so it must be at
    /// least that (a smaller table would refuse flows while ports sit
    /// free) and at most [`MAX_FLOWS`].
    pub max: Option<u32>,
    /// Idle timeouts in seconds: TCP without FIN or RST seen,
    #[serde(default = "default_tcp_established_s")]
    pub tcp_established_s: u32,
    /// TCP after a FIN or RST in either direction,
    #[serde(default = "default_tcp_closing_s")]
    pub tcp_closing_s: u32,
    /// UDP,
    #[serde(default = "default_udp_s")]
    pub udp_s: u32,
    /// and ICMP echo.
    #[serde(default = "default_icmp_s")]
    pub icmp_s: u32,
    /// How often the agent sweeps the table for idle flows (ms).
    #[serde(default = "default_sweep_ms")]
    pub sweep_ms: u32,
    /// Most flows one origin may hold at once (0: no limit): one host's
    /// flood of new flows cannot take every dedicated port.
    #[serde(default = "default_per_origin")]
    pub per_origin: u32,
}

/// The largest flow table the server agent creates.
pub const MAX_FLOWS: u32 = bond_common::maps::MAX_FLOWS;
/// Most terminals a server can hold sessions for.
pub const MAX_SESSIONS: u32 = bond_common::maps::MAX_SESSIONS;
/// The longest idle timeout accepted: a week.
pub const MAX_TIMEOUT_S: u32 = 7 * 24 * 3600;

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            max: None,
            tcp_established_s: default_tcp_established_s(),
            tcp_closing_s: default_tcp_closing_s(),
            udp_s: default_udp_s(),
            icmp_s: default_icmp_s(),
            sweep_ms: default_sweep_ms(),
            per_origin: default_per_origin(),
        }
    }
}

/// As CGNAT gives a subscriber: thousands of ports, not all of them.
fn default_per_origin() -> u32 {
    4096
}

fn default_tcp_established_s() -> u32 {
    7440
}
fn default_tcp_closing_s() -> u32 {
    120
}
fn default_udp_s() -> u32 {
    300
}
fn default_icmp_s() -> u32 {
    60
}
fn default_sweep_ms() -> u32 {
    1000
}

impl FlowsConfig {
    pub fn timeouts(&self) -> Timeouts {
        let s = |n: u32| std::time::Duration::from_secs(u64::from(n));
        Timeouts {
            tcp_established: s(self.tcp_established_s),
            tcp_closing: s(self.tcp_closing_s),
            udp: s(self.udp_s),
            icmp: s(self.icmp_s),
        }
    }

    pub fn sweep(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.sweep_ms))
    }

    /// The flow table's size for `ports` dedicated ports.
    pub fn table_size(&self, ports: u32) -> u32 {
        self.max.unwrap_or(ports.min(MAX_FLOWS))
    }

    fn check(&self, ports: u32) -> Check {
        if let Some(max) = self.max
            && !(ports.min(MAX_FLOWS)..=MAX_FLOWS).contains(&max)
        {
            return err(
                "flows.max",
                format!(
                    "{max} is outside {}..={MAX_FLOWS} (at least one entry per dedicated port)",
                    ports.min(MAX_FLOWS)
                ),
            );
        }
        for (field, v) in [
            ("flows.tcp_established_s", self.tcp_established_s),
            ("flows.tcp_closing_s", self.tcp_closing_s),
            ("flows.udp_s", self.udp_s),
            ("flows.icmp_s", self.icmp_s),
        ] {
            if !(1..=MAX_TIMEOUT_S).contains(&v) {
                return err(field, format!("{v} is outside 1..={MAX_TIMEOUT_S}"));
            }
        }
        if self.tcp_closing_s > self.tcp_established_s {
            return err(
                "flows.tcp_closing_s",
                format!(
                    "{} is longer than tcp_established_s ({})",
                    self.tcp_closing_s, self.tcp_established_s
                ),
            );
        }
        if !(10..=60_000).contains(&self.sweep_ms) {
            return err(
                "flows.sweep_ms",
                format!("{} is outside 10..=60000", self.sweep_ms),
            );
        }
        if self.per_origin > MAX_FLOWS {
            return err(
                "flows.per_origin",
                format!("{} is outside 0..={MAX_FLOWS}", self.per_origin),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Community {
    pub id: u32,
    /// The key its terminals sign with.
    pub key: CommunityKey,
    /// With it, the community takes only these terminals: LAN address to
    /// the public key of the terminal's `identity` (`bond-ctl identity
    /// new`); a terminal taken out is refused from the next reload on.
    /// Without it, any terminal with the community key.
    pub terminals:
        Option<std::collections::BTreeMap<std::net::Ipv4Addr, bond_proto::identity::PublicKey>>,
}

fn default_max_terminals() -> u32 {
    MAX_SESSIONS
}

fn default_nat_ports() -> String {
    "20000-29999".into()
}

/// `nat_port_order`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortOrder {
    #[default]
    Random,
    Sequential,
}

impl PortOrder {
    /// As `ServerConfig::nat_order` in the map says it.
    pub fn map_value(self) -> u16 {
        match self {
            Self::Random => bond_common::maps::NAT_RANDOM,
            Self::Sequential => bond_common::maps::NAT_SEQUENTIAL,
        }
    }
}

fn default_nat_addresses() -> u16 {
    1
}

/// 78 blocks of the default range on each address; 64 of them (8,192
/// ports) the most one community holds.
const DEFAULT_NAT_BLOCK: u16 = 128;

impl ServerConfig {
    /// The dedicated port range.
    pub fn port_range(&self) -> Result<(u16, u16), String> {
        let (a, b) = self
            .nat_ports
            .split_once('-')
            .ok_or_else(|| format!("{:?} must be \"first-last\"", self.nat_ports))?;
        let (a, b): (u16, u16) = (
            a.trim()
                .parse()
                .map_err(|_| format!("{a:?} is not a port"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("{b:?} is not a port"))?,
        );
        if a == 0 || a > b {
            return Err(format!("{:?} is empty or starts at 0", self.nat_ports));
        }
        Ok((a, b))
    }

    pub(crate) fn check(&self) -> Check {
        check_instance(&self.instance)?;
        check_misses(self.misses)?;
        check_port("port", self.port)?;
        if self.attach.tc != TcAttach::Auto {
            return err(
                "attach.tc",
                "the server has no TC program (only `attach.xdp` applies)",
            );
        }
        let (lo, hi) = self
            .port_range()
            .map_err(|m| ("nat_ports".to_string(), m))?;
        if (lo..=hi).contains(&self.port) && self.nat_pool().any(|a| a == self.address) {
            return err(
                "nat_ports",
                format!("range contains the server port {}", self.port),
            );
        }
        if !(MIN_LINK_MTU..=9000).contains(&self.link_mtu) {
            return err(
                "link_mtu",
                format!("{} is outside {MIN_LINK_MTU}..=9000", self.link_mtu),
            );
        }
        if !(1..=MAX_SESSIONS).contains(&self.max_terminals) {
            return err(
                "max_terminals",
                format!("{} is outside 1..={MAX_SESSIONS}", self.max_terminals),
            );
        }
        if self.interfaces.is_empty() {
            return err("interfaces", "list the interfaces to attach to");
        }
        for (i, n) in self.interfaces.iter().enumerate() {
            check_ifname(&format!("interfaces[{i}]"), n)?;
        }
        let mut ids = HashSet::new();
        for (c, com) in self.communities.iter().enumerate() {
            if !ids.insert(com.id) {
                return err(
                    format!("communities[{c}].id"),
                    format!("community {} is listed twice", com.id),
                );
            }
            check_key(&format!("communities[{c}].key"), &com.key)?;
        }
        if let Some(tier) = &self.tier {
            tier.check(self.communities.len(), self.address, self.port)?;
        }
        if !(1..=MAX_NAT_ADDRESSES).contains(&u32::from(self.nat_addresses)) {
            return err(
                "nat_addresses",
                format!("{} is outside 1..={MAX_NAT_ADDRESSES}", self.nat_addresses),
            );
        }
        if u32::from(self.nat_address)
            .checked_add(u32::from(self.nat_addresses) - 1)
            .is_none()
        {
            return err(
                "nat_addresses",
                format!(
                    "{} addresses from {} run past 255.255.255.255",
                    self.nat_addresses, self.nat_address
                ),
            );
        }
        if self.nat_block() == 0 || u32::from(self.nat_block()) > u32::from(hi - lo) + 1 {
            return err(
                "nat_block",
                format!(
                    "{} is outside 1..={} (the ports of `nat_ports`)",
                    self.nat_block(),
                    u32::from(hi - lo) + 1
                ),
            );
        }
        self.flows
            .check((u32::from(hi - lo) + 1) * u32::from(self.nat_addresses))?;
        if self.deny.len() > bond_common::maps::MAX_DENY as usize / 2 {
            return err(
                "deny",
                format!(
                    "{} entries; at most {}",
                    self.deny.len(),
                    bond_common::maps::MAX_DENY / 2
                ),
            );
        }
        for (i, d) in self.deny.iter().enumerate() {
            if let Deny::Prefix(p) = d
                && p.len == 0
            {
                return err(
                    format!("deny[{i}]"),
                    format!("{p} denies every destination"),
                );
            }
        }
        Ok(())
    }

    /// How many dedicated ports `nat_ports` holds.
    pub fn port_count(&self) -> Result<u32, String> {
        self.port_range().map(|(lo, hi)| u32::from(hi - lo) + 1)
    }

    /// Ports per block (`nat_block`, or its default).
    pub fn nat_block(&self) -> u16 {
        self.nat_block.unwrap_or_else(|| {
            let ports = self
                .port_count()
                .unwrap_or(1)
                .min(u32::from(DEFAULT_NAT_BLOCK));
            ports as u16
        })
    }

    /// The NAT pool's addresses, `nat_address` first.
    pub fn nat_pool(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (0..u32::from(self.nat_addresses)).filter_map(|i| {
            u32::from(self.nat_address)
                .checked_add(i)
                .map(Ipv4Addr::from)
        })
    }

    /// The dedicated ports of the whole pool (every address's).
    pub fn pool_ports(&self) -> Result<u32, String> {
        Ok(self
            .port_count()?
            .saturating_mul(u32::from(self.nat_addresses)))
    }

    /// Where blocks given and taken back are logged.
    pub fn nat_log(&self) -> std::path::PathBuf {
        self.nat_log.clone().unwrap_or_else(|| {
            std::path::Path::new("/var/log/bond").join(format!("{}-nat.log", self.instance))
        })
    }
}

/// How long a flow may stay idle, by protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP with no FIN or RST seen: RFC 5382 REQ-5 (at least 2 h 4 min).
    pub tcp_established: Duration,
    /// TCP after a FIN or RST in either direction (Linux conntrack's
    /// TIME_WAIT and FIN_WAIT figure).
    pub tcp_closing: Duration,
    /// UDP: RFC 4787 REQ-5 (at least 2 min, 5 min recommended).
    pub udp: Duration,
    /// ICMP echo: RFC 5508 REQ-1 (at least 60 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(7440),
            tcp_closing: Duration::from_secs(120),
            udp: Duration::from_secs(300),
            icmp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The idle time after which this flow expires. Protocols the program
    /// does not create flows for (none today) get the UDP timeout.
    pub fn of(&self, key: &FlowKey, flow: &Flow) -> Duration {
        match key.proto {
            IPPROTO_TCP if flow.state & FLOW_CLOSING != 0 => self.tcp_closing,
            IPPROTO_TCP => self.tcp_established,
            IPPROTO_ICMP => self.icmp,
            _ => self.udp,
        }
    }

    /// Whether the flow has been idle at `now_ns` (CLOCK_MONOTONIC) for at
    /// least its timeout. A packet stamped after `now_ns` counts as idle 0.
    pub fn expired(&self, key: &FlowKey, flow: &Flow, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(flow.last_seen_ns);
        u128::from(idle) >= self.of(key, flow).as_nanos()
    }
}

#[cfg(test)]
mod timeout_tests {
    use bond_common::{
        maps::{FLOW_FIN, FLOW_RST},
        wire::IPPROTO_UDP,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(proto: u8) -> FlowKey {
        FlowKey::new(1, proto, 0x0a00_0103, 40000)
    }

    fn flow(state: u8, last_seen_ns: u64) -> Flow {
        Flow {
            state,
            last_seen_ns,
            up_pkts: 1,
            up_bytes: 60,
            ..Flow::new((0, 20000), 0, 0x0a00_0001, 443)
        }
    }

    /// (expired just before the timeout, expired at it) for a flow last
    /// seen at 1000 s.
    fn around(t: &Timeouts, proto: u8, state: u8, timeout_s: u64) -> (bool, bool) {
        let (k, f) = (key(proto), flow(state, 1000 * S));
        (
            t.expired(&k, &f, (1000 + timeout_s) * S - 1),
            t.expired(&k, &f, (1000 + timeout_s) * S),
        )
    }

    #[test]
    fn defaults_follow_the_rfcs() {
        let t = Timeouts::default();
        assert_eq!(t.tcp_established, Duration::from_secs(7440));
        assert_eq!(t.tcp_closing, Duration::from_secs(120));
        assert_eq!(t.udp, Duration::from_secs(300));
        assert_eq!(t.icmp, Duration::from_secs(60));
    }

    #[test]
    fn each_protocol_expires_after_its_own_timeout() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(50),
            tcp_closing: Duration::from_secs(5),
            udp: Duration::from_secs(20),
            icmp: Duration::from_secs(10),
        };
        let cases = [
            ("tcp established", IPPROTO_TCP, 0, 50),
            ("tcp after FIN", IPPROTO_TCP, FLOW_FIN, 5),
            ("tcp after RST", IPPROTO_TCP, FLOW_RST, 5),
            ("tcp after both", IPPROTO_TCP, FLOW_FIN | FLOW_RST, 5),
            ("udp", IPPROTO_UDP, 0, 20),
            ("icmp", IPPROTO_ICMP, 0, 10),
            // The state byte means something for TCP only.
            ("udp with state bits", IPPROTO_UDP, FLOW_FIN, 20),
            ("icmp with state bits", IPPROTO_ICMP, FLOW_RST, 10),
            ("another protocol", 47, 0, 20),
        ];
        for (what, proto, state, secs) in cases {
            assert_eq!(
                around(&t, proto, state, secs),
                (false, true),
                "{what}: expires exactly {secs} s after its last packet"
            );
        }
    }

    #[test]
    fn a_packet_after_now_or_a_fresh_flow_is_not_expired() {
        let t = Timeouts::default();
        let k = key(IPPROTO_UDP);
        // The program stamped it after the agent read the clock.
        assert!(!t.expired(&k, &flow(0, 2000 * S), 1000 * S));
        assert!(!t.expired(&k, &flow(0, 1000 * S), 1000 * S));
        // Long-lived numbers do not overflow.
        assert!(t.expired(&k, &flow(0, 0), u64::MAX));
    }
}
