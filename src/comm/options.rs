//! How a peer joins a group: [`ConnectOptions`] and [`RetryPolicy`]; what a shared-state
//! sync reports: [`SyncReport`].

use std::net::SocketAddr;
use std::time::Duration;

use crate::collective::Tuning;
use crate::membership::client::ControlConfig;
use crate::membership::PeerId;
use crate::transport::quic::QuicConfig;
use crate::transport::shm::{SharedMemory, ShmConfig};

/// Which transport carries a peer's data links (the links between peers that
/// collectives run over). The control connection to the master is QUIC whatever this
/// says.
///
/// Members may disagree: a member on TCP opens its links over TCP and falls back to QUIC
/// for a peer that offers no TCP path in its own mode (a QUIC member, a plaintext
/// member, a UDP-only relay in between), and every member accepts links over QUIC, so
/// links between members that chose differently run over QUIC (encrypted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DataTransport {
    /// [`Communicator::connect`](crate::Communicator::connect) picks TCP+TLS
    /// ([`DataTransport::Tcp`]), or QUIC when [`ConnectOptions::advertise`] is set
    /// (peers reached through a NAT, a port forward or a relay, which may pass UDP
    /// only). Over an endpoint given by the caller
    /// ([`Communicator::connect_with`](crate::Communicator::connect_with),
    /// [`AsyncPeer::connect`](crate::comm::AsyncPeer::connect)), that endpoint.
    #[default]
    Auto,
    /// QUIC, over the same endpoint (UDP socket) as the control connection.
    Quic,
    /// TCP with TLS 1.3 and the cluster secret (see `transport::tcp`), listening on the
    /// TCP port with the number of the peer's QUIC port, so the advertised data address
    /// stays the same. Far less CPU per byte than QUIC on fast networks.
    Tcp,
    /// **Plaintext** TCP, for trusted networks only: no encryption and no integrity
    /// protection (the cluster secret still keeps strangers from opening links). The
    /// fastest data path; choose it explicitly.
    TcpPlaintext,
}

impl DataTransport {
    /// What [`DataTransport::Auto`] means for [`Communicator::connect`](crate::Communicator::connect)
    /// with these options; other values stay as they are.
    ///
    /// ```
    /// use phalanx::comm::DataTransport;
    /// assert_eq!(DataTransport::Auto.resolve(false), DataTransport::Tcp);
    /// assert_eq!(DataTransport::Auto.resolve(true), DataTransport::Quic);
    /// assert_eq!(DataTransport::TcpPlaintext.resolve(true), DataTransport::TcpPlaintext);
    /// for t in ["auto", "quic", "tcp", "tcp-plain"] {
    ///     assert_eq!(t.parse::<DataTransport>().unwrap().to_string(), t);
    /// }
    /// assert!("udp".parse::<DataTransport>().is_err());
    /// ```
    pub fn resolve(self, advertised: bool) -> DataTransport {
        match self {
            DataTransport::Auto if advertised => DataTransport::Quic,
            DataTransport::Auto => DataTransport::Tcp,
            other => other,
        }
    }
}

impl std::fmt::Display for DataTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataTransport::Auto => "auto",
            DataTransport::Quic => "quic",
            DataTransport::Tcp => "tcp",
            DataTransport::TcpPlaintext => "tcp-plain",
        })
    }
}

impl std::str::FromStr for DataTransport {
    type Err = String;

    /// `auto`, `quic`, `tcp` (TCP+TLS) or `tcp-plain` (plaintext TCP).
    fn from_str(s: &str) -> Result<DataTransport, String> {
        match s {
            "auto" => Ok(DataTransport::Auto),
            "quic" => Ok(DataTransport::Quic),
            "tcp" | "tcp-tls" => Ok(DataTransport::Tcp),
            "tcp-plain" | "tcp-plaintext" => Ok(DataTransport::TcpPlaintext),
            other => Err(format!("unknown data transport {other:?} (auto, quic, tcp or tcp-plain)")),
        }
    }
}

/// What a collective does when a peer is lost while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Return the error ([`crate::Error::is_retryable`] says whether a retry could help);
    /// the caller decides.
    Never,
    /// Run again over the survivors once the master has published the view without
    /// the lost peer, up to `max_attempts` times in all.
    OnPeerLost {
        /// Attempts in all, the first included.
        max_attempts: u32,
    },
}

