//! [`ShmEndpoint`]: an [`Endpoint`] that opens links through another one (QUIC, TCP)
//! and moves each link to shared memory when both ends are on one host and willing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::hello::{self, Offer};
use super::link::ShmLink;
use super::segment::{self, Mapping, SegmentName, Side, UnlinkGuard};
use super::{liveness, SharedMemory, ShmConfig};
use crate::transport::endpoint::Endpoint;
use crate::transport::{Link, LinkError};

/// An endpoint that sets links up over `inner` and, between processes of one host,
/// carries their frames over shared memory; see the [module docs](super).
pub struct ShmEndpoint {
    inner: Arc<dyn Endpoint>,
    config: ShmConfig,
    /// This host's identity, `None` where the kernel does not tell (no offers then).
    identity: Option<String>,
    shm_links: AtomicU64,
}

impl std::fmt::Debug for ShmEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmEndpoint")
            .field("local_addr", &self.inner.local_addr())
            .field("config", &self.config)
            .field("shm_links", &self.shared_memory_links())
            .finish()
    }
}

impl ShmEndpoint {
    /// Wraps `inner`. Every end of a group must be wrapped alike (with either mode):
    /// the hello carries the offer.
    pub fn new(inner: Arc<dyn Endpoint>, config: ShmConfig) -> ShmEndpoint {
        let identity = hello::host_identity();
        if identity.is_none() && config.mode == SharedMemory::Auto {
            tracing::debug!("no host identity from the kernel: links stay on the network");
        }
        if config.mode == SharedMemory::Auto {
            segment::sweep_stale();
        }
        ShmEndpoint { inner, config, identity, shm_links: AtomicU64::new(0) }
    }

    /// `inner` wrapped in a [`ShmEndpoint`], unless it cannot use shared memory
    /// ([`Endpoint::may_use_shared_memory`] says no), which is then returned as is.
    pub fn wrap(inner: Arc<dyn Endpoint>, config: ShmConfig) -> Arc<dyn Endpoint> {
        if inner.may_use_shared_memory() {
            Arc::new(ShmEndpoint::new(inner, config))
        } else {
            inner
        }
    }

    /// Pretends to be on another host (or on none, for `None`).
    #[cfg(test)]
    pub(crate) fn set_identity_for_test(&mut self, identity: Option<String>) {
        self.identity = identity;
    }

    /// Links opened or accepted so far that run over shared memory.
    pub fn shared_memory_links(&self) -> u64 {
        self.shm_links.load(Ordering::Relaxed)
    }

    /// A fresh segment and the offer that describes it, when this end offers.
    fn prepare_offer(&self) -> Option<(Offer, Arc<Mapping>, UnlinkGuard)> {
        if self.config.mode != SharedMemory::Auto {
            return None;
        }
        let identity = self.identity.clone()?;
        let name = SegmentName::fresh(hello::random_u64());
        let token = [hello::random_u64(), hello::random_u64()];
        match segment::create(&name, self.config.ring_bytes, token) {
            Ok(map) => {
                let guard = UnlinkGuard(Some(name.clone()));
                let offer =
                    Offer { identity, pid: std::process::id(), name, ring_bytes: self.config.ring_bytes as u64, token };
                Some((offer, Arc::new(map), guard))
            }
            Err(e) => {
                tracing::debug!("no shared-memory segment ({e}): this link stays on the network");
                None
            }
        }
    }

    /// Whether to take `offer`: the mapped segment and a pidfd of the connector.
    fn take_offer(&self, offer: &Offer) -> Result<(Arc<Mapping>, Option<std::os::fd::OwnedFd>), String> {
        if self.config.mode != SharedMemory::Auto {
            return Err("shared memory is off here".into());
        }
        if self.identity.as_deref() != Some(offer.identity.as_str()) {
            return Err("the connector is on another host (or PID namespace)".into());
        }
        let ring_bytes = usize::try_from(offer.ring_bytes).map_err(|_| "ring size")?;
        let map = segment::open(&offer.name, ring_bytes, offer.token)?;
        let pidfd = liveness::pidfd(offer.pid)
            .inspect_err(|e| tracing::debug!(pid = offer.pid, "no pidfd for the peer ({e}): side channel only"))
            .ok();
        Ok((Arc::new(map), pidfd))
    }

