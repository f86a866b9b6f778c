//! The markdown report: every path's rate and cost, its ratio to each
//! baseline in the same direction, and the target, met or not.

use std::fmt::Write as _;

use super::{
    CHECK_FRAMES, PACE_SHARE, Plan, RELAY_RCVBUF, TARGET, TEMPLATE_MAX,
    bench::Row,
    cpu::irq_time_accounted,
    paths::{Forwarder, Kind},
};

pub(super) fn report(rows: &[Row], missing: &[(Kind, String)], plan: &Plan) -> String {
    let per_core = |r: &Row| 1e3 / r.sample.ns_per_packet();
    // A forwarder's row for `size` that compares with `r`: the same
    // direction, or either where one of them has none.
    let base = |fwd: Forwarder, r: &Row| {
        rows.iter().find(|b| {
            b.kind.fwd == fwd
                && b.size == r.size
                && (b.kind.dir.is_none() || r.kind.dir.is_none() || b.kind.dir == r.kind.dir)
        })
    };
    let floor_ns = |r: &Row| base(Forwarder::Floor, r).map(|f| f.sample.ns_per_packet());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "One path at a time between three namespaces (gen -> dut -> sink) on unlimited veth \
         links; median of {} round(s) of one {} s run per path. \"User packet\" is the \
         user's IPv4/UDP packet: the plain packet for the baselines, the packet inside bond's \
         {}-byte wrap for bond. Up is from the LAN towards the Internet (a new flow, \
         masqueraded), down the replies back; every ratio is against the baseline in the \
         same direction.",
        plan.runs,
        plan.secs,
        bond_common::wire::OUTER_LEN
    );
    out.push('\n');
    let _ = writeln!(
        out,
        "| path | user packet | delivered Mpps | lost | CPU ns/packet | ns above floor | \
         Mpps per core | vs kernel fwd+NAT | vs nft flowtable | vs UDP relay | \
         vs UDP relay (mmsg) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let s = &r.sample;
        let ns = s.ns_per_packet();
        let floor = r.kind.fwd == Forwarder::Floor;
        let above = match floor_ns(r) {
            Some(f) if !floor => format!("{:.0}", ns - f),
            _ => "-".to_string(),
        };
        let ratio = |fwd: Forwarder| match base(fwd, r) {
            Some(b) if !floor && r.kind.fwd != fwd => {
                format!("{:.2}x", per_core(r) / per_core(b))
            }
            _ => "-".to_string(),
        };
        let lost = 1.0 - s.delivered as f64 / s.sent as f64;
        let _ = writeln!(
            out,
            "| {}{} | {} B | {:.3} | {:.1}% | {:.0} | {} | {:.3} | {} | {} | {} | {} |",
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
            ratio(Forwarder::Kernel),
            ratio(Forwarder::Flowtable),
            ratio(Forwarder::UdpRelay),
            ratio(Forwarder::UdpRelayMmsg),
        );
    }
    out.push('\n');
    for (kind, why) in missing {
        let _ = writeln!(out, "- {}: **not measured**: {why}.", kind.name());
    }
    // The target, per core as measured, and on the paths' own cost; and
    // the kernel's own fast path, where there is one.
    for r in rows.iter().filter(|r| {
        matches!(
            r.kind.fwd,
            Forwarder::BondRelay | Forwarder::BondServer | Forwarder::BondDirector
        )
    }) {
        let Some(k) = base(Forwarder::Kernel, r) else {
            continue;
        };
        let ratio = per_core(r) / per_core(k);
        let own =
            floor_ns(r).map(|f| (k.sample.ns_per_packet() - f) / (r.sample.ns_per_packet() - f));
        let mut flowtable = base(Forwarder::Flowtable, r)
            .map(|f| format!("; {:.2}x the nft flowtable's", per_core(r) / per_core(f)))
            .unwrap_or_default();
        // The director in front of the nodes: how much cheaper steering
        // is than the node's own work on the same packet.
        if r.kind.fwd == Forwarder::BondDirector
            && let Some(n) = base(Forwarder::BondServer, r)
        {
            let _ = write!(
                flowtable,
                "; {:.2}x the node program's (bond server, up)",
                per_core(r) / per_core(n)
            );
        }
        let _ = writeln!(
            out,
            "- {}, {} B: {ratio:.2}x the kernel's forwarding + NAT rate per core: \
             target of {TARGET}x {}{}{flowtable}.",
            r.kind.name(),
            r.size,
            if ratio >= TARGET {
                "met"
            } else {
                "**not met**"
            },
            own.map(|a| format!(" (cost above the floor alone: {a:.1}x less than the kernel's)"))
                .unwrap_or_default()
        );
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
         drops. The down paths' flows were opened first: the kernel's by one datagram from \
         the LAN host through dut (its conntrack entry), the server's by one up packet run \
         through its program (its flow and NAT port). Before and after each measurement \
         {CHECK_FRAMES} frames went through each path and all arrived, the last one byte for \
         byte as expected (the relays': UDP endpoints and payload; the server's send time and \
         link number: fresh); bond's drop counters and the server's slow-path count stayed at \
         zero, and the flowtable carried its flows (the forward chain counted no more than a \
         new flow's first packets).",
        plan.cpus.generator,
        plan.cpus.relay,
        RELAY_RCVBUF >> 20,
        PACE_SHARE * 100.0,
    );
    out
}
