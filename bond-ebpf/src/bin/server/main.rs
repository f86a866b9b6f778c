//! The reconstitution server's datapath: `bond_server`, XDP on every server
//! interface.
//!
//! - Upstream: DATA_UP to the server's address and port, from a registered
//!   link with the origin's session token, is unwrapped; its flow (community,
//!   origin, protocol, source port or ICMP id) gets a dedicated port from the
//!   free-port queue; the source becomes the server's NAT address and that
//!   port; the packet goes to the content server.
//! - Downstream: a reply to the NAT address on a dedicated port, from a
//!   remote endpoint the origin sent to on that flow (the flow's first, or
//!   one in `S_PERMITS`: address-and-port-dependent filtering, RFC 4787),
//!   is mapped back to its origin, wrapped, and sent on the next link of
//!   its community's downstream schedule. Replies from anyone else are
//!   dropped and counted (`filtered`).
//! - A member's packet to a destination in `S_DENY` (the server's own
//!   addresses and internal networks, by default) is dropped and counted.
//! - TCP segments with FIN or RST, either way, mark their flow closing
//!   (`Flow::state`); the agent expires idle flows and returns their ports
//!   to the queue (`bond-ctl/datapath/src/flows.rs`).
//!
//! - In an ISP tier, bond traffic of a community another node owns
//!   (`S_OWNERS`, kept by the agent from the registry) is passed on to
//!   that node as a director would (`S_NODES`): a director steering by an
//!   older view never splits a community. What another node passed on
//!   is never passed on again (`S_NODE_MACS`): if this node's view gives
//!   it to a third, it is dropped (`owner_disagrees`).
//!
//! Next hops come from the kernel's FIB (`bpf_fib_lookup`). When the
//! neighbour is not resolved yet the rewritten packet is handed to the
//! kernel, which forwards it and resolves the neighbour (the slow path).
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::{
        bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    macros::{map, xdp},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray, ProgramArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::XdpContext,
};
use bond_common::{
    csum, drops,
    edpf::Paths,
    maps::{
        CommunityId, Flow, Flow6, Flow6Key, FlowKey, FragFlow, FragKey, Hold, JUMP_EXPIRED,
        JUMP_IN6, JUMP_OUT6, JUMP_SERVER, JUMP_SLOTS, JUMP_V6, KEPT_SLOTS, Kept, LINK_V6,
        LINK_VALID, LinkKey, LinkStats, MAX_COMMUNITIES, MAX_DENY, MAX_FLOWS, MAX_FRAGS,
        MAX_NAT_BLOCKS, MAX_NODES, MAX_SERVER_LINKS, MAX_SESSIONS, MAX_TIER_COMMUNITIES,
        NAT_SEQUENTIAL, Nat6Entry, NatBlocks, NatEntry, NatKey, NodeSlot, Permit6Key, PermitKey,
        ServerConfig, ServerLink, Session, SessionKey, event, mac_key, tcp,
    },
    wire::{
        self, BondHdr, ETH_LEN, ETH_P_IP, ETH_P_IPV6, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
        ICMP_ERROR_LEN, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, ICMP_UNREACHABLE, INNER_OFF,
        IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, OUTER_LEN, kind,
    },
};
use bond_ebpf::{
    L4, Packet, count, dropped, keep, link_stats, nat_rewrite, next_seq, outer_len, read, read_u16,
    read_u32, redirect_to, write,
};

#[map]
static S_CONFIG: Array<ServerConfig> = Array::pinned(1, 0);
/// The agent's playout: where DATA_UP waits for its turn.
#[map]
static S_HOLD: Array<Hold> = Array::pinned(1, 0);
#[map]
static S_SESSIONS: HashMap<SessionKey, Session> = HashMap::pinned(MAX_SESSIONS, 0);
#[map]
static S_LINK_INDEX: HashMap<LinkKey, u32> = HashMap::pinned(MAX_SERVER_LINKS, 0);
#[map]
static S_LINKS: Array<ServerLink> = Array::pinned(MAX_SERVER_LINKS, 0);
/// The IPv6 address of each link over IPv6 (`LINK_V6`), by link index.
#[map]
static S_LINKS6: Array<[u8; 16]> = Array::pinned(MAX_SERVER_LINKS, 0);
/// This CPU's word from `bond_server_in6` to `bond_server` across a tail
/// call: 1 + the index of the IPv6 link whose DATA_UP it checked and put
/// in the IPv4 form. XDP runs with preemption off: nothing else runs on
/// this CPU between the two.
#[map]
static S_FROM6: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// Each community's downstream scheduling state, shared by all CPUs (see
/// `T_PATHS` in the terminal program on concurrent picks).
#[map]
static S_PATHS: HashMap<CommunityId, Paths> = HashMap::pinned(MAX_COMMUNITIES, 0);
#[map]
static S_FLOWS: HashMap<FlowKey, Flow> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
static S_NAT: HashMap<NatKey, NatEntry> = HashMap::pinned(MAX_FLOWS, 0);
/// Remote endpoints an origin sent to on a flow besides the flow's first,
/// whose replies are let in; the value is the flow's `created_ns`. The
/// least recently used go first when it is full.
#[map]
static S_PERMITS: LruHashMap<PermitKey, u64> = LruHashMap::pinned(MAX_FLOWS, 0);
/// Destinations members may not reach (IPv4 prefixes, network order):
/// the server's `deny` policy.
#[map]
static S_DENY: LpmTrie<[u8; 4], u8> = LpmTrie::pinned(MAX_DENY, 0);
/// Fragmented datagrams at the NAT address: where their later fragments
/// go.
#[map]
static S_FRAGS: LruHashMap<FragKey, FragFlow> = LruHashMap::pinned(MAX_FRAGS, 0);
/// The agent's splitter: where downstream packets too big for the links,
/// free to be fragmented, go to be split (`bond_common::frag`).
#[map]
static S_SPLIT: Array<Hold> = Array::pinned(1, 0);
/// Where `bond_server` hands inner IPv6 (`JUMP_V6`: `bond_server6`).
#[map]
static S_JUMP: ProgramArray = ProgramArray::pinned(JUMP_SLOTS, 0);
/// IPv6 flows, their dedicated ports' way back, their permits and the
/// destinations denied, as the IPv4 maps above (`v6`).
#[map]
static S_FLOWS6: HashMap<Flow6Key, Flow6> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
static S_NAT6: HashMap<NatKey, Nat6Entry> = HashMap::pinned(MAX_FLOWS, 0);
#[map]
static S_PERMITS6: LruHashMap<Permit6Key, u64> = LruHashMap::pinned(MAX_FLOWS, 0);
#[map]
static S_DENY6: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(MAX_DENY, 0);
/// Each community's share of the NAT pool: its address and blocks of
/// ports, handed out by the agent (`NatBlocks`). Only the agent adds and
/// removes entries, so they are allocated as it writes them, not all
/// 65,536 up front (13 MiB).
#[map]
static S_NAT_BLOCKS: HashMap<CommunityId, NatBlocks> =
    HashMap::pinned(MAX_COMMUNITIES, BPF_F_NO_PREALLOC);
