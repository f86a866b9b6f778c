//! Keeping a sender's model of its links' queues true from what the
//! receiving end sees.
//!
//! A sender (the server downstream, an origin upstream) schedules by a
//! model ([`bond_common::edpf::Paths`]): per link, when what it has queued
//! there will have left, from the link's rate. A rate a percent off, a
//! rate step, jitter or another sender on the same link, and the real
//! queue drifts from the model's by that much for every second the link
//! stays busy; its packets then arrive later than the schedule counted on,
//! past what the receiver's playout waits for, and TCP takes the
//! reordering for loss.
//!
//! So the receiving end's playout reports, every [`EVERY`] and per link,
//! the queue its least-waiting recent packet met: its transit beyond the
//! link's least (`crate::playout::Playout::feedback`, a FEEDBACK message).
//! Each transit is by the two hosts' clocks, whose offset cancels against
//! the link's own least. The sender keeps a short history of its model's
//! queue per link ([`History::sample`], every [`SAMPLE`]), compares it
//! with what the packet met ([`History::error`]) and moves the model's
//! queue by the difference (`Paths::correct`). Once corrected, reports on
//! packets sent before the correction are ignored: they still show the
//! error just put right (one correction per feedback round trip, so the
//! loop neither lags nor overshoots).
//!
//! The corrections also say how wrong the model's rate is, and that is
//! put right too ([`History::learn`]): while the model has a queue on a
//! link, the work it charges there (`work`, time at its rate) is what the
//! real link took `work + moved` to carry, where `moved` is what the
//! corrections added in the meantime. So the link's rate is the model's
//! times `work / (work + moved)`. A rate set too high (measured on an
//! idle link that is now shared, a link that stepped down) is followed
//! down; one too low is followed up for as long as the sender offers more
//! than the model lets through. Trains measure an idle link; this follows
//! a busy one, which is when the rate matters.
//!
//! A link other origins send over too is counted at this sender's fair
//! share of it while they do ([`crate::share`]): the server's FEEDBACK
//! names what the others carried there.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use bond_common::edpf::{PATH_USABLE, Paths};

use bond_datapath::{Maps, monotonic_ns};

use crate::worker::{Worker, lock};
use bond_proto::control::LinkQueue;

/// How often a receiving end reports (its playout sends the reports).
pub use crate::playout::REPORT_EVERY as EVERY;
/// How often a sender samples its model.
pub const SAMPLE: Duration = Duration::from_millis(1);
/// How much later than a packet on a link was due, by what the reports
/// show arriving on the others, before the link counts as silent: a
/// report interval (the link's report may be one behind the others') and
/// as much again for a model a little off and jitter past the counted.
const SILENT_AFTER_NS: u64 = 2 * EVERY.as_nanos() as u64 + 5_000_000;
/// A queue of this many bytes on a link is data: pure ACKs (66 bytes),
/// which no playout holds or reports, hardly queue that deep in the model
/// (measured: counting any queue, ACKs alone called links silent many
/// times a second).
const DATA_BYTES: u32 = 1000;
/// How long a silent link stays out without a report: then it is tried
/// again. The echoes call a whole black hole dark within this
/// (`crate::pathmon::DARK_SLACK` past the base round trip); a link that
/// loses only data (full-size packets past a smaller MTU on the way, a
/// datapath that cannot hand frames to it) answers every echo, and only
/// this rule keeps the flows off it: each time it is silent again with no
/// report between, it stays out twice as long, up to
/// [`SILENT_FOR_MAX_NS`].
const SILENT_FOR_NS: u64 = 300_000_000;
const SILENT_FOR_MAX_NS: u64 = 10_000_000_000;
/// A silent link taken back is on trial until a report names it: counted
/// later than it is ([`Path::extra_ns`]) by as much as puts it this far
/// behind the soonest other link for a full packet sent alone, so that
/// such a packet (a resend after a timeout, a SYN) goes to a link that
/// delivers, and the trial link takes data once the others have a queue.
/// Else a flow that lost its window to the link lost each resend to it
/// again. A link a lone packet would not go to first anyway (a far one)
/// is not counted later: more leaves it little data to be judged by
/// (over `lte`, the far link of one flow up carried 3-5% of it with a
/// fixed 20 ms, 8% without: one run each).
///
/// [`Path::extra_ns`]: bond_common::edpf::Path::extra_ns
const TRIAL_BEHIND_NS: u64 = 1_000_000;
/// A full packet, for the trial's comparison.
const FULL_PACKET: u32 = 1500;
/// How long after a burst on a link was due, with no report of anything
/// since, the link counts as silent when another link was not tried
/// meanwhile: a flow that lost its window resends one packet at a time,
/// and each goes to the link that would deliver it soonest, the same
/// one, which nothing else shows to be lost. A geostationary round trip
/// behind a full buffer and a report's interval, in hand.
const STALL_NS: u64 = 1_000_000_000;
/// How far back the model's history reaches: longer than any report takes
/// to come back (a far link's delay both ways and a report's interval).
const HISTORY_NS: u64 = 1_000_000_000;
/// Differences smaller than this are left alone: a packet's own
/// transmission time and the sampling step are in them, µs.
const DEADBAND_NS: i64 = 2_000_000;
/// A shorter queue than counted moves the model by this fraction of the
/// difference (a longer one by all of it). The report leans short: it
/// names the least queue of its interval, and a queue that swings within
/// the interval (bursts, a modem's token bucket) is reported at its
/// trough. A model too short overfills the link (its modem drops, or the
/// packets arrive past the playout's wait); one too long leaves the link
/// idle a round trip at most, and a steady error still halves every
/// round trip. Measured on `mixed` (one flow, 3 runs each way): moving
/// by all of it, 57.1-61.1 Mbit/s down and 56.4-62.0 up, with runs as low
/// as 25 in other sets; by half, 61.4-62.6 and 62.2-62.5.
const SOONER_DIVISOR: i64 = 2;
/// The most jitter counted on a link, ns: what the receiver's playout
/// holds for at most.
const MAX_EXTRA_NS: u64 = crate::playout::MAX_SPREAD_US as u64 * 1000;
/// Jitter learnt on a link stands while reports on the link keep coming,
/// and this long after the last: a link the sender left may have settled.
const EXTRA_FOR: Duration = Duration::from_millis(500);
/// A rate is judged once the model has charged this much work to a busy
/// link: a second, over which the corrections' deadband and a slow
/// start's bursts average out (over 200 ms, estimates scattered by 20%).
const LEARN_WORK_NS: u64 = 1_000_000_000;
/// A window that charged less than that in this long is dropped.
const LEARN_WINDOW_NS: u64 = 5_000_000_000;
/// A rate is lowered when the estimate is this much below it, percent,
/// and raised only when this much above. The estimate leans high: each
/// report names the least queue of its interval, and a queue that swings
/// within one (bursts) is reported at its trough, so the corrections lean
/// sooner. Measured on `mixed` (one flow, 3 runs each way): following
/// estimates either way beyond 10% took the flow from a median of 61.5
/// Mbit/s down and 59.9 up to 51.1 and 53.5, raising the near link's rate
/// 10-18% above its real one until its modem dropped.
const LEARN_DOWN_PCT: u64 = 10;
const LEARN_UP_PCT: u64 = 30;
/// The most a rate moves in one step: a factor of 2 either way.
const LEARN_STEP: u64 = 2;
/// What the server said others carry on a link stands this long without
/// a FEEDBACK repeating it (ten of them, each sent two ways): a sender
/// that pauses gets no reports, and starts again on its whole links.
const SHARE_FOR_NS: u64 = 200_000_000;
/// A share within this much of the whole link, percent, is the whole
/// link: others' pure ACKs and control messages take that much.
const SHARE_SLACK_PCT: u64 = 5;

/// What a window of [`History::learn`] found of a link's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// It is this many kbit/s.
    Rate(u64),
    /// The model's is close enough.
    Kept,
}

/// One link's window for [`History::learn`].
#[derive(Clone, Copy, Debug, Default)]
struct Drift {
    start: u64,
    /// Work the model charged while it had a queue, ns at its rate.
    work_ns: u64,
    /// What the corrections moved the queue meanwhile.
    moved_ns: i64,
}

