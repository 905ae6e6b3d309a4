//! The C ABI of phalanx (`include/phalanx.h`, generated from this file by cbindgen).
//!
//! Conventions, the same for every function:
//!
//! - Every function returns an `int` status (`PHX_OK` or a `PHX_ERR_*` code) and passes
//!   results through out-pointers, except `phx_version`, `phx_last_error` and
//!   `phx_status_name`, which cannot fail.
//! - After a failed call, `phx_last_error()` describes it (thread-local).
//! - No panic crosses the boundary: a panic becomes `PHX_ERR_PANIC`.
//! - Element types, operators and sync strategies cross as `int` codes checked against
//!   the known values (`PHX_DTYPE_*`, `PHX_OP_*`, `PHX_SYNC_*`).
//! - Every pointer is checked for NULL (`PHX_ERR_NULL`); buffer pointers may be NULL
//!   when their element count is 0. `_free` functions accept NULL.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, missing_docs)]
#![allow(non_camel_case_types)]

pub mod sparse;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::net::{SocketAddr, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use phalanx::comm::{ConnectOptions, PendingRaw, RetryPolicy};
use phalanx::membership::client::ControlConfig;
use phalanx::membership::master::MasterConfig;
use phalanx::membership::server::Master;
use phalanx::state::SharedState;
use phalanx::state::SyncStrategy;
use phalanx::transport::quic::QuicConfig;
use phalanx::{Communicator, DType, Error, ReduceOp};

mod group;
mod quant;
pub mod scan;
pub use quant::{phx_comm_all_reduce_quantized, PHX_QUANT_U16, PHX_QUANT_U8};

// ---------------------------------------------------------------------------------------
// Version.

/// Major version of this library (and of `phalanx.h`).
pub const PHX_VERSION_MAJOR: u32 = 0;
/// Minor version of this library.
pub const PHX_VERSION_MINOR: u32 = 1;
/// Patch version of this library.
pub const PHX_VERSION_PATCH: u32 = 0;

// ---------------------------------------------------------------------------------------
// Status codes.

/// The call succeeded.
pub const PHX_OK: c_int = 0;
/// A peer crashed, hung or left while the collective ran. The buffers hold what they held
/// before the call; call `phx_comm_update_topology` and retry.
pub const PHX_ERR_PEER_LOST: c_int = 1;
/// The collective was aborted because another member failed. The buffers are restored;
/// call `phx_comm_update_topology` and retry.
pub const PHX_ERR_ABORTED: c_int = 2;
/// Members made different calls (kind, count, dtype, op or root differ).
pub const PHX_ERR_MISMATCH: c_int = 3;
/// A peer broke the protocol.
pub const PHX_ERR_PROTOCOL: c_int = 4;
/// This peer is no longer a member (removed after a timeout, or the master is
/// unreachable); free the communicator and connect again.
pub const PHX_ERR_REMOVED: c_int = 5;
/// Joining failed: the master refused, could not be reached, or the join timed out.
pub const PHX_ERR_JOIN_FAILED: c_int = 6;
/// An argument is invalid (unknown code, wrong count, bad address); nothing was sent.
pub const PHX_ERR_INVALID_ARGUMENT: c_int = 7;
/// A transport failed in a way not attributable to one peer.
pub const PHX_ERR_TRANSPORT: c_int = 8;
/// A required pointer argument is NULL; nothing was done.
pub const PHX_ERR_NULL: c_int = 9;
/// The library panicked (a bug); the handle involved should be freed.
pub const PHX_ERR_PANIC: c_int = 10;
/// An output buffer is too small; nothing was written to it.
pub const PHX_ERR_BUFFER_TOO_SMALL: c_int = 11;
/// No shared-state tensor has the given name.
pub const PHX_ERR_NOT_FOUND: c_int = 12;

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

/// Bytes of a buffer that always holds an address written by `phx_master_addr`,
/// terminating NUL included.
pub const PHX_ADDR_BUF_LEN: usize = 64;
/// Bytes of a shared-state digest (BLAKE3).
pub const PHX_DIGEST_LEN: usize = 32;

// ---------------------------------------------------------------------------------------
// Handles and option structs.

/// A master (the group's coordinator) running on threads of its own in this process.
/// Created by `phx_master_start`, freed by `phx_master_free`.
pub struct phx_master {
    inner: Master,
}

/// One peer's membership in a group. Created by `phx_comm_connect`, ended by
/// `phx_comm_leave` or `phx_comm_free`.
///
/// Not internally synchronised: it may be moved between threads, but calls on one
/// communicator must not overlap. Different communicators are independent.
pub struct phx_comm {
    inner: Communicator,
}

/// An all-reduce started by `phx_comm_all_reduce_start`, owning a copy of its buffer.
/// Consumed by `phx_pending_wait` or `phx_pending_free`. It may be waited on from any
/// thread, including while its communicator runs other calls on another thread.
pub struct phx_pending {
    inner: PendingRaw,
    count: usize,
    dtype: DType,
}

/// Named tensors plus a revision, kept bit-identical across peers by
/// `phx_comm_sync_shared_state`. Created by `phx_state_new`, freed by `phx_state_free`.
/// Not internally synchronised: calls on one state must not overlap.
pub struct phx_state {
    inner: SharedState,
}

/// How to join a group (see `phx_comm_connect_with`). Fill it with
/// `phx_connect_options_init`, then change fields: zero and NULL fields mean defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct phx_connect_options {
    /// `sizeof(phx_connect_options)`, set by `phx_connect_options_init`: lets later
    /// versions add fields without breaking callers built against this one.
    pub struct_size: usize,
    /// Where this peer accepts data links from the other peers, e.g. "0.0.0.0:0";
    /// NULL means "127.0.0.1:0" (loopback only, any port). Peers on other hosts need an
    /// address they can reach.
    pub bind_addr: *const c_char,
    /// The cluster secret (a NUL-terminated byte string, never empty); NULL means no
    /// secret, which accepts anyone and suits only tests and trusted networks.
    pub secret: *const c_char,
    /// Attempts of a collective that loses a peer, the first included: 0 or 1 returns
    /// `PHX_ERR_PEER_LOST`; more re-run it over the survivors once the master has
    /// published the new view.
    pub retry_attempts: u32,
    /// Heartbeat interval to the master in milliseconds; 0 means 150. Keep it well below
    /// the master's peer timeout.
    pub heartbeat_ms: u32,
    /// Give up joining (`PHX_ERR_JOIN_FAILED`) after this many milliseconds; 0 waits
    /// until admitted.
    pub join_timeout_ms: u32,
    /// With no message from the master for this many milliseconds the peer considers
    /// itself removed; 0 means 2000.
    pub master_timeout_ms: u32,
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

// ---------------------------------------------------------------------------------------
// Status plumbing: every exported body runs inside `guard`.

/// A failed call: its status code and the message for `phx_last_error`.
struct Fail {
    code: c_int,
    message: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::PeerLost { .. } => PHX_ERR_PEER_LOST,
            Error::Aborted { .. } => PHX_ERR_ABORTED,
            Error::Mismatch { .. } => PHX_ERR_MISMATCH,
            Error::Protocol { .. } => PHX_ERR_PROTOCOL,
            Error::Removed { .. } => PHX_ERR_REMOVED,
            Error::JoinFailed { .. } => PHX_ERR_JOIN_FAILED,
            Error::InvalidArgument(_) => PHX_ERR_INVALID_ARGUMENT,
            Error::Transport(_) => PHX_ERR_TRANSPORT,
        };
        Fail { code, message: e.to_string() }
    }
}

