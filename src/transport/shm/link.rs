//! [`ShmLink`]: one end of a shared-memory link, its [`Link`] implementation, and the
//! two threads per link that wait on the rings.
//!
//! `send` copies a frame into the outgoing ring and `recv` copies one out of the
//! incoming ring themselves, on the caller's task, whenever the ring has room or data:
//! the common case costs no thread hand-off. Waiting is what an async task must not do
//! on a futex, so each link has two threads that only wait: when a frame does not fit,
//! `send` leaves its rest with the writer thread, which copies it in as room appears
//! (sleeping on the ring's futex word meanwhile) and then tells the next `send` it may
//! go; when the ring is empty, `recv` asks the reader thread to wake it once the peer
//! publishes. Both threads sleep on futex words with a bounded timeout, so they also
//! notice a close nobody woke them for, and otherwise sleep until asked.
//! `send` and `recv` are cancel-safe: a cancelled `send` has handed over a whole frame
//! or none, and a frame `recv` has partly read stays in the link for the next call.
//!
//! Under a demultiplexer ([`Link::deliver_to`], which every data link gets) `recv` is not
//! used: the reader thread sleeps on the ring's futex word, reads each frame as soon as
//! the peer publishes it and queues it for its collective, waking that collective's
//! caller itself. A frame then costs two wake-ups (the reader thread, the caller) where
//! `recv` under a read task cost four (the caller's ask, the publish, the task, the
//! caller).
//!
//! The link is closed when either end closes it (a flag in the segment, and the
//! futex words bumped so every waiter looks), when the peer process exits (see
//! [`super::liveness`]), or when the ring is found corrupt. Frames the peer published
//! before it closed are still delivered; then `recv` fails with
//! [`LinkError::Closed`]. A frame the peer had not finished writing is never delivered.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Notify};

use super::frames::{InFrame, OutFrame};
use super::futex;
use super::ring::{ends, watch as ring_watch, watch_reading, RingReader, RingWatch, RingWriter};
use super::segment::{Mapping, Side};
use crate::transport::{Frame, FrameSink, Header, Link, LinkError};

/// Longest a ring thread sleeps before it looks at the flags again.
const WAIT: Duration = Duration::from_millis(200);

/// The sending side: the ring and the rest of a frame the writer thread still copies.
struct Tx {
    ring: RingWriter,
    pending: Option<OutFrame>,
    /// A `send_slice` is copying a frame from its caller's bytes (see [`Lent`]).
    lent: bool,
}

