//! The FSSDP layer's started steps from C, so that spAG runs under the attention
//! forward and spRS under the backward: `phx_moe_layer_materialize_start`,
//! `phx_moe_layer_reduce_gradients_start` and, for re-materialisation,
//! `phx_moe_layer_release_replicas` with `phx_moe_layer_rematerialize_start`; each
//! started step is a `phx_moe_step` handle ended by `phx_moe_step_wait` or
//! `phx_moe_step_free` (`phalanx::moe::PendingStep`).

use std::ffi::{c_int, c_void};

use phalanx::moe::{AnyPendingStep, ExpertLayer, PendingStep};
use phalanx::{Communicator, DType, Element};

use crate::args::{
    bytes, bytes_mut, deliver_started, dtype, free_handle, get_into, handle, handle_mut, out_ptr, write_out,
};
use crate::comm::phx_comm;
use crate::moe_layer::phx_moe_layer;
use crate::status::{guard, invalid, null, Fail};
use crate::typed::by_width;

/// A layer step (spAG or spRS) started by `phx_moe_layer_materialize_start`,
/// `phx_moe_layer_reduce_gradients_start` or `phx_moe_layer_rematerialize_start`,
/// owning a copy of its buffer. Consumed by `phx_moe_step_wait` or `phx_moe_step_free`.
/// It may be waited on from any thread, including while its communicator runs other
/// calls on another thread.
pub struct phx_moe_step {
    inner: AnyPendingStep,
    /// Elements `phx_moe_step_wait` writes.
    count: usize,
    dtype: DType,
}

/// Boxes a started step for C.
fn step<T: Element>(pending: PendingStep<T>, count: usize, dtype: DType) -> Result<*mut phx_moe_step, Fail> {
    Ok(Box::into_raw(Box::new(phx_moe_step { inner: pending.into(), count, dtype })))
}

/// Starts `phx_moe_layer_materialize` (spAG P → P′) on a copy of `params` (`count` =
/// `phx_moe_layer_params_len` elements of `dtype`) and returns at once with the handle
/// in `*out`; `params` is not used after the call. `phx_moe_step_wait` writes the
/// materialised buffer (or, on error, the values passed here) to a buffer of the
/// caller's. Several steps may be in flight; every device starts them in the same order.
///
/// Ownership: the caller owns `*out` and passes it to `phx_moe_step_wait` or
/// `phx_moe_step_free` exactly once. `PHX_ERR_INVALID_ARGUMENT` (nothing started) for a
/// buffer of another length. Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `layer` is NULL or a live handle; `comm` NULL or a live communicator not used
/// concurrently; `params` NULL or readable for `count` elements; `out` NULL or valid for
/// a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_materialize_start(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    params: *const c_void,
    count: usize,
    dtype_code: c_int,
    out: *mut *mut phx_moe_step,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract, as `started_args` needs it.
        let (layer, comm, out, dtype) = unsafe { started_args(layer, comm, out, dtype_code) }?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let buf = unsafe { bytes(params, count, dtype, "params") }?;
        check_len(count, layer.params_len(), "params")?;
        // Copies bytes only: the unsigned type of the element's width moves the same bits.
        let handle = by_width!(dtype.size(), T => {
            step(layer.materialize_start(comm, bytemuck::pod_collect_to_vec::<u8, T>(buf))?, count, dtype)
        })?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Starts `phx_moe_layer_reduce_gradients` (spRS P′ → P) on a copy of `grads` (as
/// `phx_moe_layer_materialize_start`) and returns at once with the handle in `*out`.
///
/// # Safety
/// As `phx_moe_layer_materialize_start`, for `grads`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_reduce_gradients_start(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    grads: *const c_void,
    count: usize,
    dtype_code: c_int,
    out: *mut *mut phx_moe_step,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract, as `started_args` needs it.
        let (layer, comm, out, dtype) = unsafe { started_args(layer, comm, out, dtype_code) }?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let buf = unsafe { bytes(grads, count, dtype, "grads") }?;
        check_len(count, layer.params_len(), "grads")?;
        let handle = phalanx::with_dtype!(dtype, T => {
            step(layer.reduce_gradients_start(comm, bytemuck::pod_collect_to_vec::<u8, T>(buf))?, count, dtype)
        })?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// The arguments every started step checks first, in this order: the layer, the
/// communicator, the `out` pointer and the element type.
///
/// # Safety
/// `layer` is NULL or a live handle; `comm` NULL or a live handle used by no one else
/// during `'a`.
unsafe fn started_args<'a>(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    out: *mut *mut phx_moe_step,
    dtype_code: c_int,
) -> Result<(&'a ExpertLayer, &'a mut Communicator, *mut *mut phx_moe_step, DType), Fail> {
    // SAFETY: NULL or a live handle (the caller's contract).
    let layer = unsafe { handle(layer, "layer") }?.core();
    // SAFETY: NULL or a live handle used by no one else (the caller's contract).
    let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
    Ok((layer, comm, out_ptr(out, "out")?, dtype(dtype_code)?))
}

