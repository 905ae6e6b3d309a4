//! The QUIC transport: links between hosts over quinn, TLS 1.3 and a cluster secret.
//!
//! A process binds one [`QuicEndpoint`] (one UDP socket) that both accepts and opens
//! links. [`QuicEndpoint::connect`] opens a [`QuicLink`] to a peer's endpoint and hands it
//! a *hello* (opaque bytes, at most [`QuicConfig::max_hello_bytes`]: a higher layer says
//! "I am rank r of epoch e" there); the peer's [`QuicEndpoint::accept`] returns the link
//! and that hello. Both ends then use the link through the [`Link`] trait.
//!
//! # Security
//!
//! Every connection is TLS 1.3 (the only version offered), with rustls' `ring` crypto
//! provider chosen explicitly. Each endpoint makes a fresh self-signed certificate with
//! rcgen when it binds. Certificates do **not** authenticate anyone: the client accepts
//! any server certificate (it still checks the TLS 1.3 handshake signature against the
//! key in that certificate). Authentication is the cluster secret instead:
//!
//! 1. Both ends derive 32 bytes from the TLS exporter of *this* connection
//!    ([RFC 5705](https://tools.ietf.org/html/rfc5705) / RFC 8446 §7.5, label
//!    `EXPORTER-phalanx-auth-v1`). The exporter depends on both ends' handshake randoms
//!    and key shares, so it is unique to the connection and known only to its two ends.
//! 2. The client sends `HMAC-SHA256(secret, "phalanx/1 client" || exporter)`. The server
//!    verifies it in constant time; on a mismatch it closes the connection with
//!    [`CODE_AUTH_FAILED`], having sent nothing but its TLS handshake.
//! 3. Only then does the server send `HMAC-SHA256(secret, "phalanx/1 server" ||
//!    exporter)`, which the client verifies the same way, and only then does the client
//!    send its hello.
//!
//! Why skipping certificate verification is sound here: a man in the middle who
//! terminates TLS towards each side ends up with two different TLS sessions, hence two
//! different exporters. A proof relayed from one session does not verify on the other,
//! and without the secret it cannot compute a fresh one; the role labels stop a proof
//! from being reflected back to its sender. So a peer that completes step 2 (or 3)
//! knows the secret *and* is the other end of this very TLS session, whose traffic keys
//! it alone shares with us; everything after is confidential and integrity-protected.
//!
//! Caveats, by design:
//! - The secret must have high entropy (say 32 random bytes, hex-encoded): whoever can
//!   pose as a server to a connecting client (by hijacking an address) receives a proof
//!   computed under the secret and can try to guess a low-entropy secret offline. A
//!   stranger who merely reaches the server's port gets no proof at all.
//! - With **no secret** configured ([`QuicConfig::secret`] is `None`) an endpoint
//!   accepts every peer and proves nothing itself: traffic is still encrypted, but
//!   anyone who can reach the port can open links. That mode is for tests and trusted
//!   networks only. An endpoint that has a secret refuses peers that cannot prove it,
//!   in both directions.
//!
//! Limits keep a hostile peer from exhausting memory: frames are length-prefixed and a
//! length above [`QuicConfig::max_frame_bytes`] is refused *before* anything is
//! allocated (the link is then closed with [`CODE_FRAME_TOO_LARGE`]), hellos are capped,
//! at most [`MAX_PENDING_HANDSHAKES`] handshakes run at once (further attempts are
//! refused), each of them within [`QuicConfig::handshake_timeout`], and every peer may
//! open one stream per connection.
//!
//! # Wire format
//!
//! A link is `connections_per_link` QUIC connections (1 by default), each with one
//! bidirectional stream opened by the client. On each stream, after the exchange above
//! (client: `PHX1` + proof; server: `PHX1` + proof; client: link id (16 bytes), stripe
//! index and count (u16 each), hello length (u32) and hello; server: one byte `1`),
//! each direction carries frames: [`Header::encode`] (32 bytes), the payload length
//! (u64, little-endian) and the payload. Frame `i` of a link travels on stripe
//! `i % connections_per_link` and the receiver reads the stripes round-robin, so order
//! is kept; several connections let quinn encrypt and send on several cores.
//!
//! # Flow control and buffering
//!
//! The link's buffer is QUIC flow control: a sender blocks once the receiver's stream
//! window ([`QuicConfig::stream_receive_window`]) is full of unread data, plus one
//! frame queued and one being written on the sending side and one queued and one being
//! read on the receiving side, per stripe. The defaults size the windows to the
//! bandwidth-delay product of a 1 Gbit/s path with 50 ms round trips (6.25 MB): 8 MiB
//! per stream, 16 MiB per connection, so memory per link stays bounded by a few tens of
//! MiB while a long fat pipe stays full. Below QUIC, the endpoint asks for 4 MiB UDP
//! socket buffers ([`QuicConfig::socket_buffer_bytes`]), so that datagrams are not
//! dropped while the receiving process waits for a CPU.
//!
//! # Closing
//!
//! [`Link::close`] (or dropping a [`QuicLink`]) closes its connections at once with
//! [`CODE_CLOSED`]: frames still in flight are discarded, and the peer's pending and
//! later calls fail with [`LinkError::Closed`]. A peer that crashes or vanishes is seen
//! the same way once [`QuicConfig::idle_timeout`] passes without a packet from it
//! (keep-alives, [`QuicConfig::keep_alive`], keep an idle but live link open).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, ReadError, ReadExactError, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Sha256;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::{Frame, Header, Link, LinkError};

/// Application close code: the link was closed by its owner.
pub const CODE_CLOSED: VarInt = VarInt::from_u32(0x5000);
/// Application close code: the peer failed to prove knowledge of the cluster secret.
pub const CODE_AUTH_FAILED: VarInt = VarInt::from_u32(0x5001);
/// Application close code: the peer broke the link setup protocol (bad magic, hello
/// too large, inconsistent striping).
pub const CODE_PROTOCOL: VarInt = VarInt::from_u32(0x5002);
/// Application close code: the peer sent a frame above the receiver's size limit.
pub const CODE_FRAME_TOO_LARGE: VarInt = VarInt::from_u32(0x5003);
/// Application close code: the server has too many link setups in progress.
pub const CODE_BUSY: VarInt = VarInt::from_u32(0x5004);

