//! Flow table upkeep on the reconstitution server: idle flows expire and
//! their dedicated ports go back to the free queue.
//!
//! The program (`bond_server`) stamps each flow with the time of its last
//! packet in either direction (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and
//! marks TCP flows that saw FIN or RST (`Flow::state`). The agent sweeps
//! the table every `[flows] sweep_ms` and removes the flows idle longer
//! than their protocol's timeout. The order of the deletes is
//! [`Maps::remove_flows_if`]'s.

use std::collections::{BTreeMap, HashMap};

use bond_common::{
    maps::{FlowKey, SessionKey, name},
    wire::{IPPROTO_ICMP, IPPROTO_TCP},
};
use serde::Serialize;

pub use bond_config::Timeouts;

use crate::{Maps, Result};

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
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

impl SweepReport {
    pub fn removed(&self) -> u64 {
        self.tcp + self.udp + self.icmp
    }
}

/// Expires the idle flows of a server instance (see [`Timeouts::expired`]);
/// `now_ns` is CLOCK_MONOTONIC ([`monotonic_ns`]). Each flow is checked
/// again just before it is deleted, so one that came alive since the
/// listing is kept.
pub fn sweep(maps: &Maps, timeouts: &Timeouts, now_ns: u64) -> Result<SweepReport> {
    sweep_counted(maps, timeouts, now_ns).map(|(r, _)| r)
}

/// [`sweep`], and the flows left per community (from the same listing:
/// status and metrics need not walk the table again).
pub fn sweep_counted(
    maps: &Maps,
    timeouts: &Timeouts,
    now_ns: u64,
) -> Result<(SweepReport, BTreeMap<u16, u64>)> {
    let flows = maps.flows()?;
    let idle = flows
        .iter()
        .filter(|(k, f)| timeouts.expired(k, f, now_ns))
        .map(|(k, _)| *k);
    let removed = maps.remove_flows_if(idle, |k, f| timeouts.expired(k, f, now_ns))?;
    let mut r = SweepReport {
        scanned: flows.len() as u64,
        kept: (flows.len() - removed.len()) as u64,
        ..SweepReport::default()
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
    let origin = |k: &FlowKey| SessionKey {
        community: k.community,
        _pad: 0,
        origin: k.origin,
    };
    for (k, _) in &flows {
        *by_community.entry(k.community).or_default() += 1;
        *by_origin.entry(origin(k)).or_default() += 1;
    }
    for f in &removed {
        if let Some(n) = by_community.get_mut(&f.key.community) {
            *n -= 1;
        }
        if let Some(n) = by_origin.get_mut(&origin(&f.key)) {
            *n -= 1;
        }
    }
    // The program counts flows up as it makes them; expiry is counted
    // here. Flows made while this sweep ran are missed until the next.
    maps.recount_origin_flows(&by_origin)?;
    Ok((r, by_community))
}

/// The `max_entries` a server's maps are created with: `flows` for the
/// flow table and its reverse map, `ports` for the free-port queue,
/// `terminals` for the sessions and their flow counts.
pub fn server_map_sizes(flows: u32, ports: u32, terminals: u32) -> [(&'static str, u32); 5] {
    [
        (name::S_FLOWS, flows),
        (name::S_NAT, flows),
        (name::S_FREE_PORTS, ports),
        (name::S_SESSIONS, terminals),
        (name::S_ORIGIN_FLOWS, terminals),
    ]
}

/// The server agent's running account of the flow table, for `status` and
/// metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlowGauge {
    /// Dedicated ports in `nat_ports`.
    pub nat_ports: u64,
    /// Flows in the table after the last sweep.
    pub flows: u64,
    /// Ports free after the last sweep: every flow holds one port, so
    /// `nat_ports - flows`.
    pub free_ports: u64,
    /// Totals since the agent started.
    pub sweeps: u64,
    pub expired_tcp: u64,
    pub expired_udp: u64,
    pub expired_icmp: u64,
    pub ports_returned: u64,
    /// The last sweep.
    pub last: SweepReport,
    /// Flows per community after the last sweep.
    pub by_community: BTreeMap<u16, u64>,
}

impl FlowGauge {
    pub fn new(nat_ports: u64) -> Self {
        Self {
            nat_ports,
            free_ports: nat_ports,
            ..Self::default()
        }
    }

    pub fn record(&mut self, r: &SweepReport) {
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

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub use crate::monotonic_ns;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_counts_free_ports_and_totals() {
        let mut g = FlowGauge::new(3);
        assert_eq!((g.flows, g.free_ports), (0, 3));
        let r = SweepReport {
            scanned: 3,
            tcp: 1,
            udp: 1,
            icmp: 0,
            ports_returned: 2,
            kept: 1,
        };
        assert_eq!(r.removed(), 2);
        g.record(&r);
        g.record(&SweepReport {
            scanned: 1,
            kept: 1,
            ..SweepReport::default()
        });
        assert_eq!((g.flows, g.free_ports, g.sweeps), (1, 2, 2));
        assert_eq!((g.expired_tcp, g.expired_udp, g.expired_icmp), (1, 1, 0));
        assert_eq!(g.ports_returned, 2);
        assert_eq!(g.last.scanned, 1);
    }

    #[test]
    fn map_sizes_name_the_flow_maps() {
        assert_eq!(
            server_map_sizes(1000, 10, 7),
            [
                ("S_FLOWS", 1000),
                ("S_NAT", 1000),
                ("S_FREE_PORTS", 10),
                ("S_SESSIONS", 7),
                ("S_ORIGIN_FLOWS", 7)
            ]
        );
    }
}
