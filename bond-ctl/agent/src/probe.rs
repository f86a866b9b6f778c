//! Measured weights: packet trains and a smoothed estimate per link and
//! direction.
//!
//! A train is [`TRAIN_LEN`] packets of [`PROBE_LEN`] bytes sent back to
//! back over one link. They queue at the link's bottleneck and leave it at
//! the link's rate, whatever else is queued, because the queue is FIFO and
//! the whole train enters it within microseconds. The receiver timestamps
//! each packet in the kernel (SO_TIMESTAMPNS) and reads the rate from the
//! train's second half: the first packets may pass at line rate while a
//! token bucket still has tokens. Upstream trains are measured by the
//! server, which reports the rate back; downstream trains are sent by the
//! server on request and measured by the terminal that owns the link.
//!
//! The estimate is the median of the last five trains, smoothed with an
//! EWMA; when the median moves by more than 30% (three trains of five
//! agree on a new rate) the estimate takes it at once. A new weight is
//! announced only when it moves by more than [`HYSTERESIS`], so the
//! schedules do not churn on noise. What the
//! datapath's counters show a link carrying is a lower bound on its rate:
//! it raises an estimate that lost trains left too low, never lowers one.

use std::collections::VecDeque;

/// Packets per train.
pub const TRAIN_LEN: u16 = 40;
/// UDP payload bytes of each probe (the message is padded to it).
pub use bond_proto::control::PROBE_LEN;
/// A probe as its link carries it (Ethernet, IPv4, UDP, payload): what a
/// train is charged to the link's queue in the schedule.
pub const PROBE_FRAME_LEN: u32 = (bond_common::wire::ETH_LEN + 28 + PROBE_LEN) as u32;
/// IPv4 and UDP headers, counted in the rate as the link carries them.
const HEADERS: u64 = 28;
/// Fewest packets the rate may be read from.
const MIN_TAIL: usize = 4;
/// Trains the median is taken over.
const WINDOW: usize = 5;
/// Weight of a new sample in the EWMA.
const ALPHA: f64 = 0.5;
/// A median more than this far from the estimate replaces it: three
/// trains of five agree on a new rate (a retrained line, a congested
/// cell). Smoothing that toward it would lag by a train or two more, each
/// a second or more apart on a loaded link, where trains are lost too.
const SHIFT: f64 = 0.3;
/// Relative change below which the announced weight stays.
pub const HYSTERESIS: f64 = 0.05;
/// Weight used for an `auto` link before its first measurement (kbit/s).
pub const UNMEASURED: u32 = 1000;

/// The packets of one train as they arrived.
#[derive(Debug, Clone)]
pub struct TrainRx {
    pub id: u32,
    /// (sequence number, kernel receive time in ns, UDP payload bytes).
    got: Vec<(u16, u64, usize)>,
    count: u16,
}

impl TrainRx {
    pub fn new(id: u32, count: u16) -> Self {
        Self {
            id,
            got: Vec::with_capacity(usize::from(count)),
            count,
        }
    }

    /// Records one packet; true when it was the train's last.
    pub fn add(&mut self, seq: u16, at_ns: u64, bytes: usize) -> bool {
        if seq < self.count && self.got.len() < usize::from(self.count) {
            self.got.push((seq, at_ns, bytes));
        }
        seq + 1 >= self.count
    }