/// Most connections (stripes) one link may use.
pub const MAX_STRIPES: usize = 64;
/// Most connection handshakes (TLS plus secret proof plus hello) an endpoint runs at
/// once, and most striped links it holds half-assembled; more attempts are refused.
pub const MAX_PENDING_HANDSHAKES: usize = 64;

/// ALPN protocol id: a non-phalanx QUIC client fails the TLS handshake.
const ALPN: &[u8] = b"phalanx/1";
/// The TLS server name clients send; certificates are not checked against it.
const SERVER_NAME: &str = "phalanx.invalid";
const MAGIC: &[u8; 4] = b"PHX1";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-phalanx-auth-v1";
const CLIENT_LABEL: &[u8] = b"phalanx/1 client";
const SERVER_LABEL: &[u8] = b"phalanx/1 server";
const PROOF_LEN: usize = 32;
/// Header plus payload length.
const PREFIX_LEN: usize = Header::LEN + 8;
/// Link id, stripe index, stripe count, hello length.
const LINK_HEADER_LEN: usize = 16 + 2 + 2 + 4;
const ACK: u8 = 1;

/// Settings of a [`QuicEndpoint`] and of the links it makes.
#[derive(Clone)]
pub struct QuicConfig {
    /// The cluster secret peers must prove they know (see the module docs); `None`
    /// accepts everyone and is only for tests and trusted networks. Use high-entropy
    /// secrets (32 random bytes, say). Must not be empty.
    pub secret: Option<Arc<[u8]>>,
    /// Largest frame, header ([`Header::LEN`]) plus payload, this end sends or
    /// accepts. Default: 64 MiB plus the header.
    pub max_frame_bytes: usize,
    /// Largest hello this end sends or accepts. Default: 64 KiB.
    pub max_hello_bytes: usize,
    /// Unread bytes a peer may send on one stream (per stripe): the link's buffer.
    /// Default 8 MiB, above the 6.25 MB bandwidth-delay product of 1 Gbit/s × 50 ms.
    pub stream_receive_window: u64,
    /// Unread bytes a peer may send over one connection. Default 16 MiB.
    pub receive_window: u64,
    /// Unacknowledged bytes this end keeps in flight per connection. Default 16 MiB.
    pub send_window: u64,
    /// Receive and send buffer sizes requested for the endpoint's UDP socket
    /// (`SO_RCVBUF`, `SO_SNDBUF`); the OS may cap them (Linux: `net.core.rmem_max` and
    /// `wmem_max`). 0 keeps the OS defaults. Default 4 MiB: with Linux's default of
    /// about 208 KiB, a receiver descheduled for a millisecond drops datagrams at a few
    /// hundred MB/s, which costs retransmissions and congestion-window cuts.
    pub socket_buffer_bytes: usize,
    /// QUIC connections per link, frames striped over them (1 to [`MAX_STRIPES`]).
    /// More than one spreads encryption over several cores. Default 1.
    pub connections_per_link: usize,
    /// A connection with no packet from the peer for this long is lost: the bound on
    /// noticing a crashed peer. Default 10 s.
    pub idle_timeout: Duration,
    /// Keep-alive interval, well below `idle_timeout`, so an idle live link stays
    /// open. Default 2 s.
    pub keep_alive: Option<Duration>,
    /// Bound on setting up a link: TLS handshake, secret proofs and hello. Default 10 s.
    pub handshake_timeout: Duration,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            secret: None,
            max_frame_bytes: (64 << 20) + Header::LEN,
            max_hello_bytes: 64 << 10,
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
            socket_buffer_bytes: 4 << 20,
            connections_per_link: 1,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Some(Duration::from_secs(2)),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl QuicConfig {
    /// The default settings with `secret` as the cluster secret.
    pub fn with_secret(secret: impl AsRef<[u8]>) -> QuicConfig {
        QuicConfig { secret: Some(Arc::from(secret.as_ref())), ..QuicConfig::default() }
    }

    fn validate(&self) -> Result<(), QuicError> {
        let bad = |what: &str| Err(QuicError::Setup(format!("invalid QuicConfig: {what}")));
        if self.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return bad("the secret is empty (use None for no secret)");
        }
        if self.max_frame_bytes < Header::LEN {
            return bad("max_frame_bytes is smaller than a frame header");
        }
        if !(1..=MAX_STRIPES).contains(&self.connections_per_link) {
            return bad("connections_per_link must be between 1 and MAX_STRIPES");
        }
        if self.max_hello_bytes > u32::MAX as usize {
            return bad("max_hello_bytes does not fit in 32 bits");
        }
        if self.stream_receive_window == 0 || self.receive_window == 0 || self.send_window == 0 {
            return bad("windows must be positive");
        }
        if self.idle_timeout.is_zero() || self.handshake_timeout.is_zero() {
            return bad("timeouts must be positive");
        }
        Ok(())
    }

    fn transport(&self, peer_streams: u32) -> Result<Arc<quinn::TransportConfig>, QuicError> {
        let varint =
            |v: u64, what: &str| VarInt::from_u64(v).map_err(|_| QuicError::Setup(format!("{what} is too large")));
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| QuicError::Setup("idle_timeout is too large".into()))?;
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(self.stream_receive_window, "stream_receive_window")?)
            .receive_window(varint(self.receive_window, "receive_window")?)
            .send_window(self.send_window)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_bidi_streams(VarInt::from_u32(peer_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        Ok(Arc::new(t))
    }

    /// HMAC-SHA256 keyed with the secret (the empty key without one).
    fn mac(&self) -> Result<Hmac<Sha256>, QuicError> {
        let secret: &[u8] = self.secret.as_deref().unwrap_or(&[]);
        Hmac::<Sha256>::new_from_slice(secret).map_err(|_| QuicError::Setup("HMAC rejected the secret".into()))
    }
}

