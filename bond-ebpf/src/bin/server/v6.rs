//! `bond_server6`: inner IPv6, both ways, reached from `bond_server` by a
//! tail call (`S_JUMP[JUMP_V6]`) so that each program stays well inside
//! the verifier's budget.
//!
//! - Upstream, called once `bond_server` has checked the outer header, the
//!   link, the session and the token: an inner IPv6 TCP, UDP or ICMPv6
//!   echo packet gets a dedicated port of the IPv6 NAT address
//!   (`nat_ip6`), one of its community's ports as IPv4 flows (`claim_port`), and leaves
//!   from there. No extension headers: anything else after the IPv6 header
//!   is `unsupported_proto`.
//! - Downstream, for any IPv6 frame: a reply to the IPv6 NAT address on a
//!   dedicated port, from where the origin sent on that flow, is mapped
//!   back, wrapped (in the same outer IPv4) and sent on the community's
//!   link where it arrives first; one too big for the links once wrapped
//!   is answered with ICMPv6 Packet Too Big (routers do not fragment IPv6).
//!   Anything else is the server host's own.
//!
//! Checksums: IPv6 has no header checksum; the TCP, UDP and ICMPv6
//! checksums all cover the addresses (the pseudo-header), so every rewrite
//! updates them incrementally (RFC 1624).

// Keys and values go to the map helpers by reference, from the scratch
// slot: passed by value they would be copied onto the stack first.
#![allow(clippy::needless_borrows_for_generic_args)]

use super::*;
use bond_common::wire::{
    ICMP6_ERROR_LEN, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PARAMETER_PROBLEM, ICMPV6_UNREACHABLE, IPPROTO_ICMPV6, IPV6_LEN, IPV6_MIN_MTU,
};

const AF_INET6: u8 = 10;

/// What one packet's handling keeps of its addresses, keys and route
/// lookup: on this CPU's slot of `S_SCRATCH6`, not the stack, whose 512
/// bytes IPv6 addresses and the keys built of them would overflow. XDP
/// runs with preemption off: a slot serves one packet at a time.
#[repr(C)]
struct Scratch {
    fib: FibParams,
    src: [u8; 16],
    dst: [u8; 16],
    deny: Key<[u8; 16]>,
    key: Flow6Key,
    permit: Permit6Key,
    flow: Flow6,
    nat: Nat6Entry,
}

#[map]
static S_SCRATCH6: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn bond_server6(ctx: XdpContext) -> u32 {
    match try_server6(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &S_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_server6(ctx: &XdpContext) -> Result<u32, u32> {
    let ethertype = read_u16(ctx, 12).ok_or(drops::TRUNCATED)?;
    let Some(cfg) = S_CONFIG.get(0) else {
        return PASS;
    };
    let sc = S_SCRATCH6.get_ptr_mut(0).ok_or(drops::HELPER_FAILED)?;
    // SAFETY: this CPU's slot, used by this run alone (see `Scratch`).
    let sc = unsafe { &mut *sc };
    match ethertype {
        ETH_P_IPV6 => down(ctx, cfg, sc),
        // Only `bond_server` calls with IPv4: wrapped DATA_UP, checked.
        ETH_P_IP => up(ctx, cfg, sc),
        _ => PASS,
    }
}

/// Whether an IPv6 address is all zero (no IPv6 NAT address configured).
#[inline(always)]
fn unset(a: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == 0
}

/// Whether two IPv6 addresses are the same (compared as numbers: a byte
/// slice comparison would call `memcmp`).
#[inline(always)]
fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b)
}

/// What an IPv6 header says, read once; its addresses go to the scratch
/// slot.
struct Ip6 {
    /// Total length (header and payload).
    len: u16,
    proto: u8,
    hop: u8,
}

