//! Status codes, the thread-local last error and `guard`, which every exported body runs
//! inside: it catches panics and turns a `Result<(), Fail>` into a status code.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use phalanx::{Error, ErrorKind};

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
/// The call cannot run where it was made, though its arguments are fine: the library
/// could not start its threads (OS resources), or a blocking call was made from a
/// thread that runs an async (tokio) runtime. Nothing was sent; retrying from the same
/// place fails the same way.
pub const PHX_ERR_RUNTIME: c_int = 13;
/// The device (GPU) path failed: the NCCL library is missing, is not NCCL, lacks a
/// required symbol or is too old, or an NCCL call failed. `phx_last_error` says which
/// path(s) were tried, the version found and what to do.
pub const PHX_ERR_DEVICE: c_int = 14;
/// A pipeline stage's callback returned non-zero (`phx_pipeline_run`): its code is in
/// the run's `phx_pipeline_outcome.callback_status`, and `phx_last_error` names the
/// stage, the pass and the callback. The other stages wait for this one: leave the
/// group (`phx_comm_leave`) or they wait until the peer timeout.
pub const PHX_ERR_STAGE: c_int = 15;

/// The status code of each kind of phalanx error: the one place where the C ABI maps
/// them (`phalanx::ErrorKind` is one-to-one with these codes).
pub(crate) fn status_of(kind: ErrorKind) -> c_int {
    match kind {
        ErrorKind::PeerLost => PHX_ERR_PEER_LOST,
        ErrorKind::Aborted => PHX_ERR_ABORTED,
        ErrorKind::Mismatch => PHX_ERR_MISMATCH,
        ErrorKind::Protocol => PHX_ERR_PROTOCOL,
        ErrorKind::Removed => PHX_ERR_REMOVED,
        ErrorKind::JoinFailed => PHX_ERR_JOIN_FAILED,
        ErrorKind::InvalidArgument => PHX_ERR_INVALID_ARGUMENT,
        ErrorKind::Transport => PHX_ERR_TRANSPORT,
        ErrorKind::Runtime => PHX_ERR_RUNTIME,
        ErrorKind::Device => PHX_ERR_DEVICE,
        // A kind this library does not map yet is a bug here (the `every_kind_has_a_code`
        // test catches it): report it as one.
        _ => PHX_ERR_PANIC,
    }
}

// ---------------------------------------------------------------------------------------
// Status plumbing: every exported body runs inside `guard`.

/// A failed call: its status code and the message for `phx_last_error`.
pub(crate) struct Fail {
    pub(crate) code: c_int,
    pub(crate) message: String,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail { code: status_of(e.kind()), message: e.to_string() }
    }
}

pub(crate) fn null(what: &str) -> Fail {
    Fail { code: PHX_ERR_NULL, message: format!("{what} is NULL") }
}

pub(crate) fn invalid(message: impl Into<String>) -> Fail {
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
pub(crate) fn guard(body: impl FnOnce() -> Result<(), Fail>) -> c_int {
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
        PHX_ERR_RUNTIME => c"PHX_ERR_RUNTIME",
        PHX_ERR_DEVICE => c"PHX_ERR_DEVICE",
        PHX_ERR_STAGE => c"PHX_ERR_STAGE",
        _ => c"PHX_UNKNOWN",
    };
    name.as_ptr()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::ffi::CStr;

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

    /// The message of the last failed call on this thread.
    pub(crate) fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
        unsafe { CStr::from_ptr(phx_last_error()) }.to_string_lossy().into_owned()
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
    fn every_kind_has_a_code() {
        let codes: Vec<c_int> = ErrorKind::ALL.into_iter().map(status_of).collect();
        let mut distinct = codes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), codes.len(), "two kinds share a code: {codes:?}");
        for (kind, code) in ErrorKind::ALL.into_iter().zip(codes) {
            assert!(code != PHX_OK && code != PHX_ERR_PANIC, "{kind} has no code of its own");
            // SAFETY: a static string.
            let name = unsafe { CStr::from_ptr(phx_status_name(code)) }.to_str().expect("utf-8");
            assert_ne!(name, "PHX_UNKNOWN", "{kind}");
        }
        let e = Fail::from(Error::Runtime { reason: "no threads".into() });
        assert_eq!((e.code, e.message.as_str()), (PHX_ERR_RUNTIME, "runtime error: no threads"));
    }
}
