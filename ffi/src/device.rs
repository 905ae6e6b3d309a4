//! Device (GPU) communicators from C: `phx_device_comm`, a communicator on device
//! buffers that follows a `phx_comm`'s views, its unique id of each view carried by the
//! master (`phalanx::device::session`). Two backends: NCCL (`PHX_DEVICE_NCCL`, device
//! pointers and a CUDA stream; needs this library built with its `nccl` feature and a
//! libnccl at run time) and the CPU stand-in (`PHX_DEVICE_STANDIN`, host `float`
//! buffers, ranks in this process only), which tests the protocol with no GPU.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::{Capabilities, DeviceComm};
use phalanx::{DType, Error};

use crate::args::{bytes_mut, dtype, free_handle, handle, handle_mut, out_ptr, reduce_op, write_out};
use crate::comm::phx_comm;
use crate::status::{guard, invalid, Fail};

/// The CPU stand-in backend: host buffers of `float` only, and only between ranks of
/// this process (threads), for tests with no GPU.
pub const PHX_DEVICE_STANDIN: c_int = 0;
/// The NCCL backend: device pointers and a `cudaStream_t`. The library is looked for at
/// run time (`PHALANX_NCCL_LIBRARY`, an `nvidia-nccl-cu12`/`-cu13` wheel of the active
/// `python3`, `libnccl.so.2`); a missing or unusable one is `PHX_ERR_DEVICE`.
pub const PHX_DEVICE_NCCL: c_int = 1;

/// A device communicator: the device side of one member of a `phx_comm`'s group. Made
/// with `phx_device_comm_new`, freed with `phx_device_comm_free`. Each collective first
/// brings it to the `phx_comm`'s current view (making, shrinking or growing the device
/// communicator, every member together). Not internally synchronised: calls on one
/// handle must not overlap; it may be moved between threads.
pub struct phx_device_comm {
    inner: Backend,
}

enum Backend {
    StandIn(DeviceSession<StandIn>),
    #[cfg(feature = "nccl")]
    Nccl(DeviceSession<phalanx::device::nccl::NcclBackend>),
}

/// The process's stand-in fabric: every stand-in communicator of this process meets there.
fn stand_in() -> StandIn {
    static FABRIC: OnceLock<StandIn> = OnceLock::new();
    // A rank waiting a minute for the others is hung (a lost peer the stand-in cannot see).
    FABRIC.get_or_init(|| StandIn::new(Capabilities::ALL, Duration::from_secs(60))).clone()
}

#[cfg(feature = "nccl")]
fn nccl(me: u64) -> Result<Backend, Fail> {
    use phalanx::device::nccl::{NcclBackend, NcclLibrary};
    let lib = NcclLibrary::load().map_err(|e| Fail::from(Error::Device(e)))?;
    // SAFETY: NULL is the legacy default stream, valid for as long as the process runs;
    // each collective enqueues on the caller's stream instead (`set_stream`).
    let backend = unsafe { NcclBackend::new(std::sync::Arc::new(lib), std::ptr::null_mut()) };
    Ok(Backend::Nccl(DeviceSession::new(me, backend)))
}

#[cfg(not(feature = "nccl"))]
fn nccl(_me: u64) -> Result<Backend, Fail> {
    Err(Error::Device(phalanx::device::DeviceError::Unsupported {
        operation: "the NCCL backend",
        hint: "this phalanx library was built without its `nccl` feature: rebuild phalanx-ffi with `--features nccl`"
            .into(),
    })
    .into())
}

/// Makes a device communicator for the member `comm` on `backend` (`PHX_DEVICE_NCCL` or
/// `PHX_DEVICE_STANDIN`) in `*out`. Not a collective: the device communicator itself is
/// made by the first collective. `PHX_ERR_DEVICE` when NCCL is asked for and none can be
/// loaded (the message lists every path tried), or this library was built without it.
///
/// # Safety
/// `comm` is NULL or a live communicator; `out` NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_new(
    comm: *const phx_comm,
    backend: c_int,
    out: *mut *mut phx_device_comm,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let me = unsafe { handle(comm, "comm") }?.inner.peer_id();
        let out = out_ptr(out, "out")?;
        let inner = match backend {
            PHX_DEVICE_STANDIN => Backend::StandIn(DeviceSession::new(me, stand_in())),
            PHX_DEVICE_NCCL => nccl(me)?,
            other => return Err(invalid(format!("unknown device backend {other}"))),
        };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(phx_device_comm { inner }))) };
        Ok(())
    })
}

/// Reduces `count` elements of `dtype` at `buf` over every member of `comm`'s group with
/// `op`, in place: a collective, every member calls it. `stream` is the `cudaStream_t`
/// the NCCL call is enqueued on (NULL: the legacy default stream); synchronize it before
/// reading `buf`. The stand-in ignores `stream` and reduces host `float` buffers only.
///
/// Errors: `PHX_ERR_DEVICE` when the device communicator failed (a lost peer, as NCCL
/// reports it): it is revoked or aborted, `buf` is unchanged on the stand-in (on NCCL its
/// content is undefined: keep a copy); call `phx_comm_update_topology`, then again.
/// `PHX_ERR_ABORTED` (retryable) when the view moved on or this view's device
/// communicator failed before: the same. Must not run concurrently with other calls on
/// `dev` or `comm`.
///
/// # Safety
/// `dev` and `comm` are NULL or live handles used by no one else; `buf` NULL or, for the
/// stand-in, host memory valid for `count` elements, for NCCL device memory of the
/// communicator's GPU valid until `stream` has run the call; `stream` NULL or a valid
/// stream of that GPU.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_all_reduce(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
    stream: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let dev = unsafe { handle_mut(dev, "dev") }?;
        // SAFETY: as above.
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        let op = reduce_op(op_code)?;
        match &mut dev.inner {
            Backend::StandIn(session) => {
                if dtype != DType::F32 {
                    return Err(invalid(format!("the stand-in reduces float32 buffers only, not {dtype:?}")));
                }
                let _ = stream; // no stream on the CPU
                                // SAFETY: NULL or valid for `count` elements (the caller's contract).
                let bytes = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
                let mut values: Vec<f32> =
                    bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
                let d = session.sync(comm)?;
                if let Err(e) = d.all_reduce(&mut values, op) {
                    session.failed(e.clone());
                    return Err(Error::Device(e).into());
                }
                for (c, v) in bytes.chunks_exact_mut(4).zip(&values) {
                    c.copy_from_slice(&v.to_ne_bytes());
                }
                Ok(())
            }
            #[cfg(feature = "nccl")]
            Backend::Nccl(session) => {
                use phalanx::device::nccl::DeviceBuffer;
                if count > 0 && buf.is_null() {
                    return Err(crate::status::null("buf"));
                }
                let d = session.sync(comm)?;
                // SAFETY: NULL or a valid stream of the communicator's GPU (the caller's
                // contract).
                unsafe { d.set_stream(stream) };
                // SAFETY: device memory valid for `count` elements of `dtype` until the
                // stream has run the call (the caller's contract).
                let mut b = unsafe { DeviceBuffer::from_raw(buf, count, dtype) };
                if let Err(e) = d.all_reduce(&mut b, op) {
                    session.failed(e.clone());
                    return Err(Error::Device(e).into());
                }
                Ok(())
            }
        }
    })
}

/// Frees a device communicator (NULL is accepted). Its NCCL communicator, if any, is
/// destroyed; the `phx_comm` is not touched.
///
/// # Safety
/// `dev` is NULL or a live handle, not used again.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_free(dev: *mut phx_device_comm) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(dev) }
}
