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
//!   ([`Paths::backlog_us`]): beyond that the real link drops rather than
//!   queues. A full link is passed over while any has room, and a link
//!   whose delay exceeds what a buffer holds is left out, so a sender that
//!   offers more than the links carry (TCP probing for more) neither piles
//!   its excess onto the fastest link nor sends it over a satellite.
//!
//! Times are nanoseconds of the sender's monotonic clock; rates are kept as
//! the time one KiB takes (`ns_per_kib`), so a pick is multiplications and
//! shifts, no division (the BPF programs run it per packet).

/// Links one sender spreads over (a community's links, or an origin's).
/// The BPF verifier walks the pick's loop once per path and state: 16
/// costs it a few thousand instructions, 32 over its million.
pub const MAX_PATHS: usize = 16;
const _: () = assert!(MAX_PATHS.is_power_of_two(), "pick masks with MAX_PATHS - 1");

/// How long a queue a sender counts on any link, by default: what a real
/// uplink's buffer holds (a DSL or cable modem's is tens of ms). Beyond it
/// the link drops rather than queues.
pub const DEFAULT_BACKLOG_US: u32 = 50_000;

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
    /// One-way delay relative to the link of least delay: the base, from
    /// the links' least round trips.
    pub delay_ns: u32,
    /// What the sender calls the link: the id in the bond header (an
    /// origin), or the dense link index (the server).
    pub id: u32,
    pub flags: u8,
    pub _pad: [u8; 3],
    /// How much later than its base the link delivers now, as the
    /// receiving end last saw a packet that met no queue there: jitter
    /// (an LTE cell's scheduler), which holds for longer than a queue
    /// the model drains (`bond_agent::feedback`).
    pub extra_ns: u32,
}
const _: () = assert!(core::mem::size_of::<Path>() == 32);

impl Path {
    /// A usable link of `kbit` kbit/s and relative delay `delay_ns`.
    pub const fn new(id: u32, kbit: u64, delay_ns: u32) -> Self {
        Self {
            finish_ns: 0,
            ns_per_kib: ns_per_kib(kbit),
            delay_ns,
            id,
            flags: PATH_USABLE,
            _pad: [0; 3],
            extra_ns: 0,
        }
    }

    /// The rate this path was made with, kbit/s (as rounded).
    pub const fn kbit(&self) -> u64 {
        match 8_192_000_000u64.checked_div(self.ns_per_kib) {
            Some(k) => k,
            None => 0,
        }
    }

    /// Time `len` bytes take on this link.
    #[inline(always)]
    pub const fn tx_ns(&self, len: u32) -> u64 {
        (len as u64 * self.ns_per_kib) >> 10
    }

    /// The link's one-way delay now, relative to the link of least base.
    #[inline(always)]
    pub const fn delay_now_ns(&self) -> u64 {
        self.delay_ns as u64 + self.extra_ns as u64
    }

    /// When a packet of `len` bytes sent at `now` would arrive.
    #[inline(always)]
    pub const fn arrival(&self, now: u64, len: u32) -> u64 {
        let start = if self.finish_ns > now {
            self.finish_ns
        } else {
            now
        };
        start + self.tx_ns(len) + self.delay_now_ns()
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
    /// The longest queue counted on any link, microseconds.
    pub backlog_us: u32,
    /// How much later than `backlog_us` a packet may arrive and still be
    /// put in order by the receiver's playout (`bond_agent::playout`),
    /// microseconds; 0 where the receiver has none.
    pub reorder_us: u32,
    pub _pad: u32,
    pub paths: [Path; MAX_PATHS],
}
const _: () = assert!(core::mem::size_of::<Paths>() == 16 + 32 * MAX_PATHS);

/// More links than a sender can spread over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyLinks;

impl Paths {
    pub const EMPTY: Self = Self {
        len: 0,
        backlog_us: DEFAULT_BACKLOG_US,
        reorder_us: 0,
        _pad: 0,
        paths: [Path {
            finish_ns: 0,
            ns_per_kib: 0,
            delay_ns: 0,
            id: 0,
            flags: 0,
            _pad: [0; 3],
            extra_ns: 0,
        }; MAX_PATHS],
    };

