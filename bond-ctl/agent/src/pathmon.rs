//! Watching each WAN link from its two ends: round-trip time and darkness.
//!
//! The owner of a link sends the server a small signed ECHO over it every
//! [`ECHO_INTERVAL`]; the server answers over the same link. From that:
//!
//! - The owner learns the link's round trip; the least over the last
//!   [`RTT_WINDOW`] is its base (queues filled by traffic only add to it).
//!   Owners announce it, and every sender takes half the difference to the
//!   least base among the links it uses as a link's relative one-way delay
//!   (`bond_common::edpf`). Halving assumes a link's delay is about the
//!   same both ways, as it is for DSL, cable, LTE and satellite alike.
//! - A link that carried echoes and brings back nothing for its base round
//!   trip plus [`DARK_SLACK`] is dark (a black hole with carrier up): the
//!   owner leaves it out of its own schedule and announces it dark to the
//!   LAN at once. A link that has carried echoes for
//!   [`FIRST_REPLY_WITHIN`] and never answered one is dark too (black
//!   from the start, or the server went away before it answered). The
//!   server, missing the link's echoes for
//!   [`SERVER_DARK_AFTER`], leaves it out of the downstream schedule. Both
//!   take it back at the first echo through.
//!
//! Data the datapath counts coming in over a link is as good a sign that it
//! delivers as an echo ([`LinkEcho::traffic`], [`EchoSeen::look`]): it
//! keeps a link in use while the far end's agent restarts and no echo is
//! answered, as long as traffic flows. Only an echo brings a dark link
//! back (data may still trickle in over a link the far end has not given
//! up on yet). The server reads a link's count only once its echoes are
//! late ([`Echoes`]): its check costs the links that fell silent, not the
//! tens of thousands a node holds.
//!
//! The rules are pure and unit-tested here; the agents feed them.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use crate::deadlines::Deadlines;

/// How often a link's owner sends an echo over it.
pub const ECHO_INTERVAL: Duration = Duration::from_millis(50);
/// Round trips older than this no longer count for a link's base.
pub const RTT_WINDOW: Duration = Duration::from_secs(30);
/// Beyond its base round trip, how long a link may be silent before its
/// owner calls it dark: two full buffers of queueing (an echo waits behind
/// data both ways, `edpf::DEFAULT_BACKLOG_US` each) and two echo intervals.
pub const DARK_SLACK: Duration = Duration::from_millis(200);
/// How long a link that has never answered may carry echoes before its
/// owner calls it dark: a geostationary satellite's round trip (about
/// 600 ms) behind a full buffer each way, and as much again in hand.
pub const FIRST_REPLY_WITHIN: Duration = Duration::from_secs(2);
/// How long the server waits for a link's next echo before calling it
/// dark: an interval, a full buffer's queueing (the echo waits behind
/// upstream data) and as much again in hand.
pub const SERVER_DARK_AFTER: Duration = Duration::from_millis(200);

/// One link as its owner sees it through echoes.
#[derive(Clone, Debug, Default)]
pub struct LinkEcho {
    /// (when, round trip) of recent replies, oldest first.
    samples: VecDeque<(Instant, Duration)>,
    /// The last reply, or data through: the link delivered then.
    last_reply: Option<Instant>,
    /// The first echo sent over the link.
    first_sent: Option<Instant>,
    dark: bool,
    /// The datapath's count of packets in over the link, as last seen.
    received: u64,
}