    /// The link's rate in kbit/s; `None` if too little arrived or the
    /// clock went backwards.
    ///
    /// A shaper's token bucket starts a train with a burst at line rate;
    /// once the bucket is empty the packets leave at the link's rate, and
    /// from then on no window can carry more than the rate allows: a
    /// sender that stalls mid-train lets the bucket refill, but the burst
    /// after the stall only repays the time the stall took. Two windows to
    /// the last packet are read and the slower taken: the second half
    /// (clear of any initial burst, but opening on a full bucket when a
    /// stall fell just before it: measured in CI, a 40 Mbit/s link read as
    /// 59.5), and the one from the first paced gap, where the bucket ran
    /// dry (a gap within half of the second half's median gap either way;
    /// a longer one is a stall, a shorter one the burst). Each overreads
    /// in one case the other does not.
    pub fn rate_kbps(&self) -> Option<u32> {
        if self.got.len() < 2 * MIN_TAIL {
            return None;
        }
        let mut got = self.got.clone();
        got.sort_unstable_by_key(|&(_, t, _)| t);
        let gaps: Vec<u64> = got.windows(2).map(|w| w[1].1 - w[0].1).collect();
        let mut late = gaps[gaps.len() / 2..].to_vec();
        late.sort_unstable();
        let paced = late[late.len() / 2];
        let dry = gaps
            .iter()
            .position(|&g| g * 2 >= paced && g * 2 <= paced * 3)
            .unwrap_or(0);
        let half = got.len() / 2;
        [
            Self::window_kbps(&got[half..]),
            Self::window_kbps(&got[dry..]),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The rate of the packets after the window's first, over the time
    /// from it to the last.
    fn window_kbps(w: &[(u16, u64, usize)]) -> Option<u32> {
        if w.len() < MIN_TAIL {
            return None;
        }
        let span_ns = w.last()?.1.checked_sub(w.first()?.1)?;
        if span_ns == 0 {
            return None;
        }
        let bits: u64 = w[1..]
            .iter()
            .map(|&(_, _, b)| (b as u64 + HEADERS) * 8)
            .sum();
        u32::try_from(bits * 1_000_000 / span_ns).ok()
    }
}

/// One link direction's measured rate.
#[derive(Debug, Clone, Default)]
pub struct Estimator {
    recent: VecDeque<u32>,
    smooth: Option<f64>,
    announced: Option<u32>,
}

impl Estimator {
    /// Adds a train's rate (kbit/s).
    pub fn add(&mut self, kbps: u32) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(kbps);
        // Under load a train looks slower than the link (data queued among
        // its packets, a cut train) or faster (a busy receiver takes a batch
        // of packets at once and stamps them together). The median of five
        // sees through two wrong trains either way.
        let mut v: Vec<u32> = self.recent.iter().copied().collect();
        v.sort_unstable();
        let best = f64::from(v[v.len() / 2]);
        self.smooth = Some(match self.smooth {
            None => best,
            Some(s) if (best - s).abs() > SHIFT * s => best,
            Some(s) => s + ALPHA * (best - s),
        });
    }

    /// A rate the link was seen carrying (from the datapath's counters):
    /// a lower bound on its capacity. It counts as a train only when it is
    /// above the estimate, which it can never wrongly lower.
    pub fn observe(&mut self, kbps: u32) {
        if self.smooth.is_some_and(|s| f64::from(kbps) > s) {
            self.add(kbps);
        }
    }

    /// The smoothed rate, if anything was measured.
    pub fn rate(&self) -> Option<u32> {
        self.smooth.map(|s| s.round() as u32)
    }

    /// The weight to announce: the last one unless the estimate moved by
    /// more than [`HYSTERESIS`] from it.
    pub fn weight(&mut self) -> u32 {
        let Some(now) = self.rate() else {
            return UNMEASURED;
        };
        let now = now.clamp(1, bond_config::MAX_WEIGHT);
        match self.announced {
            Some(a) if (f64::from(now) - f64::from(a)).abs() <= HYSTERESIS * f64::from(a) => a,
            _ => {
                self.announced = Some(now);
                now
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A train through a token bucket: `burst` packets at line rate, the
    /// rest one every `gap_ns`.
    fn train(rate_kbps: u64, burst: usize, n: u16) -> TrainRx {
        let gap_ns = (PROBE_LEN as u64 + HEADERS) * 8 * 1_000_000 / rate_kbps;
        let mut t = TrainRx::new(7, n);
        let mut at = 1_000_000;
        for seq in 0..n {
            at += if usize::from(seq) < burst {
                1_000
            } else {
                gap_ns
            };
            t.add(seq, at, PROBE_LEN);
        }
        t
    }

    #[test]
    fn rate_is_read_past_the_burst() {
        for (rate, burst) in [(10_000, 3), (40_000, 12), (20_000, 0)] {
            let got = train(rate, burst, TRAIN_LEN).rate_kbps().unwrap();
            let err = (f64::from(got) - rate as f64).abs() / rate as f64;
            assert!(
                err < 0.01,
                "{rate} kbit/s with a {burst}-packet burst: {got}"
            );
        }
    }

    /// A train sent back to back (1 µs apart) through a token bucket of
    /// `rate_kbps` and `burst` bytes, full at the start; the sender stalls
    /// `stall_ns` before packet `stall_at`.
    fn shaped(rate_kbps: u64, burst: f64, stall_at: u16, stall_ns: f64) -> TrainRx {
        let size = (PROBE_LEN as u64 + HEADERS) as f64;
        let ns_per_byte = 8_000_000.0 / rate_kbps as f64;
        let (mut tokens, mut last, mut sent, mut free) = (burst, 0.0f64, 0.0f64, 0.0f64);
        let mut t = TrainRx::new(7, TRAIN_LEN);
        for seq in 0..TRAIN_LEN {
            sent += 1_000.0 + if seq == stall_at { stall_ns } else { 0.0 };
            let arrive = sent.max(free);
            tokens = (tokens + (arrive - last) / ns_per_byte).min(burst);
            let leave = arrive + (size - tokens).max(0.0) * ns_per_byte;
            tokens = (tokens + (leave - arrive) / ns_per_byte).min(burst) - size;
            last = leave;
            // 100 ns on the wire behind the shaper.
            free = leave + 100.0;
            t.add(seq, 1_000_000 + leave as u64, PROBE_LEN);
        }
        t
    }

    /// Measured in CI: a 40 Mbit/s link read as 59.5 Mbit/s. A stall of
    /// the sender just before the second half refilled the shaper's bucket
    /// and the half then opened with a burst.
    #[test]
    fn a_sender_stall_mid_train_never_reads_faster_than_the_link() {
        let rate = 40_000;
        let burst = 15_000.0; // 3 ms at 40 Mbit/s, as the lab's tbf
        let clean = shaped(rate, burst, TRAIN_LEN, 0.0).rate_kbps().unwrap();
        assert!((39_600..=40_400).contains(&clean), "no stall: {clean}");
        for stall_at in [5, 10, 15, 19, 20, 21, 25, 30, 35] {
            for stall_ms in [1.0, 3.0, 10.0] {
                let got = shaped(rate, burst, stall_at, stall_ms * 1e6)
                    .rate_kbps()
                    .unwrap();
                // At most a packet's worth of tokens left when the
                // window opens: a few percent over 28 packets.
                assert!(
                    got <= rate as u32 * 103 / 100,
                    "stall of {stall_ms} ms before packet {stall_at}: {got} kbit/s"
                );
            }
        }
    }

    #[test]
    fn short_or_broken_trains_give_nothing() {
        let mut t = TrainRx::new(1, TRAIN_LEN);
        for seq in 0..6 {
            t.add(seq, 1000 + u64::from(seq), PROBE_LEN);
        }
        assert_eq!(t.rate_kbps(), None, "too few in the tail");
        let mut same = TrainRx::new(1, TRAIN_LEN);
        for seq in 0..TRAIN_LEN {
            same.add(seq, 5, PROBE_LEN);
        }
        assert_eq!(same.rate_kbps(), None, "no time passed");
    }

    #[test]
    fn losses_at_the_tail_still_measure() {
        let mut t = train(10_000, 3, TRAIN_LEN);
        t.got.truncate(30); // the queue overflowed: the last 10 dropped
        let got = t.rate_kbps().unwrap();
        assert!((9_900..=10_100).contains(&got), "{got}");
    }

    #[test]
    fn add_ignores_out_of_range_sequence_numbers() {
        let mut t = TrainRx::new(1, 4);
        assert!(!t.add(0, 1, 10));
        assert!(t.add(9, 2, 10), "past the end ends the train");
        assert_eq!(t.got.len(), 1);
    }

    #[test]
    fn estimate_follows_a_change_within_a_few_trains_and_ignores_outliers() {
        let mut e = Estimator::default();
        assert_eq!(e.weight(), UNMEASURED);
        for _ in 0..3 {
            e.add(40_000);
        }
        assert_eq!(e.weight(), 40_000);
        e.add(40_000);
        e.add(40_000);
        e.add(25_000); // one slow train, one fast: both ignored
        e.add(52_000);
        assert_eq!(e.weight(), 40_000);
        // Three trains at the new rate make the median, and the estimate
        // takes it.
        for n in 1..=3 {
            e.add(10_000);
            assert!(n == 3 || e.weight() > 20_000, "two trains moved it: {e:?}");
        }
        assert_eq!(e.weight(), 10_000);
    }

    #[test]
    fn observed_traffic_only_raises_the_estimate() {
        let mut e = Estimator::default();
        e.observe(50_000);
        assert_eq!(e.rate(), None, "no estimate to raise yet");
        e.add(20_000);
        e.observe(5_000);
        assert_eq!(e.rate(), Some(20_000), "carrying little says nothing");
        e.observe(30_000);
        e.observe(30_000);
        assert!(e.rate().unwrap() > 25_000, "{:?}", e.rate());
    }

    #[test]
    fn small_moves_do_not_change_the_weight() {
        let mut e = Estimator::default();
        e.add(20_000);
        assert_eq!(e.weight(), 20_000);
        e.add(20_600);
        e.add(20_600);
        assert_eq!(e.weight(), 20_000, "3% is noise");
        for _ in 0..4 {
            e.add(24_000);
        }
        assert!(e.weight() > 23_000);
    }
}
