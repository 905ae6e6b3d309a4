//! The FSSDP layer from C: `phx_moe_layer` (one MoE layer's communication for one
//! iteration, `phalanx::moe::ExpertLayer`) and `phx_moe_dispatched` (the tokens a
//! dispatch delivered, and what its combine needs to send the outputs home).
//!
//! Dispatch and combine only move rows of bytes, so they run on unsigned integers of the
//! element's width, which moves the same bits as the element type itself; the gradient
//! sum of `phx_moe_layer_reduce_gradients` runs on the element type.

use std::ffi::{c_int, c_void};

use phalanx::moe::{Dispatch, Dispatched, ExpertLayer, ExpertPlacement, Hosts};
use phalanx::DType;

use crate::args::{bytes, bytes_mut, dtype, free_handle, get_into, handle, handle_mut, out_ptr, write_out};
use crate::comm::phx_comm;
use crate::sparse::slice;
use crate::status::{guard, invalid, null};
use crate::typed::{by_width, typed, with_typed_mut};

/// One MoE layer's communication for one iteration: the placement P′ (owners and
/// holders of every expert), the experts' length and the tokens' width. Every device of
/// the group makes one from the same placement and calls its steps in the same order.
/// Immutable once made: it may be used by several threads at once (each with its own
/// communicator).
pub struct phx_moe_layer {
    inner: ExpertLayer,
    /// Elements of a token.
    hidden: usize,
}

impl phx_moe_layer {
    /// The layer itself.
    pub(crate) fn core(&self) -> &ExpertLayer {
        &self.inner
    }

    /// Elements of a token.
    pub(crate) fn hidden(&self) -> usize {
        self.hidden
    }
}

/// The rows a dispatch delivered, typed by the element's width.
pub(crate) enum Rows {
    W1(Dispatched<u8>),
    W2(Dispatched<u16>),
    W4(Dispatched<u32>),
    W8(Dispatched<u64>),
}

/// What `phx_moe_layer_dispatch` delivered to this device: the tokens to run through
/// their experts, each token's expert and source device, and what
/// `phx_moe_layer_combine` needs to send the outputs back. Owned by the caller, freed
/// with `phx_moe_dispatched_free`; the arrays its accessors return live as long as it.
pub struct phx_moe_dispatched {
    pub(crate) rows: Rows,
    pub(crate) dtype: DType,
    pub(crate) hidden: usize,
    /// Tokens this device gave to the dispatch (rows `phx_moe_layer_combine` returns).
    pub(crate) sent: usize,
}

/// Makes the layer for placement P′: expert `e` (of `n_experts`) is owned by device
/// `owners[e]` (of `n_devices`, the group's size) and held by device `d` when
/// `holds_or_null[e * n_devices + d]` is not zero (the matrix `phx_moe_place` writes;
/// the owner always holds; NULL: every expert on its owner only, the sharded P). The
/// experts' parameters and gradients are buffers of `n_experts * expert_len` elements,
/// expert `e` at offset `e * expert_len` on every device; tokens are rows of `hidden`
/// elements. `hosts_or_null` gives each device's host, or is NULL: with it, dispatch
/// prefers a replica on a token's host. Writes the new layer to `*out`, which the
/// caller frees with `phx_moe_layer_free`. `PHX_ERR_INVALID_ARGUMENT` for an owner or
/// host outside the group or `hidden` 0. Thread-safe.
///
/// # Safety
/// `owners` is readable for `n_experts` entries, `holds_or_null` NULL or readable for
/// `n_experts * n_devices` bytes, `hosts_or_null` NULL or readable for `n_devices`
/// entries, `out` valid for a write of a pointer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_layer_new(
    n_devices: usize,
    n_experts: usize,
    owners: *const usize,
    holds_or_null: *const u8,
    expert_len: usize,
    hidden: usize,
    hosts_or_null: *const usize,
    out: *mut *mut phx_moe_layer,
) -> c_int {
    guard(|| {
        let out = out_ptr(out, "out")?;
        let cells = n_experts.checked_mul(n_devices).ok_or_else(|| invalid("n_experts * n_devices overflows"))?;
        // SAFETY: readable for `n_experts` entries (the caller's contract).
        let owners = unsafe { slice(owners, n_experts, "owners") }?;
        let extra: Vec<Vec<usize>> = if holds_or_null.is_null() {
            vec![Vec::new(); n_experts]
        } else {
            // SAFETY: non-NULL and readable for `cells` bytes (the caller's contract).
            let holds = unsafe { slice(holds_or_null, cells, "holds") }?;
            (0..n_experts).map(|e| (0..n_devices).filter(|&d| holds[e * n_devices + d] != 0).collect()).collect()
        };
        let hosts = if hosts_or_null.is_null() {
            None
        } else {
            // SAFETY: non-NULL and readable for `n_devices` entries (the caller's contract).
            Some(Hosts(unsafe { slice(hosts_or_null, n_devices, "hosts") }?.to_vec()))
        };
        let placement =
            ExpertPlacement::with_replicas(owners, n_devices, &extra).map_err(|e| invalid(e.to_string()))?;
        let inner = ExpertLayer::new(placement, expert_len, hidden, hosts)?;
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(phx_moe_layer { inner, hidden }))) };
        Ok(())
    })
}

