//! The agent's configuration file (TOML). Every field is checked at load
//! time; an error names the field and the bad value.

use std::{collections::HashSet, net::Ipv4Addr, path::Path, time::Duration};

use bond_common::{
    maps::{FLOW_CLOSING, Flow, FlowKey},
    wire::{IPPROTO_ICMP, IPPROTO_TCP},
};

use bond_proto::CommunityKey;
use serde::{Deserialize, Serialize};

pub const DEFAULT_PORT: u16 = 7700;
/// The largest weight: measured weights are kbit/s, so 10 Gbit/s.
pub const MAX_WEIGHT: u32 = 10_000_000;

/// Announces a sender may miss before it counts as gone.
pub const DEFAULT_MISSES: u32 = 3;

/// A weight as set by hand or left to measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightSpec {
    Fixed(u32),
    Auto,
}

impl std::fmt::Display for WeightSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl WeightSpec {
    /// A fixed weight, if `n` is one (at most [`MAX_WEIGHT`]).
    pub fn fixed(n: u32) -> Option<Self> {
        (n <= MAX_WEIGHT).then_some(Self::Fixed(n))
    }
}

impl std::str::FromStr for WeightSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        s.parse()
            .ok()
            .and_then(Self::fixed)
            .ok_or_else(|| format!("weight {s:?}: want 0..={MAX_WEIGHT} or \"auto\""))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub enum Config {
    Terminal(TerminalConfig),
    Server(ServerConfig),
}

/// The `role` key that picks the file's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Terminal,
    Server,
}

/// Just the role, read first. The file is then deserialized straight into
/// that role's struct (not through a serde-tagged enum, which buffers the
/// values and loses toml's key and line in errors).
#[derive(Deserialize)]
struct Head {
    role: Role,
}

fn check_key(field: &str, key: &CommunityKey) -> Check {
    match key.weakness() {
        Some(why) => err(field, why),
        None => Ok(()),
    }
}

/// An IPv4 prefix such as "203.0.113.0/24" or "default".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "default" {
            return Ok(Self {
                addr: Ipv4Addr::UNSPECIFIED,
                len: 0,
            });
        }
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("capture: prefix {s:?} needs a /length"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("capture: prefix {s:?}: bad address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("capture: prefix {s:?}: bad length"))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if u32::from(addr) & !mask != 0 {
            return Err(format!("capture: prefix {s:?} has host bits set"));
        }
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalConfig {
    /// Always [`Role::Terminal`].
    pub role: Role,
    /// Names the pin directory, `/sys/fs/bpf/bond/<instance>`.
    #[serde(default = "default_instance")]
    pub instance: String,
    pub community: u16,
    /// The community key: signs every control message.
    pub key: CommunityKey,
    /// How often to announce (ms); peers drop this host after `misses`.
    #[serde(default = "default_announce_ms")]
    pub announce_ms: u32,
    /// Announces a peer may miss before it is dropped.
    #[serde(default = "default_misses")]
    pub misses: u32,
    /// The LAN interface; the terminal's LAN address is its IPv4 address.
    pub lan: String,
    /// Port every terminal receives DATA_DOWN on over the LAN.
    #[serde(default = "default_port")]
    pub data_port: u16,
    /// The capture device the agent creates.
    #[serde(default = "default_device")]
    pub device: String,
    /// Destinations routed into the capture device (and so bonded).
    pub capture: Vec<Prefix>,
    pub server: ServerAddr,
    /// This host's own WAN links (none: it only originates).
    #[serde(default)]
    pub links: Vec<OwnLink>,
    /// How often links with an `auto` weight are measured (ms).
    #[serde(default = "default_probe_ms")]
    pub probe_ms: u32,
    /// Hold each downstream packet until the farthest link in use could
    /// have delivered it, and release in the order sent (`bond_agent::playout`).
    /// Off: packets go up as they arrive, reordered wherever the links'
    /// delays or the server's estimates differ.
    #[serde(default = "default_true")]
    pub playout: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// The distribution service (`[dist]`, optional): relay-tree file
    /// distribution among the community's terminals.
    pub dist: Option<DistConfig>,
    /// The peer cache (`[cache]`, optional): objects this terminal fetched,
    /// served to the community, and a forward proxy that looks for them
    /// among the peers before the slow uplinks.
    pub cache: Option<CacheConfig>,
    /// How the programs are attached (`[attach]`, optional).
    #[serde(default)]
    pub attach: AttachConfig,
    /// What captured traffic does while this terminal cannot bond (no
    /// session, or no link that reaches the server).
    #[serde(default)]
    pub fallback: Fallback,
}

/// `fallback`: where captured traffic goes while the terminal cannot bond.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// By the host's own routes: the capture routes are withdrawn until
    /// bonding works again (a gateway keeps its Internet when its server
    /// is away).
    #[default]
    Direct,
    /// Into the capture device regardless, where it is dropped and counted
    /// (`no_links`): nothing leaves unbonded.
    Drop,
}

/// `[attach]`: how the programs are attached to their interfaces. The
/// defaults choose what the kernel and driver offer; the others force a
/// way, for a kernel or driver that misreports what it has, or to run the
/// fallbacks on a kernel that would not need them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachConfig {
    #[serde(default)]
    pub tc: TcAttach,
    #[serde(default)]
    pub xdp: XdpAttach,
    #[serde(default)]
    pub veth: VethAttach,
}

/// What the agent does about a veth it attaches XDP to (a container's or
/// a lab's interface): its other end must hand frames on with finished
/// checksums and take the frames XDP sends it (`crate::veth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VethAttach {
    /// Find the other end and set it so (`tx off`, `gro on`); refuse to
    /// start if it cannot be reached, saying what to run there.
    #[default]
    Auto,
    /// The operator has set the other end: nothing is checked.
    Trust,
}

