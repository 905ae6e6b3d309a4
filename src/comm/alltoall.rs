//! All-to-all with equal and uneven counts: [`Communicator::all_to_all`] and
//! [`Communicator::all_to_all_v`] (see [`crate::plan::alltoall`] for the algorithm).

use super::{elements, Communicator};
use crate::collective::Collective;
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Error, Result};

impl Communicator {
    /// Sends part `j` of `input` to rank `j` and leaves the part from rank `i` in part `i`
    /// of `output`: `input` and `output` hold `size()` parts of equal length on every rank.
    /// On error `output` is unchanged.
    ///
    /// ```
    /// use phalanx::Communicator;
    /// let comms = Communicator::local_group(2, Default::default()).unwrap();
    /// let outs: Vec<Vec<i32>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || {
    ///         let r = c.rank() as i32;
    ///         let mut out = vec![0; 2];
    ///         c.all_to_all(&[10 * r, 10 * r + 1], &mut out).unwrap();
    ///         out
    ///     })).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// assert_eq!(outs, vec![vec![0, 10], vec![1, 11]]);
    /// ```
    pub fn all_to_all<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        self.all_to_all_raw(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output), T::DTYPE)
    }

    /// [`Communicator::all_to_all`] on the bytes of elements of type `dtype`.
    pub fn all_to_all_raw(&mut self, input: &[u8], output: &mut [u8], dtype: DType) -> Result<()> {
        let n = self.call_group()?.1;
        let (len, out_len) = (elements(input.len(), dtype, "input")?, elements(output.len(), dtype, "output")?);
        if len % n != 0 || out_len != len {
            return Err(Error::InvalidArgument(format!(
                "all-to-all over {n} ranks needs input and output of equal length divisible by {n}, got {len} and {out_len}"
            )));
        }
        let counts = vec![vec![len / n; n]; n];
        let received = self.run_all_to_all(input, counts, dtype)?;
        output.copy_from_slice(&received);
        Ok(())
    }

    /// All-to-all with uneven counts: this rank sends `input[offset_j..offset_j +
    /// send_counts[j]]` to rank `j` (parts in rank order). Returns what it received, the
    /// parts in rank order, and how many elements came from each rank.
    ///
    /// Ranks pass only their own send counts: the counts are first all-gathered (one
    /// small collective), so every rank knows the whole matrix, then the data moves.
    /// Since counts name ranks, a failure is not retried by the library: it returns
    /// [`Error::PeerLost`] (inputs untouched) and the caller recomputes its counts for
    /// the survivors.
    pub fn all_to_all_v<T: Element>(&mut self, input: &[T], send_counts: &[usize]) -> Result<(Vec<T>, Vec<usize>)> {
        let (bytes, recv_counts) = self.all_to_all_v_raw(bytemuck::cast_slice(input), send_counts, T::DTYPE)?;
        Ok((bytemuck::allocation::pod_collect_to_vec(&bytes), recv_counts))
    }

    /// [`Communicator::all_to_all_v`] on bytes; counts are in elements.
    pub fn all_to_all_v_raw(
        &mut self,
        input: &[u8],
        send_counts: &[usize],
        dtype: DType,
    ) -> Result<(Vec<u8>, Vec<usize>)> {
        let rank = self.check_counts(send_counts, elements(input.len(), dtype, "input")?, "input")?;
        let n = send_counts.len();
        let mine: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let mut all = vec![0u64; n * n];
        self.all_gather(&mine, &mut all)?;
        let counts: Vec<Vec<usize>> =
            all.chunks(n.max(1)).map(|row| row.iter().map(|&c| c as usize).collect()).collect();
        // Counts come from peers: refuse what no buffer could hold (every rank sees the
        // same matrix, so every rank refuses alike).
        let size = dtype.size();
        let overflows =
            |j: usize| !fits(counts.iter().map(|row| row[j]), size) || !fits(counts[j].iter().copied(), size);
        if let Some(bad) = (0..n).find(|&j| overflows(j)) {
            return Err(Error::Mismatch {
                detail: format!("all-to-all counts to or from rank {bad} overflow a buffer"),
            });
        }
        let recv_counts = counts.iter().map(|row| row[rank]).collect();
        Ok((self.run_all_to_all(input, counts, dtype)?, recv_counts))
    }

    /// Runs the all-to-all plan with this rank's `input` as send area; returns the
    /// receive area.
    fn run_all_to_all(&mut self, input: &[u8], counts: Vec<Vec<usize>>, dtype: DType) -> Result<Vec<u8>> {
        let rank = self.call_group()?.0;
        let recv_len: usize = counts.iter().map(|row| row[rank]).sum();
        let mut work = Vec::with_capacity(input.len() + recv_len * dtype.size());
        work.extend_from_slice(input);
        work.resize(input.len() + recv_len * dtype.size(), 0);
        self.run(&Collective::AllToAll { counts }, dtype, ReduceOp::Sum, &mut work)?;
        Ok(work.split_off(input.len()))
    }
}

/// Whether `counts` elements of `size` bytes fit in one buffer.
fn fits(mut counts: impl Iterator<Item = usize>, size: usize) -> bool {
    counts
        .try_fold(0usize, |a, c| a.checked_add(c))
        .and_then(|t| t.checked_mul(size))
        .is_some_and(|b| b <= isize::MAX as usize)
}
