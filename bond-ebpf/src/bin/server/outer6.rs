//! Links over IPv6: a link that has only IPv6 (many LTE uplinks) reaches
//! the server's IPv6 address (`wan_ip6`). The rest of the server reads
//! one outer form, IPv4 (fixed offsets throughout), so the outer IPv6
//! header is turned into it on the way in and back on the way out, 20
//! bytes shorter and longer:
//!
//! - `bond_server_in6`, for IPv6 UDP to `wan_ip6` and the server's port
//!   (`bond_server` tail-calls it, `JUMP_IN6`): control messages pass to
//!   the agent's socket; DATA_UP must come from its link's registered
//!   IPv6 address and port (`S_LINKS6`, `LINK_V6`), as an IPv4 link's
//!   from its address. Checked, its outer header becomes IPv4 from 0.0.0.0
//!   (the link's `ip`) to `wan_ip`, and it goes back to `bond_server`
//!   (`JUMP_SERVER`) with word in `S_FROM6` that it was checked; without
//!   that word `bond_server` refuses DATA_UP on an IPv6 link.
//! - `bond_server_out6`, for every wrap `wrap_down` made for an IPv6 link
//!   (`JUMP_OUT6`): the outer IPv4 header becomes IPv6 from `wan_ip6` to
//!   the link's address, and the frame goes to the FIB's next hop.
//!
//! The UDP checksum of DATA over IPv6 is zero, as tunnels over UDP send
//! it (RFC 6935, RFC 6936: the inner packet carries its own checksums,
//! and the receiving end is a bond program, not a socket); control
//! messages come from the agents' sockets with theirs.

use super::*;
use bond_common::wire::{IPV6_LEN, UDP_LEN};

/// Where the outer IPv6 header's pieces are, and the bond header behind
/// it.
const IP6: usize = ETH_LEN;
const UDP6: usize = IP6 + IPV6_LEN;
const BOND6: usize = UDP6 + UDP_LEN;
/// The outer IPv6 header is this much longer than the IPv4 one.
const GROWTH: i32 = (IPV6_LEN - IPV4_LEN) as i32;
const AF_INET6: u8 = 10;

/// Whether an IPv6 frame is UDP to the server's IPv6 address and port.
#[inline(always)]
pub(crate) fn to_us(ctx: &XdpContext, cfg: &ServerConfig) -> bool {
    let Some(h) = read::<8>(ctx, IP6) else {
        return false;
    };
    h[6] == IPPROTO_UDP
        && u128::from_ne_bytes(cfg.wan_ip6) != 0
        && read::<16>(ctx, IP6 + 24).is_some_and(|d| d == cfg.wan_ip6)
        && read_u16(ctx, UDP6 + 2) == Some(cfg.port)
}

