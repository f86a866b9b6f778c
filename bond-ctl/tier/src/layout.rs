//! What bond keeps in etcd, under one prefix (`/bond` by default):
//!
//! | key                      | value                | written by            |
//! |--------------------------|----------------------|-----------------------|
//! | `P/nodes/NAME`           | [`NodeRecord`]       | the node, on its lease |
//! | `P/drain/NAME`           | [`DrainRecord`]      | the operator          |
//! | `P/released/NAME/ID`     | empty                | the draining node, on its lease |
//! | `P/communities/ID`       | [`CommunityRecord`]  | the operator          |
//! | `P/terminals/ID/ADDRESS` | [`TerminalRecord`]   | the operator          |
//! | `P/owners/ID`            | the node's name      | the elected controller |
//! | `P/controller/LEASE`     | the node's name      | etcd's election       |
//!
//! A draining node keeps each community while it has live flows there
//! (until the drain's deadline), and releases it when it has none: only
//! then does the controller move it, so a drain loses no flow.
//!
//! A community whose record says `terminal_keys` takes only the terminals
//! under `P/terminals/ID/`, each by its LAN address and public key
//! (`bond_proto::identity`); deleting one revokes it: its owner ends its
//! session at once and refuses it from then on.
//!
//! A node's record lives only as long as its lease: a node that dies (or
//! loses etcd for longer than the lease) is gone from `P/nodes/` when the
//! lease runs out. [`View`] is that key space as one node mirrors it
//! (a read, then a watch); entries it cannot parse are set aside and
//! named, never half taken.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

use bond_proto::identity::PublicKey;

use crate::owner::{self, Candidate};

/// The key names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` without its trailing `/`s (`/bond`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// Everything bond keeps: `P/`.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn node(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.prefix)
    }

    pub fn drain(&self, name: &str) -> String {
        format!("{}/drain/{name}", self.prefix)
    }

    /// Where node `name` says it let community `id` go.
    pub fn released(&self, name: &str, id: u32) -> String {
        format!("{}/released/{name}/{id}", self.prefix)
    }

    /// Every community node `name` let go.
    pub fn released_by(&self, name: &str) -> String {
        format!("{}/released/{name}/", self.prefix)
    }

    pub fn community(&self, id: u32) -> String {
        format!("{}/communities/{id}", self.prefix)
    }

    /// Terminal `origin` of community `id`, authorised by its key.
    pub fn terminal(&self, id: u32, origin: Ipv4Addr) -> String {
        format!("{}/terminals/{id}/{origin}", self.prefix)
    }

    /// Every terminal authorised in community `id`.
    pub fn terminals_of(&self, id: u32) -> String {
        format!("{}/terminals/{id}/", self.prefix)
    }

    pub fn owner(&self, id: u32) -> String {
        format!("{}/owners/{id}", self.prefix)
    }

    /// The election's name (etcd adds `/LEASE` for each candidate).
    pub fn election(&self) -> String {
        format!("{}/controller", self.prefix)
    }

    /// Which entry a key is, if it is one of bond's.
    pub fn parse(&self, key: &str) -> Option<Entry> {
        let rest = key.strip_prefix(&self.all())?;
        let (kind, name) = rest.split_once('/')?;
        let id = || {
            name.parse::<u32>()
                .ok()
                .filter(|_| !name.starts_with('0') || name == "0")
        };
        Some(match kind {
            "nodes" if valid_name(name) => Entry::Node(name.to_string()),
            "drain" if valid_name(name) => Entry::Drain(name.to_string()),
            "released" => {
                let (node, c) = name.split_once('/')?;
                let ok = |c: &str| {
                    c.parse::<u32>()
                        .ok()
                        .filter(|_| !c.starts_with('0') || c == "0")
                };
                if !valid_name(node) {
                    return None;
                }
                Entry::Released(node.to_string(), ok(c)?)
            }
            "communities" => Entry::Community(id()?),
            "terminals" => {
                let (c, origin) = name.split_once('/')?;
                let c = c
                    .parse::<u32>()
                    .ok()
                    .filter(|_| !c.starts_with('0') || c == "0")?;
                let origin: Ipv4Addr = origin.parse().ok()?;
                Entry::Terminal(c, origin)
            }
            "owners" => Entry::Owner(id()?),
            "controller" => Entry::Controller,
            _ => return None,
        })
    }
}

