//! Python bindings of phalanx: the compiled module `phalanx._native`, re-exported by the
//! Python package `phalanx` (see `phalanx/__init__.pyi` for the typed API).
//!
//! Collectives work in place on the caller's memory (numpy arrays, DLPack tensors,
//! buffer-protocol objects): the array's bytes go to the core's `*_raw` calls without a
//! copy, and the GIL is released while the collective runs.

mod array;
mod sparse;
mod scan;
mod group;
mod quant;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use phalanx::comm::{ConnectOptions, PendingRaw, RetryPolicy};
use phalanx::membership::client::ControlConfig;
use phalanx::membership::master::MasterConfig;
use phalanx::membership::server::Master as CoreMaster;
use phalanx::state::SyncStrategy;
use phalanx::state::SharedState as CoreState;
use phalanx::transport::quic::QuicConfig;
use phalanx::{Communicator as CoreComm, DType, Error, ReduceOp};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};

use crate::array::{array, ArrayRef};

create_exception!(
    phalanx,
    PhalanxError,
    PyException,
    "Base class of the errors phalanx raises for a failed collective or membership call. After any \
     error from a collective, the arrays passed to it hold exactly what they held before the call."
);
create_exception!(
    phalanx,
    PeerLostError,
    PhalanxError,
    "A peer crashed, hung or left while the collective ran (attribute `rank`: its rank in that view). \
     The array was restored; call `update_topology()` and retry, or connect with `retry_attempts > 1`."
);
create_exception!(
    phalanx,
    AbortedError,
    PhalanxError,
    "The collective was aborted (another rank failed); the array was restored."
);
create_exception!(
    phalanx,
    MismatchError,
    PhalanxError,
    "Ranks called different collectives, sizes, element types or operators; it failed on every rank."
);
create_exception!(
    phalanx,
    RemovedError,
    PhalanxError,
    "This peer is no longer a member (removed after a timeout, or the master is unreachable); connect again."
);
create_exception!(
    phalanx,
    JoinFailedError,
    PhalanxError,
    "Joining failed: the master refused, could not be reached, or the join timed out."
);
create_exception!(phalanx, ProtocolError, PhalanxError, "A peer broke the protocol (sent something malformed).");
create_exception!(phalanx, TransportError, PhalanxError, "A transport failed in a way not attributable to one peer.");

/// The Python exception for a core error.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::PeerLost { rank, .. } => {
            let err = PeerLostError::new_err(msg);
            // Best effort: the message says the rank too.
            let _ = err.value(py).setattr("rank", rank);
            err
        }
        Error::Aborted { .. } => AbortedError::new_err(msg),
        Error::Mismatch { .. } => MismatchError::new_err(msg),
        Error::Removed { .. } => RemovedError::new_err(msg),
        Error::JoinFailed { .. } => JoinFailedError::new_err(msg),
        Error::Protocol { .. } => ProtocolError::new_err(msg),
        Error::InvalidArgument(m) => PyValueError::new_err(m),
        Error::Transport(_) => TransportError::new_err(msg),
    }
}

/// Why a communicator call failed before Python sees it (built without the GIL).
enum Failure {
    Core(Error),
    Left,
}

impl Failure {
    fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Core(e) => to_py(py, e),
            Failure::Left => PhalanxError::new_err("this communicator has left the group; connect again"),
        }
    }
}

fn parse_op(op: &str) -> PyResult<ReduceOp> {
    Ok(match op.to_ascii_lowercase().as_str() {
        "sum" => ReduceOp::Sum,
        "prod" | "product" => ReduceOp::Prod,
        "min" => ReduceOp::Min,
        "max" => ReduceOp::Max,
        "avg" | "mean" => ReduceOp::Avg,
        _ => {
            return Err(PyValueError::new_err(format!(
                "unknown op {op:?}: use \"sum\", \"prod\", \"min\", \"max\" or \"avg\""
            )))
        }
    })
}

fn parse_strategy(s: &str) -> PyResult<SyncStrategy> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "popular" | "enforce_popular" => SyncStrategy::EnforcePopular,
        "receive" | "receive_only" => SyncStrategy::ReceiveOnly,
        "send" | "send_only" => SyncStrategy::SendOnly,
        _ => {
            return Err(PyValueError::new_err(format!(
                "unknown strategy {s:?}: use \"popular\", \"receive\" or \"send\""
            )))
        }
    })
}

/// `"host:port"` to a socket address, preferring IPv4 (peers bind 127.0.0.1 by default).
fn resolve(addr: &str, what: &str) -> PyResult<SocketAddr> {
    let bad = |e: String| PyValueError::new_err(format!("{what} {addr:?} is not a HOST:PORT address: {e}"));
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|e| bad(e.to_string()))?.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| bad("it resolves to nothing".into()))
}

