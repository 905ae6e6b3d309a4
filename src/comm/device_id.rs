//! [`Communicator::device_unique_id`]: the device (NCCL) unique id of a view, carried by
//! the master (see `membership::master::device_ids` and `device::session`).

use super::Communicator;
use crate::error::Result;

impl Communicator {
    /// The device (NCCL) unique id of view `epoch`'s device communicator, through the
    /// master: offers `offer` (an id this peer made, with its grow flag: whether the
    /// members grow their communicator with it) if any, then blocks until the master
    /// relays the first id a member offered for `epoch`, which every member receives.
    ///
    /// Fails with a retryable [`crate::Error::Aborted`] once the view has moved past
    /// `epoch` (the next view has its own id), and with [`crate::Error::Removed`] once this
    /// peer is no longer a member. `device::session::DeviceSession` calls it; a caller
    /// driving its own device communicators may too.
    pub fn device_unique_id(&mut self, epoch: u64, offer: Option<([u8; 128], bool)>) -> Result<([u8; 128], bool)> {
        self.block(async |p| p.device_unique_id(epoch, offer).await)?
    }
}
