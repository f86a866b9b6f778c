//! `cargo xtask bench fastpath`: packets per second per core through bond's
//! XDP fast path (a relay terminal, and the server), next to the kernel's own
//! IPv4 forwarding with nftables masquerade and a userspace UDP relay, at
//! 64-byte and 1400-byte packets, on unlimited veth links.
//!
//! # Method
//!
//! Every path gets three network namespaces of its own, `gen` -- `dut` --
//! `sink`, joined by veth pairs, with static neighbours and IPv6 off, so
//! nothing but the test frames crosses them:
//!
//! - **Load**: `bench_tx` (an XDP program that returns XDP_TX), run by
//!   `BPF_PROG_TEST_RUN` in live-frames mode from a thread in `gen` pinned to
//!   one CPU. The kernel sends each frame out of gen's veth, into the path
//!   under test in `dut`. The generator, the path and the sink all run in
//!   that thread's softirq context on that CPU, so the generator can never
//!   outrun an XDP or kernel-forwarding path: it slows down with it. Live
//!   mode reuses frame pages as the path left them, so `bench_tx` first
//!   writes the frame's first 128 bytes back from a template; and it stays
//!   attached (to gen's idle loopback) so that each test run does not add it
//!   to the kernel's XDP dispatcher and remove it again, two RCU grace
//!   periods per call.
//! - **Sink**: `bench_sink` on the sink's veth counts (per CPU) and drops.
//!   Delivered packets are what it counted.
//! - **Check**: before and after a path is measured, 1024 frames go through
//!   it in one test run, with `bench_capture` on the sink, which keeps a copy
//!   of the last frame; all must arrive and the copy must be the expected output,
//!   byte for byte (field by field for the userspace relays, whose IP ids
//!   are the kernel's). 1024 frames reuse each page of the run's pool many
//!   times, so this checks the template too. bond's drop counters must stay
//!   at zero, and the server must not take its slow path.
//! - **CPU**: the run time of the threads that do the work, over the run:
//!   the generator thread, the userspace relay's thread, and the ksoftirqd
//!   threads of their CPUs (softirq work the kernel deferred). Softirq work
//!   done on the way out of a system call is the calling thread's run time
//!   (unless the kernel accounts IRQ time apart, CONFIG_IRQ_TIME_ACCOUNTING:
//!   the report then warns that its CPU figures are low). Threads, not CPUs:
//!   the machine is shared, and other processes' time on the same CPUs must
//!   not count. "Per core" is delivered packets per CPU-second of those
//!   threads; "CPU ns/packet" its inverse.
//! - **Floor**: the same topology with `dut` running `bench_redirect` (XDP
//!   redirect to the egress veth, no other work) shows what the generator and
//!   the two veth hops cost by themselves. Every path's cost minus the
//!   floor's is its own per-packet cost ("ns above floor").
//! - **Userspace relays** cannot slow the generator down (the socket buffer
//!   sits between them), so a flat-out generator would burn CPU on packets
//!   the socket drops. A short unpaced run finds the relay's rate; the
//!   measured runs offer 95% of it, a millisecond's worth per test run
//!   (into an 8 MiB receive buffer).
//!
//! Packet sizes are the size of the user's IPv4 packet (UDP): the plain
//! packet for the baselines, the inner packet inside bond's 52-byte wrap
//! (outer IPv4, UDP, bond header) for bond. All six paths are set up at
//! once and measured in rounds, one run of 2 s (0.5 s with `--quick`) per
//! path per round, so that a slow spell of the shared machine falls on all
//! of them alike; the median of 3 rounds (1) is reported.

use std::{
    fmt::Write as _,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use bond_common::{
    edpf::DEFAULT_BACKLOG_US,
    maps::{LINK_VALID, RelayLink, ServerConfig, ServerLink, TerminalConfig, event},
};
use bond_datapath::{self as datapath, Maps};
use nix::{
    net::if_::if_nametoindex,
    sched::{CloneFlags, CpuSet, sched_getaffinity, sched_setaffinity, setns},
    time::{ClockId, clock_gettime},
    unistd::{Pid, gettid},
};

use crate::packets::{Bond, DATA_UP, ETH_P_IP, Ip, L4, Mac, Outer, eth, wrapped};

/// Sizes of the user's IPv4 packet, in bytes.
const SIZES: [usize; 2] = [64, 1400];
/// Frames per live-frames batch (the kernel's default, NAPI's budget).
const BATCH: u32 = 64;
/// Frames per `BPF_PROG_TEST_RUN` call when not paced (tens of
/// milliseconds).
const CHUNK: u32 = 1 << 16;
/// Frames sent in one call to check a path's output, enough for live mode
/// to recycle each frame page many times (its pool holds one batch).
const CHECK_FRAMES: u32 = 1024;
/// Wait after a run for frames still in flight (socket buffers, rings).
const SETTLE: Duration = Duration::from_millis(100);
/// Sizes of `bench_capture`'s copy and `bench_tx`'s template (`Capture`,
/// `Template` in bond-ebpf/src/bin/bench.rs).
const CAPTURE_MAX: usize = 2048;
const TEMPLATE_MAX: usize = 128;
/// The share of a userspace relay's flat-out rate it is offered.
const PACE_SHARE: f64 = 0.95;
/// The target: bond forwards this many times the kernel's rate per core.
const TARGET: f64 = 3.0;

// Interfaces, the same in every topology (each namespace has its own).
const GEN_DEV: &str = "gen0";
const DUT_IN: &str = "in0";
const DUT_OUT: &str = "out0";
const SINK_DEV: &str = "sink0";
const GEN_MAC: Mac = [0x02, 0xbf, 0, 0, 0, 0x01];
const IN_MAC: Mac = [0x02, 0xbf, 0, 0, 0, 0x02];
const OUT_MAC: Mac = [0x02, 0xbf, 0, 0, 0, 0x03];
const SINK_MAC: Mac = [0x02, 0xbf, 0, 0, 0, 0x04];

// Addresses. The generator plays a LAN peer (baselines, relay) or a
// community link's public address (server); the sink plays the content
// server behind the dut's out0.
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
const LINK_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const OUT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const CONTENT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const USER_SPORT: u16 = 40000;
const USER_DPORT: u16 = 9000;
/// The userspace relay's source port towards the sink.
const RELAY_SPORT: u16 = 9001;
/// The userspace relay's receive buffer, in bytes.
const RELAY_RCVBUF: libc::c_int = 8 << 20;

// bond's configuration, as tests/prog/ configures it.
const COMMUNITY: u16 = 7;
const LINK_ID: u8 = 3;
const DATA_PORT: u16 = 7100;
const RELAY_PORT: u16 = 7001;
const SERVER_PORT: u16 = 7000;
const RELAY_TOKEN: u64 = 0x0123_4567_89ab_cdef;
const ORIGIN_TOKEN: u64 = 0x5eed_0000_0000_0002;
const NAT_PORTS: std::ops::RangeInclusive<u16> = 20000..=20009;

/// The paths measured, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Floor,
    Kernel,
    UdpRelay,
    UdpRelayMmsg,
    BondRelay,
    BondServer,
}

