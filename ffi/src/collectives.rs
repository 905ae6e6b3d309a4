//! The blocking collectives over the whole group: all-reduce, reduce-scatter,
//! all-gather, broadcast, reduce and barrier.
//!
//! All block the calling thread until the collective ends on this peer; on any error
//! the buffers hold what they held before the call. Every member must make the same
//! calls in the same order with the same counts, dtype, op and root.

use std::ffi::{c_int, c_void};

use crate::args::{byte_len, bytes, bytes_mut, disjoint, dtype, handle_mut, reduce_op};
use crate::comm::phx_comm;
use crate::status::{guard, invalid};

/// Replaces each of the `count` elements of type `dtype` in `buf` by its reduction
/// (`op`) over all members.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or valid
/// for reads and writes of `count` elements of `dtype`, untouched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_reduce(
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let (dtype, op) = (dtype(dtype_code)?, reduce_op(op_code)?);
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.all_reduce_raw(buf, dtype, op)?;
        Ok(())
    })
}

/// Reduces `input` (`input_count` elements, `size * output_count` where `size` is the
/// group's size) over all members and leaves this rank's segment of `output_count`
/// elements in `output`. Fails with `PHX_ERR_INVALID_ARGUMENT` if the counts do not
/// match the group's size when the collective starts (the view may change between
/// `phx_comm_size` and this call). The buffers must not overlap.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `input` is NULL or
/// readable for `input_count` elements; `output` is NULL or writable for
/// `output_count` elements; neither is touched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_reduce_scatter(
    comm: *mut phx_comm,
    input: *const c_void,
    input_count: usize,
    output: *mut c_void,
    output_count: usize,
    dtype_code: c_int,
    op_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let (dtype, op) = (dtype(dtype_code)?, reduce_op(op_code)?);
        let (in_len, out_len) = (byte_len(input_count, dtype, "input")?, byte_len(output_count, dtype, "output")?);
        disjoint(input, in_len, output, out_len)?;
        // SAFETY: NULL or readable for `input_count` elements (the caller's contract);
        // it does not overlap `output` (checked above).
        let input = unsafe { bytes(input, input_count, dtype, "input") }?;
        // SAFETY: NULL or writable for `output_count` elements (the caller's contract).
        let output = unsafe { bytes_mut(output, output_count, dtype, "output") }?;
        let size = comm.size();
        if output_count.checked_mul(size) != Some(input_count) {
            return Err(invalid(format!(
                "input holds {input_count} elements; a group of {size} needs {size} x output_count ({output_count})"
            )));
        }
        comm.reduce_scatter_raw(input, output, &vec![output_count; size], dtype, op)?;
        Ok(())
    })
}

/// Concatenates every member's `input` (`input_count` elements each) into `output`
/// (`output_count` = `size * input_count` elements), in rank order. Fails with
/// `PHX_ERR_INVALID_ARGUMENT` if the counts do not match the group's size when the
/// collective starts. The buffers must not overlap.
///
/// # Safety
/// As `phx_comm_reduce_scatter`.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_gather(
    comm: *mut phx_comm,
    input: *const c_void,
    input_count: usize,
    output: *mut c_void,
    output_count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        let (in_len, out_len) = (byte_len(input_count, dtype, "input")?, byte_len(output_count, dtype, "output")?);
        disjoint(input, in_len, output, out_len)?;
        // SAFETY: NULL or readable for `input_count` elements (the caller's contract);
        // it does not overlap `output` (checked above).
        let input = unsafe { bytes(input, input_count, dtype, "input") }?;
        // SAFETY: NULL or writable for `output_count` elements (the caller's contract).
        let output = unsafe { bytes_mut(output, output_count, dtype, "output") }?;
        let size = comm.size();
        if input_count.checked_mul(size) != Some(output_count) {
            return Err(invalid(format!(
                "output holds {output_count} elements; a group of {size} needs {size} x input_count ({input_count})"
            )));
        }
        comm.all_gather_raw(input, output, &vec![input_count; size], dtype)?;
        Ok(())
    })
}

/// Copies rank `root`'s `count` elements in `buf` into every member's `buf`.
///
/// # Safety
/// As `phx_comm_all_reduce`.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_broadcast(
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    root: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.broadcast_raw(buf, dtype, root)?;
        Ok(())
    })
}

/// Reduces every member's `buf` (`op`) into rank `root`'s `buf`; the other members'
/// buffers are left as they were.
///
/// # Safety
/// As `phx_comm_all_reduce`.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_reduce(
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
    root: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let (dtype, op) = (dtype(dtype_code)?, reduce_op(op_code)?);
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.reduce_raw(buf, dtype, root, op)?;
        Ok(())
    })
}

/// Returns once every member has called `phx_comm_barrier`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_barrier(comm: *mut phx_comm) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        comm.barrier()?;
        Ok(())
    })
}
