//! Tagged point-to-point messages between two ranks (pipeline schedules send
//! activations and gradients this way).
//!
//! `send(to, tag, data)` and `recv(from, tag, buf)` move one message of `data.len()`
//! elements; the receiver's buffer must have the same length and element type, or its
//! `recv` fails with [`Error::Mismatch`] (the message is consumed; the sender's `send`
//! has already returned). Messages with different tags never mix: each `(peer, tag)`
//! pair is its own FIFO queue, so a rank may receive tags in any order. Messages with
//! the same tag from the same peer arrive in the order they were sent.
//!
//! # Buffering
//!
//! Sends are eager: `send` returns once the message is handed to the transport, without
//! waiting for the matching `recv`. The receiver queues the frames (chunks) of messages
//! that arrive before their `recv` per `(peer, tag)`, up to a bound:
//! [`ConnectOptions::queue_frames`](crate::comm::ConnectOptions::queue_frames) frames
//! per tag and link (see `transport::demux`, "Backpressure"). Past it the receiver stops
//! reading the link, the transport's flow control fills, and the sender's `send`
//! blocks until the receiver takes frames off that queue, so a sender far ahead of a
//! slow receiver holds memory on neither side beyond these buffers. While it blocks,
//! frames behind it on the same link (other tags, collectives) wait too.
//!
//! As in MPI, a correct program does not rely on a send being buffered. A sender that
//! runs more than the bound ahead on a tag the receiver is not reading blocks until
//! the receiver gets to that tag: receiving tags in another order than they were sent
//! is fine while what was sent ahead of the tag being received fits the bound (a
//! message of one chunk on each of a few tags, as `tags_out_of_order` in the tests
//! sends), but a program whose receiver first waits for something the blocked sender
//! has yet to do (a later tag's message, a collective) deadlocks. Also, in a networked
//! group the data link between two peers opens on first use from the peer with the
//! smaller id, so a first `send` from the other one may wait until its receiver's first
//! call involving the pair (its `recv` from this rank, say).
//!
//! # Failures
//!
//! A message never involves the master. In a networked group a message belongs to the
//! view it was sent in: when the view changes, a `send` or `recv` in progress returns
//! [`Error::PeerLost`] if the peer left the view (crash, timeout, leave) and
//! [`Error::Aborted`] otherwise, and messages of the old view still queued are dropped.
//! A link that breaks gives `PeerLost` at once. After an error the receive buffer holds
//! what it held before the call. Both sides must use
//! the same chunk size (the `Tuning` every rank shares).
//!
//! # Non-blocking
//!
//! [`Communicator::isend`] and [`Communicator::irecv`] (`comm::p2p_pending`) start a
//! message as a task and return a handle; they share these queues with the blocking
//! calls. Every call takes its place in the line of its `(peer, tag, direction)` when
//! it is made (`Queues::turn`) and starts once the calls before it there have ended,
//! so blocking and non-blocking calls on one tag keep call order.

use std::collections::HashMap;
use std::sync::Arc;

use super::datalinks::DataLinks;
use super::{elements, Communicator};
use crate::dtype::{DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::exec::{chunk_ranges, execute, execute_send, link_error, AbortSignal, Call, Delivery};
use crate::membership::client::ControlClient;
use crate::membership::{Member, PeerId, View};
use crate::plan::{transfer, Plan, Rank};
use crate::transport::demux::{Demux, OpKey, OpLink};
use crate::transport::Link;

/// The bit that marks a point-to-point message's key (`seq = 1 << 62 | tag`).
pub(crate) const P2P_KEY_BIT: u64 = 1 << 62;

/// The key of the messages with `tag` in `epoch`.
pub(crate) fn p2p_key(epoch: u64, tag: u32) -> OpKey {
    (epoch, P2P_KEY_BIT | tag as u64)
}

const LEN_BITS: u32 = 56;

/// What a message's frames carry in their `call` field: its element type and length.
fn describe(dtype: DType, len: usize) -> u64 {
    (dtype.code() as u64) << LEN_BITS | len as u64
}

/// One message between this rank and `peer` (ranks of a `size`-rank view) as the
/// executor runs it: a one-step transfer plan over the message's link, fingerprinted
/// by the message's type and length.
struct Message {
    plan: Plan,
    dtype: DType,
    key: OpKey,
    bytes: usize,
    chunk_bytes: usize,
    links: Vec<Option<Arc<dyn Link>>>,
}

impl Message {
    fn new(
        plan: Plan,
        dtype: DType,
        key: OpKey,
        chunk_bytes: usize,
        peer: Rank,
        link: Arc<dyn Link>,
    ) -> Result<Message> {
        let bytes = plan.len * dtype.size();
        if bytes as u64 >= 1 << LEN_BITS {
            return Err(Error::InvalidArgument(format!("message of {bytes} bytes is too large")));
        }
        let mut links = vec![None; plan.size];
        links[peer] = Some(link);
        Ok(Message { plan, dtype, key, bytes, chunk_bytes, links })
    }

    fn call(&self, delivery: Delivery) -> Call<'_> {
        Call {
            plan: &self.plan,
            dtype: self.dtype,
            op: ReduceOp::Sum, // nothing is reduced
            epoch: self.key.0,
            seq: self.key.1,
            fingerprint: describe(self.dtype, self.bytes),
            chunk_bytes: self.chunk_bytes,
            custom: None,
            codec: None,
            delivery,
        }
    }
}

