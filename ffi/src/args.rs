//! Codes of element types, operators and sync strategies, and the checks that turn the
//! C caller's codes, pointers and strings into Rust values. Each helper checks for NULL
//! before touching a pointer.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::{SocketAddr, ToSocketAddrs};

use phalanx::state::SyncStrategy;
use phalanx::transport::quic::QuicConfig;
use phalanx::{DType, ReduceOp};

use crate::status::{guard, invalid, null, Fail};

// ---------------------------------------------------------------------------------------
// Codes of element types, operators and sync strategies: phalanx's wire codes, written
// out as literals for cbindgen (the `codes_match_phalanx` test keeps them equal).

/// IEEE 754 binary32 (`float`).
pub const PHX_DTYPE_F32: c_int = 0;
/// IEEE 754 binary64 (`double`).
pub const PHX_DTYPE_F64: c_int = 1;
/// IEEE 754 binary16 (16-bit storage, e.g. `_Float16` or `uint16_t` bits).
pub const PHX_DTYPE_F16: c_int = 2;
/// bfloat16 (16-bit storage).
pub const PHX_DTYPE_BF16: c_int = 3;
/// `int8_t`.
pub const PHX_DTYPE_I8: c_int = 4;
/// `int16_t`.
pub const PHX_DTYPE_I16: c_int = 5;
/// `int32_t`.
pub const PHX_DTYPE_I32: c_int = 6;
/// `int64_t`.
pub const PHX_DTYPE_I64: c_int = 7;
/// `uint8_t`.
pub const PHX_DTYPE_U8: c_int = 8;
/// `uint16_t`.
pub const PHX_DTYPE_U16: c_int = 9;
/// `uint32_t`.
pub const PHX_DTYPE_U32: c_int = 10;
/// `uint64_t`.
pub const PHX_DTYPE_U64: c_int = 11;

/// Sum (wrapping for integers).
pub const PHX_OP_SUM: c_int = 0;
/// Product (wrapping for integers).
pub const PHX_OP_PROD: c_int = 1;
/// Minimum.
pub const PHX_OP_MIN: c_int = 2;
/// Maximum.
pub const PHX_OP_MAX: c_int = 3;
/// Sum divided by the number of contributors (integers truncate toward zero).
pub const PHX_OP_AVG: c_int = 4;

/// Shared-state sync: the content most peers hold wins; peers that differ fetch it.
pub const PHX_SYNC_ENFORCE_POPULAR: c_int = 0;
/// Shared-state sync: this peer's content never counts; it only receives.
pub const PHX_SYNC_RECEIVE_ONLY: c_int = 1;
/// Shared-state sync: this peer's content is authoritative; it never receives.
pub const PHX_SYNC_SEND_ONLY: c_int = 2;

// ---------------------------------------------------------------------------------------
// Argument checks.

pub(crate) fn dtype(code: c_int) -> Result<DType, Fail> {
    u8::try_from(code).ok().and_then(DType::from_code).ok_or_else(|| invalid(format!("unknown dtype code {code}")))
}

pub(crate) fn reduce_op(code: c_int) -> Result<ReduceOp, Fail> {
    u8::try_from(code).ok().and_then(ReduceOp::from_code).ok_or_else(|| invalid(format!("unknown op code {code}")))
}

pub(crate) fn strategy(code: c_int) -> Result<SyncStrategy, Fail> {
    u8::try_from(code)
        .ok()
        .and_then(SyncStrategy::from_code)
        .ok_or_else(|| invalid(format!("unknown sync strategy code {code}")))
}

/// Bytes of `count` elements of `dtype`, if they fit in a Rust slice.
pub(crate) fn byte_len(count: usize, dtype: DType, what: &str) -> Result<usize, Fail> {
    count
        .checked_mul(dtype.size())
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid(format!("{what}: {count} elements of {dtype} overflow the address space")))
}

/// `*const T` as a shared reference, or `PHX_ERR_NULL`.
///
/// # Safety
/// `p` is NULL or points to a live `T` not mutated for `'a`.
pub(crate) unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    // SAFETY: non-NULL `p` points to a live, unmutated `T` (the caller's contract).
    unsafe { p.as_ref() }.ok_or_else(|| null(what))
}

/// `*mut T` as an exclusive reference, or `PHX_ERR_NULL`.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else accesses for `'a`.
pub(crate) unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: non-NULL `p` points to a live `T` used by no one else (the caller's contract).
    unsafe { p.as_mut() }.ok_or_else(|| null(what))
}

/// Checks that an out-pointer is not NULL (before any work is done).
pub(crate) fn out_ptr<T>(p: *mut T, what: &str) -> Result<*mut T, Fail> {
    if p.is_null() {
        Err(null(what))
    } else {
        Ok(p)
    }
}

