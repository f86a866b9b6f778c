//! `cargo xtask bench scale`: the reconstitution server with 10,000
//! communities and 1,000,000 flows in its maps (`--quick`: 1,000 and
//! 100,000): the memory its maps take, how fast its datapath sets up new
//! flows, and its packet rate with a full table. Every figure is set
//! beside a baseline taken in the same run, with their ratio.
//!
//! # Method
//!
//! - **The server as the agent runs it.** The server object is loaded with
//!   `datapath::load_with_sizes`, the flow maps sized by
//!   `flows::server_map_sizes` for the flow count, its maps pinned in a
//!   directory of our own (removed on every path), and configured through
//!   `datapath::Maps` only, as the agent and `tests/prog/` do. Each
//!   community has three terminals (sessions) and three links, and a
//!   downstream schedule over the three.
//! - **The flow table is filled through the map API.** The agent never
//!   writes flows, and the program can create only as many as there are
//!   dedicated ports (see "Findings" in the output): the flows beyond the
//!   port space are written directly into `S_FLOWS` to give the lookup
//!   structure its full size and occupancy. `S_NAT` gets one entry per
//!   dedicated port, as far as the port space goes.
//! - **Packets through the real forwarding path.** `bond_server` runs on
//!   crafted frames with BPF_PROG_TEST_RUN on a thread pinned to one CPU
//!   and moved into a network namespace of its own, which holds what the
//!   server's `bpf_fib_lookup` needs: a WAN and a content veth, a default
//!   route via a router on the WAN side, and permanent neighbour entries.
//!   So upstream and downstream packets are forwarded (XDP_REDIRECT), not
//!   handed to the kernel's slow path; every verdict is checked, the
//!   expected flows are counted, one packet each way is checked against
//!   what the server must send (upstream byte for byte; downstream its
//!   addresses, bond header fields and inner packet), and the drop,
//!   slow-path and race counters must stay zero.
//! - **One packet per call, timed by the kernel.** Each figure is the mean
//!   of the kernel's own timing of single runs (`repeat = 1`). `repeat`
//!   cannot be used for this program: the kernel reruns it on the frame the
//!   previous run rewrote (the run checks and reports this), so all but the
//!   first run would take the fall-through path. The cost of the harness
//!   itself is shown by a floor row: a non-IP frame, passed at the
//!   program's first check. Wall-clock time per call (the syscall) is
//!   reported separately.
//! - **Two servers side by side.** The baseline (a table empty but for K
//!   flows) and the full table (F flows) are two servers of the same sizes,
//!   loaded together; every measurement alternates between them, round by
//!   round (three rounds, the median reported), so a change in the load of
//!   the machine (others run on it) falls on both alike.
//! - **Flow set-up** is a pass of K packets, each the first of a new UDP
//!   flow (a DATA_UP with a valid token over a registered link, a new
//!   source port), against the baseline of the same K packets again (flows
//!   that now exist). It runs at the empty table (0 to K flows) and at the
//!   nearly full one (F - K to F); between rounds the K flows are removed
//!   with the agent's own `remove_flows_if`.
//! - **Packet rate** with an empty (K flows) and a full table (F flows):
//!   one flow over and over (hot in every cache), and K flows in turn,
//!   which at the full table are drawn at random from the F - K flows
//!   written through the map API (replies: from those that hold a port),
//!   so the lookups miss the CPU caches as a busy server's would.
//!   Upstream and downstream.
//! - **Memory** is the kernel's account of each map (the `memlock` line of
//!   its fdinfo): the server at the agent's default configuration (the
//!   baseline), at the scale sizes when just created, and when full.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use bond_common::maps::{
    Flow, FlowKey, LINK_VALID, MAX_SESSIONS, NatEntry, NatKey, ServerConfig, ServerLink, name,
};
use bond_datapath::{self as datapath, Maps};

use crate::packets::{
    Bond, DATA_DOWN, DATA_UP, ETH_P_IP, Ip, L4, Mac, Outer, WRAP_LEN, arp_frame, eth, wrapped,
};

/// The links' rate as the server's scheduler counts it: far beyond what
/// the generator sends, so that the bench measures packet handling, not a
/// full link (`links_full`).
const LINK_KBIT: u64 = 1_000_000_000;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const IPPROTO_UDP: u8 = 17;

/// The server's addresses, as in `tests/prog/`.
const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const NAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const PORT: u16 = 7000;
/// The widest dedicated port range one NAT address offers a server that
/// keeps the well-known ports for itself.
const PORT_MIN: u16 = 1024;
const PORT_MAX: u16 = 65535;
const PORTS: u32 = PORT_MAX as u32 - PORT_MIN as u32 + 1;
/// The agent's default `nat_ports` ("20000-29999"): the memory baseline.
const DEFAULT_PORTS: u32 = 10_000;
const WAN_DEV_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 0x01];
const CNT_DEV_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 0x02];
/// The WAN-side router: every link address is reached through it.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ROUTER_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 0xfe];
const CONTENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const CONTENT_MAC: Mac = [0x02, 0xc0, 0, 0, 0, 0x02];
/// Link addresses are numbered from here (100.64.0.0/10 holds 4M).
const LINK_NET: u32 = u32::from_be_bytes([100, 64, 0, 0]);
const LINK_PORT: u16 = 7001;
/// Terminals (sessions) and links per community.
const TERMINALS: u32 = 3;
const LINKS: u32 = 3;
/// Source ports of the flows written through the map API start here, and
/// those the program creates at `MEASURED_SPORT`: the two sets never meet.
const SYNTHETIC_SPORT: u16 = 1024;
const MEASURED_SPORT: u16 = 40_000;
/// Destination port of every flow (QUIC-like UDP).
const DPORT: u16 = 443;
/// Runs of one upstream frame with `repeat` to show what `repeat` does.
const REPEAT_CHECK: u32 = 1000;

/// The size of one run.
#[derive(Clone, Copy, Debug)]
struct Scale {
    communities: u16,
    /// Flows in the full table (and its size).
    flows: u32,
    /// New flows the program creates per pass (K).
    probe: u32,
    /// Flow set-up rounds per table state; the median is reported.
    rounds: usize,
    /// Calls per one-flow ("hot") pass.
    hot: u32,
}

impl Scale {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                communities: 1_000,
                flows: 100_000,
                probe: 5_000,
                rounds: 3,
                hot: 20_000,
            }
        } else {
            Self {
                communities: 10_000,
                flows: 1_000_000,
                probe: 20_000,
                rounds: 3,
                hot: 100_000,
            }
        }
    }

    /// Flows written through the map API: all but the K the program makes.
    fn synthetic(&self) -> u32 {
        self.flows - self.probe
    }

    /// Synthetic flows that hold a dedicated port of their own (and an
    /// `S_NAT` entry): the ports not kept free for the program's K.
    fn nat_held(&self) -> u32 {
        (PORTS - self.probe).min(self.synthetic())
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.probe <= PORTS && self.probe < self.flows,
            "probe flows {} exceed the port space or the table",
            self.probe
        );
        let n = u32::from(self.communities);
        // Per community, origin: flows / (communities * terminals) ports.
        let per_origin = self.flows.div_ceil(n * TERMINALS);
        ensure!(
            u32::from(SYNTHETIC_SPORT) + per_origin < u32::from(MEASURED_SPORT)
                && u32::from(MEASURED_SPORT) + per_origin <= u32::from(u16::MAX),
            "{} flows over {n} communities need {per_origin} source ports per origin",
            self.flows
        );
        ensure!(
            n * LINKS <= bond_common::maps::MAX_SERVER_LINKS,
            "more links than S_LINKS holds"
        );
        Ok(())
    }
}

