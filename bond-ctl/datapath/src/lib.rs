//! The control plane's handle on the datapath: loading the objects, and
//! every read and write of their maps.
//!
//! All maps are pinned by name under one directory per instance
//! (`/sys/fs/bpf/bond/<instance>/`). The agent, the operator CLI and the
//! tests all reach them through [`Maps`], so a listing works while the agent
//! runs and the BPF tests configure the programs through the same calls the
//! agent makes.

pub mod ebpf;
pub mod flows;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, Map, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use bond_common::{
    drops,
    edpf::{MAX_PATHS, Paths},
    maps::{
        DirectorConfig, Flow, Flow6, Flow6Key, FlowKey, Hold, Kept, LinkKey, LinkStats,
        MAX_LINK_IDS, Nat6Entry, NatBlocks, NatEntry, NatKey, Neighbor, NodeSlot, RelayLink,
        ServerConfig, ServerLink, Session, SessionKey, TerminalConfig, UpLink, event, name,
    },
};

/// The bpffs mount instances pin under, as `<bpffs>/bond/<instance>/`.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this bond-ctl was built without its eBPF objects (AYA_BUILD_SKIP); rebuild with `cargo xtask build`"
    )]
    NoObjects,
    #[error("loading eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name} not pinned under {dir} (is the agent running? `--instance`?)")]
    NotPinned { name: &'static str, dir: PathBuf },
    #[error(
        "more links than a sender spreads over ({})",
        bond_common::edpf::MAX_PATHS
    )]
    Schedule,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("opening the programs' log: {0}")]
    Log(#[from] aya_log::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The kernel refused a new key because the map holds `max_entries`.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            Error::Map {
                source: aya::maps::MapError::SyscallError(e),
                ..
            } if e.io_error.raw_os_error() == Some(libc::E2BIG)
        )
    }
}

/// The programs' log (aya-log): they log the first packet each CPU drops
/// for each reason, as the reason's number; this names it. Every drop is
/// counted in the maps (`bond-ctl links`); the log says when a new kind of
/// trouble starts.
pub struct DropLog<W> {
    write: W,
}

impl<W: Fn(&str) + Send + Sync> log::Log for DropLog<W> {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let line = match text.parse::<usize>() {
            Ok(n) => match bond_common::drops::NAMES.get(n) {
                Some(name) => format!(
                    "datapath: dropped a packet for {name} (the first on this CPU; \
                     `bond-ctl links` counts them all)"
                ),
                None => format!("datapath: dropped a packet for reason {n}"),
            },
            Err(_) => format!("datapath: {text}"),
        };
        (self.write)(&line);
    }

    fn flush(&self) {}
}

/// Reads the programs' log records from `ebpf`'s log ring. Keep it until
/// the programs are loaded (dropping it closes the ring, and a program
/// that refers to it then fails to load), and read it whenever its file
/// descriptor is readable (`EbpfLogger::flush`).
pub fn drop_log<W: Fn(&str) + Send + Sync>(
    ebpf: &mut Ebpf,
    write: W,
) -> Result<aya_log::EbpfLogger<DropLog<W>>> {
    Ok(aya_log::EbpfLogger::init_with_logger(
        ebpf,
        DropLog { write },
    )?)
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, which the
/// datapath's schedules and holds run on.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Pin directory of an instance.
pub fn pin_dir(bpffs: &Path, instance: &str) -> PathBuf {
    bpffs.join("bond").join(instance)
}

/// `statfs(2)`'s `f_type` for a bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);
/// Held while one process checks and mounts bpffs: agents started at once
/// (the demo starts four) would otherwise each find none and each mount
/// one, and pins made under the first vanish behind the next.
const MOUNT_LOCK: &str = "/run/bond-bpffs.lock";

/// Mounts bpffs at `dir` unless one is mounted there already. Safe across
/// threads and processes: the check and the mount happen under an
/// exclusive `flock` on [`MOUNT_LOCK`], and the check asks the kernel what
/// filesystem `dir` is (its `statfs` magic), not a table that may lag.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    use nix::{
        fcntl::{Flock, FlockArg},
        mount::{MsFlags, mount},
    };
    let is_bpffs =
        |d: &Path| nix::sys::statfs::statfs(d).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if is_bpffs(dir) {
        return Ok(());
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(MOUNT_LOCK)
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening {MOUNT_LOCK}: {e}")))?;
    let _held = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::other(format!("locking {MOUNT_LOCK}: {e}")))?;
    if is_bpffs(dir) {
        return Ok(()); // another process mounted it while we waited
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| std::io::Error::other(format!("mounting bpffs on {}: {e}", dir.display())))?;
    Ok(())
}