impl fmt::Debug for QuicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_hello_bytes", &self.max_hello_bytes)
            .field("stream_receive_window", &self.stream_receive_window)
            .field("receive_window", &self.receive_window)
            .field("send_window", &self.send_window)
            .field("socket_buffer_bytes", &self.socket_buffer_bytes)
            .field("connections_per_link", &self.connections_per_link)
            .field("idle_timeout", &self.idle_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// Why binding an endpoint or setting up a link failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicError {
    /// Bad configuration, no tokio runtime, socket, certificate or TLS setup failure.
    #[error("QUIC setup failed: {0}")]
    Setup(String),
    /// The connection could not be made or broke during link setup.
    #[error("QUIC connection to {addr} failed: {reason}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// One side could not prove knowledge of the cluster secret.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer broke the link setup protocol or refused our part of it.
    #[error("link setup protocol error: {0}")]
    Protocol(String),
    /// The hello exceeds [`QuicConfig::max_hello_bytes`].
    #[error("hello of {len} bytes exceeds the limit of {limit} bytes")]
    HelloTooLarge {
        /// The hello's size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The server refused the attempt because too many setups are in progress.
    #[error("the peer is busy: too many link setups in progress")]
    Busy,
    /// Link setup took longer than [`QuicConfig::handshake_timeout`].
    #[error("link setup with {0} timed out")]
    Timeout(SocketAddr),
    /// The endpoint was closed; it accepts nothing more.
    #[error("endpoint closed")]
    EndpointClosed,
}

/// A process's QUIC endpoint: one UDP socket that accepts links and opens them.
///
/// Must be created inside a tokio runtime, which then drives it. Dropping it stops
/// accepting; links already made keep working.
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    config: Arc<QuicConfig>,
    provider: Arc<CryptoProvider>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<(QuicLink, Bytes)>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for QuicEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicEndpoint")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl QuicEndpoint {
    /// Binds a UDP socket at `addr` (port 0 picks a free one) and starts accepting
    /// links in the background of the current tokio runtime.
    pub fn bind(addr: SocketAddr, config: QuicConfig) -> Result<QuicEndpoint, QuicError> {
        config.validate()?;
        tokio::runtime::Handle::try_current()
            .map_err(|_| QuicError::Setup("QuicEndpoint::bind must be called inside a tokio runtime".into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let setup = |what: &str, e: &dyn fmt::Display| QuicError::Setup(format!("{what}: {e}"));

        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| setup("certificate generation", &e))?;
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| setup("TLS server config", &e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| setup("TLS server certificate", &e))?;
        server_tls.alpn_protocols = vec![ALPN.to_vec()];
        let server_quic = QuicServerConfig::try_from(server_tls).map_err(|e| setup("QUIC server config", &e))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_quic));
        server_config.transport_config(config.transport(1)?);

        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| setup("TLS client config", &e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SecretAuthenticated { provider: provider.clone() }))
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![ALPN.to_vec()];
        // Every connection does a full handshake; the secret proof authenticates it.
        client_tls.resumption = rustls::client::Resumption::disabled();
        let client_quic = QuicClientConfig::try_from(client_tls).map_err(|e| setup("QUIC client config", &e))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_quic));
        client_config.transport_config(config.transport(0)?);

        let socket = std::net::UdpSocket::bind(addr).map_err(|e| setup("binding UDP socket", &e))?;
        if config.socket_buffer_bytes > 0 {
            let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(|e| setup("UDP socket", &e))?;
            // Best effort: the OS caps or refuses sizes as it sees fit; the defaults work.
            let size = config.socket_buffer_bytes;
            if let Err(e) = state.set_recv_buffer_size((&socket).into(), size) {
                tracing::debug!(size, "could not set the UDP receive buffer size: {e}");
            }
            if let Err(e) = state.set_send_buffer_size((&socket).into(), size) {
                tracing::debug!(size, "could not set the UDP send buffer size: {e}");
            }
        }
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| setup("QUIC endpoint", &e))?;

        let config = Arc::new(config);
        let (tx, rx) = mpsc::channel(16);
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), config.clone(), tx));
        Ok(QuicEndpoint { endpoint, client_config, config, provider, accepted: tokio::sync::Mutex::new(rx), acceptor })
    }

    /// The address the endpoint is bound to (with the port the OS picked).
    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        self.endpoint.local_addr().map_err(|e| QuicError::Setup(format!("local address: {e}")))
    }

    /// Opens a link to the endpoint at `peer`, which receives `hello` from its
    /// [`accept`](Self::accept). Fails with [`QuicError::Auth`] when either side cannot
    /// prove the cluster secret, and with [`QuicError::Timeout`] after
    /// [`QuicConfig::handshake_timeout`].
    pub async fn connect(&self, peer: SocketAddr, hello: Bytes) -> Result<QuicLink, QuicError> {
        let cfg = &self.config;
        if hello.len() > cfg.max_hello_bytes {
            return Err(QuicError::HelloTooLarge { len: hello.len(), limit: cfg.max_hello_bytes });
        }
        let mut link_id = [0u8; 16];
        self.provider
            .secure_random
            .fill(&mut link_id)
            .map_err(|_| QuicError::Setup("no system randomness for a link id".into()))?;
        let count = cfg.connections_per_link;
        let mut set = JoinSet::new();
        for index in 0..count {
            let setup = StripeSetup {
                endpoint: self.endpoint.clone(),
                client_config: self.client_config.clone(),
                config: cfg.clone(),
                peer,
                link_id,
                index: index as u16,
                count: count as u16,
                hello: if index == 0 { hello.clone() } else { Bytes::new() },
            };
            set.spawn(setup.run());
        }
        let collect = async {
            let mut stripes: Vec<Option<Stripe>> = (0..count).map(|_| None).collect();
            while let Some(joined) = set.join_next().await {
                let (index, stripe) = joined
                    .map_err(|e| QuicError::Connect { addr: peer, reason: format!("setup task failed: {e}") })??;
                stripes[index] = Some(stripe);
            }
            Ok(stripes.into_iter().flatten().collect::<Vec<_>>())
        };
        // Dropping the set on error or timeout aborts the other stripes' setups, and
        // dropping their connections closes them.
        let stripes =
            tokio::time::timeout(cfg.handshake_timeout, collect).await.map_err(|_| QuicError::Timeout(peer))??;
        Ok(QuicLink::new(stripes, cfg.max_frame_bytes, peer))
    }

    /// Waits for the next authenticated link and returns it with the peer's hello.
    ///
    /// Setups that fail (strangers, timeouts, protocol errors) are dropped in the
    /// background and never surface here; this only fails once the endpoint is closed.
    pub async fn accept(&self) -> Result<(QuicLink, Bytes), QuicError> {
        self.accepted.lock().await.recv().await.ok_or(QuicError::EndpointClosed)
    }

    /// Closes the endpoint and every connection on it, links included.
    pub fn close(&self) {
        self.acceptor.abort();
        self.endpoint.close(CODE_CLOSED, b"endpoint closed");
    }
}