/// Elements of the layer's parameter (and gradient) buffer in `*out`:
/// `n_experts * expert_len`. Thread-safe.
///
/// # Safety
/// `layer` is NULL or a live handle; `out` NULL or valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_params_len(layer: *const phx_moe_layer, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(layer, "layer", out, |l: &phx_moe_layer| l.inner.params_len()) }
}

/// spAG(P, P′): every holder's slot of an expert in `params` (`count` =
/// `phx_moe_layer_params_len` elements of `dtype`) receives its owner's bytes; slots
/// this device does not hold are unchanged. A collective: every device of the group
/// calls it. On error `params` is unchanged (`PHX_ERR_PEER_LOST`/`PHX_ERR_ABORTED`:
/// plan again for the survivors). Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `layer` is NULL or a live handle; `comm` NULL or a live communicator not used
/// concurrently; `params` NULL or readable and writable for `count` elements.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_materialize(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    params: *mut c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let layer = &unsafe { handle(layer, "layer") }?.inner;
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(params, count, dtype, "params") }?;
        // Copies bytes only: the unsigned type of the element's width moves the same bits.
        by_width!(dtype.size(), T => with_typed_mut::<T>(buf, |p| layer.materialize(comm, p)))
    })
}

/// spRS(P′, P): each owner's slot of an expert in `grads` (as `params` of
/// `phx_moe_layer_materialize`) becomes the sum of all its holders' slots, added in
/// ascending device order (every run gives the same bits); other slots are unchanged,
/// and the replicas may then be dropped. A collective; on error `grads` is unchanged.
/// Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// As `phx_moe_layer_materialize`, for `grads`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_reduce_gradients(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    grads: *mut c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let layer = &unsafe { handle(layer, "layer") }?.inner;
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(grads, count, dtype, "grads") }?;
        phalanx::with_dtype!(dtype, T => with_typed_mut::<T>(buf, |g| layer.reduce_gradients(comm, g)))
    })
}

/// Sends this device's `n_tokens` tokens (`tokens`: `n_tokens * hidden` elements of
/// `dtype`, token `i` routed to expert `experts[i]`) to devices holding their experts:
/// a replica on this device first, then on its host, an expert's tokens split evenly
/// over its holders (the plan every device computes alike from the token counts, which
/// the devices all-gather first). Writes to `*out` what arrived here, to run through the
/// experts (see the `phx_moe_dispatched_*` accessors) and to pass to
/// `phx_moe_layer_combine`; the caller frees it with `phx_moe_dispatched_free`.
///
/// Top-k routing: give one row per token and choice (the token repeated, each row with
/// its expert). The backward's output gradients travel the same way: dispatching them
/// with the same experts delivers them in the order the tokens arrived.
///
/// A collective; on error nothing is written to `*out`. `PHX_ERR_INVALID_ARGUMENT` for
/// an expert outside the layer. Must not run concurrently with other calls on `comm`.
///
/// # Safety
/// `layer` is NULL or a live handle; `comm` NULL or a live communicator not used
/// concurrently; `tokens` NULL or readable for `n_tokens * hidden` elements, `experts`
/// for `n_tokens` entries; `out` NULL or valid for a write of a pointer.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_layer_dispatch(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    tokens: *const c_void,
    experts: *const usize,
    n_tokens: usize,
    dtype_code: c_int,
    out: *mut *mut phx_moe_dispatched,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let layer = unsafe { handle(layer, "layer") }?;
        let (hidden, layer) = (layer.hidden, &layer.inner);
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let out = out_ptr(out, "out")?;
        let dtype = dtype(dtype_code)?;
        let count = n_tokens.checked_mul(hidden).ok_or_else(|| invalid("n_tokens * hidden overflows"))?;
        // SAFETY: NULL or readable for `count` elements (the caller's contract).
        let tokens = unsafe { bytes(tokens, count, dtype, "tokens") }?;
        // SAFETY: readable for `n_tokens` entries (the caller's contract).
        let experts = unsafe { slice(experts, n_tokens, "experts") }?;
        let rows = by_width!(dtype.size(), T => {
            let d = layer.dispatch(comm, &typed::<T>(tokens), experts)?;
            Ok::<_, crate::status::Fail>(Rows::from(d))
        })?;
        let d = phx_moe_dispatched { rows, dtype, hidden, sent: n_tokens };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(out, Box::into_raw(Box::new(d))) };
        Ok(())
    })
}

