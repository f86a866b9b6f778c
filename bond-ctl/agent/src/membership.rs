//! Who is alive, and which links may carry traffic: the terminal's peer
//! table (the seed's Table 1) and the server's per-community terminal
//! tables. Pure logic over explicit instants, so it is tested without
//! clocks or sockets; the agent feeds it messages and applies what changed
//! to the maps.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use bond_proto::{
    control::LinkAd,
    session::{EXCHANGE_LEN, SessionKey},
};

use crate::deadlines::Deadlines;

pub use bond_config::DEFAULT_MISSES;

/// When a sender was last heard from, and how often it promised to speak.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub last: Instant,
    pub interval: Duration,
}

impl Liveness {
    pub fn new(now: Instant, interval: Duration) -> Self {
        Self {
            last: now,
            interval: interval.max(Duration::from_millis(1)),
        }
    }

    /// Whole announce intervals gone by without a word.
    pub fn missed(&self, now: Instant) -> u32 {
        let quiet = now.saturating_duration_since(self.last);
        (quiet.as_nanos() / self.interval.as_nanos()).min(u128::from(u32::MAX)) as u32
    }

    /// The instant the `k`-th announce in a row is missed.
    pub fn deadline(&self, k: u32) -> Instant {
        self.last + self.interval * k
    }
}

// ------------------------------------------------------------- terminal --

#[derive(Clone, Debug)]
pub struct Peer {
    pub links: Vec<LinkAd>,
    pub live: Liveness,
}

/// One row of the peer table: a link of a live peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRow {
    pub address: Ipv4Addr,
    pub link: u8,
    pub port: u16,
    pub missed: u32,
    pub up: u32,
    pub down: u32,
}

/// A terminal's view of its LAN peers.
#[derive(Debug)]
pub struct PeerTable {
    k: u32,
    peers: BTreeMap<Ipv4Addr, Peer>,
}

impl PeerTable {
    pub fn new(k: u32) -> Self {
        Self {
            k: k.max(1),
            peers: BTreeMap::new(),
        }
    }

    /// Announces a peer may miss from now on.
    pub fn set_misses(&mut self, k: u32) {
        self.k = k.max(1);
    }

    /// An ACTIVE announce; true if the usable links changed (a new peer,
    /// or links or weights that differ from before).
    pub fn announce(
        &mut self,
        ip: Ipv4Addr,
        interval: Duration,
        links: &[LinkAd],
        now: Instant,
    ) -> bool {
        let live = Liveness::new(now, interval);
        match self.peers.get_mut(&ip) {
            Some(p) => {
                p.live = live;
                if p.links == links {
                    return false;
                }
                p.links = links.to_vec();
                true
            }
            None => {
                self.peers.insert(
                    ip,
                    Peer {
                        links: links.to_vec(),
                        live,
                    },
                );
                true
            }
        }
    }

    /// Traffic from a peer: a sign of life as good as an announce.
    pub fn heard(&mut self, ip: Ipv4Addr, now: Instant) {
        if let Some(p) = self.peers.get_mut(&ip) {
            p.live.last = p.live.last.max(now);
        }
    }

    /// A SHUTDOWN: gone at once. True if it was known.
    pub fn shutdown(&mut self, ip: Ipv4Addr) -> bool {
        self.peers.remove(&ip).is_some()
    }

