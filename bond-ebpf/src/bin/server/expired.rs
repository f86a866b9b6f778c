//! `bond_server_expired`: the server as a hop. An origin's packet whose
//! TTL (IPv4) or hop limit (IPv6) runs out at the server is answered as a
//! router answers it, with ICMP time exceeded (RFC 792) or ICMPv6 Time
//! Exceeded (RFC 4443 section 3.3) from the NAT address, wrapped and sent
//! down to the origin like any reply; so `traceroute` through bond shows
//! the server as the first hop instead of `*`.
//!
//! Reached by a tail call (`S_JUMP[JUMP_EXPIRED]`) from `bond_server` or
//! `bond_server6` once they have checked the outer header, the link, the
//! session and the token, and found a TCP, UDP or echo packet (never an
//! ICMP error, never a fragment after the first); its own program, so the
//! answer's stack and instructions are not theirs. At most
//! [`EXPIRED_PER_SEC`] answers per second per CPU, as routers limit
//! theirs; the packet itself is counted as a `ttl_exceeded` drop, the
//! answer as event `time_exceeded_sent`.

use super::*;
use bond_common::{
    maps::EXPIRED_PER_SEC,
    wire::{ICMP6_ERROR_LEN, ICMPV6_TIME_EXCEEDED, IPV6_LEN},
};

/// This CPU's answers in the current second: (the second's start, ns;
/// answers sent in it).
#[map]
static S_EXPIRED_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bond_server_expired(ctx: XdpContext) -> u32 {
    match try_expired(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &S_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_expired(ctx: &XdpContext) -> Result<u32, u32> {
    let cfg = S_CONFIG.get(0).ok_or(drops::TTL_EXCEEDED)?;
    let b =
        BondHdr::from_bytes(read::<{ BondHdr::LEN }>(ctx, wire::BOND_OFF).ok_or(drops::TRUNCATED)?);
    let to = NatEntry::new(b.community(), b.origin(), 0);
    if !within_rate() {
        return Err(drops::TTL_EXCEEDED);
    }
    let len = match read::<1>(ctx, INNER_OFF).ok_or(drops::TRUNCATED)?[0] >> 4 {
        4 => answer4(ctx, cfg)?,
        _ => answer6(ctx, cfg)?,
    };
    let d = pick_down(&to, len)?;
    count(&S_DROPS, drops::TTL_EXCEEDED);
    count(&S_EVENTS, event::TIME_EXCEEDED);
    wrap_down(ctx, cfg, &to, &d, len, false)
}

/// Whether this CPU may send one more answer this second (and counts it).
#[inline(always)]
fn within_rate() -> bool {
    let Some(r) = S_EXPIRED_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; XDP runs with preemption off.
    let r = unsafe { &mut *r };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(r[0]) >= 1_000_000_000 {
        *r = [now, 0];
    }
    r[1] += 1;
    r[1] <= EXPIRED_PER_SEC
}

/// The wrapped frame becomes Ethernet + the ICMP error about its inner
/// IPv4 packet, built in place: the packet's header and first 8 bytes
/// stay where the error's payload goes. Returns the error's length.
#[inline(always)]
fn answer4(ctx: &XdpContext, cfg: &ServerConfig) -> Result<u16, u32> {
    let h = read::<20>(ctx, INNER_OFF).ok_or(drops::TRUNCATED)?;
    let l4 = read::<8>(ctx, INNER_OFF + IPV4_LEN).ok_or(drops::TRUNCATED)?;
    // Never an error about an error (RFC 1812 4.3.2.7): of ICMP, only echo.
    if h[9] == IPPROTO_ICMP && l4[0] != ICMP_ECHO_REQUEST {
        return Err(drops::TTL_EXCEEDED);
    }
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    const SHIFT: i32 = (OUTER_LEN - IPV4_LEN - 8) as i32;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, SHIFT) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let excess = ctx.packet_len() as i32 - (ETH_LEN + ICMP_ERROR_LEN) as i32;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let (ip, icmp) = wire::time_exceeded(cfg.nat_ip, &h, &l4);
    if !(write(ctx, 0, eth(macs, ETH_P_IP))
        && write(ctx, ETH_LEN, ip)
        && write(ctx, ETH_LEN + IPV4_LEN, icmp))
    {
        return Err(drops::TRUNCATED);
    }
    Ok(ICMP_ERROR_LEN as u16)
}

/// As [`answer4`], for an inner IPv6 packet: ICMPv6 Time Exceeded from
/// the IPv6 NAT address.
#[inline(always)]
fn answer6(ctx: &XdpContext, cfg: &ServerConfig) -> Result<u16, u32> {
    let h = read::<8>(ctx, INNER_OFF).ok_or(drops::TRUNCATED)?;
    let t = read::<1>(ctx, INNER_OFF + IPV6_LEN).ok_or(drops::TRUNCATED)?[0];
    if h[0] >> 4 != 6 || (h[6] == wire::IPPROTO_ICMPV6 && t != wire::ICMPV6_ECHO_REQUEST) {
        return Err(drops::TTL_EXCEEDED);
    }
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    const SHIFT: i32 = (OUTER_LEN - IPV6_LEN - 8) as i32;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, SHIFT) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    if !write(ctx, 0, eth(macs, ETH_P_IPV6)) {
        return Err(drops::TRUNCATED);
    }
    v6::icmp6_error_in_place(
        ctx,
        &cfg.nat_ip6,
        [ICMPV6_TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0],
    )?;
    Ok(ICMP6_ERROR_LEN as u16)
}

/// An Ethernet header with the frame's original addresses (`macs`), as
/// `forward` expects to find them, and `ethertype`.
#[inline(always)]
fn eth(macs: [u8; 12], ethertype: u16) -> [u8; ETH_LEN] {
    let mut e = [0u8; ETH_LEN];
    e[..12].copy_from_slice(&macs);
    e[12..].copy_from_slice(&ethertype.to_be_bytes());
    e
}
