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
//! a packet is released once its age reaches the least base plus the
//! spread between the bases (or the agent's floor, the links' delays from
//! their echoes, so that the hold does not wait for the far link to carry
//! traffic before counting it), and once every link that is delivering has
//! delivered something sent after it: links do not reorder their own
//! packets, so nothing sent earlier can still come. A link that has gone
//! quiet is not waited for, and nothing waits longer than [`MAX_WAIT_US`]
//! past the spread.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use bond_common::{
    maps::Hold,
    wire::{BOND_OFF, BondHdr, SEQ_COPY, SEQ_MAX},
};

use bond_datapath::{Maps, monotonic_ns};

use crate::{
    net::{Iface, Net, sysctl},
    share::Arrivals,
    worker::{Worker, lock},
};
use bond_proto::control::{LinkQueue, LinkShare, MAX_FEEDBACK_LINKS};

/// How long a link's least transit is remembered: a window of 10 s, kept
/// as two halves, so a sample lives 10 to 20 s.
const WINDOW_US: u64 = 10_000_000;
/// The longest spread held for, µs: far links beyond a sender's horizon
/// (50 ms by default) are not scheduled at all.
pub const MAX_SPREAD_US: i64 = 100_000;
/// The longest a packet waits past the spread for a delivering link to
/// pass it (a queue the sender did not see, jitter), µs.
pub const MAX_WAIT_US: i64 = 30_000;
/// A link that delivered nothing for this long, or whose latest packet was
/// sent this long before the one waiting (the sender was not using it), is
/// not waited for, µs.
const QUIET_US: u64 = 10_000;
/// A transit this far from the least, µs, means the sender's clock started
/// over (a reboot): everything learnt is dropped.
const RESTART_US: i64 = 10_000_000;
/// Packets held at most; past it the earliest goes at once.
pub const CAPACITY: usize = 16_384;
/// How long packets wait past a link's gap for the sender's copies of
/// what it lost, beyond the spread, µs: the request's way to the sender
/// over the nearest link, and the copy's way back behind the queues the
/// sender keeps (its horizon, 50 ms by default).
pub const RESEND_WAIT_US: i64 = 70_000;
/// Gaps one playout waits on at most; a link losing more is not waited
/// for (its losses are TCP's to recover).
const MAX_GAPS: usize = 64;
/// The window flows are counted over, µs, and the packets in it that make
/// a flow busy ([`Playout::note_flow`]).
const FLOW_WINDOW_US: u64 = 100_000;
const BUSY_PACKETS: u32 = 10;

/// The least value of a sliding window.
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
pub use bond_api::reply::Playout as Stats;

/// A gap in one link's sequence, waited on. (A copy does not say which
/// link it was first sent on: its number and send time find the gap.)
#[derive(Clone, Debug)]
struct Gap {
    /// The send times (unwrapped) of the packets the link delivered
    /// around it.
    after: i64,
    before: i64,
    /// Sequence numbers still missing.
    missing: Vec<u8>,
    seen_us: u64,
    until_us: u64,
}

/// One link as the playout sees it.
#[derive(Clone, Copy, Debug)]
struct Link {
    /// Least transit (relative), over the window.
    base: WindowMin,
    /// The latest send time delivered (unwrapped µs).
    latest: i64,
    /// When it last delivered (our µs).
    last_us: u64,
    /// Since the last feedback, the packet that waited least on the way:
    /// (its send time, its transit beyond the base, µs).
    least_queue: Option<(u32, u32)>,
    /// The sequence number of the latest packet delivered (0: not
    /// counted).
    seq: u8,
}

impl Link {
    /// Whether a packet numbered `seq`, sent at `s`, comes after the
    /// latest this link delivered: sent later, or in the same µs with
    /// the next number (a burst sends several in one).
    fn followed_by(&self, s: i64, seq: u8) -> bool {
        s > self.latest
            || (s == self.latest && seq != 0 && seq == bond_common::wire::seq_next(self.seq))
    }
}

struct Held<T> {
    arrived_us: u64,
    item: T,
}

