//! Weighted round-robin: turns per-link weights into a slot sequence that
//! the datapath walks with a counter (O(1) per packet; a weight change is one
//! map write).
//!
//! The sequence is interleaved by rounds: round `r` visits, in order, every
//! link whose weight is at least `r`. Weights A=2, B=1, C=2 give
//! A, B, C, A, C, so no link gets a burst while another idles.

use crate::maps::{MAX_SLOTS, Schedule};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedError {
    /// More links with a non-zero weight than there are slots.
    TooManyLinks,
}

/// Builds the schedule for `(link, weight)` pairs, in the given order.
/// Zero weights are left out; all-zero gives an empty schedule. Weights are
/// reduced by their common divisor and, if they still need more than
/// [`MAX_SLOTS`] slots, scaled down proportionally (each keeps at least one).
pub fn build(links: &[(u16, u32)], out: &mut Schedule) -> Result<(), SchedError> {
    *out = Schedule::EMPTY;
    let mut ids = [0u16; MAX_SLOTS];
    let mut w = [0u32; MAX_SLOTS];
    let mut n = 0usize;
    for &(id, weight) in links {
        if weight == 0 {
            continue;
        }
        if n == MAX_SLOTS {
            return Err(SchedError::TooManyLinks);
        }
        ids[n] = id;
        w[n] = weight;
        n += 1;
    }
    let (ids, w) = (&ids[..n], &mut w[..n]);
    if n == 0 {
        return Ok(());
    }
    let g = w.iter().copied().fold(0, gcd);
    w.iter_mut().for_each(|x| *x /= g);
    scale_to_fit(w);

    let max = w.iter().copied().max().unwrap_or(0);
    let mut len = 0usize;
    for round in 1..=max {
        for (id, &weight) in ids.iter().zip(w.iter()) {
            if weight >= round {
                out.slots[len] = *id;
                len += 1;
            }
        }
    }
    out.len = len as u32;
    Ok(())
}

/// Scales weights so they sum to at most `MAX_SLOTS`, each at least 1,
/// by largest remainder.
fn scale_to_fit(w: &mut [u32]) {
    let total: u64 = w.iter().map(|&x| u64::from(x)).sum();
    if total <= MAX_SLOTS as u64 {
        return;
    }
    let budget = MAX_SLOTS as u64;
    let mut rem = [0u64; MAX_SLOTS];
    let mut sum = 0u64;
    for (i, x) in w.iter_mut().enumerate() {
        let exact = u64::from(*x) * budget;
        let q = (exact / total).max(1);
        rem[i] = exact % total;
        *x = q as u32;
        sum += q;
    }
    // Hand out what is left to the largest remainders...
    while sum < budget {
        let Some(i) = (0..w.len()).max_by_key(|&i| rem[i]) else {
            break;
        };
        if rem[i] == 0 {
            break;
        }
        w[i] += 1;
        rem[i] = 0;
        sum += 1;
    }
    // ...or take back what the minimum of one pushed over, from the largest.
    while sum > budget {
        let Some(i) = (0..w.len()).max_by_key(|&i| w[i]) else {
            break;
        };
        if w[i] <= 1 {
            break;
        }
        w[i] -= 1;
        sum -= 1;
    }
}

const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(links: &[(u16, u32)]) -> Vec<u16> {
        let mut s = Schedule::EMPTY;
        build(links, &mut s).unwrap();
        s.slots[..s.len as usize].to_vec()
    }

    #[test]
    fn seed_vector_a2_b1_c2() {
        const A: u16 = 0;
        const B: u16 = 1;
        const C: u16 = 2;
        assert_eq!(seq(&[(A, 2), (B, 1), (C, 2)]), vec![A, B, C, A, C]);
    }

    #[test]
    fn common_divisor_is_removed() {
        assert_eq!(seq(&[(1, 10), (2, 20), (3, 30)]), vec![1, 2, 3, 2, 3, 3]);
    }

    #[test]
    fn zero_weights_are_left_out() {
        assert_eq!(seq(&[(1, 0), (2, 5), (3, 0)]), vec![2]);
        assert!(seq(&[(1, 0)]).is_empty());
        assert!(seq(&[]).is_empty());
    }

    #[test]
    fn large_weights_are_scaled_proportionally() {
        let s = seq(&[(1, 1000), (2, 3000), (3, 1)]);
        assert!(s.len() <= MAX_SLOTS);
        let count = |id| s.iter().filter(|&&x| x == id).count() as f64;
        assert!(
            (count(2) / count(1) - 3.0).abs() < 0.05,
            "{} {}",
            count(1),
            count(2)
        );
        assert_eq!(count(3), 1.0, "a tiny weight keeps one slot");
    }

    #[test]
    fn too_many_links_is_an_error() {
        let links: Vec<(u16, u32)> = (0..=MAX_SLOTS as u16).map(|i| (i, 1)).collect();
        let mut s = Schedule::EMPTY;
        assert_eq!(build(&links, &mut s), Err(SchedError::TooManyLinks));
        assert_eq!(build(&links[..MAX_SLOTS], &mut s), Ok(()));
        assert_eq!(s.len as usize, MAX_SLOTS);
    }

    proptest::proptest! {
        #[test]
        fn every_link_gets_its_share(weights in proptest::collection::vec(0u32..5000, 1..20)) {
            let links: Vec<(u16, u32)> = weights.iter().enumerate().map(|(i, &w)| (i as u16, w)).collect();
            let s = seq(&links);
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            proptest::prop_assert!(s.len() <= MAX_SLOTS);
            for (id, &w) in weights.iter().enumerate() {
                let got = s.iter().filter(|&&x| x == id as u16).count();
                if w == 0 {
                    proptest::prop_assert_eq!(got, 0);
                } else {
                    proptest::prop_assert!(got >= 1);
                    // Within one slot of the exact share, plus what the minimum of one slot
                    // per link may take from the others.
                    let want = w as f64 / total as f64 * s.len() as f64;
                    proptest::prop_assert!((got as f64 - want).abs() <= 1.0 + weights.len() as f64,
                        "link {} weight {} got {} want {:.2}", id, w, got, want);
                }
            }
        }
    }
}
