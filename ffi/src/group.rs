//! Sub-group collectives and tagged point-to-point messages (the C face of
//! `Communicator::sub_*`, `send`, `recv` and `noloco_partner`).

use std::ffi::{c_int, c_void};

use crate::args::{bytes, bytes_mut, dtype, handle_mut, out_ptr, reduce_op, write_out};
use crate::comm::phx_comm;
use crate::status::{guard, invalid, null, Fail};

/// `count` ranks at `p`; NULL is allowed for zero ranks.
///
/// # Safety
/// When `count` is not zero, `p` is NULL or valid for reads of `count` `size_t`s.
unsafe fn ranks<'a>(p: *const usize, count: usize) -> Result<&'a [usize], Fail> {
    if count == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null("members"));
    }
    if count > isize::MAX as usize / std::mem::size_of::<usize>() {
        return Err(invalid("members: count overflows the address space"));
    }
    // SAFETY: non-NULL and valid for `count` reads (the caller's contract); the byte
    // length fits in isize (checked above); `size_t` pointers from C are aligned.
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

/// All-reduce (`op`) of the `count` elements of type `dtype` in `buf` among the ranks
/// `members[0..member_count]` only (view ranks, any order, each once, the caller among
/// them). Ranks outside the set do not call it and are not delayed; disjoint sets may
/// run at the same time; members must run the sub-group calls they share in the same
/// order. `PHX_OP_AVG` divides by the number of members. A member lost meanwhile gives
/// `PHX_ERR_PEER_LOST` on the others, with `buf` as before; pick a new sub-group in the
/// new view.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `members` is NULL or
/// readable for `member_count` `size_t`s; `buf` is NULL or valid for reads and writes
/// of `count` elements of `dtype`, untouched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_sub_all_reduce(
    comm: *mut phx_comm,
    members: *const usize,
    member_count: usize,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or readable for `member_count` ranks (the caller's contract).
        let members = unsafe { ranks(members, member_count) }?;
        let (dtype, op) = (dtype(dtype_code)?, reduce_op(op_code)?);
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.sub_all_reduce_raw(members, buf, dtype, op)?;
        Ok(())
    })
}

/// Copies the `count` elements in `buf` of member `root` (a view rank) to every member
/// of `members[0..member_count]`, as `phx_comm_sub_all_reduce` runs among them.
///
/// # Safety
/// As `phx_comm_sub_all_reduce`.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_sub_broadcast(
    comm: *mut phx_comm,
    members: *const usize,
    member_count: usize,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    root: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or readable for `member_count` ranks (the caller's contract).
        let members = unsafe { ranks(members, member_count) }?;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.sub_broadcast_raw(members, buf, dtype, root)?;
        Ok(())
    })
}

/// Returns once every member of `members[0..member_count]` has called it.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `members` is NULL or
/// readable for `member_count` `size_t`s.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_sub_barrier(
    comm: *mut phx_comm,
    members: *const usize,
    member_count: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or readable for `member_count` ranks (the caller's contract).
        let members = unsafe { ranks(members, member_count) }?;
        comm.sub_barrier(members)?;
        Ok(())
    })
}

/// Sends the `count` elements of type `dtype` in `buf` to rank `to` as one message with
/// `tag`. Returns once the message is handed to the transport (it does not wait for the
/// matching `phx_comm_recv`). Messages with different tags never mix; those with one tag
/// arrive in order.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or
/// readable for `count` elements of `dtype`.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_send(
    comm: *mut phx_comm,
    to: usize,
    tag: u32,
    buf: *const c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let buf = unsafe { bytes(buf, count, dtype, "buf") }?;
        comm.send_raw(to, tag, buf, dtype)?;
        Ok(())
    })
}

/// Receives the next message with `tag` from rank `from` into `buf`, which must hold
/// exactly the message's `count` elements of type `dtype` (`PHX_ERR_MISMATCH` otherwise;
/// the message is consumed). Messages of other tags may arrive first; they wait for
/// their own receive. A lost peer gives `PHX_ERR_PEER_LOST`; on any error `buf` holds
/// what it held before.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or valid
/// for reads and writes of `count` elements of `dtype`, untouched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_recv(
    comm: *mut phx_comm,
    from: usize,
    tag: u32,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.recv_raw(from, tag, buf, dtype)?;
        Ok(())
    })
}

/// NoLoCo pairing: writes to `*has_partner` 1 and to `*partner` the partner of `rank`
/// among ranks `0..n` at `step` for `seed` (the same on every peer, no communication),
/// or 0 to `*has_partner` for the rank left out when `n` is odd (and ranks outside
/// `0..n`). Thread-safe.
///
/// # Safety
/// `partner` and `has_partner` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn phx_noloco_partner(
    seed: u64,
    step: u64,
    n: usize,
    rank: usize,
    partner: *mut usize,
    has_partner: *mut c_int,
) -> c_int {
    guard(|| {
        let (partner, has_partner) = (out_ptr(partner, "partner")?, out_ptr(has_partner, "has_partner")?);
        let p = phalanx::Communicator::noloco_partner(seed, step, n, rank);
        // SAFETY: both non-NULL (checked) and valid for writes (the caller's contract).
        unsafe {
            write_out(partner, p.unwrap_or(0));
            write_out(has_partner, c_int::from(p.is_some()));
        }
        Ok(())
    })
}
