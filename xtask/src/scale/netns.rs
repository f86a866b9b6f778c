//! The thread's own CPU and network namespace, with what the server's
//! FIB lookups need.

use std::process::Command;

use anyhow::{Context as _, Result, ensure};

use crate::packets::Mac;

use super::{CNT_DEV_MAC, CONTENT, CONTENT_MAC, ROUTER, ROUTER_MAC, WAN_DEV_MAC};

/// Pins the calling thread to the CPU it runs on and moves it into a new
/// network namespace (loopback up, forwarding on); returns the CPU. The
/// namespace, with every device in it, goes when the thread ends.
pub(super) fn isolate() -> Result<usize> {
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
pub(super) fn network() -> Result<()> {
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
pub(super) fn ip(args: &[&str]) -> Result<()> {
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