/// Sends the experts' outputs back where their tokens came from: `outputs` holds one
/// row of `hidden` elements per token of `dispatched`, in its order (`outputs_count` =
/// `phx_moe_dispatched_count * hidden` elements, of the dispatch's element type).
/// Writes this device's rows, in the order of its tokens as given to
/// `phx_moe_layer_dispatch`, to `combined` (`combined_count` = that dispatch's
/// `n_tokens * hidden` elements). A collective; on error `combined` is unchanged.
/// `dispatched` stays valid (free it with `phx_moe_dispatched_free`). Must not run
/// concurrently with other calls on `comm`.
///
/// # Safety
/// `layer` and `dispatched` are NULL or live handles; `comm` NULL or a live
/// communicator not used concurrently; `outputs` NULL or readable for `outputs_count`
/// elements and `combined` NULL or writable for `combined_count` elements, the two not
/// overlapping.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_moe_layer_combine(
    layer: *const phx_moe_layer,
    comm: *mut phx_comm,
    dispatched: *const phx_moe_dispatched,
    outputs: *const c_void,
    outputs_count: usize,
    combined: *mut c_void,
    combined_count: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let layer = unsafe { handle(layer, "layer") }?;
        let (hidden, layer) = (layer.hidden, &layer.inner);
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        // SAFETY: NULL or a live handle (the caller's contract).
        let d = unsafe { handle(dispatched, "dispatched") }?;
        if d.hidden != hidden {
            return Err(invalid("dispatched comes from a layer with other tokens"));
        }
        let want = d.sent.checked_mul(d.hidden).ok_or_else(|| invalid("n_tokens * hidden overflows"))?;
        if combined_count != want {
            return Err(invalid(format!(
                "combined_count is {combined_count}; the dispatch had {} tokens of {}: {want}",
                d.sent, d.hidden
            )));
        }
        crate::args::disjoint(
            outputs,
            crate::args::byte_len(outputs_count, d.dtype, "outputs")?,
            combined,
            crate::args::byte_len(combined_count, d.dtype, "combined")?,
        )?;
        // SAFETY: NULL or readable for `outputs_count` elements (the caller's contract).
        let outputs = unsafe { bytes(outputs, outputs_count, d.dtype, "outputs") }?;
        // SAFETY: NULL or writable for `combined_count` elements, not overlapping `outputs`.
        let combined = unsafe { bytes_mut(combined, combined_count, d.dtype, "combined") }?;
        let back: Vec<u8> = match &d.rows {
            Rows::W1(r) => layer.combine(comm, r, &typed::<u8>(outputs))?,
            Rows::W2(r) => bytemuck::cast_slice(&layer.combine(comm, r, &typed::<u16>(outputs))?).to_vec(),
            Rows::W4(r) => bytemuck::cast_slice(&layer.combine(comm, r, &typed::<u32>(outputs))?).to_vec(),
            Rows::W8(r) => bytemuck::cast_slice(&layer.combine(comm, r, &typed::<u64>(outputs))?).to_vec(),
        };
        if back.len() != combined.len() {
            return Err(invalid(format!("combine returned {} bytes for {} expected", back.len(), combined.len())));
        }
        combined.copy_from_slice(&back);
        Ok(())
    })
}

impl phx_moe_dispatched {
    /// (experts, sources, the group's plan): the parts that do not depend on the width.
    fn parts(&self) -> (&[usize], &[usize], &Dispatch) {
        match &self.rows {
            Rows::W1(r) => (&r.experts, &r.sources, &r.plan),
            Rows::W2(r) => (&r.experts, &r.sources, &r.plan),
            Rows::W4(r) => (&r.experts, &r.sources, &r.plan),
            Rows::W8(r) => (&r.experts, &r.sources, &r.plan),
        }
    }

    /// Tokens this device computes.
    fn count(&self) -> usize {
        self.experts().len()
    }

    fn experts(&self) -> &[usize] {
        self.parts().0
    }

    fn sources(&self) -> &[usize] {
        self.parts().1
    }

    fn token_bytes(&self) -> &[u8] {
        match &self.rows {
            Rows::W1(r) => &r.tokens,
            Rows::W2(r) => bytemuck::cast_slice(&r.tokens),
            Rows::W4(r) => bytemuck::cast_slice(&r.tokens),
            Rows::W8(r) => bytemuck::cast_slice(&r.tokens),
        }
    }