    /// Drops peers that missed `k` announces; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Ipv4Addr> {
        let k = self.k;
        let gone: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.live.missed(now) >= k)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &gone {
            self.peers.remove(ip);
        }
        gone
    }

    /// When the next peer runs out of announces, if any is known.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers.values().map(|p| p.live.deadline(self.k)).min()
    }

    pub fn peers(&self) -> impl Iterator<Item = (Ipv4Addr, &Peer)> {
        self.peers.iter().map(|(ip, p)| (*ip, p))
    }

    /// The owner of a link id, if a live peer announced it.
    pub fn owner(&self, link: u8) -> Option<Ipv4Addr> {
        self.peers
            .iter()
            .find(|(_, p)| p.links.iter().any(|l| l.id == link))
            .map(|(ip, _)| *ip)
    }

    pub fn rows(&self, now: Instant) -> Vec<PeerRow> {
        let mut rows = Vec::new();
        for (ip, p) in &self.peers {
            let missed = p.live.missed(now);
            if p.links.is_empty() {
                rows.push(PeerRow {
                    address: *ip,
                    link: 0,
                    port: 0,
                    missed,
                    up: 0,
                    down: 0,
                });
            }
            for l in &p.links {
                rows.push(PeerRow {
                    address: *ip,
                    link: l.id,
                    port: l.port,
                    missed,
                    up: l.up,
                    down: l.down,
                });
            }
        }
        rows
    }
}

// --------------------------------------------------------------- server --

/// A community link the server may send on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLinkRow {
    pub community: u32,
    pub link: u8,
    pub owner: Ipv4Addr,
    /// Where the link's announces came from: its public address (IPv4, or
    /// IPv6 for a link over IPv6) and port.
    pub addr: SocketAddr,
    pub down: u32,
    pub missed: u32,
    /// The MTU the owner announced for it (0: not said).
    pub mtu: u16,
    /// Its base round trip as the owner announced it (µs, 0: not yet).
    pub rtt_us: u32,
    /// Its owner announced it dark.
    pub dark: bool,
}

#[derive(Clone, Debug)]
struct Term {
    token: u64,
    /// The session's key, when its login made one (`bond_proto::session`).
    key: Option<Keyed>,
    live: Liveness,
    links: BTreeMap<u8, (LinkAd, SocketAddr, Liveness)>,
}

/// A session's key, and the exchange keys it was made of: a LOGIN sent
/// again with the same terminal key gets the same answer and key.
#[derive(Clone, Debug)]
pub struct Keyed {
    pub terminal: [u8; EXCHANGE_LEN],
    pub server: [u8; EXCHANGE_LEN],
    pub key: SessionKey,
    /// The key it replaced at this login: what the terminal sent with it
    /// while logging on again is dropped, not answered.
    pub previous: Option<SessionKey>,
}

/// Why the server refused an announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No session, or another token: the terminal must log on (again).
    NeedLogin,
    /// The link id belongs to another live terminal of the community.
    LinkTaken { owner: Ipv4Addr },
    /// Sent over a link the announce does not list.
    UnknownLink,
}

/// What changed, per community, for the agent to write to the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub communities: Vec<u32>,
    pub sessions_gone: Vec<(u32, Ipv4Addr)>,
}

impl Changes {
    fn touch(&mut self, c: u32) {
        if !self.communities.contains(&c) {
            self.communities.push(c);
        }
    }
}

/// The server's terminals, per community: sessions and live links.
#[derive(Debug)]
pub struct ServerTable {
    k: u32,
    terms: BTreeMap<(u32, Ipv4Addr), Term>,
    /// Who holds each (community, link id): an announce must not scan
    /// every terminal (10,000 of them at 10 announces a second).
    owners: HashMap<(u32, u8), Ipv4Addr>,
    /// When each terminal, or one of its links, next misses its `k`-th
    /// announce: `expire` looks at those alone.
    due: Deadlines<(u32, Ipv4Addr)>,
}

impl ServerTable {
    pub fn new(k: u32) -> Self {
        Self {
            k: k.max(1),
            terms: BTreeMap::new(),
            owners: HashMap::new(),
            due: Deadlines::default(),
        }
    }

    /// Announces a terminal or link may miss from now on.
    pub fn set_misses(&mut self, k: u32) {
        self.k = k.max(1);
        let keys: Vec<_> = self.terms.keys().copied().collect();
        for key in keys {
            self.schedule(key);
        }
    }

