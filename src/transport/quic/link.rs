//! [`QuicLink`]: one end of a link, its [`Link`] implementation, and the per-stripe
//! tasks that write and read the length-prefixed frames on the QUIC streams.

use std::fmt;
use std::net::SocketAddr;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, ReadError, ReadExactError, VarInt};
use tokio::sync::{mpsc, watch};

use super::sizing::LinkSizing;
use super::stripes::Stripe;
use super::{CODE_CLOSED, CODE_FRAME_TOO_LARGE, CODE_PROTOCOL};
use crate::transport::{decode_prefix, encode_prefix, Frame, Header, Link, LinkError, PREFIX_LEN};

/// One end of a QUIC link; see the [module docs](super).
///
/// Each stripe has a writer task, fed by `send` through a one-frame channel, and a
/// reader task, feeding `recv` through a one-frame channel, so that `send` and `recv`
/// are cancel-safe: a cancelled call has either handed over a whole frame or none.
pub struct QuicLink {
    conns: Vec<quinn::Connection>,
    /// Per stripe: the frames of one `send` (one frame) or `send_many` (several).
    senders: Vec<mpsc::Sender<Vec<Frame>>>,
    /// Index of the next frame to send.
    send_next: tokio::sync::Mutex<usize>,
    recv_state: tokio::sync::Mutex<RecvState>,
    closed: watch::Sender<bool>,
    max_frame_bytes: usize,
    peer: SocketAddr,
    sizing: LinkSizing,
}

struct RecvState {
    /// Index of the next frame to receive.
    next: usize,
    receivers: Vec<mpsc::Receiver<Result<Frame, LinkError>>>,
    /// Once set, every later `recv` returns it.
    failed: Option<LinkError>,
}

impl fmt::Debug for QuicLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicLink")
            .field("peer", &self.peer)
            .field("stripes", &self.conns.len())
            .field("closed", &*self.closed.borrow())
            .finish()
    }
}

