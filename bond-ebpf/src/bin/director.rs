//! The ISP tier's director: `bond_director`, XDP on the interfaces that
//! carry the front address.
//!
//! bond traffic to the front address and port (IPv4, or IPv6 to the
//! front IPv6 address) is steered by the community id in its bond header
//! to the node that owns the community (`D_OWNERS`, mirrored by the
//! director's agent from the registry), by rewriting the Ethernet header
//! and redirecting the frame out of the interface towards that node
//! (`D_NODES`). Nothing else changes: the node holds the front address
//! too and answers from it directly (direct server return), so replies
//! never pass the director. Stateless: no per-flow or per-terminal state,
//! only the owner table, so any number of directors can share the work.
//!
//! Everything that is not bond traffic to the front is passed to the
//! kernel (ARP, the director's own services). bond traffic that cannot be
//! steered is dropped and counted: a header cut short (`truncated`), an
//! outer IPv4 header with options or a fragment (`outer_bad_header`), a
//! bad magic (`bad_magic`), a header of another version (`bad_version`), a
//! community no live node owns (`no_owner`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use bond_common::{
    drops,
    maps::{CommunityId, DirectorConfig, LinkStats, MAX_NODES, MAX_TIER_COMMUNITIES, NodeSlot},
    wire::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_UDP, IPV4_LEN, MAGIC, UDP_LEN, VERSION},
};
use bond_ebpf::{dropped, link_stats, read, read_u16, read_u32, redirect_to};

#[map]
static D_CONFIG: Array<DirectorConfig> = Array::pinned(1, 0);
/// Each community's owner: 1 + its node's index in `D_NODES`; 0: none.
#[map]
static D_OWNERS: HashMap<CommunityId, u32> =
    HashMap::pinned(MAX_TIER_COMMUNITIES, BPF_F_NO_PREALLOC);
#[map]
static D_NODES: Array<NodeSlot> = Array::pinned(MAX_NODES, 0);
/// Per node: packets and bytes steered to it (`up_pkts`, `up_bytes`).
#[map]
static D_STATS: PerCpuArray<LinkStats> = PerCpuArray::pinned(MAX_NODES, 0);
#[map]
static D_DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drops::COUNT, 0);

const IPV6_LEN: usize = 40;

#[xdp]
pub fn bond_director(ctx: XdpContext) -> u32 {
    match steer(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            dropped(&ctx, &D_DROPS, reason);
            xdp_action::XDP_DROP
        }
    }
}

/// Where the bond header starts, if the frame is bond traffic to the
/// front; Ok(None) for anything else (the kernel's).
#[inline(always)]
fn bond_offset(ctx: &XdpContext, cfg: &DirectorConfig) -> Result<Option<usize>, u32> {
    let Some(proto) = read_u16(ctx, 12) else {
        return Ok(None);
    };
    match proto {
        ETH_P_IP => {
            let (Some(vihl), Some(l4), Some(dst)) = (
                read::<1>(ctx, ETH_LEN),
                read::<1>(ctx, ETH_LEN + 9),
                read_u32(ctx, ETH_LEN + 16),
            ) else {
                return Ok(None);
            };
            if l4[0] != IPPROTO_UDP || dst != cfg.front_ip || cfg.front_ip == 0 {
                return Ok(None);
            }
            // Options would move the UDP header, and a later fragment has
            // none: neither is what a terminal sends.
            let frag = read_u16(ctx, ETH_LEN + 6).ok_or(drops::TRUNCATED)?;
            if vihl[0] != 0x45 || frag & 0x3fff != 0 {
                return Err(drops::OUTER_BAD_HEADER);
            }
            let port = read_u16(ctx, ETH_LEN + IPV4_LEN + 2).ok_or(drops::TRUNCATED)?;
            Ok((port == cfg.port).then_some(ETH_LEN + IPV4_LEN + UDP_LEN))
        }
        ETH_P_IPV6 => {
            let (Some(next), Some(dst)) =
                (read::<1>(ctx, ETH_LEN + 6), read::<16>(ctx, ETH_LEN + 24))
            else {
                return Ok(None);
            };
            if next[0] != IPPROTO_UDP || dst != cfg.front_ip6 || cfg.front_ip6 == [0; 16] {
                return Ok(None);
            }
            let port = read_u16(ctx, ETH_LEN + IPV6_LEN + 2).ok_or(drops::TRUNCATED)?;
            Ok((port == cfg.port).then_some(ETH_LEN + IPV6_LEN + UDP_LEN))
        }
        _ => Ok(None),
    }
}

#[inline(always)]
fn steer(ctx: &XdpContext) -> Result<u32, u32> {
    let Some(cfg) = D_CONFIG.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let Some(off) = bond_offset(ctx, cfg)? else {
        return Ok(xdp_action::XDP_PASS);
    };
    // The magic, the version and the community: the first 8 bytes of the
    // bond header, the same in every kind (the node checks the rest).
    let h = read::<8>(ctx, off).ok_or(drops::TRUNCATED)?;
    if u16::from_be_bytes([h[0], h[1]]) != MAGIC {
        return Err(drops::BAD_MAGIC);
    }
    if h[2] != VERSION {
        return Err(drops::BAD_VERSION);
    }
    let community = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    // SAFETY: read-only use of a map value.
    let owner = unsafe { D_OWNERS.get(community) }.copied().unwrap_or(0);
    let idx = owner.checked_sub(1).ok_or(drops::NO_OWNER)?;
    let slot = D_NODES.get(idx).ok_or(drops::NO_OWNER)?;
    if slot.ifindex == 0 {
        return Err(drops::NO_OWNER);
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let action = redirect_to(ctx, slot)?;
    link_stats(&D_STATS, idx, |s| {
        s.up_pkts += 1;
        s.up_bytes += len;
    });
    Ok(action)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
