//! `phalanx.Communicator`, one peer's handle on a group, and `AllReduceHandle`, the
//! all-reduce it starts without waiting. The collectives of the families (scan, group,
//! quant, sparse) are methods here that delegate to their files.

use std::sync::Mutex;
use std::time::Duration;

use phalanx::comm::ControlConfig;
use phalanx::comm::{ConnectOptions, DataTransport, PendingRaw, RetryPolicy};
use phalanx::transport::shm::SharedMemory;
use phalanx::Communicator as CoreComm;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::args::{parse_op, parse_strategy, quic_config, resolve};
use crate::array::{self, check_pair};
use crate::errors::{to_py, Failure};
use crate::handle::Handle;
use crate::p2p::{self, P2pRequest};
use crate::state::{SharedState, SyncReport};
use crate::{group, quant, scan, sparse};

/// One peer's handle on a group: runs collectives with the other peers.
///
/// Make one with `Communicator.connect(master_addr)`. Every collective blocks until it
/// completes on this peer and works in place on the array it is given (a C-contiguous,
/// writable numpy array, a CPU tensor through DLPack, or a writable buffer-protocol
/// object) without copying it; the GIL is released meanwhile, so other Python threads
/// run. After an error the array holds exactly what it held before the call.
///
/// A communicator runs one call at a time: calls from several threads take turns. Do
/// not touch an array from other threads while a collective runs on it.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct Communicator {
    inner: Mutex<Option<CoreComm>>,
}

impl Communicator {
    /// Runs `f` on the communicator with the GIL released.
    pub(crate) fn with<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut CoreComm) -> phalanx::Result<R> + Send,
    ) -> PyResult<R> {
        let result = py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(comm) => f(comm).map_err(Failure::Core),
                None => Err(Failure::Left),
            }
        });
        result.map_err(|e| e.into_py(py))
    }
}