/// One sender's model over time, per link id.
#[derive(Debug, Default)]
pub struct History {
    /// Per link: (when, the model's finish time then), oldest first.
    samples: HashMap<u32, VecDeque<(u64, u64)>>,
    /// Per link: when the model was last corrected.
    fixed_at: HashMap<u32, u64>,
    /// Per link: when a report last named it.
    reported_at: HashMap<u32, u64>,
    drift: HashMap<u32, Drift>,
    /// Per link in the schedule: since when its silence counts (its last
    /// report, or when it came into the schedule).
    quiet_since: HashMap<u32, u64>,
    /// The latest arrival any report showed: its send time, its link's
    /// relative delay and the queue it met, by the sender's clock.
    heard_ns: u64,
    /// Links left out for silence: when, and for how long.
    silenced: HashMap<u32, (u64, u64)>,
    /// Per link: how long it was out when it was last silent, if no
    /// report named it since (the next time it stays out twice as long).
    out_for: HashMap<u32, u64>,
    /// Per link: when the first burst after its silence began (the
    /// `quiet_since` it is keyed with) left the model's queue; kept past
    /// the history.
    first_burst: HashMap<u32, (u64, u64)>,
    /// Links taken back after a silence that no report named since.
    trial: HashSet<u32>,
    /// Links the agent put back while silent, to put on trial
    /// ([`Self::take_put_back`]).
    put_back: Vec<u32>,
}

/// What a report showed of a link that was out or on trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Back {
    /// It was out for silence (silent again while on trial, with `trial`):
    /// it delivers.
    Silenced { trial: bool },
    /// It was on trial ([`TRIAL_BEHIND_NS`]): it delivers.
    Trial,
}

impl History {
    /// A history whose schedule has `trial` links on trial.
    fn with_trial(trial: HashSet<u32>) -> Self {
        Self {
            trial,
            ..Self::default()
        }
    }

    /// Records the model's queues at `now` (ns), and the work it charged
    /// to links that stayed busy since the last sample.
    pub fn sample(&mut self, now: u64, paths: &Paths) {
        // A link is judged from when it came into the schedule (a link
        // that never delivers is as silent as one that stopped); one out
        // of it, afresh once back. A departed link's id may name another
        // next (the server's dense indexes are reused): it starts with
        // nothing of this one's.
        let kept = |id: &u32| paths.links().any(|p| p.id == *id);
        self.quiet_since.retain(|id, _| kept(id));
        self.first_burst.retain(|id, _| kept(id));
        self.out_for.retain(|id, _| kept(id));
        self.reported_at.retain(|id, _| kept(id));
        for p in paths.links() {
            self.quiet_since.entry(p.id).or_insert(now);
            let h = self.samples.entry(p.id).or_default();
            if let Some(&(_, was)) = h.back()
                && was > now
            {
                let d = self.drift.entry(p.id).or_insert(Drift {
                    start: now,
                    ..Drift::default()
                });
                d.work_ns += p.finish_ns.saturating_sub(was);
            }
            h.push_back((now, p.finish_ns));
            while h.front().is_some_and(|(t, _)| now - t > HISTORY_NS) {
                h.pop_front();
            }
        }
    }

    /// The model's queue on link `id` was moved by `moved_ns` at `now`
    /// (after [`Self::error`]): reports on packets sent before now are
    /// ignored from here, and the move is not work charged. It counts
    /// toward the link's rate only if the model had a queue there: a link
    /// the sender hardly uses shows its jitter, not its rate.
    pub fn moved(&mut self, id: u32, now: u64, moved_ns: i64) {
        self.fixed_at.insert(id, now);
        let Some((at, f)) = self.samples.get_mut(&id).and_then(|h| h.back_mut()) else {
            return;
        };
        let busy = *f > *at;
        *f = f.saturating_add_signed(moved_ns);
        if let Some(d) = self.drift.get_mut(&id).filter(|_| busy) {
            d.moved_ns += moved_ns;
        }
    }

    /// What the corrections showed of the rates in `paths`, for each link
    /// whose window is complete: a new rate where the model's is off by
    /// more than [`LEARN_DOWN_PCT`] (too high) or [`LEARN_UP_PCT`] (too
    /// low), else kept. A link given a new rate starts over, its reports
    /// on packets sent before ignored.
    pub fn learn(&mut self, now: u64, paths: &Paths) -> Vec<(u32, Judged)> {
        let mut out = Vec::new();
        for p in paths.links() {
            let Some(d) = self.drift.get(&p.id).copied() else {
                continue;
            };
            if d.work_ns < LEARN_WORK_NS {
                if now - d.start > LEARN_WINDOW_NS {
                    self.drift.remove(&p.id);
                }
                continue;
            }
            self.drift.remove(&p.id);
            let work = d.work_ns as i128;
            let took = (work + i128::from(d.moved_ns)).max(1);
            let had = p.kbit();
            let model = i128::from(had);
            let kbit = (model * work / took)
                .clamp(model / LEARN_STEP as i128, model * LEARN_STEP as i128)
                as u64;
            let lower = kbit * 100 < had * (100 - LEARN_DOWN_PCT);
            let higher = kbit * 100 > had * (100 + LEARN_UP_PCT);
            if lower || higher {
                self.fixed_at.insert(p.id, now);
                out.push((p.id, Judged::Rate(kbit)));
            } else {
                out.push((p.id, Judged::Kept));
            }
        }
        out
    }

    /// Learns nothing of link `id`'s rate from the window under way: the
    /// model counts the link at a share of it that others set.
    pub fn shared(&mut self, id: u32) {
        self.drift.remove(&id);
    }

    /// The model's queue on link `id` at `t` (ns): the least and the
    /// most it can have been, from the samples around `t`. Between two
    /// samples this thread did not run, so nothing but what was sent
    /// moved the link's finish time: it lay between the earlier sample's
    /// and the later one's. Samples a millisecond apart make that one
    /// value; a gap (the thread was not run, on a busy machine) makes a
    /// range, and a queue the model had must not read as none there.
    /// (Read from the earlier sample alone, the queue a packet met was
    /// taken for the link's delay, and under CPU contention links were
    /// given tens of ms of jitter they did not have and left out: one of
    /// two uploads at once fell to 11 Mbit/s.)
    fn queue_at(&self, id: u32, t: u64) -> Option<(u64, u64)> {
        let h = self.samples.get(&id)?;
        let i = h.partition_point(|(at, _)| *at <= t);
        let (_, before) = h.get(i.checked_sub(1)?)?;
        let after = h.get(i).map_or(*before, |(_, f)| (*f).max(*before));
        Some((before.saturating_sub(t), after.saturating_sub(t)))
    }

    /// A packet sent at `sent_ns` over link `id` met `queue_ns` beyond
    /// the link's least transit; the model counts `extra_ns` of it as the
    /// link's jitter ([`bond_common::edpf::Path::extra_ns`]). What to
    /// change, if anything:
    ///
    /// - where the model counted no queue when the packet left, all it met
    ///   is the link's delay now ([`Fix::Delay`]): jitter, which a link
    ///   keeps however little it carries, where a queue drains;
    /// - else the rest beyond the jitter is queue, and the model's moves
    ///   later by the whole difference, sooner by a [`SOONER_DIVISOR`]th
    ///   ([`Fix::Queue`]).
    ///
    /// None when the model was right (within [`DEADBAND_NS`]), when the
    /// packet left before the last queue correction, or before the history.
    pub fn judge(&self, id: u32, sent_ns: u64, queue_ns: u64, extra_ns: u32) -> Option<Fix> {
        if self.fixed_at.get(&id).is_some_and(|&f| sent_ns < f) {
            return None;
        }
        let (least, most) = self.queue_at(id, sent_ns)?;
        if most < DEADBAND_NS as u64 {
            let delay = queue_ns.saturating_sub(most).min(MAX_EXTRA_NS);
            let err = delay as i64 - i64::from(extra_ns);
            return (err.abs() >= DEADBAND_NS).then_some(Fix::Delay(delay as u32));
        }
        // Beyond the most the model can have had, or short of the least.
        let met = queue_ns as i64 - i64::from(extra_ns);
        let err = (met - most as i64).max(0) + (met - least as i64).min(0);
        if err.abs() < DEADBAND_NS {
            return None;
        }
        Some(Fix::Queue(if err < 0 { err / SOONER_DIVISOR } else { err }))
    }

