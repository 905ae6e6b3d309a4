//! The encodings of the protocol's own types: views and members, shared-state digests,
//! decisions, and every message to the master and to a peer (the primitives they are
//! built from are in the parent module).

use std::net::SocketAddr;

use super::{encode_vec, read_code, read_flag, Codec, Reader, WireError};
use crate::membership::protocol::{
    AbortReason, Decision, HeldDeviceId, OpResult, Rejoin, Removal, ToMaster, ToPeer, Transfer,
};
use crate::membership::view::{Member, View};
use crate::state::{SyncStrategy, TensorDigest};

impl Codec for Member {
    const MIN_LEN: usize = 8 + SocketAddr::MIN_LEN;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.id.encode(bytes);
        self.addr.encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Member { id: u64::read(r)?, addr: SocketAddr::read(r)? })
    }
}

impl Codec for View {
    const MIN_LEN: usize = 8 + 4;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.epoch.encode(bytes);
        encode_vec(&self.members, bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(View { epoch: u64::read(r)?, members: r.read_vec("members")? })
    }
}

impl Codec for SyncStrategy {
    const MIN_LEN: usize = 1;
    fn encode(&self, bytes: &mut Vec<u8>) {
        (*self as u8).encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        read_code(r, "strategy", SyncStrategy::from_code)
    }
}

impl Codec for TensorDigest {
    const MIN_LEN: usize = String::MIN_LEN + 8 + 32;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.name.encode(bytes);
        self.revision.encode(bytes);
        self.digest.encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(TensorDigest { name: String::read(r)?, revision: u64::read(r)?, digest: r.array()? })
    }
}

impl Codec for Transfer {
    const MIN_LEN: usize = 3 * 4;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.tensor.encode(bytes);
        self.from.encode(bytes);
        self.to.encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Transfer { tensor: u32::read(r)?, from: u32::read(r)?, to: u32::read(r)? })
    }
}

impl Codec for Removal {
    const MIN_LEN: usize = 8 + 4 + String::MIN_LEN;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.id.encode(bytes);
        self.rank.encode(bytes);
        self.detail.encode(bytes);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Removal { id: u64::read(r)?, rank: u32::read(r)?, detail: String::read(r)? })
    }
}