#[map]
static S_LINK_STATS: PerCpuArray<LinkStats> = PerCpuArray::pinned(MAX_SERVER_LINKS, 0);
#[map]
static S_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drops::COUNT, 0);
#[map]
static S_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(event::COUNT, 0);
/// Per link (`S_LINKS` index): DATA_DOWN packets sent on it, for the
/// bond header's sequence.
#[map]
static S_LINK_SEQ: Array<u32> = Array::pinned(MAX_SERVER_LINKS, 0);
/// What downstream sent lately, for the origins to ask for again.
#[map]
static S_KEPT: Array<Kept> = Array::pinned(KEPT_SLOTS, 0);
#[map]
static S_KEPT_NEXT: Array<u32> = Array::pinned(1, 0);
/// Flows each origin holds: counted up here as flows are made, recounted
/// by the agent's sweep as they expire.
/// In a tier: each community another node owns, 1 + that node's index
/// in `S_NODES`; 0: this node's, or no one's.
#[map]
static S_OWNERS: HashMap<CommunityId, u32> =
    HashMap::pinned(MAX_TIER_COMMUNITIES, BPF_F_NO_PREALLOC);
#[map]
static S_NODES: Array<NodeSlot> = Array::pinned(MAX_NODES, 0);
/// The other nodes' MAC addresses ([`mac_key`]): what they pass on is
/// not passed on again.
#[map]
static S_NODE_MACS: HashMap<u64, u32> = HashMap::pinned(MAX_NODES, 0);

#[map]
static S_ORIGIN_FLOWS: HashMap<SessionKey, u64> = HashMap::pinned(MAX_SESSIONS, 0);

const AF_INET: u8 = 2;
const PASS: Result<u32, u32> = Ok(xdp_action::XDP_PASS);

