//! The server agent: logs terminals on, learns each community's links from
//! their announces, expires the silent ones, writes sessions, links and
//! downstream schedules to the maps, and measures and serves trains for
//! terminals that weigh their links by measurement.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bond_common::{
    edpf::{DEFAULT_BACKLOG_US, PATH_USABLE, Paths},
    maps::{LINK_VALID, ServerConfig as ServerMap, ServerLink, name},
};
use serde_json::Value;
use tokio::{
    net::UdpSocket,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{Exit, Pins, Tally, wait_for_signal};
use bond_api::{
    Call, Metrics, Request,
    reply::{
        CommunityStatus, Detached, DownPath, LinkRow, Peers, Reloaded, ServerStatus, Status,
        TerminalRow,
    },
};
use bond_config::{Config, ServerConfig};
use bond_datapath::{
    self as datapath, Maps, ebpf,
    flows::{self, FlowTable},
};

use crate::{
    feedback::{self, Corrector, Model},
    membership::{Refusal, ServerTable},
    net::{Net, hold_name, recv_stamped, sysctl, timestamp_arrivals, udp_socket},
    pathmon::{self, EchoSeen},
    playout,
    probe::{PROBE_FRAME_LEN, PROBE_LEN, TRAIN_LEN, TrainRx},
    resend,
};
use bond_proto::{
    CommunityKey,
    control::{Body, Counter, Gap, Guard, LinkAd, Msg, Reply, flags},
};

/// How often the server looks for links whose echoes stopped.
const DARK_CHECK: Duration = Duration::from_millis(20);
/// An upstream train is measured this long after its first packet even if
/// its last never came.
const TRAIN_WAIT: Duration = Duration::from_millis(500);
/// Downstream trains per link are sent at most this often.
const TRAIN_MIN_GAP: Duration = Duration::from_millis(200);
/// Terminals found in the maps at adoption are taken as announcing this
/// often until they announce themselves.
const ADOPT_INTERVAL: Duration = Duration::from_secs(2);

/// An upstream train being received: (community, origin, link, train).
type TrainKey = (u16, Ipv4Addr, u8, u32);

struct Agent {
    cfg: ServerConfig,
    maps: Maps,
    keys: HashMap<u16, CommunityKey>,
    table: ServerTable,
    guard: Guard,
    counter: Counter,
    sock: UdpSocket,
    /// Links written to the maps: (community, link id) -> (index, entry).
    applied: BTreeMap<(u16, u8), (u32, ServerLink)>,
    free_idx: Vec<u32>,
    next_idx: u32,
    rejects: Tally,
    /// Steps that failed and were survived.
    faults: Tally,
    /// Upstream trains in flight, with when they started and where the
    /// report goes.
    trains: HashMap<TrainKey, (TrainRx, Instant, SocketAddrV4)>,
    /// When each (community, link) last got a downstream train.
    sent_trains: HashMap<(u16, u8), Instant>,
    /// When each (community, link) last brought its owner's echo, and
    /// whether it is dark for missing them (`crate::pathmon`).
    echoes: HashMap<(u16, u8), EchoSeen>,
    adopted: bool,
    started: Instant,
    /// How each program is attached, by (hook, interface).
    attached: std::collections::BTreeMap<(&'static str, String), &'static str>,
    /// The flow table as of the last sweep (for `status` and metrics).
    pub flows: FlowTable,
    /// S_CONFIG as written; its `link_mtu` follows the links.
    map_cfg: ServerMap,
    /// The smallest MTU each community announced for its live links.
    community_mtu: HashMap<u16, u16>,
    /// The configuration file, read again on `reload` and SIGHUP.
    path: PathBuf,
    /// The upstream playout, unless the configuration turns it off.
    playout: Option<playout::Handle>,
    /// Keeps the downstream schedules true from the origins' feedback.
    corrector: Corrector,
    /// What origins asked to be sent again, and what was.
    resends: resend::Resend,
    /// Relative delays (ns) of the links found at adoption, by community
    /// and link index, used until each link's owner announces again.
    adopted_delay: HashMap<(u16, u32), u32>,
}

pub async fn run(
    cfg: ServerConfig,
    path: &Path,
    pins: &mut Pins,
    calls: mpsc::Receiver<Call>,
) -> Result<Exit> {
    let (lo, hi) = cfg
        .port_range()
        .map_err(anyhow::Error::msg)
        .context("field `nat_ports`")?;
    let ports = u32::from(hi - lo) + 1;
    let sizes = flows::server_map_sizes(cfg.flows.table_size(ports), ports, cfg.max_terminals);
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
    };
    maps.set_server_config(map_cfg)?;
    // An adopted queue holds the ports no flow has: filling it again
    // would hand one port to two flows.
    let pushed = if pins.adopted {
        0
    } else {
        maps.push_free_ports(lo..=hi)?
    };

    // Forwarding for the slow path, which hands the kernel packets whose
    // source is one of our own addresses; the dedicated ports are kept from
    // the host's own sockets.
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.ipv4.ip_local_reserved_ports", &format!("{lo}-{hi}"))?;
    let net = Net::new()?;
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
        let (tap, dev) = playout::hold_device(&net, &name, "0").await?;
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
    let sock = udp_socket(SocketAddrV4::new(cfg.address, cfg.port), None)
        .context("fields `address`, `port`")?;
    timestamp_arrivals(&sock)?;
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
            .map(|c| (c.id, c.key.clone()))
            .collect(),
        table: ServerTable::new(cfg.misses),
        guard: Guard::new(bond_proto::SKEW_MS),
        counter: Counter::new(),
        sock,
        applied: BTreeMap::new(),
        free_idx: Vec::new(),
        next_idx: 0,
        rejects: Tally::rejects(),
        faults: Tally::faults(),
        trains: HashMap::new(),
        sent_trains: HashMap::new(),
        echoes: HashMap::new(),
        adopted: pins.adopted,
        started: Instant::now(),
        attached: pins.attached.clone(),
        flows: FlowTable::new(u64::from(ports)),
        map_cfg,
        community_mtu: HashMap::new(),
        path: path.to_path_buf(),
        playout,
        corrector: Corrector::start(maps.clone())?,
        resends: resend::Resend::default(),
        adopted_delay: HashMap::new(),
        cfg,
        maps,
    };
    if agent.adopted {
        agent.adopt()?;
    }
    agent.run(calls, feedback).await
}

