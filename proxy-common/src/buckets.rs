//! The one bucket grid of every latency histogram the proxy exports, kernel and application
//! alike, so that their quantiles compare and every SLO threshold is an exact bucket bound.
//!
//! Bounds are whole microseconds on a log2 scale. The **fine** scale splits each octave into
//! 8 linear sub-buckets: 1, 2, …, 8 µs, then for each octave `[2^k, 2^(k+1))` µs,
//! k = 3..=25, the bounds `2^k + (j + 1)·2^(k-3)`, j = 0..8 (9, 10, …, 16, 18, …, 32, 36, …),
//! up to 2^26 µs = 67.108864 s: 192 finite bounds and +Inf. Adjacent bounds are at most 12.5%
//! apart above 8 µs. The **coarse** scale keeps only the octave bounds 2^b µs, b = 0..=30
//! (1 µs to ~35.8 min) and +Inf: for histograms that exist per backend (up to
//! [`MAX_BACKENDS`](crate::MAX_BACKENDS) of them) or measure long lifetimes. Every coarse
//! bound up to 2^26 µs is also a fine bound.
//!
//! A value falls in the smallest bucket whose bound is ≥ it (Prometheus' `le`): from
//! nanoseconds, `us = (ns - 1) / 1000` (0 ns → the first bucket), and whole `us` in
//! `[lo, hi)` goes to the bucket whose bound is `hi`. The bucket functions are written with
//! shifts and compares: BPF has no count-leading-zeros instruction.

/// Buckets of the fine scale: 192 finite bounds and the open-ended last one (+Inf).
pub const FINE_BUCKETS: u32 = 193;
/// Buckets of the coarse scale: 31 finite bounds (2^0..=2^30 µs) and +Inf.
pub const COARSE_BUCKETS: u32 = 32;
/// Sub-buckets per octave of the fine scale (a power of two).
const SUB_BUCKETS: u32 = 8;
/// log2 of [`SUB_BUCKETS`].
const SUB_BITS: u32 = 3;
/// The fine scale's last finite bound, in µs (67.108864 s).
const FINE_LAST_US: u64 = 1 << 26;

/// Which grid a histogram uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// 8 buckets per octave, 1 µs to 67.108864 s.
    Fine,
    /// One bucket per octave, 1 µs to ~35.8 min.
    Coarse,
}

impl Scale {
    /// Number of buckets, the open-ended last one included.
    pub const fn buckets(self) -> u32 {
        match self {
            Scale::Fine => FINE_BUCKETS,
            Scale::Coarse => COARSE_BUCKETS,
        }
    }

    /// The bucket of a duration in nanoseconds.
    pub const fn bucket_of_ns(self, ns: u64) -> u32 {
        match self {
            Scale::Fine => fine_bucket_of_ns(ns),
            Scale::Coarse => coarse_bucket_of_ns(ns),
        }
    }

    /// Upper bound of `bucket` in whole microseconds; `u64::MAX` for the last (+Inf) one.
    pub const fn upper_bound_us(self, bucket: u32) -> u64 {
        match self {
            Scale::Fine => fine_bucket_upper_bound_us(bucket),
            Scale::Coarse => coarse_bucket_upper_bound_us(bucket),
        }
    }

    /// The finite bounds in seconds, in order: the `buckets` of a Prometheus histogram (which
    /// adds +Inf itself).
    pub fn finite_bounds_seconds(self) -> impl Iterator<Item = f64> {
        (0..self.buckets() - 1).map(move |bucket| self.upper_bound_seconds(bucket))
    }

    /// Upper bound of `bucket` in seconds (the `le` of a Prometheus bucket); infinite for the
    /// last one. Computed as whole µs / 1e6, so bounds print exactly (`0.262144`).
    pub fn upper_bound_seconds(self, bucket: u32) -> f64 {
        match self.upper_bound_us(bucket) {
            u64::MAX => f64::INFINITY,
            us => us as f64 / 1e6,
        }
    }
}