impl Ip6 {
    #[inline(always)]
    fn read(ctx: &XdpContext, off: usize, sc: &mut Scratch) -> Result<Self, u32> {
        let h = read::<8>(ctx, off).ok_or(drops::TRUNCATED)?;
        if h[0] >> 4 != 6 {
            return Err(drops::INNER_NOT_IPV4);
        }
        sc.src = read::<16>(ctx, off + 8).ok_or(drops::TRUNCATED)?;
        sc.dst = read::<16>(ctx, off + 24).ok_or(drops::TRUNCATED)?;
        Ok(Self {
            len: u16::from_be_bytes([h[4], h[5]]).saturating_add(IPV6_LEN as u16),
            proto: h[6],
            hop: h[7],
        })
    }
}

/// Where a transport header's port (or echo identifier) and checksum are.
#[inline(always)]
const fn l4_at(proto: u8, l4: usize, port_field: usize) -> L4 {
    if proto == IPPROTO_ICMPV6 {
        L4 {
            port_off: l4 + 4,
            check_off: l4 + 2,
            pseudo: true,
            udp: false,
        }
    } else {
        tcp_udp(l4, port_field, proto == IPPROTO_UDP)
    }
}

// --------------------------------------------------------------- upstream --

#[inline(always)]
fn up(ctx: &XdpContext, cfg: &ServerConfig, sc: &mut Scratch) -> Result<u32, u32> {
    if unset(&cfg.nat_ip6) {
        return Err(drops::INNER_NOT_IPV4); // no IPv6 here
    }
    let tot = outer_len(ctx, ETH_LEN)?;
    let b =
        BondHdr::from_bytes(read::<{ BondHdr::LEN }>(ctx, wire::BOND_OFF).ok_or(drops::TRUNCATED)?);
    let (community, origin) = (b.community(), b.origin());
    let link_key = LinkKey::new(community, b.link);
    // SAFETY: read-only use of a map value.
    let idx = *unsafe { S_LINK_INDEX.get(link_key) }.ok_or(drops::UNKNOWN_SOURCE)?;

    let ip = Ip6::read(ctx, INNER_OFF, sc)?;
    if ip.len < (IPV6_LEN + 8) as u16 || usize::from(ip.len) + OUTER_LEN > usize::from(tot) {
        return Err(drops::INNER_BAD_HEADER);
    }
    sc.deny = Key::new(128, sc.dst);
    if S_DENY6.get(&sc.deny).is_some() {
        return Err(drops::DENIED);
    }
    if ip.hop <= 1 {
        // SAFETY: a tail call does not return when it succeeds; without
        // `bond_server_expired` in the table the packet is only dropped.
        unsafe { S_JUMP.tail_call(ctx, JUMP_EXPIRED) };
        return Err(drops::TTL_EXCEEDED);
    }
    let l4off = INNER_OFF + IPV6_LEN;
    let l4head = read::<8>(ctx, l4off).ok_or(drops::TRUNCATED)?;
    let be16 = |a: u8, b: u8| u16::from_be_bytes([a, b]);
    let (port, remote_port) = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => (be16(l4head[0], l4head[1]), be16(l4head[2], l4head[3])),
        IPPROTO_ICMPV6 if l4head[0] == ICMPV6_ECHO_REQUEST => (be16(l4head[4], l4head[5]), 0),
        _ => return Err(drops::UNSUPPORTED_PROTO),
    };
    let (tcp_flags, pure_ack) = tcp_of(ctx, ip.proto, ip.len, l4off)?;

    let rc = fib6(ctx, ip.proto, &cfg.nat_ip6, ip.len, sc);
    routable(rc)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if !pure_ack && let Some(hold) = to_hold(ctx, now) {
        return Ok(hold);
    }

    sc.key = Flow6Key::new(community, ip.proto, origin, sc.src, port);
    let flow = flow6_for(sc, now, cfg, remote_port)?;
    // SAFETY: `flow` points at a live map value; statistics, as for IPv4.
    let (nat_port, created, first) = unsafe {
        let f = &mut (*flow).flow;
        f.last_seen_ns = now;
        f.up_pkts += 1;
        f.up_bytes += u64::from(ip.len);
        if let Some(fl) = tcp_flags {
            f.state = Flow::tcp_state(f.state, fl);
        }
        (
            f.nat_port,
            f.created_ns,
            same(&(*flow).remote, &sc.dst) && f.remote_port == remote_port,
        )
    };
    // A further remote endpoint: permitted (again) as the origin sends to it.
    if !first {
        sc.permit = Permit6Key {
            proto: ip.proto,
            _pad: 0,
            nat_port,
            remote_port,
            _pad2: 0,
            remote: sc.dst,
        };
        // SAFETY: read-only use of a map value.
        if unsafe { S_PERMITS6.get(&sc.permit) } != Some(&created) {
            // A full table drops its least recently used permit.
            let _ = S_PERMITS6.insert(&sc.permit, created, 0);
        }
    }
    let l4 = l4_at(ip.proto, l4off, 0);
    if !rewrite6(ctx, INNER_OFF, 8, &cfg.nat_ip6, l4, nat_port) {
        return Err(drops::TRUNCATED);
    }
    link_stats(&S_LINK_STATS, idx, |s| {
        s.up_pkts += 1;
        s.up_bytes += u64::from(ip.len);
    });
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER_LEN as i32) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    forward_as(ctx, ETH_P_IPV6, rc, &sc.fib, macs, true)
}

