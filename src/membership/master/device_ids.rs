//! The master's relay of device (NCCL) unique ids: the first id a member offers for the
//! current epoch goes to every member of the view, so that every rank inits its device
//! communicator from the same id (see `device::membership`, whose sans-IO
//! [`IdRelay`] decides). A member that offers an id after the first one (a second maker,
//! or one that asks again) gets the relayed one back; offers for another epoch, or from
//! a peer that is not a member, are dropped: the view they were for is over, and its
//! members wait for the next one's id.
//!
//! [`IdRelay`]: crate::device::membership::IdRelay

use super::{MasterState, Output};
use crate::device::membership::Event;
use crate::device::UniqueId;
use crate::membership::protocol::ToPeer;
use crate::membership::view::PeerId;

impl MasterState {
    /// Member `from` offered `id` (with its grow flag) for `epoch`.
    pub(super) fn device_id(&mut self, from: PeerId, epoch: u64, id: [u8; 128], grow: bool, out: &mut Vec<Output>) {
        // The relay keeps the id of the current epoch only; a view change forgets it.
        self.device_ids.view(self.epoch, self.members.iter().map(|p| p.id).collect());
        let sends = self.device_ids.publish(from, epoch, UniqueId(id), grow);
        if sends.is_empty() {
            if epoch != self.epoch {
                return;
            }
            if let (Some((first, grow)), Some(p)) =
                (self.device_ids.current(), self.members.iter().find(|p| p.id == from))
            {
                out.push(Output::Send(p.conn, ToPeer::DeviceId { epoch, id: first.0, grow }));
            }
            return;
        }
        for (peer, event) in sends {
            let (Event::UniqueId { epoch, id, grow }, Some(p)) = (event, self.members.iter().find(|p| p.id == peer))
            else {
                continue;
            };
            out.push(Output::Send(p.conn, ToPeer::DeviceId { epoch, id: id.0, grow }));
        }
    }
}