#[xdp]
pub fn bond_server(ctx: XdpContext) -> u32 {
    match try_server(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &S_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_server(ctx: &XdpContext) -> Result<u32, u32> {
    let Some(hdr) = read::<{ ETH_LEN + 20 }>(ctx, 0) else {
        return PASS;
    };
    let ethertype = u16::from_be_bytes([hdr[12], hdr[13]]);
    let proto = hdr[ETH_LEN + 9];
    let dst = u32::from_be_bytes([hdr[30], hdr[31], hdr[32], hdr[33]]);
    let Some(cfg) = S_CONFIG.get(0) else {
        return PASS;
    };
    if ethertype == ETH_P_IPV6 {
        // A link over IPv6 to `bond_server_in6`, the rest to `bond_server6`.
        let slot = if outer6::to_us(ctx, cfg) {
            JUMP_IN6
        } else {
            JUMP_V6
        };
        // SAFETY: a tail call does not return when it succeeds; without
        // the programs in the table, IPv6 is the host's own.
        unsafe { S_JUMP.tail_call(ctx, slot) };
        return PASS;
    }
    if ethertype != ETH_P_IP {
        return PASS;
    }
    if dst == cfg.wan_ip && proto == IPPROTO_UDP && read_u16(ctx, ETH_LEN + 22) == Some(cfg.port) {
        return upstream(ctx, cfg);
    }
    if let Some(index) = cfg.nat_index(dst) {
        return downstream(ctx, cfg, proto, index);
    }
    PASS
}

// --------------------------------------------------------------- upstream --

/// In a tier: passes bond traffic of a community another node owns on to
/// it (data and control alike); None if it is this node's to handle.
#[inline(always)]
pub(crate) fn to_owner(ctx: &XdpContext, community: CommunityId) -> Result<Option<u32>, u32> {
    // SAFETY: read-only use of a map value.
    let owner = unsafe { S_OWNERS.get(community) }.copied().unwrap_or(0);
    let Some(idx) = owner.checked_sub(1) else {
        return Ok(None);
    };
    let src = read::<6>(ctx, 6).ok_or(drops::TRUNCATED)?;
    // SAFETY: read-only use of a map value.
    if unsafe { S_NODE_MACS.get(mac_key(src)) }.is_some() {
        return Err(drops::OWNER_DISAGREES);
    }
    let slot = S_NODES.get(idx).ok_or(drops::NO_OWNER)?;
    if slot.ifindex == 0 {
        return Err(drops::NO_OWNER);
    }
    let action = redirect_to(ctx, slot)?;
    count(&S_EVENTS, event::FORWARDED);
    Ok(Some(action))
}

#[inline(always)]
fn upstream(ctx: &XdpContext, cfg: &ServerConfig) -> Result<u32, u32> {
    let vihl = read::<1>(ctx, ETH_LEN).ok_or(drops::TRUNCATED)?[0];
    let frag = read_u16(ctx, ETH_LEN + 6).ok_or(drops::TRUNCATED)?;
    if vihl != wire::IPV4_VIHL || frag & wire::IPV4_FRAGMENT != 0 {
        return Err(drops::OUTER_BAD_HEADER);
    }
    let b =
        BondHdr::from_bytes(read::<{ BondHdr::LEN }>(ctx, wire::BOND_OFF).ok_or(drops::TRUNCATED)?);
    b.validate().map_err(|e| e.drop_reason())?;
    if let Some(action) = to_owner(ctx, b.community())? {
        return Ok(action);
    }
    if !b.is_data() {
        return PASS; // control message: the agent's socket
    }
    let tot = outer_len(ctx, ETH_LEN)?;
    if b.kind != kind::DATA_UP {
        return Err(drops::BAD_KIND);
    }
    let community = b.community();

    // The outer source must be a registered link of this community...
    let link_key = LinkKey::new(community, b.link);
    // SAFETY: read-only use of a map value.
    let idx = *unsafe { S_LINK_INDEX.get(link_key) }.ok_or(drops::UNKNOWN_SOURCE)?;
    let link = S_LINKS.get(idx).ok_or(drops::UNKNOWN_SOURCE)?;
    let src = read_u32(ctx, ETH_LEN + 12).ok_or(drops::TRUNCATED)?;
    let sport = read_u16(ctx, ETH_LEN + 20).ok_or(drops::TRUNCATED)?;
    if link.flags & LINK_VALID == 0
        || link.community != community
        || link.ip != src
        || link.port != sport
    {
        return Err(drops::UNKNOWN_SOURCE);
    }
    // A link over IPv6 has no IPv4 source to check: its DATA_UP comes only
    // as `bond_server_in6` checked it, or back from the playout.
    let from6 = S_FROM6.get_ptr_mut(0).map_or(0, |w| {
        // SAFETY: this CPU's slot (see S_FROM6).
        unsafe { core::mem::replace(&mut *w, 0) }
    });
    if link.flags & LINK_V6 != 0 && from6 != idx + 1 && !from_hold(ctx) {
        return Err(drops::UNKNOWN_SOURCE);
    }
    // ...carrying the session token of a logged-on origin.
    let origin = b.origin();
    let skey = SessionKey::new(community, origin);
    // SAFETY: read-only use of a map value.
    let session = unsafe { S_SESSIONS.get(skey) }.ok_or(drops::BAD_TOKEN)?;
    if session.token != b.token() {
        return Err(drops::BAD_TOKEN);
    }

    // Checked so far: link, session, token. Inner IPv6 is `bond_server6`'s.
    if read::<1>(ctx, INNER_OFF).ok_or(drops::TRUNCATED)?[0] >> 4 == 6 {
        // SAFETY: as above; without it, IPv6 is not carried.
        unsafe { S_JUMP.tail_call(ctx, JUMP_V6) };
        return Err(drops::INNER_NOT_IPV4);
    }
    let inner = Inner::parse(ctx, tot)?;
    if inner.src != origin {
        return Err(drops::INNER_SPOOF);
    }
    if S_DENY.get(Key::new(32, inner.dst.to_be_bytes())).is_some() {
        return Err(drops::DENIED);
    }
    // Its last hop: answered (but for a fragment after the first, RFC 792)
    // with ICMP time exceeded, so traceroute shows the server.
    if inner.ttl <= 1 {
        if inner.frag & wire::IPV4_OFFSET == 0 {
            // SAFETY: a tail call does not return when it succeeds; without
            // `bond_server_expired` in the table the packet is only dropped.
            unsafe { S_JUMP.tail_call(ctx, JUMP_EXPIRED) };
        }
        return Err(drops::TTL_EXCEEDED);
    }
    // A fragment after the first has no transport header: it follows its
    // datagram's first fragment by address, protocol and identification
    // alone, so only the source address changes (see `later_up`).
    if inner.frag & wire::IPV4_OFFSET != 0 {
        return later_up(ctx, cfg, idx, community, &inner);
    }
    // The origin's port (or echo identifier) names the flow; the remote
    // endpoint (address, and port but for echo) is whom it may hear from.
    let (l4, port, remote_port) = match inner.proto {
        IPPROTO_TCP => (
            tcp_udp(INNER_OFF + 20, 0, false),
            read_u16(ctx, INNER_OFF + 20),
            read_u16(ctx, INNER_OFF + 22),
        ),
        IPPROTO_UDP => (
            tcp_udp(INNER_OFF + 20, 0, true),
            read_u16(ctx, INNER_OFF + 20),
            read_u16(ctx, INNER_OFF + 22),
        ),
        IPPROTO_ICMP => {
            let t = read::<1>(ctx, INNER_OFF + 20).ok_or(drops::TRUNCATED)?[0];
            if t != ICMP_ECHO_REQUEST {
                return Err(drops::UNSUPPORTED_PROTO);
            }
            (
                icmp_echo(INNER_OFF + 20),
                read_u16(ctx, INNER_OFF + 24),
                Some(0),
            )
        }
        _ => return Err(drops::UNSUPPORTED_PROTO),
    };
    let port = port.ok_or(drops::TRUNCATED)?;
    let remote_port = remote_port.ok_or(drops::TRUNCATED)?;
    // The whole L4 header we touch must be present.
    read::<8>(ctx, INNER_OFF + 20).ok_or(drops::TRUNCATED)?;
    let mut tcp_flags = None;
    let mut pure_ack = false;
    if inner.proto == IPPROTO_TCP {
        // The TCP header must lie inside the packet, not only the frame.
        if inner.len < 40 {
            return Err(drops::TRUNCATED);
        }
        let h = read::<20>(ctx, INNER_OFF + 20).ok_or(drops::TRUNCATED)?;
        tcp_flags = Some(h[tcp::FLAGS_OFF]);
        pure_ack = inner.frag == 0 && tcp::pure_ack(inner.len, [h[12], h[13]]);
    }

    // Route before taking a port: a packet that cannot leave makes no flow.
    let mut fib = fib_params(ctx, inner.proto, cfg.nat_ip, inner.dst, inner.len);
    let rc = fib_lookup(ctx, &mut fib);
    routable(rc)?;

    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // Checked and routable: to the playout, which sends it back here
    // (through the hold device) when its time comes. Pure ACKs need no
    // order and go on at once.
    if !pure_ack && let Some(hold) = to_hold(ctx, now) {
        return Ok(hold);
    }

    let fkey = FlowKey::new(community, inner.proto, origin, port);
    let flow = flow_for(&fkey, now, cfg, (inner.dst, remote_port))?;
    // SAFETY: `flow` points at a live map value; concurrent updates of these
    // counters from other CPUs may lose increments (they are statistics).
    let (nat_index, nat_port) = unsafe {
        (*flow).last_seen_ns = now;
        (*flow).up_pkts += 1;
        (*flow).up_bytes += u64::from(inner.len);
        if let Some(f) = tcp_flags {
            (*flow).state = Flow::tcp_state((*flow).state, f);
        }
        ((*flow).nat_index, (*flow).nat_port)
    };
    // A further remote endpoint: permitted (again) as the origin sends to
    // it; the lookup alone keeps a live permit recently used.
    if let Some((key, created)) = permit_for(flow, inner.proto, (inner.dst, remote_port))
        // SAFETY: read-only use of a map value.
        && unsafe { S_PERMITS.get(key) } != Some(&created)
    {
        // A full table drops its least recently used permit.
        let _ = S_PERMITS.insert(key, created, 0);
    }
    let nat_ip = cfg.nat_address(nat_index);
    if !nat_rewrite(ctx, INNER_OFF, 12, nat_ip, Some(l4), nat_port) {
        return Err(drops::TRUNCATED);
    }
    unwrap_up(ctx, idx, inner.len, rc, &fib)
}

/// A fragment after the first, from an origin (checked as any packet
/// is): it carries no ports, and the content server puts it together with
/// its first fragment by addresses, protocol and identification, so it
/// goes out with its community's NAT address as its source and no flow of
/// its own.
/// Identifications are the origins': two origins sending fragmented
/// datagrams with the same one to the same host at once may be mixed up
/// there, as behind any NAT that keeps them (Linux's does).
#[inline(always)]
fn later_up(
    ctx: &XdpContext,
    cfg: &ServerConfig,
    idx: u32,
    community: CommunityId,
    inner: &Inner,
) -> Result<u32, u32> {
    // SAFETY: read-only use of a map value.
    let index = unsafe { S_NAT_BLOCKS.get(community) }
        .ok_or(drops::NO_FREE_PORT)?
        .index;
    let mut fib = fib_params(ctx, inner.proto, cfg.nat_ip, inner.dst, inner.len);
    let rc = fib_lookup(ctx, &mut fib);
    routable(rc)?;
    // SAFETY: plain helper call.
    if let Some(hold) = to_hold(ctx, unsafe { bpf_ktime_get_ns() }) {
        return Ok(hold);
    }
    if !nat_rewrite(ctx, INNER_OFF, 12, cfg.nat_address(index), None, 0) {
        return Err(drops::TRUNCATED);
    }
    unwrap_up(ctx, idx, inner.len, rc, &fib)
}

/// The playout's redirect for a checked, routable DATA_UP packet, if the
/// playout takes it: it sends the packet back here (through the hold
/// device) when its time comes.
/// Whether the frame comes back from the playout's hold device (which
/// only the agent writes, with frames this program checked).
#[inline(always)]
fn from_hold(ctx: &XdpContext) -> bool {
    S_HOLD
        .get(0)
        .is_some_and(|h| h.ifindex != 0 && h.ifindex == ctx.ingress_ifindex() as u32)
}

#[inline(always)]
fn to_hold(ctx: &XdpContext, now: u64) -> Option<u32> {
    let hold = S_HOLD.get(0)?;
    // SAFETY: the context pointer is valid for the program's run.
    if !hold.takes(unsafe { (*ctx.ctx).ingress_ifindex }, now) {
        return None;
    }
    // SAFETY: plain helper call; the ifindex comes from the agent's map.
    Some(unsafe { bpf_redirect(hold.ifindex, 0) } as u32)
}

/// Counts an upstream packet (`len` inner bytes, its inner header
/// rewritten) on link `idx`, strips the wrap and sends it on.
#[inline(always)]
fn unwrap_up(ctx: &XdpContext, idx: u32, len: u16, rc: u32, fib: &FibParams) -> Result<u32, u32> {
    link_stats(&S_LINK_STATS, idx, |s| {
        s.up_pkts += 1;
        s.up_bytes += u64::from(len);
    });
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER_LEN as i32) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    forward(ctx, rc, fib, macs, true)
}

/// The inner IPv4 header of a wrapped packet, checked.
struct Inner {
    src: u32,
    dst: u32,
    len: u16,
    /// Flags and fragment offset.
    frag: u16,
    proto: u8,
    ttl: u8,
}

impl Inner {
    #[inline(always)]
    /// `tot` is the outer total length: the inner packet must end inside it.
    fn parse(ctx: &XdpContext, tot: u16) -> Result<Self, u32> {
        let h = read::<20>(ctx, INNER_OFF).ok_or(drops::TRUNCATED)?;
        if h[0] >> 4 != 4 {
            return Err(drops::INNER_NOT_IPV4);
        }
        let len = u16::from_be_bytes([h[2], h[3]]);
        let frag = u16::from_be_bytes([h[6], h[7]]) & wire::IPV4_FRAGMENT;
        // Room for the ports, but in a fragment after the first.
        let least = if frag & wire::IPV4_OFFSET != 0 {
            21
        } else {
            28
        };
        if h[0] != wire::IPV4_VIHL || len < least || usize::from(len) + OUTER_LEN > usize::from(tot)
        {
            return Err(drops::INNER_BAD_HEADER);
        }
        Ok(Self {
            src: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
            dst: u32::from_be_bytes([h[16], h[17], h[18], h[19]]),
            len,
            frag,
            proto: h[9],
            ttl: h[8],
        })
    }
}

#[inline(always)]
const fn tcp_udp(l4: usize, port_field: usize, udp: bool) -> L4 {
    L4 {
        port_off: l4 + port_field,
        check_off: if udp { l4 + 6 } else { l4 + 16 },
        pseudo: true,
        udp,
    }
}

/// The destination port of a reply whose transport header starts at
/// `l4off` (the identifier of an ICMP echo reply); None for anything bond
/// does not carry.
#[inline(always)]
fn dest_port(ctx: &XdpContext, proto: u8, l4off: usize) -> Option<u16> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => read_u16(ctx, l4off + 2),
        // (Two bytes, type and code: a one-byte check at a variable offset
        // compiles to a comparison the verifier cannot follow.)
        IPPROTO_ICMP if read::<2>(ctx, l4off)?[0] == ICMP_ECHO_REPLY => read_u16(ctx, l4off + 4),
        _ => None,
    }
}