/// The TCP flags of a TCP packet (IPv6 total length `len`, transport
/// header at `l4off`) and whether it is a pure ACK; nothing for others.
#[inline(always)]
fn tcp_of(ctx: &XdpContext, proto: u8, len: u16, l4off: usize) -> Result<(Option<u8>, bool), u32> {
    if proto != IPPROTO_TCP {
        return Ok((None, false));
    }
    if usize::from(len) < IPV6_LEN + 20 {
        return Err(drops::TRUNCATED);
    }
    let t = read::<20>(ctx, l4off).ok_or(drops::TRUNCATED)?;
    let plen = len - IPV6_LEN as u16;
    Ok((
        Some(t[tcp::FLAGS_OFF]),
        tcp::pure_ack6(plen, [t[12], t[13]]),
    ))
}

/// The IPv6 flow for `sc.key`, made as [`flow_for`] makes IPv4 ones,
/// sending to `sc.dst` and `remote_port` first.
#[inline(always)]
fn flow6_for(
    sc: &mut Scratch,
    now: u64,
    cfg: &ServerConfig,
    remote_port: u16,
) -> Result<*mut Flow6, u32> {
    if let Some(f) = S_FLOWS6.get_ptr_mut(&sc.key) {
        return Ok(f);
    }
    let held = origin_flows(sc.key.community, sc.key.origin, cfg.per_origin)?;
    sc.nat = sc.key.nat();
    let (proto, community) = (sc.key.proto, sc.key.community);
    let nkey = claim_port(&S_NAT6, &sc.nat, proto, community, nat_order(cfg), true)?;
    sc.flow = Flow6 {
        flow: Flow::new((0, nkey.port), now, 0, remote_port),
        remote: sc.dst,
    };
    match S_FLOWS6.insert(&sc.key, &sc.flow, u64::from(BPF_NOEXIST)) {
        Ok(()) => made(held),
        Err(_) => {
            let _ = S_NAT6.remove(&nkey);
            if S_FLOWS6.get_ptr_mut(&sc.key).is_none() {
                return Err(drops::FLOW_TABLE_FULL);
            }
            count(&S_EVENTS, event::FLOW_RACE);
        }
    }
    S_FLOWS6.get_ptr_mut(&sc.key).ok_or(drops::FLOW_TABLE_FULL)
}

