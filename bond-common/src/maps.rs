//! Map names, sizes and value types shared by the programs and the agent.
//!
//! Conventions: every address and port in a map is a host-order number
//! (`u32::from(Ipv4Addr)`), converted at the packet edge; no type has
//! implicit padding (explicit `_pad`, size asserted beside each type).

/// Bumped whenever a map's type, key, value or meaning changes: an agent
/// adopts pinned maps only of its own layout.
pub const LAYOUT_VERSION: u32 = 11;

/// Link ids are a `u8` on the wire.
pub const MAX_LINK_IDS: u32 = 256;
/// Links one server can hold across all communities.
pub const MAX_SERVER_LINKS: u32 = 65_536;
/// A community's id, as the bond header carries it: 32 bits, so that an
/// ISP tier can tell millions of communities apart.
pub type CommunityId = u32;
/// Communities one server or tier node holds at once (sessions, schedules,
/// NAT shares): each has a link at least, and a node holds at most
/// `MAX_SERVER_LINKS`.
pub const MAX_COMMUNITIES: u32 = 65_536;
/// Communities a tier's owner tables (`D_OWNERS`, `S_OWNERS`) can name:
/// 4,194,304. Hash maps, their entries allocated as communities are
/// placed; their buckets take 16 bytes each up front (64 MiB at this
/// size), so a server outside a tier makes its `S_OWNERS` of one entry
/// (`flows::server_map_sizes`).
pub const MAX_TIER_COMMUNITIES: u32 = 1 << 22;
pub const MAX_SESSIONS: u32 = 65_536;
pub const MAX_NEIGHBORS: u32 = 1024;
/// Default size of the server's flow table (the agent may choose smaller).
pub const MAX_FLOWS: u32 = 262_144;
/// Prefixes in the server's destination policy (`S_DENY`).
pub const MAX_DENY: u32 = 4096;
/// Datagrams arriving in fragments the server follows at once (`S_FRAGS`).
pub const MAX_FRAGS: u32 = 8192;

/// Map names: the programs declare them, the agent and CLI open them.
pub mod name {
    pub const T_CONFIG: &str = "T_CONFIG";
    pub const T_LINKS6: &str = "T_LINKS6";
    pub const T_UP_LINKS: &str = "T_UP_LINKS";
    pub const T_PATHS: &str = "T_PATHS";
    pub const T_RELAY: &str = "T_RELAY";
    pub const T_NEIGH: &str = "T_NEIGH";
    pub const T_LINK_STATS: &str = "T_LINK_STATS";
    pub const T_DROPS: &str = "T_DROPS";
    pub const T_DOWN_LATEST: &str = "T_DOWN_LATEST";
    pub const T_HOLD: &str = "T_HOLD";
    pub const T_LINK_SEQ: &str = "T_LINK_SEQ";
    pub const T_KEPT: &str = "T_KEPT";
    pub const T_KEPT_NEXT: &str = "T_KEPT_NEXT";
    pub const S_HOLD: &str = "S_HOLD";
    pub const S_CONFIG: &str = "S_CONFIG";
    pub const S_SESSIONS: &str = "S_SESSIONS";
    pub const S_LINK_INDEX: &str = "S_LINK_INDEX";
    pub const S_LINKS: &str = "S_LINKS";
    pub const S_LINKS6: &str = "S_LINKS6";
    pub const S_PATHS: &str = "S_PATHS";
    pub const S_FLOWS: &str = "S_FLOWS";
    pub const S_NAT: &str = "S_NAT";
    pub const S_PERMITS: &str = "S_PERMITS";
    pub const S_DENY: &str = "S_DENY";
    pub const S_NAT_BLOCKS: &str = "S_NAT_BLOCKS";
    pub const S_LINK_STATS: &str = "S_LINK_STATS";
    pub const S_DROPS: &str = "S_DROPS";
    pub const S_EVENTS: &str = "S_EVENTS";
    pub const D_CONFIG: &str = "D_CONFIG";
    pub const D_OWNERS: &str = "D_OWNERS";
    pub const D_NODES: &str = "D_NODES";
    pub const D_STATS: &str = "D_STATS";
    pub const D_DROPS: &str = "D_DROPS";
    pub const S_OWNERS: &str = "S_OWNERS";
    pub const S_NODES: &str = "S_NODES";
    pub const S_NODE_MACS: &str = "S_NODE_MACS";
    pub const S_ORIGIN_FLOWS: &str = "S_ORIGIN_FLOWS";
    pub const S_LINK_SEQ: &str = "S_LINK_SEQ";
    pub const S_KEPT: &str = "S_KEPT";
    pub const S_KEPT_NEXT: &str = "S_KEPT_NEXT";
    pub const S_FRAGS: &str = "S_FRAGS";
    pub const S_SPLIT: &str = "S_SPLIT";
    pub const S_FLOWS6: &str = "S_FLOWS6";
    pub const S_NAT6: &str = "S_NAT6";
    pub const S_PERMITS6: &str = "S_PERMITS6";
    pub const S_DENY6: &str = "S_DENY6";
    pub const S_JUMP: &str = "S_JUMP";
}

