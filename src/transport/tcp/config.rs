//! [`TcpConfig`], [`TcpSecurity`] and [`TcpError`]: the settings of a
//! [`TcpEndpoint`](super::TcpEndpoint) and the ways binding it or setting up a link fails.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::transport::quic::QuicConfig;
use crate::transport::Header;

/// How a TCP link protects its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpSecurity {
    /// TLS 1.3 (rustls, ring) and the cluster-secret proofs over its exporter: the same
    /// guarantees as a QUIC link. The default.
    Tls,
    /// **No encryption, no integrity protection**, for trusted networks only: the
    /// cluster secret still keeps strangers from opening links (both ends prove it over
    /// fresh nonces), but anyone on the path can read, change or inject data.
    Plaintext,
}

impl TcpSecurity {
    /// The byte that names the mode in the connection preamble.
    pub(super) fn wire(self) -> u8 {
        match self {
            TcpSecurity::Tls => b'T',
            TcpSecurity::Plaintext => b'P',
        }
    }

    pub(super) fn from_wire(b: u8) -> Option<TcpSecurity> {
        match b {
            b'T' => Some(TcpSecurity::Tls),
            b'P' => Some(TcpSecurity::Plaintext),
            _ => None,
        }
    }
}

impl fmt::Display for TcpSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcpSecurity::Tls => "TCP+TLS",
            TcpSecurity::Plaintext => "plaintext TCP",
        })
    }
}

/// Settings of a [`TcpEndpoint`](super::TcpEndpoint) and of the links it makes.
#[derive(Clone)]
pub struct TcpConfig {
    /// The cluster secret peers must prove they know; `None` accepts everyone (tests
    /// and trusted networks only). Must not be empty.
    pub secret: Option<Arc<[u8]>>,
    /// TLS (default) or plaintext.
    pub security: TcpSecurity,
    /// Largest frame, header ([`Header::LEN`]) plus payload, this end sends or
    /// accepts. Default: 64 MiB plus the header.
    pub max_frame_bytes: usize,
    /// Largest hello this end sends or accepts. Default: 64 KiB.
    pub max_hello_bytes: usize,
    /// `SO_SNDBUF` and `SO_RCVBUF` of every connection (Linux doubles the value and
    /// caps it at `net.core.wmem_max`/`rmem_max`); with the two one-frame queues of each
    /// end they bound the link's buffer. 0 keeps the kernel's autotuning. Default 4 MiB.
    pub socket_buffer_bytes: usize,
    /// Bound on setting up a link: TCP connect, TLS handshake, secret proofs and hello.
    /// Default 10 s.
    pub handshake_timeout: Duration,
    /// TCP keep-alive: a connection idle this long is probed, and closed after 5
    /// unanswered probes this far apart, so a vanished host is noticed (a crashed
    /// process is noticed at once: its kernel closes the connection). Default 2 s.
    pub keep_alive: Option<Duration>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            secret: None,
            security: TcpSecurity::Tls,
            max_frame_bytes: (64 << 20) + Header::LEN,
            max_hello_bytes: 64 << 10,
            socket_buffer_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(10),
            keep_alive: Some(Duration::from_secs(2)),
        }
    }
}

impl TcpConfig {
    /// The default settings with `secret` as the cluster secret.
    pub fn with_secret(secret: impl AsRef<[u8]>) -> TcpConfig {
        TcpConfig { secret: Some(Arc::from(secret.as_ref())), ..TcpConfig::default() }
    }

    /// The settings a QUIC configuration implies: its secret, frame and hello limits,
    /// handshake timeout and keep-alive interval, with `security`.
    pub fn from_quic(quic: &QuicConfig, security: TcpSecurity) -> TcpConfig {
        TcpConfig {
            secret: quic.secret.clone(),
            security,
            max_frame_bytes: quic.max_frame_bytes,
            max_hello_bytes: quic.max_hello_bytes,
            handshake_timeout: quic.handshake_timeout,
            keep_alive: quic.keep_alive,
            ..TcpConfig::default()
        }
    }

    pub(super) fn validate(&self) -> Result<(), TcpError> {
        let bad = |what: &str| Err(TcpError::Setup(format!("invalid TcpConfig: {what}")));
        if self.secret.as_ref().is_some_and(|s| s.is_empty()) {
            return bad("the secret is empty (use None for no secret)");
        }
        if self.max_frame_bytes < Header::LEN {
            return bad("max_frame_bytes is smaller than a frame header");
        }
        if self.max_hello_bytes > u32::MAX as usize {
            return bad("max_hello_bytes does not fit in 32 bits");
        }
        if self.handshake_timeout.is_zero() || self.keep_alive.is_some_and(|k| k.is_zero()) {
            return bad("timeouts must be positive");
        }
        Ok(())
    }
}

impl fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("security", &self.security)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_hello_bytes", &self.max_hello_bytes)
            .field("socket_buffer_bytes", &self.socket_buffer_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// Why binding a TCP endpoint or setting up a TCP link failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    /// Bad configuration, no tokio runtime, socket, certificate or TLS setup failure.
    #[error("TCP setup failed: {0}")]
    Setup(String),
    /// Nothing accepts TCP connections at the address (connection refused): the peer
    /// runs its data links over QUIC, or sits behind a UDP-only relay or forward.
    #[error("no TCP listener at {0}")]
    Refused(SocketAddr),
    /// The connection could not be made or broke during link setup.
    #[error("TCP connection to {addr} failed: {reason}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The peer is a phalanx TCP endpoint in the other security mode.
    #[error("{addr} runs {theirs} data links and this peer {ours}: choose one data transport for every member")]
    ModeMismatch {
        /// The peer's address.
        addr: SocketAddr,
        /// This end's mode.
        ours: TcpSecurity,
        /// The peer's mode.
        theirs: TcpSecurity,
    },
    /// One side could not prove knowledge of the cluster secret.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer broke the link setup protocol (or is not a phalanx endpoint).
    #[error("link setup protocol error: {0}")]
    Protocol(String),
    /// The hello exceeds [`TcpConfig::max_hello_bytes`].
    #[error("hello of {len} bytes exceeds the limit of {limit} bytes")]
    HelloTooLarge {
        /// The hello's size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Link setup took longer than [`TcpConfig::handshake_timeout`].
    #[error("link setup with {0} timed out")]
    Timeout(SocketAddr),
    /// The endpoint was closed; it accepts nothing more.
    #[error("endpoint closed")]
    EndpointClosed,
}

impl TcpError {
    /// Whether the peer offers no compatible TCP data path at all (no listener, the
    /// other security mode, not a phalanx TCP endpoint), so that another transport may
    /// be tried; never for a failed authentication.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, TcpError::Refused(_) | TcpError::ModeMismatch { .. } | TcpError::Protocol(_))
    }
}