/// Sends `data` as one message (`msg` is a send plan); returns once it is handed over.
async fn send_message(msg: &Message, data: &[u8]) -> Result<()> {
    execute_send(&msg.call(Delivery::InPlace), data, &msg.links, &AbortSignal::new()).await
}

/// Receives one message from `rx` (the queue of one peer and tag) into `out` (`msg`
/// is a receive plan). `out` is written only once the whole message is in.
async fn recv_message(msg: &Message, rx: &OpLink, tag: u32, out: &mut [u8], from: Rank) -> Result<()> {
    let first = rx.peek().await.map_err(|e| link_error(from, e))?.header;
    let want = describe(msg.dtype, out.len());
    if first.index == 0 && first.call != want {
        // Consume the sender's whole message, so the next one on this tag starts clean.
        let their_len = (first.call & ((1 << LEN_BITS) - 1)) as usize;
        let their_type = DType::from_code((first.call >> LEN_BITS) as u8);
        let size = their_type.map_or(1, DType::size);
        for _ in chunk_ranges(their_len, size, msg.chunk_bytes) {
            rx.recv().await.map_err(|e| link_error(from, e))?;
        }
        let theirs = their_type.map_or_else(|| "an unknown type".to_string(), |t| t.to_string());
        return Err(Error::Mismatch {
            detail: format!(
                "rank {from} sent {their_len} bytes of {theirs} on tag {tag}; this rank receives {} bytes of {}",
                out.len(),
                msg.dtype
            ),
        });
    }
    // Frame checks (index, length) are the executor's; delivery on success leaves `out`
    // untouched on error with no backup copy.
    execute(&msg.call(Delivery::OnSuccess), out, &msg.links, &AbortSignal::new(), 0..1).await
}

/// Which way a message goes, for ordering (see [`Queues::turn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Dir {
    Send,
    Recv,
}

/// A peer's point-to-point links of the current epoch, by `(peer, tag)`: each the view
/// of one tag's messages on the shared link to that peer (sent on it, queued from it).
/// Shared by the blocking calls and the tasks of non-blocking ones.
#[derive(Default)]
pub(crate) struct Queues {
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    epoch: u64,
    links: HashMap<(PeerId, u32), (Arc<Demux>, Arc<OpLink>)>,
    /// Per `(rank, tag, direction)`, the signal that the last call begun on it ended
    /// (its sender dropped): the next call waits for it, so calls run in call order.
    turns: HashMap<(Rank, u32, Dir), tokio::sync::oneshot::Receiver<()>>,
}

/// Past this many `turns` entries, those of calls that ended are pruned.
const TURNS_PRUNE: usize = 256;

/// A call's place in its `(rank, tag, direction)` line: wait for `before` (if any)
/// before starting; the call's own end is signalled when `mine` drops.
pub(crate) struct Turn {
    before: Option<tokio::sync::oneshot::Receiver<()>>,
    _mine: tokio::sync::oneshot::Sender<()>,
}

impl Turn {
    /// Waits until every earlier call on the same `(rank, tag, direction)` has ended.
    pub(crate) async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // Err means the earlier call ended (its sender dropped): that is the signal.
            let _ = before.await;
        }
    }
}