fn null(what: &str) -> Fail {
    Fail { code: PHX_ERR_NULL, message: format!("{what} is NULL") }
}

fn invalid(message: impl Into<String>) -> Fail {
    Fail { code: PHX_ERR_INVALID_ARGUMENT, message: message.into() }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an exported function's body: clears the last error, catches panics, and turns
/// the outcome into a status code.
fn guard(body: impl FnOnce() -> Result<(), Fail>) -> c_int {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        set_last_error("");
        body()
    }));
    match outcome {
        Ok(Ok(())) => PHX_OK,
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown payload".into());
            // Setting the message can only fail by panicking again; contain that too.
            let _ = catch_unwind(|| set_last_error(&format!("panic inside phalanx: {what}")));
            PHX_ERR_PANIC
        }
    }
}

// ---------------------------------------------------------------------------------------
// Argument checks. Each helper checks for NULL before touching a pointer.

fn dtype(code: c_int) -> Result<DType, Fail> {
    u8::try_from(code).ok().and_then(DType::from_code).ok_or_else(|| invalid(format!("unknown dtype code {code}")))
}

fn reduce_op(code: c_int) -> Result<ReduceOp, Fail> {
    u8::try_from(code).ok().and_then(ReduceOp::from_code).ok_or_else(|| invalid(format!("unknown op code {code}")))
}