#[inline(always)]
const fn icmp_echo(l4: usize) -> L4 {
    L4 {
        port_off: l4 + 4,
        check_off: l4 + 2,
        pseudo: false,
        udp: false,
    }
}

/// The permit that lets replies from `remote` (address, port) into
/// `flow`, and the value it must hold (the flow's creation time, so that a
/// permit left by an expired flow on the same port lets nothing in); None
/// for the flow's first remote, which the flow itself lets in.
#[inline(always)]
fn permit_for(flow: *mut Flow, proto: u8, remote: (u32, u16)) -> Option<(PermitKey, u64)> {
    // SAFETY: `flow` points at a live map value; only read.
    let f = unsafe { &*flow };
    if (f.remote, f.remote_port) == remote {
        return None;
    }
    let key = PermitKey {
        proto,
        index: f.nat_index,
        nat_port: f.nat_port,
        remote: remote.0,
        remote_port: remote.1,
        _pad2: 0,
    };
    Some((key, f.created_ns))
}

/// The flow for `key`, made if new: its origin holds fewer than
/// `cfg.per_origin` flows (0: no limit) and one of its community's ports
/// is free (`claim_port`); it sends to `remote` first.
#[inline(always)]
fn flow_for(
    key: &FlowKey,
    now: u64,
    cfg: &ServerConfig,
    remote: (u32, u16),
) -> Result<*mut Flow, u32> {
    if let Some(f) = S_FLOWS.get_ptr_mut(key) {
        return Ok(f);
    }
    let held = origin_flows(key.community, key.origin, cfg.per_origin)?;
    let nat = key.nat();
    let nkey = claim_port(
        &S_NAT,
        &nat,
        key.proto,
        key.community,
        nat_order(cfg),
        false,
    )?;
    let flow = Flow::new((nkey.index, nkey.port), now, remote.0, remote.1);
    match S_FLOWS.insert(key, flow, u64::from(BPF_NOEXIST)) {
        Ok(()) => made(held),
        // Either another CPU created it first, or the table is full; the
        // port claimed goes back either way.
        Err(_) => {
            let _ = S_NAT.remove(nkey);
            if S_FLOWS.get_ptr_mut(key).is_none() {
                return Err(drops::FLOW_TABLE_FULL);
            }
            count(&S_EVENTS, event::FLOW_RACE);
        }
    }
    S_FLOWS.get_ptr_mut(key).ok_or(drops::FLOW_TABLE_FULL)
}

