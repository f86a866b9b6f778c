//! CPU placement and run times: which CPU the generator and the userspace
//! relays run on, and how long the threads working for a path ran.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    time::{ClockId, clock_gettime},
    unistd::Pid,
};

/// The CPU the generator (and with it every XDP and softirq path) is pinned
/// to, the one the userspace relays run on, and each CPU's ksoftirqd.
#[derive(Clone)]
pub(super) struct Cpus {
    pub generator: usize,
    pub relay: usize,
    pub softirqd: Vec<(usize, u32)>,
}

impl Cpus {
    pub fn pick() -> Result<Self> {
        let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let allowed: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        let generator = *allowed
            .last()
            .context("no CPU in this process's affinity mask")?;
        let relay = allowed
            .iter()
            .copied()
            .find(|&c| c != generator)
            .unwrap_or(generator);
        Ok(Self {
            generator,
            relay,
            softirqd: softirq_threads()?,
        })
    }
}

/// Pins the calling thread to `cpu`.
pub(super) fn pin_to(cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning to CPU {cpu}"))
}

/// The calling thread's run time.
pub(super) fn thread_cpu() -> Result<Duration> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).context("thread CPU clock")?;
    Ok(Duration::from(t))
}

/// The run time in a `schedstat` file (nanoseconds on the CPU, first field;
/// current to the last scheduler tick).
pub(super) fn run_time(path: &str) -> Result<Duration> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unexpected {path}: {s:?}"))?;
    Ok(Duration::from_nanos(ns))
}

/// The pid of each CPU's ksoftirqd thread.
fn softirq_threads() -> Result<Vec<(usize, u32)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Some(cpu) = comm.trim().strip_prefix("ksoftirqd/") {
            out.push((cpu.parse()?, pid));
        }
    }
    ensure!(!out.is_empty(), "no ksoftirqd threads in /proc");
    Ok(out)
}

/// Whether the running kernel accounts IRQ time apart from tasks' run time
/// (then softirq work done in a thread's context is not its run time).
pub(super) fn irq_time_accounted() -> bool {
    super::kernel_option("CONFIG_IRQ_TIME_ACCOUNTING") == Some(true)
}
