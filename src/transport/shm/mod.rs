//! The shared-memory transport: links between processes of one host over rings in a
//! shared segment, set up through a network link.
//!
//! A [`ShmEndpoint`] wraps a network [`Endpoint`](super::endpoint::Endpoint) (QUIC,
//! TCP). To open a link it creates a segment (a file in `/dev/shm`, mode 0600, its
//! memory reserved up front), opens the network link as usual and offers the segment in
//! the hello, with this host's identity (the kernel's boot id, the machine id, the PID
//! namespace: the kernel decides what "same host" means, not the address). The acceptor
//! takes the offer when it is on the same host, willing ([`SharedMemory::Auto`]) and
//! the segment it opens is the one described (a random token); it then unlinks the
//! file, so that nothing is left in `/dev/shm` once both ends exit, by SIGKILL too,
//! and answers on the network link. (A connector killed in the moment between creating
//! its file and the acceptor unlinking it leaves the file behind; every shared-memory
//! endpoint started later removes such files of processes that are gone, see
//! `segment::sweep_stale`.) From then on both ends carry the link's frames
//! through two rings in the segment, one per direction ([`ring`]), each frame the
//! 32-byte [`Header`](super::Header), its length and its payload ([`frames`]). Any
//! other answer (declined, another host, `/dev/shm` full or absent) leaves the link on
//! the network, unchanged.
//!
//! Properties, as for every [`Link`](super::Link):
//! - **Bounded**: a ring holds at most [`ShmConfig::ring_bytes`]; a sender whose frame
//!   does not fit waits (on a futex, never spinning) until the receiver has read
//!   enough. A frame larger than the ring crosses it in pieces; the receiver hands it
//!   on only once it is whole.
//! - **No torn frames**: a writer publishes its write index with a release store after
//!   the bytes, so a peer killed mid-write leaves a frame the receiver never delivers;
//!   the executor's epoch, sequence and index checks apply as on every link.
//! - **Failure is seen at once**: a close sets a flag in the segment and wakes every
//!   waiter; a peer process that dies is seen through its pidfd, and the network link,
//!   kept open beside the rings, fails the shared-memory link when it closes
//!   ([`liveness`]).
//! - **No spinning, no blocked runtime**: waits are futex waits with a bounded timeout
//!   on two threads per link ([`link`]), never on the async runtime's workers.
//!
//! A frame's bytes are copied once on the way: into the ring by the sender, straight
//! from the caller's buffer when the executor sends them (`Link::send_slice`). A large
//! frame that the receiver finds whole and in one piece in its ring is not copied out:
//! its payload is lent as a `Bytes` over the ring's memory, and the executor reduces or
//! copies from the peer's ring into the caller's buffer; the ring's room comes back to
//! the sender when the payload is dropped, in ring order ([`loan`]). Whoever holds a
//! payload beyond the moment it consumes it copies it first
//! ([`Link::lends_frames`](super::Link::lends_frames)), so a held frame never stalls
//! the sender. Other frames (small ones, one that wraps around the ring's end, one larger
//! than the ring) are copied out into a buffer that comes back to the link when the
//! frame is dropped, so it is not a fresh mapping that faults in page by page. QUIC
//! copies, encrypts and passes them through the kernel.
//!
//! Caveats: a peer on the same host must be trusted with the memory it shares (it
//! authenticated as a member over the network link first); a peer that shrank the
//! segment file could make this process fault on access, and one that wrote into ring
//! bytes it had published could change a lent payload while it is read, which the
//! protocol cannot rule out. In one process (tests) both ends work as well, with the
//! pidfd of the process itself never firing.

pub mod endpoint;
mod frames;
mod futex;
mod hello;
pub mod link;
mod liveness;
mod loan;
mod ring;
mod segment;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use self::endpoint::ShmEndpoint;
pub use self::link::ShmLink;

/// Whether links between processes of one host use shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SharedMemory {
    /// Shared memory when both ends are on one host and both allow it; the network
    /// otherwise.
    #[default]
    Auto,
    /// Always the network: this end neither offers nor accepts shared memory.
    Off,
}

impl std::fmt::Display for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SharedMemory::Auto => "auto",
            SharedMemory::Off => "off",
        })
    }
}

impl std::str::FromStr for SharedMemory {
    type Err = String;

    /// `auto` or `off` (any case).
    fn from_str(s: &str) -> Result<SharedMemory, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(SharedMemory::Auto),
            "off" => Ok(SharedMemory::Off),
            _ => Err(format!("shared memory must be auto or off, not {s:?}")),
        }
    }
}

/// Bytes of each ring (one per direction) by default: 32 frames of the default 256 KiB
/// chunk. Lent payloads keep their room until the executor has reduced them, and the
/// demultiplexer may queue 16 (4 MiB); twice that keeps the sender writing meanwhile
/// (4 MiB rings made the senders wait twice as often; `docs/PERF.md`).
pub const DEFAULT_RING_BYTES: usize = 8 << 20;

/// Settings of a [`ShmEndpoint`].
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Use shared memory where possible, or never.
    pub mode: SharedMemory,
    /// Bytes of each ring; a multiple of 64 from 4 KiB to 1 GiB. Set by the connector.
    pub ring_bytes: usize,
    /// Largest frame (header included) sent or received; larger ones are refused with
    /// [`LinkError::FrameTooLarge`](super::LinkError::FrameTooLarge).
    pub max_frame_bytes: usize,
    /// How long a connector waits for the answer to its offer.
    pub handshake_timeout: Duration,
}

impl Default for ShmConfig {
    fn default() -> ShmConfig {
        ShmConfig {
            mode: SharedMemory::Auto,
            ring_bytes: DEFAULT_RING_BYTES,
            max_frame_bytes: (64 << 20) + super::Header::LEN,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}
