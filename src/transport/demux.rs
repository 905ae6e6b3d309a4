//! Sharing one link among concurrent collectives.
//!
//! A [`Demux`] owns the receiving side of a link: a task reads every frame and queues it
//! by its collective, `(epoch, seq)`. Each collective talks through an [`OpLink`], a
//! virtual [`Link`] that sends on the shared link and receives only its own frames.
//! Frames of collectives that already ended, or of epochs below the floor, are dropped
//! on arrival, so traffic of an aborted collective is never mixed into another.
//!
//! Frames for a collective this side has not started yet are held until it starts.
//!
//! A link that reads on a thread of its own (shared memory) takes the read task's place:
//! [`Link::deliver_to`] gives it a [`FrameSink`], into which that thread queues each
//! frame as the read task would, waiting the same way while a queue is full.
//!
//! # Backpressure
//!
//! Every collective's queue holds at most `capacity` frames ([`DEFAULT_QUEUE_FRAMES`]
//! unless [`Demux::with_capacity`] says otherwise). When the frame just read belongs
//! to a full queue, the read task waits for room and stops reading the link meanwhile,
//! so the link's own flow control (an in-memory link's frame capacity, QUIC's stream
//! windows) pushes back on the sender: no unbounded queue sits between a peer and the
//! executor, and what one link holds on this side is at most the link's buffering plus
//! one frame in the read task plus `capacity` frames per collective with frames queued.
//!
//! The price is head-of-line blocking: while one collective's queue is full, frames of
//! every other collective on the same link wait behind it. Collectives cannot deadlock
//! on it: a peer runs its collectives one after another, its frames of one collective
//! all precede those of the next, and the collective a queue fills for is either
//! running here (so its executor drains the queue) or not started yet, behind one that
//! needs no frame sent after the full queue's. Point-to-point messages can: a sender
//! that runs more than `capacity` frames ahead on a tag the receiver does not read
//! blocks until the receiver gets to it, and frames behind it wait too (see the
//! `comm::p2p` module docs, "Buffering").
//!
//! A frame that arrives for a collective already finished, or below the epoch floor,
//! is dropped at once and never waits; [`Demux::finish`] and [`Demux::raise_floor`]
//! drop the queues they end with their frames and wake a read task waiting for room in
//! one of them, so a collective that is abandoned without draining its queue (an abort)
//! never stalls the link.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Frame, Header, Link, LinkError};

/// Which collective a frame belongs to: `(epoch, seq)`.
pub type OpKey = (u64, u64);

/// How many frames a collective's queue holds by default before the read task stops
/// reading the link: 16 frames of the default 256 KiB chunk are 4 MiB per collective,
/// enough to keep a pipeline of chunks flowing while its consumer reduces one.
pub const DEFAULT_QUEUE_FRAMES: usize = 16;

/// Frames and payload bytes that crossed one link in each direction: every data
/// transport's frames pass through a [`Demux`], which counts them here (relaxed atomic
/// adds, one per frame). Payload bytes only: each frame also carries a
/// [`Header`](super::Header) of [`Header::LEN`](super::Header::LEN) bytes.
#[derive(Debug, Default)]
pub struct LinkCounters {
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
}

impl LinkCounters {
    fn sent(&self, payload: u64) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(payload, Ordering::Relaxed);
    }

    fn received(&self, frame: &Frame) {
        self.frames_received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received.fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
    }

    /// `(frames sent, payload bytes sent, frames received, payload bytes received)`.
    pub fn load(&self) -> (u64, u64, u64, u64) {
        (
            self.frames_sent.load(Ordering::Relaxed),
            self.bytes_sent.load(Ordering::Relaxed),
            self.frames_received.load(Ordering::Relaxed),
            self.bytes_received.load(Ordering::Relaxed),
        )
    }
}

/// One collective's queued frames.
struct Queue {
    frames: VecDeque<Frame>,
    /// Tells the queue's [`OpLink`] that a frame came or the queue ended.
    arrived: Arc<Notify>,
    /// Which claim of the key this queue is (see [`Demux::op`]); an [`OpLink`] reads
    /// only the queue it claimed, never a later one of the same key.
    id: u64,
    claimed: bool,
}

#[derive(Default)]
struct State {
    queues: HashMap<OpKey, Queue>,
    finished: BTreeSet<OpKey>,
    floor: u64,
    closed: Option<LinkError>,
    next_id: u64,
}

impl State {
    /// Whether frames of `key` are dropped on arrival.
    fn is_stale(&self, key: OpKey) -> bool {
        key.0 < self.floor || self.finished.contains(&key)
    }

    fn queue(&mut self, key: OpKey) -> &mut Queue {
        let next_id = &mut self.next_id;
        self.queues.entry(key).or_insert_with(|| {
            *next_id += 1;
            Queue { frames: VecDeque::new(), arrived: Arc::new(Notify::new()), id: *next_id, claimed: false }
        })
    }

    /// Drops `queue` with its frames and wakes its reader (who finds it gone).
    fn ended(queue: Queue) {
        queue.arrived.notify_one();
    }
}