    fn compute(&self) -> Vec<u64> {
        self.parts().2.compute()
    }
}

impl From<Dispatched<u8>> for Rows {
    fn from(d: Dispatched<u8>) -> Rows {
        Rows::W1(d)
    }
}
impl From<Dispatched<u16>> for Rows {
    fn from(d: Dispatched<u16>) -> Rows {
        Rows::W2(d)
    }
}
impl From<Dispatched<u32>> for Rows {
    fn from(d: Dispatched<u32>) -> Rows {
        Rows::W4(d)
    }
}
impl From<Dispatched<u64>> for Rows {
    fn from(d: Dispatched<u64>) -> Rows {
        Rows::W8(d)
    }
}

/// The number of tokens this device computes (rows of `phx_moe_dispatched_tokens`) in
/// `*out`.
///
/// # Safety
/// `dispatched` is NULL or a live handle; `out` NULL or valid for a write of a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatched_count(dispatched: *const phx_moe_dispatched, out: *mut usize) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(dispatched, "dispatched", out, phx_moe_dispatched::count) }
}

/// The tokens this device computes, in `*out`: `phx_moe_dispatched_count * hidden`
/// elements of the dispatch's element type, grouped by the device they came from
/// (ascending), then by expert (ascending), then in their order there. The array
/// belongs to `dispatched` and lives until `phx_moe_dispatched_free`; NULL when there
/// are none.
///
/// # Safety
/// `dispatched` is NULL or a live handle; `out` NULL or valid for a write of a pointer.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatched_tokens(
    dispatched: *const phx_moe_dispatched,
    out: *mut *const c_void,
) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe {
        get_into(dispatched, "dispatched", out, |d: &phx_moe_dispatched| {
            let b = d.token_bytes();
            if b.is_empty() {
                std::ptr::null()
            } else {
                b.as_ptr().cast()
            }
        })
    }
}

/// The expert of each token of `phx_moe_dispatched_tokens`, in `*out`
/// (`phx_moe_dispatched_count` entries, owned by `dispatched` as the tokens are; NULL
/// when there are none).
///
/// # Safety
/// As `phx_moe_dispatched_tokens`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatched_experts(
    dispatched: *const phx_moe_dispatched,
    out: *mut *const usize,
) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(dispatched, "dispatched", out, |d: &phx_moe_dispatched| array_ptr(d.experts())) }
}

/// The device each token of `phx_moe_dispatched_tokens` came from, in `*out` (as
/// `phx_moe_dispatched_experts`).
///
/// # Safety
/// As `phx_moe_dispatched_tokens`.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatched_sources(
    dispatched: *const phx_moe_dispatched,
    out: *mut *const usize,
) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { get_into(dispatched, "dispatched", out, |d: &phx_moe_dispatched| array_ptr(d.sources())) }
}

fn array_ptr(v: &[usize]) -> *const usize {
    if v.is_empty() {
        std::ptr::null()
    } else {
        v.as_ptr()
    }
}

/// The tokens each device computes under the group's dispatch plan (the same on every
/// device; the largest is the straggler's), written to `out[0..n_devices]`;
/// `n_devices` must be the layer's.
///
/// # Safety
/// `dispatched` is NULL or a live handle; `out` NULL or writable for `n_devices`
/// entries.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatched_compute(
    dispatched: *const phx_moe_dispatched,
    out: *mut u64,
    n_devices: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle (the caller's contract).
        let d = unsafe { handle(dispatched, "dispatched") }?;
        let compute = d.compute();
        if n_devices != compute.len() {
            return Err(invalid(format!("n_devices is {n_devices}, the plan has {}", compute.len())));
        }
        if out.is_null() && n_devices > 0 {
            return Err(null("out"));
        }
        // SAFETY: `out` is writable for `n_devices` entries (the caller's contract), and
        // `compute` has that many; separate allocations.
        unsafe { std::ptr::copy_nonoverlapping(compute.as_ptr(), out, n_devices) };
        Ok(())
    })
}

/// Frees `dispatched` (and the arrays its accessors returned). NULL is a no-op.
///
/// # Safety
/// `dispatched` is NULL or a live handle from `phx_moe_layer_dispatch`, not used
/// afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_dispatched_free(dispatched: *mut phx_moe_dispatched) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(dispatched) }
}

/// Frees `layer`. NULL is a no-op.
///
/// # Safety
/// `layer` is NULL or a live handle from `phx_moe_layer_new`, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn phx_moe_layer_free(layer: *mut phx_moe_layer) -> c_int {
    // SAFETY: the caller's contract, as documented.
    unsafe { free_handle(layer) }
}
