//! `cargo xtask`: set up a fresh machine, build, test, demo, benchmark.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

mod aggregate;
mod cache;
mod distribute;
mod failover;
mod fastpath;
mod floors;
mod fuzz;
mod package;
// Packets built independently of the code under test, shared with the BPF
// fixtures.
use bond_lab::packets;
mod scale;
mod tier;
use bond_lab::{Lab, TerminalSpec};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "bond's development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: rust-src, bpf-linker 0.10.2 and
    /// the Debian packages the tests drive. `cargo xtask` does this before
    /// every task, before it builds anything (xtask-setup, the launcher).
    Setup,
    /// Build the eBPF programs and bond-ctl.
    Build,
    /// Run every test: unit, BPF_PROG_TEST_RUN and end-to-end (needs root).
    Test,
    /// Bring up a demo community in namespaces and show the aggregate rate.
    Demo,
    /// Build the Debian package (target/package/bond_*.deb) and check it:
    /// contents, dependencies, an install into a scratch root, the unit
    /// (systemd-analyze verify), the manual pages (man) and completions
    /// (bash, zsh, fish).
    Package,
    /// Fuzz every parser (cargo-fuzz, libFuzzer): each target for SECS
    /// seconds, starting from seeds of valid input. Crashes are saved under
    /// fuzz/artifacts/TARGET and fail the run.
    Fuzz {
        /// Targets: wire, control, config, edpf, dist, cache, frag (default: all).
        targets: Vec<String>,
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Benchmarks; each figure is a ratio to a baseline from the same run.
    /// Tables go to stdout and, with the machine and date, to
    /// target/bench/report.md; the failover plot to target/bench/.
    Bench {
        /// Suites to run: aggregate, fastpath, latency, failover, scale,
        /// announce, distribute, cache (default: all).
        suites: Vec<String>,
        /// A smaller version of each suite (minutes, for CI): checks that
        /// the suites work, not that a figure is reached.
        #[arg(long)]
        quick: bool,
        /// Repeats of each aggregate measurement (the median is reported);
        /// default 3, or 1 with --quick.
        #[arg(long)]
        runs: Option<usize>,
        /// Link profiles for the aggregate suite, repeatable: equal, mixed,
        /// lte, sat, flap (default: all, or mixed and flap with --quick).
        #[arg(long = "profile")]
        profiles: Vec<String>,
    },
    /// The MPTCP baseline's proxy (run by `bench aggregate` in the server
    /// namespace): accepts MPTCP connections on LISTEN, relays each to TO.
    #[command(hide = true)]
    MptcpProxy { listen: SocketAddr, to: SocketAddr },
}

const SUITES: &[&str] = &[
    "aggregate",
    "fastpath",
    "latency",
    "failover",
    "scale",
    "announce",
    "distribute",
    "cache",
    "tier",
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => xtask_setup::setup(),
        Cmd::Build => build().map(drop),
        Cmd::Package => package::run().map(drop),
        Cmd::Test => test(),
        Cmd::Fuzz { targets, secs } => fuzz::run(&targets, secs),
        Cmd::Demo => {
            let bin = build()?;
            demo(&bin)
        }
        Cmd::Bench {
            suites,
            quick,
            runs,
            profiles,
        } => {
            // Name a bad profile before minutes of building.
            for p in &profiles {
                bond_lab::Profile::named(p)?;
            }
            let bin = build()?;
            let runs = runs.unwrap_or(if quick { 1 } else { 3 });
            bench(&bin, &suites, quick, runs, &profiles)
        }
        Cmd::MptcpProxy { listen, to } => aggregate::proxy(listen, to),
    }
}