/// Writes `value` through an out-pointer checked by [`out_ptr`].
///
/// # Safety
/// `p` is non-NULL, aligned and valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, value: T) {
    // SAFETY: the caller's contract; `write` does not read or drop the old contents,
    // which may be uninitialised.
    unsafe { p.write(value) }
}

/// A NUL-terminated C string as UTF-8.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string alive and unmodified for `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// A cluster secret from an optional C string; an empty one is refused.
///
/// # Safety
/// As [`c_str`].
pub(crate) unsafe fn secret(p: *const c_char) -> Result<QuicConfig, Fail> {
    if p.is_null() {
        return Ok(QuicConfig::default());
    }
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return Err(invalid("the secret is empty (pass NULL for no secret)"));
    }
    Ok(QuicConfig::with_secret(bytes))
}

/// "host:port" or "ip:port" as a socket address (the first one a name resolves to).
pub(crate) fn socket_addr(s: &str, what: &str) -> Result<SocketAddr, Fail> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.to_socket_addrs()
        .map_err(|e| invalid(format!("{what} '{s}': {e}")))?
        .next()
        .ok_or_else(|| invalid(format!("{what} '{s}' resolves to no address")))
}

/// `count` elements of `dtype` at `p` as bytes; NULL is allowed for zero elements.
///
/// # Safety
/// When the byte length is not zero, `p` is NULL or valid for reads of that many bytes,
/// not written by anyone for `'a`.
pub(crate) unsafe fn bytes<'a>(p: *const c_void, count: usize, dtype: DType, what: &str) -> Result<&'a [u8], Fail> {
    let len = byte_len(count, dtype, what)?;
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL, valid for `len` bytes of reads and not written meanwhile (the
    // caller's contract); `len <= isize::MAX` (checked by `byte_len`); u8 needs no
    // alignment.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// Like [`bytes`], writable.
///
/// # Safety
/// When the byte length is not zero, `p` is NULL or valid for reads and writes of that
/// many bytes, accessed by no one else for `'a`.
pub(crate) unsafe fn bytes_mut<'a>(
    p: *mut c_void,
    count: usize,
    dtype: DType,
    what: &str,
) -> Result<&'a mut [u8], Fail> {
    let len = byte_len(count, dtype, what)?;
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL, valid for `len` bytes of reads and writes, not aliased (the
    // caller's contract); `len <= isize::MAX` (checked by `byte_len`); u8 needs no
    // alignment.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
}

/// Refuses an input and an output buffer that overlap (a `&` and a `&mut` to the same
/// bytes would be undefined behaviour).
pub(crate) fn disjoint(a: *const c_void, a_len: usize, b: *const c_void, b_len: usize) -> Result<(), Fail> {
    let (a, b) = (a as usize, b as usize);
    if a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len) {
        return Err(invalid("the input and output buffers overlap"));
    }
    Ok(())
}

/// Writes the value `get` reads from the handle `h` to `out`: the body of every getter.
///
/// # Safety
/// `h` is NULL or a live handle not mutated during the call; `out` is NULL or valid
/// for a write of a `T`.
pub(crate) unsafe fn get_into<H, T>(h: *const H, what: &str, out: *mut T, get: impl FnOnce(&H) -> T) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let h = unsafe { handle(h, what) }?;
        let out = out_ptr(out, "out")?;
        let value = get(h);
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, value) };
        Ok(())
    })
}

/// The end of a started call's wait, for handles that own a copy of the caller's buffer
/// (`phx_pending`, `phx_moe_step`): checks that `count` is the `expected` count the
/// `started` call began with, writes `data` (the result, or the buffer as started after
/// a collective error) to `out_buf` when it has that length, then returns `result`.
///
/// # Safety
/// `out_buf` is NULL or writable for `count` elements of `dtype`.
pub(crate) unsafe fn deliver_started(
    (result, data): (phalanx::Result<()>, Vec<u8>),
    out_buf: *mut c_void,
    count: usize,
    expected: usize,
    dtype: DType,
    started: &str,
) -> Result<(), Fail> {
    if count != expected {
        return Err(invalid(format!("count is {count}, the {started} was started with {expected}")));
    }
    // SAFETY: NULL or writable for `count` elements of `dtype` (the caller's contract).
    let out = unsafe { bytes_mut(out_buf, count, dtype, "out_buf") }?;
    if data.len() == out.len() {
        out.copy_from_slice(&data);
    }
    result?;
    Ok(())
}

