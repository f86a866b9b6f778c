//! The agent: loads and attaches the programs, sets up the capture device
//! and routes, keeps the maps true, and answers the operator's socket.
//!
//! Everything it puts in the kernel is pinned under
//! `/sys/fs/bpf/bond/<instance>/`: the maps by name, and the program links
//! under `links/`. A clean exit (SIGTERM, SIGINT, a finished drain) says
//! SHUTDOWN and removes it all. `bond-ctl detach` exits leaving the
//! datapath running, and the next agent adopts it: it reuses the maps,
//! swaps its programs into the pinned links atomically, and rebuilds its
//! tables from the maps, so traffic never stops.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use bond_common::maps::LAYOUT_VERSION;
use tokio::signal::unix::{SignalKind, signal};

use bond_api as control;
use bond_config::{AttachConfig, Config, TcAttach, XdpAttach};
use bond_datapath as datapath;

mod deadlines;
mod director;
pub mod feedback;
pub mod linkwatch;
pub mod membership;
pub mod net;
mod nodes;
pub mod pathmon;
pub mod playout;
pub mod probe;
pub mod resend;
mod server;
/// The NAT pool and its allocation log (read by `bond-ctl nat who`).
pub use server::nat;
pub mod share;
pub mod split;
mod terminal;
pub mod veth;
pub mod worker;

/// Where the agent keeps its pins and its socket.
#[derive(Clone, Debug)]
pub struct Paths {
    pub bpffs: PathBuf,
    pub run_dir: PathBuf,
    /// The configuration file, read again on `reload` or SIGHUP.
    pub config: PathBuf,
}

/// How the agent's loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Leave the community and remove the datapath.
    Leave,
    /// Keep the datapath running for the next agent.
    Detach,
}

/// The oldest kernel the agent runs on: XDP programs are attached through
/// BPF links (5.9), and pinned so that traffic outlives the agent.
pub const MIN_KERNEL: (u8, u8) = (5, 10);

/// Refuses a kernel older than [`MIN_KERNEL`], saying what it lacks.
fn check_kernel() -> Result<()> {
    let v = KernelVersion::current().context("reading the kernel version")?;
    let (major, minor) = MIN_KERNEL;
    if v < KernelVersion::new(major, minor, 0) {
        bail!(
            "kernel {v}: bond needs Linux {major}.{minor} or later (XDP attached through BPF \
             links, which can be pinned so that traffic outlives the agent, came in 5.9)"
        );
    }
    Ok(())
}

/// Starts a terminal's community services once its LAN address is known
/// (`bond-ctl` composes the relay tree and the peer cache this way; the
/// agent depends on neither).
pub type StartServices = Box<
    dyn Fn(
            bond_config::TerminalConfig,
            std::net::Ipv4Addr,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<Vec<Box<dyn bond_api::Service>>>> + Send>,
        > + Send
        + Sync,
>;

pub async fn run(cfg: Config, paths: Paths, services: StartServices) -> Result<()> {
    let signals = Signals::new().context("taking over SIGTERM, SIGINT and SIGHUP")?;
    check_kernel()?;
    datapath::ensure_bpffs(&paths.bpffs)?;
    let dir = datapath::pin_dir(&paths.bpffs, cfg.instance());
    let socket = control::socket_path(&paths.run_dir, cfg.instance());
    // The socket first: it refuses a second agent of the same instance
    // before that one could disturb the first one's pins.
    let (tx, calls) = tokio::sync::mpsc::channel(16);
    control::serve(&socket, tx.clone())?;
    if let Some(addr) = cfg.metrics() {
        control::serve_metrics(addr, tx).await?;
    }
    let layout = paths.run_dir.join(format!("{}.layout", cfg.instance()));
    let mut pins = Pins::open(&dir, &layout, &signature(&cfg), cfg.attach())?;
    let result = match cfg {
        Config::Terminal(t) => {
            terminal::run(t, &paths.config, &mut pins, calls, signals, &services).await
        }
        Config::Server(s) => server::run(s, &paths.config, &mut pins, calls, signals).await,
        Config::Director(d) => director::run(d, &mut pins, calls, signals).await,
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // The reply to a `detach` or `drain` is written by the socket's task:
    // give it a moment before the process ends.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(Exit::Detach) => {
            pins.leave_attached();
            tracing::info!(
                "detached; the datapath keeps running from {}",
                dir.display()
            );
            Ok(())
        }
        Ok(Exit::Leave) => {
            pins.remove();
            Ok(())
        }
        Err(e) => {
            pins.remove();
            Err(e)
        }
    }
}