/// The count of flows `origin` holds, for [`made`] to raise, if it holds
/// fewer than `per_origin` (0: no limit).
#[inline(always)]
fn origin_flows(community: CommunityId, origin: u32, per_origin: u32) -> Result<*mut u64, u32> {
    let okey = SessionKey::new(community, origin);
    if S_ORIGIN_FLOWS.get_ptr_mut(okey).is_none() {
        // Another CPU may win the insert; either way the entry exists.
        let _ = S_ORIGIN_FLOWS.insert(okey, 0, u64::from(BPF_NOEXIST));
    }
    let held = S_ORIGIN_FLOWS
        .get_ptr_mut(okey)
        .ok_or(drops::ORIGIN_TABLE_FULL)?;
    // SAFETY: a live map value. Not atomic (the BPF target has no atomic
    // add in Rust): two CPUs making flows for one origin at the same
    // instant may count one; the agent's recount at each sweep corrects it.
    if per_origin != 0 && unsafe { *held } >= u64::from(per_origin) {
        return Err(drops::ORIGIN_FLOW_LIMIT);
    }
    Ok(held)
}

/// Tries for a free port in a community's share of the NAT pool.
const PROBES: u32 = 16;
/// What a map insert returns when the map is full.
const E2BIG: i32 = 7;

/// How `claim_port` looks: ports per block, and whether in order.
#[inline(always)]
fn nat_order(cfg: &ServerConfig) -> (u16, bool) {
    (cfg.nat_block, cfg.nat_order == NAT_SEQUENTIAL)
}

/// Claims a dedicated port for a new flow of `community`, one of its
/// blocks' (`S_NAT_BLOCKS`), by putting the flow's way back (`value`) in
/// `nat` under it: a random port of the blocks, tried again elsewhere if
/// taken (the insert fails for a port some flow holds, so two CPUs never
/// claim one port). The agent gives a community another block when half
/// its ports are held, so a random try fails at most half the time and
/// all [`PROBES`] of them about once in 65,000. In order
/// (`NAT_SEQUENTIAL`), the tries go on from the port after the last one
/// taken. IPv6 flows (`v6`) take the
/// same ports on the pool's one IPv6 address (index 0).
#[inline(always)]
fn claim_port<V>(
    nat: &HashMap<NatKey, V>,
    value: &V,
    proto: u8,
    community: CommunityId,
    (block, sequential): (u16, bool),
    v6: bool,
) -> Result<NatKey, u32> {
    let share = S_NAT_BLOCKS
        .get_ptr_mut(community)
        .ok_or(drops::NO_FREE_PORT)?;
    // SAFETY: a live map value; `next` is a hint (two CPUs moving it at
    // once lose one move, and the insert below settles who has a port).
    let share = unsafe { &mut *share };
    let blocks = u32::from(share.count).min(MAX_NAT_BLOCKS as u32);
    let block = u32::from(block);
    if blocks == 0 || block == 0 {
        return Err(drops::NO_FREE_PORT);
    }
    let span = blocks * block;
    let index = if v6 { 0 } else { share.index };
    let mut r = u32::from(share.next);
    for _ in 0..PROBES {
        r = if sequential {
            r % span
        } else {
            // SAFETY: plain helper call.
            (unsafe { bpf_get_prandom_u32() }) % span
        };
        let Some(first) = share.first.get((r / block) as usize) else {
            break;
        };
        let key = NatKey {
            proto,
            index,
            port: first.wrapping_add((r % block) as u16),
        };
        match nat.insert(key, value, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                share.next = ((r + 1) % span) as u16;
                return Ok(key);
            }
            // The table is full, not the port taken: no try will do.
            Err(e) if e == -E2BIG => return Err(drops::FLOW_TABLE_FULL),
            Err(_) => r += 1,
        }
    }
    Err(drops::NO_FREE_PORT)
}

/// A flow was made: counted, and its origin holds one more.
#[inline(always)]
fn made(held: *mut u64) {
    count(&S_EVENTS, event::FLOW_CREATED);
    // SAFETY: a live map value, as in `origin_flows`.
    unsafe { *held += 1 };
}

// ------------------------------------------------------------- downstream --

