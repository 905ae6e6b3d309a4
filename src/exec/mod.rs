//! The executor: runs one rank's [`Plan`] over its links.
//!
//! Each transfer is cut into chunks of about [`Call::chunk_bytes`]; a step's send and
//! receive run concurrently, and a received chunk is reduced while the next one is in
//! flight. Every frame carries `(epoch, seq, call, index)`: frames of an older
//! collective are dropped unread, frames of another call are a [`Error::Mismatch`].
//!
//! The executor stops at the first error or when its [`AbortSignal`] fires; the caller
//! then puts the buffer back to its content before the call.
//!
//! One step interpreter moves every chunk; what a chunk's frame holds is the call's
//! protocol (the private `protocol` module): the buffer's bytes, or a quantized frame.
//!
//! # Quantized transfers
//!
//! With [`Call::codec`] set, every chunk travels as a min-max frame ([`crate::quant`])
//! instead of raw `f32` bytes, and bit parity rests on two rules:
//!
//! - **Sending** a range: where the plan received it by [`Action::CopyKeep`] (a promise
//!   that it is sent on unchanged, checked by [`Plan::validate`]), the received frames
//!   are sent again as they are: decoded values are never re-encoded, since re-encoding
//!   is not idempotent in floats. A [`Step::Forward`] that copies forwards each frame it
//!   receives likewise. Otherwise each chunk is encoded and the local copy is replaced by
//!   the decoded values, so that the sender holds bitwise what its receiver decodes.
//! - **Receiving** a chunk: the frame is decoded; `Copy` writes the decoded values,
//!   `Reduce` adds them into the local chunk.
//!
//! On the ring all-reduce this is the rule: each reduce-scatter hop encodes its
//! partial sum afresh (replacing a partial sum that it does not keep anyway); the owner of
//! a reduced segment encodes it once, at its first all-gather send, and keeps the
//! decoded value; every later all-gather hop forwards those codes unchanged, as the ring
//! builder's `CopyKeep` receives say. So every rank ends with the decoding of the same
//! frames: identical bytes. A coded call takes `f32` elements and `Sum` or `Avg` only,
//! and exchanges with disjoint send and receive ranges; frame lengths are checked
//! against the encoded length.
//!
//! Raw calls keep nothing: a `CopyKeep` range is sent again from the buffer, copied into
//! fresh frames. Keeping its frames would save that copy but hold a whole segment of
//! received frames beside the buffer until the next step has sent it (a quarter of a
//! 64 MiB buffer with 4 ranks), which put the ring all-reduce's peak memory above 2.5×
//! the buffer (issue 14; `docs/PERF.md`, "Peak memory").

mod protocol;
mod signal;
#[cfg(test)]
mod tests;
mod undo;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

use bytes::Bytes;

use crate::dtype::{divide_bytes, reduce_bytes, DType, Order, ReduceOp};
use crate::error::{Error, Result};
use crate::op::CustomOp;
use crate::plan::{Action, Plan, Rank, Step};
use crate::quant::Codec;
use crate::transport::{Frame, Header, Link, LinkError};

use protocol::Wire;
pub use signal::AbortSignal;
pub(crate) use undo::Undo;

/// Default chunk size: large enough to amortise per-frame costs, small enough that a
/// pipelined chain starts forwarding early.
pub const DEFAULT_CHUNK_BYTES: usize = 256 << 10;

/// One collective call as the executor sees it.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    /// This rank's plan.
    pub plan: &'a Plan,
    /// Element type of the working buffer.
    pub dtype: DType,
    /// Operator for [`Action::Reduce`] steps.
    pub op: ReduceOp,
    /// Membership epoch.
    pub epoch: u64,
    /// Sequence number of this collective within the epoch.
    pub seq: u64,
    /// Fingerprint of the call, identical on every rank that makes the same call.
    pub fingerprint: u64,
    /// Target chunk size in bytes (rounded down to whole elements, at least one).
    pub chunk_bytes: usize,
    /// A user-defined operator that replaces `op` for [`Action::Reduce`]. The plan's
    /// elements are then the operator's units of [`CustomOp::unit_bytes`] bytes.
    pub custom: Option<&'a dyn CustomOp>,
    /// Quantize every transfer with this codec (a quantized all-reduce); `None` sends the
    /// buffer's bytes as they are. See the module docs, "Quantized transfers".
    pub codec: Option<Codec>,
    /// When received bytes reach the buffer: as each chunk arrives, or all at once when
    /// every step has succeeded.
    pub delivery: Delivery,
}

