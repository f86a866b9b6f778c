//! Which node owns a community: weighted rendezvous hashing (highest
//! random weight, Thaler and Ravishankar), made sticky.
//!
//! Every node scores every community with a hash of the pair, scaled by
//! the node's weight so that a node of twice the weight wins twice as
//! often (`-weight / ln(u)`, `u` the hash taken into (0, 1)); the highest
//! score places it. A node that leaves takes only its own communities
//! with it, and they spread over the rest in proportion to their weights.
//!
//! [`assign`] keeps a community where it is while its owner is alive and
//! not draining (its flows and their NAT ports live there), and places by
//! score only what has no such owner: a node that joins takes no one's
//! communities, only new ones and orphans. Nothing here does I/O.

use std::collections::BTreeMap;

/// A node as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    /// Relative share of the communities it should get; 0 takes none.
    pub weight: u32,
    /// Draining: keeps nothing, takes nothing.
    pub draining: bool,
}

/// FNV-1a over the name: stable across builds and machines, unlike
/// std's hasher.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: every input bit moves every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `node`'s score for `community`: higher wins.
pub fn score(node: &str, weight: u32, community: u32) -> f64 {
    let h = mix(name_hash(node) ^ mix(u64::from(community)));
    // 53 bits into (0, 1): never 0 or 1, so ln(u) is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight) / u.ln()
}

/// Where `community` goes among `nodes` by score alone: the best-scoring
/// node of weight > 0 that is not draining (ties to the lower name).
pub fn place<'a>(community: u32, nodes: &[Candidate<'a>]) -> Option<&'a str> {
    nodes
        .iter()
        .filter(|n| n.weight > 0 && !n.draining)
        .map(|n| (score(n.name, n.weight, community), n.name))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(a.1)))
        .map(|(_, name)| name)
}

