//! A community terminal's datapath, one object so both programs share maps:
//!
//! - `bond_wrap` (TC egress on bond0): the origin. Wraps each packet routed
//!   into bond0 and sends it on the link where it would arrive first
//!   (`bond_common::edpf`), to a LAN peer's relay port or straight out of
//!   an own WAN link.
//! - `bond_terminal` (XDP on the LAN and WAN interfaces): the relay and
//!   the origin's receive side. DATA_UP to an own link's port goes on to the
//!   server over that link; DATA_DOWN goes on to its origin over the LAN,
//!   or is unwrapped and passed up when this host is the origin.
//!
//! Anything that is not bond DATA passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_head, bpf_xdp_adjust_head},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use bond_common::{
    drops,
    edpf::{self, Paths},
    maps::{
        Hold, KEPT_SLOTS, Kept, LINK_L3, LINK_V6, LINK_VALID, LinkStats, MAX_LINK_IDS,
        MAX_NEIGHBORS, Neighbor, RelayLink, TerminalConfig, UpLink, tcp,
    },
    wire::{
        self, BOND_OFF, BondHdr, ETH_LEN, ETH_P_IP, ETH_P_IPV6, INNER_OFF, INNER6_OFF, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_LEN, IPV6_LEN, OUTER_LEN, UDP_LEN, kind,
    },
};
use bond_ebpf::{
    Packet, dropped, keep, link_stats, next_seq, outer_len, read, read_u16, read_u32, write,
};

#[map]
static T_CONFIG: Array<TerminalConfig> = Array::pinned(1, 0);
#[map]
static T_UP_LINKS: Array<UpLink> = Array::pinned(MAX_LINK_IDS, 0);
/// The upstream links' scheduling state, shared by all CPUs: a pick reads
/// and advances one link's virtual finish time without a lock, so two CPUs
/// picking at once may each charge the link one packet short of the truth.
#[map]
static T_PATHS: Array<Paths> = Array::pinned(1, 0);
#[map]
static T_RELAY: HashMap<u16, RelayLink> = HashMap::pinned(MAX_LINK_IDS, 0);
/// The IPv6 address of each own link over IPv6 (`LINK_V6`), by link id.
#[map]
static T_LINKS6: Array<[u8; 16]> = Array::pinned(MAX_LINK_IDS, 0);
#[map]
static T_NEIGH: HashMap<u32, Neighbor> = HashMap::pinned(MAX_NEIGHBORS, 0);
#[map]
static T_LINK_STATS: PerCpuArray<LinkStats> = PerCpuArray::pinned(MAX_LINK_IDS, 0);
#[map]
static T_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drops::COUNT, 0);
/// The latest send time seen on downstream packets from the server, shared
/// by all CPUs (a racing update may miss a late packet; it is a measurement).
#[map]
static T_DOWN_LATEST: Array<u32> = Array::pinned(1, 0);
/// The agent's playout: where DATA_DOWN for this host waits for its turn.
#[map]
static T_HOLD: Array<Hold> = Array::pinned(1, 0);
/// Per link id: DATA_UP packets this origin sent on it, for the bond
/// header's sequence.
#[map]
static T_LINK_SEQ: Array<u32> = Array::pinned(MAX_LINK_IDS, 0);
/// What this origin sent upstream lately, for the server to ask for again.
#[map]
static T_KEPT: Array<Kept> = Array::pinned(KEPT_SLOTS, 0);
#[map]
static T_KEPT_NEXT: Array<u32> = Array::pinned(1, 0);

// ---------------------------------------------------------------- origin --

