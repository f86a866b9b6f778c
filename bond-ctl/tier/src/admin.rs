//! The operator's side of the registry (`bond-ctl tier`): nodes and what
//! they own, communities and their keys, draining.

use anyhow::{Context as _, Result, bail};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use std::net::Ipv4Addr;

use bond_proto::identity::PublicKey;

use crate::layout::{CommunityRecord, Layout, TerminalRecord, View};

/// `bond-ctl tier nodes --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nodes {
    pub nodes: Vec<NodeRow>,
}

/// `bond-ctl tier communities --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Communities {
    pub communities: Vec<CommunityRow>,
}

/// One node as `bond-ctl tier nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    pub name: String,
    pub address: std::net::Ipv4Addr,
    pub weight: u32,
    pub draining: bool,
    /// While draining: until when (Unix seconds) it keeps communities
    /// that still have live flows (0: none kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_until: Option<u64>,
    pub controller: bool,
    /// Communities it owns.
    pub communities: usize,
}

/// One community as `bond-ctl tier communities` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommunityRow {
    pub id: u32,
    /// None: no live node could take it (all gone or draining), or the
    /// controller has not placed it yet.
    pub owner: Option<String>,
    /// Its owner is not a live node: it moves when the controller gets
    /// to it.
    pub orphan: bool,
    /// Only terminals authorised by key are taken.
    #[serde(default)]
    pub terminal_keys: bool,
    /// Terminals authorised (`bond-ctl tier authorize`).
    #[serde(default)]
    pub terminals: usize,
}

/// `bond-ctl tier terminals ID --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminals {
    pub community: u32,
    pub terminal_keys: bool,
    pub terminals: Vec<TerminalRow>,
}

/// One authorised terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalRow {
    /// Its LAN address, as its messages name it.
    pub address: std::net::Ipv4Addr,
    /// Its identity's public key (hex).
    pub key: String,
}

/// The registry as the operator reads it.
pub struct Registry {
    client: Client,
    layout: Layout,
}

impl Registry {
    pub async fn connect(etcd: &crate::Etcd, prefix: &str) -> Result<Self> {
        Ok(Self {
            client: crate::connect(etcd).await?,
            layout: Layout::new(prefix),
        })
    }

    pub async fn view(&mut self) -> Result<View> {
        Ok(crate::snapshot(&mut self.client, &self.layout).await?.0)
    }

