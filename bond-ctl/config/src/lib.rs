//! The agent's configuration file (TOML). Every field is checked at load
//! time; an error names the field and the bad value.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use bond_proto::CommunityKey;
use serde::{Deserialize, Serialize};

mod attach;
mod director;
mod server;
mod terminal;
mod weight;

pub use attach::*;
pub use director::*;
pub use server::*;
pub use terminal::*;
pub use weight::*;

pub const DEFAULT_PORT: u16 = 7700;
/// The largest weight: measured weights are kbit/s, so 10 Gbit/s.
pub const MAX_WEIGHT: u32 = 10_000_000;

/// Announces a sender may miss before it counts as gone.
pub const DEFAULT_MISSES: u32 = 3;

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
    Director(DirectorConfig),
}

/// The `role` key that picks the file's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Terminal,
    Server,
    Director,
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

/// An IPv4 or IPv6 prefix such as "203.0.113.0/24", "2001:db8::/32" or
/// "default" (IPv4's: 0.0.0.0/0; IPv6's is "::/0").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// The prefix if it is IPv4.
    pub fn v4(&self) -> Option<(Ipv4Addr, u8)> {
        match self.addr {
            IpAddr::V4(a) => Some((a, self.len)),
            IpAddr::V6(_) => None,
        }
    }

    /// The prefix if it is IPv6.
    pub fn v6(&self) -> Option<(std::net::Ipv6Addr, u8)> {
        match self.addr {
            IpAddr::V6(a) => Some((a, self.len)),
            IpAddr::V4(_) => None,
        }
    }

    /// Whether `ip` (of the prefix's family) lies in it.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (
                u128::from(u32::from(a)) << 96,
                u128::from(u32::from(b)) << 96,
                32,
            ),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let len = u32::from(self.len).min(bits);
        len == 0 || (a ^ b) >> (128 - len) == 0
    }
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
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                len: 0,
            });
        }
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("prefix {s:?} needs a /length"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("prefix {s:?}: bad address"))?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| *l <= bits)
            .ok_or_else(|| format!("prefix {s:?}: bad length"))?;
        let host = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        if host & !mask != 0 {
            return Err(format!("prefix {s:?} has host bits set"));
        }
        Ok(Self { addr, len })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn default_instance() -> String {
    "default".into()
}
fn default_port() -> u16 {
    DEFAULT_PORT
}
fn default_true() -> bool {
    true
}