/// The receiving side: the ring and the frame read so far.
struct Rx {
    ring: RingReader,
    frame: InFrame,
}

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
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
    /// Bumped (and woken) when `send` leaves a frame to the writer thread, when
    /// `send_slice` waits for room, and on close.
    tx_asked: AtomicU32,
    /// Set by `send_slice` when it waits for room in the ring.
    tx_wanted: AtomicBool,
    /// The writer thread saw room (or the end of the link) that `send_slice` waits for.
    tx_room: Notify,
    /// Set by `recv` when it waits for the peer; bumped (and woken) with it, and on close.
    rx_wanted: AtomicBool,
    rx_asked: AtomicU32,
    /// The writer thread finished a pending frame: the waiting `send`s may go (all are
    /// woken; one gets the ring, the others wait again).
    tx_done: Notify,
    /// The reader thread saw data (or the end of the link) that `recv` waits for.
    rx_ready: Notify,
    /// Where the reader thread delivers every frame itself, once a demultiplexer asked
    /// ([`Link::deliver_to`]); `recv` is then not used.
    sink: Mutex<Option<FrameSink>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Why the peer's side is done, if it is: it closed, exited, or broke the ring.
    fn peer_stopped(&self) -> Option<String> {
        if let Some(why) = lock(&self.failed).clone() {
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
        lock(&self.failed).get_or_insert(why);
        self.wake_all();
    }

    fn wake_all(&self) {
        self.map.ring_ctl(0).wake_all();
        self.map.ring_ctl(1).wake_all();
        futex::bump_and_wake(&self.tx_asked);
        futex::bump_and_wake(&self.rx_asked);
        self.tx_done.notify_waiters();
        self.tx_room.notify_one();
        self.rx_ready.notify_one();
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

    /// Writes as much of `out` as fits; `Ok(true)` once it is all in the ring.
    fn write<P: AsRef<[u8]>>(&self, tx: &mut Tx, out: &mut OutFrame<P>) -> Result<bool, LinkError> {
        out.write_to(&mut tx.ring).map(|(_, done)| done).map_err(|corrupt| {
            let why = format!("shared-memory ring corrupt: {}", corrupt.0);
            self.fail(why.clone());
            LinkError::Closed(why)
        })
    }

    /// Reads what is there of the next frame: `Ok(Some)` once it is whole, `Ok(None)`
    /// when the ring holds no more of it; `Err` when the link is closed or broken.
    fn read(&self) -> Result<Option<Frame>, LinkError> {
        let mut rx = lock(&self.rx);
        let rx = &mut *rx;
        loop {
            if self.closed_here() {
                return Err(LinkError::Closed("closed locally".into()));
            }
            // Looked at before the ring: whatever the peer published before it stopped
            // is then visible below, and read before the link counts as closed.
            let stopped = self.peer_stopped();
            match rx.frame.read_from(&mut rx.ring) {
                Ok((_, Some(frame))) => return Ok(Some(frame)),
                Ok((0, None)) => {
                    return match stopped {
                        Some(why) if rx.frame.is_partial() => Err(LinkError::Closed(format!("{why} (mid-frame)"))),
                        Some(why) => Err(LinkError::Closed(why)),
                        None => Ok(None),
                    }
                }
                Ok((_, None)) => {}
                Err(e) => {
                    self.fail(format!("the peer broke the shared-memory link: {e}"));
                    return Err(e);
                }
            }
        }
    }
}

/// A `send_slice` holding the ring's write end while it copies from its caller's bytes.
/// Dropped with part of the frame written (the call was cancelled), it hands the rest,
/// copied, to the writer thread: the frame is then sent whole, as `send` would have, and
/// the ring never holds a torn frame. Dropped otherwise, it lets the next sender go.
struct Lent<'a> {
    shared: &'a Shared,
    /// The frame while it is not all in the ring; `None` once done (or failed).
    out: Option<OutFrame<&'a [u8]>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let shared = self.shared;
        let mut tx = lock(&shared.tx);
        tx.lent = false;
        match self.out.take() {
            Some(out) if !out.is_unstarted() => {
                tx.pending = Some(out.into_owned());
                drop(tx);
                futex::bump_and_wake(&shared.tx_asked);
            }
            _ => {
                drop(tx);
                shared.tx_done.notify_waiters();
            }
        }
    }
}

