//! The device collectives of `phx_device_comm` other than all-reduce: reduce-scatter,
//! all-gather, broadcast, reduce, grouped send/recv and all-to-all, on either backend
//! (NCCL: device pointers and a `cudaStream_t`; the stand-in: host `float` buffers).
//! Each one is its plan (a `DeviceOp` and its buffers for the view's size) handed to
//! `device::device_call`, which resolves the handles, syncs the device communicator
//! with the view, runs the plan and reports failures the way
//! `phx_device_comm_all_reduce` documents.

use std::ffi::{c_int, c_void};

use phalanx::device::op::{DeviceOp, RawBuf};
use phalanx::DType;

use crate::args::reduce_op;
use crate::comm::phx_comm;
use crate::device::{chunks, device_call, per_rank, phx_device_comm, raw_buf};
use crate::sparse::slice;
use crate::status::Fail;

/// Reduces every member's `send` (`recv_count` elements per rank, `recv_count × size`
/// in all, `size` the view's) with `op`; shard `rank` of the result lands in `recv`
/// (`recv_count` elements), like `ncclReduceScatter`. A collective; `stream` as in
/// `phx_device_comm_all_reduce` (the stand-in ignores it).
///
/// Errors: as `phx_device_comm_all_reduce` (NULL handles or buffers, codes, float32 only
/// on the stand-in, a failed device communicator, a view that moved on); `recv` is
/// unchanged on the stand-in when it fails.
///
/// # Safety
/// `dev` and `comm` are NULL or live handles used by no one else; `send` NULL or valid
/// for reads of `recv_count × size` elements and `recv` NULL or valid for writes of
/// `recv_count` elements (host memory on the stand-in, device memory of the
/// communicator's GPU valid until `stream` has run the call on NCCL); `stream` NULL or a
/// valid stream of that GPU.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_reduce_scatter(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    send: *const c_void,
    recv: *mut c_void,
    recv_count: usize,
    dtype_code: c_int,
    op_code: c_int,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: the handles, buffers and stream are as `device_call` requires (the
    // caller's contract).
    unsafe {
        device_call(dev, comm, dtype_code, stream, |size, dt| {
            let send = raw_buf(send, per_rank(recv_count, size, "send")?, dt, "send")?;
            Ok((DeviceOp::ReduceScatter(reduce_op(op_code)?), vec![send, raw_buf(recv, recv_count, dt, "recv")?]))
        })
    }
}

/// Concatenates every member's `send` (`send_count` elements), in rank order, into
/// `recv` (`send_count × size` elements, `size` the view's), like `ncclAllGather`. A
/// collective; `stream` as in `phx_device_comm_all_reduce`.
///
/// Errors: as `phx_device_comm_all_reduce`; `recv` is unchanged on the stand-in when it
/// fails.
///
/// # Safety
/// As `phx_device_comm_reduce_scatter`, with `send` valid for reads of `send_count`
/// elements and `recv` for writes of `send_count × size`.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_all_gather(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    send: *const c_void,
    recv: *mut c_void,
    send_count: usize,
    dtype_code: c_int,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: as in `phx_device_comm_reduce_scatter`.
    unsafe {
        device_call(dev, comm, dtype_code, stream, |size, dt| {
            let recv = raw_buf(recv, per_rank(send_count, size, "recv")?, dt, "recv")?;
            Ok((DeviceOp::AllGather, vec![raw_buf(send, send_count, dt, "send")?, recv]))
        })
    }
}

/// Copies `root`'s `count` elements at `buf` into every member's `buf`, in place, like
/// `ncclBroadcast`. A collective; `stream` as in `phx_device_comm_all_reduce`.
///
/// Errors: as `phx_device_comm_all_reduce`, and `PHX_ERR_INVALID_ARGUMENT` when `root`
/// is not a rank of the view (nothing sent, the device communicator kept). On the
/// stand-in a failed call leaves `buf` unchanged.
///
/// # Safety
/// As `phx_device_comm_all_reduce`.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_broadcast(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    root: usize,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: as in `phx_device_comm_all_reduce`.
    unsafe {
        device_call(dev, comm, dtype_code, stream, |_, dt| {
            Ok((DeviceOp::Broadcast { root }, vec![raw_buf(buf, count, dt, "buf")?]))
        })
    }
}

/// Reduces every member's `count` elements at `buf` with `op` into `root`'s `buf`, in
/// place; the others' `buf` is left as it was, like `ncclReduce`. A collective;
/// `stream` as in `phx_device_comm_all_reduce`.
///
/// Errors: as `phx_device_comm_broadcast`.
///
/// # Safety
/// As `phx_device_comm_all_reduce`.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_reduce(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    buf: *mut c_void,
    count: usize,
    dtype_code: c_int,
    op_code: c_int,
    root: usize,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: as in `phx_device_comm_all_reduce`.
    unsafe {
        device_call(dev, comm, dtype_code, stream, |_, dt| {
            Ok((DeviceOp::Reduce { root, op: reduce_op(op_code)? }, vec![raw_buf(buf, count, dt, "buf")?]))
        })
    }
}