/// What the read task (or the link's own thread) and the [`OpLink`]s share.
struct Shared {
    state: Mutex<State>,
    /// Tells the read task that room was made: a frame was taken, or a queue ended.
    room: Notify,
    /// The same, for a link's own thread waiting in [`FrameSink::deliver`].
    room_sync: Condvar,
    /// Whether that thread waits now: only then is `room_sync` worth a system call
    /// (waking a condvar is one, waiter or not, and room is made for every frame taken).
    /// Set and cleared under the state lock, around the wait; room is made under the
    /// lock too, so a taker that made room after the waiter looked sees the flag.
    sync_waiting: AtomicBool,
    capacity: usize,
    /// Where the link's frames are counted.
    counters: Arc<LinkCounters>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes whoever waits for room in a queue.
    fn made_room(&self) {
        self.room.notify_one();
        if self.sync_waiting.load(Ordering::Acquire) {
            self.room_sync.notify_all();
        }
    }

    /// Queues `frame` for its collective, or drops it if that collective ended; hands it
    /// back when the collective's queue is full.
    fn queue(&self, st: &mut State, frame: Frame) -> Option<Frame> {
        let key = (frame.header.epoch, frame.header.seq);
        if st.is_stale(key) {
            return None; // ended while we waited (or before): dropped, never waiting
        }
        let queue = st.queue(key);
        if queue.frames.len() < self.capacity {
            queue.frames.push_back(frame);
            queue.arrived.notify_one();
            return None;
        }
        Some(frame)
    }

    /// The link failed: frames already queued stay readable (a peer's last message
    /// before it left still arrives); every reader waiting on an empty queue learns of
    /// the closure.
    fn failed(&self, e: LinkError) {
        let mut st = self.lock();
        st.closed = Some(e);
        st.queues.values().for_each(|q| q.arrived.notify_one());
    }
}

/// Where a link that reads its frames on a thread of its own hands them
/// ([`Link::deliver_to`]), in place of a [`Demux`]'s read task: one hand-off less per
/// frame. The read task queues through the same sink.
#[derive(Clone)]
pub struct FrameSink(Arc<Shared>);

impl FrameSink {
    /// Queues `frame` for its collective (or drops it, if that collective ended), waiting
    /// while the collective's queue is full, as the read task does: that is what pushes
    /// back on the sender. Gives up, dropping the frame, once `stop()` says so (checked at
    /// least every 50 ms while waiting).
    pub fn deliver(&self, frame: Frame, stop: impl Fn() -> bool) {
        self.0.counters.received(&frame);
        let mut st = self.0.lock();
        let mut frame = frame;
        while let Some(back) = self.0.queue(&mut st, frame) {
            if stop() {
                return;
            }
            frame = back;
            self.0.sync_waiting.store(true, Ordering::Release);
            st = self.0.room_sync.wait_timeout(st, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
            self.0.sync_waiting.store(false, Ordering::Release);
        }
    }

    /// [`FrameSink::deliver`] for the read task: waits for room without blocking its
    /// thread. Cancelled (the task stopped), it drops the frame.
    async fn deliver_async(&self, frame: Frame) {
        self.0.counters.received(&frame);
        let mut frame = frame;
        // Until the frame is queued or dropped, the caller reads nothing more: that is
        // what pushes back on the sender.
        loop {
            match self.0.queue(&mut self.0.lock(), frame) {
                None => return,
                Some(back) => frame = back,
            }
            // A permit stored since the check (a frame taken, a queue ended) makes this
            // return at once, so no wake-up is lost between the unlock and the wait.
            self.0.room.notified().await;
        }
    }

    /// The link failed with `e`; no frame follows.
    pub fn failed(&self, e: LinkError) {
        self.0.failed(e);
    }
}

/// The receiving side of a shared link, split by collective.
pub struct Demux {
    link: Arc<dyn Link>,
    shared: Arc<Shared>,
    /// The read task; `None` where the link delivers its frames itself.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Demux {
    /// Starts demultiplexing `link` on the current tokio runtime, with queues of
    /// [`DEFAULT_QUEUE_FRAMES`] frames.
    #[cfg(test)]
    pub fn new(link: Arc<dyn Link>) -> Arc<Demux> {
        Demux::with_capacity(link, DEFAULT_QUEUE_FRAMES)
    }

    /// Starts demultiplexing `link` with queues of `capacity` frames each (at least
    /// one); see the module docs, "Backpressure".
    #[cfg(test)]
    pub fn with_capacity(link: Arc<dyn Link>, capacity: usize) -> Arc<Demux> {
        Demux::counted(link, capacity, Arc::default())
    }

