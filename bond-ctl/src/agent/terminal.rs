//! The terminal agent: announces itself, keeps the peer table, logs on to
//! the server, and writes the upstream links, schedule and neighbours the
//! programs use.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use bond_common::{
    maps::{LINK_VALID, RelayLink, TerminalConfig as TerminalMap, UpLink},
    wire::OUTER_LEN,
};
use tokio::{net::UdpSocket, sync::mpsc};

use super::{Rejects, attach_xdp, wait_for_signal};
use crate::{
    config::TerminalConfig,
    datapath::{self, Maps},
    ebpf,
    membership::PeerTable,
    net::{Iface, Net, poke_neighbor, sysctl, udp_socket},
    proto::{self, Body, Counter, Guard, LinkAd, Msg, Reply, flags},
};

/// How often next hops are re-resolved and link counters read.
const REFRESH: Duration = Duration::from_millis(200);
/// Clock skew tolerated in control messages.
const SKEW_MS: u64 = 30_000;
/// How long a departing terminal keeps relaying after its SHUTDOWN.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);
/// Route metric base for the per-link host routes to the server.
const METRIC_BASE: u32 = 4200;

/// One of this host's WAN links.
struct Own {
    ad: LinkAd,
    iface: Iface,
    gateway: Ipv4Addr,
    entry: UpLink,
    relay: RelayLink,
    sock: Arc<UdpSocket>,
}

/// Where a received control message came from.
#[derive(Clone, Copy, Debug)]
enum From {
    Lan,
    Link,
}

struct Agent {
    cfg: TerminalConfig,
    net: Net,
    maps: Maps,
    lan: Iface,
    lan_ip: Ipv4Addr,
    map_cfg: TerminalMap,
    own: Vec<Own>,
    peers: PeerTable,
    /// Peer links written to T_UP_LINKS: id -> (owner, entry).
    peer_links: BTreeMap<u8, (Ipv4Addr, UpLink)>,
    /// Peer MACs written to T_NEIGH.
    neighbors: HashMap<Ipv4Addr, [u8; 6]>,
    token: Option<u64>,
    counter: Counter,
    guard: Guard,
    lan_sock: Arc<UdpSocket>,
    schedule: Option<Vec<(u8, u32)>>,
    /// DATA_DOWN packets seen per link at the last refresh.
    down_seen: HashMap<u8, u64>,
    rejects: Rejects,
    interval: Duration,
}

