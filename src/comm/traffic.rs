//! What crossed this peer's data links: [`Communicator::traffic`] and [`Traffic`].
//!
//! Every data transport (in-memory, QUIC, TCP, shared memory) hands its frames to one
//! demultiplexer per link (`transport::demux`), which counts each frame sent and
//! received with relaxed atomic adds; a snapshot reads them. Counts are per peer id and
//! run from this peer's connection on, across reconnections and view changes.

use std::collections::BTreeMap;

use super::Communicator;
use crate::membership::PeerId;
use crate::transport::Header;

/// Frames and payload bytes exchanged with one peer.
///
/// Payload bytes exclude the frame headers ([`Header::LEN`] bytes per frame; see
/// [`PeerTraffic::wire_bytes_sent`]). Collectives, point-to-point messages and state
/// synchronisation all count; the control connection to the master does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTraffic {
    /// Frames sent to the peer.
    pub frames_sent: u64,
    /// Payload bytes sent to the peer.
    pub bytes_sent: u64,
    /// Frames received from the peer.
    pub frames_received: u64,
    /// Payload bytes received from the peer.
    pub bytes_received: u64,
}

impl PeerTraffic {
    /// Bytes sent with the frame headers.
    pub fn wire_bytes_sent(&self) -> u64 {
        self.bytes_sent + self.frames_sent * Header::LEN as u64
    }

    /// Bytes received with the frame headers.
    pub fn wire_bytes_received(&self) -> u64 {
        self.bytes_received + self.frames_received * Header::LEN as u64
    }

    fn minus(&self, earlier: &PeerTraffic) -> PeerTraffic {
        PeerTraffic {
            frames_sent: self.frames_sent.saturating_sub(earlier.frames_sent),
            bytes_sent: self.bytes_sent.saturating_sub(earlier.bytes_sent),
            frames_received: self.frames_received.saturating_sub(earlier.frames_received),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
        }
    }

    fn plus(&self, other: &PeerTraffic) -> PeerTraffic {
        PeerTraffic {
            frames_sent: self.frames_sent + other.frames_sent,
            bytes_sent: self.bytes_sent + other.bytes_sent,
            frames_received: self.frames_received + other.frames_received,
            bytes_received: self.bytes_received + other.bytes_received,
        }
    }
}

/// A snapshot of this peer's data-link traffic, per peer id, taken by
/// [`Communicator::traffic`]. [`Traffic::since`] gives what moved between two snapshots.
///
/// Frames of other peers' later collectives may arrive at any time, so a snapshot's
/// received counts are exact only where the group is quiet (between two barriers, say);
/// what this peer sent during one of its own calls is counted by the time it returns.
///
/// ```
/// use phalanx::Communicator;
/// let comms = Communicator::local_group(2, Default::default()).unwrap();
/// let moved: Vec<(u64, u64)> = std::thread::scope(|s| {
///     let hs: Vec<_> = comms.into_iter().map(|mut c| s.spawn(move || {
///         let before = c.traffic();
///         let mut x = vec![c.rank() as f32; 1024];
///         c.broadcast(&mut x, 0).unwrap();
///         let after = c.traffic();
///         (after.since(&before).total().bytes_sent, after.total().bytes_received)
///     })).collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// // Rank 0 sent its 1024 floats to rank 1 (and the collective a few bytes of its own).
/// assert!(moved[0].0 >= 4096 && moved[1].1 >= 4096);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    peers: BTreeMap<PeerId, PeerTraffic>,
}

impl Traffic {
    /// The traffic with peer `id` (zeros if none).
    pub fn peer(&self, id: PeerId) -> PeerTraffic {
        self.peers.get(&id).copied().unwrap_or_default()
    }

    /// Every peer this peer has exchanged frames with, ascending by id.
    pub fn peers(&self) -> impl Iterator<Item = (PeerId, PeerTraffic)> + '_ {
        self.peers.iter().map(|(&id, &t)| (id, t))
    }

    /// The sum over all peers.
    pub fn total(&self) -> PeerTraffic {
        self.peers.values().fold(PeerTraffic::default(), |a, t| a.plus(t))
    }

    /// What moved after `earlier` (a snapshot of the same communicator) and up to this one.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        let peers = self.peers.iter().map(|(&id, t)| (id, t.minus(&earlier.peer(id)))).collect();
        Traffic { peers }
    }
}

impl Communicator {
    /// A snapshot of the frames and payload bytes this peer has sent to and received
    /// from each other peer over its data links since it connected (see [`Traffic`]).
    /// Cheap: a few atomic loads per peer, no call to the group.
    pub fn traffic(&self) -> Traffic {
        let peers = self.peer().map(|p| p.traffic()).unwrap_or_default();
        let peers = peers
            .into_iter()
            .map(|(id, (frames_sent, bytes_sent, frames_received, bytes_received))| {
                (id, PeerTraffic { frames_sent, bytes_sent, frames_received, bytes_received })
            })
            .collect();
        Traffic { peers }
    }
}
