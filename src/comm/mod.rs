//! [`Communicator`]: the object users hold to run collectives.

mod alltoall;
mod datalinks;
mod local;
mod net;
mod p2p;
mod quant;
mod scan;
mod sparse;
mod subgroup;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::collective::{Collective, Tuning};
use crate::dtype::{divide_bytes, DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::membership::wire::SyncStrategy;
use crate::membership::PeerId;
use crate::plan::Rank;
use crate::state::SharedState;
use crate::transport::endpoint::Endpoint;

pub use net::{AsyncPeer, ConnectOptions, RetryPolicy, SyncReport};
pub use scan::{builtin_identity, ScanOptions};
pub use sparse::{crossover_density, takes_dense_path, SparseReduced};

/// Settings of a local (in-process) group. Every rank must use the same [`Tuning`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Algorithm thresholds and chunk size.
    pub tuning: Tuning,
    /// Frames a link buffers before its sender waits (in-memory transport).
    pub link_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { tuning: Tuning::default(), link_capacity: 16 }
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
    backend: Backend,
}

enum Backend {
    Local(local::Local),
    Net(Box<net::Net>),
}

impl Communicator {
    /// `n` connected communicators for ranks `0..n` of one process, over the in-memory
    /// transport. Move each to its own thread: collectives block until all ranks call.
    ///
    /// The group shares one abort signal, standing in for the master of a networked
    /// group: when any rank's collective fails (a peer dropped its communicator, a
    /// mismatch), every rank's collective in flight fails with the same error.
    pub fn local_group(n: usize, config: Config) -> Result<Vec<Communicator>> {
        Ok(local::group(n, config)?.into_iter().map(|l| Communicator { backend: Backend::Local(l) }).collect())
    }

    /// Joins the group whose master listens at `master`, over QUIC, and waits until
    /// admitted (the first peer at once; later ones when the members next call
    /// [`Communicator::update_topology`]).
    pub fn connect(master: SocketAddr, options: ConnectOptions) -> Result<Communicator> {
        Ok(Communicator { backend: Backend::Net(Box::new(net::Net::connect_quic(master, options)?)) })
    }