impl LinkEcho {
    /// A reply arrived at `now` for an echo that took `rtt`. True if the
    /// link was dark and is back.
    pub fn reply(&mut self, now: Instant, rtt: Duration) -> bool {
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RTT_WINDOW)
        {
            self.samples.pop_front();
        }
        // Keep the window small: a sample no smaller than the newest one
        // can never be the least again.
        while self.samples.back().is_some_and(|(_, r)| *r >= rtt) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, rtt));
        self.last_reply = Some(now);
        std::mem::replace(&mut self.dark, false)
    }

    /// An echo went out over the link at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.first_sent.get_or_insert(now);
    }

    /// The datapath has counted `received` packets in over the link by
    /// `now`: more than last time is a sign of life, as a reply is (but it
    /// brings no dark link back).
    pub fn traffic(&mut self, now: Instant, received: u64) {
        if received > self.received && self.last_reply.is_some() {
            self.last_reply = Some(now);
        }
        self.received = received;
    }

    /// The least round trip of the window.
    pub fn base_rtt(&self) -> Option<Duration> {
        self.samples.front().map(|(_, r)| *r)
    }

    /// Whether the link is dark at `now`; true the moment it turns dark.
    pub fn check(&mut self, now: Instant) -> bool {
        let silent_too_long = match (self.last_reply, self.base_rtt()) {
            (Some(last), Some(base)) => now.duration_since(last) > base + DARK_SLACK,
            _ => self
                .first_sent
                .is_some_and(|first| now.duration_since(first) > FIRST_REPLY_WITHIN),
        };
        if self.dark || !silent_too_long {
            return false;
        }
        self.dark = true;
        true
    }

    pub fn is_dark(&self) -> bool {
        self.dark
    }

    /// The base round trip as announced, µs: rounded up to a whole
    /// millisecond (0: not measured), so that a base creeping by a few µs
    /// neither re-announces nor rewrites schedules.
    pub fn announced_us(&self) -> u32 {
        self.base_rtt()
            .map_or(0, |r| (r.as_micros() as u32).div_ceil(1000) * 1000)
    }
}

/// A link as the server sees its owner's echoes.
#[derive(Clone, Copy, Debug)]
pub struct EchoSeen {
    /// The last echo, or data through: the link delivered then.
    pub last: Instant,
    pub dark: bool,
    /// The datapath's count of packets in over the link when the server
    /// last read it, and when.
    read: Option<(Instant, u64)>,
    /// Silence means nothing until then: the owner's agent restarts.
    grace_until: Option<Instant>,
}

/// How long the server waits for the echoes of a terminal whose agent
/// said it is restarting ([`bond_proto::control::flags::RESTARTING`]): a new agent
/// is up and echoing well within it.
pub const RESTART_GRACE: Duration = Duration::from_secs(5);

impl EchoSeen {
    pub fn new(now: Instant) -> Self {
        Self {
            last: now,
            dark: false,
            read: None,
            grace_until: None,
        }
    }

    /// The owner's agent is restarting at `now`: its echoes stop for a
    /// while, its link does not.
    pub fn restarting(&mut self, now: Instant) {
        self.grace_until = Some(now + RESTART_GRACE);
    }

    /// An echo arrived: true if the link was dark and is back.
    pub fn seen(&mut self, now: Instant) -> bool {
        self.last = now;
        self.grace_until = None;
        std::mem::replace(&mut self.dark, false)
    }

    /// Since when the link counts as silent: its last sign of life, or the
    /// end of its owner's restart grace.
    fn quiet_from(&self) -> Instant {
        self.grace_until.map_or(self.last, |g| g.max(self.last))
    }

    /// When the server next reads the link's count of packets in
    /// ([`EchoSeen::look`]): half-way through the silence allowed, for a
    /// reading to compare with, then at its end. None while dark: only an
    /// echo brings it back. A link whose echoes come is never read.
    pub fn due(&self) -> Option<Instant> {
        if self.dark {
            return None;
        }
        let from = self.quiet_from();
        let half = from + SERVER_DARK_AFTER / 2;
        Some(match self.read {
            Some((at, _)) if at >= half => from + SERVER_DARK_AFTER,
            _ => half,
        })
    }

    /// The server read the datapath's count of packets in over the link
    /// (`received`; None: it has none) at `now`. More than at a reading
    /// taken since the last sign of life is one too, as an echo is (but it
    /// brings no dark link back). True the moment the link turns dark.
    pub fn look(&mut self, now: Instant, received: Option<u64>) -> bool {
        let before = self.read.filter(|&(at, _)| at >= self.quiet_from());
        if let (Some((_, before)), Some(n)) = (before, received)
            && n > before
            && !self.dark
        {
            self.last = now;
        }
        let count = received.or(self.read.map(|(_, n)| n)).unwrap_or(0);
        self.read = Some((now, count));
        self.check(now)
    }

    /// True the moment the link turns dark: silent for
    /// [`SERVER_DARK_AFTER`] (from the end of a grace).
    pub fn check(&mut self, now: Instant) -> bool {
        if let Some(until) = self.grace_until {
            if now < until {
                return false;
            }
            // The new agent never echoed: silence counts from the end of
            // the grace.
            self.grace_until = None;
            self.last = self.last.max(until);
        }
        if self.dark || now.duration_since(self.last) < SERVER_DARK_AFTER {
            return false;
        }
        self.dark = true;
        true
    }
}