/// How the TC program goes on the capture device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and later), else netlink.
    #[default]
    Auto,
    /// A BPF link on the TCX hook (kernel 6.6 and later).
    Tcx,
    /// A `cls_bpf` filter on a `clsact` qdisc, through netlink (any kernel
    /// bond runs on).
    Netlink,
}

/// How the XDP programs go on their interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttach {
    /// In the driver where it has XDP, else generic.
    #[default]
    Auto,
    /// In the driver only: an interface whose driver has no XDP is refused.
    Native,
    /// Generic XDP (in the stack, after the socket buffer is built):
    /// slower, on any interface.
    Generic,
}

/// `[dist]`: every key optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// TCP port of the service on the LAN address; the same on every
    /// terminal of the community.
    #[serde(default = "default_dist_port")]
    pub port: u16,
    /// The network information database (`net.db`) and received files
    /// (`files/`); default `/var/lib/bond/<instance>`.
    pub state_dir: Option<std::path::PathBuf>,
}

fn default_dist_port() -> u16 {
    7800
}

/// `[cache]`: every key optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// TCP (objects, referrals) and UDP (LAN queries) port on the LAN
    /// address; the same on every terminal of the community.
    #[serde(default = "default_cache_port")]
    pub port: u16,
    /// Where cached objects live; default `<state>/cache`.
    pub dir: Option<std::path::PathBuf>,
    /// Most the cache holds on disk, MiB; the least recently used objects
    /// go first.
    #[serde(default = "default_cache_mib")]
    pub max_mib: u64,
    /// Workload limit: uploads to peers at once (more are refused with 503).
    #[serde(default = "default_uploads")]
    pub max_uploads: u32,
    /// Workload limit: what all uploads to peers send together, Mbit/s
    /// (0: no limit).
    #[serde(default)]
    pub upload_mbit: u32,
    /// The referral server's LAN address (it listens on `port`); none: ask
    /// the LAN only.
    pub referral: Option<Ipv4Addr>,
    /// Run the referral server here.
    #[serde(default)]
    pub referral_server: bool,
    /// The local forward proxy for browsers, package managers and
    /// `bond-ctl fetch`.
    #[serde(default = "default_proxy")]
    pub proxy: std::net::SocketAddr,
    /// A cached copy is used without asking the origin for this long after
    /// it was fetched or revalidated (s).
    #[serde(default = "default_fresh_s")]
    pub fresh_s: u32,
    /// A peer that sends at least this fast (Mbit/s) is taken at once,
    /// without waiting for the other probes (0: wait, take the fastest).
    #[serde(default)]
    pub target_mbit: u32,
    /// How long the referral server has to answer before the LAN is asked
    /// (ms).
    #[serde(default = "default_referral_wait_ms")]
    pub referral_wait_ms: u32,
}

fn default_cache_port() -> u16 {
    7801
}
fn default_cache_mib() -> u64 {
    1024
}
fn default_uploads() -> u32 {
    4
}
fn default_proxy() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 3128))
}
fn default_fresh_s() -> u32 {
    300
}
fn default_referral_wait_ms() -> u32 {
    500
}

impl TerminalConfig {
    /// Where the peer cache keeps its objects.
    pub fn cache_dir(&self) -> std::path::PathBuf {
        self.cache
            .as_ref()
            .and_then(|c| c.dir.clone())
            .unwrap_or_else(|| {
                Path::new("/var/lib/bond")
                    .join(&self.instance)
                    .join("cache")
            })
    }

