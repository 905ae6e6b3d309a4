//! Endpoints: where links are opened and accepted.
//!
//! The membership layer (master and peers) is written against [`Endpoint`], so it runs
//! unchanged over QUIC between processes and over [`MemNetwork`] inside one process,
//! where the deterministic simulation tests inject crashes and partitions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::mem::{self, MemLink};
use super::{Link, LinkError};

/// Opens links to other endpoints and accepts theirs.
#[async_trait]
pub trait Endpoint: Send + Sync {
    /// The address others connect to.
    fn local_addr(&self) -> SocketAddr;
    /// Opens a link to `addr`, handing the acceptor `hello` (who we are, what for).
    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError>;
    /// Waits for the next incoming link and its hello.
    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError>;
}

type Incoming = (Arc<dyn Link>, Bytes);

/// An in-process network of endpoints, addressed by socket addresses that are only
/// names here (nothing is bound).
#[derive(Clone, Default)]
pub struct MemNetwork {
    listeners: Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Incoming>>>>,
    capacity: usize,
}

impl MemNetwork {
    /// A network whose links buffer `capacity` frames.
    pub fn new(capacity: usize) -> MemNetwork {
        MemNetwork { listeners: Default::default(), capacity }
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
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
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
            .send((Arc::new(theirs), hello))
            .map_err(|_| LinkError::Closed(format!("endpoint at {addr} is gone")))?;
        Ok(Arc::new(ours))
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        let mut rx = self.incoming.lock().await;
        rx.recv().await.ok_or_else(|| LinkError::Closed("endpoint unbound".into()))
    }
}

#[async_trait]
impl Endpoint for super::quic::QuicEndpoint {
    fn local_addr(&self) -> SocketAddr {
        // A bound UDP socket always has an address; the fallback is never used.
        super::quic::QuicEndpoint::local_addr(self).unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError> {
        match super::quic::QuicEndpoint::connect(self, addr, hello).await {
            Ok(link) => Ok(Arc::new(link)),
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        match super::quic::QuicEndpoint::accept(self).await {
            Ok((link, hello)) => Ok((Arc::new(link), hello)),
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }
}
