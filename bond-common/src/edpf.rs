//! Earliest delivery path first (EDPF, Chebrolu and Rao 2006): send each
//! packet on the link where it would arrive first.
//!
//! Per link the sender keeps a virtual finish time (when what it has queued
//! there will have left), the link's delivery rate, and its one-way delay
//! relative to the other links (both measured by the receiving end). A
//! packet of `len` bytes sent now on link `i` would arrive at
//!
//! ```text
//! arrival(i) = max(now, finish(i)) + len / rate(i) + delay(i)
//! ```
//!
//! The packet takes the link of the earliest arrival, whose finish time
//! then moves on by `len / rate(i)`. Two consequences carry the design:
//!
//! - Packets arrive in the order they were sent, as far as the estimates
//!   hold: every link's arrival time only grows, so the earliest one does.
//!   A link of longer delay is used only once the faster links' queues are
//!   that long, which fills a delay gap rather than reordering across it.
//! - A link whose delay is longer than the others' queues ever get is never
//!   chosen: it cannot help the flow and is left out of it. Each link's
//!   virtual queue is held to what a real link buffers
//!   ([`Paths::pick`]'s `max_backlog_ns`): beyond that the real link drops
//!   rather than queues, so a sender that offers more than the links carry
//!   (TCP probing for more) does not talk itself into a queue of seconds on
//!   the fast links and send the excess over a satellite. A link too slow
//!   to help stays out even under a saturating load.
//!
//! Times are nanoseconds of the sender's monotonic clock; rates are kept as
//! the time one KiB takes (`ns_per_kib`), so a pick is multiplications and
//! shifts, no division (the BPF programs run it per packet).

/// Links one sender spreads over (a community's links, or an origin's).
pub const MAX_PATHS: usize = 16;

/// `Path::flags`: the link may be chosen.
pub const PATH_USABLE: u8 = 1;

/// One link as a sender sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Path {
    /// When what the sender has queued on this link will have left.
    pub finish_ns: u64,
    /// Time one KiB takes on the link: 8 * 2^10 * 10^9 / rate in bit/s.
    pub ns_per_kib: u64,
    /// One-way delay relative to the link of least delay.
    pub delay_ns: u32,
    /// The link id, as in the bond header.
    pub link: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Path>() == 24);

impl Path {
    /// A usable link of `kbit` kbit/s and relative delay `delay_ns`.
    pub const fn new(link: u8, kbit: u64, delay_ns: u32) -> Self {
        Self {
            finish_ns: 0,
            ns_per_kib: ns_per_kib(kbit),
            delay_ns,
            link,
            flags: PATH_USABLE,
            _pad: [0; 2],
        }
    }

    /// Time `len` bytes take on this link.
    #[inline(always)]
    pub const fn tx_ns(&self, len: u32) -> u64 {
        (len as u64 * self.ns_per_kib) >> 10
    }

    /// When a packet of `len` bytes sent at `now` would arrive.
    #[inline(always)]
    pub const fn arrival(&self, now: u64, len: u32) -> u64 {
        let start = if self.finish_ns > now {
            self.finish_ns
        } else {
            now
        };
        start + self.tx_ns(len) + self.delay_ns as u64
    }
}

/// `ns_per_kib` for a rate in kbit/s (0 kbit/s: the slowest representable).
pub const fn ns_per_kib(kbit: u64) -> u64 {
    // 8 bit * 1024 B * 1e9 ns / (kbit * 1000) = 8_192_000_000 / kbit.
    let k = if kbit == 0 { 1 } else { kbit };
    8_192_000_000 / k
}

/// A sender's links.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paths {
    pub len: u32,
    pub _pad: u32,
    pub paths: [Path; MAX_PATHS],
}
const _: () = assert!(core::mem::size_of::<Paths>() == 8 + 24 * MAX_PATHS);

impl Paths {
    pub const EMPTY: Self = Self {
        len: 0,
        _pad: 0,
        paths: [Path {
            finish_ns: 0,
            ns_per_kib: 0,
            delay_ns: 0,
            link: 0,
            flags: 0,
            _pad: [0; 2],
        }; MAX_PATHS],
    };

