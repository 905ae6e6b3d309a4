//! All-to-all with equal or uneven counts (expert-parallel token dispatch).
//!
//! `counts[i][j]` is the number of elements rank `i` sends to rank `j`; every rank knows
//! the whole matrix. Rank `r`'s working buffer is `[send area | receive area]`: the send
//! area holds `counts[r][0] + … + counts[r][n-1]` elements, the part for rank `j` at the
//! `j`-th place; the receive area gets `counts[0][r] + … + counts[n-1][r]` elements, the
//! part from rank `i` at the `i`-th place.
//!
//! The own part is copied locally first ([`Step::Local`]); then `n - 1` rounds of
//! pairwise exchanges: in round `k` rank `r` sends to `r + k` and receives from `r - k`
//! (mod `n`). Both ends of every transfer are in the same round and every rank runs its
//! rounds in order, so no rank waits on a peer that waits on it. A direction with zero
//! elements is left out (no frame), and a round with nothing either way is no step.
//!
//! ```
//! use phalanx::plan::alltoall;
//! let counts = vec![vec![1, 2], vec![3, 0]];
//! let plan = alltoall::plan(0, &counts);
//! assert_eq!(plan.len, 3 + 4); // sends 1 + 2, receives 1 + 3
//! ```

use std::ops::Range;

use super::ring::{ring_add, ring_sub};
use super::segments::from_counts;
use super::RecvFrom;
use super::{Action, Plan, Rank, SendTo, Step};

/// Rank `rank`'s send ranges (per destination) and receive ranges (per source) in its
/// working buffer.
pub fn layout(rank: Rank, counts: &[Vec<usize>]) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    let send = from_counts(&counts[rank]);
    let send_len: usize = counts[rank].iter().sum();
    let recv_counts: Vec<usize> = counts.iter().map(|row| row[rank]).collect();
    let recv = from_counts(&recv_counts).into_iter().map(|r| r.start + send_len..r.end + send_len).collect();
    (send, recv)
}

/// Elements of rank `rank`'s working buffer: what it sends plus what it receives.
pub fn working_len(rank: Rank, counts: &[Vec<usize>]) -> usize {
    counts[rank].iter().sum::<usize>() + counts.iter().map(|row| row[rank]).sum::<usize>()
}

/// The all-to-all plan of `rank` for the `n × n` matrix `counts` (rows: senders).
pub fn plan(rank: Rank, counts: &[Vec<usize>]) -> Plan {
    let n = counts.len();
    let (send, recv) = layout(rank, counts);
    let mut steps = Vec::new();
    if !send[rank].is_empty() {
        steps.push(Step::Local { src: send[rank].clone(), dst: recv[rank].clone(), action: Action::Copy });
    }
    for k in 1..n {
        let (to, from) = (ring_add(rank, k, n), ring_sub(rank, k, n));
        let s = (!send[to].is_empty()).then(|| SendTo { to, range: send[to].clone() });
        let r = (!recv[from].is_empty()).then(|| RecvFrom { from, range: recv[from].clone(), action: Action::Copy });
        if s.is_some() || r.is_some() {
            steps.push(Step::Exchange { send: s, recv: r });
        }
    }
    Plan { rank, size: n, len: working_len(rank, counts), steps }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_counts_make_no_steps() {
        let counts = vec![vec![0, 0, 0], vec![0, 0, 5], vec![0, 0, 0]];
        assert!(plan(0, &counts).steps.is_empty());
        assert_eq!(plan(1, &counts).steps.len(), 1);
        assert_eq!(plan(2, &counts).steps.len(), 1);
        for r in 0..3 {
            plan(r, &counts).validate().unwrap();
        }
    }
}
