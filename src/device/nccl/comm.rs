//! [`NcclBackend`] and [`NcclComm`]: the [`DeviceBackend`] and [`DeviceComm`] of a loaded
//! NCCL, on device buffers given as raw pointers ([`DeviceBuffer`]) and one CUDA stream.
//!
//! Every call is enqueued on the stream (as NCCL's own are): the caller synchronizes the
//! stream before reading results. Communicators are created non-blocking where
//! `ncclCommInitRankConfig` exists; waiting on them sleeps between checks of
//! `ncclCommGetAsyncError`.
//!
//! Not exercised yet: no GPU was lent to the task that wrote this (see the README).

use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use cudarc::nccl::sys as ffi;

use super::{NcclLibrary, IN_PROGRESS, SUCCESS};
use crate::device::gating::{Capabilities, MIN_VERSION};
use crate::device::{wait_settled, AsyncState, DeviceBackend, DeviceComm, DeviceError, UniqueId};
use crate::dtype::{DType, ReduceOp};

/// `NCCL_SHRINK_ABORT`: the shrink aborts the parent's pending work first.
const SHRINK_ABORT: c_int = 1;
/// `NCCL_SHRINK_DEFAULT`.
const SHRINK_DEFAULT: c_int = 0;

/// A buffer in device memory: a pointer, a length in elements and their type; it owns
/// the memory when it was allocated by phalanx ([`crate::device::memory::DeviceMemory::alloc`]).
#[derive(Debug, Clone)]
pub struct DeviceBuffer {
    pub(super) ptr: *mut c_void,
    pub(super) len: usize,
    pub(super) dtype: DType,
    /// The allocation this buffer frees when its last clone drops; `None` for the
    /// caller's memory ([`DeviceBuffer::from_raw`]).
    pub(super) _owner: Option<Arc<super::cuda::Allocation>>,
}

// SAFETY: a device address is not tied to the host thread that holds it.
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    /// A view of `len` elements of `dtype` at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must point to at least `len` elements of `dtype` in device memory of the
    /// communicator's GPU, valid (and not used by others) until the stream has run every
    /// call given this buffer.
    pub unsafe fn from_raw(ptr: *mut c_void, len: usize, dtype: DType) -> DeviceBuffer {
        DeviceBuffer { ptr, len, dtype, _owner: None }
    }

    /// Its device address.
    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

fn nccl_dtype(d: DType) -> Result<ffi::ncclDataType_t, DeviceError> {
    use ffi::ncclDataType_t as T;
    Ok(match d {
        DType::I8 => T::ncclInt8,
        DType::U8 => T::ncclUint8,
        DType::I32 => T::ncclInt32,
        DType::U32 => T::ncclUint32,
        DType::I64 => T::ncclInt64,
        DType::U64 => T::ncclUint64,
        DType::F16 => T::ncclFloat16,
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::BF16 => T::ncclBfloat16,
        other => return Err(DeviceError::InvalidArgument(format!("NCCL has no {other:?} element type"))),
    })
}

