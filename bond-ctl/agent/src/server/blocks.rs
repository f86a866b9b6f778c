//! The NAT pool at work: a community gets its first block of ports (on
//! one address) when a terminal of it logs on, more as its flows grow,
//! and gives them back when it is gone (`nat::NatPool::plan`, after each
//! sweep of the flow table). Each block given and taken back is written
//! to the map (`S_NAT_BLOCKS`) and to the allocation log (`nat::NatLog`).
//!
//! A block leaves a community in two steps: out of its share in the map
//! at one sweep, back into the pool at the next, once that sweep saw no
//! flow on it. A flow the program made from the old share as it changed
//! (it read the share just before the write) is then in the listing, and
//! the block goes back to its community instead: no address and port is
//! ever logged as two communities' at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use bond_common::maps::NatBlocks;
use bond_config::ServerConfig;
use bond_datapath::{Maps, flows::Counted};

use super::nat::{Change, ChangeKind, NatLog, NatPool, Step, Usage};

pub(super) struct Blocks {
    pool: NatPool,
    log: NatLog,
    /// Blocks out of their community's share in the map, still its in the
    /// pool until the next sweep shows no flow on them.
    cooling: BTreeMap<u32, BTreeSet<u16>>,
    /// Communities the pool had no block for (warned once each).
    starved: BTreeSet<u32>,
}