    /// Starts `side`'s end over `map`, watched through `net` and `pidfd`.
    fn start(
        &self,
        map: Arc<Mapping>,
        side: Side,
        net: Arc<dyn Link>,
        pidfd: Option<std::os::fd::OwnedFd>,
    ) -> Result<Arc<dyn Link>, LinkError> {
        let link = ShmLink::start(map, side, self.config.max_frame_bytes, Some(net.clone()))
            .map_err(|e| LinkError::Closed(format!("starting a shared-memory link: {e}")))?;
        liveness::watch(link.shared().clone(), Some(net), pidfd);
        self.shm_links.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(link))
    }

    /// Handles one accepted link: the link and hello to hand on, or `None` to drop it.
    async fn answer(&self, net: Arc<dyn Link>, hello: Bytes) -> Option<(Arc<dyn Link>, Bytes)> {
        let (offer, inner) = match hello::unwrap(&hello) {
            Ok(None) => return Some((net, hello)),
            Ok(Some(split)) => split,
            Err(why) => {
                tracing::debug!("refusing a link: {why}");
                net.close();
                return None;
            }
        };
        let Some(offer) = offer else { return Some((net, inner)) };
        match self.take_offer(&offer) {
            Ok((map, pidfd)) => {
                if let Err(e) = net.send(hello::answer(Some(std::process::id()))).await {
                    tracing::debug!("answering a shared-memory offer: {e}");
                    return None;
                }
                match self.start(map, Side::Acceptor, net.clone(), pidfd) {
                    Ok(link) => Some((link, inner)),
                    Err(e) => {
                        tracing::debug!("{e}");
                        net.close();
                        None
                    }
                }
            }
            Err(why) => {
                tracing::debug!(segment = offer.name.as_str(), "declining shared memory: {why}");
                net.send(hello::answer(None)).await.ok()?;
                Some((net, inner))
            }
        }
    }
}

#[async_trait]
impl Endpoint for ShmEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }

    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError> {
        let Some((offer, map, guard)) = self.prepare_offer() else {
            return self.inner.connect(addr, hello::wrap(None, &hello)).await;
        };
        // From here on, `guard` unlinks the segment however this ends (also when this
        // future is dropped): once the acceptor answers it has mapped (or declined) it.
        let net = self.inner.connect(addr, hello::wrap(Some(&offer), &hello)).await?;
        let answer = tokio::time::timeout(self.config.handshake_timeout, net.recv()).await;
        drop(guard);
        let answer = match answer {
            Ok(Ok(frame)) => hello::parse_answer(&frame),
            Ok(Err(e)) => return Err(e),
            Err(_) => Err("no answer to the shared-memory offer".to_string()),
        };
        match answer {
            Ok(Some(pid)) => {
                let pidfd = liveness::pidfd(pid)
                    .inspect_err(|e| tracing::debug!(pid, "no pidfd for the peer ({e}): side channel only"))
                    .ok();
                self.start(map, Side::Connector, net, pidfd)
            }
            Ok(None) => Ok(net),
            Err(why) => {
                net.close();
                Err(LinkError::Closed(format!("setting up a link to {addr}: {why}")))
            }
        }
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        loop {
            let (net, hello) = self.inner.accept().await?;
            if let Some(accepted) = self.answer(net, hello).await {
                return Ok(accepted);
            }
        }
    }

    fn may_use_shared_memory(&self) -> bool {
        // Already wrapped: never wrap twice.
        false
    }
}
