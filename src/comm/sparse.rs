//! Sparse collectives: sparse all-gather and reduce-scatter over a chunk placement
//! (FSSDP, see [`crate::plan::sparse`]) and the sparse all-reduce of `(index, value)`
//! pairs ([`Communicator::sparse_all_reduce`]).

use super::{elements, Communicator};
use crate::collective::Collective;
use crate::dtype::{DType, Element, Order, ReduceOp};
use crate::error::{Error, Result};
use crate::plan::sparse::Placement;

/// Bytes of one index of a sparse all-reduce.
const INDEX_BYTES: usize = std::mem::size_of::<u32>();

/// The result of a sparse all-reduce: which exchange ran, and the sum.
#[derive(Clone, Debug, PartialEq)]
pub enum SparseReduced<T> {
    /// The sparse exchange ran: the union of the indices, ascending, with their sums.
    Sparse {
        /// Indices, ascending, without duplicates.
        indices: Vec<u32>,
        /// `values[k]` is the sum at `indices[k]`.
        values: Vec<T>,
    },
    /// The density passed the crossover: the dense sum of the whole dimension.
    Dense(Vec<T>),
}

impl<T: Element> SparseReduced<T> {
    /// The sum as a dense vector of `dim` elements (zeros where no rank had an index).
    pub fn to_dense(&self, dim: usize) -> Vec<T> {
        match self {
            SparseReduced::Dense(v) => v.clone(),
            SparseReduced::Sparse { indices, values } => {
                let mut dense = vec![T::zeroed(); dim];
                for (&i, &v) in indices.iter().zip(values) {
                    if let Some(slot) = dense.get_mut(i as usize) {
                        *slot = v;
                    }
                }
                dense
            }
        }
    }

    /// Whether the dense exchange ran.
    pub fn is_dense(&self) -> bool {
        matches!(self, SparseReduced::Dense(_))
    }
}

/// The density (nonzeros per element, averaged over ranks) above which a sparse
/// all-reduce of `n` ranks switches to the dense exchange: `2·b_v / (n·(b_i + b_v))`,
/// with `b_i` and `b_v` the bytes of an index and a value.
///
/// Gathering the pairs moves about `n·nnz·(b_i + b_v)` bytes into each rank, a ring
/// all-reduce of the dense vector `2·(n-1)/n·D·b_v ≈ 2·D·b_v`; they are equal at this
/// density.
pub fn crossover_density(n: usize, index_bytes: usize, value_bytes: usize) -> f64 {
    2.0 * value_bytes as f64 / (n.max(1) as f64 * (index_bytes + value_bytes) as f64)
}

/// Whether a sparse all-reduce with `total_nnz` pairs over all ranks, of dimension
/// `dim` and values of `value_bytes`, takes the dense path: the average density
/// `total_nnz / (n·dim)` exceeds [`crossover_density`], computed exactly in integers
/// (`total_nnz·(b_i + b_v) > 2·b_v·dim`) so every rank decides alike.
pub fn takes_dense_path(total_nnz: u64, dim: usize, value_bytes: usize) -> bool {
    let lhs = total_nnz as u128 * (INDEX_BYTES + value_bytes) as u128;
    lhs > 2 * value_bytes as u128 * dim as u128
}

impl Communicator {
    /// Sparse all-gather spAG(P, P′): `buf` holds a slot for every chunk of `placement`
    /// ([`Placement::total_len`] elements, chunks in order); afterwards every holder's
    /// slot of a chunk holds the owner's bytes. Slots this rank does not hold are left
    /// as they are; chunks held only by their owner move nothing.
    ///
    /// Every rank passes the same placement, made for the current group size. On error
    /// `buf` is unchanged; the library does not retry (a placement names ranks): the
    /// caller makes a placement for the survivors and calls again.
    pub fn sparse_all_gather<T: Element>(&mut self, placement: &Placement, buf: &mut [T]) -> Result<()> {
        self.sparse_all_gather_raw(placement, bytemuck::cast_slice_mut(buf), T::DTYPE)
    }

    /// [`Communicator::sparse_all_gather`] on the bytes of elements of type `dtype`.
    pub fn sparse_all_gather_raw(&mut self, placement: &Placement, buf: &mut [u8], dtype: DType) -> Result<()> {
        self.check_placement(placement, elements(buf.len(), dtype, "buffer")?)?;
        let coll = Collective::SparseAllGather { placement: placement.clone() };
        self.run(&coll, dtype, ReduceOp::Sum, buf)
    }

