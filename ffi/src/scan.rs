//! All-scan from C: built-in operators, a user callback, and the linear-attention
//! state combine.

use std::ffi::{c_char, c_int, c_void};

use phalanx::comm::ScanOptions;
use phalanx::dtype::Order;
use phalanx::op::CustomOp;
use phalanx::plan::scan::Algorithm;
use phalanx::DType;

use crate::args::{bytes_mut, c_str, disjoint, handle_mut, reduce_op};
use crate::comm::phx_comm;
use crate::status::{guard, invalid, null, Fail};

/// Scan flag: exclusive scan (rank r gets x_0 ⊕ … ⊕ x_{r-1}; the first rank gets the
/// operator's identity). Without it the scan is inclusive.
pub const PHX_SCAN_EXCLUSIVE: c_int = 1;
/// Scan flag: scan in the order n-1, …, 0 (rank n-1 first).
pub const PHX_SCAN_REVERSE: c_int = 2;
/// Scan flag: recursive doubling instead of the pipelined chain (pass `blocks` 0).
pub const PHX_SCAN_RECURSIVE_DOUBLING: c_int = 4;

/// Options from the C flags and block count.
fn options(flags: c_int, blocks: usize) -> Result<ScanOptions, Fail> {
    let known = PHX_SCAN_EXCLUSIVE | PHX_SCAN_REVERSE | PHX_SCAN_RECURSIVE_DOUBLING;
    if flags & !known != 0 {
        return Err(invalid(format!("unknown scan flags {flags:#x}")));
    }
    let doubling = flags & PHX_SCAN_RECURSIVE_DOUBLING != 0;
    let algorithm = match (doubling, blocks) {
        (true, 0) => Algorithm::RecursiveDoubling,
        (true, _) => return Err(invalid("PHX_SCAN_RECURSIVE_DOUBLING takes no block count (pass 0)")),
        (false, 0) => Algorithm::Auto,
        (false, blocks) => Algorithm::Chain { blocks },
    };
    Ok(ScanOptions { inclusive: flags & PHX_SCAN_EXCLUSIVE == 0, reverse: flags & PHX_SCAN_REVERSE != 0, algorithm })
}

/// Scans the `count` elements of type `dtype_code` in `buf` over the members with the
/// built-in operator `op_code` (`PHX_OP_SUM`, `_PROD`, `_MIN` or `_MAX`; `PHX_OP_AVG`
/// is `PHX_ERR_INVALID_ARGUMENT`), element-wise. `flags` combines `PHX_SCAN_*`;
/// `blocks` is the chain's block count (0: chosen by size). Every member must pass the
/// same count, dtype, op, flags and blocks.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` is NULL or valid
/// for reads and writes of `count` elements of `dtype`, untouched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_scan(
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
    flags: c_int,
    blocks: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let (dtype, op, options) = (crate::args::dtype(dtype_code)?, reduce_op(op_code)?, options(flags, blocks)?);
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.all_scan_raw(buf, dtype, op, options)?;
        Ok(())
    })
}

/// A C callback as a [`CustomOp`].
struct Callback {
    name: String,
    unit_bytes: usize,
    identity: Option<Vec<u8>>,
    f: unsafe extern "C" fn(*mut c_void, *const c_void, *const c_void, *mut c_void, usize) -> c_int,
    user_data: *mut c_void,
}

// SAFETY: the callback and its user data are used only during the call that made this
// value, one combine at a time (the executor runs one rank's combines in sequence); the
// C caller accepts calls from a library thread (documented on `phx_comm_all_scan_custom`).
unsafe impl Send for Callback {}
// SAFETY: as for `Send`: no two combines of one call run at once.
unsafe impl Sync for Callback {}

impl CustomOp for Callback {
    fn unit_bytes(&self) -> usize {
        self.unit_bytes
    }