/// Runs the suites in turn, printing each table as it is done and writing
/// them all, headed by the machine and date, to target/bench/report.md.
fn bench(
    bond_ctl: &Path,
    suites: &[String],
    quick: bool,
    runs: usize,
    profiles: &[String],
) -> Result<()> {
    let suites: Vec<&str> = if suites.is_empty() {
        SUITES.to_vec()
    } else {
        suites.iter().map(String::as_str).collect()
    };
    if let Some(bad) = suites.iter().find(|s| !SUITES.contains(s)) {
        bail!("unknown suite {bad:?} (have: {})", SUITES.join(", "));
    }
    let out = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    let mut report = format!(
        "# bond benchmarks{}\n\n{}\n",
        if quick { " (--quick)" } else { "" },
        machine()
    );
    let mut figures = Vec::new();
    for suite in suites {
        eprintln!(
            "\n== bench {suite}{} ==",
            if quick { " --quick" } else { "" }
        );
        let table = match suite {
            "aggregate" => {
                let (table, f) = aggregate::run(bond_ctl, quick, runs, profiles)?;
                figures.extend(f);
                table
            }
            "fastpath" => fastpath::run(quick)?,
            "latency" => latency(bond_ctl, if quick { 300 } else { 1500 })?,
            "failover" => failover::run(bond_ctl, quick, &out)?,
            "scale" => scale::run(quick)?,
            "announce" => announce(quick)?,
            "distribute" => distribute::run(bond_ctl, quick, &out)?,
            "cache" => cache::run(bond_ctl, quick, &out)?,
            "tier" => tier::run(bond_ctl, quick, runs)?,
            _ => unreachable!("checked above"),
        };
        println!("\n## {suite}\n\n{table}");
        let _ = write!(report, "\n## {suite}\n\n{table}\n");
        std::fs::write(out.join("report.md"), &report)?;
    }
    let (table, below) = floors::judge(&figures);
    println!("\n## floors\n\n{table}");
    let _ = write!(report, "\n## floors\n\n{table}\n");
    std::fs::write(out.join("report.md"), &report)?;
    eprintln!("\nreport: {}", out.join("report.md").display());
    if !below.is_empty() {
        bail!(
            "{} headline figure(s) below their floors:\n  {}",
            below.len(),
            below.join("\n  ")
        );
    }
    Ok(())
}

/// When and on what the figures were taken.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb >> 20);
    let out = |c: &mut Command| {
        c.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let kernel = out(Command::new("uname").arg("-r"));
    let date = out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    format!("Taken {date} on {cpu}, {cores} cores, {mem_gib} GiB, kernel {kernel}; release build.")
}

/// The control-plane load test (an example binary, release build).
fn announce(quick: bool) -> Result<String> {
    let mut c = Command::new("cargo");
    c.args([
        "run",
        "--release",
        "-q",
        "-p",
        "bond-agent",
        "--example",
        "announce_load",
    ]);
    if quick {
        c.env("BOND_ANNOUNCE_ROUNDS", "2");
    }
    let o = c.output().context("running the announce_load example")?;
    if !o.status.success() {
        bail!(
            "announce_load failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8(o.stdout)?)
}

fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn build() -> Result<PathBuf> {
    // bond-delay (the lab's links) is found beside bond-ctl.
    sh(Command::new("cargo").args(["build", "--release", "-p", "bond-ctl", "-p", "bond-lab"]))?;
    Ok(PathBuf::from("target/release/bond-ctl").canonicalize()?)
}

fn test() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the BPF and end-to-end tests need root");
    }
    // bond-ebpf builds only for the BPF target (via bond-datapath's build.rs).
    sh(Command::new("cargo").args([
        "test",
        "--workspace",
        "--exclude",
        "bond-ebpf",
        "--lib",
        "--bins",
    ]))?;
    sh(Command::new("cargo").args(["test", "-p", "bond-tests", "--test", "prog"]))?;
    // One at a time: they share the machine's cores and measure rates.
    // Release builds, as the agents run in use: a debug agent's playout
    // and feedback threads fall behind under load, and the rates the
    // tests hold to then failed now and then (UDP loss, a dark link's
    // upload).
    for t in [
        "links",
        "e2e",
        "membership",
        "flows",
        "operate",
        "service",
        "tier",
        "uplinks",
        "limits",
        "dist",
        "cache",
    ] {
        sh(Command::new("cargo").args([
            "test",
            "--release",
            "-p",
            "bond-tests",
            "--test",
            t,
            "--",
            "--test-threads=1",
        ]))?;
    }
    Ok(())
}

fn mbit(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e6
}