    /// Puts a terminal's next deadline in the queue: the soonest of its
    /// own and its links'.
    fn schedule(&mut self, key: (u32, Ipv4Addr)) {
        let k = self.k;
        let when = self.terms.get(&key).map(|t| {
            t.links
                .values()
                .map(|(_, _, live)| live.deadline(k))
                .fold(t.live.deadline(k), Instant::min)
        });
        self.due.set(key, when);
    }

    /// A LOGIN: the session's token (a live session keeps its token, so
    /// flows survive a terminal's agent restart). `fresh` makes one;
    /// `interval` is how long to wait for announces until the first one
    /// says how often they come.
    pub fn login(
        &mut self,
        community: u32,
        origin: Ipv4Addr,
        interval: Duration,
        now: Instant,
        fresh: impl FnOnce() -> u64,
    ) -> (u64, bool) {
        let key = (community, origin);
        let made = match self.terms.get_mut(&key) {
            Some(t) => {
                t.live.last = now;
                (t.token, false)
            }
            None => {
                let token = fresh();
                let term = Term {
                    token,
                    key: None,
                    live: Liveness::new(now, interval),
                    links: BTreeMap::new(),
                };
                self.terms.insert(key, term);
                (token, true)
            }
        };
        self.schedule(key);
        made
    }

