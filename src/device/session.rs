//! [`DeviceSession`]: a peer's device communicator kept in step with its
//! [`Communicator`]'s view, the unique id of each epoch carried by the real master
//! ([`Communicator::device_unique_id_at`]). It feeds the [`DeviceDriver`] the views the
//! master settles and the ids it relays, so that every rank of a view inits from the
//! same id, survivors shrink (or re-init) after a loss, and joiners are added (grow or
//! re-init) at `update_topology`.
//!
//! ```text
//! loop {
//!     comm.update_topology()?;                 // the view of this step
//!     let dev = session.sync(&mut comm)?;       // its device communicator, ready
//!     if let Err(e) = dev.all_reduce(&mut buf, ReduceOp::Sum) {
//!         session.failed(e);                    // revoke or abort; the next sync recovers
//!     }
//! }
//! ```
//!
//! What the caller sees after a device failure (an NCCL error) with no change of
//! membership: the failed collective returns the device error, and the caller hands it
//! to [`DeviceSession::failed`]; the next [`DeviceSession::sync`] makes a fresh
//! communicator in the same epoch, the next *generation*, from an id every member gets
//! from the master (the first one a member offered), and returns it. A member that did
//! not see the failure follows at its next `sync` (the master relayed the newer
//! generation's id to it), or at its next collective, which fails on the dropped
//! communicator. When a peer was lost instead, its loss moves the view, and `sync` after
//! `update_topology` recovers over the survivors as before.
//!
//! A master replaced while members wait for an id (a restart or a standby, with every
//! member back) moves the view with its members unchanged: `sync` follows it by itself,
//! and the new master relays again the id members held, so that every member, those
//! that had made their communicator from it included, ends with the same one.

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
    /// relayed one. Every member of the view must call it. After a failure
    /// ([`DeviceSession::failed`]) in a view that did not move, it makes the next
    /// generation's communicator; when other members did, it follows them.
    ///
    /// Errors: [`Error::Device`] when the backend failed to make the communicator (the
    /// next `sync` tries the next generation); a retryable [`Error::Aborted`] when the
    /// view moved on (other members) while waiting for its id: call `update_topology`
    /// and try again; [`Error::Removed`] once removed.
    pub fn sync(&mut self, comm: &mut Communicator) -> Result<&mut B::Comm> {
        // Each turn that does not return saw the view move to a later epoch with the
        // same members (a master takeover), or found the id relayed unusable (the
        // communicator this peer made from it failed: the next turn renews, once).
        let mut renewed = false;
        loop {
            let epoch = comm.epoch();
            let members = comm.members();
            let (_, generation) = self.driver.current();
            let newer = comm.device_relayed(epoch).filter(|(g, ..)| epoch == self.epoch && *g > generation);
            let event = if epoch > self.epoch {
                self.epoch = epoch;
                Event::View { epoch, members: members.clone() }
            } else if let Some((generation, id, grow)) = newer {
                // Other members saw the communicator fail and made the next generation.
                Event::UniqueId { epoch, generation, id: UniqueId(id), grow }
            } else if self.driver.ready_epoch() == Some(epoch) {
                return self.ready(epoch);
            } else if epoch == self.epoch {
                // This view's communicator failed, or could not be made: the next one.
                Event::Renew { epoch, generation: generation + 1, members: members.clone() }
            } else {
                return Err(Error::Aborted {
                    reason: format!("the view went back from epoch {} to {epoch}", self.epoch),
                });
            };
            let outcomes = self.driver.handle_until(event, &mut abandon(comm, epoch, &members));
            let settled = self.settle(comm, epoch, &members, outcomes)?;
            if settled && (self.driver.ready_epoch() == Some(epoch) || std::mem::replace(&mut renewed, true)) {
                return self.ready(epoch);
            }
        }
    }

    /// Carries `outcomes` through: offers the id made, if any, and waits for the relayed
    /// one unless the communicator is ready. `Ok(false)` when the view moved to a later
    /// epoch with the same `members` while waiting (a master takeover): sync again.
    fn settle(&mut self, comm: &mut Communicator, epoch: u64, members: &[u64], outcomes: Vec<Outcome>) -> Result<bool> {
        let mut offer = None;
        for o in outcomes {
            match o {
                Outcome::Publish { epoch: e, id, grow, .. } if e == epoch => offer = Some((id.0, grow)),
                Outcome::Ready { epoch: e } if e == epoch => return Ok(true),
                Outcome::Publish { .. } | Outcome::Ready { .. } => {}
                Outcome::GaveUp(e) => return Err(gave_up(comm, epoch, e)),
            }
        }
        let (_, generation) = self.driver.current();
        let (generation, id, grow) = match comm.device_unique_id_at(epoch, generation, offer) {
            Ok(relayed) => relayed,
            Err(Error::Aborted { .. }) if comm.epoch() > epoch && comm.members() == members => return Ok(false),
            Err(e) => return Err(e),
        };
        let event = Event::UniqueId { epoch, generation, id: UniqueId(id), grow };
        for o in self.driver.handle_until(event, &mut abandon(comm, epoch, members)) {
            match o {
                Outcome::GaveUp(e) => return Err(gave_up(comm, epoch, e)),
                Outcome::Ready { .. } | Outcome::Publish { .. } => {}
            }
        }
        Ok(true)
    }

    /// A collective (or an async check) on the device communicator failed with `error`:
    /// it is revoked or aborted so that no rank waits on it, and the next
    /// [`DeviceSession::sync`] makes the next communicator (the next generation of this
    /// view, or the next view's).
    pub fn failed(&mut self, error: DeviceError) {
        // Failures lead to no outcome for the caller: recovery happens at the next sync.
        let _ = self.driver.handle(Event::Failed(error));
    }

    /// The ready communicator, if any (none after a failure until the next `sync`).
    pub fn comm(&mut self) -> Option<&mut B::Comm> {
        self.driver.comm()
    }

    /// The epoch and generation of the communicator this session holds or makes (the
    /// generation counts the fresh communicators made in that epoch after failures).
    pub fn generation(&self) -> (u64, u32) {
        self.driver.current()
    }

    fn ready(&mut self, epoch: u64) -> Result<&mut B::Comm> {
        self.driver.comm().ok_or_else(|| Error::Aborted {
            reason: format!("the device communicator of epoch {epoch} is not ready: call sync again"),
        })
    }
}

