//! All-scan (prefix reduction over ranks): rank `r` ends with `x_0 ⊕ x_1 ⊕ … ⊕ x_r`
//! (inclusive) or `x_0 ⊕ … ⊕ x_{r-1}` (exclusive, the identity on the first rank).
//!
//! # Order of combination
//!
//! The operator must be associative; it need not commute. Every combine puts the
//! operand that comes earlier in the scan order on the **left**. The scan order is rank
//! order `0, 1, …, n-1`, or with `reverse` the order `n-1, n-2, …, 0` (rank `n-1` is
//! first and rank `r` ends with `x_{n-1} ⊕ … ⊕ x_r`).
//!
//! - [`Algorithm::Chain`] computes the left fold `((x_0 ⊕ x_1) ⊕ x_2) ⊕ …` exactly in
//!   that order, on every block, so its results are bitwise those of a sequential left
//!   fold, for every number of blocks.
//! - [`Algorithm::RecursiveDoubling`] groups the operands along a binary tree
//!   (`(x_0 ⊕ x_1) ⊕ (x_2 ⊕ x_3)`): the same value for an associative operator, the same
//!   bits when the arithmetic is exact (integers, or floats without rounding), and
//!   always the same bits from run to run.
//!
//! # Working buffer
//!
//! The plans run on a working buffer of [`working_len`] units made of regions of `len`
//! units each. Region 0 holds this rank's input on entry; region 1 must hold the
//! operator's identity on entry for an exclusive scan (the first rank keeps it). The
//! result is in [`result_range`] afterwards.
//!
//! - Chain: `[local | prefix]`. Block `b` of the upstream rank's inclusive prefix is
//!   received into `prefix` (copy), combined into `local` block `b` with the prefix on
//!   the left, and that block is sent downstream while block `b + 1` arrives. The
//!   inclusive result is `local`, the exclusive one `prefix`. The time is about
//!   `(n - 1 + K)(α + Sβ/K)` for `K` blocks of a state of `S` bytes.
//! - Recursive doubling (MPI_Scan's algorithm): `[partial | result | tmp]`. In round `k`
//!   rank `r` exchanges `partial` with `r xor 2^k`; what comes from a lower rank is
//!   combined on the left of both `partial` and `result`, what comes from a higher rank
//!   on the right of `partial` only. `⌈log2 n⌉` rounds of `S` bytes each.
//!
//! ```
//! use phalanx::plan::scan::{plan, Algorithm};
//! // Rank 1 of 3, 4 units, chain in 2 blocks: receive, combine and forward per block.
//! let p = plan(1, 3, 4, false, Algorithm::Chain { blocks: 2 });
//! assert_eq!(p.len, 8);
//! assert_eq!(p.steps.len(), 5);
//! ```

use std::ops::Range;

use super::{segments, Action, Order, Plan, Rank, Step};

/// States of at most this many bytes use recursive doubling under [`Algorithm::Auto`],
/// larger ones the chain: below it latency (`⌈log2 n⌉` rounds instead of `n - 1 + K`)
/// dominates, above it bandwidth (`⌈log2 n⌉·S` bytes sent instead of `S`).
pub const DEFAULT_DOUBLING_THRESHOLD: usize = 64 << 10;

/// Under [`Algorithm::Auto`] the chain cuts the state into blocks of about this many
/// bytes, between 1 and [`MAX_AUTO_BLOCKS`] of them. For a 4 MiB state this gives 16
/// blocks, near the optimum `K = sqrt((n-1)·Sβ/α)` of the cost model for a few ranks.
pub const DEFAULT_BLOCK_BYTES: usize = 256 << 10;

/// The most blocks [`Algorithm::Auto`] picks.
pub const MAX_AUTO_BLOCKS: usize = 64;

/// Which all-scan algorithm to run. Every rank must pass the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Recursive doubling up to [`DEFAULT_DOUBLING_THRESHOLD`] bytes, else a chain in
    /// blocks of about [`DEFAULT_BLOCK_BYTES`].
    #[default]
    Auto,
    /// The pipelined chain in `blocks` blocks (clamped to `1..=len`).
    Chain {
        /// Number of blocks `K`.
        blocks: usize,
    },
    /// Recursive doubling.
    RecursiveDoubling,
}

