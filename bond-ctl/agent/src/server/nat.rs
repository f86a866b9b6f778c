//! The server's NAT address pool: which community holds which ports of
//! which address, and the log that later answers "who had this address
//! and port at that time".
//!
//! The pool is `count` consecutive IPv4 addresses from `base`, each with
//! the dedicated ports `lo..=hi` cut into blocks of `block` ports (a last
//! partial block is not used). A community holds one address (RFC 4787's
//! "paired" pooling: all its flows leave from the same address) and up to
//! [`MAX_NAT_BLOCKS`] blocks on it, which the datapath reads from
//! `S_NAT_BLOCKS` as a [`NatBlocks`].
//!
//! [`NatPool`] only keeps the books and decides ([`NatPool::plan`]): the
//! caller writes the maps and logs each [`Change`] with a [`NatLog`]
//! (RFC 7422's port block logging), which [`who`] reads back.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    fs::{File, OpenOptions},
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bond_common::maps::{MAX_NAT_ADDRESSES, MAX_NAT_BLOCKS, NatBlocks};
use serde::{Deserialize, Serialize, Serializer};

// `NatBlocks::count` is a byte.
const _: () = assert!(MAX_NAT_BLOCKS <= u8::MAX as usize);

/// The NAT address pool and which community holds each of its blocks.
#[derive(Clone, Debug)]
pub struct NatPool {
    /// The pool's first address, as a number.
    base: u32,
    /// Addresses in the pool (1 to `MAX_NAT_ADDRESSES`).
    count: u16,
    /// The dedicated ports of every address: `lo..=hi`.
    lo: u16,
    hi: u16,
    /// Ports per block.
    block: u16,
    /// Whole blocks per address: block `n` is ports
    /// `lo + n * block ..= lo + (n + 1) * block - 1`.
    per_address: u32,
    /// For each address (by index), the community holding each held
    /// block (by block number). A block absent is free.
    owners: Vec<BTreeMap<u32, u32>>,
    /// The communities holding blocks, each with its share.
    shares: BTreeMap<u32, Share>,
}

/// One community's share of the pool: one address and blocks on it.
#[derive(Clone, Debug)]
struct Share {
    /// The address's index in the pool.
    index: u8,
    /// The block numbers held on it (never empty: a community whose last
    /// block goes holds nothing and has no share).
    blocks: BTreeSet<u32>,
}

/// A block handed to a community or taken back from it: what the caller
/// writes to the map and to the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub community: u32,
    /// The pool address the block is on.
    pub address: Ipv4Addr,
    /// The block's ports: `first..=last`.
    pub first: u16,
    pub last: u16,
    pub kind: ChangeKind,
}

/// Whether a [`Change`] handed a block out or took it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Assigned,
    Released,
}

/// Why [`NatPool::assign`] could not give a community its first block:
/// every address of the pool is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// The community that got nothing.
    pub community: u32,
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "community {}: the NAT pool has no free block on any address",
            self.community
        )
    }
}

impl std::error::Error for Exhausted {}

/// Why [`NatPool::grow`] could not give a community one more block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CannotGrow {
    /// The community holds no block, so it has no address to grow on
    /// (it needs [`NatPool::assign`] first).
    HoldsNothing { community: u32 },
    /// The community already holds `MAX_NAT_BLOCKS` blocks, all the map
    /// value has room for.
    MostBlocks { community: u32, address: Ipv4Addr },
    /// Every block of the community's address is taken (paired pooling
    /// keeps a community on one address, so it cannot move to another).
    AddressFull { community: u32, address: Ipv4Addr },
}

impl fmt::Display for CannotGrow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HoldsNothing { community } => {
                write!(f, "community {community}: holds no NAT block to grow from")
            }
            Self::MostBlocks { community, address } => write!(
                f,
                "community {community}: already holds {MAX_NAT_BLOCKS} NAT blocks on {address}, the most it may"
            ),
            Self::AddressFull { community, address } => write!(
                f,
                "community {community}: no free NAT block left on its address {address}"
            ),
        }
    }
}

impl std::error::Error for CannotGrow {}

/// What one community is doing, as the last sweep of the flow table saw
/// it: the input of [`NatPool::plan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live flows of the community.
    pub flows: u32,
    /// Live flows by block (the block's first port); a held block absent
    /// here has none.
    pub by_block: BTreeMap<u16, u32>,
    /// Whether the community has sessions (a logged-on terminal): an
    /// active community keeps its address even with no flows.
    pub active: bool,
}

/// One thing [`NatPool::plan`] advises doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Give the community one more block ([`NatPool::grow`]).
    Grow(u32),
    /// Take back the community's block starting at this port
    /// ([`NatPool::release`]).
    Release(u32, u16),
    /// Take back all the community's blocks ([`NatPool::release_all`]).
    ReleaseAll(u32),
}

impl NatPool {
    /// A pool of `count` addresses from `base`, with dedicated ports
    /// `ports.0..=ports.1` on each, cut into blocks of `block` ports. An
    /// error names the value that does not fit: `count` not in 1..=256,
    /// addresses that run past 255.255.255.255, a first port above the
    /// last, a block of 0 ports or of more than the range holds.
    pub fn new(base: Ipv4Addr, count: u16, ports: (u16, u16), block: u16) -> Result<Self, String> {
        let (lo, hi) = ports;
        if count == 0 || u32::from(count) > MAX_NAT_ADDRESSES {
            return Err(format!(
                "NAT pool: {count} addresses, expected 1 to {MAX_NAT_ADDRESSES}"
            ));
        }
        let base_n = u32::from(base);
        if base_n.checked_add(u32::from(count) - 1).is_none() {
            return Err(format!(
                "NAT pool: {count} addresses from {base} run past 255.255.255.255"
            ));
        }
        if lo > hi {
            return Err(format!(
                "NAT pool: ports {lo}-{hi}: the first is above the last"
            ));
        }
        if block == 0 {
            return Err("NAT pool: blocks of 0 ports".to_string());
        }
        let range = u32::from(hi) - u32::from(lo) + 1;
        if u32::from(block) > range {
            return Err(format!(
                "NAT pool: blocks of {block} ports do not fit in ports {lo}-{hi} ({range} ports)"
            ));
        }
        Ok(Self {
            base: base_n,
            count,
            lo,
            hi,
            block,
            per_address: range / u32::from(block),
            owners: vec![BTreeMap::new(); usize::from(count)],
            shares: BTreeMap::new(),
        })
    }

