//! `cargo xtask bench distribute`: the time to push one file to many
//! terminals, by star (every target fetches from the main server), by the
//! seed's relay tree (fanout 3) and by striped trees, each as a ratio to
//! the lower bound.
//!
//! t1 is the main server; the other terminals are the targets. Every
//! terminal's LAN upload is limited to the same rate B by tbf (the LAN
//! itself is a bridge, faster than any upload). The bound for a file of
//! size S cut in chunks of size c, to N targets, is S/B + log2(N)·c/B:
//! every byte leaves the main server once at B, and a chunk needs at least
//! log2(N) hops to reach everyone when every holder doubles the holders.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bond_lab::{Lab, TerminalSpec};

struct Setup {
    targets: usize,
    mbit: u32,
    mib: usize,
    chunk_kib: u32,
}

/// One way of distributing: `bond-ctl distribute` arguments.
struct Mode {
    name: &'static str,
    args: Vec<String>,
}

pub fn run(bond_ctl: &Path, quick: bool, out: &Path) -> Result<String> {
    let s = if quick {
        Setup {
            targets: 10,
            mbit: 20,
            mib: 8,
            chunk_kib: 256,
        }
    } else {
        Setup {
            targets: 30,
            mbit: 20,
            mib: 100,
            chunk_kib: 256,
        }
    };
    let mode = |name, args: &[&str]| Mode {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
    };
    let modes = [
        mode("star", &["--mode", "star"]),
        mode("tree, fanout 3", &["--mode", "tree", "--fanout", "3"]),
        mode(
            "striped, 3 stripes",
            &["--mode", "striped", "--fanout", "3"],
        ),
    ];
    let bytes = (s.mib as f64) * 1_048_576.0;
    let b = f64::from(s.mbit) * 1e6 / 8.0;
    let chunk = f64::from(s.chunk_kib) * 1024.0;
    let bound = bytes / b + (s.targets as f64).log2() * chunk / b;
    let mut t = String::new();
    writeln!(
        t,
        "{} MiB to {} terminals, every upload {} Mbit/s, chunks of {} KiB. \
         Lower bound S/B + log2(N)·c/B = {bound:.1} s.\n",
        s.mib, s.targets, s.mbit, s.chunk_kib
    )?;
    writeln!(
        t,
        "| mode | time | ratio to the bound | speed-up over star | the main server sent | \
         most a target sent |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|")?;
    let mut star = None;
    for m in &modes {
        eprintln!("distribute: {}", m.name);
        let (r, sent) = once(bond_ctl, &s, &m.args)?;
        let json = out.join(format!("distribute-{}.json", m.args[1]));
        std::fs::write(&json, serde_json::to_string_pretty(&r)?)?;
        let secs = r["ms"].as_u64().context("ms")? as f64 / 1000.0;
        let star_secs = *star.get_or_insert(secs);
        let files = |n: u64| format!("{:.2} × S", n as f64 / bytes);
        eprintln!("  {secs:.1} s");
        writeln!(
            t,
            "| {} | {secs:.1} s | {:.2} | {:.1} | {} | {} |",
            m.name,
            secs / bound,
            star_secs / secs,
            files(sent[0]),
            files(sent[1..].iter().copied().max().unwrap_or(0)),
        )?;
    }
    writeln!(
        t,
        "\nSent: bytes on each terminal's LAN upload during the transfer, in files \
         (S = {} MiB); the per-target reports are in distribute-MODE.json.",
        s.mib
    )?;
    Ok(t)
}

/// A fresh community; `bond-ctl distribute` on t1 with `args`; its report
/// and the bytes each terminal uploaded meanwhile.
fn once(bond_ctl: &Path, s: &Setup, args: &[String]) -> Result<(serde_json::Value, Vec<u64>)> {
    let mut spec = vec![TerminalSpec { links: vec![] }; s.targets + 1];
    spec[0].links = vec![100];
    let mut lab = Lab::build(&spec, bond_ctl)?;
    lab.dist = true;
    for i in 0..=s.targets {
        lab.limit_upload(i, s.mbit)?;
    }
    lab.start_agents()?;
    let t1 = lab.terminals[0].ns.clone();
    let cfg = lab.dir.join("t1.toml").to_string_lossy().into_owned();
    let bin = lab.bond_ctl.to_string_lossy().into_owned();
    // The main server learns every target from its announces.
    let start = std::time::Instant::now();
    loop {
        let out = lab.exec(&t1, &bin, &["terminals", "--config", &cfg, "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let known = v["terminals"].as_array().map_or(0, Vec::len);
        if known == s.targets {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "t1 knows {known} of {} terminals",
            s.targets
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let file = lab.dir.join("payload.bin");
    std::fs::write(&file, noise(s.mib << 20))?;
    let chunk = s.chunk_kib.to_string();
    let mut a = vec![
        "distribute",
        file.to_str().context("path")?,
        "--config",
        &cfg,
        "--chunk-kib",
        &chunk,
        "--json",
    ];
    a.extend(args.iter().map(String::as_str));
    let before = (0..=s.targets)
        .map(|i| lab.lan_sent(i))
        .collect::<Result<Vec<_>>>()?;
    let out = lab.exec(&t1, &bin, &a)?;
    let sent = (0..=s.targets)
        .map(|i| Ok(lab.lan_sent(i)? - before[i]))
        .collect::<Result<Vec<_>>>()?;
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no report")?;
    let r: serde_json::Value = serde_json::from_str(line)?;
    ensure!(
        r["failed"].as_u64() == Some(0),
        "some targets failed: {line}"
    );
    Ok((r, sent))
}

/// Bytes that do not compress.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
