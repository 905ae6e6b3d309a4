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
//! # Quantized transfers
//!
//! With [`Call::codec`] set, every chunk travels as a min-max frame ([`crate::quant`])
//! instead of raw `f32` bytes, and the executor keeps bit parity by two rules:
//!
//! - **Sending** a chunk: if this call received exactly that chunk earlier by
//!   [`Action::Copy`] (and nothing has written to it since), the received frame is sent
//!   again unchanged: decoded values are never re-encoded, since re-encoding is not
//!   idempotent in floats. Otherwise the chunk is encoded and the local copy is
//!   replaced by the decoded values, so that the sender holds bitwise what its receiver
//!   decodes.
//! - **Receiving** a chunk: the frame is decoded; `Copy` writes the decoded values and
//!   keeps the frame for forwarding, `Reduce` adds them into the local chunk.
//!
//! On the ring all-reduce this is the rule: each reduce-scatter hop encodes its
//! partial sum afresh (replacing a partial sum that it does not keep anyway); the owner of
//! a reduced segment encodes it once, at its first all-gather send, and keeps the
//! decoded value; every later all-gather hop forwards those codes unchanged. So every
//! rank ends with the decoding of the same frames: identical bytes. A coded call takes
//! `f32` elements and `Sum` or `Avg` only, and exchanges with disjoint send and receive
//! ranges; frame lengths are checked against the encoded length.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::watch;

use crate::dtype::{divide_bytes, reduce_bytes, DType, ReduceOp};
use crate::error::{Error, Result};
use crate::op::CustomOp;
use crate::plan::{Action, Plan, Rank, Step};
use crate::quant::Codec;
use crate::transport::{Frame, Header, Link, LinkError};

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
}

impl Call<'_> {
    /// Bytes of one plan element: the operator's unit, or one `dtype` element.
    pub fn element_bytes(&self) -> usize {
        self.custom.map_or(self.dtype.size(), |c| c.unit_bytes().max(1))
    }
}

/// A rank's links, indexed by peer rank; `None` for the rank itself.
pub type Links = [Option<Arc<dyn Link>>];

/// A one-shot, shareable "stop now, for this reason" signal.
///
/// The membership layer fires it when a peer is lost, the view changes or the master
/// aborts the collective; the executor running on it then returns the fired error.
/// Whether a collective *completed* is not the executor's business: the master decides
/// that for every member (see `membership::peer`).
#[derive(Clone, Debug)]
pub struct AbortSignal {
    tx: Arc<watch::Sender<Option<Error>>>,
}

impl Default for AbortSignal {
    fn default() -> Self {
        AbortSignal { tx: Arc::new(watch::channel(None).0) }
    }
}

impl AbortSignal {
    /// A signal that has not fired.
    pub fn new() -> AbortSignal {
        AbortSignal::default()
    }

    /// Fires with `reason`; later calls keep the first reason.
    pub fn fire(&self, reason: Error) {
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The reason, if it has fired.
    pub fn fired(&self) -> Option<Error> {
        self.tx.borrow().clone()
    }

    /// Waits until it fires and returns the reason.
    pub async fn wait(&self) -> Error {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            // The sender lives in `self`, so `changed` cannot fail while we wait.
            if rx.changed().await.is_err() {
                return Error::Aborted { reason: "abort signal dropped".into() };
            }
        }
    }
}

