//! [`DeviceOp`]: one device collective as data, run on any [`DeviceComm`] with its
//! buffers in a fixed order. The C and Python faces describe a call with it once and run
//! it on either backend (the stand-in's host vectors, NCCL's device buffers), so the
//! dispatch is written once; [`DeviceOp::written`] says which buffers a call writes
//! (the ones a device-side backup would keep). The faces give buffers as addresses
//! ([`RawBuf`]); [`run_on_host`] runs an op on the stand-in with host float32 memory and
//! `run_on_nccl` (feature `nccl`) on NCCL with device memory and a stream: the one path
//! of every NCCL call of the C and Python faces.
//!
//! Buffer order:
//!
//! | op              | buffers                           | written        |
//! |-----------------|-----------------------------------|----------------|
//! | `AllReduce`     | `[buf]`                           | `buf`          |
//! | `ReduceScatter` | `[send, recv]`                    | `recv`         |
//! | `AllGather`     | `[send, recv]`                    | `recv`         |
//! | `Broadcast`     | `[buf]`                           | `buf`          |
//! | `Reduce`        | `[buf]`                           | `buf` (root's) |
//! | `SendRecv`      | `[sends.., recvs..]`              | the receives   |

use super::session::DeviceSession;
use super::standin::{StandIn, StandInComm};
use super::{DeviceBackend, DeviceComm, DeviceError};
use crate::dtype::{DType, ReduceOp};
use crate::error::Error;
use crate::Communicator;

/// A device collective and its arguments other than buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    /// [`DeviceComm::all_reduce`].
    AllReduce(ReduceOp),
    /// [`DeviceComm::reduce_scatter`].
    ReduceScatter(ReduceOp),
    /// [`DeviceComm::all_gather`].
    AllGather,
    /// [`DeviceComm::broadcast`] from `root`.
    Broadcast {
        /// The rank whose buffer is copied.
        root: usize,
    },
    /// [`DeviceComm::reduce`] into `root`.
    Reduce {
        /// The rank that receives the result.
        root: usize,
        /// The reduction.
        op: ReduceOp,
    },
    /// [`DeviceComm::send_recv`]: buffer `i` goes to `sends[i]`, buffer
    /// `sends.len() + j` is filled from `recvs[j]`.
    SendRecv {
        /// The peer of each send, in buffer order.
        sends: Vec<usize>,
        /// The peer of each receive, in buffer order (after the sends).
        recvs: Vec<usize>,
    },
}

impl DeviceOp {
    /// All-to-all on `size` ranks with equal chunks: one group that sends chunk `j` of
    /// the send buffer to rank `j` and fills chunk `j` of the receive buffer from rank
    /// `j`. Its buffers are the `size` send chunks, then the `size` receive chunks.
    pub fn all_to_all(size: usize) -> DeviceOp {
        DeviceOp::SendRecv { sends: (0..size).collect(), recvs: (0..size).collect() }
    }

    /// How many buffers the op takes.
    pub fn buffers(&self) -> usize {
        match self {
            DeviceOp::AllReduce(_) | DeviceOp::Broadcast { .. } | DeviceOp::Reduce { .. } => 1,
            DeviceOp::ReduceScatter(_) | DeviceOp::AllGather => 2,
            DeviceOp::SendRecv { sends, recvs } => sends.len() + recvs.len(),
        }
    }

    /// Whether the op writes its buffer `i` (on some rank).
    pub fn written(&self, i: usize) -> bool {
        match self {
            DeviceOp::AllReduce(_) | DeviceOp::Broadcast { .. } | DeviceOp::Reduce { .. } => i == 0,
            DeviceOp::ReduceScatter(_) | DeviceOp::AllGather => i == 1,
            DeviceOp::SendRecv { sends, recvs } => i >= sends.len() && i < sends.len() + recvs.len(),
        }
    }

