//! The referral server's look-up table: for each URL, the version the
//! community holds and the peers holding it; for each peer, what it is
//! worth as a source (speed measured by clients, workload, liveness,
//! bad data). Pure: the service feeds it updates, probe results and the
//! clock.
//!
//! Ranking goes beyond the seed's "most used first": a peer is scored by
//! the time it would take to send the object now, its measured speed
//! shared among its uploads under way plus one, so a fast peer that is
//! busy yields to a slower idle one. Peers much slower than the others,
//! or caught sending bad data, are demoted (listed after the rest); peers
//! at their workload limit are listed last; peers that stop answering
//! probes are dropped.

use std::{collections::HashMap, net::SocketAddr};

use super::msg::{Decision, Load, Object, Outcome, Referral, Source, Update};

/// Probes missed in a row before a peer is taken for gone.
pub const DEAD_AFTER: u32 = 3;
/// A peer this many times slower than the median of the others is
/// demoted.
pub const SLOW_FACTOR: f64 = 4.0;
/// Weight of a new speed sample in the running average.
const ALPHA: f64 = 0.5;
/// A client whose speed is not known yet is taken to receive this fast
/// (bytes/s): a LAN, 100 Mbit/s.
pub const DEFAULT_CLIENT_BPS: f64 = 12.5e6;
/// The target period is the client's own transfer time times this, plus
/// [`TARGET_GRACE_S`].
const TARGET_SLACK: f64 = 1.5;
const TARGET_GRACE_S: f64 = 0.2;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Peer {
    /// Bytes/s clients measured from it (running average).
    pub bps: Option<f64>,
    pub load: Load,
    /// Probes missed in a row.
    pub misses: u32,
    /// Times it was caught sending bad data.
    pub strikes: u32,
    /// Objects it has sent.
    pub uses: u64,
}

struct Entry {
    object: Object,
    holders: Vec<SocketAddr>,
}

#[derive(Default)]
pub struct Table {
    entries: HashMap<String, Entry>,
    peers: HashMap<SocketAddr, Peer>,
    /// Clients' own measured speeds, bytes/s.
    clients: HashMap<std::net::IpAddr, f64>,
}

fn average(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(o) => o * (1.0 - ALPHA) + sample * ALPHA,
        None => sample,
    }
}

impl Table {
    pub fn apply(&mut self, u: &Update) {
        match u {
            Update::Added { peer, objects } => {
                for o in objects {
                    self.added(*peer, o);
                }
            }
            Update::Evicted { peer, hashes } => {
                for e in self.entries.values_mut() {
                    if hashes.contains(&e.object.hash) {
                        e.holders.retain(|h| h != peer);
                    }
                }
                self.forget_unheld();
            }
            Update::Got {
                client,
                object,
                cached,
                source,
                bps,
                probes,
            } => {
                let c = self.clients.entry(client.ip()).or_insert(*bps);
                *c = average(Some(*c), *bps);
                for (p, outcome) in probes {
                    self.outcome(&object.url, *p, *outcome);
                }
                if let Some(s) = source {
                    self.peer(*s).uses += 1;
                }
                // The client holds it now.
                if *cached {
                    self.added(*client, object);
                }
            }
        }
    }

    fn peer(&mut self, p: SocketAddr) -> &mut Peer {
        self.peers.entry(p).or_default()
    }

    fn added(&mut self, peer: SocketAddr, o: &Object) {
        self.peer(peer).misses = 0;
        let e = self.entries.entry(o.url.clone()).or_insert_with(|| Entry {
            object: o.clone(),
            holders: Vec::new(),
        });
        if e.object.hash != o.hash {
            // Another version: the newer one (by the origin's word) wins
            // and its holders start afresh.
            if o.fetched_ms < e.object.fetched_ms {
                return;
            }
            e.object = o.clone();
            e.holders.clear();
        } else {
            e.object.fetched_ms = e.object.fetched_ms.max(o.fetched_ms);
        }
        if !e.holders.contains(&peer) {
            e.holders.push(peer);
        }
    }