/// The server's tail calls (`S_JUMP`), programs of their own so that each
/// stays well inside the verifier's budget: `bond_server` hands inner
/// IPv6, both ways, to `bond_server6`...
pub const JUMP_V6: u32 = 0;
/// ...both hand an origin's packet whose TTL (hop limit) runs out at
/// the server to `bond_server_expired`, which answers it...
pub const JUMP_EXPIRED: u32 = 1;
/// ...`bond_server` hands DATA_UP from a link over IPv6 to
/// `bond_server_in6`, which checks its source, turns its outer header into
/// the IPv4 form and hands it back to `bond_server` (`JUMP_SERVER`)...
pub const JUMP_IN6: u32 = 2;
/// ...and every wrap for such a link goes out through `bond_server_out6`,
/// which turns the IPv4 form into the IPv6 outer header.
pub const JUMP_OUT6: u32 = 3;
pub const JUMP_SERVER: u32 = 4;
pub const JUMP_SLOTS: u32 = 5;
/// The programs at each slot of `S_JUMP`, in slot order.
pub const JUMP_PROGRAMS: [&str; JUMP_SLOTS as usize] = [
    "bond_server6",
    "bond_server_expired",
    "bond_server_in6",
    "bond_server_out6",
    "bond_server",
];
/// The most time-exceeded answers `bond_server_expired` sends per second
/// per CPU, as a router limits its ICMP errors; past it the packet is only
/// dropped (`ttl_exceeded`).
pub const EXPIRED_PER_SEC: u64 = 100;

/// Non-drop events the server counts (index into `S_EVENTS`).
pub mod event {
    /// Rewritten packet handed to the kernel because the next hop's MAC
    /// was not resolved yet; the kernel forwards it and resolves it.
    pub const SLOW_PATH: u32 = 0;
    pub const FLOW_CREATED: u32 = 1;
    /// Two CPUs created the same flow at once; the loser's port went back.
    pub const FLOW_RACE: u32 = 2;
    /// A downstream packet too big for the links, answered with ICMP
    /// fragmentation needed (it is counted as a `too_big` drop as well).
    pub const FRAG_NEEDED: u32 = 3;
    /// An ICMP error about a flow's packet, translated and sent on to the
    /// flow's origin.
    pub const ICMP_ERROR_RELAYED: u32 = 4;
    /// A downstream packet too big for the links and free to be
    /// fragmented, handed to the agent to split (`S_SPLIT`).
    pub const SPLIT: u32 = 5;
    /// An origin's packet whose TTL (hop limit) ran out at the server,
    /// answered with ICMP time exceeded from the NAT address (it is
    /// counted as a `ttl_exceeded` drop as well).
    pub const TIME_EXCEEDED: u32 = 6;
    /// At a node of a tier: bond traffic of a community another node
    /// owns, passed on to it (a director steered by an older view).
    pub const FORWARDED: u32 = 7;
    pub const COUNT: u32 = 8;
    pub const NAMES: [&str; COUNT as usize] = [
        "slow_path",
        "flows_created",
        "flow_race",
        "frag_needed_sent",
        "icmp_errors_relayed",
        "split",
        "time_exceeded_sent",
        "forwarded_to_owner",
    ];
}

/// The receiving end's playout (`T_HOLD[0]` on a terminal, `S_HOLD[0]` on
/// the server): DATA for this host goes,
/// still wrapped, to a hold device that the agent reads, and comes back
/// through the same program when its time comes (`bond_agent::playout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hold {
    /// The hold device's ifindex; 0 delivers at once.
    pub ifindex: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns until which the agent's playout is known to be
    /// reading; past it the program delivers at once, so a dead agent does
    /// not take the traffic with it.
    pub alive_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Hold>() == 16);

