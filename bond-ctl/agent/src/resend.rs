//! Sending again what a link lost.
//!
//! A link that drops a packet (a modem's full buffer, a radio's loss)
//! costs a TCP flow striped over several links a window cut, though every
//! other link delivered: one flow kept about 50 of 82 Mbit/s over `lte`
//! with 0.1% loss on one link (docs/benchmarks.md). So the loss is hidden
//! from the flow:
//!
//! - The sender numbers the packets it sends on each link (`BondHdr::seq`)
//!   and keeps a copy of each in a ring map (`Kept`).
//! - The receiving end's playout sees a number skipped when the link's
//!   next packet arrives (links keep their own order), holds everything
//!   sent after the link's previous packet, and asks at once (RESEND).
//! - The sender finds the copies ([`find`]) and sends each again on the
//!   link where it arrives first, marked a copy ([`again`]): the playout
//!   fills the gap with it and releases the flow in order, a few tens of
//!   ms late instead of lost.
//!
//! Both ways: the server keeps its downstream copies (`S_KEPT`), each
//! origin its upstream ones (`T_KEPT`).

use aya::maps::{Array, MapData};
use bond_common::{
    maps::{KEPT_SLOTS, Kept},
    wire::{BondHdr, ETH_LEN, IPV4_LEN, SEQ_COPY, UDP_LEN, seq_next},
};

pub use bond_api::reply::Resend;

use bond_proto::control::Gap;

/// The copies of community `community`'s packets to or from `origin`
/// that `gaps` name, from a sender's ring (`Maps::kept`); counts what was
/// asked in `stats`.
pub fn asked_for(
    stats: &mut Resend,
    (ring, next): (Array<MapData, Kept>, u32),
    community: u32,
    origin: u32,
    gaps: &[Gap],
) -> Vec<Kept> {
    stats.asked += gaps.iter().map(|g| u64::from(g.count)).sum::<u64>();
    find(|i| ring.get(&i, 0).ok(), next, community, origin, gaps)
}

/// A kept packet's bytes (bond header and inner packet) as a frame on a
/// link, as the schedule charges it.
pub fn frame_len(bytes: &[u8]) -> u32 {
    (ETH_LEN + IPV4_LEN + UDP_LEN + bytes.len()) as u32
}

/// The most copies one RESEND sends: a burst a modem dropped, not a
/// flood on a signed message's word.
pub const MAX_COPIES: usize = 256;
/// How far before the earliest gap the ring is searched, µs: two CPUs
/// write it in about, not exactly, send order.
const SLACK_US: i32 = 10_000;

/// Whether wrapping µs stamp `a` is before `b`.
fn before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// Whether copy `k` is a packet `gap` names.
fn wanted(gap: &Gap, k: &Kept) -> bool {
    if k.link != gap.link || !before(gap.after_us, k.sent_us) || !before(k.sent_us, gap.before_us) {
        return false;
    }
    let mut s = gap.first;
    for _ in 0..gap.count {
        if s == k.seq {
            return true;
        }
        s = seq_next(s);
    }
    false
}

/// The copies of community `community`'s packets to `origin` that `gaps`
/// name, newest first, from ring slots `slot(i)`, `next` being the slot
/// the sender writes next. Slots are read back from the newest until one
/// is older than every gap, empty, or the ring has come round.
pub fn find(
    mut slot: impl FnMut(u32) -> Option<Kept>,
    next: u32,
    community: u32,
    origin: u32,
    gaps: &[Gap],
) -> Vec<Kept> {
    let Some(oldest) = gaps
        .iter()
        .map(|g| g.after_us)
        .min_by_key(|&a| a.wrapping_sub(gaps[0].after_us) as i32)
    else {
        return Vec::new();
    };
    let want: usize = gaps.iter().map(|g| usize::from(g.count)).sum();
    let mut out = Vec::new();
    for back in 1..=KEPT_SLOTS {
        let Some(k) = slot(next.wrapping_sub(back) % KEPT_SLOTS) else {
            break;
        };
        if k.len == 0 || before(k.sent_us, oldest.wrapping_sub(SLACK_US as u32)) {
            break;
        }
        let ours = k.community == community
            && k.bytes()
                .and_then(|b| BondHdr::parse(b).ok())
                .is_some_and(|h| h.origin() == origin);
        if ours && gaps.iter().any(|g| wanted(g, &k)) {
            out.push(k);
            if out.len() >= want.min(MAX_COPIES) {
                break;
            }
        }
    }
    out
}

