//! Reduce-scatter and all-gather on a ring, with equal or uneven ("v") segments.
//!
//! Reduce-scatter leaves rank `r` holding segment `r` of the reduced buffer, folded in
//! ring order starting at rank `r + 1` (see [`super::allreduce`]). All-gather starts
//! with rank `r`'s own data in segment `r` and ends with every segment everywhere.

use std::ops::Range;

use super::allreduce::ring_neighbours;
use super::segments::{equal, from_counts};
use super::{ring_sub, Action, Order, Plan, Rank, Step};

/// The `n - 1` reduce-scatter steps of a ring over `segs` (one segment per rank).
pub(crate) fn ring_reduce_scatter_steps(rank: Rank, n: usize, segs: &[Range<usize>]) -> Vec<Step> {
    let (next, prev) = ring_neighbours(rank, n);
    (0..n.saturating_sub(1))
        .map(|s| {
            let send = segs[ring_sub(rank, 1 + s, n)].clone();
            let recv = segs[ring_sub(rank, 2 + s, n)].clone();
            Step::exchange(next, send, prev, recv, Action::Reduce(Order::IncomingLeft))
        })
        .collect()
}

/// The `n - 1` all-gather steps of a ring over `segs` (one segment per rank).
pub(crate) fn ring_all_gather_steps(rank: Rank, n: usize, segs: &[Range<usize>]) -> Vec<Step> {
    let (next, prev) = ring_neighbours(rank, n);
    (0..n.saturating_sub(1))
        .map(|s| {
            let send = segs[ring_sub(rank, s, n)].clone();
            let recv = segs[ring_sub(rank, 1 + s, n)].clone();
            Step::exchange(next, send, prev, recv, Action::Copy)
        })
        .collect()
}

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
