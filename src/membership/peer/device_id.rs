//! The peer's side of the device (NCCL) unique id exchange: the id the master relays for
//! an epoch and generation (see `membership::master::device_ids`) is kept until a newer
//! one comes, and a caller waiting for the id of an epoch learns whether it came, or why
//! it never will (the view moved on, or this peer is no longer a member). The id this
//! peer offered is kept too: a rejoin brings the one it holds or offered to a master
//! that takes over ([`PeerState::held_device_id`]).

use super::PeerState;
use crate::error::{Error, Result};
use crate::membership::protocol::{HeldDeviceId, ToMaster};

/// A device unique id: `ncclUniqueId`'s 128 bytes and the grow flag its maker chose.
pub type DeviceId = ([u8; 128], bool);

/// A relayed device unique id with its generation: (generation, id, grow flag).
pub type GenerationId = (u32, [u8; 128], bool);

impl PeerState {
    /// The master relayed `id` for `epoch`, `generation`; an id older (by epoch, then
    /// generation) than the one kept is stale and dropped.
    pub(super) fn device_id_relayed(&mut self, epoch: u64, generation: u32, id: [u8; 128], grow: bool) {
        if self.device_id.is_none_or(|(e, g, ..)| (e, g) <= (epoch, generation)) {
            self.device_id = Some((epoch, generation, id, grow));
        }
    }

    /// This peer offers `id` (made by it, with its grow flag) for `epoch`, `generation`:
    /// the message for the master. The offer is kept for a rejoin.
    pub fn offer_device_id(&mut self, epoch: u64, generation: u32, id: [u8; 128], grow: bool) -> ToMaster {
        self.device_offer = Some((epoch, generation, id, grow));
        ToMaster::DeviceId { epoch, generation, id, grow }
    }

    /// The relayed device id of view `epoch` (any generation): `None` while it may still
    /// come; an error once this peer is no longer a member ([`Error::Removed`]) or the
    /// view moved past `epoch` without it ([`Error::Aborted`], retryable: the next view
    /// has its own id).
    pub fn device_id(&self, epoch: u64) -> Option<Result<DeviceId>> {
        self.device_id_at(epoch, 0).map(|r| r.map(|(_, id, grow)| (id, grow)))
    }

    /// [`PeerState::device_id`] for generation `generation` or a newer one of `epoch`:
    /// the relayed id with its generation.
    pub fn device_id_at(&self, epoch: u64, generation: u32) -> Option<Result<GenerationId>> {
        if let Some(reason) = &self.gone {
            return Some(Err(Error::Removed { reason: reason.clone() }));
        }
        match self.device_id {
            Some((e, g, id, grow)) if e == epoch && g >= generation => return Some(Ok((g, id, grow))),
            _ => {}
        }
        let now = self.view.as_ref().map_or(0, |v| v.epoch);
        (now > epoch).then(|| {
            Err(Error::Aborted {
                reason: format!("the view moved to epoch {now} before the device id of epoch {epoch} came"),
            })
        })
    }

    /// The newest id the master relayed for `epoch`, if any, without waiting.
    pub fn device_relayed(&self, epoch: u64) -> Option<GenerationId> {
        self.device_id.filter(|(e, ..)| *e == epoch).map(|(_, g, id, grow)| (g, id, grow))
    }

    /// The device id this peer holds (relayed) or offered for `epoch`, for a rejoin:
    /// of the two, the newer generation, and at an equal one the relayed id.
    pub(super) fn held_device_id(&self, epoch: u64) -> Option<HeldDeviceId> {
        let relayed = self.device_id.filter(|(e, ..)| *e == epoch).map(|d| (d, true));
        let offered = self.device_offer.filter(|(e, ..)| *e == epoch).map(|d| (d, false));
        let ((epoch, generation, id, grow), relayed) =
            relayed.into_iter().chain(offered).max_by_key(|((_, g, ..), relayed)| (*g, *relayed))?;
        Some(HeldDeviceId { epoch, generation, id, grow, relayed })
    }
}