    /// The paths for `(id, kbit/s, relative delay in ns)` triples, in that
    /// order; links of rate zero are left out. Each rate is taken as given,
    /// with no margin either way: the model's queue drifts from the real
    /// one by the rate error for as long as the link stays busy, whichever
    /// way it errs. A model slower than the link keeps a queue the link
    /// has long drained, and the link's packets then arrive a whole delay
    /// gap before those sent earlier on slower links (measured: counted at
    /// 95%, one download over `mixed` arrived with every packet of the two
    /// far links late by their full relative delay, 14 and 34 ms, and the
    /// server took 3,155 DSACKs in 8 s; at 100%, 17).
    pub fn from_links(links: &[(u32, u64, u32)]) -> Result<Self, TooManyLinks> {
        let mut p = Self::EMPTY;
        for &(id, kbit, delay_ns) in links.iter().filter(|l| l.1 > 0) {
            let slot = p.paths.get_mut(p.len as usize).ok_or(TooManyLinks)?;
            *slot = Path::new(id, kbit, delay_ns);
            p.len += 1;
        }
        Ok(p)
    }

    /// Link `id`, if the schedule has it.
    fn path_mut(&mut self, id: u32) -> Option<&mut Path> {
        let n = (self.len as usize).min(MAX_PATHS);
        self.paths[..n].iter_mut().find(|p| p.id == id)
    }

    /// The links in use, as `from_links` took them.
    pub fn links(&self) -> impl Iterator<Item = &Path> {
        self.paths[..(self.len as usize).min(MAX_PATHS)].iter()
    }

    /// Whether [`Self::pick`] can choose `p` at all: its base delay within
    /// the backlog (a farther link, or one whose delay is unmeasured,
    /// never fills its gap and is left out).
    pub const fn reaches(&self, p: &Path) -> bool {
        p.delay_ns as u64 <= self.backlog_us as u64 * 1000
    }

    /// Chooses the link for a packet of `len` bytes sent at `now` and
    /// charges it to that link; returns the link id, or `None` when no link
    /// is usable.
    ///
    /// `backlog_us` is what a link buffers, and so the horizon: a packet
    /// that would arrive later than `now + backlog_us` on a link (queue
    /// plus relative delay) finds that link full, and any link with room
    /// goes first, however late its arrival. A receiver that puts packets
    /// back in order widens the horizon by `reorder_us`; a link's own queue
    /// still holds no more than `backlog_us`. So the link of least delay
    /// fills to the whole buffer and a link of 40 ms more delay to 40 ms
    /// less: every link stays busy and arrivals stay in order, even when
    /// the sender offers more than the links carry. When all are full the
    /// packet is refused ([`Refused::Full`]): sent anyway it would sit in
    /// a real buffer past the horizon and arrive after packets sent later,
    /// which TCP takes for loss. A link whose base delay exceeds
    /// `backlog_us` can never fill its gap with queued packets and is left
    /// out. Its jitter ([`Path::extra_ns`]) counts in its arrivals but
    /// never leaves it out: only packets sent over it show the jitter has
    /// passed.
    #[inline(always)]
    pub fn pick(&mut self, now: u64, len: u32) -> Result<u32, Refused> {
        let n = if self.len as usize > MAX_PATHS {
            MAX_PATHS
        } else {
            self.len as usize
        };
        let backlog = self.backlog_us as u64 * 1000;
        // A link's own buffer, and the latest arrival still put in order.
        let full_at = now + backlog;
        let cap = full_at + self.reorder_us as u64 * 1000;
        // Plain sentinels, not an Option: LLVM may compute on the undefined
        // payload of a None, which the BPF verifier rejects. One tracker
        // only: full links are pushed back by FULL rather than tracked
        // apart (a second precise index would multiply the verifier's
        // states).
        let mut best_at = u64::MAX;
        let mut best = MAX_PATHS;
        let mut i = 0;
        while i < MAX_PATHS {
            if i >= n {
                break;
            }
            let p = &self.paths[i];
            if p.flags & PATH_USABLE != 0 && p.delay_ns as u64 <= backlog {
                let start = if p.finish_ns > now { p.finish_ns } else { now };
                // When it would arrive; behind every link with room if it
                // would arrive past the horizon.
                let done = start + p.tx_ns(len);
                let mut at = done + p.delay_now_ns();
                if at > cap || done > full_at {
                    at += FULL;
                }
                if at < best_at {
                    best_at = at;
                    best = i;
                }
            }
            i += 1;
        }
        if best >= MAX_PATHS {
            return Err(Refused::NoLinks);
        }
        // A link with room arrives by `cap`; only full ones land past it.
        // (Not `best_at >= FULL`: times are the host's monotonic clock,
        // which passes 2^44 ns after 4.9 hours of uptime, and from then on
        // every packet was refused.)
        if best_at > cap {
            return Err(Refused::Full);
        }
        let p = &mut self.paths[best & (MAX_PATHS - 1)];
        let start = if p.finish_ns > now { p.finish_ns } else { now };
        p.finish_ns = start + p.tx_ns(len);
        Ok(p.id)
    }

