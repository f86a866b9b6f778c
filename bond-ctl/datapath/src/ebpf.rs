//! The compiled eBPF objects, embedded at build time by `build.rs`.

/// The terminal object: `bond_wrap` (TC) and `bond_terminal` (XDP).
#[cfg(not(bond_no_ebpf))]
pub static TERMINAL: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/terminal"));
/// The server object: `bond_server` (XDP).
#[cfg(not(bond_no_ebpf))]
pub static SERVER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/server"));
/// The ISP tier's director object: `bond_director` (XDP).
#[cfg(not(bond_no_ebpf))]
pub static DIRECTOR: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/director"));

// Built with AYA_BUILD_SKIP=1 (clippy without bpf-linker): no objects, and
// loading says so.
#[cfg(bond_no_ebpf)]
pub static TERMINAL: &[u8] = &[];
#[cfg(bond_no_ebpf)]
pub static SERVER: &[u8] = &[];
#[cfg(bond_no_ebpf)]
pub static DIRECTOR: &[u8] = &[];