    /// Blocks in the whole pool, held or free.
    pub fn blocks_total(&self) -> usize {
        usize::from(self.count) * self.per_address as usize
    }

    /// Blocks no community holds.
    pub fn blocks_free(&self) -> usize {
        let held: usize = self.owners.iter().map(BTreeMap::len).sum();
        self.blocks_total() - held
    }

    /// Addresses in the pool.
    pub fn addresses(&self) -> u16 {
        self.count
    }

    /// Ports per block (what `ServerConfig::nat_block` tells the datapath).
    pub fn block(&self) -> u16 {
        self.block
    }

    /// (first dedicated port, ports per block): how a sweep of the flow
    /// table counts flows by block.
    pub fn shape(&self) -> (u16, u16) {
        (self.lo, self.block)
    }

    /// What `community` holds as the datapath reads it (`S_NAT_BLOCKS`):
    /// its address's index and its blocks' first ports, lowest first.
    /// `None` if it holds nothing (its map entry should go).
    pub fn held(&self, community: u32) -> Option<NatBlocks> {
        let share = self.shares.get(&community)?;
        let mut first = [0u16; MAX_NAT_BLOCKS];
        for (slot, &n) in first.iter_mut().zip(&share.blocks) {
            *slot = self.first_port(n);
        }
        Some(NatBlocks {
            index: share.index,
            // At most MAX_NAT_BLOCKS, which fits (asserted below).
            count: share.blocks.len() as u8,
            next: 0,
            first,
        })
    }

    /// The communities holding blocks, in ascending order.
    pub fn communities(&self) -> impl Iterator<Item = u32> {
        self.shares.keys().copied()
    }

    /// Takes back, on a restart, what an earlier agent left in
    /// `S_NAT_BLOCKS` for `community`, so that its flows keep their ports.
    /// The entry is taken whole or not at all: an error names the
    /// community and what is wrong (an address index outside the pool,
    /// more than `MAX_NAT_BLOCKS` blocks, a port that does not start a
    /// block, a block held by another community or listed twice, or a
    /// community that already holds blocks). An entry with no blocks takes
    /// nothing and is no error (the caller should remove it).
    pub fn adopt(&mut self, community: u32, held: &NatBlocks) -> Result<(), String> {
        let refuse =
            |why: String| format!("community {community}: cannot adopt its NAT blocks: {why}");
        if self.shares.contains_key(&community) {
            return Err(refuse("it already holds blocks".to_string()));
        }
        let index = held.index;
        let Some(taken) = self.owners.get(usize::from(index)) else {
            return Err(refuse(format!(
                "address index {index} is outside the pool of {} addresses",
                self.count
            )));
        };
        let count = usize::from(held.count);
        if count > MAX_NAT_BLOCKS {
            return Err(refuse(format!(
                "{count} blocks, more than the {MAX_NAT_BLOCKS} a community may hold"
            )));
        }
        let address = self.address(index);
        let mut blocks = BTreeSet::new();
        for &first in &held.first[..count] {
            let Some(n) = self.block_starting_at(first) else {
                return Err(refuse(format!(
                    "port {first} does not start a block of {} ports in {}-{}",
                    self.block, self.lo, self.hi
                )));
            };
            let last = self.last_port(n);
            if let Some(other) = taken.get(&n) {
                return Err(refuse(format!(
                    "ports {first}-{last} on {address} are held by community {other}"
                )));
            }
            if !blocks.insert(n) {
                return Err(refuse(format!(
                    "ports {first}-{last} on {address} are listed twice"
                )));
            }
        }
        for &n in &blocks {
            self.take(community, index, n);
        }
        Ok(())
    }

    /// Gives `community` its first block: on the address with the most
    /// free blocks (so that communities spread out and each has room to
    /// grow; ties go to the lowest index), the lowest free block there.
    /// `Ok(None)` if it already holds blocks (nothing to do); `Err` if the
    /// pool has no free block.
    pub fn assign(&mut self, community: u32) -> Result<Option<Change>, Exhausted> {
        if self.shares.contains_key(&community) {
            return Ok(None);
        }
        let mut best: Option<(u8, u32)> = None;
        for (taken, index) in self.owners.iter().zip(0..=u8::MAX) {
            let free = self.per_address - taken.len() as u32;
            if free > 0 && best.is_none_or(|(_, most)| free > most) {
                best = Some((index, free));
            }
        }
        let Some((index, _)) = best else {
            return Err(Exhausted { community });
        };
        let Some(n) = self.lowest_free(index) else {
            return Err(Exhausted { community });
        };
        self.take(community, index, n);
        Ok(Some(self.change(community, index, n, ChangeKind::Assigned)))
    }

    /// Gives `community` one more block, the lowest free one on the
    /// address it already has (paired pooling: never another address).
    pub fn grow(&mut self, community: u32) -> Result<Change, CannotGrow> {
        let Some(share) = self.shares.get(&community) else {
            return Err(CannotGrow::HoldsNothing { community });
        };
        let index = share.index;
        let address = self.address(index);
        if share.blocks.len() >= MAX_NAT_BLOCKS {
            return Err(CannotGrow::MostBlocks { community, address });
        }
        let Some(n) = self.lowest_free(index) else {
            return Err(CannotGrow::AddressFull { community, address });
        };
        self.take(community, index, n);
        Ok(self.change(community, index, n, ChangeKind::Assigned))
    }

    /// Takes back `community`'s block starting at port `first`; `None` if
    /// it holds no such block. Its last block going frees its address too:
    /// a later [`NatPool::assign`] may choose another.
    pub fn release(&mut self, community: u32, first: u16) -> Option<Change> {
        let n = self.block_starting_at(first)?;
        let share = self.shares.get_mut(&community)?;
        if !share.blocks.remove(&n) {
            return None;
        }
        let index = share.index;
        if share.blocks.is_empty() {
            self.shares.remove(&community);
        }
        if let Some(taken) = self.owners.get_mut(usize::from(index)) {
            taken.remove(&n);
        }
        Some(self.change(community, index, n, ChangeKind::Released))
    }

