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

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
    },
};
use bond_common::maps::LAYOUT_VERSION;
use tokio::signal::unix::{SignalKind, signal};

use crate::{config::Config, control, datapath};

mod server;
mod terminal;

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

pub async fn run(cfg: Config, paths: Paths) -> Result<()> {
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
    let mut pins = Pins::open(&dir, &layout, &signature(&cfg))?;
    let result = match cfg {
        Config::Terminal(t) => terminal::run(t, &paths.config, &mut pins, calls).await,
        Config::Server(s) => server::run(s, &paths.config, &mut pins, calls).await,
    };
    // The reply to a `detach` or `drain` is written by the socket's task:
    // give it a moment before the process ends.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(Exit::Detach) => {
            eprintln!(
                "bond-ctl: detached; the datapath keeps running from {}",
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

/// What pinned state must match to be adopted: the role, the map layout,
/// and every config value that sizes a map or fills the port queue.
fn signature(cfg: &Config) -> String {
    match cfg {
        Config::Terminal(_) => format!("terminal layout {LAYOUT_VERSION}"),
        Config::Server(s) => {
            let ports = s.port_count().unwrap_or(0);
            let sizes: Vec<String> =
                crate::flows::server_map_sizes(s.flows.table_size(ports), ports, s.max_terminals)
                    .iter()
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect();
            format!(
                "server layout {LAYOUT_VERSION} nat_ports {} sizes {}",
                s.nat_ports,
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
}

impl Pins {
    /// Adopts what an earlier agent pinned if it has the same signature;
    /// otherwise removes it (detaching its programs) and starts clean.
    fn open(dir: &Path, layout: &Path, signature: &str) -> Result<Self> {
        let found = std::fs::read_to_string(layout).ok();
        let adopted = dir.exists() && found.as_deref() == Some(signature);
        if dir.exists() && !adopted {
            eprintln!(
                "bond-ctl: pins in {} are not this agent's layout ({}): starting clean",
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
            eprintln!(
                "bond-ctl: adopting the running datapath in {}",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            layout: layout.to_path_buf(),
            adopted,
        })
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
        let id = match adopted {
            Some(id) => id,
            None => match p.attach(iface, XdpMode::Driver) {
                Ok(id) => id,
                Err(_) => {
                    eprintln!("bond-ctl: {iface}: native XDP unavailable, using generic (slower)");
                    p.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching {prog} to {iface}"))?
                }
            },
        };
        let link: FdLink = p
            .take_link(id)?
            .try_into()
            .with_context(|| format!("{iface}: XDP attached without a BPF link"))?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    /// Attaches a TC program (TCX, a BPF link) to `iface`, as
    /// [`Self::attach_xdp`].
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
        let path = self.link_pin("tc", iface);
        let adopted = self.old_link(&path).and_then(|l| {
            let link = l.try_into().ok()?;
            p.attach_to_link(link).ok()
        });
        let id = match adopted {
            Some(id) => id,
            None => p
                .attach(iface, hook)
                .with_context(|| format!("attaching {prog} to {iface}"))?,
        };
        let link: FdLink = p
            .take_link(id)?
            .try_into()
            .with_context(|| format!("{iface}: TC attached without a BPF link (kernel < 6.6?)"))?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    /// Removes every pin: the programs detach once the agent's own handles
    /// close, and the maps go with the last reference.
    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.layout);
    }
}

async fn wait_for_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
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
            eprintln!("bond-ctl: control message rejected: {why} ({n} so far)");
        }
    }

    /// The agent's answer to a failed step: log it, count it, carry on.
    pub fn survive(&mut self, step: &'static str, r: Result<()>) {
        if let Err(e) = r {
            let n = self.bump(step);
            if n == 1 || n.is_multiple_of(1000) {
                eprintln!("bond-ctl: {step} failed ({n} so far), carrying on: {e:#}");
            }
        }
    }

    pub fn all(&self) -> &std::collections::BTreeMap<&'static str, u64> {
        &self.counts
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.counts
                .iter()
                .map(|(k, v)| ((*k).to_string(), serde_json::json!(v)))
                .collect(),
        )
    }

    pub fn metrics(&self, m: &mut control::Metrics) {
        m.family(self.metric, "counter", self.help);
        for (k, v) in &self.counts {
            m.sample(self.metric, &[("reason", (*k).into())], v);
        }
    }
}
