//! Device (GPU) communicators from C: `phx_device_comm`, a communicator on device
//! buffers that follows a `phx_comm`'s views, its unique id of each view carried by the
//! master (`phalanx::device::session`). Two backends: NCCL (`PHX_DEVICE_NCCL`, device
//! pointers and a CUDA stream; needs this library built with its `nccl` feature and a
//! libnccl at run time) and the CPU stand-in (`PHX_DEVICE_STANDIN`, host `float`
//! buffers, ranks in this process only), which tests the protocol with no GPU.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use phalanx::device::op::{run_planned_on_host, DeviceOp, RawBuf};
use phalanx::device::session::DeviceSession;
use phalanx::device::standin::StandIn;
use phalanx::device::Capabilities;
use phalanx::{DType, Error};

use crate::args::{byte_len, dtype, free_handle, handle, handle_mut, out_ptr, reduce_op, write_out};
use crate::comm::phx_comm;
use crate::status::{guard, invalid, null, Fail};

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
    let backend = phalanx::device::nccl::NcclBackend::for_this_thread().map_err(|e| Fail::from(Error::Device(e)))?;
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
/// the NCCL call is enqueued on (NULL: the legacy default stream), after a device-side
/// copy of each buffer the call writes; it returns once the stream has run the call (the
/// price of restoring the buffers when it fails). The stand-in ignores `stream` and
/// reduces host `float` buffers only.
///
/// Errors (every device collective): `PHX_ERR_NULL` for a NULL handle, or a NULL buffer
/// of more than zero elements; `PHX_ERR_INVALID_ARGUMENT` for an unknown dtype or op
/// code, a dtype other than `PHX_DTYPE_F32` on the stand-in (16-bit integers on NCCL,
/// which lacks them), a root or peer outside the view, or counts that overflow (nothing
/// is sent, the device communicator is kept).
/// `PHX_ERR_DEVICE` when the device communicator failed (a lost peer, as NCCL reports
/// it): it is revoked or aborted and the buffers it writes are as they were (put back
/// from their device-side copies on NCCL); call again: the next call makes a new device
/// communicator (the same view's next generation when every peer lives, the next view's
/// after `phx_comm_update_topology` when one was lost). `PHX_ERR_ABORTED` (retryable)
/// when the view moved on while the device communicator was being made: call
/// `phx_comm_update_topology`, then again. Must not run concurrently with other calls
/// on `dev` or `comm`.
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
    // SAFETY: the handles, `buf` and `stream` are as `device_call` requires (the
    // caller's contract).
    unsafe {
        device_call(dev, comm, dtype_code, stream, |_, dt| {
            Ok((DeviceOp::AllReduce(reduce_op(op_code)?), vec![raw_buf(buf, count, dt, "buf")?]))
        })
    }
}

/// One buffer of a device collective: `count` elements of `dtype` at `ptr` (host memory
/// on the stand-in, device memory on NCCL), checked to be non-NULL unless empty and to
/// fit in the address space; `what` names it in errors. Its memory is not touched until
/// the collective runs.
pub(crate) fn raw_buf(ptr: *const c_void, count: usize, dtype: DType, what: &str) -> Result<RawBuf, Fail> {
    if byte_len(count, dtype, what)? > 0 && ptr.is_null() {
        return Err(null(what));
    }
    Ok(RawBuf { addr: ptr as usize, count, dtype })
}

/// `n` buffers of `count` elements each, back to back from `ptr` (all-to-all's chunks,
/// one per rank), checked as one buffer of `count × n` by [`raw_buf`].
pub(crate) fn chunks(
    ptr: *const c_void,
    count: usize,
    n: usize,
    dtype: DType,
    what: &str,
) -> Result<Vec<RawBuf>, Fail> {
    Ok(raw_buf(ptr, per_rank(count, n, what)?, dtype, what)?.chunks(n))
}

/// `count * n` (a buffer of one chunk per rank), or `PHX_ERR_INVALID_ARGUMENT`.
pub(crate) fn per_rank(count: usize, n: usize, what: &str) -> Result<usize, Fail> {
    count.checked_mul(n).ok_or_else(|| invalid(format!("{what}: {count} elements times {n} ranks overflow")))
}

/// What a device collective's `plan` returns for the view's size and the element type:
/// the op and its buffers, in `DeviceOp`'s order.
pub(crate) type Plan = (DeviceOp, Vec<RawBuf>);

/// The body of every device collective: resolves the handles and the dtype, refuses
/// dtypes other than float32 on the stand-in (16-bit integers on NCCL), then on the
/// chosen backend brings the device communicator to `comm`'s view, asks `plan` for the
/// op and buffers for its size and runs it (`phalanx::device::op::run_in_session`: a
/// device error fails the communicator and is `PHX_ERR_DEVICE`).
///
/// # Safety
/// `dev` and `comm` are NULL or live handles used by no one else; the buffers `plan`
/// returns and `stream` are valid as the calling function documents.
pub(crate) unsafe fn device_call(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    dtype_code: c_int,
    stream: *mut c_void,
    plan: impl FnOnce(usize, DType) -> Result<Plan, Fail>,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let dev = unsafe { handle_mut(dev, "dev") }?;
        // SAFETY: as above.
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dt = dtype(dtype_code)?;
        let plan = move |size| plan(size, dt);
        match &mut dev.inner {
            Backend::StandIn(session) => {
                if dt != DType::F32 {
                    return Err(invalid(format!("the stand-in works on float32 buffers only, not {dt:?}")));
                }
                let _ = stream; // no stream on the CPU
                                // SAFETY: host float buffers valid for the op's reads and writes, used by
                                // no one else (the collective's contract); the written ones are written
                                // back only on success.
                unsafe { run_planned_on_host(session, comm, plan) }
            }
            #[cfg(feature = "nccl")]
            Backend::Nccl(session) => {
                if !phalanx::device::op::nccl_has(dt) {
                    return Err(invalid(format!("NCCL has no {dt:?} element type")));
                }
                // SAFETY: NULL or a valid stream of the communicator's GPU; device buffers
                // valid until the stream has run the call (the collective's contract).
                unsafe { phalanx::device::op::run_planned_on_nccl(session, comm, stream, plan) }
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