impl Drop for QuicEndpoint {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.endpoint.set_server_config(None);
    }
}

/// Accepts connections, sets each up in its own task (bounded in number and time), and
/// hands finished links to [`QuicEndpoint::accept`].
async fn accept_loop(endpoint: quinn::Endpoint, config: Arc<QuicConfig>, tx: mpsc::Sender<(QuicLink, Bytes)>) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let groups: Arc<StdMutex<HashMap<[u8; 16], Group>>> = Arc::default();
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let (config, tx, groups) = (config.clone(), tx.clone(), groups.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let setup = tokio::time::timeout(config.handshake_timeout, accept_stripe(incoming, &config));
            let Ok(Ok(stripe)) = setup.await else {
                return;
            };
            if let Some((link, hello)) = assemble(stripe, &config, &groups) {
                // Fails only when the endpoint is gone; dropping the link closes it.
                let _ = tx.send((link, hello)).await;
            }
        });
    }
}

/// The stripes of a link that arrived so far.
struct Group {
    count: u16,
    stripes: Vec<Option<Stripe>>,
    hello: Bytes,
}

/// Adds a stripe to its link; returns the link once all of its stripes are in.
fn assemble(
    stripe: Stripe,
    config: &Arc<QuicConfig>,
    groups: &Arc<StdMutex<HashMap<[u8; 16], Group>>>,
) -> Option<(QuicLink, Bytes)> {
    let peer = stripe.conn.remote_address();
    if stripe.count == 1 {
        let hello = stripe.hello.clone();
        return Some((QuicLink::new(vec![stripe], config.max_frame_bytes, peer), hello));
    }
    let id = stripe.link_id;
    let mut map = groups.lock().unwrap_or_else(|p| p.into_inner());
    if !map.contains_key(&id) {
        if map.len() >= MAX_PENDING_HANDSHAKES {
            stripe.conn.close(CODE_BUSY, b"too many links being set up");
            return None;
        }
        map.insert(
            id,
            Group { count: stripe.count, stripes: (0..stripe.count).map(|_| None).collect(), hello: Bytes::new() },
        );
        // A link whose stripes do not all arrive in time is dropped, closing the rest.
        let (groups, timeout) = (groups.clone(), config.handshake_timeout);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let stale = groups.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            for s in stale.into_iter().flat_map(|g| g.stripes).flatten() {
                s.conn.close(CODE_PROTOCOL, b"not all stripes of the link arrived");
            }
        });
    }
    let group = map.get_mut(&id)?;
    let index = stripe.index as usize;
    if stripe.count != group.count || group.stripes[index].is_some() {
        let bad = map.remove(&id);
        stripe.conn.close(CODE_PROTOCOL, b"inconsistent stripes");
        for s in bad.into_iter().flat_map(|g| g.stripes).flatten() {
            s.conn.close(CODE_PROTOCOL, b"inconsistent stripes");
        }
        return None;
    }
    if index == 0 {
        group.hello = stripe.hello.clone();
    }
    group.stripes[index] = Some(stripe);
    if group.stripes.iter().any(Option::is_none) {
        return None;
    }
    let group = map.remove(&id)?;
    let stripes: Vec<Stripe> = group.stripes.into_iter().flatten().collect();
    Some((QuicLink::new(stripes, config.max_frame_bytes, peer), group.hello))
}

/// One authenticated connection of a link and its stream.
struct Stripe {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    link_id: [u8; 16],
    index: u16,
    count: u16,
    hello: Bytes,
}

/// The exporter-derived value both ends of one TLS session, and only they, know.
fn exporter(conn: &quinn::Connection) -> Result<[u8; 32], QuicError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| QuicError::Setup("TLS exporter unavailable".into()))?;
    Ok(out)
}

fn proof(mut mac: Hmac<Sha256>, role: &[u8], exported: &[u8; 32]) -> [u8; 4 + PROOF_LEN] {
    mac.update(role);
    mac.update(exported);
    let mut out = [0u8; 4 + PROOF_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..].copy_from_slice(&mac.finalize().into_bytes());
    out
}

/// Checks a peer's `PHX1` + proof in constant time (the magic is public).
fn verify_proof(mut mac: Hmac<Sha256>, role: &[u8], exported: &[u8; 32], got: &[u8; 4 + PROOF_LEN]) -> bool {
    mac.update(role);
    mac.update(exported);
    &got[..4] == MAGIC && mac.verify_slice(&got[4..]).is_ok()
}