impl Hold {
    /// Whether a packet that arrived on `ingress` at `now_ns` goes to the
    /// hold device: not when it comes from there, or nobody reads it.
    #[inline(always)]
    pub const fn takes(&self, ingress: u32, now_ns: u64) -> bool {
        self.ifindex != 0 && ingress != self.ifindex && now_ns < self.alive_until_ns
    }
}

/// Copies a sender keeps of what it sent lately: a ring of this many.
/// At 100 Mbit/s of full-size packets it holds about a second.
pub const KEPT_SLOTS: u32 = 8192;
/// The most a copy holds: the bond header and an inner packet of a
/// 1500-byte link.
pub const KEPT_MAX: usize = 1504;

/// One packet as its sender sent it (`S_KEPT`, `T_KEPT`), so the receiving end can
/// ask for it again when its link lost it (`bond_agent::resend`). The ring
/// is written without a lock (the next slot from `S_KEPT_NEXT`, bumped
/// without an atomic): two CPUs may write one slot at once, so a reader
/// checks that the copy's own header says what the slot's fields say.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    /// The bond header's `sent_us`.
    pub sent_us: u32,
    /// The sender's index of the link (`S_LINKS` on the server, the link
    /// id at an origin).
    pub idx: u32,
    pub community: CommunityId,
    /// Bytes in `data`; 0: an empty slot.
    pub len: u16,
    /// The link id and sequence the bond header carries.
    pub link: u8,
    pub seq: u8,
    /// The bond header and the inner packet.
    pub data: [u8; KEPT_MAX],
}
const _: () = assert!(core::mem::size_of::<Kept>() == 16 + KEPT_MAX);

impl Kept {
    pub const EMPTY: Self = Self {
        sent_us: 0,
        idx: 0,
        community: 0,
        len: 0,
        link: 0,
        seq: 0,
        data: [0; KEPT_MAX],
    };

    /// The copy's bytes, when they are whole and still the packet the
    /// slot's fields describe (not overwritten since).
    pub fn bytes(&self) -> Option<&[u8]> {
        let d = self.data.get(..usize::from(self.len))?;
        let h = crate::wire::BondHdr::parse(d).ok()?;
        (h.is_data()
            && h.sent_us() == self.sent_us
            && h.link == self.link
            && h.seq == self.seq
            && h.community() == self.community)
            .then_some(d)
    }
}

/// A terminal's own identity (`T_CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TerminalConfig {
    pub token: u64,
    pub lan_ip: u32,
    pub server_ip: u32,
    pub lan_ifindex: u32,
    pub community: CommunityId,
    /// UDP port every terminal receives DATA_DOWN on over the LAN.
    pub data_port: u16,
    pub server_port: u16,
    pub lan_mac: [u8; 6],
    pub _pad: [u8; 6],
    /// The server's IPv6 address, which links over IPv6 (`LINK_V6`) reach
    /// (all zero: none do).
    pub server_ip6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<TerminalConfig>() == 56);

/// `UpLink::flags` bit: the entry is in use.
pub const LINK_VALID: u8 = 1;
/// `RelayLink::flags` and `UpLink::flags` bit: the link's device has no
/// Ethernet header (PPP, raw-IP modem, tun, WireGuard). XDP cannot send to
/// it: the LAN's TC program relays to it, and its own TC program receives
/// from it; `bond_wrap` makes the skb's protocol the outer header's.
pub const LINK_L3: u8 = 2;
/// `ServerLink::flags` (and, on terminals, `UpLink::flags` and
/// `RelayLink::flags`) bit: the link reaches the server over IPv6. Its
/// outer header is IPv6 on the wire; inside the programs it is turned into
/// the IPv4 form the rest of the code reads, whose addresses are then
/// placeholders (`ServerLink::ip` is 0, the address is in `S_LINKS6`).
pub const LINK_V6: u8 = 4;

/// Where an origin's upstream packet on one link goes (`T_UP_LINKS[link]`):
/// to a LAN peer's relay port, or straight out of one of its own WAN links.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpLink {
    pub ifindex: u32,
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Largest outer packet the link carries (its IP MTU).
    pub mtu: u16,
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<UpLink>() == 32);

