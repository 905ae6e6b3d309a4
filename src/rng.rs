//! SplitMix64: a tiny, fully specified pseudo-random generator. Every peer on every
//! platform draws the same numbers from the same seed, which is what the NoLoCo pairing
//! (all peers agree without talking) and seeded fault schedules (a run repeats from its
//! seed) need, and what a general-purpose generator does not promise across versions.

/// The generator's state; `SplitMix64(seed)` starts a stream.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), by rejection: no modulo bias.
    pub fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }

    /// Uniform in `[0, 1)`.
    // Only the relay and the churn, both behind `testing`, draw floats.
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_the_published_one() {
        // The reference values of SplitMix64 from seed 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut r = SplitMix64(7);
        assert!((0..1000).all(|_| r.below(3) < 3 && (0.0..1.0).contains(&r.unit())));
    }
}