impl Blocks {
    /// The pool of `cfg`, with the shares an earlier agent handed out
    /// (`adopted` maps) taken back as they were: their flows hold ports
    /// of them. A share that does not fit the pool is dropped, named.
    pub(super) fn start(cfg: &ServerConfig, maps: &Maps, adopted: bool) -> Result<Self> {
        let (lo, hi) = cfg
            .port_range()
            .map_err(anyhow::Error::msg)
            .context("field `nat_ports`")?;
        let mut pool = NatPool::new(
            cfg.nat_address,
            cfg.nat_addresses,
            (lo, hi),
            cfg.nat_block(),
        )
        .map_err(anyhow::Error::msg)
        .context("fields `nat_address`, `nat_addresses`, `nat_ports`, `nat_block`")?;
        let path = cfg.nat_log();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("field `nat_log`: {}", dir.display()))?;
        }
        let log =
            NatLog::open(&path).with_context(|| format!("field `nat_log`: {}", path.display()))?;
        if adopted {
            for (c, share) in maps.nat_blocks()? {
                if let Err(e) = pool.adopt(c, &share) {
                    tracing::warn!("NAT blocks left by the last agent: {e}: dropped");
                    maps.remove_nat_blocks(c)?;
                }
            }
        }
        Ok(Self {
            pool,
            log,
            cooling: BTreeMap::new(),
            starved: BTreeSet::new(),
        })
    }

    /// A terminal of `community` logged on: it has a share from now on
    /// (its first block, or the blocks it was giving back).
    pub(super) fn logged_on(&mut self, maps: &Maps, community: u32) -> Result<()> {
        // Blocks it was giving back are its again.
        if self.cooling.remove(&community).is_some() {
            self.write(maps, community)?;
        }
        match self.pool.assign(community) {
            Ok(Some(change)) => {
                self.starved.remove(&community);
                self.write(maps, community)?;
                self.logged(&change);
            }
            Ok(None) => {}
            Err(e) => {
                // Said when the pool runs out, not for every community
                // after it (`status` counts them).
                if self.starved.is_empty() {
                    tracing::warn!(
                        "{e}: its flows, and those of any community after it, are refused \
                         (`no_free_port`) until blocks are free (`status`: nat.starved)"
                    );
                }
                self.starved.insert(community);
            }
        }
        Ok(())
    }

    /// After a sweep: gives back the blocks that cooled with no flow on
    /// them, then grows and shrinks shares as `nat::NatPool::plan` says.
    /// `active` says whether a community has terminals logged on.
    pub(super) fn after_sweep(
        &mut self,
        maps: &Maps,
        counted: &Counted,
        active: impl Fn(u32) -> bool,
    ) -> Result<()> {
        for (c, firsts) in std::mem::take(&mut self.cooling) {
            let mut back = false;
            for first in firsts {
                if counted.blocks.get(&(c, first)).copied().unwrap_or(0) > 0 {
                    back = true;
                } else if let Some(change) = self.pool.release(c, first) {
                    self.logged(&change);
                }
            }
            if back {
                tracing::info!("community {c}: a flow came on a block being taken back: kept");
                self.write(maps, c)?;
            }
        }
        let mut usage: BTreeMap<u32, Usage> = BTreeMap::new();
        for (&(c, first), &n) in &counted.blocks {
            let u = usage.entry(c).or_default();
            u.flows += n;
            u.by_block.insert(first, n);
        }
        for c in self.pool.communities().collect::<Vec<_>>() {
            usage.entry(c).or_default().active = active(c);
        }
        // Those the pool had nothing for try again while they are on.
        self.starved.retain(|&c| active(c));
        for c in self.starved.clone() {
            self.logged_on(maps, c)?;
        }
        for step in self.pool.plan(&usage) {
            match step {
                Step::Grow(c) => match self.pool.grow(c) {
                    Ok(change) => {
                        self.write(maps, c)?;
                        self.logged(&change);
                    }
                    Err(e) => tracing::warn!("{e}"),
                },
                Step::Release(c, first) => {
                    self.cooling.entry(c).or_default().insert(first);
                    self.write(maps, c)?;
                }
                Step::ReleaseAll(c) => {
                    self.starved.remove(&c);
                    let firsts: Vec<u16> = self
                        .pool
                        .held(c)
                        .map(|s| firsts(&s).collect())
                        .unwrap_or_default();
                    self.cooling.entry(c).or_default().extend(firsts);
                    self.write(maps, c)?;
                }
            }
        }
        Ok(())
    }

    /// Opens the allocation log at `path` again (after a rotation), and
    /// writes to it from now on.
    pub(super) fn reopen_log(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        self.log = NatLog::open(path)?;
        Ok(())
    }

    /// The pool for `status`: blocks held and free, communities holding any.
    pub(super) fn status(&self) -> bond_api::reply::NatPool {
        let free = self.pool.blocks_free();
        bond_api::reply::NatPool {
            addresses: self.pool.addresses(),
            block: self.pool.block(),
            blocks_held: self.pool.blocks_total() - free,
            blocks_free: free,
            communities: self.pool.communities().count(),
            starved: self.starved.len(),
        }
    }

    /// `community`'s share for `status` (cooling blocks included: they are
    /// its until given back).
    pub(super) fn share(&self, community: u32) -> Option<bond_api::reply::CommunityNat> {
        let s = self.pool.held(community)?;
        let size = self.pool.block();
        Some(bond_api::reply::CommunityNat {
            address: self.pool.address(s.index),
            ports: firsts(&s)
                .map(|f| format!("{f}-{}", f + (size - 1)))
                .collect(),
        })
    }

    /// (first dedicated port, block size): how a sweep counts flows by block.
    pub(super) fn shape(&self) -> (u16, u16) {
        self.pool.shape()
    }

    /// Writes `community`'s share as the datapath may use it: what it
    /// holds but the blocks cooling; nothing left, no entry.
    fn write(&self, maps: &Maps, community: u32) -> Result<()> {
        let share = self.pool.held(community).and_then(|mut s| {
            if let Some(cool) = self.cooling.get(&community) {
                let kept: Vec<u16> = firsts(&s).filter(|f| !cool.contains(f)).collect();
                s.count = kept.len() as u8;
                s.first = [0; bond_common::maps::MAX_NAT_BLOCKS];
                for (slot, f) in s.first.iter_mut().zip(kept) {
                    *slot = f;
                }
            }
            (s.count > 0).then_some(s)
        });
        match share {
            Some(s) => maps.set_nat_blocks(community, &s),
            None => maps.remove_nat_blocks(community),
        }
        .with_context(|| format!("community {community}: NAT blocks"))
    }

    /// The allocation log must not miss a line quietly: one that cannot be
    /// written is an error in the agent's own log, with what it said.
    fn logged(&mut self, change: &Change) {
        let what = match change.kind {
            ChangeKind::Assigned => "given",
            ChangeKind::Released => "taken back",
        };
        tracing::info!(
            "community {}: NAT ports {}-{} on {} {what}",
            change.community,
            change.first,
            change.last,
            change.address,
        );
        if let Err(e) = self.log.write(change, SystemTime::now()) {
            tracing::error!("NAT log: {e}: not written: {change:?}");
        }
    }
}

/// The first ports of a share's blocks.
fn firsts(s: &NatBlocks) -> impl Iterator<Item = u16> + '_ {
    s.first.iter().take(usize::from(s.count)).copied()
}
