//! The server agent: logs terminals on, learns each community's links from
//! their announces, expires the silent ones, writes sessions, links and
//! downstream schedules to the maps, and measures and serves trains for
//! terminals that weigh their links by measurement.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use bond_common::maps::{ServerConfig as ServerMap, ServerLink};
use bond_config::ServerConfig;
use bond_datapath::{Maps, flows::FlowTable};
use bond_proto::{
    CommunityKey,
    control::{Counter, Guard},
};
use tokio::net::UdpSocket;

use crate::{
    Tally, feedback::Corrector, membership::ServerTable, pathmon::Echoes, playout, probe::TrainRx,
    resend, split,
};

/// A terminal is asked to log on again, or told it is refused, at most
/// this often.
const NUDGE_EVERY: Duration = Duration::from_millis(100);
/// How often the server looks at the links whose echoes are late.
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
type TrainKey = (u32, Ipv4Addr, u8, u32);

struct Agent {
    cfg: ServerConfig,
    maps: Maps,
    /// The communities served and their keys: from the file, or from the
    /// registry (`[tier]`).
    keys: BTreeMap<u32, CommunityKey>,
    /// The terminals each community takes by key, if it does, and those
    /// refused a login (logged once each).
    identities: admit::Identities,
    /// The site's key (`site_key`): signs every LOGIN_REPLY and keys the
    /// sessions of terminals that pin it.
    site: Option<bond_proto::identity::Identity>,
    /// When each terminal was last asked to log on or refused.
    nudged: HashMap<(u32, std::net::Ipv4Addr), Instant>,
    refused: std::collections::BTreeSet<(u32, std::net::Ipv4Addr)>,
    /// This node in the tier's registry (`[tier]` only), and what the
    /// registry last said it serves.
    tier: Option<bond_tier::node::Node>,
    served: bond_tier::node::Served,
    /// The other nodes and the communities they own, passed on to them
    /// when a director steers them here (`[tier]` only).
    nodes: Option<crate::nodes::NodeTable>,
    /// Live flows per community as of the last sweep, and when that
    /// sweep began (what a draining node waits for); when this node was
    /// first seen draining; the communities it released, with when.
    live_flows: (BTreeMap<u32, u64>, Option<Instant>),
    drain_seen: Option<Instant>,
    released: BTreeMap<u32, Instant>,
    table: ServerTable,
    guard: Guard,
    counter: Counter,
    sock: UdpSocket,
    /// The socket on `address6`, for links over IPv6 (none without it).
    sock6: Option<UdpSocket>,
    /// Links written to the maps, by (community, link id).
    applied: BTreeMap<(u32, u8), Applied>,
    free_idx: Vec<u32>,
    next_idx: u32,
    rejects: Tally,
    /// Steps that failed and were survived.
    faults: Tally,
    /// Upstream trains in flight, with when they started and where the
    /// report goes.
    trains: HashMap<TrainKey, (TrainRx, Instant, SocketAddr)>,
    /// When each (community, link) last got a downstream train.
    sent_trains: HashMap<(u32, u8), Instant>,
    /// When each (community, link) last brought its owner's echo, and
    /// whether it is dark for missing them (`crate::pathmon`).
    echoes: Echoes,
    adopted: bool,
    started: Instant,
    /// How each program is attached, by (hook, interface).
    attached: std::collections::BTreeMap<(&'static str, String), &'static str>,
    /// The flow table as of the last sweep (for `status` and metrics).
    pub flows: FlowTable,
    /// The NAT pool: each community's address and blocks of ports.
    nat: blocks::Blocks,
    /// S_CONFIG as written; its `link_mtu` follows the links.
    map_cfg: ServerMap,
    /// The smallest MTU each community announced for its live links.
    community_mtu: HashMap<u32, u16>,
    /// The configuration file, read again on `reload` and SIGHUP.
    path: PathBuf,
    /// The upstream playout, unless the configuration turns it off.
    playout: Option<playout::Handle>,
    /// Cuts replies too big for the links (without DF) into fragments.
    splitter: split::Splitter,
    /// Keeps the downstream schedules true from the origins' feedback.
    corrector: Corrector,
    /// What origins asked to be sent again, and what was.
    resends: resend::Resend,
    /// Relative delays (ns) of the links found at adoption, by community
    /// and link index, used until each link's owner announces again.
    adopted_delay: HashMap<(u32, u32), u32>,
}

/// A link as written to the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Applied {
    idx: u32,
    entry: ServerLink,
    /// Where it is: `entry`'s address and port, or for a link over IPv6
    /// (whose `entry.ip` is 0) its IPv6 address (`S_LINKS6`).
    addr: SocketAddr,
}

mod admit;
mod blocks;
mod deny;
mod event;
pub mod nat;
mod operator;
mod start;
mod sync;

pub use start::run;
