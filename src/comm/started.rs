//! Non-blocking starts of the sparse collectives and of the all-to-all with a known
//! count matrix: [`Communicator::sparse_all_gather_start`],
//! [`Communicator::sparse_reduce_scatter_start`] and [`Communicator::all_to_all_start`].
//!
//! Like [`Communicator::all_reduce_start`]: the buffers are moved in, the collective
//! runs as a task of the communicator's runtime while the caller computes, and `wait`
//! gives the outcome with the buffers back, exactly as they were passed on error.
//! Started collectives are numbered when started: every rank starts them (and calls
//! its blocking collectives) in the same order. They are not retried.

use std::marker::PhantomData;

use super::{elements, peer, Communicator, PendingRaw};
use crate::collective::Collective;
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::plan::sparse::Placement;

/// A collective on one owned buffer started by
/// [`Communicator::sparse_all_gather_start`] or
/// [`Communicator::sparse_reduce_scatter_start`].
pub struct Pending<T: Element> {
    raw: PendingRaw,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element> Pending<T> {
    /// Waits for the collective: its outcome and the buffer, its result on success,
    /// exactly as passed on error.
    pub fn wait(self) -> (Result<()>, Vec<T>) {
        let (result, bytes) = self.raw.wait();
        (result, bytemuck::allocation::pod_collect_to_vec(&bytes))
    }

    /// Whether the collective has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.raw.is_finished()
    }
}

/// An all-to-all started by [`Communicator::all_to_all_start`].
pub struct PendingAllToAll<T: Element> {
    raw: PendingRaw,
    input_len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element> PendingAllToAll<T> {
    /// Waits for the all-to-all: what this rank received (parts in rank order) or the
    /// error, and the input as it was passed.
    pub fn wait(self) -> (Result<Vec<T>>, Vec<T>) {
        let (result, mut bytes) = self.raw.wait();
        let received = bytes.split_off(self.input_len.min(bytes.len()));
        let input = bytemuck::allocation::pod_collect_to_vec(&bytes);
        (result.map(|()| bytemuck::allocation::pod_collect_to_vec(&received)), input)
    }

    /// Whether the all-to-all has finished (`wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.raw.is_finished()
    }
}

impl Communicator {
    /// Starts [`Communicator::sparse_all_gather`] of `buf` and returns at once.
    pub fn sparse_all_gather_start<T: Element>(&mut self, placement: &Placement, buf: Vec<T>) -> Result<Pending<T>> {
        self.check_placement(placement, buf.len())?;
        let coll = Collective::SparseAllGather { placement: placement.clone() };
        let raw = self.start_mapped(coll, T::DTYPE, ReduceOp::Sum, bytemuck::cast_slice(&buf).to_vec(), None)?;
        Ok(Pending { raw, _t: PhantomData })
    }

    /// Starts [`Communicator::sparse_reduce_scatter`] of `buf` and returns at once.
    pub fn sparse_reduce_scatter_start<T: Element>(
        &mut self,
        placement: &Placement,
        buf: Vec<T>,
        op: ReduceOp,
    ) -> Result<Pending<T>> {
        if op == ReduceOp::Avg {
            return Err(Error::InvalidArgument("sparse reduce-scatter does not average; use Sum and divide".into()));
        }
        self.check_placement(placement, buf.len())?;
        let len = std::mem::size_of_val(buf.as_slice());
        let mut work = Vec::with_capacity(len + placement.scratch_len() * T::DTYPE.size());
        work.extend_from_slice(bytemuck::cast_slice(&buf));
        work.resize(len + placement.scratch_len() * T::DTYPE.size(), 0);
        let coll = Collective::SparseReduceScatter { placement: placement.clone() };
        let raw = self.start_mapped(coll, T::DTYPE, op, work, Some(len))?;
        Ok(Pending { raw, _t: PhantomData })
    }

