//! What the server agent tells the operator: status, peers, metrics.

use std::{net::SocketAddrV4, time::Instant};

use anyhow::Result;
use bond_api::{
    Metrics, Request,
    reply::{
        CommunityStatus, Detached, DownPath, LinkRow, Peers, Reloaded, ServerStatus, Status,
        TerminalRow,
    },
};
use bond_common::edpf::PATH_USABLE;
use serde_json::Value;

use super::Agent;
use crate::feedback::Model;

impl Agent {
    pub(super) fn handle(&mut self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => crate::reply(Status::Server(self.status())),
            Request::Peers => crate::reply(self.peers()),
            Request::Metrics => self
                .metrics()
                .map(Value::String)
                .map_err(|e| format!("{e:#}")),
            Request::Detach => {
                tracing::info!("detaching: the datapath stays for the next agent");
                crate::reply(Detached { detached: true })
            }
            Request::Reload => {
                let changed = self.reload()?;
                crate::reply(Reloaded {
                    changed: changed.into_iter().map(String::from).collect(),
                })
            }
            Request::Weight { .. } => Err(
                "a link's weights are set on the terminal that owns it (`bond-ctl weight` there)"
                    .into(),
            ),
            Request::Drain { .. } => Err(
                "drain is for terminals; stop a server with SIGTERM (or `detach` to restart it)"
                    .into(),
            ),
        }
    }

    /// The link id that community `c`'s downstream schedule holds at
    /// index `idx` (the datapath names links by index).
    pub(super) fn link_of(&self, c: u32, idx: u32) -> Option<u8> {
        self.applied
            .range((c, 0)..=(c, u8::MAX))
            .find(|(_, a)| a.idx == idx)
            .map(|((_, link), _)| *link)
    }

    /// Community `c`'s downstream schedule as the datapath holds it: each
    /// link's rate, its delay over the nearest link's, the jitter counted
    /// on it now, and whether it is in use (not while left out for
    /// silence).
    pub(super) fn down_paths(&self, c: u32) -> Vec<DownPath> {
        let Ok(Some(paths)) = self.maps.down_paths(c) else {
            return Vec::new();
        };
        paths
            .links()
            .map(|p| DownPath {
                link: self.link_of(c, p.id),
                kbit: p.kbit(),
                delay_us: p.delay_ns / 1000,
                extra_us: p.extra_ns / 1000,
                usable: p.flags & PATH_USABLE != 0,
            })
            .collect()
    }

    /// Per community: terminals, links, flows, its downstream schedule;
    /// and the ports left.
    pub(super) fn status(&self) -> ServerStatus {
        let now = Instant::now();
        let sessions = self.table.sessions(now);
        let links = self.table.links(None, now);
        let communities = self
            .keys
            .keys()
            .map(|&id| CommunityStatus {
                id,
                terminals: sessions.iter().filter(|s| s.0 == id).count(),
                links: links.iter().filter(|l| l.community == id).count(),
                flows: self.flows.by_community.get(&id).copied().unwrap_or(0),
                paths: self.down_paths(id),
                nat: self.nat.share(id),
            })
            .collect();
        ServerStatus {
            instance: self.cfg.instance.clone(),
            address: SocketAddrV4::new(self.cfg.address, self.cfg.port),
            nat_address: self.cfg.nat_address,
            uptime_s: self.started.elapsed().as_secs(),
            adopted: self.adopted,
            attach: crate::attach_status(&self.attached),
            communities,
            flows: self.flows.flows,
            free_ports: self.flows.free_ports,
            nat: self.nat.status(),
            flow_table: self.flows.clone(),
            playout: self.playout.as_ref().map(|p| p.stats()),
            feedback: self.corrector.status(|m, idx| match m {
                Model::Down(c) => self.link_of(c, idx),
                Model::Up => None,
            }),
            resend: self.resends,
            split: self.splitter.stats(),
            rejects: self.rejects.counts(),
            faults: self.faults.counts(),
            tier: self.cfg.tier.as_ref().map(|t| bond_api::reply::TierStatus {
                node: t.node.clone(),
                registered: self.served.registered,
                controller: self.served.controller,
                owned: self.served.communities.len(),
            }),
        }
    }

    /// Every terminal of every community, with its links.
    pub(super) fn peers(&self) -> Peers {
        let now = Instant::now();
        let links = self.table.links(None, now);
        let terminals = self
            .table
            .sessions(now)
            .into_iter()
            .map(|(community, address, _, missed)| TerminalRow {
                community,
                address,
                missed,
                links: links
                    .iter()
                    .filter(|l| l.community == community && l.owner == address)
                    .map(|l| LinkRow {
                        link: l.link,
                        address: l.addr,
                        down: l.down,
                        missed: l.missed,
                    })
                    .collect(),
            })
            .collect();
        Peers::Server { terminals }
    }

    pub(super) fn metrics(&self) -> Result<String> {
        let mut m = Metrics::default();
        let now = Instant::now();
        let rows = self.table.links(None, now);
        let mut stats = Vec::new();
        for r in &rows {
            if let Some(a) = self.applied.get(&(r.community, r.link)) {
                stats.push((r, self.maps.server_link_stats(a.idx)?));
            }
        }
        let labels = |r: &crate::membership::ServerLinkRow, dir: &str| {
            vec![
                ("community", r.community.to_string()),
                ("link", r.link.to_string()),
                ("direction", dir.to_string()),
            ]
        };
        m.family(
            "bond_link_packets_total",
            "counter",
            "Packets per link: up received from it, down sent on it.",
        );
        for (r, s) in &stats {
            m.sample("bond_link_packets_total", &labels(r, "up"), s.up_pkts);
            m.sample("bond_link_packets_total", &labels(r, "down"), s.down_pkts);
        }
        m.family(
            "bond_link_bytes_total",
            "counter",
            "Bytes of carried (inner) packets per link.",
        );
        for (r, s) in &stats {
            m.sample("bond_link_bytes_total", &labels(r, "up"), s.up_bytes);
            m.sample("bond_link_bytes_total", &labels(r, "down"), s.down_bytes);
        }
        m.family("bond_link_weight", "gauge", "Downstream weight per link.");
        for r in &rows {
            m.sample("bond_link_weight", &labels(r, "down"), r.down);
        }
        m.family(
            "bond_link_missed_announces",
            "gauge",
            "Announces missed per link.",
        );
        for r in &rows {
            m.sample(
                "bond_link_missed_announces",
                &[
                    ("community", r.community.to_string()),
                    ("link", r.link.to_string()),
                ],
                r.missed,
            );
        }
        m.family(
            "bond_community_flows",
            "gauge",
            "Flows in the table per community, as of the last sweep.",
        );
        for id in self.keys.keys() {
            let n = self.flows.by_community.get(id).copied().unwrap_or(0);
            m.sample("bond_community_flows", &[("community", id.to_string())], n);
        }
        m.family(
            "bond_free_ports",
            "gauge",
            "Dedicated ports of the NAT pool no flow holds.",
        );
        m.sample("bond_free_ports", &[], self.flows.free_ports);
        let pool = self.nat.status();
        m.family(
            "bond_nat_blocks",
            "gauge",
            "Blocks of ports in the NAT pool, held by a community or free.",
        );
        for (state, n) in [("held", pool.blocks_held), ("free", pool.blocks_free)] {
            m.sample("bond_nat_blocks", &[("state", state.into())], n as u64);
        }
        m.family(
            "bond_nat_starved",
            "gauge",
            "Communities with terminals logged on and no block: the pool ran out.",
        );
        m.sample("bond_nat_starved", &[], pool.starved as u64);
        m.family(
            "bond_flows_expired_total",
            "counter",
            "Idle flows removed, by protocol.",
        );
        for (p, v) in [
            ("tcp", self.flows.expired_tcp),
            ("udp", self.flows.expired_udp),
            ("icmp", self.flows.expired_icmp),
        ] {
            m.sample("bond_flows_expired_total", &[("proto", p.into())], v);
        }
        m.family(
            "bond_drops_total",
            "counter",
            "Packets dropped by the datapath, by reason.",
        );
        for (why, v) in self.maps.server_drops()? {
            m.sample("bond_drops_total", &[("reason", why.into())], v);
        }
        m.family("bond_events_total", "counter", "Datapath events.");
        for (what, v) in self.maps.server_events()? {
            m.sample("bond_events_total", &[("event", what.into())], v);
        }
        self.rejects.metrics(&mut m);
        self.faults.metrics(&mut m);
        Ok(m.finish())
    }
}