/// Frees a handle made by `Box::into_raw` without waiting on what it started: the body
/// of the `*_free` functions. NULL is a no-op.
///
/// # Safety
/// `p` is NULL or a live handle made by `Box::into_raw`, not used afterwards.
pub(crate) unsafe fn free_handle<T>(p: *mut T) -> c_int {
    guard(|| {
        if !p.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, given back for good (the
            // caller's contract).
            drop(unsafe { Box::from_raw(p) });
        }
        Ok(())
    })
}

/// The size in bytes of one element of `dtype_code` in `*out`. Thread-safe.
///
/// # Safety
/// `out` is NULL or valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn phx_dtype_size(dtype_code: c_int, out: *mut usize) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        let size = dtype(dtype_code)?.size();
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, size) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::last_error;
    use crate::status::{phx_status_name, PHX_ERR_INVALID_ARGUMENT, PHX_ERR_NOT_FOUND, PHX_ERR_NULL, PHX_OK};
    use std::ffi::CStr;

    #[test]
    fn codes_match_phalanx() {
        let dtypes = [
            PHX_DTYPE_F32,
            PHX_DTYPE_F64,
            PHX_DTYPE_F16,
            PHX_DTYPE_BF16,
            PHX_DTYPE_I8,
            PHX_DTYPE_I16,
            PHX_DTYPE_I32,
            PHX_DTYPE_I64,
            PHX_DTYPE_U8,
            PHX_DTYPE_U16,
            PHX_DTYPE_U32,
            PHX_DTYPE_U64,
        ];
        assert_eq!(dtypes.len(), DType::ALL.len());
        for (code, d) in dtypes.into_iter().zip(DType::ALL) {
            assert_eq!(dtype(code).ok(), Some(d));
        }
        let ops = [PHX_OP_SUM, PHX_OP_PROD, PHX_OP_MIN, PHX_OP_MAX, PHX_OP_AVG];
        assert_eq!(ops.len(), ReduceOp::ALL.len());
        for (code, op) in ops.into_iter().zip(ReduceOp::ALL) {
            assert_eq!(reduce_op(code).ok(), Some(op));
        }
        assert_eq!(strategy(PHX_SYNC_ENFORCE_POPULAR).ok(), Some(SyncStrategy::EnforcePopular));
        assert_eq!(strategy(PHX_SYNC_RECEIVE_ONLY).ok(), Some(SyncStrategy::ReceiveOnly));
        assert_eq!(strategy(PHX_SYNC_SEND_ONLY).ok(), Some(SyncStrategy::SendOnly));
    }

    #[test]
    fn codes_are_checked() {
        let mut size = 0usize;
        // SAFETY: a valid out-pointer.
        assert_eq!(unsafe { phx_dtype_size(PHX_DTYPE_BF16, &mut size) }, PHX_OK);
        assert_eq!(size, 2);
        assert_eq!(last_error(), "");
        // SAFETY: as above.
        assert_eq!(unsafe { phx_dtype_size(12, &mut size) }, PHX_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("unknown dtype code 12"), "{}", last_error());
        // SAFETY: as above.
        assert_eq!(unsafe { phx_dtype_size(-1, &mut size) }, PHX_ERR_INVALID_ARGUMENT);
        // SAFETY: NULL is checked.
        assert_eq!(unsafe { phx_dtype_size(0, std::ptr::null_mut()) }, PHX_ERR_NULL);
        assert!(reduce_op(5).is_err() && strategy(3).is_err() && reduce_op(PHX_OP_AVG).is_ok());
        // SAFETY: a static string.
        let name = unsafe { CStr::from_ptr(phx_status_name(PHX_ERR_NOT_FOUND)) };
        assert_eq!(name.to_str().expect("utf-8"), "PHX_ERR_NOT_FOUND");
    }

    #[test]
    fn byte_lengths_never_overflow() {
        assert!(byte_len(usize::MAX / 4, DType::F64, "buf").is_err());
        assert!(byte_len(isize::MAX as usize / 8 + 1, DType::F64, "buf").is_err());
        assert_eq!(byte_len(3, DType::F64, "buf").ok(), Some(24));
        // SAFETY: zero elements: the pointer is not read.
        assert!(unsafe { bytes(std::ptr::null(), 0, DType::F32, "buf") }.is_ok());
        // SAFETY: NULL with elements is refused before any read.
        assert_eq!(unsafe { bytes(std::ptr::null(), 1, DType::F32, "buf") }.err().map(|f| f.code), Some(PHX_ERR_NULL));
        assert!(disjoint(8 as *const c_void, 8, 12 as *const c_void, 4).is_err());
        assert!(disjoint(8 as *const c_void, 8, 16 as *const c_void, 4).is_ok());
    }
}
