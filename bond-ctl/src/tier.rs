//! `bond-ctl tier`: the ISP tier's registry in etcd, as an operator sees
//! and changes it.

use std::{io::Read as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use bond_tier::{
    admin::{Communities, Nodes, Registry},
    layout::CommunityRecord,
};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TierCmd {
    /// Every node: its address, weight, whether it is draining or the
    /// controller, and how many communities it owns.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// Every community and the node that owns it.
    Communities {
        #[arg(long)]
        json: bool,
    },
    /// Register a community and its key; the controller places it on a
    /// node at once.
    Add {
        id: u32,
        /// A file holding the key (`-`: standard input); a trailing
        /// newline is not part of it.
        #[arg(long)]
        key_file: PathBuf,
        /// Give a registered community a new key.
        #[arg(long)]
        replace: bool,
        /// Take only the terminals authorised by their own keys (`tier
        /// authorize`), not any with the community key.
        #[arg(long)]
        terminal_keys: bool,
    },
    /// The terminals a community takes by key.
    Terminals {
        id: u32,
        #[arg(long)]
        json: bool,
    },
    /// Authorise a terminal of a community (registered with
    /// `--terminal-keys`) by its LAN address and the public key of its
    /// identity (`bond-ctl identity new`); a new key replaces the old.
    Authorize {
        id: u32,
        /// The terminal's LAN address.
        address: std::net::Ipv4Addr,
        /// Its public key (hex), as `bond-ctl identity` prints it.
        key: String,
    },
    /// Revoke a terminal: its node ends its session at once (its traffic
    /// stops) and refuses it from then on.
    Revoke {
        id: u32,
        address: std::net::Ipv4Addr,
    },
    /// Remove a community: its owner stops serving it.
    Remove { id: u32 },
    /// Give a node no new communities and move its own to the others
    /// (before maintenance), each once it has no live flows there (TCP
    /// without FIN or RST, UDP and ICMP heard in the last 30 s), so no
    /// flow is cut; whatever still has flows after `--wait` moves then.
    Drain {
        node: String,
        /// Seconds to wait for flows to end at most.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        wait: u64,
        /// Move everything at once (its flows are cut).
        #[arg(long, conflicts_with = "wait")]
        now: bool,
    },
    /// Let a drained node take communities again (new ones, and those
    /// whose owners leave).
    Undrain { node: String },
}

pub fn run(etcd: &bond_tier::Etcd, prefix: &str, cmd: TierCmd) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async {
        let mut reg = Registry::connect(etcd, prefix).await?;
        match cmd {
            TierCmd::Nodes { json } => nodes(&mut reg, json).await,
            TierCmd::Communities { json } => communities(&mut reg, json).await,
            TierCmd::Add {
                id,
                key_file,
                replace,
                terminal_keys,
            } => {
                let key = read_key(&key_file)?;
                let record = CommunityRecord { key, terminal_keys };
                reg.add_community(id, &record, replace).await?;
                eprintln!("community {id} registered");
                Ok(())
            }
            TierCmd::Terminals { id, json } => {
                let t = reg.terminals(id).await?;
                if json {
                    return crate::show::print_json(&t);
                }
                if !t.terminal_keys {
                    eprintln!("community {id} takes any terminal with the community key");
                    return Ok(());
                }
                println!("{:<16} public key", "address");
                for row in &t.terminals {
                    println!("{:<16} {}", row.address, row.key);
                }
                if t.terminals.is_empty() {
                    eprintln!("community {id} takes terminals by key, and none is authorised");
                }
                Ok(())
            }
            TierCmd::Authorize { id, address, key } => {
                let key = key
                    .parse()
                    .map_err(|e| anyhow::anyhow!("public key {key:?}: {e}"))?;
                reg.authorize(id, address, key).await?;
                eprintln!("terminal {address} authorised in community {id}");
                Ok(())
            }
            TierCmd::Revoke { id, address } => {
                reg.revoke(id, address).await?;
                eprintln!("terminal {address} revoked in community {id}: its session ends now");
                Ok(())
            }
            TierCmd::Remove { id } => {
                reg.remove_community(id).await?;
                eprintln!("community {id} removed");
                Ok(())
            }
            TierCmd::Drain { node, wait, now } => {
                let wait = std::time::Duration::from_secs(if now { 0 } else { wait });
                reg.drain(&node, Some(wait)).await?;
                if wait.is_zero() {
                    eprintln!("{node} is draining: its communities move to the other nodes now");
                } else {
                    eprintln!(
                        "{node} is draining: each community moves to another node once its flows end \
                         (at most {} s; `bond-ctl tier nodes` counts what it still owns)",
                        wait.as_secs()
                    );
                }
                Ok(())
            }
            TierCmd::Undrain { node } => {
                reg.drain(&node, None).await?;
                eprintln!("{node} takes communities again");
                Ok(())
            }
        }
    })
}

fn read_key(path: &PathBuf) -> Result<String> {
    let mut key = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut key)
            .context("reading the key from standard input")?;
    } else {
        key = std::fs::read_to_string(path)
            .with_context(|| format!("reading the key from {}", path.display()))?;
    }
    let key = key.trim_end_matches(['\n', '\r']).to_string();
    if key.is_empty() {
        bail!("{}: the key is empty", path.display());
    }
    Ok(key)
}

async fn nodes(reg: &mut Registry, json: bool) -> Result<()> {
    let nodes = reg.nodes().await?;
    if json {
        return crate::show::print_json(&Nodes { nodes });
    }
    println!(
        "{:<16} {:<16} {:>6} {:>11}  state",
        "node", "address", "weight", "communities"
    );
    let now = bond_tier::unix_now();
    for n in &nodes {
        let mut state = Vec::new();
        match n.drain_until {
            Some(until) if until > now && n.communities > 0 => state.push(format!(
                "draining: keeps what has flows for {} s more",
                until - now
            )),
            Some(_) => state.push("draining".to_string()),
            None => {}
        }
        if n.controller {
            state.push("controller".to_string());
        }
        let state = state.join(", ");
        println!(
            "{:<16} {:<16} {:>6} {:>11}  {state}",
            n.name, n.address, n.weight, n.communities
        );
    }
    if nodes.is_empty() {
        eprintln!("no node is registered");
    }
    Ok(())
}

async fn communities(reg: &mut Registry, json: bool) -> Result<()> {
    let communities = reg.communities().await?;
    if json {
        return crate::show::print_json(&Communities { communities });
    }
    println!("{:>10}  {:<12}  owner", "community", "terminals");
    for c in &communities {
        let owner = match (&c.owner, c.orphan) {
            (Some(o), false) => o.clone(),
            (Some(o), true) => format!("{o} (gone; moving)"),
            (None, _) => "none (no node can take it)".into(),
        };
        let terminals = match c.terminal_keys {
            true => format!("{} by key", c.terminals),
            false => "any".to_string(),
        };
        println!("{:>10}  {terminals:<12}  {owner}", c.id);
    }
    Ok(())
}
