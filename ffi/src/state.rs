//! Shared state from C: the `phx_state` handle, its tensors, and
//! `phx_comm_sync_shared_state`.

use std::ffi::{c_char, c_int, c_void};

use phalanx::state::SharedState;
use phalanx::DType;

use crate::args::{
    bytes, bytes_mut, c_str, dtype, free_handle, get_into, handle, handle_mut, out_ptr, strategy, write_out,
};
use crate::comm::phx_comm;
use crate::status::{guard, invalid, Fail, PHX_ERR_NOT_FOUND};

/// Bytes of a shared-state digest (BLAKE3).
pub const PHX_DIGEST_LEN: usize = 32;

/// Named tensors plus a revision, kept bit-identical across peers by
/// `phx_comm_sync_shared_state`. Created by `phx_state_new`, freed by `phx_state_free`.
/// Not internally synchronised: calls on one state must not overlap.
pub struct phx_state {
    inner: SharedState,
}

/// What `phx_comm_sync_shared_state` did on this peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct phx_sync_report {
    /// Tensors this peer received.
    pub tensors_received: usize,
    /// Bytes this peer received.
    pub bytes_received: usize,
    /// Tensors this peer sent.
    pub tensors_sent: usize,
}

/// The bytes and dtype of tensor `name`, if there is one.
fn tensor<'a>(state: &'a SharedState, name: &str) -> Option<(DType, &'a [u8])> {
    state.get_raw(name)
}

/// Creates an empty shared state at revision 0 in `*out`.
///
/// Ownership: the caller owns `*out` and frees it with `phx_state_free`. Thread-safe.
///
/// # Safety
/// `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_state_new(out: *mut *mut phx_state) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        let handle = Box::into_raw(Box::new(phx_state { inner: SharedState::new() }));
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Adds (or replaces) tensor `name` with a copy of `count` elements of `dtype` from
/// `data`. Every member must insert the same names in the same order.
///
/// # Safety
/// `state` is NULL or a live state not used concurrently; `name` is a NUL-terminated
/// UTF-8 string; `data` is NULL or readable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn phx_state_insert(
    state: *mut phx_state,
    name: *const c_char,
    data: *const c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let state = &mut unsafe { handle_mut(state, "state") }?.inner;
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let name = unsafe { c_str(name, "name") }?;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let data = unsafe { bytes(data, count, dtype, "data") }?;
        state.insert_raw(name, dtype, data);
        Ok(())
    })
}

/// Copies tensor `name` into `out` (`count` elements of `dtype`). `PHX_ERR_NOT_FOUND`
/// when there is no such tensor; `PHX_ERR_INVALID_ARGUMENT` when its dtype or count
/// differ (see `phx_state_info`).
///
/// # Safety
/// `state` is NULL or a live state not used concurrently; `name` is a NUL-terminated
/// string; `out` is NULL or writable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn phx_state_get(
    state: *const phx_state,
    name: *const c_char,
    out: *mut c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let state = &unsafe { handle(state, "state") }?.inner;
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let name = unsafe { c_str(name, "name") }?;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or writable for `count` elements (the caller's contract).
        let out = unsafe { bytes_mut(out, count, dtype, "out") }?;
        let (held, data) = tensor(state, name)
            .ok_or_else(|| Fail { code: PHX_ERR_NOT_FOUND, message: format!("no tensor '{name}'") })?;
        if held != dtype || data.len() != out.len() {
            return Err(invalid(format!(
                "tensor '{name}' holds {} elements of {held}, asked for {count} of {dtype}",
                data.len() / held.size()
            )));
        }
        out.copy_from_slice(data);
        Ok(())
    })
}

/// The dtype code and element count of tensor `name` (`PHX_ERR_NOT_FOUND` when there
/// is none).
///
/// # Safety
/// `state` is NULL or a live state not used concurrently; `name` is a NUL-terminated
/// string; `dtype_out` and `count_out` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn phx_state_info(
    state: *const phx_state,
    name: *const c_char,
    dtype_out: *mut c_int,
    count_out: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let state = &unsafe { handle(state, "state") }?.inner;
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let name = unsafe { c_str(name, "name") }?;
        let (dtype_out, count_out) = (out_ptr(dtype_out, "dtype_out")?, out_ptr(count_out, "count_out")?);
        let (dtype, data) = tensor(state, name)
            .ok_or_else(|| Fail { code: PHX_ERR_NOT_FOUND, message: format!("no tensor '{name}'") })?;
        // SAFETY: both checked non-NULL; valid for writes (the caller's contract).
        unsafe {
            write_out(dtype_out, c_int::from(dtype.code()));
            write_out(count_out, data.len() / dtype.size());
        }
        Ok(())
    })
}

/// The state's revision in `*out`.
///
/// # Safety
/// `state` is NULL or a live state not used concurrently; `out` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn phx_state_revision(state: *const phx_state, out: *mut u64) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(state, "state", out, |s: &phx_state| s.inner.revision) }
}

