//! The control protocol's vocabulary: the messages between peers and the master.
//!
//! These are plain data. Their binary form is in [`super::codec`], which implements
//! [`super::codec::Codec`] for each of them; this module does not depend on it.

use std::net::SocketAddr;

use super::view::{PeerId, View};
use crate::state::{Digest, SyncStrategy, TensorDigest};

/// One transfer of a sync plan: rank `from` sends tensor `tensor` to rank `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Index of the tensor in the sync request's order.
    pub tensor: u32,
    /// Sending rank.
    pub from: u32,
    /// Receiving rank.
    pub to: u32,
}

/// How a collective ended on one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// It completed locally.
    Ok,
    /// It saw frames of a different call.
    Mismatch(String),
    /// It failed otherwise.
    Failed(String),
    /// Its link to the member of rank `rank` (in the collective's view) broke: the master
    /// aborts with [`AbortReason::PeerLost`], so every member reports the loss as a loss
    /// even when the master has not yet seen the lost member's control connection go.
    Lost {
        /// The member whose link broke.
        rank: u32,
        /// How it broke.
        detail: String,
    },
    /// The caller's own input was invalid (e.g. a non-finite value in a quantized
    /// all-reduce): every member returns [`crate::Error::InvalidArgument`], so all of
    /// them take the same path.
    Invalid(String),
}

/// Why the master aborted a collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortReason {
    /// A member was lost while it ran.
    PeerLost {
        /// The lost member's rank in the collective's view.
        rank: u32,
        /// What the master observed.
        detail: String,
    },
    /// Members made different calls.
    Mismatch {
        /// What differed.
        detail: String,
    },
    /// A member's collective failed locally.
    Failed {
        /// The failing member's rank.
        rank: u32,
        /// Its error message.
        detail: String,
    },
    /// A member's input was invalid ([`OpResult::Invalid`]).
    Invalid {
        /// The member's rank.
        rank: u32,
        /// What was wrong with it.
        detail: String,
    },
    /// The master that ran it was replaced before it told anyone a commit: a restarted
    /// or standby master aborts it on every member (see [`Rejoin`]).
    MasterLost {
        /// What happened.
        detail: String,
    },
}

/// The master's decision on one collective.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every member completed: keep the result.
    Commit,
    /// Discard the result and restore the buffer.
    Abort(AbortReason),
}

/// A member that left the view, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    /// The peer.
    pub id: PeerId,
    /// Its rank in the previous view.
    pub rank: u32,
    /// Lost (crash, timeout) or left gracefully.
    pub detail: String,
}

/// What a peer tells a master that replaces the one it lost (restarted on the same
/// address, or a standby): enough for the new master to rebuild the view and settle the
/// collectives the old one left undecided, with no log of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejoin {
    /// The peer's id.
    pub id: PeerId,
    /// Where its data links are accepted.
    pub data_addr: SocketAddr,
    /// The term of the master it followed.
    pub term: u64,
    /// The last view it was admitted into.
    pub view: View,
    /// Whether it waits in `update_topology` (its vote counts in the new master's round).
    pub voting: bool,
    /// Collectives (epoch, seq) it knows were committed.
    pub committed: Vec<(u64, u64)>,
    /// Collectives (epoch, seq) it began and has no decision for.
    pub undecided: Vec<(u64, u64)>,
    /// The device (NCCL) unique id it holds or offered for its view's epoch, if any: a
    /// master that takes over with the view unchanged relays it again, so that members
    /// that init from it and members still waiting end with the same id (see
    /// `membership::master::device_ids`).
    pub device: Option<HeldDeviceId>,
}

/// A device unique id a rejoining peer brings (see [`Rejoin::device`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldDeviceId {
    /// The view it is for.
    pub epoch: u64,
    /// Its generation within the epoch (a fresh communicator after a device failure
    /// is the next generation).
    pub generation: u32,
    /// `ncclUniqueId`'s 128 opaque bytes.
    pub id: [u8; 128],
    /// Whether the members grow their communicator with it.
    pub grow: bool,
    /// Whether the old master relayed it (members may have made their communicator
    /// from it), rather than this peer only offering it.
    pub relayed: bool,
}