    /// Where the distribution service keeps its state.
    pub fn dist_state(&self) -> std::path::PathBuf {
        self.dist
            .as_ref()
            .and_then(|d| d.state_dir.clone())
            .unwrap_or_else(|| Path::new("/var/lib/bond").join(&self.instance))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerAddr {
    pub address: Ipv4Addr,
    #[serde(default = "default_port")]
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnLink {
    /// The link's id in the community (the bond header's link byte).
    pub id: u8,
    pub interface: String,
    /// UDP port this link receives relayed traffic on (LAN and WAN side).
    pub port: u16,
    /// Next hop towards the server: an address, or "auto" (the next hop
    /// of the interface's default route, followed as DHCP or a modem
    /// manager changes it); default: the server itself (on-link).
    #[serde(default, deserialize_with = "opt_gateway")]
    pub gateway: Option<Gateway>,
    /// Weight in both directions, unless `up` or `down` says otherwise:
    /// the link's rate in kbit/s, or "auto" (measured; the default).
    #[serde(default = "default_weight", deserialize_with = "weight_spec")]
    pub weight: WeightSpec,
    /// Upstream weight: the link's share of the community's upload.
    #[serde(default, deserialize_with = "opt_weight_spec")]
    pub up: Option<WeightSpec>,
    /// Downstream weight: its share of what the server sends back.
    #[serde(default, deserialize_with = "opt_weight_spec")]
    pub down: Option<WeightSpec>,
    /// IP MTU of the WAN path; default: the interface's MTU.
    pub mtu: Option<u16>,
}

impl OwnLink {
    pub fn up(&self) -> WeightSpec {
        self.up.unwrap_or(self.weight)
    }
    pub fn down(&self) -> WeightSpec {
        self.down.unwrap_or(self.weight)
    }
}

/// A weight in the file: a number, or "auto".
fn weight_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<WeightSpec, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = WeightSpec;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a weight 0..={MAX_WEIGHT} or \"auto\"")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<WeightSpec, E> {
            u32::try_from(v)
                .ok()
                .and_then(WeightSpec::fixed)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<WeightSpec, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WeightSpec, E> {
            v.parse()
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
    }
    d.deserialize_any(V)
}

fn opt_weight_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<WeightSpec>, D::Error> {
    weight_spec(d).map(Some)
}

/// A link's next hop towards the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gateway {
    /// This address (a modem's, a router's on the link).
    At(Ipv4Addr),
    /// The next hop of the interface's default route, as it changes.
    Auto,
}

fn opt_gateway<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Gateway>, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "auto" => Ok(Some(Gateway::Auto)),
        _ => s.parse().map(|a| Some(Gateway::At(a))).map_err(|_| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&s),
                &"an IPv4 address or \"auto\"",
            )
        }),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Always [`Role::Server`].
    pub role: Role,
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The address terminals send to.
    pub address: Ipv4Addr,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Source address of flows towards content servers.
    pub nat_address: Ipv4Addr,
    /// Dedicated ports, "first-last".
    #[serde(default = "default_nat_ports")]
    pub nat_ports: String,
    /// Interfaces the server program is attached to.
    pub interfaces: Vec<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Announces a terminal or link may miss before it is dropped.
    #[serde(default = "default_misses")]
    pub misses: u32,
    /// The smallest MTU of the terminals' WAN links: a reply that would not
    /// fit one once wrapped is answered with ICMP fragmentation needed
    /// (next-hop MTU `link_mtu` - 52) rather than lost.
    #[serde(default = "default_link_mtu")]
    pub link_mtu: u16,
    /// Most terminals logged on at once, over all communities: the size of
    /// the session table. A login beyond it is refused until one leaves.
    #[serde(default = "default_max_terminals")]
    pub max_terminals: u32,
    #[serde(default)]
    pub communities: Vec<Community>,
    /// Flow table size and idle timeouts (`[flows]`, optional).
    #[serde(default)]
    pub flows: FlowsConfig,
    /// Hold each upstream packet until the farthest link in use could have
    /// delivered it, and release in the order sent (`bond_agent::playout`).
    #[serde(default = "default_true")]
    pub playout: bool,
    /// How the programs are attached (`[attach]`, optional; only `xdp`
    /// applies: the server has no TC program).
    #[serde(default)]
    pub attach: AttachConfig,
}

/// The server's `[flows]` table: every key optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsConfig {
    /// Entries of the flow table and its reverse map; default: the number
    /// of dedicated ports. Every flow holds one port, so it must be at
    /// least that (a smaller table would refuse flows while ports sit
    /// free) and at most [`MAX_FLOWS`].
    pub max: Option<u32>,
    /// Idle timeouts in seconds: TCP without FIN or RST seen,
    #[serde(default = "default_tcp_established_s")]
    pub tcp_established_s: u32,
    /// TCP after a FIN or RST in either direction,
    #[serde(default = "default_tcp_closing_s")]
    pub tcp_closing_s: u32,
    /// UDP,
    #[serde(default = "default_udp_s")]
    pub udp_s: u32,
    /// and ICMP echo.
    #[serde(default = "default_icmp_s")]
    pub icmp_s: u32,
    /// How often the agent sweeps the table for idle flows (ms).
    #[serde(default = "default_sweep_ms")]
    pub sweep_ms: u32,
    /// Most flows one origin may hold at once (0: no limit): one host's
    /// flood of new flows cannot take every dedicated port.
    #[serde(default = "default_per_origin")]
    pub per_origin: u32,
}

/// The largest flow table the server agent creates.
pub const MAX_FLOWS: u32 = bond_common::maps::MAX_FLOWS;
/// Most terminals a server can hold sessions for.
pub const MAX_SESSIONS: u32 = bond_common::maps::MAX_SESSIONS;
/// The longest idle timeout accepted: a week.
pub const MAX_TIMEOUT_S: u32 = 7 * 24 * 3600;

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            max: None,
            tcp_established_s: default_tcp_established_s(),
            tcp_closing_s: default_tcp_closing_s(),
            udp_s: default_udp_s(),
            icmp_s: default_icmp_s(),
            sweep_ms: default_sweep_ms(),
            per_origin: default_per_origin(),
        }
    }
}

/// As CGNAT gives a subscriber: thousands of ports, not all of them.
fn default_per_origin() -> u32 {
    4096
}

fn default_tcp_established_s() -> u32 {
    7440
}
fn default_tcp_closing_s() -> u32 {
    120
}
fn default_udp_s() -> u32 {
    300
}
fn default_icmp_s() -> u32 {
    60
}
fn default_sweep_ms() -> u32 {
    1000
}

impl FlowsConfig {
    pub fn timeouts(&self) -> Timeouts {
        let s = |n: u32| std::time::Duration::from_secs(u64::from(n));
        Timeouts {
            tcp_established: s(self.tcp_established_s),
            tcp_closing: s(self.tcp_closing_s),
            udp: s(self.udp_s),
            icmp: s(self.icmp_s),
        }
    }