/// When an executor writes received bytes into the working buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delivery {
    /// Each chunk as it arrives, so that a chunk is reduced while the next is in flight.
    /// On error the buffer is partly updated and the caller restores it.
    #[default]
    InPlace,
    /// The received frames are held (no copy: they are the transport's buffers) and
    /// written into the buffer only when every step has succeeded, so the buffer is
    /// untouched on error with no backup copy. For plans of receive-only steps that
    /// copy (a point-to-point message): a plan that reduces, forwards, sends or copies
    /// locally reads what it received and is refused.
    OnSuccess,
}

impl Call<'_> {
    /// Bytes of one plan element: the operator's unit, or one `dtype` element.
    pub fn element_bytes(&self) -> usize {
        self.custom.map_or(self.dtype.size(), |c| c.unit_bytes().max(1))
    }
}

/// A rank's links, indexed by peer rank; `None` for the rank itself.
pub type Links = [Option<Arc<dyn Link>>];

/// Runs the plan steps in `steps` on `buf`. On error `buf` is partly updated (unless
/// the call asks for [`Delivery::OnSuccess`]): the caller restores it (the peer keeps
/// one backup per call, whatever the retries).
///
/// When `steps` reaches the plan's end and the operator is [`ReduceOp::Avg`], the
/// result is divided by the plan's rank count here, so every face gets the finished
/// average and no count travels upward.
pub async fn execute(
    call: &Call<'_>,
    buf: &mut [u8],
    links: &Links,
    abort: &AbortSignal,
    steps: Range<usize>,
) -> Result<()> {
    run_steps(Ctx::new(call, buf.len(), links, None)?, buf, abort, steps).await
}

/// [`execute`], first saving into `undo` the bytes of `buf` that each write overwrites
/// (see [`Undo`]): on error, [`Undo::restore`] puts `buf` back as it was. The caller
/// starts `undo` on this buffer ([`Undo::begin`]).
pub(crate) async fn execute_saving(
    call: &Call<'_>,
    buf: &mut [u8],
    links: &Links,
    abort: &AbortSignal,
    steps: Range<usize>,
    undo: &mut Undo,
) -> Result<()> {
    run_steps(Ctx::new(call, buf.len(), links, Some(undo))?, buf, abort, steps).await
}

async fn run_steps(ctx: Ctx<'_>, buf: &mut [u8], abort: &AbortSignal, steps: Range<usize>) -> Result<()> {
    let call = ctx.call;
    let finishes = steps.end >= call.plan.steps.len();
    ctx.run(abort, async {
        for i in steps {
            ctx.run_step(i, buf).await?;
        }
        ctx.deliver_held(buf);
        if finishes && call.op == ReduceOp::Avg && call.custom.is_none() {
            ctx.save(0, buf);
            divide_bytes(call.dtype, buf, call.plan.size);
        }
        Ok(())
    })
    .await
}

/// Runs a plan made only of sends on a buffer the caller only lends for reading: the
/// sending half of a point-to-point message or of a shared-state transfer, with no copy
/// of the caller's bytes beyond the frames themselves. Plain frames only (no codec).
pub async fn execute_send(call: &Call<'_>, data: &[u8], links: &Links, abort: &AbortSignal) -> Result<()> {
    let ctx = Ctx::new(call, data.len(), links, None)?;
    let mut sends = Vec::with_capacity(call.plan.steps.len());
    for (i, step) in call.plan.steps.iter().enumerate() {
        match step {
            Step::Exchange { send: Some(s), recv: None } if ctx.wire == Wire::Raw => sends.push(s),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "step {i} of a read-only call does more than send plain frames"
                )))
            }
        }
    }
    ctx.run(abort, async {
        for s in sends {
            ctx.send_plain(s.to, &data[ctx.bytes(&s.range)]).await?;
        }
        Ok(())
    })
    .await
}

struct Ctx<'a> {
    call: &'a Call<'a>,
    links: &'a Links,
    /// What a chunk's frame holds.
    wire: Wire,
    /// Frames sent to / received from each peer so far in this call.
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    /// The frames of each range received by [`Action::CopyKeep`] on a coded wire, by the
    /// range's bytes, in chunk order: the plan's next send of that range forwards them
    /// unchanged.
    kept: Mutex<HashMap<Range<usize>, Vec<Bytes>>>,
    /// Received frames not yet written, by byte range ([`Delivery::OnSuccess`]).
    held: Mutex<Vec<(Range<usize>, Bytes)>>,
    /// Where each write first saves what it overwrites ([`execute_saving`]).
    undo: Option<Mutex<&'a mut Undo>>,
}