/// Runs the plan steps in `steps` on `buf`. On error `buf` is partly updated: the
/// caller restores it (the peer keeps one backup per call, whatever the retries).
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
    let need = call.plan.len.checked_mul(call.element_bytes());
    if need != Some(buf.len()) {
        return Err(Error::InvalidArgument(format!(
            "buffer of {} bytes for a plan of {} elements of {} bytes",
            buf.len(),
            call.plan.len,
            call.element_bytes()
        )));
    }
    if let Some(codec) = call.codec {
        if call.dtype != codec.dtype() || !matches!(call.op, ReduceOp::Sum | ReduceOp::Avg) || call.custom.is_some() {
            return Err(Error::InvalidArgument(format!(
                "a quantized call takes {} elements and sum or avg, not {} and {:?}{}",
                codec.dtype(),
                call.dtype,
                call.op,
                if call.custom.is_some() { " with a custom operator" } else { "" }
            )));
        }
    }
    if let Some(reason) = abort.fired() {
        return Err(reason);
    }
    let counters = || (0..links.len()).map(|_| AtomicU64::new(0)).collect();
    let ctx = Ctx { call, links, sent: counters(), received: counters(), kept: Default::default() };
    let finishes = steps.end >= call.plan.steps.len();
    let body = async {
        for i in steps {
            ctx.run_step(i, buf).await?;
        }
        if finishes && call.op == ReduceOp::Avg && call.custom.is_none() {
            divide_bytes(call.dtype, buf, call.plan.size);
        }
        Ok(())
    };
    tokio::select! {
        biased;
        reason = abort.wait() => Err(reason),
        // When the group has already stopped, its reason is the one to report: a link
        // that broke because a failed peer left afterwards is a symptom, not the cause.
        result = body => result.map_err(|e| abort.fired().unwrap_or(e)),
    }
}

struct Ctx<'a> {
    call: &'a Call<'a>,
    links: &'a Links,
    /// Frames sent to / received from each peer so far in this call.
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    /// Quantized calls: frames received by `Copy`, by the byte range of their chunk, to
    /// be forwarded unchanged (see the module docs).
    kept: Mutex<HashMap<(usize, usize), Bytes>>,
}

