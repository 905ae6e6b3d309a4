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
//! A link is one or more QUIC connections ([`QuicConfig::connections_per_link`]; the
//! connecting side chooses, by default from the round trip its first connection's
//! handshake measured, see [`QuicConfig::connections_for`]), each with one
//! bidirectional stream opened by the client. On each stream, after the exchange above
//! (client: `PHX1` + proof; server: `PHX1` + proof; client: link id (16 bytes), stripe
//! index and count (u16 each), hello length (u32) and hello; server: one byte `1`),
//! each direction carries frames: [`Header::encode`] (32 bytes), the payload length
//! (u64, little-endian) and the payload. Frame `i` of a link travels on stripe
//! `i % count` and the receiver reads the stripes round-robin, so order is kept;
//! several connections let quinn encrypt and send on several cores.
//!
//! # Flow control and buffering
//!
//! The link's buffer is QUIC flow control: a sender blocks once the receiver's
//! connection window is full of unread data, plus one frame queued and one being
//! written on the sending side and one queued and one being read on the receiving side,
//! per stripe. Each end sizes its windows once the link is set up, from the round trip
//! it measured ([`LinkSizing`], [`QuicConfig::window_rate_bps`]): [`WINDOW_RTTS`] round
//! trips at 1 Gbit/s by default, at least 2 MiB (loopback) and at most 32 MiB per
//! connection (a long fat pipe), so a link on one host holds little memory and one over
//! a WAN stays full while lost packets are resent. Congestion control is BBR by default
//! ([`Congestion`]): random loss of a fraction of a percent caps CUBIC near 1 MB/s at
//! 50 ms, not BBR. Below QUIC, the endpoint asks for 4 MiB UDP socket buffers
//! ([`QuicConfig::socket_buffer_bytes`]), so that datagrams are not dropped while the
//! receiving process waits for a CPU.
//!
//! # Closing
//!
//! [`Link::close`] (or dropping a [`QuicLink`]) closes its connections at once with
//! [`CODE_CLOSED`]: frames still in flight are discarded, and the peer's pending and
//! later calls fail with [`LinkError::Closed`]. A peer that crashes or vanishes is seen
//! the same way once [`QuicConfig::idle_timeout`] passes without a packet from it
//! (keep-alives, [`QuicConfig::keep_alive`], keep an idle but live link open).
//!
//! [`Header::encode`]: super::Header::encode

mod auth;
mod config;
mod link;
mod sizing;
mod stripes;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::VarInt;
use rustls::crypto::CryptoProvider;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub use self::config::Congestion;
pub use self::config::{QuicConfig, QuicError};
pub use self::link::QuicLink;
pub use self::sizing::{
    LinkSizing, AUTO_MAX_CONNECTIONS, AUTO_RATE_PER_CONNECTION, AUTO_RTT_PER_CONNECTION, AUTO_WAN_RTT, WINDOW_RTTS,
};
use self::stripes::{accept_loop, link, Stripe, StripeSetup};
use super::auth::tls_configs;
use super::endpoint::Endpoint;
use super::{Link, LinkError};

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

        let (server_tls, client_tls) =
            tls_configs(provider.clone(), SERVER_NAME, ALPN).map_err(|(what, e)| setup(what, &e))?;
        let server_quic = QuicServerConfig::try_from(server_tls).map_err(|e| setup("QUIC server config", &e))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_quic));
        server_config.transport_config(config.transport(1)?);

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
        let setup = |index: usize, count: usize| StripeSetup {
            endpoint: self.endpoint.clone(),
            client_config: self.client_config.clone(),
            config: cfg.clone(),
            peer,
            link_id,
            index: index as u16,
            count: count as u16,
            hello: if index == 0 { hello.clone() } else { Bytes::new() },
        };
        let collect = async {
            let mut set = JoinSet::new();
            let count = match cfg.connections_per_link {
                Some(count) => {
                    for index in 0..count {
                        set.spawn(setup(index, count).run());
                    }
                    count
                }
                None => {
                    // The first connection's handshake measures the round trip, which
                    // chooses the count its link header announces; the others follow.
                    let mut first = setup(0, 1);
                    let authenticated = first.authenticate().await?;
                    let count = cfg.connections_for(authenticated.conn.rtt());
                    first.count = count as u16;
                    set.spawn(first.finish(authenticated));
                    for index in 1..count {
                        set.spawn(setup(index, count).run());
                    }
                    count
                }
            };
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
        Ok(link(stripes, cfg, peer))
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

#[async_trait]
impl Endpoint for QuicEndpoint {
    fn local_addr(&self) -> SocketAddr {
        // A bound UDP socket always has an address; the fallback is never used.
        QuicEndpoint::local_addr(self).unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    async fn connect(&self, addr: SocketAddr, hello: Bytes) -> Result<Arc<dyn Link>, LinkError> {
        match QuicEndpoint::connect(self, addr, hello).await {
            Ok(link) => Ok(Arc::new(link)),
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }

    async fn accept(&self) -> Result<(Arc<dyn Link>, Bytes), LinkError> {
        match QuicEndpoint::accept(self).await {
            Ok((link, hello)) => Ok((Arc::new(link), hello)),
            Err(e) => Err(LinkError::Closed(e.to_string())),
        }
    }
}
