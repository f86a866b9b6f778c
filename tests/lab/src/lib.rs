//! A community in network namespaces: the seed's Figure 1, for the demo,
//! the end-to-end tests and the benchmarks.
//!
//! ```text
//!  t1 ─┐               ┌─ m1 (tbf) ─┐
//!  t2 ─┼─ lan (br0) ─  │  m2 (tbf) ─┼─ inet (br0) ─ srv ─ web
//!  t3 ─┘   10.0.1/24   └─ m3 (tbf) ─┘  198.51.100/25    203.0.113/24
//! ```
//!
//! Each WAN link has a "modem" namespace that forwards with the kernel and
//! holds the link's `tbf` rate limit in both directions: XDP redirects skip
//! the sender's qdisc, so the bottleneck must sit one hop on, as a real DSL
//! modem's does. Every namespace, process and pin the lab makes is removed
//! when it is dropped, on every path. Traffic stays among its namespaces.
//!
//! Addresses: terminal `i` is 10.0.1.i on `lan0`; WAN link `k` is the /30
//! 198.51.100.(128+4k): modem .(4k+129), terminal .(4k+130); modem `k`'s
//! uplink is 198.51.100.(10+k)/25; the server is 198.51.100.1 (WAN) and
//! 203.0.113.1 (content side); the content host is 203.0.113.2. Inside
//! (not on the WAN links) the lab is dual-stack: terminal `i` is also
//! 2001:db8:1::i, the server's IPv6 NAT address 2001:db8:71::1 and the
//! content host 2001:db8:71::2. The internet side is dual-stack too: the
//! server is also 2001:db8:100::1, modem `k` 2001:db8:100::(10+k) (hex).
//! A link with only IPv6 (`LinkSpec::over_ipv6`) is 2001:db8:200:k::/64
//! (modem ::1 and fe80::1, terminal ::2) and has no IPv4 address.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub const SERVER_WAN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The server's IPv6 address on the internet side (links over IPv6).
pub const SERVER_WAN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
pub const SERVER_NAT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const CONTENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The server's IPv6 NAT address and the content host's IPv6 address.
pub const SERVER_NAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x71, 0, 0, 0, 0, 1);
pub const CONTENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x71, 0, 0, 0, 0, 2);
/// A host one router beyond the server ([`Lab::add_far_host`]): the
/// content host forwards to it.
pub const FAR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The far host's IPv6 address, inside the terminals' IPv6 capture prefix.
pub const FAR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x71, 0, 0, 0, 0, 0x100);
pub const COMMUNITY: u32 = 1;
pub mod line;
pub mod packets;
pub mod profile;
pub mod site;
pub mod tier;

use bond_api::reply::{
    DownPath, FlowRow, Flows, Links, PeerRow, Peers, ServerLinks, ServerStatus, Status,
    TerminalLinks, TerminalRow, TerminalStatus,
};

/// Programs for `cargo xtask bench fastpath` (a load generator and a sink),
/// from the objects bond-datapath's build script made: no part of the
/// datapath, and not in the product binary.
#[cfg(not(bond_no_ebpf))]
pub static BENCH: &[u8] = aya::include_bytes_aligned!(concat!(env!("BOND_EBPF_OBJECTS"), "/bench"));
/// Built with AYA_BUILD_SKIP=1: no objects.
#[cfg(bond_no_ebpf)]
pub static BENCH: &[u8] = &[];

pub use profile::{LinkSpec, PROFILES, Profile};

pub const PORT: u16 = 7700;
/// The lab community's key.
pub const KEY: &str = "lab community key, not a secret";

/// One terminal: the rates of its WAN links in Mbit/s (none: LAN only).
#[derive(Clone, Debug)]
pub struct TerminalSpec {
    pub links: Vec<u32>,
}

impl TerminalSpec {
    /// The seed's Figure 1: t1 with a 10 Mbit/s link, t2 with 20 and 30,
    /// t3 with none.
    pub fn figure1() -> Vec<Self> {
        vec![
            Self { links: vec![10] },
            Self {
                links: vec![20, 30],
            },
            Self { links: vec![] },
        ]
    }
}

#[derive(Clone, Debug)]
pub struct WanLink {
    /// Community-wide link id (1-based).
    pub id: u8,
    pub rate_mbit: u32,
    /// The link's addresses (over IPv6: unused, the link has none).
    pub wan_ip: Ipv4Addr,
    pub modem_ip: Ipv4Addr,
    /// A link over IPv6: the terminal's and the modem's addresses.
    pub v6: Option<(Ipv6Addr, Ipv6Addr)>,
    pub port: u16,
    pub modem_ns: String,
    pub iface: String,
}

#[derive(Clone, Debug)]
pub struct Terminal {
    pub ns: String,
    pub lan_ip: Ipv4Addr,
    pub instance: String,
    pub links: Vec<WanLink>,
    pub community: u32,
    /// Its LAN interface, UDP data port, capture device and captured
    /// prefixes, quoted for TOML (a host in two communities has one of each
    /// per community).
    pub lan: String,
    pub data_port: u16,
    pub device: String,
    pub capture: String,
}

/// The second community of [`Lab::join_second_community`].
pub const COMMUNITY2: u32 = 70_000;
pub const KEY2: &str = "second community key, not secret";
/// The content address the second community's members capture.
pub const CONTENT2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub bond_ctl: PathBuf,
    pub terminals: Vec<Terminal>,
    pub server_ns: String,
    pub server_instance: String,
    pub web_ns: String,
    /// Every agent's announce interval (set before starting them).
    pub announce_ms: u32,
    /// The server's dedicated ports, "first-last" (set before starting it).
    pub nat_ports: String,
    /// The server's NAT address, the first of its pool (set before
    /// starting it; default `SERVER_NAT`; another must be the server's
    /// own on `content0`).
    pub nat_address: Ipv4Addr,
    /// Top-level keys for the server's config, one per line, e.g.
    /// `max_terminals = 2` (set before starting it; default empty).
    pub server_keys: String,
    /// TOML tables appended to the server's config, e.g. a `[flows]`
    /// table (set before starting it; default empty).
    pub server_extra: String,
    /// TOML tables appended to every terminal's config, e.g. an
    /// `[attach]` table (set before starting them; default empty).
    pub terminal_extra: String,
    /// Terminals weigh their links by measurement (`weight = "auto"`).
    pub auto_weights: bool,
    /// Set before starting: the first community takes its terminals by
    /// key, each with an identity of its own ([`Self::identity_file`]),
    /// authorised in the registry (a tier) or listed in the server's file.
    pub identities: bool,
    /// The public keys listed in the server's file (no tier).
    listed: Vec<(Ipv4Addr, String)>,
    /// With `identities`: the server (each node) has a site key
    /// (`site_key`) and the first community's terminals pin it (`[server]
    /// key`), so their sessions are keyed. Its public key once made.
    pub site_key: bool,
    pub site_public: Option<String>,
    /// Links whose owner takes the next hop from the interface's default
    /// route (`gateway = "auto"`), as with DHCP; the test adds the route.
    pub auto_gateways: Vec<u8>,
    /// Terminals run the distribution service (`[dist]`, state in
    /// [`Self::dist_state`]).
    pub dist: bool,
    /// Terminals run the peer cache (`[cache]`, objects in
    /// [`Self::cache_dir`], proxy on 127.0.0.1:3128 of each namespace);
    /// t1 is the referral server.
    pub cache: bool,
    /// More `[cache]` keys for one terminal: (terminal, TOML lines).
    pub cache_extra: Vec<(usize, String)>,
    namespaces: Vec<String>,
    /// (namespace, name, process): agents and servers, stopped on drop.
    children: Vec<(String, String, Child)>,
    /// Each link's spec, by link id order.
    specs: Vec<(u8, LinkSpec)>,
    /// Delay lines by link id: the process and its command pipe.
    lines: Vec<(u8, Child, profile::LineControl)>,
    /// Whether veths get GRO on and checksum offload off, as XDP on veth
    /// needs ([`Self::build_untuned`]).
    tuned: bool,
    /// The forwarders between the two TUN ends of L3 links (a plain
    /// `bond-delay`), and their command pipes, which keep them running.
    tunnels: Vec<(Child, ChildStdin)>,
    /// Rate steps and dark windows being played ([`Self::start_events`]).
    events: Option<profile::Events>,
    /// Nodes of an ISP tier in place of the one server (0: none;
    /// [`Self::add_tier`]).
    pub tier: usize,
    /// The director's `health_timeout_ms` (None: its default; 0: off).
    pub health_timeout_ms: Option<u32>,
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether an iperf3 client's output says the server was between tests
/// (its listener closed, or still busy with the last one): the test never
/// started.
pub fn iperf3_not_started(said: &str) -> bool {
    [
        "unable to connect to server",
        "the server is busy",
        "unable to send cookie",
        "unable to receive control message",
    ]
    .iter()
    .any(|m| said.contains(m))
}