    pub fn sweep(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.sweep_ms))
    }

    /// The flow table's size for `ports` dedicated ports.
    pub fn table_size(&self, ports: u32) -> u32 {
        self.max.unwrap_or(ports)
    }

    fn check(&self, ports: u32) -> Check {
        if let Some(max) = self.max
            && !(ports..=MAX_FLOWS).contains(&max)
        {
            return err(
                "flows.max",
                format!(
                    "{max} is outside {ports}..={MAX_FLOWS} (at least one entry per dedicated port)"
                ),
            );
        }
        for (field, v) in [
            ("flows.tcp_established_s", self.tcp_established_s),
            ("flows.tcp_closing_s", self.tcp_closing_s),
            ("flows.udp_s", self.udp_s),
            ("flows.icmp_s", self.icmp_s),
        ] {
            if !(1..=MAX_TIMEOUT_S).contains(&v) {
                return err(field, format!("{v} is outside 1..={MAX_TIMEOUT_S}"));
            }
        }
        if self.tcp_closing_s > self.tcp_established_s {
            return err(
                "flows.tcp_closing_s",
                format!(
                    "{} is longer than tcp_established_s ({})",
                    self.tcp_closing_s, self.tcp_established_s
                ),
            );
        }
        if !(10..=60_000).contains(&self.sweep_ms) {
            return err(
                "flows.sweep_ms",
                format!("{} is outside 10..=60000", self.sweep_ms),
            );
        }
        if self.per_origin > MAX_FLOWS {
            return err(
                "flows.per_origin",
                format!("{} is outside 0..={MAX_FLOWS}", self.per_origin),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Community {
    pub id: u16,
    /// The key its terminals sign with.
    pub key: CommunityKey,
}

fn default_instance() -> String {
    "default".into()
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_device() -> String {
    "bond0".into()
}
/// Unset, a link is measured: weights are rates (kbit/s), and a guess
/// would steer the datapath wrong.
fn default_weight() -> WeightSpec {
    WeightSpec::Auto
}
fn default_true() -> bool {
    true
}

fn default_probe_ms() -> u32 {
    1000
}
fn default_announce_ms() -> u32 {
    1000
}
fn default_misses() -> u32 {
    DEFAULT_MISSES
}
fn default_link_mtu() -> u16 {
    1500
}

/// The smallest link MTU the server accepts: IPv4's minimum (RFC 791) plus
/// the wrap.
pub const MIN_LINK_MTU: u16 = 576 + bond_common::wire::OUTER_LEN as u16;

fn default_max_terminals() -> u32 {
    MAX_SESSIONS
}

fn default_nat_ports() -> String {
    "20000-29999".into()
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// Parses and checks a configuration; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        };
        let head: Head = toml::from_str(text).map_err(parse_err)?;
        let cfg = match head.role {
            Role::Terminal => Self::Terminal(toml::from_str(text).map_err(parse_err)?),
            Role::Server => Self::Server(toml::from_str(text).map_err(parse_err)?),
        };
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field,
            message,
        };
        match &cfg {
            Self::Terminal(t) => t.check().map_err(|(f, m)| invalid(f, m))?,
            Self::Server(s) => s.check().map_err(|(f, m)| invalid(f, m))?,
        }
        Ok(cfg)
    }

    /// Where to serve Prometheus metrics, if anywhere.
    pub fn metrics(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Terminal(t) => t.metrics,
            Self::Server(s) => s.metrics,
        }
    }

    pub fn instance(&self) -> &str {
        match self {
            Self::Terminal(t) => &t.instance,
            Self::Server(s) => &s.instance,
        }
    }

    /// How the programs are to be attached.
    pub fn attach(&self) -> AttachConfig {
        match self {
            Self::Terminal(t) => t.attach,
            Self::Server(s) => s.attach,
        }
    }
}

type Check = Result<(), (String, String)>;

fn err(field: impl Into<String>, message: impl Into<String>) -> Check {
    Err((field.into(), message.into()))
}

fn check_instance(name: &str) -> Check {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        err(
            "instance",
            format!("{name:?} must be 1-64 of [A-Za-z0-9_-]"),
        )
    }
}

fn check_ifname(field: &str, name: &str) -> Check {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
        return err(
            field,
            format!("{name:?} is not an interface name (1-15 characters)"),
        );
    }
    Ok(())
}

fn check_misses(misses: u32) -> Check {
    if (1..=100).contains(&misses) {
        Ok(())
    } else {
        err("misses", format!("{misses} is outside 1..=100"))
    }
}

fn check_port(field: &str, port: u16) -> Check {
    if port == 0 {
        err(field, "port 0 is not allowed")
    } else {
        Ok(())
    }
}

