//! The agents' replies, one type each: the agents build them, the CLI
//! renders them, the tests and benchmarks read them. `docs/operator.md`
//! shows each as JSON; a test here reads every example there back through
//! these types, so the two cannot drift apart.
//!
//! Fields may be added, never renamed or removed. Readers ignore fields
//! they do not know, so an older `bond-ctl` still reads a newer agent.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use bond_config::Fallback;
use serde::{Deserialize, Serialize};

/// Events counted by reason (`rejects`, `faults`).
pub type Counts = BTreeMap<String, u64>;

/// `status`: a terminal's or a server's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Status {
    Terminal(TerminalStatus),
    Server(ServerStatus),
    Director(DirectorStatus),
}

/// A director's state: the registry as it mirrors it, each node's slot
/// and what was steered to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorStatus {
    pub instance: String,
    /// The front address and port.
    pub address: SocketAddrV4,
    pub uptime_s: u64,
    pub attach: Vec<Attached>,
    /// It has read the registry and follows it.
    pub registry: bool,
    pub nodes: Vec<DirectorNode>,
    /// Communities with an owner it can steer to.
    pub steered: usize,
    /// Communities whose owner it cannot reach yet (no slot: the node's
    /// address is on no attached network, or its MAC is unresolved).
    pub unsteered: usize,
    /// Nodes this director fenced (revoked the lease of) for failing
    /// health checks, since it started.
    pub fenced: u64,
    pub drops: Counts,
}

/// One node as a director sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorNode {
    pub name: String,
    pub address: Ipv4Addr,
    /// The interface towards it, and its MAC; none while unresolved.
    pub interface: Option<String>,
    pub mac: Option<String>,
    pub communities: usize,
    /// Packets and bytes steered to it.
    pub packets: u64,
    pub bytes: u64,
    /// Its health checks: `up` (answering), `silent` (answered before,
    /// not lately), `unknown` (never answered, or checks are off).
    pub health: String,
    /// Its last answer's round trip, in microseconds.
    pub rtt_us: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TerminalStatus {
    pub instance: String,
    pub community: u32,
    /// Its LAN address.
    pub address: Ipv4Addr,
    pub server: SocketAddr,
    pub logged_on: bool,
    /// The public key of its identity, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The server refuses it: its community takes terminals by key, and
    /// not this one.
    #[serde(default)]
    pub refused: bool,
    /// Its session with the server is keyed (`[server] key` pinned, and
    /// the server's site key signed the reply that made it).
    #[serde(default)]
    pub session_keyed: bool,
    pub announce_ms: u32,
    pub uptime_s: u64,
    /// Its datapath was adopted from an earlier agent.
    pub adopted: bool,
    pub fallback: Fallback,
    /// Captured traffic goes into the capture device and can be bonded.
    pub bonding: bool,
    pub attach: Vec<Attached>,
    pub draining: bool,
    pub links: Vec<OwnLink>,
    /// Live LAN peers.
    pub peers: usize,
    /// The upstream schedule: (link, kbit/s).
    pub schedule: Vec<(u8, u64)>,
    pub paths: Vec<UpPath>,
    /// None without a playout (`playout = false`).
    pub playout: Option<Playout>,
    pub feedback: Feedback,
    pub resend: Resend,
    pub rejects: Counts,
    pub faults: Counts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub instance: String,
    pub address: SocketAddrV4,
    pub nat_address: Ipv4Addr,
    pub uptime_s: u64,
    pub adopted: bool,
    pub attach: Vec<Attached>,
    pub communities: Vec<CommunityStatus>,
    /// As of the last sweep.
    pub flows: u64,
    pub free_ports: u64,
    #[serde(default)]
    pub nat: NatPool,
    pub flow_table: FlowTable,
    pub playout: Option<Playout>,
    pub feedback: Feedback,
    pub resend: Resend,
    pub split: Split,
    pub rejects: Counts,
    pub faults: Counts,
    /// A node of a tier (`[tier]`): what the registry says of it.
    pub tier: Option<TierStatus>,
}

/// A tier node's standing in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStatus {
    pub node: String,
    /// Its record is in etcd on a live lease.
    pub registered: bool,
    /// It is the elected controller.
    pub controller: bool,
    /// Communities the registry says it owns (those served are in
    /// `communities`).
    pub owned: usize,
}