#[xdp]
pub fn bond_server_in6(ctx: XdpContext) -> u32 {
    match try_in6(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &S_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_in6(ctx: &XdpContext) -> Result<u32, u32> {
    let cfg = S_CONFIG.get(0).ok_or(drops::UNKNOWN_SOURCE)?;
    let h = read::<8>(ctx, IP6).ok_or(drops::TRUNCATED)?;
    let plen = u16::from_be_bytes([h[4], h[5]]);
    let udp = read::<8>(ctx, UDP6).ok_or(drops::TRUNCATED)?;
    let ulen = u16::from_be_bytes([udp[4], udp[5]]);
    if h[0] >> 4 != 6
        || ulen != plen
        || usize::from(plen) < UDP_LEN + BondHdr::LEN
        || UDP6 + usize::from(plen) > ctx.packet_len()
    {
        return Err(drops::OUTER_BAD_HEADER);
    }
    let b = BondHdr::from_bytes(read::<{ BondHdr::LEN }>(ctx, BOND6).ok_or(drops::TRUNCATED)?);
    b.validate().map_err(|e| e.drop_reason())?;
    if let Some(action) = crate::to_owner(ctx, b.community())? {
        return Ok(action);
    }
    if !b.is_data() {
        return PASS; // control message: the agent's socket
    }
    if b.kind != kind::DATA_UP {
        return Err(drops::BAD_KIND);
    }
    // From the link's registered IPv6 address and port.
    let key = LinkKey::new(b.community(), b.link);
    // SAFETY: read-only use of a map value.
    let idx = *unsafe { S_LINK_INDEX.get(key) }.ok_or(drops::UNKNOWN_SOURCE)?;
    let link = S_LINKS.get(idx).ok_or(drops::UNKNOWN_SOURCE)?;
    let addr = S_LINKS6.get(idx).ok_or(drops::UNKNOWN_SOURCE)?;
    let src = read::<16>(ctx, IP6 + 8).ok_or(drops::TRUNCATED)?;
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    if link.flags & (LINK_VALID | LINK_V6) != LINK_VALID | LINK_V6
        || link.community != key.community
        || link.port != sport
        || u128::from_ne_bytes(*addr) != u128::from_ne_bytes(src)
    {
        return Err(drops::UNKNOWN_SOURCE);
    }

    // The IPv4 form: 20 bytes shorter, from the link's placeholder.
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, GROWTH) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let mut eth = [0u8; ETH_LEN];
    eth[..12].copy_from_slice(&macs);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let inner_len = plen - (UDP_LEN + BondHdr::LEN) as u16;
    let outer = wire::outer_headers((link.ip, sport), (cfg.wan_ip, cfg.port), inner_len);
    if !(write(ctx, 0, eth) && write(ctx, ETH_LEN, outer)) {
        return Err(drops::TRUNCATED);
    }
    let word = S_FROM6.get_ptr_mut(0).ok_or(drops::HELPER_FAILED)?;
    // SAFETY: this CPU's slot (see S_FROM6); read and cleared by
    // `bond_server` in this same run.
    unsafe { *word = idx + 1 };
    // SAFETY: a tail call does not return when it succeeds.
    unsafe { S_JUMP.tail_call(ctx, JUMP_SERVER) };
    // SAFETY: as above.
    unsafe { *word = 0 };
    Err(drops::HELPER_FAILED)
}

#[xdp]
pub fn bond_server_out6(ctx: XdpContext) -> u32 {
    match try_out6(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &S_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

/// A wrap for a link over IPv6, as `wrap_down` left it (Ethernet header
/// still the frame's own, outer IPv4 to the link's placeholder): the link
/// comes from the bond header, the outer header becomes IPv6.
#[inline(always)]
fn try_out6(ctx: &XdpContext) -> Result<u32, u32> {
    let cfg = S_CONFIG.get(0).ok_or(drops::LINK_MISSING)?;
    let b =
        BondHdr::from_bytes(read::<{ BondHdr::LEN }>(ctx, wire::BOND_OFF).ok_or(drops::TRUNCATED)?);
    let key = LinkKey::new(b.community(), b.link);
    // SAFETY: read-only use of a map value.
    let idx = *unsafe { S_LINK_INDEX.get(key) }.ok_or(drops::LINK_MISSING)?;
    let link = S_LINKS.get(idx).ok_or(drops::LINK_MISSING)?;
    if link.flags & (LINK_VALID | LINK_V6) != LINK_VALID | LINK_V6 {
        return Err(drops::LINK_MISSING);
    }
    let dst = *S_LINKS6.get(idx).ok_or(drops::LINK_MISSING)?;
    let ulen = read_u16(ctx, ETH_LEN + IPV4_LEN + 4).ok_or(drops::TRUNCATED)?;
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -GROWTH) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let written = write(ctx, IP6, wire::outer6_header(ulen, &cfg.wan_ip6, &dst))
        && write(ctx, UDP6 + 6, [0u8; 2]);
    if !written {
        return Err(drops::TRUNCATED);
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.l4_protocol = IPPROTO_UDP;
    fib.__bindgen_anon_1.tot_len = ulen + IPV6_LEN as u16;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv6_src = words(&cfg.wan_ip6);
    fib.__bindgen_anon_4.ipv6_dst = words(&dst);
    let rc = fib_lookup(ctx, &mut fib);
    forward_as(ctx, ETH_P_IPV6, rc, &fib, macs, false)
}

/// An IPv6 address as the FIB request's four words (network order kept).
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let mut w = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        w[i] = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        i += 1;
    }
    w
}
