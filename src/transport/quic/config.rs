//! [`QuicConfig`], its validation and the quinn transport settings made from it, and
//! [`QuicError`], the ways binding an endpoint or setting up a link fails.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, VarInt};

use super::MAX_STRIPES;
use crate::transport::Header;

/// Settings of a [`QuicEndpoint`](super::QuicEndpoint) and of the links it makes.
#[derive(Clone)]
pub struct QuicConfig {
    /// The cluster secret peers must prove they know (see the [module docs](super)); `None`
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

    pub(super) fn validate(&self) -> Result<(), QuicError> {
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

    pub(super) fn transport(&self, peer_streams: u32) -> Result<Arc<quinn::TransportConfig>, QuicError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::quic::tests::localhost;
    use crate::transport::quic::QuicEndpoint;

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
    fn debug_does_not_show_the_secret() {
        let shown = format!("{:?}", QuicConfig::with_secret("hunter2"));
        assert!(!shown.contains("hunter2") && !shown.contains("104"), "{shown}");
    }
}