/// How one program is attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub interface: String,
    /// `tc` or `xdp`.
    pub hook: String,
    /// `tcx`, `netlink`, `native`, `generic` or `adopted`.
    pub mode: String,
}

/// One of a terminal's own links.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnLink {
    pub link: u8,
    pub interface: String,
    pub port: u16,
    /// The announced weights, kbit/s.
    pub up: u32,
    pub down: u32,
    pub up_weight: WeightState,
    pub down_weight: WeightState,
    /// In the datapath's link table (resolved, usable).
    pub active: bool,
    pub dark: bool,
    pub carrier: bool,
    /// False on an L3 device (PPP, raw-IP modem, tun, WireGuard).
    pub ethernet: bool,
    /// Its address: IPv4, or IPv6 for a link over IPv6.
    pub address: Option<IpAddr>,
    pub gateway: Option<IpAddr>,
    /// The base round trip to the server; None until the first echo.
    pub rtt_ms: Option<f64>,
}

/// A link direction's weight: set by hand, or measured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightState {
    pub mode: WeightMode,
    pub measured_kbps: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightMode {
    Fixed,
    Auto,
}

/// One link of an upstream schedule: its rate and its one-way delay over
/// the nearest link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpPath {
    pub link: u8,
    pub kbit: u64,
    pub delay_us: u32,
}

/// One link of a community's downstream schedule at the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownPath {
    /// None for a slot whose link just left.
    pub link: Option<u8>,
    pub kbit: u64,
    pub delay_us: u32,
    /// Jitter counted on top of the delay.
    pub extra_us: u32,
    /// False while the link is left out for silence.
    pub usable: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommunityStatus {
    pub id: u32,
    pub terminals: usize,
    pub links: usize,
    pub flows: u64,
    pub paths: Vec<DownPath>,
    /// Its share of the NAT pool: the address its flows leave from and
    /// its blocks of ports ("first-last"); None while it holds none.
    #[serde(default)]
    pub nat: Option<CommunityNat>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommunityNat {
    pub address: Ipv4Addr,
    pub ports: Vec<String>,
}

/// The server's NAT pool: its addresses, and its blocks of ports held and
/// free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatPool {
    pub addresses: u16,
    pub block: u16,
    pub blocks_held: usize,
    pub blocks_free: usize,
    pub communities: usize,
    /// Communities with terminals on and no block: the pool ran out.
    #[serde(default)]
    pub starved: usize,
}

/// What a receive-side hold did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Playout {
    /// Packets that went through.
    pub packets: u64,
    /// Released after a packet sent later: still out of order (it came
    /// later than every wait allowed).
    pub reordered: u64,
    /// Released before their time because the playout was full.
    pub overflow: u64,
    /// Released after the longest wait past the spread, a delivering link
    /// not having passed them.
    pub timed_out: u64,
    /// The spread held for now, µs: the farthest link's base past the
    /// nearest's (or the floor).
    pub spread_us: i64,
    /// The longest any packet was held, µs.
    pub max_hold_us: u64,
    /// Packets the links lost (gaps in their sequences), asked for again.
    pub lost: u64,
    /// Packets that seemed lost, a later one of their link having come
    /// first, until they came: overtaken on the way in, not lost.
    pub overtaken: u64,
    /// Of them, copies that came in time.
    pub resent: u64,
    /// The longest a copy took from the gap being seen, µs.
    pub max_resend_us: u64,
}

