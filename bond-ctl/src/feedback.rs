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

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use bond_common::edpf::Paths;

use crate::{
    datapath::{Maps, monotonic_ns},
    proto::LinkQueue,
    worker::Worker,
};

/// How often a receiving end reports.
pub const EVERY: Duration = Duration::from_millis(20);
/// How often a sender samples its model.
pub const SAMPLE: Duration = Duration::from_millis(1);
/// How far back the model's history reaches: longer than any report takes
/// to come back (a far link's delay both ways and a report's interval).
const HISTORY_NS: u64 = 1_000_000_000;
/// Differences smaller than this are left alone: a packet's own
/// transmission time and the sampling step are in them, µs.
const DEADBAND_NS: i64 = 2_000_000;

/// One sender's model over time, per link id.
#[derive(Debug, Default)]
pub struct History {
    /// Per link: (when, the model's finish time then), oldest first.
    samples: HashMap<u32, VecDeque<(u64, u64)>>,
    /// Per link: when the model was last corrected.
    fixed_at: HashMap<u32, u64>,
}

impl History {
    /// Records the model's queues at `now` (ns).
    pub fn sample(&mut self, now: u64, paths: &Paths) {
        for p in paths.links() {
            let h = self.samples.entry(p.id).or_default();
            h.push_back((now, p.finish_ns));
            while h.front().is_some_and(|(t, _)| now - t > HISTORY_NS) {
                h.pop_front();
            }
        }
    }

    /// The model's queue on link `id` at `t` (ns), from the last sample at
    /// or before it.
    fn queue_at(&self, id: u32, t: u64) -> Option<u64> {
        let h = self.samples.get(&id)?;
        let i = h.partition_point(|(at, _)| *at <= t);
        let (_, finish) = h.get(i.checked_sub(1)?)?;
        Some(finish.saturating_sub(t))
    }

    /// A packet sent at `sent_ns` over link `id` met `queue_ns` of queue:
    /// by how much to move the model's queue on that link now, if at all.
    /// None when the model was right (within [`DEADBAND_NS`]), when the
    /// packet left before the last correction, or before the history.
    pub fn error(&mut self, id: u32, sent_ns: u64, queue_ns: u64, now: u64) -> Option<i64> {
        if self.fixed_at.get(&id).is_some_and(|&f| sent_ns < f) {
            return None;
        }
        let model = self.queue_at(id, sent_ns)?;
        let err = queue_ns as i64 - model as i64;
        if err.abs() < DEADBAND_NS {
            return None;
        }
        self.fixed_at.insert(id, now);
        Some(err)
    }
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
    Down(u16),
}

impl Model {
    fn read(self, maps: &Maps) -> Option<Paths> {
        match self {
            Self::Up => maps.up_paths().ok(),
            Self::Down(c) => maps.down_paths(c).ok().flatten(),
        }
    }

    fn write(self, maps: &Maps, p: Paths) -> crate::datapath::Result<()> {
        match self {
            Self::Up => maps.put_up_paths(p),
            Self::Down(c) => maps.put_down_paths(c, p),
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
#[derive(Clone, Copy, Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct Stats {
    pub reports: u64,
    /// Corrections that made a link's queue longer, and shorter.
    pub later: u64,
    pub sooner: u64,
}

/// The sender's side, running: samples the schedules it has had reports
/// for and applies corrections.
pub struct Corrector {
    tx: mpsc::Sender<Report>,
    stats: Arc<std::sync::Mutex<Stats>>,
    _worker: Worker,
}

impl Corrector {
    pub fn start(maps: Maps) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(std::sync::Mutex::new(Stats::default()));
        let st = stats.clone();
        let worker = Worker::spawn("feedback", move |stop| run(&maps, &rx, stop, &st))?;
        Ok(Self {
            tx,
            stats,
            _worker: worker,
        })
    }

    pub fn report(&self, r: Report) {
        let _ = self.tx.send(r);
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A schedule no report named for this long is no longer sampled.
const IDLE_NS: u64 = 2_000_000_000;

fn run(
    maps: &Maps,
    rx: &mpsc::Receiver<Report>,
    stop: &AtomicBool,
    stats: &std::sync::Mutex<Stats>,
) {
    // Per schedule: its history and when a report last named it.
    let mut models: HashMap<Model, (History, u64)> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let now = monotonic_ns();
        models.retain(|_, (_, last)| now - *last < IDLE_NS);
        for (m, (h, _)) in &mut models {
            if let Some(p) = m.read(maps) {
                h.sample(now, &p);
            }
        }
        let mut done = Stats::default();
        while let Ok(r) = rx.try_recv() {
            done.reports += 1;
            let (h, last) = models
                .entry(r.model)
                .or_insert_with(|| (History::default(), now));
            *last = now;
            let sent = sent_ns(r.queue.sent_us, now);
            let queue = u64::from(r.queue.queue_us) * 1000;
            let Some(err) = h.error(r.id, sent, queue, now) else {
                continue;
            };
            if let Some(mut p) = r.model.read(maps)
                && p.correct(r.id, monotonic_ns(), err)
            {
                if let Err(e) = r.model.write(maps, p) {
                    eprintln!("bond-ctl: feedback: {e}");
                }
                *if err > 0 {
                    &mut done.later
                } else {
                    &mut done.sooner
                } += 1;
            }
        }
        if done != Stats::default() {
            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
            s.reports += done.reports;
            s.later += done.later;
            s.sooner += done.sooner;
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
        assert_eq!(h.error(1, 101_500_000, 12 * MS, 150 * MS), Some(5_500_000));
        // Reports on packets sent before that correction change nothing.
        assert_eq!(h.error(1, 149 * MS, 30 * MS, 151 * MS), None);
        // Within the deadband: left alone.
        h.sample(160 * MS, &paths(&[(1, 170 * MS), (2, 0)]));
        assert_eq!(h.error(1, 160 * MS, 11 * MS, 200 * MS), None);
        // Shorter than counted: sooner.
        assert_eq!(h.error(1, 160 * MS, 0, 201 * MS), Some(-10 * MS as i64));
        // An idle link counted empty that met a queue (another sender).
        assert_eq!(h.error(2, 160 * MS, 4 * MS, 202 * MS), Some(4 * MS as i64));
        // Sent before the history began, or over a link it never had.
        assert_eq!(h.error(1, 99 * MS, 50 * MS, 203 * MS), None);
        assert_eq!(h.error(9, 160 * MS, 50 * MS, 203 * MS), None);
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