impl Codec for OpResult {
    const MIN_LEN: usize = 1;
    fn encode(&self, bytes: &mut Vec<u8>) {
        match self {
            OpResult::Ok => 0u8.encode(bytes),
            OpResult::Mismatch(msg) => {
                1u8.encode(bytes);
                msg.encode(bytes);
            }
            OpResult::Failed(msg) => {
                2u8.encode(bytes);
                msg.encode(bytes);
            }
            OpResult::Invalid(msg) => {
                3u8.encode(bytes);
                msg.encode(bytes);
            }
            OpResult::Lost { rank, detail } => {
                4u8.encode(bytes);
                rank.encode(bytes);
                detail.encode(bytes);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(match u8::read(r)? {
            0 => OpResult::Ok,
            1 => OpResult::Mismatch(String::read(r)?),
            2 => OpResult::Failed(String::read(r)?),
            3 => OpResult::Invalid(String::read(r)?),
            4 => OpResult::Lost { rank: u32::read(r)?, detail: String::read(r)? },
            code => return Err(WireError::UnknownCode { what: "op result", code }),
        })
    }
}

/// One code for the commit and each abort reason, then the reason's fields.
impl Codec for Decision {
    const MIN_LEN: usize = 1;
    fn encode(&self, bytes: &mut Vec<u8>) {
        match self {
            Decision::Commit => 0u8.encode(bytes),
            Decision::Abort(AbortReason::PeerLost { rank, detail }) => {
                1u8.encode(bytes);
                rank.encode(bytes);
                detail.encode(bytes);
            }
            Decision::Abort(AbortReason::Mismatch { detail }) => {
                2u8.encode(bytes);
                detail.encode(bytes);
            }
            Decision::Abort(AbortReason::Failed { rank, detail }) => {
                3u8.encode(bytes);
                rank.encode(bytes);
                detail.encode(bytes);
            }
            Decision::Abort(AbortReason::Invalid { rank, detail }) => {
                4u8.encode(bytes);
                rank.encode(bytes);
                detail.encode(bytes);
            }
            Decision::Abort(AbortReason::MasterLost { detail }) => {
                5u8.encode(bytes);
                detail.encode(bytes);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(match u8::read(r)? {
            0 => Decision::Commit,
            1 => Decision::Abort(AbortReason::PeerLost { rank: u32::read(r)?, detail: String::read(r)? }),
            2 => Decision::Abort(AbortReason::Mismatch { detail: String::read(r)? }),
            3 => Decision::Abort(AbortReason::Failed { rank: u32::read(r)?, detail: String::read(r)? }),
            4 => Decision::Abort(AbortReason::Invalid { rank: u32::read(r)?, detail: String::read(r)? }),
            5 => Decision::Abort(AbortReason::MasterLost { detail: String::read(r)? }),
            code => return Err(WireError::UnknownCode { what: "decision", code }),
        })
    }
}

impl Codec for Rejoin {
    const MIN_LEN: usize = 8 + SocketAddr::MIN_LEN + 8 + View::MIN_LEN + 1 + 4 + 4 + 1;
    fn encode(&self, bytes: &mut Vec<u8>) {
        self.id.encode(bytes);
        self.data_addr.encode(bytes);
        self.term.encode(bytes);
        self.view.encode(bytes);
        u8::from(self.voting).encode(bytes);
        encode_vec(&self.committed, bytes);
        encode_vec(&self.undecided, bytes);
        // The device id: a presence flag, then epoch, generation, id, grow, relayed.
        u8::from(self.device.is_some()).encode(bytes);
        if let Some(d) = &self.device {
            d.epoch.encode(bytes);
            d.generation.encode(bytes);
            d.id.encode(bytes);
            u8::from(d.grow).encode(bytes);
            u8::from(d.relayed).encode(bytes);
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Rejoin {
            id: u64::read(r)?,
            data_addr: SocketAddr::read(r)?,
            term: u64::read(r)?,
            view: View::read(r)?,
            voting: u8::read(r)? != 0,
            committed: r.read_vec("committed")?,
            undecided: r.read_vec("undecided")?,
            device: match read_flag(r)? {
                false => None,
                true => Some(HeldDeviceId {
                    epoch: u64::read(r)?,
                    generation: u32::read(r)?,
                    id: r.array()?,
                    grow: read_flag(r)?,
                    relayed: read_flag(r)?,
                }),
            },
        })
    }
}

impl Codec for ToMaster {
    const MIN_LEN: usize = 1;
    fn encode(&self, bytes: &mut Vec<u8>) {
        match self {
            ToMaster::Join { id, data_addr } => {
                1u8.encode(bytes);
                id.encode(bytes);
                data_addr.encode(bytes);
            }
            ToMaster::Heartbeat => 2u8.encode(bytes),
            ToMaster::UpdateTopology { epoch } => {
                3u8.encode(bytes);
                epoch.encode(bytes);
            }
            ToMaster::OpBegin { epoch, seq, call } => {
                4u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                call.encode(bytes);
            }
            ToMaster::OpEnd { epoch, seq, result } => {
                5u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                result.encode(bytes);
            }
            ToMaster::SyncState { epoch, seq, strategy, tensors } => {
                6u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                strategy.encode(bytes);
                encode_vec(tensors, bytes);
            }
            ToMaster::Leave => 7u8.encode(bytes),
            ToMaster::SubOpBegin { epoch, seq, call, members } => {
                8u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                call.encode(bytes);
                encode_vec(members, bytes);
            }
            ToMaster::Unreachable { epoch, peer } => {
                9u8.encode(bytes);
                epoch.encode(bytes);
                peer.encode(bytes);
            }
            ToMaster::Rejoin(rejoin) => {
                10u8.encode(bytes);
                rejoin.encode(bytes);
            }
            ToMaster::EagerOpBegin { epoch, seq, call } => {
                11u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                call.encode(bytes);
            }
            ToMaster::EagerSubOpBegin { epoch, seq, call, members } => {
                12u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                call.encode(bytes);
                encode_vec(members, bytes);
            }
            ToMaster::ViewSeen { epoch } => {
                13u8.encode(bytes);
                epoch.encode(bytes);
            }
            ToMaster::DeviceId { epoch, generation, id, grow } => {
                14u8.encode(bytes);
                epoch.encode(bytes);
                generation.encode(bytes);
                id.encode(bytes);
                u8::from(*grow).encode(bytes);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(match u8::read(r)? {
            1 => ToMaster::Join { id: u64::read(r)?, data_addr: SocketAddr::read(r)? },
            2 => ToMaster::Heartbeat,
            3 => ToMaster::UpdateTopology { epoch: u64::read(r)? },
            4 => ToMaster::OpBegin { epoch: u64::read(r)?, seq: u64::read(r)?, call: u64::read(r)? },
            5 => ToMaster::OpEnd { epoch: u64::read(r)?, seq: u64::read(r)?, result: OpResult::read(r)? },
            6 => ToMaster::SyncState {
                epoch: u64::read(r)?,
                seq: u64::read(r)?,
                strategy: SyncStrategy::read(r)?,
                tensors: r.read_vec("tensors")?,
            },
            7 => ToMaster::Leave,
            8 => ToMaster::SubOpBegin {
                epoch: u64::read(r)?,
                seq: u64::read(r)?,
                call: u64::read(r)?,
                members: r.read_vec("members")?,
            },
            9 => ToMaster::Unreachable { epoch: u64::read(r)?, peer: u64::read(r)? },
            10 => ToMaster::Rejoin(Box::new(Rejoin::read(r)?)),
            11 => ToMaster::EagerOpBegin { epoch: u64::read(r)?, seq: u64::read(r)?, call: u64::read(r)? },
            12 => ToMaster::EagerSubOpBegin {
                epoch: u64::read(r)?,
                seq: u64::read(r)?,
                call: u64::read(r)?,
                members: r.read_vec("members")?,
            },
            13 => ToMaster::ViewSeen { epoch: u64::read(r)? },
            14 => ToMaster::DeviceId {
                epoch: u64::read(r)?,
                generation: u32::read(r)?,
                id: r.array()?,
                grow: read_flag(r)?,
            },
            code => return Err(WireError::UnknownCode { what: "message to master", code }),
        })
    }
}

impl Codec for ToPeer {
    const MIN_LEN: usize = 1;
    fn encode(&self, bytes: &mut Vec<u8>) {
        match self {
            ToPeer::Pending => 1u8.encode(bytes),
            ToPeer::View { view, removed, term } => {
                2u8.encode(bytes);
                view.encode(bytes);
                encode_vec(removed, bytes);
                term.encode(bytes);
            }
            ToPeer::Outcome { epoch, seq, decision } => {
                3u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                decision.encode(bytes);
            }
            ToPeer::PendingJoiners { count } => {
                4u8.encode(bytes);
                count.encode(bytes);
            }
            ToPeer::SyncPlan { epoch, seq, agreed, transfers } => {
                5u8.encode(bytes);
                epoch.encode(bytes);
                seq.encode(bytes);
                encode_vec(agreed, bytes);
                encode_vec(transfers, bytes);
            }
            ToPeer::Refused { reason } => {
                6u8.encode(bytes);
                reason.encode(bytes);
            }
            ToPeer::Heartbeat => 7u8.encode(bytes),
            ToPeer::TopologyDone { epoch } => {
                8u8.encode(bytes);
                epoch.encode(bytes);
            }
            ToPeer::DeviceId { epoch, generation, id, grow } => {
                9u8.encode(bytes);
                epoch.encode(bytes);
                generation.encode(bytes);
                id.encode(bytes);
                u8::from(*grow).encode(bytes);
            }
        }
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(match u8::read(r)? {
            1 => ToPeer::Pending,
            2 => ToPeer::View { view: View::read(r)?, removed: r.read_vec("removals")?, term: u64::read(r)? },
            3 => ToPeer::Outcome { epoch: u64::read(r)?, seq: u64::read(r)?, decision: Decision::read(r)? },
            4 => ToPeer::PendingJoiners { count: u32::read(r)? },
            5 => ToPeer::SyncPlan {
                epoch: u64::read(r)?,
                seq: u64::read(r)?,
                agreed: r.read_vec("agreed")?,
                transfers: r.read_vec("transfers")?,
            },
            6 => ToPeer::Refused { reason: String::read(r)? },
            7 => ToPeer::Heartbeat,
            8 => ToPeer::TopologyDone { epoch: u64::read(r)? },
            9 => ToPeer::DeviceId {
                epoch: u64::read(r)?,
                generation: u32::read(r)?,
                id: r.array()?,
                grow: read_flag(r)?,
            },
            code => return Err(WireError::UnknownCode { what: "message to peer", code }),
        })
    }
}