fn strategy(code: c_int) -> Result<SyncStrategy, Fail> {
    u8::try_from(code)
        .ok()
        .and_then(SyncStrategy::from_code)
        .ok_or_else(|| invalid(format!("unknown sync strategy code {code}")))
}

/// Bytes of `count` elements of `dtype`, if they fit in a Rust slice.
fn byte_len(count: usize, dtype: DType, what: &str) -> Result<usize, Fail> {
    count
        .checked_mul(dtype.size())
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid(format!("{what}: {count} elements of {dtype} overflow the address space")))
}

/// `*const T` as a shared reference, or `PHX_ERR_NULL`.
///
/// # Safety
/// `p` is NULL or points to a live `T` not mutated for `'a`.
unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    // SAFETY: non-NULL `p` points to a live, unmutated `T` (the caller's contract).
    unsafe { p.as_ref() }.ok_or_else(|| null(what))
}

/// `*mut T` as an exclusive reference, or `PHX_ERR_NULL`.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else accesses for `'a`.
unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: non-NULL `p` points to a live `T` used by no one else (the caller's contract).
    unsafe { p.as_mut() }.ok_or_else(|| null(what))
}

/// Checks that an out-pointer is not NULL (before any work is done).
fn out_ptr<T>(p: *mut T, what: &str) -> Result<*mut T, Fail> {
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
unsafe fn write_out<T>(p: *mut T, value: T) {
    // SAFETY: the caller's contract; `write` does not read or drop the old contents,
    // which may be uninitialised.
    unsafe { p.write(value) }
}

/// A NUL-terminated C string as UTF-8.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string alive and unmodified for `'a`.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
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
unsafe fn secret(p: *const c_char) -> Result<QuicConfig, Fail> {
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
fn socket_addr(s: &str, what: &str) -> Result<SocketAddr, Fail> {
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
unsafe fn bytes<'a>(p: *const c_void, count: usize, dtype: DType, what: &str) -> Result<&'a [u8], Fail> {
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
unsafe fn bytes_mut<'a>(p: *mut c_void, count: usize, dtype: DType, what: &str) -> Result<&'a mut [u8], Fail> {
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
fn disjoint(a: *const c_void, a_len: usize, b: *const c_void, b_len: usize) -> Result<(), Fail> {
    let (a, b) = (a as usize, b as usize);
    if a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len) {
        return Err(invalid("the input and output buffers overlap"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Library information.

/// The library's version, "MAJOR.MINOR.PATCH" (a static string; never free it).
/// Thread-safe.
#[no_mangle]
pub extern "C" fn phx_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed `phx_` call on this thread, or "" when the last call
/// succeeded. The string is owned by the library and stays valid until the next `phx_`
/// call on this thread (other than `phx_last_error`, `phx_version` and
/// `phx_status_name`); copy it to keep it. Never NULL. Thread-safe (per thread).
#[no_mangle]
pub extern "C" fn phx_last_error() -> *const c_char {
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// A static name for a status code, e.g. "PHX_ERR_PEER_LOST" ("PHX_UNKNOWN" for codes
/// this version does not know). Never NULL, never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn phx_status_name(status: c_int) -> *const c_char {
    let name = match status {
        PHX_OK => c"PHX_OK",
        PHX_ERR_PEER_LOST => c"PHX_ERR_PEER_LOST",
        PHX_ERR_ABORTED => c"PHX_ERR_ABORTED",
        PHX_ERR_MISMATCH => c"PHX_ERR_MISMATCH",
        PHX_ERR_PROTOCOL => c"PHX_ERR_PROTOCOL",
        PHX_ERR_REMOVED => c"PHX_ERR_REMOVED",
        PHX_ERR_JOIN_FAILED => c"PHX_ERR_JOIN_FAILED",
        PHX_ERR_INVALID_ARGUMENT => c"PHX_ERR_INVALID_ARGUMENT",
        PHX_ERR_TRANSPORT => c"PHX_ERR_TRANSPORT",
        PHX_ERR_NULL => c"PHX_ERR_NULL",
        PHX_ERR_PANIC => c"PHX_ERR_PANIC",
        PHX_ERR_BUFFER_TOO_SMALL => c"PHX_ERR_BUFFER_TOO_SMALL",
        PHX_ERR_NOT_FOUND => c"PHX_ERR_NOT_FOUND",
        _ => c"PHX_UNKNOWN",
    };
    name.as_ptr()
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

// ---------------------------------------------------------------------------------------
// Master.

/// Starts a master listening on `listen_addr` (e.g. "0.0.0.0:7000", or "127.0.0.1:0"
/// for any free port) on threads of its own, and stores its handle in `*out`. Peers
/// must use the same `secret_or_null` (NULL: no secret). A member silent for
/// `peer_timeout_ms` milliseconds is removed (0 means the default, 750). The master runs until
/// `phx_master_free`.
///
/// Ownership: the caller owns `*out` and frees it with `phx_master_free`; the strings
/// are only read during the call. Thread-safe.
///
/// # Safety
/// `listen_addr` and a non-NULL `secret_or_null` are NUL-terminated strings; `out` is
/// NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_master_start(
    listen_addr: *const c_char,
    secret_or_null: *const c_char,
    peer_timeout_ms: u32,
    out: *mut *mut phx_master,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let listen = socket_addr(unsafe { c_str(listen_addr, "listen_addr") }?, "listen_addr")?;
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let quic = unsafe { secret(secret_or_null) }?;
        let mut config = MasterConfig::default();
        if peer_timeout_ms > 0 {
            config.peer_timeout = Duration::from_millis(peer_timeout_ms.into());
        }
        let master = Master::start(listen, quic, config)?;
        let handle = Box::into_raw(Box::new(phx_master { inner: master }));
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Writes the address peers connect to (e.g. "127.0.0.1:41234", NUL-terminated) into
/// `buf` of `len` bytes; `PHX_ADDR_BUF_LEN` bytes are always enough
/// (`PHX_ERR_BUFFER_TOO_SMALL` otherwise, and `buf` is left as it was).
///
/// Thread-safe: may run concurrently with other `phx_master_addr` calls on `master`,
/// not with `phx_master_free`.
///
/// # Safety
/// `master` is NULL or a live handle from `phx_master_start`; `buf` is NULL or valid
/// for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn phx_master_addr(master: *const phx_master, buf: *mut c_char, len: usize) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let master = unsafe { handle(master, "master") }?;
        let buf = out_ptr(buf, "buf")?;
        let addr = master.inner.addr().to_string();
        if addr.len() + 1 > len {
            return Err(Fail {
                code: PHX_ERR_BUFFER_TOO_SMALL,
                message: format!("the address needs {} bytes, the buffer has {len}", addr.len() + 1),
            });
        }
        // SAFETY: `buf` is non-NULL and valid for `len >= addr.len() + 1` bytes of writes
        // (the caller's contract); a Rust string never overlaps the caller's buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(addr.as_ptr(), buf.cast::<u8>(), addr.len());
            buf.add(addr.len()).write(0);
        }
        Ok(())
    })
}

/// Stops the master and frees it; its peers' calls fail once they notice. NULL is a
/// no-op. Must not run concurrently with other calls on `master`.
///
/// # Safety
/// `master` is NULL or a live handle from `phx_master_start`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_master_free(master: *mut phx_master) -> c_int {
    guard(|| {
        if !master.is_null() {
            // SAFETY: a live handle made by `Box::into_raw` in `phx_master_start`, given
            // back to us for good (the caller's contract).
            drop(unsafe { Box::from_raw(master) });
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Connecting.

/// Fills `*options` with the defaults (loopback bind address, no secret, no retries,
/// default timeouts) and sets its `struct_size`. Thread-safe.
///
/// # Safety
/// `options` is NULL or valid for a write of a `phx_connect_options`.
#[no_mangle]
pub unsafe extern "C" fn phx_connect_options_init(options: *mut phx_connect_options) -> c_int {
    guard(|| {
        let options = out_ptr(options, "options")?;
        let defaults = phx_connect_options {
            struct_size: std::mem::size_of::<phx_connect_options>(),
            bind_addr: std::ptr::null(),
            secret: std::ptr::null(),
            retry_attempts: 0,
            heartbeat_ms: 0,
            join_timeout_ms: 0,
            master_timeout_ms: 0,
        };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(options, defaults) };
        Ok(())
    })
}

/// Joins the group whose master is at `master_addr` ("host:port") and stores the new
/// communicator in `*out`. Blocks until admitted: the first peer at once, later ones
/// when the members next call `phx_comm_update_topology` (or until
/// `options->join_timeout_ms`).
///
/// Ownership: the caller owns `*out` (end it with `phx_comm_leave` or `phx_comm_free`);
/// `options` and its strings are only read during the call. Thread-safe.
///
/// # Safety
/// `master_addr` is a NUL-terminated string; `options` is NULL or points to a
/// `phx_connect_options` initialised by `phx_connect_options_init` whose non-NULL
/// strings are NUL-terminated; `out` is NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_connect_with(
    master_addr: *const c_char,
    options: *const phx_connect_options,
    out: *mut *mut phx_comm,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: NULL or a readable struct (the caller's contract); it is Copy, read once.
        let o = *unsafe { handle(options, "options") }?;
        if o.struct_size != std::mem::size_of::<phx_connect_options>() {
            return Err(invalid(format!(
                "options.struct_size is {}, this library's phx_connect_options has {} bytes \
                 (call phx_connect_options_init)",
                o.struct_size,
                std::mem::size_of::<phx_connect_options>()
            )));
        }
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        let master = socket_addr(unsafe { c_str(master_addr, "master_addr") }?, "master_addr")?;
        let mut opts = ConnectOptions::default();
        if !o.bind_addr.is_null() {
            // SAFETY: non-NULL and NUL-terminated (the caller's contract).
            opts.bind = socket_addr(unsafe { c_str(o.bind_addr, "options.bind_addr") }?, "options.bind_addr")?;
        }
        // SAFETY: a NUL-terminated string or NULL (the caller's contract).
        opts.quic = unsafe { secret(o.secret) }?;
        if o.retry_attempts > 1 {
            opts.retry = RetryPolicy::OnPeerLost { max_attempts: o.retry_attempts };
        }
        let defaults = ControlConfig::default();
        let ms = |v: u32, default: Duration| if v == 0 { default } else { Duration::from_millis(v.into()) };
        opts.control = ControlConfig {
            heartbeat_interval: ms(o.heartbeat_ms, defaults.heartbeat_interval),
            join_timeout: (o.join_timeout_ms > 0).then(|| Duration::from_millis(o.join_timeout_ms.into())),
            master_timeout: ms(o.master_timeout_ms, defaults.master_timeout),
        };
        let comm = Communicator::connect(master, opts)?;
        let handle = Box::into_raw(Box::new(phx_comm { inner: comm }));
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// `phx_comm_connect_with` with default options but the secret (NULL: none) and the
/// attempts of a collective that loses a peer (`retry_attempts` <= 1: no retry).
///
/// # Safety
/// `master_addr` and a non-NULL `secret_or_null` are NUL-terminated strings; `out` is
/// NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_connect(
    master_addr: *const c_char,
    secret_or_null: *const c_char,
    retry_attempts: c_int,
    out: *mut *mut phx_comm,
) -> c_int {
    let mut options = std::mem::MaybeUninit::<phx_connect_options>::uninit();
    // SAFETY: a valid, writable struct.
    let status = unsafe { phx_connect_options_init(options.as_mut_ptr()) };
    if status != PHX_OK {
        return status;
    }
    // SAFETY: initialised by `phx_connect_options_init`, which returned PHX_OK.
    let mut options = unsafe { options.assume_init() };
    options.secret = secret_or_null;
    options.retry_attempts = retry_attempts.max(0) as u32;
    // SAFETY: the caller's contract covers the strings and `out`; `options` is local.
    unsafe { phx_comm_connect_with(master_addr, &options, out) }
}

/// Leaves the group gracefully (the others see a new view without this peer at once)
/// and frees `comm`. NULL is a no-op. Blocks for at most a moment while the master is
/// told. Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live handle from `phx_comm_connect*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_leave(comm: *mut phx_comm) -> c_int {
    guard(|| {
        if !comm.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, given back for good.
            let comm = unsafe { Box::from_raw(comm) };
            comm.inner.leave();
        }
        Ok(())
    })
}

/// Frees `comm` without telling the master: the others see this peer as lost after the
/// master's peer timeout (prefer `phx_comm_leave`). NULL is a no-op. Started
/// all-reduces (`phx_pending`) stay valid and end with an error. Must not run
/// concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live handle from `phx_comm_connect*`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_free(comm: *mut phx_comm) -> c_int {
    guard(|| {
        if !comm.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, given back for good.
            drop(unsafe { Box::from_raw(comm) });
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Group information.

/// Writes one property of `comm` to `out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
unsafe fn comm_get<T>(comm: *const phx_comm, out: *mut T, get: impl FnOnce(&Communicator) -> T) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let comm = &unsafe { handle(comm, "comm") }?.inner;
        let out = out_ptr(out, "out")?;
        let value = get(comm);
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, value) };
        Ok(())
    })
}

/// This peer's rank in the current view, `0..size`, in `*out`. Ranks change when the
/// view changes (after `phx_comm_update_topology` or a lost peer).
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_rank(comm: *const phx_comm, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::rank) }
}