#[pymethods]
impl Communicator {
    /// Joins the group whose master listens at `master_addr` ("HOST:PORT"), over QUIC,
    /// and waits until admitted: the first peer at once, later ones when the members
    /// next call `update_topology()`.
    ///
    /// Args:
    ///     master_addr: the master's "HOST:PORT".
    ///     secret: the cluster secret (str or bytes), as given to the master.
    ///     retry_attempts: attempts in all for a collective that loses a peer (1: raise
    ///         PeerLostError at once; more: run again over the survivors).
    ///     bind: where this peer accepts data links from the others ("0.0.0.0:0" across
    ///         hosts).
    ///     join_timeout_ms: give up joining after this long (JoinFailedError); None
    ///         waits forever.
    ///     heartbeat_ms: heartbeat interval; keep it well below the master's peer timeout.
    ///     peer_id: this peer's id (random when None); ids must be unique in the group.
    ///     standby_masters: "HOST:PORT" of standby masters, tried in order after
    ///         master_addr when it is lost (or cannot be reached at join).
    ///     rejoin_ms: when the master is lost, look this long for a master to rejoin (the
    ///         same address restarted, or a standby) before calls raise RemovedError;
    ///         meanwhile they raise AbortedError (retryable).
    ///     closed: a fixed group, as torch.distributed has: the first loss of a member
    ///         makes this and every later call raise PeerLostError (nothing runs over
    ///         fewer ranks than the caller sized it for); update_topology returns at once.
    ///     data_transport: what carries the data links: "auto" (TCP+TLS), "quic", "tcp"
    ///         (TCP+TLS) or "tcp-plain" (plaintext TCP: no encryption, trusted networks
    ///         only). The connection to the master is QUIC regardless.
    ///     shared_memory: "auto" moves data links to peers on this host to shared memory
    ///         (when they allow it too); "off" keeps every link on QUIC.
    #[staticmethod]
    #[pyo3(signature = (master_addr, secret = None, retry_attempts = 1, *, bind = "127.0.0.1:0", join_timeout_ms = None, heartbeat_ms = 150, peer_id = None, standby_masters = Vec::new(), rejoin_ms = 10_000, closed = false, data_transport = "auto", shared_memory = "auto"))]
    #[allow(clippy::too_many_arguments)]
    fn connect(
        py: Python<'_>,
        master_addr: &str,
        secret: Option<&Bound<'_, PyAny>>,
        retry_attempts: u32,
        bind: &str,
        join_timeout_ms: Option<u64>,
        heartbeat_ms: u64,
        peer_id: Option<u64>,
        standby_masters: Vec<String>,
        rejoin_ms: u64,
        closed: bool,
        data_transport: &str,
        shared_memory: &str,
    ) -> PyResult<Self> {
        let data_transport: DataTransport = data_transport.parse().map_err(PyValueError::new_err)?;
        let shared_memory: SharedMemory = shared_memory.parse().map_err(PyValueError::new_err)?;
        let master = resolve(master_addr, "master_addr")?;
        let standby_masters =
            standby_masters.iter().map(|a| resolve(a, "standby_masters")).collect::<PyResult<Vec<_>>>()?;
        let bind = resolve(bind, "bind")?;
        if retry_attempts == 0 {
            return Err(PyValueError::new_err("retry_attempts must be at least 1"));
        }
        if heartbeat_ms == 0 {
            return Err(PyValueError::new_err("heartbeat_ms must be positive"));
        }
        let options = ConnectOptions {
            bind,
            peer_id,
            control: ControlConfig {
                heartbeat_interval: Duration::from_millis(heartbeat_ms),
                join_timeout: join_timeout_ms.map(Duration::from_millis),
                rejoin_within: Some(Duration::from_millis(rejoin_ms)),
                ..ControlConfig::default()
            },
            standby_masters,
            retry: if retry_attempts > 1 {
                RetryPolicy::OnPeerLost { max_attempts: retry_attempts }
            } else {
                RetryPolicy::Never
            },
            quic: quic_config(secret)?,
            data_transport,
            closed,
            shared_memory,
            ..ConnectOptions::default()
        };
        let comm = py.detach(move || CoreComm::connect(master, options)).map_err(|e| to_py(py, e))?;
        Ok(Communicator { inner: Mutex::new(Some(comm)) })
    }

