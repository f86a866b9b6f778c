//! The nodes of an ISP tier as a director or another node reaches them:
//! a slot per node in an owner table ([`Owners`]), the interface towards
//! it and its MAC (found from its address, which must be on-link), and
//! each community's owner, all kept to the registry's [`View`].
//!
//! A director steers every community to its owner. A node passes on only
//! what another node owns (its own are handled where they arrive, so it
//! leaves itself out), and marks the other nodes' MACs so that what they
//! pass on is never passed on again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::Result;
use bond_common::maps::{MAX_NODES, NodeSlot};
use bond_datapath::{Maps, Owners};
use bond_tier::View;

use crate::net::Net;

/// How often a node whose MAC is not known yet is looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(200);

/// One node's slot.
#[derive(Debug, Clone)]
pub struct Slot {
    pub idx: u32,
    pub address: Ipv4Addr,
    /// Where its frames go, once known: (ifindex, interface, our MAC, its
    /// MAC).
    pub at: Option<(u32, String, [u8; 6], [u8; 6])>,
    /// Why it is not known, as last logged (logged again only if it
    /// changes).
    said: Option<String>,
}

pub struct NodeTable {
    table: Owners,
    maps: Maps,
    net: Net,
    /// A node's own name: left out of the slots, its communities handled
    /// where they arrive.
    me: Option<String>,
    slots: BTreeMap<String, Slot>,
    /// Owners as written: community -> slot.
    owners: BTreeMap<u32, u32>,
    /// A director's `[attach] veth`: the interfaces it redirects frames
    /// into are readied as those it attaches to are (a veth's other end
    /// takes frames from XDP only with GRO on); each once. None: a node,
    /// whose one interface was readied when its program went on.
    veth: Option<bond_config::VethAttach>,
    readied: BTreeSet<String>,
}

impl NodeTable {
    /// Starts from the owners the maps hold (an earlier agent's, when
    /// adopted): the first [`Self::sync`] clears what the registry no
    /// longer says.
    pub fn new(
        table: Owners,
        maps: Maps,
        me: Option<String>,
        veth: Option<bond_config::VethAttach>,
    ) -> Result<Self> {
        let owners = maps.owners(table)?.into_iter().collect();
        Ok(Self {
            table,
            maps,
            net: Net::new()?,
            me,
            slots: BTreeMap::new(),
            owners,
            veth,
            readied: BTreeSet::new(),
        })
    }

    pub fn slots(&self) -> &BTreeMap<String, Slot> {
        &self.slots
    }

    pub fn owners(&self) -> &BTreeMap<u32, u32> {
        &self.owners
    }

    /// Some node's interface or MAC is not known yet.
    pub fn unresolved(&self) -> bool {
        self.slots.values().any(|s| s.at.is_none())
    }

