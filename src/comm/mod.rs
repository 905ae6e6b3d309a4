//! [`Communicator`]: the object users hold to run collectives.
//!
//! A communicator is one [`AsyncPeer`] and a runtime to block on. Every group is a
//! networked group: [`Communicator::local_group`] runs an embedded master over the
//! in-memory network, [`Communicator::connect`] joins a master over QUIC, so both take
//! the same path (see `comm::peer`).

mod alltoall;
mod datalinks;
mod device_id;
mod eager;
mod local;
mod options;
mod p2p;
mod p2p_pending;
mod peer;
mod quant;
mod scan;
mod sparse;
pub(crate) mod started;
mod subgroup;
mod sync;
mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::collective::{Collective, Tuning};
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::membership::PeerId;
use crate::plan::Rank;
use crate::state::{SharedState, SyncStrategy};
use crate::transport::endpoint::Endpoint;
use crate::transport::quic::QuicEndpoint;

pub use crate::membership::client::{ControlConfig, DEFAULT_HEARTBEAT_MS};
pub use crate::transport::demux::DEFAULT_QUEUE_FRAMES;
pub use options::{ConnectOptions, DataTransport, RetryPolicy, SyncReport};
pub use p2p_pending::{PendingP2p, PendingP2pRaw};
pub use peer::AsyncPeer;
pub use scan::{builtin_identity, ScanOptions};
pub use sparse::{crossover_density, takes_dense_path, SparseReduced};
pub use started::{Pending, PendingAllToAll};
pub use traffic::{PeerTraffic, Traffic};

use peer::{CallSpec, Scope};

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
    runtime: Arc<tokio::runtime::Runtime>,
    /// Present until [`Communicator::leave`] takes it.
    peer: Option<AsyncPeer>,
    /// An in-process group's master, kept alive while any of its ranks is.
    _group: Option<Arc<local::LocalGroup>>,
}

/// The runtime a communicator blocks on, with `workers` worker threads, so that the data
/// links, the control connection and a started collective make progress while the
/// caller's thread waits (a blocking call runs its executor on the caller's thread).
fn runtime(name: &str, workers: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name(name)
        .build()
        .map_err(|e| Error::Runtime { reason: format!("cannot start the runtime: {e}") })
}

/// Worker threads for a connected peer's runtime: two, or one on a host of at most two
/// cores. There the peer's processes already outnumber the cores, and a second worker
/// only adds wake-ups: tokio wakes an idle worker to look for work whenever a socket
/// becomes ready, which cost a context switch per frame (docs/PERF.md, "Fewer
/// wake-ups per small call": with one worker, 4 KiB to 64 MiB ×0.99–1.25 there).
fn peer_workers() -> usize {
    match std::thread::available_parallelism() {
        Ok(cores) if cores.get() <= 2 => 1,
        _ => 2,
    }
}

impl Communicator {
    fn new(runtime: Arc<tokio::runtime::Runtime>, peer: AsyncPeer, group: Option<Arc<local::LocalGroup>>) -> Self {
        Communicator { runtime, peer: Some(peer), _group: group }
    }

    /// `n` connected communicators for ranks `0..n` of one process. Move each to its
    /// own thread: collectives block until all ranks call.
    ///
    /// The group runs an embedded master over the in-memory network, so it keeps the
    /// networked contract: when a rank's collective fails (a peer dropped its
    /// communicator, a mismatch), every rank's collective in flight fails, and all
    /// ranks agree on whether each collective completed. A lost rank ends a local
    /// group: every later collective fails with [`Error::PeerLost`].
    pub fn local_group(n: usize, config: Config) -> Result<Vec<Communicator>> {
        local::group(n, config)
    }