impl TerminalConfig {
    fn check(&self) -> Check {
        if let Some(d) = &self.dist {
            check_port("dist.port", d.port)?;
        }
        if let Some(c) = &self.cache {
            check_port("cache.port", c.port)?;
            if self.dist.as_ref().is_some_and(|d| d.port == c.port) {
                return err("cache.port", format!("{} is dist.port too", c.port));
            }
            if c.max_mib == 0 {
                return err("cache.max_mib", "0: the cache could hold nothing");
            }
            if !(1..=1024).contains(&c.max_uploads) {
                return err(
                    "cache.max_uploads",
                    format!("{} is outside 1..=1024", c.max_uploads),
                );
            }
            if !(10..=60_000).contains(&c.referral_wait_ms) {
                return err(
                    "cache.referral_wait_ms",
                    format!("{} is outside 10..=60000", c.referral_wait_ms),
                );
            }
            check_port("cache.proxy", c.proxy.port())?;
        }
        check_instance(&self.instance)?;
        check_key("key", &self.key)?;
        if !(10..=60_000).contains(&self.announce_ms) {
            return err(
                "announce_ms",
                format!("{} is outside 10..=60000", self.announce_ms),
            );
        }
        check_misses(self.misses)?;
        if !(100..=60_000).contains(&self.probe_ms) {
            return err(
                "probe_ms",
                format!("{} is outside 100..=60000", self.probe_ms),
            );
        }
        check_ifname("lan", &self.lan)?;
        check_ifname("device", &self.device)?;
        check_port("data_port", self.data_port)?;
        check_port("server.port", self.server.port)?;
        if self.server.address.is_unspecified() || self.server.address.is_broadcast() {
            return err(
                "server.address",
                format!("{} is not a unicast address", self.server.address),
            );
        }
        if self.capture.is_empty() {
            return err(
                "capture",
                "list at least one prefix to bond (e.g. \"default\")",
            );
        }
        for (i, p) in self.capture.iter().enumerate() {
            if p.len > 0
                && (u32::from(self.server.address) ^ u32::from(p.addr)) >> (32 - u32::from(p.len))
                    == 0
            {
                return err(
                    format!("capture[{i}]"),
                    format!(
                        "{p} contains the server address {}: bonded packets would loop",
                        self.server.address
                    ),
                );
            }
        }
        let mut ids = HashSet::new();
        let mut ports = HashSet::new();
        for (i, l) in self.links.iter().enumerate() {
            check_ifname(&format!("links[{i}].interface"), &l.interface)?;
            check_port(&format!("links[{i}].port"), l.port)?;
            if !ids.insert(l.id) {
                return err(
                    format!("links[{i}].id"),
                    format!("link id {} is used twice", l.id),
                );
            }
            if !ports.insert(l.port) || l.port == self.data_port {
                return err(
                    format!("links[{i}].port"),
                    format!("port {} is used twice", l.port),
                );
            }
            if let Some(m) = l.mtu
                && m < 576
            {
                return err(
                    format!("links[{i}].mtu"),
                    format!("{m} is below the IPv4 minimum of 576"),
                );
            }
        }
        Ok(())
    }
}

impl ServerConfig {
    /// The dedicated port range.
    pub fn port_range(&self) -> Result<(u16, u16), String> {
        let (a, b) = self
            .nat_ports
            .split_once('-')
            .ok_or_else(|| format!("{:?} must be \"first-last\"", self.nat_ports))?;
        let (a, b): (u16, u16) = (
            a.trim()
                .parse()
                .map_err(|_| format!("{a:?} is not a port"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("{b:?} is not a port"))?,
        );
        if a == 0 || a > b {
            return Err(format!("{:?} is empty or starts at 0", self.nat_ports));
        }
        Ok((a, b))
    }

    fn check(&self) -> Check {
        check_instance(&self.instance)?;
        check_misses(self.misses)?;
        check_port("port", self.port)?;
        if self.attach.tc != TcAttach::Auto {
            return err(
                "attach.tc",
                "the server has no TC program (only `attach.xdp` applies)",
            );
        }
        let (lo, hi) = self
            .port_range()
            .map_err(|m| ("nat_ports".to_string(), m))?;
        if (lo..=hi).contains(&self.port) && self.address == self.nat_address {
            return err(
                "nat_ports",
                format!("range contains the server port {}", self.port),
            );
        }
        if !(MIN_LINK_MTU..=9000).contains(&self.link_mtu) {
            return err(
                "link_mtu",
                format!("{} is outside {MIN_LINK_MTU}..=9000", self.link_mtu),
            );
        }
        if !(1..=MAX_SESSIONS).contains(&self.max_terminals) {
            return err(
                "max_terminals",
                format!("{} is outside 1..={MAX_SESSIONS}", self.max_terminals),
            );
        }
        if self.interfaces.is_empty() {
            return err("interfaces", "list the interfaces to attach to");
        }
        for (i, n) in self.interfaces.iter().enumerate() {
            check_ifname(&format!("interfaces[{i}]"), n)?;
        }
        let mut ids = HashSet::new();
        for (c, com) in self.communities.iter().enumerate() {
            if !ids.insert(com.id) {
                return err(
                    format!("communities[{c}].id"),
                    format!("community {} is listed twice", com.id),
                );
            }
            check_key(&format!("communities[{c}].key"), &com.key)?;
        }
        self.flows.check(u32::from(hi - lo) + 1)?;
        Ok(())
    }

    /// How many dedicated ports `nat_ports` holds.
    pub fn port_count(&self) -> Result<u32, String> {
        self.port_range().map(|(lo, hi)| u32::from(hi - lo) + 1)
    }
}

/// How long a flow may stay idle, by protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP with no FIN or RST seen: RFC 5382 REQ-5 (at least 2 h 4 min).
    pub tcp_established: Duration,
    /// TCP after a FIN or RST in either direction (Linux conntrack's
    /// TIME_WAIT and FIN_WAIT figure).
    pub tcp_closing: Duration,
    /// UDP: RFC 4787 REQ-5 (at least 2 min, 5 min recommended).
    pub udp: Duration,
    /// ICMP echo: RFC 5508 REQ-1 (at least 60 s).
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(7440),
            tcp_closing: Duration::from_secs(120),
            udp: Duration::from_secs(300),
            icmp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The idle time after which this flow expires. Protocols the program
    /// does not create flows for (none today) get the UDP timeout.
    pub fn of(&self, key: &FlowKey, flow: &Flow) -> Duration {
        match key.proto {
            IPPROTO_TCP if flow.state & FLOW_CLOSING != 0 => self.tcp_closing,
            IPPROTO_TCP => self.tcp_established,
            IPPROTO_ICMP => self.icmp,
            _ => self.udp,
        }
    }

