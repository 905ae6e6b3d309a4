//! [`DeviceMemory`] of an NCCL communicator: allocations and copies through the CUDA
//! driver ([`super::cuda`]) on the communicator's stream, and a wait for the stream that
//! sleeps and is cut short by the communicator's asynchronous error (a kernel waiting on
//! a lost peer never finishes: the wait reports NCCL's error instead, and the caller
//! aborts the communicator, which releases the kernel).

use std::ffi::c_void;
use std::sync::Arc;

use super::comm::{DeviceBuffer, NcclComm};
use super::cuda::CudaDevice;
use crate::device::memory::{check_host_len, DeviceMemory};
use crate::device::{AsyncState, DeviceComm, DeviceError};
use crate::dtype::DType;

impl NcclComm {
    fn cuda(&self) -> Result<Arc<CudaDevice>, DeviceError> {
        self.cuda.clone().ok_or_else(|| DeviceError::NoDriver {
            tried: vec![crate::device::Attempt {
                source: "NcclBackend",
                path: "libcuda.so.1".into(),
                reason: "the backend was made without its GPU's driver: use NcclBackend::with_device".into(),
            }],
        })
    }

    fn raw_stream(&self) -> *mut c_void {
        self.stream().cast()
    }
}

impl DeviceMemory for NcclComm {
    fn len_of(buf: &DeviceBuffer) -> usize {
        buf.len
    }

    fn dtype_of(buf: &DeviceBuffer) -> DType {
        buf.dtype
    }

    fn alloc(&mut self, len: usize, dtype: DType) -> Result<DeviceBuffer, DeviceError> {
        let bytes = len
            .checked_mul(dtype.size())
            .ok_or_else(|| DeviceError::InvalidArgument(format!("{len} elements of {dtype:?} overflow")))?;
        let a = Arc::new(self.cuda()?.alloc(bytes)?);
        Ok(DeviceBuffer { ptr: a.ptr(), len, dtype, _owner: Some(a) })
    }

    fn copy_prefix(&mut self, src: &DeviceBuffer, dst: &mut DeviceBuffer, len: usize) -> Result<(), DeviceError> {
        if src.dtype != dst.dtype || len > src.len || len > dst.len {
            return Err(DeviceError::InvalidArgument(format!(
                "a copy of {len} elements from {} of {:?} into {} of {:?}",
                src.len, src.dtype, dst.len, dst.dtype
            )));
        }
        // SAFETY: both buffers are device memory of this GPU valid for their lengths
        // (DeviceBuffer's contract, or owned), and `len` fits both.
        unsafe { self.cuda()?.copy(src.ptr, dst.ptr, len * src.dtype.size(), self.raw_stream()) }
    }

    fn download(&mut self, src: &DeviceBuffer, dst: &mut [u8]) -> Result<(), DeviceError> {
        check_host_len(dst.len(), src.len, src.dtype)?;
        // SAFETY: `src` valid for `dst.len()` bytes (checked); `dst` is borrowed until the
        // wait below has seen the copy run.
        unsafe { self.cuda()?.download(src.ptr, dst, self.raw_stream()) }?;
        self.finish()
    }

    fn upload(&mut self, src: &[u8], dst: &mut DeviceBuffer) -> Result<(), DeviceError> {
        check_host_len(src.len(), dst.len, dst.dtype)?;
        // SAFETY: `dst` valid for `src.len()` bytes (checked); `src` is borrowed until the
        // wait below has seen the copy run.
        unsafe { self.cuda()?.upload(src, dst.ptr, self.raw_stream()) }?;
        self.finish()
    }

    fn finish(&mut self) -> Result<(), DeviceError> {
        let cuda = self.cuda()?;
        let (pause, timeout, dead) = (self.poll, self.timeout, self.dead);
        let interrupt = || match dead {
            true => Ok(()),
            false => match self.async_state()? {
                AsyncState::Failed(e) => Err(e),
                AsyncState::Ready | AsyncState::InProgress => Ok(()),
            },
        };
        // SAFETY: the communicator's stream, valid while it lives (NcclBackend::new's
        // contract or set_stream's).
        unsafe { cuda.wait(self.raw_stream(), pause, timeout, interrupt) }
    }
}