/// The QUIC settings for an optional secret given as `str` or `bytes`.
fn quic_config(secret: Option<&Bound<'_, PyAny>>) -> PyResult<QuicConfig> {
    let Some(secret) = secret else { return Ok(QuicConfig::default()) };
    let bytes: Vec<u8> = if let Ok(s) = secret.cast::<PyString>() {
        s.extract::<String>()?.into_bytes()
    } else if let Ok(b) = secret.cast::<PyBytes>() {
        b.as_bytes().to_vec()
    } else {
        return Err(PyTypeError::new_err("secret must be str, bytes or None"));
    };
    if bytes.is_empty() {
        return Err(PyValueError::new_err("secret must not be empty (use None for no secret)"));
    }
    Ok(QuicConfig::with_secret(bytes))
}

/// A master: holds the group's view, admits joiners, removes lost peers and decides
/// every collective's outcome. Runs on threads of its own until closed (or collected).
///
/// Args:
///     listen: "HOST:PORT" to listen on (UDP, QUIC). Port 0 picks a free port; see `addr`.
///     secret: the cluster secret (str or bytes) that peers must prove; None accepts
///         everyone (tests and trusted networks only).
///     peer_timeout_ms: a peer silent for this long is removed (peers heartbeat every
///         150 ms by default).
///     max_pending: at most this many joiners wait for admission; more are refused.
#[pyclass(frozen, module = "phalanx")]
struct Master {
    inner: Mutex<Option<CoreMaster>>,
    addr: SocketAddr,
}

#[pymethods]
impl Master {
    #[new]
    #[pyo3(signature = (listen = "127.0.0.1:0", secret = None, peer_timeout_ms = 750, max_pending = 256))]
    fn new(
        py: Python<'_>,
        listen: &str,
        secret: Option<&Bound<'_, PyAny>>,
        peer_timeout_ms: u64,
        max_pending: usize,
    ) -> PyResult<Self> {
        let listen = resolve(listen, "listen")?;
        let quic = quic_config(secret)?;
        if peer_timeout_ms == 0 {
            return Err(PyValueError::new_err("peer_timeout_ms must be positive"));
        }
        let config = MasterConfig { peer_timeout: Duration::from_millis(peer_timeout_ms), max_pending };
        let master = py.detach(move || CoreMaster::start(listen, quic, config)).map_err(|e| to_py(py, e))?;
        let addr = master.addr();
        Ok(Master { inner: Mutex::new(Some(master)), addr })
    }

    /// The address peers connect to, as "HOST:PORT" (with the port chosen when listening
    /// on port 0). A master listening on 0.0.0.0 reports 0.0.0.0: give peers a routable
    /// address of this host instead.
    #[getter]
    fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the master: its peers' calls then fail with RemovedError. Idempotent.
    fn close(&self, py: Python<'_>) {
        let master = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(move || drop(master));
    }

    /// Whether the master is running (not closed).
    #[getter]
    fn running(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "phalanx.Master(addr={:?}, running={})",
            self.addr.to_string(),
            if self.running() { "True" } else { "False" }
        )
    }
}

/// What a shared-state sync did on this peer.
#[pyclass(frozen, module = "phalanx", get_all)]
struct SyncReport {
    /// Tensors this peer received.
    tensors_received: usize,
    /// Bytes this peer received.
    bytes_received: usize,
    /// Tensors this peer sent.
    tensors_sent: usize,
}

#[pymethods]
impl SyncReport {
    fn __repr__(&self) -> String {
        format!(
            "phalanx.SyncReport(tensors_received={}, bytes_received={}, tensors_sent={})",
            self.tensors_received, self.bytes_received, self.tensors_sent
        )
    }
}

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
struct Communicator {
    inner: Mutex<Option<CoreComm>>,
}