/// Messages from a peer to the master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToMaster {
    /// First message of a control connection: asks to join with a data address.
    Join {
        /// The peer's chosen identity, unique in the cluster.
        id: PeerId,
        /// Where its data links are accepted.
        data_addr: SocketAddr,
    },
    /// "Still alive"; any message counts as one.
    Heartbeat,
    /// The member is in `update_topology` for view `epoch`.
    UpdateTopology {
        /// The view the member is in.
        epoch: u64,
    },
    /// The member starts collective `seq` of `epoch` with call fingerprint `call`.
    OpBegin {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number in the epoch.
        seq: u64,
        /// Fingerprint of the call (kind, sizes, dtype, op).
        call: u64,
    },
    /// The member finished collective `seq` of `epoch` locally.
    OpEnd {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// How it ended on this member.
        result: OpResult,
    },
    /// The member starts a shared-state sync (collective `seq` of `epoch`).
    SyncState {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// How this member takes part.
        strategy: SyncStrategy,
        /// Its tensors, in a fixed order.
        tensors: Vec<TensorDigest>,
    },
    /// The member leaves the group gracefully.
    Leave,
    /// The member starts sub-group collective `seq` of `epoch` among `members` only
    /// (peer ids in sub-rank order): the master tallies and commits it over those
    /// members alone.
    SubOpBegin {
        /// View epoch.
        epoch: u64,
        /// Sub-group collective key (see `comm::subgroup`).
        seq: u64,
        /// Fingerprint of the call, the member set included.
        call: u64,
        /// The sub-group's members.
        members: Vec<PeerId>,
    },
    /// A member that lost its master asks this one to take over (first message of a
    /// control connection, instead of a join).
    Rejoin(Box<Rejoin>),
    /// [`ToMaster::OpBegin`] of an eager collective: one whose members may return before
    /// the master's decision, once every member told them over the data links that it
    /// completed locally (see `comm::eager`). The master never aborts such a collective
    /// while a surviving member that began it may still report success: a loss leaves
    /// it waiting for the survivors' reports (see `membership::master::carried`).
    EagerOpBegin {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number in the epoch.
        seq: u64,
        /// Fingerprint of the call.
        call: u64,
    },
    /// [`ToMaster::SubOpBegin`] of an eager collective (see [`ToMaster::EagerOpBegin`]).
    EagerSubOpBegin {
        /// View epoch.
        epoch: u64,
        /// Sub-group collective key.
        seq: u64,
        /// Fingerprint of the call, the member set included.
        call: u64,
        /// The sub-group's members.
        members: Vec<PeerId>,
    },
    /// The member moved to the view of `epoch`: it begins no collective of an older
    /// epoch from now on. (Messages of one connection arrive in order, so every begin
    /// it sent in an older epoch is in by now.)
    ViewSeen {
        /// The view it moved to.
        epoch: u64,
    },
    /// The member could not open, or lost, its data link to member `peer` in `epoch`
    /// (a failed handshake, a link that timed out): a witness statement the master
    /// counts to settle a split group (see `MasterState`).
    Unreachable {
        /// View epoch.
        epoch: u64,
        /// The member it cannot reach.
        peer: PeerId,
    },
    /// The member made the device (NCCL) unique id of the communicator of view `epoch`,
    /// generation `generation` (see `device::membership`): the master relays the first
    /// one it gets for the current epoch and a generation above the one it relayed to
    /// every member ([`ToPeer::DeviceId`]), and the one it relayed to a member that
    /// offers another for the same or an older generation. Offers for other epochs are
    /// dropped.
    DeviceId {
        /// The view it is for.
        epoch: u64,
        /// The communicator's generation within the epoch: 0 for the view's first, one
        /// more for each fresh communicator after a device failure.
        generation: u32,
        /// `ncclUniqueId`'s 128 opaque bytes.
        id: [u8; 128],
        /// Whether the members grow their communicator with it (else a fresh init).
        grow: bool,
    },
}

/// Messages from the master to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToPeer {
    /// The join request is queued until the members call `update_topology`.
    Pending,
    /// A new view. Collectives of older epochs are void.
    View {
        /// The view.
        view: View,
        /// Members removed since the previous view.
        removed: Vec<Removal>,
        /// The master's term: it grows with every takeover (restart or standby), and a
        /// peer follows no master of a term older than one it has followed.
        term: u64,
    },
    /// The outcome of a collective.
    Outcome {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// Commit or abort.
        decision: Decision,
    },
    /// How many joiners are waiting for admission.
    PendingJoiners {
        /// Their number.
        count: u32,
    },
    /// Who sends which tensor to whom, for sync `seq` of `epoch`.
    SyncPlan {
        /// View epoch.
        epoch: u64,
        /// Collective sequence number.
        seq: u64,
        /// The agreed revision and hash of each tensor.
        agreed: Vec<(u64, Digest)>,
        /// The transfers to make.
        transfers: Vec<Transfer>,
    },
    /// The master refuses or ends this peer's membership.
    Refused {
        /// Why.
        reason: String,
    },
    /// "The master is alive": lets a peer notice a master it can no longer hear.
    Heartbeat,

    /// Every member has called `update_topology`: the round is over, in view `epoch`.
    TopologyDone {
        /// The view the round ended in.
        epoch: u64,
    },
    /// The device (NCCL) unique id of view `epoch`'s communicator of generation
    /// `generation`: the first one a member offered ([`ToMaster::DeviceId`]); every
    /// member inits from it (a member on an older generation drops its communicator
    /// and follows).
    DeviceId {
        /// The view it is for.
        epoch: u64,
        /// The communicator's generation within the epoch.
        generation: u32,
        /// `ncclUniqueId`'s 128 opaque bytes.
        id: [u8; 128],
        /// Whether the members grow their communicator with it (else a fresh init).
        grow: bool,
    },
}