/// Server side of one connection's setup.
async fn accept_stripe(incoming: quinn::Incoming, config: &QuicConfig) -> Result<Stripe, QuicError> {
    let peer = incoming.remote_address();
    let fail = |e: &dyn fmt::Display| QuicError::Connect { addr: peer, reason: e.to_string() };
    let conn = incoming.await.map_err(|e| fail(&e))?;
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| fail(&e))?;
    let exported = exporter(&conn)?;
    let mac = config.mac()?;

    let mut client_proof = [0u8; 4 + PROOF_LEN];
    recv.read_exact(&mut client_proof).await.map_err(|e| fail(&e))?;
    if !verify_proof(mac.clone(), CLIENT_LABEL, &exported, &client_proof) {
        conn.close(CODE_AUTH_FAILED, b"authentication failed: wrong or missing cluster secret");
        return Err(QuicError::Auth(format!("{peer} did not prove the cluster secret")));
    }
    send.write_all(&proof(mac, SERVER_LABEL, &exported)).await.map_err(|e| fail(&e))?;

    let mut head = [0u8; LINK_HEADER_LEN];
    recv.read_exact(&mut head).await.map_err(|e| fail(&e))?;
    let mut link_id = [0u8; 16];
    link_id.copy_from_slice(&head[..16]);
    let index = u16::from_le_bytes([head[16], head[17]]);
    let count = u16::from_le_bytes([head[18], head[19]]);
    let hello_len = u32::from_le_bytes([head[20], head[21], head[22], head[23]]) as usize;
    let refuse = |why: &str| {
        conn.close(CODE_PROTOCOL, why.as_bytes());
        Err(QuicError::Protocol(format!("{peer}: {why}")))
    };
    if count == 0 || count as usize > MAX_STRIPES || index >= count {
        return refuse("bad stripe index or count");
    }
    if hello_len > config.max_hello_bytes {
        return refuse("hello too large");
    }
    let mut hello = vec![0u8; hello_len];
    recv.read_exact(&mut hello).await.map_err(|e| fail(&e))?;
    send.write_all(&[ACK]).await.map_err(|e| fail(&e))?;
    Ok(Stripe { conn, send, recv, link_id, index, count, hello: Bytes::from(hello) })
}

/// Client side of one connection's setup.
struct StripeSetup {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    config: Arc<QuicConfig>,
    peer: SocketAddr,
    link_id: [u8; 16],
    index: u16,
    count: u16,
    hello: Bytes,
}

impl StripeSetup {
    async fn run(self) -> Result<(usize, Stripe), QuicError> {
        let peer = self.peer;
        let lost = |e: ConnectionError| setup_error(peer, e);
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), peer, SERVER_NAME)
            .map_err(|e| QuicError::Connect { addr: peer, reason: e.to_string() })?;
        let conn = connecting.await.map_err(lost)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(lost)?;
        let exported = exporter(&conn)?;
        let mac = self.config.mac()?;

        send.write_all(&proof(mac.clone(), CLIENT_LABEL, &exported)).await.map_err(|e| write_error(peer, e))?;
        let mut server_proof = [0u8; 4 + PROOF_LEN];
        recv.read_exact(&mut server_proof).await.map_err(|e| read_error(peer, e))?;
        if !verify_proof(mac, SERVER_LABEL, &exported, &server_proof) {
            conn.close(CODE_AUTH_FAILED, b"authentication failed: server did not prove the secret");
            return Err(QuicError::Auth(format!("{peer} could not prove it knows the cluster secret")));
        }

        let mut head = Vec::with_capacity(LINK_HEADER_LEN + self.hello.len());
        head.extend_from_slice(&self.link_id);
        head.extend_from_slice(&self.index.to_le_bytes());
        head.extend_from_slice(&self.count.to_le_bytes());
        head.extend_from_slice(&(self.hello.len() as u32).to_le_bytes());
        head.extend_from_slice(&self.hello);
        send.write_all(&head).await.map_err(|e| write_error(peer, e))?;
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await.map_err(|e| read_error(peer, e))?;
        if ack[0] != ACK {
            conn.close(CODE_PROTOCOL, b"bad acknowledgement");
            return Err(QuicError::Protocol(format!("{peer} sent a bad acknowledgement")));
        }
        Ok((
            self.index as usize,
            Stripe { conn, send, recv, link_id: self.link_id, index: self.index, count: self.count, hello: self.hello },
        ))
    }
}

/// Maps a connection failure during setup to a clear error, decoding our close codes.
fn setup_error(peer: SocketAddr, e: ConnectionError) -> QuicError {
    if let ConnectionError::ApplicationClosed(close) = &e {
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        match close.error_code {
            c if c == CODE_AUTH_FAILED => {
                return QuicError::Auth(format!("{peer} refused us: {reason}"));
            }
            c if c == CODE_BUSY => return QuicError::Busy,
            c if c == CODE_PROTOCOL => {
                return QuicError::Protocol(format!("{peer} refused the setup: {reason}"));
            }
            _ => {}
        }
    }
    QuicError::Connect { addr: peer, reason: e.to_string() }
}

fn read_error(peer: SocketAddr, e: ReadExactError) -> QuicError {
    match e {
        ReadExactError::ReadError(ReadError::ConnectionLost(c)) => setup_error(peer, c),
        other => QuicError::Connect { addr: peer, reason: other.to_string() },
    }
}

fn write_error(peer: SocketAddr, e: quinn::WriteError) -> QuicError {
    match e {
        quinn::WriteError::ConnectionLost(c) => setup_error(peer, c),
        other => QuicError::Connect { addr: peer, reason: other.to_string() },
    }
}

/// Accepts any server certificate, but still checks the TLS 1.3 handshake signature
/// with the certificate's key. Sound only together with the secret proof over the TLS
/// exporter, which authenticates both ends (see the module docs).
#[derive(Debug)]
struct SecretAuthenticated {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SecretAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// One end of a QUIC link; see the module docs.
///
/// Each stripe has a writer task, fed by `send` through a one-frame channel, and a
/// reader task, feeding `recv` through a one-frame channel, so that `send` and `recv`
/// are cancel-safe: a cancelled call has either handed over a whole frame or none.
pub struct QuicLink {
    conns: Vec<quinn::Connection>,
    senders: Vec<mpsc::Sender<Frame>>,
    /// Index of the next frame to send.
    send_next: tokio::sync::Mutex<usize>,
    recv_state: tokio::sync::Mutex<RecvState>,
    closed: watch::Sender<bool>,
    max_frame_bytes: usize,
    peer: SocketAddr,
}

struct RecvState {
    /// Index of the next frame to receive.
    next: usize,
    receivers: Vec<mpsc::Receiver<Result<Frame, LinkError>>>,
    /// Once set, every later `recv` returns it.
    failed: Option<LinkError>,
}

impl fmt::Debug for QuicLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuicLink")
            .field("peer", &self.peer)
            .field("stripes", &self.conns.len())
            .field("closed", &*self.closed.borrow())
            .finish()
    }
}

