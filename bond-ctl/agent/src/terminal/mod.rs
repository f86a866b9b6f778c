//! The terminal agent: announces itself, keeps the peer table, logs on to
//! the server, measures its links, and writes the upstream links, schedule
//! and neighbours the programs use.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::TcAttachType;
use bond_common::{
    maps::{
        LINK_L3, LINK_V6, LINK_VALID, MAX_LINK_IDS, RelayLink, TerminalConfig as TerminalMap,
        UpLink, name,
    },
    wire::OUTER_LEN,
};
use serde_json::Value;
use tokio::{net::UdpSocket, sync::mpsc};

use super::{Exit, Pins, Tally};
use bond_api::{
    Call, Metrics, Request, Service,
    reply::{
        self as api, Detached, Draining, PeerRow, Peers, Reloaded, Status, TerminalStatus, UpPath,
        WeightMode, WeightSet, WeightState,
    },
};
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
use bond_proto::{
    control::{self, Body, Counter, Gap, Guard, LinkAd, LinkQueue, LinkShare, Msg, Reply, flags},
    identity::Identity,
    session,
};

/// Tags of sent messages kept for the server's replies to name: seconds of
/// echoes and announces over many links (probes are not kept).
const SENT_KEPT: usize = 1024;
/// LOGINs kept (one an announce interval while not logged on).
const LOGINS_KEPT: usize = 16;

/// How often a peer's SESSION_LOST may have this host ask the server
/// after its own session.
const SESSION_CHECK: Duration = Duration::from_millis(200);

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

    fn state(&self) -> WeightState {
        WeightState {
            mode: match self.spec {
                WeightSpec::Fixed(_) => WeightMode::Fixed,
                WeightSpec::Auto => WeightMode::Auto,
            },
            measured_kbps: self.est.rate(),
        }
    }
}

/// One of this host's WAN links.
struct Own {
    ad: LinkAd,
    up: Weight,
    down: Weight,
    iface: Iface,
    /// Where the server is over this link: its IPv4 address, or its
    /// IPv6 one for a link over IPv6 (`addr` IPv6).
    server: SocketAddr,
    /// The next hop towards the server, of `server`'s family; unspecified
    /// while an `auto` one is not known (no default route on the
    /// interface).
    gateway: IpAddr,
    /// The configured next hop (`gateway`; none: the server itself).
    next_hop: Option<Gateway>,
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
    /// The interface's IPv4 address, or else its global IPv6 address when
    /// the server has one (a link over IPv6); `None` while it has neither
    /// (or is gone: `iface.index` is then 0). `crate::linkwatch` follows
    /// both.
    addr: Option<IpAddr>,
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
        !self.iface.carrier || self.addr.is_none() || self.via().is_some_and(|g| g.is_unspecified())
    }

    /// Whether the link goes over IPv6 (its datapath entries say
    /// `LINK_V6`; its wrap is 20 bytes longer).
    fn v6(&self) -> bool {
        self.addr.is_some_and(|a| a.is_ipv6())
    }

    /// The flags of the link's datapath entries but `LINK_VALID`:
    /// [`LINK_L3`] without Ethernet, [`LINK_V6`] over IPv6.
    fn kind(&self) -> u8 {
        let l3 = if self.iface.ethernet { 0 } else { LINK_L3 };
        l3 | if self.v6() { LINK_V6 } else { 0 }
    }

    /// The largest wrapped packet the link takes in the IPv4 form every
    /// host and the server wrap in: over IPv6, 20 bytes less than the
    /// link's MTU. What it announces and sizes bond0 by.
    fn ipv4_form_mtu(&self) -> u16 {
        let grow = if self.v6() { 20 } else { 0 };
        self.entry.mtu.saturating_sub(grow)
    }

    /// The next hop the route to the server goes by: the gateway behind
    /// Ethernet; none on an L3 link (PPP, a raw-IP modem, a tunnel), whose
    /// far end takes every packet.
    fn via(&self) -> Option<IpAddr> {
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

    /// Reverse-path filtering on the link's interface: loose (2), since
    /// the inner packets handed up there (pure ACKs) come from addresses
    /// routed into bond0; off over IPv6, where the interface has no IPv4
    /// address and the kernel drops every IPv4 packet that arrives on it
    /// under any filter. (`net.ipv4.conf.all.rp_filter`, if set, still
    /// applies: the log says so.)
    fn filter_sources(&self) -> Result<()> {
        if self.iface.index == 0 {
            return Ok(());
        }
        let name = &self.iface.name;
        let loose = if self.v6() { "0" } else { "2" };
        sysctl(&format!("net.ipv4.conf.{name}.rp_filter"), loose)?;
        let all = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter");
        if self.v6() && all.is_ok_and(|a| a.trim() != "0") {
            tracing::warn!(
                "link {}: net.ipv4.conf.all.rp_filter is on: IPv4 that arrives on {name} (no IPv4 address) is dropped; set it to 0 for a link over IPv6",
                self.ad.id
            );
        }
        Ok(())
    }

    /// Takes the interface as it is now into the link and its datapath
    /// entries (which the caller writes).
    fn set_iface(&mut self, now: Iface) {
        (self.entry.ifindex, self.entry.src_mac) = (now.index, now.mac);
        (self.relay.wan_ifindex, self.relay.wan_mac) = (now.index, now.mac);
        self.iface = now;
        self.relay.flags = self.kind();
    }
}