#[inline(always)]
fn downstream(ctx: &XdpContext, cfg: &ServerConfig, proto: u8, index: u8) -> Result<u32, u32> {
    let h = read::<20>(ctx, ETH_LEN).ok_or(drops::TRUNCATED)?;
    if is_icmp_error(ctx, proto, h[0]) {
        return icmp_error(ctx, cfg, index);
    }
    let be16 = |a: u8, b: u8| u16::from_be_bytes([a, b]);
    let frag = be16(h[6], h[7]) & wire::IPV4_FRAGMENT;
    let remote = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    // The dedicated port: in the transport header, where the IPv4 header
    // says it starts, options or not; for a fragment after the first, from
    // its datagram's first fragment (`S_FRAGS`).
    let later = frag & wire::IPV4_OFFSET != 0;
    let (port, created) = if later {
        let key = FragKey {
            remote,
            id: be16(h[4], h[5]),
            proto,
            index,
        };
        // SAFETY: read-only use of a map value.
        match unsafe { S_FRAGS.get(key) } {
            Some(f) => (f.nat_port, f.created_ns),
            None => return PASS, // not a flow's: the server host's own
        }
    } else {
        let Some(port) = dest_port(ctx, proto, ETH_LEN + usize::from(h[0] & 0x0f) * 4) else {
            return PASS;
        };
        if port < cfg.port_min || port > cfg.port_max {
            return PASS; // not a dedicated port: the server host's own traffic
        }
        (port, 0)
    };
    // A reply with IP options (or a header length that lies) to a
    // dedicated port: bond does not carry options, and the kernel has no
    // socket on that port (it would answer with a reset). Dropped, counted.
    if h[0] != wire::IPV4_VIHL {
        return Err(drops::INNER_BAD_HEADER);
    }
    let l4off = ETH_LEN + 20;
    let len = be16(h[2], h[3]);
    let least = if later { 21 } else { 28 };
    if len < least || usize::from(len) > ctx.packet_len() - ETH_LEN {
        return Err(drops::INNER_BAD_HEADER);
    }
    if h[8] <= 1 {
        return Err(drops::TTL_EXCEEDED);
    }
    let mut tcp_flags = None;
    let mut pure_ack = false;
    if proto == IPPROTO_TCP && !later {
        if len < 40 {
            return Err(drops::TRUNCATED);
        }
        let t = read::<20>(ctx, l4off).ok_or(drops::TRUNCATED)?;
        tcp_flags = Some(t[tcp::FLAGS_OFF]);
        pure_ack = frag == 0 && tcp::pure_ack(len, [t[12], t[13]]);
    }
    // SAFETY: read-only use of map values.
    let nat = *unsafe { S_NAT.get(NatKey { proto, index, port }) }.ok_or(drops::NO_FLOW)?;
    let fkey = nat.flow(proto);
    let flow = S_FLOWS.get_ptr_mut(fkey).ok_or(drops::NO_FLOW)?;
    let mut l4 = None;
    if later {
        // The flow its first fragment was let into, not a newer one.
        // SAFETY: read-only use of a map value.
        if unsafe { (*flow).created_ns } != created {
            return Err(drops::NO_FLOW);
        }
    } else {
        let l4head = read::<8>(ctx, l4off).ok_or(drops::TRUNCATED)?;
        // Only from whom the origin sent to on this flow.
        let remote_port = if proto == IPPROTO_ICMP {
            0
        } else {
            be16(l4head[0], l4head[1])
        };
        if let Some((key, created)) = permit_for(flow, proto, (remote, remote_port))
            // SAFETY: read-only use of a map value.
            && unsafe { S_PERMITS.get(key) } != Some(&created)
        {
            return Err(drops::FILTERED);
        }
        // The first of several fragments: the rest follow it.
        if frag & wire::IPV4_MF != 0 {
            let key = FragKey {
                remote,
                id: be16(h[4], h[5]),
                proto,
                index,
            };
            let to = FragFlow {
                nat_port: port,
                _pad: [0; 6],
                // SAFETY: read-only use of a map value.
                created_ns: unsafe { (*flow).created_ns },
            };
            // A full table drops the least recently used datagram's.
            let _ = S_FRAGS.insert(key, to, 0);
        }
        // Too big for the links once wrapped, and not to be fragmented:
        // tell the sender (only for a real flow's packets, so the server
        // reflects nothing for strangers).
        if frag == 0
            && be16(h[6], h[7]) & wire::IPV4_DF != 0
            && cfg.link_mtu != 0
            && u32::from(len) + OUTER_LEN as u32 > u32::from(cfg.link_mtu)
        {
            return answer_too_big(ctx, cfg, h, l4head);
        }
        l4 = Some(match proto {
            IPPROTO_TCP => tcp_udp(l4off, 2, false),
            IPPROTO_UDP => tcp_udp(l4off, 2, true),
            _ => icmp_echo(l4off),
        });
    }
    // Too big, and free to be fragmented: to the agent, which splits it
    // and sends the pieces back through here.
    if cfg.link_mtu != 0 && u32::from(len) + OUTER_LEN as u32 > u32::from(cfg.link_mtu) {
        return to_split(ctx);
    }
    // Pick the link first: nothing is counted for a packet that is dropped.
    let d = pick_down(&nat, len)?;
    // SAFETY: live map value; statistics, as upstream.
    unsafe {
        (*flow).last_seen_ns = d.now;
        (*flow).down_pkts += 1;
        (*flow).down_bytes += u64::from(len);
        if let Some(fl) = tcp_flags {
            (*flow).state = Flow::tcp_state((*flow).state, fl);
        }
    }
    if !nat_rewrite(ctx, ETH_LEN, 16, nat.origin, l4, nat.port) {
        return Err(drops::TRUNCATED);
    }
    wrap_down(ctx, cfg, &nat, &d, len, pure_ack)
}

/// Hands a packet too big for the links (and without "don't fragment")
/// to the agent's splitter (`S_SPLIT`), which sends its pieces back in
/// through the split device. Without a live splitter, or for a piece that
/// came from it and still does not fit (the links' MTU fell meanwhile),
/// it is dropped and counted.
#[inline(always)]
fn to_split(ctx: &XdpContext) -> Result<u32, u32> {
    let split = S_SPLIT.get(0).ok_or(drops::TOO_BIG)?;
    // SAFETY: plain helper call; the context pointer is valid for the run.
    let takes = split.takes(unsafe { (*ctx.ctx).ingress_ifindex }, unsafe {
        bpf_ktime_get_ns()
    });
    if !takes {
        return Err(drops::TOO_BIG);
    }
    count(&S_EVENTS, event::SPLIT);
    // SAFETY: plain helper call; the ifindex comes from the agent's map.
    Ok(unsafe { bpf_redirect(split.ifindex, 0) } as u32)
}

/// Where a downstream packet goes: the link it arrives first on, and the
/// origin's session token; `now` is when it was picked.
struct Down {
    idx: u32,
    link_ip: u32,
    link_port: u16,
    link_id: u8,
    token: u64,
    now: u64,
}

/// Picks the link of `nat`'s community where a packet of `len` bytes
/// (wrapped) arrives first, and charges it.
#[inline(always)]
fn pick_down(nat: &NatEntry, len: u16) -> Result<Down, u32> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let paths = S_PATHS.get_ptr_mut(nat.community).ok_or(drops::NO_LINKS)?;
    // SAFETY: a live map value; see S_PATHS on concurrent picks.
    let idx = unsafe { &mut *paths }
        .pick(now, u32::from(len) + INNER_OFF as u32)
        .map_err(|e| e.drop_reason())?;
    let link = S_LINKS.get(idx).ok_or(drops::LINK_MISSING)?;
    if link.flags & LINK_VALID == 0 {
        return Err(drops::LINK_MISSING);
    }
    let skey = SessionKey::new(nat.community, nat.origin);
    // SAFETY: the value is only read; the agent replaces entries whole.
    let token = unsafe { S_SESSIONS.get(skey) }.ok_or(drops::NO_FLOW)?.token;
    Ok(Down {
        idx,
        link_ip: link.ip,
        link_port: link.port,
        link_id: link.link,
        token,
        now,
    })
}

