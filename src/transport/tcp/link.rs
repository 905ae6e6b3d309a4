//! [`TcpLink`]: one end of a TCP link (TLS or plaintext), its [`Link`] implementation,
//! and the two tasks that write and read the length-prefixed frames on the connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::TcpSecurity;
use crate::transport::{decode_prefix, encode_prefix, Frame, Header, Link, LinkError, PREFIX_LEN};

/// The reader asks the socket for at least this much at a time.
const READ_CHUNK: usize = 256 << 10;
/// Payloads up to this size are read into the shared read buffer and sliced out of it;
/// larger ones get a buffer of their own that the socket fills directly.
const SMALL_PAYLOAD: usize = 64 << 10;

/// What the two tasks and the link share: whether the link is down, and why.
struct Down {
    /// Set by [`Link::close`], by dropping the link, or by a task that failed.
    flag: watch::Sender<bool>,
    /// The first reason recorded.
    reason: StdMutex<Option<String>>,
    /// Closed by its owner (rather than broken).
    local: AtomicBool,
}

impl Down {
    fn fail(&self, why: String) {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        self.flag.send_replace(true);
    }

    fn error(&self) -> LinkError {
        if self.local.load(Ordering::Acquire) {
            return LinkError::Closed("closed locally".into());
        }
        let reason = self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
        LinkError::Closed(reason.unwrap_or_else(|| "connection closed".into()))
    }
}

/// One end of a TCP link; see the [module docs](super).
///
/// A writer task, fed by `send` through a one-frame channel, and a reader task, feeding
/// `recv` through a one-frame channel, own the connection's two halves, so that `send`
/// and `recv` are cancel-safe: a cancelled call has handed over a whole frame or none.
pub struct TcpLink {
    sender: mpsc::Sender<Frame>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Result<Frame, LinkError>>>,
    down: Arc<Down>,
    max_frame_bytes: usize,
    peer: SocketAddr,
    security: TcpSecurity,
}

impl fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpLink")
            .field("peer", &self.peer)
            .field("security", &self.security)
            .field("down", &*self.down.flag.borrow())
            .finish()
    }
}

impl TcpLink {
    /// Starts the link's tasks on the two halves of an authenticated connection.
    pub(super) fn new<R, W>(
        read: R,
        write: W,
        max_frame_bytes: usize,
        peer: SocketAddr,
        security: TcpSecurity,
    ) -> TcpLink
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let down = Arc::new(Down {
            flag: watch::channel(false).0,
            reason: StdMutex::new(None),
            local: AtomicBool::new(false),
        });
        let (frame_tx, frame_rx) = mpsc::channel(1);
        let (got_tx, got_rx) = mpsc::channel(1);
        tokio::spawn(write_loop(write, frame_rx, down.clone()));
        tokio::spawn(read_loop(read, got_tx, max_frame_bytes, down.clone()));
        TcpLink { sender: frame_tx, receiver: tokio::sync::Mutex::new(got_rx), down, max_frame_bytes, peer, security }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the link is encrypted (TLS) or plaintext.
    pub fn security(&self) -> TcpSecurity {
        self.security
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl Link for TcpLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        let len = Header::LEN.saturating_add(frame.payload.len());
        if len > self.max_frame_bytes {
            return Err(LinkError::FrameTooLarge { len, limit: self.max_frame_bytes });
        }
        if *self.down.flag.borrow() {
            return Err(self.down.error());
        }
        // Cancel-safe: a cancelled `send` queues nothing. Fails once the writer is gone.
        self.sender.send(frame).await.map_err(|_| self.down.error())
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        if self.down.local.load(Ordering::Acquire) {
            return Err(self.down.error());
        }
        let mut down = self.down.flag.subscribe();
        let mut receiver = self.receiver.lock().await;
        // Frames the reader handed over before the link broke are still delivered
        // (`biased`), and so is the reader's own error: once the link is down the reader
        // hands over at most that error and ends (dropping its sender), so the second
        // `recv` below returns at once.
        let got = tokio::select! {
            biased;
            got = receiver.recv() => Some(got),
            _ = down.wait_for(|d| *d) => None,
        };
        let got = match got {
            Some(got) => got,
            None if self.down.local.load(Ordering::Acquire) => None,
            None => receiver.recv().await,
        };
        match got {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => Err(e),
            None => Err(self.down.error()),
        }
    }