impl Kind {
    const ALL: [Self; 6] = [
        Self::Floor,
        Self::Kernel,
        Self::UdpRelay,
        Self::UdpRelayMmsg,
        Self::BondRelay,
        Self::BondServer,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Floor => "floor: XDP redirect, no work",
            Self::Kernel => "kernel forwarding + nft masquerade",
            Self::UdpRelay => "userspace UDP relay, 1 syscall/packet each way",
            Self::UdpRelayMmsg => "userspace UDP relay, recvmmsg/sendmmsg (64)",
            Self::BondRelay => "bond relay terminal (XDP)",
            Self::BondServer => "bond server: unwrap + NAT (XDP)",
        }
    }

    /// Short tag for namespace and pin names.
    fn tag(self) -> &'static str {
        match self {
            Self::Floor => "floor",
            Self::Kernel => "kernel",
            Self::UdpRelay => "udp",
            Self::UdpRelayMmsg => "mmsg",
            Self::BondRelay => "relay",
            Self::BondServer => "server",
        }
    }

    fn is_userspace(self) -> bool {
        matches!(self, Self::UdpRelay | Self::UdpRelayMmsg)
    }
}

/// Runs the suite; prints progress to stderr, returns the markdown report.
pub fn run(quick: bool) -> Result<String> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the fastpath benchmark needs root (BPF, network namespaces)"
    );
    let plan = Plan {
        secs: if quick { 0.5 } else { 2.0 },
        runs: if quick { 1 } else { 3 },
        cpus: Cpus::pick()?,
    };
    eprintln!(
        "fastpath: generator on CPU {}, userspace relays on CPU {}; {} round(s) of {} s per path",
        plan.cpus.generator, plan.cpus.relay, plan.runs, plan.secs
    );
    let mut benches = Vec::new();
    for kind in Kind::ALL {
        eprintln!("fastpath: setting up {}", kind.name());
        benches.push(
            Bench::new(kind, &plan).with_context(|| format!("setting up {:?}", kind.name()))?,
        );
    }
    let what = |kind: Kind, size: usize| format!("{}, {size}-byte packets", kind.name());
    let dur = Duration::from_secs_f64(plan.secs);
    let mut rows = Vec::new();
    for size in SIZES {
        let mut preps = Vec::new();
        for b in &mut benches {
            preps.push(b.prepare(size).with_context(|| what(b.kind, size))?);
        }
        // Rounds over all paths, so that a slow spell of the shared
        // machine falls on every path alike.
        let mut samples = vec![Vec::new(); benches.len()];
        for round in 1..=plan.runs {
            for ((b, p), runs) in benches.iter().zip(&preps).zip(&mut samples) {
                let s = b
                    .sample(&p.frame, dur, p.paced)
                    .with_context(|| what(b.kind, size))?;
                eprintln!(
                    "  {size:>4} B round {round}, {:<6}: sent {:>8} delivered {:>8} ({:.3} Mpps), \
                     {:>4.0} ns CPU/packet; generator had {:.0}% of its CPU",
                    b.kind.tag(),
                    s.sent,
                    s.delivered,
                    s.delivered as f64 / s.wall.as_secs_f64() / 1e6,
                    s.ns_per_packet(),
                    s.gen_share * 100.0,
                );
                ensure!(
                    s.delivered > 0 && s.delivered * 100 >= s.sent,
                    "{}: only {} of {} frames reached the sink: the path drops nearly everything",
                    what(b.kind, size),
                    s.delivered,
                    s.sent
                );
                runs.push(s);
            }
        }
        for ((b, p), runs) in benches.iter_mut().zip(preps).zip(samples) {
            rows.push(b.conclude(p, runs).with_context(|| what(b.kind, size))?);
        }
    }
    for b in benches {
        b.finish()?;
    }
    Ok(report(&rows, &plan))
}

/// How long and where to run.
struct Plan {
    secs: f64,
    runs: usize,
    cpus: Cpus,
}

/// The CPU the generator (and with it every XDP and softirq path) is pinned
/// to, the one the userspace relays run on, and each CPU's ksoftirqd.
#[derive(Clone)]
struct Cpus {
    generator: usize,
    relay: usize,
    softirqd: Vec<(usize, u32)>,
}

impl Cpus {
    fn pick() -> Result<Self> {
        let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let allowed: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        let generator = *allowed
            .last()
            .context("no CPU in this process's affinity mask")?;
        let relay = allowed
            .iter()
            .copied()
            .find(|&c| c != generator)
            .unwrap_or(generator);
        Ok(Self {
            generator,
            relay,
            softirqd: softirq_threads()?,
        })
    }
}

// ---------------------------------------------------------------- topology --

/// Three namespaces, `gen` -- `dut` -- `sink`, deleted on drop (with them
/// their veths and whatever is attached to those).
struct Topology {
    load: String,
    dut: String,
    sink: String,
}

