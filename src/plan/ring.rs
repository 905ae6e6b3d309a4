//! Ring arithmetic and the ring steps that several collectives share: all-reduce is a
//! reduce-scatter followed by an all-gather (see [`super::allreduce`] and
//! [`super::gather`]), and broadcast, reduce and all-to-all walk the ring too. Kept apart
//! from those builders so that none of them imports another.

use std::ops::Range;

use super::{Action, Order, Rank, Step};

/// `(r + k) mod n` for ring arithmetic.
pub(crate) fn ring_add(r: Rank, k: usize, n: usize) -> Rank {
    (r + k % n) % n
}

/// `(r - k) mod n` for ring arithmetic.
pub(crate) fn ring_sub(r: Rank, k: usize, n: usize) -> Rank {
    (r + n - k % n) % n
}

/// The successor and predecessor of `rank` on the ring.
pub(crate) fn ring_neighbours(rank: Rank, n: usize) -> (Rank, Rank) {
    (ring_add(rank, 1, n), ring_sub(rank, 1, n))
}

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
///
/// The segment received at step `s` is the one sent at step `s + 1`, so every receive
/// but the last is [`Action::CopyKeep`]: each hop forwards what it received unchanged.
pub(crate) fn ring_all_gather_steps(rank: Rank, n: usize, segs: &[Range<usize>]) -> Vec<Step> {
    let (next, prev) = ring_neighbours(rank, n);
    let last = n.saturating_sub(2);
    (0..n.saturating_sub(1))
        .map(|s| {
            let send = segs[ring_sub(rank, s, n)].clone();
            let recv = segs[ring_sub(rank, 1 + s, n)].clone();
            let action = if s < last { Action::CopyKeep } else { Action::Copy };
            Step::exchange(next, send, prev, recv, action)
        })
        .collect()
}
