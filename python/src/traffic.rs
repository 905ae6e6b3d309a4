//! What crossed a communicator's data links, from Python: `Communicator.traffic()`
//! returns a `Traffic` snapshot (`phalanx::comm::Traffic`) whose `since(earlier)` is
//! what moved in between.

use std::collections::BTreeMap;

use phalanx::comm::{PeerTraffic, Traffic as CoreTraffic};
use pyo3::prelude::*;

/// A peer's counters as a dict: frames_sent, bytes_sent, frames_received,
/// bytes_received.
fn counters(t: PeerTraffic) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("frames_sent", t.frames_sent),
        ("bytes_sent", t.bytes_sent),
        ("frames_received", t.frames_received),
        ("bytes_received", t.bytes_received),
    ])
}

/// A snapshot of a communicator's data-link traffic, per peer id, since it connected:
/// frames and payload bytes (frame headers excluded) sent to and received from each
/// peer. Collectives, point-to-point messages and state synchronisation all count; the
/// control connection to the master does not. Frames of other peers' later collectives
/// may arrive at any time, so the received counts are exact only where the group is
/// quiet (between two barriers).
#[pyclass(frozen, module = "phalanx")]
pub(crate) struct Traffic {
    inner: CoreTraffic,
}

impl From<CoreTraffic> for Traffic {
    fn from(inner: CoreTraffic) -> Traffic {
        Traffic { inner }
    }
}

#[pymethods]
impl Traffic {
    /// `{peer_id: {"frames_sent", "bytes_sent", "frames_received", "bytes_received"}}`
    /// for every peer this one has exchanged frames with.
    #[getter]
    fn peers(&self) -> BTreeMap<u64, BTreeMap<&'static str, u64>> {
        self.inner.peers().map(|(id, t)| (id, counters(t))).collect()
    }

    /// The counters summed over all peers (the same keys as `peers`' values).
    #[getter]
    fn total(&self) -> BTreeMap<&'static str, u64> {
        counters(self.inner.total())
    }

    /// The counters of peer `peer_id` (zeros if none).
    fn peer(&self, peer_id: u64) -> BTreeMap<&'static str, u64> {
        counters(self.inner.peer(peer_id))
    }

    /// What moved after `earlier` (a snapshot of the same communicator) up to this one.
    fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic { inner: self.inner.since(&earlier.inner) }
    }

    fn __repr__(&self) -> String {
        let t = self.inner.total();
        format!(
            "phalanx.Traffic(peers={}, bytes_sent={}, bytes_received={})",
            self.inner.peers().count(),
            t.bytes_sent,
            t.bytes_received
        )
    }
}
