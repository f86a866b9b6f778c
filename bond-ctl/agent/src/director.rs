//! The director agent: loads `bond_director` on the front interfaces and
//! keeps its tables to the registry (`bond_tier::mirror`): a slot per
//! node (the interface towards it and the MACs, found from the node's
//! address: it must be on-link), and each community's owner.
//!
//! The registry says who owns what; the director does no placing of its
//! own, so any number of directors agree as soon as they have read the
//! same revision. It checks the nodes' health (`bond_tier::health`) and
//! fences one that stops answering: its lease revoked, the registry
//! moves its communities at once instead of when the lease runs out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bond_api::{
    Call, Request,
    reply::{DirectorNode, DirectorStatus, Status},
};
use bond_common::maps::DirectorConfig as DirectorMap;
use bond_config::DirectorConfig;
use bond_datapath::{self as datapath, Maps, Owners, ebpf};
use bond_tier::{Layout, View, health::Health, mirror};
use tokio::{net::UdpSocket, sync::mpsc};

use crate::{
    Exit, Pins,
    net::Net,
    nodes::{NodeTable, mac_text},
};

struct Director {
    cfg: DirectorConfig,
    /// The registry's etcd, as this director logs in to it.
    etcd: bond_tier::Etcd,
    maps: Maps,
    view: Arc<View>,
    live: bool,
    /// The nodes' slots and each community's owner (`D_NODES`,
    /// `D_OWNERS`).
    nodes: NodeTable,
    started: Instant,
    attached: BTreeMap<(&'static str, String), &'static str>,
    /// Health checks: silence after which a node is fenced (none: off),
    /// what they know, and the socket they go out on.
    timeout: Option<Duration>,
    health: Health,
    probes: UdpSocket,
    /// Fences that took effect.
    fenced: u64,
}

pub async fn run(
    cfg: DirectorConfig,
    pins: &mut Pins,
    mut calls: mpsc::Receiver<Call>,
    mut signals: crate::Signals,
) -> Result<Exit> {
    let mut ebpf = datapath::load_with_sizes(ebpf::DIRECTOR, &pins.dir, &[])?;
    crate::read_drop_log(&mut ebpf)?;
    let maps = Maps::new(&pins.dir);
    maps.set_director_config(DirectorMap {
        front_ip: u32::from(cfg.address),
        port: cfg.port,
        _pad: 0,
        front_ip6: cfg.address6.map_or([0; 16], |a| a.octets()),
    })?;
    let net = Net::new()?;
    for i in &cfg.interfaces {
        crate::veth::ready(&net, i, cfg.attach.veth)
            .await
            .with_context(|| format!("field `interfaces`: {i}"))?;
        pins.attach_xdp(&mut ebpf, "bond_director", i)
            .with_context(|| format!("field `interfaces`: {i}"))?;
    }
    let etcd = bond_tier::Etcd {
        endpoints: cfg.etcd.clone(),
        user: bond_config::etcd_login(cfg.etcd_user.as_deref(), cfg.etcd_password_file.as_deref())
            .map_err(|e| anyhow::anyhow!("field `etcd_password_file`: {e}"))?,
    };
    let mut registry = mirror::follow(etcd.clone(), Layout::new(&cfg.prefix));
    let timeout = (cfg.health_timeout_ms > 0)
        .then(|| Duration::from_millis(u64::from(cfg.health_timeout_ms)));
    let probes = crate::net::udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), None)
        .context("a socket for health checks")?;
    let up = format!(
        "director {}:{} up on {}, following the registry at {}",
        cfg.address,
        cfg.port,
        cfg.interfaces.join(","),
        cfg.etcd.join(",")
    );
    tracing::info!("{up}");
    crate::notify_ready(&up);
    let nodes = NodeTable::new(Owners::Director, maps.clone(), None, Some(cfg.attach.veth))?;
    let mut d = Director {
        etcd,
        cfg,
        nodes,
        maps,
        view: Arc::default(),
        live: false,
        started: Instant::now(),
        attached: pins.attached.clone(),
        timeout,
        health: Health::default(),
        probes,
        fenced: 0,
    };
    // A detached director's tables stay as they were until the registry
    // is read; then they are made to agree with it.
    let mut resolve = tokio::time::interval(crate::nodes::RESOLVE_EVERY);
    let mut probe = tokio::time::interval(timeout.map_or(Duration::from_secs(3600), |t| t / 3));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (fence_tx, mut fences) = mpsc::unbounded_channel();
    let mut answer = [0u8; 128];
    loop {
        tokio::select! {
            _ = signals.stop.recv() => return Ok(Exit::Leave),
            _ = signals.hangup.recv() => {
                tracing::info!("SIGHUP: a director reads everything from the registry; nothing to reload");
            }
            Some(call) = calls.recv() => {
                let detach = call.req == Request::Detach;
                let _ = call.reply.send(d.handle(call.req));
                if detach {
                    return Ok(Exit::Detach);
                }
            }
            r = registry.changed() => {
                if r.is_err() {
                    anyhow::bail!("the registry's task ended");
                }
                let m = registry.borrow_and_update().clone();
                if m.live != d.live {
                    tracing::info!("registry: {}", if m.live { "following" } else { "lost; the tables stand as they are" });
                }
                (d.view, d.live) = (m.view, m.live);
                if d.live {
                    d.nodes.sync(&d.view).await;
                }
            }
            _ = resolve.tick(), if d.nodes.unresolved() => d.nodes.sync(&d.view).await,
            _ = probe.tick(), if d.timeout.is_some() && d.live => d.check(&fence_tx).await,
            Ok((n, _)) = d.probes.recv_from(&mut answer) => {
                d.health.heard(&answer[..n], std::time::Instant::now());
            }
            Some((node, r)) = fences.recv() => match r {
                Ok(true) => {
                    d.fenced += 1;
                    tracing::warn!("node {node} fenced: its lease revoked, its communities move");
                }
                Ok(false) => tracing::info!("node {node}: already gone from the registry"),
                Err(e) => tracing::warn!("node {node}: fencing failed: {e:#}; trying again"),
            },
        }
    }
}

