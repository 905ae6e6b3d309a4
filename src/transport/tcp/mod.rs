//! The TCP transport: data links over the kernel's TCP, encrypted with TLS 1.3 (rustls,
//! ring) and authenticated by the cluster secret exactly as QUIC links are; or, when
//! asked for explicitly, in plaintext for trusted networks.
//!
//! A process binds one [`TcpEndpoint`] (one listening socket) that accepts links, and
//! opens links with it; [`TcpEndpoint::connect`] hands the acceptor a *hello* as
//! [`QuicEndpoint::connect`](super::quic::QuicEndpoint::connect) does. The kernel
//! segments, acknowledges and paces the bytes, so a link costs the process only its
//! encryption and one copy each way, where QUIC also builds, encrypts and parses every
//! 1.2 KB packet in user space (see docs/PERF.md). After the TLS handshake a link seals
//! and opens its records itself with the session's keys, in place in its own buffers
//! (`sealed`, the kernel-TLS route in user space), which saves rustls' extra copy on
//! each side.
//!
//! # Security
//!
//! [`TcpSecurity::Tls`] (the default): TLS 1.3 only, the ring provider, a fresh
//! self-signed certificate per endpoint that authenticates nobody, and the cluster
//! secret proved both ways over the TLS exporter of the connection, with the same
//! labels, proofs and verifier as QUIC (`transport::auth`; the argument for soundness is
//! in the [`quic`](super::quic) module docs). A client without the secret gets no proof
//! and reaches no `accept`; a server without it is refused by the client.
//!
//! [`TcpSecurity::Plaintext`] is **for trusted networks only**: nothing is encrypted or
//! integrity-protected. Both ends still prove the cluster secret, over fresh nonces of
//! both, so a stranger who merely reaches the port cannot open a link, and a recorded
//! proof cannot be replayed; but anyone on the path can read the data, change it, or
//! take over a connection after its setup.
//!
//! # Wire format
//!
//! The client sends a preamble, `PHXT`, version 1 and its mode (`T` or `P`); the server
//! answers with its own, and both give up with [`TcpError::ModeMismatch`] if the modes
//! differ. Then the TLS handshake (ALPN `phalanx-tcp/1`) or the two 32-byte nonces;
//! then the client's proof (`PHX1` + HMAC), the server's proof (or `PHXN` and zeros if it
//! refused the client's), the hello (u32 length, little-endian, and the bytes) and the
//! server's acknowledgement (one byte, 1). After that each direction carries frames:
//! [`Header::encode`](super::Header::encode) (32 bytes), the payload length (u64,
//! little-endian) and the payload. With TLS, once the client has sent its hello both
//! ends take the session's traffic keys out of rustls, and everything after — the
//! acknowledgement, then the frames — travels in sealed records: `u32` ciphertext
//! length (little-endian, the AEAD's additional data), ciphertext, 16-byte tag; the
//! suite the handshake chose, the nonce its IV XOR the record's sequence number
//! continued from rustls'; a frame with a payload up to 64 KiB is one record, a larger
//! one two (prefix, payload).
//!
//! # Flow control, buffering and failure
//!
//! The link's buffer is the kernel's: [`TcpConfig::socket_buffer_bytes`] of send and of
//! receive buffer per connection (4 MiB by default; Linux doubles it), plus one frame
//! being read and one queued on the receiving side, so a fast sender waits for a slow
//! receiver. A sender writes its frame to the socket itself (no task between the caller
//! and the kernel), one frame at a time; a send that waits for room waits inside its
//! frame, and one cancelled there still hands the whole frame over (`writer`). Frames above
//! [`TcpConfig::max_frame_bytes`] are refused from their length prefix, before anything
//! is allocated, and close the link. Setups are bounded in number
//! ([`MAX_PENDING_HANDSHAKES`]) and time ([`TcpConfig::handshake_timeout`]).
//!
//! [`Link::close`] (or dropping a [`TcpLink`]) drops the connection: the peer's pending
//! and later calls fail with [`LinkError::Closed`]. A peer process that dies is seen at
//! once (its kernel closes the connection); a host that vanishes, after the TCP
//! keep-alive probes ([`TcpConfig::keep_alive`]) go unanswered.