#[classifier]
pub fn bond_wrap(ctx: TcContext) -> i32 {
    match try_wrap(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &T_DROPS, reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_wrap(ctx: &TcContext) -> Result<i32, u32> {
    // IPv4 or IPv6: the wrap carries either as it is.
    let ethertype = read_u16(ctx, 12).ok_or(drops::TRUNCATED)?;
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(drops::NOT_IPV4);
    }
    // SAFETY: the context's skb pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).gso_segs } > 1 {
        return Err(drops::GSO);
    }
    let cfg = T_CONFIG.get(0).ok_or(drops::NO_LINKS)?;
    // The skb length (TcContext::len), not the linear part: skbs may be paged.
    let inner_len = ctx.len() - ETH_LEN as u32;
    let paths = T_PATHS.get_ptr_mut(0).ok_or(drops::NO_LINKS)?;
    // SAFETY: a live map value; see T_PATHS on concurrent picks.
    let link_id = unsafe { &mut *paths }
        .pick(now(), inner_len + INNER_OFF as u32)
        .map_err(|e| e.drop_reason())?;
    let link = T_UP_LINKS.get(link_id).ok_or(drops::LINK_MISSING)?;
    if link.flags & LINK_VALID == 0 {
        return Err(drops::LINK_MISSING);
    }
    // An own link over IPv6 gets an outer IPv6 header, 20 bytes longer.
    let outer6 = link.flags & LINK_V6 != 0;
    let outer_len = OUTER_LEN as u32 + if outer6 { GROWTH as u32 } else { 0 };
    if inner_len + outer_len > u32::from(link.mtu) {
        return Err(drops::TOO_BIG);
    }
    // Pure ACKs are not counted: the server's playout never sees them.
    let pure = pure_ack(ctx, ETH_LEN);
    let seq = if pure {
        0
    } else {
        next_seq(&T_LINK_SEQ, link_id)
    };
    let sent = wire::sent_us(now());
    let hdr = wrap_headers(cfg, link, link_id as u8, inner_len as u16, sent, seq);
    // On an L3 device (PPP, WireGuard, a TUN with packet information)
    // the skb's protocol is all that says what the frame is: there it
    // becomes the outer header's. A change of protocol adds (to IPv6) or
    // takes (to IPv4) 20 bytes of room. Behind Ethernet the header says it,
    // and the change is left out: done for every packet it cost a quarter
    // of an IPv6 upload (`cargo xtask bench aggregate`, `mixed`: 46 of 60
    // Mbit/s for one flow).
    let grow = |n: usize| {
        ctx.adjust_room(n as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| drops::HELPER_FAILED)
    };
    let proto = |p| skb_proto(ctx, p);
    let room = OUTER_LEN + if outer6 { GROWTH as usize } else { 0 };
    match (link.flags & LINK_L3 != 0, ethertype == ETH_P_IPV6, outer6) {
        (true, true, false) => {
            grow(room + GROWTH as usize)?;
            proto(ETH_P_IP)?;
        }
        (true, false, true) => {
            grow(room - GROWTH as usize)?;
            proto(ETH_P_IPV6)?;
        }
        _ => grow(room)?,
    }
    let bond_at = if outer6 {
        let h6 = outer6_headers(cfg, link_id, &hdr)?;
        ctx.store(0, &h6, 0).map_err(|_| drops::HELPER_FAILED)?;
        wire::BOND_OFF + GROWTH as usize
    } else {
        ctx.store(0, &hdr, 0).map_err(|_| drops::HELPER_FAILED)?;
        wire::BOND_OFF
    };
    if !pure {
        let n = BondHdr::LEN + inner_len as usize;
        let head = (cfg.community, link_id, link_id as u8, seq, sent);
        keep(ctx, &T_KEPT, &T_KEPT_NEXT, bond_at, n, head);
    }
    link_stats(&T_LINK_STATS, link_id, |s| {
        s.up_pkts += 1;
        s.up_bytes += u64::from(inner_len);
    });
    // SAFETY: plain helper call; the ifindex comes from the agent's map.
    let rc = unsafe { bpf_redirect(link.ifindex, 0) };
    Ok(if rc == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_OK
    })
}

/// Ethernet + outer IPv4 + UDP + bond header for one upstream packet.
#[inline(always)]
fn wrap_headers(
    cfg: &TerminalConfig,
    link: &UpLink,
    link_id: u8,
    inner_len: u16,
    sent_us: u32,
    seq: u8,
) -> [u8; INNER_OFF] {
    let mut h = [0u8; INNER_OFF];
    h[0..6].copy_from_slice(&link.dst_mac);
    h[6..12].copy_from_slice(&link.src_mac);
    h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    h[ETH_LEN..BOND_OFF].copy_from_slice(&wire::outer_headers(
        (link.src_ip, link.src_port),
        (link.dst_ip, link.dst_port),
        inner_len,
    ));
    let b = BondHdr::new(
        kind::DATA_UP,
        cfg.community,
        link_id,
        cfg.lan_ip,
        sent_us,
        cfg.token,
    )
    .with_seq(seq);
    h[BOND_OFF..].copy_from_slice(&b.to_bytes());
    h
}

