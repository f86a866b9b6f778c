//! Flow table upkeep on the reconstitution server: idle flows expire and
//! their dedicated ports are free again.
//!
//! The program (`bond_server`) stamps each flow with the time of its last
//! packet in either direction (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and
//! marks TCP flows that saw FIN or RST (`Flow::state`). The agent sweeps
//! the table every `[flows] sweep_ms` and removes the flows idle longer
//! than their protocol's timeout. The order of the deletes is
//! [`Maps::remove_flows_if`]'s.

use std::collections::{BTreeMap, HashMap};

use bond_common::{
    maps::{FLOW_CLOSING, Flow, Flow6, Flow6Key, FlowKey, SessionKey, name},
    wire::{IPPROTO_ICMP, IPPROTO_TCP},
};

pub use bond_api::reply::{FlowTable, Sweep};
pub use bond_config::Timeouts;

use crate::{Maps, Result};

/// Expires the idle flows of a server instance (see [`Timeouts::expired`]);
/// `now_ns` is CLOCK_MONOTONIC ([`monotonic_ns`]). Each flow is checked
/// again just before it is deleted, so one that came alive since the
/// listing is kept.
pub fn sweep(maps: &Maps, timeouts: &Timeouts, now_ns: u64) -> Result<Sweep> {
    sweep_counted(maps, timeouts, now_ns, None).map(|(r, _)| r)
}

/// How long after its last packet a UDP or ICMP flow counts as live.
pub const LIVE_S: u64 = 30;

/// Whether a flow is live: TCP that saw no FIN or RST, or UDP or ICMP
/// heard in the last [`LIVE_S`]. A draining node of a tier keeps a
/// community while any of its flows is live.
pub fn live(k: &FlowKey, f: &Flow, now_ns: u64) -> bool {
    match k.proto {
        IPPROTO_TCP => f.state & FLOW_CLOSING == 0,
        _ => now_ns.saturating_sub(f.last_seen_ns) < LIVE_S * 1_000_000_000,
    }
}

/// Flows per community after a sweep: all of them, and the live ones;
/// and, when asked for, per block of dedicated ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    pub all: BTreeMap<u32, u64>,
    pub live: BTreeMap<u32, u64>,
    /// (community, first port of the block) -> flows on the block's ports
    /// (either family: IPv6 flows take the same blocks' ports).
    pub blocks: BTreeMap<(u32, u16), u32>,
}

/// [`sweep`], and the flows left per community (from the same listing:
/// status and metrics need not walk the table again); with `blocks` =
/// (first dedicated port, block size), per block too.
pub fn sweep_counted(
    maps: &Maps,
    timeouts: &Timeouts,
    now_ns: u64,
    blocks: Option<(u16, u16)>,
) -> Result<(Sweep, Counted)> {
    let mut flows = maps.flows()?;
    let idle = flows
        .iter()
        .filter(|(k, f)| timeouts.expired(k, f, now_ns))
        .map(|(k, _)| *k);
    let mut removed = maps.remove_flows_if(idle, |k, f| timeouts.expired(k, f, now_ns))?;
    // IPv6 flows, by the same rules: as (community, protocol, origin, port).
    let expired6 = |k: &Flow6Key, f: &Flow6| timeouts.expired(&k.v4_shape(), &f.flow, now_ns);
    let flows6 = maps.flows6()?;
    let idle6 = flows6
        .iter()
        .filter(|(k, f)| expired6(k, f))
        .map(|(k, _)| *k);
    removed.extend(maps.remove_flows6_if(idle6, expired6)?);
    flows.extend(flows6.iter().map(|(k, f)| (k.v4_shape(), f.flow)));
    let mut r = Sweep {
        scanned: flows.len() as u64,
        kept: (flows.len() - removed.len()) as u64,
        ..Sweep::default()
    };
    for f in &removed {
        match f.key.proto {
            IPPROTO_TCP => r.tcp += 1,
            IPPROTO_ICMP => r.icmp += 1,
            // UDP; the program makes flows for TCP, UDP and ICMP only.
            _ => r.udp += 1,
        }
        r.ports_returned += u64::from(f.port_returned);
    }
    let mut by_community = BTreeMap::new();
    let mut by_origin: HashMap<SessionKey, u64> = HashMap::new();
    let origin = |k: &FlowKey| SessionKey::new(k.community, k.origin);
    let mut live_by_community = BTreeMap::new();
    // (community, first port of the flow's block), when asked for.
    let block = |k: &FlowKey, f: &Flow| {
        let (lo, size) = blocks.filter(|b| b.1 > 0)?;
        Some((
            k.community,
            lo + (f.nat_port.saturating_sub(lo) / size) * size,
        ))
    };
    let mut by_block = BTreeMap::new();
    for (k, f) in &flows {
        *by_community.entry(k.community).or_default() += 1;
        if let Some(b) = block(k, f) {
            *by_block.entry(b).or_default() += 1;
        }
        *by_origin.entry(origin(k)).or_default() += 1;
        // (An expired flow is not live: idle past its timeout.)
        if live(k, f, now_ns) && !timeouts.expired(k, f, now_ns) {
            *live_by_community.entry(k.community).or_default() += 1;
        }
    }
    for f in &removed {
        if let Some(n) = by_community.get_mut(&f.key.community) {
            *n -= 1;
        }
        if let Some(n) = by_origin.get_mut(&origin(&f.key)) {
            *n -= 1;
        }
        if let Some(n) = block(&f.key, &f.flow).and_then(|b| by_block.get_mut(&b)) {
            *n -= 1;
        }
    }
    // The program counts flows up as it makes them; expiry is counted
    // here. Flows made while this sweep ran are missed until the next.
    maps.recount_origin_flows(&by_origin)?;
    let counted = Counted {
        all: by_community,
        live: live_by_community,
        blocks: by_block,
    };
    Ok((r, counted))
}