    fn close(&self) {
        self.down.local.store(true, Ordering::Release);
        self.down.flag.send_replace(true);
    }
}

/// Writes frames (header, length, payload in one vectored write) until the link goes
/// down; then drops its half of the connection.
async fn write_loop<W: AsyncWrite + Unpin>(mut write: W, mut frames: mpsc::Receiver<Frame>, down: Arc<Down>) {
    let mut stop = down.flag.subscribe();
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            _ = stop.wait_for(|d| *d) => return,
        };
        let Some(frame) = frame else {
            // The link was dropped.
            down.fail("the link was dropped".into());
            return;
        };
        let prefix = encode_prefix(&frame);
        let mut bytes = Buf::chain(&prefix[..], frame.payload);
        let written = tokio::select! {
            r = async {
                write.write_all_buf(&mut bytes).await?;
                write.flush().await
            } => r,
            _ = stop.wait_for(|d| *d) => return,
        };
        if let Err(e) = written {
            down.fail(format!("connection lost while sending: {e}"));
            return;
        }
    }
}

/// Reads frames and hands them to `recv` until the link goes down or the connection
/// fails; a failure is handed over as the last item, and takes the link down.
async fn read_loop<R: AsyncRead + Unpin>(
    mut read: R,
    frames: mpsc::Sender<Result<Frame, LinkError>>,
    max_frame_bytes: usize,
    down: Arc<Down>,
) {
    let mut stop = down.flag.subscribe();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let got = tokio::select! {
            got = read_frame(&mut read, &mut buf, max_frame_bytes) => got,
            _ = stop.wait_for(|d| *d) => return,
        };
        let failed = got.as_ref().err().map(ToString::to_string);
        if let Some(why) = failed {
            down.fail(why);
        }
        tokio::select! {
            sent = frames.send(got) => if sent.is_err() { return },
            // Closed locally: `recv` fails by itself; stop waiting for it.
            _ = stop.wait_for(|_| down.local.load(Ordering::Acquire)) => return,
        }
        if *down.flag.borrow() {
            return;
        }
    }
}

/// Reads until `buf` holds at least `need` bytes.
async fn fill<R: AsyncRead + Unpin>(read: &mut R, buf: &mut BytesMut, need: usize) -> Result<(), LinkError> {
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

/// Reads one frame, refusing an oversized one before allocating for it. Small payloads
/// are sliced out of `buf`; a large one is read straight into a buffer of its own.
pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    max_frame_bytes: usize,
) -> Result<Frame, LinkError> {
    fill(read, buf, PREFIX_LEN).await?;
    let prefix = buf.split_to(PREFIX_LEN);
    let (header, len) = decode_prefix(&prefix, max_frame_bytes)?;
    if buf.len() >= len || len <= SMALL_PAYLOAD {
        fill(read, buf, len).await.map_err(mid_frame)?;
        return Ok(Frame { header, payload: buf.split_to(len).freeze() });
    }
    let mut payload = BytesMut::with_capacity(len);
    payload.extend_from_slice(&buf.split());
    let mut rest = (&mut *read).take((len - payload.len()) as u64);
    while payload.len() < len {
        match rest.read_buf(&mut payload).await {
            Ok(0) => return Err(torn()),
            Ok(_) => {}
            Err(e) => return Err(lost(e)),
        }
    }
    Ok(Frame { header, payload: payload.freeze() })
}

/// The connection ended inside a frame: TCP delivers everything that was sent, so the
/// peer's process died or it dropped the link mid-frame.
fn torn() -> LinkError {
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
fn mid_frame(e: LinkError) -> LinkError {
    match e {
        LinkError::Closed(why) if why == "closed by the peer" => torn(),
        other => other,
    }
}