impl Agent {
    /// The server's index of link `link` of community `c`, if origin `o`
    /// announced it and `src` is its address: where echoes are answered
    /// and trains sent, so nobody can aim them elsewhere.
    fn owned_link(&self, c: u16, link: u8, o: Ipv4Addr, src: SocketAddrV4) -> Option<u32> {
        let (idx, l) = self.applied.get(&(c, link))?;
        (l.owner == u32::from(o) && (l.ip, l.port) == (u32::from(*src.ip()), src.port()))
            .then_some(*idx)
    }

    /// The ways to origin `o` of community `c`: its own lit link, and a
    /// lit link of a peer, which passes messages on over the LAN.
    fn ways_to(&self, c: u16, o: Ipv4Addr) -> [Option<(u8, SocketAddrV4)>; 2] {
        let lit = || {
            self.applied
                .range((c, 0)..=(c, u8::MAX))
                .filter(|(k, _)| !self.echoes.get(k).is_some_and(|e| e.dark))
                .map(|(&(_, id), &(_, l))| (id, l))
        };
        let to = |(id, l): (u8, ServerLink)| (id, SocketAddrV4::new(Ipv4Addr::from(l.ip), l.port));
        let own = lit().find(|(_, l)| l.owner == u32::from(o)).map(to);
        let peer = lit().find(|(_, l)| l.owner != u32::from(o)).map(to);
        [own, peer]
    }