/// NAT rewrite of one side of the IPv6 packet at `ip_off`: the address at
/// `ip_off + addr_field` (8 = source, 24 = destination) becomes `addr`,
/// the port `l4` names becomes `port`, the hop limit drops by one, and the
/// transport checksum, which covers the addresses, follows. False if a
/// field is out of bounds.
#[inline(always)]
fn rewrite6(
    ctx: &XdpContext,
    ip_off: usize,
    addr_field: usize,
    addr: &[u8; 16],
    l4: L4,
    port: u16,
) -> bool {
    let (hop_off, addr_off) = (ip_off + 7, ip_off + addr_field);
    let Some(hop) = read::<1>(ctx, hop_off) else {
        return false;
    };
    let Some(old_port) = read_u16(ctx, l4.port_off) else {
        return false;
    };
    let Some(mut c) = read_u16(ctx, l4.check_off) else {
        return false;
    };
    // One word of the address at a time: no 16-byte copy on the stack.
    let mut i = 0;
    while i < 16 {
        let Some(old) = read_u16(ctx, addr_off + i) else {
            return false;
        };
        let new = u16::from_be_bytes([addr[i], addr[i + 1]]);
        c = csum::replace16(c, old, new);
        if !write(ctx, addr_off + i, new.to_be_bytes()) {
            return false;
        }
        i += 2;
    }
    c = csum::replace16(c, old_port, port);
    // UDP over IPv6 must carry a checksum: a computed zero goes as 0xffff.
    if l4.udp && c == 0 {
        c = 0xffff;
    }
    write(ctx, hop_off, [hop[0].wrapping_sub(1)])
        && write(ctx, l4.port_off, port.to_be_bytes())
        && write(ctx, l4.check_off, c.to_be_bytes())
}

/// Looks up the route from `src` to `sc.dst` into `sc.fib` and returns the
/// lookup's result.
#[inline(always)]
fn fib6(ctx: &XdpContext, proto: u8, src: &[u8; 16], len: u16, sc: &mut Scratch) -> u32 {
    let p = &mut sc.fib;
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    *p = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    let words = |a: &[u8; 16]| {
        let mut w = [0u32; 4];
        let mut i = 0;
        while i < 4 {
            w[i] = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
            i += 1;
        }
        w
    };
    p.__bindgen_anon_3.ipv6_src = words(src);
    p.__bindgen_anon_4.ipv6_dst = words(&sc.dst);
    fib_lookup(ctx, p)
}

// ------------------------------------------------------------- downstream --

#[inline(always)]
fn down(ctx: &XdpContext, cfg: &ServerConfig, sc: &mut Scratch) -> Result<u32, u32> {
    // One place wraps, for replies and errors alike: two copies of
    // `wrap_down` would not fit the stack together.
    match to_origin(ctx, cfg, sc)? {
        Next::Done(action) => Ok(action),
        Next::Wrap(back, d, len, pure_ack) => wrap_down(ctx, cfg, &back, &d, len, pure_ack),
    }
}

/// What happens to a packet downstream: an action now, or a wrap for an
/// origin (its flow's way back, the link picked, the inner length, and
/// whether it is a pure ACK).
enum Next {
    Done(u32),
    Wrap(NatEntry, Down, u16, bool),
}

const PASS_ON: Result<Next, u32> = Ok(Next::Done(xdp_action::XDP_PASS));

/// The IPv6 flow a packet to dedicated port `port` belongs to (its way
/// back into `sc.nat`), if it lets in what comes from `sc.src` and
/// `remote_port`: the flow's first remote endpoint, or one with a live
/// permit. `no_flow` or `filtered` if not.
#[inline(always)]
fn reply_flow(sc: &mut Scratch, proto: u8, port: u16, remote_port: u16) -> Result<*mut Flow6, u32> {
    // SAFETY: read-only use of a map value; copied whole.
    sc.nat = *unsafe {
        S_NAT6.get(NatKey {
            proto,
            index: 0,
            port,
        })
    }
    .ok_or(drops::NO_FLOW)?;
    sc.key = sc.nat.flow(proto);
    let flow = S_FLOWS6.get_ptr_mut(&sc.key).ok_or(drops::NO_FLOW)?;
    // SAFETY: `flow` points at a live map value; only read.
    let (first, created) = unsafe {
        (
            same(&(*flow).remote, &sc.src) && (*flow).flow.remote_port == remote_port,
            (*flow).flow.created_ns,
        )
    };
    if !first {
        sc.permit = Permit6Key {
            proto,
            _pad: 0,
            nat_port: port,
            remote_port,
            _pad2: 0,
            remote: sc.src,
        };
        // SAFETY: read-only use of a map value.
        if unsafe { S_PERMITS6.get(&sc.permit) } != Some(&created) {
            return Err(drops::FILTERED);
        }
    }
    Ok(flow)
}