impl Ctx<'_> {
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

    async fn send_frame(&self, to: Rank, payload: Bytes) -> Result<()> {
        let link = self.link(to)?;
        let frame = Frame { header: self.header(Self::next(&self.sent, to)), payload };
        link.send(frame).await.map_err(|e| link_error(to, e))
    }

    /// Byte range of an element range.
    fn bytes(&self, r: &Range<usize>) -> Range<usize> {
        let s = self.call.element_bytes();
        r.start * s..r.end * s
    }

    /// Byte ranges of the chunks of a `len`-byte transfer; always at least one chunk.
    fn chunks(&self, len: usize) -> impl Iterator<Item = Range<usize>> {
        let size = self.call.element_bytes();
        let chunk = (self.call.chunk_bytes / size).max(1) * size;
        let count = len.div_ceil(chunk).max(1);
        (0..count).map(move |k| (k * chunk).min(len)..((k + 1) * chunk).min(len))
    }

    async fn run_step(&self, i: usize, buf: &mut [u8]) -> Result<()> {
        if let Some(codec) = self.call.codec {
            return self.run_step_coded(codec, i, buf).await;
        }
        match &self.call.plan.steps[i] {
            Step::Exchange { send, recv } => match (send, recv) {
                (Some(s), Some(r)) => {
                    let (sb, rb) = (self.bytes(&s.range), self.bytes(&r.range));
                    if sb.end <= rb.start || rb.end <= sb.start {
                        let (out, inp) = split_disjoint(buf, sb, rb);
                        let sending = self.send_bytes(s.to, out);
                        let receiving = self.recv_into(r.from, inp, r.action);
                        tokio::try_join!(sending, receiving).map(|_| ())
                    } else {
                        // Overlapping ranges: send what the buffer held when the step began.
                        let snapshot = Bytes::copy_from_slice(&buf[sb]);
                        let sending = self.send_bytes(s.to, &snapshot);
                        let receiving = self.recv_into(r.from, &mut buf[rb], r.action);
                        tokio::try_join!(sending, receiving).map(|_| ())
                    }
                }
                (Some(s), None) => self.send_bytes(s.to, &buf[self.bytes(&s.range)]).await,
                (None, Some(r)) => {
                    let rb = self.bytes(&r.range);
                    self.recv_into(r.from, &mut buf[rb], r.action).await
                }
                (None, None) => Ok(()),
            },
            Step::Forward { from, to, range, action } => {
                let region = &mut buf[self.bytes(range)];
                for chunk in self.chunks(region.len()) {
                    let frame = self.recv_frame(*from, chunk.len()).await?;
                    self.apply(*action, &mut region[chunk.clone()], &frame.payload)?;
                    self.send_frame(*to, Bytes::copy_from_slice(&region[chunk])).await?;
                }
                Ok(())
            }
            Step::Local { src, dst, action } => {
                let (src, dst) = split_disjoint(buf, self.bytes(src), self.bytes(dst));
                self.apply(*action, dst, src)
            }
        }
    }

    /// [`Ctx::run_step`] of a quantized call.
    async fn run_step_coded(&self, codec: Codec, i: usize, buf: &mut [u8]) -> Result<()> {
        match &self.call.plan.steps[i] {
            Step::Exchange { send, recv } => match (send, recv) {
                (Some(s), Some(r)) => {
                    let (sb, rb) = (self.bytes(&s.range), self.bytes(&r.range));
                    if sb.start < rb.end && rb.start < sb.end {
                        return Err(Error::InvalidArgument(format!(
                            "step {i}: a quantized exchange needs disjoint ranges, not {:?} and {:?}",
                            s.range, r.range
                        )));
                    }
                    let (out, inp) = split_disjoint_mut(buf, sb.clone(), rb.clone());
                    let sending = self.send_coded(codec, s.to, sb.start, out);
                    let receiving = self.recv_coded(codec, r.from, rb.start, inp, r.action);
                    tokio::try_join!(sending, receiving).map(|_| ())
                }
                (Some(s), None) => {
                    let sb = self.bytes(&s.range);
                    self.send_coded(codec, s.to, sb.start, &mut buf[sb]).await
                }
                (None, Some(r)) => {
                    let rb = self.bytes(&r.range);
                    self.recv_coded(codec, r.from, rb.start, &mut buf[rb], r.action).await
                }
                (None, None) => Ok(()),
            },
            Step::Forward { from, to, range, action } => {
                let base = self.bytes(range);
                let region = &mut buf[base.clone()];
                for chunk in self.chunks(region.len()) {
                    let at = base.start + chunk.start;
                    let c = &mut region[chunk];
                    self.recv_coded_chunk(codec, *from, at, c, *action).await?;
                    self.send_coded_chunk(codec, *to, at, c).await?;
                }
                Ok(())
            }
            Step::Local { src, dst, action } => {
                let (sb, db) = (self.bytes(src), self.bytes(dst));
                self.forget(db.clone());
                let (src, dst) = split_disjoint(buf, sb, db);
                self.apply(*action, dst, src)
            }
        }
    }

    /// Sends `region` (at byte `base` of the buffer) chunk by chunk, quantized.
    async fn send_coded(&self, codec: Codec, to: Rank, base: usize, region: &mut [u8]) -> Result<()> {
        for chunk in self.chunks(region.len()) {
            self.send_coded_chunk(codec, to, base + chunk.start, &mut region[chunk]).await?;
        }
        Ok(())
    }

    /// Sends one chunk at byte `at`: the frame it was copied from, or its fresh encoding
    /// (replacing the chunk by the decoded values).
    async fn send_coded_chunk(&self, codec: Codec, to: Rank, at: usize, chunk: &mut [u8]) -> Result<()> {
        let key = (at, at + chunk.len());
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let frame = match kept {
            Some(frame) => frame,
            None => {
                self.forget(key.0..key.1);
                codec.encode_replace_bytes(chunk)?
            }
        };
        self.send_frame(to, frame).await
    }

    /// Receives `region` (at byte `base` of the buffer) chunk by chunk, quantized.
    async fn recv_coded(&self, codec: Codec, from: Rank, base: usize, dst: &mut [u8], action: Action) -> Result<()> {
        for chunk in self.chunks(dst.len()) {
            self.recv_coded_chunk(codec, from, base + chunk.start, &mut dst[chunk], action).await?;
        }
        Ok(())
    }

    /// Receives one quantized chunk at byte `at` and applies `action` to it.
    async fn recv_coded_chunk(
        &self,
        codec: Codec,
        from: Rank,
        at: usize,
        chunk: &mut [u8],
        action: Action,
    ) -> Result<()> {
        let elements = chunk.len() / self.call.element_bytes();
        let frame = self.recv_frame(from, codec.encoded_len(elements)).await?;
        let key = (at, at + chunk.len());
        self.forget(key.0..key.1);
        let decoded = match action {
            Action::Copy => codec.decode_bytes(&frame.payload, chunk),
            // Float addition of finite values is commutative: both orders give these bits.
            Action::Reduce(_) => codec.decode_add_bytes(&frame.payload, chunk),
        };
        decoded.map_err(|e| Error::Protocol { peer: from, detail: e.to_string() })?;
        if action == Action::Copy {
            self.kept.lock().unwrap_or_else(|e| e.into_inner()).insert(key, frame.payload);
        }
        Ok(())
    }

    /// Drops the kept frames of chunks that overlap the byte range `r`, about to change.
    fn forget(&self, r: Range<usize>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if !kept.is_empty() {
            kept.retain(|&(s, e), _| e <= r.start || r.end <= s);
        }
    }

    async fn send_bytes(&self, to: Rank, bytes: &[u8]) -> Result<()> {
        for chunk in self.chunks(bytes.len()) {
            self.send_frame(to, Bytes::copy_from_slice(&bytes[chunk])).await?;
        }
        Ok(())
    }

    async fn recv_into(&self, from: Rank, dst: &mut [u8], action: Action) -> Result<()> {
        for chunk in self.chunks(dst.len()) {
            let frame = self.recv_frame(from, chunk.len()).await?;
            self.apply(action, &mut dst[chunk], &frame.payload)?;
        }
        Ok(())
    }

    fn apply(&self, action: Action, dst: &mut [u8], src: &[u8]) -> Result<()> {
        match action {
            Action::Copy => dst.copy_from_slice(src),
            Action::Reduce(order) => match self.call.custom {
                Some(op) => op
                    .try_combine(dst, src, order)
                    .map_err(|e| Error::Aborted { reason: format!("custom operator {:?} failed: {e}", op.name()) })?,
                None => reduce_bytes(self.call.dtype, self.call.op, dst, src, order),
            },
        }
        Ok(())
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

fn link_error(peer: Rank, e: LinkError) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_disjoint_both_orders() {
        let mut buf = [0u8, 1, 2, 3, 4, 5];
        let (a, b) = split_disjoint(&mut buf, 0..2, 3..6);
        assert_eq!(a, &[0, 1]);
        b[0] = 9;
        assert_eq!(buf[3], 9);
        let (a, b) = split_disjoint(&mut buf, 4..6, 0..1);
        assert_eq!(a, &[4, 5]);
        b[0] = 7;
        assert_eq!(buf[0], 7);
    }

    #[test]
    fn local_steps_copy_and_combine_in_order() {
        use crate::dtype::Order;
        use crate::plan::Plan;
        // Buffer [a | b | c]: c = a, then b = b - ... with Sum: b = c + b (c on the left).
        let mut plan = Plan::empty(0, 1, 3);
        plan.steps.push(Step::Local { src: 0..1, dst: 2..3, action: Action::Copy });
        plan.steps.push(Step::Local { src: 2..3, dst: 1..2, action: Action::Reduce(Order::IncomingLeft) });
        assert!(plan.validate().is_ok());
        let sim = crate::sim::Simulation::new(DType::I32, ReduceOp::Sum);
        let buf: Vec<u8> = bytemuck::cast_slice(&[5i32, 7, 0]).to_vec();
        match &sim.run(&[plan], vec![buf])[0] {
            crate::sim::Outcome::Done(out) => assert_eq!(bytemuck::cast_slice::<u8, i32>(out), &[5, 12, 5]),
            other => panic!("unexpected outcome {other:?}"),
        }
        let mut bad = Plan::empty(0, 1, 3);
        bad.steps.push(Step::Local { src: 0..2, dst: 1..3, action: Action::Copy });
        assert!(bad.validate().is_err(), "overlapping local ranges are rejected");
    }

    /// A link that keeps the payloads of the frames it carries (alive, so that their
    /// addresses are never reused and identify them).
    struct Recorder {
        inner: Arc<dyn Link>,
        sent: Arc<std::sync::Mutex<Vec<Bytes>>>,
        received: Arc<std::sync::Mutex<Vec<Bytes>>>,
    }

    #[async_trait::async_trait]
    impl Link for Recorder {
        async fn send(&self, frame: Frame) -> std::result::Result<(), LinkError> {
            self.sent.lock().unwrap().push(frame.payload.clone());
            self.inner.send(frame).await
        }
        async fn recv(&self) -> std::result::Result<Frame, LinkError> {
            let frame = self.inner.recv().await?;
            self.received.lock().unwrap().push(frame.payload.clone());
            Ok(frame)
        }
        fn close(&self) {
            self.inner.close()
        }
    }

    /// The forwarding rule itself: in the ring's all-gather, every frame a rank sends
    /// after its first all-gather step is a frame it received (the same bytes, not a
    /// re-encoding); every other frame it sends is a fresh encoding.
    #[test]
    fn quantized_ring_forwards_received_frames_unchanged() {
        use crate::quant::{Codec, Quantization};
        let (n, seg, chunk_elems) = (4usize, 40usize, 16usize);
        let len = n * seg;
        let chunks = seg.div_ceil(chunk_elems);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        type Log = Arc<std::sync::Mutex<Vec<Bytes>>>;
        let records: Vec<(Log, Log)> = (0..n).map(|_| (Log::default(), Log::default())).collect();
        let outs = rt.block_on(async {
            let abort = AbortSignal::new();
            let mut tasks = Vec::new();
            for (rank, links) in crate::transport::mem::mesh(n, 64).into_iter().enumerate() {
                let (sent, received) = records[rank].clone();
                let links: Vec<Option<Arc<dyn Link>>> = links
                    .into_iter()
                    .map(|l| {
                        l.map(|inner| {
                            Arc::new(Recorder { inner, sent: sent.clone(), received: received.clone() })
                                as Arc<dyn Link>
                        })
                    })
                    .collect();
                let abort = abort.clone();
                tasks.push(tokio::spawn(async move {
                    let plan = crate::plan::allreduce::ring(rank, n, len);
                    let call = Call {
                        plan: &plan,
                        dtype: DType::F32,
                        op: ReduceOp::Sum,
                        epoch: 0,
                        seq: 1,
                        fingerprint: 0,
                        chunk_bytes: chunk_elems * 4,
                        custom: None,
                        codec: Some(Codec::new(Quantization::U8)),
                    };
                    let x: Vec<f32> = (0..len).map(|i| ((i * (rank + 3)) % 17) as f32 * 0.37 - 2.0).collect();
                    let mut buf: Vec<u8> = bytemuck::cast_slice(&x).to_vec();
                    execute(&call, &mut buf, &links, &abort, 0..plan.steps.len()).await.map(|()| buf)
                }));
            }
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await.unwrap().unwrap());
            }
            outs
        });
        assert!(outs.iter().all(|o| o == &outs[0]), "identical bytes");
        for (rank, (sent, received)) in records.iter().enumerate() {
            let (sent, received) = (sent.lock().unwrap(), received.lock().unwrap());
            assert_eq!(sent.len(), 2 * (n - 1) * chunks, "rank {rank}");
            let fresh = n * chunks; // n - 1 reduce-scatter steps and the first all-gather step
            for (i, p) in sent.iter().enumerate() {
                let forwarded = received.iter().any(|r| r.as_ptr() == p.as_ptr());
                assert_eq!(forwarded, i >= fresh, "rank {rank}, frame {i}: forwarded iff after the owner's step");
            }
        }
    }

    #[test]
    fn abort_signal_keeps_first_reason() {
        let s = AbortSignal::new();
        assert!(s.fired().is_none());
        s.fire(Error::Aborted { reason: "one".into() });
        s.fire(Error::Aborted { reason: "two".into() });
        assert_eq!(s.fired(), Some(Error::Aborted { reason: "one".into() }));
    }
}
