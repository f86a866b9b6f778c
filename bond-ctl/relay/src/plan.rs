//! Who sends to whom (US 8,495,167, FIG. 4): targets ranked fastest first
//! are dealt to `fanout` children, each child relaying to the next
//! `fanout` of its share, and so on down.
//!
//! The sender keeps the first `fanout` of its ranked list as children and
//! deals the rest round-robin among them, so every child's share is
//! interleaved: with a fanout of 3 and targets T1..T39, the main server
//! sends to T1, T2 and T3; T1's share is T4, T7, .., T37; T1 in turn sends
//! to T4, T7 and T10, whose shares are T13/T22/T31, T16/T25/T34 and
//! T19/T28/T37. The fastest terminals sit near the root and every subtree
//! gets a fair mix of the slower ones.

/// One child of a sender: the target, and the share it relays to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment<T> {
    pub target: T,
    pub share: Vec<T>,
}

/// Deals `ranked` (fastest first) among `fanout` children (at least 1).
pub fn split<T: Clone>(ranked: &[T], fanout: usize) -> Vec<Assignment<T>> {
    let n = fanout.max(1).min(ranked.len());
    let (children, rest) = ranked.split_at(n);
    children
        .iter()
        .enumerate()
        .map(|(j, t)| Assignment {
            target: t.clone(),
            share: rest.iter().skip(j).step_by(n).cloned().collect(),
        })
        .collect()
}

/// Deals `ranked` to `fanout` children breadth first: the list is a tree
/// in level order, each level cut into one block per child, so the first
/// children's subtrees fill before the next ones get any. Inner nodes are
/// then exactly the head of the list, each with `fanout` children (one
/// maybe fewer); [`split`] instead evens out the subtrees and ends with
/// more inner nodes, each with fewer children. Striped trees are dealt
/// this way.
pub fn split_filled<T: Clone>(ranked: &[T], fanout: usize) -> Vec<Assignment<T>> {
    let f = fanout.max(1);
    let n = f.min(ranked.len());
    let mut out: Vec<Assignment<T>> = ranked[..n]
        .iter()
        .map(|t| Assignment {
            target: t.clone(),
            share: Vec::new(),
        })
        .collect();
    // Below the children, level L (1-based) holds fanout^L nodes, fanout^(L-1)
    // under each child.
    let (mut at, mut block) = (n, f);
    while at < ranked.len() {
        for a in &mut out {
            let end = (at + block).min(ranked.len());
            a.share.extend_from_slice(&ranked[at..end]);
            at = end;
        }
        block = block.saturating_mul(f);
    }
    out
}

/// Striped trees: the file is cut into `k` stripes (chunk `i` belongs to
/// stripe `i mod k`) and each stripe flows down a tree of its own, dealt
/// with [`split_filled`] and a fanout of `k`. Stripe `j`'s list starts
/// with the targets ranked `j`, `j + k`, `j + 2k`, .. (about a `k`-th of
/// them, as many as a filled tree has inner nodes) and ends with the rest,
/// the slowest first. So each target is an inner node, with `k` children,
/// of one tree and a leaf of the others: it receives `k` stripes and
/// sends one stripe `k` times, about one file's worth, where an inner node
/// of a single tree sends the whole file `fanout` times. The main server
/// sends the file once, a stripe to the head of each tree.
///
/// What the main server sends: one assignment per stripe (fewer when
/// there are fewer targets than `k`).
pub fn stripes<T: Clone>(ranked: &[T], k: usize) -> Vec<Assignment<T>> {
    let k = k.max(1).min(ranked.len());
    (0..k)
        .map(|j| {
            let mine = ranked.iter().skip(j).step_by(k);
            let rest = ranked
                .iter()
                .enumerate()
                .rev()
                .filter(|(p, _)| p % k != j)
                .map(|(_, t)| t);
            let mut order = mine.chain(rest).cloned();
            Assignment {
                target: order.next().expect("k <= ranked.len()"),
                share: order.collect(),
            }
        })
        .collect()
}