impl Communicator {
    /// Runs `f` on the communicator with the GIL released.
    fn with<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut CoreComm) -> phalanx::Result<R> + Send) -> PyResult<R> {
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

/// Two arrays of one collective: same element type, no shared memory.
fn check_pair(input: &ArrayRef<'_>, output: &ArrayRef<'_>) -> PyResult<()> {
    if input.dtype != output.dtype {
        return Err(PyTypeError::new_err(format!(
            "input has element type {} but output has {}; they must match",
            input.dtype, output.dtype
        )));
    }
    if input.raw().overlaps(output.raw()) {
        return Err(PyValueError::new_err("input and output share memory; pass separate arrays"));
    }
    Ok(())
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
    #[staticmethod]
    #[pyo3(signature = (master_addr, secret = None, retry_attempts = 1, *, bind = "127.0.0.1:0", join_timeout_ms = None, heartbeat_ms = 150, peer_id = None))]
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
    ) -> PyResult<Self> {
        let master = resolve(master_addr, "master_addr")?;
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
                ..ControlConfig::default()
            },
            retry: if retry_attempts > 1 {
                RetryPolicy::OnPeerLost { max_attempts: retry_attempts }
            } else {
                RetryPolicy::Never
            },
            quic: quic_config(secret)?,
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

    /// Returns once every peer has called `barrier()`.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c| c.barrier())
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
        Ok(AllReduceHandle {
            state: Mutex::new(HandleState::Running(Box::new(pending))),
            target: array.clone().unbind(),
            len,
        })
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
            let mut inner = st.inner.lock().unwrap_or_else(|p| p.into_inner());
            c.sync_shared_state(&mut inner.state, strategy)
        })?;
        Ok(SyncReport {
            tensors_received: report.tensors_received,
            bytes_received: report.bytes_received,
            tensors_sent: report.tensors_sent,
        })
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

enum HandleState {
    Running(Box<PendingRaw>),
    Waiting,
    Done,
    Failed(PyErr),
}

/// An all-reduce started by `Communicator.all_reduce_async`.
#[pyclass(frozen, module = "phalanx")]
struct AllReduceHandle {
    state: Mutex<HandleState>,
    target: Py<PyAny>,
    len: usize,
}

#[pymethods]
impl AllReduceHandle {
    /// Waits for the collective (GIL released) and writes the result into the array
    /// given to `all_reduce_async`. Raises the collective's error (the array is then
    /// untouched). Calling it again returns (or raises) the same outcome.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let pending = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *state, HandleState::Waiting) {
                HandleState::Running(p) => p,
                HandleState::Waiting => {
                    return Err(PyRuntimeError::new_err("another thread is already waiting on this handle"))
                }
                HandleState::Done => {
                    *state = HandleState::Done;
                    return Ok(());
                }
                HandleState::Failed(e) => {
                    *state = HandleState::Failed(e.clone_ref(py));
                    return Err(e);
                }
            }
        };
        let (result, bytes) = py.detach(move || pending.wait());
        let outcome = match result {
            Err(e) => Err(to_py(py, e)),
            Ok(()) => self.write_back(py, &bytes),
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = match &outcome {
            Ok(()) => HandleState::Done,
            Err(e) => HandleState::Failed(e.clone_ref(py)),
        };
        outcome
    }

    /// Whether the collective has finished (`wait()` would not block).
    fn done(&self) -> bool {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            HandleState::Running(p) => p.is_finished(),
            HandleState::Waiting => false,
            HandleState::Done | HandleState::Failed(_) => true,
        }
    }

    fn __repr__(&self) -> String {
        format!("phalanx.AllReduceHandle(done={})", self.done())
    }
}

impl AllReduceHandle {
    fn write_back(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<()> {
        let a = array(self.target.bind(py), "array", true)?;
        if a.len != self.len || bytes.len() != self.len {
            return Err(PyValueError::new_err("the array changed size while its all-reduce ran"));
        }
        let raw = a.raw();
        // SAFETY: `a` keeps the memory alive during the copy.
        py.detach(move || unsafe { raw.as_mut_slice() }.copy_from_slice(bytes));
        drop(a);
        Ok(())
    }
}

struct StateInner {
    state: CoreState,
    shapes: HashMap<String, Vec<usize>>,
}

/// Named arrays plus a revision that peers keep bit-identical with
/// `Communicator.sync_shared_state`.
///
/// `state[name] = array` copies the array in (any supported element type and shape);
/// `state[name]` returns a numpy copy. Bump `revision` whenever the content changes
/// (e.g. every step). Every peer must insert the same names in the same order, with the
/// same sizes: a joiner inserts placeholders (zeros) that a sync overwrites.
#[pyclass(frozen, module = "phalanx")]
struct SharedState {
    inner: Mutex<StateInner>,
}

/// `state.insert(name, data)` for a run-time `dtype`.
fn insert_typed(state: &mut CoreState, name: &str, dtype: DType, bytes: &[u8]) {
    state.insert_raw(name, dtype, bytes);
}

/// Tensor `name`'s element type and bytes.
fn get_typed<'a>(state: &'a CoreState, name: &str) -> Option<(DType, &'a [u8])> {
    state.get_raw(name)
}