/// Sets the state's revision: bump it whenever the tensors change (e.g. every step). A
/// sync adopts the revision of the content it agrees on.
///
/// # Safety
/// `state` is NULL or a live state not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn phx_state_set_revision(state: *mut phx_state, revision: u64) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        unsafe { handle_mut(state, "state") }?.inner.revision = revision;
        Ok(())
    })
}

/// One BLAKE3 hash of the whole state (names, dtypes and bytes; not the revision) into
/// `out`, `PHX_DIGEST_LEN` (32) bytes. Equal digests mean bit-identical states.
///
/// # Safety
/// `state` is NULL or a live state not used concurrently; `out` is NULL or writable for
/// 32 bytes.
#[no_mangle]
pub unsafe extern "C" fn phx_state_digest(state: *const phx_state, out: *mut u8) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let state = &unsafe { handle(state, "state") }?.inner;
        let out = out_ptr(out, "out")?;
        let digest = state.digest();
        // SAFETY: checked non-NULL; writable for 32 bytes (the caller's contract); a
        // local array never overlaps the caller's buffer.
        unsafe { std::ptr::copy_nonoverlapping(digest.as_ptr(), out, PHX_DIGEST_LEN) };
        Ok(())
    })
}

/// Frees `state`. NULL is a no-op.
///
/// # Safety
/// `state` is NULL or a live handle from `phx_state_new`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_state_free(state: *mut phx_state) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(state) }
}

/// Makes `state` bit-identical on every member: tensors whose content differs from the
/// agreed content (see `PHX_SYNC_*`) are fetched from a member that holds it, and the
/// revision becomes the agreed one. Every member must call it with the same tensor
/// names in the same order. On error `state` is unchanged. Writes what was transferred
/// to `*report_or_null` unless it is NULL. Blocks; must not run concurrently with other
/// calls on `comm` or `state`.
///
/// # Safety
/// `comm` and `state` are NULL or live handles not used concurrently; `report_or_null`
/// is NULL or valid for a write of a `phx_sync_report`.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_sync_shared_state(
    comm: *mut phx_comm,
    state: *mut phx_state,
    strategy_code: c_int,
    report_or_null: *mut phx_sync_report,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let state = &mut unsafe { handle_mut(state, "state") }?.inner;
        let strategy = strategy(strategy_code)?;
        let report = comm.sync_shared_state(state, strategy)?;
        if !report_or_null.is_null() {
            let report = phx_sync_report {
                tensors_received: report.tensors_received,
                bytes_received: report.bytes_received,
                tensors_sent: report.tensors_sent,
            };
            // SAFETY: non-NULL; valid for a write (the caller's contract).
            unsafe { write_out(report_or_null, report) };
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{PHX_DTYPE_BF16, PHX_DTYPE_U16};
    use crate::status::{PHX_ERR_INVALID_ARGUMENT, PHX_ERR_NOT_FOUND, PHX_OK};

    #[test]
    fn state_round_trip() {
        let mut state = std::ptr::null_mut();
        // SAFETY: every pointer below is valid for its use; the state is freed at the end.
        unsafe {
            assert_eq!(phx_state_new(&mut state), PHX_OK);
            let data = [1u16, 2, 3];
            assert_eq!(phx_state_insert(state, c"w".as_ptr(), data.as_ptr().cast(), 3, PHX_DTYPE_BF16), PHX_OK);
            let (mut dtype, mut count) = (0, 0);
            assert_eq!(phx_state_info(state, c"w".as_ptr(), &mut dtype, &mut count), PHX_OK);
            assert_eq!((dtype, count), (PHX_DTYPE_BF16, 3));
            let mut back = [0u16; 3];
            assert_eq!(phx_state_get(state, c"w".as_ptr(), back.as_mut_ptr().cast(), 3, PHX_DTYPE_BF16), PHX_OK);
            assert_eq!(back, data);
            let got = phx_state_get(state, c"w".as_ptr(), back.as_mut_ptr().cast(), 3, PHX_DTYPE_U16);
            assert_eq!(got, PHX_ERR_INVALID_ARGUMENT);
            assert_eq!(
                phx_state_get(state, c"v".as_ptr(), back.as_mut_ptr().cast(), 3, PHX_DTYPE_BF16),
                PHX_ERR_NOT_FOUND
            );
            assert_eq!(phx_state_set_revision(state, 7), PHX_OK);
            let mut rev = 0;
            assert_eq!(phx_state_revision(state, &mut rev), PHX_OK);
            assert_eq!(rev, 7);
            let mut digest = [0u8; 32];
            assert_eq!(phx_state_digest(state, digest.as_mut_ptr()), PHX_OK);
            assert_eq!(digest, (*state).inner.digest());
            assert_eq!(phx_state_free(state), PHX_OK);
            assert_eq!(phx_state_free(std::ptr::null_mut()), PHX_OK);
        }
    }
}