impl Algorithm {
    /// The concrete algorithm for a state of `len` units of `unit_bytes` bytes: never
    /// `Auto`, and the chain's block count clamped to `1..=max(len, 1)`.
    pub fn resolve(self, len: usize, unit_bytes: usize) -> Algorithm {
        match self {
            Algorithm::Auto => {
                let bytes = len.saturating_mul(unit_bytes);
                if bytes <= DEFAULT_DOUBLING_THRESHOLD {
                    Algorithm::RecursiveDoubling
                } else {
                    Algorithm::Chain { blocks: (bytes / DEFAULT_BLOCK_BYTES).clamp(1, MAX_AUTO_BLOCKS) }
                        .resolve(len, unit_bytes)
                }
            }
            Algorithm::Chain { blocks } => Algorithm::Chain { blocks: blocks.clamp(1, len.max(1)) },
            Algorithm::RecursiveDoubling => Algorithm::RecursiveDoubling,
        }
    }
}

/// Units of the working buffer for a state of `len` units and a resolved algorithm.
pub fn working_len(len: usize, algorithm: Algorithm) -> usize {
    match algorithm {
        Algorithm::RecursiveDoubling => 3 * len,
        _ => 2 * len,
    }
}

/// Where the result lies in the working buffer after the plan ran.
pub fn result_range(len: usize, inclusive: bool, algorithm: Algorithm) -> Range<usize> {
    match algorithm {
        Algorithm::RecursiveDoubling => len..2 * len,
        _ if inclusive => 0..len,
        _ => len..2 * len,
    }
}

/// The all-scan plan for `rank` of `n` over a state of `len` units, with `algorithm`
/// already resolved ([`Algorithm::resolve`]; `Auto` is treated as a chain of one block).
pub fn plan(rank: Rank, n: usize, len: usize, reverse: bool, algorithm: Algorithm) -> Plan {
    plan_full(rank, n, len, true, reverse, algorithm)
}

/// [`plan`] for an inclusive or exclusive scan. The chain's plan is the same for both
/// (only the result region differs); recursive doubling differs.
pub fn plan_full(rank: Rank, n: usize, len: usize, inclusive: bool, reverse: bool, algorithm: Algorithm) -> Plan {
    // Positions in scan order; `phys` maps them back to ranks.
    let phys = move |v: usize| if reverse { n - 1 - v } else { v };
    let v = phys(rank);
    match algorithm {
        Algorithm::RecursiveDoubling => doubling(rank, v, n, len, inclusive, phys),
        Algorithm::Chain { blocks } => chain(rank, v, n, len, blocks, phys),
        Algorithm::Auto => chain(rank, v, n, len, 1, phys),
    }
}

fn chain(rank: Rank, v: usize, n: usize, len: usize, blocks: usize, phys: impl Fn(usize) -> Rank) -> Plan {
    let mut plan = Plan::empty(rank, n, 2 * len);
    if n <= 1 {
        return plan;
    }
    let local = segments::equal(len, blocks.clamp(1, len.max(1)));
    let prefix: Vec<Range<usize>> = local.iter().map(|b| b.start + len..b.end + len).collect();
    let combine = |b: usize| Step::Local {
        src: prefix[b].clone(),
        dst: local[b].clone(),
        action: Action::Reduce(Order::IncomingLeft),
    };
    let steps = &mut plan.steps;
    if v == 0 {
        let down = phys(1);
        steps.extend(local.iter().map(|b| Step::send(down, b.clone())));
    } else if v == n - 1 {
        let up = phys(v - 1);
        for (b, p) in prefix.iter().enumerate() {
            steps.push(Step::recv(up, p.clone(), Action::Copy));
            steps.push(combine(b));
        }
    } else {
        let (up, down) = (phys(v - 1), phys(v + 1));
        steps.push(Step::recv(up, prefix[0].clone(), Action::Copy));
        steps.push(combine(0));
        for b in 1..local.len() {
            // Block b-1 goes downstream while block b of the prefix comes in.
            steps.push(Step::exchange(down, local[b - 1].clone(), up, prefix[b].clone(), Action::Copy));
            steps.push(combine(b));
        }
        steps.push(Step::send(down, local[local.len() - 1].clone()));
    }
    plan
}