impl Director {
    /// One round of health checks: a probe to every node that answers
    /// them, and a fence for each that has been silent too long (in its
    /// own task; the result comes back on `done`).
    async fn check(&mut self, done: &mpsc::UnboundedSender<(String, Result<bool>)>) {
        let Some(timeout) = self.timeout else { return };
        let now = std::time::Instant::now();
        self.health.keep(self.view.nodes.keys().map(String::as_str));
        let probe = self.health.next_probe(now);
        for rec in self.view.nodes.values() {
            if let Some(port) = rec.health {
                // A probe that cannot go out is a missed answer.
                let _ = self
                    .probes
                    .send_to(&probe, SocketAddrV4::new(rec.address, port))
                    .await;
            }
        }
        for node in self.health.to_fence(now, timeout) {
            self.health.fenced(&node, now);
            tracing::warn!("node {node}: no answer to health checks for {timeout:?}; fencing it");
            let (etcd, layout, done) = (
                self.etcd.clone(),
                Layout::new(&self.cfg.prefix),
                done.clone(),
            );
            tokio::spawn(async move {
                let r = async {
                    let mut client = bond_tier::connect(&etcd).await?;
                    bond_tier::health::fence(&mut client, &layout, &node).await
                }
                .await;
                let _ = done.send((node, r));
            });
        }
    }

    fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
        match req {
            Request::Status => crate::reply(Status::Director(self.status())),
            Request::Detach => crate::reply(bond_api::reply::Detached { detached: true }),
            Request::Metrics => Ok(serde_json::Value::String(self.metrics())),
            other => Err(format!("a director does not take {other:?}")),
        }
    }

    fn status(&self) -> DirectorStatus {
        let owners = self.nodes.owners();
        let nodes = self
            .nodes
            .slots()
            .iter()
            .map(|(name, s)| {
                let stats = self.maps.director_stats(s.idx).unwrap_or_default();
                DirectorNode {
                    name: name.clone(),
                    address: s.address,
                    interface: s.at.as_ref().map(|a| a.1.clone()),
                    mac: s.at.as_ref().map(|a| mac_text(&a.3)),
                    communities: owners.values().filter(|&&i| i == s.idx).count(),
                    packets: stats.up_pkts,
                    bytes: stats.up_bytes,
                    health: self.health_of(name).into(),
                    rtt_us: self
                        .health
                        .get(name)
                        .and_then(|h| h.rtt)
                        .map(|r| r.as_micros() as u64),
                }
            })
            .collect();
        let resolved: BTreeSet<u32> = self
            .nodes
            .slots()
            .values()
            .filter(|s| s.at.is_some())
            .map(|s| s.idx)
            .collect();
        let steered = owners.values().filter(|i| resolved.contains(i)).count();
        DirectorStatus {
            instance: self.cfg.instance.clone(),
            address: SocketAddrV4::new(self.cfg.address, self.cfg.port),
            uptime_s: self.started.elapsed().as_secs(),
            attach: crate::attach_status(&self.attached),
            registry: self.live,
            nodes,
            steered,
            unsteered: self.view.communities.len() - steered.min(self.view.communities.len()),
            fenced: self.fenced,
            drops: self
                .maps
                .director_drops()
                .unwrap_or_default()
                .into_iter()
                .filter(|d| d.1 > 0)
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        }
    }

    fn health_of(&self, node: &str) -> &'static str {
        let heard = self.health.get(node).and_then(|h| h.heard);
        match (self.timeout, heard) {
            (Some(t), Some(at)) if at.elapsed() < t => "up",
            (Some(_), Some(_)) => "silent",
            _ => "unknown",
        }
    }

    fn metrics(&self) -> String {
        let mut m = bond_api::Metrics::default();
        m.family(
            "bond_director_packets_total",
            "counter",
            "Packets steered to each node.",
        );
        for (name, s) in self.nodes.slots() {
            let n = self.maps.director_stats(s.idx).map_or(0, |s| s.up_pkts);
            m.sample("bond_director_packets_total", &[("node", name.clone())], n);
        }
        m.family(
            "bond_director_communities",
            "gauge",
            "Communities each node owns, as this director steers them.",
        );
        for (name, s) in self.nodes.slots() {
            let n = self
                .nodes
                .owners()
                .values()
                .filter(|&&i| i == s.idx)
                .count();
            m.sample(
                "bond_director_communities",
                &[("node", name.clone())],
                n as u64,
            );
        }
        m.family(
            "bond_director_node_up",
            "gauge",
            "1 if the node answers health checks, 0 if not (or never did).",
        );
        for name in self.nodes.slots().keys() {
            let up = u64::from(self.health_of(name) == "up");
            m.sample("bond_director_node_up", &[("node", name.clone())], up);
        }
        m.family(
            "bond_director_fenced_total",
            "counter",
            "Nodes fenced (lease revoked) for failing health checks.",
        );
        m.sample("bond_director_fenced_total", &[], self.fenced);
        m.family(
            "bond_drops_total",
            "counter",
            "Packets the director dropped, by reason.",
        );
        for (reason, n) in self.maps.director_drops().unwrap_or_default() {
            m.sample("bond_drops_total", &[("reason", reason.to_string())], n);
        }
        m.finish()
    }
}