pub async fn run(cfg: TerminalConfig, dir: &Path) -> Result<()> {
    let net = Net::new()?;
    let lan = net.iface(&cfg.lan).await.context("field `lan`")?;
    let lan_ip = net.ipv4(&lan).await.context("field `lan`")?;

    let mut ebpf = datapath::load(ebpf::TERMINAL, dir)?;
    let maps = Maps::new(dir);
    let map_cfg = TerminalMap {
        token: 0,
        lan_ip: u32::from(lan_ip),
        server_ip: u32::from(cfg.server.address),
        lan_ifindex: lan.index,
        community: cfg.community,
        data_port: cfg.data_port,
        server_port: cfg.server.port,
        lan_mac: lan.mac,
    };
    maps.set_terminal_config(map_cfg)?;

    let mut own = Vec::new();
    let mut path_mtu = lan.mtu;
    for (i, l) in cfg.links.iter().enumerate() {
        let field = || format!("field `links[{i}].interface`");
        let wan = net.iface(&l.interface).await.with_context(field)?;
        let wan_ip = net.ipv4(&wan).await.with_context(field)?;
        let mtu = l.mtu.map_or(wan.mtu, u32::from);
        path_mtu = path_mtu.min(mtu);
        let gateway = l.gateway.unwrap_or(cfg.server.address);
        sysctl(&format!("net.ipv4.conf.{}.rp_filter", l.interface), "2")?;
        // Control messages for the server leave by this link: a socket
        // tied to the interface, and a route to the server over it.
        net.host_route_via(
            cfg.server.address,
            gateway,
            wan.index,
            METRIC_BASE + u32::from(l.id),
        )
        .await?;
        let sock = udp_socket(SocketAddrV4::new(wan_ip, l.port), Some(&l.interface))
            .with_context(|| format!("field `links[{i}].port`"))?;
        own.push(Own {
            ad: LinkAd {
                id: l.id,
                port: l.port,
                up: l.up(),
                down: l.down(),
            },
            entry: UpLink {
                ifindex: wan.index,
                src_ip: u32::from(wan_ip),
                dst_ip: u32::from(cfg.server.address),
                src_port: l.port,
                dst_port: cfg.server.port,
                src_mac: wan.mac,
                dst_mac: [0; 6],
                mtu: mtu as u16,
                flags: 0,
                _pad: 0,
            },
            relay: RelayLink {
                wan_ifindex: wan.index,
                wan_ip: u32::from(wan_ip),
                link: l.id,
                _pad: 0,
                port: l.port,
                wan_mac: wan.mac,
                gw_mac: [0; 6],
                mtu: mtu as u16,
                _pad2: [0; 2],
            },
            iface: wan,
            gateway,
            sock: Arc::new(sock),
        });
    }
    sysctl(&format!("net.ipv4.conf.{}.rp_filter", cfg.lan), "2")?;
    let lan_sock = udp_socket(
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.data_port),
        Some(&cfg.lan),
    )
    .context("field `data_port`")?;

    // bond0: sized so a wrapped packet fits the smallest path.
    let capture_mtu = path_mtu - OUTER_LEN as u32;
    let dev = net.create_capture(&cfg.device, capture_mtu).await?;
    let mut agent = Agent {
        interval: Duration::from_millis(u64::from(cfg.announce_ms)),
        peers: PeerTable::new(cfg.misses),
        cfg,
        net,
        maps,
        lan,
        lan_ip,
        map_cfg,
        own,
        peer_links: BTreeMap::new(),
        neighbors: HashMap::new(),
        token: None,
        counter: Counter::new(),
        guard: Guard::new(SKEW_MS),
        lan_sock: Arc::new(lan_sock),
        schedule: None,
        down_seen: HashMap::new(),
        rejects: Rejects::default(),
    };
    let result = async {
        let wrap: &mut SchedClassifier = ebpf
            .program_mut("bond_wrap")
            .context("bond_wrap missing")?
            .try_into()?;
        wrap.load()?;
        wrap.attach(&agent.cfg.device, TcAttachType::Egress)
            .with_context(|| format!("attaching bond_wrap to {}", agent.cfg.device))?;
        attach_xdp(&mut ebpf, "bond_terminal", &agent.cfg.lan)?;
        for l in &agent.cfg.links {
            attach_xdp(&mut ebpf, "bond_terminal", &l.interface)?;
        }
        for p in &agent.cfg.capture {
            agent.net.route_to(p.addr, p.len, dev.index, lan_ip).await?;
        }
        eprintln!(
            "bond-ctl: terminal {lan_ip} up: community {}, {} own link(s), {} mtu {capture_mtu}, announcing every {} ms",
            agent.cfg.community,
            agent.own.len(),
            agent.cfg.device,
            agent.cfg.announce_ms,
        );
        agent.run().await
    }
    .await;
    // Leave the host as found: SHUTDOWN, no capture device, no routes.
    agent.shutdown().await;
    let _ = agent.net.delete(&agent.cfg.device).await;
    for o in &agent.own {
        let _ = agent
            .net
            .delete_host_route(
                agent.cfg.server.address,
                o.gateway,
                o.iface.index,
                METRIC_BASE + u32::from(o.ad.id),
            )
            .await;
    }
    result
}