/// The fine bucket of a duration in nanoseconds (see the module documentation).
pub const fn fine_bucket_of_ns(ns: u64) -> u32 {
    let us = whole_us_below(ns);
    if us < SUB_BUCKETS as u64 {
        // 0..8 µs: one bucket per microsecond, bound us + 1.
        return us as u32;
    }
    if us >= FINE_LAST_US {
        return FINE_BUCKETS - 1;
    }
    // us in [2^k, 2^(k+1)), k in 3..=25; sub-bucket j = (us - 2^k) / 2^(k-3).
    let k = floor_log2(us);
    let j = ((us - (1 << k)) >> (k - SUB_BITS)) as u32;
    SUB_BUCKETS + (k - SUB_BITS) * SUB_BUCKETS + j
}

/// The coarse (log2) bucket of a duration in nanoseconds: bucket `b` has bound 2^b µs.
pub const fn coarse_bucket_of_ns(ns: u64) -> u32 {
    let us = whole_us_below(ns);
    if us == 0 {
        return 0;
    }
    // us in [2^(b-1), 2^b) goes to bucket b.
    let bucket = floor_log2(us) + 1;
    if bucket >= COARSE_BUCKETS {
        COARSE_BUCKETS - 1
    } else {
        bucket
    }
}

/// Upper bound of fine bucket `bucket` in µs; `u64::MAX` for the last one and beyond.
pub const fn fine_bucket_upper_bound_us(bucket: u32) -> u64 {
    if bucket >= FINE_BUCKETS - 1 {
        return u64::MAX;
    }
    if bucket < SUB_BUCKETS {
        return bucket as u64 + 1;
    }
    let k = SUB_BITS + (bucket - SUB_BUCKETS) / SUB_BUCKETS;
    let j = (bucket - SUB_BUCKETS) % SUB_BUCKETS;
    (1 << k) + ((j as u64 + 1) << (k - SUB_BITS))
}

/// Upper bound of coarse bucket `bucket` in µs (2^b); `u64::MAX` for the last one and beyond.
pub const fn coarse_bucket_upper_bound_us(bucket: u32) -> u64 {
    if bucket >= COARSE_BUCKETS - 1 {
        u64::MAX
    } else {
        1 << bucket
    }
}

/// Upper bound in seconds of fine bucket `bucket` (infinite for the last one).
pub fn fine_bucket_upper_bound_seconds(bucket: u32) -> f64 {
    Scale::Fine.upper_bound_seconds(bucket)
}

/// Upper bound in seconds of coarse bucket `bucket` (infinite for the last one).
pub fn coarse_bucket_upper_bound_seconds(bucket: u32) -> f64 {
    Scale::Coarse.upper_bound_seconds(bucket)
}

/// The whole microseconds strictly below `ns` nanoseconds: `(ns - 1) / 1000`, 0 for 0, so
/// that a value of exactly `n` µs counts in the bucket whose bound is `n`.
const fn whole_us_below(ns: u64) -> u64 {
    if ns == 0 { 0 } else { (ns - 1) / 1000 }
}