/// The IPv6 form of `hdr` (Ethernet, outer IPv4, UDP, bond
/// header) for own link `link_id` over IPv6: the outer header from the
/// link's IPv6 address to the server's, the UDP checksum zero (RFC 6935:
/// the inner packet carries its own, and the server's program reads it).
#[inline(always)]
fn outer6_headers(
    cfg: &TerminalConfig,
    link_id: u32,
    hdr: &[u8; INNER_OFF],
) -> Result<[u8; INNER6_OFF], u32> {
    let src = T_LINKS6.get(link_id).ok_or(drops::LINK_MISSING)?;
    let mut h = [0u8; INNER6_OFF];
    h[..12].copy_from_slice(&hdr[..12]);
    h[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let plen = u16::from_be_bytes([hdr[ETH_LEN + 2], hdr[ETH_LEN + 3]]) - IPV4_LEN as u16;
    h[ETH_LEN..ETH_LEN + IPV6_LEN].copy_from_slice(&wire::outer6_header(
        plen,
        src,
        &cfg.server_ip6,
    ));
    // UDP (its checksum zero) and the bond header, as they were.
    h[ETH_LEN + IPV6_LEN..].copy_from_slice(&hdr[ETH_LEN + IPV4_LEN..]);
    h[ETH_LEN + IPV6_LEN + 6] = 0;
    h[ETH_LEN + IPV6_LEN + 7] = 0;
    Ok(h)
}

/// Moves an XDP frame's start by `delta` bytes (`bpf_xdp_adjust_head`):
/// forward takes bytes away, back makes room.
#[inline(always)]
fn xdp_head(ctx: &XdpContext, delta: i32) -> Result<(), u32> {
    // SAFETY: plain helper call; every packet pointer is re-derived after it.
    match unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } {
        0 => Ok(()),
        _ => Err(drops::HELPER_FAILED),
    }
}

/// Makes the skb `proto` (`bpf_skb_change_proto`): to IPv6 it adds 20
/// bytes of room behind the link header, to IPv4 it takes them away.
#[inline(always)]
fn skb_proto(ctx: &TcContext, proto: u16) -> Result<(), u32> {
    ctx.skb
        .change_proto(proto.to_be(), 0)
        .map_err(|_| drops::HELPER_FAILED)
}

/// The outer IPv6 header is this much longer than the IPv4 one.
const GROWTH: i32 = (IPV6_LEN - IPV4_LEN) as i32;

#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

// ----------------------------------------------------- relay and receive --

