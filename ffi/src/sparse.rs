//! C functions of the sparse collectives and all-to-all: `phx_comm_all_to_all`,
//! `phx_comm_all_to_all_v`, `phx_comm_sparse_all_reduce`, `phx_comm_sparse_all_gather`
//! and `phx_comm_sparse_reduce_scatter`.

use std::ffi::{c_int, c_void};

use phalanx::comm::SparseReduced;
use phalanx::plan::sparse::Placement;

use crate::args::{byte_len, bytes, bytes_mut, disjoint, dtype, handle_mut, out_ptr, reduce_op, write_out};
use crate::comm::phx_comm;
use crate::status::{guard, invalid, null, Fail, PHX_ERR_BUFFER_TOO_SMALL};

/// `count` values of type `T` at `p`; NULL is allowed for zero.
///
/// # Safety
/// When `count` is not zero, `p` is NULL or valid for reads of `count` `T`s, not written
/// meanwhile.
pub(crate) unsafe fn slice<'a, T>(p: *const T, count: usize, what: &str) -> Result<&'a [T], Fail> {
    if count == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(null(what));
    }
    if count.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return Err(invalid(format!("{what}: {count} entries overflow the address space")));
    }
    // SAFETY: non-NULL, valid for `count` reads of `T` and not written meanwhile (the
    // caller's contract); the byte length fits in isize (checked above).
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

/// The placement of `n_chunks` chunks over a group of `group_size`: `lens[c]` elements,
/// owner `owners[c]`, and rank `r` holds chunk `c` when `holds[c * group_size + r]` is
/// not zero (the owner always holds its chunk).
///
/// # Safety
/// The arrays are NULL or readable for `n_chunks` (`lens`, `owners`) and
/// `n_chunks * group_size` (`holds`) entries.
unsafe fn placement(
    group_size: usize,
    n_chunks: usize,
    lens: *const usize,
    owners: *const usize,
    holds: *const u8,
) -> Result<Placement, Fail> {
    let cells = n_chunks.checked_mul(group_size).ok_or_else(|| invalid("n_chunks * group_size overflows"))?;
    // SAFETY: the caller's contract on each array.
    let (lens, owners, holds) =
        unsafe { (slice(lens, n_chunks, "lens")?, slice(owners, n_chunks, "owners")?, slice(holds, cells, "holds")?) };
    let extra: Vec<Vec<usize>> =
        (0..n_chunks).map(|c| (0..group_size).filter(|&r| holds[c * group_size + r] != 0).collect()).collect();
    Ok(Placement::new(group_size, lens.to_vec(), owners.to_vec())?.widen(&extra)?)
}

/// All-to-all with equal parts: `input` and `output` hold `count` elements each, `count`
/// a multiple of the group's size `n`; part `j` of `input` (`count / n` elements) goes to
/// rank `j`, and part `i` of `output` comes from rank `i`. The buffers must not overlap.
/// On error `output` is unchanged.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `input` is NULL or
/// readable and `output` NULL or writable for `count` elements of `dtype`; neither is
/// touched by others meanwhile.
#[no_mangle]
pub unsafe extern "C" fn phx_comm_all_to_all(
    comm: *mut phx_comm,
    input: *const c_void,
    output: *mut c_void,
    count: usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        let len = byte_len(count, dtype, "input")?;
        disjoint(input, len, output, len)?;
        // SAFETY: NULL or readable for `count` elements, not overlapping `output`.
        let input = unsafe { bytes(input, count, dtype, "input") }?;
        // SAFETY: NULL or writable for `count` elements (the caller's contract).
        let output = unsafe { bytes_mut(output, count, dtype, "output") }?;
        comm.all_to_all_raw(input, output, dtype)?;
        Ok(())
    })
}