/// floor(log2(x)) for x ≥ 1, by halving the search range (no clz in BPF).
const fn floor_log2(mut x: u64) -> u32 {
    let mut bits = 0u32;
    if x >= 1 << 32 {
        x >>= 32;
        bits += 32;
    }
    if x >= 1 << 16 {
        x >>= 16;
        bits += 16;
    }
    if x >= 1 << 8 {
        x >>= 8;
        bits += 8;
    }
    if x >= 1 << 4 {
        x >>= 4;
        bits += 4;
    }
    if x >= 1 << 2 {
        x >>= 2;
        bits += 2;
    }
    if x >= 1 << 1 {
        bits += 1;
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCALES: [Scale; 2] = [Scale::Fine, Scale::Coarse];

    fn check(scale: Scale, ns: u64, expected_bound_us: u64) {
        let bucket = scale.bucket_of_ns(ns);
        assert_eq!(
            scale.upper_bound_us(bucket),
            expected_bound_us,
            "{scale:?}: {ns} ns went to bucket {bucket}"
        );
    }

    #[test]
    fn values_go_to_the_smallest_bound_at_or_above_them() {
        use Scale::{Coarse, Fine};
        check(Fine, 0, 1);
        check(Fine, 1, 1);
        check(Fine, 1_000, 1);
        check(Fine, 1_001, 2);
        check(Fine, 8_000, 8);
        check(Fine, 8_001, 9);
        check(Fine, 9_500, 10);
        check(Fine, 16_001, 18);
        check(Fine, 20_000, 20);
        check(Fine, 45_000, 48);
        check(Fine, 250_000_000, 262_144);
        check(Fine, 262_144_000, 262_144);
        check(Fine, 262_144_001, 294_912);
        check(Fine, 4_096_000, 4_096);
        check(Fine, 67_108_864_000, 67_108_864);
        check(Fine, 67_108_864_001, u64::MAX);
        check(Fine, u64::MAX, u64::MAX);
        check(Coarse, 0, 1);
        check(Coarse, 1_000, 1);
        check(Coarse, 1_001, 2);
        check(Coarse, 2_000, 2);
        check(Coarse, 1_000_000, 1_024);
        check(Coarse, 1_000_000_000, 1 << 20);
        check(Coarse, (1 << 30) * 1_000, 1 << 30);
        check(Coarse, (1 << 30) * 1_000 + 1, u64::MAX);
        check(Coarse, u64::MAX, u64::MAX);
    }

    /// Every value lands in a bucket whose bound is ≥ it and whose previous bound is < it.
    fn assert_placed(scale: Scale, ns: u64) {
        let bucket = scale.bucket_of_ns(ns);
        assert!(
            bucket < scale.buckets(),
            "{scale:?}: {ns} ns: bucket {bucket}"
        );
        let bound = scale.upper_bound_us(bucket);
        assert!(
            bound == u64::MAX || u128::from(ns) <= u128::from(bound) * 1000,
            "{scale:?}: {ns} ns above its bound {bound} µs"
        );
        if bucket > 0 {
            let below = scale.upper_bound_us(bucket - 1);
            assert!(
                u128::from(ns) > u128::from(below) * 1000,
                "{scale:?}: {ns} ns not above the previous bound {below} µs"
            );
        }
    }

    #[test]
    fn values_around_every_bound_are_placed_exactly() {
        for scale in SCALES {
            for bucket in 0..scale.buckets() - 1 {
                let ns = scale.upper_bound_us(bucket) * 1000;
                for value in [ns - 1, ns, ns + 1] {
                    assert_placed(scale, value);
                }
                assert_eq!(scale.bucket_of_ns(ns), bucket, "{scale:?}: {ns} ns");
                assert_eq!(scale.bucket_of_ns(ns + 1), bucket + 1, "{scale:?}: {ns} ns");
            }
        }
    }

    #[test]
    fn random_values_are_placed_exactly_and_monotonically() {
        // xorshift64*, seeded: reproducible without a dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let mut values: [u64; 20_000] = [0; 20_000];
        for value in &mut values {
            // Spread over every magnitude: a random number of significant bits.
            let bits = next() % 64;
            *value = next() >> (63 - bits);
        }
        values.sort_unstable();
        for scale in SCALES {
            let mut previous = 0;
            for &ns in &values {
                assert_placed(scale, ns);
                let bucket = scale.bucket_of_ns(ns);
                assert!(bucket >= previous, "{scale:?}: not monotonic at {ns} ns");
                previous = bucket;
            }
        }
    }

    #[test]
    fn bounds_span_10_us_to_60_s_at_most_2x_apart() {
        for scale in SCALES {
            let finite = scale.buckets() - 1;
            assert!(scale.upper_bound_us(0) <= 10, "{scale:?}");
            assert!(scale.upper_bound_us(finite - 1) >= 60_000_000, "{scale:?}");
            assert_eq!(
                scale.upper_bound_us(finite),
                u64::MAX,
                "{scale:?}: +Inf last"
            );
            assert!(scale.upper_bound_seconds(finite).is_infinite());
            for bucket in 1..finite {
                let (lo, hi) = (
                    scale.upper_bound_us(bucket - 1),
                    scale.upper_bound_us(bucket),
                );
                assert!(lo < hi && hi <= 2 * lo, "{scale:?}: {lo} then {hi} µs");
            }
        }
        assert_eq!(Scale::Fine.upper_bound_us(FINE_BUCKETS - 2), 67_108_864);
        assert_eq!(Scale::Coarse.upper_bound_us(COARSE_BUCKETS - 2), 1 << 30);
    }

    #[test]
    fn every_coarse_bound_up_to_67_s_is_a_fine_bound() {
        for bucket in 0..=26 {
            let bound = Scale::Coarse.upper_bound_us(bucket);
            assert!(
                (0..FINE_BUCKETS).any(|b| Scale::Fine.upper_bound_us(b) == bound),
                "{bound} µs"
            );
        }
    }
}