    /// Sparse reduce-scatter spRS(P′, P): `buf` as for
    /// [`Communicator::sparse_all_gather`], holding this rank's gradients in the slots it
    /// holds. Afterwards each owner's slot holds the combination with `op` of the slots
    /// of all holders of that chunk, in ascending rank order (a left fold, the owner's
    /// own at its rank). Other slots are left as they are. `op` may not be `Avg`.
    ///
    /// On error `buf` is unchanged, and as for spAG the caller retries with a placement
    /// for the survivors.
    pub fn sparse_reduce_scatter<T: Element>(
        &mut self,
        placement: &Placement,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.sparse_reduce_scatter_raw(placement, bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// [`Communicator::sparse_reduce_scatter`] on the bytes of elements of type `dtype`.
    pub fn sparse_reduce_scatter_raw(
        &mut self,
        placement: &Placement,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        if op == ReduceOp::Avg {
            return Err(Error::InvalidArgument("sparse reduce-scatter does not average; use Sum and divide".into()));
        }
        self.check_placement(placement, elements(buf.len(), dtype, "buffer")?)?;
        let mut work = Vec::with_capacity(buf.len() + placement.scratch_len() * dtype.size());
        work.extend_from_slice(buf);
        work.resize(buf.len() + placement.scratch_len() * dtype.size(), 0);
        let coll = Collective::SparseReduceScatter { placement: placement.clone() };
        self.run(&coll, dtype, op, &mut work)?;
        buf.copy_from_slice(&work[..buf.len()]);
        Ok(())
    }

    pub(super) fn check_placement(&self, placement: &Placement, len: usize) -> Result<()> {
        let size = self.call_group()?.1;
        if placement.size() != size {
            return Err(Error::InvalidArgument(format!(
                "placement for {} ranks in a group of {size}",
                placement.size()
            )));
        }
        if placement.total_len() != len {
            return Err(Error::InvalidArgument(format!(
                "buffer of {len} elements for a placement of {} elements",
                placement.total_len()
            )));
        }
        Ok(())
    }

    /// Sums sparse vectors of dimension `dim` given as `(indices[k], values[k])` pairs
    /// (top-k gradients): every rank gets the same sum, bit for bit.
    ///
    /// First the pair counts are all-gathered. If the average density passes the
    /// crossover ([`takes_dense_path`]), every rank scatters its pairs into a dense
    /// vector and the dense vectors are all-reduced ([`SparseReduced::Dense`], summed in
    /// the all-reduce's fixed order, see [`crate::plan::allreduce`]). Otherwise the
    /// indices and values are all-gathered and merged locally: the result has the
    /// union of the indices, ascending, each summed as a left fold in ascending rank
    /// order (within a rank, in input order, duplicates allowed)
    /// ([`SparseReduced::Sparse`]).
    ///
    /// Inputs are never modified. With [`super::RetryPolicy::OnPeerLost`] a lost peer
    /// makes the whole exchange run again over the survivors; otherwise it returns
    /// [`Error::PeerLost`].
    ///
    /// ```
    /// use phalanx::{comm::SparseReduced, Communicator};
    /// let comms = Communicator::local_group(2, Default::default()).unwrap();
    /// let outs: Vec<SparseReduced<f32>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || {
    ///         let r = c.rank() as u32;
    ///         c.sparse_all_reduce(1000, &[7, 100 + r], &[1.0, 2.0]).unwrap()
    ///     })).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// let want = SparseReduced::Sparse { indices: vec![7, 100, 101], values: vec![2.0, 2.0, 2.0] };
    /// assert!(outs.iter().all(|o| o == &want));
    /// ```
    pub fn sparse_all_reduce<T: Element>(
        &mut self,
        dim: usize,
        indices: &[u32],
        values: &[T],
    ) -> Result<SparseReduced<T>> {
        let raw = self.sparse_all_reduce_raw(dim, indices, bytemuck::cast_slice(values), T::DTYPE)?;
        Ok(match raw {
            SparseReduced::Sparse { indices, values } => {
                SparseReduced::Sparse { indices, values: bytemuck::allocation::pod_collect_to_vec(&values) }
            }
            SparseReduced::Dense(v) => SparseReduced::Dense(bytemuck::allocation::pod_collect_to_vec(&v)),
        })
    }

    /// [`Communicator::sparse_all_reduce`] on the bytes of values of type `dtype`; the
    /// result's values are bytes too.
    pub fn sparse_all_reduce_raw(
        &mut self,
        dim: usize,
        indices: &[u32],
        values: &[u8],
        dtype: DType,
    ) -> Result<SparseReduced<u8>> {
        let nnz = elements(values.len(), dtype, "values")?;
        if nnz != indices.len() {
            return Err(Error::InvalidArgument(format!("{} indices but {nnz} values", indices.len())));
        }
        if let Some(i) = indices.iter().find(|&&i| i as usize >= dim) {
            return Err(Error::InvalidArgument(format!("index {i} outside dimension {dim}")));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let epoch = self.epoch();
            match self.sparse_all_reduce_once(dim, indices, values, dtype) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let again = self.block(async |p| p.retry_composite(epoch, attempt, &e).await)??;
                    if !again {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn sparse_all_reduce_once(
        &mut self,
        dim: usize,
        indices: &[u32],
        values: &[u8],
        dtype: DType,
    ) -> Result<SparseReduced<u8>> {
        let (n, size) = (self.call_group()?.1, dtype.size());
        // The dimension must agree too: it decides the path and the dense length.
        let mut counts = vec![0u64; 2 * n];
        self.all_gather(&[indices.len() as u64, dim as u64], &mut counts)?;
        if let Some(r) = (0..n).find(|&r| counts[2 * r + 1] != dim as u64) {
            return Err(Error::Mismatch {
                detail: format!("sparse all-reduce of dimension {dim} here, {} on rank {r}", counts[2 * r + 1]),
            });
        }
        let nnz: Vec<usize> = (0..n).map(|r| counts[2 * r] as usize).collect();
        // Counts come from peers: refuse a total no buffer could hold.
        let total = nnz
            .iter()
            .try_fold(0usize, |a, &c| a.checked_add(c))
            .filter(|t| t.checked_mul(size.max(INDEX_BYTES)).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or_else(|| Error::Mismatch { detail: format!("pair counts {nnz:?} overflow a buffer") })?;
        if takes_dense_path(total as u64, dim, size) {
            let mut dense = vec![0u8; dim * size];
            for (k, &i) in indices.iter().enumerate() {
                let slot = i as usize * size..(i as usize + 1) * size;
                let dst = &mut dense[slot];
                add_bytes(dtype, dst, &values[k * size..(k + 1) * size]);
            }
            self.all_reduce_raw(&mut dense, dtype, ReduceOp::Sum)?;
            return Ok(SparseReduced::Dense(dense));
        }
        let mut all_indices = vec![0u32; total];
        self.all_gather_v(indices, &mut all_indices, &nnz)?;
        let mut all_values = vec![0u8; total * size];
        self.all_gather_raw(values, &mut all_values, &nnz, dtype)?;
        Ok(merge(&all_indices, &all_values, dtype))
    }
}

/// `acc = acc + incoming` for one element of `dtype`.
fn add_bytes(dtype: DType, acc: &mut [u8], incoming: &[u8]) {
    crate::dtype::reduce_bytes(dtype, ReduceOp::Sum, acc, incoming, Order::IncomingRight);
}

/// Merges gathered pairs (rank order, each rank's in input order) into ascending unique
/// indices, each summed as a left fold in gathered order.
fn merge(indices: &[u32], values: &[u8], dtype: DType) -> SparseReduced<u8> {
    let size = dtype.size();
    let mut order: Vec<usize> = (0..indices.len()).collect();
    order.sort_by_key(|&k| indices[k]); // stable: ties keep rank order, then input order
    let mut out_indices: Vec<u32> = Vec::new();
    let mut out_values: Vec<u8> = Vec::with_capacity(indices.len() * size);
    for k in order {
        let v = &values[k * size..(k + 1) * size];
        if out_indices.last() == Some(&indices[k]) {
            let start = out_values.len() - size;
            add_bytes(dtype, &mut out_values[start..], v);
        } else {
            out_indices.push(indices[k]);
            out_values.extend_from_slice(v);
        }
    }
    SparseReduced::Sparse { indices: out_indices, values: out_values }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossover_matches_the_integer_test() {
        // n = 4, f32 values, u32 indices: crossover 2·4 / (4·8) = 1/4.
        assert_eq!(crossover_density(4, 4, 4), 0.25);
        let dim = 1000;
        // Average density total / (4·dim): dense strictly above 1/4.
        assert!(!takes_dense_path(1000, dim, 4));
        assert!(takes_dense_path(1001, dim, 4));
    }

    #[test]
    fn merge_sums_in_gathered_order() {
        let idx = [5u32, 1, 5, 1];
        let vals: Vec<u8> = bytemuck::cast_slice(&[1.0f32, 2.0, 1e8, 3.0]).to_vec();
        let SparseReduced::Sparse { indices, values } = merge(&idx, &vals, DType::F32) else {
            panic!("merge is sparse");
        };
        assert_eq!(indices, vec![1, 5]);
        assert_eq!(bytemuck::pod_collect_to_vec::<u8, f32>(&values), vec![5.0, 1.0 + 1e8]);
    }
}