    /// Counts `count` packets of `len` bytes that link `id` carries outside
    /// the schedule (a probe train) into its queue, as picks would have:
    /// uncharged, they delay every packet the model sends after them.
    /// Returns when the train will have left (the link's new finish
    /// time), or `None` when the link is not in the schedule.
    pub fn charge(&mut self, id: u32, now: u64, count: u32, len: u32) -> Option<u64> {
        let p = self.path_mut(id)?;
        p.finish_ns = p.finish_ns.max(now) + u64::from(count) * p.tx_ns(len);
        Some(p.finish_ns)
    }

    /// Moves link `id`'s queue by `err_ns`, what the receiving end saw its
    /// packets wait beyond what this model counted (`bond_agent::feedback`):
    /// later when the link drains slower than its rate says (a rate
    /// estimate a little high, a rate step, other senders on it, jitter),
    /// sooner when faster. Never past twice the horizon, so one wrong
    /// report cannot shut a link for long. Returns how far the queue
    /// moved, or `None` when the link is not in the schedule.
    pub fn correct(&mut self, id: u32, now: u64, err_ns: i64) -> Option<i64> {
        let horizon = (u64::from(self.backlog_us) + u64::from(self.reorder_us)) * 1000;
        let p = self.path_mut(id)?;
        let was = p.finish_ns.saturating_sub(now) as i64;
        let queue = (was + err_ns).clamp(0, 2 * horizon as i64);
        p.finish_ns = now + queue as u64;
        Some(queue - was)
    }

    /// Sets how much later than its base link `id` delivers now
    /// ([`Path::extra_ns`]). Returns whether the link is in the schedule.
    pub fn set_extra(&mut self, id: u32, extra_ns: u32) -> bool {
        let Some(p) = self.path_mut(id) else {
            return false;
        };
        p.extra_ns = extra_ns;
        true
    }

    /// Takes link `id` into use or leaves it out (`PATH_USABLE`), keeping
    /// everything else. Returns whether that changed anything.
    pub fn set_usable(&mut self, id: u32, usable: bool) -> bool {
        let Some(p) = self.path_mut(id) else {
            return false;
        };
        let was = p.flags;
        if usable {
            p.flags |= PATH_USABLE;
        } else {
            p.flags &= !PATH_USABLE;
        }
        p.flags != was
    }

    /// Gives link `id` a new rate (kbit/s), keeping its queue as it is.
    /// Returns whether the link is in the schedule.
    pub fn set_rate(&mut self, id: u32, kbit: u64) -> bool {
        let Some(p) = self.path_mut(id) else {
            return false;
        };
        p.ns_per_kib = ns_per_kib(kbit);
        true
    }
}

/// Why no link was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No link is usable.
    NoLinks,
    /// Every link's queue reaches the horizon: the links cannot take the
    /// packet without delivering it after packets sent later, so the
    /// sender drops it, as a bottleneck with the links' buffer would.
    Full,
}

