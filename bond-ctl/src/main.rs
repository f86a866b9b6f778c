//! `bond-ctl`: run the agent, or look at a running one.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use bond_ctl::{
    agent,
    config::Config,
    datapath::{self, Maps},
    show,
};

#[derive(Parser)]
#[command(
    name = "bond-ctl",
    version,
    about = "bond: bandwidth bonding for a community of hosts"
)]
struct Cli {
    /// bpffs mount the maps are pinned under (as `<bpffs>/bond/<instance>`).
    #[arg(long, global = true, env = "BOND_BPFFS", default_value = datapath::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (role from the file: terminal or server).
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Per-link packet and byte counters, and drops by reason.
    Links {
        #[arg(long, default_value = "default")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
    /// The server's flow table: each flow's dedicated port and counters.
    Flows {
        #[arg(long, default_value = "default")]
        instance: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let maps = |instance: &str| Maps::new(datapath::pin_dir(&cli.bpffs, instance));
    match cli.cmd {
        Cmd::Agent { config } => {
            let cfg = Config::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            rt.block_on(agent::run(cfg, cli.bpffs.clone()))
        }
        Cmd::Check { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Links { ref instance, json } => show::links(&maps(instance), json),
        Cmd::Flows { ref instance, json } => show::flows(&maps(instance), json),
    }
}
