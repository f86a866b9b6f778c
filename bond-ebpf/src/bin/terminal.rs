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
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use bond_common::{
    drops,
    edpf::{self, Paths},
    maps::{
        Hold, KEPT_SLOTS, Kept, LINK_VALID, LinkStats, MAX_LINK_IDS, MAX_NEIGHBORS, Neighbor,
        RelayLink, TerminalConfig, UpLink, tcp,
    },
    wire::{
        self, BondHdr, ETH_LEN, ETH_P_IP, INNER_OFF, IPPROTO_TCP, IPPROTO_UDP, OUTER_LEN, kind,
    },
};
use bond_ebpf::{
    Packet, count, keep, link_stats, next_seq, outer_len, read, read_u16, read_u32, write,
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
            count(&T_DROPS, reason);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_wrap(ctx: &TcContext) -> Result<i32, u32> {
    if read_u16(ctx, 12).ok_or(drops::TRUNCATED)? != ETH_P_IP {
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
    if inner_len + OUTER_LEN as u32 > u32::from(link.mtu) {
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
    ctx.adjust_room(OUTER_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| drops::HELPER_FAILED)?;
    ctx.store(0, &hdr, 0).map_err(|_| drops::HELPER_FAILED)?;
    if !pure {
        let n = BondHdr::LEN + inner_len as usize;
        let head = (cfg.community, link_id, link_id as u8, seq, sent);
        keep(ctx, &T_KEPT, &T_KEPT_NEXT, wire::BOND_OFF, n, head);
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
) -> [u8; 66] {
    let mut h = [0u8; 66];
    h[0..6].copy_from_slice(&link.dst_mac);
    h[6..12].copy_from_slice(&link.src_mac);
    h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    h[14..34].copy_from_slice(&wire::outer_ipv4(link.src_ip, link.dst_ip, inner_len));
    h[34..42].copy_from_slice(&wire::outer_udp(link.src_port, link.dst_port, inner_len));
    let b = BondHdr::new(
        kind::DATA_UP,
        cfg.community,
        link_id,
        cfg.lan_ip,
        sent_us,
        cfg.token,
    )
    .with_seq(seq);
    h[42..66].copy_from_slice(&b.to_bytes());
    h
}

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
            count(&T_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

const PASS: Result<u32, u32> = Ok(xdp_action::XDP_PASS);

#[inline(always)]
fn try_terminal(ctx: &XdpContext) -> Result<u32, u32> {
    // Only IPv4/UDP without options or fragmentation can be ours. (Each
    // read returns early: a tuple of Options lets LLVM compute on the
    // undefined payload of a None, which the verifier rejects.)
    let Some(hdr) = read::<24>(ctx, 0) else {
        return PASS;
    };
    let ethertype = u16::from_be_bytes([hdr[12], hdr[13]]);
    let frag = u16::from_be_bytes([hdr[20], hdr[21]]);
    if ethertype != ETH_P_IP || hdr[23] != IPPROTO_UDP || hdr[14] != 0x45 || frag & 0x3fff != 0 {
        return PASS;
    }
    let Some(dport) = read_u16(ctx, ETH_LEN + 22) else {
        return PASS;
    };
    let Some(cfg) = T_CONFIG.get(0) else {
        return PASS;
    };
    // SAFETY: the value is only read; the agent replaces entries whole.
    let relay = unsafe { T_RELAY.get(dport) };
    if relay.is_none() && dport != cfg.data_port {
        return PASS;
    }
    let b = read::<{ BondHdr::LEN }>(ctx, wire::BOND_OFF).ok_or(drops::TRUNCATED)?;
    let b = BondHdr::from_bytes(b);
    b.validate().map_err(|e| e.drop_reason())?;
    if !b.is_data() {
        return PASS; // control message: the agent's socket
    }
    let tot = outer_len(ctx)?;
    if b.community() != cfg.community {
        return Err(drops::WRONG_COMMUNITY);
    }
    match (b.kind, relay) {
        (kind::DATA_UP, Some(relay)) => relay_up(ctx, cfg, relay),
        (kind::DATA_UP, None) => Err(drops::BAD_KIND),
        _ if b.origin() == cfg.lan_ip => unwrap(ctx, cfg, &b, tot),
        (_, Some(_)) => relay_down(ctx, cfg, &b, dport),
        (_, None) => Err(drops::WRONG_ORIGIN),
    }
}

/// DATA_UP from a LAN peer to one of our links: on to the server.
#[inline(always)]
fn relay_up(ctx: &XdpContext, cfg: &TerminalConfig, relay: &RelayLink) -> Result<u32, u32> {
    if ctx.packet_len() > usize::from(relay.mtu) + ETH_LEN {
        return Err(drops::TOO_BIG);
    }
    let len = carried(ctx);
    rewrite_outer(
        ctx,
        relay.wan_mac,
        relay.gw_mac,
        relay.wan_ip,
        cfg.server_ip,
        relay.port,
        cfg.server_port,
    )?;
    link_stats(&T_LINK_STATS, u32::from(relay.link), |s| {
        s.relay_up_pkts += 1;
        s.relay_up_bytes += len;
    });
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(relay.wan_ifindex, 0) } as u32)
}

/// DATA_DOWN from the server on one of our links for a LAN peer: on to it.
/// Only the server's: a relay does not bounce what a LAN host sends it.
#[inline(always)]
fn relay_down(ctx: &XdpContext, cfg: &TerminalConfig, b: &BondHdr, port: u16) -> Result<u32, u32> {
    if read_u32(ctx, ETH_LEN + 12) != Some(cfg.server_ip) {
        return Err(drops::UNKNOWN_SOURCE);
    }
    let origin = b.origin();
    // SAFETY: read-only use of a map value.
    let peer = unsafe { T_NEIGH.get(origin) }.ok_or(drops::NO_NEIGHBOR)?;
    let len = carried(ctx);
    rewrite_outer(
        ctx,
        cfg.lan_mac,
        peer.mac,
        cfg.lan_ip,
        origin,
        port,
        cfg.data_port,
    )?;
    link_stats(&T_LINK_STATS, u32::from(b.link), |s| {
        s.relay_down_pkts += 1;
        s.relay_down_bytes += len;
    });
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(cfg.lan_ifindex, 0) } as u32)
}

/// The bytes a wrapped frame carries (its inner packet), as every byte
/// counter counts them.
#[inline(always)]
fn carried(ctx: &XdpContext) -> u64 {
    ctx.packet_len().saturating_sub(INNER_OFF) as u64
}

/// Points a wrapped packet's Ethernet, IPv4 and UDP headers at the next hop.
/// The outer IPv4 header is rebuilt and its checksum recomputed in full.
#[inline(always)]
fn rewrite_outer(
    ctx: &XdpContext,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: u32,
    dst_ip: u32,
    src_port: u16,
    dst_port: u16,
) -> Result<(), u32> {
    let mut ip = read::<20>(ctx, ETH_LEN).ok_or(drops::TRUNCATED)?;
    ip[8] = 64;
    ip[12..16].copy_from_slice(&src_ip.to_be_bytes());
    ip[16..20].copy_from_slice(&dst_ip.to_be_bytes());
    let c = bond_common::csum::ipv4_header(&ip).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    let mut udp = read::<4>(ctx, ETH_LEN + 20).ok_or(drops::TRUNCATED)?;
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    let mut eth = [0u8; 12];
    eth[0..6].copy_from_slice(&dst_mac);
    eth[6..12].copy_from_slice(&src_mac);
    if write(ctx, 0, eth)
        && write(ctx, ETH_LEN, ip)
        && write(ctx, ETH_LEN + 20, udp)
        && write(ctx, ETH_LEN + 26, [0u8; 2])
    {
        Ok(())
    } else {
        Err(drops::TRUNCATED)
    }
}

/// DATA_DOWN for this host: strip the wrap and hand the inner packet up.
#[inline(always)]
fn unwrap(ctx: &XdpContext, cfg: &TerminalConfig, b: &BondHdr, tot: u16) -> Result<u32, u32> {
    if b.kind != kind::DATA_DOWN {
        return Err(drops::BAD_KIND);
    }
    if b.token() != cfg.token {
        return Err(drops::BAD_TOKEN);
    }
    let vihl = read::<1>(ctx, INNER_OFF).ok_or(drops::TRUNCATED)?;
    if vihl[0] >> 4 != 4 {
        return Err(drops::INNER_NOT_IPV4);
    }
    let inner_len = read_u16(ctx, INNER_OFF + 2).ok_or(drops::TRUNCATED)?;
    if usize::from(inner_len) + OUTER_LEN > usize::from(tot) || inner_len < 20 {
        return Err(drops::INNER_BAD_HEADER);
    }
    // Checked and ours: to the playout, which sends it back here (through
    // the hold device) when its time comes. Pure ACKs need no order and
    // go up at once; they do not count as late either.
    let pure_ack = pure_ack(ctx, INNER_OFF);
    if !pure_ack
        && let Some(hold) = T_HOLD.get(0)
        // SAFETY: the context pointer is valid for the program's run.
        && hold.takes(unsafe { (*ctx.ctx).ingress_ifindex }, now())
    {
        // SAFETY: plain helper call; the ifindex comes from the agent's map.
        return Ok(unsafe { bpf_redirect(hold.ifindex, 0) } as u32);
    }
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; every packet pointer is re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER_LEN as i32) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let mut eth = [0u8; 14];
    eth[..12].copy_from_slice(&macs);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    if !write(ctx, 0, eth) {
        return Err(drops::TRUNCATED);
    }
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
    Ok(xdp_action::XDP_PASS)
}

/// Whether the IPv4 packet at `off` is a TCP pure ACK (`tcp::pure_ack`),
/// as the receiving end's program judges it. Only headers without options
/// are looked at; any other packet is not one.
#[inline(always)]
fn pure_ack(ctx: &impl Packet, off: usize) -> bool {
    let Some(h) = read::<34>(ctx, off) else {
        return false;
    };
    h[0] == 0x45
        && h[9] == IPPROTO_TCP
        && u16::from_be_bytes([h[6], h[7]]) & 0x3fff == 0
        && tcp::pure_ack(u16::from_be_bytes([h[2], h[3]]), [h[32], h[33]])
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