fn ip(args: &str) -> Result<String> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// Limits what `dev` in namespace `ns` sends to `mbit` Mbit/s (0: no
/// limit), as the modem of a line of that rate does.
fn set_tbf(ns: &str, dev: &str, mbit: u32) -> Result<()> {
    if mbit == 0 {
        return Ok(());
    }
    // A queue of up to 50 ms at the link rate, and a burst of 3 ms at
    // the link rate (at least two full frames): a line drains at a
    // steady rate, so every link's burst is the same in time. A fixed
    // burst in bytes (tbf examples use 16 KB) is 13 ms on a 10 Mbit/s
    // link but 4 ms on a 30 Mbit/s one; packets spread over both
    // then arrive out of order by ~9 ms, and TCP takes it for loss
    // (docs/benchmarks.md has the figures).
    let burst = (mbit as usize * 1_000_000 / 8 * 3 / 1000).max(3028);
    let (rate, burst) = (format!("{mbit}mbit"), burst.to_string());
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["tc", "qdisc", "replace", "dev", dev, "root", "tbf"])
        .args(["rate", &rate, "burst", &burst, "latency", "50ms"]))
    .map(drop)
}

/// The TCP congestion control every lab namespace uses, unless
/// `BOND_LAB_CC` names another: the kernel's own default. It is set
/// explicitly because a namespace inherits the host's default, and a host
/// may run BBR (this lab's build machines do), which changes what one TCP
/// flow over bonded links can reach (docs/benchmarks.md).
pub const DEFAULT_TCP_CC: &str = "cubic";

/// The congestion control the lab's namespaces use (see
/// [`DEFAULT_TCP_CC`]).
pub fn tcp_cc() -> String {
    std::env::var("BOND_LAB_CC").unwrap_or_else(|_| DEFAULT_TCP_CC.to_string())
}

/// Lets namespaces choose `cc`: outside the host's namespace only the
/// algorithms in `tcp_allowed_congestion_control` may be the default, so
/// `cc` is added to that list if it is missing (the host's own default is
/// left alone).
fn allow_tcp_cc(cc: &str) -> Result<()> {
    let sys = Path::new("/proc/sys/net/ipv4");
    let available = std::fs::read_to_string(sys.join("tcp_available_congestion_control"))?;
    ensure!(
        available.split_whitespace().any(|a| a == cc),
        "TCP congestion control {cc:?} is not available on this kernel (it has: {}); \
         set BOND_LAB_CC to one of those",
        available.trim()
    );
    let allowed_path = sys.join("tcp_allowed_congestion_control");
    let allowed = std::fs::read_to_string(&allowed_path)?;
    if !allowed.split_whitespace().any(|a| a == cc) {
        std::fs::write(&allowed_path, format!("{} {cc}", allowed.trim()))
            .with_context(|| format!("allowing {cc} in {}", allowed_path.display()))?;
    }
    Ok(())
}

/// The tools the lab drives; missing ones fail loudly with a hint.
pub fn check_tools() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab needs root (network namespaces, BPF)"
    );
    for t in [
        "ip",
        "tc",
        "nsenter",
        "ethtool",
        "curl",
        "python3",
        "iperf3",
        "ping",
        "traceroute",
        "tracepath",
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        ensure!(found, "`{t}` not found: run `cargo xtask setup`");
    }
    Ok(())
}

impl Lab {
    /// Builds the namespaces and links (agents not started yet): plain
    /// `tbf` links of the given rates.
    pub fn build(spec: &[TerminalSpec], bond_ctl: &Path) -> Result<Self> {
        let links: Vec<Vec<LinkSpec>> = spec
            .iter()
            .map(|t| t.links.iter().map(|&r| LinkSpec::rate(r)).collect())
            .collect();
        Self::build_links(&links, bond_ctl)
    }

    /// As [`Self::build`], each terminal's links as real uplinks behave:
    /// a delay line on each link whose spec needs one.
    pub fn build_links(spec: &[Vec<LinkSpec>], bond_ctl: &Path) -> Result<Self> {
        Self::build_tuned(spec, bond_ctl, true)
    }

    /// As [`Self::build`], every veth left as `ip link add` makes it
    /// (checksum offload on, GRO off), as a container's is: the agents
    /// must set the other ends of those they put XDP on (`bond_agent::veth`).
    pub fn build_untuned(spec: &[TerminalSpec], bond_ctl: &Path) -> Result<Self> {
        let links: Vec<Vec<LinkSpec>> = spec
            .iter()
            .map(|t| t.links.iter().map(|&r| LinkSpec::rate(r)).collect())
            .collect();
        Self::build_tuned(&links, bond_ctl, false)
    }

    fn build_tuned(spec: &[Vec<LinkSpec>], bond_ctl: &Path, tuned: bool) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        check_tools()?;
        allow_tcp_cc(&tcp_cc())?;
        let prefix = format!(
            "bd{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("bond-lab-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Self {
            server_ns: format!("{prefix}-srv"),
            server_instance: format!("{prefix}-srv"),
            web_ns: format!("{prefix}-web"),
            prefix,
            dir,
            bond_ctl: bond_ctl.to_path_buf(),
            announce_ms: 1000,
            nat_ports: "20000-29999".into(),
            nat_address: SERVER_NAT,
            server_keys: String::new(),
            server_extra: String::new(),
            terminal_extra: String::new(),
            auto_weights: false,
            identities: false,
            site_key: false,
            site_public: None,
            listed: Vec::new(),
            auto_gateways: Vec::new(),
            dist: false,
            cache: false,
            cache_extra: Vec::new(),
            terminals: Vec::new(),
            namespaces: Vec::new(),
            children: Vec::new(),
            specs: Vec::new(),
            lines: Vec::new(),
            tunnels: Vec::new(),
            events: None,
            tier: 0,
            health_timeout_ms: None,
            tuned,
        };
        lab.wire(spec)?;
        Ok(lab)
    }

    fn ns(&mut self, name: &str) -> Result<String> {
        let full = format!("{}-{name}", self.prefix);
        ip(&format!("netns add {full}"))?;
        self.namespaces.push(full.clone());
        self.ip(&full, "link set lo up")?;
        self.sysctl(
            &full,
            &format!("net.ipv4.tcp_congestion_control={}", tcp_cc()),
        )?;
        // Every transfer starts as a first connection would: the kernel
        // otherwise caches the last connection's ssthresh per destination,
        // and a run after one that met a loss leaves slow start at half
        // the rate and climbs linearly for the whole transfer.
        self.sysctl(&full, "net.ipv4.tcp_no_metrics_save=1")?;
        // No duplicate address detection on the lab's links: a new link's
        // link-local address stays tentative for a second or more, and
        // until then the namespace cannot resolve an IPv6 neighbour (the
        // first traceroute to the far host lost its last hop's answer).
        for conf in ["all", "default"] {
            self.sysctl(&full, &format!("net.ipv6.conf.{conf}.accept_dad=0"))?;
        }
        Ok(full)
    }

