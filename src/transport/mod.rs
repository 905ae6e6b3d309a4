//! Transports: ordered, reliable, framed messages between two peers.
//!
//! A transport implements [`Link`]. The executor sends a [`Frame`] per chunk of a plan
//! step and expects the peer's frames in the same order; a link never reorders, drops or
//! duplicates frames, and it holds at most a bounded number of unreceived frames, so a
//! fast sender waits for a slow receiver instead of filling memory. Every transport
//! passes the same [`conformance`] tests.

pub(crate) mod auth;
pub(crate) mod buffers;
pub mod conformance;
pub(crate) mod demux;
#[cfg(test)]
mod demux_tests;
pub use demux::FrameSink;
pub mod endpoint;
pub mod mem;
pub mod memnet;
pub mod quic;
pub mod shm;
pub mod tcp;

use async_trait::async_trait;
use bytes::Bytes;

/// Identifies which collective, and which point of it, a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// The membership epoch the collective runs in.
    pub epoch: u64,
    /// The collective's sequence number within the epoch (per communicator).
    pub seq: u64,
    /// Fingerprint of the call (kind, length, dtype, op): peers that disagree see a
    /// different fingerprint on the first frame and report a mismatch.
    pub call: u64,
    /// Index of this frame among the frames of this collective sent over this link in
    /// this direction: both ends count, so a lost or extra frame is caught at once.
    pub index: u64,
}

impl Header {
    /// Encoded size in bytes.
    pub const LEN: usize = 32;

    /// Encodes the header little-endian.
    pub fn encode(&self) -> [u8; Header::LEN] {
        let mut out = [0u8; Header::LEN];
        out[0..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.call.to_le_bytes());
        out[24..32].copy_from_slice(&self.index.to_le_bytes());
        out
    }

    /// Decodes a header; `None` when `bytes` is not exactly [`Header::LEN`] long.
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        let b: &[u8; Header::LEN] = bytes.try_into().ok()?;
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Some(Header { epoch: u64_at(0), seq: u64_at(8), call: u64_at(16), index: u64_at(24) })
    }
}

/// What precedes a frame's payload on a byte stream (QUIC stream, TCP, a shared-memory
/// ring): its header, then the payload's length (u64 LE).
pub(crate) const PREFIX_LEN: usize = Header::LEN + 8;

/// The stream prefix of `frame` (see [`PREFIX_LEN`]).
pub(crate) fn encode_prefix(frame: &Frame) -> [u8; PREFIX_LEN] {
    prefix_of(&frame.header, frame.payload.len())
}

/// The stream prefix of a frame of `header` and a payload of `len` bytes.
pub(crate) fn prefix_of(header: &Header, len: usize) -> [u8; PREFIX_LEN] {
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[..Header::LEN].copy_from_slice(&header.encode());
    prefix[Header::LEN..].copy_from_slice(&(len as u64).to_le_bytes());
    prefix
}

/// Reads a stream prefix: the header and the payload's length, refusing a frame over
/// `max_frame_bytes` (header included) before anything is allocated for it.
pub(crate) fn decode_prefix(prefix: &[u8], max_frame_bytes: usize) -> Result<(Header, usize), LinkError> {
    if prefix.len() != PREFIX_LEN {
        return Err(LinkError::Malformed(format!("a frame prefix of {} bytes, not {PREFIX_LEN}", prefix.len())));
    }
    let header =
        Header::decode(&prefix[..Header::LEN]).ok_or_else(|| LinkError::Malformed("bad frame header".into()))?;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&prefix[Header::LEN..]);
    let len = u64::from_le_bytes(len_bytes);
    let total = len.saturating_add(Header::LEN as u64);
    if total > max_frame_bytes as u64 {
        return Err(LinkError::FrameTooLarge {
            len: usize::try_from(total).unwrap_or(usize::MAX),
            limit: max_frame_bytes,
        });
    }
    // Within the limit, which is a usize, so the length fits one.
    Ok((header, len as usize))
}

/// One message on a link: a header and the bytes of one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Where the frame belongs.
    pub header: Header,
    /// The chunk's bytes.
    pub payload: Bytes,
}

/// Why a link operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer closed the link, crashed, or the connection broke.
    #[error("link closed: {0}")]
    Closed(String),
    /// A frame exceeded the transport's size limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The frame's size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The peer sent bytes that do not decode as a frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// An ordered, reliable, framed, bounded message channel to one peer.
///
/// `send` and `recv` may run concurrently with each other (from one task each), but
/// not with themselves. After either returns [`LinkError::Closed`], both keep failing.
#[async_trait]
pub trait Link: Send + Sync {
    /// Queues `frame` for the peer, waiting while the link's buffer is full.
    async fn send(&self, frame: Frame) -> Result<(), LinkError>;
    /// Sends a frame of `header` and a copy of `payload`, as [`Link::send`] does. A link
    /// that copies frames into a buffer of its own (shared memory) or writes them to its
    /// socket itself (TCP) takes the bytes straight from `payload`, saving the frame's
    /// allocation and one copy; the others (this default) copy it into a frame first.
    /// Cancel-safe like `send`: a cancelled call has handed over the whole frame or none
    /// of it.
    async fn send_slice(&self, header: Header, payload: &[u8]) -> Result<(), LinkError> {
        self.send(Frame { header, payload: Bytes::copy_from_slice(payload) }).await
    }
    /// Waits for the peer's next frame.
    async fn recv(&self) -> Result<Frame, LinkError>;
    /// Closes the link: the peer's pending and future calls fail with `Closed`.
    fn close(&self);
    /// Whether the payloads `recv` returns may be lent out of the link's own buffer
    /// (shared memory: the peer's ring), which the peer cannot reuse while a payload is
    /// held. Whoever keeps a received payload longer than it takes to consume it (and
    /// then waits for more from the same link) copies it first when this is `true`;
    /// this default says `false`.
    fn lends_frames(&self) -> bool {
        false
    }

    /// Sends `frames` in order, as [`Link::send`] does one by one. A link that can
    /// (QUIC, on one stripe) writes them together, so that small frames leave in one
    /// packet; this default sends them one by one, and a cancelled call has then handed
    /// over the frames before the one it was sending.
    async fn send_many(&self, frames: Vec<Frame>) -> Result<(), LinkError> {
        for frame in frames {
            self.send(frame).await?;
        }
        Ok(())
    }

    /// Hands every frame this link receives from now on to `sink`, from the link's own
    /// thread, in place of `recv` (which then fails); returns whether it does. A
    /// [`Demux`](demux::Demux) asks when it starts: a link that reads on a thread of its
    /// own anyway (shared memory) saves the hand-off to the demultiplexer's task for each
    /// frame. This default says no, and the demultiplexer reads with `recv`.
    fn deliver_to(&self, sink: FrameSink) -> bool {
        let _ = sink;
        false
    }
}
