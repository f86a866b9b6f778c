//! Helpers shared by bond's programs: bounds-checked packet access, counters
//! and header rewrites. Everything is `#[inline(always)]`: the verifier sees
//! each check in the program that relies on it.
#![no_std]

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use bond_common::{
    csum, drops,
    maps::{CommunityId, KEPT_MAX, KEPT_SLOTS, Kept, LinkStats},
    wire::{IPV4_LEN, OUTER_LEN},
};

/// The two contexts bond's programs read packets from.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.end() - self.start()
    }
    /// Copies `n` bytes at `off` to `dst` (the helper checks the packet
    /// side); false if they are not there.
    ///
    /// # Safety
    /// `dst` must be valid for `n` bytes of writes.
    unsafe fn load(&self, off: u32, dst: *mut u8, n: u32) -> bool;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    unsafe fn load(&self, off: u32, dst: *mut u8, n: u32) -> bool {
        // SAFETY: the caller vouches for `dst`; the context is live.
        unsafe { bpf_xdp_load_bytes(self.ctx, off, dst.cast(), n) == 0 }
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    unsafe fn load(&self, off: u32, dst: *mut u8, n: u32) -> bool {
        // SAFETY: the caller vouches for `dst`; the context is live.
        unsafe { bpf_skb_load_bytes(self.as_ptr(), off, dst.cast(), n) == 0 }
    }
}

/// The next sequence number of link `idx` in `seqs` (1 to 127, as the
/// bond header carries it: `wire::seq_next`). Not atomic: two CPUs sending on one link at
/// the same instant may give two packets one number, which the receiving
/// end takes for a gap it cannot fill and stops waiting for.
#[inline(always)]
pub fn next_seq(seqs: &Array<u32>, idx: u32) -> u8 {
    match seqs.get_ptr_mut(idx) {
        // SAFETY: a live map value; a lost update is harmless (above).
        Some(c) => unsafe {
            let s = bond_common::wire::seq_next(*c as u8);
            *c = u32::from(s);
            s
        },
        None => 0,
    }
}

/// Keeps a copy of the wrapped packet's `n` bytes from `off` (its bond
/// header and inner packet) in the ring `ring`, at the slot `next` points
/// to (`bond_common::maps::Kept`). A packet too big for a slot is not kept.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn keep(
    ctx: &impl Packet,
    ring: &Array<Kept>,
    next: &Array<u32>,
    off: usize,
    n: usize,
    head: (CommunityId, u32, u8, u8, u32),
) {
    let (community, idx, link, seq, sent_us) = head;
    if n == 0 || n > KEPT_MAX {
        return;
    }
    let Some(at) = next.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a live map value; see `Kept` on racing writers.
    let slot = unsafe {
        let i = *at;
        *at = i.wrapping_add(1);
        i % KEPT_SLOTS
    };
    let Some(k) = ring.get_ptr_mut(slot) else {
        return;
    };
    // Checked again next to its use: across the calls above the compiler
    // may rebuild `n` from a spilled length whose bound the verifier lost.
    let n = core::hint::black_box(n);
    if n == 0 || n > KEPT_MAX {
        return;
    }
    // SAFETY: `k` is a live map value with KEPT_MAX data bytes and `n` is
    // at most that.
    unsafe {
        (*k).len = 0;
        if !ctx.load(off as u32, (&raw mut (*k).data).cast(), n as u32) {
            return;
        }
        (*k).sent_us = sent_us;
        (*k).idx = idx;
        (*k).community = community;
        (*k).link = link;
        (*k).seq = seq;
        (*k).len = n as u16;
    }
}

/// A pointer to a `T` at `off`, if the whole `T` lies inside the packet.
/// Callers re-derive pointers after any adjust-head or adjust-room.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Reads `N` bytes at `off` (bounds-checked).
#[inline(always)]
pub fn read<const N: usize>(ctx: &impl Packet, off: usize) -> Option<[u8; N]> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    // SAFETY: ptr_at checked that N bytes at p lie inside the packet; [u8; N]
    // has alignment 1.
    Some(unsafe { *p })
}

/// Writes `N` bytes at `off` (bounds-checked); false if out of bounds.
#[inline(always)]
pub fn write<const N: usize>(ctx: &impl Packet, off: usize, v: [u8; N]) -> bool {
    match ptr_at::<[u8; N]>(ctx, off) {
        // SAFETY: as in `read`; packet memory is writable for XDP and, after
        // the bounds check, for TC direct packet access.
        Some(p) => {
            unsafe { *p = v };
            true
        }
        None => false,
    }
}

#[inline(always)]
pub fn read_u16(ctx: &impl Packet, off: usize) -> Option<u16> {
    read::<2>(ctx, off).map(u16::from_be_bytes)
}

#[inline(always)]
pub fn read_u32(ctx: &impl Packet, off: usize) -> Option<u32> {
    read::<4>(ctx, off).map(u32::from_be_bytes)
}

/// The drop reasons already logged on this CPU, a bit each (reasons are
/// below 64). Not pinned: each load of the programs logs afresh.
#[aya_ebpf::macros::map]
static LOGGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Counts a packet dropped for `reason` in `drops`; the first drop of each
/// reason on each CPU is also logged (aya-log, read by the agent, which
/// names the reason), so that a new kind of trouble shows in the log
/// without a log line per packet.
#[inline(always)]
pub fn dropped<C: EbpfContext>(ctx: &C, drops: &PerCpuArray<u64>, reason: u32) {
    count(drops, reason);
    let Some(seen) = LOGGED.get_ptr_mut(0) else {
        return;
    };
    let bit = 1u64 << (reason & 63);
    // SAFETY: per-CPU slot, as in `count`.
    if unsafe { *seen } & bit == 0 {
        // SAFETY: as above.
        unsafe { *seen |= bit };
        aya_log_ebpf::warn!(ctx, "{}", reason);
    }
}

