//! [`DeviceSession`]: a peer's device communicator kept in step with its
//! [`Communicator`]'s view, the unique id of each epoch carried by the real master
//! ([`Communicator::device_unique_id`]). It feeds the [`DeviceDriver`] the views the
//! master settles and the ids it relays, so that every rank of a view inits from the
//! same id, survivors shrink (or re-init) after a loss, and joiners are added (grow or
//! re-init) at `update_topology`.
//!
//! ```text
//! loop {
//!     comm.update_topology()?;                 // the view of this step
//!     let dev = session.sync(&mut comm)?;       // its device communicator, ready
//!     if let Err(e) = dev.all_reduce(&mut buf, ReduceOp::Sum) {
//!         session.failed(e);                    // revoke or abort; the next view recovers
//!     }
//! }
//! ```

use super::driver::{DeviceDriver, Outcome};
use super::membership::Event;
use super::{DeviceBackend, DeviceError, UniqueId};
use crate::error::{Error, Result};
use crate::Communicator;

/// One peer's device communicator, following its [`Communicator`]'s views.
pub struct DeviceSession<B: DeviceBackend> {
    driver: DeviceDriver<B>,
    /// The last epoch whose view the driver was given.
    epoch: u64,
}

impl<B: DeviceBackend> DeviceSession<B> {
    /// The session of the peer whose id is `me` ([`Communicator::peer_id`]) on `backend`.
    pub fn new(me: u64, backend: B) -> DeviceSession<B> {
        DeviceSession { driver: DeviceDriver::new(me, backend), epoch: 0 }
    }

    /// The device communicator of `comm`'s current view, made (or shrunk, grown) if need
    /// be: the id's maker offers it through the master and every member waits for the
    /// relayed one. Every member of the view must call it.
    ///
    /// Errors: [`Error::Device`] when the backend failed to make the communicator (the
    /// next view retries); a retryable [`Error::Aborted`] when this view's communicator
    /// failed (see [`DeviceSession::failed`]) or the view moved on while waiting for its
    /// id: call `update_topology` and try again; [`Error::Removed`] once removed.
    pub fn sync(&mut self, comm: &mut Communicator) -> Result<&mut B::Comm> {
        let epoch = comm.epoch();
        if self.driver.ready_epoch() == Some(epoch) {
            return self.ready(epoch);
        }
        if self.epoch >= epoch {
            return Err(Error::Aborted {
                reason: format!(
                    "the device communicator of epoch {epoch} failed: call update_topology for the next view"
                ),
            });
        }
        self.epoch = epoch;
        let outcomes = self.driver.handle(Event::View { epoch, members: comm.members() });
        let mut offer = None;
        for o in outcomes {
            match o {
                Outcome::Publish { epoch: e, id, grow } if e == epoch => offer = Some((id.0, grow)),
                Outcome::Publish { .. } => {}
                Outcome::Ready { epoch: e } if e == epoch => return self.ready(epoch),
                Outcome::Ready { .. } => {}
                Outcome::GaveUp(e) => return Err(Error::Device(e)),
            }
        }
        let (id, grow) = comm.device_unique_id(epoch, offer)?;
        for o in self.driver.handle(Event::UniqueId { epoch, id: UniqueId(id), grow }) {
            match o {
                Outcome::Ready { epoch: e } if e == epoch => return self.ready(epoch),
                Outcome::GaveUp(e) => return Err(Error::Device(e)),
                Outcome::Publish { .. } | Outcome::Ready { .. } => {}
            }
        }
        self.ready(epoch)
    }

    /// A collective (or an async check) on the device communicator failed with `error`:
    /// it is revoked or aborted so that no rank waits on it, and [`DeviceSession::sync`]
    /// makes the next view's communicator.
    pub fn failed(&mut self, error: DeviceError) {
        // Failures lead to no outcome for the caller: recovery waits for the next view.
        let _ = self.driver.handle(Event::Failed(error));
    }

    /// The ready communicator, if any (none after a failure until the next view).
    pub fn comm(&mut self) -> Option<&mut B::Comm> {
        self.driver.comm()
    }

    fn ready(&mut self, epoch: u64) -> Result<&mut B::Comm> {
        self.driver.comm().ok_or_else(|| Error::Aborted {
            reason: format!("the device communicator of epoch {epoch} is not ready: call update_topology"),
        })
    }
}