impl Topology {
    fn new(tag: &str) -> Result<Self> {
        let p = format!("bfp{}-{tag}", std::process::id());
        let t = Self {
            load: format!("{p}-gen"),
            dut: format!("{p}-dut"),
            sink: format!("{p}-sink"),
        };
        // From here on, an early return drops `t`, which deletes what exists.
        for ns in [&t.load, &t.dut, &t.sink] {
            cmd("ip", &["netns", "add", ns], None)?;
            // IPv6 off: no router solicitations or DAD probes at the sink.
            ns_exec(
                ns,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        for (ns, dev, mac, peer_ns, peer, peer_mac) in [
            (&t.load, GEN_DEV, GEN_MAC, &t.dut, DUT_IN, IN_MAC),
            (&t.dut, DUT_OUT, OUT_MAC, &t.sink, SINK_DEV, SINK_MAC),
        ] {
            ip(
                ns,
                &[
                    "link",
                    "add",
                    dev,
                    "address",
                    &mac_str(mac),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    peer,
                    "address",
                    &mac_str(peer_mac),
                    "netns",
                    peer_ns,
                ],
            )?;
            ip(ns, &["link", "set", dev, "up"])?;
            ip(peer_ns, &["link", "set", peer, "up"])?;
        }
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.load, &self.dut, &self.sink] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs a command; its stderr in the error if it fails.
fn cmd(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut c = Command::new(program);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let what = format!("`{program} {}`", args.join(" "));
    let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
    if let Some(text) = stdin {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .context("child stdin")?
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to {what}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n NS ARGS`.
fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    cmd("ip", &a, None)
}

/// `ip netns exec NS PROGRAM ARGS`.
fn ns_exec(ns: &str, program: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["netns", "exec", ns, program];
    a.extend_from_slice(args);
    cmd("ip", &a, None)
}

fn mac_str(m: Mac) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn netns_file(ns: &str) -> Result<File> {
    let p = format!("/run/netns/{ns}");
    File::open(&p).with_context(|| format!("opening {p}"))
}

/// Runs `f` on a thread of its own inside namespace `ns` (interface names
/// and indexes, attaching XDP and `BPF_PROG_TEST_RUN` all resolve in the
/// calling thread's network namespace).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = netns_file(ns)?;
    thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering namespace {ns}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread in namespace {ns} panicked"))?
    })
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

fn ifindex(dev: &str) -> Result<u32> {
    if_nametoindex(dev).with_context(|| format!("no interface {dev}"))
}

/// A pin directory for one bond object, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Result<Self> {
        let bpffs = Path::new(datapath::DEFAULT_BPFFS);
        datapath::ensure_bpffs(bpffs).context("mounting bpffs")?;
        let p = bpffs.join(format!("bfp{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Ok(Self(p))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ------------------------------------------------------------------- bench --

/// One path under test: its topology, the benchmark's own programs, and
/// what runs in `dut`. Fields drop in order: the relay thread stops first,
/// bond's programs detach, then the namespaces go.
struct Bench {
    kind: Kind,
    cpus: Cpus,
    secs: f64,
    relay: Option<Relay>,
    bond: Option<(Ebpf, Maps)>,
    _pin: Option<PinDir>,
    /// bond-ebpf's `bench` object: generator, pass, redirect, sink.
    tools: Ebpf,
    /// Whichever of `bench_sink` and `bench_capture` is on the sink.
    sink_link: Option<(&'static str, XdpLinkId)>,
    topo: Topology,
}

/// What a path should deliver for one test frame.
enum Expect {
    /// Exactly these bytes.
    Frame(Vec<u8>),
    /// A UDP datagram with this payload between these endpoints (the IP
    /// header's id and flags are the sender kernel's choice).
    Udp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: Vec<u8>,
    },
}

/// A path readied for one packet size.
struct Prepared {
    size: usize,
    frame: Vec<u8>,
    expect: Expect,
    /// The rate to offer (frames per second), for the userspace relays.
    paced: Option<f64>,
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    sent: u64,
    delivered: u64,
    wall: Duration,
    /// Run time of the threads doing the work.
    cpu: Duration,
    /// The generator thread's run time over the wall time: below 1 when
    /// other processes took turns on its CPU.
    gen_share: f64,
}

impl Sample {
    fn ns_per_packet(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e9 / self.delivered as f64
    }
}

/// One line of the table.
struct Row {
    kind: Kind,
    size: usize,
    sample: Sample,
    /// The offered rate, if the generator was paced.
    paced: Option<f64>,
}

impl Bench {
    fn new(kind: Kind, plan: &Plan) -> Result<Self> {
        let topo = Topology::new(kind.tag())?;
        let mut tools = EbpfLoader::new()
            .load(bond_lab::BENCH)
            .context("loading the bench object (bond-ebpf/src/bin/bench.rs)")?;
        for p in ["bench_tx", "bench_sink", "bench_capture"] {
            xdp_mut(&mut tools, p)?
                .load()
                .with_context(|| format!("loading {p}"))?;
        }
        // Each test run with repeat > 1 adds its program to the kernel's XDP
        // dispatcher and removes it again, two RCU grace periods that leave
        // the generator idle most of the time, unless the program is in the
        // dispatcher already: attached to an interface. gen's loopback
        // carries no traffic.
        let tx = xdp_mut(&mut tools, "bench_tx")?;
        in_netns(&topo.load, || {
            tx.attach("lo", XdpMode::Skb)
                .context("attaching bench_tx to gen's loopback")
        })?;
        let mut b = Self {
            kind,
            cpus: plan.cpus.clone(),
            secs: plan.secs,
            relay: None,
            bond: None,
            _pin: None,
            tools,
            sink_link: None,
            topo,
        };
        b.set_sink("bench_capture")?;
        b.setup_dut()?;
        Ok(b)
    }

    /// Configures `dut` for this path.
    fn setup_dut(&mut self) -> Result<()> {
        let dut = self.topo.dut.clone();
        let (in_idx, out_idx) = in_netns(&dut, || Ok((ifindex(DUT_IN)?, ifindex(DUT_OUT)?)))?;
        // Addresses: the gen side is the LAN, or the server's WAN.
        let in_addr = match self.kind {
            Kind::BondServer => SERVER_IP,
            _ => LAN_IP,
        };
        ip(
            &dut,
            &["addr", "add", &format!("{in_addr}/24"), "dev", DUT_IN],
        )?;
        ip(
            &dut,
            &["addr", "add", &format!("{OUT_IP}/24"), "dev", DUT_OUT],
        )?;
        ip(
            &dut,
            &[
                "neigh",
                "replace",
                &CONTENT_IP.to_string(),
                "lladdr",
                &mac_str(SINK_MAC),
                "dev",
                DUT_OUT,
                "nud",
                "permanent",
            ],
        )?;
        match self.kind {
            Kind::Floor => {
                let mut to: Array<_, u32> = self
                    .tools
                    .map_mut("REDIRECT_TO")
                    .context("map REDIRECT_TO")?
                    .try_into()?;
                to.set(0, out_idx, 0).context("setting REDIRECT_TO")?;
                self.attach_tool("bench_redirect")?;
            }
            Kind::Kernel => {
                ns_exec(&dut, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                let rules = format!(
                    "table ip bfp {{\n  chain post {{\n    \
                     type nat hook postrouting priority srcnat;\n    \
                     oifname \"{DUT_OUT}\" masquerade\n  }}\n}}\n"
                );
                let args = ["netns", "exec", &dut, "nft", "-f", "-"];
                cmd("ip", &args, Some(&rules)).context("nftables masquerade rule")?;
                self.attach_tool("bench_pass")?;
            }
            Kind::UdpRelay | Kind::UdpRelayMmsg => {
                self.attach_tool("bench_pass")?;
                self.relay = Some(Relay::start(
                    &dut,
                    self.cpus.relay,
                    self.kind == Kind::UdpRelayMmsg,
                )?);
            }
            Kind::BondRelay => {
                let pin = PinDir::new(self.kind.tag())?;
                let ebpf = datapath::load(bond_datapath::ebpf::TERMINAL, &pin.0)
                    .context("loading bond's terminal object")?;
                let maps = Maps::new(&pin.0);
                // A terminal at 10.0.1.1 whose one WAN link (out0) relays
                // DATA_UP from its LAN peer 10.0.1.2 (the generator).
                maps.set_terminal_config(TerminalConfig {
                    token: RELAY_TOKEN,
                    lan_ip: LAN_IP.into(),
                    server_ip: SERVER_IP.into(),
                    lan_ifindex: in_idx,
                    community: COMMUNITY,
                    data_port: DATA_PORT,
                    server_port: SERVER_PORT,
                    lan_mac: IN_MAC,
                })?;
                maps.set_relay_link(
                    RELAY_PORT,
                    RelayLink {
                        wan_ifindex: out_idx,
                        wan_ip: LINK_IP.into(),
                        link: LINK_ID,
                        flags: 0,
                        port: RELAY_PORT,
                        wan_mac: OUT_MAC,
                        gw_mac: SINK_MAC,
                        mtu: 1500,
                        _pad2: [0; 2],
                    },
                )?;
                maps.set_neighbor(PEER_IP, GEN_MAC)?;
                self._pin = Some(pin);
                self.attach_bond(ebpf, maps, "bond_terminal")?;
            }
            Kind::BondServer => {
                // bpf_fib_lookup needs forwarding on, as the agent sets it.
                ns_exec(&dut, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                let pin = PinDir::new(self.kind.tag())?;
                let ebpf = datapath::load(bond_datapath::ebpf::SERVER, &pin.0)
                    .context("loading bond's server object")?;
                let maps = Maps::new(&pin.0);
                // A server at 198.51.100.254:7000 with one community link
                // (the generator, 198.51.100.11:7001), one logged-on origin
                // (10.0.1.1) and content servers behind out0.
                maps.set_server_config(ServerConfig {
                    wan_ip: SERVER_IP.into(),
                    nat_ip: OUT_IP.into(),
                    port: SERVER_PORT,
                    port_min: *NAT_PORTS.start(),
                    port_max: *NAT_PORTS.end(),
                    link_mtu: 1500,
                    per_origin: 0,
                })?;
                maps.set_server_link(
                    0,
                    ServerLink {
                        ip: LINK_IP.into(),
                        port: RELAY_PORT,
                        community: COMMUNITY,
                        link: LINK_ID,
                        flags: LINK_VALID,
                        _pad: [0; 2],
                        owner: LAN_IP.into(),
                    },
                )?;
                maps.set_session(COMMUNITY, LAN_IP, ORIGIN_TOKEN)?;
                // A link far faster than the generator: the bench measures
                // packet handling, not a full link (`links_full`).
                maps.set_down_paths(COMMUNITY, &[(0, 1_000_000_000, 0)], DEFAULT_BACKLOG_US, 0)?;
                maps.push_free_ports(NAT_PORTS)?;
                self._pin = Some(pin);
                self.attach_bond(ebpf, maps, "bond_server")?;
            }
        }
        Ok(())
    }

    /// Loads one of the bench object's programs and attaches it to dut's in0.
    fn attach_tool(&mut self, prog: &str) -> Result<()> {
        let p = xdp_mut(&mut self.tools, prog)?;
        p.load().with_context(|| format!("loading {prog}"))?;
        in_netns(&self.topo.dut, || {
            p.attach(DUT_IN, XdpMode::default())
                .with_context(|| format!("attaching {prog} to {DUT_IN}"))
        })?;
        Ok(())
    }

    /// Loads bond's program `prog` and attaches it to dut's in0.
    fn attach_bond(&mut self, mut ebpf: Ebpf, maps: Maps, prog: &str) -> Result<()> {
        let p = xdp_mut(&mut ebpf, prog)?;
        p.load().with_context(|| format!("loading {prog}"))?;
        in_netns(&self.topo.dut, || {
            p.attach(DUT_IN, XdpMode::default())
                .with_context(|| format!("attaching {prog} to {DUT_IN}"))
        })?;
        self.bond = Some((ebpf, maps));
        Ok(())
    }

    /// Puts `prog` (`bench_sink` or `bench_capture`) on the sink's veth in
    /// place of whichever is there.
    fn set_sink(&mut self, prog: &'static str) -> Result<()> {
        if self.sink_link.as_ref().is_some_and(|(p, _)| *p == prog) {
            return Ok(());
        }
        if let Some((old, id)) = self.sink_link.take() {
            xdp_mut(&mut self.tools, old)?
                .detach(id)
                .with_context(|| format!("detaching {old}"))?;
        }
        let p = xdp_mut(&mut self.tools, prog)?;
        let id = in_netns(&self.topo.sink, || {
            p.attach(SINK_DEV, XdpMode::default())
                .with_context(|| format!("attaching {prog} to {SINK_DEV}"))
        })?;
        self.sink_link = Some((prog, id));
        Ok(())
    }

    /// Readies the path for `size`-byte packets: checks its output, puts
    /// the counting sink on and warms it up.
    fn prepare(&mut self, size: usize) -> Result<Prepared> {
        let (frame, expect) = self.frames(size);
        self.set_template(&frame)?;
        self.check(&frame, &expect)?;
        self.set_sink("bench_sink")?;
        // A short warm-up (flows, conntrack and page pools settle). For the
        // userspace relays it is flat out and gives the rate to offer, a
        // little below it, so that few packets are generated only to be
        // dropped at the socket.
        let warm = self.sample(&frame, Duration::from_secs_f64(self.secs / 4.0), None)?;
        ensure!(warm.delivered > 0, "the warm-up delivered nothing");
        let paced = self
            .kind
            .is_userspace()
            .then(|| PACE_SHARE * warm.delivered as f64 / warm.wall.as_secs_f64());
        Ok(Prepared {
            size,
            frame,
            expect,
            paced,
        })
    }

    /// After the runs at one size: checks the counters and the output again
    /// (with the pages of the run's pool reused many times), and returns
    /// the median run.
    fn conclude(&mut self, p: Prepared, mut runs: Vec<Sample>) -> Result<Row> {
        self.check_counters()?;
        self.check(&p.frame, &p.expect)
            .context("after the measurement")?;
        self.check_counters()?;
        runs.sort_by(|a, b| a.ns_per_packet().total_cmp(&b.ns_per_packet()));
        let sample = *runs.get(runs.len() / 2).context("no runs")?;
        Ok(Row {
            kind: self.kind,
            size: p.size,
            sample,
            paced: p.paced,
        })
    }

    /// The frame the generator sends and what the sink should get for it,
    /// with a user packet of `size` bytes.
    fn frames(&self, size: usize) -> (Vec<u8>, Expect) {
        let user = |src, dst| {
            let mut p = Ip::new(src, dst, L4::udp(USER_SPORT, USER_DPORT));
            p.payload = vec![0x5a; size - 28];
            p
        };
        match self.kind {
            Kind::Floor => {
                let f = user(PEER_IP, CONTENT_IP).frame(IN_MAC, GEN_MAC);
                (f.clone(), Expect::Frame(f))
            }
            Kind::Kernel => {
                let p = user(PEER_IP, CONTENT_IP);
                let out = Ip {
                    src: OUT_IP,
                    ttl: p.ttl - 1,
                    ..p.clone()
                };
                (
                    p.frame(IN_MAC, GEN_MAC),
                    Expect::Frame(out.frame(SINK_MAC, OUT_MAC)),
                )
            }
            Kind::UdpRelay | Kind::UdpRelayMmsg => {
                let p = user(PEER_IP, LAN_IP);
                let payload = p.payload.clone();
                (
                    p.frame(IN_MAC, GEN_MAC),
                    Expect::Udp {
                        src: SocketAddrV4::new(OUT_IP, RELAY_SPORT),
                        dst: SocketAddrV4::new(CONTENT_IP, USER_DPORT),
                        payload,
                    },
                )
            }
            Kind::BondRelay => {
                // DATA_UP from the LAN peer to the relay port, out on the
                // WAN link towards the server (tests/prog/,
                // terminal_relays_up_to_the_server).
                let inner = user(PEER_IP, CONTENT_IP).bytes();
                let outer = Outer {
                    dst_mac: IN_MAC,
                    src_mac: GEN_MAC,
                    src: PEER_IP,
                    dst: LAN_IP,
                    sport: DATA_PORT,
                    dport: RELAY_PORT,
                    ttl: 64,
                    id: 0x0077,
                    more_fragments: false,
                };
                let bond = Bond::data(DATA_UP, COMMUNITY, LINK_ID, PEER_IP, 0x41, ORIGIN_TOKEN);
                let out = Outer {
                    dst_mac: SINK_MAC,
                    src_mac: OUT_MAC,
                    src: LINK_IP,
                    dst: SERVER_IP,
                    sport: RELAY_PORT,
                    dport: SERVER_PORT,
                    // The relay writes bond's own outer header
                    // (`wire::outer_headers`): identification 0.
                    id: 0,
                    ..outer
                };
                (
                    wrapped(&outer, &bond, &inner),
                    Expect::Frame(wrapped(&out, &bond, &inner)),
                )
            }
            Kind::BondServer => {
                // DATA_UP from the community link, unwrapped and NATed to
                // the first free port, out to the content server.
                let p = user(LAN_IP, CONTENT_IP);
                let outer = Outer {
                    dst_mac: IN_MAC,
                    src_mac: GEN_MAC,
                    src: LINK_IP,
                    dst: SERVER_IP,
                    sport: RELAY_PORT,
                    dport: SERVER_PORT,
                    ttl: 50,
                    id: 0x0abc,
                    more_fragments: false,
                };
                let bond = Bond::data(DATA_UP, COMMUNITY, LINK_ID, LAN_IP, 0x40, ORIGIN_TOKEN);
                let out = Ip {
                    src: OUT_IP,
                    ttl: p.ttl - 1,
                    l4: p.l4.with_src_port(*NAT_PORTS.start()),
                    ..p.clone()
                };
                (
                    wrapped(&outer, &bond, &p.bytes()),
                    Expect::Frame(eth(SINK_MAC, OUT_MAC, ETH_P_IP, &out.bytes())),
                )
            }
        }
    }

    /// Sends CHECK_FRAMES frames in one test run with `bench_capture` on the
    /// sink: all must arrive, the last one as expected.
    fn check(&mut self, frame: &[u8], expect: &Expect) -> Result<()> {
        self.set_sink("bench_capture")?;
        let before = self.delivered()?;
        self.generate(frame, Amount::Frames(CHECK_FRAMES), None)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = 0;
        while Instant::now() < deadline {
            got = self.delivered()? - before;
            if got >= u64::from(CHECK_FRAMES) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if got != u64::from(CHECK_FRAMES) {
            bail!(
                "{got} of {CHECK_FRAMES} test frames reached the sink{}",
                match self.bond_counters() {
                    Ok(Some(c)) => format!(" (bond: {c})"),
                    _ => String::new(),
                }
            );
        }
        let out = self.captured()?;
        match expect {
            Expect::Frame(want) => {
                if &out != want {
                    let at = out.iter().zip(want).position(|(a, b)| a != b);
                    bail!(
                        "the sink got other bytes than expected (first difference at byte {at:?}, \
                         lengths {} vs {})\n got: {out:02x?}\nwant: {want:02x?}",
                        out.len(),
                        want.len()
                    );
                }
            }
            Expect::Udp { src, dst, payload } => {
                let got = udp_of(&out).context("the sink got no IPv4/UDP frame")?;
                ensure!(
                    got == (*src, *dst, payload.clone()),
                    "the sink got {got:?}, expected {:?}",
                    (src, dst, payload)
                );
            }
        }
        Ok(())
    }

    /// For bond's paths: no drops counted, and the server never handed a
    /// packet to the kernel (its slow path).
    fn check_counters(&self) -> Result<()> {
        if let Some(c) = self.bond_counters()? {
            bail!("bond counted {c}");
        }
        Ok(())
    }

    /// bond's non-zero drop counters and slow-path events, if any.
    fn bond_counters(&self) -> Result<Option<String>> {
        let Some((_, maps)) = self.bond.as_ref() else {
            return Ok(None);
        };
        let mut bad = if maps.has("T_DROPS") {
            maps.terminal_drops()
        } else {
            maps.server_drops()
        }
        .context("reading bond's drop counters")?;
        if maps.has("S_EVENTS") {
            let ev = maps
                .server_events()
                .context("reading the server's events")?;
            bad.extend(
                ev.into_iter()
                    .filter(|e| e.0 == event::NAMES[event::SLOW_PATH as usize]),
            );
        }
        let bad: Vec<String> = bad
            .into_iter()
            .filter(|c| c.1 != 0)
            .map(|(n, v)| format!("{n} = {v}"))
            .collect();
        Ok((!bad.is_empty()).then(|| bad.join(", ")))
    }

    /// One run: the generator for `dur`, CPU time and deliveries around it.
    fn sample(&self, frame: &[u8], dur: Duration, pace: Option<f64>) -> Result<Sample> {
        let c0 = self.delivered()?;
        let h0 = self.helpers_cpu()?;
        let start = Instant::now();
        let g = self.generate(frame, Amount::For(dur), pace)?;
        let wall = start.elapsed();
        let h1 = self.helpers_cpu()?;
        thread::sleep(SETTLE);
        let delivered = self.delivered()? - c0;
        Ok(Sample {
            sent: g.sent,
            delivered,
            wall,
            cpu: g.cpu + h1.saturating_sub(h0),
            gen_share: g.cpu.as_secs_f64() / wall.as_secs_f64(),
        })
    }

    /// Run time so far of the threads that work for the path besides the
    /// generator: the ksoftirqd threads of the CPUs used, the relay thread.
    fn helpers_cpu(&self) -> Result<Duration> {
        let mut t = Duration::ZERO;
        for &(cpu, pid) in &self.cpus.softirqd {
            if cpu == self.cpus.generator || (self.relay.is_some() && cpu == self.cpus.relay) {
                t += run_time(&format!("/proc/{pid}/schedstat"))?;
            }
        }
        if let Some(r) = &self.relay {
            t += run_time(&format!("/proc/self/task/{}/schedstat", r.tid))?;
        }
        Ok(t)
    }

    /// Sends `frame` out of the generator's veth from its pinned CPU. `pace`
    /// (frames per second) spaces batches.
    fn generate(&self, frame: &[u8], amount: Amount, pace: Option<f64>) -> Result<Generated> {
        let prog: &Xdp = self
            .tools
            .program("bench_tx")
            .context("no program bench_tx")?
            .try_into()?;
        let cpu = self.cpus.generator;
        in_netns(&self.topo.load, || {
            pin_to(cpu)?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
            // rx_queue_index, egress_ifindex. XDP_TX in live mode goes out
            // of the ingress interface.
            let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex(GEN_DEV)?, 0, 0]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect();
            let send = |n: u32| {
                prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat: n,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..Default::default()
                })
                .context("BPF_PROG_TEST_RUN (live frames) of bench_tx")
            };
            let cpu0 = thread_cpu()?;
            let mut sent = 0u64;
            match amount {
                Amount::Frames(n) => {
                    send(n)?;
                    sent = u64::from(n);
                }
                Amount::For(dur) => {
                    // Paced: about a millisecond of traffic per call (each
                    // call costs some 20 us to set up its page pool).
                    let chunk = match pace {
                        Some(rate) => {
                            ((rate / 1000.0 / f64::from(BATCH)).round() as u32)
                                .clamp(1, CHUNK / BATCH)
                                * BATCH
                        }
                        None => CHUNK,
                    };
                    let start = Instant::now();
                    while start.elapsed() < dur {
                        if let Some(rate) = pace {
                            let due = start + Duration::from_secs_f64(sent as f64 / rate);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                thread::sleep(wait);
                            }
                        }
                        send(chunk)?;
                        sent += u64::from(chunk);
                    }
                }
            }
            Ok(Generated {
                sent,
                cpu: thread_cpu()? - cpu0,
            })
        })
    }

    /// Gives `bench_tx` the head of `frame` to restore in every frame.
    fn set_template(&mut self, frame: &[u8]) -> Result<()> {
        let n = frame.len().min(TEMPLATE_MAX);
        let mut t = [0u8; 8 + TEMPLATE_MAX];
        t[..4].copy_from_slice(&(n as u32).to_ne_bytes());
        t[8..8 + n].copy_from_slice(&frame[..n]);
        let mut m: Array<_, [u8; 8 + TEMPLATE_MAX]> = self
            .tools
            .map_mut("TEMPLATE")
            .context("map TEMPLATE")?
            .try_into()?;
        m.set(0, t, 0).context("setting TEMPLATE")
    }

    /// Frames the sink has counted so far.
    fn delivered(&self) -> Result<u64> {
        let m: PerCpuArray<_, u64> = self
            .tools
            .map("SINK_COUNT")
            .context("map SINK_COUNT")?
            .try_into()?;
        Ok(m.get(&0, 0).context("reading SINK_COUNT")?.iter().sum())
    }

    /// The last frame `bench_capture` kept.
    fn captured(&self) -> Result<Vec<u8>> {
        let m: Array<_, [u8; 8 + CAPTURE_MAX]> = self
            .tools
            .map("CAPTURE")
            .context("map CAPTURE")?
            .try_into()?;
        let c = m.get(&0, 0).context("reading CAPTURE")?;
        let len = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as usize;
        ensure!(
            (1..=CAPTURE_MAX).contains(&len),
            "bench_capture kept no frame"
        );
        Ok(c[8..8 + len].to_vec())
    }

    /// Stops the userspace relay, if any, and reports how it ended.
    fn finish(mut self) -> Result<()> {
        match self.relay.take() {
            Some(r) => r.stop().context("userspace relay"),
            None => Ok(()),
        }
    }
}

/// What a generator run did.
struct Generated {
    sent: u64,
    /// The generator thread's run time (with the softirq work it did).
    cpu: Duration,
}

/// How much the generator sends.
#[derive(Clone, Copy)]
enum Amount {
    Frames(u32),
    For(Duration),
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// Source, destination and payload of an Ethernet/IPv4/UDP frame.
fn udp_of(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (p.net, p.transport) else {
        return None;
    };
    let h = ip.header();
    Some((
        SocketAddrV4::new(h.source_addr(), udp.source_port()),
        SocketAddrV4::new(h.destination_addr(), udp.destination_port()),
        udp.payload().to_vec(),
    ))
}

// ------------------------------------------------------------- CPU times --

/// The calling thread's run time.
fn thread_cpu() -> Result<Duration> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).context("thread CPU clock")?;
    Ok(Duration::from(t))
}

/// The run time in a `schedstat` file (nanoseconds on the CPU, first field;
/// current to the last scheduler tick).
fn run_time(path: &str) -> Result<Duration> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected {path}: {s:?}"))?;
    Ok(Duration::from_nanos(ns))
}

/// The pid of each CPU's ksoftirqd thread.
fn softirq_threads() -> Result<Vec<(usize, u32)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Some(cpu) = comm.trim().strip_prefix("ksoftirqd/") {
            out.push((cpu.parse()?, pid));
        }
    }
    ensure!(!out.is_empty(), "no ksoftirqd threads in /proc");
    Ok(out)
}

// --------------------------------------------------------- userspace relay --

/// The userspace baseline: a thread in `dut` that takes each datagram sent
/// to 10.0.1.1:9000 and sends its payload on to the sink (203.0.113.2:9000)
/// from a connected socket, one `recvfrom` and one `send` per packet, or
/// up to 64 packets per `recvmmsg`/`sendmmsg`.
struct Relay {
    stop: Arc<AtomicBool>,
    /// The thread's id, for its run time.
    tid: i32,
    handle: Option<thread::JoinHandle<Result<()>>>,
}

impl Relay {
    fn start(ns: &str, cpu: usize, batched: bool) -> Result<Self> {
        let file = netns_file(ns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let s = stop.clone();
        let ns_name = ns.to_string();
        let handle = thread::spawn(move || -> Result<()> {
            let setup = || -> Result<(UdpSocket, UdpSocket)> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering namespace {ns_name}"))?;
                pin_to(cpu)?;
                let rx = UdpSocket::bind(SocketAddrV4::new(LAN_IP, USER_DPORT))
                    .context("binding the relay's receive socket")?;
                // A timeout, to notice `stop` when no traffic comes.
                rx.set_read_timeout(Some(Duration::from_millis(50)))?;
                // Room for the generator's bursts (a millisecond of traffic),
                // past net.core.rmem_max, as a relay tuned for speed would.
                let size: libc::c_int = RELAY_RCVBUF;
                // SAFETY: a valid socket, and a pointer to a c_int of the
                // length given.
                let rc = unsafe {
                    libc::setsockopt(
                        rx.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&raw const size).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error()).context("SO_RCVBUFFORCE");
                }
                let tx = UdpSocket::bind(SocketAddrV4::new(OUT_IP, RELAY_SPORT))
                    .context("binding the relay's send socket")?;
                tx.connect(SocketAddrV4::new(CONTENT_IP, USER_DPORT))?;
                Ok((rx, tx))
            };
            let (rx, tx) = match setup() {
                Ok(socks) => {
                    let _ = ready_tx.send(Ok(gettid().as_raw()));
                    socks
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            if batched {
                relay_batched(&rx, &tx, &s)
            } else {
                relay_simple(&rx, &tx, &s)
            }
        });
        let mut relay = Self {
            stop,
            tid: 0,
            handle: Some(handle),
        };
        relay.tid = ready_rx
            .recv()
            .context("the relay thread ended before it was ready")??;
        Ok(relay)
    }

    /// Stops the thread; its error, if it failed.
    fn stop(mut self) -> Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("the relay thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

fn relay_simple(rx: &UdpSocket, tx: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match rx.recv_from(&mut buf) {
            Ok((len, _from)) => {
                tx.send(&buf[..len]).context("relay send")?;
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e).context("relay recv_from"),
        }
    }
    Ok(())
}

fn relay_batched(rx: &UdpSocket, tx: &UdpSocket, stop: &AtomicBool) -> Result<()> {
    const B: usize = 64;
    let mut bufs = vec![[0u8; 2048]; B];
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; B];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) header.
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; B];
    while !stop.load(Ordering::Relaxed) {
        for i in 0..B {
            iovs[i].iov_len = bufs[i].len();
            hdrs[i].msg_hdr.msg_iov = &raw mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&raw mut names[i]).cast();
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: `hdrs` holds B headers, each pointing at one live iovec
        // over a live 2048-byte buffer and at a live sockaddr_in; none of
        // them moves or is freed during the call.
        let got = unsafe {
            libc::recvmmsg(
                rx.as_raw_fd(),
                hdrs.as_mut_ptr(),
                B as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if timed_out(&e) {
                continue;
            }
            return Err(e).context("relay recvmmsg");
        }
        let got = got as usize;
        for i in 0..got {
            iovs[i].iov_len = hdrs[i].msg_len as usize;
            // The send socket is connected: no destination per message.
            hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
            hdrs[i].msg_hdr.msg_namelen = 0;
        }
        let mut done = 0;
        while done < got {
            // SAFETY: as above, for the `got - done` headers from `done` on,
            // whose iovecs now cover the received bytes.
            let sent = unsafe {
                libc::sendmmsg(
                    tx.as_raw_fd(),
                    hdrs.as_mut_ptr().add(done),
                    (got - done) as u32,
                    0,
                )
            };
            if sent < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("relay sendmmsg");
            }
            done += sent as usize;
        }
    }
    Ok(())
}

// ----------------------------------------------------------------- report --

fn report(rows: &[Row], plan: &Plan) -> String {
    let find = |kind: Kind, size: usize| rows.iter().find(|r| r.kind == kind && r.size == size);
    let per_core = |r: &Row| 1e3 / r.sample.ns_per_packet();
    let floor_ns = |size: usize| find(Kind::Floor, size).map(|f| f.sample.ns_per_packet());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "One path at a time between three namespaces (gen -> dut -> sink) on unlimited veth \
         links; median of {} round(s) of one {} s run per path. \"User packet\" is the \
         user's IPv4/UDP packet: the plain packet for the baselines, the packet inside bond's \
         52-byte wrap for bond.",
        plan.runs, plan.secs
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "| path | user packet | delivered Mpps | lost | CPU ns/packet | ns above floor | \
         Mpps per core | vs kernel fwd+NAT | vs UDP relay | vs UDP relay (mmsg) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let s = &r.sample;
        let ns = s.ns_per_packet();
        let above = match floor_ns(r.size) {
            Some(f) if r.kind != Kind::Floor => format!("{:.0}", ns - f),
            _ => "-".to_string(),
        };
        let ratio = |base: Kind| match find(base, r.size) {
            Some(b) if r.kind != Kind::Floor && r.kind != base => {
                format!("{:.2}x", per_core(r) / per_core(b))
            }
            _ => "-".to_string(),
        };
        let lost = 1.0 - s.delivered as f64 / s.sent as f64;
        let _ = writeln!(
            out,
            "| {}{} | {} B | {:.3} | {:.1}% | {:.0} | {} | {:.3} | {} | {} | {} |",
            r.kind.name(),
            match r.paced {
                Some(rate) => format!(" (offered {:.3} Mpps)", rate / 1e6),
                None => String::new(),
            },
            r.size,
            s.delivered as f64 / s.wall.as_secs_f64() / 1e6,
            lost.max(0.0) * 100.0,
            ns,
            above,
            per_core(r),
            ratio(Kind::Kernel),
            ratio(Kind::UdpRelay),
            ratio(Kind::UdpRelayMmsg),
        );
    }
    out.push('\n');
    // The target, per core as measured, and on the paths' own cost.
    for kind in [Kind::BondRelay, Kind::BondServer] {
        for size in SIZES {
            let (Some(b), Some(k)) = (find(kind, size), find(Kind::Kernel, size)) else {
                continue;
            };
            let ratio = per_core(b) / per_core(k);
            let own = floor_ns(size)
                .map(|f| (k.sample.ns_per_packet() - f) / (b.sample.ns_per_packet() - f));
            let _ = writeln!(
                out,
                "- {}, {size} B: {ratio:.2}x the kernel's forwarding + NAT rate per core: \
                 target of {TARGET}x {}{}.",
                kind.name(),
                if ratio >= TARGET {
                    "met"
                } else {
                    "**not met**"
                },
                own.map(|a| format!(
                    " (cost above the floor alone: {a:.1}x less than the kernel's)"
                ))
                .unwrap_or_default()
            );
        }
    }
    if irq_time_accounted() {
        out.push_str(
            "- **Warning**: this kernel accounts IRQ time apart \
             (CONFIG_IRQ_TIME_ACCOUNTING=y), so softirq work is missing from the threads' \
             run time and every CPU figure above is too low.\n",
        );
    }
    out.push('\n');
    let _ = writeln!(
        out,
        "How: `bench_tx` (XDP_TX), run by BPF_PROG_TEST_RUN in live-frames mode from a thread \
         pinned to CPU {}, sends each frame out of gen's veth into the path under test in dut; \
         `bench_sink` counts and drops at the sink. Generator, XDP and the kernel's forwarding \
         all run in that thread's softirq context, so those paths pace the generator \
         themselves; the baselines' dut has an XDP_PASS program on its ingress veth (veth \
         takes XDP frames only then), so the kernel gets skbs built from them, as from a \
         driver. CPU is the run time of the threads doing the work (the generator, the \
         relay's thread, the CPUs' ksoftirqd), not of whole CPUs, as the machine is shared; \
         per core = delivered packets per CPU-second of them. Every figure includes the \
         generator (which rewrites each frame's first {TEMPLATE_MAX} bytes: live mode reuses \
         pages as the path left them) and two veth hops: the floor row, where dut only \
         redirects to its egress veth, is that cost alone. The userspace relays (on CPU {}, \
         {} MiB receive buffer) are offered {:.0}% of the rate a flat-out warm-up delivered, in \
         bursts of about a millisecond, so the CPU figure is not inflated by packets the socket \
         drops. Before and after each measurement {CHECK_FRAMES} frames went through each \
         path and all arrived, the last one byte for byte as \
         expected (the relays': UDP endpoints and payload); bond's drop counters and the \
         server's slow-path count stayed at zero.",
        plan.cpus.generator,
        plan.cpus.relay,
        RELAY_RCVBUF >> 20,
        PACE_SHARE * 100.0,
    );
    out
}

/// Whether the running kernel accounts IRQ time apart from tasks' run time
/// (then softirq work done in a thread's context is not its run time).
fn irq_time_accounted() -> bool {
    Command::new("zgrep")
        .args(["-q", "^CONFIG_IRQ_TIME_ACCOUNTING=y", "/proc/config.gz"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
