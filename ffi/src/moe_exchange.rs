//! The FSSDP layer's token exchanges started from C, so that they overlap compute:
//! `phx_moe_layer_dispatch_start` (a `phx_moe_dispatch_request`, waited into a
//! `phx_moe_dispatched`) and `phx_moe_layer_combine_start` (a
//! `phx_moe_combine_request`, waited into the caller's buffer)
//! (`phalanx::moe::PendingDispatch`, `PendingCombine`).
//!
//! The started exchanges borrow the layer: the caller keeps `phx_moe_layer` alive until
//! each request is waited on or freed.

use std::ffi::{c_int, c_void};

use phalanx::moe::{Dispatched, PendingCombine, PendingDispatch};
use phalanx::{DType, Element};

use crate::args::{byte_len, bytes, bytes_mut, dtype, free_handle, get_into, handle, handle_mut, out_ptr, write_out};
use crate::comm::phx_comm;
use crate::moe_layer::{phx_moe_dispatched, phx_moe_layer, Rows};
use crate::sparse::slice;
use crate::status::{guard, invalid, null};

/// A started dispatch, whatever its element type.
trait Arriving: Send {
    fn finished(&self) -> bool;
    fn wait(self: Box<Self>) -> phalanx::Result<Rows>;
}

impl<T: Element> Arriving for PendingDispatch<'static, T>
where
    Rows: From<Dispatched<T>>,
{
    fn finished(&self) -> bool {
        self.is_finished()
    }
    fn wait(self: Box<Self>) -> phalanx::Result<Rows> {
        PendingDispatch::wait(*self).0.map(Rows::from)
    }
}

/// A started combine, whatever its element type.
trait Returning: Send {
    fn finished(&self) -> bool;
    fn wait(self: Box<Self>) -> phalanx::Result<Vec<u8>>;
}

impl<T: Element> Returning for PendingCombine<'static, T> {
    fn finished(&self) -> bool {
        self.is_finished()
    }
    fn wait(self: Box<Self>) -> phalanx::Result<Vec<u8>> {
        PendingCombine::wait(*self).0.map(|back| bytemuck::cast_slice(&back).to_vec())
    }
}

/// A dispatch started by `phx_moe_layer_dispatch_start`, owning a copy of the tokens.
/// Consumed by `phx_moe_dispatch_request_wait` or `phx_moe_dispatch_request_free`.
pub struct phx_moe_dispatch_request {
    inner: Box<dyn Arriving>,
    dtype: DType,
    hidden: usize,
    sent: usize,
}

/// A combine started by `phx_moe_layer_combine_start`, owning a copy of the outputs.
/// Consumed by `phx_moe_combine_request_wait` or `phx_moe_combine_request_free`.
pub struct phx_moe_combine_request {
    inner: Box<dyn Returning>,
    /// Elements `phx_moe_combine_request_wait` writes.
    count: usize,
    dtype: DType,
}

