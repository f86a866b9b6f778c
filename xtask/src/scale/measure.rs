//! The measurement: the table states, the interleaved rounds on the two
//! servers, and what each pass measured.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use bond_common::maps::{
    Flow, FlowKey, LINK_VALID, MAX_SESSIONS, NatEntry, NatKey, ServerConfig, ServerLink, name,
};
use bond_datapath::Maps;

use super::community::{Link, measured_key, median, origin, token, up_frame};
use super::report::{
    Step, n, report_findings, report_flow_setup, report_memory, report_packet_rate, report_setup,
};
use super::server::{Memory, Pass, Phase, Server, Writes};
use super::{
    DEFAULT_PORTS, LINK_KBIT, LINKS, NAT_IP, PORT, PORT_MAX, PORT_MIN, Scale, TERMINALS, WAN_IP,
};

/// The frames of one server's packet-rate passes.
pub(super) struct Workload {
    pub(super) hot_up: Vec<u8>,
    pub(super) hot_down: Vec<u8>,
    pub(super) spread_up: Vec<Vec<u8>>,
    pub(super) spread_down: Vec<Vec<u8>>,
}

/// Every pass one server ran, round by round.
#[derive(Default)]
pub(super) struct Passes {
    pub(super) new: Vec<Pass>,
    pub(super) hit: Vec<Pass>,
    pub(super) hot_up: Vec<Pass>,
    pub(super) hot_down: Vec<Pass>,
    pub(super) spread_up: Vec<Pass>,
    pub(super) spread_down: Vec<Pass>,
    pub(super) floor: Vec<Pass>,
}

impl Passes {
    pub(super) fn phase(self) -> Phase {
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
pub(super) fn measure(scale: Scale) -> Result<String> {
    let mut setup = Vec::new();

    // Baseline for memory: the server as the agent loads it by default.
    let (default_mem, default_load) = {
        let sizes = bond_datapath::flows::server_map_sizes(DEFAULT_PORTS, MAX_SESSIONS, false);
        let (s, t) = Server::load("default", &sizes)?;
        (s.memory()?, t)
    };
    setup.push(Step::new(
        "load the object, default sizes (maps created)",
        1,
        default_load,
        None,
    ));

    let sizes = bond_datapath::flows::server_map_sizes(scale.flows, MAX_SESSIONS, false);
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
        scale.communities,
        took,
        Some((first, last)),
    ));
    register(&full.maps, scale.communities)?;
    // The program's K flows take the top K ports, each community its own
    // (blocks of one port); the synthetic flows that hold ports take them
    // from the bottom.
    for s in [&base, &full] {
        share_top_ports(&s.maps, scale)?;
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

/// Gives each community the ports its measured flows (the `k`th flow the
/// program makes takes port `PORT_MAX - k`) are to take, as blocks of one.
fn share_top_ports(maps: &Maps, scale: Scale) -> Result<()> {
    use bond_common::maps::{MAX_NAT_BLOCKS, NatBlocks};
    let mut shares: std::collections::BTreeMap<u32, NatBlocks> = Default::default();
    for k in 0..scale.probe {
        let c = super::community::measured_key(k, scale.communities).community;
        let s = shares.entry(c).or_insert(NatBlocks {
            index: 0,
            count: 0,
            next: 0,
            first: [0; MAX_NAT_BLOCKS],
        });
        let slot = s
            .first
            .get_mut(usize::from(s.count))
            .with_context(|| format!("community {c}: more than {MAX_NAT_BLOCKS} measured flows"))?;
        *slot = PORT_MAX - k as u16;
        s.count += 1;
    }
    for (c, s) in shares {
        maps.set_nat_blocks(c, &s)
            .with_context(|| format!("community {c}: NAT blocks"))?;
    }
    Ok(())
}

/// Registers `n` communities as the agent does at login and announce:
/// sessions, links (entry and index) and a downstream schedule over the
/// links. Returns the total time and the times of the first and the last
/// tenth.
pub(super) fn register(maps: &Maps, n: u32) -> Result<(Duration, Duration, Duration)> {
    maps.set_server_config(ServerConfig {
        wan_ip: WAN_IP.into(),
        nat_ip: NAT_IP.into(),
        port: PORT,
        port_min: PORT_MIN,
        port_max: PORT_MAX,
        link_mtu: 1500,
        per_origin: 0,
        nat_ip6: [0; 16],
        wan_ip6: [0; 16],
        nat_count: 1,
        nat_block: 1,
        // Each community's measured flows fill its share exactly, which
        // random tries would miss now and then (a share is kept at most
        // half full in use: `bond_agent`'s blocks).
        nat_order: bond_common::maps::NAT_SEQUENTIAL,
        _pad: 0,
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
