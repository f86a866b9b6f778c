//! One server object as the agent loads it, and the calls that run
//! packets through it and read its maps.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use bond_datapath::{self as datapath, Maps};

/// One loaded server object with its maps pinned in a directory of its
/// own. Fields drop in order: the object (programs, map fds) first, then
/// the pins, which frees the maps.
pub(super) struct Server {
    pub(super) ebpf: Ebpf,
    pub(super) maps: Maps,
    pub(super) _pin: PinDir,
}

/// What one table state (empty or full) measured: medians over the
/// interleaved rounds.
pub(super) struct Phase {
    /// The K packets that create flows, and the same packets again.
    pub(super) new: Pass,
    pub(super) hit: Pass,
    /// Established flows, upstream and downstream: one flow over and over,
    /// and K flows in turn (at the full table drawn from all of it).
    pub(super) hot_up: Pass,
    pub(super) hot_down: Pass,
    pub(super) spread_up: Pass,
    pub(super) spread_down: Pass,
    /// The harness's own cost at this point of the run.
    pub(super) floor: Pass,
    /// The widest spread between rounds of any of the above: (slowest -
    /// fastest) / median, of the kernel times.
    pub(super) noise: f64,
}

/// Per-call timings of one pass over a list of frames.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pass {
    /// Mean of the kernel's timing of each single run, ns.
    pub(super) kernel_ns: f64,
    /// 99th percentile of the same.
    pub(super) p99_ns: f64,
    /// Mean wall-clock time of one BPF_PROG_TEST_RUN call, ns.
    pub(super) wall_ns: f64,
}

/// Drop and event counters, summed over CPUs.
pub(super) struct Counters {
    pub(super) drops: BTreeMap<&'static str, u64>,
    pub(super) events: BTreeMap<&'static str, u64>,
}

impl Counters {
    pub(super) fn event(&self, name: &str) -> u64 {
        self.events.get(name).copied().unwrap_or(0)
    }
}

impl Server {
    /// Loads the server object with `sizes`, as the agent does, and its
    /// XDP program; returns it and how long the load took.
    pub(super) fn load(tag: &str, sizes: &[(&str, u32)]) -> Result<(Self, Duration)> {
        let pin = PinDir::new(tag)?;
        let start = Instant::now();
        let mut ebpf = datapath::load_with_sizes(bond_datapath::ebpf::SERVER, pin.path(), sizes)
            .context("loading the server object")?;
        let prog: &mut Xdp = ebpf
            .program_mut("bond_server")
            .context("bond_server is not in the server object")?
            .try_into()
            .context("bond_server is not an XDP program")?;
        prog.load().context("loading bond_server (verifier)")?;
        let took = start.elapsed();
        let maps = Maps::new(pin.path());
        Ok((
            Self {
                ebpf,
                maps,
                _pin: pin,
            },
            took,
        ))
    }

    pub(super) fn ebpf_xdp(&self) -> Result<&Xdp> {
        self.ebpf
            .program("bond_server")
            .context("bond_server is not in the server object")?
            .try_into()
            .context("bond_server is not an XDP program")
    }

    /// Runs the program once on `frame`: (verdict, in-kernel ns).
    pub(super) fn run(&self, p: &Xdp, frame: &[u8]) -> Result<(u32, u32)> {
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of bond_server")?;
        Ok((r.return_value, r.duration.as_nanos() as u32))
    }

    /// Runs the program once on `frame`: (verdict, output frame).
    pub(super) fn run_out(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; 2048];
        let r = self
            .ebpf_xdp()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of bond_server")?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }

