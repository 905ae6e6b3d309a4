//! [`Communicator::device_unique_id`]: the device (NCCL) unique id of a view, carried by
//! the master (see `membership::master::device_ids` and `device::session`).

use super::Communicator;
use crate::error::Result;
use crate::membership::peer::GenerationId;

impl Communicator {
    /// The device (NCCL) unique id of view `epoch`'s device communicator, through the
    /// master: offers `offer` (an id this peer made, with its grow flag: whether the
    /// members grow their communicator with it) if any, then blocks until the master
    /// relays the first id a member offered for `epoch`, which every member receives.
    ///
    /// Fails with a retryable [`crate::Error::Aborted`] once the view has moved past
    /// `epoch` (the next view has its own id), and with [`crate::Error::Removed`] once this
    /// peer is no longer a member. `device::session::DeviceSession` calls
    /// [`Communicator::device_unique_id_at`]; a caller driving its own device
    /// communicators may call either. This one asks for generation 0 and returns the
    /// newest generation's id.
    pub fn device_unique_id(&mut self, epoch: u64, offer: Option<([u8; 128], bool)>) -> Result<([u8; 128], bool)> {
        self.block(async |p| p.device_unique_id(epoch, offer).await)?
    }

    /// [`Communicator::device_unique_id`] for the communicator of generation
    /// `generation` of `epoch` (0 for the view's first; one more for each fresh
    /// communicator after a device failure with no change of membership): returns the
    /// relayed id of that generation or of a newer one, with its generation, the id and
    /// its grow flag.
    pub fn device_unique_id_at(
        &mut self,
        epoch: u64,
        generation: u32,
        offer: Option<([u8; 128], bool)>,
    ) -> Result<GenerationId> {
        self.block(async |p| p.device_unique_id_at(epoch, generation, offer).await)?
    }

    /// The newest device id the master relayed for `epoch` (generation, id, grow flag),
    /// without waiting: how a member that did not see a device failure learns that the
    /// others moved to a newer generation.
    pub fn device_relayed(&self, epoch: u64) -> Option<GenerationId> {
        self.peer().and_then(|p| p.device_relayed(epoch))
    }
}