impl QuicLink {
    pub(super) fn new(stripes: Vec<Stripe>, max_frame_bytes: usize, peer: SocketAddr, sizing: LinkSizing) -> QuicLink {
        let closed = watch::channel(false).0;
        let conns: Vec<quinn::Connection> = stripes.iter().map(|s| s.conn.clone()).collect();
        let mut senders = Vec::with_capacity(stripes.len());
        let mut receivers = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            let (frame_tx, frame_rx) = mpsc::channel(1);
            let (got_tx, got_rx) = mpsc::channel(1);
            tokio::spawn(write_loop(stripe.conn.clone(), stripe.send, frame_rx));
            tokio::spawn(read_loop(conns.clone(), stripe.recv, got_tx, max_frame_bytes, closed.subscribe()));
            senders.push(frame_tx);
            receivers.push(got_rx);
        }
        QuicLink {
            conns,
            senders,
            send_next: tokio::sync::Mutex::new(0),
            recv_state: tokio::sync::Mutex::new(RecvState { next: 0, receivers, failed: None }),
            closed,
            max_frame_bytes,
            peer,
            sizing,
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Number of QUIC connections the link stripes its frames over.
    pub fn stripes(&self) -> usize {
        self.conns.len()
    }

    /// How this end sized the link at setup: the round trip it measured, and each
    /// connection's windows (see [`QuicConfig::window_rate_bps`](super::QuicConfig)).
    pub fn sizing(&self) -> LinkSizing {
        self.sizing
    }

    /// The round trip of the link now, as its first connection estimates it.
    pub fn rtt(&self) -> std::time::Duration {
        self.conns.first().map_or(std::time::Duration::ZERO, quinn::Connection::rtt)
    }

    /// Why the link is closed, from the first connection that knows.
    fn closed_error(&self) -> LinkError {
        if *self.closed.borrow() {
            return LinkError::Closed("closed locally".into());
        }
        let reason = self
            .conns
            .iter()
            .find_map(|c| c.close_reason())
            .map(|e| describe(&e))
            .unwrap_or_else(|| "connection closed".into());
        LinkError::Closed(reason)
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        self.close();
    }
}

impl QuicLink {
    /// Hands `frames` (one, or several on a link of one stripe) to the next stripe's
    /// writer, refusing them all if one is too large. Cancel-safe: a cancelled call
    /// queues nothing and leaves the frame count alone.
    async fn hand_over(&self, frames: Vec<Frame>) -> Result<(), LinkError> {
        for frame in &frames {
            let len = Header::LEN.saturating_add(frame.payload.len());
            if len > self.max_frame_bytes {
                return Err(LinkError::FrameTooLarge { len, limit: self.max_frame_bytes });
            }
        }
        if *self.closed.borrow() {
            return Err(LinkError::Closed("closed locally".into()));
        }
        let mut next = self.send_next.lock().await;
        let count = frames.len();
        let tx = &self.senders[*next % self.senders.len()];
        tx.send(frames).await.map_err(|_| self.closed_error())?;
        *next += count;
        Ok(())
    }
}

#[async_trait]
impl Link for QuicLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        self.hand_over(vec![frame]).await
    }

    /// On a link of one stripe (control connections), the frames go to the stripe's
    /// writer together and into the stream in one write, so small ones leave in one
    /// packet; cancel-safe like `send`, for all of them at once. Over several stripes,
    /// one by one.
    async fn send_many(&self, frames: Vec<Frame>) -> Result<(), LinkError> {
        if self.senders.len() == 1 {
            return self.hand_over(frames).await;
        }
        for frame in frames {
            self.hand_over(vec![frame]).await?;
        }
        Ok(())
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(LinkError::Closed("closed locally".into()));
        }
        let mut state = self.recv_state.lock().await;
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        let stripe = state.next % state.receivers.len();
        let got = tokio::select! {
            got = state.receivers[stripe].recv() => got,
            _ = closed.changed() => return Err(LinkError::Closed("closed locally".into())),
        };
        match got {
            Some(Ok(frame)) => {
                state.next += 1;
                Ok(frame)
            }
            Some(Err(e)) => {
                state.failed = Some(match &e {
                    LinkError::Closed(_) => e.clone(),
                    other => LinkError::Closed(format!("link closed after an error: {other}")),
                });
                Err(e)
            }
            None => {
                let e = self.closed_error();
                state.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn close(&self) {
        self.closed.send_replace(true);
        for conn in &self.conns {
            conn.close(CODE_CLOSED, b"link closed");
        }
    }
}

/// A connection failure in words, decoding our close codes.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            match close.error_code {
                c if c == CODE_CLOSED => "closed by the peer".into(),
                c if c == CODE_FRAME_TOO_LARGE => format!("the peer refused a frame: {reason}"),
                c => format!("closed by the peer (code {c}): {reason}"),
            }
        }
        ConnectionError::LocallyClosed => "closed locally".into(),
        ConnectionError::TimedOut => "the peer timed out (crashed or unreachable)".into(),
        ConnectionError::Reset => "connection reset by the peer (restarted?)".into(),
        other => format!("connection lost: {other}"),
    }
}

fn stream_closed(e: ReadError) -> LinkError {
    match e {
        ReadError::ConnectionLost(c) => LinkError::Closed(describe(&c)),
        other => LinkError::Closed(format!("stream failed: {other}")),
    }
}

/// Writes the frames of one stripe until the link or the connection goes away.
async fn write_loop(conn: quinn::Connection, mut send: quinn::SendStream, mut frames: mpsc::Receiver<Vec<Frame>>) {
    let lost = conn.closed();
    tokio::pin!(lost);
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            // The connection is gone: drop `frames` so that `send` fails at once.
            _ = &mut lost => return,
        };
        let Some(frames) = frame else {
            // The link was dropped.
            let _ = send.finish();
            return;
        };
        let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * frames.len());
        for frame in frames {
            chunks.push(Bytes::copy_from_slice(&encode_prefix(&frame)));
            chunks.push(frame.payload);
        }
        if send.write_all_chunks(&mut chunks).await.is_err() {
            return;
        }
    }
}