impl Queues {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic (each update is a single map
        // operation), so a poisoned lock is taken over.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the next place in the line of calls on `(rank, tag, dir)`. Called
    /// synchronously when a call begins, so that the line follows the caller's order
    /// whatever order the calls' tasks then run in.
    pub(crate) fn turn(&self, rank: Rank, tag: u32, dir: Dir) -> Turn {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = self.lock();
        if st.turns.len() >= TURNS_PRUNE {
            st.turns.retain(|_, rx| matches!(rx.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)));
        }
        let before = st.turns.insert((rank, tag, dir), rx);
        Turn { before, _mine: tx }
    }

    /// The current view; a new epoch drops the old one's queues (and their messages).
    /// With `pinned`, a view of another epoch fails with [`Error::Aborted`]: the
    /// caller's ranks belong to that epoch, and the same rank may name another peer in
    /// the next (checked here, on the view the call then runs in, so no change slips in
    /// between the check and the call).
    fn view(&self, control: &ControlClient, links: &DataLinks, pinned: Option<u64>) -> Result<View> {
        let view = control.view()?;
        {
            let mut st = self.lock();
            if view.epoch != st.epoch {
                st.epoch = view.epoch;
                st.links.clear();
                links.enter(&view);
            }
        }
        match pinned {
            Some(epoch) if epoch != view.epoch => Err(Error::Aborted {
                reason: format!(
                    "the view changed from epoch {epoch} to {} during a point-to-point exchange pinned to it",
                    view.epoch
                ),
            }),
            _ => Ok(view),
        }
    }

    /// The link of `tag`'s messages with `peer` in `view`, opened on first use.
    async fn link(
        &self,
        control: &ControlClient,
        links: &DataLinks,
        view: &View,
        (rank, peer): (Rank, &Member),
        tag: u32,
    ) -> Result<Arc<OpLink>> {
        let get = async { links.get(peer).await.map_err(|e| link_error(rank, e)) };
        let demux = until_view_changes(control, view, rank, peer.id, get).await?;
        let key = p2p_key(view.epoch, tag);
        let mut st = self.lock();
        let entry = st.links.entry((peer.id, tag)).or_insert_with(|| (demux.clone(), Arc::new(demux.op(key))));
        if !Arc::ptr_eq(&entry.0, &demux) {
            // The link was opened anew: the old queue is gone with the old link.
            *entry = (demux.clone(), Arc::new(demux.op(key)));
        }
        Ok(entry.1.clone())
    }

    /// See [`crate::Communicator::send`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        control: &ControlClient,
        links: &DataLinks,
        (to, pinned): (Rank, Option<u64>),
        tag: u32,
        dtype: DType,
        data: &[u8],
        chunk: usize,
    ) -> Result<()> {
        let view = self.view(control, links, pinned)?;
        let (me, peer) = p2p_peer(&view, to, control.id())?;
        let link = self.link(control, links, &view, (to, &peer), tag).await?;
        let plan = transfer::send(me, view.size(), data.len() / dtype.size(), to);
        let msg = Message::new(plan, dtype, p2p_key(view.epoch, tag), chunk, to, link)?;
        until_view_changes(control, &view, to, peer.id, send_message(&msg, data)).await
    }

    /// See [`crate::Communicator::recv`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn recv(
        &self,
        control: &ControlClient,
        links: &DataLinks,
        (from, pinned): (Rank, Option<u64>),
        tag: u32,
        dtype: DType,
        out: &mut [u8],
        chunk: usize,
    ) -> Result<()> {
        let view = self.view(control, links, pinned)?;
        let (me, peer) = p2p_peer(&view, from, control.id())?;
        let link = self.link(control, links, &view, (from, &peer), tag).await?;
        let plan = transfer::recv(me, view.size(), out.len() / dtype.size(), from);
        let msg = Message::new(plan, dtype, p2p_key(view.epoch, tag), chunk, from, link.clone())?;
        let recv = recv_message(&msg, &link, tag, out, from);
        until_view_changes(control, &view, from, peer.id, recv).await
    }
}

