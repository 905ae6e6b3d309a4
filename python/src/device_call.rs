//! The body of every `DeviceCommunicator` collective: the Python arrays resolved for the
//! backend (host memory on the stand-in, CUDA memory through DLPack on NCCL), then, with
//! the GIL released, the device communicator brought to the view and the planned
//! [`DeviceOp`] run on it (`phalanx::device::op::run_in_session`: a device error fails
//! the communicator and is raised as `DeviceError`).

use std::sync::Mutex;

use phalanx::device::op::{nccl_has, run_planned_on_host, DeviceOp, RawBuf};
use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::{DType, Error};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::array::{array as host_array, ArrayRef};
use crate::dlpack::{cuda_array, cuda_stream, CudaRef};

/// Whether two buffers share a byte.
fn overlaps(a: &RawBuf, b: &RawBuf) -> bool {
    let (x, y) = (a.addr, b.addr);
    let (n, m) = (a.count * a.dtype.size(), b.count * b.dtype.size());
    n > 0 && m > 0 && x < y + m && y < x + n
}

/// What a plan returns for the view's size: the op and its buffers (the call's arrays,
/// whole or cut with `RawBuf::chunks`).
pub(crate) type Plan = (DeviceOp, Vec<RawBuf>);

/// One array argument: the object, its name in errors, whether the call writes it.
pub(crate) type Arg<'a, 'py> = (&'a Bound<'py, PyAny>, &'static str, bool);

/// An `InvalidArgument` (raised as `ValueError`).
pub(crate) fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

/// What keeps the arrays' memory alive during the call.
enum Held<'py> {
    Host(#[allow(dead_code)] ArrayRef<'py>),
    Cuda(#[allow(dead_code)] CudaRef<'py>),
}

/// The arrays of one call resolved for the backend (`nccl`: CUDA tensors, else host
/// arrays), checked to share one element type (float32 on the stand-in; one that NCCL
/// has on NCCL) and, for CUDA, one device. Returns what keeps them alive, their memory
/// and the `cudaStream_t` to enqueue on.
#[allow(clippy::type_complexity)]
fn resolve<'py>(
    args: &[Arg<'_, 'py>],
    nccl: bool,
    stream: Option<i64>,
) -> PyResult<(Vec<Held<'py>>, Vec<RawBuf>, usize)> {
    let (protocol, cuda) = cuda_stream(stream)?;
    let (mut held, mut mems, mut device) = (Vec::new(), Vec::new(), None);
    for &(obj, what, writable) in args {
        let (mem, h) = if nccl {
            let a = cuda_array(obj, what, protocol, writable)?;
            if *device.get_or_insert(a.device_id) != a.device_id {
                return Err(PyValueError::new_err(format!(
                    "{what} is on CUDA device {}, the call's other arrays on {}: pass tensors of one GPU",
                    a.device_id,
                    device.unwrap_or_default()
                )));
            }
            (RawBuf { addr: a.addr, count: a.len / a.dtype.size(), dtype: a.dtype }, Held::Cuda(a))
        } else {
            let a = host_array(obj, what, writable)?;
            let addr = a.bytes().as_ptr() as usize;
            (RawBuf { addr, count: a.len / a.dtype.size(), dtype: a.dtype }, Held::Host(a))
        };
        mems.push(mem);
        held.push(h);
    }
    if let Some(first) = mems.first() {
        if let Some((m, (_, what, _))) = mems.iter().zip(args).find(|(m, _)| m.dtype != first.dtype) {
            return Err(PyTypeError::new_err(format!(
                "{what} has element type {}, the call's first array {}: they must match",
                m.dtype, first.dtype
            )));
        }
        if !nccl && first.dtype != DType::F32 {
            return Err(PyTypeError::new_err(format!(
                "the stand-in works on float32 arrays only, not {}",
                first.dtype
            )));
        }
        if nccl && !nccl_has(first.dtype) {
            return Err(PyTypeError::new_err(format!("NCCL has no {} element type", first.dtype)));
        }
    }
    Ok((held, mems, cuda))
}

/// Refuses a written array that shares memory with another array of the call.
fn disjoint(args: &[Arg<'_, '_>], mems: &[RawBuf]) -> PyResult<()> {
    for (i, (a, &(_, what, written))) in mems.iter().zip(args).enumerate() {
        for (j, (b, &(_, other, _))) in mems.iter().zip(args).enumerate() {
            if written && i != j && overlaps(a, b) {
                return Err(PyValueError::new_err(format!("{what} and {other} share memory; pass separate arrays")));
            }
        }
    }
    Ok(())
}

/// A `DeviceCommunicator`'s backend: its session.
pub(crate) enum Backend {
    /// The CPU stand-in: host float32 arrays.
    StandIn(DeviceSession<StandIn>),
    /// NCCL: CUDA tensors through DLPack.
    #[cfg(feature = "nccl")]
    Nccl(DeviceSession<phalanx::device::nccl::NcclBackend>),
}

impl Backend {
    fn is_nccl(&self) -> bool {
        !matches!(self, Backend::StandIn(_))
    }
}

/// Runs one collective: resolves `args` for the backend's kind, then with the GIL
/// released brings its session to `comm`'s view and runs what `plan` returns for the
/// view's size.
pub(crate) fn device_call(
    py: Python<'_>,
    comm: &crate::communicator::Communicator,
    backend: &Mutex<Backend>,
    args: &[Arg<'_, '_>],
    stream: Option<i64>,
    plan: impl FnOnce(usize, &[RawBuf]) -> phalanx::Result<Plan> + Send,
) -> PyResult<()> {
    let nccl = backend.lock().unwrap_or_else(|p| p.into_inner()).is_nccl();
    let (held, mems, cuda) = resolve(args, nccl, stream)?;
    disjoint(args, &mems)?;
    let mems = mems.as_slice();
    comm.with(py, move |c| {
        let plan = move |size| plan(size, mems);
        match &mut *backend.lock().unwrap_or_else(|p| p.into_inner()) {
            Backend::StandIn(session) => {
                let _ = cuda; // no stream on the CPU
                              // SAFETY: host float32 memory of arrays the caller holds for the call
                              // (writable where written, checked when resolved), cut inside their
                              // bounds by the plans; with the GIL released no Python code touches them
                              // meanwhile.
                unsafe { run_planned_on_host(session, c, plan) }
            }
            #[cfg(feature = "nccl")]
            // SAFETY: 0 (the legacy default stream) or the caller's stream of the tensors'
            // GPU, given to their producer through DLPack; device memory of CUDA tensors
            // (and their capsules) the caller holds for the call, cut inside their bounds.
            Backend::Nccl(session) => unsafe {
                phalanx::device::op::run_planned_on_nccl(session, c, cuda as *mut std::ffi::c_void, plan)
            },
        }
    })?;
    drop(held);
    Ok(())
}