/// Runs the suite; returns its markdown (tables, then findings).
pub fn run(quick: bool) -> Result<String> {
    let scale = Scale::new(quick);
    scale.check()?;
    eprintln!(
        "scale: {} communities, {} flows ({} created by the program per pass), one CPU, own netns",
        scale.communities, scale.flows, scale.probe
    );
    // Namespaces and CPU affinity are per thread: both stay on this one.
    std::thread::Builder::new()
        .name("bench-scale".into())
        .spawn(move || -> Result<String> {
            let cpu = isolate()?;
            eprintln!("scale: pinned to CPU {cpu}, in a network namespace of its own");
            network()?;
            measure(scale)
        })
        .context("spawning the benchmark thread")?
        .join()
        .map_err(|e| {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            anyhow!("the benchmark thread panicked: {msg}")
        })?
}

// ------------------------------------------------------------ measurement --

/// What one table state (empty or full) measured: medians over the
/// interleaved rounds.
struct Phase {
    /// The K packets that create flows, and the same packets again.
    new: Pass,
    hit: Pass,
    /// Established flows, upstream and downstream: one flow over and over,
    /// and K flows in turn (at the full table drawn from all of it).
    hot_up: Pass,
    hot_down: Pass,
    spread_up: Pass,
    spread_down: Pass,
    /// The harness's own cost at this point of the run.
    floor: Pass,
    /// The widest spread between rounds of any of the above: (slowest -
    /// fastest) / median, of the kernel times.
    noise: f64,
}

/// The frames of one server's packet-rate passes.
struct Workload {
    hot_up: Vec<u8>,
    hot_down: Vec<u8>,
    spread_up: Vec<Vec<u8>>,
    spread_down: Vec<Vec<u8>>,
}

/// Every pass one server ran, round by round.
#[derive(Default)]
struct Passes {
    new: Vec<Pass>,
    hit: Vec<Pass>,
    hot_up: Vec<Pass>,
    hot_down: Vec<Pass>,
    spread_up: Vec<Pass>,
    spread_down: Vec<Pass>,
    floor: Vec<Pass>,
}

impl Passes {
    fn phase(self) -> Phase {
        let noise = [
            &self.new,
            &self.hit,
            &self.hot_up,
            &self.hot_down,
            &self.spread_up,
            &self.spread_down,
            &self.floor,
        ]
        .into_iter()
        .map(|v| {
            let t = v.iter().map(|p| p.kernel_ns);
            let (lo, hi) = (t.clone().fold(f64::MAX, f64::min), t.fold(0.0, f64::max));
            (hi - lo) / median(v.clone()).kernel_ns
        })
        .fold(0.0, f64::max);
        Phase {
            noise,
            new: median(self.new),
            hit: median(self.hit),
            hot_up: median(self.hot_up),
            hot_down: median(self.hot_down),
            spread_up: median(self.spread_up),
            spread_down: median(self.spread_down),
            floor: median(self.floor),
        }
    }
}

/// The whole run, on the benchmark thread. The baseline (a table empty
/// but for the K flows) and the full table are two servers loaded side by
/// side, and every measurement alternates between them round by round, so
/// a change in the machine's load during the run (others share it) falls
/// on both alike rather than on one of them.
fn measure(scale: Scale) -> Result<String> {
    let mut setup = Vec::new();

    // Baseline for memory: the server as the agent loads it by default.
    let (default_mem, default_load) = {
        let sizes =
            bond_datapath::flows::server_map_sizes(DEFAULT_PORTS, DEFAULT_PORTS, MAX_SESSIONS);
        let (s, t) = Server::load("default", &sizes)?;
        (s.memory()?, t)
    };
    setup.push(Step::new(
        "load the object, default sizes (maps created)",
        1,
        default_load,
        None,
    ));

    let sizes = bond_datapath::flows::server_map_sizes(scale.flows, PORTS, MAX_SESSIONS);
    let (base, load) = Server::load("empty", &sizes)?;
    setup.push(Step::new(
        &format!("load the object, {} flow slots", n(scale.flows)),
        1,
        load,
        None,
    ));
    let empty_mem = base.memory()?;
    let (full, _) = Server::load("full", &sizes)?;

    eprintln!(
        "scale: registering {} communities through Maps (twice: baseline and full server)",
        scale.communities
    );
    let (took, first, last) = register(&base.maps, scale.communities)?;
    setup.push(Step::new(
        "register communities through `Maps` (3 sessions, 3 links, schedule)",
        u32::from(scale.communities),
        took,
        Some((first, last)),
    ));
    register(&full.maps, scale.communities)?;
    // The program's K flows take the top K ports; the synthetic flows that
    // hold ports take them from the bottom.
    for s in [&base, &full] {
        let free = (PORT_MAX - (scale.probe - 1) as u16)..=PORT_MAX;
        s.maps
            .push_free_ports(free)
            .context("pushing the free ports")?;
        s.expect_clean("after set-up")?;
    }
    let repeat = base.repeat_check(scale)?;

    eprintln!(
        "scale: filling S_FLOWS to {} and S_NAT to {} through the map API",
        n(scale.synthetic()),
        n(scale.nat_held())
    );
    let fill = full.fill(scale)?;
    // One insert through a map handle kept open, for the finding on Maps.
    let open_write = fill[0].took / fill[0].count.max(1);
    setup.extend(fill);

    let servers = [&base, &full];
    let mut passes = [Passes::default(), Passes::default()];
    let up: Vec<Vec<u8>> = (0..scale.probe)
        .map(|k| up_frame(&measured_key(k, scale.communities), (k % LINKS) as u8))
        .collect();
    eprintln!("scale: flow set-up, empty and full table in turn");
    for round in 0..scale.rounds {
        for (s, p) in servers.iter().zip(&mut passes) {
            let (new, hit) = s.setup_round(scale, round, &up)?;
            p.new.push(new);
            p.hit.push(hit);
        }
    }
    let work = [base.workload(scale, false)?, full.workload(scale, true)?];
    eprintln!("scale: packet rates, empty and full table in turn");
    for _ in 0..scale.rounds {
        for ((s, w), p) in servers.iter().zip(&work).zip(&mut passes) {
            s.rates(scale, w, p)?;
        }
    }
    let [empty, full_phase] = passes.map(Passes::phase);

    let full_mem = full.memory()?;
    for (s, what, flows, nat) in [
        (&base, "baseline", scale.probe, scale.probe),
        (&full, "full", scale.flows, scale.nat_held() + scale.probe),
    ] {
        s.expect_clean(&format!("{what} server at the end"))?;
        let f = s.count::<FlowKey, Flow>(name::S_FLOWS)?;
        let m = s.count::<NatKey, NatEntry>(name::S_NAT)?;
        ensure!(
            f == flows && m == nat,
            "{what} server: S_FLOWS holds {f} flows (expected {flows}), S_NAT {m} entries (expected {nat})"
        );
    }

    let mut md = String::new();
    report_setup(&mut md, scale, &setup);
    let mem = Memory {
        default: default_mem,
        empty: empty_mem,
        full: full_mem,
    };
    report_memory(&mut md, scale, &mem);
    report_flow_setup(&mut md, scale, &empty, &full_phase);
    report_packet_rate(&mut md, scale, &empty, &full_phase);
    let writes = Writes {
        register: took,
        open_write,
    };
    report_findings(&mut md, scale, &mem, &repeat, &writes)?;
    Ok(md)
}

