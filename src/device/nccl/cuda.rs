//! The CUDA driver (`libcuda.so.1`), loaded at run time like NCCL: the few calls the
//! device path needs besides NCCL's — device memory ([`CudaDevice::alloc`]), copies on
//! the communicator's stream (the device-side backup of a buffer, the host staging of
//! the hierarchical all-reduce), and a sleeping wait for a stream ([`CudaDevice::wait`]).
//!
//! Only the driver API is used, on the device's primary context: the context the CUDA
//! runtime (and so NCCL, torch and cupy) uses for the same device. Every call first makes
//! that context current on the calling thread, so a device may be used from any thread.
//! A missing driver, or a symbol missing from it, is a [`DeviceError::NoDriver`], never
//! a panic.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::{Attempt, DeviceError};

/// `CUresult`, read as the C `int` it is (an unknown code cannot be undefined behaviour).
type CuResult = c_int;
/// `CUdeviceptr`.
type CuPtr = u64;
/// `CUcontext` and `CUstream` (the stream is the same handle as a `cudaStream_t`).
type Handle = *mut c_void;

const CUDA_SUCCESS: CuResult = 0;
/// `CUDA_ERROR_NOT_READY`: the stream still has work.
const CUDA_ERROR_NOT_READY: CuResult = 600;

/// The library names tried, in order.
const CANDIDATES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// The driver calls, with their `cuda.h` signatures (`_v2` where the header maps the
/// plain name to it).
#[allow(clippy::type_complexity)]
struct Fns {
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut Handle, c_int) -> CuResult,
    primary_ctx_release: unsafe extern "C" fn(c_int) -> CuResult,
    ctx_set_current: unsafe extern "C" fn(Handle) -> CuResult,
    mem_alloc: unsafe extern "C" fn(*mut CuPtr, usize) -> CuResult,
    mem_free: unsafe extern "C" fn(CuPtr) -> CuResult,
    memcpy_htod_async: unsafe extern "C" fn(CuPtr, *const c_void, usize, Handle) -> CuResult,
    memcpy_dtoh_async: unsafe extern "C" fn(*mut c_void, CuPtr, usize, Handle) -> CuResult,
    memcpy_dtod_async: unsafe extern "C" fn(CuPtr, CuPtr, usize, Handle) -> CuResult,
    stream_query: unsafe extern "C" fn(Handle) -> CuResult,
    get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    ctx_get_device: unsafe extern "C" fn(*mut c_int) -> CuResult,
}

/// The symbols of [`Fns`], for the error that lists the missing ones.
const SYMBOLS: [&str; 13] = [
    "cuInit",
    "cuDeviceGet",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuStreamQuery",
    "cuGetErrorString",
    "cuCtxGetDevice",
];

/// One GPU through the CUDA driver: its primary context, retained while this lives.
pub struct CudaDevice {
    fns: Fns,
    ordinal: c_int,
    ctx: Handle,
    // Keeps the driver mapped while the pointers above live (declared last: dropped last).
    _lib: libloading::Library,
}