/// The corrections the receivers' reports made to a sender's schedules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    #[serde(flatten)]
    pub counts: FeedbackCounts,
    /// Rates that stand in for weights, learnt from the reports.
    pub learnt: Vec<Learnt>,
    /// Links other senders use too, counted at this sender's share.
    pub sharing: Vec<Sharing>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackCounts {
    pub reports: u64,
    /// Corrections that made a link's queue longer, and shorter.
    pub later: u64,
    pub sooner: u64,
    /// Rates changed by what the corrections showed.
    pub rates: u64,
    /// Jitter counted anew on a link (what a packet that met no queue
    /// showed), and forgotten on links the sender left.
    pub jitter: u64,
    /// Links left out because their packets stopped arriving, or never
    /// arrived.
    pub silenced: u64,
    /// Links cut to this sender's share because others sent over them.
    pub shared: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Learnt {
    /// The downstream schedule's community (None: a terminal's upstream).
    pub community: Option<u32>,
    pub link: u8,
    pub kbit: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sharing {
    pub community: Option<u32>,
    pub link: u8,
    /// This sender's share, and the link's whole rate.
    pub kbit: u64,
    pub of: u64,
}

/// Packets asked for again, and the copies sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resend {
    /// Packets the receiving ends asked for.
    pub asked: u64,
    /// Copies sent again.
    pub sent: u64,
    /// Copies found with no link to send them on.
    pub no_link: u64,
}

/// Replies too big for the links, without DF, cut into fragments by the
/// server's agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Packets split, and the pieces sent on.
    pub packets: u64,
    pub pieces: u64,
    /// Packets that could not be split.
    pub refused: u64,
}

/// What one sweep of the server's flow table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sweep {
    /// Flows in the table when the sweep listed it.
    pub scanned: u64,
    /// Flows removed, by protocol.
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
    /// Ports pushed back to the free queue.
    pub ports_returned: u64,
    /// Flows left in the table (scanned - removed).
    pub kept: u64,
}

impl Sweep {
    pub fn removed(&self) -> u64 {
        self.tcp + self.udp + self.icmp
    }
}

/// The server's flow table as its sweeps count it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTable {
    /// The NAT ports the table was filled with.
    pub nat_ports: u64,
    pub flows: u64,
    pub free_ports: u64,
    pub sweeps: u64,
    pub expired_tcp: u64,
    pub expired_udp: u64,
    pub expired_icmp: u64,
    pub ports_returned: u64,
    pub last: Sweep,
    /// Flows per community after the last sweep.
    #[serde(deserialize_with = "number_keys")]
    pub by_community: BTreeMap<u32, u64>,
}

/// A map with u16 keys, which JSON writes as strings: read inside a tagged
/// enum (as `Status` is), the keys reach the map as strings and are parsed
/// here.
fn number_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, u64>, D::Error> {
    BTreeMap::<String, u64>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| Ok((k.parse().map_err(serde::de::Error::custom)?, v)))
        .collect()
}

impl FlowTable {
    pub fn new(nat_ports: u64) -> Self {
        Self {
            nat_ports,
            free_ports: nat_ports,
            ..Self::default()
        }
    }

    /// Adds a sweep to the account.
    pub fn record(&mut self, r: &Sweep) {
        self.flows = r.kept;
        self.free_ports = self.nat_ports.saturating_sub(r.kept);
        self.sweeps += 1;
        self.expired_tcp += r.tcp;
        self.expired_udp += r.udp;
        self.expired_icmp += r.icmp;
        self.ports_returned += r.ports_returned;
        self.last = *r;
    }
}

/// `peers`: a terminal's table of links, or a server's terminals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Peers {
    Terminal { peers: Vec<PeerRow> },
    Server { terminals: Vec<TerminalRow> },
}

/// The seed's Table 1: one row per link, this host's own first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    pub address: Ipv4Addr,
    /// 0 for a peer without links.
    pub link: u8,
    pub port: u16,
    /// Whole announce intervals since the owner was last heard.
    pub missed: u32,
    pub up: u32,
    pub down: u32,
    #[serde(rename = "self")]
    pub own: bool,
    /// In this host's upstream schedule.
    pub in_use: bool,
}

/// A logged-on terminal, as the server holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRow {
    pub community: u32,
    pub address: Ipv4Addr,
    pub missed: u32,
    pub links: Vec<LinkRow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRow {
    pub link: u8,
    /// Its public address (IPv4, or IPv6 for a link over IPv6) and port,
    /// as the server sees them.
    pub address: SocketAddr,
    pub down: u32,
    pub missed: u32,
}

/// `weight`: the link's weights as they now are (`auto` or kbit/s).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightSet {
    pub link: u8,
    pub up: String,
    pub down: String,
}

/// `drain`: the links leaving the schedules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draining {
    pub draining: bool,
    pub links: usize,
}

