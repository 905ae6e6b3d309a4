//! [`QuicConfig`], its validation and the quinn transport settings made from it, and
//! [`QuicError`], the ways binding an endpoint or setting up a link fails.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
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
    /// Unread bytes a peer may send on one stream (per stripe). Fixed when a connection
    /// is made; with [`window_rate_bps`](Self::window_rate_bps) the connection's window,
    /// sized later, is the one that binds. Default 32 MiB.
    pub stream_receive_window: u64,
    /// Unread bytes a peer may send over one connection: the link's buffer, per stripe.
    /// With [`window_rate_bps`](Self::window_rate_bps) the ceiling of the sized window.
    /// Default 32 MiB: a window holds what arrives behind a lost packet until it is
    /// resent, and over the test relay (400 Mbit/s, 50 ms, 0.1 % loss) 32 MiB ran 8 %
    /// faster than 16 (docs/PERF.md). Windows are credit, not allocations: memory is
    /// used only while data waits.
    pub receive_window: u64,
    /// Unacknowledged bytes this end keeps in flight per connection. With
    /// [`window_rate_bps`](Self::window_rate_bps) the ceiling of the sized window.
    /// Default 32 MiB.
    pub send_window: u64,
    /// The rate, in bits per second, a link's windows are sized for with the round trip
    /// measured at its setup (see [`LinkSizing`](super::LinkSizing)): each connection's
    /// receive and send windows become [`WINDOW_RTTS`](super::WINDOW_RTTS) round trips
    /// at this rate, shared by the link's connections, between
    /// [`min_window`](Self::min_window) and the windows above. Small on loopback, where
    /// large windows only hold memory, large on a long fat pipe. `None`: every
    /// connection gets the windows above as they are. Default 1 Gbit/s.
    pub window_rate_bps: Option<u64>,
    /// The smallest window a sized connection gets, and the one it starts with.
    /// Default 2 MiB.
    pub min_window: u64,
    /// Receive and send buffer sizes requested for the endpoint's UDP socket
    /// (`SO_RCVBUF`, `SO_SNDBUF`); the OS may cap them (Linux: `net.core.rmem_max` and
    /// `wmem_max`). 0 keeps the OS defaults. Default 4 MiB: with Linux's default of
    /// about 208 KiB, a receiver descheduled for a millisecond drops datagrams at a few
    /// hundred MB/s, which costs retransmissions and congestion-window cuts.
    pub socket_buffer_bytes: usize,
    /// QUIC connections per link, frames striped over them (1 to [`MAX_STRIPES`]).
    /// More than one spreads encryption over several cores and, with a loss-based
    /// controller, multiplies what random loss leaves of the rate. `None` (the default)
    /// chooses from the round trip measured while the first connection is set up and
    /// from the controller ([`QuicConfig::connections_for`]): one on loopback and a LAN;
    /// on a WAN one per 2 Gbit/s of [`window_rate_bps`](Self::window_rate_bps) with BBR,
    /// up to four with CUBIC or NewReno. The connecting side chooses; the accepting side
    /// takes the link as it comes.
    pub connections_per_link: Option<usize>,
    /// The congestion controller of every connection. Default [`Congestion::Bbr`].
    pub congestion: Congestion,
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
            stream_receive_window: 32 << 20,
            receive_window: 32 << 20,
            send_window: 32 << 20,
            window_rate_bps: Some(1_000_000_000),
            min_window: 2 << 20,
            socket_buffer_bytes: 4 << 20,
            connections_per_link: None,
            congestion: Congestion::default(),
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
        if self.connections_per_link.is_some_and(|n| !(1..=MAX_STRIPES).contains(&n)) {
            return bad("connections_per_link must be between 1 and MAX_STRIPES");
        }
        if self.max_hello_bytes > u32::MAX as usize {
            return bad("max_hello_bytes does not fit in 32 bits");
        }
        if self.stream_receive_window == 0 || self.receive_window == 0 || self.send_window == 0 {
            return bad("windows must be positive");
        }
        if self.window_rate_bps == Some(0) || self.min_window == 0 {
            return bad("window_rate_bps and min_window must be positive");
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
        varint(self.receive_window, "receive_window")?;
        let (receive_window, send_window) = self.initial_windows();
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(varint(self.stream_receive_window, "stream_receive_window")?)
            .receive_window(varint(receive_window, "receive_window")?)
            .send_window(send_window)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive)
            .max_concurrent_bidi_streams(VarInt::from_u32(peer_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .datagram_receive_buffer_size(None);
        // Ask the peer to acknowledge every 16 ack-eliciting packets (or after its ack
        // delay) rather than every other one (the QUIC ACK frequency extension; both ends
        // are quinn). The control plane sends a message or two per collective: with the
        // default, about one packet in three was an ACK of its own, each a system call
        // and a wake-up on both ends. Measured with 4 KiB all-reduces: -27 % UDP sends,
        // -10 to -19 % time; 64 MiB over QUIC data links: +9 % (docs/PERF.md).
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(16));
        t.ack_frequency_config(Some(ack));
        match self.congestion {
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::NewReno => t.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
        };
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
            .field("window_rate_bps", &self.window_rate_bps)
            .field("min_window", &self.min_window)
            .field("socket_buffer_bytes", &self.socket_buffer_bytes)
            .field("connections_per_link", &self.connections_per_link)
            .field("congestion", &self.congestion)
            .field("idle_timeout", &self.idle_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// The congestion controller of a QUIC connection (quinn's three).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's own default. Loss-based: it cuts its window by 30 % on
    /// each loss, so random loss caps its rate near `MSS / RTT · 1.2 / √p` (the
    /// Mathis formula): 1 MB/s at 50 ms and 0.1 % loss, whatever the link's rate.
    Cubic,
    /// NewReno (RFC 9002's reference controller). Loss-based like CUBIC.
    NewReno,
    /// BBR (version 1, quinn's implementation, which quinn calls experimental). Model
    /// based: it paces at the delivery rate it measures and keeps about one
    /// bandwidth-delay product in flight, so random loss of a fraction of a percent
    /// barely slows it. The default.
    #[default]
    Bbr,
}

impl FromStr for Congestion {
    type Err = String;

    /// `cubic`, `newreno` or `bbr`, in any case.
    fn from_str(s: &str) -> Result<Congestion, String> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!("unknown congestion controller {s:?} (cubic, newreno or bbr)")),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
        })
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
            QuicConfig { connections_per_link: Some(0), ..QuicConfig::default() },
            QuicConfig { connections_per_link: Some(MAX_STRIPES + 1), ..QuicConfig::default() },
            QuicConfig { window_rate_bps: Some(0), ..QuicConfig::default() },
            QuicConfig { min_window: 0, ..QuicConfig::default() },
            QuicConfig { max_frame_bytes: 3, ..QuicConfig::default() },
        ] {
            assert!(matches!(QuicEndpoint::bind(localhost(), cfg), Err(QuicError::Setup(_))));
        }
    }

    #[test]
    fn congestion_controllers_parse_and_print() {
        for c in [Congestion::Cubic, Congestion::NewReno, Congestion::Bbr] {
            assert_eq!(c.to_string().parse::<Congestion>(), Ok(c));
        }
        assert_eq!("BBR".parse::<Congestion>(), Ok(Congestion::Bbr));
        assert!("vegas".parse::<Congestion>().is_err());
        assert_eq!(QuicConfig::default().congestion, Congestion::Bbr);
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let shown = format!("{:?}", QuicConfig::with_secret("hunter2"));
        assert!(!shown.contains("hunter2") && !shown.contains("104"), "{shown}");
    }
}
