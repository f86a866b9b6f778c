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

mod community;
mod measure;
mod netns;
mod report;
mod rounds;
mod server;

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, anyhow, ensure};

use crate::packets::Mac;
use measure::measure;
use netns::{isolate, network};

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
    communities: u32,
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
        let n = self.communities;
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
