//! All-reduce: a ring for large buffers, recursive doubling for small ones.
//!
//! # Reduction orders
//!
//! - [`ring`]: the buffer is cut into `n` segments ([`super::segments::equal`]).
//!   Segment `j` is folded from the left in ring order starting at rank `j + 1`:
//!   `((x[j+1] ⊕ x[j+2]) ⊕ …) ⊕ x[j]`, indices mod `n`. For `n = 3`, segment 0 is
//!   `(x1 ⊕ x2) ⊕ x0`, segment 1 is `(x2 ⊕ x0) ⊕ x1`, segment 2 is `(x0 ⊕ x1) ⊕ x2`.
//! - [`recursive_doubling`]: with `p` the largest power of two `≤ n` and `e = n - p`,
//!   ranks `2i` and `2i + 1` (`i < e`) first pair up as `x[2i] ⊕ x[2i+1]`; then the `p`
//!   resulting blocks, in rank order, are combined as a balanced binary tree, always the
//!   lower block on the left. Every rank evaluates the same tree.

use super::ring::{ring_all_gather_steps, ring_reduce_scatter_steps};
use super::segments::equal;
use super::{Action, Order, Plan, Rank, Step};

/// How all-reduce picks its algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Recursive doubling below `threshold_bytes`, the ring from there on.
    Auto {
        /// Buffers of at least this many bytes use the ring.
        threshold_bytes: usize,
    },
    /// Always the ring.
    Ring,
    /// Always recursive doubling.
    RecursiveDoubling,
}

impl Default for Algorithm {
    /// `Auto` with a 64 KiB threshold: below it, `log2 n` round trips beat the ring's
    /// `2(n-1)` steps; above it, the ring's `2(n-1)/n·S` bytes per rank win.
    fn default() -> Self {
        Algorithm::Auto { threshold_bytes: 64 << 10 }
    }
}

/// The all-reduce plan for `rank` of `n` over `len` elements of `elem_size` bytes.
pub fn plan(rank: Rank, n: usize, len: usize, elem_size: usize, algo: Algorithm) -> Plan {
    let use_ring = match algo {
        Algorithm::Ring => true,
        Algorithm::RecursiveDoubling => false,
        Algorithm::Auto { threshold_bytes } => len.saturating_mul(elem_size) >= threshold_bytes,
    };
    if use_ring {
        ring(rank, n, len)
    } else {
        recursive_doubling(rank, n, len)
    }
}

/// Ring all-reduce: `n - 1` reduce-scatter steps, then `n - 1` all-gather steps.
pub fn ring(rank: Rank, n: usize, len: usize) -> Plan {
    let segs = equal(len, n);
    let mut steps = ring_reduce_scatter_steps(rank, n, &segs);
    steps.extend(ring_all_gather_steps(rank, n, &segs));
    Plan { rank, size: n, len, steps }
}

/// Recursive-doubling all-reduce: `⌈log2 n⌉` full-buffer exchanges (plus one fold-in
/// and one fold-out step when `n` is not a power of two).
pub fn recursive_doubling(rank: Rank, n: usize, len: usize) -> Plan {
    let p = if n == 0 { 0 } else { 1 << n.ilog2() };
    let extra = n - p;
    let all = 0..len;
    let mut steps = Vec::new();
    // Fold in: even ranks below 2·extra hand their data to the odd rank above them.
    let virt = if rank < 2 * extra {
        if rank % 2 == 0 {
            steps.push(Step::send(rank + 1, all.clone()));
            None
        } else {
            steps.push(Step::recv(rank - 1, all.clone(), Action::Reduce(Order::IncomingLeft)));
            Some(rank / 2)
        }
    } else {
        Some(rank - extra)
    };
    let real = |v: usize| if v < extra { 2 * v + 1 } else { v + extra };
    if let Some(v) = virt {
        let mut mask = 1;
        while mask < p {
            let pv = v ^ mask;
            let order = if pv < v { Order::IncomingLeft } else { Order::IncomingRight };
            let peer = real(pv);
            steps.push(Step::exchange(peer, all.clone(), peer, all.clone(), Action::Reduce(order)));
            mask <<= 1;
        }
    }
    // Fold out: the odd ranks return the result to their even partners.
    if rank < 2 * extra {
        if rank % 2 == 0 {
            steps.push(Step::recv(rank + 1, all, Action::Copy));
        } else {
            steps.push(Step::send(rank - 1, all));
        }
    }
    Plan { rank, size: n, len, steps }
}