    /// Tells origin `o` of community `c` what its upstream packets met on
    /// each link: both ways ([`Self::ways_to`]; either alone where there
    /// is no other), because a report lost with a link that went dark
    /// would hide that it did (`crate::feedback`).
    async fn send_feedback(&mut self, ((c, o), links, shared): playout::Feedback) {
        let o = Ipv4Addr::from(o);
        for (id, to) in self.ways_to(c, o).into_iter().flatten() {
            self.send(
                (c, o, id),
                Body::Feedback {
                    links: links.clone(),
                    shared: shared.clone(),
                },
                to,
            )
            .await;
        }
    }

    /// Asks origin `o` of community `c` for the packets its links lost
    /// upstream (`crate::resend`): one way, its own link first.
    async fn ask_resend(&mut self, (c, o): playout::Sender, gaps: Vec<Gap>) {
        let o = Ipv4Addr::from(o);
        let [own, peer] = self.ways_to(c, o);
        if let Some((id, to)) = own.or(peer) {
            self.send((c, o, id), Body::Resend { gaps }, to).await;
        }
    }

    async fn run(
        &mut self,
        mut calls: mpsc::Receiver<Call>,
        mut playout_reports: playout::ReportRx,
    ) -> Result<Exit> {
        let stop = wait_for_signal();
        tokio::pin!(stop);
        let mut buf = vec![0u8; 2048];
        let mut trains = tokio::time::interval(TRAIN_WAIT / 5);
        let mut dark_check = tokio::time::interval(DARK_CHECK);
        dark_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (swept_tx, mut swept) = mpsc::channel(1);
        let mut sweeping = false;
        let mut sweep = tokio::time::interval(self.cfg.flows.sweep());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            if sweep.period() != self.cfg.flows.sweep() {
                sweep = tokio::time::interval(self.cfg.flows.sweep());
                sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            let deadline = self
                .table
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = &mut stop => return r.map(|()| Exit::Leave),
                _ = hangup.recv() => {
                    if let Err(e) = self.reload() {
                        eprintln!("bond-ctl: SIGHUP: {e}");
                    }
                }
                Some(call) = calls.recv() => {
                    let detach = call.req == Request::Detach;
                    let answer = self.handle(call.req);
                    let _ = call.reply.send(answer);
                    if detach {
                        return Ok(Exit::Detach);
                    }
                }
                _ = trains.tick() => self.finish_trains(false).await,
                Some(report) = playout_reports.recv() => match report {
                    playout::Report::Feedback(feedback) => self.send_feedback(feedback).await,
                    playout::Report::Resend(sender, gaps) => self.ask_resend(sender, gaps).await,
                },
                _ = dark_check.tick() => {
                    let r = self.check_dark();
                    self.faults.survive("apply_links", r);
                }
                // The sweep walks the whole table (a second for a full
                // one): on a thread of its own, never in this loop, where
                // it would hold up announces and their deadlines.
                _ = sweep.tick(), if !sweeping => {
                    sweeping = true;
                    let (maps, timeouts, tx) =
                        (self.maps.clone(), self.cfg.flows.timeouts(), swept_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.blocking_send(flows::sweep_counted(
                            &maps,
                            &timeouts,
                            flows::monotonic_ns(),
                        ));
                    });
                }
                Some(result) = swept.recv() => {
                    sweeping = false;
                    match result {
                        Ok((r, by_community)) => {
                            self.flows.record(&r);
                            self.flows.by_community = by_community;
                            if r.removed() > 0 {
                                eprintln!(
                                    "bond-ctl: expired {} flow(s) (tcp {}, udp {}, icmp {}); {} ports free",
                                    r.removed(), r.tcp, r.udp, r.icmp, self.flows.free_ports
                                );
                            }
                        }
                        // A failed map call leaves the flows for the next sweep.
                        Err(e) => eprintln!("bond-ctl: flow sweep: {e}"),
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let ch = self.table.expire(Instant::now());
                    for (c, o) in &ch.sessions_gone {
                        eprintln!("bond-ctl: community {c}: terminal {o} silent: session closed");
                        let r = self.maps.remove_session(*c, *o);
                        self.faults.survive("remove_session", r.map_err(Into::into));
                    }
                    for c in ch.communities {
                        let r = self.apply(c);
                        self.faults.survive("apply_links", r);
                    }
                }
                r = recv_stamped(&self.sock, &mut buf) => {
                    let Ok((n, src, at_ns)) = r else { continue };
                    let msg = buf[..n].to_vec();
                    let r = self.receive(&msg, src, at_ns).await;
                    self.faults.survive("control_message", r);
                }
            }
        }
    }

    async fn receive(&mut self, buf: &[u8], src: SocketAddrV4, at_ns: u64) -> Result<()> {
        let keys = &self.keys;
        let msg = match self.guard.open(buf, |c| keys.get(&c)) {
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
                    if let Err(e) = self.maps.set_session(c, o, token) {
                        // No token the program does not know: the terminal
                        // is refused and tries again on its next announce.
                        self.table.shutdown(c, o, token);
                        if e.is_full() {
                            self.rejects.count("max_terminals");
                            return Ok(());
                        }
                        return Err(anyhow::Error::new(e)
                            .context(format!("community {c}: terminal {o}: login")));
                    }
                    eprintln!("bond-ctl: community {c}: terminal {o} logged on");
                }
                let port = self.cfg.port;
                let body = Body::LoginReply(Reply::Ok { token, port });
                self.send((c, o, msg.link), body, src).await;
            }
            Body::Announce { interval_ms, links } => {
                if msg.flags & flags::RESTARTING != 0 {
                    eprintln!("bond-ctl: community {c}: terminal {o} restarting its agent");
                    let own = links
                        .iter()
                        .filter(|l| self.table.owns(c, o, msg.token, l.id));
                    for l in own {
                        self.echoes
                            .entry((c, l.id))
                            .or_insert_with(|| EchoSeen::new(now))
                            .restarting(now);
                    }
                }
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
                        let body = Body::LoginReply(Reply::NeedLogin);
                        self.send((c, o, msg.link), body, src).await;
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
                } else {
                    self.rejects.count("shutdown_without_session");
                }
            }
            Body::Probe {
                train, seq, len, ..
            } if msg.flags & flags::VIA_LINK != 0 => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("probe_without_session");
                    return Ok(());
                }
                let key = (c, o, msg.link, *train);
                if !self.trains.contains_key(&key) {
                    // A new train on this link ends the one before it.
                    self.trains
                        .retain(|k, _| (k.0, k.1, k.2) != (c, o, msg.link));
                    if self.trains.len() >= 4096 {
                        self.rejects.count("too_many_trains");
                        return Ok(());
                    }
                    self.trains
                        .insert(key, (TrainRx::new(*train, TRAIN_LEN), Instant::now(), src));
                }
                let done = self
                    .trains
                    .get_mut(&key)
                    .is_some_and(|(rx, _, _)| rx.add(*seq, at_ns, usize::from(*len)));
                if done {
                    self.finish_train(key).await;
                }
            }
            Body::Feedback { links, .. } => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("feedback_without_session");
                    return Ok(());
                }
                for q in links {
                    if let Some((idx, _)) = self.applied.get(&(c, q.link)) {
                        self.corrector.report(feedback::Report {
                            model: Model::Down(c),
                            id: *idx,
                            queue: *q,
                        });
                    }
                }
            }
            Body::Resend { gaps } => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("resend_without_session");
                    return Ok(());
                }
                let r = self.resend(c, o, gaps).await;
                self.faults.survive("resend", r);
            }
            Body::Echo { sent_ns } if msg.flags & flags::VIA_LINK != 0 => {
                // From the link's owner, from the link's address: answered
                // there (the same size: no amplifier), and the link is alive.
                let known = self.owned_link(c, msg.link, o, src).is_some();
                if self.table.token(c, o) != Some(msg.token) || !known {
                    self.rejects.count("echo_refused");
                    return Ok(());
                }
                let body = Body::EchoReply { sent_ns: *sent_ns };
                self.send((c, o, msg.link), body, src).await;
                let seen = self
                    .echoes
                    .entry((c, msg.link))
                    .or_insert_with(|| EchoSeen::new(now));
                if seen.seen(now) {
                    eprintln!(
                        "bond-ctl: community {c}: link {} echoes again: back in use",
                        msg.link
                    );
                    self.apply(c)?;
                }
            }
            Body::ProbeRequest { train, count } if msg.flags & flags::VIA_LINK != 0 => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("probe_without_session");
                    return Ok(());
                }
                // Only to a link this terminal announced from that address,
                // and not too often: no amplifier for anyone.
                let idx = self.owned_link(c, msg.link, o, src);
                let now = Instant::now();
                let recent = self
                    .sent_trains
                    .get(&(c, msg.link))
                    .is_some_and(|t| now.duration_since(*t) < TRAIN_MIN_GAP);
                let Some(idx) = idx.filter(|_| !recent && *count <= TRAIN_LEN) else {
                    self.rejects.count("probe_request_refused");
                    return Ok(());
                };
                self.sent_trains.insert((c, msg.link), now);
                // The train queues at the link like data: the schedule
                // counts it, or the packets sent behind it arrive late.
                match self
                    .maps
                    .charge_down_path(c, idx, u32::from(*count), PROBE_FRAME_LEN)
                {
                    Ok(Some(left)) => self.corrector.probed(Model::Down(c), idx, left),
                    Ok(None) => {}
                    Err(e) => eprintln!("bond-ctl: charging a probe train: {e:#}"),
                }
                for seq in 0..*count {
                    let body = Body::Probe {
                        train: *train,
                        seq,
                        count: *count,
                        len: PROBE_LEN as u16,
                    };
                    self.send((c, o, msg.link), body, src).await;
                }
            }
            _ => self.rejects.count("unexpected"),
        }
        Ok(())
    }

    /// Measures upstream trains whose last packet came, or (`all` or
    /// stale) that waited long enough, and reports their rates.
    async fn finish_trains(&mut self, all: bool) {
        let now = Instant::now();
        let stale: Vec<TrainKey> = self
            .trains
            .iter()
            .filter(|(_, (_, t, _))| all || now.duration_since(*t) >= TRAIN_WAIT)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.finish_train(k).await;
        }
    }

    async fn finish_train(&mut self, key: TrainKey) {
        let Some((rx, _, src)) = self.trains.remove(&key) else {
            return;
        };
        let (c, o, link, train) = key;
        let Some(kbps) = rx.rate_kbps() else {
            self.rejects.count("probe_train_lost");
            return;
        };
        self.send((c, o, link), Body::ProbeReport { train, kbps }, src)
            .await;
    }

    /// Sends origin `o` of community `c` again what its playout saw the
    /// links lose (`crate::resend`), each copy on the link where it
    /// arrives first now.
    async fn resend(&mut self, c: u16, o: Ipv4Addr, gaps: &[Gap]) -> Result<()> {
        let ring = self.maps.kept(name::S_KEPT, name::S_KEPT_NEXT)?;
        for k in &resend::asked_for(&mut self.resends, ring, c, u32::from(o), gaps) {
            let Some(bytes) = k.bytes() else { continue };
            let Some(idx) = self.maps.pick_down_path(c, resend::frame_len(bytes))? else {
                self.resends.no_link += 1;
                continue;
            };
            let l = self.maps.server_link(idx)?;
            let to = SocketAddrV4::new(Ipv4Addr::from(l.ip), l.port);
            match self.sock.send_to(&resend::again(bytes, l.link), to).await {
                Ok(_) => self.resends.sent += 1,
                Err(_) => self.rejects.count("send_failed"),
            }
        }
        Ok(())
    }

    /// Sends `body` about a terminal's link (community, origin, link),
    /// signed with its community's key, to `dst`.
    async fn send(&mut self, about: (u16, Ipv4Addr, u8), body: Body, dst: SocketAddrV4) {
        let (community, origin, link) = about;
        let Some(key) = self.keys.get(&community) else {
            return;
        };
        let m = Msg {
            community,
            origin,
            link,
            flags: flags::FROM_SERVER,
            token: 0,
            time_ms: bond_proto::now_ms(),
            counter: self.counter.bump(),
            body,
        }
        .encode(key);
        if self.sock.send_to(&m, dst).await.is_err() {
            self.rejects.count("send_failed");
        }
    }

    /// Reads the configuration file again and applies what may change
    /// while running: the communities and their keys, `misses`, `link_mtu`
    /// and the `[flows]` timeouts, sweep interval and `per_origin`. A file
    /// that fails its checks, or that changes anything else (which takes a
    /// restart: `detach`, then start the agent), changes nothing; the error
    /// says why. Returns the fields that changed.
    fn reload(&mut self) -> Result<Vec<&'static str>, String> {
        let keep = "the running configuration stays";
        let new = match Config::load(&self.path) {
            Ok(Config::Server(s)) => s,
            Ok(Config::Terminal(_)) => return Err(format!("field `role` changed; {keep}")),
            Err(e) => return Err(format!("{e}; {keep}")),
        };
        let (old, flows) = (&self.cfg, (&self.cfg.flows, &new.flows));
        let restart: Vec<&str> = [
            ("instance", old.instance != new.instance),
            ("address", old.address != new.address),
            ("port", old.port != new.port),
            ("nat_address", old.nat_address != new.nat_address),
            ("nat_ports", old.nat_ports != new.nat_ports),
            ("interfaces", old.interfaces != new.interfaces),
            ("metrics", old.metrics != new.metrics),
            ("max_terminals", old.max_terminals != new.max_terminals),
            ("flows.max", flows.0.max != flows.1.max),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        crate::refuse_restart_fields(&restart, keep)?;
        let keys = |c: &ServerConfig| -> Vec<(u16, CommunityKey)> {
            c.communities
                .iter()
                .map(|c| (c.id, c.key.clone()))
                .collect()
        };
        let changed: Vec<&'static str> = [
            ("communities", keys(old) != keys(&new)),
            ("misses", old.misses != new.misses),
            ("link_mtu", old.link_mtu != new.link_mtu),
            ("flows", flows.0 != flows.1),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        self.keys = new
            .communities
            .iter()
            .map(|c| (c.id, c.key.clone()))
            .collect();
        self.table.set_misses(new.misses);
        self.cfg = new;
        self.map_cfg.per_origin = self.cfg.flows.per_origin;
        self.map_cfg.link_mtu = self.link_mtu();
        self.maps
            .set_server_config(self.map_cfg)
            .map_err(|e| format!("applying the new configuration: {e:#}"))?;
        eprintln!("bond-ctl: configuration reloaded: {changed:?} changed");
        Ok(changed)
    }

    /// Lowers the datapath's `link_mtu` to the smallest MTU any live link
    /// announced (never above the configured one), and raises it again
    /// when that link leaves: replies that would not fit it wrapped get
    /// fragmentation needed. One value for all communities.
    fn follow_link_mtu(
        &mut self,
        community: u16,
        rows: &[crate::membership::ServerLinkRow],
    ) -> Result<()> {
        match rows.iter().map(|r| r.mtu).filter(|&m| m != 0).min() {
            Some(m) => self.community_mtu.insert(community, m),
            None => self.community_mtu.remove(&community),
        };
        let mtu = self.link_mtu();
        if mtu != self.map_cfg.link_mtu {
            eprintln!(
                "bond-ctl: link_mtu {} -> {mtu} (smallest link announced)",
                self.map_cfg.link_mtu
            );
            self.map_cfg.link_mtu = mtu;
            self.maps.set_server_config(self.map_cfg)?;
        }
        Ok(())
    }

    /// The configured `link_mtu`, lowered to the smallest a link announced.
    fn link_mtu(&self) -> u16 {
        self.community_mtu
            .values()
            .copied()
            .fold(self.cfg.link_mtu, u16::min)
            .max(bond_config::MIN_LINK_MTU)
    }

    /// Links whose owner's echoes stopped coming leave their community's
    /// downstream schedule.
    fn check_dark(&mut self) -> Result<()> {
        let now = Instant::now();
        let idxs = self.echoes.keys().filter_map(|k| self.applied.get(k));
        let received: HashMap<u32, u64> = self
            .maps
            .server_links_stats(idxs.map(|(idx, _)| *idx))?
            .into_iter()
            .map(|(idx, s)| (idx, s.up_pkts))
            .collect();
        let mut changed = Vec::new();
        for (&(c, link), seen) in &mut self.echoes {
            let idx = self.applied.get(&(c, link)).map(|(idx, _)| idx);
            if let Some(n) = idx.and_then(|idx| received.get(idx)) {
                seen.traffic(now, *n);
            }
            if seen.check(now) {
                eprintln!("bond-ctl: community {c}: link {link} silent: dark, out of use");
                changed.push(c);
            }
        }
        changed.dedup();
        for c in changed {
            self.apply(c)?;
        }
        Ok(())
    }

    /// Writes a community's live links and downstream schedule. New links
    /// get an index before the schedule names them; departed ones leave the
    /// schedule before their entry is cleared. A link that is dark (by its
    /// owner's word or its missing echoes) stays registered but out of the
    /// schedule; each link's relative delay comes from the base round trips
    /// owners announce.
    fn apply(&mut self, community: u16) -> Result<()> {
        let rows = self.table.links(Some(community), Instant::now());
        let mut weights = Vec::new();
        let mut rtts = Vec::new();
        let mut keep = Vec::new();
        for r in &rows {
            let entry = ServerLink {
                ip: u32::from(*r.addr.ip()),
                port: r.addr.port(),
                community,
                link: r.link,
                flags: LINK_VALID,
                _pad: [0; 2],
                owner: u32::from(r.owner),
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
            let dark = r.dark
                || self
                    .echoes
                    .get(&(community, r.link))
                    .is_some_and(|e| e.dark);
            if !dark {
                // A rate learnt from the origins' feedback stands in for
                // the weight while it lasts.
                let rate = self.corrector.rate(Model::Down(community), idx);
                weights.push((idx, rate.unwrap_or(u64::from(r.down)), 0));
                rtts.push(r.rtt_us);
            }
            keep.push(r.link);
        }
        for ((w, d), rtt) in weights
            .iter_mut()
            .zip(pathmon::relative_delays(&rtts))
            .zip(&rtts)
        {
            // An adopted link keeps the delay the last agent gave it until
            // its owner announces a round trip: counted as unmeasured, it
            // would leave the schedule for up to an announce interval.
            w.2 = match self.adopted_delay.get(&(community, w.0)) {
                Some(&adopted) if *rtt == 0 => adopted,
                _ => d,
            };
        }
        if let Some(p) = &self.playout {
            // Upstream comes over the same links.
            p.set_floor(community, playout::floor_us(weights.iter().map(|w| w.2)));
        }
        self.maps.set_down_paths(
            community,
            &weights,
            DEFAULT_BACKLOG_US,
            crate::playout::MAX_WAIT_US as u32,
        )?;
        self.follow_link_mtu(community, &rows)?;
        eprintln!(
            "bond-ctl: community {community}: downstream paths {weights:?} (index, kbit/s, relative delay ns)"
        );
        let gone: Vec<(u16, u8)> = self
            .applied
            .range((community, 0)..=(community, u8::MAX))
            .filter(|((_, l), _)| !keep.contains(l))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.echoes.remove(&k);
            if let Some((idx, _)) = self.applied.remove(&k) {
                self.maps.clear_server_link(idx)?;
                self.corrector.forget(Model::Down(community), idx);
                self.adopted_delay.remove(&(community, idx));
                self.free_idx.push(idx);
            }
        }
        Ok(())
    }
}