    /// Joins the group whose master listens at `master`, over QUIC, and waits until
    /// admitted. Data links to the other peers run over TCP+TLS beside the QUIC endpoint,
    /// or as [`ConnectOptions::data_transport`] says (the first peer at once; later ones when the members next call
    /// [`Communicator::update_topology`]).
    ///
    /// `master` is anything that resolves to a socket address (`"host:7000"`, a
    /// `SocketAddr`); the first address it resolves to is used.
    pub fn connect(master: impl std::net::ToSocketAddrs, options: ConnectOptions) -> Result<Communicator> {
        let master = master
            .to_socket_addrs()
            .map_err(|e| Error::JoinFailed { reason: format!("cannot resolve the master's address: {e}") })?
            .next()
            .ok_or_else(|| Error::JoinFailed { reason: "the master's address resolves to nothing".into() })?;
        let (bind, quic) = (options.bind, options.quic.clone());
        let data_transport = options.data_transport.resolve(options.advertise.is_some());
        let options = ConnectOptions { data_transport, ..options };
        let tcp_beside = matches!(data_transport, DataTransport::Tcp | DataTransport::TcpPlaintext);
        Communicator::start(
            move || {
                let bind_quic =
                    || QuicEndpoint::bind(bind, quic.clone()).map_err(|e| Error::JoinFailed { reason: e.to_string() });
                let mut ep = bind_quic()?;
                // TCP data links listen on the TCP port with the QUIC port's number. A port
                // the OS picked for UDP may be taken on the TCP side (another process's
                // connection, say): pick again rather than fail.
                let mut tries = 0;
                while tcp_beside && bind.port() == 0 && tries < 16 {
                    let addr = ep.local_addr().map_err(|e| Error::JoinFailed { reason: e.to_string() })?;
                    if std::net::TcpListener::bind(addr).is_ok() {
                        break;
                    }
                    ep = bind_quic()?;
                    tries += 1;
                }
                Ok(Arc::new(ep) as Arc<dyn Endpoint>)
            },
            master,
            options,
        )
    }