    /// [`Demux::with_capacity`], counting every frame sent and received in `counters`
    /// (which may outlive this link: a peer's counters survive a reconnection). A link
    /// that delivers its frames from its own thread ([`Link::deliver_to`]) gets no read
    /// task.
    pub fn counted(link: Arc<dyn Link>, capacity: usize, counters: Arc<LinkCounters>) -> Arc<Demux> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            room: Notify::new(),
            room_sync: Condvar::new(),
            sync_waiting: AtomicBool::new(false),
            capacity: capacity.max(1),
            counters,
        });
        let delivered = link.deliver_to(FrameSink(shared.clone()));
        let reader = (!delivered).then(|| tokio::spawn(read_loop(link.clone(), FrameSink(shared.clone()))));
        Arc::new(Demux { link, shared, reader })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// The virtual link of collective `key`. A key claimed before, finished or below
    /// the floor gives a link whose `recv` only reports that the collective ended.
    pub fn op(self: &Arc<Self>, key: OpKey) -> OpLink {
        let id = {
            let mut st = self.lock();
            if st.is_stale(key) {
                None
            } else {
                let queue = st.queue(key);
                (!std::mem::replace(&mut queue.claimed, true)).then_some((queue.id, queue.arrived.clone()))
            }
        };
        OpLink { demux: self.clone(), key, claim: tokio::sync::Mutex::new(id) }
    }

    /// Ends collective `key` here: its queued and future frames are dropped, and a read
    /// task waiting for room in its queue goes on.
    pub fn finish(&self, key: OpKey) {
        let removed = {
            let mut st = self.lock();
            st.finished.insert(key);
            st.queues.remove(&key)
        };
        if let Some(queue) = removed {
            State::ended(queue);
        }
        self.shared.made_room();
    }

    /// Drops every frame of epochs below `epoch`, queued or future.
    pub fn raise_floor(&self, epoch: u64) {
        let removed: Vec<Queue> = {
            let mut st = self.lock();
            if epoch <= st.floor {
                return;
            }
            st.floor = epoch;
            st.finished = st.finished.split_off(&(epoch, 0));
            let stale: Vec<OpKey> = st.queues.keys().filter(|k| k.0 < epoch).copied().collect();
            stale.iter().filter_map(|k| st.queues.remove(k)).collect()
        };
        removed.into_iter().for_each(State::ended);
        self.shared.made_room();
    }

    /// Whether the underlying link has failed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Closes the underlying link.
    pub fn close(&self) {
        self.link.close();
    }

    /// How many frames are queued here, over all collectives (for tests and stats).
    #[cfg(test)]
    pub fn queued_frames(&self) -> usize {
        self.lock().queues.values().map(|q| q.frames.len()).sum()
    }
}

impl Drop for Demux {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
        self.link.close();
    }
}

async fn read_loop(link: Arc<dyn Link>, sink: FrameSink) {
    loop {
        match link.recv().await {
            Ok(frame) => sink.deliver_async(frame).await,
            Err(e) => return sink.failed(e),
        }
    }
}

/// One collective's view of a shared link.
pub struct OpLink {
    demux: Arc<Demux>,
    key: OpKey,
    /// The id of the queue this link claimed and its arrival signal; `None` when it got
    /// none. The mutex serialises concurrent `recv`s (frames are taken in order).
    claim: tokio::sync::Mutex<Option<(u64, Arc<Notify>)>>,
}

impl OpLink {
    /// Waits for this collective's next frame and returns it without taking it off the
    /// queue: the next `peek` or `recv` sees the same frame. A receiver uses it to look
    /// at a message's first header before it decides how to read the message.
    pub async fn peek(&self) -> Result<Frame, LinkError> {
        self.next(false).await
    }

    /// Waits for the next frame of this collective; takes it off the queue when `take`.
    async fn next(&self, take: bool) -> Result<Frame, LinkError> {
        let claim = self.claim.lock().await;
        let Some((id, arrived)) = claim.as_ref() else {
            return Err(self.ended(&self.demux.lock()));
        };
        loop {
            {
                let mut st = self.demux.lock();
                let Some(queue) = st.queues.get_mut(&self.key).filter(|q| q.id == *id) else {
                    return Err(self.ended(&st)); // finished or below the floor
                };
                if !take {
                    if let Some(frame) = queue.frames.front() {
                        return Ok(frame.clone());
                    }
                } else if let Some(frame) = queue.frames.pop_front() {
                    drop(st);
                    self.demux.shared.made_room();
                    return Ok(frame);
                }
                if st.closed.is_some() {
                    return Err(self.ended(&st));
                }
            }
            arrived.notified().await;
        }
    }

    fn ended(&self, st: &State) -> LinkError {
        st.closed
            .clone()
            .unwrap_or_else(|| LinkError::Closed(format!("collective {:?} was ended on this link", self.key)))
    }
}

#[async_trait]
impl Link for OpLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        let payload = frame.payload.len() as u64;
        let result = self.demux.link.send(frame).await;
        if result.is_ok() {
            self.demux.shared.counters.sent(payload);
        }
        result
    }

    async fn send_slice(&self, header: Header, payload: &[u8]) -> Result<(), LinkError> {
        let result = self.demux.link.send_slice(header, payload).await;
        if result.is_ok() {
            self.demux.shared.counters.sent(payload.len() as u64);
        }
        result
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        self.next(true).await
    }

    fn close(&self) {
        self.demux.finish(self.key);
    }

    fn lends_frames(&self) -> bool {
        self.demux.link.lends_frames()
    }
}
