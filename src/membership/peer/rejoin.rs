//! A peer whose master is lost: it looks for one to rejoin (see
//! `membership::master::takeover`), with what [`PeerState::rejoin`] tells it.

use std::time::Instant;

use super::{OpKey, PeerState};
use crate::error::Error;
use crate::membership::protocol::{Decision, Rejoin, ToMaster};

impl PeerState {
    /// The term of the master this peer follows (0 before admission).
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether the master was lost and this peer is looking for one to rejoin.
    pub fn rejoining(&self) -> bool {
        self.rejoining.is_some() && self.gone.is_none()
    }

    /// What to tell a master this peer rejoins (see [`Rejoin`]); `None` if it has no
    /// view to bring.
    pub fn rejoin(&mut self, data_addr: std::net::SocketAddr) -> Option<ToMaster> {
        self.vote_deferred = false; // the rejoin carries the vote
        let view = self.view.clone()?;
        let (mut committed, mut undecided) = (Vec::from(self.recent_commits.clone()), Vec::new());
        for (&key, rec) in &self.ops {
            match (&rec.decision, &rec.abort) {
                (Some(Decision::Commit), _) => committed.push(key),
                (None, None) if rec.active => undecided.push(key),
                _ => {}
            }
        }
        let voting = self.voting;
        let device = self.held_device_id(view.epoch);
        Some(ToMaster::Rejoin(Box::new(Rejoin {
            id: self.id,
            data_addr,
            term: self.term,
            view,
            voting,
            committed,
            undecided,
            device,
        })))
    }

    /// A vote made while rejoining is held (a vote queued for the lost master could
    /// reach the new one after the takeover and count in the round after).
    pub fn defer_vote(&mut self) {
        self.vote_deferred = true;
    }

    /// The vote to send once the takeover is done, if one was made after the rejoin.
    pub fn take_deferred_vote(&mut self) -> Option<ToMaster> {
        let due = std::mem::take(&mut self.vote_deferred) && self.voting && self.rejoining.is_none();
        let epoch = self.view.as_ref().map(|v| v.epoch)?;
        due.then_some(ToMaster::UpdateTopology { epoch })
    }

    /// The master was lost for `reason`: with [`PeerConfig::rejoin_within`], this peer
    /// looks for one to rejoin and its collectives wait; otherwise it is cut off.
    pub fn master_lost(&mut self, reason: String, now: Instant) -> Vec<(OpKey, Error)> {
        match self.config.rejoin_within {
            Some(within) if self.gone.is_none() && self.view.is_some() && !self.config.closed => {
                self.rejoining.get_or_insert(now + within);
                Vec::new()
            }
            _ => self.disconnected(reason),
        }
    }
}