    /// Like [`Communicator::connect`], over a given endpoint (e.g. an in-memory network
    /// in tests). `make_endpoint` runs inside the communicator's runtime.
    pub fn connect_with(
        make_endpoint: impl FnOnce() -> Result<Arc<dyn Endpoint>>,
        master: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Communicator> {
        Ok(Communicator { backend: Backend::Net(Box::new(net::Net::connect(make_endpoint, master, options)?)) })
    }

    /// This communicator's rank, `0..size()`.
    pub fn rank(&self) -> Rank {
        match &self.backend {
            Backend::Local(l) => l.rank,
            Backend::Net(n) => n.peer().rank(),
        }
    }

    /// The number of ranks in the group.
    pub fn size(&self) -> usize {
        match &self.backend {
            Backend::Local(l) => l.size,
            Backend::Net(n) => n.peer().size(),
        }
    }

    /// The epoch of the view this communicator is in (0 for local groups).
    pub fn epoch(&self) -> u64 {
        match &self.backend {
            Backend::Local(_) => 0,
            Backend::Net(n) => n.peer().epoch(),
        }
    }

    /// This peer's identity in a networked group (its rank in a local one).
    pub fn peer_id(&self) -> PeerId {
        match &self.backend {
            Backend::Local(l) => l.rank as PeerId,
            Backend::Net(n) => n.peer().id(),
        }
    }

    /// The ids of the current view's members, in rank order.
    pub fn members(&self) -> Vec<PeerId> {
        match &self.backend {
            Backend::Local(l) => (0..l.size as PeerId).collect(),
            Backend::Net(n) => n.peer().members(),
        }
    }

    /// How many peers are waiting to join (networked groups).
    pub fn peers_pending(&self) -> usize {
        match &self.backend {
            Backend::Local(_) => 0,
            Backend::Net(n) => n.peer().peers_pending(),
        }
    }

    /// Synchronises with the other members and admits any waiting joiners: every member
    /// must call it; it returns when the master has settled the next view. A local
    /// group has nothing to update.
    ///
    /// A newly admitted peer's first call returns at once: the members' round that
    /// admitted it counts as its own, so a training loop can call `update_topology` at
    /// the top of every step on joiners and members alike. Calling a collective while
    /// others are in `update_topology` (or the reverse) fails with [`Error::Mismatch`].
    pub fn update_topology(&mut self) -> Result<()> {
        match &mut self.backend {
            Backend::Local(_) => Ok(()),
            Backend::Net(n) => n.update_topology(),
        }
    }

    /// Makes `state` bit-identical on every member: tensors whose content differs from
    /// the agreed content (see [`SyncStrategy`]) are fetched from a member holding it.
    /// Every member must call it with the same tensor names in the same order. On error
    /// `state` is unchanged.
    pub fn sync_shared_state(&mut self, state: &mut SharedState, strategy: SyncStrategy) -> Result<SyncReport> {
        match &mut self.backend {
            Backend::Local(_) => Err(Error::InvalidArgument("shared-state sync needs a networked group".into())),
            Backend::Net(n) => n.sync_shared_state(state, strategy),
        }
    }

    /// Starts an all-reduce of `buf` and returns at once (networked groups only): the
    /// collective runs in the background while the caller computes, and
    /// [`PendingAllReduce::wait`] returns the reduced buffer. Several may be in flight;
    /// every peer must start them in the same order. A started collective is not
    /// retried: on a lost peer `wait` returns the error and the original buffer.
    pub fn all_reduce_start<T: Element>(&mut self, buf: Vec<T>, op: ReduceOp) -> Result<PendingAllReduce<T>> {
        let bytes = bytemuck::cast_slice(&buf).to_vec();
        let raw = self.all_reduce_start_raw(bytes, T::DTYPE, op)?;
        Ok(PendingAllReduce { raw, _t: std::marker::PhantomData })
    }

    /// [`Communicator::all_reduce_start`] on the bytes of elements of type `dtype`.
    pub fn all_reduce_start_raw(&mut self, buf: Vec<u8>, dtype: DType, op: ReduceOp) -> Result<PendingRaw> {
        let Backend::Net(n) = &mut self.backend else {
            return Err(Error::InvalidArgument("non-blocking collectives need a networked group".into()));
        };
        let len = elements(buf.len(), dtype, "buffer")?;
        let (task, runtime) = n.start(Collective::AllReduce { len }, dtype, op, buf);
        Ok(PendingRaw { task, runtime, dtype, op })
    }

    /// Leaves the group gracefully: the others see a new view without this peer.
    pub fn leave(self) {
        if let Backend::Net(n) = self.backend {
            n.leave();
        }
    }

    /// Replaces every element by the reduction of that element over all ranks.
    ///
    /// All ranks must pass buffers of the same length and type, and the same `op`.
    /// See [`crate::plan::allreduce`] for the order in which contributions combine.
    pub fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// Reduces `input` (`size() * output.len()` elements on every rank) and leaves
    /// segment `rank()` of the result in `output`.
    pub fn reduce_scatter<T: Element>(&mut self, input: &[T], output: &mut [T], op: ReduceOp) -> Result<()> {
        let counts = vec![output.len(); self.size()];
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
        self.reduce_scatter_raw(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output), counts, T::DTYPE, op)
    }