/// One of this terminal's own WAN links, keyed by its UDP port (`T_RELAY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLink {
    pub wan_ifindex: u32,
    pub wan_ip: u32,
    pub link: u8,
    /// [`LINK_L3`], or 0.
    pub flags: u8,
    pub port: u16,
    pub wan_mac: [u8; 6],
    pub gw_mac: [u8; 6],
    pub mtu: u16,
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<RelayLink>() == 28);

/// A LAN peer's MAC address (`T_NEIGH[ip]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbor {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Neighbor>() == 8);

/// Per-link packet and byte counters, per CPU. On a terminal: `up` is what
/// it sent as origin, `relay_up`/`relay_down` what it forwarded for others,
/// `down` what it unwrapped for itself. On the server: `up` is received
/// from the link, `down` sent on it. Bytes are those of the carried (inner)
/// IPv4 packets everywhere, so counters at each hop compare directly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub up_pkts: u64,
    pub up_bytes: u64,
    pub down_pkts: u64,
    pub down_bytes: u64,
    pub relay_up_pkts: u64,
    pub relay_up_bytes: u64,
    pub relay_down_pkts: u64,
    pub relay_down_bytes: u64,
    /// On a terminal: DATA_DOWN packets for this host that came over this
    /// link after one the server sent later (by the send times in their
    /// headers), as delivered to the host (after the playout, if it runs):
    /// TCP saw them reordered.
    pub down_late: u64,
}
const _: () = assert!(core::mem::size_of::<LinkStats>() == 72);

impl LinkStats {
    /// Sums per-CPU values.
    pub fn add(&mut self, o: &Self) {
        self.up_pkts += o.up_pkts;
        self.up_bytes += o.up_bytes;
        self.down_pkts += o.down_pkts;
        self.down_bytes += o.down_bytes;
        self.relay_up_pkts += o.relay_up_pkts;
        self.relay_up_bytes += o.relay_up_bytes;
        self.relay_down_pkts += o.relay_down_pkts;
        self.relay_down_bytes += o.relay_down_bytes;
        self.down_late += o.down_late;
    }
}

/// Nodes a director steers to (`D_NODES`).
pub const MAX_NODES: u32 = 256;

/// A director's identity (`D_CONFIG[0]`): bond traffic to this address
/// and port is steered to the node that owns its community.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectorConfig {
    /// The front address terminals send to (network order as a u32 read
    /// big-endian, as `ServerConfig::wan_ip`).
    pub front_ip: u32,
    pub port: u16,
    pub _pad: u16,
    /// The front IPv6 address (all zero: none).
    pub front_ip6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DirectorConfig>() == 24);

/// Where a director sends one node's packets (`D_NODES`, by node index):
/// out of `ifindex`, to `dst_mac`, from `src_mac` (L2 forwarding: the node
/// holds the front address itself and answers from it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeSlot {
    /// 0: an empty slot.
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NodeSlot>() == 16);

/// A MAC address as a map key (`S_NODE_MACS`): its six bytes in the low
/// 48 bits, big-endian.
pub const fn mac_key(mac: [u8; 6]) -> u64 {
    u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]])
}

/// The server's identity (`S_CONFIG[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Outer destination address bond traffic arrives on.
    pub wan_ip: u32,
    /// Source address of unwrapped packets towards content servers.
    pub nat_ip: u32,
    pub port: u16,
    /// Dedicated ports are taken from `[port_min, port_max]`.
    pub port_min: u16,
    pub port_max: u16,
    /// The smallest MTU of the community links (0: no limit). A downstream
    /// packet that would not fit one once wrapped is answered with ICMP
    /// fragmentation needed instead.
    pub link_mtu: u16,
    /// Most flows one origin may hold (0: no limit), so that one host's
    /// flood of new flows cannot take every port of its community.
    pub per_origin: u32,
    /// Source address of unwrapped IPv6 packets (all zero: no IPv6).
    pub nat_ip6: [u8; 16],
    /// Outer destination address of links that reach the server over
    /// IPv6 (all zero: none do).
    pub wan_ip6: [u8; 16],
    /// The NAT pool: `nat_count` addresses from `nat_ip` on (0 counts as
    /// 1), address `nat_ip + i` is the pool's `i`.
    pub nat_count: u16,
    /// Dedicated ports come in blocks of this many (`NatBlocks`).
    pub nat_block: u16,
    /// How a new flow's port is chosen among its community's free ones:
    /// `NAT_RANDOM` (RFC 6056's advice for a NAT) or `NAT_SEQUENTIAL`.
    pub nat_order: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServerConfig>() == 60);