// SAFETY: the driver API is thread-safe, and every call makes the context current on
// the calling thread first; the handle itself is an opaque pointer.
unsafe impl Send for CudaDevice {}
// SAFETY: as above; no method mutates the struct.
unsafe impl Sync for CudaDevice {}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("ordinal", &self.ordinal).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Loads the driver and retains the primary context of GPU `ordinal` (the one NCCL
    /// and the CUDA runtime use for it).
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>, DeviceError> {
        let ordinal = c_int::try_from(ordinal)
            .map_err(|_| DeviceError::InvalidArgument(format!("GPU {ordinal} does not fit an int")))?;
        Self::load(Some(ordinal))
    }

    /// The GPU of the calling thread's current CUDA context (the one `cudaSetDevice`,
    /// torch or cupy made current), else GPU 0: what the C and Python faces use, so
    /// that device memory lands on the GPU NCCL's communicator is made on.
    pub fn of_this_thread() -> Result<Arc<CudaDevice>, DeviceError> {
        Self::load(None)
    }

    fn load(ordinal: Option<c_int>) -> Result<Arc<CudaDevice>, DeviceError> {
        let mut tried = Vec::new();
        for name in CANDIDATES {
            // SAFETY: loading the system's CUDA driver runs its initialisers; it is meant
            // to be loaded into any CUDA process.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Self::start(lib, name, ordinal),
                Err(e) => tried.push(Attempt { source: "system", path: name.into(), reason: e.to_string() }),
            }
        }
        Err(DeviceError::NoDriver { tried })
    }

    fn start(lib: libloading::Library, name: &str, ordinal: Option<c_int>) -> Result<Arc<CudaDevice>, DeviceError> {
        let fns = Self::resolve(&lib).ok_or_else(|| {
            let missing = SYMBOLS
                .iter()
                // SAFETY: only the symbol's presence is read, as an untyped address.
                .filter(|s| unsafe { lib.get::<*const c_void>(s.as_bytes()) }.is_err())
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            DeviceError::NoDriver {
                tried: vec![Attempt { source: "system", path: name.into(), reason: format!("lacks {missing}") }],
            }
        })?;
        let mut dev = CudaDevice { fns, ordinal: 0, ctx: std::ptr::null_mut(), _lib: lib };
        // SAFETY: flags must be 0.
        dev.check("cuInit", unsafe { (dev.fns.init)(0) })?;
        let ordinal = ordinal.unwrap_or_else(|| {
            let mut current: c_int = 0;
            // SAFETY: a valid out-pointer; with no current context this fails and GPU 0
            // is taken.
            match unsafe { (dev.fns.ctx_get_device)(&mut current) } {
                CUDA_SUCCESS => current,
                _ => 0,
            }
        });
        let mut device: c_int = 0;
        // SAFETY: a valid out-pointer.
        dev.check("cuDeviceGet", unsafe { (dev.fns.device_get)(&mut device, ordinal) })?;
        dev.ordinal = device;
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; released in Drop.
        dev.check("cuDevicePrimaryCtxRetain", unsafe { (dev.fns.primary_ctx_retain)(&mut ctx, device) })?;
        dev.ctx = ctx;
        Ok(Arc::new(dev))
    }

    fn resolve(lib: &libloading::Library) -> Option<Fns> {
        /// # Safety: `T` is the symbol's type in `cuda.h`.
        unsafe fn sym<T: Copy>(lib: &libloading::Library, name: &str) -> Option<T> {
            // SAFETY: forwarded to the caller (the type).
            unsafe { lib.get::<T>(name.as_bytes()).ok().map(|s| *s) }
        }
        // SAFETY: each type is the symbol's signature in cuda.h (CUresult as int,
        // CUdeviceptr as u64, CUcontext/CUstream as pointers).
        unsafe {
            Some(Fns {
                init: sym(lib, "cuInit")?,
                device_get: sym(lib, "cuDeviceGet")?,
                primary_ctx_retain: sym(lib, "cuDevicePrimaryCtxRetain")?,
                primary_ctx_release: sym(lib, "cuDevicePrimaryCtxRelease_v2")?,
                ctx_set_current: sym(lib, "cuCtxSetCurrent")?,
                mem_alloc: sym(lib, "cuMemAlloc_v2")?,
                mem_free: sym(lib, "cuMemFree_v2")?,
                memcpy_htod_async: sym(lib, "cuMemcpyHtoDAsync_v2")?,
                memcpy_dtoh_async: sym(lib, "cuMemcpyDtoHAsync_v2")?,
                memcpy_dtod_async: sym(lib, "cuMemcpyDtoDAsync_v2")?,
                stream_query: sym(lib, "cuStreamQuery")?,
                get_error_string: sym(lib, "cuGetErrorString")?,
                ctx_get_device: sym(lib, "cuCtxGetDevice")?,
            })
        }
    }

    /// The GPU's number.
    pub fn ordinal(&self) -> usize {
        self.ordinal as usize
    }

    fn check(&self, call: &'static str, code: CuResult) -> Result<(), DeviceError> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: a valid out-pointer; the string, if any, is static.
        let known = unsafe { (self.fns.get_error_string)(code, &mut p) } == CUDA_SUCCESS && !p.is_null();
        let message = if known {
            // SAFETY: non-NULL, NUL-terminated, static (cuGetErrorString's contract).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        } else {
            format!("CUDA error {code}")
        };
        Err(DeviceError::Cuda { call, code, message })
    }

    /// Makes this device's context current on the calling thread.
    fn make_current(&self) -> Result<(), DeviceError> {
        // SAFETY: a context retained by this value.
        self.check("cuCtxSetCurrent", unsafe { (self.fns.ctx_set_current)(self.ctx) })
    }

    /// `bytes` of device memory, freed when the returned value drops.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<Allocation, DeviceError> {
        self.make_current()?;
        let mut ptr: CuPtr = 0;
        // cuMemAlloc refuses 0 bytes: an empty allocation is a NULL pointer never used.
        if bytes > 0 {
            // SAFETY: a valid out-pointer.
            self.check("cuMemAlloc_v2", unsafe { (self.fns.mem_alloc)(&mut ptr, bytes) })?;
        }
        Ok(Allocation { device: self.clone(), ptr, bytes })
    }

    /// Enqueues a copy of `bytes` from device address `src` to `dst` on `stream`.
    ///
    /// # Safety
    /// Both ranges are device memory of this GPU, valid until the stream has run the copy.
    pub unsafe fn copy(
        &self,
        src: *const c_void,
        dst: *mut c_void,
        bytes: usize,
        stream: Handle,
    ) -> Result<(), DeviceError> {
        if bytes == 0 {
            return Ok(());
        }
        self.make_current()?;
        // SAFETY: the caller's contract.
        let r = unsafe { (self.fns.memcpy_dtod_async)(dst as CuPtr, src as CuPtr, bytes, stream) };
        self.check("cuMemcpyDtoDAsync_v2", r)
    }

    /// Enqueues a copy of `src` (host) to device address `dst` on `stream`.
    ///
    /// # Safety
    /// `dst` is device memory of this GPU valid for `src.len()` bytes; `src` stays alive
    /// and unchanged until the stream has run the copy (the caller waits).
    pub unsafe fn upload(&self, src: &[u8], dst: *mut c_void, stream: Handle) -> Result<(), DeviceError> {
        if src.is_empty() {
            return Ok(());
        }
        self.make_current()?;
        // SAFETY: the caller's contract.
        let r = unsafe { (self.fns.memcpy_htod_async)(dst as CuPtr, src.as_ptr().cast(), src.len(), stream) };
        self.check("cuMemcpyHtoDAsync_v2", r)
    }

    /// Enqueues a copy of device address `src` into `dst` (host) on `stream`.
    ///
    /// # Safety
    /// `src` is device memory of this GPU valid for `dst.len()` bytes; `dst` is not read
    /// or moved until the stream has run the copy (the caller waits).
    pub unsafe fn download(&self, src: *const c_void, dst: &mut [u8], stream: Handle) -> Result<(), DeviceError> {
        if dst.is_empty() {
            return Ok(());
        }
        self.make_current()?;
        // SAFETY: the caller's contract.
        let r = unsafe { (self.fns.memcpy_dtoh_async)(dst.as_mut_ptr().cast(), src as CuPtr, dst.len(), stream) };
        self.check("cuMemcpyDtoHAsync_v2", r)
    }

    /// Waits until `stream` has run everything enqueued on it, sleeping between checks
    /// (from 50 µs, doubling to `pause`), never spinning. Between two checks
    /// `interrupt` may end the wait with an error (an NCCL communicator in error, whose
    /// kernels would never finish); `timeout` ends it with [`DeviceError::Aborted`].
    ///
    /// # Safety
    /// `stream` is a valid stream of this GPU (NULL: the legacy default stream).
    pub unsafe fn wait(
        &self,
        stream: Handle,
        pause: Duration,
        timeout: Duration,
        mut interrupt: impl FnMut() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        self.make_current()?;
        let start = Instant::now();
        let mut nap = Duration::from_micros(50).min(pause);
        loop {
            // SAFETY: the caller's contract.
            match unsafe { (self.fns.stream_query)(stream) } {
                CUDA_SUCCESS => return Ok(()),
                CUDA_ERROR_NOT_READY => {}
                code => return self.check("cuStreamQuery", code),
            }
            interrupt()?;
            if start.elapsed() >= timeout {
                return Err(DeviceError::Aborted {
                    reason: format!("the stream still had work after {timeout:?}: abort the communicator"),
                });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(pause.max(Duration::from_micros(50)));
        }
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if !self.ctx.is_null() {
            // SAFETY: releases the retain of `start`, once.
            let _ = unsafe { (self.fns.primary_ctx_release)(self.ordinal) };
        }
    }
}

