//! The communities, links and flows the bench registers, and the frames
//! it sends for them.

use std::net::Ipv4Addr;

use anyhow::{Result, ensure};
use bond_common::maps::FlowKey;

use crate::packets::{Bond, DATA_UP, Ip, L4, Outer, wrapped};

use super::server::Pass;
use super::{
    CNT_DEV_MAC, CONTENT, CONTENT_MAC, DPORT, IPPROTO_UDP, LINK_NET, LINK_PORT, LINKS,
    MEASURED_SPORT, NAT_IP, PORT, ROUTER_MAC, SYNTHETIC_SPORT, TERMINALS, WAN_DEV_MAC, WAN_IP,
};

/// A terminal's LAN address: every community has its own LAN, so the same
/// addresses recur (sessions are keyed by community and origin).
pub(super) fn origin(t: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 1 + t as u8)
}

pub(super) fn terminal_of(origin: Ipv4Addr) -> Result<u32> {
    let t = u32::from(origin.octets()[3]).wrapping_sub(1);
    ensure!(t < TERMINALS, "{origin} is no terminal of ours");
    Ok(t)
}

/// A session token of its own for each community and terminal, never zero.
pub(super) fn token(community: u32, t: u32) -> u64 {
    SplitMix((u64::from(community) << 8) | u64::from(t)).next() | 1
}

/// A community link as registered with the server.
pub(super) struct Link {
    /// Dense index into `S_LINKS`.
    pub(super) idx: u32,
    pub(super) id: u8,
    pub(super) ip: Ipv4Addr,
    pub(super) port: u16,
}

impl Link {
    /// Link `j` of community `c` (1-based).
    pub(super) fn of(c: u32, j: u32) -> Self {
        let idx = (c - 1) * LINKS + j;
        Self {
            idx,
            id: j as u8,
            ip: Ipv4Addr::from(LINK_NET + idx),
            port: LINK_PORT + j as u16,
        }
    }
}

/// Flow `i` of `n` communities, source ports counted from `base`: flows
/// go round the communities, then the terminals, then the ports.
pub(super) fn flow_key(i: u32, n: u32, base: u16) -> FlowKey {
    let r = i / n;
    FlowKey::new(
        1 + i % n,
        IPPROTO_UDP,
        origin(r % TERMINALS).into(),
        base + (r / TERMINALS) as u16,
    )
}

/// The `i`th flow written through the map API.
pub(super) fn synthetic_key(i: u32, n: u32) -> FlowKey {
    flow_key(i, n, SYNTHETIC_SPORT)
}

/// The `k`th flow the program creates.
pub(super) fn measured_key(k: u32, n: u32) -> FlowKey {
    flow_key(k, n, MEASURED_SPORT)
}

/// A DATA_UP frame of flow `key` over link `j` of its community, with the
/// origin's token.
pub(super) fn up_frame(key: &FlowKey, j: u8) -> Vec<u8> {
    let origin = Ipv4Addr::from(key.origin);
    let link = Link::of(key.community, u32::from(j));
    let t = terminal_of(origin).expect("flow keys name our terminals");
    let inner = Ip::new(origin, CONTENT, L4::udp(key.port, DPORT));
    wrapped(
        &Outer {
            dst_mac: WAN_DEV_MAC,
            src_mac: ROUTER_MAC,
            src: link.ip,
            dst: WAN_IP,
            sport: link.port,
            dport: PORT,
            ttl: 50,
            id: 0x0abc,
            more_fragments: false,
        },
        &Bond::data(
            DATA_UP,
            key.community,
            link.id,
            origin,
            1,
            token(key.community, t),
        ),
        &inner.bytes(),
    )
}

/// The content server's answer to the flow on dedicated port `nat_port`.
pub(super) fn reply_ip(nat_port: u16) -> Ip {
    Ip {
        id: 0x4321,
        payload: b"reply from the content server".to_vec(),
        ..Ip::new(CONTENT, NAT_IP, L4::udp(DPORT, nat_port))
    }
}

pub(super) fn reply_frame(nat_port: u16) -> Vec<u8> {
    reply_ip(nat_port).frame(CNT_DEV_MAC, CONTENT_MAC)
}

/// splitmix64: deterministic, well-spread numbers without a crate.
pub(super) struct SplitMix(pub(super) u64);

impl SplitMix {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The pass with the median kernel time.
pub(super) fn median(mut passes: Vec<Pass>) -> Pass {
    passes.sort_by(|a, b| a.kernel_ns.total_cmp(&b.kernel_ns));
    passes[passes.len() / 2]
}
