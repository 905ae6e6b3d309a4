//! Eager collectives on the peer's side: a member that learnt over the data links that
//! every member completed returns without the master's decision (see `comm::eager`).

use super::{OpKey, PeerState};
use crate::membership::protocol::{Decision, ToMaster};

impl PeerState {
    /// Every member of the eager collective `key` completed it locally (this peer heard
    /// each one's "done" after its own success was reported with [`PeerState::end`]):
    /// it is committed whatever the master still has to hear, and this peer returns now.
    /// A master that takes over hears of it as committed (see [`PeerState::rejoin`]).
    /// Returns whether the collective is now known committed here: not if an abort was
    /// recorded first (e.g. this peer's removal), nor while the master is lost (the
    /// rejoin may already have told a new master that this peer has no decision for
    /// it, and that master decides it: this peer waits for the verdict instead).
    pub fn returned_eagerly(&mut self, key: OpKey) -> bool {
        if self.rejoining.is_some() {
            return false;
        }
        match self.ops.get_mut(&key) {
            Some(rec) if rec.voted_ok && rec.abort.is_none() => {
                rec.decision = Some(Decision::Commit);
                true
            }
            _ => false,
        }
    }

    /// Messages for the master that the state decided to send while handling the
    /// master's ([`ToMaster::ViewSeen`] after a new view); the driver sends them in order.
    pub fn take_outbox(&mut self) -> Vec<ToMaster> {
        std::mem::take(&mut self.outbox)
    }
}