    /// Brings the table to `view`: slots for new nodes (their interface
    /// and MAC, once known), none for gone ones, each community's owner.
    pub async fn sync(&mut self, view: &View) {
        let gone: Vec<String> = self
            .slots
            .keys()
            .filter(|n| !view.nodes.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(s) = self.slots.remove(&name) {
                tracing::info!("registry: node {name} left (slot {})", s.idx);
                self.clear(&s);
            }
        }
        for (name, rec) in view.nodes.iter() {
            if Some(name) == self.me.as_ref() {
                continue;
            }
            let old = self.slots.get(name).cloned();
            if old.as_ref().is_some_and(|s| s.address == rec.address) {
                continue;
            }
            let used: BTreeSet<u32> = self.slots.values().map(|s| s.idx).collect();
            let idx = match &old {
                Some(s) => {
                    self.clear(s);
                    s.idx
                }
                None => match (0..MAX_NODES).find(|i| !used.contains(i)) {
                    Some(i) => i,
                    None => {
                        tracing::warn!("registry: node {name} left out: {MAX_NODES} nodes at most");
                        continue;
                    }
                },
            };
            self.slots.insert(
                name.clone(),
                Slot {
                    idx,
                    address: rec.address,
                    at: None,
                    said: None,
                },
            );
        }
        self.resolve_all().await;
        let mut want: BTreeMap<u32, u32> = BTreeMap::new();
        for (&c, node) in &view.owners {
            let Some(slot) = self.slots.get(node) else {
                continue;
            };
            if view.communities.contains_key(&c) {
                want.insert(c, slot.idx);
            }
        }
        let stale: Vec<u32> = self
            .owners
            .keys()
            .filter(|c| !want.contains_key(c))
            .copied()
            .collect();
        let mut moved = 0;
        for c in stale {
            if let Err(e) = self.maps.set_owner(self.table, c, None) {
                tracing::warn!("community {c}: clearing its owner: {e:#}");
            }
            self.owners.remove(&c);
            moved += 1;
        }
        for (c, idx) in want {
            if self.owners.get(&c) != Some(&idx) {
                match self.maps.set_owner(self.table, c, Some(idx)) {
                    Ok(()) => {
                        self.owners.insert(c, idx);
                        moved += 1;
                    }
                    Err(e) => tracing::warn!("community {c}: writing its owner: {e:#}"),
                }
            }
        }
        if moved > 0 {
            tracing::info!(
                "registry: {moved} owner(s) written; {} communities {}",
                self.owners.len(),
                match self.table {
                    Owners::Director => "steered",
                    Owners::Node => "passed on to their nodes",
                }
            );
        }
    }

    /// Looks up every node not resolved yet (the next call looks again).
    pub async fn resolve_all(&mut self) {
        let unresolved: Vec<String> = self
            .slots
            .iter()
            .filter(|(_, s)| s.at.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in unresolved {
            if let Err(e) = self.resolve(&name).await {
                let e = format!("{e:#}");
                if let Some(s) = self.slots.get_mut(&name)
                    && s.said.as_ref() != Some(&e)
                {
                    tracing::warn!("node {name}: {e}");
                    s.said = Some(e);
                }
            }
        }
    }

    /// Finds the interface and MAC of a node's address; asks the kernel
    /// to resolve it when it has no MAC yet.
    async fn resolve(&mut self, name: &str) -> Result<()> {
        let Some(slot) = self.slots.get(name).cloned() else {
            return Ok(());
        };
        let Some((index, dev)) = self.net.on_link(slot.address).await? else {
            anyhow::bail!(
                "its address {} is on no network of this host (nodes are reached by Ethernet address)",
                slot.address
            );
        };
        let Some(mac) = self.net.neighbor(index, slot.address).await? else {
            crate::net::poke_neighbor(&dev, slot.address)?;
            return Ok(());
        };
        if let Some(how) = self.veth
            && !self.readied.contains(&dev)
        {
            crate::veth::ready(&self.net, &dev, how).await?;
            self.readied.insert(dev.clone());
        }
        let ours = self.net.iface(&dev).await?.mac;
        let entry = NodeSlot {
            ifindex: index,
            dst_mac: mac,
            src_mac: ours,
        };
        if let Err(e) = self.maps.set_node(self.table, slot.idx, entry) {
            tracing::warn!("node slot {}: {e:#}", slot.idx);
        }
        if self.table == Owners::Node
            && let Err(e) = self.maps.set_node_mac(mac, true)
        {
            tracing::warn!("node {name}'s MAC: {e:#}");
        }
        tracing::info!(
            "node {name}: {} via {dev} ({}), slot {}",
            slot.address,
            mac_text(&mac),
            slot.idx
        );
        if let Some(s) = self.slots.get_mut(name) {
            s.at = Some((index, dev, ours, mac));
        }
        Ok(())
    }

    /// Empties a slot (and forgets its MAC).
    fn clear(&self, s: &Slot) {
        if let Err(e) = self.maps.set_node(self.table, s.idx, NodeSlot::default()) {
            tracing::warn!("node slot {}: {e:#}", s.idx);
        }
        if let (Owners::Node, Some((.., mac))) = (self.table, &s.at)
            && let Err(e) = self.maps.set_node_mac(*mac, false)
        {
            tracing::warn!("node slot {}'s MAC: {e:#}", s.idx);
        }
    }
}

pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
