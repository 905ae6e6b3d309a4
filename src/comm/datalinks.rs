//! A peer's data links to the other members, opened on first use and kept across views.
//!
//! Between two peers the one with the smaller id connects and the other accepts, so
//! each pair has exactly one link. Each link is shared by every collective through a
//! [`Demux`]; a collective sees a [`LazyOpLink`] per rank, which resolves to its own
//! virtual link when first used.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{watch, OnceCell};

use crate::membership::{Member, PeerId, View};
use crate::transport::demux::{Demux, LinkCounters, OpKey, OpLink};
use crate::transport::endpoint::Endpoint;
use crate::transport::{Frame, Header, Link, LinkError};

/// The hello that opens a data link: this prefix, then the connector's id (8 bytes LE).
pub(crate) const DATA_HELLO: &[u8] = b"phalanx-data/1:";

#[derive(Default)]
struct Slot {
    demux: watch::Sender<Option<Arc<Demux>>>,
    connecting: tokio::sync::Mutex<()>,
}

pub(crate) struct DataLinks {
    me: PeerId,
    endpoint: Arc<dyn Endpoint>,
    slots: Mutex<HashMap<PeerId, Arc<Slot>>>,
    /// The epoch of the last view [`DataLinks::enter`] moved the links to.
    epoch: std::sync::atomic::AtomicU64,
    /// Frames each link's [`Demux`] queues per collective.
    queue_frames: usize,
    /// Told `(epoch, peer)` when a link to `peer` cannot be opened: a witness
    /// statement for the master (see [`DataLinks::on_unreachable`]).
    witness: Mutex<Option<Witness>>,
    /// Set by [`DataLinks::close_all`]: callers waiting for a peer to connect give up,
    /// so a task still running after its communicator was dropped (a non-blocking send
    /// or receive) ends instead of keeping the peer's control connection alive.
    shut: watch::Sender<bool>,
    /// Each peer's traffic since this peer connected, over every link to it (kept when
    /// a link closes or the peer leaves the view).
    counters: Mutex<HashMap<PeerId, Arc<LinkCounters>>>,
}

type Witness = Arc<dyn Fn(u64, PeerId) + Send + Sync>;

impl DataLinks {
    pub(crate) fn new(me: PeerId, endpoint: Arc<dyn Endpoint>, queue_frames: usize) -> Arc<DataLinks> {
        Arc::new(DataLinks {
            me,
            endpoint,
            slots: Mutex::new(HashMap::new()),
            epoch: Default::default(),
            queue_frames,
            witness: Mutex::new(None),
            shut: watch::Sender::new(false),
            counters: Mutex::new(HashMap::new()),
        })
    }