fn default_misses() -> u32 {
    DEFAULT_MISSES
}
/// The smallest link MTU the server accepts: IPv4's minimum (RFC 791) plus
/// the wrap.
pub const MIN_LINK_MTU: u16 = 576 + bond_common::wire::OUTER_LEN as u16;

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
            Role::Director => Self::Director(toml::from_str(text).map_err(parse_err)?),
        };
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field,
            message,
        };
        match &cfg {
            Self::Terminal(t) => t.check().map_err(|(f, m)| invalid(f, m))?,
            Self::Server(s) => s.check().map_err(|(f, m)| invalid(f, m))?,
            Self::Director(d) => d.check().map_err(|(f, m)| invalid(f, m))?,
        }
        Ok(cfg)
    }

    /// Where to serve Prometheus metrics, if anywhere.
    pub fn metrics(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Terminal(t) => t.metrics,
            Self::Server(s) => s.metrics,
            Self::Director(d) => d.metrics,
        }
    }

    pub fn instance(&self) -> &str {
        match self {
            Self::Terminal(t) => &t.instance,
            Self::Server(s) => &s.instance,
            Self::Director(d) => &d.instance,
        }
    }

    /// How the programs are to be attached.
    pub fn attach(&self) -> AttachConfig {
        match self {
            Self::Terminal(t) => t.attach,
            Self::Server(s) => s.attach,
            Self::Director(d) => d.attach,
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

fn default_link_mtu() -> u16 {
    1500
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
                addr: Ipv4Addr::new(203, 0, 113, 0).into(),
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
            Ok(Some(Gateway::At(Ipv4Addr::new(198, 51, 100, 133).into())))
        );
        // IPv6 (a link over IPv6) only with the server's IPv6 address.
        let e = gateway("gateway = \"fe80::1\"").unwrap_err();
        assert!(
            e.contains("links[0].gateway") && e.contains("server.address6"),
            "{e}"
        );
        assert_eq!(gateway("gateway = \"auto\""), Ok(Some(Gateway::Auto)));
        let e = gateway("gateway = \"the modem\"").unwrap_err();
        assert!(
            e.contains("gateway") && e.contains("the modem") && e.contains("\"auto\""),
            "{e}"
        );
    }

    #[test]
    fn a_server_ipv6_address_takes_ipv6_next_hops_and_is_never_captured() {
        let six = TERMINAL.replace(
            "server = { address = \"198.51.100.1\" }",
            "server = { address = \"198.51.100.1\", address6 = \"2001:db8:100::1\" }",
        );
        let with = |extra: &str| six.replace("port = 7701\n", &format!("port = 7701\n{extra}\n"));
        let Config::Terminal(t) = Config::parse(&with("gateway = \"fe80::1\""), "t.toml").unwrap()
        else {
            panic!("not a terminal")
        };
        assert_eq!(t.server.address6, Some("2001:db8:100::1".parse().unwrap()));
        assert_eq!(
            t.links[0].gateway,
            Some(Gateway::At("fe80::1".parse().unwrap()))
        );
        let looped = six.replace("[\"203.0.113.0/24\"]", "[\"2001:db8:100::/48\"]");
        let e = error_of(&looped);
        assert!(
            e.contains("capture[0]") && e.contains("2001:db8:100::1"),
            "{e}"
        );
        let e = error_of(&six.replace("2001:db8:100::1", "ff02::1"));
        assert!(
            e.contains("server.address6") && e.contains("ff02::1"),
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
                TERMINAL.replace("id = 1", "id = 0"),
                "links[0].id",
                "0 is reserved",
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
                TERMINAL.replace("community = 1", "community = 4294967296"),
                "community = 4294967296",
                "expected u32",
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
        assert_eq!(s.communities[0].terminals, None, "any member by default");
        let key = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
        let keyed = text.replace(
            "id = 2\n",
            &format!("id = 2\nterminals = {{ \"10.0.1.1\" = \"{key}\" }}\n"),
        );
        let Config::Server(k) = Config::parse(&keyed, "s.toml").unwrap() else {
            panic!("not a server")
        };
        let t = k.communities[1].terminals.as_ref().unwrap();
        assert_eq!(t[&std::net::Ipv4Addr::new(10, 0, 1, 1)].to_string(), key);
        let e = error_of(&keyed.replace(key, "abcd"));
        assert!(
            e.contains("terminals") && e.contains("abcd") && e.contains("2 bytes"),
            "{e}"
        );
        let e = error_of(&keyed.replace("10.0.1.1", "10.0.1"));
        assert!(e.contains("terminals") && e.contains("10.0.1"), "{e}");
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
    fn the_nat_pool_is_addresses_from_nat_address_in_blocks() {
        let Config::Server(s) = Config::parse(SERVER, "s.toml").unwrap() else {
            panic!("not a server")
        };
        assert_eq!((s.nat_addresses, s.nat_block()), (1, 128));
        assert_eq!(s.nat_port_order, PortOrder::Random);
        assert_eq!(s.nat_log(), Path::new("/var/log/bond/default-nat.log"));
        assert_eq!(
            s.nat_pool().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(203, 0, 113, 1)]
        );

        let pool = SERVER.replace(
            "interfaces",
            "nat_addresses = 4\nnat_block = 250\nnat_port_order = \"sequential\"\nnat_log = \"/tmp/n.log\"\ninterfaces",
        );
        let Config::Server(s) = Config::parse(&pool, "s.toml").unwrap() else {
            panic!("not a server")
        };
        assert_eq!(s.nat_pool().last(), Some(Ipv4Addr::new(203, 0, 113, 4)));
        assert_eq!(s.pool_ports(), Ok(4000));
        assert_eq!(
            s.flows.table_size(4000),
            4000,
            "one entry per port of the pool"
        );
        assert_eq!(s.nat_port_order, PortOrder::Sequential);
        assert_eq!(s.nat_log(), Path::new("/tmp/n.log"));

        for (line, field, value) in [
            ("nat_addresses = 0", "nat_addresses", "0 is outside 1..=256"),
            ("nat_addresses = 257", "nat_addresses", "257"),
            ("nat_block = 0", "nat_block", "0 is outside 1..=1000"),
            ("nat_block = 1001", "nat_block", "1001"),
            ("nat_port_order = \"fastest\"", "nat_port_order", "fastest"),
        ] {
            let e = error_of(&SERVER.replace("interfaces", &format!("{line}\ninterfaces")));
            assert!(e.contains(field) && e.contains(value), "{line}: {e}");
        }
        let e = error_of(
            &SERVER
                .replace("203.0.113.1", "255.255.255.254")
                .replace("interfaces", "nat_addresses = 3\ninterfaces"),
        );
        assert!(e.contains("nat_addresses") && e.contains("run past"), "{e}");
        // The server's own port may not be a dedicated port of a pool
        // address.
        let e = error_of(
            &SERVER
                .replace("198.51.100.1", "203.0.113.3")
                .replace("interfaces", "nat_addresses = 4\nport = 20001\ninterfaces"),
        );
        assert!(e.contains("nat_ports") && e.contains("20001"), "{e}");
    }

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
    fn prefixes_of_either_family_parse_and_bad_ones_say_why() {
        let p: Prefix = "2001:db8::/32".parse().unwrap();
        assert_eq!(p.v6(), Some(("2001:db8::".parse().unwrap(), 32)));
        assert_eq!(p.v4(), None);
        let p: Prefix = "::/0".parse().unwrap();
        assert_eq!(p.len, 0);
        let d: Prefix = "default".parse().unwrap();
        assert_eq!(d.v4(), Some((Ipv4Addr::UNSPECIFIED, 0)));
        for (bad, why) in [
            ("2001:db8::1/32", "host bits"),
            ("2001:db8::/129", "bad length"),
            ("10.0.0.0/33", "bad length"),
            ("10.0.0.1/8", "host bits"),
            ("fe80::zz/64", "bad address"),
            ("2001:db8::", "needs a /length"),
        ] {
            let e = bad.parse::<Prefix>().unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn a_tier_node_takes_its_communities_from_etcd_and_says_what_is_wrong() {
        let tier =
            "[tier]\netcd = [\"http://10.0.9.1:2379\", \"http://10.0.9.2:2379\"]\nnode = \"n1\"\n";
        let Config::Server(s) = Config::parse(&format!("{SERVER}{tier}"), "s.toml").unwrap() else {
            panic!("not a server")
        };
        let t = s.tier.unwrap();
        assert_eq!((t.weight, t.lease_s, t.prefix.as_str()), (100, 2, "/bond"));
        assert_eq!(
            (t.node.as_str(), t.etcd.len(), t.node_address),
            ("n1", 2, None)
        );
        assert_eq!(t.health_port(s.port), Some(DEFAULT_PORT + 1));
        for (change, field, value) in [
            (
                "node = \"n1\"\nhealth_port = 0",
                "tier.health_port",
                "port 0",
            ),
            (
                &format!("node = \"n1\"\nhealth_port = {DEFAULT_PORT}"),
                "tier.health_port",
                "same address",
            ),
            ("node = \"N_1\"", "tier.node", "\"N_1\""),
            ("node = \"n1\"\nweight = 0", "tier.weight", "0 is outside"),
            (
                "node = \"n1\"\nlease_s = 1",
                "tier.lease_s",
                "no lease under 2",
            ),
            (
                "node = \"n1\"\nprefix = \"bond\"",
                "tier.prefix",
                "\"bond\"",
            ),
            ("node = \"n1\"\nlease = 3", "lease", "unknown field"),
        ] {
            let e = error_of(&format!("{SERVER}{tier}").replace("node = \"n1\"", change));
            assert!(
                e.contains(field) && e.contains(value),
                "error {e:?} should name {field} and {value}"
            );
        }
        for (url, why) in [
            ("https://10.0.9.1:2379", "TLS"),
            ("10.0.9.1:2379", "http://host:port"),
            ("http://10.0.9.1", "names no port"),
        ] {
            let e = error_of(&format!(
                "{SERVER}[tier]\netcd = [\"{url}\"]\nnode = \"n1\"\n"
            ));
            assert!(e.contains("tier.etcd[0]") && e.contains(why), "{url}: {e}");
        }
        // The same port is fine on a node address of its own, and 65535
        // has no next port.
        let own =
            format!("{SERVER}{tier}node_address = \"10.0.10.2\"\nhealth_port = {DEFAULT_PORT}\n");
        assert!(Config::parse(&own, "s.toml").is_ok());
        let last = format!("port = 65535\n{SERVER}{tier}");
        let e = error_of(&last);
        assert!(e.contains("tier.health_port") && e.contains("65535"), "{e}");
        let e = error_of(&format!("{SERVER}[tier]\netcd = []\nnode = \"n1\"\n"));
        assert!(e.contains("tier.etcd"), "{e}");
        let both = format!("{SERVER}[[communities]]\nid = 1\nkey = \"community one key\"\n{tier}");
        let e = error_of(&both);
        assert!(e.contains("communities") && e.contains("registry"), "{e}");
    }

    /// etcd's authentication: a user and a password file, both or
    /// neither, in a node's and a director's file; the password is read
    /// from the file's first line when the agent starts, and a missing or
    /// empty file is named.
    #[test]
    fn an_etcd_user_comes_with_its_password_file() {
        let tier = "[tier]\netcd = [\"http://10.0.9.1:2379\"]\nnode = \"n1\"\n";
        let director = "role = \"director\"\naddress = \"198.51.100.1\"\n\
                        interfaces = [\"wan0\"]\netcd = [\"http://10.0.9.1:2379\"]\n";
        for (base, table) in [
            (format!("{SERVER}{tier}"), "tier."),
            (director.to_string(), ""),
        ] {
            let with = |extra: &str| format!("{base}{extra}");
            let ok = with("etcd_user = \"bond-n1\"\netcd_password_file = \"/etc/bond/etcd\"\n");
            assert!(Config::parse(&ok, "c.toml").is_ok(), "{ok}");
            for (extra, field, why) in [
                (
                    "etcd_user = \"bond-n1\"\n",
                    "etcd_user",
                    "etcd_password_file",
                ),
                (
                    "etcd_password_file = \"/p\"\n",
                    "etcd_password_file",
                    "etcd_user",
                ),
                (
                    "etcd_user = \"bond n1\"\netcd_password_file = \"/p\"\n",
                    "etcd_user",
                    "no spaces",
                ),
            ] {
                let e = error_of(&with(extra));
                assert!(
                    e.contains(&format!("`{table}{field}`")) && e.contains(why),
                    "{extra}: {e}"
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("bond-etcd-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        assert_eq!(
            etcd_login(Some("bond"), Some(&file)).unwrap(),
            Some(("bond".into(), "s3cret".into()))
        );
        assert_eq!(etcd_login(None, None).unwrap(), None);
        std::fs::write(&file, "\n").unwrap();
        let e = etcd_login(Some("bond"), Some(&file)).unwrap_err();
        assert!(e.contains("password") && e.contains("empty"), "{e}");
        let gone = dir.join("gone");
        let e = etcd_login(Some("bond"), Some(&gone)).unwrap_err();
        assert!(e.contains(&gone.display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_director_names_its_front_interfaces_and_registry() {
        let text = "role = \"director\"\naddress = \"198.51.100.1\"\ninterfaces = [\"wan0\"]\n\
                    etcd = [\"http://10.0.9.1:2379\"]\n";
        let Config::Director(d) = Config::parse(text, "d.toml").unwrap() else {
            panic!("not a director")
        };
        assert_eq!(
            (d.port, d.prefix.as_str(), d.address6, d.health_timeout_ms),
            (DEFAULT_PORT, "/bond", None, 300)
        );
        for (from, to, field, value) in [
            (
                "interfaces = [\"wan0\"]",
                "interfaces = []",
                "interfaces",
                "list",
            ),
            (
                "http://10.0.9.1:2379",
                "10.0.9.1:2379",
                "etcd[0]",
                "http://",
            ),
            (
                "address =",
                "prefix = \"bond\"\naddress =",
                "prefix",
                "\"bond\"",
            ),
            (
                "address =",
                "communities = []\naddress =",
                "communities",
                "unknown field",
            ),
            (
                "address =",
                "health_timeout_ms = 50\naddress =",
                "health_timeout_ms",
                "outside 100..=60000",
            ),
        ] {
            let e = error_of(&text.replace(from, to));
            assert!(
                e.contains(field) && e.contains(value),
                "error {e:?} should name {field} and {value}"
            );
        }
    }

    #[test]
    fn deny_defaults_to_local_and_takes_prefixes() {
        let server = |extra: &str| {
            let text = SERVER.replace("interfaces", &format!("{extra}\ninterfaces"));
            match Config::parse(&text, "s.toml") {
                Ok(Config::Server(s)) => s,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(server("").deny, [Deny::Local]);
        assert_eq!(server("deny = []").deny, []);
        let p = |s: &str| Deny::Prefix(s.parse().unwrap());
        assert_eq!(
            server(r#"deny = ["local", "10.0.0.0/8", "192.0.2.7/32"]"#).deny,
            [Deny::Local, p("10.0.0.0/8"), p("192.0.2.7/32")]
        );
        for (line, field, value) in [
            (r#"deny = ["10.0.0.1/8"]"#, "deny", "host bits"),
            (r#"deny = ["10.0.0.0"]"#, "deny", "needs a /length"),
            (r#"deny = ["locals"]"#, "deny", "or \"local\""),
            (
                r#"deny = ["default"]"#,
                "deny[0]",
                "denies every destination",
            ),
            (r#"deny = ["local", "0.0.0.0/0"]"#, "deny[1]", "0.0.0.0/0"),
        ] {
            let text = SERVER.replace("interfaces", &format!("{line}\ninterfaces"));
            let e = error_of(&text);
            assert!(
                e.contains(field) && e.contains(value),
                "error {e:?} should name {field} and {value}"
            );
        }
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
            (MIN_LINK_MTU - 1, false),
            (MIN_LINK_MTU, true),
            (9000, true),
            (9001, false),
        ] {
            let mtu = mtu.to_string();
            let text = SERVER.replace("interfaces", &format!("link_mtu = {mtu}\ninterfaces"));
            match Config::parse(&text, "s.toml") {
                Ok(_) => assert!(ok, "link_mtu {mtu} accepted"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(!ok && e.contains("link_mtu") && e.contains(&mtu), "{e}");
                }
            }
        }
        // The bound follows nat_ports.
        let small = SERVER.replace("20000-20999", "20000-20002");
        let Config::Server(s) = Config::parse(&small, "s.toml").unwrap() else {
            panic!("not a server")
        };
        assert_eq!(
            s.nat_block(),
            3,
            "a range smaller than a block is one block"
        );
        assert!(Config::parse(&format!("{small}[flows]\nmax = 3\n"), "s.toml").is_ok());
        let e = error_of(&format!("{small}[flows]\nmax = 2\n"));
        assert!(
            e.contains("flows.max") && e.contains("2 is outside 3..="),
            "{e}"
        );
    }
}