/// Whether to give up a communicator of `epoch` over `members` being made: once the view
/// moved on with other members, a rank it waits for may never come (a lost peer), and
/// once this peer is no longer a member (its view reads empty), nobody waits for it. A
/// takeover's view with the same members keeps it: the new master relays the same id.
fn abandon<'a>(comm: &'a Communicator, epoch: u64, members: &'a [u64]) -> impl FnMut() -> Option<String> + 'a {
    move || {
        let (now, current) = (comm.epoch(), comm.members());
        if current.is_empty() {
            return Some("this peer is no longer a member".into());
        }
        (now > epoch && current != members)
            .then(|| format!("the view moved from epoch {epoch} to {now} while its device communicator was being made"))
    }
}

/// The error of a communicator that could not be made: [`Error::Removed`] once this peer
/// is no longer a member; a retryable [`Error::Aborted`] when the view moved on
/// meanwhile (call `update_topology`, then `sync`); else the device's error (the next
/// `sync` makes the next generation).
fn gave_up(comm: &Communicator, epoch: u64, e: DeviceError) -> Error {
    if comm.members().is_empty() {
        return Error::Removed { reason: format!("removed while the device communicator was being made: {e}") };
    }
    match comm.epoch() > epoch {
        true => Error::Aborted { reason: format!("the view moved on from epoch {epoch}: {e}") },
        false => Error::Device(e),
    }
}