    /// Whether the flow has been idle at `now_ns` (CLOCK_MONOTONIC) for at
    /// least its timeout. A packet stamped after `now_ns` counts as idle 0.
    pub fn expired(&self, key: &FlowKey, flow: &Flow, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(flow.last_seen_ns);
        u128::from(idle) >= self.of(key, flow).as_nanos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERMINAL: &str = r#"
role = "terminal"
instance = "t1"
community = 1
key = "sixteen byte key"
lan = "lan0"
capture = ["203.0.113.0/24"]
server = { address = "198.51.100.1" }
[[links]]
id = 1
interface = "wan0"
port = 7701
weight = 2
[[links]]
id = 2
interface = "wan1"
port = 7702
down = 5
"#;

    #[test]
    fn parses_a_terminal() {
        let Config::Terminal(t) = Config::parse(TERMINAL, "t.toml").unwrap() else {
            panic!("not a terminal")
        };
        assert_eq!(t.key, CommunityKey::new("sixteen byte key"));
        assert!(
            !format!("{t:?}").contains("sixteen"),
            "the key stays secret"
        );
        assert_eq!((t.announce_ms, t.misses), (1000, 3));
        assert_eq!(t.data_port, DEFAULT_PORT);
        assert_eq!(t.server.port, DEFAULT_PORT);
        let fixed = WeightSpec::Fixed;
        assert_eq!((t.links[0].up(), t.links[0].down()), (fixed(2), fixed(2)));
        // An unset weight is measured: weights are rates (kbit/s).
        assert_eq!(
            (t.links[1].up(), t.links[1].down()),
            (WeightSpec::Auto, fixed(5))
        );
        let auto = TERMINAL.replace("down = 5", "down = \"auto\"");
        let Config::Terminal(t) = Config::parse(&auto, "t.toml").unwrap() else {
            panic!("not a terminal")
        };
        assert_eq!(t.links[1].down(), WeightSpec::Auto);
        assert_eq!(
            t.capture[0],
            Prefix {
                addr: Ipv4Addr::new(203, 0, 113, 0),
                len: 24
            }
        );
    }

    #[test]
    fn attach_modes_default_to_what_the_kernel_offers_and_can_be_forced() {
        let Config::Terminal(t) = Config::parse(TERMINAL, "t.toml").unwrap() else {
            panic!("not a terminal")
        };
        assert_eq!(t.attach, AttachConfig::default());
        assert_eq!(
            (t.attach.tc, t.attach.xdp),
            (TcAttach::Auto, XdpAttach::Auto)
        );
        let forced = format!("{TERMINAL}\n[attach]\ntc = \"netlink\"\nxdp = \"generic\"\n");
        let Config::Terminal(t) = Config::parse(&forced, "t.toml").unwrap() else {
            panic!("not a terminal")
        };
        assert_eq!(
            (t.attach.tc, t.attach.xdp),
            (TcAttach::Netlink, XdpAttach::Generic)
        );
        assert_eq!(t.attach.veth, VethAttach::Auto);
        let trusted = format!("{TERMINAL}\n[attach]\nveth = \"trust\"\n");
        let Config::Terminal(t) = Config::parse(&trusted, "t.toml").unwrap() else {
            panic!("not a terminal")
        };
        assert_eq!(t.attach.veth, VethAttach::Trust);
        let e = error_of(&format!("{TERMINAL}\n[attach]\nveth = \"fix\"\n"));
        assert!(e.contains("fix") && e.contains("trust"), "{e}");
        let e = error_of(&format!("{TERMINAL}\n[attach]\ntc = \"bpfilter\"\n"));
        assert!(e.contains("bpfilter") && e.contains("netlink"), "{e}");
        // The server has XDP programs only.
        let e = error_of(&format!("{SERVER}\n[attach]\ntc = \"netlink\"\n"));
        assert!(
            e.contains("attach.tc") && e.contains("no TC program"),
            "{e}"
        );
        let Config::Server(s) =
            Config::parse(&format!("{SERVER}\n[attach]\nxdp = \"native\"\n"), "s.toml").unwrap()
        else {
            panic!("not a server")
        };
        assert_eq!(s.attach.xdp, XdpAttach::Native);
    }

    #[test]
    fn a_gateway_is_an_address_or_auto_and_defaults_to_the_server() {
        let gateway = |g: &str| {
            let text = TERMINAL.replace("port = 7701\n", &format!("port = 7701\n{g}\n"));
            match Config::parse(&text, "t.toml") {
                Ok(Config::Terminal(t)) => Ok(t.links[0].gateway),
                Ok(_) => panic!("not a terminal"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(gateway(""), Ok(None));
        assert_eq!(
            gateway("gateway = \"198.51.100.133\""),
            Ok(Some(Gateway::At(Ipv4Addr::new(198, 51, 100, 133))))
        );
        assert_eq!(gateway("gateway = \"auto\""), Ok(Some(Gateway::Auto)));
        let e = gateway("gateway = \"the modem\"").unwrap_err();
        assert!(
            e.contains("gateway") && e.contains("the modem") && e.contains("\"auto\""),
            "{e}"
        );
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let cases = [
            (
                TERMINAL.replace("sixteen byte key", "short"),
                "key",
                "5 bytes",
            ),
            (
                TERMINAL.replace("lan = ", "announce_ms = 5\nlan = "),
                "announce_ms",
                "5 is outside",
            ),
            (
                TERMINAL.replace("lan = ", "misses = 0\nlan = "),
                "misses",
                "0 is outside",
            ),
            (
                TERMINAL.replace("port = 7701\nweight", "port = 0\nweight"),
                "links[0].port",
                "port 0",
            ),
            (
                TERMINAL.replace("id = 2\n", "id = 1\n"),
                "links[1].id",
                "link id 1",
            ),
            (
                TERMINAL.replace("203.0.113.0/24", "203.0.113.1/24"),
                "capture",
                "host bits",
            ),
            (
                TERMINAL.replace("203.0.113.0/24", "198.51.100.0/24"),
                "capture[0]",
                "loop",
            ),
            (
                TERMINAL.replace("lan = \"lan0\"", "lan = \"\""),
                "lan",
                "interface name",
            ),
            (
                TERMINAL.replace("instance = \"t1\"", "instance = \"a/b\""),
                "instance",
                "a/b",
            ),
            (
                TERMINAL.replace("lan = \"lan0\"", "lan = \"lan0\"\nbogus = 1"),
                "bogus",
                "unknown field",
            ),
            (
                TERMINAL.replace("role = \"terminal\"", "role = \"router\""),
                "role",
                "router",
            ),
            (
                TERMINAL.replace("community = 1", "community = 70000"),
                "community = 70000",
                "expected u16",
            ),
            (
                TERMINAL.replace("id = 1\n", "id = 300\n"),
                "id = 300",
                "expected u8",
            ),
            (
                TERMINAL.replace("weight = 2", "weight = -1"),
                "weight = -1",
                "expected a weight",
            ),
            (
                TERMINAL.replace("weight = 2", "weight = \"fast\""),
                "weight = \"fast\"",
                "or \"auto\"",
            ),
            (
                TERMINAL.replace("lan = ", "probe_ms = 5\nlan = "),
                "probe_ms",
                "5 is outside",
            ),
            (
                format!("{TERMINAL}[dist]\n[cache]\nport = 7800\n"),
                "cache.port",
                "7800 is dist.port too",
            ),
            (
                format!("{TERMINAL}[cache]\nmax_uploads = 0\n"),
                "cache.max_uploads",
                "0 is outside",
            ),
            (
                format!("{TERMINAL}[cache]\nmax_mib = 0\n"),
                "cache.max_mib",
                "could hold nothing",
            ),
            (
                format!("{TERMINAL}[cache]\nreferral_wait_ms = 5\n"),
                "cache.referral_wait_ms",
                "5 is outside",
            ),
            (
                format!("{TERMINAL}[cache]\nreferral = \"10.0.1\"\n"),
                "referral",
                "10.0.1",
            ),
            (
                format!("{TERMINAL}[cache]\nshare = true\n"),
                "share",
                "unknown field",
            ),
        ];
        for (text, field, value) in cases {
            let e = error_of(&text);
            assert!(
                e.contains(field) && e.contains(value),
                "error {e:?} should name {field} and {value}"
            );
            assert!(e.starts_with("t.toml"), "error {e:?} should name the file");
        }
    }

    #[test]
    fn parses_a_server_and_checks_ranges() {
        let text = r#"
role = "server"
address = "198.51.100.1"
nat_address = "203.0.113.1"
interfaces = ["wan0", "content0"]
[[communities]]
id = 1
key = "community one key"
[[communities]]
id = 2
key = "community two key"
"#;
        let Config::Server(s) = Config::parse(text, "s.toml").unwrap() else {
            panic!("not a server")
        };
        assert_eq!(s.port_range(), Ok((20000, 29999)));
        assert_eq!(s.communities[1].key, CommunityKey::new("community two key"));
        let e = error_of(&text.replace(
            "interfaces = [\"wan0\", \"content0\"]",
            "interfaces = []\nnat_ports = \"9-3\"",
        ));
        assert!(e.contains("nat_ports") && e.contains("9-3"), "{e}");
        assert_eq!(s.max_terminals, MAX_SESSIONS);
        for bad in ["0", "65537"] {
            let e = error_of(
                &text.replace("interfaces", &format!("max_terminals = {bad}\ninterfaces")),
            );
            assert!(e.contains("max_terminals") && e.contains(bad), "{e}");
        }
        let e = error_of(&text.replace("id = 2", "id = 1"));
        assert!(e.contains("communities[1].id"), "{e}");
        let e = error_of(&text.replace("community two key", "2short"));
        assert!(
            e.contains("communities[1].key") && e.contains("6 bytes"),
            "{e}"
        );
    }

    const SERVER: &str = r#"
role = "server"
address = "198.51.100.1"
nat_address = "203.0.113.1"
nat_ports = "20000-20999"
interfaces = ["wan0"]
"#;

    #[test]
    fn flows_table_defaults_and_sizes() {
        let Config::Server(s) = Config::parse(SERVER, "s.toml").unwrap() else {
            panic!("not a server")
        };
        assert_eq!(s.flows, FlowsConfig::default());
        assert_eq!(s.port_count(), Ok(1000));
        assert_eq!(s.flows.table_size(1000), 1000, "default: one per port");
        assert_eq!(s.flows.timeouts(), Timeouts::default());
        assert_eq!(s.flows.sweep(), std::time::Duration::from_secs(1));

        let text = format!(
            "{SERVER}[flows]\nmax = 4096\ntcp_established_s = 3600\ntcp_closing_s = 1\n\
             udp_s = 2\nicmp_s = 3\nsweep_ms = 100\n"
        );
        let Config::Server(s) = Config::parse(&text, "s.toml").unwrap() else {
            panic!("not a server")
        };
        assert_eq!(s.flows.table_size(1000), 4096);
        let t = s.flows.timeouts();
        let secs = |d: std::time::Duration| d.as_secs();
        assert_eq!(
            (
                secs(t.tcp_established),
                secs(t.tcp_closing),
                secs(t.udp),
                secs(t.icmp)
            ),
            (3600, 1, 2, 3)
        );
        assert_eq!(s.flows.sweep(), std::time::Duration::from_millis(100));
    }

    #[test]
    fn flows_errors_name_the_field_and_value() {
        let cases = [
            ("max = 999", "flows.max", "999 is outside 1000..=262144"),
            ("max = 262145", "flows.max", "262145 is outside"),
            ("max = 0", "flows.max", "0 is outside"),
            (
                "tcp_established_s = 0",
                "flows.tcp_established_s",
                "0 is outside",
            ),
            ("tcp_closing_s = 0", "flows.tcp_closing_s", "0 is outside"),
            ("udp_s = 0", "flows.udp_s", "0 is outside"),
            ("icmp_s = 0", "flows.icmp_s", "0 is outside"),
            (
                "udp_s = 604801",
                "flows.udp_s",
                "604801 is outside 1..=604800",
            ),
            ("icmp_s = 9999999", "flows.icmp_s", "9999999 is outside"),
            (
                "tcp_established_s = 100\ntcp_closing_s = 101",
                "flows.tcp_closing_s",
                "101 is longer than tcp_established_s (100)",
            ),
            ("sweep_ms = 0", "flows.sweep_ms", "0 is outside 10..=60000"),
            ("sweep_ms = 60001", "flows.sweep_ms", "60001 is outside"),
            ("sweep = 5", "sweep", "unknown field"),
            (
                "per_origin = 262145",
                "flows.per_origin",
                "262145 is outside 0..=262144",
            ),
            ("udp_s = -1", "udp_s = -1", "expected u32"),
        ];
        for (line, field, value) in cases {
            let e = error_of(&format!("{SERVER}[flows]\n{line}\n"));
            assert!(
                e.contains(field) && e.contains(value),
                "error {e:?} should name {field} and {value}"
            );
        }
        for (mtu, ok) in [
            ("627", false),
            ("628", true),
            ("9000", true),
            ("9001", false),
        ] {
            let text = SERVER.replace("interfaces", &format!("link_mtu = {mtu}\ninterfaces"));
            match Config::parse(&text, "s.toml") {
                Ok(_) => assert!(ok, "link_mtu {mtu} accepted"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok && e.contains("link_mtu") && e.contains(mtu), "{e}");
                }
            }
        }
        // The bound follows nat_ports.
        let small = SERVER.replace("20000-20999", "20000-20002");
        assert!(Config::parse(&format!("{small}[flows]\nmax = 3\n"), "s.toml").is_ok());
        let e = error_of(&format!("{small}[flows]\nmax = 2\n"));
        assert!(
            e.contains("flows.max") && e.contains("2 is outside 3..="),
            "{e}"
        );
    }
}

#[cfg(test)]
mod timeout_tests {
    use bond_common::{
        maps::{FLOW_FIN, FLOW_RST},
        wire::IPPROTO_UDP,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            community: 1,
            proto,
            _pad: 0,
            origin: 0x0a00_0103,
            port: 40000,
            _pad2: 0,
        }
    }

    fn flow(state: u8, last_seen_ns: u64) -> Flow {
        Flow {
            nat_port: 20000,
            state,
            _pad: [0; 5],
            created_ns: 0,
            last_seen_ns,
            up_pkts: 1,
            up_bytes: 60,
            down_pkts: 0,
            down_bytes: 0,
        }
    }

    /// (expired just before the timeout, expired at it) for a flow last
    /// seen at 1000 s.
    fn around(t: &Timeouts, proto: u8, state: u8, timeout_s: u64) -> (bool, bool) {
        let (k, f) = (key(proto), flow(state, 1000 * S));
        (
            t.expired(&k, &f, (1000 + timeout_s) * S - 1),
            t.expired(&k, &f, (1000 + timeout_s) * S),
        )
    }

    #[test]
    fn defaults_follow_the_rfcs() {
        let t = Timeouts::default();
        assert_eq!(t.tcp_established, Duration::from_secs(7440));
        assert_eq!(t.tcp_closing, Duration::from_secs(120));
        assert_eq!(t.udp, Duration::from_secs(300));
        assert_eq!(t.icmp, Duration::from_secs(60));
    }

    #[test]
    fn each_protocol_expires_after_its_own_timeout() {
        let t = Timeouts {
            tcp_established: Duration::from_secs(50),
            tcp_closing: Duration::from_secs(5),
            udp: Duration::from_secs(20),
            icmp: Duration::from_secs(10),
        };
        let cases = [
            ("tcp established", IPPROTO_TCP, 0, 50),
            ("tcp after FIN", IPPROTO_TCP, FLOW_FIN, 5),
            ("tcp after RST", IPPROTO_TCP, FLOW_RST, 5),
            ("tcp after both", IPPROTO_TCP, FLOW_FIN | FLOW_RST, 5),
            ("udp", IPPROTO_UDP, 0, 20),
            ("icmp", IPPROTO_ICMP, 0, 10),
            // The state byte means something for TCP only.
            ("udp with state bits", IPPROTO_UDP, FLOW_FIN, 20),
            ("icmp with state bits", IPPROTO_ICMP, FLOW_RST, 10),
            ("another protocol", 47, 0, 20),
        ];
        for (what, proto, state, secs) in cases {
            assert_eq!(
                around(&t, proto, state, secs),
                (false, true),
                "{what}: expires exactly {secs} s after its last packet"
            );
        }
    }

    #[test]
    fn a_packet_after_now_or_a_fresh_flow_is_not_expired() {
        let t = Timeouts::default();
        let k = key(IPPROTO_UDP);
        // The program stamped it after the agent read the clock.
        assert!(!t.expired(&k, &flow(0, 2000 * S), 1000 * S));
        assert!(!t.expired(&k, &flow(0, 1000 * S), 1000 * S));
        // Long-lived numbers do not overflow.
        assert!(t.expired(&k, &flow(0, 0), u64::MAX));
    }
}
