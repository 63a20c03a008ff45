//! A fixed-size log-linear latency histogram (HDR style), one writer, any number of readers.
//!
//! # Buckets
//!
//! Values are nanoseconds. 0..=15 have a bucket each. Above that, every power-of-two range
//! `[2^k, 2^(k+1))`, `k = 4..=31`, is split into [`SUB_BUCKETS`] = 16 equal sub-buckets of width
//! `2^(k-4)`. Values of `2^32` ns (4.29 s) and more share one overflow bucket. That is
//! [`BUCKETS`] = 465 buckets, 3.7 KiB per histogram, fixed: recording never allocates.
//!
//! # Error bound
//!
//! A bucket's width is at most 1/16 of its lower bound, so a percentile, reported as the highest
//! value of its bucket (clamped to the observed maximum), is never below the true percentile
//! `v` and at most `v / 16` (6.25 %) above it; values below 32 ns are exact. Values in the
//! overflow bucket are reported as the observed maximum. `tests/hist.rs` checks this bound
//! against a sorted-vector oracle on random data.
//!
//! # Concurrency
//!
//! One thread records (the vCPU thread); others snapshot at any time. Every field is an
//! `AtomicU64` updated with a relaxed load and a relaxed store (no locked instruction on the
//! exit path). A snapshot reads each field once: each bucket is a value the writer stored, so
//! counts read by successive snapshots never go backwards; the count is the sum of the buckets
//! read, so it agrees with them. `sum`, `min` and `max` are read separately and may be a record
//! or so ahead of or behind the buckets; the snapshot widens `min`/`max` to cover its buckets.
//!
//! An all-zero `Histogram` is a valid empty one (the minimum is stored inverted), so sets of them
//! come from zeroed memory: pages of histograms never recorded into are never touched.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::clock::{f64_to_u64, u64_to_f64};

/// Sub-buckets per power of two.
pub const SUB_BUCKETS: u64 = 16;
const SUB_BITS: u32 = 4;
/// Values at or above `2^MAX_BITS` ns go to the overflow bucket.
const MAX_BITS: u32 = 32;
/// Index of the overflow bucket.
pub const OVERFLOW_BUCKET: usize = 16 + (MAX_BITS as usize - SUB_BITS as usize) * 16;
/// Number of buckets.
pub const BUCKETS: usize = OVERFLOW_BUCKET + 1;
/// The smallest value that lands in the overflow bucket (2^32 ns, about 4.29 s).
pub const OVERFLOW_NS: u64 = 1 << MAX_BITS;

/// The bucket of value `v`.
#[inline(always)]
pub fn bucket_of(v: u64) -> usize {
    if v < SUB_BUCKETS {
        // v < 16: fits.
        return small(v);
    }
    if v >= OVERFLOW_NS {
        return OVERFLOW_BUCKET;
    }
    let k = 63 - v.leading_zeros(); // 4..=31
    let sub = (v >> (k - SUB_BITS)) & (SUB_BUCKETS - 1);
    small(u64::from(k - 3) * SUB_BUCKETS + sub)
}

/// The values bucket `i` holds: `(lowest, highest)`, inclusive. Out-of-range indices give the
/// overflow bucket's range.
pub fn bucket_range(i: usize) -> (u64, u64) {
    if i >= OVERFLOW_BUCKET {
        return (OVERFLOW_NS, u64::MAX);
    }
    let i = i as u64;
    if i < SUB_BUCKETS {
        return (i, i);
    }
    let k = i / SUB_BUCKETS + 3;
    let sub = i % SUB_BUCKETS;
    let width = 1u64 << (k - u64::from(SUB_BITS));
    let lo = (1u64 << k) + sub * width;
    (lo, lo + width - 1)
}

#[inline(always)]
fn small(v: u64) -> usize {
    usize::try_from(v).unwrap_or(OVERFLOW_BUCKET)
}

#[inline(always)]
fn bump(a: &AtomicU64, by: u64) {
    a.store(a.load(Relaxed).wrapping_add(by), Relaxed);
}