/// Tells the service manager the agent is up: its maps are pinned and its
/// programs attached (`Type=notify` units; nothing without
/// `NOTIFY_SOCKET`). `status` is what `systemctl status` shows.
pub fn notify_ready(status: &str) {
    let state = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ];
    if let Err(e) = sd_notify::notify(false, &state) {
        tracing::warn!("telling the service manager it is ready: {e}");
    }
}

/// What pinned state must match to be adopted: the role, the map layout,
/// and every config value that sizes a map or shapes the NAT pool.
fn signature(cfg: &Config) -> String {
    match cfg {
        // A TC filter left through netlink and a TCX link would both wrap.
        Config::Terminal(t) => format!("terminal layout {LAYOUT_VERSION} tc {:?}", t.attach.tc),
        Config::Director(_) => format!("director layout {LAYOUT_VERSION}"),
        Config::Server(s) => {
            let ports = s.pool_ports().unwrap_or(0);
            let sizes: Vec<String> = datapath::flows::server_map_sizes(
                s.flows.table_size(ports),
                s.max_terminals,
                s.tier.is_some(),
            )
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
            // The communities' blocks are ports of this pool, in blocks of
            // this size.
            format!(
                "server layout {LAYOUT_VERSION} nat {}+{} ports {} block {} sizes {}",
                s.nat_address,
                s.nat_addresses,
                s.nat_ports,
                s.nat_block(),
                sizes.join(",")
            )
        }
    }
}