/// The playout's logic, clock passed in: one sender's packets (the server's
/// downstream to an origin), by the link each came on and its send time.
pub struct Playout<T> {
    /// Transits are kept relative to the first one seen (wrapping µs).
    base: Option<u32>,
    /// The sender's clock unwrapped: the latest send time seen.
    sent: Option<i64>,
    links: HashMap<u8, Link>,
    /// By unwrapped send time, then arrival.
    held: BTreeMap<(i64, u64), Held<T>>,
    /// Released at once: late, or from before the sender's clock restarted.
    ready: VecDeque<T>,
    /// The send time of the latest packet released.
    released: Option<i64>,
    floor_us: i64,
    n: u64,
    stats: Stats,
    gaps: Vec<Gap>,
    /// Packets per flow in the current window, when it began, and the
    /// busy flows of the window before ([`Self::note_flow`]).
    flows: HashMap<u64, u32>,
    flows_since_us: u64,
    busy: usize,
    /// Gaps seen and not yet asked for ([`Self::take_asks`]).
    asks: Vec<bond_proto::control::Gap>,
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
            sent: None,
            links: HashMap::new(),
            held: BTreeMap::new(),
            ready: VecDeque::new(),
            released: None,
            floor_us: 0,
            n: 0,
            stats: Stats::default(),
            gaps: Vec::new(),
            flows: HashMap::new(),
            flows_since_us: 0,
            busy: 0,
            asks: Vec::new(),
        }
    }

    /// The least spread to hold for, µs: the links' relative one-way
    /// delays as the agent knows them from their echoes.
    pub fn set_floor(&mut self, us: u32) {
        self.floor_us = i64::from(us).min(MAX_SPREAD_US);
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.held.len() + self.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unwraps a send time against the latest seen.
    fn unwrap_sent(&mut self, sent_us: u32) -> i64 {
        let s = match self.sent {
            None => i64::from(sent_us),
            Some(l) => l + i64::from(sent_us.wrapping_sub(l as u32) as i32),
        };
        self.sent = Some(self.sent.map_or(s, |l| l.max(s)));
        s
    }

    /// The nearest link's base and the spread to hold for.
    fn bases(&self, now_us: u64) -> (i64, i64) {
        let (least, most) = self
            .links
            .values()
            .map(|l| l.base.get(now_us))
            .fold((i64::MAX, i64::MIN), |(lo, hi), b| (lo.min(b), hi.max(b)));
        if least == i64::MAX {
            return (0, self.floor_us);
        }
        (least, (most - least).clamp(self.floor_us, MAX_SPREAD_US))
    }

    /// How long ago, relative to the nearest link's base, a packet sent at
    /// `s` (unwrapped) was sent: 0 when it would arrive over that link.
    fn age(&self, now_us: u64, s: i64, least: i64) -> i64 {
        let transit = (now_us as u32).wrapping_sub(s as u32);
        i64::from(transit.wrapping_sub(self.base.unwrap_or(transit)) as i32) - least
    }

    /// A packet sent at `sent_us` (the sender's clock) arrived over `link`
    /// at `now_us` (ours); it is held until its time ([`Self::pop_due`]).
    pub fn push(&mut self, now_us: u64, link: u8, sent_us: u32, item: T) {
        self.push_seq(now_us, link, sent_us, 0, item);
    }

    /// As [`Self::push`], with the packet's number in its link's sequence
    /// (`BondHdr::seq`; 0: not counted). A number that skips some opens a
    /// gap, which [`Self::take_asks`] asks the sender for; while one flow
    /// at most is busy ([`Self::note_flow`]), everything sent after the
    /// link's previous packet waits for the copies (up to
    /// [`RESEND_WAIT_US`] past the spread). A copy comes marked
    /// [`SEQ_COPY`] and fills the gap its number and send time name.
    pub fn push_seq(&mut self, now_us: u64, link: u8, sent_us: u32, seq: u8, item: T) {
        let transit = (now_us as u32).wrapping_sub(sent_us);
        let base = *self.base.get_or_insert(transit);
        let d = i64::from(transit.wrapping_sub(base) as i32);
        let (least, _) = self.bases(now_us);
        if !self.links.is_empty() && (d - least).abs() > RESTART_US {
            // The sender's clock started over: what is held goes now, and
            // the links are learnt afresh.
            self.ready
                .extend(std::mem::take(&mut self.held).into_values().map(|h| h.item));
            *self = Self {
                ready: std::mem::take(&mut self.ready),
                floor_us: self.floor_us,
                stats: self.stats,
                ..Self::new()
            };
            return self.push_seq(now_us, link, sent_us, seq, item);
        }
        let s = self.unwrap_sent(sent_us);
        if seq != 0 {
            self.sequence(now_us, link, s, seq);
        }
        if seq & SEQ_COPY != 0 {
            // Late by its nature: no measure of the link it came on.
            self.stats.packets += 1;
            return self.hold(now_us, s, item);
        }
        let l = self
            .links
            .entry(link)
            .and_modify(|l| {
                l.base.add(d, now_us);
                if seq != 0 && l.followed_by(s, seq) {
                    l.seq = seq;
                }
                l.latest = l.latest.max(s);
                l.last_us = now_us;
            })
            .or_insert(Link {
                base: WindowMin::new(d, now_us),
                latest: s,
                last_us: now_us,
                least_queue: None,
                seq,
            });
        let queue = (d - l.base.get(now_us)).clamp(0, i64::from(u32::MAX)) as u32;
        if l.least_queue.is_none_or(|(_, q)| queue < q) {
            l.least_queue = Some((sent_us, queue));
        }
        // A link silent for a whole window is out of the schedule.
        self.links
            .retain(|_, l| now_us.saturating_sub(l.last_us) < 2 * WINDOW_US);
        self.stats.packets += 1;
        self.hold(now_us, s, item);
    }

    /// Holds a packet sent at `s` (unwrapped) until its time, or lets it
    /// go at once if one sent later went up already.
    fn hold(&mut self, now_us: u64, s: i64, item: T) {
        if self.released.is_some_and(|r| s < r) {
            // A packet sent later went up already: too late to wait.
            self.stats.reordered += 1;
            self.ready.push_back(item);
            return;
        }
        self.n += 1;
        self.held.insert(
            (s, self.n),
            Held {
                arrived_us: now_us,
                item,
            },
        );
    }

    /// Follows `link`'s sequence: a gap before a packet that is new on
    /// it, or a copy that fills one.
    fn sequence(&mut self, now_us: u64, link: u8, s: i64, seq: u8) {
        if seq & SEQ_COPY != 0 {
            // A copy sent again, on whichever link arrived first: it fills
            // the gap of the link it was first sent on, which its number
            // and send time name.
            if let Some(age) = self.fill(now_us, s, seq & !SEQ_COPY) {
                self.stats.resent += 1;
                self.stats.max_resend_us = self.stats.max_resend_us.max(age);
            }
            return;
        }
        let Some(l) = self.links.get(&link) else {
            return; // the first: nothing to compare with (the entry follows)
        };
        if !l.followed_by(s, seq) {
            // Overtaken on its way in by one its link sent later (two
            // CPUs handing the link's packets on), or numbered on another
            // CPU at the same instant: not lost, and the gap it seemed to
            // leave is filled.
            if self.fill(now_us, s, seq).is_some() {
                self.stats.lost -= 1;
                self.stats.overtaken += 1;
            }
            return;
        }
        let last = l.seq;
        if last == 0 {
            return;
        }
        let n = bond_common::wire::seq_missing(last, seq);
        // More than half the sequence: not a loss (the same number twice).
        if n == 0 || n > SEQ_MAX / 2 || self.gaps.len() >= MAX_GAPS {
            return;
        }
        let first = bond_common::wire::seq_next(last);
        let mut missing = Vec::with_capacity(usize::from(n));
        let mut m = first;
        for _ in 0..n {
            missing.push(m);
            m = bond_common::wire::seq_next(m);
        }
        let (after, before) = (l.latest, s);
        let (_, spread) = self.bases(now_us);
        self.stats.lost += u64::from(n);
        self.gaps.push(Gap {
            after,
            before,
            missing,
            seen_us: now_us,
            until_us: now_us + (spread + RESEND_WAIT_US) as u64,
        });
        self.asks.push(bond_proto::control::Gap {
            link,
            after_us: after as u32,
            before_us: before as u32,
            first,
            count: n,
        });
    }

    /// Fills the gap that packet `seq`, sent at `s` (unwrapped), is
    /// missing from, if there is one: a copy's, or its own when it came
    /// late. Returns how long the gap had been open, µs.
    fn fill(&mut self, now_us: u64, s: i64, seq: u8) -> Option<u64> {
        let g = self
            .gaps
            .iter_mut()
            .find(|g| g.after < s && s < g.before && g.missing.contains(&seq))?;
        g.missing.retain(|&m| m != seq);
        Some(now_us.saturating_sub(g.seen_us))
    }

    /// Gaps seen since the last call: what to ask the sender for.
    pub fn take_asks(&mut self) -> Vec<bond_proto::control::Gap> {
        std::mem::take(&mut self.asks)
    }

    /// Counts a packet of flow `flow` (any hash of its addresses, ports
    /// and protocol) that arrived at `now_us`.
    ///
    /// Gaps hold packets only while one flow at most is busy: the
    /// receiving end cannot tell which flow the lost packet was in, so a
    /// gap holds every flow, and with eight flows that stalled seven that
    /// lost nothing (over `lte`, 8 flows up fell from 65.3 to 54.6 Mbit/s).
    /// With more, the copy is still asked for and sent, and goes up as it
    /// comes: TCP has resent the packet by then, and the copy's duplicate
    /// (a DSACK) lets it undo the window cut.
    pub fn note_flow(&mut self, now_us: u64, flow: u64) {
        if now_us.saturating_sub(self.flows_since_us) >= FLOW_WINDOW_US {
            self.busy = self.flows.values().filter(|&&n| n >= BUSY_PACKETS).count();
            self.flows.clear();
            self.flows_since_us = now_us;
        }
        *self.flows.entry(flow).or_default() += 1;
    }

    /// Until when (our µs) a packet sent at `s` waits for copies: the
    /// latest end of the open gaps it could follow.
    fn gap_wait(&self, s: i64) -> Option<u64> {
        if self.busy > 1 {
            return None;
        }
        self.gaps
            .iter()
            .filter(|g| g.after < s)
            .map(|g| g.until_us)
            .max()
    }

    /// When the first packet held may go (our µs), if any is held: at once,
    /// at the end of its spread, or, while a delivering link has not passed
    /// it, in a millisecond (to look again) or at its last moment.
    pub fn next_due(&self, now_us: u64) -> Option<u64> {
        if !self.ready.is_empty() {
            return Some(now_us);
        }
        let (&(s, _), h) = self.held.first_key_value()?;
        let (least, spread) = self.bases(now_us);
        let age = self.age(now_us, s, least);
        if age < spread {
            return Some(now_us + (spread - age) as u64);
        }
        if let Some(until) = self.gap_wait(s) {
            return Some(until.max(now_us));
        }
        let left = Self::wait_left(now_us, h.arrived_us, age, spread);
        if self.passed(now_us, s) || left == 0 {
            return Some(now_us);
        }
        Some(now_us + 1_000.min(left))
    }

    /// How much longer a packet that arrived at `arrived_us`, `age` old
    /// now, may wait for a link to pass it: until [`MAX_WAIT_US`] past
    /// its spread, and at least that long after it arrived. (A packet that
    /// met a long queue on its way arrives old already; without the
    /// second rule it timed out on arrival, before a far link's packets
    /// sent ahead of it came, and went up out of order.)
    fn wait_left(now_us: u64, arrived_us: u64, age: i64, spread: i64) -> u64 {
        let past_spread = (spread + MAX_WAIT_US - age).max(0) as u64;
        let since_arrival = (MAX_WAIT_US as u64).saturating_sub(now_us - arrived_us);
        past_spread.max(since_arrival)
    }

    /// Whether every link in use has delivered something sent at `s` or
    /// after: in use, it delivered lately and carried packets sent shortly
    /// before `s`.
    fn passed(&self, now_us: u64, s: i64) -> bool {
        self.links.values().all(|l| {
            l.latest >= s
                || now_us.saturating_sub(l.last_us) > QUIET_US
                || s - l.latest > QUIET_US as i64
        })
    }

    /// The next packet due at `now_us` (or pushed out by a full playout).
    pub fn pop_due(&mut self, now_us: u64) -> Option<T> {
        if let Some(item) = self.ready.pop_front() {
            return Some(item);
        }
        // Gaps filled or waited on long enough are closed.
        self.gaps
            .retain(|g| !g.missing.is_empty() && now_us < g.until_us);
        let (&(s, _), h) = self.held.first_key_value()?;
        let full = self.held.len() > CAPACITY;
        let (least, spread) = self.bases(now_us);
        self.stats.spread_us = spread;
        let age = self.age(now_us, s, least);
        let gap = self.gap_wait(s).is_some();
        let timed_out = !gap && Self::wait_left(now_us, h.arrived_us, age, spread) == 0;
        if !full && (age < spread || gap || !(timed_out || self.passed(now_us, s))) {
            return None;
        }
        let (_, h) = self.held.pop_first()?;
        self.stats.overflow += u64::from(full);
        self.stats.timed_out += u64::from(timed_out && !self.passed(now_us, s));
        self.stats.max_hold_us = self.stats.max_hold_us.max(now_us - h.arrived_us);
        self.released = Some(self.released.map_or(s, |r| r.max(s)));
        Some(h.item)
    }

    /// What the sender is told ([`crate::feedback`]): per link that
    /// delivered since the last call, the queue its least-waiting packet
    /// met beyond the link's least transit. Jitter only adds to a transit,
    /// so the least of a few packets is the queue itself.
    pub fn feedback(&mut self) -> Vec<LinkQueue> {
        let mut out: Vec<LinkQueue> = self
            .links
            .iter_mut()
            .filter_map(|(&link, l)| {
                let (sent_us, queue_us) = l.least_queue.take()?;
                Some(LinkQueue {
                    link,
                    sent_us,
                    queue_us,
                })
            })
            .collect();
        out.sort_by_key(|l| l.link);
        out.truncate(MAX_FEEDBACK_LINKS);
        out
    }

    /// Everything held, in release order (the playout is stopping).
    pub fn drain(&mut self) -> Vec<T> {
        let mut all: Vec<T> = self.ready.drain(..).collect();
        all.extend(std::mem::take(&mut self.held).into_values().map(|h| h.item));
        all
    }
}