/// Wraps the rewritten packet (`len` bytes behind Ethernet) as DATA_DOWN
/// for `nat`'s origin, keeps a copy for it to ask for again (not of pure
/// ACKs, which are not numbered either), and sends it on `d`'s link.
#[inline(always)]
fn wrap_down(
    ctx: &XdpContext,
    cfg: &ServerConfig,
    nat: &NatEntry,
    d: &Down,
    len: u16,
    pure_ack: bool,
) -> Result<u32, u32> {
    let sent = wire::sent_us(d.now);
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OUTER_LEN as i32)) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let outer = wire::outer_headers((cfg.wan_ip, cfg.port), (d.link_ip, d.link_port), len);
    let seq = if pure_ack {
        0
    } else {
        next_seq(&S_LINK_SEQ, d.idx)
    };
    let b = BondHdr::new(
        kind::DATA_DOWN,
        nat.community,
        d.link_id,
        nat.origin,
        sent,
        d.token,
    )
    .with_seq(seq)
    .to_bytes();
    if !(write(ctx, ETH_LEN, outer) && write(ctx, wire::BOND_OFF, b)) {
        return Err(drops::TRUNCATED);
    }
    if !pure_ack {
        let n = BondHdr::LEN + usize::from(len);
        let head = (nat.community, d.idx, d.link_id, seq, sent);
        keep(ctx, &S_KEPT, &S_KEPT_NEXT, wire::BOND_OFF, n, head);
    }
    link_stats(&S_LINK_STATS, d.idx, |s| {
        s.down_pkts += 1;
        s.down_bytes += u64::from(len);
    });
    if d.link_ip == 0 {
        // A link over IPv6 (`LINK_V6`, its `ip` 0): the wrap leaves
        // through `bond_server_out6`, which makes the outer header IPv6.
        // SAFETY: a tail call does not return when it succeeds.
        unsafe { S_JUMP.tail_call(ctx, JUMP_OUT6) };
        return Err(drops::LINK_MISSING);
    }
    let mut fib = fib_params(
        ctx,
        IPPROTO_UDP,
        cfg.wan_ip,
        d.link_ip,
        len + OUTER_LEN as u16,
    );
    let rc = fib_lookup(ctx, &mut fib);
    forward(ctx, rc, &fib, macs, false)
}

// ------------------------------------------------------------ ICMP errors --

/// Whether the packet at the NAT address is an ICMP error (destination
/// unreachable, time exceeded, parameter problem) with a plain header.
#[inline(always)]
fn is_icmp_error(ctx: &XdpContext, proto: u8, vihl: u8) -> bool {
    proto == IPPROTO_ICMP
        && vihl == wire::IPV4_VIHL
        && read::<2>(ctx, ETH_LEN + IPV4_LEN).is_some_and(|t| {
            matches!(
                t[0],
                ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            )
        })
}

/// An ICMP error about a packet a flow sent (its header and first 8 bytes
/// embedded, from the NAT address and a dedicated port) goes back to the
/// flow's origin, so traceroute, path MTU discovery and port-unreachable
/// work through bond: the error's destination becomes the origin, the
/// embedded source address and port the origin's, and the embedded
/// checksums and the ICMP checksum follow (RFC 5508 REQ-3, RFC 4787
/// REQ-11). It passes the flow's filter as a reply does, on the embedded
/// destination (the error may come from any router on the way). An error
/// about anything else (the server's own traffic) is the kernel's.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, cfg: &ServerConfig, index: u8) -> Result<u32, u32> {
    const ICMP: usize = ETH_LEN + IPV4_LEN;
    const EMB: usize = ICMP + 8;
    const EMB_L4: usize = EMB + IPV4_LEN;
    let h = read::<20>(ctx, ETH_LEN).ok_or(drops::TRUNCATED)?;
    let len = u16::from_be_bytes([h[2], h[3]]);
    if usize::from(len) > ctx.packet_len() - ETH_LEN {
        return Err(drops::INNER_BAD_HEADER);
    }
    if usize::from(len) < EMB_L4 + 8 - ETH_LEN {
        return Err(drops::TRUNCATED);
    }
    if u16::from_be_bytes([h[6], h[7]]) & wire::IPV4_FRAGMENT != 0 {
        return Err(drops::INNER_FRAGMENT);
    }
    if h[8] <= 1 {
        return Err(drops::TTL_EXCEEDED);
    }
    let e = read::<20>(ctx, EMB).ok_or(drops::TRUNCATED)?;
    let el4 = read::<8>(ctx, EMB_L4).ok_or(drops::TRUNCATED)?;
    // About a packet this address sent: the error came to it.
    let nat_ip = u32::from_be_bytes([e[12], e[13], e[14], e[15]]);
    if e[0] != wire::IPV4_VIHL || cfg.nat_index(nat_ip) != Some(index) {
        return PASS;
    }
    let be16 = |a: u8, b: u8| u16::from_be_bytes([a, b]);
    let proto = e[9];
    // The embedded packet's dedicated port, its destination port, and
    // where its port and checksum fields are.
    let (port, remote_port, port_off, check_off) = match proto {
        IPPROTO_TCP => (
            be16(el4[0], el4[1]),
            be16(el4[2], el4[3]),
            EMB_L4,
            EMB_L4 + 16,
        ),
        IPPROTO_UDP => (
            be16(el4[0], el4[1]),
            be16(el4[2], el4[3]),
            EMB_L4,
            EMB_L4 + 6,
        ),
        IPPROTO_ICMP if el4[0] == ICMP_ECHO_REQUEST => {
            (be16(el4[4], el4[5]), 0, EMB_L4 + 4, EMB_L4 + 2)
        }
        _ => return PASS,
    };
    if port < cfg.port_min || port > cfg.port_max {
        return PASS;
    }
    // SAFETY: read-only use of a map value.
    let nat = *unsafe { S_NAT.get(NatKey { proto, index, port }) }.ok_or(drops::NO_FLOW)?;
    let fkey = nat.flow(proto);
    let flow = S_FLOWS.get_ptr_mut(fkey).ok_or(drops::NO_FLOW)?;
    let remote = u32::from_be_bytes([e[16], e[17], e[18], e[19]]);
    if let Some((key, created)) = permit_for(flow, proto, (remote, remote_port))
        // SAFETY: read-only use of a map value.
        && unsafe { S_PERMITS.get(key) } != Some(&created)
    {
        return Err(drops::FILTERED);
    }
    // Never an error about an error: one too big for the links is lost.
    if cfg.link_mtu != 0 && u32::from(len) + OUTER_LEN as u32 > u32::from(cfg.link_mtu) {
        return Err(drops::TOO_BIG);
    }
    let d = pick_down(&nat, len)?;

    // The error's own header: to the origin, one hop less to live.
    let ttl_proto = be16(h[8], h[9]);
    let new_ttl_proto = ttl_proto.wrapping_sub(0x100);
    let ip_check = csum::replace16(
        csum::replace32(be16(h[10], h[11]), nat_ip, nat.origin),
        ttl_proto,
        new_ttl_proto,
    );
    // The embedded header: from the origin and its port.
    let emb_check = be16(e[10], e[11]);
    let new_emb_check = csum::replace32(emb_check, nat_ip, nat.origin);
    // Its transport checksum, where the error carries it (a TCP one lies
    // past the first 8 bytes and is often cut off).
    let l4_check = if check_off + 2 <= ETH_LEN + usize::from(len) {
        read_u16(ctx, check_off)
    } else {
        None
    };
    let new_l4_check = l4_check.map(|c| match proto {
        IPPROTO_UDP => {
            csum::udp_replace16(csum::udp_replace32(c, nat_ip, nat.origin), port, nat.port)
        }
        IPPROTO_TCP => csum::replace16(csum::replace32(c, nat_ip, nat.origin), port, nat.port),
        _ => csum::replace16(c, port, nat.port),
    });
    // The ICMP checksum covers every embedded word that changed.
    let mut icmp_check = read_u16(ctx, ICMP + 2).ok_or(drops::TRUNCATED)?;
    icmp_check = csum::replace32(icmp_check, nat_ip, nat.origin);
    icmp_check = csum::replace16(icmp_check, emb_check, new_emb_check);
    icmp_check = csum::replace16(icmp_check, port, nat.port);
    if let (Some(old), Some(new)) = (l4_check, new_l4_check) {
        icmp_check = csum::replace16(icmp_check, old, new);
    }
    let written = write(ctx, ETH_LEN + 8, new_ttl_proto.to_be_bytes())
        && write(ctx, ETH_LEN + 10, ip_check.to_be_bytes())
        && write(ctx, ETH_LEN + 16, nat.origin.to_be_bytes())
        && write(ctx, ICMP + 2, icmp_check.to_be_bytes())
        && write(ctx, EMB + 10, new_emb_check.to_be_bytes())
        && write(ctx, EMB + 12, nat.origin.to_be_bytes())
        && write(ctx, port_off, nat.port.to_be_bytes())
        && new_l4_check.is_none_or(|c| write(ctx, check_off, c.to_be_bytes()));
    if !written {
        return Err(drops::TRUNCATED);
    }
    count(&S_EVENTS, event::ICMP_ERROR_RELAYED);
    wrap_down(ctx, cfg, &nat, &d, len, false)
}

