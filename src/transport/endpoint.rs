//! Endpoints: where links are opened and accepted.
//!
//! The membership layer (master and peers) is written against [`Endpoint`], so it runs
//! unchanged over QUIC ([`QuicEndpoint`](super::quic::QuicEndpoint)) between processes
//! and over a [`memnet`](super::memnet) network inside one process, where the
//! deterministic simulation tests inject crashes and partitions.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Link, LinkError};

// compat re-export: the in-memory network moved to `transport::memnet`; use that path.
pub use super::memnet::{MemEndpoint, MemNetwork};

/// Opens links to other endpoints and accepts theirs.
#[async_trait]
pub trait Endpoint: Send + Sync {
    /// The address others connect to.
    fn local_addr(&self) -> SocketAddr;
    /// Opens a link to `addr`, handing the acceptor `hello` (who we are, what for).
    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError>;
    /// Waits for the next incoming link and its hello.
    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError>;
    /// Whether [`ShmEndpoint::wrap`](super::shm::ShmEndpoint::wrap) puts a
    /// shared-memory layer over this endpoint: yes for endpoints whose links reach
    /// other processes (the default). The in-memory network says no (its peers are
    /// tasks of one process, under one clock that tests may pause), and so does a
    /// shared-memory endpoint itself.
    fn may_use_shared_memory(&self) -> bool {
        true
    }
}