    /// A report on link `id` came at `now`, of a packet that arrived at
    /// `arrived_ns` (its send time, the link's relative delay and the
    /// queue it met). Whether the link was out for silence or on trial:
    /// it delivers.
    pub fn reported(&mut self, id: u32, now: u64, arrived_ns: u64) -> Option<Back> {
        self.reported_at.insert(id, now);
        self.quiet_since.insert(id, now);
        // Never past now: a link whose delay is not measured yet counts
        // `u32::MAX` of it (`pathmon::UNMEASURED`).
        self.heard_ns = self.heard_ns.max(arrived_ns.min(now));
        self.out_for.remove(&id);
        let trial = self.trial.remove(&id);
        if self.silenced.remove(&id).is_some() {
            Some(Back::Silenced { trial })
        } else {
            trial.then_some(Back::Trial)
        }
    }

    /// A probe train on link `id` is queued there until `left_ns`. No
    /// report names its packets (a playout holds and reports only data),
    /// so the link's silence is judged from what the model sends after
    /// it; else every train on a link that carried no data since its last
    /// report looked like a burst that never arrived, and the link was
    /// left out for [`SILENT_FOR_NS`] (on `mixed`, once in most
    /// communities, in the slow start of a download).
    pub fn probed(&mut self, id: u32, left_ns: u64) {
        self.quiet_since
            .entry(id)
            .and_modify(|since| *since = (*since).max(left_ns))
            .or_insert(left_ns);
    }

    /// Links of `paths` gone silent: the model sent a burst on it since
    /// its last report or its coming into the schedule (the first sample
    /// after with [`DATA_BYTES`] of queue there: data, not the pure ACKs
    /// no playout holds or reports), no report named the link since, and
    /// either
    ///
    /// - that burst was due `SILENT_AFTER_NS` before the latest arrival
    ///   the reports show (the others deliver what was sent after it), or
    /// - it was due [`STALL_NS`] ago, and another usable link within the
    ///   horizon, which a report named less than that before the burst was
    ///   due, was sent nothing since its own last report: the
    ///   flows stalled (each packet sent alone goes to the link that would
    ///   deliver it soonest, this one, and is lost there), and that one
    ///   may carry them.
    ///
    /// Each is counted silenced from `now`, for [`SILENT_FOR_NS`], twice
    /// as long as the last time if no report named it between. Nothing is
    /// silent while no report comes at all (the receiving end may have no
    /// playout).
    pub fn silent(&mut self, now: u64, paths: &Paths) -> Vec<u32> {
        let mut out = Vec::new();
        if self.heard_ns == 0 {
            return out;
        }
        // Per usable link: when its first burst since its silence began
        // was due, if there was one.
        let mut due = Vec::new();
        for p in paths.links() {
            if p.flags & PATH_USABLE == 0 {
                continue;
            }
            if self.silenced.remove(&p.id).is_some() {
                // Put back by someone else (the agent rebuilt the
                // schedule): on trial, and judged again from now.
                self.quiet_since.insert(p.id, now);
                self.trial.insert(p.id);
                self.put_back.push(p.id);
                continue;
            }
            let (Some(&since), Some(h)) = (self.quiet_since.get(&p.id), self.samples.get(&p.id))
            else {
                continue;
            };
            let known = self.first_burst.get(&p.id).filter(|(s, _)| *s == since);
            let finish = known.map(|&(_, f)| f).or_else(|| {
                let i = h.partition_point(|(at, _)| *at <= since);
                let data = p.tx_ns(DATA_BYTES);
                let burst = |&&(at, f): &&(u64, u64)| f >= at + data;
                let &(_, finish) = h.range(i..).find(burst)?;
                self.first_burst.insert(p.id, (since, finish));
                Some(finish)
            });
            // Due by the link's delay as known now (it may have been
            // unmeasured when the burst left).
            let at = finish.map(|f| {
                f.saturating_add(u64::from(p.delay_ns))
                    .saturating_add(u64::from(p.extra_ns))
            });
            // Whether it can carry (within the horizon), and when a report
            // last named it.
            let last = self
                .reported_at
                .get(&p.id)
                .copied()
                .filter(|_| paths.reaches(p));
            due.push((p.id, at, last));
        }
        for &(id, at, _) in &due {
            let Some(at) = at else {
                continue; // nothing sent there since
            };
            let passed = self.heard_ns > at.saturating_add(SILENT_AFTER_NS);
            let stalled = now > at.saturating_add(STALL_NS)
                && due.iter().any(|&(other, d, last)| {
                    // Untried since, and delivering when this one's burst
                    // went.
                    other != id
                        && d.is_none()
                        && last.is_some_and(|r| r.saturating_add(STALL_NS) >= at)
                        && !out.contains(&other)
                });
            if passed || stalled {
                let was = self.out_for.get(&id).copied().unwrap_or(0);
                let for_ns = (was * 2).clamp(SILENT_FOR_NS, SILENT_FOR_MAX_NS);
                self.out_for.insert(id, for_ns);
                self.silenced.insert(id, (now, for_ns));
                out.push(id);
            }
        }
        out
    }

    /// Silenced links the agent's rebuilt schedule took back since the
    /// last call: each is on trial, and its trial delay is the caller's
    /// to set.
    pub fn take_put_back(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.put_back)
    }

    /// Links out for silence to try again: out their time (each on trial
    /// until a report names it), or all of them (`all`, the sender is
    /// forgetting this schedule). Marks of links no longer in `paths` are
    /// dropped.
    pub fn revive(&mut self, now: u64, paths: &Paths, all: bool) -> Vec<u32> {
        self.silenced
            .retain(|id, _| paths.links().any(|p| p.id == *id));
        self.trial.retain(|id| paths.links().any(|p| p.id == *id));
        let due: Vec<u32> = self
            .silenced
            .iter()
            .filter(|&(_, &(at, for_ns))| all || now - at >= for_ns)
            .map(|(&id, _)| id)
            .collect();
        for id in &due {
            self.silenced.remove(id);
            self.quiet_since.remove(id);
            self.trial.insert(*id);
        }
        due
    }

    /// Links in `paths` counted with jitter that no report has named for
    /// [`EXTRA_FOR`]: the sender stopped using them, and what it learnt of
    /// their delay is stale.
    pub fn stale_jitter(&self, now: u64, paths: &Paths) -> Vec<u32> {
        paths
            .links()
            .filter(|p| p.extra_ns > 0 && !self.trial.contains(&p.id))
            .filter(|p| {
                self.reported_at
                    .get(&p.id)
                    .is_none_or(|&at| now - at > EXTRA_FOR.as_nanos() as u64)
            })
            .map(|p| p.id)
            .collect()
    }
}

/// What a report changes in the model of one link ([`History::judge`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Move its queue by this much, ns (later when positive).
    Queue(i64),
    /// It delivers this much later than its base now, ns.
    Delay(u32),
}

/// The sender's clock (ns) at a send time from a bond header (its µs,
/// wrapping), taken as the latest such time not after `now`.
pub fn sent_ns(sent_us: u32, now: u64) -> u64 {
    let now_us = now / 1000;
    now_us.saturating_sub(u64::from((now_us as u32).wrapping_sub(sent_us))) * 1000
}

/// Which schedule a report is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Model {
    /// An origin's own (`T_PATHS`).
    Up,
    /// The server's downstream schedule of a community (`S_PATHS`).
    Down(u32),
}

impl std::fmt::Display for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Up => write!(f, "upstream"),
            Self::Down(c) => write!(f, "community {c} downstream (link index)"),
        }
    }
}

impl Model {
    /// The community of a downstream schedule.
    fn community(self) -> Option<u32> {
        match self {
            Self::Up => None,
            Self::Down(c) => Some(c),
        }
    }

    fn read(self, maps: &Maps) -> Option<Paths> {
        match self {
            Self::Up => maps.up_paths().ok(),
            Self::Down(c) => maps.down_paths(c).ok().flatten(),
        }
    }

    fn write(self, maps: &Maps, p: Paths) -> bond_datapath::Result<()> {
        match self {
            Self::Up => maps.put_up_paths(p),
            Self::Down(c) => maps.put_down_paths(c, p),
        }
    }

