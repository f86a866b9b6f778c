//! What the bench does with a loaded server: fill its tables, run flow
//! set-up rounds and packet-rate passes, and check its output.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::{TestRun as _, TestRunOptions};
use bond_common::{
    maps::{Flow, FlowKey, NatEntry, NatKey, name},
    wire::BondHdr,
};

use crate::packets::{DATA_DOWN, ETH_P_IP, Ip, L4, WRAP_LEN, arp_frame, eth};

use super::community::{
    Link, SplitMix, measured_key, reply_frame, reply_ip, synthetic_key, terminal_of, token,
    up_frame,
};
use super::measure::{Passes, Workload};
use super::report::Step;
use super::server::{Pass, RepeatCheck, Server};
use super::{
    CNT_DEV_MAC, CONTENT, CONTENT_MAC, DPORT, IPPROTO_UDP, LINKS, NAT_IP, PORT_MAX, PORT_MIN,
    REPEAT_CHECK, ROUTER, ROUTER_MAC, Scale, WAN_DEV_MAC, WAN_IP, XDP_PASS, XDP_REDIRECT,
};

impl Server {
    /// One flow set-up round: the K new-flow packets (after removing the
    /// K flows of the previous round), then the same packets again as the
    /// baseline; checks that exactly K flows were created, all by the
    /// first pass.
    pub(super) fn setup_round(
        &self,
        scale: Scale,
        round: usize,
        up: &[Vec<u8>],
    ) -> Result<(Pass, Pass)> {
        if round > 0 {
            self.remove_probe(scale)?;
        }
        let frames = || up.iter().map(Vec::as_slice);
        let before = self.counters()?;
        let new = self.pass(frames(), XDP_REDIRECT)?;
        let made = self.counters()?;
        let created = made.event("flows_created") - before.event("flows_created");
        ensure!(
            created == u64::from(scale.probe),
            "round {round}: {} new-flow packets created {created} flows",
            scale.probe
        );
        let hit = self.pass(frames(), XDP_REDIRECT)?;
        let after = self.counters()?;
        ensure!(
            after.event("flows_created") == made.event("flows_created"),
            "round {round}: packets of existing flows created flows"
        );
        Ok((new, hit))
    }

    /// The packet-rate frames, once the set-up rounds left the K flows in
    /// place (checked, and one packet each way checked in full): one flow
    /// for the hot passes; for the spread ones the K flows at the empty
    /// table, or K drawn from the whole full table (replies: from the
    /// flows that hold ports, the only ones a reply can reach).
    pub(super) fn workload(&self, scale: Scale, full: bool) -> Result<Workload> {
        let keys: Vec<FlowKey> = (0..scale.probe)
            .map(|k| measured_key(k, scale.communities))
            .collect();
        let ports = self.nat_ports(&keys, 2)?;
        self.spot_check(&keys[0], ports[0])?;
        let (spread_up, spread_down) = if full {
            let mut rng = SplitMix(0x5ca1e);
            let up = (0..scale.probe)
                .map(|_| {
                    let i = (rng.next() % u64::from(scale.synthetic())) as u32;
                    up_frame(&synthetic_key(i, scale.communities), (i % LINKS) as u8)
                })
                .collect();
            let down = (0..scale.probe)
                .map(|_| {
                    let i = (rng.next() % u64::from(scale.nat_held())) as u16;
                    reply_frame(PORT_MIN + i)
                })
                .collect();
            (up, down)
        } else {
            let up = keys
                .iter()
                .zip(0..)
                .map(|(k, i)| up_frame(k, (i % LINKS) as u8))
                .collect();
            (up, ports.iter().map(|&p| reply_frame(p)).collect())
        };
        Ok(Workload {
            hot_up: up_frame(&keys[0], 0),
            hot_down: reply_frame(ports[0]),
            spread_up,
            spread_down,
        })
    }