    /// Concatenates every rank's `input` (equal lengths) into `output`, in rank order.
    pub fn all_gather<T: Element>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let counts = vec![input.len(); self.size()];
        self.all_gather_v(input, output, &counts)
    }

    /// All-gather with uneven contributions: rank `i` contributes `counts[i]` elements.
    pub fn all_gather_v<T: Element>(&mut self, input: &[T], output: &mut [T], counts: &[usize]) -> Result<()> {
        self.all_gather_raw(bytemuck::cast_slice(input), bytemuck::cast_slice_mut(output), counts, T::DTYPE)
    }

    /// Copies `root`'s `buf` into every rank's `buf`.
    pub fn broadcast<T: Element>(&mut self, buf: &mut [T], root: Rank) -> Result<()> {
        self.broadcast_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, root)
    }

    /// Reduces every rank's `buf` into `root`'s `buf`; other ranks' buffers are left as
    /// they were. See [`crate::plan::reduce`] for the order.
    pub fn reduce<T: Element>(&mut self, buf: &mut [T], root: Rank, op: ReduceOp) -> Result<()> {
        self.reduce_raw(bytemuck::cast_slice_mut(buf), T::DTYPE, root, op)
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&mut self) -> Result<()> {
        self.run(&Collective::Barrier, DType::U8, ReduceOp::Sum, &mut []).map(|_| ())
    }

    /// [`Communicator::all_reduce`] on the bytes of elements of type `dtype` (for
    /// bindings that know the type only at run time).
    pub fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let len = elements(buf.len(), dtype, "buffer")?;
        let contributors = self.run(&Collective::AllReduce { len }, dtype, op, buf)?;
        finish_avg(op, dtype, buf, contributors);
        Ok(())
    }

    /// [`Communicator::reduce_scatter_v`] on bytes; `counts` are in elements.
    pub fn reduce_scatter_raw(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        counts: &[usize],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (input_len, output_len) =
            (elements(input.len(), dtype, "input")?, elements(output.len(), dtype, "output")?);
        self.check_counts(counts, input_len, "input")?;
        let rank = self.rank();
        if counts[rank] != output_len {
            return Err(Error::InvalidArgument(format!(
                "output holds {output_len} elements, counts[{rank}] = {}",
                counts[rank]
            )));
        }
        let mut work = input.to_vec();
        let coll = Collective::ReduceScatter { counts: counts.to_vec() };
        let contributors = self.run(&coll, dtype, op, &mut work)?;
        let start = counts[..rank].iter().sum::<usize>() * dtype.size();
        output.copy_from_slice(&work[start..start + output.len()]);
        finish_avg(op, dtype, output, contributors);
        Ok(())
    }

    /// [`Communicator::all_gather_v`] on bytes; `counts` are in elements.
    pub fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], counts: &[usize], dtype: DType) -> Result<()> {
        let (input_len, output_len) =
            (elements(input.len(), dtype, "input")?, elements(output.len(), dtype, "output")?);
        self.check_counts(counts, output_len, "output")?;
        let rank = self.rank();
        if counts[rank] != input_len {
            return Err(Error::InvalidArgument(format!(
                "input holds {input_len} elements, counts[{rank}] = {}",
                counts[rank]
            )));
        }
        let mut work = output.to_vec();
        let start = counts[..rank].iter().sum::<usize>() * dtype.size();
        work[start..start + input.len()].copy_from_slice(input);
        let coll = Collective::AllGather { counts: counts.to_vec() };
        self.run(&coll, dtype, ReduceOp::Sum, &mut work)?;
        output.copy_from_slice(&work);
        Ok(())
    }

    /// [`Communicator::broadcast`] on bytes.
    pub fn broadcast_raw(&mut self, buf: &mut [u8], dtype: DType, root: Rank) -> Result<()> {
        self.check_root(root)?;
        let len = elements(buf.len(), dtype, "buffer")?;
        self.run(&Collective::Broadcast { root, len }, dtype, ReduceOp::Sum, buf).map(|_| ())
    }

    /// [`Communicator::reduce`] on bytes.
    pub fn reduce_raw(&mut self, buf: &mut [u8], dtype: DType, root: Rank, op: ReduceOp) -> Result<()> {
        self.check_root(root)?;
        let coll = Collective::Reduce { root, len: elements(buf.len(), dtype, "buffer")? };
        if self.rank() == root {
            let contributors = self.run(&coll, dtype, op, buf)?;
            finish_avg(op, dtype, buf, contributors);
        } else {
            let mut scratch = buf.to_vec();
            self.run(&coll, dtype, op, &mut scratch)?;
        }
        Ok(())
    }

    fn check_counts(&self, counts: &[usize], total: usize, what: &str) -> Result<()> {
        if counts.len() != self.size() {
            return Err(Error::InvalidArgument(format!("{} counts for a group of {}", counts.len(), self.size())));
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
        if root >= self.size() {
            return Err(Error::InvalidArgument(format!("root {root} outside a group of {}", self.size())));
        }
        Ok(())
    }

    /// Runs one collective on `buf`; returns how many ranks contributed.
    fn run(&mut self, coll: &Collective, dtype: DType, op: ReduceOp, buf: &mut [u8]) -> Result<usize> {
        self.run_with(coll, dtype, op, None, buf)
    }

    /// [`Communicator::run`] with a user-defined operator in place of `op`.
    fn run_with(
        &mut self,
        coll: &Collective,
        dtype: DType,
        op: ReduceOp,
        custom: Option<&dyn crate::op::CustomOp>,
        buf: &mut [u8],
    ) -> Result<usize> {
        not_in_runtime("collective")?;
        match &mut self.backend {
            Backend::Local(l) => l.run_with(coll, dtype, op, custom, buf),
            Backend::Net(n) => n.run_with(coll, dtype, op, custom, buf),
        }
    }
}