/// A child could not be reached: the fastest of its share takes its place
/// and the failed one takes the promoted one's place at the head of the
/// share (the seed's T8/T17 swap), so it is tried once more, lower in the
/// tree. `failed` holds the targets this sender has given up on once: one
/// that fails a second time is left out, or two unreachable targets would
/// swap places forever. None when no one is left to try.
pub fn promote<T: Clone + PartialEq>(
    a: Assignment<T>,
    failed: &mut Vec<T>,
) -> Option<Assignment<T>> {
    let again = failed.contains(&a.target);
    if !again {
        failed.push(a.target.clone());
    }
    let mut share = a.share.into_iter();
    let target = share.next()?;
    let back = (!again).then_some(a.target);
    Some(Assignment {
        target,
        share: back.into_iter().chain(share).collect(),
    })
}

/// Levels below the root a tree of `n` targets with `fanout` has: the
/// hops the last chunk takes.
pub fn depth(n: usize, fanout: usize) -> usize {
    let f = fanout.max(1);
    let (mut depth, mut reach, mut level) = (0, 0usize, 1usize);
    while reach < n {
        level = level.saturating_mul(f);
        reach = reach.saturating_add(level);
        depth += 1;
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(range: impl IntoIterator<Item = usize>) -> Vec<String> {
        range.into_iter().map(|i| format!("T{i}")).collect()
    }

    /// The test vector (the seed's FIG. 4).
    #[test]
    fn fig4_fanout_3_of_39() {
        let all = t(1..=39);
        let top = split(&all, 3);
        assert_eq!(
            top.iter().map(|a| a.target.as_str()).collect::<Vec<_>>(),
            ["T1", "T2", "T3"]
        );
        assert_eq!(top[0].share, t((4..=37).step_by(3)));
        assert_eq!(top[1].share, t((5..=38).step_by(3)));
        assert_eq!(top[2].share, t((6..=39).step_by(3)));
        let t1 = split(&top[0].share, 3);
        assert_eq!(
            t1,
            [
                Assignment {
                    target: "T4".into(),
                    share: t([13, 22, 31])
                },
                Assignment {
                    target: "T7".into(),
                    share: t([16, 25, 34])
                },
                Assignment {
                    target: "T10".into(),
                    share: t([19, 28, 37])
                },
            ]
        );
    }

    /// Every target is reached exactly once, whatever the sizes.
    #[test]
    fn every_target_once() {
        for n in 0..80 {
            for fanout in 1..6 {
                let all: Vec<usize> = (0..n).collect();
                let mut seen = Vec::new();
                let mut stack = vec![all];
                while let Some(list) = stack.pop() {
                    for a in split(&list, fanout) {
                        assert!(split(&list, fanout).len() <= fanout);
                        seen.push(a.target);
                        stack.push(a.share);
                    }
                }
                seen.sort_unstable();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n} fanout {fanout}");
                let filled = Assignment {
                    target: n,
                    share: (0..n).collect(),
                };
                let kids = children(n + 1, &[filled], split_filled, fanout);
                // Filled: every inner node but the last has `fanout` children.
                let partial = kids.iter().filter(|&&c| c > 0 && c < fanout).count();
                assert!(partial <= 1, "n {n} fanout {fanout}: {kids:?}");
            }
        }
    }

    /// The seed's T8/T17 swap: T8 cannot be reached, T17 takes its place
    /// and T8 goes to the head of T17's share.
    #[test]
    fn promotion_swaps_the_failed_with_the_fastest_of_its_share() {
        let top = split(&t(1..=39), 3);
        let t2 = split(&top[1].share, 3);
        assert_eq!(
            t2[1],
            Assignment {
                target: "T8".into(),
                share: t([17, 26, 35])
            }
        );
        let p = promote(t2[1].clone(), &mut vec![]).unwrap();
        assert_eq!(
            p,
            Assignment {
                target: "T17".into(),
                share: t([8, 26, 35])
            }
        );
        // T17 sends to T8, T26 and T35: T8 gets a second chance, as a leaf.
        assert!(split(&p.share, 3).iter().all(|a| a.share.is_empty()));
        // A leaf that cannot be reached has no one to promote.
        assert_eq!(
            promote(
                Assignment {
                    target: 1,
                    share: vec![]
                },
                &mut vec![]
            ),
            None
        );
    }

    /// Every target unreachable, as when each port refuses: the sender
    /// tries each at most twice and gives up, rather than swapping two of
    /// them forever.
    #[test]
    fn promotion_ends_when_no_one_can_be_reached() {
        for n in 1..6 {
            let mut a = Some(Assignment {
                target: 0,
                share: (1..n).collect(),
            });
            let (mut failed, mut tries) = (vec![], vec![0; n]);
            let mut posts = 0;
            while let Some(x) = a {
                tries[x.target] += 1;
                posts += 1;
                assert!(posts <= 2 * n, "{n} targets: {posts} posts, {tries:?}");
                a = promote(x, &mut failed);
            }
            assert!(
                tries.iter().all(|&t| (1..=2).contains(&t)),
                "{n} targets: {tries:?}"
            );
        }
    }

    /// Children of each target, over the trees under `heads` (dealt with
    /// `fanout`); panics if a tree reaches a target twice or misses one.
    fn children(
        n: usize,
        heads: &[Assignment<usize>],
        deal: fn(&[usize], usize) -> Vec<Assignment<usize>>,
        fanout: usize,
    ) -> Vec<usize> {
        let mut kids = vec![0; n];
        for head in heads {
            let mut seen = vec![head.target];
            let mut stack = vec![(head.target, head.share.clone())];
            while let Some((parent, list)) = stack.pop() {
                for a in deal(&list, fanout) {
                    kids[parent] += 1;
                    seen.push(a.target);
                    stack.push((a.target, a.share));
                }
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n {n}");
        }
        kids
    }

    /// Breadth first: the first three are the children, the next level
    /// goes in blocks of three, the one after in blocks of nine; a level
    /// too short for every child fills the first ones.
    #[test]
    fn filled_deals_level_by_level() {
        let all = t(1..=16);
        let top = split_filled(&all, 3);
        assert_eq!(
            top.iter().map(|a| a.target.as_str()).collect::<Vec<_>>(),
            ["T1", "T2", "T3"]
        );
        // Level 3 has room for nine under each child: T1 takes all four.
        assert_eq!(top[0].share, t([4, 5, 6, 13, 14, 15, 16]));
        assert_eq!(top[1].share, t([7, 8, 9]));
        assert_eq!(top[2].share, t([10, 11, 12]));
        // T1's share is its own subtree in level order again.
        let t1 = split_filled(&top[0].share, 3);
        assert_eq!(t1[0].share, t([13, 14, 15]));
        assert_eq!(t1[1].share, t([16]));
        assert!(t1[2].share.is_empty());
        let short = split_filled(&t(1..=5), 3);
        assert_eq!(short[0].share, t([4, 5]));
        assert!(short[1].share.is_empty());
    }

    /// Each stripe reaches every target once, each tree is headed by a
    /// different one of the fastest, and the upload is spread: no target
    /// has more than k children over all the trees, so none sends more
    /// than one file's worth (k children of a k-th), where the inner
    /// nodes of a single tree send the whole file `fanout` times.
    #[test]
    fn stripes_reach_everyone_and_share_the_upload() {
        for k in 2..5 {
            for n in k..80 {
                let ranked: Vec<usize> = (0..n).collect();
                let heads = stripes(&ranked, k);
                assert_eq!(
                    heads.iter().map(|a| a.target).collect::<Vec<_>>(),
                    (0..k).collect::<Vec<_>>()
                );
                let kids = children(n, &heads, split_filled, k);
                let most = kids.iter().max().copied().unwrap_or(0);
                assert!(most <= k, "n {n} k {k}: a target has {most} children");
            }
        }
        // Fewer targets than stripes: one stripe each.
        assert_eq!(stripes(&[7, 8], 3).len(), 2);
        assert!(stripes::<u8>(&[], 3).is_empty());
    }

    #[test]
    fn depths() {
        assert_eq!(depth(0, 3), 0);
        assert_eq!(depth(1, 3), 1);
        assert_eq!(depth(3, 3), 1);
        assert_eq!(depth(4, 3), 2);
        assert_eq!(depth(12, 3), 2);
        assert_eq!(depth(13, 3), 3);
        assert_eq!(depth(39, 3), 3);
        assert_eq!(depth(30, 1), 30);
        assert_eq!(depth(30, 2), 4);
    }
}
