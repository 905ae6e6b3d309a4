//! The non-blocking all-reduce: `phx_comm_all_reduce_start` and the `phx_pending`
//! handle it returns.

use std::ffi::{c_int, c_void};

use phalanx::comm::PendingRaw;
use phalanx::DType;

use crate::args::{bytes, deliver_started, dtype, free_handle, get_into, handle_mut, out_ptr, reduce_op, write_out};
use crate::comm::phx_comm;
use crate::status::{guard, null};

/// An all-reduce started by `phx_comm_all_reduce_start`, owning a copy of its buffer.
/// Consumed by `phx_pending_wait` or `phx_pending_free`. It may be waited on from any
/// thread, including while its communicator runs other calls on another thread.
pub struct phx_pending {
    inner: PendingRaw,
    count: usize,
    dtype: DType,
}

/// Starts an all-reduce of a copy of `buf` (`count` elements of `dtype`) and returns at
/// once with the handle in `*out`; `buf` is not used after the call. Several may be in
/// flight; every member must start them in the same order. A started all-reduce is not
/// retried: a lost peer makes `phx_pending_wait` fail with the original data.
///
/// Ownership: the caller owns `*out` and must pass it to `phx_pending_wait` or
/// `phx_pending_free` exactly once. Must not run concurrently with other calls on
/// `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or
/// readable for `count` elements; `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_reduce_start(
    comm: *mut phx_comm,
    buf: *const c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
    out: *mut *mut phx_pending,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let out = out_ptr(out, "out")?;
        let (dtype, op) = (dtype(dtype_code)?, reduce_op(op_code)?);
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let data = unsafe { bytes(buf, count, dtype, "buf") }?.to_vec();
        let pending = comm.all_reduce_start_raw(data, dtype, op)?;
        let handle = Box::into_raw(Box::new(phx_pending { inner: pending, count, dtype }));
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Whether the all-reduce has finished (`phx_pending_wait` would not block): 1 or 0 in
/// `*out`. Thread-safe with respect to other `phx_pending_is_finished` calls.
///
/// # Safety
/// `pending` is NULL or a live handle; `out` is NULL or valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn phx_pending_is_finished(pending: *const phx_pending, out: *mut c_int) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(pending, "pending", out, |p: &phx_pending| c_int::from(p.inner.is_finished())) }
}

/// Waits for the all-reduce and writes its `count` elements into `out_buf`: the reduced
/// values on `PHX_OK`, the values passed to `phx_comm_all_reduce_start` on a collective
/// error (`PHX_ERR_PEER_LOST`, ...). `count` must be the count it was started with
/// (`PHX_ERR_INVALID_ARGUMENT` otherwise, and nothing is written).
///
/// Ownership: always consumes and frees `pending`, whatever the status (except
/// `PHX_ERR_NULL` for a NULL `pending`); the all-reduce is waited for even when
/// `out_buf` is NULL or `count` is wrong. May run on any thread.
///
/// # Safety
/// `pending` is NULL or a live handle from `phx_comm_all_reduce_start`, not used
/// afterwards; `out_buf` is NULL or writable for `count` elements of the started dtype.
#[no_mangle]
pub unsafe extern "C" fn phx_pending_wait(pending: *mut phx_pending, out_buf: *mut c_void, count: usize) -> c_int {
    guard(|| {
        if pending.is_null() {
            return Err(null("pending"));
        }
        // SAFETY: a live handle made by `Box::into_raw`, given back for good.
        let pending = unsafe { Box::from_raw(pending) };
        let (expected, dtype) = (pending.count, pending.dtype);
        // SAFETY: NULL or writable for `count` elements of `dtype` (the caller's contract).
        unsafe { deliver_started(pending.inner.wait(), out_buf, count, expected, dtype, "all-reduce") }
    })
}

/// Frees `pending` without waiting: the all-reduce goes on in the background (the other
/// members still need this peer's part) and its result is discarded. NULL is a no-op.
///
/// # Safety
/// `pending` is NULL or a live handle from `phx_comm_all_reduce_start`, not used
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_pending_free(pending: *mut phx_pending) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(pending) }
}