/// All-to-all with uneven parts: this rank sends `send_counts[j]` elements of `input`
/// (parts in rank order, `input_count` elements in all) to rank `j`, for the
/// `group_size` ranks of the group. The counts are exchanged first, then the data: what
/// this rank receives is written to `output` (parts in rank order), how many elements
/// came from each rank to `recv_counts` (`group_size` entries) and the total to
/// `*received`.
///
/// `output_capacity` must be at least the total received; when it is not the call fails
/// with `PHX_ERR_BUFFER_TOO_SMALL` after the exchange (every rank's exchange completed),
/// with `recv_counts` and `*received` written, so the caller can size the buffer and
/// call again. On any other error the outputs are unchanged. A lost peer is not retried
/// inside the call (the counts name ranks): recompute them for the survivors.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `input` readable for
/// `input_count` elements; `send_counts` readable and `recv_counts` writable for
/// `group_size` entries; `output` writable for `output_capacity` elements; `received`
/// valid for a write. Pointers of zero-length arrays may be NULL.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_comm_all_to_all_v(
    comm: *mut phx_comm,
    input: *const c_void,
    input_count: usize,
    send_counts: *const usize,
    group_size: usize,
    output: *mut c_void,
    output_capacity: usize,
    recv_counts: *mut usize,
    received: *mut usize,
    dtype_code: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        let received = out_ptr(received, "received")?;
        let recv_counts = out_ptr(recv_counts, "recv_counts")?;
        disjoint(input, byte_len(input_count, dtype, "input")?, output, byte_len(output_capacity, dtype, "output")?)?;
        // SAFETY: the caller's contract on `send_counts`.
        let send_counts = unsafe { slice(send_counts, group_size, "send_counts") }?;
        if group_size != comm.size() {
            return Err(invalid(format!("group_size {group_size} in a group of {}", comm.size())));
        }
        // SAFETY: NULL or readable for `input_count` elements, not overlapping `output`.
        let input = unsafe { bytes(input, input_count, dtype, "input") }?;
        // SAFETY: NULL or writable for `output_capacity` elements (the caller's contract).
        let output = unsafe { bytes_mut(output, output_capacity, dtype, "output") }?;
        let (data, counts) = comm.all_to_all_v_raw(input, send_counts, dtype)?;
        let total: usize = counts.iter().sum();
        // SAFETY: `recv_counts` is writable for `group_size` entries (the caller's
        // contract) and `counts` has one per rank of the group of `group_size`.
        unsafe { std::ptr::copy_nonoverlapping(counts.as_ptr(), recv_counts, counts.len().min(group_size)) };
        // SAFETY: checked non-NULL; valid for a write (the caller's contract).
        unsafe { write_out(received, total) };
        if data.len() > output.len() {
            return Err(Fail {
                code: PHX_ERR_BUFFER_TOO_SMALL,
                message: format!("received {total} elements, output_capacity is {output_capacity}"),
            });
        }
        output[..data.len()].copy_from_slice(&data);
        Ok(())
    })
}