impl RetryPolicy {
    /// Attempts in all (at least one).
    pub fn attempts(self) -> u32 {
        match self {
            RetryPolicy::Never => 1,
            RetryPolicy::OnPeerLost { max_attempts } => max_attempts.max(1),
        }
    }
}

/// How to join a group. Build it with [`ConnectOptions::new`] and the setters, or as a
/// struct literal with `..ConnectOptions::default()`.
///
/// ```
/// use std::time::Duration;
/// use phalanx::comm::{ConnectOptions, RetryPolicy};
/// let options = ConnectOptions::new()
///     .secret("correct horse battery staple")
///     .retry(RetryPolicy::OnPeerLost { max_attempts: 3 })
///     .heartbeat(Duration::from_millis(100));
/// assert_eq!(options.retry, RetryPolicy::OnPeerLost { max_attempts: 3 });
/// assert_eq!(options.quic.secret.as_deref(), Some(&b"correct horse battery staple"[..]));
/// ```
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Where this peer accepts data links (default `127.0.0.1:0`: loopback, any port).
    pub bind: SocketAddr,
    /// The data address other peers dial to reach this one; `None` (the default) for
    /// the bound address. Set it when peers reach this one through a NAT, a port
    /// forward or a relay.
    pub advertise: Option<SocketAddr>,
    /// This peer's id; random when `None`.
    pub peer_id: Option<PeerId>,
    /// Heartbeats and join timeout.
    pub control: ControlConfig,
    /// Algorithm choices; must be equal on every peer.
    pub tuning: Tuning,
    /// Behaviour when a peer is lost mid-collective.
    pub retry: RetryPolicy,
    /// QUIC settings, the cluster secret among them (TCP data links take the secret,
    /// limits and timeouts from here too).
    pub quic: QuicConfig,
    /// Which transport carries the data links (default [`DataTransport::Auto`]).
    pub data_transport: DataTransport,
    /// How many frames of one collective or point-to-point tag this peer holds per
    /// link before it stops reading the link and so pushes back on the sender (see
    /// `transport::demux`, "Backpressure"); default
    /// [`DEFAULT_QUEUE_FRAMES`](crate::comm::DEFAULT_QUEUE_FRAMES).
    pub queue_frames: usize,
    /// Hold a TCP connection to the master's address that the operating system closes
    /// when this process dies, so the master removes it at once instead of after its
    /// heartbeat timeout (see `membership::liveness`). On by default for
    /// [`Communicator::connect`](crate::Communicator::connect); a master or network
    /// that offers no TCP (a UDP-only relay) just leaves heartbeats to do the job.
    pub liveness: bool,
    /// Standby masters, tried in order after the primary (the address given to
    /// `connect`) when it cannot be reached at join, or when it is lost later: a
    /// standby (`phalanx master --listen ADDR`, started beside the primary) takes the
    /// group over from the peers' own state (see `membership::master`, "takeover").
    /// Empty by default: a lost master is looked for again at its own address (a
    /// restart) for [`ControlConfig::rejoin_within`](crate::comm::ControlConfig::rejoin_within).
    pub standby_masters: Vec<SocketAddr>,
    /// A fixed group, as `torch.distributed` and MPI have: the first loss of a member
    /// ends the group for this peer, and every later call fails with that
    /// [`Error::PeerLost`](crate::Error::PeerLost) (the view and ranks never move under
    /// the caller, and nothing runs over fewer ranks than the caller sized it for).
    /// Off by default: a dynamic group settles losses and joins with `update_topology`.
    pub closed: bool,
    /// Whether data links to peers on this host run over shared memory
    /// ([`SharedMemory::Auto`], the default) or always over the network
    /// ([`SharedMemory::Off`]); see [`crate::transport::shm`]. Either end saying `Off`
    /// keeps a link on the network. Links of an in-memory network never use it.
    pub shared_memory: SharedMemory,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            peer_id: None,
            control: ControlConfig::default(),
            tuning: Tuning::default(),
            retry: RetryPolicy::Never,
            quic: QuicConfig::default(),
            data_transport: DataTransport::Auto,
            queue_frames: crate::transport::demux::DEFAULT_QUEUE_FRAMES,
            liveness: true,
            standby_masters: Vec::new(),
            closed: false,
            shared_memory: SharedMemory::Auto,
        }
    }
}