    /// An ACTIVE announce carrying `token`, sent over link `via` from
    /// `src` (or relayed by a peer: `via` None). Returns whether the
    /// community's links changed.
    #[allow(clippy::too_many_arguments)]
    pub fn announce(
        &mut self,
        community: u32,
        origin: Ipv4Addr,
        token: u64,
        via: Option<(u8, SocketAddr)>,
        interval: Duration,
        links: &[LinkAd],
        now: Instant,
    ) -> Result<bool, Refusal> {
        let r = self.take_announce(community, origin, token, via, interval, links, now);
        // Refused after its session was found (a link it does not list),
        // it still spoke: its deadline moved.
        self.schedule((community, origin));
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn take_announce(
        &mut self,
        community: u32,
        origin: Ipv4Addr,
        token: u64,
        via: Option<(u8, SocketAddr)>,
        interval: Duration,
        links: &[LinkAd],
        now: Instant,
    ) -> Result<bool, Refusal> {
        if let Some((id, _)) = via
            && let Some(&owner) = self.owners.get(&(community, id))
            && owner != origin
        {
            return Err(Refusal::LinkTaken { owner });
        }
        let t = self
            .terms
            .get_mut(&(community, origin))
            .filter(|t| t.token == token)
            .ok_or(Refusal::NeedLogin)?;
        t.live = Liveness::new(now, interval);
        let mut changed = false;
        // Links no longer announced go; weights follow the announce.
        let owners = &mut self.owners;
        t.links.retain(|id, _| {
            let keep = links.iter().any(|l| l.id == *id);
            if !keep {
                owners.remove(&(community, *id));
                changed = true;
            }
            keep
        });
        for (ad, _, _) in t.links.values_mut() {
            if let Some(new) = links.iter().find(|l| l.id == ad.id)
                && new != ad
            {
                changed |= new.down != ad.down || new.rtt_us != ad.rtt_us || new.dark != ad.dark;
                *ad = *new;
            }
        }
        if let Some((id, src)) = via {
            let ad = *links
                .iter()
                .find(|l| l.id == id)
                .ok_or(Refusal::UnknownLink)?;
            let live = Liveness::new(now, interval);
            match t.links.get_mut(&id) {
                Some(entry) => {
                    changed |= entry.1 != src;
                    *entry = (ad, src, live);
                }
                None => {
                    t.links.insert(id, (ad, src, live));
                    self.owners.insert((community, id), origin);
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    /// A terminal found in the maps when an agent restarts: its session
    /// and links, alive as of `now` and taken as announcing every
    /// `interval` until its next announce says otherwise.
    pub fn adopt(
        &mut self,
        community: u32,
        origin: Ipv4Addr,
        token: u64,
        links: &[(LinkAd, SocketAddr)],
        interval: Duration,
        now: Instant,
    ) {
        let live = Liveness::new(now, interval);
        let t = self.terms.entry((community, origin)).or_insert(Term {
            token,
            key: None,
            live,
            links: BTreeMap::new(),
        });
        for (ad, addr) in links {
            t.links.insert(ad.id, (*ad, *addr, live));
            self.owners.insert((community, ad.id), origin);
        }
        self.schedule((community, origin));
    }

    /// Whether an announce would change nothing but the terminal's
    /// liveness: its session has `token`, the same interval, and exactly
    /// these links as they are (the one it came over from the same
    /// address). A server that takes terminals by key checks no signature
    /// for such one (`server::admit`).
    pub fn repeats(
        &self,
        community: u32,
        origin: Ipv4Addr,
        token: u64,
        via: Option<(u8, SocketAddr)>,
        interval: Duration,
        links: &[LinkAd],
    ) -> bool {
        let Some(t) = self.terms.get(&(community, origin)) else {
            return false;
        };
        t.token == token
            && t.live.interval == Liveness::new(t.live.last, interval).interval
            && t.links.len() == links.len()
            && links
                .iter()
                .all(|l| t.links.get(&l.id).is_some_and(|(ad, _, _)| ad == l))
            && via.is_none_or(|(id, src)| t.links.get(&id).is_some_and(|e| e.1 == src))
    }

    /// Whether `origin` holds a session with `token` and owns `link`.
    pub fn owns(&self, community: u32, origin: Ipv4Addr, token: u64, link: u8) -> bool {
        self.terms
            .get(&(community, origin))
            .is_some_and(|t| t.token == token)
            && self.owners.get(&(community, link)) == Some(&origin)
    }

    /// A SHUTDOWN with the session's token: the terminal and its links go
    /// at once. True if it was known.
    pub fn shutdown(&mut self, community: u32, origin: Ipv4Addr, token: u64) -> bool {
        let key = (community, origin);
        if self.terms.get(&key).is_some_and(|t| t.token == token) {
            if let Some(t) = self.terms.remove(&key) {
                for id in t.links.keys() {
                    self.owners.remove(&(community, *id));
                }
            }
            self.due.set(key, None);
            true
        } else {
            false
        }
    }

    /// Forgets a community's terminals and links at once (it moved to
    /// another node); returns the terminals whose sessions it had.
    pub fn forget(&mut self, community: u32) -> Vec<Ipv4Addr> {
        let gone: Vec<Ipv4Addr> = self.of(community).map(|(&(_, o), _)| o).collect();
        for o in &gone {
            self.terms.remove(&(community, *o));
            self.due.set((community, *o), None);
        }
        self.owners.retain(|&(c, _), _| c != community);
        gone
    }

    /// Drops links, and whole terminals, that missed `k` announces: those
    /// whose deadline came, not a walk of every terminal.
    pub fn expire(&mut self, now: Instant) -> Changes {
        let k = self.k;
        let mut ch = Changes::default();
        for key @ (c, _) in self.due.due(now) {
            let Some(t) = self.terms.get_mut(&key) else {
                continue;
            };
            let dead = t.live.missed(now) >= k;
            let owners = &mut self.owners;
            t.links.retain(|id, (_, _, live)| {
                let keep = !dead && live.missed(now) < k;
                if !keep {
                    owners.remove(&(c, *id));
                    ch.touch(c);
                }
                keep
            });
            if dead {
                self.terms.remove(&key);
                ch.sessions_gone.push(key);
            } else {
                self.schedule(key);
            }
        }
        ch
    }

    /// Whether any terminal of `community` is logged on.
    pub fn has_sessions(&self, community: u32) -> bool {
        self.of(community).next().is_some()
    }

    /// One community's terminals, by range: never a walk of every
    /// community (a node holds tens of thousands).
    fn of(&self, community: u32) -> std::collections::btree_map::Range<'_, (u32, Ipv4Addr), Term> {
        self.terms
            .range((community, Ipv4Addr::UNSPECIFIED)..=(community, Ipv4Addr::BROADCAST))
    }

    pub fn token(&self, community: u32, origin: Ipv4Addr) -> Option<u64> {
        self.terms.get(&(community, origin)).map(|t| t.token)
    }

    /// The key of a session, made at its last login (None: that login
    /// made none); it goes with the session.
    pub fn set_key(&mut self, community: u32, origin: Ipv4Addr, key: Option<Keyed>) {
        if let Some(t) = self.terms.get_mut(&(community, origin)) {
            t.key = key;
        }
    }

    pub fn keyed(&self, community: u32, origin: Ipv4Addr) -> Option<&Keyed> {
        self.terms.get(&(community, origin))?.key.as_ref()
    }

    pub fn key(&self, community: u32, origin: Ipv4Addr) -> Option<&SessionKey> {
        self.keyed(community, origin).map(|k| &k.key)
    }

    /// Live links of one community (or all, `None`), by community and id.
    pub fn links(&self, community: Option<u32>, now: Instant) -> Vec<ServerLinkRow> {
        let terms = match community {
            Some(c) => self.of(c),
            None => self.terms.range(..),
        };
        let mut rows: Vec<ServerLinkRow> = terms
            .flat_map(|(&(c, o), t)| {
                t.links.values().map(move |(ad, addr, live)| ServerLinkRow {
                    community: c,
                    link: ad.id,
                    owner: o,
                    addr: *addr,
                    down: ad.down,
                    missed: live.missed(now),
                    mtu: ad.mtu,
                    rtt_us: ad.rtt_us,
                    dark: ad.dark,
                })
            })
            .collect();
        rows.sort_by_key(|r| (r.community, r.link));
        rows
    }

    /// Sessions: (community, origin, token, missed announces).
    pub fn sessions(&self, now: Instant) -> Vec<(u32, Ipv4Addr, u64, u32)> {
        self.terms
            .iter()
            .map(|(&(c, o), t)| (c, o, t.token, t.live.missed(now)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);
    const MS100: Duration = Duration::from_millis(100);

    fn ad(id: u8, up: u32, down: u32) -> LinkAd {
        LinkAd {
            id,
            port: 7700 + u16::from(id),
            up,
            down,
            mtu: 1500,
            ..Default::default()
        }
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 1, n)
    }

    #[test]
    fn missed_counts_whole_intervals() {
        let t0 = Instant::now();
        let l = Liveness::new(t0, MS100);
        assert_eq!(l.missed(t0), 0);
        assert_eq!(l.missed(t0 + Duration::from_millis(99)), 0);
        assert_eq!(l.missed(t0 + MS100), 1);
        assert_eq!(l.missed(t0 + Duration::from_millis(299)), 2);
        assert_eq!(l.deadline(3), t0 + Duration::from_millis(300));
        assert_eq!(l.missed(t0 - SEC), 0, "an instant before: nothing missed");
    }

    #[test]
    fn peer_dropped_after_k_missed_announces() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(3);
        assert!(t.announce(ip(2), SEC, &[ad(2, 20, 20)], t0));
        assert!(
            !t.announce(ip(2), SEC, &[ad(2, 20, 20)], t0 + SEC),
            "no change"
        );
        assert_eq!(t.next_deadline(), Some(t0 + 4 * SEC));
        assert_eq!(t.rows(t0 + 3 * SEC)[0].missed, 2);
        assert!(t.expire(t0 + 3 * SEC).is_empty(), "two missed: still in");
        assert_eq!(t.expire(t0 + 4 * SEC), vec![ip(2)]);
        assert_eq!(t.peers().count(), 0);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn traffic_is_a_sign_of_life() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(3);
        t.announce(ip(2), SEC, &[ad(2, 1, 1)], t0);
        t.heard(ip(2), t0 + 2 * SEC);
        assert!(t.expire(t0 + 4 * SEC).is_empty());
        assert_eq!(t.expire(t0 + 5 * SEC), vec![ip(2)]);
        // Hearing an unknown peer's traffic does not invent a peer.
        t.heard(ip(9), t0);
        assert_eq!(t.peers().count(), 0);
    }

    #[test]
    fn weight_or_link_changes_are_changes_and_shutdown_is_immediate() {
        let t0 = Instant::now();
        let mut t = PeerTable::new(3);
        t.announce(ip(2), SEC, &[ad(2, 1, 1)], t0);
        assert!(t.announce(ip(2), SEC, &[ad(2, 5, 1)], t0));
        assert!(t.announce(ip(2), SEC, &[ad(2, 5, 1), ad(3, 1, 1)], t0));
        assert_eq!(t.owner(3), Some(ip(2)));
        assert_eq!(t.rows(t0).len(), 2);
        assert!(t.shutdown(ip(2)));
        assert!(!t.shutdown(ip(2)));
        assert_eq!(t.owner(3), None);
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(198, 51, 100, n), 7701))
    }

    #[test]
    fn server_needs_a_login_and_the_right_token() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        let links = [ad(1, 1, 10)];
        assert_eq!(
            s.announce(1, ip(1), 5, Some((1, addr(1))), SEC, &links, t0),
            Err(Refusal::NeedLogin)
        );
        let (token, new) = s.login(1, ip(1), SEC, t0, || 5);
        assert_eq!((token, new), (5, true));
        assert_eq!(s.login(1, ip(1), SEC, t0, || 6), (5, false), "kept");
        assert_eq!(
            s.announce(1, ip(1), 6, Some((1, addr(1))), SEC, &links, t0),
            Err(Refusal::NeedLogin),
            "wrong token"
        );
        assert_eq!(
            s.announce(1, ip(1), 5, Some((1, addr(1))), SEC, &links, t0),
            Ok(true)
        );
        assert_eq!(
            s.announce(1, ip(1), 5, Some((1, addr(1))), SEC, &links, t0 + SEC),
            Ok(false),
            "same again"
        );
        // The same terminal in another community is another session.
        assert_eq!(s.token(2, ip(1)), None);
        assert_eq!(
            s.announce(1, ip(1), 5, Some((2, addr(1))), SEC, &links, t0),
            Err(Refusal::UnknownLink)
        );
    }

    /// A community mixes links over IPv4 and IPv6: each is where its
    /// announces came from, and a link that moves from one family to the
    /// other (an LTE modem that lost its IPv4) is a change.
    /// An announce repeats when it would change only liveness: same
    /// token, interval, links and source; anything else changes something.
    #[test]
    fn an_announce_repeats_only_what_the_server_holds() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        s.login(1, ip(1), SEC, t0, || 7);
        let links = [ad(1, 10, 10), ad(2, 5, 5)];
        let via = Some((1, addr(1)));
        assert!(
            !s.repeats(1, ip(1), 7, via, SEC, &links),
            "nothing held yet"
        );
        s.announce(1, ip(1), 7, via, SEC, &links, t0).unwrap();
        s.announce(1, ip(1), 7, Some((2, addr(2))), SEC, &links, t0)
            .unwrap();
        assert!(s.repeats(1, ip(1), 7, via, SEC, &links));
        assert!(s.repeats(1, ip(1), 7, None, SEC, &links), "relayed");
        assert!(!s.repeats(1, ip(1), 8, via, SEC, &links), "another token");
        assert!(!s.repeats(1, ip(1), 7, via, MS100, &links), "interval");
        assert!(
            !s.repeats(1, ip(1), 7, Some((1, addr(3))), SEC, &links),
            "source"
        );
        assert!(
            !s.repeats(1, ip(1), 7, via, SEC, &links[..1]),
            "a link fewer"
        );
        let heavier = [ad(1, 10, 11), ad(2, 5, 5)];
        assert!(!s.repeats(1, ip(1), 7, via, SEC, &heavier), "a weight");
        assert!(!s.repeats(1, ip(2), 7, via, SEC, &links), "another origin");
    }

