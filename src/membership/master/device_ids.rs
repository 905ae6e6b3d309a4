//! The master's relay of device (NCCL) unique ids: the first id a member offers for the
//! current epoch and a generation above the relayed one goes to every member of the
//! view, so that every rank inits its device communicator from the same id (see
//! `device::membership`, whose sans-IO [`IdRelay`] decides). A member that offers an id
//! for the relayed generation or an older one (a second maker, one that asks again, or
//! one that did not see a newer generation start) gets the relayed one back, and follows
//! it; offers for another epoch, or from a peer that is not a member, are dropped: the
//! view they were for is over, and its members wait for the next one's id.
//!
//! A master that takes over has no id of its own. The rejoining peers bring the id they
//! hold or offered for their view's epoch ([`Rejoin::device`]); when the takeover keeps
//! the view's members unchanged, the new master relays one of them again as generation 0
//! of its new epoch ([`MasterState::adopt_device_id`]): of the newest generation, and one
//! the old master relayed before one a member only offered, since members may have made
//! their communicator from a relayed id (the old master may have reached some members
//! and not others before it died). A member whose communicator was made from that id
//! keeps it; the others init from it. Every member ends with the same id.
//!
//! [`IdRelay`]: crate::device::membership::IdRelay
//! [`Rejoin::device`]: crate::membership::protocol::Rejoin::device

use super::{MasterState, Output};
use crate::device::membership::Event;
use crate::device::UniqueId;
use crate::membership::protocol::{HeldDeviceId, ToPeer};
use crate::membership::view::PeerId;

impl MasterState {
    /// Member `from` offered `id` (with its grow flag) for `epoch`, `generation`.
    pub(super) fn device_id(
        &mut self,
        from: PeerId,
        (epoch, generation): (u64, u32),
        id: [u8; 128],
        grow: bool,
        out: &mut Vec<Output>,
    ) {
        // The relay keeps the id of the current epoch only; a view change forgets it.
        self.device_ids.view(self.epoch, self.members.iter().map(|p| p.id).collect());
        let sends = self.device_ids.publish(from, epoch, generation, UniqueId(id), grow);
        if sends.is_empty() {
            if epoch != self.epoch {
                return;
            }
            if let (Some((generation, first, grow)), Some(p)) =
                (self.device_ids.current(), self.members.iter().find(|p| p.id == from))
            {
                out.push(Output::Send(p.conn, ToPeer::DeviceId { epoch, generation, id: first.0, grow }));
            }
            return;
        }
        self.send_device_ids(sends, out);
    }

    /// After a takeover that kept the newest view's members (`held`: what each rejoined
    /// member brought): relays the id members held for that view's epoch as generation 0
    /// of the current one, if any member had one.
    pub(super) fn adopt_device_id<'a>(
        &mut self,
        newest_epoch: u64,
        held: impl Iterator<Item = &'a HeldDeviceId>,
        out: &mut Vec<Output>,
    ) {
        let Some(d) = held.filter(|d| d.epoch == newest_epoch).max_by_key(|d| (d.generation, d.relayed)) else {
            return;
        };
        let members = self.members.iter().map(|p| p.id).collect();
        let sends = self.device_ids.adopt(self.epoch, members, UniqueId(d.id), d.grow);
        self.send_device_ids(sends, out);
    }

    fn send_device_ids(&self, sends: Vec<(u64, Event)>, out: &mut Vec<Output>) {
        for (peer, event) in sends {
            let (Event::UniqueId { epoch, generation, id, grow }, Some(p)) =
                (event, self.members.iter().find(|p| p.id == peer))
            else {
                continue;
            };
            out.push(Output::Send(p.conn, ToPeer::DeviceId { epoch, generation, id: id.0, grow }));
        }
    }
}