#[xdp]
pub fn bond_terminal(ctx: XdpContext) -> u32 {
    match try_terminal(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &T_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

const PASS: Result<u32, u32> = Ok(xdp_action::XDP_PASS);

#[inline(always)]
fn try_terminal(ctx: &XdpContext) -> Result<u32, u32> {
    // (IPv6 20 bytes shorter as IPv4: the frame starts that much later.)
    let shrink = || xdp_head(ctx, GROWTH);
    if read_u16(ctx, 12) == Some(ETH_P_IPV6) && !from_server6::<ETH_LEN>(ctx, shrink)? {
        return PASS;
    }
    let Some(d) = bond_data::<ETH_LEN>(ctx)? else {
        return PASS;
    };
    match (d.b.kind, d.relay) {
        // XDP cannot send to a device without an Ethernet header:
        // `bond_relay`, next on the LAN's path, does.
        (kind::DATA_UP, Some(relay)) if relay.flags & LINK_L3 != 0 => PASS,
        (kind::DATA_UP, Some(relay)) => relay_up(ctx, d.cfg, relay),
        (kind::DATA_UP, None) => Err(drops::BAD_KIND),
        _ if d.b.origin() == d.cfg.lan_ip => unwrap(ctx, &d),
        (_, Some(_)) => relay_down(ctx, &d),
        (_, None) => Err(drops::WRONG_ORIGIN),
    }
}

/// A checked bond DATA packet to one of this host's ports.
struct Data {
    cfg: &'static TerminalConfig,
    b: BondHdr,
    /// The UDP port it came to: the data port or an own link's.
    port: u16,
    /// The own link of that port, if it is one.
    relay: Option<&'static RelayLink>,
    /// The outer IPv4 total length.
    tot: u16,
}

/// Finds bond DATA in a packet whose outer IPv4 header starts at `L2`
/// (behind Ethernet, or at 0 on an L3 link): `None` for anything else,
/// which passes untouched. Only IPv4/UDP without options or fragmentation
/// can be ours.
#[inline(always)]
fn bond_data<const L2: usize>(ctx: &impl Packet) -> Result<Option<Data>, u32> {
    // (Each read returns early: a tuple of Options lets LLVM compute on
    // the undefined payload of a None, which the verifier rejects.)
    let (vihl, frag, proto) = if L2 == ETH_LEN {
        let Some(h) = read::<24>(ctx, 0) else {
            return Ok(None);
        };
        if u16::from_be_bytes([h[12], h[13]]) != ETH_P_IP {
            return Ok(None);
        }
        (h[14], u16::from_be_bytes([h[20], h[21]]), h[23])
    } else {
        let Some(h) = read::<10>(ctx, L2) else {
            return Ok(None);
        };
        (h[0], u16::from_be_bytes([h[6], h[7]]), h[9])
    };
    if proto != IPPROTO_UDP || vihl != wire::IPV4_VIHL || frag & wire::IPV4_FRAGMENT != 0 {
        return Ok(None);
    }
    let Some(port) = read_u16(ctx, L2 + 22) else {
        return Ok(None);
    };
    let Some(cfg) = T_CONFIG.get(0) else {
        return Ok(None);
    };
    // SAFETY: the value is only read; the agent replaces entries whole.
    let relay = unsafe { T_RELAY.get(port) };
    if relay.is_none() && port != cfg.data_port {
        return Ok(None);
    }
    let b = read::<{ BondHdr::LEN }>(ctx, L2 + BOND_AT).ok_or(drops::TRUNCATED)?;
    let b = BondHdr::from_bytes(b);
    b.validate().map_err(|e| e.drop_reason())?;
    if !b.is_data() {
        return Ok(None); // control message: the agent's socket
    }
    let tot = outer_len(ctx, L2)?;
    if b.community() != cfg.community {
        return Err(drops::WRONG_COMMUNITY);
    }
    Ok(Some(Data {
        cfg,
        b,
        port,
        relay,
        tot,
    }))
}

/// An IPv6 packet (its header at `L2`: behind Ethernet, or at 0 on an L3
/// link) on an own link over IPv6: if it is UDP to that link's port, it
/// must come from the server's IPv6 address (else it is dropped,
/// `unknown_source`, as DATA from elsewhere over IPv4 is); then DATA's
/// outer header becomes the IPv4 form the rest of the program reads, from
/// the server's IPv4 address, 20 bytes shorter: `shrink` takes the first
/// 20 bytes away. False for anything else (a control message among them),
/// which passes untouched.
#[inline(always)]
fn from_server6<const L2: usize>(
    ctx: &impl Packet,
    shrink: impl FnOnce() -> Result<(), u32>,
) -> Result<bool, u32> {
    let ip6 = L2;
    let udp6 = ip6 + IPV6_LEN;
    let Some(h) = read::<8>(ctx, ip6) else {
        return Ok(false);
    };
    let Some(port) = read_u16(ctx, udp6 + 2) else {
        return Ok(false);
    };
    if h[6] != IPPROTO_UDP || !link6_port(port) {
        return Ok(false);
    }
    let cfg = T_CONFIG.get(0).ok_or(drops::UNKNOWN_SOURCE)?;
    let src = read::<16>(ctx, ip6 + 8).ok_or(drops::TRUNCATED)?;
    if u128::from_ne_bytes(src) != u128::from_ne_bytes(cfg.server_ip6) {
        return Err(drops::UNKNOWN_SOURCE);
    }
    let plen = u16::from_be_bytes([h[4], h[5]]);
    let ulen = read_u16(ctx, udp6 + 4).ok_or(drops::TRUNCATED)?;
    if ulen != plen
        || usize::from(plen) < UDP_LEN + BondHdr::LEN
        || udp6 + usize::from(plen) > ctx.packet_len()
    {
        return Err(drops::OUTER_BAD_HEADER);
    }
    // Only DATA: a control message goes to the agent's socket as it came.
    let b = read::<{ BondHdr::LEN }>(ctx, udp6 + 8).ok_or(drops::TRUNCATED)?;
    let b = BondHdr::from_bytes(b);
    b.validate().map_err(|e| e.drop_reason())?;
    if !b.is_data() {
        return Ok(false);
    }
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    let sport = read_u16(ctx, udp6).ok_or(drops::TRUNCATED)?;
    shrink()?;
    let inner_len = plen - (UDP_LEN + BondHdr::LEN) as u16;
    let outer = wire::outer_headers((cfg.server_ip, sport), (0, port), inner_len);
    let mut eth = [0u8; ETH_LEN];
    eth[..12].copy_from_slice(&macs);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    if (L2 == 0 || write(ctx, 0, eth)) && write(ctx, L2, outer) {
        Ok(true)
    } else {
        Err(drops::TRUNCATED)
    }
}

/// Whether `port` is an own link's over IPv6 (`LINK_V6`).
#[inline(always)]
fn link6_port(port: u16) -> bool {
    // SAFETY: the value is only read; the agent replaces entries whole.
    unsafe { T_RELAY.get(port) }.is_some_and(|r| r.flags & LINK_V6 != 0)
}

/// Where the bond header starts behind the outer IPv4 header.
const BOND_AT: usize = wire::BOND_OFF - ETH_LEN;

/// DATA_UP from a LAN peer to one of our links: on to the server.
#[inline(always)]
fn relay_up(ctx: &XdpContext, cfg: &TerminalConfig, relay: &RelayLink) -> Result<u32, u32> {
    let outer6 = relay.flags & LINK_V6 != 0;
    let grows = if outer6 { GROWTH as usize } else { 0 };
    if ctx.packet_len() + grows > usize::from(relay.mtu) + ETH_LEN {
        return Err(drops::TOO_BIG);
    }
    to_server::<ETH_LEN>(ctx, cfg, relay)?;
    if outer6 {
        to_outer6(ctx, cfg, relay.link, || xdp_head(ctx, -GROWTH))?;
    }
    write_macs(ctx, relay.wan_mac, relay.gw_mac)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(relay.wan_ifindex, 0) } as u32)
}