/// Device memory from [`CudaDevice::alloc`], freed on drop.
pub struct Allocation {
    device: Arc<CudaDevice>,
    ptr: CuPtr,
    bytes: usize,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Allocation({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl Allocation {
    /// Its device address.
    pub fn ptr(&self) -> *mut c_void {
        self.ptr as *mut c_void
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.ptr != 0 && self.device.make_current().is_ok() {
            // SAFETY: allocated by cuMemAlloc and freed once. Work still queued on it was
            // waited for or aborted by its user (a DeviceBuffer owning it).
            let _ = unsafe { (self.device.fns.mem_free)(self.ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_a_typed_error_naming_what_was_tried() {
        // This machine has no GPU driver (CI's neither); on one that has, a GPU opens.
        match CudaDevice::open(0) {
            Ok(dev) => assert_eq!(dev.ordinal(), 0),
            Err(DeviceError::NoDriver { tried }) => {
                assert_eq!(tried.len(), CANDIDATES.len());
                assert_eq!(tried[0].path, std::path::PathBuf::from("libcuda.so.1"));
                let msg = crate::Error::Device(DeviceError::NoDriver { tried }).to_string();
                assert!(msg.contains("libcuda.so.1") && msg.contains("driver"), "{msg}");
            }
            Err(e) => assert!(matches!(e, DeviceError::Cuda { .. }), "a driver with no GPU: {e}"),
        }
        assert!(CudaDevice::open(usize::MAX).is_err());
    }
}
