//! The namespaces a path is measured in, and the commands and threads that
//! work inside them.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use bond_datapath as datapath;
use nix::{
    net::if_::if_nametoindex,
    sched::{CloneFlags, setns},
};

use super::{DUT_IN, DUT_OUT, GEN_DEV, GEN_MAC, IN_MAC, OUT_MAC, SINK_DEV, SINK_MAC};
use crate::packets::Mac;

/// Three namespaces, `gen` -- `dut` -- `sink`, deleted on drop (with them
/// their veths and whatever is attached to those).
pub(super) struct Topology {
    pub load: String,
    pub dut: String,
    pub sink: String,
}

impl Topology {
    pub fn new(tag: &str) -> Result<Self> {
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

/// Runs a command; its stdout, or its stderr in the error if it fails.
pub(super) fn cmd(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut c = Command::new(program);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS`.
pub(super) fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    cmd("ip", &a, None).map(drop)
}

/// `ip netns exec NS PROGRAM ARGS`.
pub(super) fn ns_exec(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["netns", "exec", ns, program];
    a.extend_from_slice(args);
    cmd("ip", &a, None)
}

pub(super) fn mac_str(m: Mac) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

pub(crate) fn netns_file(ns: &str) -> Result<File> {
    let p = format!("/run/netns/{ns}");
    File::open(&p).with_context(|| format!("opening {p}"))
}

/// Runs `f` on a thread of its own inside namespace `ns` (interface names
/// and indexes, attaching XDP and `BPF_PROG_TEST_RUN` all resolve in the
/// calling thread's network namespace).
pub(crate) fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
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

pub(super) fn ifindex(dev: &str) -> Result<u32> {
    if_nametoindex(dev).with_context(|| format!("no interface {dev}"))
}

/// A pin directory for one bond object, removed on drop.
pub(super) struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Result<Self> {
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

/// A permanent neighbour entry: `addr` is at `mac` on `dev` in `ns`.
pub(super) fn neigh(ns: &str, addr: Ipv4Addr, mac: Mac, dev: &str) -> Result<()> {
    let (addr, mac) = (addr.to_string(), mac_str(mac));
    ip(
        ns,
        &[
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )
}

/// A program of `ebpf` as XDP.
pub(super) fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// Loads `prog` of `ebpf` and attaches it to `dev` in namespace `ns`.
pub(super) fn load_and_attach(ebpf: &mut Ebpf, prog: &str, ns: &str, dev: &str) -> Result<()> {
    let p = xdp_mut(ebpf, prog)?;
    p.load().with_context(|| format!("loading {prog}"))?;
    in_netns(ns, || {
        p.attach(dev, XdpMode::default())
            .with_context(|| format!("attaching {prog} to {dev}"))
    })?;
    Ok(())
}