impl ConnectOptions {
    /// The defaults: loopback, a random id, no retries, QUIC with no secret.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// The cluster secret every peer and the master share (see [`QuicConfig::secret`]).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> ConnectOptions {
        self.quic.secret = Some(std::sync::Arc::from(secret.as_ref()));
        self
    }

    /// Where this peer accepts data links (`0.0.0.0:PORT` to be reachable from others).
    pub fn bind(mut self, addr: SocketAddr) -> ConnectOptions {
        self.bind = addr;
        self
    }

    /// The address other peers dial to reach this one, when it is not the bound one
    /// (behind a NAT, a port forward or a test relay).
    pub fn advertise(mut self, addr: SocketAddr) -> ConnectOptions {
        self.advertise = Some(addr);
        self
    }

    /// This peer's id (must be unique in the cluster; random by default).
    pub fn peer_id(mut self, id: PeerId) -> ConnectOptions {
        self.peer_id = Some(id);
        self
    }

    /// What a collective does when a peer is lost.
    pub fn retry(mut self, retry: RetryPolicy) -> ConnectOptions {
        self.retry = retry;
        self
    }

    /// Algorithm choices and chunk size (equal on every peer).
    pub fn tuning(mut self, tuning: Tuning) -> ConnectOptions {
        self.tuning = tuning;
        self
    }

    /// How often to send heartbeats to the master.
    pub fn heartbeat(mut self, interval: Duration) -> ConnectOptions {
        self.control.heartbeat_interval = interval;
        self
    }

    /// How long to wait for admission (default: forever).
    pub fn join_timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.control.join_timeout = Some(timeout);
        self
    }

    /// How long a silent master is tolerated before this peer counts itself removed.
    pub fn master_timeout(mut self, timeout: Duration) -> ConnectOptions {
        self.control.master_timeout = timeout;
        self
    }

    /// Adds a standby master, tried after the primary and the standbys added before
    /// (see [`ConnectOptions::standby_masters`](ConnectOptions#structfield.standby_masters)).
    pub fn standby_master(mut self, addr: SocketAddr) -> ConnectOptions {
        self.standby_masters.push(addr);
        self
    }

    /// How long to look for a master to rejoin once the master is lost; `None` to give
    /// up at once (see [`ControlConfig::rejoin_within`](crate::comm::ControlConfig::rejoin_within)).
    pub fn rejoin_within(mut self, within: Option<Duration>) -> ConnectOptions {
        self.control.rejoin_within = within;
        self
    }

    /// Whether to hold a liveness connection to the master (see
    /// [`ConnectOptions::liveness`](ConnectOptions#structfield.liveness)).
    pub fn liveness(mut self, on: bool) -> ConnectOptions {
        self.liveness = on;
        self
    }

    /// A fixed group (see [`ConnectOptions::closed`](ConnectOptions#structfield.closed)).
    pub fn closed(mut self, closed: bool) -> ConnectOptions {
        self.closed = closed;
        self
    }

    /// Which transport carries the data links (see [`DataTransport`]).
    pub fn data_transport(mut self, transport: DataTransport) -> ConnectOptions {
        self.data_transport = transport;
        self
    }

    /// Shared memory for data links to peers on this host, or never (see
    /// [`ConnectOptions::shared_memory`](ConnectOptions#structfield.shared_memory)).
    pub fn shared_memory(mut self, mode: SharedMemory) -> ConnectOptions {
        self.shared_memory = mode;
        self
    }

    /// The shared-memory layer's settings: the mode, and the QUIC frame limit and
    /// handshake timeout.
    pub(crate) fn shm_config(&self) -> ShmConfig {
        ShmConfig {
            mode: self.shared_memory,
            max_frame_bytes: self.quic.max_frame_bytes,
            handshake_timeout: self.quic.handshake_timeout,
            ..ShmConfig::default()
        }
    }

    /// All QUIC settings at once.
    pub fn quic(mut self, quic: QuicConfig) -> ConnectOptions {
        self.quic = quic;
        self
    }
}

/// What a shared-state sync did on this peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Tensors this peer received.
    pub tensors_received: usize,
    /// Bytes this peer received.
    pub bytes_received: usize,
    /// Tensors this peer sent.
    pub tensors_sent: usize,
}
