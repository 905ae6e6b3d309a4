//! [`Communicator`]: the object users hold to run collectives.

use std::sync::Arc;

use crate::collective::{Collective, Tuning};
use crate::dtype::{divide_bytes, DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{self, AbortSignal, Call};
use crate::plan::Rank;
use crate::transport::{mem, Link};

/// Settings of a communicator. Every rank of a group must use the same [`Tuning`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Algorithm thresholds and chunk size.
    pub tuning: Tuning,
    /// Frames a link buffers before its sender waits (in-memory transport).
    pub link_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tuning: Tuning::default(),
            link_capacity: 16,
        }
    }
}

/// One rank's handle on a group: runs collectives with the other ranks.
///
/// Calls block the calling thread until the collective completes on this rank. After
/// an error the caller's buffers hold exactly what they held before the call.
///
/// ```
/// use phalanx::{Communicator, ReduceOp};
/// let comms = Communicator::local_group(3, Default::default()).unwrap();
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let handles: Vec<_> = comms
///         .into_iter()
///         .map(|mut c| s.spawn(move || {
///             let mut x = vec![c.rank() as f32 + 1.0; 4];
///             c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
///             x
///         }))
///         .collect();
///     handles.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(sums.iter().all(|x| x == &vec![6.0; 4]));
/// ```
pub struct Communicator {
    rank: Rank,
    size: usize,
    links: Vec<Option<Arc<dyn Link>>>,
    abort: AbortSignal,
    epoch: u64,
    seq: u64,
    config: Config,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Communicator {
    /// `n` connected communicators for ranks `0..n` of one process, over the in-memory
    /// transport. Move each to its own thread: collectives block until all ranks call.
    ///
    /// The group shares one abort signal, standing in for the master of a networked
    /// group: when any rank's collective fails (a peer dropped its communicator, a
    /// mismatch), every rank's collective in flight fails with the same error.
    pub fn local_group(n: usize, config: Config) -> Result<Vec<Communicator>> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "a group needs at least one rank".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .thread_name("phalanx-local")
            .build()
            .map_err(|e| Error::InvalidArgument(format!("cannot start the runtime: {e}")))?;
        let runtime = Arc::new(runtime);
        let abort = AbortSignal::new();
        let comms = mem::mesh(n, config.link_capacity)
            .into_iter()
            .enumerate()
            .map(|(rank, links)| Communicator {
                rank,
                size: n,
                links,
                abort: abort.clone(),
                epoch: 0,
                seq: 0,
                config,
                runtime: runtime.clone(),
            })
            .collect();
        Ok(comms)
    }

    /// This communicator's rank, `0..size()`.
    pub fn rank(&self) -> Rank {
        self.rank
    }

