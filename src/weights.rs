//! Smooth weighted round-robin, as nginx does it, precomputed into a schedule.
//!
//! nginx's algorithm: every turn, each key's current weight grows by its weight; the key
//! with the largest current weight is chosen and its current weight drops by the total.
//! Over `sum(weights)` turns each key is chosen exactly `weight` times, interleaved (5, 1,
//! 1 gives `a a b a c a a`, not `a a a a a b c`). The sequence is periodic, so the pool
//! computes one period when keys are loaded and walks it with its lock-free cursor.

/// The most turns a schedule may have; larger weight sums are scaled down to fit.
const MAX_TURNS: u64 = 65_536;

/// One period of smooth weighted round-robin over `weights` (indices into `weights`), or
/// `None` when every weight is 1 (plain rotation needs no schedule).
pub(crate) fn schedule(weights: &[u32]) -> Option<Box<[u32]>> {
    if weights.iter().all(|&w| w == 1) {
        return None;
    }
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let scale = total.div_ceil(MAX_TURNS).max(1);
    let weights: Vec<i64> = weights
        .iter()
        .map(|&w| (u64::from(w) / scale).max(1) as i64)
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut turns = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        // The first of the largest wins ties, as in nginx.
        let (best, _) =
            current.iter().enumerate().fold(
                (0, i64::MIN),
                |(bi, bc), (i, &c)| if c > bc { (i, c) } else { (bi, bc) },
            );
        current[best] -= total;
        turns.push(best as u32);
    }
    Some(turns.into_boxed_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_nginx_smooth_sequence() {
        let turns = schedule(&[5, 1, 1]).unwrap();
        assert_eq!(&*turns, &[0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn each_key_gets_its_weight_per_period() {
        let weights = [3, 1, 4, 1, 5];
        let turns = schedule(&weights).unwrap();
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(
                turns.iter().filter(|&&t| t as usize == i).count(),
                w as usize
            );
        }
    }

    #[test]
    fn equal_weights_need_no_schedule_and_huge_sums_fit() {
        assert!(schedule(&[1, 1, 1]).is_none());
        assert!(schedule(&[u32::MAX, 1]).unwrap().len() <= 2 * MAX_TURNS as usize);
    }
}