/// Registers `n` communities as the agent does at login and announce:
/// sessions, links (entry and index) and a downstream schedule over the
/// links. Returns the total time and the times of the first and the last
/// tenth.
fn register(maps: &Maps, n: u16) -> Result<(Duration, Duration, Duration)> {
    maps.set_server_config(ServerConfig {
        wan_ip: WAN_IP.into(),
        nat_ip: NAT_IP.into(),
        port: PORT,
        port_min: PORT_MIN,
        port_max: PORT_MAX,
        link_mtu: 1500,
        per_origin: 0,
    })
    .context("writing S_CONFIG")?;
    let tenth = (n / 10).max(1);
    let mut first = Duration::ZERO;
    let start = Instant::now();
    let mut mark = start;
    for c in 1..=n {
        for t in 0..TERMINALS {
            maps.set_session(c, origin(t), token(c, t))
                .with_context(|| format!("session of community {c}, terminal {t}"))?;
        }
        for j in 0..LINKS {
            let l = Link::of(c, j);
            maps.set_server_link(
                l.idx,
                ServerLink {
                    ip: l.ip.into(),
                    port: l.port,
                    community: c,
                    link: l.id,
                    flags: LINK_VALID,
                    _pad: [0; 2],
                    owner: origin(j).into(),
                },
            )
            .with_context(|| format!("link {j} of community {c}"))?;
        }
        let links: Vec<(u32, u64, u32)> = (0..LINKS)
            .map(|j| (Link::of(c, j).idx, LINK_KBIT, 0))
            .collect();
        maps.set_down_paths(c, &links, bond_common::edpf::DEFAULT_BACKLOG_US, 0)
            .with_context(|| format!("schedule of community {c}"))?;
        if c == tenth {
            first = start.elapsed();
        }
        if c == n - tenth {
            mark = Instant::now();
        }
    }
    Ok((start.elapsed(), first, mark.elapsed()))
}

impl Server {
    /// One flow set-up round: the K new-flow packets (after removing the
    /// K flows of the previous round), then the same packets again as the
    /// baseline; checks that exactly K flows were created, all by the
    /// first pass.
    fn setup_round(&self, scale: Scale, round: usize, up: &[Vec<u8>]) -> Result<(Pass, Pass)> {
        if round > 0 {
            self.remove_probe(scale)?;
        }
        let frames = || up.iter().map(Vec::as_slice);
        let before = self.counters()?;
        let new = self.pass(frames(), XDP_REDIRECT)?;
        let made = self.counters()?;
        let created = made.event("flows_created") - before.event("flows_created");
        ensure!(
            created == u64::from(scale.probe),
            "round {round}: {} new-flow packets created {created} flows",
            scale.probe
        );
        let hit = self.pass(frames(), XDP_REDIRECT)?;
        let after = self.counters()?;
        ensure!(
            after.event("flows_created") == made.event("flows_created"),
            "round {round}: packets of existing flows created flows"
        );
        Ok((new, hit))
    }

    /// The packet-rate frames, once the set-up rounds left the K flows in
    /// place (checked, and one packet each way checked in full): one flow
    /// for the hot passes; for the spread ones the K flows at the empty
    /// table, or K drawn from the whole full table (replies: from the
    /// flows that hold ports, the only ones a reply can reach).
    fn workload(&self, scale: Scale, full: bool) -> Result<Workload> {
        let keys: Vec<FlowKey> = (0..scale.probe)
            .map(|k| measured_key(k, scale.communities))
            .collect();
        let ports = self.nat_ports(&keys, 2)?;
        self.spot_check(&keys[0], ports[0])?;
        let (spread_up, spread_down) = if full {
            let mut rng = SplitMix(0x5ca1e);
            let up = (0..scale.probe)
                .map(|_| {
                    let i = (rng.next() % u64::from(scale.synthetic())) as u32;
                    up_frame(&synthetic_key(i, scale.communities), (i % LINKS) as u8)
                })
                .collect();
            let down = (0..scale.probe)
                .map(|_| {
                    let i = (rng.next() % u64::from(scale.nat_held())) as u16;
                    reply_frame(PORT_MIN + i)
                })
                .collect();
            (up, down)
        } else {
            let up = keys
                .iter()
                .zip(0..)
                .map(|(k, i)| up_frame(k, (i % LINKS) as u8))
                .collect();
            (up, ports.iter().map(|&p| reply_frame(p)).collect())
        };
        Ok(Workload {
            hot_up: up_frame(&keys[0], 0),
            hot_down: reply_frame(ports[0]),
            spread_up,
            spread_down,
        })
    }

    /// One round of packet-rate passes, appended to `p`: one flow each
    /// way (`scale.hot` packets), K flows each way, and the floor.
    fn rates(&self, scale: Scale, w: &Workload, p: &mut Passes) -> Result<()> {
        let hot = scale.hot as usize;
        let fwd = XDP_REDIRECT;
        p.hot_up
            .push(self.pass(std::iter::repeat_n(&w.hot_up[..], hot), fwd)?);
        p.hot_down
            .push(self.pass(std::iter::repeat_n(&w.hot_down[..], hot), fwd)?);
        p.spread_up
            .push(self.pass(w.spread_up.iter().map(Vec::as_slice), fwd)?);
        p.spread_down
            .push(self.pass(w.spread_down.iter().map(Vec::as_slice), fwd)?);
        // The harness's own cost: a non-IP frame, which the program passes
        // at its first check.
        let arp = arp_frame(ROUTER_MAC, ROUTER, WAN_IP);
        p.floor
            .push(self.pass(std::iter::repeat_n(&arp[..], hot), XDP_PASS)?);
        Ok(())
    }

    /// Removes the program's K flows with the agent's own call; their
    /// ports go back to the queue.
    fn remove_probe(&self, scale: Scale) -> Result<()> {
        let keys = (0..scale.probe).map(|k| measured_key(k, scale.communities));
        let gone = self
            .maps
            .remove_flows_if(keys, |_, _| true)
            .context("removing the measured flows")?;
        ensure!(
            gone.len() == scale.probe as usize && gone.iter().all(|f| f.port_returned),
            "removed {} of {} measured flows ({} ports returned)",
            gone.len(),
            scale.probe,
            gone.iter().filter(|f| f.port_returned).count()
        );
        Ok(())
    }