/// A wrapped frame's inner flow: its addresses, protocol and (for a
/// header without options) ports, as one number.
fn flow_of(frame: &[u8]) -> Option<u64> {
    let ip = frame.get(BOND_OFF + BondHdr::LEN..)?;
    let h = ip.get(..20)?;
    let ports = if h[0] == 0x45 {
        ip.get(20..24)
            .map_or(0, |p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
    } else {
        0
    };
    let addrs = u64::from_be_bytes(h[12..20].try_into().ok()?);
    Some(addrs ^ (u64::from(ports) << 8).rotate_left(29) ^ u64::from(h[9]))
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
        Ok(Self {
            fd: crate::net::open_tun(name, crate::net::Frames::Ethernet, true)?,
            name: name.to_string(),
        })
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        nix::unistd::read(self.fd.as_raw_fd(), buf).map_err(std::io::Error::from)
    }

    pub(crate) fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        nix::unistd::write(&self.fd, frame).map_err(std::io::Error::from)
    }

    /// Waits until a frame can be read or `timeout` passes.
    pub(crate) fn wait(&self, timeout: Duration) {
        let mut pfd = [nix::poll::PollFd::new(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = timeout.as_millis().min(u128::from(u16::MAX)) as u16;
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms));
    }
}

/// The floor for a schedule's relative delays (ns): the farthest link a
/// sender can use (within the default horizon; farther ones are left out),
/// µs.
pub fn floor_us(delays_ns: impl IntoIterator<Item = u32>) -> u32 {
    let horizon = bond_common::edpf::DEFAULT_BACKLOG_US * 1000;
    let far = delays_ns.into_iter().filter(|&d| d <= horizon).max();
    far.unwrap_or(0) / 1000
}