    /// Runs every frame once, in order, expecting verdict `want` for each.
    pub(super) fn pass<'f>(
        &self,
        frames: impl ExactSizeIterator<Item = &'f [u8]>,
        want: u32,
    ) -> Result<Pass> {
        let p = self.ebpf_xdp()?;
        let total = frames.len();
        let mut ns = Vec::with_capacity(total);
        let start = Instant::now();
        for (i, f) in frames.enumerate() {
            let (v, t) = self.run(p, f)?;
            if v != want {
                let c = self.counters()?;
                let drops: Vec<_> = c.drops.iter().filter(|d| *d.1 > 0).collect();
                bail!(
                    "frame {i} of {total}: verdict {v}, expected {want} (drops so far: {drops:?}, events: {:?})",
                    c.events
                );
            }
            ns.push(t);
        }
        let wall = start.elapsed();
        let count = total.max(1) as f64;
        ns.sort_unstable();
        Ok(Pass {
            kernel_ns: ns.iter().map(|&t| f64::from(t)).sum::<f64>() / count,
            p99_ns: ns
                .get(ns.len() * 99 / 100)
                .map(|&t| f64::from(t))
                .unwrap_or(0.0),
            wall_ns: wall.as_nanos() as f64 / count,
        })
    }

    pub(super) fn counters(&self) -> Result<Counters> {
        Ok(Counters {
            drops: self
                .maps
                .server_drops()
                .context("reading S_DROPS")?
                .into_iter()
                .collect(),
            events: self
                .maps
                .server_events()
                .context("reading S_EVENTS")?
                .into_iter()
                .collect(),
        })
    }

    /// Fails unless no packet was dropped, none took the slow path and no
    /// two CPUs raced for a flow: otherwise a figure timed the wrong path.
    pub(super) fn expect_clean(&self, when: &str) -> Result<()> {
        let c = self.counters()?;
        let drops: Vec<_> = c.drops.iter().filter(|d| *d.1 > 0).collect();
        ensure!(drops.is_empty(), "{when}: drops {drops:?}");
        for e in ["slow_path", "flow_race"] {
            ensure!(
                c.event(e) == 0,
                "{when}: {} packets counted as {e}",
                c.event(e)
            );
        }
        Ok(())
    }

    /// A pinned hash map of this server, opened as the agent opens it.
    pub(super) fn hash<K: aya::Pod, V: aya::Pod>(
        &self,
        map: &str,
    ) -> Result<HashMap<MapData, K, V>> {
        let path = self.maps.dir().join(map);
        let data = MapData::from_pin(&path).with_context(|| format!("opening {map}"))?;
        let m = Map::from_map_data(data).with_context(|| format!("opening {map}"))?;
        HashMap::try_from(m).with_context(|| format!("{map} as a hash map"))
    }

    /// Entries of a hash map, by walking its keys.
    pub(super) fn count<K: aya::Pod, V: aya::Pod>(&self, map: &str) -> Result<u32> {
        let h = self.hash::<K, V>(map)?;
        let mut n = 0u32;
        for k in h.keys() {
            k.with_context(|| format!("walking {map}"))?;
            n += 1;
        }
        Ok(n)
    }

    /// Each map's max_entries and kernel memory (fdinfo `memlock`).
    pub(super) fn memory(&self) -> Result<MapMemory> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(self.maps.dir())
            .with_context(|| format!("listing {}", self.maps.dir().display()))?
        {
            let path = entry?.path();
            let map_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = MapData::from_pin(&path).with_context(|| format!("opening {map_name}"))?;
            let fd = data.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .with_context(|| format!("reading the fdinfo of {map_name}"))?;
            let field = |key: &str| -> Result<u64> {
                info.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
                    .with_context(|| format!("no {key} line in the fdinfo of {map_name}"))
            };
            let v = (field("max_entries:")?, field("memlock:")?);
            out.insert(map_name, v);
        }
        Ok(out)
    }
}

/// What [`Server::repeat_check`] saw.
pub(super) struct RepeatCheck {
    /// Upstream packets the flow counted after one call with `repeat`.
    pub(super) counted: u64,
    /// The verdict of the call's last run.
    pub(super) last_verdict: u32,
}

/// Each map's (max_entries, memlock bytes), by name.
pub(super) type MapMemory = BTreeMap<String, (u64, u64)>;

/// The maps' memory at the three points the report compares.
pub(super) struct Memory {
    /// The server at the agent's default sizes (the baseline).
    pub(super) default: MapMemory,
    /// At the scale sizes, just created.
    pub(super) empty: MapMemory,
    /// At the scale sizes with the table full.
    pub(super) full: MapMemory,
}

/// Map write costs, for the findings.
pub(super) struct Writes {
    /// Registering every community through `Maps`.
    pub(super) register: Duration,
    /// One insert through a map handle kept open.
    pub(super) open_write: Duration,
}

/// A pin directory of our own under the bpffs mount, removed on drop.
pub(super) struct PinDir(PathBuf);

impl PinDir {
    pub(super) fn new(tag: &str) -> Result<Self> {
        let bpffs = Path::new(datapath::DEFAULT_BPFFS);
        datapath::ensure_bpffs(bpffs).context("mounting bpffs")?;
        let p = bpffs.join(format!("bond-bench-scale-{}-{tag}", std::process::id()));
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        Ok(Self(p))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("scale: removing {}: {e}", self.0.display());
        }
    }
}