    /// One round of packet-rate passes, appended to `p`: one flow each
    /// way (`scale.hot` packets), K flows each way, and the floor.
    pub(super) fn rates(&self, scale: Scale, w: &Workload, p: &mut Passes) -> Result<()> {
        let hot = scale.hot as usize;
        let fwd = XDP_REDIRECT;
        p.hot_up
            .push(self.pass(std::iter::repeat_n(&w.hot_up[..], hot), fwd)?);
        p.hot_down
            .push(self.pass(std::iter::repeat_n(&w.hot_down[..], hot), fwd)?);
        p.spread_up
            .push(self.pass(w.spread_up.iter().map(Vec::as_slice), fwd)?);
        p.spread_down
            .push(self.pass(w.spread_down.iter().map(Vec::as_slice), fwd)?);
        // The harness's own cost: a non-IP frame, which the program passes
        // at its first check.
        let arp = arp_frame(ROUTER_MAC, ROUTER, WAN_IP);
        p.floor
            .push(self.pass(std::iter::repeat_n(&arp[..], hot), XDP_PASS)?);
        Ok(())
    }

    /// Removes the program's K flows with the agent's own call; their
    /// ports go back to the queue.
    pub(super) fn remove_probe(&self, scale: Scale) -> Result<()> {
        let keys = (0..scale.probe).map(|k| measured_key(k, scale.communities));
        let gone = self
            .maps
            .remove_flows_if(keys, |_, _| true)
            .context("removing the measured flows")?;
        ensure!(
            gone.len() == scale.probe as usize && gone.iter().all(|f| f.port_returned),
            "removed {} of {} measured flows ({} ports returned)",
            gone.len(),
            scale.probe,
            gone.iter().filter(|f| f.port_returned).count()
        );
        Ok(())
    }

    /// The dedicated ports of `keys`, after checking each flow exists, has
    /// a port from the free range and counted `up_pkts` packets (so the
    /// timed passes really went through these flows).
    pub(super) fn nat_ports(&self, keys: &[FlowKey], up_pkts: u64) -> Result<Vec<u16>> {
        let flows = self.hash::<FlowKey, Flow>(name::S_FLOWS)?;
        let lo = PORT_MAX - (keys.len() as u16 - 1);
        let mut seen = std::collections::HashSet::new();
        keys.iter()
            .map(|k| {
                let f = flows
                    .get(k, 0)
                    .with_context(|| format!("the measured flow {k:?} is not in S_FLOWS"))?;
                ensure!(
                    (lo..=PORT_MAX).contains(&f.nat_port) && seen.insert(f.nat_port),
                    "flow {k:?} got port {} (free range {lo}-{PORT_MAX}, or a port twice)",
                    f.nat_port
                );
                ensure!(
                    f.up_pkts == up_pkts,
                    "flow {k:?} counted {} upstream packets, expected {up_pkts}",
                    f.up_pkts
                );
                Ok(f.nat_port)
            })
            .collect()
    }

    /// One packet each way checked against what a server must send:
    /// upstream unwrapped, NATed and addressed to the content server's MAC
    /// (byte for byte); downstream wrapped for the flow's origin on one of
    /// its community's links, towards the router (addresses, bond header
    /// fields, and the inner packet byte for byte).
    pub(super) fn spot_check(&self, key: &FlowKey, nat_port: u16) -> Result<()> {
        let origin = Ipv4Addr::from(key.origin);
        let inner = Ip::new(origin, CONTENT, L4::udp(key.port, DPORT));
        let want = eth(
            CONTENT_MAC,
            CNT_DEV_MAC,
            ETH_P_IP,
            &Ip {
                src: NAT_IP,
                ttl: inner.ttl - 1,
                l4: L4::udp(nat_port, DPORT),
                ..inner.clone()
            }
            .bytes(),
        );
        let (v, out) = self.run_out(&up_frame(key, 0))?;
        ensure!(
            v == XDP_REDIRECT && out == want,
            "upstream spot check: verdict {v}, output {}",
            if out == want {
                "as expected"
            } else {
                "differs"
            }
        );

        let reply = reply_ip(nat_port);
        let (v, out) = self.run_out(&reply.frame(CNT_DEV_MAC, CONTENT_MAC))?;
        let want_inner = Ip {
            dst: origin,
            ttl: reply.ttl - 1,
            l4: L4::udp(DPORT, key.port),
            ..reply.clone()
        }
        .bytes();
        let links: Vec<[u8; 4]> = (0..LINKS)
            .map(|j| Link::of(key.community, j).ip.octets())
            .collect();
        let t = terminal_of(origin)?;
        let at = bond_common::wire::BOND_OFF;
        let bond = out
            .get(at..at + BondHdr::LEN)
            .and_then(|b| Some(BondHdr::from_bytes(b.try_into().ok()?)));
        let ok = v == XDP_REDIRECT
            && out.len() == WRAP_LEN + want_inner.len()
            && out[0..6] == ROUTER_MAC
            && out[6..12] == WAN_DEV_MAC
            && links.iter().any(|l| out[30..34] == *l)
            && bond.is_some_and(|h| {
                h.kind == DATA_DOWN
                    && h.community() == key.community
                    && h.origin() == u32::from(origin)
                    && h.token() == token(key.community, t)
            })
            && out[WRAP_LEN..] == want_inner;
        ensure!(
            ok,
            "downstream spot check: verdict {v}, output not the expected wrap"
        );
        Ok(())
    }

