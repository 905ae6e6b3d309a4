//! The workload mix of `phalanx worker --mix` and its check in `phalanx churn --mix`:
//! after each step's all-reduce, one more collective of another kind, chosen by the step
//! number, on inputs that are a deterministic function of (peer id, step) in small
//! integers, so that the harness can recompute every result exactly from the members.

use phalanx::comm::{ScanOptions, SparseReduced};
use phalanx::workload::{gradient, hash_f32};
use phalanx::{Communicator, Error, ReduceOp};

/// Elements per rank in the mix's collectives.
pub const SEG: usize = 256;
/// The sparse all-reduce's dimension and the indices each rank contributes.
const SPARSE_DIM: usize = 4096;
const SPARSE_NNZ: usize = 16;

/// The collectives of the mix, one per step in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extra {
    AllGather,
    ReduceScatter,
    AllScan,
    SparseAllReduce,
    /// An all-reduce among the first and the last rank only.
    SubGroupAllReduce,
}

impl Extra {
    pub const ALL: [Extra; 5] =
        [Extra::AllGather, Extra::ReduceScatter, Extra::AllScan, Extra::SparseAllReduce, Extra::SubGroupAllReduce];

    /// The collective that follows the all-reduce of `step`.
    pub fn for_step(step: u64) -> Extra {
        Extra::ALL[(step % Extra::ALL.len() as u64) as usize]
    }

    pub fn name(self) -> &'static str {
        match self {
            Extra::AllGather => "all_gather",
            Extra::ReduceScatter => "reduce_scatter",
            Extra::AllScan => "all_scan",
            Extra::SparseAllReduce => "sparse_all_reduce",
            Extra::SubGroupAllReduce => "sub_group_all_reduce",
        }
    }

    pub fn from_name(name: &str) -> Option<Extra> {
        Extra::ALL.into_iter().find(|e| e.name() == name)
    }

    /// Rank `rank`'s input among `n` ranks (a salt keeps it apart from the gradient).
    fn input(self, id: u64, step: u64, n: usize) -> Vec<f32> {
        let len = match self {
            Extra::ReduceScatter => SEG * n,
            _ => SEG,
        };
        gradient(id ^ 0x0005_EED0_FA11, step ^ (self as u64) << 40, len)
    }

    /// The sparse contribution of peer `id`: distinct indices, small integer values.
    fn sparse(id: u64, step: u64) -> (Vec<u32>, Vec<f32>) {
        let g = gradient(id ^ 0x5_9A55, step, 2 * SPARSE_NNZ);
        let mut indices: Vec<u32> = (0..SPARSE_NNZ)
            .map(|k| {
                ((id.wrapping_mul(0x9E37_79B9) ^ step.wrapping_mul(31) ^ (k as u64 * 257)) % SPARSE_DIM as u64) as u32
            })
            .collect();
        indices.sort_unstable();
        indices.dedup();
        let values = g[..indices.len()].iter().map(|v| v + 4.0).collect();
        (indices, values)
    }

    /// The sub-group's member ranks among `n`: the first and the last (none alone).
    fn sub_group(n: usize) -> Option<Vec<usize>> {
        (n >= 2).then(|| vec![0, n - 1])
    }

    /// Runs this collective as rank `rank` of `n` with peer id `id`: its result, or
    /// `None` when this rank takes no part (the sub-group's non-members).
    pub fn run(self, comm: &mut Communicator, id: u64, step: u64) -> Result<Option<Vec<f32>>, Error> {
        let n = comm.size();
        let mut x = self.input(id, step, n);
        Ok(Some(match self {
            Extra::AllGather => {
                let mut out = vec![0f32; SEG * n];
                comm.all_gather(&x, &mut out)?;
                out
            }
            Extra::ReduceScatter => {
                let mut out = vec![0f32; SEG];
                comm.reduce_scatter(&x, &mut out, ReduceOp::Sum)?;
                out
            }
            Extra::AllScan => {
                comm.all_scan(&mut x, ReduceOp::Sum, ScanOptions::default())?;
                x
            }
            Extra::SparseAllReduce => {
                let (indices, values) = Extra::sparse(id, step);
                dense(comm.sparse_all_reduce(SPARSE_DIM, &indices, &values)?)
            }
            Extra::SubGroupAllReduce => {
                let Some(members) = Extra::sub_group(n) else { return Ok(None) };
                if !members.contains(&comm.rank()) {
                    return Ok(None);
                }
                comm.sub_all_reduce(&members, &mut x, ReduceOp::Sum)?;
                x
            }
        }))
    }

    /// What rank `rank` must get when `members` (peer ids in rank order) ran it at
    /// `step`; `None` if that rank takes no part. Sums of small integers are exact in
    /// f32 whatever the order.
    pub fn expected(self, step: u64, members: &[u64], rank: usize) -> Option<Vec<f32>> {
        let n = members.len();
        let inputs: Vec<Vec<f32>> = members.iter().map(|&id| self.input(id, step, n)).collect();
        let sum = |ranks: &mut dyn Iterator<Item = usize>, range: std::ops::Range<usize>| {
            let mut acc = vec![0f32; range.len()];
            for r in ranks {
                acc.iter_mut().zip(&inputs[r][range.clone()]).for_each(|(a, v)| *a += v);
            }
            acc
        };
        Some(match self {
            Extra::AllGather => inputs.concat(),
            Extra::ReduceScatter => sum(&mut (0..n), rank * SEG..(rank + 1) * SEG),
            Extra::AllScan => sum(&mut (0..=rank), 0..SEG),
            Extra::SparseAllReduce => {
                let mut acc = vec![0f32; SPARSE_DIM];
                for &id in members {
                    let (indices, values) = Extra::sparse(id, step);
                    indices.iter().zip(&values).for_each(|(&i, v)| acc[i as usize] += v);
                }
                acc
            }
            Extra::SubGroupAllReduce => {
                let group = Extra::sub_group(n)?;
                if !group.contains(&rank) {
                    return None;
                }
                sum(&mut group.into_iter(), 0..SEG)
            }
        })
    }
}