    #[test]
    fn a_community_that_moves_away_is_forgotten_and_only_it() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        for (c, o) in [(1, 1), (1, 2), (2, 1), (3, 9)] {
            s.login(c, ip(o), SEC, t0, || 7);
            s.announce(c, ip(o), 7, Some((o, addr(o))), SEC, &[ad(o, 10, 10)], t0)
                .unwrap();
        }
        let mut gone = s.forget(1);
        gone.sort();
        assert_eq!(gone, vec![ip(1), ip(2)]);
        assert!(s.links(Some(1), t0).is_empty());
        assert_eq!(s.token(1, ip(1)), None);
        assert_eq!(s.token(2, ip(1)), Some(7), "community 2 keeps its terminal");
        assert_eq!(s.links(Some(2), t0).len(), 1);
        assert_eq!(s.links(Some(3), t0).len(), 1);
        // Its link ids are free for a new session at once.
        s.login(1, ip(3), SEC, t0, || 8);
        assert_eq!(
            s.announce(1, ip(3), 8, Some((1, addr(3))), SEC, &[ad(1, 1, 10)], t0),
            Ok(true)
        );
        assert!(s.forget(4).is_empty());
    }

    #[test]
    fn server_learns_links_over_either_family() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        s.login(1, ip(1), SEC, t0, || 1);
        let v6 = SocketAddr::from((
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 1, 0, 0, 0, 2),
            7702,
        ));
        let links = [ad(1, 1, 10), ad(2, 2, 20)];
        s.announce(1, ip(1), 1, Some((1, addr(1))), SEC, &links, t0)
            .unwrap();
        assert_eq!(
            s.announce(1, ip(1), 1, Some((2, v6)), SEC, &links, t0),
            Ok(true)
        );
        let rows = s.links(Some(1), t0);
        let at: Vec<(u8, SocketAddr)> = rows.iter().map(|r| (r.link, r.addr)).collect();
        assert_eq!(at, vec![(1, addr(1)), (2, v6)]);
        assert_eq!(
            s.announce(1, ip(1), 1, Some((1, v6)), SEC, &links, t0),
            Ok(true),
            "link 1 now over IPv6"
        );
    }

    #[test]
    fn server_learns_link_addresses_and_refuses_taken_ids() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        s.login(1, ip(1), SEC, t0, || 1);
        s.login(1, ip(2), SEC, t0, || 2);
        let l1 = [ad(1, 1, 10)];
        s.announce(1, ip(1), 1, Some((1, addr(1))), SEC, &l1, t0)
            .unwrap();
        assert_eq!(
            s.announce(1, ip(2), 2, Some((1, addr(2))), SEC, &l1, t0),
            Err(Refusal::LinkTaken { owner: ip(1) })
        );
        // The link's public address moved (its NAT rebound): a change.
        assert_eq!(
            s.announce(1, ip(1), 1, Some((1, addr(9))), SEC, &l1, t0),
            Ok(true)
        );
        let rows = s.links(Some(1), t0);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].addr, rows[0].down, rows[0].owner),
            (addr(9), 10, ip(1))
        );
        // A relayed announce (no link) keeps the session alive only.
        assert_eq!(s.announce(1, ip(2), 2, None, SEC, &[], t0), Ok(false));
        // A down-weight change is a change; dropping the link is too.
        assert_eq!(
            s.announce(1, ip(1), 1, None, SEC, &[ad(1, 1, 20)], t0),
            Ok(true)
        );
        assert_eq!(s.links(Some(1), t0)[0].down, 20);
        assert_eq!(s.announce(1, ip(1), 1, None, SEC, &[], t0), Ok(true));
        assert!(s.links(Some(1), t0).is_empty());
    }

    #[test]
    fn server_expires_dead_links_then_dead_terminals() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        s.login(1, ip(1), MS100, t0, || 1);
        let two = [ad(1, 1, 1), ad(2, 1, 1)];
        s.announce(1, ip(1), 1, Some((1, addr(1))), MS100, &two, t0)
            .unwrap();
        s.announce(1, ip(1), 1, Some((2, addr(2))), MS100, &two, t0)
            .unwrap();
        // Link 2 goes quiet; link 1 keeps announcing (and the terminal too).
        let t1 = t0 + Duration::from_millis(200);
        s.announce(1, ip(1), 1, Some((1, addr(1))), MS100, &two, t1)
            .unwrap();
        // Link 2's deadline is 300 ms (three missed 100 ms announces):
        // nothing expires a moment before it.
        let early = s.expire(t0 + Duration::from_millis(299));
        assert!(early.communities.is_empty() && early.sessions_gone.is_empty());
        let ch = s.expire(t0 + Duration::from_millis(300));
        assert_eq!(ch.communities, vec![1]);
        assert!(ch.sessions_gone.is_empty());
        assert_eq!(
            s.links(None, t1).iter().map(|r| r.link).collect::<Vec<_>>(),
            vec![1]
        );
        // Then the whole terminal.
        let ch = s.expire(t1 + Duration::from_millis(300));
        assert_eq!(ch.sessions_gone, vec![(1, ip(1))]);
        assert_eq!(s.token(1, ip(1)), None);
        // Its link ids are free for another terminal now.
        let t2 = t1 + Duration::from_millis(300);
        s.login(1, ip(2), MS100, t2, || 2);
        assert_eq!(
            s.announce(1, ip(2), 2, Some((1, addr(2))), MS100, &two, t2),
            Ok(true)
        );
    }

    /// The missed-announce check goes by a queue of deadlines: a terminal
    /// whose deadline moved (it announced, the misses allowed changed,
    /// it left) is judged at the new one, and only due terminals are
    /// looked at.
    #[test]
    fn server_expires_by_each_terminals_latest_deadline() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = ServerTable::new(3);
        let one = [ad(1, 1, 1)];
        for o in 1..=3 {
            s.login(o, ip(o as u8), MS100, t0, || 9);
            s.announce(o, ip(o as u8), 9, Some((1, addr(1))), MS100, &one, t0)
                .unwrap();
        }
        assert_eq!(s.due.len(), 3);
        // Community 2 announces again at 250 ms; community 3 shuts down.
        s.announce(2, ip(2), 9, Some((1, addr(1))), MS100, &one, ms(250))
            .unwrap();
        assert!(s.shutdown(3, ip(3), 9));
        assert_eq!(s.due.len(), 2, "no deadline for a terminal gone");
        let ch = s.expire(ms(300));
        assert_eq!(ch.sessions_gone, vec![(1, ip(1))]);
        assert_eq!(ch.communities, vec![1]);
        assert_eq!(s.due.len(), 1);
        // Allowed one miss: community 2 is due at 350 ms, not 550.
        s.set_misses(1);
        assert!(s.expire(ms(349)).sessions_gone.is_empty());
        assert_eq!(s.expire(ms(350)).sessions_gone, vec![(2, ip(2))]);
        assert_eq!(s.due.len(), 0);
        // A community forgotten (moved away) leaves no deadline.
        s.login(4, ip(4), MS100, ms(400), || 4);
        assert_eq!(s.forget(4), vec![ip(4)]);
        assert_eq!(s.due.len(), 0);
        assert!(s.expire(ms(10_000)).sessions_gone.is_empty());
    }

    #[test]
    fn server_shutdown_needs_the_token() {
        let t0 = Instant::now();
        let mut s = ServerTable::new(3);
        s.login(1, ip(1), SEC, t0, || 7);
        assert!(!s.shutdown(1, ip(1), 8));
        s.announce(1, ip(1), 7, Some((1, addr(1))), SEC, &[ad(1, 1, 1)], t0)
            .unwrap();
        assert!(s.shutdown(1, ip(1), 7));
        assert_eq!(s.sessions(t0), vec![]);
        // Its link is free again.
        s.login(1, ip(2), SEC, t0, || 8);
        assert_eq!(
            s.announce(1, ip(2), 8, Some((1, addr(2))), SEC, &[ad(1, 1, 1)], t0),
            Ok(true)
        );
    }
}