    /// The dedicated ports of `keys`, after checking each flow exists, has
    /// a port from the free range and counted `up_pkts` packets (so the
    /// timed passes really went through these flows).
    fn nat_ports(&self, keys: &[FlowKey], up_pkts: u64) -> Result<Vec<u16>> {
        let flows = self.hash::<FlowKey, Flow>(name::S_FLOWS)?;
        let lo = PORT_MAX - (keys.len() as u16 - 1);
        let mut seen = std::collections::HashSet::new();
        keys.iter()
            .map(|k| {
                let f = flows
                    .get(k, 0)
                    .with_context(|| format!("the measured flow {k:?} is not in S_FLOWS"))?;
                ensure!(
                    (lo..=PORT_MAX).contains(&f.nat_port) && seen.insert(f.nat_port),
                    "flow {k:?} got port {} (free range {lo}-{PORT_MAX}, or a port twice)",
                    f.nat_port
                );
                ensure!(
                    f.up_pkts == up_pkts,
                    "flow {k:?} counted {} upstream packets, expected {up_pkts}",
                    f.up_pkts
                );
                Ok(f.nat_port)
            })
            .collect()
    }

    /// One packet each way checked against what a server must send:
    /// upstream unwrapped, NATed and addressed to the content server's MAC
    /// (byte for byte); downstream wrapped for the flow's origin on one of
    /// its community's links, towards the router (addresses, bond header
    /// fields, and the inner packet byte for byte).
    fn spot_check(&self, key: &FlowKey, nat_port: u16) -> Result<()> {
        let origin = Ipv4Addr::from(key.origin);
        let inner = Ip::new(origin, CONTENT, L4::udp(key.port, DPORT));
        let want = eth(
            CONTENT_MAC,
            CNT_DEV_MAC,
            ETH_P_IP,
            &Ip {
                src: NAT_IP,
                ttl: inner.ttl - 1,
                l4: L4::udp(nat_port, DPORT),
                ..inner.clone()
            }
            .bytes(),
        );
        let (v, out) = self.run_out(&up_frame(key, 0))?;
        ensure!(
            v == XDP_REDIRECT && out == want,
            "upstream spot check: verdict {v}, output {}",
            if out == want {
                "as expected"
            } else {
                "differs"
            }
        );

        let reply = reply_ip(nat_port);
        let (v, out) = self.run_out(&reply.frame(CNT_DEV_MAC, CONTENT_MAC))?;
        let want_inner = Ip {
            dst: origin,
            ttl: reply.ttl - 1,
            l4: L4::udp(DPORT, key.port),
            ..reply.clone()
        }
        .bytes();
        let links: Vec<[u8; 4]> = (0..LINKS)
            .map(|j| Link::of(key.community, j).ip.octets())
            .collect();
        let t = terminal_of(origin)?;
        let ok = v == XDP_REDIRECT
            && out.len() == WRAP_LEN + want_inner.len()
            && out[0..6] == ROUTER_MAC
            && out[6..12] == WAN_DEV_MAC
            && links.iter().any(|l| out[30..34] == *l)
            && out[45] == DATA_DOWN
            && out[46..48] == key.community.to_be_bytes()
            && out[50..54] == origin.octets()
            && out[58..66] == token(key.community, t).to_be_bytes()
            && out[WRAP_LEN..] == want_inner;
        ensure!(
            ok,
            "downstream spot check: verdict {v}, output not the expected wrap"
        );
        Ok(())
    }

    /// What `repeat` does to a program that rewrites its frame: runs one
    /// upstream frame of a new flow `REPEAT_CHECK` times in one call and
    /// counts the packets its flow saw. The flow is removed afterwards.
    fn repeat_check(&self, scale: Scale) -> Result<RepeatCheck> {
        let key = measured_key(scale.probe, scale.communities);
        let p = self.ebpf_xdp()?;
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(&up_frame(&key, 0)),
                repeat: REPEAT_CHECK,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN with repeat")?;
        let flow = self
            .hash::<FlowKey, Flow>(name::S_FLOWS)?
            .get(&key, 0)
            .context("the repeat check's flow was not created")?;
        let gone = self
            .maps
            .remove_flows_if([key], |_, _| true)
            .context("removing the repeat check's flow")?;
        ensure!(gone.len() == 1, "the repeat check's flow did not go");
        Ok(RepeatCheck {
            counted: flow.up_pkts,
            last_verdict: r.return_value,
        })
    }

    /// Fills the table to F - K flows (and `S_NAT` as far as the ports go)
    /// through the map API; returns the two steps' timings.
    fn fill(&self, scale: Scale) -> Result<Vec<Step>> {
        let now = bond_datapath::monotonic_ns();
        let mut flows = self.hash::<FlowKey, Flow>(name::S_FLOWS)?;
        let held = scale.nat_held();
        let step = |what: &str, count: u32, f: &mut dyn FnMut(u32) -> Result<()>| {
            let tenth = (count / 10).max(1);
            let mut first = Duration::ZERO;
            let start = Instant::now();
            let mut mark = start;
            for i in 0..count {
                if i == count - tenth {
                    mark = Instant::now();
                }
                f(i)?;
                if i + 1 == tenth {
                    first = start.elapsed();
                }
            }
            Ok::<_, anyhow::Error>(Step::new(
                what,
                count,
                start.elapsed(),
                Some((first, mark.elapsed())),
            ))
        };
        let f = step(
            "fill S_FLOWS through the map API",
            scale.synthetic(),
            &mut |i| {
                let flow = Flow::new(PORT_MIN + (i % held) as u16, now);
                flows
                    .insert(synthetic_key(i, scale.communities), flow, 0)
                    .with_context(|| format!("inserting synthetic flow {i} into S_FLOWS"))
            },
        )?;
        let mut nat = self.hash::<NatKey, NatEntry>(name::S_NAT)?;
        let g = step("fill S_NAT through the map API", held, &mut |i| {
            let k = synthetic_key(i, scale.communities);
            nat.insert(
                NatKey {
                    proto: IPPROTO_UDP,
                    _pad: 0,
                    port: PORT_MIN + i as u16,
                },
                NatEntry {
                    origin: k.origin,
                    community: k.community,
                    port: k.port,
                },
                0,
            )
            .with_context(|| format!("inserting NAT entry {i} into S_NAT"))
        })?;
        Ok(vec![f, g])
    }
}

// ----------------------------------------------------------------- server --

/// One loaded server object with its maps pinned in a directory of its
/// own. Fields drop in order: the object (programs, map fds) first, then
/// the pins, which frees the maps.
struct Server {
    ebpf: Ebpf,
    maps: Maps,
    _pin: PinDir,
}

