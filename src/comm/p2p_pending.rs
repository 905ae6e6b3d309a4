//! Non-blocking point-to-point messages: [`Communicator::isend`] and
//! [`Communicator::irecv`] start a message and return a handle at once, so that a
//! pipeline stage computes while its activations and gradients travel.
//!
//! See [`PendingP2p`] for the rules.

use std::sync::Arc;

use super::p2p::Dir;
use super::{elements, not_in_runtime, peer, Communicator};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::plan::Rank;

/// A message started by [`Communicator::isend`] or [`Communicator::irecv`].
///
/// A started message runs as a task on the communicator's runtime, with the same
/// messages, buffering and failures as the blocking [`Communicator::send`] and
/// [`Communicator::recv`]: an `isend` matches a `recv` and the other
/// way round. The handle owns the buffer; [`PendingP2p::wait`] returns the outcome
/// with the buffer (received into on success; as it was passed on error, for a send
/// and for a receive alike).
///
/// # Rules
///
/// - **Order.** Calls on the same `(peer, tag, direction)`, blocking or not, run in the
///   order this thread made them: the second `irecv(1, 7, ..)` receives the second
///   message with tag 7 from rank 1, whichever handle is waited on first, and a
///   blocking `recv(1, 7, ..)` made after them waits for both. Calls on different
///   peers, tags or directions run concurrently and complete in any order.
/// - **No deadlock between handles.** Any number of messages may be in flight at once,
///   in both directions: two ranks that each `isend` a large message to the other and
///   then `irecv` from it both complete (with blocking calls the same order may block
///   both sends once the transport's buffers fill). The buffering bound of blocking sends
///   still applies to what a sender runs ahead on tags the receiver does not read.
/// - **View changes.** A message belongs to the view in which its task runs, as a
///   blocking call does: when the view changes while it is in flight it fails with
///   [`Error::PeerLost`] if the peer left, [`Error::Aborted`] otherwise.
/// - **Dropping a handle** does not cancel the message (cancelling one half-received
///   would corrupt the next message on its tag): it runs on, and its buffer is
///   discarded when it ends. A dropped `irecv` still takes its message off the queue.
///   Dropping the communicator ends what is still in flight.
/// - [`PendingP2p::wait`] blocks; like every blocking call it fails with
///   [`Error::Runtime`] inside an async runtime. [`PendingP2p::is_done`] never blocks.
///
/// ```
/// use phalanx::Communicator;
/// let comms = Communicator::local_group(2, Default::default()).unwrap();
/// let got: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let hs: Vec<_> = comms
///         .into_iter()
///         .map(|mut c| s.spawn(move || {
///             let peer = 1 - c.rank();
///             // Both ranks send first, then receive: no deadlock with handles.
///             let send = c.isend(peer, 3, vec![c.rank() as f32; 1 << 16]).unwrap();
///             let recv = c.irecv(peer, 3, vec![0f32; 1 << 16]).unwrap();
///             // ... compute here while the messages travel ...
///             let (sent, _data) = send.wait();
///             sent.unwrap();
///             let (received, buf) = recv.wait();
///             received.unwrap();
///             // A local group ends when a rank drops its communicator: leave together.
///             c.barrier().unwrap();
///             buf
///         }))
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert!(got[0].iter().all(|&x| x == 1.0) && got[1].iter().all(|&x| x == 0.0));
/// ```
pub struct PendingP2p<T: Element> {
    raw: PendingP2pRaw,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Element> PendingP2p<T> {
    /// Waits for the message and returns its outcome with the buffer: for a receive,
    /// the message on success and the buffer as passed on error; for a send, the data
    /// as passed.
    pub fn wait(self) -> (Result<()>, Vec<T>) {
        let (result, bytes) = self.raw.wait();
        (result, bytemuck::allocation::pod_collect_to_vec(&bytes))
    }

    /// Whether the message has ended (`wait` would not block).
    pub fn is_done(&self) -> bool {
        self.raw.is_done()
    }
}

/// A message started by [`Communicator::isend_raw`] or [`Communicator::irecv_raw`].
pub struct PendingP2pRaw {
    task: peer::Started,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl PendingP2pRaw {
    /// Waits for the message: its outcome and the buffer (as [`PendingP2p::wait`]).
    /// Returns an empty buffer only if called from inside an async runtime (an error)
    /// or if the message's task panicked or was cancelled.
    pub fn wait(self) -> (Result<()>, Vec<u8>) {
        if let Err(e) = not_in_runtime("wait") {
            return (Err(e), Vec::new());
        }
        match self.runtime.block_on(self.task) {
            Ok(done) => done,
            Err(e) => (Err(Error::Aborted { reason: format!("point-to-point task failed: {e}") }), Vec::new()),
        }
    }

    /// Whether the message has ended (`wait` would not block).
    pub fn is_done(&self) -> bool {
        self.task.is_finished()
    }
}

impl Communicator {
    /// Starts sending `data` to rank `to` as one message with `tag` and returns at
    /// once (see [`PendingP2p`] for the rules). Fails at once
    /// only on bad arguments.
    pub fn isend<T: Element>(&mut self, to: Rank, tag: u32, data: Vec<T>) -> Result<PendingP2p<T>> {
        let raw = self.isend_raw(to, tag, bytemuck::cast_slice(&data).to_vec(), T::DTYPE)?;
        Ok(PendingP2p { raw, _t: std::marker::PhantomData })
    }

