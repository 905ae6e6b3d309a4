//! [`TcpLink`]: one end of a TCP link (TLS or plaintext), its [`Link`] implementation,
//! and the two tasks that write and read the length-prefixed frames on the connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use super::frames::{FrameReader, FrameWriter, StreamReader, StreamWriter};
use super::TcpSecurity;
use crate::transport::buffers::BufferPool;
use crate::transport::{Frame, Header, Link, LinkError};

/// How many free bytes a link keeps for the chunks `send_slice` copies: four default
/// chunks; at most two are out at once (one in the writer's channel, one on the socket).
pub(super) const SEND_POOL_BYTES: usize = 1 << 20;

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
    /// The buffers `send_slice` copies into, given back by the writer task.
    pub(super) send_buffers: Arc<BufferPool>,
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
    /// Starts the link's tasks on the two halves of an authenticated connection, frames
    /// as they are (plaintext).
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
        TcpLink::start(StreamReader::new(read), StreamWriter(write), max_frame_bytes, peer, security)
    }

    /// Starts the link's tasks on a frame reader and writer.
    pub(super) fn start(
        read: impl FrameReader,
        write: impl FrameWriter,
        max_frame_bytes: usize,
        peer: SocketAddr,
        security: TcpSecurity,
    ) -> TcpLink {
        let down = Arc::new(Down {
            flag: watch::channel(false).0,
            reason: StdMutex::new(None),
            local: AtomicBool::new(false),
        });
        let (frame_tx, frame_rx) = mpsc::channel(1);
        let (got_tx, got_rx) = mpsc::channel(1);
        let send_buffers = BufferPool::new(SEND_POOL_BYTES);
        tokio::spawn(write_loop(write, frame_rx, send_buffers.clone(), down.clone()));
        tokio::spawn(read_loop(read, got_tx, max_frame_bytes, down.clone()));
        TcpLink {
            sender: frame_tx,
            send_buffers,
            receiver: tokio::sync::Mutex::new(got_rx),
            down,
            max_frame_bytes,
            peer,
            security,
        }
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

    /// Copies `payload` into a buffer the writer task gives back once the frame is on the
    /// socket (see [`BufferPool`]): the copy `send` needs, without a fresh mapping each time.
    async fn send_slice(&self, header: Header, payload: &[u8]) -> Result<(), LinkError> {
        let mut buf = self.send_buffers.take(payload.len());
        buf.extend_from_slice(payload);
        self.send(Frame { header, payload: Bytes::from(buf) }).await
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

/// Writes frames until the link goes down; then drops its half of the connection. The
/// payload buffers it ends up holding alone go back to `buffers`.
async fn write_loop(
    mut write: impl FrameWriter,
    mut frames: mpsc::Receiver<Frame>,
    buffers: Arc<BufferPool>,
    down: Arc<Down>,
) {
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
        let written = tokio::select! {
            r = write.write_frame(frame) => r,
            _ = stop.wait_for(|d| *d) => return,
        };
        match written {
            Ok(Some(mut used)) => {
                // Emptied first: the conversion to a `Vec` moves what is left to its front.
                used.clear();
                buffers.give(used.into());
            }
            Ok(None) => {}
            Err(e) => {
                down.fail(format!("connection lost while sending: {e}"));
                return;
            }
        }
    }
}

/// Reads frames and hands them to `recv` until the link goes down or the connection
/// fails; a failure is handed over as the last item, and takes the link down.
async fn read_loop(
    mut read: impl FrameReader,
    frames: mpsc::Sender<Result<Frame, LinkError>>,
    max_frame_bytes: usize,
    down: Arc<Down>,
) {
    let mut stop = down.flag.subscribe();
    loop {
        let got = tokio::select! {
            got = read.read_frame(max_frame_bytes) => got,
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
