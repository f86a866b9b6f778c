//! Starting the server agent: its sockets, maps and programs, the tables
//! an earlier agent left (adoption), and its tasks.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, Result};
use bond_api::Call;
use bond_common::{
    edpf::Paths,
    maps::{LINK_V6, LINK_VALID, ServerConfig as ServerMap, name},
};
use bond_config::ServerConfig;
use bond_datapath::{
    self as datapath, Maps, ebpf,
    flows::{self, FlowTable},
};
use bond_proto::control::{Counter, Guard, LinkAd};
use tokio::sync::mpsc;

use super::{ADOPT_INTERVAL, Agent, Applied};
use crate::{
    Exit, Pins, Tally,
    feedback::Corrector,
    membership::ServerTable,
    net::{Net, hold_name, split_name, sysctl, timestamp_arrivals, udp_socket},
    pathmon::Echoes,
    playout, resend, split,
};

pub async fn run(
    cfg: ServerConfig,
    path: &Path,
    pins: &mut Pins,
    calls: mpsc::Receiver<Call>,
    signals: crate::Signals,
) -> Result<Exit> {
    let (lo, hi) = cfg
        .port_range()
        .map_err(anyhow::Error::msg)
        .context("field `nat_ports`")?;
    let ports = cfg
        .pool_ports()
        .map_err(anyhow::Error::msg)
        .context("field `nat_ports`")?;
    let sizes = flows::server_map_sizes(
        cfg.flows.table_size(ports),
        cfg.max_terminals,
        cfg.tier.is_some(),
    );
    let mut ebpf = datapath::load_with_sizes(ebpf::SERVER, &pins.dir, &sizes)?;
    crate::read_drop_log(&mut ebpf)?;
    let maps = Maps::new(&pins.dir);
    let map_cfg = ServerMap {
        wan_ip: u32::from(cfg.address),
        nat_ip: u32::from(cfg.nat_address),
        port: cfg.port,
        port_min: lo,
        port_max: hi,
        link_mtu: cfg.link_mtu,
        per_origin: cfg.flows.per_origin,
        nat_ip6: cfg.nat_address6.map_or([0; 16], |a| a.octets()),
        wan_ip6: cfg.address6.map_or([0; 16], |a| a.octets()),
        nat_count: cfg.nat_addresses,
        nat_block: cfg.nat_block(),
        nat_order: cfg.nat_port_order.map_value(),
        _pad: 0,
    };
    maps.set_server_config(map_cfg)?;
    let deny = super::deny::prefixes(&cfg).context("field `deny`")?;
    maps.set_deny(&deny)?;
    let deny6 = super::deny::prefixes6(&cfg).context("field `deny`")?;
    maps.set_deny6(&deny6)?;
    tracing::info!("members may not reach {} prefixes (`deny`)", deny.len());
    // The communities' shares of the pool: those an earlier agent handed
    // out (adopted maps) are theirs still.
    let nat = super::blocks::Blocks::start(&cfg, &maps, pins.adopted)?;

    // Forwarding for the slow path, which hands the kernel packets whose
    // source is one of our own addresses; the dedicated ports are kept from
    // the host's own sockets.
    sysctl("net.ipv4.ip_forward", "1")?;
    if cfg.nat_address6.is_some() || cfg.address6.is_some() {
        // (The datapath's IPv6 route lookups answer only where it is on.)
        sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    // The dedicated ports are reserved for the whole host: the kernel's
    // own connections (the registry's among them) need ephemeral ports
    // outside them.
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading net.ipv4.ip_local_port_range")?;
    if let Some((a, b)) = parse_port_range(&ephemeral)
        && ephemeral_left((a, b), (lo, hi)) == 0
    {
        anyhow::bail!(
            "field `nat_ports`: {lo}-{hi} covers the kernel's whole ephemeral range {a}-{b} \
             (net.ipv4.ip_local_port_range): the host could open no connection of its own; \
             keep the dedicated ports out of it, or move it"
        );
    }
    sysctl("net.ipv4.ip_local_reserved_ports", &format!("{lo}-{hi}"))?;
    let net = Net::new()?;
    datapath::server_jumps(&mut ebpf)?;
    for i in &cfg.interfaces {
        sysctl(&format!("net.ipv4.conf.{i}.accept_local"), "1")?;
        sysctl(&format!("net.ipv4.conf.{i}.rp_filter"), "0")?;
        crate::veth::ready(&net, i, cfg.attach.veth)
            .await
            .with_context(|| format!("field `interfaces`: {i}"))?;
        pins.attach_xdp(&mut ebpf, "bond_server", i)
            .with_context(|| format!("field `interfaces`: {i}"))?;
    }
    // What the playout sees of each origin's packets (`crate::feedback`);
    // without a playout, nothing sends on it.
    let (feedback_tx, feedback) = mpsc::unbounded_channel();
    let playout = if cfg.playout {
        let name = hold_name(&cfg.instance);
        // IPv6 on: held inner IPv6 is routed from here (the FIB lookup
        // answers only where IPv6 is on and forwards).
        let (tap, dev) = playout::hold_device(&net, &name, "0", true).await?;
        sysctl(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
        pins.attach_xdp(&mut ebpf, "bond_server", &name)?;
        Some(playout::Handle::start(
            tap,
            dev.index,
            dev.mac,
            maps.clone(),
            name::S_HOLD,
            feedback_tx,
        )?)
    } else {
        maps.set_hold(name::S_HOLD, Default::default())?;
        None
    };
    // Replies too big for the links and free to be fragmented are cut to
    // fit there (`crate::split`), then come back in through the program.
    let splitter = {
        let name = split_name(&cfg.instance);
        let (tap, dev) = playout::hold_device(&net, &name, "0", false).await?;
        sysctl(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
        pins.attach_xdp(&mut ebpf, "bond_server", &name)?;
        split::Splitter::start(tap, dev.index, dev.mac, maps.clone())?
    };
    let sock = udp_socket(SocketAddrV4::new(cfg.address, cfg.port), None)
        .context("fields `address`, `port`")?;
    timestamp_arrivals(&sock)?;
    let sock6 = match cfg.address6 {
        Some(a) => {
            let s = udp_socket(std::net::SocketAddrV6::new(a, cfg.port, 0, 0), None)
                .context("fields `address6`, `port`")?;
            timestamp_arrivals(&s)?;
            Some(s)
        }
        None => None,
    };
    let serves = match &cfg.tier {
        Some(t) => format!("node {} of the registry at {}", t.node, t.etcd.join(",")),
        None => format!("{} communities", cfg.communities.len()),
    };
    let up = format!(
        "server {}:{} up: {serves}, dedicated ports {lo}-{hi} on {}",
        cfg.address,
        cfg.port,
        match cfg.nat_addresses {
            1 => cfg.nat_address.to_string(),
            n => format!("{} and the next {}", cfg.nat_address, n - 1),
        }
    );
    let site = match &cfg.site_key {
        Some(path) => Some(
            bond_proto::identity::Identity::load(path)
                .map_err(|e| anyhow::anyhow!("field `site_key`: {e}"))?,
        ),
        None => None,
    };
    if let Some(s) = &site {
        tracing::info!(
            "site key {}: sessions of terminals that pin it are keyed",
            s.public()
        );
    }
    let tier = match &cfg.tier {
        Some(t) => {
            let address = t.node_address.unwrap_or(cfg.address);
            let health = t
                .health_port(cfg.port)
                .context("field `tier.health_port`")?;
            let sock = udp_socket(SocketAddrV4::new(address, health), None)
                .context("fields `tier.node_address`, `tier.health_port`")?;
            let user =
                bond_config::etcd_login(t.etcd_user.as_deref(), t.etcd_password_file.as_deref())
                    .map_err(|e| anyhow::anyhow!("field `tier.etcd_password_file`: {e}"))?;
            let settings = bond_tier::node::Settings {
                etcd: bond_tier::Etcd {
                    endpoints: t.etcd.clone(),
                    user,
                },
                layout: bond_tier::Layout::new(&t.prefix),
                name: t.node.clone(),
                record: bond_tier::layout::NodeRecord {
                    address,
                    weight: t.weight,
                    health: Some(health),
                },
                lease: std::time::Duration::from_secs(u64::from(t.lease_s)),
            };
            Some(bond_tier::node::Node::join(settings, Some(sock)))
        }
        None => None,
    };
    tracing::info!("{up}");
    crate::notify_ready(&up);
    let mut agent = Agent {
        keys: cfg
            .communities
            .iter()
            .map(|c| (c.id, c.key.clone()))
            .collect(),
        identities: super::admit::Identities::from_config(&cfg),
        site,
        nudged: HashMap::new(),
        refused: Default::default(),
        nodes: match &cfg.tier {
            Some(t) => Some(crate::nodes::NodeTable::new(
                bond_datapath::Owners::Node,
                maps.clone(),
                Some(t.node.clone()),
                None,
            )?),
            None => None,
        },
        tier,
        served: Default::default(),
        live_flows: (BTreeMap::new(), None),
        drain_seen: None,
        released: BTreeMap::new(),
        table: ServerTable::new(cfg.misses),
        guard: Guard::new(bond_proto::SKEW_MS),
        counter: Counter::clocked(),
        sock,
        sock6,
        applied: BTreeMap::new(),
        free_idx: Vec::new(),
        next_idx: 0,
        rejects: Tally::rejects(),
        faults: Tally::faults(),
        trains: HashMap::new(),
        sent_trains: HashMap::new(),
        echoes: Echoes::default(),
        adopted: pins.adopted,
        started: Instant::now(),
        attached: pins.attached.clone(),
        flows: FlowTable::new(u64::from(ports)),
        nat,
        map_cfg,
        community_mtu: HashMap::new(),
        path: path.to_path_buf(),
        playout,
        splitter,
        corrector: Corrector::start(maps.clone())?,
        resends: resend::Resend::default(),
        adopted_delay: HashMap::new(),
        cfg,
        maps,
    };
    if agent.adopted {
        agent.adopt()?;
    }
    let exit = agent.run(calls, feedback, signals).await;
    // A stop gives the lease back: the node's communities move at once. A
    // detach leaves it to run out (`lease_s`), unless the next agent
    // registers first.
    if let (Ok(Exit::Leave), Some(node)) = (&exit, agent.tier.take()) {
        node.leave().await;
    }
    exit
}

impl Agent {
    /// Rebuilds the tables from the maps an earlier agent left: sessions
    /// with their tokens, and links with their owners, addresses and
    /// (scaled) downstream weights.
    pub(super) fn adopt(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut by_term: BTreeMap<(u32, Ipv4Addr), Vec<(LinkAd, SocketAddr)>> = BTreeMap::new();
        let mut rates: HashMap<u32, BTreeMap<u32, u32>> = HashMap::new();
        for (key, idx) in self.maps.server_link_index()? {
            let l = self.maps.server_link(idx)?;
            if l.flags & LINK_VALID == 0 {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = rates.entry(key.community) {
                let p = self.maps.down_paths(key.community)?.unwrap_or(Paths::EMPTY);
                e.insert(p.links().map(|l| (l.id, l.kbit() as u32)).collect());
                for l in p.links() {
                    self.adopted_delay.insert((key.community, l.id), l.delay_ns);
                }
            }
            let down = rates[&key.community].get(&idx).copied().unwrap_or(0);
            let ad = LinkAd {
                id: l.link,
                port: 0,
                up: 0,
                down,
                // Not in the maps: the next announce says it.
                mtu: 0,
                ..Default::default()
            };
            let addr = if l.flags & LINK_V6 != 0 {
                SocketAddr::from((self.maps.server_link6(idx)?, l.port))
            } else {
                SocketAddr::from((Ipv4Addr::from(l.ip), l.port))
            };
            by_term
                .entry((l.community, Ipv4Addr::from(l.owner)))
                .or_default()
                .push((ad, addr));
            let applied = Applied {
                idx,
                entry: l,
                addr,
            };
            self.applied.insert((l.community, l.link), applied);
            self.next_idx = self.next_idx.max(idx + 1);
        }
        let used: std::collections::HashSet<u32> = self.applied.values().map(|a| a.idx).collect();
        self.free_idx = (0..self.next_idx).filter(|i| !used.contains(i)).collect();
        let sessions = self.maps.sessions()?;
        for (k, s) in &sessions {
            let o = Ipv4Addr::from(k.origin);
            let links = by_term.remove(&(k.community, o)).unwrap_or_default();
            self.table
                .adopt(k.community, o, s.token, &links, ADOPT_INTERVAL, now);
        }
        tracing::info!(
            "adopted {} session(s) and {} link(s) from the maps",
            sessions.len(),
            self.applied.len()
        );
        Ok(())
    }
}

/// `net.ipv4.ip_local_port_range`'s two numbers.
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// Ports of the ephemeral range `(a, b)` left to the host's own sockets
/// once the dedicated ports `(lo, hi)` are reserved.
fn ephemeral_left((a, b): (u16, u16), (lo, hi): (u16, u16)) -> u32 {
    let all = u32::from(b.saturating_sub(a)) + 1;
    let (from, to) = (a.max(lo), b.min(hi));
    let taken = if from <= to {
        u32::from(to - from) + 1
    } else {
        0
    };
    all - taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dedicated_ports_leave_the_host_ephemeral_ports_or_are_refused() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("32768"), None);
        let kernel = (32768, 60999);
        assert_eq!(ephemeral_left(kernel, (20000, 29999)), 28232, "apart");
        assert_eq!(ephemeral_left(kernel, (10000, 32767)), 28232, "just below");
        assert_eq!(ephemeral_left(kernel, (20000, 40000)), 20999, "overlapping");
        assert_eq!(ephemeral_left(kernel, (10000, 65535)), 0, "covering");
        assert_eq!(ephemeral_left(kernel, (32768, 60999)), 0, "the same");
    }
}
