//! [`ShmLink`]: one end of a shared-memory link, its [`Link`] implementation, and the
//! two threads per link that wait on the rings.
//!
//! Waiting on a futex blocks a thread, so no runtime worker does it: per link, a writer
//! thread takes frames from `send` through a one-frame channel and copies them into the
//! outgoing ring, sleeping while it is full; a reader thread copies whole frames out of
//! the incoming ring and hands them to `recv` through a one-frame channel, sleeping
//! while it is empty. Both sleep on futex words with a bounded timeout, so they also
//! notice a close nobody woke them for. `send` and `recv` are cancel-safe: a cancelled
//! call has handed over a whole frame or none.
//!
//! The link is closed when either end closes it (a flag in the segment, and the
//! futex words bumped so every waiter looks), when the peer process exits (see
//! [`super::liveness`]), or when the ring is found corrupt. Frames the peer published
//! before it closed are still delivered; then `recv` fails with
//! [`LinkError::Closed`]. A frame the peer had not finished writing is never delivered.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::frames::{InFrame, OutFrame};
use super::ring::{ends, RingReader, RingWriter};
use super::segment::{Mapping, Side};
use crate::transport::{Frame, Header, Link, LinkError};

/// Longest a ring thread sleeps before it looks at the flags again.
const WAIT: Duration = Duration::from_millis(200);

/// What the link's threads and its owner share.
pub(crate) struct Shared {
    map: Arc<Mapping>,
    side: Side,
    /// Closed by this end.
    closed_here: AtomicBool,
    /// Why the link failed other than by this end's close (peer exit, corrupt ring).
    failed: Mutex<Option<String>>,
    /// Tells `recv` that this end closed.
    closed: watch::Sender<bool>,
}

impl Shared {
    /// Why the peer's side is done, if it is: it closed, exited, or broke the ring.
    fn peer_stopped(&self) -> Option<String> {
        if let Some(why) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(why);
        }
        (self.map.closed_flag(self.side.peer()).load(Ordering::Acquire) != 0).then(|| "closed by the peer".into())
    }

    fn closed_here(&self) -> bool {
        self.closed_here.load(Ordering::Acquire)
    }

    /// Why the link is closed: `None` while it is open.
    fn closed_error(&self) -> Option<LinkError> {
        if self.closed_here() {
            return Some(LinkError::Closed("closed locally".into()));
        }
        self.peer_stopped().map(LinkError::Closed)
    }

    /// Marks the link failed for `why` (the first reason wins) and wakes every waiter.
    pub(crate) fn fail(&self, why: String) {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
        self.wake_all();
    }

    fn wake_all(&self) {
        self.map.ring_ctl(0).wake_all();
        self.map.ring_ctl(1).wake_all();
    }

    /// Closes this end: a flag the peer sees, every waiter on both sides woken.
    pub(crate) fn close(&self) {
        self.closed_here.store(true, Ordering::Release);
        self.map.closed_flag(self.side).store(1, Ordering::Release);
        self.closed.send_replace(true);
        self.wake_all();
    }

    /// Resolves once this end is closed.
    pub(crate) fn closed_here_changes(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }
}

/// One end of a shared-memory link; see the [module docs](self).
pub struct ShmLink {
    shared: Arc<Shared>,
    frames: mpsc::Sender<Frame>,
    received: tokio::sync::Mutex<Received>,
    max_frame_bytes: usize,
    /// The network link the shared memory was set up over, kept open as a side
    /// channel whose close also closes this link; closed with it.
    net: Option<Arc<dyn Link>>,
}

struct Received {
    frames: mpsc::Receiver<Result<Frame, LinkError>>,
    /// Once set, every later `recv` returns it.
    failed: Option<LinkError>,
}

impl fmt::Debug for ShmLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmLink")
            .field("side", &self.shared.side)
            .field("ring_bytes", &self.shared.map.ring_bytes())
            .field("closed", &self.shared.closed_error())
            .finish()
    }
}