    /// [`FAR`] and [`FAR6`], a host one router beyond the server: the
    /// content host forwards to it over a link of `mtu` bytes, so a
    /// traceroute through bond has a hop beyond the server, and path MTU
    /// discovery meets a smaller link there. Returns its namespace.
    pub fn add_far_host(&mut self, mtu: u32) -> Result<String> {
        let far = self.ns("far")?;
        let web = self.web_ns.clone();
        self.veth(
            (&web, "far0", Some("192.168.250.1/30")),
            (&far, "eth0", Some("192.168.250.2/30")),
        )?;
        self.ip(&web, &format!("link set far0 mtu {mtu}"))?;
        self.ip(&far, &format!("link set eth0 mtu {mtu}"))?;
        self.ip(&far, &format!("addr add {FAR}/32 dev eth0"))?;
        self.ip(&far, "route add default via 192.168.250.1")?;
        self.ip(&web, &format!("route add {FAR}/32 via 192.168.250.2"))?;
        self.sysctl(&web, "net.ipv4.ip_forward=1")?;
        self.ip(&web, "-6 addr add 2001:db8:250::1/64 dev far0 nodad")?;
        self.ip(&far, "-6 addr add 2001:db8:250::2/64 dev eth0 nodad")?;
        self.ip(&far, &format!("-6 addr add {FAR6}/128 dev eth0 nodad"))?;
        self.ip(&far, "-6 route add default via 2001:db8:250::1")?;
        self.ip(
            &web,
            &format!("-6 route add {FAR6}/128 via 2001:db8:250::2"),
        )?;
        self.sysctl(&web, "net.ipv6.conf.all.forwarding=1")?;
        // Every probe answered: no ICMP rate limit at the router, nor at
        // the far host (a traceroute's probes of its hop and the next
        // both reach it at once).
        for ns in [&web, &far] {
            self.sysctl(ns, "net.ipv4.icmp_ratelimit=0")?;
            self.sysctl(ns, "net.ipv6.icmp.ratelimit=0")?;
        }
        let srv = self.server_ns.clone();
        self.ip(&srv, &format!("route add {FAR}/32 via {CONTENT}"))?;
        self.ip(&srv, &format!("-6 route add {FAR6}/128 via {CONTENT6}"))?;
        Ok(far)
    }

    pub fn ip(&self, ns: &str, args: &str) -> Result<String> {
        ip(&format!("-n {ns} {args}"))
    }

    /// Runs a command inside a namespace (network namespace only, so the
    /// bpffs under /sys/fs/bpf stays the host's).
    pub fn cmd(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }

    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Result<String> {
        run(self.cmd(ns, program).args(args))
    }

