//! How frames are read off a TCP connection: [`FrameReader`], what a link's reader task
//! drives. [`StreamReader`] reads them as they are (plaintext TCP); `sealed` opens the
//! AEAD records of TLS links. Frames are written by `writer`.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::transport::buffers::{BufferPool, RECEIVE_POOL_BYTES};
use crate::transport::{decode_prefix, Frame, LinkError, PREFIX_LEN};

/// The reader asks the socket for at least this much at a time.
pub(super) const READ_CHUNK: usize = 256 << 10;
/// Payloads up to this size are read into the shared read buffer and sliced out of it;
/// larger ones get a buffer of their own that the socket fills directly.
pub(super) const SMALL_PAYLOAD: usize = 64 << 10;

/// Reads whole frames from one connection.
pub(super) trait FrameReader: Send + 'static {
    /// Reads the next frame, refusing one above `max_frame_bytes` before allocating.
    fn read_frame(&mut self, max_frame_bytes: usize) -> impl Future<Output = Result<Frame, LinkError>> + Send;
}

/// Frames as they are, read through a buffer of [`READ_CHUNK`].
pub(super) struct StreamReader<R> {
    read: R,
    buf: BytesMut,
    pool: Arc<BufferPool>,
}

impl<R> StreamReader<R> {
    pub(super) fn new(read: R) -> StreamReader<R> {
        StreamReader { read, buf: BytesMut::with_capacity(READ_CHUNK), pool: BufferPool::new(RECEIVE_POOL_BYTES) }
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> FrameReader for StreamReader<R> {
    async fn read_frame(&mut self, max_frame_bytes: usize) -> Result<Frame, LinkError> {
        let (read, buf) = (&mut self.read, &mut self.buf);
        fill(read, buf, PREFIX_LEN).await?;
        let prefix = buf.split_to(PREFIX_LEN);
        let (header, len) = decode_prefix(&prefix, max_frame_bytes)?;
        let payload = read_exactly(read, buf, len, &self.pool).await.map_err(mid_frame)?;
        Ok(Frame { header, payload: payload.into_bytes(&self.pool) })
    }
}

/// Reads until `buf` holds at least `need` bytes.
pub(super) async fn fill<R: AsyncRead + Unpin>(read: &mut R, buf: &mut BytesMut, need: usize) -> Result<(), LinkError> {
    while buf.len() < need {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK.max(need - buf.len()));
        }
        match read.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(LinkError::Closed("closed by the peer".into())),
            Ok(0) => return Err(torn()),
            Ok(_) => {}
            // TLS: the connection ended without a close_notify, as when a process dies.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && buf.is_empty() => {
                return Err(LinkError::Closed("closed by the peer".into()))
            }
            Err(e) => return Err(lost(e)),
        }
    }
    Ok(())
}

/// Bytes read from the connection by [`read_exactly`]: sliced out of the read buffer,
/// or a large payload in a buffer of its own from the reader's pool.
#[derive(Clone, Debug)]
pub(super) enum Chunk {
    Sliced(BytesMut),
    Own(Vec<u8>),
}

impl Chunk {
    /// Keeps the first `len` bytes.
    pub(super) fn truncate(&mut self, len: usize) {
        match self {
            Chunk::Sliced(b) => b.truncate(len),
            Chunk::Own(v) => v.truncate(len),
        }
    }

    /// The bytes as a frame payload: an own buffer goes back to `pool` when dropped.
    pub(super) fn into_bytes(self, pool: &Arc<BufferPool>) -> Bytes {
        match self {
            Chunk::Sliced(b) => b.freeze(),
            Chunk::Own(v) => pool.bytes(v),
        }
    }

    /// The bytes as a buffer to cut further (no copy).
    pub(super) fn into_bytes_mut(self) -> BytesMut {
        match self {
            Chunk::Sliced(b) => b,
            Chunk::Own(v) => BytesMut::from(Bytes::from(v)),
        }
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Chunk::Sliced(b) => b,
            Chunk::Own(v) => v,
        }
    }
}

impl DerefMut for Chunk {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Chunk::Sliced(b) => b,
            Chunk::Own(v) => v,
        }
    }
}

/// The next `len` bytes of the connection (after what `buf` holds). Small ones are sliced
/// out of `buf`; a large one is read straight into a buffer of its own from `pool`, so
/// that each byte is copied once from the kernel, into memory already mapped.
pub(super) async fn read_exactly<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    len: usize,
    pool: &BufferPool,
) -> Result<Chunk, LinkError> {
    if buf.len() >= len || len <= SMALL_PAYLOAD {
        fill(read, buf, len).await?;
        return Ok(Chunk::Sliced(buf.split_to(len)));
    }
    let mut out = pool.take(len);
    out.extend_from_slice(&buf.split());
    let mut rest = (&mut *read).take((len - out.len()) as u64);
    while out.len() < len {
        match rest.read_buf(&mut out).await {
            Ok(0) => return Err(torn()),
            Ok(_) => {}
            Err(e) => return Err(lost(e)),
        }
    }
    Ok(Chunk::Own(out))
}

/// The connection ended inside a frame: TCP delivers everything that was sent, so the
/// peer's process died or it dropped the link mid-frame.
pub(super) fn torn() -> LinkError {
    LinkError::Closed("the connection ended inside a frame (the peer crashed or closed mid-send)".into())
}

/// A read error in words; an unexpected end inside a frame is a torn frame.
fn lost(e: std::io::Error) -> LinkError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => torn(),
        _ => LinkError::Closed(format!("connection lost: {e}")),
    }
}

/// An end of the connection inside a payload is a torn frame, not a clean close.
pub(super) fn mid_frame(e: LinkError) -> LinkError {
    match e {
        LinkError::Closed(why) if why == "closed by the peer" => torn(),
        other => other,
    }
}