impl<'a> Ctx<'a> {
    /// Checks `call` against a buffer of `len` bytes and sets up its counters.
    fn new(call: &'a Call<'a>, len: usize, links: &'a Links, undo: Option<&'a mut Undo>) -> Result<Ctx<'a>> {
        let need = call.plan.len.checked_mul(call.element_bytes());
        if need != Some(len) {
            return Err(Error::InvalidArgument(format!(
                "buffer of {len} bytes for a plan of {} elements of {} bytes",
                call.plan.len,
                call.element_bytes()
            )));
        }
        let wire = Wire::for_call(call)?;
        if call.delivery == Delivery::OnSuccess {
            let copies_only =
                |step: &Step| matches!(step, Step::Exchange { send: None, recv: Some(r) } if r.action == Action::Copy);
            if wire != Wire::Raw || !call.plan.steps.iter().all(copies_only) {
                return Err(Error::InvalidArgument(
                    "delivery on success takes plain frames and receive-only steps that copy".into(),
                ));
            }
        }
        let counters = || (0..links.len()).map(|_| AtomicU64::new(0)).collect();
        Ok(Ctx {
            call,
            links,
            wire,
            sent: counters(),
            received: counters(),
            kept: Default::default(),
            held: Default::default(),
            undo: undo.map(Mutex::new),
        })
    }

    /// Saves what is about to be overwritten: `current`, the buffer's bytes at `at`.
    fn save(&self, at: usize, current: &[u8]) {
        if let Some(undo) = &self.undo {
            undo.lock().unwrap_or_else(|e| e.into_inner()).save(at, current);
        }
    }

    /// Runs `body` unless `abort` fires first (or has fired already).
    async fn run(&self, abort: &AbortSignal, body: impl std::future::Future<Output = Result<()>>) -> Result<()> {
        if let Some(reason) = abort.fired() {
            return Err(reason);
        }
        tokio::select! {
            biased;
            reason = abort.wait() => Err(reason),
            // When the group has already stopped, its reason is the one to report: a link
            // that broke because a failed peer left afterwards is a symptom, not the cause.
            result = body => result.map_err(|e| abort.fired().unwrap_or(e)),
        }
    }

    /// Writes the frames held by [`Delivery::OnSuccess`] into `buf`.
    fn deliver_held(&self, buf: &mut [u8]) {
        for (range, payload) in std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner())) {
            self.save(range.start, &buf[range.clone()]);
            buf[range].copy_from_slice(&payload);
        }
    }

    fn link(&self, rank: Rank) -> Result<&Arc<dyn Link>> {
        self.links
            .get(rank)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidArgument(format!("no link to rank {rank}")))
    }

    fn header(&self, index: u64) -> Header {
        let c = self.call;
        Header { epoch: c.epoch, seq: c.seq, call: c.fingerprint, index }
    }

    fn next(counters: &[AtomicU64], peer: Rank) -> u64 {
        counters.get(peer).map_or(0, |c| c.fetch_add(1, Ordering::Relaxed))
    }

    /// Byte range of an element range.
    fn bytes(&self, r: &Range<usize>) -> Range<usize> {
        let s = self.call.element_bytes();
        r.start * s..r.end * s
    }

    /// Byte ranges of the chunks of a `len`-byte transfer; always at least one chunk.
    fn chunks(&self, len: usize) -> impl Iterator<Item = Range<usize>> {
        chunk_ranges(len, self.call.element_bytes(), self.call.chunk_bytes)
    }

    /// The one step interpreter: every transfer goes chunk by chunk through
    /// [`Ctx::send_chunk`] and [`Ctx::recv_chunk`], whatever the wire.
    async fn run_step(&self, i: usize, buf: &mut [u8]) -> Result<()> {
        match &self.call.plan.steps[i] {
            Step::Exchange { send, recv } => match (send, recv) {
                (Some(s), Some(r)) => {
                    self.wire.check_exchange(i, &s.range, &r.range)?;
                    let (sb, rb) = (self.bytes(&s.range), self.bytes(&r.range));
                    if sb.end <= rb.start || rb.end <= sb.start {
                        let (out, inp) = split_disjoint_mut(buf, sb.clone(), rb.clone());
                        let sending = self.send_region(s.to, sb.start, out);
                        let receiving = self.recv_region(r.from, rb.start, inp, r.action);
                        tokio::try_join!(sending, receiving).map(|_| ())
                    } else {
                        // Overlapping ranges: send what the buffer held when the step began.
                        let mut snapshot = buf[sb.clone()].to_vec();
                        let sending = self.send_region(s.to, sb.start, &mut snapshot);
                        let receiving = self.recv_region(r.from, rb.start, &mut buf[rb], r.action);
                        tokio::try_join!(sending, receiving).map(|_| ())
                    }
                }
                (Some(s), None) => {
                    let sb = self.bytes(&s.range);
                    self.send_region(s.to, sb.start, &mut buf[sb]).await
                }
                (None, Some(r)) => {
                    let rb = self.bytes(&r.range);
                    self.recv_region(r.from, rb.start, &mut buf[rb], r.action).await
                }
                (None, None) => Ok(()),
            },
            Step::Forward { from, to, range, action } => {
                let base = self.bytes(range);
                let region = &mut buf[base.clone()];
                for chunk in self.chunks(region.len()) {
                    let at = base.start + chunk.start;
                    let c = &mut region[chunk];
                    let frame = self.recv_chunk(*from, at, c, *action).await?;
                    // A copied chunk is the frame's content: forward the frame itself.
                    let payload = match action {
                        Action::Copy | Action::CopyKeep => frame,
                        Action::Reduce(_) => self.wire.encode(c)?,
                    };
                    self.send_frame(*to, payload).await?;
                }
                Ok(())
            }
            Step::Local { src, dst, action } => {
                let at = self.bytes(dst).start;
                let (src, dst) = split_disjoint(buf, self.bytes(src), self.bytes(dst));
                self.save(at, dst);
                match action {
                    Action::Copy | Action::CopyKeep => {
                        dst.copy_from_slice(src);
                        Ok(())
                    }
                    Action::Reduce(order) => self.reduce(*order, dst, src),
                }
            }
        }
    }

    /// Sends `region` (at byte `base` of the buffer) chunk by chunk: the frames it was
    /// received in, where the plan kept them, or else each chunk's encoding.
    async fn send_region(&self, to: Rank, base: usize, region: &mut [u8]) -> Result<()> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).remove(&(base..base + region.len()));
        if let Some(frames) = kept {
            for frame in frames {
                self.send_frame(to, frame).await?;
            }
            return Ok(());
        }
        if self.wire == Wire::Raw {
            return self.send_plain(to, region).await;
        }
        for chunk in self.chunks(region.len()) {
            // Encoding replaces the local values by the decoded ones.
            self.save(base + chunk.start, &region[chunk.clone()]);
            let payload = self.wire.encode(&mut region[chunk])?;
            self.send_frame(to, payload).await?;
        }
        Ok(())
    }

    /// Sends `data` chunk by chunk as plain frames (its bytes as they are).
    async fn send_plain(&self, to: Rank, data: &[u8]) -> Result<()> {
        let link = self.link(to)?;
        for chunk in self.chunks(data.len()) {
            let header = self.header(Self::next(&self.sent, to));
            link.send_slice(header, &data[chunk]).await.map_err(|e| link_error(to, e))?;
        }
        Ok(())
    }

    async fn send_frame(&self, to: Rank, payload: Bytes) -> Result<()> {
        let link = self.link(to)?;
        let frame = Frame { header: self.header(Self::next(&self.sent, to)), payload };
        link.send(frame).await.map_err(|e| link_error(to, e))
    }

    /// Receives `region` (at byte `base` of the buffer) chunk by chunk, keeping the
    /// frames where `action` says they are sent on.
    async fn recv_region(&self, from: Rank, base: usize, region: &mut [u8], action: Action) -> Result<()> {
        if self.call.delivery == Delivery::OnSuccess {
            // Checked in `Ctx::new`: plain frames that are copied, so a frame is the bytes.
            for chunk in self.chunks(region.len()) {
                let frame = self.recv_frame(from, chunk.len()).await?;
                let at = base + chunk.start..base + chunk.end;
                let payload = self.owned(from, frame.payload)?;
                self.held.lock().unwrap_or_else(|e| e.into_inner()).push((at, payload));
            }
            return Ok(());
        }
        // Only coded frames are kept (see the module docs): raw bytes are in the buffer.
        let keep = action == Action::CopyKeep && self.wire != Wire::Raw;
        let mut frames = Vec::new();
        for chunk in self.chunks(region.len()) {
            let frame = self.recv_chunk(from, base + chunk.start, &mut region[chunk], action).await?;
            if keep {
                frames.push(self.owned(from, frame)?);
            }
        }
        if keep {
            self.kept.lock().unwrap_or_else(|e| e.into_inner()).insert(base..base + region.len(), frames);
        }
        Ok(())
    }

    /// `payload`, received from `from`, to keep beyond this chunk: copied when the link
    /// lent it from its own buffer ([`Link::lends_frames`]), which the peer cannot reuse
    /// while it is held (a whole segment of kept frames would stall the sender). Asked
    /// once a frame came: a link set up on its first use knows only then.
    fn owned(&self, from: Rank, payload: Bytes) -> Result<Bytes> {
        Ok(if self.link(from)?.lends_frames() { Bytes::copy_from_slice(&payload) } else { payload })
    }

    /// Receives one chunk (at byte `at` of the buffer), applies `action` to it and
    /// returns the frame's payload.
    async fn recv_chunk(&self, from: Rank, at: usize, chunk: &mut [u8], action: Action) -> Result<Bytes> {
        let size = self.call.element_bytes();
        let frame = self.recv_frame(from, self.wire.frame_len(chunk.len() / size, size)).await?;
        // Saved once the frame is here, just before the write: the chunk is then in cache
        // for the copy or reduction that follows.
        self.save(at, chunk);
        self.wire.decode(from, &frame.payload, chunk, action, |order, dst, src| self.reduce(order, dst, src))?;
        Ok(frame.payload)
    }

    /// Combines `src` into `dst` with the call's operator, `src` on the side `order` names.
    fn reduce(&self, order: Order, dst: &mut [u8], src: &[u8]) -> Result<()> {
        match self.call.custom {
            Some(op) => op
                .try_combine(dst, src, order)
                .map_err(|e| Error::Aborted { reason: format!("custom operator {:?} failed: {e}", op.name()) }),
            None => {
                reduce_bytes(self.call.dtype, self.call.op, dst, src, order);
                Ok(())
            }
        }
    }

    /// Receives the next frame from `from`, dropping stale frames of earlier
    /// collectives and checking that it belongs to this call and has `len` bytes.
    async fn recv_frame(&self, from: Rank, len: usize) -> Result<Frame> {
        let link = self.link(from)?;
        let want = self.header(Self::next(&self.received, from));
        loop {
            let frame = link.recv().await.map_err(|e| link_error(from, e))?;
            let h = frame.header;
            if (h.epoch, h.seq) < (want.epoch, want.seq) {
                continue; // traffic of an aborted or older collective: never mixed in
            }
            if h.call != want.call || (h.epoch, h.seq) != (want.epoch, want.seq) {
                return Err(Error::Mismatch {
                    detail: format!(
                        "rank {from} is in collective (epoch {}, seq {}, call {:#x}), this rank in (epoch {}, seq {}, call {:#x})",
                        h.epoch, h.seq, h.call, want.epoch, want.seq, want.call
                    ),
                });
            }
            if h.index != want.index || frame.payload.len() != len {
                return Err(Error::Protocol {
                    peer: from,
                    detail: format!(
                        "expected frame {} of {len} bytes, got frame {} of {} bytes",
                        want.index,
                        h.index,
                        frame.payload.len()
                    ),
                });
            }
            return Ok(frame);
        }
    }
}