    /// Starts an all-to-all whose whole count matrix every rank knows: rank `i` sends
    /// `counts[i][j]` elements to rank `j`, this rank's parts in `input` in rank order.
    /// Unlike [`Communicator::all_to_all_v`] no counts are exchanged first, so it
    /// starts at once; every rank must pass the same matrix (a different one is a
    /// [`Error::Mismatch`]).
    pub fn all_to_all_start<T: Element>(
        &mut self,
        input: Vec<T>,
        counts: Vec<Vec<usize>>,
    ) -> Result<PendingAllToAll<T>> {
        let (rank, size) = self.call_group()?;
        if counts.len() != size || counts.iter().any(|row| row.len() != size) {
            return Err(Error::InvalidArgument(format!(
                "an all-to-all count matrix of a group of {size} is {size}×{size}"
            )));
        }
        let send = counts[rank].iter().try_fold(0usize, |a, &c| a.checked_add(c));
        let recv = counts.iter().try_fold(0usize, |a, row| a.checked_add(row[rank]));
        let (Some(send), Some(recv)) = (send, recv) else {
            return Err(Error::InvalidArgument("all-to-all counts overflow".into()));
        };
        if send != input.len() {
            return Err(Error::InvalidArgument(format!(
                "input holds {} elements, row {rank} of the counts sums to {send}",
                input.len()
            )));
        }
        let size_of = T::DTYPE.size();
        let input_len = std::mem::size_of_val(input.as_slice());
        let total = recv.checked_mul(size_of).and_then(|r| r.checked_add(input_len));
        let total = total.ok_or_else(|| Error::InvalidArgument("all-to-all receive area overflows".into()))?;
        let mut work = Vec::with_capacity(total);
        work.extend_from_slice(bytemuck::cast_slice(&input));
        work.resize(total, 0);
        let raw = self.start_mapped(Collective::AllToAll { counts }, T::DTYPE, ReduceOp::Sum, work, None)?;
        Ok(PendingAllToAll { raw, input_len, _t: PhantomData })
    }

    /// Starts `coll` on `work`; with `keep`, the buffer handed back (on success and
    /// on error alike) is cut to its first `keep` bytes.
    fn start_mapped(
        &mut self,
        coll: Collective,
        dtype: DType,
        op: ReduceOp,
        work: Vec<u8>,
        keep: Option<usize>,
    ) -> Result<PendingRaw> {
        elements(work.len(), dtype, "buffer")?;
        let runtime = self.runtime.clone();
        let _guard = runtime.enter();
        let task: peer::Started = self.peer_mut()?.start(coll, dtype, op, work);
        let task = match keep {
            None => task,
            Some(keep) => tokio::spawn(async move {
                match task.await {
                    Ok((result, mut buf)) => {
                        buf.truncate(keep);
                        (result, buf)
                    }
                    Err(e) => (Err(Error::Aborted { reason: format!("collective task failed: {e}") }), Vec::new()),
                }
            }),
        };
        Ok(PendingRaw { task, runtime: runtime.clone() })
    }
}

/// What a planned all-to-all's planner gives: the count matrix (elements,
/// `matrix[from][to]`), this rank's send area, and a value handed back with the result.
pub(crate) type Planned<X> = (Vec<Vec<usize>>, Vec<u8>, X);

/// The planner's value and the bytes of the send area at the front of the buffer.
type Sent<X> = (X, usize);

/// An all-to-all started by [`Communicator::all_to_all_planned_start`].
pub(crate) struct PendingPlanned<X> {
    /// The all-to-all's buffer, with the planner's value and the send area's length.
    task: tokio::task::JoinHandle<Result<(Vec<u8>, Sent<X>)>>,
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
}

impl<X> PendingPlanned<X> {
    /// Waits for both collectives: the bytes this rank received (parts in rank order)
    /// and the planner's value, or the error.
    pub(crate) fn wait(self) -> Result<(Vec<u8>, X)> {
        super::not_in_runtime("wait")?;
        let (mut buf, (value, send_len)) = self
            .runtime
            .block_on(self.task)
            .map_err(|e| Error::Aborted { reason: format!("collective task failed: {e}") })??;
        Ok((buf.split_off(send_len.min(buf.len())), value))
    }

