//! [`TcpLink`]: one end of a TCP link (TLS or plaintext), its [`Link`] implementation,
//! and the task that reads the length-prefixed frames off the connection (senders write
//! their own: `writer`).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use tokio::io::AsyncRead;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

use super::frames::{FrameReader, StreamReader};
use super::sealed::Sealer;
use super::writer::{Payload, Writer};
use super::TcpSecurity;
use crate::transport::{Frame, Header, Link, LinkError};

/// What the reader task, the senders and the link share: whether the link is down, and
/// why.
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
/// Senders write to the connection themselves, one frame at a time ([`Writer`]); a
/// reader task feeds `recv` through a one-frame channel. Both are cancel-safe: a
/// cancelled call has handed over a whole frame or none.
pub struct TcpLink {
    pub(super) writer: Arc<Writer>,
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
    /// Starts the link on the two halves of an authenticated connection, frames as they
    /// are (plaintext).
    pub(super) fn new(
        read: impl AsyncRead + Unpin + Send + 'static,
        write: OwnedWriteHalf,
        max_frame_bytes: usize,
        peer: SocketAddr,
        security: TcpSecurity,
    ) -> TcpLink {
        TcpLink::start(StreamReader::new(read), write, None, max_frame_bytes, peer, security)
    }

    /// Starts the link on a frame reader and the sending half, sealed with `sealer` when
    /// the link is encrypted.
    pub(super) fn start(
        read: impl FrameReader,
        write: OwnedWriteHalf,
        sealer: Option<Sealer>,
        max_frame_bytes: usize,
        peer: SocketAddr,
        security: TcpSecurity,
    ) -> TcpLink {
        let down = Arc::new(Down {
            flag: watch::channel(false).0,
            reason: StdMutex::new(None),
            local: AtomicBool::new(false),
        });
        let (got_tx, got_rx) = mpsc::channel(1);
        let writer = Arc::new(Writer::new(write, sealer, down.flag.subscribe()));
        tokio::spawn(shut_when_down(writer.clone(), down.flag.subscribe()));
        tokio::spawn(read_loop(read, got_tx, max_frame_bytes, down.clone()));
        TcpLink { writer, receiver: tokio::sync::Mutex::new(got_rx), down, max_frame_bytes, peer, security }
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

impl TcpLink {
    /// Writes one frame on the connection, or fails once the link is down.
    async fn write(&self, header: Header, payload: Payload<'_>) -> Result<(), LinkError> {
        let len = Header::LEN.saturating_add(payload.len());
        if len > self.max_frame_bytes {
            return Err(LinkError::FrameTooLarge { len, limit: self.max_frame_bytes });
        }
        let mut down = self.down.flag.subscribe();
        if *down.borrow_and_update() {
            return Err(self.down.error());
        }
        // A send waiting for room gives up when the link goes down (a partitioned peer
        // never makes room), and lets the connection be shut.
        let written = tokio::select! {
            written = self.writer.write(header, payload) => written,
            _ = down.wait_for(|d| *d) => return Err(self.down.error()),
        };
        written.map_err(|e| {
            self.down.fail(format!("connection lost while sending: {e}"));
            self.down.error()
        })
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
        self.write(frame.header, Payload::Owned(frame.payload)).await
    }

    /// Writes `payload` from where it lies (plaintext), or seals a copy of it (TLS).
    async fn send_slice(&self, header: Header, payload: &[u8]) -> Result<(), LinkError> {
        self.write(header, Payload::Slice(payload)).await
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

/// Shuts the sending half once the link goes down (closed here or broken): the peer
/// reads the end of the stream.
async fn shut_when_down(writer: Arc<Writer>, mut down: watch::Receiver<bool>) {
    let _ = down.wait_for(|d| *d).await;
    writer.shut().await;
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
