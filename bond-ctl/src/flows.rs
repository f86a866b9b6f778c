//! Flow table upkeep on the reconstitution server: idle flows expire and
//! their dedicated ports go back to the free queue.
//!
//! The program (`bond_server`) stamps each flow with the time of its last
//! packet in either direction (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) and
//! marks TCP flows that saw FIN or RST (`Flow::state`). The agent sweeps
//! the table every `[flows] sweep_ms` and removes the flows idle longer
//! than their protocol's timeout. The order of the deletes is
//! [`Maps::remove_flows_if`]'s.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use bond_common::{
    maps::{FLOW_CLOSING, Flow, FlowKey, SessionKey, name},
    wire::{IPPROTO_ICMP, IPPROTO_TCP},
};
use serde::Serialize;

use crate::datapath::{Maps, Result};

/// How long a flow may stay idle, by protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP with no FIN or RST seen: RFC 5382 REQ-5 (at least 2 h 4 min).
    pub tcp_established: Duration,
    /// TCP after a FIN or RST in either direction (Linux conntrack's
    /// TIME_WAIT and FIN_WAIT figure).
    pub tcp_closing: Duration,
    /// UDP: RFC 4787 REQ-5 (at least 2 min, 5 min recommended).
    pub udp: Duration,
    /// ICMP echo: RFC 5508 REQ-1 (at least 60 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(7440),
            tcp_closing: Duration::from_secs(120),
            udp: Duration::from_secs(300),
            icmp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The idle time after which this flow expires. Protocols the program
    /// does not create flows for (none today) get the UDP timeout.
    pub fn of(&self, key: &FlowKey, flow: &Flow) -> Duration {
        match key.proto {
            IPPROTO_TCP if flow.state & FLOW_CLOSING != 0 => self.tcp_closing,
            IPPROTO_TCP => self.tcp_established,
            IPPROTO_ICMP => self.icmp,
            _ => self.udp,
        }
    }

    /// Whether the flow has been idle at `now_ns` (CLOCK_MONOTONIC) for at
    /// least its timeout. A packet stamped after `now_ns` counts as idle 0.
    pub fn expired(&self, key: &FlowKey, flow: &Flow, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(flow.last_seen_ns);
        u128::from(idle) >= self.of(key, flow).as_nanos()
    }
}

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
pub use crate::show::monotonic_ns;

#[cfg(test)]
mod tests {
    use bond_common::{
        maps::{FLOW_FIN, FLOW_RST},
        wire::IPPROTO_UDP,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            community: 1,
            proto,
            _pad: 0,
            origin: 0x0a00_0103,
            port: 40000,
            _pad2: 0,
        }
    }

    fn flow(state: u8, last_seen_ns: u64) -> Flow {
        Flow {
            nat_port: 20000,
            state,
            _pad: [0; 5],
            created_ns: 0,
            last_seen_ns,
            up_pkts: 1,
            up_bytes: 60,
            down_pkts: 0,
            down_bytes: 0,
        }
    }

    /// (expired just before the timeout, expired at it) for a flow last
    /// seen at 1000 s.
    fn around(t: &Timeouts, proto: u8, state: u8, timeout_s: u64) -> (bool, bool) {
        let (k, f) = (key(proto), flow(state, 1000 * S));
        (
            t.expired(&k, &f, (1000 + timeout_s) * S - 1),
            t.expired(&k, &f, (1000 + timeout_s) * S),
        )
    }

    #[test]
    fn defaults_follow_the_rfcs() {
        let t = Timeouts::default();
        assert_eq!(t.tcp_established, Duration::from_secs(7440));
        assert_eq!(t.tcp_closing, Duration::from_secs(120));
        assert_eq!(t.udp, Duration::from_secs(300));
        assert_eq!(t.icmp, Duration::from_secs(60));
    }

    #[test]
    fn each_protocol_expires_after_its_own_timeout() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(50),
            tcp_closing: Duration::from_secs(5),
            udp: Duration::from_secs(20),
            icmp: Duration::from_secs(10),
        };
        let cases = [
            ("tcp established", IPPROTO_TCP, 0, 50),
            ("tcp after FIN", IPPROTO_TCP, FLOW_FIN, 5),
            ("tcp after RST", IPPROTO_TCP, FLOW_RST, 5),
            ("tcp after both", IPPROTO_TCP, FLOW_FIN | FLOW_RST, 5),
            ("udp", IPPROTO_UDP, 0, 20),
            ("icmp", IPPROTO_ICMP, 0, 10),
            // The state byte means something for TCP only.
            ("udp with state bits", IPPROTO_UDP, FLOW_FIN, 20),
            ("icmp with state bits", IPPROTO_ICMP, FLOW_RST, 10),
            ("another protocol", 47, 0, 20),
        ];
        for (what, proto, state, secs) in cases {
            assert_eq!(
                around(&t, proto, state, secs),
                (false, true),
                "{what}: expires exactly {secs} s after its last packet"
            );
        }
    }

    #[test]
    fn a_packet_after_now_or_a_fresh_flow_is_not_expired() {
        let t = Timeouts::default();
        let k = key(IPPROTO_UDP);
        // The program stamped it after the agent read the clock.
        assert!(!t.expired(&k, &flow(0, 2000 * S), 1000 * S));
        assert!(!t.expired(&k, &flow(0, 1000 * S), 1000 * S));
        // Long-lived numbers do not overflow.
        assert!(t.expired(&k, &flow(0, 0), u64::MAX));
    }

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