    /// Takes back all of `community`'s blocks, lowest first; empty if it
    /// holds none.
    pub fn release_all(&mut self, community: u32) -> Vec<Change> {
        let Some(share) = self.shares.remove(&community) else {
            return Vec::new();
        };
        let mut changes = Vec::with_capacity(share.blocks.len());
        for n in share.blocks {
            if let Some(taken) = self.owners.get_mut(usize::from(share.index)) {
                taken.remove(&n);
            }
            changes.push(self.change(community, share.index, n, ChangeKind::Released));
        }
        changes
    }

    /// The community holding `ip`:`port` now, if any (`None` too for an
    /// address outside the pool or a port outside every block).
    pub fn owner(&self, ip: Ipv4Addr, port: u16) -> Option<u32> {
        let index = u32::from(ip).checked_sub(self.base)?;
        let taken = self.owners.get(usize::try_from(index).ok()?)?;
        taken.get(&self.block_of(port)?).copied()
    }

    /// What to change, from each community's flows (`usage`, by
    /// community); it changes nothing itself. For each community holding
    /// blocks, in ascending order, at most one step:
    ///
    /// - `ReleaseAll` if it has no flows and no sessions (`active` false);
    ///   a community absent from `usage` counts as such.
    /// - `Grow` if its flows are more than half of its capacity (blocks
    ///   held × ports per block), so a burst does not run it out of ports
    ///   before the next plan. One block per plan: the next plan sees the
    ///   new capacity. Left out when [`NatPool::grow`] would fail (already
    ///   `MAX_NAT_BLOCKS`, or its address full): the step could not help.
    /// - `Release` of one block without flows, the highest such, if it
    ///   holds more than one and its flows would stay under a quarter of
    ///   the capacity left: well below the growth mark, so that a
    ///   community does not grow and shrink by turns.
    pub fn plan(&self, usage: &BTreeMap<u32, Usage>) -> Vec<Step> {
        let idle = Usage::default();
        let block = u64::from(self.block);
        let mut steps = Vec::new();
        for (&community, share) in &self.shares {
            let used = usage.get(&community).unwrap_or(&idle);
            let flows = u64::from(used.flows);
            let held = share.blocks.len() as u64;
            if flows == 0 && !used.active {
                steps.push(Step::ReleaseAll(community));
            } else if flows * 2 > held * block {
                if share.blocks.len() < MAX_NAT_BLOCKS && self.lowest_free(share.index).is_some() {
                    steps.push(Step::Grow(community));
                }
            } else if held > 1 && flows * 4 < (held - 1) * block {
                let unused = share
                    .blocks
                    .iter()
                    .rev()
                    .map(|&n| self.first_port(n))
                    .find(|first| used.by_block.get(first).copied().unwrap_or(0) == 0);
                if let Some(first) = unused {
                    steps.push(Step::Release(community, first));
                }
            }
        }
        steps
    }

    /// The pool's address at `index` (within the pool: `new` checked that
    /// the last one does not overflow).
    pub fn address(&self, index: u8) -> Ipv4Addr {
        Ipv4Addr::from(self.base.wrapping_add(u32::from(index)))
    }

    /// The first port of block `n` (`n < per_address`, so at most `hi`).
    fn first_port(&self, n: u32) -> u16 {
        (u32::from(self.lo) + n * u32::from(self.block)) as u16
    }

    /// The last port of block `n`.
    fn last_port(&self, n: u32) -> u16 {
        (u32::from(self.lo) + (n + 1) * u32::from(self.block) - 1) as u16
    }

    /// The block `port` is in, if it is in one.
    fn block_of(&self, port: u16) -> Option<u32> {
        let offset = u32::from(port.checked_sub(self.lo)?);
        let n = offset / u32::from(self.block);
        (n < self.per_address).then_some(n)
    }

    /// The block starting at `port`, if one does.
    fn block_starting_at(&self, port: u16) -> Option<u32> {
        self.block_of(port).filter(|&n| self.first_port(n) == port)
    }

    /// The lowest free block of the address at `index`, if any.
    fn lowest_free(&self, index: u8) -> Option<u32> {
        let taken = self.owners.get(usize::from(index))?;
        // The held block numbers come in order: the first that is not its
        // own position marks a gap.
        let mut n = 0;
        for &held in taken.keys() {
            if held != n {
                break;
            }
            n += 1;
        }
        (n < self.per_address).then_some(n)
    }

    /// Records block `n` of the address at `index` as `community`'s.
    fn take(&mut self, community: u32, index: u8, n: u32) {
        if let Some(taken) = self.owners.get_mut(usize::from(index)) {
            taken.insert(n, community);
        }
        self.shares
            .entry(community)
            .or_insert_with(|| Share {
                index,
                blocks: BTreeSet::new(),
            })
            .blocks
            .insert(n);
    }

    fn change(&self, community: u32, index: u8, n: u32, kind: ChangeKind) -> Change {
        Change {
            community,
            address: self.address(index),
            first: self.first_port(n),
            last: self.last_port(n),
            kind,
        }
    }
}

/// The allocation log: one JSON line per block assigned or released
/// (RFC 7422), so that an abuse report naming an address, a port and a
/// time is answered from it ([`who`]) long after the flows are gone.
#[derive(Debug)]
pub struct NatLog {
    file: File,
}

/// One line of the log, its fields in the order written.
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    /// RFC 3339, UTC, milliseconds.
    time: String,
    event: ChangeKind,
    community: u32,
    address: Ipv4Addr,
    /// `first-last`.
    ports: String,
}

impl NatLog {
    /// Opens the log at `path` to append to it, creating it (mode 0640:
    /// it names who used which address) if it does not exist.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        Ok(Self { file })
    }

    /// Appends `change`, made at `at`, as one line, for example
    /// `{"time":"2026-12-05T13:00:00.123Z","event":"assigned","community":1,"address":"198.51.100.1","ports":"1024-1535"}`,
    /// and flushes it. A time RFC 3339 cannot write (before 1970 or after
    /// 9999) is an `InvalidInput` error.
    pub fn write(&mut self, change: &Change, at: SystemTime) -> io::Result<()> {
        let time = rfc3339(at).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let line = LogLine {
            time,
            event: change.kind,
            community: change.community,
            address: change.address,
            ports: format!("{}-{}", change.first, change.last),
        };
        let mut text = serde_json::to_string(&line)?;
        text.push('\n');
        // One write per line: appends from one process never interleave.
        self.file.write_all(text.as_bytes())?;
        self.file.flush()
    }
}