    /// This peer's rank in the current view, 0 to size - 1.
    #[getter]
    fn rank(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |c| Ok(c.rank()))
    }

    /// The number of members of the current view.
    #[getter]
    fn size(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |c| Ok(c.size()))
    }

    /// The epoch of the current view (it grows with every view change).
    #[getter]
    fn epoch(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |c| Ok(c.epoch()))
    }

    /// This peer's id, unique in the group and stable across views.
    #[getter]
    fn peer_id(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |c| Ok(c.peer_id()))
    }

    /// The ids of the current view's members, in rank order.
    #[getter]
    fn members(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        self.with(py, |c| Ok(c.members()))
    }

    /// How many peers wait to join (admitted at the members' next `update_topology()`).
    #[getter]
    fn peers_pending(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |c| Ok(c.peers_pending()))
    }

    /// A round among all members: admits waiting joiners and settles losses. Every
    /// member must call it; a newly admitted peer's first call returns at once, so a
    /// training loop can call it at the top of every step on joiners and members alike.
    fn update_topology(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.update_topology())
    }

    /// Replaces every element of `array`, in place, by its reduction over all peers.
    /// All peers pass arrays of the same size and element type, and the same `op`
    /// ("sum", "prod", "min", "max" or "avg"; integer sums wrap, integer avg truncates).
    #[pyo3(signature = (array, op = "sum"))]
    fn all_reduce(&self, py: Python<'_>, array: &Bound<'_, PyAny>, op: &str) -> PyResult<()> {
        let op = parse_op(op)?;
        let a = array::array(array, "array", true)?;
        let (raw, dtype) = (a.raw(), a.dtype);
        // SAFETY: `a` keeps the memory alive until after the call; nothing else holds a
        // slice of it.
        self.with(py, move |c| c.all_reduce_raw(unsafe { raw.as_mut_slice() }, dtype, op))?;
        drop(a);
        Ok(())
    }

    /// Sums (op="sum") or averages (op="avg") a float32 `array` over all peers, in
    /// place, sending `bits`-bit min-max codes (8 or 16) instead of floats: a quarter or
    /// half of the bytes. The result is approximate (each element off by at most about
    /// `size` quantization steps of its chunk's range) but bitwise identical on every
    /// peer. NaN or infinite input raises ValueError on the peer that holds it, the
    /// group's abort (a PhalanxError) on the others; arrays are restored.
    #[pyo3(signature = (array, op = "sum", bits = 8))]
    fn all_reduce_quantized(&self, py: Python<'_>, array: &Bound<'_, PyAny>, op: &str, bits: u32) -> PyResult<()> {
        quant::all_reduce_quantized(self, py, array, op, bits)
    }

    /// Reduces `input` over all peers and writes this peer's segment of the result
    /// into `output`. `input` holds `size * len(output)` elements on every peer (or
    /// `sum(counts)`, with `counts[i]` elements going to rank `i`).
    #[pyo3(signature = (input, output, op = "sum", counts = None))]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        op: &str,
        counts: Option<Vec<usize>>,
    ) -> PyResult<()> {
        let op = parse_op(op)?;
        let (i, o) = (array::array(input, "input", false)?, array::array(output, "output", true)?);
        check_pair(&i, &o)?;
        let (ri, ro, dtype) = (i.raw(), o.raw(), i.dtype);
        let out_len = o.len / dtype.size();
        self.with(py, move |c| {
            let counts = counts.unwrap_or_else(|| vec![out_len; c.size()]);
            // SAFETY: `i` and `o` outlive the call and do not overlap (checked).
            c.reduce_scatter_raw(unsafe { ri.as_slice() }, unsafe { ro.as_mut_slice() }, &counts, dtype, op)
        })?;
        drop((i, o));
        Ok(())
    }

    /// Concatenates every peer's `input`, in rank order, into `output` (`size *
    /// len(input)` elements, or `sum(counts)` with `counts[i]` from rank `i`).
    #[pyo3(signature = (input, output, counts = None))]
    fn all_gather(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        output: &Bound<'_, PyAny>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<()> {
        let (i, o) = (array::array(input, "input", false)?, array::array(output, "output", true)?);
        check_pair(&i, &o)?;
        let (ri, ro, dtype) = (i.raw(), o.raw(), i.dtype);
        let in_len = i.len / dtype.size();
        self.with(py, move |c| {
            let counts = counts.unwrap_or_else(|| vec![in_len; c.size()]);
            // SAFETY: `i` and `o` outlive the call and do not overlap (checked).
            c.all_gather_raw(unsafe { ri.as_slice() }, unsafe { ro.as_mut_slice() }, &counts, dtype)
        })?;
        drop((i, o));
        Ok(())
    }

    /// Copies rank `root`'s `array` into every peer's `array`, in place.
    #[pyo3(signature = (array, root = 0))]
    fn broadcast(&self, py: Python<'_>, array: &Bound<'_, PyAny>, root: usize) -> PyResult<()> {
        let a = array::array(array, "array", true)?;
        let (raw, dtype) = (a.raw(), a.dtype);
        // SAFETY: as in `all_reduce`.
        self.with(py, move |c| c.broadcast_raw(unsafe { raw.as_mut_slice() }, dtype, root))?;
        drop(a);
        Ok(())
    }

    /// Reduces every peer's `array` into rank `root`'s `array`, in place; the other
    /// peers' arrays are left as they were.
    #[pyo3(signature = (array, root = 0, op = "sum"))]
    fn reduce(&self, py: Python<'_>, array: &Bound<'_, PyAny>, root: usize, op: &str) -> PyResult<()> {
        let op = parse_op(op)?;
        let a = array::array(array, "array", true)?;
        let (raw, dtype) = (a.raw(), a.dtype);
        // SAFETY: as in `all_reduce`.
        self.with(py, move |c| c.reduce_raw(unsafe { raw.as_mut_slice() }, dtype, root, op))?;
        drop(a);
        Ok(())
    }

    /// Replaces `array`, in place, by its scan over the peers with `op` ("sum", "prod",
    /// "min" or "max"): rank r gets x_0 op ... op x_r (inclusive) or x_0 op ... op x_{r-1}
    /// (exclusive; rank 0 gets the identity), in rank order or, with `reverse`, in the
    /// order n-1, ..., 0. `algorithm` is "auto", "chain" (with `blocks`) or "doubling".
    #[pyo3(signature = (array, op = "sum", inclusive = true, reverse = false, *, algorithm = "auto", blocks = 0))]
    #[allow(clippy::too_many_arguments)]
    fn all_scan(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        op: &str,
        inclusive: bool,
        reverse: bool,
        algorithm: &str,
        blocks: usize,
    ) -> PyResult<()> {
        scan::all_scan(self, py, array, op, scan::options(inclusive, reverse, algorithm, blocks)?)
    }

    /// Scans linear-attention states in place: `a` (float32, shape (d_k,)) and `s`
    /// (float32, shape (d_k, d_v)) become this rank's prefix under
    /// (a1, S1) + (a2, S2) = (a1 * a2, diag(a2) S1 + S2); exclusive gives rank 0 (1, 0).
    #[pyo3(signature = (a, s, inclusive = true, reverse = false, *, algorithm = "auto", blocks = 0))]
    #[allow(clippy::too_many_arguments)]
    fn all_scan_linear_attention(
        &self,
        py: Python<'_>,
        a: &Bound<'_, PyAny>,
        s: &Bound<'_, PyAny>,
        inclusive: bool,
        reverse: bool,
        algorithm: &str,
        blocks: usize,
    ) -> PyResult<()> {
        scan::all_scan_linear_attention(self, py, a, s, scan::options(inclusive, reverse, algorithm, blocks)?)
    }

    /// All-to-all with equal parts: part `j` of `input` goes to rank `j`; part `i` of
    /// `output` comes from rank `i`. Both hold `size * part` elements of one type.
    fn all_to_all(&self, py: Python<'_>, input: &Bound<'_, PyAny>, output: &Bound<'_, PyAny>) -> PyResult<()> {
        sparse::all_to_all(self, py, input, output)
    }

    /// All-to-all with uneven parts: `send_counts[j]` elements of `input` (parts in rank
    /// order) go to rank `j`. Returns `(received, recv_counts)`: a new array of `input`'s
    /// type with the parts from each rank in rank order, and how many came from each.
    fn all_to_all_v<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        send_counts: Vec<usize>,
    ) -> PyResult<(Bound<'py, PyAny>, Vec<usize>)> {
        sparse::all_to_all_v(self, py, input, send_counts)
    }

    /// Sums sparse vectors of dimension `dim` given as `(indices[k], values[k])` pairs:
    /// `indices` a uint32 array, `values` an array of any element type. Every peer gets
    /// the same sums, bit for bit; each index is summed in ascending rank order (sparse
    /// path). Past the density crossover 2·b_v / (n·(b_i + b_v)) the dense exchange runs
    /// instead.
    fn sparse_all_reduce(
        &self,
        py: Python<'_>,
        dim: usize,
        indices: &Bound<'_, PyAny>,
        values: &Bound<'_, PyAny>,
    ) -> PyResult<sparse::SparseReduced> {
        sparse::sparse_all_reduce(self, py, dim, indices, values)
    }

    /// Sparse all-gather (FSSDP's spAG), in place: `array` holds a slot for every chunk,
    /// in order (`sum(lens)` elements); chunk `c` has `lens[c]` elements, is owned by rank
    /// `owners[c]` and is also held by the ranks in `holders[c]`. Afterwards every
    /// holder's slot holds the owner's bytes; other slots are unchanged.
    fn sparse_all_gather(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        lens: Vec<usize>,
        owners: Vec<usize>,
        holders: Vec<Vec<usize>>,
    ) -> PyResult<()> {
        sparse::sparse_all_gather(self, py, array, lens, owners, holders)
    }

    /// Sparse reduce-scatter (FSSDP's spRS), in place, with the placement as for
    /// `sparse_all_gather`: each owner's slot becomes the combination (`op`, not "avg")
    /// of all holders' slots of its chunk, in ascending rank order. Other slots are
    /// unchanged.
    #[pyo3(signature = (array, lens, owners, holders, op = "sum"))]
    fn sparse_reduce_scatter(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        lens: Vec<usize>,
        owners: Vec<usize>,
        holders: Vec<Vec<usize>>,
        op: &str,
    ) -> PyResult<()> {
        sparse::sparse_reduce_scatter(self, py, array, lens, owners, holders, op)
    }

    /// Returns once every peer has called `barrier()`.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.barrier())
    }

    /// A snapshot of the frames and payload bytes this peer has sent to and received
    /// from each other peer over its data links since it connected (`Traffic`; its
    /// `since(earlier)` is what moved in between). Cheap: no call to the group.
    fn traffic(&self, py: Python<'_>) -> PyResult<crate::traffic::Traffic> {
        Ok(self.with(py, |c| Ok(c.traffic()))?.into())
    }

    /// Starts an all-reduce of `array` and returns a handle at once; the collective runs
    /// in the background while Python computes, and `handle.wait()` writes the result
    /// into `array`. Several may be in flight; every peer starts them in the same order.
    ///
    /// Unlike the blocking calls this one copies: the array's content is copied when the
    /// call starts (what is reduced is the content at that moment) and the result is
    /// copied back by `wait()`. Do not resize the array in between. A started
    /// collective is not retried: on a lost peer `wait()` raises and leaves `array` as
    /// it was.
    #[pyo3(signature = (array, op = "sum"))]
    fn all_reduce_async(&self, py: Python<'_>, array: &Bound<'_, PyAny>, op: &str) -> PyResult<AllReduceHandle> {
        let op = parse_op(op)?;
        let a = array::array(array, "array", true)?;
        let (raw, dtype, len) = (a.raw(), a.dtype, a.len);
        // SAFETY: `a` keeps the memory alive during the copy.
        let pending = self.with(py, move |c| c.all_reduce_start_raw(unsafe { raw.as_slice() }.to_vec(), dtype, op))?;
        drop(a);
        Ok(AllReduceHandle { inner: Handle::new(pending, Some(array.clone().unbind()), len, "all-reduce") })
    }

    /// Makes `state` bit-identical on every member: tensors whose content differs from
    /// the agreed content are fetched from a member holding it. Every member calls it
    /// with the same tensor names in the same order (and the same sizes).
    ///
    /// strategy: "popular" (the content most members hold wins; on a tie the newest
    /// revision), "receive" (this peer's content never counts: a joiner), or "send"
    /// (this peer's content is authoritative).
    #[pyo3(signature = (state, strategy = "popular"))]
    fn sync_shared_state(
        &self,
        py: Python<'_>,
        state: &Bound<'_, SharedState>,
        strategy: &str,
    ) -> PyResult<SyncReport> {
        let strategy = parse_strategy(strategy)?;
        let st = state.get();
        let report = self.with(py, |c| {
            let mut inner = st.lock();
            c.sync_shared_state(&mut inner.state, strategy)
        })?;
        Ok(report.into())
    }

    /// Leaves the group gracefully: the others see a new view without this peer. The
    /// communicator cannot be used afterwards. Idempotent.
    fn leave(&self, py: Python<'_>) {
        py.detach(|| {
            let comm = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(c) = comm {
                c.leave();
            }
        })
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.leave(py);
        false
    }

    /// All-reduces `array` in place among the ranks `members` only (view ranks, the
    /// caller among them); other ranks do not call it and are not delayed. "avg"
    /// divides by the number of members. A member lost meanwhile raises PeerLostError
    /// (array restored); pick a new sub-group in the new view.
    #[pyo3(signature = (array, members, op = "sum"))]
    fn sub_all_reduce(&self, py: Python<'_>, array: &Bound<'_, PyAny>, members: Vec<usize>, op: &str) -> PyResult<()> {
        group::sub_all_reduce(self, py, array, members, op)
    }

    /// Sends `array` to rank `to` as one message with `tag` (returns without waiting
    /// for the matching `recv`).
    fn send(&self, py: Python<'_>, to: usize, tag: u32, array: &Bound<'_, PyAny>) -> PyResult<()> {
        group::send(self, py, to, tag, array)
    }

    /// Receives the next message with `tag` from rank `from_` into `array`, which must
    /// have the message's size and element type (MismatchError otherwise).
    fn recv(&self, py: Python<'_>, from_: usize, tag: u32, array: &Bound<'_, PyAny>) -> PyResult<()> {
        group::recv(self, py, from_, tag, array)
    }

    /// Starts sending a copy of `array` to rank `to` as one message with `tag`; returns
    /// a `P2pRequest` at once (`wait()` raises the send's error). Calls on one
    /// (peer, tag, direction), blocking or not, run in the order they were made.
    fn isend(&self, py: Python<'_>, to: usize, tag: u32, array: &Bound<'_, PyAny>) -> PyResult<P2pRequest> {
        p2p::isend(self, py, to, tag, array)
    }

    /// Starts receiving the next message with `tag` from rank `from_`; returns a
    /// `P2pRequest` at once whose `wait()` writes the message into `array` (same size
    /// and element type, MismatchError otherwise; untouched on any error).
    fn irecv(&self, py: Python<'_>, from_: usize, tag: u32, array: &Bound<'_, PyAny>) -> PyResult<P2pRequest> {
        p2p::irecv(self, py, from_, tag, array)
    }

    /// The NoLoCo partner of `rank` among `n` ranks at `step` for `seed`, the same on
    /// every peer; None for the rank left out when `n` is odd.
    #[staticmethod]
    fn noloco_partner(seed: u64, step: u64, n: usize, rank: usize) -> Option<usize> {
        group::noloco_partner(seed, step, n, rank)
    }

    /// The NoLoCo pairing of ranks 0..n at `step` for `seed`: a list of (a, b), a < b.
    #[staticmethod]
    fn noloco_pairs(seed: u64, step: u64, n: usize) -> Vec<(usize, usize)> {
        group::noloco_pairs(seed, step, n)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        match self.with(py, |c| Ok((c.rank(), c.size(), c.epoch(), c.peer_id()))) {
            Ok((rank, size, epoch, id)) => {
                format!("phalanx.Communicator(rank={rank}, size={size}, epoch={epoch}, peer_id={id})")
            }
            Err(_) => "phalanx.Communicator(left)".into(),
        }
    }
}

/// An all-reduce started by `Communicator.all_reduce_async`.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct AllReduceHandle {
    inner: Handle<PendingRaw>,
}

#[pymethods]
impl AllReduceHandle {
    /// Waits for the collective (GIL released) and writes the result into the array
    /// given to `all_reduce_async`. Raises the collective's error (the array is then
    /// untouched). Calling it again returns (or raises) the same outcome.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.wait(py)
    }

    /// Whether the collective has finished (`wait()` would not block).
    fn done(&self) -> bool {
        self.inner.done()
    }

    fn __repr__(&self) -> String {
        format!("phalanx.AllReduceHandle(done={})", self.done())
    }
}
