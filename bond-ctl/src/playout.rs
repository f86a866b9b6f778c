//! The receiving end's playout: every wrapped packet for this host waits
//! until the farthest link in use could have delivered it, then goes up in
//! the order it was sent.
//!
//! Why: the sender stripes one flow over links of different delays. In
//! order, that needs the near links' queues to cover the far link's extra
//! delay, so the round trip the flow sees grows with its own load, and
//! TCP's congestion control (CUBIC's HyStart, BBR's min_rtt) reads that
//! growth as the path's limit. Held here instead, every packet arrives as
//! if over the farthest link: one steady round trip, from the first packet
//! on. The hold also puts back in order what the sender's estimates got
//! wrong (a rate a few percent off, jitter).
//!
//! How: the datapath redirects each checked DATA packet, still wrapped, to
//! a TAP device (`<device>-hold`); [`run`] reads it, holds it, and writes it
//! back into the TAP, where the same XDP program unwraps it and passes it
//! up. The release time comes from the send time in the bond header
//! ([`BondHdr::sent_us`]), so no two links' clocks are compared: a packet's
//! transit (arrival by this host's clock less its send time by the
//! sender's) includes the unknown offset between the clocks, which is the
//! same on every link. Per link, the least transit of a window is its base;
//! a packet is released when its transit reaches the least base plus the
//! spread between the bases (or the agent's floor, the links' delays from
//! their echoes, so that the hold does not wait for the far link to carry
//! traffic before counting it) plus a margin learnt from packets that still
//! came out of order.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bond_common::{
    maps::Hold,
    wire::{BOND_OFF, BondHdr},
};
use serde::Serialize;

use crate::datapath::{Maps, monotonic_ns};

/// How long a link's least transit (and the margin) is remembered: a
/// window of 10 s, kept as two halves, so a sample lives 10 to 20 s.
const WINDOW_US: u64 = 10_000_000;
/// The longest a packet is held, µs: far links beyond a sender's horizon
/// (50 ms by default) are not scheduled at all.
pub const MAX_HOLD_US: i64 = 100_000;
/// The largest margin learnt from reordered packets, µs.
const MAX_MARGIN_US: i64 = 30_000;
/// A transit this far from the least, µs, means the sender's clock started
/// over (a reboot): everything learnt is dropped.
const RESTART_US: i64 = 10_000_000;
/// Packets held at most; past it the earliest goes at once.
pub const CAPACITY: usize = 16_384;

/// The least (or, negated, the greatest) value of a sliding window.
#[derive(Clone, Copy, Debug)]
struct WindowMin {
    cur: i64,
    prev: i64,
    since_us: u64,
}

impl WindowMin {
    fn new(v: i64, now_us: u64) -> Self {
        Self {
            cur: v,
            prev: v,
            since_us: now_us,
        }
    }
    fn add(&mut self, v: i64, now_us: u64) {
        if now_us.saturating_sub(self.since_us) >= WINDOW_US / 2 {
            self.prev = self.cur;
            self.cur = v;
            self.since_us = now_us;
        } else {
            self.cur = self.cur.min(v);
        }
    }
    fn get(&self, now_us: u64) -> i64 {
        // A window that saw nothing for a whole half forgets the older one.
        if now_us.saturating_sub(self.since_us) >= WINDOW_US {
            self.cur
        } else {
            self.cur.min(self.prev)
        }
    }
}

/// What the playout did, for `bond-ctl status` and the tests.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Packets that went through.
    pub packets: u64,
    /// Of them, held for a while (the rest were already due).
    pub held: u64,
    /// Released after a packet sent later: still out of order.
    pub reordered: u64,
    /// Released early because the playout was full.
    pub overflow: u64,
    /// The hold target now, µs past the nearest link's base: the spread
    /// between the links (or the floor) plus the margin.
    pub target_us: i64,
    /// The margin learnt from reordered packets, µs.
    pub margin_us: i64,
    /// The longest hold of any packet, µs.
    pub max_hold_us: i64,
}

struct Held<T> {
    at_us: u64,
    n: u64,
    sent_us: u32,
    /// How much later than the target it arrived, µs (0 if in time).
    over_us: i64,
    item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at_us, self.n) == (o.at_us, o.n)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Held<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at_us, self.n).cmp(&(o.at_us, o.n))
    }
}