    /// Like [`Communicator::connect`], over a given endpoint (e.g. an in-memory network
    /// in tests). `make_endpoint` runs inside the communicator's runtime. No liveness
    /// connection is opened ([`ConnectOptions::liveness`] is for networks: the endpoint
    /// may be an in-memory one whose addresses are only names).
    pub fn connect_with(
        make_endpoint: impl FnOnce() -> Result<Arc<dyn Endpoint>>,
        master: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Communicator> {
        Communicator::start(make_endpoint, master, ConnectOptions { liveness: false, ..options })
    }

    fn start(
        make_endpoint: impl FnOnce() -> Result<Arc<dyn Endpoint>>,
        master: SocketAddr,
        options: ConnectOptions,
    ) -> Result<Communicator> {
        not_in_runtime("connect")?;
        let runtime = Arc::new(runtime("phalanx", peer_workers())?);
        let peer = runtime.block_on(async { AsyncPeer::connect(make_endpoint()?, master, options).await })?;
        Ok(Communicator::new(runtime, peer, None))
    }

    /// The peer, unless it has left.
    fn peer(&self) -> Option<&AsyncPeer> {
        self.peer.as_ref()
    }

    /// The peer, or `Removed` once it has left.
    fn peer_mut(&mut self) -> Result<&mut AsyncPeer> {
        self.peer.as_mut().ok_or_else(|| Error::Removed { reason: "the communicator left".into() })
    }

    /// This rank and the group's size as a collective begun now would see them: the
    /// argument checks use these, so that a view that moved since the caller's last
    /// `update_topology` (and so since it sized its buffers) fails with the retryable
    /// [`Error::Aborted`] every collective would give, not an `InvalidArgument`.
    pub(crate) fn call_group(&self) -> Result<(Rank, usize)> {
        self.peer().ok_or_else(|| Error::Removed { reason: "the communicator left".into() })?.call_group()
    }

    /// Runs `f` on the peer, blocking this thread on the communicator's runtime.
    fn block<R>(&mut self, f: impl AsyncFnOnce(&mut AsyncPeer) -> R) -> Result<R> {
        not_in_runtime("call")?;
        let runtime = self.runtime.clone();
        Ok(runtime.block_on(f(self.peer_mut()?)))
    }

    /// This communicator's rank, `0..size()`.
    pub fn rank(&self) -> Rank {
        self.peer().map_or(0, AsyncPeer::rank)
    }

    /// The number of ranks in the group.
    pub fn size(&self) -> usize {
        self.peer().map_or(0, AsyncPeer::size)
    }

    /// The epoch of the view this communicator is in (it grows with every change of
    /// membership; a local group starts at 1).
    pub fn epoch(&self) -> u64 {
        self.peer().map_or(0, AsyncPeer::epoch)
    }

    /// This peer's identity (its rank at creation in a local group).
    pub fn peer_id(&self) -> PeerId {
        self.peer().map_or(0, AsyncPeer::id)
    }

    /// The ids of the current view's members, in rank order.
    pub fn members(&self) -> Vec<PeerId> {
        self.peer().map_or_else(Vec::new, AsyncPeer::members)
    }

    /// How many peers are waiting to join.
    pub fn peers_pending(&self) -> usize {
        self.peer().map_or(0, AsyncPeer::peers_pending)
    }

    /// Synchronises with the other members and admits any waiting joiners: every member
    /// must call it; it returns when the master has settled the next view.
    ///
    /// A newly admitted peer's first call returns at once: the members' round that
    /// admitted it counts as its own (unless the view changed again since), so a
    /// training loop can call `update_topology` at the top of every step on joiners and
    /// members alike. Calling a collective while others are in `update_topology` (or the
    /// reverse) fails with [`Error::Mismatch`].
    ///
    /// With [`RetryPolicy::Never`] (the default), once a peer has called it, a view
    /// change (a loss, a leave) must be settled by calling it again: a collective begun
    /// in a view newer than the last round's fails at once with a retryable
    /// [`Error::Aborted`]. So a loop that calls `update_topology` after every retryable
    /// error keeps all members in step, whether the change aborted a member's call or
    /// came before the member began it.
    pub fn update_topology(&mut self) -> Result<()> {
        self.block(async |p| p.update_topology().await)?
    }

    /// Makes `state` bit-identical on every member: tensors whose content differs from
    /// the agreed content (see [`SyncStrategy`]) are fetched from a member holding it.
    /// Every member must call it with the same tensor names in the same order. On error
    /// `state` is unchanged.
    pub fn sync_shared_state(&mut self, state: &mut SharedState, strategy: SyncStrategy) -> Result<SyncReport> {
        self.block(async |p| p.sync_shared_state(state, strategy).await)?
    }

    /// Starts an all-reduce of `buf` and returns at once: the collective runs in the
    /// background while the caller computes, and [`PendingAllReduce::wait`] returns the
    /// reduced buffer. Several may be in flight; every peer must start them in the same
    /// order. A started collective is not retried: on a lost peer `wait` returns the
    /// error and the original buffer.
    pub fn all_reduce_start<T: Element>(&mut self, buf: Vec<T>, op: ReduceOp) -> Result<PendingAllReduce<T>> {
        let bytes = bytemuck::cast_slice(&buf).to_vec();
        let raw = self.all_reduce_start_raw(bytes, T::DTYPE, op)?;
        Ok(PendingAllReduce { raw, _t: std::marker::PhantomData })
    }

    /// [`Communicator::all_reduce_start`] on the bytes of elements of type `dtype`.
    pub fn all_reduce_start_raw(&mut self, buf: Vec<u8>, dtype: DType, op: ReduceOp) -> Result<PendingRaw> {
        let len = elements(buf.len(), dtype, "buffer")?;
        let runtime = self.runtime.clone();
        let _guard = runtime.enter();
        let task = self.peer_mut()?.start(Collective::AllReduce { len }, dtype, op, buf);
        Ok(PendingRaw { task, runtime: runtime.clone() })
    }

    /// Leaves the group gracefully: the others see a new view without this peer.
    pub fn leave(mut self) {
        if let Some(peer) = self.peer.take() {
            self.runtime.block_on(peer.leave());
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
        let counts = vec![output.len(); self.call_group()?.1];
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
        let counts = vec![input.len(); self.call_group()?.1];
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
        self.run(&Collective::Barrier, DType::U8, ReduceOp::Sum, &mut [])
    }

    /// [`Communicator::all_reduce`] on the bytes of elements of type `dtype` (for
    /// bindings that know the type only at run time).
    pub fn all_reduce_raw(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        let len = elements(buf.len(), dtype, "buffer")?;
        self.run(&Collective::AllReduce { len }, dtype, op, buf)
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
        let rank = self.check_counts(counts, input_len, "input")?;
        if counts[rank] != output_len {
            return Err(Error::InvalidArgument(format!(
                "output holds {output_len} elements, counts[{rank}] = {}",
                counts[rank]
            )));
        }
        let mut work = input.to_vec();
        let coll = Collective::ReduceScatter { counts: counts.to_vec() };
        self.run(&coll, dtype, op, &mut work)?;
        let start = counts[..rank].iter().sum::<usize>() * dtype.size();
        output.copy_from_slice(&work[start..start + output.len()]);
        Ok(())
    }

    /// [`Communicator::all_gather_v`] on bytes; `counts` are in elements.
    pub fn all_gather_raw(&mut self, input: &[u8], output: &mut [u8], counts: &[usize], dtype: DType) -> Result<()> {
        let (input_len, output_len) =
            (elements(input.len(), dtype, "input")?, elements(output.len(), dtype, "output")?);
        let rank = self.check_counts(counts, output_len, "output")?;
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
        self.run(&Collective::Broadcast { root, len }, dtype, ReduceOp::Sum, buf)
    }

    /// [`Communicator::reduce`] on bytes.
    pub fn reduce_raw(&mut self, buf: &mut [u8], dtype: DType, root: Rank, op: ReduceOp) -> Result<()> {
        self.check_root(root)?;
        let coll = Collective::Reduce { root, len: elements(buf.len(), dtype, "buffer")? };
        if self.call_group()?.0 == root {
            self.run(&coll, dtype, op, buf)
        } else {
            let mut scratch = buf.to_vec();
            self.run(&coll, dtype, op, &mut scratch)
        }
    }

    /// Checks per-rank `counts` against the group and their sum against `total`;
    /// returns this rank.
    fn check_counts(&self, counts: &[usize], total: usize, what: &str) -> Result<Rank> {
        let (rank, size) = self.call_group()?;
        if counts.len() != size {
            return Err(Error::InvalidArgument(format!("{} counts for a group of {size}", counts.len())));
        }
        if counts.iter().sum::<usize>() != total {
            return Err(Error::InvalidArgument(format!(
                "{what} holds {total} elements, counts sum to {}",
                counts.iter().sum::<usize>()
            )));
        }
        Ok(rank)
    }

    fn check_root(&self, root: Rank) -> Result<()> {
        let size = self.call_group()?.1;
        if root >= size {
            return Err(Error::InvalidArgument(format!("root {root} outside a group of {size}")));
        }
        Ok(())
    }

    /// Runs one collective of the whole group on `buf`.
    fn run(&mut self, coll: &Collective, dtype: DType, op: ReduceOp, buf: &mut [u8]) -> Result<()> {
        self.run_spec(CallSpec::new(coll, dtype, op), buf)
    }

    /// Runs one collective of the whole group as `spec` says.
    fn run_spec(&mut self, spec: CallSpec<'_>, buf: &mut [u8]) -> Result<()> {
        self.block(async |p| p.run(spec, Scope::Whole, buf).await)?
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Drop the peer inside the runtime so that its tasks are cancelled cleanly.
        let _guard = self.runtime.enter();
        self.peer.take();
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
    task: peer::Started,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl PendingRaw {
    /// Waits for the collective: its outcome, and the buffer (reduced on success, as it
    /// was passed on error). Returns an empty buffer only if called from inside an async
    /// runtime (an error) or if the collective's task panicked.
    pub fn wait(self) -> (Result<()>, Vec<u8>) {
        if let Err(e) = not_in_runtime("wait") {
            return (Err(e), Vec::new());
        }
        match self.runtime.block_on(self.task) {
            Ok(done) => done,
            Err(e) => (Err(Error::Aborted { reason: format!("collective task failed: {e}") }), Vec::new()),
        }
    }

    /// Whether the collective has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}
