//! `cargo xtask bench fastpath`: packets per second per core through bond's
//! XDP fast path (a relay terminal, and the server, each in both
//! directions), next to the kernel's own IPv4 forwarding with nftables
//! masquerade, the kernel's nftables flowtable (its own fast path, where the
//! kernel has one) and a userspace UDP relay, at 64-byte and 1400-byte
//! packets, on unlimited veth links.
//!
//! # Method
//!
//! Every path gets three network namespaces of its own, `gen` -- `dut` --
//! `sink`, joined by veth pairs, with static neighbours and IPv6 off, so
//! nothing but the test frames crosses them (netns.rs). `gen` is where
//! packets come from: the LAN side for "up", the Internet side (the content
//! server, or the server for a relay) for "down"; `sink` is the other side.
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
//! - **State**: a down path needs the flow its replies belong to. The
//!   kernel's gets its conntrack entry from one datagram the sink sends
//!   through dut first, as a LAN host would; bond's server gets its flow and
//!   NAT port from one up packet run through its program (paths.rs).
//! - **Check**: before and after a path is measured, 1024 frames go through
//!   it in one test run, with `bench_capture` on the sink, which keeps a copy
//!   of the last frame; all must arrive and the copy must be the expected
//!   output, byte for byte (field by field for the userspace relays, whose IP
//!   ids are the kernel's; the server's send time and link sequence must be
//!   fresh). 1024 frames reuse each page of the run's pool many times, so
//!   this checks the template too. bond's drop counters must stay at zero,
//!   the server must not take its slow path, and the flowtable must carry
//!   the flow (its packets must not reach the forward chain).
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
//!   (into an 8 MiB receive buffer). They are the same either way, so they
//!   are measured once.
//!
//! Packet sizes are the size of the user's IPv4 packet (UDP): the plain
//! packet for the baselines, the inner packet inside bond's 56-byte wrap
//! (outer IPv4, UDP, bond header) for bond. All paths are set up at once
//! and measured in rounds, one run of 2 s (0.5 s with `--quick`) per path
//! per round, so that a slow spell of the shared machine falls on all of
//! them alike; the median of 3 rounds (1) is reported.

mod bench;
mod cpu;
pub(crate) mod netns;
mod paths;
mod relay;
mod report;

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, ensure};

use crate::packets::Mac;
use bench::Bench;
use cpu::Cpus;
use paths::Kind;

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

// Addresses: a LAN host (PEER) behind the dut's LAN address, a community
// link's public address (LINK), the server's, the NAT address (OUT) and a
// content server behind it. Which of them sit at gen and at sink depends on
// the path and its direction (paths.rs).
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
const COMMUNITY: u32 = 7;
const LINK_ID: u8 = 3;
const DATA_PORT: u16 = 7100;
const RELAY_PORT: u16 = 7001;
const SERVER_PORT: u16 = 7000;
const RELAY_TOKEN: u64 = 0x0123_4567_89ab_cdef;
const ORIGIN_TOKEN: u64 = 0x5eed_0000_0000_0002;
const NAT_PORTS: std::ops::RangeInclusive<u16> = 20000..=20009;

/// The paths `bench tier` measures: the floor, the kernel's forwarding,
/// the node's own program and the director.
const TIER_KINDS: [Kind; 4] = [Kind::ALL[0], Kind::ALL[1], Kind::ALL[9], Kind::ALL[11]];

/// Runs the suite; prints progress to stderr, returns the markdown report.
pub fn run(quick: bool) -> Result<String> {
    run_only(quick, &Kind::ALL)
}

/// As [`run`], for the paths `bench tier` compares the director with.
pub fn run_tier(quick: bool) -> Result<String> {
    run_only(quick, &TIER_KINDS)
}

fn run_only(quick: bool, kinds: &[Kind]) -> Result<String> {
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
    let mut missing = Vec::new();
    for &kind in kinds {
        if let Some(why) = kind.fwd.unavailable() {
            eprintln!("fastpath: not measuring {}: {why}", kind.name());
            missing.push((kind, why));
            continue;
        }
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
                    "  {size:>4} B round {round}, {:<13}: sent {:>8} delivered {:>8} ({:.3} Mpps), \
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
    Ok(report::report(&rows, &missing, &plan))
}

/// How long and where to run.
struct Plan {
    secs: f64,
    runs: usize,
    cpus: Cpus,
}

/// Whether the running kernel was built with `option` (`=y` or `=m`), by
/// its /proc/config.gz; `None` if it does not say.
fn kernel_option(option: &str) -> Option<bool> {
    let out = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().any(|l| {
        l.strip_prefix(option)
            .is_some_and(|v| v == "=y" || v == "=m")
    }))
}