/// The numpy dtype of a phalanx element type (bfloat16 through ml_dtypes).
fn numpy_dtype<'py>(py: Python<'py>, dtype: DType) -> PyResult<Bound<'py, PyAny>> {
    let name = match dtype {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::F16 => "float16",
        DType::I8 => "int8",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::U8 => "uint8",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
        DType::U64 => "uint64",
        DType::BF16 => {
            return py.import("ml_dtypes").and_then(|m| m.getattr("bfloat16")).map_err(|_| {
                PyTypeError::new_err(
                    "reading a bfloat16 tensor as a numpy array needs ml_dtypes (pip install ml_dtypes)",
                )
            })
        }
    };
    Ok(PyString::new(py, name).into_any())
}

impl SharedState {
    fn lock(&self) -> std::sync::MutexGuard<'_, StateInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[pymethods]
impl SharedState {
    /// An empty state at revision 0.
    #[new]
    fn new() -> Self {
        SharedState { inner: Mutex::new(StateInner { state: CoreState::new(), shapes: HashMap::new() }) }
    }

    /// Copies `value` (an array of a supported element type) in as tensor `name`,
    /// replacing any tensor of that name.
    fn __setitem__(&self, name: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let a = array(value, "value", false)?;
        let mut inner = self.lock();
        insert_typed(&mut inner.state, name, a.dtype, a.bytes());
        inner.shapes.insert(name.to_string(), a.shape.clone());
        Ok(())
    }

    /// A numpy copy of tensor `name`, with the shape it was inserted with.
    fn __getitem__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let (dtype, bytes, shape) = {
            let inner = self.lock();
            let Some((dtype, bytes)) = get_typed(&inner.state, name) else {
                return Err(PyKeyError::new_err(name.to_string()));
            };
            let shape = inner.shapes.get(name).cloned().unwrap_or_else(|| vec![bytes.len() / dtype.size()]);
            (dtype, PyByteArray::new(py, bytes), shape)
        };
        let numpy = py.import("numpy")?;
        let flat = numpy.call_method1("frombuffer", (bytes, numpy_dtype(py, dtype)?))?;
        flat.call_method1("reshape", (shape,))
    }

    fn __contains__(&self, name: &str) -> bool {
        self.lock().state.names().any(|n| n == name)
    }

    fn __len__(&self) -> usize {
        self.lock().state.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(pyo3::types::PyList::new(py, self.keys())?.into_any().try_iter()?.into_any())
    }

    /// The tensors' names, in insertion order.
    fn keys(&self) -> Vec<String> {
        self.lock().state.names().map(str::to_string).collect()
    }

    /// The state's revision. Bump it whenever the content changes; a sync adopts the
    /// revision of the content it agrees on.
    #[getter]
    fn revision(&self) -> u64 {
        self.lock().state.revision
    }

    #[setter]
    fn set_revision(&self, revision: u64) {
        self.lock().state.revision = revision;
    }

    /// One 32-byte BLAKE3 hash of the whole state (names, element types, bytes; not the
    /// revision): equal digests mean bit-identical states.
    fn digest<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.lock().state.digest())
    }

    /// `digest()` as 64 hexadecimal digits.
    fn hexdigest(&self) -> String {
        self.lock().state.digest().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn __repr__(&self) -> String {
        let inner = self.lock();
        format!(
            "phalanx.SharedState(keys={:?}, revision={})",
            inner.state.names().collect::<Vec<_>>(),
            inner.state.revision
        )
    }
}

/// Benchmark helper (not API): `iters` all-reduces (f32 sum) of `nbytes` bytes of zeros
/// run entirely in Rust on `comm`, the GIL released; returns each one's seconds. The same
/// loop as a Python caller's, minus Python, for side-by-side timing.
#[pyfunction]
fn _bench_all_reduce_rust(
    py: Python<'_>,
    comm: &Bound<'_, Communicator>,
    nbytes: usize,
    iters: usize,
) -> PyResult<Vec<f64>> {
    comm.get().with(py, move |c| {
        let mut buf = vec![0f32; nbytes / 4]; // zeros stay zeros: no overflow, no denormals
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            c.all_reduce(&mut buf, ReduceOp::Sum)?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(times)
    })
}

/// phalanx: fault-tolerant collective communication (compiled part; import `phalanx`).
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Master>()?;
    m.add_class::<Communicator>()?;
    m.add_class::<AllReduceHandle>()?;
    m.add_class::<SharedState>()?;
    m.add_class::<SyncReport>()?;
    m.add("PhalanxError", py.get_type::<PhalanxError>())?;
    m.add("PeerLostError", py.get_type::<PeerLostError>())?;
    m.add("AbortedError", py.get_type::<AbortedError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add("RemovedError", py.get_type::<RemovedError>())?;
    m.add("JoinFailedError", py.get_type::<JoinFailedError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("TransportError", py.get_type::<TransportError>())?;
    m.add_function(wrap_pyfunction!(_bench_all_reduce_rust, m)?)?;
    sparse::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