/// One of bond's keys, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Node(String),
    Drain(String),
    Released(String, u32),
    Community(u32),
    Terminal(u32, Ipv4Addr),
    Owner(u32),
    Controller,
}

/// A node name: 1-63 of `a-z`, `0-9` and `-`, as a host name's label.
pub use bond_config::valid_node_name as valid_name;

/// What a node says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// The node's own address (where a director forwards its
    /// communities' packets).
    pub address: Ipv4Addr,
    /// Its share of the communities, relative to the others'.
    pub weight: u32,
    /// The UDP port on `address` where it answers health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<u16>,
}

/// A drain as the operator asks for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRecord {
    /// Until when (Unix seconds) the node keeps a community that still
    /// has live flows; after it, everything moves. 0 (or an empty value):
    /// everything moves at once.
    #[serde(default)]
    pub until: u64,
}

/// A community as the operator registers it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommunityRecord {
    /// The key its terminals sign with.
    pub key: String,
    /// Only the terminals under `P/terminals/ID/` are taken, each
    /// signing with its own key; otherwise any with the community key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminal_keys: bool,
}

impl std::fmt::Debug for CommunityRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CommunityRecord {{ key: .., terminal_keys: {} }}",
            self.terminal_keys
        )
    }
}

/// A terminal the operator authorises in a community.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalRecord {
    /// The public key of its identity.
    pub key: PublicKey,
}

/// One change the controller makes to `P/owners/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerChange {
    Set(u32, String),
    Remove(u32),
}

/// bond's key space as one node mirrors it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub drains: BTreeMap<String, DrainRecord>,
    /// (node, community) a draining node let go.
    pub released: BTreeSet<(String, u32)>,
    pub communities: BTreeMap<u32, CommunityRecord>,
    /// (community, LAN address): the terminal's public key.
    pub terminals: BTreeMap<(u32, Ipv4Addr), PublicKey>,
    pub owners: BTreeMap<u32, String>,
    /// Keys under the prefix that are not bond's, or whose value does not
    /// parse, with why: left out of everything above.
    pub bad: BTreeMap<String, String>,
}

impl View {
    /// Takes in one key's value (from a read or a watch's put).
    pub fn put(&mut self, layout: &Layout, key: &str, value: &[u8]) {
        self.delete(layout, key);
        let parsed = match layout.parse(key) {
            None => Err("not a key bond uses".to_string()),
            Some(Entry::Controller) => Ok(()),
            Some(Entry::Node(name)) => json(value).map(|r| {
                self.nodes.insert(name, r);
            }),
            Some(Entry::Drain(name)) => {
                let rec = if value.is_empty() {
                    Ok(DrainRecord::default())
                } else {
                    json(value)
                };
                rec.map(|r| {
                    self.drains.insert(name, r);
                })
            }
            Some(Entry::Released(name, id)) => {
                self.released.insert((name, id));
                Ok(())
            }
            Some(Entry::Community(id)) => json(value).and_then(|r: CommunityRecord| {
                if r.key.len() < 16 {
                    return Err(format!("key is {} bytes; use at least 16", r.key.len()));
                }
                self.communities.insert(id, r);
                Ok(())
            }),
            Some(Entry::Terminal(id, origin)) => json(value).map(|r: TerminalRecord| {
                self.terminals.insert((id, origin), r.key);
            }),
            Some(Entry::Owner(id)) => std::str::from_utf8(value)
                .ok()
                .filter(|n| valid_name(n))
                .map(|n| {
                    self.owners.insert(id, n.to_string());
                })
                .ok_or_else(|| "not a node name".to_string()),
        };
        if let Err(why) = parsed {
            self.bad.insert(key.to_string(), why);
        }
    }