    /// The number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Replaces every element by the reduction of that element over all ranks.
    ///
    /// All ranks must pass buffers of the same length and type, and the same `op`.
    /// See [`crate::plan::allreduce`] for the order in which contributions combine.
    pub fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let coll = Collective::AllReduce { len: buf.len() };
        let bytes = bytemuck::cast_slice_mut(buf);
        self.run(&coll, T::DTYPE, op, bytes)?;
        self.finish_avg(op, T::DTYPE, bytemuck::cast_slice_mut(buf));
        Ok(())
    }

    /// Reduces `input` (`size() * output.len()` elements on every rank) and leaves
    /// segment `rank()` of the result in `output`.
    pub fn reduce_scatter<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let counts = vec![output.len(); self.size];
        self.reduce_scatter_v(input, output, &counts, op)
    }

    /// Reduce-scatter with uneven segments: rank `i` receives `counts[i]` elements, and
    /// `input` holds `counts.iter().sum()` elements on every rank.
    pub fn reduce_scatter_v<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        counts: &[usize],
        op: ReduceOp,
    ) -> Result<()> {
        self.check_counts(counts, input.len(), "input")?;
        if counts[self.rank] != output.len() {
            return Err(Error::InvalidArgument(format!(
                "output holds {} elements, counts[{}] = {}",
                output.len(),
                self.rank,
                counts[self.rank]
            )));
        }
        let mut work = input.to_vec();
        let coll = Collective::ReduceScatter {
            counts: counts.to_vec(),
        };
        self.run(&coll, T::DTYPE, op, bytemuck::cast_slice_mut(&mut work))?;
        let start: usize = counts[..self.rank].iter().sum();
        output.copy_from_slice(&work[start..start + output.len()]);
        self.finish_avg(op, T::DTYPE, bytemuck::cast_slice_mut(output));
        Ok(())
    }

    /// Concatenates every rank's `input` (equal lengths) into `output`, in rank order.
    pub fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let counts = vec![input.len(); self.size];
        self.all_gather_v(input, output, &counts)
    }

    /// All-gather with uneven contributions: rank `i` contributes `counts[i]` elements.
    pub fn all_gather_v<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
        counts: &[usize],
    ) -> Result<()> {
        self.check_counts(counts, output.len(), "output")?;
        if counts[self.rank] != input.len() {
            return Err(Error::InvalidArgument(format!(
                "input holds {} elements, counts[{}] = {}",
                input.len(),
                self.rank,
                counts[self.rank]
            )));
        }
        let mut work = output.to_vec();
        let start: usize = counts[..self.rank].iter().sum();
        work[start..start + input.len()].copy_from_slice(input);
        let coll = Collective::AllGather {
            counts: counts.to_vec(),
        };
        self.run(
            &coll,
            T::DTYPE,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(&mut work),
        )?;
        output.copy_from_slice(&work);
        Ok(())
    }

    /// Copies `root`'s `buf` into every rank's `buf`.
    pub fn broadcast<T: Element>(&mut self, buf: &mut [T], root: Rank) -> Result<()> {
        self.check_root(root)?;
        let coll = Collective::Broadcast {
            root,
            len: buf.len(),
        };
        self.run(
            &coll,
            T::DTYPE,
            ReduceOp::Sum,
            bytemuck::cast_slice_mut(buf),
        )
    }

    /// Reduces every rank's `buf` into `root`'s `buf`; other ranks' buffers are left as
    /// they were. See [`crate::plan::reduce`] for the order.
    pub fn reduce<T: Element>(&mut self, buf: &mut [T], root: Rank, op: ReduceOp) -> Result<()> {
        self.check_root(root)?;
        let coll = Collective::Reduce {
            root,
            len: buf.len(),
        };
        if self.rank == root {
            self.run(&coll, T::DTYPE, op, bytemuck::cast_slice_mut(buf))?;
            self.finish_avg(op, T::DTYPE, bytemuck::cast_slice_mut(buf));
        } else {
            let mut scratch = buf.to_vec();
            self.run(&coll, T::DTYPE, op, bytemuck::cast_slice_mut(&mut scratch))?;
        }
        Ok(())
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&mut self) -> Result<()> {
        self.run(&Collective::Barrier, DType::U8, ReduceOp::Sum, &mut [])
    }

    fn check_counts(&self, counts: &[usize], total: usize, what: &str) -> Result<()> {
        if counts.len() != self.size {
            return Err(Error::InvalidArgument(format!(
                "{} counts for a group of {}",
                counts.len(),
                self.size
            )));
        }
        if counts.iter().sum::<usize>() != total {
            return Err(Error::InvalidArgument(format!(
                "{what} holds {total} elements, counts sum to {}",
                counts.iter().sum::<usize>()
            )));
        }
        Ok(())
    }

    fn check_root(&self, root: Rank) -> Result<()> {
        if root >= self.size {
            return Err(Error::InvalidArgument(format!(
                "root {root} outside a group of {}",
                self.size
            )));
        }
        Ok(())
    }

    fn finish_avg(&self, op: ReduceOp, dtype: DType, buf: &mut [u8]) {
        if op == ReduceOp::Avg {
            divide_bytes(dtype, buf, self.size);
        }
    }

    /// Plans and runs one collective on `buf`, restoring it on error and telling the
    /// rest of the group to stop.
    fn run(&mut self, coll: &Collective, dtype: DType, op: ReduceOp, buf: &mut [u8]) -> Result<()> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::InvalidArgument(
                "blocking collective called from inside an async runtime; call it from a plain thread".into(),
            ));
        }
        self.seq += 1;
        let plan = coll.plan(self.rank, self.size, dtype, &self.config.tuning);
        let call = Call {
            plan: &plan,
            dtype,
            op,
            epoch: self.epoch,
            seq: self.seq,
            fingerprint: coll.fingerprint(dtype, op),
            chunk_bytes: self.config.tuning.chunk_bytes,
        };
        let result = self.runtime.block_on(exec::execute_restoring(
            &call,
            buf,
            &self.links,
            &self.abort,
        ));
        if let Err(e) = &result {
            self.abort.fire(e.clone());
        }
        result
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Closing our links is how the other ranks learn that this one is gone.
        self.links.iter().flatten().for_each(|l| l.close());
    }
}