/// `ServerConfig::nat_order`: a random free port of the community's
/// blocks, so that an off-path host cannot guess the next flow's...
pub const NAT_RANDOM: u16 = 0;
/// ...or the next free one after the last taken (`NatBlocks::next`):
/// predictable, as a reader of a packet capture or a test expects.
pub const NAT_SEQUENTIAL: u16 = 1;

impl ServerConfig {
    /// Address `index` of the NAT pool.
    #[inline(always)]
    pub const fn nat_address(&self, index: u8) -> u32 {
        self.nat_ip.wrapping_add(index as u32)
    }

    /// The index in the NAT pool of IPv4 address `ip`, if it is one of
    /// the pool's.
    #[inline(always)]
    pub const fn nat_index(&self, ip: u32) -> Option<u8> {
        let i = ip.wrapping_sub(self.nat_ip);
        let n = if self.nat_count == 0 {
            1
        } else {
            self.nat_count as u32
        };
        if i < n && i < MAX_NAT_ADDRESSES {
            Some(i as u8)
        } else {
            None
        }
    }
}

/// The most addresses a NAT pool holds (an index fits a byte).
pub const MAX_NAT_ADDRESSES: u32 = 256;
/// The most port blocks one community holds at a node.
pub const MAX_NAT_BLOCKS: usize = 64;

/// A community's share of the NAT pool (`S_NAT_BLOCKS`, by community):
/// one address (RFC 4787's "paired" pooling: every flow of a community
/// leaves from the same address) and `count` blocks of ports on it, each
/// `ServerConfig::nat_block` ports from `first[i]`. The agent hands
/// blocks out and takes them back, and logs each (RFC 7422), so that an
/// address, a port and a time name one community; the datapath takes a
/// free port of the community's blocks for each new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatBlocks {
    /// The address's index in the pool.
    pub index: u8,
    /// Blocks held (at most `MAX_NAT_BLOCKS`).
    pub count: u8,
    /// Where `NAT_SEQUENTIAL` looks first: an offset into the share's
    /// ports, block after block (the datapath moves it on).
    pub next: u16,
    pub first: [u16; MAX_NAT_BLOCKS],
}
const _: () = assert!(core::mem::size_of::<NatBlocks>() == 132);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub community: CommunityId,
    pub origin: u32,
}
const _: () = assert!(core::mem::size_of::<SessionKey>() == 8);

impl SessionKey {
    #[inline(always)]
    pub const fn new(community: CommunityId, origin: u32) -> Self {
        Self { community, origin }
    }
}

/// A logged-on origin terminal (`S_SESSIONS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    pub token: u64,
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<Session>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkKey {
    pub community: CommunityId,
    pub link: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<LinkKey>() == 8);

impl LinkKey {
    #[inline(always)]
    pub const fn new(community: CommunityId, link: u8) -> Self {
        Self {
            community,
            link,
            _pad: [0; 3],
        }
    }
}

/// A community link as the server sees it (`S_LINKS[index]`; the index is
/// dense, assigned by the agent, and `S_LINK_INDEX` maps `LinkKey` to it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLink {
    /// The link's public address and port (outer source of its DATA_UP).
    pub ip: u32,
    pub community: CommunityId,
    /// The terminal that owns the link (its LAN address): not used by the
    /// datapath, but a restarted agent rebuilds its tables from it.
    pub owner: u32,
    pub port: u16,
    pub link: u8,
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<ServerLink>() == 16);

/// Flow identity at the server: one per (community, origin, protocol,
/// inner source port or ICMP identifier).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub community: CommunityId,
    pub origin: u32,
    pub proto: u8,
    pub _pad: u8,
    pub port: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 12);

impl FlowKey {
    /// The flow of `origin` in `community` from its own `port` (or ICMP
    /// identifier) over `proto`.
    #[inline(always)]
    pub const fn new(community: CommunityId, proto: u8, origin: u32, port: u16) -> Self {
        Self {
            community,
            origin,
            proto,
            _pad: 0,
            port,
        }
    }