/// A sparse result as a dense vector.
fn dense(r: SparseReduced<f32>) -> Vec<f32> {
    match r {
        SparseReduced::Dense(v) => v,
        SparseReduced::Sparse { indices, values } => {
            let mut out = vec![0f32; SPARSE_DIM];
            indices.iter().zip(values).for_each(|(&i, v)| out[i as usize] = v);
            out
        }
    }
}

/// The hash a worker reports and the harness compares.
pub fn hash(v: &[f32]) -> String {
    hash_f32(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mix's collectives, run by an in-process group, give what the harness expects.
    #[test]
    fn every_extra_matches_its_recomputation() {
        for n in [1usize, 2, 3, 4] {
            let mut comms = Communicator::local_group(n, Default::default()).expect("group");
            let members = comms[0].members();
            for step in 0..Extra::ALL.len() as u64 {
                let extra = Extra::for_step(step);
                let got: Vec<(usize, Option<Vec<f32>>)> = std::thread::scope(|s| {
                    let hs: Vec<_> = comms
                        .iter_mut()
                        .map(|c| {
                            s.spawn(move || {
                                let id = c.peer_id();
                                (c.rank(), extra.run(c, id, step).expect("run"))
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().expect("thread")).collect()
                });
                for (rank, g) in got {
                    assert_eq!(g, extra.expected(step, &members, rank), "{} n={n} rank {rank}", extra.name());
                }
            }
        }
    }

    #[test]
    fn a_changed_member_changes_the_expectation() {
        let want = Extra::AllGather.expected(3, &[1, 2], 0);
        assert_ne!(want, Extra::AllGather.expected(3, &[1, 5], 0));
        assert_ne!(want, Extra::AllGather.expected(4, &[1, 2], 0));
    }
}
