//! Reduce-scatter and all-gather on a ring, with equal or uneven ("v") segments.
//!
//! Reduce-scatter leaves rank `r` holding segment `r` of the reduced buffer, folded in
//! ring order starting at rank `r + 1` (see [`super::allreduce`]). All-gather starts
//! with rank `r`'s own data in segment `r` and ends with every segment everywhere.

use super::ring::{ring_all_gather_steps, ring_reduce_scatter_steps};
use super::segments::{equal, from_counts};
use super::{Plan, Rank};

/// Reduce-scatter of a `len`-element buffer cut into equal segments.
pub fn reduce_scatter(rank: Rank, n: usize, len: usize) -> Plan {
    let segs = equal(len, n);
    Plan { rank, size: n, len, steps: ring_reduce_scatter_steps(rank, n, &segs) }
}

/// Reduce-scatter with `counts[i]` elements going to rank `i`.
pub fn reduce_scatter_v(rank: Rank, counts: &[usize]) -> Plan {
    let segs = from_counts(counts);
    let len = counts.iter().sum();
    Plan { rank, size: counts.len(), len, steps: ring_reduce_scatter_steps(rank, counts.len(), &segs) }
}

/// All-gather into a `len`-element buffer cut into equal segments.
pub fn all_gather(rank: Rank, n: usize, len: usize) -> Plan {
    let segs = equal(len, n);
    Plan { rank, size: n, len, steps: ring_all_gather_steps(rank, n, &segs) }
}

/// All-gather with `counts[i]` elements coming from rank `i`.
pub fn all_gather_v(rank: Rank, counts: &[usize]) -> Plan {
    let segs = from_counts(counts);
    let len = counts.iter().sum();
    Plan { rank, size: counts.len(), len, steps: ring_all_gather_steps(rank, counts.len(), &segs) }
}