/// A community that held an address and port, from the log ([`who`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Held {
    pub community: u32,
    /// When its block was assigned.
    #[serde(serialize_with = "serialize_time")]
    pub since: SystemTime,
    /// When it was released; `None` while still held (as far as the log
    /// goes).
    #[serde(serialize_with = "serialize_until")]
    pub until: Option<SystemTime>,
}

/// Who held `address`:`port` at `at`, replaying the log text `log`: each
/// community whose block covering it was assigned at or before `at` and
/// not released until after it (`since <= at < until`), oldest first.
/// Normally none or one. Blank lines are skipped; a line that is not a
/// log line is an error naming its line number.
///
/// Where the log is incomplete: a release with no assignment before it
/// (the log began later) is left out, since when it was held is unknown;
/// a block assigned again to another community while still held (an
/// agent that lost its maps) ends the earlier holding there; assigned
/// again to the same community, the earlier start stands.
pub fn who(log: &str, address: Ipv4Addr, port: u16, at: SystemTime) -> Result<Vec<Held>, String> {
    // Blocks covering address:port held at this point of the log, by
    // (first, last), with their holder and since when.
    let mut open: BTreeMap<(u16, u16), (u32, SystemTime)> = BTreeMap::new();
    let mut found = Vec::new();
    let mut keep = |community: u32, since: SystemTime, until: Option<SystemTime>| {
        if since <= at && until.is_none_or(|until| at < until) {
            found.push(Held {
                community,
                since,
                until,
            });
        }
    };
    for (i, text) in log.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let entry = parse_line(text).map_err(|why| format!("NAT log line {}: {why}", i + 1))?;
        if entry.address != address || port < entry.first || port > entry.last {
            continue;
        }
        let block = (entry.first, entry.last);
        match (entry.kind, open.get(&block).copied()) {
            (ChangeKind::Assigned, Some((community, _))) if community == entry.community => {}
            (ChangeKind::Assigned, Some((community, since))) => {
                keep(community, since, Some(entry.time));
                open.insert(block, (entry.community, entry.time));
            }
            (ChangeKind::Assigned, None) => {
                open.insert(block, (entry.community, entry.time));
            }
            (ChangeKind::Released, Some((community, since))) if community == entry.community => {
                open.remove(&block);
                keep(community, since, Some(entry.time));
            }
            (ChangeKind::Released, _) => {}
        }
    }
    for (community, since) in open.into_values() {
        keep(community, since, None);
    }
    found.sort_by_key(|held| held.since);
    Ok(found)
}

/// `bond-ctl nat who --json`: who held an address and port at a time,
/// times as RFC 3339 text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoReport {
    pub address: Ipv4Addr,
    pub port: u16,
    pub at: String,
    pub held: Vec<HeldRow>,
}

/// One holder in a [`WhoReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRow {
    pub community: u32,
    pub since: String,
    /// None: still held, as far as the log goes.
    pub until: Option<String>,
}

impl WhoReport {
    /// The report of [`who`]'s answer `held` for `address`:`port` at `at`.
    pub fn new(
        address: Ipv4Addr,
        port: u16,
        at: SystemTime,
        held: &[Held],
    ) -> Result<Self, String> {
        Ok(Self {
            address,
            port,
            at: rfc3339(at)?,
            held: held
                .iter()
                .map(|h| {
                    Ok(HeldRow {
                        community: h.community,
                        since: rfc3339(h.since)?,
                        until: h.until.map(rfc3339).transpose()?,
                    })
                })
                .collect::<Result<_, String>>()?,
        })
    }
}

/// A log line read back.
struct Entry {
    time: SystemTime,
    kind: ChangeKind,
    community: u32,
    address: Ipv4Addr,
    first: u16,
    last: u16,
}

/// Reads one line of the log; the error says what is wrong with it.
fn parse_line(text: &str) -> Result<Entry, String> {
    let line: LogLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let time =
        humantime::parse_rfc3339(&line.time).map_err(|e| format!("time {:?}: {e}", line.time))?;
    let bad_ports = || format!("ports {:?}: expected first-last", line.ports);
    let (first, last) = line.ports.split_once('-').ok_or_else(bad_ports)?;
    let first: u16 = first.parse().map_err(|_| bad_ports())?;
    let last: u16 = last.parse().map_err(|_| bad_ports())?;
    if first > last {
        return Err(bad_ports());
    }
    Ok(Entry {
        time,
        kind: line.event,
        community: line.community,
        address: line.address,
        first,
        last,
    })
}

/// How far after 1970 RFC 3339's four-digit years go: the start of 10000.
const RFC3339_END: Duration = Duration::from_secs(253_402_300_800);

/// `at` in RFC 3339, UTC, to the millisecond; an error for a time before
/// 1970 or after 9999 (which the formatter would panic on).
fn rfc3339(at: SystemTime) -> Result<String, String> {
    match at.duration_since(UNIX_EPOCH) {
        Ok(since) if since < RFC3339_END => Ok(humantime::format_rfc3339_millis(at).to_string()),
        _ => Err(format!(
            "{at:?} cannot be written in RFC 3339 (before 1970 or after 9999)"
        )),
    }
}

fn serialize_time<S: Serializer>(at: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*at).map_err(serde::ser::Error::custom)?)
}

