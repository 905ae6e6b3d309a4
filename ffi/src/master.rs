//! The master from C: `phx_master_start`, `phx_master_addr`, `phx_master_free`.

use std::ffi::{c_char, c_int};
use std::time::Duration;

use phalanx::membership::master::MasterConfig;
use phalanx::Master;

use crate::args::{c_str, free_handle, handle, out_ptr, secret, socket_addr, write_out};
use crate::status::{guard, Fail, PHX_ERR_BUFFER_TOO_SMALL};

/// Bytes of a buffer that always holds an address written by `phx_master_addr`,
/// terminating NUL included.
pub const PHX_ADDR_BUF_LEN: usize = 64;

/// A master (the group's coordinator) running on threads of its own in this process.
/// Created by `phx_master_start`, freed by `phx_master_free`.
pub struct phx_master {
    inner: Master,
}

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
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(master) }
}
