//! A peer's topology rounds (`update_topology`) and the views it waits for.

use super::{PeerState, Topology};
use crate::error::Result;
use crate::membership::protocol::ToMaster;
use crate::membership::view::View;

impl PeerState {
    /// Enters `update_topology`.
    pub fn update_topology(&mut self) -> Result<Topology> {
        if let Some(e) = &self.lost {
            return Err(e.clone());
        }
        let epoch = self.view()?.epoch;
        // The round that admitted this peer is its own, as long as no view came since.
        let admitted_now = std::mem::take(&mut self.fresh) && self.settled == Some(epoch);
        if admitted_now || self.config.closed {
            return Ok(Topology::Done);
        }
        self.voting = true;
        Ok(Topology::Wait { msg: ToMaster::UpdateTopology { epoch }, seen: self.rounds })
    }

    /// `None` until more than `seen` topology rounds have ended; then the view, or why
    /// this peer was removed.
    pub fn round_after(&self, seen: u64) -> Option<Result<View>> {
        (self.rounds > seen || self.gone.is_some() || self.lost.is_some()).then(|| self.view_or_loss())
    }

    /// The view, or in an ended closed group the loss that ended it.
    fn view_or_loss(&self) -> Result<View> {
        match &self.lost {
            Some(e) if self.gone.is_none() => Err(e.clone()),
            _ => self.view(),
        }
    }

    /// `None` until a view of an epoch above `epoch` arrived; then it, or removal.
    pub fn view_after(&self, epoch: u64) -> Option<Result<View>> {
        let moved = self.view.as_ref().is_some_and(|v| v.epoch > epoch);
        (moved || self.gone.is_some() || self.lost.is_some()).then(|| self.view_or_loss())
    }
}