/// The playout's logic, clock passed in: one sender's packets (the server's
/// downstream to an origin), by the link each came on and its send time.
pub struct Playout<T> {
    /// Transits are kept relative to the first one seen (wrapping µs).
    base: Option<u32>,
    links: HashMap<u8, WindowMin>,
    /// Negated: the greatest lateness of a reordered packet.
    margin: WindowMin,
    /// The send time of the latest packet released.
    latest: Option<u32>,
    floor_us: i64,
    heap: BinaryHeap<Reverse<Held<T>>>,
    n: u64,
    stats: Stats,
}

impl<T> Default for Playout<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Playout<T> {
    pub fn new() -> Self {
        Self {
            base: None,
            links: HashMap::new(),
            margin: WindowMin::new(0, 0),
            latest: None,
            floor_us: 0,
            heap: BinaryHeap::new(),
            n: 0,
            stats: Stats::default(),
        }
    }

    /// The least spread to hold for, µs: the links' relative one-way
    /// delays as the agent knows them from their echoes.
    pub fn set_floor(&mut self, us: u32) {
        self.floor_us = i64::from(us).min(MAX_HOLD_US);
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// A packet sent at `sent_us` (the sender's clock) arrived over `link`
    /// at `now_us` (ours); it is held until its time. Returns that time.
    pub fn push(&mut self, now_us: u64, link: u8, sent_us: u32, item: T) -> u64 {
        let transit = (now_us as u32).wrapping_sub(sent_us);
        let base = *self.base.get_or_insert(transit);
        let d = i64::from(transit.wrapping_sub(base) as i32);
        let least = self.links.values().map(|w| w.get(now_us)).min();
        if least.is_some_and(|l| (d - l).abs() > RESTART_US) {
            // The sender's clock started over: learn afresh.
            self.base = Some(transit);
            self.links.clear();
            self.latest = None;
            return self.push(now_us, link, sent_us, item);
        }
        self.links
            .entry(link)
            .and_modify(|w| w.add(d, now_us))
            .or_insert_with(|| WindowMin::new(d, now_us));
        // A link silent for a whole window is out of the schedule.
        self.links
            .retain(|_, w| now_us.saturating_sub(w.since_us) < 2 * WINDOW_US);
        let bases = self.links.values().map(|w| w.get(now_us));
        let (least, most) = bases.fold((i64::MAX, i64::MIN), |(lo, hi), b| (lo.min(b), hi.max(b)));
        let margin = -self.margin.get(now_us);
        let target = (most - least).max(self.floor_us) + margin;
        let hold = (least + target - d).clamp(0, MAX_HOLD_US);
        let over_us = (d - least - target).max(0);
        self.stats.packets += 1;
        self.stats.held += u64::from(hold > 0);
        self.stats.target_us = target;
        self.stats.margin_us = margin;
        self.stats.max_hold_us = self.stats.max_hold_us.max(hold);
        let at_us = now_us + hold as u64;
        self.n += 1;
        self.heap.push(Reverse(Held {
            at_us,
            n: self.n,
            sent_us,
            over_us,
            item,
        }));
        at_us
    }

    /// When the next packet is due, if any is held.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(h)| h.at_us)
    }

    /// The next packet due at `now_us` (or pushed out by a full playout).
    pub fn pop_due(&mut self, now_us: u64) -> Option<T> {
        let full = self.heap.len() > CAPACITY;
        if !full && self.next_due()? > now_us {
            return None;
        }
        let Reverse(h) = self.heap.pop()?;
        self.stats.overflow += u64::from(full);
        match self.latest {
            Some(l) if (l.wrapping_sub(h.sent_us) as i32) > 0 => {
                // Out of order all the same, and later than its link's
                // base and the spread explain (jitter, a queue the sender
                // did not see): hold that much longer from now on.
                self.margin.add(-h.over_us.min(MAX_MARGIN_US), now_us);
                self.stats.reordered += 1;
            }
            _ => self.latest = Some(h.sent_us),
        }
        Some(h.item)
    }

    /// Everything held, in release order (the playout is stopping).
    pub fn drain(&mut self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.heap.len());
        while let Some(Reverse(h)) = self.heap.pop() {
            all.push(h.item);
        }
        all
    }
}

/// The hold device: a TAP whose reads are what the datapath redirected to
/// it and whose writes arrive on it, into the same XDP program.
pub struct Tap {
    fd: OwnedFd,
    pub name: String,
}