    /// What `repeat` does to a program that rewrites its frame: runs one
    /// upstream frame of a new flow `REPEAT_CHECK` times in one call and
    /// counts the packets its flow saw. The flow is removed afterwards.
    pub(super) fn repeat_check(&self, scale: Scale) -> Result<RepeatCheck> {
        let key = measured_key(scale.probe, scale.communities);
        let p = self.ebpf_xdp()?;
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(&up_frame(&key, 0)),
                repeat: REPEAT_CHECK,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN with repeat")?;
        let flow = self
            .hash::<FlowKey, Flow>(name::S_FLOWS)?
            .get(&key, 0)
            .context("the repeat check's flow was not created")?;
        let gone = self
            .maps
            .remove_flows_if([key], |_, _| true)
            .context("removing the repeat check's flow")?;
        ensure!(gone.len() == 1, "the repeat check's flow did not go");
        Ok(RepeatCheck {
            counted: flow.up_pkts,
            last_verdict: r.return_value,
        })
    }

    /// Fills the table to F - K flows (and `S_NAT` as far as the ports go)
    /// through the map API; returns the two steps' timings.
    pub(super) fn fill(&self, scale: Scale) -> Result<Vec<Step>> {
        let now = bond_datapath::monotonic_ns();
        let mut flows = self.hash::<FlowKey, Flow>(name::S_FLOWS)?;
        let held = scale.nat_held();
        let step = |what: &str, count: u32, f: &mut dyn FnMut(u32) -> Result<()>| {
            let tenth = (count / 10).max(1);
            let mut first = Duration::ZERO;
            let start = Instant::now();
            let mut mark = start;
            for i in 0..count {
                if i == count - tenth {
                    mark = Instant::now();
                }
                f(i)?;
                if i + 1 == tenth {
                    first = start.elapsed();
                }
            }
            Ok::<_, anyhow::Error>(Step::new(
                what,
                count,
                start.elapsed(),
                Some((first, mark.elapsed())),
            ))
        };
        let f = step(
            "fill S_FLOWS through the map API",
            scale.synthetic(),
            &mut |i| {
                // Sending to the content server, as the measured replies
                // come from it.
                let port = PORT_MIN + (i % held) as u16;
                let flow = Flow::new((0, port), now, CONTENT.into(), DPORT);
                flows
                    .insert(synthetic_key(i, scale.communities), flow, 0)
                    .with_context(|| format!("inserting synthetic flow {i} into S_FLOWS"))
            },
        )?;
        let mut nat = self.hash::<NatKey, NatEntry>(name::S_NAT)?;
        let g = step("fill S_NAT through the map API", held, &mut |i| {
            let k = synthetic_key(i, scale.communities);
            nat.insert(
                NatKey {
                    proto: IPPROTO_UDP,
                    index: 0,
                    port: PORT_MIN + i as u16,
                },
                k.nat(),
                0,
            )
            .with_context(|| format!("inserting NAT entry {i} into S_NAT"))
        })?;
        Ok(vec![f, g])
    }
}
