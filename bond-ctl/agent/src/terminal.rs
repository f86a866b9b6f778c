//! The terminal agent: announces itself, keeps the peer table, logs on to
//! the server, measures its links, and writes the upstream links, schedule
//! and neighbours the programs use.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::TcAttachType;
use bond_common::{
    maps::{
        LINK_L3, LINK_VALID, MAX_LINK_IDS, RelayLink, TerminalConfig as TerminalMap, UpLink, name,
    },
    wire::OUTER_LEN,
};
use serde_json::{Value, json};
use tokio::{
    net::UdpSocket,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use super::{Exit, Pins, Tally, wait_for_signal};
use bond_api::{Call, Metrics, Request, Service};
use bond_config::{Config, Fallback, Gateway, MIN_LINK_MTU, OwnLink, TerminalConfig, WeightSpec};
use bond_datapath::{self as datapath, Maps, ebpf};

use crate::{
    StartServices,
    feedback::{self, Corrector, Model},
    linkwatch::Change,
    membership::PeerTable,
    net::{
        Iface, Net, bind_to_device, hold_name, poke_neighbor, recv_stamped, sysctl,
        timestamp_arrivals, udp_socket,
    },
    pathmon::{self, LinkEcho},
    playout,
    probe::{Estimator, PROBE_FRAME_LEN, PROBE_LEN, TRAIN_LEN, TrainRx},
    resend,
};
use bond_proto::control::{
    Body, Counter, Gap, Guard, LinkAd, LinkQueue, LinkShare, Msg, Reply, flags,
};

/// A busy link is sent a train only every this many probe intervals.
const BUSY_PROBE_EVERY: u32 = 5;

/// How often next hops are re-resolved and link counters read.
const REFRESH: Duration = Duration::from_millis(200);
/// How long a departing terminal keeps relaying after its SHUTDOWN.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);
/// Route metric base for the per-link host routes to the server.
const METRIC_BASE: u32 = 4200;
/// Peers found in the maps at adoption are taken as announcing this often
/// until they announce themselves.
const ADOPT_INTERVAL: Duration = Duration::from_secs(2);
/// A drain ends once this host's links carried nothing for this long.
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// A link direction's weight: pinned, or measured.
#[derive(Debug, Clone)]
struct Weight {
    spec: WeightSpec,
    est: Estimator,
}

impl Weight {
    fn new(spec: WeightSpec) -> Self {
        Self {
            spec,
            est: Estimator::default(),
        }
    }

    fn value(&mut self) -> u32 {
        match self.spec {
            WeightSpec::Fixed(n) => n,
            WeightSpec::Auto => self.est.weight(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "mode": match self.spec { WeightSpec::Fixed(_) => "fixed", WeightSpec::Auto => "auto" },
            "measured_kbps": self.est.rate(),
        })
    }
}

/// One of this host's WAN links.
struct Own {
    ad: LinkAd,
    up: Weight,
    down: Weight,
    iface: Iface,
    /// The next hop towards the server; unspecified while an `auto` one
    /// is not known (no default route on the interface).
    gateway: Ipv4Addr,
    /// `gateway = "auto"`: followed from the interface's default route.
    auto_gateway: bool,
    entry: UpLink,
    relay: RelayLink,
    sock: Arc<UdpSocket>,
    /// The downstream train being received, and the upstream train whose
    /// report is awaited.
    rx: Option<TrainRx>,
    up_train: Option<u32>,
    /// Carried bytes (up, down) at the last probe tick, and when.
    carried: Option<(u64, u64, Instant)>,
    /// Whether the link carried at least half its weight up / down over
    /// the last probe interval: a train then only every [`BUSY_PROBE_EVERY`]
    /// intervals, since its burst delays the traffic queued behind it.
    busy: (bool, bool),
    /// Round trip and darkness, from echoes to the server.
    echo: LinkEcho,
    /// The interface's IPv4 address; `None` while it has none (or is
    /// gone: `iface.index` is then 0). `crate::linkwatch` follows both.
    addr: Option<Ipv4Addr>,
    /// The task reading `sock`.
    reader: Option<tokio::task::AbortHandle>,
    /// The host route to the server over this link.
    route: Route,
}

/// An own link's host route to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    In,
    /// To be put in (a new address or interface).
    Wanted,
    /// Its next hop could not be reached, and the log said so: `refresh`
    /// tries again until it can (a new address whose routes are not there
    /// yet).
    Waiting,
}

impl Own {
    /// Out of use: the interface is gone, down, without carrier, address
    /// or next hop, or the link does not answer echoes.
    fn dark(&self) -> bool {
        self.dark_by_kernel() || self.echo.is_dark()
    }

    /// Out of use by the kernel's word: no interface, carrier, address or
    /// (behind Ethernet) next hop.
    fn dark_by_kernel(&self) -> bool {
        !self.iface.carrier || self.addr.is_none() || self.via() == Some(Ipv4Addr::UNSPECIFIED)
    }

    /// The next hop the route to the server goes by: the gateway behind
    /// Ethernet; none on an L3 link (PPP, a raw-IP modem, a tunnel), whose
    /// far end takes every packet.
    fn via(&self) -> Option<Ipv4Addr> {
        self.iface.ethernet.then_some(self.gateway)
    }

    /// Starts resolving the next hop of a link (back) in place: whatever
    /// the kernel began before (echoes sent while it was down) is
    /// forgotten first, as the kernel would try that again only a second
    /// later.
    async fn resolve_afresh(&self, net: &Net) {
        let _ = net.forget_neighbor(self.iface.index, self.gateway).await;
        let _ = poke_neighbor(&self.iface.name, self.gateway);
    }

    /// Takes the interface as it is now into the link and its datapath
    /// entries (which the caller writes).
    fn set_iface(&mut self, now: Iface) {
        (self.entry.ifindex, self.entry.src_mac) = (now.index, now.mac);
        (self.relay.wan_ifindex, self.relay.wan_mac) = (now.index, now.mac);
        self.relay.flags = relay_flags(&now);
        self.iface = now;
    }
}

/// A link entry's flags for its interface: [`LINK_L3`] without Ethernet.
fn relay_flags(iface: &Iface) -> u8 {
    if iface.ethernet { 0 } else { LINK_L3 }
}

/// Attaches the program that receives on an own link: XDP behind
/// Ethernet, TC on an L3 device (XDP cannot send to one, and runs on it
/// only generically, with Ethernet assumptions).
fn attach_link(pins: &mut Pins, ebpf: &mut aya::Ebpf, iface: &Iface) -> Result<()> {
    if iface.ethernet {
        pins.attach_xdp(ebpf, "bond_terminal", &iface.name)
    } else {
        pins.attach_tc(ebpf, "bond_terminal_l3", &iface.name, TcAttachType::Ingress)
    }
}

/// Where a received control message came from.
#[derive(Clone, Copy, Debug)]
enum From {
    Lan,
    /// Over the own link with this index in `own`.
    Link(usize),
}

struct Received {
    from: From,
    buf: Vec<u8>,
    src: SocketAddrV4,
    at_ns: u64,
}

struct Drain {
    deadline: Instant,
    quiet_since: Instant,
    packets: u64,
}