    /// Runs an iperf3 client in `ns` (under `wrap`, such as `mptcpize
    /// run`, if given) to its end; its standard output.
    ///
    /// A persistent iperf3 server closes and reopens its listener after
    /// every test (esnet/iperf pull request 2066): a client that starts
    /// as the last test winds down is refused, reset, or told the server
    /// is busy, before any of its data is sent. Those are tried again, for
    /// up to 3 s; any other failure is returned as it is.
    pub fn iperf3(&self, ns: &str, wrap: &[&str], args: &[&str]) -> Result<String> {
        let argv: Vec<&str> = wrap
            .iter()
            .chain(&["iperf3"])
            .chain(args)
            .copied()
            .collect();
        let start = Instant::now();
        loop {
            let mut cmd = self.cmd(ns, argv[0]);
            cmd.args(&argv[1..]);
            let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let said = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            // With `-J` the error is in the report, and iperf3 may still
            // exit 0 (seen with `-P 8`).
            let not_started = iperf3_not_started(&said);
            if out.status.success() && !not_started {
                return Ok(stdout);
            }
            if !not_started || start.elapsed() > Duration::from_secs(3) {
                bail!("iperf3 in {ns} ({args:?}) failed: {}", said.trim());
            }
            eprintln!(
                "bond-lab: iperf3 in {ns} not started ({}); again",
                said.trim()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn sysctl(&self, ns: &str, kv: &str) -> Result<()> {
        self.exec(ns, "sysctl", &["-qw", kv]).map(drop)
    }

    /// A veth between two namespaces, addressed, up, with GRO on so XDP
    /// redirects into either end are accepted, and checksum offload off:
    /// like a real wire, every frame carries finished checksums (a veth
    /// would otherwise pass CHECKSUM_PARTIAL, which an XDP redirect drops).
    fn veth(&self, a: (&str, &str, Option<&str>), b: (&str, &str, Option<&str>)) -> Result<()> {
        ip(&format!(
            "-n {} link add {} type veth peer name {} netns {}",
            a.0, a.1, b.1, b.0
        ))?;
        for (ns, dev, addr) in [a, b] {
            if let Some(addr) = addr {
                self.ip(ns, &format!("addr add {addr} dev {dev}"))?;
            }
            self.ip(ns, &format!("link set {dev} up"))?;
            if self.tuned {
                self.exec(ns, "ethtool", &["-K", dev, "gro", "on", "tx", "off"])?;
            }
        }
        Ok(())
    }

    /// An L3 link between two namespaces: a TUN device in each, addressed
    /// and up, and `bond-delay` forwarding packets between them (no
    /// Ethernet header on either, as on PPP or a raw-IP modem).
    fn tunnel(&mut self, a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
        let mut cmd = Command::new(self.delay_bin()?);
        cmd.args(["--a", &format!("tun:{}/{}", a.0, a.1)])
            .args(["--b", &format!("tun:{}/{}", b.0, b.1)]);
        let tunnel = self.spawn_line(cmd, &format!("tunnel-{}-{}", a.0, a.1))?;
        self.tunnels.push(tunnel);
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, dev, addr) in [a, b] {
            while self.ip(ns, &format!("link show {dev}")).is_err() {
                ensure!(
                    Instant::now() < deadline,
                    "TUN device {dev} did not appear in {ns}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            self.ip(ns, &format!("addr add {addr} dev {dev}"))?;
            self.ip(ns, &format!("link set {dev} up"))?;
        }
        Ok(())
    }

    /// Starts a `bond-delay` (`cmd`), its output to `<name>.log`; it runs
    /// until its command pipe, returned, closes.
    fn spawn_line(&self, mut cmd: Command, name: &str) -> Result<(Child, ChildStdin)> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let stdin = child.stdin.take().context("bond-delay's stdin")?;
        Ok((child, stdin))
    }

    fn delay_bin(&self) -> Result<PathBuf> {
        let bin = self.bond_ctl.with_file_name("bond-delay");
        ensure!(
            bin.is_file(),
            "{} not found: build it with bond-ctl (`cargo build -p bond-ctl`)",
            bin.display()
        );
        Ok(bin)
    }

    fn tbf(&self, ns: &str, dev: &str, mbit: u32) -> Result<()> {
        set_tbf(ns, dev, mbit)
    }

    fn wire(&mut self, spec: &[Vec<LinkSpec>]) -> Result<()> {
        let lan = self.ns("lan")?;
        self.ip(&lan, "link add br0 type bridge")?;
        self.ip(&lan, "link set br0 up")?;
        let inet = self.ns("inet")?;
        self.ip(&inet, "link add br0 type bridge")?;
        self.ip(&inet, "link set br0 up")?;
        let srv = self.ns("srv")?;
        let web = self.ns("web")?;
        self.veth(
            (&srv, "wan0", Some("198.51.100.1/25")),
            (&inet, "srv", None),
        )?;
        self.ip(&inet, "link set srv master br0")?;
        self.ip(
            &srv,
            &format!("-6 addr add {SERVER_WAN6}/64 dev wan0 nodad"),
        )?;
        self.veth(
            (&srv, "content0", Some("203.0.113.1/24")),
            (&web, "eth0", Some("203.0.113.2/24")),
        )?;
        self.ip(&web, "route add default via 203.0.113.1")?;
        self.ip(
            &srv,
            &format!("-6 addr add {SERVER_NAT6}/64 dev content0 nodad"),
        )?;
        self.ip(&web, &format!("-6 addr add {CONTENT6}/64 dev eth0 nodad"))?;
        self.ip(&web, &format!("-6 route add default via {SERVER_NAT6}"))?;
        self.sysctl(&srv, "net.ipv4.ip_forward=1")?;

        let mut k = 0u8;
        for (i, t) in spec.iter().enumerate() {
            let i = i as u8 + 1;
            let tns = self.ns(&format!("t{i}"))?;
            let lan_ip = Ipv4Addr::new(10, 0, 1, i);
            self.veth(
                (&tns, "lan0", Some(&format!("{lan_ip}/24"))),
                (&lan, &format!("t{i}"), None),
            )?;
            self.ip(&lan, &format!("link set t{i} master br0"))?;
            self.ip(
                &tns,
                &format!("-6 addr add 2001:db8:1::{i}/64 dev lan0 nodad"),
            )?;
            let mut links = Vec::new();
            for (j, l) in t.iter().enumerate() {
                k += 1;
                let link = self.wan_link(&tns, k, j, l, PORT + 1 + j as u16)?;
                links.push(link);
            }
            self.terminals.push(Terminal {
                instance: format!("{}-t{i}", self.prefix),
                ns: tns,
                lan_ip,
                links,
                community: COMMUNITY,
                lan: "lan0".into(),
                data_port: PORT,
                device: "bond0".into(),
                capture: "\"203.0.113.0/24\", \"2001:db8:71::/64\"".into(),
            });
        }
        Ok(())
    }

    /// WAN link `k` (1-based, community-wide id) of the terminal in `tns`,
    /// its `j`-th: a modem namespace with the tbf limits, on the internet
    /// bridge; the terminal's first link is its default route.
    fn wan_link(
        &mut self,
        tns: &str,
        k: u8,
        j: usize,
        spec: &LinkSpec,
        port: u16,
    ) -> Result<WanLink> {
        let rate = spec.rate_mbit;
        ensure!(k <= 31, "at most 31 WAN links in a lab");
        let inet = format!("{}-inet", self.prefix);
        let srv = self.server_ns.clone();
        let mns = self.ns(&format!("m{k}"))?;
        let base = 128 + 4 * u32::from(k);
        let modem_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + base + 1);
        let wan_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 51, 100, 0)) + base + 2);
        let iface = format!("wan{j}");
        let v6 = spec.v6.then(|| {
            let net = |host| Ipv6Addr::new(0x2001, 0xdb8, 0x200, k.into(), 0, 0, 0, host);
            (net(2), net(1))
        });
        if let (Some((wan6, modem6)), true) = (v6, spec.l3) {
            // (No duplicate address detection on a TUN device: no ND.)
            self.tunnel(
                (tns, &iface, &format!("{wan6}/64")),
                (&mns, "acc", &format!("{modem6}/64")),
            )?;
        } else if let Some((wan6, modem6)) = v6 {
            self.veth((tns, &iface, None), (&mns, "acc", None))?;
            self.ip(tns, &format!("-6 addr add {wan6}/64 dev {iface} nodad"))?;
            self.ip(&mns, &format!("-6 addr add {modem6}/64 dev acc nodad"))?;
            self.ip(&mns, "-6 addr add fe80::1/64 dev acc nodad")?;
        } else if spec.l3 {
            self.tunnel(
                (tns, &iface, &format!("{wan_ip}/30")),
                (&mns, "acc", &format!("{modem_ip}/30")),
            )?;
        } else {
            self.veth(
                (tns, &iface, Some(&format!("{wan_ip}/30"))),
                (&mns, "acc", Some(&format!("{modem_ip}/30"))),
            )?;
        }
        let uplink = format!("198.51.100.{}/25", 10 + k);
        if spec.needs_line() {
            self.delay_line(k, &mns, &uplink, spec)?;
        } else {
            self.veth(
                (&mns, "uplink", Some(&uplink)),
                (&inet, &format!("m{k}"), None),
            )?;
        }
        self.ip(&inet, &format!("link set m{k} master br0"))?;
        self.specs.push((k, spec.clone()));
        self.ip(&mns, "route add default via 198.51.100.1")?;
        self.sysctl(&mns, "net.ipv4.ip_forward=1")?;
        if let Some((wan6, _)) = v6 {
            let up6 = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 10 + u16::from(k));
            self.ip(&mns, &format!("-6 addr add {up6}/64 dev uplink nodad"))?;
            self.ip(&mns, &format!("-6 route add default via {SERVER_WAN6}"))?;
            self.sysctl(&mns, "net.ipv6.conf.all.forwarding=1")?;
            self.ip(&srv, &format!("-6 route add {wan6}/64 via {up6}"))?;
        }
        self.tbf(&mns, "acc", rate)?;
        self.tbf(&mns, "uplink", rate)?;
        self.ip(
            &srv,
            &format!("route add 198.51.100.{base}/30 via 198.51.100.{}", 10 + k),
        )?;
        // The first link is the default route. (An IPv6 one's next hop is
        // the router's link-local address, as router advertisements give.)
        if j == 0 {
            let route = match (v6, spec.l3) {
                (Some(_), true) => format!("-6 route add default dev {iface}"),
                (Some(_), false) => format!("-6 route add default via fe80::1 dev {iface}"),
                (None, _) => format!("route add default via {modem_ip}"),
            };
            self.ip(tns, &route)?;
        }
        Ok(WanLink {
            id: k,
            rate_mbit: rate,
            wan_ip,
            modem_ip,
            v6,
            port,
            modem_ns: mns,
            iface,
        })
    }

    /// Link `k`'s delay line, in a namespace of its own between the modem
    /// (`uplink`) and the internet bridge (`m{k}`): `bond-delay` forwards
    /// frames between its `modem` and `inet` interfaces. Every interface a frame crosses to
    /// or from it has segmentation and receive offloads off, so the line
    /// sees wire-sized frames.
    fn delay_line(&mut self, k: u8, mns: &str, uplink: &str, spec: &LinkSpec) -> Result<()> {
        let inet = format!("{}-inet", self.prefix);
        let dns = self.ns(&format!("d{k}"))?;
        self.sysctl(&dns, "net.ipv6.conf.all.disable_ipv6=1")?;
        self.veth((mns, "uplink", Some(uplink)), (&dns, "modem", None))?;
        self.veth((&dns, "inet", None), (&inet, &format!("m{k}"), None))?;
        for (ns, dev) in [
            (mns, "uplink"),
            (&dns, "modem"),
            (&dns, "inet"),
            (&inet, &format!("m{k}")),
        ] {
            self.exec(
                ns,
                "ethtool",
                &["-K", dev, "gro", "off", "gso", "off", "tso", "off"],
            )?;
        }
        let bin = self.delay_bin()?;
        let mut args = vec!["--a".into(), "modem".into(), "--b".into(), "inet".into()];
        args.extend(spec.impair.args());
        args.extend(["--seed".into(), k.to_string()]);
        let mut cmd = self.cmd(&dns, &bin.to_string_lossy());
        cmd.args(&args);
        let (child, stdin) = self.spawn_line(cmd, &format!("delay-{k}"))?;
        self.lines
            .push((k, child, std::sync::Arc::new(std::sync::Mutex::new(stdin))));
        Ok(())
    }

    /// Starts playing every link's scripted rate steps and dark windows
    /// (their times count from now). Stopped when the lab is dropped.
    pub fn start_events(&mut self) {
        let scripts = self
            .specs
            .iter()
            .map(|(k, spec)| profile::Script {
                spec: spec.clone(),
                modem_ns: format!("{}-m{k}", self.prefix),
                line: self.line(*k).ok(),
            })
            .collect();
        self.events = Some(profile::Events::start(scripts));
    }

    fn line(&self, id: u8) -> Result<profile::LineControl> {
        self.lines
            .iter()
            .find(|(k, _, _)| *k == id)
            .map(|(_, _, c)| c.clone())
            .with_context(|| format!("link {id} has no delay line"))
    }

    /// The terminal namespace and the link of community link `id`.
    fn wan(&self, id: u8) -> Result<(String, &WanLink)> {
        self.terminals
            .iter()
            .find_map(|t| Some((t.ns.clone(), t.links.iter().find(|l| l.id == id)?)))
            .with_context(|| format!("no link {id} in the lab"))
    }

    /// Link `id` loses its carrier, as a line whose modem lost sync does
    /// (the modem's side of the wire goes down), or gets it back.
    pub fn set_carrier(&self, id: u8, carrier: bool) -> Result<()> {
        let (_, l) = self.wan(id)?;
        let state = if carrier { "up" } else { "down" };
        self.ip(&l.modem_ns, &format!("link set acc {state}"))
            .map(drop)
    }

    /// Link `id`'s modem drops every packet longer than `bytes` that it
    /// forwards, both ways, as a path whose MTU shrank behind the modem
    /// with its "fragmentation needed" lost (a PMTU black hole): echoes,
    /// announces and pure ACKs pass, full-size data does not, and the
    /// carrier stays up.
    pub fn black_hole_over(&self, id: u8, bytes: u16) -> Result<()> {
        let (_, l) = self.wan(id)?;
        for rule in [
            "add table inet bond_lab_hole".to_string(),
            "add chain inet bond_lab_hole forward { type filter hook forward priority 0 ; }"
                .to_string(),
            format!("add rule inet bond_lab_hole forward meta length > {bytes} drop"),
        ] {
            self.exec(&l.modem_ns, "nft", &[&rule])
                .context("nft (package nftables: `cargo xtask setup` installs it)")?;
        }
        Ok(())
    }

    /// Link `id`'s interface is removed from its terminal, as an unplugged
    /// USB modem's is; [`Self::plug`] brings it back.
    pub fn unplug(&self, id: u8) -> Result<()> {
        let (tns, l) = self.wan(id)?;
        self.ip(&tns, &format!("link del {}", l.iface)).map(drop)
    }

    /// Link `id`'s interface comes back under its old name, with its old
    /// addresses and rate (and, for a terminal's first link, its default
    /// route): a new interface index.
    pub fn plug(&self, id: u8) -> Result<()> {
        let (tns, l) = self.wan(id)?;
        let l = l.clone();
        self.veth(
            (&tns, &l.iface, Some(&format!("{}/30", l.wan_ip))),
            (&l.modem_ns, "acc", Some(&format!("{}/30", l.modem_ip))),
        )?;
        self.tbf(&l.modem_ns, "acc", l.rate_mbit)?;
        if l.iface == "wan0" {
            self.ip(&tns, &format!("route replace default via {}", l.modem_ip))?;
        }
        Ok(())
    }

    /// Link `id` is renumbered, as a renewed lease or a new LTE session
    /// renumbers it: its terminal gets 100.64.`id`.2/30 (the modem
    /// 100.64.`id`.1, and the server a route to it), the old address goes,
    /// and the modem stays the next hop, on-link. Returns the new address.
    pub fn readdress(&mut self, id: u8) -> Result<Ipv4Addr> {
        self.renumber(id, false)
    }

    /// As [`Self::readdress`], and with `new_hop` the next hop moves too,
    /// to the modem's new address (100.64.`id`.1), as the interface's
    /// default route (metric 300) says, as a DHCP client sets it.
    pub fn renumber(&mut self, id: u8, new_hop: bool) -> Result<Ipv4Addr> {
        let (tns, l) = self.wan(id)?;
        let l = l.clone();
        let new = Ipv4Addr::new(100, 64, id, 2);
        self.ip(&l.modem_ns, &format!("addr add 100.64.{id}.1/30 dev acc"))?;
        self.ip(
            &self.server_ns,
            &format!("route add 100.64.{id}.0/30 via 198.51.100.{}", 10 + id),
        )?;
        self.ip(&tns, &format!("addr add {new}/30 dev {}", l.iface))?;
        if new_hop {
            self.ip(
                &tns,
                &format!(
                    "route replace default via 100.64.{id}.1 dev {} metric 300",
                    l.iface
                ),
            )?;
        } else {
            self.ip(
                &tns,
                &format!("route add {}/32 dev {}", l.modem_ip, l.iface),
            )?;
        }
        self.ip(&tns, &format!("addr del {}/30 dev {}", l.wan_ip, l.iface))?;
        if l.iface == "wan0" && !new_hop {
            self.ip(&tns, &format!("route replace default via {}", l.modem_ip))?;
        }
        for t in &mut self.terminals {
            for w in t.links.iter_mut().filter(|w| w.id == id) {
                w.wan_ip = new;
            }
        }
        Ok(new)
    }

    /// Black-holes link `id` (frames vanish both ways, carrier stays up),
    /// or heals it. The link must have a delay line.
    pub fn set_dark(&self, id: u8, dark: bool) -> Result<()> {
        profile::command(&self.line(id)?, if dark { "dark" } else { "light" })
    }

    /// Link `id`'s delay line counters (`forwarded`, `lost`, `dark`,
    /// `send_failed`, `oversize`, `rx_dropped`, `late`, `late_max_us`),
    /// both directions summed.
    pub fn line_stats(&self, id: u8) -> Result<serde_json::Value> {
        let log = self.dir.join(format!("delay-{id}.log"));
        let count = || -> usize {
            std::fs::read_to_string(&log)
                .map(|s| s.lines().filter(|l| l.starts_with('{')).count())
                .unwrap_or(0)
        };
        let before = count();
        profile::command(&self.line(id)?, "stats")?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while count() <= before {
            ensure!(
                Instant::now() < deadline,
                "link {id}'s delay line printed no stats within 3 s (see {})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&log)?;
        let last = text.lines().rfind(|l| l.starts_with('{'));
        serde_json::from_str(last.unwrap_or_default())
            .with_context(|| format!("stats of link {id}'s delay line"))
    }

    /// A link's spec, by id.
    pub fn link_spec(&self, id: u8) -> Option<&LinkSpec> {
        self.specs.iter().find(|(k, _)| *k == id).map(|(_, s)| s)
    }

    /// A second community on the same LAN segment (its own subnet,
    /// 10.0.2.0/24) and the same server: a new member `u1` with one WAN link
    /// of `rate` Mbit/s, and terminal `host` (0-based) joining it too
    /// through a second LAN interface. Both capture [`CONTENT2`], which the
    /// content host also answers on; the server learns the community's key
    /// (call before starting the agents). Returns the indices of the
    /// member and of the host's second instance in `terminals`.
    pub fn join_second_community(&mut self, host: usize, rate: u32) -> Result<(usize, usize)> {
        let lan = format!("{}-lan", self.prefix);
        let uns = self.ns("u1")?;
        self.veth((&uns, "lan0", Some("10.0.2.1/24")), (&lan, "u1", None))?;
        self.ip(&lan, "link set u1 master br0")?;
        let k = self.all_links().map(|l| l.id).max().unwrap_or(0) + 1;
        let link = self.wan_link(&uns, k, 0, &LinkSpec::rate(rate), PORT + 101)?;
        let hns = self.terminals[host].ns.clone();
        let hip = Ipv4Addr::new(10, 0, 2, 10 + host as u8 + 1);
        let port = format!("h{}", host + 1);
        self.veth(
            (&hns, "lan1", Some(&format!("{hip}/24"))),
            (&lan, &port, None),
        )?;
        self.ip(&lan, &format!("link set {port} master br0"))?;
        self.ip(&self.web_ns, &format!("addr add {CONTENT2}/24 dev eth0"))?;
        let _ = write!(
            self.server_extra,
            "\n[[communities]]\nid = {COMMUNITY2}\nkey = \"{KEY2}\"\n"
        );
        let second = |ns: String, lan_ip, name: &str, links, lan: &str, device: &str| Terminal {
            instance: format!("{}-c2-{name}", self.prefix),
            ns,
            lan_ip,
            links,
            community: COMMUNITY2,
            lan: lan.into(),
            data_port: PORT + 100,
            device: device.into(),
            capture: format!("\"{CONTENT2}/32\""),
        };
        let member = second(
            uns,
            Ipv4Addr::new(10, 0, 2, 1),
            "u1",
            vec![link],
            "lan0",
            "bond0",
        );
        let again = second(hns, hip, &format!("t{}", host + 1), vec![], "lan1", "bond1");
        self.terminals.push(member);
        self.terminals.push(again);
        Ok((self.terminals.len() - 2, self.terminals.len() - 1))
    }

    pub fn all_links(&self) -> impl Iterator<Item = &WanLink> {
        self.terminals.iter().flat_map(|t| t.links.iter())
    }

    /// A link's weight: its rate in kbit/s; an unlimited lab link (rate 0,
    /// a bare veth) counts as 1 Gbit/s.
    fn weight(rate: u32) -> u32 {
        match rate {
            0 => 1_000_000,
            r => r * 1000,
        }
    }

    /// The TOML config of terminal `i` (0-based).
    /// Terminal `i`'s distribution state: `net.db` and `files/`.
    pub fn dist_state(&self, i: usize) -> PathBuf {
        self.dir.join(format!("t{}-dist", i + 1))
    }

    /// Terminal `i`'s peer cache.
    pub fn cache_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("t{}-cache", i + 1))
    }

    /// Limits what terminal `i` sends on the LAN (its upload) to `mbit`.
    pub fn limit_upload(&self, i: usize, mbit: u32) -> Result<()> {
        let t = &self.terminals[i];
        self.tbf(&t.ns, &t.lan, mbit)
    }

    /// Bytes terminal `i` has sent on the LAN (its upload), from the
    /// counters of its tbf ([`Self::limit_upload`]).
    pub fn lan_sent(&self, i: usize) -> Result<u64> {
        let t = &self.terminals[i];
        let out = self.exec(&t.ns, "tc", &["-s", "qdisc", "show", "dev", &t.lan])?;
        let sent = out.split_whitespace().skip_while(|w| *w != "Sent").nth(1);
        sent.and_then(|n| n.parse().ok())
            .with_context(|| format!("no counters on {} in {}:\n{out}", t.lan, t.ns))
    }

    pub fn terminal_config(&self, i: usize) -> String {
        let t = &self.terminals[i];
        let mut s = format!(
            "role = \"terminal\"\ninstance = \"{}\"\ncommunity = {}\nkey = \"{}\"\n\
             announce_ms = {}\nlan = \"{}\"\ndata_port = {}\ndevice = \"{}\"\ncapture = [{}]\n\
             server = {{ address = \"{SERVER_WAN}\", address6 = \"{SERVER_WAN6}\", port = {PORT} }}\n",
            t.instance,
            t.community,
            if t.community == COMMUNITY { KEY } else { KEY2 },
            self.announce_ms,
            t.lan,
            t.data_port,
            t.device,
            t.capture,
        );
        for l in &t.links {
            let _ = write!(
                s,
                "\n[[links]]\nid = {}\ninterface = \"{}\"\nport = {}\ngateway = \"{}\"\nweight = {}\n",
                l.id,
                l.iface,
                l.port,
                match l.v6 {
                    _ if self.auto_gateways.contains(&l.id) => "auto".to_string(),
                    Some((_, modem6)) => modem6.to_string(),
                    None => l.modem_ip.to_string(),
                },
                if self.auto_weights {
                    "\"auto\"".to_string()
                } else {
                    Self::weight(l.rate_mbit).to_string()
                }
            );
        }
        if self.dist {
            let _ = write!(
                s,
                "\n[dist]\nstate_dir = \"{}\"\n",
                self.dist_state(i).display()
            );
        }
        if self.cache {
            let _ = write!(
                s,
                "\n[cache]\ndir = \"{}\"\nfresh_s = 3600\n{}\n",
                self.cache_dir(i).display(),
                if i == 0 {
                    "referral_server = true".to_string()
                } else {
                    format!("referral = \"{}\"", self.terminals[0].lan_ip)
                }
            );
            for (_, extra) in self.cache_extra.iter().filter(|(t, _)| *t == i) {
                let _ = writeln!(s, "{extra}");
            }
        }
        if let Some(public) = self
            .site_public
            .as_ref()
            .filter(|_| t.community == COMMUNITY)
        {
            s = s.replace(
                &format!("port = {PORT} }}"),
                &format!("port = {PORT}, key = \"{public}\" }}"),
            );
        }
        if self.identities && t.community == COMMUNITY {
            // Top-level: before the first table.
            let at = s.find("\n[").unwrap_or(s.len());
            s.insert_str(
                at,
                &format!("\nidentity = \"{}\"", self.identity_file(i).display()),
            );
        }
        if !self.terminal_extra.is_empty() {
            let _ = write!(s, "\n{}\n", self.terminal_extra);
        }
        s
    }

    /// The server's NAT allocation log.
    pub fn nat_log(&self) -> PathBuf {
        self.dir.join("server-nat.log")
    }

    /// The server's site key file (with [`Self::site_key`]).
    pub fn site_key_file(&self) -> PathBuf {
        self.dir.join("site.key")
    }

    /// The site key, made once (with [`Self::site_key`]), before the
    /// server's configuration or a terminal's names it.
    pub(crate) fn make_site_key(&mut self) -> Result<()> {
        if !self.site_key || self.site_public.is_some() {
            return Ok(());
        }
        let public = run(Command::new(&self.bond_ctl)
            .args(["identity", "new", "--out"])
            .arg(self.site_key_file()))?;
        self.site_public = Some(public.trim().to_string());
        Ok(())
    }

    /// A new identity for each terminal of the first community that has
    /// none yet, to be listed in the server's file (with
    /// [`Self::identities`], no tier).
    fn make_identities(&mut self) -> Result<()> {
        if !self.identities || !self.listed.is_empty() {
            return Ok(());
        }
        for i in 0..self.terminals.len() {
            if self.terminals[i].community != COMMUNITY {
                continue;
            }
            // A test that made its own lists it itself.
            let file = self.identity_file(i);
            if file.exists() {
                continue;
            }
            let public = run(Command::new(&self.bond_ctl)
                .args(["identity", "new", "--out"])
                .arg(&file))?;
            self.listed
                .push((self.terminals[i].lan_ip, public.trim().to_string()));
        }
        Ok(())
    }

    /// The `site_key` line of a server's file (none without one).
    pub(crate) fn site_key_line(&self) -> String {
        match self.site_public {
            Some(_) => format!("site_key = {:?}\n", self.site_key_file()),
            None => String::new(),
        }
    }

    /// Terminal `i`'s secret key file (with [`Self::identities`]).
    pub fn identity_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.key", self.terminals[i].instance))
    }

    pub fn server_config(&self) -> String {
        let mut listed = String::new();
        if !self.listed.is_empty() {
            listed.push_str("[communities.terminals]\n");
            for (ip, public) in &self.listed {
                let _ = writeln!(listed, "\"{ip}\" = \"{public}\"");
            }
        }
        format!(
            "role = \"server\"\ninstance = \"{}\"\naddress = \"{SERVER_WAN}\"\naddress6 = \"{SERVER_WAN6}\"\nport = {PORT}\n\
             metrics = \"127.0.0.1:9477\"\n\
             nat_address = \"{}\"\nnat_address6 = \"{SERVER_NAT6}\"\nnat_ports = \"{}\"\nnat_log = {:?}\n\
             interfaces = [\"wan0\", \"content0\"]\n{}{}\
             \n[[communities]]\nid = {COMMUNITY}\nkey = \"{KEY}\"\n{listed}{}",
            self.server_instance,
            self.nat_address,
            self.nat_ports,
            self.nat_log(),
            self.site_key_line(),
            self.server_keys,
            self.server_extra
        )
    }

    /// Starts a long-running process in a namespace; stopped on drop.
    pub fn spawn(&mut self, ns: &str, name: &str, program: &str, args: &[&str]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = self
            .cmd(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        self.children
            .push((ns.to_string(), name.to_string(), child));
        Ok(())
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Starts the server agent and every terminal's agent, and waits until
    /// the community has formed: every terminal logged on and using every
    /// link, and the server sending on every link.
    pub fn start_agents(&mut self) -> Result<()> {
        self.start_some(&(0..self.terminals.len()).collect::<Vec<_>>())
    }

    /// Stops every running agent (SIGTERM: each says SHUTDOWN and removes
    /// its datapath and routes), the terminals first.
    pub fn stop_agents(&mut self) -> Result<()> {
        let mut names: Vec<String> = self
            .children
            .iter()
            .map(|(_, n, _)| n.clone())
            .filter(|n| n.starts_with("agent-t"))
            .collect();
        if self.is_running("agent-srv") {
            names.push("agent-srv".into());
        }
        for n in names {
            self.stop(&n, false)?;
        }
        Ok(())
    }

    /// As [`Self::start_agents`], for the terminals listed (0-based).
    pub fn start_some(&mut self, terminals: &[usize]) -> Result<()> {
        self.start_server()?;
        for &i in terminals {
            self.start_terminal(i)?;
        }
        self.wait_for_community(Duration::from_secs(20))
    }

    /// Starts the server's agent (as `agent-srv`), its config written from
    /// [`Self::server_config`].
    pub fn start_server(&mut self) -> Result<()> {
        if self.tier > 0 {
            return self.start_tier();
        }
        self.make_site_key()?;
        self.make_identities()?;
        let bond_ctl = self.bond_ctl.to_string_lossy().into_owned();
        let cfg = self.dir.join("server.toml");
        std::fs::write(&cfg, self.server_config())?;
        let (srv, cfg) = (self.server_ns.clone(), cfg.to_string_lossy().into_owned());
        self.spawn(&srv, "agent-srv", &bond_ctl, &["agent", "--config", &cfg])
    }

    /// A terminal's host dies: its interfaces go down and its agent is
    /// killed with SIGKILL (no SHUTDOWN).
    pub fn crash_terminal(&mut self, i: usize) -> Result<()> {
        let t = self.terminals[i].clone();
        self.ip(&t.ns, &format!("link set {} down", t.lan))?;
        for l in &t.links {
            self.ip(&t.ns, &format!("link set {} down", l.iface))?;
        }
        self.stop(&format!("agent-t{}", i + 1), true)
    }

    /// Waits for a child to exit by itself (up to `limit`); its log.
    pub fn wait_child(&mut self, name: &str, limit: Duration) -> Result<String> {
        let pos = self
            .children
            .iter()
            .position(|(_, n, _)| n == name)
            .context("no such child")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.children[pos].2.try_wait()? {
                self.children.remove(pos);
                let log = self.log(name);
                ensure!(status.success(), "{name} failed ({status}):\n{log}");
                return Ok(log);
            }
            ensure!(
                start.elapsed() < limit,
                "{name} still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running terminal is logged on and uses every link
    /// of the running terminals, and the server has all those links.
    pub fn wait_for_community(&self, limit: Duration) -> Result<()> {
        let running: Vec<usize> = (0..self.terminals.len())
            .filter(|i| self.is_running(&format!("agent-t{}", i + 1)))
            .collect();
        let want_in = |c: u32| -> usize {
            running
                .iter()
                .filter(|&&i| self.terminals[i].community == c)
                .map(|&i| self.terminals[i].links.len())
                .sum()
        };
        let want: usize = running.iter().map(|&i| self.terminals[i].links.len()).sum();
        if self.tier == 0 {
            self.wait_for("the server's links", limit, |lab| {
                Ok(lab.server_links().ok().map(|l| l.links.len()) == Some(want))
            })?;
        } else {
            // In a tier, each community's links at the node that owns it.
            let communities: BTreeSet<u32> = running
                .iter()
                .map(|&i| self.terminals[i].community)
                .collect();
            for c in communities {
                self.wait_for(
                    &format!("community {c}'s links at its node"),
                    limit,
                    |lab| {
                        let Some(node) = lab.owner(c)? else {
                            return Ok(false);
                        };
                        let Ok(s) = lab.node_status(node) else {
                            return Ok(false);
                        };
                        Ok(s.communities
                            .iter()
                            .any(|x| x.id == c && x.links == want_in(c)))
                    },
                )?;
            }
        }
        for &i in &running {
            let t = &self.terminals[i];
            self.wait_for(&format!("terminal {} to join", i + 1), limit, |lab| {
                let Ok(v) = lab.terminal_links(&t.ns, &t.instance) else {
                    return Ok(false);
                };
                let active = v.links.iter().filter(|l| l.active).count();
                Ok(v.logged_on && active == want_in(t.community))
            })?;
        }
        Ok(())
    }

    /// Waits until the server's downstream schedule of every community
    /// has each link at a measured rate and delay (`weight = "auto"`
    /// starts a link at [`bond_agent::probe::UNMEASURED`] until its first probe
    /// train); how long that took. Until then a transfer runs on
    /// provisional rates.
    pub fn wait_for_measured(&self, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let measured = |p: &DownPath| {
            p.kbit != u64::from(bond_agent::probe::UNMEASURED)
                && p.delay_us < bond_agent::pathmon::UNMEASURED / 1000
        };
        // (In a tier, every running node's communities.)
        self.wait_for("every link measured", limit, |lab| {
            let statuses = match lab.tier {
                0 => vec![lab.server_status()],
                n => (1..=n)
                    .filter(|i| lab.is_running(&format!("agent-n{i}")))
                    .map(|i| lab.node_status(i))
                    .collect(),
            };
            Ok(statuses.iter().all(|v| {
                v.as_ref().is_ok_and(|v| {
                    v.communities
                        .iter()
                        .all(|c| c.paths.len() == c.links && c.paths.iter().all(measured))
                })
            }))
        })?;
        Ok(start.elapsed())
    }

    pub fn is_running(&self, name: &str) -> bool {
        self.children.iter().any(|(_, n, _)| n == name)
    }

    /// A running child's process id (what systemd calls `$MAINPID`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(_, n, _)| n == name)
            .map(|(_, _, c)| c.id())
    }

    pub fn start_terminal(&mut self, i: usize) -> Result<()> {
        let bond_ctl = self.bond_ctl.to_string_lossy().into_owned();
        let cfg = self.dir.join(format!("t{}.toml", i + 1));
        std::fs::write(&cfg, self.terminal_config(i))?;
        let ns = self.terminals[i].ns.clone();
        self.spawn(
            &ns,
            &format!("agent-t{}", i + 1),
            &bond_ctl,
            &["agent", "--config", &cfg.to_string_lossy()],
        )
    }

    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut ok: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if ok(self)? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let logs: Vec<String> = self
            .children
            .iter()
            .map(|(_, n, _)| format!("--- {n}:\n{}", self.log(n)))
            .collect();
        bail!("timed out waiting for {what}\n{}", logs.join("\n"))
    }

    /// Runs `bond-ctl --instance INSTANCE ARGS...` in a namespace.
    pub fn ctl(&self, ns: &str, instance: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["--instance", instance];
        all.extend_from_slice(args);
        self.exec(ns, &self.bond_ctl.to_string_lossy(), &all)
    }

    /// A `--json` listing of an instance (`status`, `peers`, `links`, ...),
    /// read as its `bond_api::reply` type.
    pub fn ctl_reply<T: serde::de::DeserializeOwned>(
        &self,
        ns: &str,
        instance: &str,
        what: &str,
    ) -> Result<T> {
        let out = self.ctl(ns, instance, &[what, "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("`bond-ctl {what} --json`: {out}"))
    }

    /// A terminal agent's `status`.
    pub fn terminal_status(&self, ns: &str, instance: &str) -> Result<TerminalStatus> {
        match self.ctl_reply(ns, instance, "status")? {
            Status::Terminal(t) => Ok(t),
            _ => bail!("{ns}/{instance} is not a terminal"),
        }
    }

    /// The server agent's `status`.
    pub fn server_status(&self) -> Result<ServerStatus> {
        match self.ctl_reply(&self.server_ns, &self.server_instance, "status")? {
            Status::Server(s) => Ok(s),
            _ => bail!("the server's agent answered as another role"),
        }
    }

    /// A terminal's table of links (`peers`).
    pub fn peer_rows(&self, ns: &str, instance: &str) -> Result<Vec<PeerRow>> {
        match self.ctl_reply(ns, instance, "peers")? {
            Peers::Terminal { peers } => Ok(peers),
            Peers::Server { .. } => bail!("{ns}/{instance} is a server"),
        }
    }

    /// The server's logged-on terminals (`peers`).
    pub fn server_terminals(&self) -> Result<Vec<TerminalRow>> {
        match self.ctl_reply(&self.server_ns, &self.server_instance, "peers")? {
            Peers::Server { terminals } => Ok(terminals),
            Peers::Terminal { .. } => bail!("the server answered as a terminal"),
        }
    }

    /// Terminal `i`'s agent (0-based): namespace and instance.
    pub fn terminal_agent(&self, i: usize) -> (String, String) {
        (
            self.terminals[i].ns.clone(),
            self.terminals[i].instance.clone(),
        )
    }

    /// Restarts an agent without a gap: `bond-ctl detach`, then a new
    /// agent that adopts the running datapath. `None` is the server.
    pub fn restart_agent(&mut self, terminal: Option<usize>) -> Result<()> {
        let (ns, inst, name) = match terminal {
            Some(i) => {
                let (ns, inst) = self.terminal_agent(i);
                (ns, inst, format!("agent-t{}", i + 1))
            }
            None => (
                self.server_ns.clone(),
                self.server_instance.clone(),
                "agent-srv".to_string(),
            ),
        };
        self.ctl(&ns, &inst, &["detach"])?;
        let old = self.wait_child(&name, Duration::from_secs(10))?;
        std::fs::write(self.dir.join(format!("{name}.old.log")), old)?;
        match terminal {
            Some(i) => self.start_terminal(i),
            None => {
                let bond_ctl = self.bond_ctl.to_string_lossy().into_owned();
                let cfg = self.dir.join("server.toml").to_string_lossy().into_owned();
                self.spawn(&ns, &name, &bond_ctl, &["agent", "--config", &cfg])
            }
        }
    }

    /// Changes link `id`'s rate, both directions, as a line retrain would.
    pub fn set_rate(&mut self, id: u8, mbit: u32) -> Result<()> {
        let l = self
            .terminals
            .iter_mut()
            .flat_map(|t| t.links.iter_mut())
            .find(|l| l.id == id)
            .context("no such link")?;
        l.rate_mbit = mbit;
        let ns = l.modem_ns.clone();
        self.tbf(&ns, "acc", mbit)?;
        self.tbf(&ns, "uplink", mbit)
    }

    /// `bond-ctl links` of an instance.
    pub fn links(&self, ns: &str, instance: &str) -> Result<Links> {
        self.ctl_reply(ns, instance, "links")
    }

    /// A terminal's `links`: whether it is logged on, its links' counters,
    /// its drops.
    pub fn terminal_links(&self, ns: &str, instance: &str) -> Result<TerminalLinks> {
        match self.links(ns, instance)? {
            Links::Terminal(t) => Ok(t),
            Links::Server(_) => bail!("{ns}/{instance} is a server"),
        }
    }

    /// The server's `links`: its links' counters, drops and events.
    pub fn server_links(&self) -> Result<ServerLinks> {
        match self.links(&self.server_ns, &self.server_instance)? {
            Links::Server(s) => Ok(s),
            Links::Terminal(_) => bail!("the server answered as a terminal"),
        }
    }

    /// The server's flow table (`bond-ctl flows`).
    pub fn flows(&self) -> Result<Vec<FlowRow>> {
        let f: Flows = self.ctl_reply(&self.server_ns, &self.server_instance, "flows")?;
        Ok(f.flows)
    }

    /// Serves a fresh file of `mb` MiB as `http://203.0.113.2/<name>`;
    /// returns its path on this host (to compare downloads with).
    pub fn serve_file(&mut self, name: &str, mb: usize) -> Result<PathBuf> {
        let www = self.dir.join("www");
        std::fs::create_dir_all(&www)?;
        let path = www.join(name);
        Self::make_file(&path, mb)?;
        if !self.children.iter().any(|(_, n, _)| n == "http") {
            self.start_http(&www)?;
        }
        Ok(path)
    }

    /// Serves `dir` over HTTP on the content host, port 80.
    fn start_http(&mut self, dir: &Path) -> Result<()> {
        let web = self.web_ns.clone();
        let d = dir.to_string_lossy().into_owned();
        self.spawn(
            &web,
            "http",
            "python3",
            &[
                "-m",
                "http.server",
                // Both families (Python serves dual-stack on "::").
                "--bind",
                "::",
                "--directory",
                &d,
                "80",
            ],
        )?;
        self.wait_for("http server", Duration::from_secs(10), |lab| {
            Ok(lab
                .exec(
                    &lab.web_ns,
                    "curl",
                    &["-sf", "-o", "/dev/null", "http://203.0.113.2/"],
                )
                .is_ok())
        })
    }

    pub fn start_iperf(&mut self) -> Result<()> {
        let web = self.web_ns.clone();
        // On every address: CONTENT and CONTENT6.
        self.spawn(&web, "iperf3", "iperf3", &["-s"])?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// An upload (child `upload`) and a download (child `download`) at once
    /// from namespace `ns` to the content host: iperf3 with `args` added
    /// (`-t`, `-J`, ...). A second server (`iperf3-b`, port 5202) serves
    /// the download, as one serves a single test at a time; the first is
    /// [`Self::start_iperf`]'s.
    pub fn upload_and_download(&mut self, ns: &str, args: &[&str]) -> Result<()> {
        let web = self.web_ns.clone();
        self.spawn(
            &web,
            "iperf3-b",
            "iperf3",
            &["-s", "-B", "203.0.113.2", "-p", "5202"],
        )?;
        std::thread::sleep(Duration::from_millis(300));
        for (name, port, reverse) in [("upload", "5201", false), ("download", "5202", true)] {
            let mut all = vec!["-c", "203.0.113.2", "-p", port];
            all.extend(args);
            if reverse {
                all.push("-R");
            }
            self.spawn(ns, name, "iperf3", &all)?;
        }
        Ok(())
    }

    /// Downloads a URL in a namespace: (bytes, seconds, file path).
    pub fn download(&self, ns: &str, url: &str, name: &str) -> Result<(u64, f64, PathBuf)> {
        let out = self.dir.join(name);
        let (bytes, secs) = self.fetch(ns, &[], url, &out)?;
        Ok((bytes, secs, out))
    }

    /// Fetches a URL with curl in a namespace into `out`, curl run under
    /// `wrap` (e.g. `["mptcpize", "run"]`): (bytes, seconds).
    pub fn fetch(&self, ns: &str, wrap: &[&str], url: &str, out: &Path) -> Result<(u64, f64)> {
        let out = out.to_string_lossy();
        let argv: Vec<&str> = wrap
            .iter()
            .copied()
            .chain([
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "300",
                "-o",
                &out,
                "-w",
                "%{size_download} %{time_total}",
                url,
            ])
            .collect();
        let w = self.exec(ns, argv[0], &argv[1..])?;
        let mut it = w.split_whitespace();
        let bytes: u64 = it.next().context("curl size")?.parse()?;
        let secs: f64 = it.next().context("curl time")?.parse()?;
        Ok((bytes, secs))
    }

    /// Writes `mb` MiB of pseudo-random bytes (a fixed xorshift stream).
    fn make_file(path: &Path, mb: usize) -> Result<()> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = Vec::with_capacity(mb << 20);
        while buf.len() < mb << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        std::fs::write(path, buf)?;
        Ok(())
    }

    fn stop_children(&mut self) {
        for (_, _, c) in &self.children {
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, _, c) in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// Stops one named child (e.g. "agent-t2") with SIGTERM, or SIGKILL.
    /// Sends signal `sig` (e.g. `libc::SIGHUP`) to a running child.
    pub fn signal(&self, name: &str, sig: i32) -> Result<()> {
        let (_, _, c) = self
            .children
            .iter()
            .find(|(_, n, _)| n == name)
            .context("no such child")?;
        // SAFETY: signalling a child we spawned and have not reaped.
        if unsafe { libc::kill(c.id() as i32, sig) } != 0 {
            bail!("signalling {name}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn stop(&mut self, name: &str, kill: bool) -> Result<()> {
        let pos = self
            .children
            .iter()
            .position(|(_, n, _)| n == name)
            .context("no such child")?;
        let (_, _, mut c) = self.children.remove(pos);
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe {
            libc::kill(
                c.id() as i32,
                if kill { libc::SIGKILL } else { libc::SIGTERM },
            )
        };
        c.wait()?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.events = None;
        for (_, mut line, _) in self.lines.drain(..) {
            let _ = line.kill();
            let _ = line.wait();
        }
        for (mut tunnel, _) in self.tunnels.drain(..) {
            let _ = tunnel.kill();
            let _ = tunnel.wait();
        }
        self.stop_children();
        for ns in self.namespaces.iter().rev() {
            remove_netns(ns);
        }
        for inst in self
            .terminals
            .iter()
            .map(|t| t.instance.clone())
            .chain([self.server_instance.clone()])
            .chain((1..=self.tier).map(|i| self.node_ns(i)))
        {
            remove_instance(&inst);
        }
        if std::env::var_os("BOND_LAB_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Deletes a namespace, and first kills anything still running in it
/// (e.g. from a failed test).
pub(crate) fn remove_netns(ns: &str) {
    if let Ok(pids) = ip(&format!("netns pids {ns}")) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = ip(&format!("netns del {ns}"));
}

/// Removes what an agent instance leaves behind: its pins, socket and
/// layout file.
pub(crate) fn remove_instance(inst: &str) {
    let _ = std::fs::remove_dir_all(bond_datapath::pin_dir(
        Path::new(bond_datapath::DEFAULT_BPFFS),
        inst,
    ));
    let run = Path::new(bond_api::DEFAULT_RUN_DIR);
    let _ = std::fs::remove_file(bond_api::socket_path(run, inst));
    let _ = std::fs::remove_file(run.join(format!("{inst}.layout")));
}