    fn combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) {
        // A failure is reported through `try_combine`, which the executor calls.
        let _ = self.try_combine(acc, incoming, order);
    }

    fn try_combine(&self, acc: &mut [u8], incoming: &[u8], order: Order) -> Result<(), String> {
        let len = acc.len().min(incoming.len()) / self.unit_bytes * self.unit_bytes;
        let words = len.div_ceil(8);
        // 8-byte aligned copies, so that the callback may read its element type directly.
        let (mut left, mut right, mut out) = (vec![0u64; words], vec![0u64; words], vec![0u64; words]);
        let (l, r) = match order {
            Order::IncomingLeft => (incoming, &acc[..]),
            Order::IncomingRight => (&acc[..], incoming),
        };
        bytemuck::cast_slice_mut::<u64, u8>(&mut left)[..len].copy_from_slice(&l[..len]);
        bytemuck::cast_slice_mut::<u64, u8>(&mut right)[..len].copy_from_slice(&r[..len]);
        let units = len / self.unit_bytes;
        // SAFETY: the three buffers are distinct, live and hold `units * unit_bytes`
        // bytes; the callback's contract is the C caller's.
        let status = unsafe {
            (self.f)(self.user_data, left.as_ptr().cast(), right.as_ptr().cast(), out.as_mut_ptr().cast(), units)
        };
        if status != 0 {
            return Err(format!("the callback returned {status}"));
        }
        acc[..len].copy_from_slice(&bytemuck::cast_slice::<u64, u8>(&out)[..len]);
        Ok(())
    }

    fn identity(&self, unit: &mut [u8]) -> bool {
        match &self.identity {
            Some(id) => {
                unit.copy_from_slice(id);
                true
            }
            None => false,
        }
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Scans `units` units of `unit_bytes` bytes each in `buf` with the user-defined
/// associative operator `combine`, which receives `user_data`.
///
/// `combine(user_data, left, right, out, units)` writes `left ⊕ right` into `out` for
/// each of `units` consecutive units and returns 0, or returns a non-zero error code.
/// `left`, `right` and `out` are distinct, 8-byte aligned buffers of
/// `units * unit_bytes` bytes. It is called during this call only, possibly from a
/// library thread, one call at a time. The left operand always comes earlier in scan
/// order; the operator must be associative and need not commute.
///
/// `name` (a NUL-terminated string) identifies the operator: members passing different
/// names or unit sizes get `PHX_ERR_MISMATCH`. `identity_or_null` is one unit, the
/// operator's identity, needed for an exclusive scan (NULL: none; then
/// `PHX_SCAN_EXCLUSIVE` is `PHX_ERR_INVALID_ARGUMENT`). A callback error fails the
/// collective on every member with `PHX_ERR_ABORTED`, buffers restored.
///
/// # Safety
/// `comm` as in `phx_comm_all_scan`; `buf` is NULL or valid for reads and writes of
/// `units * unit_bytes` bytes; `identity_or_null` is NULL or valid for reads of
/// `unit_bytes` bytes; `name` is NULL or NUL-terminated; `combine` follows
/// that contract with `user_data`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_comm_all_scan_custom(
    comm: *mut phx_comm,
    buf: *mut c_void,
    units: usize,
    unit_bytes: usize,
    combine: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            left: *const c_void,
            right: *const c_void,
            out: *mut c_void,
            units: usize,
        ) -> c_int,
    >,
    user_data: *mut c_void,
    identity_or_null: *const c_void,
    name: *const c_char,
    flags: c_int,
    blocks: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let f = combine.ok_or_else(|| null("combine"))?;
        // SAFETY: NULL or NUL-terminated (the caller's contract).
        let name = unsafe { c_str(name, "name") }?.to_string();
        if unit_bytes == 0 {
            return Err(invalid("unit_bytes is 0"));
        }
        let options = options(flags, blocks)?;
        let count = units.checked_mul(unit_bytes).ok_or_else(|| invalid("units * unit_bytes overflows"))?;
        // SAFETY: NULL or valid for `count` bytes (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, DType::U8, "buf") }?;
        let identity = if identity_or_null.is_null() {
            None
        } else {
            // SAFETY: non-NULL and valid for `unit_bytes` bytes of reads (the caller's contract).
            Some(unsafe { std::slice::from_raw_parts(identity_or_null.cast::<u8>(), unit_bytes) }.to_vec())
        };
        let op = Callback { name, unit_bytes, identity, f, user_data };
        comm.all_scan_with(buf, &op, options)?;
        Ok(())
    })
}

/// Scans linear-attention states `(a, S)` over the members with the combine
/// `(a1, S1) ⊕ (a2, S2) = (a1 ⊙ a2, diag(a2)·S1 + S2)`: `a` holds `d_k` floats and `s`
/// the `d_k × d_v` state, row-major; both are replaced by this rank's prefix. The
/// exclusive scan gives the first rank `(1, 0)`.
///
/// # Safety
/// `comm` as in `phx_comm_all_scan`; `a` is NULL or valid for reads and writes of `d_k`
/// floats and `s` of `d_k * d_v` floats, not overlapping, untouched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_scan_linear_attention(
    comm: *mut phx_comm,
    a: *mut f32,
    s: *mut f32,
    d_k: usize,
    d_v: usize,
    flags: c_int,
    blocks: usize,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let options = options(flags, blocks)?;
        let cells = d_k.checked_mul(d_v).ok_or_else(|| invalid("d_k * d_v overflows"))?;
        let bytes = |n: usize| n.saturating_mul(4);
        disjoint(a.cast_const().cast(), bytes(d_k), s.cast_const().cast(), bytes(cells))?;
        // SAFETY: NULL or valid for `d_k` floats (the caller's contract).
        let a = unsafe { bytes_mut(a.cast(), d_k, DType::F32, "a") }?;
        // SAFETY: NULL or valid for `d_k * d_v` floats, disjoint from `a` (checked above).
        let s = unsafe { bytes_mut(s.cast(), cells, DType::F32, "s") }?;
        let mut av: Vec<f32> = bytemuck::pod_collect_to_vec(a);
        let mut sv: Vec<f32> = bytemuck::pod_collect_to_vec(s);
        comm.all_scan_linear_attention(&mut av, &mut sv, d_v, options)?;
        a.copy_from_slice(bytemuck::cast_slice(&av));
        s.copy_from_slice(bytemuck::cast_slice(&sv));
        Ok(())
    })
}
