//! `cargo xtask`: set up a fresh machine, build, test, demo, benchmark.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use bond_ctl::lab::{Lab, TerminalSpec};
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
    /// the Debian packages the tests drive.
    Setup,
    /// Build the eBPF programs and bond-ctl.
    Build,
    /// Run every test: unit, BPF_PROG_TEST_RUN and end-to-end (needs root).
    Test,
    /// Bring up a demo community in namespaces and show the aggregate rate.
    Demo,
    /// Benchmarks; each figure is a ratio to a baseline from the same run.
    Bench {
        #[arg(default_value = "aggregate")]
        suite: String,
        /// Downloads per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
}

const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "curl",
    "ethtool",
    "iputils-ping",
    "python3",
    "util-linux",
    "kmod",
];
const BPF_LINKER: &str = "0.10.2";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            build().map(drop)
        }
        Cmd::Test => {
            setup()?;
            test()
        }
        Cmd::Demo => {
            setup()?;
            let bin = build()?;
            demo(&bin, 1).map(drop)
        }
        Cmd::Bench { suite, runs } => {
            setup()?;
            let bin = build()?;
            match suite.as_str() {
                "aggregate" => demo(&bin, runs.max(1)).map(drop),
                // Control-plane load: 10,000 terminals announcing at 100 ms.
                "announce" => sh(Command::new("cargo").args([
                    "run",
                    "--release",
                    "-p",
                    "bond-ctl",
                    "--example",
                    "announce_load",
                ])),
                "latency" => latency(&bin, 500 * runs.max(1) as u32),
                other => bail!("unknown suite {other:?} (have: aggregate, announce, latency)"),
            }
        }
    }
}

fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn setup() -> Result<()> {
    // rust-src for -Z build-std=core.
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()?
            .stdout,
    )?;
    if !Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        sh(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER))
        .unwrap_or(false);
    if !linker_ok {
        // 0.10.x links with rustc's own LLVM; 0.11+ wants a system LLVM 23.
        sh(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
            "--force",
        ]))?;
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

fn build() -> Result<PathBuf> {
    sh(Command::new("cargo").args(["build", "-p", "bond-ctl", "--release"]))?;
    Ok(PathBuf::from("target/release/bond-ctl").canonicalize()?)
}

fn test() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the BPF and end-to-end tests need root");
    }
    // bond-ebpf builds only for the BPF target (via bond-ctl's build.rs).
    sh(Command::new("cargo").args([
        "test",
        "--workspace",
        "--exclude",
        "bond-ebpf",
        "--lib",
        "--bins",
    ]))?;
    sh(Command::new("cargo").args(["test", "-p", "bond-ctl", "--test", "prog"]))?;
    // One at a time: they share the machine's cores and measure rates.
    for t in ["e2e", "membership", "flows", "operate"] {
        sh(Command::new("cargo").args([
            "test",
            "-p",
            "bond-ctl",
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Figure 1 (links of 10, 20 and 30 Mbit/s, t3 without a link): one HTTP
/// download over the best single link with plain routing, then the same
/// file over bond from t3, side by side in one run.
fn demo(bond_ctl: &Path, runs: usize) -> Result<(f64, f64)> {
    let spec = TerminalSpec::figure1();
    let rates: Vec<u32> = spec.iter().flat_map(|t| t.links.clone()).collect();
    println!(
        "bond demo: 3 terminals on a LAN; WAN links of {rates:?} Mbit/s (tbf); t3 has no WAN link"
    );
    let mut lab = Lab::build(&spec, bond_ctl)?;
    let mb = 20;
    lab.serve_file("file.bin", mb)?;
    let url = "http://203.0.113.2/file.bin";

    let t2 = lab.terminals[1].ns.clone();
    let mut single = Vec::new();
    for i in 0..runs {
        // t2's default route is its first link (20); route via the 30 one.
        lab.ip(
            &t2,
            &format!(
                "route replace 203.0.113.0/24 via {}",
                lab.terminals[1].links[1].modem_ip
            ),
        )?;
        let (b, s, _) = lab.download(&t2, url, &format!("single-{i}"))?;
        single.push(mbit(b, s));
        println!(
            "  best single link (30 Mbit/s, plain routing): {:.1} Mbit/s",
            mbit(b, s)
        );
    }
    lab.ip(&t2, "route del 203.0.113.0/24")?;
    println!("starting agents (server + 3 terminals)...");
    lab.start_agents()?;
    let t3 = lab.terminals[2].ns.clone();
    let mut bonded = Vec::new();
    for i in 0..runs {
        let (b, s, _) = lab.download(&t3, url, &format!("bond-{i}"))?;
        bonded.push(mbit(b, s));
        println!(
            "  bond from t3 over all three links:          {:.1} Mbit/s",
            mbit(b, s)
        );
    }
    let sum: u32 = rates.iter().sum();
    let (s, b) = (median(single), median(bonded));
    println!();
    println!("| {mb} MiB HTTP download (median of {runs}) | Mbit/s | share of {sum} Mbit/s sum |");
    println!("|---|---|---|");
    println!(
        "| best single link (30) | {s:.1} | {:.0}% |",
        s / f64::from(sum) * 100.0
    );
    println!(
        "| bond, 3 links | {b:.1} | {:.0}% |",
        b / f64::from(sum) * 100.0
    );
    println!("bond / best single link: {:.2}x", b / s);
    Ok((s, b))
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
fn latency(bond_ctl: &Path, count: u32) -> Result<()> {
    let spec = vec![
        TerminalSpec { links: vec![0] },
        TerminalSpec { links: vec![] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl)?;
    let (t1, t2) = (lab.terminals[0].ns.clone(), lab.terminals[1].ns.clone());
    println!("latency: {count} pings per path, unlimited veth links");
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
    println!();
    println!("| round trip to the content host | median µs | p99 µs | added (median) |");
    println!("|---|---|---|---|");
    println!("| t1, direct (plain routing) | {d50:.0} | {d99:.0} | |");
    println!(
        "| t1 through bond (own link) | {:.0} | {:.0} | {:+.0} µs |",
        percentile(own.clone(), 0.5),
        percentile(own.clone(), 0.99),
        percentile(own, 0.5) - d50
    );
    println!(
        "| t2 through bond (t1's link) | {:.0} | {:.0} | {:+.0} µs |",
        percentile(relayed.clone(), 0.5),
        percentile(relayed.clone(), 0.99),
        percentile(relayed, 0.5) - d50,
    );
    println!("| (t2 to t1 over the LAN alone) | {l50:.0} | | |");
    Ok(())
}
