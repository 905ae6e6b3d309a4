//! [`TcpOrQuic`]: data links over TCP, beside a QUIC endpoint that still accepts them
//! and carries them to peers that offer no TCP path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::TcpEndpoint;
use crate::transport::endpoint::Endpoint;
use crate::transport::{Link, LinkError};

/// A link accepted on either endpoint, or why accepting ended.
type Accepted = Result<(Arc<dyn Link>, Bytes), LinkError>;

/// An [`Endpoint`] that opens links over TCP and accepts them over TCP and over a QUIC
/// endpoint, so that members which chose different data transports still connect.
///
/// [`connect`](Endpoint::connect) tries TCP first. When the peer offers no compatible
/// TCP path ([`TcpError::is_unsupported`](super::TcpError::is_unsupported): nothing listens, it runs the other security
/// mode, or it is not a phalanx TCP endpoint, as behind a UDP-only relay) the link is
/// opened over QUIC instead, which is encrypted and authenticated the same way. A
/// failed authentication is never retried over QUIC. [`accept`](Endpoint::accept)
/// returns links from either endpoint.
pub struct TcpOrQuic {
    tcp: Arc<TcpEndpoint>,
    quic: Arc<dyn Endpoint>,
    /// Links accepted on either endpoint, fed by two tasks.
    accepted: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Accepted>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
    /// Whether a fallback was logged already (once per endpoint is enough).
    warned: AtomicBool,
}

impl TcpOrQuic {
    /// Opens over `tcp`, falls back to `quic`, accepts on both. The advertised address
    /// ([`Endpoint::local_addr`]) is the QUIC one: the TCP endpoint listens on the same
    /// port number, which is where peers look for it.
    pub fn new(tcp: TcpEndpoint, quic: Arc<dyn Endpoint>) -> TcpOrQuic {
        let tcp = Arc::new(tcp);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let over_tcp = {
            let (tcp, tx) = (tcp.clone(), tx.clone());
            tokio::spawn(async move {
                loop {
                    let got = tcp.accept().await;
                    let done = got.is_err();
                    let got = got
                        .map(|(l, h)| (Arc::new(l) as Arc<dyn Link>, h))
                        .map_err(|e| LinkError::Closed(e.to_string()));
                    if tx.send(got).await.is_err() || done {
                        return;
                    }
                }
            })
        };
        let over_quic = {
            let quic = quic.clone();
            tokio::spawn(async move {
                loop {
                    let got = quic.accept().await;
                    let done = got.is_err();
                    if tx.send(got).await.is_err() || done {
                        return;
                    }
                }
            })
        };
        TcpOrQuic {
            tcp,
            quic,
            accepted: tokio::sync::Mutex::new(rx),
            tasks: [over_tcp, over_quic],
            warned: AtomicBool::new(false),
        }
    }

    /// The TCP endpoint.
    pub fn tcp(&self) -> &TcpEndpoint {
        &self.tcp
    }
}

impl Drop for TcpOrQuic {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[async_trait]
impl Endpoint for TcpOrQuic {
    fn local_addr(&self) -> SocketAddr {
        self.quic.local_addr()
    }

    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError> {
        match self.tcp.connect(addr, hello.clone()).await {
            Ok(link) => Ok(Arc::new(link)),
            Err(e) if e.is_unsupported() => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%addr, "no TCP data path ({e}); this link and any like it run over QUIC");
                } else {
                    tracing::debug!(%addr, "no TCP data path ({e}); over QUIC");
                }
                self.quic.connect(addr, hello).await
            }
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        self.accepted.lock().await.recv().await.unwrap_or_else(|| Err(LinkError::Closed("endpoint closed".into())))
    }
}