    /// Starts receiving the next message with `tag` from rank `from` into `buf`, whose
    /// length and type must match the sent message's ([`Error::Mismatch`] otherwise),
    /// and returns at once.
    pub fn irecv<T: Element>(&mut self, from: Rank, tag: u32, buf: Vec<T>) -> Result<PendingP2p<T>> {
        let raw = self.irecv_raw(from, tag, bytemuck::cast_slice(&buf).to_vec(), T::DTYPE)?;
        Ok(PendingP2p { raw, _t: std::marker::PhantomData })
    }

    /// [`Communicator::isend`] on the bytes of elements of type `dtype`.
    pub fn isend_raw(&mut self, to: Rank, tag: u32, data: Vec<u8>, dtype: DType) -> Result<PendingP2pRaw> {
        self.start_p2p(Dir::Send, (to, None), tag, data, dtype)
    }

    /// [`Communicator::irecv`] on the bytes of elements of type `dtype`.
    pub fn irecv_raw(&mut self, from: Rank, tag: u32, buf: Vec<u8>, dtype: DType) -> Result<PendingP2pRaw> {
        self.start_p2p(Dir::Recv, (from, None), tag, buf, dtype)
    }

    /// [`Communicator::isend_raw`] in view `epoch` only, as [`Communicator::send_in`]:
    /// the pipeline runner's sends, which overlap the stage's compute.
    pub(crate) fn isend_raw_in(
        &mut self,
        epoch: u64,
        to: Rank,
        tag: u32,
        data: Vec<u8>,
        dtype: DType,
    ) -> Result<PendingP2pRaw> {
        self.start_p2p(Dir::Send, (to, Some(epoch)), tag, data, dtype)
    }

    /// [`Communicator::irecv_raw`] in view `epoch` only, as [`Communicator::recv_in`]:
    /// the pipeline runner's receives, posted ahead of the passes that need them.
    pub(crate) fn irecv_raw_in(
        &mut self,
        epoch: u64,
        from: Rank,
        tag: u32,
        buf: Vec<u8>,
        dtype: DType,
    ) -> Result<PendingP2pRaw> {
        self.start_p2p(Dir::Recv, (from, Some(epoch)), tag, buf, dtype)
    }

    fn start_p2p(
        &mut self,
        dir: Dir,
        peer: (Rank, Option<u64>),
        tag: u32,
        buf: Vec<u8>,
        dtype: DType,
    ) -> Result<PendingP2pRaw> {
        self.check_peer(peer.0)?;
        elements(buf.len(), dtype, if dir == Dir::Send { "message" } else { "buffer" })?;
        let runtime = self.runtime.clone();
        let _guard = runtime.enter();
        let task = self.peer_mut()?.start_p2p(dir, peer, tag, dtype, buf);
        Ok(PendingP2pRaw { task, runtime: runtime.clone() })
    }
}