    /// Forgets one key (a watch's delete).
    pub fn delete(&mut self, layout: &Layout, key: &str) {
        self.bad.remove(key);
        match layout.parse(key) {
            Some(Entry::Node(name)) => {
                self.nodes.remove(&name);
            }
            Some(Entry::Drain(name)) => {
                self.drains.remove(&name);
            }
            Some(Entry::Released(name, id)) => {
                self.released.remove(&(name, id));
            }
            Some(Entry::Community(id)) => {
                self.communities.remove(&id);
            }
            Some(Entry::Terminal(id, origin)) => {
                self.terminals.remove(&(id, origin));
            }
            Some(Entry::Owner(id)) => {
                self.owners.remove(&id);
            }
            Some(Entry::Controller) | None => {}
        }
    }

    /// The communities `node` owns, with their keys.
    pub fn served(&self, node: &str) -> BTreeMap<u32, String> {
        self.owners
            .iter()
            .filter(|(_, o)| o.as_str() == node)
            .filter_map(|(c, _)| Some((*c, self.communities.get(c)?.key.clone())))
            .collect()
    }

    /// The terminals community `id` takes, by LAN address, if it takes
    /// only terminals it knows by key (None: any with the community key).
    pub fn terminal_keys(&self, id: u32) -> Option<BTreeMap<Ipv4Addr, PublicKey>> {
        if !self.communities.get(&id)?.terminal_keys {
            return None;
        }
        let all = (id, Ipv4Addr::UNSPECIFIED)..=(id, Ipv4Addr::BROADCAST);
        Some(
            self.terminals
                .range(all)
                .map(|(&(_, origin), key)| (origin, *key))
                .collect(),
        )
    }

    /// Whether `node` is draining.
    pub fn draining(&self, node: &str) -> bool {
        self.drains.contains_key(node)
    }

    /// What the controller writes to bring `P/owners/` to
    /// [`owner::assign`]'s answer at `now` (Unix seconds): owners for
    /// communities that need one, none for communities that are gone or
    /// that no node can take. A draining owner keeps a community it has
    /// not released until its drain's deadline.
    pub fn plan(&self, now: u64) -> Vec<OwnerChange> {
        let nodes: Vec<Candidate> = self
            .nodes
            .iter()
            .map(|(name, r)| Candidate {
                name,
                weight: r.weight,
                draining: self.draining(name),
            })
            .collect();
        let holds = |c: u32, node: &str| {
            self.drains.get(node).is_some_and(|d| d.until > now)
                && !self.released.contains(&(node.to_string(), c))
        };
        let want = owner::assign(
            self.communities.keys().copied(),
            &nodes,
            &self.owners,
            holds,
        );
        let mut changes: Vec<OwnerChange> = want
            .iter()
            .filter(|(c, o)| self.owners.get(c).map(String::as_str) != **o)
            .map(|(&c, o)| match o {
                Some(n) => OwnerChange::Set(c, n.to_string()),
                None => OwnerChange::Remove(c),
            })
            .collect();
        changes.extend(
            self.owners
                .keys()
                .filter(|c| !self.communities.contains_key(c))
                .map(|&c| OwnerChange::Remove(c)),
        );
        changes
    }
}