    /// The node that is controller now, if any.
    pub async fn controller(&mut self) -> Result<Option<String>> {
        match self.client.leader(self.layout.election()).await {
            Ok(r) => Ok(r
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "election: no leader" as an error.
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(e).context("asking who the controller is"),
        }
    }

    pub async fn nodes(&mut self) -> Result<Vec<NodeRow>> {
        let view = self.view().await?;
        let controller = self.controller().await?;
        Ok(view
            .nodes
            .iter()
            .map(|(name, r)| NodeRow {
                name: name.clone(),
                address: r.address,
                weight: r.weight,
                draining: view.draining(name),
                drain_until: view.drains.get(name).map(|d| d.until),
                controller: controller.as_deref() == Some(name),
                communities: view.owners.values().filter(|o| *o == name).count(),
            })
            .collect())
    }

    pub async fn communities(&mut self) -> Result<Vec<CommunityRow>> {
        let view = self.view().await?;
        Ok(view
            .communities
            .keys()
            .map(|&id| {
                let owner = view.owners.get(&id).cloned();
                let orphan = owner.as_ref().is_some_and(|o| !view.nodes.contains_key(o));
                let keys = view.terminal_keys(id);
                CommunityRow {
                    id,
                    owner,
                    orphan,
                    terminal_keys: keys.is_some(),
                    terminals: keys.map_or(0, |k| k.len()),
                }
            })
            .collect())
    }

    /// Registers a community with its key; one that exists is refused
    /// unless `replace` (a new key: its terminals need it too).
    pub async fn add_community(
        &mut self,
        id: u32,
        record: &CommunityRecord,
        replace: bool,
    ) -> Result<()> {
        if record.key.len() < 16 {
            bail!("the key is {} bytes; use at least 16", record.key.len());
        }
        let k = self.layout.community(id);
        let value = serde_json::to_vec(record)?;
        let put = TxnOp::put(k.clone(), value, None);
        let txn = if replace {
            Txn::new().and_then([put])
        } else {
            Txn::new()
                .when([Compare::version(k, CompareOp::Equal, 0)])
                .and_then([put])
        };
        let r = self
            .client
            .txn(txn)
            .await
            .context("registering the community")?;
        if !r.succeeded() {
            bail!("community {id} is already registered (--replace gives it a new key)");
        }
        Ok(())
    }

    /// Registers many communities at once (a site's import; a bench's
    /// thousands), taking terminals by key or not, in transactions of
    /// 100; an id already registered fails its transaction and is named.
    pub async fn add_communities(
        &mut self,
        all: &[(u32, String)],
        terminal_keys: bool,
    ) -> Result<()> {
        for chunk in all.chunks(100) {
            let mut when = Vec::new();
            let mut puts = Vec::new();
            for (id, key) in chunk {
                if key.len() < 16 {
                    bail!(
                        "community {id}: the key is {} bytes; use at least 16",
                        key.len()
                    );
                }
                let k = self.layout.community(*id);
                let value = serde_json::to_vec(&CommunityRecord {
                    key: key.clone(),
                    terminal_keys,
                })?;
                when.push(Compare::version(k.clone(), CompareOp::Equal, 0));
                puts.push(TxnOp::put(k, value, None));
            }
            let r = self
                .client
                .txn(Txn::new().when(when).and_then(puts))
                .await
                .context("registering communities")?;
            if !r.succeeded() {
                let ids: Vec<u32> = chunk.iter().map(|c| c.0).collect();
                bail!("one of communities {ids:?} is already registered");
            }
        }
        Ok(())
    }

    /// Removes a community: its owner stops serving it once the
    /// controller clears the owner.
    pub async fn remove_community(&mut self, id: u32) -> Result<()> {
        let r = self
            .client
            .delete(self.layout.community(id), None)
            .await
            .context("removing the community")?;
        if r.deleted() == 0 {
            bail!("community {id} is not registered");
        }
        Ok(())
    }

    /// The terminals community `id` takes by key.
    pub async fn terminals(&mut self, id: u32) -> Result<Terminals> {
        let view = self.view().await?;
        if !view.communities.contains_key(&id) {
            bail!("community {id} is not registered");
        }
        let keys = view.terminal_keys(id);
        Ok(Terminals {
            community: id,
            terminal_keys: keys.is_some(),
            terminals: keys
                .unwrap_or_default()
                .into_iter()
                .map(|(address, key)| TerminalRow {
                    address,
                    key: key.to_string(),
                })
                .collect(),
        })
    }

    /// Authorises terminal `origin` of community `id` by its public key
    /// (a new key replaces the old one: the terminal's session ends and
    /// it logs on again with the new one). The community must take
    /// terminals by key, or this would authorise nothing.
    pub async fn authorize(&mut self, id: u32, origin: Ipv4Addr, key: PublicKey) -> Result<()> {
        let view = self.view().await?;
        match view.communities.get(&id) {
            None => bail!("community {id} is not registered"),
            Some(c) if !c.terminal_keys => bail!(
                "community {id} takes any terminal with the community key; register it with \
                 --terminal-keys first (`bond-ctl tier add {id} --key-file F --replace --terminal-keys`)"
            ),
            Some(_) => {}
        }
        let value = serde_json::to_vec(&TerminalRecord { key })?;
        self.client
            .put(self.layout.terminal(id, origin), value, None)
            .await
            .context("authorising the terminal")?;
        Ok(())
    }

    /// Authorises many terminals at once (an import; a bench's
    /// thousands), in transactions of 100, without looking at their
    /// communities.
    pub async fn authorize_many(&mut self, all: &[(u32, Ipv4Addr, PublicKey)]) -> Result<()> {
        for chunk in all.chunks(100) {
            let mut puts = Vec::new();
            for &(id, origin, key) in chunk {
                let value = serde_json::to_vec(&TerminalRecord { key })?;
                puts.push(TxnOp::put(self.layout.terminal(id, origin), value, None));
            }
            self.client
                .txn(Txn::new().and_then(puts))
                .await
                .context("authorising terminals")?;
        }
        Ok(())
    }

    /// Revokes terminal `origin` of community `id`: its session ends at
    /// its node at once, and its logins are refused.
    pub async fn revoke(&mut self, id: u32, origin: Ipv4Addr) -> Result<()> {
        let r = self
            .client
            .delete(self.layout.terminal(id, origin), None)
            .await
            .context("revoking the terminal")?;
        if r.deleted() == 0 {
            bail!("terminal {origin} is not authorised in community {id}");
        }
        Ok(())
    }

    /// Marks a node draining, or not. Draining, it takes no new
    /// communities and gives each of its own up once it has no live
    /// flows there, or when `wait` has passed (all at once with a `wait`
    /// of zero).
    pub async fn drain(&mut self, name: &str, wait: Option<std::time::Duration>) -> Result<()> {
        if !crate::layout::valid_name(name) {
            bail!("{name:?} is not a node name (a-z, 0-9 and -, at most 63)");
        }
        let key = self.layout.drain(name);
        match wait {
            Some(wait) => {
                let until = match wait.is_zero() {
                    true => 0,
                    false => crate::unix_now() + wait.as_secs().max(1),
                };
                let value = serde_json::to_vec(&crate::layout::DrainRecord { until })?;
                self.client
                    .put(key, value, None)
                    .await
                    .context("marking it draining")?;
            }
            None => {
                self.client
                    .delete(key, None)
                    .await
                    .context("clearing its drain")?;
            }
        }
        Ok(())
    }
}