/// The number of members of the current view in `*out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_size(comm: *const phx_comm, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::size) }
}

/// The epoch of the current view in `*out`; it grows with every view change.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_epoch(comm: *const phx_comm, out: *mut u64) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::epoch) }
}

/// This peer's id (unique in the group, stable across views) in `*out`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_peer_id(comm: *const phx_comm, out: *mut u64) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::peer_id) }
}

/// How many peers wait to join in `*out`: when it is not 0, the members should call
/// `phx_comm_update_topology` to admit them.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `out` is NULL or valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_peers_pending(comm: *const phx_comm, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { comm_get(comm, out, Communicator::peers_pending) }
}

/// The ids of the current view's members, in rank order: writes them to `ids` (room for
/// `capacity`) and their number to `*count`. With too little room, only `*count` is
/// written and the status is `PHX_ERR_BUFFER_TOO_SMALL`. `ids` may be NULL when
/// `capacity` is 0 (to ask for the count).
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `ids` is NULL or valid
/// for writes of `capacity` `uint64_t`; `count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_members(
    comm: *const phx_comm,
    ids: *mut u64,
    capacity: usize,
    count: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let comm = &unsafe { handle(comm, "comm") }?.inner;
        let count = out_ptr(count, "count")?;
        let members = comm.members();
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(count, members.len()) };
        if members.len() > capacity {
            return Err(Fail {
                code: PHX_ERR_BUFFER_TOO_SMALL,
                message: format!("{} members, room for {capacity}", members.len()),
            });
        }
        if !members.is_empty() {
            let ids = out_ptr(ids, "ids")?;
            // SAFETY: non-NULL and valid for `capacity >= members.len()` writes (the
            // caller's contract); a fresh Vec never overlaps the caller's buffer.
            unsafe { std::ptr::copy_nonoverlapping(members.as_ptr(), ids, members.len()) };
        }
        Ok(())
    })
}