/// One end of a shared-memory link; see the [module docs](self).
pub struct ShmLink {
    shared: Arc<Shared>,
    /// Serialises `recv` (the trait allows one at a time; this keeps a second one from
    /// stealing the first one's wake-up).
    receiving: tokio::sync::Mutex<Option<LinkError>>,
    max_frame_bytes: usize,
    /// The network link the shared memory was set up over, kept open as a side
    /// channel whose close also closes this link; closed with it.
    net: Option<Arc<dyn Link>>,
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
    /// Starts `side`'s end of the link over `map`: its two waiting threads. Frames above
    /// `max_frame_bytes` (header included) are refused both ways.
    pub(crate) fn start(
        map: Arc<Mapping>,
        side: Side,
        max_frame_bytes: usize,
        net: Option<Arc<dyn Link>>,
    ) -> std::io::Result<ShmLink> {
        let (out_index, in_index) = match side {
            Side::Connector => (0, 1),
            Side::Acceptor => (1, 0),
        };
        let reader = ends(&map, in_index).1;
        let incoming = watch_reading(&reader);
        let shared = Arc::new(Shared {
            map: map.clone(),
            side,
            closed_here: AtomicBool::new(false),
            failed: Mutex::new(None),
            closed: watch::channel(false).0,
            tx: Mutex::new(Tx { ring: ends(&map, out_index).0, pending: None, lent: false }),
            rx: Mutex::new(Rx { ring: reader, frame: InFrame::new(max_frame_bytes) }),
            tx_asked: AtomicU32::new(0),
            tx_wanted: AtomicBool::new(false),
            tx_room: Notify::new(),
            rx_wanted: AtomicBool::new(false),
            rx_asked: AtomicU32::new(0),
            tx_done: Notify::new(),
            rx_ready: Notify::new(),
            sink: Mutex::new(None),
        });
        let (s, outgoing) = (shared.clone(), ring_watch(&map, out_index));
        std::thread::Builder::new().name("phalanx-shm-tx".into()).spawn(move || write_loop(&s, outgoing))?;
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name("phalanx-shm-rx".into()).spawn(move || read_loop(&s, incoming));
        if let Err(e) = spawned {
            // The writer thread ends on the close.
            shared.close();
            return Err(e);
        }
        Ok(ShmLink { shared, receiving: tokio::sync::Mutex::new(None), max_frame_bytes, net })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Waits until no frame is being copied into the ring (by the writer thread or a
    /// `send_slice`) and returns the sending side, locked, for this call's frame.
    async fn claim_tx(&self) -> Result<MutexGuard<'_, Tx>, LinkError> {
        let shared = &*self.shared;
        let mut closed = shared.closed.subscribe();
        loop {
            if let Some(e) = shared.closed_error() {
                return Err(e);
            }
            // Registered before looking, so the notice that the ring is free is not missed.
            let done = shared.tx_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let tx = lock(&shared.tx);
                if tx.pending.is_none() && !tx.lent {
                    return Ok(tx);
                }
            }
            tokio::select! {
                _ = &mut done => {}
                _ = closed.changed() => {}
            }
        }
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
        let shared = &self.shared;
        let mut tx = self.claim_tx().await?;
        // Cancel-safe from here on: nothing below awaits.
        let mut out = OutFrame::new(frame);
        if !shared.write(&mut tx, &mut out)? {
            tx.pending = Some(out);
            drop(tx);
            futex::bump_and_wake(&shared.tx_asked);
        }
        Ok(())
    }

    /// Copies the payload straight from `payload` into the ring, on this task: no frame
    /// allocated, one copy fewer than `send` after a copy into a frame. When the ring is
    /// full it asks the writer thread to wake it once there is room, and goes on.
    async fn send_slice(&self, header: Header, payload: &[u8]) -> Result<(), LinkError> {
        let len = Header::LEN.saturating_add(payload.len());
        if len > self.max_frame_bytes {
            return Err(LinkError::FrameTooLarge { len, limit: self.max_frame_bytes });
        }
        let shared = &*self.shared;
        let mut closed = shared.closed.subscribe();
        let mut lent = {
            let mut tx = self.claim_tx().await?;
            tx.lent = true;
            Lent { shared, out: Some(OutFrame::borrowed(&header, payload)) }
        };
        loop {
            // Registered before writing, so the writer thread's notice is not missed.
            let room = shared.tx_room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let Some(out) = lent.out.as_mut() else { return Ok(()) };
            let written = shared.write(&mut lock(&shared.tx), out);
            match written {
                Ok(false) => {}
                Ok(true) => {
                    lent.out = None;
                    return Ok(());
                }
                Err(e) => {
                    lent.out = None;
                    return Err(e);
                }
            }
            if let Some(e) = shared.closed_error() {
                // The link is closed: nothing more is written or read on it.
                lent.out = None;
                return Err(e);
            }
            shared.tx_wanted.store(true, Ordering::SeqCst);
            futex::bump_and_wake(&shared.tx_asked);
            tokio::select! {
                _ = &mut room => {}
                _ = closed.changed() => {}
            }
        }
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        let shared = &self.shared;
        let mut closed = shared.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(LinkError::Closed("closed locally".into()));
        }
        let mut failed = self.receiving.lock().await;
        if let Some(e) = &*failed {
            return Err(e.clone());
        }
        if lock(&shared.sink).is_some() {
            return Err(LinkError::Closed("this link delivers its frames to a demultiplexer".into()));
        }
        loop {
            let ready = shared.rx_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            match shared.read() {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => {
                    *failed = Some(e.clone());
                    return Err(e);
                }
            }
            // Nothing more yet: ask the reader thread to wake us once the peer publishes
            // (it looks at the ring after this, so a publish in between is not missed).
            shared.rx_wanted.store(true, Ordering::SeqCst);
            futex::bump_and_wake(&shared.rx_asked);
            tokio::select! {
                _ = &mut ready => {}
                _ = closed.changed() => return Err(LinkError::Closed("closed locally".into())),
            }
        }
    }

    fn close(&self) {
        self.shared.close();
        if let Some(net) = &self.net {
            net.close();
        }
    }

    fn lends_frames(&self) -> bool {
        true
    }

    /// The reader thread reads every frame itself and queues it for its collective: the
    /// peer's publish wakes that thread, which wakes the collective's caller; no task
    /// runs in between.
    fn deliver_to(&self, sink: FrameSink) -> bool {
        *lock(&self.shared.sink) = Some(sink);
        futex::bump_and_wake(&self.shared.rx_asked);
        true
    }
}