mod config;
mod fallback;
mod frames;
mod link;
mod sealed;
mod setup;
#[cfg(test)]
mod tests;
mod writer;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};

pub use self::config::{TcpConfig, TcpError, TcpSecurity};
pub use self::fallback::TcpOrQuic;
pub use self::link::TcpLink;
use self::setup::Context;
use super::auth::tls_configs;
use super::endpoint::Endpoint;
use super::{Link, LinkError};

/// Most link setups an endpoint runs at once; further connections are dropped.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// ALPN protocol id of TLS data links.
const ALPN: &[u8] = b"phalanx-tcp/1";
/// The TLS server name clients send; certificates are not checked against it.
const SERVER_NAME: &str = "phalanx.invalid";

/// A process's TCP endpoint: one listening socket that accepts links, and the settings
/// it opens links with.
///
/// Must be created inside a tokio runtime, which then drives it. Dropping it stops
/// accepting; links already made keep working.
pub struct TcpEndpoint {
    context: Arc<Context>,
    local: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::Receiver<(TcpLink, Bytes)>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for TcpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpEndpoint")
            .field("local_addr", &self.local)
            .field("config", &self.context.config)
            .finish_non_exhaustive()
    }
}

impl TcpEndpoint {
    /// Listens at `addr` (port 0 picks a free one) and starts accepting links in the
    /// background of the current tokio runtime.
    pub fn bind(addr: SocketAddr, config: TcpConfig) -> Result<TcpEndpoint, TcpError> {
        config.validate()?;
        tokio::runtime::Handle::try_current()
            .map_err(|_| TcpError::Setup("TcpEndpoint::bind must be called inside a tokio runtime".into()))?;
        let setup = |what: &str, e: &dyn fmt::Display| TcpError::Setup(format!("{what}: {e}"));
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM first: with AES-NI the fastest suite, and as strong as needed here.
        provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let provider = Arc::new(provider);

        let (mut server_tls, mut client_tls) =
            tls_configs(provider.clone(), SERVER_NAME, ALPN).map_err(|(what, e)| setup(what, &e))?;
        // Every connection does a full handshake; the secret proof authenticates it.
        server_tls.send_tls13_tickets = 0;
        // The links seal their records themselves once the session is made (`sealed`).
        server_tls.enable_secret_extraction = true;
        client_tls.enable_secret_extraction = true;

        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| setup("TCP socket", &e))?;
        socket.set_reuseaddr(true).map_err(|e| setup("SO_REUSEADDR", &e))?;
        // Accepted connections inherit the listener's buffer sizes.
        set_buffers(&socket, config.socket_buffer_bytes);
        socket.bind(addr).map_err(|e| setup(&format!("binding TCP {addr}"), &e))?;
        let listener = socket.listen(1024).map_err(|e| setup("listen", &e))?;
        let local = listener.local_addr().map_err(|e| setup("local address", &e))?;

