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

/// A child could not be reached: the fastest of its share takes its place
/// and the failed one takes the promoted one's place at the head of the
/// share (the seed's T8/T17 swap), so it is tried once more, lower in the
/// tree. None when the share is empty: the child is left out.
pub fn promote<T>(failed: Assignment<T>) -> Option<Assignment<T>> {
    let mut share = failed.share.into_iter();
    let target = share.next()?;
    Some(Assignment {
        target,
        share: std::iter::once(failed.target).chain(share).collect(),
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
        let p = promote(t2[1].clone()).unwrap();
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
            promote(Assignment {
                target: 1,
                share: vec![]
            }),
            None
        );
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
