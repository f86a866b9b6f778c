//! Links shared by several senders.
//!
//! An origin sending over a peer's uplink shares that link's queue with
//! the peer and with every other origin sending over it. Each origin's
//! upstream model (`bond_common::edpf::Paths`) counts the link's whole
//! rate as its own, so two origins uploading at once offer each link
//! twice what it carries: the nearest link's modem drops, each flow
//! halves, and neither builds the queues that would reach the far links
//! (measured over `mixed`: two uploads at once kept 17-21 Mbit/s of the
//! 70 between them, where one alone keeps 62).
//!
//! The server sees every origin's packets arrive on every link. Its
//! playout counts them ([`Arrivals`]) and each FEEDBACK tells an origin
//! what the others carried on each link over the last [`WINDOW`]
//! (`bond_proto::control::LinkShare`). The origin then counts a link at its fair
//! share ([`fair_share`]: max-min, the link's rate less what others take
//! below an equal split, divided among those that want more), and back at
//! its whole rate when the others stop.

use std::collections::{HashMap, VecDeque};

use bond_proto::control::LinkShare;

/// How many report intervals the others' rates are taken over: 100 ms,
/// long enough to span a slow start's bursts, short enough to follow a
/// flow that starts or stops.
pub const SLOTS: usize = 5;
/// Others named per link, the busiest first: the rest are the least, and
/// a model that misses them is put right by the queue corrections.
pub use bond_proto::control::MAX_SHARERS;

/// Bytes arrived per community, link and origin, over the last [`SLOTS`]
/// report intervals.
#[derive(Debug, Default)]
pub struct Arrivals {
    /// (community, link, origin) -> bytes per interval, newest last; the
    /// last is the interval under way.
    seen: HashMap<(u32, u8, u32), VecDeque<u64>>,
}

impl Arrivals {
    /// A frame of `bytes` from `origin` arrived over `link` of community
    /// `c`.
    pub fn add(&mut self, c: u32, link: u8, origin: u32, bytes: usize) {
        let slots = self
            .seen
            .entry((c, link, origin))
            .or_insert_with(|| VecDeque::from([0]));
        if let Some(last) = slots.back_mut() {
            *last += bytes as u64;
        }
    }

    /// Starts the next interval; an origin that carried nothing on a link
    /// for [`SLOTS`] intervals is forgotten there.
    pub fn tick(&mut self) {
        self.seen.retain(|_, slots| {
            slots.push_back(0);
            while slots.len() > SLOTS {
                slots.pop_front();
            }
            slots.iter().any(|&b| b > 0)
        });
    }

    /// What every origin of community `c` but `origin` carried on each
    /// link, kbit/s over an interval of `every_ms`, links by id and each
    /// link's others busiest first. Links only `origin` carried are not
    /// named.
    pub fn others(&self, c: u32, origin: u32, every_ms: u64) -> Vec<LinkShare> {
        let mut by_link: HashMap<u8, Vec<u32>> = HashMap::new();
        for (&(com, link, o), slots) in &self.seen {
            if com != c || o == origin {
                continue;
            }
            // Full intervals only: the one under way has just begun.
            let full = slots.len().saturating_sub(1).max(1) as u64;
            let bytes: u64 = slots.iter().take(slots.len().saturating_sub(1)).sum();
            let kbit = bytes * 8 / (full * every_ms);
            if kbit > 0 {
                by_link
                    .entry(link)
                    .or_default()
                    .push(kbit.min(u64::from(u32::MAX)) as u32);
            }
        }
        let mut out: Vec<LinkShare> = by_link
            .into_iter()
            .map(|(link, mut others)| {
                others.sort_unstable_by(|a, b| b.cmp(a));
                others.truncate(MAX_SHARERS);
                LinkShare { link, others }
            })
            .collect();
        out.sort_unstable_by_key(|s| s.link);
        out
    }
}

/// The rate a sender counts a link of `kbit` at while others carry
/// `others` (kbit/s each) on it: max-min fair. Each other that carries
/// less than an equal split of what is left keeps what it carries; the
/// rest is split equally between this sender and the others that want
/// more. So one origin alone has the whole link, two that both want it
/// half each, and one beside a light flow all but that flow's rate.
pub fn fair_share(kbit: u64, others: &[u32]) -> u64 {
    let mut others: Vec<u64> = others.iter().map(|&o| u64::from(o)).collect();
    others.sort_unstable();
    let (mut left, mut n) = (kbit, others.len() as u64 + 1);
    for o in others {
        if o * n >= left {
            break;
        }
        left -= o;
        n -= 1;
    }
    left / n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_split_max_min_fair() {
        assert_eq!(fair_share(10_000, &[]), 10_000, "alone: all of it");
        assert_eq!(fair_share(10_000, &[10_000]), 5_000, "two that want it");
        assert_eq!(fair_share(10_000, &[6_000]), 5_000);
        assert_eq!(fair_share(10_000, &[2_000]), 8_000, "beside a light flow");
        assert_eq!(fair_share(9_000, &[1_000, 8_000]), 4_000);
        assert_eq!(fair_share(9_000, &[8_000, 1_000, 500]), 3_750);
        assert_eq!(fair_share(10_000, &[3_000, 3_000, 3_000]), 2_500);
        assert_eq!(fair_share(0, &[5]), 0);
    }

    #[test]
    fn two_that_want_all_settle_on_half_each() {
        // Each counts the link at its share of what the other carried in
        // the last round, and carries that: from 10/0 they meet at 5/5.
        let (mut a, mut b) = (10_000u64, 0u64);
        for _ in 0..4 {
            (a, b) = (
                fair_share(10_000, &[b as u32]),
                fair_share(10_000, &[a as u32]),
            );
        }
        assert_eq!((a, b), (5_000, 5_000));
    }

    #[test]
    fn arrivals_name_the_others_busiest_first_over_full_intervals() {
        let mut a = Arrivals::default();
        let (t1, t2, t3) = (1, 2, 3);
        for _ in 0..SLOTS {
            a.tick();
            a.add(1, 1, t1, 25_000); // 10 Mbit/s at 20 ms intervals
            a.add(1, 1, t2, 5_000); // 2 Mbit/s
            a.add(1, 2, t3, 50_000); // 20 Mbit/s
            a.add(2, 1, t3, 99_999); // another community
        }
        a.tick();
        // The interval under way counts for nothing yet.
        a.add(1, 1, t2, 1_000_000);
        let others = a.others(1, t1, 20);
        assert_eq!(
            others,
            vec![
                LinkShare {
                    link: 1,
                    others: vec![2_000]
                },
                LinkShare {
                    link: 2,
                    others: vec![20_000]
                },
            ]
        );
        let others = a.others(1, t3, 20);
        assert_eq!(others[0].link, 1);
        assert_eq!(others[0].others, vec![10_000, 2_000]);
        assert!(others.iter().all(|s| s.link != 2), "only t3 on link 2");
    }

    #[test]
    fn an_origin_that_stops_is_forgotten() {
        let mut a = Arrivals::default();
        a.add(1, 1, 7, 25_000);
        a.tick();
        assert_eq!(a.others(1, 1, 20).len(), 1);
        for _ in 0..SLOTS {
            a.tick();
        }
        assert!(a.others(1, 1, 20).is_empty());
        assert!(a.seen.is_empty());
    }
}