/// Pinned maps an agent fills anew at every start, with their entries and
/// value sizes: one pinned by a build that sized it otherwise is unpinned
/// and made again (reused, it would refuse the new slots or the longer
/// value: an upgrade that adds a tail call or a configuration field would
/// not start). All they lose is a terminal's session token (`T_CONFIG`),
/// so a terminal upgraded across such a change logs on anew.
const REFILLED: [(&str, u32, usize); 3] = [
    (name::S_JUMP, bond_common::maps::JUMP_SLOTS, 4),
    (
        name::S_CONFIG,
        1,
        std::mem::size_of::<bond_common::maps::ServerConfig>(),
    ),
    (
        name::T_CONFIG,
        1,
        std::mem::size_of::<bond_common::maps::TerminalConfig>(),
    ),
];

/// Loads an object with all its maps pinned under `dir` (created if
/// needed). Maps already pinned there are reused, not recreated, but for
/// a table of tail calls an older build sized otherwise ([`REFILLED`]).
pub fn load(object: &[u8], dir: &Path) -> Result<Ebpf> {
    load_with_sizes(object, dir, &[])
}

/// As [`load`], with `max_entries` of the maps named in `sizes` set to the
/// given numbers instead of the sizes the object declares. A map already
/// pinned keeps the size it was created with.
pub fn load_with_sizes(object: &[u8], dir: &Path, sizes: &[(&str, u32)]) -> Result<Ebpf> {
    if object.is_empty() {
        return Err(Error::NoObjects);
    }
    std::fs::create_dir_all(dir)?;
    for (name, entries, value) in REFILLED {
        let path = dir.join(name);
        let stale =
            |m: aya::maps::MapInfo| m.max_entries() != entries || m.value_size() as usize != value;
        if aya::maps::MapInfo::from_pin(&path).is_ok_and(stale) {
            std::fs::remove_file(&path)?;
        }
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(dir);
    for &(name, n) in sizes {
        loader.map_max_entries(name, n);
    }
    Ok(loader.load(object)?)
}

/// Fills the server's tail-call table (`S_JUMP`) with the programs of
/// `JUMP_PROGRAMS`, each loaded here if it is not yet. Without them
/// `bond_server` carries no IPv6 and answers no expired packet. Replaces
/// whatever an earlier agent left in the pinned table.
pub fn server_jumps(ebpf: &mut Ebpf) -> Result<()> {
    let mut fds = Vec::new();
    for name in bond_common::maps::JUMP_PROGRAMS {
        let program = |source| Error::Program { name, source };
        let p: &mut aya::programs::Xdp = ebpf
            .program_mut(name)
            .ok_or(Error::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(program)?;
        if p.fd().is_err() {
            p.load().map_err(program)?;
        }
        fds.push(p.fd().map_err(program)?.try_clone()?);
    }
    let map = |source| Error::Map {
        name: name::S_JUMP,
        source,
    };
    let mut jump =
        aya::maps::ProgramArray::try_from(ebpf.map_mut(name::S_JUMP).ok_or(Error::Map {
            name: name::S_JUMP,
            source: aya::maps::MapError::InvalidName {
                name: name::S_JUMP.into(),
            },
        })?)
        .map_err(map)?;
    for (slot, fd) in (0..).zip(&fds) {
        jump.set(slot, fd, 0).map_err(map)?;
    }
    Ok(())
}

/// A flow taken out of the server's tables by [`Maps::remove_flows_if`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemovedFlow {
    pub key: FlowKey,
    /// Its value as last read, just before it was deleted.
    pub flow: Flow,
    /// Whether its dedicated port is free again (its `S_NAT` entry went;
    /// not when `S_NAT` named another flow for it: the port is that flow's).
    pub port_returned: bool,
}

/// Which owner tables: a director's (`D_OWNERS`, `D_NODES`: where it
/// steers), or a tier node's (`S_OWNERS`, `S_NODES`: what it passes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owners {
    Director,
    Node,
}

impl Owners {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Director => (name::D_OWNERS, name::D_NODES),
            Self::Node => (name::S_OWNERS, name::S_NODES),
        }
    }
}

/// The maps of one instance, by pin directory.
#[derive(Clone, Debug)]
pub struct Maps {
    dir: PathBuf,
}

impl Maps {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this instance has the given map (tells terminal from server).
    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    fn open(&self, name: &'static str) -> Result<Map> {
        let path = self.dir.join(name);
        if !path.exists() {
            return Err(Error::NotPinned {
                name,
                dir: self.dir.clone(),
            });
        }
        let data = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        Map::from_map_data(data).map_err(|source| Error::Map { name, source })
    }

    fn array<T: Pod>(&self, name: &'static str) -> Result<Array<MapData, T>> {
        Array::try_from(self.open(name)?).map_err(|source| Error::Map { name, source })
    }

    fn hash<K: Pod, V: Pod>(&self, name: &'static str) -> Result<HashMap<MapData, K, V>> {
        HashMap::try_from(self.open(name)?).map_err(|source| Error::Map { name, source })
    }

