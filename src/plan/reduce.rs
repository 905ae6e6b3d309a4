//! Reduce to any root, and barrier.
//!
//! Contributions are combined in position order from the root, position `p` being rank
//! `(root + p) mod n`: the result is `x[root] ⊕ x[root+1] ⊕ … ⊕ x[root-1]`, grouped
//! right to left along the chain, and as contiguous blocks (lower on the left) in the
//! tree. Non-root ranks use their working buffer as scratch.

use super::ring::{ring_add, ring_sub};
use super::{allreduce, Action, Order, Plan, Rank, Step};

/// The reduce plan: [`tree`] below `chain_threshold_bytes`, else [`chain`].
pub fn plan(rank: Rank, n: usize, root: Rank, len: usize, elem_size: usize, chain_threshold_bytes: usize) -> Plan {
    if len.saturating_mul(elem_size) >= chain_threshold_bytes {
        chain(rank, n, root, len)
    } else {
        tree(rank, n, root, len)
    }
}

/// Pipelined chain `root-1 → root-2 → … → root`: each rank combines its own data on the
/// left of every incoming chunk and forwards it at once.
pub fn chain(rank: Rank, n: usize, root: Rank, len: usize) -> Plan {
    let pos = ring_sub(rank, root, n);
    let (next, prev) = (ring_add(rank, 1, n), ring_sub(rank, 1, n));
    let all = 0..len;
    let reduce = Action::Reduce(Order::IncomingRight);
    let steps = if n <= 1 {
        vec![]
    } else if pos == n - 1 {
        vec![Step::send(prev, all)]
    } else if pos == 0 {
        vec![Step::recv(next, all, reduce)]
    } else {
        vec![Step::Forward { from: next, to: prev, range: all, action: reduce }]
    };
    Plan { rank, size: n, len, steps }
}

/// Binomial tree: each rank folds in its children's blocks in ascending position order,
/// then sends its block to its parent.
pub fn tree(rank: Rank, n: usize, root: Rank, len: usize) -> Plan {
    let pos = ring_sub(rank, root, n);
    let real = |p: usize| ring_add(p, root, n);
    let all = 0..len;
    let mut steps = Vec::new();
    let low = if pos == 0 { n.next_power_of_two() } else { 1 << pos.trailing_zeros() };
    let mut m = 1;
    while m < low {
        if pos + m < n {
            steps.push(Step::recv(real(pos + m), all.clone(), Action::Reduce(Order::IncomingRight)));
        }
        m <<= 1;
    }
    if pos != 0 {
        steps.push(Step::send(real(pos - low), all));
    }
    Plan { rank, size: n, len, steps }
}

/// Barrier: recursive doubling over an empty buffer. Every transfer still carries one
/// (empty) frame, so no rank leaves before every rank has arrived.
pub fn barrier(rank: Rank, n: usize) -> Plan {
    allreduce::recursive_doubling(rank, n, 0)
}
