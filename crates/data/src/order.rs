//! The order in which an epoch visits the samples: a pure function of (seed, epoch).

use dtrain_nn::rng::Stream;

/// A Fisher-Yates permutation of `0..n` for `epoch`; identity when not shuffling.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize, shuffle: bool) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    if shuffle {
        let mut rng = Stream::new(seed, 0x2_0000_0000 + epoch);
        for i in (1..n).rev() {
            let j = rng.below(i as u32 + 1) as usize;
            p.swap(i, j);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_reproducible_and_differ_by_epoch() {
        let a = epoch_permutation(42, 0, 1000, true);
        assert_eq!(a, epoch_permutation(42, 0, 1000, true));
        assert_ne!(a, epoch_permutation(42, 1, 1000, true));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(epoch_permutation(42, 0, 3, false), [0, 1, 2]);
    }
}