/// A link's address: its interface's IPv4 address, or else, when the
/// server has an IPv6 address (`v6`), its global IPv6 address.
async fn link_address(net: &Net, iface: &Iface, v6: bool) -> Option<IpAddr> {
    if iface.index == 0 {
        return None;
    }
    match net.ipv4(iface).await {
        Ok(a) => Some(a.into()),
        Err(_) if v6 => net.ipv6(iface).await.ok().map(IpAddr::V6),
        Err(_) => None,
    }
}

/// A link's address as its datapath entries' IPv4 word: 0 over IPv6
/// (`T_LINKS6` has the address) or without one.
fn ipv4_word(addr: Option<IpAddr>) -> u32 {
    match addr {
        Some(IpAddr::V4(a)) => u32::from(a),
        _ => 0,
    }
}

/// Where the server is for a link of address `addr`: its IPv6 address
/// for a link over IPv6, else its IPv4 one.
fn server_for(cfg: &bond_config::ServerAddr, addr: Option<IpAddr>) -> SocketAddr {
    match (addr, cfg.address6) {
        (Some(IpAddr::V6(_)), Some(a6)) => SocketAddr::from((a6, cfg.port)),
        _ => SocketAddr::from((cfg.address, cfg.port)),
    }
}

/// Link `iface`'s next hop to `server` (of its family): the configured
/// one, the interface's default route's (`auto`; unspecified while it has
/// none), or the server itself. A configured one of the other family is
/// none (the link is out of use, and the log says why).
async fn next_hop(
    net: &Net,
    configured: Option<Gateway>,
    server: IpAddr,
    iface: &Iface,
) -> Result<IpAddr> {
    let none = match server {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    Ok(match configured {
        None => server,
        Some(Gateway::At(a)) if a.is_ipv4() == server.is_ipv4() => a,
        Some(Gateway::At(_)) => none,
        Some(Gateway::Auto) if iface.index == 0 => none,
        Some(Gateway::Auto) => net
            .default_gateway(iface.index, server.is_ipv6())
            .await?
            .unwrap_or(none),
    })
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

/// The socket a control message arrived on.
#[derive(Clone, Copy, Debug)]
enum Socket {
    Lan,
    /// Over the own link with this index in `own`.
    Link(usize),
}

struct Received {
    from: Socket,
    buf: Vec<u8>,
    src: SocketAddr,
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
    /// This terminal's own key (`identity`): signs what it says to the
    /// server of its session.
    identity: Option<Identity>,
    /// With the server's site key pinned (`[server] key`): this login's
    /// exchange key pair, kept until the server asks for a new login, and
    /// the session's key made with it (`bond_proto::session`).
    exchange: Option<bond_proto::session::Exchange>,
    session: Option<bond_proto::session::SessionKey>,
    /// The server said it keys no session here (an open community).
    unkeyed: bool,
    /// The tags of the last messages it sent the server in this session,
    /// and of its LOGINs with this login's exchange key: what a
    /// LOGIN_REPLY may answer (an Ok, only the second).
    sent: std::collections::VecDeque<[u8; control::TAG_LEN]>,
    logins: std::collections::VecDeque<[u8; control::TAG_LEN]>,
    /// The server refused it (its community takes terminals by key, and
    /// not this one's): its links are announced dark to the LAN, as the
    /// server would drop what its peers sent over them.
    refused: bool,
    /// When a peer's SESSION_LOST last had this host ask after its own.
    session_checked: Option<Instant>,
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
    /// The downstream playout, unless the configuration turns it off.
    playout: Option<playout::Handle>,
    /// Keeps this host's upstream schedule true from the server's feedback.
    corrector: Corrector,
    /// What the server asked to be sent again, and what was.
    resends: resend::Resend,
    probe_round: u32,
}

mod event;
mod links;
mod measure;
mod operator;
mod start;
mod sync;

pub use start::run;

impl Agent {
    /// The smallest of the LAN's MTU and the own links' (in the IPv4
    /// form): the most a wrapped packet may be on this host's own paths.
    fn own_mtu(&self) -> u32 {
        let own = self.own.iter().map(|o| u32::from(o.ipv4_form_mtu()));
        own.fold(self.lan.mtu, u32::min)
    }
}

fn show_addr(a: Option<impl std::fmt::Display>) -> String {
    a.map_or_else(|| "none".into(), |a| a.to_string())
}

fn spawn_reader(
    sock: Arc<UdpSocket>,
    from: Socket,
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
