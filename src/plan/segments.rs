//! How a buffer is cut into per-rank segments.

use std::ops::Range;

/// Splits `len` elements into `n` contiguous segments whose sizes differ by at most one;
/// the first `len % n` segments are the longer ones.
///
/// ```
/// use phalanx::plan::segments::equal;
/// assert_eq!(equal(7, 3), vec![0..3, 3..5, 5..7]);
/// ```
pub fn equal(len: usize, n: usize) -> Vec<Range<usize>> {
    let n = n.max(1);
    let (base, extra) = (len / n, len % n);
    let counts: Vec<usize> = (0..n).map(|i| base + usize::from(i < extra)).collect();
    from_counts(&counts)
}

/// Consecutive segments of the given lengths.
///
/// ```
/// use phalanx::plan::segments::from_counts;
/// assert_eq!(from_counts(&[2, 0, 3]), vec![0..2, 2..2, 2..5]);
/// ```
pub fn from_counts(counts: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    counts
        .iter()
        .map(|&c| {
            let r = start..start + c;
            start += c;
            r
        })
        .collect()
}