/// The server's view of every link whose owner echoes, with each one's
/// next look in time order: the dark check reads the counters of links
/// whose echoes are late, not of every link it holds.
#[derive(Debug, Default)]
pub struct Echoes {
    links: HashMap<(u32, u8), EchoSeen>,
    due: Deadlines<(u32, u8)>,
}

impl Echoes {
    /// An echo over `link` of community `c`: true if it was dark and is
    /// back.
    pub fn seen(&mut self, key: (u32, u8), now: Instant) -> bool {
        self.update(key, now, |e| e.seen(now))
    }

    /// The link's owner is restarting its agent.
    pub fn restarting(&mut self, key: (u32, u8), now: Instant) {
        self.update(key, now, |e| e.restarting(now))
    }

    pub fn is_dark(&self, key: &(u32, u8)) -> bool {
        self.links.get(key).is_some_and(|e| e.dark)
    }

    /// The link left its community.
    pub fn remove(&mut self, key: (u32, u8)) {
        self.links.remove(&key);
        self.due.set(key, None);
    }

    /// Links due a look by `now`.
    pub fn due(&mut self, now: Instant) -> Vec<(u32, u8)> {
        self.due.due(now)
    }

    /// A due link not looked at (its counters could not be read): due
    /// again at once.
    pub fn requeue(&mut self, key: (u32, u8)) {
        if let Some(e) = self.links.get(&key) {
            self.due.set(key, e.due());
        }
    }

    /// Looks at a due link ([`EchoSeen::look`]): true the moment it
    /// turns dark.
    pub fn look(&mut self, key: (u32, u8), now: Instant, received: Option<u64>) -> bool {
        match self.links.contains_key(&key) {
            true => self.update(key, now, |e| e.look(now, received)),
            false => false,
        }
    }

    fn update<R>(&mut self, key: (u32, u8), now: Instant, f: impl FnOnce(&mut EchoSeen) -> R) -> R {
        let e = self.links.entry(key).or_insert_with(|| EchoSeen::new(now));
        let r = f(e);
        self.due.set(key, e.due());
        r
    }
}

/// Relative one-way delays (ns) for links with base round trips in µs:
/// half of each one's excess over the least. A link not measured yet (0)
/// is [`UNMEASURED`], beyond every sender's horizon, while any other link
/// is measured: until its first echo comes back it may be a satellite
/// (counted as near, one took a first download's packets 290 ms late and
/// the flow collapsed). With none measured (a community forming) all
/// count as equal.
pub fn relative_delays(rtt_us: &[u32]) -> Vec<u32> {
    let Some(least) = rtt_us.iter().copied().filter(|&r| r > 0).min() else {
        return vec![0; rtt_us.len()];
    };
    rtt_us
        .iter()
        .map(|&r| match r {
            0 => UNMEASURED,
            r => (r - least).saturating_mul(1000) / 2,
        })
        .collect()
}