    /// Every (key, value) of a hash map.
    fn entries<K: Pod, V: Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        self.hash::<K, V>(name)?
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Map { name, source })
    }

    fn percpu<T: Pod>(&self, name: &'static str) -> Result<PerCpuArray<MapData, T>> {
        PerCpuArray::try_from(self.open(name)?).map_err(|source| Error::Map { name, source })
    }

    fn set<T: Pod>(&self, name: &'static str, idx: u32, v: T) -> Result<()> {
        self.array::<T>(name)?
            .set(idx, v, 0)
            .map_err(|source| Error::Map { name, source })
    }

    fn put<K: Pod, V: Pod>(&self, name: &'static str, k: K, v: V) -> Result<()> {
        self.hash::<K, V>(name)?
            .insert(k, v, 0)
            .map_err(|source| Error::Map { name, source })
    }

    /// Removes a key; a key that is not there is not an error.
    fn remove<K: Pod, V: Pod>(&self, name: &'static str, k: K) -> Result<()> {
        match self.hash::<K, V>(name)?.remove(&k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // aya reports a missing key on delete as the syscall's ENOENT.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(Error::Map { name, source }),
        }
    }

    fn sum_counters(&self, name: &'static str, count: u32) -> Result<Vec<u64>> {
        let map = self.percpu::<u64>(name)?;
        (0..count)
            .map(|i| {
                map.get(&i, 0)
                    .map(|v| v.iter().sum())
                    .map_err(|source| Error::Map { name, source })
            })
            .collect()
    }

    fn sum_link_stats(&self, name: &'static str, idx: u32) -> Result<LinkStats> {
        Ok(self.sum_links_stats(name, [idx])?[0].1)
    }

    /// The counters at each of `idxs`, summed over CPUs, with the map
    /// opened once.
    fn sum_links_stats(
        &self,
        name: &'static str,
        idxs: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<(u32, LinkStats)>> {
        let map = self.percpu::<LinkStats>(name)?;
        idxs.into_iter()
            .map(|idx| {
                let v = map
                    .get(&idx, 0)
                    .map_err(|source| Error::Map { name, source })?;
                let mut total = LinkStats::default();
                v.iter().for_each(|s| total.add(s));
                Ok((idx, total))
            })
            .collect()
    }

    /// A terminal's counters of the links `ids` (its own, say).
    pub fn terminal_links_stats(
        &self,
        ids: impl IntoIterator<Item = u8>,
    ) -> Result<Vec<(u32, LinkStats)>> {
        self.sum_links_stats(name::T_LINK_STATS, ids.into_iter().map(u32::from))
    }

    /// The server's counters of the links at `idxs`.
    pub fn server_links_stats(
        &self,
        idxs: impl IntoIterator<Item = u32>,
    ) -> Result<Vec<(u32, LinkStats)>> {
        self.sum_links_stats(name::S_LINK_STATS, idxs)
    }

    // ------------------------------------------------------------ terminal --

    pub fn set_terminal_config(&self, cfg: TerminalConfig) -> Result<()> {
        self.set(name::T_CONFIG, 0, cfg)
    }

    /// Where the datapath sends DATA for this host to wait its turn
    /// (`T_HOLD` on a terminal, `S_HOLD` on the server).
    pub fn set_hold(&self, map: &'static str, hold: Hold) -> Result<()> {
        self.set(map, 0, hold)
    }

    /// A sender's ring of copies (`S_KEPT` or `T_KEPT`, `crate::resend`),
    /// opened once for the many slots a search reads, and the slot it
    /// writes next (from `S_KEPT_NEXT` or `T_KEPT_NEXT`).
    pub fn kept(
        &self,
        ring: &'static str,
        next: &'static str,
    ) -> Result<(Array<MapData, Kept>, u32)> {
        let at = self
            .array::<u32>(next)?
            .get(&0, 0)
            .map_err(|source| Error::Map { name: next, source })?;
        Ok((self.array::<Kept>(ring)?, at))
    }

    pub fn terminal_config(&self) -> Result<TerminalConfig> {
        self.array::<TerminalConfig>(name::T_CONFIG)?
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: name::T_CONFIG,
                source,
            })
    }

    /// The IPv6 address of own link `link` over IPv6 (`LINK_V6`), the
    /// outer source of what it carries; set before the link's entries.
    pub fn set_link6(&self, link: u8, addr: std::net::Ipv6Addr) -> Result<()> {
        self.set(name::T_LINKS6, u32::from(link), addr.octets())
    }

    pub fn set_up_link(&self, link: u8, entry: UpLink) -> Result<()> {
        self.set(name::T_UP_LINKS, u32::from(link), entry)
    }

    pub fn up_link(&self, link: u8) -> Result<UpLink> {
        self.array::<UpLink>(name::T_UP_LINKS)?
            .get(&u32::from(link), 0)
            .map_err(|source| Error::Map {
                name: name::T_UP_LINKS,
                source,
            })
    }

    /// Sets the upstream links the origin spreads over: `(link, kbit/s,
    /// relative delay in ns)`; rate zero leaves a link out. Links that stay
    /// keep their queue state; none is counted a queue longer than
    /// `backlog_us`.
    pub fn set_up_paths(&self, links: &[(u8, u64, u32)], backlog_us: u32) -> Result<Paths> {
        self.set_up_paths_reordered(links, backlog_us, 0)
    }

    /// As [`Maps::set_up_paths`], for a server whose playout puts right
    /// what arrives up to `reorder_us` late ([`Paths::reorder_us`]).
    pub fn set_up_paths_reordered(
        &self,
        links: &[(u8, u64, u32)],
        backlog_us: u32,
        reorder_us: u32,
    ) -> Result<Paths> {
        let links: Vec<(u32, u64, u32)> = links
            .iter()
            .map(|&(l, k, d)| (u32::from(l), k, d))
            .collect();
        let p = carry_queues(&self.up_paths()?, &links, backlog_us, reorder_us)?;
        self.set(name::T_PATHS, 0, p)?;
        Ok(p)
    }

    /// Charges a probe train sent on an own link to its upstream queue
    /// ([`Paths::charge`]); when the train will have left, if the link is
    /// in the schedule. A read-modify-write of the whole schedule: picks
    /// the datapath makes meanwhile on other links may be counted short.
    pub fn charge_up_path(&self, link: u8, count: u32, len: u32) -> Result<Option<u64>> {
        let mut p = self.up_paths()?;
        let left = p.charge(u32::from(link), monotonic_ns(), count, len);
        if left.is_some() {
            self.set(name::T_PATHS, 0, p)?;
        }
        Ok(left)
    }

    /// Picks the link where `len` bytes (the whole frame) sent upstream now
    /// arrive first, and counts them into its queue, as `bond_wrap` does.
    pub fn pick_up_path(&self, len: u32) -> Result<Option<u8>> {
        let mut p = self.up_paths()?;
        let Ok(id) = p.pick(monotonic_ns(), len) else {
            return Ok(None);
        };
        self.set(name::T_PATHS, 0, p)?;
        Ok(Some(id as u8))
    }

    /// Writes the upstream schedule back whole (after `Paths::correct`).
    pub fn put_up_paths(&self, p: Paths) -> Result<()> {
        self.set(name::T_PATHS, 0, p)
    }

    pub fn up_paths(&self) -> Result<Paths> {
        self.array::<Paths>(name::T_PATHS)?
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: name::T_PATHS,
                source,
            })
    }

    /// Takes a link out of use (after the schedule stopped naming it).
    pub fn clear_up_link(&self, link: u8) -> Result<()> {
        let mut e = self.up_link(link)?;
        e.flags = 0;
        self.set_up_link(link, e)
    }

    pub fn set_relay_link(&self, port: u16, entry: RelayLink) -> Result<()> {
        self.put(name::T_RELAY, port, entry)
    }

    pub fn set_neighbor(&self, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        self.put(name::T_NEIGH, u32::from(ip), Neighbor { mac, _pad: [0; 2] })
    }

    pub fn remove_neighbor(&self, ip: Ipv4Addr) -> Result<()> {
        self.remove::<u32, Neighbor>(name::T_NEIGH, u32::from(ip))
    }

    pub fn neighbor(&self, ip: Ipv4Addr) -> Result<Option<[u8; 6]>> {
        let map = self.hash::<u32, Neighbor>(name::T_NEIGH)?;
        match map.get(&u32::from(ip), 0) {
            Ok(n) => Ok(Some(n.mac)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: name::T_NEIGH,
                source,
            }),
        }
    }

    /// Per-link counters of a terminal, summed over CPUs, for links with
    /// any traffic or a valid entry: (link, in use, counters).
    pub fn terminal_link_stats(&self) -> Result<Vec<(u8, bool, LinkStats)>> {
        let links = self.array::<UpLink>(name::T_UP_LINKS)?;
        let stats = self.percpu::<LinkStats>(name::T_LINK_STATS)?;
        let mut out = Vec::new();
        for i in 0..MAX_LINK_IDS {
            let valid = links.get(&i, 0).map(|l| l.flags != 0).unwrap_or(false);
            let v = stats.get(&i, 0).map_err(|source| Error::Map {
                name: name::T_LINK_STATS,
                source,
            })?;
            let mut total = LinkStats::default();
            v.iter().for_each(|s| total.add(s));
            if valid || total != LinkStats::default() {
                out.push((i as u8, valid, total));
            }
        }
        Ok(out)
    }

    pub fn terminal_drops(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(drops::NAMES
            .into_iter()
            .zip(self.sum_counters(name::T_DROPS, drops::COUNT)?)
            .collect())
    }

    // -------------------------------------------------------------- server --

    pub fn set_server_config(&self, cfg: ServerConfig) -> Result<()> {
        self.set(name::S_CONFIG, 0, cfg)
    }

    pub fn server_config(&self) -> Result<ServerConfig> {
        self.array::<ServerConfig>(name::S_CONFIG)?
            .get(&0, 0)
            .map_err(|source| Error::Map {
                name: name::S_CONFIG,
                source,
            })
    }

    pub fn set_session(&self, community: u32, origin: Ipv4Addr, token: u64) -> Result<()> {
        let key = SessionKey::new(community, u32::from(origin));
        self.put(name::S_SESSIONS, key, Session { token, _pad: 0 })
    }

    /// Makes the server's destination policy exactly `prefixes` (address,
    /// length): members' packets to any of them are dropped (`denied`).
    /// New prefixes go in before old ones leave, so no destination is let
    /// through in between that both lists deny.
    pub fn set_deny(&self, prefixes: &[(Ipv4Addr, u8)]) -> Result<()> {
        let name = name::S_DENY;
        let err = |source| Error::Map { name, source };
        let mut trie: LpmTrie<MapData, [u8; 4], u8> =
            LpmTrie::try_from(self.open(name)?).map_err(err)?;
        let key = |&(a, l): &(Ipv4Addr, u8)| Key::new(u32::from(l), a.octets());
        for p in prefixes {
            trie.insert(&key(p), 1, 0).map_err(err)?;
        }
        let old = self.deny()?;
        for p in old.iter().filter(|p| !prefixes.contains(p)) {
            trie.remove(&key(p)).map_err(err)?;
        }
        Ok(())
    }

    /// The server's destination policy: (address, length) of each prefix.
    pub fn deny(&self) -> Result<Vec<(Ipv4Addr, u8)>> {
        let name = name::S_DENY;
        let err = |source| Error::Map { name, source };
        let trie: LpmTrie<MapData, [u8; 4], u8> =
            LpmTrie::try_from(self.open(name)?).map_err(err)?;
        let mut out = Vec::new();
        for k in trie.keys() {
            let k = k.map_err(err)?;
            out.push((Ipv4Addr::from(k.data()), k.prefix_len() as u8));
        }
        out.sort();
        Ok(out)
    }

    /// As [`Self::set_deny`], for IPv6 destinations (`S_DENY6`).
    pub fn set_deny6(&self, prefixes: &[(Ipv6Addr, u8)]) -> Result<()> {
        let name = name::S_DENY6;
        let err = |source| Error::Map { name, source };
        let mut trie: LpmTrie<MapData, [u8; 16], u8> =
            LpmTrie::try_from(self.open(name)?).map_err(err)?;
        let key = |&(a, l): &(Ipv6Addr, u8)| Key::new(u32::from(l), a.octets());
        for p in prefixes {
            trie.insert(&key(p), 1, 0).map_err(err)?;
        }
        let old = self.deny6()?;
        for p in old.iter().filter(|p| !prefixes.contains(p)) {
            trie.remove(&key(p)).map_err(err)?;
        }
        Ok(())
    }

    /// The server's IPv6 destination policy: (address, length) of each prefix.
    pub fn deny6(&self) -> Result<Vec<(Ipv6Addr, u8)>> {
        let name = name::S_DENY6;
        let err = |source| Error::Map { name, source };
        let trie: LpmTrie<MapData, [u8; 16], u8> =
            LpmTrie::try_from(self.open(name)?).map_err(err)?;
        let mut out = Vec::new();
        for k in trie.keys() {
            let k = k.map_err(err)?;
            out.push((Ipv6Addr::from(k.data()), k.prefix_len() as u8));
        }
        Ok(out)
    }

    pub fn remove_session(&self, community: u32, origin: Ipv4Addr) -> Result<()> {
        let key = SessionKey::new(community, u32::from(origin));
        self.remove::<SessionKey, Session>(name::S_SESSIONS, key)?;
        self.remove::<SessionKey, u64>(name::S_ORIGIN_FLOWS, key)
    }

    /// Writes the flows each origin holds as a sweep counted them (origins
    /// not in `counts` hold none), correcting the program's running count.
    pub fn recount_origin_flows(
        &self,
        counts: &std::collections::HashMap<SessionKey, u64>,
    ) -> Result<()> {
        let n = name::S_ORIGIN_FLOWS;
        // Only origins with a session have an entry: the map is as big as
        // the session table, and the flows of an origin that left (still
        // in the table until they expire) must not take a newcomer's entry.
        let sessions: std::collections::HashSet<SessionKey> = self
            .hash::<SessionKey, Session>(name::S_SESSIONS)?
            .keys()
            .filter_map(|k| k.ok())
            .collect();
        let mut map = self.hash::<SessionKey, u64>(n)?;
        let known: Vec<SessionKey> = map.keys().filter_map(|k| k.ok()).collect();
        for k in &known {
            if !sessions.contains(k) {
                self.remove::<SessionKey, u64>(n, *k)?;
            } else if !counts.contains_key(k) {
                map.insert(*k, 0, 0)
                    .map_err(|source| Error::Map { name: n, source })?;
            }
        }
        for (k, v) in counts.iter().filter(|(k, _)| sessions.contains(k)) {
            map.insert(*k, *v, 0)
                .map_err(|source| Error::Map { name: n, source })?;
        }
        Ok(())
    }

    /// Takes the link at `idx` out of use (after the schedule stopped
    /// naming it): invalid entry, no index.
    pub fn clear_server_link(&self, idx: u32) -> Result<()> {
        let mut link = self.server_link(idx)?;
        let key = LinkKey::new(link.community, link.link);
        link.flags = 0;
        self.set(name::S_LINKS, idx, link)?;
        self.remove::<LinkKey, u32>(name::S_LINK_INDEX, key)
    }

    /// Registers a community link at dense index `idx`.
    pub fn set_server_link(&self, idx: u32, link: ServerLink) -> Result<()> {
        self.set(name::S_LINKS, idx, link)?;
        let key = LinkKey::new(link.community, link.link);
        self.put(name::S_LINK_INDEX, key, idx)
    }

    /// Registers link `idx` as one over IPv6 (`LINK_V6`): its address in
    /// `S_LINKS6`, written before the link itself so the datapath never
    /// sees the link without it.
    pub fn set_server_link6(
        &self,
        idx: u32,
        addr: std::net::Ipv6Addr,
        link: ServerLink,
    ) -> Result<()> {
        self.set(name::S_LINKS6, idx, addr.octets())?;
        self.set_server_link(
            idx,
            ServerLink {
                ip: 0,
                flags: link.flags | bond_common::maps::LINK_V6,
                ..link
            },
        )
    }

    /// The IPv6 address of link `idx` over IPv6 ([`Self::set_server_link6`]).
    pub fn server_link6(&self, idx: u32) -> Result<std::net::Ipv6Addr> {
        self.array::<[u8; 16]>(name::S_LINKS6)?
            .get(&idx, 0)
            .map(std::net::Ipv6Addr::from)
            .map_err(|source| Error::Map {
                name: name::S_LINKS6,
                source,
            })
    }

    pub fn server_link(&self, idx: u32) -> Result<ServerLink> {
        self.array::<ServerLink>(name::S_LINKS)?
            .get(&idx, 0)
            .map_err(|source| Error::Map {
                name: name::S_LINKS,
                source,
            })
    }

    /// Sets the links a community's downstream is spread over: `(dense
    /// link index, kbit/s, relative delay in ns)`, as [`Self::set_up_paths`].
    pub fn set_down_paths(
        &self,
        community: u32,
        links: &[(u32, u64, u32)],
        backlog_us: u32,
        reorder_us: u32,
    ) -> Result<Paths> {
        let old = self.down_paths(community)?.unwrap_or(Paths::EMPTY);
        let p = carry_queues(&old, links, backlog_us, reorder_us)?;
        self.put(name::S_PATHS, community, p)?;
        Ok(p)
    }

    /// Charges a probe train sent on server link `idx` to its downstream
    /// queue, as [`Maps::charge_up_path`] does upstream.
    pub fn charge_down_path(
        &self,
        community: u32,
        idx: u32,
        count: u32,
        len: u32,
    ) -> Result<Option<u64>> {
        let Some(mut p) = self.down_paths(community)? else {
            return Ok(None);
        };
        let left = p.charge(idx, monotonic_ns(), count, len);
        if left.is_some() {
            self.put(name::S_PATHS, community, p)?;
        }
        Ok(left)
    }

    /// Picks the link where `len` bytes (the whole frame) sent now on
    /// community `community`'s downstream arrive first, and counts them
    /// into its queue, as the datapath does for each packet.
    pub fn pick_down_path(&self, community: u32, len: u32) -> Result<Option<u32>> {
        let Some(mut p) = self.down_paths(community)? else {
            return Ok(None);
        };
        let Ok(idx) = p.pick(monotonic_ns(), len) else {
            return Ok(None);
        };
        self.put(name::S_PATHS, community, p)?;
        Ok(Some(idx))
    }

    /// Writes a community's downstream schedule back whole (after
    /// `Paths::correct`).
    pub fn put_down_paths(&self, community: u32, p: Paths) -> Result<()> {
        self.put(name::S_PATHS, community, p)
    }

    pub fn down_paths(&self, community: u32) -> Result<Option<Paths>> {
        match self.hash::<u32, Paths>(name::S_PATHS)?.get(&community, 0) {
            Ok(s) => Ok(Some(s)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: name::S_PATHS,
                source,
            }),
        }
    }

    pub fn sessions(&self) -> Result<Vec<(SessionKey, Session)>> {
        self.entries(name::S_SESSIONS)
    }

    /// Gives `community` its share of the NAT pool (address and port
    /// blocks), replacing what it held.
    pub fn set_nat_blocks(&self, community: u32, share: &NatBlocks) -> Result<()> {
        let n = name::S_NAT_BLOCKS;
        self.hash::<u32, NatBlocks>(n)?
            .insert(community, share, 0)
            .map_err(|source| Error::Map { name: n, source })
    }

    /// Takes `community`'s share of the NAT pool away (already gone: fine).
    pub fn remove_nat_blocks(&self, community: u32) -> Result<()> {
        let n = name::S_NAT_BLOCKS;
        match self.hash::<u32, NatBlocks>(n)?.remove(&community) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map { name: n, source }),
        }
    }

    /// Every community's share of the NAT pool.
    pub fn nat_blocks(&self) -> Result<Vec<(u32, NatBlocks)>> {
        self.entries(name::S_NAT_BLOCKS)
    }

    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        self.entries(name::S_FLOWS)
    }

    /// The reverse map: (protocol, dedicated port) -> origin flow.
    pub fn nat_entries(&self) -> Result<Vec<(NatKey, NatEntry)>> {
        self.entries(name::S_NAT)
    }

    /// Removes each flow of `keys` whose value, read again just before the
    /// delete, still satisfies `expired` (so one that came alive again is
    /// kept): first its `S_FLOWS` entry, then its `S_NAT` entry, which
    /// frees its port. In this order a packet that arrives meanwhile never
    /// meets a half-removed flow it could corrupt: upstream it makes a new
    /// flow with another port; a reply still finds its `S_NAT` entry until
    /// that goes; and the port is claimed again (the program claims a port
    /// by writing its `S_NAT` entry) only once nothing refers to it. Keys
    /// already gone are skipped.
    pub fn remove_flows_if(
        &self,
        keys: impl IntoIterator<Item = FlowKey>,
        expired: impl Fn(&FlowKey, &Flow) -> bool,
    ) -> Result<Vec<RemovedFlow>> {
        self.remove_if::<FlowKey, Flow, NatEntry>(
            (name::S_FLOWS, name::S_NAT),
            keys,
            |k, f| expired(k, f),
            |f| (f.nat_index, f.nat_port),
            |k| k.proto,
            |k, e| e.origin == k.origin && e.community == k.community && e.port == k.port,
        )
        .map(|v| {
            v.into_iter()
                .map(|(key, flow, port_returned)| RemovedFlow {
                    key,
                    flow,
                    port_returned,
                })
                .collect()
        })
    }

    /// Every IPv6 flow: (key, state).
    pub fn flows6(&self) -> Result<Vec<(Flow6Key, Flow6)>> {
        self.entries(name::S_FLOWS6)
    }

    /// As [`Self::remove_flows_if`], for IPv6 flows (`S_FLOWS6`, `S_NAT6`). Each removed flow is reported
    /// by its IPv4-shaped key (community, protocol, origin, port).
    pub fn remove_flows6_if(
        &self,
        keys: impl IntoIterator<Item = Flow6Key>,
        expired: impl Fn(&Flow6Key, &Flow6) -> bool,
    ) -> Result<Vec<RemovedFlow>> {
        self.remove_if::<Flow6Key, Flow6, Nat6Entry>(
            (name::S_FLOWS6, name::S_NAT6),
            keys,
            expired,
            |f| (0, f.flow.nat_port),
            |k| k.proto,
            |k, e| {
                e.origin == k.origin
                    && e.community == k.community
                    && e.port == k.port
                    && e.src == k.src
            },
        )
        .map(|v| {
            v.into_iter()
                .map(|(key, flow, port_returned)| RemovedFlow {
                    key: key.v4_shape(),
                    flow: flow.flow,
                    port_returned,
                })
                .collect()
        })
    }

    /// The removal both families share (see [`Self::remove_flows_if`]):
    /// `nat` reads a flow's pool address and port, `proto` its protocol,
    /// `ours` says whether a NAT entry is the flow's.
    fn remove_if<K: Pod, V: Pod, N: Pod>(
        &self,
        (fname, nname): (&'static str, &'static str),
        keys: impl IntoIterator<Item = K>,
        expired: impl Fn(&K, &V) -> bool,
        nat_port: impl Fn(&V) -> (u8, u16),
        proto: impl Fn(&K) -> u8,
        ours: impl Fn(&K, &N) -> bool,
    ) -> Result<Vec<(K, V, bool)>> {
        use aya::maps::MapError::KeyNotFound;
        let err = |name: &'static str| move |source| Error::Map { name, source };
        let mut flows = self.hash::<K, V>(fname)?;
        let mut nat = self.hash::<NatKey, N>(nname)?;
        let mut out = Vec::new();
        for key in keys {
            let flow = match flows.get(&key, 0) {
                Err(KeyNotFound) => continue,
                r => r.map_err(err(fname))?,
            };
            if !expired(&key, &flow) {
                continue;
            }
            match flows.remove(&key) {
                Err(KeyNotFound) => continue,
                r => r.map_err(err(fname))?,
            }
            let (index, port) = nat_port(&flow);
            let nkey = NatKey {
                proto: proto(&key),
                index,
                port,
            };
            let mine = match nat.get(&nkey, 0) {
                // Gone already (the program writes it before the flow):
                // the port is free.
                Err(KeyNotFound) => true,
                r => ours(&key, &r.map_err(err(nname))?),
            };
            if mine {
                match nat.remove(&nkey) {
                    Ok(()) | Err(KeyNotFound) => {}
                    Err(e) => return Err(err(nname)(e)),
                }
            }
            out.push((key, flow, mine));
        }
        Ok(out)
    }

    /// Every registered community link: (key, dense index).
    pub fn server_link_index(&self) -> Result<Vec<(LinkKey, u32)>> {
        self.entries(name::S_LINK_INDEX)
    }

    pub fn server_link_stats(&self, idx: u32) -> Result<LinkStats> {
        self.sum_link_stats(name::S_LINK_STATS, idx)
    }

    pub fn server_drops(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(drops::NAMES
            .into_iter()
            .zip(self.sum_counters(name::S_DROPS, drops::COUNT)?)
            .collect())
    }

    /// The director's front address and port (`D_CONFIG`).
    pub fn set_director_config(&self, cfg: DirectorConfig) -> Result<()> {
        self.set(name::D_CONFIG, 0, cfg)
    }

    /// Community `community`'s owner in `table`: node slot `node` (None:
    /// no owner at a director; this node's own, or no one's, at a node).
    pub fn set_owner(&self, table: Owners, community: u32, node: Option<u32>) -> Result<()> {
        let name = table.names().0;
        let mut owners = self.hash::<u32, u32>(name)?;
        match node {
            Some(n) => owners.insert(community, n + 1, 0),
            None => match owners.remove(&community) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        }
        .map_err(|source| Error::Map { name, source })
    }

    /// The owners `table` holds now: (community, node slot) of every
    /// community that has one (an agent adopting the maps starts from
    /// them, so that what the registry no longer says is cleared).
    pub fn owners(&self, table: Owners) -> Result<Vec<(u32, u32)>> {
        let all: Vec<(u32, u32)> = self.entries(table.names().0)?;
        Ok(all
            .into_iter()
            .filter_map(|(c, v)| Some((c, v.checked_sub(1)?)))
            .collect())
    }

    /// Node slot `idx` of `table`: where its packets go
    /// (`NodeSlot::default()`: nowhere).
    pub fn set_node(&self, table: Owners, idx: u32, slot: NodeSlot) -> Result<()> {
        self.set(table.names().1, idx, slot)
    }

    /// At a node: whether frames from `mac` come from another node (what
    /// it passed on is not passed on again).
    pub fn set_node_mac(&self, mac: [u8; 6], node: bool) -> Result<()> {
        let key = bond_common::maps::mac_key(mac);
        match node {
            true => self.put(name::S_NODE_MACS, key, 1u32),
            false => self.remove::<u64, u32>(name::S_NODE_MACS, key),
        }
    }

    /// Packets and bytes steered to node slot `idx` (`up_pkts`, `up_bytes`).
    pub fn director_stats(&self, idx: u32) -> Result<LinkStats> {
        self.sum_link_stats(name::D_STATS, idx)
    }

    pub fn director_drops(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(drops::NAMES
            .into_iter()
            .zip(self.sum_counters(name::D_DROPS, drops::COUNT)?)
            .collect())
    }

    pub fn server_events(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(event::NAMES
            .into_iter()
            .zip(self.sum_counters(name::S_EVENTS, event::COUNT)?)
            .collect())
    }
}

/// New paths for `links`, each keeping the virtual finish time and the
/// jitter it had in `old` (a rate or delay update must not forget what is
/// queued, nor what the feedback found). A sender
/// spreads over at most [`MAX_PATHS`] links: beyond that, the fastest.
fn carry_queues(
    old: &Paths,
    links: &[(u32, u64, u32)],
    backlog_us: u32,
    reorder_us: u32,
) -> Result<Paths> {
    let mut links = links.to_vec();
    if links.len() > MAX_PATHS {
        links.sort_by_key(|l| std::cmp::Reverse(l.1));
        links.truncate(MAX_PATHS);
    }
    let mut p = Paths::from_links(&links).map_err(|_| Error::Schedule)?;
    p.backlog_us = backlog_us;
    p.reorder_us = reorder_us;
    let n = p.len as usize;
    for new in &mut p.paths[..n] {
        if let Some(o) = old.links().find(|o| o.id == new.id) {
            new.finish_ns = o.finish_ns;
            new.extra_ns = o.extra_ns;
        }
    }
    Ok(p)
}