/// A latency histogram: one writer ([`Histogram::record`]), any number of readers
/// ([`Histogram::snapshot`]).
#[derive(Debug)]
#[repr(C)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    /// Sum of recorded values, saturating.
    sum: AtomicU64,
    /// Bitwise NOT of the minimum (so that zero means "none yet").
    min_inv: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
            min_inv: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }

    /// Records one value (nanoseconds). Single writer: only one thread may record into a given
    /// histogram (concurrent recorders would lose counts, never corrupt memory).
    #[inline]
    pub fn record(&self, ns: u64) {
        if let Some(b) = self.buckets.get(bucket_of(ns)) {
            bump(b, 1);
        }
        self.sum
            .store(self.sum.load(Relaxed).saturating_add(ns), Relaxed);
        if !ns > self.min_inv.load(Relaxed) {
            self.min_inv.store(!ns, Relaxed);
        }
        if ns > self.max.load(Relaxed) {
            self.max.store(ns, Relaxed);
        }
    }

    /// Adds everything `other` holds now into `self`, e.g. to build a VM-wide histogram from the
    /// vCPUs'. Nobody may be recording into `self` meanwhile (it is the same single writer);
    /// `other` may be live.
    pub fn merge(&self, other: &Histogram) {
        self.merge_snapshot(&other.snapshot());
    }

    /// Adds a snapshot into `self` (same rule as [`Histogram::merge`]).
    pub fn merge_snapshot(&self, other: &HistogramSnapshot) {
        if other.count() == 0 {
            return;
        }
        for (mine, theirs) in self.buckets.iter().zip(other.buckets.iter()) {
            if *theirs != 0 {
                bump(mine, *theirs);
            }
        }
        self.sum
            .store(self.sum.load(Relaxed).saturating_add(other.sum), Relaxed);
        if !other.min > self.min_inv.load(Relaxed) {
            self.min_inv.store(!other.min, Relaxed);
        }
        if other.max > self.max.load(Relaxed) {
            self.max.store(other.max, Relaxed);
        }
    }

    /// The number of values recorded (the sum of the buckets, read now).
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |a, b| a.saturating_add(b.load(Relaxed)))
    }

    /// A consistent-enough copy to compute percentiles from (see the module docs).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let sum = self.sum.load(Relaxed);
        let min = !self.min_inv.load(Relaxed);
        let max = self.max.load(Relaxed);
        HistogramSnapshot::from_parts(buckets, sum, min, max)
    }
}

/// A plain copy of a [`Histogram`]: percentiles, merging, export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `BUCKETS` counts.
    buckets: Vec<u64>,
    sum: u64,
    /// 0 when empty.
    min: u64,
    /// 0 when empty.
    max: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            sum: 0,
            min: 0,
            max: 0,
        }
    }
}

impl HistogramSnapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// A snapshot of exactly `values` (for tests and offline analysis).
    pub fn from_values(values: &[u64]) -> Self {
        let h = Histogram::new();
        for &v in values {
            h.record(v);
        }
        h.snapshot()
    }

    /// Builds a snapshot and makes `min`/`max` cover the non-empty buckets (a snapshot taken
    /// while recording may read them a record apart).
    fn from_parts(mut buckets: Vec<u64>, sum: u64, min: u64, max: u64) -> Self {
        buckets.resize(BUCKETS, 0);
        let lowest = buckets.iter().position(|&c| c != 0);
        let highest = buckets.iter().rposition(|&c| c != 0);
        let (min, max) = match (lowest, highest) {
            (Some(lo), Some(hi)) => {
                let (lo_bottom, lo_top) = bucket_range(lo);
                let (hi_bottom, _) = bucket_range(hi);
                // At most the lowest bucket's top, at least the highest bucket's bottom.
                let min = if min > lo_top { lo_bottom } else { min };
                let max = max.max(hi_bottom);
                (min.min(max), max)
            }
            _ => (0, 0),
        };
        Self {
            buckets,
            sum,
            min,
            max,
        }
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// True if nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Sum of the values (saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        self.min
    }

    /// Largest value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean value (0 when empty).
    pub fn mean(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => u64_to_f64(self.sum) / u64_to_f64(n),
        }
    }

    /// The `p`-th percentile (`p` in 0..=100; NaN counts as 100): the smallest bucket value at
    /// or below which at least `p` % of the values lie, reported as that bucket's highest value
    /// clamped to `[min, max]`. Never below the exact percentile, at most 1/16 above it. 0 when
    /// empty; `percentile(100.0)` is the maximum, `percentile(0.0)` the minimum.
    pub fn percentile(&self, p: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        let p = if p.is_nan() {
            100.0
        } else {
            p.clamp(0.0, 100.0)
        };
        if p == 0.0 {
            return self.min;
        }
        let rank = rank_of(p, count);
        let mut seen = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen >= rank {
                let (_, hi) = bucket_range(i);
                // Not `clamp`: it panics if min > max, and a snapshot is data read from a
                // live writer.
                return hi.min(self.max).max(self.min);
            }
        }
        self.max
    }

    /// Non-empty buckets as `(lowest value, highest value, count)`, in order.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != 0)
            .map(|(i, &c)| {
                let (lo, hi) = bucket_range(i);
                (lo, hi, c)
            })
    }

    /// Adds `other` into `self`: the result equals a snapshot of one histogram that recorded
    /// everything both did.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        if other.is_empty() {
            return;
        }
        let was_empty = self.is_empty();
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.sum = self.sum.saturating_add(other.sum);
        if was_empty {
            self.min = other.min;
            self.max = other.max;
        } else {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
    }
}