/// Creates the hold device `name`, up, with reverse-path filtering
/// `rp_filter` and the IPv4 dummy address (RFC 7600, which routes nowhere):
/// reverse-path filtering refuses everything on a device without an
/// address. With `ipv6`, IPv6 is received there (the device has no IPv6
/// address); without, IPv6 is off on it.
pub async fn hold_device(
    net: &Net,
    name: &str,
    rp_filter: &str,
    ipv6: bool,
) -> Result<(Tap, Iface)> {
    let tap = Tap::create(name)?;
    let dev = net.iface(name).await?;
    sysctl(&format!("net.ipv4.conf.{name}.rp_filter"), rp_filter)?;
    net.add_address(dev.index, std::net::Ipv4Addr::new(192, 0, 0, 8), 32)
        .await?;
    if ipv6 {
        // Members' IPv6 comes back through it too (unwrapped here), but it
        // needs no address of its own: none is made, so it sends nothing
        // (no router solicitations, no duplicate address detection).
        let _ = sysctl(&format!("net.ipv6.conf.{name}.addr_gen_mode"), "1");
    } else {
        // Only IPv4 here: the kernel sends nothing of its own into it.
        let _ = sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1");
    }
    net.set_up(dev.index).await?;
    Ok((tap, dev))
}

/// The senders a playout serves apart: a terminal hears only the server,
/// the server hears every origin of every community.
pub type Sender = (u32, u32);

/// What the playout tells one sender, every [`REPORT_EVERY`]:
/// the queues its links met, and what the other senders of its community
/// carried on each link ([`crate::share`]).
pub type Feedback = (Sender, Vec<LinkQueue>, Vec<LinkShare>);

/// What the playout has for the agent to tell a sender.
#[derive(Debug)]
pub enum Report {
    /// Every [`REPORT_EVERY`].
    Feedback(Feedback),
    /// Packets its links lost, to ask for again at once
    /// ([`Playout::take_asks`]).
    Resend(Sender, Vec<bond_proto::control::Gap>),
}
pub type ReportTx = tokio::sync::mpsc::UnboundedSender<Report>;
pub type ReportRx = tokio::sync::mpsc::UnboundedReceiver<Report>;

/// The running playout: its thread, the floors the agent sets (per
/// community) and its stats (summed over senders).
pub struct Handle {
    floors: Arc<Mutex<HashMap<u32, u32>>>,
    stats: Arc<Mutex<Stats>>,
    /// Communities whose sender started over (`Handle::restart`).
    restarts: std::sync::mpsc::Sender<u32>,
    _worker: Worker,
}

/// What the playout thread works with.
struct Ctx {
    tap: Tap,
    ifindex: u32,
    mac: [u8; 6],
    maps: Maps,
    /// `T_HOLD` or `S_HOLD`.
    map: &'static str,
    reports: ReportTx,
}