/// Blocking calls park the calling thread on the communicator's runtime, which would
/// deadlock (or panic) from inside another runtime: refuse them there.
fn not_in_runtime(what: &str) -> Result<()> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Runtime {
            reason: format!("blocking {what} called from inside an async runtime; call it from a plain thread"),
        });
    }
    Ok(())
}

/// The number of `dtype` elements in `bytes` bytes, or an error naming `what`.
fn elements(bytes: usize, dtype: DType, what: &str) -> Result<usize> {
    if bytes % dtype.size() != 0 {
        return Err(Error::InvalidArgument(format!(
            "{what} of {bytes} bytes is not a whole number of {dtype} elements ({} bytes each)",
            dtype.size()
        )));
    }
    Ok(bytes / dtype.size())
}

/// An all-reduce started by [`Communicator::all_reduce_start`].
pub struct PendingAllReduce<T: Element> {
    raw: PendingRaw,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Element> PendingAllReduce<T> {
    /// Waits for the collective and returns its outcome with the buffer: reduced on
    /// success, exactly as it was passed to `all_reduce_start` on error.
    pub fn wait(self) -> (Result<()>, Vec<T>) {
        let (result, bytes) = self.raw.wait();
        (result, bytemuck::allocation::pod_collect_to_vec(&bytes))
    }
}

/// An all-reduce started by [`Communicator::all_reduce_start_raw`].
pub struct PendingRaw {
    task: net::Started,
    runtime: Arc<tokio::runtime::Runtime>,
    dtype: DType,
    op: ReduceOp,
}

impl PendingRaw {
    /// Waits for the collective: its outcome, and the buffer (reduced on success, as it
    /// was passed on error). Returns an empty buffer only if called from inside an async
    /// runtime (an error) or if the collective's task panicked.
    pub fn wait(self) -> (Result<()>, Vec<u8>) {
        if tokio::runtime::Handle::try_current().is_ok() {
            return (Err(Error::Runtime { reason: "wait called from inside an async runtime".into() }), Vec::new());
        }
        match self.runtime.block_on(self.task) {
            Ok((result, mut bytes)) => {
                let result = result.map(|contributors| finish_avg(self.op, self.dtype, &mut bytes, contributors));
                (result, bytes)
            }
            Err(e) => (Err(Error::Aborted { reason: format!("collective task failed: {e}") }), Vec::new()),
        }
    }

    /// Whether the collective has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The second half of `Avg`: divides by the number of contributors.
fn finish_avg(op: ReduceOp, dtype: DType, buf: &mut [u8], contributors: usize) {
    if op == ReduceOp::Avg {
        divide_bytes(dtype, buf, contributors);
    }
}
