//! cudarc's device slices as NCCL buffers: a Rust program that holds its tensors as
//! `cudarc::driver::CudaSlice`s runs phalanx's device collectives on them directly, on
//! its own `CudaStream`.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use cudarc::driver::CudaContext;
//! use phalanx::device::nccl::NcclComm;
//! use phalanx::device::DeviceComm;
//! use phalanx::ReduceOp;
//!
//! # fn comm() -> NcclComm { unimplemented!() }
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let mut grads = stream.memcpy_stod(&[1.0_f32; 1024])?;
//! let mut dev: NcclComm = comm(); // from a DeviceSession, or NcclBackend::init
//! dev.on_slice(&mut grads, &stream, |c, b| c.all_reduce(b, ReduceOp::Sum))?;
//! # Ok(()) }
//! ```
//!
//! Compiled in CI; not run there (no GPU).

use std::ffi::c_void;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::comm::{DeviceBuffer, NcclComm};
use crate::dtype::DType;

/// An element type NCCL reduces, as cudarc stores it.
pub trait NcclElement: DeviceRepr {
    /// Its phalanx type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl NcclElement for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}
element!(f32 => F32, f64 => F64, i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64);

impl NcclComm {
    /// Runs `f` with `slice` as this communicator's [`DeviceBuffer`], every call enqueued
    /// on `stream` (cudarc orders it after the slice's earlier writes, and records the
    /// use for its later readers). The communicator's own stream is put back after.
    pub fn on_slice<T: NcclElement, R>(
        &mut self,
        slice: &mut CudaSlice<T>,
        stream: &CudaStream,
        f: impl FnOnce(&mut NcclComm, &mut DeviceBuffer) -> R,
    ) -> R {
        let len = slice.len();
        let (ptr, _recorded) = slice.device_ptr_mut(stream);
        // SAFETY: cudarc's slice is device memory of `len` elements of `T`, borrowed
        // mutably for the call; the work is enqueued on `stream`, which cudarc keeps
        // ordered with the slice's other uses (the event `_recorded` records).
        let mut buf = unsafe { DeviceBuffer::from_raw(ptr as *mut c_void, len, T::DTYPE) };
        self.on_stream(stream, |c| f(c, &mut buf))
    }

    /// Runs `f` with `send` and `recv` as buffers (reduce-scatter, all-gather), on
    /// `stream`, as [`NcclComm::on_slice`].
    pub fn on_slices<T: NcclElement, R>(
        &mut self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        stream: &CudaStream,
        f: impl FnOnce(&mut NcclComm, &DeviceBuffer, &mut DeviceBuffer) -> R,
    ) -> R {
        let (send_len, recv_len) = (send.len(), recv.len());
        let (sp, _read) = send.device_ptr(stream);
        let (rp, _written) = recv.device_ptr_mut(stream);
        // SAFETY: as in `on_slice`; `send` is only read.
        let s = unsafe { DeviceBuffer::from_raw(sp as *mut c_void, send_len, T::DTYPE) };
        // SAFETY: as in `on_slice`.
        let mut r = unsafe { DeviceBuffer::from_raw(rp as *mut c_void, recv_len, T::DTYPE) };
        self.on_stream(stream, |c| f(c, &s, &mut r))
    }

    fn on_stream<R>(&mut self, stream: &CudaStream, f: impl FnOnce(&mut NcclComm) -> R) -> R {
        let old = self.raw_stream_value();
        // SAFETY: cudarc's stream is valid while borrowed, for the whole call.
        unsafe { self.set_stream(stream.cu_stream().cast()) };
        let r = f(self);
        // SAFETY: the stream the communicator had before, valid by its own contract.
        unsafe { self.set_stream(old as *mut c_void) };
        r
    }
}