/// Turns DATA_UP's outer IPv4 header behind Ethernet (pointed at the
/// server) into IPv6 from own link `link`'s address to the server's, 20
/// bytes longer (`grow` makes the room: in front of the frame, or behind
/// its Ethernet header); the UDP checksum is zero (see `outer6_headers`).
#[inline(always)]
fn to_outer6(
    ctx: &impl Packet,
    cfg: &TerminalConfig,
    link: u8,
    grow: impl FnOnce() -> Result<(), u32>,
) -> Result<(), u32> {
    let src = T_LINKS6.get(u32::from(link)).ok_or(drops::LINK_MISSING)?;
    let tot = read_u16(ctx, ETH_LEN + 2).ok_or(drops::TRUNCATED)?;
    grow()?;
    let ip = wire::outer6_header(tot.wrapping_sub(IPV4_LEN as u16), src, &cfg.server_ip6);
    let written = write(ctx, 12, ETH_P_IPV6.to_be_bytes())
        && write(ctx, ETH_LEN, ip)
        && write(ctx, ETH_LEN + IPV6_LEN + 6, [0u8; 2]);
    if written {
        Ok(())
    } else {
        Err(drops::TRUNCATED)
    }
}

/// Points DATA_UP's outer IPv4 and UDP headers (at `L2`) from link
/// `relay` to the server, and counts it.
#[inline(always)]
fn to_server<const L2: usize>(
    ctx: &impl Packet,
    cfg: &TerminalConfig,
    relay: &RelayLink,
) -> Result<(), u32> {
    let len = carried::<L2>(ctx);
    rewrite_outer::<L2>(
        ctx,
        (relay.wan_ip, relay.port),
        (cfg.server_ip, cfg.server_port),
    )?;
    link_stats(&T_LINK_STATS, u32::from(relay.link), |s| {
        s.relay_up_pkts += 1;
        s.relay_up_bytes += len;
    });
    Ok(())
}

/// DATA_DOWN from the server on one of our links for a LAN peer: on to it.
#[inline(always)]
fn relay_down(ctx: &XdpContext, d: &Data) -> Result<u32, u32> {
    let peer = to_peer::<ETH_LEN>(ctx, d)?;
    write_macs(ctx, d.cfg.lan_mac, peer)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(d.cfg.lan_ifindex, 0) } as u32)
}

/// Points DATA_DOWN's outer IPv4 and UDP headers (at `L2`) at the LAN
/// peer it is for, and counts it; returns the peer's MAC. Only the
/// server's: a relay does not bounce what a LAN host sends it.
#[inline(always)]
fn to_peer<const L2: usize>(ctx: &impl Packet, d: &Data) -> Result<[u8; 6], u32> {
    if read_u32(ctx, L2 + 12) != Some(d.cfg.server_ip) {
        return Err(drops::UNKNOWN_SOURCE);
    }
    let origin = d.b.origin();
    // SAFETY: read-only use of a map value.
    let peer = unsafe { T_NEIGH.get(origin) }.ok_or(drops::NO_NEIGHBOR)?;
    let len = carried::<L2>(ctx);
    rewrite_outer::<L2>(ctx, (d.cfg.lan_ip, d.port), (origin, d.cfg.data_port))?;
    link_stats(&T_LINK_STATS, u32::from(d.b.link), |s| {
        s.relay_down_pkts += 1;
        s.relay_down_bytes += len;
    });
    Ok(peer.mac)
}