/// The `max_entries` a server's maps are created with: `flows` for the
/// flow table, its reverse map and the permits for further remote
/// endpoints (least recently used go first), `terminals` for the
/// sessions and their flow counts; the owner table, for a node of a tier
/// (`in_tier`), at its compiled size, else of one entry (nothing is
/// passed on).
pub fn server_map_sizes(flows: u32, terminals: u32, in_tier: bool) -> [(&'static str, u32); 9] {
    let owners = if in_tier {
        bond_common::maps::MAX_TIER_COMMUNITIES
    } else {
        1
    };
    [
        (name::S_FLOWS, flows),
        (name::S_NAT, flows),
        (name::S_PERMITS, flows),
        (name::S_FLOWS6, flows),
        (name::S_NAT6, flows),
        (name::S_PERMITS6, flows),
        (name::S_SESSIONS, terminals),
        (name::S_ORIGIN_FLOWS, terminals),
        (name::S_OWNERS, owners),
    ]
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub use crate::monotonic_ns;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_is_live_while_tcp_has_not_closed_or_udp_was_heard_lately() {
        let key = |proto| FlowKey::new(1, proto, 0x0a00_0101, 40000);
        let s = 1_000_000_000u64;
        let f = Flow::new((0, 20000), 100 * s, 0xcb00_7102, 443);
        // TCP: however idle, until FIN or RST.
        assert!(live(&key(IPPROTO_TCP), &f, 10_000 * s));
        for bits in [bond_common::maps::FLOW_FIN, bond_common::maps::FLOW_RST] {
            let closing = Flow { state: bits, ..f };
            assert!(!live(&key(IPPROTO_TCP), &closing, 100 * s));
        }
        // UDP and ICMP: heard in the last LIVE_S.
        for proto in [17, IPPROTO_ICMP] {
            assert!(live(&key(proto), &f, (100 + LIVE_S - 1) * s));
            assert!(!live(&key(proto), &f, (100 + LIVE_S) * s));
        }
    }

    #[test]
    fn map_sizes_name_the_flow_maps() {
        assert_eq!(
            server_map_sizes(1000, 7, false),
            [
                ("S_FLOWS", 1000),
                ("S_NAT", 1000),
                ("S_PERMITS", 1000),
                ("S_FLOWS6", 1000),
                ("S_NAT6", 1000),
                ("S_PERMITS6", 1000),
                ("S_SESSIONS", 7),
                ("S_ORIGIN_FLOWS", 7),
                ("S_OWNERS", 1)
            ]
        );
    }
}
