//! Device (GPU) communicators from Python: `phalanx.DeviceCommunicator(comm, backend)`,
//! the device side of one member of a `Communicator`'s group, following its views (the
//! unique id of each view carried by the master, `phalanx::device::session`).
//!
//! Backends: `"standin"`, the CPU stand-in (float32 arrays only: numpy, CPU tensors
//! through DLPack, buffer-protocol objects; ranks of this process only), which tests the
//! protocol with no GPU; `"nccl"`, which loads NCCL (a missing or unusable library raises
//! `DeviceError` with the paths tried; a package built without its `nccl` feature raises
//! `DeviceError` naming the feature). Collectives on CUDA tensors (DLPack capsules of
//! device memory) are not built yet: `all_reduce` on the NCCL backend raises
//! `DeviceError` saying so.

use std::sync::Mutex;
use std::time::Duration;

use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::{Capabilities, DeviceComm, DeviceError};
use phalanx::{DType, Error};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args::parse_op;
use crate::array::array as array_ref;
use crate::communicator::Communicator;
use crate::errors::to_py;

enum Backend {
    StandIn(DeviceSession<StandIn>),
    /// Held (the loaded library with it) for the collectives on CUDA tensors, which are
    /// not built yet.
    #[cfg(feature = "nccl")]
    #[allow(dead_code)]
    Nccl(DeviceSession<phalanx::device::nccl::NcclBackend>),
}

/// The process's stand-in fabric: every stand-in communicator of this process meets there.
fn stand_in() -> StandIn {
    static FABRIC: std::sync::OnceLock<StandIn> = std::sync::OnceLock::new();
    // A rank waiting a minute for the others is hung (a lost peer the stand-in cannot see).
    FABRIC.get_or_init(|| StandIn::new(Capabilities::ALL, Duration::from_secs(60))).clone()
}

#[cfg(feature = "nccl")]
fn nccl(me: u64) -> Result<Backend, Error> {
    use phalanx::device::nccl::{NcclBackend, NcclLibrary};
    let lib = NcclLibrary::load()?;
    // SAFETY: NULL is the legacy default stream, valid for as long as the process runs.
    let backend = unsafe { NcclBackend::new(std::sync::Arc::new(lib), std::ptr::null_mut()) };
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
/// a unique id the master relays). After a `DeviceError` from a collective (a lost peer),
/// call `comm.update_topology()` and retry: the next view has a new device communicator.
///
/// `backend`: `"standin"` (CPU, float32 arrays, ranks in this process: for tests) or
/// `"nccl"` (raises `DeviceError` when no usable NCCL is found; collectives on CUDA
/// tensors are not built yet).
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct DeviceCommunicator {
    comm: Py<Communicator>,
    inner: Mutex<Backend>,
    backend: &'static str,
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
    /// "avg"), in place: a collective, every member calls it. On the stand-in: a
    /// writable, C-contiguous float32 array (numpy, a CPU tensor through DLPack, a
    /// buffer-protocol object), unchanged on error. The GIL is released meanwhile.
    #[pyo3(signature = (array, op = "sum"))]
    fn all_reduce(&self, py: Python<'_>, array: &Bound<'_, PyAny>, op: &str) -> PyResult<()> {
        let op = parse_op(op)?;
        let a = array_ref(array, "array", true)?;
        if self.backend == "standin" && a.dtype != DType::F32 {
            return Err(PyTypeError::new_err(format!("the stand-in reduces float32 arrays only, not {:?}", a.dtype)));
        }
        let (raw, inner) = (a.raw(), &self.inner);
        self.comm.get().with(py, move |c| {
            let mut guard = inner.lock().unwrap_or_else(|p| p.into_inner());
            match &mut *guard {
                Backend::StandIn(session) => {
                    // SAFETY: `a` outlives the call; nothing else holds a slice of it.
                    let bytes = unsafe { raw.as_mut_slice() };
                    let mut values: Vec<f32> =
                        bytes.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect();
                    let d = session.sync(c)?;
                    if let Err(e) = d.all_reduce(&mut values, op) {
                        session.failed(e.clone());
                        return Err(Error::Device(e));
                    }
                    for (b, v) in bytes.chunks_exact_mut(4).zip(&values) {
                        b.copy_from_slice(&v.to_ne_bytes());
                    }
                    Ok(())
                }
                #[cfg(feature = "nccl")]
                Backend::Nccl(_) => Err(Error::Device(DeviceError::Unsupported {
                    operation: "all_reduce on CUDA tensors from Python",
                    hint: "not built yet: use the C face (phx_device_comm_all_reduce) with the tensor's device \
                           pointer and stream"
                        .into(),
                })),
            }
        })?;
        drop(a);
        Ok(())
    }
}