/// A reply or an ICMPv6 error to the IPv6 NAT address, mapped to its
/// origin and rewritten; anything else passes.
#[inline(always)]
fn to_origin(ctx: &XdpContext, cfg: &ServerConfig, sc: &mut Scratch) -> Result<Next, u32> {
    let Ok(ip) = Ip6::read(ctx, ETH_LEN, sc) else {
        return PASS_ON;
    };
    if unset(&cfg.nat_ip6) || !same(&sc.dst, &cfg.nat_ip6) {
        return PASS_ON;
    }
    let l4off = ETH_LEN + IPV6_LEN;
    let Some(l4head) = read::<8>(ctx, l4off) else {
        return PASS_ON;
    };
    let be16 = |a: u8, b: u8| u16::from_be_bytes([a, b]);
    let (port, remote_port) = match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => (be16(l4head[2], l4head[3]), be16(l4head[0], l4head[1])),
        IPPROTO_ICMPV6 if l4head[0] == ICMPV6_ECHO_REPLY => (be16(l4head[4], l4head[5]), 0),
        IPPROTO_ICMPV6 if (ICMPV6_UNREACHABLE..=ICMPV6_PARAMETER_PROBLEM).contains(&l4head[0]) => {
            return error(ctx, cfg, sc, &ip);
        }
        // Neighbour discovery, extension headers: the host's own.
        _ => return PASS_ON,
    };
    if port < cfg.port_min || port > cfg.port_max {
        return PASS_ON; // not a dedicated port: the server host's own traffic
    }
    if ip.len < (IPV6_LEN + 8) as u16 || usize::from(ip.len) > ctx.packet_len() - ETH_LEN {
        return Err(drops::INNER_BAD_HEADER);
    }
    if ip.hop <= 1 {
        return Err(drops::TTL_EXCEEDED);
    }
    let (tcp_flags, pure_ack) = tcp_of(ctx, ip.proto, ip.len, l4off)?;
    // Only from whom the origin sent to on this flow.
    let flow = reply_flow(sc, ip.proto, port, remote_port)?;
    if cfg.link_mtu != 0 && u32::from(ip.len) + OUTER_LEN as u32 > u32::from(cfg.link_mtu) {
        return too_big(ctx, cfg).map(Next::Done);
    }
    let back = sc.nat.v4_shape();
    let d = pick_down(&back, ip.len)?;
    // SAFETY: live map value; statistics, as upstream.
    unsafe {
        let f = &mut (*flow).flow;
        f.last_seen_ns = d.now;
        f.down_pkts += 1;
        f.down_bytes += u64::from(ip.len);
        if let Some(fl) = tcp_flags {
            f.state = Flow::tcp_state(f.state, fl);
        }
    }
    if !rewrite6(
        ctx,
        ETH_LEN,
        24,
        &sc.nat.src,
        l4_at(ip.proto, l4off, 2),
        sc.nat.port,
    ) {
        return Err(drops::TRUNCATED);
    }
    Ok(Next::Wrap(back, d, ip.len, pure_ack))
}