impl QuicLink {
    fn new(stripes: Vec<Stripe>, max_frame_bytes: usize, peer: SocketAddr) -> QuicLink {
        let closed = watch::channel(false).0;
        let conns: Vec<quinn::Connection> = stripes.iter().map(|s| s.conn.clone()).collect();
        let mut senders = Vec::with_capacity(stripes.len());
        let mut receivers = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            let (frame_tx, frame_rx) = mpsc::channel(1);
            let (got_tx, got_rx) = mpsc::channel(1);
            tokio::spawn(write_loop(stripe.conn.clone(), stripe.send, frame_rx));
            tokio::spawn(read_loop(conns.clone(), stripe.recv, got_tx, max_frame_bytes, closed.subscribe()));
            senders.push(frame_tx);
            receivers.push(got_rx);
        }
        QuicLink {
            conns,
            senders,
            send_next: tokio::sync::Mutex::new(0),
            recv_state: tokio::sync::Mutex::new(RecvState { next: 0, receivers, failed: None }),
            closed,
            max_frame_bytes,
            peer,
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Number of QUIC connections the link stripes its frames over.
    pub fn stripes(&self) -> usize {
        self.conns.len()
    }

    /// Why the link is closed, from the first connection that knows.
    fn closed_error(&self) -> LinkError {
        if *self.closed.borrow() {
            return LinkError::Closed("closed locally".into());
        }
        let reason = self
            .conns
            .iter()
            .find_map(|c| c.close_reason())
            .map(|e| describe(&e))
            .unwrap_or_else(|| "connection closed".into());
        LinkError::Closed(reason)
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl Link for QuicLink {
    async fn send(&self, frame: Frame) -> Result<(), LinkError> {
        let len = Header::LEN.saturating_add(frame.payload.len());
        if len > self.max_frame_bytes {
            return Err(LinkError::FrameTooLarge { len, limit: self.max_frame_bytes });
        }
        if *self.closed.borrow() {
            return Err(LinkError::Closed("closed locally".into()));
        }
        let mut next = self.send_next.lock().await;
        let tx = &self.senders[*next % self.senders.len()];
        // Cancel-safe: a cancelled `send` queues nothing and leaves `next` alone.
        tx.send(frame).await.map_err(|_| self.closed_error())?;
        *next += 1;
        Ok(())
    }

    async fn recv(&self) -> Result<Frame, LinkError> {
        let mut closed = self.closed.subscribe();
        if *closed.borrow_and_update() {
            return Err(LinkError::Closed("closed locally".into()));
        }
        let mut state = self.recv_state.lock().await;
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        let stripe = state.next % state.receivers.len();
        let got = tokio::select! {
            got = state.receivers[stripe].recv() => got,
            _ = closed.changed() => return Err(LinkError::Closed("closed locally".into())),
        };
        match got {
            Some(Ok(frame)) => {
                state.next += 1;
                Ok(frame)
            }
            Some(Err(e)) => {
                state.failed = Some(match &e {
                    LinkError::Closed(_) => e.clone(),
                    other => LinkError::Closed(format!("link closed after an error: {other}")),
                });
                Err(e)
            }
            None => {
                let e = self.closed_error();
                state.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn close(&self) {
        self.closed.send_replace(true);
        for conn in &self.conns {
            conn.close(CODE_CLOSED, b"link closed");
        }
    }
}

/// A connection failure in words, decoding our close codes.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            match close.error_code {
                c if c == CODE_CLOSED => "closed by the peer".into(),
                c if c == CODE_FRAME_TOO_LARGE => format!("the peer refused a frame: {reason}"),
                c => format!("closed by the peer (code {c}): {reason}"),
            }
        }
        ConnectionError::LocallyClosed => "closed locally".into(),
        ConnectionError::TimedOut => "the peer timed out (crashed or unreachable)".into(),
        ConnectionError::Reset => "connection reset by the peer (restarted?)".into(),
        other => format!("connection lost: {other}"),
    }
}

fn stream_closed(e: ReadError) -> LinkError {
    match e {
        ReadError::ConnectionLost(c) => LinkError::Closed(describe(&c)),
        other => LinkError::Closed(format!("stream failed: {other}")),
    }
}

/// Writes the frames of one stripe until the link or the connection goes away.
async fn write_loop(conn: quinn::Connection, mut send: quinn::SendStream, mut frames: mpsc::Receiver<Frame>) {
    let lost = conn.closed();
    tokio::pin!(lost);
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            // The connection is gone: drop `frames` so that `send` fails at once.
            _ = &mut lost => return,
        };
        let Some(frame) = frame else {
            // The link was dropped.
            let _ = send.finish();
            return;
        };
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..Header::LEN].copy_from_slice(&frame.header.encode());
        prefix[Header::LEN..].copy_from_slice(&(frame.payload.len() as u64).to_le_bytes());
        let mut chunks = [Bytes::copy_from_slice(&prefix), frame.payload];
        if send.write_all_chunks(&mut chunks).await.is_err() {
            return;
        }
    }
}

/// Reads the frames of one stripe and hands them to `recv`; on a bad frame it closes
/// the whole link.
async fn read_loop(
    conns: Vec<quinn::Connection>,
    mut recv: quinn::RecvStream,
    frames: mpsc::Sender<Result<Frame, LinkError>>,
    max_frame_bytes: usize,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let got = read_frame(&mut recv, max_frame_bytes).await;
        let failed = got.is_err();
        if let Err(e) = &got {
            let (code, why): (VarInt, &[u8]) = match e {
                LinkError::FrameTooLarge { .. } => (CODE_FRAME_TOO_LARGE, b"frame too large"),
                LinkError::Malformed(_) => (CODE_PROTOCOL, b"malformed frame"),
                LinkError::Closed(_) => (CODE_CLOSED, b"link closed"),
            };
            for conn in &conns {
                conn.close(code, why);
            }
        }
        tokio::select! {
            sent = frames.send(got) => if sent.is_err() { return },
            // Closed locally: `recv` fails by itself; stop waiting for it.
            _ = closed.wait_for(|c| *c) => return,
        }
        if failed {
            return;
        }
    }
}