/// The relative delay of a link not measured yet: out of every schedule.
pub const UNMEASURED: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_base_is_the_least_round_trip_of_the_window() {
        let t0 = Instant::now();
        let mut e = LinkEcho::default();
        assert_eq!(e.base_rtt(), None);
        e.reply(t0, 30 * MS);
        e.reply(t0 + MS, 20 * MS);
        e.reply(t0 + 2 * MS, 80 * MS); // queued behind a download
        assert_eq!(e.base_rtt(), Some(20 * MS));
        // The quiet sample ages out; the loaded ones remain.
        e.reply(t0 + RTT_WINDOW + 5 * MS, 60 * MS);
        assert_eq!(e.base_rtt(), Some(60 * MS));
        assert!(e.samples.len() <= 2, "the window keeps only candidates");
    }

    #[test]
    fn silence_past_base_plus_slack_is_dark_and_a_reply_heals() {
        let t0 = Instant::now();
        let mut e = LinkEcho::default();
        assert!(
            !e.check(t0 + Duration::from_secs(9)),
            "never asked: not dark"
        );
        e.sent(t0 - MS);
        e.reply(t0, 20 * MS);
        assert!(!e.check(t0 + 20 * MS + DARK_SLACK), "within base + slack");
        assert!(e.check(t0 + 21 * MS + DARK_SLACK), "dark just past it");
        assert!(e.is_dark());
        assert!(!e.check(t0 + Duration::from_secs(1)), "turns dark once");
        assert!(e.reply(t0 + Duration::from_secs(2), 20 * MS), "healed");
        assert!(!e.is_dark());
    }

    /// Echoes go out and none ever comes back (the link is black from
    /// the start, or the server left before it answered): dark once the
    /// first echo is `FIRST_REPLY_WITHIN` old, and a reply heals it.
    #[test]
    fn a_link_that_never_answers_is_dark_after_a_while() {
        let t0 = Instant::now();
        let mut e = LinkEcho::default();
        e.sent(t0);
        for i in 1..=40 {
            e.sent(t0 + 50 * MS * i);
            e.traffic(t0 + 50 * MS * i, u64::from(i)); // no reply: no sign
        }
        assert!(!e.check(t0 + FIRST_REPLY_WITHIN), "still within");
        assert!(e.check(t0 + FIRST_REPLY_WITHIN + MS), "dark past it");
        assert!(!e.check(t0 + 2 * FIRST_REPLY_WITHIN), "turns dark once");
        assert_eq!(e.announced_us(), 0, "nothing measured");
        assert!(e.reply(t0 + 3 * FIRST_REPLY_WITHIN, 600 * MS), "healed");
        assert!(!e.check(t0 + 3 * FIRST_REPLY_WITHIN + 700 * MS));
    }

    #[test]
    fn the_server_calls_a_silent_link_dark_once_and_takes_it_back() {
        let t0 = Instant::now();
        let mut s = EchoSeen::new(t0);
        assert!(!s.check(t0 + SERVER_DARK_AFTER - MS));
        assert!(s.check(t0 + SERVER_DARK_AFTER));
        assert!(!s.check(t0 + 2 * SERVER_DARK_AFTER));
        assert!(s.seen(t0 + Duration::from_secs(3)));
        assert!(!s.seen(t0 + Duration::from_secs(3)));
    }

    /// The far end's agent restarts: no echo for longer than the slack,
    /// but data keeps coming in over the link, which stays in use. Once
    /// the data stops too, the link goes dark; data alone does not bring
    /// it back, an echo does.
    #[test]
    fn data_coming_in_keeps_a_link_from_going_dark() {
        let t0 = Instant::now();
        let mut e = LinkEcho::default();
        e.reply(t0, 20 * MS);
        e.traffic(t0, 100);
        for (i, at) in (1..=20).map(|i| (i, t0 + 50 * MS * i)) {
            e.traffic(at, 100 + u64::from(i));
            assert!(!e.check(at), "{i}: data flows");
        }
        let quiet = t0 + 50 * MS * 20;
        e.traffic(quiet + 100 * MS, 120);
        assert!(e.check(quiet + 21 * MS + DARK_SLACK), "no data, no echo");
        e.traffic(quiet + Duration::from_secs(1), 130);
        assert!(e.is_dark(), "data alone does not heal");
        assert!(
            e.reply(quiet + Duration::from_secs(2), 20 * MS),
            "an echo does"
        );
    }

    /// The server's side of the same, through its queue of looks, with a
    /// timer firing every millisecond: while echoes come it never reads
    /// the link's count; once they stop it reads it every half of the
    /// silence allowed, data through keeps the link, and when the data
    /// stops too the link is dark within the silence and a half. Data
    /// alone does not bring it back, an echo does.
    #[test]
    fn the_server_reads_a_link_only_while_its_echoes_are_late() {
        let t0 = Instant::now();
        let key = (70_007, 3);
        let mut w = Echoes::default();
        let mut looks = Vec::new();
        let mut dark = Vec::new();
        // A packet in every ms until `stop`.
        let stop = t0 + 1600 * MS;
        let count = |at: Instant| 1000 + at.min(stop).duration_since(t0).as_millis() as u64;
        let last_echo = t0 + Duration::from_secs(1);
        for ms in 0..=3000 {
            let at = t0 + MS * ms;
            for k in w.due(at) {
                looks.push(at);
                if w.look(k, at, Some(count(at))) {
                    dark.push(at);
                }
            }
            if ms % 50 == 0 && at <= last_echo {
                w.seen(key, at);
            }
        }
        assert!(
            looks.iter().all(|&at| at > last_echo),
            "read while its echoes came: {looks:?}"
        );
        assert!(
            looks
                .windows(2)
                .all(|p| p[1] - p[0] >= SERVER_DARK_AFTER / 2),
            "read more often than each half of the silence: {looks:?}"
        );
        assert_eq!(dark.len(), 1, "dark once: {dark:?}");
        let after = dark[0] - stop;
        assert!(
            after >= SERVER_DARK_AFTER && after <= SERVER_DARK_AFTER * 3 / 2,
            "dark {after:?} after the data stopped"
        );
        assert_eq!(
            *looks.last().unwrap(),
            dark[0],
            "a dark link is not read again"
        );
        assert!(w.is_dark(&key), "data alone does not heal");
        let at = t0 + Duration::from_secs(4);
        assert!(w.seen(key, at), "an echo does");
        assert!(!w.is_dark(&key));
        assert_eq!(
            w.due(at + SERVER_DARK_AFTER / 2),
            vec![key],
            "watched again"
        );
        // Due, but its counters could not be read: due again at once.
        let due = w.due(at + SERVER_DARK_AFTER / 2);
        assert!(due.is_empty(), "taken out: {due:?}");
        w.requeue(key);
        assert_eq!(
            w.due(at + SERVER_DARK_AFTER / 2),
            vec![key],
            "looked at again"
        );
        // Gone with its community: never due again.
        w.remove(key);
        assert!(w.due(at + Duration::from_secs(10)).is_empty());
    }

    /// Echoes stop and nothing comes in: dark when the silence allowed is
    /// over, after one reading half-way through it.
    #[test]
    fn the_server_calls_a_link_with_no_echo_and_no_data_dark_on_time() {
        let t0 = Instant::now();
        let key = (1, 1);
        let mut w = Echoes::default();
        w.seen(key, t0);
        let mut looks = Vec::new();
        for ms in 1..=1000 {
            let at = t0 + MS * ms;
            for k in w.due(at) {
                looks.push((at - t0, w.look(k, at, Some(5))));
            }
        }
        assert_eq!(
            looks,
            vec![(SERVER_DARK_AFTER / 2, false), (SERVER_DARK_AFTER, true)]
        );
    }

    /// The owner's agent says it restarts: its echoes may stop for up to
    /// the grace, and then only the usual silence makes the link dark. An
    /// echo ends the grace.
    #[test]
    fn a_restarting_owner_gets_its_grace() {
        let t0 = Instant::now();
        let mut s = EchoSeen::new(t0);
        s.restarting(t0);
        assert!(!s.check(t0 + RESTART_GRACE - MS), "within the grace");
        assert!(!s.check(t0 + RESTART_GRACE + SERVER_DARK_AFTER - MS));
        assert!(s.check(t0 + RESTART_GRACE + SERVER_DARK_AFTER));
        let mut s = EchoSeen::new(t0);
        s.restarting(t0);
        s.seen(t0 + 300 * MS);
        assert!(
            s.check(t0 + 300 * MS + SERVER_DARK_AFTER),
            "the new agent echoed: back to the usual rule"
        );
        // Through the queue: the first look comes half a silence after
        // the grace.
        let mut w = Echoes::default();
        w.restarting((1, 1), t0);
        assert!(w.due(t0 + RESTART_GRACE).is_empty());
        assert_eq!(
            w.due(t0 + RESTART_GRACE + SERVER_DARK_AFTER / 2),
            vec![(1, 1)]
        );
    }

    #[test]
    fn delays_are_half_the_excess_over_the_least_round_trip() {
        // mixed: one-way 5, 20, 40 ms.
        assert_eq!(
            relative_delays(&[10_000, 40_000, 80_000]),
            vec![0, 15_000_000, 35_000_000]
        );
        // Unmeasured links are out while any is measured; all in, equal,
        // while none is.
        assert_eq!(
            relative_delays(&[0, 40_000, 30_000]),
            vec![UNMEASURED, 5_000_000, 0]
        );
        assert_eq!(relative_delays(&[0, 0]), vec![0, 0]);
        assert_eq!(relative_delays(&[]), Vec::<u32>::new());
    }
}