impl Refused {
    pub const fn drop_reason(self) -> u32 {
        match self {
            Self::NoLinks => crate::drops::NO_LINKS,
            Self::Full => crate::drops::LINKS_FULL,
        }
    }
}

/// How far behind the latest send time seen a packet may be and still
/// count as reordered, µs; further back, the sender's clock has started
/// over (a reboot) and is followed afresh.
pub const LATE_WINDOW_US: u32 = 10_000_000;

/// The receiving end's check of the schedule: notes a packet's send time
/// ([`crate::wire::BondHdr::sent_us`]) against the latest seen from its
/// sender (`latest`, updated) and returns whether it came late, after a
/// packet sent after it. Every late packet is a miss of the sender's
/// estimates for the link it came on (it arrived later than the link's
/// delay and rate said), and TCP would see it out of order. Times wrap.
#[inline(always)]
pub fn arrived_late(latest: &mut u32, sent_us: u32) -> bool {
    let behind = latest.wrapping_sub(sent_us);
    if behind != 0 && behind < LATE_WINDOW_US {
        return true;
    }
    *latest = sent_us;
    false
}

/// Added to a full link's arrival time so that any link with room wins:
/// about five hours, far past any real arrival.
const FULL: u64 = 1 << 44;

#[cfg(test)]
mod tests {
    use super::*;

    /// Measured on a host up for 5.1 hours: every packet was refused as
    /// `links_full`, because the full-link test compared absolute times
    /// with the push-back constant (2^44 ns, 4.9 hours).
    #[test]
    fn picks_go_on_after_days_of_uptime() {
        for now in [
            1u64 << 44,
            (1 << 44) + 1,
            1 << 50,
            200 * 24 * 3600 * 1_000_000_000,
        ] {
            let mut p = paths(&[(10_000, 0), (20_000, 5)]);
            assert_eq!(p.pick(now, MTU), Ok(1), "at {now} ns");
            // Filled past the horizon, every link refuses.
            let mut refused = None;
            for _ in 0..10_000 {
                if let Err(e) = p.pick(now, MTU) {
                    refused = Some(e);
                    break;
                }
            }
            assert_eq!(refused, Some(Refused::Full), "at {now} ns");
        }
    }

    #[test]
    fn a_receiver_that_reorders_lets_far_links_queue_up_to_their_buffer() {
        // 10 Mbit/s at 0 and at 35 ms more, 50 ms buffers: without a
        // playout the far link queues only the 15 ms left of the horizon;
        // with 30 ms of reordering put right, 45 ms. Neither link's own
        // queue ever passes its 50 ms.
        let fill = |reorder_us: u32| {
            let mut p = paths(&[(10_000, 0), (10_000, 35)]);
            p.reorder_us = reorder_us;
            let mut n = 0;
            while p.pick(0, MTU).is_ok() {
                n += 1;
            }
            let queued: Vec<u64> = p.links().map(|l| l.finish_ns / MS).collect();
            (n, queued)
        };
        let (n0, q0) = fill(0);
        let (n30, q30) = fill(30_000);
        assert!(q0[0] <= 50 && q0[0] >= 48, "{q0:?}");
        assert!(q0[1] <= 15 && q0[1] >= 13, "{q0:?}");
        assert!(q30[0] <= 50 && q30[0] >= 48, "{q30:?}");
        assert!(q30[1] <= 45 && q30[1] >= 43, "{q30:?}");
        assert!(n30 > n0);
    }

    #[test]
    fn a_charged_train_delays_the_link_like_the_packets_it_is() {
        let mut p = paths(&[(10_000, 0), (10_000, 0)]);
        let left = p.charge(1, 1_000, 10, MTU).expect("a link of the schedule");
        assert_eq!(left, 1_000 + 10 * p.paths[0].tx_ns(MTU));
        // Ten packets queued on link 1: the next ten picks take link 2.
        let picks: Vec<u32> = (0..10).map(|_| p.pick(1_000, MTU).unwrap()).collect();
        assert_eq!(picks, [2; 10]);
        assert_eq!(p.pick(1_000, MTU), Ok(1));
        assert_eq!(
            p.charge(7, 1_000, 1, MTU),
            None,
            "not a link of the schedule"
        );
    }