/// The bytes a wrapped packet carries (its inner packet), as every byte
/// counter counts them.
#[inline(always)]
fn carried<const L2: usize>(ctx: &impl Packet) -> u64 {
    ctx.packet_len().saturating_sub(L2 + OUTER_LEN) as u64
}

/// Points a wrapped packet's outer IPv4 and UDP headers (at `L2`) at the
/// next hop: both are built anew (`wire::outer_headers`) for the inner
/// packet they carry, whose length the caller has checked.
#[inline(always)]
fn rewrite_outer<const L2: usize>(
    ctx: &impl Packet,
    src: (u32, u16),
    dst: (u32, u16),
) -> Result<(), u32> {
    let tot = read_u16(ctx, L2 + 2).ok_or(drops::TRUNCATED)?;
    let inner_len = tot.wrapping_sub(OUTER_LEN as u16);
    if write(ctx, L2, wire::outer_headers(src, dst, inner_len)) {
        Ok(())
    } else {
        Err(drops::TRUNCATED)
    }
}

/// Addresses an Ethernet frame from `src` to `dst`.
#[inline(always)]
fn write_macs(ctx: &impl Packet, src: [u8; 6], dst: [u8; 6]) -> Result<(), u32> {
    let mut eth = [0u8; 12];
    eth[0..6].copy_from_slice(&dst);
    eth[6..12].copy_from_slice(&src);
    if write(ctx, 0, eth) {
        Ok(())
    } else {
        Err(drops::TRUNCATED)
    }
}

/// DATA_DOWN for this host: strip the wrap and hand the inner packet up.
#[inline(always)]
fn unwrap(ctx: &XdpContext, d: &Data) -> Result<u32, u32> {
    let (inner_len, pure_ack, ethertype) = ours::<ETH_LEN>(ctx, d)?;
    // SAFETY: the context pointer is valid for the program's run.
    if let Some(hold) = held(unsafe { (*ctx.ctx).ingress_ifindex }, pure_ack) {
        // SAFETY: plain helper call; the ifindex comes from the agent's map.
        return Ok(unsafe { bpf_redirect(hold, 0) } as u32);
    }
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    xdp_head(ctx, OUTER_LEN as i32)?;
    let mut eth = [0u8; 14];
    eth[..12].copy_from_slice(&macs);
    eth[12..].copy_from_slice(&ethertype.to_be_bytes());
    if !write(ctx, 0, eth) {
        return Err(drops::TRUNCATED);
    }
    delivered(&d.b, inner_len, pure_ack);
    Ok(xdp_action::XDP_PASS)
}

/// Checks DATA_DOWN for this host (outer IPv4 at `L2`): its kind, token
/// and inner length. Returns the inner length, whether it is a pure ACK,
/// and the inner packet's ethertype (IPv4 or IPv6).
#[inline(always)]
fn ours<const L2: usize>(ctx: &impl Packet, d: &Data) -> Result<(u16, bool, u16), u32> {
    if d.b.kind != kind::DATA_DOWN {
        return Err(drops::BAD_KIND);
    }
    if d.b.token() != d.cfg.token {
        return Err(drops::BAD_TOKEN);
    }
    let inner = L2 + OUTER_LEN;
    let vihl = read::<1>(ctx, inner).ok_or(drops::TRUNCATED)?;
    let (inner_len, least, ethertype) = match vihl[0] >> 4 {
        4 => (
            read_u16(ctx, inner + 2).ok_or(drops::TRUNCATED)?,
            20,
            ETH_P_IP,
        ),
        // IPv6: the payload length, past the 40-byte header.
        6 => (
            read_u16(ctx, inner + 4)
                .ok_or(drops::TRUNCATED)?
                .saturating_add(IPV6_LEN as u16),
            IPV6_LEN as u16,
            ETH_P_IPV6,
        ),
        _ => return Err(drops::INNER_NOT_IPV4),
    };
    if usize::from(inner_len) + OUTER_LEN > usize::from(d.tot) || inner_len < least {
        return Err(drops::INNER_BAD_HEADER);
    }
    Ok((inner_len, pure_ack(ctx, inner), ethertype))
}

