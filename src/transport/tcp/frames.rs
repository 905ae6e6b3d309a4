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

/// How far a reader reads past the bytes it needs.
///
/// Reading a prefix through the [`READ_CHUNK`] buffer takes one system call for a small
/// frame, but when a large payload follows, the same read pulls most of it into the
/// buffer, from where it is copied again into the payload's own buffer: 6–8 % of the
/// CPU of a 64 MiB all-reduce over TCP (perf, 2026-12-07). After a large frame the next
/// is most likely large too, so the reader then asks for exactly what it needs, and the
/// socket writes the payload straight into its own buffer; a small frame goes back to
/// buffered reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum ReadAhead {
    /// Read as much as the socket has, up to the buffer's room.
    #[default]
    Buffered,
    /// Read no byte past the ones needed.
    Exact,
}

impl ReadAhead {
    /// The mode for the frame after one whose payload had `len` bytes.
    pub(super) fn after(len: usize) -> ReadAhead {
        if len > SMALL_PAYLOAD {
            ReadAhead::Exact
        } else {
            ReadAhead::Buffered
        }
    }
}

/// Frames as they are, read through a buffer of [`READ_CHUNK`].
pub(super) struct StreamReader<R> {
    read: R,
    buf: BytesMut,
    pool: Arc<BufferPool>,
    ahead: ReadAhead,
}

impl<R> StreamReader<R> {
    pub(super) fn new(read: R) -> StreamReader<R> {
        StreamReader {
            read,
            buf: BytesMut::with_capacity(READ_CHUNK),
            pool: BufferPool::new(RECEIVE_POOL_BYTES),
            ahead: ReadAhead::Buffered,
        }
    }
}

impl<R: AsyncRead + Unpin + Send + 'static> FrameReader for StreamReader<R> {
    async fn read_frame(&mut self, max_frame_bytes: usize) -> Result<Frame, LinkError> {
        let (read, buf, ahead) = (&mut self.read, &mut self.buf, self.ahead);
        fill(read, buf, PREFIX_LEN, ahead).await?;
        let prefix = buf.split_to(PREFIX_LEN);
        let (header, len) = decode_prefix(&prefix, max_frame_bytes)?;
        let payload = read_exactly(read, buf, len, &self.pool, ahead).await.map_err(mid_frame)?;
        self.ahead = ReadAhead::after(len);
        Ok(Frame { header, payload: payload.into_bytes(&self.pool) })
    }
}

/// Reads until `buf` holds at least `need` bytes (exactly `need` with
/// [`ReadAhead::Exact`]).
pub(super) async fn fill<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    need: usize,
    ahead: ReadAhead,
) -> Result<(), LinkError> {
    while buf.len() < need {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK.max(need - buf.len()));
        }
        let got = match ahead {
            ReadAhead::Buffered => read.read_buf(buf).await,
            ReadAhead::Exact => (&mut *read).take((need - buf.len()) as u64).read_buf(buf).await,
        };
        match got {
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
/// that each byte is copied once from the kernel, into memory already mapped (what
/// `buf` already held of it is copied over: none with [`ReadAhead::Exact`]).
pub(super) async fn read_exactly<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    len: usize,
    pool: &BufferPool,
    ahead: ReadAhead,
) -> Result<Chunk, LinkError> {
    if buf.len() >= len || len <= SMALL_PAYLOAD {
        fill(read, buf, len, ahead).await?;
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

#[cfg(test)]
pub(super) mod tests {
    use std::io;
    use std::ops::Range;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;
    use crate::transport::{prefix_of, Header};

    /// Serves a byte stream, at most `most` bytes per read, and records where each read
    /// began and how many bytes it asked for.
    pub(in crate::transport::tcp) struct Recorded {
        pub data: Vec<u8>,
        pub at: usize,
        pub most: usize,
        pub reads: Vec<Range<usize>>,
    }

    impl Recorded {
        pub(in crate::transport::tcp) fn new(data: Vec<u8>, most: usize) -> Recorded {
            Recorded { data, at: 0, most, reads: Vec::new() }
        }

        /// The reads that began inside `span` and asked for bytes past its end.
        pub(in crate::transport::tcp) fn past(&self, span: &Range<usize>) -> usize {
            self.reads.iter().filter(|r| span.contains(&r.start) && r.end > span.end).count()
        }
    }

    impl AsyncRead for Recorded {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let me = &mut *self;
            me.reads.push(me.at..me.at + buf.remaining());
            let n = buf.remaining().min(me.most).min(me.data.len() - me.at);
            buf.put_slice(&me.data[me.at..me.at + n]);
            me.at += n;
            Poll::Ready(Ok(()))
        }
    }

    pub(in crate::transport::tcp) fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (k * 31 + i * 7) as u8).collect()
    }

    pub(in crate::transport::tcp) fn header(i: usize) -> Header {
        Header { epoch: 1, seq: 2, call: 3, index: i as u64 }
    }

    /// The frames of [`SIZES`]: small, large, large, small, large.
    pub(in crate::transport::tcp) const SIZES: [usize; 5] = [100, 300 << 10, 300 << 10, 1000, 200 << 10];

    /// The reads of the third and fourth frames (after a large one) ask for their
    /// prefix and no more, those of the second (after a small one) for a buffer's worth;
    /// every frame arrives whole, whatever the socket hands over per read.
    #[tokio::test]
    async fn after_a_large_frame_the_reader_reads_no_further_than_it_needs() {
        let (mut stream, mut prefixes) = (Vec::new(), Vec::new());
        for (i, &len) in SIZES.iter().enumerate() {
            prefixes.push(stream.len()..stream.len() + PREFIX_LEN);
            stream.extend_from_slice(&prefix_of(&header(i), len));
            stream.extend_from_slice(&payload(i, len));
        }
        reads_no_further_than_needed(&stream, &prefixes, StreamReader::new, |r| &r.read).await;
    }

    /// Reads the frames of [`SIZES`] from `stream` with readers `make` builds, at 7, 5000
    /// and unbounded bytes per read: each arrives whole, the reads that begin in the
    /// third and fourth frames' `spans` (after a large frame) ask for nothing past them,
    /// and some read in the fifth's (after a small frame) does.
    pub(in crate::transport::tcp) async fn reads_no_further_than_needed<R: FrameReader>(
        stream: &[u8],
        spans: &[Range<usize>],
        make: impl Fn(Recorded) -> R,
        recorded: impl Fn(&R) -> &Recorded,
    ) {
        for most in [usize::MAX, 5000, 7] {
            let mut reader = make(Recorded::new(stream.to_vec(), most));
            for (i, &len) in SIZES.iter().enumerate() {
                let frame = reader.read_frame(1 << 30).await.unwrap();
                assert_eq!(frame.header, header(i));
                assert!(frame.payload[..] == payload(i, len)[..], "frame {i}, {most} bytes per read");
            }
            let past: Vec<usize> = spans.iter().map(|p| recorded(&reader).past(p)).collect();
            assert_eq!(&past[2..4], [0, 0], "{most} bytes per read");
            assert!(past[4] > 0, "buffered again after a small frame: {past:?}");
        }
    }
}