    #[test]
    fn a_correction_moves_one_links_queue_within_bounds() {
        let mut p = paths(&[(10_000, 0), (10_000, 0)]);
        p.backlog_us = 50_000;
        let now = 1_000_000;
        // Link 1 met 5 ms more queue than counted: the next picks go to
        // link 2 until its queue is as long.
        assert_eq!(p.correct(1, now, 5_000_000), Some(5_000_000));
        assert_eq!(p.paths[0].finish_ns, now + 5_000_000);
        let picks: Vec<u32> = (0..4).map(|_| p.pick(now, MTU).unwrap()).collect();
        assert_eq!(picks, [2; 4]);
        // Sooner: never before now (it moved by the 5 ms it had).
        assert_eq!(p.correct(1, now, -9_000_000), Some(-5_000_000));
        assert_eq!(p.paths[0].finish_ns, now);
        // Never past twice the horizon (link 2 had 4 packets queued).
        let had = (p.paths[1].finish_ns - now) as i64;
        assert_eq!(p.correct(2, now, i64::MAX / 2), Some(100_000_000 - had));
        assert_eq!(p.paths[1].finish_ns, now + 100_000_000);
        assert_eq!(p.correct(7, now, 1), None, "not a link of the schedule");
    }

    #[test]
    fn a_new_rate_keeps_the_queue() {
        let mut p = paths(&[(10_000, 0), (10_000, 0)]);
        p.paths[0].finish_ns = 7_000;
        assert!(p.set_rate(1, 20_000));
        assert_eq!(p.paths[0].kbit(), 20_000);
        assert_eq!(p.paths[0].finish_ns, 7_000);
        // Twice the rate: a packet takes half as long.
        assert_eq!(p.paths[0].tx_ns(MTU) * 2, p.paths[1].tx_ns(MTU));
        assert!(!p.set_rate(7, 1), "not a link of the schedule");
    }

    #[test]
    fn a_packet_sent_before_the_latest_seen_is_late_and_the_rest_are_not() {
        let mut h = 0;
        let late: Vec<bool> = [1, 2, 5, 3, 4, 6, 6, 7]
            .iter()
            .map(|&s| arrived_late(&mut h, s))
            .collect();
        assert_eq!(late, [false, false, false, true, true, false, false, false]);
        assert_eq!(h, 7);
    }

    #[test]
    fn send_times_wrap_and_a_restarted_clock_is_followed() {
        let mut h = u32::MAX - 1;
        assert!(!arrived_late(&mut h, u32::MAX));
        assert!(!arrived_late(&mut h, 1));
        assert!(arrived_late(&mut h, u32::MAX));
        assert_eq!(h, 1);
        // A rebooted sender's clock starts far behind: not late.
        let mut h = 50_000_000;
        assert!(!arrived_late(&mut h, 0));
        assert!(!arrived_late(&mut h, 1));
        assert_eq!(h, 1);
    }

    const MS: u64 = 1_000_000;
    const MTU: u32 = 1500;
    const BACKLOG: u64 = DEFAULT_BACKLOG_US as u64 * 1000;

    /// The sender's view of `links` (kbit/s, one-way delay in ms): delays
    /// relative to the least, as the agents measure them.
    fn paths(links: &[(u64, u32)]) -> Paths {
        let mut p = Paths::EMPTY;
        let least = links.iter().map(|l| l.1).min().unwrap_or(0);
        for (i, &(kbit, delay_ms)) in links.iter().enumerate() {
            p.paths[i] = Path::new(i as u32 + 1, kbit, (delay_ms - least) * MS as u32);
        }
        p.len = links.len() as u32;
        p
    }

    /// The links as they really are: each a FIFO of its true rate and
    /// delay, with a buffer of `BACKLOG` (beyond it, drops). Feeds `count` packets of MTU size at `offered_kbit` through
    /// `paths` (the sender's estimates) and returns each packet's link and
    /// real arrival time.
    fn run(
        p: &mut Paths,
        truth: &[(u64, u32)],
        offered_kbit: u64,
        count: usize,
    ) -> Vec<(u32, u64)> {
        run_from(0, p, truth, offered_kbit, count)
    }