        let context = Arc::new(Context {
            config,
            provider,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_tls)),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_tls)),
        });
        let (tx, rx) = mpsc::channel(16);
        let acceptor = tokio::spawn(accept_loop(listener, context.clone(), tx));
        Ok(TcpEndpoint { context, local, accepted: tokio::sync::Mutex::new(rx), acceptor })
    }

    /// The address the endpoint listens at (with the port the OS picked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The endpoint's settings.
    pub fn config(&self) -> &TcpConfig {
        &self.context.config
    }

    /// Opens a link to the endpoint at `peer`, which receives `hello` from its
    /// [`accept`](Self::accept). Fails with [`TcpError::Refused`] when nothing listens
    /// there, [`TcpError::ModeMismatch`] when the peer runs the other security mode,
    /// [`TcpError::Auth`] when either side cannot prove the cluster secret, and
    /// [`TcpError::Timeout`] after [`TcpConfig::handshake_timeout`].
    pub async fn connect(&self, peer: SocketAddr, hello: Bytes) -> Result<TcpLink, TcpError> {
        let cfg = &self.context.config;
        if hello.len() > cfg.max_hello_bytes {
            return Err(TcpError::HelloTooLarge { len: hello.len(), limit: cfg.max_hello_bytes });
        }
        let setup = async {
            let socket = match peer {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(|e| TcpError::Setup(format!("TCP socket: {e}")))?;
            set_buffers(&socket, cfg.socket_buffer_bytes);
            let tcp = socket.connect(peer).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => TcpError::Refused(peer),
                _ => TcpError::Connect { addr: peer, reason: e.to_string() },
            })?;
            tune(&tcp, cfg);
            self.context.client(tcp, peer, &hello).await
        };
        tokio::time::timeout(cfg.handshake_timeout, setup).await.map_err(|_| TcpError::Timeout(peer))?
    }

    /// Waits for the next authenticated link and returns it with the peer's hello.
    ///
    /// Setups that fail (strangers, timeouts, protocol errors) are dropped in the
    /// background and never surface here; this only fails once the endpoint is closed.
    pub async fn accept(&self) -> Result<(TcpLink, Bytes), TcpError> {
        self.accepted.lock().await.recv().await.ok_or(TcpError::EndpointClosed)
    }

    /// Stops accepting links; links already made keep working.
    pub fn close(&self) {
        self.acceptor.abort();
    }
}

impl Drop for TcpEndpoint {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Best effort: the kernel caps sizes as it sees fit, and the defaults work.
fn set_buffers(socket: &TcpSocket, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let size = u32::try_from(bytes).unwrap_or(u32::MAX);
    if let Err(e) = socket.set_recv_buffer_size(size) {
        tracing::debug!(size, "could not set the TCP receive buffer size: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(size) {
        tracing::debug!(size, "could not set the TCP send buffer size: {e}");
    }
}

/// No Nagle delay (a frame's last segment goes out at once) and keep-alive probes.
fn tune(tcp: &TcpStream, cfg: &TcpConfig) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("could not set TCP_NODELAY: {e}");
    }
    if let Some(every) = cfg.keep_alive {
        let probes = socket2::TcpKeepalive::new().with_time(every).with_interval(every).with_retries(5);
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes) {
            tracing::debug!("could not set TCP keep-alive: {e}");
        }
    }
}

/// Accepts connections, sets each up in its own task (bounded in number and time), and
/// hands finished links to [`TcpEndpoint::accept`].
async fn accept_loop(listener: tokio::net::TcpListener, context: Arc<Context>, tx: mpsc::Sender<(TcpLink, Bytes)>) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait a little instead of spinning.
                tracing::debug!("TCP accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // dropping the stream refuses the attempt
        };
        let (context, tx) = (context.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tune(&tcp, &context.config);
            let setup = tokio::time::timeout(context.config.handshake_timeout, context.server(tcp, peer));
            match setup.await {
                Ok(Ok(link)) => {
                    // Fails only when the endpoint is gone; dropping the link closes it.
                    let _ = tx.send(link).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TCP link setup failed: {e}"),
                Err(_) => tracing::debug!(%peer, "TCP link setup timed out"),
            }
        });
    }
}

#[async_trait]
impl Endpoint for TcpEndpoint {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError> {
        match TcpEndpoint::connect(self, addr, hello).await {
            Ok(link) => Ok(Arc::new(link)),
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        match TcpEndpoint::accept(self).await {
            Ok((link, hello)) => Ok((Arc::new(link), hello)),
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }
}
