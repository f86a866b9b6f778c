//! What a fresh machine lacks, installed before any task builds: rust-src
//! (for `-Z build-std=core`), bpf-linker and the Debian packages the tests
//! and benchmarks drive. Every step checks first, so a set-up machine pays
//! a few `dpkg -s` calls.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// 0.10.x links with rustc's own LLVM; 0.11+ wants a system LLVM 23.
pub const BPF_LINKER: &str = "0.10.2";
/// Builds the .deb (`cargo xtask package`).
pub const CARGO_DEB: &str = "3.8.0";

const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iperf3",
    "curl",
    "ethtool",
    "iputils-ping",
    "iputils-tracepath",
    "traceroute",
    "python3",
    "python3-pip",
    "util-linux",
    "kmod",
    // Benchmarks: the MPTCP baseline (mptcpize), kernel NAT, the plot's font.
    "mptcpd",
    "nftables",
    "fonts-dejavu-core",
    // The package and its checks (cargo xtask package), `bond-ctl top`'s test.
    "dpkg-dev",
    "systemd",
    "man-db",
    "zsh",
    "fish",
    "tmux",
    // The ISP tier: its registry (etcd and etcdctl, for the tests), and
    // protoc, which the etcd client's build compiles etcd's protocol with.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
];

pub fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

pub fn setup() -> Result<()> {
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .context("running rustc: is the Rust toolchain installed?")?
            .stdout,
    )?;
    if !Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        sh(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    cargo_tool(
        "bpf-linker",
        BPF_LINKER,
        Command::new("bpf-linker").arg("--version"),
    )?;
    cargo_tool(
        "cargo-deb",
        CARGO_DEB,
        Command::new("cargo-deb").arg("--version"),
    )?;
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

/// Installs crate `name` at `version` with `cargo install` unless `probe`
/// (the tool's `--version`) already prints that version.
pub fn cargo_tool(name: &str, version: &str, probe: &mut Command) -> Result<()> {
    let have = probe
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(version))
        .unwrap_or(false);
    if !have {
        sh(Command::new("cargo").args([
            "install",
            &format!("{name}@{version}"),
            "--locked",
            "--force",
        ]))?;
    }
    Ok(())
}