/// Reads one frame, refusing an oversized one before allocating for it.
async fn read_frame(recv: &mut quinn::RecvStream, max_frame_bytes: usize) -> Result<Frame, LinkError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => {
            return Err(LinkError::Closed("the peer finished its stream".into()));
        }
        Err(ReadExactError::FinishedEarly(n)) => {
            return Err(LinkError::Malformed(format!("stream ended {n} bytes into a frame prefix")));
        }
        Err(ReadExactError::ReadError(e)) => return Err(stream_closed(e)),
    }
    let header =
        Header::decode(&prefix[..Header::LEN]).ok_or_else(|| LinkError::Malformed("bad frame header".into()))?;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&prefix[Header::LEN..]);
    let len = u64::from_le_bytes(len_bytes);
    let total = len.saturating_add(Header::LEN as u64);
    if total > max_frame_bytes as u64 {
        return Err(LinkError::FrameTooLarge {
            len: usize::try_from(total).unwrap_or(usize::MAX),
            limit: max_frame_bytes,
        });
    }
    // Within the limit, so it fits in usize.
    let len = len as usize;
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        match recv.read_chunk(len - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(LinkError::Malformed(format!(
                    "stream ended {} bytes into a {len}-byte payload",
                    payload.len()
                )));
            }
            Err(e) => return Err(stream_closed(e)),
        }
    }
    Ok(Frame { header, payload: payload.freeze() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::conformance;
    use std::net::{Ipv4Addr, SocketAddrV4};

    const LIMIT: Duration = Duration::from_secs(60);

    fn localhost() -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
    }

    fn secret_config() -> QuicConfig {
        QuicConfig::with_secret("test secret: 32 random bytes in real life")
    }

    /// A connected pair of links: (client end, server end, hello seen by the server).
    async fn pair(client: QuicConfig, server: QuicConfig) -> (QuicLink, QuicLink, Bytes) {
        let server = QuicEndpoint::bind(localhost(), server).unwrap();
        let client = QuicEndpoint::bind(localhost(), client).unwrap();
        let addr = server.local_addr().unwrap();
        let (a, accepted) =
            tokio::join!(client.connect(addr, Bytes::from_static(b"rank 1 of epoch 7")), server.accept());
        let (b, hello) = accepted.unwrap();
        (a.unwrap(), b, hello)
    }

    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(LIMIT, f).await.expect("test timed out")
    }

    fn frame(i: u64, len: usize) -> Frame {
        Frame { header: Header { epoch: 1, seq: 2, call: 3, index: i }, payload: Bytes::from(vec![i as u8; len]) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_ordered_both_ways() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            conformance::ordered_both_ways(&a, &b, 1 << 20).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_ordered_both_ways_striped() {
        bounded(async {
            let cfg = QuicConfig { connections_per_link: 3, ..secret_config() };
            let (a, b, hello) = pair(cfg.clone(), cfg).await;
            assert_eq!(a.stripes(), 3);
            assert_eq!(b.stripes(), 3);
            assert_eq!(hello, "rank 1 of epoch 7");
            conformance::ordered_both_ways(&a, &b, 1 << 20).await;
        })
        .await;
    }

    /// Windows small enough that a few 16 KiB frames fill them.
    fn small_windows() -> QuicConfig {
        QuicConfig {
            stream_receive_window: 64 << 10,
            receive_window: 128 << 10,
            send_window: 64 << 10,
            ..secret_config()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_bounded() {
        bounded(async {
            let (a, b, _) = pair(small_windows(), small_windows()).await;
            // 64 KiB of window is 4 frames; 2 more queued and in hand on each side.
            conformance::bounded(&a, &b, 12, 16 << 10).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_bounded_default_windows() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            // 8 MiB of stream window is 8 frames of 1 MiB, plus 4 queued or in hand.
            conformance::bounded(&a, &b, 14, 1 << 20).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_close_is_seen() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            conformance::close_is_seen(&a, &b).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_close_is_seen_from_server_side() {
        bounded(async {
            let (a, b, _) = pair(secret_config(), secret_config()).await;
            conformance::close_is_seen(&b, &a).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hello_arrives() {
        bounded(async {
            let (a, b, hello) = pair(secret_config(), secret_config()).await;
            assert_eq!(hello, "rank 1 of epoch 7");
            a.send(frame(5, 3)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(5, 3));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_hello_is_refused() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), QuicConfig { max_hello_bytes: 8, ..secret_config() }).unwrap();
            let client = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();
            let err = client.connect(addr, Bytes::from(vec![0u8; 100])).await.unwrap_err();
            assert!(matches!(err, QuicError::Protocol(_)), "{err}");
            let err = client.connect(addr, Bytes::from(vec![0u8; 100 << 10])).await.unwrap_err();
            assert!(matches!(err, QuicError::HelloTooLarge { .. }), "{err}");
        })
        .await;
    }

    /// Strangers are refused with a clear error and the server goes on serving.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strangers_are_refused_and_honest_peers_served() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();

            let wrong = QuicEndpoint::bind(localhost(), QuicConfig::with_secret("guess")).unwrap();
            let err = wrong.connect(addr, Bytes::from_static(b"evil")).await.unwrap_err();
            assert!(matches!(err, QuicError::Auth(_)), "{err}");
            assert!(err.to_string().contains("secret"), "{err}");

            let none = QuicEndpoint::bind(localhost(), QuicConfig::default()).unwrap();
            let err = none.connect(addr, Bytes::from_static(b"evil")).await.unwrap_err();
            assert!(matches!(err, QuicError::Auth(_)), "{err}");

            let honest = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let (a, accepted) = tokio::join!(honest.connect(addr, Bytes::from_static(b"honest")), server.accept());
            let (a, (b, hello)) = (a.unwrap(), accepted.unwrap());
            // The strangers never reached `accept`.
            assert_eq!(hello, "honest");
            b.send(frame(1, 10)).await.unwrap();
            assert_eq!(a.recv().await.unwrap(), frame(1, 10));
        })
        .await;
    }

    /// A client with a secret refuses a server that cannot prove it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_refuses_server_without_secret() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), QuicConfig::default()).unwrap();
            let client = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();
            let err = client.connect(addr, Bytes::new()).await.unwrap_err();
            assert!(matches!(err, QuicError::Auth(_)), "{err}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn os_default_socket_buffers_work() {
        bounded(async {
            let cfg = QuicConfig { socket_buffer_bytes: 0, ..secret_config() };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            conformance::ordered_both_ways(&a, &b, 1 << 20).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_secret_on_either_side_connects() {
        bounded(async {
            let (a, b, _) = pair(QuicConfig::default(), QuicConfig::default()).await;
            a.send(frame(0, 1)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(0, 1));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_frame_is_refused_on_send() {
        bounded(async {
            let cfg = QuicConfig { max_frame_bytes: Header::LEN + 100, ..secret_config() };
            let (a, b, _) = pair(cfg.clone(), cfg).await;
            let err = a.send(frame(0, 101)).await.unwrap_err();
            assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 101, limit: Header::LEN + 100 });
            // Nothing was sent; the link still works.
            a.send(frame(1, 100)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(1, 100));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_frame_is_refused_on_receive_and_closes() {
        bounded(async {
            let small = QuicConfig { max_frame_bytes: Header::LEN + 100, ..secret_config() };
            let (a, b, _) = pair(secret_config(), small).await;
            a.send(frame(0, 100)).await.unwrap();
            a.send(frame(1, 1000)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(0, 100));
            let err = b.recv().await.unwrap_err();
            assert_eq!(err, LinkError::FrameTooLarge { len: Header::LEN + 1000, limit: Header::LEN + 100 });
            assert!(matches!(b.recv().await, Err(LinkError::Closed(_))));
            let err = a.recv().await.unwrap_err();
            assert!(err.to_string().contains("refused a frame"), "{err}");
        })
        .await;
    }

    /// A hostile peer claims a 1 TiB frame: refused from the length prefix alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_length_prefix_is_refused_without_allocating() {
        bounded(async {
            let server = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let client = QuicEndpoint::bind(localhost(), secret_config()).unwrap();
            let addr = server.local_addr().unwrap();
            let raw = StripeSetup {
                endpoint: client.endpoint.clone(),
                client_config: client.client_config.clone(),
                config: client.config.clone(),
                peer: addr,
                link_id: [7; 16],
                index: 0,
                count: 1,
                hello: Bytes::new(),
            };
            let (raw, accepted) = tokio::join!(raw.run(), server.accept());
            let (_, mut stripe) = raw.unwrap();
            let (b, _) = accepted.unwrap();
            let mut prefix = [0u8; PREFIX_LEN];
            prefix[Header::LEN..].copy_from_slice(&(1u64 << 40).to_le_bytes());
            stripe.send.write_all(&prefix).await.unwrap();
            let err = b.recv().await.unwrap_err();
            assert!(matches!(err, LinkError::FrameTooLarge { len, .. } if len == (1 << 40) + Header::LEN), "{err}");
            // The receiver closed the connection.
            let lost = stripe.conn.closed().await;
            assert!(describe(&lost).contains("refused a frame"), "{lost}");
        })
        .await;
    }

    /// A peer that vanishes without closing is seen as closed after the idle timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashed_peer_is_seen_as_closed() {
        bounded(async {
            let cfg = QuicConfig {
                idle_timeout: Duration::from_millis(800),
                keep_alive: Some(Duration::from_millis(200)),
                ..secret_config()
            };
            let server = QuicEndpoint::bind(localhost(), cfg.clone()).unwrap();
            let addr = server.local_addr().unwrap();
            // The "crashing" process: its own runtime, shut down without closing.
            let client_cfg = cfg.clone();
            let crashed = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let (endpoint, link) = rt.block_on(async {
                    let endpoint = QuicEndpoint::bind(localhost(), client_cfg).unwrap();
                    let link = endpoint.connect(addr, Bytes::new()).await.unwrap();
                    link.send(frame(0, 5)).await.unwrap();
                    // Crash only once the peer has it all.
                    assert_eq!(link.recv().await.unwrap(), frame(1, 1));
                    (endpoint, link)
                });
                drop(rt);
                // The runtime is gone: nothing can send a close any more.
                std::mem::forget(link);
                std::mem::forget(endpoint);
            });
            let (b, _) = server.accept().await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(0, 5));
            b.send(frame(1, 1)).await.unwrap();
            tokio::task::spawn_blocking(move || crashed.join().unwrap()).await.unwrap();
            let started = std::time::Instant::now();
            let err = b.recv().await.unwrap_err();
            assert!(matches!(err, LinkError::Closed(_)), "{err}");
            assert!(started.elapsed() < Duration::from_secs(5));
            // Sends fail too, within a few frames.
            let mut failed = false;
            for i in 0..100 {
                if b.send(frame(i, 8)).await.is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(failed);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recv_and_send_are_cancel_safe() {
        bounded(async {
            let (a, b, _) = pair(small_windows(), small_windows()).await;
            // Cancelled receives lose nothing.
            for _ in 0..3 {
                assert!(tokio::time::timeout(Duration::from_millis(20), b.recv()).await.is_err());
            }
            // Fill the link until a send blocks, cancel it, then drain: no torn frame.
            let mut sent = 0u64;
            while tokio::time::timeout(Duration::from_millis(200), a.send(frame(sent, 16 << 10))).await.is_ok() {
                sent += 1;
            }
            for i in 0..sent {
                assert_eq!(b.recv().await.unwrap(), frame(i, 16 << 10));
            }
            a.send(frame(sent, 3)).await.unwrap();
            assert_eq!(b.recv().await.unwrap(), frame(sent, 3));
        })
        .await;
    }

    #[test]
    fn bad_configs_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();
        for cfg in [
            QuicConfig::with_secret(""),
            QuicConfig { connections_per_link: 0, ..QuicConfig::default() },
            QuicConfig { max_frame_bytes: 3, ..QuicConfig::default() },
        ] {
            assert!(matches!(QuicEndpoint::bind(localhost(), cfg), Err(QuicError::Setup(_))));
        }
    }

    #[test]
    fn bind_outside_a_runtime_is_an_error() {
        assert!(matches!(QuicEndpoint::bind(localhost(), QuicConfig::default()), Err(QuicError::Setup(_))));
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let shown = format!("{:?}", QuicConfig::with_secret("hunter2"));
        assert!(!shown.contains("hunter2") && !shown.contains("104"), "{shown}");
    }
}