    /// As `run`, the first packet sent at `t0`.
    fn run_from(
        t0: u64,
        p: &mut Paths,
        truth: &[(u64, u32)],
        offered_kbit: u64,
        count: usize,
    ) -> Vec<(u32, u64)> {
        let gap = Path::new(0, offered_kbit, 0).tx_ns(MTU);
        let mut busy = vec![0u64; truth.len()];
        (0..count)
            .map(|k| {
                let now = t0 + k as u64 * gap;
                let Ok(link) = p.pick(now, MTU) else {
                    return (0, DROPPED); // every link full: the sender drops
                };
                let i = link as usize - 1;
                let real = Path::new(link, truth[i].0, truth[i].1 * MS as u32);
                let done = busy[i].max(now) + real.tx_ns(MTU);
                if done - now > BACKLOG {
                    return (link, DROPPED); // the real buffer is full
                }
                busy[i] = done;
                (link, busy[i] + u64::from(real.delay_ns))
            })
            .collect()
    }

    fn shares(out: &[(u32, u64)], links: usize) -> Vec<f64> {
        (1..=links as u32)
            .map(|l| out.iter().filter(|(x, _)| *x == l).count() as f64 / out.len() as f64)
            .collect()
    }

    /// The arrival time of a packet the real link dropped.
    const DROPPED: u64 = u64::MAX;

    /// Packets that arrive after one sent later than them did.
    fn reordered(out: &[(u32, u64)]) -> usize {
        let mut latest = 0;
        out.iter()
            .filter(|(_, at)| *at != DROPPED)
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
        assert!(p.set_usable(2, false), "left out");
        assert!(!p.set_usable(2, false), "already out");
        assert!(!p.set_usable(9, false), "no link 9");
        assert_eq!(p.paths[1].flags & PATH_USABLE, 0);
        let out = run(&mut p, &links, 15_000, 1000);
        assert_eq!(shares(&out, 2), vec![1.0, 0.0]);
        p.paths[0].flags = 0;
        assert_eq!(p.pick(0, MTU), Err(Refused::NoLinks));
        assert_eq!(Paths::EMPTY.clone().pick(0, MTU), Err(Refused::NoLinks));
        assert!(p.set_usable(2, true), "back");
        assert_eq!(p.pick(0, MTU), Ok(2));
    }

    #[test]
    fn no_queue_is_counted_past_the_buffer() {
        // A burst far beyond what one link holds: its queue stops at the
        // buffer, the rest counted as dropped.
        let mut p = paths(&[(10_000, 0)]);
        let mut sent = 0;
        while p.pick(0, MTU) == Ok(1) {
            assert!(p.paths[0].finish_ns <= BACKLOG, "{}", p.paths[0].finish_ns);
            sent += 1;
        }
        // 50 ms at 10 Mbit/s holds 41 packets of 1500 bytes.
        assert_eq!(sent, 41);
        assert_eq!(p.pick(0, MTU), Err(Refused::Full));
        // Within the bound a queue counts in full: 30 ms of queue on link
        // 1 against 20 ms of delay on link 2 sends to link 2.
        let mut p = paths(&[(40_000, 0), (10_000, 20)]);
        p.paths[0].finish_ns = 30 * MS;
        assert_eq!(p.pick(0, MTU), Ok(2));
    }

    #[test]
    fn a_link_of_more_delay_than_a_buffer_holds_is_left_out() {
        let mut p = paths(&[(10_000, 0), (100_000, 60)]);
        p.paths[0].finish_ns = BACKLOG; // full
        assert_eq!(p.pick(0, MTU), Err(Refused::Full), "the other cannot help");
        p.paths[0].flags = 0;
        assert_eq!(p.pick(0, MTU), Err(Refused::NoLinks));
    }