/// An ICMPv6 error (destination unreachable, packet too big, time
/// exceeded, parameter problem) about a packet a flow sent (the IPv6
/// header and first 8 bytes embedded, from the NAT address and a dedicated
/// port) goes back to the flow's origin, as `icmp_error` does for IPv4:
/// the error's destination and the embedded source become the origin's
/// address, the embedded port the origin's, and the embedded transport
/// checksum (where the error carries it) and the ICMPv6 checksum follow.
/// It passes the flow's filter on the embedded destination. An error about
/// anything else is the host's own.
#[inline(always)]
fn error(ctx: &XdpContext, cfg: &ServerConfig, sc: &mut Scratch, ip: &Ip6) -> Result<Next, u32> {
    const ICMP: usize = ETH_LEN + IPV6_LEN;
    const EMB: usize = ICMP + 8;
    const EMB_L4: usize = EMB + IPV6_LEN;
    let end = ETH_LEN + usize::from(ip.len);
    if end > ctx.packet_len() {
        return Err(drops::INNER_BAD_HEADER);
    }
    if end < EMB_L4 + 8 {
        return Err(drops::TRUNCATED);
    }
    if ip.hop <= 1 {
        return Err(drops::TTL_EXCEEDED);
    }
    let emb = read::<8>(ctx, EMB).ok_or(drops::TRUNCATED)?;
    // The embedded packet, from our NAT address (its source into `sc.dst`)
    // to the remote it was sent to (into `sc.src`, as a reply's sender is:
    // the error's own addresses are not needed again).
    sc.dst = read::<16>(ctx, EMB + 8).ok_or(drops::TRUNCATED)?;
    sc.src = read::<16>(ctx, EMB + 24).ok_or(drops::TRUNCATED)?;
    if emb[0] >> 4 != 6 || !same(&sc.dst, &cfg.nat_ip6) {
        return PASS_ON;
    }
    let el4 = read::<8>(ctx, EMB_L4).ok_or(drops::TRUNCATED)?;
    let be16 = |a: u8, b: u8| u16::from_be_bytes([a, b]);
    let proto = emb[6];
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
        IPPROTO_ICMPV6 if el4[0] == ICMPV6_ECHO_REQUEST => {
            (be16(el4[4], el4[5]), 0, EMB_L4 + 4, EMB_L4 + 2)
        }
        _ => return PASS_ON,
    };
    if port < cfg.port_min || port > cfg.port_max {
        return PASS_ON;
    }
    reply_flow(sc, proto, port, remote_port)?;
    // Never an error about an error: one too big for the links is lost.
    if cfg.link_mtu != 0 && u32::from(ip.len) + OUTER_LEN as u32 > u32::from(cfg.link_mtu) {
        return Err(drops::TOO_BIG);
    }
    let back = sc.nat.v4_shape();
    let d = pick_down(&back, ip.len)?;

    let mut icmp = read_u16(ctx, ICMP + 2).ok_or(drops::TRUNCATED)?;
    // The embedded transport checksum, where the error carries it (a TCP
    // one lies past the first 8 bytes and is often cut off).
    let mut l4 = if check_off + 2 <= end {
        read_u16(ctx, check_off)
    } else {
        None
    };
    let old_l4 = l4;
    // The error's destination (in the ICMPv6 pseudo-header) and the
    // embedded source (in the message and in the embedded pseudo-header),
    // one word at a time.
    let mut i = 0;
    while i < 16 {
        let new = u16::from_be_bytes([sc.nat.src[i], sc.nat.src[i + 1]]);
        let old_dst = read_u16(ctx, ETH_LEN + 24 + i).ok_or(drops::TRUNCATED)?;
        let old_src = read_u16(ctx, EMB + 8 + i).ok_or(drops::TRUNCATED)?;
        icmp = csum::replace16(csum::replace16(icmp, old_dst, new), old_src, new);
        l4 = l4.map(|c| csum::replace16(c, old_src, new));
        let w = new.to_be_bytes();
        if !(write(ctx, ETH_LEN + 24 + i, w) && write(ctx, EMB + 8 + i, w)) {
            return Err(drops::TRUNCATED);
        }
        i += 2;
    }
    icmp = csum::replace16(icmp, port, sc.nat.port);
    l4 = l4.map(|c| csum::replace16(c, port, sc.nat.port));
    if proto == IPPROTO_UDP && l4 == Some(0) {
        l4 = Some(0xffff);
    }
    if let (Some(old), Some(new)) = (old_l4, l4) {
        icmp = csum::replace16(icmp, old, new);
    }
    let hop = ip.hop.wrapping_sub(1);
    let written = write(ctx, ETH_LEN + 7, [hop])
        && write(ctx, port_off, sc.nat.port.to_be_bytes())
        && l4.is_none_or(|c| write(ctx, check_off, c.to_be_bytes()))
        && write(ctx, ICMP + 2, icmp.to_be_bytes());
    if !written {
        return Err(drops::TRUNCATED);
    }
    count(&S_EVENTS, event::ICMP_ERROR_RELAYED);
    Ok(Next::Wrap(back, d, ip.len, false))
}