impl ShmLink {
    /// Starts `side`'s end of the link over `map`: its two ring threads. Frames above
    /// `max_frame_bytes` (header included) are refused both ways.
    pub(crate) fn start(
        map: Arc<Mapping>,
        side: Side,
        max_frame_bytes: usize,
        net: Option<Arc<dyn Link>>,
    ) -> std::io::Result<ShmLink> {
        let shared = Arc::new(Shared {
            map: map.clone(),
            side,
            closed_here: AtomicBool::new(false),
            failed: Mutex::new(None),
            closed: watch::channel(false).0,
        });
        let (out_ring, in_ring) = match side {
            Side::Connector => (ends(&map, 0).0, ends(&map, 1).1),
            Side::Acceptor => (ends(&map, 1).0, ends(&map, 0).1),
        };
        let (frames, to_write) = mpsc::channel(1);
        let (got, received) = mpsc::channel(1);
        let s = shared.clone();
        std::thread::Builder::new().name("phalanx-shm-tx".into()).spawn(move || write_loop(&s, out_ring, to_write))?;
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("phalanx-shm-rx".into())
            .spawn(move || read_loop(&s, in_ring, got, max_frame_bytes));
        if let Err(e) = spawned {
            // The writer thread ends when `frames` drops with this error.
            shared.close();
            return Err(e);
        }
        Ok(ShmLink {
            shared,
            frames,
            received: tokio::sync::Mutex::new(Received { frames: received, failed: None }),
            max_frame_bytes,
            net,
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn closed_error(&self) -> LinkError {
        self.shared.closed_error().unwrap_or_else(|| LinkError::Closed("shared-memory link stopped".into()))
    }
}

impl Drop for ShmLink {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl Link for ShmLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        let len = Header::LEN.saturating_add(frame.payload.len());
        if len > self.max_frame_bytes {
            return Err(LinkError::FrameTooLarge { len, limit: self.max_frame_bytes });
        }
        if let Some(e) = self.shared.closed_error() {
            return Err(e);
        }
        // Cancel-safe: a cancelled send hands over nothing.
        self.frames.send(frame).await.map_err(|_| self.closed_error())
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        let mut closed = self.shared.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(LinkError::Closed("closed locally".into()));
        }
        let mut state = self.received.lock().await;
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        let got = tokio::select! {
            got = state.frames.recv() => got,
            _ = closed.changed() => return Err(LinkError::Closed("closed locally".into())),
        };
        match got {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => {
                state.failed = Some(e.clone());
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
        self.shared.close();
        if let Some(net) = &self.net {
            net.close();
        }
    }
}

/// The writer thread: frames from `send` into the outgoing ring.
fn write_loop(shared: &Shared, mut ring: RingWriter, mut frames: mpsc::Receiver<Frame>) {
    while let Some(frame) = frames.blocking_recv() {
        let mut out = OutFrame::new(frame);
        loop {
            if shared.closed_error().is_some() {
                // Dropping `frames` fails the next `send`.
                return;
            }
            let seen = ring.room_word();
            match out.write_to(&mut ring) {
                Ok((_, true)) => break,
                Ok((0, false)) => ring.wait_for_room(seen, WAIT),
                Ok((_, false)) => {}
                Err(corrupt) => {
                    shared.fail(format!("shared-memory ring corrupt: {}", corrupt.0));
                    return;
                }
            }
        }
    }
}

/// The reader thread: whole frames from the incoming ring to `recv`.
fn read_loop(
    shared: &Shared,
    mut ring: RingReader,
    got: mpsc::Sender<Result<Frame, LinkError>>,
    max_frame_bytes: usize,
) {
    let mut frame = InFrame::new(max_frame_bytes);
    loop {
        if shared.closed_here() {
            return;
        }
        // Looked at before the ring: whatever the peer published before it stopped is
        // then visible below, and read before the link counts as closed.
        let stopped = shared.peer_stopped();
        let seen = ring.data_word();
        match frame.read_from(&mut ring) {
            Ok((_, Some(whole))) => {
                if got.blocking_send(Ok(whole)).is_err() {
                    return;
                }
            }
            Ok((0, None)) => match stopped {
                Some(why) => {
                    let why = if frame.is_partial() { format!("{why} (mid-frame)") } else { why };
                    let _ = got.blocking_send(Err(LinkError::Closed(why)));
                    return;
                }
                None => ring.wait_for_data(seen, WAIT),
            },
            Ok((_, None)) => {}
            Err(e) => {
                shared.fail(format!("the peer broke the shared-memory link: {e}"));
                let _ = got.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// Two connected ends over heap memory of this process (tests of the link logic).
#[cfg(test)]
pub(crate) fn heap_pair(ring_bytes: usize, max_frame_bytes: usize) -> (ShmLink, ShmLink) {
    let map = Arc::new(Mapping::heap(ring_bytes, [0, 0]).expect("heap segment")); // ok: test helper
    let a = ShmLink::start(map.clone(), Side::Connector, max_frame_bytes, None).expect("threads"); // ok: test helper
    let b = ShmLink::start(map, Side::Acceptor, max_frame_bytes, None).expect("threads"); // ok: test helper
    (a, b)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::transport::conformance;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    fn frame(i: u64, len: usize) -> Frame {
        Frame { header: Header { index: i, ..Header::default() }, payload: Bytes::from(vec![i as u8; len]) }
    }

    #[test]
    fn conformance_ordered_both_ways() {
        let (a, b) = heap_pair(64 << 10, 8 << 20);
        rt().block_on(conformance::ordered_both_ways(&a, &b, 1 << 20));
    }

    #[test]
    fn conformance_bounded() {
        let (a, b) = heap_pair(64 << 10, 8 << 20);
        // 64 KiB of ring holds 3 frames of 16 KiB (with their prefixes) and part of a
        // fourth; one more waits in the writer thread and one in the channel, and the
        // reader thread holds one and the receive channel another.
        rt().block_on(conformance::bounded(&a, &b, 8, 16 << 10));
    }

    #[test]
    fn conformance_close_is_seen() {
        let (a, b) = heap_pair(64 << 10, 8 << 20);
        rt().block_on(conformance::close_is_seen(&a, &b));
        let (a, b) = heap_pair(64 << 10, 8 << 20);
        rt().block_on(conformance::close_is_seen(&b, &a));
    }

    #[test]
    fn frames_over_the_limit_are_refused_on_send() {
        let (a, b) = heap_pair(4096, Header::LEN + 100);
        rt().block_on(async {
            let err = a.send(frame(0, 101)).await.unwrap_err();
            assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 101, limit: Header::LEN + 100 });
            a.send(frame(1, 100)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(1, 100));
        });
    }

    #[test]
    fn a_full_ring_blocks_the_sender_until_the_receiver_reads() {
        let (a, b) = heap_pair(4096, 1 << 20);
        rt().block_on(async {
            // A 100 KiB frame through a 4 KiB ring: the sender's thread waits for room
            // 25 times; nothing is lost or reordered.
            for i in 0..4 {
                a.send(frame(i, 100 << 10)).await.unwrap();
            }
            let blocked = tokio::time::timeout(Duration::from_millis(300), a.send(frame(9, 100 << 10))).await;
            assert!(blocked.is_err(), "a full link must block the sender");
            for i in 0..4 {
                assert_eq!(b.recv().await.unwrap(), frame(i, 100 << 10));
            }
        });
    }

    #[test]
    fn frames_published_before_a_close_are_delivered() {
        let (a, b) = heap_pair(64 << 10, 1 << 20);
        rt().block_on(async {
            a.send(frame(1, 10)).await.unwrap();
            // The frame is in the ring once the writer thread has taken the next one.
            a.send(frame(2, 10)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(1, 10));
            a.close();
            // Frame 2 may or may not have made it before the close; then Closed.
            let next = b.recv().await;
            let next = if next.is_ok() { b.recv().await } else { next };
            assert!(matches!(next, Err(LinkError::Closed(ref why)) if why.contains("peer")), "{next:?}");
        });
    }

    #[test]
    fn a_failure_ends_a_pending_recv_and_later_sends() {
        let (a, _b) = heap_pair(4096, 1 << 20);
        let a = Arc::new(a);
        rt().block_on(async {
            let waiting = a.clone();
            let pending = tokio::spawn(async move { waiting.recv().await });
            tokio::time::sleep(Duration::from_millis(30)).await;
            a.shared().fail("the peer process exited".into());
            let r = tokio::time::timeout(Duration::from_secs(5), pending).await.unwrap().unwrap();
            assert!(matches!(r, Err(LinkError::Closed(ref why)) if why.contains("exited")), "{r:?}");
            assert!(a.send(frame(0, 1)).await.is_err(), "a failed link refuses sends");
        });
    }
}