/// Figure 1 (links of 10, 20 and 30 Mbit/s, t3 without a link): one HTTP
/// download over the best single link with plain routing, then the same
/// file over bond from t3, side by side in one run. (`bench aggregate`
/// has the full comparison, MPTCP included.)
fn demo(bond_ctl: &Path) -> Result<()> {
    let spec = TerminalSpec::figure1();
    let rates: Vec<u32> = spec.iter().flat_map(|t| t.links.clone()).collect();
    println!(
        "bond demo: 3 terminals on a LAN; WAN links of {rates:?} Mbit/s (tbf); t3 has no WAN link"
    );
    let mut lab = Lab::build(&spec, bond_ctl)?;
    let mb = 20;
    lab.serve_file("file.bin", mb)?;
    let url = "http://203.0.113.2/file.bin";

    // t2's default route is its first link (20); route via the 30 one.
    let t2 = lab.terminals[1].ns.clone();
    lab.ip(
        &t2,
        &format!(
            "route replace 203.0.113.0/24 via {}",
            lab.terminals[1].links[1].modem_ip
        ),
    )?;
    let (b, s, _) = lab.download(&t2, url, "single")?;
    let single = mbit(b, s);
    println!("  best single link (30 Mbit/s, plain routing): {single:.1} Mbit/s");
    lab.ip(&t2, "route del 203.0.113.0/24")?;
    println!("starting agents (server + 3 terminals)...");
    lab.start_agents()?;
    let t3 = lab.terminals[2].ns.clone();
    let (b, s, _) = lab.download(&t3, url, "bond")?;
    let bonded = mbit(b, s);
    println!("  bond from t3 over all three links:          {bonded:.1} Mbit/s");
    let sum: u32 = rates.iter().sum();
    println!();
    println!("| {mb} MiB HTTP download | Mbit/s | share of {sum} Mbit/s sum |");
    println!("|---|---|---|");
    println!(
        "| best single link (30) | {single:.1} | {:.0}% |",
        single / f64::from(sum) * 100.0
    );
    println!(
        "| bond, 3 links | {bonded:.1} | {:.0}% |",
        bonded / f64::from(sum) * 100.0
    );
    println!("bond / best single link: {:.2}x", bonded / single);
    Ok(())
}

/// Round trips in microseconds of `count` pings from a namespace.
fn ping(lab: &Lab, ns: &str, count: u32) -> Result<Vec<f64>> {
    let out = lab.exec(
        ns,
        "ping",
        &["-n", "-c", &count.to_string(), "-i", "0.002", "203.0.113.2"],
    )?;
    let rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if rtts.len() < count as usize * 9 / 10 {
        bail!("only {} of {count} pings answered from {ns}", rtts.len());
    }
    Ok(rtts)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Added round trip on unlimited veth links: ping from t1 to the content
/// host over its own link with plain routing, then through bond (t1 the
/// origin: wrap at t1, unwrap and NAT at the server, and back), and from
/// t2, which has no link, through t1's (one LAN hop each way, relayed by
/// XDP at t1). The LAN hop alone is measured too, to tell the relay's cost
/// from the wire's.
fn latency(bond_ctl: &Path, count: u32) -> Result<String> {
    let spec = vec![
        TerminalSpec { links: vec![0] },
        TerminalSpec { links: vec![] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl)?;
    let (t1, t2) = (lab.terminals[0].ns.clone(), lab.terminals[1].ns.clone());
    eprintln!("latency: {count} pings per path, unlimited veth links");
    let direct = ping(&lab, &t1, count)?;
    let lan = {
        let out = lab.exec(
            &t2,
            "ping",
            &["-n", "-c", &count.to_string(), "-i", "0.002", "10.0.1.1"],
        )?;
        out.lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.trim_end_matches(" ms").parse::<f64>().ok())
            .map(|ms| ms * 1000.0)
            .collect::<Vec<f64>>()
    };
    lab.start_agents()?;
    let own = ping(&lab, &t1, count)?;
    let relayed = ping(&lab, &t2, count)?;
    let (d50, d99) = (percentile(direct.clone(), 0.5), percentile(direct, 0.99));
    let l50 = percentile(lan, 0.5);
    let mut t = String::new();
    writeln!(
        t,
        "{count} pings per path every 2 ms, unlimited veth links.\n"
    )?;
    writeln!(
        t,
        "| round trip to the content host | median µs | p99 µs | added (median) |"
    )?;
    writeln!(t, "|---|---|---|---|")?;
    writeln!(t, "| t1, direct (plain routing) | {d50:.0} | {d99:.0} | |")?;
    writeln!(
        t,
        "| t1 through bond (own link) | {:.0} | {:.0} | {:+.0} µs |",
        percentile(own.clone(), 0.5),
        percentile(own.clone(), 0.99),
        percentile(own, 0.5) - d50
    )?;
    writeln!(
        t,
        "| t2 through bond (t1's link) | {:.0} | {:.0} | {:+.0} µs |",
        percentile(relayed.clone(), 0.5),
        percentile(relayed.clone(), 0.99),
        percentile(relayed, 0.5) - d50,
    )?;
    writeln!(t, "| (t2 to t1 over the LAN alone) | {l50:.0} | | |")?;
    Ok(t)
}