fn check_len(count: usize, want: usize, what: &str) -> Result<(), Fail> {
    if count != want {
        return Err(invalid(format!("{what} has {count} elements; the layer's buffer has {want}")));
    }
    Ok(())
}

/// Elements of the experts `device` owns (`n_owned * expert_len`) in `*out`: the
/// length of `phx_moe_layer_release_replicas`'s `owned` buffer. Thread-safe.
///
/// # Safety
/// `layer` is NULL or a live handle; `out` NULL or valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_owned_len(layer: *const phx_moe_layer, device: usize, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        get_into(layer, "layer", out, |l: &phx_moe_layer| {
            let owners = l.core().placement().owners();
            owners.iter().filter(|&&o| o == device).count() * l.core().expert_len()
        })
    }
}

/// Elements of the replicas `device` holds this iteration (the experts of P′ it holds
/// but does not own) in `*out`: the memory re-materialisation frees between the forward
/// and the backward. Thread-safe.
///
/// # Safety
/// `layer` is NULL or a live handle; `out` NULL or valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_replica_len(
    layer: *const phx_moe_layer,
    device: usize,
    out: *mut usize,
) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(layer, "layer", out, |l: &phx_moe_layer| l.core().replica_len(device)) }
}

/// Re-materialisation, after the layer's forward: copies the experts this device owns
/// from `params` (`count` = `phx_moe_layer_params_len` elements of `dtype`), ascending
/// by expert, to `owned` (`owned_count` = `phx_moe_layer_owned_len` of this device),
/// so that the caller may free `params` until the backward; writes the bytes freed
/// against the full buffer to `*freed_bytes_or_null` (when not NULL). Local: nothing
/// is sent. `PHX_ERR_INVALID_ARGUMENT` for buffers of other lengths (nothing written).
///
/// # Safety
/// `layer` is NULL or a live handle; `comm` NULL or a live communicator not used
/// concurrently; `params` NULL or readable for `count` elements; `owned` NULL or
/// writable for `owned_count` elements, not overlapping `params`; `freed_bytes_or_null`
/// NULL or valid for a write of a `size_t`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_layer_release_replicas(
    layer: *const phx_moe_layer,
    comm: *const phx_comm,
    params: *const c_void,
    count: usize,
    dtype_code: c_int,
    owned: *mut c_void,
    owned_count: usize,
    freed_bytes_or_null: *mut usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let layer = unsafe { handle(layer, "layer") }?.core();
        // SAFETY: NULL or a live handle (the caller's contract).
        let comm = &unsafe { handle(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        crate::args::disjoint(
            params,
            crate::args::byte_len(count, dtype, "params")?,
            owned,
            crate::args::byte_len(owned_count, dtype, "owned")?,
        )?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let full = unsafe { bytes(params, count, dtype, "params") }?;
        // SAFETY: NULL or writable for `owned_count` elements, not overlapping `params`.
        let owned = unsafe { bytes_mut(owned, owned_count, dtype, "owned") }?;
        let freed = by_width!(dtype.size(), T => {
            let released = layer.release_replicas(comm, bytemuck::pod_collect_to_vec::<u8, T>(full))?;
            let kept: &[u8] = bytemuck::cast_slice(released.owned());
            if kept.len() != owned.len() {
                return Err(invalid(format!(
                    "owned has {owned_count} elements; this device owns {} of the layer",
                    kept.len() / dtype.size()
                )));
            }
            owned.copy_from_slice(kept);
            Ok::<_, Fail>(released.freed_bytes())
        })?;
        if !freed_bytes_or_null.is_null() {
            // SAFETY: non-NULL, valid for one write (the caller's contract).
            unsafe { freed_bytes_or_null.write(freed) };
        }
        Ok(())
    })
}