/// Sends and receives as one group, like `ncclSend`/`ncclRecv` between
/// `ncclGroupStart` and `ncclGroupEnd`: for each `i < n_sends`, `send_counts[i]`
/// elements at `send_bufs[i]` go to rank `send_peers[i]`; for each `j < n_recvs`,
/// `recv_counts[j]` elements are received from rank `recv_peers[j]` into
/// `recv_bufs[j]`. A send and the receive it meets must have the same count and dtype;
/// a rank may send to and receive from itself. Every member of the view calls it,
/// possibly with nothing to send or receive (the stand-in's groups are collectives, and
/// each call first brings the device communicator to the view). `stream` as in
/// `phx_device_comm_all_reduce`.
///
/// Errors: as `phx_device_comm_all_reduce`; `PHX_ERR_NULL` for a NULL array of more
/// than zero entries; `PHX_ERR_INVALID_ARGUMENT` for a peer that is not a rank of the
/// view (nothing sent, the device communicator kept). A receive that meets no send, or
/// a count that differs from its send's, fails the group on the stand-in
/// (`PHX_ERR_DEVICE`; on NCCL it is undefined: it may hang until the communicator is
/// aborted). On the stand-in a failed call leaves every receive buffer unchanged.
///
/// # Safety
/// `dev` and `comm` are NULL or live handles used by no one else; each of the six
/// arrays is NULL or valid for reads of its `n_sends` / `n_recvs` entries; each buffer
/// is NULL or valid (reads for sends, writes for receives) for its count of elements,
/// in host memory on the stand-in or device memory of the communicator's GPU valid until
/// `stream` has run the call on NCCL; `stream` NULL or a valid stream of that GPU.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_send_recv(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    send_peers: *const usize,
    send_bufs: *const *const c_void,
    send_counts: *const usize,
    n_sends: usize,
    recv_peers: *const usize,
    recv_bufs: *const *mut c_void,
    recv_counts: *const usize,
    n_recvs: usize,
    dtype_code: c_int,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: as documented: the arrays hold their entries, the buffers and stream are
    // as `device_call` requires (the caller's contract).
    unsafe {
        device_call(dev, comm, dtype_code, stream, |_, dt| {
            let (sends, mut bufs) = group_side(send_peers, send_bufs.cast(), send_counts, n_sends, dt, "send")?;
            let (recvs, recv_bufs) = group_side(recv_peers, recv_bufs.cast(), recv_counts, n_recvs, dt, "recv")?;
            bufs.extend(recv_bufs);
            Ok((DeviceOp::SendRecv { sends, recvs }, bufs))
        })
    }
}

/// One side (the sends or the receives) of `phx_device_comm_send_recv`: the peer and
/// the buffer of each of its `n` entries; `what` names them in errors.
///
/// # Safety
/// Each array is NULL or valid for reads of `n` entries.
unsafe fn group_side(
    peers: *const usize,
    bufs: *const *const c_void,
    counts: *const usize,
    n: usize,
    dt: DType,
    what: &str,
) -> Result<(Vec<usize>, Vec<RawBuf>), Fail> {
    // SAFETY: NULL or valid for `n` entries (the caller's contract); each is checked.
    let (peers, bufs, counts) = unsafe {
        (
            slice(peers, n, &format!("{what}_peers"))?,
            slice(bufs, n, &format!("{what}_bufs"))?,
            slice(counts, n, &format!("{what}_counts"))?,
        )
    };
    let bufs = (0..n).map(|i| raw_buf(bufs[i], counts[i], dt, what)).collect::<Result<_, _>>()?;
    Ok((peers.to_vec(), bufs))
}

/// All-to-all with equal chunks: chunk `j` of `send` (`count` elements at `send + j ×
/// count`) goes to rank `j`, and chunk `j` of `recv` is filled from rank `j`'s chunk
/// for this rank; `send` and `recv` hold `count × size` elements (`size` the view's).
/// One group of sends and receives (`ncclGroupStart`, a send and a receive per rank,
/// `ncclGroupEnd`). A collective; `stream` as in `phx_device_comm_all_reduce`.
///
/// Errors: as `phx_device_comm_all_reduce`; `recv` is unchanged on the stand-in when it
/// fails.
///
/// # Safety
/// As `phx_device_comm_reduce_scatter`, with `send` valid for reads and `recv` for
/// writes of `count × size` elements, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn phx_device_comm_all_to_all(
    dev: *mut phx_device_comm,
    comm: *mut phx_comm,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype_code: c_int,
    stream: *mut c_void,
) -> c_int {
    // SAFETY: as in `phx_device_comm_reduce_scatter`.
    unsafe {
        device_call(dev, comm, dtype_code, stream, |size, dt| {
            let mut bufs = chunks(send, count, size, dt, "send")?;
            bufs.extend(chunks(recv, count, size, dt, "recv")?);
            Ok((DeviceOp::all_to_all(size), bufs))
        })
    }
}