/// Starts `phx_moe_layer_dispatch` of a copy of `tokens` and returns at once with the
/// request in `*out`: the token counts' all-gather and, numbered right after it, the
/// tokens' all-to-all run in the background; `tokens` and `experts` are not used after
/// the call. `phx_moe_dispatch_request_wait` gives the `phx_moe_dispatched`. Every
/// device starts its steps in the same order; other collectives may run before the
/// wait, in the same order on every device. `PHX_ERR_INVALID_ARGUMENT` (nothing
/// started) for an expert outside the layer.
///
/// Ownership: the caller owns `*out` and passes it to `phx_moe_dispatch_request_wait`
/// or `phx_moe_dispatch_request_free` exactly once, and keeps `layer` alive until then.
/// Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `layer` is NULL or a live handle that outlives the request; `comm` NULL or a live
/// communicator not used concurrently; `tokens` NULL or readable for `n_tokens *
/// hidden` elements, `experts` for `n_tokens` entries; `out` NULL or valid for a write
/// of a pointer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_layer_dispatch_start(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    tokens: *const c_void,
    experts: *const usize,
    n_tokens: usize,
    dtype_code: c_int,
    out: *mut *mut phx_moe_dispatch_request,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle that outlives the request (the caller's
        // contract), so the started dispatch may borrow it for as long as it lives.
        let layer: &'static phx_moe_layer = unsafe { handle(layer, "layer") }?;
        let (hidden, core) = (layer.hidden(), layer.core());
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let out = out_ptr(out, "out")?;
        let dtype = dtype(dtype_code)?;
        let count = n_tokens.checked_mul(hidden).ok_or_else(|| invalid("n_tokens * hidden overflows"))?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let tokens = unsafe { bytes(tokens, count, dtype, "tokens") }?;
        // SAFETY: readable for `n_tokens` entries (the caller's contract).
        let experts = unsafe { slice(experts, n_tokens, "experts") }?;
        macro_rules! start {
            ($t:ty) => {
                Box::new(core.dispatch_start(comm, bytemuck::pod_collect_to_vec::<u8, $t>(tokens), experts)?)
                    as Box<dyn Arriving>
            };
        }
        // Moves bytes only: the unsigned type of the element's width moves the same bits.
        let inner = match dtype.size() {
            1 => start!(u8),
            2 => start!(u16),
            4 => start!(u32),
            8 => start!(u64),
            other => return Err(invalid(format!("no element type is {other} bytes wide"))),
        };
        let request = phx_moe_dispatch_request { inner, dtype, hidden, sent: n_tokens };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(request))) };
        Ok(())
    })
}

/// Whether the dispatch has finished (`phx_moe_dispatch_request_wait` would not
/// block): 1 or 0 in `*out`.
///
/// # Safety
/// `request` is NULL or a live handle; `out` NULL or valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatch_request_is_finished(
    request: *const phx_moe_dispatch_request,
    out: *mut c_int,
) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(request, "request", out, |r: &phx_moe_dispatch_request| c_int::from(r.inner.finished())) }
}

/// Waits for the dispatch and, on `PHX_OK`, writes what arrived to `*out` (as
/// `phx_moe_layer_dispatch` does; freed with `phx_moe_dispatched_free`). On error
/// (`PHX_ERR_PEER_LOST`, `PHX_ERR_ABORTED`: plan again for the survivors) nothing is
/// written.
///
/// Ownership: always consumes and frees `request`, whatever the status (except
/// `PHX_ERR_NULL` for a NULL `request`). May run on any thread.
///
/// # Safety
/// `request` is NULL or a live handle, not used afterwards; `out` NULL or valid for a
/// write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatch_request_wait(
    request: *mut phx_moe_dispatch_request,
    out: *mut *mut phx_moe_dispatched,
) -> c_int {
    guard(|| {
        if request.is_null() {
            return Err(null("request"));
        }
        // SAFETY: a live handle made by `Box::into_raw`, given back for good.
        let request = unsafe { Box::from_raw(request) };
        let (dtype, hidden, sent) = (request.dtype, request.hidden, request.sent);
        let rows = request.inner.wait();
        let out = out_ptr(out, "out")?;
        let d = phx_moe_dispatched { rows: rows?, dtype, hidden, sent };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(d))) };
        Ok(())
    })
}

/// Frees `request` without waiting: the dispatch goes on in the background (the other
/// devices still need this one's part) and what arrives is discarded. NULL is a no-op.
///
/// # Safety
/// `request` is NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatch_request_free(request: *mut phx_moe_dispatch_request) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(request) }
}