    /// Where this flow's dedicated port leads back to.
    #[inline(always)]
    pub const fn nat(&self) -> NatEntry {
        NatEntry::new(self.community, self.origin, self.port)
    }
}

/// `Flow::state` bit: a TCP segment with FIN passed (either direction).
pub const FLOW_FIN: u8 = 1;
/// `Flow::state` bit: a TCP segment with RST passed (either direction).
pub const FLOW_RST: u8 = 2;
/// `Flow::state` bits that put a TCP flow on the short (closing) timeout.
pub const FLOW_CLOSING: u8 = FLOW_FIN | FLOW_RST;

/// TCP header flag bits (byte 13 of the header).
pub mod tcp {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
    /// Offset of the flags byte in the TCP header.
    pub const FLAGS_OFF: usize = 13;

    /// Whether a TCP segment is a pure ACK: it acknowledges and carries
    /// nothing else, no payload and none of SYN, FIN, RST. `ip_len` is the
    /// IPv4 total length of a packet with a 20-byte header; `off_flags` are
    /// bytes 12 and 13 of its TCP header (data offset, flags).
    ///
    /// The playouts let pure ACKs by: nothing in them needs order (TCP
    /// takes the newest cumulative ACK and ignores older ones), and held
    /// for the far link's delay they stretch the round trip the sender
    /// measures by that much, which slows every flow's growth.
    #[inline(always)]
    pub const fn pure_ack(ip_len: u16, off_flags: [u8; 2]) -> bool {
        ip_len >= 20 && pure_segment(ip_len - 20, off_flags)
    }

    /// [`pure_ack`] for IPv6 without extension headers: `payload_len` is
    /// the IPv6 payload length (the whole TCP segment).
    #[inline(always)]
    pub const fn pure_ack6(payload_len: u16, off_flags: [u8; 2]) -> bool {
        pure_segment(payload_len, off_flags)
    }

    /// A TCP segment of `len` bytes is its header alone, with ACK and none
    /// of SYN, FIN, RST.
    #[inline(always)]
    const fn pure_segment(len: u16, off_flags: [u8; 2]) -> bool {
        let words = (off_flags[0] >> 4) as u16;
        words >= 5 && off_flags[1] & (SYN | FIN | RST | ACK) == ACK && len == 4 * words
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The dedicated port this flow uses towards content servers.
    pub nat_port: u16,
    /// The port of `remote` (0 for ICMP echo).
    pub remote_port: u16,
    /// `FLOW_*` bits (TCP only; zero for UDP and ICMP).
    pub state: u8,
    /// The address in the NAT pool this flow uses (its community's).
    pub nat_index: u8,
    pub _pad: [u8; 2],
    /// The remote address the origin first sent to on this flow: replies
    /// from it (and `remote_port`) are let in without further lookup;
    /// replies from any other remote endpoint need a [`PermitKey`] entry,
    /// made when the origin sent to that endpoint (address-and-port-
    /// dependent filtering, RFC 4787).
    pub remote: u32,
    pub _pad2: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub up_pkts: u64,
    pub up_bytes: u64,
    pub down_pkts: u64,
    pub down_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 64);

impl Flow {
    /// A new flow on dedicated port `nat.1` of pool address `nat.0`, first seen at `now_ns`
    /// sending to `remote`:`remote_port`.
    #[inline(always)]
    pub const fn new(nat: (u8, u16), now_ns: u64, remote: u32, remote_port: u16) -> Self {
        Self {
            nat_port: nat.1,
            remote_port,
            state: 0,
            nat_index: nat.0,
            _pad: [0; 2],
            remote,
            _pad2: 0,
            created_ns: now_ns,
            last_seen_ns: now_ns,
            up_pkts: 0,
            up_bytes: 0,
            down_pkts: 0,
            down_bytes: 0,
        }
    }