    /// Chooses the link for a packet of `len` bytes sent at `now` and
    /// charges it to that link; returns the link id, or `None` when no link
    /// is usable. No link's queue is counted as longer than
    /// `max_backlog_ns`: what goes beyond it the real link drops.
    #[inline(always)]
    pub fn pick(&mut self, now: u64, len: u32, max_backlog_ns: u64) -> Option<u8> {
        let n = if self.len as usize > MAX_PATHS {
            MAX_PATHS
        } else {
            self.len as usize
        };
        let cap = now + max_backlog_ns;
        let start = |p: &Path| {
            if p.finish_ns < now {
                now
            } else if p.finish_ns > cap {
                cap
            } else {
                p.finish_ns
            }
        };
        let mut best: Option<(u64, usize)> = None;
        let mut i = 0;
        while i < MAX_PATHS {
            if i >= n {
                break;
            }
            let p = &self.paths[i];
            if p.flags & PATH_USABLE != 0 {
                let at = start(p) + p.tx_ns(len) + p.delay_ns as u64;
                if best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, i));
                }
            }
            i += 1;
        }
        let (_, i) = best?;
        let p = &mut self.paths[i & (MAX_PATHS - 1)];
        p.finish_ns = start(p) + p.tx_ns(len);
        Some(p.link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const MTU: u32 = 1500;
    /// A queue bound like a modem's: 50 ms.
    const BACKLOG: u64 = 50 * MS;

    fn paths(links: &[(u64, u32)]) -> Paths {
        let mut p = Paths::EMPTY;
        for (i, &(kbit, delay_ms)) in links.iter().enumerate() {
            p.paths[i] = Path::new(i as u8 + 1, kbit, delay_ms * MS as u32);
        }
        p.len = links.len() as u32;
        p
    }

    /// The links as they really are: each a FIFO of its true rate and
    /// delay. Feeds `count` packets of MTU size at `offered_kbit` through
    /// `paths` (the sender's estimates) and returns each packet's link and
    /// real arrival time.
    fn run(p: &mut Paths, truth: &[(u64, u32)], offered_kbit: u64, count: usize) -> Vec<(u8, u64)> {
        run_from(0, p, truth, offered_kbit, count)
    }

    /// As `run`, the first packet sent at `t0`.
    fn run_from(
        t0: u64,
        p: &mut Paths,
        truth: &[(u64, u32)],
        offered_kbit: u64,
        count: usize,
    ) -> Vec<(u8, u64)> {
        let gap = Path::new(0, offered_kbit, 0).tx_ns(MTU);
        let mut busy = vec![0u64; truth.len()];
        (0..count)
            .map(|k| {
                let now = t0 + k as u64 * gap;
                let link = p.pick(now, MTU, BACKLOG).expect("a link");
                let i = usize::from(link - 1);
                let real = Path::new(link, truth[i].0, truth[i].1 * MS as u32);
                busy[i] = busy[i].max(now) + real.tx_ns(MTU);
                (link, busy[i] + u64::from(real.delay_ns))
            })
            .collect()
    }

    fn shares(out: &[(u8, u64)], links: usize) -> Vec<f64> {
        (1..=links as u8)
            .map(|l| out.iter().filter(|(x, _)| *x == l).count() as f64 / out.len() as f64)
            .collect()
    }

    /// Packets that arrive after one sent later than them did.
    fn reordered(out: &[(u8, u64)]) -> usize {
        let mut latest = 0;
        out.iter()
            .filter(|&&(_, at)| {
                let late = at < latest;
                latest = latest.max(at);
                late
            })
            .count()
    }

    #[test]
    fn equal_delays_share_in_proportion_to_rate() {
        // Today's lab: 10/20/40 Mbit/s, no delay, a saturating sender.
        let links = [(10_000, 0), (20_000, 0), (40_000, 0)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 70_000, 7000);
        let s = shares(&out, 3);
        for (got, want) in s.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
            assert!((got - want).abs() < 0.01, "{s:?}");
        }
        assert_eq!(reordered(&out), 0);
    }

    #[test]
    fn seed_weights_a2_b1_c2_give_the_seed_order_on_equal_links() {
        // The weighted round robin's test vector holds for EDPF too: with
        // rates 2:1:2 and no delay the shares are 2:1:2.
        let links = [(20_000, 0), (10_000, 0), (20_000, 0)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 50_000, 5000);
        let s = shares(&out, 3);
        assert!(
            (s[0] - 0.4).abs() < 0.01 && (s[1] - 0.2).abs() < 0.01,
            "{s:?}"
        );
    }

    #[test]
    fn a_35_ms_delay_gap_is_filled_without_reordering() {
        // Links of 5 and 40 ms: the fast one carries the first 35 ms alone,
        // then both share, and nothing arrives out of order.
        let links = [(20_000, 5), (20_000, 40)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 40_000, 20_000);
        assert_eq!(reordered(&out), 0);
        let first_slow = out
            .iter()
            .position(|(l, _)| *l == 2)
            .expect("slow link used");
        // The fast link's queue grows by 0.3 ms a packet (sent every 0.3
        // ms, 0.6 ms on the link): 35 ms after about 117 packets.
        assert!((110..125).contains(&first_slow), "{first_slow}");
        let s = shares(&out[1000..], 2);
        assert!((s[0] - 0.5).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn a_link_too_slow_to_help_is_left_out() {
        // A satellite link at 300 ms next to terrestrial ones at 10 and
        // 20 ms: their queues never reach 290 ms, so it carries nothing,
        // at a light load or a saturating one.
        let links = [(10_000, 10), (20_000, 20), (30_000, 300)];
        for offered in [20_000, 60_000, 100_000] {
            let mut p = paths(&links);
            let out = run(&mut p, &links, offered, 10_000);
            assert_eq!(shares(&out, 3)[2], 0.0, "offered {offered} kbit/s");
        }
    }

    #[test]
    fn a_light_load_stays_on_the_link_of_least_delay() {
        let links = [(10_000, 5), (20_000, 20), (40_000, 40)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 5_000, 2000);
        assert_eq!(shares(&out, 3)[0], 1.0);
    }

    #[test]
    fn mixed_links_are_all_used_under_load_and_keep_order() {
        // The `mixed` profile under a saturating sender: every link
        // carries about its rate's share, no reordering.
        let links = [(10_000, 5), (20_000, 20), (40_000, 40)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 70_000, 30_000);
        assert_eq!(reordered(&out), 0);
        let s = shares(&out[3000..], 3);
        for (got, want) in s.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
            assert!((got - want).abs() < 0.02, "{s:?}");
        }
    }

    #[test]
    fn a_rate_change_is_followed() {
        let links = [(20_000, 0), (20_000, 0)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 40_000, 4000);
        assert!((shares(&out, 2)[0] - 0.5).abs() < 0.01);
        // Link 2 retrains to 5 Mbit/s; its new estimate arrives.
        p.paths[1].ns_per_kib = ns_per_kib(5_000);
        let slower = [(20_000, 0), (5_000, 0)];
        let t0 = 4000 * Path::new(0, 40_000, 0).tx_ns(MTU);
        let out = run_from(t0, &mut p, &slower, 25_000, 4000);
        let s = shares(&out[200..], 2);
        assert!((s[1] - 0.2).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn a_link_that_is_not_usable_is_never_picked() {
        let links = [(20_000, 0), (40_000, 0)];
        let mut p = paths(&links);
        p.paths[1].flags = 0;
        let out = run(&mut p, &links, 60_000, 1000);
        assert_eq!(shares(&out, 2), vec![1.0, 0.0]);
        p.paths[0].flags = 0;
        assert_eq!(p.pick(0, MTU, BACKLOG), None);
        assert_eq!(Paths::EMPTY.clone().pick(0, MTU, BACKLOG), None);
    }

    #[test]
    fn a_queue_is_counted_no_longer_than_a_real_buffer() {
        // Link 1's rate was overestimated and its virtual queue runs a
        // second ahead; the real one holds 50 ms. Link 2 at 100 ms delay
        // would win if the second were believed.
        let mut p = paths(&[(40_000, 0), (10_000, 100)]);
        p.paths[0].finish_ns = 1000 * MS;
        assert_eq!(p.pick(0, MTU, BACKLOG), Some(1));
        assert!(
            p.paths[0].finish_ns <= BACKLOG + MS,
            "{}",
            p.paths[0].finish_ns
        );
        // Within the bound the queue counts in full: 40 ms of queue on
        // link 1 against 100 ms of delay on link 2 still favours link 1,
        // 30 ms of queue against 20 ms of delay does not.
        let mut p = paths(&[(40_000, 0), (10_000, 20)]);
        p.paths[0].finish_ns = 30 * MS;
        assert_eq!(p.pick(0, MTU, BACKLOG), Some(2));
    }

    #[test]
    fn a_corrupt_length_stays_in_bounds() {
        let mut p = paths(&[(10_000, 0)]);
        p.len = 1000;
        assert_eq!(p.pick(0, MTU, BACKLOG), Some(1));
    }

    #[test]
    fn pure_acks_take_the_link_of_least_delay() {
        // A 52-byte ACK on idle links arrives first on the lowest delay,
        // whatever the rates.
        let mut p = paths(&[(40_000, 40), (10_000, 5), (20_000, 20)]);
        assert_eq!(p.pick(0, 52, BACKLOG), Some(2));
    }

    #[test]
    fn rates_convert_both_ways() {
        // 10 Mbit/s: a 1500-byte packet takes 1.2 ms.
        let p = Path::new(1, 10_000, 0);
        assert!(
            (p.tx_ns(1500) as i64 - 1_200_000).abs() < 1000,
            "{}",
            p.tx_ns(1500)
        );
        assert_eq!(ns_per_kib(0), 8_192_000_000);
    }
}