/// An instance's pins: maps (by the loader) and program links (here).
pub struct Pins {
    pub dir: PathBuf,
    layout: PathBuf,
    /// Whether the maps and links were left by an earlier agent.
    pub adopted: bool,
    /// How programs are to be attached.
    how: AttachConfig,
    /// How each program is attached, by (hook, interface): for `status`.
    pub attached: BTreeMap<(&'static str, String), &'static str>,
    /// What the agent whose pins these were noted of its attach modes.
    noted: String,
    /// TC filters attached through netlink. They have no BPF link to pin:
    /// held here, they are detached on a clean exit, and left in place
    /// (forgotten) on `detach`, where the next agent swaps its program in.
    netlink: Vec<SchedClassifierLink>,
}

/// The priority and handle of bond's TC filter where it is attached
/// through netlink: fixed, so that the next agent finds it.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xb0d);

impl Pins {
    /// Adopts what an earlier agent pinned if it has the same signature;
    /// otherwise removes it (detaching its programs) and starts clean.
    fn open(dir: &Path, layout: &Path, signature: &str, how: AttachConfig) -> Result<Self> {
        let found = std::fs::read_to_string(layout).ok();
        let adopted = dir.exists() && found.as_deref() == Some(signature);
        if dir.exists() && !adopted {
            tracing::warn!(
                "pins in {} are not this agent's layout ({}): starting clean",
                dir.display(),
                found.as_deref().unwrap_or("unknown")
            );
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing stale pins in {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("links"))?;
        if let Some(parent) = layout.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(layout, signature)
            .with_context(|| format!("writing {}", layout.display()))?;
        if adopted {
            tracing::info!("adopting the running datapath in {}", dir.display());
        }
        let mut pins = Self {
            dir: dir.to_path_buf(),
            layout: layout.to_path_buf(),
            adopted,
            how,
            attached: BTreeMap::new(),
            noted: String::new(),
            netlink: Vec::new(),
        };
        if adopted {
            pins.noted = std::fs::read_to_string(pins.modes_file()).unwrap_or_default();
        }
        Ok(pins)
    }

    fn link_pin(&self, kind: &str, iface: &str) -> PathBuf {
        self.dir.join("links").join(format!("{kind}_{iface}"))
    }

    /// An earlier agent's link for this hook, if it is pinned and alive.
    fn old_link(&self, path: &Path) -> Option<FdLink> {
        let old = PinnedLink::from_pin(path).ok()?;
        // Unpinned now; pinned again once the new program is in it.
        old.unpin().ok()
    }

    /// Where the attach modes are noted, beside the layout (bpffs holds
    /// only BPF objects).
    fn modes_file(&self) -> PathBuf {
        let mut p = self.layout.as_os_str().to_owned();
        p.push(".attach");
        p.into()
    }

    /// Notes how the program on `iface` is attached: for `status`, and for
    /// the next agent, which adopts it as it is.
    fn record(&mut self, hook: &'static str, iface: &str, mode: &'static str) -> Result<()> {
        self.attached.insert((hook, iface.to_string()), mode);
        let text: String = self
            .attached
            .iter()
            .map(|((h, i), m)| format!("{h} {i} {m}\n"))
            .collect();
        let path = self.modes_file();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// How an earlier agent attached the program on `iface`, as it noted.
    fn recorded(&self, hook: &'static str, iface: &str) -> &'static str {
        let found = self.noted.lines().find_map(|l| {
            let mut w = l.split(' ');
            (w.next() == Some(hook) && w.next() == Some(iface)).then(|| w.next())?
        });
        [XDP_NATIVE, XDP_GENERIC, TC_TCX, TC_NETLINK]
            .into_iter()
            .find(|m| Some(*m) == found)
            .unwrap_or("adopted")
    }

    /// Attaches an XDP program to `iface` through a pinned link: a link an
    /// earlier agent left there gets the new program atomically.
    pub fn attach_xdp(&mut self, ebpf: &mut Ebpf, prog: &str, iface: &str) -> Result<()> {
        let p: &mut Xdp = ebpf
            .program_mut(prog)
            .context("program missing")?
            .try_into()?;
        if p.fd().is_err() {
            p.load().with_context(|| format!("loading {prog}"))?;
        }
        let path = self.link_pin("xdp", iface);
        let adopted = self.old_link(&path).and_then(|l| {
            let link = l.try_into().ok()?;
            p.attach_to_link(link).ok()
        });
        let (id, mode) = match adopted {
            Some(id) => (id, self.recorded("xdp", iface)),
            None => attach_xdp_new(p, self.how.xdp, prog, iface)?,
        };
        let link: FdLink = p
            .take_link(id)?
            .try_into()
            .with_context(|| format!("{iface}: XDP attached without a BPF link"))?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        self.record("xdp", iface, mode)
    }

    /// Attaches a TC program to `iface`: through TCX (a BPF link, pinned,
    /// as [`Self::attach_xdp`]) where the kernel has it, else as a
    /// `cls_bpf` filter on a `clsact` qdisc ([`Self::attach_tc_netlink`]).
    pub fn attach_tc(
        &mut self,
        ebpf: &mut Ebpf,
        prog: &str,
        iface: &str,
        hook: TcAttachType,
    ) -> Result<()> {
        let p: &mut SchedClassifier = ebpf
            .program_mut(prog)
            .context("program missing")?
            .try_into()?;
        if p.fd().is_err() {
            p.load().with_context(|| format!("loading {prog}"))?;
        }
        let netlink = match self.how.tc {
            TcAttach::Tcx => false,
            TcAttach::Netlink => true,
            TcAttach::Auto => KernelVersion::current()
                .map(|v| v < KernelVersion::new(6, 6, 0))
                .unwrap_or(true),
        };
        if netlink {
            return self.attach_tc_netlink(p, prog, iface, hook);
        }
        let path = self.link_pin("tc", iface);
        let adopted = self.old_link(&path).and_then(|l| {
            let link = l.try_into().ok()?;
            p.attach_to_link(link).ok()
        });
        let id = match adopted {
            Some(id) => id,
            None => p
                .attach_with_options(iface, hook, TcAttachOptions::TcxOrder(Default::default()))
                .with_context(|| {
                    format!(
                        "attaching {prog} to {iface} through TCX (kernel 6.6 or later; \
                         `attach.tc = \"netlink\"` works on older ones)"
                    )
                })?,
        };
        let link: FdLink = p
            .take_link(id)?
            .try_into()
            .with_context(|| format!("{iface}: TC attached without a BPF link"))?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        self.record("tc", iface, TC_TCX)
    }

    /// Attaches a TC program as bond's `cls_bpf` filter on `iface`'s
    /// `clsact` qdisc (added if missing): what kernels before 6.6 have. A
    /// filter an earlier agent left there gets the new program in place.
    fn attach_tc_netlink(
        &mut self,
        p: &mut SchedClassifier,
        prog: &str,
        iface: &str,
        hook: TcAttachType,
    ) -> Result<()> {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("adding a clsact qdisc to {iface}"));
            }
        }
        let old = SchedClassifierLink::attached(iface, hook, TC_PRIORITY, TC_HANDLE, None)
            .with_context(|| format!("interface {iface}"))?;
        let id = match p.attach_to_link(old) {
            Ok(id) => id,
            Err(_) => p
                .attach_with_options(
                    iface,
                    hook,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle: TC_HANDLE,
                        classid: None,
                    }),
                )
                .with_context(|| format!("attaching {prog} to {iface} through netlink"))?,
        };
        self.netlink.push(p.take_link(id)?);
        self.record("tc", iface, TC_NETLINK)
    }

    /// Leaves the TC filters attached through netlink in place when the
    /// agent exits (`detach`): they carry traffic until the next agent
    /// swaps its program in, as pinned links do.
    fn leave_attached(&mut self) {
        for link in self.netlink.drain(..) {
            std::mem::forget(link);
        }
    }

    /// Removes every pin: the programs detach once the agent's own handles
    /// close, and the maps go with the last reference.
    fn remove(&mut self) {
        // Dropped, they detach.
        self.netlink.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.layout);
        let _ = std::fs::remove_file(self.modes_file());
    }
}