    fn outcome(&mut self, url: &str, p: SocketAddr, o: Outcome) {
        let peer = self.peer(p);
        match o {
            Outcome::Speed(bps) => peer.bps = Some(average(peer.bps, bps)),
            Outcome::Busy => peer.load.uploads = peer.load.uploads.max(peer.load.max_uploads),
            Outcome::Failed => peer.misses += 1,
            Outcome::Corrupt => {
                peer.strikes += 1;
                if let Some(e) = self.entries.get_mut(url) {
                    e.holders.retain(|h| *h != p);
                }
                self.forget_unheld();
            }
        }
        if self.peers[&p].misses >= DEAD_AFTER {
            self.drop_peer(p);
        }
    }

    /// A probe of `p` answered with its workload.
    pub fn probed(&mut self, p: SocketAddr, load: Load) {
        let peer = self.peer(p);
        peer.misses = 0;
        peer.load = load;
    }

    /// A probe of `p` got no answer; true if that made it gone.
    pub fn probe_failed(&mut self, p: SocketAddr) -> bool {
        let Some(peer) = self.peers.get_mut(&p) else {
            return false;
        };
        peer.misses += 1;
        if peer.misses >= DEAD_AFTER {
            self.drop_peer(p);
            return true;
        }
        false
    }

    fn drop_peer(&mut self, p: SocketAddr) {
        self.peers.remove(&p);
        for e in self.entries.values_mut() {
            e.holders.retain(|h| *h != p);
        }
        self.forget_unheld();
    }

    /// A URL nobody holds any more is forgotten (its answer is the origin
    /// either way), so the table is as large as the community's caches.
    fn forget_unheld(&mut self) {
        self.entries.retain(|_, e| !e.holders.is_empty());
    }

