//! What a collective call is, independent of who runs it: its plan and fingerprint.

use crate::dtype::{DType, ReduceOp};
pub use crate::exec::DEFAULT_CHUNK_BYTES;
use crate::plan::sparse::{self as sparse_plan, Placement};
use crate::plan::{self, allreduce, alltoall, broadcast, gather, reduce, scan, Plan, Rank};
use crate::quant::{Codec, Quantization};

/// Knobs that pick algorithms and chunk sizes. Every rank of a group must use the same
/// values, since they shape the plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// All-reduce algorithm choice (default: recursive doubling below 64 KiB).
    pub allreduce: allreduce::Algorithm,
    /// Broadcast and reduce use a pipelined chain from this many bytes on, a binomial
    /// tree below.
    pub chain_threshold_bytes: usize,
    /// Chunk size of every transfer.
    pub chunk_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            allreduce: allreduce::Algorithm::default(),
            chain_threshold_bytes: broadcast::DEFAULT_CHAIN_THRESHOLD,
            chunk_bytes: crate::exec::DEFAULT_CHUNK_BYTES,
        }
    }
}

/// One collective call's shape: which collective, over how many elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Collective {
    /// All-reduce of `len` elements.
    AllReduce {
        /// Elements per rank.
        len: usize,
    },
    /// Reduce-scatter: rank `i` receives `counts[i]` reduced elements.
    ReduceScatter {
        /// Per-rank output counts.
        counts: Vec<usize>,
    },
    /// All-gather: rank `i` contributes `counts[i]` elements.
    AllGather {
        /// Per-rank input counts.
        counts: Vec<usize>,
    },
    /// Broadcast of `len` elements from `root`.
    Broadcast {
        /// The sending rank.
        root: Rank,
        /// Elements.
        len: usize,
    },
    /// Reduce of `len` elements to `root`.
    Reduce {
        /// The receiving rank.
        root: Rank,
        /// Elements.
        len: usize,
    },
    /// Barrier.
    Barrier,
    /// Sparse all-gather spAG(P, P′): every holder of a chunk receives its owner's copy.
    SparseAllGather {
        /// Chunk lengths, owners and holders.
        placement: Placement,
    },
    /// Sparse reduce-scatter spRS(P′, P): each owner receives the ascending-rank sum of
    /// its chunk over the holders.
    SparseReduceScatter {
        /// Chunk lengths, owners and holders.
        placement: Placement,
    },
    /// All-to-all: rank `i` sends `counts[i][j]` elements to rank `j`.
    AllToAll {
        /// The `n × n` matrix of counts, rows by sender.
        counts: Vec<Vec<usize>>,
    },
    /// All-scan of a state of `len` units of `unit_bytes` bytes (one element of a
    /// built-in operator, or a [`crate::op::CustomOp`]'s unit); see [`plan::scan`].
    AllScan {
        /// Units of the state.
        len: usize,
        /// Bytes per unit.
        unit_bytes: usize,
        /// Inclusive (`x_0 ⊕ … ⊕ x_r`) or exclusive (`x_0 ⊕ … ⊕ x_{r-1}`).
        inclusive: bool,
        /// Scan order `n-1, …, 0` instead of `0, …, n-1`.
        reverse: bool,
        /// The algorithm as requested (resolved by size in [`Collective::plan`]).
        algorithm: scan::Algorithm,
        /// Identifies a custom operator (a hash of its name), 0 for a built-in one.
        op_id: u64,
    },
    /// All-reduce of `len` `f32` elements whose transfers carry min-max codes (see
    /// [`crate::quant`]); always the ring plan, whatever the tuning says.
    QuantizedAllReduce {
        /// Elements per rank.
        len: usize,
        /// The code width, part of the fingerprint.
        quantization: Quantization,
    },
}

impl Collective {
    /// This call's plan for `rank` of `n`.
    pub fn plan(&self, rank: Rank, n: usize, dtype: DType, tuning: &Tuning) -> Plan {
        let size = dtype.size();
        match self {
            Collective::AllReduce { len } => allreduce::plan(rank, n, *len, size, tuning.allreduce),
            Collective::ReduceScatter { counts } => gather::reduce_scatter_v(rank, counts),
            Collective::AllGather { counts } => gather::all_gather_v(rank, counts),
            Collective::Broadcast { root, len } => {
                broadcast::plan(rank, n, *root, *len, size, tuning.chain_threshold_bytes)
            }
            Collective::Reduce { root, len } => reduce::plan(rank, n, *root, *len, size, tuning.chain_threshold_bytes),
            Collective::Barrier => reduce::barrier(rank, n),
            Collective::SparseAllGather { placement } => sparse_plan::sparse_all_gather(rank, placement),
            Collective::SparseReduceScatter { placement } => sparse_plan::sparse_reduce_scatter(rank, placement),
            Collective::AllToAll { counts } => alltoall::plan(rank, counts),
            Collective::AllScan { len, unit_bytes, inclusive, reverse, algorithm, .. } => {
                scan::plan_full(rank, n, *len, *inclusive, *reverse, algorithm.resolve(*len, *unit_bytes))
            }
            Collective::QuantizedAllReduce { len, .. } => allreduce::ring(rank, n, *len),
        }
    }