    /// Calls `witness(epoch, peer)` whenever a link to `peer` cannot be opened, even
    /// when the collective that asked for it has given up meanwhile (the attempt runs
    /// on): the master counts such statements to tell which side of a split group a
    /// member is on.
    pub(crate) fn on_unreachable(&self, witness: impl Fn(u64, PeerId) + Send + Sync + 'static) {
        *self.witness.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(witness));
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: PeerId) -> Arc<Slot> {
        self.slots().entry(id).or_default().clone()
    }

    /// Where the links to `id` count their frames.
    fn counters(&self, id: PeerId) -> Arc<LinkCounters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone()
    }

    /// Every peer's traffic so far: `(peer, (frames sent, bytes sent, frames received,
    /// bytes received))`, peers ascending.
    pub(crate) fn traffic(&self) -> Vec<(PeerId, (u64, u64, u64, u64))> {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = counters.iter().map(|(&id, c)| (id, c.load())).collect();
        all.sort_unstable_by_key(|&(id, _)| id);
        all
    }

    /// Accepts data links forever (run as a task).
    pub(crate) async fn accept_loop(self: Arc<Self>) {
        while let Ok((link, hello)) = self.endpoint.accept().await {
            match parse_hello(&hello) {
                Some(id) if id < self.me => {
                    let demux = Demux::counted(link, self.queue_frames, self.counters(id));
                    self.slot(id).demux.send_replace(Some(demux));
                }
                _ => link.close(),
            }
        }
    }

    /// The shared link to `peer`, connecting or waiting for its connection.
    pub(crate) async fn get(&self, peer: &Member) -> Result<Arc<Demux>, LinkError> {
        let slot = self.slot(peer.id);
        let usable = |d: &Option<Arc<Demux>>| d.as_ref().is_some_and(|d| !d.is_closed());
        // The common case, a link already up: no task to spawn or wait for (a small
        // collective would otherwise pay a task hand-off per peer per call).
        if let Some(d) = slot.demux.borrow().as_ref().filter(|d| !d.is_closed()) {
            return Ok(d.clone());
        }
        if self.me < peer.id {
            // Connecting runs as a task of its own, so that a caller that gives up (its
            // collective was aborted, say by a mismatch) does not drop a connection the
            // other side may already have accepted: that side would keep a link that
            // closes under its next collective ("closed by the peer (code 0)"). The
            // finished link is stored for whoever asks next.
            let (endpoint, hello, frames) = (self.endpoint.clone(), data_hello(self.me), self.queue_frames);
            let (addr, id, counters) = (peer.addr, peer.id, self.counters(peer.id));
            let epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
            let witness = self.witness.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let connecting = tokio::spawn(async move {
                let _one_at_a_time = slot.connecting.lock().await;
                if let Some(d) = slot.demux.borrow().as_ref().filter(|d| !d.is_closed()) {
                    return Ok(d.clone());
                }
                let link = endpoint.connect(addr, hello).await.inspect_err(|_| {
                    if let Some(witness) = &witness {
                        witness(epoch, id);
                    }
                })?;
                let demux = Demux::counted(link, frames, counters);
                slot.demux.send_replace(Some(demux.clone()));
                Ok(demux)
            });
            connecting.await.map_err(|e| LinkError::Closed(format!("connecting to peer {}: {e}", peer.id)))?
        } else {
            let mut rx = slot.demux.subscribe();
            let mut shut = self.shut.subscribe();
            let shut_down = || LinkError::Closed("data links shut down".into());
            tokio::select! {
                d = rx.wait_for(usable) => d.map_err(|_| shut_down())?.clone().ok_or_else(|| LinkError::Closed("no link".into())),
                _ = shut.wait_for(|s| *s) => Err(shut_down()),
            }
        }
    }

    /// Moves the links to `view` when it is newer than the last one (see
    /// [`DataLinks::retain`]); a no-op for a view already entered.
    pub(crate) fn enter(&self, view: &View) {
        use std::sync::atomic::Ordering;
        if self.epoch.fetch_max(view.epoch, Ordering::AcqRel) < view.epoch {
            self.retain(view);
        }
    }

    /// Drops links to peers outside `view` and stale traffic of older epochs.
    pub(crate) fn retain(&self, view: &View) {
        let mut slots = self.slots();
        slots.retain(|id, slot| {
            let keep = view.rank_of(*id).is_some();
            if let Some(d) = slot.demux.borrow().as_ref() {
                if keep {
                    d.raise_floor(view.epoch);
                } else {
                    d.close();
                }
            }
            keep
        });
    }

    /// Ends collective `key` on every link.
    pub(crate) fn finish(&self, key: OpKey) {
        for slot in self.slots().values() {
            if let Some(d) = slot.demux.borrow().as_ref() {
                d.finish(key);
            }
        }
    }

    /// Closes every link.
    pub(crate) fn close_all(&self) {
        self.shut.send_replace(true);
        for slot in self.slots().drain().map(|(_, s)| s) {
            if let Some(d) = slot.demux.borrow().as_ref() {
                d.close();
            }
        }
    }

    /// One collective's links to the members of `view`, indexed by rank.
    /// Links are opened only when the collective first uses them, so a sub-group's
    /// collective (whose plan names only its members) touches only its members' links.
    pub(crate) fn for_op(self: &Arc<Self>, view: &View, me: usize, key: OpKey) -> Vec<Option<Arc<dyn Link>>> {
        view.members
            .iter()
            .enumerate()
            .map(|(r, m)| {
                (r != me).then(|| {
                    Arc::new(LazyOpLink { links: self.clone(), peer: m.clone(), key, op: OnceCell::new() })
                        as Arc<dyn Link>
                })
            })
            .collect()
    }
}

fn parse_hello(hello: &[u8]) -> Option<PeerId> {
    let id = hello.strip_prefix(DATA_HELLO)?;
    Some(u64::from_le_bytes(id.try_into().ok()?))
}

/// A collective's link to one peer, opened when first used.
pub(crate) struct LazyOpLink {
    links: Arc<DataLinks>,
    peer: Member,
    key: OpKey,
    op: OnceCell<OpLink>,
}

impl LazyOpLink {
    async fn op(&self) -> Result<&OpLink, LinkError> {
        self.op.get_or_try_init(|| async { Ok(self.links.get(&self.peer).await?.op(self.key)) }).await
    }
}

#[async_trait]
impl Link for LazyOpLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        self.op().await?.send(frame).await
    }

    async fn send_slice(&self, header: Header, payload: &[u8]) -> Result<(), LinkError> {
        self.op().await?.send_slice(header, payload).await
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        self.op().await?.recv().await
    }

    fn close(&self) {}

    fn lends_frames(&self) -> bool {
        // Not set up yet: nothing was received through it.
        self.op.get().is_some_and(|op| op.lends_frames())
    }
}

/// The hello that opens a data link from peer `id`.
pub(crate) fn data_hello(id: PeerId) -> Bytes {
    let mut hello = BytesMut::from(DATA_HELLO);
    hello.put_u64_le(id);
    hello.freeze()
}