impl Handle {
    /// Starts the playout on `tap` (the datapath's XDP program attached to
    /// it already), telling the datapath through hold map `map` that it
    /// reads; what each sender's links met and lost goes to `reports`.
    pub fn start(
        tap: Tap,
        ifindex: u32,
        mac: [u8; 6],
        maps: Maps,
        map: &'static str,
        reports: ReportTx,
    ) -> Result<Self> {
        let floors = Arc::new(Mutex::new(HashMap::new()));
        let stats = Arc::new(Mutex::new(Stats::default()));
        let (f, st) = (floors.clone(), stats.clone());
        let (restarts, restarted) = std::sync::mpsc::channel();
        maps.set_hold(map, alive(ifindex))?;
        let cx = Ctx {
            tap,
            ifindex,
            mac,
            maps,
            map,
            reports,
        };
        let worker = Worker::spawn("playout", move |stop| run(&cx, stop, &f, &st, &restarted))?;
        Ok(Self {
            floors,
            stats,
            restarts,
            _worker: worker,
        })
    }

    /// Community `c`'s packets now come from a new session (a terminal
    /// logged on anew, maybe at another node of a tier): its sender's
    /// sequence numbers and clock start over, so what the playout knew of
    /// them is forgotten (what it holds is delivered). Kept, the new
    /// numbers would read as gaps and every link's first packets would
    /// wait for packets that never come.
    pub fn restart(&self, c: u32) {
        let _ = self.restarts.send(c);
    }

    /// The least spread to hold community `c`'s packets for, µs (its
    /// farthest scheduled link's delay past the nearest's).
    pub fn set_floor(&self, c: u32, us: u32) {
        lock(&self.floors).insert(c, us);
    }

    pub fn stats(&self) -> Stats {
        *lock(&self.stats)
    }
}

/// How often the playout reports to each sender what its links met
/// (`crate::feedback` steers the senders' models with it).
pub const REPORT_EVERY: Duration = Duration::from_millis(20);

/// How long the datapath trusts the playout to be reading after each
/// sign of life; it renews every [`BEAT`].
const ALIVE: Duration = Duration::from_millis(500);
const BEAT: Duration = Duration::from_millis(100);
/// A sender silent this long is forgotten.
const FORGET: Duration = Duration::from_secs(60);

fn alive(ifindex: u32) -> Hold {
    Hold {
        ifindex,
        _pad: 0,
        alive_until_ns: monotonic_ns() + ALIVE.as_nanos() as u64,
    }
}

/// Sums the counters of every sender's playout.
fn total(all: &HashMap<Sender, (Playout<Vec<u8>>, u64)>) -> Stats {
    all.values().fold(Stats::default(), |mut t, (p, _)| {
        let s = p.stats();
        t.packets += s.packets;
        t.reordered += s.reordered;
        t.overflow += s.overflow;
        t.timed_out += s.timed_out;
        t.spread_us = t.spread_us.max(s.spread_us);
        t.max_hold_us = t.max_hold_us.max(s.max_hold_us);
        t.lost += s.lost;
        t.overtaken += s.overtaken;
        t.resent += s.resent;
        t.max_resend_us = t.max_resend_us.max(s.max_resend_us);
        t
    })
}

