//! Device (GPU) communicators from Python: `phalanx.DeviceCommunicator(comm, backend)`,
//! the device side of one member of a `Communicator`'s group, following its views (the
//! unique id of each view carried by the master, `phalanx::device::session`), with every
//! collective of `phalanx::device::DeviceComm`: all-reduce, reduce-scatter, all-gather,
//! broadcast, reduce, grouped send/recv and all-to-all.
//!
//! Backends: `"standin"`, the CPU stand-in (float32 arrays only: numpy, CPU tensors
//! through DLPack, buffer-protocol objects; ranks of this process only), which tests the
//! protocol with no GPU; `"nccl"`, which loads NCCL (a missing or unusable library raises
//! `DeviceError` with the paths tried; a package built without its `nccl` feature raises
//! `DeviceError` naming the feature) and works on CUDA tensors through DLPack (torch,
//! cupy), enqueued on the caller's stream. The calls go through `device_call`.

use std::sync::Mutex;
use std::time::Duration;

use phalanx::device::op::{DeviceOp, RawBuf};
use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::Capabilities;
#[cfg(not(feature = "nccl"))]
use phalanx::device::DeviceError;
use phalanx::Error;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::args::parse_op;
use crate::communicator::Communicator;
use crate::device_call::{device_call, invalid, Arg, Backend, Plan};
use crate::errors::to_py;

/// The process's stand-in fabric: every stand-in communicator of this process meets there.
fn stand_in() -> StandIn {
    static FABRIC: std::sync::OnceLock<StandIn> = std::sync::OnceLock::new();
    // A rank waiting a minute for the others is hung (a lost peer the stand-in cannot see).
    FABRIC.get_or_init(|| StandIn::new(Capabilities::ALL, Duration::from_secs(60))).clone()
}

#[cfg(feature = "nccl")]
fn nccl(me: u64) -> Result<Backend, Error> {
    let backend = phalanx::device::nccl::NcclBackend::for_this_thread()?;
    Ok(Backend::Nccl(DeviceSession::new(me, backend)))
}

#[cfg(not(feature = "nccl"))]
fn nccl(_me: u64) -> Result<Backend, Error> {
    Err(Error::Device(DeviceError::Unsupported {
        operation: "the NCCL backend",
        hint: "this phalanx package was built without its `nccl` feature: \
               pip install ./python --config-settings=build-args=\"--features nccl\""
            .into(),
    }))
}

/// The device side of one member of a `Communicator`'s group: collectives on device
/// buffers that follow the communicator's views. Each collective first brings the device
/// communicator to the current view (made, shrunk or grown, every member together, with
/// a unique id the master relays). After a `DeviceError` from a collective, retry: the
/// next call makes a new device communicator (the same view's next generation when every
/// peer lives; after a lost peer, `comm.update_topology()` first for the next view).
///
/// `backend`: `"standin"` (CPU, float32 arrays, ranks in this process: for tests) or
/// `"nccl"` (CUDA tensors through DLPack; raises `DeviceError` when no usable NCCL is
/// found).
///
/// Arrays: on the stand-in, C-contiguous float32 arrays (numpy, CPU tensors through
/// DLPack, buffer-protocol objects), those written writable; CUDA tensors are refused
/// (`TypeError`). On NCCL, C-contiguous CUDA tensors with `__dlpack__` and
/// `__dlpack_device__` (torch, cupy) of one element type and one GPU (the
/// communicator's); anything else is refused (`TypeError`). `stream` (keyword): the
/// `cudaStream_t` to enqueue on, as an int (`torch.cuda.current_stream().cuda_stream`);
/// `None` is the legacy default stream. The producer is told the stream through
/// `__dlpack__(stream=...)`, so its pending work on the tensors comes first; the call
/// copies each tensor it writes in device memory first and returns once the stream has
/// run it, so that a failed call (`DeviceError`, a lost peer) leaves the tensors as
/// they were. The stand-in ignores `stream`.
/// Bad arguments (a root or peer outside the view, mismatched lengths) raise
/// `ValueError` or `TypeError` before anything is sent, the device communicator kept.
/// The GIL is released while a collective runs.
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct DeviceCommunicator {
    comm: Py<Communicator>,
    inner: Mutex<Backend>,
    backend: &'static str,
}

/// `whole` must hold `part` × `size` elements (a buffer of one chunk per rank).
fn per_rank(call: &str, whole: (&str, usize), part: (&str, usize), size: usize) -> phalanx::Result<()> {
    if part.1.checked_mul(size) != Some(whole.1) {
        return Err(invalid(format!(
            "{call}: {} has {} elements, but {} × {size} ranks is {} × {size}",
            whole.0, whole.1, part.0, part.1
        )));
    }
    Ok(())
}

impl DeviceCommunicator {
    fn call(
        &self,
        py: Python<'_>,
        args: &[Arg<'_, '_>],
        stream: Option<i64>,
        plan: impl FnOnce(usize, &[RawBuf]) -> phalanx::Result<Plan> + Send,
    ) -> PyResult<()> {
        device_call(py, self.comm.get(), &self.inner, args, stream, plan)
    }
}