/// Byte ranges of the chunks of a `len`-byte transfer of `element_bytes`-byte elements:
/// about `chunk_bytes` each, rounded down to whole elements (at least one); always at
/// least one chunk. The one chunker of every byte mover (point-to-point messages too).
pub(crate) fn chunk_ranges(len: usize, element_bytes: usize, chunk_bytes: usize) -> impl Iterator<Item = Range<usize>> {
    let size = element_bytes.max(1);
    let chunk = (chunk_bytes / size).max(1) * size;
    let count = len.div_ceil(chunk).max(1);
    (0..count).map(move |k| (k * chunk).min(len)..((k + 1) * chunk).min(len))
}

/// The error of a failed link to `peer`: a closed link is a lost peer, anything else a
/// protocol error. Shared with point-to-point messages.
pub(crate) fn link_error(peer: Rank, e: LinkError) -> Error {
    match e {
        LinkError::Closed(reason) => Error::PeerLost { rank: peer, reason },
        other => Error::Protocol { peer, detail: other.to_string() },
    }
}

/// Splits `buf` into a shared view of `a` and a mutable view of `b`, which must not
/// overlap.
fn split_disjoint(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

/// Splits `buf` into mutable views of `a` and `b`, which must not overlap.
fn split_disjoint_mut(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&mut [u8], &mut [u8]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}
