//! A terminal's file: its LAN, its links, its server, and the community
//! services it runs (`[dist]`, `[cache]`).

use super::*;
use crate::weight::{default_weight, opt_weight_spec, weight_spec};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalConfig {
    /// Always [`Role::Terminal`].
    pub role: Role,
    /// Names the pin directory, `/sys/fs/bpf/bond/<instance>`.
    #[serde(default = "default_instance")]
    pub instance: String,
    pub community: u32,
    /// The community key: signs every control message.
    pub key: CommunityKey,
    /// This terminal's own secret key (`bond-ctl identity new`): signs
    /// its logins and announces to the server, for communities whose
    /// server takes only the terminals it knows by key.
    pub identity: Option<std::path::PathBuf>,
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
    /// Its IPv6 address, which links that have only IPv6 reach it at
    /// (the server's `address6`).
    pub address6: Option<std::net::Ipv6Addr>,
    #[serde(default = "default_port")]
    pub port: u16,
    /// The server's site key (the public key of its `site_key`): with
    /// it, this terminal takes only the server's answers signed by it, and
    /// keys its session (`bond_proto::session`). Needs `identity`.
    pub key: Option<bond_proto::identity::PublicKey>,
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

/// A link's next hop towards the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gateway {
    /// This address (a modem's, a router's on the link): IPv4, or IPv6
    /// (often link-local) for a link over IPv6.
    At(std::net::IpAddr),
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
                &"an IPv4 or IPv6 address, or \"auto\"",
            )
        }),
    }
}

fn default_device() -> String {
    "bond0".into()
}
fn default_probe_ms() -> u32 {
    1000
}
fn default_announce_ms() -> u32 {
    1000
}

impl TerminalConfig {
    pub(crate) fn check(&self) -> Check {
        if self.server.key.is_some() && self.identity.is_none() {
            return err(
                "server.key",
                "needs `identity`: the session key is made at a login signed by it",
            );
        }
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
        if let Some(a) = self.server.address6
            && (a.is_unspecified() || a.is_multicast() || a.is_loopback())
        {
            return err("server.address6", format!("{a} is not a unicast address"));
        }
        let servers = [
            Some(IpAddr::V4(self.server.address)),
            self.server.address6.map(IpAddr::V6),
        ];
        for (i, p) in self.capture.iter().enumerate() {
            if let Some(server) = servers
                .into_iter()
                .flatten()
                .find(|&a| p.len > 0 && p.contains(a))
            {
                return err(
                    format!("capture[{i}]"),
                    format!("{p} contains the server address {server}: bonded packets would loop"),
                );
            }
        }
        let mut ids = HashSet::new();
        let mut ports = HashSet::new();
        for (i, l) in self.links.iter().enumerate() {
            check_ifname(&format!("links[{i}].interface"), &l.interface)?;
            check_port(&format!("links[{i}].port"), l.port)?;
            if l.id == 0 {
                // The peer table's row of a peer without links.
                return err(
                    format!("links[{i}].id"),
                    "0 is reserved (no link); use 1..=255",
                );
            }
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
            if let Some(Gateway::At(IpAddr::V6(g))) = l.gateway
                && self.server.address6.is_none()
            {
                return err(
                    format!("links[{i}].gateway"),
                    format!(
                        "{g} is an IPv6 next hop, but `server.address6` is not set: a link over IPv6 reaches the server there"
                    ),
                );
            }
        }
        Ok(())
    }
}