    /// A TCP flow's state after a segment with header flags `flags`, in
    /// either direction. FIN or RST marks it closing (the agent then
    /// expires it on the short timeout); a bare SYN, a new connection from
    /// the same origin port, starts it afresh.
    #[inline(always)]
    pub const fn tcp_state(state: u8, flags: u8) -> u8 {
        let mut s = state;
        if flags & (tcp::SYN | tcp::ACK | tcp::RST | tcp::FIN) == tcp::SYN {
            s &= !FLOW_CLOSING;
        }
        if flags & tcp::FIN != 0 {
            s |= FLOW_FIN;
        }
        if flags & tcp::RST != 0 {
            s |= FLOW_RST;
        }
        s
    }
}

/// Reverse key: a dedicated port of one protocol on one address of the
/// NAT pool (by its index; always 0 for IPv6, which has one address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub proto: u8,
    pub index: u8,
    pub port: u16,
}
const _: () = assert!(core::mem::size_of::<NatKey>() == 4);

/// A remote endpoint an origin sent to on a flow other than the flow's
/// first (`Flow::remote`): replies from it to the flow's dedicated port are
/// let in. The value is the flow's `created_ns`, so that a permit left
/// over from an expired flow lets nothing into the next flow on the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PermitKey {
    pub proto: u8,
    /// The flow's address in the NAT pool.
    pub index: u8,
    pub nat_port: u16,
    pub remote: u32,
    /// 0 for ICMP echo.
    pub remote_port: u16,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<PermitKey>() == 12);

/// An IPv6 flow (`S_FLOWS6`): as [`FlowKey`], with the origin's IPv6
/// source address. The origin is still named by its LAN IPv4 address, as
/// in the bond header whose token the server checked: replies go back only
/// to the origin that sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow6Key {
    pub community: CommunityId,
    pub origin: u32,
    pub src: [u8; 16],
    pub proto: u8,
    pub _pad: u8,
    pub port: u16,
}
const _: () = assert!(core::mem::size_of::<Flow6Key>() == 28);

impl Flow6Key {
    /// As [`FlowKey::new`], from IPv6 source address `src`.
    #[inline(always)]
    pub const fn new(
        community: CommunityId,
        proto: u8,
        origin: u32,
        src: [u8; 16],
        port: u16,
    ) -> Self {
        Self {
            community,
            origin,
            src,
            proto,
            _pad: 0,
            port,
        }
    }

    /// Where this flow's dedicated port leads back to.
    #[inline(always)]
    pub const fn nat(&self) -> Nat6Entry {
        Nat6Entry {
            origin: self.origin,
            community: self.community,
            port: self.port,
            _pad: 0,
            src: self.src,
        }
    }

    /// The same flow named as an IPv4 one is (community, protocol, origin,
    /// port): what timeouts and per-origin counts go by.
    pub const fn v4_shape(&self) -> FlowKey {
        FlowKey::new(self.community, self.proto, self.origin, self.port)
    }
}

/// An IPv6 flow's state: as [`Flow`] (whose IPv4 `remote` stays zero),
/// with the IPv6 remote address replies are let in from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow6 {
    pub flow: Flow,
    pub remote: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Flow6>() == 80);

/// Where an IPv6 flow's dedicated port leads back to (`S_NAT6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nat6Entry {
    pub origin: u32,
    pub community: CommunityId,
    pub port: u16,
    pub _pad: u16,
    pub src: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Nat6Entry>() == 28);

impl Nat6Entry {
    /// The flow over `proto` a dedicated port leads back to.
    #[inline(always)]
    pub const fn flow(&self, proto: u8) -> Flow6Key {
        Flow6Key::new(self.community, proto, self.origin, self.src, self.port)
    }

    /// The same way back named as an IPv4 flow's is (community, origin,
    /// port): what picks its downstream link.
    #[inline(always)]
    pub const fn v4_shape(&self) -> NatEntry {
        NatEntry::new(self.community, self.origin, self.port)
    }
}

/// As [`PermitKey`], for an IPv6 remote endpoint (`S_PERMITS6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Permit6Key {
    pub proto: u8,
    pub _pad: u8,
    pub nat_port: u16,
    pub remote_port: u16,
    pub _pad2: u16,
    pub remote: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Permit6Key>() == 24);

/// A datagram arriving at the NAT address in fragments (`S_FRAGS`): only
/// its first fragment carries the dedicated port, so the rest are matched
/// to its flow by sender, protocol and IPv4 identification (with the
/// destination, the NAT address, what RFC 791 reassembles by).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub remote: u32,
    pub id: u16,
    pub proto: u8,
    /// The destination's index in the NAT pool.
    pub index: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 8);

