//! The agent: loads and attaches the programs, sets up the capture device
//! and routes, and keeps the maps true. Runs until SIGINT or SIGTERM, then
//! removes what it made.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{config::Config, datapath};

mod server;
mod terminal;

pub async fn run(cfg: Config, bpffs: PathBuf) -> Result<()> {
    let dir = datapath::pin_dir(&bpffs, cfg.instance());
    datapath::ensure_bpffs(&bpffs)?;
    if dir.exists() {
        // No adoption yet (that comes with restarts): start clean.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale pins in {}", dir.display()))?;
    }
    let result = match cfg {
        Config::Terminal(t) => terminal::run(t, &dir).await,
        Config::Server(s) => server::run(s, &dir).await,
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
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

fn attach_xdp(ebpf: &mut Ebpf, prog: &str, iface: &str) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(prog)
        .context("program missing")?
        .try_into()?;
    if p.fd().is_err() {
        p.load().with_context(|| format!("loading {prog}"))?;
    }
    if p.attach(iface, XdpMode::Driver).is_err() {
        p.attach(iface, XdpMode::Skb)
            .with_context(|| format!("attaching {prog} to {iface}"))?;
        eprintln!("bond-ctl: {iface}: native XDP unavailable, using generic (slower)");
    }
    Ok(())
}

/// Control messages refused or undeliverable, by reason.
#[derive(Debug, Default)]
pub struct Rejects(std::collections::BTreeMap<&'static str, u64>);

impl Rejects {
    pub fn count(&mut self, why: &'static str) {
        *self.0.entry(why).or_default() += 1;
    }

    pub fn all(&self) -> &std::collections::BTreeMap<&'static str, u64> {
        &self.0
    }
}