/// Synchronises with the other members and admits any waiting joiners. Every member
/// must call it; it returns when the master has settled the next view. A newly admitted
/// peer's first call returns at once, so a training loop can call it at the top of every
/// step. Blocks. Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_update_topology(comm: *mut phx_comm) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        comm.update_topology()?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Collectives. All block the calling thread until the collective ends on this peer;
// on any error the buffers hold what they held before the call. Every member must make
// the same calls in the same order with the same counts, dtype, op and root.

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

// ---------------------------------------------------------------------------------------
// Non-blocking all-reduce.

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
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let pending = unsafe { handle(pending, "pending") }?;
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, c_int::from(pending.inner.is_finished())) };
        Ok(())
    })
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
        let (result, data) = pending.inner.wait();
        if count != expected {
            return Err(invalid(format!("count is {count}, the all-reduce was started with {expected}")));
        }
        // SAFETY: NULL or writable for `count` elements of `dtype` (the caller's contract).
        let out = unsafe { bytes_mut(out_buf, count, dtype, "out_buf") }?;
        if data.len() == out.len() {
            out.copy_from_slice(&data);
        }
        result?;
        Ok(())
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
    guard(|| {
        if !pending.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, given back for good.
            drop(unsafe { Box::from_raw(pending) });
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Shared state.

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
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let state = &unsafe { handle(state, "state") }?.inner;
        let out = out_ptr(out, "out")?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, state.revision) };
        Ok(())
    })
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
    guard(|| {
        if !state.is_null() {
            // SAFETY: a live handle made by `Box::into_raw`, given back for good.
            drop(unsafe { Box::from_raw(state) });
        }
        Ok(())
    })
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

    /// The handles' documented threading promises hold.
    #[test]
    fn handles_are_send() {
        fn send<T: Send>() {}
        send::<phx_master>();
        send::<phx_comm>();
        send::<phx_pending>();
        send::<phx_state>();
    }

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
    fn version_matches_the_package() {
        let v = |s: &str| s.parse::<u32>().expect("number");
        assert_eq!(PHX_VERSION_MAJOR, v(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(PHX_VERSION_MINOR, v(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(PHX_VERSION_PATCH, v(env!("CARGO_PKG_VERSION_PATCH")));
        // SAFETY: a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(phx_version()) };
        assert_eq!(s.to_str().expect("utf-8"), env!("CARGO_PKG_VERSION"));
    }

    fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
        unsafe { CStr::from_ptr(phx_last_error()) }.to_string_lossy().into_owned()
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
    fn panics_become_a_status() {
        let status = guard(|| panic!("boom"));
        assert_eq!(status, PHX_ERR_PANIC);
        assert!(last_error().contains("boom"), "{}", last_error());
        assert_eq!(guard(|| Ok(())), PHX_OK);
        assert_eq!(last_error(), "");
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