/// Sums sparse vectors of dimension `dim`: this rank's `nnz` pairs `(indices[k],
/// values[k])` (values of `dtype`; duplicates allowed). Every rank gets the same sum,
/// bit for bit, written densely to `output` (`dim` elements; zeros where no rank had an
/// index), and `*took_dense` says whether the density passed the crossover
/// `2·b_v / (n·(b_i + b_v))` so that the dense exchange ran (1) or the sparse one (0).
/// The sparse exchange sums each index in ascending rank order. With retry attempts in
/// the connect options, a lost peer makes the exchange run again over the survivors.
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `indices` and `values`
/// readable for `nnz` entries; `output` writable for `dim` elements and not overlapping
/// the inputs; `took_dense` valid for a write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_comm_sparse_all_reduce(
    comm: *mut phx_comm,
    dim: usize,
    indices: *const u32,
    values: *const c_void,
    nnz: usize,
    dtype_code: c_int,
    output: *mut c_void,
    took_dense: *mut c_int,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        let took_dense = out_ptr(took_dense, "took_dense")?;
        let out_len = byte_len(dim, dtype, "output")?;
        disjoint(values, byte_len(nnz, dtype, "values")?, output, out_len)?;
        disjoint(indices.cast(), nnz.saturating_mul(4), output, out_len)?;
        // SAFETY: the caller's contract on `indices` and `values`.
        let (indices, values) = unsafe { (slice(indices, nnz, "indices")?, bytes(values, nnz, dtype, "values")?) };
        // SAFETY: NULL or writable for `dim` elements, not overlapping the inputs.
        let output = unsafe { bytes_mut(output, dim, dtype, "output") }?;
        let size = dtype.size();
        match comm.sparse_all_reduce_raw(dim, indices, values, dtype)? {
            SparseReduced::Dense(v) => {
                output.copy_from_slice(&v);
                // SAFETY: checked non-NULL; valid for a write (the caller's contract).
                unsafe { write_out(took_dense, 1) };
            }
            SparseReduced::Sparse { indices, values } => {
                output.fill(0);
                for (k, &i) in indices.iter().enumerate() {
                    let at = i as usize * size;
                    output[at..at + size].copy_from_slice(&values[k * size..(k + 1) * size]);
                }
                // SAFETY: checked non-NULL; valid for a write (the caller's contract).
                unsafe { write_out(took_dense, 0) };
            }
        }
        Ok(())
    })
}

/// Sparse all-gather (FSSDP's spAG): `buf` holds a slot for every one of `n_chunks`
/// chunks in order (`count` = the sum of `lens` elements); chunk `c` has `lens[c]`
/// elements, is owned by rank `owners[c]`, and held by rank `r` when
/// `holds[c * group_size + r]` is not zero (a row-major `n_chunks x group_size` matrix;
/// the owner always holds). Afterwards every holder's slot holds the owner's bytes;
/// other slots are unchanged. `group_size` must be the group's size. On error `buf` is
/// unchanged; the call is not retried inside (the placement names ranks).
///
/// # Safety
/// `comm` is NULL or a live communicator not used concurrently; `buf` readable and
/// writable for `count` elements; `lens` and `owners` readable for `n_chunks` entries,
/// `holds` for `n_chunks * group_size`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_comm_sparse_all_gather(
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    group_size: usize,
    n_chunks: usize,
    lens: *const usize,
    owners: *const usize,
    holds: *const u8,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let dtype = dtype(dtype_code)?;
        // SAFETY: the caller's contract on the placement arrays.
        let p = unsafe { placement(group_size, n_chunks, lens, owners, holds) }?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.sparse_all_gather_raw(&p, buf, dtype)?;
        Ok(())
    })
}

/// Sparse reduce-scatter (FSSDP's spRS), with the placement as for
/// `phx_comm_sparse_all_gather`: each owner's slot becomes the combination (`op`, not
/// `PHX_OP_AVG`) of the slots of all holders of its chunk, in ascending rank order;
/// other slots are unchanged. On error `buf` is unchanged.
///
/// # Safety
/// As `phx_comm_sparse_all_gather`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn phx_comm_sparse_reduce_scatter(
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
    group_size: usize,
    n_chunks: usize,
    lens: *const usize,
    owners: *const usize,
    holds: *const u8,
) -> c_int {
    guard(|| {
        // SAFETY: NULL or a live handle used by no one else (the caller's contract).
        let comm = &mut unsafe { handle_mut(comm, "comm") }?.inner;
        let (dtype, op) = (dtype(dtype_code)?, reduce_op(op_code)?);
        // SAFETY: the caller's contract on the placement arrays.
        let p = unsafe { placement(group_size, n_chunks, lens, owners, holds) }?;
        // SAFETY: NULL or valid for `count` elements (the caller's contract).
        let buf = unsafe { bytes_mut(buf, count, dtype, "buf") }?;
        comm.sparse_reduce_scatter_raw(&p, buf, dtype, op)?;
        Ok(())
    })
}