/// Per-call timings of one pass over a list of frames.
#[derive(Clone, Copy, Debug)]
struct Pass {
    /// Mean of the kernel's timing of each single run, ns.
    kernel_ns: f64,
    /// 99th percentile of the same.
    p99_ns: f64,
    /// Mean wall-clock time of one BPF_PROG_TEST_RUN call, ns.
    wall_ns: f64,
}

/// Drop and event counters, summed over CPUs.
struct Counters {
    drops: BTreeMap<&'static str, u64>,
    events: BTreeMap<&'static str, u64>,
}

impl Counters {
    fn event(&self, name: &str) -> u64 {
        self.events.get(name).copied().unwrap_or(0)
    }
}

impl Server {
    /// Loads the server object with `sizes`, as the agent does, and its
    /// XDP program; returns it and how long the load took.
    fn load(tag: &str, sizes: &[(&str, u32)]) -> Result<(Self, Duration)> {
        let pin = PinDir::new(tag)?;
        let start = Instant::now();
        let mut ebpf = datapath::load_with_sizes(bond_datapath::ebpf::SERVER, pin.path(), sizes)
            .context("loading the server object")?;
        let prog: &mut Xdp = ebpf
            .program_mut("bond_server")
            .context("bond_server is not in the server object")?
            .try_into()
            .context("bond_server is not an XDP program")?;
        prog.load().context("loading bond_server (verifier)")?;
        let took = start.elapsed();
        let maps = Maps::new(pin.path());
        Ok((
            Self {
                ebpf,
                maps,
                _pin: pin,
            },
            took,
        ))
    }

    fn ebpf_xdp(&self) -> Result<&Xdp> {
        self.ebpf
            .program("bond_server")
            .context("bond_server is not in the server object")?
            .try_into()
            .context("bond_server is not an XDP program")
    }

    /// Runs the program once on `frame`: (verdict, in-kernel ns).
    fn run(&self, p: &Xdp, frame: &[u8]) -> Result<(u32, u32)> {
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of bond_server")?;
        Ok((r.return_value, r.duration.as_nanos() as u32))
    }

    /// Runs the program once on `frame`: (verdict, output frame).
    fn run_out(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; 2048];
        let r = self
            .ebpf_xdp()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of bond_server")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Runs every frame once, in order, expecting verdict `want` for each.
    fn pass<'f>(&self, frames: impl ExactSizeIterator<Item = &'f [u8]>, want: u32) -> Result<Pass> {
        let p = self.ebpf_xdp()?;
        let total = frames.len();
        let mut ns = Vec::with_capacity(total);
        let start = Instant::now();
        for (i, f) in frames.enumerate() {
            let (v, t) = self.run(p, f)?;
            if v != want {
                let c = self.counters()?;
                let drops: Vec<_> = c.drops.iter().filter(|d| *d.1 > 0).collect();
                bail!(
                    "frame {i} of {total}: verdict {v}, expected {want} (drops so far: {drops:?}, events: {:?})",
                    c.events
                );
            }
            ns.push(t);
        }
        let wall = start.elapsed();
        let count = total.max(1) as f64;
        ns.sort_unstable();
        Ok(Pass {
            kernel_ns: ns.iter().map(|&t| f64::from(t)).sum::<f64>() / count,
            p99_ns: ns
                .get(ns.len() * 99 / 100)
                .map(|&t| f64::from(t))
                .unwrap_or(0.0),
            wall_ns: wall.as_nanos() as f64 / count,
        })
    }

    fn counters(&self) -> Result<Counters> {
        Ok(Counters {
            drops: self
                .maps
                .server_drops()
                .context("reading S_DROPS")?
                .into_iter()
                .collect(),
            events: self
                .maps
                .server_events()
                .context("reading S_EVENTS")?
                .into_iter()
                .collect(),
        })
    }

    /// Fails unless no packet was dropped, none took the slow path and no
    /// two CPUs raced for a flow: otherwise a figure timed the wrong path.
    fn expect_clean(&self, when: &str) -> Result<()> {
        let c = self.counters()?;
        let drops: Vec<_> = c.drops.iter().filter(|d| *d.1 > 0).collect();
        ensure!(drops.is_empty(), "{when}: drops {drops:?}");
        for e in ["slow_path", "flow_race"] {
            ensure!(
                c.event(e) == 0,
                "{when}: {} packets counted as {e}",
                c.event(e)
            );
        }
        Ok(())
    }

    /// A pinned hash map of this server, opened as the agent opens it.
    fn hash<K: aya::Pod, V: aya::Pod>(&self, map: &str) -> Result<HashMap<MapData, K, V>> {
        let path = self.maps.dir().join(map);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {map}"))?;
        let m = Map::from_map_data(data).with_context(|| format!("opening {map}"))?;
        HashMap::try_from(m).with_context(|| format!("{map} as a hash map"))
    }

    /// Entries of a hash map, by walking its keys.
    fn count<K: aya::Pod, V: aya::Pod>(&self, map: &str) -> Result<u32> {
        let h = self.hash::<K, V>(map)?;
        let mut n = 0u32;
        for k in h.keys() {
            k.with_context(|| format!("walking {map}"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Each map's max_entries and kernel memory (fdinfo `memlock`).
    fn memory(&self) -> Result<MapMemory> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(self.maps.dir())
            .with_context(|| format!("listing {}", self.maps.dir().display()))?
        {
            let path = entry?.path();
            let map_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = MapData::from_pin(&path).with_context(|| format!("opening {map_name}"))?;
            let fd = data.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .with_context(|| format!("reading the fdinfo of {map_name}"))?;
            let field = |key: &str| -> Result<u64> {
                info.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .with_context(|| format!("no {key} line in the fdinfo of {map_name}"))
            };
            let v = (field("max_entries:")?, field("memlock:")?);
            out.insert(map_name, v);
        }
        Ok(out)
    }
}

/// What [`Server::repeat_check`] saw.
struct RepeatCheck {
    /// Upstream packets the flow counted after one call with `repeat`.
    counted: u64,
    /// The verdict of the call's last run.
    last_verdict: u32,
}

/// Each map's (max_entries, memlock bytes), by name.
type MapMemory = BTreeMap<String, (u64, u64)>;

/// The maps' memory at the three points the report compares.
struct Memory {
    /// The server at the agent's default sizes (the baseline).
    default: MapMemory,
    /// At the scale sizes, just created.
    empty: MapMemory,
    /// At the scale sizes with the table full.
    full: MapMemory,
}

/// Map write costs, for the findings.
struct Writes {
    /// Registering every community through `Maps`.
    register: Duration,
    /// One insert through a map handle kept open.
    open_write: Duration,
}

/// A pin directory of our own under the bpffs mount, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Result<Self> {
        let bpffs = Path::new(datapath::DEFAULT_BPFFS);
        datapath::ensure_bpffs(bpffs).context("mounting bpffs")?;
        let p = bpffs.join(format!("bond-bench-scale-{}-{tag}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("scale: removing {}: {e}", self.0.display());
        }
    }
}

// --------------------------------------------------------------- topology --

/// Pins the calling thread to the CPU it runs on and moves it into a new
/// network namespace (loopback up, forwarding on); returns the CPU. The
/// namespace, with every device in it, goes when the thread ends.
fn isolate() -> Result<usize> {
    use nix::sched::{CloneFlags, CpuSet, sched_getcpu, sched_setaffinity, unshare};
    let cpu = sched_getcpu().context("sched_getcpu")?;
    let mut set = CpuSet::new();
    set.set(cpu).context("CPU set")?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("sched_setaffinity")?;
    unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET): are we root?")?;
    ip(&["link", "set", "lo", "up"])?;
    // /proc/sys/net resolves against the opening thread's namespace. The
    // test runs enter on loopback, whose forwarding the FIB lookup checks.
    for knob in [
        "ipv4/ip_forward",
        "ipv4/conf/all/forwarding",
        "ipv4/conf/lo/forwarding",
    ] {
        let path = format!("/proc/sys/net/{knob}");
        std::fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
    }
    Ok(cpu)
}

