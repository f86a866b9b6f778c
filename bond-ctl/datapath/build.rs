use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds bond-ebpf's objects into OUT_DIR with the stable toolchain and
/// `-Z build-std=core`, which `RUSTC_BOOTSTRAP=1` unlocks on stable.
/// `AYA_BUILD_SKIP=1` skips the build (clippy without bpf-linker); the
/// binary then embeds no objects and says so when asked to load them.
fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(bond_no_ebpf)");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        println!("cargo:rustc-cfg=bond_no_ebpf");
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bond-ebpf");
    // SAFETY: build scripts are single-threaded; this only affects the
    // child cargo that aya-build spawns.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // For dependents' build scripts (`links`): where the objects are.
    println!("cargo::metadata=objects={}", std::env::var("OUT_DIR")?);
    aya_build::build_ebpf(
        [Package {
            name: "bond-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom("stable"),
    )
    .context("building the eBPF programs (`cargo xtask setup` installs bpf-linker and rust-src)")
}