/// `detach`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub detached: bool,
}

/// `reload`: what changed (empty: nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    pub changed: Vec<String>,
}

/// `links`: each link's counters from the maps, and the drops by reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Links {
    Terminal(TerminalLinks),
    Server(ServerLinks),
}

/// A terminal's `links`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalLinks {
    pub logged_on: bool,
    pub links: Vec<TerminalLinkCounters>,
    pub drops: Counts,
}

/// The server's `links`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLinks {
    pub links: Vec<ServerLinkCounters>,
    pub drops: Counts,
    /// Things the server's program did that are not drops.
    pub events: Counts,
}

impl Links {
    /// Each link's id and counters, a terminal's or a server's.
    pub fn per_link(&self) -> Vec<(u8, &LinkCounters)> {
        match self {
            Self::Terminal(t) => t.links.iter().map(|l| (l.link, &l.counters)).collect(),
            Self::Server(s) => s.links.iter().map(|l| (l.link, &l.counters)).collect(),
        }
    }

    /// The datapath's drops by reason.
    pub fn drops(&self) -> &Counts {
        match self {
            Self::Terminal(TerminalLinks { drops, .. })
            | Self::Server(ServerLinks { drops, .. }) => drops,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalLinkCounters {
    pub link: u8,
    /// In this host's link table.
    pub active: bool,
    #[serde(flatten)]
    pub counters: LinkCounters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLinkCounters {
    pub community: u32,
    pub link: u8,
    /// Its public address and port: IPv4, or IPv6 for a link over IPv6.
    pub address: SocketAddr,
    #[serde(flatten)]
    pub counters: LinkCounters,
}

/// What a link carried: as the origin (`up`, `down`) and for peers
/// (`relay_up`, `relay_down`), packets and bytes of inner packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCounters {
    pub up_pkts: u64,
    pub up_bytes: u64,
    pub down_pkts: u64,
    pub down_bytes: u64,
    pub relay_up_pkts: u64,
    pub relay_up_bytes: u64,
    pub relay_down_pkts: u64,
    pub relay_down_bytes: u64,
    /// Packets for this host that came after one the server sent later.
    pub down_late: u64,
}

impl From<&bond_common::maps::LinkStats> for LinkCounters {
    fn from(s: &bond_common::maps::LinkStats) -> Self {
        Self {
            up_pkts: s.up_pkts,
            up_bytes: s.up_bytes,
            down_pkts: s.down_pkts,
            down_bytes: s.down_bytes,
            relay_up_pkts: s.relay_up_pkts,
            relay_up_bytes: s.relay_up_bytes,
            relay_down_pkts: s.relay_down_pkts,
            relay_down_bytes: s.relay_down_bytes,
            down_late: s.down_late,
        }
    }
}

/// `flows`: the server's flow table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flows {
    pub flows: Vec<FlowRow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    pub community: u32,
    pub origin: Ipv4Addr,
    /// `tcp`, `udp`, `icmp`, or the protocol's number.
    pub proto: String,
    /// The origin's port (or ICMP echo id).
    pub port: u16,
    /// The dedicated port it is mapped to.
    pub nat_port: u16,
    pub up_pkts: u64,
    pub up_bytes: u64,
    pub down_pkts: u64,
    pub down_bytes: u64,
    pub idle_ms: u64,
    /// A TCP flow that saw FIN or RST, on the short timeout.
    pub closing: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_counts_free_ports_and_totals() {
        let mut g = FlowTable::new(3);
        assert_eq!((g.flows, g.free_ports), (0, 3));
        let r = Sweep {
            scanned: 3,
            tcp: 1,
            udp: 1,
            icmp: 0,
            ports_returned: 2,
            kept: 1,
        };
        assert_eq!(r.removed(), 2);
        g.record(&r);
        g.record(&Sweep {
            scanned: 1,
            kept: 1,
            ..Sweep::default()
        });
        assert_eq!((g.flows, g.free_ports, g.sweeps), (1, 2, 2));
        assert_eq!((g.expired_tcp, g.expired_udp, g.expired_icmp), (1, 1, 0));
        assert_eq!(g.ports_returned, 2);
        assert_eq!(g.last.scanned, 1);
    }
}