fn run(
    cx: &Ctx,
    stop: &AtomicBool,
    floors: &Mutex<HashMap<u32, u32>>,
    stats: &Mutex<Stats>,
    restarted: &std::sync::mpsc::Receiver<u32>,
) {
    // Each sender's playout, and when it last sent (our µs).
    let mut all: HashMap<Sender, (Playout<Vec<u8>>, u64)> = HashMap::new();
    let mut arrivals = Arrivals::default();
    let mut buf = vec![0u8; 65_536];
    let mut beat = 0u64;
    let mut report = 0u64;
    let send = |mut frame: Vec<u8>| {
        // Addressed to the TAP, or the stack takes it for another host's.
        frame[..6].copy_from_slice(&cx.mac);
        if let Err(e) = cx.tap.write(&frame) {
            static FAILED: bond_api::LogEvery = bond_api::LogEvery::new();
            if let Some(n) = FAILED.count() {
                tracing::warn!("playout: writing to {}: {e} ({n} so far)", cx.tap.name);
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let now = monotonic_ns();
        let now_us = now / 1000;
        while let Ok(c) = restarted.try_recv() {
            all.retain(|&(community, _), (p, _)| {
                if community == c {
                    p.drain().into_iter().for_each(send);
                }
                community != c
            });
        }
        if now >= beat {
            if let Err(e) = cx.maps.set_hold(cx.map, alive(cx.ifindex)) {
                tracing::warn!("playout: {e}");
            }
            *lock(stats) = total(&all);
            let floors = lock(floors).clone();
            all.retain(|_, (p, last)| {
                !p.is_empty() || now_us.saturating_sub(*last) < FORGET.as_micros() as u64
            });
            for ((c, _), (p, _)) in all.iter_mut() {
                p.set_floor(floors.get(c).copied().unwrap_or(0));
            }
            beat = now + BEAT.as_nanos() as u64;
        }
        if now >= report {
            let every_ms = REPORT_EVERY.as_millis() as u64;
            for (&(c, o), (p, _)) in all.iter_mut() {
                let links = p.feedback();
                if !links.is_empty() {
                    let shared = arrivals.others(c, o, every_ms);
                    let _ = cx.reports.send(Report::Feedback(((c, o), links, shared)));
                }
            }
            arrivals.tick();
            report = now + REPORT_EVERY.as_nanos() as u64;
        }
        let due = all.values().filter_map(|(p, _)| p.next_due(now_us)).min();
        let wait = due.map_or(BEAT, |at| Duration::from_micros(at.saturating_sub(now_us)));
        if !wait.is_zero() {
            cx.tap.wait(wait.min(REPORT_EVERY));
        }
        loop {
            match cx.tap.read(&mut buf) {
                Ok(n) if n >= BOND_OFF + BondHdr::LEN => {
                    let frame = buf[..n].to_vec();
                    match BondHdr::parse(&frame[BOND_OFF..]) {
                        Ok(h) => {
                            let at = monotonic_ns() / 1000;
                            let (p, last) =
                                all.entry((h.community(), h.origin())).or_insert_with(|| {
                                    let mut p = Playout::new();
                                    let floor = lock(floors).get(&h.community()).copied();
                                    p.set_floor(floor.unwrap_or(0));
                                    (p, at)
                                });
                            *last = at;
                            arrivals.add(h.community(), h.link, h.origin(), n);
                            if let Some(f) = flow_of(&frame) {
                                p.note_flow(at, f);
                            }
                            p.push_seq(at, h.link, h.sent_us(), h.seq, frame);
                        }
                        Err(_) => send(frame),
                    }
                }
                Ok(n) => send(buf[..n].to_vec()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("playout: reading {}: {e}", cx.tap.name);
                    break;
                }
            }
        }
        let now_us = monotonic_ns() / 1000;
        for (&sender, (p, _)) in all.iter_mut() {
            let gaps = p.take_asks();
            if !gaps.is_empty() {
                let _ = cx.reports.send(Report::Resend(sender, gaps));
            }
            while let Some(frame) = p.pop_due(now_us) {
                send(frame);
            }
        }
    }
    // Deliver at once from now on, and nothing held is lost.
    let _ = cx.maps.set_hold(cx.map, Hold::default());
    for (p, _) in all.values_mut() {
        for frame in p.drain() {
            send(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    /// Drives a playout: each (arrival ms, link, sent ms) in arrival order;
    /// returns the send times (ms) in release order with their release
    /// times (µs).
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

    /// As [`play`], each arrival with its link's sequence number:
    /// (arrival ms, link, sent ms, seq).
    fn play_seq(p: &mut Playout<u32>, arrivals: &[(u64, u8, u64, u8)]) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        let clock = 5_000_000;
        let mut i = 0;
        let mut now = arrivals[0].0 * MS;
        while i < arrivals.len() || !p.is_empty() {
            while i < arrivals.len() && arrivals[i].0 * MS <= now {
                let (_, link, sent, seq) = arrivals[i];
                p.push_seq(now, link, (clock + sent * MS) as u32, seq, sent as u32);
                i += 1;
            }
            while let Some(sent) = p.pop_due(now) {
                out.push((sent, now));
            }
            now += 100;
        }
        out
    }

    /// Two links, 5 and 15 ms, a packet a ms each way round (link 1 even
    /// ms, link 2 odd), for 200 ms; link 2 loses the one sent at 101 ms.
    /// Its copy, when `copy_ms` is given, comes over link 1 that long
    /// after the gap shows (at 118 ms, when link 2's next arrives).
    fn lossy(copy_ms: Option<u64>) -> Vec<(u64, u8, u64, u8)> {
        let mut a = Vec::new();
        for sent in 0..200u64 {
            let (link, delay) = if sent % 2 == 0 { (1, 5) } else { (2, 15) };
            let seq = (sent / 2 % 127 + 1) as u8;
            if sent != 101 {
                a.push((sent + delay, link, sent, seq));
            }
        }
        if let Some(ms) = copy_ms {
            // Over link 1, flagged a copy, with its number on link 2.
            a.push((118 + ms, 1, 101, 51 | SEQ_COPY));
        }
        a.sort_by_key(|&(at, ..)| at);
        a
    }

    #[test]
    fn a_lost_packet_is_asked_for_and_waited_on() {
        let mut p = Playout::new();
        p.set_floor(10_000);
        let out = play_seq(&mut p, &lossy(Some(40)));
        assert_eq!(out.len(), 200, "everything, the copy included");
        assert!(in_order(&out), "{out:?}");
        let s = p.stats();
        assert_eq!((s.lost, s.resent, s.reordered), (1, 1, 0), "{s:?}");
        assert!((40_000..41_000).contains(&s.max_resend_us), "{s:?}");
        // Asked for once: link 2's number 51, between 99 and 103 ms.
        let asks = p.take_asks();
        let clock = 5_000_000u32;
        assert_eq!(
            asks,
            vec![bond_proto::control::Gap {
                link: 2,
                after_us: clock + 99_000,
                before_us: clock + 103_000,
                first: 51,
                count: 1,
            }]
        );
        // What was sent after the gap waited for the copy; what was sent
        // before it did not.
        let at = |sent: u32| out.iter().find(|o| o.0 == sent).unwrap().1 / MS;
        assert!(at(101) >= 158 && at(102) >= at(101), "{out:?}");
        assert!(at(99) < 118, "{out:?}");
    }

    /// A burst stamps several packets of one link with the same µs: each
    /// is the next in the link's sequence, not a loss.
    #[test]
    fn a_burst_sent_in_one_microsecond_loses_nothing() {
        let mut p = Playout::new();
        let sent = 7_000_000u32;
        for (i, seq) in (1..=6u8).enumerate() {
            let at = u64::from(sent) + 5_000 + i as u64;
            p.push_seq(at, 1, sent + (i as u32 / 3), seq, u32::from(seq));
        }
        let s = p.stats();
        assert_eq!((s.lost, s.overtaken), (0, 0), "{s:?}");
        assert!(p.take_asks().is_empty());
    }

    /// Two CPUs handing one link's packets on may swap two: the later one
    /// opens a gap, the earlier one fills it as it comes.
    #[test]
    fn a_packet_overtaken_on_its_way_in_is_not_lost() {
        let mut p = Playout::new();
        let sent = 7_000_000u32;
        for (i, (s, seq)) in [(0, 1), (10, 2), (30, 4), (20, 3), (40, 5)]
            .into_iter()
            .enumerate()
        {
            let at = u64::from(sent) + 5_000 + i as u64 * 10;
            p.push_seq(at, 1, sent + s, seq, seq);
        }
        let s = p.stats();
        assert_eq!((s.lost, s.overtaken), (0, 1), "{s:?}");
        // The copy asked for before it came fills nothing.
        assert_eq!(p.take_asks().len(), 1);
    }

    #[test]
    fn a_copy_that_never_comes_is_waited_on_for_a_while_only() {
        let mut p = Playout::new();
        p.set_floor(10_000);
        let out = play_seq(&mut p, &lossy(None));
        assert_eq!(out.len(), 199);
        assert!(in_order(&out));
        let s = p.stats();
        assert_eq!((s.lost, s.resent), (1, 0), "{s:?}");
        // Held until the gap's wait ran out: seen at 118 ms, the spread
        // (10 ms) and RESEND_WAIT_US past it.
        let at = |sent: u32| out.iter().find(|o| o.0 == sent).unwrap().1 / MS;
        let until = 118 + 10 + RESEND_WAIT_US as u64 / MS;
        assert!((until..until + 2).contains(&at(102)), "{out:?}");
        // Then the flow goes on at the spread again.
        assert!(at(190) <= 190 + 16, "{out:?}");
    }

    #[test]
    fn gaps_hold_nothing_while_several_flows_are_busy() {
        let mut p = Playout::new();
        p.set_floor(10_000);
        // Two busy flows in the window before the loss.
        for i in 0..2 * BUSY_PACKETS as u64 {
            p.note_flow(i * 1_000, i % 2);
        }
        p.note_flow(FLOW_WINDOW_US, 0);
        let out = play_seq(&mut p, &lossy(Some(40)));
        assert_eq!(out.len(), 200);
        let s = p.stats();
        assert_eq!(
            (s.lost, s.resent),
            (1, 1),
            "asked for and sent all the same"
        );
        // Nothing waited for the copy: it went up as it came, late.
        let at = |sent: u32| out.iter().find(|o| o.0 == sent).unwrap().1 / MS;
        assert!(at(102) < 140, "{out:?}");
        assert_eq!(at(101), 158, "{out:?}");
        assert!(s.reordered >= 1, "{s:?}");
    }

    #[test]
    fn flows_are_told_apart_by_addresses_ports_and_protocol() {
        let frame = |src: u8, sport: u8, proto: u8| {
            let mut f = vec![0u8; BOND_OFF + BondHdr::LEN + 40];
            let ip = BOND_OFF + BondHdr::LEN;
            f[ip] = 0x45;
            f[ip + 9] = proto;
            f[ip + 15] = src;
            f[ip + 21] = sport;
            f
        };
        let a = flow_of(&frame(1, 1, 6)).unwrap();
        assert_eq!(flow_of(&frame(1, 1, 6)), Some(a));
        for other in [frame(2, 1, 6), frame(1, 2, 6), frame(1, 1, 17)] {
            assert_ne!(flow_of(&other), Some(a));
        }
        assert_eq!(flow_of(&[0u8; 30]), None, "too short");
    }

    #[test]
    fn the_same_number_twice_is_no_gap() {
        // Two CPUs gave two packets one number: nothing to ask for.
        let mut p = Playout::new();
        let a = [(5, 1, 0, 7), (6, 1, 1, 7), (7, 1, 2, 8), (8, 1, 3, 10)];
        let out = play_seq(&mut p, &a);
        assert_eq!(out.len(), 4);
        let asks = p.take_asks();
        assert_eq!(asks.len(), 1, "only 9, before 10: {asks:?}");
        assert_eq!((asks[0].first, asks[0].count), (9, 1));
    }

    fn in_order(out: &[(u32, u64)]) -> bool {
        out.windows(2).all(|w| w[0].0 <= w[1].0)
    }

    /// Transit of each packet released, ms.
    fn transits(out: &[(u32, u64)]) -> Vec<u64> {
        out.iter().map(|(s, at)| at / MS - u64::from(*s)).collect()
    }

    #[test]
    fn a_near_link_waits_for_the_far_one_and_order_is_kept() {
        // Link 1 delivers in 5 ms, link 2 in 40 ms; one packet a ms,
        // alternating. Once both links are known every packet goes up
        // 40 to 41 ms after it was sent, in the order sent.
        let mut arrivals: Vec<(u64, u8, u64)> = (0..200u64)
            .map(|s| {
                let (link, delay) = if s % 2 == 0 { (1, 5) } else { (2, 40) };
                (s + delay, link, s)
            })
            .collect();
        arrivals.sort();
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        let steady: Vec<_> = out.iter().copied().filter(|(s, _)| *s >= 50).collect();
        assert!(in_order(&steady), "{steady:?}");
        for t in transits(&steady) {
            assert!((40..=41).contains(&t), "{steady:?}");
        }
        assert_eq!(p.stats().spread_us, 35_000);
    }

    #[test]
    fn the_floor_holds_before_the_far_link_carries_anything() {
        // Only the near link (5 ms) carries traffic so far; the agent
        // knows a second link 35 ms farther.
        let arrivals: Vec<(u64, u8, u64)> = (0..50u64).map(|s| (s + 5, 1, s)).collect();
        let mut p = Playout::new();
        p.set_floor(35_000);
        let out = play(&mut p, &arrivals);
        assert_eq!(transits(&out), [40; 50]);
    }

    #[test]
    fn equal_links_wait_only_for_each_other() {
        // Three links of 3 ms, round robin, a packet a ms: each waits for
        // the other two to pass it, a ms or two.
        let arrivals: Vec<(u64, u8, u64)> =
            (0..100u64).map(|s| (s + 3, (s % 3) as u8, s)).collect();
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        assert_eq!(out.len(), 100);
        assert!(in_order(&out));
        // (The last two wait for the others to fall quiet.)
        let steady = &out[..98];
        assert!(
            transits(steady).iter().all(|t| (3..=5).contains(t)),
            "{out:?}"
        );
    }

    #[test]
    fn jitter_on_a_delivering_link_is_waited_for() {
        // Two links of 10 ms; link 1 now and then 6 ms slower (jitter,
        // which delays the packets behind on that link too: a link keeps
        // its own order). The packets sent after the slow one on link 0
        // wait for it, and nothing comes out of order.
        let mut last = [0u64; 2];
        let mut arrivals: Vec<(u64, u8, u64)> = (0..400u64)
            .map(|s| {
                let link = (s % 2) as usize;
                let slow = s % 50 == 25;
                let at = (s + 10 + if slow { 6 } else { 0 }).max(last[link]);
                last[link] = at;
                (at, link as u8, s)
            })
            .collect();
        arrivals.sort();
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        assert!(in_order(&out), "{out:?}");
        assert_eq!(p.stats().reordered, 0);
        assert_eq!(p.stats().timed_out, 0);
        assert!(transits(&out).iter().any(|&t| t >= 15), "the wait happened");
    }

    #[test]
    fn a_quiet_link_is_not_waited_for_and_a_late_packet_goes_at_once() {
        // Link 2 delivers once, then falls silent: link 1's packets wait
        // only until link 2 counts as quiet. A packet that comes after one
        // sent later went up is released at once, and counted.
        let mut arrivals: Vec<(u64, u8, u64)> = vec![(10, 2, 0)];
        arrivals.extend((1..40u64).map(|s| (s + 10, 1, s)));
        arrivals.push((60, 2, 5));
        let mut p = Playout::new();
        let out = play(&mut p, &arrivals);
        assert_eq!(out.len(), 41);
        let t: Vec<u64> = transits(&out);
        assert!(
            t[..40].iter().all(|&t| t <= 10 + QUIET_US / MS + 1),
            "{out:?}"
        );
        assert_eq!(out.last().map(|o| o.0), Some(5));
        assert_eq!(p.stats().reordered, 1);
    }

    #[test]
    fn nothing_waits_past_the_cap_and_a_full_playout_lets_go() {
        let mut p = Playout::new();
        p.set_floor(1_000_000);
        p.push(0, 1, 0, 0u32);
        assert_eq!(p.next_due(0), Some(MAX_SPREAD_US as u64));
        for i in 1..=CAPACITY as u32 {
            p.push(0, 1, 0, i);
        }
        assert_eq!(p.pop_due(0), Some(0), "the earliest goes when full");
        assert_eq!(p.pop_due(0), None);
        assert_eq!(p.stats().overflow, 1);
        assert_eq!(p.drain().len(), CAPACITY);
    }

    #[test]
    fn a_link_that_never_passes_is_waited_for_at_most_max_wait() {
        // Two links delivering; link 2's packets stop coming but it keeps
        // delivering old ones (a standing queue): link 1's wait is capped.
        let mut p = Playout::new();
        p.push(0, 1, 1_000, 0u32);
        p.push(0, 2, 0, 1);
        let mut now = 0;
        let mut got = None;
        while got.is_none() && now < 200 * MS {
            now += 100;
            if now % (2 * MS) == 0 {
                p.push(now, 2, 0, 9); // link 2 alive, never past 1 ms
            }
            while let Some(x) = p.pop_due(now) {
                if x == 0 {
                    got = Some(now);
                }
            }
        }
        let at = got.expect("released");
        assert!(
            at >= MAX_WAIT_US as u64 && at <= MAX_WAIT_US as u64 + 2 * MS,
            "{at}"
        );
        assert_eq!(p.stats().timed_out, 1);
    }

    #[test]
    fn a_packet_that_met_a_queue_still_waits_for_the_far_link() {
        // Links 1 (5 ms) and 2 (15 ms), both behind a queue that grows to
        // 40 ms: packets arrive up to 30 ms past the 10 ms spread, and
        // link 2's 10 ms after link 1's sent with them. Order is kept.
        // The queue builds from nothing to 40 ms as the sender speeds up.
        let mut arrivals = Vec::new();
        for sent in 0..150u64 {
            let queue = (sent / 2).min(40);
            arrivals.push((sent + 5 + queue, 1, sent));
            arrivals.push((sent + 15 + queue, 2, sent));
        }
        arrivals.sort();
        let mut p = Playout::new();
        p.set_floor(10_000);
        let out = play(&mut p, &arrivals);
        assert_eq!(out.len(), 300);
        assert!(in_order(&out), "{out:?}");
        assert_eq!(p.stats().timed_out, 0);
        assert_eq!(p.stats().reordered, 0);
    }

    #[test]
    fn the_floor_is_the_farthest_link_a_sender_can_use() {
        assert_eq!(floor_us([0, 15_000_000, 35_000_000]), 35_000);
        assert_eq!(
            floor_us([0, 10_000_000, 290_000_000]),
            10_000,
            "satellite left out"
        );
        assert_eq!(floor_us([]), 0);
    }

    #[test]
    fn a_restarted_sender_clock_is_learnt_afresh() {
        let mut p = Playout::new();
        p.push(0, 1, 1_000_000, 0u32);
        p.push(10 * MS, 2, 1_000_000 + 10 * MS as u32 - 30_000, 1);
        assert_eq!(p.bases(10 * MS).1, 30_000);
        // Rebooted: the clock reads something else entirely. What was held
        // goes at once; one link is known again, nothing to wait for.
        p.push(20 * MS, 1, 4_000_000_000, 2);
        assert_eq!(p.bases(20 * MS).1, 0);
        let out: Vec<u32> = std::iter::from_fn(|| p.pop_due(20 * MS)).collect();
        assert_eq!(out, [1, 0, 2], "held ones in the order sent, first");
    }
}