/// Reads the frames of one stripe and hands them to `recv`; on a bad frame it closes
/// the whole link.
async fn read_loop(
    conns: Vec<quinn::Connection>,
    mut recv: quinn::RecvStream,
    frames: mpsc::Sender<Result<Frame, LinkError>>,
    max_frame_bytes: usize,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let got = read_frame(&mut recv, max_frame_bytes).await;
        let failed = got.is_err();
        if let Err(e) = &got {
            let (code, why): (VarInt, &[u8]) = match e {
                LinkError::FrameTooLarge { .. } => (CODE_FRAME_TOO_LARGE, b"frame too large"),
                LinkError::Malformed(_) => (CODE_PROTOCOL, b"malformed frame"),
                LinkError::Closed(_) => (CODE_CLOSED, b"link closed"),
            };
            for conn in &conns {
                conn.close(code, why);
            }
        }
        tokio::select! {
            sent = frames.send(got) => if sent.is_err() { return },
            // Closed locally: `recv` fails by itself; stop waiting for it.
            _ = closed.wait_for(|c| *c) => return,
        }
        if failed {
            return;
        }
    }
}

/// Reads one frame, refusing an oversized one before allocating for it.
async fn read_frame(recv: &mut quinn::RecvStream, max_frame_bytes: usize) -> Result<Frame, LinkError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => {
            return Err(LinkError::Closed("the peer finished its stream".into()));
        }
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(LinkError::Malformed(format!("stream ended {n} bytes into a frame prefix")));
        }
        Err(ReadExactError::ReadError(e)) => return Err(stream_closed(e)),
    }
    let (header, len) = decode_prefix(&prefix, max_frame_bytes)?;
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        match recv.read_chunk(len - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(LinkError::Malformed(format!(
                    "stream ended {} bytes into a {len}-byte payload",
                    payload.len()
                )));
            }
            Err(e) => return Err(stream_closed(e)),
        }
    }
    Ok(Frame { header, payload: payload.freeze() })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::conformance;
    use crate::transport::quic::stripes::StripeSetup;
    use crate::transport::quic::tests::{bounded, frame, localhost, pair, secret_config};
    use crate::transport::quic::{QuicConfig, QuicEndpoint};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_ordered_both_ways() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            conformance::ordered_both_ways(&a, &b, 1 << 20).await;
        })
        .await;
    }

    /// Windows small enough that a few 16 KiB frames fill them.
    fn small_windows() -> QuicConfig {
        QuicConfig {
            stream_receive_window: 64 << 10,
            receive_window: 128 << 10,
            send_window: 64 << 10,
            ..secret_config()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_bounded() {
        bounded(async {
            let (a, b, _) = pair(small_windows(), small_windows()).await;
            // 64 KiB of window is 4 frames; 2 more queued and in hand on each side.
            conformance::bounded(&a, &b, 12, 16 << 10).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_bounded_default_windows() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            // Per connection, the window the receiver sized (2 MiB on loopback, more if
            // the machine was slow to answer the handshake) in frames of 1 MiB, one more
            // where the window's edge cuts a frame, and 4 queued or in hand.
            let window = b.sizing().receive_window as usize;
            conformance::bounded(&a, &b, b.stripes() * (window.div_ceil(1 << 20) + 1 + 4), 1 << 20).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_close_is_seen() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            conformance::close_is_seen(&a, &b).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_close_is_seen_from_server_side() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            conformance::close_is_seen(&b, &a).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_frame_is_refused_on_send() {
        bounded(async {
            let cfg = QuicConfig { max_frame_bytes: Header::LEN + 100, ..secret_config() };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            let err = a.send(frame(0, 101)).await.unwrap_err();
            assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 101, limit: Header::LEN + 100 });
            // Nothing was sent; the link still works.
            a.send(frame(1, 100)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(1, 100));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_frame_is_refused_on_receive_and_closes() {
        bounded(async {
            let small = QuicConfig { max_frame_bytes: Header::LEN + 100, ..secret_config() };
            let (a, b, _) = pair(secret_config(), small).await;
            a.send(frame(0, 100)).await.unwrap();
            a.send(frame(1, 1000)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(0, 100));
            let err = b.recv().await.unwrap_err();
            assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 1000, limit: Header::LEN + 100 });
            assert!(matches!(b.recv().await, Err(LinkError::Closed(_))));
            let err = a.recv().await.unwrap_err();
            assert!(err.to_string().contains("refused a frame"), "{err}");
        })
        .await;
    }

    /// A hostile peer claims a 1 TiB frame: refused from the length prefix alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_length_prefix_is_refused_without_allocating() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let client = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();
            let raw = StripeSetup {
                endpoint: client.endpoint.clone(),
                client_config: client.client_config.clone(),
                config: client.config.clone(),
                peer: addr,
                link_id: [7; 16],
                index: 0,
                count: 1,
                hello: Bytes::new(),
            };
            let (raw, accepted) = tokio::join!(raw.run(), server.accept());
            let (_, mut stripe) = raw.unwrap();
            let (b, _) = accepted.unwrap();
            let mut prefix = [0u8; PREFIX_LEN];
            prefix[Header::LEN..].copy_from_slice(&(1u64 << 40).to_le_bytes());
            stripe.send.write_all(&prefix).await.unwrap();
            let err = b.recv().await.unwrap_err();
            assert!(matches!(err, LinkError::FrameTooLarge { len, .. } if len == (1 << 40) + Header::LEN), "{err}");
            // The receiver closed the connection.
            let lost = stripe.conn.closed().await;
            assert!(describe(&lost).contains("refused a frame"), "{lost}");
        })
        .await;
    }

    /// A peer that vanishes without closing is seen as closed after the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_peer_is_seen_as_closed() {
        bounded(async {
            let cfg = QuicConfig {
                idle_timeout: Duration::from_millis(800),
                keep_alive: Some(Duration::from_millis(200)),
                ..secret_config()
            };
            let server = QuicEndpoint::bind(localhost(), cfg.clone()).unwrap();
            let addr = server.local_addr().unwrap();
            // The "crashing" process: its own runtime, shut down without closing.
            let client_cfg = cfg.clone();
            let crashed = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let (endpoint, link) = rt.block_on(async {
                    let endpoint = QuicEndpoint::bind(localhost(), client_cfg).unwrap();
                    let link = endpoint.connect(addr, Bytes::new()).await.unwrap();
                    link.send(frame(0, 5)).await.unwrap();
                    // Crash only once the peer has it all.
                    assert_eq!(link.recv().await.unwrap(), frame(1, 1));
                    (endpoint, link)
                });
                drop(rt);
                // The runtime is gone: nothing can send a close any more.
                std::mem::forget(link);
                std::mem::forget(endpoint);
            });
            let (b, _) = server.accept().await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(0, 5));
            b.send(frame(1, 1)).await.unwrap();
            tokio::task::spawn_blocking(move || crashed.join().unwrap()).await.unwrap();
            let started = std::time::Instant::now();
            let err = b.recv().await.unwrap_err();
            assert!(matches!(err, LinkError::Closed(_)), "{err}");
            assert!(started.elapsed() < Duration::from_secs(5));
            // Sends fail too, within a few frames.
            let mut failed = false;
            for i in 0..100 {
                if b.send(frame(i, 8)).await.is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recv_and_send_are_cancel_safe() {
        bounded(async {
            let (a, b, _) = pair(small_windows(), small_windows()).await;
            crate::transport::conformance::cancel_safe(&a, &b, frame).await;
        })
        .await;
    }
}
