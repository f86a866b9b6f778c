//! Small XDP programs for `cargo xtask bench fastpath`; no part of bond's
//! datapath.
//!
//! - `bench_tx`: the load generator. Run by `BPF_PROG_TEST_RUN` in live-frames
//!   mode, its XDP_TX sends each test frame out of the interface named in the
//!   run's context. Live mode recycles frame pages without restoring their
//!   contents, and the paths under test rewrite headers in place, so it first
//!   writes the frame's head back from `TEMPLATE`.
//! - `bench_pass`: hands every frame to the kernel's stack (the baselines'
//!   ingress: veth only takes XDP frames from its peer with a program on).
//! - `bench_redirect`: sends every frame out of `REDIRECT_TO[0]` unchanged
//!   (the floor: what the generator and two veth hops cost by themselves).
//! - `bench_sink`: counts and drops what a path delivers.
//! - `bench_capture`: as `bench_sink`, and keeps a copy of the last frame,
//!   to check a path's output bytes before and after it is measured.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use bond_ebpf::{Packet, count};

/// The largest frame `bench_capture` copies (the rest is cut off).
const CAPTURE_MAX: usize = 2048;

/// How many of the frame's first bytes `bench_tx` restores at most.
const TEMPLATE_MAX: usize = 128;

/// The head of the generator's frame: its length and bytes.
#[repr(C)]
pub struct Template {
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; TEMPLATE_MAX],
}

/// A copy of one delivered frame: its length and its first bytes.
#[repr(C)]
pub struct Capture {
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; CAPTURE_MAX],
}

/// What `bench_tx` writes at the start of every frame (set by the benchmark).
#[map]
static TEMPLATE: Array<Template> = Array::with_max_entries(1, 0);
/// The ifindex `bench_redirect` sends to (set by the benchmark).
#[map]
static REDIRECT_TO: Array<u32> = Array::with_max_entries(1, 0);
/// Frames that reached the sink, per CPU.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// The last frame `bench_capture` saw.
#[map]
static CAPTURE: Array<Capture> = Array::with_max_entries(1, 0);

#[xdp]
pub fn bench_tx(ctx: XdpContext) -> u32 {
    let Some(t) = TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let n = t.len as usize;
    if n == 0 || n > TEMPLATE_MAX {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: `t.data` is a live map value of TEMPLATE_MAX bytes and `n` is
    // at most that; the helper bounds-checks the packet side.
    let rc = unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, t.data.as_ptr() as *mut _, n as u32) };
    if rc != 0 {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    match REDIRECT_TO.get(0) {
        // SAFETY: plain helper call.
        Some(&ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
        None => xdp_action::XDP_ABORTED,
    }
}

#[xdp]
pub fn bench_sink(_ctx: XdpContext) -> u32 {
    count(&SINK_COUNT, 0);
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_capture(ctx: XdpContext) -> u32 {
    count(&SINK_COUNT, 0);
    let Some(c) = CAPTURE.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    let len = ctx.packet_len();
    // A bound the verifier can follow: 1..=CAPTURE_MAX bytes.
    let n = if len > CAPTURE_MAX { CAPTURE_MAX } else { len };
    if n == 0 {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: `c` points at a live map value of CAPTURE_MAX data bytes and
    // `n` is at most that; the helper bounds-checks the packet side.
    unsafe {
        if bpf_xdp_load_bytes(ctx.ctx, 0, (&raw mut (*c).data).cast(), n as u32) == 0 {
            (*c).len = len as u32;
        }
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