/// Adds one to counter `idx` of a per-CPU counter array.
#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, idx: u32) {
    if let Some(c) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot; no other writer runs on this CPU meanwhile.
        unsafe { *c += 1 };
    }
}

/// Sends the frame to a node of a tier as `slot` says: its Ethernet
/// addresses rewritten, redirected out of the slot's interface (L2
/// forwarding: the node holds the front address itself). Nothing else of
/// the frame changes.
#[inline(always)]
pub fn redirect_to(ctx: &impl Packet, slot: &bond_common::maps::NodeSlot) -> Result<u32, u32> {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&slot.dst_mac);
    macs[6..].copy_from_slice(&slot.src_mac);
    if !write(ctx, 0, macs) {
        return Err(bond_common::drops::TRUNCATED);
    }
    // SAFETY: a plain helper call; it only records where the frame goes.
    Ok(unsafe { aya_ebpf::helpers::bpf_redirect(slot.ifindex, 0) } as u32)
}

/// Applies `f` to the per-CPU stats of link `idx`.
#[inline(always)]
pub fn link_stats(map: &PerCpuArray<LinkStats>, idx: u32, f: impl FnOnce(&mut LinkStats)) {
    if let Some(s) = map.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, as in `count`.
        f(unsafe { &mut *s });
    }
}

/// Offsets and rules for rewriting one L4 header's port (or ICMP id).
#[derive(Clone, Copy)]
pub struct L4 {
    /// Offset of the 16-bit field that is rewritten.
    pub port_off: usize,
    /// Offset of the checksum covering it.
    pub check_off: usize,
    /// Whether the checksum covers the IPv4 pseudo-header (TCP, UDP).
    pub pseudo: bool,
    /// UDP's zero-means-none rule applies.
    pub udp: bool,
}

/// NAT rewrite of one side of an inner IPv4 packet at `ip_off`: the address
/// at `ip_off + addr_field` (12 = source, 16 = destination) becomes `addr`,
/// the L4 field described by `l4` becomes `port` (a fragment after the
/// first has no L4 header: `None`), TTL drops by one, and the IPv4 and L4
/// checksums are updated incrementally. Returns false if a field is out of
/// bounds (nothing is written in that case, apart from fields already
/// checked).
#[inline(always)]
pub fn nat_rewrite(
    ctx: &impl Packet,
    ip_off: usize,
    addr_field: usize,
    addr: u32,
    l4: Option<L4>,
    port: u16,
) -> bool {
    // One early return per read: see `try_terminal` on tuples of Options.
    let Some(old_addr) = read_u32(ctx, ip_off + addr_field) else {
        return false;
    };
    let Some(ttl_proto) = read_u16(ctx, ip_off + 8) else {
        return false;
    };
    let Some(ip_check) = read_u16(ctx, ip_off + 10) else {
        return false;
    };
    if let Some(l4) = l4 {
        let Some(old_port) = read_u16(ctx, l4.port_off) else {
            return false;
        };
        let Some(l4_check) = read_u16(ctx, l4.check_off) else {
            return false;
        };
        let l4_check = match (l4.pseudo, l4.udp) {
            (true, true) => csum::udp_replace16(
                csum::udp_replace32(l4_check, old_addr, addr),
                old_port,
                port,
            ),
            (true, false) => {
                csum::replace16(csum::replace32(l4_check, old_addr, addr), old_port, port)
            }
            (false, _) => csum::replace16(l4_check, old_port, port),
        };
        if !(write(ctx, l4.port_off, port.to_be_bytes())
            && write(ctx, l4.check_off, l4_check.to_be_bytes()))
        {
            return false;
        }
    }
    let new_ttl_proto = ttl_proto.wrapping_sub(0x100);
    let ip_check = csum::replace16(
        csum::replace32(ip_check, old_addr, addr),
        ttl_proto,
        new_ttl_proto,
    );
    write(ctx, ip_off + addr_field, addr.to_be_bytes())
        && write(ctx, ip_off + 8, new_ttl_proto.to_be_bytes())
        && write(ctx, ip_off + 10, ip_check.to_be_bytes())
}

/// Checks the outer lengths of a wrapped packet (its bond header already
/// found) whose outer IPv4 header starts at `l2` (14 behind Ethernet, 0 on
/// an L3 link): the IPv4 total length covers at least the wrap and does
/// not run past the frame (bytes after it are padding), and the UDP length
/// is the rest of it. A cut frame, or one whose headers lie, is
/// `outer_bad_header`. Returns the outer total length.
#[inline(always)]
pub fn outer_len(ctx: &impl Packet, l2: usize) -> Result<u16, u32> {
    let tot = read_u16(ctx, l2 + 2).ok_or(drops::TRUNCATED)?;
    let udp = read_u16(ctx, l2 + IPV4_LEN + 4).ok_or(drops::TRUNCATED)?;
    if usize::from(tot) < OUTER_LEN
        || usize::from(tot) > ctx.packet_len() - l2
        || udp != tot - IPV4_LEN as u16
    {
        return Err(drops::OUTER_BAD_HEADER);
    }
    Ok(tot)
}