    /// The peers to probe: every one that holds something.
    pub fn peers(&self) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self.peers.keys().copied().collect();
        v.sort();
        v
    }

    pub fn peer_info(&self, p: SocketAddr) -> Option<&Peer> {
        self.peers.get(&p)
    }

    /// Median measured speed of the peers other than `p`.
    fn median_except(&self, p: SocketAddr) -> Option<f64> {
        let mut v: Vec<f64> = self
            .peers
            .iter()
            .filter(|(a, _)| **a != p)
            .filter_map(|(_, x)| x.bps)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }

    fn source(&self, p: SocketAddr) -> Source {
        let peer = self.peers.get(&p).cloned().unwrap_or_default();
        let slow = match (peer.bps, self.median_except(p)) {
            (Some(b), Some(m)) => b * SLOW_FACTOR < m,
            _ => false,
        };
        Source {
            endpoint: p,
            bps: peer.bps,
            uploads: peer.load.uploads,
            max_uploads: peer.load.max_uploads,
            demoted: slow || peer.strikes > 0,
            busy: peer.load.max_uploads > 0 && peer.load.uploads >= peer.load.max_uploads,
        }
    }

    /// Seconds `s` would take to send `size` bytes now.
    fn eta(&self, s: &Source, size: u64) -> f64 {
        let bps = s
            .bps
            .or_else(|| self.median_except(s.endpoint))
            .unwrap_or(DEFAULT_CLIENT_BPS);
        size as f64 / (bps / (f64::from(s.uploads) + 1.0))
    }

    /// The holders of `url`, best first: the fit by how soon they would
    /// be done, then the demoted, then the busy.
    pub fn ranked(&self, url: &str) -> Vec<Source> {
        let Some(e) = self.entries.get(url) else {
            return Vec::new();
        };
        let mut v: Vec<(u8, f64, u64, Source)> = e
            .holders
            .iter()
            .map(|h| {
                let s = self.source(*h);
                let class = u8::from(s.demoted) + 2 * u8::from(s.busy);
                let uses = self.peers.get(h).map_or(0, |p| p.uses);
                (class, self.eta(&s, e.object.size), uses, s)
            })
            .collect();
        v.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then(b.2.cmp(&a.2))
                .then(a.3.endpoint.cmp(&b.3.endpoint))
        });
        v.into_iter().map(|x| x.3).collect()
    }

    pub fn object(&self, url: &str) -> Option<&Object> {
        self.entries.get(url).map(|e| &e.object)
    }

    /// The answer for `client` asking for `url`; `me` is the referral
    /// server's own cache service. It serves the object itself if it holds
    /// it and would be done within the client's target period (the time
    /// the client's own measured speed needs, with slack); otherwise
    /// peers come first and it comes last.
    pub fn refer(&self, client: SocketAddr, url: &str, me: SocketAddr) -> Referral {
        let Some(object) = self.object(url).cloned() else {
            return Referral {
                decision: Decision::Origin,
                object: None,
                sources: Vec::new(),
            };
        };
        let mut sources = self.ranked(url);
        sources.retain(|s| s.endpoint != client);
        let mine = sources.iter().position(|s| s.endpoint == me);
        let client_bps = self
            .clients
            .get(&client.ip())
            .copied()
            .unwrap_or(DEFAULT_CLIENT_BPS);
        let target = object.size as f64 / client_bps * TARGET_SLACK + TARGET_GRACE_S;
        let decision = match mine {
            Some(i) if !sources[i].busy && self.eta(&sources[i], object.size) <= target => {
                let s = sources.remove(i);
                sources.insert(0, s);
                Decision::Serve
            }
            Some(i) => {
                let s = sources.remove(i);
                sources.push(s);
                Decision::Peers
            }
            None if sources.is_empty() => Decision::Origin,
            None => Decision::Peers,
        };
        Referral {
            decision,
            object: Some(object),
            sources,
        }
    }

    /// Everything, for `bond-ctl cache table`: each URL with its ranked
    /// holders.
    pub fn dump(&self) -> Vec<(Object, Vec<Source>)> {
        let mut v: Vec<_> = self
            .entries
            .values()
            .map(|e| (e.object.clone(), self.ranked(&e.object.url)))
            .collect();
        v.sort_by(|a, b| a.0.url.cmp(&b.0.url));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 1, i], 7801))
    }

    fn obj(url: &str, hash: char, size: u64, fetched_ms: u64) -> Object {
        Object {
            url: url.into(),
            validator: None,
            hash: hash.to_string().repeat(64),
            size,
            content_type: None,
            fetched_ms,
        }
    }

    fn added(t: &mut Table, p: u8, o: &Object) {
        t.apply(&Update::Added {
            peer: at(p),
            objects: vec![o.clone()],
        });
    }

    fn speed(t: &mut Table, url: &str, p: u8, bps: f64) {
        t.apply(&Update::Got {
            client: at(200),
            object: obj(url, 'z', 1, 0),
            cached: false,
            source: Some(at(p)),
            bps,
            probes: vec![(at(p), Outcome::Speed(bps))],
        });
    }

    fn order(t: &Table, url: &str) -> Vec<SocketAddr> {
        t.ranked(url).into_iter().map(|s| s.endpoint).collect()
    }

    #[test]
    fn nobody_holds_it_go_to_the_origin() {
        let t = Table::default();
        let r = t.refer(at(9), "u", at(1));
        assert_eq!(r.decision, Decision::Origin);
        assert!(r.object.is_none() && r.sources.is_empty());
    }

    #[test]
    fn fast_idle_peers_first_slow_demoted_busy_last() {
        let mut t = Table::default();
        let o = obj("u", 'a', 10_000_000, 5);
        for p in 2..=5 {
            added(&mut t, p, &o);
        }
        speed(&mut t, "u", 2, 10e6);
        speed(&mut t, "u", 3, 12e6);
        speed(&mut t, "u", 4, 1e6); // a quarter of the median and less
        speed(&mut t, "u", 5, 11e6);
        assert_eq!(order(&t, "u"), [at(3), at(5), at(2), at(4)]);
        let s4 = t.ranked("u").pop().unwrap();
        assert!(s4.demoted && !s4.busy);
        // 3 takes one upload: it would now send at half speed, after 5 and 2.
        let load = |uploads| Load {
            uploads,
            max_uploads: 2,
            ..Load::default()
        };
        t.probed(at(3), load(1));
        assert_eq!(order(&t, "u"), [at(5), at(2), at(3), at(4)]);
        // At its limit it goes after the demoted.
        t.probed(at(3), load(2));
        assert_eq!(order(&t, "u"), [at(5), at(2), at(4), at(3)]);
        assert!(t.ranked("u")[3].busy);
        // A client's Busy outcome says the same before the next probe.
        t.probed(at(5), load(0));
        t.apply(&Update::Got {
            client: at(200),
            object: obj("u", 'x', 1, 0),
            cached: false,
            source: Some(at(2)),
            bps: 9e6,
            probes: vec![(at(5), Outcome::Busy)],
        });
        assert_eq!(order(&t, "u"), [at(2), at(4), at(3), at(5)]);
    }

    #[test]
    fn bad_data_drops_the_holder_and_demotes_the_peer() {
        let mut t = Table::default();
        let (u, v) = (obj("u", 'a', 100, 5), obj("v", 'b', 100, 5));
        added(&mut t, 2, &u);
        added(&mut t, 2, &v);
        added(&mut t, 3, &u);
        t.apply(&Update::Got {
            client: at(9),
            object: u.clone(),
            cached: true,
            source: Some(at(3)),
            bps: 1e6,
            probes: vec![(at(2), Outcome::Corrupt), (at(3), Outcome::Speed(1e6))],
        });
        // The client now holds u; 2 no longer does, and is demoted for v.
        assert_eq!(order(&t, "u"), [at(3), at(9)]);
        assert!(t.ranked("v")[0].demoted);
    }

    #[test]
    fn silent_peers_are_dropped_after_three_probes() {
        let mut t = Table::default();
        let o = obj("u", 'a', 100, 5);
        added(&mut t, 2, &o);
        added(&mut t, 3, &o);
        assert!(!t.probe_failed(at(2)));
        assert!(!t.probe_failed(at(2)));
        t.probed(at(2), Load::default()); // an answer resets the count
        assert!(!t.probe_failed(at(2)));
        assert!(!t.probe_failed(at(2)));
        assert!(t.probe_failed(at(2)));
        assert_eq!(order(&t, "u"), [at(3)]);
        assert_eq!(t.peers(), [at(3)]);
    }

    #[test]
    fn a_newer_version_replaces_the_holders() {
        let mut t = Table::default();
        added(&mut t, 2, &obj("u", 'a', 100, 5));
        added(&mut t, 3, &obj("u", 'b', 100, 9));
        added(&mut t, 4, &obj("u", 'a', 100, 6)); // older than b: ignored
        assert_eq!(t.object("u").unwrap().hash, obj("u", 'b', 0, 0).hash);
        assert_eq!(order(&t, "u"), [at(3)]);
        t.apply(&Update::Evicted {
            peer: at(3),
            hashes: vec![obj("u", 'b', 0, 0).hash],
        });
        assert!(order(&t, "u").is_empty());
        assert!(t.dump().is_empty(), "an entry nobody holds is forgotten");
    }

    #[test]
    fn the_server_serves_itself_within_the_clients_target_period() {
        let me = at(1);
        let mut t = Table::default();
        let o = obj("u", 'a', 10_000_000, 5);
        added(&mut t, 1, &o);
        added(&mut t, 2, &o);
        speed(&mut t, "u", 1, 10e6);
        speed(&mut t, "u", 2, 10e6);
        // A client receiving at 10 MB/s: 1.5 s of slack covers 1 s.
        let client = at(7);
        t.apply(&Update::Got {
            client,
            object: obj("w", 'c', 1, 0),
            cached: false,
            source: None,
            bps: 10e6,
            probes: vec![],
        });
        let r = t.refer(client, "u", me);
        assert_eq!(r.decision, Decision::Serve);
        assert_eq!(r.sources[0].endpoint, me);
        // Busy with two uploads it would take 3 s: peers first, itself last.
        t.probed(
            me,
            Load {
                uploads: 2,
                max_uploads: 4,
                ..Load::default()
            },
        );
        let r = t.refer(client, "u", me);
        assert_eq!(r.decision, Decision::Peers);
        let eps: Vec<_> = r.sources.iter().map(|s| s.endpoint).collect();
        assert_eq!(eps, [at(2), me]);
        // The client itself is never listed.
        let r = t.refer(at(2), "u", me);
        assert!(r.sources.iter().all(|s| s.endpoint != at(2)));
    }
}