/// Re-materialisation, before the layer's backward: makes the full buffer again from
/// `owned` (as `phx_moe_layer_release_replicas` wrote it: the owned experts in their
/// slots, zeros elsewhere) and starts the spAG that fills the replicas; returns at once
/// with the handle in `*out`, whose `phx_moe_step_wait` writes the
/// `phx_moe_layer_params_len` elements (on error: the owned experts in their slots,
/// zeros elsewhere, from which the caller can start again). A collective, as
/// `phx_moe_layer_materialize_start`.
///
/// # Safety
/// `layer` is NULL or a live handle; `comm` NULL or a live communicator not used
/// concurrently; `owned` NULL or readable for `owned_count` elements; `out` NULL or
/// valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_rematerialize_start(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    owned: *const c_void,
    owned_count: usize,
    dtype_code: c_int,
    out: *mut *mut phx_moe_step,
) -> c_int {
    guard(|| {
        // SAFETY: the caller's contract, as `started_args` needs it.
        let (layer, comm, out, dtype) = unsafe { started_args(layer, comm, out, dtype_code) }?;
        // SAFETY: NULL or readable for `owned_count` elements (the caller's contract).
        let owned = unsafe { bytes(owned, owned_count, dtype, "owned") }?;
        let device = comm.rank();
        let owners = layer.placement().owners();
        let mine: Vec<usize> = (0..owners.len()).filter(|&e| owners[e] == device).collect();
        let want = mine.len() * layer.expert_len();
        if owned_count != want {
            return Err(invalid(format!("owned has {owned_count} elements; device {device} owns {want}")));
        }
        let count = layer.params_len();
        let handle = by_width!(dtype.size(), T => {
            // The full buffer as released: the owned experts in their slots, zeros
            // elsewhere; `release_replicas` of it is what the forward released.
            let owned: Vec<T> = bytemuck::pod_collect_to_vec(owned);
            let mut full = vec![T::default(); count];
            for (e, chunk) in mine.iter().zip(owned.chunks(layer.expert_len().max(1))) {
                full[layer.expert_range(*e)].copy_from_slice(chunk);
            }
            let released = layer.release_replicas(comm, full)?;
            step(layer.rematerialize_start(comm, released)?, count, dtype)
        })?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Whether the step has finished (`phx_moe_step_wait` would not block): 1 or 0 in
/// `*out`.
///
/// # Safety
/// `step` is NULL or a live handle; `out` NULL or valid for a write of an `int`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_step_is_finished(step: *const phx_moe_step, out: *mut c_int) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(step, "step", out, |s: &phx_moe_step| c_int::from(s.inner.is_finished())) }
}

/// Waits for the step and writes its `count` elements into `out_buf`: the materialised
/// (or reduced) buffer on `PHX_OK`, the buffer as started on a collective error
/// (`PHX_ERR_PEER_LOST`, `PHX_ERR_ABORTED`: plan again for the survivors). `count` must
/// be the layer's `phx_moe_layer_params_len` (`PHX_ERR_INVALID_ARGUMENT` otherwise, and
/// nothing is written).
///
/// Ownership: always consumes and frees `step`, whatever the status (except
/// `PHX_ERR_NULL` for a NULL `step`); the step is waited for even when `out_buf` is NULL
/// or `count` is wrong. May run on any thread.
///
/// # Safety
/// `step` is NULL or a live handle, not used afterwards; `out_buf` NULL or writable for
/// `count` elements of the started element type.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_step_wait(step: *mut phx_moe_step, out_buf: *mut c_void, count: usize) -> c_int {
    guard(|| {
        if step.is_null() {
            return Err(null("step"));
        }
        // SAFETY: a live handle made by `Box::into_raw`, given back for good.
        let step = unsafe { Box::from_raw(step) };
        let (expected, dtype) = (step.count, step.dtype);
        // SAFETY: NULL or writable for `count` elements of `dtype` (the caller's contract).
        unsafe { deliver_started(step.inner.wait(), out_buf, count, expected, dtype, "step") }
    })
}

/// Frees `step` without waiting: the step goes on in the background (the other devices
/// still need this one's part) and its result is discarded. NULL is a no-op.
///
/// # Safety
/// `step` is NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_step_free(step: *mut phx_moe_step) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(step) }
}