    #[test]
    fn a_links_jitter_counts_in_its_arrivals_but_never_leaves_it_out() {
        // Two equal links (a packet takes 1 ms); link 2 delivers 8 ms late
        // now. Link 1 takes packets until its queue is as late (a tie goes
        // to the first), then they alternate.
        let mut p = paths(&[(12_000, 0), (12_000, 0)]);
        assert!(p.set_extra(2, 8 * MS as u32));
        let picks: Vec<u32> = (0..12).map(|_| p.pick(0, MTU).unwrap()).collect();
        assert_eq!(picks, [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2], "{picks:?}");
        // Jitter past the buffer: the link is passed over while another
        // has room, and counts as full, not as left out (a base delay
        // that long would be `NoLinks`): only its packets show the jitter
        // has passed.
        let mut p = paths(&[(10_000, 0), (100_000, 0)]);
        p.set_extra(2, 2 * BACKLOG as u32);
        assert_eq!(p.pick(0, MTU), Ok(1));
        p.paths[0].flags = 0;
        assert_eq!(p.pick(0, MTU), Err(Refused::Full));
        assert!(!p.set_extra(7, 0), "not a link of the schedule");
    }

    #[test]
    fn a_full_link_is_passed_over_while_another_has_room() {
        // Link 1 (fast) is full; link 2 (slow, later) has room: link 2.
        let mut p = paths(&[(40_000, 0), (10_000, 10)]);
        p.paths[0].finish_ns = BACKLOG;
        assert_eq!(p.pick(0, MTU), Ok(2));
        // Both full: the sender drops, and counts nothing.
        p.paths[1].finish_ns = BACKLOG;
        assert_eq!(p.pick(0, MTU), Err(Refused::Full));
        assert_eq!(p.paths[0].finish_ns, BACKLOG);
    }

    #[test]
    fn an_overdriving_sender_keeps_every_link_busy_in_proportion() {
        // TCP overshooting: twice the summed rates. Every link stays busy
        // and delivers its rate's share; what cannot fit the sender drops.
        let links = [(10_000, 5), (20_000, 20), (40_000, 40)];
        let mut p = paths(&links);
        let out = run(&mut p, &links, 140_000, 30_000);
        let delivered: Vec<(u32, u64)> = out[3000..]
            .iter()
            .copied()
            .filter(|x| x.1 != DROPPED)
            .collect();
        let s = shares(&delivered, 3);
        for (got, want) in s.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
            assert!((got - want).abs() < 0.02, "{s:?}");
        }
        let carried = delivered.len() as f64 / (out.len() - 3000) as f64;
        assert!(
            (carried - 0.5).abs() < 0.02,
            "links carried {carried} of the offer"
        );
        assert_eq!(reordered(&delivered), 0);
    }

    #[test]
    fn a_corrupt_length_stays_in_bounds() {
        let mut p = paths(&[(10_000, 0)]);
        p.len = 1000;
        assert_eq!(p.pick(0, MTU), Ok(1));
    }

    #[test]
    fn pure_acks_take_the_link_of_least_delay() {
        // A 52-byte ACK on idle links arrives first on the lowest delay,
        // whatever the rates.
        let mut p = paths(&[(40_000, 40), (10_000, 5), (20_000, 20)]);
        assert_eq!(p.pick(0, 52), Ok(2));
    }

    #[test]
    fn from_links_leaves_out_rate_zero_and_refuses_too_many() {
        let p = Paths::from_links(&[(7, 10_000, 0), (8, 0, 0), (9, 20_000, 5)]).unwrap();
        let ids: Vec<u32> = p.links().map(|l| l.id).collect();
        assert_eq!(ids, vec![7, 9]);
        let many: Vec<(u32, u64, u32)> = (0..=MAX_PATHS as u32).map(|i| (i, 1, 0)).collect();
        assert_eq!(Paths::from_links(&many), Err(TooManyLinks));
        assert_eq!(
            Paths::from_links(&many[..MAX_PATHS]).unwrap().len as usize,
            MAX_PATHS
        );
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
        for kbit in [1, 10_000, 40_000, 1_000_000, 10_000_000] {
            let back = Path::new(1, kbit, 0).kbit();
            assert!(back.abs_diff(kbit) * 1000 <= kbit, "{kbit} -> {back}");
        }
    }
}