impl Agent {
    async fn run(&mut self) -> Result<()> {
        let (tx, mut rx) = mpsc::channel::<(From, Vec<u8>, SocketAddr)>(1024);
        spawn_reader(self.lan_sock.clone(), From::Lan, tx.clone());
        for o in &self.own {
            spawn_reader(o.sock.clone(), From::Link, tx.clone());
        }
        let mut announce = tokio::time::interval(self.interval);
        let mut refresh = tokio::time::interval(REFRESH);
        let stop = wait_for_signal();
        tokio::pin!(stop);
        loop {
            let deadline = self
                .peers
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = &mut stop => return r,
                _ = announce.tick() => self.announce().await,
                _ = refresh.tick() => self.refresh().await?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let gone = self.peers.expire(Instant::now());
                    if !gone.is_empty() {
                        eprintln!("bond-ctl: peer(s) {gone:?} missed {} announces: dropped", self.cfg.misses);
                        self.apply_peers().await?;
                    }
                }
                Some((from, buf, src)) = rx.recv() => self.receive(from, &buf, src).await?,
            }
        }
    }

    fn sign(&mut self, body: Body, link: u8, flags: u8, token: u64) -> Vec<u8> {
        Msg {
            community: self.cfg.community,
            origin: self.lan_ip,
            link,
            flags,
            token,
            time_ms: proto::now_ms(),
            counter: self.counter.bump(),
            body,
        }
        .encode(self.cfg.key.bytes())
    }

    fn announce_body(&self) -> Body {
        Body::Announce {
            interval_ms: self.cfg.announce_ms,
            links: self.own.iter().map(|o| o.ad).collect(),
        }
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            self.cfg.server.address,
            self.cfg.server.port,
        ))
    }

    /// Every interval: ACTIVE to the LAN, and to the server over each own
    /// link (or through a peer); a LOGIN instead while not logged on.
    async fn announce(&mut self) {
        let lan = self.sign(self.announce_body(), 0, 0, 0);
        let bcast = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.data_port));
        let _ = self.lan_sock.send_to(&lan, bcast).await;
        match self.token {
            None => self.send_to_server(Body::Login, false).await,
            Some(_) => self.send_to_server(self.announce_body(), true).await,
        }
    }

    /// Sends to the server: over each own link (`every`) or the first, or
    /// else through a LAN peer that has links.
    async fn send_to_server(&mut self, body: Body, every: bool) {
        let token = self.token.unwrap_or(0);
        let server = self.server();
        if !self.own.is_empty() {
            for i in 0..self.own.len() {
                let id = self.own[i].ad.id;
                let m = self.sign(body.clone(), id, flags::VIA_LINK, token);
                if let Err(e) = self.own[i].sock.send_to(&m, server).await {
                    self.rejects.count("send_failed");
                    eprintln!("bond-ctl: link {id}: sending to the server: {e}");
                }
                if !every {
                    break;
                }
            }
            return;
        }
        let relay = self
            .peers
            .peers()
            .find(|(_, p)| !p.links.is_empty())
            .map(|(ip, _)| ip);
        match relay {
            Some(ip) => {
                let m = self.sign(body, 0, flags::RELAY, token);
                let to = SocketAddr::V4(SocketAddrV4::new(ip, self.cfg.data_port));
                let _ = self.lan_sock.send_to(&m, to).await;
            }
            None => self.rejects.count("no_way_to_server"),
        }
    }

    /// SHUTDOWN to the LAN and the server, then a grace period in which
    /// this host still relays: packets already on their way to its links
    /// get through while everyone takes the links out of use.
    async fn shutdown(&mut self) {
        let lan = self.sign(Body::Shutdown, 0, 0, 0);
        let bcast = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.data_port));
        let _ = self.lan_sock.send_to(&lan, bcast).await;
        if self.token.is_some() {
            self.send_to_server(Body::Shutdown, false).await;
        }
        if !self.own.is_empty() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    }

    async fn receive(&mut self, from: From, buf: &[u8], src: SocketAddr) -> Result<()> {
        let SocketAddr::V4(src) = src else {
            return Ok(());
        };
        let community = self.cfg.community;
        let key = self.cfg.key.bytes();
        let msg = match self.guard.open(buf, |c| (c == community).then_some(key)) {
            Ok(m) => m,
            Err(why) => {
                self.rejects.count(why);
                return Ok(());
            }
        };
        let now = Instant::now();
        match (from, &msg.body) {
            // The server's answer: over our link, or passed on by the peer
            // that relayed our LOGIN.
            (_, Body::LoginReply(r)) if msg.origin == self.lan_ip => {
                if matches!(from, From::Link) && *src.ip() != self.cfg.server.address {
                    self.rejects.count("reply_not_from_server");
                    return Ok(());
                }
                self.login_reply(r)?;
            }
            // For the server, from a peer without links of its own.
            (From::Lan, _) if msg.flags & flags::RELAY != 0 => {
                if let Some(o) = self.own.iter().find(|o| o.entry.flags & LINK_VALID != 0) {
                    let _ = o.sock.send_to(buf, self.server()).await;
                } else {
                    self.rejects.count("cannot_relay");
                }
            }
            (From::Lan, _) if msg.origin == self.lan_ip => {} // our own broadcast
            (From::Lan, _) if *src.ip() != msg.origin => self.rejects.count("origin_mismatch"),
            (From::Lan, Body::Announce { interval_ms, links }) => {
                let interval = Duration::from_millis(u64::from(*interval_ms));
                if self.peers.announce(msg.origin, interval, links, now) {
                    eprintln!("bond-ctl: peer {} announces links {links:?}", msg.origin);
                    self.apply_peers().await?;
                }
            }
            (From::Lan, Body::Shutdown) => {
                if self.peers.shutdown(msg.origin) {
                    eprintln!("bond-ctl: peer {} shut down", msg.origin);
                    self.apply_peers().await?;
                }
            }
            // A reply for a peer we relayed for: back to it over the LAN.
            (From::Link, Body::LoginReply(_)) if *src.ip() == self.cfg.server.address => {
                let to = SocketAddr::V4(SocketAddrV4::new(msg.origin, self.cfg.data_port));
                let _ = self.lan_sock.send_to(buf, to).await;
            }
            _ => self.rejects.count("unexpected"),
        }
        Ok(())
    }

    fn login_reply(&mut self, r: &Reply) -> Result<()> {
        match *r {
            Reply::Ok { token, port } => {
                if self.token != Some(token) || self.map_cfg.server_port != port {
                    eprintln!(
                        "bond-ctl: logged on to {} (port {port})",
                        self.cfg.server.address
                    );
                }
                self.token = Some(token);
                self.map_cfg.token = token;
                self.map_cfg.server_port = port;
                self.maps.set_terminal_config(self.map_cfg)?;
                for o in &mut self.own {
                    if o.entry.dst_port != port {
                        o.entry.dst_port = port;
                        if o.entry.flags & LINK_VALID != 0 {
                            self.maps.set_up_link(o.ad.id, o.entry)?;
                        }
                    }
                }
            }
            Reply::NeedLogin => {
                eprintln!("bond-ctl: the server asks for a new login");
                self.token = None;
            }
        }
        Ok(())
    }

    /// Re-resolves next hops, reads the links' counters (traffic from a
    /// peer's link is a sign of that peer's life), and rewrites what changed.
    async fn refresh(&mut self) -> Result<()> {
        for o in &mut self.own {
            match self.net.neighbor(o.iface.index, o.gateway).await? {
                Some(mac) if mac != o.entry.dst_mac || o.entry.flags & LINK_VALID == 0 => {
                    o.entry.dst_mac = mac;
                    o.entry.flags = LINK_VALID;
                    o.relay.gw_mac = mac;
                    self.maps.set_up_link(o.ad.id, o.entry)?;
                    self.maps.set_relay_link(o.ad.port, o.relay)?;
                }
                Some(_) => {}
                None => {
                    let _ = poke_neighbor(&o.iface.name, o.gateway);
                }
            }
        }
        let now = Instant::now();
        for (id, _, s) in self.maps.terminal_link_stats()? {
            let seen = self.down_seen.insert(id, s.down_pkts).unwrap_or(0);
            if s.down_pkts > seen
                && let Some((owner, _)) = self.peer_links.get(&id)
            {
                self.peers.heard(*owner, now);
            }
        }
        self.apply_peers().await
    }

    /// Brings T_NEIGH, T_UP_LINKS and the schedule in line with the peer
    /// table. A departed link leaves the schedule before its entry goes.
    async fn apply_peers(&mut self) -> Result<()> {
        let live: Vec<Ipv4Addr> = self.peers.peers().map(|(ip, _)| ip).collect();
        for ip in &live {
            match self.net.neighbor(self.lan.index, *ip).await? {
                Some(mac) if self.neighbors.get(ip) != Some(&mac) => {
                    self.maps.set_neighbor(*ip, mac)?;
                    self.neighbors.insert(*ip, mac);
                }
                Some(_) => {}
                None => {
                    let _ = poke_neighbor(&self.lan.name, *ip);
                }
            }
        }
        let mut usable: Vec<(u8, u32)> = self
            .own
            .iter()
            .filter(|o| o.entry.flags & LINK_VALID != 0)
            .map(|o| (o.ad.id, o.ad.up))
            .collect();
        let mut want: BTreeMap<u8, (Ipv4Addr, UpLink)> = BTreeMap::new();
        for (ip, p) in self.peers.peers() {
            let Some(mac) = self.neighbors.get(&ip) else {
                continue;
            };
            for l in &p.links {
                if self.own.iter().any(|o| o.ad.id == l.id) || want.contains_key(&l.id) {
                    self.rejects.count("link_id_clash");
                    continue;
                }
                usable.push((l.id, l.up));
                want.insert(
                    l.id,
                    (
                        ip,
                        UpLink {
                            ifindex: self.lan.index,
                            src_ip: u32::from(self.lan_ip),
                            dst_ip: u32::from(ip),
                            src_port: self.cfg.data_port,
                            dst_port: l.port,
                            src_mac: self.lan.mac,
                            dst_mac: *mac,
                            // A peer's WAN MTU is its business; the LAN hop
                            // must fit.
                            mtu: self.lan.mtu as u16,
                            flags: LINK_VALID,
                            _pad: 0,
                        },
                    ),
                );
            }
        }
        for (id, (_, e)) in &want {
            if self.peer_links.get(id).map(|(_, old)| old) != Some(e) {
                self.maps.set_up_link(*id, *e)?;
            }
        }
        usable.sort_unstable();
        if self.schedule.as_ref() != Some(&usable) {
            self.maps.set_up_schedule(&usable)?;
            eprintln!("bond-ctl: upstream schedule: {usable:?} (link, weight)");
            self.schedule = Some(usable);
        }
        for id in self.peer_links.keys() {
            if !want.contains_key(id) {
                self.maps.clear_up_link(*id)?;
            }
        }
        self.peer_links = want;
        for ip in self.neighbors.keys().copied().collect::<Vec<_>>() {
            if !live.contains(&ip) {
                self.maps.remove_neighbor(ip)?;
                self.neighbors.remove(&ip);
            }
        }
        Ok(())
    }
}

fn spawn_reader(sock: Arc<UdpSocket>, from: From, tx: mpsc::Sender<(From, Vec<u8>, SocketAddr)>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            match sock.recv_from(&mut buf).await {
                Ok((n, src)) => {
                    if tx.send((from, buf[..n].to_vec(), src)).await.is_err() {
                        return;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
}
