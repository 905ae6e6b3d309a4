//! The body of every `DeviceCommunicator` collective: the Python arrays resolved for the
//! backend (host memory on the stand-in, CUDA memory through DLPack on NCCL), then, with
//! the GIL released, the device communicator brought to the view and the planned
//! [`DeviceOp`] run on it (`phalanx::device::op::run_in_session`: a device error fails
//! the communicator and is raised as `DeviceError`).

use std::sync::Mutex;

use phalanx::device::op::{nccl_has, run_in_session, DeviceOp};
use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::DeviceError;
use phalanx::{Communicator as CoreComm, DType, Error};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::array::{array as host_array, ArrayRef};
use crate::dlpack::{cuda_array, cuda_stream, CudaRef};

/// The memory of one array of a call: address, length in elements, element type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mem {
    addr: usize,
    /// Elements.
    pub(crate) count: usize,
    dtype: DType,
}

impl Mem {
    fn bytes(&self) -> usize {
        self.count * self.dtype.size()
    }

    fn overlaps(&self, other: &Mem) -> bool {
        let (a, b) = (self.addr, other.addr);
        self.bytes() > 0 && other.bytes() > 0 && a < b + other.bytes() && b < a + self.bytes()
    }
}

/// `count` elements from element `offset` of the call's array `arr`: one buffer of the
/// op, in [`DeviceOp`]'s order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    arr: usize,
    offset: usize,
    count: usize,
}

impl Span {
    /// The whole of array `arr`.
    pub(crate) fn whole(mems: &[Mem], arr: usize) -> Span {
        Span { arr, offset: 0, count: mems[arr].count }
    }

    /// Array `arr` cut into `n` equal chunks (its length is a multiple of `n`).
    pub(crate) fn chunks(mems: &[Mem], arr: usize, n: usize) -> Vec<Span> {
        let count = mems[arr].count / n.max(1);
        (0..n).map(|j| Span { arr, offset: j * count, count }).collect()
    }
}

/// What a plan returns for the view's size: the op and its buffers.
pub(crate) type Plan = (DeviceOp, Vec<Span>);

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
fn resolve<'py>(args: &[Arg<'_, 'py>], nccl: bool, stream: Option<i64>) -> PyResult<(Vec<Held<'py>>, Vec<Mem>, usize)> {
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
            (Mem { addr: a.addr, count: a.len / a.dtype.size(), dtype: a.dtype }, Held::Cuda(a))
        } else {
            let a = host_array(obj, what, writable)?;
            let addr = a.bytes().as_ptr() as usize;
            (Mem { addr, count: a.len / a.dtype.size(), dtype: a.dtype }, Held::Host(a))
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
fn disjoint(args: &[Arg<'_, '_>], mems: &[Mem]) -> PyResult<()> {
    for (i, (a, &(_, what, written))) in mems.iter().zip(args).enumerate() {
        for (j, (b, &(_, other, _))) in mems.iter().zip(args).enumerate() {
            if written && i != j && a.overlaps(b) {
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
    plan: impl FnOnce(usize, &[Mem]) -> phalanx::Result<Plan> + Send,
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
                on_standin(session, c, mems, plan)
            }
            #[cfg(feature = "nccl")]
            Backend::Nccl(session) => on_nccl(session, c, cuda, mems, plan),
        }
    })?;
    drop(held);
    Ok(())
}

/// Runs a planned collective on the stand-in: copies the buffers it reads into host
/// vectors, runs it, writes back the buffers it writes (so a failed call changes none).
fn on_standin(
    session: &mut DeviceSession<StandIn>,
    comm: &mut CoreComm,
    mems: &[Mem],
    plan: impl FnOnce(usize) -> phalanx::Result<Plan>,
) -> phalanx::Result<()> {
    run_in_session(session, comm, plan, |d, op, spans| {
        let host = |s: &Span| -> (*mut f32, usize) {
            // In bounds: plans cut spans inside their array.
            ((mems[s.arr].addr as *mut f32).wrapping_add(s.offset), s.count)
        };
        let mut bufs: Vec<Vec<f32>> = Vec::with_capacity(spans.len());
        for (i, s) in spans.iter().enumerate() {
            let (p, n) = host(s);
            bufs.push(if op.reads(i) && n > 0 {
                // SAFETY: host memory of a float32 array alive for the call (the caller
                // holds it), `n` elements from `p` within it; read as a copy.
                unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
            } else {
                vec![0.0; n]
            });
        }
        op.run(d, &mut bufs)?;
        for (i, (s, b)) in spans.iter().zip(&bufs).enumerate() {
            let (p, n) = host(s);
            if op.written(i) && n > 0 && b.len() == n {
                // SAFETY: as above, and writable (checked when resolved); no other slice
                // of it is live.
                unsafe { std::slice::from_raw_parts_mut(p, n) }.copy_from_slice(b);
            }
        }
        Ok::<(), DeviceError>(())
    })
}

/// Runs a planned collective on NCCL, enqueued on `stream`: the one path of every NCCL
/// call of the Python face (where a device-side backup of the buffers `op.written`
/// names belongs).
#[cfg(feature = "nccl")]
fn on_nccl(
    session: &mut DeviceSession<phalanx::device::nccl::NcclBackend>,
    comm: &mut CoreComm,
    stream: usize,
    mems: &[Mem],
    plan: impl FnOnce(usize) -> phalanx::Result<Plan>,
) -> phalanx::Result<()> {
    use phalanx::device::nccl::DeviceBuffer;
    run_in_session(session, comm, plan, |d, op, spans| {
        // SAFETY: 0 (the legacy default stream) or the caller's stream of the tensors'
        // GPU, given to their producer through DLPack.
        unsafe { d.set_stream(stream as *mut std::ffi::c_void) };
        let mut bufs: Vec<DeviceBuffer> = (spans.iter())
            .map(|s| {
                let m = mems[s.arr];
                let ptr = (m.addr + s.offset * m.dtype.size()) as *mut std::ffi::c_void;
                // SAFETY: device memory of a CUDA tensor (and its capsule) the caller
                // holds for the call, `count` elements from `ptr` within it; NCCL works
                // on it in the stream's order, as the producer was told.
                unsafe { DeviceBuffer::from_raw(ptr, s.count, m.dtype) }
            })
            .collect();
        op.run(d, &mut bufs)
    })
}
