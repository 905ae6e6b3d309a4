//! The in-memory transport: links between ranks of one process over bounded channels.
//!
//! Used by [`crate::Communicator::local_group`] and by the simulator. A link buffers at
//! most `capacity` frames; dropping or closing either end fails the other's calls with
//! [`LinkError::Closed`] once the frames already sent have been received.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

use super::{Frame, Link, LinkError};

/// One end of an in-memory link.
pub struct MemLink {
    tx: Mutex<Option<mpsc::Sender<Frame>>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Frame>>,
    closed: watch::Sender<bool>,
    /// Where frames sent on this end are counted, with the `(from, to)` ranks.
    counter: Option<(Arc<Traffic>, usize, usize)>,
}

/// Frames and payload bytes that crossed each directed link of a mesh made by
/// [`mesh_counted`]: what actually travelled, not what plans said.
#[derive(Debug)]
pub struct Traffic {
    n: usize,
    frames: Vec<AtomicU64>,
    bytes: Vec<AtomicU64>,
}

impl Traffic {
    fn new(n: usize) -> Traffic {
        let zeros = || (0..n * n).map(|_| AtomicU64::new(0)).collect();
        Traffic { n, frames: zeros(), bytes: zeros() }
    }

    fn count(&self, from: usize, to: usize, bytes: usize) {
        self.frames[from * self.n + to].fetch_add(1, Ordering::Relaxed);
        self.bytes[from * self.n + to].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Frames delivered from rank `from` to rank `to`.
    pub fn frames(&self, from: usize, to: usize) -> u64 {
        self.frames[from * self.n + to].load(Ordering::Relaxed)
    }

    /// Payload bytes delivered from rank `from` to rank `to`.
    pub fn bytes(&self, from: usize, to: usize) -> u64 {
        self.bytes[from * self.n + to].load(Ordering::Relaxed)
    }

    /// Frames over all links.
    pub fn total_frames(&self) -> u64 {
        self.frames.iter().map(|f| f.load(Ordering::Relaxed)).sum()
    }

    /// Payload bytes over all links.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// Two connected ends, each buffering at most `capacity` frames (at least 1).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use phalanx::transport::{mem, Frame, Header, Link};
/// let (a, b) = mem::pair(4);
/// a.send(Frame { header: Header::default(), payload: "hi".into() }).await.unwrap();
/// assert_eq!(b.recv().await.unwrap().payload, "hi");
/// # });
/// ```
pub fn pair(capacity: usize) -> (MemLink, MemLink) {
    let (tx_ab, rx_ab) = mpsc::channel(capacity.max(1));
    let (tx_ba, rx_ba) = mpsc::channel(capacity.max(1));
    (MemLink::new(tx_ab, rx_ba), MemLink::new(tx_ba, rx_ab))
}

/// Per rank, its links to every rank (`None` for itself), as [`mesh`] makes them.
pub type Mesh = Vec<Vec<Option<Arc<dyn Link>>>>;

/// Like [`mesh`], counting every frame sent on every directed link in the returned
/// [`Traffic`].
#[allow(clippy::needless_range_loop)] // filling both halves of a symmetric matrix
pub fn mesh_counted(n: usize, capacity: usize) -> (Mesh, Arc<Traffic>) {
    let traffic = Arc::new(Traffic::new(n));
    let mut links: Vec<Vec<Option<Arc<dyn Link>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for i in 0..n {
        for j in i + 1..n {
            let (mut a, mut b) = pair(capacity);
            a.counter = Some((traffic.clone(), i, j));
            b.counter = Some((traffic.clone(), j, i));
            links[i][j] = Some(Arc::new(a));
            links[j][i] = Some(Arc::new(b));
        }
    }
    (links, traffic)
}

/// A full mesh for `n` ranks: `mesh[i][j]` is rank `i`'s link to rank `j`, `None` on
/// the diagonal.
#[allow(clippy::needless_range_loop)] // filling both halves of a symmetric matrix
pub fn mesh(n: usize, capacity: usize) -> Vec<Vec<Option<Arc<dyn Link>>>> {
    let mut links: Vec<Vec<Option<Arc<dyn Link>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for i in 0..n {
        for j in i + 1..n {
            let (a, b) = pair(capacity);
            links[i][j] = Some(Arc::new(a));
            links[j][i] = Some(Arc::new(b));
        }
    }
    links
}

impl MemLink {
    fn new(tx: mpsc::Sender<Frame>, rx: mpsc::Receiver<Frame>) -> MemLink {
        MemLink {
            tx: Mutex::new(Some(tx)),
            rx: tokio::sync::Mutex::new(rx),
            closed: watch::channel(false).0,
            counter: None,
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<Frame>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn closed(what: &str) -> LinkError {
    LinkError::Closed(what.to_string())
}

#[async_trait]
impl Link for MemLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        let tx = self.sender().ok_or_else(|| closed("closed locally"))?;
        let len = frame.payload.len();
        tx.send(frame).await.map_err(|_| closed("peer end dropped"))?;
        if let Some((traffic, from, to)) = &self.counter {
            traffic.count(*from, *to, len);
        }
        Ok(())
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        let mut closed_rx = self.closed.subscribe();
        let mut rx = self.rx.lock().await;
        if *closed_rx.borrow_and_update() {
            rx.close();
            return Err(closed("closed locally"));
        }
        tokio::select! {
            biased;
            frame = rx.recv() => frame.ok_or_else(|| closed("peer end dropped")),
            _ = closed_rx.changed() => {
                rx.close();
                Err(closed("closed locally"))
            }
        }
    }

    fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.closed.send_replace(true);
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::conformance;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime")
    }

    #[test]
    fn conformance_ordered_both_ways() {
        let (a, b) = pair(4);
        rt().block_on(conformance::ordered_both_ways(&a, &b, 1 << 20));
    }

    #[test]
    fn conformance_bounded() {
        let (a, b) = pair(4);
        rt().block_on(conformance::bounded(&a, &b, 4, 1024));
    }

    #[test]
    fn conformance_close_is_seen() {
        let (a, b) = pair(4);
        rt().block_on(conformance::close_is_seen(&a, &b));
    }

    #[test]
    fn drop_is_seen_as_close() {
        let (a, b) = pair(1);
        drop(a);
        assert!(matches!(rt().block_on(b.recv()), Err(LinkError::Closed(_))));
    }
}
