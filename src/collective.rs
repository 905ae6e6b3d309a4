//! What a collective call is, independent of who runs it: its plan and fingerprint.

use crate::dtype::{DType, ReduceOp};
use crate::plan::{self, allreduce, broadcast, gather, reduce, Plan, Rank};
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

    /// Length of the working buffer in elements.
    pub fn working_len(&self) -> usize {
        match self {
            Collective::AllReduce { len }
            | Collective::Broadcast { len, .. }
            | Collective::Reduce { len, .. }
            | Collective::QuantizedAllReduce { len, .. } => *len,
            Collective::ReduceScatter { counts } | Collective::AllGather { counts } => counts.iter().sum(),
            Collective::Barrier => 0,
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
            // A tag of its own ("QU"), the code width a word of the hash.
            Collective::QuantizedAllReduce { len, quantization } => {
                words.extend([0x5155, *len as u64, quantization.bits() as u64])
            }
        }
        fnv1a(words.iter().flat_map(|w| w.to_le_bytes()))
    }
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Segment lengths of an equal split of `len` over `n` ranks.
pub fn equal_counts(len: usize, n: usize) -> Vec<usize> {
    plan::segments::equal(len, n).iter().map(|r| r.len()).collect()
}
