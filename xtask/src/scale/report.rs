//! The markdown report: set-up, memory, flow set-up and packet rate, each
//! beside its baseline, then the findings.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};
use bond_common::maps::name;

use super::server::{Memory, Phase, RepeatCheck, Writes};
use super::{DEFAULT_PORTS, LINKS, PORT_MAX, PORT_MIN, PORTS, REPEAT_CHECK, Scale, TERMINALS};

/// One timed set-up step.
pub(super) struct Step {
    pub(super) what: String,
    pub(super) count: u32,
    pub(super) took: Duration,
    /// Times of the first and the last tenth of the items.
    pub(super) tenths: Option<(Duration, Duration)>,
}

impl Step {
    pub(super) fn new(
        what: &str,
        count: u32,
        took: Duration,
        tenths: Option<(Duration, Duration)>,
    ) -> Self {
        Self {
            what: what.into(),
            count,
            took,
            tenths,
        }
    }
}

/// A count with thousands separators.
pub(super) fn n(v: u32) -> String {
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

pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(super) fn dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

/// ns per packet and the packet rate it makes.
pub(super) fn rate(ns: f64) -> String {
    format!("{ns:.0} ns ({:.2} Mpps)", 1e3 / ns)
}

pub(super) fn report_setup(md: &mut String, scale: Scale, steps: &[Step]) {
    let _ = writeln!(
        md,
        "Server with {} communities ({} sessions, {} links) and {} flows; dedicated ports {PORT_MIN}-{PORT_MAX} ({}) on one NAT address. One CPU; BPF_PROG_TEST_RUN, one packet per call, in a network namespace with the FIB and neighbours a server has, so packets take the forwarding path (XDP_REDIRECT).\n",
        n(scale.communities),
        n(scale.communities * TERMINALS),
        n(scale.communities * LINKS),
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

pub(super) fn report_memory(md: &mut String, scale: Scale, mem: &Memory) {
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

pub(super) fn report_flow_setup(md: &mut String, scale: Scale, empty: &Phase, full: &Phase) {
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

pub(super) fn report_packet_rate(md: &mut String, scale: Scale, empty: &Phase, full: &Phase) {
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

pub(super) fn report_findings(
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
        "- **{} live flows need more than this bench's one NAT address.** A flow holds a port of one protocol on one address of the pool (`NatKey`: protocol, address index, port), so one address holds {} flows per protocol here ({PORT_MIN}-{PORT_MAX}). Of the {} flows above, {} were made by the program and {} hold ports of their own (S_NAT entries); the other {} were written through the map API to give the lookup structure its full size, with ports shared between them, a state the datapath reaches only with more addresses: {} flows of one protocol need a pool of at least {} (`nat_addresses`; `tests/prog` makes 66,000 flows over two).",
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
        n(scale.communities),
        100.0 * f64::from(scale.communities * LINKS) / 65_536.0
    );
    // Per community: 3 sessions, 3 links (entry and index), 1 schedule.
    let count = scale.communities * (TERMINALS + 2 * LINKS + 1);
    let per_write = writes.register / count;
    let _ = writeln!(
        md,
        "- **Registering every community at once takes {}** through `Maps`: {:.1} us per map write, {:.1}x an insert through a map handle kept open ({:.1} us, the S_FLOWS fill), as each call opens the pinned map again for its one update (a stat, BPF_OBJ_GET, an info query and a close around the update syscall). Harmless while logins trickle in; a server restart that re-registers {} communities in one go waits that long.",
        dur(writes.register),
        per_write.as_secs_f64() * 1e6,
        per_write.as_secs_f64() / writes.open_write.as_secs_f64().max(1e-9),
        writes.open_write.as_secs_f64() * 1e6,
        n(scale.communities)
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
pub(super) fn possible_cpus() -> Result<u64> {
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