/// The server's surroundings: a WAN veth (198.51.100.254/24) with a
/// default route via the router, a content veth (203.0.113.1/24), and
/// permanent neighbour entries for the router and the content server.
fn network() -> Result<()> {
    let mac = |m: Mac| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for (dev, m, addr) in [
        ("wan", WAN_DEV_MAC, "198.51.100.254/24"),
        ("cnt", CNT_DEV_MAC, "203.0.113.1/24"),
    ] {
        let peer = format!("{dev}p");
        let m = mac(m);
        ip(&[
            "link", "add", dev, "address", &m, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["addr", "add", addr, "dev", dev])?;
        ip(&["link", "set", dev, "up"])?;
        ip(&["link", "set", &peer, "up"])?;
    }
    for (addr, m, dev) in [(ROUTER, ROUTER_MAC, "wan"), (CONTENT, CONTENT_MAC, "cnt")] {
        let (a, m) = (addr.to_string(), mac(m));
        ip(&[
            "neigh",
            "add",
            &a,
            "lladdr",
            &m,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    ip(&["route", "add", "default", "via", &ROUTER.to_string()])
}

/// Runs `ip ARGS` in the calling thread's namespace.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

// ---------------------------------------------------------- communities --

/// A terminal's LAN address: every community has its own LAN, so the same
/// addresses recur (sessions are keyed by community and origin).
fn origin(t: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 1 + t as u8)
}

fn terminal_of(origin: Ipv4Addr) -> Result<u32> {
    let t = u32::from(origin.octets()[3]).wrapping_sub(1);
    ensure!(t < TERMINALS, "{origin} is no terminal of ours");
    Ok(t)
}

/// A session token of its own for each community and terminal, never zero.
fn token(community: u16, t: u32) -> u64 {
    SplitMix((u64::from(community) << 8) | u64::from(t)).next() | 1
}

/// A community link as registered with the server.
struct Link {
    /// Dense index into `S_LINKS`.
    idx: u32,
    id: u8,
    ip: Ipv4Addr,
    port: u16,
}

impl Link {
    /// Link `j` of community `c` (1-based).
    fn of(c: u16, j: u32) -> Self {
        let idx = (u32::from(c) - 1) * LINKS + j;
        Self {
            idx,
            id: j as u8,
            ip: Ipv4Addr::from(LINK_NET + idx),
            port: LINK_PORT + j as u16,
        }
    }
}

/// Flow `i` of `n` communities, source ports counted from `base`: flows
/// go round the communities, then the terminals, then the ports.
fn flow_key(i: u32, n: u16, base: u16) -> FlowKey {
    let n = u32::from(n);
    let r = i / n;
    FlowKey {
        community: (1 + i % n) as u16,
        proto: IPPROTO_UDP,
        _pad: 0,
        origin: origin(r % TERMINALS).into(),
        port: base + (r / TERMINALS) as u16,
        _pad2: 0,
    }
}

/// The `i`th flow written through the map API.
fn synthetic_key(i: u32, n: u16) -> FlowKey {
    flow_key(i, n, SYNTHETIC_SPORT)
}

/// The `k`th flow the program creates.
fn measured_key(k: u32, n: u16) -> FlowKey {
    flow_key(k, n, MEASURED_SPORT)
}

/// A DATA_UP frame of flow `key` over link `j` of its community, with the
/// origin's token.
fn up_frame(key: &FlowKey, j: u8) -> Vec<u8> {
    let origin = Ipv4Addr::from(key.origin);
    let link = Link::of(key.community, u32::from(j));
    let t = terminal_of(origin).expect("flow keys name our terminals");
    let inner = Ip::new(origin, CONTENT, L4::udp(key.port, DPORT));
    wrapped(
        &Outer {
            dst_mac: WAN_DEV_MAC,
            src_mac: ROUTER_MAC,
            src: link.ip,
            dst: WAN_IP,
            sport: link.port,
            dport: PORT,
            ttl: 50,
            id: 0x0abc,
            more_fragments: false,
        },
        &Bond::data(
            DATA_UP,
            key.community,
            link.id,
            origin,
            1,
            token(key.community, t),
        ),
        &inner.bytes(),
    )
}

/// The content server's answer to the flow on dedicated port `nat_port`.
fn reply_ip(nat_port: u16) -> Ip {
    Ip {
        id: 0x4321,
        payload: b"reply from the content server".to_vec(),
        ..Ip::new(CONTENT, NAT_IP, L4::udp(DPORT, nat_port))
    }
}

fn reply_frame(nat_port: u16) -> Vec<u8> {
    reply_ip(nat_port).frame(CNT_DEV_MAC, CONTENT_MAC)
}

/// splitmix64: deterministic, well-spread numbers without a crate.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The pass with the median kernel time.
fn median(mut passes: Vec<Pass>) -> Pass {
    passes.sort_by(|a, b| a.kernel_ns.total_cmp(&b.kernel_ns));
    passes[passes.len() / 2]
}

// ----------------------------------------------------------------- report --

/// One timed set-up step.
struct Step {
    what: String,
    count: u32,
    took: Duration,
    /// Times of the first and the last tenth of the items.
    tenths: Option<(Duration, Duration)>,
}

impl Step {
    fn new(what: &str, count: u32, took: Duration, tenths: Option<(Duration, Duration)>) -> Self {
        Self {
            what: what.into(),
            count,
            took,
            tenths,
        }
    }
}

/// A count with thousands separators.
fn n(v: u32) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

/// ns per packet and the packet rate it makes.
fn rate(ns: f64) -> String {
    format!("{ns:.0} ns ({:.2} Mpps)", 1e3 / ns)
}

fn report_setup(md: &mut String, scale: Scale, steps: &[Step]) {
    let _ = writeln!(
        md,
        "Server with {} communities ({} sessions, {} links) and {} flows; dedicated ports {PORT_MIN}-{PORT_MAX} ({}) on one NAT address. One CPU; BPF_PROG_TEST_RUN, one packet per call, in a network namespace with the FIB and neighbours a server has, so packets take the forwarding path (XDP_REDIRECT).\n",
        n(u32::from(scale.communities)),
        n(u32::from(scale.communities) * TERMINALS),
        n(u32::from(scale.communities) * LINKS),
        n(scale.flows),
        n(PORTS),
    );
    let _ = writeln!(md, "### Set-up\n");
    let _ = writeln!(
        md,
        "| step | items | time | per item | last tenth / first tenth |\n|---|---:|---:|---:|---:|"
    );
    for s in steps {
        let per = s.took.as_secs_f64() * 1e9 / f64::from(s.count.max(1));
        let per = if per >= 1e6 {
            format!("{:.1} ms", per / 1e6)
        } else {
            format!("{:.1} us", per / 1e3)
        };
        let tenths = s.tenths.map_or("".into(), |(a, b)| {
            format!("{:.2}", b.as_secs_f64() / a.as_secs_f64().max(1e-9))
        });
        let _ = writeln!(
            md,
            "| {} | {} | {} | {per} | {tenths} |",
            s.what,
            n(s.count),
            dur(s.took)
        );
    }
    md.push('\n');
}

fn report_memory(md: &mut String, scale: Scale, mem: &Memory) {
    let Memory {
        default,
        empty,
        full,
    } = mem;
    let _ = writeln!(
        md,
        "### Memory (kernel `memlock` of each map)\n\nBaseline: the server as the agent loads it by default ({} dedicated ports, so {} flow slots).\n",
        n(DEFAULT_PORTS),
        n(DEFAULT_PORTS)
    );
    let _ = writeln!(
        md,
        "| map | entries (default / scale) | default | scale, empty | scale, full | full / default | full / empty |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut tot = (0u64, 0u64, 0u64);
    for (map, &(max, e)) in empty {
        let (dmax, d) = default.get(map).copied().unwrap_or((0, 0));
        let f = full.get(map).map_or(0, |v| v.1);
        tot = (tot.0 + d, tot.1 + e, tot.2 + f);
        let _ = writeln!(
            md,
            "| {map} | {} / {} | {} | {} | {} | {:.1} | {:.2} |",
            n(dmax as u32),
            n(max as u32),
            mib(d),
            mib(e),
            mib(f),
            f as f64 / d.max(1) as f64,
            f as f64 / e.max(1) as f64
        );
    }
    let _ = writeln!(
        md,
        "| **total** | | {} | {} | {} | {:.1} | {:.2} |\n",
        mib(tot.0),
        mib(tot.1),
        mib(tot.2),
        tot.2 as f64 / tot.0.max(1) as f64,
        tot.2 as f64 / tot.1.max(1) as f64
    );
    let per = |map: &str| full.get(map).map_or(0.0, |&(max, m)| m as f64 / max as f64);
    let _ = writeln!(
        md,
        "Per flow slot: {:.0} B in S_FLOWS, {:.0} B in S_NAT; all {} slots together {:.0} B per flow.\n",
        per(name::S_FLOWS),
        per(name::S_NAT),
        n(scale.flows),
        (full.get(name::S_FLOWS).map_or(0, |v| v.1) + full.get(name::S_NAT).map_or(0, |v| v.1))
            as f64
            / f64::from(scale.flows)
    );
}

fn report_flow_setup(md: &mut String, scale: Scale, empty: &Phase, full: &Phase) {
    let k = n(scale.probe);
    let _ = writeln!(
        md,
        "### Flow set-up\n\n{k} DATA_UP packets, each the first of a new UDP flow (valid token, registered link, new source port: a port from the queue, an S_FLOWS and an S_NAT insert), against the baseline of the same {k} packets again (existing flows). Kernel time per packet, median of {} rounds alternating between the two tables; flows/s on one CPU.\n",
        scale.rounds
    );
    let _ = writeln!(
        md,
        "| table | new flow | p99 | new flows/s | existing flow (baseline) | new / existing |\n|---|---:|---:|---:|---:|---:|"
    );
    let row = |md: &mut String, what: &str, p: &Phase| {
        let _ = writeln!(
            md,
            "| {what} | {:.0} ns | {:.0} ns | {:.2} M | {:.0} ns | {:.2} |",
            p.new.kernel_ns,
            p.new.p99_ns,
            1e3 / p.new.kernel_ns,
            p.hit.kernel_ns,
            p.new.kernel_ns / p.hit.kernel_ns
        );
    };
    row(md, &format!("empty: 0 to {k} flows"), empty);
    row(
        md,
        &format!(
            "nearly full: {} to {} flows",
            n(scale.synthetic()),
            n(scale.flows)
        ),
        full,
    );
    let _ = writeln!(
        md,
        "| **full / empty** | {:.2} | {:.2} | {:.2} | {:.2} | |\n",
        full.new.kernel_ns / empty.new.kernel_ns,
        full.new.p99_ns / empty.new.p99_ns,
        empty.new.kernel_ns / full.new.kernel_ns,
        full.hit.kernel_ns / empty.hit.kernel_ns
    );
    let _ = writeln!(
        md,
        "Through the syscall (wall clock per BPF_PROG_TEST_RUN call): new flows {:.0} ns ({:.2} M/s) at the empty table, {:.0} ns at the nearly full one.\n",
        empty.new.wall_ns,
        1e3 / empty.new.wall_ns,
        full.new.wall_ns
    );
}

fn report_packet_rate(md: &mut String, scale: Scale, empty: &Phase, full: &Phase) {
    let k = n(scale.probe);
    let _ = writeln!(
        md,
        "### Packet rate with a full table\n\nKernel time per packet of established flows (forwarded, XDP_REDIRECT), the table empty but for {k} flows (baseline) vs full ({} flows). \"{k} flows\" runs each once in turn; at the full table they are drawn at random from the {} written through the map API (replies: from the {} that hold a port), so their entries are cold in the CPU caches. Median of {} passes alternating between the two tables.\n",
        n(scale.flows),
        n(scale.synthetic()),
        n(scale.nat_held()),
        scale.rounds
    );
    let _ = writeln!(
        md,
        "| packets | empty table | full table | full / empty |\n|---|---:|---:|---:|"
    );
    for (what, e, f) in [
        ("upstream, one flow", empty.hot_up, full.hot_up),
        (
            &*format!("upstream, {k} flows"),
            empty.spread_up,
            full.spread_up,
        ),
        ("downstream, one flow", empty.hot_down, full.hot_down),
        (
            &*format!("downstream, {k} flows"),
            empty.spread_down,
            full.spread_down,
        ),
        (
            "floor: a non-IP frame, passed at the first check",
            empty.floor,
            full.floor,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {:.2} |",
            rate(e.kernel_ns),
            rate(f.kernel_ns),
            f.kernel_ns / e.kernel_ns
        );
    }
    let _ = writeln!(
        md,
        "\nThe floor is what the harness itself adds to each figure (the kernel times a whole run, not only the program). Wall clock per BPF_PROG_TEST_RUN call, with the syscall and the copies: {:.0} / {:.0} ns for the floor frame (empty / full table server), {:.0} / {:.0} ns for an upstream packet of one flow; so about {:.0} ns per call is the syscall, not the program. Wall-clock figures swing with the load of the machine (others' jobs share its CPUs); the kernel's timing of the run much less, but the cache-bound rows (K flows) still move with what else runs: in this run the rounds of a figure differed by up to {:.0}% (empty table) and {:.0}% (full table) of its median.\n",
        empty.floor.wall_ns,
        full.floor.wall_ns,
        empty.hot_up.wall_ns,
        full.hot_up.wall_ns,
        (empty.floor.wall_ns - empty.floor.kernel_ns)
            .min(full.floor.wall_ns - full.floor.kernel_ns),
        100.0 * empty.noise,
        100.0 * full.noise
    );
}

fn report_findings(
    md: &mut String,
    scale: Scale,
    memory: &Memory,
    repeat: &RepeatCheck,
    writes: &Writes,
) -> Result<()> {
    let Memory {
        default: default_mem,
        empty: empty_mem,
        full: full_mem,
    } = memory;
    let cpus = possible_cpus()?;
    let mem = |map: &str| full_mem.get(map).map_or(0, |v| v.1);
    let _ = writeln!(md, "### Findings\n");
    let _ = writeln!(
        md,
        "- **{} live flows cannot exist on one NAT address.** The reverse map is keyed by protocol and dedicated port only (`NatKey`), and every new flow of any protocol takes a port from one queue, so a server holds at most as many flows as it has dedicated ports: {} here ({PORT_MIN}-{PORT_MAX}), 65,535 at most. Of the {} flows above, {} were made by the program and {} hold ports of their own (S_NAT entries); the other {} were written through the map API to give the lookup structure its full size, with ports shared between them, a state the datapath cannot reach. {} flows need at least {} NAT addresses, or a NAT keyed by the remote address and port as well (endpoint-dependent mapping).",
        n(scale.flows),
        n(PORTS),
        n(scale.flows),
        n(scale.probe),
        n(scale.nat_held()),
        n(scale.synthetic() - scale.nat_held()),
        n(scale.flows),
        scale.flows.div_ceil(PORTS)
    );
    let max = bond_common::maps::MAX_FLOWS;
    if scale.flows > max {
        let _ = writeln!(
            md,
            "- **The agent cannot be configured for this table.** `[flows] max` is refused above `MAX_FLOWS` = {}; the {} slots here were set at load time, through the same call the agent makes.",
            n(max),
            n(scale.flows)
        );
    } else {
        let _ = writeln!(
            md,
            "- **The agent can be configured for this table** (`[flows] max` = {}, within `MAX_FLOWS` = {}); the full-size run (1,000,000) is beyond it.",
            n(scale.flows),
            n(max)
        );
    }
    let _ = writeln!(
        md,
        "- **S_NAT is sized like S_FLOWS** but can never hold more entries than there are dedicated ports: about {} of its {} here can never be used.",
        mib(mem(name::S_NAT).saturating_sub(
            (mem(name::S_NAT) as f64 * f64::from(PORTS) / f64::from(scale.flows)) as u64
        )),
        mib(mem(name::S_NAT))
    );
    let flows_empty = empty_mem.get(name::S_FLOWS).map_or(0, |v| v.1);
    if flows_empty == mem(name::S_FLOWS) {
        let _ = writeln!(
            md,
            "- **Memory is taken when the maps are created**, not as flows arrive: the hash maps are preallocated (no `BPF_F_NO_PREALLOC`), so the full table costs what the empty one does (table above), and loading the object with a big table takes its time creating them (set-up table)."
        );
    } else {
        let _ = writeln!(
            md,
            "- **S_FLOWS grew from {} empty to {} full**: its memory follows the flows.",
            mib(flows_empty),
            mib(mem(name::S_FLOWS))
        );
    }
    let default_total: u64 = default_mem.values().map(|v| v.1).sum();
    let sched = default_mem.get(name::S_PATHS).map_or(0, |v| v.1);
    let _ = writeln!(
        md,
        "- **{} before the first flow**: the server at its default size takes that much, {} of it S_PATHS (65,536 downstream path sets of {} B, one for every possible community, preallocated).",
        mib(default_total),
        mib(sched),
        std::mem::size_of::<bond_common::edpf::Paths>()
    );
    let _ = writeln!(
        md,
        "- **Per-CPU maps grow with the CPU count**: S_LINK_STATS is {} on these {cpus} CPUs ({} links x 64 B per CPU), {} on a 64-CPU server.",
        mib(mem(name::S_LINK_STATS)),
        n(bond_common::maps::MAX_SERVER_LINKS),
        mib(mem(name::S_LINK_STATS) / cpus * 64)
    );
    let _ = writeln!(
        md,
        "- **Communities, sessions and links fit**: `MAX_COMMUNITIES`, `MAX_SESSIONS` and `MAX_SERVER_LINKS` are 65,536 (compiled in; the agent does not size them at load), so {} communities of 3 terminals and 3 links use {:.0}% of each session and link table. The ceiling is 65,536 links in all (a link index is a `u16` in a schedule slot): 6.5 per community at 10,000 communities.",
        n(u32::from(scale.communities)),
        100.0 * f64::from(u32::from(scale.communities) * LINKS) / 65_536.0
    );
    // Per community: 3 sessions, 3 links (entry and index), 1 schedule.
    let count = u32::from(scale.communities) * (TERMINALS + 2 * LINKS + 1);
    let per_write = writes.register / count;
    let _ = writeln!(
        md,
        "- **Registering every community at once takes {}** through `Maps`: {:.1} us per map write, {:.1}x an insert through a map handle kept open ({:.1} us, the S_FLOWS fill), as each call opens the pinned map again for its one update (a stat, BPF_OBJ_GET, an info query and a close around the update syscall). Harmless while logins trickle in; a server restart that re-registers {} communities in one go waits that long.",
        dur(writes.register),
        per_write.as_secs_f64() * 1e6,
        per_write.as_secs_f64() / writes.open_write.as_secs_f64().max(1e-9),
        writes.open_write.as_secs_f64() * 1e6,
        n(u32::from(scale.communities))
    );
    let works = repeat.counted == u64::from(REPEAT_CHECK);
    let _ = writeln!(
        md,
        "- **BPF_PROG_TEST_RUN's `repeat` {} for this program**: one call with repeat = {} on an upstream frame of a new flow counted {} packet(s) on the flow, last verdict {}. {}",
        if works { "works" } else { "does not work" },
        n(REPEAT_CHECK),
        repeat.counted,
        repeat.last_verdict,
        if works {
            "Every run saw the original frame."
        } else {
            "The kernel reruns the program on the frame the previous run rewrote (unwrapped, so no longer bond traffic) and passes it: a repeat figure would time the fall-through path. Every figure here is one call per packet."
        }
    );
    Ok(())
}

/// The number of possible CPUs, which per-CPU maps are sized by.
fn possible_cpus() -> Result<u64> {
    let path = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // A list of ranges: "0-1", "0", "0-3,8-11".
    text.trim()
        .split(',')
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
            Ok(b - a + 1)
        })
        .sum::<Result<u64, std::num::ParseIntError>>()
        .with_context(|| format!("parsing {path}: {text:?}"))
}