/// The hold device, if a checked packet of ours that came in on `ingress`
/// goes there: to the playout, which sends it back (through the hold
/// device) when its time comes. Pure ACKs need no order and go up at once.
#[inline(always)]
fn held(ingress: u32, pure_ack: bool) -> Option<u32> {
    let hold = T_HOLD.get(0)?;
    (!pure_ack && hold.takes(ingress, now())).then_some(hold.ifindex)
}

/// Counts a packet of ours handed up, and whether it came late (after one
/// the server sent later). Pure ACKs do not count as late.
#[inline(always)]
fn delivered(b: &BondHdr, inner_len: u16, pure_ack: bool) {
    let late = match T_DOWN_LATEST.get_ptr_mut(0) {
        // SAFETY: a live map value; see T_DOWN_LATEST on races.
        Some(h) if !pure_ack => edpf::arrived_late(unsafe { &mut *h }, b.sent_us()),
        _ => false,
    };
    link_stats(&T_LINK_STATS, u32::from(b.link), |s| {
        s.down_pkts += 1;
        s.down_bytes += u64::from(inner_len);
        s.down_late += u64::from(late);
    });
}

// ------------------------------------------------------------ L3 links --
//
// A link on a device without an Ethernet header (PPP, a raw-IP modem, tun,
// WireGuard) is served by TC: XDP cannot redirect to such a device, and on
// one it runs only generically, with Ethernet assumptions the kernel
// applies after it.