fn serialize_until<S: Serializer>(
    until: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match until {
        Some(at) => serialize_time(at, serializer),
        None => serializer.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    /// `count` addresses, ports 1024-2047 in blocks of 256: 4 per address.
    fn pool(count: u16) -> NatPool {
        NatPool::new(BASE, count, (1024, 2047), 256).unwrap()
    }

    fn addr(index: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(BASE) + u32::from(index))
    }

    fn blocks(index: u8, firsts: &[u16]) -> NatBlocks {
        let mut first = [0; MAX_NAT_BLOCKS];
        first[..firsts.len()].copy_from_slice(firsts);
        NatBlocks {
            index,
            count: firsts.len() as u8,
            next: 0,
            first,
        }
    }

    /// The first ports `community` holds, lowest first.
    fn firsts(pool: &NatPool, community: u32) -> Vec<u16> {
        pool.held(community)
            .map(|h| h.first[..usize::from(h.count)].to_vec())
            .unwrap_or_default()
    }

    fn index_of(pool: &NatPool, community: u32) -> u8 {
        pool.held(community).unwrap().index
    }

    #[test]
    fn new_rejects_bad_values() {
        let err = NatPool::new(BASE, 0, (1024, 2047), 256).unwrap_err();
        assert!(err.contains("0 addresses"), "{err}");
        let err = NatPool::new(BASE, 257, (1024, 2047), 256).unwrap_err();
        assert!(err.contains("257 addresses"), "{err}");
        let err =
            NatPool::new(Ipv4Addr::new(255, 255, 255, 255), 2, (1024, 2047), 256).unwrap_err();
        assert!(err.contains("255.255.255.255"), "{err}");
        let err = NatPool::new(BASE, 1, (2048, 1024), 256).unwrap_err();
        assert!(err.contains("2048-1024"), "{err}");
        let err = NatPool::new(BASE, 1, (1024, 2047), 0).unwrap_err();
        assert!(err.contains("0 ports"), "{err}");
        let err = NatPool::new(BASE, 1, (1024, 2047), 1025).unwrap_err();
        assert!(err.contains("1025"), "{err}");

        // The edges that do fit.
        assert!(NatPool::new(Ipv4Addr::new(255, 255, 255, 255), 1, (1024, 2047), 256).is_ok());
        assert!(NatPool::new(Ipv4Addr::new(10, 0, 0, 0), 256, (0, 65535), 1).is_ok());
        let whole = NatPool::new(BASE, 1, (1024, 2047), 1024).unwrap();
        assert_eq!(whole.blocks_total(), 1);
    }

    #[test]
    fn partial_last_block_is_not_used() {
        // 1024 ports in blocks of 300: three blocks, ports 1924-2047 unused.
        let mut pool = NatPool::new(BASE, 2, (1024, 2047), 300).unwrap();
        assert_eq!(pool.block(), 300);
        assert_eq!(pool.blocks_total(), 6);
        assert_eq!(pool.blocks_free(), 6);
        pool.assign(1).unwrap();
        pool.grow(1).unwrap();
        let last = pool.grow(1).unwrap();
        assert_eq!((last.first, last.last), (1624, 1923));
        assert!(matches!(pool.grow(1), Err(CannotGrow::AddressFull { .. })));
        assert_eq!(pool.owner(addr(0), 1923), Some(1));
        assert_eq!(pool.owner(addr(0), 1924), None);
        assert_eq!(pool.blocks_free(), 3);
    }

    #[test]
    fn assign_spreads_over_addresses_most_free_first() {
        let mut pool = pool(3);
        let first = pool.assign(1).unwrap().unwrap();
        assert_eq!(
            first,
            Change {
                community: 1,
                address: addr(0),
                first: 1024,
                last: 1279,
                kind: ChangeKind::Assigned,
            }
        );
        assert_eq!(pool.assign(2).unwrap().unwrap().address, addr(1));
        assert_eq!(pool.assign(3).unwrap().unwrap().address, addr(2));
        // All have 3 free: the lowest index, its lowest free block.
        let fourth = pool.assign(4).unwrap().unwrap();
        assert_eq!((fourth.address, fourth.first), (addr(0), 1280));
        // Address 1 down to 1 free, address 0 has 2, address 2 has 3.
        pool.grow(2).unwrap();
        pool.grow(2).unwrap();
        assert_eq!(pool.assign(5).unwrap().unwrap().address, addr(2));
        assert_eq!(pool.assign(6).unwrap().unwrap().address, addr(0));
        assert_eq!(pool.communities().collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(pool.blocks_free(), 12 - 8);
    }

    #[test]
    fn assign_to_a_holder_does_nothing() {
        let mut pool = pool(2);
        pool.assign(7).unwrap().unwrap();
        let before = pool.held(7);
        assert_eq!(pool.assign(7), Ok(None));
        assert_eq!(pool.held(7), before);
        assert_eq!(pool.blocks_free(), 7);
    }

    #[test]
    fn grow_stays_on_the_same_address() {
        let mut pool = pool(2);
        pool.assign(1).unwrap();
        pool.assign(2).unwrap();
        let grown = pool.grow(2).unwrap();
        assert_eq!(
            grown,
            Change {
                community: 2,
                address: addr(1),
                first: 1280,
                last: 1535,
                kind: ChangeKind::Assigned,
            }
        );
        // Address 0 now has more free blocks; community 2 still grows on 1.
        assert_eq!(pool.grow(2).unwrap().address, addr(1));
        assert_eq!(index_of(&pool, 2), 1);
        assert_eq!(firsts(&pool, 2), [1024, 1280, 1536]);
        assert_eq!(firsts(&pool, 1), [1024]);
        let held = pool.held(2).unwrap();
        assert_eq!(held.count, 3);
        assert!(held.first[3..].iter().all(|&p| p == 0));
    }

    #[test]
    fn exhaustion_of_a_tiny_pool() {
        // One address, two blocks.
        let mut pool = NatPool::new(BASE, 1, (1000, 1099), 50).unwrap();
        assert_eq!(pool.blocks_total(), 2);
        assert!(pool.assign(1).unwrap().is_some());
        assert!(pool.assign(2).unwrap().is_some());
        assert_eq!(pool.blocks_free(), 0);
        let err = pool.assign(3).unwrap_err();
        assert_eq!(err, Exhausted { community: 3 });
        assert!(err.to_string().contains("community 3"), "{err}");
        assert_eq!(pool.held(3), None);

        let err = pool.grow(1).unwrap_err();
        assert_eq!(
            err,
            CannotGrow::AddressFull {
                community: 1,
                address: BASE
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("community 1") && text.contains("198.51.100.1"),
            "{text}"
        );
        assert_eq!(pool.grow(9), Err(CannotGrow::HoldsNothing { community: 9 }));
        assert_eq!(firsts(&pool, 1), [1000]);
    }

    #[test]
    fn at_most_max_blocks() {
        let mut pool = NatPool::new(BASE, 1, (1, 300), 1).unwrap();
        pool.assign(1).unwrap();
        for _ in 1..MAX_NAT_BLOCKS {
            pool.grow(1).unwrap();
        }
        assert_eq!(usize::from(pool.held(1).unwrap().count), MAX_NAT_BLOCKS);
        let err = pool.grow(1).unwrap_err();
        assert_eq!(
            err,
            CannotGrow::MostBlocks {
                community: 1,
                address: BASE
            }
        );
        assert!(
            err.to_string()
                .contains(&format!("{MAX_NAT_BLOCKS} NAT blocks")),
            "{err}"
        );
        assert_eq!(pool.blocks_free(), 300 - MAX_NAT_BLOCKS);
        // Ports 1..=MAX_NAT_BLOCKS, in order.
        let held = pool.held(1).unwrap();
        assert_eq!(
            held.first.to_vec(),
            (1..=MAX_NAT_BLOCKS as u16).collect::<Vec<u16>>()
        );
    }

    #[test]
    fn released_blocks_are_free_again_and_reused() {
        let mut pool = pool(1);
        pool.assign(1).unwrap();
        pool.grow(1).unwrap();
        pool.grow(1).unwrap();
        pool.assign(2).unwrap();
        assert_eq!(pool.blocks_free(), 0);

        // Not its block, not a block start, not held: nothing.
        assert_eq!(pool.release(2, 1280), None);
        assert_eq!(pool.release(1, 1281), None);
        assert_eq!(pool.release(5, 1024), None);

        let released = pool.release(1, 1280).unwrap();
        assert_eq!(
            released,
            Change {
                community: 1,
                address: BASE,
                first: 1280,
                last: 1535,
                kind: ChangeKind::Released,
            }
        );
        assert_eq!(pool.blocks_free(), 1);
        assert_eq!(pool.owner(BASE, 1300), None);
        assert_eq!(firsts(&pool, 1), [1024, 1536]);
        // Community 2 grows into the hole.
        assert_eq!(pool.grow(2).unwrap().first, 1280);

        let all = pool.release_all(1);
        assert_eq!(
            all.iter().map(|c| (c.first, c.kind)).collect::<Vec<_>>(),
            [(1024, ChangeKind::Released), (1536, ChangeKind::Released)]
        );
        assert_eq!(pool.held(1), None);
        assert_eq!(pool.communities().collect::<Vec<_>>(), [2]);
        assert_eq!(pool.blocks_free(), 2);
        assert!(pool.release_all(1).is_empty());

        // A new community takes the lowest freed block.
        assert_eq!(pool.assign(3).unwrap().unwrap().first, 1024);
        assert_eq!(pool.grow(3).unwrap().first, 1536);
    }

    #[test]
    fn releasing_the_last_block_frees_the_address() {
        let mut pool = pool(2);
        pool.assign(1).unwrap();
        pool.assign(2).unwrap();
        pool.grow(1).unwrap();
        pool.release(2, 1024).unwrap();
        assert_eq!(pool.held(2), None);
        assert_eq!(pool.communities().collect::<Vec<_>>(), [1]);
        assert!(matches!(pool.grow(2), Err(CannotGrow::HoldsNothing { .. })));
        // Assigned afresh, on the address with the most free blocks.
        assert_eq!(pool.assign(2).unwrap().unwrap().address, addr(1));
    }

    #[test]
    fn adopt_takes_a_consistent_map() {
        let mut pool = pool(3);
        // Out of order in the map: held() gives them back sorted.
        pool.adopt(4, &blocks(1, &[1536, 1024])).unwrap();
        pool.adopt(5, &blocks(1, &[1280])).unwrap();
        pool.adopt(6, &blocks(0, &[])).unwrap();
        assert_eq!(pool.held(4), Some(blocks(1, &[1024, 1536])));
        assert_eq!(pool.held(5), Some(blocks(1, &[1280])));
        assert_eq!(pool.held(6), None);
        assert_eq!(pool.blocks_free(), 12 - 3);
        assert_eq!(pool.owner(addr(1), 1600), Some(4));
        // Growing continues on its address, into the one block left.
        assert_eq!(pool.grow(5).unwrap().first, 1792);
        assert!(matches!(pool.grow(4), Err(CannotGrow::AddressFull { .. })));
        // New communities go elsewhere.
        assert_eq!(pool.assign(7).unwrap().unwrap().address, addr(0));
    }

    #[test]
    fn adopt_rejects_each_inconsistency_taking_nothing() {
        let mut pool = pool(2);
        pool.adopt(1, &blocks(0, &[1024, 1280])).unwrap();
        let cases: [(u32, NatBlocks, &str); 7] = [
            // A block another community holds.
            (2, blocks(0, &[1536, 1280]), "held by community 1"),
            // The same block twice.
            (2, blocks(0, &[1536, 1536]), "listed twice"),
            // Not on a block boundary.
            (2, blocks(0, &[1536, 1537]), "1537"),
            // Below the range, and past it.
            (2, blocks(0, &[1000]), "1000"),
            (2, blocks(0, &[2048]), "2048"),
            // An address outside the pool.
            (2, blocks(2, &[1024]), "index 2"),
            // Already holding.
            (1, blocks(1, &[1024]), "already holds"),
        ];
        for (community, held, expect) in cases {
            let err = pool.adopt(community, &held).unwrap_err();
            assert!(err.contains(&format!("community {community}")), "{err}");
            assert!(err.contains(expect), "{expect}: {err}");
            assert_eq!(pool.held(2), None, "{expect}");
            assert_eq!(pool.held(1), Some(blocks(0, &[1024, 1280])), "{expect}");
            assert_eq!(pool.blocks_free(), 6, "{expect}");
        }
        let mut too_many = blocks(0, &[]);
        too_many.count = MAX_NAT_BLOCKS as u8 + 1;
        let err = pool.adopt(3, &too_many).unwrap_err();
        assert!(
            err.contains(&format!("{} blocks", MAX_NAT_BLOCKS + 1)),
            "{err}"
        );
        assert_eq!(pool.blocks_free(), 6);
        assert_eq!(pool.communities().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn owner_names_the_holder_of_an_address_and_port() {
        let mut pool = pool(2);
        pool.assign(1).unwrap();
        pool.assign(2).unwrap();
        pool.grow(2).unwrap();
        assert_eq!(pool.owner(addr(0), 1024), Some(1));
        assert_eq!(pool.owner(addr(0), 1279), Some(1));
        assert_eq!(pool.owner(addr(0), 1280), None);
        assert_eq!(pool.owner(addr(1), 1024), Some(2));
        assert_eq!(pool.owner(addr(1), 1535), Some(2));
        assert_eq!(pool.owner(addr(1), 1536), None);
        // Outside the ports, outside the pool.
        assert_eq!(pool.owner(addr(0), 1023), None);
        assert_eq!(pool.owner(addr(0), 65535), None);
        assert_eq!(pool.owner(addr(2), 1024), None);
        assert_eq!(pool.owner(Ipv4Addr::new(198, 51, 100, 0), 1024), None);
        assert_eq!(pool.owner(Ipv4Addr::new(10, 0, 0, 1), 1024), None);
    }

    fn usage(flows: u32, by_block: &[(u16, u32)], active: bool) -> Usage {
        Usage {
            flows,
            by_block: by_block.iter().copied().collect(),
            active,
        }
    }

    #[test]
    fn plan_grows_a_community_past_half_its_capacity() {
        let mut pool = pool(1);
        pool.assign(1).unwrap();
        pool.assign(2).unwrap();
        pool.grow(2).unwrap();
        // 1: 129 of 256 flows; 2: exactly half of 512 is not more.
        let used = BTreeMap::from([
            (1, usage(129, &[(1024, 129)], true)),
            (2, usage(256, &[(1280, 128), (1536, 128)], true)),
        ]);
        assert_eq!(pool.plan(&used), [Step::Grow(1)]);
        // Planning changed nothing.
        assert_eq!(firsts(&pool, 1), [1024]);
        // With the address full, growing could not help: no step.
        pool.grow(1).unwrap();
        let used = BTreeMap::from([(1, usage(300, &[], true)), (2, usage(256, &[], true))]);
        assert_eq!(pool.plan(&used), []);
    }

    #[test]
    fn plan_grows_no_further_than_max_blocks() {
        let mut pool = NatPool::new(BASE, 1, (1, 300), 1).unwrap();
        pool.assign(1).unwrap();
        for _ in 2..MAX_NAT_BLOCKS {
            pool.grow(1).unwrap();
        }
        // Every port of its blocks busy: one short of the most, it grows...
        let used = BTreeMap::from([(1, usage(MAX_NAT_BLOCKS as u32, &[], true))]);
        assert_eq!(pool.plan(&used), [Step::Grow(1)]);
        // ...at the most, it cannot.
        pool.grow(1).unwrap();
        assert_eq!(pool.plan(&used), []);
    }

    #[test]
    fn plan_releases_the_highest_unused_block() {
        let mut pool = pool(1);
        pool.assign(1).unwrap();
        pool.grow(1).unwrap();
        pool.grow(1).unwrap();
        // 3 blocks (768), flows only on the middle one; 2 left hold 512,
        // a quarter of which is 128.
        let used = BTreeMap::from([(1, usage(127, &[(1280, 127)], true))]);
        assert_eq!(pool.plan(&used), [Step::Release(1, 1536)]);
        let used = BTreeMap::from([(1, usage(5, &[(1536, 5)], false))]);
        assert_eq!(pool.plan(&used), [Step::Release(1, 1280)]);
        // At a quarter of what would be left: keep it.
        let used = BTreeMap::from([(1, usage(128, &[(1280, 128)], true))]);
        assert_eq!(pool.plan(&used), []);
        // Every block in use: nothing to release.
        let used = BTreeMap::from([(1, usage(3, &[(1024, 1), (1280, 1), (1536, 1)], true))]);
        assert_eq!(pool.plan(&used), []);
        // Active without flows keeps a block (no release-all), loses one.
        let used = BTreeMap::from([(1, usage(0, &[], true))]);
        assert_eq!(pool.plan(&used), [Step::Release(1, 1536)]);
    }

    #[test]
    fn plan_releases_all_of_an_idle_community() {
        let mut pool = pool(2);
        pool.assign(1).unwrap();
        pool.assign(2).unwrap();
        pool.assign(3).unwrap();
        pool.grow(3).unwrap();
        // 1 has no flows and no sessions; 2 is absent; 3 is busy enough.
        let used = BTreeMap::from([
            (1, usage(0, &[], false)),
            (3, usage(200, &[(1024, 100), (1536, 100)], true)),
            // Holds nothing: not the plan's business.
            (9, usage(0, &[], false)),
        ]);
        assert_eq!(pool.plan(&used), [Step::ReleaseAll(1), Step::ReleaseAll(2)]);
    }

    #[test]
    fn plan_leaves_a_steady_community_alone() {
        let mut pool = pool(1);
        pool.assign(1).unwrap();
        pool.assign(2).unwrap();
        pool.grow(2).unwrap();
        let used = BTreeMap::from([
            // One block, active, no flows: it keeps its block.
            (1, usage(0, &[], true)),
            // Between a quarter and a half: neither grows nor shrinks.
            (2, usage(200, &[(1024, 200)], true)),
        ]);
        assert_eq!(pool.plan(&used), []);
        assert_eq!(pool.plan(&BTreeMap::new()).len(), 2);
        assert_eq!(NatPool::new(BASE, 1, (1, 10), 1).unwrap().plan(&used), []);
    }

    /// A log file of its own for each test, removed when dropped.
    struct TempLog(std::path::PathBuf);

    impl TempLog {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("bond-nat-{}-{name}.log", std::process::id()));
            let _ = std::fs::remove_file(&path);
            Self(path)
        }

        fn text(&self) -> String {
            std::fs::read_to_string(&self.0).unwrap()
        }
    }

    impl Drop for TempLog {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn time(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    fn change(community: u32, ports: (u16, u16), kind: ChangeKind) -> Change {
        Change {
            community,
            address: BASE,
            first: ports.0,
            last: ports.1,
            kind,
        }
    }

    #[test]
    fn log_writes_one_json_line_per_change() {
        use std::os::unix::fs::PermissionsExt as _;

        let file = TempLog::new("lines");
        let mut log = NatLog::open(&file.0).unwrap();
        let at = time("2026-12-05T13:00:00.123Z");
        log.write(&change(1, (1024, 1535), ChangeKind::Assigned), at)
            .unwrap();
        // Reopened: appends.
        drop(log);
        let mut log = NatLog::open(&file.0).unwrap();
        log.write(
            &change(1, (1024, 1535), ChangeKind::Released),
            at + Duration::from_secs(60),
        )
        .unwrap();
        let text = file.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                r#"{"time":"2026-12-05T13:00:00.123Z","event":"assigned","community":1,"address":"198.51.100.1","ports":"1024-1535"}"#,
                r#"{"time":"2026-12-05T13:01:00.123Z","event":"released","community":1,"address":"198.51.100.1","ports":"1024-1535"}"#,
            ]
        );
        assert!(text.ends_with('\n'));
        for line in lines {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["community"], 1);
        }
        let mode = std::fs::metadata(&file.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o137, 0, "mode {mode:o}");
        // A time RFC 3339 cannot write is an error, not a panic.
        let err = log
            .write(
                &change(1, (1024, 1535), ChangeKind::Assigned),
                UNIX_EPOCH - Duration::from_secs(1),
            )
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(file.text().lines().count(), 2);
    }

    #[test]
    fn who_finds_the_holder_at_a_time() {
        let file = TempLog::new("who");
        let mut log = NatLog::open(&file.0).unwrap();
        let t1 = time("2026-12-05T13:00:00Z");
        let t2 = time("2026-12-05T14:00:00Z");
        let t3 = time("2026-12-05T15:00:00Z");
        let block = (1024, 1279);
        let other = (1280, 1535);
        log.write(&change(1, block, ChangeKind::Assigned), t1)
            .unwrap();
        log.write(&change(2, other, ChangeKind::Assigned), t1)
            .unwrap();
        // Same ports on another address.
        let mut elsewhere = change(3, block, ChangeKind::Assigned);
        elsewhere.address = addr(1);
        log.write(&elsewhere, t1).unwrap();
        log.write(&change(1, block, ChangeKind::Released), t2)
            .unwrap();
        log.write(&change(4, block, ChangeKind::Assigned), t3)
            .unwrap();
        let text = file.text();
        let second = Duration::from_secs(1);

        let who_at = |port, at| who(&text, BASE, port, at).unwrap();
        // Before the block's life.
        assert_eq!(who_at(1100, t1 - second), []);
        // During it, from its first instant.
        let first = Held {
            community: 1,
            since: t1,
            until: Some(t2),
        };
        assert_eq!(who_at(1024, t1), [first]);
        assert_eq!(who_at(1279, t2 - second), [first]);
        // Released, not yet reassigned.
        assert_eq!(who_at(1100, t2), []);
        // Reassigned to another community, still held.
        let later = Held {
            community: 4,
            since: t3,
            until: None,
        };
        assert_eq!(who_at(1100, t3), [later]);
        assert_eq!(who_at(1100, t3 + 1000 * second), [later]);
        // The neighbouring block, and the other address.
        assert_eq!(who_at(1280, t2)[0].community, 2);
        assert_eq!(who(&text, addr(1), 1100, t2).unwrap()[0].community, 3);
        // Ports outside every block, and an address never logged.
        assert_eq!(who_at(1536, t2), []);
        assert_eq!(who(&text, addr(2), 1100, t2).unwrap(), []);
    }

    #[test]
    fn who_copes_with_an_incomplete_log() {
        let line = |t: &str, event: &str, community: u32| {
            format!(
                r#"{{"time":"{t}","event":"{event}","community":{community},"address":"198.51.100.1","ports":"1024-1279"}}"#
            )
        };
        let log = [
            // A release whose assignment is before the log: left out.
            line("2026-12-05T12:00:00Z", "released", 9),
            String::new(),
            line("2026-12-05T13:00:00Z", "assigned", 1),
            // Assigned again to the same community: the first start stands.
            line("2026-12-05T13:30:00Z", "assigned", 1),
            // To another while still held: the first holding ends there.
            line("2026-12-05T14:00:00Z", "assigned", 2),
            // A release naming the wrong community: ignored.
            line("2026-12-05T14:30:00Z", "released", 1),
        ]
        .join("\n");
        let at = |t| who(&log, BASE, 1024, time(t)).unwrap();
        assert_eq!(at("2026-12-05T11:00:00Z"), []);
        assert_eq!(
            at("2026-12-05T13:45:00Z"),
            [Held {
                community: 1,
                since: time("2026-12-05T13:00:00Z"),
                until: Some(time("2026-12-05T14:00:00Z")),
            }]
        );
        assert_eq!(
            at("2026-12-05T15:00:00Z"),
            [Held {
                community: 2,
                since: time("2026-12-05T14:00:00Z"),
                until: None,
            }]
        );
    }

    #[test]
    fn who_reports_a_malformed_line() {
        let good = r#"{"time":"2026-12-05T13:00:00.123Z","event":"assigned","community":1,"address":"198.51.100.1","ports":"1024-1535"}"#;
        let at = time("2026-12-05T13:00:01Z");
        let bad_lines = [
            "not json",
            r#"{"time":"yesterday","event":"assigned","community":1,"address":"198.51.100.1","ports":"1024-1535"}"#,
            r#"{"time":"2026-12-05T13:00:00Z","event":"lent","community":1,"address":"198.51.100.1","ports":"1024-1535"}"#,
            r#"{"time":"2026-12-05T13:00:00Z","event":"assigned","community":1,"address":"198.51.100.1","ports":"1535-1024"}"#,
            r#"{"time":"2026-12-05T13:00:00Z","event":"assigned","community":1,"address":"198.51.100.1","ports":"1024"}"#,
            r#"{"time":"2026-12-05T13:00:00Z","event":"assigned","community":1,"address":"198.51.100.1"}"#,
        ];
        for bad in bad_lines {
            let log = format!("{good}\n\n{bad}\n{good}\n");
            let err = who(&log, BASE, 1100, at).unwrap_err();
            assert!(err.contains("line 3"), "{bad}: {err}");
        }
        // Wherever the block: a bad line anywhere fails the replay.
        let log = format!("{good}\n{}\n", bad_lines[0]);
        assert!(who(&log, Ipv4Addr::new(10, 0, 0, 1), 1, at).is_err());
    }

    #[test]
    fn held_and_change_serialize_as_json() {
        let held = Held {
            community: 1,
            since: time("2026-12-05T13:00:00.123Z"),
            until: None,
        };
        assert_eq!(
            serde_json::to_string(&held).unwrap(),
            r#"{"community":1,"since":"2026-12-05T13:00:00.123Z","until":null}"#
        );
        let held = Held {
            until: Some(time("2026-12-05T14:00:00Z")),
            ..held
        };
        assert_eq!(
            serde_json::to_value(held).unwrap()["until"],
            "2026-12-05T14:00:00.000Z"
        );
        let unwritable = Held {
            until: Some(UNIX_EPOCH - Duration::from_secs(1)),
            ..held
        };
        assert!(serde_json::to_string(&unwritable).is_err());
        assert_eq!(
            serde_json::to_string(&change(1, (1024, 1535), ChangeKind::Released)).unwrap(),
            r#"{"community":1,"address":"198.51.100.1","first":1024,"last":1535,"kind":"released"}"#
        );
    }
}
