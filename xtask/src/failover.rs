//! `cargo xtask bench failover`: what a terminal's death costs a download
//! that runs over its link, with the default announce interval (1 s, three
//! misses) and a short one (100 ms).
//!
//! Three terminals with 20 Mbit/s links; t1 downloads from the content host
//! through bond and t3 dies mid-way (its interfaces go down and its agent is
//! killed, as in a power cut). Per announce interval, two runs on fresh
//! labs:
//!
//! - TCP (iperf3): each link's downstream rate from its modem's counters,
//!   every 100 ms; the time from the death until the rest carry what they
//!   should for good (95% of the rate before, scaled to the surviving
//!   links, in every 500 ms from then on), and
//!   the sender's retransmissions. The default-interval run is plotted.
//! - UDP at a constant 24 Mbit/s (60% of what survives): the bytes lost and
//!   for how long datagrams were lost.
//!
//! The reference for each figure is the detection bound in the same
//! configuration: missed announces times the interval.

use std::{
    fmt::Write as _,
    fs::File,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bond_lab::{CONTENT, Lab, TerminalSpec};
use nix::sched::{CloneFlags, setns};

const RATE: u32 = 20;
const MISSES: u32 = 3;
const TICK: Duration = Duration::from_millis(100);
/// UDP payload bytes per datagram.
const UDP_LEN: u64 = 1200;

pub fn run(bond_ctl: &Path, quick: bool, out: &Path) -> Result<String> {
    let (secs, kill_at) = if quick { (10, 3.0) } else { (14, 5.0) };
    let mut t = String::new();
    writeln!(
        t,
        "Three terminals with {RATE} Mbit/s links; t1 downloads over all three and t3 \
         dies {kill_at:.0} s into a {secs} s transfer. Full throughput: from then on, \
         every 500 ms at 95% or more of the rate before, scaled to the surviving \
         links. UDP at 24 Mbit/s, {UDP_LEN}-byte datagrams.\n"
    )?;
    writeln!(
        t,
        "| announce interval | detection bound ({MISSES} misses) | TCP: death to full \
         throughput | TCP retransmitted segments | UDP bytes lost | UDP loss lasted |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|")?;
    for announce_ms in [1000u32, 100] {
        eprintln!("failover: announce every {announce_ms} ms, TCP");
        let tcp = tcp_run(bond_ctl, announce_ms, secs, kill_at)?;
        if announce_ms == 1000 {
            let png = out.join("failover.png");
            plot(&tcp, kill_at, announce_ms, &png)?;
            eprintln!("  plot: {}", png.display());
        }
        eprintln!("failover: announce every {announce_ms} ms, UDP");
        let udp = udp_run(bond_ctl, announce_ms, secs, kill_at)?;
        let bound = f64::from(MISSES * announce_ms) / 1000.0;
        writeln!(
            t,
            "| {announce_ms} ms | {bound:.1} s | {} | {} | {} ({} datagrams) | {} |",
            tcp.recovered
                .map_or("not within the run".into(), |s| format!("{s:.1} s")),
            tcp.retransmits,
            udp.lost * UDP_LEN,
            udp.lost,
            udp.lasted.map_or("no loss".into(), |s| format!("{s:.1} s")),
        )?;
    }
    Ok(t)
}

fn lab(bond_ctl: &Path, announce_ms: u32) -> Result<Lab> {
    let spec = vec![TerminalSpec { links: vec![RATE] }; 3];
    let mut lab = Lab::build(&spec, bond_ctl)?;
    lab.announce_ms = announce_ms;
    lab.start_iperf()?;
    lab.start_agents()?;
    Ok(lab)
}

/// A TCP download's per-link rates over time, and what they showed.
struct TcpRun {
    /// Mbit/s per link per tick.
    series: Vec<Vec<f64>>,
    /// Seconds from the death to full throughput on the rest.
    recovered: Option<f64>,
    retransmits: u64,
}

fn tcp_run(bond_ctl: &Path, announce_ms: u32, secs: u32, kill_at: f64) -> Result<TcpRun> {
    let mut lab = lab(bond_ctl, announce_ms)?;
    let modems: Vec<String> = lab.all_links().map(|l| l.modem_ns.clone()).collect();
    let t1 = lab.terminals[0].ns.clone();
    let sampler = Sampler::start(&modems)?;
    let args = iperf_args(secs, None);
    lab.spawn(
        &t1,
        "iperf-tcp",
        "iperf3",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    sleep_until(sampler.start, kill_at);
    lab.crash_terminal(2)?;
    let log = lab.wait_child("iperf-tcp", Duration::from_secs(u64::from(secs) + 30))?;
    let series = sampler.stop()?;
    let v: serde_json::Value = serde_json::from_str(&log).context("iperf3's JSON")?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);

    // The rate before: the 3 s before the death (after a 1 s warm-up).
    let k = (kill_at / TICK.as_secs_f64()) as usize;
    let total: Vec<f64> = (0..series[0].len())
        .map(|i| series.iter().map(|l| l[i]).sum())
        .collect();
    let from = k.saturating_sub(30).max(10);
    ensure!(
        from < k,
        "the death comes too early to measure the rate before"
    );
    let before = total[from..k].iter().sum::<f64>() / (k - from) as f64;
    ensure!(
        before > f64::from(RATE),
        "the download ran at {before:.1} Mbit/s before the death: not over all links"
    );
    // Recovered: the first 500 ms window after the death from which every
    // window on averages 95% of the rate before, scaled to the survivors
    // (the last 500 ms, where iperf3 winds down, left out). A single
    // good window is not enough: while the dead link still gets its share,
    // TCP's rate swings and touches 90% now and then.
    let want = 0.95 * before * 2.0 / 3.0;
    let avg = |i: usize| total[i..i + 5].iter().sum::<f64>() / 5.0;
    let end = total.len().saturating_sub(10);
    let recovered = (k..end)
        .find(|&i| (i..end).all(|j| avg(j) >= want))
        .map(|i| (i - k) as f64 * TICK.as_secs_f64());
    Ok(TcpRun {
        series,
        recovered,
        retransmits,
    })
}

/// A constant-rate UDP download's losses.
struct UdpRun {
    lost: u64,
    /// From the first to the last 100 ms interval with a loss.
    lasted: Option<f64>,
}

fn udp_run(bond_ctl: &Path, announce_ms: u32, secs: u32, kill_at: f64) -> Result<UdpRun> {
    let mut lab = lab(bond_ctl, announce_ms)?;
    let t1 = lab.terminals[0].ns.clone();
    let args = iperf_args(secs, Some(24));
    let start = Instant::now();
    lab.spawn(
        &t1,
        "iperf-udp",
        "iperf3",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    sleep_until(start, kill_at);
    lab.crash_terminal(2)?;
    let log = lab.wait_child("iperf-udp", Duration::from_secs(u64::from(secs) + 30))?;
    let v: serde_json::Value = serde_json::from_str(&log).context("iperf3's JSON")?;
    let lost = v["end"]["sum"]["lost_packets"]
        .as_u64()
        .with_context(|| format!("no loss count in iperf3's report: {log:.400}"))?;
    let got = v["end"]["sum"]["packets"].as_u64().unwrap_or(0);
    ensure!(got > 0, "the UDP download received nothing");
    let lossy: Vec<f64> = v["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["sum"]["lost_packets"].as_u64().unwrap_or(0) > 0)
        .filter_map(|i| i["sum"]["start"].as_f64())
        .collect();
    let lasted = match (lossy.first(), lossy.last()) {
        (Some(a), Some(b)) => Some(b - a + 0.1),
        _ => None,
    };
    Ok(UdpRun { lost, lasted })
}

/// iperf3 download from the content host: TCP, or UDP at `udp` Mbit/s.
fn iperf_args(secs: u32, udp: Option<u32>) -> Vec<String> {
    let mut a: Vec<String> = [
        "-c",
        &CONTENT.to_string(),
        "-R",
        "-t",
        &secs.to_string(),
        "-i",
        "0.1",
        "-J",
    ]
    .map(str::to_string)
    .to_vec();
    if let Some(mbit) = udp {
        a.extend(["-u", "-b", &format!("{mbit}M"), "-l", &UDP_LEN.to_string()].map(str::to_string));
    }
    a
}

fn sleep_until(start: Instant, secs: f64) {
    let at = start + Duration::from_secs_f64(secs);
    if let Some(d) = at.checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
}

/// Reads each modem's bytes sent towards its terminal every [`TICK`], one
/// thread per modem inside its namespace (`/proc/thread-self/net/dev`
/// shows the calling thread's namespace).
struct Sampler {
    start: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<Vec<u64>>>>,
}

impl Sampler {
    fn start(namespaces: &[String]) -> Result<Self> {
        let start = Instant::now() + TICK;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = namespaces
            .iter()
            .map(|ns| {
                let (ns, stop) = (ns.clone(), stop.clone());
                let netns = File::open(format!("/run/netns/{ns}"))
                    .with_context(|| format!("opening namespace {ns}"))?;
                Ok(thread::spawn(move || -> Result<Vec<u64>> {
                    setns(&netns, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering namespace {ns}"))?;
                    let mut bytes = Vec::new();
                    let mut next = start;
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(d);
                        }
                        bytes.push(tx_bytes("acc").with_context(|| format!("in {ns}"))?);
                        next += TICK;
                    }
                    Ok(bytes)
                }))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            start,
            stop,
            threads,
        })
    }

    /// Mbit/s per link per tick.
    fn stop(self) -> Result<Vec<Vec<f64>>> {
        self.stop.store(true, Ordering::Relaxed);
        let counts: Vec<Vec<u64>> = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("sampler thread"))
            .collect::<Result<_>>()?;
        let n = counts.iter().map(Vec::len).min().unwrap_or(0);
        Ok(counts
            .iter()
            .map(|c| {
                c[..n]
                    .windows(2)
                    .map(|w| (w[1] - w[0]) as f64 * 8.0 / TICK.as_secs_f64() / 1e6)
                    .collect()
            })
            .collect())
    }
}

/// Transmitted bytes of `dev` in the calling thread's namespace.
fn tx_bytes(dev: &str) -> Result<u64> {
    let dev_file = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    let line = dev_file
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{dev}:")))
        .with_context(|| format!("no {dev} in /proc/net/dev"))?;
    // Eight receive counters, then transmitted bytes.
    line.split_whitespace()
        .nth(8)
        .context("short /proc/net/dev line")?
        .parse()
        .context("tx bytes")
}

/// Throughput per link and in total over time, the death marked.
fn plot(run: &TcpRun, kill_at: f64, announce_ms: u32, png: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::{FontStyle, register_font};

    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (`cargo xtask setup` installs fonts-dejavu-core)")
    })?;
    // The font lives as long as the process; plotters keeps a reference.
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can read"))?;

    let tick = TICK.as_secs_f64();
    let n = run.series[0].len();
    let total: Vec<f64> = (0..n)
        .map(|i| run.series.iter().map(|l| l[i]).sum())
        .collect();
    let ymax = total.iter().copied().fold(0.0, f64::max) * 1.1;
    let root = BitMapBackend::new(png, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "bond: t3 dies at {kill_at:.0} s (announce every {announce_ms} ms, {MISSES} misses)"
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..n as f64 * tick, 0.0..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("Mbit/s leaving the modems (100 ms bins)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let colors = [RED, BLUE, GREEN];
    for (i, s) in run.series.iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                s.iter().enumerate().map(|(j, &v)| (j as f64 * tick, v)),
                c.stroke_width(2),
            ))?
            .label(format!("link {} (t{})", i + 1, i + 1))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(
            total.iter().enumerate().map(|(j, &v)| (j as f64 * tick, v)),
            BLACK.stroke_width(2),
        ))?
        .label("total")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart.draw_series(LineSeries::new(
        [(kill_at, 0.0), (kill_at, ymax)],
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}