struct Agent {
    cfg: TerminalConfig,
    /// The configuration file, read again by `reload`.
    path: PathBuf,
    /// The community services bond-ctl started beside the agent (the
    /// relay tree, the peer cache): they run on their own tasks, learn of
    /// the peers from the agent and add to its metrics.
    services: Vec<Box<dyn Service>>,
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
    /// The upstream paths written: (link, kbit/s, relative delay ns).
    schedule: Option<Vec<(u8, u64, u32)>>,
    /// DATA_DOWN packets seen per link at the last refresh.
    down_seen: HashMap<u8, u64>,
    rejects: Tally,
    /// Steps that failed and were survived.
    faults: Tally,
    interval: Duration,
    next_train: u32,
    drain: Option<Drain>,
    /// Detached: the announces still to go say the agent is restarting.
    restarting: bool,
    adopted: bool,
    started: Instant,
    /// Whether the capture prefixes are routed into the capture device
    /// (None: not known yet, an earlier agent may have left them).
    captured: Option<bool>,
    /// How each program is attached, by (hook, interface).
    attached: std::collections::BTreeMap<(&'static str, String), &'static str>,
    /// The capture device (bond0) and its MTU: the smallest of the LAN's,
    /// the own links' (`own_mtu`) and the peers' links', less the wrap.
    capture: Iface,
    capture_mtu: u32,
    own_mtu: u32,
    /// The downstream playout, unless the configuration turns it off.
    playout: Option<playout::Handle>,
    /// Keeps this host's upstream schedule true from the server's feedback.
    corrector: Corrector,
    /// What the server asked to be sent again, and what was.
    resends: resend::Stats,
    probe_round: u32,
}

pub async fn run(
    cfg: TerminalConfig,
    path: &Path,
    pins: &mut Pins,
    calls: mpsc::Receiver<Call>,
    services: &StartServices,
) -> Result<Exit> {
    let net = Net::new()?;
    let lan = net.iface(&cfg.lan).await.context("field `lan`")?;
    let lan_ip = net.ipv4(&lan).await.context("field `lan`")?;

    let mut ebpf = datapath::load(ebpf::TERMINAL, &pins.dir)?;
    let maps = Maps::new(&pins.dir);
    let mut map_cfg = TerminalMap {
        token: 0,
        lan_ip: u32::from(lan_ip),
        server_ip: u32::from(cfg.server.address),
        lan_ifindex: lan.index,
        community: cfg.community,
        data_port: cfg.data_port,
        server_port: cfg.server.port,
        lan_mac: lan.mac,
    };
    // An adopted session goes on: same community and server, same token.
    let mut token = None;
    if pins.adopted
        && let Ok(old) = maps.terminal_config()
        && old.token != 0
        && (old.community, old.server_ip, old.lan_ip)
            == (map_cfg.community, map_cfg.server_ip, map_cfg.lan_ip)
    {
        map_cfg.token = old.token;
        map_cfg.server_port = old.server_port;
        token = Some(old.token);
    }
    maps.set_terminal_config(map_cfg)?;

    let mut own = Vec::new();
    let mut path_mtu = lan.mtu;
    for (i, l) in cfg.links.iter().enumerate() {
        // A link whose interface is not there yet (a modem not plugged in)
        // or has no address (a lease not taken) starts out of use, and is
        // taken up when it comes (`link_changed`).
        let wan = match net.iface(&l.interface).await {
            Ok(wan) => wan,
            Err(_) => Iface {
                name: l.interface.clone(),
                index: 0,
                mac: [0; 6],
                mtu: l.mtu.map_or(1500, u32::from),
                carrier: false,
                ethernet: true,
            },
        };
        let wan_ip = match wan.index {
            0 => None,
            _ => net.ipv4(&wan).await.ok(),
        };
        if wan_ip.is_none() {
            eprintln!(
                "bond-ctl: link {}: interface {} {}: out of use until it has",
                l.id,
                l.interface,
                if wan.index == 0 {
                    "not there yet"
                } else {
                    "has no IPv4 address"
                }
            );
        }
        let mtu = l.mtu.map_or(wan.mtu, u32::from);
        path_mtu = path_mtu.min(mtu);
        let gateway = match l.gateway {
            None => cfg.server.address,
            Some(Gateway::At(a)) => a,
            Some(Gateway::Auto) if wan.index == 0 => Ipv4Addr::UNSPECIFIED,
            Some(Gateway::Auto) => net
                .default_gateway(wan.index)
                .await?
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        if wan_ip.is_some() && wan.ethernet && gateway.is_unspecified() {
            eprintln!(
                "bond-ctl: link {}: no default route on {} to take the next hop from: out of use until there is",
                l.id, l.interface
            );
        }
        if wan.index != 0 {
            sysctl(&format!("net.ipv4.conf.{}.rp_filter", l.interface), "2")?;
        }
        // Control messages for the server leave by this link: a socket
        // tied to the interface (and a route to the server over it, put
        // in once the agent is up). Until the link has an address, a
        // socket that sends nowhere stands in.
        let sock = match wan_ip {
            Some(ip) => udp_socket(SocketAddrV4::new(ip, l.port), Some(&l.interface)),
            None => udp_socket(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), None),
        }
        .with_context(|| format!("field `links[{i}].port`"))?;
        timestamp_arrivals(&sock)?;
        let (mut up, mut down) = (Weight::new(l.up()), Weight::new(l.down()));
        own.push(Own {
            ad: LinkAd {
                id: l.id,
                port: l.port,
                up: up.value(),
                down: down.value(),
                mtu: mtu as u16,
                ..Default::default()
            },
            up,
            down,
            entry: UpLink {
                ifindex: wan.index,
                src_ip: wan_ip.map_or(0, u32::from),
                dst_ip: u32::from(cfg.server.address),
                src_port: l.port,
                dst_port: map_cfg.server_port,
                src_mac: wan.mac,
                dst_mac: [0; 6],
                mtu: mtu as u16,
                flags: 0,
                _pad: 0,
            },
            relay: RelayLink {
                wan_ifindex: wan.index,
                wan_ip: wan_ip.map_or(0, u32::from),
                link: l.id,
                flags: relay_flags(&wan),
                port: l.port,
                wan_mac: wan.mac,
                gw_mac: [0; 6],
                mtu: mtu as u16,
                _pad2: [0; 2],
            },
            iface: wan,
            gateway,
            auto_gateway: l.gateway == Some(Gateway::Auto),
            sock: Arc::new(sock),
            rx: None,
            up_train: None,
            carried: None,
            busy: (false, false),
            echo: LinkEcho::default(),
            addr: wan_ip,
            reader: None,
            route: Route::Wanted,
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
    let dev = net
        .create_capture(&cfg.device, capture_mtu, pins.adopted)
        .await?;
    let services = services(cfg.clone(), lan_ip).await?;
    let mut agent = Agent {
        interval: Duration::from_millis(u64::from(cfg.announce_ms)),
        path: path.to_path_buf(),
        services,
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
        token,
        counter: Counter::new(),
        guard: Guard::new(bond_proto::SKEW_MS),
        lan_sock: Arc::new(lan_sock),
        schedule: None,
        down_seen: HashMap::new(),
        rejects: Tally::rejects(),
        faults: Tally::faults(),
        next_train: getrandom::u32().unwrap_or(1),
        drain: None,
        restarting: false,
        adopted: pins.adopted,
        started: Instant::now(),
        captured: None,
        attached: Default::default(),
        capture: dev.clone(),
        capture_mtu,
        own_mtu: path_mtu,
        playout: None,
        corrector: Corrector::start(Maps::new(&pins.dir))?,
        resends: resend::Stats::default(),
        probe_round: 0,
    };
    if agent.adopted {
        agent.adopt_peers()?;
    }
    // Control messages for the server leave by each link: a host route
    // to the server over it.
    for i in 0..agent.own.len() {
        agent.route(i).await;
    }
    let result = async {
        pins.attach_tc(&mut ebpf, "bond_wrap", &agent.cfg.device, TcAttachType::Egress)?;
        let how = agent.cfg.attach.veth;
        crate::veth::ready(&agent.net, &agent.cfg.lan, how).await?;
        pins.attach_xdp(&mut ebpf, "bond_terminal", &agent.cfg.lan)?;
        // What bond_terminal passes on for own L3 links.
        pins.attach_tc(&mut ebpf, "bond_relay", &agent.cfg.lan, TcAttachType::Ingress)?;
        for o in agent.own.iter().filter(|o| o.iface.index != 0) {
            crate::veth::ready(&agent.net, &o.iface.name, how).await?;
            attach_link(pins, &mut ebpf, &o.iface)?;
        }
        // What the playout sees of the server's packets (`crate::feedback`);
        // without a playout, nothing sends on it.
        let (feedback_tx, feedback) = mpsc::unbounded_channel();
        if agent.cfg.playout {
            agent.start_playout(&mut ebpf, pins, feedback_tx).await?;
        } else {
            agent.maps.set_hold(name::T_HOLD, Default::default())?;
        }
        agent.sync_capture().await?;
        eprintln!(
            "bond-ctl: terminal {lan_ip} up: community {}, {} own link(s), {} mtu {capture_mtu}, announcing every {} ms{}",
            agent.cfg.community,
            agent.own.len(),
            agent.cfg.device,
            agent.cfg.announce_ms,
            if agent.adopted { " (adopted the running datapath)" } else { "" },
        );
        agent.attached = pins.attached.clone();
        agent.run(calls, feedback, &mut ebpf, pins).await
    }
    .await;
    if let Ok(Exit::Detach) = result {
        return result;
    }
    // Leave the host as found: SHUTDOWN, no capture device, no routes.
    agent.shutdown().await;
    let _ = agent.net.delete(&agent.cfg.device).await;
    for o in &agent.own {
        let _ = agent
            .net
            .delete_host_route(
                agent.cfg.server.address,
                o.via(),
                o.iface.index,
                METRIC_BASE + u32::from(o.ad.id),
            )
            .await;
    }
    result
}

impl Agent {
    /// Creates the hold device, puts the receive program on it and starts
    /// the playout, which then tells the datapath to hold.
    async fn start_playout(
        &mut self,
        ebpf: &mut aya::Ebpf,
        pins: &mut Pins,
        reports: playout::ReportTx,
    ) -> Result<()> {
        let name = hold_name(&self.cfg.device);
        // What comes back is addressed to this host from anywhere: not a
        // spoof on this device (loose reverse-path filtering).
        let (tap, dev) = playout::hold_device(&self.net, &name, "2").await?;
        pins.attach_xdp(ebpf, "bond_terminal", &name)?;
        let maps = self.maps.clone();
        let p = playout::Handle::start(tap, dev.index, dev.mac, maps, name::T_HOLD, reports)?;
        self.playout = Some(p);
        Ok(())
    }

    async fn run(
        &mut self,
        mut calls: mpsc::Receiver<Call>,
        mut playout_reports: playout::ReportRx,
        ebpf: &mut aya::Ebpf,
        pins: &mut Pins,
    ) -> Result<Exit> {
        let (tx, mut rx) = mpsc::channel::<Received>(1024);
        spawn_reader(self.lan_sock.clone(), From::Lan, tx.clone());
        for (i, o) in self.own.iter_mut().enumerate() {
            o.reader = Some(spawn_reader(o.sock.clone(), From::Link(i), tx.clone()));
        }
        let mut changes = crate::linkwatch::watch()?;
        let probe_period = |a: &Self| Duration::from_millis(u64::from(a.cfg.probe_ms));
        let mut announce = tokio::time::interval(self.interval);
        let mut refresh = tokio::time::interval(REFRESH);
        let mut probe = tokio::time::interval(probe_period(self));
        let mut echo = tokio::time::interval(pathmon::ECHO_INTERVAL);
        echo.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = wait_for_signal();
        tokio::pin!(stop);
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            // A reload may change the periods.
            if announce.period() != self.interval {
                announce = tokio::time::interval(self.interval);
            }
            if probe.period() != probe_period(self) {
                probe = tokio::time::interval(probe_period(self));
            }
            let deadline = self
                .peers
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = &mut stop => return r.map(|()| Exit::Leave),
                _ = hangup.recv() => {
                    if let Err(e) = self.reload().await {
                        eprintln!("bond-ctl: SIGHUP: {e}");
                    }
                }
                _ = announce.tick() => self.announce().await,
                Some(report) = playout_reports.recv() => match report {
                    playout::Report::Feedback((_, links, shared)) => {
                        self.send_feedback(links, shared).await;
                    }
                    playout::Report::Resend(_, gaps) => {
                        self.send_to_server(Body::Resend { gaps }, false).await;
                    }
                },
                _ = refresh.tick() => {
                    let r = self.refresh().await;
                    self.faults.survive("refresh", r);
                    match self.drained() {
                        Ok(true) => {
                            eprintln!("bond-ctl: drained: leaving");
                            return Ok(Exit::Leave);
                        }
                        Ok(false) => {}
                        Err(e) => self.faults.survive("drain", Err(e)),
                    }
                }
                _ = probe.tick() => self.probe().await,
                _ = echo.tick() => {
                    let r = self.echo().await;
                    self.faults.survive("echo", r);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let gone = self.peers.expire(Instant::now());
                    if !gone.is_empty() {
                        eprintln!("bond-ctl: peer(s) {gone:?} missed {} announces: dropped", self.cfg.misses);
                        let r = self.apply_peers().await;
                        self.faults.survive("apply_peers", r);
                    }
                }
                Some(r) = rx.recv() => {
                    let r = self.receive(r).await;
                    self.faults.survive("control_message", r);
                }
                Some(change) = changes.recv() => {
                    let r = self.link_changed(change, ebpf, pins, &tx).await;
                    self.faults.survive("link_change", r);
                }
                Some(call) = calls.recv() => {
                    let detach = call.req == Request::Detach;
                    let answer = self.handle(call.req).await;
                    let _ = call.reply.send(answer);
                    if detach {
                        return Ok(Exit::Detach);
                    }
                }
            }
            let r = self.sync_capture().await;
            self.faults.survive("capture", r);
        }
    }

    /// Whether this terminal can bond now: it holds a session and some
    /// link in its schedule reaches the server.
    fn can_bond(&self) -> bool {
        self.token.is_some() && self.schedule.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// Routes the capture prefixes into the capture device while the
    /// terminal can bond; with `fallback = "direct"`, withdraws them while
    /// it cannot, so that the host's own routes carry its traffic (new
    /// connections; those already bonded had the server's address and
    /// end).
    async fn sync_capture(&mut self) -> Result<()> {
        if self.schedule.is_none() && self.adopted {
            // Until this agent has its schedule, an adopted datapath keeps
            // the routes the last agent left.
            return Ok(());
        }
        let want = capture_wanted(self.cfg.fallback, self.can_bond());
        if self.captured == Some(want) {
            return Ok(());
        }
        for p in &self.cfg.capture {
            if want {
                self.net
                    .route_to(p.addr, p.len, self.capture.index, self.lan_ip)
                    .await?;
            } else {
                self.net
                    .delete_route_to(p.addr, p.len, self.capture.index)
                    .await?;
            }
        }
        if !want {
            eprintln!(
                "bond-ctl: cannot bond ({}): captured traffic goes by the host's own routes \
                 until it can (fallback = \"direct\")",
                if self.token.is_none() {
                    "no session"
                } else {
                    "no link reaches the server"
                }
            );
        } else if self.cfg.fallback == Fallback::Direct {
            eprintln!(
                "bond-ctl: bonding: captured traffic goes into {}",
                self.cfg.device
            );
        }
        self.captured = Some(want);
        Ok(())
    }

    fn sign(&mut self, body: Body, link: u8, flags: u8, token: u64) -> Vec<u8> {
        let restarting = matches!(body, Body::Announce { .. }) && self.restarting;
        Msg {
            community: self.cfg.community,
            origin: self.lan_ip,
            link,
            flags: flags | if restarting { flags::RESTARTING } else { 0 },
            token,
            time_ms: bond_proto::now_ms(),
            counter: self.counter.bump(),
            body,
        }
        .encode(&self.cfg.key)
    }

    fn announce_body(&self) -> Body {
        let draining = self.drain.is_some();
        Body::Announce {
            interval_ms: self.cfg.announce_ms,
            links: self
                .own
                .iter()
                .map(|o| LinkAd {
                    up: if draining { 0 } else { o.ad.up },
                    down: if draining { 0 } else { o.ad.down },
                    rtt_us: o.echo.announced_us(),
                    dark: o.dark(),
                    ..o.ad
                })
                .collect(),
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

    /// Sends to the server: over each own link (`every`) or the first that
    /// answers echoes, and through a LAN peer whose link does when none of
    /// this host's own links does. A host whose only link went dark keeps
    /// its session that way (its announces reach the server), and so the
    /// flows it carries over its peers' links.
    async fn send_to_server(&mut self, body: Body, every: bool) {
        let token = self.token.unwrap_or(0);
        let server = self.server();
        let lit = self.own.iter().position(|o| !o.dark());
        let relay = match lit {
            Some(_) => None,
            None => self.relay_peer(true).or_else(|| self.relay_peer(false)),
        };
        for i in own_links_to_server(self.own.len(), every, lit, relay.is_some()) {
            if self.own[i].addr.is_none() {
                continue; // nowhere to send from
            }
            let id = self.own[i].ad.id;
            let m = self.sign(body.clone(), id, flags::VIA_LINK, token);
            if let Err(e) = self.own[i].sock.send_to(&m, server).await {
                self.rejects.count("send_failed");
                eprintln!("bond-ctl: link {id}: sending to the server: {e}");
            }
        }
        match relay {
            Some(ip) => self.relay(body, ip).await,
            None if self.own.is_empty() => self.rejects.count("no_way_to_server"),
            None => {}
        }
    }

    /// A peer that can pass a message on to the server: one with a link
    /// not announced dark (`lit_only`), or with any link at all.
    fn relay_peer(&self, lit_only: bool) -> Option<Ipv4Addr> {
        self.peers
            .peers()
            .find(|(_, p)| p.links.iter().any(|l| !(lit_only && l.dark)))
            .map(|(ip, _)| ip)
    }

    /// Hands `body` to peer `ip` to pass on to the server.
    async fn relay(&mut self, body: Body, ip: Ipv4Addr) {
        let m = self.sign(body, 0, flags::RELAY, self.token.unwrap_or(0));
        let to = SocketAddr::V4(SocketAddrV4::new(ip, self.cfg.data_port));
        let _ = self.lan_sock.send_to(&m, to).await;
    }

    /// What this host's playout saw of the server's packets, to the
    /// server ([`send_to_server`](Self::send_to_server)) and, when that
    /// went over a link of our own, through a peer's lit link too: a
    /// report lost with a link that went dark would hide that it did
    /// (`crate::feedback`).
    async fn send_feedback(&mut self, links: Vec<LinkQueue>, shared: Vec<LinkShare>) {
        let body = Body::Feedback { links, shared };
        self.send_to_server(body.clone(), false).await;
        if self.own.iter().all(Own::dark) {
            return; // relayed already, if at all
        }
        if let Some(ip) = self.relay_peer(true) {
            self.relay(body, ip).await;
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
        if !self.own.is_empty() && self.drain.is_none() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    }

    async fn receive(&mut self, r: Received) -> Result<()> {
        let Received {
            from,
            buf,
            src,
            at_ns,
        } = r;
        let community = self.cfg.community;
        let key = &self.cfg.key;
        let msg = match self.guard.open(&buf, |c| (c == community).then_some(key)) {
            Ok(m) => m,
            Err(why) => {
                self.rejects.count(why);
                return Ok(());
            }
        };
        let now = Instant::now();
        let from_server = msg.flags & flags::FROM_SERVER != 0;
        if from_server && (matches!(from, From::Link(_)) && *src.ip() != self.cfg.server.address) {
            self.rejects.count("reply_not_from_server");
            return Ok(());
        }
        match (from, &msg.body) {
            // The server's answer: over our link, or passed on by the peer
            // that relayed our LOGIN.
            (_, Body::LoginReply(r)) if from_server && msg.origin == self.lan_ip => {
                self.login_reply(r)?;
            }
            // Measurements of our own links.
            (
                From::Link(i),
                Body::Probe {
                    train, seq, len, ..
                },
            ) if from_server && msg.origin == self.lan_ip => {
                let o = &mut self.own[i];
                if let Some(rx) = o.rx.as_mut().filter(|rx| rx.id == *train)
                    && rx.add(*seq, at_ns, usize::from(*len))
                {
                    let rx = o.rx.take().expect("checked above");
                    self.train_done(i, &rx);
                    self.update_weights().await?;
                }
            }
            (From::Link(i), Body::EchoReply { sent_ns })
                if from_server && msg.origin == self.lan_ip =>
            {
                let rtt = Duration::from_nanos(datapath::monotonic_ns().saturating_sub(*sent_ns));
                let o = &mut self.own[i];
                let before = o.echo.announced_us();
                if o.echo.reply(now, rtt) {
                    eprintln!("bond-ctl: link {}: answers again: back in use", o.ad.id);
                    self.announce().await;
                    self.apply_peers().await?;
                } else if o.echo.announced_us() != before {
                    // A first or a new base round trip: this host's own
                    // delays follow at once. A first is announced at once
                    // too: until peers know it, the link is out of their
                    // schedules (unmeasured), and a flow they start then
                    // begins on fewer links (a second at the default
                    // interval).
                    if before == 0 {
                        self.announce().await;
                    }
                    self.apply_peers().await?;
                }
            }
            // What the server's playout saw of our upstream: over our
            // link, or passed on by a peer.
            (_, Body::Feedback { links, shared }) if from_server && msg.origin == self.lan_ip => {
                for q in links {
                    self.corrector.report(feedback::Report {
                        model: Model::Up,
                        id: u32::from(q.link),
                        queue: *q,
                    });
                }
                self.corrector.shares(
                    Model::Up,
                    shared
                        .iter()
                        .map(|s| (u32::from(s.link), s.others.clone()))
                        .collect(),
                );
            }
            // Upstream packets the server's playout saw a link lose.
            (_, Body::Resend { gaps }) if from_server && msg.origin == self.lan_ip => {
                let r = self.resend(gaps).await;
                self.faults.survive("resend", r);
            }
            (From::Link(i), Body::ProbeReport { train, kbps })
                if from_server && msg.origin == self.lan_ip =>
            {
                let o = &mut self.own[i];
                if o.up_train == Some(*train) && o.up.spec == WeightSpec::Auto {
                    o.up.est.add(*kbps);
                    self.update_weights().await?;
                }
            }
            // For the server, from a peer without links of its own.
            (From::Lan, _) if msg.flags & flags::RELAY != 0 => {
                let usable = |o: &&Own| o.entry.flags & LINK_VALID != 0;
                let lit = self.own.iter().filter(usable).find(|o| !o.dark());
                if let Some(o) = lit.or_else(|| self.own.iter().find(usable)) {
                    let _ = o.sock.send_to(&buf, self.server()).await;
                } else {
                    self.rejects.count("cannot_relay");
                }
            }
            (From::Lan, _) if msg.origin == self.lan_ip => {} // our own broadcast
            (From::Lan, _) if *src.ip() != msg.origin => self.rejects.count("origin_mismatch"),
            (From::Lan, Body::Announce { interval_ms, links }) => {
                let up: u32 = links.iter().map(|l| l.up).sum();
                for s in &self.services {
                    s.saw_peer(msg.origin, (up > 0).then_some(f64::from(up)));
                }
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
            // A reply for a peer we relayed for, or the server's feedback
            // or request to send again for a peer: on to it over the LAN.
            (From::Link(_), Body::LoginReply(_) | Body::Feedback { .. } | Body::Resend { .. })
                if from_server =>
            {
                let to = SocketAddr::V4(SocketAddrV4::new(msg.origin, self.cfg.data_port));
                let _ = self.lan_sock.send_to(&buf, to).await;
            }
            _ => self.rejects.count("unexpected"),
        }
        Ok(())
    }

    /// Sends the server again what its playout saw this host's links
    /// lose upstream (`crate::resend`), each copy on the link where it
    /// arrives first now: out of an own link from its socket, or to a
    /// peer's relay port over the LAN.
    async fn resend(&mut self, gaps: &[Gap]) -> Result<()> {
        let ring = self.maps.kept(name::T_KEPT, name::T_KEPT_NEXT)?;
        let (c, o) = (self.cfg.community, u32::from(self.lan_ip));
        for k in &self.resends.asked_for(ring, c, o, gaps) {
            let Some(bytes) = k.bytes() else { continue };
            let Some(id) = self.maps.pick_up_path(resend::frame_len(bytes))? else {
                self.resends.no_link += 1;
                continue;
            };
            let e = self.maps.up_link(id)?;
            let to = SocketAddrV4::new(Ipv4Addr::from(e.dst_ip), e.dst_port);
            let sock = match self.own.iter().find(|o| o.ad.id == id) {
                Some(o) => o.sock.clone(),
                None => self.lan_sock.clone(),
            };
            match sock.send_to(&resend::again(bytes, id), to).await {
                Ok(_) => self.resends.sent += 1,
                Err(_) => self.rejects.count("send_failed"),
            }
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

    // ------------------------------------------------------ measurement --

    /// Every echo interval: an ECHO to the server over each own link; a
    /// link that has stopped answering turns dark, leaves this host's
    /// schedule and is announced dark to the LAN at once
    /// (`crate::pathmon`).
    async fn echo(&mut self) -> Result<()> {
        let Some(token) = self.token else {
            return Ok(());
        };
        let server = self.server();
        for i in 0..self.own.len() {
            if self.own[i].entry.flags & LINK_VALID == 0 {
                continue;
            }
            let id = self.own[i].ad.id;
            let body = Body::Echo {
                sent_ns: datapath::monotonic_ns(),
            };
            let m = self.sign(body, id, flags::VIA_LINK, token);
            let _ = self.own[i].sock.send_to(&m, server).await;
        }
        let now = Instant::now();
        let received = self
            .maps
            .terminal_links_stats(self.own.iter().map(|o| o.ad.id))?;
        let mut dark = Vec::new();
        for (o, (_, s)) in self.own.iter_mut().zip(received) {
            o.echo.traffic(now, s.down_pkts + s.relay_down_pkts);
            if o.echo.check(now) {
                dark.push(o.ad.id);
            }
        }
        if !dark.is_empty() {
            eprintln!("bond-ctl: link(s) {dark:?} stopped answering: dark, out of use");
            self.announce().await;
            self.apply_peers().await?;
        }
        Ok(())
    }

    // ----------------------------------------------------- link changes --

    /// Something changed on an interface (`crate::linkwatch`): if it is an
    /// own link's, its state is read again from the kernel and followed.
    /// A modem unplugged and plugged in again comes back with a new index:
    /// the program, the route to the server and the socket go on it again.
    /// A new address gets a new socket and is the datapath's new source;
    /// the server takes it from the announce sent at once. A link that
    /// lost its carrier, address or interface leaves every schedule at
    /// once (announced dark), and returns when they are back.
    async fn link_changed(
        &mut self,
        change: Change,
        ebpf: &mut aya::Ebpf,
        pins: &mut Pins,
        tx: &mpsc::Sender<Received>,
    ) -> Result<()> {
        let i = match &change {
            Change::Link { name, .. } | Change::Gone { name, .. } => {
                self.own.iter().position(|o| o.iface.name == *name)
            }
            Change::Address { index } | Change::DefaultRoute { index } => {
                self.own.iter().position(|o| o.iface.index == *index)
            }
        };
        let Some(i) = i else {
            return Ok(());
        };
        let (id, was_dark) = (self.own[i].ad.id, self.own[i].dark());
        let name = self.own[i].iface.name.clone();
        let Ok(now) = self.net.iface(&name).await else {
            if self.own[i].iface.index != 0 {
                eprintln!("bond-ctl: link {id}: interface {name} is gone: out of use");
                let o = &mut self.own[i];
                (o.iface.index, o.iface.carrier, o.addr) = (0, false, None);
                self.invalidate(i)?;
            }
            return self.relink(i, was_dark, false).await;
        };
        let replugged = now.index != self.own[i].iface.index;
        if replugged {
            eprintln!(
                "bond-ctl: link {id}: interface {name} is back (index {})",
                now.index
            );
            sysctl(&format!("net.ipv4.conf.{name}.rp_filter"), "2")?;
            crate::veth::ready(&self.net, &name, self.cfg.attach.veth).await?;
            attach_link(pins, ebpf, &now)?;
            self.attached = pins.attached.clone();
        }
        self.own[i].set_iface(now);
        if replugged {
            self.invalidate(i)?;
        }
        let addr = self.net.ipv4(&self.own[i].iface).await.ok();
        let readdressed = addr != self.own[i].addr;
        if readdressed {
            eprintln!(
                "bond-ctl: link {id}: address {} -> {}",
                show_addr(self.own[i].addr),
                show_addr(addr)
            );
        }
        if let Some(ip) = addr
            && (replugged || readdressed)
        {
            self.rebind(i, ip, tx).await?;
        }
        self.own[i].addr = addr;
        let rerouted = self.own[i].auto_gateway
            && self.own[i].iface.ethernet
            && self.follow_gateway(i).await?;
        let o = &self.own[i];
        if o.dark_by_kernel() {
            // It may come back behind another next hop (another modem).
            if o.entry.flags & LINK_VALID != 0 {
                self.invalidate(i)?;
            }
        } else if o.entry.flags & LINK_VALID == 0 {
            if o.iface.ethernet {
                // Resolved by the next `refresh`.
                o.resolve_afresh(&self.net).await;
            } else {
                self.l3_valid(i)?;
            }
        }
        self.relink(i, was_dark, replugged || readdressed || rerouted)
            .await
    }

    /// Takes link `i`'s next hop from its interface's default route again
    /// (`gateway = "auto"`); true if it changed. The route to the server
    /// moves to the new one, and the datapath waits for it to be resolved.
    async fn follow_gateway(&mut self, i: usize) -> Result<bool> {
        let o = &self.own[i];
        let now = match o.iface.index {
            0 => None,
            index => self.net.default_gateway(index).await?,
        }
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
        if now == o.gateway {
            return Ok(false);
        }
        eprintln!(
            "bond-ctl: link {}: next hop {} -> {}",
            o.ad.id,
            show_addr(Some(o.gateway).filter(|g| !g.is_unspecified())),
            show_addr(Some(now).filter(|g| !g.is_unspecified()))
        );
        if !o.gateway.is_unspecified() {
            let metric = METRIC_BASE + u32::from(o.ad.id);
            let server = self.cfg.server.address;
            let _ = self
                .net
                .delete_host_route(server, o.via(), o.iface.index, metric)
                .await;
        }
        self.own[i].gateway = now;
        self.own[i].route = Route::Wanted;
        self.invalidate(i)?;
        self.route(i).await;
        Ok(true)
    }

    /// Link `i`'s datapath entries wait for the next hop to be resolved
    /// again (`refresh`): a new interface has a new neighbour table.
    fn invalidate(&mut self, i: usize) -> Result<()> {
        let o = &mut self.own[i];
        (o.entry.flags, o.entry.dst_mac, o.relay.gw_mac) = (0, [0; 6], [0; 6]);
        self.maps.set_up_link(o.ad.id, o.entry)?;
        Ok(self.maps.set_relay_link(o.ad.port, o.relay)?)
    }

    /// L3 link `i`'s datapath entries are in use: it has no next hop to
    /// resolve.
    fn l3_valid(&mut self, i: usize) -> Result<()> {
        let o = &mut self.own[i];
        o.entry.flags = LINK_VALID;
        self.maps.set_up_link(o.ad.id, o.entry)?;
        Ok(self.maps.set_relay_link(o.ad.port, o.relay)?)
    }

    /// Link `i` sends from `ip` now, on its interface as it is: a new
    /// socket for a new address (the same one tied to the new interface
    /// for a replugged modem that kept its address), the datapath's source
    /// address, and the route to the server (the kernel drops it with the
    /// address or interface it went by).
    async fn rebind(&mut self, i: usize, ip: Ipv4Addr, tx: &mpsc::Sender<Received>) -> Result<()> {
        let o = &mut self.own[i];
        let at = SocketAddrV4::new(ip, o.ad.port);
        if o.sock.local_addr().ok() == Some(SocketAddr::V4(at)) {
            bind_to_device(&*o.sock, &o.iface.name)?;
        } else {
            let sock = udp_socket(at, Some(&o.iface.name))
                .with_context(|| format!("link {}: a socket on {at}", o.ad.id))?;
            timestamp_arrivals(&sock)?;
            o.sock = Arc::new(sock);
            let reader = spawn_reader(o.sock.clone(), From::Link(i), tx.clone());
            if let Some(old) = o.reader.replace(reader) {
                old.abort();
            }
        }
        (o.entry.src_ip, o.relay.wan_ip) = (u32::from(ip), u32::from(ip));
        if o.entry.flags & LINK_VALID != 0 {
            self.maps.set_up_link(o.ad.id, o.entry)?;
        }
        self.maps.set_relay_link(o.ad.port, o.relay)?;
        o.route = Route::Wanted;
        self.route(i).await;
        Ok(())
    }

    /// Puts the host route to the server over link `i` in place if it is
    /// wanted; says so once when its next hop cannot be reached.
    async fn route(&mut self, i: usize) {
        let server = self.cfg.server.address;
        let o = &self.own[i];
        if o.route == Route::In || o.addr.is_none() || o.via() == Some(Ipv4Addr::UNSPECIFIED) {
            return;
        }
        let metric = METRIC_BASE + u32::from(o.ad.id);
        let r = self
            .net
            .host_route_via(server, o.via(), o.iface.index, metric)
            .await;
        let o = &mut self.own[i];
        match r {
            Ok(()) if o.route == Route::Waiting => {
                eprintln!("bond-ctl: link {}: route to the server in place", o.ad.id);
                o.route = Route::In;
            }
            Ok(()) => o.route = Route::In,
            Err(e) if o.route == Route::Wanted => {
                eprintln!("bond-ctl: link {}: {e:#}; trying again", o.ad.id);
                o.route = Route::Waiting;
            }
            Err(_) => {}
        }
    }

    /// After a change on link `i`: if it went dark or lit, or `moved` (a new
    /// address or interface), the LAN and the server hear it now and the
    /// schedule is rebuilt.
    async fn relink(&mut self, i: usize, was_dark: bool, moved: bool) -> Result<()> {
        let o = &self.own[i];
        let dark = o.dark();
        if dark != was_dark {
            eprintln!(
                "bond-ctl: link {}: {}",
                o.ad.id,
                if dark {
                    "no interface, carrier, address or next hop: out of use"
                } else {
                    "interface, carrier, address and next hop back: in use"
                }
            );
        }
        if dark != was_dark || moved {
            self.announce().await;
            self.apply_peers().await?;
        }
        Ok(())
    }

    /// Every probe interval, for each own link with a measured weight: an
    /// upstream train to the server (which reports its rate), and a
    /// request for a downstream train (which we time).
    async fn probe(&mut self) {
        let Some(token) = self.token else { return };
        let server = self.server();
        if let Err(e) = self.observe_carried() {
            eprintln!("bond-ctl: reading link counters: {e:#}");
        }
        self.probe_round = self.probe_round.wrapping_add(1);
        let busy_round = self.probe_round.is_multiple_of(BUSY_PROBE_EVERY);
        for i in 0..self.own.len() {
            if self.own[i].entry.flags & LINK_VALID == 0 || self.drain.is_some() {
                continue;
            }
            // What arrived of the last downstream train counts, if enough.
            if let Some(rx) = self.own[i].rx.take() {
                self.train_done(i, &rx);
            }
            let id = self.own[i].ad.id;
            let (busy_up, busy_down) = self.own[i].busy;
            if self.own[i].down.spec == WeightSpec::Auto && (!busy_down || busy_round) {
                let train = self.next_train();
                let m = self.sign(
                    Body::ProbeRequest {
                        train,
                        count: TRAIN_LEN,
                    },
                    id,
                    flags::VIA_LINK,
                    token,
                );
                self.own[i].rx = Some(TrainRx::new(train, TRAIN_LEN));
                let _ = self.own[i].sock.send_to(&m, server).await;
            }
            if self.own[i].up.spec == WeightSpec::Auto && (!busy_up || busy_round) {
                let train = self.next_train();
                self.own[i].up_train = Some(train);
                // Signed first, so the train leaves back to back.
                let msgs: Vec<Vec<u8>> = (0..TRAIN_LEN)
                    .map(|seq| {
                        self.sign(
                            Body::Probe {
                                train,
                                seq,
                                count: TRAIN_LEN,
                                len: PROBE_LEN as u16,
                            },
                            id,
                            flags::VIA_LINK,
                            token,
                        )
                    })
                    .collect();
                // The train queues at the link like data: the schedule
                // counts it, or the packets sent behind it arrive late.
                match self
                    .maps
                    .charge_up_path(id, u32::from(TRAIN_LEN), PROBE_FRAME_LEN)
                {
                    Ok(Some(left)) => self.corrector.probed(Model::Up, u32::from(id), left),
                    Ok(None) => {}
                    Err(e) => eprintln!("bond-ctl: charging a probe train: {e:#}"),
                }
                for m in &msgs {
                    if self.own[i].sock.send_to(m, server).await.is_err() {
                        self.rejects.count("send_failed");
                        break;
                    }
                }
            }
        }
        if let Err(e) = self.update_weights().await {
            eprintln!("bond-ctl: updating weights: {e:#}");
        }
    }

    /// Feeds what each own link carried since the last tick (as origin
    /// and as relay) to its estimators, as a lower bound.
    fn observe_carried(&mut self) -> Result<()> {
        let stats = self.maps.terminal_link_stats()?;
        let now = Instant::now();
        for o in &mut self.own {
            let Some((_, _, s)) = stats.iter().find(|(id, _, _)| *id == o.ad.id) else {
                continue;
            };
            let (up, down) = (
                s.up_bytes + s.relay_up_bytes,
                s.down_bytes + s.relay_down_bytes,
            );
            if let Some((up0, down0, t0)) = o.carried {
                let secs = now.duration_since(t0).as_secs_f64();
                let kbps = |b: u64| (b as f64 * 8.0 / 1000.0 / secs) as u32;
                if secs > 0.1 {
                    let (up_kbps, down_kbps) = (
                        kbps(up.saturating_sub(up0)),
                        kbps(down.saturating_sub(down0)),
                    );
                    o.busy = (up_kbps >= o.ad.up / 2, down_kbps >= o.ad.down / 2);
                    if o.up.spec == WeightSpec::Auto {
                        o.up.est.observe(kbps(up.saturating_sub(up0)));
                    }
                    if o.down.spec == WeightSpec::Auto {
                        o.down.est.observe(kbps(down.saturating_sub(down0)));
                    }
                }
            }
            o.carried = Some((up, down, now));
        }
        Ok(())
    }

    fn next_train(&mut self) -> u32 {
        self.next_train = self.next_train.wrapping_add(1);
        self.next_train
    }

    fn train_done(&mut self, i: usize, rx: &TrainRx) {
        let o = &mut self.own[i];
        match rx.rate_kbps() {
            Some(kbps) if o.down.spec == WeightSpec::Auto => o.down.est.add(kbps),
            Some(_) => {}
            None => self.rejects.count("probe_train_lost"),
        }
    }

    /// Takes the links' current weights; if any changed, tells the LAN and
    /// the server at once and rebuilds our own schedule.
    async fn update_weights(&mut self) -> Result<()> {
        let mut changed = false;
        for o in &mut self.own {
            let (up, down) = (o.up.value(), o.down.value());
            if (up, down) != (o.ad.up, o.ad.down) {
                eprintln!(
                    "bond-ctl: link {} weights: up {} -> {up}, down {} -> {down}",
                    o.ad.id, o.ad.up, o.ad.down
                );
                (o.ad.up, o.ad.down) = (up, down);
                changed = true;
            }
        }
        if changed {
            self.announce().await;
            self.apply_peers().await?;
        }
        Ok(())
    }

    // ----------------------------------------------------------- upkeep --

    /// Puts back routes to the server that could not be put in, re-resolves
    /// next hops, reads the links' counters (traffic from a peer's link is
    /// a sign of that peer's life), and rewrites what changed.
    async fn refresh(&mut self) -> Result<()> {
        for i in 0..self.own.len() {
            self.route(i).await;
        }
        let mut resolved = false;
        for i in 0..self.own.len() {
            let o = &self.own[i];
            if !o.iface.ethernet && !o.dark_by_kernel() && o.entry.flags & LINK_VALID == 0 {
                resolved = true;
                self.l3_valid(i)?;
            }
        }
        let placed =
            |o: &&mut Own| o.iface.index != 0 && o.iface.ethernet && !o.gateway.is_unspecified();
        for o in self.own.iter_mut().filter(placed) {
            match self.net.neighbor(o.iface.index, o.gateway).await? {
                Some(mac) if mac != o.entry.dst_mac || o.entry.flags & LINK_VALID == 0 => {
                    resolved |= o.entry.flags & LINK_VALID == 0;
                    o.entry.dst_mac = mac;
                    o.entry.flags = LINK_VALID;
                    o.relay.gw_mac = mac;
                    self.maps.set_up_link(o.ad.id, o.entry)?;
                    self.maps.set_relay_link(o.ad.port, o.relay)?;
                }
                Some(_) => {}
                None if o.entry.flags & LINK_VALID == 0 && !o.dark_by_kernel() => {
                    o.resolve_afresh(&self.net).await;
                }
                None => {
                    let _ = poke_neighbor(&o.iface.name, o.gateway);
                }
            }
        }
        if resolved && self.token.is_some() {
            // A link that came (back) can carry now: the server hears it
            // over that link at once (an announce sent while its next hop
            // was being resolved may have been lost with the resolution).
            self.announce().await;
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

    /// While draining: whether this host's links have carried nothing for
    /// [`DRAIN_QUIET`], or the drain's time is up.
    fn drained(&mut self) -> Result<bool> {
        let Some(d) = self.drain.as_mut() else {
            return Ok(false);
        };
        let ids: Vec<u8> = self.own.iter().map(|o| o.ad.id).collect();
        let packets: u64 = self
            .maps
            .terminal_link_stats()?
            .iter()
            .filter(|(id, _, _)| ids.contains(id))
            .map(|(_, _, s)| s.up_pkts + s.down_pkts + s.relay_up_pkts + s.relay_down_pkts)
            .sum();
        let now = Instant::now();
        if packets != d.packets {
            d.packets = packets;
            d.quiet_since = now;
        }
        if now >= d.deadline {
            eprintln!("bond-ctl: drain timed out with traffic still on this host's links");
            return Ok(true);
        }
        Ok(now.duration_since(d.quiet_since) >= DRAIN_QUIET)
    }

    /// Rebuilds the peer table from the maps an earlier agent left: every
    /// valid LAN link entry names its owner and port, and the schedule
    /// holds its weight. They count as alive until they miss announces.
    fn adopt_peers(&mut self) -> Result<()> {
        let rates: BTreeMap<u32, u32> = self
            .maps
            .up_paths()?
            .links()
            .map(|l| (l.id, l.kbit() as u32))
            .collect();
        let mut found: BTreeMap<Ipv4Addr, Vec<LinkAd>> = BTreeMap::new();
        for id in 0..MAX_LINK_IDS {
            let id = id as u8;
            let Ok(e) = self.maps.up_link(id) else {
                continue;
            };
            if e.flags & LINK_VALID == 0 || e.ifindex != self.lan.index {
                continue;
            }
            let w = rates.get(&u32::from(id)).copied().unwrap_or(0);
            found
                .entry(Ipv4Addr::from(e.dst_ip))
                .or_default()
                .push(LinkAd {
                    id,
                    port: e.dst_port,
                    up: w,
                    down: w,
                    mtu: e.mtu,
                    ..Default::default()
                });
            self.peer_links.insert(id, (Ipv4Addr::from(e.dst_ip), e));
        }
        let now = Instant::now();
        for (ip, links) in &found {
            self.peers.announce(*ip, ADOPT_INTERVAL, links, now);
        }
        eprintln!(
            "bond-ctl: adopted {} peer link(s) from the maps{}",
            self.peer_links.len(),
            if self.token.is_some() {
                " and the session"
            } else {
                ""
            }
        );
        Ok(())
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
        let draining = self.drain.is_some();
        // (link, weight, base round trip µs) of every link this host may
        // send on: its own that answer, and peers' not announced dark.
        let mut usable: Vec<(u8, u32, u32)> = self
            .own
            .iter()
            .filter(|o| o.entry.flags & LINK_VALID != 0 && !draining && !o.dark())
            .map(|o| (o.ad.id, o.ad.up, o.echo.announced_us()))
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
                if !l.dark {
                    usable.push((l.id, l.up, l.rtt_us));
                }
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
                            // The LAN hop and the peer's link must fit (an
                            // MTU below IPv4's minimum plus the wrap is not
                            // believed).
                            mtu: match l.mtu {
                                0 => self.lan.mtu as u16,
                                m => m.max(MIN_LINK_MTU).min(self.lan.mtu as u16),
                            },
                            flags: LINK_VALID,
                            _pad: 0,
                        },
                    ),
                );
            }
        }
        // bond0 shrinks to the smallest link in use, so the kernel sizes
        // segments (and refuses DF datagrams) to fit it wrapped; it grows
        // back when that link leaves. TCP follows on its next segment.
        let mtu = want
            .values()
            .map(|(_, e)| u32::from(e.mtu))
            .fold(self.own_mtu, u32::min)
            .saturating_sub(OUTER_LEN as u32);
        if mtu != self.capture_mtu {
            self.net.set_mtu(self.capture.index, mtu).await?;
            eprintln!(
                "bond-ctl: {} mtu {} -> {mtu} (smallest link in use)",
                self.cfg.device, self.capture_mtu
            );
            self.capture_mtu = mtu;
        }
        for (id, (_, e)) in &want {
            if self.peer_links.get(id).map(|(_, old)| old) != Some(e) {
                self.maps.set_up_link(*id, *e)?;
            }
        }
        usable.sort_unstable();
        let rtts: Vec<u32> = usable.iter().map(|u| u.2).collect();
        // A rate learnt from the server's feedback stands in for the
        // weight while it lasts.
        let paths: Vec<(u8, u64, u32)> = usable
            .iter()
            .zip(pathmon::relative_delays(&rtts))
            .map(|(&(l, w, _), d)| {
                let rate = self.corrector.rate(Model::Up, u32::from(l));
                (l, rate.unwrap_or(u64::from(w)), d)
            })
            .collect();
        if self.schedule.as_ref() != Some(&paths) {
            self.maps
                // The server's playout (on by default) puts right what
                // arrives up to its wait late.
                .set_up_paths_reordered(
                    &paths,
                    bond_common::edpf::DEFAULT_BACKLOG_US,
                    playout::MAX_WAIT_US as u32,
                )?;
            eprintln!("bond-ctl: upstream paths: {paths:?} (link, kbit/s, relative delay ns)");
            if let Some(p) = &self.playout {
                // The server schedules over the same links.
                let floor = playout::floor_us(paths.iter().map(|p| p.2));
                p.set_floor(self.cfg.community, floor);
            }
            self.schedule = Some(paths);
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

    // --------------------------------------------------------- operator --

    /// Reads the configuration file again and applies what may change
    /// while running: the community `key`, `announce_ms`, `misses`,
    /// `probe_ms` and the links' weights (a weight the file changes
    /// replaces one set with `bond-ctl weight`; one it leaves alone stays).
    /// A file that fails its checks, or that changes anything else (which
    /// takes a restart: `detach`, then start the agent), changes nothing;
    /// the error says why. Returns the fields that changed.
    async fn reload(&mut self) -> Result<Vec<&'static str>, String> {
        let keep = "the running configuration stays";
        let new = match Config::load(&self.path) {
            Ok(Config::Terminal(t)) => t,
            Ok(Config::Server(_)) => return Err(format!("field `role` changed; {keep}")),
            Err(e) => return Err(format!("{e}; {keep}")),
        };
        let old = &self.cfg;
        let unweighted = |c: &TerminalConfig| -> Vec<OwnLink> {
            c.links
                .iter()
                .map(|l| OwnLink {
                    weight: WeightSpec::Fixed(0),
                    up: None,
                    down: None,
                    ..l.clone()
                })
                .collect()
        };
        let restart: Vec<&str> = [
            ("instance", old.instance != new.instance),
            ("community", old.community != new.community),
            ("lan", old.lan != new.lan),
            ("data_port", old.data_port != new.data_port),
            ("device", old.device != new.device),
            ("capture", old.capture != new.capture),
            ("server", old.server != new.server),
            ("links", unweighted(old) != unweighted(&new)),
            ("metrics", old.metrics != new.metrics),
            ("dist", old.dist != new.dist),
            ("cache", old.cache != new.cache),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        if !restart.is_empty() {
            return Err(format!(
                "{} changed, which takes a restart (`bond-ctl detach`, then start the agent); {keep}",
                restart.join(", ")
            ));
        }
        let weights = |c: &TerminalConfig| -> Vec<(WeightSpec, WeightSpec)> {
            c.links.iter().map(|l| (l.up(), l.down())).collect()
        };
        let changed: Vec<&'static str> = [
            ("key", old.key != new.key),
            ("announce_ms", old.announce_ms != new.announce_ms),
            ("misses", old.misses != new.misses),
            ("probe_ms", old.probe_ms != new.probe_ms),
            ("weights", weights(old) != weights(&new)),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        for (o, (was, now)) in self.own.iter_mut().zip(old.links.iter().zip(&new.links)) {
            if was.up() != now.up() {
                o.up = Weight::new(now.up());
            }
            if was.down() != now.down() {
                o.down = Weight::new(now.down());
            }
        }
        self.peers.set_misses(new.misses);
        self.interval = Duration::from_millis(u64::from(new.announce_ms));
        self.cfg = new;
        if changed.contains(&"weights") {
            self.update_weights().await.map_err(|e| format!("{e:#}"))?;
        }
        eprintln!("bond-ctl: configuration reloaded: changed {changed:?}");
        Ok(changed)
    }

    async fn handle(&mut self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Peers => Ok(json!({ "peers": self.peer_rows() })),
            Request::Weight { link, up, down } => {
                let Some(o) = self.own.iter_mut().find(|o| o.ad.id == link) else {
                    return Err(match self.peers.owner(link) {
                        Some(ip) => format!("link {link} belongs to {ip}: set it there"),
                        None => format!("link {link} is not one of this host's links"),
                    });
                };
                if let Some(s) = up {
                    o.up = Weight::new(s);
                }
                if let Some(s) = down {
                    o.down = Weight::new(s);
                }
                let (up, down) = (o.up.spec, o.down.spec);
                eprintln!("bond-ctl: link {link} weights set: up {up}, down {down}");
                self.update_weights().await.map_err(|e| format!("{e:#}"))?;
                Ok(json!({"link": link, "up": up.to_string(), "down": down.to_string()}))
            }
            Request::Drain { timeout_ms } => {
                let now = Instant::now();
                self.drain = Some(Drain {
                    deadline: now + Duration::from_millis(timeout_ms),
                    quiet_since: now,
                    packets: 0,
                });
                eprintln!("bond-ctl: draining: this host's links leave the schedules");
                self.announce().await;
                self.apply_peers().await.map_err(|e| format!("{e:#}"))?;
                Ok(json!({"draining": true, "links": self.own.len()}))
            }
            Request::Detach => {
                eprintln!("bond-ctl: detaching: the datapath stays for the next agent");
                // The server is not to take the echoes' pause for dark links.
                if self.token.is_some() && !self.own.is_empty() {
                    self.restarting = true;
                    self.send_to_server(self.announce_body(), true).await;
                }
                Ok(json!({"detached": true}))
            }
            Request::Metrics => self
                .metrics()
                .map(Value::String)
                .map_err(|e| format!("{e:#}")),
            Request::Reload => self
                .reload()
                .await
                .map(|changed| json!({ "changed": changed })),
        }
    }

    fn status(&self) -> Value {
        let links: Vec<Value> = self
            .own
            .iter()
            .map(|o| {
                json!({
                    "link": o.ad.id, "interface": o.iface.name, "port": o.ad.port,
                    "up": o.ad.up, "down": o.ad.down,
                    "up_weight": o.up.json(), "down_weight": o.down.json(),
                    "active": o.entry.flags & LINK_VALID != 0,
                    "dark": o.dark(),
                    "carrier": o.iface.carrier,
                    "ethernet": o.iface.ethernet,
                    "address": o.addr.map(|a| a.to_string()),
                    "gateway": Some(o.gateway).filter(|g| !g.is_unspecified()).map(|g| g.to_string()),
                    "rtt_ms": o.echo.base_rtt().map(|r| r.as_secs_f64() * 1e3),
                })
            })
            .collect();
        json!({
            "role": "terminal",
            "instance": self.cfg.instance,
            "community": self.cfg.community,
            "address": self.lan_ip.to_string(),
            "server": self.server().to_string(),
            "logged_on": self.token.is_some(),
            "announce_ms": self.cfg.announce_ms,
            "uptime_s": self.started.elapsed().as_secs(),
            "adopted": self.adopted,
            "fallback": self.cfg.fallback,
            "bonding": self.captured == Some(true) && self.can_bond(),
            "attach": crate::attach_status(&self.attached),
            "draining": self.drain.is_some(),
            "links": links,
            "peers": self.peers.peers().count(),
            "schedule": self
                .schedule
                .iter()
                .flatten()
                .map(|&(l, k, _)| (l, k))
                .collect::<Vec<_>>(),
            "paths": self
                .schedule
                .iter()
                .flatten()
                .map(|&(link, kbit, delay_ns)| json!({"link": link, "kbit": kbit, "delay_us": delay_ns / 1000}))
                .collect::<Vec<_>>(),
            "playout": self.playout.as_ref().map(|p| p.stats()),
            "feedback": self.corrector.status(|_, id| u8::try_from(id).ok()),
            "resend": self.resends,
            "rejects": self.rejects.json(),
            "faults": self.faults.json(),
        })
    }

    /// The seed's Table 1, one row per link (this host's own too), with
    /// whether the link is in this host's upstream schedule.
    fn peer_rows(&self) -> Vec<Value> {
        let sched: Vec<u8> = self
            .schedule
            .iter()
            .flatten()
            .filter(|(_, k, _)| *k > 0)
            .map(|(l, _, _)| *l)
            .collect();
        let mut rows: Vec<Value> = self
            .own
            .iter()
            .map(|o| {
                json!({
                    "address": self.lan_ip.to_string(), "link": o.ad.id, "port": o.ad.port,
                    "missed": 0, "up": o.ad.up, "down": o.ad.down,
                    "self": true, "in_use": sched.contains(&o.ad.id),
                })
            })
            .collect();
        for r in self.peers.rows(Instant::now()) {
            rows.push(json!({
                "address": r.address.to_string(), "link": r.link, "port": r.port,
                "missed": r.missed, "up": r.up, "down": r.down,
                "self": false, "in_use": r.link != 0 && sched.contains(&r.link),
            }));
        }
        rows
    }

    fn metrics(&self) -> Result<String> {
        let mut m = Metrics::default();
        let stats = self.maps.terminal_link_stats()?;
        m.family(
            "bond_link_packets_total",
            "counter",
            "Packets carried per link: up/down as origin, relay_up/relay_down for peers.",
        );
        for (id, _, s) in &stats {
            for (dir, v) in [
                ("up", s.up_pkts),
                ("down", s.down_pkts),
                ("relay_up", s.relay_up_pkts),
                ("relay_down", s.relay_down_pkts),
            ] {
                m.sample(
                    "bond_link_packets_total",
                    &[("link", id.to_string()), ("direction", dir.into())],
                    v,
                );
            }
        }
        m.family(
            "bond_link_bytes_total",
            "counter",
            "Bytes of carried (inner) packets per link.",
        );
        for (id, _, s) in &stats {
            for (dir, v) in [
                ("up", s.up_bytes),
                ("down", s.down_bytes),
                ("relay_up", s.relay_up_bytes),
                ("relay_down", s.relay_down_bytes),
            ] {
                m.sample(
                    "bond_link_bytes_total",
                    &[("link", id.to_string()), ("direction", dir.into())],
                    v,
                );
            }
        }
        m.family(
            "bond_link_late_packets_total",
            "counter",
            "Packets for this host that came over a link after one the server sent later.",
        );
        for (id, _, s) in &stats {
            m.sample(
                "bond_link_late_packets_total",
                &[("link", id.to_string())],
                s.down_late,
            );
        }
        let rows = self.peer_rows();
        m.family(
            "bond_link_weight",
            "gauge",
            "Announced weight per link and direction.",
        );
        for r in &rows {
            for dir in ["up", "down"] {
                m.sample(
                    "bond_link_weight",
                    &[("link", r["link"].to_string()), ("direction", dir.into())],
                    &r[dir],
                );
            }
        }
        m.family(
            "bond_link_missed_announces",
            "gauge",
            "Announces missed by each link's owner.",
        );
        for r in &rows {
            m.sample(
                "bond_link_missed_announces",
                &[("link", r["link"].to_string())],
                &r["missed"],
            );
        }
        m.family(
            "bond_drops_total",
            "counter",
            "Packets dropped by the datapath, by reason.",
        );
        for (why, v) in self.maps.terminal_drops()? {
            m.sample("bond_drops_total", &[("reason", why.into())], v);
        }
        self.rejects.metrics(&mut m);
        self.faults.metrics(&mut m);
        m.family(
            "bond_logged_on",
            "gauge",
            "1 while the terminal holds a session.",
        );
        m.sample("bond_logged_on", &[], u8::from(self.token.is_some()));
        m.family(
            "bond_capture_routed",
            "gauge",
            "1 while captured traffic goes into the capture device (bonded, or dropped with fallback = \"drop\"), 0 while it goes by the host's own routes.",
        );
        m.sample(
            "bond_capture_routed",
            &[],
            u8::from(self.captured == Some(true)),
        );
        m.family("bond_peers", "gauge", "Live LAN peers.");
        m.sample("bond_peers", &[], self.peers.peers().count());
        for s in &self.services {
            s.metrics(&mut m);
        }
        Ok(m.finish())
    }
}

fn show_addr(a: Option<Ipv4Addr>) -> String {
    a.map_or_else(|| "none".into(), |a| a.to_string())
}

fn spawn_reader(
    sock: Arc<UdpSocket>,
    from: From,
    tx: mpsc::Sender<Received>,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            match recv_stamped(&sock, &mut buf).await {
                Ok((n, src, at_ns)) => {
                    let r = Received {
                        from,
                        buf: buf[..n].to_vec(),
                        src,
                        at_ns,
                    };
                    if tx.send(r).await.is_err() {
                        return;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .abort_handle()
}

/// Which of a host's `n` own links a message to the server goes over:
/// an announce (`every`) over each of them, a dark one's too (it is back
/// with the link); anything else over the first lit one (`lit`), or, when
/// none is, over the first at all unless a peer relays it (`relayed`).
fn own_links_to_server(n: usize, every: bool, lit: Option<usize>, relayed: bool) -> Vec<usize> {
    match (every, lit) {
        (true, _) => (0..n).collect(),
        (false, Some(i)) => vec![i],
        (false, None) if relayed => Vec::new(),
        (false, None) => (0..n.min(1)).collect(),
    }
}

/// Whether the capture prefixes are routed into the capture device: while
/// the terminal can bond, and always with `fallback = "drop"`.
fn capture_wanted(fallback: Fallback, can_bond: bool) -> bool {
    can_bond || fallback == Fallback::Drop
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_traffic_is_routed_in_while_bonding_or_told_to_drop() {
        assert!(capture_wanted(Fallback::Direct, true));
        assert!(!capture_wanted(Fallback::Direct, false));
        assert!(capture_wanted(Fallback::Drop, true));
        assert!(capture_wanted(Fallback::Drop, false));
    }

    #[test]
    fn messages_reach_the_server_over_a_lit_link_or_through_a_peer() {
        // Announces: every own link, lit or not.
        assert_eq!(own_links_to_server(3, true, Some(1), false), [0, 1, 2]);
        assert_eq!(own_links_to_server(2, true, None, true), [0, 1]);
        // Anything else: the first lit link...
        assert_eq!(own_links_to_server(3, false, Some(2), false), [2]);
        // ...or the peer alone when every own link is dark...
        assert!(own_links_to_server(2, false, None, true).is_empty());
        // ...or the first own link when no peer can relay; none without.
        assert_eq!(own_links_to_server(2, false, None, false), [0]);
        assert!(own_links_to_server(0, false, None, false).is_empty());
    }
}