/// `bond_relay` (TC ingress on the LAN): DATA_UP from a LAN peer to an own
/// L3 link, which `bond_terminal` passed on, goes on to the server. The
/// kernel drops the Ethernet header on the way into an L3 device.
#[classifier]
pub fn bond_relay(ctx: TcContext) -> i32 {
    match try_relay(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &T_DROPS, reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_relay(ctx: &TcContext) -> Result<i32, u32> {
    // SAFETY: the value is only read; the agent replaces entries whole.
    let to_l3 = |port| unsafe { T_RELAY.get(port) }.is_some_and(|r| r.flags & LINK_L3 != 0);
    if !linear_if_ours::<ETH_LEN>(ctx, to_l3) {
        return Ok(TC_ACT_OK);
    }
    let Some(d) = bond_data::<ETH_LEN>(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let relay = match (d.b.kind, d.relay) {
        (kind::DATA_UP, Some(relay)) if relay.flags & LINK_L3 != 0 => relay,
        _ => return Ok(TC_ACT_OK), // bond_terminal's, or the stack's
    };
    let outer6 = relay.flags & LINK_V6 != 0;
    let grows = if outer6 { GROWTH as u32 } else { 0 };
    if ctx.len() + grows > u32::from(relay.mtu) + ETH_LEN as u32 {
        return Err(drops::TOO_BIG);
    }
    to_server::<ETH_LEN>(ctx, d.cfg, relay)?;
    if outer6 {
        // The skb becomes IPv6, as the L3 device frames by its protocol;
        // the change makes the 20 bytes of room behind Ethernet.
        to_outer6(ctx, d.cfg, relay.link, || skb_proto(ctx, ETH_P_IPV6))?;
    }
    Ok(redirect(relay.wan_ifindex))
}

/// `bond_terminal_l3` (TC ingress on an own L3 link): what `bond_terminal`
/// does for DATA_DOWN from the server, on packets that start at their
/// IPv4 header. The LAN and the hold device are Ethernet: packets for
/// them get an Ethernet header first.
#[classifier]
pub fn bond_terminal_l3(ctx: TcContext) -> i32 {
    match try_terminal_l3(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &T_DROPS, reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_terminal_l3(ctx: &TcContext) -> Result<i32, u32> {
    let Some(cfg) = T_CONFIG.get(0) else {
        return Ok(TC_ACT_OK);
    };
    // A link over IPv6: DATA from the server becomes the IPv4 form (the
    // skb IPv4, its first 20 bytes taken away), as on Ethernet.
    linear(ctx, (IPV6_LEN + UDP_LEN + BondHdr::LEN) as u32);
    if read::<8>(ctx, 0).is_some_and(|h| h[0] >> 4 == 6) {
        if !read_u16(ctx, IPV6_LEN + 2).is_some_and(link6_port) {
            return Ok(TC_ACT_OK);
        }
        linear(ctx, ctx.len());
        if !from_server6::<0>(ctx, || skb_proto(ctx, ETH_P_IP))? {
            return Ok(TC_ACT_OK);
        }
    }
    // SAFETY: the value is only read; the agent replaces entries whole.
    let bond_port = |port| port == cfg.data_port || unsafe { T_RELAY.get(port) }.is_some();
    if !linear_if_ours::<0>(ctx, bond_port) {
        return Ok(TC_ACT_OK);
    }
    let Some(d) = bond_data::<0>(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    if d.b.kind == kind::DATA_UP {
        return Err(drops::BAD_KIND); // upstream does not come from the server
    }
    if d.b.origin() == d.cfg.lan_ip {
        let (inner_len, pure_ack, ethertype) = ours::<0>(ctx, &d)?;
        // SAFETY: the context's skb pointer is valid for the program's run.
        if let Some(hold) = held(unsafe { (*ctx.skb.skb).ingress_ifindex }, pure_ack) {
            push_ethernet(ctx, [0; 6], [0; 6])?; // the playout addresses it
            return Ok(redirect(hold));
        }
        let strip = if ethertype == ETH_P_IPV6 {
            // The skb must become IPv6 for the stack to take it: the change
            // of protocol adds 20 bytes of room, stripped with the wrap.
            skb_proto(ctx, ETH_P_IPV6)?;
            OUTER_LEN + IPV6_LEN - IPV4_LEN
        } else {
            OUTER_LEN
        };
        ctx.adjust_room(-(strip as i32), BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| drops::HELPER_FAILED)?;
        delivered(&d.b, inner_len, pure_ack);
        return Ok(TC_ACT_OK);
    }
    if d.relay.is_none() {
        return Err(drops::WRONG_ORIGIN);
    }
    let peer = to_peer::<0>(ctx, &d)?;
    push_ethernet(ctx, d.cfg.lan_mac, peer)?;
    Ok(redirect(d.cfg.lan_ifindex))
}

/// TC reads packets in the skb's linear part. Every packet gets its
/// headers there; only one to a port `ours` takes (the UDP destination
/// port at `L2 + 22`) is made linear whole, as the parser checks its
/// lengths against it and the rewrites write it. Other traffic (GRO'd
/// TCP on the LAN, say) is not copied.
#[inline(always)]
fn linear_if_ours<const L2: usize>(ctx: &TcContext, ours: impl FnOnce(u16) -> bool) -> bool {
    linear(ctx, (L2 + BOND_AT + BondHdr::LEN) as u32);
    match read_u16(ctx, L2 + 22) {
        Some(port) if ours(port) => {
            linear(ctx, ctx.len());
            true
        }
        _ => false,
    }
}

/// Makes the first `n` bytes (at most the packet) linear, if they are not.
#[inline(always)]
fn linear(ctx: &TcContext, n: u32) {
    let n = n.min(ctx.len());
    if ((ctx.data_end() - ctx.data()) as u32) < n {
        let _ = ctx.pull_data(n);
    }
}

/// Puts an Ethernet header from `src` to `dst` in front of an IPv4 packet.
#[inline(always)]
fn push_ethernet(ctx: &TcContext, src: [u8; 6], dst: [u8; 6]) -> Result<(), u32> {
    // SAFETY: plain helper call; every packet pointer is re-derived after it.
    if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let mut eth = [0u8; 14];
    eth[0..6].copy_from_slice(&dst);
    eth[6..12].copy_from_slice(&src);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    if write(ctx, 0, eth) {
        Ok(())
    } else {
        Err(drops::TRUNCATED)
    }
}

/// Sends the packet out of `ifindex` (TC).
#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: plain helper call; the ifindex comes from the agent's map.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_SHOT
    }
}

/// Whether the IPv4 or IPv6 packet at `off` is a TCP pure ACK
/// (`tcp::pure_ack`), as the receiving end's program judges it. Only
/// headers without options (extension headers) are looked at; any other
/// packet is not one.
#[inline(always)]
fn pure_ack(ctx: &impl Packet, off: usize) -> bool {
    let Some(h) = read::<34>(ctx, off) else {
        return false;
    };
    if h[0] >> 4 == 6 {
        // IPv6 without extension headers: TCP behind the 40-byte header.
        let Some(t) = read::<14>(ctx, off + IPV6_LEN) else {
            return false;
        };
        let plen = u16::from_be_bytes([h[4], h[5]]);
        return h[6] == IPPROTO_TCP && tcp::pure_ack6(plen, [t[12], t[13]]);
    }
    h[0] == wire::IPV4_VIHL
        && h[9] == IPPROTO_TCP
        && u16::from_be_bytes([h[6], h[7]]) & wire::IPV4_FRAGMENT == 0
        && tcp::pure_ack(u16::from_be_bytes([h[2], h[3]]), [h[32], h[33]])
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