fn nccl_op(op: ReduceOp) -> ffi::ncclRedOp_t {
    use ffi::ncclRedOp_t as O;
    match op {
        ReduceOp::Sum => O::ncclSum,
        ReduceOp::Prod => O::ncclProd,
        ReduceOp::Max => O::ncclMax,
        ReduceOp::Min => O::ncclMin,
        ReduceOp::Avg => O::ncclAvg,
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field undefined
/// (`INT_MIN` / NULL), so NCCL picks its defaults.
fn non_blocking_config() -> ffi::ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    ffi::ncclConfig_t {
        size: std::mem::size_of::<ffi::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: MIN_VERSION.major * 10000 + MIN_VERSION.minor * 100 + MIN_VERSION.patch,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
    }
}

fn int(what: &str, v: usize) -> Result<c_int, DeviceError> {
    c_int::try_from(v).map_err(|_| DeviceError::InvalidArgument(format!("{what} {v} does not fit NCCL's int")))
}

/// The NCCL backend: a loaded library and the CUDA stream its communicators enqueue on.
#[derive(Debug, Clone)]
pub struct NcclBackend {
    lib: Arc<NcclLibrary>,
    stream: usize,
    /// The GPU's driver, for device memory (backups, staging); `None` until
    /// [`NcclBackend::with_device`].
    cuda: Option<Arc<super::cuda::CudaDevice>>,
    /// The pause between two checks of a non-blocking call.
    pub poll: Duration,
    /// How long creation, or a non-blocking collective, may stay in progress before it
    /// is given up on.
    pub timeout: Duration,
}

impl NcclBackend {
    /// A backend over `lib` enqueuing on the CUDA stream `stream` (a `cudaStream_t`; 0
    /// for the legacy default stream).
    ///
    /// # Safety
    /// `stream` must be a valid stream of the current device for as long as the backend
    /// and its communicators live.
    pub unsafe fn new(lib: Arc<NcclLibrary>, stream: *mut c_void) -> NcclBackend {
        NcclBackend {
            lib,
            stream: stream as usize,
            cuda: None,
            poll: Duration::from_millis(1),
            timeout: Duration::from_secs(120),
        }
    }

    /// The backend the C and Python faces use: the NCCL discovery finds
    /// ([`NcclLibrary::load`]), the GPU of the calling thread's current CUDA context
    /// (else GPU 0, [`super::cuda::CudaDevice::of_this_thread`]), the legacy default
    /// stream until a call names its own.
    pub fn for_this_thread() -> Result<NcclBackend, DeviceError> {
        let lib = NcclLibrary::load()?;
        let cuda = super::cuda::CudaDevice::of_this_thread()?;
        // SAFETY: NULL is the legacy default stream, valid for as long as the process runs.
        Ok(unsafe { NcclBackend::new(Arc::new(lib), std::ptr::null_mut()) }.with_device(cuda))
    }

    /// The same backend with the CUDA driver of its GPU, which its communicators need for
    /// device memory: the device-side backup of a buffer, the hierarchical all-reduce's
    /// staging ([`crate::device::memory::DeviceMemory`]). Without it those calls are
    /// [`DeviceError::NoDriver`].
    pub fn with_device(mut self, cuda: Arc<super::cuda::CudaDevice>) -> NcclBackend {
        self.cuda = Some(cuda);
        self
    }

    /// Waits for a communicator just created (non-blocking) to be ready; aborts it on
    /// failure or timeout.
    fn settle(&self, comm: NcclComm) -> Result<NcclComm, DeviceError> {
        match wait_settled(|| comm.async_state(), self.poll, self.timeout)? {
            AsyncState::Ready => Ok(comm),
            AsyncState::InProgress => {
                let mut comm = comm;
                let _ = comm.abort();
                Err(DeviceError::Aborted { reason: format!("creation took longer than {:?}", self.timeout) })
            }
            AsyncState::Failed(e) => {
                let mut comm = comm;
                let _ = comm.abort();
                Err(e)
            }
        }
    }

    fn wrap(&self, raw: ffi::ncclComm_t, rank: usize, size: usize) -> NcclComm {
        NcclComm {
            lib: self.lib.clone(),
            comm: raw,
            stream: self.stream,
            cuda: self.cuda.clone(),
            rank,
            size,
            poll: self.poll,
            timeout: self.timeout,
            dead: false,
        }
    }
}

impl DeviceBackend for NcclBackend {
    type Comm = NcclComm;

    fn capabilities(&self) -> Capabilities {
        self.lib.capabilities()
    }

    fn unique_id(&self) -> Result<UniqueId, DeviceError> {
        let mut id = ffi::ncclUniqueId { internal: [0; 128] };
        // SAFETY: a valid out-pointer to an ncclUniqueId.
        let r = unsafe { (self.lib.fns.get_unique_id)(&mut id) };
        self.lib.check("ncclGetUniqueId", r)?;
        Ok(UniqueId(id.internal.map(|c| c as u8)))
    }

    fn init(&self, id: &UniqueId, rank: usize, size: usize) -> Result<NcclComm, DeviceError> {
        let (nranks, r) = (int("size", size)?, int("rank", rank)?);
        let uid = ffi::ncclUniqueId { internal: id.0.map(|b| b as std::ffi::c_char) };
        let mut raw: ffi::ncclComm_t = std::ptr::null_mut();
        let Some(init_config) = self.lib.fns.init_rank_config else {
            // SAFETY: valid out-pointer; blocking creation.
            let code = unsafe { (self.lib.fns.comm_init_rank)(&mut raw, nranks, uid, r) };
            self.lib.check("ncclCommInitRank", code)?;
            return Ok(self.wrap(raw, rank, size));
        };
        let mut config = non_blocking_config();
        // SAFETY: valid out-pointer and config, both alive for the call (NCCL copies the
        // config).
        let code = unsafe { init_config(&mut raw, nranks, uid, r, &mut config) };
        self.lib.check("ncclCommInitRankConfig", code)?;
        self.settle(self.wrap(raw, rank, size))
    }

    fn join_grown(&self, id: &UniqueId, rank: usize, size: usize) -> Result<NcclComm, DeviceError> {
        let grow = self.lib.fns.grow.ok_or_else(|| unsupported("ncclCommGrow"))?;
        let uid = ffi::ncclUniqueId { internal: id.0.map(|b| b as std::ffi::c_char) };
        let mut raw: ffi::ncclComm_t = std::ptr::null_mut();
        let mut config = non_blocking_config();
        // SAFETY: a NULL parent is how a new rank joins; valid pointers for the call.
        let code =
            unsafe { grow(std::ptr::null_mut(), int("size", size)?, &uid, int("rank", rank)?, &mut raw, &mut config) };
        self.lib.check("ncclCommGrow", code)?;
        self.settle(self.wrap(raw, rank, size))
    }
}

fn unsupported(operation: &'static str) -> DeviceError {
    DeviceError::Unsupported {
        operation,
        hint: "this NCCL lacks it: re-create the communicator with a fresh unique id".into(),
    }
}

/// A communicator of the loaded NCCL.
#[derive(Debug)]
pub struct NcclComm {
    lib: Arc<NcclLibrary>,
    comm: ffi::ncclComm_t,
    stream: usize,
    pub(super) cuda: Option<Arc<super::cuda::CudaDevice>>,
    rank: usize,
    size: usize,
    pub(super) poll: Duration,
    pub(super) timeout: Duration,
    /// Aborted or destroyed: the handle must not be used again.
    pub(super) dead: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it
// run at once, which `&mut self` on every call guarantees.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Makes every later call enqueue on `stream` (a `cudaStream_t`; NULL for the legacy
    /// default stream) instead of the one it was created with.
    ///
    /// # Safety
    /// `stream` must be a valid stream of the communicator's device for as long as calls
    /// are enqueued on it.
    pub unsafe fn set_stream(&mut self, stream: *mut c_void) {
        self.stream = stream as usize;
    }

    /// The stream calls are enqueued on, as an address.
    pub(super) fn raw_stream_value(&self) -> usize {
        self.stream
    }

    fn live(&self) -> Result<ffi::ncclComm_t, DeviceError> {
        if self.dead {
            return Err(DeviceError::Aborted { reason: "this communicator was aborted".into() });
        }
        Ok(self.comm)
    }

    pub(super) fn stream(&self) -> ffi::cudaStream_t {
        self.stream as ffi::cudaStream_t
    }

    /// Checks an enqueue's result; an in-progress one is waited on (sleeping).
    fn done(&self, call: &'static str, code: c_int) -> Result<(), DeviceError> {
        self.lib.check(call, code)?;
        if code == IN_PROGRESS {
            match wait_settled(|| self.async_state(), self.poll, self.timeout)? {
                AsyncState::Ready => {}
                AsyncState::Failed(e) => return Err(e),
                AsyncState::InProgress => {
                    return Err(DeviceError::Aborted {
                        reason: format!(
                            "{call} was still in progress after {:?}; abort the communicator",
                            self.timeout
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    fn same(a: &DeviceBuffer, b: &DeviceBuffer) -> Result<(), DeviceError> {
        if a.dtype != b.dtype {
            return Err(DeviceError::InvalidArgument(format!("{:?} and {:?} buffers", a.dtype, b.dtype)));
        }
        Ok(())
    }

    /// A communicator split from this one (shrink, grow), on the same library, stream
    /// and waits.
    fn child(&self, raw: ffi::ncclComm_t, rank: usize, size: usize) -> NcclComm {
        let backend = NcclBackend {
            lib: self.lib.clone(),
            stream: self.stream,
            cuda: self.cuda.clone(),
            poll: self.poll,
            timeout: self.timeout,
        };
        backend.wrap(raw, rank, size)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.dead || self.comm.is_null() {
            return;
        }
        // A communicator in error (or whose state cannot be read) is aborted where NCCL
        // can: destroying it would wait for work that never finishes.
        let healthy = matches!(self.async_state(), Ok(AsyncState::Ready));
        self.dead = true;
        match self.lib.fns.abort {
            // SAFETY: a live communicator, torn down once (`dead` is set).
            Some(abort) if !healthy => {
                let _ = unsafe { abort(self.comm) };
            }
            // SAFETY: a live communicator, destroyed once (`dead` is set).
            _ => {
                let _ = unsafe { (self.lib.fns.comm_destroy)(self.comm) };
            }
        }
    }
}

impl DeviceComm for NcclComm {
    type Buffer = DeviceBuffer;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&mut self, buf: &mut DeviceBuffer, op: ReduceOp) -> Result<(), DeviceError> {
        let (c, dt) = (self.live()?, nccl_dtype(buf.dtype)?);
        // SAFETY: `buf` is valid device memory of `len` elements (DeviceBuffer::from_raw's
        // contract); in place is allowed.
        let r = unsafe { (self.lib.fns.all_reduce)(buf.ptr, buf.ptr, buf.len, dt, nccl_op(op), c, self.stream()) };
        self.done("ncclAllReduce", r)
    }

    fn reduce_scatter(
        &mut self,
        send: &DeviceBuffer,
        recv: &mut DeviceBuffer,
        op: ReduceOp,
    ) -> Result<(), DeviceError> {
        Self::same(send, recv)?;
        if send.len != recv.len * self.size {
            return Err(DeviceError::InvalidArgument(format!("reduce-scatter of {} into {}", send.len, recv.len)));
        }
        let (c, dt) = (self.live()?, nccl_dtype(send.dtype)?);
        // SAFETY: both buffers valid for their lengths, which were checked above.
        let r =
            unsafe { (self.lib.fns.reduce_scatter)(send.ptr, recv.ptr, recv.len, dt, nccl_op(op), c, self.stream()) };
        self.done("ncclReduceScatter", r)
    }

    fn all_gather(&mut self, send: &DeviceBuffer, recv: &mut DeviceBuffer) -> Result<(), DeviceError> {
        Self::same(send, recv)?;
        if recv.len != send.len * self.size {
            return Err(DeviceError::InvalidArgument(format!("all-gather of {} into {}", send.len, recv.len)));
        }
        let (c, dt) = (self.live()?, nccl_dtype(send.dtype)?);
        // SAFETY: both buffers valid for their lengths, which were checked above.
        let r = unsafe { (self.lib.fns.all_gather)(send.ptr, recv.ptr, send.len, dt, c, self.stream()) };
        self.done("ncclAllGather", r)
    }

    fn broadcast(&mut self, buf: &mut DeviceBuffer, root: usize) -> Result<(), DeviceError> {
        if root >= self.size {
            return Err(DeviceError::InvalidArgument(format!("root {root} of {}", self.size)));
        }
        let (c, dt) = (self.live()?, nccl_dtype(buf.dtype)?);
        // SAFETY: `buf` valid for its length; in place is allowed.
        let r =
            unsafe { (self.lib.fns.broadcast)(buf.ptr, buf.ptr, buf.len, dt, int("root", root)?, c, self.stream()) };
        self.done("ncclBroadcast", r)
    }

    fn reduce(&mut self, buf: &mut DeviceBuffer, root: usize, op: ReduceOp) -> Result<(), DeviceError> {
        if root >= self.size {
            return Err(DeviceError::InvalidArgument(format!("root {root} of {}", self.size)));
        }
        let (c, dt) = (self.live()?, nccl_dtype(buf.dtype)?);
        let root = int("root", root)?;
        // SAFETY: `buf` valid for its length; in place is allowed.
        let r = unsafe { (self.lib.fns.reduce)(buf.ptr, buf.ptr, buf.len, dt, nccl_op(op), root, c, self.stream()) };
        self.done("ncclReduce", r)
    }

    fn send_recv(
        &mut self,
        sends: &[(usize, &DeviceBuffer)],
        recvs: &mut [(usize, &mut DeviceBuffer)],
    ) -> Result<(), DeviceError> {
        let c = self.live()?;
        let mut peers = sends.iter().map(|(p, _)| *p).chain(recvs.iter().map(|(p, _)| *p));
        if let Some(p) = peers.find(|&p| p >= self.size) {
            return Err(DeviceError::InvalidArgument(format!("peer {p} of {}", self.size)));
        }
        let f = &self.lib.fns;
        // SAFETY: group calls take no arguments; every start is matched by the end below.
        self.lib.check("ncclGroupStart", unsafe { (f.group_start)() })?;
        let mut first_error = Ok(());
        for (peer, b) in sends {
            let r = nccl_dtype(b.dtype).and_then(|dt| {
                // SAFETY: `b` valid for its length; peer checked above.
                let code = unsafe { (f.send)(b.ptr, b.len, dt, int("peer", *peer)?, c, self.stream()) };
                self.lib.check("ncclSend", code)
            });
            first_error = first_error.and(r);
        }
        for (peer, b) in recvs.iter_mut() {
            let r = nccl_dtype(b.dtype).and_then(|dt| {
                // SAFETY: `b` valid for its length; peer checked above.
                let code = unsafe { (f.recv)(b.ptr, b.len, dt, int("peer", *peer)?, c, self.stream()) };
                self.lib.check("ncclRecv", code)
            });
            first_error = first_error.and(r);
        }
        // SAFETY: closes the group opened above, whatever happened inside it.
        let end = unsafe { (f.group_end)() };
        first_error?;
        self.done("ncclGroupEnd", end)
    }

    fn abort(&mut self) -> Result<(), DeviceError> {
        if self.dead {
            return Ok(());
        }
        let abort = self.lib.fns.abort.ok_or_else(|| unsupported("ncclCommAbort"))?;
        self.dead = true;
        // SAFETY: a live communicator, aborted once (`dead` keeps Drop from destroying it).
        let r = unsafe { abort(self.comm) };
        self.lib.check("ncclCommAbort", r)
    }

    fn revoke(&mut self) -> Result<(), DeviceError> {
        let revoke = self.lib.fns.revoke.ok_or_else(|| unsupported("ncclCommRevoke"))?;
        let c = self.live()?;
        // SAFETY: a live communicator; flags 0 is NCCL_REVOKE_DEFAULT.
        let r = unsafe { revoke(c, 0) };
        self.done("ncclCommRevoke", r)
    }

    fn shrink(&mut self, exclude: &[usize]) -> Result<NcclComm, DeviceError> {
        let shrink = self.lib.fns.shrink.ok_or_else(|| unsupported("ncclCommShrink"))?;
        let c = self.live()?;
        let mut excluded: Vec<usize> = exclude.to_vec();
        excluded.sort_unstable();
        excluded.dedup();
        if excluded.contains(&self.rank) || excluded.iter().any(|&r| r >= self.size) {
            return Err(DeviceError::InvalidArgument(format!("cannot shrink rank {} without {excluded:?}", self.rank)));
        }
        let mut list: Vec<c_int> = excluded.iter().map(|&r| int("rank", r)).collect::<Result<_, _>>()?;
        let flags = if self.lib.fns.revoke.is_some() { SHRINK_DEFAULT } else { SHRINK_ABORT };
        let mut raw: ffi::ncclComm_t = std::ptr::null_mut();
        let mut config = non_blocking_config();
        // SAFETY: a live parent; `list` holds `count` ranks; valid out-pointer and config.
        let r = unsafe { shrink(c, list.as_mut_ptr(), int("count", list.len())?, &mut raw, &mut config, flags) };
        self.lib.check("ncclCommShrink", r)?;
        let rank = self.rank - excluded.iter().filter(|&&r| r < self.rank).count();
        let child = self.child(raw, rank, self.size - excluded.len());
        match wait_settled(|| child.async_state(), self.poll, self.timeout)? {
            AsyncState::Ready => Ok(child),
            AsyncState::Failed(e) => Err(e),
            AsyncState::InProgress => Err(DeviceError::Aborted { reason: "the shrink did not finish".into() }),
        }
    }

    fn grow(&mut self, id: &UniqueId, size: usize) -> Result<NcclComm, DeviceError> {
        let grow = self.lib.fns.grow.ok_or_else(|| unsupported("ncclCommGrow"))?;
        let c = self.live()?;
        let uid = ffi::ncclUniqueId { internal: id.0.map(|b| b as std::ffi::c_char) };
        let mut raw: ffi::ncclComm_t = std::ptr::null_mut();
        let mut config = non_blocking_config();
        // SAFETY: a live parent; rank -1 keeps this rank's number; valid pointers.
        let r = unsafe { grow(c, int("size", size)?, &uid, -1, &mut raw, &mut config) };
        self.lib.check("ncclCommGrow", r)?;
        let child = self.child(raw, self.rank, size);
        match wait_settled(|| child.async_state(), self.poll, self.timeout)? {
            AsyncState::Ready => Ok(child),
            AsyncState::Failed(e) => Err(e),
            AsyncState::InProgress => Err(DeviceError::Aborted { reason: "the grow did not finish".into() }),
        }
    }

    fn async_state(&self) -> Result<AsyncState, DeviceError> {
        let c = self.live()?;
        let Some(get) = self.lib.fns.get_async_error else { return Ok(AsyncState::Ready) };
        let mut state: c_int = SUCCESS;
        // SAFETY: a live communicator and a valid out-pointer.
        let r = unsafe { get(c, &mut state) };
        self.lib.check("ncclCommGetAsyncError", r)?;
        Ok(match state {
            SUCCESS => AsyncState::Ready,
            IN_PROGRESS => AsyncState::InProgress,
            code => AsyncState::Failed(DeviceError::Call {
                call: "ncclCommGetAsyncError",
                code,
                message: self.lib.message(code),
            }),
        })
    }
}