    /// The codec the executor applies to every transfer of this collective, if any.
    pub fn codec(&self) -> Option<Codec> {
        match self {
            Collective::QuantizedAllReduce { quantization, .. } => Some(Codec::new(*quantization)),
            _ => None,
        }
    }

    /// Length of the working buffer in elements. For an all-to-all, whose buffer differs
    /// by rank, the largest over the ranks (see [`alltoall::working_len`]).
    pub fn working_len(&self) -> usize {
        match self {
            Collective::AllReduce { len }
            | Collective::Broadcast { len, .. }
            | Collective::Reduce { len, .. }
            | Collective::QuantizedAllReduce { len, .. } => *len,
            Collective::ReduceScatter { counts } | Collective::AllGather { counts } => counts.iter().sum(),
            Collective::Barrier => 0,
            Collective::SparseAllGather { placement } => placement.total_len(),
            Collective::SparseReduceScatter { placement } => placement.total_len() + placement.scratch_len(),
            Collective::AllToAll { counts } => {
                (0..counts.len()).map(|r| alltoall::working_len(r, counts)).max().unwrap_or(0)
            }
            Collective::AllScan { len, unit_bytes, algorithm, .. } => {
                scan::working_len(*len, algorithm.resolve(*len, *unit_bytes))
            }
        }
    }

    /// A hash of everything that must agree across ranks: the kind, lengths, root,
    /// element type and operator. Stable across processes and builds (FNV-1a).
    pub fn fingerprint(&self, dtype: DType, op: ReduceOp) -> u64 {
        let mut words: Vec<u64> = vec![dtype.code() as u64, op.code() as u64];
        match self {
            Collective::AllReduce { len } => words.extend([1, *len as u64]),
            Collective::ReduceScatter { counts } => {
                words.push(2);
                words.extend(counts.iter().map(|&c| c as u64));
            }
            Collective::AllGather { counts } => {
                words.push(3);
                words.extend(counts.iter().map(|&c| c as u64));
            }
            Collective::Broadcast { root, len } => words.extend([4, *root as u64, *len as u64]),
            Collective::Reduce { root, len } => words.extend([5, *root as u64, *len as u64]),
            Collective::Barrier => words.push(6),
            Collective::SparseAllGather { placement } => {
                words.push(0x5A01);
                words.extend(placement.words());
            }
            Collective::SparseReduceScatter { placement } => {
                words.push(0x5A02);
                words.extend(placement.words());
            }
            Collective::AllToAll { counts } => {
                words.extend([0x5A03, counts.len() as u64]);
                words.extend(counts.iter().flat_map(|row| row.iter().map(|&c| c as u64)));
            }
            Collective::AllScan { len, unit_bytes, inclusive, reverse, algorithm, op_id } => {
                let (alg, blocks) = match algorithm.resolve(*len, *unit_bytes) {
                    scan::Algorithm::Chain { blocks } => (1, blocks),
                    scan::Algorithm::RecursiveDoubling => (2, 0),
                    scan::Algorithm::Auto => (0, 0),
                };
                words.extend([7, *len as u64, *unit_bytes as u64, *inclusive as u64, *reverse as u64]);
                words.extend([alg, blocks as u64, *op_id]);
            }
            // A tag of its own ("QU"), the code width a word of the hash.
            Collective::QuantizedAllReduce { len, quantization } => {
                words.extend([0x5155, *len as u64, quantization.bits() as u64])
            }
        }
        fnv1a(words.iter().flat_map(|w| w.to_le_bytes()))
    }
}

/// FNV-1a hash of `bytes`: stable across processes and builds (used for fingerprints
/// and custom operators' ids).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Segment lengths of an equal split of `len` over `n` ranks.
pub fn equal_counts(len: usize, n: usize) -> Vec<usize> {
    plan::segments::equal(len, n).iter().map(|r| r.len()).collect()
}