impl Tap {
    /// Creates (and owns: it goes when the fd closes) a TAP device.
    pub fn create(name: &str) -> Result<Self> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TAP: libc::c_short = 0x0002;
        const IFF_NO_PI: libc::c_short = 0x1000;
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IFNAMSIZ],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            bail!("hold device name {name:?}: 1 to 15 bytes");
        }
        let path = c"/dev/net/tun";
        // SAFETY: a NUL-terminated path; the returned fd is checked.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid
        // out as; the fd is a tun control fd.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("creating TAP device {name}"));
        }
        Ok(Self {
            fd,
            name: name.to_string(),
        })
    }

    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        nix::unistd::read(self.fd.as_raw_fd(), buf).map_err(std::io::Error::from)
    }

    fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        nix::unistd::write(&self.fd, frame).map_err(std::io::Error::from)
    }

    /// Waits until a frame can be read or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut pfd = [nix::poll::PollFd::new(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = timeout.as_millis().min(u128::from(u16::MAX)) as u16;
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms));
    }
}

/// The running playout: its thread, the floor the agent sets and its stats.
pub struct Handle {
    stop: Arc<AtomicBool>,
    floor_us: Arc<AtomicU32>,
    stats: Arc<Mutex<Stats>>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// Starts the playout on `tap` (the datapath's XDP program attached to
    /// it already), telling the datapath through `maps` that it reads.
    pub fn start(tap: Tap, ifindex: u32, mac: [u8; 6], maps: Maps) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let floor_us = Arc::new(AtomicU32::new(0));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (s, f, st) = (stop.clone(), floor_us.clone(), stats.clone());
        maps.set_terminal_hold(alive(ifindex))?;
        let thread = std::thread::Builder::new()
            .name("playout".into())
            .spawn(move || run(&tap, ifindex, mac, &maps, &s, &f, &st))?;
        Ok(Self {
            stop,
            floor_us,
            stats,
            thread: Some(thread),
        })
    }

    pub fn set_floor(&self, us: u32) {
        self.floor_us.store(us, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long the datapath trusts the playout to be reading after each
/// sign of life; it renews every [`BEAT`].
const ALIVE: Duration = Duration::from_millis(500);
const BEAT: Duration = Duration::from_millis(100);

fn alive(ifindex: u32) -> Hold {
    Hold {
        ifindex,
        _pad: 0,
        alive_until_ns: monotonic_ns() + ALIVE.as_nanos() as u64,
    }
}

fn run(
    tap: &Tap,
    ifindex: u32,
    mac: [u8; 6],
    maps: &Maps,
    stop: &AtomicBool,
    floor_us: &AtomicU32,
    stats: &Mutex<Stats>,
) {
    let mut p: Playout<Vec<u8>> = Playout::new();
    let mut buf = vec![0u8; 65_536];
    let mut beat = 0u64;
    let send = |mut frame: Vec<u8>| {
        // Addressed to the TAP, or the stack takes it for another host's.
        frame[..6].copy_from_slice(&mac);
        if let Err(e) = tap.write(&frame) {
            eprintln!("bond-ctl: playout: writing to {}: {e}", tap.name);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = monotonic_ns();
        if now >= beat {
            if let Err(e) = maps.set_terminal_hold(alive(ifindex)) {
                eprintln!("bond-ctl: playout: {e}");
            }
            *stats.lock().unwrap_or_else(|e| e.into_inner()) = p.stats();
            beat = now + BEAT.as_nanos() as u64;
        }
        p.set_floor(floor_us.load(Ordering::Relaxed));
        let wait = p.next_due().map_or(BEAT, |at| {
            Duration::from_micros(at.saturating_sub(now / 1000))
        });
        if !wait.is_zero() {
            tap.wait(wait.min(BEAT));
        }
        loop {
            match tap.read(&mut buf) {
                Ok(n) if n >= BOND_OFF + BondHdr::LEN => {
                    let frame = buf[..n].to_vec();
                    match BondHdr::parse(&frame[BOND_OFF..]) {
                        Ok(h) => {
                            p.push(monotonic_ns() / 1000, h.link, h.sent_us(), frame);
                        }
                        Err(_) => send(frame),
                    }
                }
                Ok(n) => send(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("bond-ctl: playout: reading {}: {e}", tap.name);
                    break;
                }
            }
        }
        let now_us = monotonic_ns() / 1000;
        while let Some(frame) = p.pop_due(now_us) {
            send(frame);
        }
    }
    // Deliver at once from now on, and nothing held is lost.
    let _ = maps.set_terminal_hold(Hold::default());
    for frame in p.drain() {
        send(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    /// Drives a playout: each (arrival ms, link, sent ms) in arrival order;
    /// returns the send times in release order with their release times.
    fn play(p: &mut Playout<u32>, arrivals: &[(u64, u8, u64)]) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let clock = 5_000_000; // the sender's clock is elsewhere
        let mut i = 0;
        let mut now = arrivals[0].0 * MS;
        while i < arrivals.len() || !p.is_empty() {
            while i < arrivals.len() && arrivals[i].0 * MS <= now {
                let (_, link, sent) = arrivals[i];
                p.push(now, link, (clock + sent * MS) as u32, sent as u32);
                i += 1;
            }
            while let Some(sent) = p.pop_due(now) {
                out.push((sent, now));
            }
            now += 100;
        }
        out
    }

    #[test]
    fn a_near_link_waits_for_the_far_one_and_order_is_kept() {
        // Link 1 delivers in 5 ms, link 2 in 40 ms; one packet a ms,
        // alternating. Once both links are known every packet goes up
        // 40 ms after it was sent, in the order sent.
        let mut arrivals: Vec<(u64, u8, u64)> = (0..200u64)
            .map(|s| {
                let (link, delay) = if s % 2 == 0 { (1, 5) } else { (2, 40) };
                (s + delay, link, s)
            })
            .collect();
        arrivals.sort();
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        let steady: Vec<_> = out.iter().filter(|(s, _)| *s >= 50).collect();
        for w in steady.windows(2) {
            assert!(w[0].0 < w[1].0, "out of order: {w:?}");
        }
        for (s, at) in &steady {
            let transit = at / MS - u64::from(*s);
            assert!(
                (40..=41).contains(&transit),
                "packet {s} after {transit} ms"
            );
        }
        assert_eq!(p.stats().target_us, 35_000);
    }

    #[test]
    fn the_floor_holds_before_the_far_link_carries_anything() {
        // Only the near link (5 ms) carries traffic so far; the agent
        // knows a second link 35 ms farther.
        let arrivals: Vec<(u64, u8, u64)> = (0..50u64).map(|s| (s + 5, 1, s)).collect();
        let mut p = Playout::new();
        p.set_floor(35_000);
        let out = play(&mut p, &arrivals);
        for (s, at) in &out {
            assert_eq!(at / MS - u64::from(*s), 40, "packet {s}");
        }
    }

    #[test]
    fn equal_links_pass_at_once() {
        let arrivals: Vec<(u64, u8, u64)> =
            (0..100u64).map(|s| (s + 3, (s % 3) as u8, s)).collect();
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        assert_eq!(out.len(), 100);
        assert!(out.iter().all(|(s, at)| at / MS == u64::from(*s) + 3));
        assert_eq!(p.stats().held, 0);
    }

    #[test]
    fn jitter_that_still_reorders_widens_the_margin_until_it_does_not() {
        // Two links of 10 ms; link 2 now and then 6 ms slower (jitter):
        // the first such packet comes out late, the margin learns, and
        // later ones are waited for.
        let arrivals: Vec<(u64, u8, u64)> = {
            let mut a: Vec<_> = (0..400u64)
                .map(|s| {
                    let slow = s % 2 == 1 && s % 50 == 25;
                    (s + 10 + if slow { 6 } else { 0 }, (s % 2) as u8, s)
                })
                .collect();
            a.sort();
            a
        };
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        let late: Vec<u32> = out
            .windows(2)
            .filter(|w| w[1].0 < w[0].0)
            .map(|w| w[1].0)
            .collect();
        assert_eq!(late, [25], "only the first slow packet comes out of order");
        assert_eq!(p.stats().reordered, 1);
        assert!(p.stats().margin_us >= 5_000, "{:?}", p.stats());
    }

    #[test]
    fn nothing_is_held_longer_than_the_cap_and_a_full_playout_lets_go() {
        let mut p = Playout::new();
        p.set_floor(1_000_000);
        let at = p.push(0, 1, 0, 0u32);
        assert_eq!(at, MAX_HOLD_US as u64);
        for i in 1..=CAPACITY as u32 {
            p.push(0, 1, 0, i);
        }
        assert_eq!(p.pop_due(0), Some(0), "the earliest goes when full");
        assert_eq!(p.pop_due(0), None);
        assert_eq!(p.stats().overflow, 1);
        assert_eq!(p.drain().len(), CAPACITY);
    }

    #[test]
    fn a_restarted_sender_clock_is_learnt_afresh() {
        let mut p = Playout::new();
        p.push(0, 1, 1_000_000, 0u32);
        p.push(10 * MS, 2, 1_000_000 + 10 * MS as u32 - 30_000, 1);
        assert_eq!(p.stats().target_us, 30_000);
        // Rebooted: the clock reads something else entirely.
        let at = p.push(20 * MS, 1, 4_000_000_000, 2);
        assert_eq!(at, 20 * MS, "one link known again: nothing to wait for");
        assert_eq!(p.stats().target_us, 0);
    }
}