#[pymethods]
impl DeviceCommunicator {
    #[new]
    #[pyo3(signature = (comm, backend = "standin"))]
    fn new(py: Python<'_>, comm: Py<Communicator>, backend: &str) -> PyResult<Self> {
        let me = comm.get().with(py, |c| Ok(c.peer_id()))?;
        let (inner, backend) = match backend {
            "standin" => (Backend::StandIn(DeviceSession::new(me, stand_in())), "standin"),
            "nccl" => (nccl(me).map_err(|e| to_py(py, e))?, "nccl"),
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown device backend {other:?}: use \"standin\" or \"nccl\""
                )))
            }
        };
        Ok(DeviceCommunicator { comm, inner: Mutex::new(inner), backend })
    }

    /// The backend's name: `"standin"` or `"nccl"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.backend
    }

    /// Reduces `array` over every member with `op` ("sum", "prod", "min", "max",
    /// "avg"), in place: a collective, every member calls it. Unchanged on error on the
    /// stand-in.
    #[pyo3(signature = (array, op = "sum", *, stream = None))]
    fn all_reduce(&self, py: Python<'_>, array: &Bound<'_, PyAny>, op: &str, stream: Option<i64>) -> PyResult<()> {
        let op = parse_op(op)?;
        self.call(py, &[(array, "array", true)], stream, move |_, m| Ok((DeviceOp::AllReduce(op), vec![m[0]])))
    }

    /// Reduces every member's `send` (`size` equal shards) with `op`; shard `rank` of
    /// the result lands in `recv` (`len(send) / size` elements). A collective.
    #[pyo3(signature = (send, recv, op = "sum", *, stream = None))]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        op: &str,
        stream: Option<i64>,
    ) -> PyResult<()> {
        let op = parse_op(op)?;
        self.call(py, &[(send, "send", false), (recv, "recv", true)], stream, move |size, m| {
            per_rank("reduce_scatter", ("send", m[0].count), ("recv", m[1].count), size)?;
            Ok((DeviceOp::ReduceScatter(op), vec![m[0], m[1]]))
        })
    }

    /// Concatenates every member's `send`, in rank order, into `recv` (`size ×
    /// len(send)` elements). A collective.
    #[pyo3(signature = (send, recv, *, stream = None))]
    fn all_gather(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        stream: Option<i64>,
    ) -> PyResult<()> {
        self.call(py, &[(send, "send", false), (recv, "recv", true)], stream, move |size, m| {
            per_rank("all_gather", ("recv", m[1].count), ("send", m[0].count), size)?;
            Ok((DeviceOp::AllGather, vec![m[0], m[1]]))
        })
    }

    /// Copies rank `root`'s `array` into every member's `array`, in place. A
    /// collective; `ValueError` for a root outside the view.
    #[pyo3(signature = (array, root, *, stream = None))]
    fn broadcast(&self, py: Python<'_>, array: &Bound<'_, PyAny>, root: usize, stream: Option<i64>) -> PyResult<()> {
        self.call(py, &[(array, "array", true)], stream, move |_, m| Ok((DeviceOp::Broadcast { root }, vec![m[0]])))
    }

    /// Reduces every member's `array` with `op` into rank `root`'s `array`, in place;
    /// the others' are left as they were. A collective; `ValueError` for a root outside
    /// the view.
    #[pyo3(signature = (array, root, op = "sum", *, stream = None))]
    fn reduce(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        root: usize,
        op: &str,
        stream: Option<i64>,
    ) -> PyResult<()> {
        let op = parse_op(op)?;
        self.call(py, &[(array, "array", true)], stream, move |_, m| Ok((DeviceOp::Reduce { root, op }, vec![m[0]])))
    }

    /// Sends and receives as one group (NCCL's grouped `ncclSend`/`ncclRecv`): each
    /// `(peer, array)` of `sends` goes to rank `peer`, each `(peer, array)` of `recvs`
    /// is filled from rank `peer`; a send and the receive it meets have the same length
    /// and element type; a rank may send to itself. Every member calls it, possibly with
    /// nothing to send or receive. `ValueError` for a peer outside the view; a receive
    /// that meets no send, or a length that differs, raises `DeviceError` on the
    /// stand-in (the receives unchanged) and is undefined on NCCL.
    #[pyo3(signature = (sends = Vec::new(), recvs = Vec::new(), *, stream = None))]
    fn send_recv<'py>(
        &self,
        py: Python<'py>,
        sends: Vec<(usize, Bound<'py, PyAny>)>,
        recvs: Vec<(usize, Bound<'py, PyAny>)>,
        stream: Option<i64>,
    ) -> PyResult<()> {
        let args: Vec<Arg<'_, 'py>> = (sends.iter().map(|(_, a)| (a, "a send array", false)))
            .chain(recvs.iter().map(|(_, a)| (a, "a receive array", true)))
            .collect();
        let op = DeviceOp::SendRecv {
            sends: sends.iter().map(|(p, _)| *p).collect(),
            recvs: recvs.iter().map(|(p, _)| *p).collect(),
        };
        self.call(py, &args, stream, move |_, m| Ok((op, m.to_vec())))
    }

    /// All-to-all with equal chunks: chunk `j` of `send` goes to rank `j`, chunk `j` of
    /// `recv` comes from rank `j`; `send` and `recv` have the same length, a multiple of
    /// the view's size. One group of sends and receives. A collective.
    #[pyo3(signature = (send, recv, *, stream = None))]
    fn all_to_all(
        &self,
        py: Python<'_>,
        send: &Bound<'_, PyAny>,
        recv: &Bound<'_, PyAny>,
        stream: Option<i64>,
    ) -> PyResult<()> {
        self.call(py, &[(send, "send", false), (recv, "recv", true)], stream, move |size, m| {
            if m[0].count % size != 0 || m[1].count != m[0].count {
                return Err(invalid(format!(
                    "all_to_all: send has {} elements and recv {}: they must be equal, a multiple of the {size} ranks",
                    m[0].count, m[1].count
                )));
            }
            let mut bufs = m[0].chunks(size);
            bufs.extend(m[1].chunks(size));
            Ok((DeviceOp::all_to_all(size), bufs))
        })
    }
}