/// How an XDP program is attached: in the driver, or generic.
const XDP_NATIVE: &str = "native";
const XDP_GENERIC: &str = "generic";
/// How a TC program is attached: a TCX link, or a netlink filter.
const TC_TCX: &str = "tcx";
const TC_NETLINK: &str = "netlink";

/// Attaches an XDP program afresh, as `how` says.
fn attach_xdp_new(
    p: &mut Xdp,
    how: XdpAttach,
    prog: &str,
    iface: &str,
) -> Result<(XdpLinkId, &'static str)> {
    let generic = |p: &mut Xdp| {
        p.attach(iface, XdpMode::Skb)
            .with_context(|| format!("attaching {prog} to {iface} (generic XDP)"))
    };
    Ok(match how {
        XdpAttach::Generic => (generic(p)?, XDP_GENERIC),
        XdpAttach::Native => (
            p.attach(iface, XdpMode::Driver).with_context(|| {
                format!(
                    "attaching {prog} to {iface} in its driver (`attach.xdp = \"native\"`; \
                     \"auto\" or \"generic\" work on any interface)"
                )
            })?,
            XDP_NATIVE,
        ),
        XdpAttach::Auto => match p.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, XDP_NATIVE),
            Err(_) => {
                tracing::warn!("{iface}: native XDP unavailable, using generic (slower)");
                (generic(p)?, XDP_GENERIC)
            }
        },
    })
}

