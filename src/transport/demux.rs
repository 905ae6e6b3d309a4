//! Sharing one link among concurrent collectives.
//!
//! A [`Demux`] owns the receiving side of a link: a task reads every frame and queues it
//! by its collective, `(epoch, seq)`. Each collective talks through an [`OpLink`], a
//! virtual [`Link`] that sends on the shared link and receives only its own frames.
//! Frames of collectives that already ended, or of epochs below the floor, are dropped
//! on arrival, so traffic of an aborted collective is never mixed into another.
//!
//! Frames for a collective this side has not started yet are held until it starts;
//! their volume is bounded by what the peer's collectives in flight send.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Frame, Link, LinkError};

/// Which collective a frame belongs to: `(epoch, seq)`.
pub type OpKey = (u64, u64);

type Queue = (mpsc::UnboundedSender<Frame>, Option<mpsc::UnboundedReceiver<Frame>>);

#[derive(Default)]
struct State {
    queues: HashMap<OpKey, Queue>,
    finished: BTreeSet<OpKey>,
    floor: u64,
    closed: Option<LinkError>,
}

/// The receiving side of a shared link, split by collective.
pub struct Demux {
    link: Arc<dyn Link>,
    state: Arc<Mutex<State>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Demux {
    /// Starts demultiplexing `link` on the current tokio runtime.
    pub fn new(link: Arc<dyn Link>) -> Arc<Demux> {
        let state = Arc::new(Mutex::new(State::default()));
        let reader = tokio::spawn(read_loop(link.clone(), state.clone()));
        Arc::new(Demux { link, state, reader })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The virtual link of collective `key`.
    pub fn op(self: &Arc<Self>, key: OpKey) -> OpLink {
        let rx = {
            let mut st = self.lock();
            let queue = st.queues.entry(key).or_insert_with(new_queue);
            queue.1.take().unwrap_or_else(|| {
                // Claimed twice: give the second claimant a queue that only reports closure.
                let (_, rx) = mpsc::unbounded_channel();
                rx
            })
        };
        OpLink { demux: self.clone(), key, rx: tokio::sync::Mutex::new(rx) }
    }

    /// Sends a frame on the shared link (the peer's demux routes it by its key).
    pub async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        self.link.send(frame).await
    }

    /// Ends collective `key` here: its queued and future frames are dropped.
    pub fn finish(&self, key: OpKey) {
        let mut st = self.lock();
        st.queues.remove(&key);
        st.finished.insert(key);
    }

    /// Drops every frame of epochs below `epoch`, queued or future.
    pub fn raise_floor(&self, epoch: u64) {
        let mut st = self.lock();
        if epoch > st.floor {
            st.floor = epoch;
            st.queues.retain(|k, _| k.0 >= epoch);
            st.finished = st.finished.split_off(&(epoch, 0));
        }
    }

    /// Whether the underlying link has failed.
    pub fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Closes the underlying link.
    pub fn close(&self) {
        self.link.close();
    }
}

impl Drop for Demux {
    fn drop(&mut self) {
        self.reader.abort();
        self.link.close();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_queue() -> Queue {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Some(rx))
}

async fn read_loop(link: Arc<dyn Link>, state: Arc<Mutex<State>>) {
    loop {
        match link.recv().await {
            Ok(frame) => {
                let key = (frame.header.epoch, frame.header.seq);
                let mut st = lock(&state);
                if key.0 < st.floor || st.finished.contains(&key) {
                    continue;
                }
                let queue = st.queues.entry(key).or_insert_with(new_queue);
                let _ = queue.0.send(frame); // a dropped OpLink just loses its frames
            }
            Err(e) => {
                let mut st = lock(&state);
                st.closed = Some(e);
                st.queues.clear(); // dropping the senders wakes every receiver
                return;
            }
        }
    }
}

/// One collective's view of a shared link.
pub struct OpLink {
    demux: Arc<Demux>,
    key: OpKey,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Frame>>,
}

#[async_trait]
impl Link for OpLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        self.demux.link.send(frame).await
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(frame) => Ok(frame),
            None => Err(self
                .demux
                .lock()
                .closed
                .clone()
                .unwrap_or_else(|| LinkError::Closed(format!("collective {:?} was ended on this link", self.key)))),
        }
    }

    fn close(&self) {
        self.demux.finish(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{mem, Header};
    use bytes::Bytes;

    fn frame(epoch: u64, seq: u64, index: u64) -> Frame {
        Frame { header: Header { epoch, seq, call: 0, index }, payload: Bytes::new() }
    }

    #[tokio::test]
    async fn frames_reach_their_collective_and_stale_ones_are_dropped() {
        let (a, b) = mem::pair(16);
        let demux = Demux::new(Arc::new(b));
        let early = demux.op((1, 1));
        demux.finish((1, 0));
        for f in [frame(1, 0, 0), frame(1, 2, 0), frame(1, 1, 0), frame(0, 9, 0), frame(1, 1, 1)] {
            a.send(f).await.expect("send");
        }
        assert_eq!(early.recv().await.expect("recv").header.index, 0);
        assert_eq!(early.recv().await.expect("recv").header.index, 1);
        // Seq 2 arrived before anyone asked for it; it waits.
        let late = demux.op((1, 2));
        assert_eq!(late.recv().await.expect("recv").header.seq, 2);
        demux.raise_floor(2);
        a.send(frame(1, 3, 0)).await.expect("send");
        a.send(frame(2, 0, 0)).await.expect("send");
        assert_eq!(demux.op((2, 0)).recv().await.expect("recv").header.epoch, 2);
    }

    #[tokio::test]
    async fn closure_reaches_every_collective() {
        let (a, b) = mem::pair(16);
        let demux = Demux::new(Arc::new(b));
        let op = demux.op((0, 1));
        drop(a);
        assert!(matches!(op.recv().await, Err(LinkError::Closed(_))));
        assert!(demux.is_closed());
    }
}