    /// Makes `change` on the schedule as the datapath has it now, read
    /// just before it is written back. The datapath moves a link's finish
    /// time with every packet it sends: a copy read earlier (before a
    /// report was judged, or before this thread was preempted for a few
    /// milliseconds) would wind every link's queue back by what was sent
    /// since, and the sender would then offer the links that much more
    /// than they carry. What `change` returns, or None where there is no
    /// schedule or it could not be written.
    fn patch<T>(self, maps: &Maps, change: impl FnOnce(&mut Paths) -> T) -> Option<T> {
        let mut p = self.read(maps)?;
        let out = change(&mut p);
        match self.write(maps, p) {
            Ok(()) => Some(out),
            Err(e) => {
                tracing::warn!("feedback: {e}");
                None
            }
        }
    }
}

/// A change to a schedule, decided on a copy of it and made on the
/// datapath's ([`Model::patch`]).
#[derive(Clone, Copy, Debug)]
enum Edit {
    Usable(u32, bool),
    Extra(u32, u32),
    Rate(u32, u64),
}

impl Edit {
    /// Makes the change on `p`; whether it changed anything.
    fn apply(self, p: &mut Paths) -> bool {
        match self {
            Self::Usable(id, on) => p.set_usable(id, on),
            Self::Extra(id, ns) => p.set_extra(id, ns),
            Self::Rate(id, kbit) => p.set_rate(id, kbit),
        }
    }
}

/// The changes decided on a copy of a schedule: each made on the copy at
/// once (the next decision sees it) and kept, to be made on the
/// datapath's schedule together ([`Edits::write`]).
struct Edits {
    copy: Paths,
    made: Vec<Edit>,
}

impl Edits {
    fn new(copy: Paths) -> Self {
        Self {
            copy,
            made: Vec::new(),
        }
    }

    /// Puts link `id` on trial: a full packet sent alone arrives over it
    /// [`TRIAL_BEHIND_NS`] after the soonest other usable link, if it
    /// would have been sooner (never counted less late than it is).
    fn trial(&mut self, id: u32) {
        let Some(p) = self.copy.links().find(|l| l.id == id).copied() else {
            return;
        };
        let alone = |l: &bond_common::edpf::Path| l.delay_now_ns() + l.tx_ns(FULL_PACKET);
        let Some(soonest) = self
            .copy
            .links()
            .filter(|l| l.id != id && l.flags & PATH_USABLE != 0 && self.copy.reaches(l))
            .map(alone)
            .min()
        else {
            return; // the only link: nothing to prefer
        };
        let own = u64::from(p.delay_ns) + p.tx_ns(FULL_PACKET);
        let behind = (soonest + TRIAL_BEHIND_NS).saturating_sub(own);
        let extra = u32::try_from(behind).unwrap_or(u32::MAX).max(p.extra_ns);
        if extra != p.extra_ns {
            self.make(Edit::Extra(id, extra));
        }
    }

    /// Makes `e` on the copy; whether it changed anything (and so is kept).
    fn make(&mut self, e: Edit) -> bool {
        let changed = e.apply(&mut self.copy);
        if changed {
            self.made.push(e);
        }
        changed
    }

    fn write(self, maps: &Maps, m: Model) {
        if !self.made.is_empty() {
            m.patch(maps, |p| {
                for e in self.made {
                    e.apply(p);
                }
            });
        }
    }
}

/// A report for a schedule: link `id` in that schedule's terms.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub model: Model,
    pub id: u32,
    pub queue: LinkQueue,
}

/// What the corrector did, for `bond-ctl status`.
pub use bond_api::reply::FeedbackCounts as Stats;
use bond_api::reply::{self as api, Feedback};

/// How long a learnt rate stands without a window confirming it: after
/// that the link's weight (measured idle, or set) is its rate again.
const LEARNT_FOR: Duration = Duration::from_secs(10);

/// A rate learnt for a link of a schedule, and when it was last set or
/// confirmed.
#[derive(Clone, Copy, Debug)]
struct Learnt {
    kbit: u64,
    at: u64,
}

impl Learnt {
    fn stands(&self, now: u64) -> bool {
        now - self.at < LEARNT_FOR.as_nanos() as u64
    }
}

/// A link of a schedule that others send over too.
#[derive(Clone, Debug, Default)]
struct Sharing {
    /// What each of the others carried there lately, kbit/s.
    others: Vec<u32>,
    /// When the server last said so.
    heard: u64,
    /// The link's own rate (the agent's, or learnt), kbit/s.
    whole: u64,
    /// The rate the model was given last, kbit/s.
    given: u64,
}

impl Sharing {
    /// The rate link `id` of `p` is to be counted at now, if it is not
    /// counted so already; `None` too when the link is gone. Takes a new
    /// rate the agent or learning gave the link for its whole.
    fn rate(&mut self, now: u64, p: &Paths, id: u32) -> Option<u64> {
        let had = p.links().find(|l| l.id == id)?.kbit();
        // A rate as given comes back through `ns_per_kib` a little off.
        let near = |a: u64, b: u64| a.abs_diff(b) * 200 <= a.max(b);
        if self.given == 0 || !near(had, self.given) {
            self.whole = had;
        }
        if now.saturating_sub(self.heard) > SHARE_FOR_NS {
            self.others.clear();
        }
        let share = crate::share::fair_share(self.whole, &self.others);
        self.given = if share * 100 >= self.whole * (100 - SHARE_SLACK_PCT) {
            self.whole
        } else {
            share
        };
        (!near(had, self.given)).then_some(self.given)
    }

    fn is_cut(&self) -> bool {
        self.given < self.whole
    }
}

#[derive(Debug, Default)]
struct Shared {
    stats: Stats,
    learnt: HashMap<(Model, u32), Learnt>,
    /// Links counted at a share: (schedule, link) -> (share, whole), kbit/s.
    sharing: HashMap<(Model, u32), (u64, u64)>,
}

/// What the corrector is told.
enum Told {
    Report(Report),
    /// A probe train on link `id` of a schedule, queued until `left_ns`.
    Probed(Model, u32, u64),
    /// What other senders carried on each link of a schedule lately:
    /// (link, kbit/s of each); a link not named has no others.
    Shares(Model, Vec<(u32, Vec<u32>)>),
}

/// The sender's side, running: samples the schedules it has had reports
/// for, applies corrections and learns rates.
pub struct Corrector {
    tx: mpsc::Sender<Told>,
    shared: Arc<std::sync::Mutex<Shared>>,
    _worker: Worker,
}

impl Corrector {
    pub fn start(maps: Maps) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(std::sync::Mutex::new(Shared::default()));
        let sh = shared.clone();
        let worker = Worker::spawn("feedback", move |stop| run(&maps, &rx, stop, &sh))?;
        Ok(Self {
            tx,
            shared,
            _worker: worker,
        })
    }

    pub fn report(&self, r: Report) {
        let _ = self.tx.send(Told::Report(r));
    }

    /// A probe train went on link `id` of schedule `model`, queued there
    /// until `left_ns` ([`History::probed`]).
    pub fn probed(&self, model: Model, id: u32, left_ns: u64) {
        let _ = self.tx.send(Told::Probed(model, id, left_ns));
    }

    /// What other senders carried on each link of schedule `model`
    /// lately, as the receiving end saw it ([`crate::share`]).
    pub fn shares(&self, model: Model, links: Vec<(u32, Vec<u32>)>) {
        let _ = self.tx.send(Told::Shares(model, links));
    }

    /// For `bond-ctl status`: the counts, and the rates that stand, each
    /// by the link id `link_id` gives for a schedule's own name for it.
    pub fn status(&self, link_id: impl Fn(Model, u32) -> Option<u8>) -> Feedback {
        let now = monotonic_ns();
        let sh = lock(&self.shared);
        let mut learnt: Vec<_> = sh
            .learnt
            .iter()
            .filter(|(_, l)| l.stands(now))
            .filter_map(|(&(m, id), l)| Some((m.community(), link_id(m, id)?, l.kbit)))
            .collect();
        learnt.sort_unstable();
        let mut sharing: Vec<_> = sh
            .sharing
            .iter()
            .filter_map(|(&(m, id), &(kbit, whole))| {
                Some((m.community(), link_id(m, id)?, kbit, whole))
            })
            .collect();
        sharing.sort_unstable();
        Feedback {
            counts: sh.stats,
            learnt: learnt
                .into_iter()
                .map(|(community, link, kbit)| api::Learnt {
                    community,
                    link,
                    kbit,
                })
                .collect(),
            sharing: sharing
                .into_iter()
                .map(|(community, link, kbit, of)| api::Sharing {
                    community,
                    link,
                    kbit,
                    of,
                })
                .collect(),
        }
    }

    /// Forgets what was learnt of link `id` of a schedule: the link left,
    /// and its id may name another link next (the server's dense indexes
    /// are reused), which must not start with this one's rate.
    pub fn forget(&self, model: Model, id: u32) {
        lock(&self.shared).learnt.remove(&(model, id));
    }

    /// The rate learnt for link `id` of a schedule, kbit/s, if one stands:
    /// what the agent builds that schedule with in place of the weight,
    /// so that a rebuild does not undo it.
    pub fn rate(&self, model: Model, id: u32) -> Option<u64> {
        let now = monotonic_ns();
        lock(&self.shared)
            .learnt
            .get(&(model, id))
            .filter(|l| l.stands(now))
            .map(|l| l.kbit)
    }
}