fn doubling(rank: Rank, v: usize, n: usize, len: usize, inclusive: bool, phys: impl Fn(usize) -> Rank) -> Plan {
    let (partial, result, tmp) = (0..len, len..2 * len, 2 * len..3 * len);
    let mut plan = Plan::empty(rank, n, 3 * len);
    let steps = &mut plan.steps;
    if inclusive {
        steps.push(Step::Local { src: partial.clone(), dst: result.clone(), action: Action::Copy });
    }
    let mut have_lower = inclusive;
    let mut mask = 1;
    while mask < n {
        let pv = v ^ mask;
        if pv < n {
            let peer = phys(pv);
            steps.push(Step::exchange(peer, partial.clone(), peer, tmp.clone(), Action::Copy));
            if pv < v {
                // `tmp` covers scan positions just before everything in `partial`.
                let left = Action::Reduce(Order::IncomingLeft);
                steps.push(Step::Local { src: tmp.clone(), dst: partial.clone(), action: left });
                let to_result = if have_lower { left } else { Action::Copy };
                steps.push(Step::Local { src: tmp.clone(), dst: result.clone(), action: to_result });
                have_lower = true;
            } else {
                let right = Action::Reduce(Order::IncomingRight);
                steps.push(Step::Local { src: tmp.clone(), dst: partial.clone(), action: right });
            }
        }
        mask <<= 1;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::{DType, ReduceOp};
    use crate::sim::{Outcome, Simulation};

    /// Runs an i64 sum scan in the simulator; input element `i` of rank `r` is
    /// `(r + 1) * 100 + i`. (Order is checked with a non-commutative op in tests/scan.rs.)
    fn run_i64(n: usize, len: usize, inclusive: bool, reverse: bool, alg: Algorithm) -> Vec<Vec<i64>> {
        let alg = alg.resolve(len, 8);
        let plans: Vec<Plan> = (0..n).map(|r| plan_full(r, n, len, inclusive, reverse, alg)).collect();
        for p in &plans {
            p.validate().expect("valid plan");
        }
        let bufs: Vec<Vec<u8>> = (0..n)
            .map(|r| {
                let mut w = vec![0i64; working_len(len, alg)];
                for (i, x) in w[..len].iter_mut().enumerate() {
                    *x = (r as i64 + 1) * 100 + i as i64;
                }
                bytemuck::cast_slice(&w).to_vec()
            })
            .collect();
        let sim = Simulation::new(DType::I64, ReduceOp::Sum);
        sim.run(&plans, bufs)
            .into_iter()
            .map(|o| match o {
                Outcome::Done(b) => {
                    bytemuck::pod_collect_to_vec::<u8, i64>(&b)[result_range(len, inclusive, alg)].to_vec()
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn sums_match_reference_for_all_shapes() {
        for n in 1..=7 {
            for alg in [Algorithm::RecursiveDoubling, Algorithm::Chain { blocks: 1 }, Algorithm::Chain { blocks: 3 }] {
                for inclusive in [true, false] {
                    for reverse in [false, true] {
                        let got = run_i64(n, 5, inclusive, reverse, alg);
                        for (r, row) in got.iter().enumerate() {
                            let ranks: Vec<usize> = if reverse {
                                (if inclusive { r } else { r + 1 }..n).collect()
                            } else {
                                (0..if inclusive { r + 1 } else { r }).collect()
                            };
                            let want: Vec<i64> =
                                (0..5).map(|i| ranks.iter().map(|&q| (q as i64 + 1) * 100 + i as i64).sum()).collect();
                            assert_eq!(row, &want, "n={n} {alg:?} inclusive={inclusive} reverse={reverse} rank {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn auto_picks_by_size() {
        assert_eq!(Algorithm::Auto.resolve(16, 4), Algorithm::RecursiveDoubling);
        assert_eq!(Algorithm::Auto.resolve(1 << 20, 4), Algorithm::Chain { blocks: 16 });
        assert_eq!(Algorithm::Auto.resolve(1 << 30, 4), Algorithm::Chain { blocks: MAX_AUTO_BLOCKS });
        assert_eq!(Algorithm::Chain { blocks: 9 }.resolve(3, 4), Algorithm::Chain { blocks: 3 });
        assert_eq!(Algorithm::Chain { blocks: 0 }.resolve(3, 4), Algorithm::Chain { blocks: 1 });
    }
}