/// Where a fragmented datagram's later fragments go: the flow its first
/// fragment was let into, named by dedicated port and creation time (a
/// newer flow on the same port gets none of them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragFlow {
    pub nat_port: u16,
    pub _pad: [u8; 6],
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FragFlow>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    pub origin: u32,
    pub community: CommunityId,
    /// The origin's own port (or ICMP identifier).
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 12);

impl NatEntry {
    /// Where a dedicated port leads back to: `origin`'s own `port` (or
    /// ICMP identifier) in `community`.
    #[inline(always)]
    pub const fn new(community: CommunityId, origin: u32, port: u16) -> Self {
        Self {
            origin,
            community,
            port,
            _pad: 0,
        }
    }

    /// The flow over `proto` a dedicated port leads back to.
    #[inline(always)]
    pub const fn flow(&self, proto: u8) -> FlowKey {
        FlowKey::new(self.community, proto, self.origin, self.port)
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    use crate::edpf::Paths;
    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: #[repr(C)], only integer and byte-array fields, no
            // implicit padding (size asserted beside the type).
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        Paths,
        Kept,
        Hold,
        TerminalConfig,
        UpLink,
        RelayLink,
        Neighbor,
        LinkStats,
        ServerConfig,
        SessionKey,
        FragKey,
        FragFlow,
        Flow6Key,
        Flow6,
        Nat6Entry,
        Permit6Key,
        Session,
        LinkKey,
        ServerLink,
        FlowKey,
        Flow,
        NatKey,
        PermitKey,
        NatEntry,
        NatBlocks,
        DirectorConfig,
        NodeSlot
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pure_acks_carry_nothing_but_the_ack() {
        use tcp::*;
        // Data offset 5 (no options) and 8 (timestamps), ACK alone or with
        // PSH, ECE or CWR.
        assert!(pure_ack(40, [0x50, ACK]));
        assert!(pure_ack(52, [0x80, ACK | 0x08 | 0x40 | 0x80]));
        // A payload byte, a missing ACK, or SYN, FIN, RST: not pure.
        assert!(!pure_ack(41, [0x50, ACK]));
        assert!(!pure_ack(53, [0x80, ACK]));
        assert!(!pure_ack(40, [0x50, 0]));
        for f in [SYN, FIN, RST] {
            assert!(!pure_ack(40, [0x50, ACK | f]), "{f:#x}");
        }
        // A length shorter than the header it claims, or a data offset
        // under the minimum header: not pure (malformed).
        assert!(!pure_ack(40, [0x80, ACK]));
        assert!(!pure_ack(36, [0x40, ACK]));
        assert!(!pure_ack(0, [0x50, ACK]));
        // IPv6: the payload length is the segment's.
        assert!(pure_ack6(20, [0x50, ACK]));
        assert!(pure_ack6(32, [0x80, ACK]));
        assert!(!pure_ack6(21, [0x50, ACK]));
        assert!(!pure_ack6(20, [0x50, ACK | SYN]));
    }

    #[test]
    fn tcp_state_marks_fin_and_rst_and_a_new_syn_clears_them() {
        use tcp::*;
        let st = Flow::tcp_state;
        assert_eq!(st(0, ACK), 0, "plain ACK");
        assert_eq!(st(0, ACK | 0x08), 0, "ACK+PSH");
        assert_eq!(st(0, SYN), 0, "SYN on a new flow");
        assert_eq!(st(0, SYN | ACK), 0, "SYN+ACK");
        assert_eq!(st(0, FIN | ACK), FLOW_FIN);
        assert_eq!(st(0, RST), FLOW_RST);
        assert_eq!(st(0, RST | ACK), FLOW_RST);
        assert_eq!(st(FLOW_FIN, ACK), FLOW_FIN, "closing stays closing");
        assert_eq!(st(FLOW_FIN, RST), FLOW_CLOSING, "bits add up");
        assert_eq!(st(FLOW_CLOSING, SYN), 0, "a bare SYN reopens");
        assert_eq!(st(FLOW_FIN, SYN | ACK), FLOW_FIN, "a SYN+ACK does not");
        assert_eq!(st(FLOW_RST, SYN | FIN), FLOW_CLOSING, "nor a SYN+FIN");
        // Bits this function does not own survive.
        assert_eq!(st(0x80, SYN), 0x80);
        assert_eq!(st(0x80, FIN), 0x80 | FLOW_FIN);
    }
}
