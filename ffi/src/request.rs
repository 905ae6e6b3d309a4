//! Non-blocking point-to-point messages: `phx_comm_isend`, `phx_comm_irecv` and the
//! `phx_request` handle they return.

use std::ffi::{c_int, c_void};

use phalanx::comm::PendingP2pRaw;
use phalanx::DType;

use crate::args::{byte_len, bytes, dtype, free_handle, get_into, handle_mut, out_ptr, write_out};
use crate::comm::phx_comm;
use crate::status::{guard, null};

/// Where a receive's message goes when its request is waited on: the caller's buffer.
struct Target(*mut c_void);

// SAFETY: the pointer is only written through by `phx_request_wait`, on whichever
// thread calls it; the caller's contract keeps the buffer valid and unused by others
// until then, so moving the address between threads is sound.
unsafe impl Send for Target {}

/// A message started by `phx_comm_isend` or `phx_comm_irecv`. Consumed by
/// `phx_request_wait` or `phx_request_free`. It may be waited on from any thread,
/// including while its communicator runs other calls on another thread.
pub struct phx_request {
    inner: PendingP2pRaw,
    /// The receive buffer (NULL for a send), written by `phx_request_wait`.
    target: Target,
    count: usize,
    dtype: DType,
}

/// Starts sending a copy of the `count` elements of type `dtype` in `buf` to rank `to`
/// as one message with `tag`, and returns at once with the request in `*out`; `buf` may
/// be reused as soon as this returns. Matches a `phx_comm_recv` or `phx_comm_irecv`.
/// Any number of requests may be in flight, in both directions; calls on one
/// `(peer, tag, direction)`, blocking or not, run in the order they were made. A view
/// change while the message is in flight fails it (`PHX_ERR_PEER_LOST` if the peer
/// left, `PHX_ERR_ABORTED` otherwise) at `phx_request_wait`.
///
/// Ownership: the caller owns `*out` and must pass it to `phx_request_wait` or
/// `phx_request_free` exactly once. Must not run concurrently with other calls on
/// `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or
/// readable for `count` elements of `dtype`; `out` is NULL or valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_isend(
    comm: *mut phx_comm,
    to: usize,
    tag: u32,
    buf: *const c_void,
    count: usize,
    dtype_code: c_int,
    out: *mut *mut phx_request,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let out = out_ptr(out, "out")?;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let data = unsafe { bytes(buf, count, dtype, "buf") }?.to_vec();
        let inner = comm.isend_raw(to, tag, data, dtype)?;
        let request = phx_request { inner, target: Target(std::ptr::null_mut()), count, dtype };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(request))) };
        Ok(())
    })
}

/// Starts receiving the next message with `tag` from rank `from`, which must hold
/// exactly `count` elements of type `dtype` (`PHX_ERR_MISMATCH` at wait otherwise),
/// and returns at once with the request in `*out`. The message is written into `buf`
/// by `phx_request_wait`, only on success: on any error, and if the request is freed
/// instead, `buf` is never written. The ordering and failure rules are
/// `phx_comm_isend`'s.
///
/// Ownership: as `phx_comm_isend`; `buf` must stay valid, and unused by others, until
/// the request is waited on or freed.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or valid
/// for writes of `count` elements of `dtype` until the request ends; `out` is NULL or
/// valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_irecv(
    comm: *mut phx_comm,
    from: usize,
    tag: u32,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    out: *mut *mut phx_request,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let out = out_ptr(out, "out")?;
        let dtype = dtype(dtype_code)?;
        let bytes = byte_len(count, dtype, "buf")?;
        if buf.is_null() && bytes > 0 {
            return Err(null("buf"));
        }
        let inner = comm.irecv_raw(from, tag, vec![0u8; bytes], dtype)?;
        let request = phx_request { inner, target: Target(buf), count, dtype };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(request))) };
        Ok(())
    })
}

/// Whether the message has ended (`phx_request_wait` would not block): 1 or 0 in
/// `*out`. Thread-safe with respect to other `phx_request_test` calls.
///
/// # Safety
/// `request` is NULL or a live handle; `out` is NULL or valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn phx_request_test(request: *const phx_request, out: *mut c_int) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(request, "request", out, |r: &phx_request| c_int::from(r.inner.is_done())) }
}

/// Waits for the message and returns its status; for a receive, on `PHX_OK` the message
/// is in the buffer passed to `phx_comm_irecv` (untouched on any error).
///
/// Ownership: always consumes and frees `request`, whatever the status (except
/// `PHX_ERR_NULL` for a NULL `request`). May run on any thread.
///
/// # Safety
/// `request` is NULL or a live handle from `phx_comm_isend`/`phx_comm_irecv`, not used
/// afterwards; a receive's buffer is still valid for writes (`phx_comm_irecv`).
#[no_mangle]
pub unsafe extern "C" fn phx_request_wait(request: *mut phx_request) -> c_int {
    guard(|| {
        if request.is_null() {
            return Err(null("request"));
        }
        // SAFETY: a live handle made by `Box::into_raw`, given back for good.
        let request = unsafe { Box::from_raw(request) };
        let (target, count, dtype) = (request.target.0, request.count, request.dtype);
        let (result, data) = request.inner.wait();
        result?;
        if !target.is_null() && data.len() == count * dtype.size() {
            // SAFETY: the receive buffer is valid for writes of `count` elements of
            // `dtype` (`data.len()` bytes) and unused by others until now (the caller's
            // contract); `data` is a separate allocation, so the two do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), target.cast::<u8>(), data.len()) };
        }
        Ok(())
    })
}

/// Frees `request` without waiting: the message goes on in the background and its
/// outcome is discarded (a receive still takes its message off the queue, and never
/// writes the caller's buffer). NULL is a no-op.
///
/// # Safety
/// `request` is NULL or a live handle from `phx_comm_isend`/`phx_comm_irecv`, not used
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_request_free(request: *mut phx_request) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(request) }
}
