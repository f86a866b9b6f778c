//! The server agent: logs terminals on, learns each community's links from
//! their announces, expires the silent ones, and writes sessions, links and
//! downstream schedules to the maps.

use std::{
    collections::{BTreeMap, HashMap},
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bond_common::maps::{LINK_VALID, ServerConfig as ServerMap, ServerLink};
use tokio::net::UdpSocket;

use super::{Rejects, attach_xdp, wait_for_signal};
use crate::{
    config::ServerConfig,
    datapath::{self, Maps},
    ebpf,
    membership::{Refusal, ServerTable},
    net::{sysctl, udp_socket},
    proto::{self, Body, Counter, Guard, Msg, Reply, flags},
};

const SKEW_MS: u64 = 30_000;

struct Agent {
    cfg: ServerConfig,
    maps: Maps,
    keys: HashMap<u16, Vec<u8>>,
    table: ServerTable,
    guard: Guard,
    counter: Counter,
    sock: UdpSocket,
    /// Links written to the maps: (community, link id) -> (index, entry).
    applied: BTreeMap<(u16, u8), (u32, ServerLink)>,
    free_idx: Vec<u32>,
    next_idx: u32,
    rejects: Rejects,
}

pub async fn run(cfg: ServerConfig, dir: &Path) -> Result<()> {
    let (lo, hi) = cfg
        .port_range()
        .map_err(anyhow::Error::msg)
        .context("field `nat_ports`")?;
    let mut ebpf = datapath::load(ebpf::SERVER, dir)?;
    let maps = Maps::new(dir);
    maps.set_server_config(ServerMap {
        wan_ip: u32::from(cfg.address),
        nat_ip: u32::from(cfg.nat_address),
        port: cfg.port,
        port_min: lo,
        port_max: hi,
        _pad: 0,
    })?;
    let pushed = maps.push_free_ports(lo..=hi)?;

    // Forwarding for the slow path, which hands the kernel packets whose
    // source is one of our own addresses; the dedicated ports are kept from
    // the host's own sockets.
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.ipv4.ip_local_reserved_ports", &format!("{lo}-{hi}"))?;
    for i in &cfg.interfaces {
        sysctl(&format!("net.ipv4.conf.{i}.accept_local"), "1")?;
        sysctl(&format!("net.ipv4.conf.{i}.rp_filter"), "0")?;
        attach_xdp(&mut ebpf, "bond_server", i)
            .with_context(|| format!("field `interfaces`: {i}"))?;
    }
    let sock = udp_socket(SocketAddrV4::new(cfg.address, cfg.port), None)
        .context("fields `address`, `port`")?;
    eprintln!(
        "bond-ctl: server {}:{} up: {} communities, {pushed} dedicated ports {lo}-{hi} on {}",
        cfg.address,
        cfg.port,
        cfg.communities.len(),
        cfg.nat_address
    );
    let mut agent = Agent {
        keys: cfg
            .communities
            .iter()
            .map(|c| (c.id, c.key.bytes().to_vec()))
            .collect(),
        table: ServerTable::new(cfg.misses),
        guard: Guard::new(SKEW_MS),
        counter: Counter::new(),
        sock,
        applied: BTreeMap::new(),
        free_idx: Vec::new(),
        next_idx: 0,
        rejects: Rejects::default(),
        cfg,
        maps,
    };
    agent.run().await
}

impl Agent {
    async fn run(&mut self) -> Result<()> {
        let stop = wait_for_signal();
        tokio::pin!(stop);
        let mut buf = vec![0u8; 2048];
        loop {
            let deadline = self
                .table
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = &mut stop => return r,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let ch = self.table.expire(Instant::now());
                    for (c, o) in &ch.sessions_gone {
                        eprintln!("bond-ctl: community {c}: terminal {o} silent: session closed");
                        self.maps.remove_session(*c, *o)?;
                        self.guard.forget(*c, *o);
                    }
                    for c in ch.communities {
                        self.apply(c)?;
                    }
                }
                r = self.sock.recv_from(&mut buf) => {
                    let Ok((n, SocketAddr::V4(src))) = r else { continue };
                    let msg = buf[..n].to_vec();
                    self.receive(&msg, src).await?;
                }
            }
        }
    }

    async fn receive(&mut self, buf: &[u8], src: SocketAddrV4) -> Result<()> {
        let keys = &self.keys;
        let msg = match self.guard.open(buf, |c| keys.get(&c).map(Vec::as_slice)) {
            Ok(m) => m,
            Err(why) => {
                self.rejects.count(why);
                return Ok(());
            }
        };
        let now = Instant::now();
        let (c, o) = (msg.community, msg.origin);
        match &msg.body {
            Body::Login => {
                let (token, new) =
                    self.table
                        .login(c, o, Duration::from_secs(60), now, fresh_token);
                if new {
                    self.maps.set_session(c, o, token)?;
                    eprintln!("bond-ctl: community {c}: terminal {o} logged on");
                }
                let port = self.cfg.port;
                self.reply(&msg, Reply::Ok { token, port }, src).await;
            }
            Body::Announce { interval_ms, links } => {
                let via = (msg.flags & flags::VIA_LINK != 0).then_some((msg.link, src));
                let interval = Duration::from_millis(u64::from(*interval_ms));
                match self
                    .table
                    .announce(c, o, msg.token, via, interval, links, now)
                {
                    Ok(true) => self.apply(c)?,
                    Ok(false) => {}
                    Err(Refusal::NeedLogin) => {
                        self.rejects.count("need_login");
                        self.reply(&msg, Reply::NeedLogin, src).await;
                    }
                    Err(Refusal::LinkTaken { owner }) => {
                        self.rejects.count("link_taken");
                        eprintln!(
                            "bond-ctl: community {c}: {o} announces link {} of {owner}: refused",
                            msg.link
                        );
                    }
                    Err(Refusal::UnknownLink) => self.rejects.count("unknown_link"),
                }
            }
            Body::Shutdown => {
                if self.table.shutdown(c, o, msg.token) {
                    eprintln!("bond-ctl: community {c}: terminal {o} shut down");
                    self.apply(c)?;
                    self.maps.remove_session(c, o)?;
                    self.guard.forget(c, o);
                } else {
                    self.rejects.count("shutdown_without_session");
                }
            }
            Body::LoginReply(_) => self.rejects.count("unexpected"),
        }
        Ok(())
    }

    async fn reply(&mut self, to: &Msg, r: Reply, src: SocketAddrV4) {
        let Some(key) = self.keys.get(&to.community) else {
            return;
        };
        let m = Msg {
            community: to.community,
            origin: to.origin,
            link: to.link,
            flags: 0,
            token: 0,
            time_ms: proto::now_ms(),
            counter: self.counter.bump(),
            body: Body::LoginReply(r),
        }
        .encode(key);
        if self.sock.send_to(&m, src).await.is_err() {
            self.rejects.count("send_failed");
        }
    }

    /// Writes a community's live links and downstream schedule. New links
    /// get an index before the schedule names them; departed ones leave the
    /// schedule before their entry is cleared.
    fn apply(&mut self, community: u16) -> Result<()> {
        let rows = self.table.links(Some(community), Instant::now());
        let mut weights = Vec::new();
        let mut keep = Vec::new();
        for r in &rows {
            let entry = ServerLink {
                ip: u32::from(*r.addr.ip()),
                port: r.addr.port(),
                community,
                link: r.link,
                flags: LINK_VALID,
                _pad: [0; 2],
            };
            let idx = match self.applied.get(&(community, r.link)) {
                Some((idx, old)) => {
                    if *old != entry {
                        self.maps.set_server_link(*idx, entry)?;
                    }
                    *idx
                }
                None => {
                    let idx = self.free_idx.pop().unwrap_or_else(|| {
                        self.next_idx += 1;
                        self.next_idx - 1
                    });
                    self.maps.set_server_link(idx, entry)?;
                    idx
                }
            };
            self.applied.insert((community, r.link), (idx, entry));
            weights.push((idx, r.down));
            keep.push(r.link);
        }
        self.maps.set_down_schedule(community, &weights)?;
        eprintln!(
            "bond-ctl: community {community}: downstream links {:?} (link, weight)",
            rows.iter().map(|r| (r.link, r.down)).collect::<Vec<_>>()
        );
        let gone: Vec<(u16, u8)> = self
            .applied
            .range((community, 0)..=(community, u8::MAX))
            .filter(|((_, l), _)| !keep.contains(l))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            if let Some((idx, _)) = self.applied.remove(&k) {
                self.maps.clear_server_link(idx)?;
                self.free_idx.push(idx);
            }
        }
        Ok(())
    }
}

/// A session token nobody can guess; never zero (zero means "none").
fn fresh_token() -> u64 {
    loop {
        match getrandom::u64() {
            Ok(0) => continue,
            Ok(t) => return t,
            Err(e) => panic!("the kernel's random source failed: {e}"),
        }
    }
}