    /// Whether both have finished (`wait` would not block).
    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Communicator {
    /// Starts an all-gather of `mine` (equal lengths on every rank) and, numbered right
    /// after it, an all-to-all of `dtype` elements that `plan` builds from the gathered
    /// counts (every rank's `mine`, rank after rank): both run in the background, so
    /// the caller goes on at once. Every rank's `plan` must give the same matrix from
    /// the same counts (a refusal too: then every rank's all-to-all fails with it).
    pub(crate) fn all_to_all_planned_start<X: Send + 'static>(
        &mut self,
        mine: &[u64],
        dtype: DType,
        plan: impl FnOnce(&[u64]) -> Result<Planned<X>> + Send + 'static,
    ) -> Result<PendingPlanned<X>> {
        let (rank, size) = self.call_group()?;
        let len = mine.len();
        let mut work = vec![0u8; size * len * 8];
        work[rank * len * 8..(rank + 1) * len * 8].copy_from_slice(bytemuck::cast_slice(mine));
        let first = (Collective::AllGather { counts: vec![len; size] }, DType::U64, work);
        // Every rank begins the all-to-all under this fingerprint, its counts not known
        // yet; every rank derives the same matrix from the same gathered counts.
        let second_call = Collective::AllToAll { counts: Vec::new() }.fingerprint(dtype, ReduceOp::Sum);
        let then = move |gathered: Vec<u8>| {
            let all: Vec<u64> = bytemuck::allocation::pod_collect_to_vec(&gathered);
            let (matrix, send, value) = plan(&all)?;
            if matrix.len() != size || matrix.iter().any(|row| row.len() != size) {
                return Err(Error::InvalidArgument(format!(
                    "an all-to-all count matrix of a group of {size} is {size}×{size}"
                )));
            }
            let recv = matrix.iter().try_fold(0usize, |a, row| a.checked_add(row[rank]));
            let total = recv.and_then(|r| r.checked_mul(dtype.size())).and_then(|r| r.checked_add(send.len()));
            let total =
                total.ok_or_else(|| Error::Mismatch { detail: "all-to-all counts overflow a buffer".into() })?;
            let send_len = send.len();
            let mut work = send;
            work.resize(total, 0);
            Ok((Collective::AllToAll { counts: matrix }, work, (value, send_len)))
        };
        let runtime = self.runtime.clone();
        let _guard = runtime.enter();
        let task = self.peer_mut()?.start_then(first, second_call, dtype, then);
        Ok(PendingPlanned { task, runtime: runtime.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a local group of 3, each on its own thread; aborts the
    /// process if the group takes longer than 30 s.
    fn on_group<R: Send>(f: impl Fn(&mut Communicator) -> R + Sync) -> Vec<R> {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let timeout = std::sync::mpsc::RecvTimeoutError::Timeout;
            if wait.recv_timeout(std::time::Duration::from_secs(30)) == Err(timeout) {
                eprintln!("test exceeded 30 s: aborting");
                std::process::abort();
            }
        });
        let comms = Communicator::local_group(3, Default::default()).expect("local group");
        let out = std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || f(&mut c))).collect();
            hs.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        let _ = done.send(());
        let _ = watchdog.join();
        out
    }

    #[test]
    fn a_planned_all_to_all_moves_what_the_counts_plan() {
        let out = on_group(|c| {
            let r = c.rank();
            // Rank r sends r + 1 elements to every rank, each its own number.
            let mine = vec![r as u64 + 1];
            let pending = c
                .all_to_all_planned_start(&mine, DType::U32, move |all: &[u64]| {
                    let matrix: Vec<Vec<usize>> = all.iter().map(|&n| vec![n as usize; 3]).collect();
                    let send: Vec<u32> = vec![r as u32; 3 * (r + 1)];
                    Ok((matrix, bytemuck::cast_slice(&send).to_vec(), all.to_vec()))
                })
                .expect("start");
            let (bytes, all) = pending.wait().expect("planned all-to-all");
            (bytemuck::allocation::pod_collect_to_vec::<u8, u32>(&bytes), all)
        });
        for (received, all) in out {
            assert_eq!(all, vec![1, 2, 3]);
            assert_eq!(received, vec![0, 1, 1, 2, 2, 2]);
        }
    }

    /// A planner that refuses on every rank fails every rank's exchange with its error
    /// (the all-to-all begun for it is abandoned), and the group goes on.
    #[test]
    fn a_refused_plan_fails_alike_and_the_group_goes_on() {
        let out = on_group(|c| {
            let pending = c
                .all_to_all_planned_start(&[1], DType::U8, |_: &[u64]| -> Result<Planned<()>> {
                    Err(Error::Mismatch { detail: "refused by the planner".into() })
                })
                .expect("start");
            let err = pending.wait().expect_err("refused");
            let mut x = vec![1u32; 4];
            c.all_reduce(&mut x, ReduceOp::Sum).expect("the next collective");
            (err, x)
        });
        for (err, x) in out {
            assert!(err.to_string().contains("refused by the planner"), "{err}");
            assert_eq!(x, vec![3; 4]);
        }
    }
}