    /// Whether the op reads its buffer `i` (a buffer only written may start
    /// uninitialised).
    pub fn reads(&self, i: usize) -> bool {
        match self {
            DeviceOp::SendRecv { sends, .. } => i < sends.len(),
            _ => i == 0,
        }
    }

    /// Checks the root or peers against a communicator of `size` ranks, before anything
    /// is sent: a bad argument must not fail the communicator.
    pub fn check(&self, size: usize) -> Result<(), DeviceError> {
        let bad = |what: &str, r: usize| DeviceError::InvalidArgument(format!("{what} {r} of {size} ranks"));
        match self {
            DeviceOp::Broadcast { root } | DeviceOp::Reduce { root, .. } if *root >= size => Err(bad("root", *root)),
            DeviceOp::SendRecv { sends, recvs } => match sends.iter().chain(recvs).find(|&&p| p >= size) {
                Some(&p) => Err(bad("peer", p)),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Runs the op on `comm` with `bufs` in the order of the module's table.
    pub fn run<C: DeviceComm>(&self, comm: &mut C, bufs: &mut [C::Buffer]) -> Result<(), DeviceError> {
        if bufs.len() != self.buffers() {
            return Err(DeviceError::InvalidArgument(format!(
                "{self:?} takes {} buffers, {} given",
                self.buffers(),
                bufs.len()
            )));
        }
        match (self, bufs) {
            (DeviceOp::AllReduce(op), [buf]) => comm.all_reduce(buf, *op),
            (DeviceOp::ReduceScatter(op), [send, recv]) => comm.reduce_scatter(send, recv, *op),
            (DeviceOp::AllGather, [send, recv]) => comm.all_gather(send, recv),
            (DeviceOp::Broadcast { root }, [buf]) => comm.broadcast(buf, *root),
            (DeviceOp::Reduce { root, op }, [buf]) => comm.reduce(buf, *root, *op),
            (DeviceOp::SendRecv { sends, recvs }, bufs) => {
                let (s, r) = bufs.split_at_mut(sends.len());
                let sends: Vec<(usize, &C::Buffer)> = sends.iter().copied().zip(s.iter()).collect();
                let mut recvs: Vec<(usize, &mut C::Buffer)> = recvs.iter().copied().zip(r.iter_mut()).collect();
                comm.send_recv(&sends, &mut recvs)
            }
            // Unreachable: the count was checked above and each op's arm takes any
            // slice of its count.
            (op, bufs) => Err(DeviceError::InvalidArgument(format!("{op:?} with {} buffers", bufs.len()))),
        }
    }
}

/// One buffer of a face's call, as an address: `count` elements of `dtype` at `addr`
/// (host memory on the stand-in, device memory on NCCL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBuf {
    /// The address of the first element.
    pub addr: usize,
    /// Elements.
    pub count: usize,
    /// Element type.
    pub dtype: DType,
}

impl RawBuf {
    /// `n` buffers of `count / n` elements each, back to back from this one's start
    /// (all-to-all's chunks, one per rank; a remainder is left out).
    pub fn chunks(self, n: usize) -> Vec<RawBuf> {
        let count = self.count / n.max(1);
        (0..n).map(|j| RawBuf { addr: self.addr + j * count * self.dtype.size(), count, dtype: self.dtype }).collect()
    }
}

/// Runs `op` on the stand-in with host float32 buffers: copies those it reads into
/// vectors, runs it, and writes back those it writes only when it succeeded, so a failed
/// call changes none. Another element type is an [`DeviceError::InvalidArgument`].
///
/// # Safety
/// Each buffer is host memory of `count` `f32`s (any alignment), valid for reads if the op
/// reads it ([`DeviceOp::reads`]) and for writes if it writes it, accessed by no one
/// else during the call.
pub unsafe fn run_on_host(op: &DeviceOp, comm: &mut StandInComm, bufs: &[RawBuf]) -> Result<(), DeviceError> {
    if let Some(b) = bufs.iter().find(|b| b.dtype != DType::F32) {
        return Err(DeviceError::InvalidArgument(format!("the stand-in works on f32 buffers only, not {}", b.dtype)));
    }
    let mut host: Vec<Vec<f32>> = Vec::with_capacity(bufs.len());
    for (i, b) in bufs.iter().enumerate() {
        host.push(if op.reads(i) && b.count > 0 {
            // SAFETY: readable host memory of `count` f32s (the caller's contract), read
            // as bytes (no alignment needed) and copied out at once.
            let bytes = unsafe { std::slice::from_raw_parts(b.addr as *const u8, b.count * 4) };
            bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect()
        } else {
            vec![0.0; b.count]
        });
    }
    op.run(comm, &mut host)?;
    for (i, (b, h)) in bufs.iter().zip(&host).enumerate() {
        if op.written(i) && b.count > 0 && h.len() == b.count {
            // SAFETY: writable host memory of `count` f32s that no one else accesses
            // (the caller's contract), written as bytes; each buffer is written alone.
            let out = unsafe { std::slice::from_raw_parts_mut(b.addr as *mut u8, b.count * 4) };
            for (c, v) in out.chunks_exact_mut(4).zip(h) {
                c.copy_from_slice(&v.to_ne_bytes());
            }
        }
    }
    Ok(())
}

/// Runs `op` on NCCL, enqueued on `stream` (a `cudaStream_t`; NULL for the legacy
/// default stream), and waits for it: the one path of every NCCL call of the C and
/// Python faces. Each buffer the op writes ([`DeviceOp::written`]) is first copied in
/// device memory; on failure the communicator is aborted and those buffers are put
/// back ([`crate::device::memory::with_backups`]), so a failed call leaves them as they
/// were, as on the CPU path. The call returns once the stream has run it.
///
/// # Safety
/// `stream` is NULL or a valid stream of the communicator's device; each buffer is
/// device memory of that device valid for `count` elements of `dtype` until the stream
/// has run the call.
#[cfg(feature = "nccl")]
pub unsafe fn run_on_nccl(
    op: &DeviceOp,
    comm: &mut super::nccl::NcclComm,
    stream: *mut std::ffi::c_void,
    bufs: &[RawBuf],
) -> Result<(), DeviceError> {
    use super::nccl::DeviceBuffer;
    // SAFETY: NULL or a valid stream of the communicator's device (the caller's contract).
    unsafe { comm.set_stream(stream) };
    let mut device: Vec<DeviceBuffer> = (bufs.iter())
        // SAFETY: device memory valid for `count` elements of `dtype` until the stream has
        // run the call (the caller's contract).
        .map(|b| unsafe { DeviceBuffer::from_raw(b.addr as *mut std::ffi::c_void, b.count, b.dtype) })
        .collect();
    super::memory::with_backups(comm, &mut device, |i| op.written(i), |c, bufs| op.run(c, bufs))
}

/// Whether NCCL has the element type `dtype` (it has no 16-bit integers). The faces
/// refuse the others before anything is sent, so that a bad argument does not fail the
/// communicator.
pub fn nccl_has(dtype: DType) -> bool {
    !matches!(dtype, DType::I16 | DType::U16)
}

/// One collective of a face (C, Python) on `session`'s device communicator: brings it to
/// `comm`'s view ([`DeviceSession::sync`]), asks `plan` for the op and its buffers for
/// that view's size, checks the op's root or peers (an [`Error::InvalidArgument`] that
/// leaves the communicator as it was), then `run`s it. A device error from `run` fails
/// the session's communicator ([`DeviceSession::failed`]: revoked or aborted; the next
/// call's `sync` makes a new one, the next generation of the view if it did not move)
/// and is returned as [`Error::Device`].
pub fn run_in_session<B: DeviceBackend, T, E: From<Error>>(
    session: &mut DeviceSession<B>,
    comm: &mut Communicator,
    plan: impl FnOnce(usize) -> Result<(DeviceOp, T), E>,
    run: impl FnOnce(&mut B::Comm, &DeviceOp, T) -> Result<(), DeviceError>,
) -> Result<(), E> {
    let d = session.sync(comm)?;
    let (op, bufs) = plan(d.size())?;
    op.check(d.size()).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    if let Err(e) = run(d, &op, bufs) {
        session.failed(e.clone());
        return Err(Error::Device(e).into());
    }
    Ok(())
}

/// A planned collective on the stand-in: [`run_in_session`] with [`run_on_host`], so the
/// buffers it writes are written back only when it succeeds. The one path of the C and
/// Python faces' stand-in calls.
///
/// # Safety
/// The buffers `plan` returns are as [`run_on_host`] requires.
pub unsafe fn run_planned_on_host<E: From<Error>>(
    session: &mut DeviceSession<StandIn>,
    comm: &mut Communicator,
    plan: impl FnOnce(usize) -> Result<(DeviceOp, Vec<RawBuf>), E>,
) -> Result<(), E> {
    run_in_session(session, comm, plan, |d, op, bufs| {
        // SAFETY: the buffers are as `run_on_host` requires (the caller's contract).
        unsafe { run_on_host(op, d, &bufs) }
    })
}

/// A planned collective on NCCL, enqueued on `stream`: [`run_in_session`] with
/// [`run_on_nccl`] (a device-side backup of the buffers the op writes; it waits for the
/// stream). The one path of every NCCL call of the C and Python faces.
///
/// # Safety
/// `stream` and the buffers `plan` returns are as [`run_on_nccl`] requires.
#[cfg(feature = "nccl")]
pub unsafe fn run_planned_on_nccl<E: From<Error>>(
    session: &mut DeviceSession<super::nccl::NcclBackend>,
    comm: &mut Communicator,
    stream: *mut std::ffi::c_void,
    plan: impl FnOnce(usize) -> Result<(DeviceOp, Vec<RawBuf>), E>,
) -> Result<(), E> {
    run_in_session(session, comm, plan, |d, op, bufs| {
        // SAFETY: `stream` and the buffers are as `run_on_nccl` requires (the caller's
        // contract).
        unsafe { run_on_nccl(op, d, stream, &bufs) }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::standin::StandIn;
    use crate::device::{Capabilities, DeviceBackend};

    /// Runs `ops(rank)` on every rank of a 3-rank stand-in group, one thread each, and
    /// returns each rank's buffers after it.
    fn on_three(make: impl Fn(usize) -> (DeviceOp, Vec<Vec<f32>>) + Sync) -> Vec<Vec<Vec<f32>>> {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(10));
        let id = backend.unique_id().expect("id");
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let (backend, make) = (backend.clone(), &make);
                    s.spawn(move || {
                        let mut comm = backend.init(&id, rank, 3).expect("init");
                        let (op, mut bufs) = make(rank);
                        op.check(3).expect("valid");
                        op.run(&mut comm, &mut bufs).expect("run");
                        bufs
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    #[test]
    fn every_op_runs_in_table_order() {
        let r =
            on_three(|rank| (DeviceOp::ReduceScatter(ReduceOp::Sum), vec![vec![rank as f32 + 1.0; 6], vec![0.0; 2]]));
        assert!(r.iter().all(|b| b[1] == [6.0, 6.0]));
        let r = on_three(|rank| (DeviceOp::AllGather, vec![vec![rank as f32; 1], vec![9.0; 3]]));
        assert!(r.iter().all(|b| b[1] == [0.0, 1.0, 2.0]));
        let r = on_three(|rank| (DeviceOp::Broadcast { root: 2 }, vec![vec![rank as f32; 2]]));
        assert!(r.iter().all(|b| b[0] == [2.0, 2.0]));
        let r = on_three(|rank| (DeviceOp::Reduce { root: 1, op: ReduceOp::Max }, vec![vec![rank as f32; 2]]));
        assert_eq!(r.iter().map(|b| b[0][0]).collect::<Vec<_>>(), [0.0, 2.0, 2.0]);
        // All-to-all: rank r sends 10 r + j to rank j; rank j gets 10 r + j from r.
        let r = on_three(|rank| {
            let mut bufs: Vec<Vec<f32>> = (0..3).map(|j| vec![(10 * rank + j) as f32]).collect();
            bufs.extend((0..3).map(|_| vec![-1.0]));
            (DeviceOp::all_to_all(3), bufs)
        });
        for (rank, b) in r.iter().enumerate() {
            let got: Vec<f32> = b[3..].iter().map(|c| c[0]).collect();
            assert_eq!(got, (0..3).map(|src| (10 * src + rank) as f32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn host_buffers_are_written_back_only_on_success() {
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(1));
        let mut comm = backend.init(&backend.unique_id().expect("id"), 0, 1).expect("init");
        let (send, mut recv) = ([1.0f32, 2.0, 3.0, 4.0], [9.0f32; 4]);
        let raw = |p: *const f32, count| RawBuf { addr: p as usize, count, dtype: DType::F32 };
        let bufs = [raw(send.as_ptr(), 4), raw(recv.as_mut_ptr(), 4)];
        let halves = raw(send.as_ptr(), 4).chunks(2);
        assert_eq!(halves[1], raw(send[2..].as_ptr(), 2));
        // SAFETY: live arrays of the given lengths, used by nothing else meanwhile.
        unsafe { run_on_host(&DeviceOp::AllGather, &mut comm, &bufs) }.expect("all-gather of one rank");
        assert_eq!(recv, send);
        recv = [9.0; 4];
        let bufs = [raw(send.as_ptr(), 4), raw(recv.as_mut_ptr(), 2)];
        // SAFETY: as above (the receive buffer is shorter, which the stand-in refuses).
        assert!(unsafe { run_on_host(&DeviceOp::AllGather, &mut comm, &bufs) }.is_err());
        assert_eq!(recv, [9.0; 4]);
        let wide = RawBuf { dtype: DType::F64, ..bufs[0] };
        // SAFETY: refused before any memory is touched.
        assert!(unsafe { run_on_host(&DeviceOp::AllReduce(ReduceOp::Sum), &mut comm, &[wide]) }.is_err());
    }

    #[test]
    fn roots_peers_and_buffer_counts_are_checked() {
        assert!(DeviceOp::Broadcast { root: 3 }.check(3).is_err());
        assert!(DeviceOp::Reduce { root: 2, op: ReduceOp::Sum }.check(3).is_ok());
        assert!(DeviceOp::SendRecv { sends: vec![0], recvs: vec![5] }.check(3).is_err());
        assert!(DeviceOp::all_to_all(3).check(3).is_ok());
        let op = DeviceOp::SendRecv { sends: vec![1, 2], recvs: vec![0] };
        assert_eq!(op.buffers(), 3);
        assert_eq!((0..4).map(|i| op.written(i)).collect::<Vec<_>>(), [false, false, true, false]);
        assert!(DeviceOp::AllGather.written(1) && !DeviceOp::AllGather.written(0));
        assert!(DeviceOp::AllGather.reads(0) && !DeviceOp::AllGather.reads(1));
        assert!(nccl_has(DType::BF16) && nccl_has(DType::U8) && !nccl_has(DType::I16) && !nccl_has(DType::U16));
        assert!(DeviceOp::Broadcast { root: 0 }.reads(0) && op.reads(1) && !op.reads(2));
        let backend = StandIn::new(Capabilities::ALL, Duration::from_secs(1));
        let mut comm = backend.init(&backend.unique_id().expect("id"), 0, 1).expect("init");
        let err = DeviceOp::AllGather.run(&mut comm, &mut [vec![1.0]]).expect_err("one buffer of two");
        assert!(err.to_string().contains("takes 2 buffers"), "{err}");
    }
}