fn json<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l() -> Layout {
        Layout::new("/bond/")
    }

    const NOW: u64 = 1_800_000_000;

    fn node(v: &mut View, name: &str, weight: u32) {
        let rec = format!(r#"{{"address":"192.0.2.1","weight":{weight}}}"#);
        v.put(&l(), &l().node(name), rec.as_bytes());
    }

    fn community(v: &mut View, id: u32) {
        v.put(
            &l(),
            &l().community(id),
            br#"{"key":"a key of sixteen bytes"}"#,
        );
    }

    #[test]
    fn keys_name_their_entries_and_nothing_else() {
        let l = l();
        assert_eq!(l.parse("/bond/nodes/n-1"), Some(Entry::Node("n-1".into())));
        assert_eq!(l.parse("/bond/owners/70000"), Some(Entry::Owner(70000)));
        assert_eq!(l.parse("/bond/communities/0"), Some(Entry::Community(0)));
        assert_eq!(l.parse("/bond/controller/694d8a"), Some(Entry::Controller));
        for bad in [
            "/bond/nodes/N1",
            "/bond/nodes/",
            "/bond/owners/007",
            "/bond/owners/-1",
            "/bond/owners/4294967296",
            "/bond/communities/x",
            "/bond/other/1",
            "/bondage/nodes/n1",
            "/bond",
        ] {
            assert_eq!(l.parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_bad_value_is_set_aside_and_named_and_a_good_one_replaces_it() {
        let mut v = View::default();
        v.put(&l(), "/bond/nodes/n1", b"{\"address\":\"192.0.2.1\"}");
        v.put(&l(), "/bond/communities/1", br#"{"key":"short"}"#);
        v.put(&l(), "/bond/owners/1", b"Not A Name");
        v.put(&l(), "/bond/stray", b"");
        assert!(v.nodes.is_empty() && v.communities.is_empty() && v.owners.is_empty());
        assert_eq!(v.bad.len(), 4, "{:?}", v.bad);
        assert!(v.bad["/bond/communities/1"].contains("at least 16"));
        node(&mut v, "n1", 1);
        assert!(v.nodes.contains_key("n1") && !v.bad.contains_key("/bond/nodes/n1"));
        // A good value then a bad one: the entry is gone, not kept stale.
        v.put(&l(), "/bond/nodes/n1", b"{");
        assert!(v.nodes.is_empty());
    }

    /// Terminals by key: named by community and LAN address, a bad key
    /// set aside and named; a community takes them only if its record
    /// says so, and then only them (none listed: none taken).
    #[test]
    fn a_community_with_terminal_keys_lists_its_terminals() {
        const K1: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
        const K2: &str = "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025";
        let t1 = Ipv4Addr::new(10, 0, 1, 1);
        assert_eq!(l().terminal(7, t1), "/bond/terminals/7/10.0.1.1");
        assert_eq!(
            l().parse("/bond/terminals/7/10.0.1.1"),
            Some(Entry::Terminal(7, t1))
        );
        for bad in [
            "/bond/terminals/7",
            "/bond/terminals/07/10.0.1.1",
            "/bond/terminals/7/10.0.1",
            "/bond/terminals/x/10.0.1.1",
        ] {
            assert_eq!(l().parse(bad), None, "{bad}");
        }
        let mut v = View::default();
        community(&mut v, 7);
        let put = |v: &mut View, origin: &str, key: &str| {
            v.put(
                &l(),
                &format!("/bond/terminals/7/{origin}"),
                format!("{{\"key\":\"{key}\"}}").as_bytes(),
            );
        };
        put(&mut v, "10.0.1.1", K1);
        put(&mut v, "10.0.1.2", K2);
        put(&mut v, "10.0.1.3", "00ff");
        assert!(
            v.bad["/bond/terminals/7/10.0.1.3"].contains("2 bytes"),
            "{:?}",
            v.bad
        );
        assert_eq!(v.terminal_keys(7), None, "the community takes any member");
        v.put(
            &l(),
            &l().community(7),
            br#"{"key":"a key of sixteen bytes","terminal_keys":true}"#,
        );
        let keys = v.terminal_keys(7).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[&t1].to_string(), K1);
        v.delete(&l(), &l().terminal(7, t1));
        assert_eq!(v.terminal_keys(7).unwrap().len(), 1, "revoked");
        v.delete(&l(), "/bond/terminals/7/10.0.1.2");
        assert_eq!(v.terminal_keys(7), Some(BTreeMap::new()), "none taken");
        assert_eq!(v.terminal_keys(8), None, "not registered");
    }

    #[test]
    fn a_node_serves_what_it_owns_that_has_a_key() {
        let mut v = View::default();
        community(&mut v, 1);
        community(&mut v, 2);
        v.put(&l(), &l().owner(1), b"n1");
        v.put(&l(), &l().owner(2), b"n2");
        v.put(&l(), &l().owner(3), b"n1");
        assert_eq!(v.served("n1").into_keys().collect::<Vec<_>>(), [1]);
        v.delete(&l(), &l().owner(1));
        assert!(v.served("n1").is_empty());
    }

    #[test]
    fn the_plan_places_new_communities_moves_orphans_and_clears_stale_owners() {
        let mut v = View::default();
        node(&mut v, "n1", 1);
        node(&mut v, "n2", 1);
        for c in 1..=20 {
            community(&mut v, c);
        }
        v.put(&l(), &l().owner(99), b"n1");
        let plan = v.plan(NOW);
        assert!(plan.contains(&OwnerChange::Remove(99)));
        let apply = |v: &mut View, plan: Vec<OwnerChange>| {
            for ch in plan {
                match ch {
                    OwnerChange::Set(c, n) => v.put(&l(), &l().owner(c), n.as_bytes()),
                    OwnerChange::Remove(c) => v.delete(&l(), &l().owner(c)),
                }
            }
        };
        apply(&mut v, plan);
        assert_eq!(v.owners.len(), 20);
        assert!(v.plan(NOW).is_empty(), "a second plan changes nothing");
        let n2: Vec<u32> = v.served("n2").into_keys().collect();
        assert!(!n2.is_empty() && n2.len() < 20);
        // n2's lease runs out: exactly its communities move, all to n1.
        v.delete(&l(), &l().node("n2"));
        let plan = v.plan(NOW);
        assert_eq!(
            plan,
            n2.iter()
                .map(|&c| OwnerChange::Set(c, "n1".into()))
                .collect::<Vec<_>>()
        );
        apply(&mut v, plan);
        // n1 drains with no one to take over: its communities stay.
        v.put(&l(), &l().drain("n1"), b"");
        assert!(v.plan(NOW).is_empty());
        node(&mut v, "n3", 1);
        assert_eq!(v.plan(NOW).len(), 20, "all to n3");
        // A community removed: its owner goes with it.
        v.delete(&l(), &l().community(7));
        assert!(v.plan(NOW).contains(&OwnerChange::Remove(7)));
    }

    #[test]
    fn a_drain_keeps_what_the_node_has_not_released_until_its_deadline() {
        let mut v = View::default();
        node(&mut v, "n1", 1);
        node(&mut v, "n2", 1);
        for c in 1..=3 {
            community(&mut v, c);
            v.put(&l(), &l().owner(c), b"n1");
        }
        let until = format!(r#"{{"until":{}}}"#, NOW + 60);
        v.put(&l(), &l().drain("n1"), until.as_bytes());
        assert!(v.draining("n1"));
        assert!(v.plan(NOW).is_empty(), "n1 holds all three");
        v.put(&l(), &l().released("n1", 2), b"");
        assert_eq!(v.plan(NOW), [OwnerChange::Set(2, "n2".into())]);
        // Released by another node: means nothing for n1's.
        v.put(&l(), &l().released("n2", 1), b"");
        assert_eq!(v.plan(NOW).len(), 1);
        // The deadline passed: everything moves.
        assert_eq!(v.plan(NOW + 60).len(), 3);
        // An empty value (as before deadlines): at once.
        v.put(&l(), &l().drain("n1"), b"");
        assert_eq!(v.plan(NOW).len(), 3);
        // Keys that are not well formed are named, not taken.
        for bad in [
            "/bond/released/n1/x",
            "/bond/released/N1/3",
            "/bond/released/n1",
        ] {
            v.put(&l(), bad, b"");
            assert!(v.bad.contains_key(bad), "{bad}");
        }
        v.put(&l(), &l().drain("n2"), b"{\"until\":\"soon\"}");
        assert!(v.bad.contains_key(&l().drain("n2")) && !v.draining("n2"));
        v.delete(&l(), &l().released("n1", 2));
        assert!(!v.released.contains(&("n1".to_string(), 2)));
    }
}