/// Starts `phx_moe_layer_combine` of a copy of `outputs` (one row of `hidden` per token
/// of `dispatched`, `outputs_count` = `phx_moe_dispatched_count * hidden` elements of
/// the dispatch's type) and returns at once with the request in `*out`: no count
/// exchange first (the counts are the dispatch's). `outputs` and `dispatched` are not
/// used after the call. `phx_moe_combine_request_wait` writes this device's rows.
///
/// Ownership: as `phx_moe_layer_dispatch_start`, with
/// `phx_moe_combine_request_wait`/`_free`.
///
/// # Safety
/// `layer` is NULL or a live handle that outlives the request; `dispatched` NULL or a
/// live handle; `comm` NULL or a live communicator not used concurrently; `outputs`
/// NULL or readable for `outputs_count` elements; `out` NULL or valid for a write of a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_combine_start(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    dispatched: *const phx_moe_dispatched,
    outputs: *const c_void,
    outputs_count: usize,
    out: *mut *mut phx_moe_combine_request,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle that outlives the request (the caller's
        // contract), so the started combine may borrow it for as long as it lives.
        let layer: &'static phx_moe_layer = unsafe { handle(layer, "layer") }?;
        let (hidden, core) = (layer.hidden(), layer.core());
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or a live handle (the caller's contract).
        let d = unsafe { handle(dispatched, "dispatched") }?;
        let out = out_ptr(out, "out")?;
        if d.hidden != hidden {
            return Err(invalid("dispatched comes from a layer with other tokens"));
        }
        // SAFETY: NULL or readable for `outputs_count` elements (the caller's contract).
        let outputs = unsafe { bytes(outputs, outputs_count, d.dtype, "outputs") }?;
        let inner: Box<dyn Returning> = match &d.rows {
            Rows::W1(r) => Box::new(core.combine_start(comm, r, outputs.to_vec())?),
            Rows::W2(r) => Box::new(core.combine_start(comm, r, bytemuck::pod_collect_to_vec::<u8, u16>(outputs))?),
            Rows::W4(r) => Box::new(core.combine_start(comm, r, bytemuck::pod_collect_to_vec::<u8, u32>(outputs))?),
            Rows::W8(r) => Box::new(core.combine_start(comm, r, bytemuck::pod_collect_to_vec::<u8, u64>(outputs))?),
        };
        let count = d.sent.checked_mul(hidden).ok_or_else(|| invalid("n_tokens * hidden overflows"))?;
        let request = phx_moe_combine_request { inner, count, dtype: d.dtype };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(request))) };
        Ok(())
    })
}

/// Whether the combine has finished (`phx_moe_combine_request_wait` would not block):
/// 1 or 0 in `*out`.
///
/// # Safety
/// `request` is NULL or a live handle; `out` NULL or valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_combine_request_is_finished(
    request: *const phx_moe_combine_request,
    out: *mut c_int,
) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(request, "request", out, |r: &phx_moe_combine_request| c_int::from(r.inner.finished())) }
}

/// Waits for the combine and, on `PHX_OK`, writes this device's rows, in the order of
/// its tokens as given to the dispatch, to `combined` (`combined_count` = that
/// dispatch's `n_tokens * hidden` elements; `PHX_ERR_INVALID_ARGUMENT` otherwise). On
/// any error `combined` is unchanged.
///
/// Ownership: always consumes and frees `request`, whatever the status (except
/// `PHX_ERR_NULL` for a NULL `request`). May run on any thread.
///
/// # Safety
/// `request` is NULL or a live handle, not used afterwards; `combined` NULL or writable
/// for `combined_count` elements.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_combine_request_wait(
    request: *mut phx_moe_combine_request,
    combined: *mut c_void,
    combined_count: usize,
) -> c_int {
    guard(|| {
        if request.is_null() {
            return Err(null("request"));
        }
        // SAFETY: a live handle made by `Box::into_raw`, given back for good.
        let request = unsafe { Box::from_raw(request) };
        let (count, dtype) = (request.count, request.dtype);
        let back = request.inner.wait()?;
        if combined_count != count {
            return Err(invalid(format!("combined_count is {combined_count}; the dispatch's tokens are {count}")));
        }
        // SAFETY: NULL or writable for `combined_count` elements (the caller's contract).
        let combined = unsafe { bytes_mut(combined, combined_count, dtype, "combined") }?;
        if back.len() != byte_len(count, dtype, "combined")? {
            return Err(invalid(format!("combine returned {} bytes for {} expected", back.len(), combined.len())));
        }
        combined.copy_from_slice(&back);
        Ok(())
    })
}

/// Frees `request` without waiting: the combine goes on in the background and its rows
/// are discarded. NULL is a no-op.
///
/// # Safety
/// `request` is NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_combine_request_free(request: *mut phx_moe_combine_request) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(request) }
}