/// Each community's owner: its `current` one while that node is alive
/// (in `nodes`) and not draining, or draining but still holding it
/// (`holds(community, node)`: it has live flows there and the drain's
/// deadline has not passed); else [`place`]d. A community no node can
/// take (all gone or draining) stays with a live draining owner, or has
/// none.
pub fn assign<'a>(
    communities: impl IntoIterator<Item = u32>,
    nodes: &[Candidate<'a>],
    current: &BTreeMap<u32, String>,
    holds: impl Fn(u32, &str) -> bool,
) -> BTreeMap<u32, Option<&'a str>> {
    let live = |name: &str| nodes.iter().find(|n| n.name == name);
    communities
        .into_iter()
        .map(|c| {
            let now = current.get(&c).and_then(|o| live(o));
            let owner = match now {
                Some(n) if !n.draining || holds(c, n.name) => Some(n.name),
                _ => place(c, nodes).or(now.map(|n| n.name)),
            };
            (c, owner)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes<'a>(w: &[(&'a str, u32)]) -> Vec<Candidate<'a>> {
        w.iter()
            .map(|&(name, weight)| Candidate {
                name,
                weight,
                draining: false,
            })
            .collect()
    }

    fn shares(n: &[Candidate], count: u32) -> BTreeMap<String, u32> {
        let mut s = BTreeMap::new();
        for c in 0..count {
            *s.entry(place(c, n).unwrap().to_string()).or_insert(0) += 1;
        }
        s
    }

    #[test]
    fn weights_set_the_shares() {
        let n = nodes(&[("n1", 100), ("n2", 200), ("n3", 100)]);
        let s = shares(&n, 100_000);
        for (name, want) in [("n1", 25_000.0), ("n2", 50_000.0), ("n3", 25_000.0)] {
            let got = f64::from(s[name]);
            assert!(
                (got - want).abs() < want * 0.03,
                "{name}: {got} of 100000, want {want}"
            );
        }
    }

    #[test]
    fn placement_is_the_same_whatever_the_order_of_the_nodes() {
        let a = nodes(&[("n1", 1), ("n2", 1), ("n3", 1)]);
        let b = nodes(&[("n3", 1), ("n1", 1), ("n2", 1)]);
        for c in 0..10_000 {
            assert_eq!(place(c, &a), place(c, &b), "community {c}");
        }
    }

    #[test]
    fn losing_a_node_moves_only_its_communities_by_score_alone() {
        let all = nodes(&[("n1", 1), ("n2", 1), ("n3", 1), ("n4", 1)]);
        let without = nodes(&[("n1", 1), ("n2", 1), ("n4", 1)]);
        let mut moved = 0;
        for c in 0..40_000 {
            let (before, after) = (place(c, &all).unwrap(), place(c, &without).unwrap());
            if before == "n3" {
                moved += 1;
            } else {
                assert_eq!(
                    before, after,
                    "community {c} moved from {before} though n3 left"
                );
            }
        }
        assert!(
            (9_000..11_000).contains(&moved),
            "{moved} of 40000 were n3's"
        );
    }

    #[test]
    fn weight_zero_and_draining_nodes_take_nothing() {
        let mut n = nodes(&[("n1", 1), ("n2", 0), ("n3", 1)]);
        n[2].draining = true;
        for c in 0..1000 {
            assert_eq!(place(c, &n), Some("n1"));
        }
        n[0].draining = true;
        assert_eq!(place(7, &n), None);
    }

    #[test]
    fn owners_stay_while_alive_and_orphans_spread_over_the_rest() {
        let three = nodes(&[("n1", 1), ("n2", 1), ("n3", 1)]);
        let first = assign(0..30_000, &three, &BTreeMap::new(), |_, _| false);
        let current: BTreeMap<u32, String> = first
            .iter()
            .map(|(&c, o)| (c, o.unwrap().to_string()))
            .collect();
        // A fourth node joins: nothing moves.
        let four = nodes(&[("n1", 1), ("n2", 1), ("n3", 1), ("n4", 1)]);
        let joined = assign(0..30_000, &four, &current, |_, _| false);
        assert!(joined.iter().all(|(c, o)| o.unwrap() == current[c]));
        // n2 dies: only its communities move, about half to each survivor.
        let two = nodes(&[("n1", 1), ("n3", 1)]);
        let after = assign(0..30_000, &two, &current, |_, _| false);
        let mut to = BTreeMap::new();
        for (c, o) in &after {
            let o = o.unwrap();
            if current[c] == "n2" {
                *to.entry(o).or_insert(0) += 1;
            } else {
                assert_eq!(o, current[c], "community {c} moved though its owner lives");
            }
        }
        let orphans: u32 = to.values().sum();
        assert!((9_000..11_000).contains(&orphans), "{orphans} orphans");
        for (node, n) in &to {
            let share = f64::from(*n) / f64::from(orphans);
            assert!(
                (0.45..0.55).contains(&share),
                "{node} took {share:.2} of the orphans"
            );
        }
    }

    #[test]
    fn a_draining_node_gives_up_its_communities_unless_no_one_can_take_them() {
        let mut n = nodes(&[("n1", 1), ("n2", 1)]);
        let current: BTreeMap<u32, String> = (0..100).map(|c| (c, "n2".to_string())).collect();
        n[1].draining = true;
        assert!(
            assign(0..100, &n, &current, |_, _| false)
                .values()
                .all(|o| *o == Some("n1"))
        );
        n[0].draining = true;
        assert!(
            assign(0..100, &n, &current, |_, _| false)
                .values()
                .all(|o| *o == Some("n2"))
        );
        // Its owner gone and no one to take it: no owner.
        assert_eq!(assign([5], &n[..1], &current, |_, _| false)[&5], None);
    }

    #[test]
    fn a_draining_node_keeps_what_it_still_holds() {
        let mut n = nodes(&[("n1", 1), ("n2", 1)]);
        n[1].draining = true;
        let current: BTreeMap<u32, String> = (0..100).map(|c| (c, "n2".to_string())).collect();
        // n2 still has flows in the even ones.
        let a = assign(0..100, &n, &current, |c, node| node == "n2" && c % 2 == 0);
        for (c, o) in a {
            assert_eq!(o, Some(if c % 2 == 0 { "n2" } else { "n1" }), "{c}");
        }
        // Holding means nothing to a node that is not its owner.
        let none: BTreeMap<u32, String> = BTreeMap::new();
        let a = assign(0..100, &n, &none, |_, _| true);
        assert!(a.values().all(|o| *o == Some("n1")));
    }
}