/// Answers a reply too big for the links with ICMPv6 Packet Too Big
/// (RFC 4443 section 3.2) from the NAT address, out of where it came in,
/// as `answer_too_big` does for IPv4; the reply is counted as a `too_big`
/// drop. Built in place: the reply's header and first 8 bytes stay where
/// the message's payload goes ([`icmp6_error_in_place`]).
#[inline(always)]
fn too_big(ctx: &XdpContext, cfg: &ServerConfig) -> Result<u32, u32> {
    let macs = read::<12>(ctx, 0).ok_or(drops::TRUNCATED)?;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IPV6_LEN + 8) as i32)) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let mtu = cfg
        .link_mtu
        .saturating_sub(OUTER_LEN as u16)
        .max(IPV6_MIN_MTU);
    let m = u32::from(mtu).to_be_bytes();
    let mut eth = [0u8; ETH_LEN];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..12].copy_from_slice(&macs[..6]);
    eth[12..].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    if !write(ctx, 0, eth) {
        return Err(drops::TRUNCATED);
    }
    let head = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, m[0], m[1], m[2], m[3]];
    icmp6_error_in_place(ctx, &cfg.nat_ip6, head)?;
    count(&S_DROPS, drops::TOO_BIG);
    count(&S_EVENTS, event::FRAG_NEEDED);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32)
}

/// Makes the frame an ICMPv6 error from `src` whose ICMPv6 header is
/// `head` (checksum left zero) about the packet whose IPv6 header and
/// first 8 bytes already sit where the error's payload goes (after the
/// Ethernet header, which the caller writes, and 48 bytes of room):
/// trims what follows them, writes the IPv6 header to that packet's
/// source, and sums the checksum off the packet.
#[inline(always)]
pub(crate) fn icmp6_error_in_place(
    ctx: &XdpContext,
    src: &[u8; 16],
    head: [u8; 8],
) -> Result<(), u32> {
    const IP: usize = ETH_LEN;
    const ICMP: usize = IP + IPV6_LEN;
    const ORIG: usize = ICMP + 8;
    let excess = ctx.packet_len() as i32 - (ETH_LEN + ICMP6_ERROR_LEN) as i32;
    // SAFETY: plain helper call; packet pointers are re-derived after it.
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
        return Err(drops::HELPER_FAILED);
    }
    let plen = (ICMP6_ERROR_LEN - IPV6_LEN) as u16;
    let p = plen.to_be_bytes();
    let written = write(ctx, IP, [0x60, 0, 0, 0, p[0], p[1], IPPROTO_ICMPV6, 255])
        && write(ctx, IP + 8, *src)
        && write(ctx, ICMP, head);
    if !written {
        return Err(drops::TRUNCATED);
    }
    // To the packet's sender: its source, in the header now at ORIG.
    let mut i = 0;
    while i < 16 {
        let w = read::<4>(ctx, ORIG + 8 + i).ok_or(drops::TRUNCATED)?;
        if !write(ctx, IP + 24 + i, w) {
            return Err(drops::TRUNCATED);
        }
        i += 4;
    }
    // The pseudo-header (addresses, length, next header) and the message.
    let mut sum = u32::from(plen) + u32::from(IPPROTO_ICMPV6);
    let covered = read::<{ ICMP6_ERROR_LEN - 8 }>(ctx, IP + 8).ok_or(drops::TRUNCATED)?;
    let mut i = 0;
    while i < covered.len() {
        sum += u32::from(u16::from_be_bytes([covered[i], covered[i + 1]]));
        i += 2;
    }
    let check = !csum::fold(sum);
    if write(ctx, ICMP + 2, check.to_be_bytes()) {
        Ok(())
    } else {
        Err(drops::TRUNCATED)
    }
}