/// The 1-based rank of the `p`-th percentile of `count` values: `ceil(p / 100 * count)`, at
/// least 1 and at most `count`. Public so tests and oracles use the same definition.
pub fn rank_of(p: f64, count: u64) -> u64 {
    let r = f64_to_u64((p / 100.0 * u64_to_f64(count)).ceil());
    r.clamp(1, count.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range() {
        // Every bucket starts right after the previous one ends, and bucket_of inverts
        // bucket_range at both edges.
        let mut next = 0u64;
        for i in 0..OVERFLOW_BUCKET {
            let (lo, hi) = bucket_range(i);
            assert_eq!(lo, next, "bucket {i}");
            assert!(hi >= lo);
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            // The width bound the error guarantee rests on.
            assert!(
                (hi - lo + 1) * SUB_BUCKETS <= lo.max(16),
                "bucket {i} too wide"
            );
            next = hi + 1;
        }
        assert_eq!(next, OVERFLOW_NS);
        assert_eq!(bucket_of(OVERFLOW_NS), OVERFLOW_BUCKET);
        assert_eq!(bucket_of(u64::MAX), OVERFLOW_BUCKET);
        assert_eq!(bucket_range(OVERFLOW_BUCKET), (OVERFLOW_NS, u64::MAX));
        assert_eq!(bucket_range(usize::MAX), (OVERFLOW_NS, u64::MAX));
    }

    #[test]
    fn empty_and_single() {
        let h = Histogram::new();
        let s = h.snapshot();
        assert!(s.is_empty());
        assert_eq!((s.min(), s.max(), s.percentile(50.0)), (0, 0, 0));
        h.record(8_600);
        let s = h.snapshot();
        assert_eq!(s.count(), 1);
        assert_eq!((s.min(), s.max(), s.sum()), (8_600, 8_600, 8_600));
        for p in [0.0, 50.0, 99.0, 99.9, 100.0, f64::NAN, -5.0, 1e9] {
            assert_eq!(s.percentile(p), 8_600, "p{p}");
        }
    }

    #[test]
    fn zeroed_memory_is_an_empty_histogram() {
        let h = Histogram::new();
        h.record(0);
        let s = h.snapshot();
        assert_eq!((s.count(), s.min(), s.max()), (1, 0, 0));
        h.record(u64::MAX);
        let s = h.snapshot();
        assert_eq!((s.min(), s.max(), s.sum()), (0, u64::MAX, u64::MAX));
        assert_eq!(s.percentile(100.0), u64::MAX);
        assert_eq!(s.percentile(50.0), 0);
    }

    #[test]
    fn snapshot_widens_stale_min_max() {
        // As if min/max were read before the writer stored them.
        let mut b = vec![0u64; BUCKETS];
        b[bucket_of(5_000)] = 2;
        let s = HistogramSnapshot::from_parts(b, 10_000, !0, 0);
        assert!(s.min() <= 5_000 && s.max() >= 4_864);
        assert!(s.percentile(50.0) >= 4_864);
    }
}
