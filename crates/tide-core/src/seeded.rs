//! [`SplitMix64`]: the one seeded generator behind every simulation, seeded
//! fault and randomized test in tide.
//!
//! It is not randomness: the seed is an argument and the sequence is a plain
//! function of it, so a failing run replays exactly from its printed seed.
//! Not for anything secret.

/// splitmix64 (Steele, Lea and Flood): small, fast, and good enough to pick
/// faults and operations. The same seed gives the same sequence on every
/// platform and in every build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose sequence is fixed by `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value of the sequence.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n`.
    ///
    /// # Panics
    /// If `n` is zero.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// An index in `0..n`.
    ///
    /// # Panics
    /// If `n` is zero.
    pub fn index(&mut self, n: usize) -> usize {
        let n = u64::try_from(n).expect("a usize fits in u64");
        usize::try_from(self.below(n)).expect("a value below a usize fits in usize")
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn the_sequence_is_splitmix64() {
        // The published first outputs of splitmix64 seeded with 0: a seed
        // printed by an old run must keep replaying the same run.
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(g.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn below_and_index_stay_in_range() {
        let mut g = SplitMix64::new(42);
        for n in 1..200u64 {
            assert!(g.below(n) < n);
            assert!(g.index(usize::try_from(n).unwrap()) < usize::try_from(n).unwrap());
        }
        assert!(!(0..100).any(|_| g.chance(0)));
        assert!((0..100).all(|_| g.chance(100)));
    }
}