/// The writer thread: copies the rest of a frame `send` left behind as room appears.
fn write_loop(shared: &Shared, outgoing: RingWatch) {
    loop {
        if shared.closed_here() {
            return;
        }
        let asked = shared.tx_asked.load(Ordering::SeqCst);
        let room = outgoing.room_word();
        let mut guard = lock(&shared.tx);
        let tx = &mut *guard;
        let Some(mut out) = tx.pending.take() else {
            drop(guard);
            if shared.tx_wanted.load(Ordering::SeqCst) {
                // A `send_slice` waits for room: wake it once a useful amount is free
                // (an eighth of the ring, so it is not woken for every few bytes).
                if outgoing.has_room(outgoing.capacity() / 8) || shared.peer_stopped().is_some() {
                    shared.tx_wanted.store(false, Ordering::SeqCst);
                    shared.tx_room.notify_one();
                } else {
                    outgoing.wait_for_room(room, WAIT);
                }
                continue;
            }
            futex::wait(&shared.tx_asked, asked, WAIT);
            continue;
        };
        // A stopped link drops the frame: `send` fails from now on.
        let done = shared.peer_stopped().is_some() || shared.write(tx, &mut out).unwrap_or(true);
        if done {
            drop(guard);
            // Every waiting `send` looks (each registered before it looked at `pending`):
            // more than one may wait, and the first woken may write its frame at once
            // and never leave one for this thread to finish and wake the next.
            shared.tx_done.notify_waiters();
        } else {
            // The ring is full: sleep without the lock until the reader makes room.
            tx.pending = Some(out);
            drop(guard);
            outgoing.wait_for_room(room, WAIT);
        }
    }
}

/// The reader thread: wakes `recv` once the peer has published what it waits for, or,
/// once a demultiplexer asked for it, delivers every frame itself.
fn read_loop(shared: &Shared, incoming: RingWatch) {
    loop {
        if shared.closed_here() {
            return;
        }
        // The guard is dropped at the end of this statement: in an `if let` scrutinee it
        // would live through `deliver_loop`, for the link's whole life, and a `recv`
        // (which looks at the sink to refuse) would block its thread on it for ever.
        let sink = lock(&shared.sink).clone();
        if let Some(sink) = sink {
            return deliver_loop(shared, &incoming, &sink);
        }
        let asked = shared.rx_asked.load(Ordering::SeqCst);
        if !shared.rx_wanted.load(Ordering::SeqCst) {
            futex::wait(&shared.rx_asked, asked, WAIT);
            continue;
        }
        let seen = incoming.data_word();
        if incoming.has_data() || shared.peer_stopped().is_some() {
            shared.rx_wanted.store(false, Ordering::SeqCst);
            shared.rx_ready.notify_one();
            continue;
        }
        incoming.wait_for_data(seen, WAIT);
    }
}

/// The reader thread in delivery mode: reads each frame as soon as the peer publishes
/// it and hands it to `sink` (waiting there while its collective's queue is full, which
/// pushes back on the peer through the ring); ends when the link does, telling `sink`.
fn deliver_loop(shared: &Shared, incoming: &RingWatch, sink: &FrameSink) {
    loop {
        // Loaded before reading: a publish after the read changes it, so the wait below
        // returns at once rather than miss it.
        let seen = incoming.data_word();
        match shared.read() {
            Ok(Some(frame)) => sink.deliver(frame, || shared.closed_here()),
            Ok(None) => incoming.wait_for_data(seen, WAIT),
            Err(e) => return sink.failed(e),
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
#[path = "link_tests.rs"]
mod tests;