/// For `status`: how each program is attached.
pub fn attach_status(
    attached: &BTreeMap<(&'static str, String), &'static str>,
) -> Vec<bond_api::reply::Attached> {
    attached
        .iter()
        .map(|((hook, iface), mode)| bond_api::reply::Attached {
            interface: iface.clone(),
            hook: (*hook).into(),
            mode: (*mode).into(),
        })
        .collect()
}

/// Reads the programs' log (the first drop of each reason) into the
/// agent's log for as long as the agent runs. Called once the object is
/// loaded and before its programs are.
pub fn read_drop_log(ebpf: &mut Ebpf) -> Result<()> {
    let log = datapath::drop_log(
        ebpf,
        |line| tracing::warn!(target: "bond::datapath", "{line}"),
    )?;
    // SAFETY: the logger owns its ring's file descriptor and keeps it open,
    // the same one, for as long as it lives, which is as long as `fd`.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the programs' log: {}", e.into_parts().1))?;
    tokio::spawn(async move {
        while let Ok(mut ready) = fd.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}

/// A reload refused because `fields` changed, which only a restart
/// applies; `keep` says the running configuration stays.
pub fn refuse_restart_fields(fields: &[&str], keep: &str) -> Result<(), String> {
    if fields.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} changed, which takes a restart (`bond-ctl detach`, then start the agent); {keep}",
        fields.join(", ")
    ))
}

/// An operator reply as the socket sends it.
pub fn reply(r: impl serde::Serialize) -> Result<serde_json::Value, String> {
    serde_json::to_value(r).map_err(|e| format!("encoding the reply: {e}"))
}

/// The signals the agent answers, taken over before it sets anything up:
/// one that comes while it starts (a `systemctl reload` or `stop` right
/// after READY=1, or before) waits for its event loop instead of killing
/// it with the default action, its datapath left without an agent.
pub struct Signals {
    pub stop: Stop,
    /// SIGHUP: read the configuration again.
    pub hangup: tokio::signal::unix::Signal,
}

/// SIGTERM or SIGINT: leave the community and remove everything.
pub struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Stop {
    /// Cancel-safe: a `select!` arm may drop it and call it again.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Signals {
            stop: Stop {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// Events counted by reason: control messages refused, and failed steps
/// the agent survived. The first of each reason, and then every 1000th,
/// is logged.
#[derive(Debug)]
pub struct Tally {
    metric: &'static str,
    help: &'static str,
    counts: std::collections::BTreeMap<&'static str, u64>,
}

impl Tally {
    /// Control messages refused or undeliverable.
    pub fn rejects() -> Self {
        Tally {
            metric: "bond_control_rejects_total",
            help: "Control messages refused, by reason.",
            counts: Default::default(),
        }
    }

    /// Steps that failed (a map the kernel refused to update, a netlink
    /// call): the agent logs, counts and carries on, and the step is tried
    /// again on the next event that needs it.
    pub fn faults() -> Self {
        Tally {
            metric: "bond_agent_faults_total",
            help: "Agent steps that failed and were survived, by step.",
            counts: Default::default(),
        }
    }

    /// Counts `why` once; returns how many so far.
    fn bump(&mut self, why: &'static str) -> u64 {
        let n = self.counts.entry(why).or_default();
        *n += 1;
        *n
    }

    pub fn count(&mut self, why: &'static str) {
        let n = self.bump(why);
        if n == 1 || n.is_multiple_of(1000) {
            tracing::warn!("control message rejected: {why} ({n} so far)");
        }
    }

    /// The agent's answer to a failed step: log it, count it, carry on.
    pub fn survive(&mut self, step: &'static str, r: Result<()>) {
        if let Err(e) = r {
            let n = self.bump(step);
            if n == 1 || n.is_multiple_of(1000) {
                tracing::warn!("{step} failed ({n} so far), carrying on: {e:#}");
            }
        }
    }

    pub fn all(&self) -> &std::collections::BTreeMap<&'static str, u64> {
        &self.counts
    }

    pub fn counts(&self) -> bond_api::reply::Counts {
        self.counts
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect()
    }

    pub fn metrics(&self, m: &mut control::Metrics) {
        m.family(self.metric, "counter", self.help);
        for (k, v) in &self.counts {
            m.sample(self.metric, &[("reason", (*k).into())], v);
        }
    }
}
