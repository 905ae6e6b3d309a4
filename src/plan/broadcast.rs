//! Broadcast from any root: a binomial tree for small buffers, a pipelined chain for
//! large ones. Nothing is reduced, so the order question does not arise.

use super::ring::{ring_add, ring_sub};
use super::{Action, Plan, Rank, Step};

/// Buffers of at least this many bytes use the pipelined chain by default.
pub const DEFAULT_CHAIN_THRESHOLD: usize = 256 << 10;

/// The broadcast plan: [`tree`] below `chain_threshold_bytes`, else [`chain`].
pub fn plan(rank: Rank, n: usize, root: Rank, len: usize, elem_size: usize, chain_threshold_bytes: usize) -> Plan {
    if len.saturating_mul(elem_size) >= chain_threshold_bytes {
        chain(rank, n, root, len)
    } else {
        tree(rank, n, root, len)
    }
}

/// Pipelined chain `root → root+1 → … → root-1`: each rank forwards every chunk as soon
/// as it has it, so the time is about `(n - 1 + chunks)` chunk transfers.
pub fn chain(rank: Rank, n: usize, root: Rank, len: usize) -> Plan {
    let pos = ring_sub(rank, root, n);
    let (next, prev) = (ring_add(rank, 1, n), ring_sub(rank, 1, n));
    let all = 0..len;
    let steps = if n <= 1 {
        vec![]
    } else if pos == 0 {
        vec![Step::send(next, all)]
    } else if pos == n - 1 {
        vec![Step::recv(prev, all, Action::Copy)]
    } else {
        vec![Step::Forward { from: prev, to: next, range: all, action: Action::Copy }]
    };
    Plan { rank, size: n, len, steps }
}

/// Binomial tree: `⌈log2 n⌉` rounds, each rank receiving once from its parent and then
/// sending to its children, nearest subtree last.
pub fn tree(rank: Rank, n: usize, root: Rank, len: usize) -> Plan {
    let pos = ring_sub(rank, root, n);
    let real = |p: usize| ring_add(p, root, n);
    let all = 0..len;
    let mut steps = Vec::new();
    // The parent is `pos` with its lowest set bit cleared; children are `pos + m` for
    // the powers of two `m` below that bit.
    let low = if pos == 0 { n.next_power_of_two() } else { 1 << pos.trailing_zeros() };
    if pos != 0 {
        steps.push(Step::recv(real(pos - low), all.clone(), Action::Copy));
    }
    let mut m = low >> 1;
    while m > 0 {
        if pos + m < n {
            steps.push(Step::send(real(pos + m), all.clone()));
        }
        m >>= 1;
    }
    Plan { rank, size: n, len, steps }
}
