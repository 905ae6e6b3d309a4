//! An in-process network of [`Endpoint`]s for tests: links over [`mem`] channels,
//! optionally with seeded per-frame delays and partitions ([`MemNetwork::with_faults`]),
//! so the membership layer runs in one process, deterministically under a paused clock.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::endpoint::Endpoint;
use super::mem::{self, MemLink};
use super::{Link, LinkError};
use crate::rng::SplitMix64;

type Incoming = (Arc<dyn Link>, Bytes);

/// An in-process network of endpoints, addressed by socket addresses that are only
/// names here (nothing is bound).
///
/// With [`MemNetwork::with_faults`] every frame is delayed by a seeded random time, and
/// [`MemNetwork::cut`] partitions an address from everyone: its frames stop moving, as
/// when a host freezes or its network fails. Under tokio's paused clock a run is then
/// a deterministic function of the seed.
#[derive(Clone, Default)]
pub struct MemNetwork {
    listeners: Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Incoming>>>>,
    capacity: usize,
    faults: Option<Arc<Mutex<Faults>>>,
}

/// The seeded fault model of a [`MemNetwork`].
struct Faults {
    rng: SplitMix64,
    max_delay: Duration,
    cut: HashSet<SocketAddr>,
    /// Extra delay of every frame from or to an address (see [`MemNetwork::far`]).
    far: HashMap<SocketAddr, Duration>,
}

impl MemNetwork {
    /// A network whose links buffer `capacity` frames.
    pub fn new(capacity: usize) -> MemNetwork {
        MemNetwork { listeners: Default::default(), capacity, faults: None }
    }

    /// A network whose frames are each delayed by up to `max_delay`, drawn from `seed`.
    pub fn with_faults(capacity: usize, seed: u64, max_delay: Duration) -> MemNetwork {
        let faults = Faults { rng: SplitMix64(seed), max_delay, cut: HashSet::new(), far: HashMap::new() };
        MemNetwork { listeners: Default::default(), capacity, faults: Some(Arc::new(Mutex::new(faults))) }
    }

    /// Partitions `addr` from everyone: frames from or to it stop moving for good.
    /// Only for networks made by [`MemNetwork::with_faults`].
    pub fn cut(&self, addr: SocketAddr) {
        if let Some(f) = &self.faults {
            lock(f).cut.insert(addr);
        }
    }

    /// Puts `addr` farther away: every frame from or to it takes `extra` more (a master
    /// across a WAN from peers that are close to each other). Only for networks made by
    /// [`MemNetwork::with_faults`].
    pub fn far(&self, addr: SocketAddr, extra: Duration) {
        if let Some(f) = &self.faults {
            lock(f).far.insert(addr, extra);
        }
    }

    fn wrap(&self, link: MemLink, from: SocketAddr, to: SocketAddr) -> Arc<dyn Link> {
        match &self.faults {
            None => Arc::new(link),
            Some(faults) => Arc::new(FaultyLink { inner: link, from, to, faults: faults.clone() }),
        }
    }

    /// An endpoint at `addr`; an endpoint already there is replaced.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<MemEndpoint> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(addr, tx);
        Arc::new(MemEndpoint { addr, net: self.clone(), incoming: tokio::sync::Mutex::new(rx) })
    }

    /// Removes the endpoint at `addr`: later connects to it fail, as to a dead host.
    pub fn unbind(&self, addr: SocketAddr) {
        self.lock().remove(&addr);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, mpsc::UnboundedSender<Incoming>>> {
        lock(&self.listeners)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A link of a faulty [`MemNetwork`]: delays each frame, and stalls across a cut.
struct FaultyLink {
    inner: MemLink,
    from: SocketAddr,
    to: SocketAddr,
    faults: Arc<Mutex<Faults>>,
}

#[async_trait]
impl Link for FaultyLink {
    async fn send(&self, frame: super::Frame) -> Result<(), LinkError> {
        let delay = {
            let mut f = lock(&self.faults);
            if f.cut.contains(&self.from) || f.cut.contains(&self.to) {
                None
            } else {
                let max = f.max_delay.as_micros().max(1) as u64;
                let far = |a: &SocketAddr| f.far.get(a).copied().unwrap_or_default();
                let extra = far(&self.from) + far(&self.to);
                Some(Duration::from_micros(f.rng.next_u64() % max) + extra)
            }
        };
        match delay {
            Some(d) => {
                tokio::time::sleep(d).await;
                self.inner.send(frame).await
            }
            None => std::future::pending().await,
        }
    }

    async fn recv(&self) -> Result<super::Frame, LinkError> {
        self.inner.recv().await
    }

    fn close(&self) {
        self.inner.close();
    }
}

/// One endpoint of a [`MemNetwork`].
pub struct MemEndpoint {
    addr: SocketAddr,
    net: MemNetwork,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>,
}

#[async_trait]
impl Endpoint for MemEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError> {
        let listener = self.net.lock().get(&addr).cloned();
        let listener = listener.ok_or_else(|| LinkError::Closed(format!("nothing listens at {addr}")))?;
        let (ours, theirs): (MemLink, MemLink) = mem::pair(self.net.capacity);
        listener
            .send((self.net.wrap(theirs, addr, self.addr), hello))
            .map_err(|_| LinkError::Closed(format!("endpoint at {addr} is gone")))?;
        Ok(self.net.wrap(ours, self.addr, addr))
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        let mut rx = self.incoming.lock().await;
        rx.recv().await.ok_or_else(|| LinkError::Closed("endpoint unbound".into()))
    }

    fn may_use_shared_memory(&self) -> bool {
        // Peers of one process, under one clock the simulation tests pause.
        false
    }
}
