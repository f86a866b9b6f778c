//! Shared test support.
#![allow(dead_code, unused_imports)]

pub mod floors;
pub mod isolate;

pub use bond_lab::packets;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The bond-ctl binary, built now in this test's profile (so a test never
/// runs a stale agent), with `bond-delay` beside it for the lab's links.
pub fn bond_ctl() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let build = |package: &str, bin: &str| {
            escargot::CargoBuild::new()
                .manifest_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
                .package(package)
                .bin(bin)
                .current_release()
                .run()
                .unwrap_or_else(|e| panic!("building {bin}: {e}"))
                .path()
                .to_path_buf()
        };
        let delay = build("bond-lab", "bond-delay");
        let bin = build("bond-ctl", "bond-ctl");
        assert_eq!(
            delay.parent(),
            bin.parent(),
            "the lab finds bond-delay beside bond-ctl"
        );
        bin
    })
}

/// Fails loudly (not silently passes) when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test needs root (BPF, network namespaces): run `cargo xtask test`"
    );
}

/// A unique pin directory under /sys/fs/bpf, removed on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        require_root();
        bond_datapath::ensure_bpffs(std::path::Path::new(bond_datapath::DEFAULT_BPFFS))
            .expect("mount bpffs");
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/bond-test-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// When each counter `read` returns last moved, polling every 10 ms for
/// `watch`.
pub fn last_changes<const N: usize>(
    read: impl Fn() -> [u64; N],
    watch: std::time::Duration,
) -> [std::time::Instant; N] {
    let start = std::time::Instant::now();
    let (mut last, mut at) = (read(), [start; N]);
    while start.elapsed() < watch {
        let now = read();
        for i in 0..N {
            if now[i] != last[i] {
                (last[i], at[i]) = (now[i], std::time::Instant::now());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    at
}
