//! The peer's side of the device (NCCL) unique id exchange: the id the master relays for
//! an epoch (see `membership::master::device_ids`) is kept until a newer one comes, and
//! a caller waiting for the id of an epoch learns whether it came, or why it never will
//! (the view moved on, or this peer is no longer a member).

use super::PeerState;
use crate::error::{Error, Result};

/// A device unique id: `ncclUniqueId`'s 128 bytes and the grow flag its maker chose.
pub type DeviceId = ([u8; 128], bool);

impl PeerState {
    /// The master relayed `id` for `epoch`; an id of an older epoch than the one kept is
    /// stale and dropped.
    pub(super) fn device_id_relayed(&mut self, epoch: u64, id: [u8; 128], grow: bool) {
        if self.device_id.is_none_or(|(kept, ..)| kept <= epoch) {
            self.device_id = Some((epoch, id, grow));
        }
    }

    /// The relayed device id of view `epoch`: `None` while it may still come; an error
    /// once this peer is no longer a member ([`Error::Removed`]) or the view moved past
    /// `epoch` without it ([`Error::Aborted`], retryable: the next view has its own id).
    pub fn device_id(&self, epoch: u64) -> Option<Result<DeviceId>> {
        if let Some(reason) = &self.gone {
            return Some(Err(Error::Removed { reason: reason.clone() }));
        }
        match self.device_id {
            Some((e, id, grow)) if e == epoch => return Some(Ok((id, grow))),
            _ => {}
        }
        let now = self.view.as_ref().map_or(0, |v| v.epoch);
        (now > epoch).then(|| {
            Err(Error::Aborted {
                reason: format!("the view moved to epoch {now} before the device id of epoch {epoch} came"),
            })
        })
    }
}