impl Agent {
    /// Rebuilds the tables from the maps an earlier agent left: sessions
    /// with their tokens, and links with their owners, addresses and
    /// (scaled) downstream weights.
    fn adopt(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut by_term: BTreeMap<(u16, Ipv4Addr), Vec<(LinkAd, SocketAddrV4)>> = BTreeMap::new();
        let mut rates: HashMap<u16, BTreeMap<u32, u32>> = HashMap::new();
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
            let addr = SocketAddrV4::new(Ipv4Addr::from(l.ip), l.port);
            by_term
                .entry((l.community, Ipv4Addr::from(l.owner)))
                .or_default()
                .push((ad, addr));
            self.applied.insert((l.community, l.link), (idx, l));
            self.next_idx = self.next_idx.max(idx + 1);
        }
        self.free_idx = (0..self.next_idx)
            .filter(|i| !self.applied.values().any(|(idx, _)| idx == i))
            .collect();
        let sessions = self.maps.sessions()?;
        for (k, s) in &sessions {
            let o = Ipv4Addr::from(k.origin);
            let links = by_term.remove(&(k.community, o)).unwrap_or_default();
            self.table
                .adopt(k.community, o, s.token, &links, ADOPT_INTERVAL, now);
        }
        eprintln!(
            "bond-ctl: adopted {} session(s) and {} link(s) from the maps",
            sessions.len(),
            self.applied.len()
        );
        Ok(())
    }

    fn handle(&mut self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => crate::reply(Status::Server(self.status())),
            Request::Peers => crate::reply(self.peers()),
            Request::Metrics => self
                .metrics()
                .map(Value::String)
                .map_err(|e| format!("{e:#}")),
            Request::Detach => {
                eprintln!("bond-ctl: detaching: the datapath stays for the next agent");
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
    fn link_of(&self, c: u16, idx: u32) -> Option<u8> {
        self.applied
            .iter()
            .find(|((community, _), (i, _))| *community == c && *i == idx)
            .map(|((_, link), _)| *link)
    }

    /// Community `c`'s downstream schedule as the datapath holds it: each
    /// link's rate, its delay over the nearest link's, the jitter counted
    /// on it now, and whether it is in use (not while left out for
    /// silence).
    fn down_paths(&self, c: u16) -> Vec<DownPath> {
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
    fn status(&self) -> ServerStatus {
        let now = Instant::now();
        let sessions = self.table.sessions(now);
        let links = self.table.links(None, now);
        let communities = self
            .cfg
            .communities
            .iter()
            .map(|c| CommunityStatus {
                id: c.id,
                terminals: sessions.iter().filter(|s| s.0 == c.id).count(),
                links: links.iter().filter(|l| l.community == c.id).count(),
                flows: self.flows.by_community.get(&c.id).copied().unwrap_or(0),
                paths: self.down_paths(c.id),
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
            flow_table: self.flows.clone(),
            playout: self.playout.as_ref().map(|p| p.stats()),
            feedback: self.corrector.status(|m, idx| match m {
                Model::Down(c) => self.link_of(c, idx),
                Model::Up => None,
            }),
            resend: self.resends,
            rejects: self.rejects.counts(),
            faults: self.faults.counts(),
        }
    }

    /// Every terminal of every community, with its links.
    fn peers(&self) -> Peers {
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

    fn metrics(&self) -> Result<String> {
        let mut m = Metrics::default();
        let now = Instant::now();
        let rows = self.table.links(None, now);
        let mut stats = Vec::new();
        for r in &rows {
            if let Some((idx, _)) = self.applied.get(&(r.community, r.link)) {
                stats.push((r, self.maps.server_link_stats(*idx)?));
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
        for c in &self.cfg.communities {
            let n = self.flows.by_community.get(&c.id).copied().unwrap_or(0);
            m.sample(
                "bond_community_flows",
                &[("community", c.id.to_string())],
                n,
            );
        }
        m.family(
            "bond_free_ports",
            "gauge",
            "Dedicated ports free for new flows (shared by all communities).",
        );
        m.sample("bond_free_ports", &[], self.flows.free_ports);
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