/// Turns a downstream packet too big for the links into an ICMP
/// fragmentation-needed error to its sender (RFC 1191) and sends it back
/// out where it came in, so the sender lowers its path MTU instead of losing
/// packets silently. `h` is the packet's IPv4 header, `l4` the 8 bytes
/// after it; the packet itself is counted as a `too_big` drop.
#[inline(always)]
fn answer_too_big(
    ctx: &XdpContext,
    cfg: &ServerConfig,
    h: [u8; 20],
    l4: [u8; 8],
) -> Result<u32, u32> {
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // Room for the error's IPv4 and ICMP headers: the offending header
    // and its 8 bytes then sit where the error's payload goes.
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IPV4_LEN + 8) as i32)) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let excess = ctx.packet_len() as i32 - (ETH_LEN + ICMP_ERROR_LEN) as i32;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let mtu = cfg.link_mtu.saturating_sub(OUTER_LEN as u16);
    // From the address the packet came to.
    let nat_ip = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    let (ip, icmp) = wire::frag_needed(nat_ip, &h, &l4, mtu);
    let mut eth = [0u8; ETH_LEN];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    if !(write(ctx, 0, eth) && write(ctx, ETH_LEN, ip) && write(ctx, ETH_LEN + IPV4_LEN, icmp)) {
        return Err(drops::TRUNCATED);
    }
    dropped(ctx, &S_DROPS, drops::TOO_BIG);
    count(&S_EVENTS, event::FRAG_NEEDED);
    // Back out of the interface it came in on. A redirect rather than
    // XDP_TX: veth flushes XDP_TX frames to a peer only if that peer runs
    // XDP itself, and would hold the error until other traffic came.
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32)
}

// ---------------------------------------------------------------- helpers --

#[inline(always)]
fn fib_params(ctx: &XdpContext, proto: u8, src: u32, dst: u32, len: u16) -> FibParams {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src.to_be_bytes());
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst.to_be_bytes());
    p
}

#[inline(always)]
fn fib_lookup(ctx: &XdpContext, p: &mut FibParams) -> u32 {
    // SAFETY: `p` is a valid, fully initialised request of the size passed.
    unsafe { bpf_fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<FibParams>() as i32, 0) as u32 }
}

/// Whether a FIB result can be forwarded (now or by the kernel's slow
/// path); the drop reason if not.
#[inline(always)]
fn routable(rc: u32) -> Result<(), u32> {
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => Ok(()),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(drops::TOO_BIG),
        _ => Err(drops::NO_ROUTE),
    }
}

/// Sends a rewritten packet (Ethernet header still to be written) towards
/// the next hop the FIB gave, or to the kernel when the neighbour is not
/// resolved yet. `macs` is the frame's original destination and source.
/// `forwarded` says the packet's TTL already lost this hop (an unwrapped
/// packet): the kernel takes the hop off itself, so it gets the hop back.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    rc: u32,
    fib: &FibParams,
    macs: [u8; 12],
    forwarded: bool,
) -> Result<u32, u32> {
    forward_as(ctx, ETH_P_IP, rc, fib, macs, forwarded)
}

/// As [`forward`], for a packet of `ethertype` (IPv4 or IPv6).
#[inline(always)]
fn forward_as(
    ctx: &XdpContext,
    ethertype: u16,
    rc: u32,
    fib: &FibParams,
    macs: [u8; 12],
    forwarded: bool,
) -> Result<u32, u32> {
    routable(rc)?;
    let mut eth = [0u8; 14];
    eth[12..].copy_from_slice(&ethertype.to_be_bytes());
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        eth[0..6].copy_from_slice(&fib.dmac);
        eth[6..12].copy_from_slice(&fib.smac);
        if !write(ctx, 0, eth) {
            return Err(drops::TRUNCATED);
        }
        // SAFETY: plain helper call.
        return Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as u32);
    }
    // No neighbour yet. Addressed to us as received, so the kernel accepts
    // and forwards it (and resolves the neighbour for next time).
    eth[..12].copy_from_slice(&macs);
    if !write(ctx, 0, eth) {
        return Err(drops::TRUNCATED);
    }
    if forwarded && ethertype == ETH_P_IPV6 {
        // The hop limit; IPv6 has no header checksum.
        let hop = read::<1>(ctx, ETH_LEN + 7).ok_or(drops::TRUNCATED)?[0];
        if !write(ctx, ETH_LEN + 7, [hop.wrapping_add(1)]) {
            return Err(drops::TRUNCATED);
        }
    } else if forwarded {
        let ttl_proto = read_u16(ctx, ETH_LEN + 8).ok_or(drops::TRUNCATED)?;
        let check = read_u16(ctx, ETH_LEN + 10).ok_or(drops::TRUNCATED)?;
        let back = ttl_proto.wrapping_add(0x100);
        let check = csum::replace16(check, ttl_proto, back);
        if !(write(ctx, ETH_LEN + 8, back.to_be_bytes())
            && write(ctx, ETH_LEN + 10, check.to_be_bytes()))
        {
            return Err(drops::TRUNCATED);
        }
    }
    count(&S_EVENTS, event::SLOW_PATH);
    Ok(xdp_action::XDP_PASS)
}

mod expired;
mod outer6;
mod v6;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