/// A kept packet (bond header and inner packet) as it is sent again on
/// link `on`: the header names the link it comes on (the server checks a
/// DATA_UP's source against it) and is marked a copy, keeping its number
/// on the link it was first sent on.
pub fn again(bytes: &[u8], on: u8) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if let Ok(mut h) = BondHdr::parse(&b) {
        h.link = on;
        h.seq |= SEQ_COPY;
        let _ = h.emit(&mut b);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use bond_common::wire::kind;

    /// A copy of a DATA_DOWN packet to `origin` on `link`.
    fn kept(community: u32, origin: u32, link: u8, seq: u8, sent_us: u32) -> Kept {
        let mut k = Kept::EMPTY;
        let h = BondHdr::new(kind::DATA_DOWN, community, link, origin, sent_us, 9).with_seq(seq);
        k.data[..BondHdr::LEN].copy_from_slice(&h.to_bytes());
        k.len = (BondHdr::LEN + 40) as u16;
        (k.community, k.link, k.seq, k.sent_us) = (community, link, seq, sent_us);
        k
    }

    /// A ring of `n` packets sent 100 µs apart from `t0`, round-robin over
    /// links 1 and 2, each link numbering its own from `seq0`.
    fn ring(n: u32, t0: u32, seq0: u8) -> Vec<Kept> {
        let mut seqs = [seq0, seq0];
        (0..n)
            .map(|i| {
                let l = (i % 2) as usize;
                let k = kept(
                    7,
                    0x0a00_0103,
                    l as u8 + 1,
                    seqs[l],
                    t0.wrapping_add(i * 100),
                );
                seqs[l] = seq_next(seqs[l]);
                k
            })
            .collect()
    }

    fn run(r: &[Kept], gaps: &[Gap]) -> Vec<(u8, u8, u32)> {
        let slot = |i: u32| r.get(i as usize).copied().or(Some(Kept::EMPTY));
        let mut got: Vec<_> = find(slot, r.len() as u32, 7, 0x0a00_0103, gaps)
            .iter()
            .map(|k| (k.link, k.seq, k.sent_us))
            .collect();
        got.sort();
        got
    }

    #[test]
    fn finds_the_packets_a_gap_names_and_no_others() {
        let r = ring(100, 1_000_000, 1);
        // Link 1 carried packets 0, 2, 4, ... numbered 1, 2, 3, ...; its
        // numbers 11 and 12 (packets 20 and 22, sent at +2000 and +2200)
        // went missing between number 10 (+1800) and 13 (+2400).
        let g = Gap {
            link: 1,
            after_us: 1_001_800,
            before_us: 1_002_400,
            first: 11,
            count: 2,
        };
        assert_eq!(run(&r, &[g]), vec![(1, 11, 1_002_000), (1, 12, 1_002_200)]);
        // Another origin's, another community's or another link's: none.
        let slot = |i: u32| r.get(i as usize).copied();
        assert!(find(slot, 100, 7, 0x0a00_0104, &[g]).is_empty());
        assert!(find(slot, 100, 8, 0x0a00_0103, &[g]).is_empty());
        assert!(run(&r, &[Gap { link: 3, ..g }]).is_empty());
        // A number outside the sent-time bracket is a newer round.
        assert!(
            run(
                &r,
                &[Gap {
                    before_us: 1_001_900,
                    ..g
                }]
            )
            .is_empty()
        );
    }

    #[test]
    fn a_copy_names_the_link_it_comes_on_and_keeps_its_number() {
        let k = kept(7, 0x0a00_0103, 2, 45, 1_000);
        let b = again(k.bytes().unwrap(), 1);
        let h = BondHdr::parse(&b).unwrap();
        assert_eq!((h.link, h.seq), (1, 45 | SEQ_COPY));
        assert_eq!(h.sent_us(), 1_000);
        let before = BondHdr::parse(k.bytes().unwrap()).unwrap();
        assert_eq!(
            BondHdr {
                link: before.link,
                seq: before.seq,
                ..h
            },
            before,
            "the rest of the header unchanged"
        );
        assert_eq!(
            &b[BondHdr::LEN..],
            &k.bytes().unwrap()[BondHdr::LEN..],
            "the packet unchanged"
        );
    }

    #[test]
    fn numbers_and_clocks_wrap() {
        // Numbers 126, 127, 1, 2 on link 1; the clock wraps mid-ring.
        let r = ring(20, u32::MAX - 900, 122);
        let t = |i: u32| (u32::MAX - 900).wrapping_add(i * 100);
        let g = Gap {
            link: 1,
            after_us: t(6),
            before_us: t(14),
            first: 126,
            count: 3,
        };
        assert_eq!(
            run(&r, &[g]),
            vec![(1, 1, t(12)), (1, 126, t(8)), (1, 127, t(10))]
        );
    }

    #[test]
    fn stops_at_what_is_older_than_every_gap() {
        let r = ring(1000, 5_000_000, 1);
        let mut read = 0;
        let slot = |i: u32| {
            read += 1;
            r.get(i as usize).copied()
        };
        let g = Gap {
            link: 2,
            after_us: 5_000_000 + 990 * 100,
            before_us: 5_000_000 + 999 * 100,
            first: 1,
            count: 127,
        };
        find(slot, 1000, 7, 0x0a00_0103, &[g]);
        // Back to 10 ms before the gap: 100 slots and the 10 of the gap.
        assert!(read <= 112, "read {read} slots");
    }
}