/// Runs `work` unless the view changes first: then [`Error::PeerLost`] if `peer`
/// (rank `rank` of `view`) left it, [`Error::Aborted`] otherwise.
async fn until_view_changes<T>(
    control: &ControlClient,
    view: &View,
    rank: Rank,
    peer: PeerId,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = work => r,
        next = control.view_after(view.epoch) => match next {
            Ok(next) if next.rank_of(peer).is_none() => Err(Error::PeerLost {
                rank,
                reason: format!("left the view (now epoch {})", next.epoch),
            }),
            Ok(next) => Err(Error::Aborted {
                reason: format!("the view changed to epoch {} during a point-to-point transfer", next.epoch),
            }),
            Err(e) => Err(e),
        },
    }
}

/// This peer's rank in `view` and the member of rank `rank`, which must be another one.
fn p2p_peer(view: &View, rank: Rank, me: PeerId) -> Result<(Rank, Member)> {
    match (view.rank_of(me), view.members.get(rank)) {
        (Some(mine), Some(m)) if m.id != me => Ok((mine, m.clone())),
        _ => {
            Err(Error::InvalidArgument(format!("peer rank {rank} is this rank or outside a group of {}", view.size())))
        }
    }
}

impl Communicator {
    /// Sends `data` to rank `to` as one message with `tag` (see the module docs of
    /// `comm::p2p`). Returns once the message is handed to the transport.
    pub fn send<T: Element>(&mut self, to: Rank, tag: u32, data: &[T]) -> Result<()> {
        self.send_raw(to, tag, bytemuck::cast_slice(data), T::DTYPE)
    }

    /// Receives the next message with `tag` from rank `from` into `buf`, whose length
    /// and type must match the sent message's ([`Error::Mismatch`] otherwise).
    pub fn recv<T: Element>(&mut self, from: Rank, tag: u32, buf: &mut [T]) -> Result<()> {
        self.recv_raw(from, tag, bytemuck::cast_slice_mut(buf), T::DTYPE)
    }

    /// [`Communicator::send`] on the bytes of elements of type `dtype`.
    pub fn send_raw(&mut self, to: Rank, tag: u32, data: &[u8], dtype: DType) -> Result<()> {
        self.check_peer(to)?;
        elements(data.len(), dtype, "message")?;
        self.block(async |p| p.send_p2p(to, tag, dtype, data, None).await)?
    }

    /// [`Communicator::recv`] on the bytes of elements of type `dtype`. On error `buf`
    /// holds what it held before (it is written only once the whole message is in).
    pub fn recv_raw(&mut self, from: Rank, tag: u32, buf: &mut [u8], dtype: DType) -> Result<()> {
        self.check_peer(from)?;
        elements(buf.len(), dtype, "buffer")?;
        self.block(async |p| p.recv_p2p(from, tag, dtype, buf, None).await)?
    }

    /// [`Communicator::send`] in view `epoch` only: [`Error::Aborted`] if the view has
    /// moved on, whose ranks may name other peers (the pipeline runner pins its
    /// iteration's view this way).
    pub(crate) fn send_in<T: Element>(&mut self, epoch: u64, to: Rank, tag: u32, data: &[T]) -> Result<()> {
        let data: &[u8] = bytemuck::cast_slice(data);
        self.check_peer(to)?;
        self.block(async |p| p.send_p2p(to, tag, T::DTYPE, data, Some(epoch)).await)?
    }

    /// [`Communicator::recv`] in view `epoch` only, as [`Communicator::send_in`].
    pub(crate) fn recv_in<T: Element>(&mut self, epoch: u64, from: Rank, tag: u32, buf: &mut [T]) -> Result<()> {
        let buf: &mut [u8] = bytemuck::cast_slice_mut(buf);
        self.check_peer(from)?;
        self.block(async |p| p.recv_p2p(from, tag, T::DTYPE, buf, Some(epoch)).await)?
    }

    pub(super) fn check_peer(&self, peer: Rank) -> Result<()> {
        let (rank, size) = self.call_group()?;
        if peer >= size || peer == rank {
            return Err(Error::InvalidArgument(format!("peer rank {peer} is this rank or outside a group of {size}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_apart_from_collectives_and_sub_groups() {
        let (_, seq) = p2p_key(3, u32::MAX);
        assert_ne!(seq & P2P_KEY_BIT, 0);
        assert_eq!(seq & crate::membership::peer::SUB_KEY_BIT, 0);
        assert_ne!(p2p_key(3, 1), p2p_key(3, 2));
    }
}