/// A schedule no report named for this long is no longer sampled.
const IDLE_NS: u64 = 2_000_000_000;

/// Takes back every link of schedule `m` left out for silence, on trial
/// ([`TRIAL_BEHIND_NS`]); returns the links on trial, which the schedule's
/// next history keeps so.
fn revive_all(maps: &Maps, m: Model, h: &mut History, now: u64) -> HashSet<u32> {
    let Some(p) = m.read(maps) else {
        return HashSet::new();
    };
    let mut edits = Edits::new(p);
    for id in h.revive(now, &p, true) {
        edits.make(Edit::Usable(id, true));
        edits.trial(id);
    }
    edits.write(maps, m);
    std::mem::take(&mut h.trial)
}

fn run(
    maps: &Maps,
    rx: &mpsc::Receiver<Told>,
    stop: &AtomicBool,
    shared: &std::sync::Mutex<Shared>,
) {
    // Per schedule: its history and when a report last named it.
    let mut models: HashMap<Model, (History, u64)> = HashMap::new();
    let mut sharing: HashMap<(Model, u32), Sharing> = HashMap::new();
    // Links on trial of schedules no report names now: a packet sent
    // alone still avoids them, and the next history keeps them so.
    let mut trials: HashMap<Model, HashSet<u32>> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let now = monotonic_ns();
        models.retain(|&m, (h, last)| {
            let keep = now - *last < IDLE_NS;
            if !keep {
                // No more reports: nothing can show a silent link back.
                let t = revive_all(maps, m, h, now);
                if !t.is_empty() {
                    trials.insert(m, t);
                }
            }
            keep
        });
        let mut done = Stats::default();
        let mut shares_moved = false;
        // Rates learnt, and schedules' links whose rate a window kept.
        let (mut learnt, mut kept) = (Vec::new(), Vec::new());
        for (&m, (h, _)) in &mut models {
            let Some(p) = m.read(maps) else {
                continue;
            };
            h.sample(now, &p);
            let mut edits = Edits::new(p);
            for id in h.silent(now, &edits.copy) {
                if edits.make(Edit::Usable(id, false)) {
                    tracing::warn!(
                        "feedback: {m}, link {id}: silent (its packets stopped arriving), out of use"
                    );
                    done.silenced += 1;
                }
            }
            for id in h.revive(now, &edits.copy, false) {
                edits.make(Edit::Usable(id, true));
                edits.trial(id);
            }
            for id in h.take_put_back() {
                edits.trial(id);
            }
            for id in h.stale_jitter(now, &edits.copy) {
                if edits.make(Edit::Extra(id, 0)) {
                    done.jitter += 1;
                }
            }
            sharing.retain(|&(sm, id), s| {
                if sm != m {
                    return true;
                }
                if !edits.copy.links().any(|l| l.id == id) {
                    return false; // the link left
                }
                let was_cut = s.is_cut();
                if let Some(kbit) = s.rate(now, &edits.copy, id) {
                    edits.make(Edit::Rate(id, kbit));
                    shares_moved = true;
                    done.shared += u64::from(s.is_cut() && !was_cut);
                }
                if s.is_cut() {
                    h.shared(id);
                }
                s.is_cut() || !s.others.is_empty()
            });
            for (id, judged) in h.learn(now, &edits.copy) {
                let Judged::Rate(kbit) = judged else {
                    kept.push((m, id));
                    continue;
                };
                if let Some(was) = edits.copy.links().find(|l| l.id == id).map(|l| l.kbit()) {
                    tracing::info!(
                        "feedback: {m}, link {id}: rate {was} -> {kbit} kbit/s, as the receiving end sees it"
                    );
                }
                edits.make(Edit::Rate(id, kbit));
                learnt.push(((m, id), Learnt { kbit, at: now }));
                done.rates += 1;
            }
            edits.write(maps, m);
        }
        while let Ok(told) = rx.try_recv() {
            let r = match told {
                Told::Report(r) => r,
                Told::Probed(m, id, left) => {
                    if let Some((h, _)) = models.get_mut(&m) {
                        h.probed(id, left);
                    }
                    continue;
                }
                Told::Shares(m, links) => {
                    for (&(sm, id), s) in sharing.iter_mut() {
                        if sm == m && !links.iter().any(|(l, _)| *l == id) {
                            s.others.clear();
                        }
                    }
                    for (id, others) in links {
                        let s = sharing.entry((m, id)).or_default();
                        (s.others, s.heard) = (others, now);
                    }
                    continue;
                }
            };
            done.reports += 1;
            let (h, last) = models.entry(r.model).or_insert_with(|| {
                let trial = trials.remove(&r.model).unwrap_or_default();
                (History::with_trial(trial), now)
            });
            *last = now;
            let sent = sent_ns(r.queue.sent_us, now);
            let queue = u64::from(r.queue.queue_us) * 1000;
            let Some(p) = r.model.read(maps) else {
                continue;
            };
            let Some((delay, extra)) = p
                .links()
                .find(|l| l.id == r.id)
                .map(|l| (l.delay_ns, l.extra_ns))
            else {
                continue;
            };
            let mut edits = Edits::new(p);
            // A link back from trial: its trial delay goes, and its jitter
            // is learnt afresh from the reports, this one first.
            let mut extra = extra;
            if let Some(back) = h.reported(r.id, now, sent + u64::from(delay) + queue) {
                if matches!(back, Back::Trial | Back::Silenced { trial: true }) {
                    edits.make(Edit::Extra(r.id, 0));
                    extra = 0;
                }
                if edits.make(Edit::Usable(r.id, true)) || back == Back::Trial {
                    tracing::info!("feedback: {}, link {}: delivers again", r.model, r.id);
                }
            }
            edits.write(maps, r.model);
            let Some(fix) = h.judge(r.id, sent, queue, extra) else {
                continue;
            };
            match fix {
                Fix::Delay(ns) => {
                    r.model.patch(maps, |p| p.set_extra(r.id, ns));
                    done.jitter += 1;
                }
                Fix::Queue(err) => {
                    // The queue as the datapath counts it at the write.
                    let corrected = r.model.patch(maps, |p| {
                        let at = monotonic_ns();
                        p.correct(r.id, at, err).map(|moved| (at, moved))
                    });
                    let Some(Some((at, moved))) = corrected else {
                        continue;
                    };
                    h.moved(r.id, at, moved);
                    *if err > 0 {
                        &mut done.later
                    } else {
                        &mut done.sooner
                    } += 1;
                }
            }
        }
        if shares_moved {
            lock(shared).sharing = sharing
                .iter()
                .filter(|(_, s)| s.is_cut())
                .map(|(&k, s)| (k, (s.given, s.whole)))
                .collect();
        }
        if done != Stats::default() || !learnt.is_empty() || !kept.is_empty() {
            let mut s = lock(shared);
            s.stats.reports += done.reports;
            s.stats.later += done.later;
            s.stats.sooner += done.sooner;
            s.stats.rates += done.rates;
            s.stats.jitter += done.jitter;
            s.stats.silenced += done.silenced;
            s.stats.shared += done.shared;
            s.learnt.extend(learnt);
            // A learnt rate a window confirms stands on.
            for k in kept {
                if let Some(l) = s.learnt.get_mut(&k) {
                    l.at = now;
                }
            }
        }
        std::thread::sleep(SAMPLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bond_common::edpf::Path;

    const MS: u64 = 1_000_000;

    fn paths(finish: &[(u32, u64)]) -> Paths {
        let mut p = Paths::EMPTY;
        for (i, &(id, f)) in finish.iter().enumerate() {
            p.paths[i] = Path::new(id, 10_000, 0);
            p.paths[i].finish_ns = f;
        }
        p.len = finish.len() as u32;
        p
    }

    #[test]
    fn the_model_is_moved_by_what_it_missed_once_per_round() {
        let mut h = History::default();
        // Link 1's model queue: 5 ms at t = 100 ms, 7 ms at 101 ms.
        h.sample(100 * MS, &paths(&[(1, 105 * MS), (2, 0)]));
        h.sample(101 * MS, &paths(&[(1, 108 * MS), (2, 0)]));
        // A packet sent at 101.5 ms met 12 ms: the model counted 6.5.
        assert_eq!(
            h.judge(1, 101_500_000, 12 * MS, 0),
            Some(Fix::Queue(5_500_000))
        );
        // Of which 3 ms are the link's jitter, counted already.
        assert_eq!(
            h.judge(1, 101_500_000, 12 * MS, 3_000_000),
            Some(Fix::Queue(2_500_000))
        );
        h.moved(1, 150 * MS, 5_500_000);
        // Reports on packets sent before that correction change nothing.
        assert_eq!(h.judge(1, 149 * MS, 30 * MS, 0), None);
        // Within the deadband: left alone.
        h.sample(160 * MS, &paths(&[(1, 170 * MS), (2, 0)]));
        assert_eq!(h.judge(1, 160 * MS, 11 * MS, 0), None);
        // Shorter than counted: sooner, by half the difference.
        assert_eq!(h.judge(1, 160 * MS, 0, 0), Some(Fix::Queue(-5 * MS as i64)));
        // Sent before the history began, or over a link it never had.
        assert_eq!(h.judge(1, 99 * MS, 50 * MS, 0), None);
        assert_eq!(h.judge(9, 160 * MS, 50 * MS, 0), None);
    }

    #[test]
    fn what_a_packet_meets_on_a_link_counted_empty_is_its_delay_now() {
        let mut h = History::default();
        h.sample(100 * MS, &paths(&[(1, 0)]));
        // Counted empty, met 12 ms: the link delivers 12 ms past its base.
        assert_eq!(
            h.judge(1, 100 * MS, 12 * MS, 0),
            Some(Fix::Delay(12 * MS as u32))
        );
        // Counted so already (within the deadband): nothing to do.
        assert_eq!(h.judge(1, 100 * MS, 13 * MS, 12 * MS as u32), None);
        // The jitter fell back: so does the delay; a queue cannot go
        // below empty.
        assert_eq!(h.judge(1, 100 * MS, 0, 12 * MS as u32), Some(Fix::Delay(0)));
        // Never beyond what a playout holds for.
        assert_eq!(
            h.judge(1, 100 * MS, 900 * MS, 0),
            Some(Fix::Delay(MAX_EXTRA_NS as u32))
        );
    }

    #[test]
    fn jitter_a_link_no_report_names_is_forgotten() {
        let mut h = History::default();
        let mut p = paths(&[(1, 0), (2, 0)]);
        p.set_extra(1, 9 * MS as u32);
        p.set_extra(2, 9 * MS as u32);
        h.reported(1, 100 * MS, 0);
        h.reported(2, 100 * MS + EXTRA_FOR.as_nanos() as u64, 0);
        let later = 101 * MS + EXTRA_FOR.as_nanos() as u64;
        assert_eq!(h.stale_jitter(later, &p), vec![1]);
        p.set_extra(1, 0);
        assert_eq!(h.stale_jitter(later, &p), Vec::<u32>::new());
    }

    /// Drives a history as the corrector would, for `ms`: a sender offers
    /// `offer` kbit/s to a link of `real` kbit/s, sending while the
    /// model's queue there is under its backlog (as `Paths::pick` does),
    /// and every 20 ms a report moves the model's queue by what the real
    /// link shows. Returns the rates learnt.
    fn drive(h: &mut History, p: &mut Paths, offer: f64, real: f64, ms: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut real_queue = 0.0f64;
        let backlog = u64::from(p.backlog_us) * 1000;
        for t in 1..=ms {
            let now = t * MS;
            let path = &mut p.paths[0];
            // A ms of the offer, in the model's time and the link's.
            let model_ns = MS as f64 * offer / path.kbit() as f64;
            let sent = if path.finish_ns.saturating_sub(now) < backlog {
                path.finish_ns = path.finish_ns.max(now) + model_ns as u64;
                MS as f64 * offer / real
            } else {
                0.0
            };
            real_queue = (real_queue + sent - MS as f64).max(0.0);
            h.sample(now, p);
            for (_, judged) in h.learn(now, p) {
                if let Judged::Rate(kbit) = judged {
                    p.set_rate(1, kbit);
                    out.push(kbit);
                }
            }
            if t % 20 == 0 {
                match h.judge(1, now - MS, real_queue as u64, p.paths[0].extra_ns) {
                    Some(Fix::Queue(err)) => {
                        let moved = p.correct(1, now, err).unwrap();
                        h.moved(1, now, moved);
                    }
                    Some(Fix::Delay(ns)) => {
                        p.set_extra(1, ns);
                    }
                    None => {}
                }
            }
        }
        out
    }

    fn link(kbit: u64) -> Paths {
        let mut p = Paths::EMPTY;
        p.paths[0] = Path::new(1, kbit, 0);
        p.len = 1;
        p
    }

    #[test]
    fn a_shared_link_is_counted_at_its_share_while_others_send() {
        let mut s = Sharing {
            others: vec![10_000],
            heard: 0,
            ..Sharing::default()
        };
        let mut p = link(10_000);
        assert_eq!(s.rate(MS, &p, 1), Some(5_000), "two that want it: half");
        p.set_rate(1, 5_000);
        assert_eq!(s.rate(2 * MS, &p, 1), None, "counted so already");
        // The agent rebuilt the schedule at the link's weight, or a new one.
        let mut p = link(10_000);
        assert_eq!(s.rate(3 * MS, &p, 1), Some(5_000));
        p = link(12_000);
        assert_eq!(s.rate(4 * MS, &p, 1), Some(6_000));
        assert!(s.is_cut());
        // Others' pure ACKs are no reason to cut.
        s.others = vec![300];
        assert_eq!(s.rate(5 * MS, &p, 1), None);
        assert!(!s.is_cut());
        // Unconfirmed, what the server said lapses.
        s.others = vec![8_000];
        p.set_rate(1, s.rate(6 * MS, &p, 1).unwrap());
        assert!(s.is_cut());
        assert_eq!(s.rate(SHARE_FOR_NS + MS, &p, 1), Some(12_000));
        assert!(!s.is_cut() && s.others.is_empty());
        assert_eq!(s.rate(0, &Paths::EMPTY, 1), None, "the link left");
    }

    #[test]
    fn a_rate_set_too_high_is_followed_down() {
        let (mut h, mut p) = (History::default(), link(10_000));
        // The link carries 7 Mbit/s; the sender offers 15.
        let learnt = drive(&mut h, &mut p, 15_000.0, 7_000.0, 3_000);
        assert!((6_600..=7_400).contains(&learnt[0]), "one step: {learnt:?}");
        assert!(
            learnt.iter().all(|k| (6_600..=7_400).contains(k)),
            "{learnt:?}"
        );
    }

    #[test]
    fn a_rate_set_too_low_is_followed_up() {
        let (mut h, mut p) = (History::default(), link(10_000));
        // The link carries 30 Mbit/s; the sender offers 40. A link that
        // never queues shows only what it carried, so the rate climbs in
        // steps of at most double, then settles.
        let learnt = drive(&mut h, &mut p, 40_000.0, 30_000.0, 8_000);
        assert_eq!(learnt[0], 20_000, "{learnt:?}");
        assert!(learnt.len() <= 5, "{learnt:?}");
        let last = *learnt.last().unwrap();
        assert!((28_000..=32_000).contains(&last), "{learnt:?}");
    }

    #[test]
    fn a_right_rate_or_an_idle_link_learns_nothing() {
        let (mut h, mut p) = (History::default(), link(10_000));
        assert_eq!(
            drive(&mut h, &mut p, 15_000.0, 10_000.0, 1_000),
            Vec::<u64>::new()
        );
        // Never busy: never judged.
        let mut h = History::default();
        for t in 1..3000 {
            h.sample(t * MS, &paths(&[(1, 0)]));
            assert_eq!(h.learn(t * MS, &paths(&[(1, 0)])), vec![]);
        }
    }

    /// Links 1 and 2 (10 Mbit/s) reported at 100 ms; from then the model
    /// keeps a queue of `queue_us` on link 1, and link 2 goes on reporting
    /// every 20 ms (what arrived 5 ms before). Link 1's reports stop.
    /// Returns the time (ms) link 1 was called silent, if it was by 400 ms.
    fn silence(h: &mut History, queue_us: u64) -> Option<u64> {
        h.sample(99 * MS, &paths(&[(1, 0), (2, 0)]));
        h.reported(1, 100 * MS, 95 * MS);
        h.reported(2, 100 * MS, 95 * MS);
        for t in 101..400 {
            let p = paths(&[(1, t * MS + queue_us * 1000), (2, 0)]);
            h.sample(t * MS, &p);
            if t % 20 == 0 {
                assert_eq!(h.reported(2, t * MS, (t - 5) * MS), None);
            }
            let silent = h.silent(t * MS, &p);
            assert!(!silent.contains(&2), "link 2 reports: {silent:?}");
            if silent == [1] {
                return Some(t);
            }
        }
        None
    }

    #[test]
    fn a_link_whose_reports_stop_while_the_others_go_on_is_silent() {
        let mut h = History::default();
        // Its burst at 101 ms was due at 111; link 2's arrivals pass that
        // by 45 ms with its report at 180 (175 arrived).
        assert_eq!(silence(&mut h, 10_000), Some(180));
        // Once only.
        let p = paths(&[(1, 500 * MS), (2, 0)]);
        assert_eq!(h.silent(400 * MS, &p), Vec::<u32>::new());
    }

    #[test]
    fn a_probe_train_is_no_burst_that_went_missing() {
        // Links 1 and 2 reported at 100 ms; at 101 ms a probe train goes
        // on link 1, queued there until 139 ms, and nothing after it.
        // Link 2 reports on. No report names the train's packets.
        let run = |told: bool| {
            let mut h = History::default();
            h.sample(99 * MS, &paths(&[(1, 0), (2, 0)]));
            h.reported(1, 100 * MS, 95 * MS);
            h.reported(2, 100 * MS, 95 * MS);
            if told {
                h.probed(1, 139 * MS);
            }
            let mut silent = Vec::new();
            for t in 101..400 {
                let p = paths(&[(1, 139 * MS), (2, 0)]);
                h.sample(t * MS, &p);
                if t % 20 == 0 {
                    h.reported(2, t * MS, (t - 5) * MS);
                }
                silent.extend(h.silent(t * MS, &p));
            }
            silent
        };
        assert_eq!(run(false), vec![1], "untold, the train reads as lost data");
        assert_eq!(run(true), Vec::<u32>::new());
    }

    #[test]
    fn pure_acks_or_no_report_ever_make_no_silence() {
        // A queue under 1000 bytes' time (0.8 ms at 10 Mbit/s) is ACKs,
        // which no playout reports.
        assert_eq!(silence(&mut History::default(), 700), None);
        assert_eq!(silence(&mut History::default(), 900), Some(160));
        // No report ever, of any link: the receiving end may have no
        // playout, and nothing is judged.
        let mut h = History::default();
        for t in 101..3000 {
            let p = paths(&[(1, (t + 10) * MS), (2, 0)]);
            h.sample(t * MS, &p);
            assert_eq!(h.silent(t * MS, &p), Vec::<u32>::new());
        }
    }

    /// A link that comes into the schedule and never delivers (a black
    /// hole from the start for data: a modem plugged in behind a smaller
    /// MTU) is judged from its coming, as one that stopped is.
    #[test]
    fn a_link_that_never_delivers_is_silent_from_its_coming() {
        let mut h = History::default();
        h.sample(99 * MS, &paths(&[(2, 0)]));
        h.reported(2, 100 * MS, 95 * MS);
        let mut silent_at = None;
        for t in 101..400 {
            let p = paths(&[(1, (t + 10) * MS), (2, 0)]);
            h.sample(t * MS, &p);
            if t % 20 == 0 {
                h.reported(2, t * MS, (t - 5) * MS);
            }
            let s = h.silent(t * MS, &p);
            if !s.is_empty() {
                assert_eq!(s, vec![1]);
                silent_at = Some(t);
                break;
            }
        }
        // Its first burst after it came (sampled at 102 ms, 10 ms of
        // queue) was due at 112; link 2's arrivals pass that by 45 ms
        // with its report at 180.
        assert_eq!(silent_at, Some(180));
    }

    /// Samples and judges `h` over `ms` (ms) while the flow sends one full
    /// packet at a time (a window lost: resends after timeouts), on link
    /// 1 at `at` and on link 2 at `two_at` if given, and no report comes
    /// back; link 2 is past the horizon (its delay unmeasured) with
    /// `far`. Returns when link 1 was called silent, if it was (nothing
    /// else may be).
    fn resend_alone(
        h: &mut History,
        ms: std::ops::Range<u64>,
        at: u64,
        two_at: Option<u64>,
        far: bool,
    ) -> Option<u64> {
        for t in ms {
            let resend = |at: u64| {
                if (at..at + 2).contains(&t) {
                    (t + 2) * MS
                } else {
                    0
                }
            };
            let mut p = paths(&[(1, resend(at)), (2, two_at.map_or(0, resend))]);
            if far {
                p.backlog_us = 50_000;
                p.paths[1].delay_ns = u32::MAX;
            }
            h.sample(t * MS, &p);
            let s = h.silent(t * MS, &p);
            if !s.is_empty() {
                assert_eq!(s, vec![1]);
                return Some(t);
            }
        }
        None
    }

    /// A history whose links `delivered` were reported at 100 ms.
    fn delivered(links: &[u32]) -> History {
        let mut h = History::default();
        h.sample(99 * MS, &paths(&[(1, 0), (2, 0)]));
        for &id in links {
            h.reported(id, 100 * MS, 95 * MS);
        }
        h
    }

    #[test]
    fn a_flow_stalled_on_one_link_while_another_delivered_moves_off_it() {
        // Links 1 and 2 delivered until 100 ms; the resend at 200 ms was
        // due at 202 (2 ms of queue): a second later with nothing heard,
        // and link 2 not tried, link 1 is out.
        let stall =
            |two_at, far| resend_alone(&mut delivered(&[1, 2]), 101..3000, 200, two_at, far);
        assert_eq!(stall(None, false), Some(1203));
        // Both tried and nothing heard: the receiving end went quiet, not
        // a link.
        assert_eq!(stall(Some(700), false), None);
        // Link 2 past the horizon (its delay unmeasured): it cannot carry.
        assert_eq!(stall(None, true), None);
        // Link 2 last delivered long before the burst: nothing says it
        // still would.
        let mut h = delivered(&[2]);
        h.reported(1, 1500 * MS, 1495 * MS);
        assert_eq!(resend_alone(&mut h, 1501..4000, 1600, None, false), None);
        // Link 2 never delivered: no better than link 1.
        assert_eq!(
            resend_alone(&mut delivered(&[1]), 101..3000, 200, None, false),
            None
        );
    }

    /// On trial, the nearest link (a lone packet's first choice) is
    /// counted just behind the next; a far one, which a lone packet would
    /// not take anyway, is not counted later, so it still carries data to
    /// be judged by.
    #[test]
    fn a_trial_puts_a_lone_packet_on_another_link_and_no_more() {
        let mut p = Paths::EMPTY;
        p.backlog_us = 50_000;
        p.paths[0] = Path::new(1, 30_000, 0);
        p.paths[1] = Path::new(2, 20_000, 2_000_000);
        p.paths[2] = Path::new(3, 40_000, 30_000_000);
        p.paths[3] = Path::new(4, 40_000, u32::MAX);
        p.len = 4;
        let alone = |p: &Paths, id: u32| {
            let l = p.links().find(|l| l.id == id).unwrap();
            l.delay_now_ns() + l.tx_ns(FULL_PACKET)
        };
        let mut e = Edits::new(p);
        e.trial(1);
        assert_eq!(alone(&e.copy, 1), alone(&e.copy, 2) + TRIAL_BEHIND_NS);
        let mut e = Edits::new(p);
        e.trial(3);
        assert_eq!(e.copy.links().find(|l| l.id == 3).unwrap().extra_ns, 0);
        assert!(e.made.is_empty());
        // Alone in the schedule (the other past the horizon): nothing to
        // prefer.
        let mut only = p;
        only.paths[1] = p.paths[3];
        only.len = 2;
        let mut e = Edits::new(only);
        e.trial(1);
        assert!(e.made.is_empty());
    }

    #[test]
    fn a_link_silent_again_without_a_report_stays_out_twice_as_long() {
        let mut h = History::default();
        let t = silence(&mut h, 10_000).unwrap() * MS;
        let p = paths(&[(1, 0), (2, 0)]);
        assert_eq!(h.revive(t + SILENT_FOR_NS, &p, false), vec![1]);
        // Back, sent a burst, silent again with link 2 reporting on.
        let back = t + SILENT_FOR_NS;
        let mut again = None;
        for k in 1..200 {
            let now = back + k * MS;
            let p = paths(&[(1, now + 10 * MS), (2, 0)]);
            h.sample(now, &p);
            if k % 20 == 0 {
                h.reported(2, now, now - 5 * MS);
            }
            if h.silent(now, &p) == [1] {
                again = Some(now);
                break;
            }
        }
        let again = again.expect("silent again");
        assert_eq!(
            h.revive(again + 2 * SILENT_FOR_NS - 1, &p, false),
            Vec::<u32>::new()
        );
        let back = again + 2 * SILENT_FOR_NS;
        assert_eq!(h.revive(back, &p, false), vec![1]);
        // On trial: its trial delay is no stale jitter to forget.
        let mut tried = paths(&[(1, 0), (2, 0)]);
        tried.set_extra(1, 5_000_000);
        assert_eq!(
            h.stale_jitter(back + 10 * SILENT_FOR_NS, &tried),
            Vec::<u32>::new()
        );
        // A report ends the trial and the doubling.
        assert_eq!(h.reported(1, back + MS, back), Some(Back::Trial));
        assert_eq!(h.out_for.get(&1), None);
        assert_eq!(h.reported(1, back + 2 * MS, back), None);
    }

    /// A link silent again while on trial that then delivers ends both
    /// (its trial delay is the caller's to take away); one the agent put
    /// back into its schedule while silent is on trial.
    #[test]
    fn back_from_a_silence_on_trial_or_put_back_by_the_agent() {
        let mut h = History::default();
        let t = silence(&mut h, 10_000).unwrap() * MS;
        let p = paths(&[(1, 0), (2, 0)]);
        let back = t + SILENT_FOR_NS;
        assert_eq!(h.revive(back, &p, false), vec![1]);
        h.silenced.insert(1, (back + MS, SILENT_FOR_NS));
        assert_eq!(
            h.reported(1, back + 2 * MS, back),
            Some(Back::Silenced { trial: true })
        );

        let mut h = History::default();
        silence(&mut h, 10_000).unwrap();
        // The agent rebuilt the schedule: link 1 usable again.
        assert_eq!(h.silent(500 * MS, &p), Vec::<u32>::new());
        assert_eq!(h.take_put_back(), vec![1]);
        assert_eq!(h.reported(1, 501 * MS, 500 * MS), Some(Back::Trial));
    }

    #[test]
    fn a_silent_link_is_back_with_its_next_report_or_after_a_while() {
        let mut h = History::default();
        let t = silence(&mut h, 10_000).unwrap();
        let p = paths(&[(1, 0), (2, 0)]);
        assert_eq!(
            h.reported(1, (t + 1) * MS, t * MS),
            Some(Back::Silenced { trial: false }),
            "it delivers again"
        );
        assert_eq!(h.reported(1, (t + 2) * MS, t * MS), None, "back once");

        let mut h = History::default();
        let t = silence(&mut h, 10_000).unwrap() * MS;
        assert_eq!(
            h.revive(t + SILENT_FOR_NS - 1, &p, false),
            Vec::<u32>::new()
        );
        assert_eq!(h.revive(t + SILENT_FOR_NS, &p, false), vec![1]);
        assert_eq!(h.revive(t + SILENT_FOR_NS, &p, false), Vec::<u32>::new());

        let mut h = History::default();
        silence(&mut h, 10_000).unwrap();
        assert_eq!(
            h.revive(0, &p, true),
            vec![1],
            "all, the schedule forgotten"
        );
        // A link the schedule no longer has is forgotten.
        let mut h = History::default();
        silence(&mut h, 10_000).unwrap();
        assert_eq!(h.revive(0, &paths(&[(2, 0)]), true), Vec::<u32>::new());
    }

    #[test]
    fn an_unmeasured_delay_never_puts_arrivals_past_now() {
        let mut h = History::default();
        h.reported(2, 100 * MS, 100 * MS + u64::from(u32::MAX));
        assert_eq!(h.heard_ns, 100 * MS);
    }

    #[test]
    fn a_forgotten_link_leaves_no_rate_for_the_next_to_take_its_id() {
        let (tx, _rx) = mpsc::channel();
        let c = Corrector {
            tx,
            shared: Default::default(),
            _worker: Worker::spawn("test", |_| {}).unwrap(),
        };
        let learnt = Learnt {
            kbit: 7_000,
            at: monotonic_ns(),
        };
        lock(&c.shared).learnt.insert((Model::Down(1), 0), learnt);
        lock(&c.shared).learnt.insert((Model::Down(2), 0), learnt);
        assert_eq!(c.rate(Model::Down(1), 0), Some(7_000));
        c.forget(Model::Down(1), 0);
        assert_eq!(c.rate(Model::Down(1), 0), None);
        assert_eq!(c.rate(Model::Down(2), 0), Some(7_000), "another schedule's");
    }

    #[test]
    fn a_gap_in_the_samples_is_judged_by_the_range_it_leaves() {
        let mut h = History::default();
        // Sampled each millisecond to 100 ms, then not until 110 ms (the
        // thread was preempted); the model's queue on link 1 was 8 ms.
        for t in 95..=100 {
            h.sample(t * MS, &paths(&[(1, (t + 8) * MS)]));
        }
        h.sample(110 * MS, &paths(&[(1, 118 * MS)]));
        // Sent at 105 ms: the model's queue there was 3 to 13 ms (the
        // earlier sample alone reads 3). A packet that met 10 is within
        // it; none is taken for the link's delay.
        assert_eq!(h.judge(1, 105 * MS, 10 * MS, 0), None);
        // One that met 30: later, by what lies beyond the most.
        assert_eq!(
            h.judge(1, 105 * MS, 30 * MS, 0),
            Some(Fix::Queue(17 * MS as i64))
        );
        // Where the samples are a millisecond apart, the range is that
        // narrow: at 99.5 ms the model had 7.5 to 8.5 ms, the packet met 20.
        assert_eq!(
            h.judge(1, 99_500_000, 20 * MS, 0),
            Some(Fix::Queue(11_500_000))
        );
    }

    #[test]
    fn old_samples_leave_the_history() {
        let mut h = History::default();
        h.sample(MS, &paths(&[(1, 9 * MS)]));
        h.sample(MS + HISTORY_NS + 1, &paths(&[(1, 0)]));
        assert_eq!(h.queue_at(1, 2 * MS), None);
    }

    #[test]
    fn a_send_time_is_read_back_on_the_senders_clock() {
        let now = 5_000_000_123_456;
        assert_eq!(sent_ns((now / 1000) as u32, now), now / 1000 * 1000);
        assert_eq!(
            sent_ns((now / 1000 - 40_000) as u32, now),
            now - 40_000_000 - 456
        );
        // Across the wrap of the 32-bit µs clock.
        let now = (1u64 << 32) * 1000 + 10_000_000;
        assert_eq!(sent_ns(u32::MAX - 9_999, now), now - 20_000_000);
    }
}
